//! Watch streams: a snapshot or a replay from the store, then live events,
//! each change delivered once, in revision order, within one memory budget.
//!
//! A watcher subscribes to the store's published events *before* it reads the
//! store, so nothing committed can fall between the two; events seen twice
//! (once replayed, once live) are dropped by revision. Live events come from a
//! bounded broadcast ring: a watcher that falls behind it never slows writers
//! or other watchers, it catches up from the store instead, and only if the
//! history it needs has been pruned does it end with `REVISION_COMPACTED`.
//!
//! Changes are shared, never copied: a live event is the store's own
//! `Arc<Event>`, handed to every watcher it concerns; one replayed from the
//! store is wrapped once. Each watcher adds only its view of the change
//! ([`Change`]); whatever is derived from the event itself (its size, its
//! encoding on the wire) is worked out once, by its first reader, and kept
//! with the event ([`Event::encoded`]).
//!
//! A snapshot is read in pages from one read transaction ([`Store::snapshot`]),
//! never whole. What a watcher holds between its task and its gRPC stream is
//! counted against one budget shared by every watcher (`--watch-memory`):
//! each may hold its share, and a task waits while its watcher is at it. A
//! watcher that takes nothing for `--watch-stall-timeout` (or whose snapshot
//! takes longer than `--watch-snapshot-timeout`) is ended with
//! `WATCH_TOO_SLOW` and the revision to resume from; what it held is freed.
//!
//! A buffered change is charged to its watcher at the event's full size,
//! although what the watcher itself holds is a pointer. The charge stands for
//! what the watcher keeps alive: a watcher that stops taking pins every event
//! in its buffer after the ring and the other watchers have moved on, so the
//! events held by watchers stuck at different places are distinct, and only
//! charging each its full size keeps the sum of all buffers within
//! `--watch-memory`. Where watchers keep up, the same event is counted by
//! several of them at once, so the budget overstates memory, never
//! understates it; and a watcher that keeps up holds almost nothing, so its
//! charge is brief. Memory itself grows per watcher by its queue of pointers,
//! whatever the size of the events.
//!
//! Live events come in batches: one wake of the task takes every event the
//! ring holds ready (up to [`LIVE_BATCH`]) and queues what concerns the
//! watcher under one lock, with one wake of the stream.
//!
//! Every watch task observes the shutdown token and is tracked, so the server
//! can wait for all of them to end.

use crate::connection::Revision;
use crate::connection::{Connection, Event, EventType};

use crate::error::Error;
use crate::lifecycle::{self, State};
use crate::metrics::Metrics;
use crate::store::{EventFilter, Filter, Store};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// Watch settings.
#[derive(Clone, Debug)]
pub(crate) struct WatchConfig {
    /// Idle time before a BOOKMARK is sent to watchers that asked for progress.
    pub(crate) bookmark_interval: Duration,
    /// Events read from the store per page while catching up, and
    /// connections per snapshot page.
    pub(crate) replay_page: usize,
    /// Messages buffered per watcher between its task and its gRPC stream.
    pub(crate) buffer: usize,
    /// Bytes all watchers together may hold buffered.
    pub(crate) memory: usize,
    /// How long a watcher may take nothing while its buffer is full.
    pub(crate) stall_timeout: Duration,
    /// How long a watcher may take to receive its snapshot, during which a
    /// read view of the database is held open.
    pub(crate) snapshot_timeout: Duration,
}

/// Every watcher may hold at least this much, however many there are: one
/// message always fits, whatever its size.
const MIN_SHARE: usize = 64 * 1024;

/// Most bytes a store page read for one watcher holds (a snapshot page or a
/// page of history while catching up); it is also at most a quarter of the
/// watcher's share. A snapshot has at most three pages in flight (one being
/// read, one waiting, one being queued).
const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// Most live events a watch task takes from the ring per wake.
const LIVE_BATCH: usize = 256;

