//! Reads: single rows, filtered keyset pages, counts, event history and the
//! watch snapshot. Every function runs on a connection or transaction it is
//! given, so callers choose the snapshot.

use super::codec;
use crate::connection::Revision;
use crate::connection::{Connection, ConnectionId, Event, EventType, Micros};
use crate::error::Error;
use crate::lifecycle::{self, State, Trigger};
use rusqlite::types::Value;
use rusqlite::{OptionalExtension, Row, params, params_from_iter};
use std::collections::BTreeMap;

const CONNECTION_COLUMNS: &str = "id, kind, type, sub_type, name, description, url, identity, \
     metadata, labels, managed, credential_id, owner, state, state_reason, state_trigger, \
     state_time, revision, create_time, update_time, last_probe";

fn connection_from_row(r: &Row<'_>) -> rusqlite::Result<Connection> {
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Integer,
            format!("bad {what}").into(),
        )
    };
    let metadata: String = r.get(8)?;
    let labels: String = r.get(9)?;
    Ok(Connection {
        id: ConnectionId::from_trusted(r.get(0)?),
        kind: r.get(1)?,
        type_: r.get(2)?,
        sub_type: r.get(3)?,
        name: r.get(4)?,
        description: r.get(5)?,
        url: r.get(6)?,
        identity: r.get(7)?,
        metadata: codec::decode_metadata(&metadata).map_err(|_| bad(8, "metadata"))?,
        labels: codec::decode_labels(&labels).map_err(|_| bad(9, "labels"))?,
        managed: r.get(10)?,
        credential_id: r.get(11)?,
        owner: r.get(12)?,
        state: State::from_number(r.get(13)?).ok_or_else(|| bad(13, "state"))?,
        state_reason: r.get(14)?,
        state_trigger: Trigger::from_number(r.get(15)?).ok_or_else(|| bad(15, "trigger"))?,
        state_time: r.get(16)?,
        revision: r.get(17)?,
        create_time: r.get(18)?,
        update_time: r.get(19)?,
        last_probe: r
            .get::<_, Option<String>>(20)?
            .map(|p| codec::decode_probe(&p))
            .transpose()
            .map_err(|_| bad(20, "last_probe"))?,
    })
}

/// The state numbers of tombstones ([`lifecycle::is_tombstone`]), for SQL:
/// a connection in one is not live.
fn tombstones() -> String {
    State::ALL
        .into_iter()
        .filter(|s| lifecycle::is_tombstone(*s))
        .map(|s| s.number().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The store-wide revision and the compaction mark (events at or below it are gone).
pub(crate) fn revisions(c: &rusqlite::Connection) -> Result<(Revision, Revision), Error> {
    let mut stmt = c.prepare_cached(
        "SELECT (SELECT value FROM meta WHERE key = 'revision'), \
                (SELECT value FROM meta WHERE key = 'compact_revision')",
    )?;
    Ok(stmt.query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

pub(crate) fn get(
    c: &rusqlite::Connection,
    id: &ConnectionId,
) -> Result<Option<Connection>, Error> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections WHERE id = ?1"
    ))?;
    Ok(stmt
        .query_row([id.as_str()], connection_from_row)
        .optional()?)
}

pub(crate) fn live_by_identity(
    c: &rusqlite::Connection,
    identity: &str,
) -> Result<Option<Connection>, Error> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections WHERE identity = ?1 AND state NOT IN ({})",
        tombstones()
    ))?;
    Ok(stmt.query_row([identity], connection_from_row).optional()?)
}

/// A stored `request_id` answer: the fingerprint of its request, and what it answered.
pub(crate) type StoredAnswer = (i64, Result<Connection, Error>);

