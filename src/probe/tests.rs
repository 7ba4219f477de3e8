//! The checks against real loopback peers: a small HTTP/1.1 stub, a
//! tonic-health server, a reserved but closed port and a peer that accepts
//! and never answers. Every peer binds port 0; nothing sleeps to wait.

use super::*;
use base64::Engine as _;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

const TIMEOUT: Duration = Duration::from_secs(5);

fn prober() -> Prober {
    Prober::new(
        TIMEOUT,
        8,
        EgressPolicy::default(),
        Arc::new(SystemResolver),
    )
    .unwrap()
}

fn secret(v: serde_json::Value) -> Secret {
    v.as_object().expect("an object").clone()
}

fn http(paths: &[&str]) -> Check {
    Check::Http {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    }
}

async fn verdict(p: &Prober, url: &str, check: &Check, secret: Option<&Secret>) -> Verdict {
    p.probe(url, check, secret)
        .await
        .expect("a check ran")
        .verdict
}

type Headers = HashMap<String, String>;

/// An HTTP/1.1 peer answering each request with the status `answer` picks,
/// recording the paths asked for in order.
struct Stub {
    url: String,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Stub {
    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

async fn http_stub(answer: impl Fn(&str, &Headers) -> u16 + Send + Sync + 'static) -> Stub {
    serve_stub(None, answer).await
}

/// The same stub behind TLS with a certificate for 127.0.0.1, and the PEM of
/// the CA that issued it.
async fn https_stub(
    answer: impl Fn(&str, &Headers) -> u16 + Send + Sync + 'static,
) -> (Stub, String) {
    let (acceptor, ca) = test_tls();
    let stub = serve_stub(Some(acceptor), answer).await;
    (stub, ca)
}

async fn serve_stub(
    tls: Option<tokio_rustls::TlsAcceptor>,
    answer: impl Fn(&str, &Headers) -> u16 + Send + Sync + 'static,
) -> Stub {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let paths = Arc::new(Mutex::new(Vec::new()));
    let answer = Arc::new(answer);
    let seen = paths.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (answer, seen, tls) = (answer.clone(), seen.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => reply(socket, &*answer, &seen).await,
                    Some(tls) => {
                        if let Ok(socket) = tls.accept(socket).await {
                            reply(socket, &*answer, &seen).await
                        }
                    }
                }
            });
        }
    });
    Stub { url, paths }
}

async fn reply(
    mut socket: impl AsyncRead + AsyncWrite + Unpin,
    answer: &(dyn Fn(&str, &Headers) -> u16 + Send + Sync),
    seen: &Mutex<Vec<String>>,
) {
    let Some((path, headers)) = read_head(&mut socket).await else {
        return;
    };
    seen.lock().unwrap().push(path.clone());
    let code = answer(&path, &headers);
    let reply = format!("HTTP/1.1 {code} Stub\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = socket.write_all(reply.as_bytes()).await;
    let _ = socket.shutdown().await;
}

/// A fresh CA and a server certificate for 127.0.0.1 it issued.
struct Pki {
    ca_pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

fn test_pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert,
        key,
    }
}

/// An acceptor serving a [`test_pki`] certificate, and the CA's PEM.
fn test_tls() -> (tokio_rustls::TlsAcceptor, String) {
    use tokio_rustls::rustls;
    let pki = test_pki();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(pki.key.serialize_der().into()),
        )
        .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        pki.ca_pem,
    )
}

/// The request target and the headers (names lowercased) of one request.
async fn read_head(socket: &mut (impl AsyncRead + Unpin)) -> Option<(String, Headers)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((path, headers))
}

fn authorization(headers: &Headers) -> &str {
    headers.get("authorization").map_or("", String::as_str)
}

/// A peer that accepts connections and never answers on them.
async fn silent_peer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

