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

pub(super) const CONNECTION_COLUMNS: &str = "id, kind, type, sub_type, name, description, url, identity, \
     metadata, labels, managed, credential_id, owner, state, state_reason, state_trigger, \
     state_time, revision, create_time, update_time, last_probe";

/// How many columns [`CONNECTION_COLUMNS`] names.
pub(super) const CONNECTION_COLUMN_COUNT: usize = 21;

/// [`CONNECTION_COLUMNS`] of the table aliased `row`.
const ROW_COLUMNS: &str = "row.id, row.kind, row.type, row.sub_type, row.name, row.description, \
     row.url, row.identity, row.metadata, row.labels, row.managed, row.credential_id, row.owner, \
     row.state, row.state_reason, row.state_trigger, row.state_time, row.revision, \
     row.create_time, row.update_time, row.last_probe";

fn connection_from_row(r: &Row<'_>) -> rusqlite::Result<Connection> {
    connection_at(r, 0)
}

/// The connection whose [`CONNECTION_COLUMNS`] start at column `at` of `r`.
pub(super) fn connection_at(r: &Row<'_>, at: usize) -> rusqlite::Result<Connection> {
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Integer,
            format!("bad {what}").into(),
        )
    };
    let metadata: String = r.get(at + 8)?;
    let labels: String = r.get(at + 9)?;
    Ok(Connection {
        id: r.get(at)?,
        kind: r.get(at + 1)?,
        type_: r.get(at + 2)?,
        sub_type: r.get(at + 3)?,
        name: r.get(at + 4)?,
        description: r.get(at + 5)?,
        url: r.get(at + 6)?,
        identity: r.get(at + 7)?,
        metadata: codec::decode_metadata(&metadata).map_err(|_| bad(at + 8, "metadata"))?,
        labels: codec::decode_labels(&labels).map_err(|_| bad(at + 9, "labels"))?,
        managed: r.get(at + 10)?,
        credential_id: r.get(at + 11)?,
        owner: r.get(at + 12)?,
        state: State::from_number(r.get(at + 13)?).ok_or_else(|| bad(at + 13, "state"))?,
        state_reason: r.get(at + 14)?,
        state_trigger: Trigger::from_number(r.get(at + 15)?)
            .ok_or_else(|| bad(at + 15, "trigger"))?,
        state_time: r.get(at + 16)?,
        revision: r.get(at + 17)?,
        create_time: r.get(at + 18)?,
        update_time: r.get(at + 19)?,
        last_probe: r
            .get::<_, Option<String>>(at + 20)?
            .map(|p| codec::decode_probe(&p))
            .transpose()
            .map_err(|_| bad(at + 20, "last_probe"))?,
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

/// That a connection is live, in SQL, spelled exactly as the partial indexes
/// over live connections spell it (`state <> 7`, from the first schema):
/// SQLite uses such an index only for a query whose WHERE repeats its
/// condition, and `state NOT IN (7)` means the same but scans the table.
fn live() -> String {
    State::ALL
        .into_iter()
        .filter(|s| lifecycle::is_tombstone(*s))
        .map(|s| format!("state <> {}", s.number()))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The live connection holding an identity (the unique index over live identities).
pub(super) fn live_by_identity_sql() -> String {
    format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections WHERE identity = ?1 AND {}",
        live()
    )
}

/// A live connection other than ?2 using credential ?1 (the index over
/// connections with a credential).
pub(super) fn credential_user_sql(d: Dialect) -> String {
    let is_not = match d {
        Dialect::Sqlite => "IS NOT",
        Dialect::Postgres => "IS DISTINCT FROM",
    };
    format!(
        "SELECT id FROM connections WHERE credential_id = ?1 AND credential_id <> '' \
         AND {} AND id {is_not} ?2 LIMIT 1",
        live()
    )
}

/// The SQL a query is built in: the builders below serve both backends,
/// spelling what differs (placeholders are `?` for both: the PostgreSQL
/// side numbers them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// A condition no row meets.
    fn none(self) -> &'static str {
        match self {
            Dialect::Sqlite => "0",
            Dialect::Postgres => "false",
        }
    }
}

