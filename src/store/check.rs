//! The checks a database passes before it is served: a write-ahead log that
//! is its own, SQLite's page check, the schema, the store-wide counters, and
//! that it can be written.
//!
//! A damaged database is refused at start with a message saying what is wrong,
//! never served half-working. These checks read; they never repair.

use crate::error::Error;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};

/// The tables a migrated database has, and the schema version each came with.
const TABLES: [(&str, i64); 9] = [
    ("meta", 1),
    ("connections", 1),
    ("events", 1),
    ("requests", 1),
    ("credentials", 1),
    ("key_check", 1),
    ("blobs", 3),
    ("connection_counts", 5),
    ("label_counts", 5),
];

fn refuse(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Internal(format!(
        "{} is damaged: {what}; restore it from a backup (the server will not serve it)",
        path.display()
    ))
}

/// Refuses a write-ahead log that belongs to another database. SQLite would
/// replay any log whose page size matches, silently putting another
/// database's pages over this one's. Each database carries a random id in
/// `meta`; the id in the file alone (read with the log ignored) must be the
/// id with the log applied. Runs before anything writes to the file.
pub(super) fn log_belongs(path: &Path) -> Result<(), Error> {
    let log = PathBuf::from(format!("{}-wal", path.display()));
    let has = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() > 0);
    if !has(path) || !has(&log) {
        return Ok(());
    }
    // `immutable=1` makes SQLite read the file as it is, without the log.
    let uri = format!("file:{}?immutable=1", uri_path(path));
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
    let file_only = Connection::open_with_flags(uri, flags)
        .ok()
        .and_then(|c| database_id(&c));
    let with_log = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()
        .and_then(|c| database_id(&c));
    // Either side unreadable, or a file that has never been checkpointed with
    // an id: nothing to compare, and the later checks judge the result.
    if let (Some(file), Some(logged)) = (file_only, with_log)
        && file != logged
    {
        return Err(Error::Internal(format!(
            "{} belongs to another database (it would replace this file's pages with \
             another database's); move it away, or restore both files from a backup",
            log.display()
        )));
    }
    Ok(())
}

fn database_id(c: &Connection) -> Option<i64> {
    c.query_row(
        "SELECT value FROM meta WHERE key = 'database_id'",
        [],
        |r| r.get(0),
    )
    .ok()
}

/// `path` as the path part of a `file:` URI.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'?' | b'#' | b'%' => out.push_str(&format!("%{b:02X}")),
            _ if b.is_ascii_graphic() => out.push(char::from(*b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Page-level integrity, and a schema version that matches its tables. Runs
/// before migration, so that a damaged file is not migrated further.
pub(super) fn before_migrate(conn: &Connection, path: &Path) -> Result<(), Error> {
    // `quick_check` reads every page but skips the index-content comparison
    // of a full `integrity_check`: linear in the file, fine at start.
    // A damaged schema page fails before the check can say so: that is
    // damage too.
    let damaged = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            refuse(path, format!("integrity check failed ({e})"))
        }
        _ => e.into(),
    };
    let found: Vec<String> = conn
        .prepare("PRAGMA quick_check")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>())
        .map_err(damaged)?;
    if found != ["ok"] {
        let first = found.first().cloned().unwrap_or_default();
        return Err(refuse(path, format!("integrity check failed ({first})")));
    }
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > 0 {
        tables_present(conn, path, version)?;
    }
    Ok(())
}

/// The counters agree with the rows, and secrets have their key check.
pub(super) fn after_migrate(conn: &Connection, path: &Path) -> Result<(), Error> {
    tables_present(conn, path, super::schema::VERSION)?;
    let counter = |key: &str| -> Result<Option<i64>, Error> {
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    };
    let (Some(revision), Some(compact)) = (counter("revision")?, counter("compact_revision")?)
    else {
        return Err(refuse(path, "the revision counters are missing"));
    };
    // Every row's revision is that of its connection's latest event, which
    // retention never prunes: the newest event bounds them all, and is found
    // without reading every row (which would cost a tenth of a second a
    // million connections).
    let events: i64 = conn.query_row("SELECT coalesce(max(revision), 0) FROM events", [], |r| {
        r.get(0)
    })?;
    if events > revision {
        return Err(refuse(
            path,
            format!(
                "the store revision {revision} is behind its rows (newest event {events}); \
                 revisions would be reused"
            ),
        ));
    }
    if !(0..=revision).contains(&compact) {
        return Err(refuse(
            path,
            format!("the compaction mark {compact} is outside 0..={revision}"),
        ));
    }
    let credentials: bool =
        conn.query_row("SELECT EXISTS (SELECT 1 FROM credentials)", [], |r| {
            r.get(0)
        })?;
    let key_check: bool =
        conn.query_row("SELECT EXISTS (SELECT 1 FROM key_check)", [], |r| r.get(0))?;
    if credentials && !key_check {
        return Err(refuse(
            path,
            "it holds credentials but not the key check they are sealed against",
        ));
    }
    // A file we can open but not write (read-only file or mount) is found now,
    // not at the first client write. Rewriting a row with itself changes
    // nothing but must reach the write-ahead log. The same write gives a
    // database its id, once.
    let probe = conn.execute_batch(
        "BEGIN IMMEDIATE; \
         INSERT OR IGNORE INTO meta (key, value) VALUES ('database_id', random()); \
         UPDATE meta SET value = value WHERE key = 'revision'; \
         COMMIT;",
    );
    if let Err(e) = probe {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        return Err(match Error::from(e) {
            Error::StorageUnavailable(_) | Error::StorageFull(_) => Error::Internal(format!(
                "{} cannot be written (read-only, full, or an I/O error); make it and its \
                 folder writable by this user, with space to grow",
                path.display()
            )),
            other => other,
        });
    }
    Ok(())
}

fn tables_present(conn: &Connection, path: &Path, version: i64) -> Result<(), Error> {
    for (table, _) in TABLES.iter().filter(|(_, since)| *since <= version) {
        let present: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [table],
            |r| r.get(0),
        )?;
        if !present {
            return Err(refuse(path, format!("the table {table} is missing")));
        }
    }
    Ok(())
}
