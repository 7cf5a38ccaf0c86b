//! The outbox: reports to send (commit statuses, notifications), written in the same
//! transaction as the run transition that causes them, and read and settled by the
//! sender (`report::sender`). What a transition reports is not decided here: the
//! store asks the [`ReportPolicy`] it was given (`report::policy`) and writes what it
//! answers.

use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::{RunStatus, Sqlite, StoreError};
use crate::clock::now_ms;

/// A run transition, as the store saw it inside the transaction that made it.
#[derive(Debug, Clone)]
pub struct Transition<'a> {
    pub run: i64,
    pub pipeline: &'a str,
    pub repo: &'a str,
    pub git_ref: &'a str,
    pub commit: &'a str,
    /// The run's state after the transition.
    pub status: RunStatus,
    pub reason: Option<&'a str>,
    /// The step that starts: (its number, how many steps the attempt has, its name).
    pub step: Option<(i64, i64, &'a str)>,
}

/// Decides which reports a transition causes. Called inside the store's writer
/// transaction, so it must be quick and must not touch the store.
pub trait ReportPolicy: Send + Sync {
    /// Nothing is configured to report at all: the store then looks nothing up.
    fn idle(&self) -> bool;

    /// The reports `t` causes. `previous` gives the status of the latest earlier run
    /// of the same pipeline and ref that succeeded, failed or timed out (asked only
    /// when needed: it is a query).
    fn reports(
        &self,
        t: &Transition<'_>,
        previous: &dyn Fn() -> Option<RunStatus>,
    ) -> Vec<NewReport>;

    /// Called after a write that asked for reports has committed: what it wrote may
    /// now be sent.
    fn committed(&self);
}

/// Where a report goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// A GitHub commit status.
    Status,
    Slack,
    Discord,
    Webhook,
}

impl ReportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportKind::Status => "status",
            ReportKind::Slack => "slack",
            ReportKind::Discord => "discord",
            ReportKind::Webhook => "webhook",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<ReportKind> {
        [
            ReportKind::Status,
            ReportKind::Slack,
            ReportKind::Discord,
            ReportKind::Webhook,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A report to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReport {
    pub kind: ReportKind,
    /// What the API shows as its target: never a URL held in a secret.
    pub target: String,
    /// Where it goes: the path under the GitHub API for a status, the secret's name
    /// for Slack and Discord, the URL for a webhook.
    pub address: String,
    /// Reports with the same key replace one another while unsent: only the newest
    /// state of one commit status is worth sending.
    pub coalesce: Option<String>,
    /// The secret name whose value signs a webhook's body.
    pub signing: Option<String>,
    /// The body as it is sent; `None`: built when sent, from the finished run.
    pub body: Option<String>,
    /// For notifications: the outcome that triggered it (`failure`, `fixed`, ...).
    pub outcome: Option<String>,
}

/// A report waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub id: i64,
    pub run: i64,
    pub kind: ReportKind,
    pub target: String,
    pub address: String,
    pub signing: Option<String>,
    pub body: Option<String>,
    pub outcome: Option<String>,
    pub attempts: i64,
    pub created_at: i64,
}

/// A report as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportView {
    pub target: String,
    /// `pending`, `sent` or `failed`.
    pub state: String,
    pub reason: Option<String>,
    pub attempts: i64,
}

/// How an attempt to send a report ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Sent,
    /// Try again at this time (ms since the epoch).
    Retry {
        at: i64,
        reason: String,
    },
    /// Given up for good.
    Failed {
        reason: String,
    },
}

/// Writes the reports `policy` gives for `t`.
pub(super) fn record(
    c: &Connection,
    policy: &dyn ReportPolicy,
    t: &Transition<'_>,
) -> rusqlite::Result<()> {
    let previous = || previous_result(c, t).ok().flatten();
    for report in policy.reports(t, &previous) {
        insert(c, t.run, &report)?;
    }
    Ok(())
}

fn previous_result(c: &Connection, t: &Transition<'_>) -> rusqlite::Result<Option<RunStatus>> {
    let status: Option<String> = c
        .prepare_cached(
            "SELECT status FROM runs WHERE pipeline = ?1 AND id < ?2 AND ref = ?3
                 AND status IN ('succeeded', 'failed', 'timed_out')
             ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![t.pipeline, t.run, t.git_ref], |r| r.get(0))
        .optional()?;
    Ok(status.and_then(|s| RunStatus::parse(&s)))
}

