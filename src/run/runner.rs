//! Step runner: spawns one step's shell command in its own process group,
//! captures its interleaved stdout and stderr into a log file, and kills the
//! whole process tree on timeout, cancellation or completion.
//!
//! The scheduler calls [`run_step`] once for every step of a run. This module
//! knows nothing about pipelines, payloads, git or the store: it gets a script,
//! a working directory, a complete environment and a log path, and reports how
//! the process ended.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinSet};

use crate::run::contain::{self, Containment};
use crate::run::events::OutputTap;
use crate::run::mask::Masker;
use crate::run::output;
use crate::run::user::RunAs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Pieces of output in flight between the pipe readers and the log writer (each at
/// most a read, see `output`); bounded so a slow disk applies back-pressure to the step
/// instead of buffering in memory.
const CHANNEL_DEPTH: usize = 16;
/// Batches on their way to a store that shares logs.
const KEEP_DEPTH: usize = 16;
/// How long the pipe readers may keep going once the process group is dead. A
/// process that escaped the group (e.g. via `setsid`) can hold a pipe open
/// forever, so after this we abandon its output.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// Poll interval of [`terminate_group`], which has no child handle to wait on.
const GROUP_POLL: Duration = Duration::from_millis(50);

/// One step to run.
#[derive(Debug, Clone, Copy)]
pub struct StepCommand<'a> {
    /// Run as `sh -c <script>`; never interpolated into anything.
    pub script: &'a str,
    pub cwd: &'a Path,
    /// The complete environment: nothing is inherited from the daemon.
    pub env: &'a [(String, String)],
    /// Created (with parent directories) and truncated; receives stdout and
    /// stderr interleaved line by line in arrival order.
    pub log_path: &'a Path,
    /// `None` means no limit.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when the step is stopped.
    pub grace: Duration,
    /// Secret values to replace with `***` in the log (see `mask`).
    pub mask: &'a Masker,
    /// Where the output is published as the log is written (after masking).
    pub output: Option<&'a OutputTap>,
    /// The run's log budget, which all its steps share.
    pub budget: &'a Arc<LogBudget>,
    /// The user the step runs as; `None`: the daemon's own.
    pub run_as: Option<&'a RunAs>,
    /// Ends whatever the step leaves behind once its shell is gone; `None`: only its
    /// process group is killed.
    pub contain: Option<&'a Containment>,
}

/// How much of a run's output reaches its log (`max_log_bytes`); what comes past it is
/// dropped and counted.
#[derive(Debug)]
pub struct LogBudget {
    /// Zero: no limit.
    limit: u64,
    used: AtomicU64,
    /// Whether a step's log has said that the limit was reached: said once per run, by
    /// the step that reached it; what later steps print is dropped without a word.
    told: AtomicBool,
}

impl LogBudget {
    pub fn new(limit: u64) -> LogBudget {
        LogBudget {
            limit,
            used: AtomicU64::new(0),
            told: AtomicBool::new(false),
        }
    }

    /// The limit, in bytes; zero: none.
    pub(super) fn limit(&self) -> u64 {
        self.limit
    }

    /// True the first time it is asked, for the step whose log says the limit was hit.
    pub(super) fn tell(&self) -> bool {
        !self.told.swap(true, Ordering::Relaxed)
    }

