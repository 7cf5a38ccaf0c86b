//! Wires the stages together: opens the store, starts the scheduler, serves HTTP on a
//! listener the caller bound, and stops everything in order when `shutdown` resolves.
//! The state the stages share is [`AppState`] (`state`); no stage imports this module.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::Signal;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::config::{Config, ConfigSource};
use crate::intake::error_reply;
use crate::intake::{self, reconcile};
use crate::pipeline::PipelineSet;
use crate::reload;
use crate::report::{self, policy::Policy};
use crate::run::contain::{self, Cgroups};
use crate::run::uids::BuildUids;
use crate::run::user::{self, RunAs};
use crate::run::{lease, runner, scheduler, workspace};
use crate::state::AppState;
use crate::store::{RunStatus, Store, StoreError};
use crate::web::{api, badge, control, forms, http, pages};

/// How long in-flight HTTP requests may take to finish once a stop begins.
const HTTP_DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state directory {path} is not usable (it must be a writable directory): {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {path} is in use by another hookci daemon (it holds {path}/hookci.lock): \
         stop that one first, or give this one another state directory"
    )]
    InUse { path: PathBuf },
    #[error("a startup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("run_as: {0}")]
    RunAs(String),
}

async fn rejection(err: Rejection) -> Result<Response, std::convert::Infallible> {
    Ok(if err.is_not_found() {
        error_reply(StatusCode::NOT_FOUND, "not found")
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        error_reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
    } else if let Some(e) = err.find::<warp::reject::InvalidQuery>() {
        error_reply(StatusCode::BAD_REQUEST, e.to_string())
    } else {
        error_reply(StatusCode::BAD_REQUEST, format!("{err:?}"))
    })
}

/// Takes `state_dir/hookci.lock` for as long as the returned file stays open. Without it
/// a second daemon on the same directory would take the first one's running runs for
/// a dead daemon's, and kill them in its recovery.
///
/// The lock is a POSIX record lock, which belongs to this process alone: a child never
/// holds it, so it ends with the daemon. A `flock` belongs to the open file, which a
/// forked child shares until its exec closes it (std opens every file close-on-exec):
/// a step or git worker caught between fork and exec by a crash held the lock on for a
/// moment after the daemon was gone, and the restart meant to recover its runs found
/// the directory "in use". In return nothing else in the daemon may open and close this
/// file, since closing any descriptor of it drops the lock.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, DaemonError> {
    let dir_err = |source| DaemonError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(state_dir.join("hookci.lock"))
        .map_err(dir_err)?;
    if let Err(error) = lock_whole(file.as_raw_fd()) {
        let held = matches!(error.raw_os_error(), Some(libc::EACCES | libc::EAGAIN));
        return Err(if held {
            DaemonError::InUse {
                path: state_dir.to_path_buf(),
            }
        } else {
            dir_err(error)
        });
    }
    Ok(file)
}

