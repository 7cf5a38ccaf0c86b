//! The store's records: what goes in (deliveries, decisions, runs to create) and what
//! comes out (runs, steps, deliveries with their decisions). Plain data, no SQL.

use serde::Serialize;

/// A run's state, as the API and README name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Canceled,
    Skipped,
    Interrupted,
}

impl RunStatus {
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::TimedOut,
        RunStatus::Canceled,
        RunStatus::Skipped,
        RunStatus::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Canceled => "canceled",
            RunStatus::Skipped => "skipped",
            RunStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

/// A step's state: a run's final states plus `pending` (not reached yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Canceled,
    Skipped,
    Interrupted,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::TimedOut => "timed_out",
            StepStatus::Canceled => "canceled",
            StepStatus::Skipped => "skipped",
            StepStatus::Interrupted => "interrupted",
        }
    }

    pub(crate) fn parse(s: &str) -> StepStatus {
        [
            StepStatus::Pending,
            StepStatus::Running,
            StepStatus::Succeeded,
            StepStatus::Failed,
            StepStatus::TimedOut,
            StepStatus::Canceled,
            StepStatus::Skipped,
            StepStatus::Interrupted,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
        .unwrap_or(StepStatus::Pending)
    }
}

/// A delivery to record, with one decision per pipeline.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub event: String,
    pub repo: String,
    pub git_ref: String,
    pub after: String,
    /// The commit the ref now points at (peeled for tags); `None` for a deletion.
    pub head: Option<String>,
    pub clone_url: String,
    pub decisions: Vec<NewDecision>,
}

#[derive(Debug, Clone)]
pub struct NewDecision {
    /// `None`: the one decision of a push to a repository no pipeline watches.
    pub pipeline: Option<String>,
    pub reason: String,
    /// `None`: the pipeline is not triggered.
    pub run: Option<NewRun>,
}

/// Whether a new run cancels older runs of its concurrency group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Supersede {
    #[default]
    Nothing,
    /// Queued runs of the group end `canceled`.
    Pending,
    /// Queued runs too, and running ones are named for the caller to cancel.
    Running,
}

/// What an interruption (a daemon crash or stop while the run runs) leads to, as the
/// run's pipeline says (`interrupted:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInterrupt {
    /// Queued again, up to [`MAX_ATTEMPTS`](super::MAX_ATTEMPTS) attempts in all.
    #[default]
    Retry,
    /// Ends `failed` once a step of it has started.
    Fail,
}

impl OnInterrupt {
    pub fn as_str(self) -> &'static str {
        match self {
            OnInterrupt::Retry => "retry",
            OnInterrupt::Fail => "fail",
        }
    }
}

/// A run to create, under the per-commit lock `key` (`None`: an explicit run, rerun
/// or manual, which the lock does not stop). Every run starts at attempt 1.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub key: Option<String>,
    /// The concurrency group: at most one run of a group runs at a time.
    pub group: Option<String>,
    pub supersede: Supersede,
    /// Supersede only runs of the group on this run's own ref. A path-filtered run may
    /// end `skipped`, and a run of another ref it canceled would then never build its
    /// push: so such a run leaves other refs' runs to run.
    pub supersede_own_ref: bool,
    /// 1 for a run of its own; a rerun's is one more than its original's.
    pub generation: i64,
    pub pipeline: String,
    pub repo: String,
    pub git_ref: String,
    pub commit: String,
    pub before: String,
    pub clone_url: String,
    pub trigger: &'static str,
    /// `Some(reason)`: the run is recorded as `skipped` and never queued.
    pub skipped: Option<String>,
}

/// A run a delivery names in its response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunRef {
    pub id: i64,
    pub pipeline: String,
    /// The run existed before this delivery (per-commit lock).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub existing: bool,
    /// Running runs of its group that this new run supersedes (`cancel: running`).
    #[serde(skip)]
    pub supersedes: Vec<i64>,
    /// The runs whose state this creation changed, as committed: the new run (queued,
    /// or skipped) and the queued runs of its group it superseded (now canceled); none
    /// for an existing run. What the caller publishes on the run event stream.
    #[serde(skip)]
    pub changed: Vec<Run>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    New(Vec<RunRef>),
    /// The delivery id was recorded before; nothing new was created.
    Duplicate(Vec<RunRef>),
}

