//! hookci: a CI/CD trigger daemon, laid out in folders by stage of the data flow:
//!
//! `intake` (a signed push, and missed pushes found by reconcile) → `pipeline` (which
//! pipelines it triggers) → `store` (recorded durably; the queue) → `git` (fetched and
//! checked out) → `run` (steps executed) → `report` (told where people look) → `web`
//! (what happened, live). `daemon` wires the stages around the shared `state`; `cli`
//! holds the command line's own work.
//! `config`, `yaml`, `duration` and `clock` serve every stage; `reload` swaps in a new
//! config and pipelines while the daemon runs; `systemd` speaks to the service manager;
//! `process` hardens the hookci process itself; `fsx` does file operations in trees
//! steps may change meanwhile (workspaces) without following their links, for `git` and
//! `run`.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod duration;
pub mod fsx;
pub mod git;
pub mod intake;
pub mod pipeline;
pub mod process;
pub mod reload;
pub mod report;
pub mod run;
pub mod state;
pub mod store;
pub mod systemd;
pub mod web;
pub mod yaml;
