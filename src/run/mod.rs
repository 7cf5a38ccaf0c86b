//! The run stage: the `scheduler` takes queued runs from the store and executes them,
//! the `runner` runs one step as a process group with its log, and `mask` keeps secrets
//! out of that log. Everything a run does to the machine happens here. `events` is the
//! stream every run transition is published on, for whoever follows runs (live logs,
//! metrics, reports) to subscribe to.

pub mod events;
pub mod mask;
pub mod runner;
pub mod scheduler;

pub use events::{Events, RunEvent};
