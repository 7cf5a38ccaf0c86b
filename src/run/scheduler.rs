//! Takes queued runs from the store in arrival order and executes them, at most
//! `max_parallel_runs` at once: checkout, then each step through the runner, recording
//! every transition. A queued run lives only in the store: it holds no task, thread or
//! process until a permit is free.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{resolve_secret, Config, Secret};
use crate::git::repo::RepoName;
use crate::git::worker::{Fetch, GitError};
use crate::pipeline::{Interrupted, Pipeline};
use crate::run::contain::Containment;
use crate::run::events::RunEvent;
use crate::run::heartbeat::Heartbeat;
use crate::run::mask::Masker;
use crate::run::runner::{self, LogBudget, StepCommand, StepEnd};
use crate::run::uids::BuildUid;
use crate::run::user::{self, RunAs};
use crate::run::workspace::Lease;
use crate::state::AppState;
use crate::store::{
    OnInterrupt, Phases, QueuedCancel, Run, RunStatus, StepEnd as StepRecord, StepStatus, Store,
    StoreError,
};

/// The stop switches of one executing run.
pub struct RunControl {
    /// Stops the run's steps: a cancel, or the daemon stopping.
    stop: watch::Sender<bool>,
    /// Stops the cleanup steps a cancel or a timeout leaves to run, too: only the daemon
    /// stopping does that.
    halt: watch::Sender<bool>,
    /// Why it was canceled, when a user or a newer run did (else a stop is a shutdown).
    /// Set and read at the end under the registry's lock, so a cancel is either applied
    /// or refused, never both.
    canceled: std::sync::Mutex<Option<String>>,
    /// Set when another instance took the run over (this one's lease on it lapsed), or
    /// may soon (this one cannot renew it): its steps are stopped and its end is not
    /// recorded here.
    lost: AtomicBool,
}

/// Executing runs by id, so that cancel can reach their steps. A run's slot lives from
/// its registration until its end is stored, and nothing else ever adds one: a cancel
/// leaves nothing behind.
#[derive(Default)]
pub struct Running {
    slots: std::sync::Mutex<HashMap<i64, Slot>>,
    /// Woken at every registration: a cancel may wait for a claimed run to register.
    registered: Notify,
}

enum Slot {
    Executing(Arc<RunControl>),
    /// Its end is decided (this status) and being stored: too late to cancel, but a
    /// stop still reaches it (its store writes give up then).
    Ending(RunStatus, Arc<RunControl>),
}

/// What the registry did with a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// The run executes here: its steps are being stopped, and it ends `canceled`
    /// unless it had already failed or timed out.
    Stopping,
    /// Too late: its end is decided, with this status.
    Ended(RunStatus),
    /// Not executing here: queued, claimed but not registered yet, ended and stored, or
    /// lost (its steps are stopping, and its end is left to whoever recovers it: a
    /// cancel must go through the store to reach that one).
    NotHere,
}

impl Running {
    fn register(&self, id: i64, stop: watch::Sender<bool>) -> Arc<RunControl> {
        let control = Arc::new(RunControl {
            stop,
            halt: watch::Sender::new(false),
            canceled: std::sync::Mutex::new(None),
            lost: AtomicBool::new(false),
        });
        self.lock()
            .insert(id, Slot::Executing(Arc::clone(&control)));
        self.registered.notify_waiters();
        control
    }

    /// Decides the run's end: a cancel that came after its steps were done still makes
    /// it `canceled`, since it was answered as applied; a cancel from now on is refused
    /// with the status returned.
    fn close(&self, id: i64, ending: Ending) -> Ending {
        let mut slots = self.lock();
        let Some(Slot::Executing(control)) = slots.remove(&id) else {
            return ending;
        };
        let canceled = lock(&control.canceled).clone();
        let ending = match (canceled, ending.status) {
            (Some(reason), RunStatus::Succeeded | RunStatus::Skipped) => Ending {
                status: RunStatus::Canceled,
                reason: Some(reason),
            },
            _ => ending,
        };
        slots.insert(id, Slot::Ending(ending.status, control));
        ending
    }

    /// Takes a run that has not started out again, unless a cancel was applied to it
    /// (then it must end canceled): `true` when it was taken out.
    fn withdraw(&self, id: i64) -> bool {
        let mut slots = self.lock();
        let uncanceled = matches!(
            slots.get(&id),
            Some(Slot::Executing(control)) if lock(&control.canceled).is_none()
        );
        if uncanceled {
            slots.remove(&id);
        }
        uncanceled
    }

    /// Once the run's end is stored (or the daemon gave up storing it).
    fn remove(&self, id: i64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Slot>> {
        lock(&self.slots)
    }

    /// Stops an executing run's steps (SIGTERM, grace, SIGKILL); it ends `canceled` with
    /// `reason` (the first one given) unless it had already failed or timed out. Never
    /// adds a slot: see [`cancel`] for a run that is not executing here.
    pub fn cancel(&self, id: i64, reason: &str) -> Cancel {
        match self.lock().get(&id) {
            // Stopping it here would record nothing: the instance that recovers it
            // would build it again.
            Some(Slot::Executing(control)) if control.lost.load(Ordering::Relaxed) => {
                Cancel::NotHere
            }
            Some(Slot::Executing(control)) => {
                lock(&control.canceled).get_or_insert_with(|| reason.to_owned());
                control.stop.send_replace(true);
                Cancel::Stopping
            }
            Some(Slot::Ending(status, _)) => Cancel::Ended(*status),
            None => Cancel::NotHere,
        }
    }

    /// The runs executing here whose end is not decided yet.
    pub fn executing(&self) -> Vec<i64> {
        self.lock()
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Executing(_)))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The runs whose leases this instance holds: every one registered here, its end
    /// decided or not, but those it lost (see [`Running::lose`]).
    pub fn held(&self) -> Vec<i64> {
        let mut held: Vec<i64> = self
            .lock()
            .iter()
            .filter(|(_, slot)| {
                let (Slot::Executing(control) | Slot::Ending(_, control)) = slot;
                !control.lost.load(Ordering::Relaxed)
            })
            .map(|(id, _)| *id)
            .collect();
        held.sort_unstable();
        held
    }

    /// Stops run `id`, cleanup steps included, for good: another instance took it over,
    /// or may soon (this one cannot renew its lease).
    /// `false` when its end was already decided here (or it is not executing here).
    pub fn lose(&self, id: i64) -> bool {
        match self.lock().get(&id) {
            Some(Slot::Executing(control)) => {
                control.lost.store(true, Ordering::Relaxed);
                control.halt.send_replace(true);
                control.stop.send_replace(true);
                true
            }
            _ => false,
        }
    }

    /// Stops every executing run, cleanup steps included (the daemon is stopping, or
    /// `hookci run` was interrupted twice).
    pub fn stop_all(&self) {
        for slot in self.lock().values() {
            let (Slot::Executing(control) | Slot::Ending(_, control)) = slot;
            // Halt first: a run that sees its stop without a cancel reason takes it for
            // a shutdown, and must then find its cleanup steps stopped too.
            control.halt.send_replace(true);
            control.stop.send_replace(true);
        }
    }
}

