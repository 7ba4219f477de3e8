//! [`Prober`]: runs one check, bounded by a timeout (waiting for a permit
//! included) and by a concurrency limit shared by every probe and
//! verification in the process. It picks the check and the HTTP client; the
//! check modules do the I/O.

use super::client_auth::{ClientAuth, Scrubber, client_builder};
use super::egress::{Blocked, Egress, EgressPolicy, Resolve, blocked_in};
use super::target::{Target, plan};
use super::{Check, Observation, Secret, Verdict, grpc, http, tcp};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Runs reachability checks. Cheap to clone; clones share the HTTP client
/// and the concurrency limit.
#[derive(Clone)]
pub(crate) struct Prober {
    /// Shared by every check without TLS credentials of its own.
    http: reqwest::Client,
    timeout: Duration,
    concurrency: usize,
    permits: Arc<Semaphore>,
    egress: Egress,
}

impl Prober {
    /// Each probe takes at most `timeout`, and at most `concurrency` (at
    /// least one) run at once; names are resolved by `resolver` and only
    /// addresses `policy` allows are connected to. `Err` only when no HTTP
    /// client can be built.
    pub(crate) fn new(
        timeout: Duration,
        concurrency: usize,
        policy: EgressPolicy,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Prober, reqwest::Error> {
        let concurrency = concurrency.max(1);
        let egress = Egress::new(policy, resolver);
        Ok(Prober {
            http: client_builder(timeout, &egress).build()?,
            timeout,
            concurrency,
            permits: Arc::new(Semaphore::new(concurrency)),
            egress,
        })
    }

    /// Checks `url` the way `check` says, with `secret`'s credentials.
    ///
    /// `None` when there is nothing to check: [`Check::None`], or
    /// [`Check::Url`] with an empty url or a scheme other than tcp, http or
    /// https. Any other check on a url it cannot use (none, no port, a
    /// scheme it does not speak) is [`Verdict::Unreachable`] saying why; an
    /// unusable secret is [`Verdict::CredentialsRejected`] naming the field.
    /// See [`Observation::latency`] for what the latency measures.
    pub(crate) async fn probe(
        &self,
        url: &str,
        check: &Check,
        secret: Option<&Secret>,
    ) -> Option<Observation> {
        let deadline = Instant::now() + self.timeout;
        let not_started = |verdict| {
            Some(Observation {
                verdict,
                latency: Duration::ZERO,
            })
        };
        let target = match plan(url, check)? {
            Ok(target) => target,
            Err(why) => return not_started(Verdict::Unreachable(why)),
        };
        // A TCP connect sends nothing, so its secret is not even read.
        let client_auth = match &target {
            Target::Tcp(_) => ClientAuth::default(),
            _ => match ClientAuth::from_secret(secret) {
                Ok(c) => c,
                Err(why) => return not_started(Verdict::CredentialsRejected(why)),
            },
        };
        let scrub = Scrubber::new(secret);
        let sends_secret = client_auth.auth.is_some()
            || client_auth.tls.as_ref().is_some_and(|t| t.has_identity());
        if sends_secret && cleartext(&target) {
            return not_started(Verdict::CredentialsRejected(CLEARTEXT.into()));
        }

        let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, self.permits.acquire()).await
        else {
            return not_started(Verdict::NotChecked(format!(
                "not checked: all {} probe slots stayed busy for the whole {} ms timeout",
                self.concurrency,
                self.timeout.as_millis()
            )));
        };
        let started = Instant::now();
        let verdict = match &target {
            Target::Tcp(to) => tcp::check(to, &self.egress, deadline).await,
            Target::Http(urls) => {
                // Building a client with TLS material costs more than a
                // request, so it happens under the permit.
                let own;
                let client = match client_auth.tls {
                    None => &self.http,
                    Some(tls) => match tls.client(self.timeout, &self.egress) {
                        Ok(c) => {
                            own = c;
                            &own
                        }
                        Err(why) => return not_started(Verdict::CredentialsRejected(why)),
                    },
                };
                http::check(
                    client,
                    &self.egress,
                    urls,
                    client_auth.auth.as_ref(),
                    deadline,
                    &scrub,
                )
                .await
            }
            Target::Grpc {
                endpoint,
                service,
                tls,
            } => {
                let tls = tls.then(|| super::grpc::tls(client_auth.tls.as_ref(), &endpoint.host));
                grpc::check(
                    endpoint,
                    service,
                    tls,
                    &self.egress,
                    client_auth.auth.as_ref(),
                    deadline,
                    &scrub,
                )
                .await
            }
        };
        Some(Observation {
            verdict,
            latency: started.elapsed(),
        })
    }
}

const CLEARTEXT: &str = "not sent: a credential is never sent over cleartext (http:// or plaintext grpc); \
     use an https:// url";

/// Whether the target is reached without TLS.
fn cleartext(target: &Target) -> bool {
    match target {
        Target::Tcp(_) => false,
        Target::Http(urls) => urls.iter().any(|u| u.scheme() != "https"),
        Target::Grpc { tls, .. } => !tls,
    }
}

/// What a client may be told of a failed connection or request: the class
/// of failure, never the text of a peer or a library.
pub(crate) fn failure_class(e: &(dyn std::error::Error + 'static), tls: bool) -> &'static str {
    if let Some(b) = blocked_in(e) {
        return match b {
            Blocked::Denied => "denied by egress policy",
            Blocked::NotResolved => "name did not resolve",
        };
    }
    let mut invalid_data = false;
    for err in causes(e) {
        if err.is::<tokio_rustls::rustls::Error>() {
            return "tls handshake failed";
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return "refused",
                io::ErrorKind::TimedOut => return "timed out",
                io::ErrorKind::InvalidData => invalid_data = true,
                _ => {}
            }
        }
    }
    if invalid_data && tls {
        "tls handshake failed"
    } else {
        "unreachable"
    }
}

/// An error and its causes, looking inside `io::Error`s too: their
/// `source` skips the error they wrap.
pub(crate) fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |err| match err.downcast_ref::<io::Error>() {
        Some(io) => match io.get_ref() {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => std::error::Error::source(io),
        },
        None => err.source(),
    })
}

/// Milliseconds since `started`, for messages.
pub(crate) fn ms(started: Instant) -> u128 {
    started.elapsed().as_millis()
}

/// The error and its causes on one line: reqwest's top-level message alone
/// ("error sending request") does not say what went wrong.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s = s.to_string();
        // Some errors repeat their cause in their own message.
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = source.and_then(|e| e.source());
    }
    out
}
