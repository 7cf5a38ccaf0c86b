//! The state every stage shares: the current model (config and pipelines, swapped
//! whole by a reload), the store, the scheduler's registry of executing runs, the git
//! worker, the run event stream with its followers and metrics, and the wake-up and
//! stop signals. Owned here, apart from `daemon` (the wiring), so that no stage
//! imports the wiring.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

use crate::config::{Config, ConfigSource};
use crate::git::worker::GitWorker;
use crate::intake::budget::BodyBudget;
use crate::pipeline::PipelineSet;
use crate::run::contain::Cgroups;
use crate::run::uids::BuildUids;
use crate::run::{scheduler, workspace, Events};
use crate::store::Store;
use crate::web::follow::Followers;
use crate::web::metrics::Metrics;

/// What a reload replaces, both parts at once: a reader never sees the pipelines of
/// one reload with the config of another.
#[derive(Clone)]
pub struct Model {
    pub config: Arc<Config>,
    pub pipelines: Arc<PipelineSet>,
}

/// What every stage shares.
pub struct AppState {
    model: watch::Sender<Model>,
    pub store: Arc<dyn Store>,
    /// Where the config came from, for reloads; `None` where nothing reloads
    /// (`hookci run`).
    pub source: Option<ConfigSource>,
    /// Held by the reload in progress, so two reloads never interleave.
    pub reloading: tokio::sync::Mutex<()>,
    /// Wakes the scheduler when runs were queued.
    pub wake: Notify,
    /// Wakes the report sender when a transition wrote reports to the outbox.
    pub reports: Notify,
    /// The runs executing now, with their stop switches.
    pub running: scheduler::Running,
    /// Set while this instance cannot renew its leases on a shared store (see
    /// `run::lease`): it claims no run then, since it would have to stop it again.
    pub fenced: std::sync::atomic::AtomicBool,
    /// Runs git jobs (fetch, checkout, ref listings) in child processes.
    pub git: GitWorker,
    /// Every run transition, once stored: subscribe with `events.subscribe()`.
    pub events: Events,
    /// Who follows runs live (log and event streams).
    pub followers: Followers,
    /// What `/metrics` shows; fed from `events` by [`Metrics::record`].
    pub metrics: Metrics,
    /// When the last webhook delivery was recorded (ms since the epoch), for the
    /// service manager's status line; `changed` wakes the one who keeps that line.
    pub last_delivery: Mutex<Option<i64>>,
    pub changed: Notify,
    /// The reused workspaces held by executing runs.
    pub slots: workspace::Slots,
    /// Turns true once when the daemon begins to stop.
    stopping: watch::Sender<bool>,
    /// Where runs' cgroups are made, if anywhere.
    pub cgroups: Cgroups,
    /// Why no run starts now (the state directory's disk is short of space), if so.
    paused: Mutex<Option<String>>,
    /// `max_unverified_bytes`: what webhook bodies not yet verified may hold.
    pub unverified: BodyBudget,
    /// `run_as_uids`: the uids runs take one each of (`run_as` and it are restart-only).
    pub build_uids: Option<BuildUids>,
}

impl AppState {
    pub fn new(config: Config, store: Arc<dyn Store>, pipelines: PipelineSet) -> AppState {
        let unverified = BodyBudget::new(config.max_unverified_bytes, config.max_body_bytes);
        AppState {
            git: GitWorker::new(&config.state_dir, config.github.clone_token()),
            model: watch::Sender::new(Model {
                config: Arc::new(config),
                pipelines: Arc::new(pipelines),
            }),
            store,
            source: None,
            reloading: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            reports: Notify::new(),
            running: scheduler::Running::default(),
            fenced: std::sync::atomic::AtomicBool::new(false),
            events: Events::new(),
            followers: Followers::default(),
            metrics: Metrics::new(),
            last_delivery: Mutex::new(None),
            changed: Notify::new(),
            slots: workspace::Slots::default(),
            stopping: watch::Sender::new(false),
            cgroups: Cgroups::none(),
            paused: Mutex::new(None),
            unverified,
            build_uids: None,
        }
    }

    /// With the uids of `run_as_uids` (the daemon's, swept at its start).
    pub fn with_build_uids(mut self, uids: Option<BuildUids>) -> AppState {
        self.build_uids = uids;
        self
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

    /// Lets reloads read the config again from `source`.
    pub fn with_source(mut self, source: ConfigSource) -> AppState {
        self.source = Some(source);
        self
    }

    /// Begins the stop: the scheduler claims no more runs, followers end their streams.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Turns true when the stop begins (see [`AppState::stop`]).
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// The current config and pipelines, both from the same reload.
    pub fn model(&self) -> Model {
        self.model.borrow().clone()
    }

    /// The current config; a reload swaps in a whole new one.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.model.borrow().config)
    }

    /// The current pipelines; a reload swaps in a whole new set.
    pub fn pipelines(&self) -> Arc<PipelineSet> {
        Arc::clone(&self.model.borrow().pipelines)
    }

    /// Sees every swap of the model, for those who size or time themselves by it.
    pub fn model_changes(&self) -> watch::Receiver<Model> {
        self.model.subscribe()
    }

    /// Swaps in a new model (the reload's last step); runs already started keep the
    /// pipeline they hold.
    pub fn swap(&self, model: Model) {
        self.git.set_token(model.config.github.clone_token());
        self.model.send_replace(model);
    }

    /// Records that a delivery was just stored.
    pub fn delivered(&self) {
        *self.last_delivery.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(crate::clock::now_ms());
        self.changed.notify_one();
    }

    pub fn log_dir(&self, run: i64) -> PathBuf {
        self.config().state_dir.join("logs").join(run.to_string())
    }

    pub fn log_path(&self, run: i64, step: i64) -> PathBuf {
        self.log_dir(run).join(format!("{step}.log"))
    }

    /// The `HOME` of a run's steps when they run as `run_as`.
    pub fn home(&self, run: i64) -> PathBuf {
        self.config().state_dir.join("homes").join(run.to_string())
    }

    pub fn workspace(&self, run: i64) -> PathBuf {
        self.config()
            .state_dir
            .join("workspaces")
            .join(run.to_string())
    }
}