/// A value bound to a query built as text and a list of values, typed as
/// its column is (PostgreSQL binds each by its exact type).
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Arg {
    /// An `integer` column: a state.
    Int4(i32),
    /// A `bigint`: a time, a revision, a `seq`, a limit.
    Int8(i64),
    Text(String),
    /// A connection id: 16 bytes in SQLite, a `uuid` in PostgreSQL.
    Id(ConnectionId),
}

impl From<Arg> for Value {
    fn from(a: Arg) -> Value {
        match a {
            Arg::Int4(i) => Value::Integer(i.into()),
            Arg::Int8(i) => Value::Integer(i),
            Arg::Text(t) => Value::Text(t),
            Arg::Id(id) => Value::Blob(id.as_bytes().to_vec()),
        }
    }
}

/// Arguments as SQLite binds them.
fn values(args: Vec<Arg>) -> impl Iterator<Item = Value> {
    args.into_iter().map(Value::from)
}

/// The store-wide revision and the compaction mark.
pub(super) const REVISIONS_SQL: &str = "SELECT (SELECT value FROM meta WHERE key = 'revision'), \
     (SELECT value FROM meta WHERE key = 'compact_revision')";

/// The store-wide revision and the compaction mark (events at or below it are gone).
pub(crate) fn revisions(c: &rusqlite::Connection) -> Result<(Revision, Revision), Error> {
    let mut stmt = c.prepare_cached(REVISIONS_SQL)?;
    Ok(stmt.query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

/// The create_time of the connection made last, if any.
pub(super) const LAST_CREATE_TIME_SQL: &str =
    "SELECT create_time FROM connections ORDER BY seq DESC LIMIT 1";

/// The create_time of the connection made last (0 when there is none):
/// the latest of all, since creation order is `(create_time, id)` order.
pub(crate) fn last_create_time(c: &rusqlite::Connection) -> Result<Micros, Error> {
    Ok(c.query_row(LAST_CREATE_TIME_SQL, [], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// The connection with id ?1.
pub(super) fn get_sql() -> String {
    format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE id = ?1")
}

pub(crate) fn get(
    c: &rusqlite::Connection,
    id: &ConnectionId,
) -> Result<Option<Connection>, Error> {
    let mut stmt = c.prepare_cached(&get_sql())?;
    Ok(stmt.query_row([id], connection_from_row).optional()?)
}

pub(crate) fn live_by_identity(
    c: &rusqlite::Connection,
    identity: &str,
) -> Result<Option<Connection>, Error> {
    // Asked once per created or reported item: the text is built once.
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let mut stmt = c.prepare_cached(SQL.get_or_init(live_by_identity_sql))?;
    Ok(stmt.query_row([identity], connection_from_row).optional()?)
}

/// A stored `request_id` answer: the fingerprint of its request, and what it answered.
pub(crate) type StoredAnswer = (i64, Result<Connection, Error>);

/// The answer stored for request ?1: fingerprint, answer, whether it names
/// a metadata blob, and that blob.
pub(super) const REQUEST_ANSWER_SQL: &str = "SELECT fingerprint, answer, metadata_blob IS NOT NULL, \
     (SELECT body FROM blobs WHERE hash = requests.metadata_blob) \
     FROM requests WHERE request_id = ?1";

/// The stored answer to `request_id`.
pub(crate) fn request_answer(
    c: &rusqlite::Connection,
    request_id: &str,
) -> Result<Option<StoredAnswer>, Error> {
    let mut stmt = c.prepare_cached(REQUEST_ANSWER_SQL)?;
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
pub(super) fn put_back_metadata(
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

    /// Whether the counts kept by (owner, kind, state) and by label answer
    /// this filter: it asks only for states, kinds, owners and one label at most.
    pub(super) fn counted(&self) -> bool {
        self.types.is_empty()
            && self.ids.is_empty()
            && self.search.is_empty()
            && self.labels.len() <= 1
    }

    /// The kind, state and owner part of the filter, over any table with those columns.
    fn columns_to_sql(
        &self,
        walk: Walk,
        d: Dialect,
        clauses: &mut Vec<String>,
        args: &mut Vec<Arg>,
    ) {
        // A unary `+` keeps SQLite from using an index on the column.
        // PostgreSQL has no such hint (nor a unary `+` for text): its
        // planner picks by itself.
        let walk = if d == Dialect::Postgres {
            Walk::Any
        } else {
            walk
        };
        let (kind, state) = match walk {
            Walk::Any => ("kind", "state"),
            Walk::Order => ("+kind", "+state"),
            Walk::State => ("+kind", "state"),
            Walk::Kind => ("kind", "+state"),
        };
        any_of(
            kind,
            self.kinds.iter().cloned().map(Arg::Text).collect(),
            clauses,
            args,
        );
        any_of(
            state,
            self.states.iter().map(|s| Arg::Int4(s.number())).collect(),
            clauses,
            args,
        );
        if !self.includes_deleted() {
            clauses.push(format!("{state} NOT IN ({})", tombstones()));
        }
        if let Some(owners) = &self.owners {
            if owners.is_empty() {
                clauses.push(d.none().into());
            }
            any_of(
                "owner",
                owners.iter().cloned().map(Arg::Text).collect(),
                clauses,
                args,
            );
        }
    }

    /// The filter as SQL. Which of the indexes on `state` and `kind` a
    /// query may walk is its caller's choice ([`Walk`]): left to itself, the
    /// planner takes `state IN (a, b)` over an index and sorts every match.
    fn to_sql(&self, walk: Walk, d: Dialect, clauses: &mut Vec<String>, args: &mut Vec<Arg>) {
        self.columns_to_sql(walk, d, clauses, args);
        any_of(
            "type",
            self.types.iter().cloned().map(Arg::Text).collect(),
            clauses,
            args,
        );
        any_of(
            "id",
            self.ids.iter().cloned().map(Arg::Id).collect(),
            clauses,
            args,
        );
        if !self.search.is_empty() {
            let escaped = self
                .search
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            let cols = ["name", "description", "url", "identity", "kind"];
            // SQLite's LIKE ignores (ASCII) case; PostgreSQL's ILIKE does.
            let like = match d {
                Dialect::Sqlite => "LIKE",
                Dialect::Postgres => "ILIKE",
            };
            let any = cols
                .iter()
                .map(|c| format!("{c} {like} ? ESCAPE '\\'"))
                .collect::<Vec<_>>()
                .join(" OR ");
            clauses.push(format!("({any})"));
            for _ in cols {
                args.push(Arg::Text(format!("%{escaped}%")));
            }
        }
        for (k, v) in &self.labels {
            match d {
                Dialect::Sqlite => {
                    // Keys are validated (letters, digits, - _ . /), so quoting is safe.
                    clauses.push("json_extract(labels, ?) = ?".into());
                    args.push(Arg::Text(format!("$.\"{k}\"")));
                }
                Dialect::Postgres => {
                    clauses.push("(labels::jsonb ->> ?) = ?".into());
                    args.push(Arg::Text(k.clone()));
                }
            }
            args.push(Arg::Text(v.clone()));
        }
    }
}

/// Which index a query walks besides its order's own (and the id, url or
/// identity ones the planner picks by itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Walk {
    /// Whichever the planner likes (for the small count tables).
    Any,
    /// The order's own: the table in creation order (`seq`), or the
    /// index of the name or the update time.
    Order,
    /// `connections_by_state`: the one state asked for, in creation order.
    State,
    /// `connections_by_kind`: the one kind asked for, in creation order.
    Kind,
}

/// The index a page in creation order walks: that of its one state or its
/// one kind, which hold the matching rows in that order, so a page of a
/// rare state reads about a page of rows rather than a page's worth of the
/// rarity. Given both, the one with fewer connections (by the counts).
/// Other orders, and several states or kinds, walk the order's index.
fn walk(c: &rusqlite::Connection, q: &ListQuery) -> Result<Walk, Error> {
    let f = &q.filter;
    if q.order.field != OrderField::CreateTime {
        return Ok(Walk::Order);
    }
    Ok(match (&f.states[..], &f.kinds[..]) {
        ([_], [_]) => {
            let mut stmt = c.prepare_cached(
                "SELECT (SELECT total(n) FROM connection_counts WHERE state = ?1), \
                        (SELECT total(n) FROM connection_counts WHERE kind = ?2)",
            )?;
            let (by_state, by_kind): (f64, f64) = stmt
                .query_row(params![f.states[0].number(), f.kinds[0]], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            if by_state <= by_kind {
                Walk::State
            } else {
                Walk::Kind
            }
        }
        ([_], _) => Walk::State,
        (_, [_]) => Walk::Kind,
        _ => Walk::Order,
    })
}

fn any_of(col: &str, items: Vec<Arg>, clauses: &mut Vec<String>, args: &mut Vec<Arg>) {
    if items.is_empty() {
        return;
    }
    let marks = vec!["?"; items.len()].join(", ");
    clauses.push(format!("{col} IN ({marks})"));
    args.extend(items);
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
    let (sql, args) = list_sql(c, q)?;
    let mut stmt = c.prepare_cached(&sql)?;
    let connections = stmt
        .query_map(params_from_iter(args), connection_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(page_of(q, connections, revision))
}

/// The page of the rows a [`page_sql`] query read (one more than the page
/// size when more follow).
pub(super) fn page_of(q: &ListQuery, mut connections: Vec<Connection>, revision: Revision) -> Page {
    let next = if connections.len() > q.page_size {
        connections.truncate(q.page_size);
        connections.last().map(|last| Cursor {
            key: q.order.key_of(last),
            id: last.id.to_string(),
        })
    } else {
        None
    };
    Page {
        connections,
        next,
        revision,
    }
}

/// A page's query and its arguments.
pub(super) fn list_sql(
    c: &rusqlite::Connection,
    q: &ListQuery,
) -> Result<(String, Vec<Value>), Error> {
    let (sql, args) = page_sql(q, walk(c, q)?, Dialect::Sqlite)?;
    Ok((sql, values(args).collect()))
}

/// A page's query in dialect `d`, walking `walk`, and its arguments.
pub(super) fn page_sql(q: &ListQuery, walk: Walk, d: Dialect) -> Result<(String, Vec<Arg>), Error> {
    let mut clauses = Vec::new();
    let mut args = Vec::new();
    q.filter.to_sql(walk, d, &mut clauses, &mut args);
    let (cmp, dir) = if q.order.descending {
        ("<", "DESC")
    } else {
        (">", "ASC")
    };
    let after = match &q.after {
        Some(cur) => Some((
            match &cur.key {
                CursorKey::Int(i) => Arg::Int8(*i),
                CursorKey::Text(s) => Arg::Text(s.clone()),
            },
            Arg::Id(ConnectionId::parse(&cur.id, "page_token")?),
        )),
        None => None,
    };
    let sql = if q.order.field == OrderField::CreateTime {
        // `seq` numbers the rows in `(create_time, id)` order (see schema
        // version 7): the page walks the table, or the index of its one
        // state or kind, whose entries end with `seq`. The cursor's row
        // gives the place to go on from; one deleted since (a pruned
        // tombstone) is placed by its sort key, reading the rows before it.
        if let Some((key, id)) = after {
            let bound = if q.order.descending {
                "max(seq) + 1"
            } else {
                "min(seq) - 1"
            };
            clauses.push(format!(
                "seq {cmp} coalesce((SELECT seq FROM connections WHERE id = ?), \
                 (SELECT {bound} FROM connections WHERE (create_time, id) {cmp} (?, ?)))"
            ));
            args.extend([id.clone(), key, id]);
        }
        format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections {} ORDER BY seq {dir} LIMIT {}",
            where_clause(&clauses),
            q.page_size + 1
        )
    } else {
        let col = q.order.column();
        if let Some((key, id)) = after {
            clauses.push(format!("({col}, id) {cmp} (?, ?)"));
            args.extend([key, id]);
        }
        format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections {} ORDER BY {col} {dir}, id {dir} LIMIT {}",
            where_clause(&clauses),
            q.page_size + 1
        )
    };
    Ok((sql, args))
}

/// Where a snapshot page ends: the sort key of its last row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotCursor {
    /// The row's place in creation order (see schema version 7).
    seq: i64,
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
    let (sql, args) = snapshot_sql(filter, after, max_rows, Dialect::Sqlite);
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(values(args)), |r| {
        Ok((
            connection_from_row(r)?,
            r.get::<_, i64>(CONNECTION_COLUMN_COUNT)?,
        ))
    })?;
    snapshot_of(rows, max_rows, max_bytes)
}

/// [`snapshot_page`]'s query in dialect `d`: the connection's columns, then
/// its `seq`; one row more than the page may take.
pub(super) fn snapshot_sql(
    filter: &Filter,
    after: Option<&SnapshotCursor>,
    max_rows: usize,
    d: Dialect,
) -> (String, Vec<Arg>) {
    let mut clauses = Vec::new();
    let mut args = Vec::new();
    filter.to_sql(Walk::Order, d, &mut clauses, &mut args);
    if let Some(a) = after {
        clauses.push("seq > ?".into());
        args.push(Arg::Int8(a.seq));
    }
    let sql = format!(
        "SELECT {CONNECTION_COLUMNS}, seq FROM connections {} ORDER BY seq LIMIT {}",
        where_clause(&clauses),
        max_rows.max(1) + 1
    );
    (sql, args)
}

/// The snapshot page of the rows (connection, `seq`) a [`snapshot_sql`]
/// query reads, and the cursor to continue from while more may follow.
pub(super) fn snapshot_of<E>(
    rows: impl Iterator<Item = Result<(Connection, i64), E>>,
    max_rows: usize,
    max_bytes: usize,
) -> Result<(Vec<Connection>, Option<SnapshotCursor>), Error>
where
    Error: From<E>,
{
    let max_rows = max_rows.max(1);
    let (mut page, mut bytes, mut more, mut last_seq) = (Vec::new(), 0, false, 0);
    for row in rows {
        if page.len() == max_rows || (!page.is_empty() && bytes >= max_bytes) {
            more = true;
            break;
        }
        let (row, seq) = row?;
        bytes += row.approx_size();
        page.push(row);
        last_seq = seq;
    }
    let next = more.then_some(SnapshotCursor { seq: last_seq });
    Ok((page, next))
}

/// Counts per state, and the revision they were read at.
pub(crate) fn count(
    c: &rusqlite::Connection,
    filter: &Filter,
) -> Result<(Vec<(State, i64)>, Revision), Error> {
    count_by(c, filter, filter.counted())
}

/// [`count`], from the kept counts (`kept`, when they answer the filter) or
/// by reading the rows.
pub(super) fn count_by(
    c: &rusqlite::Connection,
    filter: &Filter,
    kept: bool,
) -> Result<(Vec<(State, i64)>, Revision), Error> {
    let (revision, _) = revisions(c)?;
    let (sql, args) = count_sql(filter, kept, Dialect::Sqlite);
    let mut stmt = c.prepare_cached(&sql)?;
    let found: BTreeMap<i32, i64> = stmt
        .query_map(params_from_iter(values(args)), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    Ok((counts_of(filter, &found), revision))
}

/// [`count_by`]'s query in dialect `d`: `(state, number)` rows.
pub(super) fn count_sql(filter: &Filter, kept: bool, d: Dialect) -> (String, Vec<Arg>) {
    let mut clauses = Vec::new();
    let mut args = Vec::new();
    if kept {
        // Sums of the counts the triggers of schema version 5 keep: a few
        // rows per (owner, kind, state), whatever the number of connections.
        let table = match filter.labels.iter().next() {
            Some((key, value)) => {
                clauses.push("key = ? AND value = ?".into());
                args.push(Arg::Text(key.clone()));
                args.push(Arg::Text(value.clone()));
                "label_counts"
            }
            None => "connection_counts",
        };
        filter.columns_to_sql(Walk::Any, d, &mut clauses, &mut args);
        let sum = sum_n(d);
        let sql = format!(
            "SELECT state, {sum} FROM {table} {} GROUP BY state",
            where_clause(&clauses)
        );
        (sql, args)
    } else {
        filter.to_sql(Walk::Order, d, &mut clauses, &mut args);
        let sql = format!(
            "SELECT state, count(*) FROM connections {} GROUP BY state",
            where_clause(&clauses)
        );
        (sql, args)
    }
}

/// The sum of the kept counts `n`, an integer (PostgreSQL's sum of
/// `bigint` is `numeric`).
fn sum_n(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => "sum(n)",
        Dialect::Postgres => "sum(n)::bigint",
    }
}

/// The counts per state a filter shows (tombstones only if it includes
/// them), from the numbers `found` per state number.
pub(super) fn counts_of(filter: &Filter, found: &BTreeMap<i32, i64>) -> Vec<(State, i64)> {
    State::ALL
        .into_iter()
        .filter(|s| !lifecycle::is_tombstone(*s) || filter.includes_deleted())
        .map(|s| (s, found.get(&s.number()).copied().unwrap_or(0)))
        .collect()
}

/// Kept counts summed by (kind, state).
pub(super) fn counts_by_kind_sql(d: Dialect) -> String {
    format!(
        "SELECT kind, state, {} FROM connection_counts GROUP BY kind, state ORDER BY kind, state",
        sum_n(d)
    )
}

/// Connections by (kind, state), tombstones included, from the kept counts.
pub(crate) fn counts_by_kind(c: &rusqlite::Connection) -> Result<Vec<(String, State, i64)>, Error> {
    let mut stmt = c.prepare_cached(&counts_by_kind_sql(Dialect::Sqlite))?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i32>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (kind, state, n) = row?;
        let state = State::from_number(state).ok_or_else(|| {
            Error::Internal(format!("unknown state {state} in connection_counts"))
        })?;
        out.push((kind, state, n));
    }
    Ok(out)
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

/// [`events`]' query in dialect `d`: the event's columns (0 to 8), its
/// snapshot (9), whether it names a metadata blob (10) and that blob (11),
/// then the connection's row (from 12) when the snapshot is `''`.
pub(super) fn events_sql(f: &EventFilter, d: Dialect) -> (String, Vec<Arg>) {
    let mut sql = format!(
        "SELECT events.revision, events.connection_id, events.type, events.from_state, \
         events.to_state, events.trigger, events.reason, events.actor, events.time, events.snapshot, \
         events.metadata_blob IS NOT NULL, (SELECT body FROM blobs WHERE hash = events.metadata_blob), {} \
         FROM events LEFT JOIN connections AS row ON row.id = events.connection_id AND events.snapshot = '' \
         WHERE events.revision > ?",
        ROW_COLUMNS
    );
    let mut args = vec![Arg::Int8(f.after_revision.get())];
    if let Some(id) = &f.connection_id {
        sql.push_str(" AND events.connection_id = ?");
        args.push(Arg::Id(id.clone()));
    }
    if let Some(owners) = &f.owners {
        // Owners never change, so the connection's row decides for its whole history.
        if owners.is_empty() {
            sql.push_str(&format!(" AND {}", d.none()));
        } else {
            let marks = vec!["?"; owners.len()].join(", ");
            sql.push_str(&format!(
                " AND events.connection_id IN (SELECT id FROM connections WHERE owner IN ({marks}))"
            ));
            args.extend(owners.iter().cloned().map(Arg::Text));
        }
    }
    sql.push_str(" ORDER BY events.revision LIMIT ?");
    args.push(Arg::Int8(f.limit as i64));
    (sql, args)
}

/// Events above `after_revision` in revision order, at most `limit` of them.
pub(crate) fn events(c: &rusqlite::Connection, f: &EventFilter) -> Result<Vec<Event>, Error> {
    // An event whose snapshot is `''` is its connection's latest: the row is
    // its snapshot (see `Tx::record`).
    let (sql, args) = events_sql(f, Dialect::Sqlite);
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(values(args)), |r| {
        let bad = |i: usize| {
            rusqlite::Error::FromSqlConversionFailure(
                i,
                rusqlite::types::Type::Integer,
                "bad enum".into(),
            )
        };
        let snapshot: String = r.get(9)?;
        let connection = if snapshot.is_empty() {
            connection_at(r, 12)?
        } else {
            let mut c = codec::decode_connection(&snapshot).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    9,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
            put_back_metadata(&mut c, r.get(10)?, r.get(11)?)?;
            c
        };
        Ok(Event {
            revision: r.get(0)?,
            connection_id: r.get(1)?,
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

pub(super) const CREDENTIAL_COLUMNS: &str =
    "id, name, type, owner, nonce, sealed, create_time, allowed_hosts";

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

/// The credential with id ?1.
pub(super) fn credential_sql() -> String {
    format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?1")
}

pub(crate) fn credential(
    c: &rusqlite::Connection,
    id: &str,
) -> Result<Option<StoredCredential>, Error> {
    let mut stmt = c.prepare_cached(&credential_sql())?;
    Ok(stmt.query_row([id], credential_from_row).optional()?)
}

/// Credentials after `(create_time, id)` (?1, ?2) in that order, at most ?3,
/// of the owners in the JSON array ?4 (NULL: every owner).
pub(super) fn credentials_sql(d: Dialect) -> String {
    let (owners, each) = match d {
        Dialect::Sqlite => ("?4", "json_each(?4)"),
        Dialect::Postgres => ("?4::text", "json_array_elements_text(?4::json)"),
    };
    format!(
        "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE (create_time, id) > (?1, ?2) \
         AND ({owners} IS NULL OR owner IN (SELECT value FROM {each})) \
         ORDER BY create_time, id LIMIT ?3"
    )
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
    let mut stmt = c.prepare_cached(&credentials_sql(Dialect::Sqlite))?;
    let rows = stmt.query_map(params![t, id, limit as i64, owners], credential_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// A live connection other than `except` that refers to credential `id`.
pub(crate) fn credential_user(
    c: &rusqlite::Connection,
    id: &str,
    except: Option<&ConnectionId>,
) -> Result<Option<ConnectionId>, Error> {
    let mut stmt = c.prepare_cached(&credential_user_sql(Dialect::Sqlite))?;
    Ok(stmt
        .query_row(params![id, except], |r| r.get::<_, ConnectionId>(0))
        .optional()?)
}

/// [`probe_candidates`]' query in dialect `d`.
pub(super) fn probe_candidates_sql(d: Dialect) -> String {
    let states = lifecycle::maybe_probed()
        .map(|s| s.number().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    // In SQLite a `+` keeps the planner off the index on state.
    let (managed, state) = match d {
        Dialect::Sqlite => ("managed = 1", "+state"),
        Dialect::Postgres => ("managed", "state"),
    };
    format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections WHERE {managed} AND {state} IN ({states})"
    )
}

/// Every connection the monitor may have to probe: managed and in a state
/// [`lifecycle::probed`] answers yes for under some trigger.
pub(crate) fn probe_candidates(c: &rusqlite::Connection) -> Result<Vec<Connection>, Error> {
    let mut stmt = c.prepare_cached(&probe_candidates_sql(Dialect::Sqlite))?;
    let rows = stmt.query_map([], connection_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// A sealed value: (nonce, ciphertext).
pub(crate) type Sealed = (Vec<u8>, Vec<u8>);

/// The sealed key check.
pub(super) const KEY_CHECK_SQL: &str = "SELECT nonce, sealed FROM key_check WHERE id = 1";

/// The sealed key check, if the database has one.
pub(crate) fn key_check(c: &rusqlite::Connection) -> Result<Option<Sealed>, Error> {
    let mut stmt = c.prepare_cached(KEY_CHECK_SQL)?;
    Ok(stmt
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer looks these up on every create and deletion: a scan of
    /// the table would make each cost as much as the table is large.
    #[test]
    fn lookups_by_identity_and_credential_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        for (sql, index) in [
            (live_by_identity_sql(), "connections_live_identity"),
            (
                credential_user_sql(Dialect::Sqlite),
                "connections_by_credential",
            ),
        ] {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let args = vec!["x"; stmt.parameter_count()];
            let plan: Vec<String> = stmt
                .query_map(params_from_iter(args), |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter()
                    .any(|step| step.contains(&format!("USING INDEX {index}"))),
                "{sql}: {plan:?}"
            );
        }
    }

    /// Creation order is `seq` order. A page token's row places the next
    /// page; a token whose row this database does not have (one issued by
    /// a restored copy) is placed by its `(create_time, id)`, both ways.
    #[test]
    fn a_page_in_creation_order_goes_on_after_its_cursor_even_without_its_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let mut ids: Vec<ConnectionId> = (0..7).map(|_| ConnectionId::generate()).collect();
        ids.sort();
        // Made in pairs at one time each; the ids in between are never stored.
        let stored: Vec<(i64, &ConnectionId)> =
            vec![(10, &ids[0]), (10, &ids[2]), (20, &ids[3]), (20, &ids[5])];
        for (at, id) in &stored {
            conn.execute(
                "INSERT INTO connections (id, kind, type, sub_type, name, description, url, \
                 identity, metadata, labels, managed, credential_id, owner, state, state_reason, \
                 state_trigger, state_time, revision, create_time, update_time, last_probe) \
                 VALUES (?1, 'tcp', '', '', 'n', '', '', hex(?1), '{}', '{}', 0, '', '', 1, '', \
                 1, ?2, 1, ?2, ?2, NULL)",
                params![id, at],
            )
            .unwrap();
        }
        let page = |after: (i64, &ConnectionId), descending: bool| -> Vec<ConnectionId> {
            let q = ListQuery {
                filter: Filter::default(),
                order: Order {
                    field: OrderField::CreateTime,
                    descending,
                },
                page_size: 10,
                after: Some(Cursor {
                    key: CursorKey::Int(after.0),
                    id: after.1.to_string(),
                }),
            };
            list(&conn, &q)
                .unwrap()
                .connections
                .into_iter()
                .map(|c| c.id)
                .collect()
        };
        let ids_of = |rows: &[(i64, &ConnectionId)]| -> Vec<ConnectionId> {
            rows.iter().map(|(_, id)| (*id).clone()).collect()
        };
        // A stored row: the rows after it.
        assert_eq!(page((10, &ids[2]), false), ids_of(&stored[2..]));
        assert_eq!(page((20, &ids[3]), true), ids_of(&[stored[1], stored[0]]));
        // Rows not stored, between and around the stored ones.
        assert_eq!(page((10, &ids[1]), false), ids_of(&stored[1..]));
        assert_eq!(page((10, &ids[1]), true), ids_of(&stored[..1]));
        assert_eq!(page((20, &ids[4]), false), ids_of(&stored[3..]));
        assert_eq!(
            page((20, &ids[4]), true),
            ids_of(&[stored[2], stored[1], stored[0]])
        );
        assert_eq!(page((30, &ids[6]), false), Vec::new());
        assert_eq!(page((5, &ids[6]), true), Vec::new());
        assert_eq!(page((5, &ids[6]), false), ids_of(&stored));
    }
}
