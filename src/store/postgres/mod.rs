//! The PostgreSQL store: the same records as SQLite's, in a database several hookci
//! instances share. Every SQL statement of this backend lives in this folder. The
//! backend owns a small runtime of its own, so that its calls (blocking, like
//! SQLite's) can wait on it from any thread, and intake's async call runs on it too.
//! One connection of its own LISTENs for the runs other instances queue, the
//! cancels they send to this one's runs, and the news of every run's log (so that a
//! live follower here reads what another instance's step wrote as soon as it is
//! committed); another renews this instance's leases, so that renewals never wait
//! for the pool.
//!
//! Locks between instances: migrations under a session advisory lock, a concurrency
//! group's claim under a transaction advisory lock on the group, reconcile under a
//! session advisory lock held for the pass (`LOCKS`).

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{broadcast, Notify};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{LogNotice, ReportPolicy, StoreError};

mod lease;
mod reads;
mod schema;
mod scratch;
mod target;
mod writes;
pub use lease::RENEWER_NAME;
pub use scratch::{Held, Relay, Scratch, ScratchRole, TEST_DATABASE_VAR};
pub use target::PgTarget;

/// The first key of every advisory lock hookci takes ("hkci"), so that they never
/// meet another application's locks on the same database.
const LOCKS: i32 = 0x686b_6369;
/// The second key of the migration lock.
const MIGRATING: i32 = 1;
/// The second key of the reconcile lock.
const RECONCILING: i32 = 2;
/// The channel on which a transaction that queues runs, or frees a concurrency
/// group, tells every instance to claim.
const CHANNEL: &str = "hookci_runs";
/// The channel on which an instance asks the owner of a running run to cancel it.
const CANCEL_CHANNEL: &str = "hookci_cancel";
/// The channel on which the transaction that keeps a piece of a step's log, starts or
/// ends a step, or ends a run, names the run (its id, in decimal) to every instance.
const LOG_CHANNEL: &str = "hookci_log";
/// How many log notices a slow follower router may fall behind before it is told some
/// were missed (it then has every follower read the store again).
const LOG_NOTICES: usize = 1024;

/// Connections in the pool: intake's concurrent deliveries, the scheduler, the API.
const POOL_SIZE: usize = 16;

/// How many times a transaction that lost a deadlock or serialization race is tried.
const TRIES: u32 = 5;

/// A failure inside the backend, before it gets the database's name for context.
#[derive(Debug)]
pub(super) enum PgError {
    Db(tokio_postgres::Error),
    Pool(String),
    /// The database did not answer within this limit.
    Unanswered(Duration),
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        PgError::Db(e)
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> PgError {
        match e {
            deadpool_postgres::PoolError::Backend(e) => PgError::Db(e),
            other => PgError::Pool(other.to_string()),
        }
    }
}

impl PgError {
    /// A race between instances that the same transaction, run again, wins.
    fn retryable(&self) -> bool {
        matches!(self, PgError::Db(e) if matches!(
            e.code(),
            Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
        ))
    }
}

pub(super) type PgResult<T> = Result<T, PgError>;

