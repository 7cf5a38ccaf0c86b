//! `watch_pipelines`: a reload when a pipeline file (`*.yml`, `*.yaml`) in the
//! pipelines directory is created, changed or removed, through inotify (the `notify`
//! crate). Events are debounced: an editor's save, or a checkout of many files, is a
//! burst of events and makes one reload once the directory is quiet. The reload is
//! all or nothing like any other (`reload`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::state::AppState;

/// How long the directory must be quiet before the reload.
const QUIET: Duration = Duration::from_millis(300);

/// Starts watching the pipelines directory; the watch lasts until `stop` turns true.
pub fn start(state: Arc<AppState>, stop: watch::Receiver<bool>) -> notify::Result<()> {
    let dir = state.config().pipelines.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Sent from the watcher's own thread; a closed channel means the daemon stops.
        let _ = tx.send(event);
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(dir = %dir.display(), "watching the pipelines directory");
    tokio::spawn(run(state, watcher, rx, stop));
    Ok(())
}

async fn run(
    state: Arc<AppState>,
    // Held for as long as the watch lasts: dropping it ends the inotify watch.
    _watcher: notify::RecommendedWatcher,
    mut events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // The first relevant event, then quiet.
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    None => return,
                    Some(event) if relevant(&event) => break,
                    Some(_) => {}
                },
                _ = stop.changed() => return,
            }
        }
        loop {
            tokio::select! {
                event = events.recv() => if event.is_none() { return },
                () = tokio::time::sleep(QUIET) => break,
                _ = stop.changed() => return,
            }
        }
        tracing::info!("a pipeline file changed: reloading config and pipelines");
        let _ = super::reload(&state, "pipelines directory changed").await;
    }
}

/// Whether an event may have changed a pipeline file.
fn relevant(event: &notify::Result<notify::Event>) -> bool {
    match event {
        Err(e) => {
            tracing::warn!(error = %e, "watching the pipelines directory");
            false
        }
        Ok(event) => {
            matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            ) && event.paths.iter().any(|p| is_pipeline_file(p))
        }
    }
}

fn is_pipeline_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, ModifyKind, RenameMode};

    #[test]
    fn only_changes_to_pipeline_files_count() {
        let event = |kind, path: &str| Ok(notify::Event::new(kind).add_path(path.into()));
        for (kind, path, counts) in [
            (EventKind::Create(CreateKind::File), "/p/ci.yml", true),
            (EventKind::Modify(ModifyKind::Any), "/p/ci.yaml", true),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/p/ci.yml",
                true,
            ),
            (
                EventKind::Remove(notify::event::RemoveKind::File),
                "/p/ci.yml",
                true,
            ),
            (EventKind::Access(AccessKind::Any), "/p/ci.yml", false),
            (EventKind::Create(CreateKind::File), "/p/.ci.yml.swp", false),
            (EventKind::Modify(ModifyKind::Any), "/p/4913", false),
        ] {
            assert_eq!(relevant(&event(kind, path)), counts, "{kind:?} {path}");
        }
    }
}
