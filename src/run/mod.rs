//! The run stage: the `scheduler` takes queued runs from the store and executes them,
//! the `runner` runs one step as a process group, `output` carries its output from its
//! pipes to its log file (and to followers), `mask` keeps secrets out of that log,
//! `contain` ends whatever a run leaves behind (its cgroup, else a subreaper's sweep),
//! `user` switches steps to `run_as` (`uids`: a uid of its own for each run at once),
//! and `disk` keeps runs from starting on a full disk; the scheduler's `heartbeat`
//! feeds the service manager's watchdog and status line; `workspace` says where a
//! run's steps run (its own checkout, or its slot's reused one). Everything a run does
//! to the machine happens here. On a store several instances share, `lease` keeps this instance's hold on
//! its running runs, recovers those of an instance that lost its hold, and applies
//! the cancels other instances pass on.
//! `events` is the stream every run transition is published on, for whoever follows
//! runs (live logs, metrics, reports) to subscribe to.

pub mod contain;
pub mod disk;
pub mod events;
pub mod heartbeat;
pub mod lease;
pub mod mask;
pub mod output;
pub mod runner;
pub mod scheduler;
pub mod uids;
pub mod user;
pub mod workspace;

pub use events::{Events, RunEvent};
