//! Authentication as an operator sets it up with the binary: `tether token`
//! makes the token and its access-file entry, refused calls reach the audit
//! log without the token, and SIGHUP brings in a new access file.

use crate::common::*;
use tether::pb::tether::v1 as pb;
use tonic::Code;

/// `tether token ARGS`: the token (line 1) and its access-file entry (line 2).
async fn make_token(args: &[&str]) -> (String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("token")
        .args(args)
        .output()
        .await
        .expect("run tether token");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let token = lines.next().expect("a token").to_owned();
    let entry = lines.next().expect("an entry").to_owned();
    assert!(!entry.contains(&token), "the entry holds only a digest");
    (token, entry)
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

fn new_connection(token: &str) -> tonic::Request<pb::CreateConnectionRequest> {
    with_token(
        pb::CreateConnectionRequest {
            connection: Some(conn("http", "")),
            ..Default::default()
        },
        token,
    )
}

#[tokio::test]
async fn refused_calls_are_audited_without_the_token_and_sighup_reloads_access() {
    let dir = tempfile::tempdir().unwrap();
    let (viewer, entry) = make_token(&["--principal", "vic", "--role", "viewer"]).await;
    let access = dir.path().join("access.yaml");
    std::fs::write(&access, format!("tokens:\n{entry}\n")).unwrap();
    let db = dir.path().join("t.db");
    let mut p = Binary::serve(&[
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
        "--auth-file",
        access.to_str().unwrap(),
    ])
    .await;
    let mut c = p.client().await;

    // The viewer reads; its write is refused and audited under its name.
    c.list_connections(with_token(pb::ListConnectionsRequest::default(), &viewer))
        .await
        .expect("a viewer lists");
    let denied = c
        .create_connection(new_connection(&viewer))
        .await
        .expect_err("a viewer may not create");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let line = p.logged("call refused").await;
    for part in [
        "tether::audit",
        "principal=vic",
        "/tether.v1.ConnectionService/CreateConnection",
        "peer=127.0.0.1:",
        "PermissionDenied",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert!(!line.contains(&viewer), "no token in {line}");

    // A token nobody issued: refused, audited without it.
    let forged = "tether_forged-token-0123456789";
    let unknown = c
        .list_connections(with_token(pb::ListConnectionsRequest::default(), forged))
        .await
        .expect_err("an unknown token");
    assert_eq!(unknown.code(), Code::Unauthenticated);
    let line = p.logged("call refused").await;
    assert!(
        line.contains("principal=-") && line.contains("Unauthenticated"),
        "{line}"
    );
    assert!(!line.contains(forged), "no token in {line}");

    // A new operator, brought in by SIGHUP; the viewer keeps working.
    let (operator, op_entry) = make_token(&["--principal", "olga", "--role", "operator"]).await;
    std::fs::write(&access, format!("tokens:\n{entry}\n{op_entry}\n")).unwrap();
    p.signal("-HUP").await;
    p.logged("access file reloaded").await;
    let made = c
        .create_connection(new_connection(&operator))
        .await
        .expect("the new operator creates")
        .into_inner();
    assert_eq!(made.owner, "olga");
    c.list_connections(with_token(pb::ListConnectionsRequest::default(), &viewer))
        .await
        .expect("the viewer still lists");

    // A bad edit keeps the file in force.
    std::fs::write(&access, "tokens: [{principal: tether, sha256: nope}]\n").unwrap();
    p.signal("-HUP").await;
    p.logged("access file not reloaded").await;
    c.list_connections(with_token(pb::ListConnectionsRequest::default(), &operator))
        .await
        .expect("the previous file is still in force");

    // A flood of refused calls: the audit log writes a bounded number of
    // lines, and a later one says how many it held back.
    let flood = {
        let c = c.clone();
        tokio::spawn(async move {
            for _ in 0..2000 {
                let mut c = c.clone();
                let _ = c
                    .list_connections(with_token(pb::ListConnectionsRequest::default(), "nope"))
                    .await;
            }
        })
    };
    let held_back = loop {
        let line = p.logged("call refused").await;
        let n: u64 = line
            .split("held_back=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("every audit line says how many it held back");
        if n > 0 {
            break n;
        }
    };
    assert!(held_back > 0);
    flood.abort();
    p.stop().await;
}

/// Starts `tether serve ARGS`, which must refuse to start; what it logged.
async fn refused_at_start(args: &[&str]) -> String {
    let (child, mut stderr) = Binary::start(args);
    let out = child.wait_with_output().await.unwrap();
    assert_ne!(out.status.code(), Some(0), "it started");
    let mut log = String::new();
    while let Some(line) = stderr.recv().await {
        log.push_str(&line);
    }
    log
}

#[tokio::test]
async fn a_bad_access_file_refuses_start_and_token_refuses_reserved_names() {
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("access.yaml");
    std::fs::write(&access, "tokens: [{principal: tether, sha256: x}]\n").unwrap();
    let db = dir.path().join("t.db");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
        "--auth-file",
        access.to_str().unwrap(),
    ];
    let log = refused_at_start(&args).await;
    assert!(
        log.contains("access.yaml") && log.contains("tokens[0]"),
        "{log}"
    );

    // One that others may write is refused too: they could grant themselves anything.
    std::fs::write(&access, "tokens: []\n").unwrap();
    std::fs::set_permissions(&access, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let log = refused_at_start(&args).await;
    assert!(log.contains("chmod go-w"), "{log}");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["token", "--principal", "tether", "--role", "admin"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reserved"));
}