/// A port bound but not listening: reserved, so nobody else takes it, and a
/// connect to it is refused.
fn closed_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A tonic server with the standard health service; when `token` is given
/// every call must carry `authorization: Bearer <token>`.
struct HealthPeer {
    url: String,
    /// The CA's PEM, for a peer started with [`HealthPeer::start_tls`].
    ca: String,
    reporter: HealthReporter,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl HealthPeer {
    async fn start(token: Option<&'static str>) -> HealthPeer {
        HealthPeer::serve(token, None).await
    }

    /// Behind TLS, with a certificate for 127.0.0.1; its url is `grpcs://`.
    async fn start_tls(token: Option<&'static str>) -> HealthPeer {
        HealthPeer::serve(token, Some(test_pki())).await
    }

    async fn serve(token: Option<&'static str>, pki: Option<Pki>) -> HealthPeer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if pki.is_some() { "grpcs" } else { "grpc" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let (reporter, service) = tonic_health::server::health_reporter();
        let service = tonic::service::interceptor::InterceptedService::new(
            service,
            move |request: tonic::Request<()>| {
                let Some(token) = token else {
                    return Ok(request);
                };
                let sent = request.metadata().get("authorization");
                if sent.and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {token}")) {
                    Ok(request)
                } else {
                    Err(tonic::Status::unauthenticated("bad or missing token"))
                }
            },
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let mut server = tonic::transport::Server::builder();
        let mut ca = String::new();
        if let Some(pki) = pki {
            let identity =
                tonic::transport::Identity::from_pem(pki.cert.pem(), pki.key.serialize_pem());
            server = server
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .unwrap();
            ca = pki.ca_pem;
        }
        let served = tokio::spawn(server.add_service(service).serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stopped.await;
            },
        ));
        HealthPeer {
            url,
            ca,
            reporter,
            stop,
            served,
        }
    }

    async fn shut_down(self) {
        let _ = self.stop.send(());
        self.served.await.unwrap().unwrap();
    }
}

fn grpc(service: &str) -> Check {
    Check::Grpc {
        service: service.into(),
    }
}

#[tokio::test]
async fn bearer_tokens_are_sent_and_never_shown() {
    let (stub, ca) = https_stub(|_, h| {
        if authorization(h) == "Bearer good-token-7f3a" {
            200
        } else {
            401
        }
    })
    .await;
    let p = prober();
    let good = secret(serde_json::json!({"token": "good-token-7f3a", "ca_certificate": ca}));
    let bad = secret(serde_json::json!({"token": "bad-token-91c2", "ca_certificate": ca}));
    let no_token = secret(serde_json::json!({"ca_certificate": ca}));

    let v = verdict(&p, &stub.url, &Check::Url, Some(&good)).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");
    assert!(
        v.detail().contains("HTTP 200") && v.detail().contains(" ms"),
        "{v:?}"
    );
    assert!(!v.detail().contains("good-token-7f3a"), "{v:?}");

    let v = verdict(&p, &stub.url, &http(&["/api"]), Some(&bad)).await;
    assert!(matches!(v, Verdict::CredentialsRejected(_)), "{v:?}");
    assert!(
        v.detail().contains("HTTP 401") && v.detail().contains("/api"),
        "{v:?}"
    );
    assert!(!v.detail().contains("bad-token-91c2"), "{v:?}");

    let v = verdict(&p, &stub.url, &Check::Url, Some(&no_token)).await;
    assert!(matches!(v, Verdict::CredentialsRejected(_)), "{v:?}");
}

#[tokio::test]
async fn credentials_are_never_sent_over_cleartext() {
    let stub = http_stub(|_, _| 200).await;
    let p = prober();
    for s in [
        serde_json::json!({"token": "clear-token-3e1a"}),
        serde_json::json!({"username": "alice", "password": "clear-pw-3e1a"}),
    ] {
        let v = verdict(&p, &stub.url, &http(&["/api"]), Some(&secret(s.clone()))).await;
        assert!(matches!(v, Verdict::CredentialsRejected(_)), "{s}: {v:?}");
        assert!(v.detail().contains("cleartext"), "{v:?}");
        assert!(!v.detail().contains("3e1a"), "{v:?}");
    }
    assert!(
        stub.paths().is_empty(),
        "a request went out: {:?}",
        stub.paths()
    );

    // A CA alone puts nothing on the wire: the check runs.
    let ca_only = secret(serde_json::json!({"ca_certificate": TEST_CA}));
    let v = verdict(&p, &stub.url, &Check::Url, Some(&ca_only)).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");

    // Plaintext grpc gets no token either.
    let peer = HealthPeer::start(Some("grpc-token-c0ffee")).await;
    let token = secret(serde_json::json!({"token": "grpc-token-c0ffee"}));
    let v = verdict(&p, &peer.url, &grpc(""), Some(&token)).await;
    assert!(matches!(v, Verdict::CredentialsRejected(_)), "{v:?}");
    assert!(v.detail().contains("cleartext"), "{v:?}");
    peer.shut_down().await;
}

