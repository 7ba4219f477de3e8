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
    /// The admin listener's address, when it was started with one.
    pub admin: Option<SocketAddr>,
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
        // Tests that fan out (hundreds of watchers, bursts of writes) run as
        // one principal; the limits have tests of their own.
        rate_limit: 0,
        max_watches: 10_000,
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
        App::launch(dir, tweak, None, false).await
    }

    /// Starts a server with an admin listener on 127.0.0.1:0 too (`App::admin`).
    pub async fn start_admin(tweak: impl FnOnce(&mut Config)) -> App {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        App::launch(dir, tweak, None, true).await
    }

    /// Starts a server with TLS settings in `tweak` and a client that connects
    /// with `tls` (which must be accepted).
    pub async fn start_tls(
        tweak: impl FnOnce(&mut Config),
        tls: tonic::transport::ClientTlsConfig,
    ) -> App {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        App::launch(dir, tweak, Some(tls), false).await
    }

    async fn launch(
        dir: Arc<tempfile::TempDir>,
        tweak: impl FnOnce(&mut Config),
        tls: Option<tonic::transport::ClientTlsConfig>,
        with_admin: bool,
    ) -> App {
        let mut config = test_config();
        config.db = Some(dir.path().join("tether.db"));
        #[cfg(feature = "postgres")]
        if std::env::var_os("TETHER_TEST_DB").is_some_and(|v| v == "postgres") {
            // The same tests over a database of their own in a throwaway
            // cluster; a restart in the same folder finds the same database.
            let named = dir.path().join("postgres.url");
            let url = match std::fs::read_to_string(&named) {
                Ok(url) => url,
                Err(_) => {
                    let url = tokio::task::spawn_blocking(|| {
                        crate::pg_cluster::Cluster::shared().database()
                    })
                    .await
                    .expect("a database");
                    std::fs::write(&named, &url).expect("note the database");
                    url
                }
            };
            config.db = Some(url.into());
            config.secret_key_file = Some(dir.path().join("tether.key"));
        }
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let admin_listener = match with_admin {
            true => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
            false => None,
        };
        let admin = admin_listener
            .as_ref()
            .map(|l| l.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        let handle = tokio::spawn(async move {
            let mut server = tether::server::Server::open(config).await?;
            if let Some(l) = admin_listener {
                server = server.with_admin(l);
            }
            server.serve(listener, stopped).await
        });
        let endpoint = match tls {
            None => Channel::from_shared(format!("http://{addr}")).expect("uri"),
            Some(tls) => Channel::from_shared(format!("https://{addr}"))
                .expect("uri")
                .tls_config(tls)
                .expect("tls config"),
        };
        let channel = endpoint.connect().await.expect("connect");
        App {
            addr,
            client: ConnectionServiceClient::new(channel.clone()),
            channel,
            dir,
            admin,
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

    /// A plaintext client on a connection of its own (so flow control on
    /// another client's streams cannot hold its calls up).
    pub async fn new_client(&self) -> Client {
        ConnectionServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
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

/// The hosts test credentials may be sent to: the made-up `*.example`
/// names and the loopback peers.
pub fn test_hosts() -> Vec<String> {
    ["*.example", "127.0.0.1", "localhost"]
        .map(String::from)
        .to_vec()
}

/// Stores a credential of `kind` with a bearer token (and the test CA as its
/// only trusted root); its id.
pub async fn bearer_credential(app: &App, kind: &str, token: &str) -> String {
    let mut creds =
        pb::credential_service_client::CredentialServiceClient::new(app.channel.clone());
    creds
        .create_credential(pb::CreateCredentialRequest {
            name: format!("{kind} token"),
            r#type: kind.into(),
            secret: Some(prost_types::Struct {
                fields: [("token", token), ("ca_certificate", &test_ca().pem)]
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue(v.into())),
                            },
                        )
                    })
                    .into(),
            }),
            owner: String::new(),
            allowed_hosts: test_hosts(),
        })
        .await
        .expect("create credential")
        .into_inner()
        .id
}

// ---- definitions, credentials and discovery helpers ----

/// A plain or TLS stream, for stubs that serve both.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

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
    tls: bool,
}

/// The CA the HTTPS peers' certificates come from, and their server side.
pub struct PeerCa {
    /// The CA certificate, PEM: what a credential's `ca_certificate` names.
    pub pem: String,
    pub server: Arc<tokio_rustls::rustls::ServerConfig>,
}

/// The peers' CA, made once per test binary.
pub fn test_ca() -> &'static PeerCa {
    static CA: std::sync::OnceLock<PeerCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let ca = TestCa::new("tether peer ca");
        let leaf = ca.server();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let server = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("cert pem")],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key pem"),
            )
            .expect("server config");
        PeerCa {
            pem: ca.pem.clone(),
            server: Arc::new(server),
        }
    })
}

