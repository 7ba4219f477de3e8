//! Several replicas over one PostgreSQL database (the `postgres` feature):
//! servers started as for SQLite, with `--db postgres://…` and one shared
//! key, on a database of a throwaway cluster.

use crate::common::*;
use crate::pg_cluster::Cluster;
use std::sync::Arc;
use std::time::Duration;
use tether::pb::tether::v1 as pb;

/// A fresh database, and a folder for the key every replica shares.
async fn database() -> (String, Arc<tempfile::TempDir>) {
    // The blocking client cannot run on the runtime's threads.
    let url = tokio::task::spawn_blocking(|| Cluster::shared().database())
        .await
        .unwrap();
    (url, Arc::new(tempfile::tempdir().unwrap()))
}

/// A replica on `url`, once it serves (the first makes the shared key).
async fn replica(url: &str, keys: &Arc<tempfile::TempDir>) -> App {
    let (url, key) = (url.to_owned(), keys.path().join("tether.key"));
    replica_with(move |c| {
        c.db = Some(url.into());
        c.secret_key_file = Some(key);
    })
    .await
}

/// A server started with `tweak`, once it serves.
async fn replica_with(tweak: impl FnOnce(&mut tether::Config)) -> App {
    let app = App::start_with(tweak).await;
    let mut client = app.client.clone();
    client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("the replica serves");
    app
}

/// The next message, failing the test if none comes within 10 s.
async fn next(
    s: &mut tonic::Streaming<pb::WatchConnectionsResponse>,
) -> pb::WatchConnectionsResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a message within 10 s")
        .unwrap()
        .unwrap()
}

/// What one replica writes, the other reads and watches: a change made
/// through A reaches a watcher on B, and B's change reaches A's reads.
#[tokio::test]
async fn two_replicas_serve_one_database() {
    let (url, keys) = database().await;
    let a = replica(&url, &keys).await;
    let b = replica(&url, &keys).await;
    let (mut on_a, mut on_b) = (a.client.clone(), b.client.clone());
    let mut watching = on_b
        .watch_connections(pb::WatchConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let synced = next(&mut watching).await;
    assert_eq!(synced.r#type, pb::WatchEventType::Synced as i32);

    let made = create(&mut on_a, conn("tcp", "tcp://one.example:1")).await;
    let seen = next(&mut watching).await;
    assert_eq!(seen.r#type, pb::WatchEventType::Added as i32);
    assert_eq!(seen.connection.as_ref().unwrap().id, made.id);
    assert_eq!(get(&mut on_b, &made.id).await, made);

    let moved = moved(&mut on_b, &made.id, S::Ignored).await;
    assert_eq!(get(&mut on_a, &made.id).await, moved);
    let seen = next(&mut watching).await;
    assert_eq!(
        seen.revision,
        moved.etag.trim_start_matches('r').parse::<i64>().unwrap()
    );

    // The same identity reported through either replica is one connection.
    let again = on_a
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(pb::Connection {
                identity: made.identity.clone(),
                ..conn("tcp", "tcp://one.example:1")
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(again.unwrap_err().code(), tonic::Code::AlreadyExists);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Without a key given, a PostgreSQL database is refused: every replica
/// must seal and open secrets with the same key, so none is made.
#[tokio::test]
async fn a_replica_without_a_given_key_is_refused() {
    let (url, _keys) = database().await;
    let mut config = test_config();
    config.db = Some(url.into());
    let refused = tether::server::Server::open(config).await.err().unwrap();
    assert!(refused.to_string().contains("secret key"), "{refused}");
}

/// A key file of 32 random bytes, base64, 0600.
fn key_file(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    use base64::Engine as _;
    use std::os::unix::fs::PermissionsExt;
    let key: [u8; 32] = std::array::from_fn(|_| fastrand::u8(..));
    let path = dir.path().join(name);
    std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode(key)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Three replicas starting at once on a new database all migrate it and
/// serve, and one key check is recorded; a replica with another key is
/// refused.
#[tokio::test]
async fn replicas_starting_at_once_on_a_new_database_all_serve() {
    let (url, keys) = database().await;
    let key = key_file(&keys, "shared.key");
    let start = || {
        let (url, key) = (url.clone(), key.clone());
        replica_with(move |c| {
            c.db = Some(url.into());
            c.secret_key_file = Some(key);
        })
    };
    let (a, b, c) = tokio::join!(start(), start(), start());
    let made = create(&mut a.client.clone(), conn("tcp", "tcp://two.example:1")).await;
    for app in [&b, &c] {
        assert_eq!(get(&mut app.client.clone(), &made.id).await, made);
    }
    let mut other = test_config();
    other.db = Some(url.clone().into());
    other.secret_key_file = Some(key_file(&keys, "other.key"));
    let refused = tether::server::Server::open(other).await.err().unwrap();
    assert!(refused.to_string().contains("does not open"), "{refused}");
    for app in [a, b, c] {
        app.stop().await.unwrap();
    }
}

/// The database password may come from a file only the server's user can
/// read; one others can read, or a second password in the URL, is refused.
#[tokio::test]
async fn the_database_password_comes_from_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let (url, keys) = database().await;
    let password = keys.path().join("password");
    std::fs::write(&password, "not-checked-by-the-test-cluster\n").unwrap();
    let open = |db: String, mode: u32| {
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut config = test_config();
        config.db = Some(db.into());
        config.secret_key_file = Some(keys.path().join("tether.key"));
        config.db_password_file = Some(password.clone());
        tether::server::Server::open(config)
    };
    let shown = open(url.clone(), 0o640).await.err().unwrap().to_string();
    assert!(shown.contains("chmod 600"), "{shown}");
    let twice = url.replacen("tether@", "tether:inline@", 1);
    let refused = open(twice, 0o600).await.err().unwrap().to_string();
    assert!(refused.contains("one place"), "{refused}");
    // The test cluster trusts loopback, so any password opens it: the URL
    // the file completes is one the server serves with.
    let server = open(url, 0o600).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Serves, and stops at once (closing the store).
    server
        .serve(listener, std::future::ready(()))
        .await
        .unwrap();
}
