//! `tether backup` against a server under write load: the copy holds every
//! change acknowledged before it started, opens with its key, and neither
//! overwrites a file nor puts the key inside the backup.

use crate::common::*;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

async fn backup(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("backup")
        .args(args)
        .output()
        .await
        .expect("run tether backup")
}

#[tokio::test]
async fn a_backup_taken_under_load_restores_every_acknowledged_change() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("live/tether.db");
    let p = Binary::serve_db(&db, &[]).await;
    let c = p.client().await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (mut c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        writers.spawn(async move {
            while !stop.is_cancelled() {
                let made = create(&mut c, conn("http", "")).await;
                acked.lock().unwrap().push(made.id);
            }
        });
    }
    // Let some changes be acknowledged, then take the backup while the
    // writers go on.
    let mut c2 = c.clone();
    while acked.lock().unwrap().len() < 200 {
        create(&mut c2, conn("http", "")).await;
    }
    let before: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let out = dir.path().join("backup.db");
    let key_out = dir.path().join("backup.key");
    let run = backup(&[
        "--db",
        db.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--key-out",
        key_out.to_str().unwrap(),
    ])
    .await;
    assert!(run.status.success(), "{run:?}");
    let said = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(said.starts_with("backed up revision "), "{said}");
    stop.cancel();
    while writers.join_next().await.is_some() {}
    p.stop().await;

    for file in [&out, &key_out] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    // Restore: the backup and its key in a new place, and a server on them.
    let restored = Arc::new(tempfile::tempdir().unwrap());
    std::fs::copy(&out, restored.path().join("tether.db")).unwrap();
    std::fs::copy(&key_out, restored.path().join("tether.key")).unwrap();
    let app = App::start_in(restored.clone(), |_| {}).await;
    let mut r = app.client.clone();
    for id in &before {
        get(&mut r, id).await;
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_backup_never_overwrites_a_file_nor_writes_the_key_into_itself() {
    let app = App::start().await;
    create(&mut app.client.clone(), conn("http", "")).await;
    let db = app.db_path();
    let out = app.dir.path().join("b.db");
    std::fs::write(&out, "precious").unwrap();
    let run = backup(&["--db", db.to_str().unwrap(), "--out", out.to_str().unwrap()]).await;
    assert!(!run.status.success());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");

    let fresh = app.dir.path().join("c.db");
    let run = backup(&[
        "--db",
        db.to_str().unwrap(),
        "--out",
        fresh.to_str().unwrap(),
        "--key-out",
        fresh.to_str().unwrap(),
    ])
    .await;
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("never goes into the backup"));
    assert!(!fresh.exists());

    let run = backup(&[
        "--db",
        db.to_str().unwrap(),
        "--out",
        fresh.to_str().unwrap(),
    ])
    .await;
    assert!(run.status.success(), "{run:?}");
    assert!(String::from_utf8_lossy(&run.stderr).contains("not in the backup"));
    let key = std::fs::read_to_string(app.dir.path().join("tether.key")).unwrap();
    let copy = std::fs::read(&fresh).unwrap();
    assert!(
        !copy
            .windows(key.trim().len())
            .any(|w| w == key.trim().as_bytes()),
        "the key is not in the backup"
    );
    app.stop().await.unwrap();
}

/// A PostgreSQL database is PostgreSQL's to back up: refused, nothing written.
#[tokio::test]
async fn a_postgresql_database_is_not_backed_up_here() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.db");
    // Refused before any connection is tried: no server listens there.
    let run = backup(&[
        "--db",
        "postgres://tether@127.0.0.1:9/tether",
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("pg_dump"),
        "{run:?}"
    );
    assert!(!out.exists());
}