/// What a watch asks for.
#[derive(Clone, Debug, Default)]
pub(crate) struct WatchSpec {
    /// 0: snapshot first. N: every change after revision N.
    pub(crate) after_revision: Revision,
    /// Only owners, kinds, states and ids are used.
    pub(crate) filter: Filter,
    pub(crate) progress_notify: bool,
}

/// How a change relates to the watch's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Added,
    Modified,
    Removed,
}

/// One message of a watch stream.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Item {
    /// A connection of the initial snapshot (its revision is its last change).
    Snapshot(Box<Connection>),
    /// A committed change as it concerns this watch; the event is shared
    /// with every other watcher it concerns.
    Change(Change, Arc<Event>),
    /// Everything up to this revision has been sent; what follows is live.
    Synced(Revision),
    /// Nothing new; everything up to this revision has been sent.
    Bookmark(Revision),
}

impl Item {
    /// About how many bytes the message holds while buffered.
    fn approx_size(&self) -> usize {
        match self {
            Item::Snapshot(c) => c.approx_size(),
            Item::Change(_, e) => e.approx_size(),
            Item::Synced(_) | Item::Bookmark(_) => 64,
        }
    }

    /// The revision a client that has this message can resume after, if any
    /// (a snapshot is only complete at its SYNCED).
    fn resumable(&self) -> Option<Revision> {
        match self {
            Item::Snapshot(_) => None,
            Item::Change(_, e) => Some(e.revision),
            Item::Synced(r) | Item::Bookmark(r) => Some(*r),
        }
    }
}

/// The memory every watcher's buffer draws on.
#[derive(Debug)]
struct Budget {
    limit: usize,
    watchers: AtomicUsize,
    /// Where the open watchers and their lag are counted.
    metrics: Arc<Metrics>,
}

impl Budget {
    fn new(limit: usize, metrics: Arc<Metrics>) -> Self {
        Budget {
            limit,
            watchers: AtomicUsize::new(0),
            metrics,
        }
    }

    /// What one watcher may hold now: an equal part of the budget.
    fn share(&self) -> usize {
        (self.limit / self.watchers.load(Ordering::Relaxed).max(1)).max(MIN_SHARE)
    }
}

/// Starts watch streams.
#[derive(Clone)]
pub(crate) struct Watcher {
    store: Store,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    config: WatchConfig,
    budget: Arc<Budget>,
}

impl Watcher {
    pub(crate) fn new(
        store: Store,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        config: WatchConfig,
    ) -> Self {
        Watcher {
            budget: Arc::new(Budget::new(config.memory, store.metrics())),
            store,
            shutdown,
            tracker,
            config,
        }
    }

    /// Checks the request and starts the stream. Errors about the starting
    /// revision come back here, before any message is sent.
    pub(crate) async fn watch(&self, spec: WatchSpec) -> Result<WatchStream, Error> {
        if self.shutdown.is_cancelled() {
            return Err(shutting_down());
        }
        // Subscribe first: everything committed from here on reaches `live`.
        let live = self.store.subscribe();
        let (current, compact) = self.store.read(|r| r.revisions()).await?;
        check_start(spec.after_revision, current, compact)?;
        let queue = Arc::new(Queue::new(self.budget.clone(), self.config.buffer));
        // The watch's own token, cancelled with the server's: its stream and
        // task look at it on every wake, and a shared token's lock would be
        // taken by every watcher for every change.
        let shutdown = self.shutdown.child_token();
        let stream = WatchStream {
            queue: queue.clone(),
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
            done: false,
            resume_after: spec.after_revision,
        };
        let task = Task {
            store: self.store.clone(),
            spec,
            queue: queue.clone(),
            config: self.config.clone(),
        };
        self.tracker.spawn(async move {
            // Whatever ends the task, the stream hears how.
            let _end = EndGuard(queue.clone());
            let result = tokio::select! {
                r = task.run(live) => r,
                _ = shutdown.cancelled() => Ok(()),
                _ = queue.gone.cancelled() => Ok(()),
            };
            match result {
                Ok(()) | Err(Stop::Gone) => {}
                Err(Stop::Stalled(why)) => {
                    tracing::info!(why, "watcher fell too far behind; ended it");
                    queue.stall(why);
                }
                Err(Stop::Failed(e)) => queue.end(e),
            }
        });
        Ok(stream)
    }
}

