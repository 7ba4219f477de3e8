//! The TCP check: a connect to a host and port, closed again at once. Sends
//! nothing, so it takes no credentials.

use super::Verdict;
use super::prober::{error_chain, ms};
use super::target::HostPort;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub(crate) async fn check(to: &HostPort, deadline: Instant) -> Verdict {
    let started = Instant::now();
    let connect = TcpStream::connect((to.host.as_str(), to.port));
    match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok(_)) => Verdict::Reachable(format!(
            "tcp connect to {to} succeeded in {} ms",
            ms(started)
        )),
        Ok(Err(e)) => Verdict::Unreachable(format!(
            "tcp connect to {to} failed after {} ms: {}",
            ms(started),
            error_chain(&e)
        )),
        Err(_) => Verdict::Unreachable(format!(
            "tcp connect to {to} timed out after {} ms",
            ms(started)
        )),
    }
}
