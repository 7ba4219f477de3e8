//! Reachability checks. A [`Verifier`] looks at a connection and reports what
//! it saw; it never changes state itself (the engine decides what a result
//! means for the lifecycle).
//!
//! [`GenericVerifier`] is the check every kind gets until kinds define their
//! own: TCP connect for `tcp://host:port`, HTTP(S) GET for `http(s)://` urls,
//! each bounded by a timeout and a global concurrency limit.

mod check;

pub use check::{Check, Secret};

use crate::connection::Connection;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// What a check saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Reachable and usable; the detail says what answered.
    Reachable(String),
    /// Could not be reached, or answered with an error.
    Unreachable(String),
    /// Reached, but refused the credentials (HTTP 401/403).
    CredentialsRejected(String),
}

pub type VerifyFuture<'a> = Pin<Box<dyn Future<Output = Option<Verdict>> + Send + 'a>>;

/// Checks whether a connection is reachable and its credentials accepted.
pub trait Verifier: Send + Sync {
    /// `None` when this connection has no check (its kind defines none).
    fn verify<'a>(&'a self, connection: &'a Connection) -> VerifyFuture<'a>;
}

/// TCP and HTTP(S) checks by url scheme.
pub struct GenericVerifier {
    http: reqwest::Client,
    timeout: Duration,
    permits: Arc<Semaphore>,
}

impl GenericVerifier {
    pub fn new(timeout: Duration, concurrency: usize) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect already proves the server answers; following it could
            // leave the host the user named.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tether/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(GenericVerifier {
            http,
            timeout,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        })
    }

    async fn check_tcp(&self, url: &url::Url) -> Verdict {
        let (Some(host), Some(port)) = (url.host_str(), url.port()) else {
            return Verdict::Unreachable("tcp url needs a host and a port".into());
        };
        let started = Instant::now();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect((host, port))).await
        {
            Ok(Ok(_)) => Verdict::Reachable(format!(
                "tcp connect to {host}:{port} succeeded in {} ms",
                started.elapsed().as_millis()
            )),
            Ok(Err(e)) => Verdict::Unreachable(format!("tcp connect to {host}:{port}: {e}")),
            Err(_) => Verdict::Unreachable(format!(
                "tcp connect to {host}:{port} timed out after {} ms",
                self.timeout.as_millis()
            )),
        }
    }

    async fn check_http(&self, target: &url::Url) -> Verdict {
        let url = redacted(target);
        let started = Instant::now();
        match self.http.get(target.as_str()).send().await {
            Ok(resp) => {
                let status = resp.status();
                let ms = started.elapsed().as_millis();
                if status.is_success() || status.is_redirection() {
                    Verdict::Reachable(format!("GET {url}: HTTP {} in {ms} ms", status.as_u16()))
                } else if status.as_u16() == 401 || status.as_u16() == 403 {
                    Verdict::CredentialsRejected(format!("GET {url}: HTTP {}", status.as_u16()))
                } else {
                    Verdict::Unreachable(format!("GET {url}: HTTP {}", status.as_u16()))
                }
            }
            Err(e) if e.is_timeout() => Verdict::Unreachable(format!(
                "GET {url}: timed out after {} ms",
                self.timeout.as_millis()
            )),
            Err(e) => Verdict::Unreachable(format!("GET {url}: {}", error_chain(&e.without_url()))),
        }
    }
}

/// The url without any user name or password, fit for messages and logs.
fn redacted(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// The error and its causes on one line: reqwest's top-level message alone
/// ("error sending request") does not say what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl Verifier for GenericVerifier {
    fn verify<'a>(&'a self, connection: &'a Connection) -> VerifyFuture<'a> {
        Box::pin(async move {
            let url = url::Url::parse(&connection.url).ok()?;
            let scheme = url.scheme();
            if !matches!(scheme, "tcp" | "http" | "https") {
                return None;
            }
            let _permit = self.permits.acquire().await.ok()?;
            Some(match scheme {
                "tcp" => self.check_tcp(&url).await,
                _ => self.check_http(&url).await,
            })
        })
    }
}
