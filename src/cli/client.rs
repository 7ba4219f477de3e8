//! How the client commands reach a server: the endpoint, TLS and token
//! options (named after the server's own), the channel they open, and the
//! bearer token added to every call.

use crate::pb::tether::v1 as pb;
use std::path::PathBuf;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where the server is and how to prove who we are: every client command takes these.
#[derive(Clone, Debug, clap::Args)]
pub struct ClientOpts {
    /// The server: HOST:PORT, http://HOST:PORT, or https://HOST:PORT (TLS).
    /// TLS is also used when --tls-ca or --tls-cert is given.
    #[arg(long, env = "TETHER_ENDPOINT", default_value = "127.0.0.1:50051")]
    pub endpoint: String,

    /// PEM CA certificates to verify the server's certificate against
    /// [default with TLS: the Mozilla root CAs]
    #[arg(long, env = "TETHER_CLIENT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate chain to authenticate with (mTLS); needs --tls-key.
    #[arg(
        long,
        env = "TETHER_CLIENT_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "TETHER_CLIENT_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// The name the server's certificate must hold [default: the endpoint's host].
    #[arg(long, env = "TETHER_CLIENT_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// Bearer token to authenticate with (see `tether token`). Prefer
    /// --token-file or the environment: a flag shows in the process list.
    #[arg(
        long,
        env = "TETHER_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,

    /// A file whose first line is the bearer token (`tether token` prints it first).
    #[arg(long, env = "TETHER_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Longest a call may take (a watch has no limit).
    #[arg(long, env = "TETHER_TIMEOUT", default_value = "30s", value_parser = crate::config::duration)]
    pub timeout: Duration,
}

/// Adds `authorization: Bearer TOKEN` to every call when there is a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel to the server with the token on every call.
pub type Chan = InterceptedService<Channel, Bearer>;

/// The three API clients over one channel.
pub struct Clients {
    pub connections: pb::connection_service_client::ConnectionServiceClient<Chan>,
    pub credentials: pb::credential_service_client::CredentialServiceClient<Chan>,
    pub definitions: pb::definition_service_client::DefinitionServiceClient<Chan>,
}

/// Why the client could not even make a call: bad options or no connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path)
        .map_err(|e| ConnectError::Usage(format!("cannot read {what} {}: {e}", path.display())))
}

impl ClientOpts {
    /// The token from --token, TETHER_TOKEN or the first line of --token-file.
    fn token(&self) -> Result<Option<String>, ConnectError> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.trim().to_owned(),
            (None, Some(file)) => {
                let text = String::from_utf8(read(file, "--token-file")?).map_err(|_| {
                    ConnectError::Usage(format!("--token-file {} is not UTF-8", file.display()))
                })?;
                text.lines().next().unwrap_or("").trim().to_owned()
            }
            (None, None) => return Ok(None),
        };
        if token.is_empty() {
            return Err(ConnectError::Usage("the token is empty".into()));
        }
        Ok(Some(token))
    }

    /// The endpoint as a URI, and whether it speaks TLS.
    fn uri(&self) -> Result<(String, bool), ConnectError> {
        let e = self.endpoint.trim();
        let tls_flags = self.tls_ca.is_some() || self.tls_cert.is_some();
        if let Some(rest) = e.strip_prefix("https://") {
            Ok((format!("https://{rest}"), true))
        } else if let Some(rest) = e.strip_prefix("http://") {
            if tls_flags {
                return Err(ConnectError::Usage(format!(
                    "--endpoint {e} says plaintext (http://) but TLS options are given: use https://"
                )));
            }
            Ok((format!("http://{rest}"), false))
        } else if e.contains("://") {
            Err(ConnectError::Usage(format!(
                "--endpoint {e}: use HOST:PORT, http://HOST:PORT or https://HOST:PORT"
            )))
        } else if tls_flags {
            Ok((format!("https://{e}"), true))
        } else {
            Ok((format!("http://{e}"), false))
        }
    }

    /// Opens the channel: a connection is made now, so an unreachable server
    /// is reported as such before any call.
    pub async fn connect(&self) -> Result<Clients, ConnectError> {
        let (uri, tls) = self.uri()?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| ConnectError::Usage(format!("--endpoint {}: {e}", self.endpoint)))?
            .connect_timeout(self.timeout.min(Duration::from_secs(10)));
        if tls {
            let mut config = ClientTlsConfig::new();
            config = match &self.tls_ca {
                Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca, "--tls-ca")?)),
                None => config.with_webpki_roots(),
            };
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                config = config.identity(Identity::from_pem(
                    read(cert, "--tls-cert")?,
                    read(key, "--tls-key")?,
                ));
            }
            if let Some(name) = &self.tls_server_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| ConnectError::Usage(format!("TLS options: {e}")))?;
        }
        let bearer = match self.token()? {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                ConnectError::Usage("the token has characters a header cannot carry".into())
            })?),
            None => None,
        };
        let channel = endpoint.connect().await.map_err(|e| {
            // The transport error's own text is terse ("transport error"):
            // its source says what went wrong.
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                // Layers often repeat the text of the one beneath.
                let text = s.to_string();
                if !detail.ends_with(&text) {
                    detail = format!("{detail}: {text}");
                }
                source = s.source();
            }
            ConnectError::Unreachable {
                endpoint: self.endpoint.clone(),
                detail,
            }
        })?;
        let chan = InterceptedService::new(channel, Bearer(bearer));
        Ok(Clients {
            connections: pb::connection_service_client::ConnectionServiceClient::new(chan.clone()),
            credentials: pb::credential_service_client::CredentialServiceClient::new(chan.clone()),
            definitions: pb::definition_service_client::DefinitionServiceClient::new(chan),
        })
    }

    /// A request with this command's deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(self.timeout);
        req
    }
}
