//! The watch memory benchmark: this file owns measuring how much memory the
//! server takes for watchers that do not keep up; `docs/BENCHMARKS.md` owns
//! the figures.
//!
//! Runs a `tether` binary given on the command line (so two builds can be
//! compared in one run) over a fresh database, and reads its resident memory
//! from `/proc` after each step:
//! 1. a database of `--connections` connections with `--metadata` bytes each;
//! 2. `--snapshots` watchers that ask for a snapshot and read nothing;
//! 3. `--stuck` watchers of live changes that read nothing, while
//!    `--changes` updates of those large connections commit;
//! 4. every stuck watcher then reads to the end (catching up).
//!
//! `cargo run --release --example watch_memory -- --bin target/release/tether`

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use tether::pb::tether::v1 as pb;
use tether::pb::tether::v1::connection_service_client::ConnectionServiceClient;
use tokio::io::AsyncBufReadExt;
use tonic::transport::{Channel, Endpoint};

type Client = ConnectionServiceClient<Channel>;

#[derive(Parser, Debug)]
struct Args {
    /// The tether binary to run.
    #[arg(long)]
    bin: PathBuf,
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    #[arg(long, default_value_t = 32 * 1024)]
    metadata: usize,
    #[arg(long, default_value_t = 10)]
    snapshots: usize,
    #[arg(long, default_value_t = 50)]
    stuck: usize,
    #[arg(long, default_value_t = 2000)]
    changes: usize,
    /// Extra flags for `tether serve`.
    #[arg(long, allow_hyphen_values = true, num_args = 0..)]
    serve_args: Vec<String>,
}

fn metadata(bytes: usize, n: usize) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            "blob".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(format!(
                    "{n:08}{}",
                    "x".repeat(bytes.saturating_sub(8))
                ))),
            },
        )]
        .into(),
    }
}

/// (VmRSS, VmHWM) of `pid` in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn client(addr: &str, window: Option<u32>) -> Client {
    let mut e = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    if let Some(w) = window {
        e = e
            .initial_stream_window_size(w)
            .initial_connection_window_size(w);
    }
    ConnectionServiceClient::new(e.connect().await.unwrap()).max_decoding_message_size(16 << 20)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut child = tokio::process::Command::new(&args.bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .args([
            "--disable-monitor",
            "--rate-limit",
            "0",
            "--max-watches",
            "10000",
        ])
        .args(&args.serve_args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("tether listening on ")
        .unwrap()
        .to_owned();
    let report = |step: &str| {
        let (rss, hwm) = memory(pid);
        println!("{step:<58} RSS {rss:>8.1} MiB   peak {hwm:>8.1} MiB");
    };
    report("started");

    let writer = client(&addr, None).await;
    let mut ids = Vec::new();
    for chunk in (0..args.connections).collect::<Vec<_>>().chunks(64) {
        let batch = chunk.iter().map(|&n| {
            let mut c = writer.clone();
            let md = metadata(args.metadata, n);
            tokio::spawn(async move {
                c.create_connection(pb::CreateConnectionRequest {
                    connection: Some(pb::Connection {
                        kind: "tcp".into(),
                        identity: format!("bench:{n}"),
                        metadata: Some(md),
                        ..Default::default()
                    }),
                    skip_verification: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .id
            })
        });
        for h in batch.collect::<Vec<_>>() {
            ids.push(h.await.unwrap());
        }
    }
    report(&format!(
        "{} connections of {} KiB",
        args.connections,
        args.metadata / 1024
    ));

    let mut held = Vec::new();
    for _ in 0..args.snapshots {
        let mut c = client(&addr, Some(64 * 1024)).await;
        let mut s = c
            .watch_connections(pb::WatchConnectionsRequest::default())
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    report(&format!(
        "+ {} snapshot watchers reading nothing",
        args.snapshots
    ));
    drop(held);

    let revision = writer
        .clone()
        .list_connections(pb::ListConnectionsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    let mut stuck = Vec::new();
    for _ in 0..args.stuck {
        let mut c = client(&addr, Some(64 * 1024)).await;
        let mut s = c
            .watch_connections(pb::WatchConnectionsRequest {
                after_revision: revision,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap(); // SYNCED
        stuck.push(s);
    }
    for (n, id) in ids.iter().cycle().take(args.changes).enumerate() {
        writer
            .clone()
            .update_connection(pb::UpdateConnectionRequest {
                connection: Some(pb::Connection {
                    id: id.clone(),
                    metadata: Some(metadata(args.metadata, n + 1_000_000)),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["metadata".into()],
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    report(&format!(
        "+ {} live watchers reading nothing, {} changes",
        args.stuck, args.changes
    ));

    let last = revision + args.changes as i64;
    let mut ended = 0;
    for s in &mut stuck {
        loop {
            match s.message().await {
                Ok(Some(m)) if m.revision >= last => break,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    ended += 1;
                    break;
                }
            }
        }
    }
    report(&format!(
        "after they all read (caught up: {}, ended: {ended})",
        args.stuck - ended
    ));
    child.kill().await.unwrap();
}
