//! [`Read`]: what a reader may ask of the database, typed. Every method runs
//! SQL from [`super::query`] on the one read transaction the view wraps, so
//! whatever one closure passed to [`super::Store::read`] reads is one moment.

use super::query::{self, Page, Sealed, StoredAnswer, StoredCredential};
use super::{EventFilter, Filter, ListQuery};
use crate::connection::Revision;
use crate::connection::{Connection, ConnectionId, Event};
use crate::error::Error;
use crate::lifecycle::State;

/// One consistent read of the database.
pub(crate) struct Read<'a> {
    sql: &'a rusqlite::Transaction<'a>,
}

impl<'a> Read<'a> {
    pub(super) fn new(sql: &'a rusqlite::Transaction<'a>) -> Self {
        Read { sql }
    }

    /// The store-wide revision and the compaction mark (events at or below
    /// it are gone).
    pub(crate) fn revisions(&self) -> Result<(Revision, Revision), Error> {
        query::revisions(self.sql)
    }

    pub(crate) fn get(&self, id: &ConnectionId) -> Result<Option<Connection>, Error> {
        query::get(self.sql, id)
    }

    /// The live connection with `identity`, if any.
    pub(crate) fn live_by_identity(&self, identity: &str) -> Result<Option<Connection>, Error> {
        query::live_by_identity(self.sql, identity)
    }

    /// The stored answer to `request_id`, and its request's fingerprint.
    pub(crate) fn answer(&self, request_id: &str) -> Result<Option<StoredAnswer>, Error> {
        query::request_answer(self.sql, request_id)
    }

    pub(crate) fn list(&self, q: &ListQuery) -> Result<Page, Error> {
        query::list(self.sql, q)
    }

    /// Matching connections by state, and their total.
    pub(crate) fn count(&self, filter: &Filter) -> Result<(Vec<(State, i64)>, Revision), Error> {
        query::count(self.sql, filter)
    }

    /// Connections by (kind, state), tombstones included: the kept counts
    /// summed over owners, a few rows whatever the number of connections.
    pub(crate) fn counts_by_kind(&self) -> Result<Vec<(String, State, i64)>, Error> {
        query::counts_by_kind(self.sql)
    }

    /// The space the database's pages in use take (what the quota measures).
    pub(crate) fn used_bytes(&self) -> Result<u64, Error> {
        super::writer::used_bytes(self.sql)
    }

    pub(crate) fn events(&self, f: &EventFilter) -> Result<Vec<Event>, Error> {
        query::events(self.sql, f)
    }

    pub(crate) fn credential(&self, id: &str) -> Result<Option<StoredCredential>, Error> {
        query::credential(self.sql, id)
    }

    /// Credentials of `owners` (`None`: every owner) in creation order after
    /// `(create_time, id)`, at most `limit`.
    pub(crate) fn credentials(
        &self,
        after: Option<(i64, String)>,
        limit: usize,
        owners: Option<&[String]>,
    ) -> Result<Vec<StoredCredential>, Error> {
        query::credentials(self.sql, after, limit, owners)
    }

    /// Every connection the monitor may have to probe.
    pub(crate) fn probe_candidates(&self) -> Result<Vec<Connection>, Error> {
        query::probe_candidates(self.sql)
    }

    /// The sealed key check, if the database has one.
    pub(crate) fn key_check(&self) -> Result<Option<Sealed>, Error> {
        query::key_check(self.sql)
    }

    /// The SQL connection, for the store's own tests.
    #[cfg(test)]
    pub(super) fn sql(&self) -> &rusqlite::Connection {
        self.sql
    }
}
