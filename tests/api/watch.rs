//! Watch: snapshot, resume, filters, compaction, slow watchers, bookmarks,
//! restarts and shutdown.

use crate::common::*;
use std::time::Duration;
use tether::pb::tether::v1 as pb;
use tonic::Code;
use tonic::Streaming;

type W = pb::WatchEventType;

async fn watch(
    c: &mut Client,
    req: pb::WatchConnectionsRequest,
) -> Result<Streaming<pb::WatchConnectionsResponse>, tonic::Status> {
    c.watch_connections(req).await.map(|r| r.into_inner())
}

/// The next message, failing the test if none comes within 10 s.
async fn next(s: &mut Streaming<pb::WatchConnectionsResponse>) -> pb::WatchConnectionsResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a message within 10 s")
        .expect("no stream error")
        .expect("stream still open")
}

fn kind(m: &pb::WatchConnectionsResponse) -> W {
    W::try_from(m.r#type).unwrap()
}

fn id(m: &pb::WatchConnectionsResponse) -> &str {
    &m.connection.as_ref().unwrap().id
}

#[tokio::test]
async fn snapshot_then_synced_then_live_changes() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let a = create(&mut c, conn("http", "")).await;
    let b = create(&mut c, conn("tcp", "")).await;
    let gone = create(&mut c, conn("tcp", "")).await;
    transition(&mut c, &gone.id, S::Deleted).await.unwrap();

    let mut s = watch(&mut c, pb::WatchConnectionsRequest::default())
        .await
        .unwrap();
    let m1 = next(&mut s).await;
    let m2 = next(&mut s).await;
    assert_eq!((kind(&m1), id(&m1)), (W::Added, a.id.as_str()));
    assert_eq!((kind(&m2), id(&m2)), (W::Added, b.id.as_str()));
    assert!(m1.event.is_none(), "snapshot items are not events");
    let synced = next(&mut s).await;
    assert_eq!(
        (kind(&synced), synced.revision),
        (W::Synced, 4),
        "tombstones are not in the snapshot"
    );

    let moved = transition(&mut c, &a.id, S::Ignored).await.unwrap();
    let m = next(&mut s).await;
    assert_eq!(
        (kind(&m), id(&m), m.revision),
        (W::Modified, a.id.as_str(), moved.revision)
    );
    let e = m.event.unwrap();
    assert_eq!(
        (e.from_state, e.to_state, e.r#type),
        (
            S::Discovered as i32,
            S::Ignored as i32,
            pb::EventType::Transitioned as i32
        )
    );
    assert_eq!(m.connection.unwrap(), moved);

    let fresh = create(&mut c, conn("grafana", "")).await;
    let m = next(&mut s).await;
    assert_eq!((kind(&m), id(&m)), (W::Added, fresh.id.as_str()));
    transition(&mut c, &b.id, S::Deleted).await.unwrap();
    let m = next(&mut s).await;
    assert_eq!(
        (kind(&m), id(&m)),
        (W::Removed, b.id.as_str()),
        "deletion removes it from view"
    );
    assert_eq!(m.connection.unwrap().state, S::Deleted as i32);
}

#[tokio::test]
async fn resume_delivers_every_later_change_once_in_order() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let a = create(&mut c, conn("http", "")).await;
    let mark = a.revision;
    let b = create(&mut c, conn("http", "")).await;
    transition(&mut c, &a.id, S::Ignored).await.unwrap();
    moved(&mut c, &b.id, S::Registered).await;
    let mut s = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            after_revision: mark,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    loop {
        let m = next(&mut s).await;
        if kind(&m) == W::Synced {
            assert_eq!(m.revision, 4);
            break;
        }
        got.push((kind(&m), m.revision));
    }
    assert_eq!(got, [(W::Added, 2), (W::Modified, 3), (W::Modified, 4)]);
    let later = transition(&mut c, &b.id, S::Deleted).await.unwrap();
    let m = next(&mut s).await;
    assert_eq!((kind(&m), m.revision), (W::Removed, later.revision));

    // Out of range either way.
    let future = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            after_revision: 99,
            ..Default::default()
        },
    )
    .await;
    assert_error(future, Code::OutOfRange, "REVISION_IN_FUTURE");
    let negative = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            after_revision: -1,
            ..Default::default()
        },
    )
    .await;
    assert_error(negative, Code::InvalidArgument, "INVALID_ARGUMENT");
}

