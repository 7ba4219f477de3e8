//! Reachability checks. A `Prober` runs one kind's `Check` against a url
//! with an optional credential `Secret` and reports what it saw as an
//! `Observation`; nothing here changes state (the engine decides what a
//! result means for the lifecycle). The `Checker` runs a connection's
//! check as its kind defines it, with its credential's secret; it is the
//! `Verifier` the engine asks at a USER edge and what the monitor runs in
//! the background.
//!
//! Codemap: `target` turns a url and a check into what to contact (pure),
//! `egress` decides which addresses may be contacted and resolves names
//! through that policy, `client_auth` turns a secret into headers and TLS
//! material, `tcp`, `http` and `grpc` do the I/O, `prober` bounds it all by
//! a timeout and a global concurrency limit, `checker` picks a connection's
//! check and secret.
//!
//! What a client sees of a failed check is a class (refused, timed out, tls
//! handshake failed, name did not resolve, denied by egress policy,
//! unreachable) and what we measured ourselves, never a peer's or a
//! library's error text: that text is logged at debug level only.

mod check;
mod checker;
mod client_auth;
mod egress;
mod grpc;
mod http;
mod prober;
mod target;
mod tcp;
#[cfg(test)]
mod tests;

pub(crate) use check::{Check, Secret};
pub(crate) use checker::Checker;
pub(crate) use egress::HostPattern;
pub use egress::{Access, EgressPolicy, Resolve, ResolveFuture, StubResolver, SystemResolver};
pub(crate) use prober::Prober;

use crate::connection::Connection;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// What a check saw. The detail says what answered (status code, path, the
/// class of a failure, latency); it never holds a secret, a url's
/// user-info, or text a peer or a library wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Reachable and usable; the detail says what answered.
    Reachable(String),
    /// Could not be reached, or answered with an error.
    Unreachable(String),
    /// Reached, but refused the credentials (HTTP 401/403, gRPC
    /// UNAUTHENTICATED/PERMISSION_DENIED), or the credentials cannot be used
    /// at all (a malformed PEM, a token that cannot be sent in a header).
    CredentialsRejected(String),
    /// The check could not run at all (no free probe slot in time, the
    /// credential could not be read): says nothing about the peer.
    NotChecked(String),
}

impl Verdict {
    /// The detail, whatever the outcome.
    pub(crate) fn detail(&self) -> &str {
        match self {
            Verdict::Reachable(d)
            | Verdict::Unreachable(d)
            | Verdict::CredentialsRejected(d)
            | Verdict::NotChecked(d) => d,
        }
    }
}

/// What one check saw, and how long it took. Not stored as such: the engine
/// keeps what it means on the connection as its `last_probe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Observation {
    pub(crate) verdict: Verdict,
    /// How long the check itself ran, from the moment it held a concurrency
    /// permit to its verdict: time spent queued for a permit is not the
    /// peer's slowness and is not counted. Zero when the check never started
    /// (a url or credential it could not use, or no permit in time).
    pub(crate) latency: Duration,
}

pub(crate) type VerifyFuture<'a> = Pin<Box<dyn Future<Output = Option<Verdict>> + Send + 'a>>;

/// Checks whether a connection is reachable and its credentials accepted.
pub(crate) trait Verifier: Send + Sync {
    /// `None` when this connection has no check (its kind defines none).
    fn verify<'a>(&'a self, connection: &'a Connection) -> VerifyFuture<'a>;
}
