//! The name table across restarts.
//!
//! In REGISTRY_ONLY, a restart that forgot every name would blackhole the
//! connections apps open with answers they got before it (their resolver
//! caches them; no new query reaches the proxy). So the table is restored at
//! start, saved periodically (a crash loses at most one interval), and saved
//! at shutdown. Saves run on tokio's blocking pool: writing a large table
//! must not stall DNS answers on the control thread.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_policy::names::PersistStats;
use sluice_policy::{NameTable, Timestamp};

use crate::DnsError;
use crate::metrics as m;

fn persist_error(path: &Path, source: std::io::Error) -> DnsError {
    DnsError::Persist { path: path.to_path_buf(), source }
}

/// Loads a table saved by [`save`]; expired entries are skipped, a missing
/// file is an empty table.
pub fn restore(names: &NameTable, path: &Path) -> Result<PersistStats, DnsError> {
    let stats = names.restore(path, Timestamp::now()).map_err(|e| persist_error(path, e))?;
    m::table_gauges(names);
    Ok(stats)
}

/// Drops expired entries, then writes the alive ones to `path` atomically.
pub async fn save(names: Arc<NameTable>, path: PathBuf) -> Result<PersistStats, DnsError> {
    let job = tokio::task::spawn_blocking(move || {
        let now = Timestamp::now();
        names.purge_expired(now);
        let saved = names.save(&path, now).map_err(|e| persist_error(&path, e));
        m::table_gauges(&names);
        saved
    });
    let saved = job.await.map_err(|e| DnsError::Persist { path: PathBuf::new(), source: std::io::Error::other(e) })?;
    let result = if saved.is_ok() { "ok" } else { "error" };
    metrics::counter!(m::SAVES, "result" => result).increment(1);
    saved
}

/// Restores the table from `path`, saves it every `interval` and once more
/// when `shutdown` completes: [`restore_or_start_empty`], then
/// [`keep_saved`].
///
/// Spawn it before [`serve`](crate::serve) starts answering (the restore
/// runs at its first poll).
pub async fn persist(
    names: Arc<NameTable>,
    path: PathBuf,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DnsError> {
    restore_or_start_empty(&names, &path);
    keep_saved(names, path, interval, shutdown).await
}

/// [`restore`], logged; a table that cannot be restored is logged and left
/// empty (a corrupt or unreadable file must not keep DNS down; the next save
/// overwrites it).
pub fn restore_or_start_empty(names: &NameTable, path: &Path) {
    match restore(names, path) {
        Ok(stats) => {
            tracing::info!(path = %path.display(), restored = stats.entries, skipped = stats.skipped, "name table restored")
        }
        Err(error) => tracing::warn!(%error, "name table not restored; starting empty"),
    }
}

/// Saves the table every `interval` (at least 1 s) and once more when
/// `shutdown` completes. A failed periodic save is logged and counted and
/// the loop goes on; a failed final save is returned.
pub async fn keep_saved(
    names: Arc<NameTable>,
    path: PathBuf,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DnsError> {
    let interval = interval.max(Duration::from_secs(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticks.tick() => {
                if let Err(error) = save(names.clone(), path.clone()).await {
                    tracing::warn!(%error, "periodic name table save failed");
                }
            }
        }
    }
    let stats = save(names, path.clone()).await?;
    tracing::info!(path = %path.display(), saved = stats.entries, "name table saved");
    Ok(())
}
