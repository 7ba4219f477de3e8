//! The stored format of what rows keep as JSON: a connection's snapshot in
//! an event, a `request_id`'s answer, a connection's last probe, its labels
//! and metadata; and of a connection id in a column: its UUID's 16 bytes.
//!
//! These row types are the format on disk, kept apart from the domain types
//! so that renaming a domain field never silently changes what old databases
//! must decode. The format only ever gains fields with a default. Its shape
//! is serde's default for these types, which is what the first schema wrote:
//! an answer is `{"Ok": <connection>}` or `{"Err": {"<Variant>": {...}}}`, and
//! [`super::writer::Tx::scrub`] edits the `$.Ok.*` paths of the former.

use crate::connection::Revision;
use crate::connection::{Connection, ConnectionId, ProbeOutcome, ProbeResult};
use crate::error::Error;
use crate::lifecycle::Refusal;
use crate::lifecycle::{State, Trigger};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

type Metadata = serde_json::Map<String, serde_json::Value>;

/// A connection as an event snapshot or a stored answer holds it.
#[derive(Serialize, Deserialize)]
struct ConnectionDoc<'a> {
    id: Cow<'a, str>,
    kind: Cow<'a, str>,
    type_: Cow<'a, str>,
    sub_type: Cow<'a, str>,
    name: Cow<'a, str>,
    description: Cow<'a, str>,
    url: Cow<'a, str>,
    identity: Cow<'a, str>,
    metadata: Cow<'a, Metadata>,
    labels: Cow<'a, BTreeMap<String, String>>,
    managed: bool,
    credential_id: Cow<'a, str>,
    owner: Cow<'a, str>,
    state: StateDoc,
    state_reason: Cow<'a, str>,
    state_trigger: TriggerDoc,
    state_time: i64,
    revision: i64,
    create_time: i64,
    update_time: i64,
    #[serde(default)]
    last_probe: Option<ProbeDoc<'a>>,
}

impl<'a> ConnectionDoc<'a> {
    /// `c` as stored; without its metadata when that is kept as a blob.
    fn of(c: &'a Connection, with_metadata: bool) -> Self {
        ConnectionDoc {
            id: c.id.to_string().into(),
            kind: c.kind.as_str().into(),
            type_: c.type_.as_str().into(),
            sub_type: c.sub_type.as_str().into(),
            name: c.name.as_str().into(),
            description: c.description.as_str().into(),
            url: c.url.as_str().into(),
            identity: c.identity.as_str().into(),
            metadata: if with_metadata {
                Cow::Borrowed(&c.metadata)
            } else {
                Cow::Owned(Metadata::new())
            },
            labels: Cow::Borrowed(&c.labels),
            managed: c.managed,
            credential_id: c.credential_id.as_str().into(),
            owner: c.owner.as_str().into(),
            state: c.state.into(),
            state_reason: c.state_reason.as_str().into(),
            state_trigger: c.state_trigger.into(),
            state_time: c.state_time,
            revision: c.revision.get(),
            create_time: c.create_time,
            update_time: c.update_time,
            last_probe: c.last_probe.as_ref().map(ProbeDoc::of),
        }
    }

