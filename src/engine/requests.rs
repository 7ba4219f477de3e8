//! What the engine's operations take and answer: the parsed requests (a
//! create, a move, an update, a discovery report), a client's retry key, and
//! the answers that are not just a connection.

use crate::access::Scope;
use crate::connection::Revision;
use crate::connection::{Connection, ConnectionId};
use crate::error::Error;
use crate::lifecycle::State;
use std::collections::BTreeMap;

/// A client's retry key (AIP-155) and a digest of the request it came with.
#[derive(Clone, Debug)]
pub(crate) struct RequestKey {
    /// As the client sent it, for messages.
    pub(crate) id: String,
    /// What it is stored under: a keyed digest of the caller and the id, so
    /// two callers' ids never meet and the table does not hold them in clear.
    pub(crate) stored: String,
    pub(crate) fingerprint: i64,
}

/// The fields of a connection a client chooses, already parsed.
#[derive(Clone, Debug, Default)]
pub(crate) struct NewConnection {
    pub(crate) kind: String,
    pub(crate) type_: String,
    pub(crate) sub_type: String,
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) url: String,
    /// Empty: derived from kind and url (or the id).
    pub(crate) identity: String,
    pub(crate) metadata: serde_json::Map<String, serde_json::Value>,
    pub(crate) labels: BTreeMap<String, String>,
    /// `None`: the kind's default.
    pub(crate) managed: Option<bool>,
    pub(crate) credential_id: String,
    pub(crate) owner: String,
}

pub(crate) struct CreateRequest {
    pub(crate) connection: NewConnection,
    pub(crate) initial_state: State,
    pub(crate) skip_verification: bool,
    pub(crate) request: Option<RequestKey>,
    pub(crate) actor: String,
    /// Whose objects the caller sees: a credential or an existing identity
    /// outside it is not named back.
    pub(crate) scope: Scope,
}

pub(crate) struct TransitionRequest {
    pub(crate) id: ConnectionId,
    pub(crate) target: State,
    pub(crate) reason: String,
    pub(crate) etag: Option<String>,
    pub(crate) skip_verification: bool,
    pub(crate) request: Option<RequestKey>,
    pub(crate) actor: String,
    pub(crate) scope: Scope,
    /// The gRPC method that asked for it, as the change's log line names it.
    pub(crate) method: &'static str,
}

/// The fields an update replaces; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub(crate) struct Patch {
    pub(crate) name: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) url: Option<String>,
    pub(crate) metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub(crate) labels: Option<BTreeMap<String, String>>,
    /// `Some("")` re-derives the identity from kind and url.
    pub(crate) identity: Option<String>,
    /// `Some("")` drops the credential.
    pub(crate) credential_id: Option<String>,
    /// Whether the server probes and moves it on its own.
    pub(crate) managed: Option<bool>,
}

pub(crate) struct UpdateRequest {
    pub(crate) id: ConnectionId,
    pub(crate) patch: Patch,
    pub(crate) etag: Option<String>,
    pub(crate) request: Option<RequestKey>,
    pub(crate) actor: String,
    pub(crate) scope: Scope,
}

/// A page of history.
pub(crate) struct EventPage {
    pub(crate) events: Vec<crate::connection::Event>,
    /// Pass as `after_revision` for the next page; `None` when there is no more.
    pub(crate) next_after_revision: Option<Revision>,
    pub(crate) revision: Revision,
    pub(crate) compact_revision: Revision,
}

/// Who reports discovered connections: the agent's own name for its source,
/// the authenticated principal that records the events, and what it may see.
#[derive(Clone, Debug)]
pub(crate) struct Reporter {
    pub(crate) source: String,
    pub(crate) actor: String,
    pub(crate) scope: Scope,
}

/// What one reported connection came to.
#[derive(Debug)]
pub(crate) enum Discovered {
    Created(Connection),
    Rediscovered(Connection),
    Unchanged(Connection),
    SuppressedIgnored(Connection),
    /// It exists, but belongs to an owner the reporter may not see.
    Hidden,
    Rejected(Error),
}
