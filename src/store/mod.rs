//! Durable state: the only place that runs SQL.
//!
//! One SQLite file in WAL mode with `synchronous=FULL`: an acknowledged change
//! survives `kill -9` and power loss. Writes go through one writer thread
//! ([`writer`]) that commits in groups; reads use a small pool of separate
//! read-only connections, each read one consistent snapshot. Committed events
//! are published to subscribers after the commit, in revision order.
//!
//! The boundary is typed: a reader gets a [`Read`] (get, list, count,
//! events, answers, credentials), a writer job a [`Tx`] (the same reads, and
//! [`Tx::record`] and the few other writes), [`Store::snapshot`] pages a
//! consistent view; all take and return domain values. SQL lives in `query`
//! and `writer`, the JSON inside rows in `codec`, SQLite's errors in `error`;
//! nothing outside this module sees rusqlite (`tests/tidy.rs` checks).
//!
//! The store keeps no lifecycle rule of its own: where SQL needs one (which
//! states are tombstones, which may be probed) it asks `lifecycle`. Jobs
//! passed to [`Store::write`] decide what to change.

/// The transaction a read or a writer group runs in, in whichever database.
enum Sql<'a> {
    Lite(&'a rusqlite::Transaction<'a>),
    #[cfg(feature = "postgres")]
    /// A connection in a transaction its user began (`BEGIN`).
    Pg(&'a std::cell::RefCell<pg::Client>),
}

/// Runs `$lite` on SQLite's transaction or `$pg` on PostgreSQL's.
macro_rules! on {
    ($sql:expr, $lite:ident => $on_lite:expr, $pg:ident => $on_pg:expr) => {{
        // Without the `postgres` feature there is one arm.
        #[allow(clippy::infallible_destructuring_match)]
        let out = match $sql {
            Sql::Lite($lite) => $on_lite,
            #[cfg(feature = "postgres")]
            Sql::Pg(tx) => {
                let $pg = &mut *tx.borrow_mut();
                $on_pg
            }
        };
        out
    }};
}

mod backup;
mod check;
mod codec;
mod counts;
#[cfg(test)]
mod counts_tests;
mod error;
#[cfg(feature = "postgres")]
mod pg;
mod query;
mod read;
mod schema;
mod writer;

pub use backup::BackupDone;
pub(crate) use backup::backup;
pub(crate) use query::{
    Cursor, CursorKey, EventFilter, Filter, ListQuery, Order, OrderField, Page, StoredCredential,
};
pub(crate) use read::Read;
pub(crate) use writer::{EventDraft, Tx, WriterConfig};

use crate::connection::Revision;
use crate::connection::{Connection, ConnectionId, Event};
use crate::error::Error;
use crate::metrics::{Metrics, Scraped};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{Semaphore, broadcast, oneshot};

/// Store settings.
#[derive(Clone, Debug)]
pub(crate) struct StoreConfig {
    pub(crate) writer: WriterConfig,
    /// Changes queued for the writer before new ones are refused.
    pub(crate) write_queue: usize,
    /// Reads running at once, each on its own pooled connection.
    pub(crate) read_pool: usize,
    /// Committed events buffered for watchers before a slow one must catch up
    /// from the database. Bounds the memory live watching takes.
    pub(crate) publish_buffer: usize,
    /// How long a connection waits for a lock before answering "busy".
    pub(crate) busy_timeout: Duration,
}

/// A cheap-to-clone handle on the database.
#[derive(Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// The database, and what reads it.
    backend: Backend,
    sender: Mutex<Option<mpsc::SyncSender<writer::Msg>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    read_permits: Semaphore,
    /// Snapshots being read, each on a connection of its own.
    snapshot_permits: Arc<Semaphore>,
    hub: broadcast::Sender<Arc<Event>>,
    /// True while writes cannot commit for a storage reason (full, read-only,
    /// I/O error, file replaced); health reports NOT_SERVING meanwhile.
    fault: tokio::sync::watch::Sender<bool>,
    config: StoreConfig,
    /// What the writer and the queue record; shared with the layers above.
    metrics: Arc<Metrics>,
}

