//! The domain model: a connection, its id, the events that record its changes,
//! and the parsing rules for every field a client may send.
//!
//! No I/O and no proto types here; `service` converts to and from the wire and
//! `store` persists these values.

use crate::error::Error;
use crate::lifecycle::{State, Trigger};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// A connection's id: a UUID, shown in its canonical lowercase hyphenated
/// form. Its bytes sort as that text does.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ConnectionId(uuid::Uuid);

impl ConnectionId {
    /// A fresh id: a UUIDv7, whose leading bits are the time it was made,
    /// so new rows go at the end of the primary key and of every index that
    /// starts with the id, instead of on a random page of each.
    pub(crate) fn generate() -> Self {
        ConnectionId(uuid::Uuid::now_v7())
    }

    /// Parses a client-supplied id; `field` names it in the error.
    pub(crate) fn parse(s: &str, field: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Err(Error::invalid(field, "is required"));
        }
        uuid::Uuid::try_parse(s)
            .map(ConnectionId)
            .map_err(|_| Error::invalid(field, format!("{s:?} is not a UUID")))
    }

    /// The id of these 16 bytes (as the store keeps it).
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        uuid::Uuid::from_slice(bytes).ok().map(ConnectionId)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

/// A store-wide revision. Every committed change takes the next one, so
/// revisions order all changes across all connections; 0 is "before the
/// first change". Watchers resume after one, etags name one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(i64);

impl Revision {
    /// Before any change.
    pub const ZERO: Revision = Revision(0);

    pub fn new(n: i64) -> Revision {
        Revision(n)
    }

    /// A revision a client sent in `field`: never negative (0: none).
    pub(crate) fn parse(n: i64, field: &str) -> Result<Revision, Error> {
        if n < 0 {
            return Err(Error::invalid(field, "must not be negative"));
        }
        Ok(Revision(n))
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// The revision the next change takes.
    pub(crate) fn next(self) -> Revision {
        Revision(self.0 + 1)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Microseconds since the Unix epoch.
pub(crate) type Micros = i64;

/// The current time in microseconds since the Unix epoch.
pub(crate) fn now_micros() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A 64-bit FNV-1a digest: stable across builds and platforms (unlike std's
/// hasher), for values that are stored or handed to clients.
pub(crate) fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A connection as stored.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Connection {
    pub(crate) id: ConnectionId,
    pub(crate) kind: String,
    pub(crate) type_: String,
    pub(crate) sub_type: String,
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) url: String,
    pub(crate) identity: String,
    pub(crate) metadata: serde_json::Map<String, serde_json::Value>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) managed: bool,
    pub(crate) credential_id: String,
    pub(crate) owner: String,
    pub(crate) state: State,
    pub(crate) state_reason: String,
    pub(crate) state_trigger: Trigger,
    pub(crate) state_time: Micros,
    /// Store revision of its last change.
    pub(crate) revision: Revision,
    pub(crate) create_time: Micros,
    pub(crate) update_time: Micros,
    /// The latest reachability check; changing it alone records no event.
    pub(crate) last_probe: Option<ProbeResult>,
}

/// What a reachability check saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProbeOutcome {
    Reachable,
    Unreachable,
    CredentialsRejected,
}

/// One reachability check's result, as kept on the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProbeResult {
    pub(crate) time: Micros,
    pub(crate) outcome: ProbeOutcome,
    pub(crate) latency_ms: i64,
    pub(crate) message: String,
    /// Failed checks in a row, reset by a successful one.
    pub(crate) consecutive_failures: i32,
}

impl Connection {
    /// The opaque version tag clients send back for optimistic concurrency.
    /// Every change gets a new revision, so the revision identifies the version.
    pub(crate) fn etag(&self) -> String {
        format!("r{}", self.revision)
    }

