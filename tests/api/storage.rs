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
    // Corrupt one row behind the server's back (ids are kept as 16 bytes).
    let db = rusqlite::Connection::open(app.db_path()).unwrap();
    let changed = db
        .execute(
            "UPDATE connections SET metadata = 'not json' WHERE id = unhex(replace(?1, '-', ''))",
            [&x.id],
        )
        .unwrap();
    assert_eq!(changed, 1);
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

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn files_the_server_creates_are_private_to_its_user() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data/tether");
    let app = App::start_in(std::sync::Arc::new(tempfile::tempdir().unwrap()), |cfg| {
        cfg.db = Some(dir.join("tether.db"));
    })
    .await;
    let mut c = app.client.clone();
    create(&mut c, conn("http", "")).await;
    assert_eq!(mode(&dir), 0o700, "the folder");
    assert_eq!(mode(&root.path().join("data")), 0o700, "and its new parent");
    for file in [
        "tether.db",
        "tether.db-wal",
        "tether.db-shm",
        "tether.db.lock",
        "tether.key",
    ] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_file_others_can_read_refuses_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("tether.key");
    std::fs::write(
        &key,
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [3u8; 32]),
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut config = test_config();
    config.db = Some(dir.path().join("tether.db"));
    let err = tether::server::Server::open(config.clone())
        .await
        .err()
        .expect("a group-readable key refuses start");
    assert!(err.to_string().contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server = tether::server::Server::open(config)
        .await
        .expect("a private key is used");
    drop(server);
}

#[tokio::test]
async fn a_lock_file_that_is_a_symbolic_link_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("tether.db.lock")).unwrap();
    let mut config = test_config();
    config.db = Some(dir.path().join("tether.db"));
    let err = tether::server::Server::open(config)
        .await
        .err()
        .expect("a planted link refuses start");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(
        !dir.path().join("tether.db").exists(),
        "nothing was created"
    );
}

#[tokio::test]
async fn after_a_clean_stop_the_database_file_alone_holds_every_change() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let mut made = Vec::new();
    for _ in 0..20 {
        made.push(create(&mut c, conn("http", "")).await.id);
    }
    let (db, _keep) = (app.db_path(), app.dir.clone());
    app.stop().await.unwrap();
    let wal = db.with_file_name("tether.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "the WAL was emptied"
    );
    // A plain copy of the file, without its WAL, has everything.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(&db, copy.path().join("copy.db")).unwrap();
    let copied = rusqlite::Connection::open(copy.path().join("copy.db")).unwrap();
    let ids: Vec<String> = copied
        .prepare(
            "SELECT lower(substr(hex(id), 1, 8) || '-' || substr(hex(id), 9, 4) || '-' || \
             substr(hex(id), 13, 4) || '-' || substr(hex(id), 17, 4) || '-' || substr(hex(id), 21)) \
             FROM connections ORDER BY create_time",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids, made);
}
