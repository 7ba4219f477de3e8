//! The end-to-end benchmark: this file owns measuring Tether through its real
//! gRPC surface; `docs/BENCHMARKS.md` owns the figures it produced.
//!
//! Starts the real server (`tether::server::run`) in-process on 127.0.0.1:0,
//! on its own tokio runtime, over a fresh SQLite file in a temp dir (or
//! `--db PATH`), and drives it with real tonic clients over loopback TCP:
//! watch fan-out checked revision by revision, list paging latency, the
//! process RSS, and create and transition throughput at several client
//! concurrencies. Two baselines that bypass Tether (fdatasync and raw SQLite
//! commits) run first on the same filesystem. Each throughput row also says
//! where the CPU went (server runtime, writer thread, clients, other
//! processes) and how many flushes the disk saw, so the figures can be read.
//!
//! Every scenario is bounded in count and in time; the default run takes well
//! under a minute. `cargo run --release --example bench -- --help` lists the knobs.

use clap::Parser;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tether::pb::tether::v1 as pb;
use tether::pb::tether::v1::connection_service_client::ConnectionServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

type Client = ConnectionServiceClient<Channel>;

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// End-to-end benchmark of the Tether gRPC service.
#[derive(Parser, Debug)]
#[command(name = "bench")]
struct Args {
    /// SQLite file for the server (default: a fresh file in a temp dir).
    /// An existing file is reused as it is; the baselines run next to it.
    #[arg(long)]
    db: Option<PathBuf>,

    /// Client concurrencies for the create and transition scenarios.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,

    /// Most creates per concurrency level.
    #[arg(long, default_value_t = 10_000)]
    creates: usize,

    /// Most transitions per concurrency level.
    #[arg(long, default_value_t = 10_000)]
    transitions: usize,

    /// Connections each transition client cycles through.
    #[arg(long, default_value_t = 4)]
    transition_pool: usize,

    /// Longest any one throughput step (one concurrency level) may run.
    #[arg(long, default_value = "8s", value_parser = duration)]
    step_time: Duration,

    /// Watcher counts for the fan-out scenario.
    #[arg(long, value_delimiter = ',', default_value = "100,500")]
    watchers: Vec<usize>,

    /// Changes written while the fan-out watchers are open.
    #[arg(long, default_value_t = 500)]
    changes: usize,

    /// Concurrent clients writing the fan-out changes.
    #[arg(long, default_value_t = 16)]
    change_writers: usize,

    /// HTTP/2 connections the watchers are spread over.
    #[arg(long, default_value_t = 8)]
    watch_channels: usize,

    /// Longest a fan-out round may take before it is reported incomplete.
    #[arg(long, default_value = "60s", value_parser = duration)]
    watch_timeout: Duration,

    /// Live connections loaded before the list and memory scenarios.
    #[arg(long, default_value_t = 10_000)]
    dataset: usize,

    /// Page sizes for the list scenario.
    #[arg(long, value_delimiter = ',', default_value = "50,1000")]
    page_sizes: Vec<usize>,

    /// Most list requests per page size (full walks over the dataset).
    #[arg(long, default_value_t = 400)]
    list_requests: usize,

    /// Watchers held open for the memory reading.
    #[arg(long, default_value_t = 500)]
    memory_watchers: usize,

    /// Create the connections of the create, transition and dataset steps as
    /// managed (the API's default). The server's monitor then probes each new
    /// DISCOVERED one within about a second and, as it has no url and so
    /// nothing to check, moves it to REGISTERED itself: a second write per
    /// create, made after the call has returned. Off by default so that every
    /// measured write is the client's own; fan-out connections are never managed.
    #[arg(long)]
    managed: bool,

    /// Server: most changes per commit group (`--commit-group` of `tether serve`).
    #[arg(long)]
    commit_group: Option<usize>,

    /// Server: read connections kept open (`--read-pool` of `tether serve`).
    #[arg(long)]
    read_pool: Option<usize>,

    /// Scenarios to run, always in this order: baseline, fanout, list,
    /// snapshot, memory, create, transition. The dataset is loaded before
    /// list, snapshot and memory when any of them runs.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,fanout,list,snapshot,memory,create,transition"
    )]
    only: Vec<String>,
}

impl Args {
    fn runs(&self, scenario: &str) -> bool {
        self.only.iter().any(|s| s == scenario)
    }
}

