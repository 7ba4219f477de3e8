//! The store over PostgreSQL: [`Store::open_pg`] migrates the database and
//! starts this replica's writer thread (groups as `pg::writer` commits them),
//! its publisher thread (the tail of committed events, from every replica,
//! into this replica's hub) and its shard thread (which connections it
//! probes, `pg::shards`); [`Pg`] is what `Store` keeps of it: the pool of
//! read connections, the shards held, and the threads to stop.

use super::order::{Tail, publish};
use super::shards::{Held, Shards};
use super::{Client, connect, query, schema, writer};
use crate::connection::{Connection, Micros, Revision, now_micros};
use crate::error::Error;
use crate::store::writer::{Gathered, Msg, next_group};
use crate::store::{Backend, Filter, Inner, Read, Store, StoreConfig};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, broadcast, oneshot};

/// How long the publisher waits for a commit before it reads anyway, and
/// how often it looks whether the store is closing.
const TAIL_WAIT: Duration = Duration::from_millis(250);

/// How often the publisher reads the schema version.
const SCHEMA_LOOK: Duration = Duration::from_secs(1);

/// What the store keeps of a PostgreSQL database.
pub(crate) struct Pg {
    url: String,
    readers: Mutex<Vec<Client>>,
    /// The publisher and shard threads, stopped by `stop`.
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
    /// Whether the writer's last group met a full disk.
    full: AtomicBool,
    /// The shards whose connections this replica probes.
    pub(crate) held: Arc<Held>,
}

impl Store {
    /// Opens the PostgreSQL database at `url` (which may be shared with
    /// other replicas), migrates it, and starts this replica's writer and
    /// publisher.
    pub(crate) fn open_pg(url: &str, config: StoreConfig) -> Result<Store, Error> {
        // The blocking client runs a runtime of its own, which cannot start
        // on a thread that drives async tasks: it is used on threads of its own.
        let opened = std::thread::scope(|s| {
            s.spawn(|| -> Result<_, Error> {
                let mut client = connect(url)?;
                schema::migrate(&mut client)?;
                let (revision, compact) = query::revisions(&mut client)?;
                let last_create = query::last_create_time(&mut client)?;
                let tail = Tail::open(url, revision)?;
                let mut shards = Shards::open(url)?;
                // Probing starts with this replica's part already taken.
                shards.rebalance()?;
                Ok((client, revision, compact, last_create, tail, shards))
            })
            .join()
            .map_err(|_| Error::Internal("opening PostgreSQL panicked".into()))?
        });
        let (client, revision, compact, last_create, mut tail, shards) = opened?;
        let (hub, _) = broadcast::channel(config.publish_buffer.max(1));
        let (sender, rx) = mpsc::sync_channel(config.write_queue.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Inner {
            backend: Backend::Pg(Pg {
                url: url.to_owned(),
                readers: Mutex::new(Vec::new()),
                threads: Mutex::new(Vec::new()),
                stop: stop.clone(),
                full: AtomicBool::new(false),
                held: shards.held(),
            }),
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(None),
            read_permits: Semaphore::new(config.read_pool.max(1)),
            snapshot_permits: Arc::new(Semaphore::new(config.read_pool.max(1))),
            hub,
            fault: tokio::sync::watch::Sender::new(false),
            // No quota applies on PostgreSQL (README, "Not yet"): none is reported.
            metrics: Arc::new(crate::metrics::Metrics::new(0)),
            config: config.clone(),
        });
        let publishing = inner.clone();
        let stopping = stop.clone();
        let publisher = std::thread::Builder::new()
            .name("tether-publisher".into())
            .spawn(move || tail_into_hub(&mut tail, &publishing, &stopping))
            .map_err(|e| Error::Internal(format!("cannot start publisher thread: {e}")))?;
        let (writing, writer_url) = (inner.clone(), url.to_owned());
        let handle = std::thread::Builder::new()
            .name("tether-writer".into())
            .spawn(move || run(client, &writer_url, rx, &writing, last_create))
            .map_err(|e| Error::Internal(format!("cannot start writer thread: {e}")))?;
        let sharing = url.to_owned();
        let sharer = std::thread::Builder::new()
            .name("tether-shards".into())
            .spawn(move || shards.run(&sharing, &stop))
            .map_err(|e| Error::Internal(format!("cannot start shard thread: {e}")))?;
        if let Backend::Pg(pg) = &inner.backend {
            pg.threads
                .lock()
                .expect("threads lock")
                .extend([publisher, sharer]);
        }
        *inner.thread.lock().expect("writer handle lock") = Some(handle);
        tracing::info!(
            revision = revision.get(),
            compact_revision = compact.get(),
            "store open on PostgreSQL"
        );
        Ok(Store { inner })
    }
}