    /// The part of `bytes` that may still be written; the rest is counted in `dropped`.
    pub(super) fn admit<'b>(&self, bytes: &'b [u8], dropped: &mut u64) -> &'b [u8] {
        let granted = self.take(bytes.len());
        *dropped += (bytes.len() - granted) as u64;
        &bytes[..granted]
    }

    /// How many of the next `n` bytes may still be written.
    fn take(&self, n: usize) -> usize {
        if self.limit == 0 {
            return n;
        }
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let granted = self.limit.saturating_sub(used).min(n as u64);
            match self.used.compare_exchange_weak(
                used,
                used + granted,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return granted as usize,
                Err(now) => used = now,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    Canceled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    pub end: StepEnd,
    pub duration: Duration,
    /// Bytes of output the log budget dropped.
    pub log_dropped: u64,
}

impl StepOutcome {
    pub fn succeeded(&self) -> bool {
        self.end == StepEnd::Exited(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot create step log {}", path.display())]
    CreateLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write step log {}", path.display())]
    WriteLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot spawn step shell in {}", cwd.display())]
    Spawn {
        cwd: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the log writer of step log {}", path.display())]
    LogWriter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for step process group {pgid}")]
    Wait {
        pgid: i32,
        #[source]
        source: io::Error,
    },
}

/// Runs one step to completion, timeout or cancellation.
///
/// `cancel` flips to true when the run is canceled or the daemon stops; the step is then
/// killed like on timeout and ends `Canceled`. A dropped sender never cancels.
///
/// Whatever happens — including errors and this future being dropped — the
/// step's whole process group is SIGKILLed before control leaves this function.
pub async fn run_step(
    cmd: StepCommand<'_>,
    mut cancel: watch::Receiver<bool>,
) -> Result<StepOutcome, RunnerError> {
    let log = create_log(cmd.log_path).await?;
    let started = Instant::now();
    if *cancel.borrow() {
        return Ok(StepOutcome {
            end: StepEnd::Canceled,
            duration: Duration::ZERO,
            log_dropped: 0,
        });
    }

    let spawn_error = |source| RunnerError::Spawn {
        cwd: cmd.cwd.to_path_buf(),
        source,
    };
    let (out_ours, out_theirs) = output::pipe().map_err(spawn_error)?;
    let (err_ours, err_theirs) = output::pipe().map_err(spawn_error)?;
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(cmd.script)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_theirs))
        .stderr(Stdio::from(err_theirs))
        .kill_on_drop(true)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .current_dir(cmd.cwd);
    let cgroup = cmd.contain.and_then(Containment::cgroup_procs_fd);
    let contained = cmd.contain.is_some();
    let run_as = cmd.run_as.cloned();
    let daemon = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: between fork and exec only async-signal-safe calls run: a write to a
    // descriptor opened before the fork, getppid, then setgroups, setgid, setuid and
    // prctl.
    unsafe {
        shell.pre_exec(move || {
            // Joined first, while the child still has the daemon's rights to do so.
            if let Some(fd) = cgroup {
                contain::join_cgroup(fd)?;
            }
            // A daemon that died since the fork (joining a cgroup can take a while)
            // would leave a step its restart cannot tell from the daemon: not yet
            // marked by the step's environment, perhaps in a cgroup already ended.
            if libc::getppid() != daemon {
                return Err(io::Error::other("the daemon is gone"));
            }
            if contained {
                contain::subreaper()?;
            }
            if let Some(user) = &run_as {
                user.switch()?;
            }
            drop_capabilities()
        });
    }
    let spawned = crate::process::spawn_tracked(&mut shell);
    // The command holds the step's ends of the pipes; with them open here too, the
    // pipes would never report the end of the step's output.
    drop(shell);
    let (mut child, _tracked) = spawned.map_err(spawn_error)?;
    // `process_group(0)` makes the shell the leader of a new group whose id is its pid.
    let pgid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or_else(|| RunnerError::Spawn {
            cwd: cmd.cwd.to_path_buf(),
            source: io::Error::other("spawned shell has no usable pid"),
        })?;
    // Armed until the final SIGKILL below, so an early exit or a dropped
    // future still takes the background jobs down with it.
    let mut guard = GroupGuard { pgid, armed: true };
    debug!(pgid, cwd = %cmd.cwd.display(), log = %cmd.log_path.display(), "step spawned");

    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let tap = cmd.output.cloned();
    let keeper = tap.clone().filter(OutputTap::keeps).map(|tap| {
        let (keep, kept) = mpsc::channel(KEEP_DEPTH);
        (keep, tokio::spawn(output::keep_batches(tap, kept)))
    });
    let (keep, keeper) = keeper.unzip();
    let (mask, budget) = (cmd.mask.clone(), Arc::clone(cmd.budget));
    // A thread of its own for as long as the step prints, rather than one of the
    // blocking pool's, which the store's and git's short jobs share.
    let (wrote, writing) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("hookci-step-log".into())
        .spawn(move || {
            let _ = wrote.send(output::write_log(log, rx, mask, tap, keep, budget));
        })
        .map_err(|source| RunnerError::LogWriter {
            path: cmd.log_path.to_path_buf(),
            source,
        })?;
    let mut writer = tokio::spawn(async move {
        let written = writing
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the step's log writer stopped")));
        if let Some(keeper) = keeper {
            let _ = keeper.await;
        }
        written
    });
    let mut readers = JoinSet::new();
    readers.spawn(output::pump(out_ours, tx.clone()));
    readers.spawn(output::pump(err_ours, tx));

    let deadline = cmd.timeout.and_then(|t| started.checked_add(t));
    let mut early = None;
    let ended = loop {
        tokio::select! {
            status = child.wait() => {
                break status
                    .map(end_of)
                    .map_err(|source| RunnerError::Wait { pgid, source });
            }
            () = expired(deadline) => {
                warn!(pgid, timeout = ?cmd.timeout, "step timed out, stopping process group");
                let stopped = stop_child(&mut child, pgid, cmd.grace, cmd.contain).await;
                break stopped.map(|()| StepEnd::TimedOut);
            }
            () = canceled(&mut cancel) => {
                info!(pgid, "step canceled, stopping process group");
                let stopped = stop_child(&mut child, pgid, cmd.grace, cmd.contain).await;
                break stopped.map(|()| StepEnd::Canceled);
            }
            joined = &mut writer, if early.is_none() => {
                // Finishing cleanly only means both pipes were closed while the
                // step keeps running; a write error means its output is being lost.
                let done = early.insert(flatten(joined));
                if let Err(source) = done {
                    let source = io::Error::new(source.kind(), source.to_string());
                    warn!(pgid, error = %source, "step log write failed, stopping process group");
                    let _ = stop_child(&mut child, pgid, cmd.grace, cmd.contain).await;
                    let path = cmd.log_path.to_path_buf();
                    break Err(RunnerError::WriteLog { path, source });
                }
            }
        }
    };
    // The shell is gone, but anything it left in the background is not.
    let _ = signal_group(pgid, libc::SIGKILL);
    guard.armed = false;
    // Nor what left the group: with it gone, pipes it held close too.
    if let Some(contain) = cmd.contain {
        contain.sweep().await;
    }
    let duration = started.elapsed();

    let drained = tokio::time::timeout(DRAIN_LIMIT, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            pgid,
            "step output still open after its process group died, abandoning it"
        );
    }
    // Dropping the set aborts abandoned readers, which closes the channel.
    drop(readers);
    let written = match early {
        Some(written) => written,
        None => flatten(writer.await),
    };

    let end = ended?;
    let log_dropped = written.map_err(|source| RunnerError::WriteLog {
        path: cmd.log_path.to_path_buf(),
        source,
    })?;
    info!(
        pgid,
        ?end,
        duration_ms = duration.as_millis(),
        log_dropped,
        "step finished"
    );
    Ok(StepOutcome {
        end,
        duration,
        log_dropped,
    })
}

/// SIGTERM to the process group, wait up to `grace` for it to disappear, then SIGKILL.
///
/// For groups whose leader is not our child (e.g. left over from a previous
/// daemon): group membership is polled, and an unreaped zombie counts as a
/// member, so for our own children prefer waiting on the child as `run_step` does.
pub async fn terminate_group(pgid: i32, grace: Duration) {
    let _ = signal_group(pgid, libc::SIGTERM);
    let _ = tokio::time::timeout(grace, async {
        while group_exists(pgid) {
            tokio::time::sleep(GROUP_POLL).await;
        }
    })
    .await;
    let _ = signal_group(pgid, libc::SIGKILL);
}

/// Kills every process a previous daemon's steps left behind: those whose environment
/// names a workspace inside `workspaces` (`HOOKCI_WORKSPACE=<absolute path>`, fresh
/// and reused alike, unique to one state directory), with their process groups. Only
/// at a start, before any step of this daemon runs, under the state directory's lock:
/// every such process is then a leftover, also of a run an earlier start already
/// interrupted and died before cleaning up. Identifying processes by their environment,
/// not by a remembered pid, means a recycled pid is never hit. Returns the pids found.
pub fn kill_leftovers(workspaces: &Path) -> Vec<i32> {
    let mut marker = format!("HOOKCI_WORKSPACE={}", workspaces.display()).into_bytes();
    marker.push(b'/');
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environ
            .split(|b| *b == 0)
            .any(|var| var.starts_with(&marker))
        {
            continue;
        }
        found.push(pid);
        if let Some(pgid) = process_group_of(pid) {
            if pgid != process_group_of(me).unwrap_or(0) {
                let _ = signal_group(pgid, libc::SIGKILL);
            }
        }
        // SAFETY: kill takes integers only; the pid was just seen carrying our marker.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    if !found.is_empty() {
        warn!(
            ?found,
            workspaces = %workspaces.display(),
            "killed step processes left over from a previous daemon"
        );
    }
    found
}