fn check_start(after: Revision, current: Revision, compact: Revision) -> Result<(), Error> {
    if after > current {
        return Err(Error::RevisionInFuture {
            requested: after,
            current,
        });
    }
    if after != Revision::ZERO && after < compact {
        return Err(Error::RevisionCompacted {
            requested: after,
            compact,
        });
    }
    Ok(())
}

fn shutting_down() -> Error {
    Error::Unavailable("the server is shutting down".into())
}

/// Messages on their way from a watch task to its stream, bounded in count
/// and in bytes (the watcher's share of the budget).
struct Queue {
    state: Mutex<Buffered>,
    /// Wakes the task when the stream takes something.
    room: Notify,
    /// Cancelled when the stream is dropped: the client has gone.
    gone: CancellationToken,
    budget: Arc<Budget>,
    capacity: usize,
}

#[derive(Default)]
struct Buffered {
    items: VecDeque<(Item, usize)>,
    bytes: usize,
    /// The task's last word, delivered after the items.
    end: Option<Error>,
    /// The task gave up on a watcher that took nothing for too long: its
    /// items are dropped and the stream ends at once.
    stalled: Option<String>,
    waker: Option<Waker>,
    /// The task waits for room: the stream notifies `room` when it takes.
    task_waiting: bool,
}

impl Buffered {
    /// Drops what is buffered, and with it its share of the budget.
    fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }

    /// Tells the stream there is something to take.
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

impl Queue {
    fn new(budget: Arc<Budget>, capacity: usize) -> Self {
        budget.watchers.fetch_add(1, Ordering::Relaxed);
        budget.metrics.watch_opened();
        Queue {
            state: Mutex::new(Buffered::default()),
            room: Notify::new(),
            gone: CancellationToken::new(),
            budget,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Buffered> {
        self.state.lock().expect("watch queue lock")
    }

    /// Queues `items`, in order, as room for them frees up, waking the
    /// stream once per run queued under the lock; gives up when the watcher
    /// takes nothing for `stall` while the buffer is full.
    async fn push(&self, items: &mut VecDeque<Item>, stall: Duration) -> Result<(), Stop> {
        // Each item gets `stall` from when the one before it got in.
        let mut deadline = Instant::now() + stall;
        while !items.is_empty() {
            {
                let mut b = self.lock();
                // Checked under the lock the stream's drop clears under: nothing
                // is queued (and counted) after that.
                if self.gone.is_cancelled() {
                    return Err(Stop::Gone);
                }
                let share = self.budget.share();
                let before = b.items.len();
                while let Some(item) = items.front() {
                    let bytes = item.approx_size();
                    let fits = b.items.is_empty()
                        || (b.items.len() < self.capacity && b.bytes + bytes <= share);
                    if !fits {
                        break;
                    }
                    let item = items.pop_front().expect("looked at");
                    b.bytes += bytes;
                    b.items.push_back((item, bytes));
                }
                if b.items.len() > before {
                    b.wake();
                    deadline = Instant::now() + stall;
                }
                if items.is_empty() {
                    return Ok(());
                }
                b.task_waiting = true;
            }
            // A permit stored by `notify_one` covers a take that happens
            // between the check above and this wait.
            if tokio::time::timeout_at(deadline, self.room.notified())
                .await
                .is_err()
            {
                return Err(Stop::Stalled(
                    "the watcher took nothing while its buffer was full".into(),
                ));
            }
        }
        Ok(())
    }

    fn stall(&self, why: String) {
        let mut b = self.lock();
        b.clear();
        b.stalled = Some(why);
        b.wake();
    }

    fn end(&self, e: Error) {
        let mut b = self.lock();
        b.end.get_or_insert(e);
        b.wake();
    }
}

/// Ends the stream when its task ends without a word (it never should): a
/// watch never ends without a status.
struct EndGuard(Arc<Queue>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.end(Error::Unavailable(
            "the watch ended unexpectedly; resume from the last revision".into(),
        ));
    }
}

/// The client side of a watch. Ends with `UNAVAILABLE` as soon as the server
/// starts shutting down, whatever is still buffered.
pub(crate) struct WatchStream {
    queue: Arc<Queue>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
    /// The revision everything handed out so far reaches: where a client
    /// resumes. 0 until a snapshot is complete.
    resume_after: Revision,
}

impl tokio_stream::Stream for WatchStream {
    type Item = Result<Item, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err(shutting_down())));
        }
        let this = &mut *self;
        let mut b = this.queue.lock();
        if let Some(why) = b.stalled.take() {
            drop(b);
            this.done = true;
            return Poll::Ready(Some(Err(Error::WatchTooSlow {
                message: why,
                resume_after: this.resume_after,
            })));
        }
        if let Some((item, bytes)) = b.items.pop_front() {
            b.bytes -= bytes;
            let waiting = std::mem::take(&mut b.task_waiting);
            drop(b);
            if waiting {
                this.queue.room.notify_one();
            }
            if let Some(r) = item.resumable() {
                this.resume_after = r;
            }
            return Poll::Ready(Some(Ok(item)));
        }
        if let Some(e) = b.end.take() {
            drop(b);
            this.done = true;
            return Poll::Ready(Some(Err(e)));
        }
        if !b.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            b.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let mut b = self.queue.lock();
        self.queue.gone.cancel();
        b.clear();
        drop(b);
        self.queue.room.notify_one();
        self.queue.budget.watchers.fetch_sub(1, Ordering::Relaxed);
        self.queue.budget.metrics.watch_closed();
    }
}