    /// A new DISCOVERED tcp connection named `name` (its identity its id),
    /// as the store's tests make them.
    #[cfg(test)]
    pub(crate) fn for_test(name: &str) -> Connection {
        let id = ConnectionId::generate();
        Connection {
            identity: id.to_string(),
            id,
            kind: "tcp".into(),
            type_: String::new(),
            sub_type: String::new(),
            name: name.into(),
            description: String::new(),
            url: String::new(),
            metadata: Default::default(),
            labels: Default::default(),
            managed: false,
            credential_id: String::new(),
            owner: String::new(),
            state: State::Discovered,
            state_reason: String::new(),
            state_trigger: Trigger::User,
            state_time: 0,
            revision: Revision::ZERO,
            create_time: 0,
            update_time: 0,
            last_probe: None,
        }
    }

    /// About how many bytes the connection takes in memory or on the wire:
    /// its text and metadata, plus a fixed allowance for the rest. Counted
    /// without allocating, for budgets.
    pub(crate) fn approx_size(&self) -> usize {
        const FIXED: usize = 256;
        let text = [
            &self.kind,
            &self.type_,
            &self.sub_type,
            &self.name,
            &self.description,
            &self.url,
            &self.identity,
            &self.credential_id,
            &self.owner,
            &self.state_reason,
        ];
        FIXED
            + uuid::fmt::Hyphenated::LENGTH
            + text.iter().map(|s| s.len()).sum::<usize>()
            + self
                .labels
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + self
                .metadata
                .iter()
                .map(|(k, v)| k.len() + json_size(v))
                .sum::<usize>()
            + self.last_probe.as_ref().map_or(0, |p| p.message.len() + 32)
    }
}

/// About how many bytes a JSON value takes, without encoding it.
fn json_size(v: &serde_json::Value) -> usize {
    use serde_json::Value as V;
    8 + match v {
        V::Null | V::Bool(_) | V::Number(_) => 0,
        V::String(s) => s.len(),
        V::Array(a) => a.iter().map(json_size).sum(),
        V::Object(o) => o.iter().map(|(k, v)| k.len() + json_size(v)).sum(),
    }
}

/// What kind of change an event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Created,
    Updated,
    Transitioned,
    Deleted,
}

impl EventType {
    pub(crate) fn number(self) -> i32 {
        match self {
            EventType::Created => 1,
            EventType::Updated => 2,
            EventType::Transitioned => 3,
            EventType::Deleted => 4,
        }
    }

    pub(crate) fn from_number(n: i32) -> Option<EventType> {
        match n {
            1 => Some(EventType::Created),
            2 => Some(EventType::Updated),
            3 => Some(EventType::Transitioned),
            4 => Some(EventType::Deleted),
            _ => None,
        }
    }
}

/// One committed change, with the connection as it was right after it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Event {
    pub(crate) revision: Revision,
    pub(crate) connection_id: ConnectionId,
    pub(crate) type_: EventType,
    /// The state before the change (equal to `to_state` for updates; for
    /// creations, the first state).
    pub(crate) from_state: State,
    pub(crate) to_state: State,
    pub(crate) trigger: Trigger,
    pub(crate) reason: String,
    pub(crate) actor: String,
    pub(crate) time: Micros,
    /// The connection after the change.
    pub(crate) connection: Connection,
    /// What readers of a shared (`Arc`) event work out once for all of them;
    /// `Default::default()` when the event is made.
    pub(crate) cache: EventCache,
}

impl Event {
    /// About how many bytes the event takes; see [`Connection::approx_size`].
    /// Worked out once per event.
    pub(crate) fn approx_size(&self) -> usize {
        *self.cache.size.get_or_init(|| {
            64 + self.reason.len() + self.actor.len() + self.connection.approx_size()
        })
    }

    /// The event's bytes as the layer that sends it encodes them, made by
    /// the first caller (with `encode`) and shared with every later one.
    /// Opaque here: the format is the sender's business.
    pub(crate) fn encoded(&self, encode: impl FnOnce(&Event) -> Vec<u8>) -> &[u8] {
        self.cache
            .encoded
            .get_or_init(|| encode(self).into_boxed_slice())
    }
}

