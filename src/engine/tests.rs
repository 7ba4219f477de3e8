//! Engine tests that drive it directly, below the gRPC surface: what the
//! monitor hands it is not reachable through the API, so probe results are
//! applied here by hand.

use super::create::creatable_states;
use super::{CreateRequest, Engine, NewConnection, TransitionRequest};
use crate::access::Scope;
use crate::connection::{Connection, ConnectionId};
use crate::definitions::Registry;
use crate::kinds::Kinds;
use crate::lifecycle::{State, Trigger};
use crate::probe::{Observation, Verdict, Verifier, VerifyFuture};
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn the_create_refusal_names_the_states_a_create_may_ask_for() {
    assert_eq!(
        creatable_states(),
        "DISCOVERED, REGISTERED, CONNECTED or IGNORED"
    );
}

/// A verifier that must not be asked: every request here skips verification.
struct NeverAsked;

impl Verifier for NeverAsked {
    fn verify<'a>(&'a self, c: &'a Connection) -> VerifyFuture<'a> {
        panic!("verification of {} was not expected", c.id)
    }
}

fn engine(dir: &tempfile::TempDir) -> Engine {
    let config = crate::Config::default();
    let store = Store::open(&dir.path().join("t.db"), config.store_config()).unwrap();
    Engine::new(
        store,
        Arc::new(NeverAsked),
        Kinds::new(Arc::new(Registry::builtin()), false),
    )
}

async fn create(e: &Engine, state: State) -> Connection {
    e.create(CreateRequest {
        connection: NewConnection {
            kind: "http".into(),
            name: "x".into(),
            url: "http://127.0.0.1:9/".into(),
            identity: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        },
        initial_state: state,
        skip_verification: true,
        request: None,
        actor: "test".into(),
        scope: Scope::All,
    })
    .await
    .unwrap()
}

async fn user_move(e: &Engine, id: &ConnectionId, target: State) {
    e.transition(TransitionRequest {
        id: id.clone(),
        target,
        reason: String::new(),
        etag: None,
        skip_verification: true,
        request: None,
        actor: "test".into(),
        scope: Scope::All,
        method: "test",
    })
    .await
    .unwrap();
}

fn seen(v: Verdict) -> Option<Observation> {
    Some(Observation {
        verdict: v,
        latency: Duration::from_millis(3),
    })
}

#[tokio::test]
async fn a_probe_overtaken_by_a_user_request_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&dir);
    let probed = create(&e, State::Discovered).await;
    // The probe started on `probed`; meanwhile a user ignores the connection.
    user_move(&e, &probed.id, State::Ignored).await;
    let applied = e
        .apply_probe(&probed, seen(Verdict::Reachable("HTTP 200".into())), 3)
        .await
        .unwrap();
    assert_eq!(applied, None, "the stale result is dropped");
    let now = e.get(probed.id.clone(), &Scope::All).await.unwrap();
    assert_eq!(now.state, State::Ignored);
    assert_eq!(now.last_probe, None);
}

#[tokio::test]
async fn failures_count_to_the_threshold_and_a_success_resets_them() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&dir);
    let c = create(&e, State::Connected).await;
    let fail = || seen(Verdict::Unreachable("HTTP 503".into()));
    let ok = || seen(Verdict::Reachable("HTTP 200".into()));

    let after = |c: Option<Connection>| {
        let c = c.expect("applied");
        (c.state, c.last_probe.map(|p| p.consecutive_failures))
    };
    let mut cur = e.get(c.id.clone(), &Scope::All).await.unwrap();
    for (result, want) in [
        (fail(), (State::Connected, Some(1))),
        (fail(), (State::Connected, Some(2))),
        (ok(), (State::Connected, Some(0))),
        (fail(), (State::Connected, Some(1))),
        (fail(), (State::Connected, Some(2))),
        (fail(), (State::Disconnected, Some(3))),
    ] {
        let applied = e.apply_probe(&cur, result, 3).await.unwrap();
        assert_eq!(after(applied.clone()), want);
        cur = applied.unwrap();
    }
    assert_eq!(cur.state_trigger, Trigger::System);
    assert!(
        cur.state_reason.contains("3 failed probes"),
        "{}",
        cur.state_reason
    );
    // Only the move was an event; the probe results alone were not.
    assert_eq!(cur.revision, c.revision.next());
}

#[tokio::test]
async fn a_batch_of_results_answers_each_in_order_and_moves_only_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&dir);
    let stays = create(&e, State::Connected).await;
    let discovered = create(&e, State::Discovered).await;
    let overtaken = create(&e, State::Discovered).await;
    user_move(&e, &overtaken.id, State::Ignored).await;
    let answers = e
        .apply_probes(
            vec![
                (stays.clone(), seen(Verdict::Reachable("HTTP 200".into()))),
                // Found: moves to REGISTERED, in a synced write of its own.
                (
                    discovered.clone(),
                    seen(Verdict::Reachable("HTTP 200".into())),
                ),
                (
                    overtaken.clone(),
                    seen(Verdict::Reachable("HTTP 200".into())),
                ),
                (stays.clone(), seen(Verdict::NotChecked("no permit".into()))),
            ],
            3,
        )
        .await;
    let answers: Vec<_> = answers
        .into_iter()
        .map(|a| a.unwrap().map(|c| (c.id, c.state)))
        .collect();
    assert_eq!(
        answers,
        vec![
            Some((stays.id.clone(), State::Connected)),
            Some((discovered.id.clone(), State::Registered)),
            None,
            Some((stays.id.clone(), State::Connected)),
        ]
    );
    let kept = e.get(stays.id.clone(), &Scope::All).await.unwrap();
    assert_eq!(
        kept.revision, stays.revision,
        "keeping a result is no change"
    );
    assert_eq!(
        kept.last_probe.map(|p| p.message),
        Some("HTTP 200".to_string())
    );
    let moved = e.get(discovered.id.clone(), &Scope::All).await.unwrap();
    assert_eq!(moved.state, State::Registered);
    assert_eq!(moved.state_trigger, Trigger::System);
    let dropped = e.get(overtaken.id.clone(), &Scope::All).await.unwrap();
    assert_eq!(dropped.last_probe, None);
}