/// Where the data is.
enum Backend {
    /// A SQLite file, this process's alone.
    Lite {
        path: PathBuf,
        /// Held while the store is open: one process per database.
        lock: Mutex<Option<std::fs::File>>,
        readers: Mutex<Vec<rusqlite::Connection>>,
        /// The (device, inode) of the database file as opened.
        file: (u64, u64),
    },
    /// A PostgreSQL database that other replicas may share.
    #[cfg(feature = "postgres")]
    Pg(pg::store::Pg),
}

impl Inner {
    /// A new read connection, on the file the writer opened: once the path
    /// names another file (or none), a read there would show rows the
    /// server never wrote, so it answers STORAGE_UNAVAILABLE instead.
    /// Connections opened before keep reading the writer's file.
    fn open_reader(&self) -> Result<rusqlite::Connection, Error> {
        let (path, file) = match &self.backend {
            Backend::Lite { path, file, .. } => (path, file),
            #[cfg(feature = "postgres")]
            Backend::Pg(_) => {
                return Err(Error::Internal("a SQLite reader on PostgreSQL".into()));
            }
        };
        let same = |path: &Path| {
            std::fs::metadata(path)
                .map(|m| writer::file_id(&m) == *file)
                .unwrap_or(false)
        };
        if !same(path) {
            return Err(replaced());
        }
        let conn = open_reader(path, self.config.busy_timeout)?;
        // The path could have changed between the look and the open.
        if !same(path) {
            return Err(replaced());
        }
        Ok(conn)
    }
}

/// The answer once the database path no longer names the file opened.
pub(crate) fn replaced() -> Error {
    Error::StorageUnavailable(
        "the database file was removed or replaced while the server ran; \
         restart the server to open the file now at its path"
            .into(),
    )
}

impl Store {
    /// Opens (creating if needed) the database at `path`, migrates it and
    /// starts the writer.
    pub(crate) fn open(path: &Path, config: StoreConfig) -> Result<Store, Error> {
        if let Some(dir) = path.parent() {
            crate::files::private_dir(dir)?;
        }
        // Two writers would each keep their own revision counter; refuse the second.
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = crate::files::open_private(&lock_path)?;
        lock.try_lock().map_err(|_| {
            Error::Unavailable(format!(
                "{} is in use by another tether process",
                path.display()
            ))
        })?;
        // SQLite gives its -wal and -shm files the database file's mode, so
        // creating that one private keeps them all private.
        drop(crate::files::open_private(path)?);
        check::log_belongs(path)?;
        let mut conn = open_writer(path, config.busy_timeout)?;
        let file = writer::file_id(
            &std::fs::metadata(path)
                .map_err(|e| Error::Internal(format!("cannot stat {}: {e}", path.display())))?,
        );
        check::before_migrate(&conn, path)?;
        schema::migrate(&mut conn)?;
        check::after_migrate(&conn, path)?;
        let (revision, compact) = query::revisions(&conn)?;
        let last_create = query::last_create_time(&conn)?;
        let (hub, _) = broadcast::channel(config.publish_buffer.max(1));
        let (sender, rx) = mpsc::sync_channel(config.write_queue.max(1));
        let inner = Arc::new(Inner {
            backend: Backend::Lite {
                path: path.to_owned(),
                lock: Mutex::new(Some(lock)),
                readers: Mutex::new(Vec::new()),
                file,
            },
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(None),
            read_permits: Semaphore::new(config.read_pool.max(1)),
            snapshot_permits: Arc::new(Semaphore::new(config.read_pool.max(1))),
            hub,
            fault: tokio::sync::watch::Sender::new(false),
            metrics: Arc::new(Metrics::new(config.writer.storage_quota)),
            config: config.clone(),
        });
        let w = writer::Writer {
            path: path.to_owned(),
            conn,
            revision,
            compact,
            last_create,
            config: config.writer,
            inner: inner.clone(),
            file,
            replaced: false,
            over_quota: false,
            synced: true,
        };
        let handle = std::thread::Builder::new()
            .name("tether-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| Error::Internal(format!("cannot start writer thread: {e}")))?;
        *inner.thread.lock().expect("writer handle lock") = Some(handle);
        tracing::info!(
            path = %path.display(),
            revision = revision.get(),
            compact_revision = compact.get(),
            "store open"
        );
        Ok(Store { inner })
    }

    /// Runs `f` in the writer's next group transaction. Its changes commit, and
    /// its answer is delivered, only if it returns `Ok` and the group commits.
    /// Over the storage quota it is refused (`QuotaExceeded`) without running.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        self.queue(f, Kind::Shared).await
    }

