//! Takes queued runs from the store in arrival order and executes them, at most
//! `max_parallel_runs` at once: checkout, then each step through the runner, recording
//! every transition. A queued run lives only in the store: it holds no task, thread or
//! process until a permit is free.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{resolve_secret, ProcessEnv, Secret};
use crate::daemon::AppState;
use crate::gitwork::{Fetch, GitError};
use crate::mask::Masker;
use crate::pipeline::Pipeline;
use crate::repo::RepoName;
use crate::runner::{self, StepCommand, StepEnd};
use crate::store::{Run, RunStatus, StepEnd as StepRecord, StepStatus, Store, StoreError};

/// The stop switch of one executing run.
pub struct RunControl {
    stop: watch::Sender<bool>,
    /// Why it was stopped, when a user or a newer run canceled it (else: a shutdown).
    canceled: std::sync::Mutex<Option<String>>,
}

/// Executing runs by id, so that cancel can reach their steps.
#[derive(Default)]
pub struct Running(std::sync::Mutex<std::collections::HashMap<i64, Slot>>);

/// A run's entry: executing here, or asked to stop before it got that far (between
/// being claimed and being registered).
enum Slot {
    Executing(Arc<RunControl>),
    CancelRequested(String),
}

impl Running {
    fn register(&self, id: i64, stop: watch::Sender<bool>) -> Arc<RunControl> {
        let mut slots = self.lock();
        let early = match slots.remove(&id) {
            Some(Slot::CancelRequested(reason)) => Some(reason),
            _ => None,
        };
        if early.is_some() {
            stop.send_replace(true);
        }
        let control = Arc::new(RunControl {
            stop,
            canceled: std::sync::Mutex::new(early),
        });
        slots.insert(id, Slot::Executing(Arc::clone(&control)));
        control
    }

    fn remove(&self, id: i64) {
        self.lock().remove(&id);
    }

