//! The state every stage shares: the immutable config, the store, the current pipeline
//! set (swapped whole by a reload), the scheduler's registry of executing runs, the git
//! worker, the run event stream with its followers and metrics, and the wake-up and
//! stop signals. Owned here, apart from `daemon` (the
//! wiring), so that no stage imports the wiring.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{watch, Notify, Semaphore};

use crate::config::Config;
use crate::git::worker::GitWorker;
use crate::pipeline::PipelineSet;
use crate::run::contain::Cgroups;
use crate::run::{scheduler, Events};
use crate::store::Store;
use crate::web::follow::Followers;
use crate::web::metrics::Metrics;

/// What every stage shares.
pub struct AppState {
    pub config: Config,
    pub store: Arc<Store>,
    pipelines: RwLock<Arc<PipelineSet>>,
    /// Wakes the scheduler when runs were queued.
    pub wake: Notify,
    /// Wakes the report sender when a transition wrote reports to the outbox.
    pub reports: Notify,
    /// The runs executing now, with their stop switches.
    pub running: scheduler::Running,
    /// Runs git jobs (fetch, checkout, ref listings) in child processes.
    pub git: GitWorker,
    /// Every run transition, once stored: subscribe with `events.subscribe()`.
    pub events: Events,
    /// Who follows runs live (log and event streams).
    pub followers: Followers,
    /// What `/metrics` shows; fed from `events` by [`Metrics::record`].
    pub metrics: Metrics,
    /// Turns true once when the daemon begins to stop.
    stopping: watch::Sender<bool>,
    /// Where runs' cgroups are made, if anywhere.
    pub cgroups: Cgroups,
    /// Why no run starts now (the state directory's disk is short of space), if so.
    paused: Mutex<Option<String>>,
    /// `max_unverified_bytes`, in KiB: what webhook bodies not yet verified may hold.
    pub unverified: Arc<Semaphore>,
}

impl AppState {
    pub fn new(config: Config, store: Arc<Store>, pipelines: PipelineSet) -> AppState {
        let unverified_kib = usize::try_from(config.max_unverified_bytes / 1024)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        AppState {
            git: GitWorker::new(&config.state_dir, config.github.clone_token()),
            config,
            store,
            pipelines: RwLock::new(Arc::new(pipelines)),
            wake: Notify::new(),
            reports: Notify::new(),
            running: scheduler::Running::default(),
            events: Events::new(),
            followers: Followers::default(),
            metrics: Metrics::new(),
            stopping: watch::Sender::new(false),
            cgroups: Cgroups::none(),
            paused: Mutex::new(None),
            unverified: Arc::new(Semaphore::new(unverified_kib)),
        }
    }

    /// With the run cgroups of `cgroups` (the daemon's; `hookci run` makes none).
    pub fn with_cgroups(mut self, cgroups: Cgroups) -> AppState {
        self.cgroups = cgroups;
        self
    }

    /// Why no run starts now, if none does.
    pub fn paused(&self) -> Option<String> {
        self.paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets (or clears) why no run starts; returns the reason it replaces.
    pub fn set_paused(&self, why: Option<String>) -> Option<String> {
        std::mem::replace(
            &mut *self.paused.lock().unwrap_or_else(|e| e.into_inner()),
            why,
        )
    }

    /// Begins the stop: the scheduler claims no more runs, followers end their streams.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Turns true when the stop begins (see [`AppState::stop`]).
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// The current pipelines; a reload swaps in a whole new set.
    pub fn pipelines(&self) -> Arc<PipelineSet> {
        Arc::clone(&self.pipelines.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn log_dir(&self, run: i64) -> PathBuf {
        self.config.state_dir.join("logs").join(run.to_string())
    }

    pub fn log_path(&self, run: i64, step: i64) -> PathBuf {
        self.log_dir(run).join(format!("{step}.log"))
    }

    /// The `HOME` of a run's steps when they run as `run_as`.
    pub fn home(&self, run: i64) -> PathBuf {
        self.config.state_dir.join("homes").join(run.to_string())
    }

    pub fn workspace(&self, run: i64) -> PathBuf {
        self.config
            .state_dir
            .join("workspaces")
            .join(run.to_string())
    }
}
