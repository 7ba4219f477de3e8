//! Paging, one rule for every list RPC: the page size (the default when a
//! request names none, coerced down to the maximum, a negative one refused),
//! `order_by` parsed into the store's typed [`Order`], and the one page-token
//! format (ListConnections and ListCredentials; ListConnectionEvents pages by
//! revision and ListDefinitions does not page).
//!
//! A page token is opaque to clients: base64url (no padding) of JSON
//! `{"k": sort key, "i": id, "q": query digest}`, where `k` and `i` are the
//! store's [`Cursor`] (the last row returned) and `q` is a digest of the
//! [`Query`] it was issued for, so a token reused with other filters, another
//! order or by a caller of another scope is refused instead of silently
//! skipping rows. The store sees only typed values, never this syntax.

use crate::connection::digest;
use crate::error::Error;
use crate::store::{Cursor, CursorKey, Filter, Order, OrderField};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The page sizes of one list: what a request naming none gets, and the most
/// any request gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageSizes {
    pub(crate) default: usize,
    pub(crate) max: usize,
}

impl PageSizes {
    /// The page size for a request's `page_size`.
    pub(crate) fn page_size(self, requested: i32) -> Result<usize, Error> {
        match requested {
            n if n < 0 => Err(Error::invalid("page_size", "must not be negative")),
            0 => Ok(self.default),
            // AIP-158: a larger page than allowed is coerced, not refused.
            n => Ok((n as usize).min(self.max)),
        }
    }
}

/// Parses `order_by`: `create_time`, `update_time` or `name`, optionally
/// followed by `desc` or `asc`; empty is `create_time`.
pub(crate) fn order_by(s: &str) -> Result<Order, Error> {
    let words: Vec<&str> = s.split_whitespace().collect();
    let (field, dir) = match words.as_slice() {
        [] => return Ok(Order::default()),
        [f] => (*f, "asc"),
        [f, d] => (*f, *d),
        _ => return Err(bad_order(s)),
    };
    let field = match field {
        "create_time" => OrderField::CreateTime,
        "update_time" => OrderField::UpdateTime,
        "name" => OrderField::Name,
        _ => return Err(bad_order(s)),
    };
    let descending = match dir.to_ascii_lowercase().as_str() {
        "asc" => false,
        "desc" => true,
        _ => return Err(bad_order(s)),
    };
    Ok(Order { field, descending })
}

fn bad_order(s: &str) -> Error {
    Error::invalid(
        "order_by",
        format!("{s:?}: use create_time, update_time or name, optionally followed by desc"),
    )
}

/// The query a page token belongs to: a digest of the list it pages and of
/// everything that decides which rows it returns and in what order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Query(u64);

impl Query {
    /// A ListConnections query.
    pub(crate) fn connections(filter: &Filter, order: Order) -> Query {
        // Named field by field, so that a new filter field cannot be left out.
        let Filter {
            kinds,
            states,
            types,
            ids,
            search,
            labels,
            show_deleted,
            owners,
        } = filter;
        let mut q = Canonical::new("connections");
        q.texts(kinds.iter().map(String::as_str));
        q.number(states.len() as i64);
        for s in states {
            q.number(s.number().into());
        }
        q.texts(types.iter().map(String::as_str));
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        q.texts(ids.iter().map(String::as_str));
        q.text(search);
        q.number(labels.len() as i64);
        for (k, v) in labels {
            q.text(k).text(v);
        }
        q.number((*show_deleted).into());
        q.owners(owners.as_deref());
        q.number(match order.field {
            OrderField::CreateTime => 0,
            OrderField::UpdateTime => 1,
            OrderField::Name => 2,
        });
        q.number(order.descending.into());
        q.finish()
    }

    /// A ListCredentials query: all the caller's scope decides.
    pub(crate) fn credentials(owners: Option<&[String]>) -> Query {
        let mut q = Canonical::new("credentials");
        q.owners(owners);
        q.finish()
    }
}

/// An unambiguous byte string of a query's parts: each text is
/// length-prefixed, each list counted.
struct Canonical(Vec<u8>);

impl Canonical {
    fn new(list: &str) -> Canonical {
        let mut c = Canonical(Vec::new());
        c.text(list);
        c
    }

    fn number(&mut self, n: i64) -> &mut Self {
        self.0.extend(n.to_le_bytes());
        self
    }

    fn text(&mut self, s: &str) -> &mut Self {
        self.number(s.len() as i64);
        self.0.extend(s.as_bytes());
        self
    }

    fn texts<'a>(&mut self, items: impl ExactSizeIterator<Item = &'a str>) -> &mut Self {
        self.number(items.len() as i64);
        for s in items {
            self.text(s);
        }
        self
    }

    /// A scope: every owner (`None`), or these, in any order.
    fn owners(&mut self, owners: Option<&[String]>) -> &mut Self {
        match owners {
            None => self.number(-1),
            Some(o) => {
                let mut o: Vec<&str> = o.iter().map(String::as_str).collect();
                o.sort_unstable();
                o.dedup();
                self.texts(o.into_iter())
            }
        }
    }

    fn finish(&self) -> Query {
        Query(digest(&self.0))
    }
}