/// A lock whose holder panicked still guards consistent data here (plain values).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a cancel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canceled {
    /// Applied: a queued run ended `canceled`, or a running one is being stopped.
    Applied,
    /// Too late: the run ended (or its end is decided) with this status.
    TooLate(RunStatus),
    NoSuchRun,
}

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("cannot cancel run {run}: {message}")]
    Store { run: i64, message: String },
    #[error(
        "cannot cancel run {run}: the store has it running, but it is not executing in this daemon"
    )]
    NotExecuting { run: i64 },
}

/// How long a cancel waits for a run that the store has running to be registered: it
/// was claimed a moment ago, and registering follows at once.
const REGISTER_WAIT: Duration = Duration::from_secs(10);

/// Cancels run `id`, exactly: it is either applied (and the run ends `canceled` unless
/// it had already failed or timed out) or refused with the status the run ends with.
pub async fn cancel(state: &AppState, id: i64, reason: String) -> Result<Canceled, CancelError> {
    let deadline = Instant::now() + REGISTER_WAIT;
    loop {
        // Armed before looking, so a registration right after the look still wakes it.
        let registered = state.running.registered.notified();
        let mut registered = std::pin::pin!(registered);
        registered.as_mut().enable();
        match state.running.cancel(id, &reason) {
            Cancel::Stopping => return Ok(Canceled::Applied),
            Cancel::Ended(status) => return Ok(Canceled::TooLate(status)),
            Cancel::NotHere => {}
        }
        // A slot goes only once the run's end is stored, so the store, asked after the
        // registry, knows the rest: `running` there means claimed, about to register.
        let r = reason.clone();
        let found = blocking(&state.store, move |s| s.cancel_queued(id, r))
            .await
            .map_err(|message| CancelError::Store { run: id, message })?;
        match found {
            QueuedCancel::NoSuchRun => return Ok(Canceled::NoSuchRun),
            QueuedCancel::Canceled(run) => {
                state.events.runs_changed([*run]);
                return Ok(Canceled::Applied);
            }
            // Its owner is restarting: the requeue ends it canceled.
            QueuedCancel::Asked => return Ok(Canceled::Applied),
            QueuedCancel::NotQueued(RunStatus::Running) => {}
            QueuedCancel::NotQueued(done) => return Ok(Canceled::TooLate(done)),
        }
        // Running on another instance sharing the store: its owner stops it, told
        // through the store. Running here and lost: whoever recovers it ends it
        // canceled, told through the store too. Running here otherwise: claimed, about
        // to register (the cancel recorded reaches it at the next look for cancels
        // passed on, and its end honours it).
        let r = reason.clone();
        let elsewhere = blocking(&state.store, move |s| s.request_cancel(id, r))
            .await
            .map_err(|message| CancelError::Store { run: id, message })?;
        if elsewhere {
            return Ok(Canceled::Applied);
        }
        // Woken by a registration here, or after a while to look again: an owner on
        // another instance may have handed the run back (queued again) meanwhile, which
        // no registration here would tell.
        let now = Instant::now();
        if now >= deadline {
            return Err(CancelError::NotExecuting { run: id });
        }
        let _ = tokio::time::timeout_at(deadline.min(now + LOOK_AGAIN), registered).await;
    }
}

/// How often a cancel of a run that is neither registered here nor held by another
/// instance looks at the store again while it waits (see [`cancel`]).
const LOOK_AGAIN: Duration = Duration::from_millis(250);

/// Cancels the running run `old` that the new run `by` supersedes (`cancel: running`).
pub async fn supersede(state: &AppState, old: i64, by: i64) {
    match cancel(state, old, format!("superseded by run {by}")).await {
        Ok(outcome) => tracing::debug!(run = old, ?outcome, "superseded"),
        Err(e) => tracing::warn!(run = old, error = %e, "cannot stop a superseded run"),
    }
}

/// Pause before claiming again after the store failed, so a broken disk does not spin.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// How long the scheduler sleeps without a wake-up before it looks at the store again:
/// a run queued by any path that did not wake it (another writer of the store, a lost
/// notification) still starts.
const RESCAN: Duration = Duration::from_secs(5);

/// How often the free space is measured again while runs wait for it.
const DISK_RECHECK: Duration = Duration::from_secs(1);

/// Whether the state directory's disk has room for a run (`min_free_bytes`); says in the
/// log when that changes, and keeps the reason for `/healthz` and the API.
async fn room_to_run(state: &Arc<AppState>) -> bool {
    let (dir, min) = (
        state.config().state_dir.clone(),
        state.config().min_free_bytes,
    );
    let short = tokio::task::spawn_blocking(move || crate::run::disk::shortage(&dir, min))
        .await
        .unwrap_or_else(|e| Some(e.to_string()));
    let ok = short.is_none();
    match (state.set_paused(short.clone()), short) {
        (None, Some(why)) => tracing::error!(reason = %why, "runs paused"),
        (Some(_), None) => tracing::info!("enough free space again: runs start"),
        _ => {}
    }
    ok
}

/// How many runs may execute at once: `max_parallel_runs`, and no more than there are
/// uids in `run_as_uids` (a reload may raise the one, never the other, which is
/// restart-only).
fn parallel_runs(state: &AppState) -> usize {
    let wanted = state.config().max_parallel_runs;
    state
        .build_uids
        .as_ref()
        .map_or(wanted, |uids| wanted.min(uids.count()))
}

/// The run permits, resized when a reload changes `max_parallel_runs`. Shrinking
/// never stops a running run: permits in use are forgotten as their runs return them.
struct Permits {
    semaphore: Arc<Semaphore>,
    size: usize,
    /// Permits still to forget, once runs return them.
    owed: usize,
}

impl Permits {
    fn new(size: usize) -> Permits {
        Permits {
            semaphore: Arc::new(Semaphore::new(size)),
            size,
            owed: 0,
        }
    }

    fn resize(&mut self, size: usize) {
        if size > self.size {
            let more = size - self.size;
            let repaid = more.min(self.owed);
            self.owed -= repaid;
            self.semaphore.add_permits(more - repaid);
        } else {
            self.owed += self.size - size;
        }
        self.size = size;
        self.owed -= self.semaphore.forget_permits(self.owed);
    }

    /// A free permit, once one is free and none is owed.
    async fn acquire(&mut self) -> Option<OwnedSemaphorePermit> {
        loop {
            let permit = Arc::clone(&self.semaphore).acquire_owned().await.ok()?;
            if self.owed == 0 {
                return Some(permit);
            }
            permit.forget();
            self.owed -= 1;
        }
    }
}

