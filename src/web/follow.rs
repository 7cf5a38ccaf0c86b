//! Watching a run as it happens: a follower sends one reader what is new (steps
//! starting and ending, output, the run's end), taking it from the run event stream.
//! The store and the log files stay the source of truth: a follower first catches up
//! from them, then follows the events, dropping what it has seen already (output
//! carries its offset in the log); a follower that fell behind the events reads the
//! store and the files again instead of losing anything. Reading the files means a
//! slow reader never slows a step: the step writes its log whatever the reader does.
//!
//! All followers of a run share one feed: a single router subscribes to the stream and
//! hands each run's events to that run's followers only. With logs shared between
//! instances, the run may be another instance's, whose events never come here: the
//! router also hears the store's news of each run's log ([`Store::log_notices`],
//! PostgreSQL's NOTIFY) and has that run's followers read the store again, at once,
//! several pieces of news at a time when they come faster than it reads; a slow look
//! at the store stands in for news that was lost. The runs tables' feed
//! ([`watch_runs`]) takes every run's queueing, start and end from the stream itself. At most [`MAX_FOLLOWERS`]
//! follow at once. A quiet stretch (a silent step, a run still queued) gets
//! keep-alives, so that proxies and clients that drop idle connections keep the reader
//! connected; a daemon stop ends the stream, so that it does not hold the stop's HTTP
//! drain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::run::events::{self, Events, RecvError, RunEvent};
use crate::state::AppState;
use crate::store::{LogNotice, Run, Step, StepStatus, Store};
use crate::web::logs::StepLog;

/// The most output sent in one update.
const CHUNK: usize = 16 * 1024;
/// How often a follower looks at a store that shares logs without news of its run:
/// only in case news was lost (the store's notices carry it; see [`Followers`]).
const FALLBACK_LOOK: Duration = Duration::from_secs(2);
/// The longest a reader goes without an update: well under the idle limits of common
/// proxies and load balancers (often 30 or 60 s), and under the 15 s README promises.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// The most followers (log and event streams together) at once: each holds a
/// connection, a task and a buffer of events, and a dashboard left open by many people
/// must not hold the daemon's memory and descriptors.
pub const MAX_FOLLOWERS: usize = 256;
/// How many events one run's followers may fall behind before they re-read.
const FEED_CAPACITY: usize = 1024;

/// A reader's place in a run's step logs: how many bytes of each step's log it has.
/// Written `STEP:BYTES` pairs joined by commas (`1:2048,2:0`): a run page's `from` of
/// `/api/runs/{id}/events`, and the id of each event there, so that a browser that
/// reconnects (sending it back as `Last-Event-ID`) goes on where it was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(std::collections::BTreeMap<i64, u64>);

impl Cursor {
    pub fn parse(text: &str) -> Result<Cursor, String> {
        let mut at = std::collections::BTreeMap::new();
        for pair in text.split(',').filter(|p| !p.is_empty()) {
            let parsed = pair.split_once(':').and_then(|(step, bytes)| {
                Some((step.parse::<i64>().ok()?, bytes.parse::<u64>().ok()?))
            });
            match parsed {
                Some((step, bytes)) if step >= 1 => {
                    at.insert(step, bytes);
                }
                _ => return Err(format!("{pair:?} is not STEP:BYTES (as in 1:2048)")),
            }
        }
        Ok(Cursor(at))
    }

    /// The reader has step `number`'s log up to `bytes`.
    pub fn set(&mut self, number: i64, bytes: u64) {
        self.0.insert(number, bytes);
    }

    pub fn get(&self, number: i64) -> Option<u64> {
        self.0.get(&number).copied()
    }

    /// The places in steps 1 to `steps` only.
    pub fn within(mut self, steps: i64) -> Cursor {
        self.0.retain(|number, _| *number <= steps);
        self
    }

    pub fn pairs(&self) -> Vec<(i64, u64)> {
        self.0.iter().map(|(n, b)| (*n, *b)).collect()
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, bytes)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{step}:{bytes}")?;
        }
        Ok(())
    }
}

