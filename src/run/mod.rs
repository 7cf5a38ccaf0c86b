//! The run stage: the `scheduler` takes queued runs from the store and executes them,
//! the `runner` runs one step as a process group with its log, `mask` keeps secrets
//! out of that log, and the scheduler's `heartbeat` feeds the service manager's watchdog
//! and status line. Everything a run does to the machine happens here.

pub mod heartbeat;
pub mod mask;
pub mod runner;
pub mod scheduler;
