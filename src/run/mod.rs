//! The run stage: the `scheduler` takes queued runs from the store and executes them,
//! the `runner` runs one step as a process group with its log, and `mask` keeps secrets
//! out of that log, and `workspace` says where a run's steps run (its own checkout, or
//! its slot's reused one). Everything a run does to the machine happens here.

pub mod mask;
pub mod runner;
pub mod scheduler;
pub mod workspace;