/// What changed.
#[derive(Debug, Clone)]
pub enum Update {
    StepStarted(Step),
    Output {
        step: i64,
        bytes: Bytes,
        /// Where these bytes end in the step's log: a reader that comes back asks to
        /// follow from there.
        end: u64,
    },
    StepFinished(Step),
    RunFinished(Run),
    /// Nothing new for [`KEEP_ALIVE`]: the reader still hears from the daemon.
    KeepAlive,
    /// The daemon is stopping and the stream ends here, before the run did (it is
    /// shown as it was last seen).
    Stopping(Run),
}

#[derive(Debug, thiserror::Error)]
#[error("too many followers: at most {MAX_FOLLOWERS} logs and event streams are followed at once; try again later")]
pub struct TooManyFollowers;

/// Starts following run `id` (current attempt). The receiver ends after
/// `RunFinished` or `Stopping`, or when the run disappears; dropping it stops the
/// follower.
pub fn follow(state: Arc<AppState>, id: i64) -> Result<mpsc::Receiver<Update>, TooManyFollowers> {
    spawn(state, id, &[]).map(|(rx, _)| rx)
}

/// Like [`follow`], for a reader that has the start of some steps' logs already:
/// `(step number, bytes)` pairs. Those steps' starts are not sent again, and their
/// output only from where the reader is.
pub fn follow_from(
    state: Arc<AppState>,
    id: i64,
    shown: &[(i64, u64)],
) -> Result<mpsc::Receiver<Update>, TooManyFollowers> {
    spawn(state, id, shown).map(|(rx, _)| rx)
}

fn spawn(
    state: Arc<AppState>,
    id: i64,
    shown: &[(i64, u64)],
) -> Result<(mpsc::Receiver<Update>, JoinHandle<()>), TooManyFollowers> {
    let mut steps = Vec::new();
    for &(number, offset) in shown {
        let Some(i) = index(number) else { continue };
        if steps.len() <= i {
            steps.resize(i + 1, Sent::default());
        }
        steps[i] = Sent {
            started: true,
            finished: false,
            offset,
        };
    }
    // Joined here, before the follower's first look at the store and the files: what
    // that look misses arrives on the feed.
    let feed = state.followers.join(&state.events, &*state.store, id)?;
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        let mut follower = Follower {
            state: &state,
            id,
            tx: ToReader {
                tx: &tx,
                last: Instant::now(),
            },
            run: None,
            steps,
        };
        if let Err(e) = follower.follow(feed).await {
            tracing::debug!(run = id, error = %e, "follower ended");
        }
    });
    Ok((rx, task))
}

/// What a run's followers get from the router.
#[derive(Debug, Clone)]
enum Feed {
    Event(Arc<RunEvent>),
    /// The router fell behind the stream: events of this run may be missing.
    Lagged,
}

/// The runs being followed, each with its feed; and how many follow.
pub struct Followers {
    feeds: Arc<Mutex<Feeds>>,
    /// [`FALLBACK_LOOK`], but in tests that show what the store's news does alone.
    fallback: Duration,
}

impl Default for Followers {
    fn default() -> Followers {
        Followers {
            feeds: Arc::default(),
            fallback: FALLBACK_LOOK,
        }
    }
}

#[derive(Default)]
struct Feeds {
    runs: HashMap<i64, RunFeed>,
    followers: usize,
    routing: bool,
}

/// One run's feed: its events, and a mark set at each piece of the store's news of it
/// (a mark set again before a follower looked is one look).
struct RunFeed {
    events: broadcast::Sender<Feed>,
    stored: watch::Sender<()>,
}

impl RunFeed {
    fn new() -> RunFeed {
        RunFeed {
            events: broadcast::Sender::new(FEED_CAPACITY),
            stored: watch::Sender::new(()),
        }
    }
}

fn lock(feeds: &Mutex<Feeds>) -> std::sync::MutexGuard<'_, Feeds> {
    // Plain counters and senders: consistent whoever panicked holding the lock.
    feeds.lock().unwrap_or_else(|e| e.into_inner())
}

