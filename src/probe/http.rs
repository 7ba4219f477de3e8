//! The HTTP check: a GET of each url in turn, redirects not followed. Every
//! url must answer 2xx or 3xx; the first that does not decides the verdict
//! (401/403: credentials rejected, anything else: unreachable).

use super::Verdict;
use super::client_auth::{AuthHeader, Scrubber};
use super::egress::{Egress, blocked_in};
use super::prober::{error_chain, failure_class, ms};
use super::target::redacted;
use reqwest::header::AUTHORIZATION;
use tokio::time::Instant;
use url::Url;

/// `client` must resolve names through `egress` (see `client_builder`):
/// addresses written in a url never reach its resolver, so they are checked
/// here.
pub(crate) async fn check(
    client: &reqwest::Client,
    egress: &Egress,
    urls: &[Url],
    auth: Option<&AuthHeader>,
    deadline: Instant,
    scrub: &Scrubber,
) -> Verdict {
    let auth = match auth.map(AuthHeader::header_value) {
        Some(Some(value)) => Some(value),
        Some(None) => {
            return Verdict::CredentialsRejected(
                "the credential cannot be sent in an Authorization header".into(),
            );
        }
        None => None,
    };
    let mut seen = Vec::with_capacity(urls.len());
    for url in urls {
        let shown = redacted(url);
        if let Some(host) = url.host_str()
            && egress.permits_literal(host) == Some(false)
        {
            tracing::debug!(url = %shown, "probe denied by egress policy");
            return Verdict::Unreachable(format!("GET {shown}: denied by egress policy"));
        }
        let request = match &auth {
            // The credential replaces any user-info in the url: reqwest would
            // otherwise send both, as two `Authorization` headers.
            Some(value) => {
                let mut bare = url.clone();
                let _ = bare.set_username("");
                let _ = bare.set_password(None);
                client.get(bare).header(AUTHORIZATION, value.clone())
            }
            None => client.get(url.clone()),
        };
        let started = Instant::now();
        let answer = match tokio::time::timeout_at(deadline, request.send()).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) if !e.is_timeout() => {
                let e = e.without_url();
                tracing::debug!(url = %shown, error = %scrub.clean(&error_chain(&e)), "http check failed");
                // Refused before any connection: no time to report.
                if let Some(blocked) = blocked_in(&e) {
                    return Verdict::Unreachable(format!("GET {shown}: {blocked}"));
                }
                return Verdict::Unreachable(format!(
                    "GET {shown}: {} after {} ms",
                    failure_class(&e, url.scheme() == "https"),
                    ms(started)
                ));
            }
            Ok(Err(_)) | Err(_) => {
                return Verdict::Unreachable(format!(
                    "GET {shown}: timed out after {} ms",
                    ms(started)
                ));
            }
        };
        let status = answer.status();
        let line = format!(
            "GET {shown}: HTTP {} in {} ms",
            status.as_u16(),
            ms(started)
        );
        if status.is_success() || status.is_redirection() {
            seen.push(line);
        } else if matches!(status.as_u16(), 401 | 403) {
            return Verdict::CredentialsRejected(line);
        } else {
            return Verdict::Unreachable(line);
        }
    }
    Verdict::Reachable(seen.join("; "))
}
