//! The database schema and its migrations, run at start.
//!
//! `PRAGMA user_version` records how many migrations a database has had. A
//! database migrated by a newer Tether is refused rather than guessed at.

use crate::error::Error;
use rusqlite::Connection;

/// Each entry moves the schema one version up; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: connections, their events, the store-wide counters, idempotent requests.
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
    // 2: the hosts each credential may be sent to (a JSON array of host
    // patterns). Credentials stored before have none, so they are sent
    // nowhere until replaced.
    r#"
    ALTER TABLE credentials ADD COLUMN allowed_hosts TEXT NOT NULL DEFAULT '[]';
    CREATE INDEX credentials_by_owner ON credentials (owner, create_time, id);
    "#,
    // 3: large metadata stored once. An event snapshot or stored answer whose
    // connection has large metadata holds it as `{}` and names its blob (the
    // SHA-256 of the metadata's JSON) in `metadata_blob`; reads put it back.
    // `refs` counts the rows naming a blob, kept by these triggers on every
    // insert, delete and rewrite of those rows, and a blob goes with its last
    // reference. Rows stored before keep their metadata inline.
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
    "#,
];

/// The schema version this build writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to [`VERSION`], or refuses one that is newer.
pub fn migrate(conn: &mut Connection) -> Result<(), Error> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > VERSION {
        return Err(Error::Internal(format!(
            "the database has schema version {current}, newer than this tether understands ({VERSION}); \
             run a newer tether or restore a backup"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "migrated database schema");
    }
    Ok(())
}
