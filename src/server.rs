//! The composition root: opens the store, wires engine, watcher and verifier
//! into the gRPC service, adds health and reflection, serves them over the
//! [`transport`] listener with its HTTP/2 limits and keepalive until told to
//! stop, then shuts down in order.
//!
//! Shutdown order: health turns NOT_SERVING (health watchers get that, then
//! their stream ends), open watch streams end with UNAVAILABLE, tonic stops
//! accepting and lets in-flight calls finish (within the grace period), then
//! the writer commits what is queued and stops. [`Server::serve`] returns
//! only after all of that.

use crate::access::Access;
use crate::admin::{self, Admin};
use crate::config::Config;
use crate::credentials::Credentials;
use crate::definitions::Registry;
use crate::engine::Engine;
use crate::error::Error;
use crate::kinds::Kinds;
use crate::monitor::{Checker, Monitor};
use crate::pb;
use crate::pb::tether::v1::connection_service_server::ConnectionServiceServer;
use crate::pb::tether::v1::credential_service_server::CredentialServiceServer;
use crate::pb::tether::v1::definition_service_server::DefinitionServiceServer;
use crate::probe::Prober;
use crate::reload::{self, Reloadable};
use crate::secrets::SecretBox;
use crate::service::auth::{AuthLayer, Gate};
use crate::service::credentials::CredentialService;
use crate::service::definitions::DefinitionService;
use crate::service::health::{HealthServer, HealthService};
use crate::service::sizes::{HTTP2_MAX_HEADER_LIST, MAX_MESSAGE_BYTES, SizeLayer};
use crate::service::watch_wire::WatchRoute;
use crate::service::{ConnectionService, RequestIds};
use crate::store::Store;
use crate::transport::{self, Tls};
use crate::watch::Watcher;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A server whose definitions are loaded, whose secret key is at hand and
/// whose database is open and migrated: ready to serve.
pub struct Server {
    config: Config,
    store: Store,
    registry: Arc<Registry>,
    secrets: Arc<SecretBox>,
    access: Arc<Access>,
    tls: Option<Arc<Tls>>,
    /// SIGHUP, registered at open so that one sent once the server listens
    /// never meets the default action (exit): it reloads the TLS files and
    /// the access file, and without them it is logged and ignored. Taken by
    /// `serve`.
    hangup: Option<tokio::signal::unix::Signal>,
    /// The admin listener (`--admin-listen`), bound by the caller.
    admin: Option<TcpListener>,
}

impl Server {
    /// Checks the configuration, reads the TLS files, loads the connection
    /// definitions and the secret key, and opens (creating or migrating) the
    /// database. Fails if a TLS or definition file is bad or another process
    /// has the database open.
    pub async fn open(config: Config) -> Result<Server, Error> {
        config.validate()?;
        let access = match &config.auth_file {
            Some(path) => Access::load(path)?,
            None => Access::off(),
        };
        let missing = config.unprotected();
        if !missing.is_empty() {
            tracing::warn!(
                listen = %config.listen,
                missing = %missing.join(", "),
                "--insecure: serving a non-loopback address without TLS and authentication; \
                 ANYONE WHO CAN REACH THIS PORT CAN ACT AS ADMIN"
            );
        }
        let tls = match config.tls_files() {
            Some(files) => Some(Arc::new(Tls::load(files)?)),
            None => None,
        };
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| Error::Internal(format!("cannot handle SIGHUP: {e}")))?;
        let registry =
            Registry::load(&config.models).map_err(|e| Error::invalid("models", e.to_string()))?;
        let key_in_env = std::env::var_os("TETHER_SECRET_KEY").is_some_and(|k| !k.is_empty());
        let store = match config.postgres_url() {
            Some(url) => open_postgres(url, &config, key_in_env)?,
            None => {
                // SQLite writes a header as soon as it opens a file in WAL mode, so an
                // empty database file beside a key that already exists was truncated
                // or swapped: starting afresh would reuse revisions its clients have
                // seen. Checked before SQLite touches the file. (A missing file is a
                // first start, perhaps with a key provisioned ahead of it.)
                if empty_database_file(&config.db_path())
                    && (key_in_env || config.secret_key_path().exists())
                {
                    return Err(Error::Internal(format!(
                        "{} is an empty file although a secret key exists at {}: the database \
                     looks replaced or truncated; restore it from a backup, or move the empty \
                     file and the key away to start a new database",
                        config.db_path().display(),
                        config.secret_key_path().display()
                    )));
                }
                Store::open(&config.db_path(), config.store_config())?
            }
        };
        let secrets = match open_secrets(&config, &store).await {
            Ok(s) => s,
            Err(e) => {
                let closing = store.clone();
                let _ = tokio::task::spawn_blocking(move || closing.close()).await;
                return Err(e);
            }
        };
        tracing::info!(
            kinds = registry.list(None, None).len(),
            "definitions loaded"
        );
        Ok(Server {
            config,
            store,
            registry: Arc::new(registry),
            secrets: Arc::new(secrets),
            access: Arc::new(access),
            tls,
            hangup: Some(hangup),
            admin: None,
        })
    }

    /// Serves the admin paths (`/metrics`, `/healthz`, `/readyz`) on
    /// `listener` too, from the start of [`Server::serve`] until the store
    /// is closed.
    pub fn with_admin(mut self, listener: TcpListener) -> Server {
        self.admin = Some(listener);
        self
    }

    /// Serves the API on `listener` until `shutdown` completes, then shuts down in order.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let stopping = CancellationToken::new();
        let admin_closed = CancellationToken::new();
        let admin = self.admin.take().map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            }
            let admin = Arc::new(Admin::new(self.store.clone(), stopping.clone()));
            tokio::spawn(admin::serve(listener, admin, admin_closed.clone()))
        });
        let result = serve(&mut self, listener, shutdown, stopping).await;
        // Commit whatever is queued, then stop the writer and release the database.
        let store = self.store;
        let closed = tokio::task::spawn_blocking(move || store.close()).await;
        // The admin listener answers (/readyz: 503) until the store is closed.
        admin_closed.cancel();
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        closed.map_err(|e| Error::Internal(format!("closing the store: {e}")))?;
        tracing::info!("stopped");
        result
    }
}

