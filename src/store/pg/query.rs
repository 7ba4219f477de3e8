//! PostgreSQL reads: what `store::query` reads from SQLite (single rows,
//! keyset pages, watch snapshot pages, counts, event history, stored
//! answers, credentials, probe candidates, the key check), with the same
//! meaning and the same domain types, on any client or transaction
//! ([`Statements`]: a plain one, or a `Client` that keeps its prepared
//! statements), so callers choose the snapshot: a read that runs
//! more than one statement (a page with its revision, say) shows one moment
//! only in a `REPEATABLE READ` transaction, as SQLite's read transaction does.
//!
//! The SQL comes from `store::query`'s builders in [`Dialect::Postgres`]
//! (one builder per query, for both backends); this module numbers their
//! `?` placeholders as `$n`, binds their [`Arg`]s by type (an id as a
//! `uuid`, a state as an `integer`) and decodes PostgreSQL's rows.

use super::Statements;
use super::error;
use crate::connection::{Connection, ConnectionId, Event, EventType, Micros, Revision};
use crate::error::Error;
use crate::lifecycle::{State, Trigger};
use crate::store::codec;
use crate::store::query::{
    self, Arg, Dialect, EventFilter, Filter, ListQuery, Page, Sealed, SnapshotCursor, StoredAnswer,
    StoredCredential, Walk,
};
use postgres::types::{FromSql, ToSql};
use std::collections::BTreeMap;

/// `sql` with its placeholders as PostgreSQL's: `?N` as `$N`, and each bare
/// `?` as the next number. The builders never put `?` inside a literal.
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut next = 0;
    let mut chars = sql.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch != '?' {
            out.push(ch);
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.next_if(char::is_ascii_digit) {
            digits.push(d);
        }
        if digits.is_empty() {
            next += 1;
            digits = next.to_string();
        }
        out.push('$');
        out.push_str(&digits);
    }
    out
}

/// A value bound to a PostgreSQL query.
type Param = Box<dyn ToSql + Sync>;

/// The builders' arguments as PostgreSQL binds them, each as its column's type.
fn params(args: Vec<Arg>) -> Vec<Param> {
    args.into_iter()
        .map(|a| -> Param {
            match a {
                Arg::Int4(i) => Box::new(i),
                Arg::Int8(i) => Box::new(i),
                Arg::Text(t) => Box::new(t),
                Arg::Id(id) => Box::new(uuid(&id)),
            }
        })
        .collect()
}

/// The rows of the builder's query `sql` with `args`.
fn rows(c: &mut impl Statements, sql: &str, args: Vec<Arg>) -> Result<Vec<postgres::Row>, Error> {
    let params = params(args);
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
    c.query(&numbered(sql), &refs).map_err(error)
}

/// The row, if any, of the builder's query `sql` with `args`.
fn row(c: &mut impl Statements, sql: &str, args: Vec<Arg>) -> Result<Option<postgres::Row>, Error> {
    let params = params(args);
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
    c.query_opt(&numbered(sql), &refs).map_err(error)
}

fn uuid(id: &ConnectionId) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

/// Column `i` of `r`.
fn col<'a, T: FromSql<'a>>(r: &'a postgres::Row, i: usize) -> Result<T, Error> {
    r.try_get(i).map_err(error)
}

fn bad(i: usize, what: &str) -> Error {
    Error::Internal(format!("PostgreSQL: column {i}: bad {what}"))
}

fn id_at(r: &postgres::Row, i: usize) -> Result<ConnectionId, Error> {
    let u: uuid::Uuid = col(r, i)?;
    ConnectionId::from_bytes(u.as_bytes()).ok_or_else(|| bad(i, "id"))
}

fn state_at(r: &postgres::Row, i: usize) -> Result<State, Error> {
    State::from_number(col(r, i)?).ok_or_else(|| bad(i, "state"))
}

fn trigger_at(r: &postgres::Row, i: usize) -> Result<Trigger, Error> {
    Trigger::from_number(col(r, i)?).ok_or_else(|| bad(i, "trigger"))
}

/// The connection whose [`query::CONNECTION_COLUMNS`] start at column `at` of `r`.
pub(crate) fn connection_at(r: &postgres::Row, at: usize) -> Result<Connection, Error> {
    Ok(Connection {
        id: id_at(r, at)?,
        kind: col(r, at + 1)?,
        type_: col(r, at + 2)?,
        sub_type: col(r, at + 3)?,
        name: col(r, at + 4)?,
        description: col(r, at + 5)?,
        url: col(r, at + 6)?,
        identity: col(r, at + 7)?,
        metadata: codec::decode_metadata(col(r, at + 8)?)?,
        labels: codec::decode_labels(col(r, at + 9)?)?,
        managed: col(r, at + 10)?,
        credential_id: col(r, at + 11)?,
        owner: col(r, at + 12)?,
        state: state_at(r, at + 13)?,
        state_reason: col(r, at + 14)?,
        state_trigger: trigger_at(r, at + 15)?,
        state_time: col(r, at + 16)?,
        revision: Revision::new(col(r, at + 17)?),
        create_time: col(r, at + 18)?,
        update_time: col(r, at + 19)?,
        last_probe: col::<Option<&str>>(r, at + 20)?
            .map(codec::decode_probe)
            .transpose()?,
    })
}

/// The store-wide revision and the compaction mark (events at or below it are gone).
pub(crate) fn revisions(c: &mut impl Statements) -> Result<(Revision, Revision), Error> {
    let r = c.query_one(query::REVISIONS_SQL, &[]).map_err(error)?;
    Ok((Revision::new(col(&r, 0)?), Revision::new(col(&r, 1)?)))
}