/// The PostgreSQL store.
pub struct Postgres {
    /// `Some` until dropped: a runtime dropped inside another one's task would panic,
    /// so it is shut down in the background instead.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    target: PgTarget,
    /// Recorded as the owner of the runs this instance claims.
    instance: String,
    policy: RwLock<Option<Arc<dyn ReportPolicy>>>,
    wakeups: Arc<Notify>,
    /// Woken when another instance asks this one to cancel a run.
    cancels: Arc<Notify>,
    /// Every run whose log or steps changed, from any instance.
    logs: broadcast::Sender<LogNotice>,
    /// How long a claim or a renewal holds a running run, in milliseconds.
    lease_ms: AtomicI64,
    /// The renewals' own connection (see `lease::Renewer`).
    renewer: Arc<lease::Renewer>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Postgres {
    /// Connects, brings the schema up to date (one instance at a time), and starts
    /// listening for runs other instances queue. Its claims hold a run for `lease`
    /// from the first one on.
    pub fn open(
        target: &PgTarget,
        instance: &str,
        lease: Duration,
    ) -> Result<Postgres, StoreError> {
        let shown = target.shown().to_owned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hookci-postgres")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                path: shown.clone().into(),
                source,
            })?;
        let handle = runtime.handle().clone();
        // A database that stops answering (its packets dropped) fails the pool's calls
        // within a lease, rather than when TCP gives up a quarter of an hour later.
        let limit = limit_of(lease);
        let mut pooled = target.config.clone();
        pooled.connect_timeout(limit);
        pooled.tcp_user_timeout(limit);
        let manager = Manager::from_config(
            pooled,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Waiting for a free connection, making one (its handshake included) and
        // checking one given back: none longer than a lease.
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(limit))
            .create_timeout(Some(limit))
            .recycle_timeout(Some(limit))
            .build()
            .map_err(|e| StoreError::Database {
                url: shown.clone(),
                message: e.to_string(),
            })?;
        let store = Postgres {
            runtime: Some(runtime),
            handle,
            pool,
            target: target.clone(),
            instance: instance.to_owned(),
            policy: RwLock::new(None),
            wakeups: Arc::new(Notify::new()),
            cancels: Arc::new(Notify::new()),
            logs: broadcast::Sender::new(LOG_NOTICES),
            lease_ms: AtomicI64::new(lease_ms(lease)),
            renewer: Arc::new(lease::Renewer::default()),
        };
        let config = target.config.clone();
        if let Err(too_new) = store.block(async move { schema::migrate(&config).await })? {
            return Err(StoreError::TooNewDatabase {
                url: shown,
                found: too_new.found,
                known: schema::SCHEMA.len(),
            });
        }
        // The first LISTEN is in place before `open` returns: a run queued from then
        // on wakes this instance.
        let (listening_tx, listening_rx) = std::sync::mpsc::sync_channel(1);
        store.handle.spawn(listen(
            target.config.clone(),
            shown.clone(),
            Arc::clone(&store.wakeups),
            Arc::clone(&store.cancels),
            store.logs.clone(),
            listening_tx,
        ));
        listening_rx
            .recv()
            .map_err(|_| store.gone())?
            .map_err(|e| store.err(e))?;
        tracing::info!(database = %shown, instance, "store: PostgreSQL");
        Ok(store)
    }

    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    fn lease_ms(&self) -> i64 {
        self.lease_ms.load(Ordering::Relaxed)
    }

    /// The longest one call waits for the database: a lease, so that no call holds a
    /// run (its permit, its workspace, the daemon's stop) longer than its lease would.
    fn limit(&self) -> Duration {
        limit_of(Duration::from_millis(
            u64::try_from(self.lease_ms()).unwrap_or(0),
        ))
    }

    fn err(&self, e: PgError) -> StoreError {
        match e {
            PgError::Db(source) => StoreError::Postgres {
                url: self.target.shown().to_owned(),
                source,
            },
            PgError::Pool(message) => StoreError::Database {
                url: self.target.shown().to_owned(),
                message,
            },
            PgError::Unanswered(limit) => StoreError::Database {
                url: self.target.shown().to_owned(),
                message: format!("no answer within {limit:?}"),
            },
        }
    }

    fn gone(&self) -> StoreError {
        StoreError::Database {
            url: self.target.shown().to_owned(),
            message: "the store's runtime has stopped".into(),
        }
    }

    /// Runs `fut` on the backend's runtime and waits for it: callable from any thread,
    /// a blocking one or a test's.
    fn block<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = PgResult<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| self.gone())?.map_err(|e| self.err(e))
    }

    /// The policy, unless there is none or it reports nothing.
    fn active_policy(&self) -> Option<Arc<dyn ReportPolicy>> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|p| !p.idle())
    }
}

/// The limit of upkeep that may legitimately take long: the first reconcile of a
/// repository with tens of thousands of refs, a retention pass deleting large logs.
/// A database that stops answering still fails it within a lease: the pool's
/// connections give up on unacknowledged data then (`tcp_user_timeout`).
const UPKEEP_LIMIT: Duration = Duration::from_secs(600);

