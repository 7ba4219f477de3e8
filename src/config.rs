//! Every setting of the server, each with a flag and an environment variable,
//! and the defaults a fresh install runs with; the `--config` file that sets
//! them too.

use crate::error::Error;
use crate::monitor::MonitorConfig;
use crate::probe::{Access, EgressPolicy, Resolve, SystemResolver};
use crate::store::{StoreConfig, WriterConfig};
use crate::transport::{TlsFiles, TransportConfig};
use crate::watch::WatchConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Page and batch limits of the API, as the service applies them.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    pub default_page_size: usize,
    pub max_page_size: usize,
    pub default_events_page_size: usize,
    pub max_batch: usize,
    pub max_discovery_report: usize,
    /// Watch streams one principal may hold open.
    pub max_watches: usize,
}

/// The database file: `db`, or `tether/tether.db` in the per-user data directory.
pub fn db_path(db: Option<&std::path::Path>) -> PathBuf {
    if let Some(p) = db {
        return p.to_owned();
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tether").join("tether.db")
}

/// `db` when it is a `postgres://` or `postgresql://` URL.
pub fn postgres_url(db: Option<&std::path::Path>) -> Option<&str> {
    db.and_then(|d| d.to_str())
        .filter(|d| d.starts_with("postgres://") || d.starts_with("postgresql://"))
}

/// The secret key file: `key_file`, or `tether.key` beside the database `db`.
pub fn key_path(key_file: Option<&std::path::Path>, db: &std::path::Path) -> PathBuf {
    key_file.map(|k| k.to_owned()).unwrap_or_else(|| {
        db.parent()
            .map(|d| d.join("tether.key"))
            .unwrap_or_else(|| PathBuf::from("tether.key"))
    })
}

/// `--listen`: an IP address and port, or a host name and port resolved now.
/// Of several addresses (`localhost` is often `::1` and `127.0.0.1`) the first
/// IPv4 one, which is what most clients try first.
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    if !s.contains(':') {
        return Err(format!("{s:?} has no port: give HOST:PORT or IP:PORT"));
    }
    let found: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(s)
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

pub(crate) fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// A size in bytes: a whole number, optionally followed by a binary unit
/// (`B`, `KiB`, `MiB`, `GiB`, `TiB`; any letter case, a space allowed before
/// it). Decimal units (`KB`, `MB`, `GB`) are refused rather than guessed at.
pub fn bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim_start());
    if number.is_empty() {
        return Err(format!(
            "{s:?} is not a size: write a whole number of bytes, optionally with \
             KiB, MiB, GiB or TiB (for example 512MiB or 8GiB)"
        ));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kib" => 10,
        "mib" => 20,
        "gib" => 30,
        "tib" => 40,
        "k" | "kb" | "m" | "mb" | "g" | "gb" | "t" | "tb" => {
            return Err(format!(
                "{s:?}: {unit:?} could mean a power of 1000 or of 1024; write KiB, MiB, \
                 GiB or TiB (powers of 1024), or the number of bytes"
            ));
        }
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The smallest storage quota accepted (0 aside): an empty database takes
/// about 100 KiB, so anything smaller would refuse the first write.
pub const MIN_STORAGE_QUOTA: u64 = 1 << 20;

/// A resolver handed in by code rather than flags.
#[derive(Clone)]
pub struct InjectedResolver(pub Arc<dyn Resolve>);

impl std::fmt::Debug for InjectedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InjectedResolver")
    }
}

