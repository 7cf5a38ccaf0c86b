//! Fills a state directory's store with finished runs for the dashboard benchmark
//! (`bench/pages.sh`): `cargo run --example fill-runs -- STATE_DIR COUNT`. Runs of
//! three pipelines on a few branches, each with two steps; most succeed, some fail.
//! And one delivery for every ten runs (`bench-0`, `bench-1`, ...), each with the
//! three pipelines' decisions, for the delivery pages.

use std::path::PathBuf;
use std::sync::Arc;

use hookci::store::{
    NewDecision, NewDelivery, NewRun, OnInterrupt, RunStatus, Sqlite, StepEnd, StepStatus,
    Supersede,
};

/// Writers at once: the store commits their writes together.
const THREADS: usize = 8;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: fill-runs STATE_DIR COUNT")?);
    let count: usize = args
        .next()
        .ok_or("usage: fill-runs STATE_DIR COUNT")?
        .parse()?;
    std::fs::create_dir_all(&dir)?;
    let store = Arc::new(Sqlite::open(&dir)?);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || -> Result<(), String> {
                for i in (t..count).step_by(THREADS) {
                    fill_one(&store, i).map_err(|e| e.to_string())?;
                    if i % 10 == 0 {
                        delivery(&store, i / 10).map_err(|e| e.to_string())?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "a writer panicked")??;
    }
    println!(
        "{count} runs and {} deliveries in {}",
        count.div_ceil(10),
        dir.display()
    );
    Ok(())
}

fn fill_one(store: &Sqlite, i: usize) -> Result<(), hookci::store::StoreError> {
    let pipelines = ["build", "deploy", "docs"];
    let branches = ["main", "release/1.2", "feature/parser", "fix/login"];
    let commit = format!("{:040x}", i + 1);
    let run = store.create_run(NewRun {
        key: Some(format!("bench-{i}")),
        group: None,
        supersede: Supersede::Nothing,
        supersede_own_ref: false,
        generation: 1,
        pipeline: pipelines[i % pipelines.len()].into(),
        repo: "octo-org/octo-repo".into(),
        git_ref: format!("refs/heads/{}", branches[i / 3 % branches.len()]),
        commit,
        before: "0".repeat(40),
        clone_url: "https://github.com/octo-org/octo-repo.git".into(),
        trigger: "push",
        skipped: None,
    })?;
    let Some(claimed) = store.claim_next()? else {
        return Ok(());
    };
    store.plan_steps(
        claimed.id,
        vec!["build".into(), "test".into()],
        OnInterrupt::Retry,
    )?;
    let failed = run.id % 7 == 0;
    for number in 1..=2 {
        store.step_started(claimed.id, number)?;
        let code = if failed && number == 2 { 1 } else { 0 };
        store.step_finished(
            claimed.id,
            number,
            StepEnd {
                status: if code == 0 {
                    StepStatus::Succeeded
                } else {
                    StepStatus::Failed
                },
                exit_code: Some(code),
                signal: None,
                reason: None,
            },
        )?;
    }
    let (status, reason) = if failed {
        (
            RunStatus::Failed,
            Some("step test failed: exit code 1".to_owned()),
        )
    } else {
        (RunStatus::Succeeded, None)
    };
    store
        .finish_run(claimed.id, status, reason, StepStatus::Skipped)
        .map(drop)
}

/// A push no pipeline ran for: each pipeline's decision says why.
fn delivery(store: &Sqlite, k: usize) -> Result<(), hookci::store::StoreError> {
    let decisions = ["build", "deploy", "docs"]
        .iter()
        .map(|p| NewDecision {
            pipeline: Some((*p).to_owned()),
            reason: "on.branches: refs/heads/wip/bench matches no pattern".into(),
            run: None,
        })
        .collect();
    store
        .record_delivery(NewDelivery {
            id: format!("bench-{k}"),
            event: "push".into(),
            repo: "octo-org/octo-repo".into(),
            git_ref: "refs/heads/wip/bench".into(),
            after: format!("{:040x}", k + 1),
            head: Some(format!("{:040x}", k + 1)),
            clone_url: "https://github.com/octo-org/octo-repo.git".into(),
            decisions,
        })
        .map(drop)
}