/// The create_time of the connection made last (0 when there is none).
pub(crate) fn last_create_time(c: &mut impl Statements) -> Result<Micros, Error> {
    match c
        .query_opt(query::LAST_CREATE_TIME_SQL, &[])
        .map_err(error)?
    {
        Some(r) => col(&r, 0),
        None => Ok(0),
    }
}

pub(crate) fn get(c: &mut impl Statements, id: &ConnectionId) -> Result<Option<Connection>, Error> {
    row(c, &query::get_sql(), vec![Arg::Id(id.clone())])?
        .map(|r| connection_at(&r, 0))
        .transpose()
}

/// The live connection with `identity`, if any: its query repeats the
/// condition of `connections_live_identity` (`state <> 7`), so it is
/// answered from that index.
pub(crate) fn live_by_identity(
    c: &mut impl Statements,
    identity: &str,
) -> Result<Option<Connection>, Error> {
    row(
        c,
        &query::live_by_identity_sql(),
        vec![Arg::Text(identity.into())],
    )?
    .map(|r| connection_at(&r, 0))
    .transpose()
}

/// The stored answer to `request_id`, and its request's fingerprint.
pub(crate) fn request_answer(
    c: &mut impl Statements,
    request_id: &str,
) -> Result<Option<StoredAnswer>, Error> {
    let Some(r) = row(
        c,
        query::REQUEST_ANSWER_SQL,
        vec![Arg::Text(request_id.into())],
    )?
    else {
        return Ok(None);
    };
    let mut answer = codec::decode_answer(col(&r, 1)?)?;
    if let Ok(conn) = &mut answer {
        query::put_back_metadata(conn, col(&r, 2)?, col(&r, 3)?)
            .map_err(|e| Error::Internal(e.to_string()))?;
    }
    Ok(Some((col(&r, 0)?, answer)))
}

/// One keyset page, as [`query::list`] reads it: in creation order by
/// `seq`, the cursor placed by its row or, without one, by its
/// `(create_time, id)`; in the other orders by `(column, id)`.
pub(crate) fn list(c: &mut impl Statements, q: &ListQuery) -> Result<Page, Error> {
    let (revision, _) = revisions(c)?;
    let (sql, args) = query::page_sql(q, Walk::Any, Dialect::Postgres)?;
    let connections = rows(c, &sql, args)?
        .iter()
        .map(|r| connection_at(r, 0))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(query::page_of(q, connections, revision))
}

/// One page of the matching connections in creation order after `after`,
/// as [`query::snapshot_page`] reads it: at most `max_rows`, and no more once
/// `max_bytes` are read (though always one); the cursor while more may follow.
pub(crate) fn snapshot_page(
    c: &mut impl Statements,
    filter: &Filter,
    after: Option<&SnapshotCursor>,
    max_rows: usize,
    max_bytes: usize,
) -> Result<(Vec<Connection>, Option<SnapshotCursor>), Error> {
    let (sql, args) = query::snapshot_sql(filter, after, max_rows, Dialect::Postgres);
    let rows = rows(c, &sql, args)?;
    let rows = rows.iter().map(|r| {
        Ok((
            connection_at(r, 0)?,
            col(r, query::CONNECTION_COLUMN_COUNT)?,
        ))
    });
    query::snapshot_of::<Error>(rows, max_rows, max_bytes)
}

/// Matching connections by state, and the revision they were read at.
pub(crate) fn count(
    c: &mut impl Statements,
    filter: &Filter,
) -> Result<(Vec<(State, i64)>, Revision), Error> {
    count_by(c, filter, filter.counted())
}

/// [`count`], from the kept counts (`kept`, when they answer the filter) or
/// by reading the rows.
pub(crate) fn count_by(
    c: &mut impl Statements,
    filter: &Filter,
    kept: bool,
) -> Result<(Vec<(State, i64)>, Revision), Error> {
    let (revision, _) = revisions(c)?;
    let (sql, args) = query::count_sql(filter, kept, Dialect::Postgres);
    let found = rows(c, &sql, args)?
        .iter()
        .map(|r| Ok((col(r, 0)?, col(r, 1)?)))
        .collect::<Result<BTreeMap<i32, i64>, Error>>()?;
    Ok((query::counts_of(filter, &found), revision))
}

/// Connections by (kind, state), tombstones included, from the kept counts.
pub(crate) fn counts_by_kind(c: &mut impl Statements) -> Result<Vec<(String, State, i64)>, Error> {
    rows(c, &query::counts_by_kind_sql(Dialect::Postgres), vec![])?
        .iter()
        .map(|r| Ok((col(r, 0)?, state_at(r, 1)?, col(r, 2)?)))
        .collect()
}

/// Events above `after_revision` in revision order, at most `limit` of them
/// and no more once `max_bytes` are read (though always one).
pub(crate) fn events(c: &mut impl Statements, f: &EventFilter) -> Result<Vec<Event>, Error> {
    let (sql, args) = query::events_sql(f, Dialect::Postgres);
    let (mut events, mut bytes) = (Vec::new(), 0);
    for r in rows(c, &sql, args)? {
        if !events.is_empty() && bytes >= f.max_bytes {
            break;
        }
        // An event whose snapshot is `''` is its connection's latest: the
        // row is its snapshot.
        let snapshot: &str = col(&r, 9)?;
        let connection = if snapshot.is_empty() {
            connection_at(&r, 12)?
        } else {
            let mut c = codec::decode_connection(snapshot)?;
            query::put_back_metadata(&mut c, col(&r, 10)?, col(&r, 11)?)
                .map_err(|e| Error::Internal(e.to_string()))?;
            c
        };
        let event = Event {
            revision: Revision::new(col(&r, 0)?),
            connection_id: id_at(&r, 1)?,
            type_: EventType::from_number(col(&r, 2)?).ok_or_else(|| bad(2, "event type"))?,
            from_state: state_at(&r, 3)?,
            to_state: state_at(&r, 4)?,
            trigger: trigger_at(&r, 5)?,
            reason: col(&r, 6)?,
            actor: col(&r, 7)?,
            time: col(&r, 8)?,
            connection,
            cache: Default::default(),
        };
        bytes += event.approx_size();
        events.push(event);
    }
    Ok(events)
}

