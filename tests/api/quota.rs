//! The storage quota (`--storage-quota`): past it, writes are refused with
//! `RESOURCE_EXHAUSTED` / `STORAGE_QUOTA_EXCEEDED`, reads go on, deletions
//! still run, and once they have freed space writes are accepted again.

use crate::common::*;
use tether::pb::tether::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// The smallest quota the server takes; an empty database is about a tenth of it.
const QUOTA: u64 = 1 << 20;

/// Metadata just under the 64 KiB limit, different for each `n` (so nothing
/// can be shared between connections).
fn big_metadata(n: usize) -> prost_types::Struct {
    let filler: String = (0..60 * 1024)
        .map(|i| char::from(b'a' + ((i * 7 + n * 13) % 26) as u8))
        .collect();
    json_struct(serde_json::json!({ "n": n, "filler": filler }))
}

fn big(n: usize) -> pb::Connection {
    pb::Connection {
        metadata: Some(big_metadata(n)),
        managed: Some(false),
        ..conn("tcp", "")
    }
}

async fn try_create(c: &mut Client, x: pb::Connection) -> Result<pb::Connection, tonic::Status> {
    c.create_connection(pb::CreateConnectionRequest {
        connection: Some(x),
        skip_verification: true,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

/// Creates connections with large metadata until one is refused; those
/// created, and the refusal.
async fn fill(c: &mut Client) -> (Vec<pb::Connection>, tonic::Status) {
    let mut created = Vec::new();
    loop {
        assert!(
            created.len() < 100,
            "100 connections of 60 KiB each never reached a 1 MiB quota"
        );
        match try_create(c, big(created.len())).await {
            Ok(x) => created.push(x),
            Err(status) => return (created, status),
        }
    }
}

async fn serving(app: &App) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(app.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health answers")
        .into_inner()
        .status
}

#[tokio::test]
async fn past_the_quota_writes_are_refused_while_reads_and_deletions_go_on() {
    let app = App::start_with(|cfg| cfg.storage_quota = QUOTA).await;
    let mut c = app.client.clone();
    let mut creds =
        pb::credential_service_client::CredentialServiceClient::new(app.channel.clone());
    let credential = bearer_credential(&app, "grafana", "tok").await;

    let (created, refused) = fill(&mut c).await;
    let (code, reason, metadata) = error_info(&refused);
    assert_eq!(
        (code, reason.as_str()),
        (Code::ResourceExhausted, "STORAGE_QUOTA_EXCEEDED"),
        "{refused:?}"
    );
    assert_eq!(metadata["quota_bytes"], QUOTA.to_string());
    let used: u64 = metadata["used_bytes"].parse().expect("a number of bytes");
    assert!(used > QUOTA, "used {used} is past the quota");
    for hint in ["delete connections or credentials", "--storage-quota"] {
        assert!(refused.message().contains(hint), "{}", refused.message());
    }
    assert!(
        created.len() >= 3,
        "only {} connections fit below the quota",
        created.len()
    );

    // Every write that frees nothing is refused the same way.
    quota_exceeded(
        c.transition_connection(pb::TransitionConnectionRequest {
            id: created[0].id.clone(),
            target_state: S::Ignored as i32,
            ..Default::default()
        })
        .await,
    );
    quota_exceeded(
        c.update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: created[0].id.clone(),
                name: "renamed".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await,
    );
    quota_exceeded(try_create(&mut c, conn("tcp", "")).await);
    assert_eq!(
        get(&mut c, &created[0].id).await.state,
        S::Discovered as i32
    );

    // Reads go on, and health stays SERVING: the server answers, only
    // writes are refused, and they say why.
    for x in &created {
        assert_eq!(get(&mut c, &x.id).await.metadata, x.metadata);
    }
    let listed = c
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .connections;
    assert_eq!(listed.len(), created.len());
    let counts = c
        .count_connections(pb::CountConnectionsRequest::default())
        .await
        .expect("count")
        .into_inner();
    assert_eq!(counts.total, created.len() as i64, "{counts:?}");
    assert_eq!(events_of(&mut c, &created[0].id).await.len(), 1);
    assert_eq!(serving(&app).await, ServingStatus::Serving as i32);

    // Deletions free space, so they run over the quota: the credential and
    // every connection.
    creds
        .delete_credential(pb::DeleteCredentialRequest { id: credential })
        .await
        .expect("a credential is deleted over the quota");
    for x in &created {
        let tomb = c
            .delete_connection(pb::DeleteConnectionRequest {
                id: x.id.clone(),
                ..Default::default()
            })
            .await
            .expect("a connection is deleted over the quota")
            .into_inner();
        assert_eq!(tomb.state, S::Deleted as i32);
    }

    // Back under the quota: writes are accepted again.
    let again = try_create(&mut c, big(created.len()))
        .await
        .expect("a create once deletions freed the space");
    assert_eq!(again.metadata, Some(big_metadata(created.len())));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_restart_with_a_larger_quota_accepts_writes_again() {
    let app = App::start_with(|cfg| cfg.storage_quota = QUOTA).await;
    let mut c = app.client.clone();
    let (created, _) = fill(&mut c).await;
    let dir = app.dir.clone();
    app.stop().await.unwrap();

    let app = App::start_in(dir.clone(), |cfg| cfg.storage_quota = QUOTA).await;
    let mut c = app.client.clone();
    quota_exceeded(try_create(&mut c, conn("tcp", "")).await);
    app.stop().await.unwrap();

    let app = App::start_in(dir, |cfg| cfg.storage_quota = 4 * QUOTA).await;
    let mut c = app.client.clone();
    try_create(&mut c, conn("tcp", ""))
        .await
        .expect("a create under the raised quota");
    // Nothing was lost meanwhile.
    assert_eq!(
        get(&mut c, &created[0].id).await.metadata,
        created[0].metadata
    );
    app.stop().await.unwrap();
}

fn quota_exceeded(r: Result<impl std::fmt::Debug, tonic::Status>) {
    let metadata = assert_error(r, Code::ResourceExhausted, "STORAGE_QUOTA_EXCEEDED");
    assert_eq!(metadata["quota_bytes"], QUOTA.to_string());
}

/// One WARN when the alarm is raised and one INFO when it clears, however many
/// writes are refused meanwhile: here the monitor's probe results, which keep
/// coming every 50 ms.
#[tokio::test]
async fn the_quota_alarm_is_logged_once_not_per_refused_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut p = Binary::serve_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--storage-quota",
            "1MiB",
            "--probe-interval",
            "50ms",
        ],
        &[("RUST_LOG", "info,tether::monitor=debug")],
    )
    .await;
    let mut c = p.client().await;
    let port = OpenPort::new().await;
    create(&mut c, conn("tcp", &port.url())).await;

    let (created, _) = fill(&mut c).await;
    let raised = p.lines_until("over its storage quota").await;
    let alarm = raised.last().expect("the line itself");
    assert!(alarm.contains("WARN"), "{alarm}");
    // Probe results keep coming and are refused; none of them is a warning,
    // and the alarm is not raised again.
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.extend(p.lines_until("probe result not applied").await);
    }
    let warnings: Vec<_> = seen.iter().filter(|l| l.contains("WARN")).collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert!(
        seen.iter()
            .filter(|l| l.contains("probe result not applied"))
            .all(|l| l.contains("DEBUG") && l.contains("storage quota")),
        "{seen:#?}"
    );

    for x in &created {
        c.delete_connection(pb::DeleteConnectionRequest {
            id: x.id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete over the quota");
    }
    let cleared = p.lines_until("back under its storage quota").await;
    let last = cleared.last().expect("the line itself");
    assert!(last.contains("INFO"), "{last}");
    let warnings: Vec<_> = cleared.iter().filter(|l| l.contains("WARN")).collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    p.stop().await;
}

/// A database without its key check (one from before there was one, or one
/// never given a credential) gets it at start, even over its quota: a server
/// that could not start could not have space freed either.
#[tokio::test]
async fn a_database_over_its_quota_still_starts_and_gets_its_key_check() {
    let app = App::start_with(|cfg| cfg.storage_quota = QUOTA).await;
    let mut c = app.client.clone();
    let (created, _) = fill(&mut c).await;
    let dir = app.dir.clone();
    app.stop().await.unwrap();
    let db = rusqlite::Connection::open(dir.path().join("tether.db")).unwrap();
    db.execute_batch("DELETE FROM key_check").unwrap();
    drop(db);

    let app = App::start_in(dir.clone(), |cfg| cfg.storage_quota = QUOTA).await;
    let mut c = app.client.clone();
    quota_exceeded(try_create(&mut c, conn("tcp", "")).await);
    assert_eq!(
        get(&mut c, &created[0].id).await.metadata,
        created[0].metadata
    );
    app.stop().await.unwrap();
    let db = rusqlite::Connection::open(dir.path().join("tether.db")).unwrap();
    let checks: i64 = db
        .query_row("SELECT count(*) FROM key_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(checks, 1, "the key check was written at start");
}
