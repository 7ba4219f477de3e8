//! One integration-test binary that drives the real gRPC surface: a server on
//! 127.0.0.1:0, a SQLite file in a temp dir, a tonic client. With the
//! `postgres` feature and `TETHER_TEST_DB=postgres`, each server runs on a
//! database of its own in a throwaway PostgreSQL cluster instead
//! (`common::App`; the test command runs them both ways).

mod access;
mod audit;
mod backup;
mod blobs;
mod cli;
mod common;
mod connections;
mod credentials;
mod damage;
mod definitions;
mod discovery;
mod diskfull;
mod egress;
mod faults;
mod lifecycle;
mod metrics;
mod monitor;
#[cfg(feature = "postgres")]
#[path = "../../src/store/pg/cluster.rs"]
mod pg_cluster;
#[cfg(feature = "postgres")]
mod pg_reach;
#[cfg(feature = "postgres")]
mod postgres;
mod process;
mod quota;
mod sizes;
mod standard;
mod storage;
mod tls;
mod watch;
