//! Conversions across the proto boundary, both ways: requests into domain
//! values (ids, urls, kinds, states, filters, patches, checked against the
//! limits in [`crate::connection`]) so the engine only sees well-formed input, and
//! domain values into responses. Also `google.protobuf.Struct` <-> JSON,
//! timestamps and durations.

use crate::access::Principal;
use crate::connection::{
    Connection, ConnectionId, Event, EventType, ProbeOutcome, ProbeResult, check_labels, check_len,
    check_metadata, limits, parse_kind, parse_url,
};
use crate::credentials::CredentialInfo;
use crate::definitions::Definition;
use crate::engine::{
    CreateRequest, Discovered, NewConnection, Patch, Reporter, RequestKey, TransitionRequest,
    UpdateRequest,
};
use crate::error::Error;
use crate::lifecycle::{self, State, Trigger};
use crate::pb::tether::v1 as pb;
use crate::store::Filter;
use crate::watch::{Change, Item};
use std::collections::BTreeMap;

// ---- requests -> domain ----

/// A `TransitionConnectionRequest` (alone, or item `field` of a batch) as
/// the engine's request; `request` is its retry key, already made.
pub(crate) fn transition_from_pb(
    r: pb::TransitionConnectionRequest,
    request: Option<RequestKey>,
    principal: &Principal,
    field: &str,
) -> Result<TransitionRequest, Error> {
    check_len(&format!("{field}reason"), &r.reason, limits::REASON)?;
    Ok(TransitionRequest {
        id: ConnectionId::parse(&r.id, &format!("{field}id"))?,
        target: state_from_pb(r.target_state, &format!("{field}target_state"))?,
        reason: r.reason,
        etag: non_empty(r.etag),
        skip_verification: r.skip_verification,
        request,
        actor: principal.name.clone(),
        scope: principal.scope.clone(),
        method: if field.is_empty() {
            "tether.v1.ConnectionService/TransitionConnection"
        } else {
            "tether.v1.ConnectionService/BatchTransitionConnections"
        },
    })
}

/// A `CreateConnectionRequest` as the engine's request; `request` is its
/// retry key, already made.
pub(crate) fn create_from_pb(
    r: pb::CreateConnectionRequest,
    request: Option<RequestKey>,
    principal: &Principal,
) -> Result<CreateRequest, Error> {
    let initial_state = match r.initial_state {
        0 => lifecycle::INITIAL,
        n => state_from_pb(n, "initial_state")?,
    };
    let mut connection = new_connection(r.connection.unwrap_or_default())?;
    connection.owner = principal.owner_for(&connection.owner, "connection.owner")?;
    Ok(CreateRequest {
        connection,
        initial_state,
        skip_verification: r.skip_verification,
        request,
        actor: principal.name.clone(),
        scope: principal.scope.clone(),
    })
}

/// An `UpdateConnectionRequest` as the engine's request; `request` is its
/// retry key, already made.
pub(crate) fn update_from_pb(
    r: pb::UpdateConnectionRequest,
    request: Option<RequestKey>,
    principal: &Principal,
) -> Result<UpdateRequest, Error> {
    let body = r
        .connection
        .ok_or_else(|| Error::invalid("connection", "is required"))?;
    let id = ConnectionId::parse(&body.id, "connection.id")?;
    let etag = non_empty(body.etag.clone());
    let patch = patch_from_pb(body, r.update_mask)?;
    Ok(UpdateRequest {
        id,
        patch,
        etag,
        request,
        actor: principal.name.clone(),
        scope: principal.scope.clone(),
    })
}

/// A `DeleteConnectionRequest` as the transition to DELETED it is.
pub(crate) fn delete_from_pb(
    r: pb::DeleteConnectionRequest,
    request: Option<RequestKey>,
    principal: &Principal,
) -> Result<TransitionRequest, Error> {
    check_len("reason", &r.reason, limits::REASON)?;
    Ok(TransitionRequest {
        id: ConnectionId::parse(&r.id, "id")?,
        target: State::Deleted,
        reason: if r.reason.is_empty() {
            "deleted".into()
        } else {
            r.reason
        },
        etag: non_empty(r.etag),
        skip_verification: false,
        request,
        actor: principal.name.clone(),
        scope: principal.scope.clone(),
        method: "tether.v1.ConnectionService/DeleteConnection",
    })
}