/// Values derived from an [`Event`], filled lazily and at most once, so that
/// the many watchers sharing one event do not each work them out (and hold
/// them). Not part of the event's value: a clone starts empty and any two
/// caches are equal.
#[derive(Default)]
pub(crate) struct EventCache {
    size: OnceLock<usize>,
    encoded: OnceLock<Box<[u8]>>,
}

impl Clone for EventCache {
    fn clone(&self) -> Self {
        EventCache::default()
    }
}

impl PartialEq for EventCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for EventCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventCache")
            .field("encoded", &self.encoded.get().map(|b| b.len()))
            .finish_non_exhaustive()
    }
}

/// Field limits. Generous enough for real use, small enough that one request
/// cannot bloat the database or a watch stream.
pub(crate) mod limits {
    pub(crate) const KIND: usize = 63;
    pub(crate) const SHORT: usize = 255;
    pub(crate) const DESCRIPTION: usize = 4096;
    pub(crate) const URL: usize = 2048;
    pub(crate) const IDENTITY: usize = 1024;
    pub(crate) const LABELS: usize = 64;
    pub(crate) const LABEL_KEY: usize = 63;
    pub(crate) const LABEL_VALUE: usize = 255;
    pub(crate) const METADATA_BYTES: usize = 64 * 1024;
    pub(crate) const REASON: usize = 1024;
    pub(crate) const REQUEST_ID: usize = 128;
}

/// Checks that `value` is at most `max` bytes.
/// `s` cut to at most `max` bytes on a character boundary, marked with `…`
/// when cut: for echoing a client's value in a message.
pub(crate) fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

pub(crate) fn check_len(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long, the limit is {max}", value.len()),
        ));
    }
    Ok(())
}

/// A kind: lowercase letters, digits, `-` and `_`, starting with a letter.
pub(crate) fn parse_kind(field: &str, s: &str) -> Result<String, Error> {
    if s.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    check_len(field, s, limits::KIND)?;
    let ok = s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        return Err(Error::invalid(
            field,
            format!("{s:?} must be lowercase letters, digits, '-' or '_', starting with a letter"),
        ));
    }
    Ok(s.to_owned())
}

/// A url: empty, or absolute with a scheme and a host. Returned normalised
/// (lowercase scheme and host, default port dropped).
pub(crate) fn parse_url(field: &str, s: &str) -> Result<String, Error> {
    if s.is_empty() {
        return Ok(String::new());
    }
    check_len(field, s, limits::URL)?;
    // Messages never repeat the url: it might hold a password.
    let mut u =
        url::Url::parse(s).map_err(|e| Error::invalid(field, format!("is not a url: {e}")))?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(Error::invalid(
            field,
            "must not carry a user name or password; store them in a credential",
        ));
    }
    let host = match u.host_str() {
        Some(h) if !h.is_empty() => h.to_owned(),
        _ => return Err(Error::invalid(field, "has no host")),
    };
    // Host names are case-insensitive; `url` lowercases them only for the
    // schemes it knows (http, https, ...), not for tcp:// and the like.
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        u.set_host(Some(&host.to_ascii_lowercase()))
            .map_err(|e| Error::invalid(field, format!("has a bad host: {e}")))?;
    }
    Ok(u.to_string())
}

/// The natural key when the client gives none: kind and normalised url, or the id.
pub(crate) fn derive_identity(kind: &str, url: &str, id: &ConnectionId) -> String {
    if url.is_empty() {
        id.to_string()
    } else {
        format!("{kind}:{}", identity_url(url))
    }
}

/// The url as part of an identity: urls that differ only by an empty query,
/// a fragment or trailing slashes name the same thing (the lifecycle's
/// discovery rule), so they derive the same identity. The stored url keeps
/// what was given.
fn identity_url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return url.to_owned();
    };
    u.set_fragment(None);
    if u.query() == Some("") {
        u.set_query(None);
    }
    let trimmed = u.path().trim_end_matches('/').to_owned();
    if trimmed != u.path() {
        // A special scheme (http, https) keeps "/" for an empty path.
        u.set_path(&trimmed);
    }
    u.to_string()
}

