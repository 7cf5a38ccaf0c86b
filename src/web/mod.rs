//! The web face: `http` serves connections and routes them, `api` answers the read
//! API, `control` the write API (cancel, rerun, trigger, reload), and `follow` feeds
//! live logs and events to their readers. Reads the store; changes runs only through
//! the store and the scheduler's stop switches.

pub mod api;
pub mod control;
pub mod follow;
pub mod http;
