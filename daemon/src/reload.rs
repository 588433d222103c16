//! Policy hot reload: read → hash → parse → validate → compile → swap.
//!
//! Triggers: a change in a watched policy directory (not the files:
//! Kubernetes ConfigMaps swap a `..data` symlink and editors write and
//! rename), debounced; SIGHUP; and a slow periodic re-read as a safety net.
//! An unchanged set (same hash) is not reloaded. A set with errors leaves the
//! last good policy in force, logs every error and counts it. Connections
//! keep the snapshot they started with; new ones get the new one.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use sluice_policy::{PolicySet, Snapshot, load_sources, read_paths};
use tokio::sync::mpsc;

pub(crate) const RELOADS: &str = "sluice_policy_reloads_total";
pub(crate) const GENERATION: &str = "sluice_policy_generation";
pub(crate) const LAST_SUCCESS: &str = "sluice_policy_last_success_timestamp_seconds";
/// 1 while the policy files on disk are refused (an older policy is in
/// force), else 0: what an alert on a bad policy watches (a reload's
/// `error` count goes up once per bad edit, not while it stays).
pub(crate) const REJECTED: &str = "sluice_policy_rejected";
const DEBOUNCE: Duration = Duration::from_millis(250);
/// The longest a burst of changes can hold a reload back.
const DEBOUNCE_MAX: Duration = Duration::from_secs(2);

/// The policy in force and what the last reload said, shared with the admin API.
#[derive(Debug)]
pub(crate) struct PolicyState {
    pub(crate) snapshot: Arc<ArcSwap<Snapshot>>,
    pub(crate) generation: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) files: Mutex<Vec<PathBuf>>,
    paths: Vec<PathBuf>,
    hash: AtomicU64,
    /// Where the last good policy's files are kept (in the state directory).
    keep: Option<PathBuf>,
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Applied,
    Unchanged,
    Rejected,
}

impl PolicyState {
    /// Loads the policy once. With `keep` (a file in the state directory)
    /// each policy put in force is saved there, and when the files on disk
    /// are invalid at start the one saved last is put in force instead — a
    /// restart (an upgrade, a crash) does not lift a REGISTRY_ONLY node's
    /// enforcement, nor leave the node's redirected traffic unanswered,
    /// because of a bad file a reload had already refused. Without a saved
    /// policy, invalid files are fatal.
    pub(crate) fn load_initial(
        paths: Vec<PathBuf>,
        keep: Option<PathBuf>,
    ) -> Result<(PolicyState, PolicySet), sluice_policy::LoadErrors> {
        // Every series from the start, at 0: a counter that first appears at
        // 1 shows no increase to `increase()`.
        for result in ["success", "unchanged", "error"] {
            metrics::counter!(RELOADS, "result" => result).increment(0);
        }
        let (files, problems) = read_paths(&paths);
        let hash = hash_files(&files);
        let (set, last_error) = match load(&files, problems) {
            Ok(set) => {
                if let Some(keep) = &keep {
                    save_last_good(keep, &files);
                }
                // Not when the files were refused and the saved policy stands in: that is no success.
                metrics::gauge!(LAST_SUCCESS).set(unix_now());
                metrics::gauge!(REJECTED).set(0.0);
                (set, None)
            }
            Err(errors) => {
                let Some((saved, set)) = keep.as_deref().and_then(|k| Some((k, load_last_good(k)?))) else {
                    return Err(errors);
                };
                let text = rejected(&errors);
                metrics::gauge!(REJECTED).set(1.0);
                tracing::error!(
                    errors = errors.0.len(),
                    saved = %saved.display(),
                    "the policy files are invalid: starting with the last good policy, saved when it was last in force"
                );
                (set, Some(text))
            }
        };
        let state = PolicyState {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::compile(&set))),
            generation: AtomicU64::new(1),
            last_error: Mutex::new(last_error),
            files: Mutex::new(set.files.iter().map(|f| f.to_path_buf()).collect()),
            paths,
            hash: AtomicU64::new(hash),
            keep,
        };
        metrics::gauge!(GENERATION).set(1.0);
        Ok((state, set))
    }

    /// Re-reads every policy path and swaps the snapshot if it changed and is valid.
    pub(crate) fn reload(&self, why: &str) -> Outcome {
        let (files, problems) = read_paths(&self.paths);
        let hash = hash_files(&files);
        if problems.is_empty() && hash == self.hash.load(Ordering::Relaxed) {
            metrics::counter!(RELOADS, "result" => "unchanged").increment(1);
            return Outcome::Unchanged;
        }
        match load(&files, problems) {
            Ok(set) => {
                for w in &set.warnings {
                    tracing::warn!("{w}");
                }
                self.snapshot.store(Arc::new(Snapshot::compile(&set)));
                if let Some(keep) = &self.keep {
                    save_last_good(keep, &files);
                }
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                self.hash.store(hash, Ordering::Relaxed);
                if let Ok(mut f) = self.files.lock() {
                    *f = set.files.iter().map(|f| f.to_path_buf()).collect();
                }
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                metrics::counter!(RELOADS, "result" => "success").increment(1);
                metrics::gauge!(GENERATION).set(generation as f64);
                metrics::gauge!(LAST_SUCCESS).set(unix_now());
                metrics::gauge!(REJECTED).set(0.0);
                tracing::info!(why, generation, entries = set.entries.len(), mode = ?set.settings.mode, "policy reloaded");
                Outcome::Applied
            }
            Err(errors) => {
                let text = rejected(&errors);
                tracing::error!(
                    why,
                    errors = errors.0.len(),
                    "policy reload rejected: the last good policy stays in force"
                );
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(text);
                }
                // Remember the bad hash too: the same bad files are not re-reported every minute.
                self.hash.store(hash, Ordering::Relaxed);
                metrics::gauge!(REJECTED).set(1.0);
                Outcome::Rejected
            }
        }
    }
}

