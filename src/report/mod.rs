//! The report stage: where a run's result is told. The `policy` decides, inside the
//! store's transaction of each run transition, which reports it causes (GitHub
//! commit statuses, `notify:` targets) and the store writes them to its outbox; the
//! `sender` delivers them from there with retries, and `message` writes what a
//! notification says. Touches runs only through the store; never logs a token or a
//! URL held in a secret.

pub mod message;
pub mod policy;
pub mod sender;
