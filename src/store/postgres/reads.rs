//! The PostgreSQL store's reads: runs, steps, deliveries, ref heads, the dashboard's
//! views and the outbox's pending reports, as SQLite's (`store`) answers them.

use std::collections::HashMap;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{query, query_opt, PgError, PgResult, Postgres};
use crate::store::outbox::ReportKind;
use crate::store::{
    repo_key, Decision, Delivery, ReconcileView, Report, ReportView, Run, RunFilter, RunStatus,
    Step, StepStatus, StoreError, Timings, RUN_COLUMNS, STEP_COLUMNS,
};

pub(super) fn run_from_row(row: &Row) -> PgResult<Run> {
    let status: String = row.try_get(9)?;
    Ok(Run {
        id: row.try_get(0)?,
        pipeline: row.try_get(1)?,
        repo: row.try_get(2)?,
        git_ref: row.try_get(3)?,
        commit: row.try_get(4)?,
        before: row.try_get(5)?,
        clone_url: row.try_get(6)?,
        trigger: row.try_get(7)?,
        delivery: row.try_get(8)?,
        status: RunStatus::parse(&status).unwrap_or(RunStatus::Failed),
        reason: row.try_get(10)?,
        attempt: row.try_get(11)?,
        generation: row.try_get(12)?,
        created_at: row.try_get(13)?,
        started_at: row.try_get(14)?,
        finished_at: row.try_get(15)?,
        log_dropped: row.try_get(16)?,
        instance: row.try_get(17)?,
        timings: match row.try_get::<_, Option<i64>>(21)? {
            Some(to_first_step_ms) => Some(Timings {
                queue_ms: row.try_get(18)?,
                fetch_ms: row.try_get(19)?,
                checkout_ms: row.try_get(20)?,
                to_first_step_ms,
            }),
            None => None,
        },
    })
}

pub(super) fn runs_from(rows: &[Row]) -> PgResult<Vec<Run>> {
    rows.iter().map(run_from_row).collect()
}

pub(super) fn step_from_row(r: &Row) -> PgResult<Step> {
    let status: String = r.try_get(2)?;
    Ok(Step {
        number: r.try_get(0)?,
        name: r.try_get(1)?,
        status: StepStatus::parse(&status),
        exit_code: r.try_get(3)?,
        signal: r.try_get(4)?,
        reason: r.try_get(5)?,
        started_at: r.try_get(6)?,
        finished_at: r.try_get(7)?,
    })
}

/// The steps of one attempt of a run (`None`: the current one).
pub(super) async fn steps_in<C: deadpool_postgres::GenericClient>(
    c: &C,
    run_id: i64,
    attempt: Option<i64>,
) -> PgResult<Vec<Step>> {
    let rows = query(
        c,
        &format!(
            "SELECT {STEP_COLUMNS} FROM steps
             WHERE run_id = $1 AND attempt = COALESCE($2::BIGINT, (SELECT attempt FROM runs WHERE id = $1))
             ORDER BY number"
        ),
        &[&run_id, &attempt],
    )
    .await?;
    rows.iter().map(step_from_row).collect()
}

/// One value per parameter of a dynamically built query.
type Values = Vec<Box<dyn ToSql + Sync + Send>>;

fn refs(values: &Values) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|v| v.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

impl Postgres {
    /// Runs a read on a pooled connection, given up after the store's limit. The
    /// connection of a read given up goes back to the pool: outside a transaction it
    /// holds no state, and the answer it missed is discarded when it comes.
    fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = PgResult<T>> + Send,
    {
        let pool = self.pool.clone();
        let limit = self.limit();
        self.block(async move {
            tokio::time::timeout(limit, async move { f(pool.get().await?).await })
                .await
                .unwrap_or(Err(PgError::Unanswered(limit)))
        })
    }

