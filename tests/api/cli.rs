//! The client commands of the binary (`tether get|list|create|...`) against a
//! real server: what they print in each output format, how they report a
//! refusal, their exit codes, TLS with a token, and a watch that resumes.

use crate::common::*;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// What one run of the CLI left behind.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}{}", self.stdout, self.stderr))
    }

    /// Asserts a clean exit; its stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "stderr: {}", self.stderr);
        &self.stdout
    }
}

/// The CLI with a clean environment (no TETHER_* from the caller).
fn command(endpoint: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.args(args)
        .env_clear()
        .env("TETHER_ENDPOINT", endpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn run_in(cmd: &mut tokio::process::Command) -> Ran {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the CLI finishes within 60 s")
        .expect("the CLI runs");
    Ran {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    }
}

async fn cli(app: &App, args: &[&str]) -> Ran {
    run_in(&mut command(&app.channel_addr().to_string(), args)).await
}

#[tokio::test]
async fn create_transition_and_get_print_a_table_json_and_yaml() {
    let app = App::start().await;
    let port = OpenPort::new().await;
    let url = port.url();

    let table = cli(
        &app,
        &["create", "--kind", "tcp", "--url", &url, "--name", "db"],
    )
    .await;
    let lines: Vec<&str> = table.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["ID", "KIND", "NAME", "STATE", "REVISION", "URL"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[1..4], ["tcp", "db", "DISCOVERED"]);
    assert_eq!(row[5], url);
    let id = row[0].to_owned();

    // State names in any case, with or without their prefix.
    let moved = cli(
        &app,
        &[
            "transition",
            &id,
            "registered",
            "-o",
            "json",
            "--reason",
            "ready",
        ],
    )
    .await;
    let json = moved.json();
    // The proto3 JSON mapping: lowerCamelCase names, enum names, int64 as strings.
    assert_eq!(json["id"], id.as_str());
    assert_eq!(json["state"], "CONNECTION_STATE_REGISTERED");
    assert_eq!(json["stateTrigger"], "TRIGGER_USER");
    assert_eq!(json["revision"], "2");
    assert_eq!(json["stateReason"], "ready");
    assert!(
        json["createTime"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );
    assert!(json.get("create_time").is_none());

    let yaml = cli(&app, &["get", &id, "-o", "yaml"]).await;
    let from_yaml: serde_json::Value = serde_norway::from_str(yaml.ok()).expect("YAML");
    assert_eq!(from_yaml, json, "YAML and JSON print the same mapping");

    let again = cli(
        &app,
        &[
            "transition",
            &id,
            "CONNECTION_STATE_MAINTENANCE",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(again.json()["state"], "CONNECTION_STATE_MAINTENANCE");
    let back = cli(&app, &["transition", &id, "Ignored", "-o", "json"]).await;
    assert_eq!(back.json()["state"], "CONNECTION_STATE_IGNORED");
}

#[tokio::test]
async fn a_refused_move_names_its_reason_and_the_allowed_targets() {
    let app = App::start().await;
    let created = cli(
        &app,
        &[
            "create",
            "--kind",
            "tcp",
            "--url",
            "tcp://127.0.0.1:9",
            "-o",
            "json",
        ],
    )
    .await;
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let refused = cli(&app, &["transition", &id, "maintenance"]).await;
    assert_eq!(
        refused.code, 4,
        "FAILED_PRECONDITION is a conflict: {}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    let stderr = &refused.stderr;
    assert!(
        stderr.starts_with("error: FAILED_PRECONDITION: "),
        "{stderr}"
    );
    assert!(
        stderr.contains("\n  reason: INVALID_TRANSITION\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\n  allowed targets: REGISTERED, IGNORED, DELETED\n"),
        "{stderr}"
    );
    assert!(stderr.contains("\n  from: DISCOVERED\n"), "{stderr}");
}

#[tokio::test]
async fn exit_codes_tell_the_classes_of_failure_apart() {
    let app = App::start().await;
    let created = cli(
        &app,
        &[
            "create",
            "--kind",
            "tcp",
            "--url",
            "tcp://127.0.0.1:9",
            "-o",
            "json",
        ],
    )
    .await;
    let id = created.json()["id"].as_str().unwrap().to_owned();

    let missing = cli(&app, &["get", "01234567-89ab-7def-8123-456789abcdef"]).await;
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("reason: CONNECTION_NOT_FOUND"),
        "{}",
        missing.stderr
    );

    let stale = cli(&app, &["update", &id, "--name", "x", "--etag", "r999"]).await;
    assert_eq!(stale.code, 4, "{}", stale.stderr);
    assert!(
        stale.stderr.contains("reason: ETAG_MISMATCH"),
        "{}",
        stale.stderr
    );

    let bad_id = cli(&app, &["get", "not-a-uuid"]).await;
    assert_eq!(bad_id.code, 2, "INVALID_ARGUMENT: {}", bad_id.stderr);

    let bad_state = cli(&app, &["transition", &id, "sideways"]).await;
    assert_eq!(bad_state.code, 2, "{}", bad_state.stderr);
    assert!(
        bad_state
            .stderr
            .contains("use one of DISCOVERED, REGISTERED"),
        "{}",
        bad_state.stderr
    );

    let nothing = cli(&app, &["update", &id]).await;
    assert_eq!(nothing.code, 2, "{}", nothing.stderr);
    assert!(
        nothing.stderr.contains("nothing to change"),
        "{}",
        nothing.stderr
    );

    // Nothing listens on a closed port: worth retrying later.
    let closed = ClosedPort::new();
    let addr = closed.addr.to_string();
    let down = run_in(&mut command(&addr, &["get", &id])).await;
    assert_eq!(down.code, 6, "{}", down.stderr);
    assert!(
        down.stderr
            .starts_with(&format!("error: cannot connect to {addr}")),
        "{}",
        down.stderr
    );
}

#[tokio::test]
async fn list_count_update_and_events_filter_and_page() {
    let app = App::start().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let kind = if i < 5 { "tcp" } else { "http" };
        let url = format!("{kind}://127.0.0.1:{}", 1000 + i);
        let c = cli(
            &app,
            &["create", "--kind", kind, "--url", &url, "-o", "json"],
        )
        .await;
        ids.push(c.json()["id"].as_str().unwrap().to_owned());
    }
    cli(&app, &["transition", &ids[0], "ignored"]).await.ok();

    // Every page by default; --limit stops early.
    let all = cli(&app, &["list", "--kind", "tcp", "-o", "json"])
        .await
        .json();
    assert_eq!(all["connections"].as_array().unwrap().len(), 5);
    assert!(all.get("nextPageToken").is_none(), "{all}");
    let two = cli(&app, &["list", "--limit", "2", "-o", "json"])
        .await
        .json();
    assert_eq!(two["connections"].as_array().unwrap().len(), 2);
    let ignored = cli(&app, &["list", "--state", "IGNORED"]).await;
    let rows: Vec<&str> = ignored.ok().lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].starts_with(&ids[0]), "{rows:?}");

    let counts = cli(&app, &["count", "--kind", "tcp"]).await;
    let lines: Vec<Vec<&str>> = counts
        .ok()
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(lines.contains(&vec!["DISCOVERED", "4"]), "{lines:?}");
    assert!(lines.contains(&vec!["IGNORED", "1"]), "{lines:?}");
    assert_eq!(lines.last().unwrap(), &vec!["TOTAL", "5"]);

    let updated = cli(
        &app,
        &[
            "update",
            &ids[1],
            "--label",
            "team=db",
            "--metadata",
            r#"{"region": "eu"}"#,
            "-o",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(updated["labels"]["team"], "db");
    assert_eq!(updated["metadata"]["region"], "eu");
    let labelled = cli(&app, &["list", "--label", "team=db", "-o", "json"])
        .await
        .json();
    let found: Vec<&str> = labelled["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(found, [ids[1].as_str()]);

    let history = cli(&app, &["events", &ids[1], "-o", "json"]).await.json();
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["EVENT_TYPE_CREATED", "EVENT_TYPE_UPDATED"]);
    let everything = cli(&app, &["events", "--after", "3", "-o", "json"])
        .await
        .json();
    let revisions: Vec<&str> = everything["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["revision"].as_str().unwrap())
        .collect();
    assert_eq!(revisions, ["4", "5", "6", "7", "8", "9"]);

    let deleted = cli(&app, &["delete", &ids[2], "-o", "json"]).await.json();
    assert_eq!(deleted["state"], "CONNECTION_STATE_DELETED");
}

#[tokio::test]
async fn create_reads_a_connection_from_a_yaml_file_or_stdin() {
    let app = App::start().await;
    let yaml = "kind: tcp\nurl: tcp://127.0.0.1:9\nname: from yaml\nlabels: {env: test}\n";
    let mut cmd = command(
        &app.channel_addr().to_string(),
        &["create", "-f", "-", "--name", "flag wins", "-o", "json"],
    );
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["name"], "flag wins");
    assert_eq!(c["labels"]["env"], "test");
    assert_eq!(c["url"], "tcp://127.0.0.1:9");

    let bad = app.dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: tcp\nurl: [not, a, string]\n").unwrap();
    let refused = cli(&app, &["create", "-f", bad.to_str().unwrap()]).await;
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("bad.yaml"), "{}", refused.stderr);
}

#[tokio::test]
async fn lifecycle_definitions_and_credentials() {
    let app = App::start().await;
    let lifecycle = cli(&app, &["lifecycle"]).await;
    let discovered = lifecycle
        .ok()
        .lines()
        .find(|l| l.starts_with("DISCOVERED "))
        .expect("a DISCOVERED row");
    let cells: Vec<&str> = discovered.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "DISCOVERED",
            "REGISTERED*,IGNORED,DELETED",
            "REGISTERED,NOT_FOUND,DISCONNECTED",
            "no"
        ]
    );
    let json = cli(&app, &["lifecycle", "-o", "json"]).await.json();
    assert_eq!(json["states"].as_array().unwrap().len(), 8);

    let tcp = cli(&app, &["definitions", "tcp", "-o", "json"])
        .await
        .json();
    assert_eq!(tcp["kind"], "tcp");
    assert_eq!(tcp["check"]["type"], "tcp");
    let missing = cli(&app, &["definitions", "no-such-kind"]).await;
    assert_eq!(missing.code, 3, "{}", missing.stderr);

    let secret = app.dir.path().join("secret.json");
    std::fs::write(&secret, r#"{"token": "s3cret-value"}"#).unwrap();
    let created = cli(
        &app,
        &[
            "credentials",
            "create",
            "ci-token",
            "--type",
            "http",
            "--secret-file",
            secret.to_str().unwrap(),
            "--allowed-host",
            "localhost",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    let cred = created["id"].as_str().expect("an id").to_owned();
    assert_eq!(created["allowedHosts"], serde_json::json!(["localhost"]));
    let listed = cli(&app, &["credentials", "list"]).await;
    assert!(listed.ok().contains(&cred), "{}", listed.stdout);
    assert!(!listed.stdout.contains("s3cret-value"));
    cli(&app, &["credentials", "delete", &cred]).await.ok();
    let gone = cli(&app, &["credentials", "list", "-o", "json"])
        .await
        .json();
    assert!(gone.get("credentials").is_none(), "{gone}");
}

#[tokio::test]
async fn the_cli_speaks_tls_and_sends_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cli test ca");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let access = dir.path().join("access.yaml");
    std::fs::write(
        &access,
        access_file(&[Grant {
            principal: "ops",
            token: "ops-token",
            roles: &["operator"],
            owners: &[],
        }]),
    )
    .unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let token_file = dir.path().join("token.txt");
    std::fs::write(&token_file, "ops-token\n  - {principal: ops}\n").unwrap();
    let app = App::start_tls(
        move |c| {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
            c.auth_file = Some(access);
        },
        client_tls(&ca, None),
    )
    .await;
    let endpoint = format!("localhost:{}", app.channel_addr().port());
    let ca_arg = ca_file.to_str().unwrap();

    let mut with_token = command(
        &endpoint,
        &[
            "create",
            "--kind",
            "tcp",
            "--url",
            "tcp://127.0.0.1:9",
            "--tls-ca",
            ca_arg,
            "-o",
            "json",
        ],
    );
    with_token.env("TETHER_TOKEN", "ops-token");
    let created = run_in(&mut with_token).await;
    assert_eq!(created.json()["owner"], "ops");

    let from_file = run_in(&mut command(
        &format!("https://{endpoint}"),
        &[
            "list",
            "--tls-ca",
            ca_arg,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    ))
    .await;
    assert_eq!(from_file.ok().lines().count(), 2, "{}", from_file.stdout);

    let anonymous = run_in(&mut command(&endpoint, &["list", "--tls-ca", ca_arg])).await;
    assert_eq!(anonymous.code, 5, "{}", anonymous.stderr);
    assert!(
        anonymous.stderr.starts_with("error: UNAUTHENTICATED"),
        "{}",
        anonymous.stderr
    );

    let plaintext = run_in(&mut command(&endpoint, &["list", "--token", "ops-token"])).await;
    assert_ne!(
        plaintext.code, 0,
        "a plaintext client is refused by a TLS server"
    );
}

/// Reads watch lines (JSON, one per line) from `lines` until one matches.
async fn next_matching(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: &mut Vec<serde_json::Value>,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the watch goes on");
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            seen.push(v.clone());
            if wanted(&v) {
                return v;
            }
        }
    })
    .await
    .expect("the line arrives within 30 s")
}

fn is_type(v: &serde_json::Value, t: &str) -> bool {
    v["type"] == format!("WATCH_EVENT_TYPE_{t}")
}

#[tokio::test]
async fn watch_resumes_after_a_revision_and_stops_after_a_limit() {
    let app = App::start().await;
    let mut ids = Vec::new();
    for port in [1, 2, 3] {
        let url = format!("tcp://127.0.0.1:{port}");
        let c = cli(
            &app,
            &["create", "--kind", "tcp", "--url", &url, "-o", "json"],
        )
        .await;
        ids.push(c.json()["id"].as_str().unwrap().to_owned());
    }
    // After revision 1: the creates at 2 and 3, no snapshot.
    let resumed = cli(&app, &["watch", "--rev", "1", "--limit", "2", "-o", "json"]).await;
    let got: Vec<serde_json::Value> = resumed
        .ok()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(&str, &str)> = got
        .iter()
        .map(|v| {
            (
                v["revision"].as_str().unwrap(),
                v["connection"]["id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("2", ids[1].as_str()), ("3", ids[2].as_str())]);
    assert!(got.iter().all(|v| is_type(v, "ADDED")), "{got:?}");

    let table = cli(&app, &["watch", "--rev", "2", "--limit", "1"]).await;
    let lines: Vec<&str> = table.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("TYPE "), "{lines:?}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..4], ["ADDED", "3", ids[2].as_str(), "DISCOVERED"]);
}

#[tokio::test]
async fn watch_reconnects_and_resumes_when_the_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let server = Binary::serve_db(&db, &[]).await;
    let addr = server.addr().to_string();
    let mut client = server.client().await;
    let first = create(&mut client, conn("tcp", "tcp://127.0.0.1:1")).await;

    let mut watch = command(&addr, &["watch", "-o", "json"]).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let snapshot = next_matching(&mut lines, &mut seen, |v| is_type(v, "ADDED")).await;
    assert_eq!(snapshot["connection"]["id"], first.id.as_str());
    next_matching(&mut lines, &mut seen, |v| is_type(v, "SYNCED")).await;
    let second = create(&mut client, conn("tcp", "tcp://127.0.0.1:2")).await;
    next_matching(&mut lines, &mut seen, |v| {
        v["connection"]["id"] == second.id.as_str()
    })
    .await;

    // The server goes away and comes back on the same port and database:
    // the watch picks up after the last revision it printed, with nothing
    // twice and nothing missed.
    server.stop().await;
    let db_arg = db.to_str().unwrap();
    let server = Binary::serve(&["--listen", &addr, "--db", db_arg, "--disable-monitor"]).await;
    let mut client = server.client().await;
    let third = create(&mut client, conn("tcp", "tcp://127.0.0.1:3")).await;
    next_matching(&mut lines, &mut seen, |v| {
        v["connection"]["id"] == third.id.as_str()
    })
    .await;
    let changes: Vec<&str> = seen
        .iter()
        .filter(|v| !is_type(v, "SYNCED"))
        .map(|v| v["connection"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        changes,
        [first.id.as_str(), second.id.as_str(), third.id.as_str()]
    );
    watch.kill().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn completion_scripts_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let ran = run_in(&mut command("127.0.0.1:1", &["completion", shell])).await;
        let script = ran.ok();
        for sub in ["transition", "watch", "credentials", "lifecycle"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let bad = run_in(&mut command("127.0.0.1:1", &["completion", "tcsh"])).await;
    assert_eq!(bad.code, 2);
}

#[tokio::test]
async fn version_names_the_client_the_server_and_the_caller() {
    let app = App::start().await;
    let table = cli(&app, &["version"]).await;
    let lines: Vec<&str> = table.ok().lines().collect();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(lines[0], format!("client: {version}"));
    assert_eq!(lines[1], format!("server: {version}"));
    assert_eq!(lines[3], "you are: anonymous (admin)");
    let json = cli(&app, &["version", "-o", "json"]).await.json();
    assert_eq!(json["version"], version);
    assert_eq!(json["roles"], serde_json::json!(["admin"]));
    let started = json["startTime"].as_str().expect("a start time");
    assert!(
        lines[2].starts_with("serving since: ") && started.starts_with(&lines[2][15..34]),
        "{started} vs {}",
        lines[2]
    );
}

#[tokio::test]
async fn output_id_prints_only_ids_for_scripts() {
    let app = App::start().await;
    let created = cli(
        &app,
        &[
            "create",
            "--kind",
            "tcp",
            "--url",
            "tcp://127.0.0.1:9",
            "-o",
            "id",
        ],
    )
    .await;
    let id = created.ok().trim().to_owned();
    assert_eq!(created.stdout, format!("{id}\n"));
    let got = cli(&app, &["get", &id, "-o", "json"]).await.json();
    assert_eq!(got["id"], id.as_str());
    let other = cli(
        &app,
        &[
            "create",
            "--kind",
            "tcp",
            "--url",
            "tcp://127.0.0.1:8",
            "-o",
            "id",
        ],
    )
    .await;
    let listed = cli(&app, &["list", "-o", "id"]).await;
    let ids: Vec<&str> = listed.ok().lines().collect();
    assert_eq!(ids, [id.as_str(), other.ok().trim()]);
    let refused = cli(&app, &["count", "-o", "id"]).await;
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stdout.is_empty());
}
