//! The gRPC check: `grpc.health.v1.Health/Check` over HTTP/2, plaintext or
//! TLS, on a fresh channel closed again after the answer. The channel dials
//! an address the egress policy allowed; the name only travels as the
//! authority and the TLS server name.

use super::Verdict;
use super::client_auth::{AuthHeader, Scrubber, TlsMaterial};
use super::egress::Egress;
use super::prober::{error_chain, failure_class, ms};
use super::target::HostPort;
use tokio::time::Instant;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub(crate) async fn check(
    to: &HostPort,
    service: &str,
    tls: Option<ClientTlsConfig>,
    egress: &Egress,
    auth: Option<&AuthHeader>,
    deadline: Instant,
    scrub: &Scrubber,
) -> Verdict {
    let what = if service.is_empty() {
        format!("grpc health check of {to}")
    } else {
        format!("grpc health check of {to} service {service:?}")
    };
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    if let Some(auth) = auth {
        let Ok(mut value) = MetadataValue::try_from(auth.as_str()) else {
            return Verdict::CredentialsRejected(
                "the credential cannot be sent as authorization metadata".into(),
            );
        };
        value.set_sensitive(true);
        request.metadata_mut().insert("authorization", value);
    }
    let started = Instant::now();
    let timed_out = || Verdict::Unreachable(format!("{what}: timed out after {} ms", ms(started)));
    let addrs = match tokio::time::timeout_at(deadline, egress.addresses(&to.host, to.port)).await {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(blocked)) => return Verdict::Unreachable(format!("{what}: {blocked}")),
        Err(_) => return timed_out(),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let Ok(origin) = format!("{scheme}://{to}").parse::<http::Uri>() else {
        return Verdict::Unreachable(format!("{what}: the host cannot be used as an authority"));
    };
    // Each allowed address in turn, as a TCP connect would; the last
    // failure decides.
    let mut failure = None;
    let mut channel = None;
    for addr in addrs {
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map(|e| e.origin(origin.clone()))
            .and_then(|e| match &tls {
                Some(tls) => e.tls_config(tls.clone()),
                None => Ok(e),
            });
        let endpoint = match endpoint {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(%to, error = %error_chain(&e), "grpc endpoint refused");
                failure = Some("tls handshake failed");
                continue;
            }
        };
        match tokio::time::timeout_at(deadline, endpoint.connect()).await {
            Ok(Ok(c)) => {
                channel = Some(c);
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(%to, %addr, error = %scrub.clean(&error_chain(&e)), "grpc connect failed");
                failure = Some(failure_class(&e, tls.is_some()));
            }
            Err(_) => return timed_out(),
        }
    }
    let Some(channel) = channel else {
        return Verdict::Unreachable(format!(
            "{what}: {} after {} ms",
            failure.unwrap_or("unreachable"),
            ms(started)
        ));
    };
    let answer =
        match tokio::time::timeout_at(deadline, HealthClient::new(channel).check(request)).await {
            Ok(answer) => answer,
            Err(_) => return timed_out(),
        };
    match answer {
        Ok(answer) => {
            let status = answer.into_inner().status();
            let line = format!("{what}: {} in {} ms", status.as_str_name(), ms(started));
            match status {
                ServingStatus::Serving => Verdict::Reachable(line),
                ServingStatus::NotServing
                | ServingStatus::Unknown
                | ServingStatus::ServiceUnknown => Verdict::Unreachable(line),
            }
        }
        Err(status) => {
            // The code is a fact of the protocol; the message is the peer's
            // text and is only logged.
            tracing::debug!(%to, code = ?status.code(), message = %scrub.clean(status.message()), "grpc health check answered an error");
            let line = format!(
                "{what}: grpc status {:?} after {} ms",
                status.code(),
                ms(started)
            );
            match status.code() {
                Code::Unauthenticated | Code::PermissionDenied => {
                    Verdict::CredentialsRejected(line)
                }
                _ => Verdict::Unreachable(line),
            }
        }
    }
}

/// TLS for a gRPC check of `domain`: the identity, and the given CA as
/// the only one trusted (without one, the public roots).
pub(super) fn tls(material: Option<&TlsMaterial>, domain: &str) -> ClientTlsConfig {
    use tonic::transport::{Certificate, Identity};
    let mut tls = ClientTlsConfig::new().domain_name(domain);
    match material.and_then(|m| m.ca_pem.as_ref()) {
        Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(ca)),
        None => tls = tls.with_webpki_roots(),
    }
    if let Some((cert, key)) = material.and_then(|m| m.identity_pem.as_ref()) {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    tls
}
