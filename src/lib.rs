//! Tether: a gRPC service that tracks the lifecycle of connections (the links a
//! platform keeps to external systems), holds their state durably, moves it
//! only along the allowed edges, and streams every change to watchers.
//!
//! Dependencies run one way, from [`lifecycle`] at the bottom to [`server`] at
//! the top; see `docs/ARCHITECTURE.md`.

pub mod access;
pub mod backup;
pub mod config;
pub(crate) mod connection;
pub(crate) mod credentials;
pub(crate) mod definitions;
pub(crate) mod engine;
pub mod error;
pub(crate) mod files;
pub(crate) mod kinds;
pub(crate) mod lifecycle;
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
