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

/// A batch this large means load: only then is it worth waiting for company (a lone
/// push, or one beside a scheduler write, commits at once).
const LINGER_FROM: usize = 8;

/// How long a batch under load waits for company before it commits.
const LINGER: std::time::Duration = std::time::Duration::from_micros(250);

/// Called after the commit with its outcome; answers the caller.
type Done = Box<dyn FnOnce(Result<(), String>) + Send>;
/// Runs inside the transaction (`None`: it may not run, its transaction or savepoint
/// could not be opened); says whether it succeeded (else its savepoint is rolled back)
/// and how to answer once the commit is known.
type Work = Box<dyn FnOnce(Option<&Connection>) -> (bool, Done) + Send>;

/// Handle to the writer thread; the thread ends when the last handle is dropped.
pub struct Writer {
    path: PathBuf,
    jobs: mpsc::Sender<Work>,
}

impl Writer {
    pub fn start(
        path: &Path,
        conn: Connection,
        checkpointer: Connection,
    ) -> Result<Writer, StoreError> {
        let (jobs, rx) = mpsc::channel();
        // Checkpoints (copying the WAL into the database file) run beside the writer,
        // not inside its commits, so intake never waits for them.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|source| StoreError::Sqlite {
                path: path.to_path_buf(),
                source,
            })?;
        let ck_path = path.to_path_buf();
        let (ck_stop, ck_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("hookci-store-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpointer, &ck_path, &ck_rx))
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("hookci-store-writer".into())
            .spawn(move || {
                write_loop(&conn, &thread_path, &rx);
                // The last writes are in: one final checkpoint, then the checkpointer ends.
                drop(ck_stop);
            })
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
            let ran = conn.is_some();
            let result = match conn {
                Some(conn) => f(conn).map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    source,
                }),
                None => Err(StoreError::Failed {
                    path: path.clone(),
                    message:
                        "the write was not run: no transaction or savepoint could be opened for it"
                            .into(),
                }),
            };
            let ok = result.is_ok();
            let done: Done = Box::new(move |commit| {
                reply(match (result, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    // Not run because the transaction could not begin: say why it could not.
                    (Err(_), Err(message)) if !ran => Err(StoreError::Failed { path, message }),
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

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

fn checkpoint_loop(conn: &Connection, path: &Path, stop: &mpsc::Receiver<()>) {
    loop {
        let stopping = !matches!(
            stop.recv_timeout(CHECKPOINT_EVERY),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        // PASSIVE never blocks the writer; TRUNCATE at the end leaves a small WAL behind.
        let mode = if stopping { "TRUNCATE" } else { "PASSIVE" };
        if let Err(e) = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(())) {
            tracing::warn!(store = %path.display(), error = %e, "WAL checkpoint failed");
        }
        if stopping {
            return;
        }
    }
}

fn drain(rx: &mpsc::Receiver<Work>, batch: &mut Vec<Work>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(work) => batch.push(work),
            Err(_) => break,
        }
    }
}

/// Runs one statement without parameters through the connection's statement cache.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn write_loop(conn: &Connection, path: &Path, rx: &mpsc::Receiver<Work>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        drain(rx, &mut batch);
        // Under load (many writes waiting), linger a moment: the writes about
        // to arrive share this commit instead of paying for the next one.
        if batch.len() >= LINGER_FROM && batch.len() < MAX_BATCH {
            std::thread::sleep(LINGER);
            drain(rx, &mut batch);
        }
        tracing::trace!(writes = batch.len(), "committing a batch");
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // Outside a transaction each savepoint would commit on its own, and the
            // batch would report failures for writes that are in fact stored: so none
            // of them runs, and every caller hears that it did not.
            tracing::error!(
                store = %path.display(),
                error = %e,
                writes = batch.len(),
                "cannot begin a write transaction"
            );
            if !conn.is_autocommit() {
                // A transaction left open by an earlier failure would refuse every
                // later batch.
                let _ = conn.execute_batch("ROLLBACK");
            }
            let message = format!("cannot begin a write transaction: {e}");
            for work in batch {
                let (_, done) = work(None);
                done(Err(message.clone()));
            }
            continue;
        }
        let mut dones = Vec::with_capacity(batch.len());
        for work in batch {
            // Cached: two statements for every write of every batch, which
            // `execute_batch` would parse and plan each time.
            let (ok, done) = match run_cached(conn, "SAVEPOINT w") {
                Ok(()) => {
                    let (ok, done) = work(Some(conn));
                    let ended = if ok {
                        run_cached(conn, "RELEASE w")
                    } else {
                        conn.execute_batch("ROLLBACK TO w; RELEASE w")
                    };
                    match ended {
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
        let committed = conn.execute_batch("COMMIT").map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            tracing::error!(
                store = %path.display(),
                error = %e,
                writes = dones.len(),
                "committing a batch failed"
            );
            format!("commit failed: {e}")
        });
        for (_, done) in dones {
            done(committed.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn a_failed_write_is_undone_alone_and_the_rest_of_its_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let setup = Connection::open(&path).unwrap();
        setup
            .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (x INTEGER UNIQUE)")
            .unwrap();
        let writer = Arc::new(
            Writer::start(
                &path,
                Connection::open(&path).unwrap(),
                Connection::open(&path).unwrap(),
            )
            .unwrap(),
        );
        // Round after round, so the savepoints' cached statements are used again.
        for round in 0..3i64 {
            // The first write holds the writer until the others wait in its queue:
            // they then share one batch.
            let (go, wait) = mpsc::channel::<()>();
            let gate = std::thread::spawn({
                let writer = Arc::clone(&writer);
                move || {
                    writer.exec(move |c| {
                        let _ = wait.recv();
                        c.execute("INSERT INTO t VALUES (?1)", [round * 10])
                    })
                }
            });
            let writes: Vec<_> = [1, 2, 3]
                .into_iter()
                .map(|i| {
                    let writer = Arc::clone(&writer);
                    let x = round * 10 + i;
                    std::thread::spawn(move || {
                        writer.exec(move |c| {
                            c.execute("INSERT INTO t VALUES (?1)", [x])?;
                            if i == 2 {
                                // Its own row is in; then it fails: a duplicate.
                                c.execute("INSERT INTO t VALUES (?1)", [x])?;
                            }
                            Ok(())
                        })
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(50));
            go.send(()).unwrap();
            gate.join().unwrap().unwrap();
            let results: Vec<bool> = writes
                .into_iter()
                .map(|w| w.join().unwrap().is_ok())
                .collect();
            assert_eq!(results, vec![true, false, true], "round {round}");
        }
        let rows: Vec<i64> = setup
            .prepare("SELECT x FROM t ORDER BY x")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, vec![0, 1, 3, 10, 11, 13, 20, 21, 23]);
    }

    #[test]
    fn a_batch_whose_transaction_cannot_begin_runs_none_of_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let setup = Connection::open(&path).unwrap();
        setup
            .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (x INTEGER)")
            .unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.busy_timeout(std::time::Duration::ZERO).unwrap();
        let writer = Writer::start(&path, conn, Connection::open(&path).unwrap()).unwrap();

        // Another connection holds the write lock: BEGIN IMMEDIATE fails at once.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let blocker = Arc::new(Mutex::new(Some(blocker)));
        let held = Arc::clone(&blocker);
        let result = writer.exec(move |c| {
            // Were this write run anyway, the lock would be free for it to commit.
            if let Some(b) = held.lock().unwrap().take() {
                b.execute_batch("COMMIT")?;
            }
            c.execute("INSERT INTO t VALUES (1)", [])
        });
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("cannot begin a write transaction") && err.contains("locked"),
            "the cause reaches the caller: {err}"
        );
        if let Some(b) = blocker.lock().unwrap().take() {
            b.execute_batch("COMMIT").unwrap();
        }

        // What was reported failed is not stored, and the writer goes on.
        writer
            .exec(|c| c.execute("INSERT INTO t VALUES (2)", []))
            .unwrap();
        let rows: Vec<i64> = setup
            .prepare("SELECT x FROM t ORDER BY x")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, vec![2]);
    }
}