fn main() {
    let args = Args::parse();
    let (_tmp, dir, db) = match &args.db {
        Some(p) => {
            let parent = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).expect("create the --db directory");
            let t = tempfile::tempdir_in(parent).expect("temp dir next to --db");
            let dir = t.path().to_owned();
            (t, dir, p.clone())
        }
        None => {
            let t = tempfile::tempdir().expect("temp dir");
            let dir = t.path().to_owned();
            let db = dir.join("tether.db");
            (t, dir, db)
        }
    };

    println!("# Tether end-to-end benchmark\n");
    print_machine(&db);
    let mut failed = false;

    if args.runs("baseline") {
        println!("\n## Baselines on the same filesystem (no Tether, no gRPC)\n");
        println!("| baseline | ops | time | ops/s | p50 | p99 |");
        println!("|---|---:|---:|---:|---:|---:|");
        fsync_probe(&dir.join("fsync.probe"));
        sqlite_baseline(&dir.join("baseline.db"));
    }

    // The server gets its own runtime (and so its own, named threads), as it
    // would in its own process: its CPU time is then told apart from the
    // clients'. Both runtimes default to one worker per core.
    let rss_start = mem_now();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(SERVER_THREADS)
        .build()
        .expect("server runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(CLIENT_THREADS)
        .build()
        .expect("client runtime");
    let mut config = tether::Config {
        db: Some(db.clone()),
        // The bench's kinds ("bench", one per fan-out round) have no definition.
        allow_unknown_kinds: true,
        // One anonymous client drives every load: no per-principal limits.
        rate_limit: 0,
        max_watches: usize::MAX,
        ..tether::Config::default()
    };
    if let Some(g) = args.commit_group {
        config.commit_group = g;
    }
    if let Some(r) = args.read_pool {
        config.read_pool = r;
    }
    println!(
        "\nserver config: defaults, with allow_unknown_kinds; commit_group={} read_pool={} write_queue={} \
         watch_ring={} watch_buffer={} monitor={} (probe_interval {:?}); WAL, synchronous=FULL",
        config.commit_group,
        config.read_pool,
        config.write_queue,
        config.watch_ring,
        config.watch_buffer,
        if config.disable_monitor { "off" } else { "on" },
        config.probe_interval,
    );
    println!(
        "bench connections: {}",
        if args.managed {
            "managed (the monitor registers each new one itself: a second write per create)"
        } else {
            "managed=false (the monitor leaves them alone; fan-out ones always)"
        }
    );
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = server_rt.spawn(tether::server::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let server = Server {
        addr,
        stop,
        handle,
        rss_start,
        disk: device_of(db.parent().unwrap_or(Path::new("/"))),
        db,
    };
    failed |= client_rt.block_on(run(&args, server));
    drop(client_rt);
    drop(server_rt);
    println!("\nload average at the end: {}", loadavg());
    if failed {
        eprintln!("bench: some checks FAILED (see above)");
        std::process::exit(1);
    }
}

// ---- the scenarios through gRPC ----

/// Thread names of the two runtimes, as /proc/self/task/*/comm shows them.
const SERVER_THREADS: &str = "tether-server";
const CLIENT_THREADS: &str = "bench-client";
/// The thread `tether::store` names its writer.
const WRITER_THREAD: &str = "tether-writer";

/// The server running on its own runtime.
struct Server {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), tether::Error>>,
    rss_start: Mem,
    /// The block device under the database, for flush counts.
    disk: String,
    db: PathBuf,
}

