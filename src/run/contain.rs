//! Nothing a run starts outlives it. Where the daemon can write to a cgroup v2
//! hierarchy (root, or `Delegate=yes` under systemd), each run gets a cgroup of its own
//! and every step is put in it before its shell starts; when a step ends, `cgroup.kill`
//! ends whatever it left, however it left its process group. Elsewhere ancestry does
//! it, which a step can neither forge nor hide from: each step's shell is a child
//! subreaper, so while it runs, whatever its descendants orphan is re-parented to it,
//! and the daemon is one too, so when the shell ends, all it leaves is re-parented to
//! the daemon. An untracked child of the daemon is therefore what a step that has
//! ended left behind (or one that gave up being a subreaper: its own loss), and the
//! sweep at a step's end kills each with everything below it, whatever its
//! environment says. The processes of steps still running, in other runs, are below
//! their own shells, which are tracked, and are left alone. Either way the daemon
//! reaps the zombies re-parented to it, and only those: the children it started itself
//! are tracked (src/process.rs), so their exit statuses stay for the code that waits
//! for them.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a sweep keeps at it: killed processes take a moment to go, and killing a
/// parent re-parents its children, which the next round finds.
const SWEEP_LIMIT: Duration = Duration::from_secs(5);
const SWEEP_POLL: Duration = Duration::from_millis(20);

/// Makes the daemon a child subreaper, so that a process orphaned by a step is
/// re-parented to it rather than to init, where it could be found no more.
pub fn become_subreaper() {
    if let Err(error) = subreaper() {
        tracing::warn!(%error, "cannot become a child subreaper");
    }
}

/// Makes the calling process a child subreaper; the setting survives `exec`. A step's
/// shell calls it (in `pre_exec`), so that what its descendants orphan stays below it,
/// attributed to its run, until it ends.
///
/// Async-signal-safe: for `pre_exec`.
pub fn subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where runs' cgroups go: a folder of this daemon's in its own cgroup v2.
#[derive(Debug, Clone)]
pub struct Cgroups {
    base: Option<PathBuf>,
}

impl Cgroups {
    /// Finds the daemon's cgroup v2 and makes `hookci-runs.PID` in it; none where the
    /// hierarchy is missing or not writable (then the subreaper sweep does the work).
    /// Folders of daemons that are gone are ended and removed first: a crash leaves its
    /// runs' processes there.
    pub fn setup() -> Cgroups {
        let Some(own) = own_cgroup() else {
            tracing::info!(containment = "subreaper", "no cgroup v2 hierarchy: a run's leftover processes are found as the subreaper's children");
            return Cgroups { base: None };
        };
        remove_stale(&own);
        let base = own.join(format!("hookci-runs.{}", std::process::id()));
        match std::fs::create_dir(&base) {
            Ok(()) => {
                tracing::info!(containment = "cgroup", cgroup = %base.display(), "each run gets a cgroup of its own");
                Cgroups { base: Some(base) }
            }
            Err(e) => {
                tracing::info!(containment = "subreaper", cgroup = %own.display(), error = %e, "cgroup v2 not writable: a run's leftover processes are found as the subreaper's children");
                Cgroups { base: None }
            }
        }
    }

    /// None: no cgroups; for `hookci run` and tests.
    pub fn none() -> Cgroups {
        Cgroups { base: None }
    }

    pub fn available(&self) -> bool {
        self.base.is_some()
    }

    /// The containment of one run: its cgroup, made now (or none, if that fails).
    pub fn for_run(&self, run: i64) -> Containment {
        let cgroup = self.base.as_ref().and_then(|base| {
            let dir = base.join(format!("run-{run}"));
            let made = match std::fs::create_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                _ => std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs")),
            };
            match made {
                Ok(procs) => Some(RunCgroup { dir, procs }),
                Err(e) => {
                    tracing::warn!(run, containment = "subreaper", error = %e, "cannot make the run's cgroup; sweeping as a subreaper instead");
                    None
                }
            }
        });
        Containment(Arc::new(Inner { cgroup }))
    }

    /// Removes this daemon's folder (at its end; its runs' cgroups are gone by then).
    pub fn remove(&self) {
        if let Some(base) = &self.base {
            let _ = std::fs::remove_dir(base);
        }
    }
}

#[derive(Debug)]
struct RunCgroup {
    dir: PathBuf,
    /// Open before any step forks: the child writes its pid here between fork and exec.
    procs: std::fs::File,
}

#[derive(Debug)]
struct Inner {
    cgroup: Option<RunCgroup>,
}

/// What ends every process of one run.
#[derive(Debug, Clone)]
pub struct Containment(Arc<Inner>);

impl Containment {
    /// The descriptor a step's child writes `0` to (itself) before exec, if any.
    pub fn cgroup_procs_fd(&self) -> Option<RawFd> {
        self.0.cgroup.as_ref().map(|c| c.procs.as_raw_fd())
    }

