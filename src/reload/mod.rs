//! Reload without a restart: the config file and the pipelines directory are read
//! again from where they came from, everything is validated, and the new model is
//! swapped in at once; on any error nothing changes and each problem is logged as
//! `file:line:col: message`. Runs already started keep the pipeline they hold (the
//! scheduler takes it at claim). Settings the running daemon is built around (listen
//! address, state and pipelines directories) are reported when changed and keep
//! their running values. Asked for by SIGHUP, `POST /api/reload`, `hookci reload`
//! (through the reload `socket`) and the pipelines watcher (`watch`); the service
//! manager hears `RELOADING=1`, then `READY=1`.

pub mod socket;
pub mod watch;

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;
use tokio::signal::unix::Signal;

use crate::config::ProcessEnv;
use crate::pipeline::PipelineSet;
use crate::state::{AppState, Model};
use crate::systemd;

/// What a reload changed.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The pipelines now in force.
    pub pipelines: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Changed settings that wait for a restart (their running values stay).
    pub restart_required: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reload failed, nothing changed: {}", .problems.join("; "))]
    Invalid { problems: Vec<String> },
    #[error("this process was not started from a config it could read again")]
    NoSource,
    #[error("reload failed, nothing changed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// [`reload`] in a task of its own, awaited: it runs to its end even when the caller
/// is dropped half-way (an HTTP client that hangs up drops its handler), so the
/// service manager, told `RELOADING=1`, always hears the `READY=1` that ends it.
pub async fn reload_to_end(
    state: Arc<AppState>,
    cause: &'static str,
) -> Result<Report, ReloadError> {
    tokio::spawn(async move { reload(&state, cause).await }).await?
}

/// Reloads config and pipelines, all or nothing. `cause` names who asked, for the log.
/// Callers that may be dropped before it ends use [`reload_to_end`].
pub async fn reload(state: &AppState, cause: &'static str) -> Result<Report, ReloadError> {
    let Some(source) = state.source.clone() else {
        return Err(ReloadError::NoSource);
    };
    // One at a time: two interleaved reloads could swap in the older reading last.
    let _one = state.reloading.lock().await;
    systemd::reloading();
    let running = state.config();
    let dir = running.pipelines.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        // Both are read even when the first fails, so every problem is told at once.
        let config = source.load(&ProcessEnv);
        let pipelines = PipelineSet::load(&dir);
        match (config, pipelines) {
            (Ok(c), Ok(p)) => Ok((c, p)),
            (config, pipelines) => {
                let mut problems: Vec<String> = Vec::new();
                if let Err(e) = &config {
                    problems.push(source.describe(e));
                }
                if let Err(errors) = &pipelines {
                    problems.extend(errors.iter().map(|e| e.one_line()));
                }
                Err(problems)
            }
        }
    })
    .await;
    let result = match loaded {
        Err(e) => Err(ReloadError::Task(e)),
        Ok(Err(problems)) => Err(ReloadError::Invalid { problems }),
        Ok(Ok((config, pipelines))) => {
            let restart_required = running.restart_only_changes(&config);
            let config = config.with_restart_only_of(&running);
            let before: BTreeSet<String> =
                state.pipelines().iter().map(|p| p.name.clone()).collect();
            let after: BTreeSet<String> = pipelines.iter().map(|p| p.name.clone()).collect();
            state.swap(Model {
                config: Arc::new(config),
                pipelines: Arc::new(pipelines),
            });
            Ok(Report {
                added: after.difference(&before).cloned().collect(),
                removed: before.difference(&after).cloned().collect(),
                pipelines: after.into_iter().collect(),
                restart_required,
            })
        }
    };
    match &result {
        Ok(report) => {
            for setting in &report.restart_required {
                tracing::warn!(
                    cause,
                    setting,
                    "{setting} changed in the config: it takes effect at the next restart"
                );
            }
            tracing::info!(
                cause,
                pipelines = report.pipelines.len(),
                added = ?report.added,
                removed = ?report.removed,
                "reloaded config and pipelines"
            );
        }
        Err(ReloadError::Invalid { problems }) => {
            for problem in problems {
                tracing::error!(cause, "{problem}");
            }
            tracing::error!(
                cause,
                problems = problems.len(),
                "reload failed: the running config and pipelines stay in force"
            );
        }
        Err(e) => tracing::error!(cause, error = %e, "reload failed"),
    }
    systemd::notify("READY=1");
    result
}

/// Reloads at every SIGHUP until `stop` turns true; first at once when `pending` (a
/// SIGHUP came while the daemon was starting, after it had read its config).
pub async fn on_hangup(
    state: Arc<AppState>,
    mut hangups: Signal,
    pending: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if pending {
        let _ = reload(&state, "SIGHUP").await;
    }
    loop {
        tokio::select! {
            Some(()) = hangups.recv() => {
                tracing::info!("SIGHUP received: reloading config and pipelines");
                let _ = reload(&state, "SIGHUP").await;
            }
            _ = stop.changed() => return,
            else => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{ConfigSource, Overrides};
    use crate::store::{Sqlite, Store};
    use std::time::Duration;

    /// A daemon's state whose config file names `dir/pipelines`, which holds `ci.yml`.
    fn state_in(dir: &std::path::Path) -> Arc<AppState> {
        let pipelines = dir.join("pipelines");
        std::fs::create_dir_all(&pipelines).unwrap();
        std::fs::write(
            pipelines.join("ci.yml"),
            "repo: octo-org/octo-repo\nsteps:\n  - name: test\n    run: \"true\"\n",
        )
        .unwrap();
        let config = dir.join("hookci.yml");
        std::fs::write(
            &config,
            format!(
                "pipelines: {}\nstate_dir: {}\n",
                pipelines.display(),
                dir.join("state").display()
            ),
        )
        .unwrap();
        let source = ConfigSource {
            path: Some(config),
            flags: Overrides::default(),
            allow_unsigned: true,
        };
        let loaded = source.load(&ProcessEnv).unwrap();
        let store: Arc<dyn Store> = Arc::new(Sqlite::open(&loaded.state_dir).unwrap());
        Arc::new(AppState::new(loaded, store, PipelineSet::new(Vec::new())).with_source(source))
    }

    #[tokio::test]
    async fn a_reload_whose_caller_is_dropped_half_way_goes_on_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_in(dir.path());
        let mut changes = state.model_changes();
        // The test holds the reload at its start, as another reload in progress would.
        let held = state.reloading.lock().await;
        let mut caller = Box::pin(reload_to_end(Arc::clone(&state), "test"));
        tokio::select! {
            biased;
            _ = &mut caller => panic!("the reload ended while it was held"),
            () = std::future::ready(()) => {}
        }
        // As an HTTP handler is dropped when its client hangs up.
        drop(caller);
        drop(held);
        tokio::time::timeout(Duration::from_secs(30), changes.changed())
            .await
            .expect("the reload ended with its caller")
            .unwrap();
        let names: Vec<String> = state.pipelines().iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["ci"]);
    }
}
