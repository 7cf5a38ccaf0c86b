//! The store's interface: what every stage asks of it, whichever database holds it
//! (SQLite in `state_dir`, [`Sqlite`], or a shared PostgreSQL, [`Postgres`]), and the
//! choice between them at start. Calls block: async callers run them on blocking
//! threads (intake's `record_delivery_async` excepted).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, Notify};

use super::postgres::{PgTarget, Postgres};
use super::{
    Attempt, Delivery, DeliveryOutcome, LogNotice, LogPiece, NewDelivery, NewRun, OnInterrupt,
    Phases, Pruned, QueuedCancel, ReconcileView, Reconciled, Recovered, RefChange, Report,
    ReportPolicy, ReportView, Run, RunFilter, RunRef, RunStatus, Sqlite, Step, StepEnd, StepStatus,
    StoreError, Timings,
};

/// The future of [`Store::record_delivery_async`]: boxed, so the trait stays usable as
/// `dyn Store`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Held while this instance reconciles; dropping it lets another instance do so.
pub type ReconcileGuard = Box<dyn Send>;

/// Everything hookci keeps: deliveries and their decisions, runs and steps, ref heads
/// for reconcile, and the outbox. Both backends pass one conformance suite
/// (`store::conformance`).
pub trait Store: Send + Sync {
    /// Where the store is, for logs: a path, or a database URL without its password.
    fn describe(&self) -> String;

    /// Gives the store the policy that decides what each run transition reports,
    /// decided inside the transaction of the transition. Without one, nothing is
    /// reported.
    fn set_report_policy(&self, policy: Arc<dyn ReportPolicy>);

    /// Notified when another instance queued runs (a shared database); the scheduler
    /// claims when it is. A store only this daemon writes never notifies it.
    fn wakeups(&self) -> Arc<Notify>;

    /// `Some` when this instance may reconcile now, held for the pass; `None` while
    /// another instance sharing the database reconciles.
    fn try_reconcile(&self) -> Result<Option<ReconcileGuard>, StoreError>;

    fn ref_heads(&self, repo: &str) -> Result<HashMap<String, String>, StoreError>;
    fn reconcile_view(&self, repo: &str) -> Result<ReconcileView, StoreError>;
    fn clone_url_of(&self, repo: &str) -> Result<Option<String>, StoreError>;
    fn run(&self, id: i64) -> Result<Option<Run>, StoreError>;
    fn steps(&self, run_id: i64) -> Result<Vec<Step>, StoreError>;
    fn steps_of(&self, run_id: i64, attempt: Option<i64>) -> Result<Vec<Step>, StoreError>;
    fn runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError>;
    fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError>;
    fn count_by_status(&self) -> Result<Vec<(RunStatus, i64)>, StoreError>;
    fn latest_per_ref(&self) -> Result<Vec<Run>, StoreError>;
    fn last_finished(&self, pipeline: &str, refs: &[String]) -> Result<Option<Run>, StoreError>;
    fn due_reports(&self, now: i64, limit: u32) -> Result<Vec<Report>, StoreError>;
    fn next_report_at(&self) -> Result<Option<i64>, StoreError>;
    /// How many reports are still to send (due now or waiting for a retry).
    fn reports_pending(&self) -> Result<i64, StoreError>;
    fn reports_of(&self, run: i64) -> Result<Vec<ReportView>, StoreError>;