    /// The reason of a cancel asked for run `id`, which was claimed but never registered
    /// (so it has no other slot), if one was.
    fn take_cancel(&self, id: i64) -> Option<String> {
        match self.lock().remove(&id) {
            Some(Slot::CancelRequested(reason)) => Some(reason),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<i64, Slot>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops a running run's steps (SIGTERM, grace, SIGKILL); it ends `canceled` with
    /// `reason`. A run claimed but not yet executing is stopped as soon as it starts.
    pub fn cancel(&self, id: i64, reason: String) {
        let mut slots = self.lock();
        match slots.get(&id) {
            Some(Slot::Executing(control)) => {
                *control.canceled.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                control.stop.send_replace(true);
            }
            _ => {
                slots.insert(id, Slot::CancelRequested(reason));
            }
        }
    }

    /// Stops every executing run (the daemon is stopping).
    fn stop_all(&self) {
        for slot in self.lock().values() {
            if let Slot::Executing(control) = slot {
                control.stop.send_replace(true);
            }
        }
    }
}

/// Pause before claiming again after the store failed, so a broken disk does not spin.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// How long the scheduler sleeps without a wake-up before it looks at the store again:
/// a run queued by any path that did not wake it (another writer of the store, a lost
/// notification) still starts.
const RESCAN: Duration = Duration::from_secs(5);

/// Runs until `stop` turns true; then waits up to `shutdown_grace` for running runs and
/// kills what is left (those runs end `interrupted`; queued runs stay queued).
pub async fn run(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(state.config.max_parallel_runs));
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        if *stop.borrow() {
            break;
        }
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        let store = Arc::clone(&state.store);
        match tokio::task::spawn_blocking(move || store.claim_next()).await {
            Ok(Ok(Some(run))) if *stop.borrow() => {
                give_back(&state, run.id).await;
                break;
            }
            Ok(Ok(Some(run))) => {
                let span = tracing::info_span!("run", run = run.id, pipeline = %run.pipeline);
                let (stop_tx, stop_rx) = watch::channel(false);
                let control = state.running.register(run.id, stop_tx);
                let job = execute(Arc::clone(&state), run, (control, stop_rx), permit);
                tasks.spawn(job.instrument(span));
            }
            Ok(Ok(None)) => {
                drop(permit);
                tokio::select! {
                    () = state.wake.notified() => {}
                    () = tokio::time::sleep(RESCAN) => {}
                    _ = stop.changed() => break,
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot claim the next run");
                tokio::time::sleep(STORE_RETRY).await;
            }
            Err(e) => tracing::error!(error = %e, "claim task failed"),
        }
    }
    if tasks.is_empty() {
        return;
    }
    let grace = state.config.shutdown_grace;
    tracing::info!(
        running = tasks.len(),
        ?grace,
        "waiting for running runs to finish"
    );
    let all_done = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        tracing::warn!("shutdown grace is over: killing the steps still running");
        state.running.stop_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Puts a run claimed just as the stop began back in the queue, unstarted: started now
/// it would be killed at the end of the grace and lose an attempt. A cancel asked for
/// it meanwhile still applies.
async fn give_back(state: &Arc<AppState>, id: i64) {
    if let Err(e) = blocking(&state.store, move |s| s.unclaim(id)).await {
        tracing::error!(run = id, error = %e, "cannot queue a run claimed as the stop began again; the next start will find it interrupted");
        return;
    }
    if let Some(reason) = state.running.take_cancel(id) {
        if let Err(e) = blocking(&state.store, move |s| s.cancel_queued(id, reason)).await {
            tracing::error!(run = id, error = %e, "cannot record the cancel of a run claimed as the stop began");
        }
    }
}

/// Claims run `id` (queued, the only one in its store) and executes it now, in the
/// caller's task: `hookci run`.
pub async fn execute_now(state: Arc<AppState>, id: i64) -> Result<(), String> {
    let store = Arc::clone(&state.store);
    let run = tokio::task::spawn_blocking(move || store.claim_next())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .filter(|r| r.id == id)
        .ok_or_else(|| format!("run {id} could not be started"))?;
    let permit = Arc::new(Semaphore::new(1))
        .acquire_owned()
        .await
        .map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let control = state.running.register(id, stop_tx);
    execute(state, run, (control, stop_rx), permit).await;
    Ok(())
}

/// Runs a store call on a blocking thread (the store's calls block).
pub(crate) async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// How a run ended.
struct Ending {
    status: RunStatus,
    reason: Option<String>,
}

async fn execute(
    state: Arc<AppState>,
    run: Run,
    (control, stop): (Arc<RunControl>, watch::Receiver<bool>),
    _permit: OwnedSemaphorePermit,
) {
    tracing::info!(git_ref = %run.git_ref, commit = %run.commit, "run started");
    let workspace = state.workspace(run.id);
    let ending = match state.pipelines().get(&run.pipeline).cloned() {
        None => Ending {
            status: RunStatus::Failed,
            reason: Some(format!("pipeline {:?} no longer exists", run.pipeline)),
        },
        Some(pipeline) => match secrets_of(&state, &pipeline) {
            Err(reason) => Ending {
                status: RunStatus::Failed,
                reason: Some(reason),
            },
            Ok(secrets) => match prepare(&state, &run, &pipeline, &workspace, &stop).await {
                Ok(Some(skip)) => Ending {
                    status: RunStatus::Skipped,
                    reason: Some(skip),
                },
                Ok(None) => {
                    run_steps(
                        &state, &run, &pipeline, &workspace, &secrets, &control, stop,
                    )
                    .await
                }
                Err(GitError::Stopped) => stopped(&control, "the checkout"),
                Err(GitError::Failed(reason)) => Ending {
                    status: RunStatus::Failed,
                    reason: Some(reason),
                },
            },
        },
    };
    state.running.remove(run.id);
    let ws = workspace.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || remove_dir(&ws)).await {
        tracing::warn!(workspace = %workspace.display(), error = %e, "cannot remove workspace");
    }
    tracing::info!(
        status = ending.status.as_str(),
        reason = ending.reason.as_deref().unwrap_or(""),
        "run finished"
    );
    let leftover = match ending.status {
        RunStatus::Interrupted => StepStatus::Interrupted,
        _ => StepStatus::Skipped,
    };
    let id = run.id;
    if let Err(e) = blocking(&state.store, move |s| {
        s.finish_run(id, ending.status, ending.reason, leftover)
    })
    .await
    {
        tracing::error!(error = %e, "cannot record the end of the run");
    }
    prune(&state).await;
}

/// Retention (`retention: {runs, days}`): old runs go with their logs and workspaces.
/// Mirrors are kept.
pub async fn prune(state: &Arc<AppState>) {
    let retention = state.config.retention;
    let cutoff = crate::clock::now_ms() - (retention.days as i64).saturating_mul(86_400_000);
    let pruned = match blocking(&state.store, move |s| s.prune(retention.runs, cutoff)).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "pruning old runs failed");
            return;
        }
    };
    if pruned.is_empty() {
        return;
    }
    let dirs: Vec<_> = pruned
        .iter()
        .flat_map(|id| [state.log_dir(*id), state.workspace(*id)])
        .collect();
    let _ = tokio::task::spawn_blocking(move || {
        for dir in dirs {
            if let Err(e) = remove_dir(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a pruned run's files");
            }
        }
    })
    .await;
    tracing::info!(runs = pruned.len(), "pruned old runs");
}

