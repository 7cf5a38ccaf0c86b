//! One integration test binary: every test drives the real `hookci` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

mod api;
mod builds;
mod cli;
mod control;
mod instances;
mod intake;
mod reconcile;
mod recovery;
mod systemd;
mod workspaces;