#[tokio::test]
async fn filters_report_entering_as_added_and_leaving_as_removed() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let x = create(&mut c, conn("prometheus", "")).await;
    let other = create(&mut c, conn("grafana", "")).await;
    let mut s = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            kinds: vec!["prometheus".into()],
            states: vec![S::Ignored as i32, S::Registered as i32],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(kind(&next(&mut s).await), W::Synced, "nothing matches yet");
    transition(&mut c, &other.id, S::Ignored).await.unwrap(); // wrong kind: unseen
    transition(&mut c, &x.id, S::Ignored).await.unwrap(); // enters
    moved(&mut c, &x.id, S::Registered).await; // stays
    transition(&mut c, &x.id, S::Maintenance).await.unwrap(); // leaves
    let seen: Vec<(W, String)> = [next(&mut s).await, next(&mut s).await, next(&mut s).await]
        .iter()
        .map(|m| (kind(m), id(m).to_owned()))
        .collect();
    assert_eq!(
        seen,
        [
            (W::Added, x.id.clone()),
            (W::Modified, x.id.clone()),
            (W::Removed, x.id.clone())
        ]
    );

    // By id, and tombstones only when DELETED is asked for.
    let mut by_id = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            ids: vec![x.id.clone()],
            states: vec![S::Deleted as i32],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(kind(&next(&mut by_id).await), W::Synced);
    transition(&mut c, &other.id, S::Deleted).await.unwrap();
    transition(&mut c, &x.id, S::Deleted).await.unwrap();
    let m = next(&mut by_id).await;
    assert_eq!((kind(&m), id(&m)), (W::Added, x.id.as_str()));
    let bad = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            ids: vec!["x".into()],
            ..Default::default()
        },
    )
    .await;
    assert_error(bad, Code::InvalidArgument, "INVALID_ARGUMENT");
}

#[tokio::test]
async fn pruned_history_is_out_of_range() {
    let app = App::start_with(|cfg| cfg.event_retention_count = 3).await;
    let mut c = app.client.clone();
    let x = create(&mut c, conn("http", "")).await;
    for s in [
        S::Ignored,
        S::Registered,
        S::Maintenance,
        S::Ignored,
        S::Registered,
    ] {
        moved(&mut c, &x.id, s).await;
    }
    // Revisions 1..=6; only the last 3 are kept.
    let r = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            after_revision: 1,
            ..Default::default()
        },
    )
    .await;
    let meta = assert_error(r, Code::OutOfRange, "REVISION_COMPACTED");
    assert_eq!(meta["compact_revision"], "3");
    let mut s = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            after_revision: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let revs: Vec<i64> = [next(&mut s).await, next(&mut s).await, next(&mut s).await]
        .iter()
        .map(|m| m.revision)
        .collect();
    assert_eq!(revs, [4, 5, 6]);
    let history = c
        .list_connection_events(pb::ListConnectionEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.compact_revision, 3);
    assert_eq!(history.events.len(), 3);
    // A snapshot watch still works: it needs no history.
    let mut s = watch(&mut c, pb::WatchConnectionsRequest::default())
        .await
        .unwrap();
    assert_eq!(kind(&next(&mut s).await), W::Added);
    assert_eq!(next(&mut s).await.revision, 6);
}

#[tokio::test]
async fn a_slow_watcher_catches_up_without_losing_or_repeating_anything() {
    // A tiny live ring and stream buffer force the watcher off the ring and
    // back to the store while it is not reading.
    let app = App::start_with(|cfg| {
        cfg.watch_ring = 2;
        cfg.watch_buffer = 1;
    })
    .await;
    let mut c = app.client.clone();
    let mut s = watch(&mut c, pb::WatchConnectionsRequest::default())
        .await
        .unwrap();
    assert_eq!(kind(&next(&mut s).await), W::Synced);
    let mut fast = watch(&mut c, pb::WatchConnectionsRequest::default())
        .await
        .unwrap();
    assert_eq!(kind(&next(&mut fast).await), W::Synced);
    let writes = 300;
    let writer = {
        let mut c = c.clone();
        tokio::spawn(async move {
            for _ in 0..writes {
                create(&mut c, conn("http", "")).await;
            }
        })
    };
    // One watcher keeps up while the other does not read at all.
    for want in 1..=writes {
        assert_eq!(next(&mut fast).await.revision, want);
    }
    writer.await.unwrap();
    for want in 1..=writes {
        let m = next(&mut s).await;
        assert_eq!((kind(&m), m.revision), (W::Added, want));
    }
}

