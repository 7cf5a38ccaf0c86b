//! The durable store: deliveries, each pipeline's decision, runs and steps, in SQLite
//! (WAL, `synchronous=FULL`). Every SQL statement of hookci lives in this module, so a
//! second backend can replace it behind the same interface. Calls block: async callers
//! run them on blocking threads.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

use crate::clock::now_ms;

mod batch;
pub use batch::DeliveryWriter;

const SCHEMA: &[&str] = &[
    r#"
CREATE TABLE deliveries (
    id          TEXT PRIMARY KEY,
    event       TEXT NOT NULL,
    repo        TEXT NOT NULL,
    ref         TEXT NOT NULL,
    after       TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline    TEXT NOT NULL,
    repo        TEXT NOT NULL,
    ref         TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    before_sha  TEXT NOT NULL,
    clone_url   TEXT NOT NULL,
    run_key     TEXT NOT NULL UNIQUE,
    trigger     TEXT NOT NULL,
    delivery_id TEXT REFERENCES deliveries(id),
    status      TEXT NOT NULL,
    reason      TEXT,
    attempt     INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    started_at  INTEGER,
    finished_at INTEGER
);
CREATE INDEX runs_status ON runs(status, id);
CREATE INDEX runs_pipeline ON runs(pipeline, id);
CREATE TABLE decisions (
    delivery_id TEXT NOT NULL REFERENCES deliveries(id),
    pipeline    TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    run_id      INTEGER REFERENCES runs(id),
    PRIMARY KEY (delivery_id, pipeline)
);
CREATE TABLE steps (
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    attempt     INTEGER NOT NULL,
    number      INTEGER NOT NULL,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL,
    exit_code   INTEGER,
    signal      INTEGER,
    reason      TEXT,
    started_at  INTEGER,
    finished_at INTEGER,
    PRIMARY KEY (run_id, attempt, number)
);
"#,
    r#"
CREATE TABLE ref_heads (
    repo        TEXT NOT NULL,
    ref         TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    source      TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (repo, ref)
);
CREATE TABLE repositories (
    repo        TEXT PRIMARY KEY,
    clone_url   TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
"#,
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {path}: {message}")]
    Failed { path: PathBuf, message: String },
    #[error(
        "store {path} is damaged ({detail}): restore it from a backup, or move it away to start with an empty store"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error("store {path}: written by a newer hookci (schema {found}, this one knows {known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
}

/// A run's state (DESIGN.md "Runs").
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

    fn parse(s: &str) -> StepStatus {
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
    pub pipeline: String,
    pub reason: String,
    /// `None`: the pipeline is not triggered.
    pub run: Option<NewRun>,
}

/// A run to create under the per-commit lock `key`.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub key: String,
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    New(Vec<RunRef>),
    /// The delivery id was recorded before; nothing new was created.
    Duplicate(Vec<RunRef>),
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
    pub attempt: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
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
    pub pipeline: String,
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

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub pipeline: Option<String>,
    pub status: Option<RunStatus>,
    pub limit: u32,
}

/// The SQLite store. One connection behind a mutex: SQLite serialises writers anyway,
/// and the per-commit lock is a UNIQUE index, so concurrent deliveries of one push can
/// never both create a run.
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// A connection with hookci's settings: WAL, every commit synced (`synchronous=FULL`).
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// How many times a run is started before interruptions make it fail.
pub const MAX_ATTEMPTS: i64 = 2;

const RUN_COLUMNS: &str =
    "id, pipeline, repo, ref, commit_sha, before_sha, clone_url, trigger, delivery_id, \
     status, reason, attempt, created_at, started_at, finished_at";

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<Run> {
    let status: String = row.get(9)?;
    Ok(Run {
        id: row.get(0)?,
        pipeline: row.get(1)?,
        repo: row.get(2)?,
        git_ref: row.get(3)?,
        commit: row.get(4)?,
        before: row.get(5)?,
        clone_url: row.get(6)?,
        trigger: row.get(7)?,
        delivery: row.get(8)?,
        status: RunStatus::parse(&status).unwrap_or(RunStatus::Failed),
        reason: row.get(10)?,
        attempt: row.get(11)?,
        created_at: row.get(12)?,
        started_at: row.get(13)?,
        finished_at: row.get(14)?,
    })
}

impl Store {
    /// Opens (creating if needed, mode 0600) `state_dir/hookci.db` and brings its schema
    /// up to date.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join("hookci.db");
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = connect(&path).map_err(|source| match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                StoreError::Damaged {
                    path: path.clone(),
                    detail: source.to_string(),
                }
            }
            _ => sql(source),
        })?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|source| StoreError::Damaged {
                path: path.clone(),
                detail: source.to_string(),
            })?;
        if check != "ok" {
            return Err(StoreError::Damaged {
                path,
                detail: check,
            });
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        let known = SCHEMA.len();
        if version > known as i64 {
            return Err(StoreError::TooNew {
                path,
                found: version,
                known,
            });
        }
        for (i, migration) in SCHEMA.iter().enumerate().skip(version as usize) {
            let batch = format!(
                "BEGIN; {migration}; PRAGMA user_version = {}; COMMIT;",
                i + 1
            );
            conn.execute_batch(&batch).map_err(sql)?;
        }
        Ok(Store {
            path,
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (the transaction
        // rolls back on drop), so the poisoned guard is safe to keep using.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Records a delivery and creates its runs, in one transaction committed (and synced)
    /// before this returns. A known delivery id creates nothing.
    pub fn record_delivery(&self, d: &NewDelivery) -> Result<DeliveryOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let outcome = record_in(&tx, d).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(outcome)
    }

    /// Takes the oldest queued run and marks it running.
    pub fn claim_next(&self) -> Result<Option<Run>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let run = tx
            .query_row(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE status = 'queued' ORDER BY id LIMIT 1"
                ),
                [],
                run_from_row,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(mut run) = run else {
            return Ok(None);
        };
        let now = now_ms();
        tx.execute(
            "UPDATE runs SET status = 'running', started_at = ?2 WHERE id = ?1",
            params![run.id, now],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        run.status = RunStatus::Running;
        run.started_at = Some(now);
        Ok(Some(run))
    }

    /// Records the steps a run will go through, all `pending`.
    pub fn plan_steps(&self, run_id: i64, names: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM steps WHERE run_id = ?1 AND attempt = (SELECT attempt FROM runs WHERE id = ?1)", [run_id])
            .map_err(|e| self.err(e))?;
        for (i, name) in names.iter().enumerate() {
            tx.execute(
                "INSERT INTO steps (run_id, attempt, number, name, status)
                 VALUES (?1, (SELECT attempt FROM runs WHERE id = ?1), ?2, ?3, 'pending')",
                params![run_id, i as i64 + 1, name],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    pub fn step_started(&self, run_id: i64, number: i64) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE steps SET status = 'running', started_at = ?3
                 WHERE run_id = ?1 AND attempt = (SELECT attempt FROM runs WHERE id = ?1) AND number = ?2",
                params![run_id, number, now_ms()],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub fn step_finished(&self, run_id: i64, number: i64, end: &StepEnd) -> Result<(), StoreError> {
        let now = now_ms();
        self.conn()
            .execute(
                "UPDATE steps SET status = ?3, exit_code = ?4, signal = ?5, reason = ?6,
                        started_at = COALESCE(started_at, ?7), finished_at = ?7
                 WHERE run_id = ?1 AND attempt = (SELECT attempt FROM runs WHERE id = ?1) AND number = ?2",
                params![
                    run_id,
                    number,
                    end.status.as_str(),
                    end.exit_code,
                    end.signal,
                    end.reason,
                    now
                ],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Ends a run; steps still pending or running take `leftover` as their state.
    pub fn finish_run(
        &self,
        run_id: i64,
        status: RunStatus,
        reason: Option<&str>,
        leftover: StepStatus,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let now = now_ms();
        tx.execute(
            "UPDATE runs SET status = ?2, reason = ?3, finished_at = ?4 WHERE id = ?1",
            params![run_id, status.as_str(), reason, now],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE steps SET status = ?2, finished_at = CASE WHEN started_at IS NULL THEN NULL ELSE ?3 END
             WHERE run_id = ?1 AND attempt = (SELECT attempt FROM runs WHERE id = ?1) AND status IN ('pending', 'running')",
            params![run_id, leftover.as_str(), now],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// On start: runs left `running` by a daemon that died are `interrupted`.
    pub fn interrupt_running(&self) -> Result<Vec<i64>, StoreError> {
        let ids: Vec<i64> = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare("SELECT id FROM runs WHERE status = 'running' ORDER BY id")
                .map_err(|e| self.err(e))?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(|e| self.err(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?
        };
        for id in &ids {
            self.finish_run(
                *id,
                RunStatus::Interrupted,
                Some("the daemon stopped while this run was running"),
                StepStatus::Interrupted,
            )?;
        }
        Ok(ids)
    }

    /// On start, after [`Store::interrupt_running`] and after their leftovers are gone:
    /// each interrupted run is queued again once (its attempt goes up by one); a run
    /// interrupted on its second attempt ends `failed`. Returns (run, attempt it had).
    pub fn requeue_interrupted(&self) -> Result<Vec<(i64, i64, RunStatus)>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let found: Vec<(i64, i64)> = {
            let mut stmt = tx
                .prepare("SELECT id, attempt FROM runs WHERE status = 'interrupted' ORDER BY id")
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(|e| self.err(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?
        };
        let mut out = Vec::new();
        for (id, attempt) in found {
            let status = if attempt < MAX_ATTEMPTS {
                tx.execute(
                    "UPDATE runs SET status = 'queued', attempt = attempt + 1, started_at = NULL,
                            finished_at = NULL, reason = ?2
                     WHERE id = ?1",
                    params![
                        id,
                        format!("attempt {attempt} was interrupted by a daemon stop or crash")
                    ],
                )
                .map_err(|e| self.err(e))?;
                RunStatus::Queued
            } else {
                tx.execute(
                    "UPDATE runs SET status = 'failed', reason = ?2 WHERE id = ?1",
                    params![
                        id,
                        format!("interrupted on {attempt} attempts by daemon stops or crashes")
                    ],
                )
                .map_err(|e| self.err(e))?;
                RunStatus::Failed
            };
            out.push((id, attempt, status));
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Where each ref of `repo` pointed when hookci last saw it.
    pub fn ref_heads(
        &self,
        repo: &str,
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT ref, commit_sha FROM ref_heads WHERE repo = ?1")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([repo], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The clone URL of `repo` from its latest delivery.
    pub fn clone_url_of(&self, repo: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(
                "SELECT clone_url FROM repositories WHERE repo = ?1",
                [repo],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records what a reconcile found: the runs it triggers (under the per-commit lock)
    /// and the refs' new heads, in one transaction.
    pub fn record_reconcile(
        &self,
        repo: &str,
        heads: &[(String, String)],
        runs: &[NewRun],
    ) -> Result<Vec<RunRef>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for run in runs {
            let (id, existing) = match insert_run(&tx, run, None).map_err(|e| self.err(e))? {
                Inserted::New(id) => (id, false),
                Inserted::Existing(id) => (id, true),
            };
            out.push(RunRef {
                id,
                pipeline: run.pipeline.clone(),
                existing,
            });
        }
        for (git_ref, sha) in heads {
            note_head(&tx, repo, git_ref, Some(sha), "reconcile").map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    pub fn run(&self, id: i64) -> Result<Option<Run>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [id],
                run_from_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The steps of the run's current attempt.
    pub fn steps(&self, run_id: i64) -> Result<Vec<Step>, StoreError> {
        self.steps_of(run_id, None)
    }

    /// The steps of one attempt of a run (`None`: the current one).
    pub fn steps_of(&self, run_id: i64, attempt: Option<i64>) -> Result<Vec<Step>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT number, name, status, exit_code, signal, reason, started_at, finished_at
                 FROM steps WHERE run_id = ?1 AND attempt = COALESCE(?2, (SELECT attempt FROM runs WHERE id = ?1))
                 ORDER BY number",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![run_id, attempt], |r| {
                let status: String = r.get(2)?;
                Ok(Step {
                    number: r.get(0)?,
                    name: r.get(1)?,
                    status: StepStatus::parse(&status),
                    exit_code: r.get(3)?,
                    signal: r.get(4)?,
                    reason: r.get(5)?,
                    started_at: r.get(6)?,
                    finished_at: r.get(7)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Newest first.
    pub fn runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs
                 WHERE (?1 IS NULL OR pipeline = ?1) AND (?2 IS NULL OR status = ?2)
                 ORDER BY id DESC LIMIT ?3"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![
                    filter.pipeline,
                    filter.status.map(RunStatus::as_str),
                    filter.limit
                ],
                run_from_row,
            )
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        let conn = self.conn();
        let head = conn
            .query_row(
                "SELECT id, event, repo, ref, after, received_at FROM deliveries WHERE id = ?1",
                [id],
                |r| {
                    Ok(Delivery {
                        id: r.get(0)?,
                        event: r.get(1)?,
                        repo: r.get(2)?,
                        git_ref: r.get(3)?,
                        after: r.get(4)?,
                        received_at: r.get(5)?,
                        decisions: Vec::new(),
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(mut delivery) = head else {
            return Ok(None);
        };
        let mut stmt = conn
            .prepare_cached(
                "SELECT pipeline, outcome, reason, run_id FROM decisions WHERE delivery_id = ?1 ORDER BY pipeline",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok(Decision {
                    pipeline: r.get(0)?,
                    outcome: r.get(1)?,
                    reason: r.get(2)?,
                    run_id: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        delivery.decisions = rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?;
        Ok(Some(delivery))
    }

    /// How many runs are in each state (for `/metrics` and tests).
    pub fn count_by_status(&self) -> Result<Vec<(RunStatus, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT status, COUNT(*) FROM runs GROUP BY status")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (status, n) = row.map_err(|e| self.err(e))?;
            if let Some(st) = RunStatus::parse(&status) {
                out.push((st, n));
            }
        }
        Ok(out)
    }
}

/// Records one delivery inside the caller's transaction (or savepoint).
fn record_in(conn: &Connection, d: &NewDelivery) -> rusqlite::Result<DeliveryOutcome> {
    let inserted = conn.execute(
        "INSERT INTO deliveries (id, event, repo, ref, after, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(id) DO NOTHING",
        params![d.id, d.event, d.repo, d.git_ref, d.after, now_ms()],
    )?;
    if inserted == 0 {
        return delivery_runs(conn, &d.id).map(DeliveryOutcome::Duplicate);
    }
    let mut runs = Vec::new();
    for decision in &d.decisions {
        let (outcome, reason, run_id) = match &decision.run {
            None => ("not_triggered", decision.reason.clone(), None),
            Some(run) => {
                let (id, existing) = match insert_run(conn, run, Some(&d.id))? {
                    Inserted::New(id) => (id, false),
                    Inserted::Existing(id) => (id, true),
                };
                runs.push(RunRef {
                    id,
                    pipeline: run.pipeline.clone(),
                    existing,
                });
                match (existing, &run.skipped) {
                    (true, _) => (
                        "duplicate",
                        format!("duplicate of run {id} (same commit already built)"),
                        Some(id),
                    ),
                    (false, Some(_)) => ("skipped", decision.reason.clone(), Some(id)),
                    (false, None) => ("run", decision.reason.clone(), Some(id)),
                }
            }
        };
        conn.prepare_cached(
            "INSERT INTO decisions (delivery_id, pipeline, outcome, reason, run_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![d.id, decision.pipeline, outcome, reason, run_id])?;
    }
    note_head(conn, &d.repo, &d.git_ref, d.head.as_deref(), "push")?;
    conn.prepare_cached(
        "INSERT INTO repositories (repo, clone_url, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(repo) DO UPDATE SET clone_url = excluded.clone_url, updated_at = excluded.updated_at",
    )?
    .execute(params![d.repo, d.clone_url, now_ms()])?;
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

enum Inserted {
    New(i64),
    Existing(i64),
}

fn insert_run(
    conn: &Connection,
    run: &NewRun,
    delivery: Option<&str>,
) -> rusqlite::Result<Inserted> {
    let now = now_ms();
    let (status, finished_at) = match run.skipped {
        Some(_) => (RunStatus::Skipped, Some(now)),
        None => (RunStatus::Queued, None),
    };
    let id: Option<i64> = conn
        .prepare_cached(
            "INSERT INTO runs (pipeline, repo, ref, commit_sha, before_sha, clone_url, run_key, trigger,
                               delivery_id, status, reason, created_at, finished_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
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
                run.trigger,
                delivery,
                status.as_str(),
                run.skipped,
                now,
                finished_at
            ],
            |r| r.get(0),
        )
        .optional()?;
    match id {
        Some(id) => Ok(Inserted::New(id)),
        None => conn
            .prepare_cached("SELECT id FROM runs WHERE run_key = ?1")?
            .query_row([&run.key], |r| r.get(0))
            .map(Inserted::Existing),
    }
}

fn delivery_runs(conn: &Connection, id: &str) -> rusqlite::Result<Vec<RunRef>> {
    let mut stmt = conn.prepare_cached(
        "SELECT run_id, pipeline, outcome FROM decisions WHERE delivery_id = ?1 AND run_id IS NOT NULL ORDER BY pipeline",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok(RunRef {
            id: r.get(0)?,
            pipeline: r.get(1)?,
            existing: r.get::<_, String>(2)? == "duplicate",
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_run(pipeline: &str, key: &str) -> NewRun {
        NewRun {
            key: key.into(),
            pipeline: pipeline.into(),
            repo: "o/r".into(),
            git_ref: "refs/heads/main".into(),
            commit: "c".repeat(40),
            before: "b".repeat(40),
            clone_url: "/tmp/x".into(),
            trigger: "push",
            skipped: None,
        }
    }

    fn delivery(id: &str, runs: Vec<NewRun>) -> NewDelivery {
        NewDelivery {
            id: id.into(),
            event: "push".into(),
            repo: "o/r".into(),
            git_ref: "refs/heads/main".into(),
            after: "c".repeat(40),
            head: Some("c".repeat(40)),
            clone_url: "/tmp/x".into(),
            decisions: runs
                .into_iter()
                .map(|r| NewDecision {
                    pipeline: r.pipeline.clone(),
                    reason: "matched".into(),
                    run: Some(r),
                })
                .chain(std::iter::once(NewDecision {
                    pipeline: "zz-other".into(),
                    reason: "repository differs".into(),
                    run: None,
                }))
                .collect(),
        }
    }

    #[test]
    fn per_commit_lock_and_duplicate_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store
            .record_delivery(&delivery("d1", vec![new_run("ci", "k1")]))
            .unwrap();
        let DeliveryOutcome::New(runs) = first else {
            panic!("{first:?}")
        };
        assert_eq!(runs.len(), 1);
        assert!(!runs[0].existing);
        let id = runs[0].id;

        // Same delivery id again: nothing new.
        let again = store
            .record_delivery(&delivery("d1", vec![new_run("ci", "k1")]))
            .unwrap();
        assert_eq!(again, DeliveryOutcome::Duplicate(runs.clone()));

        // Another delivery of the same push: the existing run is named.
        let other = store
            .record_delivery(&delivery("d2", vec![new_run("ci", "k1")]))
            .unwrap();
        assert_eq!(
            other,
            DeliveryOutcome::New(vec![RunRef {
                id,
                pipeline: "ci".into(),
                existing: true
            }])
        );
        let why = store.delivery("d2").unwrap().unwrap();
        assert_eq!(why.decisions.len(), 2);
        assert_eq!(why.decisions[0].outcome, "duplicate");
        assert!(why.decisions[0].reason.contains(&format!("run {id}")));
        assert_eq!(why.decisions[1].outcome, "not_triggered");
        assert_eq!(
            store
                .runs(&RunFilter {
                    limit: 10,
                    ..RunFilter::default()
                })
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn claims_in_arrival_order_and_records_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..3 {
            store
                .record_delivery(&delivery(
                    &format!("d{i}"),
                    vec![new_run("ci", &format!("k{i}"))],
                ))
                .unwrap();
        }
        let first = store.claim_next().unwrap().unwrap();
        let second = store.claim_next().unwrap().unwrap();
        assert!(first.id < second.id);
        assert_eq!(first.status, RunStatus::Running);
        store
            .plan_steps(first.id, &["a".into(), "b".into()])
            .unwrap();
        store.step_started(first.id, 1).unwrap();
        store
            .step_finished(
                first.id,
                1,
                &StepEnd {
                    status: StepStatus::Failed,
                    exit_code: Some(3),
                    signal: None,
                    reason: None,
                },
            )
            .unwrap();
        store
            .finish_run(
                first.id,
                RunStatus::Failed,
                Some("step a exited 3"),
                StepStatus::Skipped,
            )
            .unwrap();
        let steps = store.steps(first.id).unwrap();
        assert_eq!(steps[0].status, StepStatus::Failed);
        assert_eq!(steps[0].exit_code, Some(3));
        assert_eq!(steps[1].status, StepStatus::Skipped);
        assert_eq!(steps[1].finished_at, None);
        // The second claimed run was left running: a restart marks it interrupted.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.interrupt_running().unwrap(), vec![second.id]);
        assert_eq!(
            store.run(second.id).unwrap().unwrap().status,
            RunStatus::Interrupted
        );
        let queued = store
            .runs(&RunFilter {
                status: Some(RunStatus::Queued),
                limit: 10,
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(queued.len(), 1);
    }

    #[test]
    fn database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
