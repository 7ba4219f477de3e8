//! `WatchConnections` on the wire: each change is encoded once, whatever the
//! number of watchers, and every watcher's message is its own `type` field
//! followed by those shared bytes; and the route that serves the watch path
//! with them, in front of the generated `ConnectionService` server.
//!
//! A `WatchConnectionsResponse` of a change is `type` (field 1, per watcher:
//! how the change relates to its filter), then `revision`, `connection` and
//! `event` (fields 2 to 4, the same for every watcher). prost writes fields
//! in field order, so field 1 followed by the encoding of fields 2 to 4 is
//! byte for byte prost's encoding of the whole message: clients decode it
//! with the generated types, unchanged. The shared bytes are made by the
//! first watcher whose stream sends the event and kept with the event
//! ([`Event::encoded`]), so they live as long as some watcher holds it.
//!
//! The generated server fixes the message type of each method, so the watch
//! path is taken by [`WatchRoute`], which serves it with tonic's own
//! server-streaming machinery and the same codec (`StrictCodec`) and
//! message limit, and hands every other path to the generated server. Both
//! sit behind the same layers (sizes, authentication and authorization), and
//! the handler is the service's own ([`ConnectionService::watch`]): watch
//! slots, filters, revocation and errors are the same code.

use super::connections::{ConnectionService, WatchStream};
use super::convert;
use crate::connection::Event;
use crate::pb::StrictCodec;
use crate::pb::tether::v1 as pb;
use crate::watch::Item;
use futures::future::Either;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::codegen::{BoxFuture, StdError};
use tonic::server::NamedService;

/// The method [`WatchRoute`] serves itself.
pub(crate) const WATCH_PATH: &str = "/tether.v1.ConnectionService/WatchConnections";

/// One message of a watch stream, as sent. Only ever encoded: decoding
/// skips every field.
#[derive(Debug)]
pub(crate) enum WatchMessage {
    /// A message of one watcher alone (snapshot, SYNCED, BOOKMARK), encoded
    /// as it is.
    Whole(Box<pb::WatchConnectionsResponse>),
    /// A change: its `type` for this watcher, then the event's shared bytes.
    Change { type_: i32, event: Arc<Event> },
}

impl Default for WatchMessage {
    fn default() -> Self {
        WatchMessage::Whole(Box::default())
    }
}

impl From<Item> for WatchMessage {
    fn from(item: Item) -> Self {
        match item {
            Item::Change(change, event) => WatchMessage::Change {
                type_: convert::change_to_pb(change) as i32,
                event,
            },
            other => WatchMessage::Whole(Box::new(convert::watch_item_to_pb(other))),
        }
    }
}

/// Fields 2 to 4 of the change's message, encoded by the first caller.
fn shared(event: &Event) -> &[u8] {
    event.encoded(|e| convert::change_to_pb_shared(e).encode_to_vec())
}

impl Message for WatchMessage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            WatchMessage::Whole(m) => m.encode_raw(buf),
            WatchMessage::Change { type_, event } => {
                // As prost writes an enum field: left out when 0.
                if *type_ != 0 {
                    prost::encoding::int32::encode(1, type_, buf);
                }
                buf.put_slice(shared(event));
            }
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        match self {
            WatchMessage::Whole(m) => m.encoded_len(),
            WatchMessage::Change { type_, event } => {
                let type_len = if *type_ != 0 {
                    prost::encoding::int32::encoded_len(1, type_)
                } else {
                    0
                };
                type_len + shared(event).len()
            }
        }
    }

    fn clear(&mut self) {
        *self = WatchMessage::default();
    }
}

/// The generated `ConnectionService` server `rest`, except that
/// `WatchConnections` is served with [`WatchMessage`]s.
#[derive(Clone)]
pub(crate) struct WatchRoute<S> {
    service: Arc<ConnectionService>,
    rest: S,
    max_decoding_message_size: usize,
}

impl<S> WatchRoute<S> {
    /// `rest` must serve `service` (the watch path is never passed to it);
    /// a watch request may be at most `max_decoding_message_size` bytes, as
    /// `rest` is told for its own.
    pub(crate) fn new(
        service: Arc<ConnectionService>,
        rest: S,
        max_decoding_message_size: usize,
    ) -> Self {
        WatchRoute {
            service,
            rest,
            max_decoding_message_size,
        }
    }
}