#[tokio::test]
async fn basic_auth_from_the_secret_wins_over_url_user_info() {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:open-sesame-42")
    );
    let (stub, ca) = https_stub(move |_, h| {
        if authorization(h) == expected {
            200
        } else {
            401
        }
    })
    .await;
    let p = prober();
    let right = secret(
        serde_json::json!({"username": "alice", "password": "open-sesame-42", "ca_certificate": ca}),
    );
    let wrong = secret(
        serde_json::json!({"username": "alice", "password": "guess-0000", "ca_certificate": ca}),
    );
    let ca_only = secret(serde_json::json!({"ca_certificate": ca}));

    let v = verdict(&p, &stub.url, &http(&[]), Some(&right)).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");
    assert!(!v.detail().contains("open-sesame-42"), "{v:?}");

    let v = verdict(&p, &stub.url, &http(&[]), Some(&wrong)).await;
    assert!(matches!(v, Verdict::CredentialsRejected(_)), "{v:?}");
    assert!(!v.detail().contains("guess-0000"), "{v:?}");

    // User-info in the url is used when there is no secret, replaced when
    // there is one, and never shown.
    let with_user_info = stub.url.replace("https://", "https://bob:url-pass-5e1d@");
    let v = verdict(&p, &with_user_info, &Check::Url, Some(&ca_only)).await;
    assert!(matches!(v, Verdict::CredentialsRejected(_)), "{v:?}");
    assert!(!v.detail().contains("url-pass-5e1d"), "{v:?}");
    assert!(!v.detail().contains("bob"), "{v:?}");
    let v = verdict(&p, &with_user_info, &Check::Url, Some(&right)).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");
    assert!(!v.detail().contains("url-pass-5e1d"), "{v:?}");
}

#[tokio::test]
async fn every_path_must_answer() {
    let p = prober();
    let stub = http_stub(|path, _| if path == "/readyz" { 200 } else { 500 }).await;
    let v = verdict(&p, &stub.url, &http(&["/readyz", "/version"]), None).await;
    assert!(matches!(v, Verdict::Unreachable(_)), "{v:?}");
    assert!(
        v.detail().contains("/version") && v.detail().contains("HTTP 500"),
        "{v:?}"
    );
    assert_eq!(stub.paths(), ["/readyz", "/version"]);

    let stub = http_stub(|path, _| if path == "/readyz" { 200 } else { 403 }).await;
    let v = verdict(&p, &stub.url, &http(&["/readyz", "/version"]), None).await;
    assert!(matches!(v, Verdict::CredentialsRejected(_)), "{v:?}");
    assert!(
        v.detail().contains("/version") && v.detail().contains("HTTP 403"),
        "{v:?}"
    );

    // A redirect is an answer and is not followed.
    let stub = http_stub(|path, _| if path == "/readyz" { 200 } else { 302 }).await;
    let v = verdict(&p, &stub.url, &http(&["/readyz", "/version"]), None).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");
    assert!(
        v.detail().contains("/readyz") && v.detail().contains("HTTP 302"),
        "{v:?}"
    );
    assert_eq!(stub.paths(), ["/readyz", "/version"]);
}

#[tokio::test]
async fn paths_join_under_the_url_prefix() {
    let stub = http_stub(|path, _| if path == "/prom/-/ready" { 200 } else { 404 }).await;
    let url = format!("{}/prom", stub.url);
    let v = verdict(&prober(), &url, &http(&["/-/ready"]), None).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");
    assert_eq!(stub.paths(), ["/prom/-/ready"]);
}

#[tokio::test]
async fn tcp_checks_connect_to_the_host_and_port() {
    let p = prober();
    let (_reserved, closed) = closed_port();
    for (url, check) in [
        (format!("tcp://{closed}"), Check::Url),
        (format!("tcp://{closed}"), Check::Tcp),
        (format!("http://{closed}"), Check::Tcp),
    ] {
        let v = verdict(&p, &url, &check, None).await;
        assert!(
            matches!(v, Verdict::Unreachable(_)),
            "{url} {check:?}: {v:?}"
        );
        assert!(
            v.detail().contains(&format!("tcp connect to {closed}")),
            "{v:?}"
        );
    }

    let open = silent_peer().await;
    let v = verdict(&p, &format!("http://{open}/x"), &Check::Tcp, None).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");
    assert!(v.detail().contains("succeeded in"), "{v:?}");
}

