//! The PostgreSQL schema and its migrations, safe with several replicas
//! starting at once.
//!
//! The tables mean what SQLite's schema version 7 means (`store::schema`):
//! ids as 16 bytes (`uuid`), creation order as `seq`, one event per change,
//! the stored answers, credentials, blobs kept once with their reference
//! counts, and the kept counts. PostgreSQL's indexes carry no rowid, so the
//! per-state and per-kind indexes name `seq` themselves.
//!
//! `schema_version` holds how many migrations the database has had. Every
//! migration runs in one transaction that first takes a transaction-level
//! advisory lock ([`MIGRATION_LOCK`]): replicas starting at once take turns,
//! and each finds the version the one before it left. A database migrated by
//! a newer Tether is refused rather than guessed at, at start and after:
//! a migration also takes the revision row, so it commits between two writer
//! groups, and each group reads the version once it holds that row
//! (`pg::writer`), so an older replica still running writes nothing to a
//! schema it does not know ([`newer`]).

use crate::error::Error;

/// The advisory lock every migration holds until it commits.
pub(crate) const MIGRATION_LOCK: i64 = 0x7465_7468_6572_0001;

/// Each entry moves the schema one version up; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: everything SQLite's version 7 has.
    r#"
    CREATE TABLE meta (
        key   text PRIMARY KEY,
        value bigint NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('revision', 0), ('compact_revision', 0);

    CREATE TABLE connections (
        seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id            uuid NOT NULL UNIQUE,
        kind          text NOT NULL,
        type          text NOT NULL,
        sub_type      text NOT NULL,
        -- Byte order, as SQLite sorts: pages by name do not depend on the
        -- database's locale.
        name          text COLLATE "C" NOT NULL,
        description   text NOT NULL,
        url           text NOT NULL,
        identity      text NOT NULL,
        metadata      text NOT NULL,
        labels        text NOT NULL,
        managed       boolean NOT NULL,
        credential_id text NOT NULL,
        owner         text NOT NULL,
        state         integer NOT NULL,
        state_reason  text NOT NULL,
        state_trigger integer NOT NULL,
        state_time    bigint NOT NULL,
        revision      bigint NOT NULL,
        create_time   bigint NOT NULL,
        update_time   bigint NOT NULL,
        last_probe    text
    );
    -- Two live connections never share an identity; tombstones (state 7) may.
    CREATE UNIQUE INDEX connections_live_identity ON connections (identity) WHERE state <> 7;
    CREATE INDEX connections_by_update ON connections (update_time, id);
    CREATE INDEX connections_by_name ON connections (name, id);
    CREATE INDEX connections_by_state ON connections (state, seq);
    CREATE INDEX connections_by_kind ON connections (kind, seq);
    CREATE INDEX connections_by_credential ON connections (credential_id) WHERE credential_id <> '';

    -- One row per committed change; `snapshot` is the connection after it as
    -- JSON, or '' for a connection's latest event, whose snapshot is the row.
    CREATE TABLE events (
        revision      bigint PRIMARY KEY,
        connection_id uuid NOT NULL,
        type          integer NOT NULL,
        from_state    integer NOT NULL,
        to_state      integer NOT NULL,
        trigger       integer NOT NULL,
        reason        text NOT NULL,
        actor         text NOT NULL,
        time          bigint NOT NULL,
        snapshot      text NOT NULL,
        metadata_blob bytea
    );
    CREATE INDEX events_by_connection ON events (connection_id, revision);

    -- The first answer to each request_id, kept for the retention window.
    CREATE TABLE requests (
        request_id    text PRIMARY KEY,
        fingerprint   bigint NOT NULL,
        connection_id uuid NOT NULL,
        answer        text NOT NULL,
        time          bigint NOT NULL,
        metadata_blob bytea
    );
    CREATE INDEX requests_by_time ON requests (time);
    CREATE INDEX requests_by_connection ON requests (connection_id);

    -- Secrets, sealed with XChaCha20-Poly1305 under the server's key; the
    -- credential id is the associated data.
    CREATE TABLE credentials (
        id            text PRIMARY KEY,
        name          text NOT NULL,
        type          text NOT NULL,
        owner         text NOT NULL,
        nonce         bytea NOT NULL,
        sealed        bytea NOT NULL,
        create_time   bigint NOT NULL,
        allowed_hosts text NOT NULL DEFAULT '[]'
    );
    CREATE INDEX credentials_by_create ON credentials (create_time, id);
    CREATE INDEX credentials_by_owner ON credentials (owner, create_time, id);

    -- An empty object sealed with the server's key, so a wrong key is noticed at start.
    CREATE TABLE key_check (
        id     integer PRIMARY KEY CHECK (id = 1),
        nonce  bytea NOT NULL,
        sealed bytea NOT NULL
    );

    -- Large metadata stored once; `refs` counts the rows naming it.
    CREATE TABLE blobs (
        hash bytea PRIMARY KEY,
        refs bigint NOT NULL CHECK (refs >= 0),
        body text NOT NULL
    );
    CREATE FUNCTION tether_blob_refs() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'DELETE' AND NEW.metadata_blob IS NOT NULL
            AND (TG_OP = 'INSERT' OR OLD.metadata_blob IS DISTINCT FROM NEW.metadata_blob) THEN
            UPDATE blobs SET refs = refs + 1 WHERE hash = NEW.metadata_blob;
            IF NOT FOUND THEN
                RAISE EXCEPTION '%.metadata_blob names no blob', TG_TABLE_NAME;
            END IF;
        END IF;
        IF TG_OP <> 'INSERT' AND OLD.metadata_blob IS NOT NULL
            AND (TG_OP = 'DELETE' OR OLD.metadata_blob IS DISTINCT FROM NEW.metadata_blob) THEN
            UPDATE blobs SET refs = refs - 1 WHERE hash = OLD.metadata_blob;
            DELETE FROM blobs WHERE hash = OLD.metadata_blob AND refs = 0;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER events_blob_refs AFTER INSERT OR DELETE OR UPDATE OF metadata_blob ON events
        FOR EACH ROW EXECUTE FUNCTION tether_blob_refs();
    CREATE TRIGGER requests_blob_refs AFTER INSERT OR DELETE OR UPDATE OF metadata_blob ON requests
        FOR EACH ROW EXECUTE FUNCTION tether_blob_refs();

    -- Counts kept as the rows change: connections per (owner, kind, state),
    -- and the same per label (key, value). A count that falls to zero goes.
    CREATE TABLE connection_counts (
        owner text NOT NULL,
        kind  text NOT NULL,
        state integer NOT NULL,
        n     bigint NOT NULL CHECK (n >= 0),
        PRIMARY KEY (owner, kind, state)
    );
    CREATE TABLE label_counts (
        key   text NOT NULL,
        value text NOT NULL,
        owner text NOT NULL,
        kind  text NOT NULL,
        state integer NOT NULL,
        n     bigint NOT NULL CHECK (n >= 0),
        PRIMARY KEY (key, value, owner, kind, state)
    );
    CREATE INDEX label_counts_emptied ON label_counts (n) WHERE n = 0;
    CREATE FUNCTION tether_counts() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            UPDATE connection_counts SET n = n - 1
                WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state);
            DELETE FROM connection_counts
                WHERE (owner, kind, state) = (OLD.owner, OLD.kind, OLD.state) AND n = 0;
            UPDATE label_counts AS c SET n = c.n - 1
                FROM jsonb_each_text(OLD.labels::jsonb) AS l
                WHERE (c.key, c.value, c.owner, c.kind, c.state)
                    = (l.key, l.value, OLD.owner, OLD.kind, OLD.state);
            DELETE FROM label_counts WHERE n = 0;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO connection_counts (owner, kind, state, n)
                VALUES (NEW.owner, NEW.kind, NEW.state, 1)
                ON CONFLICT (owner, kind, state) DO UPDATE SET n = connection_counts.n + 1;
            INSERT INTO label_counts (key, value, owner, kind, state, n)
                SELECT l.key, l.value, NEW.owner, NEW.kind, NEW.state, 1
                FROM jsonb_each_text(NEW.labels::jsonb) AS l
                ON CONFLICT (key, value, owner, kind, state) DO UPDATE SET n = label_counts.n + 1;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER connections_count_insert_delete AFTER INSERT OR DELETE ON connections
        FOR EACH ROW EXECUTE FUNCTION tether_counts();
    CREATE TRIGGER connections_count_update AFTER UPDATE OF owner, kind, state, labels ON connections
        FOR EACH ROW
        WHEN (OLD.owner IS DISTINCT FROM NEW.owner OR OLD.kind IS DISTINCT FROM NEW.kind
            OR OLD.state IS DISTINCT FROM NEW.state OR OLD.labels IS DISTINCT FROM NEW.labels)
        EXECUTE FUNCTION tether_counts();
    "#,
];

