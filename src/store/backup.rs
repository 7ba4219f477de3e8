//! A consistent copy of a live database file, with SQLite's online backup:
//! one read snapshot for the whole copy, no lock of the server's taken. The
//! copy is checked before it is reported done.

use crate::error::Error;
use std::path::Path;

/// What a backup holds.
#[derive(Debug)]
pub struct BackupDone {
    /// The store revision the copy was taken at.
    pub revision: i64,
    pub connections: i64,
}

/// Copies the database at `db` into `out` (an empty file the caller
/// created) as one plain file with no write-ahead log beside it.
pub(crate) fn backup(db: &Path, out: &Path) -> Result<BackupDone, Error> {
    let source = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    source.busy_timeout(std::time::Duration::from_secs(30))?;
    let mut target = rusqlite::Connection::open(out)?;
    {
        // One step of every page: the copy is one read snapshot, so it is
        // consistent even while the server keeps committing.
        let backup = rusqlite::backup::Backup::new(&source, &mut target)?;
        backup.step(-1)?;
    }
    target.query_row("PRAGMA journal_mode = DELETE", [], |r| {
        r.get::<_, String>(0)
    })?;
    check(&target)
}

/// The copy reads back whole: `quick_check`, and the tables a server needs.
fn check(c: &rusqlite::Connection) -> Result<BackupDone, Error> {
    let ok: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if ok != "ok" {
        return Err(Error::Internal(format!("the copy does not check: {ok}")));
    }
    let revision = c.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
        r.get(0)
    })?;
    let connections = c.query_row("SELECT count(*) FROM connections", [], |r| r.get(0))?;
    Ok(BackupDone {
        revision,
        connections,
    })
}