/// Opens the PostgreSQL database at `url`. Every replica must hold the key
/// that seals the secrets they share, so it is never made here: it must be
/// given (`--secret-key-file` or `TETHER_SECRET_KEY`).
#[cfg(feature = "postgres")]
fn open_postgres(url: &str, config: &Config, key_in_env: bool) -> Result<Store, Error> {
    if config.secret_key_file.is_none() && !key_in_env {
        return Err(Error::invalid(
            "secret key",
            "with a PostgreSQL --db, give the key every replica shares: \
             --secret-key-file or TETHER_SECRET_KEY",
        ));
    }
    let url = match &config.db_password_file {
        None => url.to_owned(),
        Some(file) => with_password(url, file)?,
    };
    Store::open_pg(&url, config.store_config())
}

/// `url` with the password in `file` (its first line).
#[cfg(feature = "postgres")]
fn with_password(url: &str, file: &std::path::Path) -> Result<String, Error> {
    crate::secrets::refuse_unless_private(file, "database password")?;
    let text = std::fs::read_to_string(file).map_err(|e| {
        Error::Internal(format!(
            "cannot read the database password file {}: {e}",
            file.display()
        ))
    })?;
    let password = text.lines().next().unwrap_or_default();
    let mut parsed =
        url::Url::parse(url).map_err(|e| Error::invalid("db", format!("not a URL: {e}")))?;
    if parsed.password().is_some() {
        return Err(Error::invalid(
            "db-password-file",
            "the --db URL names a password already: give it in one place",
        ));
    }
    parsed
        .set_password(Some(password))
        .map_err(|()| Error::invalid("db", "a URL without a host cannot take a password"))?;
    Ok(parsed.into())
}

/// Without the `postgres` feature a PostgreSQL --db is refused.
#[cfg(not(feature = "postgres"))]
fn open_postgres(_url: &str, _config: &Config, _key_in_env: bool) -> Result<Store, Error> {
    Err(Error::invalid(
        "db",
        "this tether was built without PostgreSQL (--no-default-features); build it with \
         the `postgres` feature",
    ))
}

/// Opens the database and serves on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    Server::open(config).await?.serve(listener, shutdown).await
}

/// The secret key, checked against the database: a database that holds
/// secrets only opens with the key that sealed them, and never gets a new key
/// made for it. A fresh database gets the key (made if need be) recorded.
async fn open_secrets(config: &Config, store: &Store) -> Result<SecretBox, Error> {
    let path = config.secret_key_path();
    let env_key = std::env::var("TETHER_SECRET_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let recorded = store.read(|r| r.key_check()).await?;
    let source = if env_key.is_some() {
        "TETHER_SECRET_KEY".to_owned()
    } else {
        path.display().to_string()
    };
    let opens = |secrets: &SecretBox, nonce: &[u8], sealed: &[u8]| {
        secrets
            .open(KEY_CHECK, nonce, sealed)
            .map(drop)
            .map_err(|_| {
                Error::invalid(
                    "secret key",
                    format!(
                        "the key in {source} does not open this database's secrets; \
                     use the key it was created with"
                    ),
                )
            })
    };
    match (SecretBox::load(&path, env_key.as_deref())?, recorded) {
        (Some(secrets), Some((nonce, sealed))) => {
            opens(&secrets, &nonce, &sealed)?;
            Ok(secrets)
        }
        (None, Some(_)) => Err(Error::invalid(
            "secret key",
            format!(
                "this database's secrets are sealed with a key, but there is none at {source}; \
                 restore the key"
            ),
        )),
        (found, None) => {
            let secrets = match found {
                Some(s) => s,
                None => SecretBox::load_or_create(&path, None)?,
            };
            let (nonce, sealed) = secrets.seal(KEY_CHECK, &serde_json::Map::new())?;
            // One small row, once: a database over its quota must still
            // start, or nobody could free space in it. Another replica of a
            // shared database may have recorded its check since: then the
            // key must open that one.
            let recorded = store
                .write_freeing(move |tx| match tx.key_check()? {
                    Some(found) => Ok(Some(found)),
                    None => tx.set_key_check(&nonce, &sealed).map(|()| None),
                })
                .await?;
            if let Some((nonce, sealed)) = recorded {
                opens(&secrets, &nonce, &sealed)?;
            }
            Ok(secrets)
        }
    }
}

fn empty_database_file(path: &std::path::Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.len() == 0)
}