/// Field 5 of /proc/PID/stat.
fn process_group_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; fields after it don't.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// SIGTERM the group, give the shell `grace` to exit, then SIGKILL and reap it.
///
/// A group the daemon may not signal (another user's, and the daemon lacks CAP_KILL)
/// would keep the step going for ever: then the run's cgroup, if it has one, is ended
/// instead, which needs no permission over its processes.
async fn stop_child(
    child: &mut Child,
    pgid: i32,
    grace: Duration,
    contain: Option<&Containment>,
) -> Result<(), RunnerError> {
    let _ = signal_group(pgid, libc::SIGTERM);
    if let Ok(Ok(_)) = tokio::time::timeout(grace, child.wait()).await {
        return Ok(());
    }
    let killed = signal_group(pgid, libc::SIGKILL);
    if killed.is_err_and(|e| e.raw_os_error() == Some(libc::EPERM)) {
        match contain {
            Some(contain) if contain.kill_cgroup().await => {
                info!(pgid, "step process group ended through the run's cgroup");
            }
            _ => warn!(
                pgid,
                "step process group cannot be signalled and the run has no cgroup: \
                 waiting for it to end by itself"
            ),
        }
    }
    child
        .wait()
        .await
        .map(drop)
        .map_err(|source| RunnerError::Wait { pgid, source })
}

