//! Watch latency across replicas: this file owns measuring how long a change
//! acknowledged by one server takes to reach watchers on the same server and
//! on others that share its database; `scripts/bench-replicas` starts the
//! servers and `docs/BENCHMARKS.md` owns the figures.
//!
//! Connects to servers that are already running. `--watchers` watchers on
//! each `--watch` address open `WatchConnections` after the current revision
//! and reach SYNCED; then `--writers` writers, spread over the `--write`
//! addresses, move connections of kind `tcp` between CONNECTED and
//! DISCONNECTED with their etag (verification skipped), or create them, for
//! `--warmup` and then `--secs` measured. Each writer records when it sent a
//! change and when its acknowledgement (revision N, etag `rN`) arrived; each
//! watcher records when each revision reached it. One process, one clock
//! (`std::time::Instant`), so the two can be subtracted.
//!
//! Reports, per watch address and split by whether the change was written
//! through that same address or through another: deliveries per second and
//! acknowledgement → delivery latency (negative when the watcher heard first),
//! and send → delivery. Checks that every watcher received every acknowledged
//! revision exactly once, in increasing order, and nothing else; exits 1 if
//! not. It starts no server and knows nothing of the backend behind one.
//!
//! Bounded in time: about `--warmup` + `--secs`, plus at most `--drain` for
//! watchers to catch up and `--drain` to open. `cargo run --release --example
//! replica_watch -- --help` lists the knobs.

use clap::{Parser, ValueEnum};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tether::pb::tether::v1 as pb;
use tether::pb::tether::v1::connection_service_client::ConnectionServiceClient;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

type Client = ConnectionServiceClient<Channel>;

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Watch latency from writes on some servers to watchers on others.
#[derive(Parser, Debug)]
#[command(name = "replica_watch")]
struct Args {
    /// Address (host:port) writers send to; repeat it to spread the writers
    /// over several servers, in turn.
    #[arg(long = "write", required = true, value_name = "ADDR")]
    write: Vec<String>,

    /// Address watchers are opened on; repeat it for several servers.
    #[arg(long = "watch", required = true, value_name = "ADDR")]
    watch: Vec<String>,

    /// Watchers on each watch address.
    #[arg(long, default_value_t = 10)]
    watchers: usize,

    /// Writers in all, each with one call in flight.
    #[arg(long, default_value_t = 16)]
    writers: usize,

    /// What each writer does.
    #[arg(long, value_enum, default_value_t = Op::Move)]
    op: Op,

    /// Measured seconds, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = duration)]
    secs: Duration,

    /// Writes before the measured window (not counted in rates or latencies,
    /// but checked like every other).
    #[arg(long, default_value = "1s", value_parser = duration)]
    warmup: Duration,

    /// HTTP/2 connections to each write address, shared by its writers.
    #[arg(long, default_value_t = 4)]
    write_channels: usize,

    /// HTTP/2 connections to each watch address, shared by its watchers.
    #[arg(long, default_value_t = 2)]
    watch_channels: usize,

    /// The url of every connection written: a loopback port nothing answers
    /// on is fine, as verification is skipped.
    #[arg(long, default_value = "tcp://127.0.0.1:9")]
    url: String,

    /// Longest the watchers may take to reach SYNCED, and then to receive
    /// the last acknowledged revision once writing stops.
    #[arg(long, default_value = "30s", value_parser = duration)]
    drain: Duration,

    /// A name for this run, repeated on every `RESULT` line.
    #[arg(long, default_value = "run")]
    label: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Op {
    /// Each writer owns one connection and moves it CONNECTED ⇄ DISCONNECTED
    /// with its etag (compare-and-set), verification skipped.
    Move,
    /// Each writer creates connections with identities of its own.
    Create,
}

/// Nanoseconds since the run's epoch: the one clock writers and watchers read.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(self) -> i64 {
        self.0.elapsed().as_nanos() as i64
    }
}

/// One acknowledged write.
#[derive(Clone, Copy)]
struct Ack {
    sent: i64,
    acked: i64,
    /// Index into `--write` of the address it went through.
    through: usize,
}

/// What one writer did.
#[derive(Default)]
struct Written {
    /// Index into `--write` of the address it wrote through.
    through: usize,
    acks: Vec<(i64, Ack)>,
    errors: usize,
    /// Answers whose etag was not `r<revision>`.
    bad_etags: usize,
    first_error: Option<String>,
}

