//! The durable store: deliveries, each pipeline's decision, runs and steps, and the
//! outbox of reports (`outbox`), in SQLite (WAL, `synchronous=FULL`). Every SQL
//! statement of hookci lives in this module, so a second backend can replace it
//! behind the same interface. Calls block: async callers run them on blocking threads.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};

mod batch;
mod model;
mod outbox;
mod views;
mod writes;
pub use model::*;
pub use outbox::{Attempt, NewReport, Report, ReportKind, ReportPolicy, ReportView, Transition};
pub use writes::MAX_ATTEMPTS;

const SCHEMA: &[&str] = &[
    r#"
CREATE TABLE deliveries (
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
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
    run_key     TEXT UNIQUE,
    grp         TEXT,
    trigger     TEXT NOT NULL,
    -- No foreign keys here and in decisions.run_id: they are history, kept when
    -- retention prunes the other side, and a check would scan an unindexed column.
    delivery_id TEXT,
    status      TEXT NOT NULL,
    reason      TEXT,
    attempt     INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    started_at  INTEGER,
    finished_at INTEGER
);
CREATE INDEX runs_status ON runs(status, id);
CREATE INDEX runs_pipeline ON runs(pipeline, id);
CREATE INDEX runs_group ON runs(grp, status);
CREATE TABLE decisions (
    delivery    INTEGER NOT NULL REFERENCES deliveries(seq),
    pipeline    TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    run_id      INTEGER,
    PRIMARY KEY (delivery, pipeline)
) WITHOUT ROWID;
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
    // Repository names are case-insensitive, as GitHub treats them: the keys of
    // ref_heads and repositories are kept in lower case (see `repo_key`). Of rows
    // that differ only in case, the most recently updated one is kept.
    r#"
DELETE FROM repositories WHERE EXISTS (
    SELECT 1 FROM repositories n
    WHERE lower(n.repo) = lower(repositories.repo) AND n.repo != repositories.repo
      AND (n.updated_at > repositories.updated_at
           OR (n.updated_at = repositories.updated_at AND n.repo > repositories.repo))
);
UPDATE repositories SET repo = lower(repo) WHERE repo != lower(repo);
DELETE FROM ref_heads WHERE EXISTS (
    SELECT 1 FROM ref_heads n
    WHERE lower(n.repo) = lower(ref_heads.repo) AND n.ref = ref_heads.ref AND n.repo != ref_heads.repo
      AND (n.updated_at > ref_heads.updated_at
           OR (n.updated_at = ref_heads.updated_at AND n.repo > ref_heads.repo))
);
UPDATE ref_heads SET repo = lower(repo) WHERE repo != lower(repo);
"#,
    // A rerun's generation is kept apart from its attempts, which count only its own
    // interruptions; and each run records what an interruption of it leads to (its
    // pipeline's `interrupted:`, set when an attempt plans its steps). Reruns used to
    // start at their original's attempt + 1: that number is the best record of their
    // generation there is, and they start over at attempt 1. They were never queued
    // again (their first attempt was already the last one allowed), so all their steps
    // belong to that one attempt.
    r#"
ALTER TABLE runs ADD COLUMN generation INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN interrupted TEXT NOT NULL DEFAULT 'retry';
UPDATE runs SET generation = attempt WHERE trigger = 'rerun';
UPDATE steps SET attempt = 1 WHERE run_id IN (SELECT id FROM runs WHERE trigger = 'rerun');
UPDATE runs SET attempt = 1 WHERE trigger = 'rerun';
"#,
    // Retention keeps the newest N finished runs by rank: this index holds exactly the
    // runs it may delete, so a rank is a walk of N entries of the index alone (with
    // `status` in it, SQLite need not read the rows to check the predicate again).
    // The predicate is `writes::FINISHED`, which the queries repeat word for word and
    // name the index: SQLite refuses such a query when the index cannot serve it.
    r#"
CREATE INDEX runs_finished ON runs(id, status)
    WHERE status IN ('succeeded', 'failed', 'timed_out', 'canceled', 'skipped');
"#,
    // The repositories reconcile has listed once: after that first pass, which only
    // records, a ref seen for the first time is a creation and is built. Before this
    // table existed, every start listed each repository with a known head (reconcile
    // runs at start), so a repository with any recorded head counts as listed: a tag
    // pushed while the daemon was stopped for this upgrade is then built.
    r#"
CREATE TABLE reconciled (
    repo        TEXT PRIMARY KEY,
    first_at    INTEGER NOT NULL
);
INSERT INTO reconciled (repo, first_at)
    SELECT repo, MIN(updated_at) FROM ref_heads GROUP BY repo;
"#,
    // The dashboard's newest run per branch or tag, and a badge's last run of a ref,
    // read from the index alone instead of every run.
    r#"
CREATE INDEX runs_pipeline_ref ON runs(pipeline, ref, id);
"#,
    // How many bytes of a run's output `max_log_bytes` dropped: the API says the log
    // was truncated, and by how much.
    r#"
ALTER TABLE runs ADD COLUMN log_dropped INTEGER NOT NULL DEFAULT 0;
"#,
    // The outbox (`outbox`): commit statuses and notifications to send, written with
    // the run transition that causes them. Of the pending reports with one
    // `coalesce_key` only the newest is kept; `next_at` is when the next attempt is due.
    r#"
CREATE TABLE reports (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    target       TEXT NOT NULL,
    address      TEXT NOT NULL,
    coalesce_key TEXT,
    signing      TEXT,
    body         TEXT,
    outcome      TEXT,
    state        TEXT NOT NULL,
    reason       TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      INTEGER NOT NULL,
    created_at   INTEGER NOT NULL
);
CREATE INDEX reports_due ON reports(next_at, id) WHERE state = 'pending';
CREATE INDEX reports_coalesce ON reports(coalesce_key) WHERE state = 'pending';
CREATE INDEX reports_run ON reports(run_id);
"#,
    // Push to first step, per run: the phases before its first step started (queue
    // wait, fetch, checkout) and the whole of it, in milliseconds since the run was
    // created; NULL until a first step starts. Older runs never had them measured.
    r#"
ALTER TABLE runs ADD COLUMN queue_ms INTEGER;
ALTER TABLE runs ADD COLUMN fetch_ms INTEGER;
ALTER TABLE runs ADD COLUMN checkout_ms INTEGER;
ALTER TABLE runs ADD COLUMN first_step_ms INTEGER;
"#,
];

