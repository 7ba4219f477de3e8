//! Background monitoring: probes managed connections on an interval and feeds
//! what it sees to the engine, which moves them along the SYSTEM edges.
//!
//! One task owns the schedule (a timer queue keyed by connection id). It
//! learns of new and changed connections from the store's published events,
//! so it never polls the database; it runs at most `concurrency` probes at
//! once and spreads them with jitter, so 10,000 connections are watched
//! without bursts or unbounded tasks. Due times fall on 100 ms ticks: the
//! connections due in one tick are read in one go, and their results are
//! written in one go, so a probe costs a share of a transaction rather than
//! one. It decides nothing about state: the engine applies results, and
//! discards one that a newer change overtook.
//!
//! Probes of DISCOVERED connections (the lifecycle's
//! [`probed_once`](lifecycle::probed_once)), which a discovery report of thousands
//! would otherwise start within a second, pass a rate limiter first; over
//! the rate a probe is put back until its turn, never dropped.

use crate::connection::{Connection, ConnectionId};
use crate::engine::Engine;
use crate::error::Error;
use crate::kinds::Kinds;
use crate::lifecycle;
use crate::metrics::ProbeOutcome;
// The checker lives in `probe`; re-exported so the server wiring's import
// of it from here keeps compiling.
pub(crate) use crate::probe::Checker;
use crate::probe::Verdict;
use crate::store::Store;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

/// Monitoring settings.
#[derive(Clone, Debug)]
pub(crate) struct MonitorConfig {
    /// Probe interval for kinds whose definition names none.
    pub(crate) interval: Duration,
    /// Consecutive failed probes before CONNECTED becomes DISCONNECTED, or
    /// REGISTERED becomes NOT_FOUND (unreachable) or DISCONNECTED (credentials rejected).
    pub(crate) failure_threshold: u32,
    /// Most probes running at once.
    pub(crate) concurrency: usize,
    /// Most probes of DISCOVERED connections started per second.
    pub(crate) discovery_rate: u32,
}

/// Admits probes of discovered connections at a steady rate (with a burst
/// of one second's worth).
struct DiscoveryGate<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    clock: C,
}

impl DiscoveryGate {
    fn new(per_second: u32) -> Self {
        DiscoveryGate::with_clock(per_second, DefaultClock::default())
    }
}

impl<C: Clock + Clone> DiscoveryGate<C> {
    fn with_clock(per_second: u32, clock: C) -> Self {
        let rate = NonZeroU32::new(per_second.max(1)).expect("at least one");
        DiscoveryGate {
            limiter: RateLimiter::direct_with_clock(Quota::per_second(rate), clock.clone()),
            clock,
        }
    }

