//! [`Read`]: what a reader may ask of the database, typed. Every method runs
//! SQL from [`super::query`] on the one read transaction the view wraps, so
//! whatever one closure passed to [`super::Store::read`] reads is one moment.

use super::query::{self, Page, Sealed, StoredAnswer, StoredCredential};
use super::{EventFilter, Filter, ListQuery, Sql};
use crate::connection::Revision;
use crate::connection::{Connection, ConnectionId, Event};
use crate::error::Error;
use crate::lifecycle::State;

/// One consistent read of the database.
pub(crate) struct Read<'a> {
    sql: Sql<'a>,
}

impl<'a> Read<'a> {
    pub(super) fn new(sql: &'a rusqlite::Transaction<'a>) -> Self {
        Read {
            sql: Sql::Lite(sql),
        }
    }

    /// A read on PostgreSQL: `client` is in a read transaction its user
    /// began (`BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`, one snapshot).
    #[cfg(feature = "postgres")]
    pub(super) fn on_pg(client: &'a std::cell::RefCell<super::pg::Client>) -> Self {
        Read {
            sql: Sql::Pg(client),
        }
    }

    /// The store-wide revision and the compaction mark (events at or below
    /// it are gone).
    pub(crate) fn revisions(&self) -> Result<(Revision, Revision), Error> {
        on!(&self.sql, sql => query::revisions(sql), pg => super::pg::query::revisions(pg))
    }

    pub(crate) fn get(&self, id: &ConnectionId) -> Result<Option<Connection>, Error> {
        on!(&self.sql, sql => query::get(sql, id), pg => super::pg::query::get(pg, id))
    }

    /// The live connection with `identity`, if any.
    pub(crate) fn live_by_identity(&self, identity: &str) -> Result<Option<Connection>, Error> {
        on!(&self.sql, sql => query::live_by_identity(sql, identity), pg => super::pg::query::live_by_identity(pg, identity))
    }

    /// The stored answer to `request_id`, and its request's fingerprint.
    pub(crate) fn answer(&self, request_id: &str) -> Result<Option<StoredAnswer>, Error> {
        on!(&self.sql, sql => query::request_answer(sql, request_id), pg => super::pg::query::request_answer(pg, request_id))
    }

    pub(crate) fn list(&self, q: &ListQuery) -> Result<Page, Error> {
        on!(&self.sql, sql => query::list(sql, q), pg => super::pg::query::list(pg, q))
    }

    /// Matching connections by state, and their total.
    pub(crate) fn count(&self, filter: &Filter) -> Result<(Vec<(State, i64)>, Revision), Error> {
        on!(&self.sql, sql => query::count(sql, filter), pg => super::pg::query::count(pg, filter))
    }

    /// Connections by (kind, state), tombstones included: the kept counts
    /// summed over owners, a few rows whatever the number of connections.
    pub(crate) fn counts_by_kind(&self) -> Result<Vec<(String, State, i64)>, Error> {
        on!(&self.sql, sql => query::counts_by_kind(sql), pg => super::pg::query::counts_by_kind(pg))
    }

    /// The space the database's pages in use take (what the quota measures).
    pub(crate) fn used_bytes(&self) -> Result<u64, Error> {
        on!(&self.sql, sql => super::writer::used_bytes(sql), pg => super::pg::used_bytes(pg))
    }

    /// One page of a snapshot (see [`query::snapshot_page`]).
    pub(crate) fn snapshot_page(
        &self,
        filter: &Filter,
        after: Option<&query::SnapshotCursor>,
        rows: usize,
        bytes: usize,
    ) -> Result<(Vec<Connection>, Option<query::SnapshotCursor>), Error> {
        on!(&self.sql,
            sql => query::snapshot_page(sql, filter, after, rows, bytes),
            pg => super::pg::query::snapshot_page(pg, filter, after, rows, bytes))
    }

    pub(crate) fn events(&self, f: &EventFilter) -> Result<Vec<Event>, Error> {
        on!(&self.sql, sql => query::events(sql, f), pg => super::pg::query::events(pg, f))
    }

    pub(crate) fn credential(&self, id: &str) -> Result<Option<StoredCredential>, Error> {
        on!(&self.sql, sql => query::credential(sql, id), pg => super::pg::query::credential(pg, id))
    }

    /// Credentials of `owners` (`None`: every owner) in creation order after
    /// `(create_time, id)`, at most `limit`.
    pub(crate) fn credentials(
        &self,
        after: Option<(i64, String)>,
        limit: usize,
        owners: Option<&[String]>,
    ) -> Result<Vec<StoredCredential>, Error> {
        on!(&self.sql, sql => query::credentials(sql, after, limit, owners), pg => super::pg::query::credentials(pg, after, limit, owners))
    }

    /// Every connection the monitor may have to probe.
    pub(crate) fn probe_candidates(&self) -> Result<Vec<Connection>, Error> {
        on!(&self.sql, sql => query::probe_candidates(sql), pg => super::pg::query::probe_candidates(pg))
    }

    /// The sealed key check, if the database has one.
    pub(crate) fn key_check(&self) -> Result<Option<Sealed>, Error> {
        on!(&self.sql, sql => query::key_check(sql), pg => super::pg::query::key_check(pg))
    }

    /// The SQL connection, for the store's own tests.
    #[cfg(test)]
    pub(super) fn sql(&self) -> &rusqlite::Connection {
        match self.sql {
            Sql::Lite(sql) => sql,
            #[cfg(feature = "postgres")]
            Sql::Pg(_) => panic!("a SQLite read"),
        }
    }
}
