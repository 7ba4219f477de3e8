//! `tether.v1.ConnectionService`: each handler parses its request
//! ([`convert`], [`paging`], [`RequestIds`]), calls the engine (or the
//! watcher) and answers with the converted result. Callers see and change
//! only connections of owners in their scope, which the engine enforces.

use super::auth;
use super::convert::{self, connection_to_pb, event_to_pb};
use super::paging::{self, PageSizes, Query};
use super::request_ids::RequestIds;
use super::status::rpc_status;
use super::watch_slots::WatchSlots;
use crate::access::{Access, Principal};
use crate::config::ApiLimits;
use crate::connection::Revision;
use crate::connection::{Connection, ConnectionId};
use crate::engine::{Discovered, Engine, TransitionRequest};
use crate::error::Error;
use crate::pb::tether::v1 as pb;
use crate::store::{EventFilter, ListQuery};
use crate::watch::{Item, WatchSpec, Watcher};
use futures::stream::FuturesUnordered;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

pub(crate) struct ConnectionService {
    engine: Engine,
    watcher: Watcher,
    limits: ApiLimits,
    request_ids: RequestIds,
    watches: WatchSlots,
    /// To end a watch whose caller's access is revoked.
    access: Arc<Access>,
    /// When this service was made, as `GetServerInfo` answers.
    started: std::time::SystemTime,
}

impl ConnectionService {
    pub(crate) fn new(
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
            started: std::time::SystemTime::now(),
        }
    }

    /// The page sizes of ListConnections.
    fn page_sizes(&self) -> PageSizes {
        PageSizes {
            default: self.limits.default_page_size,
            max: self.limits.max_page_size,
        }
    }

    /// A transition request, alone (`field` empty) or item `field` of a batch.
    fn transition_request(
        &self,
        r: pb::TransitionConnectionRequest,
        principal: &Principal,
        field: &str,
    ) -> Result<TransitionRequest, Error> {
        let key =
            self.request_ids
                .key(principal, &r.request_id, &r, &format!("{field}request_id"))?;
        convert::transition_from_pb(r, key, principal, field)
    }
}

/// One info line per discovery report, not one per connection: how many
/// it created, found again, left as they were or rejected, and the latest
/// revision it wrote (0 if none).
fn log_report(principal: &str, source: &str, results: &[Discovered]) {
    let (mut created, mut rediscovered, mut unchanged, mut rejected) = (0, 0, 0, 0);
    let mut revision = 0;
    for r in results {
        match r {
            Discovered::Created(c) => {
                created += 1;
                revision = revision.max(c.revision.get());
            }
            Discovered::Rediscovered(c) => {
                rediscovered += 1;
                revision = revision.max(c.revision.get());
            }
            Discovered::Unchanged(_) | Discovered::SuppressedIgnored(_) | Discovered::Hidden => {
                unchanged += 1
            }
            Discovered::Rejected(_) => rejected += 1,
        }
    }
    tracing::info!(
        principal = %principal,
        method = %"tether.v1.ConnectionService/ReportDiscovered",
        source = %source,
        count = results.len(),
        created,
        rediscovered,
        unchanged,
        rejected,
        revision,
        "discovery report"
    );
}