async fn run(args: &Args, server: Server) -> bool {
    let mut failed = false;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let Server {
        addr,
        stop,
        handle: server,
        rss_start,
        disk,
        db,
    } = server;

    let max_c = args
        .concurrency
        .iter()
        .copied()
        .chain([args.change_writers, 1])
        .max()
        .unwrap_or(1);
    let mut clients = Vec::with_capacity(max_c);
    for _ in 0..max_c {
        clients.push(connect(addr).await);
    }
    let mut watch_clients = Vec::new();
    for _ in 0..args.watch_channels.max(1) {
        watch_clients.push(connect(addr).await);
    }
    let rss_idle = mem_now();

    if args.runs("fanout") {
        // First, while the store is nearly empty.
        println!("\n## Watch fan-out (WatchConnections after_revision=0, one kind per round)\n");
        println!(
            "| watchers | changes | open+SYNCED | writes acked | all delivered | deliveries/s | delivery p50 | delivery p99 | cores: server + writer / client / other | check |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for &w in args.watchers.iter().filter(|w| **w > 0) {
            failed |= !fanout(args, &clients, &watch_clients, &run_id, w).await;
        }
    }

    let needs_dataset = ["list", "snapshot", "memory"].iter().any(|s| args.runs(s));
    let mut live = count(&clients[0]).await as usize;
    let mut rss_loaded = mem_now();
    if needs_dataset {
        let load_start = Instant::now();
        if live < args.dataset {
            create_many(
                &clients,
                clients.len().min(64),
                args.dataset - live,
                &format!("bench:{run_id}:load"),
                None,
                args.managed,
            )
            .await;
        }
        if args.managed {
            settle(&clients[0]).await;
        }
        live = count(&clients[0]).await as usize;
        println!(
            "\nloaded: {live} live connections (top-up took {}), store revision {}, {}",
            secs(load_start.elapsed()),
            revision(&clients[0]).await,
            db_size(&db)
        );
        rss_loaded = mem_now();
    }

    if args.runs("list") {
        println!("\n## ListConnections (order create_time, full walks over {live} connections)\n");
        println!(
            "| page size | requests | rows | time | requests/s | rows/s | p50 | p99 | cores: server + writer / client / other | check |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for &p in &args.page_sizes {
            failed |= !list_walks(&clients[0], p, args.list_requests, args.step_time, live).await;
        }
    }

    if args.runs("snapshot") {
        println!("\n## Watch snapshot (one WatchConnections after_revision=0, no filter)\n");
        println!("| connections in snapshot | time to SYNCED | messages/s |");
        println!("|---:|---:|---:|");
        failed |= !snapshot_watch(&clients[0], live).await;
    }

    if args.runs("memory") {
        println!("\n## Memory (VmRSS of the whole process: server and bench clients)\n");
        let (held, open_time) = hold_watchers(&watch_clients, args.memory_watchers).await;
        let rss_watchers = mem_now();
        let one = one_change_to_all(&clients[0], held, &run_id, args.watch_timeout).await;
        println!("| moment | VmRSS | threads |");
        println!("|---|---:|---:|");
        println!("| process start (before the server) | {rss_start} |");
        println!("| server idle, clients connected | {rss_idle} |");
        println!("| {live} connections loaded | {rss_loaded} |");
        println!(
            "| + {} watchers open (after_revision=current) | {rss_watchers} |",
            args.memory_watchers,
        );
        println!("| peak so far (VmHWM) | {} | |", mib(status_kib("VmHWM:")));
        println!(
            "\nopening {} idle watchers took {}; one more change reached all of them in {}",
            args.memory_watchers,
            secs(open_time),
            match one {
                Some(d) => ms(d),
                None => {
                    failed = true;
                    "— (FAILED: not every watcher got it)".into()
                }
            }
        );
    }

    if args.runs("create") {
        println!(
            "\n## Create throughput (CreateConnection, skip_verification, unique identity, no url)\n"
        );
        println!(
            "| clients | ops | errors | time | ops/s | mean | p50 | p99 | cores: server + writer / client / other | writer waiting for a CPU | disk flushes | changes/flush | revisions |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for &c in &args.concurrency {
            if args.managed {
                settle(&clients[0]).await;
            }
            let before = revision(&clients[0]).await;
            let usage = Usage::now(&disk);
            let managed = args.managed;
            let load = drive(c, args.creates, args.step_time, |w| {
                let client = clients[w].clone();
                let run_id = run_id.clone();
                move |i| {
                    let mut client = client.clone();
                    let req =
                        create_request("bench", &format!("bench:{run_id}:c{c}:{i}"), None, managed);
                    async move {
                        client
                            .create_connection(req)
                            .await
                            .map(|r| r.into_inner().revision)
                    }
                }
            })
            .await;
            let used = usage.since(&disk);
            let after = revision(&clients[0]).await;
            failed |= !throughput_row(c, &load, &used, after - before, args.managed);
        }
    }

    if args.runs("transition") {
        println!(
            "\n## Transition throughput (TransitionConnection IGNORED <-> REGISTERED, skip_verification, no url)\n"
        );
        println!(
            "| clients | ops | errors | time | ops/s | mean | p50 | p99 | cores: server + writer / client / other | writer waiting for a CPU | disk flushes | changes/flush | revisions |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for &c in &args.concurrency {
            // Each client cycles its own connections, so no two clients race on one.
            let pool = args.transition_pool.max(1);
            let ids = create_many(
                &clients,
                c.min(clients.len()).max(1),
                c * pool,
                &format!("bench:{run_id}:t{c}"),
                Some(pb::ConnectionState::Ignored),
                args.managed,
            )
            .await;
            let ids: Vec<Arc<Vec<String>>> =
                ids.chunks(pool).map(|ch| Arc::new(ch.to_vec())).collect();
            if args.managed {
                settle(&clients[0]).await;
            }
            let before = revision(&clients[0]).await;
            let usage = Usage::now(&disk);
            let load = drive(c, args.transitions, args.step_time, |w| {
                let client = clients[w].clone();
                let mine = ids[w].clone();
                let mut j = 0usize;
                move |_| {
                    let mut client = client.clone();
                    let id = mine[j % mine.len()].clone();
                    let target = if (j / mine.len()).is_multiple_of(2) {
                        pb::ConnectionState::Registered
                    } else {
                        pb::ConnectionState::Ignored
                    };
                    j += 1;
                    async move {
                        let c = client
                            .transition_connection(pb::TransitionConnectionRequest {
                                id,
                                target_state: target as i32,
                                reason: "bench".into(),
                                skip_verification: true,
                                ..Default::default()
                            })
                            .await?
                            .into_inner();
                        if c.state != target as i32 {
                            return Err(tonic::Status::internal(format!(
                                "asked for {target:?}, got state {}",
                                c.state
                            )));
                        }
                        Ok(c.revision)
                    }
                }
            })
            .await;
            let used = usage.since(&disk);
            let after = revision(&clients[0]).await;
            failed |= !throughput_row(c, &load, &used, after - before, args.managed);
        }
    }

    let end = mem_now();
    println!(
        "\nat the end: {} live connections, {}; VmRSS {}, peak VmRSS {}; {} threads ({})",
        count(&clients[0]).await,
        db_size(&db),
        mib(end.rss_kib),
        mib(status_kib("VmHWM:")),
        end.threads,
        threads_by_name()
    );
    let t = Instant::now();
    let _ = stop.send(());
    match tokio::time::timeout(Duration::from_secs(30), server).await {
        Ok(Ok(Ok(()))) => println!("\nserver stopped cleanly in {}", secs(t.elapsed())),
        other => {
            failed = true;
            println!("\nserver did not stop cleanly: {other:?}");
        }
    }
    failed
}

