//! Leases between instances: the owner of a running run renews its hold on it, an
//! instance recovers the runs of one whose hold lapsed (it died, or lost the
//! database), and a cancel sent to one instance reaches the owner of the run.

use std::sync::Arc;

use super::writes::{interrupt_in, requeue_in};
use super::{execute, query, PgResult, Postgres, CANCEL_CHANNEL};
use crate::clock::now_ms;
use crate::store::{RunStatus, StoreError};

/// What interrupted a run whose owner's lease lapsed, once and many times.
const BY_LOST_LEASE: (&str, &str) = (
    "the loss of its instance (its lease expired)",
    "losses of their instances (leases expired)",
);

impl Postgres {
    /// One statement for all of this instance's running runs.
    pub(super) fn renew(&self) -> Result<Vec<i64>, StoreError> {
        let owner = Arc::new(self.instance.clone());
        let lease_ms = self.lease_ms();
        self.write(false, move |c, _| {
            let owner = Arc::clone(&owner);
            async move {
                let rows = query(
                    &*c,
                    "UPDATE runs SET lease_until = $2::BIGINT + $3::BIGINT
                     WHERE status = 'running' AND owner = $1 RETURNING id",
                    &[&*owner, &now_ms(), &lease_ms],
                )
                .await?;
                let mut ids = rows
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<Vec<i64>, _>>()?;
                ids.sort_unstable();
                Ok(ids)
            }
        })
    }

    /// The rows another instance is recovering are skipped (`SKIP LOCKED`), as are
    /// those their owner is renewing or ending this moment: each lapsed run is
    /// recovered once, by whichever instance locks it first.
    pub(super) fn recover(&self) -> Result<Vec<(i64, i64, RunStatus)>, StoreError> {
        let me = Arc::new(self.instance.clone());
        self.write(true, move |c, reporter| {
            let me = Arc::clone(&me);
            async move {
                let rows = query(
                    &*c,
                    "SELECT id FROM runs WHERE status = 'running' AND lease_until < $2
                       AND owner IS DISTINCT FROM $1
                     ORDER BY id FOR UPDATE SKIP LOCKED",
                    &[&*me, &now_ms()],
                )
                .await?;
                let ids = rows
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<Vec<i64>, _>>()?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                interrupt_in(
                    &*c,
                    &ids,
                    "its instance stopped renewing its lease (it died or lost the database)",
                )
                .await?;
                requeue_in(&*c, &ids, reporter.as_deref(), BY_LOST_LEASE).await
            }
        })
    }

    /// Recorded on the run, so that the owner finds it even if it missed the
    /// notification (it looks again at each renewal).
    pub(super) fn ask_cancel(&self, run_id: i64, reason: String) -> Result<bool, StoreError> {
        let me = Arc::new(self.instance.clone());
        let reason = Arc::new(reason);
        self.write(false, move |c, _| {
            let (me, reason) = (Arc::clone(&me), Arc::clone(&reason));
            async move {
                let asked = execute(
                    &*c,
                    "UPDATE runs SET cancel_requested = COALESCE(cancel_requested, $3)
                     WHERE id = $1 AND status = 'running' AND owner IS DISTINCT FROM $2",
                    &[&run_id, &*me, &*reason],
                )
                .await?;
                if asked > 0 {
                    notify_cancel(&*c, run_id).await?;
                }
                Ok(asked > 0)
            }
        })
    }

    pub(super) fn asked_cancels(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let me = Arc::new(self.instance.clone());
        self.write(false, move |c, _| {
            let me = Arc::clone(&me);
            async move {
                query(
                    &*c,
                    "SELECT id, cancel_requested FROM runs
                     WHERE status = 'running' AND owner = $1 AND cancel_requested IS NOT NULL
                     ORDER BY id",
                    &[&*me],
                )
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
            }
        })
    }
}

/// Tells the owner of run `run_id` (every instance hears it) to look for its cancel.
async fn notify_cancel<C: deadpool_postgres::GenericClient>(c: &C, run_id: i64) -> PgResult<()> {
    execute(
        c,
        "SELECT pg_notify($1, $2)",
        &[&CANCEL_CHANNEL, &run_id.to_string()],
    )
    .await?;
    Ok(())
}
