//! Test harness: a real server on 127.0.0.1:0 over a SQLite file in a temp
//! dir, a real tonic client, and small real peers for reachability checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tether::Config;
use tether::pb::tether::v1 as pb;
use tether::pb::tether::v1::connection_service_client::ConnectionServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_types::StatusExt;

pub use pb::ConnectionState as S;

pub type Client = ConnectionServiceClient<Channel>;

/// A running server and a client for it.
pub struct App {
    addr: SocketAddr,
    pub client: Client,
    pub channel: Channel,
    pub dir: Arc<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), tether::Error>>>,
}

/// Test defaults: short verification timeout and no background probing (so
/// states move only when a test moves them); everything else as shipped.
/// Monitoring tests turn the monitor back on.
pub fn test_config() -> Config {
    Config {
        verify_timeout: Duration::from_secs(3),
        shutdown_grace: Duration::from_secs(5),
        disable_monitor: true,
        ..Config::default()
    }
}

impl App {
    pub async fn start() -> App {
        App::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> App {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        App::start_in(dir, tweak).await
    }

    /// Starts a server on the database in `dir` (a restart when one ran there before).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, tweak: impl FnOnce(&mut Config)) -> App {
        let mut config = test_config();
        config.db = Some(dir.path().join("tether.db"));
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(tether::server::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        App {
            addr,
            client: ConnectionServiceClient::new(channel.clone()),
            channel,
            dir,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// The address the server listens on.
    pub fn channel_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("tether.db")
    }

    /// Signals shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Shuts the server down and waits until `run` has returned; its result.
    pub async fn stop(mut self) -> Result<(), tether::Error> {
        self.begin_stop();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("server stops within 30 s")
            .expect("server task")
    }
}

/// A connection body with a unique identity so tests never collide.
pub fn conn(kind: &str, url: &str) -> pb::Connection {
    pb::Connection {
        kind: kind.into(),
        url: url.into(),
        name: format!("{kind} test"),
        identity: format!("test:{}", uuid::Uuid::new_v4()),
        ..Default::default()
    }
}

pub async fn create(client: &mut Client, c: pb::Connection) -> pb::Connection {
    create_in(client, c, S::Discovered, true).await
}

pub async fn create_in(
    client: &mut Client,
    c: pb::Connection,
    state: S,
    skip_verification: bool,
) -> pb::Connection {
    client
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(c),
            initial_state: state as i32,
            skip_verification,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
}

pub async fn transition(
    client: &mut Client,
    id: &str,
    target: S,
) -> Result<pb::Connection, tonic::Status> {
    client
        .transition_connection(pb::TransitionConnectionRequest {
            id: id.into(),
            target_state: target as i32,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// A transition without verification, for tests about something else
/// (connections made with `conn(kind, "")` have no url to verify).
pub async fn moved(client: &mut Client, id: &str, target: S) -> pb::Connection {
    client
        .transition_connection(pb::TransitionConnectionRequest {
            id: id.into(),
            target_state: target as i32,
            skip_verification: true,
            ..Default::default()
        })
        .await
        .expect("transition")
        .into_inner()
}

pub async fn get(client: &mut Client, id: &str) -> pb::Connection {
    client
        .get_connection(pb::GetConnectionRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

pub async fn events_of(client: &mut Client, id: &str) -> Vec<pb::ConnectionEvent> {
    client
        .list_connection_events(pb::ListConnectionEventsRequest {
            connection_id: id.into(),
            after_revision: 0,
            page_size: 1000,
        })
        .await
        .expect("events")
        .into_inner()
        .events
}

/// The code, ErrorInfo reason and metadata of a failed call; asserts the domain.
pub fn error_info(
    status: &tonic::Status,
) -> (
    tonic::Code,
    String,
    std::collections::HashMap<String, String>,
) {
    let details = status.get_error_details();
    let info = details
        .error_info()
        .expect("every error carries an ErrorInfo");
    assert_eq!(info.domain, "tether.dev");
    (status.code(), info.reason.clone(), info.metadata.clone())
}

pub fn assert_error(
    r: Result<impl std::fmt::Debug, tonic::Status>,
    code: tonic::Code,
    reason: &str,
) -> std::collections::HashMap<String, String> {
    let status = r.expect_err("the call must fail");
    let (c, got, metadata) = error_info(&status);
    assert_eq!((c, got.as_str()), (code, reason), "{status:?}");
    metadata
}

/// A TCP port that accepts connections for as long as the value lives.
pub struct OpenPort {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl OpenPort {
    pub async fn new() -> OpenPort {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        OpenPort { addr, task }
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

impl Drop for OpenPort {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port that refuses connections: bound, so no other test can
/// take it, but never listening.
pub struct ClosedPort {
    pub addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        ClosedPort {
            addr: socket.local_addr().expect("addr"),
            _socket: socket,
        }
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

/// A minimal HTTP server answering every request with `status`.
pub struct HttpStub {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpStub {
    pub async fn new(status: u16) -> HttpStub {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    // Read the request head, then answer and close.
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 {status} Test\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        HttpStub { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/health", self.addr)
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP server for one request that answers 200 only when told to, to hold
/// a verification open while the test does something else.
pub struct GatedHttp {
    pub addr: SocketAddr,
    accepted: tokio::sync::mpsc::Receiver<()>,
    go: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl GatedHttp {
    pub async fn new() -> GatedHttp {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (accepted_tx, accepted) = tokio::sync::mpsc::channel(1);
        let (go, gate) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let _ = accepted_tx.send(()).await;
            let _ = gate.await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        });
        GatedHttp {
            addr,
            accepted,
            go: Some(go),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Waits until the request has arrived.
    pub async fn request_arrived(&mut self) {
        self.accepted.recv().await.expect("a request arrived");
    }

    /// Lets the answer go and waits until it is sent.
    pub async fn answer(mut self) {
        let _ = self.go.take().expect("answered once").send(());
        (&mut self.task).await.expect("gated server");
    }
}

/// Stores a credential of `kind` with a bearer token; its id.
pub async fn bearer_credential(app: &App, kind: &str, token: &str) -> String {
    let mut creds =
        pb::credential_service_client::CredentialServiceClient::new(app.channel.clone());
    creds
        .create_credential(pb::CreateCredentialRequest {
            name: format!("{kind} token"),
            r#type: kind.into(),
            secret: Some(prost_types::Struct {
                fields: [(
                    "token".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(token.into())),
                    },
                )]
                .into(),
            }),
            owner: String::new(),
        })
        .await
        .expect("create credential")
        .into_inner()
        .id
}

/// A credential holding `token` and the CA to trust for it (a TLS stub's).
pub async fn bearer_credential_trusting(app: &App, kind: &str, token: &str, ca: &str) -> String {
    let text = |v: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(v.into())),
    };
    pb::credential_service_client::CredentialServiceClient::new(app.channel.clone())
        .create_credential(pb::CreateCredentialRequest {
            name: format!("{kind} token"),
            r#type: kind.into(),
            secret: Some(prost_types::Struct {
                fields: [
                    ("token".to_string(), text(token)),
                    ("ca_certificate".to_string(), text(ca)),
                ]
                .into(),
            }),
            owner: String::new(),
        })
        .await
        .expect("create credential")
        .into_inner()
        .id
}

// ---- definitions, credentials and discovery helpers ----

/// What a [`RoutedHttp`] stub saw of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// The request target as sent: path and query.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// A loopback HTTP server whose answer depends on the request: `route` maps
/// what it saw (path, `Authorization`) to a status code. Records every request.
pub struct RoutedHttp {
    pub addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<SeenRequest>>>,
    task: JoinHandle<()>,
    ca: Option<String>,
}

async fn answer(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    route: &(dyn Fn(&SeenRequest) -> u16 + Send + Sync),
    log: &std::sync::Mutex<Vec<SeenRequest>>,
) {
    let mut buf = vec![0u8; 4096];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned();
    let authorization = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_owned())
    });
    let request = SeenRequest {
        path,
        authorization,
    };
    let status = route(&request);
    log.lock().unwrap().push(request);
    let reply = format!("HTTP/1.1 {status} Test\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A fresh CA and a certificate for 127.0.0.1 it issued: an acceptor
/// serving that certificate, and the CA's PEM.
pub fn test_tls() -> (tokio_rustls::TlsAcceptor, String) {
    use tokio_rustls::rustls;
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("leaf");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("certificate");
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
}

impl RoutedHttp {
    pub async fn new(route: impl Fn(&SeenRequest) -> u16 + Send + Sync + 'static) -> RoutedHttp {
        RoutedHttp::serve(None, route).await
    }

    /// The same behind TLS, with a certificate for 127.0.0.1 from a CA of
    /// its own (see [`RoutedHttp::ca`]); its urls are `https://`.
    pub async fn tls(route: impl Fn(&SeenRequest) -> u16 + Send + Sync + 'static) -> RoutedHttp {
        RoutedHttp::serve(Some(test_tls()), route).await
    }

    async fn serve(
        tls: Option<(tokio_rustls::TlsAcceptor, String)>,
        route: impl Fn(&SeenRequest) -> u16 + Send + Sync + 'static,
    ) -> RoutedHttp {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let route = Arc::new(route);
        let log = seen.clone();
        let (acceptor, ca) = match tls {
            Some((a, ca)) => (Some(a), Some(ca)),
            None => (None, None),
        };
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let route = route.clone();
                let log = log.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => answer(s, &*route, &log).await,
                        Some(a) => {
                            if let Ok(s) = a.accept(s).await {
                                answer(s, &*route, &log).await
                            }
                        }
                    }
                });
            }
        });
        RoutedHttp {
            addr,
            seen,
            task,
            ca,
        }
    }

    /// The PEM of the CA behind a [`RoutedHttp::tls`] server's certificate.
    pub fn ca(&self) -> &str {
        self.ca.as_deref().expect("a TLS stub")
    }

    /// Answers 200 on exactly these paths and 404 everywhere else.
    pub async fn ok_on(paths: &[&str]) -> RoutedHttp {
        let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        RoutedHttp::new(move |r| if paths.contains(&r.path) { 200 } else { 404 }).await
    }

    /// Over TLS, answers 200 to requests carrying exactly this
    /// `Authorization` value, 401 to the rest.
    pub async fn requiring(authorization: &str) -> RoutedHttp {
        let want = authorization.to_owned();
        RoutedHttp::tls(move |r| {
            if r.authorization.as_deref() == Some(want.as_str()) {
                200
            } else {
                401
            }
        })
        .await
    }

    /// `http://ADDR` (`https://` for a TLS stub) followed by `path`.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// The paths requested so far, in arrival order.
    pub fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|r| r.path).collect()
    }
}

impl Drop for RoutedHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `google.protobuf.Struct` from a JSON object literal.
pub fn json_struct(v: serde_json::Value) -> prost_types::Struct {
    fn value(v: serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        use serde_json::Value as J;
        let kind = match v {
            J::Null => Kind::NullValue(0),
            J::Bool(b) => Kind::BoolValue(b),
            J::Number(n) => Kind::NumberValue(n.as_f64().expect("finite")),
            J::String(s) => Kind::StringValue(s),
            J::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.into_iter().map(value).collect(),
            }),
            J::Object(o) => Kind::StructValue(json_struct(J::Object(o))),
        };
        prost_types::Value { kind: Some(kind) }
    }
    match v {
        serde_json::Value::Object(o) => prost_types::Struct {
            fields: o.into_iter().map(|(k, v)| (k, value(v))).collect(),
        },
        other => panic!("not a JSON object: {other}"),
    }
}

/// A temp folder of definition files `(file name, text)`, for `cfg.models`.
pub fn models_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write definition file");
    }
    dir
}

/// The `field` an INVALID_ARGUMENT error names.
pub fn invalid_field(r: Result<impl std::fmt::Debug, tonic::Status>) -> String {
    let mut metadata = assert_error(r, tonic::Code::InvalidArgument, "INVALID_ARGUMENT");
    metadata
        .remove("field")
        .expect("INVALID_ARGUMENT names a field")
}

/// The current store revision.
pub async fn store_revision(client: &mut Client) -> i64 {
    client
        .list_connection_events(pb::ListConnectionEventsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .revision
}
