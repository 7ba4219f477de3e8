//! Reaching PostgreSQL (the `postgres` feature): TLS to it, verified; a
//! replica whose PostgreSQL goes away and comes back (health, writes and
//! watchers), on a private cluster the test stops and starts; and one whose
//! database a newer replica migrated under it.

use crate::common::*;
use crate::pg_cluster::Cluster;
use std::sync::Arc;
use std::time::Duration;
use tether::pb::tether::v1 as pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A private cluster started with `files` and `settings`, and a database on it.
async fn cluster(
    files: Vec<(&'static str, String)>,
    settings: &'static [&'static str],
) -> (Arc<Cluster>, String) {
    // The blocking client cannot run on the runtime's threads.
    tokio::task::spawn_blocking(move || {
        let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
        let cluster = Cluster::private(&files, settings);
        let url = cluster.database();
        (Arc::new(cluster), url)
    })
    .await
    .unwrap()
}

/// Config for a replica on `url`, its key in `dir`.
fn on(url: &str, dir: &tempfile::TempDir) -> tether::Config {
    let mut config = test_config();
    config.db = Some(url.into());
    config.secret_key_file = Some(dir.path().join("tether.key"));
    config
}

/// A replica on `url`, its key in `dir`, once it serves.
async fn replica(url: &str, dir: &tempfile::TempDir) -> App {
    let (url, key) = (url.to_owned(), dir.path().join("tether.key"));
    App::start_with(move |c| {
        c.db = Some(url.into());
        c.secret_key_file = Some(key);
    })
    .await
}

/// A watch of `app`'s health, which says SERVING first.
async fn serving(app: &App) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut health = HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next(&mut health).await.status,
        ServingStatus::Serving as i32
    );
    health
}

/// The next message, failing the test if none comes within 20 s.
async fn next<T>(s: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("a message within 20 s")
        .unwrap()
        .expect("the stream goes on")
}

