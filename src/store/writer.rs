//! The single writer: one thread owns the write connection and commits queued
//! changes in groups, one transaction (and one fsync) per group.
//!
//! Each queued job runs inside its own savepoint, so a job that fails rolls back
//! alone while the rest of the group commits; a job queued to run alone (a
//! long one) is a group, and a transaction, of its own, with no savepoint.
//! Replies and watch events leave only after COMMIT returns: nothing
//! uncommitted is ever acknowledged or published. Pruning of old history
//! happens here too, so revisions and the compaction mark only ever move
//! under this one owner.

use super::counts::Counts;
use super::query::StoredCredential;
use super::{Inner, Sql, codec};
use crate::connection::Revision;
use crate::connection::{
    Connection, ConnectionId, Event, EventType, Micros, ProbeResult, now_micros,
};
use crate::error::Error;
use crate::lifecycle::{State, Trigger};
use rusqlite::{OptionalExtension, ToSql, TransactionBehavior, params};
use std::cell::RefCell;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How the writer groups commits and prunes history.
#[derive(Clone, Debug)]
pub(crate) struct WriterConfig {
    /// Most changes committed in one transaction.
    pub(crate) max_group: usize,
    /// Events older than this are pruned.
    pub(crate) retention: Duration,
    /// At most this many events are kept.
    pub(crate) retention_count: u64,
    /// How often the time-based pruning runs.
    pub(crate) prune_interval: Duration,
    /// At most this many `request_id` answers are kept (checked when pruning).
    pub(crate) max_answers: u64,
    /// Bytes of pages in use past which only space-freeing jobs run; 0: no quota.
    pub(crate) storage_quota: u64,
}

pub(super) enum Msg {
    Job(Box<dyn Job>),
    Stop,
}

