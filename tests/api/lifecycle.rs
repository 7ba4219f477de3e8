//! Every row of the lifecycle table through the API, verification outcomes,
//! and DescribeLifecycle.

use crate::common::*;
use std::collections::BTreeSet;
use tether::pb::tether::v1 as pb;
use tonic::Code;

const ALL: [S; 8] = [
    S::Discovered,
    S::Registered,
    S::Connected,
    S::Ignored,
    S::Maintenance,
    S::Disconnected,
    S::Deleted,
    S::NotFound,
];

/// The USER column of docs/LIFECYCLE.md, transcribed for these tests.
fn user_targets(from: S) -> &'static [S] {
    match from {
        S::Discovered => &[S::Registered, S::Ignored, S::Deleted],
        S::Registered => &[S::Connected, S::Maintenance, S::Ignored, S::Deleted],
        S::Connected => &[S::Disconnected, S::Maintenance, S::Ignored, S::Deleted],
        S::Ignored => &[S::Registered, S::Deleted],
        S::Maintenance => &[S::Connected, S::Registered, S::Ignored, S::Deleted],
        S::Disconnected => &[S::Connected, S::Deleted],
        S::NotFound => &[S::Registered, S::Deleted],
        S::Deleted | S::Unspecified => &[],
    }
}

fn name(s: S) -> &'static str {
    s.as_str_name().trim_start_matches("CONNECTION_STATE_")
}

