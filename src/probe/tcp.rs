//! The TCP check: a connect to a host and port, closed again at once. Sends
//! nothing, so it takes no credentials. Connects only to addresses the
//! egress policy allowed.

use super::Verdict;
use super::egress::Egress;
use super::prober::{failure_class, ms};
use super::target::HostPort;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub(crate) async fn check(to: &HostPort, egress: &Egress, deadline: Instant) -> Verdict {
    let started = Instant::now();
    let timed_out = || {
        Verdict::Unreachable(format!(
            "tcp connect to {to}: timed out after {} ms",
            ms(started)
        ))
    };
    let addrs = match tokio::time::timeout_at(deadline, egress.addresses(&to.host, to.port)).await {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(blocked)) => return Verdict::Unreachable(format!("tcp connect to {to}: {blocked}")),
        Err(_) => return timed_out(),
    };
    match tokio::time::timeout_at(deadline, TcpStream::connect(&addrs[..])).await {
        Ok(Ok(_)) => Verdict::Reachable(format!(
            "tcp connect to {to} succeeded in {} ms",
            ms(started)
        )),
        Ok(Err(e)) => {
            tracing::debug!(%to, error = %e, "tcp check failed");
            Verdict::Unreachable(format!(
                "tcp connect to {to}: {} after {} ms",
                failure_class(&e, false),
                ms(started)
            ))
        }
        Err(_) => timed_out(),
    }
}
