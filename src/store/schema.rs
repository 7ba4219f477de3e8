//! The database schema and its migrations, run at start.
//!
//! `PRAGMA user_version` records how many migrations a database has had. A
//! database migrated by a newer Tether is refused rather than guessed at.

use crate::connection::{ConnectionId, derive_identity};
use crate::error::Error;
use crate::lifecycle::State;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

/// One migration: SQL, or a step of Rust for what SQL cannot say.
enum Step {
    Sql(&'static str),
    Rust(fn(&Transaction<'_>) -> Result<(), Error>),
}

/// The triggers that keep `blobs.refs` for `events` (schema version 3).
macro_rules! events_blob_triggers {
    () => {
        r#"
    CREATE TRIGGER events_blob_insert AFTER INSERT ON events WHEN NEW.metadata_blob IS NOT NULL BEGIN
        SELECT RAISE(ABORT, 'events.metadata_blob names no blob')
            WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE hash = NEW.metadata_blob);
        UPDATE blobs SET refs = refs + 1 WHERE hash = NEW.metadata_blob;
    END;
    CREATE TRIGGER events_blob_delete AFTER DELETE ON events WHEN OLD.metadata_blob IS NOT NULL BEGIN
        UPDATE blobs SET refs = refs - 1 WHERE hash = OLD.metadata_blob;
        DELETE FROM blobs WHERE hash = OLD.metadata_blob AND refs = 0;
    END;
    CREATE TRIGGER events_blob_update AFTER UPDATE OF metadata_blob ON events
        WHEN OLD.metadata_blob IS NOT NEW.metadata_blob BEGIN
        SELECT RAISE(ABORT, 'events.metadata_blob names no blob')
            WHERE NEW.metadata_blob IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM blobs WHERE hash = NEW.metadata_blob);
        UPDATE blobs SET refs = refs + 1 WHERE hash = NEW.metadata_blob;
        UPDATE blobs SET refs = refs - 1 WHERE hash = OLD.metadata_blob;
        DELETE FROM blobs WHERE hash = OLD.metadata_blob AND refs = 0;
    END;
"#
    };
}

/// The triggers that keep `blobs.refs` for `requests` (schema version 3).
macro_rules! requests_blob_triggers {
    () => {
        r#"
    CREATE TRIGGER requests_blob_insert AFTER INSERT ON requests WHEN NEW.metadata_blob IS NOT NULL BEGIN
        SELECT RAISE(ABORT, 'requests.metadata_blob names no blob')
            WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE hash = NEW.metadata_blob);
        UPDATE blobs SET refs = refs + 1 WHERE hash = NEW.metadata_blob;
    END;
    CREATE TRIGGER requests_blob_delete AFTER DELETE ON requests WHEN OLD.metadata_blob IS NOT NULL BEGIN
        UPDATE blobs SET refs = refs - 1 WHERE hash = OLD.metadata_blob;
        DELETE FROM blobs WHERE hash = OLD.metadata_blob AND refs = 0;
    END;
    CREATE TRIGGER requests_blob_update AFTER UPDATE OF metadata_blob ON requests
        WHEN OLD.metadata_blob IS NOT NEW.metadata_blob BEGIN
        SELECT RAISE(ABORT, 'requests.metadata_blob names no blob')
            WHERE NEW.metadata_blob IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM blobs WHERE hash = NEW.metadata_blob);
        UPDATE blobs SET refs = refs + 1 WHERE hash = NEW.metadata_blob;
        UPDATE blobs SET refs = refs - 1 WHERE hash = OLD.metadata_blob;
        DELETE FROM blobs WHERE hash = OLD.metadata_blob AND refs = 0;
    END;
"#
    };
}

