//! Reads: one connection, a listing, counts by state, and pages of history,
//! each only of what the caller's scope sees.

use super::{Engine, EventPage};
use crate::access::Scope;
use crate::connection::Revision;
use crate::connection::{Connection, ConnectionId};
use crate::error::Error;
use crate::lifecycle::State;
use crate::store::{EventFilter, Filter, ListQuery, Page};

impl Engine {
    /// The connection, if it exists and `scope` sees it: one it may not see
    /// is not found, exactly like one that does not exist.
    pub(crate) async fn get(&self, id: ConnectionId, scope: &Scope) -> Result<Connection, Error> {
        let scope = scope.clone();
        self.store
            .read(move |c| visible(c.get(&id)?, &id, &scope))
            .await
    }

    pub(crate) async fn list(&self, q: ListQuery) -> Result<Page, Error> {
        self.store.read(move |c| c.list(&q)).await
    }

    pub(crate) async fn count(
        &self,
        filter: Filter,
    ) -> Result<(Vec<(State, i64)>, Revision), Error> {
        self.store.read(move |c| c.count(&filter)).await
    }

    /// A page of history of the connections `scope` sees; one connection's
    /// history when `f` names it (not found when it is not to be seen).
    pub(crate) async fn events(&self, f: EventFilter, scope: &Scope) -> Result<EventPage, Error> {
        let scope = scope.clone();
        self.store
            .read(move |c| {
                if let Some(id) = &f.connection_id {
                    visible(c.get(id)?, id, &scope)?;
                }
                // Like a watch: history that has been pruned is said to be
                // gone, never skipped in silence (0 asks for what is kept).
                let (current, compact) = c.revisions()?;
                if f.after_revision != Revision::ZERO && f.after_revision < compact {
                    return Err(Error::RevisionCompacted {
                        requested: f.after_revision,
                        compact,
                    });
                }
                if f.after_revision > current {
                    return Err(Error::RevisionInFuture {
                        requested: f.after_revision,
                        current,
                    });
                }
                let (revision, compact_revision) = c.revisions()?;
                let mut events = c.events(&EventFilter {
                    limit: f.limit + 1,
                    ..f
                })?;
                let more = events.len() > f.limit;
                events.truncate(f.limit);
                Ok(EventPage {
                    next_after_revision: more.then(|| events.last().map(|e| e.revision)).flatten(),
                    events,
                    revision,
                    compact_revision,
                })
            })
            .await
    }
}

/// `found` if `scope` sees it; otherwise not found, as if it did not exist.
pub(super) fn visible(
    found: Option<Connection>,
    id: &ConnectionId,
    scope: &Scope,
) -> Result<Connection, Error> {
    found
        .filter(|c| scope.sees(&c.owner))
        .ok_or_else(|| Error::not_found(id))
}
