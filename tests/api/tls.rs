//! The listener: TLS, client certificates, the name a certificate stands for,
//! the connection limit, certificate reload, the refusal to serve a
//! non-loopback address unprotected, and answers of every size written whole.

use crate::common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tether::pb::tether::v1 as pb;
use tether::pb::tether::v1::connection_service_client::ConnectionServiceClient;
use tether::transport::{Peer, TransportConfig, principal_name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

/// A CA, the server certificate it signed, and the files the server reads.
struct ServerPki {
    ca: TestCa,
    cert: PathBuf,
    key: PathBuf,
    dir: tempfile::TempDir,
}

impl ServerPki {
    fn new() -> ServerPki {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("tether test ca");
        let (cert, key) = ca.server().write(dir.path(), "server");
        ServerPki { ca, cert, key, dir }
    }

    /// The CA's certificate as a file, for `--tls-client-ca`.
    fn ca_file(&self) -> PathBuf {
        let path = self.dir.path().join("clients-ca.crt");
        std::fs::write(&path, &self.ca.pem).unwrap();
        path
    }
}

async fn tls_app(pki: &ServerPki, client_ca: Option<PathBuf>, require: bool) -> App {
    let (cert, key) = (pki.cert.clone(), pki.key.clone());
    let good = pki.ca.client("admin");
    App::start_tls(
        move |c| {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
            c.tls_client_ca = client_ca;
            c.tls_require_client_cert = require;
        },
        client_tls(&pki.ca, Some(&good)),
    )
    .await
}

#[tokio::test]
async fn a_tls_server_answers_tls_clients_and_refuses_plaintext_ones() {
    let pki = ServerPki::new();
    let mut app = tls_app(&pki, None, false).await;
    // The API works over TLS like over plaintext.
    let created = create(&mut app.client, conn("http", "")).await;
    assert_eq!(get(&mut app.client, &created.id).await.id, created.id);
    tls_health(app.channel_addr(), client_tls(&pki.ca, None))
        .await
        .unwrap();

    let plaintext = async {
        let channel = Channel::from_shared(format!("http://{}", app.channel_addr()))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        health(channel).await
    };
    assert!(plaintext.await.is_err(), "a plaintext client is refused");
    // A client that does not trust the server's CA is refused too.
    let stranger = TestCa::new("another ca");
    assert!(
        tls_health(app.channel_addr(), client_tls(&stranger, None))
            .await
            .is_err()
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_required_client_certificate_must_come_from_the_client_ca() {
    let pki = ServerPki::new();
    let app = tls_app(&pki, Some(pki.ca_file()), true).await;
    let addr = app.channel_addr();
    let other = TestCa::new("another ca");

    let none = tls_health(addr, client_tls(&pki.ca, None)).await;
    assert!(none.is_err(), "no client certificate: refused");
    let foreign = tls_health(addr, client_tls(&pki.ca, Some(&other.client("admin")))).await;
    assert!(foreign.is_err(), "a certificate from another CA: refused");
    tls_health(addr, client_tls(&pki.ca, Some(&pki.ca.client("ops"))))
        .await
        .expect("a certificate from the client CA is accepted");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_optional_client_certificate_is_still_verified_when_presented() {
    let pki = ServerPki::new();
    let app = tls_app(&pki, Some(pki.ca_file()), false).await;
    let addr = app.channel_addr();
    let other = TestCa::new("another ca");

    tls_health(addr, client_tls(&pki.ca, None))
        .await
        .expect("no certificate: accepted (the client may use a token)");
    let foreign = tls_health(addr, client_tls(&pki.ca, Some(&other.client("admin")))).await;
    assert!(foreign.is_err(), "a certificate from another CA: refused");
    tls_health(addr, client_tls(&pki.ca, Some(&pki.ca.client("ops"))))
        .await
        .expect("a certificate from the client CA is accepted");
    app.stop().await.unwrap();
}

fn der_of(pem: &str) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn leaf(ca: &TestCa, cn: Option<&str>, sans: Vec<rcgen::SanType>) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    params.subject_alt_names = sans;
    der_of(&ca.sign(params).cert)
}

#[test]
fn a_certificate_stands_for_its_common_name_else_its_uri_else_its_dns_name() {
    let ca = TestCa::new("names");
    let uri = || rcgen::SanType::URI("spiffe://example.org/ns/ops/sa/tether".try_into().unwrap());
    let dns = || rcgen::SanType::DnsName("worker.example.org".try_into().unwrap());
    assert_eq!(
        principal_name(&leaf(&ca, Some("alice"), vec![dns(), uri()])).as_deref(),
        Some("alice")
    );
    assert_eq!(
        principal_name(&leaf(&ca, None, vec![dns(), uri()])).as_deref(),
        Some("spiffe://example.org/ns/ops/sa/tether")
    );
    assert_eq!(
        principal_name(&leaf(&ca, None, vec![dns()])).as_deref(),
        Some("worker.example.org")
    );
    assert_eq!(principal_name(&leaf(&ca, None, vec![])), None);
    assert_eq!(principal_name(b"not a certificate"), None);
}

#[tokio::test]
async fn every_request_carries_the_peer_and_its_certificate_name() {
    let pki = ServerPki::new();
    let tls = tether::transport::Tls::load(tether::transport::TlsFiles {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        client_ca: Some(pki.ca_file()),
        require_client_cert: false,
    })
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stopping = CancellationToken::new();
    let tasks = TaskTracker::new();
    let incoming = tether::transport::incoming(
        listener,
        &TransportConfig {
            max_connections: 8,
            handshake_timeout: Duration::from_secs(10),
        },
        Some(Arc::new(tls)),
        stopping.clone(),
        &tasks,
    );
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Option<Peer>>::new()));
    let record = seen.clone();
    let (_reporter, health_service) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(
                move |req: tonic::Request<()>| {
                    record
                        .lock()
                        .unwrap()
                        .push(req.extensions().get::<Peer>().cloned());
                    Ok(req)
                },
            ))
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, stopping.clone().cancelled_owned()),
    );

    tls_health(addr, client_tls(&pki.ca, Some(&pki.ca.client("alice"))))
        .await
        .unwrap();
    tls_health(addr, client_tls(&pki.ca, None)).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let peers: Vec<Peer> = seen.into_iter().map(|p| p.expect("a Peer")).collect();
    assert_eq!(peers[0].certificate.as_deref(), Some("alice"));
    assert_eq!(peers[1].certificate, None);
    for p in &peers {
        assert!(p.addr.ip().is_loopback(), "{p:?}");
    }

    stopping.cancel();
    server.await.unwrap().unwrap();
    tasks.close();
    tasks.wait().await;
}

