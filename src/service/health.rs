//! `grpc.health.v1.Health`, tied to the server's shutdown and to the store:
//! SERVING while writes can commit, NOT_SERVING while they fail for a storage
//! reason (disk full, read-only, I/O error, database file replaced) and for
//! good once shutdown begins. Watch streams follow those changes and end
//! after shutdown's NOT_SERVING, so a health watcher (Envoy, grpc-go client
//! health checks) never holds a graceful shutdown open.
//!
//! The messages come from `tonic-health`; its own server keeps Watch streams
//! open for the life of the process, which is why this one exists. It reads
//! the store's fault flag and never touches the database itself.

use std::pin::Pin;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

pub(crate) use tonic_health::pb::health_server::HealthServer;

/// The services this server reports on; "" is the server as a whole.
const SERVICES: [&str; 4] = [
    "",
    "tether.v1.ConnectionService",
    "tether.v1.DefinitionService",
    "tether.v1.CredentialService",
];

pub(crate) struct HealthService {
    stopping: CancellationToken,
    /// True while the store cannot commit writes.
    fault: watch::Receiver<bool>,
}

impl HealthService {
    pub(crate) fn new(stopping: CancellationToken, fault: watch::Receiver<bool>) -> Self {
        HealthService { stopping, fault }
    }

    fn status(&self) -> ServingStatus {
        status_of(&self.stopping, &self.fault)
    }
}

fn status_of(stopping: &CancellationToken, fault: &watch::Receiver<bool>) -> ServingStatus {
    if serving(stopping, fault) {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Whether the server is SERVING: shutdown has not begun and the store can
/// commit. The admin listener's `/readyz` asks the same.
pub(crate) fn serving(stopping: &CancellationToken, fault: &watch::Receiver<bool>) -> bool {
    !stopping.is_cancelled() && !*fault.borrow()
}

fn reply(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

/// Where a Watch stream is: about to send a status, waiting for a change
/// after sending one, or finished.
enum Step {
    Send(ServingStatus),
    AwaitChange(ServingStatus),
    Done,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        if !SERVICES.contains(&request.get_ref().service.as_str()) {
            return Err(Status::not_found("unknown service"));
        }
        Ok(Response::new(reply(self.status())))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The health protocol answers an unknown service in-stream.
        let known = SERVICES.contains(&request.get_ref().service.as_str());
        let first = if known {
            self.status()
        } else {
            ServingStatus::ServiceUnknown
        };
        let stopping = self.stopping.clone();
        let mut fault = self.fault.clone();
        fault.mark_unchanged();
        let stream =
            futures::stream::unfold((Step::Send(first), fault), move |(step, mut fault)| {
                let stopping = stopping.clone();
                async move {
                    match step {
                        Step::Send(status) => {
                            let then = if stopping.is_cancelled() {
                                Step::Done
                            } else {
                                Step::AwaitChange(status)
                            };
                            Some((Ok(reply(status)), (then, fault)))
                        }
                        Step::AwaitChange(sent) => loop {
                            // A store that is gone (closed) only happens at shutdown.
                            let store_open = tokio::select! {
                                _ = stopping.cancelled() => false,
                                changed = fault.changed(), if known => changed.is_ok(),
                            };
                            if !store_open || stopping.is_cancelled() {
                                return (sent != ServingStatus::NotServing && known).then(|| {
                                    (Ok(reply(ServingStatus::NotServing)), (Step::Done, fault))
                                });
                            }
                            let now = status_of(&stopping, &fault);
                            if now != sent {
                                return Some((Ok(reply(now)), (Step::AwaitChange(now), fault)));
                            }
                        },
                        Step::Done => None,
                    }
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