/// The stored answer to `request_id`.
pub(crate) fn request_answer(
    c: &rusqlite::Connection,
    request_id: &str,
) -> Result<Option<StoredAnswer>, Error> {
    let mut stmt = c.prepare_cached(
        "SELECT fingerprint, answer, metadata_blob IS NOT NULL, \
         (SELECT body FROM blobs WHERE hash = requests.metadata_blob) \
         FROM requests WHERE request_id = ?1",
    )?;
    let Some((fingerprint, answer, named, body)) = stmt
        .query_row([request_id], |r| {
            Ok((r.get(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let mut answer = codec::decode_answer(&answer)?;
    if let Ok(conn) = &mut answer {
        put_back_metadata(conn, named, body).map_err(|e| Error::Internal(e.to_string()))?;
    }
    Ok(Some((fingerprint, answer)))
}

/// Puts back the metadata an event snapshot or stored answer left out because
/// it names a blob (`named`) holding it (`body`).
fn put_back_metadata(
    conn: &mut Connection,
    named: bool,
    body: Option<String>,
) -> rusqlite::Result<()> {
    let bad = |what: String| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("connection {}: {what}", conn.id).into(),
        )
    };
    match (named, body) {
        (false, _) => Ok(()),
        (true, None) => Err(bad("its metadata blob is missing".into())),
        (true, Some(body)) => {
            conn.metadata = codec::decode_metadata(&body)
                .map_err(|e| bad(format!("bad metadata blob: {e}")))?;
            Ok(())
        }
    }
}

/// Which connections a list, count or watch snapshot covers.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Filter {
    pub(crate) kinds: Vec<String>,
    pub(crate) states: Vec<State>,
    pub(crate) types: Vec<String>,
    pub(crate) ids: Vec<ConnectionId>,
    /// Case-insensitive substring of name, description, url, identity or kind.
    pub(crate) search: String,
    pub(crate) labels: BTreeMap<String, String>,
    /// Include tombstones. Asking for the DELETED state includes them too.
    pub(crate) show_deleted: bool,
    /// Only connections of these owners; `None`: every owner.
    pub(crate) owners: Option<Vec<String>>,
}

impl Filter {
    /// Whether tombstones are shown: asked for, or their state is.
    fn includes_deleted(&self) -> bool {
        self.show_deleted || self.states.iter().any(|s| lifecycle::is_tombstone(*s))
    }

    fn to_sql(&self, clauses: &mut Vec<String>, args: &mut Vec<Value>) {
        fn any_of(col: &str, items: Vec<Value>, clauses: &mut Vec<String>, args: &mut Vec<Value>) {
            if items.is_empty() {
                return;
            }
            let marks = vec!["?"; items.len()].join(", ");
            clauses.push(format!("{col} IN ({marks})"));
            args.extend(items);
        }
        any_of(
            "kind",
            self.kinds.iter().cloned().map(Value::Text).collect(),
            clauses,
            args,
        );
        any_of(
            "state",
            self.states
                .iter()
                .map(|s| Value::Integer(s.number().into()))
                .collect(),
            clauses,
            args,
        );
        any_of(
            "type",
            self.types.iter().cloned().map(Value::Text).collect(),
            clauses,
            args,
        );
        any_of(
            "id",
            self.ids
                .iter()
                .map(|i| Value::Text(i.to_string()))
                .collect(),
            clauses,
            args,
        );
        if !self.includes_deleted() {
            clauses.push(format!("state NOT IN ({})", tombstones()));
        }
        if let Some(owners) = &self.owners {
            if owners.is_empty() {
                clauses.push("0".into());
            }
            any_of(
                "owner",
                owners.iter().cloned().map(Value::Text).collect(),
                clauses,
                args,
            );
        }
        if !self.search.is_empty() {
            let escaped = self
                .search
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            let cols = ["name", "description", "url", "identity", "kind"];
            let any = cols
                .iter()
                .map(|c| format!("{c} LIKE ? ESCAPE '\\'"))
                .collect::<Vec<_>>()
                .join(" OR ");
            clauses.push(format!("({any})"));
            for _ in cols {
                args.push(Value::Text(format!("%{escaped}%")));
            }
        }
        for (k, v) in &self.labels {
            // Keys are validated (letters, digits, - _ . /), so quoting is safe.
            clauses.push("json_extract(labels, ?) = ?".into());
            args.push(Value::Text(format!("$.\"{k}\"")));
            args.push(Value::Text(v.clone()));
        }
    }
}

fn where_clause(clauses: &[String]) -> String {
    if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    }
}

/// The column a list is sorted by; ties are broken by id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum OrderField {
    #[default]
    CreateTime,
    UpdateTime,
    Name,
}

