//! One store-wide revision in commit order across replicas, and the tail
//! that reads the committed events in that order on every replica.
//!
//! A sequence would not do: a transaction that took N+1 can commit before
//! the one that took N, and a reader that saw N+1 would never look back for
//! N. Instead each writer group starts by taking the `revision` row of
//! `meta` ([`begin_group`]), a row lock held until the group commits: groups
//! of all replicas commit one at a time, each numbering its events from the
//! revision the one before it committed. So whatever a reader sees is every
//! revision up to some N, never a later one without an earlier one, and the
//! tail ([`Tail`]) reads them in order after the last it returned. `NOTIFY`
//! in the group ([`end_group`], delivered at COMMIT) wakes the tails at
//! once; each also reads on a timer, so a lost notification only delays.

use super::Statements as _;
use crate::connection::{Event, Revision};
use crate::error::Error;
use crate::store::EventFilter;
use postgres::fallible_iterator::FallibleIterator;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// The channel every group notifies and every tail listens on.
const CHANNEL: &str = "tether_events";

/// Starts a writer group in `tx`: waits for the groups of other replicas
/// that are committing, and returns the revision the last of them left.
/// The group's events take the revisions after it.
pub(crate) fn begin_group(tx: &mut impl super::Statements) -> Result<Revision, Error> {
    let row = tx
        .query_one(
            "UPDATE meta SET value = value WHERE key = 'revision' RETURNING value",
            &[],
        )
        .map_err(super::error)?;
    Ok(Revision::new(row.get(0)))
}

/// Ends a writer group that took the revisions up to `revision`: records it
/// and wakes the tails, both taking effect when `tx` commits.
pub(crate) fn end_group(tx: &mut impl super::Statements, revision: Revision) -> Result<(), Error> {
    // One statement, one round trip: a data-modifying WITH always runs.
    tx.query_one(
        "WITH recorded AS (UPDATE meta SET value = $1 WHERE key = 'revision') \
         SELECT pg_notify($2, $3)",
        &[&revision.get(), &CHANNEL, &revision.to_string()],
    )
    .map_err(super::error)?;
    Ok(())
}

/// Reads committed events in revision order on one replica, after the last
/// it returned.
pub(crate) struct Tail {
    url: String,
    client: super::Client,
    after: Revision,
}

impl Tail {
    /// A tail on its own connection, listening, that starts after `after`.
    pub(crate) fn open(url: &str, after: Revision) -> Result<Tail, Error> {
        Ok(Tail {
            url: url.to_owned(),
            client: listening(url)?,
            after,
        })
    }

    /// The events committed after the last returned (at most `limit`, in
    /// revision order). When there are none yet, waits up to `wait` for a
    /// group to commit, and reads again.
    pub(crate) fn next(&mut self, wait: Duration, limit: usize) -> Result<Vec<Event>, Error> {
        if self.client.is_closed() {
            // PostgreSQL restarted, or the connection broke: listen again and
            // go on after the last event returned, so nothing is skipped.
            self.client = listening(&self.url)?;
        }
        // The read answers every notification already here: a wait after it
        // must not return at once for a commit it has read.
        self.drain()?;
        let mut found = self.read(limit)?;
        if found.is_empty() {
            // Woken by a commit, or not: read again either way.
            let woken = self
                .client
                .raw
                .notifications()
                .timeout_iter(wait)
                .next()
                .map_err(super::error)?;
            if woken.is_some() {
                self.drain()?;
            }
            found = self.read(limit)?;
        }
        if let Some(last) = found.last() {
            self.after = last.revision;
        }
        Ok(found)
    }

    /// The database's schema version, as it is now.
    pub(crate) fn schema_version(&mut self) -> Result<i64, Error> {
        let row = self
            .client
            .query_one("SELECT version FROM schema_version", &[])
            .map_err(super::error)?;
        Ok(row.get(0))
    }

    /// Takes the notifications already received, without waiting.
    fn drain(&mut self) -> Result<(), Error> {
        let mut pending = self.client.raw.notifications();
        while pending.iter().next().map_err(super::error)?.is_some() {}
        Ok(())
    }

    fn read(&mut self, limit: usize) -> Result<Vec<Event>, Error> {
        super::query::events(
            &mut self.client,
            &EventFilter {
                connection_id: None,
                after_revision: self.after,
                limit,
                owners: None,
                max_bytes: usize::MAX,
            },
        )
    }
}

/// A connection listening on [`CHANNEL`].
fn listening(url: &str) -> Result<super::Client, Error> {
    let mut client = super::Client::connect(url)?;
    client
        .batch_execute(&format!(
            "SET application_name = 'tether-tail'; LISTEN {CHANNEL}"
        ))
        .map_err(super::error)?;
    Ok(client)
}

/// Publishes to `hub` the events `tail` reads next, in revision order, as
/// the SQLite writer publishes its own after each commit; how many.
pub(crate) fn publish(
    tail: &mut Tail,
    hub: &broadcast::Sender<Arc<Event>>,
    wait: Duration,
) -> Result<usize, Error> {
    let events = tail.next(wait, PUBLISH_BATCH)?;
    let n = events.len();
    for event in events {
        // No receivers is fine: nobody is watching.
        let _ = hub.send(Arc::new(event));
    }
    Ok(n)
}

