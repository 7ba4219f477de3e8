//! The gRPC check: `grpc.health.v1.Health/Check` over plaintext HTTP/2 on a
//! fresh channel, closed again after the answer. TLS is not supported: this
//! build of tonic has no TLS transport.

use super::Verdict;
use super::credentials::{AuthHeader, Scrubber};
use super::prober::{error_chain, ms};
use super::target::HostPort;
use tokio::time::Instant;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub(crate) async fn check(
    to: &HostPort,
    service: &str,
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
    let endpoint = match Endpoint::from_shared(format!("http://{to}")) {
        Ok(e) => e,
        Err(e) => return Verdict::Unreachable(format!("{what}: {}", error_chain(&e))),
    };

    let started = Instant::now();
    let timed_out = || Verdict::Unreachable(format!("{what}: timed out after {} ms", ms(started)));
    let channel = match tokio::time::timeout_at(deadline, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            return Verdict::Unreachable(format!(
                "{what} failed after {} ms: {}",
                ms(started),
                scrub.clean(&error_chain(&e))
            ));
        }
        Err(_) => return timed_out(),
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
            // Not `Status`'s Display: it prints the response metadata too.
            // The message is the peer's text, so it is scrubbed.
            let mut said = status.message().to_owned();
            if let Some(source) = std::error::Error::source(&status) {
                if !said.is_empty() {
                    said.push_str(": ");
                }
                said.push_str(&error_chain(source));
            }
            let mut line = format!(
                "{what}: grpc status {:?} after {} ms",
                status.code(),
                ms(started)
            );
            if !said.is_empty() {
                line.push_str(": ");
                line.push_str(&scrub.clean(&said));
            }
            match status.code() {
                Code::Unauthenticated | Code::PermissionDenied => {
                    Verdict::CredentialsRejected(line)
                }
                _ => Verdict::Unreachable(line),
            }
        }
    }
}