impl Followers {
    /// How many follow now.
    pub fn count(&self) -> usize {
        lock(&self.feeds).followers
    }

    /// A place among the followers of run `id`, with the run's feed. The router
    /// starts with the first follower (it needs the async runtime).
    fn join(
        &self,
        events: &Events,
        store: &dyn Store,
        id: i64,
    ) -> Result<Subscription, TooManyFollowers> {
        let mut feeds = lock(&self.feeds);
        if feeds.followers >= MAX_FOLLOWERS {
            return Err(TooManyFollowers);
        }
        if !feeds.routing {
            feeds.routing = true;
            tokio::spawn(route(
                events.subscribe(),
                store.log_notices(),
                Arc::clone(&self.feeds),
            ));
        }
        let feed = feeds.runs.entry(id).or_insert_with(RunFeed::new);
        let (rx, stored) = (feed.events.subscribe(), feed.stored.subscribe());
        feeds.followers += 1;
        Ok(Subscription {
            rx,
            stored,
            _place: Place {
                id,
                feeds: Arc::clone(&self.feeds),
            },
        })
    }
}

impl Followers {
    /// A place among the followers for a reader of every run's changes.
    fn seat(&self) -> Result<Seat, TooManyFollowers> {
        let mut feeds = lock(&self.feeds);
        if feeds.followers >= MAX_FOLLOWERS {
            return Err(TooManyFollowers);
        }
        feeds.followers += 1;
        Ok(Seat(Arc::clone(&self.feeds)))
    }
}

/// A place taken by [`watch_runs`]; freed on drop.
struct Seat(Arc<Mutex<Feeds>>);

impl Drop for Seat {
    fn drop(&mut self) {
        lock(&self.0).followers -= 1;
    }
}

/// What changed among all runs, for the runs tables.
#[derive(Debug, Clone)]
pub enum RunsUpdate {
    /// A run was queued, started or ended: as it is now.
    Run(Box<Run>),
    /// The reader fell behind the events: changes were missed, look at the store.
    Lagged,
    KeepAlive,
    /// The daemon is stopping and the stream ends here.
    Stopping,
}

/// Follows every run's queueing, start and end (not steps or output): the runs tables'
/// feed. Takes a place among the followers, like a log does.
pub fn watch_runs(state: Arc<AppState>) -> Result<mpsc::Receiver<RunsUpdate>, TooManyFollowers> {
    let seat = state.followers.seat()?;
    let mut events = state.events.subscribe();
    let mut stopping = state.stopping();
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let _seat = seat;
        let mut last = Instant::now();
        loop {
            let update = tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => match &*event {
                        RunEvent::Queued(run) | RunEvent::Started(run) | RunEvent::Finished { run, .. } => {
                            RunsUpdate::Run(Box::new(run.clone()))
                        }
                        _ => continue,
                    },
                    Err(RecvError::Lagged(_)) => RunsUpdate::Lagged,
                    Err(RecvError::Closed) => return,
                },
                () = tokio::time::sleep_until(last + KEEP_ALIVE) => RunsUpdate::KeepAlive,
                () = tx.closed() => return,
                () = stopped(&mut stopping) => {
                    let _ = tx.send(RunsUpdate::Stopping).await;
                    return;
                }
            };
            if tx.send(update).await.is_err() {
                return;
            }
            last = Instant::now();
        }
    });
    Ok(rx)
}

/// Hands each event to the followers of its run, and marks the runs the store has
/// news of.
async fn route(
    mut events: events::Receiver,
    mut notices: Option<broadcast::Receiver<LogNotice>>,
    feeds: Arc<Mutex<Feeds>>,
) {
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => {
                    if let Some(feed) = lock(&feeds).runs.get(&event.run_id()) {
                        let _ = feed.events.send(Feed::Event(event));
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "live-log followers fell behind the run events; they read the store and the logs again"
                    );
                    for feed in lock(&feeds).runs.values() {
                        let _ = feed.events.send(Feed::Lagged);
                    }
                }
                Err(RecvError::Closed) => {
                    lock(&feeds).routing = false;
                    return;
                }
            },
            notice = next_notice(&mut notices) => match notice {
                Some(LogNotice::Run(id)) => {
                    if let Some(feed) = lock(&feeds).runs.get(&id) {
                        feed.stored.send_replace(());
                    }
                }
                Some(LogNotice::Missed) => {
                    for feed in lock(&feeds).runs.values() {
                        feed.stored.send_replace(());
                    }
                }
                // The store's news ended with its listener: the slow look goes on.
                None => notices = None,
            },
        }
    }
}