/// What [`Store::cancel_queued`](super::Store::cancel_queued) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueuedCancel {
    /// It was queued, and is `canceled` now (as committed).
    Canceled(Box<Run>),
    /// It was `interrupted`, its owner's restart about to queue it again: the cancel is
    /// recorded, and that requeue ends it `canceled` with its reason instead.
    Asked,
    /// It had left the queue: unchanged, with this status.
    NotQueued(RunStatus),
    NoSuchRun,
}

/// What became of an interrupted run when it was recovered (at its owner's restart,
/// or when another instance found its lease lapsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub run: i64,
    pub pipeline: String,
    /// The attempt that was cut.
    pub attempt: i64,
    /// `queued` for one more attempt, `failed`, or `canceled`: a cancel was asked of it
    /// while it ran or was interrupted, and answered as applied.
    pub status: RunStatus,
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub id: i64,
    pub pipeline: String,
    pub repo: String,
    pub git_ref: String,
    pub commit: String,
    pub before: String,
    pub clone_url: String,
    pub trigger: String,
    pub delivery: Option<String>,
    pub status: RunStatus,
    pub reason: Option<String>,
    /// Which time this run is executing: 1, or 2 after an interruption re-queued it.
    pub attempt: i64,
    /// How many reruns led to this run: 1 for a run of its own, its original's + 1
    /// for a rerun.
    pub generation: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Bytes of output `max_log_bytes` kept out of the run's log.
    pub log_dropped: i64,
    /// The instance that claimed it last (see `store::instance_id`); `None` until
    /// claimed.
    pub instance: Option<String>,
    /// Push to first step, once its current attempt's first step started.
    pub timings: Option<Timings>,
}

/// How long a run took from its creation (the push's arrival) to its first step's
/// start, and the phases of that time, in milliseconds. The phases add up to at most
/// the whole: what is left is the store's writes between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Queued, until the scheduler claimed it (a re-queued attempt counts from the
    /// run's creation too).
    pub queue_ms: i64,
    pub fetch_ms: i64,
    pub checkout_ms: i64,
    pub to_first_step_ms: i64,
}

/// A piece of step `step`'s log in attempt `attempt` of run `run`, as written to the
/// log file (secrets masked), beginning `at` bytes into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPiece {
    pub run: i64,
    pub attempt: i64,
    pub step: i64,
    pub at: u64,
    pub bytes: Vec<u8>,
}

/// What a store that shares logs heard from the instance running a step: that run's
/// log or steps changed (a piece kept, a step started or ended, the run ended), or that
/// such news may have been missed (the listening connection was lost meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogNotice {
    Run(i64),
    Missed,
}

/// The phases the scheduler measured itself (see [`Timings`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phases {
    pub fetch_ms: i64,
    pub checkout_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub number: i64,
    pub name: String,
    pub status: StepStatus,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub reason: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub event: String,
    pub repo: String,
    pub git_ref: String,
    pub after: String,
    pub received_at: i64,
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `None`: the push's repository had no pipeline.
    pub pipeline: Option<String>,
    /// `run`, `skipped`, `duplicate` or `not_triggered`.
    pub outcome: String,
    pub reason: String,
    pub run_id: Option<i64>,
}

/// How a step ended, to record.
#[derive(Debug, Clone)]
pub struct StepEnd {
    pub status: StepStatus,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: Option<String>,
}

/// What a reconcile pass read of a repository before listing its remote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileView {
    /// Where each ref pointed when hookci last saw it.
    pub heads: std::collections::HashMap<String, String>,
    /// A pass has listed the repository before (the first one only records).
    pub reconciled: bool,
}

/// A ref a reconcile pass found at a new head, with the runs that triggers.
#[derive(Debug, Clone)]
pub struct RefChange {
    pub git_ref: String,
    /// The stored head the pass read before listing (`None`: none). The change is
    /// applied only if it still is: a push recorded meanwhile wins.
    pub seen: Option<String>,
    pub head: String,
    pub runs: Vec<NewRun>,
}

/// What [`RefChange`]s a reconcile pass applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub runs: Vec<RunRef>,
    /// Refs left alone: their stored head moved after the pass read it.
    pub stale: Vec<String>,
}

/// What one call of retention deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// The deleted runs (their logs and workspaces are the caller's to remove).
    pub runs: Vec<i64>,
    pub deliveries: usize,
    /// A batch was full: another call deletes more.
    pub more: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub pipeline: Option<String>,
    pub status: Option<RunStatus>,
    /// Only runs with a smaller id: the next page after a page that ended there.
    pub before: Option<i64>,
    pub limit: u32,
}