/// The key of a repository in `ref_heads` and `repositories`: GitHub names are
/// case-insensitive, and a push may spell one differently from a pipeline's `repo:`.
fn repo_key(repo: &str) -> String {
    repo.to_ascii_lowercase()
}

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

/// The SQLite store. One connection behind a mutex: SQLite serialises writers anyway,
/// and the per-commit lock is a UNIQUE index, so concurrent deliveries of one push can
/// never both create a run.
pub struct Store {
    path: PathBuf,
    /// Reads only; every write goes through `writer`.
    conn: Mutex<Connection>,
    writer: batch::Writer,
    /// Decides what each run transition reports (`outbox`); none: nothing.
    policy: std::sync::RwLock<Option<std::sync::Arc<dyn ReportPolicy>>>,
}

/// A connection with hookci's settings: WAL, every commit synced (`synchronous=FULL`).
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Only takes effect when the file is created. Inserts with random keys (delivery
    // ids, commit ids) dirty a leaf page each, and every dirty page goes to the WAL at
    // commit: small pages keep that write volume down.
    conn.pragma_update(None, "page_size", 1024)?;
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

const RUN_COLUMNS: &str =
    "id, pipeline, repo, ref, commit_sha, before_sha, clone_url, trigger, delivery_id, \
     status, reason, attempt, generation, created_at, started_at, finished_at, log_dropped, \
     queue_ms, fetch_ms, checkout_ms, first_step_ms";

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
        generation: row.get(12)?,
        created_at: row.get(13)?,
        started_at: row.get(14)?,
        finished_at: row.get(15)?,
        log_dropped: row.get(16)?,
        timings: match row.get::<_, Option<i64>>(20)? {
            Some(to_first_step_ms) => Some(Timings {
                queue_ms: row.get(17)?,
                fetch_ms: row.get(18)?,
                checkout_ms: row.get(19)?,
                to_first_step_ms,
            }),
            None => None,
        },
    })
}

const STEP_COLUMNS: &str =
    "number, name, status, exit_code, signal, reason, started_at, finished_at";

fn step_from_row(r: &Row<'_>) -> rusqlite::Result<Step> {
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
}

