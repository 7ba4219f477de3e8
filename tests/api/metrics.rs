//! The admin listener (`--admin-listen`): `/metrics` moves by exactly what
//! the API did, `/healthz`, `/readyz` (503 once shutdown begins), 404 for
//! anything else; no listener without the flag; a busy admin port refused
//! before anything is created; and the request and change log lines.

use crate::common::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tether::pb::tether::v1 as pb;
use tokio_stream::StreamExt;

/// GET `path` on the admin listener: status and body.
async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{admin}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().await.expect("a body"))
}

/// A scrape as `name{labels}` -> value; `# HELP`/`# TYPE` lines checked
/// to come before their samples.
async fn scrape(admin: SocketAddr) -> BTreeMap<String, f64> {
    let r = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(r.status().as_u16(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = r.text().await.unwrap();
    let mut samples = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let value = value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        samples.insert(series.to_owned(), value);
    }
    assert!(!samples.is_empty(), "{text}");
    samples
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

/// How much `series` grew from `before` to `after` (absent counts as 0).
fn grew(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    value(after, series) - before.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_by_exactly_what_the_api_did() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Binary::serve_db(&dir.path().join("t.db"), &["--admin-listen", "127.0.0.1:0"]).await;
    let admin = server.admin.expect("an admin address");
    let mut client = server.client().await;
    let before = scrape(admin).await;

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            create(&mut client, conn("tcp", "tcp://127.0.0.1:9"))
                .await
                .id,
        );
    }
    moved(&mut client, &ids[0], S::Ignored).await;
    moved(&mut client, &ids[1], S::Ignored).await;
    // Not an edge a user may take from DISCOVERED.
    let refused = transition(&mut client, &ids[2], S::Connected).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::FailedPrecondition);
    client
        .delete_connection(pb::DeleteConnectionRequest {
            id: ids[1].clone(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let missing = client
        .get_connection(pb::GetConnectionRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);

    // A watcher, open until the end of the test.
    let mut watch = client
        .watch_connections(pb::WatchConnectionsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    loop {
        let m = watch.next().await.expect("a message").expect("ok");
        if m.r#type == pb::WatchEventType::Synced as i32 {
            break;
        }
    }

    let after = scrape(admin).await;
    let t = |trigger: &str, outcome: &str| {
        grew(
            &before,
            &after,
            &format!(r#"tether_transitions_total{{trigger="{trigger}",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(t("user", "accepted"), 3.0, "two moves and a deletion");
    assert_eq!(t("user", "refused"), 1.0);
    assert_eq!(t("user", "unverified"), 0.0);
    assert_eq!(t("system", "accepted"), 0.0);
    let calls = |method: &str, code: &str| {
        grew(
            &before,
            &after,
            &format!(
                r#"tether_rpc_duration_seconds_count{{method="tether.v1.ConnectionService/{method}",code="{code}"}}"#
            ),
        )
    };
    assert_eq!(calls("CreateConnection", "OK"), 3.0);
    assert_eq!(calls("TransitionConnection", "OK"), 2.0);
    assert_eq!(calls("TransitionConnection", "FAILED_PRECONDITION"), 1.0);
    assert_eq!(calls("DeleteConnection", "OK"), 1.0);
    assert_eq!(calls("GetConnection", "NOT_FOUND"), 1.0);
    assert_eq!(calls("WatchConnections", "OK"), 1.0);
    // Each write a job of a committed group: 3 creates, 2 moves, 1 deletion
    // (the refused move never reached the writer).
    assert_eq!(grew(&before, &after, "tether_commit_group_size_sum"), 6.0);
    assert_eq!(value(&after, "tether_write_queue_depth"), 0.0);
    assert_eq!(value(&after, "tether_watchers"), 1.0);

    // The gauges read at scrape time agree with the API.
    let counts = client
        .count_connections(pb::CountConnectionsRequest {
            show_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for c in &counts.counts {
        let state = S::try_from(c.state).unwrap().as_str_name();
        let state = state.strip_prefix("CONNECTION_STATE_").unwrap();
        assert_eq!(
            value(
                &after,
                &format!(r#"tether_connections{{state="{state}",kind="tcp"}}"#)
            ),
            c.count as f64,
            "{state}"
        );
    }
    assert_eq!(counts.total, 3);
    assert_eq!(value(&after, "tether_revision"), counts.revision as f64);
    assert!(value(&after, r#"tether_storage_bytes{file="db"}"#) > 0.0);
    assert!(value(&after, "tether_storage_used_bytes") > 0.0);
    assert_eq!(
        value(&after, "tether_storage_quota_bytes"),
        (8u64 << 30) as f64
    );
    let version = format!(
        r#"tether_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&after, &version), 1.0);
    drop(watch);
    server.stop().await;
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Binary::serve_db(&dir.path().join("t.db"), &["--admin-listen", "localhost:0"]).await;
    let admin = server.admin.expect("an admin address");
    assert!(admin.ip().is_loopback(), "{admin}");
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(get(admin, "/nope").await.0, 404);
    assert_eq!(get(admin, "/metrics/").await.0, 404);
    let post = reqwest::Client::new()
        .post(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 405);
    server.stop().await;
}

#[tokio::test]
async fn readiness_fails_as_soon_as_shutdown_begins() {
    let mut app = App::start_admin(|_| {}).await;
    let admin = app.admin.expect("an admin address");
    assert_eq!(get(admin, "/readyz").await.0, 200);
    // A verification held open keeps the server in its graceful shutdown
    // for as long as the test needs.
    let mut gated = GatedHttp::new().await;
    let c = create(&mut app.client, conn("http", &gated.url())).await;
    let mut client = app.new_client().await;
    let id = c.id.clone();
    let held = tokio::spawn(async move { transition(&mut client, &id, S::Registered).await });
    gated.request_arrived().await;
    // Health says when shutdown has begun.
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health watch")
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(health.next().await.unwrap().unwrap().status, serving);
    app.begin_stop();
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(health.next().await.unwrap().unwrap().status, not_serving);

    assert_eq!(
        get(admin, "/readyz").await,
        (503, "not ready: shutting down\n".into())
    );
    assert_eq!(
        get(admin, "/healthz").await.0,
        200,
        "the process still serves"
    );
    gated.answer().await;
    let moved = held.await.unwrap().expect("the call in flight finishes");
    assert_eq!(moved.state, S::Registered as i32);
    app.stop().await.unwrap();
    // Gone with the store.
    assert!(
        reqwest::get(format!("http://{admin}/healthz"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn no_admin_listener_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::serve_db(&dir.path().join("t.db"), &[]).await;
    assert!(server.admin.is_none());
    // Everything logged up to the gRPC listener's "serving" line, which
    // comes after the admin listener's.
    let lines = server.lines_until("transport=").await;
    assert!(!lines.iter().any(|l| l.contains("/metrics")), "{lines:#?}");
    server.stop().await;
}

#[tokio::test]
async fn a_busy_admin_port_is_refused_before_anything_is_created() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let db = db.to_str().unwrap();
    let out = Binary::run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        &busy,
        "--db",
        db,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot listen") && stderr.contains(&busy),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing created: {left:?}");
}

/// The next stderr line that is a JSON object with `message` = `message`
/// and, if given, `method` ending in `method`.
async fn json_line(server: &mut Binary, message: &str, method: &str) -> serde_json::Value {
    loop {
        let line = server.logged(&format!(r#""message":"{message}""#)).await;
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["method"].as_str().is_some_and(|m| m.ends_with(method)) {
            return v;
        }
    }
}

#[tokio::test]
async fn each_request_logs_a_debug_line_and_each_change_an_info_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut server = Binary::serve_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--disable-monitor",
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "tether=debug")],
    )
    .await;
    let mut client = server.client().await;
    let missing = uuid::Uuid::now_v7().to_string();
    let _ = client
        .get_connection(pb::GetConnectionRequest {
            id: missing.clone(),
        })
        .await
        .unwrap_err();
    let line = json_line(&mut server, "request", "/GetConnection").await;
    assert_eq!(line["level"], "DEBUG", "{line}");
    assert_eq!(line["target"], "tether::request", "{line}");
    assert_eq!(line["principal"], "anonymous", "{line}");
    assert_eq!(
        line["method"], "tether.v1.ConnectionService/GetConnection",
        "{line}"
    );
    assert_eq!(line["code"], "NOT_FOUND", "{line}");
    assert!(
        line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{line}"
    );

    let c = create(&mut client, conn("tcp", "tcp://127.0.0.1:9")).await;
    let line = json_line(&mut server, "connection created", "CreateConnection").await;
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(
        line["method"], "tether.v1.ConnectionService/CreateConnection",
        "{line}"
    );
    assert_eq!(line["principal"], "anonymous", "{line}");
    assert_eq!(line["id"], c.id.as_str(), "{line}");
    assert_eq!(line["revision"], c.revision, "{line}");

    let ignored = moved(&mut client, &c.id, S::Ignored).await;
    let line = json_line(&mut server, "transition", "TransitionConnection").await;
    assert_eq!(line["principal"], "anonymous", "{line}");
    assert_eq!(line["id"], c.id.as_str(), "{line}");
    assert_eq!(line["revision"], ignored.revision, "{line}");
    assert_eq!(
        (&line["from"], &line["to"]),
        (&"DISCOVERED".into(), &"IGNORED".into())
    );

    let mut changed = ignored.clone();
    changed.description = "described".into();
    let updated = client
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(changed),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner();
    let line = json_line(&mut server, "connection updated", "UpdateConnection").await;
    assert_eq!(line["id"], c.id.as_str(), "{line}");
    assert_eq!(line["revision"], updated.revision, "{line}");

    let deleted = client
        .delete_connection(pb::DeleteConnectionRequest {
            id: c.id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();
    let line = json_line(&mut server, "transition", "DeleteConnection").await;
    assert_eq!(line["revision"], deleted.revision, "{line}");
    assert_eq!(line["to"], "DELETED", "{line}");

    let report = client
        .report_discovered(pb::ReportDiscoveredRequest {
            source: "agent".into(),
            connections: vec![
                conn("tcp", "tcp://127.0.0.1:10"),
                conn("tcp", "tcp://127.0.0.1:11"),
            ],
        })
        .await
        .expect("report")
        .into_inner();
    let line = json_line(&mut server, "discovery report", "ReportDiscovered").await;
    assert_eq!(line["principal"], "anonymous", "{line}");
    assert_eq!(
        (&line["count"], &line["created"]),
        (&2.into(), &2.into()),
        "{line}"
    );
    let last = report
        .results
        .iter()
        .filter_map(|r| r.connection.as_ref().map(|c| c.revision))
        .max()
        .unwrap();
    assert_eq!(line["revision"], last, "{line}");
    server.stop().await;
}
