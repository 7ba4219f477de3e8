//! The single write path: load, check the lifecycle table, verify if needed,
//! commit the row change and its event in one transaction, then publish.
//!
//! Every rule is re-checked inside the writer's transaction against the row as
//! it is then, so changes to one connection are serialised in commit order and
//! the latest accepted request wins. A verification runs outside the
//! transaction (it may take seconds); its result commits only if what was
//! verified did not change meanwhile (the state and when it was entered, the
//! url, the credential), so a slow check never overwrites a newer state.
//!
//! No gRPC here: requests arrive parsed, answers leave as domain values.
//!
//! Codemap, one file per operation: `requests` (every request and answer
//! type), `read` (get, list, count, events), `create`, `transition` (user
//! moves, batches, failed verifications, and the one writer step every move
//! takes), `update`, `discover` (discovery reports), `probe` (background probe
//! results), `idempotency` (the replay-then-remember wrapper of every request
//! that carries a `request_id`). This file: the [`Engine`] and the checks its
//! operations share.

mod create;
mod discover;
mod idempotency;
mod probe;
mod read;
mod requests;
#[cfg(test)]
mod tests;
mod transition;
mod update;

pub(crate) use requests::{
    CreateRequest, Discovered, EventPage, NewConnection, Patch, Reporter, RequestKey,
    TransitionRequest, UpdateRequest,
};

use crate::access::Scope;
use crate::connection::{Connection, ConnectionId};
use crate::credentials::custody;
use crate::error::Error;
use crate::kinds::Kinds;
use crate::lifecycle::Finding;
use crate::lifecycle::Refusal;
use crate::metrics::Metrics;
use crate::probe::{Verdict, Verifier};
use crate::store::Store;
use std::sync::Arc;

/// The actor recorded for changes the server makes on its own.
pub(crate) const SYSTEM_ACTOR: &str = "tether";

#[derive(Clone)]
pub(crate) struct Engine {
    store: Store,
    verifier: Arc<dyn Verifier>,
    kinds: Kinds,
    metrics: Arc<Metrics>,
}

impl Engine {
    pub(crate) fn new(store: Store, verifier: Arc<dyn Verifier>, kinds: Kinds) -> Self {
        Engine {
            metrics: store.metrics(),
            store,
            verifier,
            kinds,
        }
    }
}

fn check_etag(c: &Connection, etag: Option<&str>) -> Result<(), Error> {
    match etag {
        Some(given) if !given.is_empty() && given != c.etag() => Err(Error::EtagMismatch {
            id: c.id.to_string(),
            given: given.to_owned(),
            current: c.etag(),
        }),
        _ => Ok(()),
    }
}

fn invalid_transition(id: &ConnectionId, refusal: Refusal) -> Error {
    Error::InvalidTransition {
        id: id.to_string(),
        refusal,
    }
}

/// A connection may use credential `id` only if it exists, the caller may see
/// it, and it is for the connection's kind (its secret was checked against
/// that kind's schema). One outside the caller's scope is "no credential".
/// And the secret may go to `url` ([`custody`]): its error names `field`.
fn usable_credential(
    found: Option<crate::store::StoredCredential>,
    id: &str,
    kind: &str,
    url: &str,
    scope: &Scope,
) -> Result<(), Error> {
    usable_credential_for(found, id, kind, url, scope, "connection.credential_id")
}

fn usable_credential_for(
    found: Option<crate::store::StoredCredential>,
    id: &str,
    kind: &str,
    url: &str,
    scope: &Scope,
    field: &str,
) -> Result<(), Error> {
    match found.filter(|c| scope.sees(&c.owner)) {
        None => Err(Error::invalid(
            "connection.credential_id",
            format!("no credential {id:?}"),
        )),
        Some(c) if c.type_ != kind => Err(Error::invalid(
            "connection.credential_id",
            format!("credential {id:?} is for kind {}, not {kind}", c.type_),
        )),
        Some(c) => custody(&c.allowed_hosts, url).map_err(|why| Error::invalid(field, why)),
    }
}

/// The identity is taken. Its holder is named only to a caller who may see
/// it: identities are unique across owners, so that it exists cannot be hidden.
fn already_exists(existing: &Connection, scope: &Scope) -> Error {
    Error::AlreadyExists {
        identity: existing.identity.clone(),
        existing_id: if scope.sees(&existing.owner) {
            existing.id.to_string()
        } else {
            String::new()
        },
    }
}

/// A verification that could not run: the caller should retry, nothing moved.
fn not_checked(detail: String) -> Error {
    Error::Unavailable(format!("verification could not run; retry: {detail}"))
}

/// The error, what was found and the detail of a failed verification.
fn failed(c: &Connection, verdict: Verdict) -> (Error, Finding, String) {
    let id = c.id.to_string();
    match verdict {
        Verdict::CredentialsRejected(detail) => (
            Error::CredentialsRejected {
                id,
                detail: detail.clone(),
                state: c.state,
            },
            Finding::CredentialsRejected,
            format!("credentials rejected: {detail}"),
        ),
        Verdict::Unreachable(detail) | Verdict::Reachable(detail) | Verdict::NotChecked(detail) => {
            (
                Error::Unreachable {
                    id,
                    detail: detail.clone(),
                    state: c.state,
                },
                Finding::Unreachable,
                format!("unreachable: {detail}"),
            )
        }
    }
}