/// Sends the HTTP/2 preface and an empty SETTINGS frame, and reads the
/// server's first frame: a SETTINGS frame when the connection is served.
async fn speak_h2(s: &mut TcpStream) {
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.expect("the server answers");
    assert_eq!(head[3], 4, "the server's first frame is SETTINGS: {head:?}");
}

/// Reads until the server closes the connection (EOF or reset).
async fn closed_by_server(s: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("the server closes the connection")
        {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once_and_a_closed_one_frees_its_slot() {
    let app = App::start_with(|c| c.max_connections = 2).await;
    // The app's client holds one connection, so one more fills the limit.
    let addr = app.channel_addr();
    let mut second = TcpStream::connect(addr).await.unwrap();
    let mut third = TcpStream::connect(addr).await.unwrap();
    // Accepted in order: the first two hold both slots, so the third is closed.
    closed_by_server(&mut third).await;
    speak_h2(&mut second).await;
    let mut client = app.client.clone();
    create(&mut client, conn("http", "")).await;

    // Closing the second frees its slot.
    second.shutdown().await.unwrap();
    closed_by_server(&mut second).await;
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    speak_h2(&mut fourth).await;
    create(&mut client, conn("http", "")).await;
    drop(fourth);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_silent_client_never_holds_up_others_and_is_closed_after_the_handshake_timeout() {
    let pki = ServerPki::new();
    let app = tls_app(&pki, None, false).await;
    let mut silent = TcpStream::connect(app.channel_addr()).await.unwrap();
    // Accepted before the next client, and still in its handshake.
    tls_health(app.channel_addr(), client_tls(&pki.ca, None))
        .await
        .expect("served while another connection says nothing");
    drop(silent);

    let app = App::start_with(|c| c.handshake_timeout = Duration::from_millis(100)).await;
    silent = TcpStream::connect(app.channel_addr()).await.unwrap();
    closed_by_server(&mut silent).await;
    app.stop().await.unwrap();
}

/// Replaces `cert` and `key` with `pair`, each by a rename, so the server
/// never reads half a file.
fn replace(pair: &CertKey, cert: &Path, key: &Path) {
    for (path, text) in [(cert, &pair.cert), (key, &pair.key)] {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

async fn serves_with(addr: SocketAddr, ca: &TestCa) -> bool {
    tls_health(addr, client_tls(ca, None)).await.is_ok()
}

async fn reload_test(interval: &str, hangup: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (TestCa::new("ca a"), TestCa::new("ca b"));
    let (cert, key) = a.server().write(dir.path(), "server");
    let db = dir.path().join("t.db");
    let mut p = Binary::serve_db(
        &db,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--reload-interval",
            interval,
        ],
    )
    .await;
    assert!(serves_with(p.addr(), &a).await);
    assert!(!serves_with(p.addr(), &b).await);

    // A file that does not parse is refused and the old certificate stays.
    replace(
        &CertKey {
            cert: "not a certificate".into(),
            key: "not a key".into(),
        },
        &cert,
        &key,
    );
    if hangup {
        p.signal("-HUP").await;
    }
    let refused = p.logged("tls certificates not reloaded").await;
    assert!(refused.contains("ERROR"), "{refused}");
    assert!(
        serves_with(p.addr(), &a).await,
        "the old certificate still serves"
    );

    replace(&b.server(), &cert, &key);
    if hangup {
        p.signal("-HUP").await;
    }
    p.logged("tls certificates reloaded").await;
    assert!(
        serves_with(p.addr(), &b).await,
        "the new certificate is served"
    );
    assert!(!serves_with(p.addr(), &a).await, "the old one is not");
    p.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_certificate_files() {
    // The files are not polled within the test: only SIGHUP reloads them.
    reload_test("1h", true).await;
}

#[tokio::test]
async fn changed_certificate_files_are_reloaded_without_a_signal() {
    reload_test("100ms", false).await;
}

#[tokio::test]
async fn a_bad_certificate_file_refuses_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("server.crt");
    let key = dir.path().join("server.key");
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let mut config = test_config();
    config.db = Some(dir.path().join("t.db"));
    config.tls_cert = Some(cert.clone());
    config.tls_key = Some(key);
    let err = tether::server::Server::open(config)
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains(cert.to_str().unwrap()), "{msg}");
    assert!(!dir.path().join("t.db").exists());
}

#[tokio::test]
async fn an_unprotected_non_loopback_address_is_refused_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let (child, mut stderr) =
        Binary::start(&["--listen", "0.0.0.0:0", "--db", db.to_str().unwrap()]);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("tether exits within 30 s")
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut log = String::new();
    while let Some(line) = stderr.recv().await {
        log.push_str(&line);
    }
    for needed in ["--tls-cert", "--auth-file", "--insecure"] {
        assert!(log.contains(needed), "{needed} in {log}");
    }
    assert!(!db.exists(), "nothing was created on disk");

    let mut p = Binary::serve(&[
        "--listen",
        "0.0.0.0:0",
        "--db",
        db.to_str().unwrap(),
        "--insecure",
    ])
    .await;
    let warning = p
        .logged("ANYONE WHO CAN REACH THIS PORT CAN ACT AS ADMIN")
        .await;
    assert!(warning.contains("WARN"), "{warning}");
    let channel = Channel::from_shared(format!("http://{}", p.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    health(channel).await.unwrap();
    p.stop().await;
}

#[tokio::test]
async fn sighup_without_tls_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut p = Binary::serve(&["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()]).await;
    p.signal("-HUP").await;
    p.logged("nothing to reload").await;
    let channel = Channel::from_shared(format!("http://{}", p.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    health(channel).await.unwrap();
    p.stop().await;
}

#[tokio::test]
async fn a_refused_client_certificate_is_audited() {
    let pki = ServerPki::new();
    let db = pki.dir.path().join("t.db");
    let ca_file = pki.ca_file();
    let mut p = Binary::serve_db(
        &db,
        &[
            "--tls-cert",
            pki.cert.to_str().unwrap(),
            "--tls-key",
            pki.key.to_str().unwrap(),
            "--tls-client-ca",
            ca_file.to_str().unwrap(),
        ],
    )
    .await;
    let stranger = TestCa::new("another ca").client("mallory");
    let refused = tls_health(p.addr(), client_tls(&pki.ca, Some(&stranger))).await;
    assert!(refused.is_err(), "a certificate from another CA is refused");
    let line = p.logged("client certificate refused").await;
    for part in ["tether::audit", "call refused", "peer=127.0.0.1:"] {
        assert!(line.contains(part), "{part} in {line}");
    }
    p.stop().await;
}

#[tokio::test]
async fn a_certificate_may_not_claim_the_servers_own_name() {
    let pki = ServerPki::new();
    let access = pki.dir.path().join("access.yaml");
    std::fs::write(
        &access,
        "certificates: [{principal: ops, roles: [admin]}]\n",
    )
    .unwrap();
    let (cert, key, ca) = (pki.cert.clone(), pki.key.clone(), pki.ca_file());
    let app = App::start_tls(
        move |c| {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
            c.tls_client_ca = Some(ca);
            c.auth_file = Some(access);
        },
        client_tls(&pki.ca, Some(&pki.ca.client("ops"))),
    )
    .await;
    let mut ops = app.client.clone();
    ops.list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("a listed certificate acts");
    let channel = Channel::from_shared(format!("https://{}", app.channel_addr()))
        .unwrap()
        .tls_config(client_tls(&pki.ca, Some(&pki.ca.client("tether"))))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = ConnectionServiceClient::new(channel)
        .list_connections(pb::ListConnectionsRequest::default())
        .await;
    assert_error(r, tonic::Code::Unauthenticated, "UNAUTHENTICATED");
    app.stop().await.unwrap();
}

/// A connection whose answers are about `n` bytes of metadata larger than an
/// empty one's.
fn sized(n: usize) -> pb::Connection {
    let filler: String = (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    pb::Connection {
        metadata: Some(json_struct(serde_json::json!({ "filler": filler }))),
        ..conn("tcp", "")
    }
}

/// Answers of every size, alone and many at once on one connection, arrive
/// whole: the listener tells HTTP/2 its streams do not gather writes, so an
/// answer under 1 KiB is copied into one write with those ready beside it and
/// a larger one is written in pieces (`Conn::is_write_vectored`).
async fn answers_arrive_whole(client: &mut Client) {
    // Below, around and above the sizes where HTTP/2 copies or chains a
    // payload (256 B, 1 KiB), and frames of 16 KiB.
    let sizes = [0, 100, 200, 700, 1_000, 3_000, 20_000, 60_000];
    let mut made = Vec::new();
    for n in sizes {
        let want = sized(n);
        let got = create(client, want.clone()).await;
        assert_eq!(got.metadata, want.metadata, "create's answer at {n} B");
        made.push(got);
    }
    // Many answers in flight at once, on the one HTTP/2 connection.
    let gets = made.iter().cycle().take(64).map(|c| {
        let mut client = client.clone();
        let id = c.id.clone();
        async move { get(&mut client, &id).await }
    });
    let got = futures::future::join_all(gets).await;
    for (g, want) in got.iter().zip(made.iter().cycle()) {
        assert_eq!(g, want, "a get among 64 in flight");
    }
    // One answer of many 16 KiB frames.
    let page = client
        .list_connections(pb::ListConnectionsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    for want in &made {
        let listed = page.connections.iter().find(|c| c.id == want.id);
        assert_eq!(listed, Some(want), "listed");
    }
}

#[tokio::test]
async fn answers_of_every_size_arrive_whole_in_plaintext_and_over_tls() {
    let plain = App::start().await;
    answers_arrive_whole(&mut plain.client.clone()).await;
    plain.stop().await.unwrap();

    let pki = ServerPki::new();
    let tls = tls_app(&pki, None, false).await;
    answers_arrive_whole(&mut tls.client.clone()).await;
    tls.stop().await.unwrap();
}