    /// `Ok` to probe now, else how long to wait before asking again.
    fn admit(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// When to probe `c` next: one the lifecycle probes once
/// ([`lifecycle::probed_once`]: DISCOVERED) almost at once, the rest one interval on, give or take 10% so probes do not bunch;
/// at start (`first`), anywhere within one interval.
fn delay_for(c: &Connection, interval: Duration, first: bool) -> Duration {
    if lifecycle::probed_once(c.state) {
        return interval
            .min(Duration::from_secs(1))
            .mul_f64(fastrand::f64());
    }
    if first {
        return interval.mul_f64(fastrand::f64());
    }
    interval.mul_f64(0.9 + 0.2 * fastrand::f64())
}

/// Whether the server watches this connection ([`lifecycle::monitored`]).
fn monitored(c: &Connection) -> bool {
    lifecycle::monitored(c.managed, c.state, c.state_trigger)
}

pub(crate) struct Monitor {
    engine: Engine,
    store: Store,
    checker: Arc<Checker>,
    kinds: Kinds,
    config: MonitorConfig,
    discovery: DiscoveryGate,
}

impl Monitor {
    pub(crate) fn new(
        engine: Engine,
        store: Store,
        checker: Arc<Checker>,
        kinds: Kinds,
        config: MonitorConfig,
    ) -> Self {
        Monitor {
            engine,
            store,
            checker,
            kinds,
            discovery: DiscoveryGate::new(config.discovery_rate),
            config,
        }
    }

    fn interval(&self, kind: &str) -> Duration {
        self.kinds
            .registry()
            .get(kind)
            .and_then(|d| d.probe_interval)
            .unwrap_or(self.config.interval)
    }

    fn delay(&self, c: &Connection, first: bool) -> Duration {
        delay_for(c, self.interval(&c.kind), first)
    }

    /// Runs until `stopping` is cancelled.
    pub(crate) async fn run(self, stopping: CancellationToken) {
        let mut live = self.store.subscribe();
        let mut schedule = Schedule::default();
        // A failed (re)load is retried: the schedule must not stay empty.
        let mut resync_at = (!self.resync(&mut schedule, true).await).then(retry_soon);
        // Probe results go to one task that applies whatever has gathered
        // in one write (see `apply_results`).
        let (results, gathered) = tokio::sync::mpsc::unbounded_channel();
        let applier = tokio::spawn(apply_results(
            self.engine.clone(),
            gathered,
            self.config.failure_threshold,
        ));
        // A probe's task ends with the connection as the probe left it, when
        // that is known (it usually is: the writer returns it).
        let mut running: JoinSet<(ConnectionId, Option<Connection>)> = JoinSet::new();
        loop {
            tokio::select! {
                _ = stopping.cancelled() => break,
                _ = sleep_until_some(resync_at) => {
                    resync_at = (!self.resync(&mut schedule, false).await).then(retry_soon);
                }
                Some(due) = schedule.queue.next(), if running.len() < self.config.concurrency => {
                    // Everything due in the same tick, read in one go.
                    let mut ids = vec![due.into_inner()];
                    while running.len() + ids.len() < self.config.concurrency {
                        match futures::FutureExt::now_or_never(schedule.queue.next()) {
                            Some(Some(due)) => ids.push(due.into_inner()),
                            _ => break,
                        }
                    }
                    for id in &ids {
                        schedule.keys.remove(id);
                    }
                    // Another replica probes the rest (PostgreSQL): looked at
                    // again at their next turn, in case that one went away.
                    ids.retain(|id| {
                        let mine = self.store.probes(id);
                        if !mine {
                            schedule.put(id.clone(), self.config.interval);
                        }
                        mine
                    });
                    if ids.is_empty() {
                        continue;
                    }
                    let read = ids.clone();
                    let rows = match self
                        .store
                        .read(move |c| read.iter().map(|id| c.get(id)).collect::<Result<Vec<_>, _>>())
                        .await
                    {
                        Ok(rows) => rows,
                        Err(e) => {
                            // Keep them: a read failing now says nothing about the peers.
                            tracing::warn!(connections = ids.len(), error = %e, "cannot read connections to probe");
                            for id in ids {
                                schedule.put(id, self.config.interval);
                            }
                            continue;
                        }
                    };
                    for (id, row) in ids.into_iter().zip(rows) {
                        let Some(c) = row.filter(monitored) else { continue };
                        self.start_probe(&mut schedule, &mut running, &results, id, c);
                    }
                }
                Some(done) = running.join_next() => {
                    let Ok((id, after)) = done else { continue };
                    schedule.running.remove(&id);
                    // Events that came in while it ran were passed over: look at
                    // the row as it is now (as the writer left it, or read).
                    let changed = schedule.changed.remove(&id);
                    let now = match after {
                        Some(c) if !changed => Ok(Some(c)),
                        _ => self.engine_get(&id).await,
                    };
                    match now {
                        Ok(Some(c)) if monitored(&c) => {
                            let delay = self.delay(&c, false);
                            schedule.put(id, delay);
                        }
                        Ok(_) => {}
                        Err(_) => schedule.put(id, self.config.interval),
                    }
                }
                event = live.recv() => match event {
                    Ok(e) => self.on_change(&mut schedule, &e.connection),
                    Err(RecvError::Lagged(_)) => {
                        let running: Vec<_> = schedule.running.iter().cloned().collect();
                        schedule.changed.extend(running);
                        resync_at = (!self.resync(&mut schedule, false).await).then(retry_soon);
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
        running.shutdown().await;
        applier.abort();
    }

    /// Starts probing `c` (read just now), unless discovered connections are
    /// over their rate: then it waits its turn.
    fn start_probe(
        &self,
        schedule: &mut Schedule,
        running: &mut JoinSet<(ConnectionId, Option<Connection>)>,
        results: &Results,
        id: ConnectionId,
        c: Connection,
    ) {
        if lifecycle::probed_once(c.state)
            && let Err(wait) = self.discovery.admit()
        {
            // Delayed, never dropped: it keeps its place in line.
            schedule.put(id, wait.max(Duration::from_millis(1)));
            return;
        }
        schedule.running.insert(id);
        let (checker, results) = (self.checker.clone(), results.clone());
        let metrics = self.store.metrics();
        running.spawn(async move {
            // A panic in a probe must not lose the connection's place.
            let probe = std::panic::AssertUnwindSafe(async {
                let result = checker.check(&c).await;
                if let Some(seen) = &result {
                    metrics.probe(probe_outcome(&seen.verdict), seen.latency);
                }
                let (answer, applied) = tokio::sync::oneshot::channel();
                if results.send((c.clone(), result, answer)).is_err() {
                    return None;
                }
                match applied.await {
                    Ok(Ok(after)) => after,
                    // The writer logs the quota alarm once, not per result.
                    Ok(Err(e @ Error::QuotaExceeded { .. })) => {
                        tracing::debug!(id = %c.id, error = %e, "probe result not applied");
                        None
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(id = %c.id, error = %e, "probe result not applied");
                        None
                    }
                    Err(_) => None,
                }
            });
            let after = futures::FutureExt::catch_unwind(probe)
                .await
                .unwrap_or_else(|_| {
                    tracing::error!(id = %c.id, "a probe panicked");
                    None
                });
            (c.id, after)
        });
    }

    async fn engine_get(&self, id: &ConnectionId) -> Result<Option<Connection>, crate::Error> {
        let id = id.clone();
        self.store.read(move |c| c.get(&id)).await
    }

    fn on_change(&self, schedule: &mut Schedule, c: &Connection) {
        if schedule.running.contains(&c.id) {
            // Rescheduled when its probe finishes, from the row as it is then.
            schedule.changed.insert(c.id.clone());
            return;
        }
        if !monitored(c) {
            schedule.remove(&c.id);
        } else if lifecycle::probed_once(c.state) || !schedule.keys.contains_key(&c.id) {
            let delay = self.delay(c, false);
            schedule.put(c.id.clone(), delay);
        }
    }

    /// Brings the schedule in line with the database (at start, and after
    /// missing published events); whether it could.
    async fn resync(&self, schedule: &mut Schedule, first: bool) -> bool {
        let candidates = match self.store.read(|c| c.probe_candidates()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot load connections to monitor; retrying");
                return false;
            }
        };
        let wanted: HashSet<_> = candidates
            .iter()
            .filter(|c| monitored(c))
            .map(|c| c.id.clone())
            .collect();
        let stale: Vec<_> = schedule
            .keys
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in stale {
            schedule.remove(&id);
        }
        for c in candidates.iter().filter(|c| monitored(c)) {
            if !schedule.keys.contains_key(&c.id) && !schedule.running.contains(&c.id) {
                let delay = self.delay(c, first);
                schedule.put(c.id.clone(), delay);
            }
        }
        tracing::debug!(monitored = wanted.len(), "monitor schedule loaded");
        true
    }
}

/// A probe result on its way to be applied, and where its answer goes.
type ProbeResult = (
    Connection,
    Option<crate::probe::Observation>,
    tokio::sync::oneshot::Sender<Result<Option<Connection>, Error>>,
);
type Results = tokio::sync::mpsc::UnboundedSender<ProbeResult>;

/// Most results applied in one write.
const MOST_RESULTS_PER_WRITE: usize = 256;

/// Applies probe results as they come, each write taking all that gathered
/// while the last one ran: probes due in the same tick finish together, so
/// their results share one transaction instead of one each.
async fn apply_results(
    engine: Engine,
    mut gathered: tokio::sync::mpsc::UnboundedReceiver<ProbeResult>,
    failure_threshold: u32,
) {
    let mut batch = Vec::with_capacity(MOST_RESULTS_PER_WRITE);
    while gathered.recv_many(&mut batch, MOST_RESULTS_PER_WRITE).await > 0 {
        let (results, answers): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .map(|(c, result, answer)| ((c, result), answer))
            .unzip();
        let applied = engine.apply_probes(results, failure_threshold).await;
        for (answer, applied) in answers.into_iter().zip(applied) {
            // The probe's task may be gone (shutting down): nothing to tell.
            let _ = answer.send(applied);
        }
    }
}

fn retry_soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(1)
}

/// Completes at `at`, or never when there is nothing to wait for.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Probes fall due on ticks this far apart: those due within one tick start
/// together, are read in one go and have their results written in one go.
const TICK: Duration = Duration::from_millis(100);

/// Who is due when, and who is being probed now.
struct Schedule {
    /// Where ticks are counted from.
    epoch: tokio::time::Instant,
    queue: DelayQueue<ConnectionId>,
    keys: HashMap<ConnectionId, delay_queue::Key>,
    running: HashSet<ConnectionId>,
    /// Running ones that changed meanwhile.
    changed: HashSet<ConnectionId>,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            epoch: tokio::time::Instant::now(),
            queue: DelayQueue::new(),
            keys: HashMap::new(),
            running: HashSet::new(),
            changed: HashSet::new(),
        }
    }
}

impl Schedule {
    /// Due `delay` from now, rounded up to the next tick.
    fn put(&mut self, id: ConnectionId, delay: Duration) {
        let since = (tokio::time::Instant::now() + delay).duration_since(self.epoch);
        let ticks = since.as_nanos().div_ceil(TICK.as_nanos());
        let at = self.epoch + TICK * u32::try_from(ticks).unwrap_or(u32::MAX);
        match self.keys.get(&id) {
            Some(key) => self.queue.reset_at(key, at),
            None => {
                let key = self.queue.insert_at(id.clone(), at);
                self.keys.insert(id, key);
            }
        }
    }

    fn remove(&mut self, id: &ConnectionId) {
        if let Some(key) = self.keys.remove(id) {
            self.queue.remove(&key);
        }
    }
}

/// What a probe's verdict counts as in the metrics.
fn probe_outcome(v: &Verdict) -> ProbeOutcome {
    match v {
        Verdict::Reachable(_) => ProbeOutcome::Reachable,
        Verdict::Unreachable(_) => ProbeOutcome::Unreachable,
        Verdict::CredentialsRejected(_) => ProbeOutcome::CredentialsRejected,
        Verdict::NotChecked(_) => ProbeOutcome::NotChecked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{State, Trigger};

    fn id(n: u8) -> ConnectionId {
        ConnectionId::parse(&format!("00000000-0000-4000-8000-0000000000{n:02}"), "id").unwrap()
    }

    /// The next due id, if one is due within `within` of (paused) time.
    async fn due(s: &mut Schedule, within: Duration) -> Option<ConnectionId> {
        tokio::time::timeout(within, s.queue.next())
            .await
            .ok()
            .flatten()
            .map(|e| e.into_inner())
    }

    #[tokio::test(start_paused = true)]
    async fn the_schedule_fires_in_order_and_forgets_what_is_removed() {
        let mut s = Schedule::default();
        s.put(id(1), Duration::from_secs(30));
        s.put(id(2), Duration::from_secs(10));
        s.put(id(3), Duration::from_secs(20));
        s.remove(&id(3));
        // Rescheduling replaces the earlier entry rather than adding one.
        s.put(id(2), Duration::from_secs(40));
        assert_eq!(due(&mut s, Duration::from_secs(29)).await, None);
        assert_eq!(due(&mut s, Duration::from_secs(2)).await, Some(id(1)));
        assert_eq!(due(&mut s, Duration::from_secs(15)).await, Some(id(2)));
        assert_eq!(
            due(&mut s, Duration::from_secs(3600)).await,
            None,
            "3 was removed"
        );
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_new_connections_go_first() {
        let interval = Duration::from_secs(30);
        let spread = |first: bool, state: State| -> (Duration, Duration) {
            let c = Connection { state, ..sample() };
            let delays: Vec<Duration> = (0..2000).map(|_| delay_for(&c, interval, first)).collect();
            (*delays.iter().min().unwrap(), *delays.iter().max().unwrap())
        };
        let (lo, hi) = spread(false, State::Connected);
        assert!(
            lo >= interval.mul_f64(0.9) && hi <= interval.mul_f64(1.1),
            "{lo:?}..{hi:?}"
        );
        assert!(
            hi - lo > interval.mul_f64(0.1),
            "delays are spread, not fixed"
        );
        let (_, hi) = spread(false, State::Discovered);
        assert!(hi <= Duration::from_secs(1));
        let (lo, hi) = spread(true, State::Connected);
        assert!(
            hi <= interval && hi - lo > interval / 2,
            "a start spreads over one interval"
        );
    }

    fn sample() -> Connection {
        Connection {
            id: id(9),
            kind: "http".into(),
            type_: String::new(),
            sub_type: String::new(),
            name: "x".into(),
            description: String::new(),
            url: "http://127.0.0.1:1/".into(),
            identity: "x".into(),
            metadata: Default::default(),
            labels: Default::default(),
            managed: true,
            credential_id: String::new(),
            owner: String::new(),
            state: State::Connected,
            state_reason: String::new(),
            state_trigger: Trigger::User,
            state_time: 0,
            revision: crate::connection::Revision::new(1),
            create_time: 0,
            update_time: 0,
            last_probe: None,
        }
    }

    #[test]
    fn discovered_probes_over_the_rate_wait_their_turn() {
        let clock = governor::clock::FakeRelativeClock::default();
        let gate = DiscoveryGate::with_clock(2, clock.clone());
        assert_eq!(gate.admit(), Ok(()));
        assert_eq!(gate.admit(), Ok(()));
        let wait = gate.admit().expect_err("a third in the same second waits");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        clock.advance(wait);
        assert_eq!(gate.admit(), Ok(()), "and goes once its turn comes");
        assert!(gate.admit().is_err());
    }

    #[test]
    fn only_managed_connections_in_probed_states_are_monitored() {
        let with = |state, trigger, managed| Connection {
            state,
            state_trigger: trigger,
            managed,
            ..sample()
        };
        assert!(monitored(&with(State::Discovered, Trigger::User, true)));
        assert!(monitored(&with(State::Connected, Trigger::User, true)));
        assert!(monitored(&with(State::Disconnected, Trigger::System, true)));
        assert!(!monitored(&with(State::Disconnected, Trigger::User, true)));
        assert!(!monitored(&with(State::Connected, Trigger::User, false)));
        for s in [
            State::Ignored,
            State::Maintenance,
            State::Deleted,
            State::NotFound,
        ] {
            assert!(!monitored(&with(s, Trigger::System, true)), "{s}");
        }
    }
}