    /// [`Store::write`] for a long job (a discovery group of hundreds of
    /// connections): it commits in a transaction of its own instead of a
    /// savepoint of a shared one. SQLite truncates a savepoint's in-memory
    /// journal by walking it from its start at the end of every statement
    /// inside it, so a long job in a savepoint costs more per statement the
    /// more it has written; alone, each statement's journal starts empty.
    /// All or nothing, as a savepoint is.
    pub(crate) async fn write_alone<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        self.queue(f, Kind::Alone).await
    }

    /// [`Store::write`] for a change nobody is told about and that may be
    /// lost in a crash (a probe's result that moves nothing): it may commit
    /// without waiting for the disk. A later durable commit carries it to the
    /// disk too (the log is written in order), so a crash loses only the
    /// newest such changes, never one that was durable. The job can tell
    /// ([`Tx::durable`]); it must record no event when the group is not.
    pub(crate) async fn write_volatile<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        self.queue(f, Kind::Volatile).await
    }

    /// [`Store::write`] for a job that frees space (deleting a connection or a
    /// credential): it runs over the storage quota too, since freeing space
    /// is how a database gets back under it. Also for the key check a
    /// database gets at its first start: a server that cannot start cannot
    /// free space either.
    pub(crate) async fn write_freeing<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        self.queue(f, Kind::Freeing).await
    }

    async fn queue<T, F>(&self, f: F, kind: Kind) -> Result<T, Error>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = writer::TypedJob {
            f: Some(f),
            frees_space: kind == Kind::Freeing,
            durable: kind != Kind::Volatile,
            alone: kind == Kind::Alone,
            result: None,
            reply,
        };
        {
            let sender = self.inner.sender.lock().expect("writer sender lock");
            let sender = sender.as_ref().ok_or_else(shutting_down)?;
            // Counted before it is sent, so the writer never takes it first.
            let metrics = &self.inner.metrics;
            metrics.queued();
            // Never block the caller: a full queue means the writer is behind.
            sender
                .try_send(writer::Msg::Job(Box::new(job)))
                .map_err(|e| {
                    metrics.dequeued();
                    match e {
                        mpsc::TrySendError::Full(_) => {
                            Error::Overloaded("too many changes queued; retry".into())
                        }
                        mpsc::TrySendError::Disconnected(_) => shutting_down(),
                    }
                })?;
        }
        answer.await.map_err(|_| shutting_down())?
    }
}

/// How a queued write commits: which of [`Store::write`] and its kin queued it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Shared,
    Alone,
    Volatile,
    Freeing,
}