/// The schema version this build writes.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to [`VERSION`], or refuses one that is newer.
/// Several replicas may call it at once: they take turns.
pub(crate) fn migrate(client: &mut postgres::Client) -> Result<(), Error> {
    loop {
        let mut tx = client.transaction().map_err(super::error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(super::error)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version bigint NOT NULL)")
            .map_err(super::error)?;
        let current: i64 = tx
            .query_opt("SELECT version FROM schema_version", &[])
            .map_err(super::error)?
            .map_or(0, |r| r.get(0));
        if current > VERSION {
            return Err(Error::Internal(format!(
                "the database has schema version {current}, newer than this tether understands \
                 ({VERSION}); run a newer tether or restore a backup"
            )));
        }
        let Some(step) = MIGRATIONS.get(current as usize) else {
            return Ok(());
        };
        if current > 0 {
            // Between two writer groups of the replicas already serving.
            tx.batch_execute("UPDATE meta SET value = value WHERE key = 'revision'")
                .map_err(super::error)?;
        }
        tx.batch_execute(step).map_err(super::error)?;
        let next = current + 1;
        if current == 0 {
            tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&next])
        } else {
            tx.execute("UPDATE schema_version SET version = $1", &[&next])
        }
        .map_err(super::error)?;
        tx.commit().map_err(super::error)?;
        tracing::info!(version = next, "migrated database schema");
    }
}

