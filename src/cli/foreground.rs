//! `hookci run PIPELINE --repo PATH|URL`: one pipeline, now, in the foreground, with
//! its output on stdout. It goes through the same checkout, runner and store as the
//! daemon, on a throwaway state directory, so what passes here passes there. SIGINT
//! (Ctrl-C) or SIGTERM stops the run as a cancel does in the daemon (its cleanup steps
//! still run); a second one stops those too.

use std::io::Write;
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::Config;
use crate::intake::concurrency_group;
use crate::pipeline::PipelineSet;
use crate::run::scheduler;
use crate::state::AppState;
use crate::store::{NewRun, RunStatus, Sqlite, Store, Supersede};
use crate::web::follow::{self, Update};

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// What to run.
pub struct Request {
    pub pipeline: String,
    pub repo: String,
    pub git_ref: String,
    pub sha: Option<String>,
}

/// Runs it and returns how the run ended.
pub async fn run(
    mut config: Config,
    pipelines: PipelineSet,
    req: Request,
) -> Result<RunStatus, String> {
    let mut interrupts = Interrupts::listen()?;
    let pipeline = pipelines.get(&req.pipeline).cloned().ok_or_else(|| {
        format!(
            "no pipeline {:?} in {}",
            req.pipeline,
            config.pipelines.display()
        )
    })?;
    let git_ref = if req.git_ref.starts_with("refs/") {
        req.git_ref.clone()
    } else {
        format!("refs/heads/{}", req.git_ref)
    };
    // A local path is used as it is; make it absolute so the mirror can find it.
    let clone_url = match std::fs::canonicalize(&req.repo) {
        Ok(path) => path.display().to_string(),
        Err(_) => req.repo.clone(),
    };
    // A private directory of its own (not a name others can predict and plant first),
    // removed when it is dropped.
    let scratch = tempfile::Builder::new()
        .prefix("hookci-run-")
        .tempdir()
        .map_err(|e| format!("cannot create a scratch state directory: {e}"))?;
    config.state_dir = scratch.path().to_path_buf();
    // A trial in the foreground: its steps run as whoever runs it, in a scratch
    // directory private to that user, which another user could not even enter.
    config.run_as = None;
    config.run_as_uids = None;
    run_in(
        config,
        pipelines.clone(),
        &pipeline,
        git_ref,
        clone_url,
        req.sha,
        &mut interrupts,
    )
    .await
}

/// SIGINT and SIGTERM, caught: the step's process group is not ours (it has a group of
/// its own), so dying on the signal would leave it running.
struct Interrupts {
    int: Signal,
    term: Signal,
}

impl Interrupts {
    fn listen() -> Result<Interrupts, String> {
        let listen = |kind| signal(kind).map_err(|e| format!("cannot catch signals: {e}"));
        Ok(Interrupts {
            int: listen(SignalKind::interrupt())?,
            term: listen(SignalKind::terminate())?,
        })
    }

    /// The next one's name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

async fn run_in(
    config: Config,
    pipelines: PipelineSet,
    pipeline: &crate::pipeline::Pipeline,
    git_ref: String,
    clone_url: String,
    sha: Option<String>,
    interrupts: &mut Interrupts,
) -> Result<RunStatus, String> {
    let (state, id) = tokio::select! {
        made = create(config, pipelines, pipeline, git_ref, clone_url, sha) => made?,
        signal = interrupts.recv() => {
            return Err(format!("{signal} received before the run started; nothing ran"))
        }
    };
    let mut updates = follow::follow(Arc::clone(&state), id).map_err(|e| e.to_string())?;
    let printer = tokio::spawn(async move {
        let mut end = None;
        while let Some(update) = updates.recv().await {
            let mut out = std::io::stdout();
            let _ = match update {
                Update::StepStarted(step) => {
                    writeln!(out, "==> step {}: {}", step.number, step.name)
                }
                Update::Output { bytes, .. } => out.write_all(&bytes),
                Update::StepFinished(step) => {
                    writeln!(out, "==> step {} {}", step.number, step.status.as_str())
                }
                Update::RunFinished(run) => {
                    end = Some(run.status);
                    writeln!(
                        out,
                        "==> {} {}{}",
                        run.pipeline,
                        run.status.as_str(),
                        run.reason.map(|r| format!(": {r}")).unwrap_or_default()
                    )
                }
                // A terminal drops no idle output, and no daemon stop ends this run.
                Update::KeepAlive | Update::Stopping(_) => Ok(()),
            };
            let _ = out.flush();
        }
        end
    });
    let execution = scheduler::execute_now(Arc::clone(&state), id);
    let mut execution = std::pin::pin!(execution);
    let mut signals = 0;
    loop {
        tokio::select! {
            done = &mut execution => break done?,
            signal = interrupts.recv(), if signals < 2 => {
                signals += 1;
                if signals == 1 {
                    tracing::warn!(signal, "stopping the run; its cleanup steps still run (a second signal stops them)");
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        if let Err(e) = scheduler::cancel(&state, id, format!("stopped by {signal}")).await {
                            tracing::error!(error = %e, "cannot stop the run");
                        }
                    });
                } else {
                    tracing::warn!(signal, "stopping the cleanup steps too");
                    state.running.stop_all();
                }
            }
        }
    }
    printer
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the run's end was not seen".to_owned())
}

/// The store of the scratch state directory, with the run queued in it.
async fn create(
    config: Config,
    pipelines: PipelineSet,
    pipeline: &crate::pipeline::Pipeline,
    git_ref: String,
    clone_url: String,
    sha: Option<String>,
) -> Result<(Arc<AppState>, i64), String> {
    let state_dir = config.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || Sqlite::open(&state_dir))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let state = Arc::new(AppState::new(
        config,
        Arc::new(store) as Arc<dyn Store>,
        pipelines,
    ));
    let sha = match sha {
        Some(sha) => sha,
        None => {
            let wanted = git_ref.clone();
            state
                .git
                .remote_heads(&clone_url)
                .await?
                .into_iter()
                .find(|(r, _)| *r == wanted)
                .map(|(_, sha)| sha)
                .ok_or_else(|| format!("{wanted} does not exist in {clone_url}"))?
        }
    };
    let new = NewRun {
        key: None,
        group: concurrency_group(pipeline, &git_ref),
        supersede: Supersede::Nothing,
        supersede_own_ref: false,
        generation: 1,
        pipeline: pipeline.name.clone(),
        repo: pipeline.repo.to_string(),
        git_ref,
        commit: sha,
        before: ZERO_SHA.into(),
        clone_url,
        trigger: "manual",
        skipped: None,
    };
    let store = Arc::clone(&state.store);
    let made = tokio::task::spawn_blocking(move || store.create_run(new))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    state.events.runs_changed(made.changed);
    Ok((state, made.id))
}
