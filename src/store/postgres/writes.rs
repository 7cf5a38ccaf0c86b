//! The PostgreSQL store's writes, each one transaction, with the same outcomes as
//! SQLite's (`store::writes`), held across instances: the unique indexes decide
//! between concurrent deliveries of one push, a claim skips the rows another
//! instance is claiming and takes a concurrency group's lock, and reconcile's
//! compare-and-set is a conditional write.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Object};

use super::reads::{run_from_row, runs_from, step_from_row, steps_in};
use super::{
    execute, notify_log, notify_runs, query, query_opt, transaction, PgResult, Postgres, LOCKS,
    UPKEEP_LIMIT,
};
use crate::clock::now_ms;
use crate::store::outbox::{NewReport, ReportPolicy, Transition};
use crate::store::writes::{FINISHED, NOT_RETRIED, PRUNE_DELIVERIES, PRUNE_RUNS};
use crate::store::{
    repo_key, Attempt, DeliveryOutcome, LogPiece, NewDelivery, NewRun, OnInterrupt, Phases, Pruned,
    QueuedCancel, Reconciled, Recovered, RefChange, Run, RunRef, RunStatus, Step, StepEnd,
    StepStatus, StoreError, Supersede, Timings, MAX_ATTEMPTS, RUN_COLUMNS, STEP_COLUMNS,
};

/// What interrupted a run this instance recovers at its start, once and many times.
const BY_STOP: (&str, &str) = ("a daemon stop or crash", "daemon stops or crashes");

/// The current attempt of run $1, for statements on its steps.
pub(super) const CURRENT_ATTEMPT: &str = "(SELECT attempt FROM runs WHERE id = $1)";

/// Run $1 is not another instance's (the writer, $4, owns it, or nobody claimed it):
/// an instance whose lease was taken writes nothing into the attempt that replaced its
/// own.
const STILL_MINE: &str = "COALESCE((SELECT owner FROM runs WHERE id = $1), $4) = $4";
const STILL_MINE_8: &str = "COALESCE((SELECT owner FROM runs WHERE id = $1), $8) = $8";

/// The second key of a concurrency group's advisory lock is its name's hash: two groups
/// that share a hash only wait for each other's claims, never run together wrongly.
const GROUP_LOCK: &str = "pg_try_advisory_xact_lock($1, hashtext($2))";

/// How many queued runs a claim looks at before it gives up for now (each one found
/// locked by another instance's claim, or its group busy).
const CLAIM_LOOKS: usize = 64;

