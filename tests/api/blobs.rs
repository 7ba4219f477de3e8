//! Large metadata is stored once, not copied into every event and stored
//! answer, and every read puts it back: history, watch replay and retried
//! requests answer exactly as before. A deletion takes it away everywhere.

use crate::common::*;
use std::time::Duration;
use tether::pb::tether::v1 as pb;

/// About 60 KiB of metadata, near the 64 KiB limit.
fn big_metadata() -> prost_types::Struct {
    let filler: String = (0..60 * 1024)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    json_struct(serde_json::json!({ "filler": filler, "nested": {"n": 1.5, "list": [1, "two"]} }))
}

/// The bytes of the database's pages in use, read from the file as it is now.
fn used_bytes(db: &std::path::Path) -> u64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the database read-only");
    c.query_row(
        "SELECT ((SELECT page_count FROM pragma_page_count()) \
                 - (SELECT freelist_count FROM pragma_freelist_count())) \
                * (SELECT page_size FROM pragma_page_size())",
        [],
        |r| r.get(0),
    )
    .expect("page counts")
}

fn transition_request(id: &str, target: S, n: usize) -> pb::TransitionConnectionRequest {
    pb::TransitionConnectionRequest {
        id: id.into(),
        target_state: target as i32,
        skip_verification: true,
        request_id: format!("move-{n}"),
        ..Default::default()
    }
}

#[tokio::test]
async fn large_metadata_is_stored_once_and_read_back_everywhere() {
    const N: usize = 40;
    let app = App::start().await;
    let mut c = app.client.clone();
    let meta = big_metadata();
    // Something before it, so its history can be replayed from a revision.
    let first = create(&mut c, conn("tcp", "")).await;
    let x = create_in(
        &mut c,
        pb::Connection {
            metadata: Some(meta.clone()),
            managed: Some(false),
            ..conn("tcp", "")
        },
        S::Registered,
        true,
    )
    .await;
    // Created, then moved to REGISTERED.
    let initial = events_of(&mut c, &x.id).await.len();
    let before = used_bytes(&app.db_path());
    // N transitions, each with a request_id, so each also stores an answer.
    for n in 0..N {
        let target = if n % 2 == 0 {
            S::Maintenance
        } else {
            S::Registered
        };
        let moved = c
            .transition_connection(transition_request(&x.id, target, n))
            .await
            .expect("transition")
            .into_inner();
        assert_eq!(moved.metadata, Some(meta.clone()));
    }
    let grown = used_bytes(&app.db_path()) - before;
    // Each change used to copy the metadata twice (event and answer): about
    // 120 KiB a transition. Now each is a row of its own size, well under a page.
    assert!(
        grown < (N as u64) * 4096,
        "{N} transitions grew the database by {grown} bytes, {} a transition",
        grown / N as u64
    );

    // One blob holds it, named by every stored answer and every event but
    // the latest (whose snapshot is the connection's row).
    let refs: Vec<i64> = {
        let file = rusqlite::Connection::open_with_flags(
            app.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut stmt = file.prepare("SELECT refs FROM blobs").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(refs, [(initial + 2 * N - 1) as i64], "events and answers");

    // Every event in the history keeps the metadata: a watch replaying the
    // history from the store sends it with each one (history pages carry
    // no connection).
    let events = events_of(&mut c, &x.id).await;
    assert_eq!(events.len(), initial + N);
    let replayed = replay(&mut c, first.revision, initial + N).await;
    for (e, conn) in events.iter().zip(&replayed) {
        assert_eq!(
            (conn.id.as_str(), conn.revision),
            (x.id.as_str(), e.revision)
        );
        assert_eq!(conn.metadata, Some(meta.clone()), "revision {}", e.revision);
    }
    // And a retried request's stored answer.
    let retried = c
        .transition_connection(transition_request(&x.id, S::Maintenance, 0))
        .await
        .expect("a retry gets its first answer")
        .into_inner();
    assert_eq!(retried.revision, events[initial].revision);
    assert_eq!(retried.metadata, Some(meta.clone()));

    // A deletion takes the metadata out of every event and stored answer.
    c.delete_connection(pb::DeleteConnectionRequest {
        id: x.id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let cleared = Some(json_struct(serde_json::json!({})));
    for conn in replay(&mut c, first.revision, initial + N + 1).await {
        assert_eq!(conn.metadata, cleared, "revision {}", conn.revision);
    }
    let retried = c
        .transition_connection(transition_request(&x.id, S::Maintenance, 0))
        .await
        .expect("a retry still gets its answer")
        .into_inner();
    assert_eq!(retried.metadata, cleared);
    let (dir, db) = (app.dir.clone(), app.db_path());
    app.stop().await.unwrap();

    // Nothing of it is left in the file.
    let file = rusqlite::Connection::open(&db).unwrap();
    let blobs: i64 = file
        .query_row("SELECT count(*) FROM blobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(blobs, 0, "the metadata's blob went with its last reference");
    let filler = format!("%{}%", &meta_filler(&meta)[..64]);
    for (table, column) in [("events", "snapshot"), ("requests", "answer")] {
        let found: i64 = file
            .query_row(
                &format!("SELECT count(*) FROM {table} WHERE {column} LIKE ?1"),
                [&filler],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(found, 0, "{table} still holds the metadata");
    }
    drop(dir);
}

/// The connections of the next `n` changes a watch from `after` replays.
async fn replay(c: &mut Client, after: i64, n: usize) -> Vec<pb::Connection> {
    let mut s = c
        .watch_connections(pb::WatchConnectionsRequest {
            after_revision: after,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("a message within 10 s")
            .expect("no stream error")
            .expect("stream open");
        out.extend(m.connection);
    }
    out
}

fn meta_filler(m: &prost_types::Struct) -> String {
    match &m.fields["filler"].kind {
        Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
        other => panic!("filler is {other:?}"),
    }
}