    /// Ends every process in the run's cgroup now, whoever's they are; false when the
    /// run has no cgroup or the kill failed.
    pub async fn kill_cgroup(&self) -> bool {
        let Some(cgroup) = &self.0.cgroup else {
            return false;
        };
        match tokio::fs::write(cgroup.dir.join("cgroup.kill"), "1").await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(cgroup = %cgroup.dir.display(), error = %e, "cgroup.kill failed");
                false
            }
        }
    }

    /// Kills every process of the run that is still there and reaps what was
    /// re-parented to the daemon; returns once they are gone (or after a limit). Called
    /// once the step's shell has been waited for: whatever the step left is the
    /// daemon's child by then.
    pub async fn sweep(&self) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.sweep_blocking()).await;
    }

    fn sweep_blocking(&self) {
        let deadline = Instant::now() + SWEEP_LIMIT;
        if let Some(cgroup) = &self.0.cgroup {
            let killed = std::fs::write(cgroup.dir.join("cgroup.kill"), "1");
            if let Err(e) = killed {
                tracing::warn!(cgroup = %cgroup.dir.display(), error = %e, "cgroup.kill failed");
            }
            while populated(&cgroup.dir) && Instant::now() < deadline {
                std::thread::sleep(SWEEP_POLL);
            }
        }
        // With a cgroup too: what it killed was re-parented here, and is a zombie now.
        loop {
            let left = sweep_orphans();
            if left == 0 || Instant::now() >= deadline {
                if left > 0 {
                    tracing::warn!(left, "processes of the run are still there after the sweep");
                }
                return;
            }
            std::thread::sleep(SWEEP_POLL);
        }
    }

    /// At the run's end, after the last sweep.
    pub fn remove(&self) {
        if let Some(cgroup) = &self.0.cgroup {
            if let Err(e) = std::fs::remove_dir(&cgroup.dir) {
                tracing::warn!(cgroup = %cgroup.dir.display(), error = %e, "cannot remove the run's cgroup");
            }
        }
    }
}

/// Writes `0` to a cgroup's `cgroup.procs`: moves the calling process into it.
///
/// # Safety
/// Async-signal-safe: for `pre_exec`.
pub unsafe fn join_cgroup(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: writes one byte from a static buffer to a descriptor the parent opened.
    if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// The daemon's own cgroup v2 folder: the cgroup2 mount plus the `0::` entry of
/// /proc/self/cgroup.
fn own_cgroup() -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mount-point options... - fstype source ...
    let mount = mounts.lines().find_map(|l| {
        let (fields, rest) = l.split_once(" - ")?;
        (rest.split_whitespace().next()? == "cgroup2").then(|| fields.split(' ').nth(4))?
    })?;
    let path = PathBuf::from(mount).join(own.trim_start_matches('/'));
    path.is_dir().then_some(path)
}

/// Ends and removes the run cgroups of daemons that are gone.
fn remove_stale(own: &Path) {
    let Ok(entries) = std::fs::read_dir(own) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("hookci-runs."))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let base = entry.path();
        for run in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            if run.path().is_dir() {
                let _ = std::fs::write(run.path().join("cgroup.kill"), "1");
                let deadline = Instant::now() + SWEEP_LIMIT;
                while populated(&run.path()) && Instant::now() < deadline {
                    std::thread::sleep(SWEEP_POLL);
                }
                let _ = std::fs::remove_dir(run.path());
            }
        }
        if std::fs::remove_dir(&base).is_ok() {
            tracing::warn!(cgroup = %base.display(), "removed the run cgroups of a daemon that is gone");
        }
    }
}

struct Proc {
    ppid: i32,
    zombie: bool,
}

fn processes() -> HashMap<i32, Proc> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name (field 2) may hold spaces and parentheses; what follows does not.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or_default();
        let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) else {
            continue;
        };
        out.insert(
            pid,
            Proc {
                ppid,
                zombie: state == "Z",
            },
        );
    }
    out
}

/// One round: reaps the zombies re-parented to the daemon, and kills its other
/// untracked children, with every process below them. Returns how many of those were
/// still alive.
fn sweep_orphans() -> usize {
    let me = std::process::id() as i32;
    let procs = processes();
    let tracked: HashSet<i32> = crate::process::tracked_children();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, p) in &procs {
        children.entry(p.ppid).or_default().push(*pid);
    }
    let mut alive = 0;
    for &pid in children.get(&me).into_iter().flatten() {
        if tracked.contains(&pid) {
            continue;
        }
        if procs.get(&pid).is_some_and(|p| p.zombie) {
            reap(pid);
            continue;
        }
        alive += 1;
        let mut stack = vec![pid];
        while let Some(p) = stack.pop() {
            // SAFETY: kill takes integers; `p` is this daemon's untracked child or below it.
            unsafe { libc::kill(p, libc::SIGKILL) };
            stack.extend(children.get(&p).into_iter().flatten());
        }
    }
    alive
}

fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waits for one untracked child of ours that is already a zombie.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}