/// A watch stream of messages `T`.
pub(crate) type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

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
        let create = convert::create_from_pb(r, key, &principal)?;
        let c = self.engine.create(create).await?;
        // Logged here, after the write returned: never on the writer thread.
        tracing::info!(
            principal = %principal.name,
            method = %"tether.v1.ConnectionService/CreateConnection",
            id = %c.id,
            kind = %c.kind,
            state = %c.state,
            revision = c.revision.get(),
            "connection created"
        );
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
        let filter = convert::filter_from_pb(
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
            revision: page.revision.get(),
        }))
    }

    async fn count_connections(
        &self,
        request: Request<pb::CountConnectionsRequest>,
    ) -> Result<Response<pb::CountConnectionsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        let filter = convert::filter_from_pb(
            r.kinds,
            r.states,
            r.types,
            r.search,
            r.labels,
            r.show_deleted,
            &principal,
        )?;
        let (counts, revision) = self.engine.count(filter).await?;
        Ok(Response::new(convert::counts_to_pb(counts, revision.get())))
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
        let update = convert::update_from_pb(r, key, &principal)?;
        let c = self.engine.update(update).await?;
        tracing::info!(
            principal = %principal.name,
            method = %"tether.v1.ConnectionService/UpdateConnection",
            id = %c.id,
            revision = c.revision.get(),
            "connection updated"
        );
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
        convert::check_items("requests", items.len(), self.limits.max_batch)?;
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
        let delete = convert::delete_from_pb(r, key, &principal)?;
        let c = self.engine.transition(delete).await?;
        Ok(Response::new(connection_to_pb(&c)))
    }

    async fn list_connection_events(
        &self,
        request: Request<pb::ListConnectionEventsRequest>,
    ) -> Result<Response<pb::ListConnectionEventsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        let connection_id = convert::optional_id_from_pb(&r.connection_id, "connection_id")?;
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
                    after_revision: Revision::parse(r.after_revision, "after_revision")?,
                    limit,
                    owners: principal.scope.owners(),
                    max_bytes: usize::MAX,
                },
                &principal.scope,
            )
            .await?;
        Ok(Response::new(pb::ListConnectionEventsResponse {
            events: page.events.iter().map(event_to_pb).collect(),
            next_after_revision: page.next_after_revision.map_or(0, Revision::get),
            revision: page.revision.get(),
            compact_revision: page.compact_revision.get(),
        }))
    }

    async fn describe_lifecycle(
        &self,
        _request: Request<pb::DescribeLifecycleRequest>,
    ) -> Result<Response<pb::DescribeLifecycleResponse>, Status> {
        Ok(Response::new(convert::lifecycle_to_pb()))
    }

    async fn get_server_info(
        &self,
        request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::ServerInfo>, Status> {
        let principal = auth::principal(&request)?;
        Ok(Response::new(pb::ServerInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            start_time: Some(prost_types::Timestamp::from(self.started)),
            principal: principal.name.clone(),
            roles: principal
                .roles
                .iter()
                .map(|r| r.name().to_owned())
                .collect(),
        }))
    }

    async fn report_discovered(
        &self,
        request: Request<pb::ReportDiscoveredRequest>,
    ) -> Result<Response<pb::ReportDiscoveredResponse>, Status> {
        let principal = auth::principal(&request)?;
        let (reporter, items) = convert::report_from_pb(
            request.into_inner(),
            &principal,
            self.limits.max_discovery_report,
        )?;
        let results = self.engine.report_discovered(&reporter, items).await?;
        log_report(&principal.name, &reporter.source, &results);
        Ok(Response::new(pb::ReportDiscoveredResponse {
            results: results.into_iter().map(convert::discovered_to_pb).collect(),
        }))
    }

    type WatchConnectionsStream = WatchStream<pb::WatchConnectionsResponse>;

    /// Served by [`super::watch_wire::WatchRoute`], which sends the same
    /// messages with each change encoded once; this is the same stream in
    /// prost's own type, for a server mounted without that route.
    async fn watch_connections(
        &self,
        request: Request<pb::WatchConnectionsRequest>,
    ) -> Result<Response<Self::WatchConnectionsStream>, Status> {
        self.watch(request, convert::watch_item_to_pb).await
    }
}

impl ConnectionService {
    /// Opens a watch for the caller, within its scope and its open-watch
    /// limit; `to_wire` turns each item into the message sent.
    pub(crate) async fn watch<T: Send + 'static>(
        &self,
        request: Request<pb::WatchConnectionsRequest>,
        to_wire: fn(Item) -> T,
    ) -> Result<Response<WatchStream<T>>, Status> {
        let principal = auth::principal(&request)?;
        let via = auth::via(&request);
        let slot = self
            .watches
            .take(&principal.name, self.limits.max_watches)?;
        let r = request.into_inner();
        let filter = convert::watch_filter(r.kinds, r.states, &r.ids, &principal)?;
        let stream = self
            .watcher
            .watch(WatchSpec {
                after_revision: Revision::parse(r.after_revision, "after_revision")?,
                filter,
                progress_notify: r.progress_notify,
            })
            .await?;
        let stream = stream.map(move |item| {
            // The slot lives as long as the stream.
            let _slot = &slot;
            item.map(to_wire).map_err(Status::from)
        });
        // A watch outlives the check made when it opened: when the access
        // file stops admitting its caller (or changes what it may see), the
        // stream ends with that status.
        let access = self.access.clone();
        // Polled only when it was woken (not on every message): the access
        // file's change signal is shared by every watch.
        let revoked: FuturesUnordered<_> = [Box::pin(async move {
            access.revoked(&principal, &via, auth::may_watch).await
        })]
        .into_iter()
        .collect();
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
                    Some(why) = revoked.next() => {
                        Some((Err(auth::revoked_status(&why)), (stream, revoked, true)))
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