/// Labels: at most 64, keys like Kubernetes label keys, values of bounded length.
pub(crate) fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), Error> {
    if labels.len() > limits::LABELS {
        return Err(Error::invalid(
            field,
            format!(
                "has {} labels, the limit is {}",
                labels.len(),
                limits::LABELS
            ),
        ));
    }
    for (k, v) in labels {
        check_label_key(field, k)?;
        check_len(&format!("{field}[{k}]"), v, limits::LABEL_VALUE)?;
    }
    Ok(())
}

/// A label key: 1-63 of letters, digits, `-`, `_`, `.` and `/`.
pub(crate) fn check_label_key(field: &str, k: &str) -> Result<(), Error> {
    let ok = !k.is_empty()
        && k.len() <= limits::LABEL_KEY
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("label key {k:?} must be 1-63 letters, digits, '-', '_', '.' or '/'"),
        ))
    }
}

/// Metadata: a JSON object of bounded encoded size.
pub(crate) fn check_metadata(
    field: &str,
    m: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), Error> {
    let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > limits::METADATA_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "is {size} bytes as JSON, the limit is {}",
                limits::METADATA_BYTES
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_sort_in_the_order_they_were_made() {
        let ids: Vec<ConnectionId> = (0..10_000).map(|_| ConnectionId::generate()).collect();
        assert!(ids.windows(2).all(|w| w[0].to_string() < w[1].to_string()));
        // And each is one a client could have sent.
        assert_eq!(
            ConnectionId::parse(&ids[0].to_string(), "id").unwrap(),
            ids[0]
        );
    }

    #[test]
    fn ids_are_canonical_uuids() {
        let id = ConnectionId::parse("6F9619FF-8B86-D011-B42D-00C04FC964FF", "id").unwrap();
        assert_eq!(id.to_string(), "6f9619ff-8b86-d011-b42d-00c04fc964ff");
        assert!(ConnectionId::parse("nope", "id").is_err());
        assert!(ConnectionId::parse("", "id").is_err());
    }

    #[test]
    fn urls_are_normalised_and_need_a_host() {
        assert_eq!(
            parse_url("url", "HTTP://Prom.Example:80/metrics").unwrap(),
            "http://prom.example/metrics"
        );
        assert_eq!(parse_url("url", "tcp://db:5432").unwrap(), "tcp://db:5432");
        assert!(parse_url("url", "not a url").is_err());
        let e = parse_url("url", "http://admin:hunter2@db:80/").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(parse_url("url", "file:///etc/passwd").is_err());
        assert_eq!(parse_url("url", "").unwrap(), "");
    }

    #[test]
    fn kinds_are_lowercase_words() {
        assert!(parse_kind("kind", "prometheus").is_ok());
        assert!(parse_kind("kind", "k8s_v1-x").is_ok());
        assert!(parse_kind("kind", "Prometheus").is_err());
        assert!(parse_kind("kind", "").is_err());
        assert!(parse_kind("kind", "1abc").is_err());
    }

    #[test]
    fn identity_falls_back_to_the_id() {
        let id = ConnectionId::generate();
        assert_eq!(derive_identity("tcp", "", &id), id.to_string());
        assert_eq!(derive_identity("tcp", "tcp://a:1", &id), "tcp:tcp://a:1");
        for same in ["tcp://a:1/", "tcp://a:1?", "tcp://a:1#x", "tcp://a:1/?#"] {
            assert_eq!(derive_identity("tcp", same, &id), "tcp:tcp://a:1", "{same}");
        }
        for same in ["http://a/", "http://a", "http://a/?", "http://a/#top"] {
            assert_eq!(
                derive_identity("http", same, &id),
                "http:http://a/",
                "{same}"
            );
        }
        for same in ["http://a/p", "http://a/p/", "http://a/p?#f", "http://a/p//"] {
            assert_eq!(
                derive_identity("http", same, &id),
                "http:http://a/p",
                "{same}"
            );
        }
        assert_eq!(
            derive_identity("http", "http://a/p/?x=1", &id),
            "http:http://a/p?x=1"
        );
    }
}