fn end_of(status: ExitStatus) -> StepEnd {
    match (status.code(), status.signal()) {
        (_, Some(sig)) => StepEnd::Signaled(sig),
        (Some(code), None) => StepEnd::Exited(code),
        // `wait` never reports stopped/continued children, so this is unreachable
        // in practice; report a failure rather than inventing a success.
        (None, None) => StepEnd::Exited(-1),
    }
}

async fn expired(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn canceled(cancel: &mut watch::Receiver<bool>) {
    // A closed channel means nobody can cancel any more; returning would make
    // the select loop treat it as a cancel or spin on it.
    if cancel.wait_for(|&c| c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn create_log(path: &Path) -> Result<std::fs::File, RunnerError> {
    let fail = |source| RunnerError::CreateLog {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await.map_err(fail)?;
    }
    let file = tokio::fs::File::create(path).await.map_err(fail)?;
    Ok(file.into_std().await)
}

/// Clears the ambient capabilities the daemon may hold (the systemd unit grants some
/// for `run_as`): they would survive the exec, and a step would have them. A non-root
/// process keeps no other capability across an exec of a file that has none.
fn drop_capabilities() -> io::Result<()> {
    // SAFETY: prctl with plain integer arguments.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn flatten<T>(joined: Result<io::Result<T>, JoinError>) -> io::Result<T> {
    joined.unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Signals the group; the error (other than a group already gone) is logged and
/// returned.
fn signal_group(pgid: i32, sig: libc::c_int) -> io::Result<()> {
    // killpg(0) or (1) would hit the daemon's own group or init's.
    if pgid <= 1 {
        warn!(pgid, sig, "refusing to signal a reserved process group");
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: killpg only takes integers and touches none of our memory; a
    // stale pgid at worst fails with ESRCH.
    if unsafe { libc::killpg(pgid, sig) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            warn!(pgid, sig, %error, "signalling step process group failed");
            return Err(error);
        }
    }
    Ok(())
}

fn group_exists(pgid: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission; no memory is touched.
    if unsafe { libc::kill(-pgid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// SIGKILLs the group if `run_step` exits (or is dropped) before its own cleanup.
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tempfile::TempDir;

    const LONG: Duration = Duration::from_secs(30);

    fn base_env(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        std::iter::once(("PATH".to_string(), path))
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }

    fn never_cancel() -> watch::Receiver<bool> {
        // Dropping the sender must mean "never cancels", not "cancel now".
        watch::channel(false).1
    }

    struct Step {
        dir: TempDir,
        env: Vec<(String, String)>,
        timeout: Option<Duration>,
        grace: Duration,
        secrets: Vec<String>,
        output: Option<OutputTap>,
        max_log: u64,
    }

    impl Step {
        fn new(extra: &[(&str, &str)]) -> Self {
            let dir = TempDir::new().unwrap();
            let dir_s = dir.path().to_str().unwrap().to_string();
            let mut env = base_env(extra);
            env.push(("DIR".into(), dir_s));
            Step {
                dir,
                env,
                timeout: None,
                grace: Duration::from_secs(1),
                secrets: Vec::new(),
                output: None,
                max_log: 0,
            }
        }

        fn log_path(&self) -> PathBuf {
            self.dir.path().join("logs/nested/step.log")
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.log_path()).unwrap()
        }

        async fn run(&self, script: &str, cancel: watch::Receiver<bool>) -> StepOutcome {
            let log_path = self.log_path();
            let mask = Masker::new(self.secrets.iter());
            let cmd = StepCommand {
                script,
                cwd: self.dir.path(),
                env: &self.env,
                log_path: &log_path,
                timeout: self.timeout,
                grace: self.grace,
                mask: &mask,
                output: self.output.as_ref(),
                budget: &Arc::new(LogBudget::new(self.max_log)),
                run_as: None,
                contain: None,
            };
            tokio::time::timeout(Duration::from_secs(60), run_step(cmd, cancel))
                .await
                .expect("run_step hung")
                .unwrap()
        }

        fn pid_from(&self, file: &str) -> i32 {
            std::fs::read_to_string(self.dir.path().join(file))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }
    }

    /// Gone, or a zombie waiting for init to reap it (it is not our child).
    fn pid_gone(pid: i32) -> bool {
        // SAFETY: signal 0 only probes for existence.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        }
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                state.starts_with('Z')
            })
            .unwrap_or(true)
    }

    async fn assert_gone(pid: i32) {
        for _ in 0..100 {
            if pid_gone(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("process {pid} survived the step");
    }

    async fn wait_for_file(path: PathBuf, content: &str) {
        for _ in 0..200 {
            if std::fs::read_to_string(&path).is_ok_and(|s| s.contains(content)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never contained {content:?}", path.display());
    }

    #[tokio::test]
    async fn exit_zero_succeeds_and_logs_output() {
        let step = Step::new(&[]);
        let out = step.run("echo hello", never_cancel()).await;
        assert_eq!(out.end, StepEnd::Exited(0));
        assert!(out.succeeded());
        assert_eq!(step.log(), "hello\n");
    }

    #[tokio::test]
    async fn exit_code_is_reported() {
        let step = Step::new(&[]);
        let out = step.run("exit 3", never_cancel()).await;
        assert_eq!(out.end, StepEnd::Exited(3));
        assert!(!out.succeeded());
    }

    #[tokio::test]
    async fn death_by_signal_is_reported() {
        let step = Step::new(&[]);
        let out = step.run("kill -SEGV $$", never_cancel()).await;
        assert_eq!(out.end, StepEnd::Signaled(libc::SIGSEGV));
    }

    #[tokio::test]
    async fn stdout_stderr_and_unterminated_lines_reach_the_log() {
        let step = Step::new(&[]);
        let script = "echo out; echo err >&2; echo out2; printf tail";
        let out = step.run(script, never_cancel()).await;
        assert_eq!(out.end, StepEnd::Exited(0));
        let log = step.log();
        for line in ["out\n", "err\n", "out2\n"] {
            assert!(log.contains(line), "{log:?}");
        }
        assert!(log.find("out\n") < log.find("out2\n"));
        assert!(log.contains("tail"), "{log:?}");
    }

    #[tokio::test]
    async fn secret_values_never_reach_the_log_even_split_across_writes() {
        let key = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END KEY-----";
        let mut step = Step::new(&[("KEY", key), ("TOKEN", "tok-3f9a1c77")]);
        step.secrets = vec![key.to_owned(), "tok-3f9a1c77".to_owned()];
        // The token is written one byte at a time; the key whole, then one line alone.
        let script = "printf '%s\\n' \"$KEY\"; for c in t o k - 3 f 9 a 1 c 7 7; do printf %s $c; sleep 0.01; done; echo; \
                      echo \"$KEY\" | sed -n 2p >&2; echo done";
        let out = step.run(script, never_cancel()).await;
        assert_eq!(out.end, StepEnd::Exited(0));
        let log = step.log();
        assert!(!log.contains("tok-3f9a1c77"), "{log}");
        assert!(!log.contains("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"), "{log}");
        assert!(!log.contains("BKcwggSjAgEAAoIBAQC7"), "{log}");
        assert!(log.contains("***") && log.contains("done"), "{log}");
    }

    #[tokio::test]
    async fn a_long_line_without_newline_is_written_whole() {
        let step = Step::new(&[]);
        let script = "head -c 100000 /dev/zero | tr '\\0' a";
        let out = step.run(script, never_cancel()).await;
        assert_eq!(out.end, StepEnd::Exited(0));
        let log = step.log();
        assert_eq!(log.len(), 100_000);
        assert!(log.bytes().all(|b| b == b'a'));
    }

    #[tokio::test]
    async fn environment_is_exactly_what_was_given() {
        let step = Step::new(&[("FOO", "bar")]);
        let out = step.run("env", never_cancel()).await;
        assert_eq!(out.end, StepEnd::Exited(0));
        let log = step.log();
        let keys: Vec<&str> = log.lines().filter_map(|l| l.split('=').next()).collect();
        assert!(log.lines().any(|l| l == "FOO=bar"), "{log}");
        // The shell itself may add PWD, SHLVL and `_`; nothing may leak from us.
        let shell_owned = ["PATH", "PWD", "OLDPWD", "SHLVL", "_"];
        for (key, _) in std::env::vars() {
            if !shell_owned.contains(&key.as_str()) {
                assert!(!keys.contains(&key.as_str()), "{key} leaked into {log}");
            }
        }
    }

    #[tokio::test]
    async fn cwd_is_honoured() {
        let step = Step::new(&[]);
        let out = step.run("pwd -P", never_cancel()).await;
        assert_eq!(out.end, StepEnd::Exited(0));
        let expected = step.dir.path().canonicalize().unwrap();
        assert_eq!(step.log().trim_end(), expected.to_str().unwrap());
    }

    #[tokio::test]
    async fn env_values_are_not_evaluated() {
        let probe = TempDir::new().unwrap();
        let p = probe.path().display();
        let val = format!("$(touch {p}/a) `touch {p}/b`; touch {p}/c && echo \"'\"");
        let step = Step::new(&[("VAL", &val)]);
        let out = step.run("printf '%s' \"$VAL\"", never_cancel()).await;
        assert_eq!(out.end, StepEnd::Exited(0));
        assert_eq!(step.log(), val);
        assert_eq!(std::fs::read_dir(probe.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let mut step = Step::new(&[]);
        step.timeout = Some(Duration::from_secs(1));
        let script = "sleep 600 & echo $! > \"$DIR/bg.pid\"; wait";
        let out = step.run(script, never_cancel()).await;
        assert_eq!(out.end, StepEnd::TimedOut);
        assert!(out.duration < LONG);
        assert_gone(step.pid_from("bg.pid")).await;
    }

    #[tokio::test]
    async fn ignoring_sigterm_gets_sigkill_after_grace() {
        let mut step = Step::new(&[]);
        step.timeout = Some(Duration::from_secs(1));
        let script = "trap '' TERM; echo $$ > \"$DIR/sh.pid\"; sleep 600";
        let out = step.run(script, never_cancel()).await;
        assert_eq!(out.end, StepEnd::TimedOut);
        assert!(out.duration < LONG);
        assert_gone(step.pid_from("sh.pid")).await;
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_group_and_log_streams_meanwhile() {
        let step = Step::new(&[]);
        let (tx, rx) = watch::channel(false);
        let script = "echo started; sleep 600 & echo $! > \"$DIR/bg.pid\"; wait";
        let run = step.run(script, rx);
        let cancel = async {
            // The log is readable while the step is still running.
            wait_for_file(step.log_path(), "started\n").await;
            wait_for_file(step.dir.path().join("bg.pid"), "\n").await;
            tx.send(true).unwrap();
        };
        let (out, ()) = tokio::join!(run, cancel);
        assert_eq!(out.end, StepEnd::Canceled);
        assert!(out.duration < LONG);
        assert_gone(step.pid_from("bg.pid")).await;
    }

    #[tokio::test]
    async fn output_past_the_budget_is_dropped_and_counted_while_the_step_goes_on() {
        let mut step = Step::new(&[]);
        step.max_log = 1000;
        let out = step
            .run(
                "head -c 5000 /dev/zero | tr '\\0' x; echo done > \"$DIR/done\"",
                never_cancel(),
            )
            .await;
        assert_eq!(out.end, StepEnd::Exited(0));
        assert_eq!(out.log_dropped, 4000);
        let log = step.log();
        assert_eq!(
            log,
            format!(
                "{}\n[hookci] max_log_bytes (1000 bytes per run) reached: 4000 bytes of output dropped, and all output of later steps\n",
                "x".repeat(1000)
            )
        );
        assert!(step.dir.path().join("done").exists(), "the step went on");
    }

    #[tokio::test]
    async fn background_job_holding_stdout_does_not_block_the_step() {
        let step = Step::new(&[]);
        let script = "sleep 600 & echo $! > \"$DIR/bg.pid\"; echo done";
        let out = step.run(script, never_cancel()).await;
        assert_eq!(out.end, StepEnd::Exited(0));
        assert_eq!(step.log(), "done\n");
        assert_gone(step.pid_from("bg.pid")).await;
    }

    #[tokio::test]
    async fn output_held_open_outside_the_group_is_abandoned() {
        let step = Step::new(&[]);
        // setsid escapes our process group, so only the drain limit ends the step.
        let script = "setsid sh -c 'echo $$ > \"$DIR/esc.pid\"; exec sleep 600' &
            until [ -s \"$DIR/esc.pid\" ]; do sleep 0.05; done; echo done";
        let started = std::time::Instant::now();
        let out = step.run(script, never_cancel()).await;
        let esc = step.pid_from("esc.pid");
        // SAFETY: plain syscall on a pid this test's step just started.
        unsafe { libc::kill(esc, libc::SIGKILL) };
        assert_eq!(out.end, StepEnd::Exited(0));
        assert!(started.elapsed() < LONG);
        assert_eq!(step.log(), "done\n");
    }

    #[tokio::test]
    async fn missing_cwd_is_a_spawn_error() {
        let dir = TempDir::new().unwrap();
        let missing = dir.path().join("nope");
        let log_path = dir.path().join("step.log");
        let cmd = StepCommand {
            script: "true",
            cwd: &missing,
            env: &[],
            log_path: &log_path,
            timeout: None,
            grace: Duration::from_secs(1),
            mask: &Masker::new(Vec::<String>::new()),
            output: None,
            budget: &Arc::new(LogBudget::new(0)),
            run_as: None,
            contain: None,
        };
        let err = run_step(cmd, never_cancel()).await.unwrap_err();
        assert!(
            matches!(err, RunnerError::Spawn { ref cwd, .. } if *cwd == missing),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn terminate_group_kills_a_foreign_group() {
        let step = Step::new(&[]);
        let (tx, rx) = watch::channel(false);
        let script = "trap '' TERM; sleep 600 & echo $! > \"$DIR/bg.pid\"; wait";
        let run = step.run(script, rx);
        let kill = async {
            wait_for_file(step.dir.path().join("bg.pid"), "\n").await;
            let bg = step.pid_from("bg.pid");
            // SAFETY: plain syscall, no memory involved.
            let pgid = unsafe { libc::getpgid(bg) };
            terminate_group(pgid, Duration::from_millis(200)).await;
            drop(tx);
            bg
        };
        let (out, bg) = tokio::join!(run, kill);
        assert_eq!(out.end, StepEnd::Signaled(libc::SIGKILL));
        assert_gone(bg).await;
    }

    /// This thread's effective capabilities without CAP_KILL (the others kept), as a
    /// daemon that was not granted it; put back when dropped.
    struct WithoutKill([[u32; 3]; 2]);

    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }

    const CAP_VERSION_3: u32 = 0x2008_0522;

    fn capabilities() -> [[u32; 3]; 2] {
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [[0u32; 3]; 2];
        // SAFETY: capget fills two (effective, permitted, inheritable) triples.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        data
    }

    fn set_capabilities(data: &[[u32; 3]; 2]) {
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        // SAFETY: capset reads two triples; pid 0 is this thread only.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    impl WithoutKill {
        fn new() -> WithoutKill {
            let before = capabilities();
            let mut without = before;
            without[0][0] &= !(1 << 5); // CAP_KILL
            set_capabilities(&without);
            WithoutKill(before)
        }
    }

    impl Drop for WithoutKill {
        fn drop(&mut self) {
            set_capabilities(&self.0);
        }
    }

    #[tokio::test]
    async fn a_group_the_daemon_may_not_signal_is_ended_through_the_runs_cgroup() {
        assert!(
            user_is_root(),
            "this test needs root (CI runs as root): it runs a step as another user"
        );
        let cgroups = crate::run::contain::Cgroups::setup();
        assert!(cgroups.available(), "this test needs a writable cgroup v2");
        let contain = cgroups.for_run(1);
        let user = RunAs::resolve("54321:54321").unwrap();
        let step = Step::new(&[]);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(step.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let log_path = step.log_path();
        let mask = Masker::new(std::iter::empty::<&str>());
        let cmd = StepCommand {
            script: "sleep 600",
            cwd: step.dir.path(),
            env: &step.env,
            log_path: &log_path,
            timeout: Some(Duration::from_millis(200)),
            grace: Duration::from_millis(200),
            mask: &mask,
            output: None,
            budget: &Arc::new(LogBudget::new(0)),
            run_as: Some(&user),
            contain: Some(&contain),
        };
        // The runtime of a #[tokio::test] runs on this thread, which signals the step.
        let without = WithoutKill::new();
        let out = tokio::time::timeout(LONG, run_step(cmd, never_cancel())).await;
        drop(without);
        // A failed stop leaves the sleep: ended here, so that nothing outlives the test.
        contain.sweep().await;
        contain.remove();
        cgroups.remove();
        let out = out
            .expect("a step of another user was never stopped")
            .unwrap();
        assert_eq!(out.end, StepEnd::TimedOut);
    }

    fn user_is_root() -> bool {
        crate::run::user::is_root()
    }
}