/// [`Postgres::limit`] for `lease`: never under the shortest lease a config may set,
/// which shorter leases (the tests') do not make a call's limit.
fn limit_of(lease: Duration) -> Duration {
    lease.max(Duration::from_secs(1))
}

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Runs `work` in a transaction, again if it lost a race with another instance
/// (deadlock, serialization failure), and tells the policy once it has committed.
/// Each try has `limit`: the server cuts its statements off then (`statement_timeout`),
/// and hookci gives up on a server that does not answer at all, dropping the
/// connection, whose transaction is in an unknown state.
async fn transaction<T, W, Fut>(
    pool: &Pool,
    policy: Option<Arc<dyn ReportPolicy>>,
    limit: Duration,
    work: W,
) -> PgResult<T>
where
    W: Fn(Arc<deadpool_postgres::Object>, Option<Arc<dyn ReportPolicy>>) -> Fut,
    Fut: Future<Output = PgResult<T>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        let client = Arc::new(pool.get().await?);
        // A session whose client vanished without closing it (its host died, the
        // network parted) is ended by the server after the same limit, and with it the
        // transaction's locks, which recovery (`SKIP LOCKED`) would pass over for hours.
        let ms = limit.as_millis().max(1);
        let begin = format!(
            "BEGIN; SET LOCAL statement_timeout = {ms}; SET LOCAL idle_in_transaction_session_timeout = {ms}"
        );
        // Made here, awaited only after BEGIN.
        let worked = work(Arc::clone(&client), policy.clone());
        let attempt = async {
            client.batch_execute(&begin).await?;
            let v = worked.await?;
            client.batch_execute("COMMIT").await?;
            Ok::<T, PgError>(v)
        };
        let Ok(result) = tokio::time::timeout(limit, attempt).await else {
            if let Ok(object) = Arc::try_unwrap(client) {
                drop(deadpool_postgres::Object::take(object));
            }
            return Err(PgError::Unanswered(limit));
        };
        match result {
            Ok(v) => {
                if let Some(policy) = &policy {
                    policy.committed();
                }
                return Ok(v);
            }
            Err(e) => {
                // The connection goes back to the pool clean, or not at all.
                let rollback = tokio::time::timeout(limit, client.batch_execute("ROLLBACK"));
                if !matches!(rollback.await, Ok(Ok(()))) {
                    if let Ok(object) = Arc::try_unwrap(client) {
                        drop(deadpool_postgres::Object::take(object));
                    }
                }
                if !(e.retryable() && tries < TRIES) {
                    return Err(e);
                }
                tracing::debug!(
                    tries,
                    "transaction lost a race with another instance; again"
                );
            }
        }
    }
}

/// One statement, prepared once per connection.
pub(super) async fn query<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> PgResult<Vec<Row>> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query(&statement, params).await?)
}

pub(super) async fn query_opt<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> PgResult<Option<Row>> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&statement, params).await?)
}

pub(super) async fn execute<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> PgResult<u64> {
    let statement = c.prepare_cached(sql).await?;
    Ok(c.execute(&statement, params).await?)
}

/// Tells every instance's scheduler to claim, once the transaction commits.
pub(super) async fn notify_runs<C: GenericClient>(c: &C) -> PgResult<()> {
    execute(c, "SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
    Ok(())
}

/// Tells every instance that run `run_id`'s log or steps changed, once the
/// transaction commits: a listener never hears of a piece before it can read it.
pub(super) async fn notify_log<C: GenericClient>(c: &C, run_id: i64) -> PgResult<()> {
    execute(
        c,
        "SELECT pg_notify($1, $2)",
        &[&LOG_CHANNEL, &run_id.to_string()],
    )
    .await?;
    Ok(())
}

/// How long the listener waits before connecting again after losing its connection.
const RELISTEN: Duration = Duration::from_secs(1);

/// Keeps one connection LISTENing on [`CHANNEL`], [`CANCEL_CHANNEL`] and
/// [`LOG_CHANNEL`], and at each notification wakes the scheduler or the cancels'
/// watcher, or passes the run on to `logs`; reconnects when the connection is lost
/// (and then wakes both and sends [`LogNotice::Missed`], since notifications may have
/// been missed meanwhile). `first` hears how the first LISTEN went.
async fn listen(
    config: tokio_postgres::Config,
    shown: String,
    wakeups: Arc<Notify>,
    cancels: Arc<Notify>,
    logs: broadcast::Sender<LogNotice>,
    first: std::sync::mpsc::SyncSender<PgResult<()>>,
) {
    let mut first = Some(first);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let statement =
                    format!("LISTEN {CHANNEL}; LISTEN {CANCEL_CHANNEL}; LISTEN {LOG_CHANNEL}");
                // The connection must be polled for the LISTEN to complete.
                let started = {
                    let listening = client.batch_execute(&statement);
                    let mut listening = std::pin::pin!(listening);
                    loop {
                        tokio::select! {
                            r = &mut listening => break r.map_err(PgError::from),
                            m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                                Some(Ok(_)) => {}
                                Some(Err(e)) => break Err(PgError::from(e)),
                                None => break Err(PgError::Pool("the listening connection closed".into())),
                            },
                        }
                    }
                };
                let ok = started.is_ok();
                match first.take() {
                    Some(tx) => {
                        let _ = tx.send(started);
                    }
                    None if ok => {
                        wakeups.notify_one();
                        cancels.notify_one();
                        // Nobody may be following: nothing to tell then.
                        let _ = logs.send(LogNotice::Missed);
                    }
                    None => {}
                }
                if ok {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                match n.channel() {
                                    CANCEL_CHANNEL => cancels.notify_one(),
                                    LOG_CHANNEL => match n.payload().parse() {
                                        Ok(run) => {
                                            let _ = logs.send(LogNotice::Run(run));
                                        }
                                        Err(_) => tracing::warn!(
                                            database = %shown,
                                            payload = n.payload(),
                                            "a log notice that names no run; ignored"
                                        ),
                                    },
                                    _ => wakeups.notify_one(),
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(database = %shown, error = %e, "lost the connection listening for new runs; connecting again");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                drop(client);
            }
            Err(e) => match first.take() {
                Some(tx) => {
                    let _ = tx.send(Err(PgError::from(e)));
                    return;
                }
                None => {
                    tracing::warn!(database = %shown, error = %e, "cannot connect to listen for new runs; trying again");
                }
            },
        }
        // Ends with the store: dropping it shuts its runtime down, and this task with it.
        tokio::time::sleep(RELISTEN).await;
    }
}