/// One row of a create or transition table; whether its checks passed.
fn throughput_row(c: usize, load: &Load, used: &Used, revisions: i64, managed: bool) -> bool {
    // Every call is awaited, so each answered change is exactly one revision;
    // with managed connections the monitor adds its own.
    let ours = revisions as usize == load.ok || (managed && revisions as usize >= load.ok);
    let ok = ours && load.errors == 0;
    println!(
        "| {c} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | +{revisions}{} {} |",
        load.ok,
        load.errors,
        secs(load.wall),
        load.rate(),
        ms(load.mean()),
        ms(load.pct(0.50)),
        ms(load.pct(0.99)),
        used.split(),
        used.writer_runq(),
        used.flushes.map_or("?".into(), |f| f.to_string()),
        used.flushes
            .filter(|f| *f > 0)
            .map_or("?".into(), |f| format!("{:.1}", load.ok as f64 / f as f64)),
        match revisions - load.ok as i64 {
            n if n > 0 => format!(" ({n} by the server)"),
            _ => String::new(),
        },
        if ok { "ok" } else { "MISMATCH" }
    );
    load.report_error();
    ok
}

async fn connect(addr: SocketAddr) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    // Page of 1000 full connections is well under this, but leave room.
    ConnectionServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

fn create_request(
    kind: &str,
    identity: &str,
    state: Option<pb::ConnectionState>,
    managed: bool,
) -> pb::CreateConnectionRequest {
    pb::CreateConnectionRequest {
        connection: Some(pb::Connection {
            kind: kind.into(),
            r#type: "platform".into(),
            sub_type: "orchestration".into(),
            name: identity.into(),
            identity: identity.into(),
            labels: [("env".to_owned(), "bench".to_owned())].into(),
            managed: Some(managed),
            ..Default::default()
        }),
        initial_state: state.unwrap_or(pb::ConnectionState::Discovered) as i32,
        skip_verification: true,
        ..Default::default()
    }
}

/// Creates `n` connections with `c` clients; their ids.
async fn create_many(
    clients: &[Client],
    c: usize,
    n: usize,
    prefix: &str,
    state: Option<pb::ConnectionState>,
    managed: bool,
) -> Vec<String> {
    let ids = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let load = drive(c, n, Duration::from_secs(600), |w| {
        let client = clients[w % clients.len()].clone();
        let prefix = prefix.to_owned();
        let ids = ids.clone();
        move |i| {
            let mut client = client.clone();
            let req = create_request("bench", &format!("{prefix}:{i}"), state, managed);
            let ids = ids.clone();
            async move {
                let c = client.create_connection(req).await?.into_inner();
                ids.lock().expect("ids").push(c.id);
                Ok(c.revision)
            }
        }
    })
    .await;
    assert_eq!(
        load.errors, 0,
        "setup creates failed: {:?}",
        load.first_error
    );
    ids.lock().expect("ids").clone()
}

/// Waits until the server has stopped changing things on its own (its monitor
/// registers new managed connections within about a second): until the store
/// revision has held still for 1.5 s, at most 60 s.
async fn settle(client: &Client) {
    let start = Instant::now();
    let mut last = revision(client).await;
    let mut still = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = revision(client).await;
        if r != last {
            last = r;
            still = Instant::now();
        } else if still.elapsed() >= Duration::from_millis(1500) {
            return;
        }
    }
}

async fn revision(client: &Client) -> i64 {
    client
        .clone()
        .count_connections(pb::CountConnectionsRequest::default())
        .await
        .expect("count")
        .into_inner()
        .revision
}

async fn count(client: &Client) -> i64 {
    client
        .clone()
        .count_connections(pb::CountConnectionsRequest::default())
        .await
        .expect("count")
        .into_inner()
        .total
}