    pub(super) fn ref_heads_of(&self, repo: &str) -> Result<HashMap<String, String>, StoreError> {
        let repo = repo_key(repo);
        self.read(move |c| async move {
            let rows = query(
                &c,
                "SELECT ref, commit_sha FROM ref_heads WHERE repo = $1",
                &[&repo],
            )
            .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
    }

    pub(super) fn reconcile_view_of(&self, repo: &str) -> Result<ReconcileView, StoreError> {
        let heads = self.ref_heads_of(repo)?;
        let repo = repo_key(repo);
        let reconciled = self.read(move |c| async move {
            Ok(
                query_opt(&c, "SELECT 1 FROM reconciled WHERE repo = $1", &[&repo])
                    .await?
                    .is_some(),
            )
        })?;
        Ok(ReconcileView { heads, reconciled })
    }

    pub(super) fn clone_url(&self, repo: &str) -> Result<Option<String>, StoreError> {
        let repo = repo_key(repo);
        self.read(move |c| async move {
            match query_opt(
                &c,
                "SELECT clone_url FROM repositories WHERE repo = $1",
                &[&repo],
            )
            .await?
            {
                Some(row) => Ok(Some(row.try_get(0)?)),
                None => Ok(None),
            }
        })
    }

    pub(super) fn run_by_id(&self, id: i64) -> Result<Option<Run>, StoreError> {
        self.read(move |c| async move {
            query_opt(
                &c,
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
                &[&id],
            )
            .await?
            .as_ref()
            .map(run_from_row)
            .transpose()
        })
    }

    pub(super) fn steps_of_attempt(
        &self,
        run_id: i64,
        attempt: Option<i64>,
    ) -> Result<Vec<Step>, StoreError> {
        self.read(move |c| async move { steps_in(&c, run_id, attempt).await })
    }

    pub(super) fn log_from(
        &self,
        run: i64,
        attempt: i64,
        step: i64,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        let from = i64::try_from(offset).unwrap_or(i64::MAX);
        self.read(move |c| async move {
            let rows = query(
                &c,
                "SELECT at, bytes FROM log_chunks
                 WHERE run_id = $1 AND attempt = $2 AND step = $3 AND at + length(bytes) > $4
                 ORDER BY at LIMIT 64",
                &[&run, &attempt, &step, &from],
            )
            .await?;
            let mut out = Vec::new();
            let mut next = offset;
            for row in &rows {
                let at = row.try_get::<_, i64>(0)? as u64;
                let bytes: Vec<u8> = row.try_get(1)?;
                // Pieces are written in order, so a gap is one not committed yet.
                if at > next || out.len() >= max {
                    break;
                }
                let skip = (next - at) as usize;
                let take = (bytes.len() - skip).min(max - out.len());
                out.extend_from_slice(&bytes[skip..skip + take]);
                next += take as u64;
            }
            Ok(out)
        })
    }

    pub(super) fn runs_matching(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let mut conditions = Vec::new();
        let mut values: Values = Vec::new();
        if let Some(pipeline) = &filter.pipeline {
            values.push(Box::new(pipeline.clone()));
            conditions.push(format!("pipeline = ${}", values.len()));
        }
        if let Some(status) = filter.status {
            values.push(Box::new(status.as_str().to_owned()));
            conditions.push(format!("status = ${}", values.len()));
        }
        if let Some(before) = filter.before {
            values.push(Box::new(before));
            conditions.push(format!("id < ${}", values.len()));
        }
        values.push(Box::new(i64::from(filter.limit)));
        let limit = values.len();
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql =
            format!("SELECT {RUN_COLUMNS} FROM runs {clause} ORDER BY id DESC LIMIT ${limit}");
        self.read(move |c| async move { runs_from(&query(&c, &sql, &refs(&values)).await?) })
    }

    pub(super) fn delivery_by_id(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| async move {
            let Some(head) = query_opt(
                &c,
                "SELECT id, event, repo, ref, after, received_at, seq FROM deliveries WHERE id = $1",
                &[&id],
            )
            .await?
            else {
                return Ok(None);
            };
            let seq: i64 = head.try_get(6)?;
            let rows = query(
                &c,
                "SELECT pipeline, outcome, reason, run_id FROM decisions
                 WHERE delivery = $1 ORDER BY pipeline COLLATE \"C\"",
                &[&seq],
            )
            .await?;
            let decisions = rows
                .iter()
                .map(|r| {
                    Ok(Decision {
                        pipeline: Some(r.try_get::<_, String>(0)?).filter(|p| !p.is_empty()),
                        outcome: r.try_get(1)?,
                        reason: r.try_get(2)?,
                        run_id: r.try_get(3)?,
                    })
                })
                .collect::<PgResult<_>>()?;
            Ok(Some(Delivery {
                id: head.try_get(0)?,
                event: head.try_get(1)?,
                repo: head.try_get(2)?,
                git_ref: head.try_get(3)?,
                after: head.try_get(4)?,
                received_at: head.try_get(5)?,
                decisions,
            }))
        })
    }

    pub(super) fn counts(&self) -> Result<Vec<(RunStatus, i64)>, StoreError> {
        self.read(move |c| async move {
            let rows = query(&c, "SELECT status, COUNT(*) FROM runs GROUP BY status", &[]).await?;
            let mut out = Vec::new();
            for row in rows {
                let status: String = row.try_get(0)?;
                if let Some(st) = RunStatus::parse(&status) {
                    out.push((st, row.try_get(1)?));
                }
            }
            Ok(out)
        })
    }

    pub(super) fn latest_of_each_ref(&self) -> Result<Vec<Run>, StoreError> {
        self.read(move |c| async move {
            runs_from(
                &query(
                    &c,
                    &format!(
                        "SELECT {RUN_COLUMNS} FROM runs WHERE id IN
                         (SELECT MAX(id) FROM runs GROUP BY pipeline, ref)
                         ORDER BY pipeline COLLATE \"C\", ref COLLATE \"C\""
                    ),
                    &[],
                )
                .await?,
            )
        })
    }

    pub(super) fn last_finished_of(
        &self,
        pipeline: &str,
        refs_given: &[String],
    ) -> Result<Option<Run>, StoreError> {
        let pipeline = pipeline.to_owned();
        let wanted = refs_given.to_vec();
        self.read(move |c| async move {
            let sql = format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE pipeline = $1
                 AND status NOT IN ('queued', 'running')
                 AND (cardinality($2::TEXT[]) = 0 OR ref = ANY($2))
                 ORDER BY id DESC LIMIT 1"
            );
            query_opt(&c, &sql, &[&pipeline, &wanted])
                .await?
                .as_ref()
                .map(run_from_row)
                .transpose()
        })
    }