/// The steps of one attempt of a run (`None`: the current one), on any connection: the
/// readers' and the writer's (which returns them with the transition it commits).
fn steps_in(c: &Connection, run_id: i64, attempt: Option<i64>) -> rusqlite::Result<Vec<Step>> {
    c.prepare_cached(&format!(
        "SELECT {STEP_COLUMNS}
         FROM steps WHERE run_id = ?1 AND attempt = COALESCE(?2, (SELECT attempt FROM runs WHERE id = ?1))
         ORDER BY number"
    ))?
    .query_map(params![run_id, attempt], step_from_row)?
    .collect()
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
        let writer = batch::Writer::start(
            &path,
            connect(&path).map_err(sql)?,
            connect(&path).map_err(sql)?,
        )?;
        Ok(Store {
            path,
            conn: Mutex::new(conn),
            writer,
            policy: std::sync::RwLock::new(None),
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
            .query_map([repo_key(repo)], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// What a reconcile pass of `repo` compares the remote with, read before it lists.
    pub fn reconcile_view(&self, repo: &str) -> Result<ReconcileView, StoreError> {
        let heads = self.ref_heads(repo)?;
        let reconciled = self
            .conn()
            .query_row(
                "SELECT 1 FROM reconciled WHERE repo = ?1",
                [repo_key(repo)],
                |_| Ok(()),
            )
            .optional()
            .map_err(|e| self.err(e))?
            .is_some();
        Ok(ReconcileView { heads, reconciled })
    }

    /// The clone URL of `repo` from its latest delivery.
    pub fn clone_url_of(&self, repo: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(
                "SELECT clone_url FROM repositories WHERE repo = ?1",
                [repo_key(repo)],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
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
        steps_in(&self.conn(), run_id, attempt).map_err(|e| self.err(e))
    }

    /// Newest first. Only the filters given become conditions, so each query can walk
    /// its index (`runs_pipeline`, `runs_status`, the id itself) from `before` down,
    /// however deep the page.
    pub fn runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let mut conditions = Vec::new();
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(pipeline) = &filter.pipeline {
            conditions.push("pipeline = ?");
            values.push(pipeline.clone().into());
        }
        if let Some(status) = filter.status {
            conditions.push("status = ?");
            values.push(status.as_str().to_owned().into());
        }
        if let Some(before) = filter.before {
            conditions.push("id < ?");
            values.push(before.into());
        }
        values.push(i64::from(filter.limit).into());
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs {clause} ORDER BY id DESC LIMIT ?"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(values), run_from_row)
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
                "SELECT pipeline, outcome, reason, run_id FROM decisions
                 WHERE delivery = (SELECT seq FROM deliveries WHERE id = ?1) ORDER BY pipeline",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok(Decision {
                    pipeline: Some(r.get::<_, String>(0)?).filter(|p| !p.is_empty()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn new_run(pipeline: &str, key: &str, group: Option<&str>, supersede: Supersede) -> NewRun {
        NewRun {
            key: Some(key.into()),
            group: group.map(str::to_owned),
            supersede,
            supersede_own_ref: false,
            generation: 1,
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

    fn run(pipeline: &str, key: &str) -> NewRun {
        new_run(pipeline, key, None, Supersede::Nothing)
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
                    pipeline: Some(r.pipeline.clone()),
                    reason: "matched".into(),
                    run: Some(r),
                })
                .chain(std::iter::once(NewDecision {
                    pipeline: Some("zz-other".into()),
                    reason: "branch not matched".into(),
                    run: None,
                }))
                .collect(),
        }
    }

    fn all(store: &Store) -> Vec<Run> {
        store
            .runs(&RunFilter {
                limit: 500,
                ..RunFilter::default()
            })
            .unwrap()
    }

    #[test]
    fn per_commit_lock_and_duplicate_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store
            .record_delivery(delivery("d1", vec![run("ci", "k1")]))
            .unwrap();
        let DeliveryOutcome::New(runs) = first else {
            panic!("{first:?}")
        };
        assert_eq!(runs.len(), 1);
        assert!(!runs[0].existing);
        let id = runs[0].id;

        // Same delivery id again: nothing new.
        let again = store
            .record_delivery(delivery("d1", vec![run("ci", "k1")]))
            .unwrap();
        // Named as they were; what the first one changed is not repeated.
        let named: Vec<RunRef> = runs
            .iter()
            .map(|r| RunRef {
                changed: Vec::new(),
                ..r.clone()
            })
            .collect();
        assert_eq!(again, DeliveryOutcome::Duplicate(named));
        assert_eq!(runs[0].changed.len(), 1);
        assert_eq!(runs[0].changed[0].status, RunStatus::Queued);

        // Another delivery of the same push: the existing run is named.
        let other = store
            .record_delivery(delivery("d2", vec![run("ci", "k1")]))
            .unwrap();
        let DeliveryOutcome::New(other) = other else {
            panic!("{other:?}")
        };
        assert_eq!((other[0].id, other[0].existing), (id, true));
        let why = store.delivery("d2").unwrap().unwrap();
        assert_eq!(why.decisions.len(), 2);
        assert_eq!(why.decisions[0].outcome, "duplicate");
        assert!(why.decisions[0].reason.contains(&format!("run {id}")));
        assert_eq!(why.decisions[1].outcome, "not_triggered");
        assert_eq!(all(&store).len(), 1);

        // An explicit run (no key) is never stopped by the lock.
        let mut explicit = run("ci", "unused");
        explicit.key = None;
        let a = store.create_run(explicit.clone()).unwrap();
        let b = store.create_run(explicit).unwrap();
        assert!(!a.existing && !b.existing && a.id != b.id);
    }

    #[test]
    fn claims_in_arrival_order_and_records_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..3 {
            store
                .record_delivery(delivery(
                    &format!("d{i}"),
                    vec![run("ci", &format!("k{i}"))],
                ))
                .unwrap();
        }
        let first = store.claim_next().unwrap().unwrap();
        let second = store.claim_next().unwrap().unwrap();
        assert!(first.id < second.id);
        assert_eq!(first.status, RunStatus::Running);
        store
            .plan_steps(first.id, vec!["a".into(), "b".into()], OnInterrupt::Retry)
            .unwrap();
        store.step_started(first.id, 1).unwrap();
        let failed = StepEnd {
            status: StepStatus::Failed,
            exit_code: Some(3),
            signal: None,
            reason: None,
        };
        store.step_finished(first.id, 1, failed).unwrap();
        store
            .finish_run(
                first.id,
                RunStatus::Failed,
                Some("step a exited 3".into()),
                StepStatus::Skipped,
            )
            .unwrap();
        let steps = store.steps(first.id).unwrap();
        assert_eq!(steps[0].status, StepStatus::Failed);
        assert_eq!(steps[0].exit_code, Some(3));
        assert_eq!(steps[1].status, StepStatus::Skipped);
        assert_eq!(steps[1].finished_at, None);

        // The second claimed run was left running: a restart marks it interrupted, then
        // queues it again as attempt 2 with fresh steps.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.interrupt_running().unwrap(), vec![second.id]);
        assert_eq!(
            store.run(second.id).unwrap().unwrap().status,
            RunStatus::Interrupted
        );
        assert_eq!(
            store.requeue_interrupted().unwrap(),
            vec![(second.id, 1, RunStatus::Queued)]
        );
        let again = store.run(second.id).unwrap().unwrap();
        assert_eq!((again.status, again.attempt), (RunStatus::Queued, 2));
        let third = store.claim_next().unwrap().unwrap();
        assert_eq!(
            third.id, second.id,
            "the re-queued run keeps its place ahead of later ones"
        );
    }

    #[test]
    fn concurrency_groups_hold_one_running_run_and_supersede_queued_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let g = Some("ci\nrefs/heads/main");
        let make = |key: &str, supersede| {
            let DeliveryOutcome::New(r) = store
                .record_delivery(delivery(key, vec![new_run("ci", key, g, supersede)]))
                .unwrap()
            else {
                panic!()
            };
            r[0].clone()
        };
        let a = make("a", Supersede::Pending);
        assert_eq!(store.claim_next().unwrap().unwrap().id, a.id);
        let b = make("b", Supersede::Pending);
        // The group is busy: nothing to claim.
        assert!(store.claim_next().unwrap().is_none());
        let c = make("c", Supersede::Pending);
        let b_now = store.run(b.id).unwrap().unwrap();
        assert_eq!(b_now.status, RunStatus::Canceled);
        assert_eq!(
            b_now.reason.as_deref(),
            Some(format!("superseded by run {}", c.id).as_str())
        );
        assert!(
            c.supersedes.is_empty(),
            "cancel: pending leaves the running run alone"
        );
        let d = make("d", Supersede::Running);
        assert_eq!(
            d.supersedes,
            vec![a.id],
            "cancel: running names the running run"
        );
        assert_eq!(
            store.run(c.id).unwrap().unwrap().status,
            RunStatus::Canceled
        );
        store
            .finish_run(a.id, RunStatus::Canceled, None, StepStatus::Skipped)
            .unwrap();
        assert_eq!(store.claim_next().unwrap().unwrap().id, d.id);

        // Without supersede (cancel: none) runs of a group queue up in order.
        let e = make("e", Supersede::Nothing);
        let f = make("f", Supersede::Nothing);
        store
            .finish_run(d.id, RunStatus::Succeeded, None, StepStatus::Skipped)
            .unwrap();
        assert_eq!(store.claim_next().unwrap().unwrap().id, e.id);
        assert!(store.claim_next().unwrap().is_none());
        store
            .finish_run(e.id, RunStatus::Succeeded, None, StepStatus::Skipped)
            .unwrap();
        assert_eq!(store.claim_next().unwrap().unwrap().id, f.id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_deliveries_share_commits_and_keep_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = std::sync::Arc::clone(&store);
            // 200 deliveries of 50 distinct pushes: 50 runs.
            let d = delivery(&format!("d{i}"), vec![run("ci", &format!("k{}", i % 50))]);
            tasks.push(tokio::spawn(
                async move { s.record_delivery_async(d).await },
            ));
        }
        let mut created = 0;
        for t in tasks {
            match t.await.unwrap().unwrap() {
                DeliveryOutcome::New(runs) => {
                    created += runs.iter().filter(|r| !r.existing).count()
                }
                DeliveryOutcome::Duplicate(_) => panic!("distinct delivery ids"),
            }
        }
        assert_eq!(created, 50);
        assert_eq!(all(&store).len(), 50);
        // Committed, not just cached: visible to a fresh store on the same file.
        let reopened = Store::open(dir.path()).unwrap();
        assert!(reopened.delivery("d199").unwrap().is_some());
    }

    #[test]
    fn retention_prunes_old_finished_runs_and_keeps_queued_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ids: Vec<i64> = (0..6)
            .map(|i| store.create_run(run("ci", &format!("k{i}"))).unwrap().id)
            .collect();
        for id in &ids[..5] {
            store
                .finish_run(*id, RunStatus::Succeeded, None, StepStatus::Skipped)
                .unwrap();
        }
        // Keep the newest 2: the 3 oldest are beyond them; all finished but none is old.
        let pruned = store.prune(2, 0).unwrap();
        assert_eq!(pruned.runs, ids[..3].to_vec());
        assert!(!pruned.more);
        assert!(store.run(ids[0]).unwrap().is_none());
        assert!(store.run(ids[3]).unwrap().is_some());
        // Older than the cutoff: every finished run goes, the queued one stays.
        let pruned = store.prune(1000, crate::clock::now_ms() + 1).unwrap();
        assert_eq!(pruned.runs, ids[3..5].to_vec());
        let left: Vec<i64> = all(&store).iter().map(|r| r.id).collect();
        assert_eq!(left, vec![ids[5]]);
    }

    #[test]
    fn a_run_that_supersedes_others_takes_over_the_oldest_diff_base_of_its_ref() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let push = |key: &str, git_ref: &str, before: &str, group: &str, supersede| {
            let mut r = new_run("ci", key, Some(group), supersede);
            r.git_ref = git_ref.into();
            r.before = before.repeat(40);
            store.create_run(r).unwrap().id
        };
        let main = "ci\nrefs/heads/main";
        let running = push("r", "refs/heads/main", "0", main, Supersede::Pending);
        assert_eq!(store.claim_next().unwrap().unwrap().id, running);
        let a = push("a", "refs/heads/main", "1", main, Supersede::Pending);
        let b = push("b", "refs/heads/main", "2", main, Supersede::Pending);
        let c = push("c", "refs/heads/main", "3", main, Supersede::Pending);
        let before = |id| store.run(id).unwrap().unwrap().before;
        assert_eq!(before(b), "1".repeat(40), "b stands for a's push too");
        assert_eq!(before(c), "1".repeat(40), "and c for both, through b");
        assert_eq!(before(running), "0".repeat(40), "a running run is kept");
        assert_eq!(store.run(a).unwrap().unwrap().status, RunStatus::Canceled);
        let d = push("d", "refs/heads/main", "4", main, Supersede::Running);
        assert_eq!(
            before(d),
            "0".repeat(40),
            "cancel: running: the running one's"
        );

        // One group for the whole pipeline: another ref's runs are no base of this one.
        let feature = push("f", "refs/heads/feature", "5", "ci", Supersede::Pending);
        let e = push("e", "refs/heads/main", "6", "ci", Supersede::Pending);
        assert_eq!(
            store.run(feature).unwrap().unwrap().status,
            RunStatus::Canceled
        );
        assert_eq!(before(e), "6".repeat(40));
        // Nothing superseded (cancel: none): the run's own push.
        let g = push("g", "refs/heads/main", "7", main, Supersede::Nothing);
        let h = push("h", "refs/heads/main", "8", main, Supersede::Nothing);
        assert_eq!((before(g), before(h)), ("7".repeat(40), "8".repeat(40)));
    }

    #[test]
    fn interrupted_fail_ends_a_run_whose_steps_had_started_and_retries_one_cut_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for (key, policy, started) in [
            ("deploy", OnInterrupt::Fail, true),
            ("checkout", OnInterrupt::Fail, false),
            ("ci", OnInterrupt::Retry, true),
        ] {
            let id = store.create_run(run(key, key)).unwrap().id;
            assert_eq!(store.claim_next().unwrap().unwrap().id, id);
            store.plan_steps(id, vec!["s".into()], policy).unwrap();
            if started {
                store.step_started(id, 1).unwrap();
            }
            ids.push(id);
        }
        store.interrupt_running().unwrap();
        let outcome = store.requeue_interrupted().unwrap();
        assert_eq!(
            outcome,
            vec![
                (ids[0], 1, RunStatus::Failed),
                (ids[1], 1, RunStatus::Queued),
                (ids[2], 1, RunStatus::Queued),
            ]
        );
        let deploy = store.run(ids[0]).unwrap().unwrap();
        assert_eq!(
            deploy.reason.as_deref(),
            Some("interrupted; not retried: interrupted: fail")
        );
        assert_eq!(deploy.attempt, 1);
        assert_eq!(
            store.steps(ids[0]).unwrap()[0].status,
            StepStatus::Interrupted
        );
    }

    #[test]
    fn reruns_count_generations_and_start_at_attempt_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut rerun = run("ci", "unused");
        rerun.key = None;
        rerun.generation = 3;
        let id = store.create_run(rerun).unwrap().id;
        let made = store.run(id).unwrap().unwrap();
        assert_eq!((made.attempt, made.generation), (1, 3));
        // Interrupted once, it is queued again like any run.
        store.claim_next().unwrap();
        store.interrupt_running().unwrap();
        assert_eq!(
            store.requeue_interrupted().unwrap(),
            vec![(id, 1, RunStatus::Queued)]
        );
    }

    #[test]
    fn the_generation_migration_moves_old_reruns_to_attempt_one_with_their_steps() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("hookci.db")).unwrap();
            for migration in &SCHEMA[..3] {
                conn.execute_batch(migration).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 3;
                 INSERT INTO runs (id, pipeline, repo, ref, commit_sha, before_sha, clone_url, trigger,
                                   status, attempt, created_at)
                 VALUES (1, 'ci', 'o/r', 'refs/heads/main', 'c', 'b', 'u', 'push', 'succeeded', 2, 1),
                        (2, 'ci', 'o/r', 'refs/heads/main', 'c', 'b', 'u', 'rerun', 'succeeded', 3, 2),
                        (3, 'ci', 'o/r', 'refs/heads/main', 'c', 'b', 'u', 'rerun', 'queued', 2, 3);
                 INSERT INTO steps (run_id, attempt, number, name, status)
                 VALUES (1, 1, 1, 'build', 'interrupted'), (1, 2, 1, 'build', 'succeeded'),
                        (2, 3, 1, 'build', 'succeeded');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let shape = |id| {
            let r = store.run(id).unwrap().unwrap();
            (r.attempt, r.generation)
        };
        assert_eq!(shape(1), (2, 1), "a push's run keeps its attempts");
        assert_eq!(shape(2), (1, 3));
        assert_eq!(shape(3), (1, 2));
        assert_eq!(store.steps(1).unwrap()[0].status, StepStatus::Succeeded);
        assert_eq!(store.steps_of(1, Some(1)).unwrap().len(), 1);
        let steps = store.steps(2).unwrap();
        assert_eq!(
            steps.len(),
            1,
            "the rerun's steps are its current attempt's"
        );
        assert_eq!(steps[0].status, StepStatus::Succeeded);
    }

    #[test]
    fn retention_keeps_the_newest_finished_runs_by_rank_despite_id_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut finished = Vec::new();
        for i in 0..8 {
            let made = store.create_run(run("ci", &format!("k{i}"))).unwrap();
            // A second push of the same commit: refused by the lock, it uses an id up.
            assert!(
                store
                    .create_run(run("ci", &format!("k{i}")))
                    .unwrap()
                    .existing
            );
            store
                .finish_run(made.id, RunStatus::Succeeded, None, StepStatus::Skipped)
                .unwrap();
            finished.push(made.id);
        }
        let queued = store.create_run(run("ci", "queued")).unwrap().id;
        let interrupted = store.create_run(run("ci", "interrupted")).unwrap().id;
        store
            .finish_run(
                interrupted,
                RunStatus::Interrupted,
                None,
                StepStatus::Interrupted,
            )
            .unwrap();
        assert!(finished.windows(2).all(|w| w[1] > w[0] + 1), "{finished:?}");

        store.prune(5, 0).unwrap();
        let mut left: Vec<i64> = all(&store).iter().map(|r| r.id).collect();
        left.sort_unstable();
        let mut expected = finished[3..].to_vec();
        // Neither counts as finished nor is pruned: one waits, one is queued again at start.
        expected.extend([queued, interrupted]);
        assert_eq!(left, expected);
        assert_eq!(store.prune(5, 0).unwrap(), Pruned::default());
    }

    #[test]
    fn retention_bounds_deliveries_and_their_decisions_but_keeps_those_of_kept_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // d0 starts a run that stays queued; d1..d9 start nothing.
        store
            .record_delivery(delivery("d0", vec![run("ci", "k0")]))
            .unwrap();
        for i in 1..10 {
            store
                .record_delivery(delivery(&format!("d{i}"), vec![]))
                .unwrap();
        }
        let pruned = store.prune(3, 0).unwrap();
        assert_eq!(pruned.deliveries, 6);
        let kept: Vec<String> = (0..10)
            .map(|i| format!("d{i}"))
            .filter(|id| store.delivery(id).unwrap().is_some())
            .collect();
        assert_eq!(kept, ["d0", "d7", "d8", "d9"]);
        let decisions: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM decisions", [], |r| r.get(0))
            .unwrap();
        // d0: its run and zz-other; d7..d9: zz-other each.
        assert_eq!(decisions, 5);
        // Age: older than the cutoff goes too, unless a kept run came from it.
        let pruned = store.prune(1000, crate::clock::now_ms() + 1).unwrap();
        assert_eq!(pruned.deliveries, 3);
        assert!(store.delivery("d0").unwrap().is_some());
    }

    #[test]
    fn repository_keys_ignore_case() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut d = delivery("d1", vec![run("ci", "k1")]);
        d.repo = "Octo-Org/Octo-Repo".into();
        store.record_delivery(d).unwrap();
        for spelling in [
            "octo-org/octo-repo",
            "OCTO-ORG/octo-repo",
            "Octo-Org/Octo-Repo",
        ] {
            assert_eq!(
                store.clone_url_of(spelling).unwrap().as_deref(),
                Some("/tmp/x"),
                "{spelling}"
            );
            assert_eq!(
                store.ref_heads(spelling).unwrap().get("refs/heads/main"),
                Some(&"c".repeat(40)),
                "{spelling}"
            );
        }
        // A later push spelled another way updates the same rows.
        let mut d = delivery("d2", vec![run("ci", "k2")]);
        d.repo = "octo-org/OCTO-REPO".into();
        d.clone_url = "/tmp/y".into();
        d.head = Some("d".repeat(40));
        store.record_delivery(d).unwrap();
        assert_eq!(
            store.clone_url_of("octo-org/octo-repo").unwrap().as_deref(),
            Some("/tmp/y")
        );
        let heads = store.ref_heads("Octo-Org/Octo-Repo").unwrap();
        assert_eq!(heads.len(), 1, "{heads:?}");
        assert_eq!(heads["refs/heads/main"], "d".repeat(40));
    }

    #[test]
    fn the_case_migration_keeps_the_newest_of_each_repository() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A store as the schema before it left it: keys in any case.
            let conn = Connection::open(dir.path().join("hookci.db")).unwrap();
            for migration in &SCHEMA[..2] {
                conn.execute_batch(migration).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 2;
                 INSERT INTO repositories VALUES ('Octo/Repo', 'old-url', 1), ('octo/repo', 'new-url', 2),
                                                 ('Solo/One', 'solo-url', 1);
                 INSERT INTO ref_heads VALUES ('Octo/Repo', 'refs/heads/main', 'new', 'push', 3),
                                              ('octo/repo', 'refs/heads/main', 'old', 'push', 2),
                                              ('OCTO/REPO', 'refs/heads/dev', 'dev', 'push', 1);",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.clone_url_of("octo/repo").unwrap().as_deref(),
            Some("new-url")
        );
        assert_eq!(
            store.clone_url_of("solo/one").unwrap().as_deref(),
            Some("solo-url")
        );
        let heads = store.ref_heads("Octo/Repo").unwrap();
        assert_eq!(
            heads,
            std::collections::HashMap::from([
                ("refs/heads/main".to_owned(), "new".to_owned()),
                ("refs/heads/dev".to_owned(), "dev".to_owned()),
            ])
        );
    }

    #[test]
    fn reconcile_applies_a_ref_only_where_its_head_is_still_the_one_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store.reconcile_view("o/r").unwrap();
        assert_eq!(first, ReconcileView::default());
        let change = |git_ref: &str, seen: Option<&str>, head: &str, key: &str| RefChange {
            git_ref: git_ref.into(),
            seen: seen.map(str::to_owned),
            head: head.into(),
            runs: vec![run("ci", key)],
        };
        let done = store
            .record_reconcile(
                "o/r".into(),
                vec![change("refs/heads/main", None, "a", "ka")],
            )
            .unwrap();
        assert_eq!((done.runs.len(), done.stale.len()), (1, 0));
        let view = store.reconcile_view("O/R").unwrap();
        assert!(view.reconciled);
        assert_eq!(view.heads["refs/heads/main"], "a");

        // A push lands between the pass's read and its write: main is now at c.
        let mut pushed = delivery("d1", vec![]);
        pushed.head = Some("c".repeat(40));
        store.record_delivery(pushed).unwrap();
        let done = store
            .record_reconcile(
                "o/r".into(),
                vec![
                    change("refs/heads/main", Some("a"), "b", "kb"),
                    change("refs/tags/v1", None, "t", "kt"),
                ],
            )
            .unwrap();
        assert_eq!(done.stale, ["refs/heads/main"]);
        assert_eq!(done.runs.len(), 1, "the tag's run only: {done:?}");
        let heads = store.ref_heads("o/r").unwrap();
        assert_eq!(
            heads["refs/heads/main"],
            "c".repeat(40),
            "the push's head stays"
        );
        assert_eq!(heads["refs/tags/v1"], "t");
        assert_eq!(all(&store).len(), 2, "no run for the stale listing of main");
    }

    #[test]
    fn repositories_reconciled_before_the_marker_existed_are_marked() {
        let dir = tempfile::tempdir().unwrap();
        let marker = SCHEMA
            .iter()
            .position(|m| m.contains("CREATE TABLE reconciled"))
            .unwrap();
        {
            let conn = Connection::open(dir.path().join("hookci.db")).unwrap();
            for migration in &SCHEMA[..marker] {
                conn.execute_batch(migration).unwrap();
            }
            conn.execute_batch(&format!(
                "PRAGMA user_version = {marker};
                 INSERT INTO ref_heads VALUES ('o/listed', 'refs/heads/main', 'a', 'reconcile', 1),
                                              ('o/listed', 'refs/heads/dev', 'b', 'push', 2),
                                              ('o/pushed', 'refs/heads/main', 'c', 'push', 3);"
            ))
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert!(store.reconcile_view("o/listed").unwrap().reconciled);
        assert!(store.reconcile_view("o/pushed").unwrap().reconciled);
        assert!(!store.reconcile_view("o/never-seen").unwrap().reconciled);
    }

    /// Reports every transition as a status of its commit, plus a notification at a
    /// run's end that says what the previous result of its ref was.
    struct Recorder;

    impl ReportPolicy for Recorder {
        fn idle(&self) -> bool {
            false
        }

        fn reports(
            &self,
            t: &Transition<'_>,
            previous: &dyn Fn() -> Option<RunStatus>,
        ) -> Vec<NewReport> {
            let status = NewReport {
                kind: ReportKind::Status,
                target: format!("github:hookci/{}", t.pipeline),
                address: format!("repos/{}/statuses/{}", t.repo, t.commit),
                coalesce: Some(format!("{}@{}", t.repo, t.commit)),
                signing: None,
                body: Some(format!("{}{:?}", t.status.as_str(), t.step)),
                outcome: None,
            };
            let mut out = vec![status];
            if t.status.is_final() {
                out.push(NewReport {
                    kind: ReportKind::Webhook,
                    target: "webhook:example.com".into(),
                    address: "https://example.com/ci".into(),
                    coalesce: None,
                    signing: Some("KEY".into()),
                    body: None,
                    outcome: Some(format!("after {:?}", previous())),
                });
            }
            out
        }

        fn committed(&self) {}
    }

    #[test]
    fn the_outbox_keeps_the_newest_unsent_status_of_a_commit_and_goes_with_its_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // No policy: nothing is written.
        let quiet = store.create_run(run("ci", "quiet")).unwrap().id;
        assert!(store.reports_of(quiet).unwrap().is_empty());
        store.cancel_queued(quiet, "by hand".into()).unwrap();

        store.set_report_policy(std::sync::Arc::new(Recorder));
        let id = store.create_run(run("ci", "k1")).unwrap().id;
        let due = store.due_reports(i64::MAX, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].body.as_deref(), Some("queuedNone"));
        // Sent: it stays, as sent. The next ones replace each other while unsent.
        store.report_attempted(due[0].id, Attempt::Sent).unwrap();
        assert_eq!(store.claim_next().unwrap().unwrap().id, id);
        store
            .plan_steps(id, vec!["build".into(), "test".into()], OnInterrupt::Retry)
            .unwrap();
        store.step_started(id, 2).unwrap();
        let due = store.due_reports(i64::MAX, 10).unwrap();
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(
            due[0].body.as_deref(),
            Some("runningSome((2, 2, \"test\"))")
        );
        store
            .report_attempted(
                due[0].id,
                Attempt::Retry {
                    at: 5,
                    reason: "HTTP 502".into(),
                },
            )
            .unwrap();
        assert_eq!(store.next_report_at().unwrap(), Some(5));
        store
            .finish_run(
                id,
                RunStatus::Failed,
                Some("step test".into()),
                StepStatus::Skipped,
            )
            .unwrap();
        let due = store.due_reports(i64::MAX, 10).unwrap();
        let shape: Vec<(ReportKind, Option<&str>, Option<&str>, i64)> = due
            .iter()
            .map(|r| (r.kind, r.body.as_deref(), r.outcome.as_deref(), r.attempts))
            .collect();
        assert_eq!(
            shape,
            vec![
                (ReportKind::Status, Some("failedNone"), None, 0),
                (ReportKind::Webhook, None, Some("after None"), 0),
            ],
            "the retried status is replaced; the run before (canceled) is no result"
        );
        store
            .report_attempted(
                due[1].id,
                Attempt::Failed {
                    reason: "HTTP 404: Not Found".into(),
                },
            )
            .unwrap();
        let shown = store.reports_of(id).unwrap();
        let shown: Vec<(&str, &str, Option<&str>, i64)> = shown
            .iter()
            .map(|r| {
                (
                    r.target.as_str(),
                    r.state.as_str(),
                    r.reason.as_deref(),
                    r.attempts,
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                ("github:hookci/ci", "sent", None, 1),
                ("github:hookci/ci", "pending", None, 0),
                (
                    "webhook:example.com",
                    "failed",
                    Some("HTTP 404: Not Found"),
                    1
                ),
            ]
        );
        // A run interrupted by a crash reports nothing then, and is queued again at
        // the next start: that reports.
        let cut = store.create_run(run("ci", "k2")).unwrap().id;
        assert_eq!(store.claim_next().unwrap().unwrap().id, cut);
        store.interrupt_running().unwrap();
        let latest = |id| {
            store
                .due_reports(i64::MAX, 50)
                .unwrap()
                .into_iter()
                .filter(|r| r.run == id)
                .map(|r| r.body)
                .collect::<Vec<_>>()
        };
        assert_eq!(latest(cut), [Some("runningNone".to_owned())]);
        store.requeue_interrupted().unwrap();
        assert_eq!(latest(cut), [Some("queuedNone".to_owned())]);

        store.prune(1, 0).unwrap();
        assert!(store.run(quiet).unwrap().is_none());
        store.prune(1, i64::MAX).unwrap();
        assert!(
            store.reports_of(id).unwrap().is_empty(),
            "pruned with its run"
        );
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
