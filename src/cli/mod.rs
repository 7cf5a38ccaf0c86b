//! The command line's own work, beside `serve`: a small HTTP `client`, the API
//! commands that print for people (`remote`), and `hookci run` in the `foreground`.

pub mod client;
pub mod foreground;
pub mod remote;
