//! ReportDiscovered: identity is the key, a report is idempotent, IGNORED is
//! never revived, NOT_FOUND comes back, a deleted identity is new again,
//! malformed items fail alone, and large reports work.

use crate::common::*;
use std::collections::HashSet;
use tether::pb::tether::v1 as pb;
use tonic::Code;

use pb::DiscoveryOutcome as O;

const SOURCE: &str = "agent-7";

/// What an agent reports: kind and url, identity derived by the server.
fn found(kind: &str, url: &str) -> pb::Connection {
    pb::Connection {
        kind: kind.into(),
        url: url.into(),
        ..Default::default()
    }
}

async fn report(
    c: &mut Client,
    source: &str,
    items: Vec<pb::Connection>,
) -> Result<Vec<pb::DiscoveryResult>, tonic::Status> {
    c.report_discovered(pb::ReportDiscoveredRequest {
        source: source.into(),
        connections: items,
    })
    .await
    .map(|r| r.into_inner().results)
}

async fn report_ok(c: &mut Client, items: Vec<pb::Connection>) -> Vec<pb::DiscoveryResult> {
    let n = items.len();
    let results = report(c, SOURCE, items).await.expect("report");
    assert_eq!(results.len(), n, "one result per item");
    results
}

fn outcomes(results: &[pb::DiscoveryResult]) -> Vec<O> {
    results.iter().map(|r| r.outcome()).collect()
}

fn connection(r: &pb::DiscoveryResult) -> &pb::Connection {
    r.connection.as_ref().expect("a connection")
}

fn ids(results: &[pb::DiscoveryResult]) -> Vec<String> {
    results.iter().map(|r| connection(r).id.clone()).collect()
}

