//! The code generated from `proto/` by `build.rs`: messages, the
//! `tether.v1.ConnectionService` client and server, and the descriptor set
//! served by reflection. Nothing hand-written lives here.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod tether {
    pub mod v1 {
        tonic::include_proto!("tether.v1");
    }
}

/// Descriptors of `tether.v1` and the `google.rpc` error types it returns, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tether_descriptor");
