//! The gRPC surface: the only place proto and domain types meet. Laid out
//! along the proto boundary:
//!
//! - handlers, one file per proto service, each only parse -> engine -> to_pb:
//!   `connections.rs` (`tether.v1.ConnectionService`), `credentials` and
//!   `definitions`;
//! - `convert`: requests into domain values, domain values into responses;
//! - `paging`: the page-size rule, `order_by` and the page-token format;
//! - `status`: the one mapping from `crate::Error` to `tonic::Status`;
//! - `request_ids` and `watch_slots`: retry keys and open-watch counts;
//! - `watch_wire`: the watch stream on the wire, each change encoded once
//!   for all its watchers, and the route that serves it;
//! - the layers in front of every call: `auth` (who may call what) and
//!   `sizes` (message and metadata limits);
//! - `health`: the standard `grpc.health.v1.Health` service.

pub(crate) mod auth;
pub(crate) mod connections;
pub(crate) mod convert;
pub(crate) mod credentials;
pub(crate) mod definitions;
pub(crate) mod health;
pub(crate) mod paging;
pub(crate) mod request_ids;
pub mod sizes;
pub(crate) mod status;
pub(crate) mod watch_slots;
pub(crate) mod watch_wire;

pub(crate) use connections::ConnectionService;
pub(crate) use request_ids::RequestIds;