fn credential_from_row(r: &postgres::Row) -> Result<StoredCredential, Error> {
    Ok(StoredCredential {
        id: col(r, 0)?,
        name: col(r, 1)?,
        type_: col(r, 2)?,
        owner: col(r, 3)?,
        nonce: col(r, 4)?,
        sealed: col(r, 5)?,
        create_time: col(r, 6)?,
        allowed_hosts: codec::decode_hosts(col(r, 7)?)?,
    })
}

pub(crate) fn credential(
    c: &mut impl Statements,
    id: &str,
) -> Result<Option<StoredCredential>, Error> {
    row(c, &query::credential_sql(), vec![Arg::Text(id.into())])?
        .map(|r| credential_from_row(&r))
        .transpose()
}

/// Credentials of `owners` (`None`: every owner) in creation order after
/// `(create_time, id)`, at most `limit`.
pub(crate) fn credentials(
    c: &mut impl Statements,
    after: Option<(i64, String)>,
    limit: usize,
    owners: Option<&[String]>,
) -> Result<Vec<StoredCredential>, Error> {
    let (t, id) = after.unwrap_or((i64::MIN, String::new()));
    let owners = owners.map(serde_json::to_string).transpose()?;
    let sql = numbered(&query::credentials_sql(Dialect::Postgres));
    c.query(&sql, &[&t, &id, &(limit as i64), &owners])
        .map_err(error)?
        .iter()
        .map(credential_from_row)
        .collect()
}

/// A live connection other than `except` that refers to credential `id`.
pub(crate) fn credential_user(
    c: &mut impl Statements,
    id: &str,
    except: Option<&ConnectionId>,
) -> Result<Option<ConnectionId>, Error> {
    let sql = numbered(&query::credential_user_sql(Dialect::Postgres));
    c.query_opt(&sql, &[&id, &except.map(uuid)])
        .map_err(error)?
        .map(|r| id_at(&r, 0))
        .transpose()
}

/// Every connection the monitor may have to probe.
pub(crate) fn probe_candidates(c: &mut impl Statements) -> Result<Vec<Connection>, Error> {
    rows(c, &query::probe_candidates_sql(Dialect::Postgres), vec![])?
        .iter()
        .map(|r| connection_at(r, 0))
        .collect()
}

