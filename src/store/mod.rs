//! Durable state: the only place that runs SQL.
//!
//! One SQLite file in WAL mode with `synchronous=FULL`: an acknowledged change
//! survives `kill -9` and power loss. Writes go through one writer thread
//! ([`writer`]) that commits in groups; reads use a small pool of separate
//! read-only connections, each read one consistent snapshot. Committed events
//! are published to subscribers after the commit, in revision order.
//!
//! The store knows nothing of the lifecycle rules or of gRPC: jobs passed to
//! [`Store::write`] decide what to change.

pub mod query;
mod schema;
mod writer;

pub use query::{Cursor, EventFilter, Filter, ListQuery, Order, OrderField, Page};
pub use writer::{EventDraft, Tx, WriterConfig};

use crate::connection::Event;
use crate::error::Error;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{broadcast, oneshot};

/// Store settings.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub writer: WriterConfig,
    /// Read connections kept open for reuse.
    pub read_pool: usize,
    /// Committed events buffered for watchers before a slow one must catch up
    /// from the database. Bounds the memory live watching takes.
    pub publish_buffer: usize,
    /// How long a connection waits for a lock before answering "busy".
    pub busy_timeout: Duration,
}

/// A cheap-to-clone handle on the database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    path: PathBuf,
    sender: Mutex<Option<mpsc::Sender<writer::Msg>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<rusqlite::Connection>>,
    hub: broadcast::Sender<Arc<Event>>,
    config: StoreConfig,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, migrates it and
    /// starts the writer.
    pub fn open(path: &Path, config: StoreConfig) -> Result<Store, Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Internal(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let mut conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(config.busy_timeout)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Internal(format!(
                "{} cannot use write-ahead logging (journal_mode is {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        schema::migrate(&mut conn)?;
        let (revision, compact) = query::revisions(&conn)?;
        let (hub, _) = broadcast::channel(config.publish_buffer.max(1));
        let (sender, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(None),
            readers: Mutex::new(Vec::new()),
            hub,
            config: config.clone(),
        });
        let w = writer::Writer {
            conn,
            revision,
            compact,
            config: config.writer,
            inner: inner.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("tether-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| Error::Internal(format!("cannot start writer thread: {e}")))?;
        *inner.thread.lock().expect("writer handle lock") = Some(handle);
        tracing::info!(path = %path.display(), revision, compact_revision = compact, "store open");
        Ok(Store { inner })
    }

    /// Runs `f` in the writer's next group transaction. Its changes commit, and
    /// its answer is delivered, only if it returns `Ok` and the group commits.
    pub async fn write<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = writer::TypedJob {
            f: Some(f),
            result: None,
            reply,
        };
        {
            let sender = self.inner.sender.lock().expect("writer sender lock");
            let sender = sender.as_ref().ok_or_else(shutting_down)?;
            sender
                .send(writer::Msg::Job(Box::new(job)))
                .map_err(|_| shutting_down())?;
        }
        answer.await.map_err(|_| shutting_down())?
    }

    /// Runs `f` on a read connection, inside one read transaction so that
    /// everything it reads is one consistent snapshot.
    pub async fn read<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().expect("reader pool lock").pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => open_reader(&inner.path, inner.config.busy_timeout)?,
            };
            let result = (|| {
                let tx = conn.transaction()?;
                let out = f(&tx)?;
                tx.finish()?;
                Ok(out)
            })();
            let mut pool = inner.readers.lock().expect("reader pool lock");
            if pool.len() < inner.config.read_pool {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| Error::Internal(format!("read task failed: {e}")))?
    }

    /// Receives every committed event from now on, in revision order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.hub.subscribe()
    }

    /// Stops the writer after it has committed everything already queued.
    /// Later writes answer `UNAVAILABLE`.
    pub fn close(&self) {
        if let Some(sender) = self.inner.sender.lock().expect("writer sender lock").take() {
            let _ = sender.send(writer::Msg::Stop);
        }
        let handle = self.inner.thread.lock().expect("writer handle lock").take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("writer thread panicked");
        }
    }
}

fn shutting_down() -> Error {
    Error::Unavailable("the server is shutting down".into())
}

fn open_reader(path: &Path, busy: Duration) -> Result<rusqlite::Connection, Error> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy)?;
    Ok(conn)
}

pub(crate) fn encode_labels(labels: &BTreeMap<String, String>) -> Result<String, Error> {
    Ok(serde_json::to_string(labels)?)
}