    fn record_delivery(&self, d: NewDelivery) -> Result<DeliveryOutcome, StoreError>;
    fn record_delivery_async(
        &self,
        d: NewDelivery,
    ) -> BoxFuture<'_, Result<DeliveryOutcome, StoreError>>;
    fn create_run(&self, run: NewRun) -> Result<RunRef, StoreError>;
    fn claim_next(&self) -> Result<Option<Run>, StoreError>;
    /// Gives back a claimed run that never started: queued again as it was, the attempt
    /// unspent; or, when another instance was asked to cancel it meanwhile (a cancel
    /// answered as applied), ended `canceled` with that cancel's reason, returned as
    /// committed.
    fn unclaim(&self, run_id: i64) -> Result<Option<Run>, StoreError>;
    fn plan_steps(
        &self,
        run_id: i64,
        names: Vec<String>,
        on_interrupt: OnInterrupt,
    ) -> Result<(), StoreError>;
    fn step_started(&self, run_id: i64, number: i64) -> Result<Option<Step>, StoreError>;
    /// `step_started` for a run's first step, recording with it how long the run took
    /// to get there (see `Timings`), in the same commit; returns both as committed.
    fn first_step_started(
        &self,
        run_id: i64,
        number: i64,
        phases: Phases,
    ) -> Result<(Option<Step>, Option<Timings>), StoreError>;
    fn step_finished(
        &self,
        run_id: i64,
        number: i64,
        end: StepEnd,
    ) -> Result<Option<Step>, StoreError>;
    fn log_dropped(&self, run_id: i64, bytes: u64) -> Result<(), StoreError>;
    fn finish_run(
        &self,
        run_id: i64,
        status: RunStatus,
        reason: Option<String>,
        leftover: StepStatus,
    ) -> Result<Option<(Run, Vec<Step>)>, StoreError>;
    /// Cancels a queued run; records the cancel of an `interrupted` one, which its
    /// requeue then ends `canceled` (`QueuedCancel::Asked`).
    fn cancel_queued(&self, run_id: i64, reason: String) -> Result<QueuedCancel, StoreError>;
    /// On start: this instance's runs left `running` are `interrupted`.
    fn interrupt_running(&self) -> Result<Vec<i64>, StoreError>;
    /// After `interrupt_running`: each interrupted run queued again, failed, or, when a
    /// cancel was asked of it, `canceled`.
    fn requeue_interrupted(&self) -> Result<Vec<Recovered>, StoreError>;

    /// Whether other instances share the store: only then do running runs hold leases
    /// and cancels travel between instances. The methods below do nothing otherwise.
    fn shared(&self) -> bool {
        false
    }
    /// How long a claim, and each renewal, holds a running run for this instance.
    fn set_lease(&self, _lease: Duration) {}
    /// Renews the lease of those of `runs` this instance has running, and of no other
    /// run; returns their ids. A run of `runs` that is not among them was taken from it.
    /// Fails fast (well within a third of the lease) when the database does not answer.
    fn renew_leases(&self, runs: &[i64]) -> Result<Vec<i64>, StoreError> {
        let _ = runs;
        Ok(Vec::new())
    }
    /// Running runs whose lease expired, by the database's clock: other instances'
    /// (a run without a lease counts as expired), and this instance's own that it does
    /// not hold (`held`: the runs it executes) any more. Those ask for a cancel end
    /// `canceled`; the others are interrupted and queued again (or failed) as
    /// `interrupt_running` and `requeue_interrupted` do. At most once however many
    /// instances look at the same time.
    fn recover_expired(&self, held: &[i64]) -> Result<Vec<Recovered>, StoreError> {
        let _ = held;
        Ok(Vec::new())
    }
    /// Asks the instance running run `run_id` to cancel it, recorded on the run: its
    /// owner applies it, or whoever recovers the run ends it `canceled`; `false` when
    /// the run is not running (always, on a store no other instance shares). The run then ends `canceled` unless it had already
    /// failed or timed out.
    fn request_cancel(&self, _run_id: i64, _reason: String) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Notified when another instance asked this one to cancel a run.
    fn cancel_wakeups(&self) -> Arc<Notify> {
        Arc::new(Notify::new())
    }
    /// The cancels other instances asked for this instance's running runs, with their
    /// reasons.
    fn cancel_requests(&self) -> Result<Vec<(i64, String)>, StoreError> {
        Ok(Vec::new())
    }

