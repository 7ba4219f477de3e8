//! `grpc.health.v1.Health`, tied to the server's shutdown: SERVING until
//! shutdown begins, NOT_SERVING after. Watch streams send NOT_SERVING and then
//! end, so a health watcher (Envoy, grpc-go client health checks) never holds
//! a graceful shutdown open.
//!
//! The messages come from `tonic-health`; its own server keeps Watch streams
//! open for the life of the process, which is why this one exists.

use std::pin::Pin;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

pub use tonic_health::pb::health_server::HealthServer;

/// The services this server reports on; "" is the server as a whole.
const SERVICES: [&str; 4] = [
    "",
    "tether.v1.ConnectionService",
    "tether.v1.DefinitionService",
    "tether.v1.CredentialService",
];

pub struct HealthService {
    stopping: CancellationToken,
}

impl HealthService {
    pub fn new(stopping: CancellationToken) -> Self {
        HealthService { stopping }
    }

    fn status(&self) -> ServingStatus {
        if self.stopping.is_cancelled() {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        }
    }
}

fn reply(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

/// Where a Watch stream is: about to send a status, waiting for shutdown
/// after sending one, or finished.
enum Step {
    Send(ServingStatus),
    AwaitStop(ServingStatus),
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
        let first = if SERVICES.contains(&request.get_ref().service.as_str()) {
            self.status()
        } else {
            ServingStatus::ServiceUnknown
        };
        let stopping = self.stopping.clone();
        let stream = futures::stream::unfold(Step::Send(first), move |step| {
            let stopping = stopping.clone();
            async move {
                match step {
                    Step::Send(status) => {
                        let then = if stopping.is_cancelled() {
                            Step::Done
                        } else {
                            Step::AwaitStop(status)
                        };
                        Some((Ok(reply(status)), then))
                    }
                    Step::AwaitStop(status) => {
                        stopping.cancelled().await;
                        if status == ServingStatus::Serving {
                            Some((Ok(reply(ServingStatus::NotServing)), Step::Done))
                        } else {
                            None
                        }
                    }
                    Step::Done => None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