/// A write lock on the whole of the file behind `fd`, refused at once if another process
/// holds one. Async-signal-safe (a test takes it between fork and exit).
fn lock_whole(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: `flock` is a plain C struct, for which all zeroes is a valid value; start 0
    // and length 0 mean the whole file, however long it grows.
    let mut whole: libc::flock = unsafe { std::mem::zeroed() };
    whole.l_type = libc::F_WRLCK as libc::c_short;
    whole.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl takes a descriptor the caller holds open and a pointer to a live
    // `flock` it only reads.
    if unsafe { libc::fcntl(fd, libc::F_SETLK, &whole) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Opens the store and recovers from the previous daemon's end: runs it left running
/// are interrupted, their leftover processes killed and workspaces removed, and every
/// interrupted run is queued again once (its earlier attempt's logs kept apart) unless
/// its pipeline says `interrupted: fail` or it ran out of attempts.
fn open_and_recover(config: &Config, policy: Arc<Policy>) -> Result<Recovered, DaemonError> {
    let state_dir = config.state_dir.as_path();
    let dir_err = |source| DaemonError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(dir_err)?;
    let state_dir = std::fs::canonicalize(state_dir).map_err(dir_err)?;
    // Fail now, with the directory's name, rather than at the first run.
    let probe = state_dir.join(".hookci-write-test");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(dir_err)?;
    let lock = lock_state_dir(&state_dir)?;
    // Before recovery: the cgroups of crashed daemons' runs are ended on the way.
    let cgroups = Cgroups::setup();
    if let Some(who) = &config.run_as {
        // A uid of `run_as_uids` owns no file but what runs made: what is closed to one
        // of them is closed to all.
        let any_uid = config.run_as_uids.map(|range| RunAs {
            uid: range.first,
            ..who.clone()
        });
        let checked = can_switch(who)
            .and_then(|()| secure_state_dir(&state_dir, who))
            .and_then(|()| check_protected(&config.protected, who))
            .and_then(|()| {
                any_uid.map_or(Ok(()), |u| {
                    reachable_state_dir(&state_dir, &u)
                        .and_then(|()| check_protected(&config.protected, &u))
                })
            });
        if let Err(e) = checked {
            cgroups.remove();
            return Err(e);
        }
    }
    let instance = crate::store::instance_id(&state_dir).map_err(dir_err)?;
    // The configured lease from the first claim on: the scheduler may claim before the
    // lease task first looks at the config.
    let store = crate::store::open(
        config.database.as_ref(),
        &state_dir,
        &instance,
        config.lease,
    )?;
    // Before recovery: a run it queues again, or fails, reports that.
    store.set_report_policy(policy);
    // Interrupted, every leftover of this state directory's runs killed (a quick
    // SIGKILL each), and queued again, in that order and at once: with a shared
    // database the interrupt holds the runs for a lease, which the slow part, removing
    // workspaces, must not outlast.
    store.interrupt_running()?;
    runner::kill_leftovers(&state_dir.join("workspaces"));
    let recovered = store.requeue_interrupted()?;
    // Reused workspaces stay (that is their point), closed to the steps' user until a
    // run is handed one. A workspace an update was cut short in is replaced by the next
    // run of its slot, never built from.
    workspace::close_slots(&state_dir.join("workspaces"));
    remove_leftover_workspaces(&state_dir.join("workspaces"));
    remove_leftover_workspaces(&state_dir.join("homes"));
    for recovered in recovered {
        let (id, attempt, status) = (recovered.run, recovered.attempt, recovered.status);
        // A run that ends here keeps its logs where its last attempt's are read from.
        if status == RunStatus::Queued {
            archive_logs(&state_dir.join("logs").join(id.to_string()), attempt);
        }
        if status == RunStatus::Canceled {
            tracing::info!(
                run = id,
                pipeline = %recovered.pipeline,
                attempt,
                "interrupted run canceled: a cancel was asked of it"
            );
        } else {
            tracing::warn!(
                run = id,
                attempt,
                now = status.as_str(),
                "interrupted run recovered"
            );
        }
    }
    // Every process of the range's uids ended before any run takes one: what escaped
    // a crashed daemon's runs (no cgroup held it, and it left their tree) is still its
    // uid's.
    let build_uids = match (&config.run_as, config.run_as_uids) {
        (Some(base), Some(range)) => {
            Some(BuildUids::start(base.clone(), range).map_err(DaemonError::RunAs)?)
        }
        _ => None,
    };
    Ok(Recovered {
        store,
        state_dir,
        lock,
        cgroups,
        build_uids,
    })
}

/// Wakes the scheduler when the store hears of runs another instance queued (a shared
/// database); a store only this daemon writes never says so.
async fn forward_wakeups(state: Arc<AppState>) {
    let wakeups = state.store.wakeups();
    let mut stopping = state.stopping();
    loop {
        tokio::select! {
            () = wakeups.notified() => state.wake.notify_one(),
            _ = stopping.changed() => return,
        }
    }
}

struct Recovered {
    store: Arc<dyn Store>,
    state_dir: PathBuf,
    lock: std::fs::File,
    cgroups: Cgroups,
    build_uids: Option<BuildUids>,
}

/// Whether the daemon may switch users (root, or the capabilities), said with what
/// is missing.
fn can_switch(who: &RunAs) -> Result<(), DaemonError> {
    if user::is_root() {
        return Ok(());
    }
    let missing = user::missing_capabilities();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    Err(DaemonError::RunAs(format!(
        "steps are to run as {}, but hookci runs as uid {uid} without {}: run it as root, or \
         give it these capabilities (systemd: AmbientCapabilities=, see systemd/hookci.service)",
        who.name,
        missing.join(", ")
    )))
}

/// With `run_as`: the state directory lets that user through to its workspace and its
/// `HOME` but not look at anything, the database, logs and mirrors are closed to it.
fn secure_state_dir(state_dir: &Path, who: &RunAs) -> Result<(), DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &Path, mode: u32| -> Result<(), DaemonError> {
        std::fs::create_dir_all(path)
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
            .map_err(|source| DaemonError::StateDir {
                path: path.to_path_buf(),
                source,
            })
    };
    set(state_dir, 0o711)?;
    for closed in ["logs", "mirrors"] {
        set(&state_dir.join(closed), 0o700)?;
    }
    for passage in ["workspaces", "homes"] {
        set(&state_dir.join(passage), 0o711)?;
    }
    for file in ["hookci.db", "hookci.db-wal", "hookci.db-shm", "hookci.lock"] {
        let path = state_dir.join(file);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| DaemonError::StateDir {
                    path: path.clone(),
                    source,
                },
            )?;
        }
    }
    reachable_state_dir(state_dir, who)
}

