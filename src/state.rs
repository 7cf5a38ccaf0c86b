//! The state every stage shares: the immutable config, the store, the current pipeline
//! set (swapped whole by a reload), the scheduler's registry of executing runs, the git
//! worker, and the wake-up and stop signals. Owned here, apart from `daemon` (the
//! wiring), so that no stage imports the wiring.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::git::worker::GitWorker;
use crate::pipeline::PipelineSet;
use crate::run::{scheduler, workspace};
use crate::store::Store;

/// What every stage shares.
pub struct AppState {
    pub config: Config,
    pub store: Arc<Store>,
    pipelines: RwLock<Arc<PipelineSet>>,
    /// Wakes the scheduler when runs were queued.
    pub wake: Notify,
    /// The runs executing now, with their stop switches.
    pub running: scheduler::Running,
    /// Runs git jobs (fetch, checkout, ref listings) in child processes.
    pub git: GitWorker,
    /// The reused workspaces held by executing runs.
    pub slots: workspace::Slots,
    /// Turns true once when the daemon begins to stop.
    stopping: watch::Sender<bool>,
}

impl AppState {
    pub fn new(config: Config, store: Arc<Store>, pipelines: PipelineSet) -> AppState {
        AppState {
            git: GitWorker::new(&config.state_dir, config.github.clone_token()),
            config,
            store,
            pipelines: RwLock::new(Arc::new(pipelines)),
            wake: Notify::new(),
            running: scheduler::Running::default(),
            slots: workspace::Slots::default(),
            stopping: watch::Sender::new(false),
        }
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

    pub fn workspace(&self, run: i64) -> PathBuf {
        self.config
            .state_dir
            .join("workspaces")
            .join(run.to_string())
    }
}