/// The store's next news; `Missed` after falling behind it; `None` when it has ended;
/// never, without any.
async fn next_notice(notices: &mut Option<broadcast::Receiver<LogNotice>>) -> Option<LogNotice> {
    let Some(rx) = notices else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Ok(notice) => Some(notice),
        Err(broadcast::error::RecvError::Lagged(_)) => Some(LogNotice::Missed),
        Err(broadcast::error::RecvError::Closed) => None,
    }
}

/// One follower's feed and place.
struct Subscription {
    rx: broadcast::Receiver<Feed>,
    /// Changed when the store has news of the run.
    stored: watch::Receiver<()>,
    // Dropped after `rx` (fields drop in order), so it finds the feed's receivers
    // without this one.
    _place: Place,
}

/// Leaving frees the place, and the run's feed with its last follower.
struct Place {
    id: i64,
    feeds: Arc<Mutex<Feeds>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut feeds = lock(&self.feeds);
        feeds.followers -= 1;
        if feeds
            .runs
            .get(&self.id)
            .is_some_and(|feed| feed.events.receiver_count() == 0)
        {
            feeds.runs.remove(&self.id);
        }
    }
}

/// What the reader has been sent of one step.
#[derive(Debug, Clone, Default)]
struct Sent {
    started: bool,
    finished: bool,
    /// How much of the step's log.
    offset: u64,
}

struct Follower<'a> {
    state: &'a AppState,
    id: i64,
    tx: ToReader<'a>,
    /// The run as last seen.
    run: Option<Run>,
    /// By step number - 1.
    steps: Vec<Sent>,
}

/// Whether the stream is over.
type Ended = bool;

