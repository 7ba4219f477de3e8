//! The listening side of the transport: who is on the other end of a
//! connection, as the gate sees it.

use std::net::SocketAddr;

/// The peer of a connection, as tonic hands it to every request.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The principal name of a verified client certificate.
    pub certificate: Option<String>,
}