/// What a bounded load run did.
struct Load {
    wall: Duration,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    /// Latency of each successful call, sorted.
    lat: Vec<Duration>,
    /// When each successful call was issued, and what it returned.
    values: Vec<(Instant, i64)>,
}

impl Load {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64()
    }

    fn mean(&self) -> Duration {
        if self.lat.is_empty() {
            return Duration::ZERO;
        }
        self.lat.iter().sum::<Duration>() / self.lat.len() as u32
    }

    fn pct(&self, p: f64) -> Duration {
        percentile(&self.lat, p)
    }

    fn report_error(&self) {
        if let Some(e) = &self.first_error {
            println!("\n  first error: {e}\n");
        }
    }
}

/// Runs at most `n` calls from `workers` concurrent clients, stopping early at
/// `max`; each worker gets its own call-maker from `make`.
async fn drive<M, F, Fut>(workers: usize, n: usize, max: Duration, mut make: M) -> Load
where
    M: FnMut(usize) -> F,
    F: FnMut(usize) -> Fut + Send + 'static,
    Fut: Future<Output = Result<i64, tonic::Status>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + max;
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers.max(1) {
        let mut op = make(w);
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut errors = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                let r = op(i).await;
                let d = t.elapsed();
                match r {
                    Ok(v) => done.push((t, d, v)),
                    Err(e) => errors.push(format!("{:?}: {}", e.code(), e.message())),
                }
            }
            (done, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut values = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (done, errs) = t.await.expect("worker");
        for (issued, d, v) in done {
            lat.push(d);
            values.push((issued, v));
        }
        errors += errs.len();
        if first_error.is_none() {
            first_error = errs.into_iter().next();
        }
    }
    let wall = start.elapsed();
    lat.sort();
    Load {
        wall,
        ok: lat.len(),
        errors,
        first_error,
        lat,
        values,
    }
}

/// W watchers on a fresh kind, K creates of that kind, every watcher must see
/// exactly those K revisions in order.
async fn fanout(
    args: &Args,
    clients: &[Client],
    watch_clients: &[Client],
    run_id: &str,
    w: usize,
) -> bool {
    let k = args.changes;
    let kind = format!("fanout{w}-{run_id}");
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(w.max(1));
    let opened = Instant::now();
    let mut watchers = Vec::with_capacity(w);
    for i in 0..w {
        let mut client = watch_clients[i % watch_clients.len()].clone();
        let kind = kind.clone();
        let ready = ready_tx.clone();
        watchers.push(tokio::spawn(async move {
            let mut stream = client
                .watch_connections(pb::WatchConnectionsRequest {
                    after_revision: 0,
                    kinds: vec![kind],
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("watch: {e}"))?
                .into_inner();
            let mut got: Vec<(i64, Instant)> = Vec::with_capacity(k);
            let mut synced = false;
            while got.len() < k {
                let m = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err("stream ended".to_owned()),
                    Err(e) => return Err(format!("stream: {e}")),
                };
                let now = Instant::now();
                match pb::WatchEventType::try_from(m.r#type) {
                    Ok(pb::WatchEventType::Synced) => {
                        synced = true;
                        let _ = ready.send(()).await;
                    }
                    Ok(pb::WatchEventType::Bookmark) => {}
                    Ok(_) if m.event.is_some() && synced => got.push((m.revision, now)),
                    other => return Err(format!("unexpected message {other:?} (synced={synced})")),
                }
            }
            Ok(got)
        }));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < w {
        match tokio::time::timeout(args.watch_timeout, ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => break,
        }
    }
    let open_time = opened.elapsed();
    if ready < w {
        println!("| {w} | {k} | only {ready} SYNCED | | | | | | | FAILED |");
        for t in watchers {
            t.abort();
        }
        return false;
    }

    let write_start = Instant::now();
    let usage = Usage::now("");
    let writers = args.change_writers.min(clients.len()).max(1);
    let load = drive(writers, k, args.watch_timeout, |wi| {
        let client = clients[wi].clone();
        let kind = kind.clone();
        move |i| {
            let mut client = client.clone();
            let req = create_request(&kind, &format!("{kind}:{i}"), None, false);
            async move {
                client
                    .create_connection(req)
                    .await
                    .map(|r| r.into_inner().revision)
            }
        }
    })
    .await;
    let acked = write_start.elapsed();
    let issued: HashMap<i64, Instant> = load.values.iter().map(|&(t, r)| (r, t)).collect();
    let mut expected: Vec<i64> = issued.keys().copied().collect();
    expected.sort_unstable();

    let mut delivery = Vec::with_capacity(w * k);
    let mut last = write_start;
    let (mut bad, mut missing, mut repeated, mut out_of_order) = (0usize, 0usize, 0usize, 0usize);
    let mut first_problem = None;
    let deadline = tokio::time::Instant::now() + args.watch_timeout;
    for t in watchers {
        let r = match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("watcher task: {e}")),
            Err(_) => Err("timed out".to_owned()),
        };
        match r {
            Ok(got) => {
                let revs: Vec<i64> = got.iter().map(|(r, _)| *r).collect();
                if revs != expected {
                    bad += 1;
                    let seen: HashSet<i64> = revs.iter().copied().collect();
                    missing += expected.iter().filter(|r| !seen.contains(r)).count();
                    repeated += revs.len() - seen.len();
                    out_of_order += revs.windows(2).filter(|p| p[0] >= p[1]).count();
                }
                for (r, at) in got {
                    last = last.max(at);
                    if let Some(t0) = issued.get(&r) {
                        delivery.push(at.saturating_duration_since(*t0));
                    }
                }
            }
            Err(e) => {
                bad += 1;
                first_problem.get_or_insert(e);
            }
        }
    }
    let used = usage.since("");
    delivery.sort();
    let all = last.saturating_duration_since(write_start);
    let ok = bad == 0 && load.errors == 0 && expected.len() == k;
    println!(
        "| {w} | {k} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
        secs(open_time),
        secs(acked),
        secs(all),
        delivery.len() as f64 / all.as_secs_f64(),
        ms(percentile(&delivery, 0.50)),
        ms(percentile(&delivery, 0.99)),
        used.split(),
        if ok {
            "ok: every watcher got every revision once, in order".to_owned()
        } else {
            format!(
                "FAILED: {bad} watchers wrong (missing {missing}, repeated {repeated}, out of order {out_of_order}; write errors {}) {:?} {:?}",
                load.errors, first_problem, load.first_error
            )
        }
    );
    ok
}