fn remove_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The pipeline's secrets, by name; a missing one fails the run before any step.
fn secrets_of(state: &AppState, pipeline: &Pipeline) -> Result<Vec<(String, Secret)>, String> {
    pipeline
        .secrets
        .iter()
        .map(|name| {
            resolve_secret(name, state.config.secrets_dir.as_deref(), &ProcessEnv)
                .map(|v| (name.clone(), v))
        })
        .collect()
}

/// Records the planned steps and checks the commit out; `Some(reason)` when the
/// pipeline's path filter says the run has nothing to do. A stop kills the git job.
async fn prepare(
    state: &Arc<AppState>,
    run: &Run,
    pipeline: &Pipeline,
    workspace: &Path,
    stop: &watch::Receiver<bool>,
) -> Result<Option<String>, GitError> {
    let names: Vec<String> = pipeline.steps.iter().map(|s| s.name.clone()).collect();
    let id = run.id;
    blocking(&state.store, move |s| s.plan_steps(id, names))
        .await
        .map_err(GitError::Failed)?;
    let repo = RepoName::parse(&run.repo).map_err(GitError::Failed)?;
    // Path filters never apply to tags (DESIGN.md).
    let paths = pipeline
        .on
        .paths
        .as_ref()
        .filter(|_| run.git_ref.starts_with("refs/heads/"));
    let fetch = Fetch {
        repo: &repo,
        clone_url: &run.clone_url,
        git_ref: &run.git_ref,
        commit: &run.commit,
        changes_since: paths.map(|_| run.before.as_str()),
    };
    let changes = state.git.fetch(fetch, stop).await?;
    if let Some(paths) = paths {
        let changes = changes.ok_or_else(|| GitError::Failed("git worker: no changes".into()))?;
        if !changes.paths.iter().any(|p| paths.is_match(p)) {
            let wanted: Vec<&str> = paths.patterns().iter().map(|p| p.as_str()).collect();
            return Ok(Some(format!(
                "no changed file matches on.paths {wanted:?} ({} file(s) changed; diff against {})",
                changes.paths.len(),
                changes.base
            )));
        }
    }
    state
        .git
        .checkout(&repo, &run.clone_url, &run.commit, workspace, stop)
        .await?;
    Ok(None)
}

/// The daemon's own variables a step may see; nothing else of its environment passes.
const INHERITED: [&str; 4] = ["PATH", "HOME", "LANG", "USER"];