    fn record_reconcile(
        &self,
        repo: String,
        changes: Vec<RefChange>,
    ) -> Result<Reconciled, StoreError>;
    fn prune(&self, keep: u64, cutoff_ms: i64) -> Result<Pruned, StoreError>;
    fn report_attempted(&self, id: i64, attempt: Attempt) -> Result<(), StoreError>;

    /// Whether step output is kept here for every instance to serve (PostgreSQL).
    /// `false`: this machine's log files are the only copy, and the calls below do
    /// nothing (SQLite, one machine).
    fn shares_logs(&self) -> bool {
        false
    }
    /// Keeps a piece of a step's log; the instance running the step writes each piece
    /// once its file holds it, and all of them before it records the step's end.
    fn append_log(&self, piece: LogPiece) -> Result<(), StoreError> {
        let _ = piece;
        Ok(())
    }
    /// Up to `max` bytes of a step's log from `offset`, as far as the pieces kept so far
    /// reach (nothing past their end).
    fn read_log(
        &self,
        run: i64,
        attempt: i64,
        step: i64,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        let _ = (run, attempt, step, offset, max);
        Ok(Vec::new())
    }
    /// With logs shared, the news of every run's log, from whichever instance runs it
    /// (this one's too): live followers read the store again when theirs changed,
    /// rather than looking at it over and over.
    fn log_notices(&self) -> Option<broadcast::Receiver<LogNotice>> {
        None
    }
}

/// Opens the store the config names: PostgreSQL when `database` is set, else SQLite
/// in `state_dir`. `instance` is recorded as the owner of the runs it claims, each
/// held for `lease` where other instances share the store.
pub fn open(
    database: Option<&PgTarget>,
    state_dir: &Path,
    instance: &str,
    lease: Duration,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match database {
        Some(target) => Arc::new(Postgres::open(target, instance, lease)?),
        None => Arc::new(Sqlite::open_as(state_dir, Some(instance.to_owned()))?),
    })
}

