//! Watch streams: a snapshot or a replay from the store, then live events,
//! each change delivered once, in revision order.
//!
//! A watcher subscribes to the store's published events *before* it reads the
//! store, so nothing committed can fall between the two; events seen twice
//! (once replayed, once live) are dropped by revision. Live events come from a
//! bounded broadcast ring: a watcher that falls behind it never slows writers
//! or other watchers, it catches up from the store instead, and only if the
//! history it needs has been pruned does it end with `REVISION_COMPACTED`.
//!
//! Every watch task observes the shutdown token and is tracked, so the server
//! can wait for all of them to end.

use crate::connection::{Connection, Event, EventType};
use crate::error::Error;
use crate::lifecycle::State;
use crate::store::{EventFilter, Filter, Store, query};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// Watch settings.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Idle time before a BOOKMARK is sent to watchers that asked for progress.
    pub bookmark_interval: Duration,
    /// Events read from the store per page while catching up.
    pub replay_page: usize,
    /// Items buffered per watcher between its task and its gRPC stream.
    pub buffer: usize,
}

/// What a watch asks for.
#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    /// 0: snapshot first. N: every change after revision N.
    pub after_revision: i64,
    /// Only owners, kinds, states and ids are used.
    pub filter: Filter,
    pub progress_notify: bool,
}

/// How a change relates to the watch's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Added,
    Modified,
    Removed,
}

/// One message of a watch stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// A connection of the initial snapshot (its revision is its last change).
    Snapshot(Connection),
    /// A committed change as it concerns this watch.
    Change(Change, Event),
    /// Everything up to this revision has been sent; what follows is live.
    Synced(i64),
    /// Nothing new; everything up to this revision has been sent.
    Bookmark(i64),
}

/// Starts watch streams.
#[derive(Clone)]
pub struct Watcher {
    store: Store,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    config: WatchConfig,
}

impl Watcher {
    pub fn new(
        store: Store,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        config: WatchConfig,
    ) -> Self {
        Watcher {
            store,
            shutdown,
            tracker,
            config,
        }
    }

    /// Checks the request and starts the stream. Errors about the starting
    /// revision come back here, before any message is sent.
    pub async fn watch(&self, spec: WatchSpec) -> Result<WatchStream, Error> {
        if self.shutdown.is_cancelled() {
            return Err(shutting_down());
        }
        // Subscribe first: everything committed from here on reaches `live`.
        let live = self.store.subscribe();
        let (current, compact) = self.store.read(|c| query::revisions(c)).await?;
        check_start(spec.after_revision, current, compact)?;
        let (tx, rx) = mpsc::channel(self.config.buffer.max(1));
        let task = Task {
            store: self.store.clone(),
            spec,
            out: tx,
            config: self.config.clone(),
        };
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            let out = task.out.clone();
            let result = tokio::select! {
                r = task.run(live) => r,
                _ = shutdown.cancelled() => Ok(()),
                _ = out.closed() => Ok(()),
            };
            if let Err(e) = result {
                // The error is the last word, so wait for room behind whatever
                // is still buffered; give up only if the client goes or we stop.
                tokio::select! {
                    _ = out.send(Err(e)) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        });
        Ok(WatchStream {
            rx,
            shutdown: Box::pin(self.shutdown.clone().cancelled_owned()),
            done: false,
        })
    }
}

fn check_start(after: i64, current: i64, compact: i64) -> Result<(), Error> {
    if after < 0 {
        return Err(Error::invalid("after_revision", "must not be negative"));
    }
    if after > current {
        return Err(Error::RevisionInFuture {
            requested: after,
            current,
        });
    }
    if after != 0 && after < compact {
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

/// The client side of a watch. Ends with `UNAVAILABLE` as soon as the server
/// starts shutting down, whatever is still buffered.
pub struct WatchStream {
    rx: mpsc::Receiver<Result<Item, Error>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
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
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            // A watch never ends on its own; if its task does, say so rather
            // than let the client take the end for "nothing more to see".
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(Error::Unavailable(
                    "the watch ended unexpectedly; resume from the last revision".into(),
                ))))
            }
            other => other,
        }
    }
}

/// Marker for "the client went away": the task just stops.
struct Gone;

struct Task {
    store: Store,
    spec: WatchSpec,
    out: mpsc::Sender<Result<Item, Error>>,
    config: WatchConfig,
}