/// What one watcher received, in order: (revision, when).
struct Received {
    at: usize,
    got: Vec<(i64, i64)>,
    error: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let ok = run(&args).await;
    std::process::exit(if ok { 0 } else { 1 });
}

async fn run(args: &Args) -> bool {
    let clock = Clock(Instant::now());
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    println!("# Watch latency across replicas ({})\n", args.label);
    let op = match args.op {
        Op::Move => "each moving its connection with its etag",
        Op::Create => "each creating connections",
    };
    println!(
        "- writes: {} writers {op}, through {}",
        args.writers,
        args.write.join(", ")
    );
    println!(
        "- watchers: {} on each of {}",
        args.watchers,
        args.watch.join(", ")
    );
    println!(
        "- {} measured after {} of warm-up; load average at the start: {}",
        secs(args.secs),
        secs(args.warmup),
        loadavg()
    );

    let mut write_clients = Vec::new();
    for addr in &args.write {
        write_clients.push(channels(addr, args.write_channels).await);
    }
    let mut watch_clients = Vec::new();
    for addr in &args.watch {
        watch_clients.push(channels(addr, args.watch_channels).await);
    }

    // Writer w goes through write address w mod n, on its channels in turn.
    let through = |w: usize| w % args.write.len();
    let client_of = |w: usize| {
        let cs = &write_clients[through(w)];
        cs[(w / args.write.len()) % cs.len()].clone()
    };
    let mut slots = Vec::with_capacity(args.writers);
    if args.op == Op::Move {
        for w in 0..args.writers {
            slots.push(Some(make_slot(client_of(w), &args.url, &run_id, w).await));
        }
    } else {
        slots.resize_with(args.writers, || None);
    }
    let base = revision(&write_clients[0][0]).await;

    // Watchers: all of them SYNCED before the first write.
    let (stop_watch, stopped) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(1);
    let watchers = args.watchers * args.watch.len();
    let last_seen: Arc<Vec<AtomicI64>> =
        Arc::new((0..watchers).map(|_| AtomicI64::new(base)).collect());
    let opened = Instant::now();
    let mut watcher_tasks = Vec::with_capacity(watchers);
    for k in 0..watchers {
        let at = k % args.watch.len();
        let cs = &watch_clients[at];
        let client = cs[(k / args.watch.len()) % cs.len()].clone();
        watcher_tasks.push(tokio::spawn(watcher(
            client,
            at,
            base,
            clock,
            ready_tx.clone(),
            stopped.clone(),
            last_seen.clone(),
            k,
        )));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < watchers {
        match tokio::time::timeout(args.drain, ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => break,
        }
    }
    if ready < watchers {
        println!("\nFAILED: only {ready} of {watchers} watchers reached SYNCED");
        for t in watcher_tasks {
            t.abort();
        }
        return false;
    }
    println!(
        "- {watchers} watchers SYNCED after revision {base} in {}",
        secs(opened.elapsed())
    );

    // Writers, for the warm-up and the window.
    let stop_write = Arc::new(AtomicBool::new(false));
    let mut writer_tasks = Vec::with_capacity(args.writers);
    for (w, slot) in slots.into_iter().enumerate() {
        writer_tasks.push(tokio::spawn(writer(
            client_of(w),
            through(w),
            slot,
            format!("replica-watch:{run_id}:{w}"),
            args.url.clone(),
            clock,
            stop_write.clone(),
        )));
    }
    tokio::time::sleep(args.warmup).await;
    let start = clock.now();
    tokio::time::sleep(args.secs).await;
    let window = (start, clock.now());
    stop_write.store(true, Ordering::SeqCst);
    let mut written = Vec::with_capacity(args.writers);
    for t in writer_tasks {
        written.push(t.await.expect("writer task"));
    }

    // Let the watchers catch up with the last acknowledged revision.
    let last = written
        .iter()
        .flat_map(|w| w.acks.iter().map(|(r, _)| *r))
        .max()
        .unwrap_or(base);
    let drained = Instant::now();
    while drained.elapsed() < args.drain
        && last_seen.iter().any(|s| s.load(Ordering::Relaxed) < last)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain_time = drained.elapsed();
    let _ = stop_watch.send(true);
    let mut received = Vec::with_capacity(watchers);
    for t in watcher_tasks {
        received.push(t.await.expect("watcher task"));
    }
    println!(
        "- the watchers had the last acknowledged revision ({last}) {} after the writers stopped",
        secs(drain_time)
    );
    report(args, window, &written, &received)
}

/// `n` HTTP/2 connections to `addr`.
async fn channels(addr: &str, n: usize) -> Vec<Client> {
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        out.push(ConnectionServiceClient::new(channel));
    }
    out
}

