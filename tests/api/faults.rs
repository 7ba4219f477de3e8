//! Requests the server must answer truthfully even when they are odd or it
//! is busy: a field named twice in an update mask, pruned history asked
//! for, a full write queue, and values too large to echo back.

use crate::common::*;
use std::time::Duration;
use tether::pb::tether::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test]
async fn an_update_mask_naming_a_field_twice_is_refused_and_changes_nothing() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let made = create(
        &mut c,
        pb::Connection {
            labels: [("env".to_string(), "dev".to_string())].into(),
            description: "kept".into(),
            ..conn("http", "")
        },
    )
    .await;
    for paths in [
        vec!["labels", "labels"],
        vec!["*", "description"],
        vec!["credential_id", "name", "credential_id"],
    ] {
        let r = c
            .update_connection(pb::UpdateConnectionRequest {
                connection: Some(pb::Connection {
                    id: made.id.clone(),
                    name: "renamed".into(),
                    labels: [("env".to_string(), "prod".to_string())].into(),
                    description: "changed".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                }),
                ..Default::default()
            })
            .await;
        let meta = assert_error(r, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert_eq!(meta["field"], "update_mask", "{paths:?}");
    }
    assert_eq!(get(&mut c, &made.id).await, made, "nothing changed");
}

#[tokio::test]
async fn history_asked_for_from_below_what_is_kept_is_out_of_range() {
    let app = App::start_with(|cfg| cfg.event_retention_count = 3).await;
    let mut c = app.client.clone();
    let x = create(&mut c, conn("http", "")).await;
    for s in [S::Ignored, S::Registered, S::Maintenance, S::Ignored] {
        moved(&mut c, &x.id, s).await;
    }
    let events = |after| pb::ListConnectionEventsRequest {
        after_revision: after,
        ..Default::default()
    };
    let page = c
        .list_connection_events(events(0))
        .await
        .expect("0 asks for what is kept")
        .into_inner();
    let compact = page.compact_revision;
    assert!(compact > 1, "history was pruned: {page:?}");
    let r = c.list_connection_events(events(compact - 1)).await;
    let meta = assert_error(r, Code::OutOfRange, "REVISION_COMPACTED");
    assert_eq!(meta["compact_revision"], compact.to_string());
    let r = c
        .list_connection_events(pb::ListConnectionEventsRequest {
            connection_id: x.id.clone(),
            after_revision: 1,
            ..Default::default()
        })
        .await;
    assert_error(r, Code::OutOfRange, "REVISION_COMPACTED");
    c.list_connection_events(events(compact))
        .await
        .expect("from the compact revision on, everything is there");
    let r = c.list_connection_events(events(page.revision + 1)).await;
    assert_error(r, Code::OutOfRange, "REVISION_IN_FUTURE");
}

#[tokio::test]
async fn a_full_write_queue_says_when_to_retry() {
    // One change per group, one waiting: with the writer held by a lock,
    // the third concurrent change finds no room.
    let app = App::start_with(|cfg| {
        cfg.commit_group = 1;
        cfg.write_queue = 1;
        cfg.busy_timeout = Duration::from_secs(30);
    })
    .await;
    // A first change: the server is up and its start-up writes are done.
    create(&mut app.client.clone(), conn("http", "")).await;
    let locker = rusqlite::Connection::open(app.db_path()).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let mut c = app.client.clone();
        calls.spawn(async move {
            c.create_connection(pb::CreateConnectionRequest {
                connection: Some(conn("http", "")),
                ..Default::default()
            })
            .await
        });
    }
    // The refused one answers at once; the others wait for the lock.
    let first = calls.join_next().await.unwrap().unwrap();
    let status = first.expect_err("no room in the queue");
    let (code, reason, _) = error_info(&status);
    assert_eq!((code, reason.as_str()), (Code::Unavailable, "UNAVAILABLE"));
    let retry = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo with a delay");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1));
    locker.execute_batch("ROLLBACK").unwrap();
    // If the writer had not yet taken the first change, a second found no
    // room either; whatever was queued commits once the lock is gone.
    let mut committed = 0;
    while let Some(done) = calls.join_next().await {
        match done.unwrap() {
            Ok(_) => committed += 1,
            Err(s) => assert!(s.get_details_retry_info().is_some(), "{s:?}"),
        }
    }
    assert!(committed >= 1, "a queued change committed");
}

#[tokio::test]
async fn huge_values_are_not_echoed_whole_in_errors() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let huge = "x".repeat(10 * 1024);
    let r = c
        .get_connection(pb::GetConnectionRequest { id: huge.clone() })
        .await;
    let status = r.expect_err("not a uuid");
    let (code, reason, meta) = error_info(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::InvalidArgument, "INVALID_ARGUMENT")
    );
    assert!(status.message().len() <= 1100, "{}", status.message().len());
    assert!(meta.values().all(|v| v.len() <= 300));
    let r = c
        .list_connections(pb::ListConnectionsRequest {
            order_by: huge,
            ..Default::default()
        })
        .await;
    assert_error(r, Code::InvalidArgument, "INVALID_ARGUMENT");
}

fn stored_answers(db: &std::path::Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn no_op_requests_store_no_answer_and_stored_answers_are_capped() {
    let app = App::start_with(|cfg| {
        cfg.max_stored_answers = 3;
        cfg.prune_interval = Duration::from_millis(50);
    })
    .await;
    let mut c = app.client.clone();
    let x = create(&mut c, conn("http", "")).await;
    let request = |target: S, id: String| pb::TransitionConnectionRequest {
        id: x.id.clone(),
        target_state: target as i32,
        skip_verification: true,
        request_id: id,
        ..Default::default()
    };
    // Asking for the state it is in, with fresh ids: nothing is stored.
    for i in 0..20 {
        c.transition_connection(request(S::Discovered, format!("noop-{i}")))
            .await
            .unwrap();
    }
    assert_eq!(stored_answers(&app.db_path()), 0);
    // Real moves are remembered, but only the newest few are kept.
    let mut last = None;
    for i in 0..10 {
        let target = if i % 2 == 0 {
            S::Ignored
        } else {
            S::Registered
        };
        last = Some(
            c.transition_connection(request(target, format!("move-{i}")))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let last = last.unwrap();
    // Pruning runs in the background every 50 ms: wait for it (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stored_answers(&app.db_path()) > 3 {
        assert!(tokio::time::Instant::now() < deadline, "never pruned to 3");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The newest still answers a retry with its first answer, even after
    // the connection has moved on.
    moved(&mut c, &x.id, S::Ignored).await;
    let again = c
        .transition_connection(request(S::Registered, "move-9".into()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, last);
    assert_eq!(get(&mut c, &x.id).await.state, S::Ignored as i32);
    app.stop().await.unwrap();
}
