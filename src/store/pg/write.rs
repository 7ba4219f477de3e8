//! PostgreSQL's versions of the writes a writer job makes (what
//! `store::writer::Tx` does in SQLite): a connection's row, inserted or
//! updated column by column ([`changed_columns`], shared with SQLite), its
//! event, the snapshot frozen into the previous event, metadata kept once
//! as a blob, stored answers, probe results, credentials and the key check,
//! and the scrub of a deleted connection's stored copies.
//!
//! The rows mean what SQLite's do, and the JSON inside them is the same
//! (`store::codec`); the schema's triggers keep the counts and the blob
//! references.

use super::Statements;
use super::error;
use crate::connection::{Connection, ConnectionId, Event, ProbeResult};
use crate::error::Error;
use crate::store::codec;
use crate::store::query::StoredCredential;
use crate::store::writer::{Column, blob_hash, changed_columns};
use postgres::types::ToSql;

fn uuid(id: &ConnectionId) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

/// Inserts a new connection's row.
pub(crate) fn insert_row(tx: &mut impl Statements, conn: &Connection) -> Result<(), Error> {
    let last_probe = conn
        .last_probe
        .as_ref()
        .map(codec::encode_probe)
        .transpose()?;
    tx.execute(
        "INSERT INTO connections (id, kind, type, sub_type, name, description, url, identity, \
         metadata, labels, managed, credential_id, owner, state, state_reason, state_trigger, \
         state_time, revision, create_time, update_time, last_probe) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
         $19, $20, $21)",
        &[
            &uuid(&conn.id),
            &conn.kind,
            &conn.type_,
            &conn.sub_type,
            &conn.name,
            &conn.description,
            &conn.url,
            &conn.identity,
            &codec::encode_metadata(&conn.metadata)?,
            &codec::encode_labels(&conn.labels)?,
            &conn.managed,
            &conn.credential_id,
            &conn.owner,
            &conn.state.number(),
            &conn.state_reason,
            &conn.state_trigger.number(),
            &conn.state_time,
            &conn.revision.get(),
            &conn.create_time,
            &conn.update_time,
            &last_probe,
        ],
    )
    .map_err(error)?;
    Ok(())
}

/// Writes the columns of `conn` that differ from `before`, and only those.
pub(crate) fn update_row(
    tx: &mut impl Statements,
    before: &Connection,
    conn: &Connection,
) -> Result<(), Error> {
    let set = changed_columns(before, conn)?;
    let assignments: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, (name, _))| format!("{name} = ${}", i + 2))
        .collect();
    let sql = format!(
        "UPDATE connections SET {} WHERE id = $1",
        assignments.join(", ")
    );
    let id = uuid(&conn.id);
    let mut values: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(set.len() + 1);
    values.push(&id);
    values.extend(set.iter().map(|(_, v)| match v {
        Column::Text(t) => t as &(dyn ToSql + Sync),
        Column::Int(i) => i,
        Column::Small(i) => i,
        Column::Bool(b) => b,
        Column::Json(j) => j,
    }));
    let changed = tx.execute(&sql, &values).map_err(error)?;
    if changed != 1 {
        return Err(Error::Internal(format!(
            "connection {} row not written",
            conn.id
        )));
    }
    Ok(())
}

/// Records `event`, the latest of its connection: its snapshot is the row.
pub(crate) fn insert_event(tx: &mut impl Statements, event: &Event) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO events (revision, connection_id, type, from_state, to_state, trigger, \
         reason, actor, time, snapshot, metadata_blob) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '', NULL)",
        &[
            &event.revision.get(),
            &uuid(&event.connection_id),
            &event.type_.number(),
            &event.from_state.number(),
            &event.to_state.number(),
            &event.trigger.number(),
            &event.reason,
            &event.actor,
            &event.time,
        ],
    )
    .map_err(error)?;
    Ok(())
}

/// Gives the connection's latest event the row as it was before this
/// change (`before`) as its own snapshot; one that has its own is left.
pub(crate) fn freeze_snapshot(tx: &mut impl Statements, before: &Connection) -> Result<(), Error> {
    let metadata = codec::encode_metadata(&before.metadata)?;
    let revision = before.revision.get();
    if blob_hash(&metadata).is_some() {
        // A blob is stored only for an event that will name it.
        let open = tx
            .query_opt(
                "SELECT 1 FROM events WHERE revision = $1 AND snapshot = ''",
                &[&revision],
            )
            .map_err(error)?;
        if open.is_none() {
            return Ok(());
        }
    }
    let blob = put_blob(tx, &metadata)?;
    let snapshot = codec::encode_connection(before, blob.is_none())?;
    tx.execute(
        "UPDATE events SET snapshot = $2, metadata_blob = $3 \
         WHERE revision = $1 AND snapshot = ''",
        &[&revision, &snapshot, &blob.as_ref().map(|h| &h[..])],
    )
    .map_err(error)?;
    Ok(())
}

