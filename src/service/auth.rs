//! The gate every call passes: who is calling (a bearer token, or the
//! verified client certificate the transport saw), whether its roles allow
//! the method, and whether it is within its request rate. A call that passes
//! carries its [`Principal`] in the request extensions for the handlers; one
//! that does not is answered here and written to the audit log (principal,
//! method, peer, why; never a token).
//!
//! Every call, admitted or refused, is timed to its response headers and
//! counted in the metrics by method and gRPC code, and logged at debug
//! (`tether::request`: principal, method, code, latency).
//!
//! Deny by default: a method missing from [`need`] is refused to all but
//! admins. Which objects
//! a principal may see is not decided here but by its scope, which handlers
//! pass to the engine.

use crate::access::{Access, Principal, Revoked, Role, Via, check_principal_name};
use crate::metrics::Metrics;
use crate::pb::{ERROR_DOMAIN, code_name};
use crate::transport::Peer;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

/// What a method asks of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// Nothing: health checks, for load balancers and orchestrators.
    Nobody,
    /// Any role: reflection, the lifecycle table, definitions.
    AnyRole,
    /// One of these roles (admin always qualifies).
    OneOf(&'static [Role]),
}

const READ: &[Role] = &[Role::Viewer, Role::Operator];
const WRITE: &[Role] = &[Role::Operator];

/// The requirement of each gRPC method, by its path; `None` for a method
/// this server does not know, which is refused.
pub(crate) fn need(path: &str) -> Option<Need> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        ("grpc.health.v1.Health", "Check" | "Watch") => Need::Nobody,
        (
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ) => Need::AnyRole,
        ("tether.v1.DefinitionService", "ListDefinitions" | "GetDefinition") => Need::AnyRole,
        ("tether.v1.ConnectionService", m) => match m {
            "DescribeLifecycle" | "GetServerInfo" => Need::AnyRole,
            "GetConnection"
            | "ListConnections"
            | "CountConnections"
            | "ListConnectionEvents"
            | "WatchConnections" => Need::OneOf(READ),
            "CreateConnection"
            | "UpdateConnection"
            | "TransitionConnection"
            | "BatchTransitionConnections"
            | "DeleteConnection" => Need::OneOf(WRITE),
            "ReportDiscovered" => Need::OneOf(&[Role::Discovery]),
            _ => return None,
        },
        ("tether.v1.CredentialService", m) => match m {
            "ListCredentials" => Need::OneOf(&[Role::Operator, Role::CredentialAdmin]),
            "CreateCredential" | "DeleteCredential" => Need::OneOf(&[Role::CredentialAdmin]),
            _ => return None,
        },
        _ => return None,
    })
}

/// Every method [`need`] knows, by path. A call's metrics name its method
/// by one of these (without the leading `/`), or `unknown`: a client must
/// not be able to make up label values.
const METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/tether.v1.DefinitionService/ListDefinitions",
    "/tether.v1.DefinitionService/GetDefinition",
    "/tether.v1.ConnectionService/DescribeLifecycle",
    "/tether.v1.ConnectionService/GetServerInfo",
    "/tether.v1.ConnectionService/GetConnection",
    "/tether.v1.ConnectionService/ListConnections",
    "/tether.v1.ConnectionService/CountConnections",
    "/tether.v1.ConnectionService/ListConnectionEvents",
    "/tether.v1.ConnectionService/WatchConnections",
    "/tether.v1.ConnectionService/CreateConnection",
    "/tether.v1.ConnectionService/UpdateConnection",
    "/tether.v1.ConnectionService/TransitionConnection",
    "/tether.v1.ConnectionService/BatchTransitionConnections",
    "/tether.v1.ConnectionService/DeleteConnection",
    "/tether.v1.ConnectionService/ReportDiscovered",
    "/tether.v1.CredentialService/ListCredentials",
    "/tether.v1.CredentialService/CreateCredential",
    "/tether.v1.CredentialService/DeleteCredential",
];

/// The method a call's metrics and request log name: its path without the
/// leading `/` if [`need`] knows it, else `unknown`.
fn method_label(path: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == path)
        .map_or("unknown", |m| &m[1..])
}

