//! `hookci run PIPELINE --repo PATH|URL`: one pipeline, now, in the foreground, with
//! its output on stdout. It goes through the same checkout, runner and store as the
//! daemon, on a throwaway state directory, so what passes here passes there.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::daemon::AppState;
use crate::follow::{self, Update};
use crate::intake::concurrency_group;
use crate::pipeline::PipelineSet;
use crate::scheduler;
use crate::store::{NewRun, RunStatus, Store, Supersede};

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
    let scratch: PathBuf = std::env::temp_dir().join(format!("hookci-run-{}", std::process::id()));
    config.state_dir = scratch.clone();
    let result = run_in(
        config,
        pipelines.clone(),
        &pipeline,
        git_ref,
        clone_url,
        req.sha,
    )
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn run_in(
    config: Config,
    pipelines: PipelineSet,
    pipeline: &crate::pipeline::Pipeline,
    git_ref: String,
    clone_url: String,
    sha: Option<String>,
) -> Result<RunStatus, String> {
    let state_dir = config.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&state_dir))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let state = Arc::new(AppState::new(config, Arc::new(store), pipelines));
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
        attempt: 1,
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
    let mut updates = follow::follow(Arc::clone(&state), made.id);
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
            };
            let _ = out.flush();
        }
        end
    });
    scheduler::execute_now(Arc::clone(&state), made.id).await?;
    printer
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the run's end was not seen".to_owned())
}