    fn into_connection(self) -> Result<Connection, Error> {
        Ok(Connection {
            id: ConnectionId::parse(&self.id, "id").map_err(|e| corrupt("connection", e))?,
            kind: self.kind.into_owned(),
            type_: self.type_.into_owned(),
            sub_type: self.sub_type.into_owned(),
            name: self.name.into_owned(),
            description: self.description.into_owned(),
            url: self.url.into_owned(),
            identity: self.identity.into_owned(),
            metadata: self.metadata.into_owned(),
            labels: self.labels.into_owned(),
            managed: self.managed,
            credential_id: self.credential_id.into_owned(),
            owner: self.owner.into_owned(),
            state: self.state.into(),
            state_reason: self.state_reason.into_owned(),
            state_trigger: self.state_trigger.into(),
            state_time: self.state_time,
            revision: Revision::new(self.revision),
            create_time: self.create_time,
            update_time: self.update_time,
            last_probe: self.last_probe.map(ProbeDoc::into_probe),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct ProbeDoc<'a> {
    time: i64,
    outcome: OutcomeDoc,
    latency_ms: i64,
    message: Cow<'a, str>,
    consecutive_failures: i32,
}

impl<'a> ProbeDoc<'a> {
    fn of(p: &'a ProbeResult) -> Self {
        ProbeDoc {
            time: p.time,
            outcome: p.outcome.into(),
            latency_ms: p.latency_ms,
            message: p.message.as_str().into(),
            consecutive_failures: p.consecutive_failures,
        }
    }

    fn into_probe(self) -> ProbeResult {
        ProbeResult {
            time: self.time,
            outcome: self.outcome.into(),
            latency_ms: self.latency_ms,
            message: self.message.into_owned(),
            consecutive_failures: self.consecutive_failures,
        }
    }
}

/// Maps a domain enum onto its stored twin and back, each way one
/// exhaustive match, so a new variant cannot be forgotten here.
macro_rules! twin {
    ($doc:ident <-> $domain:ident { $($variant:ident),+ $(,)? }) => {
        #[derive(Clone, Copy, Serialize, Deserialize)]
        enum $doc { $($variant),+ }

        impl From<$domain> for $doc {
            fn from(v: $domain) -> Self {
                match v { $($domain::$variant => $doc::$variant),+ }
            }
        }

        impl From<$doc> for $domain {
            fn from(v: $doc) -> Self {
                match v { $($doc::$variant => $domain::$variant),+ }
            }
        }
    };
}

twin!(StateDoc <-> State {
    Discovered, Registered, Connected, Ignored, Maintenance, Disconnected, Deleted, NotFound,
});
twin!(TriggerDoc <-> Trigger { User, System });
twin!(OutcomeDoc <-> ProbeOutcome { Reachable, Unreachable, CredentialsRejected });

/// A stored answer: what a repeated `request_id` is answered again.
#[derive(Serialize, Deserialize)]
enum AnswerDoc<'a> {
    Ok(Box<ConnectionDoc<'a>>),
    Err(ErrorDoc),
}

#[derive(Serialize, Deserialize)]
struct RefusalDoc {
    from: StateDoc,
    to: StateDoc,
    trigger: TriggerDoc,
    allowed: Vec<StateDoc>,
}

/// Every error an answer can hold, field for field.
#[derive(Serialize, Deserialize)]
enum ErrorDoc {
    InvalidArgument {
        field: String,
        message: String,
    },
    NotFound {
        id: String,
    },
    AlreadyExists {
        identity: String,
        existing_id: String,
    },
    InvalidTransition {
        id: String,
        refusal: RefusalDoc,
    },
    Unreachable {
        id: String,
        detail: String,
        state: StateDoc,
    },
    CredentialsRejected {
        id: String,
        detail: String,
        state: StateDoc,
    },
    CredentialNotFound {
        id: String,
    },
    CredentialInUse {
        id: String,
        connection_id: String,
    },
    DefinitionNotFound {
        kind: String,
    },
    UnknownKind {
        kind: String,
        known: String,
    },
    Deleted {
        id: String,
    },
    EtagMismatch {
        id: String,
        given: String,
        current: String,
    },
    Conflict {
        id: String,
    },
    RequestIdReused {
        request_id: String,
    },
    RevisionCompacted {
        requested: i64,
        compact: i64,
    },
    RevisionInFuture {
        requested: i64,
        current: i64,
    },
    ResourceExhausted(String),
    WatchTooSlow {
        message: String,
        resume_after: i64,
    },
    Overloaded(String),
    Unavailable(String),
    StorageFull(String),
    QuotaExceeded {
        used: u64,
        quota: u64,
    },
    StorageUnavailable(String),
    Internal(String),
}

impl From<&Error> for ErrorDoc {
    fn from(e: &Error) -> Self {
        let e = e.clone();
        match e {
            Error::InvalidArgument { field, message } => {
                ErrorDoc::InvalidArgument { field, message }
            }
            Error::NotFound { id } => ErrorDoc::NotFound { id },
            Error::AlreadyExists {
                identity,
                existing_id,
            } => ErrorDoc::AlreadyExists {
                identity,
                existing_id,
            },
            Error::InvalidTransition { id, refusal } => ErrorDoc::InvalidTransition {
                id,
                refusal: RefusalDoc {
                    from: refusal.from.into(),
                    to: refusal.to.into(),
                    trigger: refusal.trigger.into(),
                    allowed: refusal.allowed.into_iter().map(Into::into).collect(),
                },
            },
            Error::Unreachable { id, detail, state } => ErrorDoc::Unreachable {
                id,
                detail,
                state: state.into(),
            },
            Error::CredentialsRejected { id, detail, state } => ErrorDoc::CredentialsRejected {
                id,
                detail,
                state: state.into(),
            },
            Error::CredentialNotFound { id } => ErrorDoc::CredentialNotFound { id },
            Error::CredentialInUse { id, connection_id } => {
                ErrorDoc::CredentialInUse { id, connection_id }
            }
            Error::DefinitionNotFound { kind } => ErrorDoc::DefinitionNotFound { kind },
            Error::UnknownKind { kind, known } => ErrorDoc::UnknownKind { kind, known },
            Error::Deleted { id } => ErrorDoc::Deleted { id },
            Error::EtagMismatch { id, given, current } => {
                ErrorDoc::EtagMismatch { id, given, current }
            }
            Error::Conflict { id } => ErrorDoc::Conflict { id },
            Error::RequestIdReused { request_id } => ErrorDoc::RequestIdReused { request_id },
            Error::RevisionCompacted { requested, compact } => ErrorDoc::RevisionCompacted {
                requested: requested.get(),
                compact: compact.get(),
            },
            Error::RevisionInFuture { requested, current } => ErrorDoc::RevisionInFuture {
                requested: requested.get(),
                current: current.get(),
            },
            Error::ResourceExhausted(m) => ErrorDoc::ResourceExhausted(m),
            Error::WatchTooSlow {
                message,
                resume_after,
            } => ErrorDoc::WatchTooSlow {
                message,
                resume_after: resume_after.get(),
            },
            Error::Overloaded(m) => ErrorDoc::Overloaded(m),
            Error::Unavailable(m) => ErrorDoc::Unavailable(m),
            Error::StorageFull(m) => ErrorDoc::StorageFull(m),
            Error::QuotaExceeded { used, quota } => ErrorDoc::QuotaExceeded { used, quota },
            Error::StorageUnavailable(m) => ErrorDoc::StorageUnavailable(m),
            Error::Internal(m) => ErrorDoc::Internal(m),
        }
    }
}

impl From<ErrorDoc> for Error {
    fn from(e: ErrorDoc) -> Self {
        match e {
            ErrorDoc::InvalidArgument { field, message } => {
                Error::InvalidArgument { field, message }
            }
            ErrorDoc::NotFound { id } => Error::NotFound { id },
            ErrorDoc::AlreadyExists {
                identity,
                existing_id,
            } => Error::AlreadyExists {
                identity,
                existing_id,
            },
            ErrorDoc::InvalidTransition { id, refusal } => Error::InvalidTransition {
                id,
                refusal: Refusal {
                    from: refusal.from.into(),
                    to: refusal.to.into(),
                    trigger: refusal.trigger.into(),
                    allowed: refusal.allowed.into_iter().map(Into::into).collect(),
                },
            },
            ErrorDoc::Unreachable { id, detail, state } => Error::Unreachable {
                id,
                detail,
                state: state.into(),
            },
            ErrorDoc::CredentialsRejected { id, detail, state } => Error::CredentialsRejected {
                id,
                detail,
                state: state.into(),
            },
            ErrorDoc::CredentialNotFound { id } => Error::CredentialNotFound { id },
            ErrorDoc::CredentialInUse { id, connection_id } => {
                Error::CredentialInUse { id, connection_id }
            }
            ErrorDoc::DefinitionNotFound { kind } => Error::DefinitionNotFound { kind },
            ErrorDoc::UnknownKind { kind, known } => Error::UnknownKind { kind, known },
            ErrorDoc::Deleted { id } => Error::Deleted { id },
            ErrorDoc::EtagMismatch { id, given, current } => {
                Error::EtagMismatch { id, given, current }
            }
            ErrorDoc::Conflict { id } => Error::Conflict { id },
            ErrorDoc::RequestIdReused { request_id } => Error::RequestIdReused { request_id },
            ErrorDoc::RevisionCompacted { requested, compact } => Error::RevisionCompacted {
                requested: Revision::new(requested),
                compact: Revision::new(compact),
            },
            ErrorDoc::RevisionInFuture { requested, current } => Error::RevisionInFuture {
                requested: Revision::new(requested),
                current: Revision::new(current),
            },
            ErrorDoc::ResourceExhausted(m) => Error::ResourceExhausted(m),
            ErrorDoc::WatchTooSlow {
                message,
                resume_after,
            } => Error::WatchTooSlow {
                message,
                resume_after: Revision::new(resume_after),
            },
            ErrorDoc::Overloaded(m) => Error::Overloaded(m),
            ErrorDoc::Unavailable(m) => Error::Unavailable(m),
            ErrorDoc::StorageFull(m) => Error::StorageFull(m),
            ErrorDoc::QuotaExceeded { used, quota } => Error::QuotaExceeded { used, quota },
            ErrorDoc::StorageUnavailable(m) => Error::StorageUnavailable(m),
            ErrorDoc::Internal(m) => Error::Internal(m),
        }
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("stored {what} does not decode: {e}"))
}

/// A connection as an event snapshot; without its metadata when that is
/// stored as a blob.
pub(in crate::store) fn encode_connection(
    c: &Connection,
    with_metadata: bool,
) -> Result<String, Error> {
    serde_json::to_string(&ConnectionDoc::of(c, with_metadata))
        .map_err(|e| corrupt("connection", e))
}

pub(in crate::store) fn decode_connection(json: &str) -> Result<Connection, Error> {
    serde_json::from_str::<ConnectionDoc>(json)
        .map_err(|e| corrupt("connection", e))?
        .into_connection()
}

/// A stored answer; an `Ok` one without its metadata when that is a blob.
pub(in crate::store) fn encode_answer(
    answer: &Result<Connection, Error>,
    with_metadata: bool,
) -> Result<String, Error> {
    let doc = match answer {
        Ok(c) => AnswerDoc::Ok(Box::new(ConnectionDoc::of(c, with_metadata))),
        Err(e) => AnswerDoc::Err(e.into()),
    };
    serde_json::to_string(&doc).map_err(|e| corrupt("answer", e))
}

pub(in crate::store) fn decode_answer(json: &str) -> Result<Result<Connection, Error>, Error> {
    match serde_json::from_str::<AnswerDoc>(json).map_err(|e| corrupt("answer", e))? {
        AnswerDoc::Ok(c) => Ok(Ok(c.into_connection()?)),
        AnswerDoc::Err(e) => Ok(Err(e.into())),
    }
}

pub(in crate::store) fn encode_probe(p: &ProbeResult) -> Result<String, Error> {
    serde_json::to_string(&ProbeDoc::of(p)).map_err(|e| corrupt("probe", e))
}

pub(in crate::store) fn decode_probe(json: &str) -> Result<ProbeResult, Error> {
    serde_json::from_str::<ProbeDoc>(json)
        .map(ProbeDoc::into_probe)
        .map_err(|e| corrupt("probe", e))
}

pub(in crate::store) fn encode_metadata(m: &Metadata) -> Result<String, Error> {
    serde_json::to_string(m).map_err(|e| corrupt("metadata", e))
}

pub(in crate::store) fn decode_metadata(json: &str) -> Result<Metadata, Error> {
    serde_json::from_str(json).map_err(|e| corrupt("metadata", e))
}

pub(in crate::store) fn encode_labels(labels: &BTreeMap<String, String>) -> Result<String, Error> {
    serde_json::to_string(labels).map_err(|e| corrupt("labels", e))
}

pub(in crate::store) fn decode_labels(json: &str) -> Result<BTreeMap<String, String>, Error> {
    serde_json::from_str(json).map_err(|e| corrupt("labels", e))
}

/// A credential's allowed host patterns.
pub(in crate::store) fn encode_hosts(hosts: &[String]) -> Result<String, Error> {
    serde_json::to_string(hosts).map_err(|e| corrupt("allowed hosts", e))
}

pub(in crate::store) fn decode_hosts(json: &str) -> Result<Vec<String>, Error> {
    serde_json::from_str(json).map_err(|e| corrupt("allowed hosts", e))
}

/// What a deletion clears in the stored copies of a connection (event
/// snapshots, stored answers): each field and the JSON it becomes.
const SCRUBBED: [(&str, &str); 4] = [
    ("credential_id", r#""""#),
    ("description", r#""""#),
    ("metadata", "{}"),
    ("labels", "{}"),
];

/// The `json_set` arguments that clear, in a stored connection at JSON path
/// `root` (`$` for an event snapshot, `$.Ok` for an answer), what a deletion
/// removes: its credential, description, metadata and labels.
pub(in crate::store) fn scrubbed(root: &str) -> String {
    SCRUBBED
        .iter()
        .map(|(field, empty)| format!("'{root}.{field}', json('{empty}')"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The same as a JSON object to merge into a stored connection.
#[cfg(feature = "postgres")]
pub(in crate::store) fn scrub_patch() -> String {
    let fields: Vec<String> = SCRUBBED
        .iter()
        .map(|(field, empty)| format!(r#""{field}": {empty}"#))
        .collect();
    format!("{{{}}}", fields.join(", "))
}

/// The JSON path of the connection in a stored answer that holds one.
pub(in crate::store) const ANSWER_CONNECTION: &str = "$.Ok";

/// A connection id is stored as its UUID's 16 bytes (schema version 7),
/// which sort as its canonical text does: indexes order ids as before.
impl rusqlite::ToSql for ConnectionId {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::Borrowed(
            rusqlite::types::ValueRef::Blob(self.as_bytes()),
        ))
    }
}

impl rusqlite::types::FromSql for ConnectionId {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let bytes = value.as_blob()?;
        ConnectionId::from_bytes(bytes).ok_or(rusqlite::types::FromSqlError::InvalidBlobSize {
            expected_size: 16,
            blob_size: bytes.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection() -> Connection {
        Connection {
            id: ConnectionId::parse("7f1c2a8e-0b6d-4a49-9d0e-3f5b8c1a2e47", "id").unwrap(),
            kind: "prometheus".into(),
            type_: "metrics".into(),
            sub_type: "".into(),
            name: "prom".into(),
            description: "d".into(),
            url: "http://127.0.0.1:9090".into(),
            identity: "prometheus|http://127.0.0.1:9090".into(),
            metadata: serde_json::json!({"a": 1}).as_object().unwrap().clone(),
            labels: BTreeMap::from([("env".into(), "prod".into())]),
            managed: true,
            credential_id: "".into(),
            owner: "alice".into(),
            state: State::NotFound,
            state_reason: "r".into(),
            state_trigger: Trigger::System,
            state_time: 3,
            revision: Revision::new(9),
            create_time: 1,
            update_time: 3,
            last_probe: Some(ProbeResult {
                time: 3,
                outcome: ProbeOutcome::CredentialsRejected,
                latency_ms: 4,
                message: "m".into(),
                consecutive_failures: 2,
            }),
        }
    }

    /// What the first schema wrote, byte for byte: old databases hold this.
    const STORED: &str = r#"{"id":"7f1c2a8e-0b6d-4a49-9d0e-3f5b8c1a2e47","kind":"prometheus","type_":"metrics","sub_type":"","name":"prom","description":"d","url":"http://127.0.0.1:9090","identity":"prometheus|http://127.0.0.1:9090","metadata":{"a":1},"labels":{"env":"prod"},"managed":true,"credential_id":"","owner":"alice","state":"NotFound","state_reason":"r","state_trigger":"System","state_time":3,"revision":9,"create_time":1,"update_time":3,"last_probe":{"time":3,"outcome":"CredentialsRejected","latency_ms":4,"message":"m","consecutive_failures":2}}"#;

    #[test]
    fn a_connection_is_stored_in_the_format_old_databases_hold() {
        assert_eq!(encode_connection(&connection(), true).unwrap(), STORED);
        assert_eq!(decode_connection(STORED).unwrap(), connection());
    }

    #[test]
    fn a_snapshot_from_before_probes_were_kept_still_decodes() {
        let old = STORED.split(r#","last_probe""#).next().unwrap().to_owned() + "}";
        let c = decode_connection(&old).unwrap();
        assert_eq!(c.last_probe, None);
        assert_eq!(c.name, "prom");
    }

    #[test]
    fn a_blob_backed_snapshot_leaves_the_metadata_out() {
        let json = encode_connection(&connection(), false).unwrap();
        assert!(json.contains(r#""metadata":{},"#), "{json}");
        assert!(decode_connection(&json).unwrap().metadata.is_empty());
    }

    #[test]
    fn answers_keep_serdes_result_shape_both_ways() {
        let ok = encode_answer(&Ok(connection()), true).unwrap();
        assert_eq!(ok, format!(r#"{{"Ok":{STORED}}}"#));
        assert_eq!(decode_answer(&ok).unwrap(), Ok(connection()));

        let refused = Error::InvalidTransition {
            id: "x".into(),
            refusal: Refusal {
                from: State::Ignored,
                to: State::Connected,
                trigger: Trigger::User,
                allowed: vec![State::Registered, State::Deleted],
            },
        };
        let err = encode_answer(&Err(refused.clone()), true).unwrap();
        assert_eq!(
            err,
            r#"{"Err":{"InvalidTransition":{"id":"x","refusal":{"from":"Ignored","to":"Connected","trigger":"User","allowed":["Registered","Deleted"]}}}}"#
        );
        assert_eq!(decode_answer(&err).unwrap(), Err(refused));

        let unavailable = r#"{"Err":{"Unavailable":"busy"}}"#;
        assert_eq!(
            decode_answer(unavailable).unwrap(),
            Err(Error::Unavailable("busy".into()))
        );
    }

    #[test]
    fn scrubbing_names_fields_the_stored_connection_has() {
        let json = encode_connection(&connection(), true).unwrap();
        for field in ["credential_id", "description", "metadata", "labels"] {
            assert!(json.contains(&format!(r#""{field}":"#)), "{field}");
        }
        assert_eq!(
            scrubbed("$"),
            "'$.credential_id', json('\"\"'), '$.description', json('\"\"'), \
             '$.metadata', json('{}'), '$.labels', json('{}')"
        );
        // And what they become: the same in SQLite's json_set and as a patch.
        let sql = rusqlite::Connection::open_in_memory().unwrap();
        let cleared: String = sql
            .query_row(
                &format!("SELECT json_set(?1, {})", scrubbed("$")),
                [&json],
                |r| r.get(0),
            )
            .unwrap();
        let cleared = decode_connection(&cleared).unwrap();
        assert_eq!(
            (cleared.credential_id.as_str(), cleared.description.as_str()),
            ("", "")
        );
        assert!(cleared.metadata.is_empty() && cleared.labels.is_empty());
        let answer = encode_answer(&Ok(connection()), true).unwrap();
        assert!(answer.starts_with(&format!(r#"{{"{}":"#, &ANSWER_CONNECTION[2..])));
    }

    #[test]
    fn a_row_that_does_not_decode_is_an_internal_error_naming_what() {
        let e = decode_connection("{").unwrap_err();
        assert!(
            matches!(&e, Error::Internal(m) if m.contains("stored connection")),
            "{e:?}"
        );
    }
}