/// A unit of work queued for the writer.
pub(super) trait Job: Send {
    /// Runs inside the group transaction; `false` rolls back this job's savepoint.
    fn run(&mut self, tx: &mut Tx<'_>) -> bool;
    /// The job's own error, once it has run and failed.
    fn error(&self) -> Option<Error>;
    /// Whether the job failed for a storage reason (disk full, read-only…).
    fn storage_fault(&self) -> bool {
        self.error().is_some_and(|e| e.is_storage_fault())
    }
    /// Whether the job frees space (a deletion), so it runs over the quota too.
    fn frees_space(&self) -> bool;
    /// Whether the job's change must be on disk before it is answered.
    fn durable(&self) -> bool;
    /// Whether the job runs in a transaction of its own, without a savepoint.
    fn alone(&self) -> bool;
    /// Answers the job with `e` without running it.
    fn refuse(&mut self, e: Error);
    /// Delivers the answer once the group's fate is known.
    fn finish(self: Box<Self>, committed: Result<(), Error>);
}

pub(super) struct TypedJob<F, T> {
    pub(crate) f: Option<F>,
    pub(crate) frees_space: bool,
    pub(crate) durable: bool,
    pub(crate) alone: bool,
    pub(crate) result: Option<Result<T, Error>>,
    pub(crate) reply: oneshot::Sender<Result<T, Error>>,
}

impl<F, T> Job for TypedJob<F, T>
where
    F: FnOnce(&mut Tx<'_>) -> Result<T, Error> + Send,
    T: Send,
{
    fn run(&mut self, tx: &mut Tx<'_>) -> bool {
        let f = self.f.take().expect("a job runs once");
        let r = f(tx);
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn error(&self) -> Option<Error> {
        match &self.result {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    fn frees_space(&self) -> bool {
        self.frees_space
    }

    fn durable(&self) -> bool {
        self.durable
    }

    fn alone(&self) -> bool {
        self.alone
    }

    fn refuse(&mut self, e: Error) {
        self.f = None;
        self.result = Some(Err(e));
    }

    fn finish(self: Box<Self>, committed: Result<(), Error>) {
        let answer = match committed {
            Ok(()) => self
                .result
                .unwrap_or_else(|| Err(Error::Internal("job was not run".into()))),
            Err(e) => Err(e),
        };
        // The caller may have gone away (client cancelled); the change stands.
        let _ = self.reply.send(answer);
    }
}

/// What one change records besides the connection itself.
pub(crate) struct EventDraft {
    pub(crate) type_: EventType,
    pub(crate) from_state: State,
    pub(crate) trigger: Trigger,
    pub(crate) reason: String,
    pub(crate) actor: String,
}

/// The write transaction as jobs see it: reads of the current rows and the one
/// way to change them, [`Tx::record`].
pub(crate) struct Tx<'a> {
    sql: Sql<'a>,
    revision: Revision,
    events: Vec<Event>,
    now: Micros,
    /// The row [`Tx::get`] read last, as it was read: what [`Tx::record`]
    /// compares a change with, so it writes only the columns that changed
    /// (and SQLite touches only the indexes over them).
    seen: RefCell<Option<Connection>>,
    /// Whether this group waits for the disk before it answers.
    durable: bool,
    /// The latest create_time stored: a new connection's is later.
    last_create: Micros,
    /// What the group's changes add to the kept counts, on SQLite.
    counts: Counts,
}

impl<'a> Tx<'a> {
    /// A group's transaction on PostgreSQL: `client` is in a transaction its
    /// writer began, after the revisions up to `revision`.
    #[cfg(feature = "postgres")]
    pub(super) fn on_pg(
        client: &'a RefCell<super::pg::Client>,
        revision: Revision,
        durable: bool,
        last_create: Micros,
    ) -> Tx<'a> {
        Tx {
            sql: Sql::Pg(client),
            revision,
            events: Vec::new(),
            now: now_micros(),
            seen: RefCell::new(None),
            durable,
            last_create,
            counts: Counts::default(),
        }
    }

    /// Where the next job starts: what [`Tx::back_to`] returns to when it
    /// fails. What the jobs before it recorded is kept.
    pub(super) fn mark(&mut self) -> (Revision, usize) {
        self.seen.take();
        self.counts.keep();
        (self.revision, self.events.len())
    }

    /// Forgets what a failed job recorded since `mark`.
    pub(super) fn back_to(&mut self, mark: (Revision, usize)) {
        self.revision = mark.0;
        self.events.truncate(mark.1);
        self.counts.forget();
    }

    /// The group's last revision, its events and the latest create_time.
    #[cfg(feature = "postgres")]
    pub(super) fn finish(self) -> (Revision, Vec<Event>, Micros) {
        (self.revision, self.events, self.last_create)
    }

    /// SQLite's transaction, for tests that look under the store's API.
    #[cfg(test)]
    pub(super) fn lite(&self) -> &rusqlite::Transaction<'a> {
        match self.sql {
            Sql::Lite(sql) => sql,
            #[cfg(feature = "postgres")]
            Sql::Pg(_) => panic!("a SQLite transaction"),
        }
    }

    /// The time this group commits at.
    pub(crate) fn now(&self) -> Micros {
        self.now
    }

    /// Whether this group is synced to disk before it answers. A group of
    /// volatile jobs only ([`super::Store::write_volatile`]) is not, and may
    /// record no event: a change watchers saw must survive a crash.
    pub(crate) fn durable(&self) -> bool {
        self.durable
    }

    pub(crate) fn get(&self, id: &ConnectionId) -> Result<Option<Connection>, Error> {
        let found = self.read_row(id)?;
        *self.seen.borrow_mut() = found.clone();
        Ok(found)
    }

    /// The row of `id` as it is before a change: the one [`Tx::get`] read,
    /// else read now.
    fn before(&self, id: &ConnectionId) -> Result<Option<Connection>, Error> {
        match self.seen.borrow_mut().take() {
            Some(c) if c.id == *id => Ok(Some(c)),
            _ => self.read_row(id),
        }
    }

    fn read_row(&self, id: &ConnectionId) -> Result<Option<Connection>, Error> {
        on!(&self.sql, sql => super::query::get(sql, id), pg => super::pg::query::get(pg, id))
    }

    /// The live (not deleted) connection holding `identity`, if any.
    pub(crate) fn live_by_identity(&self, identity: &str) -> Result<Option<Connection>, Error> {
        on!(&self.sql,
            sql => super::query::live_by_identity(sql, identity),
            pg => super::pg::query::live_by_identity(pg, identity))
    }

    /// The stored answer to `request_id`, and its request's fingerprint.
    pub(crate) fn answer(
        &self,
        request_id: &str,
    ) -> Result<Option<super::query::StoredAnswer>, Error> {
        on!(&self.sql,
            sql => super::query::request_answer(sql, request_id),
            pg => super::pg::query::request_answer(pg, request_id))
    }

    /// Stores the answer to `request_id`, which concerns `connection`, in the
    /// same transaction as the change. Large metadata in it is stored once,
    /// as a blob (see [`Tx::record`]).
    pub(crate) fn remember(
        &self,
        request_id: &str,
        fingerprint: i64,
        connection: &ConnectionId,
        answer: &Result<Connection, Error>,
    ) -> Result<(), Error> {
        let sql = on!(&self.sql, sql => sql, pg => {
            return super::pg::write::remember(pg, request_id, fingerprint, connection, answer, self.now);
        });
        let blob = match answer {
            Ok(c) => self.put_blob(&codec::encode_metadata(&c.metadata)?)?,
            Err(_) => None,
        };
        let json = codec::encode_answer(answer, blob.is_none())?;
        sql.prepare_cached(
            "INSERT INTO requests \
                 (request_id, fingerprint, connection_id, answer, time, metadata_blob) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            request_id,
            fingerprint,
            connection,
            json,
            self.now,
            blob.as_ref().map(|h| &h[..]),
        ])?;
        Ok(())
    }

    /// Stores `metadata` (a connection's metadata as JSON) once, keyed by
    /// its SHA-256, if it is larger than [`BLOB_THRESHOLD`]; its hash then.
    /// The row that names the hash counts as a reference (the schema's
    /// triggers keep the count), and a blob goes with its last reference.
    fn put_blob(&self, metadata: &str) -> Result<Option<[u8; 32]>, Error> {
        let sql = on!(&self.sql, sql => sql, pg => return super::pg::write::put_blob(pg, metadata));
        let Some(hash) = blob_hash(metadata) else {
            return Ok(None);
        };
        sql.prepare_cached(
            "INSERT INTO blobs (hash, refs, body) VALUES (?1, 0, ?2) \
                 ON CONFLICT (hash) DO NOTHING",
        )?
        .execute(params![&hash[..], metadata])?;
        Ok(Some(hash))
    }

    /// Keeps a check's result on the connection without a new revision or event.
    pub(crate) fn set_probe(&self, id: &ConnectionId, probe: &ProbeResult) -> Result<(), Error> {
        self.seen.take();
        let sql =
            on!(&self.sql, sql => sql, pg => return super::pg::write::set_probe(pg, id, probe));
        sql.prepare_cached("UPDATE connections SET last_probe = ?2 WHERE id = ?1")?
            .execute(params![id, codec::encode_probe(probe)?])?;
        Ok(())
    }

    /// The sealed key check, if the database has one (another replica may
    /// have recorded it since this one looked).
    pub(crate) fn key_check(&self) -> Result<Option<super::query::Sealed>, Error> {
        on!(&self.sql,
            sql => super::query::key_check(sql),
            pg => super::pg::query::key_check(pg))
    }

    /// Records the sealed key check (once per database).
    pub(crate) fn set_key_check(&self, nonce: &[u8], sealed: &[u8]) -> Result<(), Error> {
        let sql = on!(&self.sql, sql => sql, pg => return super::pg::write::set_key_check(pg, nonce, sealed));
        sql.prepare_cached("INSERT INTO key_check (id, nonce, sealed) VALUES (1, ?1, ?2)")?
            .execute(params![nonce, sealed])?;
        Ok(())
    }

    pub(crate) fn insert_credential(&self, c: &StoredCredential) -> Result<(), Error> {
        let sql = on!(&self.sql, sql => sql, pg => return super::pg::write::insert_credential(pg, c, self.now));
        sql.prepare_cached(
            "INSERT INTO credentials \
                 (id, name, type, owner, nonce, sealed, create_time, allowed_hosts) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            c.id,
            c.name,
            c.type_,
            c.owner,
            c.nonce,
            c.sealed,
            self.now,
            codec::encode_hosts(&c.allowed_hosts)?
        ])?;
        Ok(())
    }

    /// Deletes a credential; whether it existed.
    pub(crate) fn delete_credential(&self, id: &str) -> Result<bool, Error> {
        let sql =
            on!(&self.sql, sql => sql, pg => return super::pg::write::delete_credential(pg, id));
        Ok(sql
            .prepare_cached("DELETE FROM credentials WHERE id = ?1")?
            .execute([id])?
            == 1)
    }

    pub(crate) fn credential(&self, id: &str) -> Result<Option<StoredCredential>, Error> {
        on!(&self.sql,
            sql => super::query::credential(sql, id),
            pg => super::pg::query::credential(pg, id))
    }

    /// A live connection other than `except` that uses credential `id`, if any.
    pub(crate) fn credential_user(
        &self,
        id: &str,
        except: Option<&ConnectionId>,
    ) -> Result<Option<ConnectionId>, Error> {
        on!(&self.sql,
            sql => super::query::credential_user(sql, id, except),
            pg => super::pg::query::credential_user(pg, id, except))
    }