impl Task {
    async fn run(&self, mut live: broadcast::Receiver<Arc<Event>>) -> Result<(), Error> {
        match self.stream(&mut live).await {
            Ok(Ok(())) | Ok(Err(Gone)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn stream(
        &self,
        live: &mut broadcast::Receiver<Arc<Event>>,
    ) -> Result<Result<(), Gone>, Error> {
        let mut last = self.spec.after_revision;
        if last == 0 {
            // Everything committed after this snapshot was published after we
            // subscribed, so the live ring has it: no replay is needed here.
            let filter = self.spec.filter.clone();
            let (connections, revision) = self
                .store
                .read(move |c| query::snapshot(c, &filter))
                .await?;
            for c in connections {
                if self.send(Item::Snapshot(c)).await.is_err() {
                    return Ok(Err(Gone));
                }
            }
            last = revision;
        } else {
            last = match self.catch_up(last).await? {
                Ok(r) => r,
                Err(Gone) => return Ok(Err(Gone)),
            };
        }
        if self.send(Item::Synced(last)).await.is_err() {
            return Ok(Err(Gone));
        }
        let interval = self.config.bookmark_interval;
        let mut idle_until = Instant::now() + interval;
        loop {
            let sent = tokio::select! {
                event = live.recv() => match event {
                    // Already sent from the store while catching up.
                    Ok(e) if e.revision <= last => false,
                    Ok(e) => {
                        last = e.revision;
                        match classify(&self.spec.filter, &e) {
                            Some(item) => {
                                if self.send(item).await.is_err() {
                                    return Ok(Err(Gone));
                                }
                                true
                            }
                            None => false,
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, last, "watcher fell behind the live ring; replaying from the store");
                        last = match self.catch_up(last).await? {
                            Ok(r) => r,
                            Err(Gone) => return Ok(Err(Gone)),
                        };
                        true
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(shutting_down()),
                },
                _ = tokio::time::sleep_until(idle_until), if self.spec.progress_notify => {
                    if self.send(Item::Bookmark(last)).await.is_err() {
                        return Ok(Err(Gone));
                    }
                    true
                }
            };
            if sent {
                idle_until = Instant::now() + interval;
            }
        }
    }

    /// Sends every retained change after `last` from the store; returns the
    /// revision reached.
    async fn catch_up(&self, mut last: i64) -> Result<Result<i64, Gone>, Error> {
        loop {
            let limit = self.config.replay_page.max(1);
            let after = last;
            let (events, compact) = self
                .store
                .read(move |c| {
                    let (_, compact) = query::revisions(c)?;
                    let events = query::events(
                        c,
                        &EventFilter {
                            connection_id: None,
                            after_revision: after,
                            limit,
                            // Filtered per event below, owners included.
                            owners: None,
                        },
                    )?;
                    Ok((events, compact))
                })
                .await?;
            if after < compact {
                return Err(Error::RevisionCompacted {
                    requested: after,
                    compact,
                });
            }
            let n = events.len();
            for e in events {
                if let Some(item) = classify(&self.spec.filter, &e)
                    && self.send(item).await.is_err()
                {
                    return Ok(Err(Gone));
                }
                last = e.revision;
            }
            if n < limit {
                return Ok(Ok(last));
            }
        }
    }

    async fn send(&self, item: Item) -> Result<(), Gone> {
        self.out.send(Ok(item)).await.map_err(|_| Gone)
    }
}

/// Whether `c`, in `state`, is in the watch's view. Tombstones are only in
/// view when the watch asks for the DELETED state.
fn visible(f: &Filter, c: &Connection, state: State) -> bool {
    f.owns(c)
        && (f.kinds.is_empty() || f.kinds.contains(&c.kind))
        && (f.ids.is_empty() || f.ids.contains(&c.id))
        && (f.states.is_empty() || f.states.contains(&state))
        && (state != State::Deleted || f.states.contains(&State::Deleted))
}

/// Entering the view is ADDED, leaving it REMOVED; outside it, nothing.
fn classify(f: &Filter, e: &Event) -> Option<Item> {
    let before = e.type_ != EventType::Created && visible(f, &e.connection, e.from_state);
    let after = visible(f, &e.connection, e.to_state);
    let change = match (before, after) {
        (false, true) => Change::Added,
        (true, true) => Change::Modified,
        (true, false) => Change::Removed,
        (false, false) => return None,
    };
    Some(Item::Change(change, e.clone()))
}