/// One policy file as kept in the state directory.
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    path: PathBuf,
    text: String,
}

/// Saves the files of the policy now in force to `keep` (written and
/// synced to a temporary file, then renamed over it: a crash mid-save leaves
/// the previous one). A failure is logged: the policy is in force either way.
fn save_last_good(keep: &Path, files: &[sluice_policy::SourceFile]) {
    use std::io::Write;
    let kept: Vec<Kept> = files
        .iter()
        .map(|f| Kept { path: f.path.to_path_buf(), text: String::from_utf8_lossy(&f.bytes).into_owned() })
        .collect();
    let tmp = keep.with_extension("tmp");
    let saved = serde_json::to_vec(&kept)
        .map_err(std::io::Error::other)
        .and_then(|bytes| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, keep));
    if let Err(e) = saved {
        tracing::warn!(path = %keep.display(), error = %e, "cannot save the policy in force (used at start if the files are then invalid)");
    }
}

/// The policy saved by [`save_last_good`], if there is one and it loads.
fn load_last_good(keep: &Path) -> Option<PolicySet> {
    let bytes = std::fs::read(keep).ok()?;
    let kept: Vec<Kept> = match serde_json::from_slice(&bytes) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(path = %keep.display(), error = %e, "the saved policy is unreadable");
            return None;
        }
    };
    let files: Vec<sluice_policy::SourceFile> = kept
        .into_iter()
        .map(|k| sluice_policy::SourceFile { path: k.path.into(), bytes: k.text.into_bytes() })
        .collect();
    load_sources(&files)
        .inspect_err(|e| tracing::warn!(path = %keep.display(), "the saved policy does not load: {e}"))
        .ok()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The policy in `files`, or every problem: the files that could not be
/// read (`problems`), then what loading found.
fn load(
    files: &[sluice_policy::SourceFile],
    mut problems: Vec<sluice_policy::Diagnostic>,
) -> Result<PolicySet, sluice_policy::LoadErrors> {
    match load_sources(files) {
        Ok(set) if problems.is_empty() => Ok(set),
        Ok(_) => Err(sluice_policy::LoadErrors(problems)),
        Err(e) => {
            problems.extend(e.0);
            Err(sluice_policy::LoadErrors(problems))
        }
    }
}

/// Files that were not put in force: each problem logged, counted as a
/// failed reload; the text shown as `lastReloadError`.
fn rejected(errors: &sluice_policy::LoadErrors) -> String {
    for p in &errors.0 {
        tracing::error!("{p}");
    }
    metrics::counter!(RELOADS, "result" => "error").increment(1);
    errors.to_string()
}

fn hash_files(files: &[sluice_policy::SourceFile]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for f in files {
        h.write(f.path.as_os_str().as_encoded_bytes());
        h.write_u64(f.bytes.len() as u64);
        h.write(&f.bytes);
    }
    h.finish()
}