    /// Removes a deleted connection's credentials and collected data from
    /// everything stored about it: earlier event snapshots and stored answers.
    /// Runs after the tombstone is recorded, so the snapshot that recording
    /// froze into the previous event is scrubbed too.
    pub(crate) fn scrub(&self, id: &ConnectionId) -> Result<(), Error> {
        let sql = on!(&self.sql, sql => sql, pg => return super::pg::write::scrub(pg, id));
        let cleared = codec::scrubbed("$");
        // Clearing `metadata_blob` drops the row's reference to the
        // metadata's blob (and the blob with its last one).
        sql.prepare_cached(&format!(
            "UPDATE events SET snapshot = json_set(snapshot, {cleared}), metadata_blob = NULL \
                 WHERE connection_id = ?1 AND snapshot <> ''"
        ))?
        .execute([id])?;
        let (ok, cleared_answer) = (
            codec::ANSWER_CONNECTION,
            codec::scrubbed(codec::ANSWER_CONNECTION),
        );
        sql.prepare_cached(&format!(
            "UPDATE requests SET answer = json_set(answer, {cleared_answer}), \
                 metadata_blob = NULL \
                 WHERE connection_id = ?1 AND json_type(answer, '{ok}') IS NOT NULL"
        ))?
        .execute([id])?;
        Ok(())
    }

    /// Commits a change to `conn`: the next revision, the row, and its event.
    /// `conn` comes back with its revision and update time set.
    ///
    /// An event's snapshot is the connection after the change. The latest
    /// event of a connection keeps none of its own (`snapshot` is `''`): the
    /// connection's row is that snapshot, and reads take it from there. When
    /// the connection changes again, the row as it was is written into that
    /// event first, so most connections (changed once, or rarely) store their
    /// data once, not twice. A written snapshot holds the whole connection
    /// except metadata larger than [`BLOB_THRESHOLD`]: that is stored once as
    /// a blob the event names, so a thousand changes of one connection do not
    /// store its metadata a thousand times. Reads of events put it back.
    pub(crate) fn record(&mut self, conn: &mut Connection, draft: EventDraft) -> Result<(), Error> {
        if !self.durable {
            return Err(Error::Internal(
                "a change with an event in a group that is not synced".into(),
            ));
        }
        let created = draft.type_ == EventType::Created;
        let before =
            if created {
                None
            } else {
                Some(self.before(&conn.id)?.ok_or_else(|| {
                    Error::Internal(format!("connection {} row not found", conn.id))
                })?)
            };
        self.revision = self.revision.next();
        conn.revision = self.revision;
        conn.update_time = self.now;
        if draft.from_state != conn.state || created {
            conn.state_time = self.now;
        }
        if created {
            // Later than every stored connection's, however many are made in
            // this group or however the clock moved: creation order (`seq`)
            // stays `(create_time, id)` order (see schema version 7).
            let at = self.now.max(self.last_create + 1);
            (conn.create_time, conn.update_time, conn.state_time) = (at, at, at);
            self.last_create = at;
        }
        match &before {
            None => self.insert_row(conn)?,
            Some(before) => {
                self.update_row(before, conn)?;
                self.freeze_snapshot(before)?;
            }
        }
        if matches!(self.sql, Sql::Lite(_)) {
            self.counts.change(before.as_ref(), conn);
        }
        let event = Event {
            revision: self.revision,
            connection_id: conn.id.clone(),
            type_: draft.type_,
            from_state: draft.from_state,
            to_state: conn.state,
            trigger: draft.trigger,
            reason: draft.reason,
            actor: draft.actor,
            time: self.now,
            connection: conn.clone(),
            cache: Default::default(),
        };
        self.insert_event(&event)?;
        self.events.push(event);
        Ok(())
    }

    fn insert_event(&self, event: &Event) -> Result<(), Error> {
        let sql =
            on!(&self.sql, sql => sql, pg => return super::pg::write::insert_event(pg, event));
        sql.prepare_cached(
            "INSERT INTO events (revision, connection_id, type, from_state, to_state, trigger, \
                 reason, actor, time, snapshot, metadata_blob) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, '', NULL)",
        )?
        .execute(params![
            event.revision,
            event.connection_id,
            event.type_.number(),
            event.from_state.number(),
            event.to_state.number(),
            event.trigger.number(),
            event.reason,
            event.actor,
            event.time,
        ])?;
        Ok(())
    }

    fn insert_row(&self, conn: &Connection) -> Result<(), Error> {
        let sql = on!(&self.sql, sql => sql, pg => return super::pg::write::insert_row(pg, conn));
        let last_probe = conn
            .last_probe
            .as_ref()
            .map(codec::encode_probe)
            .transpose()?;
        sql.prepare_cached(
                "INSERT INTO connections (id, kind, type, sub_type, name, description, url, identity, \
                 metadata, labels, managed, credential_id, owner, state, state_reason, state_trigger, \
                 state_time, revision, create_time, update_time, last_probe) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)",
            )?
            .execute(params![
                conn.id,
                conn.kind,
                conn.type_,
                conn.sub_type,
                conn.name,
                conn.description,
                conn.url,
                conn.identity,
                codec::encode_metadata(&conn.metadata)?,
                codec::encode_labels(&conn.labels)?,
                conn.managed,
                conn.credential_id,
                conn.owner,
                conn.state.number(),
                conn.state_reason,
                conn.state_trigger.number(),
                conn.state_time,
                conn.revision,
                conn.create_time,
                conn.update_time,
                last_probe,
            ])?;
        Ok(())
    }

    /// Writes the columns of `conn` that differ from `before`, and only
    /// those: an index none of whose columns changed is not touched.
    fn update_row(&self, before: &Connection, conn: &Connection) -> Result<(), Error> {
        let lite =
            on!(&self.sql, sql => sql, pg => return super::pg::write::update_row(pg, before, conn));
        let set = changed_columns(before, conn)?;
        let assignments: Vec<String> = set
            .iter()
            .enumerate()
            .map(|(i, (name, _))| format!("{name} = ?{}", i + 2))
            .collect();
        let update = format!(
            "UPDATE connections SET {} WHERE id = ?1",
            assignments.join(", ")
        );
        let mut values: Vec<&dyn ToSql> = Vec::with_capacity(set.len() + 1);
        values.push(&conn.id);
        values.extend(set.iter().map(|(_, v)| v as &dyn ToSql));
        let changed = lite.prepare_cached(&update)?.execute(&values[..])?;
        if changed != 1 {
            return Err(Error::Internal(format!(
                "connection {} row not written",
                conn.id
            )));
        }
        Ok(())
    }