/// With `sslmode=verify-full` and `sslrootcert`, every connection of the
/// replica to PostgreSQL is TLS, its certificate checked against that CA;
/// without the CA the server's certificate is not trusted, and the replica
/// says how to give it.
#[tokio::test]
async fn tls_to_postgresql_is_verified() {
    let ca = TestCa::new("tether postgres ca");
    let leaf = ca.server();
    let (cluster, url) = cluster(
        vec![("server.crt", leaf.cert.clone()), ("server.key", leaf.key)],
        &[
            "ssl=on",
            "ssl_cert_file={dir}/server.crt",
            "ssl_key_file={dir}/server.key",
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("pg-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();

    let untrusted = tether::server::Server::open(on(&format!("{url}?sslmode=require"), &dir))
        .await
        .err()
        .expect("an untrusted certificate is refused")
        .to_string();
    assert!(untrusted.contains("sslrootcert"), "{untrusted}");

    let verified = format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    );
    let app = replica(&verified, &dir).await;
    let url_again = url.clone();
    let made = create(&mut app.client.clone(), conn("tcp", "tcp://tls.example:1")).await;
    assert_eq!(get(&mut app.client.clone(), &made.id).await, made);
    // What PostgreSQL itself says of the replica's connections.
    let (tls, plain): (i64, i64) = tokio::task::spawn_blocking(move || {
        let mut admin = postgres::Client::connect(&url_again, postgres::NoTls).unwrap();
        let row = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
                 FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    })
    .await
    .unwrap();
    assert!(tls >= 3, "writer, tail and shards at least: {tls}");
    assert_eq!(plain, 0, "no connection of the replica is in the clear");
    app.stop().await.unwrap();
    drop(cluster);
}

/// PostgreSQL stops under a serving replica: health turns NOT_SERVING and
/// writes and reads are UNAVAILABLE, without a write having to fail first;
/// once it is back, health is SERVING again, reads and the next write are
/// answered, and an open watch goes on after the last change it had,
/// missing none.
#[tokio::test]
async fn a_replica_whose_postgresql_goes_away_and_comes_back() {
    let (cluster, url) = cluster(Vec::new(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let app = replica(&url, &dir).await;
    let mut client = app.client.clone();
    let mut health = serving(&app).await;
    let mut watch = client
        .watch_connections(pb::WatchConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next(&mut watch).await.r#type,
        pb::WatchEventType::Synced as i32
    );
    let before = create(&mut client, conn("tcp", "tcp://before.example:1")).await;
    assert_eq!(next(&mut watch).await.connection.unwrap().id, before.id);

    // Reads at once fill the replica's pool of read connections.
    let reads = (0..4).map(|_| {
        let (mut client, id) = (client.clone(), before.id.clone());
        async move { get(&mut client, &id).await }
    });
    for read in futures::future::join_all(reads).await {
        assert_eq!(read, before);
    }

    let halting = cluster.clone();
    tokio::task::spawn_blocking(move || halting.halt())
        .await
        .unwrap();
    // No write is made: the replica notices by itself.
    assert_eq!(
        next(&mut health).await.status,
        ServingStatus::NotServing as i32
    );
    let refused = client
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(conn("tcp", "tcp://during.example:1")),
            ..Default::default()
        })
        .await;
    assert_error(refused, Code::Unavailable, "STORAGE_UNAVAILABLE");
    let unread = client
        .get_connection(pb::GetConnectionRequest {
            id: before.id.clone(),
        })
        .await;
    assert_error(unread, Code::Unavailable, "STORAGE_UNAVAILABLE");

    let resuming = cluster.clone();
    tokio::task::spawn_blocking(move || resuming.resume())
        .await
        .unwrap();
    assert_eq!(
        next(&mut health).await.status,
        ServingStatus::Serving as i32
    );
    // No read meets a connection that broke while PostgreSQL was away.
    for _ in 0..4 {
        assert_eq!(get(&mut client, &before.id).await, before);
    }
    let after = create(&mut client, conn("tcp", "tcp://after.example:1")).await;
    let seen = next(&mut watch).await;
    assert_eq!(seen.connection.unwrap().id, after.id);
    let revision = |c: &pb::Connection| c.etag.trim_start_matches('r').parse::<i64>().unwrap();
    assert_eq!(seen.revision, revision(&after));
    assert_eq!(
        revision(&after),
        revision(&before) + 1,
        "the refused write took none"
    );
    app.stop().await.unwrap();
}

/// A newer replica migrates the database while an older one serves: the
/// older one says NOT_SERVING without a write having to fail, and refuses
/// writes (UNAVAILABLE, so clients go to another replica) rather than write
/// to a schema it does not know.
#[tokio::test]
async fn a_replica_stops_serving_once_a_newer_one_migrates_its_database() {
    // The blocking client cannot run on the runtime's threads.
    let url = tokio::task::spawn_blocking(|| Cluster::shared().database())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = replica(&url, &dir).await;
    let mut client = app.client.clone();
    let made = create(&mut client, conn("tcp", "tcp://old.example:1")).await;
    let mut health = serving(&app).await;

    // What a newer tether's migration leaves: a version this one never wrote.
    let sql = |statement: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            admin.query_one(statement, &[]).unwrap().get::<_, i64>(0)
        })
    };
    sql("UPDATE schema_version SET version = version + 1 RETURNING version")
        .await
        .unwrap();
    assert_eq!(
        next(&mut health).await.status,
        ServingStatus::NotServing as i32
    );
    let refused = client
        .transition_connection(pb::TransitionConnectionRequest {
            id: made.id.clone(),
            target_state: S::Ignored as i32,
            ..Default::default()
        })
        .await;
    let shown = refused.as_ref().unwrap_err().message().to_owned();
    assert_error(refused, Code::Unavailable, "STORAGE_UNAVAILABLE");
    assert!(shown.contains("newer than this tether"), "{shown}");
    let revision = sql("SELECT value FROM meta WHERE key = 'revision'")
        .await
        .unwrap();
    let made_at = made.etag.trim_start_matches('r').parse::<i64>().unwrap();
    assert_eq!(revision, made_at, "nothing was written");
    app.stop().await.unwrap();
}
