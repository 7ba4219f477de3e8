//! Tether: a gRPC service that tracks the lifecycle of connections (the links a
//! platform keeps to external systems), holds their state durably, moves it
//! only along the allowed edges, and streams every change to watchers.
//!
//! Dependencies run one way, from [`lifecycle`] at the bottom to [`server`] at
//! the top; see `docs/ARCHITECTURE.md`.

pub mod access;
pub mod backup;
pub mod config;
pub mod connection;
pub mod credentials;
pub mod definitions;
pub mod engine;
pub mod error;
pub mod files;
pub mod kinds;
pub mod lifecycle;
pub mod monitor;
pub mod pb;
pub mod probe;
pub mod reload;
pub mod secrets;
pub mod server;
pub mod service;
pub mod store;
pub mod transport;
pub mod watch;

pub use config::Config;
pub use error::Error;