/// Stores `metadata` (as JSON) once, as a blob, when it is large enough;
/// its hash then. The row that names it counts as a reference.
pub(crate) fn put_blob(
    tx: &mut impl Statements,
    metadata: &str,
) -> Result<Option<[u8; 32]>, Error> {
    let Some(hash) = blob_hash(metadata) else {
        return Ok(None);
    };
    tx.execute(
        "INSERT INTO blobs (hash, refs, body) VALUES ($1, 0, $2) ON CONFLICT (hash) DO NOTHING",
        &[&&hash[..], &metadata],
    )
    .map_err(error)?;
    Ok(Some(hash))
}

/// Stores the answer to `request_id`, which concerns `connection`.
pub(crate) fn remember(
    tx: &mut impl Statements,
    request_id: &str,
    fingerprint: i64,
    connection: &ConnectionId,
    answer: &Result<Connection, Error>,
    now: i64,
) -> Result<(), Error> {
    let blob = match answer {
        Ok(c) => put_blob(tx, &codec::encode_metadata(&c.metadata)?)?,
        Err(_) => None,
    };
    let json = codec::encode_answer(answer, blob.is_none())?;
    tx.execute(
        "INSERT INTO requests (request_id, fingerprint, connection_id, answer, time, metadata_blob) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &request_id,
            &fingerprint,
            &uuid(connection),
            &json,
            &now,
            &blob.as_ref().map(|h| &h[..]),
        ],
    )
    .map_err(error)?;
    Ok(())
}

/// Keeps a check's result on the connection without a new revision or event.
pub(crate) fn set_probe(
    tx: &mut impl Statements,
    id: &ConnectionId,
    probe: &ProbeResult,
) -> Result<(), Error> {
    tx.execute(
        "UPDATE connections SET last_probe = $2 WHERE id = $1",
        &[&uuid(id), &codec::encode_probe(probe)?],
    )
    .map_err(error)?;
    Ok(())
}

/// Records the sealed key check (once per database).
pub(crate) fn set_key_check(
    tx: &mut impl Statements,
    nonce: &[u8],
    sealed: &[u8],
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO key_check (id, nonce, sealed) VALUES (1, $1, $2)",
        &[&nonce, &sealed],
    )
    .map_err(error)?;
    Ok(())
}

pub(crate) fn insert_credential(
    tx: &mut impl Statements,
    c: &StoredCredential,
    now: i64,
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO credentials (id, name, type, owner, nonce, sealed, create_time, allowed_hosts) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &c.id,
            &c.name,
            &c.type_,
            &c.owner,
            &c.nonce,
            &c.sealed,
            &now,
            &codec::encode_hosts(&c.allowed_hosts)?,
        ],
    )
    .map_err(error)?;
    Ok(())
}

/// Deletes a credential; whether it existed.
pub(crate) fn delete_credential(tx: &mut impl Statements, id: &str) -> Result<bool, Error> {
    Ok(tx
        .execute("DELETE FROM credentials WHERE id = $1", &[&id])
        .map_err(error)?
        == 1)
}