/// The directories to watch: a directory path itself, with what is under it
/// (`Recursive`); a file's parent alone (`NonRecursive`: for
/// `--policy /policy.yaml` a recursive watch would walk all of `/`,
/// `/proc` included, on the control thread, until inotify ran out of watches).
fn watch_dirs(paths: &[PathBuf]) -> Vec<(PathBuf, RecursiveMode)> {
    let mut dirs: Vec<(PathBuf, RecursiveMode)> = paths
        .iter()
        .map(|p| {
            if p.is_dir() {
                (p.clone(), RecursiveMode::Recursive)
            } else {
                let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                (parent.to_path_buf(), RecursiveMode::NonRecursive)
            }
        })
        .collect();
    // A directory asked for both ways is watched recursively (sorted first, kept by dedup).
    dirs.sort_by_key(|(dir, mode)| (dir.clone(), *mode != RecursiveMode::Recursive));
    dirs.dedup_by(|later, first| later.0 == first.0);
    dirs
}

/// Runs until `stop` fires: reloads on directory changes (debounced), on
/// `hup`, and every `interval`. `on_reload` runs around each reload asked
/// for by a change or `hup` (systemd RELOADING/READY).
pub(crate) async fn watch(
    state: Arc<PolicyState>,
    interval: Duration,
    mut hup: mpsc::UnboundedReceiver<()>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    on_reload: impl Fn(bool),
) {
    let (tx, mut changes) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Reading the files ourselves raises access events: only changes count.
        if ev.is_ok_and(|ev| !matches!(ev.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "no file watcher; relying on SIGHUP and the periodic re-read");
            None
        }
    };
    let mut watched = Vec::new();
    if let Some(w) = &mut watcher {
        watched = arm(w, watched, &state.paths);
    }
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        // systemd hears of reloads asked for (a change, SIGHUP), not of the
        // periodic re-read, which finds nothing new almost always.
        let (why, told) = tokio::select! {
            _ = stop.changed() => return,
            Some(()) = changes.recv() => {
                // Debounce: a ConfigMap swap or an editor's save is several
                // events. Read once the files have been quiet for DEBOUNCE
                // (a file still being written keeps raising events), but
                // within DEBOUNCE_MAX of the first event whatever happens.
                let until = tokio::time::Instant::now() + DEBOUNCE_MAX;
                loop {
                    tokio::select! {
                        // Stopping meanwhile: no reload (its READY=1 would follow STOPPING=1).
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(DEBOUNCE) => {}
                    }
                    let mut more = false;
                    while changes.try_recv().is_ok() {
                        more = true;
                    }
                    if !more || tokio::time::Instant::now() >= until {
                        break;
                    }
                }
                ("file change", true)
            }
            Some(()) = hup.recv() => ("SIGHUP", true),
            _ = tick.tick() => ("periodic re-read", false),
        };
        if told {
            on_reload(true);
        }
        state.reload(why);
        if told {
            on_reload(false);
        }
        // A watch follows the directory it was set on, not its path: after a
        // rename-swap, or a removal and a new one, it would watch nothing for ever.
        if let Some(w) = &mut watcher {
            watched = arm(w, std::mem::take(&mut watched), &state.paths);
        }
    }
}

/// Watches the directories of `paths` again, and drops the watches of
/// `before` that are no longer wanted (a directory missing is watched
/// through its parent until it is back). Watching a path again is what
/// follows a directory swapped or made anew at it — even one that got the
/// old one's inode number, so comparing inodes would not do — and for an
/// unchanged one it only renews the watch (no gap in which edits go unseen).
/// A failure is a warning when the set of directories changed, else a debug
/// line (a missing parent would otherwise warn at every re-read).
fn arm(
    w: &mut notify::RecommendedWatcher,
    before: Vec<(PathBuf, RecursiveMode)>,
    paths: &[PathBuf],
) -> Vec<(PathBuf, RecursiveMode)> {
    let now = watch_dirs(paths);
    for gone in before.iter().filter(|b| !now.contains(b)) {
        let _ = w.unwatch(&gone.0);
    }
    for (dir, mode) in &now {
        if let Err(e) = w.watch(dir, *mode) {
            let dir = dir.display();
            if now != before {
                tracing::warn!(%dir, error = %e, "cannot watch policy directory; relying on SIGHUP and the periodic re-read");
            } else {
                tracing::debug!(%dir, error = %e, "cannot watch policy directory");
            }
        }
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_watched_recursively_and_a_files_parent_alone() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let d = dir.path().to_path_buf();
        let paths = [d.join("x.yaml"), d.clone(), PathBuf::from("/policy.yaml"), PathBuf::from("local.yaml")];
        assert_eq!(
            watch_dirs(&paths),
            [
                (PathBuf::from("/"), RecursiveMode::NonRecursive),
                (d, RecursiveMode::Recursive),
                (PathBuf::from("."), RecursiveMode::NonRecursive),
            ]
        );
    }
}
