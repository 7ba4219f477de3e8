//! What clients see when storage misbehaves: a busy database and a corrupt row.

use crate::common::*;
use std::time::Duration;
use tether::pb::tether::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn a_locked_database_answers_unavailable_and_loses_nothing() {
    let app = App::start_with(|cfg| cfg.busy_timeout = Duration::from_millis(100)).await;
    let mut c = app.client.clone();
    let before = create(&mut c, conn("http", "")).await;

    // Another process holds the write lock.
    let locker = rusqlite::Connection::open(app.db_path()).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let r = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(conn("http", "")),
            ..Default::default()
        })
        .await;
    assert_error(r, Code::Unavailable, "UNAVAILABLE");
    let r = transition(&mut c, &before.id, S::Ignored).await;
    assert_error(r, Code::Unavailable, "UNAVAILABLE");
    // Reads still work while writes wait (WAL).
    assert_eq!(get(&mut c, &before.id).await, before);
    locker.execute_batch("ROLLBACK").unwrap();

    // Nothing half-done was left behind, and the next write gets the next revision.
    let after = create(&mut c, conn("http", "")).await;
    assert_eq!(after.revision, before.revision + 1);
    assert_eq!(get(&mut c, &before.id).await.state, S::Discovered as i32);
    let history = c
        .list_connection_events(pb::ListConnectionEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history
            .events
            .iter()
            .map(|e| e.revision)
            .collect::<Vec<_>>(),
        [1, 2]
    );
}

#[tokio::test]
async fn storage_faults_are_internal_without_sql_text() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let x = create(&mut c, conn("http", "")).await;
    let fine = create(&mut c, conn("http", "")).await;
    // Corrupt one row behind the server's back.
    let db = rusqlite::Connection::open(app.db_path()).unwrap();
    db.execute(
        "UPDATE connections SET metadata = 'not json' WHERE id = ?1",
        [&x.id],
    )
    .unwrap();
    drop(db);
    let status = c
        .get_connection(pb::GetConnectionRequest { id: x.id.clone() })
        .await
        .expect_err("corrupt row");
    let (code, reason, _) = error_info(&status);
    assert_eq!((code, reason.as_str()), (Code::Internal, "INTERNAL"));
    let msg = status.message().to_lowercase();
    assert!(
        !msg.contains("select") && !msg.contains("metadata") && !msg.contains("json"),
        "{msg}"
    );
    // The rest of the service carries on.
    assert_eq!(get(&mut c, &fine.id).await, fine);
}
