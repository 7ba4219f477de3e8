//! The one mapping from the domain [`Error`] to `tonic::Status`: the gRPC
//! code, the `google.rpc.ErrorInfo` (reason, domain, metadata), a
//! `BadRequest` for invalid arguments and a `RetryInfo` when the write queue
//! is full; and the same status as a `google.rpc.Status` for batch items.

use crate::connection::shorten;
use crate::error::Error;
use crate::pb::ERROR_DOMAIN;
use prost::Message;
use std::collections::HashMap;
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

/// The gRPC code, `ErrorInfo.reason` and metadata of an error.
fn classify(e: &Error) -> (tonic::Code, &'static str, Vec<(&'static str, String)>) {
    use tonic::Code;
    match e {
        Error::InvalidArgument { field, .. } => (
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            vec![("field", field.clone())],
        ),
        Error::NotFound { id } => (
            Code::NotFound,
            "CONNECTION_NOT_FOUND",
            vec![("id", id.clone())],
        ),
        Error::AlreadyExists {
            identity,
            existing_id,
        } => (
            Code::AlreadyExists,
            "CONNECTION_ALREADY_EXISTS",
            vec![
                ("identity", identity.clone()),
                ("existing_id", existing_id.clone()),
            ],
        ),
        Error::InvalidTransition { id, refusal } => (
            Code::FailedPrecondition,
            "INVALID_TRANSITION",
            vec![
                ("id", id.clone()),
                ("from", refusal.from.name().into()),
                ("to", refusal.to.name().into()),
                ("trigger", refusal.trigger.to_string()),
                (
                    "allowed",
                    refusal
                        .allowed
                        .iter()
                        .map(|s| s.name())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            ],
        ),
        Error::Unreachable { id, detail, state } => (
            Code::FailedPrecondition,
            "CONNECTION_UNREACHABLE",
            vec![
                ("id", id.clone()),
                ("detail", detail.clone()),
                ("state", state.name().into()),
            ],
        ),
        Error::CredentialsRejected { id, detail, state } => (
            Code::FailedPrecondition,
            "CREDENTIALS_REJECTED",
            vec![
                ("id", id.clone()),
                ("detail", detail.clone()),
                ("state", state.name().into()),
            ],
        ),
        Error::CredentialNotFound { id } => (
            Code::NotFound,
            "CREDENTIAL_NOT_FOUND",
            vec![("id", id.clone())],
        ),
        Error::CredentialInUse { id, connection_id } => (
            Code::FailedPrecondition,
            "CREDENTIAL_IN_USE",
            vec![("id", id.clone()), ("connection_id", connection_id.clone())],
        ),
        Error::DefinitionNotFound { kind } => (
            Code::NotFound,
            "DEFINITION_NOT_FOUND",
            vec![("kind", kind.clone())],
        ),
        Error::UnknownKind { kind, .. } => (
            Code::InvalidArgument,
            "UNKNOWN_KIND",
            vec![("kind", kind.clone())],
        ),
        Error::Deleted { id } => (
            Code::FailedPrecondition,
            "CONNECTION_DELETED",
            vec![("id", id.clone())],
        ),
        Error::EtagMismatch { id, current, .. } => (
            Code::Aborted,
            "ETAG_MISMATCH",
            vec![("id", id.clone()), ("current_etag", current.clone())],
        ),
        Error::Conflict { id } => (
            Code::Aborted,
            "CONCURRENT_MODIFICATION",
            vec![("id", id.clone())],
        ),
        Error::RequestIdReused { request_id } => (
            Code::InvalidArgument,
            "REQUEST_ID_REUSED",
            vec![("request_id", request_id.clone())],
        ),
        Error::RevisionCompacted { requested, compact } => (
            Code::OutOfRange,
            "REVISION_COMPACTED",
            vec![
                ("requested_revision", requested.to_string()),
                ("compact_revision", compact.to_string()),
            ],
        ),
        Error::RevisionInFuture { requested, current } => (
            Code::OutOfRange,
            "REVISION_IN_FUTURE",
            vec![
                ("requested_revision", requested.to_string()),
                ("current_revision", current.to_string()),
            ],
        ),
        Error::WatchTooSlow { resume_after, .. } => (
            Code::ResourceExhausted,
            "WATCH_TOO_SLOW",
            vec![("resume_after_revision", resume_after.to_string())],
        ),
        Error::Unavailable(_) | Error::Overloaded(_) => (Code::Unavailable, "UNAVAILABLE", vec![]),
        Error::ResourceExhausted(_) => (Code::ResourceExhausted, "RESOURCE_EXHAUSTED", vec![]),
        Error::StorageFull(_) => (Code::ResourceExhausted, "STORAGE_FULL", vec![]),
        Error::QuotaExceeded { used, quota } => (
            Code::ResourceExhausted,
            "STORAGE_QUOTA_EXCEEDED",
            vec![
                ("used_bytes", used.to_string()),
                ("quota_bytes", quota.to_string()),
            ],
        ),
        Error::StorageUnavailable(_) => (Code::Unavailable, "STORAGE_UNAVAILABLE", vec![]),
        Error::Internal(_) => (Code::Internal, "INTERNAL", vec![]),
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let (code, reason, metadata) = classify(&e);
        let message = match &e {
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error; see the server log".to_owned()
            }
            other => other.to_string(),
        };
        // Messages and details echo what the client sent (an id, a url, a
        // field); cut so that a huge value cannot overflow the response
        // metadata and turn the answer into another error.
        let metadata: HashMap<String, String> = metadata
            .into_iter()
            .map(|(k, v)| (k.to_owned(), shorten(&v, MAX_ECHO)))
            .collect();
        let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
        if let Error::InvalidArgument { field, message } = &e {
            details.add_bad_request_violation(shorten(field, MAX_ECHO), shorten(message, MAX_ECHO));
        }
        if let Error::Overloaded(_) = &e {
            details.set_retry_info(Some(OVERLOADED_RETRY));
        }
        Status::with_error_details(code, shorten(&message, MAX_MESSAGE), details)
    }
}

/// Longest error message sent, in bytes; a longer one is cut.
const MAX_MESSAGE: usize = 1024;

/// Longest value in an error's details (metadata, field violations).
const MAX_ECHO: usize = 256;

/// How long a client should wait before retrying when the write queue is full.
const OVERLOADED_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The `google.rpc.Status` a batch item carries: exactly what the single call
/// would have returned.
pub(crate) fn rpc_status(e: Error) -> tonic_types::pb::Status {
    let status = Status::from(e);
    tonic_types::pb::Status::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: Vec::new(),
    })
}
