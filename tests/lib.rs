//! One integration test binary: every test drives the real `hookci` binary.

mod harness;

mod builds;