/// The complete environment of one step (DESIGN.md "Runs").
pub fn step_env(
    run: &Run,
    pipeline: &Pipeline,
    step: usize,
    workspace: &Path,
    failed: bool,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = INHERITED
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    let mut set = |k: &str, v: &str| env.push((k.to_owned(), v.to_owned()));
    set("CI", "true");
    set("HOOKCI", "true");
    set("HOOKCI_RUN_ID", &run.id.to_string());
    set("HOOKCI_PIPELINE", &pipeline.name);
    set("HOOKCI_REPO", &run.repo);
    set("HOOKCI_REF", &run.git_ref);
    if let Some(branch) = run.git_ref.strip_prefix("refs/heads/") {
        set("HOOKCI_BRANCH", branch);
    } else if let Some(tag) = run.git_ref.strip_prefix("refs/tags/") {
        set("HOOKCI_TAG", tag);
    }
    set("HOOKCI_COMMIT", &run.commit);
    set("HOOKCI_BEFORE", &run.before);
    set(
        "HOOKCI_DELIVERY",
        run.delivery.as_deref().unwrap_or_default(),
    );
    set("HOOKCI_WORKSPACE", &workspace.to_string_lossy());
    set("HOOKCI_STEP", &pipeline.steps[step].name);
    set("HOOKCI_RESULT", if failed { "failure" } else { "success" });
    for (k, v) in pipeline.env.iter().chain(&pipeline.steps[step].env) {
        set(k, v);
    }
    // Later entries win: keep only the last value of each name.
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<(String, String)> = env
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    out.reverse();
    out
}

fn describe(step: &str, end: StepEnd, timeout: Option<Duration>) -> String {
    match end {
        StepEnd::Exited(code) => format!("step {step:?} exited with code {code}"),
        StepEnd::Signaled(sig) => format!("step {step:?} was killed by signal {sig}"),
        StepEnd::TimedOut => match timeout {
            Some(t) => format!("step {step:?} timed out after {t:?}"),
            None => format!("step {step:?} timed out"),
        },
        StepEnd::Canceled => format!("step {step:?} was stopped because the daemon is stopping"),
    }
}

async fn run_steps(
    state: &Arc<AppState>,
    run: &Run,
    pipeline: &Pipeline,
    workspace: &Path,
    secrets: &[(String, Secret)],
    control: &RunControl,
    stop: watch::Receiver<bool>,
) -> Ending {
    let mask = Masker::new(secrets.iter().map(|(_, v)| v.expose()));
    // A timeout too large for the clock to represent is no limit at all.
    let deadline = pipeline.timeout.and_then(|t| Instant::now().checked_add(t));
    let mut ending: Option<Ending> = None;
    for (i, step) in pipeline.steps.iter().enumerate() {
        let number = i as i64 + 1;
        let failed = ending.is_some();
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        if *stop.borrow() {
            // Stopped between steps (or during the checkout): the rest never starts.
            ending.get_or_insert_with(|| stopped(control, &format!("step {:?}", step.name)));
            continue;
        }
        if !step.when.runs_after(failed) {
            continue;
        }
        if out_of_time {
            // The time ran out between steps: the pipeline did not get to finish, so
            // the run must not end `succeeded` with this step and the rest skipped.
            ending.get_or_insert_with(|| Ending {
                status: RunStatus::TimedOut,
                reason: Some(format!(
                    "pipeline timed out after {:?} (before step {:?})",
                    pipeline.timeout.unwrap_or_default(),
                    step.name
                )),
            });
            continue;
        }
        let span = tracing::info_span!("step", step = %step.name);
        let id = run.id;
        if let Err(e) = blocking(&state.store, move |s| s.step_started(id, number)).await {
            tracing::error!(error = %e, "cannot record the step start");
        }
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let pipeline_limits = match (remaining, step.timeout) {
            (Some(r), Some(s)) => r < s,
            (Some(_), None) => true,
            _ => false,
        };
        let timeout = match (remaining, step.timeout) {
            (Some(r), Some(s)) => Some(r.min(s)),
            (r, s) => r.or(s),
        };
        let mut env = step_env(run, pipeline, i, workspace, failed);
        env.extend(
            secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_owned())),
        );
        let log = state.log_path(run.id, number);
        let cmd = StepCommand {
            script: &step.run,
            cwd: workspace,
            env: &env,
            log_path: &log,
            timeout,
            grace: state.config.step_grace,
            mask: &mask,
        };
        let outcome = runner::run_step(cmd, stop.clone())
            .instrument(span.clone())
            .await;
        let (record, step_ending) = match outcome {
            Err(e) => {
                let reason = format!("step {:?} could not start: {e}", step.name);
                (
                    record_of(StepStatus::Failed, None, None, Some(reason.clone())),
                    Some((RunStatus::Failed, reason)),
                )
            }
            Ok(o) => {
                let shown_timeout = if pipeline_limits {
                    pipeline.timeout
                } else {
                    step.timeout
                };
                let reason = describe(&step.name, o.end, shown_timeout);
                match o.end {
                    StepEnd::Exited(0) => {
                        (record_of(StepStatus::Succeeded, Some(0), None, None), None)
                    }
                    StepEnd::Exited(code) => (
                        record_of(StepStatus::Failed, Some(code), None, Some(reason.clone())),
                        Some((RunStatus::Failed, reason)),
                    ),
                    StepEnd::Signaled(sig) => (
                        record_of(StepStatus::Failed, None, Some(sig), Some(reason.clone())),
                        Some((RunStatus::Failed, reason)),
                    ),
                    StepEnd::TimedOut => {
                        let reason = if pipeline_limits {
                            format!(
                                "pipeline timed out after {:?} (in step {:?})",
                                pipeline.timeout.unwrap_or_default(),
                                step.name
                            )
                        } else {
                            reason
                        };
                        (
                            record_of(StepStatus::TimedOut, None, None, Some(reason.clone())),
                            Some((RunStatus::TimedOut, reason)),
                        )
                    }
                    StepEnd::Canceled => {
                        let end = stopped(control, &format!("step {:?}", step.name));
                        let step_status = match end.status {
                            RunStatus::Canceled => StepStatus::Canceled,
                            _ => StepStatus::Interrupted,
                        };
                        let reason = end.reason.unwrap_or(reason);
                        (
                            record_of(step_status, None, None, Some(reason.clone())),
                            Some((end.status, reason)),
                        )
                    }
                }
            }
        };
        span.in_scope(|| tracing::info!(status = record.status.as_str(), "step finished"));
        if let Err(e) = blocking(&state.store, move |s| s.step_finished(id, number, record)).await {
            tracing::error!(error = %e, "cannot record the step end");
        }
        if let (None, Some((status, reason))) = (&ending, step_ending) {
            ending = Some(Ending {
                status,
                reason: Some(reason),
            });
        }
    }
    ending.unwrap_or(Ending {
        status: RunStatus::Succeeded,
        reason: None,
    })
}

