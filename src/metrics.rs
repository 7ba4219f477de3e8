//! The server's Prometheus metrics: what each layer records as it works, and
//! the text a scrape reads (`prometheus-client`'s registry, encoded in the
//! Prometheus text format). It knows no store, engine or service: they call
//! its recording methods, and the admin listener adds what is read at scrape
//! time ([`Scraped`]: counts, revision, file sizes) before encoding.
//!
//! Recording is cheap, and never on the writer's per-change path: counters
//! and gauges are single atomics, made up front for every label value (so no
//! label lookup, lock or allocation when they move); a histogram takes its
//! own uncontended lock per observation. The writer observes once per group
//! (its size and its commit time), never once per change. Label values are
//! a fixed, small set (states, triggers, outcomes, gRPC methods and codes),
//! plus the connection kinds the database holds; never a connection id.

use crate::lifecycle::{State, Trigger};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// The `Content-Type` of what [`Metrics::encode`] writes.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How a move (a change of state) came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Committed.
    Accepted,
    /// The lifecycle table (or the kind's narrower one) does not allow it.
    Refused,
    /// Its verification found the connection unreachable or its credentials rejected.
    Unverified,
    /// The connection changed meanwhile (etag, or what was verified).
    Conflict,
    /// Anything else: not found, invalid, storage, overload.
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Accepted,
        Outcome::Refused,
        Outcome::Unverified,
        Outcome::Conflict,
        Outcome::Failed,
    ];

    fn name(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused",
            Outcome::Unverified => "unverified",
            Outcome::Conflict => "conflict",
            Outcome::Failed => "failed",
        }
    }
}

/// What a background probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProbeOutcome {
    Reachable,
    Unreachable,
    CredentialsRejected,
    /// The check could not run (no free slot in time, credential unreadable).
    NotChecked,
}

impl ProbeOutcome {
    const ALL: [ProbeOutcome; 4] = [
        ProbeOutcome::Reachable,
        ProbeOutcome::Unreachable,
        ProbeOutcome::CredentialsRejected,
        ProbeOutcome::NotChecked,
    ];

    fn name(self) -> &'static str {
        match self {
            ProbeOutcome::Reachable => "reachable",
            ProbeOutcome::Unreachable => "unreachable",
            ProbeOutcome::CredentialsRejected => "credentials_rejected",
            ProbeOutcome::NotChecked => "not_checked",
        }
    }
}

const TRIGGERS: [Trigger; 2] = [Trigger::User, Trigger::System];

fn trigger_name(t: Trigger) -> &'static str {
    match t {
        Trigger::User => "user",
        Trigger::System => "system",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    trigger: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    sync: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    state: &'static str,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FileLabels {
    file: &'static str,
}

/// What a scrape reads from the store, at scrape time.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scraped {
    /// Connections by (kind, state), tombstones included, as the store's
    /// kept counts hold them.
    pub(crate) connections: Vec<(String, State, i64)>,
    pub(crate) revision: i64,
    /// Bytes of the database file and of its write-ahead log.
    pub(crate) db_file_bytes: u64,
    pub(crate) wal_file_bytes: u64,
    /// Pages in use, as the storage quota measures them.
    pub(crate) used_bytes: u64,
}

/// Every metric of one server.
pub(crate) struct Metrics {
    registry: Registry,
    /// `[trigger][outcome]`, in the order of [`TRIGGERS`] and [`Outcome::ALL`].
    transitions: [[Counter; 5]; 2],
    rpc: Family<RpcLabels, Histogram>,
    write_queue: Gauge,
    group_size: Histogram,
    /// Commit time of durable (FULL) and volatile (NORMAL) groups.
    commit: [Histogram; 2],
    watchers: Gauge,
    /// The largest lag a watcher had since the last scrape (see [`Metrics::watcher_lag`]).
    lag_max: AtomicU64,
    lag: Gauge,
    fell_behind: Counter,
    probes: [Counter; 4],
    probe_seconds: [Histogram; 4],
    connections: Family<ConnectionLabels, Gauge>,
    storage: Family<FileLabels, Gauge>,
    used_bytes: Gauge,
    revision: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Latency buckets for calls, probes and commits: 100 µs to about 26 s.
fn seconds_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 19)
}