#[tokio::test]
async fn idle_watchers_that_ask_get_bookmarks() {
    let app = App::start_with(|cfg| cfg.bookmark_interval = Duration::from_millis(50)).await;
    let mut c = app.client.clone();
    create(&mut c, conn("http", "")).await;
    let mut s = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            progress_notify: true,
            kinds: vec!["grafana".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(kind(&next(&mut s).await), W::Synced);
    create(&mut c, conn("http", "")).await; // filtered out, but still progress
    loop {
        let m = next(&mut s).await;
        assert_eq!(kind(&m), W::Bookmark);
        if m.revision == 2 {
            break;
        }
        assert_eq!(m.revision, 1);
    }
}

#[tokio::test]
async fn resume_works_across_a_restart() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let x = create(&mut c, conn("http", "")).await;
    let mark = x.revision;
    transition(&mut c, &x.id, S::Ignored).await.unwrap();
    let dir = app.dir.clone();
    app.stop().await.expect("clean stop");

    let app = App::start_in(dir, |_| {}).await;
    let mut c = app.client.clone();
    moved(&mut c, &x.id, S::Registered).await;
    let mut s = watch(
        &mut c,
        pb::WatchConnectionsRequest {
            after_revision: mark,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let got: Vec<(W, i64, i32)> = [next(&mut s).await, next(&mut s).await]
        .iter()
        .map(|m| (kind(m), m.revision, m.event.as_ref().unwrap().to_state))
        .collect();
    assert_eq!(
        got,
        [
            (W::Modified, 2, S::Ignored as i32),
            (W::Modified, 3, S::Registered as i32)
        ]
    );
    assert_eq!((kind(&next(&mut s).await)), W::Synced);
    let fresh = create(&mut c, conn("http", "")).await;
    assert_eq!(fresh.revision, 4, "revisions continue after a restart");
}

#[tokio::test]
async fn shutdown_ends_watch_streams_with_unavailable_and_health_goes_not_serving() {
    // A grace period far longer than App::stop waits: shutdown must not need it.
    let mut app = App::start_with(|cfg| cfg.shutdown_grace = Duration::from_secs(600)).await;
    let mut c = app.client.clone();
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let check = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tether.v1.ConnectionService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        check.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut hw = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "tether.v1.ConnectionService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hw.message().await.unwrap().unwrap().status, 1);

    let mut watchers = Vec::new();
    for _ in 0..3 {
        let mut s = watch(&mut c, pb::WatchConnectionsRequest::default())
            .await
            .unwrap();
        assert_eq!(kind(&next(&mut s).await), W::Synced);
        watchers.push(s);
    }
    app.begin_stop();
    let not_serving = tokio::time::timeout(Duration::from_secs(10), hw.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        not_serving.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    for mut s in watchers {
        let end = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("the stream ends promptly");
        let status = end.expect_err("ends with an error status");
        assert_eq!(status.code(), Code::Unavailable);
    }
    app.stop()
        .await
        .expect("run returns Ok after a graceful shutdown");
}

#[tokio::test]
async fn hundreds_of_watchers_all_see_every_change() {
    let app = App::start().await;
    let mut c = app.client.clone();
    let mut streams = Vec::new();
    for _ in 0..200 {
        let mut s = watch(&mut c, pb::WatchConnectionsRequest::default())
            .await
            .unwrap();
        assert_eq!(kind(&next(&mut s).await), W::Synced);
        streams.push(s);
    }
    let x = create(&mut c, conn("http", "")).await;
    transition(&mut c, &x.id, S::Ignored).await.unwrap();
    for s in &mut streams {
        let a = next(s).await;
        let b = next(s).await;
        assert_eq!(
            (kind(&a), a.revision, kind(&b), b.revision),
            (W::Added, 1, W::Modified, 2)
        );
    }
}

#[tokio::test]
async fn a_watcher_that_falls_out_of_history_is_told_so() {
    // A tiny live ring, a one-message buffer and a short history: a watcher
    // that does not read falls behind all three while the writers go on.
    let app = App::start_with(|cfg| {
        cfg.watch_ring = 2;
        cfg.watch_buffer = 1;
        cfg.event_retention_count = 5;
    })
    .await;
    let mut c = app.client.clone();
    let mut s = watch(&mut c, pb::WatchConnectionsRequest::default())
        .await
        .unwrap();
    assert_eq!(kind(&next(&mut s).await), W::Synced);
    let mut writers = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..400 {
                create(&mut c, conn("http", "")).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // Whatever was delivered came in order without gaps; then the stream
    // ends with REVISION_COMPACTED, never with a plain end of stream.
    let mut expected = 1;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("the stream goes on or ends")
        {
            Ok(Some(m)) => {
                assert_eq!((kind(&m), m.revision), (W::Added, expected));
                expected += 1;
            }
            Ok(None) => panic!(
                "the stream ended without saying why after revision {}",
                expected - 1
            ),
            Err(status) => break status,
        }
    };
    assert!(expected <= 3200 - 5, "the watcher really fell behind");
    let (code, reason, _) = error_info(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::OutOfRange, "REVISION_COMPACTED")
    );
}

#[tokio::test]
async fn retention_keeps_a_tombstones_last_event() {
    let app = App::start_with(|cfg| cfg.event_retention_count = 3).await;
    let mut c = app.client.clone();
    let x = create(&mut c, conn("http", "")).await;
    c.transition_connection(pb::TransitionConnectionRequest {
        id: x.id.clone(),
        target_state: S::Deleted as i32,
        reason: "decommissioned".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    // Far more events than are kept, all about another connection.
    let y = create(&mut c, conn("http", "")).await;
    for _ in 0..4 {
        moved(&mut c, &y.id, S::Ignored).await;
        moved(&mut c, &y.id, S::Registered).await;
    }
    let history = events_of(&mut c, &x.id).await;
    let last = history
        .last()
        .expect("the tombstone's latest event is kept");
    assert_eq!(history.len(), 1, "older ones are pruned");
    assert_eq!(last.to_state, S::Deleted as i32);
    assert_eq!(last.trigger, pb::Trigger::User as i32);
    assert_eq!(last.reason, "decommissioned");
    assert!(!last.actor.is_empty());
    assert!(last.time.is_some());
    // y keeps only the recent window (its latest is in it).
    let kept = events_of(&mut c, &y.id).await;
    assert_eq!(kept.len(), 3, "{kept:?}");
}

/// A connection carrying `bytes` of metadata.
fn heavy(bytes: usize) -> pb::Connection {
    pb::Connection {
        metadata: Some(prost_types::Struct {
            fields: [(
                "blob".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("x".repeat(bytes))),
                },
            )]
            .into(),
        }),
        ..conn("tcp", "")
    }
}

#[tokio::test]
async fn a_snapshot_read_in_pages_shows_one_moment() {
    // Pages of 5 and rows too large for the stream's flow-control window to
    // take them all: most pages are read after the changes below commit.
    let app = App::start_with(|cfg| cfg.watch_replay_page = 5).await;
    let mut c = app.client.clone();
    let mut before = Vec::new();
    for _ in 0..60 {
        before.push(create(&mut c, heavy(4096)).await.id);
    }
    let at = before.len() as i64;
    let mut s = watch(&mut c, pb::WatchConnectionsRequest::default())
        .await
        .unwrap();
    // The first row is out, so the snapshot's view is fixed.
    let first = next(&mut s).await;
    assert_eq!((kind(&first), id(&first)), (W::Added, before[0].as_str()));
    // Meanwhile: one deleted, one changed, one created (on another connection,
    // so the unread watch cannot hold up the answers).
    let mut other = app.new_client().await;
    transition(&mut other, &before[59], S::Deleted)
        .await
        .unwrap();
    transition(&mut other, &before[58], S::Ignored)
        .await
        .unwrap();
    let late = create(&mut other, heavy(10)).await;

    let mut seen = vec![id(&first).to_owned()];
    loop {
        let m = next(&mut s).await;
        if kind(&m) == W::Synced {
            assert_eq!(m.revision, at, "the snapshot is as of its first read");
            break;
        }
        assert_eq!(kind(&m), W::Added);
        let c = m.connection.as_ref().unwrap();
        assert!(c.revision <= at, "{} shows a later change", c.id);
        assert_eq!(c.state, S::Discovered as i32);
        seen.push(c.id.clone());
    }
    assert_eq!(
        seen, before,
        "every connection of that moment, once, in order"
    );
    // Then the changes, live, in order.
    let m = next(&mut s).await;
    assert_eq!(
        (kind(&m), id(&m), m.revision),
        (W::Removed, before[59].as_str(), at + 1)
    );
    let m = next(&mut s).await;
    assert_eq!(
        (kind(&m), id(&m), m.revision),
        (W::Modified, before[58].as_str(), at + 2)
    );
    let m = next(&mut s).await;
    assert_eq!(
        (kind(&m), id(&m), m.revision),
        (W::Added, late.id.as_str(), at + 3)
    );
}

/// A real server with a small watch budget and short limits, and two clients
/// on separate connections: one to watch, one to write.
async fn tight_server(args: &[&str]) -> (Binary, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut all = vec![
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
        "--disable-monitor",
        "--rate-limit",
        "0",
    ];
    all.extend_from_slice(args);
    let p = Binary::serve(&all).await;
    (p, dir)
}

#[tokio::test]
async fn a_watcher_that_stops_reading_is_ended_with_where_to_resume() {
    let (mut p, _dir) =
        tight_server(&["--watch-memory", "256KiB", "--watch-stall-timeout", "300ms"]).await;
    let mut writer = p.client().await;
    create(&mut writer, conn("tcp", "")).await;
    let mut watcher = small_window_client(&p).await;
    let mut s = watch(&mut watcher, pb::WatchConnectionsRequest::default())
        .await
        .unwrap();
    assert_eq!(kind(&next(&mut s).await), W::Added);
    assert_eq!(next(&mut s).await.revision, 1, "SYNCED at 1");
    // 100 changes of 16 KiB: far more than the budget and the stream's
    // flow-control window together, while the watcher reads nothing.
    let changes = 100;
    for _ in 0..changes {
        create(&mut writer, heavy(16 * 1024)).await;
    }
    p.logged("watcher fell too far behind").await;

    // What was already on its way arrives, then the status.
    let mut got = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("a message within 10 s")
        {
            Ok(Some(m)) => got.push(m.revision),
            Ok(None) => panic!("a watch never ends without a status"),
            Err(status) => break status,
        }
    };
    let (code, reason, meta) = error_info(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::ResourceExhausted, "WATCH_TOO_SLOW")
    );
    let resume: i64 = meta["resume_after_revision"].parse().unwrap();
    assert_eq!(resume, got.last().copied().unwrap_or(1), "{status:?}");
    assert!(
        (got.len() as i64) < changes,
        "ended before it had everything ({} of {changes})",
        got.len()
    );

    // Resuming there delivers the rest, each once, in order.
    let mut s = watch(
        &mut watcher,
        pb::WatchConnectionsRequest {
            after_revision: resume,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let last = changes + 1;
    while got.last().copied().unwrap_or(1) < last {
        let m = next(&mut s).await;
        if kind(&m) != W::Synced {
            got.push(m.revision);
        }
    }
    assert_eq!(got, (2..=last).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_snapshot_not_taken_in_time_ends_the_watch() {
    let (mut p, _dir) = tight_server(&[
        "--watch-memory",
        "256KiB",
        "--watch-snapshot-timeout",
        "300ms",
        "--watch-replay-page",
        "2",
    ])
    .await;
    let mut writer = p.client().await;
    for _ in 0..100 {
        create(&mut writer, heavy(16 * 1024)).await;
    }
    let mut watcher = small_window_client(&p).await;
    let mut s = watch(&mut watcher, pb::WatchConnectionsRequest::default())
        .await
        .unwrap();
    p.logged("watcher fell too far behind").await;
    let status = loop {
        match next_or_status(&mut s).await {
            Ok(m) => assert_eq!(kind(&m), W::Added, "never SYNCED"),
            Err(status) => break status,
        }
    };
    let (code, reason, meta) = error_info(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::ResourceExhausted, "WATCH_TOO_SLOW")
    );
    assert_eq!(meta["resume_after_revision"], "0", "a new snapshot");
    assert!(status.message().contains("snapshot"), "{status:?}");
    // Writes went on meanwhile: the read view was let go.
    create(&mut writer, conn("tcp", "")).await;
}

/// A client whose HTTP/2 windows are small (64 KiB), so a stream it does not
/// read soon stops the server from sending.
async fn small_window_client(p: &Binary) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", p.addr()))
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .unwrap();
    tether::pb::tether::v1::connection_service_client::ConnectionServiceClient::new(channel)
}

/// The next message or the stream's status, within 10 s.
async fn next_or_status(
    s: &mut Streaming<pb::WatchConnectionsResponse>,
) -> Result<pb::WatchConnectionsResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a message within 10 s")
        .map(|m| m.expect("a watch never ends without a status"))
}

#[tokio::test]
async fn watchers_share_a_change_but_each_gets_its_own_view_of_it() {
    // Watchers on one HTTP/2 connection are sent one encoding of the change
    // with their own type in front: each must decode to the same connection
    // and event, as the server reports them elsewhere, under its own type.
    let app = App::start().await;
    let mut c = app.client.clone();
    let x = create(&mut c, heavy(60 * 1024)).await;
    moved(&mut c, &x.id, S::Registered).await;
    use prost::Message as _;
    let views = [
        (vec![], W::Modified),
        (vec![S::Registered as i32], W::Removed),
        (vec![S::Ignored as i32], W::Added),
        (vec![S::Connected as i32], W::Unspecified),
    ];
    let mut streams = Vec::new();
    for (states, _) in &views {
        let mut s = watch(
            &mut c,
            pb::WatchConnectionsRequest {
                after_revision: 2,
                states: states.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(kind(&next(&mut s).await), W::Synced);
        streams.push(s);
    }
    let after = transition(&mut c, &x.id, S::Ignored).await.unwrap();
    let event = events_of(&mut c, &x.id).await.pop().unwrap();
    assert_eq!(event.revision, after.revision);
    // A later change the CONNECTED view sees: as it is not sent the first
    // change, this comes to it first.
    let marker = create(&mut c, conn("tcp", "")).await;
    moved(&mut c, &marker.id, S::Registered).await;
    moved(&mut c, &marker.id, S::Connected).await;
    for ((_, want), s) in views.iter().zip(&mut streams) {
        let m = next(s).await;
        if *want == W::Unspecified {
            assert_ne!(id(&m), x.id, "a change outside the view is not sent");
            continue;
        }
        assert_eq!((kind(&m), m.revision), (*want, after.revision));
        assert_eq!(m.connection.as_ref(), Some(&after));
        assert_eq!(m.event.as_ref(), Some(&event));
        assert!(m.encoded_len() > 60 * 1024, "the whole connection came");
    }
}

#[tokio::test]
async fn bursts_from_many_writers_reach_every_watcher_once_in_order() {
    // Writers on their own connections commit faster than one event per
    // watcher wake: each watcher takes them in batches, and must still see
    // every revision once, in order, with its filter applied per event.
    let app = App::start().await;
    let mut c = app.client.clone();
    let mut all = Vec::new();
    let mut http_only = Vec::new();
    for _ in 0..5 {
        let mut s = watch(&mut c, pb::WatchConnectionsRequest::default())
            .await
            .unwrap();
        assert_eq!(kind(&next(&mut s).await), W::Synced);
        all.push(s);
        let mut s = watch(
            &mut c,
            pb::WatchConnectionsRequest {
                kinds: vec!["http".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(kind(&next(&mut s).await), W::Synced);
        http_only.push(s);
    }
    let (writers, each) = (8, 50);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut c = app.new_client().await;
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for _ in 0..each {
                let kind = if w % 2 == 0 { "http" } else { "tcp" };
                made.push((create(&mut c, conn(kind, "")).await, kind));
            }
            made
        }));
    }
    let mut http_revisions = Vec::new();
    for t in tasks {
        for (made, kind) in t.await.unwrap() {
            if kind == "http" {
                http_revisions.push(made.revision);
            }
        }
    }
    http_revisions.sort();
    let total = writers * each;
    for s in &mut all {
        let got: Vec<i64> = {
            let mut got = Vec::new();
            for _ in 0..total {
                got.push(next(s).await.revision);
            }
            got
        };
        assert_eq!(got, (1..=total as i64).collect::<Vec<_>>());
    }
    for s in &mut http_only {
        let mut got = Vec::new();
        for _ in 0..http_revisions.len() {
            let m = next(s).await;
            assert_eq!(m.connection.unwrap().kind, "http");
            got.push(m.revision);
        }
        assert_eq!(got, http_revisions);
    }
}