/// How a list is sorted. Its wire syntax (`order_by`) is the service's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Order {
    pub(crate) field: OrderField,
    pub(crate) descending: bool,
}

impl Order {
    fn column(self) -> &'static str {
        match self.field {
            OrderField::CreateTime => "create_time",
            OrderField::UpdateTime => "update_time",
            OrderField::Name => "name",
        }
    }

    fn key_of(self, c: &Connection) -> CursorKey {
        match self.field {
            OrderField::CreateTime => CursorKey::Int(c.create_time),
            OrderField::UpdateTime => CursorKey::Int(c.update_time),
            OrderField::Name => CursorKey::Text(c.name.clone()),
        }
    }
}

/// The sort key of a row: the value of its [`Order`] column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CursorKey {
    Int(i64),
    Text(String),
}

/// Where the next page starts: the sort key and id of the last row returned.
/// Which query it belongs to, and its page-token form, are the service's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) key: CursorKey,
    pub(crate) id: String,
}

pub(crate) struct ListQuery {
    pub(crate) filter: Filter,
    pub(crate) order: Order,
    pub(crate) page_size: usize,
    pub(crate) after: Option<Cursor>,
}

pub(crate) struct Page {
    pub(crate) connections: Vec<Connection>,
    pub(crate) next: Option<Cursor>,
    /// The store revision the page was read at.
    pub(crate) revision: Revision,
}

/// One keyset page. Rows that exist throughout a paging session are returned
/// exactly once, whatever is written meanwhile.
pub(crate) fn list(c: &rusqlite::Connection, q: &ListQuery) -> Result<Page, Error> {
    let (revision, _) = revisions(c)?;
    let mut clauses = Vec::new();
    let mut args = Vec::new();
    q.filter.to_sql(&mut clauses, &mut args);
    let col = q.order.column();
    let (cmp, dir) = if q.order.descending {
        ("<", "DESC")
    } else {
        (">", "ASC")
    };
    if let Some(cur) = &q.after {
        clauses.push(format!("({col}, id) {cmp} (?, ?)"));
        args.push(match &cur.key {
            CursorKey::Int(i) => Value::Integer(*i),
            CursorKey::Text(s) => Value::Text(s.clone()),
        });
        args.push(Value::Text(cur.id.clone()));
    }
    let sql = format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections {} ORDER BY {col} {dir}, id {dir} LIMIT {}",
        where_clause(&clauses),
        q.page_size + 1
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let mut connections = stmt
        .query_map(params_from_iter(args), connection_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    let next = if connections.len() > q.page_size {
        connections.truncate(q.page_size);
        connections.last().map(|last| Cursor {
            key: q.order.key_of(last),
            id: last.id.to_string(),
        })
    } else {
        None
    };
    Ok(Page {
        connections,
        next,
        revision,
    })
}

/// Where a snapshot page ends: the sort key of its last row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotCursor {
    create_time: Micros,
    id: String,
}

/// One page of the matching connections in creation order, after `after`:
/// at most `max_rows`, and no more rows once `max_bytes` (by
/// [`Connection::approx_size`]) is reached, though always at least one. The
/// cursor to continue from comes back while more may follow.
pub(crate) fn snapshot_page(
    c: &rusqlite::Connection,
    filter: &Filter,
    after: Option<&SnapshotCursor>,
    max_rows: usize,
    max_bytes: usize,
) -> Result<(Vec<Connection>, Option<SnapshotCursor>), Error> {
    let max_rows = max_rows.max(1);
    let mut clauses = Vec::new();
    let mut args = Vec::new();
    filter.to_sql(&mut clauses, &mut args);
    if let Some(a) = after {
        clauses.push("(create_time, id) > (?, ?)".into());
        args.push(Value::Integer(a.create_time));
        args.push(Value::Text(a.id.clone()));
    }
    let sql = format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections {} ORDER BY create_time, id LIMIT {}",
        where_clause(&clauses),
        max_rows + 1
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let mut rows = stmt.query_map(params_from_iter(args), connection_from_row)?;
    let (mut page, mut bytes, mut more) = (Vec::new(), 0, false);
    for row in rows.by_ref() {
        if page.len() == max_rows || (!page.is_empty() && bytes >= max_bytes) {
            more = true;
            break;
        }
        let row = row?;
        bytes += row.approx_size();
        page.push(row);
    }
    let next = more.then(|| {
        let last = page.last().expect("a page that stops early has rows");
        SnapshotCursor {
            create_time: last.create_time,
            id: last.id.as_str().to_owned(),
        }
    });
    Ok((page, next))
}

