//! Tether: a gRPC service that tracks the lifecycle of connections (the links a
//! platform keeps to external systems), holds their state durably, moves it
//! only along the allowed edges, and streams every change to watchers.
//!
//! Modules are layered, from `lifecycle` at the bottom to [`server`] at the
//! top: each uses only its own layer and those beneath it. The layers are the
//! `LAYERS` table in `tests/tidy.rs`, which fails when a module reaches up;
//! `docs/ARCHITECTURE.md` has the codemap and the invariants.

pub mod access;
pub(crate) mod admin;
pub mod backup;
pub mod cli;
pub mod config;
pub(crate) mod connection;
pub(crate) mod credentials;
pub(crate) mod definitions;
pub(crate) mod engine;
pub mod error;
pub(crate) mod files;
pub(crate) mod kinds;
pub(crate) mod lifecycle;
pub(crate) mod metrics;
pub(crate) mod monitor;
pub mod pb;
pub mod probe;
pub(crate) mod reload;
pub(crate) mod secrets;
pub mod server;
pub mod service;
pub(crate) mod store;
pub mod transport;
pub(crate) mod watch;

pub use config::Config;
pub use error::Error;
