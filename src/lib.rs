//! hookci: a CI/CD trigger daemon. A signed GitHub push is verified (`intake`), read
//! (`event`), matched against the pipelines (`pipeline`, `pattern`, `matcher`), recorded
//! durably (`store`), then built: fetched (`checkout`) and run step by step (`runner`),
//! driven by the `scheduler`. `daemon` wires the stages; `api` serves what happened.

pub mod api;
pub mod changes;
pub mod checkout;
pub mod client;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod duration;
pub mod event;
pub mod follow;
pub mod foreground;
pub mod gitwork;
pub mod http;
pub mod intake;
pub mod mask;
pub mod matcher;
pub mod notify;
pub mod pattern;
pub mod pipeline;
pub mod reconcile;
pub mod remote;
pub mod repo;
pub mod runner;
pub mod scheduler;
pub mod store;
pub mod yaml;
