//! The kept counts on SQLite (`connection_counts`, `label_counts`): how many
//! connections each (owner, kind, state) has, and each label under it, so
//! that counts and `CountConnections` read a few rows instead of every
//! connection.
//!
//! The writer keeps them, not triggers (schema version 8). Each change adds
//! what it takes away and what it brings ([`Counts::change`]); a job's sums
//! are kept once the job is ([`Counts::keep`]) and forgotten if it rolls
//! back ([`Counts::forget`]); the group writes its sums at its end, inside
//! its transaction, before it commits ([`Counts::write`]). Five hundred connections discovered
//! in one job cost one upsert per (owner, kind, state) and per label, where
//! a trigger cost several statements and a statement journal per
//! connection. Every change to a row's owner, kind, state or labels goes
//! through `Tx::record`, which is what makes this complete; PostgreSQL
//! keeps its counts with its own triggers.

use crate::connection::Connection;
use crate::error::Error;
use rusqlite::params;
use std::collections::BTreeMap;

/// (owner, kind, state).
type Row = (String, String, i32);
/// (key, value, owner, kind, state).
type Label = (String, String, String, String, i32);

/// What one group's changes add to the kept counts (negative: take away).
#[derive(Default)]
pub(super) struct Counts {
    /// The sums of the jobs kept so far.
    kept: Sums,
    /// The sums of the job running now.
    pending: Sums,
}

#[derive(Default)]
struct Sums {
    rows: BTreeMap<Row, i64>,
    labels: BTreeMap<Label, i64>,
}

impl Sums {
    fn add(&mut self, c: &Connection, by: i64) {
        let state = c.state.number();
        *self
            .rows
            .entry((c.owner.clone(), c.kind.clone(), state))
            .or_default() += by;
        for (key, value) in &c.labels {
            let label = (
                key.clone(),
                value.clone(),
                c.owner.clone(),
                c.kind.clone(),
                state,
            );
            *self.labels.entry(label).or_default() += by;
        }
    }

    fn append(&mut self, other: &mut Sums) {
        for (row, by) in std::mem::take(&mut other.rows) {
            *self.rows.entry(row).or_default() += by;
        }
        for (label, by) in std::mem::take(&mut other.labels) {
            *self.labels.entry(label).or_default() += by;
        }
    }
}

impl Counts {
    /// A connection stored for the first time (`before` is `None`), or
    /// changed from `before`.
    pub(super) fn change(&mut self, before: Option<&Connection>, after: &Connection) {
        if let Some(b) = before {
            if b.owner == after.owner
                && b.kind == after.kind
                && b.state == after.state
                && b.labels == after.labels
            {
                return;
            }
            self.pending.add(b, -1);
        }
        self.pending.add(after, 1);
    }

    /// The running job is kept: its sums join the group's.
    pub(super) fn keep(&mut self) {
        self.kept.append(&mut self.pending);
    }

    /// The running job rolled back: its sums go with it.
    pub(super) fn forget(&mut self) {
        self.pending = Sums::default();
    }

    /// Writes the sums of the kept jobs (and of the running one, for a job
    /// that is the whole transaction) into `sql`, before it commits.
    ///
    /// A count never falls below one (`connection_counts`) or zero
    /// (`label_counts`): one that would is removed, so a count that had
    /// drifted low heals at zero instead of refusing every later write.
    pub(super) fn write(mut self, sql: &rusqlite::Transaction<'_>) -> Result<(), Error> {
        self.keep();
        let Sums { rows, labels } = self.kept;
        for ((owner, kind, state), by) in rows {
            let key = params![owner, kind, state, by.abs()];
            if by > 0 {
                sql.prepare_cached(
                    "INSERT INTO connection_counts (owner, kind, state, n) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO UPDATE SET n = n + excluded.n",
                )?
                .execute(key)?;
            } else if by < 0 {
                sql.prepare_cached(
                    "DELETE FROM connection_counts \
                     WHERE owner = ?1 AND kind = ?2 AND state = ?3 AND n <= ?4",
                )?
                .execute(key)?;
                sql.prepare_cached(
                    "UPDATE connection_counts SET n = n - ?4 \
                     WHERE owner = ?1 AND kind = ?2 AND state = ?3",
                )?
                .execute(key)?;
            }
        }
        for ((k, v, owner, kind, state), by) in labels {
            let key = params![k, v, owner, kind, state, by.abs()];
            if by > 0 {
                sql.prepare_cached(
                    "INSERT INTO label_counts (key, value, owner, kind, state, n) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO UPDATE SET n = n + excluded.n",
                )?
                .execute(key)?;
            } else if by < 0 {
                sql.prepare_cached(
                    "DELETE FROM label_counts WHERE key = ?1 AND value = ?2 \
                     AND owner = ?3 AND kind = ?4 AND state = ?5 AND n <= ?6",
                )?
                .execute(key)?;
                sql.prepare_cached(
                    "UPDATE label_counts SET n = n - ?6 WHERE key = ?1 AND value = ?2 \
                     AND owner = ?3 AND kind = ?4 AND state = ?5",
                )?
                .execute(key)?;
            }
        }
        Ok(())
    }
}
