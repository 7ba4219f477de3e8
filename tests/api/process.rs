//! The `tether` binary as an operator runs it: flags and environment,
//! SIGTERM, kill -9, and a database from the future.

use crate::common::*;
use std::time::Duration;
use tether::pb::tether::v1 as pb;

#[tokio::test]
async fn sigterm_shuts_down_cleanly_with_exit_code_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nested/dir/t.db");
    // Environment variables configure it as well as flags do.
    let p = Binary::serve_with_env(
        &[],
        &[
            ("TETHER_LISTEN", "127.0.0.1:0"),
            ("TETHER_DB", db.to_str().unwrap()),
        ],
    )
    .await;
    let mut c = p.client().await;
    let mut s = c
        .watch_connections(pb::WatchConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap();
    create(&mut c, conn("http", "")).await;
    p.signal("-TERM").await;
    // The open watch ends with UNAVAILABLE (possibly after the change it was sent).
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("stream ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let exit = p.wait().await;
    assert_eq!(exit.code(), Some(0));
    assert!(db.exists(), "the database was created at --db / TETHER_DB");
}

#[tokio::test]
async fn acknowledged_changes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    // No background probing: every change here is the test's own.
    let p = Binary::serve_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--disable-monitor",
        ],
        &[],
    )
    .await;
    let mut c = p.client().await;
    let mut acked = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..20 {
        let mut c = c.clone();
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..10 {
                let x = create(&mut c, conn("http", "")).await;
                let x = transition(&mut c, &x.id, S::Ignored).await.unwrap();
                ids.push((x.id, x.revision));
            }
            ids
        }));
    }
    for h in handles {
        acked.extend(h.await.unwrap());
    }
    let last = create(&mut c, conn("http", "")).await;
    p.signal("-KILL").await;
    let status = p.wait().await;
    assert_ne!(status.code(), Some(0));

    // No background probing: every change here is the test's own.
    let p = Binary::serve_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--disable-monitor",
        ],
        &[],
    )
    .await;
    let mut c = p.client().await;
    for (id, revision) in &acked {
        let x = get(&mut c, id).await;
        assert_eq!((x.state, x.revision), (S::Ignored as i32, *revision));
    }
    assert_eq!(get(&mut c, &last.id).await.revision, last.revision);
    let history = c
        .list_connection_events(pb::ListConnectionEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.events.len(), 401);
    p.signal("-TERM").await;
    assert_eq!(p.wait().await.code(), Some(0));
}

#[tokio::test]
async fn a_database_from_a_newer_version_is_refused() {
    let app = App::start().await;
    let (db, _dir) = (app.db_path(), app.dir.clone());
    app.stop().await.unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let mut config = test_config();
    config.db = Some(db);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = tether::server::run(config, listener, std::future::pending())
        .await
        .expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 99") && msg.contains("newer"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_port_in_use_is_refused_before_anything_is_created() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let out = Binary::run(&["serve", "--listen", &listen, "--db", db.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing created: {left:?}");
}

#[tokio::test]
async fn serve_help_names_every_service() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--help"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    for service in [
        "ConnectionService",
        "CredentialService",
        "DefinitionService",
        "health",
        "reflection",
    ] {
        assert!(help.contains(service), "{service} in {help}");
    }
}

#[tokio::test]
async fn listen_takes_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut p = Binary::serve(&["--listen", "localhost:0", "--db", db.to_str().unwrap()]).await;
    assert!(p.addr().ip().is_loopback(), "{}", p.addr());
    let serving = p.logged("transport=").await;
    assert!(
        serving.contains(&format!("addr={}", p.addr())),
        "the address as it is, not an Option: {serving}"
    );
    let mut c = p.client().await;
    c.list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("serves on the name's address");
    p.signal("-TERM").await;
    assert_eq!(p.wait().await.code(), Some(0));
}