async fn total(c: &mut Client, show_deleted: bool) -> i64 {
    c.count_connections(pb::CountConnectionsRequest {
        show_deleted,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .total
}

fn three() -> Vec<pb::Connection> {
    vec![
        found("prometheus", "http://prom.example:9090/"),
        found("grafana", "http://grafana.example:3000/"),
        found("tcp", "tcp://db.example:5432"),
    ]
}

#[tokio::test]
async fn a_first_report_creates_discovered_connections_on_behalf_of_the_source() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let results = report_ok(&mut c, three()).await;
    assert_eq!(outcomes(&results), [O::Created; 3]);
    for (r, item) in results.iter().zip(three()) {
        let made = connection(r);
        assert_eq!(r.reason, "");
        assert_eq!(
            (made.kind.as_str(), made.url.as_str()),
            (item.kind.as_str(), item.url.as_str())
        );
        assert_eq!(made.identity, format!("{}:{}", item.kind, item.url));
        assert_eq!(made.state, S::Discovered as i32);
        assert_eq!(made.state_trigger, pb::Trigger::System as i32);
        assert!(made.state_reason.contains(SOURCE), "{}", made.state_reason);
        assert_eq!(get(&mut c, &made.id).await, *made, "what was stored");
        let events = events_of(&mut c, &made.id).await;
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(
            (e.r#type(), e.to_state(), e.trigger(), e.actor.as_str()),
            (
                pb::EventType::Created,
                S::Discovered,
                pb::Trigger::System,
                // The authenticated caller acts; the source it names is in the reason.
                "anonymous"
            )
        );
        assert!(e.reason.contains(SOURCE), "{}", e.reason);
    }
    let unique: HashSet<String> = ids(&results).into_iter().collect();
    assert_eq!(unique.len(), 3);
    assert_eq!(total(&mut c, false).await, 3);
    // Type and sub-type come from each kind's definition.
    assert_eq!(
        (
            connection(&results[0]).r#type.as_str(),
            connection(&results[0]).sub_type.as_str()
        ),
        ("telemetry", "metrics")
    );
}

#[tokio::test]
async fn urls_differing_by_an_empty_query_a_fragment_or_a_trailing_slash_are_one_identity() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let first = report_ok(
        &mut c,
        vec![found("prometheus", "http://127.0.0.1:9090/api")],
    )
    .await;
    assert_eq!(outcomes(&first), [O::Created]);
    let revision = store_revision(&mut c).await;
    let again = [
        "http://127.0.0.1:9090/api/",
        "http://127.0.0.1:9090/api?",
        "http://127.0.0.1:9090/api#graph",
        "http://127.0.0.1:9090/api/?#",
    ];
    for url in again {
        let r = report_ok(&mut c, vec![found("prometheus", url)]).await;
        assert_eq!(outcomes(&r), [O::Unchanged], "{url}");
        assert_eq!(connection(&r[0]).id, connection(&first[0]).id, "{url}");
    }
    // A tcp url with and without a trailing slash, the same way.
    let tcp = report_ok(&mut c, vec![found("tcp", "tcp://127.0.0.1:5432")]).await;
    let r = report_ok(&mut c, vec![found("tcp", "tcp://127.0.0.1:5432/")]).await;
    assert_eq!(outcomes(&r), [O::Unchanged]);
    assert_eq!(connection(&r[0]).id, connection(&tcp[0]).id);
    assert_eq!(
        store_revision(&mut c).await,
        revision + 1,
        "only the tcp one was new"
    );
    assert_eq!(total(&mut c, true).await, 2, "no duplicates");
}

#[tokio::test]
async fn the_same_report_twice_changes_nothing() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let first = report_ok(&mut c, three()).await;
    let revision = store_revision(&mut c).await;

    // Reported again, even with a different name and case in the url.
    let mut again = three();
    again[0].name = "renamed by the agent".into();
    again[1].url = "HTTP://Grafana.Example:3000/".into();
    let second = report_ok(&mut c, again).await;
    assert_eq!(outcomes(&second), [O::Unchanged; 3]);
    assert_eq!(ids(&second), ids(&first));
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(connection(a), connection(b), "left as it is");
    }
    assert_eq!(store_revision(&mut c).await, revision, "no new events");
    assert_eq!(total(&mut c, true).await, 3, "no duplicates");

    // A connection a user made is the same identity as one an agent reports.
    let by_hand = create_in(
        &mut c,
        pb::Connection {
            kind: "http".into(),
            url: "http://svc.example/health".into(),
            ..Default::default()
        },
        S::Registered,
        true,
    )
    .await;
    let revision = store_revision(&mut c).await;
    let r = report_ok(&mut c, vec![found("http", "http://svc.example/health")]).await;
    assert_eq!(outcomes(&r), [O::Unchanged]);
    assert_eq!(connection(&r[0]).id, by_hand.id);
    assert_eq!(connection(&r[0]).state, S::Registered as i32);
    assert_eq!(store_revision(&mut c).await, revision);
}

#[tokio::test]
async fn duplicates_within_one_report_make_one_connection() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let r = report_ok(
        &mut c,
        vec![
            found("prometheus", "http://prom.example:9090/"),
            found("prometheus", "http://PROM.example:9090/"),
            pb::Connection {
                identity: "cluster-uid-1".into(),
                ..found("kubernetes", "https://a.example:6443/")
            },
            pb::Connection {
                identity: "cluster-uid-1".into(),
                ..found("kubernetes", "https://b.example:6443/")
            },
        ],
    )
    .await;
    assert_eq!(
        outcomes(&r),
        [O::Created, O::Unchanged, O::Created, O::Unchanged]
    );
    let ids = ids(&r);
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[2], ids[3]);
    assert_ne!(ids[0], ids[2]);
    assert_eq!(
        connection(&r[3]).url,
        "https://a.example:6443/",
        "the first wins"
    );
    assert_eq!(total(&mut c, true).await, 2);
}