fn insert(c: &Connection, run: i64, r: &NewReport) -> rusqlite::Result<()> {
    if let Some(key) = &r.coalesce {
        c.prepare_cached("DELETE FROM reports WHERE coalesce_key = ?1 AND state = 'pending'")?
            .execute([key])?;
    }
    let now = now_ms();
    c.prepare_cached(
        "INSERT INTO reports (run_id, kind, target, address, coalesce_key, signing, body, outcome,
                              state, attempts, next_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', 0, ?9, ?9)",
    )?
    .execute(params![
        run,
        r.kind.as_str(),
        r.target,
        r.address,
        r.coalesce,
        r.signing,
        r.body,
        r.outcome,
        now
    ])?;
    Ok(())
}

/// Tells the policy a write it was asked about has committed; passes the result on.
fn settle<T>(
    policy: Option<Arc<dyn ReportPolicy>>,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    if let (Some(policy), Ok(_)) = (policy, &result) {
        policy.committed();
    }
    result
}

/// Retention: a pruned run's reports go with it.
pub(super) fn prune_run(c: &Connection, run: i64) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM reports WHERE run_id = ?1")?
        .execute([run])?;
    Ok(())
}

impl Sqlite {
    /// Gives the store the policy that decides what each run transition reports.
    /// Without one, nothing is reported.
    pub fn set_report_policy(&self, policy: Arc<dyn ReportPolicy>) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(policy);
    }

    /// The policy, unless there is none or it reports nothing.
    fn active_policy(&self) -> Option<Arc<dyn ReportPolicy>> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|p| !p.idle())
    }

    /// Runs a write of run transitions in the next batch: `f` gets the policy (`None`
    /// when nothing reports) to record what they report, and the policy hears of the
    /// commit.
    pub(super) fn exec_reporting<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, Option<&dyn ReportPolicy>) -> rusqlite::Result<T> + Send + 'static,
    {
        let policy = self.active_policy();
        let held = policy.clone();
        settle(held, self.writer.exec(move |c| f(c, policy.as_deref())))
    }

    /// [`Store::exec_reporting`] for async callers.
    pub(super) async fn exec_reporting_async<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, Option<&dyn ReportPolicy>) -> rusqlite::Result<T> + Send + 'static,
    {
        let policy = self.active_policy();
        let held = policy.clone();
        let result = self
            .writer
            .exec_async(move |c| f(c, policy.as_deref()))
            .await;
        settle(held, result)
    }

    /// Pending reports due at `now`, oldest first, at most `limit`.
    pub fn due_reports(&self, now: i64, limit: u32) -> Result<Vec<Report>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, run_id, kind, target, address, signing, body, outcome, attempts, created_at
                 FROM reports WHERE state = 'pending' AND next_at <= ?1 ORDER BY next_at, id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![now, limit], |r| {
                let kind: String = r.get(2)?;
                Ok(Report {
                    id: r.get(0)?,
                    run: r.get(1)?,
                    kind: ReportKind::parse(&kind).unwrap_or(ReportKind::Webhook),
                    target: r.get(3)?,
                    address: r.get(4)?,
                    signing: r.get(5)?,
                    body: r.get(6)?,
                    outcome: r.get(7)?,
                    attempts: r.get(8)?,
                    created_at: r.get(9)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// How many reports are still to send (due now or waiting for a retry).
    pub fn reports_pending(&self) -> Result<i64, StoreError> {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM reports WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// When the next pending report is due, if any is.
    pub fn next_report_at(&self) -> Result<Option<i64>, StoreError> {
        self.conn()
            .query_row(
                "SELECT MIN(next_at) FROM reports WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// Records how an attempt to send report `id` ended. A report replaced meanwhile
    /// by a newer one is gone, and stays gone.
    pub fn report_attempted(&self, id: i64, attempt: Attempt) -> Result<(), StoreError> {
        self.writer.exec(move |c| {
            let (state, reason, next_at) = match attempt {
                Attempt::Sent => ("sent", None, None),
                Attempt::Retry { at, reason } => ("pending", Some(reason), Some(at)),
                Attempt::Failed { reason } => ("failed", Some(reason), None),
            };
            c.prepare_cached(
                "UPDATE reports SET state = ?2, reason = ?3, attempts = attempts + 1,
                        next_at = COALESCE(?4, next_at)
                 WHERE id = ?1",
            )?
            .execute(params![id, state, reason, next_at])?;
            Ok(())
        })
    }

    /// The reports of a run, in the order they were written.
    pub fn reports_of(&self, run: i64) -> Result<Vec<ReportView>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT target, state, reason, attempts FROM reports WHERE run_id = ?1 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([run], |r| {
                Ok(ReportView {
                    target: r.get(0)?,
                    state: r.get(1)?,
                    reason: r.get(2)?,
                    attempts: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}
