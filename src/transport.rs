//! The listening side of the wire: accepting TCP connections within a limit,
//! TLS (and client certificates) on them, reloading the certificate files, and
//! the [`Peer`] each request carries in its extensions. It knows nothing of
//! gRPC services and decides nothing about who may do what: it only says who
//! is on the other end.
//!
//! Timeouts, and what each one closes:
//! - `handshake_timeout` bounds the time from accept until the TLS handshake is
//!   done (or, in plaintext, until the client sends its first byte). A client
//!   that connects and says nothing is closed then, and never blocks accepting:
//!   every handshake runs in its own task.
//! - Once a connection is handed to tonic, HTTP/2 keepalive pings (configured
//!   on the tonic builder in `server`) close a peer that stops answering.
//!
//! TCP keepalive is left off: tonic ignores its setting for connections from
//! a custom incoming stream, and the HTTP/2 pings find dead peers anyway.

use crate::error::Error;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The certificate files of a TLS listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain the server presents, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key: PathBuf,
    /// PEM CA certificates that client certificates are verified against.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients that present no certificate (only with `client_ca`).
    pub require_client_cert: bool,
}

/// How the listener accepts connections.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Most connections open at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Longest from accept to a finished TLS handshake (plaintext: to the first byte).
    pub handshake_timeout: Duration,
}

/// Who is on the other end of a connection; tonic puts it in the extensions
/// of every request that arrives on it (`request.extensions().get::<Peer>()`,
/// on the `http::Request` a tower layer sees as on the `tonic::Request`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The principal name of the client certificate the handshake verified
    /// (see [`principal_name`]); `None` without a certificate, or when it
    /// names no principal.
    pub certificate: Option<String>,
}

/// The TLS server configuration in force, replaced whole on reload; a
/// handshake takes the one current when it starts.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// The files as they were when first read.
    loaded: crate::reload::Stamp,
}

impl Tls {
    /// Reads the files; an unreadable or unusable one is an error naming it.
    pub fn load(files: TlsFiles) -> Result<Tls, Error> {
        let loaded = crate::reload::stamp(&tls_paths(&files));
        let config = server_config(&files)?;
        // Not refused: orchestrators often mount secrets 0644 inside a
        // private pod; but said, since elsewhere it is a leak.
        if let Ok(meta) = std::fs::metadata(&files.key) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %files.key.display(),
                    "the TLS key is readable by group or others; chmod 600 it"
                );
            }
        }
        Ok(Tls {
            files,
            current: RwLock::new(Arc::new(config)),
            loaded,
        })
    }

    /// `"mtls (client certificate required)"`, `"mtls (client certificate optional)"` or `"tls"`.
    pub fn mode(&self) -> &'static str {
        match (&self.files.client_ca, self.files.require_client_cert) {
            (Some(_), true) => "mtls (client certificate required)",
            (Some(_), false) => "mtls (client certificate optional)",
            (None, _) => "tls",
        }
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl crate::reload::Reloadable for Tls {
    fn what(&self) -> &'static str {
        "tls certificates"
    }

    fn paths(&self) -> Vec<PathBuf> {
        tls_paths(&self.files)
    }

    fn loaded(&self) -> crate::reload::Stamp {
        self.loaded.clone()
    }

    /// New handshakes use the new files; on failure the old configuration stays.
    fn reload(&self) -> Result<(), Error> {
        let config = Arc::new(server_config(&self.files)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }
}

fn tls_paths(files: &TlsFiles) -> Vec<PathBuf> {
    let mut paths = vec![files.cert.clone(), files.key.clone()];
    paths.extend(files.client_ca.clone());
    paths
}

fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(&files.cert, "tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_error("tls-key", &files.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("tls: {e}")))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca, "tls-client-ca")? {
                roots
                    .add(cert)
                    .map_err(|e| file_error("tls-client-ca", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| file_error("tls-client-ca", ca, e))?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| file_error("tls-key", &files.key, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(flag, path, e))?;
    if certs.is_empty() {
        return Err(file_error(flag, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn file_error(flag: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid(flag, format!("{}: {e}", path.display()))
}

/// The name a client certificate stands for: its subject common name, else
/// its first URI subject alternative name, else its first DNS one.
pub fn principal_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
    {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    use x509_parser::extensions::GeneralName;
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })
        })
        .map(str::to_owned)
}

/// One accepted connection, plaintext or TLS, holding its place under the
/// connection limit until it is closed.
pub struct Conn {
    // Declared first so it is released before the socket closes: a peer that
    // sees the close can connect again straight away.
    permit: Option<OwnedSemaphorePermit>,
    stream: Stream,
    peer: Peer,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    /// Always `false`, though both streams could gather writes. HTTP/2 (`h2`)
    /// keeps a DATA payload of 256 bytes or more out of its write buffer when
    /// the stream gathers, and must then write it out before it can buffer
    /// the next frame: a unary answer of that size (one carrying a connection
    /// usually is) took two writes, its headers and message, then its
    /// trailers, and answers ready at once on one connection seldom shared
    /// one. Told the stream does not gather, `h2` copies payloads under 1 KiB
    /// into its buffer, so an answer goes out in one write, shared with the
    /// others ready with it (docs/BENCHMARKS.md, *One write per answer*).
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The connection is finished once we close our side: its slot is free.
        this.permit = None;
        match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` until `stopping` is cancelled or the
/// returned stream is dropped, and yields each once its handshake is done.
/// Over `max_connections`, a new connection is closed at once. The stream
/// never yields an error: a failed handshake is logged at debug and dropped.
pub fn incoming(
    listener: TcpListener,
    config: &TransportConfig,
    tls: Option<Arc<Tls>>,
    stopping: CancellationToken,
    tasks: &TaskTracker,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let handshake_timeout = config.handshake_timeout;
    let handshakes = tasks.clone();
    tasks.spawn(async move {
        loop {
            let (stream, addr) = tokio::select! {
                _ = stopping.cancelled() => return,
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, or a connection reset before
                        // accept: neither ends the listener. The pause keeps
                        // the first from spinning until a descriptor is free.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::select! {
                            _ = stopping.cancelled() => return,
                            _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                        }
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%addr, "connection limit reached; closing the new connection");
                drop(stream);
                continue;
            };
            // Without TCP_NODELAY, small streamed messages wait on delayed ACKs.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY");
            }
            let tx = tx.clone();
            let tls = tls.as_ref().map(|t| t.current());
            let stopping = stopping.clone();
            handshakes.spawn(async move {
                let done = tokio::select! {
                    _ = stopping.cancelled() => return,
                    r = tokio::time::timeout(handshake_timeout, handshake(stream, addr, tls)) => r,
                };
                match done {
                    Ok(Ok((stream, peer))) => {
                        let conn = Conn {
                            permit: Some(permit),
                            stream,
                            peer,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => match refused_certificate(&e) {
                        // The client tried to authenticate and failed: an
                        // audited refusal, like a bad token.
                        Some(why) => tracing::warn!(
                            target: "tether::audit",
                            principal = "-",
                            method = "-",
                            peer = %addr,
                            code = "Unauthenticated",
                            why = %why,
                            "call refused"
                        ),
                        None => tracing::debug!(%addr, error = %e, "handshake failed"),
                    },
                    Err(_) => tracing::debug!(%addr, "handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Why a handshake failed on the client's certificate (not verified, or
/// none when one is required); `None` for any other failure.
fn refused_certificate(e: &io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(why) => {
            Some(format!("client certificate refused: {why:?}"))
        }
        rustls::Error::NoCertificatesPresented => {
            Some("no client certificate, and one is required".into())
        }
        _ => None,
    }
}

async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<(Stream, Peer)> {
    let Some(tls) = tls else {
        // Nothing to negotiate; waiting for the first byte keeps a silent
        // client under the same timeout as a TLS one. (A peek, because
        // `readable` may report readiness before any byte has arrived.)
        stream.peek(&mut [0u8; 1]).await?;
        let peer = Peer {
            addr,
            certificate: None,
        };
        return Ok((Stream::Plain(stream), peer));
    };
    let stream = TlsAcceptor::from(tls).accept(stream).await?;
    let certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| principal_name(leaf));
    let peer = Peer { addr, certificate };
    Ok((Stream::Tls(Box::new(stream)), peer))
}