/// The gRPC code of a response, from its headers: an error answered before
/// any message is "trailers-only", its `grpc-status` in the headers. Without
/// one the call succeeded so far: a unary call is OK; a stream has opened
/// (it may still end with an error, which this does not see).
fn response_code(headers: &http::HeaderMap) -> &'static str {
    let code = match headers.get("grpc-status") {
        None => tonic::Code::Ok,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .map_or(tonic::Code::Unknown, tonic::Code::from_i32),
    };
    code_name(code)
}

/// Counts a call in the metrics and writes its request log line (debug).
fn observed(
    metrics: &Metrics,
    method: &'static str,
    principal: Option<&str>,
    code: &'static str,
    started: Instant,
) {
    let took = started.elapsed();
    metrics.rpc(method, code, took);
    tracing::debug!(
        target: "tether::request",
        principal = %principal.unwrap_or("-"),
        method = %method,
        code = %code,
        latency_ms = took.as_micros() as f64 / 1000.0,
        "request"
    );
}

/// Whether `p` may call a method that needs `need`.
pub(crate) fn allows(p: &Principal, need: Need) -> bool {
    match need {
        Need::Nobody => true,
        Need::AnyRole => !p.roles.is_empty(),
        Need::OneOf(roles) => p.has_any(roles),
    }
}

/// The gate's shared state.
pub(crate) struct Gate {
    access: Arc<Access>,
    rate: Option<DefaultKeyedRateLimiter<String>>,
    /// Calls admitted, to trim the limiter's table every [`TRIM_EVERY`].
    calls: std::sync::atomic::AtomicU64,
    audit: AuditLog,
    metrics: Arc<Metrics>,
}

/// How often (in calls) the rate limiter forgets idle principals.
const TRIM_EVERY: u64 = 4096;

/// The audit log of refusals, at most [`AUDIT_LINES_PER_SECOND`] lines a
/// second: a flood of refused calls must not flood the log (or the disk
/// under it). Lines held back are counted, and the next line says how many.
struct AuditLog {
    lines: governor::DefaultDirectRateLimiter,
    held_back: std::sync::atomic::AtomicU64,
}

/// Audit lines written per second at most, in bursts of as many.
const AUDIT_LINES_PER_SECOND: u32 = 50;

