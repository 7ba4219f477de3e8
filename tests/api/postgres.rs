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

/// Acknowledged writes, as they are acknowledged, and the calls of the
/// writers that failed.
#[derive(Clone, Default)]
struct Ledger {
    acked: Arc<std::sync::Mutex<Vec<Change>>>,
    failed: Arc<std::sync::Mutex<Vec<tonic::Status>>>,
    count: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Ledger {
    fn record(&self, c: Change) {
        self.acked.lock().unwrap().push(c);
        self.count.send_modify(|n| *n += 1);
    }

    fn fail(&self, status: tonic::Status) {
        self.failed.lock().unwrap().push(status);
        self.count.send_modify(|_| {});
    }

    /// Waits until it holds more than `n` writes, failing the test if a
    /// writer's call fails first or nothing more comes by `deadline`.
    async fn beyond(&self, n: usize, deadline: tokio::time::Instant, what: &str) {
        let mut count = self.count.subscribe();
        let failed = || !self.failed.lock().unwrap().is_empty();
        tokio::time::timeout_at(deadline, count.wait_for(|&c| c > n || failed()))
            .await
            .unwrap_or_else(|_| panic!("{what}: {} of {n} by the deadline", self.len()))
            .unwrap();
        assert!(!failed(), "{what}: {:?}", self.failed.lock().unwrap());
    }

    fn acked(&self) -> Vec<Change> {
        self.acked.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        *self.count.borrow()
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
/// into `ledger` as it is answered, and so does a failed call.
async fn write(
    client: Client,
    rounds: usize,
    stop: tokio::sync::watch::Receiver<bool>,
    ledger: Ledger,
) -> Result<(), tonic::Status> {
    let ended = write_rounds(client, rounds, stop, &ledger).await;
    if let Err(status) = &ended {
        ledger.fail(status.clone());
    }
    ended
}

async fn write_rounds(
    mut client: Client,
    rounds: usize,
    stop: tokio::sync::watch::Receiver<bool>,
    ledger: &Ledger,
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

/// A loopback HTTP peer for probes (a [`RoutedHttp`]): answers every
/// request with the status it is set to, and tells of each path it is asked.
struct Peer {
    http: RoutedHttp,
    status: Arc<std::sync::atomic::AtomicU16>,
    paths: tokio::sync::watch::Receiver<Vec<String>>,
}

impl Peer {
    async fn new() -> Peer {
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let (noted, paths) = tokio::sync::watch::channel(Vec::new());
        let answer = status.clone();
        let http = RoutedHttp::new(move |seen| {
            noted.send_modify(|p| p.push(seen.path.clone()));
            answer.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        Peer {
            http,
            status,
            paths,
        }
    }

    fn url(&self, path: &str) -> String {
        self.http.url(path)
    }

    fn answer(&self, code: u16) {
        self.status.store(code, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The background probes `tether serve` ran that found their peer
/// reachable, from its admin listener's `/metrics`.
async fn reachable_probes(admin: std::net::SocketAddr) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("a body");
    text.lines()
        .find_map(|l| l.strip_prefix("tether_probes_total{outcome=\"reachable\"} "))
        .unwrap_or_else(|| panic!("no probe count in {text}"))
        .parse()
        .unwrap()
}

/// `tether serve` over `url` with the shared `key`: probing every 250 ms,
/// a connection DISCONNECTED at its first failed probe, and an admin
/// listener for its metrics.
async fn replica_process(url: &str, key: &std::path::Path) -> Binary {
    let key = key.to_str().unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--db",
        url,
        "--secret-key-file",
        key,
        "--probe-interval",
        "250ms",
        "--probe-failure-threshold",
        "1",
        "--rate-limit",
        "0",
    ];
    Binary::serve_with_env(&args, &[("RUST_LOG", "warn")]).await
}

/// Whether `m` is a connection moved from CONNECTED to DISCONNECTED by a
/// probe that was answered 503.
fn disconnected_by_503(m: &pb::WatchConnectionsResponse) -> bool {
    m.event.as_ref().is_some_and(|e| {
        (e.from_state, e.to_state, e.trigger)
            == (
                S::Connected as i32,
                S::Disconnected as i32,
                pb::Trigger::System as i32,
            )
            && e.reason.contains("503")
    })
}

/// Three `tether serve` processes on one database, writers on each; one is
/// killed with SIGKILL while they write. Every write any replica
/// acknowledged, the dead one's included, is then read back from a survivor
/// at its acknowledged revision or a later one, and the survivors' watchers
/// were sent every one of them, in one gapless history that is the same on
/// both. The dead replica's probes are taken over: it was probing (its
/// metrics say so) when it died, and afterwards every managed connection is
/// probed by a survivor (its peer, turned to failing only once the process
/// was gone, is answered by survivors alone) within 8 s: at most two 2 s
/// shard periods (one, once PostgreSQL has ended the dead session), a 250 ms
/// probe interval, and time to commit the result while the writers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_no_acknowledged_write_and_its_probes_are_taken_over() {
    const MANAGED: usize = 32;
    const WRITERS: usize = 3;
    // Writes the doomed replica acknowledges before it dies, at least.
    const BEFORE_KILL: usize = 30;
    const TAKEOVER: Duration = Duration::from_secs(8);
    let (url, keys) = database().await;
    let key = key_file(&keys, "shared.key");
    let (a, b, doomed) = tokio::join!(
        replica_process(&url, &key),
        replica_process(&url, &key),
        replica_process(&url, &key)
    );
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let mut watchers = [
        Watcher::open(&mut on_a).await,
        Watcher::open(&mut on_b).await,
    ];

    // Managed connections, CONNECTED, each with a path of its own on the
    // peer: probed in the background by whichever replica holds its shard.
    let peer = Peer::new().await;
    let mut managed = std::collections::HashMap::new();
    for i in 0..MANAGED {
        let path = format!("/managed/{i}");
        let c = create_in(
            &mut on_a,
            conn("http", &peer.url(&path)),
            S::Connected,
            true,
        )
        .await;
        managed.insert(c.id, path);
    }

    let (stop, stopping) = tokio::sync::watch::channel(false);
    let ledgers = [Ledger::default(), Ledger::default(), Ledger::default()];
    let mut writers = Vec::new();
    for (replica, ledger) in [&a, &b, &doomed].into_iter().zip(&ledgers) {
        let mut tasks = Vec::new();
        for _ in 0..WRITERS {
            let client = replica.client().await;
            tasks.push(tokio::spawn(write(
                client,
                usize::MAX,
                stopping.clone(),
                ledger.clone(),
            )));
        }
        writers.push(tasks);
    }

    // Under load, wait until the doomed replica has acknowledged writes and
    // probes connections of its own, and every managed connection has been
    // probed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let what = "the doomed replica acknowledges writes";
    ledgers[2].beyond(BEFORE_KILL - 1, deadline, what).await;
    let doomed_admin = doomed.admin.unwrap();
    let mut probed = peer.paths.clone();
    loop {
        let paths: std::collections::HashSet<String> =
            probed.borrow_and_update().iter().cloned().collect();
        if managed.values().all(|p| paths.contains(p)) && reachable_probes(doomed_admin).await > 0.0
        {
            break;
        }
        tokio::time::timeout_at(deadline, probed.changed())
            .await
            .expect("every managed connection probed, some by the doomed replica")
            .unwrap();
    }

    // SIGKILL while every replica's writers are writing.
    let before_kill: Vec<usize> = ledgers.iter().map(Ledger::len).collect();
    doomed.signal("-KILL").await;
    let status = doomed.wait().await;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    // Only a live replica can see this answer: the dead one's probes end here.
    peer.answer(503);
    let killed = tokio::time::Instant::now();
    watchers[0]
        .until(
            killed + TAKEOVER,
            "every managed connection probed by a survivor",
            |seen| {
                let down: std::collections::HashSet<&str> = seen
                    .iter()
                    .filter(|m| disconnected_by_503(m))
                    .map(|m| m.connection.as_ref().unwrap().id.as_str())
                    .collect();
                managed.keys().all(|id| down.contains(id.as_str()))
            },
        )
        .await;

    // Writes went on through the survivors, then stop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (ledger, at_kill) in ledgers[..2].iter().zip(before_kill) {
        let what = "a survivor acknowledges writes after the kill";
        ledger.beyond(at_kill + ROUND.len(), deadline, what).await;
    }
    stop.send_replace(true);
    for (i, tasks) in writers.into_iter().enumerate() {
        for t in tasks {
            let ended = t.await.unwrap();
            if i < 2 {
                ended.expect("a survivor answers every write");
            } else {
                ended.expect_err("the killed replica's writers lose their server");
            }
        }
    }

    let acked: Vec<Change> = ledgers.iter().flat_map(Ledger::acked).collect();
    let last = acked.iter().map(|c| c.revision).max().unwrap();
    let mut histories = Vec::new();
    for (name, w) in ["A", "B"].iter().zip(&mut watchers) {
        w.reached(last).await;
        let seen = w.changes();
        let what = format!("the watcher on survivor {name}");
        assert_gapless(&seen, &what);
        let by_revision: std::collections::HashMap<i64, &Change> =
            seen.iter().map(|c| (c.revision, c)).collect();
        for c in &acked {
            assert_eq!(by_revision.get(&c.revision), Some(&c), "{what}");
        }
        histories.push(seen);
    }
    // One history, of which one of them may have been sent more.
    let common = histories[0].len().min(histories[1].len());
    assert_same(
        &histories[0][..common],
        &histories[1][..common],
        "the survivors' watchers",
    );

    // Each connection reads back at its last acknowledged revision or later
    // (a write in flight at the kill may have committed unanswered).
    let mut latest = std::collections::HashMap::new();
    for c in &acked {
        let at = latest.entry(c.id.clone()).or_insert(c);
        if c.revision > at.revision {
            *at = c;
        }
    }
    for (i, (id, c)) in latest.iter().enumerate() {
        let client = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let now = get(client, id).await;
        assert!(
            now.revision >= c.revision,
            "{id}: r{} < acknowledged r{}",
            now.revision,
            c.revision
        );
        if now.revision == c.revision {
            assert_eq!(now.state, c.state, "{id} at r{}", c.revision);
        }
    }
    drop(watchers);
    a.stop().await;
    b.stop().await;
}