/// The id the key check is sealed under (no credential has it: theirs are UUIDs).
const KEY_CHECK: &str = "tether-key-check";

async fn serve(
    server: &mut Server,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    stopping: CancellationToken,
) -> Result<(), Error> {
    let config = &server.config;
    let store = server.store.clone();
    let metrics = store.metrics();
    let kinds = Kinds::new(server.registry.clone(), config.allow_unknown_kinds);
    let credentials = Credentials::new(store.clone(), server.secrets.clone(), kinds.clone());
    let prober = Prober::new(
        config.verify_timeout,
        config.verify_concurrency,
        config.egress_policy()?,
        config.probe_resolver(),
    )
    .map_err(|e| Error::Internal(format!("cannot build the http client: {e}")))?;
    let checker = Arc::new(Checker::new(prober, kinds.clone(), credentials.clone()));
    let engine = Engine::new(store.clone(), checker.clone(), kinds.clone());
    let storage_fault = store.storage_fault();
    let tasks = TaskTracker::new();
    if !config.disable_monitor {
        let monitor = Monitor::new(
            engine.clone(),
            store.clone(),
            checker,
            kinds,
            config.monitor_config(),
        );
        tasks.spawn(monitor.run(stopping.clone()));
    }
    let watcher = Watcher::new(
        store,
        stopping.clone(),
        tasks.clone(),
        config.watch_config(),
    );
    let limits = config.api_limits();
    let definitions = DefinitionService::new(server.registry.clone());
    let credentials =
        CredentialService::new(credentials, limits.default_page_size, limits.max_page_size);
    let request_ids = RequestIds::new(server.secrets.subkey("tether request ids v1"));
    let service = Arc::new(ConnectionService::new(
        engine,
        watcher,
        limits,
        request_ids,
        server.access.clone(),
    ));
    if !server.access.enabled() {
        tracing::warn!(
            "authentication is off (no --auth-file): every caller is the anonymous admin"
        );
    }
    let gate = AuthLayer::new(Gate::new(server.access.clone(), config.rate_limit, metrics));

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;

    let signal = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            // Health turns NOT_SERVING and open streams end: nothing long-lived
            // holds the graceful shutdown open.
            stopping.cancel();
        }
    };
    let tls = server.tls.clone();
    let mode = tls.as_ref().map_or("plaintext", |t| t.mode());
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, transport = mode, "serving"),
        Err(_) => tracing::info!(transport = mode, "serving"),
    }
    let transport = config.transport_config();
    let incoming = transport::incoming(listener, &transport, tls.clone(), stopping.clone(), &tasks);
    if let Some(hangup) = server.hangup.take() {
        let mut files: Vec<Arc<dyn Reloadable>> = Vec::new();
        files.extend(tls.map(|t| t as Arc<dyn Reloadable>));
        if server.access.enabled() {
            files.push(server.access.clone());
        }
        tasks.spawn(reload::watch(
            files,
            hangup,
            config.reload_interval,
            stopping.clone(),
        ));
    }
    // Sizes first (metadata before anyone is authenticated, then each
    // request message as it arrives), then the gate. tonic's own message
    // limit, the same, stays on every service behind ours.
    let server = tonic::transport::Server::builder()
        .layer(SizeLayer::default())
        .layer(gate)
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_max_header_list_size(HTTP2_MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .add_service(
            HealthServer::new(HealthService::new(stopping.clone(), storage_fault))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(reflection_v1.max_decoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(reflection_v1alpha.max_decoding_message_size(MAX_MESSAGE_BYTES))
        // The generated server, but for WatchConnections, which is served
        // with each change encoded once for all its watchers.
        .add_service(WatchRoute::new(
            service.clone(),
            ConnectionServiceServer::from_arc(service).max_decoding_message_size(MAX_MESSAGE_BYTES),
            MAX_MESSAGE_BYTES,
        ))
        .add_service(
            DefinitionServiceServer::new(definitions).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            CredentialServiceServer::new(credentials).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, signal);
    let mut server = tokio::spawn(server);

    let served = tokio::select! {
        r = &mut server => r,
        _ = stopping.cancelled() => {
            match tokio::time::timeout(config.shutdown_grace, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(grace = ?config.shutdown_grace, "calls still open after the grace period; closing them");
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    // Also when the transport failed on its own: the tasks end on this token.
    stopping.cancel();
    tasks.close();
    tasks.wait().await;
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Internal(format!("transport: {e}"))),
        Err(e) => Err(Error::Internal(format!("server task: {e}"))),
    }
}