/// With `run_as`: `who` can reach its workspaces and nothing else of the state directory.
fn reachable_state_dir(state_dir: &Path, who: &RunAs) -> Result<(), DaemonError> {
    if who.can_read(&state_dir.join("workspaces")).is_none() {
        return Err(DaemonError::RunAs(format!(
            "{} cannot reach its workspaces in {}: a folder above it keeps it out (it needs \
             the x permission on each)",
            who.name,
            state_dir.join("workspaces").display()
        )));
    }
    let exposed: Vec<String> = ["hookci.db", "logs", "mirrors"]
        .iter()
        .filter_map(|p| who.can_read(&state_dir.join(p)))
        .collect();
    if exposed.is_empty() {
        Ok(())
    } else {
        Err(DaemonError::RunAs(exposed.join("; ")))
    }
}

/// With `run_as`: the config file and the secret files and folders must be closed to
/// that user. They are the administrator's, so hookci says what to change rather than
/// change it.
fn check_protected(paths: &[PathBuf], who: &RunAs) -> Result<(), DaemonError> {
    let exposed: Vec<String> = paths.iter().filter_map(|p| who.can_read(p)).collect();
    if exposed.is_empty() {
        return Ok(());
    }
    Err(DaemonError::RunAs(format!(
        "{}: steps could read them; make them readable by hookci only (chmod go-rwx)",
        exposed.join("; ")
    )))
}

/// Warns when steps would run as root.
pub fn warn_if_steps_run_as_root(config: &Config) -> Option<String> {
    (config.run_as.is_none() && user::is_root()).then(|| {
        "hookci runs as root and run_as is not set: steps run as root, and can read and change \
         everything on this machine; set run_as to an unprivileged user"
            .to_owned()
    })
}

/// Removes every workspace (or run `HOME`) a previous daemon left: a run's end is
/// stored before its workspace is removed, so a crash in between leaves the workspace
/// of an ended run behind. Nothing executes yet, so every one found is a leftover,
/// except the reused workspaces (`workspace: reuse`), which outlive their runs.
fn remove_leftover_workspaces(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name() == workspace::REUSE_DIR {
            continue;
        }
        let path = entry.path();
        if let Err(e) = crate::fsx::remove_all(&path) {
            tracing::warn!(workspace = %path.display(), error = %e, "cannot remove a leftover workspace");
        }
    }
}

/// Moves an attempt's step logs (`N.log`) into `attempt-K/`, so the next attempt
/// writes fresh files at the usual place.
fn archive_logs(dir: &Path, attempt: i64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let archive = dir.join(format!("attempt-{attempt}"));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let moved = std::fs::create_dir_all(&archive)
                .and_then(|()| std::fs::rename(&path, archive.join(entry.file_name())));
            if let Err(e) = moved {
                tracing::warn!(log = %path.display(), error = %e, "cannot archive a step log");
            }
        }
    }
}

