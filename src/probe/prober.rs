//! [`Prober`]: runs one check, bounded by a timeout (waiting for a permit
//! included) and by a concurrency limit shared by every probe and
//! verification in the process. It picks the check and the HTTP client; the
//! check modules do the I/O.

use super::credentials::{Credentials, Scrubber, client_builder};
use super::target::{Target, plan};
use super::{Check, ProbeResult, Secret, Verdict, grpc, http, tcp};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Runs reachability checks. Cheap to clone; clones share the HTTP client
/// and the concurrency limit.
#[derive(Clone)]
pub struct Prober {
    /// Shared by every check without TLS credentials of its own.
    http: reqwest::Client,
    timeout: Duration,
    concurrency: usize,
    permits: Arc<Semaphore>,
}

impl Prober {
    /// Each probe takes at most `timeout`, and at most `concurrency` (at
    /// least one) run at once. `Err` only when no HTTP client can be built.
    pub fn new(timeout: Duration, concurrency: usize) -> Result<Prober, reqwest::Error> {
        let concurrency = concurrency.max(1);
        Ok(Prober {
            http: client_builder(timeout).build()?,
            timeout,
            concurrency,
            permits: Arc::new(Semaphore::new(concurrency)),
        })
    }

    /// Checks `url` the way `check` says, with `secret`'s credentials.
    ///
    /// `None` when there is nothing to check: [`Check::None`], or
    /// [`Check::Url`] with an empty url or a scheme other than tcp, http or
    /// https. Any other check on a url it cannot use (none, no port, a
    /// scheme it does not speak) is [`Verdict::Unreachable`] saying why; an
    /// unusable secret is [`Verdict::CredentialsRejected`] naming the field.
    /// See [`ProbeResult::latency`] for what the latency measures.
    pub async fn probe(
        &self,
        url: &str,
        check: &Check,
        secret: Option<&Secret>,
    ) -> Option<ProbeResult> {
        let deadline = Instant::now() + self.timeout;
        let not_started = |verdict| {
            Some(ProbeResult {
                verdict,
                latency: Duration::ZERO,
            })
        };
        let target = match plan(url, check)? {
            Ok(target) => target,
            Err(why) => return not_started(Verdict::Unreachable(why)),
        };
        // A TCP connect sends nothing, so its secret is not even read.
        let credentials = match &target {
            Target::Tcp(_) => Credentials::default(),
            _ => match Credentials::from_secret(secret) {
                Ok(c) => c,
                Err(why) => return not_started(Verdict::CredentialsRejected(why)),
            },
        };
        let scrub = Scrubber::new(secret);

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
            Target::Tcp(to) => tcp::check(to, deadline).await,
            Target::Http(urls) => {
                // Building a client with TLS material costs more than a
                // request, so it happens under the permit.
                let own;
                let client = match credentials.tls {
                    None => &self.http,
                    Some(tls) => match tls.client(self.timeout) {
                        Ok(c) => {
                            own = c;
                            &own
                        }
                        Err(why) => return not_started(Verdict::CredentialsRejected(why)),
                    },
                };
                http::check(client, urls, credentials.auth.as_ref(), deadline, &scrub).await
            }
            Target::Grpc { endpoint, service } => {
                grpc::check(
                    endpoint,
                    service,
                    credentials.auth.as_ref(),
                    deadline,
                    &scrub,
                )
                .await
            }
        };
        Some(ProbeResult {
            verdict,
            latency: started.elapsed(),
        })
    }
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