impl<S: NamedService> NamedService for WatchRoute<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for WatchRoute<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.rest.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return Either::Left(self.rest.call(req));
        }
        let method = WatchMethod(self.service.clone());
        let limit = self.max_decoding_message_size;
        Either::Right(Box::pin(async move {
            let codec = StrictCodec::<WatchMessage, pb::WatchConnectionsRequest>::default();
            let mut grpc =
                tonic::server::Grpc::new(codec).apply_max_message_size_config(Some(limit), None);
            Ok(grpc.server_streaming(method, req).await)
        }))
    }
}

/// `WatchConnections` as tonic's server-streaming method.
struct WatchMethod(Arc<ConnectionService>);

impl tonic::server::ServerStreamingService<pb::WatchConnectionsRequest> for WatchMethod {
    type Response = WatchMessage;
    type ResponseStream = WatchStream<WatchMessage>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<pb::WatchConnectionsRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.watch(request, WatchMessage::from).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::{Connection, ConnectionId, EventType, Revision};
    use crate::lifecycle::{State, Trigger};
    use crate::watch::Change;

    fn connection(metadata_bytes: usize) -> Connection {
        let mut metadata = serde_json::Map::new();
        metadata.insert("blob".into(), "m".repeat(metadata_bytes).into());
        Connection {
            id: ConnectionId::generate(),
            kind: "http".into(),
            type_: "web".into(),
            sub_type: "api".into(),
            name: "x".into(),
            description: "a connection".into(),
            url: "http://127.0.0.1:1/".into(),
            identity: "x".into(),
            metadata,
            labels: [("team".to_owned(), "core".to_owned())].into(),
            managed: true,
            credential_id: String::new(),
            owner: "team-a".into(),
            state: State::Connected,
            state_reason: "up".into(),
            state_trigger: Trigger::User,
            state_time: 7,
            revision: Revision::new(42),
            create_time: 1,
            update_time: 7,
            last_probe: None,
        }
    }

    fn event(metadata_bytes: usize) -> Arc<Event> {
        let c = connection(metadata_bytes);
        Arc::new(Event {
            revision: c.revision,
            connection_id: c.id.clone(),
            type_: EventType::Transitioned,
            from_state: State::Registered,
            to_state: State::Connected,
            trigger: Trigger::User,
            reason: "checked".into(),
            actor: "alice".into(),
            time: 7,
            connection: c,
            cache: Default::default(),
        })
    }

    /// What is sent for `item`, and what prost sends for the same message.
    fn both(item: Item) -> (Vec<u8>, Vec<u8>) {
        let golden = convert::watch_item_to_pb(item.clone()).encode_to_vec();
        let sent = WatchMessage::from(item);
        let bytes = sent.encode_to_vec();
        assert_eq!(sent.encoded_len(), bytes.len(), "encoded_len agrees");
        (bytes, golden)
    }

    #[test]
    fn every_item_is_sent_as_prost_encodes_it() {
        let e = event(100);
        let items = [
            Item::Snapshot(Box::new(connection(100))),
            Item::Synced(Revision::new(300)),
            Item::Bookmark(Revision::new(1 << 40)),
            Item::Synced(Revision::ZERO),
            Item::Change(Change::Added, e.clone()),
            Item::Change(Change::Modified, e.clone()),
            Item::Change(Change::Removed, e.clone()),
            Item::Change(Change::Modified, event(200_000)),
        ];
        for item in items {
            let (sent, golden) = both(item.clone());
            assert_eq!(sent, golden, "{item:?}");
            let back = pb::WatchConnectionsResponse::decode(sent.as_slice()).unwrap();
            assert_eq!(back, convert::watch_item_to_pb(item));
        }
    }

    #[test]
    fn a_change_is_encoded_once_for_all_its_watchers() {
        let e = event(1000);
        let first = WatchMessage::from(Item::Change(Change::Added, e.clone())).encode_to_vec();
        let shared_at = shared(&e).as_ptr();
        let second = WatchMessage::from(Item::Change(Change::Removed, e.clone())).encode_to_vec();
        assert_eq!(
            shared(&e).as_ptr(),
            shared_at,
            "the same bytes, not new ones"
        );
        // Only field 1 differs: two bytes (tag, small enum value).
        assert_eq!(first[2..], second[2..]);
        assert_ne!(first[..2], second[..2]);
        assert_eq!(&first[2..], shared(&e));
    }

    #[test]
    fn a_clone_of_an_event_does_not_share_its_bytes() {
        let e = event(10);
        let before = shared(&e).to_vec();
        let mut copy = (*e).clone();
        copy.reason = "changed".into();
        let copy = Arc::new(copy);
        assert_ne!(shared(&copy), before.as_slice());
        assert_eq!(
            shared(&copy),
            convert::change_to_pb_shared(&copy)
                .encode_to_vec()
                .as_slice()
        );
    }
}
