//! Protections of the hookci process itself, set once at its start (the daemon's, and
//! each git worker's): what a step could otherwise read of it, and the file descriptor
//! limit its connections need. Also the registry of the children it started itself
//! (steps, git jobs), which a run's sweep (`run::contain`) leaves alone.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

/// Makes the process non-dumpable: no process of another user, and no process of its
/// own user without `CAP_SYS_PTRACE` either, may read its `/proc/PID/environ`,
/// `/proc/PID/mem` or attach to it. A step running as the daemon's own user would
/// otherwise find the secrets the daemon was started with there (unsetting a
/// variable does not clear the memory that file shows).
pub fn not_dumpable() {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot make the process non-dumpable");
    }
}

/// Raises the soft limit on open files to the hard one: each connection takes one, and
/// `max_connections` defaults to 1024, the usual soft limit.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit read or write the struct owned here.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The pids of the children the daemon started itself (steps, git jobs): the sweep
/// neither kills nor reaps them.
static TRACKED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

fn tracked() -> MutexGuard<'static, Option<HashSet<i32>>> {
    TRACKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child the daemon waits for itself; untracked when dropped.
pub struct Tracked(i32);

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(set) = tracked().as_mut() {
            set.remove(&self.0);
        }
    }
}

/// Spawns `cmd` and tracks its pid, both under the registry's lock, so that a sweep
/// never sees the child untracked, not even if it exits at once.
pub fn spawn_tracked(
    cmd: &mut tokio::process::Command,
) -> std::io::Result<(tokio::process::Child, Tracked)> {
    let mut set = tracked();
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or_default();
    set.get_or_insert_with(HashSet::new).insert(pid);
    Ok((child, Tracked(pid)))
}

/// Forks this process (a child that runs async-signal-safe code only, then `_exit`s)
/// and tracks the child, under the registry's lock as [`spawn_tracked`] does. The
/// child gets `None`.
///
/// # Safety
/// In the child, only async-signal-safe calls may follow: the other threads, and the
/// locks they held (this registry's among them), are not in the copy.
pub(crate) unsafe fn fork_tracked() -> std::io::Result<Option<(i32, Tracked)>> {
    let mut set = tracked();
    // SAFETY: the caller keeps to async-signal-safe calls in the child.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(None),
        pid => {
            set.get_or_insert_with(HashSet::new).insert(pid);
            Ok(Some((pid, Tracked(pid))))
        }
    }
}

/// The pids of the children started with [`spawn_tracked`] and not yet dropped.
pub fn tracked_children() -> HashSet<i32> {
    tracked().clone().unwrap_or_default()
}
