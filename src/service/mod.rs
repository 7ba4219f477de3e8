//! The gRPC surface: the only place proto and domain types meet; [`status`]
//! holds the one mapping from [`Error`] to `tonic::Status`.
//! This file holds `tether.v1.ConnectionService` and the shared conversions;
//! the definition and credential services have a file each.
//!
//! Requests are parsed here into domain values (ids, urls, kinds, states),
//! so the engine only ever sees well-formed input.

pub mod auth;
pub mod credentials;
pub mod definitions;
pub(crate) mod paging;
pub mod sizes;
pub(crate) mod status;

use crate::access::{Access, Principal};
use crate::config::ApiLimits;
use crate::connection::{
    self, Connection, ConnectionId, Event, EventType, ProbeOutcome, ProbeResult, check_labels,
    check_len, check_metadata, limits, parse_kind, parse_url,
};
use crate::engine::{
    CreateRequest, Discovered, Engine, NewConnection, Patch, Reporter, RequestKey,
    TransitionRequest, UpdateRequest,
};
use crate::error::Error;
use crate::lifecycle::{self, State, Trigger};
use crate::pb::tether::v1 as pb;
use crate::store::{EventFilter, Filter, ListQuery};
use crate::watch::{Change, Item, WatchSpec, Watcher};
use paging::{PageSizes, Query};
use prost::Message;
use status::rpc_status;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

pub use crate::pb::ERROR_DOMAIN;

/// Turns a client's `request_id` into what it is stored under: an HMAC of
/// the principal and the id, so ids are scoped per caller and the table
/// holds no client-chosen text.
#[derive(Clone)]
pub struct RequestIds {
    key: [u8; 32],
}

impl RequestIds {
    pub fn new(key: [u8; 32]) -> Self {
        RequestIds { key }
    }

    fn stored(&self, principal: &str, request_id: &str) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.key)
            .expect("hmac takes any key length");
        mac.update(principal.as_bytes());
        mac.update(&[0]);
        mac.update(request_id.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The retry key of a request, bound to a digest of the whole request so
    /// a reused id with a different body is caught.
    fn key<M: Message>(
        &self,
        principal: &Principal,
        request_id: &str,
        message: &M,
        field: &str,
    ) -> Result<Option<RequestKey>, Error> {
        if request_id.is_empty() {
            return Ok(None);
        }
        check_len(field, request_id, limits::REQUEST_ID)?;
        Ok(Some(RequestKey {
            id: request_id.to_owned(),
            stored: self.stored(&principal.name, request_id),
            fingerprint: connection::digest(&message.encode_to_vec()) as i64,
        }))
    }
}

/// Open watch streams per principal, against a limit.
#[derive(Clone, Default)]
struct WatchSlots(Arc<std::sync::Mutex<HashMap<String, usize>>>);

/// One open watch; its slot frees when the stream is dropped.
struct WatchSlot {
    slots: WatchSlots,
    principal: String,
}

impl WatchSlots {
    fn take(&self, principal: &str, limit: usize) -> Result<WatchSlot, Error> {
        let mut open = self.0.lock().expect("watch slots lock");
        let n = open.entry(principal.to_owned()).or_default();
        if *n >= limit {
            return Err(Error::ResourceExhausted(format!(
                "{principal} already holds {limit} watch streams, the most allowed; close one"
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            principal: principal.to_owned(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().expect("watch slots lock");
        if let Some(n) = open.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.principal);
            }
        }
    }
}

pub struct ConnectionService {
    engine: Engine,
    watcher: Watcher,
    limits: ApiLimits,
    request_ids: RequestIds,
    watches: WatchSlots,
    /// To end a watch whose caller's access is revoked.
    access: Arc<Access>,
}

impl ConnectionService {
    pub fn new(
        engine: Engine,
        watcher: Watcher,
        limits: ApiLimits,
        request_ids: RequestIds,
        access: Arc<Access>,
    ) -> Self {
        ConnectionService {
            engine,
            watcher,
            limits,
            request_ids,
            watches: WatchSlots::default(),
            access,
        }
    }

    /// The page sizes of ListConnections.
    fn page_sizes(&self) -> PageSizes {
        PageSizes {
            default: self.limits.default_page_size,
            max: self.limits.max_page_size,
        }
    }

    fn transition_request(
        &self,
        r: pb::TransitionConnectionRequest,
        principal: &Principal,
        field: &str,
    ) -> Result<TransitionRequest, Error> {
        let request =
            self.request_ids
                .key(principal, &r.request_id, &r, &format!("{field}request_id"))?;
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
        })
    }
}

type WatchResponseStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchConnectionsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::connection_service_server::ConnectionService for ConnectionService {
    async fn create_connection(
        &self,
        request: Request<pb::CreateConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        let key = self
            .request_ids
            .key(&principal, &r.request_id, &r, "request_id")?;
        let initial_state = match r.initial_state {
            0 => State::Discovered,
            n => state_from_pb(n, "initial_state")?,
        };
        let mut connection = new_connection(r.connection.unwrap_or_default())?;
        connection.owner = principal.owner_for(&connection.owner, "connection.owner")?;
        let c = self
            .engine
            .create(CreateRequest {
                connection,
                initial_state,
                skip_verification: r.skip_verification,
                request: key,
                actor: principal.name.clone(),
                scope: principal.scope.clone(),
            })
            .await?;
        Ok(Response::new(connection_to_pb(&c)))
    }

    async fn get_connection(
        &self,
        request: Request<pb::GetConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let principal = auth::principal(&request)?;
        let id = ConnectionId::parse(&request.get_ref().id, "id")?;
        let c = self.engine.get(id, &principal.scope).await?;
        Ok(Response::new(connection_to_pb(&c)))
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        let page_size = self.page_sizes().page_size(r.page_size)?;
        let filter = filter_from_pb(
            r.kinds,
            r.states,
            r.types,
            r.search,
            r.labels,
            r.show_deleted,
            &principal,
        )?;
        let order = paging::order_by(&r.order_by)?;
        let query = Query::connections(&filter, order);
        let after = paging::decode(&r.page_token, query)?;
        let page = self
            .engine
            .list(ListQuery {
                filter,
                order,
                page_size,
                after,
            })
            .await?;
        Ok(Response::new(pb::ListConnectionsResponse {
            connections: page.connections.iter().map(connection_to_pb).collect(),
            next_page_token: page
                .next
                .map(|c| paging::encode(&c, query))
                .unwrap_or_default(),
            revision: page.revision,
        }))
    }

    async fn count_connections(
        &self,
        request: Request<pb::CountConnectionsRequest>,
    ) -> Result<Response<pb::CountConnectionsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        let filter = filter_from_pb(
            r.kinds,
            r.states,
            r.types,
            r.search,
            r.labels,
            r.show_deleted,
            &principal,
        )?;
        let (counts, revision) = self.engine.count(filter).await?;
        Ok(Response::new(pb::CountConnectionsResponse {
            total: counts.iter().map(|(_, n)| n).sum(),
            counts: counts
                .into_iter()
                .map(|(s, count)| pb::StateCount {
                    state: s.number(),
                    count,
                })
                .collect(),
            revision,
        }))
    }

    async fn update_connection(
        &self,
        request: Request<pb::UpdateConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        let key = self
            .request_ids
            .key(&principal, &r.request_id, &r, "request_id")?;
        let body = r
            .connection
            .ok_or_else(|| Error::invalid("connection", "is required"))?;
        let id = ConnectionId::parse(&body.id, "connection.id")?;
        let etag = non_empty(body.etag.clone());
        let patch = patch_from_pb(body, r.update_mask)?;
        let c = self
            .engine
            .update(UpdateRequest {
                id,
                patch,
                etag,
                request: key,
                actor: principal.name.clone(),
                scope: principal.scope.clone(),
            })
            .await?;
        Ok(Response::new(connection_to_pb(&c)))
    }

    async fn transition_connection(
        &self,
        request: Request<pb::TransitionConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let principal = auth::principal(&request)?;
        let t = self.transition_request(request.into_inner(), &principal, "")?;
        let c = self.engine.transition(t).await?;
        Ok(Response::new(connection_to_pb(&c)))
    }

    async fn batch_transition_connections(
        &self,
        request: Request<pb::BatchTransitionConnectionsRequest>,
    ) -> Result<Response<pb::BatchTransitionConnectionsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let items = request.into_inner().requests;
        if items.len() > self.limits.max_batch {
            return Err(Error::invalid(
                "requests",
                format!(
                    "has {} items, the limit is {}",
                    items.len(),
                    self.limits.max_batch
                ),
            )
            .into());
        }
        // A malformed item fails alone, like any other per-item error.
        let mut results: Vec<Option<Result<Connection, Error>>> = Vec::new();
        let mut valid = Vec::new();
        for (i, r) in items.into_iter().enumerate() {
            match self.transition_request(r, &principal, &format!("requests[{i}].")) {
                Ok(t) => {
                    results.push(None);
                    valid.push(t);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut done = self.engine.batch_transition(valid).await.into_iter();
        let results = results
            .into_iter()
            .map(|r| {
                let r = r
                    .or_else(|| done.next())
                    .expect("one result per valid item");
                pb::BatchTransitionResult {
                    result: Some(match r {
                        Ok(c) => {
                            pb::batch_transition_result::Result::Connection(connection_to_pb(&c))
                        }
                        Err(e) => pb::batch_transition_result::Result::Error(rpc_status(e)),
                    }),
                }
            })
            .collect();
        Ok(Response::new(pb::BatchTransitionConnectionsResponse {
            results,
        }))
    }

    async fn delete_connection(
        &self,
        request: Request<pb::DeleteConnectionRequest>,
    ) -> Result<Response<pb::Connection>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        let key = self
            .request_ids
            .key(&principal, &r.request_id, &r, "request_id")?;
        check_len("reason", &r.reason, limits::REASON)?;
        let c = self
            .engine
            .transition(TransitionRequest {
                id: ConnectionId::parse(&r.id, "id")?,
                target: State::Deleted,
                reason: if r.reason.is_empty() {
                    "deleted".into()
                } else {
                    r.reason
                },
                etag: non_empty(r.etag),
                skip_verification: false,
                request: key,
                actor: principal.name.clone(),
                scope: principal.scope.clone(),
            })
            .await?;
        Ok(Response::new(connection_to_pb(&c)))
    }

    async fn list_connection_events(
        &self,
        request: Request<pb::ListConnectionEventsRequest>,
    ) -> Result<Response<pb::ListConnectionEventsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        let connection_id = match r.connection_id.as_str() {
            "" => None,
            s => Some(ConnectionId::parse(s, "connection_id")?),
        };
        if r.after_revision < 0 {
            return Err(Error::invalid("after_revision", "must not be negative").into());
        }
        // History pages by revision (`after_revision`), not by token.
        let limit = PageSizes {
            default: self.limits.default_events_page_size,
            max: self.limits.max_page_size,
        }
        .page_size(r.page_size)?;
        let page = self
            .engine
            .events(
                EventFilter {
                    connection_id,
                    after_revision: r.after_revision,
                    limit,
                    owners: principal.scope.owners(),
                    max_bytes: usize::MAX,
                },
                &principal.scope,
            )
            .await?;
        Ok(Response::new(pb::ListConnectionEventsResponse {
            events: page.events.iter().map(event_to_pb).collect(),
            next_after_revision: page.next_after_revision.unwrap_or(0),
            revision: page.revision,
            compact_revision: page.compact_revision,
        }))
    }

    async fn describe_lifecycle(
        &self,
        _request: Request<pb::DescribeLifecycleRequest>,
    ) -> Result<Response<pb::DescribeLifecycleResponse>, Status> {
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
        Ok(Response::new(pb::DescribeLifecycleResponse { states }))
    }

    async fn report_discovered(
        &self,
        request: Request<pb::ReportDiscoveredRequest>,
    ) -> Result<Response<pb::ReportDiscoveredResponse>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        if r.source.is_empty() {
            return Err(Error::invalid("source", "is required").into());
        }
        check_len("source", &r.source, limits::SHORT)?;
        if r.connections.len() > self.limits.max_discovery_report {
            return Err(Error::invalid(
                "connections",
                format!(
                    "has {} items, the limit is {}",
                    r.connections.len(),
                    self.limits.max_discovery_report
                ),
            )
            .into());
        }
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
        let results = self.engine.report_discovered(&reporter, items).await?;
        let results = results
            .into_iter()
            .map(|d| {
                let (outcome, connection, reason) = match d {
                    Discovered::Created(c) => {
                        (pb::DiscoveryOutcome::Created, Some(c), String::new())
                    }
                    Discovered::Rediscovered(c) => {
                        (pb::DiscoveryOutcome::Rediscovered, Some(c), String::new())
                    }
                    Discovered::Unchanged(c) => {
                        (pb::DiscoveryOutcome::Unchanged, Some(c), String::new())
                    }
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
                    Discovered::Rejected(e) => {
                        (pb::DiscoveryOutcome::Rejected, None, e.to_string())
                    }
                };
                pb::DiscoveryResult {
                    outcome: outcome as i32,
                    connection: connection.as_ref().map(connection_to_pb),
                    reason,
                }
            })
            .collect();
        Ok(Response::new(pb::ReportDiscoveredResponse { results }))
    }

    type WatchConnectionsStream = WatchResponseStream;

    async fn watch_connections(
        &self,
        request: Request<pb::WatchConnectionsRequest>,
    ) -> Result<Response<Self::WatchConnectionsStream>, Status> {
        let principal = auth::principal(&request)?;
        let via = auth::via(&request);
        let slot = self
            .watches
            .take(&principal.name, self.limits.max_watches)?;
        let r = request.into_inner();
        let mut filter = Filter {
            kinds: parse_kinds(r.kinds)?,
            states: parse_states(r.states)?,
            owners: principal.scope.owners(),
            ..Filter::default()
        };
        check_count("ids", &r.ids)?;
        for (i, id) in r.ids.iter().enumerate() {
            filter
                .ids
                .push(ConnectionId::parse(id, &format!("ids[{i}]"))?);
        }
        let stream = self
            .watcher
            .watch(WatchSpec {
                after_revision: r.after_revision,
                filter,
                progress_notify: r.progress_notify,
            })
            .await?;
        let stream = stream.map(move |item| {
            // The slot lives as long as the stream.
            let _slot = &slot;
            item.map(watch_item_to_pb).map_err(Status::from)
        });
        // A watch outlives the check made when it opened: when the access
        // file stops admitting its caller (or changes what it may see), the
        // stream ends with that status.
        let access = self.access.clone();
        let revoked =
            Box::pin(async move { access.revoked(&principal, &via, auth::may_watch).await });
        let stream = futures::stream::unfold(
            (stream, revoked, false),
            |(mut stream, mut revoked, ended)| async move {
                if ended {
                    return None;
                }
                tokio::select! {
                    biased;
                    item = stream.next() => {
                        let item = item?;
                        let ended = item.is_err();
                        Some((item, (stream, revoked, ended)))
                    }
                    why = &mut revoked => {
                        Some((Err(auth::revoked_status(&why)), (stream, revoked, true)))
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

// ---- requests -> domain ----

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

fn filter_from_pb(
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

pub fn connection_to_pb(c: &Connection) -> pb::Connection {
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
        revision: c.revision,
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

pub fn event_to_pb(e: &Event) -> pb::ConnectionEvent {
    pb::ConnectionEvent {
        revision: e.revision,
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

fn watch_item_to_pb(item: Item) -> pb::WatchConnectionsResponse {
    use pb::WatchEventType as W;
    let (t, revision, connection, event) = match item {
        Item::Snapshot(c) => (W::Added, c.revision, Some(connection_to_pb(&c)), None),
        Item::Change(change, e) => {
            let t = match change {
                Change::Added => W::Added,
                Change::Modified => W::Modified,
                Change::Removed => W::Removed,
            };
            (
                t,
                e.revision,
                Some(connection_to_pb(&e.connection)),
                Some(event_to_pb(&e)),
            )
        }
        Item::Synced(r) => (W::Synced, r, None, None),
        Item::Bookmark(r) => (W::Bookmark, r, None, None),
    };
    pb::WatchConnectionsResponse {
        r#type: t as i32,
        revision,
        connection,
        event,
    }
}

// ---- google.protobuf.Struct <-> JSON ----

fn struct_to_json(
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