/// A `ReportDiscoveredRequest`: who reports, and each reported connection
/// (a malformed one fails alone), at most `max` of them.
pub(crate) fn report_from_pb(
    r: pb::ReportDiscoveredRequest,
    principal: &Principal,
    max: usize,
) -> Result<(Reporter, Vec<Result<NewConnection, Error>>), Error> {
    if r.source.is_empty() {
        return Err(Error::invalid("source", "is required"));
    }
    check_len("source", &r.source, limits::SHORT)?;
    check_items("connections", r.connections.len(), max)?;
    let items = r
        .connections
        .into_iter()
        .map(|c| {
            let mut n = new_connection(c)?;
            n.owner = principal.owner_for(&n.owner, "owner")?;
            Ok(n)
        })
        .collect();
    let reporter = Reporter {
        source: r.source,
        actor: principal.name.clone(),
        scope: principal.scope.clone(),
    };
    Ok((reporter, items))
}

/// The `connection_id` of a `ListConnectionEventsRequest`: empty means every connection.
pub(crate) fn optional_id_from_pb(id: &str, field: &str) -> Result<Option<ConnectionId>, Error> {
    match id {
        "" => Ok(None),
        s => Ok(Some(ConnectionId::parse(s, field)?)),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn state_from_pb(n: i32, field: &str) -> Result<State, Error> {
    State::from_number(n).ok_or_else(|| {
        Error::invalid(
            field,
            if n == 0 {
                "is required".to_owned()
            } else {
                format!("{n} is not a ConnectionState")
            },
        )
    })
}

/// Refuses a list of `n` items when the limit is `max`.
pub(crate) fn check_items(field: &str, n: usize, max: usize) -> Result<(), Error> {
    if n > max {
        return Err(Error::invalid(
            field,
            format!("has {n} items, the limit is {max}"),
        ));
    }
    Ok(())
}

/// Most values one filter list may hold; keeps queries within SQLite's limits.
const MAX_FILTER_VALUES: usize = 1000;

fn check_count<T>(field: &str, values: &[T]) -> Result<(), Error> {
    if values.len() > MAX_FILTER_VALUES {
        return Err(Error::invalid(
            field,
            format!(
                "has {} values, the limit is {MAX_FILTER_VALUES}",
                values.len()
            ),
        ));
    }
    Ok(())
}

fn parse_states(states: Vec<i32>) -> Result<Vec<State>, Error> {
    check_count("states", &states)?;
    states
        .into_iter()
        .enumerate()
        .map(|(i, n)| state_from_pb(n, &format!("states[{i}]")))
        .collect()
}

fn parse_kinds(kinds: Vec<String>) -> Result<Vec<String>, Error> {
    check_count("kinds", &kinds)?;
    kinds
        .iter()
        .enumerate()
        .map(|(i, k)| parse_kind(&format!("kinds[{i}]"), k))
        .collect()
}

pub(crate) fn filter_from_pb(
    kinds: Vec<String>,
    states: Vec<i32>,
    types: Vec<String>,
    search: String,
    labels: BTreeMap<String, String>,
    show_deleted: bool,
    principal: &Principal,
) -> Result<Filter, Error> {
    check_len("search", &search, limits::SHORT)?;
    check_count("types", &types)?;
    for (i, t) in types.iter().enumerate() {
        check_len(&format!("types[{i}]"), t, limits::SHORT)?;
    }
    check_labels("labels", &labels)?;
    Ok(Filter {
        kinds: parse_kinds(kinds)?,
        states: parse_states(states)?,
        types,
        ids: Vec::new(),
        search,
        labels,
        show_deleted,
        owners: principal.scope.owners(),
    })
}

/// The connections a `WatchConnectionsRequest` covers, within the caller's scope.
pub(crate) fn watch_filter(
    kinds: Vec<String>,
    states: Vec<i32>,
    ids: &[String],
    principal: &Principal,
) -> Result<Filter, Error> {
    let mut filter = Filter {
        kinds: parse_kinds(kinds)?,
        states: parse_states(states)?,
        owners: principal.scope.owners(),
        ..Filter::default()
    };
    check_count("ids", ids)?;
    for (i, id) in ids.iter().enumerate() {
        filter
            .ids
            .push(ConnectionId::parse(id, &format!("ids[{i}]"))?);
    }
    Ok(filter)
}

fn new_connection(c: pb::Connection) -> Result<NewConnection, Error> {
    let kind = parse_kind("connection.kind", &c.kind)?;
    let url = parse_url("connection.url", &c.url)?;
    check_len("connection.type", &c.r#type, limits::SHORT)?;
    check_len("connection.sub_type", &c.sub_type, limits::SHORT)?;
    check_len("connection.name", &c.name, limits::SHORT)?;
    check_len(
        "connection.description",
        &c.description,
        limits::DESCRIPTION,
    )?;
    check_len("connection.identity", &c.identity, limits::IDENTITY)?;
    check_len("connection.credential_id", &c.credential_id, limits::SHORT)?;
    check_len("connection.owner", &c.owner, limits::SHORT)?;
    let labels = c.labels;
    check_labels("connection.labels", &labels)?;
    let metadata = struct_to_json("connection.metadata", c.metadata)?;
    check_metadata("connection.metadata", &metadata)?;
    // A connection needs a name people can read; the url, or the kind, will do.
    let name = if !c.name.is_empty() {
        c.name
    } else if !url.is_empty() {
        url.clone()
    } else {
        kind.clone()
    };
    Ok(NewConnection {
        kind,
        type_: c.r#type,
        sub_type: c.sub_type,
        name,
        description: c.description,
        url,
        identity: c.identity,
        metadata,
        labels,
        managed: c.managed,
        credential_id: c.credential_id,
        owner: c.owner,
    })
}

/// The fields an update mask may name.
const UPDATABLE: [&str; 8] = [
    "name",
    "description",
    "url",
    "metadata",
    "labels",
    "identity",
    "credential_id",
    "managed",
];

fn patch_from_pb(c: pb::Connection, mask: Option<prost_types::FieldMask>) -> Result<Patch, Error> {
    let paths: Vec<String> = match mask {
        Some(m) if !m.paths.is_empty() => m.paths,
        // AIP-134: without a mask, every updatable field that is set.
        _ => {
            let set = [
                !c.name.is_empty(),
                !c.description.is_empty(),
                !c.url.is_empty(),
                c.metadata.is_some(),
                !c.labels.is_empty(),
                !c.identity.is_empty(),
                !c.credential_id.is_empty(),
                c.managed.is_some(),
            ];
            UPDATABLE
                .iter()
                .zip(set)
                .filter(|(_, s)| *s)
                .map(|(f, _)| f.to_string())
                .collect()
        }
    };
    let mut fields = Vec::new();
    for p in &paths {
        match p.as_str() {
            "*" => fields.extend(UPDATABLE),
            f if UPDATABLE.contains(&f) => {
                fields.push(UPDATABLE[UPDATABLE.iter().position(|u| *u == f).expect("contained")])
            }
            f => {
                return Err(Error::invalid(
                    "update_mask",
                    format!(
                        "{f:?} cannot be updated; updatable fields: {}",
                        UPDATABLE.join(", ")
                    ),
                ));
            }
        }
    }
    // A path named twice (or `*` beside another) would be applied twice, the
    // second time to a value already taken out: refuse it instead.
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = fields.iter().find(|f| !seen.insert(**f)) {
        return Err(Error::invalid(
            "update_mask",
            format!("{twice:?} is named more than once (\"*\" names every field)"),
        ));
    }
    let mut patch = Patch::default();
    let mut c = c;
    for f in fields {
        match f {
            "name" => {
                if c.name.is_empty() {
                    return Err(Error::invalid("connection.name", "must not be empty"));
                }
                check_len("connection.name", &c.name, limits::SHORT)?;
                patch.name = Some(std::mem::take(&mut c.name));
            }
            "description" => {
                check_len(
                    "connection.description",
                    &c.description,
                    limits::DESCRIPTION,
                )?;
                patch.description = Some(std::mem::take(&mut c.description));
            }
            "url" => patch.url = Some(parse_url("connection.url", &c.url)?),
            "metadata" => {
                let m = struct_to_json("connection.metadata", c.metadata.take())?;
                check_metadata("connection.metadata", &m)?;
                patch.metadata = Some(m);
            }
            "labels" => {
                let labels = std::mem::take(&mut c.labels);
                check_labels("connection.labels", &labels)?;
                patch.labels = Some(labels);
            }
            "identity" => {
                check_len("connection.identity", &c.identity, limits::IDENTITY)?;
                patch.identity = Some(std::mem::take(&mut c.identity));
            }
            "credential_id" => {
                check_len("connection.credential_id", &c.credential_id, limits::SHORT)?;
                patch.credential_id = Some(std::mem::take(&mut c.credential_id));
            }
            "managed" => {
                patch.managed = Some(c.managed.ok_or_else(|| {
                    Error::invalid("connection.managed", "must be set when the mask names it")
                })?)
            }
            _ => unreachable!("only updatable fields are collected"),
        }
    }
    Ok(patch)
}

// ---- domain -> responses ----

fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn timestamp(micros: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    })
}

pub(crate) fn connection_to_pb(c: &Connection) -> pb::Connection {
    pb::Connection {
        id: c.id.to_string(),
        kind: c.kind.clone(),
        r#type: c.type_.clone(),
        sub_type: c.sub_type.clone(),
        name: c.name.clone(),
        description: c.description.clone(),
        url: c.url.clone(),
        identity: c.identity.clone(),
        metadata: Some(json_to_struct(&c.metadata)),
        labels: c.labels.clone(),
        managed: Some(c.managed),
        credential_id: c.credential_id.clone(),
        owner: c.owner.clone(),
        state: c.state.number(),
        state_reason: c.state_reason.clone(),
        state_trigger: c.state_trigger.number(),
        state_time: timestamp(c.state_time),
        revision: c.revision.get(),
        etag: c.etag(),
        create_time: timestamp(c.create_time),
        update_time: timestamp(c.update_time),
        last_probe: c.last_probe.as_ref().map(probe_to_pb),
    }
}

fn probe_to_pb(p: &ProbeResult) -> pb::ProbeResult {
    pb::ProbeResult {
        time: timestamp(p.time),
        outcome: match p.outcome {
            ProbeOutcome::Reachable => pb::ProbeOutcome::Reachable,
            ProbeOutcome::Unreachable => pb::ProbeOutcome::Unreachable,
            ProbeOutcome::CredentialsRejected => pb::ProbeOutcome::CredentialsRejected,
        } as i32,
        latency: Some(prost_types::Duration {
            seconds: p.latency_ms / 1000,
            nanos: ((p.latency_ms % 1000) * 1_000_000) as i32,
        }),
        message: p.message.clone(),
        consecutive_failures: p.consecutive_failures,
    }
}

fn event_type_to_pb(t: EventType) -> pb::EventType {
    match t {
        EventType::Created => pb::EventType::Created,
        EventType::Updated => pb::EventType::Updated,
        EventType::Transitioned => pb::EventType::Transitioned,
        EventType::Deleted => pb::EventType::Deleted,
    }
}

pub(crate) fn event_to_pb(e: &Event) -> pb::ConnectionEvent {
    pb::ConnectionEvent {
        revision: e.revision.get(),
        connection_id: e.connection_id.to_string(),
        r#type: event_type_to_pb(e.type_) as i32,
        from_state: e.from_state.number(),
        to_state: e.to_state.number(),
        trigger: e.trigger.number(),
        reason: e.reason.clone(),
        actor: e.actor.clone(),
        time: timestamp(e.time),
    }
}

/// A watch message as prost's own type; the stream sends the same bytes
/// through [`super::watch_wire::WatchMessage`].
pub(crate) fn watch_item_to_pb(item: Item) -> pb::WatchConnectionsResponse {
    use pb::WatchEventType as W;
    let (t, revision, connection) = match item {
        Item::Snapshot(c) => (W::Added, c.revision, Some(connection_to_pb(&c))),
        Item::Change(change, e) => {
            return pb::WatchConnectionsResponse {
                r#type: change_to_pb(change) as i32,
                ..change_to_pb_shared(&e)
            };
        }
        Item::Synced(r) => (W::Synced, r, None),
        Item::Bookmark(r) => (W::Bookmark, r, None),
    };
    pb::WatchConnectionsResponse {
        r#type: t as i32,
        revision: revision.get(),
        connection,
        event: None,
    }
}

/// How a change relates to one watcher's view: the only field of a change's
/// watch message that differs between watchers.
pub(crate) fn change_to_pb(change: Change) -> pb::WatchEventType {
    match change {
        Change::Added => pb::WatchEventType::Added,
        Change::Modified => pb::WatchEventType::Modified,
        Change::Removed => pb::WatchEventType::Removed,
    }
}

/// The watch message of a change without its `type`: the fields every
/// watcher of the change is sent alike.
pub(crate) fn change_to_pb_shared(e: &Event) -> pb::WatchConnectionsResponse {
    pb::WatchConnectionsResponse {
        r#type: 0,
        revision: e.revision.get(),
        connection: Some(connection_to_pb(&e.connection)),
        event: Some(event_to_pb(e)),
    }
}

// ---- domain -> responses: counts, lifecycle, discovery, credentials, definitions ----

pub(crate) fn counts_to_pb(
    counts: Vec<(State, i64)>,
    revision: i64,
) -> pb::CountConnectionsResponse {
    pb::CountConnectionsResponse {
        total: counts.iter().map(|(_, n)| n).sum(),
        counts: counts
            .into_iter()
            .map(|(s, count)| pb::StateCount {
                state: s.number(),
                count,
            })
            .collect(),
        revision,
    }
}

/// The lifecycle table, state by state, as `DescribeLifecycle` answers it.
pub(crate) fn lifecycle_to_pb() -> pb::DescribeLifecycleResponse {
    let states = State::ALL
        .into_iter()
        .map(|s| {
            let user = lifecycle::targets(s, Trigger::User);
            pb::StateTransitions {
                state: s.number(),
                user_targets: user.iter().map(|e| e.to.number()).collect(),
                system_targets: lifecycle::targets(s, Trigger::System)
                    .iter()
                    .map(|e| e.to.number())
                    .collect(),
                verified_targets: user
                    .iter()
                    .filter(|e| e.needs_verification)
                    .map(|e| e.to.number())
                    .collect(),
                terminal: lifecycle::is_terminal(s),
            }
        })
        .collect();
    pb::DescribeLifecycleResponse { states }
}

/// What happened to one reported connection.
pub(crate) fn discovered_to_pb(d: Discovered) -> pb::DiscoveryResult {
    let (outcome, connection, reason) = match d {
        Discovered::Created(c) => (pb::DiscoveryOutcome::Created, Some(c), String::new()),
        Discovered::Rediscovered(c) => (pb::DiscoveryOutcome::Rediscovered, Some(c), String::new()),
        Discovered::Unchanged(c) => (pb::DiscoveryOutcome::Unchanged, Some(c), String::new()),
        Discovered::SuppressedIgnored(c) => (
            pb::DiscoveryOutcome::SuppressedIgnored,
            Some(c),
            String::new(),
        ),
        Discovered::Hidden => (
            pb::DiscoveryOutcome::Unchanged,
            None,
            "a connection with this identity exists; it is not yours to see".into(),
        ),
        Discovered::Rejected(e) => (pb::DiscoveryOutcome::Rejected, None, e.to_string()),
    };
    pb::DiscoveryResult {
        outcome: outcome as i32,
        connection: connection.as_ref().map(connection_to_pb),
        reason,
    }
}

pub(crate) fn credential_to_pb(c: &CredentialInfo) -> pb::Credential {
    pb::Credential {
        id: c.id.clone(),
        name: c.name.clone(),
        r#type: c.type_.clone(),
        owner: c.owner.clone(),
        create_time: timestamp(c.create_time),
        allowed_hosts: c.allowed_hosts.clone(),
    }
}

pub(crate) fn definition_to_pb(d: &Definition) -> pb::Definition {
    let (paths, service) = match &d.check {
        crate::probe::Check::Http { paths } => (paths.clone(), String::new()),
        crate::probe::Check::Grpc { service } => (Vec::new(), service.clone()),
        _ => (Vec::new(), String::new()),
    };
    let schema =
        |s: &Option<serde_json::Value>| s.as_ref().and_then(|v| v.as_object()).map(json_to_struct);
    pb::Definition {
        model: d.model.clone(),
        kind: d.kind.clone(),
        r#type: d.type_.clone(),
        sub_type: d.sub_type.clone(),
        display_name: d.display_name.clone(),
        description: d.description.clone(),
        managed: d.managed,
        auto_connect: d.auto_connect,
        check: Some(pb::Check {
            r#type: d.check.type_name().into(),
            paths,
            service,
        }),
        metadata_schema: schema(&d.metadata_schema),
        credential_schema: schema(&d.credential_schema),
        transitions: d
            .transitions
            .iter()
            .flatten()
            .map(|(state, targets)| pb::StateTargets {
                state: state.number(),
                targets: targets.iter().map(|t| t.number()).collect(),
            })
            .collect(),
        probe_interval: d.probe_interval.map(duration),
        extends: d.extends.clone().unwrap_or_default(),
    }
}

// ---- google.protobuf.Struct <-> JSON ----

pub(crate) fn struct_to_json(
    field: &str,
    s: Option<prost_types::Struct>,
) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
    s.map(|s| {
        s.fields
            .into_iter()
            .map(|(k, v)| Ok((k, value_to_json(field, v)?)))
            .collect()
    })
    .unwrap_or_else(|| Ok(serde_json::Map::new()))
}

fn value_to_json(field: &str, v: prost_types::Value) -> Result<serde_json::Value, Error> {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    Ok(match v.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(b),
        Some(Kind::NumberValue(n)) => J::Number(
            serde_json::Number::from_f64(n)
                .ok_or_else(|| Error::invalid(field, "numbers must be finite"))?,
        ),
        Some(Kind::StringValue(s)) => J::String(s),
        Some(Kind::ListValue(l)) => J::Array(
            l.values
                .into_iter()
                .map(|v| value_to_json(field, v))
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::StructValue(s)) => J::Object(struct_to_json(field, Some(s))?),
    })
}

fn json_to_struct(m: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}
