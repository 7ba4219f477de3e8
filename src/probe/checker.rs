//! [`Checker`]: a connection's check as its kind defines it, run with its
//! credential's secret (asked of [`Credentials`], which applies custody
//! once more before anything is sent). The engine uses it as its
//! [`Verifier`]; the monitor runs it in the background.

use super::{Check, Observation, Prober, Verdict, Verifier, VerifyFuture};
use crate::connection::Connection;
use crate::credentials::Credentials;
use crate::kinds::Kinds;
use std::time::Duration;

/// Runs a connection's check as its definition says, with its credential.
pub(crate) struct Checker {
    prober: Prober,
    kinds: Kinds,
    credentials: Credentials,
}

impl Checker {
    pub(crate) fn new(prober: Prober, kinds: Kinds, credentials: Credentials) -> Self {
        Checker {
            prober,
            kinds,
            credentials,
        }
    }

    /// What the check saw; `None` when the kind defines no check (or, for a
    /// kind without a definition, the url's scheme has none). A kind whose
    /// check needs a url finds a connection without one unreachable: nothing
    /// unchecked is ever taken for reachable.
    pub(crate) async fn check(&self, c: &Connection) -> Option<Observation> {
        let check = self
            .kinds
            .registry()
            .get(&c.kind)
            .map(|d| d.check.clone())
            .unwrap_or(Check::Url);
        let secret = if c.credential_id.is_empty() {
            None
        } else {
            match self
                .credentials
                .secret_for(c.credential_id.clone(), &c.url)
                .await
            {
                Ok(Ok(s)) => s,
                // Checked when the credential and url met; this is the last
                // word before anything is sent.
                Ok(Err(why)) => {
                    return Some(Observation {
                        verdict: Verdict::CredentialsRejected(format!("not sent: {why}")),
                        latency: Duration::ZERO,
                    });
                }
                Err(e) => {
                    // A server-side fault, not the peer's answer.
                    tracing::warn!(id = %c.id, error = %e, "cannot read the connection's credential");
                    return Some(Observation {
                        verdict: Verdict::NotChecked("the credential could not be read".into()),
                        latency: Duration::ZERO,
                    });
                }
            }
        };
        self.prober.probe(&c.url, &check, secret.as_ref()).await
    }
}

impl Verifier for Checker {
    fn verify<'a>(&'a self, connection: &'a Connection) -> VerifyFuture<'a> {
        Box::pin(async move { self.check(connection).await.map(|r| r.verdict) })
    }
}