/// How a run stopped from outside ends: `canceled` with the canceller's reason, else
/// (the daemon is stopping) `interrupted`.
fn stopped(control: &RunControl, what: &str) -> Ending {
    match control
        .canceled
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        Some(reason) => Ending {
            status: RunStatus::Canceled,
            reason: Some(reason),
        },
        None => Ending {
            status: RunStatus::Interrupted,
            reason: Some(format!("{what} was stopped because the daemon is stopping")),
        },
    }
}

fn record_of(
    status: StepStatus,
    exit_code: Option<i32>,
    signal: Option<i32>,
    reason: Option<String>,
) -> StepRecord {
    StepRecord {
        status,
        exit_code,
        signal,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_between_claim_and_start_stops_the_run_when_it_starts() {
        let running = Running::default();
        running.cancel(7, "superseded by run 8".into());
        let (tx, rx) = watch::channel(false);
        let control = running.register(7, tx);
        assert!(*rx.borrow(), "stopped as it starts");
        let end = stopped(&control, "build");
        assert_eq!(end.status, RunStatus::Canceled);
        assert_eq!(end.reason.as_deref(), Some("superseded by run 8"));

        // Registered first, canceled later: the same outcome.
        let (tx, rx) = watch::channel(false);
        let control = running.register(9, tx);
        running.cancel(9, "canceled through the API".into());
        assert!(*rx.borrow());
        assert_eq!(stopped(&control, "build").status, RunStatus::Canceled);
        // Not canceled by anyone: a stop is a shutdown.
        let (tx, _rx) = watch::channel(false);
        let control = running.register(10, tx);
        assert_eq!(stopped(&control, "build").status, RunStatus::Interrupted);
    }
}
