//! What a reachability check does, as a definition states it: pure data,
//! read from definition files and shown by `GetDefinition`.

use serde::{Deserialize, Serialize};

/// How a kind of connection is checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Check {
    /// No check: verification always passes.
    None,
    /// The check follows the url's scheme: TCP connect for `tcp://`, GET of
    /// the url itself for `http(s)://`, none for anything else.
    #[default]
    Url,
    /// TCP connect to the url's host and port.
    Tcp,
    /// HTTP GET of each path in turn, relative to the url; every one must
    /// answer 2xx or 3xx (401/403: credentials rejected). No paths: the url itself.
    Http {
        #[serde(default)]
        paths: Vec<String>,
    },
    /// `grpc.health.v1.Health/Check` for `service` ("" asks about the server).
    Grpc {
        #[serde(default)]
        service: String,
    },
}

impl Check {
    /// The name used on the wire (`Check.type`).
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Check::None => "none",
            Check::Url => "url",
            Check::Tcp => "tcp",
            Check::Http { .. } => "http",
            Check::Grpc { .. } => "grpc",
        }
    }
}

/// A credential's decrypted secret, as given by its owner: for example
/// `{"token": ...}`, `{"username": ..., "password": ...}` or
/// `{"client_certificate": PEM, "client_key": PEM}`.
pub(crate) type Secret = serde_json::Map<String, serde_json::Value>;