/// The triggers that keep `connection_counts` and `label_counts` (schema
/// version 6).
macro_rules! count_triggers {
    () => {
        r#"
    CREATE TRIGGER connections_count_insert AFTER INSERT ON connections BEGIN
        INSERT INTO connection_counts (owner, kind, state, n)
            VALUES (NEW.owner, NEW.kind, NEW.state, 1)
            ON CONFLICT DO UPDATE SET n = n + 1;
        INSERT INTO label_counts (key, value, owner, kind, state, n)
            SELECT key, value, NEW.owner, NEW.kind, NEW.state, 1 FROM json_each(NEW.labels) WHERE 1
            ON CONFLICT DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER connections_count_delete AFTER DELETE ON connections BEGIN
        DELETE FROM connection_counts
            WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state) AND n = 1;
        UPDATE connection_counts SET n = n - 1
            WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state);
        INSERT INTO label_counts (key, value, owner, kind, state, n)
            SELECT key, value, OLD.owner, OLD.kind, OLD.state, 0 FROM json_each(OLD.labels) WHERE 1
            ON CONFLICT DO UPDATE SET n = max(n - 1, 0);
        DELETE FROM label_counts WHERE n = 0;
    END;
    CREATE TRIGGER connections_count_update AFTER UPDATE OF owner, kind, state, labels ON connections
        WHEN OLD.owner IS NOT NEW.owner OR OLD.kind IS NOT NEW.kind
            OR OLD.state IS NOT NEW.state OR OLD.labels IS NOT NEW.labels BEGIN
        DELETE FROM connection_counts
            WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state) AND n = 1;
        UPDATE connection_counts SET n = n - 1
            WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state);
        INSERT INTO connection_counts (owner, kind, state, n)
            VALUES (NEW.owner, NEW.kind, NEW.state, 1)
            ON CONFLICT DO UPDATE SET n = n + 1;
        INSERT INTO label_counts (key, value, owner, kind, state, n)
            SELECT key, value, OLD.owner, OLD.kind, OLD.state, 0 FROM json_each(OLD.labels) WHERE 1
            ON CONFLICT DO UPDATE SET n = max(n - 1, 0);
        INSERT INTO label_counts (key, value, owner, kind, state, n)
            SELECT key, value, NEW.owner, NEW.kind, NEW.state, 1 FROM json_each(NEW.labels) WHERE 1
            ON CONFLICT DO UPDATE SET n = n + 1;
        DELETE FROM label_counts WHERE n = 0;
    END;
"#
    };
}

