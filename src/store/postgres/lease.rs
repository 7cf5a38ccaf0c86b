//! Leases between instances: the owner of a running run renews its hold on it, an
//! instance recovers the runs of one whose hold lapsed (it died, or lost the
//! database), and a cancel sent to one instance reaches the owner of the run. Lease
//! times are the database's clock (`hookci_clock_ms()`), never an instance's own.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{NoTls, Statement};

use super::writes::{interrupt_in, requeue_in};
use super::{execute, notify_runs, query, PgError, PgResult, Postgres, CANCEL_CHANNEL};
use crate::store::{Recovered, StoreError};

/// What interrupted a run whose owner's lease lapsed, once and many times.
const BY_LOST_LEASE: (&str, &str) = (
    "the loss of its instance (its lease expired)",
    "losses of their instances (leases expired)",
);

/// The `application_name` of the renewals' connection.
pub const RENEWER_NAME: &str = "hookci lease renewal";

const RENEW: &str = "UPDATE runs SET lease_until = hookci_clock_ms() + $3::BIGINT
     WHERE status = 'running' AND owner = $1 AND id = ANY($2) RETURNING id";

/// The renewals' connection, apart from the pool: a renewal never waits behind intake
/// for a connection. One that the database does not answer in time is dropped, and the
/// next renewal connects again.
#[derive(Default)]
pub(super) struct Renewer {
    open: tokio::sync::Mutex<Option<Renewing>>,
}

struct Renewing {
    client: tokio_postgres::Client,
    renew: Statement,
    /// The session's `statement_timeout`, in milliseconds.
    timeout_ms: i64,
}

/// How long a renewal may take, connecting included: a sixth of the lease, so that a
/// database that hangs makes it fail in time for the lease task to try once more (a
/// sixth of the lease left for it) and, failing that, to stop this instance's runs
/// before their leases lapse. Never below 250 ms, which a connection needs on a busy
/// machine (tests go under the config's shortest lease).
fn renewal_limit(lease_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(lease_ms / 6).unwrap_or(0).max(250))
}

impl Postgres {
    /// One statement for those of `runs` this instance has running, on the renewals'
    /// own connection, given [`renewal_limit`] to answer.
    pub(super) fn renew(&self, runs: &[i64]) -> Result<Vec<i64>, StoreError> {
        let owner = self.instance.clone();
        let runs = runs.to_vec();
        let lease_ms = self.lease_ms();
        let limit = renewal_limit(lease_ms);
        let timeout_ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
        let config = self.target.config.clone();
        let renewer = Arc::clone(&self.renewer);
        self.block(async move {
            let mut open = renewer.open.lock().await;
            let attempt = async {
                let renewing = match open.take() {
                    Some(r) if r.timeout_ms == timeout_ms && !r.client.is_closed() => r,
                    _ => connect_renewer(&config, limit, timeout_ms).await?,
                };
                let rows = renewing
                    .client
                    .query(&renewing.renew, &[&owner, &runs, &lease_ms])
                    .await?;
                let mut ids = rows
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<Vec<i64>, _>>()?;
                ids.sort_unstable();
                Ok::<_, PgError>((renewing, ids))
            };
            let answered = tokio::time::timeout(limit, attempt).await;
            match answered {
                Ok(Ok((renewing, ids))) => {
                    *open = Some(renewing);
                    Ok(ids)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(PgError::Unanswered(limit)),
            }
        })
    }

    /// The rows another instance is recovering are skipped (`SKIP LOCKED`), as are
    /// those their owner is renewing or ending this moment: each lapsed run is
    /// recovered once, by whichever instance locks it first. A run without a lease was
    /// claimed by a hookci that set none: it is another instance's (this one's own
    /// claims always set one), and taken as lapsed. So is an interrupted run whose hold
    /// lapsed: its owner interrupted it as it started again (which holds it for a
    /// lease, see `interrupt_own`) and died before queuing it again. Left alone, it
    /// would stay interrupted, and a cancel of it answered as applied would never end
    /// it. A run a stop interrupted holds no lease (an end clears it): it waits for
    /// its own instance's next start. A lapsed run a cancel was asked of ends canceled
    /// (see `requeue_in`).
    pub(super) fn recover(&self, held: &[i64]) -> Result<Vec<Recovered>, StoreError> {
        let me = Arc::new(self.instance.clone());
        let held = Arc::new(held.to_vec());
        self.write(true, move |c, reporter| {
            let (me, held) = (Arc::clone(&me), Arc::clone(&held));
            async move {
                let rows = query(
                    &*c,
                    "SELECT id, status = 'running' FROM runs
                     WHERE (status = 'running'
                            AND ((owner IS DISTINCT FROM $1 AND COALESCE(lease_until, 0) < hookci_clock_ms())
                              OR (owner = $1 AND lease_until < hookci_clock_ms() AND NOT id = ANY($2))))
                        OR (status = 'interrupted' AND lease_until < hookci_clock_ms()
                            AND (owner IS DISTINCT FROM $1 OR NOT id = ANY($2)))
                     ORDER BY id FOR UPDATE SKIP LOCKED",
                    &[&*me, &*held],
                )
                .await?;
                let mut lapsed = Vec::new();
                let mut running = Vec::new();
                for row in &rows {
                    let id: i64 = row.try_get(0)?;
                    lapsed.push(id);
                    if row.try_get::<_, bool>(1)? {
                        running.push(id);
                    }
                }
                if lapsed.is_empty() {
                    return Ok(Vec::new());
                }
                interrupt_in(
                    &*c,
                    &running,
                    "its instance stopped renewing its lease (it died or lost the database)",
                )
                .await?;
                let out = requeue_in(&*c, &lapsed, reporter.as_deref(), BY_LOST_LEASE).await?;
                // Their groups are free now, on every instance.
                notify_runs(&*c).await?;
                Ok(out)
            }
        })
    }

    /// Recorded on the run, so that the owner finds it even if it missed the
    /// notification (it looks again at each renewal). Whoever owns it, this instance
    /// included: a run this instance lost is ended by the one that recovers it, which
    /// finds the cancel here.
    pub(super) fn ask_cancel(&self, run_id: i64, reason: String) -> Result<bool, StoreError> {
        let reason = Arc::new(reason);
        self.write(false, move |c, _| {
            let reason = Arc::clone(&reason);
            async move {
                let asked = execute(
                    &*c,
                    "UPDATE runs SET cancel_requested = COALESCE(cancel_requested, $2)
                     WHERE id = $1 AND status = 'running'",
                    &[&run_id, &*reason],
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

/// Connects the renewals' connection, within `limit`, its statements cut off by the
/// server after `timeout_ms` as well.
async fn connect_renewer(
    config: &tokio_postgres::Config,
    limit: Duration,
    timeout_ms: i64,
) -> PgResult<Renewing> {
    let mut config = config.clone();
    config.connect_timeout(limit);
    // Told apart from the pool's sessions in `pg_stat_activity`.
    config.application_name(RENEWER_NAME);
    let (client, connection) = config.connect(NoTls).await?;
    // Ends when the client is dropped.
    tokio::spawn(connection);
    client
        .batch_execute(&format!("SET statement_timeout = {timeout_ms}"))
        .await?;
    let renew = client.prepare(RENEW).await?;
    Ok(Renewing {
        client,
        renew,
        timeout_ms,
    })
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
