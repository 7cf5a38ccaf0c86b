//! The run event stream: every transition of a run (queued, started, step started,
//! output, step finished, finished) on one in-process channel, held in the shared
//! state. Whoever makes a transition publishes it once the store has committed it (the
//! store's writes return what they committed, so an event always shows the run or step
//! as stored); the step runner publishes output as it writes the log, secrets already
//! masked. Subscribers (the live-log followers, metrics, reporters) each take a
//! [`Receiver`] with [`Events::subscribe`] and never poll the store for news.
//!
//! The stream is lossy by design, the store and the log files are not: a subscriber
//! that falls more than [`CAPACITY`] events behind is told so (`RecvError::Lagged`) and
//! re-reads what it needs from the store and the files. Events made before a
//! subscription are not replayed; a subscriber that needs the past reads it after
//! subscribing, and drops what it then sees twice (output carries its offset in the
//! log for that).
//!
//! A subscriber is a task: subscribe where it is spawned (so nothing made after the
//! spawn is missed), then loop on `recv().await`: `Ok(event)` is the next transition
//! (an `Arc`, shared with the other subscribers), `Err(RecvError::Lagged(n))` says `n`
//! were missed, `Err(RecvError::Closed)` that the daemon's state is gone. `web::metrics`
//! is the smallest example, `web::follow` the one that re-reads after a lag.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

pub use tokio::sync::broadcast::error::RecvError;

use crate::store::{LogPiece, Run, RunStatus, Step, Store, StoreError, Timings};

/// How many events a subscriber may fall behind before it lags. Output dominates: an
/// event carries at most 16 KiB of a step's log (`output::EVENT_BYTES`), so the stream
/// holds at most 64 MiB of a noisy step's log, and only while a subscriber is behind.
pub const CAPACITY: usize = 4096;

/// One transition of a run, as committed.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// A run was created queued (push, reconcile, rerun, manual trigger).
    Queued(Run),
    /// A run was claimed and begins (status `running`, `started_at` set).
    Started(Run),
    StepStarted {
        run: i64,
        step: Step,
        /// With the first step that starts in the run's attempt: push to first step.
        timings: Option<Timings>,
    },
    /// Log text of a step, exactly as written to its log file (secrets masked), which
    /// holds it at `offset`. A step's output comes between its start and its end.
    Output {
        run: i64,
        step: i64,
        offset: u64,
        bytes: Bytes,
    },
    StepFinished {
        run: i64,
        step: Step,
    },
    /// A run ended (any final status, `interrupted` included; also a run created
    /// `skipped`, or canceled while queued), with its current attempt's steps as they
    /// were stored with the end (none for a run that never started).
    Finished {
        run: Run,
        steps: Vec<Step>,
    },
}

impl RunEvent {
    /// The run the event is about.
    pub fn run_id(&self) -> i64 {
        match self {
            RunEvent::Queued(run) | RunEvent::Started(run) | RunEvent::Finished { run, .. } => {
                run.id
            }
            RunEvent::StepStarted { run, .. }
            | RunEvent::Output { run, .. }
            | RunEvent::StepFinished { run, .. } => *run,
        }
    }
}

/// A subscription to the stream.
pub type Receiver = broadcast::Receiver<Arc<RunEvent>>;

/// The sending side of the stream; cloning it gives another handle to the same stream.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<RunEvent>>,
}

impl Default for Events {
    fn default() -> Events {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        Events {
            tx: broadcast::Sender::new(CAPACITY),
        }
    }

    /// Every event published from now on, in order of publication.
    pub fn subscribe(&self) -> Receiver {
        self.tx.subscribe()
    }

    /// Publishes one event; with nobody subscribed it is simply dropped.
    pub fn publish(&self, event: RunEvent) {
        let _ = self.tx.send(Arc::new(event));
    }

    /// Publishes what a store write that created or canceled runs changed (see
    /// `RunRef::changed`): `Queued` for a queued run, `Finished` for one that ended.
    pub fn runs_changed(&self, runs: impl IntoIterator<Item = Run>) {
        for run in runs {
            match run.status {
                RunStatus::Queued => self.publish(RunEvent::Queued(run)),
                RunStatus::Running => self.publish(RunEvent::Started(run)),
                _ => self.publish(RunEvent::Finished {
                    run,
                    steps: Vec::new(),
                }),
            }
        }
    }

    /// Where the step runner publishes step `step` of run `run`'s output.
    pub fn output_of(&self, run: i64, step: i64) -> OutputTap {
        OutputTap {
            events: self.clone(),
            run,
            step,
            kept: None,
        }
    }
}

/// Publishes one step's output as its log is written, and with a store that shares
/// logs between instances (`Store::shares_logs`), has the runner keep it there too.
#[derive(Clone)]
pub struct OutputTap {
    events: Events,
    run: i64,
    step: i64,
    /// The store, the attempt, and how long the end of a step's output may wait for a
    /// store that fails.
    kept: Option<(Arc<dyn Store>, i64, std::time::Duration)>,
}

impl std::fmt::Debug for OutputTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputTap")
            .field("run", &self.run)
            .field("step", &self.step)
            .field("kept", &self.kept.as_ref().map(|(_, attempt, _)| attempt))
            .finish()
    }
}

impl OutputTap {
    /// The output of attempt `attempt` is also kept in `store`, if it shares logs; when
    /// the step has ended, what is left of it is tried for up to `patience` (a third of
    /// the lease, as `step_grace` is bounded: the run's end must be recorded before its
    /// lease can lapse).
    pub fn kept_in(
        mut self,
        store: &Arc<dyn Store>,
        attempt: i64,
        patience: std::time::Duration,
    ) -> OutputTap {
        if store.shares_logs() {
            self.kept = Some((Arc::clone(store), attempt, patience));
        }
        self
    }

    /// How long the end of the output may wait for the store (see [`OutputTap::kept_in`]).
    pub fn patience(&self) -> std::time::Duration {
        self.kept
            .as_ref()
            .map_or(std::time::Duration::ZERO, |(_, _, patience)| *patience)
    }

    /// Whether the runner must [`keep`](OutputTap::keep) what it writes.
    pub fn keeps(&self) -> bool {
        self.kept.is_some()
    }

    /// Keeps `bytes`, written to the log at `at`, in the store (blocking: call it off
    /// the runtime). Does nothing unless [`keeps`](OutputTap::keeps).
    pub fn keep(&self, at: u64, bytes: Vec<u8>) -> Result<(), StoreError> {
        match &self.kept {
            Some((store, attempt, _)) => store.append_log(LogPiece {
                run: self.run,
                attempt: *attempt,
                step: self.step,
                at,
                bytes,
            }),
            None => Ok(()),
        }
    }

    /// `bytes` were written to the log at `offset` and are readable there now.
    pub fn written(&self, offset: u64, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.events.publish(RunEvent::Output {
            run: self.run,
            step: self.step,
            offset,
            bytes,
        });
    }
}