/// The publisher: `tail` into this replica's hub until `stop`. It reads
/// PostgreSQL at least every [`TAIL_WAIT`], so it is also what notices first
/// that PostgreSQL is out of reach, or back: health says NOT_SERVING from
/// its first failed read to its next good one. Every [`SCHEMA_LOOK`] it also
/// reads the schema version: once a newer replica has migrated the database,
/// this one says NOT_SERVING for good (and its writer writes nothing).
fn tail_into_hub(tail: &mut Tail, inner: &Inner, stop: &AtomicBool) {
    let Backend::Pg(pg) = &inner.backend else {
        return;
    };
    let mut unreachable = false;
    let mut newer = false;
    let mut looked: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        let mut read = publish(tail, &inner.hub, TAIL_WAIT).map(|_| None);
        if read.is_ok() && looked.is_none_or(|t| t.elapsed() >= SCHEMA_LOOK) {
            looked = Some(Instant::now());
            read = tail.schema_version().map(Some);
        }
        match read {
            Ok(version) => {
                if std::mem::take(&mut unreachable) {
                    tracing::info!("PostgreSQL is reachable again; watchers go on where they were");
                }
                if let Some(v) = version.filter(|v| *v > schema::VERSION)
                    && !std::mem::replace(&mut newer, true)
                {
                    tracing::error!(error = %schema::newer(v), "serving no more");
                }
                // PostgreSQL answers: a fault the writer met because its
                // connection broke is over too (its next group connects
                // again); a full disk is the writer's to clear.
                if newer {
                    inner
                        .fault
                        .send_if_modified(|f| !std::mem::replace(f, true));
                } else if !pg.full.load(Ordering::SeqCst) {
                    inner
                        .fault
                        .send_if_modified(|f| std::mem::replace(f, false));
                }
            }
            Err(e) => {
                if !unreachable {
                    tracing::warn!(error = %e, "reading committed events failed; retrying");
                }
                if e.is_storage_fault() && !unreachable {
                    unreachable = true;
                    inner
                        .fault
                        .send_if_modified(|f| !std::mem::replace(f, true));
                    // The pooled read connections broke too, most likely:
                    // reads after PostgreSQL is back start on new ones.
                    pg.readers.lock().expect("reader pool lock").clear();
                }
                std::thread::sleep(TAIL_WAIT);
            }
        }
    }
}