/// The refusal of an older replica whose database a newer one has migrated
/// to `version` while it serves.
pub(crate) fn newer(version: i64) -> Error {
    Error::StorageUnavailable(format!(
        "the database has schema version {version}, newer than this tether understands \
         ({VERSION}): a newer replica has upgraded it; replace this replica with a newer one"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pg::cluster::Cluster;

    fn version(client: &mut postgres::Client) -> i64 {
        client
            .query_one("SELECT version FROM schema_version", &[])
            .unwrap()
            .get(0)
    }

    #[test]
    fn replicas_starting_at_once_migrate_once_and_agree() {
        let cluster = Cluster::shared();
        let url = cluster.database();
        let started = std::sync::Barrier::new(3);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let mut client = super::super::connect(&url).unwrap();
                        started.wait();
                        migrate(&mut client)
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap().unwrap();
            }
        });
        let mut client = super::super::connect(&url).unwrap();
        assert_eq!(version(&mut client), VERSION);
        let rows: i64 = client
            .query_one("SELECT count(*) FROM schema_version", &[])
            .unwrap()
            .get(0);
        assert_eq!(rows, 1);
        // Again: nothing to do.
        migrate(&mut client).unwrap();
        assert_eq!(version(&mut client), VERSION);
    }

    #[test]
    fn a_database_migrated_by_a_newer_tether_is_refused() {
        let cluster = Cluster::shared();
        let mut client = super::super::connect(&cluster.database()).unwrap();
        migrate(&mut client).unwrap();
        client
            .execute("UPDATE schema_version SET version = $1", &[&(VERSION + 1)])
            .unwrap();
        let refused = migrate(&mut client).unwrap_err().to_string();
        assert!(refused.contains("newer than this tether"), "{refused}");
    }

    /// The triggers keep the counts and the blob references, as SQLite's do.
    #[test]
    fn the_triggers_keep_counts_and_blob_references() {
        let cluster = Cluster::shared();
        let mut client = super::super::connect(&cluster.database()).unwrap();
        migrate(&mut client).unwrap();
        let insert = "INSERT INTO connections (id, kind, type, sub_type, name, description, url, \
             identity, metadata, labels, managed, credential_id, owner, state, state_reason, \
             state_trigger, state_time, revision, create_time, update_time) \
             VALUES (gen_random_uuid(), $1, '', '', 'n', '', '', gen_random_uuid()::text, '{}', \
             $2, false, '', 'o', $3, '', 1, 1, 1, 1, 1)";
        for (kind, labels, state) in [
            ("tcp", r#"{"env":"a"}"#, 1),
            ("tcp", r#"{"env":"a","team":"x"}"#, 1),
            ("http", r#"{"env":"b"}"#, 2),
        ] {
            client.execute(insert, &[&kind, &labels, &state]).unwrap();
        }
        client
            .execute(
                r#"UPDATE connections SET state = 2, labels = '{"env":"b"}' WHERE labels = '{"env":"a","team":"x"}'"#,
                &[],
            )
            .unwrap();
        let counts = |client: &mut postgres::Client, sql: &str| -> Vec<String> {
            client
                .query(sql, &[])
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect()
        };
        let kept = "SELECT concat_ws(' ', owner, kind, state, n) FROM connection_counts ORDER BY 1";
        let scanned = "SELECT concat_ws(' ', owner, kind, state, count(*)) FROM connections \
                       GROUP BY owner, kind, state ORDER BY 1";
        assert_eq!(counts(&mut client, kept), counts(&mut client, scanned));
        let kept_labels =
            "SELECT concat_ws(' ', key, value, kind, state, n) FROM label_counts ORDER BY 1";
        let scanned_labels = "SELECT concat_ws(' ', l.key, l.value, kind, state, count(*)) \
             FROM connections, jsonb_each_text(labels::jsonb) AS l \
             GROUP BY l.key, l.value, kind, state ORDER BY 1";
        assert_eq!(
            counts(&mut client, kept_labels),
            counts(&mut client, scanned_labels)
        );
        assert_eq!(
            counts(&mut client, kept_labels),
            ["env a tcp 1 1", "env b http 2 1", "env b tcp 2 1"]
        );
        client.execute("DELETE FROM connections", &[]).unwrap();
        assert!(counts(&mut client, kept).is_empty());
        assert!(counts(&mut client, kept_labels).is_empty());

        client
            .execute(
                "INSERT INTO blobs (hash, refs, body) VALUES ('\\x01', 0, '{}')",
                &[],
            )
            .unwrap();
        let event = "INSERT INTO events (revision, connection_id, type, from_state, to_state, \
             trigger, reason, actor, time, snapshot, metadata_blob) \
             VALUES ($1, gen_random_uuid(), 1, 1, 1, 1, '', '', 1, '', '\\x01')";
        client.execute(event, &[&1_i64]).unwrap();
        client.execute(event, &[&2_i64]).unwrap();
        let refs = |client: &mut postgres::Client| -> Option<i64> {
            client
                .query_opt("SELECT refs FROM blobs", &[])
                .unwrap()
                .map(|r| r.get(0))
        };
        assert_eq!(refs(&mut client), Some(2));
        client
            .execute("DELETE FROM events WHERE revision = 1", &[])
            .unwrap();
        assert_eq!(refs(&mut client), Some(1));
        let missing = client.execute(
            "UPDATE events SET metadata_blob = '\\x02' WHERE revision = 2",
            &[],
        );
        assert!(missing.is_err(), "a row cannot name a missing blob");
        client.execute("DELETE FROM events", &[]).unwrap();
        assert_eq!(
            refs(&mut client),
            None,
            "a blob goes with its last reference"
        );
    }
}