impl Postgres {
    /// Runs `work` in a transaction on the backend's runtime and waits for its commit.
    pub(super) fn write<T, W, Fut>(&self, reporting: bool, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: Fn(Arc<Object>, Option<Arc<dyn ReportPolicy>>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = PgResult<T>> + Send,
    {
        self.write_within(self.limit(), reporting, work)
    }

    /// [`Postgres::write`] for upkeep that may take long (see [`UPKEEP_LIMIT`]).
    fn write_upkeep<T, W, Fut>(&self, reporting: bool, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: Fn(Arc<Object>, Option<Arc<dyn ReportPolicy>>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = PgResult<T>> + Send,
    {
        self.write_within(self.limit().max(UPKEEP_LIMIT), reporting, work)
    }

    fn write_within<T, W, Fut>(
        &self,
        limit: Duration,
        reporting: bool,
        work: W,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: Fn(Arc<Object>, Option<Arc<dyn ReportPolicy>>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = PgResult<T>> + Send,
    {
        let pool = self.pool.clone();
        let policy = if reporting {
            self.active_policy()
        } else {
            None
        };
        self.block(async move { transaction(&pool, policy, limit, work).await })
    }

    pub(super) fn record(&self, d: NewDelivery) -> Result<DeliveryOutcome, StoreError> {
        let d = Arc::new(d);
        self.write(true, move |c, policy| {
            let d = Arc::clone(&d);
            async move { record_in(&c, &d, policy.as_deref()).await }
        })
    }

    /// [`Postgres::record`] without holding the caller's thread: it runs on the
    /// backend's runtime, and the caller awaits its end.
    pub(super) async fn record_async(&self, d: NewDelivery) -> Result<DeliveryOutcome, StoreError> {
        let pool = self.pool.clone();
        let policy = self.active_policy();
        let d = Arc::new(d);
        let limit = self.limit();
        let job = self.handle.spawn(async move {
            transaction(&pool, policy, limit, move |c, policy| {
                let d = Arc::clone(&d);
                async move { record_in(&c, &d, policy.as_deref()).await }
            })
            .await
        });
        match job.await {
            Ok(r) => r.map_err(|e| self.err(e)),
            Err(_) => Err(self.gone()),
        }
    }

    pub(super) fn create(&self, run: NewRun) -> Result<RunRef, StoreError> {
        let run = Arc::new(run);
        self.write(true, move |c, policy| {
            let run = Arc::clone(&run);
            async move {
                let made = insert_run(&*c, &run, None, policy.as_deref()).await?;
                if !made.existing && run.skipped.is_none() {
                    notify_runs(&*c).await?;
                }
                Ok(made)
            }
        })
    }

    /// The oldest queued run whose group runs nothing on any instance. Rows another
    /// instance is claiming are skipped (`SKIP LOCKED`); a group's claims take turns
    /// under its advisory lock, and the group is looked at again under it, after the
    /// claims that held it have committed: two runs of one group never both start.
    pub(super) fn claim(&self) -> Result<Option<Run>, StoreError> {
        let owner = self.instance.clone();
        let lease_ms = self.lease_ms();
        self.write(true, move |c, policy| {
            let owner = owner.clone();
            async move {
                let mut after = 0i64;
                for _ in 0..CLAIM_LOOKS {
                    let Some(row) = query_opt(
                        &*c,
                        "SELECT id, grp FROM runs r WHERE status = 'queued' AND id > $1
                           AND (grp IS NULL OR NOT EXISTS
                               (SELECT 1 FROM runs x WHERE x.grp = r.grp AND x.status = 'running'))
                         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                        &[&after],
                    )
                    .await?
                    else {
                        return Ok(None);
                    };
                    let id: i64 = row.try_get(0)?;
                    let group: Option<String> = row.try_get(1)?;
                    after = id;
                    if let Some(group) = &group {
                        let locked: bool =
                            query(&*c, &format!("SELECT {GROUP_LOCK}"), &[&LOCKS, group]).await?[0]
                                .try_get(0)?;
                        if !locked {
                            continue;
                        }
                        // A fresh look, now that no other claim of the group is open.
                        let busy = query_opt(
                            &*c,
                            "SELECT 1 FROM runs WHERE grp = $1 AND status = 'running' LIMIT 1",
                            &[group],
                        )
                        .await?
                        .is_some();
                        if busy {
                            continue;
                        }
                    }
                    let run = run_from_row(
                        &query(
                            &*c,
                            &format!(
                                "UPDATE runs SET status = 'running', started_at = $2, owner = $3,
                                        lease_until = hookci_clock_ms() + $4::BIGINT
                                 WHERE id = $1 RETURNING {RUN_COLUMNS}"
                            ),
                            &[&id, &now_ms(), &owner, &lease_ms],
                        )
                        .await?[0],
                    )?;
                    if let Some(policy) = policy.as_deref() {
                        report(&*c, policy, &transition_of(&run, RunStatus::Running, None)).await?;
                    }
                    return Ok(Some(run));
                }
                Ok(None)
            }
        })
    }

    /// A cancel another instance asked for the run while it was claimed here was
    /// answered as applied: the run ends `canceled` rather than queued again.
    pub(super) fn give_back(&self, run_id: i64) -> Result<Option<Run>, StoreError> {
        let me = self.instance.clone();
        self.write(true, move |c, reporter| {
            let me = me.clone();
            async move {
                // Still this instance's: had the give-back waited past the lease, another
                // instance may hold the run by now, and it is not this one's to queue.
                let Some(found) = query_opt(
                    &*c,
                    "SELECT cancel_requested IS NOT NULL FROM runs
                 WHERE id = $1 AND status = 'running' AND owner = $2 FOR UPDATE",
                    &[&run_id, &me],
                )
                .await?
                else {
                    return Ok(None);
                };
                let canceled = if found.try_get(0)? {
                    Some(cancel_as_asked(&*c, run_id, reporter.as_deref()).await?)
                } else {
                    execute(
                        &*c,
                        "UPDATE runs SET status = 'queued', started_at = NULL WHERE id = $1",
                        &[&run_id],
                    )
                    .await?;
                    None
                };
                // Queued again, or its group is free: on every instance.
                notify_runs(&*c).await?;
                Ok(canceled)
            }
        })
    }

    pub(super) fn plan(
        &self,
        run_id: i64,
        names: Vec<String>,
        on_interrupt: OnInterrupt,
    ) -> Result<(), StoreError> {
        let names = Arc::new(names);
        self.write(false, move |c, _| {
            let names = Arc::clone(&names);
            async move {
                execute(
                    &*c,
                    "UPDATE runs SET interrupted = $2 WHERE id = $1",
                    &[&run_id, &on_interrupt.as_str()],
                )
                .await?;
                execute(
                    &*c,
                    &format!("DELETE FROM steps WHERE run_id = $1 AND attempt = {CURRENT_ATTEMPT}"),
                    &[&run_id],
                )
                .await?;
                execute(
                    &*c,
                    &format!(
                        "DELETE FROM log_chunks WHERE run_id = $1 AND attempt = {CURRENT_ATTEMPT}"
                    ),
                    &[&run_id],
                )
                .await?;
                for (i, name) in names.iter().enumerate() {
                    execute(
                        &*c,
                        &format!(
                            "INSERT INTO steps (run_id, attempt, number, name, status)
                             VALUES ($1, {CURRENT_ATTEMPT}, $2, $3, 'pending')"
                        ),
                        &[&run_id, &(i as i64 + 1), name],
                    )
                    .await?;
                }
                Ok(())
            }
        })
    }

    /// A step's start; for the run's first step (`first`), with the run's push to first
    /// step recorded in the same commit (see `Timings`).
    pub(super) fn start_step(
        &self,
        run_id: i64,
        number: i64,
        first: Option<Phases>,
    ) -> Result<(Option<Step>, Option<Timings>), StoreError> {
        let me = self.instance.clone();
        self.write(true, move |c, policy| {
            let me = me.clone();
            async move {
            let now = now_ms();
            let step = query_opt(
                &*c,
                &format!(
                    "UPDATE steps SET status = 'running', started_at = $3
                     WHERE run_id = $1 AND attempt = {CURRENT_ATTEMPT} AND number = $2 AND {STILL_MINE}
                     RETURNING {STEP_COLUMNS}"
                ),
                &[&run_id, &number, &now, &me],
            )
            .await?
            .as_ref()
            .map(step_from_row)
            .transpose()?;
            if step.is_some() {
                // Followers on other instances show the step's start at once.
                notify_log(&*c, run_id).await?;
            }
            let timings = match first {
                None => None,
                Some(phases) => query_opt(
                    &*c,
                    "UPDATE runs SET queue_ms = GREATEST(0, COALESCE(started_at, $2) - created_at),
                            fetch_ms = $3, checkout_ms = $4,
                            first_step_ms = GREATEST(0, $2 - created_at)
                     WHERE id = $1
                     RETURNING queue_ms, fetch_ms, checkout_ms, first_step_ms",
                    &[&run_id, &now, &phases.fetch_ms, &phases.checkout_ms],
                )
                .await?
                .map(|r| {
                    Ok::<_, tokio_postgres::Error>(Timings {
                        queue_ms: r.try_get(0)?,
                        fetch_ms: r.try_get(1)?,
                        checkout_ms: r.try_get(2)?,
                        to_first_step_ms: r.try_get(3)?,
                    })
                })
                .transpose()?,
            };
            let Some(policy) = policy.as_deref() else {
                return Ok((step, timings));
            };
            let found = query_opt(
                &*c,
                &format!(
                    "SELECT pipeline, repo, ref, commit_sha,
                            (SELECT COUNT(*) FROM steps WHERE run_id = $1 AND attempt = {CURRENT_ATTEMPT}),
                            (SELECT name FROM steps WHERE run_id = $1 AND attempt = {CURRENT_ATTEMPT} AND number = $2)
                     FROM runs WHERE id = $1"
                ),
                &[&run_id, &number],
            )
            .await?;
            if let Some(r) = found {
                let (pipeline, repo, git_ref, commit): (String, String, String, String) =
                    (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
                let total: i64 = r.try_get(4)?;
                let name: String = r.try_get::<_, Option<String>>(5)?.unwrap_or_default();
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
                report(&*c, policy, &t).await?;
            }
            Ok((step, timings))
        }})
    }

    pub(super) fn end_step(
        &self,
        run_id: i64,
        number: i64,
        end: StepEnd,
    ) -> Result<Option<Step>, StoreError> {
        let end = Arc::new(end);
        let me = Arc::new(self.instance.clone());
        self.write(false, move |c, _| {
            let end = Arc::clone(&end);
            let me = Arc::clone(&me);
            async move {
                let step = query_opt(
                    &*c,
                    &format!(
                        "UPDATE steps SET status = $3, exit_code = $4, signal = $5, reason = $6,
                                started_at = COALESCE(started_at, $7), finished_at = $7
                         WHERE run_id = $1 AND attempt = {CURRENT_ATTEMPT} AND number = $2
                           AND {STILL_MINE_8}
                         RETURNING {STEP_COLUMNS}"
                    ),
                    &[
                        &run_id,
                        &number,
                        &end.status.as_str(),
                        &end.exit_code.map(i64::from),
                        &end.signal.map(i64::from),
                        &end.reason,
                        &now_ms(),
                        &*me,
                    ],
                )
                .await?
                .as_ref()
                .map(step_from_row)
                .transpose()?;
                if step.is_some() {
                    notify_log(&*c, run_id).await?;
                }
                Ok(step)
            }
        })
    }

    pub(super) fn add_dropped(&self, run_id: i64, bytes: u64) -> Result<(), StoreError> {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.write(false, move |c, _| async move {
            execute(
                &*c,
                "UPDATE runs SET log_dropped = log_dropped + $2 WHERE id = $1",
                &[&run_id, &bytes],
            )
            .await
            .map(drop)
        })
    }

    pub(super) fn add_log(&self, piece: LogPiece) -> Result<(), StoreError> {
        let piece = Arc::new(piece);
        self.write(false, move |c, _| {
            let piece = Arc::clone(&piece);
            async move {
                let at = i64::try_from(piece.at).unwrap_or(i64::MAX);
                // A piece written again after a failed answer is the same bytes.
                let kept = execute(
                    &*c,
                    "INSERT INTO log_chunks (run_id, attempt, step, at, bytes)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[&piece.run, &piece.attempt, &piece.step, &at, &piece.bytes],
                )
                .await?;
                if kept > 0 {
                    notify_log(&*c, piece.run).await?;
                }
                Ok(())
            }
        })
    }

    pub(super) fn finish(
        &self,
        run_id: i64,
        status: RunStatus,
        reason: Option<String>,
        leftover: StepStatus,
    ) -> Result<Option<(Run, Vec<Step>)>, StoreError> {
        let reason = Arc::new(reason);
        let me = self.instance.clone();
        self.write(true, move |c, policy| {
            let reason = Arc::clone(&reason);
            let me = me.clone();
            async move {
                let Some(found) = query_opt(
                    &*c,
                    "SELECT owner, cancel_requested, status FROM runs WHERE id = $1 FOR UPDATE",
                    &[&run_id],
                )
                .await?
                else {
                    return Ok(None);
                };
                let owner: Option<String> = found.try_get(0)?;
                let current: String = found.try_get(2)?;
                let claimed = owner.is_some();
                if owner.is_some_and(|o| o != me)
                    || (claimed && current != RunStatus::Running.as_str())
                {
                    // Its lease expired and another instance took the run over, or
                    // recovered it (queued again, or ended) before anyone claimed it:
                    // the end of the lost attempt is not the run's.
                    return Ok(None);
                }
                // A cancel asked through another instance was answered as applied: it
                // holds as a local one does.
                let requested: Option<String> = found.try_get(1)?;
                let (status, reason) = match requested {
                    Some(why) if matches!(status, RunStatus::Succeeded | RunStatus::Skipped) => {
                        (RunStatus::Canceled, Some(why))
                    }
                    _ => (status, (*reason).clone()),
                };
                let Some(run) = finish_in(&*c, run_id, status, reason.as_deref(), leftover).await?
                else {
                    return Ok(None);
                };
                if let Some(policy) = policy.as_deref() {
                    report(
                        &*c,
                        policy,
                        &transition_of(&run, run.status, run.reason.as_deref()),
                    )
                    .await?;
                }
                // Its group may be free now, on every instance.
                notify_runs(&*c).await?;
                notify_log(&*c, run_id).await?;
                Ok(Some((run, steps_in(&*c, run_id, None).await?)))
            }
        })
    }

    /// The row is locked first: a restarting owner's requeue (which locks it too) either
    /// sees the cancel recorded for an interrupted run, or has queued the run already,
    /// which is then canceled here.
    pub(super) fn cancel(&self, run_id: i64, reason: String) -> Result<QueuedCancel, StoreError> {
        let reason = Arc::new(reason);
        self.write(true, move |c, policy| {
            let reason = Arc::clone(&reason);
            async move {
                let Some(found) = query_opt(
                    &*c,
                    "SELECT status FROM runs WHERE id = $1 FOR UPDATE",
                    &[&run_id],
                )
                .await?
                else {
                    return Ok(QueuedCancel::NoSuchRun);
                };
                let status =
                    RunStatus::parse(&found.try_get::<_, String>(0)?).unwrap_or(RunStatus::Failed);
                if status == RunStatus::Interrupted {
                    execute(
                        &*c,
                        "UPDATE runs SET cancel_requested = COALESCE(cancel_requested, $2)
                         WHERE id = $1",
                        &[&run_id, &*reason],
                    )
                    .await?;
                    return Ok(QueuedCancel::Asked);
                }
                if status != RunStatus::Queued {
                    return Ok(QueuedCancel::NotQueued(status));
                }
                let canceled = query_opt(
                    &*c,
                    &format!(
                        "UPDATE runs SET status = 'canceled', reason = $2, finished_at = $3
                         WHERE id = $1 AND status = 'queued' RETURNING {RUN_COLUMNS}"
                    ),
                    &[&run_id, &*reason, &now_ms()],
                )
                .await?;
                if let Some(row) = canceled {
                    let run = run_from_row(&row)?;
                    if let Some(policy) = policy.as_deref() {
                        report(
                            &*c,
                            policy,
                            &transition_of(&run, run.status, run.reason.as_deref()),
                        )
                        .await?;
                    }
                    return Ok(QueuedCancel::Canceled(Box::new(run)));
                }
                Ok(QueuedCancel::NotQueued(status))
            }
        })
    }

    /// Only this instance's runs: the others' still run, or are recovered by another
    /// instance once their lease expires (`recover_expired`). A cancel another
    /// instance was asked for one of them stays recorded: the requeue that follows
    /// ends that run canceled, once its leftovers are gone.
    ///
    /// The runs are held for a whole lease from now: other instances leave them to this
    /// one while it kills what they left behind, and take them over (see `recover`)
    /// only if it dies before it queues them again.
    pub(super) fn interrupt_own(&self) -> Result<Vec<i64>, StoreError> {
        let owner = self.instance.clone();
        let lease_ms = self.lease_ms();
        self.write(false, move |c, _| {
            let owner = owner.clone();
            async move {
                let ids = owned_ids(&*c, RunStatus::Running, &owner).await?;
                interrupt_in(&*c, &ids, "the daemon stopped while this run was running").await?;
                if !ids.is_empty() {
                    execute(
                        &*c,
                        "UPDATE runs SET lease_until = hookci_clock_ms() + $2 WHERE id = ANY($1)",
                        &[&ids, &lease_ms],
                    )
                    .await?;
                    // Their groups are free now, on every instance.
                    notify_runs(&*c).await?;
                }
                Ok(ids)
            }
        })
    }

    pub(super) fn requeue_own(&self) -> Result<Vec<Recovered>, StoreError> {
        let owner = self.instance.clone();
        self.write(true, move |c, reporter| {
            let owner = owner.clone();
            async move {
                let ids = owned_ids(&*c, RunStatus::Interrupted, &owner).await?;
                requeue_in(&*c, &ids, reporter.as_deref(), BY_STOP).await
            }
        })
    }

    /// Each ref's change is applied only if its stored head is still the one the pass
    /// read: a conditional write, so a push recorded meanwhile by any instance wins.
    pub(super) fn reconciled(
        &self,
        repo: String,
        changes: Vec<RefChange>,
    ) -> Result<Reconciled, StoreError> {
        let input = Arc::new((repo, changes));
        self.write_upkeep(true, move |c, policy| {
            let input = Arc::clone(&input);
            async move {
                let (repo, changes) = &*input;
                let key = repo_key(repo);
                let mut out = Reconciled::default();
                for change in changes {
                    let applied = match &change.seen {
                        Some(seen) => execute(
                            &*c,
                            "UPDATE ref_heads SET commit_sha = $3, source = 'reconcile', updated_at = $5
                             WHERE repo = $1 AND ref = $2 AND commit_sha = $4",
                            &[&key, &change.git_ref, &change.head, seen, &now_ms()],
                        )
                        .await?,
                        None => execute(
                            &*c,
                            "INSERT INTO ref_heads (repo, ref, commit_sha, source, updated_at)
                             VALUES ($1, $2, $3, 'reconcile', $4) ON CONFLICT (repo, ref) DO NOTHING",
                            &[&key, &change.git_ref, &change.head, &now_ms()],
                        )
                        .await?,
                    };
                    if applied == 0 {
                        out.stale.push(change.git_ref.clone());
                        continue;
                    }
                    for run in &change.runs {
                        out.runs.push(insert_run(&*c, run, None, policy.as_deref()).await?);
                    }
                }
                execute(
                    &*c,
                    "INSERT INTO reconciled (repo, first_at) VALUES ($1, $2) ON CONFLICT (repo) DO NOTHING",
                    &[&key, &now_ms()],
                )
                .await?;
                if out.runs.iter().any(|r| !r.existing) {
                    notify_runs(&*c).await?;
                }
                Ok(out)
            }
        })
    }

    pub(super) fn prune_old(&self, keep: u64, cutoff_ms: i64) -> Result<Pruned, StoreError> {
        let keep = i64::try_from(keep.max(1)).unwrap_or(i64::MAX);
        self.write_upkeep(false, move |c, _| async move {
            let runs = prune_runs(&*c, keep, cutoff_ms).await?;
            let deliveries = prune_deliveries(&*c, keep, cutoff_ms).await?;
            Ok(Pruned {
                more: runs.len() == PRUNE_RUNS || deliveries == PRUNE_DELIVERIES,
                runs,
                deliveries,
            })
        })
    }

    pub(super) fn attempted(&self, id: i64, attempt: Attempt) -> Result<(), StoreError> {
        let (state, reason, next_at) = match attempt {
            Attempt::Sent => ("sent", None, None),
            Attempt::Retry { at, reason } => ("pending", Some(reason), Some(at)),
            Attempt::Failed { reason } => ("failed", Some(reason), None),
        };
        let reason = Arc::new(reason);
        self.write(false, move |c, _| {
            let reason = Arc::clone(&reason);
            async move {
                execute(
                    &*c,
                    "UPDATE reports SET state = $2, reason = $3, attempts = attempts + 1,
                            next_at = COALESCE($4, next_at)
                     WHERE id = $1",
                    &[&id, &state, &*reason, &next_at],
                )
                .await
                .map(drop)
            }
        })
    }
}

/// Ends the runs `ids` (locked by the caller) `interrupted` with `reason`, the steps
/// of their current attempts with them.
pub(super) async fn interrupt_in<C: GenericClient>(
    c: &C,
    ids: &[i64],
    reason: &str,
) -> PgResult<()> {
    for id in ids {
        finish_in(
            c,
            *id,
            RunStatus::Interrupted,
            Some(reason),
            StepStatus::Interrupted,
        )
        .await?;
        // Followers on other instances see the steps end at once.
        notify_log(c, *id).await?;
    }
    Ok(())
}

/// Today's attempt rules for the interrupted runs `ids` (locked by the caller): queued
/// again for one more attempt, or failed (`interrupted: fail` once a step had started,
/// or out of attempts); `by` says what interrupted them (once, and many times). A run
/// a cancel was asked of (while it ran, or while it was interrupted) ends `canceled`
/// instead: that cancel was answered as applied, so it is not built again. Wakes every
/// instance when one is queued. A run queued again keeps its last owner, whose late
/// writes of that attempt are refused for it until the next claim names a new one.
pub(super) async fn requeue_in<C: GenericClient>(
    c: &C,
    ids: &[i64],
    reporter: Option<&dyn ReportPolicy>,
    (once, many): (&str, &str),
) -> PgResult<Vec<Recovered>> {
    let rows = query(
        c,
        "SELECT id, attempt, interrupted, EXISTS (SELECT 1 FROM steps s
             WHERE s.run_id = runs.id AND s.attempt = runs.attempt AND s.started_at IS NOT NULL),
                cancel_requested IS NOT NULL, pipeline
         FROM runs WHERE status = 'interrupted' AND id = ANY($1) ORDER BY id",
        &[&ids],
    )
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let (id, attempt): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        let on_interrupt: String = row.try_get(2)?;
        let stepped: bool = row.try_get(3)?;
        let asked: bool = row.try_get(4)?;
        let pipeline: String = row.try_get(5)?;
        if asked {
            cancel_as_asked(c, id, reporter).await?;
            out.push(Recovered {
                run: id,
                pipeline,
                attempt,
                status: RunStatus::Canceled,
            });
            continue;
        }
        let status = if stepped && on_interrupt == OnInterrupt::Fail.as_str() {
            execute(
                c,
                "UPDATE runs SET status = 'failed', reason = $2 WHERE id = $1",
                &[&id, &NOT_RETRIED],
            )
            .await?;
            RunStatus::Failed
        } else if attempt < MAX_ATTEMPTS {
            execute(
                c,
                "UPDATE runs SET status = 'queued', attempt = attempt + 1, started_at = NULL,
                        finished_at = NULL, reason = $2, queue_ms = NULL, fetch_ms = NULL,
                        checkout_ms = NULL, first_step_ms = NULL, lease_until = NULL,
                        cancel_requested = NULL
                 WHERE id = $1",
                &[&id, &format!("attempt {attempt} was interrupted by {once}")],
            )
            .await?;
            RunStatus::Queued
        } else {
            execute(
                c,
                "UPDATE runs SET status = 'failed', reason = $2 WHERE id = $1",
                &[&id, &format!("interrupted on {attempt} attempts by {many}")],
            )
            .await?;
            RunStatus::Failed
        };
        if let Some(reporter) = reporter {
            report_run(c, reporter, id).await?;
        }
        notify_log(c, id).await?;
        out.push(Recovered {
            run: id,
            pipeline,
            attempt,
            status,
        });
    }
    if out.iter().any(|r| r.status == RunStatus::Queued) {
        notify_runs(c).await?;
    }
    Ok(out)
}

/// Ends run `id` (locked by the caller: claimed, or interrupted) `canceled` with the
/// reason of the cancel asked for it, in its current attempt: the step it was in is
/// `canceled`, those it never started `skipped`. Reports the end, and tells followers
/// on every instance at once.
pub(super) async fn cancel_as_asked<C: GenericClient>(
    c: &C,
    id: i64,
    reporter: Option<&dyn ReportPolicy>,
) -> PgResult<Run> {
    let now = now_ms();
    let run = run_from_row(
        &query(
            c,
            &format!(
                "UPDATE runs SET status = 'canceled', reason = cancel_requested, finished_at = $2
                 WHERE id = $1 RETURNING {RUN_COLUMNS}"
            ),
            &[&id, &now],
        )
        .await?[0],
    )?;
    execute(
        c,
        &format!(
            "UPDATE steps SET status = CASE WHEN started_at IS NULL THEN 'skipped' ELSE 'canceled' END,
                    finished_at = CASE WHEN started_at IS NULL THEN NULL ELSE $2::BIGINT END
             WHERE run_id = $1 AND attempt = {CURRENT_ATTEMPT}
               AND status IN ('pending', 'running', 'interrupted')"
        ),
        &[&id, &now],
    )
    .await?;
    if let Some(reporter) = reporter {
        report(
            c,
            reporter,
            &transition_of(&run, run.status, run.reason.as_deref()),
        )
        .await?;
    }
    notify_log(c, id).await?;
    Ok(run)
}

/// Ends a run; returns it as committed (`None`: no such run).
async fn finish_in<C: GenericClient>(
    c: &C,
    run_id: i64,
    status: RunStatus,
    reason: Option<&str>,
    leftover: StepStatus,
) -> PgResult<Option<Run>> {
    let now = now_ms();
    let run = query_opt(
        c,
        &format!(
            "UPDATE runs SET status = $2, reason = $3, finished_at = $4, lease_until = NULL
             WHERE id = $1 RETURNING {RUN_COLUMNS}"
        ),
        &[&run_id, &status.as_str(), &reason, &now],
    )
    .await?
    .as_ref()
    .map(run_from_row)
    .transpose()?;
    execute(
        c,
        &format!(
            "UPDATE steps SET status = $2,
                    finished_at = CASE WHEN started_at IS NULL THEN NULL ELSE $3::BIGINT END
             WHERE run_id = $1 AND attempt = {CURRENT_ATTEMPT} AND status IN ('pending', 'running')"
        ),
        &[&run_id, &leftover.as_str(), &now],
    )
    .await?;
    Ok(run)
}

/// Records one delivery in the caller's transaction.
async fn record_in(
    c: &Object,
    d: &NewDelivery,
    policy: Option<&dyn ReportPolicy>,
) -> PgResult<DeliveryOutcome> {
    let seq = query_opt(
        c,
        "INSERT INTO deliveries (id, event, repo, ref, after, received_at) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO NOTHING RETURNING seq",
        &[&d.id, &d.event, &d.repo, &d.git_ref, &d.after, &now_ms()],
    )
    .await?;
    let Some(seq) = seq else {
        return delivery_runs(c, &d.id)
            .await
            .map(DeliveryOutcome::Duplicate);
    };
    let seq: i64 = seq.try_get(0)?;
    let mut runs = Vec::new();
    for decision in &d.decisions {
        let (outcome, reason, run_id) = match &decision.run {
            None => ("not_triggered", decision.reason.clone(), None),
            Some(run) => {
                let made = insert_run(c, run, Some(&d.id), policy).await?;
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
        execute(
            c,
            "INSERT INTO decisions (delivery, pipeline, outcome, reason, run_id) VALUES ($1, $2, $3, $4, $5)",
            &[
                &seq,
                &decision.pipeline.as_deref().unwrap_or_default(),
                &outcome,
                &reason,
                &run_id,
            ],
        )
        .await?;
    }
    note_head(c, &d.repo, &d.git_ref, d.head.as_deref(), "push").await?;
    execute(
        c,
        "INSERT INTO repositories (repo, clone_url, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (repo) DO UPDATE SET clone_url = excluded.clone_url, updated_at = excluded.updated_at
         WHERE repositories.clone_url <> excluded.clone_url",
        &[&repo_key(&d.repo), &d.clone_url, &now_ms()],
    )
    .await?;
    let queued = runs.iter().any(|r| {
        r.changed
            .first()
            .is_some_and(|run| run.status == RunStatus::Queued)
    });
    if queued {
        notify_runs(c).await?;
    }
    Ok(DeliveryOutcome::New(runs))
}

/// Remembers where a ref points (`None`: it was deleted), for reconciling later.
async fn note_head<C: GenericClient>(
    c: &C,
    repo: &str,
    git_ref: &str,
    commit: Option<&str>,
    source: &str,
) -> PgResult<()> {
    let repo = repo_key(repo);
    match commit {
        Some(sha) => {
            execute(
                c,
                "INSERT INTO ref_heads (repo, ref, commit_sha, source, updated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (repo, ref) DO UPDATE SET commit_sha = excluded.commit_sha,
                     source = excluded.source, updated_at = excluded.updated_at",
                &[&repo, &git_ref, &sha, &source, &now_ms()],
            )
            .await?
        }
        None => {
            execute(
                c,
                "DELETE FROM ref_heads WHERE repo = $1 AND ref = $2",
                &[&repo, &git_ref],
            )
            .await?
        }
    };
    Ok(())
}

/// Inserts a run unless its key exists (then names the existing run), and applies its
/// group's cancel policy to older runs.
async fn insert_run<C: GenericClient>(
    c: &C,
    run: &NewRun,
    delivery: Option<&str>,
    policy: Option<&dyn ReportPolicy>,
) -> PgResult<RunRef> {
    let now = now_ms();
    let (status, finished_at) = match run.skipped {
        Some(_) => (RunStatus::Skipped, Some(now)),
        None => (RunStatus::Queued, None),
    };
    let id = query_opt(
        c,
        "INSERT INTO runs (pipeline, repo, ref, commit_sha, before_sha, clone_url, run_key, grp, trigger,
                           delivery_id, status, reason, generation, created_at, finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (run_key) DO NOTHING RETURNING id",
        &[
            &run.pipeline,
            &run.repo,
            &run.git_ref,
            &run.commit,
            &run.before,
            &run.clone_url,
            &run.key,
            &run.group,
            &run.trigger,
            &delivery,
            &status.as_str(),
            &run.skipped,
            &run.generation,
            &now,
            &finished_at,
        ],
    )
    .await?;
    let Some(id) = id else {
        let existing: i64 =
            query(c, "SELECT id FROM runs WHERE run_key = $1", &[&run.key]).await?[0].try_get(0)?;
        return Ok(RunRef {
            id: existing,
            pipeline: run.pipeline.clone(),
            existing: true,
            supersedes: Vec::new(),
            changed: Vec::new(),
        });
    };
    let id: i64 = id.try_get(0)?;
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
        report(c, policy, &t).await?;
    }
    let mut supersedes = Vec::new();
    let mut changed = Vec::new();
    if let (Some(group), None, true) = (
        &run.group,
        &run.skipped,
        run.supersede != Supersede::Nothing,
    ) {
        let with_running = run.supersede == Supersede::Running;
        let base = query_opt(
            c,
            "SELECT before_sha FROM runs
             WHERE grp = $1 AND ref = $3 AND id < $2 AND (status = 'queued' OR ($4 AND status = 'running'))
             ORDER BY id LIMIT 1",
            &[group, &id, &run.git_ref, &with_running],
        )
        .await?;
        if let Some(base) = base {
            let base: String = base.try_get(0)?;
            execute(
                c,
                "UPDATE runs SET before_sha = $2 WHERE id = $1",
                &[&id, &base],
            )
            .await?;
        }
        let reason = format!("superseded by run {id}");
        let canceled = runs_from(
            &query(
                c,
                &format!(
                    "UPDATE runs SET status = 'canceled', reason = $3, finished_at = $4
                     WHERE grp = $1 AND status = 'queued' AND id < $2 AND (NOT $6 OR ref = $5)
                     RETURNING {RUN_COLUMNS}"
                ),
                &[
                    group,
                    &id,
                    &reason,
                    &now,
                    &run.git_ref,
                    &run.supersede_own_ref,
                ],
            )
            .await?,
        )?;
        if let Some(policy) = policy {
            for old in &canceled {
                report(
                    c,
                    policy,
                    &transition_of(old, RunStatus::Canceled, Some(&reason)),
                )
                .await?;
            }
        }
        changed.extend(canceled);
        if with_running {
            let rows = query(
                c,
                "SELECT id FROM runs WHERE grp = $1 AND status = 'running' AND id < $2
                 AND (NOT $4 OR ref = $3) ORDER BY id",
                &[group, &id, &run.git_ref, &run.supersede_own_ref],
            )
            .await?;
            supersedes = rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
        }
    }
    let created = run_from_row(
        &query(
            c,
            &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
            &[&id],
        )
        .await?[0],
    )?;
    changed.insert(0, created);
    Ok(RunRef {
        id,
        pipeline: run.pipeline.clone(),
        existing: false,
        supersedes,
        changed,
    })
}

async fn delivery_runs<C: GenericClient>(c: &C, id: &str) -> PgResult<Vec<RunRef>> {
    let rows = query(
        c,
        "SELECT run_id, pipeline, outcome FROM decisions
         WHERE delivery = (SELECT seq FROM deliveries WHERE id = $1) AND run_id IS NOT NULL
         ORDER BY pipeline COLLATE \"C\"",
        &[&id],
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok(RunRef {
                id: r.try_get(0)?,
                pipeline: r.try_get(1)?,
                existing: r.try_get::<_, String>(2)? == "duplicate",
                supersedes: Vec::new(),
                changed: Vec::new(),
            })
        })
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

/// Writes the reports `policy` gives for `t`. The previous result of the run's ref is
/// read first, whether the policy asks for it or not: the policy's question cannot
/// wait on the database.
async fn report<C: GenericClient>(
    c: &C,
    policy: &dyn ReportPolicy,
    t: &Transition<'_>,
) -> PgResult<()> {
    let previous = query_opt(
        c,
        "SELECT status FROM runs WHERE pipeline = $1 AND id < $2 AND ref = $3
             AND status IN ('succeeded', 'failed', 'timed_out')
         ORDER BY id DESC LIMIT 1",
        &[&t.pipeline, &t.run, &t.git_ref],
    )
    .await?
    .map(|r| r.try_get::<_, String>(0))
    .transpose()?
    .and_then(|s| RunStatus::parse(&s));
    let reports: Vec<NewReport> = policy.reports(t, &move || previous);
    for r in &reports {
        if let Some(key) = &r.coalesce {
            execute(
                c,
                "DELETE FROM reports WHERE coalesce_key = $1 AND state = 'pending'",
                &[key],
            )
            .await?;
        }
        execute(
            c,
            "INSERT INTO reports (run_id, kind, target, address, coalesce_key, signing, body, outcome,
                                  state, attempts, next_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', 0, $9, $9)",
            &[
                &t.run,
                &r.kind.as_str(),
                &r.target,
                &r.address,
                &r.coalesce,
                &r.signing,
                &r.body,
                &r.outcome,
                &now_ms(),
            ],
        )
        .await?;
    }
    Ok(())
}

/// Writes the reports of run `id` as it now stands.
pub(super) async fn report_run<C: GenericClient>(
    c: &C,
    policy: &dyn ReportPolicy,
    id: i64,
) -> PgResult<()> {
    let run = query_opt(
        c,
        &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
        &[&id],
    )
    .await?
    .as_ref()
    .map(run_from_row)
    .transpose()?;
    if let Some(run) = run {
        report(
            c,
            policy,
            &transition_of(&run, run.status, run.reason.as_deref()),
        )
        .await?;
    }
    Ok(())
}

/// Where retention's walk of a table ends (see `store::writes`): `None`, nothing to
/// delete; else (beyond, end).
async fn prune_from<C: GenericClient>(
    c: &C,
    newest_beyond: &str,
    oldest_time: &str,
    keep: i64,
    cutoff_ms: i64,
) -> PgResult<Option<(i64, i64)>> {
    let beyond: Option<i64> = query_opt(c, newest_beyond, &[&keep])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    let oldest: Option<i64> = query_opt(c, oldest_time, &[])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    let aged = oldest.is_some_and(|t| t < cutoff_ms);
    Ok(match (beyond, aged) {
        (None, false) => None,
        (beyond, false) => beyond.map(|b| (b, b)),
        (beyond, true) => Some((beyond.unwrap_or(0), i64::MAX)),
    })
}

async fn prune_runs<C: GenericClient>(c: &C, keep: i64, cutoff_ms: i64) -> PgResult<Vec<i64>> {
    let Some((beyond, end)) = prune_from(
        c,
        &format!("SELECT id FROM runs WHERE {FINISHED} ORDER BY id DESC LIMIT 1 OFFSET $1"),
        &format!("SELECT created_at FROM runs WHERE {FINISHED} ORDER BY id LIMIT 1"),
        keep,
        cutoff_ms,
    )
    .await?
    else {
        return Ok(Vec::new());
    };
    let ids: Vec<i64> = query(
        c,
        &format!(
            "SELECT id FROM runs
             WHERE {FINISHED} AND id <= $1 AND (id <= $2 OR created_at < $3)
             ORDER BY id LIMIT {PRUNE_RUNS}"
        ),
        &[&end, &beyond, &cutoff_ms],
    )
    .await?
    .iter()
    .map(|r| r.try_get(0))
    .collect::<Result<_, _>>()?;
    execute(c, "DELETE FROM steps WHERE run_id = ANY($1)", &[&ids]).await?;
    execute(c, "DELETE FROM log_chunks WHERE run_id = ANY($1)", &[&ids]).await?;
    execute(c, "DELETE FROM reports WHERE run_id = ANY($1)", &[&ids]).await?;
    execute(c, "DELETE FROM runs WHERE id = ANY($1)", &[&ids]).await?;
    Ok(ids)
}

async fn prune_deliveries<C: GenericClient>(c: &C, keep: i64, cutoff_ms: i64) -> PgResult<usize> {
    let Some((beyond, end)) = prune_from(
        c,
        "SELECT seq FROM deliveries ORDER BY seq DESC LIMIT 1 OFFSET $1",
        "SELECT received_at FROM deliveries ORDER BY seq LIMIT 1",
        keep,
        cutoff_ms,
    )
    .await?
    else {
        return Ok(0);
    };
    let seqs: Vec<i64> = query(
        c,
        &format!(
            "SELECT seq FROM deliveries d
             WHERE seq <= $1 AND (seq <= $2 OR received_at < $3)
               AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.delivery_id = d.id)
             ORDER BY seq LIMIT {PRUNE_DELIVERIES}"
        ),
        &[&end, &beyond, &cutoff_ms],
    )
    .await?
    .iter()
    .map(|r| r.try_get(0))
    .collect::<Result<_, _>>()?;
    execute(
        c,
        "DELETE FROM decisions WHERE delivery = ANY($1)",
        &[&seqs],
    )
    .await?;
    execute(c, "DELETE FROM deliveries WHERE seq = ANY($1)", &[&seqs]).await?;
    Ok(seqs.len())
}

/// The runs of `owner` in `status`, locked for the transaction, oldest first.
async fn owned_ids<C: GenericClient>(c: &C, status: RunStatus, owner: &str) -> PgResult<Vec<i64>> {
    let rows = query(
        c,
        "SELECT id FROM runs WHERE status = $1 AND owner = $2 ORDER BY id FOR UPDATE",
        &[&status.as_str(), &owner],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<i64>, _>>()?)
}
