//! Every write of the store, each run by the one writer thread (see `batch`) inside
//! its group-committed transaction.

use rusqlite::{params, Connection, OptionalExtension};

use super::outbox::{self, ReportPolicy, Transition};
use super::{repo_key, run_from_row, step_from_row, steps_in, Sqlite, StoreError};
use super::{
    DeliveryOutcome, NewDelivery, NewRun, OnInterrupt, Phases, Pruned, QueuedCancel, Reconciled,
    Recovered, RefChange, Run, RunRef, RunStatus, Step, StepEnd, StepStatus, Supersede, Timings,
};
use super::{RUN_COLUMNS, STEP_COLUMNS};
use crate::clock::now_ms;

/// How many times a run is started before interruptions make it fail. A rerun is a
/// run of its own and gets as many.
pub const MAX_ATTEMPTS: i64 = 2;

/// The reason of a run that `interrupted: fail` ends.
pub(super) const NOT_RETRIED: &str = "interrupted; not retried: interrupted: fail";

/// The current attempt of run ?1, for statements on its steps.
const CURRENT_ATTEMPT: &str = "(SELECT attempt FROM runs WHERE id = ?1)";

impl Sqlite {
    /// Records a delivery and creates its runs; returns once committed and synced. A
    /// known delivery id creates nothing.
    pub fn record_delivery(&self, d: NewDelivery) -> Result<DeliveryOutcome, StoreError> {
        self.exec_reporting(move |c, policy| record_in(c, &d, policy))
    }

    /// [`Store::record_delivery`] for async callers (intake): no thread is held while
    /// the batch commits.
    pub async fn record_delivery_async(
        &self,
        d: NewDelivery,
    ) -> Result<DeliveryOutcome, StoreError> {
        self.exec_reporting_async(move |c, policy| record_in(c, &d, policy))
            .await
    }

    /// Creates one run outside any delivery (reconcile, rerun, manual trigger).
    pub fn create_run(&self, run: NewRun) -> Result<RunRef, StoreError> {
        self.exec_reporting(move |c, policy| insert_run(c, &run, None, policy))
    }

    /// Takes the oldest queued run whose concurrency group has nothing running, and
    /// marks it running.
    pub fn claim_next(&self) -> Result<Option<Run>, StoreError> {
        let owner = self.instance.clone();
        self.exec_reporting(move |c, policy| {
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
            c.prepare_cached(
                "UPDATE runs SET status = 'running', started_at = ?2, owner = ?3 WHERE id = ?1",
            )?
            .execute(params![run.id, now, owner])?;
            run.status = RunStatus::Running;
            run.started_at = Some(now);
            run.instance = owner;
            if let Some(policy) = policy {
                let t = transition_of(&run, RunStatus::Running, None);
                outbox::record(c, policy, &t)?;
            }
            Ok(Some(run))
        })
    }

    /// Gives back a run [`Store::claim_next`] took but that never started (the daemon
    /// began to stop meanwhile): it is queued again as it was, the attempt unspent.
    /// Never `canceled` here: no other instance shares this file to ask a cancel of
    /// a running run, and this daemon's own cancel finds the run queued again (see
    /// `scheduler::cancel`).
    pub fn unclaim(&self, run_id: i64) -> Result<Option<Run>, StoreError> {
        self.writer.exec(move |c| {
            c.execute(
                "UPDATE runs SET status = 'queued', started_at = NULL WHERE id = ?1 AND status = 'running'",
                [run_id],
            )?;
            Ok(None)
        })
    }