impl RoutedHttp {
    pub async fn new(route: impl Fn(&SeenRequest) -> u16 + Send + Sync + 'static) -> RoutedHttp {
        RoutedHttp::serve(route, false).await
    }

    /// The same over HTTPS, with a certificate from [`test_ca`].
    pub async fn new_tls(
        route: impl Fn(&SeenRequest) -> u16 + Send + Sync + 'static,
    ) -> RoutedHttp {
        RoutedHttp::serve(route, true).await
    }

    async fn serve(
        route: impl Fn(&SeenRequest) -> u16 + Send + Sync + 'static,
        tls: bool,
    ) -> RoutedHttp {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let route = Arc::new(route);
        let log = seen.clone();
        let acceptor = tls.then(|| tokio_rustls::TlsAcceptor::from(test_ca().server.clone()));
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let route = route.clone();
                let log = log.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut s: Box<dyn Io> = match acceptor {
                        None => Box::new(s),
                        Some(a) => match a.accept(s).await {
                            Ok(t) => Box::new(t),
                            Err(_) => return,
                        },
                    };
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
                    let reply = format!(
                        "HTTP/1.1 {status} Test\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        RoutedHttp {
            addr,
            seen,
            task,
            tls,
        }
    }

    /// Answers 200 on exactly these paths and 404 everywhere else.
    pub async fn ok_on(paths: &[&str]) -> RoutedHttp {
        let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        RoutedHttp::new(move |r| if paths.contains(&r.path) { 200 } else { 404 }).await
    }

    /// Over HTTPS (credentials are never sent in the clear), answers 200 to
    /// requests carrying exactly this `Authorization` value, 401 to the rest.
    pub async fn requiring(authorization: &str) -> RoutedHttp {
        let want = authorization.to_owned();
        RoutedHttp::new_tls(move |r| {
            if r.authorization.as_deref() == Some(want.as_str()) {
                200
            } else {
                401
            }
        })
        .await
    }

    /// `http://ADDR` (or `https://`) followed by `path`.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
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

// ---- authentication helpers ----

/// Adds `authorization: Bearer <token>` to every call (nothing when `None`).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

pub type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Clients of every service that present one bearer token (or none).
#[derive(Clone)]
pub struct As {
    pub conn: ConnectionServiceClient<Authed>,
    pub creds: pb::credential_service_client::CredentialServiceClient<Authed>,
    pub defs: pb::definition_service_client::DefinitionServiceClient<Authed>,
    pub health: tonic_health::pb::health_client::HealthClient<Authed>,
    pub reflection:
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient<Authed>,
    /// For methods no generated client has.
    pub raw: tonic::client::Grpc<Authed>,
}

impl As {
    pub fn new(channel: &Channel, token: Option<&str>) -> As {
        let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")));
        let svc = || {
            tonic::service::interceptor::InterceptedService::new(channel.clone(), bearer.clone())
        };
        As {
            conn: ConnectionServiceClient::new(svc()),
            creds: pb::credential_service_client::CredentialServiceClient::new(svc()),
            defs: pb::definition_service_client::DefinitionServiceClient::new(svc()),
            health: tonic_health::pb::health_client::HealthClient::new(svc()),
            reflection:
                tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
                    svc(),
                ),
            raw: tonic::client::Grpc::new(svc()),
        }
    }
}

/// One access-file token entry: principal, token, roles, owners.
pub struct Grant<'a> {
    pub principal: &'a str,
    pub token: &'a str,
    pub roles: &'a [&'a str],
    pub owners: &'a [&'a str],
}

/// The text of an access file listing these tokens (by digest).
pub fn access_file(grants: &[Grant<'_>]) -> String {
    let mut text = String::from("tokens:\n");
    for g in grants {
        text.push_str(&format!(
            "  - principal: {}\n    sha256: {}\n    roles: [{}]\n    owners: [{}]\n",
            g.principal,
            tether::access::token_digest(g.token),
            g.roles.join(", "),
            g.owners
                .iter()
                .map(|o| format!("{o:?}"))
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    text
}

/// Asserts that `r` failed with this code and `ErrorInfo.reason`; its status.
pub fn expect_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    reason: &str,
) -> tonic::Status {
    let status = r.expect_err("the call must fail");
    let (c, got, _) = error_info(&status);
    assert_eq!((c, got.as_str()), (code, reason), "{status:?}");
    status
}
// ---- TLS helpers ----

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct CertKey {
    pub cert: String,
    pub key: String,
}

impl CertKey {
    /// Writes `NAME.crt` and `NAME.key` into `dir`; their paths.
    pub fn write(&self, dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &self.cert).expect("write cert");
        std::fs::write(&key, &self.key).expect("write key");
        (cert, key)
    }

    /// A client identity for tonic.
    pub fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert, &self.key)
    }
}