/// Why a watch task stopped early.
enum Stop {
    /// The client went away: nothing more to say.
    Gone,
    /// The watcher fell too far behind; the stream says where to resume.
    Stalled(String),
    /// The watch ends with this status, after what was sent.
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

struct Task {
    store: Store,
    spec: WatchSpec,
    queue: Arc<Queue>,
    config: WatchConfig,
}

impl Task {
    async fn run(&self, mut live: broadcast::Receiver<Arc<Event>>) -> Result<(), Stop> {
        let mut last = self.spec.after_revision;
        if last == Revision::ZERO {
            // Everything committed after this snapshot was published after we
            // subscribed, so the live ring has it: no replay is needed here.
            let limit = self.config.snapshot_timeout;
            last = match tokio::time::timeout(limit, self.snapshot()).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Stop::Stalled(format!(
                        "the snapshot was not taken within {}s; list in pages, then watch \
                         from the list's revision",
                        limit.as_secs_f64()
                    )));
                }
            };
        } else {
            last = self.catch_up(last).await?;
        }
        self.send(Item::Synced(last)).await?;
        let interval = self.config.bookmark_interval;
        let mut idle_until = Instant::now() + interval;
        let mut batch = VecDeque::new();
        loop {
            let sent = tokio::select! {
                first = live.recv() => {
                    let mut next = Some(first);
                    let mut taken = 0;
                    let mut lagged = None;
                    // This event and every one already waiting in the ring.
                    while let Some(event) = next.take() {
                        match event {
                            // Already sent from the store while catching up.
                            Ok(e) if e.revision <= last => {}
                            Ok(e) => {
                                last = e.revision;
                                batch.extend(classify(&self.spec.filter, &e));
                            }
                            Err(RecvError::Lagged(missed)) => {
                                lagged = Some(missed);
                                break;
                            }
                            Err(RecvError::Closed) => return Err(shutting_down().into()),
                        }
                        taken += 1;
                        if taken < LIVE_BATCH {
                            next = match live.try_recv() {
                                Ok(e) => Some(Ok(e)),
                                Err(TryRecvError::Empty) => None,
                                Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                                Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                            };
                        }
                    }
                    // What is still in the ring for this watcher: its lag.
                    // One atomic, no lock.
                    match lagged {
                        None => self.queue.budget.metrics.watcher_lag(live.len()),
                        Some(missed) => self.queue.budget.metrics.watcher_fell_behind(missed),
                    }
                    let mut sent = !batch.is_empty();
                    self.queue.push(&mut batch, self.config.stall_timeout).await?;
                    if let Some(missed) = lagged {
                        tracing::debug!(missed, last = last.get(), "watcher fell behind the live ring; replaying from the store");
                        last = self.catch_up(last).await?;
                        sent = true;
                    }
                    sent
                },
                _ = tokio::time::sleep_until(idle_until), if self.spec.progress_notify => {
                    self.send(Item::Bookmark(last)).await?;
                    true
                }
            };
            if sent {
                idle_until = Instant::now() + interval;
            }
        }
    }

    /// Bytes one store page for this watcher may hold.
    fn page_bytes(&self) -> usize {
        (self.queue.budget.share() / 4).min(MAX_PAGE_BYTES)
    }

    /// Sends every matching connection as of one revision, page by page;
    /// returns that revision.
    async fn snapshot(&self) -> Result<Revision, Stop> {
        let mut snapshot = self
            .store
            .snapshot(
                self.spec.filter.clone(),
                self.config.replay_page,
                self.page_bytes(),
            )
            .await?;
        while let Some(page) = snapshot.next_page().await {
            let mut items = page?
                .into_iter()
                .map(|c| Item::Snapshot(Box::new(c)))
                .collect();
            self.push(&mut items).await?;
        }
        Ok(snapshot.revision)
    }

    /// Sends every retained change after `last` from the store; returns the
    /// revision reached.
    async fn catch_up(&self, mut last: Revision) -> Result<Revision, Stop> {
        loop {
            let limit = self.config.replay_page.max(1);
            let max_bytes = self.page_bytes();
            let after = last;
            let (events, compact) = self
                .store
                .read(move |r| {
                    let (_, compact) = r.revisions()?;
                    let events = r.events(&EventFilter {
                        connection_id: None,
                        after_revision: after,
                        limit,
                        // Filtered per event below, owners included.
                        owners: None,
                        max_bytes,
                    })?;
                    Ok((events, compact))
                })
                .await?;
            if after < compact {
                return Err(Error::RevisionCompacted {
                    requested: after,
                    compact,
                }
                .into());
            }
            let Some(newest) = events.last().map(|e| e.revision) else {
                return Ok(last);
            };
            let mut items = events
                .into_iter()
                .filter_map(|e| classify(&self.spec.filter, &Arc::new(e)))
                .collect();
            self.push(&mut items).await?;
            last = newest;
        }
    }

    async fn send(&self, item: Item) -> Result<(), Stop> {
        self.push(&mut VecDeque::from([item])).await
    }

    async fn push(&self, items: &mut VecDeque<Item>) -> Result<(), Stop> {
        if self.queue.gone.is_cancelled() {
            return Err(Stop::Gone);
        }
        self.queue.push(items, self.config.stall_timeout).await
    }
}

/// Whether `c`, in `state`, is in the watch's view. Tombstones are only in
/// view when the watch asks for the DELETED state.
fn visible(f: &Filter, c: &Connection, state: State) -> bool {
    f.owns(c)
        && (f.kinds.is_empty() || f.kinds.contains(&c.kind))
        && (f.ids.is_empty() || f.ids.contains(&c.id))
        && (f.states.is_empty() || f.states.contains(&state))
        && (!lifecycle::is_tombstone(state) || f.states.contains(&state))
}

/// Entering the view is ADDED, leaving it REMOVED; outside it, nothing.
fn classify(f: &Filter, e: &Arc<Event>) -> Option<Item> {
    let before = e.type_ != EventType::Created && visible(f, &e.connection, e.from_state);
    let after = visible(f, &e.connection, e.to_state);
    let change = match (before, after) {
        (false, true) => Change::Added,
        (true, true) => Change::Modified,
        (true, false) => Change::Removed,
        (false, false) => return None,
    };
    Some(Item::Change(change, Arc::clone(e)))
}