/// The sealed key check, if the database has one.
pub(crate) fn key_check(c: &mut impl Statements) -> Result<Option<Sealed>, Error> {
    c.query_opt(query::KEY_CHECK_SQL, &[])
        .map_err(error)?
        .map(|r| Ok((col(&r, 0)?, col(&r, 1)?)))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::{ProbeOutcome, ProbeResult};
    use crate::store::pg::cluster::Cluster;
    use crate::store::query::{Cursor, CursorKey, Order, OrderField};

    /// A fresh, migrated database of the test cluster.
    fn database() -> postgres::Client {
        let mut c = super::super::connect(&Cluster::shared().database()).unwrap();
        super::super::schema::migrate(&mut c).unwrap();
        c
    }

    /// An SQLite database of the current schema, to compare with.
    fn sqlite() -> (tempfile::TempDir, rusqlite::Connection) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        (dir, conn)
    }

    const INSERT: &str = "INSERT INTO connections (id, kind, type, sub_type, name, description, \
         url, identity, metadata, labels, managed, credential_id, owner, state, state_reason, \
         state_trigger, state_time, revision, create_time, update_time, last_probe) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

    /// Stores `x` as a row, the last in creation order.
    fn insert(c: &mut impl Statements, x: &Connection) {
        let probe = x
            .last_probe
            .as_ref()
            .map(|p| codec::encode_probe(p).unwrap());
        c.execute(
            &numbered(INSERT),
            &[
                &uuid(&x.id),
                &x.kind,
                &x.type_,
                &x.sub_type,
                &x.name,
                &x.description,
                &x.url,
                &x.identity,
                &codec::encode_metadata(&x.metadata).unwrap(),
                &codec::encode_labels(&x.labels).unwrap(),
                &x.managed,
                &x.credential_id,
                &x.owner,
                &x.state.number(),
                &x.state_reason,
                &x.state_trigger.number(),
                &x.state_time,
                &x.revision.get(),
                &x.create_time,
                &x.update_time,
                &probe,
            ],
        )
        .unwrap();
    }

    fn insert_sqlite(c: &rusqlite::Connection, x: &Connection) {
        let probe = x
            .last_probe
            .as_ref()
            .map(|p| codec::encode_probe(p).unwrap());
        c.execute(
            INSERT,
            rusqlite::params![
                x.id,
                x.kind,
                x.type_,
                x.sub_type,
                x.name,
                x.description,
                x.url,
                x.identity,
                codec::encode_metadata(&x.metadata).unwrap(),
                codec::encode_labels(&x.labels).unwrap(),
                x.managed,
                x.credential_id,
                x.owner,
                x.state.number(),
                x.state_reason,
                x.state_trigger.number(),
                x.state_time,
                x.revision,
                x.create_time,
                x.update_time,
                probe,
            ],
        )
        .unwrap();
    }

    fn connection(id: ConnectionId, identity: &str, state: State, time: i64) -> Connection {
        Connection {
            id,
            kind: "tcp".into(),
            type_: "a".into(),
            sub_type: "s".into(),
            name: "n".into(),
            description: "d".into(),
            url: "tcp://h:1".into(),
            identity: identity.into(),
            metadata: serde_json::Map::new(),
            labels: BTreeMap::new(),
            managed: false,
            credential_id: String::new(),
            owner: String::new(),
            state,
            state_reason: String::new(),
            state_trigger: Trigger::User,
            state_time: time,
            revision: Revision::new(1),
            create_time: time,
            update_time: time,
            last_probe: None,
        }
    }

    /// Forty connections of three kinds, two types, every state, two
    /// owners, a few labels, with ties in every sort key, in creation
    /// order; stored both in PostgreSQL and in SQLite.
    fn dataset() -> Vec<Connection> {
        let mut ids: Vec<ConnectionId> = (0..40).map(|_| ConnectionId::generate()).collect();
        ids.sort();
        let mut rows: Vec<Connection> = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                let mut x = connection(id, &format!("identity-{i}"), State::ALL[i % 8], 0);
                x.kind = ["tcp", "http", "db"][i % 3].into();
                x.type_ = ["a", "b"][i % 2].into();
                x.name = format!("n{:02}", (i * 7) % 13);
                x.description = if i % 5 == 0 { "A Special one" } else { "plain" }.into();
                x.url = format!("https://Host{i}.example/");
                x.owner = if i % 4 == 0 { "bob" } else { "alice" }.into();
                x.managed = i % 2 == 0;
                x.credential_id = if i % 6 == 0 { "cred" } else { "" }.into();
                x.labels = match i % 3 {
                    0 => [("env", "prod")].as_slice(),
                    1 => [("env", "dev"), ("app.example/team", "x")].as_slice(),
                    _ => [].as_slice(),
                }
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                x.create_time = 100 + (i as i64 / 3) * 10;
                x.update_time = 1000 + ((i * 11) % 17) as i64;
                x.metadata.insert("i".into(), serde_json::json!(i));
                x
            })
            .collect();
        // Creation order is (create_time, id) order.
        rows.sort_by(|a, b| (a.create_time, &a.id).cmp(&(b.create_time, &b.id)));
        rows
    }

    fn filters(rows: &[Connection]) -> Vec<Filter> {
        let f = Filter::default;
        let labels = |l: &[(&str, &str)]| {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        vec![
            f(),
            Filter {
                kinds: vec!["tcp".into()],
                ..f()
            },
            Filter {
                kinds: vec!["tcp".into(), "db".into()],
                ..f()
            },
            Filter {
                states: vec![State::Connected],
                ..f()
            },
            Filter {
                states: vec![State::Deleted],
                ..f()
            },
            Filter {
                states: vec![State::Connected, State::Disconnected],
                ..f()
            },
            Filter {
                kinds: vec!["http".into()],
                states: vec![State::Registered],
                ..f()
            },
            Filter {
                types: vec!["a".into()],
                ..f()
            },
            Filter {
                ids: vec![rows[1].id.clone(), rows[6].id.clone(), rows[20].id.clone()],
                ..f()
            },
            Filter {
                search: "special".into(),
                ..f()
            },
            Filter {
                search: "host1".into(),
                show_deleted: true,
                ..f()
            },
            Filter {
                search: "%".into(),
                ..f()
            },
            Filter {
                labels: labels(&[("env", "prod")]),
                ..f()
            },
            Filter {
                labels: labels(&[("env", "dev"), ("app.example/team", "x")]),
                ..f()
            },
            Filter {
                show_deleted: true,
                ..f()
            },
            Filter {
                owners: Some(vec!["bob".into()]),
                ..f()
            },
            Filter {
                owners: Some(vec![]),
                ..f()
            },
            Filter {
                owners: Some(vec!["alice".into()]),
                labels: labels(&[("env", "prod")]),
                show_deleted: true,
                ..f()
            },
        ]
    }

    /// Every page of `q`'s list, by `read`, following the page tokens.
    fn walk(mut q: ListQuery, mut read: impl FnMut(&ListQuery) -> Page) -> Vec<Vec<ConnectionId>> {
        let mut pages = Vec::new();
        loop {
            let page = read(&q);
            pages.push(page.connections.iter().map(|c| c.id.clone()).collect());
            match page.next {
                Some(next) => q.after = Some(next),
                None => return pages,
            }
        }
    }

    /// Pages in every order, both ways, with every filter: each matching
    /// row exactly once, in order, on the same pages as SQLite's.
    #[test]
    fn pages_hold_every_match_once_in_order_as_sqlite_pages_them() {
        let mut pg = database();
        let (_dir, lite) = sqlite();
        let rows = dataset();
        for x in &rows {
            insert(&mut pg, x);
            insert_sqlite(&lite, x);
        }
        let by_id: BTreeMap<ConnectionId, &Connection> =
            rows.iter().map(|x| (x.id.clone(), x)).collect();
        let mut several_pages = 0;
        for filter in filters(&rows) {
            let (counts, _) = count(&mut pg, &filter).unwrap();
            let matching: i64 = counts.iter().map(|(_, n)| n).sum();
            // Every filter but the two that match nothing matches some rows.
            let nothing = filter.search == "%" || filter.owners == Some(vec![]);
            assert_eq!(matching == 0, nothing, "{filter:?}");
            for field in [
                OrderField::CreateTime,
                OrderField::UpdateTime,
                OrderField::Name,
            ] {
                for descending in [false, true] {
                    let q = || ListQuery {
                        filter: filter.clone(),
                        order: Order { field, descending },
                        page_size: 4,
                        after: None,
                    };
                    let pages = walk(q(), |q| list(&mut pg, q).unwrap());
                    let expected = walk(q(), |q| query::list(&lite, q).unwrap());
                    assert_eq!(pages, expected, "{filter:?} {field:?} {descending}");
                    if pages.len() > 2 {
                        several_pages += 1;
                    }
                    let all: Vec<&Connection> =
                        pages.iter().flatten().map(|id| by_id[id]).collect();
                    assert_eq!(all.len() as i64, matching, "{filter:?}");
                    let key = |x: &Connection| match field {
                        OrderField::CreateTime => (x.create_time, String::new(), x.id.clone()),
                        OrderField::UpdateTime => (x.update_time, String::new(), x.id.clone()),
                        OrderField::Name => (0, x.name.clone(), x.id.clone()),
                    };
                    for pair in all.windows(2) {
                        let ascending = key(pair[0]) < key(pair[1]);
                        assert_eq!(ascending, !descending, "{filter:?} {field:?}");
                    }
                }
            }
        }
        assert!(several_pages > 10, "{several_pages}");
    }

    /// The kept counts answer what reading the rows answers, and both what
    /// SQLite answers; as do the counts by kind and the probe candidates.
    #[test]
    fn counts_kept_and_scanned_agree_with_each_other_and_with_sqlite() {
        let mut pg = database();
        let (_dir, lite) = sqlite();
        let rows = dataset();
        for x in &rows {
            insert(&mut pg, x);
            insert_sqlite(&lite, x);
        }
        crate::store::counts_tests::recount(&lite);
        let mut counted = 0;
        for filter in filters(&rows) {
            let scanned = count_by(&mut pg, &filter, false).unwrap().0;
            assert_eq!(
                scanned,
                query::count_by(&lite, &filter, false).unwrap().0,
                "{filter:?}"
            );
            assert_eq!(count(&mut pg, &filter).unwrap().0, scanned, "{filter:?}");
            if filter.counted() {
                counted += 1;
                assert_eq!(
                    count_by(&mut pg, &filter, true).unwrap().0,
                    scanned,
                    "{filter:?}"
                );
            }
            let tombstones = scanned.iter().any(|(s, _)| *s == State::Deleted);
            let shown = filter.show_deleted || filter.states.contains(&State::Deleted);
            assert_eq!(tombstones, shown, "{filter:?}");
        }
        assert!(counted > 8, "{counted}");
        let by_kind = counts_by_kind(&mut pg).unwrap();
        assert_eq!(by_kind, query::counts_by_kind(&lite).unwrap());
        assert_eq!(by_kind.iter().map(|(_, _, n)| n).sum::<i64>(), 40);
        let ids = |v: Vec<Connection>| {
            let mut ids: Vec<ConnectionId> = v.into_iter().map(|c| c.id).collect();
            ids.sort();
            ids
        };
        let candidates = ids(probe_candidates(&mut pg).unwrap());
        assert!(!candidates.is_empty());
        assert_eq!(candidates, ids(query::probe_candidates(&lite).unwrap()));
        assert_eq!(
            revisions(&mut pg).unwrap(),
            (Revision::new(0), Revision::new(0))
        );
        pg.execute("UPDATE meta SET value = 9 WHERE key = 'revision'", &[])
            .unwrap();
        pg.execute(
            "UPDATE meta SET value = 4 WHERE key = 'compact_revision'",
            &[],
        )
        .unwrap();
        assert_eq!(
            revisions(&mut pg).unwrap(),
            (Revision::new(9), Revision::new(4))
        );
        assert_eq!(
            count(&mut pg, &Filter::default()).unwrap().1,
            Revision::new(9)
        );
    }

    /// Creation order is `seq` order. A page token's row places the next
    /// page; a token whose row this database does not have is placed by
    /// its `(create_time, id)`, both ways (as in SQLite).
    #[test]
    fn a_page_in_creation_order_goes_on_after_its_cursor_even_without_its_row() {
        let mut pg = database();
        let mut ids: Vec<ConnectionId> = (0..7).map(|_| ConnectionId::generate()).collect();
        ids.sort();
        // Made in pairs at one time each; the ids in between are never stored.
        let stored: Vec<(i64, &ConnectionId)> =
            vec![(10, &ids[0]), (10, &ids[2]), (20, &ids[3]), (20, &ids[5])];
        for (i, (at, id)) in stored.iter().enumerate() {
            let x = connection((*id).clone(), &format!("i{i}"), State::Registered, *at);
            insert(&mut pg, &x);
        }
        let mut page = |after: (i64, &ConnectionId), descending: bool| -> Vec<ConnectionId> {
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
            list(&mut pg, &q)
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

    /// A row reads back as it was stored; a tombstone (state 7) keeps its
    /// identity but is not the live connection holding it.
    #[test]
    fn get_reads_any_row_and_live_by_identity_only_a_live_one() {
        let mut pg = database();
        let mut gone = connection(ConnectionId::generate(), "shared", State::Deleted, 5);
        gone.metadata
            .insert("k".into(), serde_json::json!({"deep": [1, 2]}));
        gone.labels.insert("env".into(), "prod".into());
        gone.last_probe = Some(ProbeResult {
            time: 7,
            outcome: ProbeOutcome::Unreachable,
            latency_ms: 12,
            message: "refused".into(),
            consecutive_failures: 2,
        });
        gone.managed = true;
        gone.state_trigger = Trigger::System;
        gone.revision = Revision::new(3);
        insert(&mut pg, &gone);
        assert_eq!(get(&mut pg, &gone.id).unwrap(), Some(gone.clone()));
        assert_eq!(live_by_identity(&mut pg, "shared").unwrap(), None);
        let live = connection(ConnectionId::generate(), "shared", State::Connected, 6);
        insert(&mut pg, &live);
        assert_eq!(
            live_by_identity(&mut pg, "shared").unwrap(),
            Some(live.clone())
        );
        assert_eq!(live_by_identity(&mut pg, "other").unwrap(), None);
        assert_eq!(get(&mut pg, &ConnectionId::generate()).unwrap(), None);
        pg.execute(
            "UPDATE connections SET state = 7 WHERE id = $1",
            &[&uuid(&live.id)],
        )
        .unwrap();
        assert_eq!(live_by_identity(&mut pg, "shared").unwrap(), None);
        // In a transaction too.
        let mut tx = pg.transaction().unwrap();
        assert_eq!(
            get(&mut tx, &live.id).unwrap().unwrap().state,
            State::Deleted
        );
    }

    /// The writer looks these up on every create and deletion: the query
    /// repeats the partial indexes' conditions, so PostgreSQL can use them.
    #[test]
    fn lookups_by_identity_and_credential_use_their_indexes() {
        let mut pg = database();
        for i in 0..2000 {
            let mut x = connection(
                ConnectionId::generate(),
                &format!("i{i}"),
                State::Connected,
                i,
            );
            x.credential_id = format!("c{}", i % 500);
            insert(&mut pg, &x);
        }
        pg.batch_execute("ANALYZE connections").unwrap();
        let explain = |pg: &mut postgres::Client, sql: String, args: &[&(dyn ToSql + Sync)]| {
            pg.query(&format!("EXPLAIN {}", numbered(&sql)), args)
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let plan = explain(&mut pg, query::live_by_identity_sql(), &[&"i7"]);
        assert!(plan.contains("connections_live_identity"), "{plan}");
        let plan = explain(
            &mut pg,
            query::credential_user_sql(Dialect::Postgres),
            &[&"c7", &None::<uuid::Uuid>],
        );
        assert!(plan.contains("connections_by_credential"), "{plan}");
    }

    /// A page walks its order's index from its cursor on, rather than
    /// sorting every row: the primary key (`seq`) in creation order, the
    /// index of the update time or of the name in theirs, both ways.
    #[test]
    fn pages_walk_their_orders_index() {
        let mut pg = database();
        for i in 0..2000 {
            let mut x = connection(
                ConnectionId::generate(),
                &format!("i{i}"),
                State::Connected,
                i,
            );
            x.name = format!("n{}", i % 97);
            x.update_time = i % 89;
            insert(&mut pg, &x);
        }
        pg.batch_execute("ANALYZE connections").unwrap();
        for (field, index) in [
            (OrderField::CreateTime, "connections_pkey"),
            (OrderField::UpdateTime, "connections_by_update"),
            (OrderField::Name, "connections_by_name"),
        ] {
            for descending in [false, true] {
                // A cursor near the start of its walk: most rows follow it.
                let key = match (field, descending) {
                    (OrderField::Name, false) => CursorKey::Text("n1".into()),
                    (OrderField::Name, true) => CursorKey::Text("n98".into()),
                    (_, false) => CursorKey::Int(5),
                    (_, true) => CursorKey::Int(1995),
                };
                let q = ListQuery {
                    filter: Filter::default(),
                    order: Order { field, descending },
                    page_size: 50,
                    after: Some(Cursor {
                        key,
                        id: ConnectionId::generate().to_string(),
                    }),
                };
                let (sql, args) = query::page_sql(&q, Walk::Any, Dialect::Postgres).unwrap();
                let params = params(args);
                let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
                let plan = pg
                    .query(&format!("EXPLAIN {}", numbered(&sql)), &refs)
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>();
                // The page's own scan: the step right under its LIMIT (the
                // cursor's place is found by steps of their own).
                assert!(
                    plan.iter()
                        .any(|step| step.starts_with("  ->  ") && step.contains(index)),
                    "{field:?} {descending}: {plan:#?}"
                );
                assert!(
                    !plan.iter().any(|step| step.contains("Sort")),
                    "{field:?} {descending}: {plan:#?}"
                );
            }
        }
    }

    /// A row PostgreSQL holds but Tether cannot read is an internal error
    /// naming what is wrong, not a panic nor a connection made up.
    #[test]
    fn a_row_that_does_not_decode_is_an_internal_error() {
        let mut pg = database();
        let x = connection(ConnectionId::generate(), "x", State::Connected, 1);
        insert(&mut pg, &x);
        for (set, what) in [
            ("state = 99", "bad state"),
            ("state = 3, state_trigger = 0", "bad trigger"),
            ("state_trigger = 1, metadata = 'not json'", "metadata"),
        ] {
            pg.execute(
                &format!("UPDATE connections SET {set} WHERE id = $1"),
                &[&uuid(&x.id)],
            )
            .unwrap();
            match get(&mut pg, &x.id) {
                Err(Error::Internal(m)) => assert!(m.contains(what), "{set}: {m}"),
                other => panic!("{set}: {other:?}"),
            }
        }
    }

    /// Stores `body` as a blob named `hash`.
    fn blob(pg: &mut postgres::Client, hash: &[u8], body: &str) {
        pg.execute(
            "INSERT INTO blobs (hash, refs, body) VALUES ($1, 0, $2)",
            &[&hash, &body],
        )
        .unwrap();
    }

    /// An event whose snapshot is `''` is its connection's row; a stored
    /// snapshot is decoded, its metadata put back from the blob it names.
    #[test]
    fn events_read_the_row_or_their_snapshot_with_its_blob() {
        let mut pg = database();
        let mut a = connection(ConnectionId::generate(), "a", State::Connected, 10);
        a.owner = "alice".into();
        a.metadata.insert("now".into(), serde_json::json!("row"));
        let mut b = connection(ConnectionId::generate(), "b", State::Registered, 11);
        b.owner = "bob".into();
        insert(&mut pg, &a);
        insert(&mut pg, &b);
        let mut before = a.clone();
        before.state = State::Registered;
        before.name = "before".into();
        before
            .metadata
            .insert("big".into(), serde_json::json!("x".repeat(100)));
        blob(
            &mut pg,
            b"hash",
            &codec::encode_metadata(&before.metadata).unwrap(),
        );
        let event = "INSERT INTO events (revision, connection_id, type, from_state, to_state, \
             trigger, reason, actor, time, snapshot, metadata_blob) \
             VALUES ($1, $2, $3, $4, $5, 1, $6, 'me', $7, $8, $9)";
        let snapshot = codec::encode_connection(&before, false).unwrap();
        // (revision, connection, type, from, to, reason, snapshot, blob)
        let hash: Option<&[u8]> = Some(b"hash");
        for (rev, id, type_, from, to, reason, snap, named) in [
            (
                1i64,
                &a.id,
                1i32,
                1i32,
                2i32,
                "made",
                snapshot.as_str(),
                hash,
            ),
            (2, &b.id, 1, 1, 2, "made", "", None),
            (3, &a.id, 3, 2, 3, "up", "", None),
        ] {
            let time = rev * 100;
            let params: [&(dyn ToSql + Sync); 9] = [
                &rev,
                &uuid(id),
                &type_,
                &from,
                &to,
                &reason,
                &time,
                &snap,
                &named,
            ];
            pg.execute(event, &params).unwrap();
        }
        let filter =
            |after: i64, id: Option<&ConnectionId>, owners: Option<Vec<String>>| EventFilter {
                connection_id: id.cloned(),
                after_revision: Revision::new(after),
                limit: 10,
                owners,
                max_bytes: usize::MAX,
            };
        let all = events(&mut pg, &filter(0, None, None)).unwrap();
        assert_eq!(
            all.iter().map(|e| e.revision.get()).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let mut expected = before.clone();
        assert_eq!(all[0].connection, expected);
        expected.metadata.clear();
        assert_ne!(
            all[0].connection, expected,
            "the blob's metadata is put back"
        );
        assert_eq!(all[0].type_, EventType::Created);
        assert_eq!(all[0].to_state, State::Registered);
        assert_eq!((all[0].time, all[0].actor.as_str()), (100, "me"));
        assert_eq!(all[1].connection, b);
        assert_eq!(all[2].connection, a);
        assert_eq!(all[2].reason, "up");
        let revs = |v: Vec<Event>| v.iter().map(|e| e.revision.get()).collect::<Vec<_>>();
        assert_eq!(
            revs(events(&mut pg, &filter(1, None, None)).unwrap()),
            vec![2, 3]
        );
        assert_eq!(
            revs(events(&mut pg, &filter(0, Some(&a.id), None)).unwrap()),
            vec![1, 3]
        );
        assert_eq!(
            revs(events(&mut pg, &filter(0, None, Some(vec!["bob".into()]))).unwrap()),
            vec![2]
        );
        assert_eq!(
            revs(events(&mut pg, &filter(0, None, Some(vec![]))).unwrap()),
            Vec::<i64>::new()
        );
        let mut limited = filter(0, None, None);
        limited.limit = 2;
        assert_eq!(revs(events(&mut pg, &limited).unwrap()), vec![1, 2]);
        limited.max_bytes = 0;
        assert_eq!(revs(events(&mut pg, &limited).unwrap()), vec![1]);
    }

    /// A stored answer comes back with its fingerprint, its connection's
    /// metadata put back from its blob; an error answer as the error.
    #[test]
    fn stored_answers_read_back_with_their_metadata() {
        let mut pg = database();
        let mut x = connection(ConnectionId::generate(), "a", State::Connected, 10);
        x.metadata
            .insert("big".into(), serde_json::json!("y".repeat(50)));
        blob(
            &mut pg,
            b"h1",
            &codec::encode_metadata(&x.metadata).unwrap(),
        );
        let answer = "INSERT INTO requests (request_id, fingerprint, connection_id, answer, time, \
             metadata_blob) VALUES ($1, $2, $3, $4, 1, $5)";
        let ok = codec::encode_answer(&Ok(x.clone()), false).unwrap();
        let gone = Error::NotFound { id: "z".into() };
        let err = codec::encode_answer(&Err(gone), false).unwrap();
        let named: Option<&[u8]> = Some(b"h1");
        pg.execute(answer, &[&"r1", &42i64, &uuid(&x.id), &ok, &named])
            .unwrap();
        pg.execute(answer, &[&"r2", &-3i64, &uuid(&x.id), &err, &None::<&[u8]>])
            .unwrap();
        let (fingerprint, read) = request_answer(&mut pg, "r1").unwrap().unwrap();
        assert_eq!(fingerprint, 42);
        assert_eq!(read.unwrap(), x);
        let (fingerprint, read) = request_answer(&mut pg, "r2").unwrap().unwrap();
        assert_eq!(fingerprint, -3);
        assert!(
            matches!(read, Err(Error::NotFound { ref id }) if id == "z"),
            "{read:?}"
        );
        assert!(request_answer(&mut pg, "r3").unwrap().is_none());
    }

    /// Credentials by id and in creation order by owner; which live
    /// connection uses one; the key check.
    #[test]
    fn credentials_and_the_key_check_read_back() {
        let mut pg = database();
        let add = "INSERT INTO credentials (id, name, type, owner, nonce, sealed, create_time, \
             allowed_hosts) VALUES ($1, $2, 'basic', $3, $4, $5, $6, $7)";
        for (id, owner, at) in [("c1", "alice", 5), ("c2", "bob", 5), ("c0", "alice", 9)] {
            let nonce: &[u8] = b"nonce";
            let sealed = format!("sealed {id}").into_bytes();
            let hosts = codec::encode_hosts(&[format!("{id}.example")]).unwrap();
            pg.execute(
                add,
                &[
                    &id,
                    &format!("name {id}"),
                    &owner,
                    &nonce,
                    &sealed,
                    &(at as i64),
                    &hosts,
                ],
            )
            .unwrap();
        }
        let c1 = credential(&mut pg, "c1").unwrap().unwrap();
        assert_eq!(
            (
                c1.name.as_str(),
                c1.type_.as_str(),
                c1.owner.as_str(),
                c1.create_time
            ),
            ("name c1", "basic", "alice", 5)
        );
        assert_eq!(
            (c1.nonce, c1.sealed),
            (b"nonce".to_vec(), b"sealed c1".to_vec())
        );
        assert_eq!(c1.allowed_hosts, vec!["c1.example".to_string()]);
        assert!(credential(&mut pg, "c9").unwrap().is_none());
        let ids = |v: Vec<StoredCredential>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(
            ids(credentials(&mut pg, None, 10, None).unwrap()),
            ["c1", "c2", "c0"]
        );
        assert_eq!(
            ids(credentials(&mut pg, None, 2, None).unwrap()),
            ["c1", "c2"]
        );
        assert_eq!(
            ids(credentials(&mut pg, Some((5, "c1".into())), 10, None).unwrap()),
            ["c2", "c0"]
        );
        let alice = ["alice".to_string()];
        assert_eq!(
            ids(credentials(&mut pg, None, 10, Some(&alice)).unwrap()),
            ["c1", "c0"]
        );
        assert!(
            credentials(&mut pg, None, 10, Some(&[]))
                .unwrap()
                .is_empty()
        );

        let mut user = connection(ConnectionId::generate(), "u", State::Connected, 1);
        user.credential_id = "c1".into();
        let mut tombstone = connection(ConnectionId::generate(), "t", State::Deleted, 2);
        tombstone.credential_id = "c2".into();
        insert(&mut pg, &user);
        insert(&mut pg, &tombstone);
        assert_eq!(
            credential_user(&mut pg, "c1", None).unwrap(),
            Some(user.id.clone())
        );
        assert_eq!(
            credential_user(&mut pg, "c1", Some(&user.id)).unwrap(),
            None
        );
        assert_eq!(
            credential_user(&mut pg, "c1", Some(&tombstone.id)).unwrap(),
            Some(user.id.clone())
        );
        assert_eq!(credential_user(&mut pg, "c2", None).unwrap(), None);
        assert_eq!(credential_user(&mut pg, "", None).unwrap(), None);

        assert_eq!(key_check(&mut pg).unwrap(), None);
        pg.execute(
            "INSERT INTO key_check (id, nonce, sealed) VALUES (1, $1, $2)",
            &[&b"n".as_slice(), &b"s".as_slice()],
        )
        .unwrap();
        assert_eq!(
            key_check(&mut pg).unwrap(),
            Some((b"n".to_vec(), b"s".to_vec()))
        );
    }

    /// Snapshot pages, by rows and by bytes, are SQLite's: the same rows,
    /// each once in creation order, and the same cursors.
    #[test]
    fn snapshot_pages_are_sqlites() {
        let mut pg = database();
        let (_dir, lite) = sqlite();
        assert_eq!(last_create_time(&mut pg).unwrap(), 0);
        let rows = dataset();
        for x in &rows {
            insert(&mut pg, x);
            insert_sqlite(&lite, x);
        }
        assert_eq!(
            last_create_time(&mut pg).unwrap(),
            rows.last().unwrap().create_time
        );
        assert_eq!(
            last_create_time(&mut pg).unwrap(),
            query::last_create_time(&lite).unwrap()
        );
        let one_row = rows[0].approx_size();
        for filter in filters(&rows) {
            for (max_rows, max_bytes) in [(3, usize::MAX), (100, 2 * one_row), (0, 0)] {
                let (mut after, mut seen, mut pages) = (None, Vec::new(), 0);
                loop {
                    let (page, next) =
                        snapshot_page(&mut pg, &filter, after.as_ref(), max_rows, max_bytes)
                            .unwrap();
                    let expected =
                        query::snapshot_page(&lite, &filter, after.as_ref(), max_rows, max_bytes)
                            .unwrap();
                    assert_eq!((&page, &next), (&expected.0, &expected.1), "{filter:?}");
                    pages += 1;
                    seen.extend(page.into_iter().map(|c| c.id));
                    match next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
                let (counts, _) = count(&mut pg, &filter).unwrap();
                let matching: i64 = counts.iter().map(|(_, n)| n).sum();
                assert_eq!(seen.len() as i64, matching, "{filter:?}");
                let in_order: Vec<ConnectionId> = rows
                    .iter()
                    .map(|x| x.id.clone())
                    .filter(|id| seen.contains(id))
                    .collect();
                assert_eq!(seen, in_order, "{filter:?}");
                if matching > 3 {
                    assert!(pages > 1, "{filter:?} {max_rows} {max_bytes}");
                }
            }
        }
    }

    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(
            numbered("a = ? AND b IN (?, ?)"),
            "a = $1 AND b IN ($2, $3)"
        );
        assert_eq!(
            numbered("a = ?2 OR b = ?1 OR c = ?12"),
            "a = $2 OR b = $1 OR c = $12"
        );
        assert_eq!(numbered("no marks"), "no marks");
    }
}