#[tokio::test]
async fn an_ignored_connection_stays_ignored() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let item = found("grafana", "http://grafana.example:3000/");
    let made = report_ok(&mut c, vec![item.clone()]).await;
    let id = connection(&made[0]).id.clone();
    transition(&mut c, &id, S::Ignored).await.unwrap();
    let revision = store_revision(&mut c).await;

    for _ in 0..2 {
        let r = report_ok(&mut c, vec![item.clone()]).await;
        assert_eq!(outcomes(&r), [O::SuppressedIgnored]);
        assert_eq!(connection(&r[0]).id, id);
        assert_eq!(connection(&r[0]).state, S::Ignored as i32);
    }
    let now = get(&mut c, &id).await;
    assert_eq!(
        (now.state, now.state_trigger),
        (S::Ignored as i32, pb::Trigger::User as i32)
    );
    assert_eq!(store_revision(&mut c).await, revision, "no events");
    assert_eq!(total(&mut c, true).await, 1);
}

#[tokio::test]
async fn a_not_found_connection_is_rediscovered() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let closed = ClosedPort::new();
    let item = found("tcp", &closed.url());
    let made = report_ok(&mut c, vec![item.clone()]).await;
    let id = connection(&made[0]).id.clone();

    // A register attempt that cannot reach it: SYSTEM moves it to NOT_FOUND.
    let r = transition(&mut c, &id, S::Registered).await;
    let meta = assert_error(r, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");
    assert_eq!(meta["state"], "NOT_FOUND");
    assert_eq!(get(&mut c, &id).await.state, S::NotFound as i32);
    let revision = store_revision(&mut c).await;

    let r = report_ok(&mut c, vec![item.clone()]).await;
    assert_eq!(outcomes(&r), [O::Rediscovered]);
    let back = connection(&r[0]);
    assert_eq!(back.id, id, "the same connection, not a new one");
    assert_eq!(
        (back.state, back.state_trigger),
        (S::Discovered as i32, pb::Trigger::System as i32)
    );
    assert_eq!(get(&mut c, &id).await, *back);
    let events = events_of(&mut c, &id).await;
    let last = events.last().unwrap();
    assert!(last.revision > revision);
    assert_eq!(
        (
            last.r#type(),
            last.from_state(),
            last.to_state(),
            last.trigger(),
            last.actor.as_str()
        ),
        (
            pb::EventType::Transitioned,
            S::NotFound,
            S::Discovered,
            pb::Trigger::System,
            "anonymous"
        )
    );
    assert!(last.reason.contains(SOURCE), "{}", last.reason);
    assert_eq!(store_revision(&mut c).await, revision + 1, "one event");

    // And then it is simply known.
    let r = report_ok(&mut c, vec![item]).await;
    assert_eq!(outcomes(&r), [O::Unchanged]);
    assert_eq!(total(&mut c, true).await, 1);
}

#[tokio::test]
async fn a_deleted_identity_reported_again_is_a_new_connection() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let item = found("prometheus", "http://prom.example:9090/");
    let first = report_ok(&mut c, vec![item.clone()]).await;
    let old = connection(&first[0]).clone();
    c.delete_connection(pb::DeleteConnectionRequest {
        id: old.id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    let again = report_ok(&mut c, vec![item.clone()]).await;
    assert_eq!(outcomes(&again), [O::Created]);
    let new = connection(&again[0]);
    assert_ne!(new.id, old.id);
    assert_eq!(new.identity, old.identity);
    assert_eq!(new.state, S::Discovered as i32);
    assert_eq!(get(&mut c, &old.id).await.state, S::Deleted as i32);

    let third = report_ok(&mut c, vec![item]).await;
    assert_eq!(outcomes(&third), [O::Unchanged]);
    assert_eq!(connection(&third[0]).id, new.id);
    assert_eq!(
        total(&mut c, true).await,
        2,
        "the tombstone and the new one"
    );
}

#[tokio::test]
async fn malformed_items_are_rejected_alone() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let missing_credential = uuid::Uuid::new_v4().to_string();
    let items = vec![
        found("prometheus", "http://ok-1.example/"),
        found("Bad Kind", "http://x.example/"),
        found("http", "not a url"),
        found("no-such-kind", "http://y.example/"),
        pb::Connection {
            metadata: Some(json_struct(serde_json::json!({"org_id": "first"}))),
            ..found("grafana", "http://z.example/")
        },
        pb::Connection {
            credential_id: missing_credential.clone(),
            ..found("http", "http://w.example/")
        },
        found("tcp", "tcp://ok-2.example:5432"),
    ];
    let r = report_ok(&mut c, items).await;
    assert_eq!(
        outcomes(&r),
        [
            O::Created,
            O::Rejected,
            O::Rejected,
            O::Rejected,
            O::Rejected,
            O::Rejected,
            O::Created
        ]
    );
    let reasons: Vec<&str> = r.iter().map(|r| r.reason.as_str()).collect();
    for (i, needle) in [
        (1, "kind"),
        (2, "url"),
        (3, "no-such-kind"),
        (4, "org_id"),
        (5, missing_credential.as_str()),
    ] {
        assert!(reasons[i].contains(needle), "item {i}: {:?}", reasons[i]);
        assert!(r[i].connection.is_none(), "item {i} has no connection");
    }
    assert_eq!((reasons[0], reasons[6]), ("", ""));
    assert_eq!(total(&mut c, true).await, 2, "only the good ones");

    // With unknown kinds allowed, the unknown one is accepted.
    let lax = App::start_with(|cfg| cfg.allow_unknown_kinds = true).await;
    let mut c = lax.client.clone();
    let r = report_ok(&mut c, vec![found("no-such-kind", "http://y.example/")]).await;
    assert_eq!(outcomes(&r), [O::Created]);
}