/// The command line `args` (program name first) with the settings of
/// `serve --config FILE` (or `TETHER_CONFIG`) added as the flags they name,
/// except those the command line or the environment already set: flags win
/// over variables, variables over the file, the file over the defaults.
/// Anything else, `args` unchanged (clap then reports what is wrong with them).
/// An error says what in the file is wrong: a key that is no flag of
/// `serve`, or a value of the wrong shape; a value of the right shape that
/// the flag refuses is reported by clap, naming the flag.
pub fn with_config_file(
    cli: clap::Command,
    args: Vec<std::ffi::OsString>,
) -> Result<Vec<std::ffi::OsString>, String> {
    use clap::parser::ValueSource;
    let Ok(matches) = cli.clone().try_get_matches_from(&args) else {
        return Ok(args);
    };
    let Some(("serve", given)) = matches.subcommand() else {
        return Ok(args);
    };
    let Some(path) = given.get_one::<PathBuf>("config") else {
        return Ok(args);
    };
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {shown}: {e}"))?;
    let settings: serde_norway::Mapping = match serde_norway::from_str(&text) {
        Ok(serde_norway::Value::Mapping(m)) => m,
        Ok(serde_norway::Value::Null) => serde_norway::Mapping::new(),
        Ok(_) => return Err(format!("--config {shown}: not a map of settings")),
        Err(e) => return Err(format!("--config {shown}: {e}")),
    };
    let serve = cli
        .find_subcommand("serve")
        .expect("the serve command")
        .clone();
    let mut added = Vec::new();
    for (key, value) in settings {
        let Some(key) = key.as_str() else {
            return Err(format!("--config {shown}: a key is not a string: {key:?}"));
        };
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(key) && key != "config")
            .ok_or_else(|| format!("--config {shown}: {key:?} is not a setting of tether serve"))?;
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let wrong = |want: &str| format!("--config {shown}: {key}: {want}");
        if !arg.get_action().takes_values() {
            match value {
                serde_norway::Value::Bool(true) => added.push(format!("--{key}").into()),
                serde_norway::Value::Bool(false) => {}
                _ => return Err(wrong("true or false")),
            }
            continue;
        }
        let many = matches!(arg.get_action(), clap::ArgAction::Append);
        let values = match value {
            serde_norway::Value::Sequence(items) if many => items,
            serde_norway::Value::Sequence(_) => return Err(wrong("one value, not a list")),
            one => vec![one],
        };
        for v in values {
            let v = match v {
                serde_norway::Value::String(s) => s,
                serde_norway::Value::Number(n) => n.to_string(),
                serde_norway::Value::Bool(b) => b.to_string(),
                _ => return Err(wrong("a string, number or true/false")),
            };
            added.push(format!("--{key}={v}").into());
        }
    }
    let mut args = args;
    args.extend(added);
    Ok(args)
}

