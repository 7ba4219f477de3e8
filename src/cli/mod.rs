//! The client commands of the `tether` binary (`tether get|list|create|...`):
//! their arguments, the calls they make, what they print, and the exit code
//! each kind of failure gives. They speak only the public gRPC API, as any
//! other client does.

pub mod client;
mod commands;
pub mod render;

pub use client::ClientOpts;
pub use commands::Command;
pub use render::Output;

use std::process::ExitCode;

/// Exit codes by error class, so that scripts can tell a missing connection
/// from a refused move from a server that cannot be reached.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Anything not below: an internal error, data loss, an unknown code.
    pub const OTHER: u8 = 1;
    /// Bad usage: a flag or value the command cannot use, or the server
    /// answered INVALID_ARGUMENT or OUT_OF_RANGE.
    pub const USAGE: u8 = 2;
    /// NOT_FOUND: no such connection, credential or definition (in your scope).
    pub const NOT_FOUND: u8 = 3;
    /// The request conflicts with the current state: FAILED_PRECONDITION
    /// (a move the lifecycle refuses, an unreachable target), ABORTED (a stale
    /// etag), ALREADY_EXISTS.
    pub const CONFLICT: u8 = 4;
    /// UNAUTHENTICATED or PERMISSION_DENIED.
    pub const DENIED: u8 = 5;
    /// Worth retrying later: the server cannot be reached, or answered
    /// UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or CANCELLED.
    pub const UNAVAILABLE: u8 = 6;
}

/// Why a client command failed.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage, found before any call.
    Usage(String),
    /// The server could not be reached.
    Unreachable(String),
    /// The server answered with an error.
    Status(tonic::Status),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Failure {
        Failure::Status(s)
    }
}

impl From<client::ConnectError> for Failure {
    fn from(e: client::ConnectError) -> Failure {
        match e {
            client::ConnectError::Usage(m) => Failure::Usage(m),
            e @ client::ConnectError::Unreachable { .. } => Failure::Unreachable(e.to_string()),
        }
    }
}

/// The exit code of a gRPC status code.
pub fn exit_code(code: tonic::Code) -> u8 {
    use tonic::Code::*;
    match code {
        Ok => exit::OK,
        InvalidArgument | OutOfRange => exit::USAGE,
        NotFound => exit::NOT_FOUND,
        FailedPrecondition | Aborted | AlreadyExists => exit::CONFLICT,
        Unauthenticated | PermissionDenied => exit::DENIED,
        Unavailable | DeadlineExceeded | ResourceExhausted | Cancelled => exit::UNAVAILABLE,
        Unknown | Internal | DataLoss | Unimplemented => exit::OTHER,
    }
}

/// Prints why `failure` happened on stderr and returns its exit code. A
/// server's error shows its code, its message, and every field of its
/// `google.rpc.ErrorInfo` (an INVALID_TRANSITION names the allowed targets).
pub fn report(failure: Failure) -> ExitCode {
    match failure {
        Failure::Usage(m) => {
            eprintln!("error: {m}");
            ExitCode::from(exit::USAGE)
        }
        Failure::Unreachable(m) => {
            eprintln!("error: {m}");
            ExitCode::from(exit::UNAVAILABLE)
        }
        Failure::Status(status) => {
            use tonic_types::StatusExt;
            eprintln!(
                "error: {}: {}",
                crate::pb::code_name(status.code()),
                status.message()
            );
            if let Some(info) = status.get_details_error_info() {
                eprintln!("  reason: {}", info.reason);
                let mut fields: Vec<_> = info.metadata.iter().collect();
                fields.sort();
                for (k, v) in fields {
                    if k == "allowed" {
                        let allowed = if v.is_empty() {
                            "none".to_owned()
                        } else {
                            v.split(',').collect::<Vec<_>>().join(", ")
                        };
                        eprintln!("  allowed targets: {allowed}");
                    } else {
                        eprintln!("  {k}: {v}");
                    }
                }
            }
            ExitCode::from(exit_code(status.code()))
        }
    }
}

/// Runs a client command to its end.
pub async fn run(command: Command) -> ExitCode {
    match commands::run(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => report(f),
    }
}
