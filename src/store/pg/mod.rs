//! The PostgreSQL backend, behind the `postgres` feature (a preview): the
//! connection and its errors, the schema with its migrations ([`schema`]),
//! the revision in commit order across replicas with the tail that reads it
//! ([`order`]), the reads ([`query`]), the writes a writer job makes
//! ([`mod@write`]), a replica's writer groups ([`writer`]), probing shared
//! out ([`shards`]) and the store over them ([`store`]). docs/ARCHITECTURE.md ("PostgreSQL") has the
//! design, and what is not built yet.

#[cfg(test)]
mod cluster;
pub(crate) mod order;
pub(crate) mod query;
pub(crate) mod schema;
pub(crate) mod shards;
pub(crate) mod store;
pub(crate) mod write;
pub(crate) mod writer;

use crate::error::Error;
use crate::store::Read;
use std::cell::RefCell;

/// A connection to the database at `url` (`postgres://user@host:port/db`).
pub(crate) fn connect(url: &str) -> Result<postgres::Client, Error> {
    postgres::Client::connect(url, postgres::NoTls).map_err(error)
}

/// PostgreSQL's errors as the store's: one it cannot reach is storage that
/// is unavailable; any other, an internal error with PostgreSQL's words.
pub(crate) fn error(e: postgres::Error) -> Error {
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io {
        return Error::StorageUnavailable(format!("PostgreSQL: {e}"));
    }
    match e.as_db_error() {
        // "db error" alone says nothing: PostgreSQL's own words do.
        Some(db) => Error::Internal(format!(
            "PostgreSQL: {} ({})",
            db.message(),
            db.code().code()
        )),
        None => Error::Internal(format!("PostgreSQL: {e}")),
    }
}

/// The space the database takes (what a quota would measure).
pub(crate) fn used_bytes(c: &mut postgres::Client) -> Result<u64, Error> {
    let bytes: i64 = c
        .query_one("SELECT pg_database_size(current_database())", &[])
        .map_err(error)?
        .get(0);
    Ok(u64::try_from(bytes).unwrap_or(0))
}

/// Runs `f` on a [`Read`] of `client` in one read-only transaction that sees
/// one moment (`REPEATABLE READ`), as SQLite's read transactions do.
pub(crate) fn read<T>(
    client: &RefCell<postgres::Client>,
    f: impl FnOnce(&Read<'_>) -> Result<T, Error>,
) -> Result<T, Error> {
    client
        .borrow_mut()
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .map_err(error)?;
    let out = f(&Read::on_pg(client));
    let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = client.borrow_mut().batch_execute(end).map_err(error);
    let out = out?;
    ended?;
    Ok(out)
}