/// A page token as it is serialised.
#[derive(Serialize, Deserialize)]
struct Token {
    #[serde(rename = "k")]
    key: Key,
    #[serde(rename = "i")]
    id: String,
    #[serde(rename = "q")]
    query: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Key {
    Int(i64),
    Text(String),
}

/// The page token for the page after `cursor` of `query`.
pub(crate) fn encode(cursor: &Cursor, query: Query) -> String {
    let token = Token {
        key: match &cursor.key {
            CursorKey::Int(i) => Key::Int(*i),
            CursorKey::Text(s) => Key::Text(s.clone()),
        },
        id: cursor.id.clone(),
        query: query.0,
    };
    let json = serde_json::to_vec(&token).expect("a token always serialises");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

/// Reads a request's `page_token` for `query`: `None` for the first page.
pub(crate) fn decode(token: &str, query: Query) -> Result<Option<Cursor>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| not_issued())?;
    let token: Token = serde_json::from_slice(&bytes).map_err(|_| not_issued())?;
    if token.query != query.0 {
        return Err(Error::invalid(
            "page_token",
            "was issued for a different query (filters, order_by or caller)",
        ));
    }
    Ok(Some(Cursor {
        key: match token.key {
            Key::Int(i) => CursorKey::Int(i),
            Key::Text(s) => CursorKey::Text(s),
        },
        id: token.id,
    }))
}

fn not_issued() -> Error {
    Error::invalid("page_token", "is not a token this server issued")
}

/// A list in creation order (credentials) keeps its cursor as
/// `(create_time, id)`: the token for the page after it.
pub(crate) fn encode_created(after: &(i64, String), query: Query) -> String {
    encode(
        &Cursor {
            key: CursorKey::Int(after.0),
            id: after.1.clone(),
        },
        query,
    )
}

/// Reads the `page_token` of a list in creation order.
pub(crate) fn decode_created(token: &str, query: Query) -> Result<Option<(i64, String)>, Error> {
    match decode(token, query)? {
        None => Ok(None),
        Some(Cursor {
            key: CursorKey::Int(t),
            id,
        }) => Ok(Some((t, id))),
        Some(_) => Err(not_issued()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::State;

    fn field(e: Error) -> String {
        match e {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("not invalid: {other:?}"),
        }
    }

    #[test]
    fn page_sizes_default_coerce_and_refuse_negatives() {
        let sizes = PageSizes {
            default: 50,
            max: 1000,
        };
        assert_eq!(sizes.page_size(0).unwrap(), 50);
        assert_eq!(sizes.page_size(7).unwrap(), 7);
        assert_eq!(sizes.page_size(5000).unwrap(), 1000);
        assert_eq!(field(sizes.page_size(-1).unwrap_err()), "page_size");
    }

    #[test]
    fn order_by_takes_a_field_and_a_direction() {
        assert_eq!(order_by("").unwrap(), Order::default());
        let name_desc = Order {
            field: OrderField::Name,
            descending: true,
        };
        assert_eq!(order_by("name desc").unwrap(), name_desc);
        assert_eq!(order_by("  name   DESC ").unwrap(), name_desc);
        assert_eq!(
            order_by("update_time asc").unwrap(),
            Order {
                field: OrderField::UpdateTime,
                descending: false,
            }
        );
        for bad in ["colour", "name up", "name desc now", "desc"] {
            assert_eq!(field(order_by(bad).unwrap_err()), "order_by", "{bad}");
        }
    }

    #[test]
    fn tokens_come_back_for_their_own_query_only() {
        let filter = Filter {
            kinds: vec!["http".into()],
            states: vec![State::Discovered],
            ..Filter::default()
        };
        let order = order_by("name").unwrap();
        let query = Query::connections(&filter, order);
        let cursor = Cursor {
            key: CursorKey::Text("b".into()),
            id: "x".into(),
        };
        let token = encode(&cursor, query);
        assert_eq!(decode(&token, query).unwrap(), Some(cursor));
        assert_eq!(decode("", query).unwrap(), None);

        let other_filter = Filter {
            kinds: vec!["grafana".into()],
            ..filter.clone()
        };
        let other_scope = Filter {
            owners: Some(vec!["alice".into()]),
            ..filter.clone()
        };
        for other in [
            Query::connections(&other_filter, order),
            Query::connections(&other_scope, order),
            Query::connections(&filter, order_by("name desc").unwrap()),
            Query::credentials(None),
        ] {
            assert_ne!(other, query);
            assert_eq!(field(decode(&token, other).unwrap_err()), "page_token");
        }
        assert_eq!(
            field(decode("not-a-token", query).unwrap_err()),
            "page_token"
        );
    }

    #[test]
    fn creation_order_tokens_carry_time_and_id() {
        let mine = Query::credentials(Some(&["b".into(), "a".into()]));
        assert_eq!(mine, Query::credentials(Some(&["a".into(), "b".into()])));
        assert_ne!(mine, Query::credentials(None));
        assert_ne!(mine, Query::credentials(Some(&[])));
        let token = encode_created(&(42, "id".into()), mine);
        assert_eq!(
            decode_created(&token, mine).unwrap(),
            Some((42, "id".into()))
        );
        let text = encode(
            &Cursor {
                key: CursorKey::Text("n".into()),
                id: "id".into(),
            },
            mine,
        );
        assert_eq!(
            field(decode_created(&text, mine).unwrap_err()),
            "page_token"
        );
    }
}
