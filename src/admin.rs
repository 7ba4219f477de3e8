//! The admin listener (`--admin-listen`): plain HTTP/1.1 for operators and
//! their tools, apart from the gRPC port. `/metrics` is the Prometheus text
//! of [`crate::metrics`] plus what is read at scrape time (the kept counts,
//! the revision, the space in use, the file sizes: a few rows and two
//! `stat`s, never a scan); `/healthz` answers 200 while the process serves;
//! `/readyz` answers 200 exactly while `grpc.health.v1.Health` says SERVING
//! (the store can commit, and shutdown has not begun), else 503. Anything
//! else is 404 (a method other than GET or HEAD: 405).
//!
//! It serves no secret and changes nothing, and has no authentication:
//! bind it where only the scraper can reach it. It runs until the store is
//! closed, so `/readyz` answers 503 all through a graceful shutdown.

use crate::metrics::{CONTENT_TYPE, Metrics};
use crate::service::health;
use crate::store::Store;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

/// Admin connections open at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;

/// Longest a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin paths read.
pub(crate) struct Admin {
    store: Store,
    metrics: Arc<Metrics>,
    /// Cancelled when shutdown begins.
    stopping: CancellationToken,
    /// The store's fault flag, as health reads it.
    fault: watch::Receiver<bool>,
    /// One scrape at a time: a scrape sets the gauges it reads, then encodes.
    scrape: tokio::sync::Mutex<()>,
}

impl Admin {
    pub(crate) fn new(store: Store, stopping: CancellationToken) -> Admin {
        Admin {
            metrics: store.metrics(),
            fault: store.storage_fault(),
            store,
            stopping,
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    async fn answer(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz or /readyz\n",
            );
        }
        if method != Method::GET && method != Method::HEAD {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            return r;
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                if health::serving(&self.stopping, &self.fault) {
                    text(StatusCode::OK, "ready\n")
                } else if self.stopping.is_cancelled() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: shutting down\n",
                    )
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: writes cannot commit (storage fault)\n",
                    )
                }
            }
            _ => {
                let _one = self.scrape.lock().await;
                match self.store.scrape().await {
                    Ok(scraped) => {
                        let mut r =
                            Response::new(Full::new(Bytes::from(self.metrics.encode(&scraped))));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(CONTENT_TYPE),
                        );
                        r
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics scrape cannot read the store");
                        text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "cannot read the store; see the server log\n",
                        )
                    }
                }
            }
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Serves the admin paths on `listener` until `closed` is cancelled; then
/// lets requests in progress finish and returns.
pub(crate) async fn serve(listener: TcpListener, admin: Arc<Admin>, closed: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let slot = tokio::select! {
            _ = closed.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = closed.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: try again shortly.
                    tracing::debug!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (admin, closed) = (admin.clone(), closed.clone());
        connections.spawn(async move {
            let _slot = slot;
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let admin = admin.clone();
                    async move {
                        let mut r = admin.answer(request.method(), request.uri().path()).await;
                        if request.method() == Method::HEAD {
                            *r.body_mut() = Full::new(Bytes::new());
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = closed.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}
