//! Watching a run as it happens: a task polls the store and the step log files and
//! sends what is new (steps starting and ending, output, the run's end) to one reader.
//! Reading plain files means a slow reader never slows a step: the step writes its log
//! whatever the reader does, and the reader catches up from the file. A quiet stretch
//! (a silent step, a run still queued) gets keep-alives, so that proxies and clients
//! that drop idle connections keep the reader connected; a daemon stop ends the
//! stream, so that it does not hold the stop's HTTP drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::state::AppState;
use crate::store::{Run, Step, StepStatus};

/// How often the store and the log files are looked at.
const POLL: Duration = Duration::from_millis(200);
/// The most output sent in one update.
const CHUNK: usize = 16 * 1024;
/// The longest a reader goes without an update: well under the idle limits of common
/// proxies and load balancers (often 30 or 60 s), and under the 15 s README promises.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// What changed.
#[derive(Debug, Clone)]
pub enum Update {
    StepStarted(Step),
    Output {
        step: i64,
        bytes: Vec<u8>,
    },
    StepFinished(Step),
    RunFinished(Run),
    /// Nothing new for [`KEEP_ALIVE`]: the reader still hears from the daemon.
    KeepAlive,
    /// The daemon is stopping and the stream ends here, before the run did (it is
    /// shown as it was last seen).
    Stopping(Run),
}

/// Starts following run `id` (current attempt). The receiver ends after
/// `RunFinished` or `Stopping`, or when the run disappears; dropping it stops the task.
pub fn follow(state: Arc<AppState>, id: i64) -> mpsc::Receiver<Update> {
    spawn(state, id).0
}

fn spawn(state: Arc<AppState>, id: i64) -> (mpsc::Receiver<Update>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        if let Err(e) = watch(&state, id, &tx).await {
            tracing::debug!(run = id, error = %e, "follower ended");
        }
    });
    (rx, task)
}

async fn watch(state: &AppState, id: i64, tx: &mpsc::Sender<Update>) -> Result<(), String> {
    let mut stopping = state.stopping();
    let mut tx = ToReader {
        tx,
        last: Instant::now(),
    };
    let tx = &mut tx;
    let mut offsets: Vec<u64> = Vec::new();
    let mut started: Vec<bool> = Vec::new();
    let mut finished: Vec<bool> = Vec::new();
    loop {
        let store = Arc::clone(&state.store);
        let (run, steps) = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let run = store.run(id).map_err(|e| e.to_string())?;
            let steps = store.steps(id).map_err(|e| e.to_string())?;
            Ok((run, steps))
        })
        .await
        .map_err(|e| e.to_string())??;
        let Some(run) = run else {
            return Ok(());
        };
        offsets.resize(steps.len(), 0);
        started.resize(steps.len(), false);
        finished.resize(steps.len(), false);
        let done = run.status.is_final();
        for (i, step) in steps.iter().enumerate() {
            let reached = !matches!(step.status, StepStatus::Pending);
            if reached && step.started_at.is_some() && !started[i] {
                started[i] = true;
                tx.send(Update::StepStarted(step.clone())).await?;
            }
            if started[i] {
                let path = state.log_path(id, step.number);
                loop {
                    let bytes = read_from(&path, offsets[i]).await;
                    if bytes.is_empty() {
                        break;
                    }
                    offsets[i] += bytes.len() as u64;
                    tx.send(Update::Output {
                        step: step.number,
                        bytes,
                    })
                    .await?;
                }
            }
            let ended = !matches!(step.status, StepStatus::Pending | StepStatus::Running);
            if ended && started[i] && !finished[i] {
                finished[i] = true;
                tx.send(Update::StepFinished(step.clone())).await?;
            }
        }
        if done {
            return tx.send(Update::RunFinished(run)).await;
        }
        if tx.last.elapsed() >= KEEP_ALIVE {
            tx.send(Update::KeepAlive).await?;
        }
        // A reader that went away while nothing was new is noticed here, not only at the
        // next send: a quiet step could otherwise keep this task polling for hours.
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = tx.tx.closed() => return Err("reader went away".to_owned()),
            () = stopped(&mut stopping) => return tx.send(Update::Stopping(run)).await,
        }
    }
}

async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // The sender lives in the state this task holds: it cannot go away first.
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// The channel to the reader, and when the reader was last sent anything.
struct ToReader<'a> {
    tx: &'a mpsc::Sender<Update>,
    last: Instant,
}

impl ToReader<'_> {
    async fn send(&mut self, update: Update) -> Result<(), String> {
        self.tx
            .send(update)
            .await
            .map_err(|_| "reader went away".to_owned())?;
        self.last = Instant::now();
        Ok(())
    }
}

/// Up to `CHUNK` bytes of `path` from `offset` (nothing when it does not exist yet).
async fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = vec![0; CHUNK];
    match file.read(&mut buf).await {
        Ok(n) => {
            buf.truncate(n);
            buf
        }
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EnvSource, FileConfig, Overrides};
    use crate::pipeline::PipelineSet;
    use crate::store::{NewRun, OnInterrupt, Store, Supersede};

    struct NoEnv;

    impl EnvSource for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }

    #[tokio::test]
    async fn the_follower_stops_when_its_reader_is_gone_while_the_run_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let flags = Overrides {
            state_dir: Some(dir.path().to_path_buf()),
            ..Overrides::default()
        };
        let config = Config::build(FileConfig::default(), flags, &NoEnv).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = store
            .create_run(NewRun {
                key: None,
                group: None,
                supersede: Supersede::Nothing,
                supersede_own_ref: false,
                generation: 1,
                pipeline: "ci".into(),
                repo: "o/r".into(),
                git_ref: "refs/heads/main".into(),
                commit: "c".repeat(40),
                before: "b".repeat(40),
                clone_url: "/nowhere".into(),
                trigger: "manual",
                skipped: None,
            })
            .unwrap();
        // Running, with a step that never writes a byte: nothing for the follower to send.
        assert_eq!(store.claim_next().unwrap().map(|r| r.id), Some(run.id));
        store
            .plan_steps(run.id, vec!["quiet".into()], OnInterrupt::Retry)
            .unwrap();
        store.step_started(run.id, 1).unwrap();
        let state = Arc::new(AppState::new(
            config,
            Arc::new(store),
            PipelineSet::new(Vec::new()),
        ));

        let (mut rx, task) = spawn(Arc::clone(&state), run.id);
        assert!(matches!(rx.recv().await, Some(Update::StepStarted(_))));
        drop(rx);
        // Without noticing the reader is gone it would poll until the run ends, never here.
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the follower kept polling for a reader that is gone")
            .unwrap();
        assert_eq!(
            state.store.run(run.id).unwrap().unwrap().status,
            crate::store::RunStatus::Running
        );
    }
}