#[tokio::test]
async fn logs_can_be_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut p = Binary::serve_db(&db, &["--log-format", "json"]).await;
    let json = |line: &str| -> serde_json::Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let serving = json(&p.logged(r#""message":"serving""#).await);
    assert_eq!(serving["level"], "INFO", "{serving}");
    assert_eq!(serving["addr"], p.addr().to_string(), "{serving}");

    let mut c = p.client().await;
    let made = create(&mut c, conn("http", "")).await;
    let after = moved(&mut c, &made.id, S::Ignored).await;
    let logged = json(&p.logged(r#""message":"transition""#).await);
    assert_eq!(logged["id"], made.id.as_str(), "{logged}");
    assert_eq!(logged["to"], "IGNORED", "{logged}");
    assert_eq!(logged["revision"], after.revision, "{logged}");
    p.signal("-TERM").await;
    assert_eq!(p.wait().await.code(), Some(0));
}

#[tokio::test]
async fn sigterm_right_after_startup_is_still_graceful() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    for _ in 0..3 {
        let p = Binary::serve_with_env(
            &["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()],
            &[],
        )
        .await;
        p.signal("-TERM").await;
        assert_eq!(p.wait().await.code(), Some(0));
    }
}

#[tokio::test]
async fn one_database_serves_one_process() {
    let app = App::start().await;
    let mut config = test_config();
    config.db = Some(app.db_path());
    let second = tether::server::Server::open(config.clone())
        .await
        .err()
        .expect("refused while in use");
    assert!(second.to_string().contains("in use"), "{second}");
    app.stop().await.unwrap();
    // Free again once the first has stopped.
    let server = tether::server::Server::open(config)
        .await
        .expect("opens after the first stopped");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    server.serve(listener, async {}).await.unwrap();
}

#[tokio::test]
async fn settings_that_would_spin_or_flood_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for tweak in [
        (|c: &mut tether::Config| c.bookmark_interval = Duration::ZERO) as fn(&mut tether::Config),
        |c| c.prune_interval = Duration::ZERO,
        |c| c.watch_ring = 0,
        |c| c.event_retention = Duration::from_secs(u64::MAX / 4),
    ] {
        let mut config = test_config();
        config.db = Some(dir.path().join("t.db"));
        tweak(&mut config);
        let err = tether::server::Server::open(config)
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, tether::Error::InvalidArgument { .. }),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_config_file_sets_what_flags_and_the_environment_leave_unset() {
    let dir = tempfile::tempdir().unwrap();
    let (from_file, from_env) = (dir.path().join("file.db"), dir.path().join("env.db"));
    let file = dir.path().join("tether.yaml");
    std::fs::write(
        &file,
        format!(
            "# settings of tether serve\nlisten: 127.0.0.1:1\ndb: {}\ndisable-monitor: true\n\
             probe-interval: 45s\negress-allow: [127.0.0.0/8, \"::1\"]\n",
            from_file.display()
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    // The flag wins over the file's listen; the file gives the database.
    let p = Binary::serve(&["--config", file, "--listen", "127.0.0.1:0"]).await;
    assert_ne!(p.addr().port(), 1, "--listen on the command line wins");
    let mut c = p.client().await;
    create(&mut c, conn("http", "")).await;
    p.signal("-TERM").await;
    assert_eq!(p.wait().await.code(), Some(0));
    assert!(from_file.exists(), "the database is where the file says");
    // A variable wins over the file too; TETHER_CONFIG names the file.
    let p = Binary::serve_with_env(
        &["--listen", "127.0.0.1:0"],
        &[
            ("TETHER_CONFIG", file),
            ("TETHER_DB", from_env.to_str().unwrap()),
        ],
    )
    .await;
    let mut c = p.client().await;
    create(&mut c, conn("http", "")).await;
    p.signal("-TERM").await;
    assert_eq!(p.wait().await.code(), Some(0));
    assert!(from_env.exists(), "TETHER_DB wins over the file");
}

#[tokio::test]
async fn a_config_file_with_a_mistake_is_refused_before_anything_is_created() {
    for (content, said) in [
        (
            "listen: 127.0.0.1:0\nlisen: 127.0.0.1:0\n",
            r#""lisen" is not a setting"#,
        ),
        (
            "listen: [127.0.0.1:0, 127.0.0.1:0]\n",
            "listen: one value, not a list",
        ),
        (
            "disable-monitor: yes please\n",
            "disable-monitor: true or false",
        ),
        ("probe-interval: soon\n", "--probe-interval"),
        ("- listen\n", "not a map of settings"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tether.yaml");
        std::fs::write(&file, content).unwrap();
        let db = dir.path().join("t.db");
        let (f, d) = (file.to_str().unwrap(), db.to_str().unwrap());
        let out = Binary::run(&["serve", "--config", f, "--db", d]).await;
        assert_eq!(out.status.code(), Some(2), "{content}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(said), "{content}: {stderr}");
        assert!(!db.exists(), "{content}: nothing created");
    }
}

#[tokio::test]
async fn the_readme_config_file_names_only_settings_of_serve() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("# /etc/tether/tether.yaml\n")
        .expect("the README's example config file");
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let help = Binary::run(&["serve", "--help"]).await;
    let help = String::from_utf8(help.stdout).unwrap();
    let keys: Vec<&str> = block
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, _)| k))
        .filter(|k| !k.starts_with('#'))
        .collect();
    assert!(keys.len() >= 5, "{keys:?}");
    for key in keys {
        assert!(
            help.contains(&format!("--{key} ")),
            "{key} is no flag of serve"
        );
    }
}