/// Settings of `tether serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// A YAML file of settings: each key a flag's long name without the
    /// dashes (`probe-interval: 45s`), a list for a repeatable flag, true for
    /// a switch. Flags and TETHER_* variables take precedence over it. Read
    /// at start only (SIGHUP does not re-read it).
    #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to serve gRPC on: IP:PORT or HOST:PORT (port 0 picks a free
    /// port; a host name is resolved once, at start, preferring IPv4).
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:50051", value_parser = listen_addr)]
    pub listen: SocketAddr,

    /// Address of the admin HTTP listener (Prometheus /metrics, /healthz,
    /// /readyz): IP:PORT or HOST:PORT, as --listen. Off unless given. It has
    /// no authentication and serves no secret: bind it where only the
    /// scraper reaches it.
    #[arg(long, env = "TETHER_ADMIN_LISTEN", value_name = "ADDR", value_parser = listen_addr)]
    pub admin_listen: Option<SocketAddr>,

    /// PEM certificate chain to serve TLS with (leaf first); needs --tls-key.
    /// Reloaded when the file changes or on SIGHUP.
    #[arg(
        long,
        env = "TETHER_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "TETHER_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates to verify client certificates against (needs TLS).
    /// A certificate a client presents is always verified.
    #[arg(long, env = "TETHER_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// Refuse clients without a certificate; without this flag they may
    /// connect and authenticate with a token instead.
    #[arg(long, env = "TETHER_TLS_REQUIRE_CLIENT_CERT")]
    pub tls_require_client_cert: bool,

    /// How often the TLS files and the access file are checked for change
    /// (SIGHUP reloads them at once).
    #[arg(long, env = "TETHER_RELOAD_INTERVAL", default_value = "10s", value_parser = duration)]
    pub reload_interval: Duration,

    /// Access file: bearer tokens (as SHA-256 digests) and client-certificate
    /// principals, with their roles and owner scopes; reloaded on change and
    /// on SIGHUP. Without it, authentication is off and every caller is the
    /// anonymous admin (allowed only on a loopback address, unless --insecure).
    #[arg(long, env = "TETHER_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Serve a non-loopback address without TLS or authentication (logged as a warning).
    #[arg(long, env = "TETHER_INSECURE")]
    pub insecure: bool,

    /// Most client connections open at once; more are closed as soon as accepted.
    #[arg(long, env = "TETHER_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Longest time from accepting a connection to the end of its TLS
    /// handshake (or, without TLS, to its first byte).
    #[arg(long, env = "TETHER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,

    /// Most concurrent HTTP/2 streams (calls) per connection.
    #[arg(long, env = "TETHER_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// How often an HTTP/2 keepalive ping goes to each connection.
    #[arg(long, env = "TETHER_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub keepalive_interval: Duration,

    /// A connection whose peer does not answer a keepalive ping within this is closed.
    #[arg(long, env = "TETHER_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub keepalive_timeout: Duration,

    /// SQLite database file [default: $XDG_DATA_HOME/tether/tether.db,
    /// else ~/.local/share/tether/tether.db], or a postgres:// URL (builds
    /// with the `postgres` feature; several replicas may share it)
    #[arg(long, env = "TETHER_DB")]
    pub db: Option<PathBuf>,

    /// A folder of connection definition files (YAML or JSON) to load besides
    /// the built-in ones; repeatable. A bad file stops the server at start.
    #[arg(
        long = "models",
        value_name = "DIR",
        env = "TETHER_MODELS",
        value_delimiter = ':'
    )]
    pub models: Vec<PathBuf>,

    /// Accept connections whose kind has no definition (generic checks apply).
    #[arg(long, env = "TETHER_ALLOW_UNKNOWN_KINDS")]
    pub allow_unknown_kinds: bool,

    /// File holding the key that encrypts credential secrets (base64 of 32
    /// bytes), created with mode 0600 if missing. TETHER_SECRET_KEY, when set,
    /// is the key itself and takes precedence [default: tether.key beside the database]
    #[arg(long, env = "TETHER_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,

    /// With a postgres:// --db whose URL names no password: the file holding
    /// it (its first line; readable by this user alone), so that it is in
    /// neither the command line nor the environment
    #[arg(long, env = "TETHER_DB_PASSWORD_FILE")]
    pub db_password_file: Option<PathBuf>,

    /// Do not probe connections in the background (verification on request still runs).
    #[arg(long, env = "TETHER_DISABLE_MONITOR")]
    pub disable_monitor: bool,

    /// How often managed connections are probed, for kinds whose definition names no interval.
    #[arg(long, env = "TETHER_PROBE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub probe_interval: Duration,

    /// Failed probes in a row before a CONNECTED connection becomes DISCONNECTED.
    #[arg(long, env = "TETHER_PROBE_FAILURE_THRESHOLD", default_value_t = 3)]
    pub probe_failure_threshold: u32,

    /// Longest a reachability check may take.
    #[arg(long, env = "TETHER_VERIFY_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub verify_timeout: Duration,

    /// Most reachability checks (verifications and probes) running at once.
    #[arg(long, env = "TETHER_VERIFY_CONCURRENCY", default_value_t = 64)]
    pub verify_concurrency: usize,

    /// Only destinations matching one of these rules are contacted by probes
    /// and verifications: a CIDR (`10.0.0.0/8`), an address, a host name or
    /// `*.example.com` (any subdomain). Repeatable or comma-separated
    /// [default: any destination the other rules allow]
    #[arg(
        long = "egress-allow",
        value_name = "RULE",
        env = "TETHER_EGRESS_ALLOW",
        value_delimiter = ','
    )]
    pub egress_allow: Vec<String>,

    /// Destinations never contacted, in the same forms as --egress-allow;
    /// a deny rule wins over any allow rule. Repeatable or comma-separated.
    #[arg(
        long = "egress-deny",
        value_name = "RULE",
        env = "TETHER_EGRESS_DENY",
        value_delimiter = ','
    )]
    pub egress_deny: Vec<String>,

    /// Whether loopback addresses (127.0.0.0/8, ::1) may be contacted.
    #[arg(
        long,
        env = "TETHER_EGRESS_LOOPBACK",
        value_enum,
        default_value = "allow"
    )]
    pub egress_loopback: Access,

    /// Whether private addresses (10/8, 172.16/12, 192.168/16, 100.64/10,
    /// fc00::/7) may be contacted.
    #[arg(
        long,
        env = "TETHER_EGRESS_PRIVATE",
        value_enum,
        default_value = "allow"
    )]
    pub egress_private: Access,

    /// Most first probes of newly discovered connections started per second;
    /// more wait their turn.
    #[arg(long, env = "TETHER_DISCOVERY_PROBE_RATE", default_value_t = 20)]
    pub discovery_probe_rate: u32,

    /// Name resolution for probes; the system resolver when unset. Never set
    /// from flags: in-process tests inject a table here.
    #[arg(skip)]
    pub resolver: Option<InjectedResolver>,

    /// Events older than this are pruned from the history.
    #[arg(long, env = "TETHER_EVENT_RETENTION", default_value = "7days", value_parser = duration)]
    pub event_retention: Duration,

    /// At most this many events are kept in the history.
    #[arg(
        long,
        env = "TETHER_EVENT_RETENTION_COUNT",
        default_value_t = 1_000_000
    )]
    pub event_retention_count: u64,

    /// At most this many request_id answers are kept for retries (the oldest
    /// go first, at each pruning); answers also expire with --event-retention.
    #[arg(long, env = "TETHER_MAX_STORED_ANSWERS", default_value_t = 100_000)]
    pub max_stored_answers: u64,

    /// Most space the database may use (pages in use, not the file's size:
    /// deleting frees space at once). Past it, writes are refused with
    /// STORAGE_QUOTA_EXCEEDED, except deletions, until space is freed or the
    /// quota raised; reads go on. Bytes, or with KiB, MiB, GiB, TiB; 0: no
    /// quota. The default is etcd's largest recommended backend size.
    #[arg(long, env = "TETHER_STORAGE_QUOTA", default_value = "8GiB", value_parser = bytes)]
    pub storage_quota: u64,

    /// How often history older than the retention window is pruned.
    #[arg(long, env = "TETHER_PRUNE_INTERVAL", default_value = "1m", value_parser = duration)]
    pub prune_interval: Duration,

    /// Idle time before a BOOKMARK goes to watchers that asked for progress.
    #[arg(long, env = "TETHER_BOOKMARK_INTERVAL", default_value = "10s", value_parser = duration)]
    pub bookmark_interval: Duration,

    /// Most changes committed in one transaction (one fsync).
    #[arg(long, env = "TETHER_COMMIT_GROUP", default_value_t = 256)]
    pub commit_group: usize,

    /// Committed events kept in memory for live watchers; one that falls
    /// further behind catches up from the database.
    #[arg(long, env = "TETHER_WATCH_RING", default_value_t = 4096)]
    pub watch_ring: usize,

    /// Messages buffered per watch stream.
    #[arg(long, env = "TETHER_WATCH_BUFFER", default_value_t = 256)]
    pub watch_buffer: usize,

    /// Events read from the database per page when a watcher catches up
    /// (and connections per page of a watch's snapshot).
    #[arg(long, env = "TETHER_WATCH_REPLAY_PAGE", default_value_t = 1000)]
    pub watch_replay_page: usize,

    /// Memory all watch streams together may hold buffered (bytes, or with
    /// KiB, MiB, GiB). Each watcher may hold an equal part, at least 64 KiB.
    #[arg(long, env = "TETHER_WATCH_MEMORY", default_value = "64MiB", value_parser = bytes)]
    pub watch_memory: u64,

    /// How long a watcher may take nothing while its buffer is full before it
    /// is ended with WATCH_TOO_SLOW and the revision to resume from.
    #[arg(long, env = "TETHER_WATCH_STALL_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub watch_stall_timeout: Duration,

    /// Longest a watch's snapshot may take to send; it holds a read view of
    /// the database open meanwhile, which keeps the write-ahead log growing.
    #[arg(long, env = "TETHER_WATCH_SNAPSHOT_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub watch_snapshot_timeout: Duration,

    /// Changes waiting for the writer before new ones are refused with UNAVAILABLE.
    #[arg(long, env = "TETHER_WRITE_QUEUE", default_value_t = 10_000)]
    pub write_queue: usize,

    /// Page size when a list request names none.
    #[arg(long, env = "TETHER_DEFAULT_PAGE_SIZE", default_value_t = 50)]
    pub default_page_size: usize,

    /// Largest page a list returns.
    #[arg(long, env = "TETHER_MAX_PAGE_SIZE", default_value_t = 1000)]
    pub max_page_size: usize,

    /// Page size of ListConnectionEvents when the request names none.
    #[arg(long, env = "TETHER_DEFAULT_EVENTS_PAGE_SIZE", default_value_t = 100)]
    pub default_events_page_size: usize,

    /// Most items in one BatchTransitionConnections call.
    #[arg(long, env = "TETHER_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Most connections in one ReportDiscovered call.
    #[arg(long, env = "TETHER_MAX_DISCOVERY_REPORT", default_value_t = 10_000)]
    pub max_discovery_report: usize,

    /// Read connections kept open.
    #[arg(long, env = "TETHER_READ_POOL", default_value_t = 8)]
    pub read_pool: usize,

    /// How long a database operation waits for a lock before answering UNAVAILABLE.
    #[arg(long, env = "TETHER_BUSY_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub busy_timeout: Duration,

    /// After a shutdown signal, how long open calls may take to finish.
    #[arg(long, env = "TETHER_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Calls per second each principal may make (bursts of as many); 0: no limit.
    #[arg(long, env = "TETHER_RATE_LIMIT", default_value_t = 1000)]
    pub rate_limit: u32,

    /// Watch streams each principal may hold open at once.
    #[arg(long, env = "TETHER_MAX_WATCHES", default_value_t = 100)]
    pub max_watches: usize,
}