    /// Gives the connection's latest event (the one whose snapshot is its
    /// row) the row as it was before this change, as its own snapshot.
    /// Events stored with a snapshot of their own are left alone.
    fn freeze_snapshot(&self, before: &Connection) -> Result<(), Error> {
        let sql =
            on!(&self.sql, sql => sql, pg => return super::pg::write::freeze_snapshot(pg, before));
        let metadata = codec::encode_metadata(&before.metadata)?;
        let revision = before.revision;
        if metadata.len() > BLOB_THRESHOLD {
            // A blob is stored only for an event that will name it: one
            // nothing names would never go.
            let open: bool = sql
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE revision = ?1 AND snapshot = '')",
                )?
                .query_row([revision], |r| r.get(0))?;
            if !open {
                return Ok(());
            }
        }
        let blob = self.put_blob(&metadata)?;
        let snapshot = codec::encode_connection(before, blob.is_none())?;
        sql.prepare_cached(
            "UPDATE events SET snapshot = ?2, metadata_blob = ?3 \
                 WHERE revision = ?1 AND snapshot = ''",
        )?
        .execute(params![revision, snapshot, blob.as_ref().map(|h| &h[..])])?;
        Ok(())
    }
}

/// A value of a `connections` column, as [`changed_columns`] gives it.
pub(super) enum Column<'a> {
    Text(&'a str),
    Int(i64),
    /// A state or trigger number.
    Small(i32),
    Bool(bool),
    /// JSON text, or `NULL`.
    Json(Option<String>),
}

impl ToSql for Column<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Column::Text(t) => t.to_sql(),
            Column::Int(i) => i.to_sql(),
            Column::Small(i) => i.to_sql(),
            Column::Bool(b) => b.to_sql(),
            Column::Json(j) => j.to_sql(),
        }
    }
}

/// The columns of `conn` whose values differ from `before`'s, with the new
/// values: what an update of the row writes, whichever the database.
pub(super) fn changed_columns<'a>(
    before: &Connection,
    conn: &'a Connection,
) -> Result<Vec<(&'static str, Column<'a>)>, Error> {
    let mut set = Vec::with_capacity(21);
    macro_rules! column {
        ($name:literal, $field:ident, $value:expr) => {
            if before.$field != conn.$field {
                set.push(($name, $value));
            }
        };
    }
    column!("kind", kind, Column::Text(&conn.kind));
    column!("type", type_, Column::Text(&conn.type_));
    column!("sub_type", sub_type, Column::Text(&conn.sub_type));
    column!("name", name, Column::Text(&conn.name));
    column!("description", description, Column::Text(&conn.description));
    column!("url", url, Column::Text(&conn.url));
    column!("identity", identity, Column::Text(&conn.identity));
    column!(
        "metadata",
        metadata,
        Column::Json(Some(codec::encode_metadata(&conn.metadata)?))
    );
    column!(
        "labels",
        labels,
        Column::Json(Some(codec::encode_labels(&conn.labels)?))
    );
    column!("managed", managed, Column::Bool(conn.managed));
    column!(
        "credential_id",
        credential_id,
        Column::Text(&conn.credential_id)
    );
    column!("owner", owner, Column::Text(&conn.owner));
    column!("state", state, Column::Small(conn.state.number()));
    column!(
        "state_reason",
        state_reason,
        Column::Text(&conn.state_reason)
    );
    column!(
        "state_trigger",
        state_trigger,
        Column::Small(conn.state_trigger.number())
    );
    column!("state_time", state_time, Column::Int(conn.state_time));
    column!("revision", revision, Column::Int(conn.revision.get()));
    column!("create_time", create_time, Column::Int(conn.create_time));
    column!("update_time", update_time, Column::Int(conn.update_time));
    column!(
        "last_probe",
        last_probe,
        Column::Json(
            conn.last_probe
                .as_ref()
                .map(codec::encode_probe)
                .transpose()?
        )
    );
    Ok(set)
}

/// Metadata larger than this (as JSON, in bytes) is stored once as a blob
/// rather than copied into every event snapshot and stored answer.
pub(super) const BLOB_THRESHOLD: usize = 512;

/// The key of `metadata` (as JSON) in `blobs`, its SHA-256, when it is large
/// enough to be kept there ([`BLOB_THRESHOLD`]).
pub(super) fn blob_hash(metadata: &str) -> Option<[u8; 32]> {
    use sha2::Digest;
    (metadata.len() > BLOB_THRESHOLD).then(|| sha2::Sha256::digest(metadata.as_bytes()).into())
}

/// The writer's own state: the connection, the counters it alone moves.
pub(super) struct Writer {
    /// The database file's path, watched for being replaced.
    pub(crate) path: std::path::PathBuf,
    pub(crate) conn: rusqlite::Connection,
    pub(crate) revision: Revision,
    pub(crate) compact: Revision,
    /// The latest create_time stored ([`Tx::record`] keeps it).
    pub(crate) last_create: Micros,
    pub(crate) config: WriterConfig,
    pub(crate) inner: Arc<Inner>,
    /// The (device, inode) of the database file as opened.
    pub(crate) file: (u64, u64),
    /// Set for good once the path no longer names the file we opened: our
    /// commits would go to an unlinked file and vanish at the next start.
    pub(crate) replaced: bool,
    /// Whether the last group found the database over its storage quota; the
    /// alarm is logged when this changes, not for every refused job.
    pub(crate) over_quota: bool,
    /// Whether commits wait for the disk now (`synchronous = FULL`).
    pub(crate) synced: bool,
}