impl Store {
    /// Runs `f` on a read connection, inside one read transaction so that
    /// everything it reads is one consistent snapshot.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&Read<'_>) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        // Bounds blocking threads and open read connections alike.
        let _permit = self
            .inner
            .read_permits
            .acquire()
            .await
            .map_err(|_| shutting_down())?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let readers = match &inner.backend {
                Backend::Lite { readers, .. } => readers,
                #[cfg(feature = "postgres")]
                Backend::Pg(pg) => return pg.read(inner.config.read_pool, f),
            };
            let pooled = readers.lock().expect("reader pool lock").pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => inner.open_reader()?,
            };
            let result = (|| {
                let tx = conn.transaction()?;
                let out = f(&Read::new(&tx))?;
                tx.finish()?;
                Ok(out)
            })();
            let mut pool = readers.lock().expect("reader pool lock");
            if pool.len() < inner.config.read_pool {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| Error::Internal(format!("read task failed: {e}")))?
    }

    /// Reads every connection matching `filter` as of one moment, page by
    /// page (see [`query::snapshot_page`] for `rows` and `bytes`), so the
    /// whole set is never in memory at once. The pages come from one read
    /// transaction on a connection of its own, open until the last page is
    /// taken or the [`Snapshot`] is dropped; meanwhile the write-ahead log
    /// cannot be checkpointed past it, so callers bound how long they hold
    /// one. At most `--read-pool` snapshots are read at once; more wait.
    pub(crate) async fn snapshot(
        &self,
        filter: Filter,
        rows: usize,
        bytes: usize,
    ) -> Result<Snapshot, Error> {
        let permit = self
            .inner
            .snapshot_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| shutting_down())?;
        let (pages, rx) = tokio::sync::mpsc::channel(1);
        let (opened, revision) = oneshot::channel();
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut opened = Some(opened);
            let result = (|| -> Result<(), Error> {
                #[cfg(feature = "postgres")]
                if let Backend::Pg(pg) = &inner.backend {
                    return pg.snapshot(&filter, rows, bytes, &mut opened, &pages);
                }
                let mut conn = inner.open_reader()?;
                let sql = conn.transaction()?;
                send_snapshot(&Read::new(&sql), &filter, rows, bytes, &mut opened, &pages)
            })();
            if let Err(e) = result {
                match opened.take() {
                    Some(o) => drop(o.send(Err(e))),
                    None => drop(pages.blocking_send(Err(e))),
                }
            }
        });
        let revision = revision
            .await
            .map_err(|_| Error::Internal("snapshot reader ended early".into()))??;
        Ok(Snapshot {
            revision,
            pages: rx,
        })
    }

    /// Whether writes currently fail for a storage reason; changes as groups
    /// fail and commit.
    pub(crate) fn storage_fault(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.fault.subscribe()
    }

    /// The metrics the store and the layers above it record.
    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// What a metrics scrape reads from the database: the kept counts by
    /// kind and state, the revision, the space in use (one read, a few
    /// rows), and the sizes of the database file and its write-ahead log.
    pub(crate) async fn scrape(&self) -> Result<Scraped, Error> {
        let (connections, revision, used_bytes) = self
            .read(|r| {
                let (revision, _) = r.revisions()?;
                Ok((r.counts_by_kind()?, revision.get(), r.used_bytes()?))
            })
            .await?;
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let (db_file_bytes, wal_file_bytes) = match &self.inner.backend {
            Backend::Lite { path, .. } => (
                size(path),
                size(&PathBuf::from(format!("{}-wal", path.display()))),
            ),
            // The server's files are PostgreSQL's to report.
            #[cfg(feature = "postgres")]
            Backend::Pg(_) => (used_bytes, 0),
        };
        Ok(Scraped {
            connections,
            revision,
            db_file_bytes,
            wal_file_bytes,
            used_bytes,
        })
    }

    /// Whether this process probes connection `id`: always on SQLite; on
    /// PostgreSQL, when its replica holds the connection's shard.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub(crate) fn probes(&self, id: &ConnectionId) -> bool {
        match &self.inner.backend {
            Backend::Lite { .. } => true,
            #[cfg(feature = "postgres")]
            Backend::Pg(pg) => pg.held.probes(id),
        }
    }

    /// Receives every committed event from now on, in revision order.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.hub.subscribe()
    }

    /// Stops the writer after it has committed everything already queued.
    /// Later writes answer `UNAVAILABLE`.
    pub(crate) fn close(&self) {
        if let Some(sender) = self.inner.sender.lock().expect("writer sender lock").take() {
            let _ = sender.send(writer::Msg::Stop);
        }
        let handle = self.inner.thread.lock().expect("writer handle lock").take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("writer thread panicked");
        }
        match &self.inner.backend {
            Backend::Lite { readers, lock, .. } => {
                readers.lock().expect("reader pool lock").clear();
                // Released last, once nothing of ours writes to the file any more.
                drop(lock.lock().expect("lock file lock").take());
            }
            #[cfg(feature = "postgres")]
            Backend::Pg(pg) => pg.close(),
        }
    }
}