/// Each entry moves the schema one version up; never edit one that has shipped.
const MIGRATIONS: &[Step] = &[
    // 1: connections, their events, the store-wide counters, idempotent requests.
    Step::Sql(
        r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) STRICT;
    INSERT INTO meta (key, value) VALUES ('revision', 0), ('compact_revision', 0);

    CREATE TABLE connections (
        id            TEXT PRIMARY KEY,
        kind          TEXT NOT NULL,
        type          TEXT NOT NULL,
        sub_type      TEXT NOT NULL,
        name          TEXT NOT NULL,
        description   TEXT NOT NULL,
        url           TEXT NOT NULL,
        identity      TEXT NOT NULL,
        metadata      TEXT NOT NULL,
        labels        TEXT NOT NULL,
        managed       INTEGER NOT NULL,
        credential_id TEXT NOT NULL,
        owner         TEXT NOT NULL,
        state         INTEGER NOT NULL,
        state_reason  TEXT NOT NULL,
        state_trigger INTEGER NOT NULL,
        state_time    INTEGER NOT NULL,
        revision      INTEGER NOT NULL,
        create_time   INTEGER NOT NULL,
        update_time   INTEGER NOT NULL,
        last_probe    TEXT
    ) STRICT;
    -- Two live connections never share an identity; tombstones (state 7) may.
    CREATE UNIQUE INDEX connections_live_identity ON connections (identity) WHERE state <> 7;
    CREATE INDEX connections_by_create ON connections (create_time, id);
    CREATE INDEX connections_by_update ON connections (update_time, id);
    CREATE INDEX connections_by_name ON connections (name, id);

    -- One row per committed change; `snapshot` is the connection after it, as JSON.
    CREATE TABLE events (
        revision      INTEGER PRIMARY KEY,
        connection_id TEXT NOT NULL,
        type          INTEGER NOT NULL,
        from_state    INTEGER NOT NULL,
        to_state      INTEGER NOT NULL,
        trigger       INTEGER NOT NULL,
        reason        TEXT NOT NULL,
        actor         TEXT NOT NULL,
        time          INTEGER NOT NULL,
        snapshot      TEXT NOT NULL
    ) STRICT;
    CREATE INDEX events_by_connection ON events (connection_id, revision);
    CREATE INDEX events_by_time ON events (time);

    -- The first answer to each request_id, kept for the retention window.
    CREATE TABLE requests (
        request_id    TEXT PRIMARY KEY,
        fingerprint   INTEGER NOT NULL,
        connection_id TEXT NOT NULL,
        answer        TEXT NOT NULL,
        time          INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX requests_by_time ON requests (time);
    CREATE INDEX requests_by_connection ON requests (connection_id);

    -- Secrets, sealed with XChaCha20-Poly1305 under the server's key; the
    -- credential id is the associated data, so a sealed secret cannot be moved
    -- to another row.
    CREATE TABLE credentials (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        type        TEXT NOT NULL,
        owner       TEXT NOT NULL,
        nonce       BLOB NOT NULL,
        sealed      BLOB NOT NULL,
        create_time INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX credentials_by_create ON credentials (create_time, id);

    -- An empty object sealed with the server's key when the database was first
    -- opened, so a wrong key is noticed at start, not at the first probe.
    CREATE TABLE key_check (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        nonce  BLOB NOT NULL,
        sealed BLOB NOT NULL
    ) STRICT;
    CREATE INDEX connections_by_credential ON connections (credential_id) WHERE credential_id <> '';
    "#,
    ),
    // 2: the hosts each credential may be sent to (a JSON array of host
    // patterns). Credentials stored before have none, so they are sent
    // nowhere until replaced.
    Step::Sql(
        r#"
    ALTER TABLE credentials ADD COLUMN allowed_hosts TEXT NOT NULL DEFAULT '[]';
    CREATE INDEX credentials_by_owner ON credentials (owner, create_time, id);
    "#,
    ),
    // 3: large metadata stored once. An event snapshot or stored answer whose
    // connection has large metadata holds it as `{}` and names its blob (the
    // SHA-256 of the metadata's JSON) in `metadata_blob`; reads put it back.
    // `refs` counts the rows naming a blob, kept by these triggers on every
    // insert, delete and rewrite of those rows, and a blob goes with its last
    // reference. Rows stored before keep their metadata inline.
    Step::Sql(concat!(
        r#"
    -- `refs` before `body`: it stays on the row's first page, so counting a
    -- reference rewrites that page only, not the body's overflow pages.
    CREATE TABLE blobs (
        hash BLOB PRIMARY KEY,
        refs INTEGER NOT NULL CHECK (refs >= 0),
        body TEXT NOT NULL
    ) STRICT;
    ALTER TABLE events ADD COLUMN metadata_blob BLOB;
    ALTER TABLE requests ADD COLUMN metadata_blob BLOB;
"#,
        events_blob_triggers!(),
        requests_blob_triggers!()
    )),
    // 4: identities derived by the rule before urls differing only by an
    // empty query, a fragment or trailing slashes derived one identity.
    Step::Rust(rederive_identities),
    // 5: counts kept as the rows change, so counting reads a few aggregate
    // rows instead of every connection. `connection_counts` holds how many
    // connections each (owner, kind, state) has; `label_counts` the same per
    // label (key, value). The triggers keep them in the transaction of every
    // insert, delete and change of those columns (a change of anything else
    // fires nothing); a row that falls to zero goes. Both start from the rows
    // already stored. `connections_by_state`/`_kind` find a state's or a
    // kind's connections in creation order, for pages filtered to a rare one.
    Step::Sql(
        r#"
    CREATE TABLE connection_counts (
        owner TEXT NOT NULL,
        kind  TEXT NOT NULL,
        state INTEGER NOT NULL,
        n     INTEGER NOT NULL CHECK (n > 0),
        PRIMARY KEY (owner, kind, state)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE label_counts (
        key   TEXT NOT NULL,
        value TEXT NOT NULL,
        owner TEXT NOT NULL,
        kind  TEXT NOT NULL,
        state INTEGER NOT NULL,
        n     INTEGER NOT NULL CHECK (n > 0),
        PRIMARY KEY (key, value, owner, kind, state)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO connection_counts (owner, kind, state, n)
        SELECT owner, kind, state, count(*) FROM connections GROUP BY owner, kind, state;
    INSERT INTO label_counts (key, value, owner, kind, state, n)
        SELECT j.key, j.value, c.owner, c.kind, c.state, count(*)
        FROM connections AS c, json_each(c.labels) AS j
        GROUP BY j.key, j.value, c.owner, c.kind, c.state;

    CREATE TRIGGER connections_count_insert AFTER INSERT ON connections BEGIN
        INSERT INTO connection_counts (owner, kind, state, n)
            VALUES (NEW.owner, NEW.kind, NEW.state, 1)
            ON CONFLICT DO UPDATE SET n = n + 1;
        INSERT INTO label_counts (key, value, owner, kind, state, n)
            SELECT key, value, NEW.owner, NEW.kind, NEW.state, 1 FROM json_each(NEW.labels) WHERE 1
            ON CONFLICT DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER connections_count_delete AFTER DELETE ON connections BEGIN
        DELETE FROM connection_counts
            WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state) AND n = 1;
        UPDATE connection_counts SET n = n - 1
            WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state);
        DELETE FROM label_counts WHERE n = 1 AND (key, value, owner, kind, state) IN
            (SELECT key, value, OLD.owner, OLD.kind, OLD.state FROM json_each(OLD.labels));
        UPDATE label_counts SET n = n - 1 WHERE (key, value, owner, kind, state) IN
            (SELECT key, value, OLD.owner, OLD.kind, OLD.state FROM json_each(OLD.labels));
    END;
    CREATE TRIGGER connections_count_update AFTER UPDATE OF owner, kind, state, labels ON connections
        WHEN OLD.owner IS NOT NEW.owner OR OLD.kind IS NOT NEW.kind
            OR OLD.state IS NOT NEW.state OR OLD.labels IS NOT NEW.labels BEGIN
        DELETE FROM connection_counts
            WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state) AND n = 1;
        UPDATE connection_counts SET n = n - 1
            WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state);
        INSERT INTO connection_counts (owner, kind, state, n)
            VALUES (NEW.owner, NEW.kind, NEW.state, 1)
            ON CONFLICT DO UPDATE SET n = n + 1;
        DELETE FROM label_counts WHERE n = 1 AND (key, value, owner, kind, state) IN
            (SELECT key, value, OLD.owner, OLD.kind, OLD.state FROM json_each(OLD.labels));
        UPDATE label_counts SET n = n - 1 WHERE (key, value, owner, kind, state) IN
            (SELECT key, value, OLD.owner, OLD.kind, OLD.state FROM json_each(OLD.labels));
        INSERT INTO label_counts (key, value, owner, kind, state, n)
            SELECT key, value, NEW.owner, NEW.kind, NEW.state, 1 FROM json_each(NEW.labels) WHERE 1
            ON CONFLICT DO UPDATE SET n = n + 1;
    END;

    CREATE INDEX connections_by_state ON connections (state, create_time);
    CREATE INDEX connections_by_kind ON connections (kind, create_time);
    "#,
    ),
    // 6: label counts change by one keyed upsert per label, as the labels
    // list them, instead of matching the labels as a set (`IN (SELECT ...)`
    // builds a temporary table on every change of state). A count may fall
    // to zero for a moment; the trigger then deletes the rows at zero, which
    // a partial index finds without a scan. Same rows, same meaning.
    Step::Sql(concat!(
        r#"
    DROP TRIGGER connections_count_insert;
    DROP TRIGGER connections_count_delete;
    DROP TRIGGER connections_count_update;
    CREATE TABLE label_counts_6 (
        key   TEXT NOT NULL,
        value TEXT NOT NULL,
        owner TEXT NOT NULL,
        kind  TEXT NOT NULL,
        state INTEGER NOT NULL,
        n     INTEGER NOT NULL CHECK (n >= 0),
        PRIMARY KEY (key, value, owner, kind, state)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO label_counts_6 (key, value, owner, kind, state, n)
        SELECT key, value, owner, kind, state, n FROM label_counts;
    DROP TABLE label_counts;
    ALTER TABLE label_counts_6 RENAME TO label_counts;
    CREATE INDEX label_counts_emptied ON label_counts (n) WHERE n = 0;

"#,
        count_triggers!()
    )),
    // 7: a smaller file. Ids are kept as their UUID's 16 bytes instead of
    // 36 characters, in the rows, the events, the stored answers and every
    // index over them. `seq` (the rowid) numbers connections in creation
    // order, which is `(create_time, id)` order: the rows are copied in that
    // order here, and the writer gives each new connection a create_time
    // later than every stored one (see `Tx::record`). So a page in creation
    // order walks the table itself, and the indexes of one state or one kind
    // hold just that column (SQLite ends each index entry with the rowid):
    // `connections_by_create` goes. Events are pruned by time in revision
    // order, not through `events_by_time`, which goes too. The same rows and
    // meaning otherwise; the counts, triggers and blob references carry over.
    Step::Sql(concat!(
        r#"
    CREATE TABLE connections_7 (
        seq           INTEGER PRIMARY KEY,
        id            BLOB NOT NULL UNIQUE CHECK (length(id) = 16),
        kind          TEXT NOT NULL,
        type          TEXT NOT NULL,
        sub_type      TEXT NOT NULL,
        name          TEXT NOT NULL,
        description   TEXT NOT NULL,
        url           TEXT NOT NULL,
        identity      TEXT NOT NULL,
        metadata      TEXT NOT NULL,
        labels        TEXT NOT NULL,
        managed       INTEGER NOT NULL,
        credential_id TEXT NOT NULL,
        owner         TEXT NOT NULL,
        state         INTEGER NOT NULL,
        state_reason  TEXT NOT NULL,
        state_trigger INTEGER NOT NULL,
        state_time    INTEGER NOT NULL,
        revision      INTEGER NOT NULL,
        create_time   INTEGER NOT NULL,
        update_time   INTEGER NOT NULL,
        last_probe    TEXT
    ) STRICT;
    INSERT INTO connections_7 (id, kind, type, sub_type, name, description, url, identity,
        metadata, labels, managed, credential_id, owner, state, state_reason, state_trigger,
        state_time, revision, create_time, update_time, last_probe)
        SELECT unhex(replace(id, '-', '')), kind, type, sub_type, name, description, url,
            identity, metadata, labels, managed, credential_id, owner, state, state_reason,
            state_trigger, state_time, revision, create_time, update_time, last_probe
        FROM connections ORDER BY create_time, id;

    CREATE TABLE events_7 (
        revision      INTEGER PRIMARY KEY,
        connection_id BLOB NOT NULL CHECK (length(connection_id) = 16),
        type          INTEGER NOT NULL,
        from_state    INTEGER NOT NULL,
        to_state      INTEGER NOT NULL,
        trigger       INTEGER NOT NULL,
        reason        TEXT NOT NULL,
        actor         TEXT NOT NULL,
        time          INTEGER NOT NULL,
        snapshot      TEXT NOT NULL,
        metadata_blob BLOB
    ) STRICT;
    INSERT INTO events_7 (revision, connection_id, type, from_state, to_state, trigger, reason,
        actor, time, snapshot, metadata_blob)
        SELECT revision, unhex(replace(connection_id, '-', '')), type, from_state, to_state,
            trigger, reason, actor, time, snapshot, metadata_blob
        FROM events;

    CREATE TABLE requests_7 (
        request_id    TEXT PRIMARY KEY,
        fingerprint   INTEGER NOT NULL,
        connection_id BLOB NOT NULL,
        answer        TEXT NOT NULL,
        time          INTEGER NOT NULL,
        metadata_blob BLOB
    ) STRICT;
    INSERT INTO requests_7 (request_id, fingerprint, connection_id, answer, time, metadata_blob)
        SELECT request_id, fingerprint, unhex(replace(connection_id, '-', '')), answer, time,
            metadata_blob
        FROM requests;

    -- Dropping a table drops its indexes and triggers without firing any:
    -- the blob references and the counts stand as they were.
    DROP TABLE connections;
    DROP TABLE events;
    DROP TABLE requests;
    ALTER TABLE connections_7 RENAME TO connections;
    ALTER TABLE events_7 RENAME TO events;
    ALTER TABLE requests_7 RENAME TO requests;

    CREATE UNIQUE INDEX connections_live_identity ON connections (identity) WHERE state <> 7;
    CREATE INDEX connections_by_update ON connections (update_time, id);
    CREATE INDEX connections_by_name ON connections (name, id);
    CREATE INDEX connections_by_state ON connections (state);
    CREATE INDEX connections_by_kind ON connections (kind);
    CREATE INDEX connections_by_credential ON connections (credential_id) WHERE credential_id <> '';
    CREATE INDEX events_by_connection ON events (connection_id, revision);
    CREATE INDEX requests_by_time ON requests (time);
    CREATE INDEX requests_by_connection ON requests (connection_id);
"#,
        events_blob_triggers!(),
        requests_blob_triggers!(),
        count_triggers!()
    )),
    // 8: the writer keeps the counts (`store::counts`): it sums what a group
    // of changes adds and takes away and writes each sum once, where the
    // triggers ran several statements, with a statement journal, for every
    // connection written (a third of a bulk load). The counts stand as they
    // are; the rows at zero that the triggers left for a moment are gone
    // with their index, as the writer never leaves one.
    Step::Sql(
        r#"
    DROP TRIGGER connections_count_insert;
    DROP TRIGGER connections_count_delete;
    DROP TRIGGER connections_count_update;
    DROP INDEX label_counts_emptied;
    DELETE FROM label_counts WHERE n = 0;
    "#,
    ),
];