impl Follower<'_> {
    async fn follow(&mut self, mut feed: Subscription) -> Result<(), String> {
        let mut stopping = self.state.stopping();
        if self.sync().await? {
            return Ok(());
        }
        // With logs shared between instances, the run may be another instance's, whose
        // events never come here: its news comes from the store, and in case some was
        // lost, the store is looked at again this often anyway.
        let mut look = self.state.store.shares_logs().then(|| {
            let period = self.state.followers.fallback;
            tokio::time::interval_at(Instant::now() + period, period)
        });
        loop {
            let tx = self.tx.tx;
            let quiet_until = self.tx.last + KEEP_ALIVE;
            tokio::select! {
                item = feed.rx.recv() => {
                    let ended = match item {
                        Ok(Feed::Event(event)) => self.apply(&event).await?,
                        Ok(Feed::Lagged) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            tracing::debug!(run = self.id, "follower fell behind: reading the store and the logs again");
                            self.sync().await?
                        }
                        // The feed's sender goes only with this subscription.
                        Err(broadcast::error::RecvError::Closed) => return Err("the run's feed ended".into()),
                    };
                    if ended {
                        return Ok(());
                    }
                }
                () = tokio::time::sleep_until(quiet_until) => self.tx.send(Update::KeepAlive).await?,
                // The router, which holds the sender, lives as long as the feed does.
                Ok(()) = feed.stored.changed() => {
                    // This instance's own runs are followed through their events.
                    if !self.state.running.executing().contains(&self.id) && self.sync().await? {
                        return Ok(());
                    }
                }
                _ = tick(&mut look) => {
                    if self.sync().await? {
                        return Ok(());
                    }
                }
                // A reader that went away while nothing was new is noticed here, not only
                // at the next send: a quiet step could otherwise keep this follower for hours.
                () = tx.closed() => return Err("reader went away".to_owned()),
                () = stopped(&mut stopping) => {
                    return match self.run.clone() {
                        Some(run) => self.tx.send(Update::Stopping(run)).await,
                        None => Ok(()),
                    };
                }
            }
        }
    }

    /// Catches up from the store and the log files: at the start, and after falling
    /// behind the events.
    async fn sync(&mut self) -> Result<Ended, String> {
        let (store, id) = (Arc::clone(&self.state.store), self.id);
        let (run, steps) = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let run = store.run(id).map_err(|e| e.to_string())?;
            let steps = store.steps(id).map_err(|e| e.to_string())?;
            Ok((run, steps))
        })
        .await
        .map_err(|e| e.to_string())??;
        let Some(run) = run else {
            return Ok(true);
        };
        // The attempt whose logs the steps have.
        self.run = Some(run.clone());
        for step in &steps {
            self.advance(step).await?;
        }
        self.seen(run).await
    }

    async fn apply(&mut self, event: &RunEvent) -> Result<Ended, String> {
        match event {
            RunEvent::Queued(_) => {}
            RunEvent::Started(run) => self.run = Some(run.clone()),
            RunEvent::StepStarted { step, .. } | RunEvent::StepFinished { step, .. } => {
                self.advance(step).await?;
            }
            RunEvent::Output {
                step,
                offset,
                bytes,
                ..
            } => self.output(*step, *offset, bytes).await?,
            RunEvent::Finished { run, steps } => {
                for step in steps {
                    self.advance(step).await?;
                }
                return self.seen(run.clone()).await;
            }
        }
        Ok(false)
    }

    /// Sends what is new of `step` as the store has it: its start, its log up to what the
    /// file holds, its end.
    async fn advance(&mut self, step: &Step) -> Result<(), String> {
        let Some(i) = index(step.number) else {
            return Ok(());
        };
        if self.steps.len() <= i {
            self.steps.resize(i + 1, Sent::default());
        }
        let reached = !matches!(step.status, StepStatus::Pending) && step.started_at.is_some();
        if reached && !self.steps[i].started {
            self.steps[i].started = true;
            self.tx.send(Update::StepStarted(step.clone())).await?;
        }
        if self.steps[i].started {
            self.catch_up(step.number, i).await?;
        }
        let ended = !matches!(step.status, StepStatus::Pending | StepStatus::Running);
        if ended && self.steps[i].started && !self.steps[i].finished {
            self.steps[i].finished = true;
            self.tx.send(Update::StepFinished(step.clone())).await?;
        }
        Ok(())
    }

    /// Sends the part of a published piece of output that the reader has not had.
    async fn output(&mut self, number: i64, offset: u64, bytes: &Bytes) -> Result<(), String> {
        let Some(i) = index(number).filter(|i| self.steps.get(*i).is_some_and(|s| s.started))
        else {
            // Its step's start, when it comes, reads the file from the beginning.
            return Ok(());
        };
        if offset > self.steps[i].offset {
            // Pieces went missing: the file holds them (it is written before publishing).
            self.catch_up(number, i).await?;
        }
        let have = self.steps[i].offset;
        let end = offset + bytes.len() as u64;
        if end <= have || offset > have {
            return Ok(());
        }
        self.steps[i].offset = end;
        let fresh = bytes.slice((have - offset) as usize..);
        self.tx
            .send(Update::Output {
                step: number,
                bytes: fresh,
                end,
            })
            .await
    }

    /// Sends step `number`'s log from where the reader is to its end so far: of the file,
    /// or of what the store has when another instance runs the step.
    async fn catch_up(&mut self, number: i64, i: usize) -> Result<(), String> {
        let path = self.state.log_path(self.id, number);
        let (store, id, attempt) = (
            Arc::clone(&self.state.store),
            self.id,
            self.run.as_ref().map_or(1, |r| r.attempt),
        );
        loop {
            let offset = self.steps[i].offset;
            let (path, store) = (path.clone(), Arc::clone(&store));
            let bytes = tokio::task::spawn_blocking(move || {
                let log = StepLog {
                    store: &*store,
                    path: &path,
                    run: id,
                    attempt,
                    step: number,
                };
                log.read_at(offset, CHUNK)
            })
            .await
            .map_err(|e| e.to_string())?
            // As before the store kept logs: what cannot be read now is read at the next look.
            .unwrap_or_default()
            .unwrap_or_default();
            if bytes.is_empty() {
                return Ok(());
            }
            self.steps[i].offset += bytes.len() as u64;
            self.tx
                .send(Update::Output {
                    step: number,
                    bytes: bytes.into(),
                    end: self.steps[i].offset,
                })
                .await?;
        }
    }

    /// Notes the run as it is now; sends its end if it has ended.
    async fn seen(&mut self, run: Run) -> Result<Ended, String> {
        let ended = run.status.is_final();
        if ended {
            self.tx.send(Update::RunFinished(run.clone())).await?;
        }
        self.run = Some(run);
        Ok(ended)
    }
}

