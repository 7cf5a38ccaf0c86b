//! The store's one writer: a thread with its own connection that takes every write
//! waiting at that moment, runs each in a savepoint of one transaction, and commits
//! once. Callers are answered only after that commit (and its fsync), so a 202 still
//! means "durable" while concurrent deliveries share the cost of a sync, and the
//! scheduler's writes never wait on a lock held by intake or the other way round.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::StoreError;

/// The most writes one transaction takes: bounds the latency of the first in line.
const MAX_BATCH: usize = 512;

/// Called after the commit with its outcome; answers the caller.
type Done = Box<dyn FnOnce(Result<(), String>) + Send>;
/// Runs inside the transaction (`None`: it may not run, its savepoint could not be
/// opened); says whether it succeeded (else its savepoint is rolled back) and how to
/// answer once the commit is known.
type Work = Box<dyn FnOnce(Option<&Connection>) -> (bool, Done) + Send>;

/// Handle to the writer thread; the thread ends when the last handle is dropped.
pub struct Writer {
    path: PathBuf,
    jobs: mpsc::Sender<Work>,
}

impl Writer {
    pub fn start(path: &Path, conn: Connection) -> Result<Writer, StoreError> {
        let (jobs, rx) = mpsc::channel();
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("hookci-store-writer".into())
            .spawn(move || write_loop(&conn, &thread_path, &rx))
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Writer {
            path: path.to_path_buf(),
            jobs,
        })
    }

    fn submit<T, F, R>(&self, f: F, reply: R) -> Result<(), StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        R: FnOnce(Result<T, StoreError>) + Send + 'static,
    {
        let path = self.path.clone();
        let work: Work = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => f(conn).map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    source,
                }),
                None => Err(StoreError::Failed {
                    path: path.clone(),
                    message: "cannot open a savepoint".into(),
                }),
            };
            let ok = result.is_ok();
            let done: Done = Box::new(move |commit| {
                reply(match (result, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(message)) => Err(StoreError::Failed { path, message }),
                })
            });
            (ok, done)
        });
        self.jobs.send(work).map_err(|_| self.gone())
    }

    fn gone(&self) -> StoreError {
        StoreError::Failed {
            path: self.path.clone(),
            message: "the store writer has stopped".into(),
        }
    }

    /// Runs `f` in the next batch; blocks until it is committed.
    pub fn exec<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| self.gone())?
    }

    /// Runs `f` in the next batch; resolves once it is committed.
    pub async fn exec_async<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(f, move |r| {
            // The caller may have gone away (client disconnected); the record stands.
            let _ = tx.send(r);
        })?;
        rx.await.map_err(|_| self.gone())?
    }
}

fn write_loop(conn: &Connection, path: &Path, rx: &mpsc::Receiver<Work>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        let began = conn.execute_batch("BEGIN IMMEDIATE");
        if let Err(e) = &began {
            tracing::error!(store = %path.display(), error = %e, "cannot begin a write transaction");
        }
        let mut dones = Vec::with_capacity(batch.len());
        for work in batch {
            let (ok, done) = match conn.execute_batch("SAVEPOINT w") {
                Ok(()) => {
                    let (ok, done) = work(Some(conn));
                    let end = if ok {
                        "RELEASE w"
                    } else {
                        "ROLLBACK TO w; RELEASE w"
                    };
                    match conn.execute_batch(end) {
                        Ok(()) => (ok, done),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot end a savepoint");
                            (false, done)
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot open a savepoint");
                    work(None)
                }
            };
            dones.push((ok, done));
        }
        let committed = began
            .and_then(|()| conn.execute_batch("COMMIT"))
            .map_err(|e| {
                let _ = conn.execute_batch("ROLLBACK");
                tracing::error!(store = %path.display(), error = %e, writes = dones.len(), "committing a batch failed");
                format!("commit failed: {e}")
            });
        for (_, done) in dones {
            done(committed.clone());
        }
    }
}
