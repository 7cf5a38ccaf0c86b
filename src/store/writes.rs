//! Every write of the store, each run by the one writer thread (see `batch`) inside
//! its group-committed transaction.

use rusqlite::{params, Connection, OptionalExtension};

use super::{repo_key, run_from_row, Store, StoreError, RUN_COLUMNS};
use super::{
    DeliveryOutcome, NewDelivery, NewRun, Run, RunRef, RunStatus, StepEnd, StepStatus, Supersede,
};
use crate::clock::now_ms;

/// How many times a run is started before interruptions make it fail.
pub const MAX_ATTEMPTS: i64 = 2;

/// The current attempt of run ?1, for statements on its steps.
const CURRENT_ATTEMPT: &str = "(SELECT attempt FROM runs WHERE id = ?1)";

impl Store {
    /// Records a delivery and creates its runs; returns once committed and synced. A
    /// known delivery id creates nothing.
    pub fn record_delivery(&self, d: NewDelivery) -> Result<DeliveryOutcome, StoreError> {
        self.writer.exec(move |c| record_in(c, &d))
    }

    /// [`Store::record_delivery`] for async callers (intake): no thread is held while
    /// the batch commits.
    pub async fn record_delivery_async(
        &self,
        d: NewDelivery,
    ) -> Result<DeliveryOutcome, StoreError> {
        self.writer.exec_async(move |c| record_in(c, &d)).await
    }

    /// Creates one run outside any delivery (reconcile, rerun, manual trigger).
    pub fn create_run(&self, run: NewRun) -> Result<RunRef, StoreError> {
        self.writer.exec(move |c| insert_run(c, &run, None))
    }