/// Sends the pages of one snapshot read by `r`: its revision first (on
/// `opened`), then each page on `pages`, until the last or until nobody
/// takes them. The read's view is fixed by its first read.
fn send_snapshot(
    r: &Read<'_>,
    filter: &Filter,
    rows: usize,
    bytes: usize,
    opened: &mut Option<oneshot::Sender<Result<Revision, Error>>>,
    pages: &tokio::sync::mpsc::Sender<Result<Vec<Connection>, Error>>,
) -> Result<(), Error> {
    let (revision, _) = r.revisions()?;
    if let Some(o) = opened.take()
        && o.send(Ok(revision)).is_err()
    {
        return Ok(());
    }
    let mut after = None;
    loop {
        let (page, next) = r.snapshot_page(filter, after.as_ref(), rows, bytes)?;
        if pages.blocking_send(Ok(page)).is_err() {
            return Ok(());
        }
        match next {
            Some(n) => after = Some(n),
            None => return Ok(()),
        }
    }
}

/// A consistent read of many connections, taken a page at a time.
pub(crate) struct Snapshot {
    /// The revision the snapshot shows: every change up to it, none after.
    pub(crate) revision: Revision,
    pages: tokio::sync::mpsc::Receiver<Result<Vec<Connection>, Error>>,
}

impl Snapshot {
    /// The next page, or `None` after the last one.
    pub(crate) async fn next_page(&mut self) -> Option<Result<Vec<Connection>, Error>> {
        self.pages.recv().await
    }
}

impl rusqlite::ToSql for Revision {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.get().into())
    }
}

impl rusqlite::types::FromSql for Revision {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        i64::column_result(v).map(Revision::new)
    }
}

fn shutting_down() -> Error {
    Error::Unavailable("the server is shutting down".into())
}

/// The writer's page cache, in KiB. SQLite's default (2 MiB) is smaller than
/// what one group of writes dirties over a large table (a page of each index
/// a row touches, and its keys are random): the rest is spilled to the log
/// and written again, over and over, before the commit. Pages are held only
/// as they are used. 32 MiB loads a million connections as fast as 64 did,
/// and a full cache is most of what the process holds after such a load
/// (`docs/BENCHMARKS.md`, *A third run*).
const WRITER_CACHE_KIB: i64 = 32 * 1024;

/// The write connection: WAL, and every commit synced to disk before it returns.
fn open_writer(path: &Path, busy: Duration) -> Result<rusqlite::Connection, Error> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(busy)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Internal(format!(
            "{} cannot use write-ahead logging (journal_mode is {mode})",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The writer's statements vary with the columns a change sets.
    conn.set_prepared_statement_cache_capacity(64);
    // A write-ahead log that grew while a long read (a watch's snapshot) kept
    // it from being reset is cut back to this once it can be.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    // Each job runs in a savepoint, which copies every page it first touches
    // into the statement journal. Kept in memory (at most the pages of one
    // job), that is a copy; in a temporary file, it is two writes per page
    // and a file opened and closed per group, about a quarter of a create.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

fn open_reader(path: &Path, busy: Duration) -> Result<rusqlite::Connection, Error> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_syncs_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("t.db"), Duration::from_secs(1)).unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!((sync, mode.as_str()), (2, "wal"), "FULL is 2");
    }

    #[test]
    fn the_writers_savepoint_journal_stays_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("t.db"), Duration::from_secs(1)).unwrap();
        let temp: i64 = conn
            .query_row("PRAGMA temp_store", [], |r| r.get(0))
            .unwrap();
        assert_eq!(temp, 2, "MEMORY is 2");
    }
}