    pub(super) fn due(&self, now: i64, limit: u32) -> Result<Vec<Report>, StoreError> {
        let limit = i64::from(limit);
        self.read(move |c| async move {
            let rows = query(
                &c,
                "SELECT id, run_id, kind, target, address, signing, body, outcome, attempts, created_at
                 FROM reports WHERE state = 'pending' AND next_at <= $1 ORDER BY next_at, id LIMIT $2",
                &[&now, &limit],
            )
            .await?;
            rows.iter()
                .map(|r| {
                    let kind: String = r.try_get(2)?;
                    Ok(Report {
                        id: r.try_get(0)?,
                        run: r.try_get(1)?,
                        kind: ReportKind::parse(&kind).unwrap_or(ReportKind::Webhook),
                        target: r.try_get(3)?,
                        address: r.try_get(4)?,
                        signing: r.try_get(5)?,
                        body: r.try_get(6)?,
                        outcome: r.try_get(7)?,
                        attempts: r.try_get(8)?,
                        created_at: r.try_get(9)?,
                    })
                })
                .collect()
        })
    }

    pub(super) fn next_due(&self) -> Result<Option<i64>, StoreError> {
        self.read(move |c| async move {
            let row = query_opt(
                &c,
                "SELECT MIN(next_at) FROM reports WHERE state = 'pending'",
                &[],
            )
            .await?;
            Ok(match row {
                Some(row) => row.try_get(0)?,
                None => None,
            })
        })
    }

    pub(super) fn pending_reports(&self) -> Result<i64, StoreError> {
        self.read(move |c| async move {
            let row = query_opt(
                &c,
                "SELECT COUNT(*) FROM reports WHERE state = 'pending'",
                &[],
            )
            .await?;
            Ok(match row {
                Some(row) => row.try_get(0)?,
                None => 0,
            })
        })
    }

    pub(super) fn reports_of_run(&self, run: i64) -> Result<Vec<ReportView>, StoreError> {
        self.read(move |c| async move {
            let rows = query(
                &c,
                "SELECT target, state, reason, attempts FROM reports WHERE run_id = $1 ORDER BY id",
                &[&run],
            )
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(ReportView {
                        target: r.try_get(0)?,
                        state: r.try_get(1)?,
                        reason: r.try_get(2)?,
                        attempts: r.try_get(3)?,
                    })
                })
                .collect()
        })
    }
}