#[tokio::test]
async fn a_report_needs_a_source_and_respects_the_size_limit() {
    let app = App::start_with(|cfg| cfg.max_discovery_report = 3).await;
    let mut c = app.client.clone();
    let r = report(&mut c, "", three()).await;
    assert_eq!(invalid_field(r), "source");
    let mut four = three();
    four.push(found("http", "http://fourth.example/"));
    let r = report(&mut c, SOURCE, four).await;
    assert_eq!(invalid_field(r), "connections");
    assert_eq!(total(&mut c, true).await, 0, "nothing applied");
    // Within the limit it works, and an empty report is harmless.
    assert_eq!(report_ok(&mut c, three()).await.len(), 3);
    assert!(report_ok(&mut c, vec![]).await.is_empty());
}

#[tokio::test]
async fn a_report_of_three_thousand_connections_applies_in_one_call() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let items: Vec<pb::Connection> = (0..3000)
        .map(|i| found("prometheus", &format!("http://node-{i}.example:9090/")))
        .collect();
    let first = report_ok(&mut c, items.clone()).await;
    assert!(
        first.iter().all(|r| r.outcome() == O::Created),
        "all created"
    );
    let made = ids(&first);
    assert_eq!(made.iter().collect::<HashSet<_>>().len(), 3000);
    for (r, item) in first.iter().zip(&items) {
        assert_eq!(connection(r).url, item.url, "results in report order");
    }
    assert_eq!(total(&mut c, true).await, 3000);
    let revision = store_revision(&mut c).await;

    let second = report_ok(&mut c, items).await;
    assert!(
        second.iter().all(|r| r.outcome() == O::Unchanged),
        "all unchanged"
    );
    assert_eq!(ids(&second), made);
    assert_eq!(store_revision(&mut c).await, revision);
    assert_eq!(total(&mut c, true).await, 3000);
}

/// Expected to fail until fixed: an item with neither identity nor url gets an
/// identity derived from its fresh id, so every report of it makes another
/// connection. Without a key a report cannot be idempotent: it must be refused.
#[tokio::test]
async fn an_item_without_identity_or_url_is_rejected_not_duplicated() {
    let app = App::start().await;
    let mut c = app.client.clone();
    for _ in 0..2 {
        let r = report_ok(
            &mut c,
            vec![
                found("kubernetes", ""),
                found("tcp", "tcp://db.example:5432"),
            ],
        )
        .await;
        assert_eq!(outcomes(&r)[0], O::Rejected, "{:?}", r[0]);
        assert!(r[0].reason.contains("identity"), "{:?}", r[0].reason);
        assert!(r[0].connection.is_none());
    }
    assert_eq!(total(&mut c, true).await, 1, "only the tcp one, once");
}