impl Default for Config {
    /// The same defaults as the flags, without reading the environment.
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        // Parse no arguments with the environment switched off: only the
        // declared defaults apply, so tests are not steered by a stray TETHER_*.
        let mut cmd = Config::augment_args(clap::Command::new("tether"))
            .mut_args(|a| a.env(None::<&'static str>));
        let matches = cmd
            .try_get_matches_from_mut(["tether"])
            .expect("defaults parse");
        let mut c = Config::from_arg_matches(&matches).expect("defaults are valid");
        c.db = None;
        c
    }
}

impl Config {
    /// Refuses settings that would make the server spin, flood or overflow.
    pub fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("verify-timeout", self.verify_timeout),
            ("prune-interval", self.prune_interval),
            ("bookmark-interval", self.bookmark_interval),
            ("event-retention", self.event_retention),
            ("probe-interval", self.probe_interval),
            ("reload-interval", self.reload_interval),
            ("handshake-timeout", self.handshake_timeout),
            ("keepalive-interval", self.keepalive_interval),
            ("keepalive-timeout", self.keepalive_timeout),
            ("watch-stall-timeout", self.watch_stall_timeout),
            ("watch-snapshot-timeout", self.watch_snapshot_timeout),
        ];
        for (flag, d) in positive {
            if d.is_zero() {
                return Err(Error::invalid(flag, "must be greater than zero"));
            }
        }
        // Microseconds since the epoch must stay representable.
        if self.event_retention > Duration::from_secs(100 * 365 * 24 * 3600) {
            return Err(Error::invalid("event-retention", "must be under 100 years"));
        }
        let counts = [
            ("verify-concurrency", self.verify_concurrency),
            ("commit-group", self.commit_group),
            ("watch-ring", self.watch_ring),
            ("watch-buffer", self.watch_buffer),
            ("watch-replay-page", self.watch_replay_page),
            ("write-queue", self.write_queue),
            ("default-page-size", self.default_page_size),
            ("max-page-size", self.max_page_size),
            ("default-events-page-size", self.default_events_page_size),
            ("max-batch", self.max_batch),
            ("max-discovery-report", self.max_discovery_report),
            ("read-pool", self.read_pool),
            ("max-watches", self.max_watches),
            ("max-connections", self.max_connections),
            (
                "max-concurrent-streams",
                self.max_concurrent_streams as usize,
            ),
        ];
        for (flag, n) in counts {
            if n == 0 {
                return Err(Error::invalid(flag, "must be at least 1"));
            }
        }
        if self.discovery_probe_rate == 0 {
            return Err(Error::invalid("discovery-probe-rate", "must be at least 1"));
        }
        self.egress_policy()?;
        if self.probe_failure_threshold == 0 {
            return Err(Error::invalid(
                "probe-failure-threshold",
                "must be at least 1",
            ));
        }
        if self.event_retention_count == 0 {
            return Err(Error::invalid(
                "event-retention-count",
                "must be at least 1",
            ));
        }
        if self.watch_memory == 0 {
            return Err(Error::invalid("watch-memory", "must be greater than zero"));
        }
        if self.storage_quota != 0 && self.storage_quota < MIN_STORAGE_QUOTA {
            return Err(Error::invalid(
                "storage-quota",
                "must be 0 (no quota) or at least 1MiB: an empty database alone takes about 100KiB",
            ));
        }
        self.validate_transport()
    }

    fn validate_transport(&self) -> Result<(), Error> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err(Error::invalid("tls-key", "--tls-cert needs --tls-key")),
            (None, Some(_)) => {
                return Err(Error::invalid("tls-cert", "--tls-key needs --tls-cert"));
            }
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(Error::invalid(
                "tls-client-ca",
                "client certificates need TLS: set --tls-cert and --tls-key",
            ));
        }
        if self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(Error::invalid(
                "max-connections",
                format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS),
            ));
        }
        if self.tls_require_client_cert && self.tls_client_ca.is_none() {
            return Err(Error::invalid(
                "tls-require-client-cert",
                "needs --tls-client-ca to verify the certificates against",
            ));
        }
        let missing = self.unprotected();
        if !missing.is_empty() && !self.insecure {
            return Err(Error::invalid(
                "listen",
                format!(
                    "{} is not a loopback address and {} missing, so anyone who can reach \
                     the port could act as admin; set {}, or pass --insecure to serve it anyway",
                    self.listen,
                    if missing.len() == 1 {
                        "this is"
                    } else {
                        "these are"
                    },
                    missing.join(" and "),
                ),
            ));
        }
        Ok(())
    }

    /// What protects a non-loopback listener and is not configured: TLS
    /// (`--tls-cert`/`--tls-key`) and authentication (`--auth-file`). Empty on
    /// a loopback address, or when both are set.
    pub fn unprotected(&self) -> Vec<&'static str> {
        if self.listen.ip().to_canonical().is_loopback() {
            return Vec::new();
        }
        let mut missing = Vec::new();
        if self.tls_cert.is_none() {
            missing.push("TLS (--tls-cert, --tls-key)");
        }
        if self.auth_file.is_none() {
            missing.push("authentication (--auth-file)");
        }
        missing
    }

    /// The TLS files, if the server serves TLS.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
            require_client_cert: self.tls_require_client_cert,
        })
    }

    pub fn transport_config(&self) -> TransportConfig {
        TransportConfig {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
        }
    }

    /// The database file: `--db`, or the per-user data directory.
    pub fn db_path(&self) -> PathBuf {
        db_path(self.db.as_deref())
    }

    /// The PostgreSQL database `--db` names, when it is a `postgres://` or
    /// `postgresql://` URL rather than a file.
    pub fn postgres_url(&self) -> Option<&str> {
        postgres_url(self.db.as_deref())
    }

    /// The secret key file: `--secret-key-file`, or `tether.key` beside the database.
    pub fn secret_key_path(&self) -> PathBuf {
        key_path(self.secret_key_file.as_deref(), &self.db_path())
    }

    pub(crate) fn monitor_config(&self) -> MonitorConfig {
        MonitorConfig {
            interval: self.probe_interval,
            failure_threshold: self.probe_failure_threshold,
            concurrency: self.verify_concurrency,
            discovery_rate: self.discovery_probe_rate,
        }
    }

    /// The egress flags as a policy; `Err` names the rule that cannot be read.
    pub fn egress_policy(&self) -> Result<EgressPolicy, Error> {
        let (loopback, private) = (self.egress_loopback, self.egress_private);
        EgressPolicy::new(&self.egress_allow, &[], loopback, private)
            .map_err(|why| Error::invalid("egress-allow", why))?;
        EgressPolicy::new(&self.egress_allow, &self.egress_deny, loopback, private)
            .map_err(|why| Error::invalid("egress-deny", why))
    }

    /// The resolver probes use: the injected one, else the system's.
    pub fn probe_resolver(&self) -> Arc<dyn Resolve> {
        match &self.resolver {
            Some(r) => r.0.clone(),
            None => Arc::new(SystemResolver),
        }
    }

    pub(crate) fn store_config(&self) -> StoreConfig {
        StoreConfig {
            writer: WriterConfig {
                max_group: self.commit_group,
                retention: self.event_retention,
                retention_count: self.event_retention_count,
                prune_interval: self.prune_interval,
                max_answers: self.max_stored_answers,
                storage_quota: self.storage_quota,
            },
            write_queue: self.write_queue,
            read_pool: self.read_pool,
            publish_buffer: self.watch_ring,
            busy_timeout: self.busy_timeout,
        }
    }

    pub(crate) fn watch_config(&self) -> WatchConfig {
        WatchConfig {
            bookmark_interval: self.bookmark_interval,
            replay_page: self.watch_replay_page,
            buffer: self.watch_buffer,
            memory: usize::try_from(self.watch_memory).unwrap_or(usize::MAX),
            stall_timeout: self.watch_stall_timeout,
            snapshot_timeout: self.watch_snapshot_timeout,
        }
    }

    pub fn api_limits(&self) -> ApiLimits {
        ApiLimits {
            default_page_size: self.default_page_size.min(self.max_page_size),
            max_page_size: self.max_page_size,
            default_events_page_size: self.default_events_page_size.min(self.max_page_size),
            max_batch: self.max_batch,
            max_discovery_report: self.max_discovery_report,
            max_watches: self.max_watches,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_bytes_or_binary_units() {
        for (text, want) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("512B", 512),
            ("64KiB", 64 << 10),
            ("512MiB", 512 << 20),
            ("512 MiB", 512 << 20),
            ("8GiB", 8 << 30),
            ("8gib", 8 << 30),
            ("2TiB", 2 << 40),
        ] {
            assert_eq!(bytes(text), Ok(want), "{text}");
        }
        for (text, says) in [
            ("", "not a size"),
            ("MiB", "not a size"),
            ("-1", "not a size"),
            ("1.5GiB", "unknown unit"),
            ("8GB", "power of 1000"),
            ("8M", "power of 1000"),
            ("8 parsecs", "unknown unit"),
            ("99999999999TiB", "too large"),
            ("18446744073709551616", "too large"),
        ] {
            let e = bytes(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn listen_takes_an_address_or_a_host_name() {
        assert_eq!(
            listen_addr("127.0.0.1:50051"),
            Ok("127.0.0.1:50051".parse().unwrap())
        );
        assert_eq!(listen_addr("[::1]:0"), Ok("[::1]:0".parse().unwrap()));
        let local = listen_addr("localhost:50051").expect("localhost resolves");
        assert!(local.ip().is_loopback() && local.port() == 50051, "{local}");
        for (text, says) in [
            ("localhost", "no port"),
            ("127.0.0.1", "no port"),
            ("localhost:http2", "cannot resolve"),
        ] {
            let e = listen_addr(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn the_storage_quota_defaults_to_8_gib_and_refuses_a_tiny_one() {
        let mut c = Config::default();
        assert_eq!(c.storage_quota, 8 << 30);
        assert_eq!(c.store_config().writer.storage_quota, 8 << 30);
        c.storage_quota = 0;
        c.validate().expect("0 is no quota");
        c.storage_quota = 4096;
        let e = c.validate().expect_err("below 1MiB");
        assert!(
            matches!(&e, Error::InvalidArgument { field, .. } if field == "storage-quota"),
            "{e:?}"
        );
        c.storage_quota = MIN_STORAGE_QUOTA;
        c.validate().expect("1MiB is enough");
    }
}