impl Writer {
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        let mut next_prune = Instant::now();
        // A job to run alone that arrived while a group was being gathered:
        // it starts the next group.
        let mut held: Option<Box<dyn Job>> = None;
        loop {
            let wait = next_prune.saturating_duration_since(Instant::now());
            let (jobs, stop) = match next_group(&rx, &mut held, wait, &self.config, &self.inner) {
                Gathered::Jobs(jobs, stop) => (jobs, stop),
                Gathered::Stop => break,
                Gathered::Timeout => {
                    self.prune_by_time();
                    next_prune = Instant::now() + self.config.prune_interval;
                    continue;
                }
            };
            self.commit_group(jobs);
            if Instant::now() >= next_prune {
                self.prune_by_time();
                next_prune = Instant::now() + self.config.prune_interval;
            }
            if stop {
                break;
            }
        }
        // Fold the log into the file on the way out (the read connections,
        // which close later, cannot): a stopped database is one complete file,
        // which is also what lets the next start tell a stranger's log from
        // its own. Not into a file that is no longer ours.
        if !self.replaced {
            self.checkpoint();
        }
        tracing::debug!(revision = self.revision.get(), "writer stopped");
    }

    /// Moves everything committed from the WAL into the database file and
    /// empties the WAL, so that after a clean stop the database file alone
    /// holds every change (a plain copy of it is complete).
    fn checkpoint(&self) {
        let done = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            });
        match done {
            Ok((0, _, _)) => tracing::debug!("checkpointed the write-ahead log at shutdown"),
            Ok((_, log, moved)) => tracing::warn!(
                log_pages = log,
                checkpointed = moved,
                "a reader held the write-ahead log at shutdown; the rest moves at the next start"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint at shutdown failed; the WAL keeps the changes")
            }
        }
    }

    fn commit_group(&mut self, mut jobs: Vec<Box<dyn Job>>) {
        match self.try_commit_group(&mut jobs) {
            Ok(events) => {
                // A job can meet a full disk on its own (its savepoint rolls
                // back, the group commits): that is a fault too. A group with
                // none clears it.
                let fault = jobs.iter().any(|j| j.storage_fault());
                self.set_fault(fault);
                for event in events {
                    // No receivers is fine: nobody is watching.
                    let _ = self.inner.hub.send(Arc::new(event));
                }
                for job in jobs {
                    job.finish(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = jobs.len(), "commit failed; nothing in the group was applied");
                if e.is_storage_fault() {
                    // Health reports NOT_SERVING until a group commits again.
                    self.set_fault(true);
                }
                let answer = e;
                for job in jobs {
                    job.finish(Err(answer.clone()));
                }
            }
        }
    }

    fn try_commit_group(&mut self, jobs: &mut [Box<dyn Job>]) -> Result<Vec<Event>, Error> {
        self.check_file()?;
        let durable = jobs.iter().any(|j| j.durable());
        if durable != self.synced {
            // Without FULL, a commit in WAL mode does not wait for the disk;
            // the next synced commit carries it there.
            let level = if durable { "FULL" } else { "NORMAL" };
            self.conn.pragma_update(None, "synchronous", level)?;
            self.synced = durable;
        }
        let sql = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let refusal = check_quota(&sql, self.config.storage_quota, &mut self.over_quota)?;
        let mut tx = Tx {
            sql: Sql::Lite(&sql),
            revision: self.revision,
            events: Vec::new(),
            now: now_micros(),
            seen: RefCell::new(None),
            durable,
            last_create: self.last_create,
            counts: Counts::default(),
        };
        // A job alone is the whole transaction: it needs no savepoint.
        let alone = matches!(jobs, [job] if job.alone());
        let mut rolled_back = false;
        for job in jobs.iter_mut() {
            if let Some(e) = &refusal
                && !job.frees_space()
            {
                job.refuse(e.clone());
                continue;
            }
            if alone {
                let kept = run_caught(job, &mut tx);
                // A job that went on after SQLite rolled its transaction
                // back (on some faults) must not be answered as done.
                if kept && sql.is_autocommit() {
                    job.refuse(Error::Internal(
                        "the transaction was rolled back under a write job".into(),
                    ));
                }
                rolled_back = !kept || sql.is_autocommit();
                continue;
            }
            sql.prepare_cached("SAVEPOINT job")?.execute([])?;
            let mark = tx.mark();
            let kept = run_caught(job, &mut tx);
            if kept {
                sql.prepare_cached("RELEASE job")?.execute([])?;
            } else {
                if let Err(e) = sql.execute_batch("ROLLBACK TO job; RELEASE job") {
                    // SQLite rolls the whole transaction back itself on some
                    // faults (a full disk): the group is lost, and the job's
                    // own storage error says why better than the savepoint.
                    return Err(job
                        .error()
                        .filter(Error::is_storage_fault)
                        .unwrap_or_else(|| e.into()));
                }
                tx.back_to(mark);
            }
        }
        let (revision, events, counts) = (tx.revision, tx.events, tx.counts);
        // Kept whatever the group's fate: a later create_time is as good.
        self.last_create = tx.last_create;
        if rolled_back {
            // The job failed: nothing of it stays, and it answers with its own
            // error. SQLite rolls the transaction back itself on some faults
            // (a full disk); then the job's storage error says why.
            let done = if sql.is_autocommit() {
                Ok(())
            } else {
                sql.rollback()
            };
            if let Err(e) = done {
                let job = jobs.first().expect("the job alone");
                return Err(job
                    .error()
                    .filter(Error::is_storage_fault)
                    .unwrap_or_else(|| e.into()));
            }
            return Ok(Vec::new());
        }
        counts.write(&sql)?;
        let mut compact = self.compact;
        if revision != self.revision {
            sql.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'revision'")?
                .execute([revision])?;
            let keep = i64::try_from(self.config.retention_count).unwrap_or(i64::MAX);
            let floor = Revision::new(revision.get().saturating_sub(keep));
            if floor > compact {
                prune_range(&sql, compact, floor)?;
                compact = floor;
                sql.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'compact_revision'")?
                    .execute([compact])?;
            }
            // A connection's event kept below the mark because it was its
            // latest is not its latest any more once it has a newer one.
            if compact > Revision::ZERO {
                let mut touched: Vec<&ConnectionId> =
                    events.iter().map(|e| &e.connection_id).collect();
                touched.sort_unstable();
                touched.dedup();
                let mut stmt = sql.prepare_cached(DROP_SUPERSEDED)?;
                for id in touched {
                    stmt.execute(params![id, compact])?;
                }
            }
        }
        let started = Instant::now();
        sql.commit()?;
        // Once per group, on this thread only: an uncontended lock.
        self.inner
            .metrics
            .committed(jobs.len(), durable, started.elapsed());
        self.revision = revision;
        self.compact = compact;
        Ok(events)
    }

    fn set_fault(&self, fault: bool) {
        let fault = fault || self.replaced;
        self.inner
            .fault
            .send_if_modified(|f| std::mem::replace(f, fault) != fault);
    }

    /// Refuses to commit once the database path no longer names the file we
    /// opened (deleted, or replaced by another): SQLite would go on writing to
    /// the unlinked file and every acknowledged change would be lost. One
    /// `stat` per group, next to an fsync.
    fn check_file(&mut self) -> Result<(), Error> {
        if !self.replaced {
            let now = std::fs::metadata(&self.path).ok().map(|m| file_id(&m));
            if now != Some(self.file) {
                tracing::error!(path = %self.path.display(), "the database file was removed or replaced; refusing writes");
                self.replaced = true;
            }
        }
        if self.replaced {
            return Err(super::replaced());
        }
        Ok(())
    }

    /// Drops events and remembered answers older than the retention window.
    fn prune_by_time(&mut self) {
        // Pruning commits too: never into a file the path no longer names.
        if let Err(e) = self.check_file() {
            tracing::debug!(error = %e, "not pruning");
            self.set_fault(true);
            return;
        }
        let cutoff = now_micros() - self.config.retention.as_micros() as i64;
        let result = (|| -> Result<(), Error> {
            let sql = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Events are pruned in revision order while they are older than
            // the window: the newest to go is the one before the first that
            // is not, read from the compaction mark up (what is read is what
            // goes). A clock set back keeps more, never less.
            let newest_old: Option<Revision> = sql
                .query_row(NEWEST_OLD, params![self.compact, cutoff], |r| r.get(0))
                .optional()?
                .flatten();
            let mut compact = self.compact;
            if let Some(r) = newest_old.filter(|r| *r > compact) {
                prune_range(&sql, compact, r)?;
                compact = r;
                sql.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'compact_revision'",
                    [r],
                )?;
            }
            sql.execute(EXPIRED_ANSWERS, [cutoff])?;
            // And by count: the newest `max_answers` stay.
            sql.execute(
                "DELETE FROM requests WHERE rowid IN \
                 (SELECT rowid FROM requests ORDER BY time DESC, rowid DESC LIMIT -1 OFFSET ?1)",
                [self.config.max_answers as i64],
            )?;
            sql.commit()?;
            if compact != self.compact {
                tracing::info!(compact_revision = compact.get(), "pruned event history");
                self.compact = compact;
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "pruning history failed; will retry");
        }
    }
}

