//! Background probing shared out among the replicas of one database.
//!
//! Connections fall into [`SHARDS`] shards by their id. A replica probes the
//! connections of the shards it holds: a shard is held by a session-level
//! advisory lock on the replica's shard connection, so at most one live
//! replica holds it, and a replica that dies (its session ends) lets go of
//! all of its shards at once. Every [`PERIOD`] each replica counts the shard
//! connections of the database (its `application_name`), takes free shards
//! up to its fair part and lets go of those past it: within a period of a
//! replica's session ending, the others hold its shards, and a replica that
//! joins gets its part as the others let go. No coordinator, no table.

use super::{connect, error};
use crate::connection::ConnectionId;
use crate::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How many shards the connections fall into.
pub(crate) const SHARDS: usize = 64;

/// How often a replica looks again at who holds what.
pub(crate) const PERIOD: Duration = Duration::from_secs(2);

/// The first key of every shard's advisory lock (the second is the shard).
const LOCK_CLASS: i32 = 0x7465_7468;

/// What the shard connections call themselves, to be counted.
const NAME: &str = "tether-probes";

/// The shards this replica holds, as the monitor reads them.
pub(crate) struct Held([AtomicBool; SHARDS]);

impl Default for Held {
    fn default() -> Self {
        Held(std::array::from_fn(|_| AtomicBool::new(false)))
    }
}

impl Held {
    /// Whether this replica probes connection `id`.
    pub(crate) fn probes(&self, id: &ConnectionId) -> bool {
        self.0[shard(id)].load(Ordering::Relaxed)
    }

    fn count(&self) -> usize {
        self.0.iter().filter(|h| h.load(Ordering::Relaxed)).count()
    }
}

fn shard(id: &ConnectionId) -> usize {
    // The last byte of a UUIDv7 is random.
    usize::from(id.as_bytes()[15]) % SHARDS
}

/// A replica's hold on its shards: its own connection, whose session holds
/// the locks.
pub(crate) struct Shards {
    client: postgres::Client,
    held: Arc<Held>,
}

impl Shards {
    pub(crate) fn open(url: &str) -> Result<Shards, Error> {
        let mut client = connect(url)?;
        client
            .batch_execute(&format!("SET application_name = '{NAME}'"))
            .map_err(error)?;
        Ok(Shards {
            client,
            held: Arc::default(),
        })
    }

    /// What the monitor reads.
    pub(crate) fn held(&self) -> Arc<Held> {
        self.held.clone()
    }

    /// Takes free shards up to this replica's fair part (all of them over
    /// the replicas holding shard connections, rounded up), and lets go of
    /// those past it.
    pub(crate) fn rebalance(&mut self) -> Result<(), Error> {
        let replicas: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = $1",
                &[&NAME],
            )
            .map_err(error)?
            .get(0);
        let fair = SHARDS.div_ceil(usize::try_from(replicas.max(1)).unwrap_or(1));
        let mut held = self.held.count();
        for (s, flag) in self.held.0.iter().enumerate().rev() {
            if held <= fair {
                break;
            }
            if flag.load(Ordering::Relaxed) {
                // Let go of it first: from now on this replica does not
                // start probes of it, though one running may still end.
                flag.store(false, Ordering::Relaxed);
                self.client
                    .query_one(
                        "SELECT pg_advisory_unlock($1, $2)",
                        &[&LOCK_CLASS, &(s as i32)],
                    )
                    .map_err(error)?;
                held -= 1;
            }
        }
        for (s, flag) in self.held.0.iter().enumerate() {
            if held >= fair {
                break;
            }
            if flag.load(Ordering::Relaxed) {
                continue;
            }
            let took: bool = self
                .client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&LOCK_CLASS, &(s as i32)],
                )
                .map_err(error)?
                .get(0);
            if took {
                flag.store(true, Ordering::Relaxed);
                held += 1;
            }
        }
        Ok(())
    }

    /// Holds shards until `stop`, looking again every [`PERIOD`]. A broken
    /// connection has let go of every shard: none is probed here until a
    /// new one takes them again.
    pub(crate) fn run(mut self, url: &str, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            if let Err(e) = self.rebalance() {
                tracing::warn!(error = %e, "sharing out probes failed; trying again");
                for flag in &self.held.0 {
                    flag.store(false, Ordering::Relaxed);
                }
                if self.client.is_closed() {
                    match Shards::open(url) {
                        Ok(fresh) => self.client = fresh.client,
                        Err(e) => tracing::warn!(error = %e, "cannot reach PostgreSQL"),
                    }
                }
            }
            // Looks at `stop` at least every 100 ms.
            let mut waited = Duration::ZERO;
            while waited < PERIOD && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                waited += Duration::from_millis(100);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pg::cluster::Cluster;

    fn held(s: &Shards) -> Vec<usize> {
        (0..SHARDS)
            .filter(|&i| s.held.0[i].load(Ordering::Relaxed))
            .collect()
    }

    /// Two replicas share the shards out, each holding half and none both;
    /// when one's session ends, the other takes its half at its next look;
    /// a third joining gets its part as the others let go.
    #[test]
    fn replicas_share_the_shards_and_take_over_a_dead_ones() {
        let url = Cluster::shared().database();
        let mut a = Shards::open(&url).unwrap();
        let mut b = Shards::open(&url).unwrap();
        a.rebalance().unwrap();
        b.rebalance().unwrap();
        let (on_a, on_b) = (held(&a), held(&b));
        assert_eq!((on_a.len(), on_b.len()), (SHARDS / 2, SHARDS / 2));
        assert!(on_a.iter().all(|s| !on_b.contains(s)), "no shard twice");

        // B's session ends: A takes everything at its next look.
        drop(b);
        let mut looks = 0;
        while held(&a).len() < SHARDS {
            // PostgreSQL ends a session's locks as it notices the close.
            looks += 1;
            assert!(looks < 500, "A never got B's shards");
            a.rebalance().unwrap();
        }

        // C joins: A lets go of what is past its part, C takes it.
        let mut c = Shards::open(&url).unwrap();
        a.rebalance().unwrap();
        c.rebalance().unwrap();
        let (on_a, on_c) = (held(&a), held(&c));
        assert_eq!((on_a.len(), on_c.len()), (SHARDS / 2, SHARDS / 2));
        assert!(on_a.iter().all(|s| !on_c.contains(s)), "no shard twice");
        let id = ConnectionId::generate();
        assert!(
            a.held.probes(&id) != c.held.probes(&id),
            "one of them probes it"
        );
    }
}