    /// Takes the oldest queued run whose concurrency group has nothing running, and
    /// marks it running.
    pub fn claim_next(&self) -> Result<Option<Run>, StoreError> {
        self.writer.exec(|c| {
            let run = c
                .prepare_cached(&format!(
                    "SELECT {RUN_COLUMNS} FROM runs r WHERE status = 'queued' AND (grp IS NULL OR NOT EXISTS
                         (SELECT 1 FROM runs x WHERE x.grp = r.grp AND x.status = 'running'))
                     ORDER BY id LIMIT 1"
                ))?
                .query_row([], run_from_row)
                .optional()?;
            let Some(mut run) = run else {
                return Ok(None);
            };
            let now = now_ms();
            c.prepare_cached("UPDATE runs SET status = 'running', started_at = ?2 WHERE id = ?1")?
                .execute(params![run.id, now])?;
            run.status = RunStatus::Running;
            run.started_at = Some(now);
            Ok(Some(run))
        })
    }

    /// Gives back a run [`Store::claim_next`] took but that never started (the daemon
    /// began to stop meanwhile): it is queued again as it was, the attempt unspent.
    pub fn unclaim(&self, run_id: i64) -> Result<(), StoreError> {
        self.writer.exec(move |c| {
            c.execute(
                "UPDATE runs SET status = 'queued', started_at = NULL WHERE id = ?1 AND status = 'running'",
                [run_id],
            )?;
            Ok(())
        })
    }

    /// Records the steps the run's current attempt will go through, all `pending`.
    pub fn plan_steps(&self, run_id: i64, names: Vec<String>) -> Result<(), StoreError> {
        self.writer.exec(move |c| {
            c.execute(
                &format!("DELETE FROM steps WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT}"),
                [run_id],
            )?;
            for (i, name) in names.iter().enumerate() {
                c.prepare_cached(&format!(
                    "INSERT INTO steps (run_id, attempt, number, name, status)
                     VALUES (?1, {CURRENT_ATTEMPT}, ?2, ?3, 'pending')"
                ))?
                .execute(params![run_id, i as i64 + 1, name])?;
            }
            Ok(())
        })
    }

    pub fn step_started(&self, run_id: i64, number: i64) -> Result<(), StoreError> {
        self.writer.exec(move |c| {
            c.prepare_cached(&format!(
                "UPDATE steps SET status = 'running', started_at = ?3
                 WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT} AND number = ?2"
            ))?
            .execute(params![run_id, number, now_ms()])
            .map(drop)
        })
    }

    pub fn step_finished(&self, run_id: i64, number: i64, end: StepEnd) -> Result<(), StoreError> {
        self.writer.exec(move |c| {
            c.prepare_cached(&format!(
                "UPDATE steps SET status = ?3, exit_code = ?4, signal = ?5, reason = ?6,
                        started_at = COALESCE(started_at, ?7), finished_at = ?7
                 WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT} AND number = ?2"
            ))?
            .execute(params![
                run_id,
                number,
                end.status.as_str(),
                end.exit_code,
                end.signal,
                end.reason,
                now_ms()
            ])
            .map(drop)
        })
    }

    /// Ends a run; steps still pending or running take `leftover` as their state.
    pub fn finish_run(
        &self,
        run_id: i64,
        status: RunStatus,
        reason: Option<String>,
        leftover: StepStatus,
    ) -> Result<(), StoreError> {
        self.writer
            .exec(move |c| finish_in(c, run_id, status, reason.as_deref(), leftover))
    }

    /// Cancels a run that has not started; false when it is not queued (any more).
    pub fn cancel_queued(&self, run_id: i64, reason: String) -> Result<bool, StoreError> {
        self.writer.exec(move |c| {
            let changed = c.execute(
                "UPDATE runs SET status = 'canceled', reason = ?2, finished_at = ?3 WHERE id = ?1 AND status = 'queued'",
                params![run_id, reason, now_ms()],
            )?;
            Ok(changed == 1)
        })
    }

    /// On start: runs left `running` by a daemon that died are `interrupted`.
    pub fn interrupt_running(&self) -> Result<Vec<i64>, StoreError> {
        self.writer.exec(|c| {
            let ids: Vec<i64> = c
                .prepare("SELECT id FROM runs WHERE status = 'running' ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in &ids {
                finish_in(
                    c,
                    *id,
                    RunStatus::Interrupted,
                    Some("the daemon stopped while this run was running"),
                    StepStatus::Interrupted,
                )?;
            }
            Ok(ids)
        })
    }

    /// On start, after [`Store::interrupt_running`] and after their leftovers are gone:
    /// each interrupted run is queued again once (its attempt goes up by one); a run
    /// interrupted on its last attempt ends `failed`. Returns (run, attempt it had, now).
    pub fn requeue_interrupted(&self) -> Result<Vec<(i64, i64, RunStatus)>, StoreError> {
        self.writer.exec(|c| {
            let found: Vec<(i64, i64)> = c
                .prepare("SELECT id, attempt FROM runs WHERE status = 'interrupted' ORDER BY id")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::new();
            for (id, attempt) in found {
                let status = if attempt < MAX_ATTEMPTS {
                    c.execute(
                        "UPDATE runs SET status = 'queued', attempt = attempt + 1, started_at = NULL,
                                finished_at = NULL, reason = ?2
                         WHERE id = ?1",
                        params![id, format!("attempt {attempt} was interrupted by a daemon stop or crash")],
                    )?;
                    RunStatus::Queued
                } else {
                    c.execute(
                        "UPDATE runs SET status = 'failed', reason = ?2 WHERE id = ?1",
                        params![id, format!("interrupted on {attempt} attempts by daemon stops or crashes")],
                    )?;
                    RunStatus::Failed
                };
                out.push((id, attempt, status));
            }
            Ok(out)
        })
    }

    /// Records what a reconcile found: the runs it triggers (under the per-commit lock)
    /// and the refs' new heads.
    pub fn record_reconcile(
        &self,
        repo: String,
        heads: Vec<(String, String)>,
        runs: Vec<NewRun>,
    ) -> Result<Vec<RunRef>, StoreError> {
        self.writer.exec(move |c| {
            let made = runs
                .iter()
                .map(|run| insert_run(c, run, None))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (git_ref, sha) in &heads {
                note_head(c, &repo, git_ref, Some(sha), "reconcile")?;
            }
            Ok(made)
        })
    }
}