impl AuditLog {
    fn new() -> AuditLog {
        AuditLog {
            lines: RateLimiter::direct(Quota::per_second(
                NonZeroU32::new(AUDIT_LINES_PER_SECOND).expect("non-zero"),
            )),
            held_back: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn refused(&self, refusal: &Refusal, method: &str, peer: Option<&Peer>) {
        use std::sync::atomic::Ordering;
        if self.lines.check().is_err() {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let held_back = self.held_back.swap(0, Ordering::Relaxed);
        tracing::warn!(
            target: "tether::audit",
            principal = %refusal.principal.as_deref().unwrap_or("-"),
            method = %method,
            peer = %peer.map(|p| p.addr.to_string()).unwrap_or_else(|| "-".into()),
            code = ?refusal.code,
            why = %refusal.message,
            held_back,
            "call refused"
        );
    }
}

impl Gate {
    /// `rate`: calls per second per principal (bursts of as many), 0 for no limit.
    pub(crate) fn new(access: Arc<Access>, rate: u32, metrics: Arc<Metrics>) -> Gate {
        Gate {
            access,
            rate: NonZeroU32::new(rate).map(|r| RateLimiter::keyed(Quota::per_second(r))),
            calls: std::sync::atomic::AtomicU64::new(0),
            audit: AuditLog::new(),
            metrics,
        }
    }

    /// The caller of a request with these headers from this peer, or why not.
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&Peer>,
    ) -> Result<Option<(Principal, Via)>, Refusal> {
        if !self.access.enabled() {
            return Ok(Some((Principal::anonymous(), Via::Nothing)));
        }
        let table = self.access.table();
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    let (scheme, token) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or(Refusal::unauthenticated(
                    "the authorization header is not a bearer token",
                ))?;
            // A token that is presented must be good: a bad one never falls
            // back to the certificate.
            return table
                .by_token(token)
                .map(|(p, via)| Some((p.clone(), via)))
                .ok_or(Refusal::unauthenticated("unknown bearer token"));
        }
        let Some(name) = peer.and_then(|p| p.certificate.as_deref()) else {
            return Ok(None);
        };
        // A CA may sign any name: one reserved for the server (`tether`) or
        // for unauthenticated use must not become a principal.
        if let Err(why) = check_principal_name(name) {
            return Err(Refusal::unauthenticated(&format!(
                "the client certificate's name cannot be a principal: {why}"
            )));
        }
        Ok(Some((
            table.by_certificate(name),
            Via::Certificate(name.to_owned()),
        )))
    }

    /// The principal a call runs as, or the refusal to answer it with.
    fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<&Peer>,
    ) -> Result<Option<(Principal, Via)>, Refusal> {
        let need = need(path);
        if need == Some(Need::Nobody) {
            return Ok(None);
        }
        let (principal, via) =
            self.authenticate(headers, peer)?
                .ok_or(Refusal::unauthenticated(
                    "no credentials: send a bearer token or a client certificate",
                ))?;
        // A method missing from the table is for admins only (who then
        // learn from tonic that it is unimplemented): a method added to a
        // service without an entry here is closed, not open.
        let permitted = allows(&principal, need.unwrap_or(Need::OneOf(&[Role::Admin])));
        if !permitted {
            return Err(Refusal {
                principal: Some(principal.name.clone()),
                code: tonic::Code::PermissionDenied,
                reason: "PERMISSION_DENIED",
                message: format!(
                    "{} may not call {path}{}",
                    principal.name,
                    if principal.roles.is_empty() {
                        " (it holds no role)".to_owned()
                    } else {
                        String::new()
                    }
                ),
                retry_after: None,
            });
        }
        if let Some(limiter) = &self.rate {
            // Forget principals idle for a while, now and then, so the
            // limiter's table holds the active ones only.
            use std::sync::atomic::Ordering;
            if self.calls.fetch_add(1, Ordering::Relaxed) % TRIM_EVERY == TRIM_EVERY - 1 {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
        if let Some(limiter) = &self.rate
            && let Err(not_until) = limiter.check_key(&principal.name)
        {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(Refusal {
                principal: Some(principal.name.clone()),
                code: tonic::Code::ResourceExhausted,
                reason: "RATE_LIMITED",
                message: format!("{} is over its request rate; retry later", principal.name),
                retry_after: Some(wait),
            });
        }
        Ok(Some((principal, via)))
    }
}

/// A call turned away.
struct Refusal {
    principal: Option<String>,
    code: tonic::Code,
    reason: &'static str,
    message: String,
    retry_after: Option<std::time::Duration>,
}

impl Refusal {
    fn unauthenticated(message: &str) -> Refusal {
        Refusal {
            principal: None,
            code: tonic::Code::Unauthenticated,
            reason: "UNAUTHENTICATED",
            message: message.to_owned(),
            retry_after: None,
        }
    }

    fn status(&self) -> Status {
        let mut details = ErrorDetails::with_error_info(self.reason, ERROR_DOMAIN, HashMap::new());
        if let Some(wait) = self.retry_after {
            details.set_retry_info(Some(wait));
        }
        Status::with_error_details(self.code, self.message.clone(), details)
    }
}

/// The tower layer that puts [`Gate`] in front of every service.
#[derive(Clone)]
pub(crate) struct AuthLayer {
    gate: Arc<Gate>,
}

impl AuthLayer {
    pub(crate) fn new(gate: Gate) -> Self {
        AuthLayer {
            gate: Arc::new(gate),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            gate: self.gate.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct AuthService<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::BoxFuture<'static, Result<http::Response<R>, S::Error>>,
        futures::future::Ready<Result<http::Response<R>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let peer = request.extensions().get::<Peer>().cloned();
        let path = request.uri().path().to_owned();
        let method = method_label(&path);
        match self.gate.admit(&path, request.headers(), peer.as_ref()) {
            Ok(principal) => {
                let mut caller = None;
                if let Some((p, via)) = principal {
                    let p = Arc::new(p);
                    caller = Some(p.clone());
                    request.extensions_mut().insert(p);
                    request.extensions_mut().insert(via);
                }
                let answer = self.inner.call(request);
                let gate = self.gate.clone();
                futures::future::Either::Left(Box::pin(async move {
                    let answer = answer.await;
                    let code = match &answer {
                        Ok(response) => response_code(response.headers()),
                        Err(_) => "UNKNOWN",
                    };
                    let name = caller.as_ref().map(|p| p.name.as_str());
                    observed(&gate.metrics, method, name, code, started);
                    answer
                }))
            }
            Err(refusal) => {
                self.gate.audit.refused(&refusal, &path, peer.as_ref());
                let code = code_name(refusal.code);
                observed(
                    &self.gate.metrics,
                    method,
                    refusal.principal.as_deref(),
                    code,
                    started,
                );
                futures::future::Either::Right(futures::future::ready(Ok(refusal
                    .status()
                    .into_http())))
            }
        }
    }
}

/// How the caller of a request authenticated (set by the gate).
pub(crate) fn via<T>(request: &tonic::Request<T>) -> Via {
    request
        .extensions()
        .get::<Via>()
        .cloned()
        .unwrap_or(Via::Nothing)
}

/// Whether `p` may still watch: what an open watch is re-checked against
/// when the access file changes.
pub(crate) fn may_watch(p: &Principal) -> bool {
    need("/tether.v1.ConnectionService/WatchConnections").is_some_and(|n| allows(p, n))
}

/// The status a watch ends with when its caller's access is revoked.
pub(crate) fn revoked_status(why: &Revoked) -> Status {
    let (code, reason) = match why {
        Revoked::Unknown(_) => (tonic::Code::Unauthenticated, "UNAUTHENTICATED"),
        Revoked::Changed(_) => (tonic::Code::PermissionDenied, "PERMISSION_DENIED"),
    };
    Status::with_error_details(
        code,
        why.to_string(),
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new()),
    )
}

/// The principal a request runs as (set by the gate).
pub(crate) fn principal<T>(request: &tonic::Request<T>) -> Result<Arc<Principal>, Status> {
    request
        .extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no principal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_are_refused_and_health_is_open() {
        assert_eq!(need("/tether.v1.ConnectionService/Nope"), None);
        assert_eq!(need("/other.Service/Get"), None);
        assert_eq!(need("garbage"), None);
        assert_eq!(need("/grpc.health.v1.Health/Check"), Some(Need::Nobody));
        assert_eq!(
            need("/tether.v1.ConnectionService/ReportDiscovered"),
            Some(Need::OneOf(&[Role::Discovery]))
        );
    }

    #[test]
    fn every_method_named_in_the_metrics_is_one_the_gate_knows() {
        for m in METHODS {
            assert!(need(m).is_some(), "{m}");
            assert_eq!(method_label(m), &m[1..]);
        }
        assert_eq!(
            method_label("/tether.v1.ConnectionService/Made_Up"),
            "unknown"
        );
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
        let mut h = http::HeaderMap::new();
        assert_eq!(response_code(&h), "OK");
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(response_code(&h), "NOT_FOUND");
    }

    #[test]
    fn roles_grant_what_they_name() {
        let with = |roles: &[Role]| Principal {
            name: "p".into(),
            roles: roles.iter().copied().collect(),
            scope: crate::access::Scope::All,
        };
        let write = need("/tether.v1.ConnectionService/CreateConnection").unwrap();
        let read = need("/tether.v1.ConnectionService/WatchConnections").unwrap();
        assert!(allows(&with(&[Role::Operator]), write));
        assert!(allows(&with(&[Role::Operator]), read));
        assert!(!allows(&with(&[Role::Viewer]), write));
        assert!(!allows(&with(&[Role::Discovery]), read));
        assert!(allows(&with(&[Role::Admin]), write));
        assert!(!allows(&with(&[]), Need::AnyRole));
    }
}
