//! A real full disk under a running server: its database on a small tmpfs,
//! filled by a file of the test's. Writes answer RESOURCE_EXHAUSTED /
//! STORAGE_FULL and apply nothing, health turns NOT_SERVING, reads go on;
//! once the file is deleted the next write commits, health turns SERVING by
//! itself, and every change acknowledged before is still there, also after a
//! restart. Needs root (mount); without it the test says why and skips.

use crate::common::*;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tether::pb::tether::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// A tmpfs mounted for one test; unmounted when dropped, also when the test
/// panics (detached if a server still holds files on it).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` on `path`, or says why it cannot.
    fn mount(path: &Path, bytes: u64) -> Result<Tmpfs, std::io::Error> {
        let target = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in a path");
        let options = CString::new(format!("size={bytes},mode=0700")).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let done = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }

    /// Bytes free for an unprivileged writer.
    fn available(&self) -> u64 {
        let path = CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is NUL-terminated and `stat` has room for the answer.
        let done = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
        assert_eq!(done, 0, "statvfs: {}", std::io::Error::last_os_error());
        // SAFETY: statvfs succeeded, so it filled `stat`.
        let stat = unsafe { stat.assume_init() };
        stat.f_bavail * stat.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `target` is a NUL-terminated path.
        unsafe {
            if libc::umount2(target.as_ptr(), 0) != 0 {
                libc::umount2(target.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// The size of the filesystem the database lives on.
const DISK: u64 = 4 * 1024 * 1024;

/// Room left beside the filler file: a few writes' worth.
const ROOM: u64 = 384 * 1024;

/// A connection whose metadata is about 40 KB, so that a few fill the room.
fn bulky() -> pb::Connection {
    let blob: String = (0..40_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    pb::Connection {
        metadata: Some(json_struct(serde_json::json!({ "blob": blob }))),
        ..conn("http", "")
    }
}

/// The next health status a Watch stream sends, within a bound.
async fn next_status(watch: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
    let got = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("a health change within 30 s")
        .expect("the health stream is open")
        .expect("the health stream goes on");
    ServingStatus::try_from(got.status).expect("a known status")
}

async fn health_now(health: &mut HealthClient<tonic::transport::Channel>) -> ServingStatus {
    let got = health
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers")
        .into_inner();
    ServingStatus::try_from(got.status).expect("a known status")
}

#[tokio::test]
async fn a_full_disk_refuses_writes_and_health_until_space_is_back_and_loses_nothing() {
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let disk = match Tmpfs::mount(dir.path(), DISK) {
        Ok(disk) => disk,
        Err(e) => {
            eprintln!("skipped: cannot mount tmpfs: {e}");
            return;
        }
    };
    let app = App::start_in(dir.clone(), |_| {}).await;
    assert!(
        app.db_path().starts_with(&disk.path),
        "the database is on the small disk"
    );
    let mut c = app.client.clone();
    let mut health = HealthClient::new(app.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .expect("health watch")
        .into_inner();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);

    let mut acknowledged = vec![create(&mut c, bulky()).await];
    // Fill the disk but for a little room.
    let filler = disk.path.join("filler");
    let free = disk.available();
    assert!(free > ROOM, "{free} bytes free on a fresh small disk");
    std::fs::write(&filler, vec![0u8; (free - ROOM) as usize]).expect("write the filler");
    assert!(disk.available() <= ROOM, "the disk is nearly full");

    // Write until the disk is full: every answer is either the write, or
    // RESOURCE_EXHAUSTED / STORAGE_FULL.
    let mut refused = None;
    for _ in 0..200 {
        let r = c
            .create_connection(pb::CreateConnectionRequest {
                connection: Some(bulky()),
                skip_verification: true,
                ..Default::default()
            })
            .await;
        match r {
            Ok(made) => acknowledged.push(made.into_inner()),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("a write meets the full disk within 200 tries");
    let (code, reason, _) = error_info(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::ResourceExhausted, "STORAGE_FULL"),
        "{status:?}"
    );
    assert!(
        !status.message().to_lowercase().contains("sqlite"),
        "no SQLite text reaches the client: {status:?}"
    );

    // Health says so at once (the flag is set before the write answers),
    // and to watchers.
    assert_eq!(health_now(&mut health).await, ServingStatus::NotServing);
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);

    // Reads go on, and show exactly what was acknowledged: the refused
    // write left nothing.
    for made in &acknowledged {
        assert_eq!(&get(&mut c, &made.id).await, made);
    }
    let listed = c
        .list_connections(pb::ListConnectionsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list while the disk is full")
        .into_inner();
    let mut ids: Vec<&str> = listed.connections.iter().map(|x| x.id.as_str()).collect();
    let mut want: Vec<&str> = acknowledged.iter().map(|x| x.id.as_str()).collect();
    ids.sort_unstable();
    want.sort_unstable();
    assert_eq!(ids, want, "the list holds what was acknowledged, no more");
    assert_eq!(health_now(&mut health).await, ServingStatus::NotServing);

    // Space comes back: the next write commits and health turns SERVING.
    std::fs::remove_file(&filler).expect("delete the filler");
    acknowledged.push(create(&mut c, bulky()).await);
    assert_eq!(health_now(&mut health).await, ServingStatus::Serving);
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    for made in &acknowledged {
        assert_eq!(&get(&mut c, &made.id).await, made);
    }

    // And it was all on disk: a restart on the same files serves it.
    app.stop().await.expect("clean stop");
    let app = App::start_in(dir.clone(), |_| {}).await;
    let mut c = app.client.clone();
    for made in &acknowledged {
        assert_eq!(&get(&mut c, &made.id).await, made, "kept across a restart");
    }
    app.stop().await.expect("clean stop");
}
