//! The web face: `http` serves connections and routes them, closing idle ones (`idle`)
//! and refusing what needs the read token and lacks it (`auth`); `api` answers the read API, `control` the write
//! API (cancel, rerun, trigger, reload), `follow` feeds live logs and events to their readers
//! from the run event stream, `logs` reads a step's log from its file or the shared
//! store, and `metrics` keeps what `/metrics` shows. The
//! dashboard: `pages` (server-rendered HTML from `render`'s parts, ANSI colours by
//! `ansi`, stylesheet and script in `assets/`), `forms` (login and the buttons) and
//! `badge` (SVG badges). Reads the store; changes runs only through the store and the
//! scheduler's stop switches.

pub mod ansi;
pub mod api;
pub mod auth;
pub mod badge;
pub mod control;
pub mod follow;
pub mod forms;
pub mod http;
pub mod idle;
pub mod logs;
pub mod metrics;
pub mod pages;
pub mod render;
