//! Missed pushes: at start and every `reconcile_interval`, list each configured
//! repository's remote heads (connect and list, no object download) and compare them
//! with the last head hookci saw. A branch or tag that moved, matches a pipeline and has
//! no run for its key gets one, with `trigger: reconcile`; so does a ref seen for the
//! first time (a creation: `before` is all zeros), except in the first pass over a
//! repository, which only records what exists. What a pass writes is applied only to
//! refs whose stored head is still the one it read before listing: a push recorded
//! meanwhile wins. Only the store and the matcher decide; nothing here runs steps.
//! Instances sharing a database reconcile one at a time (the store's reconcile lock).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::git::repo::RepoName;
use crate::intake;
use crate::intake::event::{Push, RefKind, ZERO_SHA};
use crate::run::scheduler::{self, blocking};
use crate::state::AppState;
use crate::store::RefChange;

/// Reconciles at start, then every interval, until `stop` turns true. An interval of 0
/// disables reconciling; a reload that changes the interval times the next pass by
/// the new one.
pub async fn run(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let mut model = state.model_changes();
    let mut last_pass: Option<Instant> = None;
    let mut told_disabled = false;
    loop {
        let interval = state.config().reconcile_interval;
        let due = match (interval.is_zero(), last_pass) {
            (true, _) => None,
            (false, None) => Some(Instant::now()),
            (false, Some(at)) => Some(at + interval),
        };
        if due.is_none() && !told_disabled {
            tracing::info!("reconcile disabled (reconcile_interval: 0)");
        }
        told_disabled = due.is_none();
        let wait = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait => {}
            _ = model.changed() => continue,
            _ = stop.changed() => return,
        }
        last_pass = Some(Instant::now());
        // Instances sharing a database take turns: a pass while another instance's
        // runs is skipped, that one covers the same repositories.
        let guard = match blocking(&state.store, |s| s.try_reconcile()).await {
            Ok(Some(guard)) => guard,
            Ok(None) => {
                tracing::info!("reconcile skipped: another instance is reconciling");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "reconcile cannot take its lock in the store");
                continue;
            }
        };
        let n = reconcile_all(&state).await;
        drop(guard);
        if n > 0 {
            tracing::info!(
                runs = n,
                "reconcile queued runs for pushes that were missed"
            );
            state.wake.notify_one();
        }
    }
}

/// One pass over every repository the pipelines name; returns the runs it created.
pub async fn reconcile_all(state: &Arc<AppState>) -> usize {
    let pipelines = state.pipelines();
    // One clone URL per repository: a pipeline's own, else the latest delivery's.
    let mut repos: BTreeMap<String, (RepoName, Option<String>)> = BTreeMap::new();
    for p in pipelines.iter() {
        let entry = repos
            .entry(p.repo.as_str().to_ascii_lowercase())
            .or_insert_with(|| (p.repo.clone(), None));
        if entry.1.is_none() {
            entry.1.clone_from(&p.clone_url);
        }
    }
    let mut created = 0;
    for (repo, url) in repos.into_values() {
        let url = match url {
            Some(url) => url,
            None => match blocking(&state.store, {
                let repo = repo.to_string();
                move |s| s.clone_url_of(&repo)
            })
            .await
            {
                Ok(Some(url)) => url,
                Ok(None) => {
                    tracing::debug!(%repo, "no clone URL known yet (no clone_url, no delivery): not reconciled");
                    continue;
                }
                Err(e) => {
                    tracing::error!(%repo, error = %e, "reconcile cannot read the store");
                    continue;
                }
            },
        };
        match reconcile_repo(state, &repo, &url).await {
            Ok(n) => created += n,
            Err(e) => tracing::warn!(%repo, error = %e, "reconcile failed for this repository"),
        }
    }
    created
}

async fn reconcile_repo(
    state: &Arc<AppState>,
    repo: &RepoName,
    url: &str,
) -> Result<usize, String> {
    // Read before listing: the store applies a ref's change only where this is still
    // its head, so a push recorded while the remote answers is never undone by the
    // older listing.
    let view = blocking(&state.store, {
        let repo = repo.to_string();
        move |s| s.reconcile_view(&repo)
    })
    .await?;
    let remote = state.git.remote_heads(url).await?;
    let pipelines = state.pipelines();
    let mut changes = Vec::new();
    for (git_ref, commit) in remote {
        let seen = view.heads.get(&git_ref).cloned();
        if seen.as_deref() == Some(commit.as_str()) {
            continue;
        }
        let kind = match (
            git_ref.strip_prefix("refs/heads/"),
            git_ref.strip_prefix("refs/tags/"),
        ) {
            (Some(b), _) => RefKind::Branch(b.to_owned()),
            (_, Some(t)) => RefKind::Tag(t.to_owned()),
            _ => continue,
        };
        let mut runs = Vec::new();
        // The first pass over a repository only records: building every ref that
        // already existed would be a surprise. After it, a new ref was created while
        // hookci was not listening.
        if seen.is_some() || view.reconciled {
            let push = Push {
                git_ref: git_ref.clone(),
                kind,
                before: seen.clone().unwrap_or_else(|| ZERO_SHA.to_owned()),
                after: commit.clone(),
                commit: Some(commit.clone()),
                deleted: false,
                created: seen.is_none(),
                forced: false,
                repo: repo.clone(),
                clone_url: url.to_owned(),
                default_branch: None,
                head_message: None,
            };
            for decision in intake::decisions(&push, &pipelines, "reconcile") {
                match decision.run {
                    Some(run) => runs.push(run),
                    None => tracing::debug!(
                        pipeline = decision.pipeline.as_deref().unwrap_or_default(),
                        reason = %decision.reason,
                        %git_ref,
                        "not triggered"
                    ),
                }
            }
        }
        changes.push(RefChange {
            git_ref,
            seen,
            head: commit,
            runs,
        });
    }
    if changes.is_empty() && view.reconciled {
        return Ok(0);
    }
    let name = repo.to_string();
    let outcome = blocking(&state.store, move |s| s.record_reconcile(name, changes)).await?;
    state
        .events
        .runs_changed(outcome.runs.iter().flat_map(|r| r.changed.iter().cloned()));
    for git_ref in &outcome.stale {
        tracing::info!(%repo, %git_ref, "a push moved this ref while the remote was listed: left to that push");
    }
    let new: Vec<_> = outcome.runs.iter().filter(|r| !r.existing).collect();
    for r in &new {
        tracing::info!(run = r.id, pipeline = %r.pipeline, %repo, "missed push found: run queued");
        // `cancel: running`, as for a pushed commit.
        for old in &r.supersedes {
            scheduler::supersede(state, *old, r.id).await;
        }
    }
    Ok(new.len())
}
