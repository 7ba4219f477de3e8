//! The domain's error: what the engine, and the store beneath it, answer.
//! Each variant is a distinct answer a client can act on; `service` maps it
//! to a gRPC status in one place.
//!
//! Storage failures arrive as `store::StoreError`s, which keep SQLite's error
//! as their source; what they map to here keeps only the detail for the log,
//! which never reaches a client.

use crate::connection::Revision;
use crate::lifecycle::{Refusal, State};

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the part to fix.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },

    #[error("connection {id} not found")]
    NotFound { id: String },

    #[error("a live connection already has identity {identity:?}")]
    AlreadyExists {
        identity: String,
        existing_id: String,
    },

    #[error(
        "cannot move connection {id} from {} to {} as {}; allowed: {}",
        refusal.from, refusal.to, refusal.trigger, list(&refusal.allowed)
    )]
    InvalidTransition { id: String, refusal: Refusal },

    /// Verification found the connection unreachable.
    #[error("{} is unreachable: {detail}", connection(id))]
    Unreachable {
        id: String,
        detail: String,
        state: State,
    },

    /// Verification reached the connection but its credentials were refused.
    #[error("{} rejected its credentials: {detail}", connection(id))]
    CredentialsRejected {
        id: String,
        detail: String,
        state: State,
    },

    #[error("credential {id} not found")]
    CredentialNotFound { id: String },

    #[error("credential {id} is used by a live connection")]
    CredentialInUse { id: String, connection_id: String },

    #[error("no definition of kind {kind:?}")]
    DefinitionNotFound { kind: String },

    /// The connection's kind has no definition and unknown kinds are not allowed.
    #[error("kind {kind:?} has no definition; known kinds: {known}")]
    UnknownKind { kind: String, known: String },

    /// The connection is a tombstone and cannot be changed.
    #[error("connection {id} is deleted")]
    Deleted { id: String },

    #[error("etag {given:?} does not match connection {id} (current etag {current:?})")]
    EtagMismatch {
        id: String,
        given: String,
        current: String,
    },

    /// The connection changed while a verification for an older version ran.
    #[error("connection {id} changed while it was being verified; read it again and retry")]
    Conflict { id: String },

    /// A request_id was reused for a different request.
    #[error("request_id {request_id:?} was already used for a different request")]
    RequestIdReused { request_id: String },

    #[error("revision {requested} has been compacted; the oldest retained is above {compact}")]
    RevisionCompacted {
        requested: Revision,
        compact: Revision,
    },

    #[error("revision {requested} is in the future; the current revision is {current}")]
    RevisionInFuture {
        requested: Revision,
        current: Revision,
    },

    /// A per-caller limit is reached (open watches): free some, then retry.
    #[error("{0}")]
    ResourceExhausted(String),

    /// A watcher fell too far behind (it took nothing while its share of the
    /// watch memory was full, or its snapshot took too long) and was ended;
    /// it resumes with `after_revision = resume_after` (0: a new snapshot).
    #[error("{message}; resume with after_revision={resume_after}")]
    WatchTooSlow {
        message: String,
        resume_after: Revision,
    },

    /// Too many changes are queued for the writer: retry after a short pause.
    #[error("{0}")]
    Overloaded(String),

    /// Retry later: the server is shutting down or the database is busy.
    #[error("{0}")]
    Unavailable(String),

    /// The disk (or the database's size limit) is full: nothing more can be
    /// committed until space is freed. The message is ours, never SQLite's.
    #[error("{0}")]
    StorageFull(String),

    /// The database uses more space than `--storage-quota` allows: writes are
    /// refused, except those that free space, until it is back under.
    #[error(
        "the database uses {used} bytes, more than its storage quota of {quota} bytes; \
         writes are refused until space is freed: delete connections or credentials, \
         or raise --storage-quota and restart the server"
    )]
    QuotaExceeded { used: u64, quota: u64 },

    /// The database cannot be written now (read-only, an I/O error, or the
    /// file was removed or replaced): an operator can fix it, then retry.
    /// The message is ours, never SQLite's.
    #[error("{0}")]
    StorageUnavailable(String),

    /// A bug or a storage fault; the detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

/// "connection ID", or "the connection" for one that was never stored (a
/// create whose verification failed).
fn connection(id: &str) -> String {
    if id.is_empty() {
        "the connection".into()
    } else {
        format!("connection {id}")
    }
}

fn list(states: &[State]) -> String {
    if states.is_empty() {
        return "none".into();
    }
    states
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Error {
    /// A storage fault that an operator or a retry can fix (as opposed to a
    /// bug or corruption): while one lasts the server reports NOT_SERVING.
    pub fn is_storage_fault(&self) -> bool {
        matches!(self, Error::StorageFull(_) | Error::StorageUnavailable(_))
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn not_found(id: impl ToString) -> Self {
        Error::NotFound { id: id.to_string() }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Internal(format!("json: {e}"))
    }
}