/// Removes a deleted connection's credential, description, metadata and
/// labels from its earlier event snapshots and stored answers (and their
/// blob references).
pub(crate) fn scrub(tx: &mut impl Statements, id: &ConnectionId) -> Result<(), Error> {
    let patch = codec::scrub_patch();
    let id = uuid(id);
    tx.execute(
        "UPDATE events SET snapshot = (snapshot::jsonb || $2::text::jsonb)::text, metadata_blob = NULL \
         WHERE connection_id = $1 AND snapshot <> ''",
        &[&id, &patch],
    )
    .map_err(error)?;
    let ok = &codec::ANSWER_CONNECTION[2..];
    tx.execute(
        "UPDATE requests SET answer = jsonb_set(answer::jsonb, ARRAY[$3::text], \
         (answer::jsonb -> $3) || $2::text::jsonb)::text, metadata_blob = NULL \
         WHERE connection_id = $1 AND answer::jsonb ? $3",
        &[&id, &patch, &ok],
    )
    .map_err(error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::{EventType, Revision};
    use crate::lifecycle::{State, Trigger};
    use crate::store::pg::cluster::Cluster;
    use std::collections::BTreeMap;

    fn database() -> postgres::Client {
        let mut client = super::super::connect(&Cluster::shared().database()).unwrap();
        super::super::schema::migrate(&mut client).unwrap();
        client
    }

    fn connection(metadata: serde_json::Value) -> Connection {
        Connection {
            id: ConnectionId::generate(),
            kind: "tcp".into(),
            type_: "generic".into(),
            sub_type: "tcp".into(),
            name: "n".into(),
            description: "d".into(),
            url: "tcp://a:1".into(),
            identity: "tcp:tcp://a:1".into(),
            metadata: metadata.as_object().unwrap().clone(),
            labels: BTreeMap::from([("env".into(), "prod".into())]),
            managed: true,
            credential_id: "cred".into(),
            owner: "o".into(),
            state: State::Discovered,
            state_reason: "r".into(),
            state_trigger: Trigger::User,
            state_time: 1,
            revision: Revision::new(1),
            create_time: 1,
            update_time: 1,
            last_probe: None,
        }
    }

    fn event(c: &Connection) -> Event {
        Event {
            revision: c.revision,
            connection_id: c.id.clone(),
            type_: EventType::Created,
            from_state: State::Discovered,
            to_state: c.state,
            trigger: Trigger::User,
            reason: "why".into(),
            actor: "me".into(),
            time: c.update_time,
            connection: c.clone(),
            cache: Default::default(),
        }
    }

    fn text(client: &mut impl super::Statements, sql: &str) -> Vec<String> {
        client
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    }

    /// A row inserted, changed column by column, with its events and the
    /// snapshot frozen into the earlier one; large metadata kept once.
    #[test]
    fn rows_events_and_snapshots_are_written_as_sqlite_writes_them() {
        let mut client = database();
        let big = serde_json::json!({"big": "m".repeat(1000)});
        let mut c = connection(big.clone());
        let mut tx = client.transaction().unwrap();
        insert_row(&mut tx, &c).unwrap();
        insert_event(&mut tx, &event(&c)).unwrap();
        let before = c.clone();
        c.revision = Revision::new(2);
        c.state = State::Registered;
        c.name = "renamed".into();
        c.last_probe = Some(ProbeResult {
            time: 5,
            outcome: crate::connection::ProbeOutcome::Reachable,
            latency_ms: 3,
            message: "ok".into(),
            consecutive_failures: 0,
        });
        update_row(&mut tx, &before, &c).unwrap();
        freeze_snapshot(&mut tx, &before).unwrap();
        insert_event(&mut tx, &event(&c)).unwrap();
        assert_eq!(super::super::query::last_create_time(&mut tx).unwrap(), 1);
        tx.commit().unwrap();

        let row = client
            .query_one(
                "SELECT name, state, revision, last_probe IS NOT NULL, managed FROM connections",
                &[],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "renamed");
        assert_eq!(row.get::<_, i32>(1), State::Registered.number());
        assert_eq!(row.get::<_, i64>(2), 2);
        assert!(row.get::<_, bool>(3) && row.get::<_, bool>(4));
        // The first event holds the row as it was, its metadata as a blob;
        // the latest holds nothing of its own.
        let first = client
            .query_one(
                "SELECT snapshot, metadata_blob IS NOT NULL FROM events WHERE revision = 1",
                &[],
            )
            .unwrap();
        let frozen = codec::decode_connection(&first.get::<_, String>(0)).unwrap();
        assert_eq!((frozen.name.as_str(), frozen.revision.get()), ("n", 1));
        assert!(frozen.metadata.is_empty(), "left out: it is a blob");
        assert!(first.get::<_, bool>(1));
        assert_eq!(
            text(
                &mut client,
                "SELECT snapshot FROM events WHERE revision = 2"
            ),
            [""]
        );
        assert_eq!(
            text(
                &mut client,
                "SELECT concat(refs, ' ', length(body)) FROM blobs"
            ),
            [format!("1 {}", big.to_string().len())]
        );
        // The counts follow the state change.
        assert_eq!(
            text(
                &mut client,
                "SELECT concat(kind, ' ', state, ' ', n) FROM connection_counts"
            ),
            [format!("tcp {} 1", State::Registered.number())]
        );
    }

    /// Stored answers and snapshots of a deleted connection lose what the
    /// deletion removes, and their blob references with it.
    #[test]
    fn a_scrub_clears_snapshots_and_answers_and_their_blobs() {
        let mut client = database();
        let c = connection(serde_json::json!({"big": "m".repeat(1000)}));
        let other = connection(serde_json::json!({"small": 1}));
        let mut tx = client.transaction().unwrap();
        insert_row(&mut tx, &c).unwrap();
        insert_event(&mut tx, &event(&c)).unwrap();
        let mut later = c.clone();
        later.revision = Revision::new(2);
        later.state = State::Deleted;
        update_row(&mut tx, &c, &later).unwrap();
        freeze_snapshot(&mut tx, &c).unwrap();
        insert_event(&mut tx, &event(&later)).unwrap();
        remember(&mut tx, "req-1", 7, &c.id, &Ok(c.clone()), 1).unwrap();
        remember(&mut tx, "req-2", 7, &other.id, &Ok(other.clone()), 1).unwrap();
        remember(
            &mut tx,
            "req-3",
            7,
            &c.id,
            &Err(Error::invalid("x", "no")),
            1,
        )
        .unwrap();
        assert_eq!(text(&mut tx, "SELECT refs::text FROM blobs"), ["2"]);
        scrub(&mut tx, &c.id).unwrap();
        tx.commit().unwrap();

        let snapshot = text(
            &mut client,
            "SELECT snapshot FROM events WHERE revision = 1",
        );
        let scrubbed = codec::decode_connection(&snapshot[0]).unwrap();
        assert_eq!(
            (
                scrubbed.credential_id.as_str(),
                scrubbed.description.as_str()
            ),
            ("", "")
        );
        assert!(scrubbed.metadata.is_empty() && scrubbed.labels.is_empty());
        assert_eq!(scrubbed.name, "n", "the rest stays");
        let answer = text(
            &mut client,
            "SELECT answer FROM requests WHERE request_id = 'req-1'",
        );
        let Ok(answered) = codec::decode_answer(&answer[0]).unwrap() else {
            panic!("an Ok answer");
        };
        assert!(answered.labels.is_empty() && answered.credential_id.is_empty());
        let kept = text(
            &mut client,
            "SELECT answer FROM requests WHERE request_id = 'req-2'",
        );
        assert_eq!(
            codec::decode_answer(&kept[0])
                .unwrap()
                .unwrap()
                .labels
                .len(),
            1
        );
        let refused = text(
            &mut client,
            "SELECT answer FROM requests WHERE request_id = 'req-3'",
        );
        assert!(codec::decode_answer(&refused[0]).unwrap().is_err());
        assert!(
            text(&mut client, "SELECT refs::text FROM blobs").is_empty(),
            "the blob went with its last reference"
        );
    }

    #[test]
    fn credentials_the_key_check_and_probes_are_written() {
        let mut client = database();
        let c = connection(serde_json::json!({}));
        let mut tx = client.transaction().unwrap();
        insert_row(&mut tx, &c).unwrap();
        let probe = ProbeResult {
            time: 9,
            outcome: crate::connection::ProbeOutcome::Unreachable,
            latency_ms: 0,
            message: "refused".into(),
            consecutive_failures: 2,
        };
        set_probe(&mut tx, &c.id, &probe).unwrap();
        set_key_check(&mut tx, b"n", b"s").unwrap();
        // In a savepoint: a failed statement aborts PostgreSQL's transaction.
        let mut again = tx.transaction().unwrap();
        assert!(set_key_check(&mut again, b"n", b"s").is_err(), "once");
        drop(again);
        tx.commit().unwrap();
        let mut tx = client.transaction().unwrap();
        let credential = StoredCredential {
            id: "cred".into(),
            name: "c".into(),
            type_: "tcp".into(),
            owner: "o".into(),
            nonce: vec![1],
            sealed: vec![2],
            create_time: 0,
            allowed_hosts: vec!["a.example".into()],
        };
        insert_credential(&mut tx, &credential, 42).unwrap();
        tx.commit().unwrap();
        assert_eq!(
            text(
                &mut client,
                "SELECT concat(create_time, ' ', allowed_hosts) FROM credentials"
            ),
            [r#"42 ["a.example"]"#]
        );
        let stored = text(&mut client, "SELECT last_probe FROM connections");
        assert_eq!(codec::decode_probe(&stored[0]).unwrap(), probe);
        let mut tx = client.transaction().unwrap();
        assert!(delete_credential(&mut tx, "cred").unwrap());
        assert!(!delete_credential(&mut tx, "cred").unwrap());
        tx.commit().unwrap();
    }
}
