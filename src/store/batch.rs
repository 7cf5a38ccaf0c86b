//! Group commit for intake: one writer thread with its own connection takes every
//! delivery waiting at that moment, records each in a savepoint of one transaction, and
//! commits once. Every caller is answered only after that commit (and its fsync), so
//! a 202 still means "durable", while concurrent deliveries share the cost of a sync.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{connect, record_in, DeliveryOutcome, NewDelivery, Store, StoreError};

/// The most deliveries one transaction takes: bounds the latency of the first in line.
const MAX_BATCH: usize = 512;

struct Job {
    delivery: NewDelivery,
    reply: oneshot::Sender<Result<DeliveryOutcome, StoreError>>,
}

/// Handle to the writer thread; the thread ends when the last handle is dropped.
pub struct DeliveryWriter {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

impl DeliveryWriter {
    /// Starts the writer thread on its own connection to `store`'s database.
    pub fn start(store: &Store) -> Result<DeliveryWriter, StoreError> {
        let path = store.path().to_path_buf();
        let conn = connect(&path).map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let (jobs, rx) = mpsc::channel();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("hookci-intake-writer".into())
            .spawn(move || write_loop(conn, &thread_path, &rx))
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(DeliveryWriter { path, jobs })
    }

    /// Records a delivery and its runs; returns once they are committed and synced.
    pub async fn record(&self, delivery: NewDelivery) -> Result<DeliveryOutcome, StoreError> {
        let gone = || StoreError::Failed {
            path: self.path.clone(),
            message: "the intake writer has stopped".into(),
        };
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { delivery, reply })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn write_loop(mut conn: Connection, path: &Path, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let results = commit_batch(&mut conn, &batch);
        for (job, result) in batch.into_iter().zip(results) {
            let result = result.map_err(|message| StoreError::Failed {
                path: path.to_path_buf(),
                message,
            });
            // The caller may have gone away (client disconnected); the record stands.
            let _ = job.reply.send(result);
        }
    }
}

/// One transaction for the whole batch; a delivery that fails rolls back only its own
/// savepoint. If the commit itself fails, every delivery of the batch fails.
fn commit_batch(conn: &mut Connection, batch: &[Job]) -> Vec<Result<DeliveryOutcome, String>> {
    let mut tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return batch.iter().map(|_| Err(e.to_string())).collect(),
    };
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let outcome = tx.savepoint().and_then(|sp| {
            let outcome = record_in(&sp, &job.delivery)?;
            sp.commit()?;
            Ok(outcome)
        });
        results.push(outcome.map_err(|e| e.to_string()));
    }
    match tx.commit() {
        Ok(()) => results,
        Err(e) => {
            tracing::error!(error = %e, deliveries = batch.len(), "committing a batch of deliveries failed");
            batch
                .iter()
                .map(|_| Err(format!("commit failed: {e}")))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewDecision, NewRun, RunFilter};

    fn delivery(id: &str, key: &str) -> NewDelivery {
        NewDelivery {
            id: id.into(),
            event: "push".into(),
            repo: "o/r".into(),
            git_ref: "refs/heads/main".into(),
            after: "c".repeat(40),
            head: Some("c".repeat(40)),
            clone_url: "/x".into(),
            decisions: vec![NewDecision {
                pipeline: "ci".into(),
                reason: "matched".into(),
                run: Some(NewRun {
                    key: key.into(),
                    pipeline: "ci".into(),
                    repo: "o/r".into(),
                    git_ref: "refs/heads/main".into(),
                    commit: "c".repeat(40),
                    before: "b".repeat(40),
                    clone_url: "/x".into(),
                    trigger: "push",
                    skipped: None,
                }),
            }],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_deliveries_share_batches_and_keep_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let writer = std::sync::Arc::new(DeliveryWriter::start(&store).unwrap());
        let mut tasks = Vec::new();
        for i in 0..200 {
            let w = std::sync::Arc::clone(&writer);
            // 200 deliveries of 50 distinct pushes: 50 runs.
            tasks.push(tokio::spawn(async move {
                w.record(delivery(&format!("d{i}"), &format!("k{}", i % 50)))
                    .await
            }));
        }
        let mut created = 0;
        for t in tasks {
            match t.await.unwrap().unwrap() {
                DeliveryOutcome::New(runs) => {
                    created += runs.iter().filter(|r| !r.existing).count()
                }
                DeliveryOutcome::Duplicate(_) => panic!("distinct delivery ids"),
            }
        }
        assert_eq!(created, 50);
        let again = writer.record(delivery("d7", "k7")).await.unwrap();
        assert!(matches!(again, DeliveryOutcome::Duplicate(_)));
        let runs = store
            .runs(&RunFilter {
                limit: 500,
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(runs.len(), 50);
        // Visible to a fresh connection: committed, not just cached.
        drop(writer);
        let reopened = Store::open(dir.path()).unwrap();
        assert!(reopened.delivery("d199").unwrap().is_some());
    }
}