#[tokio::test]
async fn a_rediscovered_connection_takes_the_url_it_was_found_at() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let closed = ClosedPort::new();
    let open = OpenPort::new().await;
    let at = |url: &str| pb::Connection {
        identity: "cluster-uid-42".into(),
        ..found("tcp", url)
    };
    let made = report_ok(&mut c, vec![at(&closed.url())]).await;
    let id = connection(&made[0]).id.clone();
    let r = transition(&mut c, &id, S::Registered).await;
    assert_error(r, Code::FailedPrecondition, "CONNECTION_UNREACHABLE");

    // Found again, at another address: that is where it is checked now.
    let r = report_ok(&mut c, vec![at(&open.url())]).await;
    assert_eq!(outcomes(&r), [O::Rediscovered]);
    let back = connection(&r[0]);
    assert_eq!(
        (back.id.as_str(), back.url.as_str()),
        (id.as_str(), open.url().as_str())
    );
    let steps: Vec<(i32, i32)> = events_of(&mut c, &id)
        .await
        .iter()
        .rev()
        .take(2)
        .map(|e| (e.r#type, e.to_state))
        .collect();
    assert_eq!(
        steps,
        [
            (pb::EventType::Transitioned as i32, S::Discovered as i32),
            (pb::EventType::Updated as i32, S::NotFound as i32),
        ]
    );
    let registered = transition(&mut c, &id, S::Registered)
        .await
        .expect("reachable where it was found");
    assert_eq!(registered.state, S::Registered as i32);
}

/// Every connection a list with these filters returns, page after page.
async fn list_all(c: &mut Client, mut req: pb::ListConnectionsRequest) -> Vec<pb::Connection> {
    let mut all = Vec::new();
    req.page_size = 7;
    loop {
        let page = c.list_connections(req.clone()).await.unwrap().into_inner();
        all.extend(page.connections);
        if page.next_page_token.is_empty() {
            return all;
        }
        req.page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn counts_and_filtered_pages_follow_discovery_and_every_later_change() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let items: Vec<pb::Connection> = (0..60)
        .map(|i| {
            let kind = ["tcp", "http", "tcp", "grpc"][i % 4];
            let mut item = found(kind, &format!("{kind}://host-{i}.example:{}", 1000 + i));
            item.labels = [
                ("env".to_string(), "bench".to_string()),
                ("shard".to_string(), format!("s{}", i % 3)),
            ]
            .into();
            item
        })
        .collect();
    let results = report_ok(&mut c, items.clone()).await;
    assert_eq!(outcomes(&results), [O::Created; 60]);
    let ids = ids(&results);
    // Reported again: unchanged, counted once.
    assert_eq!(
        outcomes(&report_ok(&mut c, items[..5].to_vec()).await),
        [O::Unchanged; 5]
    );
    for id in ids.iter().step_by(9) {
        moved(&mut c, id, S::Ignored).await;
    }
    for id in ids.iter().skip(1).step_by(10) {
        c.delete_connection(pb::DeleteConnectionRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for id in ids.iter().skip(2).step_by(10) {
        c.update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: id.clone(),
                labels: [("shard".to_string(), "moved".to_string())].into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // An IGNORED one stays so when reported again.
    assert_eq!(
        outcomes(&report_ok(&mut c, vec![items[0].clone()]).await),
        [O::SuppressedIgnored]
    );

    let everything = list_all(
        &mut c,
        pb::ListConnectionsRequest {
            show_deleted: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(everything.len(), 60);
    let label = |k: &str, v: &str| [(k.to_string(), v.to_string())].into();
    let filters = [
        pb::CountConnectionsRequest::default(),
        pb::CountConnectionsRequest {
            show_deleted: true,
            ..Default::default()
        },
        pb::CountConnectionsRequest {
            kinds: vec!["grpc".into()],
            ..Default::default()
        },
        pb::CountConnectionsRequest {
            states: vec![S::Ignored as i32],
            ..Default::default()
        },
        pb::CountConnectionsRequest {
            labels: label("shard", "s1"),
            ..Default::default()
        },
        pb::CountConnectionsRequest {
            labels: label("shard", "moved"),
            kinds: vec!["tcp".into(), "http".into()],
            show_deleted: true,
            ..Default::default()
        },
        pb::CountConnectionsRequest {
            labels: [
                ("env".to_string(), "bench".to_string()),
                ("shard".to_string(), "s0".to_string()),
            ]
            .into(),
            ..Default::default()
        },
    ];
    let mut seen_nonzero = 0;
    for f in filters {
        let counts = c.count_connections(f.clone()).await.unwrap().into_inner();
        let deleted = f.show_deleted || f.states.contains(&(S::Deleted as i32));
        let matching: Vec<&pb::Connection> = everything
            .iter()
            .filter(|x| f.kinds.is_empty() || f.kinds.contains(&x.kind))
            .filter(|x| f.states.is_empty() || f.states.contains(&x.state))
            .filter(|x| deleted || x.state != S::Deleted as i32)
            .filter(|x| f.labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
            .collect();
        assert_eq!(counts.total, matching.len() as i64, "{f:?}");
        for sc in &counts.counts {
            let n = matching.iter().filter(|x| x.state == sc.state).count();
            assert_eq!(sc.count, n as i64, "{f:?}, state {}", sc.state);
        }
        seen_nonzero += usize::from(counts.total > 0);

        // A list with the same filter, in both directions, finds the same
        // connections in creation order.
        for order_by in ["", "create_time desc"] {
            let listed = list_all(
                &mut c,
                pb::ListConnectionsRequest {
                    kinds: f.kinds.clone(),
                    states: f.states.clone(),
                    labels: f.labels.clone(),
                    show_deleted: f.show_deleted,
                    order_by: order_by.into(),
                    ..Default::default()
                },
            )
            .await;
            let mut expected: Vec<&str> = matching.iter().map(|x| x.id.as_str()).collect();
            if !order_by.is_empty() {
                expected.reverse();
            }
            let got: Vec<&str> = listed.iter().map(|x| x.id.as_str()).collect();
            assert_eq!(got, expected, "{f:?} {order_by}");
        }
    }
    assert_eq!(seen_nonzero, 7, "every filter matches something");
}

/// Connections made together (one report, or creates in one commit group)
/// each get a create_time of their own, later than every earlier one, so
/// creation order is create_time order and pages in it never tie.
#[tokio::test]
async fn connections_made_together_get_create_times_of_their_own_in_creation_order() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let items: Vec<pb::Connection> = (0..50)
        .map(|i| found("tcp", &format!("tcp://made-{i}.example:{}", 2000 + i)))
        .collect();
    let reported = ids(&report_ok(&mut c, items).await);
    let creates = (0..40).map(|i| {
        let mut c = app.client.clone();
        async move { create(&mut c, conn("tcp", &format!("tcp://one-{i}.example:1"))).await }
    });
    let created = futures::future::join_all(creates).await;

    let listed = list_all(&mut c, pb::ListConnectionsRequest::default()).await;
    assert_eq!(listed.len(), 90);
    let times: Vec<(i64, i32)> = listed
        .iter()
        .map(|x| {
            let t = x.create_time.unwrap();
            (t.seconds, t.nanos)
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    // The report's connections come first, in the order it listed them.
    let first: Vec<&str> = listed[..50].iter().map(|x| x.id.as_str()).collect();
    assert_eq!(
        first,
        reported.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let rest: HashSet<&str> = listed[50..].iter().map(|x| x.id.as_str()).collect();
    assert_eq!(rest, created.iter().map(|x| x.id.as_str()).collect());
    // Each create answered with the create_time it is listed with.
    for made in &created {
        let row = listed.iter().find(|x| x.id == made.id).unwrap();
        assert_eq!(row.create_time, made.create_time);
        assert_eq!(row.update_time, made.create_time);
    }
    // Newest first is the same order reversed.
    let mut newest_first = list_all(
        &mut c,
        pb::ListConnectionsRequest {
            order_by: "create_time desc".into(),
            ..Default::default()
        },
    )
    .await;
    newest_first.reverse();
    assert_eq!(newest_first, listed);
}