impl Store for Sqlite {
    fn describe(&self) -> String {
        self.path().display().to_string()
    }
    fn set_report_policy(&self, policy: Arc<dyn ReportPolicy>) {
        Sqlite::set_report_policy(self, policy);
    }
    fn wakeups(&self) -> Arc<Notify> {
        Arc::clone(&self.wakeups)
    }
    fn try_reconcile(&self) -> Result<Option<ReconcileGuard>, StoreError> {
        // The state directory's lock already keeps a second daemon off this file.
        Ok(Some(Box::new(())))
    }
    fn ref_heads(&self, repo: &str) -> Result<HashMap<String, String>, StoreError> {
        Sqlite::ref_heads(self, repo)
    }
    fn reconcile_view(&self, repo: &str) -> Result<ReconcileView, StoreError> {
        Sqlite::reconcile_view(self, repo)
    }
    fn clone_url_of(&self, repo: &str) -> Result<Option<String>, StoreError> {
        Sqlite::clone_url_of(self, repo)
    }
    fn run(&self, id: i64) -> Result<Option<Run>, StoreError> {
        Sqlite::run(self, id)
    }
    fn steps(&self, run_id: i64) -> Result<Vec<Step>, StoreError> {
        Sqlite::steps(self, run_id)
    }
    fn steps_of(&self, run_id: i64, attempt: Option<i64>) -> Result<Vec<Step>, StoreError> {
        Sqlite::steps_of(self, run_id, attempt)
    }
    fn runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        Sqlite::runs(self, filter)
    }
    fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        Sqlite::delivery(self, id)
    }
    fn count_by_status(&self) -> Result<Vec<(RunStatus, i64)>, StoreError> {
        Sqlite::count_by_status(self)
    }
    fn latest_per_ref(&self) -> Result<Vec<Run>, StoreError> {
        Sqlite::latest_per_ref(self)
    }
    fn last_finished(&self, pipeline: &str, refs: &[String]) -> Result<Option<Run>, StoreError> {
        Sqlite::last_finished(self, pipeline, refs)
    }
    fn due_reports(&self, now: i64, limit: u32) -> Result<Vec<Report>, StoreError> {
        Sqlite::due_reports(self, now, limit)
    }
    fn next_report_at(&self) -> Result<Option<i64>, StoreError> {
        Sqlite::next_report_at(self)
    }
    fn reports_pending(&self) -> Result<i64, StoreError> {
        Sqlite::reports_pending(self)
    }
    fn reports_of(&self, run: i64) -> Result<Vec<ReportView>, StoreError> {
        Sqlite::reports_of(self, run)
    }
    fn record_delivery(&self, d: NewDelivery) -> Result<DeliveryOutcome, StoreError> {
        Sqlite::record_delivery(self, d)
    }
    fn record_delivery_async(
        &self,
        d: NewDelivery,
    ) -> BoxFuture<'_, Result<DeliveryOutcome, StoreError>> {
        Box::pin(Sqlite::record_delivery_async(self, d))
    }
    fn create_run(&self, run: NewRun) -> Result<RunRef, StoreError> {
        Sqlite::create_run(self, run)
    }
    fn claim_next(&self) -> Result<Option<Run>, StoreError> {
        Sqlite::claim_next(self)
    }
    fn unclaim(&self, run_id: i64) -> Result<Option<Run>, StoreError> {
        Sqlite::unclaim(self, run_id)
    }
    fn plan_steps(
        &self,
        run_id: i64,
        names: Vec<String>,
        on_interrupt: OnInterrupt,
    ) -> Result<(), StoreError> {
        Sqlite::plan_steps(self, run_id, names, on_interrupt)
    }
    fn step_started(&self, run_id: i64, number: i64) -> Result<Option<Step>, StoreError> {
        Sqlite::step_started(self, run_id, number)
    }
    fn first_step_started(
        &self,
        run_id: i64,
        number: i64,
        phases: Phases,
    ) -> Result<(Option<Step>, Option<Timings>), StoreError> {
        Sqlite::first_step_started(self, run_id, number, phases)
    }
    fn step_finished(
        &self,
        run_id: i64,
        number: i64,
        end: StepEnd,
    ) -> Result<Option<Step>, StoreError> {
        Sqlite::step_finished(self, run_id, number, end)
    }
    fn log_dropped(&self, run_id: i64, bytes: u64) -> Result<(), StoreError> {
        Sqlite::log_dropped(self, run_id, bytes)
    }
    fn finish_run(
        &self,
        run_id: i64,
        status: RunStatus,
        reason: Option<String>,
        leftover: StepStatus,
    ) -> Result<Option<(Run, Vec<Step>)>, StoreError> {
        Sqlite::finish_run(self, run_id, status, reason, leftover)
    }
    fn cancel_queued(&self, run_id: i64, reason: String) -> Result<QueuedCancel, StoreError> {
        Sqlite::cancel_queued(self, run_id, reason)
    }
    fn interrupt_running(&self) -> Result<Vec<i64>, StoreError> {
        Sqlite::interrupt_running(self)
    }
    fn requeue_interrupted(&self) -> Result<Vec<Recovered>, StoreError> {
        Sqlite::requeue_interrupted(self)
    }
    fn record_reconcile(
        &self,
        repo: String,
        changes: Vec<RefChange>,
    ) -> Result<Reconciled, StoreError> {
        Sqlite::record_reconcile(self, repo, changes)
    }
    fn prune(&self, keep: u64, cutoff_ms: i64) -> Result<Pruned, StoreError> {
        Sqlite::prune(self, keep, cutoff_ms)
    }
    fn report_attempted(&self, id: i64, attempt: Attempt) -> Result<(), StoreError> {
        Sqlite::report_attempted(self, id, attempt)
    }
}
