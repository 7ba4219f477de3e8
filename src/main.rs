//! The `tether` binary: flags and environment to [`Config`], logging, the
//! listening socket, and a run until SIGINT or SIGTERM; the client commands
//! (`tether::cli`), `token`, `backup` and shell completion. Nothing else.

use clap::{Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use tether::Config;

/// Every change is allocated on one thread and freed on others (the writer,
/// the handlers, each watch task); glibc's allocator serialises that on its
/// arena locks, mimalloc frees to the owning thread without them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Tracks the lifecycle of platform connections over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines on stderr look: text for people, json (one object per
    /// line, its fields at the top level) for log collectors.
    #[arg(long, global = true, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr at `RUST_LOG` (default `info`), in the chosen format.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API: tether.v1.ConnectionService, CredentialService and
    /// DefinitionService, with grpc.health.v1 and server reflection.
    Serve(Box<Config>),
    /// Make a new bearer token and print it with the access-file entry that
    /// admits it (only the token's SHA-256 goes into the file).
    Token(TokenArgs),
    /// Copy a live database consistently to a new file, while it serves.
    Backup(tether::backup::BackupArgs),
    #[command(flatten)]
    Client(Box<tether::cli::Command>),
    /// Print a completion script for a shell: `source <(tether completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
struct TokenArgs {
    /// Who the token authenticates as.
    #[arg(long)]
    principal: String,
    /// A role to grant: viewer, operator, discovery, credential-admin or admin; repeatable.
    #[arg(long = "role", required = true)]
    roles: Vec<String>,
    /// Another owner whose objects the principal may see ("*": every owner); repeatable.
    #[arg(long = "owner")]
    owners: Vec<String>,
}

/// Runs `tether backup`; one line on stdout when done.
fn backup(args: tether::backup::BackupArgs) -> ExitCode {
    match tether::backup::run(&args) {
        Ok(done) => {
            println!(
                "backed up revision {} ({} connections) to {}",
                done.revision,
                done.connections,
                args.out.display()
            );
            if args.key_out.is_none() {
                eprintln!(
                    "the secret key is not in the backup: keep the key file (or TETHER_SECRET_KEY) \
                     with it, in another place; without the key its secrets cannot be read"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a fresh token and its access-file entry.
///
/// Tokens are random 256-bit strings, and the file keeps only their SHA-256:
/// a leaked access file admits no one, and a token is revoked by deleting its
/// line (the server reloads the file on change or SIGHUP). Signed tokens
/// (JWTs) would need key management and could not be revoked before expiry;
/// for a service with a handful of platform clients, a reloadable list wins.
fn make_token(args: TokenArgs) -> ExitCode {
    if let Err(e) = tether::access::check_principal_name(&args.principal) {
        eprintln!("error: --principal: {e}");
        return ExitCode::FAILURE;
    }
    let known = tether::access::Role::ALL.map(|r| r.name());
    if let Some(bad) = args.roles.iter().find(|r| !known.contains(&r.as_str())) {
        eprintln!("error: --role {bad:?}: use one of {}", known.join(", "));
        return ExitCode::FAILURE;
    }
    let token = tether::access::new_token();
    let quote = |v: &[String]| {
        v.iter()
            .map(|s| serde_json::to_string(s).expect("strings serialise"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Line 1 the token, line 2 the entry: easy to take apart in a script.
    eprintln!(
        "the token for {} (give it to the client; it is stored nowhere), then its entry for `tokens:` in the access file:",
        args.principal
    );
    println!("{token}");
    println!(
        "  - {{principal: {}, sha256: {}, roles: [{}]{}}}",
        serde_json::to_string(&args.principal).expect("strings serialise"),
        tether::access::token_digest(&token),
        quote(&args.roles),
        if args.owners.is_empty() {
            String::new()
        } else {
            format!(", owners: [{}]", quote(&args.owners))
        }
    );
    ExitCode::SUCCESS
}

#[tokio::main]
async fn main() -> ExitCode {
    use clap::CommandFactory;
    let args = match tether::config::with_config_file(Cli::command(), std::env::args_os().collect())
    {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    let config = match cli.command {
        Command::Serve(config) => *config,
        Command::Token(args) => return make_token(args),
        Command::Backup(args) => return backup(args),
        Command::Client(command) => return tether::cli::run(*command).await,
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tether", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
    };
    // Signal handlers first: a SIGTERM from here on is a graceful shutdown,
    // never the default "terminate at once".
    let signal = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    // The port first: a server that cannot listen creates no database, key
    // or anything else.
    let listen = config.listen;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    // The admin port too, when asked for: same rule.
    let admin = match config.admin_listen {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(admin_listen = %addr, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        },
    };
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let mut server = match tether::server::Server::open(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    if let Some(admin) = admin {
        server = server.with_admin(admin);
    }
    if let Ok(addr) = listener.local_addr() {
        // One line on stdout, once the database is open and the port bound,
        // for scripts and tests that start us on port 0.
        println!("tether listening on {addr}");
        // And a second for the admin port. A reader that took only the
        // first line may have closed the pipe: that is no failure.
        if let Some(admin) = admin_addr {
            let _ = writeln!(std::io::stdout(), "tether admin listening on {admin}");
        }
        let _ = std::io::stdout().flush();
    }
    match server.serve(listener, signal.recv()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tether failed");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT and SIGTERM, registered as soon as this is built.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Completes on the first SIGINT or SIGTERM.
    async fn recv(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