/// A certificate authority made for one test.
pub struct TestCa {
    /// The CA certificate, PEM.
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Signs a leaf made from `params`.
    pub fn sign(&self, params: rcgen::CertificateParams) -> CertKey {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        CertKey {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> CertKey {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                .expect("server params");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose subject common name is `cn`.
    pub fn client(&self, cn: &str) -> CertKey {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    /// This CA as the only root a client trusts.
    pub fn certificate(&self) -> tonic::transport::Certificate {
        tonic::transport::Certificate::from_pem(&self.pem)
    }
}

/// A client TLS configuration that trusts only `ca` and expects the server
/// to be `localhost`; with `identity`, it presents that client certificate.
pub fn client_tls(ca: &TestCa, identity: Option<&CertKey>) -> tonic::transport::ClientTlsConfig {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(ca.certificate())
        .domain_name("localhost");
    match identity {
        Some(id) => tls.identity(id.identity()),
        None => tls,
    }
}

/// Connects to `addr` over TLS with `tls` and asks the health service; the
/// error text if the connection or the call fails.
pub async fn tls_health(
    addr: SocketAddr,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<(), String> {
    let channel = Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .map_err(|e| format!("tls config: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    health(channel).await
}

/// Asks the health service over `channel`; the error text if it fails.
pub async fn health(channel: Channel) -> Result<(), String> {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("health: {s:?}"))
}

// ---- the binary ----

/// A `tether serve` process, as an operator runs it.
pub struct Binary {
    child: tokio::process::Child,
    /// The port it listens on.
    port: u16,
    /// The admin listener's address, when it was started with `--admin-listen`.
    pub admin: Option<SocketAddr>,
    stderr: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Binary {
    /// Starts `tether serve ARGS` with `env` added, without waiting for it;
    /// its stderr lines arrive on the receiver.
    pub fn start_with_env(
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (
        tokio::process::Child,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tether");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stderr = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    }

    /// Runs `tether ARGS` to its exit (at most 30 s) and returns what it did.
    pub async fn run(args: &[&str]) -> std::process::Output {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(args)
            .env("RUST_LOG", "info")
            .output();
        tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .expect("exits within 30 s")
            .expect("run tether")
    }

    pub fn start(
        args: &[&str],
    ) -> (
        tokio::process::Child,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        Binary::start_with_env(args, &[])
    }

    /// Starts `tether serve ARGS` and waits for the address it prints once it listens.
    /// `tether serve` on a free loopback port over `db`, without background
    /// probing, with `extra` flags added.
    pub async fn serve_db(db: &std::path::Path, extra: &[&str]) -> Binary {
        let db = db.to_str().expect("a UTF-8 path");
        let mut args = vec!["--listen", "127.0.0.1:0", "--db", db, "--disable-monitor"];
        args.extend_from_slice(extra);
        Binary::serve(&args).await
    }

    pub async fn serve(args: &[&str]) -> Binary {
        Binary::serve_with_env(args, &[]).await
    }

    pub async fn serve_with_env(args: &[&str], env: &[(&str, &str)]) -> Binary {
        use tokio::io::AsyncBufReadExt;
        let (mut child, stderr) = Binary::start_with_env(args, env);
        let stdout = child.stdout.take().unwrap();
        let mut stdout = tokio::io::BufReader::new(stdout);
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
            .await
            .expect("tether prints its address within 30 s")
            .expect("read stdout");
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("tether listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        // With an admin listener, a second line gives its address.
        let mut admin = None;
        if args.contains(&"--admin-listen") {
            let mut line = String::new();
            tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
                .await
                .expect("tether prints its admin address")
                .expect("read stdout");
            admin = Some(
                line.trim()
                    .strip_prefix("tether admin listening on ")
                    .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                    .parse()
                    .unwrap(),
            );
        }
        Binary {
            child,
            port: addr.port(),
            admin,
            stderr,
        }
    }

    /// The loopback address of its port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A plaintext client.
    pub async fn client(&self) -> Client {
        ConnectionServiceClient::connect(format!("http://{}", self.addr()))
            .await
            .expect("connect")
    }

    pub async fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = tokio::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .await
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for a stderr line containing `text`; the line.
    pub async fn logged(&mut self, text: &str) -> String {
        let mut lines = self.lines_until(text).await;
        lines.pop().expect("the matching line")
    }

    /// Every stderr line up to and including the next one containing `text`.
    pub async fn lines_until(&mut self, text: &str) -> Vec<String> {
        let mut lines = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let line = self.stderr.recv().await.expect("tether is running");
                let found = line.contains(text);
                lines.push(line);
                if found {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {text:?} logged within 30 s"));
        lines
    }

    /// Its exit status; a server that does not stop fails the test instead of hanging it.
    pub async fn wait(mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("tether exits within 30 s")
            .expect("wait")
    }

    /// SIGTERM, and a clean exit.
    pub async fn stop(self) {
        self.signal("-TERM").await;
        assert_eq!(self.wait().await.code(), Some(0));
    }
}