/// The schema version this build writes.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to [`VERSION`], or refuses one that is newer.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), Error> {
    migrate_to(conn, VERSION)
}

/// Brings the database up to schema version `target`.
fn migrate_to(conn: &mut Connection, target: i64) -> Result<(), Error> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > VERSION {
        return Err(Error::Internal(format!(
            "the database has schema version {current}, newer than this tether understands ({VERSION}); \
             run a newer tether or restore a backup"
        )));
    }
    for (i, step) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target as usize)
        .skip(current as usize)
    {
        let tx = conn.transaction()?;
        match step {
            Step::Sql(sql) => tx.execute_batch(sql)?,
            Step::Rust(f) => f(&tx)?,
        }
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "migrated database schema");
    }
    if target > current {
        give_back_free_pages(conn);
    }
    Ok(())
}

/// A migration that copies tables leaves their old pages free inside the
/// file (version 7 frees about two fifths of it). When more than a quarter
/// of the file is free after migrating, the file is rewritten without them
/// (`VACUUM`, a few seconds for a million connections), once, at the start
/// that migrated it. A failure (no room for the copy) loses nothing: the
/// pages stay free for SQLite to reuse, and a WARN says so.
fn give_back_free_pages(conn: &Connection) {
    let pages = conn.query_row(
        "SELECT (SELECT freelist_count FROM pragma_freelist_count), \
                (SELECT page_count FROM pragma_page_count)",
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
    );
    let Ok((free, total)) = pages else { return };
    if free * 4 <= total {
        return;
    }
    let started = std::time::Instant::now();
    let done = conn
        .execute_batch("VACUUM")
        .and_then(|()| conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())));
    match done {
        Ok(()) => tracing::info!(
            free_pages = free,
            of_pages = total,
            took_ms = started.elapsed().as_millis() as u64,
            "rewrote the database file without the pages the migration freed"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            free_pages = free,
            of_pages = total,
            "could not rewrite the database file without the pages the migration freed; \
             they stay free inside it for new data"
        ),
    }
}

