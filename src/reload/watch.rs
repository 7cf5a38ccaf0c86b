//! `watch_pipelines`: a reload when a pipeline file (`*.yml`, `*.yaml`) in the
//! pipelines directory is created, changed or removed, through inotify (the `notify`
//! crate). Events are debounced: an editor's save, or a checkout of many files, is a
//! burst of events and makes one reload once the directory is quiet. The reload is
//! all or nothing like any other (`reload`). Events may have been lost when the
//! kernel's queue overflowed (a rescan) or the watch failed: then a reload reads
//! everything again. The directory's parent is watched too, so a pipelines directory
//! replaced as a whole (removed and made again, or a new one renamed into place) is
//! watched again and read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::state::AppState;

/// How long the directory must be quiet before the reload.
const QUIET: Duration = Duration::from_millis(300);

/// Starts watching the pipelines directory; the watch lasts until `stop` turns true.
pub fn start(state: Arc<AppState>, stop: watch::Receiver<bool>) -> notify::Result<()> {
    let dir = std::path::absolute(&state.config().pipelines)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Sent from the watcher's own thread; a closed channel means the daemon stops.
        let _ = tx.send(event);
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    if let Some(parent) = dir.parent() {
        if let Err(e) = watcher.watch(parent, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %parent.display(), error = %e, "cannot watch the pipelines directory's parent: a pipelines directory replaced as a whole needs a SIGHUP");
        }
    }
    tracing::info!(dir = %dir.display(), "watching the pipelines directory");
    tokio::spawn(run(state, Watch { watcher, dir }, rx, stop));
    Ok(())
}

/// The inotify watch, held for as long as it lasts (dropping it ends it).
struct Watch {
    watcher: notify::RecommendedWatcher,
    /// The pipelines directory, absolute (events name paths below what is watched).
    dir: PathBuf,
}

impl Watch {
    /// Watches the directory now at the path again: the one watched before was
    /// removed or moved away.
    fn rearm(&mut self) {
        // The old watch may be gone already (its directory removed).
        let _ = self.watcher.unwatch(&self.dir);
        match self.watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::info!(dir = %self.dir.display(), "the pipelines directory was replaced: watching the new one");
            }
            Err(e) => {
                // Removed and not made again (yet): its parent's watch sees it come back.
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the pipelines directory");
            }
        }
    }
}

/// What an event asks of the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Ignore,
    Reload,
    /// Watch the directory again, then reload.
    Rearm,
}

async fn run(
    state: Arc<AppState>,
    mut watch: Watch,
    mut events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let mut rearm = false;
        // The first relevant event, then quiet.
        loop {
            tokio::select! {
                event = events.recv() => match event.map(|e| action(&watch.dir, &e)) {
                    None => return,
                    Some(Action::Ignore) => {}
                    Some(Action::Reload) => break,
                    Some(Action::Rearm) => {
                        rearm = true;
                        break;
                    }
                },
                _ = stop.changed() => return,
            }
        }
        match settle(&watch.dir, &mut events, &mut stop, QUIET).await {
            None => return,
            Some(more) => rearm |= more,
        }
        if rearm {
            watch.rearm();
        }
        tracing::info!("a pipeline file changed: reloading config and pipelines");
        let _ = super::reload(&state, "pipelines directory changed").await;
    }
}

/// Waits until no relevant event has come for `quiet`; whether one asked for a rearm,
/// or `None` when the watch or the daemon ends. Only relevant events restart the wait:
/// the parent directory is watched too, and a busy file beside the pipelines directory
/// (a log written there) must not hold a reload back for as long as it is written.
async fn settle(
    dir: &Path,
    events: &mut mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    stop: &mut watch::Receiver<bool>,
    quiet: Duration,
) -> Option<bool> {
    let mut rearm = false;
    let timer = tokio::time::sleep(quiet);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            event = events.recv() => match action(dir, &event?) {
                Action::Ignore => {}
                relevant => {
                    rearm |= relevant == Action::Rearm;
                    timer.as_mut().reset(tokio::time::Instant::now() + quiet);
                }
            },
            () = &mut timer => return Some(rearm),
            _ = stop.changed() => return None,
        }
    }
}