/// A fresh connection in `state`, reached through the API only.
async fn in_state(c: &mut Client, url: &str, state: S) -> pb::Connection {
    let body = conn("tcp", url);
    let made = match state {
        S::Discovered | S::Registered | S::Connected | S::Ignored => {
            create_in(c, body, state, false).await
        }
        S::Maintenance => {
            let x = create_in(c, body, S::Registered, false).await;
            transition(c, &x.id, S::Maintenance).await.unwrap()
        }
        S::Disconnected => {
            let x = create_in(c, body, S::Connected, false).await;
            transition(c, &x.id, S::Disconnected).await.unwrap()
        }
        S::Deleted => {
            let x = create(c, body).await;
            transition(c, &x.id, S::Deleted).await.unwrap()
        }
        S::NotFound => {
            // A register attempt that cannot reach it: SYSTEM moves it to NOT_FOUND.
            let closed = ClosedPort::new();
            let x = create(c, conn("tcp", &closed.url())).await;
            let r = transition(c, &x.id, S::Registered).await;
            assert_error(r, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");
            let x = get(c, &x.id).await;
            // Point it somewhere reachable so the verified edge out of NOT_FOUND can pass.
            c.update_connection(pb::UpdateConnectionRequest {
                connection: Some(pb::Connection {
                    id: x.id.clone(),
                    url: url.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
        S::Unspecified => unreachable!(),
    };
    assert_eq!(made.state, state as i32, "setting up {}", name(state));
    made
}

#[tokio::test]
async fn every_row_of_the_table_through_the_api() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let port = OpenPort::new().await;
    for from in ALL {
        for to in ALL {
            let x = in_state(&mut c, &port.url(), from).await;
            let events_before = events_of(&mut c, &x.id).await.len();
            let r = transition(&mut c, &x.id, to).await;
            let after = get(&mut c, &x.id).await;
            let events_after = events_of(&mut c, &x.id).await.len();
            if from == to {
                let same = r.unwrap_or_else(|e| panic!("{} -> itself: {e:?}", name(from)));
                assert_eq!(same.revision, x.revision, "asking twice is not a change");
                assert_eq!(events_after, events_before);
            } else if user_targets(from).contains(&to) {
                let moved = r.unwrap_or_else(|e| panic!("{} -> {}: {e:?}", name(from), name(to)));
                assert_eq!(moved.state, to as i32);
                assert_eq!(moved.state_trigger, pb::Trigger::User as i32);
                assert_eq!(after, moved);
                assert_eq!(
                    events_after,
                    events_before + 1,
                    "{} -> {}: one event",
                    name(from),
                    name(to)
                );
            } else {
                let meta = assert_error(r, Code::FailedPrecondition, "INVALID_TRANSITION");
                let allowed: Vec<&str> = user_targets(from).iter().map(|s| name(*s)).collect();
                let got: Vec<&str> = meta["allowed"]
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .collect();
                assert_eq!(got, allowed, "{} -> {}", name(from), name(to));
                assert_eq!(after, x, "a refused request changes nothing");
                assert_eq!(events_after, events_before, "and records nothing");
            }
        }
    }
}

#[tokio::test]
async fn verified_targets_are_checked_and_failures_follow_the_table() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let closed = ClosedPort::new();
    let closed_url = closed.url();

    // Registering something unreachable moves it to NOT_FOUND (SYSTEM).
    let x = create(&mut c, conn("tcp", &closed_url)).await;
    let meta = assert_error(
        transition(&mut c, &x.id, S::Registered).await,
        Code::FailedPrecondition,
        "CONNECTION_UNREACHABLE",
    );
    assert_eq!(meta["state"], "NOT_FOUND");
    let nf = get(&mut c, &x.id).await;
    assert_eq!(nf.state, S::NotFound as i32);
    assert_eq!(nf.state_trigger, pb::Trigger::System as i32);
    assert!(
        nf.state_reason.contains("unreachable"),
        "{}",
        nf.state_reason
    );
    let ev = events_of(&mut c, &x.id).await;
    assert_eq!(ev.last().unwrap().actor, "tether");

    // Any other failed attempt leaves the state as it was.
    let port = OpenPort::new().await;
    let y = create_in(&mut c, conn("tcp", &port.url()), S::Connected, false).await;
    let y = transition(&mut c, &y.id, S::Disconnected).await.unwrap();
    drop(port);
    c.update_connection(pb::UpdateConnectionRequest {
        connection: Some(pb::Connection {
            id: y.id.clone(),
            url: closed_url.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_error(
        transition(&mut c, &y.id, S::Connected).await,
        Code::FailedPrecondition,
        "CONNECTION_UNREACHABLE",
    );
    assert_eq!(get(&mut c, &y.id).await.state, S::Disconnected as i32);

    // skip_verification skips it.
    let skipped = c
        .transition_connection(pb::TransitionConnectionRequest {
            id: y.id.clone(),
            target_state: S::Connected as i32,
            skip_verification: true,
            ..Default::default()
        })
        .await
        .expect("skipped verification")
        .into_inner();
    assert_eq!(skipped.state, S::Connected as i32);

    // Creating straight into REGISTERED verifies too; a create that fails
    // it commits nothing, and its error names no connection.
    let before = store_revision(&mut c).await;
    let r = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(conn("tcp", &closed_url)),
            initial_state: S::Registered as i32,
            ..Default::default()
        })
        .await;
    let meta = assert_error(r, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");
    assert_eq!(meta["id"], "", "{meta:?}");
    assert_eq!(store_revision(&mut c).await, before, "nothing committed");
}

#[tokio::test]
async fn a_create_that_fails_verification_leaves_nothing_behind() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let closed = ClosedPort::new();
    let denied = HttpStub::new(401).await;
    let before = store_revision(&mut c).await;
    for (body, reason) in [
        (conn("tcp", &closed.url()), "CONNECTION_UNREACHABLE"),
        (conn("http", &denied.url()), "CREDENTIALS_REJECTED"),
    ] {
        for state in [S::Registered, S::Connected] {
            let r = c
                .create_connection(pb::CreateConnectionRequest {
                    connection: Some(body.clone()),
                    initial_state: state as i32,
                    ..Default::default()
                })
                .await;
            let meta = assert_error(r, Code::FailedPrecondition, reason);
            assert_eq!(meta["id"], "", "{reason} {meta:?}");
        }
    }
    assert_eq!(store_revision(&mut c).await, before, "no row, no event");
    let total = c
        .count_connections(pb::CountConnectionsRequest {
            show_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total;
    assert_eq!(total, 0);
    // The identity is free: the same create succeeds once it can be verified.
    let open = OpenPort::new().await;
    let made = create_in(
        &mut c,
        pb::Connection {
            url: open.url(),
            ..conn("tcp", "")
        },
        S::Connected,
        false,
    )
    .await;
    assert_eq!(made.state, S::Connected as i32);
}

#[tokio::test]
async fn a_failed_connect_from_registered_follows_the_system_column() {
    let app = App::start().await;
    let mut c = app.client.clone();

    // Unreachable: NOT_FOUND (SYSTEM).
    let closed = ClosedPort::new();
    let x = create_in(&mut c, conn("tcp", &closed.url()), S::Registered, true).await;
    let meta = assert_error(
        transition(&mut c, &x.id, S::Connected).await,
        Code::FailedPrecondition,
        "CONNECTION_UNREACHABLE",
    );
    assert_eq!(meta["state"], "NOT_FOUND");
    let x = get(&mut c, &x.id).await;
    assert_eq!(
        (x.state, x.state_trigger),
        (S::NotFound as i32, pb::Trigger::System as i32)
    );
    assert_eq!(
        events_of(&mut c, &x.id).await.last().unwrap().actor,
        "tether"
    );

    // Credentials rejected: DISCONNECTED (SYSTEM).
    let denied = HttpStub::new(401).await;
    let y = create_in(&mut c, conn("http", &denied.url()), S::Registered, true).await;
    let meta = assert_error(
        transition(&mut c, &y.id, S::Connected).await,
        Code::FailedPrecondition,
        "CREDENTIALS_REJECTED",
    );
    assert_eq!(meta["state"], "DISCONNECTED");
    let y = get(&mut c, &y.id).await;
    assert_eq!(
        (y.state, y.state_trigger),
        (S::Disconnected as i32, pb::Trigger::System as i32)
    );
}

#[tokio::test]
async fn http_checks_read_the_status_code() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let ok = HttpStub::new(200).await;
    let redirect = HttpStub::new(302).await;
    let denied = HttpStub::new(401).await;
    let forbidden = HttpStub::new(403).await;
    let broken = HttpStub::new(503).await;

    for stub in [&ok, &redirect] {
        let x = create_in(&mut c, conn("http", &stub.url()), S::Connected, false).await;
        assert_eq!(x.state, S::Connected as i32);
        let steps: Vec<i32> = events_of(&mut c, &x.id)
            .await
            .iter()
            .map(|e| e.to_state)
            .collect();
        assert_eq!(
            steps,
            [
                S::Discovered as i32,
                S::Registered as i32,
                S::Connected as i32
            ],
            "one event per step"
        );
    }
    for stub in [&denied, &forbidden] {
        let x = create(&mut c, conn("http", &stub.url())).await;
        let meta = assert_error(
            transition(&mut c, &x.id, S::Registered).await,
            Code::FailedPrecondition,
            "CREDENTIALS_REJECTED",
        );
        assert_eq!(meta["state"], "DISCONNECTED");
        let x = get(&mut c, &x.id).await;
        assert_eq!(
            (x.state, x.state_trigger),
            (S::Disconnected as i32, pb::Trigger::System as i32)
        );
    }
    let x = create(&mut c, conn("http", &broken.url())).await;
    let meta = assert_error(
        transition(&mut c, &x.id, S::Registered).await,
        Code::FailedPrecondition,
        "CONNECTION_UNREACHABLE",
    );
    assert!(meta["detail"].contains("503"), "{meta:?}");
}

#[tokio::test]
async fn a_change_during_verification_wins_over_the_verification() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let mut gate = GatedHttp::new().await;
    let x = create_in(&mut c, conn("http", &gate.url()), S::Registered, true).await;
    let slow = {
        let mut c = c.clone();
        let id = x.id.clone();
        tokio::spawn(async move { transition(&mut c, &id, S::Connected).await })
    };
    // While the check is under way, a user puts it in maintenance; then the
    // check succeeds.
    gate.request_arrived().await;
    let m = transition(&mut c, &x.id, S::Maintenance).await.unwrap();
    gate.answer().await;
    assert_error(
        slow.await.unwrap(),
        Code::Aborted,
        "CONCURRENT_MODIFICATION",
    );
    assert_eq!(
        get(&mut c, &x.id).await,
        m,
        "the older request did not overwrite the newer state"
    );
}

#[tokio::test]
async fn an_unrelated_change_during_verification_does_not_abort_it() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let mut gate = GatedHttp::new().await;
    let x = create_in(&mut c, conn("http", &gate.url()), S::Registered, true).await;
    let slow = {
        let mut c = c.clone();
        let id = x.id.clone();
        tokio::spawn(async move { transition(&mut c, &id, S::Connected).await })
    };
    gate.request_arrived().await;
    c.update_connection(pb::UpdateConnectionRequest {
        connection: Some(pb::Connection {
            id: x.id.clone(),
            labels: [("team".to_string(), "infra".to_string())].into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    gate.answer().await;
    let done = slow
        .await
        .unwrap()
        .expect("a label change does not make the check stale");
    assert_eq!(
        (done.state, done.labels["team"].as_str()),
        (S::Connected as i32, "infra")
    );
}

#[tokio::test]
async fn describe_lifecycle_returns_the_table() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let table = c
        .describe_lifecycle(pb::DescribeLifecycleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(table.states.len(), 8);
    for row in &table.states {
        let from = S::try_from(row.state).unwrap();
        let user: Vec<S> = row
            .user_targets
            .iter()
            .map(|n| S::try_from(*n).unwrap())
            .collect();
        assert_eq!(user, user_targets(from), "{}", name(from));
        assert_eq!(row.terminal, from == S::Deleted);
        let verified: BTreeSet<i32> = row.verified_targets.iter().copied().collect();
        let expected: BTreeSet<i32> = user
            .iter()
            .filter(|s| matches!(s, S::Registered | S::Connected))
            .map(|s| *s as i32)
            .collect();
        assert_eq!(verified, expected, "{}", name(from));
    }
    let discovered = &table.states[0];
    assert_eq!(
        discovered.system_targets,
        [
            S::Registered as i32,
            S::NotFound as i32,
            S::Disconnected as i32
        ]
    );
}

#[tokio::test]
async fn managed_can_be_changed_with_and_without_a_mask() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let made = create(&mut c, conn("tcp", "")).await;
    assert_eq!(made.managed, Some(true));
    let update = |managed: bool, mask: Option<Vec<&str>>| pb::UpdateConnectionRequest {
        connection: Some(pb::Connection {
            id: made.id.clone(),
            managed: Some(managed),
            ..Default::default()
        }),
        update_mask: mask.map(|p| prost_types::FieldMask {
            paths: p.into_iter().map(String::from).collect(),
        }),
        ..Default::default()
    };
    let off = c
        .update_connection(update(false, Some(vec!["managed"])))
        .await
        .expect("managed is updatable with a mask")
        .into_inner();
    assert_eq!(off.managed, Some(false));
    assert_eq!(get(&mut c, &made.id).await.managed, Some(false));
    let on = c
        .update_connection(update(true, None))
        .await
        .expect("managed is updatable without a mask")
        .into_inner();
    assert_eq!(on.managed, Some(true));
    let reasons: Vec<String> = events_of(&mut c, &made.id)
        .await
        .into_iter()
        .map(|e| e.reason)
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| *r == "updated managed").count(),
        2,
        "{reasons:?}"
    );
}