fn tcp_connection(url: &str, identity: String) -> pb::Connection {
    pb::Connection {
        kind: "tcp".into(),
        url: url.into(),
        name: identity.clone(),
        identity,
        labels: [("env".to_owned(), "bench".to_owned())].into(),
        managed: Some(false),
        ..Default::default()
    }
}

/// A writer's own connection, CONNECTED: (id, etag, state).
async fn make_slot(mut client: Client, url: &str, run_id: &str, w: usize) -> (String, String, i32) {
    let c = client
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(tcp_connection(
                url,
                format!("replica-watch:{run_id}:slot:{w}"),
            )),
            initial_state: pb::ConnectionState::Connected as i32,
            skip_verification: true,
            ..Default::default()
        })
        .await
        .expect("create a writer's connection")
        .into_inner();
    (c.id, c.etag, c.state)
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

#[allow(clippy::too_many_arguments)]
async fn watcher(
    mut client: Client,
    at: usize,
    after: i64,
    clock: Clock,
    ready: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
    last_seen: Arc<Vec<AtomicI64>>,
    k: usize,
) -> Received {
    let mut out = Received {
        at,
        got: Vec::with_capacity(1 << 16),
        error: None,
    };
    let mut stream = match client
        .watch_connections(pb::WatchConnectionsRequest {
            after_revision: after,
            ..Default::default()
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => {
            out.error = Some(format!("watch: {e}"));
            return out;
        }
    };
    loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(m)) => {
                    let now = clock.now();
                    match pb::WatchEventType::try_from(m.r#type) {
                        Ok(pb::WatchEventType::Synced) => {
                            let _ = ready.send(()).await;
                        }
                        Ok(pb::WatchEventType::Bookmark) => {}
                        _ => {
                            out.got.push((m.revision, now));
                            last_seen[k].store(m.revision, Ordering::Relaxed);
                        }
                    }
                }
                Ok(None) => {
                    out.error = Some("stream ended".into());
                    break;
                }
                Err(e) => {
                    out.error = Some(format!("stream: {e}"));
                    break;
                }
            },
            _ = stop.changed() => break,
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn writer(
    mut client: Client,
    through: usize,
    mut slot: Option<(String, String, i32)>,
    identity: String,
    url: String,
    clock: Clock,
    stop: Arc<AtomicBool>,
) -> Written {
    let mut out = Written {
        through,
        acks: Vec::with_capacity(1 << 14),
        ..Default::default()
    };
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let sent = clock.now();
        let answer = match &mut slot {
            Some((id, etag, state)) => {
                let target = if *state == pb::ConnectionState::Connected as i32 {
                    pb::ConnectionState::Disconnected
                } else {
                    pb::ConnectionState::Connected
                };
                client
                    .transition_connection(pb::TransitionConnectionRequest {
                        id: id.clone(),
                        target_state: target as i32,
                        etag: etag.clone(),
                        skip_verification: true,
                        ..Default::default()
                    })
                    .await
            }
            None => {
                i += 1;
                client
                    .create_connection(pb::CreateConnectionRequest {
                        connection: Some(tcp_connection(&url, format!("{identity}:{i}"))),
                        initial_state: pb::ConnectionState::Discovered as i32,
                        skip_verification: true,
                        ..Default::default()
                    })
                    .await
            }
        };
        let acked = clock.now();
        match answer {
            Ok(c) => {
                let c = c.into_inner();
                if c.etag != format!("r{}", c.revision) {
                    out.bad_etags += 1;
                }
                if let Some(slot) = &mut slot {
                    slot.1 = c.etag;
                    slot.2 = c.state;
                }
                out.acks.push((
                    c.revision,
                    Ack {
                        sent,
                        acked,
                        through,
                    },
                ));
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
                // Start again from what the server has.
                if let Some((id, etag, state)) = &mut slot
                    && let Ok(c) = client
                        .get_connection(pb::GetConnectionRequest { id: id.clone() })
                        .await
                {
                    let c = c.into_inner();
                    (*etag, *state) = (c.etag, c.state);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    out
}

/// Latencies of one group of deliveries, in nanoseconds.
#[derive(Default)]
struct Lat {
    /// Deliveries received inside the window.
    in_window: usize,
    /// Acknowledgement → delivery, of writes sent inside the window.
    from_ack: Vec<i64>,
    /// Send → delivery, of the same writes.
    from_send: Vec<i64>,
}

impl Lat {
    fn row(&mut self, addr: &str, watchers: usize, through: &str, window_secs: f64) -> String {
        self.from_ack.sort_unstable();
        self.from_send.sort_unstable();
        let (a, s) = (&self.from_ack, &self.from_send);
        format!(
            "| {addr} | {watchers} | {through} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            a.len(),
            self.in_window as f64 / window_secs,
            ms(percentile(a, 0.50)),
            ms(percentile(a, 0.99)),
            ms(a.last().copied().unwrap_or(0)),
            ms(percentile(s, 0.50)),
            ms(percentile(s, 0.99)),
            ms(s.last().copied().unwrap_or(0)),
        )
    }

    fn result(&self, label: &str, addr: &str, through: &str, window_secs: f64) -> String {
        let (a, s) = (&self.from_ack, &self.from_send);
        let us = |v: i64| v / 1_000;
        format!(
            "RESULT label={label} watch={addr} through={through} n={} deliveries_per_s={:.0} \
             ack_to_delivery_p50_us={} ack_to_delivery_p99_us={} ack_to_delivery_max_us={} \
             send_to_delivery_p50_us={} send_to_delivery_p99_us={} send_to_delivery_max_us={}",
            a.len(),
            self.in_window as f64 / window_secs,
            us(percentile(a, 0.50)),
            us(percentile(a, 0.99)),
            us(a.last().copied().unwrap_or(0)),
            us(percentile(s, 0.50)),
            us(percentile(s, 0.99)),
            us(s.last().copied().unwrap_or(0)),
        )
    }
}

/// What a watch address's watchers got wrong, summed.
#[derive(Default)]
struct Checks {
    missing: usize,
    duplicates: usize,
    out_of_order: usize,
    not_acked: usize,
    errors: usize,
    first_error: Option<String>,
}

impl Checks {
    fn ok(&self) -> bool {
        self.missing + self.duplicates + self.out_of_order + self.not_acked + self.errors == 0
    }
}

fn report(args: &Args, window: (i64, i64), written: &[Written], received: &[Received]) -> bool {
    let window_secs = (window.1 - window.0) as f64 / 1e9;
    let in_window = |t: i64| t >= window.0 && t < window.1;
    let mut acks: HashMap<i64, Ack> = HashMap::new();
    let mut repeated_acks = 0;
    for (rev, ack) in written.iter().flat_map(|w| w.acks.iter()) {
        if acks.insert(*rev, *ack).is_some() {
            repeated_acks += 1;
        }
    }

    println!("\n## Writes\n");
    println!("| through | writers | acked in the window | per s | ack p50 | ack p99 | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut write_errors = 0;
    let mut bad_etags = 0;
    for (i, addr) in args.write.iter().enumerate() {
        let mine: Vec<&Written> = written.iter().filter(|w| w.through == i).collect();
        let mut lat: Vec<i64> = mine
            .iter()
            .flat_map(|w| w.acks.iter())
            .filter(|(_, a)| in_window(a.sent))
            .map(|(_, a)| a.acked - a.sent)
            .collect();
        lat.sort_unstable();
        let errors: usize = mine.iter().map(|w| w.errors).sum();
        write_errors += errors;
        bad_etags += mine.iter().map(|w| w.bad_etags).sum::<usize>();
        println!(
            "| {addr} | {} | {} | {:.0} | {} | {} | {errors} |",
            mine.len(),
            lat.len(),
            lat.len() as f64 / window_secs,
            ms(percentile(&lat, 0.50)),
            ms(percentile(&lat, 0.99)),
        );
        println!(
            "RESULT label={} write={addr} writers={} writes_per_s={:.0} ack_p50_us={} ack_p99_us={} errors={errors}",
            args.label,
            mine.len(),
            lat.len() as f64 / window_secs,
            percentile(&lat, 0.50) / 1_000,
            percentile(&lat, 0.99) / 1_000,
        );
    }
    if let Some(e) = written.iter().find_map(|w| w.first_error.as_ref()) {
        println!("\nfirst write error: {e}");
    }

    // Deliveries, per watch address and by where the change was written.
    let mut expected: Vec<i64> = acks.keys().copied().collect();
    expected.sort_unstable();
    let n = args.watch.len();
    let mut same: Vec<Lat> = (0..n).map(|_| Lat::default()).collect();
    let mut other: Vec<Lat> = (0..n).map(|_| Lat::default()).collect();
    let mut all: Vec<Lat> = (0..n).map(|_| Lat::default()).collect();
    let mut overall = Lat::default();
    let mut checks: Vec<Checks> = (0..n).map(|_| Checks::default()).collect();
    for r in received {
        let check = &mut checks[r.at];
        if let Some(e) = &r.error {
            check.errors += 1;
            check.first_error.get_or_insert_with(|| e.clone());
        }
        let revs: Vec<i64> = r.got.iter().map(|(rev, _)| *rev).collect();
        let seen: HashSet<i64> = revs.iter().copied().collect();
        check.missing += expected.iter().filter(|rev| !seen.contains(rev)).count();
        check.duplicates += revs.len() - seen.len();
        check.out_of_order += revs.windows(2).filter(|p| p[1] < p[0]).count();
        check.not_acked += seen.iter().filter(|rev| !acks.contains_key(rev)).count();
        for &(rev, at) in &r.got {
            let Some(ack) = acks.get(&rev) else { continue };
            let here = args.write[ack.through] == args.watch[r.at];
            let groups = [
                if here {
                    &mut same[r.at]
                } else {
                    &mut other[r.at]
                },
                &mut all[r.at],
                &mut overall,
            ];
            for g in groups {
                if in_window(at) {
                    g.in_window += 1;
                }
                if in_window(ack.sent) {
                    g.from_ack.push(at - ack.acked);
                    g.from_send.push(at - ack.sent);
                }
            }
        }
    }

    println!("\n## Deliveries\n");
    println!(
        "Latency of the writes sent in the window; deliveries/s of those received in it. \
         \"here\": written through the address watched; \"elsewhere\": through another.\n"
    );
    println!(
        "| watch address | watchers | written through | deliveries | deliveries/s | ack → delivery p50 | p99 | max | send → delivery p50 | p99 | max |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut results = Vec::new();
    for (i, addr) in args.watch.iter().enumerate() {
        let w = args.watchers;
        for (lat, through) in [(&mut same[i], "here"), (&mut other[i], "elsewhere")] {
            if !lat.from_ack.is_empty() {
                println!("{}", lat.row(addr, w, through, window_secs));
                results.push(lat.result(&args.label, addr, through, window_secs));
            }
        }
        if !same[i].from_ack.is_empty() && !other[i].from_ack.is_empty() {
            println!("{}", all[i].row(addr, w, "either", window_secs));
            results.push(all[i].result(&args.label, addr, "either", window_secs));
        }
    }
    println!(
        "{}",
        overall.row("all", args.watchers * n, "either", window_secs)
    );
    results.push(overall.result(&args.label, "all", "either", window_secs));
    println!();
    for r in results {
        println!("{r}");
    }

    println!("\n## Checks\n");
    println!(
        "Every watcher against the {} acknowledged revisions (warm-up included).\n",
        expected.len()
    );
    println!(
        "| watch address | missing | duplicates | out of order | received, not acknowledged | streams ended | |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    let mut ok = write_errors == 0 && bad_etags == 0 && repeated_acks == 0 && !expected.is_empty();
    for (i, addr) in args.watch.iter().enumerate() {
        let c = &checks[i];
        ok &= c.ok();
        println!(
            "| {addr} | {} | {} | {} | {} | {} | {} |",
            c.missing,
            c.duplicates,
            c.out_of_order,
            c.not_acked,
            c.errors,
            if c.ok() {
                "ok".to_owned()
            } else {
                format!("FAILED {}", c.first_error.as_deref().unwrap_or(""))
            }
        );
        println!(
            "CHECK label={} watch={addr} missing={} duplicates={} out_of_order={} not_acked={} stream_errors={}",
            args.label, c.missing, c.duplicates, c.out_of_order, c.not_acked, c.errors
        );
    }
    println!(
        "\nwrites: {} acknowledged, {write_errors} errors, {bad_etags} etags not r<revision>, \
         {repeated_acks} revisions acknowledged twice: {}",
        expected.len(),
        if ok { "ok" } else { "FAILED" }
    );
    ok
}

// ---- numbers ----

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(ns: i64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