/// A step's place in the list: numbers start at 1.
fn index(number: i64) -> Option<usize> {
    usize::try_from(number.checked_sub(1)?).ok()
}

/// The next tick of `look`; never, without one.
async fn tick(look: &mut Option<tokio::time::Interval>) {
    match look {
        Some(look) => {
            look.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // The sender lives in the state this follower holds: it cannot go away first.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EnvSource, FileConfig, Overrides};
    use crate::pipeline::PipelineSet;
    use crate::store::{NewRun, OnInterrupt, RunStatus, Sqlite, StepEnd, Store, Supersede};

    struct NoEnv;

    impl EnvSource for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }

    /// A daemon's state whose store holds one run, running, with `steps` steps of which
    /// the first has started (and is silent so far); the run's id.
    fn running_step(dir: &std::path::Path, steps: usize) -> (Arc<AppState>, i64) {
        let flags = Overrides {
            state_dir: Some(dir.to_path_buf()),
            ..Overrides::default()
        };
        let config = Config::build(FileConfig::default(), flags, &NoEnv).unwrap();
        let store: Arc<dyn Store> = Arc::new(Sqlite::open(dir).unwrap());
        let run = store.create_run(manual_run()).unwrap();
        assert_eq!(store.claim_next().unwrap().map(|r| r.id), Some(run.id));
        store
            .plan_steps(
                run.id,
                (1..=steps).map(|n| format!("step {n}")).collect(),
                OnInterrupt::Retry,
            )
            .unwrap();
        store.step_started(run.id, 1).unwrap();
        let state = Arc::new(AppState::new(config, store, PipelineSet::new(Vec::new())));
        (state, run.id)
    }

    /// A run of pipeline `ci` started by hand, for a store to claim.
    fn manual_run() -> NewRun {
        NewRun {
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
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_reads_another_instances_step_at_the_stores_news_of_it() {
        let db = crate::store::postgres::Scratch::from_env().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap();
        let open = |instance: &str| {
            let lease = std::time::Duration::from_secs(15);
            crate::store::open(Some(db.target()), dir.path(), instance, lease).unwrap()
        };
        let (runner, here) = (open("runner"), open("here"));
        let run = runner.create_run(manual_run()).unwrap();
        let id = run.id;
        assert_eq!(runner.claim_next().unwrap().map(|r| r.id), Some(id));
        runner
            .plan_steps(id, vec!["talk".into()], OnInterrupt::Retry)
            .unwrap();
        let flags = Overrides {
            state_dir: Some(dir.path().join("here")),
            ..Overrides::default()
        };
        let config = Config::build(FileConfig::default(), flags, &NoEnv).unwrap();
        let mut state = AppState::new(config, here, PipelineSet::new(Vec::new()));
        // Nothing but the store's news can tell this follower of the step in time.
        state.followers.fallback = Duration::from_secs(24 * 3600);
        let state = Arc::new(state);
        let (mut rx, _task) = spawn(Arc::clone(&state), id, &[]).unwrap();
        // A deadline for each update only, far above any delivery of one; keep-alives
        // do not count.
        let next = async |rx: &mut mpsc::Receiver<Update>| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .expect("the follower heard nothing of the other instance's step")
                    .expect("the follower ended")
                {
                    Update::KeepAlive => continue,
                    update => return update,
                }
            }
        };

        // Each change the running instance stores reaches the follower here: the
        // step's start, each piece of its output, its end and the run's.
        let step = tokio::task::block_in_place(|| runner.step_started(id, 1).unwrap());
        assert!(step.is_some());
        assert!(matches!(next(&mut rx).await, Update::StepStarted(s) if s.number == 1));
        let mut at = 0u64;
        for line in ["first line\n", "second line\n"] {
            tokio::task::block_in_place(|| {
                runner
                    .append_log(crate::store::LogPiece {
                        run: id,
                        attempt: 1,
                        step: 1,
                        at,
                        bytes: line.as_bytes().to_vec(),
                    })
                    .unwrap()
            });
            at += line.len() as u64;
            match next(&mut rx).await {
                Update::Output {
                    step: 1,
                    bytes,
                    end,
                } => {
                    assert_eq!((&bytes[..], end), (line.as_bytes(), at));
                }
                other => panic!("{other:?} instead of {line:?}"),
            }
        }
        tokio::task::block_in_place(|| {
            let end = StepEnd {
                status: StepStatus::Succeeded,
                exit_code: Some(0),
                signal: None,
                reason: None,
            };
            runner.step_finished(id, 1, end).unwrap();
        });
        assert!(matches!(next(&mut rx).await, Update::StepFinished(s) if s.number == 1));
        tokio::task::block_in_place(|| {
            runner
                .finish_run(id, RunStatus::Succeeded, None, StepStatus::Skipped)
                .unwrap()
        });
        assert!(
            matches!(next(&mut rx).await, Update::RunFinished(r) if r.status == RunStatus::Succeeded)
        );
        assert!(rx.recv().await.is_none(), "the stream ends with the run");
    }

    #[test]
    fn a_cursor_reads_back_what_it_writes_and_refuses_what_is_not_one() {
        for (text, written) in [
            ("", ""),
            ("1:0", "1:0"),
            ("2:5,1:2048", "1:2048,2:5"),
            ("1:3,,2:4,", "1:3,2:4"),
        ] {
            let cursor = Cursor::parse(text).unwrap();
            assert_eq!(cursor.to_string(), written, "{text}");
            assert_eq!(Cursor::parse(written).unwrap(), cursor);
        }
        for bad in ["1", "one:2", "1:-2", "0:5", "-1:5", "1:2:3", "1:x"] {
            assert!(Cursor::parse(bad).is_err(), "{bad}");
        }
        let cursor = Cursor::parse("1:5,3:7,9:1").unwrap().within(3);
        assert_eq!(cursor.pairs(), [(1, 5), (3, 7)]);
    }

    #[tokio::test]
    async fn the_follower_stops_when_its_reader_is_gone_while_the_run_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (state, id) = running_step(dir.path(), 1);

        let (mut rx, task) = spawn(Arc::clone(&state), id, &[]).unwrap();
        assert!(matches!(rx.recv().await, Some(Update::StepStarted(_))));
        drop(rx);
        // Without noticing the reader is gone it would wait until the run ends, never here.
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the follower kept going for a reader that is gone")
            .unwrap();
        assert_eq!(
            state.store.run(id).unwrap().unwrap().status,
            RunStatus::Running
        );
        assert_eq!(state.followers.count(), 0, "its place is free again");
    }

    #[tokio::test]
    async fn a_follower_that_fell_behind_the_events_reads_the_store_and_log_again() {
        let dir = tempfile::tempdir().unwrap();
        let (state, id) = running_step(dir.path(), 2);
        let (mut rx, _task) = spawn(Arc::clone(&state), id, &[]).unwrap();
        // It has looked at the store and the (empty) log, and waits for events.
        assert!(matches!(rx.recv().await, Some(Update::StepStarted(s)) if s.number == 1));

        // Step 1 ends, step 2 starts and is far noisier than the follower is quick: this
        // runtime has one thread, so neither the router nor the follower runs until the
        // test awaits, and both fall behind by more than their channels hold. The
        // oldest events are lost: step 1's end, step 2's start, its first lines.
        let succeeded = || StepEnd {
            status: StepStatus::Succeeded,
            exit_code: Some(0),
            signal: None,
            reason: None,
        };
        let step = state.store.step_finished(id, 1, succeeded()).unwrap();
        let step = step.unwrap();
        state
            .events
            .publish(RunEvent::StepFinished { run: id, step });
        let step = state.store.step_started(id, 2).unwrap().unwrap();
        state.events.publish(RunEvent::StepStarted {
            run: id,
            step,
            timings: None,
        });
        let path = state.log_path(id, 2);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut log = std::fs::File::create(&path).unwrap();
        let tap = state.events.output_of(id, 2);
        let mut offset = 0u64;
        for i in 0..events::CAPACITY + FEED_CAPACITY + 100 {
            let line = format!("line {i}\n");
            std::io::Write::write_all(&mut log, line.as_bytes()).unwrap();
            tap.written(offset, Bytes::from(line.clone()));
            offset += line.len() as u64;
        }
        let written = std::fs::read_to_string(&path).unwrap();

        // While the run goes on, all of it arrives, each byte once and in order.
        let next = async |rx: &mut mpsc::Receiver<Update>| {
            tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("the follower stalled")
                .expect("the follower ended")
        };
        assert!(
            matches!(next(&mut rx).await, Update::StepFinished(s) if s.number == 1),
            "step 1's end"
        );
        assert!(
            matches!(next(&mut rx).await, Update::StepStarted(s) if s.number == 2),
            "step 2's start"
        );
        let mut output = Vec::new();
        while output.len() < written.len() {
            match next(&mut rx).await {
                Update::Output { step: 2, bytes, .. } => output.extend_from_slice(&bytes),
                other => panic!("{other:?} after {} bytes", output.len()),
            }
        }
        assert_eq!(String::from_utf8(output).unwrap(), written);

        let step = state.store.step_finished(id, 2, succeeded()).unwrap();
        let step = step.unwrap();
        state
            .events
            .publish(RunEvent::StepFinished { run: id, step });
        let (run, steps) = state
            .store
            .finish_run(id, RunStatus::Succeeded, None, StepStatus::Skipped)
            .unwrap()
            .unwrap();
        state.events.publish(RunEvent::Finished { run, steps });
        assert!(matches!(next(&mut rx).await, Update::StepFinished(s) if s.number == 2));
        assert!(
            matches!(next(&mut rx).await, Update::RunFinished(r) if r.status == RunStatus::Succeeded)
        );
        assert!(rx.recv().await.is_none(), "the stream ends with the run");
    }

    #[tokio::test]
    async fn followers_are_capped_and_a_place_frees_when_one_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (state, id) = running_step(dir.path(), 1);
        let mut readers: Vec<_> = (0..MAX_FOLLOWERS)
            .map(|_| follow(Arc::clone(&state), id).unwrap())
            .collect();
        assert!(follow(Arc::clone(&state), id).is_err(), "one too many");
        assert_eq!(state.followers.count(), MAX_FOLLOWERS);
        // One feed for all of them.
        assert_eq!(lock(&state.followers.feeds).runs.len(), 1);

        drop(readers.pop());
        let deadline = Instant::now() + Duration::from_secs(30);
        while state.followers.count() == MAX_FOLLOWERS {
            assert!(Instant::now() < deadline, "the place was never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let last = follow(Arc::clone(&state), id).unwrap();

        // All gone: so is the run's feed.
        drop(readers);
        drop(last);
        let deadline = Instant::now() + Duration::from_secs(30);
        while state.followers.count() > 0 {
            assert!(Instant::now() < deadline, "places were never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(lock(&state.followers.feeds).runs.is_empty());
    }
}