/// Most events one read of the tail takes.
const PUBLISH_BATCH: usize = 1_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pg::cluster::Cluster;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A connection made at revision $1: its row and its event.
    const CREATE: &str = "WITH made AS (INSERT INTO connections (id, kind, type, sub_type, name, \
         description, url, identity, metadata, labels, managed, credential_id, owner, state, \
         state_reason, state_trigger, state_time, revision, create_time, update_time) \
         VALUES (gen_random_uuid(), 'tcp', '', '', 'n', '', '', gen_random_uuid()::text, '{}', \
         '{}', false, '', '', 1, '', 1, 0, $1, 0, 0) RETURNING id, revision) \
         INSERT INTO events (revision, connection_id, type, from_state, to_state, trigger, \
         reason, actor, time, snapshot) \
         SELECT revision, id, 1, 1, 1, 1, '', '', 0, '' FROM made";

    /// Three replicas commit groups of one to three events at once while a
    /// tail on each reads: every tail reads every revision exactly once, in
    /// order, and never a later one before an earlier one.
    #[test]
    fn tails_on_every_replica_read_every_revision_once_in_commit_order() {
        const REPLICAS: usize = 3;
        const GROUPS: usize = 60;
        let url = Cluster::shared().database();
        super::super::schema::migrate(&mut super::super::connect(&url).unwrap()).unwrap();
        let done = AtomicBool::new(false);
        let total = std::thread::scope(|s| {
            let tails: Vec<_> = (0..REPLICAS)
                .map(|_| {
                    let mut tail = Tail::open(&url, Revision::ZERO).unwrap();
                    let done = &done;
                    s.spawn(move || {
                        let mut seen = Vec::new();
                        loop {
                            let finished = done.load(Ordering::SeqCst);
                            let batch = tail.next(Duration::from_millis(50), 7).unwrap();
                            if batch.is_empty() && finished {
                                return seen;
                            }
                            seen.extend(batch.into_iter().map(|e| e.revision.get()));
                        }
                    })
                })
                .collect();
            let writers: Vec<_> = (0..REPLICAS)
                .map(|w| {
                    let url = &url;
                    s.spawn(move || {
                        let mut client = super::super::connect(url).unwrap();
                        let mut events = 0;
                        for g in 0..GROUPS {
                            let mut tx = client.transaction().unwrap();
                            let mut revision = begin_group(&mut tx).unwrap();
                            for _ in 0..=(g + w) % 3 {
                                revision = revision.next();
                                tx.execute(CREATE, &[&revision.get()]).unwrap();
                                events += 1;
                            }
                            end_group(&mut tx, revision).unwrap();
                            tx.commit().unwrap();
                        }
                        events
                    })
                })
                .collect();
            // The tails stop once every writer has stopped, even by a panic.
            let ended: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
            done.store(true, Ordering::SeqCst);
            let total: i64 = ended
                .into_iter()
                .map(|e| e.unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .sum();
            let expected: Vec<i64> = (1..=total).collect();
            for tail in tails {
                assert_eq!(tail.join().unwrap(), expected);
            }
            total
        });
        let mut client = super::super::connect(&url).unwrap();
        let revision: i64 = client
            .query_one("SELECT value FROM meta WHERE key = 'revision'", &[])
            .unwrap()
            .get(0);
        assert_eq!(revision, total);
    }

    /// A group that rolls back takes no revision: the next one commits the
    /// revision it would have taken.
    #[test]
    fn a_group_that_rolls_back_leaves_no_gap() {
        let url = Cluster::shared().database();
        let mut client = super::super::connect(&url).unwrap();
        super::super::schema::migrate(&mut client).unwrap();
        let mut tail = Tail::open(&url, Revision::ZERO).unwrap();
        for keep in [false, true] {
            let mut tx = client.transaction().unwrap();
            let revision = begin_group(&mut tx).unwrap().next();
            assert_eq!(revision, Revision::new(1));
            tx.execute(CREATE, &[&revision.get()]).unwrap();
            end_group(&mut tx, revision).unwrap();
            if keep {
                tx.commit().unwrap();
            } else {
                tx.rollback().unwrap();
            }
        }
        let read: Vec<i64> = tail
            .next(Duration::from_secs(5), 10)
            .unwrap()
            .into_iter()
            .map(|e| e.revision.get())
            .collect();
        assert_eq!(read, [1]);
    }

    /// A tail whose connection PostgreSQL ended listens again on its next
    /// read, and goes on after the last event it returned.
    #[test]
    fn a_tail_whose_connection_ended_goes_on_where_it_was() {
        let url = Cluster::shared().database();
        let mut client = super::super::connect(&url).unwrap();
        super::super::schema::migrate(&mut client).unwrap();
        let mut tail = Tail::open(&url, Revision::ZERO).unwrap();
        let commit = |client: &mut postgres::Client| {
            let mut tx = client.transaction().unwrap();
            let revision = begin_group(&mut tx).unwrap().next();
            tx.execute(CREATE, &[&revision.get()]).unwrap();
            end_group(&mut tx, revision).unwrap();
            tx.commit().unwrap();
        };
        commit(&mut client);
        let read = |tail: &mut Tail| -> Vec<i64> {
            tail.next(Duration::from_secs(5), 10)
                .unwrap()
                .iter()
                .map(|e| e.revision.get())
                .collect()
        };
        assert_eq!(read(&mut tail), [1]);
        let ended: i64 = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'tether-tail'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(ended, 1, "the tail's connection was found and ended");
        commit(&mut client);
        // The first read may meet the ended connection; then the next listens again.
        let mut got = tail.next(Duration::from_secs(5), 10);
        if got.is_err() {
            got = tail.next(Duration::from_secs(5), 10);
        }
        let got: Vec<i64> = got.unwrap().iter().map(|e| e.revision.get()).collect();
        assert_eq!(got, [2]);
    }
}
