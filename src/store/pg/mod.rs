//! The PostgreSQL backend, the `postgres` feature (on by default): the
//! connection and its errors, the schema with its migrations ([`schema`]),
//! the revision in commit order across replicas with the tail that reads it
//! ([`order`]), the reads ([`query`]), the writes a writer job makes
//! ([`mod@write`]), a replica's writer groups ([`writer`]), probing shared
//! out ([`shards`]) and the store over them ([`store`]).
//! docs/ARCHITECTURE.md ("PostgreSQL") has the design, and what is not built yet.

#[cfg(test)]
mod cluster;
pub(crate) mod order;
pub(crate) mod query;
pub(crate) mod schema;
pub(crate) mod shards;
pub(crate) mod store;
pub(crate) mod write;
pub(crate) mod writer;

use crate::error::Error;
use crate::store::Read;
use postgres::types::ToSql;
use postgres::{Error as PgError, Row, Statement};
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;

/// A connection to the database at `url` (`postgres://user@host:port/db`),
/// over TLS when the server offers it (or `sslmode=require` demands it).
pub(crate) fn connect(url: &str) -> Result<postgres::Client, Error> {
    let (config, tls) = settings(url)?;
    config.connect(tls).map_err(|e| {
        if matches!(config.get_ssl_mode(), postgres::config::SslMode::Disable)
            || !e.to_string().contains("TLS")
        {
            return error(e);
        }
        Error::StorageUnavailable(format!(
            "PostgreSQL: {e}; its certificate must name the host in --db and be signed by a \
             public CA or the one in the URL's sslrootcert=FILE (or connect with sslmode=disable)"
        ))
    })
}

/// Time to reach PostgreSQL and log in, unless the URL's `connect_timeout` says.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that has sent data unacknowledged this long, or that answers
/// no keepalive probe for about as long, is broken: its reader and writer
/// then learn so (and health says NOT_SERVING) instead of waiting for ever.
const DEAD_PEER: Duration = Duration::from_secs(10);