/// Runs the daemon until `shutdown` resolves, then stops accepting, lets running steps
/// finish for up to `shutdown_grace`, and returns. `shutdown` is watched from the
/// start: a stop asked for during recovery ends the daemon as soon as recovery is done,
/// without serving. Each of `hangups` (SIGHUP) reloads `source` (a reload asked for
/// during recovery follows once it is done).
pub async fn run(
    listener: TcpListener,
    source: ConfigSource,
    config: Config,
    pipelines: PipelineSet,
    shutdown: impl Future<Output = ()> + Send,
    mut hangups: Signal,
) -> Result<(), DaemonError> {
    let mut config = config;
    let mut shutdown = std::pin::pin!(shutdown);
    if let Some(warning) = warn_if_steps_run_as_root(&config) {
        tracing::warn!("{warning}");
    }
    contain::become_subreaper();
    let pipelines = Arc::new(pipelines);
    let policy = Arc::new(Policy::new(&config, Arc::clone(&pipelines)));
    let for_recovery = config.clone();
    let recovery_policy = Arc::clone(&policy);
    let mut recovery =
        tokio::task::spawn_blocking(move || open_and_recover(&for_recovery, recovery_policy));
    let mut reload_pending = false;
    // Held until this function returns, after the last run has stopped.
    let Recovered {
        store,
        state_dir,
        lock: _lock,
        cgroups,
        build_uids,
    } = loop {
        tokio::select! {
            recovered = &mut recovery => break recovered??,
            Some(()) = hangups.recv() => {
                tracing::info!("SIGHUP during startup: config and pipelines are read again once started");
                reload_pending = true;
            }
            () = &mut shutdown => {
                crate::systemd::notify("STOPPING=1");
                tracing::info!("stop requested during recovery: exiting once it is done, without serving");
                // Recovery runs on a blocking thread and cannot be cut short; the lock
                // it takes is released when it is done and dropped here.
                recovery.await??;
                return Ok(());
            }
        }
    };
    // Absolute, so every step's HOOKCI_WORKSPACE is unique to this state directory.
    config.state_dir = state_dir;
    // Only now: a daemon refused its state directory, or stopped by a damaged store,
    // never said it was listening.
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            pipelines = pipelines.len(),
            state_dir = %config.state_dir.display(),
            store = %store.describe(),
            "listening"
        );
    }
    let pipelines = Arc::unwrap_or_clone(pipelines);
    let watch_pipelines = config.watch_pipelines;
    let state = Arc::new(
        AppState::new(config, store, pipelines)
            .with_build_uids(build_uids)
            .with_cgroups(cgroups)
            .with_source(source),
    );
    // Subscribed before anything can make a run change.
    tokio::spawn(state.metrics.record(state.events.subscribe()));
    tokio::spawn(forward_wakeups(Arc::clone(&state)));
    policy.attach(&state);
    scheduler::prune(&state).await;
    // Not awaited at stop: a report in flight stays pending and goes after the restart.
    tokio::spawn(report::sender::run(Arc::clone(&state), state.stopping()));
    let scheduler = tokio::spawn(scheduler::run(Arc::clone(&state), state.stopping()));
    tokio::spawn(scheduler::prune_every(Arc::clone(&state), state.stopping()));
    let leases = tokio::spawn(lease::keep(Arc::clone(&state)));
    // Not awaited at stop: a listing in progress has nothing to finish or lose.
    tokio::spawn(reconcile::run(Arc::clone(&state), state.stopping()));

    let routes = intake::routes(Arc::clone(&state))
        .or(api::routes(Arc::clone(&state)))
        .unify()
        .or(control::routes(Arc::clone(&state)))
        .unify()
        .or(pages::routes(Arc::clone(&state)))
        .unify()
        .or(forms::routes(Arc::clone(&state)))
        .unify()
        .or(badge::routes(Arc::clone(&state)))
        .unify()
        .recover(rejection);
    if watch_pipelines {
        if let Err(e) = reload::watch::start(Arc::clone(&state), state.stopping()) {
            tracing::warn!(error = %e, "cannot watch the pipelines directory: reload with SIGHUP instead");
        }
    }
    match reload::socket::start(Arc::clone(&state), state.stopping()) {
        Ok(path) => tracing::info!(socket = %path.display(), "hookci reload --local asks here"),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot open the reload socket: hookci reload --local cannot reach this daemon (SIGHUP and POST /api/reload still reload)"
        ),
    }
    crate::systemd::notify("READY=1");
    tokio::spawn(reload::on_hangup(
        Arc::clone(&state),
        hangups,
        reload_pending,
        state.stopping(),
    ));
    // The scheduler and the followers hear the stop as HTTP stops accepting, not after
    // the drain: a run claimed during the drain would be killed at the end of a grace
    // period that started late, and lose an attempt; an open follow stream would hold
    // the drain for as long as the drain lasts.
    let shutdown = async {
        shutdown.await;
        state.stop();
        crate::systemd::notify("STOPPING=1");
        tracing::info!("stopping: no new run starts; running ones get shutdown_grace");
    };
    http::serve(
        listener,
        Arc::clone(&state),
        warp::service(routes),
        shutdown,
        HTTP_DRAIN,
    )
    .await;
    tracing::info!("stopped accepting; waiting for running runs");
    scheduler.await?;
    // Every run has ended (or was left to the next start): nothing is held any more.
    leases.abort();
    state.cgroups.remove();
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    /// A forked copy of this process, killed and reaped when dropped. Tracked, so that
    /// another test's sweep of untracked children leaves it alone.
    struct Forked {
        pid: i32,
        reaped: bool,
        _tracked: crate::process::Tracked,
    }

    impl Forked {
        /// Runs `child` in the copy, which then exits with the code it returns.
        /// `child` must be async-signal-safe.
        fn run(child: impl FnOnce() -> i32) -> Forked {
            // SAFETY: the child runs only `child`, async-signal-safe, and `_exit`.
            match unsafe { crate::process::fork_tracked() }.expect("fork") {
                Some((pid, tracked)) => Forked {
                    pid,
                    reaped: false,
                    _tracked: tracked,
                },
                None => {
                    let code = child();
                    // SAFETY: ends the copy without running the test binary's exit code.
                    unsafe { libc::_exit(code) }
                }
            }
        }

        /// The child's exit code, once it exits.
        fn exit_code(mut self) -> i32 {
            let mut status = 0;
            // SAFETY: reaps the child this value owns.
            assert_eq!(unsafe { libc::waitpid(self.pid, &mut status, 0) }, self.pid);
            // Its pid may be another process's from now on: `Drop` must not signal it.
            self.reaped = true;
            assert!(libc::WIFEXITED(status), "child status {status}");
            libc::WEXITSTATUS(status)
        }
    }

    impl Drop for Forked {
        fn drop(&mut self) {
            if self.reaped {
                return;
            }
            // SAFETY: kills and reaps this value's child, not yet reaped (so its pid
            // is still its own).
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }

    /// 0 when another process takes the lock on `path`, 1 when it is held, 2 otherwise.
    fn taken_elsewhere(path: &CString) -> i32 {
        Forked::run(|| {
            // SAFETY: open on a C string made before the fork.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY) };
            match lock_whole(fd) {
                Ok(()) => 0,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EAGAIN)) => 1,
                Err(_) => 2,
            }
        })
        .exit_code()
    }

    #[test]
    fn the_state_lock_ends_with_the_daemon_not_with_a_child_forked_before_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = CString::new(dir.path().join("hookci.lock").as_os_str().as_bytes()).unwrap();
        let lock = lock_state_dir(dir.path()).unwrap();
        assert_eq!(taken_elsewhere(&path), 1, "the lock keeps others out");

        // A child forked while the daemon holds the lock, as a step's shell is, and not
        // yet past its exec when the daemon ends.
        let _between_fork_and_exec = Forked::run(|| loop {
            // SAFETY: async-signal-safe; the child waits to be killed.
            unsafe { libc::pause() };
        });
        drop(lock);
        let after = taken_elsewhere(&path);
        assert_eq!(after, 0, "the daemon's end frees the lock for its restart");
        let again = lock_state_dir(dir.path());
        assert!(again.is_ok(), "{:?}", again.err());
    }
}