/// Runs until `stop` turns true; then waits up to `shutdown_grace` for running runs and
/// kills what is left (those runs end `interrupted`; queued runs stay queued). Its own
/// loop keeps the service manager's watchdog fed and its status line current, so a
/// scheduler that hangs gets the service restarted.
pub async fn run(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let mut permits = Permits::new(parallel_runs(&state));
    let mut model = state.model_changes();
    let mut heartbeat = Heartbeat::new();
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        if *stop.borrow() {
            break;
        }
        permits.resize(parallel_runs(&state));
        let permit = tokio::select! {
            p = permits.acquire() => match p { Some(p) => p, None => break },
            _ = stop.changed() => break,
            _ = model.changed() => continue,
            () = heartbeat.tick() => {
                heartbeat.beat(&state).await;
                continue;
            }
            () = state.changed.notified(), if heartbeat.is_notifying() => {
                heartbeat.status(&state).await;
                continue;
            }
        };
        if state.fenced.load(Ordering::Relaxed) {
            // Its lease could not be kept: the run would be stopped again at once, and
            // lose an attempt.
            drop(permit);
            tokio::select! {
                () = tokio::time::sleep(STORE_RETRY) => {}
                _ = stop.changed() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
            continue;
        }
        if !room_to_run(&state).await {
            drop(permit);
            tokio::select! {
                () = tokio::time::sleep(DISK_RECHECK) => {}
                _ = stop.changed() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
            continue;
        }
        let store = Arc::clone(&state.store);
        match tokio::task::spawn_blocking(move || store.claim_next()).await {
            Ok(Ok(Some(run))) if *stop.borrow() => {
                give_back(&state, run.id).await;
                break;
            }
            Ok(Ok(Some(run))) => {
                let span = tracing::info_span!("run", run = run.id, pipeline = %run.pipeline);
                let (stop_tx, stop_rx) = watch::channel(false);
                let control = state.running.register(run.id, stop_tx);
                state.events.publish(RunEvent::Started(run.clone()));
                // Taken now, from one reload: a reload from here on changes neither
                // what this run runs nor the settings it runs with.
                let model = state.model();
                let pipeline = model.pipelines.get(&run.pipeline).cloned();
                let job = execute(
                    Arc::clone(&state),
                    run,
                    (model.config, pipeline),
                    (control, stop_rx),
                    permit,
                );
                tasks.spawn(job.instrument(span));
                heartbeat.status(&state).await;
            }
            Ok(Ok(None)) => {
                drop(permit);
                heartbeat.status(&state).await;
                // Beats and status updates do not end the wait: only what may have
                // made a run claimable does.
                let rescan = tokio::time::sleep(RESCAN);
                let mut rescan = std::pin::pin!(rescan);
                loop {
                    tokio::select! {
                        () = state.wake.notified() => break,
                        () = &mut rescan => break,
                        _ = stop.changed() => break,
                        Some(_) = tasks.join_next(), if !tasks.is_empty() => break,
                        () = heartbeat.tick() => heartbeat.beat(&state).await,
                        () = state.changed.notified(), if heartbeat.is_notifying() => {
                            heartbeat.status(&state).await;
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot claim the next run");
                tokio::time::sleep(STORE_RETRY).await;
            }
            Err(e) => tracing::error!(error = %e, "claim task failed"),
        }
    }
    if tasks.is_empty() {
        return;
    }
    let grace = state.config().shutdown_grace;
    tracing::info!(
        running = tasks.len(),
        ?grace,
        "waiting for running runs to finish"
    );
    let all_done = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        tracing::warn!("shutdown grace is over: killing the steps still running");
        state.running.stop_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Puts a run claimed just as the stop began back in the queue, unstarted: started now
/// it would be killed at the end of the grace and lose an attempt. A cancel asked for
/// it meanwhile still applies: finding it neither registered nor queued, [`cancel`]
/// waits for a registration, and is woken here to find it queued again; one passed on
/// through another instance ends it canceled here.
async fn give_back(state: &Arc<AppState>, id: i64) {
    match blocking(&state.store, move |s| s.unclaim(id)).await {
        Ok(Some(run)) => {
            tracing::info!(run = id, pipeline = %run.pipeline, "run canceled as asked before it started");
            state.events.runs_changed([run]);
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(run = id, error = %e, "cannot queue a run claimed as the stop began again; the next start will find it interrupted");
        }
    }
    state.running.registered.notify_waiters();
}

/// Claims run `id` (queued, the only one in its store) and executes it now, in the
/// caller's task: `hookci run`.
pub async fn execute_now(state: Arc<AppState>, id: i64) -> Result<(), String> {
    let store = Arc::clone(&state.store);
    let run = tokio::task::spawn_blocking(move || store.claim_next())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .filter(|r| r.id == id)
        .ok_or_else(|| format!("run {id} could not be started"))?;
    let permit = Arc::new(Semaphore::new(1))
        .acquire_owned()
        .await
        .map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let control = state.running.register(id, stop_tx);
    state.events.publish(RunEvent::Started(run.clone()));
    let model = state.model();
    let pipeline = model.pipelines.get(&run.pipeline).cloned();
    execute(
        state,
        run,
        (model.config, pipeline),
        (control, stop_rx),
        permit,
    )
    .await;
    Ok(())
}

/// Runs a store call on a blocking thread (the store's calls block).
pub(crate) async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || f(&*store)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// How a run ended.
struct Ending {
    status: RunStatus,
    reason: Option<String>,
}

/// Runs `run` with the config and pipeline taken when it was claimed, to its end.
/// Paths in the state directory come from `state`: a reload never changes that
/// directory (a restart-only setting).
async fn execute(
    state: Arc<AppState>,
    run: Run,
    (config, pipeline): (Arc<Config>, Option<Arc<Pipeline>>),
    (control, stop): (Arc<RunControl>, watch::Receiver<bool>),
    _permit: OwnedSemaphorePermit,
) {
    tracing::info!(git_ref = %run.git_ref, commit = %run.commit, "run started");
    let lease = workspace_of(&state, &run, pipeline.as_deref());
    let workspace = lease.path.clone();
    let contain = state.cgroups.for_run(run.id);
    // Held until every process of the run is gone, as the workspace is.
    let uid = match take_uid(&state, &lease, &stop).await {
        // Not started: back in the queue, as a run claimed as the stop began is, rather
        // than started now to be killed at the end of the grace; unless a cancel came
        // first, which then ends it.
        Err(UidWait::DaemonStopping) if state.running.withdraw(run.id) => {
            contain.remove();
            give_back(&state, run.id).await;
            return;
        }
        taken => taken,
    };
    // Whether the steps were handed the workspace (and it was given to the run's uid).
    let mut handed = false;
    let who = match &uid {
        Ok(Some(held)) => Some(held.user().clone()),
        _ => config.run_as.clone(),
    };
    let ending = match (pipeline, &uid) {
        (_, Err(_)) => stopped(&control, "waiting for a uid of run_as_uids"),
        (None, _) => Ending {
            status: RunStatus::Failed,
            reason: Some(format!("pipeline {:?} no longer exists", run.pipeline)),
        },
        (Some(pipeline), Ok(_)) => match secrets_of(&config, &pipeline) {
            Err(reason) => Ending {
                status: RunStatus::Failed,
                reason: Some(reason),
            },
            Ok(secrets) => match prepare(&state, &run, &pipeline, &lease, &stop).await {
                Ok(Prepared::Skip(skip)) => Ending {
                    status: RunStatus::Skipped,
                    reason: Some(skip),
                },
                Ok(Prepared::Ready(phases)) => {
                    match hand_over(&state, who.as_ref(), run.id, &lease).await {
                        Err(reason) => Ending {
                            status: RunStatus::Failed,
                            reason: Some(reason),
                        },
                        Ok(()) => {
                            handed = true;
                            let ctx = StepsContext {
                                workspace: &workspace,
                                run_as: who.as_ref(),
                                phases,
                                secrets: &secrets,
                                control: &control,
                                contain: &contain,
                            };
                            run_steps(&state, &config, &run, &pipeline, ctx, stop).await
                        }
                    }
                }
                Err(GitError::Stopped) => stopped(&control, "the checkout"),
                Err(GitError::Failed(reason)) => Ending {
                    status: RunStatus::Failed,
                    reason: Some(reason),
                },
            },
        },
    };
    // Every step swept after itself; this catches a step cut short by an error.
    contain.sweep().await;
    contain.remove();
    if control.lost.load(Ordering::Relaxed) {
        state.running.remove(run.id);
        tracing::warn!(
            "run stopped: this instance lost its lease on it (another instance took it over, or this one could not renew it); its end is left to whoever recovers it"
        );
    } else {
        record_end(&state, &run, &control, ending).await;
    }
    // A reused workspace stays for the next run of its slot; the run's `HOME` goes.
    let ws = lease.is_fresh().then(|| workspace.clone());
    let home = state.home(run.id);
    let removed = tokio::task::spawn_blocking(move || {
        ws.as_deref()
            .map_or(Ok(()), remove_dir)
            .and(remove_dir(&home))
    })
    .await;
    if let Ok(Err(e)) = removed {
        tracing::warn!(workspace = %workspace.display(), error = %e, "cannot remove workspace");
    }
    // Held until every process of the run is gone: another run may take the uid (once
    // nothing of it is left, which its drop makes sure of), and the next run of the
    // slot may start, and find the uid its workspace belongs to free.
    if let Ok(Some(held)) = uid {
        // Whatever of it was given away: a hand-over that failed may have given its top
        // folder already (and then marked it to be replaced).
        let reused = (!lease.is_fresh()).then(|| workspace.clone());
        let given = tokio::task::spawn_blocking(move || {
            let taken = reused.map(|ws| {
                take_back(&ws, handed.then_some(held.user().uid)).map_err(|e| {
                    // Still the uid's, which another run may take now: not kept.
                    let removed = crate::fsx::remove_all(&ws).or_else(|e| {
                        std::fs::File::create(crate::git::checkout::updating_marker(&ws))
                            .map(drop)
                            .and(Err(e))
                    });
                    (ws, e, removed)
                })
            });
            drop(held);
            taken
        })
        .await;
        match given {
            Err(e) => tracing::error!(error = %e, "cannot give the run's uid back"),
            Ok(Some(Err((ws, e, removed)))) => tracing::warn!(
                workspace = %ws.display(),
                error = %e,
                removed = removed.is_ok(),
                "cannot take the reused workspace back from the run's uid: it is removed, and its slot's next run starts from a fresh checkout"
            ),
            Ok(_) => {}
        }
    }
    drop(lease);
    // Not while the daemon stops: the stop waits for this task, and the next start
    // prunes anyway.
    if !*state.stopping().borrow() {
        prune(&state).await;
    }
}

/// Decides the end of run `run` (a cancel that came late still applies) and stores it.
async fn record_end(state: &Arc<AppState>, run: &Run, control: &RunControl, ending: Ending) {
    let ending = state.running.close(run.id, ending);
    tracing::info!(
        status = ending.status.as_str(),
        reason = ending.reason.as_deref().unwrap_or(""),
        "run finished"
    );
    let leftover = match ending.status {
        RunStatus::Interrupted => StepStatus::Interrupted,
        _ => StepStatus::Skipped,
    };
    let (id, status, reason) = (run.id, ending.status, ending.reason);
    // Stored before the workspace goes: a crash while it is removed must not run this
    // run again (the next start removes what is left of it).
    let ended = until_stored(state, control, "the end of the run", move |s| {
        s.finish_run(id, status, reason.clone(), leftover)
    })
    .await;
    if let Ok(Some((run, steps))) = ended {
        state.events.publish(RunEvent::Finished { run, steps });
    }
    state.running.remove(run.id);
}

/// The first pause before a failed write of a run's progress is tried again; each
/// failure doubles it, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Runs a store write until it succeeds. The run keeps its permit meanwhile, so a store
/// that refuses writes holds new runs back rather than leave an ended one `running`
/// and its concurrency group blocked. It gives up only when the daemon stops its runs
/// (`halt`): not stored, the run is still `running` in the store, and the next start
/// recovers it as interrupted.
async fn until_stored<T: Send + 'static>(
    state: &Arc<AppState>,
    control: &RunControl,
    what: &'static str,
    write: impl Fn(&dyn Store) -> Result<T, StoreError> + Send + Sync + 'static,
) -> Result<T, String> {
    let write = Arc::new(write);
    let mut halt = control.halt.subscribe();
    let mut pause = RETRY_FIRST;
    let mut failures = 0u32;
    loop {
        let attempt = Arc::clone(&write);
        let error = match blocking(&state.store, move |s| attempt(s)).await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(what, failures, "stored after failed attempts");
                }
                return Ok(v);
            }
            Err(e) => e,
        };
        failures += 1;
        if *halt.borrow() {
            tracing::error!(
                what,
                failures,
                error = %error,
                "cannot record; giving up as the daemon stops: the next start recovers the run as interrupted"
            );
            return Err(error);
        }
        tracing::warn!(what, failures, error = %error, retry_in = ?pause, "cannot record; retrying");
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = halt.changed() => {}
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// Retention (`retention: {runs, days}`): old runs go with their logs and workspaces,
/// old deliveries with their decisions; batch after batch until none is left.
/// Mirrors are kept.
pub async fn prune(state: &Arc<AppState>) {
    let retention = state.config().retention;
    let (mut runs, mut deliveries) = (0, 0);
    loop {
        let cutoff = crate::clock::now_ms() - (retention.days as i64).saturating_mul(86_400_000);
        let pruned = match blocking(&state.store, move |s| s.prune(retention.runs, cutoff)).await {
            Ok(pruned) => pruned,
            Err(e) => {
                tracing::warn!(error = %e, "pruning old runs failed");
                break;
            }
        };
        runs += pruned.runs.len();
        deliveries += pruned.deliveries;
        let dirs: Vec<_> = pruned
            .runs
            .iter()
            .flat_map(|id| [state.log_dir(*id), state.workspace(*id)])
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for dir in dirs {
                if let Err(e) = remove_dir(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a pruned run's files");
                }
            }
        })
        .await;
        if !pruned.more {
            break;
        }
    }
    if runs > 0 || deliveries > 0 {
        tracing::info!(runs, deliveries, "pruned old runs and deliveries");
    }
}

/// Retention every `retention.interval` as well, until `stop` turns true: runs that
/// never execute (skipped, canceled while queued), deliveries that start none, and
/// age itself would otherwise wait for the next run to end. A reload that changes
/// the interval times the next pass by the new one.
pub async fn prune_every(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let mut model = state.model_changes();
    let mut last_pass = Instant::now();
    loop {
        let interval = state.config().retention.interval;
        let wait = async {
            if interval.is_zero() {
                std::future::pending().await
            } else {
                tokio::time::sleep_until(last_pass + interval).await
            }
        };
        tokio::select! {
            () = wait => {
                last_pass = Instant::now();
                prune(&state).await;
            }
            _ = model.changed() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Removes a run's directory, through whatever read-only directories its steps left
/// (see `fsx`).
fn remove_dir(path: &Path) -> std::io::Result<()> {
    crate::fsx::remove_all(path)
}

/// Readies the checkout for the run's steps: gives it to `run_as` (see [`give_away`]),
/// then marks a reused workspace as handed over, so that its next update knows what
/// changed after this moment was changed by a step (`git::checkout::handed_stamp`).
async fn hand_over(
    state: &Arc<AppState>,
    who: Option<&RunAs>,
    run: i64,
    workspace: &Lease,
) -> Result<(), String> {
    let handed = match give_away(state, who, run, workspace).await {
        Ok(()) if !workspace.is_fresh() => mark_and_open(workspace).await,
        done => done,
    };
    if handed.is_err() && !workspace.is_fresh() {
        // Given in part, or not marked as handed: the next run of the slot starts from
        // a fresh checkout instead of failing on the same tree again, or building on
        // one whose changes it cannot tell.
        let marker = crate::git::checkout::updating_marker(&workspace.path);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || std::fs::File::create(marker)).await
        {
            tracing::warn!(run, error = %e, "cannot mark a reused workspace to be replaced");
        }
    }
    handed
}

/// The second half of [`hand_over`] for a reused workspace: marked as handed, and its
/// slot's folder opened to the steps.
async fn mark_and_open(workspace: &Lease) -> Result<(), String> {
    let path = workspace.path.clone();
    let open_slot = workspace.slot_opener();
    tokio::task::spawn_blocking(move || {
        crate::git::checkout::mark_handed(&path).map_err(|e| {
            format!(
                "cannot mark the workspace {} as handed to the steps: {e}",
                path.display()
            )
        })?;
        open_slot().map_err(|e| {
            format!(
                "cannot let the steps through to the workspace {}: {e}",
                path.display()
            )
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// With `run_as`: gives the checkout to the run's user and makes the run's `HOME`,
/// owned by it; both closed to everyone else (0700), which keeps them from the runs of
/// the other uids of `run_as_uids`. The folders above them let it through but not look
/// (see `daemon`). A reused workspace's `.git` stays the daemon's: the daemon updates
/// that workspace again, and a step must not be able to point that update anywhere else.
async fn give_away(
    state: &Arc<AppState>,
    who: Option<&RunAs>,
    run: i64,
    workspace: &Lease,
) -> Result<(), String> {
    let Some(who) = who.cloned() else {
        return Ok(());
    };
    let (reused, workspace, home) = (
        !workspace.is_fresh(),
        workspace.path.clone(),
        state.home(run),
    );
    let done = tokio::task::spawn_blocking(move || {
        let give = || {
            if reused {
                user::chown_work_tree(&workspace, &who)
            } else {
                user::chown_tree(&workspace, &who)
            }
        };
        private(&workspace).and_then(|()| give()).map_err(|e| {
            format!(
                "cannot give the workspace {} to run_as user {}: {e}",
                workspace.display(),
                who.name
            )
        })?;
        crate::fsx::closed_dir(&home)
            .and_then(|()| {
                if reused {
                    trust_work_tree(&home, &workspace)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| user::chown_tree(&home, &who))
            .map_err(|e| {
                format!(
                    "cannot make HOME {} for run_as user {}: {e}",
                    home.display(),
                    who.name
                )
            })
    })
    .await;
    done.map_err(|e| e.to_string())?
}

/// Closes a directory about to be given to the run's user, if it is open to others: a
/// reused workspace a step opened, or one made before `run_as_uids`, is taken back
/// ([`crate::fsx::reclaim_dir`]) and given away again with the rest.
fn private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(dir)?.mode() & 0o077 == 0 {
        return Ok(());
    }
    crate::fsx::reclaim_dir(dir)
}

/// With `run_as_uids`: the uid a run takes for as long as a process of it may live,
/// the one its reused workspace belongs to if that is free (then the workspace need not
/// be given away again). `Ok(None)` without `run_as_uids`. Each uid is held by one run,
/// and there are no fewer than runs at once, but a uid kept out (see `run::uids`) can
/// leave a run waiting here for one; `Err` when the run was stopped meanwhile.
async fn take_uid(
    state: &AppState,
    workspace: &Lease,
    stop: &watch::Receiver<bool>,
) -> Result<Option<BuildUid>, UidWait> {
    let Some(uids) = &state.build_uids else {
        return Ok(None);
    };
    let last = (!workspace.is_fresh())
        .then(|| {
            let stamp = crate::git::checkout::uid_stamp(&workspace.path);
            std::fs::read_to_string(stamp)
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()
        })
        .flatten();
    if let Some(held) = uids.take(last) {
        return Ok(Some(held));
    }
    tracing::warn!("waiting for a uid of run_as_uids: each is held by a run or kept out");
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A cancel first: it was answered as applied, and must not be requeued away.
        if *stop.borrow() {
            return Err(UidWait::Stopped);
        }
        // Before a uid freed during the stop's grace starts a run, to be killed at its end.
        if *state.stopping().borrow() {
            return Err(UidWait::DaemonStopping);
        }
        if let Some(held) = uids.take(last) {
            return Ok(Some(held));
        }
    }
}

/// Why a run waiting for a uid stopped waiting.
enum UidWait {
    /// It was stopped (canceled, say).
    Stopped,
    /// The daemon began to stop: the run goes back to the queue, unstarted.
    DaemonStopping,
}

/// At the end of a run of a reused workspace with `run_as_uids`: the workspace's top
/// folder goes back to hookci (0700), so that no run that takes its uid next can enter
/// it while the slot's folder lets another run of the pipeline through; the uid whose
/// files it holds (`handed`: the steps had it) is written beside it for the slot's next
/// run to ask for. The files inside stay the uid's, and the next hand-over gives the
/// folder back. A workspace missing (never checked out) is left as it is.
fn take_back(workspace: &Path, handed: Option<u32>) -> std::io::Result<()> {
    match std::fs::symlink_metadata(workspace) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    if let Some(uid) = handed {
        std::fs::write(
            crate::git::checkout::uid_stamp(workspace),
            format!("{uid}\n"),
        )?;
    }
    // Closed again too: a step may have opened it.
    crate::fsx::reclaim_dir(workspace)
}

/// Lets git in the steps read a reused workspace whose `.git` is hookci's, not theirs:
/// git refuses a repository of another owner unless its user's config names it in
/// `safe.directory`, and the run's `HOME` is that user's for this run only.
fn trust_work_tree(home: &Path, workspace: &Path) -> std::io::Result<()> {
    let quoted = workspace
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    std::fs::write(
        home.join(".gitconfig"),
        format!("[safe]\n\tdirectory = \"{quoted}\"\n"),
    )
}

/// The pipeline's secrets, by name; a missing one fails the run before any step.
fn secrets_of(config: &Config, pipeline: &Pipeline) -> Result<Vec<(String, Secret)>, String> {
    pipeline
        .secrets
        .iter()
        .map(|name| {
            resolve_secret(name, config.secrets_dir.as_deref(), &config.secret_env)
                .map(|v| (name.clone(), v))
        })
        .collect()
}

/// What [`prepare`] leaves a run with.
enum Prepared {
    /// The commit is in the workspace; the fetch and checkout took this long.
    Ready(Phases),
    /// The pipeline's path filter says the run has nothing to do, for this reason.
    Skip(String),
}

/// Records the planned steps and checks the commit out. A stop kills the git job. The
/// planned steps are written while the mirror is fetched: the commit (a sync of the
/// store) need not hold up the fetch, and both are done before the checkout.
async fn prepare(
    state: &Arc<AppState>,
    run: &Run,
    pipeline: &Pipeline,
    workspace: &Lease,
    stop: &watch::Receiver<bool>,
) -> Result<Prepared, GitError> {
    let names: Vec<String> = pipeline.steps.iter().map(|s| s.name.clone()).collect();
    let on_interrupt = match pipeline.interrupted {
        Interrupted::Retry => OnInterrupt::Retry,
        Interrupted::Fail => OnInterrupt::Fail,
    };
    let id = run.id;
    let planned = blocking(&state.store, move |s| s.plan_steps(id, names, on_interrupt));
    let repo = RepoName::parse(&run.repo).map_err(GitError::Failed)?;
    // Path filters never apply to tags (README, "Pipelines").
    let paths = pipeline
        .on
        .paths
        .as_ref()
        .filter(|_| run.git_ref.starts_with("refs/heads/"));
    let fetch = Fetch {
        repo: &repo,
        clone_url: &run.clone_url,
        git_ref: &run.git_ref,
        commit: &run.commit,
        changes_since: paths.map(|_| run.before.as_str()),
    };
    let fetching = async {
        let started = Instant::now();
        let changes = state.git.fetch(fetch, stop).await;
        (changes, millis(started.elapsed()))
    };
    let (planned, (changes, fetch_ms)) = tokio::join!(planned, fetching);
    planned.map_err(GitError::Failed)?;
    let changes = changes?;
    if let Some(paths) = paths {
        let changes = changes.ok_or_else(|| GitError::Failed("git worker: no changes".into()))?;
        if !changes.paths.iter().any(|p| paths.is_match(p)) {
            let wanted: Vec<&str> = paths.patterns().iter().map(|p| p.as_str()).collect();
            return Ok(Prepared::Skip(format!(
                "no changed file matches on.paths {wanted:?} ({} file(s) changed; diff against {})",
                changes.paths.len(),
                changes.base
            )));
        }
    }
    let checking_out = Instant::now();
    check_out(state, run, &repo, workspace, stop).await?;
    Ok(Prepared::Ready(Phases {
        fetch_ms,
        checkout_ms: millis(checking_out.elapsed()),
    }))
}

/// Whole milliseconds, rounded down: phases rounded so never add up to more than the
/// whole they are part of.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The workspace `run` executes in: its own, or its slot's reused one (`workspace:`).
fn workspace_of(state: &AppState, run: &Run, pipeline: Option<&Pipeline>) -> Lease {
    match pipeline {
        Some(p) => state.slots.lease(&state.config().state_dir, run, p),
        None => Lease::fresh(state.workspace(run.id)),
    }
}

/// Puts the run's commit into its workspace: a fresh checkout, or the reused workspace
/// updated in place.
async fn check_out(
    state: &Arc<AppState>,
    run: &Run,
    repo: &RepoName,
    workspace: &Lease,
    stop: &watch::Receiver<bool>,
) -> Result<(), GitError> {
    let Some(keep) = &workspace.reuse else {
        return state
            .git
            .checkout(repo, &run.clone_url, &run.commit, &workspace.path, stop)
            .await;
    };
    let how = state
        .git
        .update(
            repo,
            &run.clone_url,
            &run.commit,
            (&workspace.path, keep),
            stop,
        )
        .await?;
    tracing::info!(workspace = %workspace.path.display(), updated = ?how, "reused workspace ready");
    Ok(())
}

/// The daemon's own variables a step may see; nothing else of its environment passes.
const INHERITED: [&str; 4] = ["PATH", "HOME", "LANG", "USER"];

/// The complete environment of one step, as README lists it.
pub fn step_env(
    run: &Run,
    pipeline: &Pipeline,
    step: usize,
    workspace: &Path,
    failed: bool,
) -> Vec<(String, String)> {
    step_env_as(run, pipeline, step, workspace, failed, None)
}

/// [`step_env`] for steps that run as `run_as`: its name as `USER`, its own `HOME`.
fn step_env_as(
    run: &Run,
    pipeline: &Pipeline,
    step: usize,
    workspace: &Path,
    failed: bool,
    run_as: Option<(&RunAs, &Path)>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = INHERITED
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    if let Some((who, home)) = run_as {
        env.retain(|(k, _)| k != "HOME" && k != "USER");
        env.push(("HOME".into(), home.to_string_lossy().into_owned()));
        env.push(("USER".into(), who.name.clone()));
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    let mut set = |k: &str, v: &str| env.push((k.to_owned(), v.to_owned()));
    set("CI", "true");
    set("HOOKCI", "true");
    set("HOOKCI_RUN_ID", &run.id.to_string());
    set("HOOKCI_PIPELINE", &pipeline.name);
    set("HOOKCI_REPO", &run.repo);
    set("HOOKCI_REF", &run.git_ref);
    if let Some(branch) = run.git_ref.strip_prefix("refs/heads/") {
        set("HOOKCI_BRANCH", branch);
    } else if let Some(tag) = run.git_ref.strip_prefix("refs/tags/") {
        set("HOOKCI_TAG", tag);
    }
    set("HOOKCI_COMMIT", &run.commit);
    set("HOOKCI_BEFORE", &run.before);
    set(
        "HOOKCI_DELIVERY",
        run.delivery.as_deref().unwrap_or_default(),
    );
    set("HOOKCI_WORKSPACE", &workspace.to_string_lossy());
    set("HOOKCI_STEP", &pipeline.steps[step].name);
    set("HOOKCI_RESULT", if failed { "failure" } else { "success" });
    for (k, v) in pipeline.env.iter().chain(&pipeline.steps[step].env) {
        set(k, v);
    }
    // Later entries win: keep only the last value of each name.
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<(String, String)> = env
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    out.reverse();
    out
}

fn describe(step: &str, end: StepEnd, timeout: Option<Duration>) -> String {
    match end {
        StepEnd::Exited(code) => format!("step {step:?} exited with code {code}"),
        StepEnd::Signaled(sig) => format!("step {step:?} was killed by signal {sig}"),
        StepEnd::TimedOut => match timeout {
            Some(t) => format!("step {step:?} timed out after {t:?}"),
            None => format!("step {step:?} timed out"),
        },
        StepEnd::Canceled => format!("step {step:?} was stopped because the daemon is stopping"),
    }
}

/// How long a cleanup step that sets no `timeout` may run once a timeout or a cancel
/// has cut its run short (the pipeline's deadline is then behind it).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the steps of one run share.
struct StepsContext<'a> {
    workspace: &'a Path,
    /// The user the steps run as: `run_as`, or the uid the run took of `run_as_uids`.
    run_as: Option<&'a RunAs>,
    /// How long the fetch and checkout took, recorded with the first step's start.
    phases: Phases,
    secrets: &'a [(String, Secret)],
    control: &'a RunControl,
    contain: &'a Containment,
}

async fn run_steps(
    state: &Arc<AppState>,
    config: &Config,
    run: &Run,
    pipeline: &Pipeline,
    ctx: StepsContext<'_>,
    stop: watch::Receiver<bool>,
) -> Ending {
    let StepsContext {
        workspace,
        run_as,
        phases,
        secrets,
        control,
        contain,
    } = ctx;
    let mask = Masker::new(secrets.iter().map(|(_, v)| v.expose()));
    let budget = Arc::new(LogBudget::new(config.max_log_bytes));
    let home = state.home(run.id);
    // A timeout too large for the clock to represent is no limit at all.
    let deadline = pipeline.timeout.and_then(|t| Instant::now().checked_add(t));
    let halt = control.halt.subscribe();
    let mut ending: Option<Ending> = None;
    // Once a timeout or a cancel has cut the run short, the `if: failure` and
    // `if: always` steps left still run, each on its own time, and only the daemon
    // stopping stops them: they are how a pipeline cleans up after itself.
    let mut cut = false;
    // Recorded with the first step that starts: push to first step.
    let mut first = Some(phases);
    for (i, step) in pipeline.steps.iter().enumerate() {
        let number = i as i64 + 1;
        let halted = *halt.borrow();
        if halted || (!cut && *stop.borrow()) {
            // Stopped between steps (or during the checkout).
            let end = stopped(control, &format!("step {:?}", step.name));
            let canceled = end.status == RunStatus::Canceled;
            ending.get_or_insert(end);
            if halted || !canceled {
                // The daemon is stopping: no step starts any more, cleanup included.
                continue;
            }
            cut = true;
        }
        if !step.when.runs_after(ending.is_some()) {
            continue;
        }
        if !cut && deadline.is_some_and(|d| Instant::now() >= d) {
            // The time ran out between steps: the pipeline did not get to finish, so
            // the run must not end `succeeded` with this step and the rest skipped.
            ending.get_or_insert_with(|| Ending {
                status: RunStatus::TimedOut,
                reason: Some(format!(
                    "pipeline timed out after {:?} (before step {:?})",
                    pipeline.timeout.unwrap_or_default(),
                    step.name
                )),
            });
            cut = true;
            if !step.when.runs_after(true) {
                continue;
            }
        }
        let span = tracing::info_span!("step", step = %step.name);
        let id = run.id;
        // Stored before the step starts: recovery tells from it whether a step of an
        // interrupted run ran (`interrupted: fail`), so an unrecorded start must not run.
        let first = first.take();
        let started = until_stored(
            state,
            control,
            "the start of a step",
            move |s| match first {
                Some(phases) => s.first_step_started(id, number, phases),
                None => s.step_started(id, number).map(|step| (step, None)),
            },
        )
        .instrument(span.clone())
        .await;
        match started {
            Ok((Some(step), timings)) => state.events.publish(RunEvent::StepStarted {
                run: id,
                step,
                timings,
            }),
            Ok((None, _)) => {}
            Err(_) => {
                ending.get_or_insert_with(|| stopped(control, &format!("step {:?}", step.name)));
                continue;
            }
        }
        let (timeout, pipeline_limits, until) = if cut {
            let own = step.timeout.unwrap_or(CLEANUP_TIMEOUT);
            (Some(own), false, halt.clone())
        } else {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let pipeline_limits = match (remaining, step.timeout) {
                (Some(r), Some(s)) => r < s,
                (Some(_), None) => true,
                _ => false,
            };
            let timeout = match (remaining, step.timeout) {
                (Some(r), Some(s)) => Some(r.min(s)),
                (r, s) => r.or(s),
            };
            (timeout, pipeline_limits, stop.clone())
        };
        let who = run_as.map(|u| (u, home.as_path()));
        let mut env = step_env_as(run, pipeline, i, workspace, ending.is_some(), who);
        env.extend(
            secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_owned())),
        );
        let log = state.log_path(run.id, number);
        let output = state.events.output_of(run.id, number).kept_in(
            &state.store,
            run.attempt,
            config.lease / 3,
        );
        let cmd = StepCommand {
            script: &step.run,
            cwd: workspace,
            env: &env,
            log_path: &log,
            timeout,
            grace: config.step_grace,
            mask: &mask,
            output: Some(&output),
            budget: &budget,
            run_as,
            contain: Some(contain),
        };
        let outcome = runner::run_step(cmd, until).instrument(span.clone()).await;
        if let Ok(dropped) = outcome.as_ref().map(|o| o.log_dropped) {
            if dropped > 0 {
                let logged = blocking(&state.store, move |s| s.log_dropped(id, dropped)).await;
                if let Err(e) = logged {
                    span.in_scope(
                        || tracing::error!(error = %e, "cannot record the log's truncation"),
                    );
                }
            }
        }
        let (record, step_ending) = match outcome {
            Err(e) => {
                let reason = format!("step {:?} could not start: {e}", step.name);
                (
                    record_of(StepStatus::Failed, None, None, Some(reason.clone())),
                    Some((RunStatus::Failed, reason)),
                )
            }
            Ok(o) => {
                let shown_timeout = if pipeline_limits {
                    pipeline.timeout
                } else {
                    timeout
                };
                let reason = describe(&step.name, o.end, shown_timeout);
                match o.end {
                    StepEnd::Exited(0) => {
                        (record_of(StepStatus::Succeeded, Some(0), None, None), None)
                    }
                    StepEnd::Exited(code) => (
                        record_of(StepStatus::Failed, Some(code), None, Some(reason.clone())),
                        Some((RunStatus::Failed, reason)),
                    ),
                    StepEnd::Signaled(sig) => (
                        record_of(StepStatus::Failed, None, Some(sig), Some(reason.clone())),
                        Some((RunStatus::Failed, reason)),
                    ),
                    StepEnd::TimedOut => {
                        cut = true;
                        let reason = if pipeline_limits {
                            format!(
                                "pipeline timed out after {:?} (in step {:?})",
                                pipeline.timeout.unwrap_or_default(),
                                step.name
                            )
                        } else {
                            reason
                        };
                        (
                            record_of(StepStatus::TimedOut, None, None, Some(reason.clone())),
                            Some((RunStatus::TimedOut, reason)),
                        )
                    }
                    // A cleanup step listens to the daemon's stop only.
                    StepEnd::Canceled if cut => (
                        record_of(StepStatus::Interrupted, None, None, Some(reason.clone())),
                        Some((RunStatus::Interrupted, reason)),
                    ),
                    StepEnd::Canceled => {
                        let end = stopped(control, &format!("step {:?}", step.name));
                        let step_status = match end.status {
                            RunStatus::Canceled => StepStatus::Canceled,
                            _ => StepStatus::Interrupted,
                        };
                        let reason = end.reason.unwrap_or(reason);
                        (
                            record_of(step_status, None, None, Some(reason.clone())),
                            Some((end.status, reason)),
                        )
                    }
                }
            }
        };
        span.in_scope(|| tracing::info!(status = record.status.as_str(), "step finished"));
        let finished = until_stored(state, control, "the end of a step", move |s| {
            s.step_finished(id, number, record.clone())
        })
        .instrument(span)
        .await;
        if let Ok(Some(step)) = finished {
            state
                .events
                .publish(RunEvent::StepFinished { run: id, step });
        }
        if let (None, Some((status, reason))) = (&ending, step_ending) {
            ending = Some(Ending {
                status,
                reason: Some(reason),
            });
        }
    }
    ending.unwrap_or(Ending {
        status: RunStatus::Succeeded,
        reason: None,
    })
}

/// How a run stopped from outside ends: `canceled` with the canceller's reason, else
/// (the daemon is stopping) `interrupted`.
fn stopped(control: &RunControl, what: &str) -> Ending {
    match lock(&control.canceled).clone() {
        Some(reason) => Ending {
            status: RunStatus::Canceled,
            reason: Some(reason),
        },
        None => Ending {
            status: RunStatus::Interrupted,
            reason: Some(format!("{what} was stopped because the daemon is stopping")),
        },
    }
}

fn record_of(
    status: StepStatus,
    exit_code: Option<i32>,
    signal: Option<i32>,
    reason: Option<String>,
) -> StepRecord {
    StepRecord {
        status,
        exit_code,
        signal,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ending(status: RunStatus) -> Ending {
        Ending {
            status,
            reason: None,
        }
    }

    #[test]
    fn a_run_waiting_to_start_is_withdrawn_unless_a_cancel_came_first() {
        let running = Running::default();
        let (tx, _rx) = watch::channel(false);
        running.register(1, tx);
        assert!(running.withdraw(1));
        assert_eq!(running.cancel(1, "late"), Cancel::NotHere);
        let (tx, _rx) = watch::channel(false);
        running.register(2, tx);
        assert_eq!(running.cancel(2, "asked"), Cancel::Stopping);
        assert!(!running.withdraw(2), "a canceled run was withdrawn");
        assert_eq!(running.executing(), [2]);
    }

    #[test]
    fn permits_grow_at_once_and_shrink_as_runs_give_theirs_back() {
        let mut permits = Permits::new(2);
        let held: Vec<_> = (0..2)
            .map(|_| Arc::clone(&permits.semaphore).try_acquire_owned().unwrap())
            .collect();
        let state = |p: &Permits| (p.semaphore.available_permits(), p.owed);
        // Both in use: the one too many is owed, and no running run is touched.
        permits.resize(1);
        assert_eq!(state(&permits), (0, 1));
        // Growing again first cancels what is owed.
        permits.resize(2);
        assert_eq!(state(&permits), (0, 0));
        permits.resize(1);
        drop(held);
        // Given back, the owed one is forgotten at the next resize (or acquire).
        permits.resize(1);
        assert_eq!(state(&permits), (1, 0));
        permits.resize(3);
        assert_eq!(state(&permits), (3, 0));
        permits.resize(1);
        assert_eq!(state(&permits), (1, 0));
    }

    #[tokio::test]
    async fn an_owed_permit_is_forgotten_when_acquired() {
        let mut permits = Permits::new(2);
        let held = Arc::clone(&permits.semaphore).try_acquire_owned().unwrap();
        permits.resize(1);
        // One free, one held: the free one is forgotten now, and nothing is owed.
        assert_eq!(
            (permits.semaphore.available_permits(), permits.owed),
            (0, 0)
        );
        drop(held);
        let got = permits.acquire().await;
        assert!(got.is_some());
        assert_eq!(permits.semaphore.available_permits(), 0);
        // Owed while held, then forgotten as acquire meets it.
        permits.owed = 1;
        drop(got);
        permits.semaphore.add_permits(1);
        let got = permits.acquire().await;
        assert!(got.is_some());
        assert_eq!(
            (permits.semaphore.available_permits(), permits.owed),
            (0, 0)
        );
    }

    #[test]
    fn a_cancel_stops_an_executing_run_and_makes_it_end_canceled() {
        let running = Running::default();
        let (tx, rx) = watch::channel(false);
        let control = running.register(9, tx);
        assert_eq!(
            running.cancel(9, "canceled through the API"),
            Cancel::Stopping
        );
        assert!(*rx.borrow(), "its steps are stopped");
        assert!(!*control.halt.borrow(), "its cleanup steps may still run");
        // A second cancel changes nothing: the first reason stands.
        assert_eq!(running.cancel(9, "superseded by run 10"), Cancel::Stopping);
        let end = stopped(&control, "build");
        assert_eq!(end.status, RunStatus::Canceled);
        assert_eq!(end.reason.as_deref(), Some("canceled through the API"));
        // Its steps were all done when the cancel came: answered as applied, so applied.
        let end = running.close(9, ending(RunStatus::Succeeded));
        assert_eq!(end.status, RunStatus::Canceled);
        // What happened first stays.
        let (tx, _rx) = watch::channel(false);
        running.register(11, tx);
        running.cancel(11, "canceled through the API");
        assert_eq!(
            running.close(11, ending(RunStatus::Failed)).status,
            RunStatus::Failed
        );

        // Not canceled by anyone: a stop is a shutdown, and it halts cleanup steps too.
        let (tx, _rx) = watch::channel(false);
        let control = running.register(10, tx);
        running.stop_all();
        assert!(*control.halt.borrow());
        assert_eq!(stopped(&control, "build").status, RunStatus::Interrupted);
    }

    #[test]
    fn a_cancel_at_or_after_the_end_is_refused_and_leaves_no_slot_behind() {
        let running = Running::default();
        // Never registered here (queued, or claimed and not yet registered).
        assert_eq!(
            running.cancel(7, "canceled through the API"),
            Cancel::NotHere
        );
        assert!(
            running.lock().is_empty(),
            "nothing is added for a run not here"
        );

        let (tx, rx) = watch::channel(false);
        running.register(7, tx);
        assert_eq!(
            running.close(7, ending(RunStatus::Succeeded)).status,
            RunStatus::Succeeded
        );
        // Its end is decided but not yet stored: refused, with the status it ends with.
        assert_eq!(
            running.cancel(7, "canceled through the API"),
            Cancel::Ended(RunStatus::Succeeded)
        );
        assert!(!*rx.borrow(), "a refused cancel stops nothing");
        // A stop still reaches it while its end is being stored.
        let control = match running.lock().get(&7) {
            Some(Slot::Ending(_, control)) => Arc::clone(control),
            _ => panic!("run 7 is ending"),
        };
        running.stop_all();
        assert!(*control.halt.borrow(), "its store writes give up at a stop");
        // Stored: the store answers from now on, and the registry holds nothing.
        running.remove(7);
        assert_eq!(
            running.cancel(7, "canceled through the API"),
            Cancel::NotHere
        );
        assert!(running.lock().is_empty(), "no slot left behind");
    }
}