    /// Records the steps the run's current attempt will go through, all `pending`, and
    /// what an interruption of them leads to: both from the pipeline this attempt runs.
    pub fn plan_steps(
        &self,
        run_id: i64,
        names: Vec<String>,
        on_interrupt: OnInterrupt,
    ) -> Result<(), StoreError> {
        self.writer.exec(move |c| {
            c.prepare_cached("UPDATE runs SET interrupted = ?2 WHERE id = ?1")?
                .execute(params![run_id, on_interrupt.as_str()])?;
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

    /// Marks a step running; returns it as committed (`None`: no such step).
    pub fn step_started(&self, run_id: i64, number: i64) -> Result<Option<Step>, StoreError> {
        self.start_step(run_id, number, None).map(|(step, _)| step)
    }

    /// [`Store::step_started`] for a run's first step, recording with it how long the
    /// run took to get there (see [`Timings`]), in the same commit; returns both as
    /// committed.
    pub fn first_step_started(
        &self,
        run_id: i64,
        number: i64,
        phases: Phases,
    ) -> Result<(Option<Step>, Option<Timings>), StoreError> {
        self.start_step(run_id, number, Some(phases))
    }

    fn start_step(
        &self,
        run_id: i64,
        number: i64,
        first: Option<Phases>,
    ) -> Result<(Option<Step>, Option<Timings>), StoreError> {
        self.exec_reporting(move |c, policy| {
            let now = now_ms();
            let step = c.prepare_cached(&format!(
                "UPDATE steps SET status = 'running', started_at = ?3
                 WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT} AND number = ?2
                 RETURNING {STEP_COLUMNS}"
            ))?
            .query_row(params![run_id, number, now], step_from_row)
            .optional()?;
            let timings = match first {
                None => None,
                Some(phases) => c
                    .prepare_cached(
                        "UPDATE runs SET queue_ms = MAX(0, COALESCE(started_at, ?2) - created_at),
                                fetch_ms = ?3, checkout_ms = ?4,
                                first_step_ms = MAX(0, ?2 - created_at)
                         WHERE id = ?1
                         RETURNING queue_ms, fetch_ms, checkout_ms, first_step_ms",
                    )?
                    .query_row(
                        params![run_id, now, phases.fetch_ms, phases.checkout_ms],
                        |r| {
                            Ok(Timings {
                                queue_ms: r.get(0)?,
                                fetch_ms: r.get(1)?,
                                checkout_ms: r.get(2)?,
                                to_first_step_ms: r.get(3)?,
                            })
                        },
                    )
                    .optional()?,
            };
            let Some(policy) = policy else {
                return Ok((step, timings));
            };
            let found = c
                .prepare_cached(&format!(
                    "SELECT pipeline, repo, ref, commit_sha,
                            (SELECT COUNT(*) FROM steps WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT}),
                            (SELECT name FROM steps WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT} AND number = ?2)
                     FROM runs WHERE id = ?1"
                ))?
                .query_row(params![run_id, number], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                })
                .optional()?;
            if let Some((pipeline, repo, git_ref, commit, total, name)) = found {
                let name = name.unwrap_or_default();
                let t = Transition {
                    run: run_id,
                    pipeline: &pipeline,
                    repo: &repo,
                    git_ref: &git_ref,
                    commit: &commit,
                    status: RunStatus::Running,
                    reason: None,
                    step: Some((number, total, &name)),
                };
                outbox::record(c, policy, &t)?;
            }
            Ok((step, timings))
        })
    }

    /// Records a step's end; returns it as committed (`None`: no such step).
    pub fn step_finished(
        &self,
        run_id: i64,
        number: i64,
        end: StepEnd,
    ) -> Result<Option<Step>, StoreError> {
        self.writer.exec(move |c| {
            c.prepare_cached(&format!(
                "UPDATE steps SET status = ?3, exit_code = ?4, signal = ?5, reason = ?6,
                        started_at = COALESCE(started_at, ?7), finished_at = ?7
                 WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT} AND number = ?2
                 RETURNING {STEP_COLUMNS}"
            ))?
            .query_row(
                params![
                    run_id,
                    number,
                    end.status.as_str(),
                    end.exit_code,
                    end.signal,
                    end.reason,
                    now_ms()
                ],
                step_from_row,
            )
            .optional()
        })
    }

    /// Adds `bytes` to what `max_log_bytes` kept out of the run's log.
    pub fn log_dropped(&self, run_id: i64, bytes: u64) -> Result<(), StoreError> {
        self.writer.exec(move |c| {
            c.prepare_cached("UPDATE runs SET log_dropped = log_dropped + ?2 WHERE id = ?1")?
                .execute(params![run_id, i64::try_from(bytes).unwrap_or(i64::MAX)])
                .map(drop)
        })
    }

    /// Ends a run; steps still pending or running take `leftover` as their state.
    /// Returns the run and its current attempt's steps as committed (`None`: no such run).
    pub fn finish_run(
        &self,
        run_id: i64,
        status: RunStatus,
        reason: Option<String>,
        leftover: StepStatus,
    ) -> Result<Option<(Run, Vec<Step>)>, StoreError> {
        self.exec_reporting(move |c, policy| {
            let Some(run) = finish_in(c, run_id, status, reason.as_deref(), leftover)? else {
                return Ok(None);
            };
            if let Some(policy) = policy {
                outbox::record(
                    c,
                    policy,
                    &transition_of(&run, run.status, run.reason.as_deref()),
                )?;
            }
            Ok(Some((run, steps_in(c, run_id, None)?)))
        })
    }

    /// Cancels a run that has not started, compare and set; an interrupted one keeps
    /// the cancel for its requeue.
    pub fn cancel_queued(&self, run_id: i64, reason: String) -> Result<QueuedCancel, StoreError> {
        self.exec_reporting(move |c, policy| {
            let asked = c
                .prepare_cached(
                    "UPDATE runs SET cancel_requested = COALESCE(cancel_requested, ?2)
                     WHERE id = ?1 AND status = 'interrupted'",
                )?
                .execute(params![run_id, reason])?;
            if asked > 0 {
                return Ok(QueuedCancel::Asked);
            }
            let canceled = c
                .prepare_cached(&format!(
                    "UPDATE runs SET status = 'canceled', reason = ?2, finished_at = ?3
                     WHERE id = ?1 AND status = 'queued' RETURNING {RUN_COLUMNS}"
                ))?
                .query_row(params![run_id, reason, now_ms()], run_from_row)
                .optional()?;
            if let Some(run) = canceled {
                if let Some(policy) = policy {
                    outbox::record(
                        c,
                        policy,
                        &transition_of(&run, run.status, run.reason.as_deref()),
                    )?;
                }
                return Ok(QueuedCancel::Canceled(Box::new(run)));
            }
            let status: Option<String> = c
                .prepare_cached("SELECT status FROM runs WHERE id = ?1")?
                .query_row([run_id], |r| r.get(0))
                .optional()?;
            // As `run_from_row` reads it.
            Ok(match status {
                Some(s) => {
                    QueuedCancel::NotQueued(RunStatus::parse(&s).unwrap_or(RunStatus::Failed))
                }
                None => QueuedCancel::NoSuchRun,
            })
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
    /// each interrupted run is queued again once (its attempt goes up by one), to run
    /// from its first step. A run interrupted on its last attempt ends `failed`, and so
    /// does one whose pipeline says `interrupted: fail` once a step of it has started
    /// (a run cut before its first step runs nothing twice). One a cancel was asked of
    /// while it was interrupted ends `canceled` with that cancel's reason: the cancel
    /// was answered as applied, so it is not built again.
    pub fn requeue_interrupted(&self) -> Result<Vec<Recovered>, StoreError> {
        self.exec_reporting(move |c, reporter| {
            type Found = (i64, i64, String, bool, bool, String);
            let found: Vec<Found> = c
                .prepare(
                    "SELECT id, attempt, interrupted, EXISTS (SELECT 1 FROM steps s
                         WHERE s.run_id = runs.id AND s.attempt = runs.attempt AND s.started_at IS NOT NULL),
                            cancel_requested IS NOT NULL, pipeline
                     FROM runs WHERE status = 'interrupted' ORDER BY id",
                )?
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::new();
            for (id, attempt, policy, stepped, asked, pipeline) in found {
                let status = if asked {
                    cancel_as_asked(c, id)?;
                    RunStatus::Canceled
                } else if stepped && policy == OnInterrupt::Fail.as_str() {
                    c.execute(
                        "UPDATE runs SET status = 'failed', reason = ?2 WHERE id = ?1",
                        params![id, NOT_RETRIED],
                    )?;
                    RunStatus::Failed
                } else if attempt < MAX_ATTEMPTS {
                    c.execute(
                        "UPDATE runs SET status = 'queued', attempt = attempt + 1, started_at = NULL,
                                finished_at = NULL, reason = ?2, queue_ms = NULL, fetch_ms = NULL,
                                checkout_ms = NULL, first_step_ms = NULL
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
                if let Some(reporter) = reporter {
                    report_run(c, reporter, id)?;
                }
                out.push(Recovered {
                    run: id,
                    pipeline,
                    attempt,
                    status,
                });
            }
            Ok(out)
        })
    }

    /// Records what a reconcile pass of `repo` found, and that the repository has been
    /// reconciled. Each ref's change (its runs, under the per-commit lock, and its new
    /// head) is applied only if the ref's stored head is still the one the pass read
    /// before listing: a push recorded in between knows better than that listing.
    pub fn record_reconcile(
        &self,
        repo: String,
        changes: Vec<RefChange>,
    ) -> Result<Reconciled, StoreError> {
        self.exec_reporting(move |c, policy| {
            let mut out = Reconciled::default();
            for change in &changes {
                let stored: Option<String> = c
                    .prepare_cached(
                        "SELECT commit_sha FROM ref_heads WHERE repo = ?1 AND ref = ?2",
                    )?
                    .query_row(params![repo_key(&repo), change.git_ref], |r| r.get(0))
                    .optional()?;
                if stored != change.seen {
                    out.stale.push(change.git_ref.clone());
                    continue;
                }
                for run in &change.runs {
                    out.runs.push(insert_run(c, run, None, policy)?);
                }
                note_head(c, &repo, &change.git_ref, Some(&change.head), "reconcile")?;
            }
            c.prepare_cached(
                "INSERT INTO reconciled (repo, first_at) VALUES (?1, ?2) ON CONFLICT(repo) DO NOTHING",
            )?
            .execute(params![repo_key(&repo), now_ms()])?;
            Ok(out)
        })
    }
}

/// The runs retention may delete: those finished for good. `interrupted` is not among
/// them, since such a run is queued again at the next start. Word for word the
/// predicate of the `runs_finished` index, so queries with it can walk that index, and
/// do (`INDEXED BY`): without statistics SQLite would rather sort the `runs_status`
/// entries of every finished run.
pub(super) const FINISHED: &str =
    "status IN ('succeeded', 'failed', 'timed_out', 'canceled', 'skipped')";

/// The most runs, and deliveries, one call of [`Store::prune`] deletes, so that one call
/// never holds the writer long.
pub(super) const PRUNE_RUNS: usize = 200;
pub(super) const PRUNE_DELIVERIES: usize = 500;

impl Sqlite {
    /// Retention: deletes finished runs beyond the newest `keep` of them (by rank: run
    /// ids have gaps, since every insert the per-commit lock refuses uses one up) or
    /// created before `cutoff_ms`, with their steps; and deliveries, with their
    /// decisions, beyond the newest `keep` or received before the cutoff, but never
    /// one that a kept run came from. Runs and deliveries go oldest first, a bounded
    /// batch a call; `more` says a batch was full. A redelivery of a pruned push would
    /// build again.
    pub fn prune(&self, keep: u64, cutoff_ms: i64) -> Result<Pruned, StoreError> {
        self.writer.exec(move |c| {
            let keep = i64::try_from(keep.max(1)).unwrap_or(i64::MAX);
            let runs = prune_runs(c, keep, cutoff_ms)?;
            let deliveries = prune_deliveries(c, keep, cutoff_ms)?;
            Ok(Pruned {
                more: runs.len() == PRUNE_RUNS || deliveries == PRUNE_DELIVERIES,
                runs,
                deliveries,
            })
        })
    }
}

/// Where retention's walk of a table (oldest first) goes: it deletes the rows up to
/// `beyond`, the newest row past the `keep` newest (0: none), and the rows older than
/// the cutoff; past `end` is neither, so the walk stops there.
struct PruneFrom {
    beyond: i64,
    end: i64,
}

/// Where retention ends in a table: `newest_beyond` (given `keep`) finds the newest row
/// past the kept ones, `oldest_time` the time of the oldest row. `None`: nothing to
/// delete.
fn prune_from(
    c: &Connection,
    newest_beyond: &str,
    oldest_time: &str,
    keep: i64,
    cutoff_ms: i64,
) -> rusqlite::Result<Option<PruneFrom>> {
    let beyond: Option<i64> = c
        .prepare_cached(newest_beyond)?
        .query_row([keep], |r| r.get(0))
        .optional()?;
    let oldest: Option<i64> = c
        .prepare_cached(oldest_time)?
        .query_row([], |r| r.get(0))
        .optional()?;
    let aged = oldest.is_some_and(|t| t < cutoff_ms);
    Ok(match (beyond, aged) {
        (None, false) => None,
        (beyond, false) => beyond.map(|b| PruneFrom { beyond: b, end: b }),
        (beyond, true) => Some(PruneFrom {
            beyond: beyond.unwrap_or(0),
            end: i64::MAX,
        }),
    })
}

fn prune_runs(c: &Connection, keep: i64, cutoff_ms: i64) -> rusqlite::Result<Vec<i64>> {
    let Some(from) = prune_from(
        c,
        &format!(
            "SELECT id FROM runs INDEXED BY runs_finished WHERE {FINISHED}
             ORDER BY id DESC LIMIT 1 OFFSET ?1"
        ),
        &format!(
            "SELECT created_at FROM runs INDEXED BY runs_finished WHERE {FINISHED}
             ORDER BY id LIMIT 1"
        ),
        keep,
        cutoff_ms,
    )?
    else {
        return Ok(Vec::new());
    };
    let ids: Vec<i64> = c
        .prepare_cached(&format!(
            "SELECT id FROM runs INDEXED BY runs_finished
             WHERE {FINISHED} AND id <= ?1 AND (id <= ?2 OR created_at < ?3)
             ORDER BY id LIMIT {PRUNE_RUNS}"
        ))?
        .query_map(params![from.end, from.beyond, cutoff_ms], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &ids {
        c.prepare_cached("DELETE FROM steps WHERE run_id = ?1")?
            .execute([id])?;
        outbox::prune_run(c, *id)?;
        c.prepare_cached("DELETE FROM runs WHERE id = ?1")?
            .execute([id])?;
    }
    Ok(ids)
}

fn prune_deliveries(c: &Connection, keep: i64, cutoff_ms: i64) -> rusqlite::Result<usize> {
    let Some(from) = prune_from(
        c,
        "SELECT seq FROM deliveries ORDER BY seq DESC LIMIT 1 OFFSET ?1",
        "SELECT received_at FROM deliveries ORDER BY seq LIMIT 1",
        keep,
        cutoff_ms,
    )?
    else {
        return Ok(0);
    };
    // The runs table is small (retention keeps it so): the set of deliveries its runs
    // came from is cheap to build once a call.
    let seqs: Vec<i64> = c
        .prepare_cached(&format!(
            "SELECT seq FROM deliveries
             WHERE seq <= ?1 AND (seq <= ?2 OR received_at < ?3)
               AND id NOT IN (SELECT delivery_id FROM runs WHERE delivery_id IS NOT NULL)
             ORDER BY seq LIMIT {PRUNE_DELIVERIES}"
        ))?
        .query_map(params![from.end, from.beyond, cutoff_ms], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for seq in &seqs {
        c.prepare_cached("DELETE FROM decisions WHERE delivery = ?1")?
            .execute([seq])?;
        c.prepare_cached("DELETE FROM deliveries WHERE seq = ?1")?
            .execute([seq])?;
    }
    Ok(seqs.len())
}

/// Ends a run; returns it as committed (`None`: no such run).
fn finish_in(
    c: &Connection,
    run_id: i64,
    status: RunStatus,
    reason: Option<&str>,
    leftover: StepStatus,
) -> rusqlite::Result<Option<Run>> {
    let now = now_ms();
    let run = c
        .prepare_cached(&format!(
            "UPDATE runs SET status = ?2, reason = ?3, finished_at = ?4 WHERE id = ?1
             RETURNING {RUN_COLUMNS}"
        ))?
        .query_row(params![run_id, status.as_str(), reason, now], run_from_row)
        .optional()?;
    c.prepare_cached(&format!(
        "UPDATE steps SET status = ?2, finished_at = CASE WHEN started_at IS NULL THEN NULL ELSE ?3 END
         WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT} AND status IN ('pending', 'running')"
    ))?
    .execute(params![run_id, leftover.as_str(), now])?;
    Ok(run)
}

/// Ends the interrupted run `id` `canceled` with the reason of the cancel asked for
/// it, in its current attempt: the step it was cut in is `canceled`, those it never
/// started `skipped`.
fn cancel_as_asked(c: &Connection, id: i64) -> rusqlite::Result<()> {
    let now = now_ms();
    c.execute(
        "UPDATE runs SET status = 'canceled', reason = cancel_requested, finished_at = ?2
         WHERE id = ?1",
        params![id, now],
    )?;
    c.execute(
        &format!(
            "UPDATE steps SET status = CASE WHEN started_at IS NULL THEN 'skipped' ELSE 'canceled' END,
                    finished_at = CASE WHEN started_at IS NULL THEN NULL ELSE ?2 END
             WHERE run_id = ?1 AND attempt = {CURRENT_ATTEMPT}
               AND status IN ('pending', 'running', 'interrupted')"
        ),
        params![id, now],
    )?;
    Ok(())
}

/// Records one delivery inside the writer's savepoint.
fn record_in(
    conn: &Connection,
    d: &NewDelivery,
    policy: Option<&dyn ReportPolicy>,
) -> rusqlite::Result<DeliveryOutcome> {
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
                let made = insert_run(conn, run, Some(&d.id), policy)?;
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
        // The pipeline is part of the key, which cannot be NULL: the one decision of a
        // push no pipeline watches is stored under the empty name (never a file stem).
        .execute(params![
            seq,
            decision.pipeline.as_deref().unwrap_or_default(),
            outcome,
            reason,
            run_id
        ])?;
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

/// The `before` of the oldest run a new run of group ?1 on ref ?2 supersedes: a queued
/// one, or also a running one when ?3 is `running` (else `queued` again). As an `IN`
/// list, both statuses are looked up in `runs_group`; an `OR` of them would make SQLite
/// walk every run the group ever had, on each push.
const SUPERSEDED_BASE: &str = "SELECT before_sha FROM runs
     WHERE grp = ?1 AND ref = ?2 AND status IN ('queued', ?3)
     ORDER BY id LIMIT 1";

/// Inserts a run unless its key exists (then names the existing run), and applies its
/// group's cancel policy to older runs.
fn insert_run(
    conn: &Connection,
    run: &NewRun,
    delivery: Option<&str>,
    policy: Option<&dyn ReportPolicy>,
) -> rusqlite::Result<RunRef> {
    let now = now_ms();
    let (status, finished_at) = match run.skipped {
        Some(_) => (RunStatus::Skipped, Some(now)),
        None => (RunStatus::Queued, None),
    };
    let supersedes_group = match (&run.group, &run.skipped) {
        (Some(group), None) if run.supersede != Supersede::Nothing => Some(group),
        _ => None,
    };
    // The runs superseded here never build their pushes, so this one stands for them
    // too: its changes (what `on.paths` sees, and `HOOKCI_BEFORE`) count from where the
    // oldest of them on its ref started. Runs of other refs (a group of the whole
    // pipeline) are no part of this ref's history. Looked up before the insert, so the
    // run is inserted as it stands and comes back from the INSERT itself: no second
    // write and no read of it afterwards (a statement less for each push).
    let base: Option<String> = match supersedes_group {
        Some(group) => {
            let superseded = match run.supersede {
                Supersede::Running => "running",
                _ => "queued",
            };
            conn.prepare_cached(SUPERSEDED_BASE)?
                .query_row(params![group, run.git_ref, superseded], |r| r.get(0))
                .optional()?
        }
        None => None,
    };
    let created: Option<Run> = conn
        .prepare_cached(&format!(
            "INSERT INTO runs (pipeline, repo, ref, commit_sha, before_sha, clone_url, run_key, grp, trigger,
                               delivery_id, status, reason, generation, created_at, finished_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT(run_key) DO NOTHING RETURNING {RUN_COLUMNS}"
        ))?
        .query_row(
            params![
                run.pipeline,
                run.repo,
                run.git_ref,
                run.commit,
                base.as_deref().unwrap_or(&run.before),
                run.clone_url,
                run.key,
                run.group,
                run.trigger,
                delivery,
                status.as_str(),
                run.skipped,
                run.generation,
                now,
                finished_at
            ],
            run_from_row,
        )
        .optional()?;
    let Some(created) = created else {
        let existing = conn
            .prepare_cached("SELECT id FROM runs WHERE run_key = ?1")?
            .query_row([&run.key], |r| r.get(0))?;
        return Ok(RunRef {
            id: existing,
            pipeline: run.pipeline.clone(),
            existing: true,
            supersedes: Vec::new(),
            changed: Vec::new(),
        });
    };
    let id = created.id;
    if let Some(policy) = policy {
        let t = Transition {
            run: id,
            pipeline: &run.pipeline,
            repo: &run.repo,
            git_ref: &run.git_ref,
            commit: &run.commit,
            status,
            reason: run.skipped.as_deref(),
            step: None,
        };
        outbox::record(conn, policy, &t)?;
    }
    let mut supersedes = Vec::new();
    let mut changed = vec![created];
    if let Some(group) = supersedes_group {
        let reason = format!("superseded by run {id}");
        let canceled = conn
            .prepare_cached(&format!(
                "UPDATE runs SET status = 'canceled', reason = ?3, finished_at = ?4
                 WHERE grp = ?1 AND status = 'queued' AND id < ?2 AND (NOT ?6 OR ref = ?5)
                 RETURNING {RUN_COLUMNS}"
            ))?
            .query_map(
                params![group, id, reason, now, run.git_ref, run.supersede_own_ref],
                run_from_row,
            )?
            .collect::<rusqlite::Result<Vec<Run>>>()?;
        if let Some(policy) = policy {
            for old in &canceled {
                let t = transition_of(old, RunStatus::Canceled, Some(&reason));
                outbox::record(conn, policy, &t)?;
            }
        }
        changed.extend(canceled);
        if run.supersede == Supersede::Running {
            supersedes = conn
                .prepare_cached(
                    "SELECT id FROM runs WHERE grp = ?1 AND status = 'running' AND id < ?2
                     AND (NOT ?4 OR ref = ?3)",
                )?
                .query_map(
                    params![group, id, run.git_ref, run.supersede_own_ref],
                    |r| r.get(0),
                )?
                .collect::<Result<_, _>>()?;
        }
    }
    Ok(RunRef {
        id,
        pipeline: run.pipeline.clone(),
        existing: false,
        supersedes,
        changed,
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
            changed: Vec::new(),
        })
    })?
    .collect()
}

fn transition_of<'a>(run: &'a Run, status: RunStatus, reason: Option<&'a str>) -> Transition<'a> {
    Transition {
        run: run.id,
        pipeline: &run.pipeline,
        repo: &run.repo,
        git_ref: &run.git_ref,
        commit: &run.commit,
        status,
        reason,
        step: None,
    }
}

/// Writes the reports of run `id` as it now stands (after a write in this transaction).
fn report_run(c: &Connection, policy: &dyn ReportPolicy, id: i64) -> rusqlite::Result<()> {
    let run = c
        .prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))?
        .query_row([id], run_from_row)
        .optional()?;
    if let Some(run) = run {
        let t = transition_of(&run, run.status, run.reason.as_deref());
        outbox::record(c, policy, &t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewDecision;

    /// How SQLite plans `sql` on a store made by the current schema.
    fn plan(sql: &str, params: impl rusqlite::Params) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(dir.path()).unwrap();
        let conn = store.conn();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows
    }

    #[test]
    fn a_push_finds_the_base_it_supersedes_through_the_group_and_status_index() {
        // Every push of a group runs this: walking all of the group's runs instead
        // would make intake slower with every run the group ever had.
        let steps = plan(
            SUPERSEDED_BASE,
            params!["ci\nrefs/heads/main", "refs/heads/main", "running"],
        );
        assert!(
            steps
                .iter()
                .any(|s| s.contains("USING INDEX runs_group (grp=? AND status=?)")),
            "{steps:?}"
        );
        assert!(!steps.iter().any(|s| s.starts_with("SCAN")), "{steps:?}");
    }

    fn push(n: usize, supersede: Supersede) -> NewDelivery {
        let commit = format!("{n:040x}");
        NewDelivery {
            id: format!("delivery-{n}"),
            event: "push".into(),
            repo: "acme/app".into(),
            git_ref: "refs/heads/main".into(),
            after: commit.clone(),
            head: Some(commit.clone()),
            clone_url: "file:///acme/app.git".into(),
            decisions: vec![NewDecision {
                pipeline: Some("ci".into()),
                reason: "refs/heads/main matched".into(),
                run: Some(NewRun {
                    key: Some(format!("ci\n{commit}")),
                    group: Some("ci\nrefs/heads/main".into()),
                    supersede,
                    supersede_own_ref: false,
                    generation: 1,
                    pipeline: "ci".into(),
                    repo: "acme/app".into(),
                    git_ref: "refs/heads/main".into(),
                    commit,
                    before: "0".repeat(40),
                    clone_url: "file:///acme/app.git".into(),
                    trigger: "push",
                    skipped: None,
                }),
            }],
        }
    }

    #[test]
    fn the_statements_of_a_push_are_planned_once_not_on_every_push() {
        // A cached statement SQLite plans again on each use (one with a filter on a
        // bound value, say, whose values the cache clears) costs a parse and a plan
        // per push.
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(dir.path()).unwrap();
        let conn = store.conn();
        for (n, supersede) in [Supersede::Pending, Supersede::Running]
            .into_iter()
            .cycle()
            .take(20)
            .enumerate()
        {
            record_in(&conn, &push(n, supersede), None).unwrap();
        }
        let stmt = conn.prepare_cached(SUPERSEDED_BASE).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
        drop(stmt);
        let queued: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM runs WHERE status = 'queued'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(queued, 1, "every push superseded the one before it");
    }
}