#[tokio::test]
async fn grpc_health_serving_and_not_serving() {
    let peer = HealthPeer::start(None).await;
    let p = prober();

    let result = p.probe(&peer.url, &grpc(""), None).await.unwrap();
    assert!(
        matches!(result.verdict, Verdict::Reachable(_)),
        "{result:?}"
    );
    assert!(result.verdict.detail().contains("SERVING"), "{result:?}");

    peer.reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let v = verdict(&p, &peer.url, &grpc(""), None).await;
    assert!(matches!(v, Verdict::Unreachable(_)), "{v:?}");
    assert!(v.detail().contains("NOT_SERVING"), "{v:?}");

    peer.reporter
        .set_service_status("tether.Thing", ServingStatus::Serving)
        .await;
    let http_url = peer.url.replace("grpc://", "http://");
    let v = verdict(&p, &http_url, &grpc("tether.Thing"), None).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");

    // A service the server does not know: NotFound.
    let v = verdict(&p, &peer.url, &grpc("nope.Missing"), None).await;
    assert!(matches!(v, Verdict::Unreachable(_)), "{v:?}");
    assert!(v.detail().contains("NotFound"), "{v:?}");

    peer.shut_down().await;
}

#[tokio::test]
async fn grpc_reports_a_closed_port() {
    let p = prober();
    let (_reserved, closed) = closed_port();
    let v = verdict(&p, &format!("grpc://{closed}"), &grpc(""), None).await;
    assert!(matches!(v, Verdict::Unreachable(_)), "{v:?}");
    assert!(v.detail().contains(&closed.to_string()), "{v:?}");
}

#[tokio::test]
async fn grpc_over_tls_sends_tokens_and_trusts_only_the_given_ca() {
    let peer = HealthPeer::start_tls(Some("grpc-token-c0ffee")).await;
    let p = prober();
    let good = secret(serde_json::json!({"token": "grpc-token-c0ffee", "ca_certificate": peer.ca}));
    let bad = secret(serde_json::json!({"token": "grpc-wrong-beef", "ca_certificate": peer.ca}));

    let v = verdict(&p, &peer.url, &grpc(""), Some(&good)).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");
    assert!(!v.detail().contains("grpc-token-c0ffee"), "{v:?}");
    let https = peer.url.replace("grpcs://", "https://");
    let v = verdict(&p, &https, &grpc(""), Some(&good)).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");

    let v = verdict(&p, &peer.url, &grpc(""), Some(&bad)).await;
    assert!(matches!(v, Verdict::CredentialsRejected(_)), "{v:?}");
    assert!(v.detail().contains("Unauthenticated"), "{v:?}");
    assert!(!v.detail().contains("grpc-wrong-beef"), "{v:?}");

    // Another CA, or none (the public roots): the handshake fails.
    let other =
        secret(serde_json::json!({"token": "grpc-token-c0ffee", "ca_certificate": TEST_CA}));
    for s in [Some(&other), None] {
        let v = verdict(&p, &peer.url, &grpc(""), s).await;
        assert!(matches!(v, Verdict::Unreachable(_)), "{v:?}");
        assert!(v.detail().contains("tls handshake failed"), "{v:?}");
    }
    peer.shut_down().await;
}

#[tokio::test]
async fn a_silent_peer_times_out() {
    let p = Prober::new(
        Duration::from_millis(200),
        8,
        EgressPolicy::default(),
        Arc::new(SystemResolver),
    )
    .unwrap();
    let silent = silent_peer().await;
    for (url, check) in [
        (format!("http://{silent}"), http(&["/-/ready"])),
        (format!("grpc://{silent}"), grpc("")),
    ] {
        let v = verdict(&p, &url, &check, None).await;
        assert!(matches!(v, Verdict::Unreachable(_)), "{check:?}: {v:?}");
        assert!(v.detail().contains("timed out"), "{check:?}: {v:?}");
    }
}