/// The client's settings from `url`, and TLS that verifies the server's
/// certificate against the public roots, plus `sslrootcert` when the URL names
/// one. libpq's `sslmode=verify-ca` and `verify-full` are taken as `require`:
/// the certificate is always verified, host name included.
fn settings(url: &str) -> Result<(postgres::Config, MakeRustlsConnect), Error> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let mut root = None;
    let mut given = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = url::form_urlencoded::parse(pair.as_bytes())
            .next()
            .unwrap_or_default();
        match (key.as_ref(), value.as_ref()) {
            ("sslrootcert", file) => root = Some(std::path::PathBuf::from(file)),
            ("sslmode", "verify-ca" | "verify-full") => kept.push("sslmode=require"),
            _ => kept.push(pair),
        }
        given.push(key.into_owned());
    }
    let url = match kept.is_empty() {
        true => base.to_owned(),
        false => format!("{base}?{}", kept.join("&")),
    };
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| Error::invalid("db", format!("not a PostgreSQL URL: {e}")))?;
    let says = |key: &str| given.iter().any(|k| k == key);
    if !says("connect_timeout") {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if !says("tcp_user_timeout") {
        config.tcp_user_timeout(DEAD_PEER);
    }
    if !says("keepalives_idle") {
        config.keepalives_idle(DEAD_PEER / 2);
    }
    if !says("keepalives_interval") {
        config.keepalives_interval(DEAD_PEER / 10);
    }
    if !says("keepalives_retries") {
        config.keepalives_retries(3);
    }
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(file) = &root {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let bad = |e: &dyn std::fmt::Display| {
            Error::invalid("db sslrootcert", format!("{}: {e}", file.display()))
        };
        let certs = CertificateDer::pem_file_iter(file)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(&e))?;
        if certs.is_empty() {
            return Err(bad(&"no PEM certificate in it"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(&e))?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS to PostgreSQL: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((config, MakeRustlsConnect::new(tls)))
}

/// PostgreSQL's errors as the store's: one it cannot reach, or that is
/// going away, starting or out of connections, is storage that is
/// unavailable (a retry may succeed); a full disk is storage that is full;
/// any other, an internal error with PostgreSQL's words.
pub(crate) fn error(e: postgres::Error) -> Error {
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io {
        return Error::StorageUnavailable(format!("PostgreSQL: {e}"));
    }
    let Some(db) = e.as_db_error() else {
        return Error::Internal(format!("PostgreSQL: {e}"));
    };
    // "db error" alone says nothing: PostgreSQL's own words do.
    let said = format!("PostgreSQL: {} ({})", db.message(), db.code().code());
    match db.code().code() {
        // Disk full.
        "53100" => Error::StorageFull(said),
        // A connection exception (class 08); admin or crash shutdown, or
        // not accepting connections yet (57P01-57P03); too many
        // connections, or other resources short (class 53).
        code if code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") => {
            Error::StorageUnavailable(said)
        }
        _ => Error::Internal(said),
    }
}

/// Runs statements. On a plain `postgres` client or transaction, each is
/// prepared as it comes (two round trips); on a [`Client`], once per
/// connection (one round trip, and no planning again).
pub(crate) trait Statements {
    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, PgError>;
    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, PgError>;
    fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, PgError>;
    fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, PgError>;
    /// Runs `sql` (one or more statements, no parameters) as it is.
    fn batch_execute(&mut self, sql: &str) -> Result<(), PgError>;
}

impl<C: postgres::GenericClient> Statements for C {
    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, PgError> {
        postgres::GenericClient::execute(self, sql, params)
    }
    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, PgError> {
        postgres::GenericClient::query(self, sql, params)
    }
    fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, PgError> {
        postgres::GenericClient::query_opt(self, sql, params)
    }
    fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, PgError> {
        postgres::GenericClient::query_one(self, sql, params)
    }
    fn batch_execute(&mut self, sql: &str) -> Result<(), PgError> {
        postgres::GenericClient::batch_execute(self, sql)
    }
}

/// A connection that keeps the statements it prepared, by their text: the
/// writer's, a reader's and the tail's run the same few again and again.
pub(crate) struct Client {
    pub(crate) raw: postgres::Client,
    prepared: HashMap<String, Statement>,
}

/// Most statements a [`Client`] keeps; past it, it forgets them all and
/// starts again (queries built from filters can vary without end).
const MOST_PREPARED: usize = 256;

impl Client {
    /// A new connection to `url`, as [`connect`] makes it.
    pub(crate) fn connect(url: &str) -> Result<Client, Error> {
        connect(url).map(Client::from)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.raw.is_closed()
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement, PgError> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        if self.prepared.len() >= MOST_PREPARED {
            self.prepared.clear();
        }
        let statement = self.raw.prepare(sql)?;
        self.prepared.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

impl From<postgres::Client> for Client {
    fn from(raw: postgres::Client) -> Client {
        Client {
            raw,
            prepared: HashMap::new(),
        }
    }
}

impl Statements for Client {
    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, PgError> {
        let statement = self.prepared(sql)?;
        self.raw.execute(&statement, params)
    }
    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, PgError> {
        let statement = self.prepared(sql)?;
        self.raw.query(&statement, params)
    }
    fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, PgError> {
        let statement = self.prepared(sql)?;
        self.raw.query_opt(&statement, params)
    }
    fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, PgError> {
        let statement = self.prepared(sql)?;
        self.raw.query_one(&statement, params)
    }
    fn batch_execute(&mut self, sql: &str) -> Result<(), PgError> {
        self.raw.batch_execute(sql)
    }
}

/// The space the database takes (what a quota would measure).
pub(crate) fn used_bytes(c: &mut impl Statements) -> Result<u64, Error> {
    let bytes: i64 = c
        .query_one("SELECT pg_database_size(current_database())", &[])
        .map_err(error)?
        .get(0);
    Ok(u64::try_from(bytes).unwrap_or(0))
}

/// Runs `f` on a [`Read`] of `client` in one read-only transaction that sees
/// one moment (`REPEATABLE READ`), as SQLite's read transactions do.
pub(crate) fn read<T>(
    client: &RefCell<Client>,
    f: impl FnOnce(&Read<'_>) -> Result<T, Error>,
) -> Result<T, Error> {
    client
        .borrow_mut()
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .map_err(error)?;
    let out = f(&Read::on_pg(client));
    let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = client.borrow_mut().batch_execute(end).map_err(error);
    let out = out?;
    ended?;
    Ok(out)
}