/// Gives every live connection whose identity was derived from its url by the
/// earlier rule (`kind:url`, the url as stored) the identity the current rule
/// derives, so that equivalent urls stored before and after the rule changed
/// know each other. An identity a client chose is left alone, and so are
/// tombstones and connections without a url (their identity is their id).
///
/// Two live connections never share an identity: one whose new identity is
/// already held (by an older connection re-derived first, or by a newer one
/// stored under the new rule) keeps its old identity, and a WARN names both.
/// Nothing is deleted or merged. The change is a new spelling of the same
/// key, not a change a client made: it records no event and no revision
/// (watchers and etags do not see it; reads do).
fn rederive_identities(tx: &Transaction<'_>) -> Result<(), Error> {
    let deleted = State::Deleted.number();
    let rows: Vec<(String, String, String, String)> = tx
        .prepare(&format!(
            "SELECT id, kind, url, identity FROM connections \
             WHERE state <> {deleted} AND url <> '' ORDER BY create_time, id"
        ))?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    let mut holder = tx.prepare(&format!(
        "SELECT id FROM connections WHERE identity = ?1 AND state <> {deleted} AND id <> ?2"
    ))?;
    let mut set = tx.prepare("UPDATE connections SET identity = ?2 WHERE id = ?1")?;
    let mut changed = 0;
    for (id, kind, url, identity) in rows {
        if identity != format!("{kind}:{url}") {
            continue;
        }
        let derived = derive_identity(&kind, &url, &ConnectionId::parse(&id, "id")?);
        if derived == identity {
            continue;
        }
        let held: Option<String> = holder
            .query_row(params![derived, id], |r| r.get(0))
            .optional()?;
        match held {
            Some(other) => tracing::warn!(
                id = %id,
                holder = %other,
                identity = %derived,
                kept = %identity,
                "connection {id} keeps its old identity: the identity its url now derives \
                 is held by connection {other}; update or delete one of them"
            ),
            None => {
                set.execute(params![id, derived])?;
                changed += 1;
            }
        }
    }
    if changed > 0 {
        tracing::info!(connections = changed, "re-derived identities from urls");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::query;

    /// A database as schema version 2 left it.
    fn version_2() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        for step in &MIGRATIONS[..2] {
            let Step::Sql(sql) = step else { unreachable!() };
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        (dir, conn)
    }

    /// Stores a connection the way an older tether did; its id.
    fn insert(
        conn: &Connection,
        url: &str,
        identity: &str,
        state: State,
        create_time: i64,
    ) -> String {
        let id = ConnectionId::generate().to_string();
        let identity = if identity.is_empty() { &id } else { identity };
        conn.execute(
            "INSERT INTO connections (id, kind, type, sub_type, name, description, url, identity, \
             metadata, labels, managed, credential_id, owner, state, state_reason, state_trigger, \
             state_time, revision, create_time, update_time, last_probe) \
             VALUES (?1, 'tcp', '', '', 'n', '', ?2, ?3, ?4, '{}', 0, '', '', ?5, '', 1, ?6, ?6, ?6, ?6, NULL)",
            params![
                id,
                url,
                identity,
                serde_json::json!({"big": "m".repeat(2000)}).to_string(),
                state.number(),
                create_time
            ],
        )
        .unwrap();
        id
    }

    /// The identity of connection `id`, stored as text (before schema
    /// version 7) or as bytes.
    fn identity(conn: &Connection, id: &str) -> String {
        conn.query_row(
            "SELECT identity FROM connections WHERE id IN (?1, unhex(replace(?1, '-', '')))",
            [id],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn version_5_counts_the_connections_already_stored() {
        let (_dir, mut conn) = version_2();
        let mut ids = Vec::new();
        for (i, state) in [
            State::Discovered,
            State::Ignored,
            State::Deleted,
            State::Discovered,
        ]
        .into_iter()
        .enumerate()
        {
            ids.push(insert(&conn, "", "", state, i as i64));
        }
        conn.execute(
            r#"UPDATE connections SET labels = '{"env":"a","shard":"s1"}', owner = 'o' WHERE id = ?1"#,
            [&ids[0]],
        )
        .unwrap();
        conn.execute(
            r#"UPDATE connections SET labels = '{"env":"a"}', kind = 'http' WHERE id = ?1"#,
            [&ids[1]],
        )
        .unwrap();
        migrate_to(&mut conn, 6).unwrap();
        let kept: i64 = conn
            .query_row("SELECT sum(n) FROM connection_counts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 4);
        crate::store::counts_tests::assert_counts_kept(&conn);
        // And from then on, the triggers keep them.
        conn.execute(
            r#"UPDATE connections SET labels = '{"env":"b"}', state = 7 WHERE id = ?1"#,
            [&ids[0]],
        )
        .unwrap();
        crate::store::counts_tests::assert_counts_kept(&conn);
        // Version 7 rebuilds the table: the counts stand, and its triggers
        // keep them again.
        migrate_to(&mut conn, 7).unwrap();
        crate::store::counts_tests::assert_counts_kept(&conn);
        let changed = conn
            .execute(
                r#"UPDATE connections SET labels = '{"env":"c"}', state = 2 WHERE id = ?1"#,
                [ConnectionId::parse(&ids[1], "id").unwrap()],
            )
            .unwrap();
        assert_eq!(changed, 1);
        crate::store::counts_tests::assert_counts_kept(&conn);
        // Version 8 hands them to the writer: they stand, and no trigger is
        // left to change them behind its back.
        migrate(&mut conn).unwrap();
        crate::store::counts_tests::assert_counts_kept(&conn);
        let triggers: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = 'connections'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(triggers, 0);
    }

    #[test]
    fn identities_derived_by_the_old_rule_are_derived_again_once() {
        let (_dir, mut conn) = version_2();
        let old = |url: &str| format!("tcp:{url}");
        // Two spellings of one url: the older connection gets the identity.
        let a = insert(
            &conn,
            "tcp://a:1/",
            &old("tcp://a:1/"),
            State::Registered,
            1,
        );
        let b = insert(
            &conn,
            "tcp://a:1?",
            &old("tcp://a:1?"),
            State::Discovered,
            2,
        );
        // A newer connection stored under the new rule already holds it.
        let c = insert(&conn, "tcp://c:1/", &old("tcp://c:1/"), State::Connected, 3);
        let d = insert(&conn, "tcp://c:1", &old("tcp://c:1"), State::Discovered, 4);
        // Left alone: an identity a client chose, a tombstone, no url.
        let e = insert(&conn, "tcp://e:1/", "chosen", State::Discovered, 5);
        let f = insert(&conn, "tcp://f:1/", &old("tcp://f:1/"), State::Deleted, 6);
        let g = insert(&conn, "", "", State::Discovered, 7);
        let plain = insert(
            &conn,
            "tcp://p:1#top",
            &old("tcp://p:1#top"),
            State::Ignored,
            8,
        );
        // An event of an older tether, with its metadata inline.
        let stored = conn
            .query_row(
                &format!(
                    "SELECT unhex(replace(id, '-', '')), {} FROM connections WHERE id = ?1",
                    query::CONNECTION_COLUMNS.trim_start_matches("id, ")
                ),
                [&a],
                |r| query::connection_at(r, 0),
            )
            .unwrap();
        conn.execute(
            "INSERT INTO events (revision, connection_id, type, from_state, to_state, trigger, \
             reason, actor, time, snapshot) VALUES (1, ?1, 1, 1, 1, 1, '', 't', 1, ?2)",
            params![
                a,
                crate::store::codec::encode_connection(&stored, true).unwrap()
            ],
        )
        .unwrap();
        conn.execute("UPDATE meta SET value = 8 WHERE key = 'revision'", [])
            .unwrap();
        let before: Vec<(String, i64)> = conn
            .prepare("SELECT id, revision FROM connections ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();

        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, VERSION);
        assert_eq!(identity(&conn, &a), "tcp:tcp://a:1");
        assert_eq!(identity(&conn, &b), old("tcp://a:1?"), "a, older, has it");
        assert_eq!(identity(&conn, &c), old("tcp://c:1/"), "d already holds it");
        assert_eq!(identity(&conn, &d), "tcp:tcp://c:1");
        assert_eq!(identity(&conn, &e), "chosen");
        assert_eq!(identity(&conn, &f), old("tcp://f:1/"));
        assert_eq!(identity(&conn, &g), g);
        assert_eq!(identity(&conn, &plain), "tcp:tcp://p:1");

        // No revision, no event: only the identity changed.
        let after: Vec<(String, i64)> = conn
            .prepare("SELECT id, revision FROM connections ORDER BY id")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get::<_, ConnectionId>(0)?.to_string(), r.get(1)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(after, before);
        let events = query::events(
            &conn,
            &query::EventFilter {
                connection_id: None,
                after_revision: crate::connection::Revision::ZERO,
                limit: 10,
                owners: None,
                max_bytes: usize::MAX,
            },
        )
        .unwrap();
        assert_eq!(events.len(), 1);
        // The older event keeps its metadata inline, and reads back whole.
        assert_eq!(events[0].connection.metadata, stored.metadata);

        // Run once: b's old-style identity is not looked at again, even once
        // the identity it would take is free.
        conn.execute(
            "UPDATE connections SET state = 7 WHERE id = ?1",
            [ConnectionId::parse(&a, "id").unwrap()],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(identity(&conn, &b), old("tcp://a:1?"));
    }

    #[test]
    fn version_7_keeps_every_row_with_binary_ids_in_creation_order() {
        let (_dir, mut conn) = version_2();
        migrate_to(&mut conn, 6).unwrap();
        // Three connections made at one time, stored out of id order, and
        // one made earlier but stored last.
        let mut ids: Vec<String> = (0..4)
            .map(|_| ConnectionId::generate().to_string())
            .collect();
        ids.sort();
        // And 500 made later, for a file worth rewriting.
        let later: Vec<String> = (0..500)
            .map(|_| ConnectionId::generate().to_string())
            .collect();
        let made = [(&ids[2], 5), (&ids[0], 5), (&ids[1], 5), (&ids[3], 1)]
            .into_iter()
            .chain(later.iter().map(|id| (id, 9)));
        for (id, at) in made {
            conn.execute(
                "INSERT INTO connections (id, kind, type, sub_type, name, description, url, \
                 identity, metadata, labels, managed, credential_id, owner, state, state_reason, \
                 state_trigger, state_time, revision, create_time, update_time, last_probe) \
                 VALUES (?1, 'tcp', '', '', 'n', '', '', ?1, '{}', '{\"env\":\"a\"}', 0, '', \
                 'o', 1, '', 1, ?2, 1, ?2, ?2, NULL)",
                params![id, at],
            )
            .unwrap();
        }
        // A blob named by an event and a stored answer: two references.
        conn.execute(
            "INSERT INTO blobs (hash, refs, body) VALUES (x'01', 0, '{\"tag\":\"b\"}')",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO events (revision, connection_id, type, from_state, to_state, trigger, \
             reason, actor, time, snapshot, metadata_blob) \
             VALUES (1, ?1, 1, 1, 1, 1, 'r', 't', 1, '', x'01')",
            [&ids[0]],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO requests (request_id, fingerprint, connection_id, answer, time, \
             metadata_blob) VALUES ('q', 1, ?1, '{}', 1, x'01')",
            [&ids[0]],
        )
        .unwrap();
        conn.execute("UPDATE meta SET value = 1 WHERE key = 'revision'", [])
            .unwrap();

        migrate(&mut conn).unwrap();
        let in_order: Vec<String> = conn
            .prepare("SELECT id FROM connections ORDER BY seq LIMIT 4")
            .unwrap()
            .query_map([], |r| Ok(r.get::<_, ConnectionId>(0)?.to_string()))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            in_order,
            [&ids[3], &ids[0], &ids[1], &ids[2]].map(String::as_str)
        );
        assert_eq!(query::last_create_time(&conn).unwrap(), 9);
        let text_ids: i64 = conn
            .query_row(
                "SELECT (SELECT count(*) FROM connections WHERE typeof(id) <> 'blob') \
                 + (SELECT count(*) FROM events WHERE typeof(connection_id) <> 'blob') \
                 + (SELECT count(*) FROM requests WHERE typeof(connection_id) <> 'blob')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(text_ids, 0);
        // The event reads back, joined to its row by the id's bytes.
        let first = ConnectionId::parse(&ids[0], "id").unwrap();
        let events = query::events(
            &conn,
            &query::EventFilter {
                connection_id: Some(first.clone()),
                after_revision: crate::connection::Revision::ZERO,
                limit: 10,
                owners: None,
                max_bytes: usize::MAX,
            },
        )
        .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].connection.id, first);
        // The references stand, and the triggers count them again.
        let refs = |conn: &Connection| -> i64 {
            conn.query_row("SELECT refs FROM blobs WHERE hash = x'01'", [], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert_eq!(refs(&conn), 2);
        conn.execute("DELETE FROM requests", []).unwrap();
        assert_eq!(refs(&conn), 1);
        crate::store::counts_tests::assert_counts_kept(&conn);
        let dropped: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE name IN \
                 ('connections_by_create', 'events_by_time', 'connections_7', 'events_7', 'requests_7')",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(dropped.is_empty(), "{dropped:?}");
        // The pages of the tables it copied were given back.
        let free: i64 = conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap();
        assert_eq!(free, 0);
        // An id that is not 16 bytes is refused.
        let wrong = conn.execute("UPDATE connections SET id = x'00' WHERE seq = 1", []);
        assert!(wrong.is_err());
    }
}
