//! Several replicas over one PostgreSQL database (the `postgres` feature):
//! servers started as for SQLite, with `--db postgres://…` and one shared
//! key, on a database of a throwaway cluster.

use crate::common::*;
use crate::pg_cluster::Cluster;
use std::sync::Arc;
use std::time::Duration;
use tether::pb::tether::v1 as pb;

/// A fresh database, and a folder for the key every replica shares.
async fn database() -> (String, Arc<tempfile::TempDir>) {
    // The blocking client cannot run on the runtime's threads.
    let url = tokio::task::spawn_blocking(|| Cluster::shared().database())
        .await
        .unwrap();
    (url, Arc::new(tempfile::tempdir().unwrap()))
}

/// A replica on `url`, once it serves (the first makes the shared key).
async fn replica(url: &str, keys: &Arc<tempfile::TempDir>) -> App {
    let (url, key) = (url.to_owned(), keys.path().join("tether.key"));
    replica_with(move |c| {
        c.db = Some(url.into());
        c.secret_key_file = Some(key);
    })
    .await
}

/// A server started with `tweak`, once it serves.
async fn replica_with(tweak: impl FnOnce(&mut tether::Config)) -> App {
    let app = App::start_with(tweak).await;
    let mut client = app.client.clone();
    client
        .list_connections(pb::ListConnectionsRequest::default())
        .await
        .expect("the replica serves");
    app
}

/// The next message, failing the test if none comes within 10 s.
async fn next(
    s: &mut tonic::Streaming<pb::WatchConnectionsResponse>,
) -> pb::WatchConnectionsResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a message within 10 s")
        .unwrap()
        .unwrap()
}