#[tokio::test]
async fn malformed_pem_is_rejected_by_field() {
    let stub = http_stub(|_, _| 200).await;
    // https, so that the cleartext rule is not what answers.
    let tls_url = stub.url.replace("http://", "https://");
    let p = prober();
    let garbage = "-----BEGIN CERTIFICATE-----\nnot*base64*pem-8d2e\n-----END CERTIFICATE-----\n";
    for (s, field) in [
        (
            serde_json::json!({"client_certificate": garbage, "client_key": garbage}),
            "client_certificate/client_key",
        ),
        (
            serde_json::json!({"client_certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                               "client_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}),
            "client_certificate/client_key",
        ),
        (
            serde_json::json!({"ca_certificate": garbage}),
            "ca_certificate",
        ),
        (
            serde_json::json!({"ca_certificate": "no pem here"}),
            "ca_certificate",
        ),
        (
            serde_json::json!({"client_certificate": garbage}),
            "client_key",
        ),
    ] {
        let v = verdict(&p, &tls_url, &Check::Url, Some(&secret(s.clone()))).await;
        assert!(matches!(v, Verdict::CredentialsRejected(_)), "{s}: {v:?}");
        assert!(v.detail().contains(field), "{s}: {v:?}");
        assert!(
            !v.detail().contains("pem-8d2e") && !v.detail().contains("AAAA"),
            "{v:?}"
        );
    }
    assert!(
        stub.paths().is_empty(),
        "a request went out: {:?}",
        stub.paths()
    );
}

/// A public self-signed test certificate (its key was thrown away).
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBiTCCAS+gAwIBAgIUCPABdw3+rL0c7IeleWCC7/8sN+cwCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOdGV0aGVyLXRlc3QtY2EwIBcNMjYxMTI3MTUyMzE2WhgPMjEy
NjExMDMxNTIzMTZaMBkxFzAVBgNVBAMMDnRldGhlci10ZXN0LWNhMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAEB7c9SX7vd/IRAmLycSwbQpWrjQjRW8YgRR586IqY
rnYIJyEoOncxlZ4WLEpDGjTRmW3ZC9FcqVXd4zWq2th0cqNTMFEwHQYDVR0OBBYE
FK7vKp6r5IqipiXwqJdy3tUDxNYdMB8GA1UdIwQYMBaAFK7vKp6r5IqipiXwqJdy
3tUDxNYdMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIhANXSJY/X
tvvyL5RgueBsAWbXbcfg8y8zLlU6mjoOmJO4AiA8PJH39bJ/EZEIVmlBdiJnBHO2
0uLX9FI8Dx6qzptp6Q==
-----END CERTIFICATE-----
";

#[tokio::test]
async fn a_given_ca_is_the_only_one_trusted() {
    let (stub, ca) = https_stub(|_, h| {
        if authorization(h) == "Bearer with-ca-6b1f" {
            200
        } else {
            401
        }
    })
    .await;
    let p = prober();
    let s = secret(serde_json::json!({"ca_certificate": ca, "token": "with-ca-6b1f"}));
    let v = verdict(&p, &stub.url, &http(&["/health"]), Some(&s)).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");

    // Another CA: the handshake fails and the token never leaves.
    let s = secret(serde_json::json!({"ca_certificate": TEST_CA, "token": "with-ca-6b1f"}));
    let v = verdict(&p, &stub.url, &http(&["/again"]), Some(&s)).await;
    assert!(matches!(v, Verdict::Unreachable(_)), "{v:?}");
    assert!(v.detail().contains("tls handshake failed"), "{v:?}");
    // Nor do the public roots vouch for a host the given CA does not.
    let v = verdict(&p, &stub.url, &http(&["/public"]), None).await;
    assert!(v.detail().contains("tls handshake failed"), "{v:?}");
    assert_eq!(stub.paths(), ["/health"]);
}

#[tokio::test]
async fn nothing_to_check_is_none_and_a_missing_url_is_unreachable() {
    let p = prober();
    assert_eq!(
        p.probe("http://127.0.0.1:1", &Check::None, None).await,
        None
    );
    assert_eq!(p.probe("", &Check::Url, None).await, None);
    assert_eq!(p.probe("postgres://db:5432", &Check::Url, None).await, None);
    let v = verdict(&p, "", &http(&["/"]), None).await;
    assert!(matches!(v, Verdict::Unreachable(_)), "{v:?}");
    // A tcp check never reads the secret, so a bad one does not matter.
    let (_reserved, closed) = closed_port();
    let bad = secret(serde_json::json!({"token": 1}));
    let v = verdict(&p, &format!("tcp://{closed}"), &Check::Tcp, Some(&bad)).await;
    assert!(v.detail().contains("tcp connect"), "{v:?}");
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

/// A prober that never contacts 127.0.0.2, with `rebind.test` resolving to
/// it and `ok.test` to 127.0.0.1.
fn guarded() -> Prober {
    let policy =
        EgressPolicy::new(&[], &["127.0.0.2/32".into()], Access::Allow, Access::Allow).unwrap();
    let names = StubResolver::new()
        .with("rebind.test", &[ip("127.0.0.2")])
        .with("ok.test", &[ip("127.0.0.1")]);
    Prober::new(TIMEOUT, 8, policy, Arc::new(names)).unwrap()
}

/// Whether anything but our own sentinel connection reached `listener`:
/// connections wait in its backlog in arrival order, so the first one
/// accepted after the probes is ours only if no probe came before it.
async fn nothing_but_the_sentinel_arrives(listener: &TcpListener) -> bool {
    let addr = listener.local_addr().unwrap();
    let sentinel = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_, from) = listener.accept().await.unwrap();
    from == sentinel.local_addr().unwrap()
}