/// Walks the whole list with page size `p`, as often as the bounds allow.
async fn list_walks(
    client: &Client,
    p: usize,
    max_requests: usize,
    max: Duration,
    live: usize,
) -> bool {
    let mut client = client.clone();
    let mut lat = Vec::new();
    let mut rows = 0usize;
    let mut ok = true;
    let usage = Usage::now("");
    let start = Instant::now();
    'walks: while lat.len() < max_requests && start.elapsed() < max {
        let mut token = String::new();
        let mut seen = HashSet::with_capacity(live);
        loop {
            let t = Instant::now();
            let page = client
                .list_connections(pb::ListConnectionsRequest {
                    page_size: p as i32,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner();
            lat.push(t.elapsed());
            rows += page.connections.len();
            for c in page.connections {
                seen.insert(c.id);
            }
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
            if lat.len() >= max_requests || start.elapsed() >= max {
                break 'walks;
            }
        }
        // A completed walk must have returned every live connection once.
        ok &= seen.len() == live;
    }
    let wall = start.elapsed();
    let used = usage.since("");
    lat.sort();
    println!(
        "| {p} | {} | {rows} | {} | {:.0} | {:.0} | {} | {} | {} | {} |",
        lat.len(),
        secs(wall),
        lat.len() as f64 / wall.as_secs_f64(),
        rows as f64 / wall.as_secs_f64(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        used.split(),
        if ok {
            "ok: each walk saw every row once"
        } else {
            "FAILED: a walk missed or repeated rows"
        }
    );
    ok
}

async fn snapshot_watch(client: &Client, live: usize) -> bool {
    let mut client = client.clone();
    let t = Instant::now();
    let mut stream = client
        .watch_connections(pb::WatchConnectionsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut n = 0usize;
    while let Some(m) = stream.message().await.expect("snapshot stream") {
        if m.r#type == pb::WatchEventType::Synced as i32 {
            break;
        }
        n += 1;
    }
    let d = t.elapsed();
    println!("| {n} | {} | {:.0} |", secs(d), n as f64 / d.as_secs_f64());
    n == live
}

/// Opens `w` watchers at the current revision; returns them once all are SYNCED.
async fn hold_watchers(
    watch_clients: &[Client],
    w: usize,
) -> (
    Vec<tonic::Streaming<pb::WatchConnectionsResponse>>,
    Duration,
) {
    let at = revision(&watch_clients[0]).await;
    let t = Instant::now();
    let mut opening = Vec::with_capacity(w);
    for i in 0..w {
        let mut client = watch_clients[i % watch_clients.len()].clone();
        opening.push(tokio::spawn(async move {
            let mut s = client
                .watch_connections(pb::WatchConnectionsRequest {
                    after_revision: at,
                    ..Default::default()
                })
                .await
                .expect("watch")
                .into_inner();
            loop {
                let m = s.message().await.expect("watch").expect("open");
                if m.r#type == pb::WatchEventType::Synced as i32 {
                    return s;
                }
            }
        }));
    }
    let mut held = Vec::with_capacity(w);
    for o in opening {
        held.push(o.await.expect("watcher"));
    }
    (held, t.elapsed())
}

/// Writes one change and waits until every held watcher has it; then closes them.
async fn one_change_to_all(
    client: &Client,
    held: Vec<tonic::Streaming<pb::WatchConnectionsResponse>>,
    run_id: &str,
    timeout: Duration,
) -> Option<Duration> {
    let t = Instant::now();
    let c = client
        .clone()
        .create_connection(create_request(
            "bench",
            &format!("bench:{run_id}:one"),
            None,
            false,
        ))
        .await
        .expect("create")
        .into_inner();
    let waits = held.into_iter().map(|mut s| {
        let rev = c.revision;
        tokio::spawn(async move {
            while let Ok(Some(m)) = s.message().await {
                if m.revision == rev && m.event.is_some() {
                    return Some(Instant::now());
                }
            }
            None
        })
    });
    let waits: Vec<_> = waits.collect();
    let mut last = t;
    let mut all = true;
    let deadline = tokio::time::Instant::now() + timeout;
    for w in waits {
        match tokio::time::timeout_at(deadline, w).await {
            Ok(Ok(Some(at))) => last = last.max(at),
            _ => all = false,
        }
    }
    all.then(|| last - t)
}

// ---- baselines ----

/// 4 KiB writes + fdatasync on the benchmark's filesystem: appending (the
/// file grows, so the journal commits its size too) and overwriting in place
/// (what a WAL file mostly does once it has been reset).
fn fsync_probe(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("probe file");
    let block = [7u8; 4096];
    for (what, append) in [("append", true), ("overwrite in place", false)] {
        let mut lat = Vec::new();
        let start = Instant::now();
        while lat.len() < 2000 && start.elapsed() < Duration::from_secs(3) {
            let offset = if append { lat.len() as u64 * 4096 } else { 0 };
            let t = Instant::now();
            f.write_all_at(&block, offset).expect("write");
            f.sync_data().expect("fdatasync");
            lat.push(t.elapsed());
        }
        let wall = start.elapsed();
        lat.sort();
        println!(
            "| 4 KiB {what} + fdatasync | {} | {} | {:.0} | {} | {} |",
            lat.len(),
            secs(wall),
            lat.len() as f64 / wall.as_secs_f64(),
            ms(percentile(&lat, 0.50)),
            ms(percentile(&lat, 0.99))
        );
        if append {
            f.set_len(0).expect("truncate");
            f.write_all_at(&block, 0).expect("write");
            f.sync_all().expect("fsync");
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Raw rusqlite, WAL + synchronous=FULL: one insert per commit, then 100 per commit.
fn sqlite_baseline(path: &Path) {
    let conn = rusqlite::Connection::open(path).expect("baseline db");
    let _: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .expect("wal");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("synchronous");
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL);")
        .expect("schema");
    let body = "x".repeat(400);
    let mut id = 0i64;
    for group in [1usize, 100] {
        let mut lat = Vec::new();
        let start = Instant::now();
        while lat.len() * group < 20_000 && start.elapsed() < Duration::from_secs(3) {
            let t = Instant::now();
            conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
            for _ in 0..group {
                id += 1;
                conn.prepare_cached("INSERT INTO t (id, body) VALUES (?1, ?2)")
                    .expect("prepare")
                    .execute(rusqlite::params![id, body])
                    .expect("insert");
            }
            conn.execute_batch("COMMIT").expect("commit");
            lat.push(t.elapsed());
        }
        let wall = start.elapsed();
        lat.sort();
        let rows = lat.len() * group;
        println!(
            "| SQLite WAL, synchronous=FULL, {group} row(s) of 400 B per commit | {rows} rows / {} commits | {} | {:.0} rows/s | {} | {} |",
            lat.len(),
            secs(wall),
            rows as f64 / wall.as_secs_f64(),
            ms(percentile(&lat, 0.50)),
            ms(percentile(&lat, 0.99))
        );
    }
    drop(conn);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// The database file and its WAL, in MiB.
fn db_size(db: &Path) -> String {
    let size = |suffix: &str| {
        std::fs::metadata(format!("{}{suffix}", db.display()))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    format!(
        "database {:.1} MiB + WAL {:.1} MiB",
        size("") as f64 / (1 << 20) as f64,
        size("-wal") as f64 / (1 << 20) as f64
    )
}

// ---- the machine ----

fn print_machine(db: &Path) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let (mount, fs, dev) = filesystem_of(db.parent().unwrap_or(Path::new("/")));
    println!("- cpu: {cores} × {cpu}");
    println!("- database: {}", db.display());
    println!("- filesystem: {fs} on {dev} (mounted at {mount})");
    println!("- load average at the start: {}", loadavg());
}

/// The mount holding `dir`: its mount point, type and device, from /proc/mounts.
fn filesystem_of(dir: &Path) -> (String, String, String) {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best = ("?".to_owned(), "?".to_owned(), "?".to_owned());
    let mut best_len = 0;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let point = Path::new(f[1]);
        if dir.starts_with(point) && f[1].len() >= best_len {
            best_len = f[1].len();
            best = (f[1].to_owned(), f[2].to_owned(), f[0].to_owned());
        }
    }
    best
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// The process's resident memory and thread count at one moment.
struct Mem {
    rss_kib: u64,
    threads: u64,
}

fn mem_now() -> Mem {
    Mem {
        rss_kib: status_kib("VmRSS:"),
        threads: status_kib("Threads:"),
    }
}

/// How many of the process's threads carry each name.
fn threads_by_name() -> String {
    let mut names: std::collections::BTreeMap<String, usize> = Default::default();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            *names.entry(comm.trim().to_owned()).or_default() += 1;
        }
    }
    names
        .iter()
        .map(|(n, c)| format!("{n} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl std::fmt::Display for Mem {
    /// Two table cells: RSS and threads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} | {}", mib(self.rss_kib), self.threads)
    }
}

/// CPU time (per part of the process, and machine-wide) and device flushes
/// at one moment.
struct Usage {
    at: Instant,
    cpu: Cpu,
    flushes: Option<u64>,
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    /// The server runtime's threads: gRPC, protobuf, reads (blocking pool).
    server: f64,
    /// The store's single writer thread.
    writer: f64,
    /// Time the writer thread was runnable but waiting for a CPU
    /// (/proc schedstat), in seconds.
    writer_runq: f64,
    /// The bench clients' runtime threads.
    client: f64,
    /// The whole process.
    process: f64,
    /// Every process on the machine.
    machine: f64,
}

impl Cpu {
    fn now() -> Cpu {
        let mut c = Cpu {
            process: stat_cpu_secs("/proc/self/stat"),
            machine: machine_busy_secs(),
            ..Cpu::default()
        };
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let secs = stat_cpu_secs(&t.path().join("stat").to_string_lossy());
                match comm.trim() {
                    SERVER_THREADS => c.server += secs,
                    WRITER_THREAD => {
                        c.writer += secs;
                        c.writer_runq += runq_wait_secs(&t.path().join("schedstat"));
                    }
                    CLIENT_THREADS => c.client += secs,
                    _ => {}
                }
            }
        }
        c
    }
}

/// What a scenario used: wall time, CPU seconds per part, device flushes.
struct Used {
    wall: Duration,
    cpu: Cpu,
    flushes: Option<u64>,
}

impl Usage {
    fn now(disk: &str) -> Usage {
        Usage {
            at: Instant::now(),
            cpu: Cpu::now(),
            flushes: flushes(disk),
        }
    }

    fn since(&self, disk: &str) -> Used {
        let now = Cpu::now();
        let a = self.cpu;
        Used {
            wall: self.at.elapsed(),
            cpu: Cpu {
                server: now.server - a.server,
                writer: now.writer - a.writer,
                writer_runq: now.writer_runq - a.writer_runq,
                client: now.client - a.client,
                process: now.process - a.process,
                machine: now.machine - a.machine,
            },
            flushes: flushes(disk)
                .zip(self.flushes)
                .map(|(b, a)| b.saturating_sub(a)),
        }
    }
}

impl Used {
    /// Average cores kept busy, given CPU seconds.
    fn cores(&self, secs: f64) -> f64 {
        secs / self.wall.as_secs_f64()
    }

    /// Share of the wall time the writer thread spent waiting for a CPU.
    fn writer_runq(&self) -> String {
        format!(
            "{:.0}%",
            100.0 * self.cpu.writer_runq / self.wall.as_secs_f64()
        )
    }

    /// "server + writer / client / other processes", in cores.
    fn split(&self) -> String {
        format!(
            "{:.2} + {:.2} / {:.2} / {:.2}",
            self.cores(self.cpu.server),
            self.cores(self.cpu.writer),
            self.cores(self.cpu.client),
            self.cores((self.cpu.machine - self.cpu.process).max(0.0)),
        )
    }
}

/// Seconds a thread has spent runnable but not running (second field of
/// /proc/.../schedstat, in nanoseconds).
fn runq_wait_secs(path: &Path) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// User + system CPU seconds in a /proc stat file (USER_HZ = 100).
fn stat_cpu_secs(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// CPU seconds the whole machine has spent busy (/proc/stat, all but idle and iowait).
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / 100.0
}

/// Flush requests the block device has completed (/proc/diskstats, Linux 5.5+).
/// Device-wide: other processes' flushes count too.
fn flushes(disk: &str) -> Option<u64> {
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    stats.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&disk))
            .then(|| f.get(18).and_then(|v| v.parse().ok()))
            .flatten()
    })
}

/// The block device name (as in /proc/diskstats) holding `dir`.
fn device_of(dir: &Path) -> String {
    let (_, _, dev) = filesystem_of(dir);
    dev.rsplit('/').next().unwrap_or("").to_owned()
}

// ---- numbers ----

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
