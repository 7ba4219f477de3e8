//! Background monitoring through the API: the monitor runs with a short
//! interval against real loopback peers, and the tests follow what it does on
//! a watch stream. Peers count the requests they get, so "no longer probed"
//! is checked against a control connection that still is, not against time.

use crate::common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;
use tether::pb::tether::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Streaming;

/// An HTTP peer whose answer can be changed, and which counts requests.
struct Peer {
    addr: std::net::SocketAddr,
    status: Arc<AtomicU16>,
    requests: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Peer {
    async fn new(status: u16) -> Peer {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(status));
        let (count_tx, requests) = watch::channel(0usize);
        let count = Arc::new(AtomicUsize::new(0));
        let answer = status.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (answer, count, count_tx) = (answer.clone(), count.clone(), count_tx.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let code = answer.load(Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                    let _ = s.shutdown().await;
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = count_tx.send(n);
                });
            }
        });
        Peer {
            addr,
            status,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn answer(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    fn count(&self) -> usize {
        *self.requests.borrow()
    }

    /// Waits until this peer has had `more` further requests.
    async fn requests_more(&mut self, more: usize) {
        let target = self.count() + more;
        tokio::time::timeout(
            Duration::from_secs(20),
            self.requests.wait_for(|n| *n >= target),
        )
        .await
        .expect("the peer keeps being probed")
        .unwrap();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn monitored_app() -> App {
    App::start_with(|cfg| {
        cfg.disable_monitor = false;
        cfg.probe_interval = Duration::from_millis(50);
        cfg.probe_failure_threshold = 2;
        cfg.verify_timeout = Duration::from_secs(2);
    })
    .await
}

async fn watch_one(c: &mut Client, id: &str) -> Streaming<pb::WatchConnectionsResponse> {
    // From the connection's creation on, so no change is missed however fast
    // the monitor is.
    let created = events_of(c, id).await[0].revision;
    c.watch_connections(pb::WatchConnectionsRequest {
        ids: vec![id.into()],
        after_revision: created,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// The next change of the watched connection (SYNCED is passed over).
async fn next_event(s: &mut Streaming<pb::WatchConnectionsResponse>) -> pb::ConnectionEvent {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), s.message())
            .await
            .expect("a change within 20 s")
            .expect("no stream error")
            .expect("stream open");
        if let Some(e) = m.event {
            return e;
        }
    }
}

fn step(e: &pb::ConnectionEvent) -> (i32, i32, i32) {
    (e.from_state, e.to_state, e.trigger)
}

const SYSTEM: i32 = pb::Trigger::System as i32;
const USER: i32 = pb::Trigger::User as i32;

#[tokio::test]
async fn the_monitor_registers_disconnects_and_reconnects() {
    let app = monitored_app().await;
    let mut c = app.client.clone();
    let peer = Peer::new(200).await;
    let x = create(&mut c, conn("http", &peer.url())).await;
    let mut s = watch_one(&mut c, &x.id).await;

    // Verified once by itself: DISCOVERED -> REGISTERED.
    let e = next_event(&mut s).await;
    assert_eq!(
        step(&e),
        (S::Discovered as i32, S::Registered as i32, SYSTEM)
    );
    assert_eq!(e.actor, "tether");
    transition(&mut c, &x.id, S::Connected).await.unwrap();
    assert_eq!(
        step(&next_event(&mut s).await),
        (S::Registered as i32, S::Connected as i32, USER)
    );

    // The peer fails: after two failed probes in a row, DISCONNECTED, saying why.
    peer.answer(503);
    let e = next_event(&mut s).await;
    assert_eq!(
        step(&e),
        (S::Connected as i32, S::Disconnected as i32, SYSTEM)
    );
    assert!(
        e.reason.contains("503") && e.reason.contains("2 failed probes"),
        "{}",
        e.reason
    );
    let down = get(&mut c, &x.id).await;
    let probe = down
        .last_probe
        .expect("the probe result is on the connection");
    assert_eq!(probe.outcome, pb::ProbeOutcome::Unreachable as i32);
    assert!(probe.consecutive_failures >= 2);

    // It recovers: CONNECTED again, because the server disconnected it.
    peer.answer(200);
    let e = next_event(&mut s).await;
    assert_eq!(
        step(&e),
        (S::Disconnected as i32, S::Connected as i32, SYSTEM)
    );
}

#[tokio::test]
async fn healthy_probes_update_the_result_without_events() {
    let app = monitored_app().await;
    let mut c = app.client.clone();
    let mut peer = Peer::new(200).await;
    let x = create_in(&mut c, conn("http", &peer.url()), S::Connected, false).await;
    peer.requests_more(4).await;
    let later = get(&mut c, &x.id).await;
    assert_eq!(
        later.revision, x.revision,
        "nothing changed, so nothing was recorded"
    );
    let probe = later.last_probe.expect("probed");
    assert_eq!(probe.outcome, pb::ProbeOutcome::Reachable as i32);
    assert_eq!(probe.consecutive_failures, 0);
    assert!(probe.message.contains("200"), "{}", probe.message);
    assert!(probe.latency.is_some());
}

#[tokio::test]
async fn maintenance_unmanaged_and_user_disconnected_are_left_alone() {
    let app = monitored_app().await;
    let mut c = app.client.clone();
    let mut control = Peer::new(200).await;
    create_in(&mut c, conn("http", &control.url()), S::Connected, false).await;

    let maintained = Peer::new(200).await;
    let m = create_in(&mut c, conn("http", &maintained.url()), S::Connected, false).await;
    let m = transition(&mut c, &m.id, S::Maintenance).await.unwrap();

    let unmanaged = Peer::new(200).await;
    let u = create(
        &mut c,
        pb::Connection {
            managed: Some(false),
            ..conn("http", &unmanaged.url())
        },
    )
    .await;

    let user_down = Peer::new(200).await;
    let d = create_in(&mut c, conn("http", &user_down.url()), S::Connected, false).await;
    let d = transition(&mut c, &d.id, S::Disconnected).await.unwrap();

    // Let any probe that started before those changes finish, then watch the
    // control connection get probed while the others are not.
    control.requests_more(2).await;
    let before = (maintained.count(), unmanaged.count(), user_down.count());
    control.requests_more(4).await;
    assert_eq!(
        (maintained.count(), unmanaged.count(), user_down.count()),
        before
    );
    assert_eq!(
        unmanaged.count(),
        0,
        "an unmanaged connection is never probed"
    );
    assert_eq!(get(&mut c, &m.id).await.revision, m.revision);
    assert_eq!(get(&mut c, &u.id).await.state, S::Discovered as i32);
    assert_eq!(
        get(&mut c, &d.id).await.revision,
        d.revision,
        "a user's DISCONNECTED stays"
    );
}

#[tokio::test]
async fn first_verification_outcomes_follow_the_table() {
    let app = monitored_app().await;
    let mut c = app.client.clone();

    // A kind that auto-connects goes on to CONNECTED.
    let provider = Peer::new(200).await;
    let auto = create(&mut c, conn("meshery", &provider.url())).await;
    let mut s = watch_one(&mut c, &auto.id).await;
    assert_eq!(
        step(&next_event(&mut s).await),
        (S::Discovered as i32, S::Registered as i32, SYSTEM)
    );
    assert_eq!(
        step(&next_event(&mut s).await),
        (S::Registered as i32, S::Connected as i32, SYSTEM)
    );

    // Credentials rejected: DISCONNECTED.
    let denied = Peer::new(401).await;
    let x = create(&mut c, conn("http", &denied.url())).await;
    let mut s = watch_one(&mut c, &x.id).await;
    let e = next_event(&mut s).await;
    assert_eq!(
        step(&e),
        (S::Discovered as i32, S::Disconnected as i32, SYSTEM)
    );
    assert!(e.reason.contains("401"), "{}", e.reason);

    // Unreachable: NOT_FOUND, and not probed after that.
    let closed = ClosedPort::new();
    let y = create(&mut c, conn("tcp", &closed.url())).await;
    let mut s = watch_one(&mut c, &y.id).await;
    let e = next_event(&mut s).await;
    assert_eq!(step(&e), (S::Discovered as i32, S::NotFound as i32, SYSTEM));
}

#[tokio::test]
async fn grpc_kinds_are_checked_with_the_health_protocol() {
    let app = monitored_app().await;
    let mut c = app.client.clone();
    // The Tether server itself is a gRPC server with health: use it as the peer.
    let target = format!("grpc://{}", app.channel_addr());
    let x = create(&mut c, conn("grpc", &target)).await;
    let mut s = watch_one(&mut c, &x.id).await;
    let e = next_event(&mut s).await;
    assert_eq!(
        step(&e),
        (S::Discovered as i32, S::Registered as i32, SYSTEM)
    );
}

#[tokio::test]
async fn one_disconnected_before_use_comes_back_registered_not_connected() {
    let app = monitored_app().await;
    let mut c = app.client.clone();
    // Credentials rejected at its first verification: DISCONNECTED (SYSTEM).
    let mut peer = Peer::new(401).await;
    let x = create(&mut c, conn("http", &peer.url())).await;
    let mut s = watch_one(&mut c, &x.id).await;
    assert_eq!(
        step(&next_event(&mut s).await),
        (S::Discovered as i32, S::Disconnected as i32, SYSTEM)
    );
    // Accepted again: back to REGISTERED, where it was going, not CONNECTED.
    peer.answer(200);
    let e = next_event(&mut s).await;
    assert_eq!(
        step(&e),
        (S::Disconnected as i32, S::Registered as i32, SYSTEM)
    );
    // And it stays there while it keeps being probed: nobody took it into use.
    peer.requests_more(3).await;
    let now = get(&mut c, &x.id).await;
    assert_eq!(now.state, S::Registered as i32);
    assert_eq!(now.revision, e.revision);
}

#[tokio::test]
async fn registered_moves_only_after_the_failure_threshold() {
    let app = monitored_app().await;
    let mut c = app.client.clone();

    // Unreachable: NOT_FOUND only after two failed probes in a row.
    let peer = Peer::new(200).await;
    let x = create(&mut c, conn("http", &peer.url())).await;
    let mut s = watch_one(&mut c, &x.id).await;
    assert_eq!(
        step(&next_event(&mut s).await),
        (S::Discovered as i32, S::Registered as i32, SYSTEM)
    );
    peer.answer(503);
    let e = next_event(&mut s).await;
    assert_eq!(step(&e), (S::Registered as i32, S::NotFound as i32, SYSTEM));
    assert!(e.reason.contains("2 failed probes"), "{}", e.reason);
    let gone = get(&mut c, &x.id).await;
    assert!(gone.last_probe.expect("probed").consecutive_failures >= 2);

    // Credentials rejected: DISCONNECTED after the threshold too, and back to
    // REGISTERED (where the server found it) once they are accepted again.
    let peer = Peer::new(200).await;
    let y = create(&mut c, conn("http", &peer.url())).await;
    let mut s = watch_one(&mut c, &y.id).await;
    assert_eq!(
        step(&next_event(&mut s).await),
        (S::Discovered as i32, S::Registered as i32, SYSTEM)
    );
    peer.answer(401);
    let e = next_event(&mut s).await;
    assert_eq!(
        step(&e),
        (S::Registered as i32, S::Disconnected as i32, SYSTEM)
    );
    assert!(e.reason.contains("2 failed probes"), "{}", e.reason);
    peer.answer(200);
    assert_eq!(
        step(&next_event(&mut s).await),
        (S::Disconnected as i32, S::Registered as i32, SYSTEM)
    );
}
