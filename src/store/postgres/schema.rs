//! The PostgreSQL schema, as a list of migrations applied in order, each once: the
//! versions applied are rows of `hookci_schema`. Instances that start together take
//! turns (a session advisory lock), so each migration runs exactly once. Append new
//! migrations; never edit one that has shipped.

use tokio_postgres::NoTls;

use super::{PgError, PgResult, LOCKS, MIGRATING};

pub(super) const SCHEMA: &[&str] = &[
    // The records of SQLite's schema as it stands (`store::SCHEMA`), in one step:
    // delivery ids and run keys unique exactly as there, and the owner of a claim.
    r#"
CREATE TABLE deliveries (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    event       TEXT NOT NULL,
    repo        TEXT NOT NULL,
    ref         TEXT NOT NULL,
    after       TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE TABLE runs (
    id          BIGSERIAL PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    repo        TEXT NOT NULL,
    ref         TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    before_sha  TEXT NOT NULL,
    clone_url   TEXT NOT NULL,
    run_key     TEXT UNIQUE,
    grp         TEXT,
    trigger     TEXT NOT NULL,
    delivery_id TEXT,
    status      TEXT NOT NULL,
    reason      TEXT,
    attempt     BIGINT NOT NULL DEFAULT 1,
    generation  BIGINT NOT NULL DEFAULT 1,
    interrupted TEXT NOT NULL DEFAULT 'retry',
    created_at  BIGINT NOT NULL,
    started_at  BIGINT,
    finished_at BIGINT,
    log_dropped BIGINT NOT NULL DEFAULT 0,
    owner       TEXT
);
CREATE INDEX runs_status ON runs(status, id);
CREATE INDEX runs_pipeline ON runs(pipeline, id);
CREATE INDEX runs_group ON runs(grp, status);
CREATE INDEX runs_pipeline_ref ON runs(pipeline, ref, id);
CREATE INDEX runs_finished ON runs(id)
    WHERE status IN ('succeeded', 'failed', 'timed_out', 'canceled', 'skipped');
CREATE TABLE decisions (
    delivery    BIGINT NOT NULL REFERENCES deliveries(seq),
    pipeline    TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    run_id      BIGINT,
    PRIMARY KEY (delivery, pipeline)
);
CREATE TABLE steps (
    run_id      BIGINT NOT NULL REFERENCES runs(id),
    attempt     BIGINT NOT NULL,
    number      BIGINT NOT NULL,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL,
    exit_code   BIGINT,
    signal      BIGINT,
    reason      TEXT,
    started_at  BIGINT,
    finished_at BIGINT,
    PRIMARY KEY (run_id, attempt, number)
);
CREATE TABLE ref_heads (
    repo        TEXT NOT NULL,
    ref         TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    source      TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (repo, ref)
);
CREATE TABLE repositories (
    repo        TEXT PRIMARY KEY,
    clone_url   TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE TABLE reconciled (
    repo        TEXT PRIMARY KEY,
    first_at    BIGINT NOT NULL
);
CREATE TABLE reports (
    id           BIGSERIAL PRIMARY KEY,
    run_id       BIGINT NOT NULL,
    kind         TEXT NOT NULL,
    target       TEXT NOT NULL,
    address      TEXT NOT NULL,
    coalesce_key TEXT,
    signing      TEXT,
    body         TEXT,
    outcome      TEXT,
    state        TEXT NOT NULL,
    reason       TEXT,
    attempts     BIGINT NOT NULL DEFAULT 0,
    next_at      BIGINT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX reports_due ON reports(next_at, id) WHERE state = 'pending';
CREATE INDEX reports_coalesce ON reports(coalesce_key) WHERE state = 'pending';
CREATE INDEX reports_run ON reports(run_id);
"#,
    // Push to first step, per run (SQLite's migration of the same columns).
    r#"
ALTER TABLE runs ADD COLUMN queue_ms BIGINT;
ALTER TABLE runs ADD COLUMN fetch_ms BIGINT;
ALTER TABLE runs ADD COLUMN checkout_ms BIGINT;
ALTER TABLE runs ADD COLUMN first_step_ms BIGINT;
"#,
    // Leases and cancels across instances: until when (ms) the owner of a running run
    // holds it (renewed while it runs; once past, another instance recovers the run),
    // and why a cancel sent to another instance asked the owner to stop it.
    r#"
ALTER TABLE runs ADD COLUMN lease_until BIGINT;
ALTER TABLE runs ADD COLUMN cancel_requested TEXT;
CREATE INDEX runs_running_lease ON runs (lease_until) WHERE status = 'running';
"#,
    // Step output, so that every instance serves every run's log: pieces of each step's
    // log (secrets already masked) keyed by where they begin in it, written in batches
    // by the instance running the step; pruned with their run.
    r#"
CREATE TABLE log_chunks (
    run_id      BIGINT NOT NULL,
    attempt     BIGINT NOT NULL,
    step        BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    bytes       BYTEA NOT NULL,
    PRIMARY KEY (run_id, attempt, step, at)
);
"#,
    // The database's clock in milliseconds since the epoch: leases are set and compared
    // by this one clock, so that no instance's own clock, ahead or behind, decides
    // when another instance's lease lapsed.
    r#"
CREATE FUNCTION hookci_clock_ms() RETURNS BIGINT LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;
"#,
    // An interrupted run with a lease is one its instance holds while it recovers it
    // at a start, and others take it over when that hold lapses; one without waits
    // for its instance's next start. Runs interrupted before this kept the lease of
    // their last renewal: none of them is being recovered now, so they wait as before.
    r#"
UPDATE runs SET lease_until = NULL WHERE status = 'interrupted';
"#,
];

/// Why the schema cannot be used: a newer hookci wrote it.
#[derive(Debug)]
pub(super) struct TooNew {
    pub found: i64,
}

/// Applies the migrations this database lacks, on a connection of its own that holds
/// the migration lock throughout (closing it releases the lock, also on failure).
pub(super) async fn migrate(config: &tokio_postgres::Config) -> PgResult<Result<(), TooNew>> {
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let result = apply(&client).await;
    drop(client);
    let _ = driver.await;
    result
}

async fn apply(c: &tokio_postgres::Client) -> PgResult<Result<(), TooNew>> {
    c.execute("SELECT pg_advisory_lock($1, $2)", &[&LOCKS, &MIGRATING])
        .await?;
    c.batch_execute("CREATE TABLE IF NOT EXISTS hookci_schema (version BIGINT PRIMARY KEY)")
        .await?;
    let version: i64 = c
        .query_one("SELECT COALESCE(MAX(version), 0) FROM hookci_schema", &[])
        .await?
        .get(0);
    let known = SCHEMA.len() as i64;
    if version > known {
        return Ok(Err(TooNew { found: version }));
    }
    for (i, migration) in SCHEMA.iter().enumerate().skip(version as usize) {
        let step = i as i64 + 1;
        c.batch_execute("BEGIN").await?;
        let applied = async {
            c.batch_execute(migration).await?;
            c.execute("INSERT INTO hookci_schema (version) VALUES ($1)", &[&step])
                .await?;
            c.batch_execute("COMMIT").await?;
            Ok::<(), PgError>(())
        }
        .await;
        if let Err(e) = applied {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    }
    c.execute("SELECT pg_advisory_unlock($1, $2)", &[&LOCKS, &MIGRATING])
        .await?;
    Ok(Ok(()))
}