/// Counts per state, and the revision they were read at.
pub(crate) fn count(
    c: &rusqlite::Connection,
    filter: &Filter,
) -> Result<(Vec<(State, i64)>, Revision), Error> {
    let (revision, _) = revisions(c)?;
    let mut clauses = Vec::new();
    let mut args = Vec::new();
    filter.to_sql(&mut clauses, &mut args);
    let sql = format!(
        "SELECT state, count(*) FROM connections {} GROUP BY state",
        where_clause(&clauses)
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let found: BTreeMap<i32, i64> = stmt
        .query_map(params_from_iter(args), |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let counts = State::ALL
        .into_iter()
        .filter(|s| !lifecycle::is_tombstone(*s) || filter.includes_deleted())
        .map(|s| (s, found.get(&s.number()).copied().unwrap_or(0)))
        .collect();
    Ok((counts, revision))
}

/// Which events a history page or a watch replay reads.
pub(crate) struct EventFilter {
    pub(crate) connection_id: Option<ConnectionId>,
    pub(crate) after_revision: Revision,
    pub(crate) limit: usize,
    /// Only events of connections of these owners; `None`: every owner.
    pub(crate) owners: Option<Vec<String>>,
    /// No more events once this many bytes (by [`Event::approx_size`]) are
    /// read, though always at least one.
    pub(crate) max_bytes: usize,
}

impl Filter {
    /// Whether `c` is one of the owners this filter keeps.
    pub(crate) fn owns(&self, c: &Connection) -> bool {
        self.owners.as_ref().is_none_or(|o| o.contains(&c.owner))
    }
}

/// Events above `after_revision` in revision order, at most `limit` of them.
pub(crate) fn events(c: &rusqlite::Connection, f: &EventFilter) -> Result<Vec<Event>, Error> {
    let mut sql = String::from(
        "SELECT revision, connection_id, type, from_state, to_state, trigger, reason, actor, time, snapshot, \
         metadata_blob IS NOT NULL, (SELECT body FROM blobs WHERE hash = events.metadata_blob) \
         FROM events WHERE revision > ?",
    );
    let mut args = vec![Value::Integer(f.after_revision.get())];
    if let Some(id) = &f.connection_id {
        sql.push_str(" AND connection_id = ?");
        args.push(Value::Text(id.to_string()));
    }
    if let Some(owners) = &f.owners {
        // Owners never change, so the connection's row decides for its whole history.
        let marks = vec!["?"; owners.len()].join(", ");
        sql.push_str(&format!(
            " AND connection_id IN (SELECT id FROM connections WHERE owner IN ({marks}))"
        ));
        args.extend(owners.iter().cloned().map(Value::Text));
    }
    sql.push_str(" ORDER BY revision LIMIT ?");
    args.push(Value::Integer(f.limit as i64));
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), |r| {
        let bad = |i: usize| {
            rusqlite::Error::FromSqlConversionFailure(
                i,
                rusqlite::types::Type::Integer,
                "bad enum".into(),
            )
        };
        let snapshot: String = r.get(9)?;
        let mut connection = codec::decode_connection(&snapshot).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(9, rusqlite::types::Type::Text, Box::new(e))
        })?;
        put_back_metadata(&mut connection, r.get(10)?, r.get(11)?)?;
        Ok(Event {
            revision: r.get(0)?,
            connection_id: ConnectionId::from_trusted(r.get(1)?),
            type_: EventType::from_number(r.get(2)?).ok_or_else(|| bad(2))?,
            from_state: State::from_number(r.get(3)?).ok_or_else(|| bad(3))?,
            to_state: State::from_number(r.get(4)?).ok_or_else(|| bad(4))?,
            trigger: Trigger::from_number(r.get(5)?).ok_or_else(|| bad(5))?,
            reason: r.get(6)?,
            actor: r.get(7)?,
            time: r.get(8)?,
            connection,
            cache: Default::default(),
        })
    })?;
    let (mut events, mut bytes) = (Vec::new(), 0);
    for row in rows {
        if !events.is_empty() && bytes >= f.max_bytes {
            break;
        }
        let event = row?;
        bytes += event.approx_size();
        events.push(event);
    }
    Ok(events)
}