/// What one replica writes, the other reads and watches: a change made
/// through A reaches a watcher on B, and B's change reaches A's reads.
#[tokio::test]
async fn two_replicas_serve_one_database() {
    let (url, keys) = database().await;
    let a = replica(&url, &keys).await;
    let b = replica(&url, &keys).await;
    let (mut on_a, mut on_b) = (a.client.clone(), b.client.clone());
    let mut watching = on_b
        .watch_connections(pb::WatchConnectionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let synced = next(&mut watching).await;
    assert_eq!(synced.r#type, pb::WatchEventType::Synced as i32);

    let made = create(&mut on_a, conn("tcp", "tcp://one.example:1")).await;
    let seen = next(&mut watching).await;
    assert_eq!(seen.r#type, pb::WatchEventType::Added as i32);
    assert_eq!(seen.connection.as_ref().unwrap().id, made.id);
    assert_eq!(get(&mut on_b, &made.id).await, made);

    let moved = moved(&mut on_b, &made.id, S::Ignored).await;
    assert_eq!(get(&mut on_a, &made.id).await, moved);
    let seen = next(&mut watching).await;
    assert_eq!(
        seen.revision,
        moved.etag.trim_start_matches('r').parse::<i64>().unwrap()
    );

    // The same identity reported through either replica is one connection.
    let again = on_a
        .create_connection(pb::CreateConnectionRequest {
            connection: Some(pb::Connection {
                identity: made.identity.clone(),
                ..conn("tcp", "tcp://one.example:1")
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(again.unwrap_err().code(), tonic::Code::AlreadyExists);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Without a key given, a PostgreSQL database is refused: every replica
/// must seal and open secrets with the same key, so none is made.
#[tokio::test]
async fn a_replica_without_a_given_key_is_refused() {
    let (url, _keys) = database().await;
    let mut config = test_config();
    config.db = Some(url.into());
    let refused = tether::server::Server::open(config).await.err().unwrap();
    assert!(refused.to_string().contains("secret key"), "{refused}");
}

/// A key file of 32 random bytes, base64, 0600.
fn key_file(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    use base64::Engine as _;
    use std::os::unix::fs::PermissionsExt;
    let key: [u8; 32] = std::array::from_fn(|_| fastrand::u8(..));
    let path = dir.path().join(name);
    std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode(key)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Three replicas starting at once on a new database all migrate it and
/// serve, and one key check is recorded; a replica with another key is
/// refused.
#[tokio::test]
async fn replicas_starting_at_once_on_a_new_database_all_serve() {
    let (url, keys) = database().await;
    let key = key_file(&keys, "shared.key");
    let start = || {
        let (url, key) = (url.clone(), key.clone());
        replica_with(move |c| {
            c.db = Some(url.into());
            c.secret_key_file = Some(key);
        })
    };
    let (a, b, c) = tokio::join!(start(), start(), start());
    let made = create(&mut a.client.clone(), conn("tcp", "tcp://two.example:1")).await;
    for app in [&b, &c] {
        assert_eq!(get(&mut app.client.clone(), &made.id).await, made);
    }
    let mut other = test_config();
    other.db = Some(url.clone().into());
    other.secret_key_file = Some(key_file(&keys, "other.key"));
    let refused = tether::server::Server::open(other).await.err().unwrap();
    assert!(refused.to_string().contains("does not open"), "{refused}");
    for app in [a, b, c] {
        app.stop().await.unwrap();
    }
}

/// The database password may come from a file only the server's user can
/// read; one others can read, or a second password in the URL, is refused.
#[tokio::test]
async fn the_database_password_comes_from_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let (url, keys) = database().await;
    let password = keys.path().join("password");
    std::fs::write(&password, "not-checked-by-the-test-cluster\n").unwrap();
    let open = |db: String, mode: u32| {
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut config = test_config();
        config.db = Some(db.into());
        config.secret_key_file = Some(keys.path().join("tether.key"));
        config.db_password_file = Some(password.clone());
        tether::server::Server::open(config)
    };
    let shown = open(url.clone(), 0o640).await.err().unwrap().to_string();
    assert!(shown.contains("chmod 600"), "{shown}");
    let twice = url.replacen("tether@", "tether:inline@", 1);
    let refused = open(twice, 0o600).await.err().unwrap().to_string();
    assert!(refused.contains("one place"), "{refused}");
    // The test cluster trusts loopback, so any password opens it: the URL
    // the file completes is one the server serves with.
    let server = open(url, 0o600).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Serves, and stops at once (closing the store).
    server
        .serve(listener, std::future::ready(()))
        .await
        .unwrap();
}

// ---- several replicas under load ----

/// One change as a client saw it: its store revision, the connection and
/// what a watcher that sees everything is sent for it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Change {
    revision: i64,
    id: String,
    r#type: i32,
    state: i32,
}

impl Change {
    /// The write a replica answered with `c`, which a watcher reports as `ty`.
    fn acked(c: &pb::Connection, ty: pb::WatchEventType) -> Change {
        assert_eq!(
            c.etag,
            format!("r{}", c.revision),
            "the etag is the revision"
        );
        Change {
            revision: c.revision,
            id: c.id.clone(),
            r#type: ty as i32,
            state: c.state,
        }
    }
}

/// Acknowledged writes, as they are acknowledged.
#[derive(Clone, Default)]
struct Ledger {
    acked: Arc<std::sync::Mutex<Vec<Change>>>,
}

impl Ledger {
    fn record(&self, c: Change) {
        self.acked.lock().unwrap().push(c);
    }

    fn acked(&self) -> Vec<Change> {
        self.acked.lock().unwrap().clone()
    }
}

/// The lifecycle each writer takes its connections through after creating
/// them, every step a USER edge of the table, and what a watcher of
/// everything is sent for it (a tombstone leaves the view).
const ROUND: [(S, pb::WatchEventType); 5] = [
    (S::Registered, pb::WatchEventType::Modified),
    (S::Connected, pb::WatchEventType::Modified),
    (S::Maintenance, pb::WatchEventType::Modified),
    (S::Ignored, pb::WatchEventType::Modified),
    (S::Deleted, pb::WatchEventType::Removed),
];

/// Writes through `client` until `rounds` are done, `stop` is set or a call
/// fails (that call's status): each round creates an unmanaged connection
/// (never probed) and moves it along [`ROUND`]. Every answered write goes
/// into `ledger` as it is answered.
async fn write(
    mut client: Client,
    rounds: usize,
    stop: tokio::sync::watch::Receiver<bool>,
    ledger: Ledger,
) -> Result<(), tonic::Status> {
    for _ in 0..rounds {
        if *stop.borrow() {
            break;
        }
        let made = client
            .create_connection(pb::CreateConnectionRequest {
                connection: Some(pb::Connection {
                    managed: Some(false),
                    ..conn("http", "")
                }),
                skip_verification: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        ledger.record(Change::acked(&made, pb::WatchEventType::Added));
        for (target, ty) in ROUND {
            let moved = client
                .transition_connection(pb::TransitionConnectionRequest {
                    id: made.id.clone(),
                    target_state: target as i32,
                    skip_verification: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            assert_eq!(moved.state, target as i32);
            ledger.record(Change::acked(&moved, ty));
        }
    }
    Ok(())
}

/// A watch of everything, opened on an empty database and read in the
/// background from its SYNCED on.
struct Watcher {
    seen: Arc<std::sync::Mutex<Vec<pb::WatchConnectionsResponse>>>,
    last: tokio::sync::watch::Receiver<i64>,
    task: tokio::task::JoinHandle<tonic::Status>,
}

impl Watcher {
    async fn open(client: &mut Client) -> Watcher {
        let mut stream = client
            .watch_connections(pb::WatchConnectionsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let synced = next(&mut stream).await;
        assert_eq!(synced.r#type, pb::WatchEventType::Synced as i32);
        let (tx, last) = tokio::sync::watch::channel(synced.revision);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        let revision = m.revision;
                        log.lock().unwrap().push(m);
                        tx.send_replace(revision);
                    }
                    Ok(None) => return tonic::Status::unknown("the watch ended"),
                    Err(status) => return status,
                }
            }
        });
        Watcher { seen, last, task }
    }

    /// Every change sent so far, in the order it was sent.
    fn changes(&self) -> Vec<Change> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|m| {
                let c = m
                    .connection
                    .as_ref()
                    .expect("a change names its connection");
                Change {
                    revision: m.revision,
                    id: c.id.clone(),
                    r#type: m.r#type,
                    state: c.state,
                }
            })
            .collect()
    }

    /// Waits until `done` holds of what was sent, failing the test if it
    /// does not by `deadline` or the watch ends.
    async fn until(
        &mut self,
        deadline: tokio::time::Instant,
        what: &str,
        done: impl Fn(&[pb::WatchConnectionsResponse]) -> bool,
    ) {
        while !done(&self.seen.lock().unwrap()) {
            match tokio::time::timeout_at(deadline, self.last.changed()).await {
                Err(_) => panic!("{what}: not by the deadline"),
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("{what}: {:?}", (&mut self.task).await),
            }
        }
    }

    /// Waits until it was sent everything up to `revision` (20 s at most).
    async fn reached(&mut self, revision: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let what = format!("sent everything up to r{revision}");
        self.until(deadline, &what, |seen| {
            seen.last().is_some_and(|m| m.revision >= revision)
        })
        .await;
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Asserts that `seen` is `want` (both in revision order), naming the first
/// place they differ rather than printing thousands of changes.
fn assert_same(seen: &[Change], want: &[Change], what: &str) {
    if let Some(i) = (0..seen.len().max(want.len())).find(|&i| seen.get(i) != want.get(i)) {
        panic!(
            "{what}: change {i} of {} (of {} wanted) is {:?}, wanted {:?}",
            seen.len(),
            want.len(),
            seen.get(i),
            want.get(i)
        );
    }
}

/// Asserts that `changes` have strictly increasing revisions with no gap:
/// the store revision is one counter for the whole database, so a watcher
/// of everything is sent each of its values once.
fn assert_gapless(changes: &[Change], what: &str) {
    for pair in changes.windows(2) {
        assert_eq!(
            pair[1].revision,
            pair[0].revision + 1,
            "{what}: r{} followed by r{}",
            pair[0].revision,
            pair[1].revision
        );
    }
}

/// Three replicas, each with writers and a watcher: every write any of them
/// acknowledged reaches every watcher once, in revision order, with no
/// revision missing or repeated, and the three watchers are sent the very
/// same history (a revision names the same change of the same connection
/// everywhere). The revision is one counter across replicas, in commit
/// order, even while all of them commit at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_writing_at_once_give_every_watcher_one_history() {
    const WRITERS: usize = 4;
    const ROUNDS: usize = 6;
    let (url, keys) = database().await;
    let first = replica(&url, &keys).await;
    let (second, third) = tokio::join!(replica(&url, &keys), replica(&url, &keys));
    let replicas = [first, second, third];
    // The monitor is off (`test_config`): every change is a writer's.
    let mut watchers = Vec::new();
    for app in &replicas {
        watchers.push(Watcher::open(&mut app.new_client().await).await);
    }

    let ledger = Ledger::default();
    let (_stop, never) = tokio::sync::watch::channel(false);
    let mut writers = tokio::task::JoinSet::new();
    for app in &replicas {
        for _ in 0..WRITERS {
            let client = app.new_client().await;
            writers.spawn(write(client, ROUNDS, never.clone(), ledger.clone()));
        }
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap().expect("every write is answered");
    }
    let mut acked = ledger.acked();
    assert_eq!(
        acked.len(),
        replicas.len() * WRITERS * ROUNDS * (1 + ROUND.len())
    );
    acked.sort();
    let last = acked.last().unwrap().revision;

    for (i, w) in watchers.iter_mut().enumerate() {
        w.reached(last).await;
        let seen = w.changes();
        let what = format!("the watcher on replica {i}");
        // Nothing but the acknowledged writes, each once, in revision order.
        assert_same(&seen, &acked, &what);
        assert_gapless(&seen, &what);
    }
    for app in replicas {
        app.stop().await.unwrap();
    }
}
