//! Credentials: write-only secrets, paging, schema validation, deletion
//! rules, encryption at rest, and checks that use them.

use crate::common::*;
use base64::Engine as _;
use std::collections::HashSet;
use tether::pb::tether::v1 as pb;
use tether::pb::tether::v1::credential_service_client::CredentialServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Creds = CredentialServiceClient<Channel>;

fn credentials(app: &App) -> Creds {
    CredentialServiceClient::new(app.channel.clone())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn create_credential(
    creds: &mut Creds,
    kind: &str,
    name: &str,
    secret: serde_json::Value,
) -> Result<pb::Credential, tonic::Status> {
    creds
        .create_credential(pb::CreateCredentialRequest {
            name: name.into(),
            r#type: kind.into(),
            secret: Some(json_struct(secret)),
            owner: "alice".into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Every credential, page by page.
async fn all_credentials(creds: &mut Creds) -> Vec<pb::Credential> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = creds
            .list_credentials(pb::ListCredentialsRequest {
                page_size: 1000,
                page_token: token,
            })
            .await
            .expect("list credentials")
            .into_inner();
        out.extend(page.credentials);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

async fn credential_ids(creds: &mut Creds) -> HashSet<String> {
    all_credentials(creds)
        .await
        .into_iter()
        .map(|c| c.id)
        .collect()
}

async fn delete_credential(creds: &mut Creds, id: &str) -> Result<(), tonic::Status> {
    creds
        .delete_credential(pb::DeleteCredentialRequest { id: id.into() })
        .await
        .map(|_| ())
}

fn with_credential(kind: &str, url: &str, credential_id: &str) -> pb::Connection {
    pb::Connection {
        credential_id: credential_id.into(),
        ..conn(kind, url)
    }
}

async fn delete(c: &mut Client, id: &str) -> pb::Connection {
    c.delete_connection(pb::DeleteConnectionRequest {
        id: id.into(),
        ..Default::default()
    })
    .await
    .expect("delete")
    .into_inner()
}

/// The status as a client could print it, details included.
fn everything_in(status: &tonic::Status) -> String {
    let details = status.get_error_details();
    format!(
        "{status:?} {:?} {:?}",
        details.error_info(),
        details.bad_request()
    )
}

#[tokio::test]
async fn create_credential_returns_everything_but_the_secret() {
    let app = App::start().await;
    let mut creds = credentials(&app);
    let secret = unique("s3cret-token");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let made = create_credential(
        &mut creds,
        "prometheus",
        "prom reader",
        serde_json::json!({"token": secret}),
    )
    .await
    .expect("create credential");
    assert!(uuid::Uuid::parse_str(&made.id).is_ok(), "{}", made.id);
    assert_eq!(
        (
            made.name.as_str(),
            made.r#type.as_str(),
            made.owner.as_str()
        ),
        ("prom reader", "prometheus", "alice")
    );
    let t = made.create_time.expect("create_time");
    assert!(
        (before - 1..=before + 60).contains(&t.seconds),
        "{t:?} is not now"
    );
    assert!(!format!("{made:?}").contains(&secret));

    // Listing shows the same record, still without the secret.
    let listed = all_credentials(&mut creds).await;
    assert_eq!(listed, std::slice::from_ref(&made));
    assert!(!format!("{listed:?}").contains(&secret));

    // Nor does a connection that uses it, or its history.
    let mut c = app.client.clone();
    let used = create(
        &mut c,
        with_credential("prometheus", "http://prom.example/", &made.id),
    )
    .await;
    assert_eq!(used.credential_id, made.id);
    assert!(!format!("{used:?}").contains(&secret));
    assert!(!format!("{:?}", events_of(&mut c, &used.id).await).contains(&secret));
}

#[tokio::test]
async fn create_credential_refuses_malformed_requests() {
    let app = App::start().await;
    let mut creds = credentials(&app);
    let token = serde_json::json!({"token": "x"});
    let r = create_credential(&mut creds, "prometheus", "", token.clone()).await;
    assert_eq!(invalid_field(r), "name");
    let r = create_credential(&mut creds, "", "n", token.clone()).await;
    assert_eq!(invalid_field(r), "type");
    let r = creds
        .create_credential(pb::CreateCredentialRequest {
            name: "n".into(),
            r#type: "prometheus".into(),
            secret: None,
            owner: String::new(),
        })
        .await;
    assert_eq!(invalid_field(r), "secret");
    // A credential is for a kind the server accepts.
    let r = create_credential(&mut creds, "no-such-kind", "n", token.clone()).await;
    assert_error(r, Code::InvalidArgument, "UNKNOWN_KIND");
    assert!(all_credentials(&mut creds).await.is_empty());
}

#[tokio::test]
async fn a_secret_that_breaks_the_credential_schema_is_refused_without_being_repeated() {
    let app = App::start().await;
    let mut creds = credentials(&app);
    let secret = unique("leaky-value");
    let cases = [
        // Not a property prometheus credentials have (additionalProperties: false).
        (
            "prometheus",
            serde_json::json!({"token": secret, "extra": secret}),
        ),
        // A certificate without its key matches neither branch of the oneOf.
        (
            "kubernetes",
            serde_json::json!({"client_certificate": secret}),
        ),
        // Meshery requires a token.
        ("meshery", serde_json::json!({"username": secret})),
        // Wrong type.
        ("grafana", serde_json::json!({"token": [secret]})),
        // Empty token (minLength 1) beside a secret password.
        (
            "grafana",
            serde_json::json!({"token": "", "username": "u", "password": secret}),
        ),
    ];
    for (kind, bad) in cases {
        let r = create_credential(&mut creds, kind, "bad", bad.clone()).await;
        let status = r.expect_err("refused");
        let (code, reason, meta) = error_info(&status);
        assert_eq!(
            (code, reason.as_str()),
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            "{kind} {bad}"
        );
        assert!(meta["field"].starts_with("secret"), "{meta:?}");
        let shown = everything_in(&status);
        assert!(!shown.contains(&secret), "{kind}: {shown}");
    }
    assert!(all_credentials(&mut creds).await.is_empty());

    // Each kind's valid shapes are accepted.
    for (kind, good) in [
        ("prometheus", serde_json::json!({"token": "t"})),
        (
            "prometheus",
            serde_json::json!({"username": "u", "password": "p"}),
        ),
        (
            "kubernetes",
            serde_json::json!({"client_certificate": "c", "client_key": "k"}),
        ),
        ("meshery", serde_json::json!({"token": "t"})),
        ("http", serde_json::json!({"anything": {"at": "all"}})),
    ] {
        create_credential(&mut creds, kind, "good", good.clone())
            .await
            .unwrap_or_else(|e| panic!("{kind} {good}: {e:?}"));
    }
}

#[tokio::test]
async fn list_credentials_pages_without_duplicates() {
    let app = App::start().await;
    let mut creds = credentials(&app);
    let mut made = Vec::new();
    for i in 0..5 {
        let c = create_credential(
            &mut creds,
            "http",
            &format!("cred {i}"),
            serde_json::json!({"token": format!("t{i}")}),
        )
        .await
        .unwrap();
        made.push(c);
    }
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = creds
            .list_credentials(pb::ListCredentialsRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.credentials.clone());
        assert!(pages.len() <= 3, "5 credentials in pages of 2 take 3 pages");
        if page.next_page_token.is_empty() {
            break;
        }
        assert_ne!(page.next_page_token, token);
        token = page.next_page_token;
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 2, 1]);
    let seen: Vec<pb::Credential> = pages.into_iter().flatten().collect();
    let ids: HashSet<&str> = seen.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids.len(), 5, "no duplicates");
    assert_eq!(seen, made, "every credential, in creation order");

    let bad = creds
        .list_credentials(pb::ListCredentialsRequest {
            page_size: 2,
            page_token: "not-a-token".into(),
        })
        .await;
    assert_eq!(invalid_field(bad), "page_token");
    let bad = creds
        .list_credentials(pb::ListCredentialsRequest {
            page_size: -1,
            page_token: String::new(),
        })
        .await;
    assert_eq!(invalid_field(bad), "page_size");
}

#[tokio::test]
async fn delete_credential_refuses_one_in_use_and_unknown_ids() {
    let app = App::start().await;
    let mut creds = credentials(&app);
    let mut c = app.client.clone();
    let cred = bearer_credential(&app, "grafana", "tok").await;
    let user = create(
        &mut c,
        with_credential("grafana", "http://grafana.example/", &cred),
    )
    .await;
    let meta = assert_error(
        delete_credential(&mut creds, &cred).await,
        Code::FailedPrecondition,
        "CREDENTIAL_IN_USE",
    );
    assert_eq!(
        (meta["id"].as_str(), meta["connection_id"].as_str()),
        (cred.as_str(), user.id.as_str())
    );
    assert!(credential_ids(&mut creds).await.contains(&cred));

    // IGNORED is still live: still in use.
    transition(&mut c, &user.id, S::Ignored).await.unwrap();
    assert_error(
        delete_credential(&mut creds, &cred).await,
        Code::FailedPrecondition,
        "CREDENTIAL_IN_USE",
    );

    let missing = uuid::Uuid::new_v4().to_string();
    let meta = assert_error(
        delete_credential(&mut creds, &missing).await,
        Code::NotFound,
        "CREDENTIAL_NOT_FOUND",
    );
    assert_eq!(meta["id"], missing);
    assert_eq!(invalid_field(delete_credential(&mut creds, "").await), "id");

    // An unused one goes, once.
    let spare = bearer_credential(&app, "grafana", "spare").await;
    delete_credential(&mut creds, &spare).await.expect("unused");
    assert!(!credential_ids(&mut creds).await.contains(&spare));
    assert_error(
        delete_credential(&mut creds, &spare).await,
        Code::NotFound,
        "CREDENTIAL_NOT_FOUND",
    );
}

#[tokio::test]
async fn deleting_a_connection_removes_its_credential_unless_another_live_one_uses_it() {
    let app = App::start().await;
    let mut creds = credentials(&app);
    let mut c = app.client.clone();

    // Used by one connection: goes with it.
    let alone = bearer_credential(&app, "prometheus", "alone").await;
    let only = create(
        &mut c,
        with_credential("prometheus", "http://a.example/", &alone),
    )
    .await;
    delete(&mut c, &only.id).await;
    assert!(!credential_ids(&mut creds).await.contains(&alone));
    assert_error(
        delete_credential(&mut creds, &alone).await,
        Code::NotFound,
        "CREDENTIAL_NOT_FOUND",
    );

    // Shared by two: stays while the other lives, then goes with the last.
    let shared = bearer_credential(&app, "prometheus", "shared").await;
    let first = create(
        &mut c,
        with_credential("prometheus", "http://b.example/", &shared),
    )
    .await;
    let second = create(
        &mut c,
        with_credential("prometheus", "http://c.example/", &shared),
    )
    .await;
    delete(&mut c, &first.id).await;
    assert!(credential_ids(&mut creds).await.contains(&shared));
    assert_eq!(get(&mut c, &second.id).await.credential_id, shared);
    let meta = assert_error(
        delete_credential(&mut creds, &shared).await,
        Code::FailedPrecondition,
        "CREDENTIAL_IN_USE",
    );
    assert_eq!(meta["connection_id"], second.id);
    delete(&mut c, &second.id).await;
    assert!(!credential_ids(&mut creds).await.contains(&shared));

    // A connection without a credential leaves others alone.
    let bystander = bearer_credential(&app, "prometheus", "bystander").await;
    let plain = create(&mut c, conn("prometheus", "http://d.example/")).await;
    delete(&mut c, &plain.id).await;
    assert!(credential_ids(&mut creds).await.contains(&bystander));
}

#[tokio::test]
async fn a_connection_referring_to_a_missing_credential_is_refused() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let missing = uuid::Uuid::new_v4().to_string();
    let r = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(with_credential("http", "http://x.example/", &missing)),
            ..Default::default()
        })
        .await;
    let status = r.expect_err("refused");
    assert_eq!(
        invalid_field(Err::<(), _>(status.clone())),
        "connection.credential_id"
    );
    let total = c
        .count_connections(pb::CountConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .total;
    assert_eq!(total, 0);

    // The same through an update; the connection keeps what it had.
    let made = create(&mut c, conn("http", "http://y.example/")).await;
    let r = c
        .update_connection(pb::UpdateConnectionRequest {
            connection: Some(pb::Connection {
                id: made.id.clone(),
                credential_id: missing.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["credential_id".into()],
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(invalid_field(r), "connection.credential_id");
    assert_eq!(get(&mut c, &made.id).await, made);

    // A credential deleted before use is missing too.
    let mut creds = credentials(&app);
    let gone = bearer_credential(&app, "http", "gone").await;
    delete_credential(&mut creds, &gone).await.unwrap();
    let r = c
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(with_credential("http", "http://z.example/", &gone)),
            ..Default::default()
        })
        .await;
    assert_eq!(invalid_field(r), "connection.credential_id");
}

/// Every text and blob value of every table, as bytes.
fn every_stored_value(db: &std::path::Path) -> Vec<Vec<u8>> {
    use rusqlite::types::ValueRef;
    let db = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the database");
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut out = Vec::new();
    for table in tables {
        let mut stmt = db.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..n {
                match row.get_ref(i).unwrap() {
                    ValueRef::Text(b) | ValueRef::Blob(b) => out.push(b.to_vec()),
                    _ => {}
                }
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The raw bytes of the database file and its write-ahead log.
fn raw_database(db: &std::path::Path) -> Vec<u8> {
    let mut bytes = std::fs::read(db).expect("read the database file");
    let wal = db.with_file_name("tether.db-wal");
    if wal.exists() {
        bytes.extend(std::fs::read(wal).expect("read the wal"));
    }
    bytes
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest() {
    let app = App::start().await;
    let mut creds = credentials(&app);
    let name = unique("visible-name");
    let token = unique("plaintext-token");
    let password = unique("plaintext-password");
    let made = create_credential(
        &mut creds,
        "kubernetes",
        &name,
        serde_json::json!({"token": token}),
    )
    .await
    .unwrap();
    create_credential(
        &mut creds,
        "grafana",
        &unique("basic"),
        serde_json::json!({"username": "admin", "password": password}),
    )
    .await
    .unwrap();
    let mut c = app.client.clone();
    create(
        &mut c,
        with_credential("kubernetes", "https://k8s.example:6443/", &made.id),
    )
    .await;

    let values = every_stored_value(&app.db_path());
    // The scan sees the credential's row: its name is stored in the clear...
    assert!(
        values.iter().any(|v| contains(v, &name)),
        "the scan must see credentials"
    );
    // ...and its secret is not.
    for secret in [&token, &password] {
        assert!(
            !values.iter().any(|v| contains(v, secret)),
            "{secret} stored in plaintext"
        );
    }
    let raw = raw_database(&app.db_path());
    assert!(
        contains(&raw, &name),
        "the raw bytes hold the credential row"
    );
    for secret in [&token, &password] {
        assert!(
            !contains(&raw, secret),
            "{secret} in the database file or wal"
        );
    }

    // The key was created beside the database, readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let key = app.dir.path().join("tether.key");
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key_text = std::fs::read_to_string(&key).unwrap();
    assert!(!key_text.contains(&token));
    let db = app.db_path();
    let _keep = app.dir.clone();
    app.stop().await.unwrap();
    // Nothing left behind at shutdown either.
    let raw = raw_database(&db);
    assert!(contains(&raw, &name));
    assert!(!contains(&raw, &token) && !contains(&raw, &password));
}

#[tokio::test]
async fn a_database_copied_without_its_key_yields_no_secret() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let app = App::start_in(dir.clone(), |_| {}).await;
    let peer = RoutedHttp::requiring("Bearer copied-token").await;
    let cred = bearer_credential_trusting(&app, "http", "copied-token", peer.ca()).await;
    let mut c = app.client.clone();
    let made = create(&mut c, with_credential("http", &peer.url("/"), &cred)).await;
    app.stop().await.unwrap();

    // The same database in another folder, where a new key is created.
    let copy = std::sync::Arc::new(tempfile::tempdir().unwrap());
    for file in ["tether.db", "tether.db-wal"] {
        let from = dir.path().join(file);
        if from.exists() {
            std::fs::copy(&from, copy.path().join(file)).unwrap();
        }
    }
    // Without the key the copy does not even start: no new key is made for a
    // database that holds secrets, and another key is refused.
    let mut config = test_config();
    config.db = Some(copy.path().join("tether.db"));
    let err = tether::server::Server::open(config.clone())
        .await
        .err()
        .expect("no key, no start");
    assert!(err.to_string().contains("restore the key"), "{err}");
    assert!(
        !copy.path().join("tether.key").exists(),
        "no key was made up"
    );
    let other = tempfile::tempdir().unwrap();
    config.secret_key_file = Some(other.path().join("other.key"));
    std::fs::write(
        other.path().join("other.key"),
        base64::engine::general_purpose::STANDARD.encode([9u8; 32]),
    )
    .unwrap();
    let err = tether::server::Server::open(config)
        .await
        .err()
        .expect("a wrong key, no start");
    assert!(err.to_string().contains("does not open"), "{err}");
    assert!(
        peer.seen()
            .iter()
            .all(|r| r.authorization.as_deref() != Some("Bearer copied-token")),
        "the copy never sent the secret"
    );

    // With its own key the original still works.
    let app = App::start_in(dir, |_| {}).await;
    let mut c = app.client.clone();
    let registered = transition(&mut c, &made.id, S::Registered)
        .await
        .expect("the original key opens the secret");
    assert_eq!(registered.state, S::Registered as i32);
    assert_eq!(
        peer.seen().last().and_then(|r| r.authorization.clone()),
        Some("Bearer copied-token".into())
    );
}

#[tokio::test]
async fn checks_send_the_credential_and_never_show_it() {
    let app = App::start().await;
    let peer = RoutedHttp::requiring("Bearer good-token").await;
    let mut c = app.client.clone();

    let good = bearer_credential_trusting(&app, "http", "good-token", peer.ca()).await;
    let ok = create(&mut c, with_credential("http", &peer.url("/api"), &good)).await;
    let registered = transition(&mut c, &ok.id, S::Registered)
        .await
        .expect("the right token verifies");
    assert_eq!(registered.state, S::Registered as i32);
    assert_eq!(
        peer.seen(),
        [SeenRequest {
            path: "/api".into(),
            authorization: Some("Bearer good-token".into()),
        }]
    );
    assert!(!format!("{registered:?}").contains("good-token"));

    let bad_token = unique("bad");
    let bad = bearer_credential_trusting(&app, "http", &bad_token, peer.ca()).await;
    let refused = create(&mut c, with_credential("http", &peer.url("/api"), &bad)).await;
    let status = transition(&mut c, &refused.id, S::Registered)
        .await
        .expect_err("the wrong token is rejected");
    let (code, reason, meta) = error_info(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::FailedPrecondition, "CREDENTIALS_REJECTED")
    );
    assert_eq!(meta["state"], "DISCONNECTED");
    let shown = everything_in(&status);
    assert!(!shown.contains(&bad_token), "{shown}");
    assert!(!shown.contains("good-token"), "{shown}");
    assert!(
        status.message().contains("401"),
        "says what it saw: {status:?}"
    );
    assert_eq!(
        peer.seen().last().unwrap().authorization,
        Some(format!("Bearer {bad_token}")),
        "the credential was sent"
    );
    // The SYSTEM move it caused, and its history, do not show it either.
    let now = get(&mut c, &refused.id).await;
    assert_eq!(
        (now.state, now.state_trigger),
        (S::Disconnected as i32, pb::Trigger::System as i32)
    );
    assert!(!format!("{now:?}").contains(&bad_token));
    assert!(!format!("{:?}", events_of(&mut c, &refused.id).await).contains(&bad_token));

    // No token at all (only the CA to trust) is rejected the same way.
    let ca_only = create_credential(
        &mut credentials(&app),
        "http",
        "ca only",
        serde_json::json!({"ca_certificate": peer.ca()}),
    )
    .await
    .unwrap()
    .id;
    let bare = create(&mut c, with_credential("http", &peer.url("/api"), &ca_only)).await;
    let r = transition(&mut c, &bare.id, S::Registered).await;
    assert_error(r, Code::FailedPrecondition, "CREDENTIALS_REJECTED");
    assert_eq!(peer.seen().last().unwrap().authorization, None);
}

#[tokio::test]
async fn checks_use_basic_auth_credentials() {
    let app = App::start().await;
    let password = unique("pw");
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("admin:{password}"))
    );
    let want = expected.clone();
    let peer = RoutedHttp::tls(move |r| match (r.path.as_str(), &r.authorization) {
        ("/grafana/api/health", Some(a)) if *a == want => 200,
        ("/grafana/api/health", _) => 401,
        _ => 404,
    })
    .await;
    let mut creds = credentials(&app);
    let cred = create_credential(
        &mut creds,
        "grafana",
        "grafana admin",
        serde_json::json!({"username": "admin", "password": password, "ca_certificate": peer.ca()}),
    )
    .await
    .unwrap();
    let mut c = app.client.clone();
    let made = create(
        &mut c,
        with_credential("grafana", &peer.url("/grafana"), &cred.id),
    )
    .await;
    let registered = transition(&mut c, &made.id, S::Registered)
        .await
        .expect("basic auth verifies");
    assert_eq!(registered.state, S::Registered as i32);
    assert_eq!(
        peer.seen(),
        [SeenRequest {
            path: "/grafana/api/health".into(),
            authorization: Some(expected),
        }]
    );
}