impl Metrics {
    /// Every metric registered, each counter and gauge made for each of its
    /// label values. `storage_quota` (bytes, 0 for none) is exported as is.
    pub(crate) fn new(storage_quota: u64) -> Metrics {
        let mut registry = Registry::with_prefix("tether");
        let build = Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        registry.register("build", "The running build", build);

        let transitions_family = Family::<TransitionLabels, Counter>::default();
        let transitions = TRIGGERS.map(|t| {
            Outcome::ALL.map(|o| {
                transitions_family.get_or_create_owned(&TransitionLabels {
                    trigger: trigger_name(t),
                    outcome: o.name(),
                })
            })
        });
        registry.register(
            "transitions",
            "Moves of a connection from one state to another, by trigger (user: a request; \
             system: the server's own, after a probe or a failed verification) and outcome",
            transitions_family,
        );

        let rpc = Family::<RpcLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(seconds_buckets())) as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC calls past the access gate and refused by it, from the request to the \
             response headers (for a streaming call, its opening), by method and gRPC code",
            rpc.clone(),
        );

        let write_queue = Gauge::default();
        registry.register(
            "write_queue_depth",
            "Changes queued for the writer and not yet taken into a group",
            write_queue.clone(),
        );
        let group_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "commit_group_size",
            "Jobs (changes) committed together in one transaction",
            group_size.clone(),
        );
        let commit_family = Family::<SyncLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(seconds_buckets())) as fn() -> Histogram,
        );
        let commit =
            ["full", "normal"].map(|sync| commit_family.get_or_create_owned(&SyncLabels { sync }));
        registry.register(
            "commit_duration_seconds",
            "Time of COMMIT of one group: writing its pages to the write-ahead log and, when \
             sync is full (durable changes), the fsync",
            commit_family,
        );

        let watchers = Gauge::default();
        registry.register("watchers", "Open watch streams", watchers.clone());
        let lag = Gauge::default();
        registry.register(
            "watcher_lag_events",
            "The most committed events any watcher had yet to take from the live ring, \
             since the previous scrape",
            lag.clone(),
        );
        let fell_behind = Counter::default();
        registry.register(
            "watcher_replays",
            "Times a watcher fell off the live ring and caught up from the database",
            fell_behind.clone(),
        );

        let probe_family = Family::<ProbeLabels, Counter>::default();
        let probes = ProbeOutcome::ALL
            .map(|o| probe_family.get_or_create_owned(&ProbeLabels { outcome: o.name() }));
        registry.register("probes", "Background probes, by outcome", probe_family);
        let probe_seconds_family = Family::<ProbeLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(seconds_buckets())) as fn() -> Histogram,
        );
        let probe_seconds = ProbeOutcome::ALL
            .map(|o| probe_seconds_family.get_or_create_owned(&ProbeLabels { outcome: o.name() }));
        registry.register(
            "probe_duration_seconds",
            "How long background probes ran (time queued for a check slot not counted), by outcome",
            probe_seconds_family,
        );

        let connections = Family::<ConnectionLabels, Gauge>::default();
        registry.register(
            "connections",
            "Connections by state and kind (DELETED: tombstones), read at scrape time",
            connections.clone(),
        );
        let revision = Gauge::default();
        registry.register(
            "revision",
            "The store-wide revision: the number of the latest change",
            revision.clone(),
        );
        let storage = Family::<FileLabels, Gauge>::default();
        registry.register(
            "storage_bytes",
            "Size of the database file (db) and of its write-ahead log (wal)",
            storage.clone(),
        );
        let used_bytes = Gauge::default();
        registry.register(
            "storage_used_bytes",
            "Space the database's pages in use take, as --storage-quota measures it",
            used_bytes.clone(),
        );
        let quota = Gauge::<i64, AtomicI64>::default();
        quota.set(i64::try_from(storage_quota).unwrap_or(i64::MAX));
        registry.register(
            "storage_quota_bytes",
            "The storage quota (--storage-quota); 0 for none",
            quota,
        );

        Metrics {
            registry,
            transitions,
            rpc,
            write_queue,
            group_size,
            commit,
            watchers,
            lag_max: AtomicU64::new(0),
            lag,
            fell_behind,
            probes,
            probe_seconds,
            connections,
            storage,
            used_bytes,
            revision,
        }
    }

    /// A move of a connection, committed or not.
    pub(crate) fn transition(&self, trigger: Trigger, outcome: Outcome) {
        self.transitions_by(trigger, outcome, 1);
    }

    /// `n` moves alike (a discovery report's).
    pub(crate) fn transitions_by(&self, trigger: Trigger, outcome: Outcome, n: u64) {
        let t = TRIGGERS.iter().position(|x| *x == trigger).unwrap_or(0);
        let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(0);
        self.transitions[t][o].inc_by(n);
    }

    /// A gRPC call answered `code` (its name, e.g. `NOT_FOUND`) after `took`.
    pub(crate) fn rpc(&self, method: &'static str, code: &'static str, took: Duration) {
        self.rpc
            .get_or_create(&RpcLabels { method, code })
            .observe(took.as_secs_f64());
    }

    /// A change queued for the writer.
    pub(crate) fn queued(&self) {
        self.write_queue.inc();
    }

    /// A queued change taken by the writer.
    pub(crate) fn dequeued(&self) {
        self.write_queue.dec();
    }

    /// A group of `jobs` committed, its COMMIT taking `took`.
    pub(crate) fn committed(&self, jobs: usize, durable: bool, took: Duration) {
        self.group_size.observe(jobs as f64);
        self.commit[usize::from(!durable)].observe(took.as_secs_f64());
    }

    pub(crate) fn watch_opened(&self) {
        self.watchers.inc();
    }

    pub(crate) fn watch_closed(&self) {
        self.watchers.dec();
    }

    /// A watcher took a batch of live changes with `behind` more committed
    /// changes still waiting for it in the ring. One atomic, no lock.
    pub(crate) fn watcher_lag(&self, behind: usize) {
        self.lag_max
            .fetch_max(u64::try_from(behind).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// A watcher fell off the live ring (`missed` changes) and replays from the store.
    pub(crate) fn watcher_fell_behind(&self, missed: u64) {
        self.watcher_lag(usize::try_from(missed).unwrap_or(usize::MAX));
        self.fell_behind.inc();
    }

    /// A background probe ran (or could not).
    pub(crate) fn probe(&self, outcome: ProbeOutcome, took: Duration) {
        let i = ProbeOutcome::ALL
            .iter()
            .position(|x| *x == outcome)
            .unwrap_or(0);
        self.probes[i].inc();
        self.probe_seconds[i].observe(took.as_secs_f64());
    }

    /// The text of a scrape: what was recorded, and `scraped`. Scrapes
    /// are expected one at a time (the admin listener serialises them).
    pub(crate) fn encode(&self, scraped: &Scraped) -> String {
        self.connections.clear();
        for (kind, state, n) in &scraped.connections {
            // Every state of each kind present, so that a state emptied
            // reads 0 rather than vanishing.
            for s in State::ALL {
                let g = self.connections.get_or_create(&ConnectionLabels {
                    state: s.name(),
                    kind: kind.clone(),
                });
                if s == *state {
                    g.set(*n);
                }
            }
        }
        let bytes = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.storage
            .get_or_create(&FileLabels { file: "db" })
            .set(bytes(scraped.db_file_bytes));
        self.storage
            .get_or_create(&FileLabels { file: "wal" })
            .set(bytes(scraped.wal_file_bytes));
        self.used_bytes.set(bytes(scraped.used_bytes));
        self.revision.set(scraped.revision);
        self.lag.set(bytes(self.lag_max.swap(0, Ordering::Relaxed)));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_shows_what_was_recorded_and_read() {
        let m = Metrics::new(1 << 20);
        m.transition(Trigger::User, Outcome::Accepted);
        m.transition(Trigger::User, Outcome::Accepted);
        m.transition(Trigger::System, Outcome::Refused);
        m.rpc(
            "tether.v1.ConnectionService/GetConnection",
            "NOT_FOUND",
            Duration::from_millis(3),
        );
        m.queued();
        m.queued();
        m.dequeued();
        m.committed(3, true, Duration::from_millis(2));
        m.watcher_lag(7);
        m.watcher_lag(2);
        let text = m.encode(&Scraped {
            connections: vec![("tcp".into(), State::Connected, 4)],
            revision: 9,
            db_file_bytes: 4096,
            wal_file_bytes: 0,
            used_bytes: 2048,
        });
        for line in [
            r#"tether_transitions_total{trigger="user",outcome="accepted"} 2"#,
            r#"tether_transitions_total{trigger="system",outcome="refused"} 1"#,
            r#"tether_transitions_total{trigger="system",outcome="accepted"} 0"#,
            r#"tether_rpc_duration_seconds_count{method="tether.v1.ConnectionService/GetConnection",code="NOT_FOUND"} 1"#,
            "tether_write_queue_depth 1",
            "tether_commit_group_size_sum 3.0",
            r#"tether_commit_duration_seconds_count{sync="full"} 1"#,
            r#"tether_connections{state="CONNECTED",kind="tcp"} 4"#,
            r#"tether_connections{state="DISCOVERED",kind="tcp"} 0"#,
            r#"tether_storage_bytes{file="db"} 4096"#,
            "tether_storage_used_bytes 2048",
            "tether_storage_quota_bytes 1048576",
            "tether_revision 9",
            "tether_watcher_lag_events 7",
            r#"tether_build_info{version=""#,
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        // The lag is the largest since the previous scrape.
        let again = m.encode(&Scraped::default());
        assert!(again.contains("tether_watcher_lag_events 0"), "{again}");
        assert!(!again.contains(r#"kind="tcp""#), "{again}");
    }
}
