//! What the engine's operations take and answer: the parsed requests (a
//! create, a move, an update, a discovery report), a client's retry key, and
//! the answers that are not just a connection.

use crate::access::Scope;
use crate::connection::{Connection, ConnectionId};
use crate::error::Error;
use crate::lifecycle::State;
use std::collections::BTreeMap;

/// A client's retry key (AIP-155) and a digest of the request it came with.
#[derive(Clone, Debug)]
pub struct RequestKey {
    /// As the client sent it, for messages.
    pub id: String,
    /// What it is stored under: a keyed digest of the caller and the id, so
    /// two callers' ids never meet and the table does not hold them in clear.
    pub stored: String,
    pub fingerprint: i64,
}

/// The fields of a connection a client chooses, already parsed.
#[derive(Clone, Debug, Default)]
pub struct NewConnection {
    pub kind: String,
    pub type_: String,
    pub sub_type: String,
    pub name: String,
    pub description: String,
    pub url: String,
    /// Empty: derived from kind and url (or the id).
    pub identity: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub labels: BTreeMap<String, String>,
    /// `None`: the kind's default.
    pub managed: Option<bool>,
    pub credential_id: String,
    pub owner: String,
}

pub struct CreateRequest {
    pub connection: NewConnection,
    pub initial_state: State,
    pub skip_verification: bool,
    pub request: Option<RequestKey>,
    pub actor: String,
    /// Whose objects the caller sees: a credential or an existing identity
    /// outside it is not named back.
    pub scope: Scope,
}

pub struct TransitionRequest {
    pub id: ConnectionId,
    pub target: State,
    pub reason: String,
    pub etag: Option<String>,
    pub skip_verification: bool,
    pub request: Option<RequestKey>,
    pub actor: String,
    pub scope: Scope,
}

/// The fields an update replaces; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct Patch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub url: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub labels: Option<BTreeMap<String, String>>,
    /// `Some("")` re-derives the identity from kind and url.
    pub identity: Option<String>,
    /// `Some("")` drops the credential.
    pub credential_id: Option<String>,
    /// Whether the server probes and moves it on its own.
    pub managed: Option<bool>,
}

pub struct UpdateRequest {
    pub id: ConnectionId,
    pub patch: Patch,
    pub etag: Option<String>,
    pub request: Option<RequestKey>,
    pub actor: String,
    pub scope: Scope,
}

/// A page of history.
pub struct EventPage {
    pub events: Vec<crate::connection::Event>,
    /// Pass as `after_revision` for the next page; `None` when there is no more.
    pub next_after_revision: Option<i64>,
    pub revision: i64,
    pub compact_revision: i64,
}

/// Who reports discovered connections: the agent's own name for its source,
/// the authenticated principal that records the events, and what it may see.
#[derive(Clone, Debug)]
pub struct Reporter {
    pub source: String,
    pub actor: String,
    pub scope: Scope,
}

/// What one reported connection came to.
#[derive(Debug)]
pub enum Discovered {
    Created(Connection),
    Rediscovered(Connection),
    Unchanged(Connection),
    SuppressedIgnored(Connection),
    /// It exists, but belongs to an owner the reporter may not see.
    Hidden,
    Rejected(Error),
}