impl Store {
    /// Retention: deletes finished runs beyond the newest `keep_runs`, or finished
    /// before `cutoff_ms`, with their steps, and deliveries older than the cutoff that
    /// no kept run came from. Returns the deleted runs' ids (their logs and workspaces
    /// are the caller's to remove). At most 200 runs a call, so one call never holds the
    /// writer long; calls after each run catch up. A redelivery of a pruned push would
    /// build again.
    pub fn prune(&self, keep_runs: u64, cutoff_ms: i64) -> Result<Vec<i64>, StoreError> {
        self.writer.exec(move |c| {
            // Ids grow with creation time, so "beyond the newest N" and "older than D days"
            // are both a prefix of the ids: find its end without scanning the table.
            // Run ids are dense (only prefixes are ever deleted), so the newest N are the
            // ids above max - N; OFFSET N would walk N index entries on every call.
            let beyond_newest: Option<i64> = c
                .prepare_cached("SELECT MAX(id) - ?1 FROM runs")?
                .query_row([i64::try_from(keep_runs.max(1)).unwrap_or(i64::MAX)], |r| r.get(0))?;
            let beyond_newest = beyond_newest.filter(|b| *b > 0);
            let oldest: Option<i64> = c
                .prepare_cached("SELECT created_at FROM runs ORDER BY id LIMIT 1")?
                .query_row([], |r| r.get(0))
                .optional()?;
            let too_old: Option<i64> = match oldest {
                Some(t) if t < cutoff_ms => c
                    .prepare_cached(
                        "SELECT MAX(id) FROM (SELECT id FROM runs WHERE created_at < ?1 ORDER BY id LIMIT 200)",
                    )?
                    .query_row([cutoff_ms], |r| r.get(0))?,
                _ => None,
            };
            let Some(bound) = beyond_newest.max(too_old) else {
                return Ok(Vec::new());
            };
            let ids: Vec<i64> = c
                .prepare_cached(
                    "SELECT id FROM runs WHERE id <= ?1 AND status NOT IN ('queued', 'running') ORDER BY id LIMIT 200",
                )?
                .query_map([bound], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in &ids {
                c.prepare_cached("DELETE FROM steps WHERE run_id = ?1")?.execute([id])?;
                c.prepare_cached("DELETE FROM runs WHERE id = ?1")?.execute([id])?;
            }
            let oldest_delivery: Option<i64> = c
                .prepare_cached("SELECT received_at FROM deliveries ORDER BY seq LIMIT 1")?
                .query_row([], |r| r.get(0))
                .optional()?;
            if oldest_delivery.is_some_and(|t| t < cutoff_ms) {
                // Old deliveries no kept run came from; retention keeps `runs` small, so
                // one pass over it is cheap.
                let old = "SELECT seq FROM deliveries WHERE seq <= (SELECT MAX(seq) FROM
                             (SELECT seq FROM deliveries WHERE received_at < ?1 ORDER BY seq LIMIT 500))
                           AND id NOT IN (SELECT delivery_id FROM runs WHERE delivery_id IS NOT NULL)";
                c.execute(&format!("DELETE FROM decisions WHERE delivery IN ({old})"), [cutoff_ms])?;
                c.execute(&format!("DELETE FROM deliveries WHERE seq IN ({old})"), [cutoff_ms])?;
            }
            Ok(ids)
        })
    }
}

fn finish_in(
    c: &Connection,
    run_id: i64,
    status: RunStatus,
    reason: Option<&str>,
    leftover: StepStatus,
) -> rusqlite::Result<()> {
    let now = now_ms();
    c.prepare_cached("UPDATE runs SET status = ?2, reason = ?3, finished_at = ?4 WHERE id = ?1")?
        .execute(params![run_id, status.as_str(), reason, now])?;
    c.prepare_cached(&format!(
        "UPDATE steps SET status = ?2, finished_at = CASE WHEN started_at IS NULL THEN NULL ELSE ?3 END
         WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT} AND status IN ('pending', 'running')"
    ))?
    .execute(params![run_id, leftover.as_str(), now])?;
    Ok(())
}