#[tokio::test]
async fn a_denied_address_is_never_connected_to() {
    // 127.0.0.2 is loopback too: nothing here can leave the machine.
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let p = guarded();
    for (url, check) in [
        (format!("tcp://127.0.0.2:{port}"), Check::Url),
        (format!("http://127.0.0.2:{port}/x"), http(&[])),
        (format!("https://127.0.0.2:{port}/x"), http(&[])),
        (format!("grpc://127.0.0.2:{port}"), grpc("")),
        (format!("grpcs://127.0.0.2:{port}"), grpc("")),
        (format!("tcp://[::ffff:127.0.0.2]:{port}"), Check::Tcp),
        // 2130706434 is 127.0.0.2 in the decimal form.
        (format!("http://2130706434:{port}/"), http(&[])),
        (format!("tcp://2130706434:{port}"), Check::Tcp),
        (format!("tcp://rebind.test:{port}"), Check::Tcp),
        (format!("http://rebind.test:{port}/"), http(&[])),
        (format!("grpc://rebind.test:{port}"), grpc("")),
    ] {
        let v = verdict(&p, &url, &check, None).await;
        assert!(matches!(v, Verdict::Unreachable(_)), "{url}: {v:?}");
        assert!(
            v.detail().ends_with("denied by egress policy"),
            "{url}: {v:?}"
        );
    }
    assert!(nothing_but_the_sentinel_arrives(&listener).await);
}

#[tokio::test]
async fn an_allowed_name_resolves_through_the_policy() {
    let p = guarded();
    let stub = http_stub(|_, _| 200).await;
    let port = stub.url.rsplit(':').next().unwrap().to_owned();
    let v = verdict(
        &p,
        &format!("http://ok.test:{port}/ready"),
        &http(&[]),
        None,
    )
    .await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");
    assert_eq!(stub.paths(), ["/ready"]);
    let v = verdict(&p, &format!("tcp://OK.test:{port}"), &Check::Tcp, None).await;
    assert!(matches!(v, Verdict::Reachable(_)), "{v:?}");

    let v = verdict(&p, &format!("tcp://nowhere.test:{port}"), &Check::Tcp, None).await;
    assert!(v.detail().ends_with("name did not resolve"), "{v:?}");
    let v = verdict(
        &p,
        &format!("http://nowhere.test:{port}/"),
        &http(&[]),
        None,
    )
    .await;
    assert!(v.detail().contains("name did not resolve"), "{v:?}");
}

#[tokio::test]
async fn failures_are_told_by_class_not_by_the_peers_words() {
    let p = prober();
    let (_reserved, closed) = closed_port();
    for (url, check) in [
        (format!("tcp://{closed}"), Check::Tcp),
        (format!("http://{closed}/"), http(&[])),
        (format!("grpc://{closed}"), grpc("")),
    ] {
        let v = verdict(&p, &url, &check, None).await;
        let d = v.detail();
        assert!(d.contains(": refused after "), "{url}: {d}");
        assert!(
            !d.contains("os error")
                && !d.contains("Connection refused")
                && !d.contains("tcp connect error"),
            "{url}: {d}"
        );
    }
    // A gRPC error status is named by its code; the peer's message is not shown.
    let peer = HealthPeer::start(None).await;
    let v = verdict(&p, &peer.url, &grpc("nope.Missing"), None).await;
    assert!(v.detail().contains("grpc status NotFound"), "{v:?}");
    assert!(
        !v.detail().to_lowercase().contains("unknown service"),
        "{v:?}"
    );
    peer.shut_down().await;
}