/// Runs `job`; whether its changes stay. A panicking job is a bug; it must
/// not take the writer (and with it every later write) down: it rolls back
/// like a failed job.
pub(super) fn run_caught(job: &mut Box<dyn Job>, tx: &mut Tx<'_>) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(tx))).unwrap_or_else(|_| {
        tracing::error!("a write job panicked; its changes were rolled back");
        false
    })
}

/// What a writer takes from its queue next.
pub(super) enum Gathered {
    /// A group to commit, and whether a stop came after it.
    Jobs(Vec<Box<dyn Job>>, bool),
    /// Nothing came within the wait.
    Timeout,
    /// The store is closing.
    Stop,
}

/// The next group: the first job to come within `wait` (or the one `held`
/// back), and every job already queued behind it, up to the group size. A
/// job to run alone is a group of its own: one that comes while a group is
/// gathered is held back to start the next.
pub(super) fn next_group(
    rx: &Receiver<Msg>,
    held: &mut Option<Box<dyn Job>>,
    wait: Duration,
    config: &WriterConfig,
    inner: &Inner,
) -> Gathered {
    // A job held back was counted out of the queue when it was received.
    let was_held = held.is_some();
    let received = match held.take() {
        Some(j) => Ok(Msg::Job(j)),
        None => rx.recv_timeout(wait),
    };
    let first = match received {
        Ok(Msg::Job(j)) => {
            if !was_held {
                inner.metrics.dequeued();
            }
            j
        }
        Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return Gathered::Stop,
        Err(RecvTimeoutError::Timeout) => return Gathered::Timeout,
    };
    let alone = first.alone();
    let mut jobs = vec![first];
    let mut stop = false;
    while !alone && jobs.len() < config.max_group {
        match rx.try_recv() {
            Ok(Msg::Job(j)) if j.alone() => {
                inner.metrics.dequeued();
                *held = Some(j);
                break;
            }
            Ok(Msg::Job(j)) => {
                inner.metrics.dequeued();
                jobs.push(j);
            }
            Ok(Msg::Stop) => {
                stop = true;
                break;
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
        }
    }
    Gathered::Jobs(jobs, stop)
}

/// Drops the events in revisions `(above, through]`, except each connection's
/// latest: retention never prunes that, so a tombstone always shows who
/// deleted it, when and why. Every event at or below the compaction mark is
/// thus its connection's latest (the commit path drops one once it is not).
fn prune_range(
    sql: &rusqlite::Transaction<'_>,
    above: Revision,
    through: Revision,
) -> Result<(), Error> {
    sql.prepare_cached(PRUNE_RANGE)?.execute([above, through])?;
    Ok(())
}

/// [`prune_range`]'s statement: the events in revisions `(?1, ?2]` but each
/// connection's latest.
pub(super) const PRUNE_RANGE: &str = "DELETE FROM events WHERE revision > ?1 AND revision <= ?2 \
     AND EXISTS (SELECT 1 FROM events AS newer WHERE newer.connection_id = events.connection_id \
     AND newer.revision > events.revision)";

/// Connection ?1's events at or below the compaction mark ?2, but its latest:
/// kept below the mark while they were its latest, they go once it has a newer.
pub(super) const DROP_SUPERSEDED: &str = "DELETE FROM events WHERE connection_id = ?1 \
     AND revision <= ?2 AND revision < (SELECT max(revision) FROM events WHERE connection_id = ?1)";

/// The newest revision older than the retention window (time ?2), read in
/// revision order from the compaction mark ?1: the one before the first
/// that is not old (so a clock set back keeps more, never less), or the
/// newest of all.
pub(super) const NEWEST_OLD: &str = "SELECT coalesce( \
     (SELECT revision - 1 FROM events WHERE revision > ?1 AND time >= ?2 \
      ORDER BY revision LIMIT 1), \
     (SELECT max(revision) FROM events))";

/// Stored answers older than the retention window (time ?1).
pub(super) const EXPIRED_ANSWERS: &str = "DELETE FROM requests WHERE time < ?1";

/// Over the storage quota, the error every job that frees no space gets.
/// Checked once per group, before it runs: a group checked under the quota
/// commits whole, so the quota is soft by at most one group. Logs the
/// alarm when it is raised and when it clears, not once per refused job.
fn check_quota(
    sql: &rusqlite::Transaction<'_>,
    quota: u64,
    over_quota: &mut bool,
) -> Result<Option<Error>, Error> {
    if quota == 0 {
        return Ok(None);
    }
    let used = used_bytes(sql)?;
    let over = used > quota;
    if over != *over_quota {
        *over_quota = over;
        if over {
            tracing::warn!(
                used_bytes = used,
                quota_bytes = quota,
                "the database is over its storage quota: writes are refused, deletions \
                 still run, until space is freed (delete connections or credentials) or \
                 --storage-quota is raised"
            );
        } else {
            tracing::info!(
                used_bytes = used,
                quota_bytes = quota,
                "the database is back under its storage quota: writes are accepted again"
            );
        }
    }
    Ok(over.then_some(Error::QuotaExceeded { used, quota }))
}

/// The space the database's pages in use take: freed pages (on the free
/// list) do not count, so a deletion lowers it at once, though the file does
/// not shrink.
pub(super) fn used_bytes(sql: &rusqlite::Connection) -> Result<u64, Error> {
    let (pages, free, size): (i64, i64, i64) = sql
        .prepare_cached(
            "SELECT (SELECT page_count FROM pragma_page_count()), \
                    (SELECT freelist_count FROM pragma_freelist_count()), \
                    (SELECT page_size FROM pragma_page_size())",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(u64::try_from((pages - free) * size).unwrap_or(0))
}

/// The identity of a file: (device, inode).
pub(super) fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(test)]
mod tests {
    use super::super::{Store, StoreConfig};
    use super::*;
    use crate::error::Error;

    fn config() -> StoreConfig {
        StoreConfig {
            writer: WriterConfig {
                max_group: 8,
                retention: Duration::from_secs(3600),
                retention_count: 1000,
                prune_interval: Duration::from_secs(3600),
                max_answers: 1000,
                storage_quota: 0,
            },
            write_queue: 16,
            read_pool: 1,
            publish_buffer: 16,
            busy_timeout: Duration::from_secs(1),
        }
    }

    /// A real SQLITE_FULL: the writer connection's `max_page_count` caps the
    /// file, which is the only way to fill a "disk" here without root mounts.
    fn cap(tx: &Tx<'_>, pages: i64) -> Result<(), Error> {
        tx.lite()
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
        Ok(())
    }

    fn fill(tx: &Tx<'_>, n: usize) -> Result<(), Error> {
        let blob = "x".repeat(64 * 1024);
        for i in 0..n {
            tx.lite().execute(
                "INSERT INTO requests (request_id, fingerprint, connection_id, answer, time) \
                 VALUES (?1, 0, x'00', ?2, 0)",
                params![format!("{:?}-{i}", tx.now), blob],
            )?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_full_disk_answers_storage_full_and_is_a_fault_until_a_write_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), config()).unwrap();
        let fault = store.storage_fault();
        let pages: i64 = store
            .read(|c| Ok(c.sql().query_row("PRAGMA page_count", [], |r| r.get(0))?))
            .await
            .unwrap();
        store.write(move |tx| cap(tx, pages + 4)).await.unwrap();
        let full = store.write(|tx| fill(tx, 8)).await;
        assert!(matches!(full, Err(Error::StorageFull(_))), "{full:?}");
        assert!(*fault.borrow(), "health sees the fault");
        // Space comes back (here: the cap is lifted); the next write clears it.
        store.write(|tx| cap(tx, 1 << 30)).await.unwrap();
        assert!(!*fault.borrow());
        store.write(|tx| fill(tx, 8)).await.unwrap();
        assert!(!*fault.borrow());
        tokio::task::spawn_blocking(move || store.close())
            .await
            .unwrap();
    }

    // ---- blobs: large metadata stored once, counted by reference ----

    fn metadata(tag: &str, size: usize) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("tag".into(), tag.into());
        m.insert("filler".into(), "x".repeat(size).into());
        m
    }

    fn connection(meta: serde_json::Map<String, serde_json::Value>) -> Connection {
        Connection {
            metadata: meta,
            ..Connection::for_test("blob test")
        }
    }

    fn draft(type_: EventType) -> EventDraft {
        EventDraft {
            type_,
            from_state: State::Discovered,
            trigger: Trigger::User,
            reason: String::new(),
            actor: "test".into(),
        }
    }

    /// Records `c` (created when its revision is 0); `c` as stored.
    async fn save(store: &Store, c: &Connection) -> Connection {
        let mut c = c.clone();
        store
            .write(move |tx| {
                let type_ = if c.revision == Revision::ZERO {
                    EventType::Created
                } else {
                    EventType::Updated
                };
                tx.record(&mut c, draft(type_))?;
                Ok(c)
            })
            .await
            .unwrap()
    }

    /// Each blob's reference count, by the tag in its metadata, after
    /// checking that every count is the number of rows naming the blob and
    /// that no blob is left unreferenced.
    async fn blob_refs(store: &Store) -> std::collections::BTreeMap<String, i64> {
        store
            .read(|c| {
                let mut stmt = c.sql().prepare(
                    "SELECT json_extract(body, '$.tag'), refs, \
                     (SELECT count(*) FROM events WHERE metadata_blob = hash) \
                     + (SELECT count(*) FROM requests WHERE metadata_blob = hash) FROM blobs",
                )?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get(2)?))
                    })?
                    .collect::<Result<Vec<(String, i64, i64)>, _>>()?;
                let dangling: i64 = c.sql().query_row(
                    "SELECT count(*) FROM events WHERE metadata_blob IS NOT NULL \
                     AND metadata_blob NOT IN (SELECT hash FROM blobs)",
                    [],
                    |r| r.get(0),
                )?;
                assert_eq!(dangling, 0, "an event names a missing blob");
                for (tag, refs, named) in &rows {
                    assert_eq!(refs, named, "blob {tag}: count and references differ");
                    assert!(*refs > 0, "blob {tag} outlived its references");
                }
                Ok(rows.into_iter().map(|(t, r, _)| (t, r)).collect())
            })
            .await
            .unwrap()
    }

    fn refs(pairs: &[(&str, i64)]) -> std::collections::BTreeMap<String, i64> {
        pairs.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    async fn history(store: &Store, id: &ConnectionId) -> Vec<Event> {
        let id = id.clone();
        store
            .read(move |c| {
                c.events(&super::super::EventFilter {
                    connection_id: Some(id),
                    after_revision: Revision::ZERO,
                    limit: 100,
                    owners: None,
                    max_bytes: usize::MAX,
                })
            })
            .await
            .unwrap()
    }

    /// How many `requests` rows the store holds.
    async fn rows(store: &Store) -> i64 {
        store
            .read(|c| {
                Ok(c.sql()
                    .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))?)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_job_alone_commits_in_its_own_transaction_and_fails_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), config()).unwrap();
        // Alone, no savepoint is open: releasing the one a shared job runs
        // in fails.
        let savepoint_open = store
            .write_alone(|tx| Ok(tx.lite().execute_batch("RELEASE job").is_ok()))
            .await
            .unwrap();
        assert!(!savepoint_open, "a job alone runs in no savepoint");

        // A failing job alone leaves nothing behind and answers its own error.
        let failed = store
            .write_alone(|tx| {
                fill(tx, 3)?;
                Err::<(), _>(Error::invalid("x", "refused half-way"))
            })
            .await;
        assert!(
            matches!(failed, Err(Error::InvalidArgument { .. })),
            "{failed:?}"
        );
        assert_eq!(rows(&store).await, 0);

        // Alone and shared jobs queued together all commit.
        let (a, b, c) = tokio::join!(
            store.write(|tx| fill(tx, 1)),
            store.write_alone(|tx| fill(tx, 2)),
            store.write(|tx| fill(tx, 1)),
        );
        a.unwrap();
        b.unwrap();
        c.unwrap();
        assert_eq!(rows(&store).await, 4);
        tokio::task::spawn_blocking(move || store.close())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_volatile_group_skips_the_sync_and_records_no_event() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), config()).unwrap();
        fn level(tx: &mut Tx<'_>) -> Result<(bool, i64), Error> {
            let sync = tx
                .lite()
                .query_row("PRAGMA synchronous", [], |r| r.get(0))?;
            Ok((tx.durable(), sync))
        }
        assert_eq!(store.write_volatile(level).await.unwrap(), (false, 1));
        let mut c = connection(metadata("v", 10));
        let refused = store
            .write_volatile(move |tx| tx.record(&mut c, draft(EventType::Created)))
            .await;
        assert!(matches!(refused, Err(Error::Internal(_))), "{refused:?}");
        assert_eq!(store.write(level).await.unwrap(), (true, 2), "FULL again");
        let revision = store.read(|c| c.revisions()).await.unwrap().0;
        assert_eq!(revision, Revision::ZERO);
        tokio::task::spawn_blocking(move || store.close())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_latest_event_is_its_row_until_the_row_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), config()).unwrap();
        let mut a = save(&store, &connection(metadata("v1", 10))).await;
        let other = save(&store, &connection(metadata("other", 10))).await;
        a.name = "second".into();
        a.metadata = metadata("v2", 10);
        a = save(&store, &a).await;
        a.name = "third".into();
        a = save(&store, &a).await;

        let events = history(&store, &a.id).await;
        let seen: Vec<(i64, &str, &serde_json::Value, i64)> = events
            .iter()
            .map(|e| {
                let c = &e.connection;
                (
                    e.revision.get(),
                    c.name.as_str(),
                    &c.metadata["tag"],
                    c.revision.get(),
                )
            })
            .collect();
        let (v1, v2) = (serde_json::json!("v1"), serde_json::json!("v2"));
        assert_eq!(
            seen,
            [
                (1, "blob test", &v1, 1),
                (3, "second", &v2, 3),
                (4, "third", &v2, 4)
            ],
            "each event shows the connection as that change left it"
        );
        let own: Vec<(i64, bool)> = store
            .read(|c| {
                let mut stmt = c
                    .sql()
                    .prepare("SELECT revision, snapshot <> '' FROM events ORDER BY revision")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap();
        assert_eq!(
            own,
            [(1, true), (2, false), (3, true), (4, false)],
            "only the latest event of each connection is its row"
        );
        assert_eq!(history(&store, &other.id).await[0].connection, other);
        tokio::task::spawn_blocking(move || store.close())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn blob_references_follow_every_event_that_is_pruned_replaced_or_scrubbed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), config()).unwrap();
        let (m1, m2) = (metadata("m1", 4096), metadata("m2", 4096));

        // The latest event is the row: nothing to store until it changes.
        let mut a = save(&store, &connection(m1.clone())).await;
        assert_eq!(blob_refs(&store).await, refs(&[]));
        a = save(&store, &a).await;
        assert_eq!(
            blob_refs(&store).await,
            refs(&[("m1", 1)]),
            "event 1 frozen"
        );

        // The same metadata frozen for another connection shares the blob.
        let mut b = save(&store, &connection(m1.clone())).await;
        b = save(&store, &b).await;
        assert_eq!(blob_refs(&store).await, refs(&[("m1", 2)]));
        a.metadata = m2.clone();
        a = save(&store, &a).await;
        a = save(&store, &a).await;
        assert_eq!(
            blob_refs(&store).await,
            refs(&[("m1", 3), ("m2", 1)]),
            "events 1, 2 and 3 hold m1, event 5 m2; 4 and 6 are rows"
        );
        let tags = |events: Vec<Event>| -> Vec<serde_json::Value> {
            events
                .into_iter()
                .map(|e| e.connection.metadata["tag"].clone())
                .collect()
        };
        assert_eq!(tags(history(&store, &a.id).await), ["m1", "m1", "m2", "m2"]);
        assert_eq!(tags(history(&store, &b.id).await), ["m1", "m1"]);

        // Pruning drops the references of what it deletes.
        store
            .write(|tx| prune_range(tx.lite(), Revision::ZERO, Revision::new(2)))
            .await
            .unwrap();
        assert_eq!(blob_refs(&store).await, refs(&[("m1", 1), ("m2", 1)]));

        // Small metadata stays inline.
        let small = metadata("small", 10);
        let c1 = save(&store, &connection(small.clone())).await;
        save(&store, &c1).await;
        assert_eq!(blob_refs(&store).await, refs(&[("m1", 1), ("m2", 1)]));
        assert_eq!(history(&store, &c1.id).await[0].connection.metadata, small);

        // Stored answers name blobs too; the metadata comes back with them.
        let answered = Connection {
            metadata: metadata("m3", 4096),
            ..a.clone()
        };
        let stored = answered.clone();
        let id = a.id.clone();
        store
            .write(move |tx| tx.remember("r1", 7, &id, &Ok(stored)))
            .await
            .unwrap();
        let id = b.id.clone();
        let stored = answered.clone();
        store
            .write(move |tx| tx.remember("r2", 7, &id, &Ok(stored)))
            .await
            .unwrap();
        assert_eq!(
            blob_refs(&store).await,
            refs(&[("m1", 1), ("m2", 1), ("m3", 2)]),
            "one blob, two answers"
        );
        let back = store.read(|c| c.answer("r1")).await.unwrap();
        assert_eq!(back, Some((7, Ok(answered))));
        // Answers pruned (as by age or count) drop their reference.
        store
            .write(|tx| {
                Ok(tx
                    .lite()
                    .execute("DELETE FROM requests WHERE request_id = 'r2'", [])?)
            })
            .await
            .unwrap();
        assert_eq!(
            blob_refs(&store).await,
            refs(&[("m1", 1), ("m2", 1), ("m3", 1)])
        );

        // A deletion (its row cleared, then scrubbed) drops a's references,
        // from events and answers; b's event 3 keeps m1.
        a.metadata.clear();
        a = save(&store, &a).await;
        assert_eq!(
            blob_refs(&store).await,
            refs(&[("m1", 1), ("m2", 2), ("m3", 1)])
        );
        let id = a.id.clone();
        store.write(move |tx| tx.scrub(&id)).await.unwrap();
        assert_eq!(blob_refs(&store).await, refs(&[("m1", 1)]));
        let events = history(&store, &a.id).await;
        assert!(!events.is_empty());
        assert!(events.iter().all(|e| e.connection.metadata.is_empty()));

        // A row cannot name a blob that is not there.
        let named = store
            .write(|tx| {
                Ok(tx.lite().execute(
                    "UPDATE events SET metadata_blob = x'00' WHERE revision = \
                     (SELECT max(revision) FROM events)",
                    [],
                )?)
            })
            .await;
        assert!(named.is_err(), "{named:?}");
        tokio::task::spawn_blocking(move || store.close())
            .await
            .unwrap();
    }
}