/// Records one delivery inside the writer's savepoint.
fn record_in(conn: &Connection, d: &NewDelivery) -> rusqlite::Result<DeliveryOutcome> {
    // Deliveries are numbered in arrival order, so their decisions append rather than
    // land at random places (delivery ids are random): fewer pages written per commit.
    let seq: Option<i64> = conn
        .prepare_cached(
            "INSERT INTO deliveries (id, event, repo, ref, after, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(id) DO NOTHING RETURNING seq",
        )?
        .query_row(params![d.id, d.event, d.repo, d.git_ref, d.after, now_ms()], |r| r.get(0))
        .optional()?;
    let Some(seq) = seq else {
        return delivery_runs(conn, &d.id).map(DeliveryOutcome::Duplicate);
    };
    let mut runs = Vec::new();
    for decision in &d.decisions {
        let (outcome, reason, run_id) = match &decision.run {
            None => ("not_triggered", decision.reason.clone(), None),
            Some(run) => {
                let made = insert_run(conn, run, Some(&d.id))?;
                let id = made.id;
                let outcome = match (made.existing, &run.skipped) {
                    (true, _) => (
                        "duplicate",
                        format!("duplicate of run {id} (same commit already built)"),
                        Some(id),
                    ),
                    (false, Some(_)) => ("skipped", decision.reason.clone(), Some(id)),
                    (false, None) => ("run", decision.reason.clone(), Some(id)),
                };
                runs.push(made);
                outcome
            }
        };
        conn.prepare_cached(
            "INSERT INTO decisions (delivery, pipeline, outcome, reason, run_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![seq, decision.pipeline, outcome, reason, run_id])?;
    }
    note_head(conn, &d.repo, &d.git_ref, d.head.as_deref(), "push")?;
    conn.prepare_cached(
        "INSERT INTO repositories (repo, clone_url, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(repo) DO UPDATE SET clone_url = excluded.clone_url, updated_at = excluded.updated_at
         WHERE clone_url != excluded.clone_url",
    )?
    .execute(params![repo_key(&d.repo), d.clone_url, now_ms()])?;
    Ok(DeliveryOutcome::New(runs))
}

/// Remembers where a ref points (`None`: it was deleted), for reconciling later.
fn note_head(
    conn: &Connection,
    repo: &str,
    git_ref: &str,
    commit: Option<&str>,
    source: &str,
) -> rusqlite::Result<()> {
    let repo = repo_key(repo);
    match commit {
        Some(sha) => conn
            .prepare_cached(
                "INSERT INTO ref_heads (repo, ref, commit_sha, source, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(repo, ref) DO UPDATE SET commit_sha = excluded.commit_sha,
                     source = excluded.source, updated_at = excluded.updated_at",
            )?
            .execute(params![repo, git_ref, sha, source, now_ms()])?,
        None => conn
            .prepare_cached("DELETE FROM ref_heads WHERE repo = ?1 AND ref = ?2")?
            .execute(params![repo, git_ref])?,
    };
    Ok(())
}

/// Inserts a run unless its key exists (then names the existing run), and applies its
/// group's cancel policy to older runs.
fn insert_run(conn: &Connection, run: &NewRun, delivery: Option<&str>) -> rusqlite::Result<RunRef> {
    let now = now_ms();
    let (status, finished_at) = match run.skipped {
        Some(_) => (RunStatus::Skipped, Some(now)),
        None => (RunStatus::Queued, None),
    };
    let id: Option<i64> = conn
        .prepare_cached(
            "INSERT INTO runs (pipeline, repo, ref, commit_sha, before_sha, clone_url, run_key, grp, trigger,
                               delivery_id, status, reason, attempt, created_at, finished_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT(run_key) DO NOTHING RETURNING id",
        )?
        .query_row(
            params![
                run.pipeline,
                run.repo,
                run.git_ref,
                run.commit,
                run.before,
                run.clone_url,
                run.key,
                run.group,
                run.trigger,
                delivery,
                status.as_str(),
                run.skipped,
                run.attempt,
                now,
                finished_at
            ],
            |r| r.get(0),
        )
        .optional()?;
    let Some(id) = id else {
        let existing = conn
            .prepare_cached("SELECT id FROM runs WHERE run_key = ?1")?
            .query_row([&run.key], |r| r.get(0))?;
        return Ok(RunRef {
            id: existing,
            pipeline: run.pipeline.clone(),
            existing: true,
            supersedes: Vec::new(),
        });
    };
    let mut supersedes = Vec::new();
    if let (Some(group), None, true) = (
        &run.group,
        &run.skipped,
        run.supersede != Supersede::Nothing,
    ) {
        conn.prepare_cached(
            "UPDATE runs SET status = 'canceled', reason = ?3, finished_at = ?4
             WHERE grp = ?1 AND status = 'queued' AND id < ?2",
        )?
        .execute(params![group, id, format!("superseded by run {id}"), now])?;
        if run.supersede == Supersede::Running {
            supersedes = conn
                .prepare_cached(
                    "SELECT id FROM runs WHERE grp = ?1 AND status = 'running' AND id < ?2",
                )?
                .query_map(params![group, id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
        }
    }
    Ok(RunRef {
        id,
        pipeline: run.pipeline.clone(),
        existing: false,
        supersedes,
    })
}

fn delivery_runs(conn: &Connection, id: &str) -> rusqlite::Result<Vec<RunRef>> {
    conn.prepare_cached(
        "SELECT run_id, pipeline, outcome FROM decisions
         WHERE delivery = (SELECT seq FROM deliveries WHERE id = ?1) AND run_id IS NOT NULL ORDER BY pipeline",
    )?
    .query_map([id], |r| {
        Ok(RunRef {
            id: r.get(0)?,
            pipeline: r.get(1)?,
            existing: r.get::<_, String>(2)? == "duplicate",
            supersedes: Vec::new(),
        })
    })?
    .collect()
}
