//! What can go wrong in the database, with SQLite's error kept as the
//! source, and how each fault becomes the domain's [`Error`].
//!
//! The store's own failures are [`StoreError`]s: their messages are ours, and
//! the SQLite error (or JSON error) that caused one stays reachable through
//! `source()` for the log. A client sees only the domain error it maps to:
//! busy is `Unavailable`, a full disk `StorageFull`, a read-only or failing
//! disk `StorageUnavailable`, and anything else `Internal`, whose detail is
//! logged and never sent.

use crate::error::Error;
use std::error::Error as _;

/// A database failure, by what an operator or client can do about it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// Another connection holds a lock longer than the busy timeout.
    #[error("database busy; retry")]
    Busy(#[source] rusqlite::Error),
    /// The disk (or SQLite's size limit) is full.
    #[error("the database's disk is full; free space, then retry")]
    Full(#[source] rusqlite::Error),
    /// The file cannot be written: read-only, an I/O error, or gone.
    #[error("the database cannot be written (read-only or an I/O error); retry once fixed")]
    Unwritable(#[source] rusqlite::Error),
    /// Any other SQLite failure: a bug or corruption.
    #[error("database error")]
    Sqlite(#[source] rusqlite::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ffi::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy(e),
            Some(ErrorCode::DiskFull) => StoreError::Full(e),
            Some(
                ErrorCode::ReadOnly
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::PermissionDenied,
            ) => StoreError::Unwritable(e),
            _ => StoreError::Sqlite(e),
        }
    }
}

/// "message: cause: cause ...", for the log.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::Busy(_) => Error::Unavailable(message),
            StoreError::Full(_) => {
                tracing::warn!(error = chain(&e), "storage full");
                Error::StorageFull(message)
            }
            StoreError::Unwritable(_) => {
                tracing::warn!(error = chain(&e), "storage unavailable");
                Error::StorageUnavailable(message)
            }
            // The source alone: "database error" adds nothing to SQLite's words.
            StoreError::Sqlite(_) => Error::Internal(chain(e.source().unwrap_or(&e))),
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::ffi;

    fn sqlite(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), Some(format!("code {code}")))
    }

    #[test]
    fn each_fault_maps_to_what_a_client_can_do_and_keeps_its_cause() {
        let full = StoreError::from(sqlite(ffi::SQLITE_FULL));
        assert!(full.source().unwrap().to_string().contains("code 13"));
        assert!(matches!(Error::from(full), Error::StorageFull(m) if !m.contains("code")));
        assert!(matches!(
            Error::from(sqlite(ffi::SQLITE_BUSY)),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            Error::from(sqlite(ffi::SQLITE_READONLY)),
            Error::StorageUnavailable(m) if !m.contains("code")
        ));
        // A bug's detail is kept for the log (the service never sends it).
        assert!(matches!(
            Error::from(sqlite(ffi::SQLITE_CORRUPT)),
            Error::Internal(m) if m.contains("code 11")
        ));
    }
}
