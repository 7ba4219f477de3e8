//! A damaged or vanished database: refused at start, or (once running) no
//! longer acknowledged and reported through health.

use crate::common::*;
use std::path::Path;
use std::sync::Arc;
use tether::pb::tether::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A stopped server's database in its own temp dir, with `n` connections.
async fn stopped_with(n: usize) -> Arc<tempfile::TempDir> {
    let app = App::start().await;
    let mut c = app.client.clone();
    for _ in 0..n {
        create(&mut c, conn("http", "")).await;
    }
    let dir = app.dir.clone();
    app.stop().await.unwrap();
    dir
}

/// Opening a server on the database in `dir` fails; its message.
async fn refused(dir: &Path) -> String {
    let mut config = test_config();
    config.db = Some(dir.join("tether.db"));
    match tether::server::Server::open(config).await {
        Ok(_) => panic!("the server opened the database"),
        Err(e) => e.to_string(),
    }
}

fn sql(dir: &Path, statement: &str) {
    let db = rusqlite::Connection::open(dir.join("tether.db")).unwrap();
    db.execute_batch(statement).unwrap();
}

async fn health(app: &App) -> i32 {
    HealthClient::new(app.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn a_database_with_garbage_pages_refuses_start() {
    let dir = stopped_with(40).await;
    let path = dir.path().join("tether.db");
    let mut bytes = std::fs::read(&path).unwrap();
    let pages = bytes.len() / 4096;
    assert!(
        pages > 4,
        "enough pages to damage one in the middle: {pages}"
    );
    // Garbage over a page that is neither the header page nor the last one.
    let page = pages / 2;
    for (i, b) in bytes[page * 4096..(page + 1) * 4096].iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    std::fs::write(&path, bytes).unwrap();
    let message = refused(dir.path()).await;
    assert!(message.contains("damaged"), "{message}");
}

#[tokio::test]
async fn a_revision_counter_behind_its_rows_refuses_start() {
    let dir = stopped_with(3).await;
    sql(
        dir.path(),
        "UPDATE meta SET value = 1 WHERE key = 'revision'",
    );
    let message = refused(dir.path()).await;
    assert!(message.contains("revisions would be reused"), "{message}");
}

#[tokio::test]
async fn a_compaction_mark_beyond_the_revision_refuses_start() {
    let dir = stopped_with(2).await;
    sql(
        dir.path(),
        "UPDATE meta SET value = 9 WHERE key = 'compact_revision'",
    );
    let message = refused(dir.path()).await;
    assert!(message.contains("compaction mark 9"), "{message}");
}

#[tokio::test]
async fn a_missing_table_refuses_start() {
    let dir = stopped_with(1).await;
    sql(dir.path(), "DROP TABLE requests");
    let message = refused(dir.path()).await;
    assert!(message.contains("table requests is missing"), "{message}");
}

#[tokio::test]
async fn credentials_without_their_key_check_refuse_start() {
    let app = App::start().await;
    bearer_credential(&app, "http", "s3cret").await;
    let dir = app.dir.clone();
    app.stop().await.unwrap();
    sql(dir.path(), "DELETE FROM key_check");
    let message = refused(dir.path()).await;
    assert!(message.contains("key check"), "{message}");
}

#[tokio::test]
async fn an_empty_database_file_beside_its_key_refuses_start() {
    let dir = stopped_with(2).await;
    std::fs::File::create(dir.path().join("tether.db")).unwrap();
    let message = refused(dir.path()).await;
    assert!(message.contains("looks replaced or truncated"), "{message}");
    // Nothing was written into the empty file on the way out.
    assert_eq!(
        std::fs::metadata(dir.path().join("tether.db"))
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test]
async fn a_database_removed_while_serving_stops_acknowledging_writes() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let kept = create(&mut c, conn("http", "")).await;
    assert_eq!(health(&app).await, ServingStatus::Serving as i32);
    let mut watch = HealthClient::new(app.channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().status;
    assert_eq!(first, ServingStatus::Serving as i32);

    std::fs::remove_file(app.db_path()).unwrap();
    for _ in 0..2 {
        let r = c
            .create_connection(pb::CreateConnectionRequest {
                connection: Some(conn("http", "")),
                ..Default::default()
            })
            .await;
        assert_error(r, Code::Unavailable, "STORAGE_UNAVAILABLE");
    }
    let r = transition(&mut c, &kept.id, S::Ignored).await;
    assert_error(r, Code::Unavailable, "STORAGE_UNAVAILABLE");
    assert_eq!(health(&app).await, ServingStatus::NotServing as i32);
    let next = watch.message().await.unwrap().unwrap().status;
    assert_eq!(next, ServingStatus::NotServing as i32, "watchers are told");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_database_replaced_while_serving_stops_acknowledging_writes() {
    let other = stopped_with(1).await;
    let app = App::start().await;
    let mut c = app.client.clone();
    let mine = create(&mut c, conn("http", "")).await;
    // A read now leaves an open read connection on our file in the pool.
    get(&mut c, &mine.id).await;
    // Another database renamed over ours: the path names a different file.
    std::fs::copy(
        other.path().join("tether.db"),
        app.dir.path().join("other.db"),
    )
    .unwrap();
    std::fs::rename(app.dir.path().join("other.db"), app.db_path()).unwrap();
    let r = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(conn("http", "")),
            ..Default::default()
        })
        .await;
    let status = r.expect_err("a write into the replaced file");
    let (code, reason, _) = error_info(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::Unavailable, "STORAGE_UNAVAILABLE")
    );
    assert!(
        status.message().contains("removed or replaced"),
        "{status:?}"
    );
    assert_eq!(health(&app).await, ServingStatus::NotServing as i32);
    // Reads on connections opened before still show what this server wrote;
    // none opens the other file (a snapshot always opens a connection).
    assert_eq!(get(&mut c, &mine.id).await.id, mine.id);
    let mut s = c
        .watch_connections(pb::WatchConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_error(s.message().await, Code::Unavailable, "STORAGE_UNAVAILABLE");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_write_ahead_log_from_another_database_is_not_served() {
    let mine = App::start().await;
    let mut c = mine.client.clone();
    let kept = create(&mut c, conn("http", "")).await;
    let dir = mine.dir.clone();
    mine.stop().await.unwrap();

    // A crashed server leaves its log behind: copy one from a running one.
    let other = App::start().await;
    let mut o = other.client.clone();
    for _ in 0..3 {
        create(&mut o, conn("http", "")).await;
    }
    std::fs::copy(
        other.dir.path().join("tether.db-wal"),
        dir.path().join("tether.db-wal"),
    )
    .unwrap();
    other.stop().await.unwrap();

    let message = refused(dir.path()).await;
    assert!(message.contains("belongs to another database"), "{message}");
    // Moved away, the database is served with its own rows.
    std::fs::remove_file(dir.path().join("tether.db-wal")).unwrap();
    let mine = App::start_in(dir, |_| {}).await;
    let mut c = mine.client.clone();
    assert_eq!(get(&mut c, &kept.id).await, kept);
    mine.stop().await.unwrap();
}

/// Makes a file really unwritable, even for root (tests run as root in CI,
/// and root ignores `chmod`): `chattr +i` where the filesystem has it, else
/// mode 0444. Undone on drop, so that the temp dir can be removed.
struct Unwritable(std::path::PathBuf);

impl Unwritable {
    /// `None` when neither way stops this process writing the file.
    fn make(path: &Path) -> Option<Unwritable> {
        use std::os::unix::fs::PermissionsExt;
        let guard = Unwritable(path.to_owned());
        let immutable = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !immutable {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
        }
        let writable = std::fs::OpenOptions::new().write(true).open(path).is_ok();
        (!writable).then_some(guard)
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o600));
    }
}

#[tokio::test]
async fn a_database_file_that_cannot_be_written_refuses_start() {
    let dir = stopped_with(1).await;
    let Some(_unwritable) = Unwritable::make(&dir.path().join("tether.db")) else {
        eprintln!("skipped: neither chattr +i nor chmod stops this user writing a file here");
        return;
    };
    // Refused by whichever comes first: opening the file for writing (to
    // keep it private) or the start-up write through SQLite.
    let message = refused(dir.path()).await;
    assert!(
        message.contains("tether.db")
            && (message.contains("cannot open") || message.contains("cannot be written")),
        "{message}"
    );
}