/// This replica's writer: groups committed as `pg::writer` commits them,
/// answered once their fate is known. Published by the tail, not here: the
/// tail alone keeps this replica's watchers in revision order.
fn run(
    client: postgres::Client,
    url: &str,
    rx: Receiver<Msg>,
    inner: &Inner,
    mut last_create: Micros,
) {
    let client = RefCell::new(Client::from(client));
    let config = &inner.config.writer;
    let mut held = None;
    let mut next_prune = Instant::now();
    loop {
        if Instant::now() >= next_prune {
            match writer::prune(&mut client.borrow_mut(), config, now_micros()) {
                Ok(Some(mark)) => {
                    tracing::info!(compact_revision = mark.get(), "pruned event history")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "pruning history failed; will retry"),
            }
            next_prune = Instant::now() + config.prune_interval;
        }
        let wait = next_prune.saturating_duration_since(Instant::now());
        let (mut jobs, stop) = match next_group(&rx, &mut held, wait, config, inner) {
            Gathered::Jobs(jobs, stop) => (jobs, stop),
            Gathered::Timeout => continue,
            Gathered::Stop => break,
        };
        let started = std::time::Instant::now();
        let durable = jobs.iter().any(|j| j.durable());
        let committed = reconnect(&client, url)
            .and_then(|()| writer::commit_group(&client, &mut jobs, &mut last_create, config));
        match committed {
            Ok(_) => {
                inner
                    .metrics
                    .committed(jobs.len(), durable, started.elapsed());
                let fault = jobs.iter().any(|j| j.storage_fault());
                let full = jobs
                    .iter()
                    .any(|j| matches!(j.error(), Some(Error::StorageFull(_))));
                note_fault(inner, fault, full);
                for job in jobs {
                    job.finish(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = jobs.len(), "commit failed; nothing in the group was applied");
                note_fault(
                    inner,
                    e.is_storage_fault(),
                    matches!(e, Error::StorageFull(_)),
                );
                for job in jobs {
                    job.finish(Err(e.clone()));
                }
            }
        }
        if stop {
            break;
        }
    }
    tracing::debug!("writer stopped");
}

/// What the writer's last group met: a storage `fault` (health says
/// NOT_SERVING), and whether it was a `full` disk (which the publisher,
/// reading fine, must not clear).
fn note_fault(inner: &Inner, fault: bool, full: bool) {
    if let Backend::Pg(pg) = &inner.backend {
        pg.full.store(full, Ordering::SeqCst);
    }
    inner
        .fault
        .send_if_modified(|f| std::mem::replace(f, fault) != fault);
}

/// Makes the writer's connection again if it broke (PostgreSQL restarted,
/// or was out of reach), before a group.
fn reconnect(client: &RefCell<Client>, url: &str) -> Result<(), Error> {
    if client.borrow().is_closed() {
        *client.borrow_mut() = Client::connect(url)?;
        tracing::info!("the writer reaches PostgreSQL again");
    }
    Ok(())
}

impl Pg {
    /// Runs `f` on a pooled connection in one read transaction.
    pub(crate) fn read<T>(
        &self,
        pool_size: usize,
        f: impl FnOnce(&Read<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let pooled = self.readers.lock().expect("reader pool lock").pop();
        let client = RefCell::new(match pooled {
            Some(c) => c,
            None => Client::connect(&self.url)?,
        });
        let result = super::read(&client, f);
        let client = client.into_inner();
        let mut pool = self.readers.lock().expect("reader pool lock");
        if matches!(result, Err(Error::StorageUnavailable(_))) {
            // PostgreSQL went away, or is going: the others broke as well.
            pool.clear();
        } else if !client.is_closed() && pool.len() < pool_size {
            pool.push(client);
        }
        result
    }

    /// Sends the pages of one snapshot, as `Store::snapshot` does on SQLite:
    /// the revision first (on `opened`), then each page on `pages`.
    pub(crate) fn snapshot(
        &self,
        filter: &Filter,
        rows: usize,
        bytes: usize,
        opened: &mut Option<oneshot::Sender<Result<Revision, Error>>>,
        pages: &tokio::sync::mpsc::Sender<Result<Vec<Connection>, Error>>,
    ) -> Result<(), Error> {
        let client = RefCell::new(Client::connect(&self.url)?);
        super::read(&client, |r| {
            crate::store::send_snapshot(r, filter, rows, bytes, opened, pages)
        })
    }

    /// Stops the publisher and the shard thread (letting go of the shards),
    /// and drops the pooled connections.
    pub(crate) fn close(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for h in threads {
            if h.join().is_err() {
                tracing::error!("a store thread panicked");
            }
        }
        self.readers.lock().expect("reader pool lock").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::EventType;
    use crate::lifecycle::{State, Trigger};
    use crate::store::EventDraft;
    use crate::store::pg::cluster::Cluster;

    async fn create(store: &Store, name: &str) -> Connection {
        let mut c = Connection::for_test(name);
        store
            .write(move |tx| {
                tx.record(
                    &mut c,
                    EventDraft {
                        type_: EventType::Created,
                        from_state: State::Discovered,
                        trigger: Trigger::User,
                        reason: String::new(),
                        actor: "test".into(),
                    },
                )?;
                Ok(c)
            })
            .await
            .unwrap()
    }

    /// Two replicas on one database: what either commits, both read, and a
    /// watcher on each receives every change once, in revision order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_serve_one_database() {
        // The blocking client cannot run on the runtime's threads.
        let url = std::thread::spawn(|| Cluster::shared().database())
            .join()
            .unwrap();
        let config = crate::Config::default().store_config();
        let a = Store::open_pg(&url, config.clone()).unwrap();
        let b = Store::open_pg(&url, config).unwrap();
        let (mut on_a, mut on_b) = (a.subscribe(), b.subscribe());
        let mut names = Vec::new();
        for i in 0..10 {
            let (x, y) = (format!("a{i}"), format!("b{i}"));
            let (made_a, made_b) = tokio::join!(create(&a, &x), create(&b, &y));
            assert_ne!(made_a.revision, made_b.revision);
            names.push((made_a.revision.get(), x));
            names.push((made_b.revision.get(), y));
        }
        names.sort();
        for watcher in [&mut on_a, &mut on_b] {
            let mut got = Vec::new();
            while got.len() < names.len() {
                let event = watcher.recv().await.unwrap();
                got.push((event.revision.get(), event.connection.name.clone()));
            }
            assert_eq!(got, names);
        }
        for store in [&a, &b] {
            let (counts, revision) = store.read(|r| r.count(&Filter::default())).await.unwrap();
            assert_eq!(revision.get(), 20);
            assert_eq!(counts.iter().map(|(_, n)| n).sum::<i64>(), 20);
            let mut snapshot = store
                .snapshot(Filter::default(), 7, usize::MAX)
                .await
                .unwrap();
            let mut listed = 0;
            while let Some(page) = snapshot.next_page().await {
                listed += page.unwrap().len();
            }
            assert_eq!((snapshot.revision.get(), listed), (20, 20));
        }
        for store in [a, b] {
            tokio::task::spawn_blocking(move || store.close())
                .await
                .unwrap();
        }
    }
}