/// Holds the reconcile lock: a connection taken out of the pool, whose closing (when
/// this is dropped) releases the lock, as does the death of the instance.
struct Reconciling(#[allow(dead_code)] deadpool_postgres::ClientWrapper);

impl super::Store for Postgres {
    fn describe(&self) -> String {
        self.target.shown().to_owned()
    }
    fn set_report_policy(&self, policy: Arc<dyn ReportPolicy>) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(policy);
    }
    fn wakeups(&self) -> Arc<Notify> {
        Arc::clone(&self.wakeups)
    }
    fn try_reconcile(&self) -> Result<Option<super::ReconcileGuard>, StoreError> {
        let pool = self.pool.clone();
        self.block(async move {
            let client = pool.get().await?;
            let locked: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&LOCKS, &RECONCILING],
                )
                .await?
                .try_get(0)?;
            Ok(locked.then(|| {
                Box::new(Reconciling(deadpool_postgres::Object::take(client)))
                    as super::ReconcileGuard
            }))
        })
    }
    fn ref_heads(
        &self,
        repo: &str,
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        self.ref_heads_of(repo)
    }
    fn reconcile_view(&self, repo: &str) -> Result<super::ReconcileView, StoreError> {
        self.reconcile_view_of(repo)
    }
    fn clone_url_of(&self, repo: &str) -> Result<Option<String>, StoreError> {
        self.clone_url(repo)
    }
    fn run(&self, id: i64) -> Result<Option<super::Run>, StoreError> {
        self.run_by_id(id)
    }
    fn steps(&self, run_id: i64) -> Result<Vec<super::Step>, StoreError> {
        self.steps_of_attempt(run_id, None)
    }
    fn steps_of(&self, run_id: i64, attempt: Option<i64>) -> Result<Vec<super::Step>, StoreError> {
        self.steps_of_attempt(run_id, attempt)
    }
    fn runs(&self, filter: &super::RunFilter) -> Result<Vec<super::Run>, StoreError> {
        self.runs_matching(filter)
    }
    fn delivery(&self, id: &str) -> Result<Option<super::Delivery>, StoreError> {
        self.delivery_by_id(id)
    }
    fn count_by_status(&self) -> Result<Vec<(super::RunStatus, i64)>, StoreError> {
        self.counts()
    }
    fn latest_per_ref(&self) -> Result<Vec<super::Run>, StoreError> {
        self.latest_of_each_ref()
    }
    fn last_finished(
        &self,
        pipeline: &str,
        refs: &[String],
    ) -> Result<Option<super::Run>, StoreError> {
        self.last_finished_of(pipeline, refs)
    }
    fn due_reports(&self, now: i64, limit: u32) -> Result<Vec<super::Report>, StoreError> {
        self.due(now, limit)
    }
    fn next_report_at(&self) -> Result<Option<i64>, StoreError> {
        self.next_due()
    }
    fn reports_pending(&self) -> Result<i64, StoreError> {
        self.pending_reports()
    }
    fn reports_of(&self, run: i64) -> Result<Vec<super::ReportView>, StoreError> {
        self.reports_of_run(run)
    }
    fn record_delivery(&self, d: super::NewDelivery) -> Result<super::DeliveryOutcome, StoreError> {
        self.record(d)
    }
    fn record_delivery_async(
        &self,
        d: super::NewDelivery,
    ) -> super::BoxFuture<'_, Result<super::DeliveryOutcome, StoreError>> {
        Box::pin(self.record_async(d))
    }
    fn create_run(&self, run: super::NewRun) -> Result<super::RunRef, StoreError> {
        self.create(run)
    }
    fn claim_next(&self) -> Result<Option<super::Run>, StoreError> {
        self.claim()
    }
    fn unclaim(&self, run_id: i64) -> Result<Option<super::Run>, StoreError> {
        self.give_back(run_id)
    }
    fn plan_steps(
        &self,
        run_id: i64,
        names: Vec<String>,
        on_interrupt: super::OnInterrupt,
    ) -> Result<(), StoreError> {
        self.plan(run_id, names, on_interrupt)
    }
    fn step_started(&self, run_id: i64, number: i64) -> Result<Option<super::Step>, StoreError> {
        self.start_step(run_id, number, None).map(|(step, _)| step)
    }
    fn first_step_started(
        &self,
        run_id: i64,
        number: i64,
        phases: super::Phases,
    ) -> Result<(Option<super::Step>, Option<super::Timings>), StoreError> {
        self.start_step(run_id, number, Some(phases))
    }
    fn step_finished(
        &self,
        run_id: i64,
        number: i64,
        end: super::StepEnd,
    ) -> Result<Option<super::Step>, StoreError> {
        self.end_step(run_id, number, end)
    }
    fn log_dropped(&self, run_id: i64, bytes: u64) -> Result<(), StoreError> {
        self.add_dropped(run_id, bytes)
    }
    fn shares_logs(&self) -> bool {
        true
    }
    fn append_log(&self, piece: super::LogPiece) -> Result<(), StoreError> {
        self.add_log(piece)
    }
    fn read_log(
        &self,
        run: i64,
        attempt: i64,
        step: i64,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.log_from(run, attempt, step, offset, max)
    }
    fn log_notices(&self) -> Option<broadcast::Receiver<LogNotice>> {
        Some(self.logs.subscribe())
    }
    fn finish_run(
        &self,
        run_id: i64,
        status: super::RunStatus,
        reason: Option<String>,
        leftover: super::StepStatus,
    ) -> Result<Option<(super::Run, Vec<super::Step>)>, StoreError> {
        self.finish(run_id, status, reason, leftover)
    }
    fn cancel_queued(
        &self,
        run_id: i64,
        reason: String,
    ) -> Result<super::QueuedCancel, StoreError> {
        self.cancel(run_id, reason)
    }
    fn interrupt_running(&self) -> Result<Vec<i64>, StoreError> {
        self.interrupt_own()
    }
    fn requeue_interrupted(&self) -> Result<Vec<super::Recovered>, StoreError> {
        self.requeue_own()
    }
    fn shared(&self) -> bool {
        true
    }
    fn set_lease(&self, lease: Duration) {
        self.lease_ms.store(lease_ms(lease), Ordering::Relaxed);
    }
    fn renew_leases(&self, runs: &[i64]) -> Result<Vec<i64>, StoreError> {
        self.renew(runs)
    }
    fn recover_expired(&self, held: &[i64]) -> Result<Vec<super::Recovered>, StoreError> {
        self.recover(held)
    }
    fn request_cancel(&self, run_id: i64, reason: String) -> Result<bool, StoreError> {
        self.ask_cancel(run_id, reason)
    }
    fn cancel_wakeups(&self) -> Arc<Notify> {
        Arc::clone(&self.cancels)
    }
    fn cancel_requests(&self) -> Result<Vec<(i64, String)>, StoreError> {
        self.asked_cancels()
    }
    fn record_reconcile(
        &self,
        repo: String,
        changes: Vec<super::RefChange>,
    ) -> Result<super::Reconciled, StoreError> {
        self.reconciled(repo, changes)
    }
    fn prune(&self, keep: u64, cutoff_ms: i64) -> Result<super::Pruned, StoreError> {
        self.prune_old(keep, cutoff_ms)
    }
    fn report_attempted(&self, id: i64, attempt: super::Attempt) -> Result<(), StoreError> {
        self.attempted(id, attempt)
    }
}