/// A credential row: its sealed secret is only ever opened by `secrets`.
#[derive(Clone, Debug)]
pub(crate) struct StoredCredential {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) type_: String,
    pub(crate) owner: String,
    pub(crate) nonce: Vec<u8>,
    pub(crate) sealed: Vec<u8>,
    pub(crate) create_time: i64,
    /// Host patterns the secret may be sent to.
    pub(crate) allowed_hosts: Vec<String>,
}

const CREDENTIAL_COLUMNS: &str = "id, name, type, owner, nonce, sealed, create_time, allowed_hosts";

fn credential_from_row(r: &Row<'_>) -> rusqlite::Result<StoredCredential> {
    Ok(StoredCredential {
        id: r.get(0)?,
        name: r.get(1)?,
        type_: r.get(2)?,
        owner: r.get(3)?,
        nonce: r.get(4)?,
        sealed: r.get(5)?,
        create_time: r.get(6)?,
        allowed_hosts: codec::decode_hosts(&r.get::<_, String>(7)?).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(7, rusqlite::types::Type::Text, Box::new(e))
        })?,
    })
}

pub(crate) fn credential(
    c: &rusqlite::Connection,
    id: &str,
) -> Result<Option<StoredCredential>, Error> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?1"
    ))?;
    Ok(stmt.query_row([id], credential_from_row).optional()?)
}

/// Credentials of `owners` (`None`: every owner) in creation order after
/// `(create_time, id)`, at most `limit`.
pub(crate) fn credentials(
    c: &rusqlite::Connection,
    after: Option<(i64, String)>,
    limit: usize,
    owners: Option<&[String]>,
) -> Result<Vec<StoredCredential>, Error> {
    let (t, id) = after.unwrap_or((i64::MIN, String::new()));
    let owners = owners.map(serde_json::to_string).transpose()?;
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE (create_time, id) > (?1, ?2) \
         AND (?4 IS NULL OR owner IN (SELECT value FROM json_each(?4))) \
         ORDER BY create_time, id LIMIT ?3"
    ))?;
    let rows = stmt.query_map(params![t, id, limit as i64, owners], credential_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// A live connection other than `except` that refers to credential `id`.
pub(crate) fn credential_user(
    c: &rusqlite::Connection,
    id: &str,
    except: Option<&ConnectionId>,
) -> Result<Option<ConnectionId>, Error> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT id FROM connections WHERE credential_id = ?1 AND state NOT IN ({}) AND id <> ?2 \
         LIMIT 1",
        tombstones()
    ))?;
    let except = except.map(|e| e.to_string()).unwrap_or_default();
    Ok(stmt
        .query_row(params![id, except], |r| r.get::<_, String>(0))
        .optional()?
        .map(ConnectionId::from_trusted))
}

/// Every connection the monitor may have to probe: managed and in a state
/// [`lifecycle::probed`] answers yes for under some trigger.
pub(crate) fn probe_candidates(c: &rusqlite::Connection) -> Result<Vec<Connection>, Error> {
    let states = lifecycle::maybe_probed()
        .map(|s| s.number().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections WHERE managed = 1 AND state IN ({states})"
    ))?;
    let rows = stmt.query_map([], connection_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// A sealed value: (nonce, ciphertext).
pub(crate) type Sealed = (Vec<u8>, Vec<u8>);

/// The sealed key check, if the database has one.
pub(crate) fn key_check(c: &rusqlite::Connection) -> Result<Option<Sealed>, Error> {
    let mut stmt = c.prepare_cached("SELECT nonce, sealed FROM key_check WHERE id = 1")?;
    Ok(stmt
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}