/// What an event means for a watch of `dir` (and of its parent).
fn action(dir: &Path, event: &notify::Result<notify::Event>) -> Action {
    match event {
        Err(e) => {
            // What was missed is unknown: read everything again, on a fresh watch.
            tracing::warn!(error = %e, "watching the pipelines directory failed: reloading");
            Action::Rearm
        }
        Ok(event) if event.need_rescan() => {
            tracing::warn!(
                "pipeline directory events were lost (the kernel's queue overflowed): reloading"
            );
            Action::Reload
        }
        Ok(event) => {
            let changes = matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            );
            if !changes {
                Action::Ignore
            } else if event.paths.iter().any(|p| p == dir) {
                // The directory itself came, went or was renamed (seen from its parent,
                // or its own watch telling it was removed).
                Action::Rearm
            } else if event
                .paths
                .iter()
                .any(|p| p.parent() == Some(dir) && crate::pipeline::is_pipeline_file(p))
            {
                Action::Reload
            } else {
                Action::Ignore
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, Flag, ModifyKind, RemoveKind, RenameMode};

    #[test]
    fn what_each_event_asks_for() {
        let dir = Path::new("/p");
        let event = |kind, path: &str| Ok(notify::Event::new(kind).add_path(path.into()));
        for (kind, path, wanted) in [
            (
                EventKind::Create(CreateKind::File),
                "/p/ci.yml",
                Action::Reload,
            ),
            (
                EventKind::Modify(ModifyKind::Any),
                "/p/ci.yaml",
                Action::Reload,
            ),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/p/ci.yml",
                Action::Reload,
            ),
            (
                EventKind::Remove(RemoveKind::File),
                "/p/ci.yml",
                Action::Reload,
            ),
            (
                EventKind::Access(AccessKind::Any),
                "/p/ci.yml",
                Action::Ignore,
            ),
            (
                EventKind::Create(CreateKind::File),
                "/p/.ci.yml.swp",
                Action::Ignore,
            ),
            (
                EventKind::Modify(ModifyKind::Any),
                "/p/4913",
                Action::Ignore,
            ),
            // An editor's lock file (a dangling symlink) while ci.yml is edited.
            (
                EventKind::Create(CreateKind::Other),
                "/p/.#ci.yml",
                Action::Ignore,
            ),
            (
                EventKind::Create(CreateKind::File),
                "/p/.hidden.yaml",
                Action::Ignore,
            ),
            // The parent's other entries.
            (
                EventKind::Create(CreateKind::File),
                "/other.yml",
                Action::Ignore,
            ),
            (EventKind::Create(CreateKind::Folder), "/p2", Action::Ignore),
            // The directory itself, replaced.
            (EventKind::Create(CreateKind::Folder), "/p", Action::Rearm),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/p",
                Action::Rearm,
            ),
            (EventKind::Remove(RemoveKind::Folder), "/p", Action::Rearm),
        ] {
            assert_eq!(action(dir, &event(kind, path)), wanted, "{kind:?} {path}");
        }
        let rescan = Ok(notify::Event::new(EventKind::Other).set_flag(Flag::Rescan));
        assert_eq!(action(dir, &rescan), Action::Reload);
        let failed = Err(notify::Error::generic("inotify queue overflow"));
        assert_eq!(action(dir, &failed), Action::Rearm);
    }

    fn modified(path: &str) -> notify::Result<notify::Event> {
        Ok(notify::Event::new(EventKind::Modify(ModifyKind::Any)).add_path(path.into()))
    }

    #[tokio::test]
    async fn a_busy_file_beside_the_directory_does_not_hold_the_reload_back() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_stop_tx, mut stop) = watch::channel(false);
        let noise = tx.clone();
        // A log next to the pipelines directory, written without pause until the end.
        let writer = tokio::spawn(async move {
            while noise.send(modified("/build.log")).is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        tx.send(modified("/p/ci.yml")).unwrap();
        let settled = tokio::time::timeout(
            Duration::from_secs(10),
            settle(
                Path::new("/p"),
                &mut rx,
                &mut stop,
                Duration::from_millis(200),
            ),
        )
        .await;
        writer.abort();
        assert_eq!(settled, Ok(Some(false)), "the reload waits on the busy log");
    }

    #[tokio::test]
    async fn each_pipeline_event_restarts_the_wait_and_a_rearm_is_kept() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_stop_tx, mut stop) = watch::channel(false);
        tx.send(Ok(notify::Event::new(EventKind::Create(
            CreateKind::Folder,
        ))
        .add_path("/p".into())))
            .unwrap();
        let quiet = Duration::from_millis(200);
        // Closer together than the quiet time: the wait outlasts the whole burst.
        let burst = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.send(modified("/p/ci.yml")).unwrap();
            }
            tx
        });
        let settled = settle(Path::new("/p"), &mut rx, &mut stop, quiet).await;
        assert_eq!(settled, Some(true));
        assert!(burst.is_finished(), "settled in the middle of the burst");
        assert!(rx.try_recv().is_err(), "an event of the burst was left");
    }
}
