//! The durable store: deliveries, each pipeline's decision, runs and steps, and the
//! outbox of reports (`outbox`). Callers see the trait [`Store`] (`backend`), with two
//! backends: SQLite in `state_dir` (WAL, `synchronous=FULL`; this file and its
//! siblings) and PostgreSQL shared by several instances (`postgres`). Both pass one
//! conformance suite (`conformance`). Every SQL statement of hookci lives in this
//! module. Calls block: async callers run them on blocking threads.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};

mod backend;
mod batch;
mod instance;
mod model;
mod outbox;
pub mod postgres;
mod views;
mod writes;
pub use backend::{open, BoxFuture, ReconcileGuard, Store};
pub use instance::instance_id;
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
    // Which instance claimed a run (its `instance_id`): the API shows it, and with a
    // shared database an instance recovers only the runs it owns.
    r#"
ALTER TABLE runs ADD COLUMN owner TEXT;
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
    // Leases and cancels across instances (PostgreSQL's migration of the same columns):
    // until when (ms) the owner of a running run holds it, and why a cancel sent to
    // another instance asked its owner to stop it. One SQLite file has one instance:
    // no lease, and a cancel kept only for an interrupted run's requeue.
    r#"
ALTER TABLE runs ADD COLUMN lease_until INTEGER;
ALTER TABLE runs ADD COLUMN cancel_requested TEXT;
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
    #[error("database {url}: {}", pg_reason(source))]
    Postgres {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("database {url}: {message}")]
    Database { url: String, message: String },
    #[error("database {url}: written by a newer hookci (schema {found}, this one knows {known})")]
    TooNewDatabase {
        url: String,
        found: i64,
        known: usize,
    },
    #[error("store {path}: written by a newer hookci (schema {found}, this one knows {known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
}

/// The server's own words for a failure (a timeout, a refused login, too many
/// connections), which the client's error shows only as "db error".
fn pg_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// The SQLite store. One connection behind a mutex: SQLite serialises writers anyway,
/// and the per-commit lock is a UNIQUE index, so concurrent deliveries of one push can
/// never both create a run.
pub struct Sqlite {
    path: PathBuf,
    /// Reads only; every write goes through `writer`.
    conn: Mutex<Connection>,
    writer: batch::Writer,
    /// Decides what each run transition reports (`outbox`); none: nothing.
    policy: std::sync::RwLock<Option<std::sync::Arc<dyn ReportPolicy>>>,
    /// Recorded as the owner of the runs this store claims.
    instance: Option<String>,
    /// Never fired: one SQLite file has one daemon, which wakes itself.
    wakeups: std::sync::Arc<tokio::sync::Notify>,
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
    // The writer alone uses more distinct statements than rusqlite's default cache of
    // 16 holds (a push's, a claim's, a step's, the outbox's): past it, each use of an
    // evicted one would parse and plan it again.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Plans that do not depend on the values bound. Otherwise SQLite marks a statement
    // with a filter such as `ref = ?2` to be planned again when its values change, and
    // the statement cache clears every statement's values when it takes it back: each
    // cached statement of that kind was parsed and planned again on every use (for
    // intake, about a sixth of the writer's time went to the base lookup of a push).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(conn)
}

/// Prepared statements a connection keeps (see `connect`).
const STATEMENT_CACHE: usize = 128;

const RUN_COLUMNS: &str =
    "id, pipeline, repo, ref, commit_sha, before_sha, clone_url, trigger, delivery_id, \
     status, reason, attempt, generation, created_at, started_at, finished_at, log_dropped, owner, \
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
        instance: row.get(17)?,
        timings: match row.get::<_, Option<i64>>(21)? {
            Some(to_first_step_ms) => Some(Timings {
                queue_ms: row.get(18)?,
                fetch_ms: row.get(19)?,
                checkout_ms: row.get(20)?,
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

impl Sqlite {
    /// Opens (creating if needed, mode 0600) `state_dir/hookci.db` and brings its schema
    /// up to date.
    pub fn open(state_dir: &Path) -> Result<Sqlite, StoreError> {
        Sqlite::open_as(state_dir, None)
    }

    /// [`Sqlite::open`], recording `instance` as the owner of the runs it claims.
    pub fn open_as(state_dir: &Path, instance: Option<String>) -> Result<Sqlite, StoreError> {
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
        Ok(Sqlite {
            path,
            conn: Mutex::new(conn),
            writer,
            policy: std::sync::RwLock::new(None),
            instance,
            wakeups: std::sync::Arc::new(tokio::sync::Notify::new()),
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
mod conformance;

/// What only SQLite has: its file, and migrations from its older schemas.
#[cfg(test)]
mod tests {
    use super::*;

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
        let store = Sqlite::open(dir.path()).unwrap();
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
        let store = Sqlite::open(dir.path()).unwrap();
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
        let store = Sqlite::open(dir.path()).unwrap();
        assert!(store.reconcile_view("o/listed").unwrap().reconciled);
        assert!(store.reconcile_view("o/pushed").unwrap().reconciled);
        assert!(!store.reconcile_view("o/never-seen").unwrap().reconciled);
    }

    #[test]
    fn database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(dir.path()).unwrap();
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
