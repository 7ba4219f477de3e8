//! Files read again without a restart: the TLS certificates and the access
//! file. One task watches them all, on SIGHUP and when a file changes
//! (modification time, size or inode, checked every `--reload-interval`).
//!
//! Each reload replaces its whole table or nothing: a file that does not
//! read keeps the previous one in force and says why. A failed attempt is
//! not retried until something changes again (or SIGHUP), so a half-written
//! file logs once, not every tick.

use crate::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Something read from files that can be read again.
pub(crate) trait Reloadable: Send + Sync {
    /// What it is, for the log: `"tls certificates"`, `"access file"`.
    fn what(&self) -> &'static str;
    /// The files it is read from.
    fn paths(&self) -> Vec<PathBuf>;
    /// Reads the files again; on error the previous state stays.
    fn reload(&self) -> Result<(), Error>;
    /// What the files looked like just before they were first read, so an
    /// edit made between that read and the first check is not missed.
    fn loaded(&self) -> Stamp;
}

/// What a list of files looks like: modification time, size and inode of each.
pub(crate) type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

/// The files as they are now; take it *before* reading them, so a change
/// while they are read shows as a change next time.
pub(crate) fn stamp(paths: &[PathBuf]) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

/// Reloads `items` on `hangup` (all of them) and when one's files change,
/// checking every `interval`, until `stopping` is cancelled.
pub(crate) async fn watch(
    items: Vec<Arc<dyn Reloadable>>,
    mut hangup: tokio::signal::unix::Signal,
    interval: Duration,
    stopping: CancellationToken,
) {
    let mut seen: Vec<Stamp> = items.iter().map(|i| i.loaded()).collect();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        let signalled = tokio::select! {
            _ = stopping.cancelled() => return,
            _ = hangup.recv() => true,
            _ = tick.tick() => false,
        };
        if signalled && items.is_empty() {
            tracing::info!("SIGHUP: nothing to reload");
        }
        for (item, seen) in items.iter().zip(seen.iter_mut()) {
            let now = stamp(&item.paths());
            if !signalled && now == *seen {
                continue;
            }
            *seen = now;
            let cause = if signalled { "SIGHUP" } else { "files changed" };
            let what = item.what();
            match item.reload() {
                Ok(()) => tracing::info!(cause, "{what} reloaded"),
                Err(e) => tracing::error!(
                    cause,
                    error = %e,
                    "{what} not reloaded; the previous one stays in force"
                ),
            }
        }
    }
}
