//! `run_as_uids`: a uid of its own for each run that runs at once. With one `run_as`
//! user, the steps of two runs are one user: each can read the other's environment
//! (`/proc/PID/environ`, its pipeline's secrets included), signal it and change its
//! files. With a range, a run takes a uid of the range no other running run holds,
//! keeps it until its last process is gone, and its steps run with that uid and
//! `run_as`'s groups; the uids need no account, and the range must hold none.
//!
//! A uid goes back to the range only once no process of it is left: its run's cgroup
//! or sweep ends what the run started, and then a process that takes the uid signals
//! everything else of it (`end_all_of`); a uid something of which survives even that
//! is kept out until the next start, which ends every process of the range first.
//!
//! A reused workspace belongs to the uid its last run had, and asks for it again: it
//! is then not given away anew (every file of a big tree, a `target/` included). A run
//! of a fresh workspace takes the uid free the longest, so the uids a slot last had
//! stay free for it as long as the range allows.

use std::collections::VecDeque;
use std::ffi::c_char;
use std::sync::{Arc, Mutex};

use crate::run::user::RunAs;

/// The largest range `run_as_uids` takes: each of its uids is checked for an account
/// at load, and more runs than this never run at once.
pub const MAX_UIDS: u32 = 4096;

/// A range of uids, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// `FIRST-LAST`, e.g. `2000000000-2000000015`: no uid 0, at most [`MAX_UIDS`], and
    /// none of them a user's (`getpwuid`) or the daemon's own.
    pub fn parse(text: &str) -> Result<UidRange, String> {
        let bad = || {
            format!("run_as_uids {text:?} is not a range of uids: give FIRST-LAST, e.g. 2000000000-2000000015")
        };
        let (first, last) = text.trim().split_once('-').ok_or_else(bad)?;
        let number = |v: &str| {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            v.parse::<u32>().map_err(|_| bad())
        };
        let range = UidRange {
            first: number(first)?,
            last: number(last)?,
        };
        if range.first == 0 {
            return Err(format!(
                "run_as_uids {text:?} holds uid 0: steps must not run as root"
            ));
        }
        if range.last < range.first {
            return Err(format!(
                "run_as_uids {text:?}: the last uid is below the first"
            ));
        }
        // What chown and setuid read as "no uid", in 32 and 16 bits.
        if let Some(none) = [u32::MAX, u32::from(u16::MAX)]
            .into_iter()
            .find(|&u| range.holds(u))
        {
            return Err(format!(
                "run_as_uids {text:?} holds {none}, which the system reads as no uid at all"
            ));
        }
        if range.count() > MAX_UIDS as usize {
            return Err(format!(
                "run_as_uids {text:?} holds {} uids, more than the {MAX_UIDS} hookci takes",
                range.count()
            ));
        }
        // SAFETY: geteuid cannot fail and touches no memory.
        let own = unsafe { libc::geteuid() };
        if range.holds(own) {
            return Err(format!(
                "run_as_uids {text:?} holds uid {own}, which hookci runs as"
            ));
        }
        for uid in range.first..=range.last {
            match account(uid) {
                Ok(None) => {}
                Ok(Some(name)) => {
                    return Err(format!(
                        "run_as_uids {text:?} holds uid {uid}, user {name:?}'s: steps would get that user's files and processes; choose uids no account has"
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "run_as_uids {text:?}: cannot tell whether an account has uid {uid}: {e}"
                    ))
                }
            }
        }
        Ok(range)
    }

    pub fn count(&self) -> usize {
        (self.last - self.first) as usize + 1
    }

    pub fn holds(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

/// The name of the account with `uid`, if one has it; an error when the user database
/// cannot say.
fn account(uid: u32) -> std::io::Result<Option<String>> {
    let mut buf = vec![0 as c_char; 16 * 1024];
    loop {
        // SAFETY: an all-zero passwd is a valid value for getpwuid_r to fill in.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result = std::ptr::null_mut();
        // SAFETY: every pointer is to memory owned here and sized as passed.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => {
                // SAFETY: getpwuid_r succeeded, so pw_name points at a terminated string
                // in `buf`.
                let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
                return Ok(Some(name.to_string_lossy().into_owned()));
            }
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            // "Not found", as some user databases say it.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            rc => return Err(std::io::Error::from_raw_os_error(rc)),
        }
    }
}

/// The uids of a range not held by a running run, the one free the longest first.
#[derive(Debug)]
pub struct BuildUids {
    base: RunAs,
    range: UidRange,
    free: Arc<Mutex<VecDeque<u32>>>,
}

impl BuildUids {
    /// Steps get `base`'s name (as `USER`) and groups, and a uid of `range`.
    pub fn new(base: RunAs, range: UidRange) -> BuildUids {
        BuildUids {
            base,
            range,
            free: Arc::new(Mutex::new((range.first..=range.last).collect())),
        }
    }

    /// How many runs can hold a uid at once.
    pub fn count(&self) -> usize {
        self.range.count()
    }

    fn user(&self, uid: u32) -> RunAs {
        RunAs {
            uid,
            ..self.base.clone()
        }
    }

    /// A uid for a run: `prefer` if it is of the range and free, else the one free the
    /// longest; `None` when every uid is held.
    pub fn take(&self, prefer: Option<u32>) -> Option<BuildUid> {
        let mut free = lock(&self.free);
        let at = prefer
            .and_then(|p| free.iter().position(|&u| u == p))
            .unwrap_or(0);
        let uid = free.remove(at)?;
        Some(BuildUid {
            user: self.user(uid),
            free: Arc::clone(&self.free),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A uid held by one run; free again when dropped, which is once the run's last
/// process is gone.
#[derive(Debug)]
pub struct BuildUid {
    user: RunAs,
    free: Arc<Mutex<VecDeque<u32>>>,
}

impl BuildUid {
    pub fn user(&self) -> &RunAs {
        &self.user
    }
}

impl Drop for BuildUid {
    /// Blocks for as long as ending the uid's processes takes (a fork, a signal and a
    /// look at `/proc`; longer only when something of it survives).
    fn drop(&mut self) {
        let uid = self.user.uid;
        if end_all_of(uid) {
            lock(&self.free).push_back(uid);
        } else {
            tracing::error!(
                uid,
                "a process of this run_as_uids uid survived its run and a SIGKILL: the uid is kept out of the range until hookci starts again"
            );
        }
    }
}

/// At start, before any run: ends every process of a uid of `range` (a crash's
/// leftovers, where no cgroup held them).
pub fn end_leftovers(range: UidRange) {
    for uid in holders(|u| range.holds(u)) {
        tracing::warn!(uid, "ending the processes a run of run_as_uids left");
        if !end_all_of(uid) {
            // Only a process inside a system call outlives SIGKILL, until it returns.
            tracing::error!(
                uid,
                "a process of this run_as_uids uid has not ended yet on SIGKILL"
            );
        }
    }
}

/// Ends every process of `uid` and says whether none is left (zombies, which hold
/// nothing, aside). A child of the daemon takes the uid, gives up every capability and
/// signals all it may, which is exactly the uid's processes (`kill(-1)`): a process
/// forking meanwhile cannot slip between a look and a kill, as the kernel signals them
/// all at once.
fn end_all_of(uid: u32) -> bool {
    for _ in 0..3 {
        if let Err(e) = kill_as(uid) {
            tracing::error!(uid, error = %e, "cannot end the processes of a run_as_uids uid");
            return false;
        }
        if holders(|u| u == uid).is_empty() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// The uids (real, effective or saved) that `wanted` picks and that a live process
/// (not a zombie) has, from `/proc`.
fn holders(wanted: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        // Gone meanwhile: nothing to end.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        let uids = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .map(|l| {
                l.split_whitespace()
                    .take(3)
                    .filter_map(|v| v.parse::<u32>().ok())
            });
        for uid in uids.into_iter().flatten() {
            if !zombie && wanted(uid) && !found.contains(&uid) {
                found.push(uid);
            }
        }
    }
    found
}

/// `kill(-1, SIGKILL)` as `uid` alone, from a child: with no capability left, that
/// signals every process of the uid and nothing else.
fn kill_as(uid: u32) -> std::io::Result<()> {
    // SAFETY: the child makes plain system calls on its own stack and exits; nothing
    // in it allocates or takes a lock another thread may have held at the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: as above; `_exit` never returns.
        unsafe { libc::_exit(signal_all_as(uid)) }
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above, writing its status to a local.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => Ok(()),
        _ => Err(std::io::Error::other(format!(
            "the child that was to take uid {uid} and signal its processes failed (status {status:#x})"
        ))),
    }
}

/// The child's part of [`kill_as`]; its exit status (0: signalled, or nothing to).
fn signal_all_as(uid: u32) -> libc::c_int {
    const VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let none = Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    };
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [none; 2];
    // SAFETY: raw system calls on locals. The uid first (it needs CAP_SETUID), then
    // every capability given up: a non-root daemon keeps its capabilities across the
    // change, and with CAP_KILL `kill(-1)` would reach every process of the machine.
    unsafe {
        if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            || libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0
        {
            return 1;
        }
        header.version = VERSION_3;
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0
            || data.iter().any(|d| d.effective != 0 || d.permitted != 0)
        {
            return 2;
        }
        // ESRCH: no process of the uid to signal.
        if libc::kill(-1, libc::SIGKILL) != 0 && *libc::__errno_location() != libc::ESRCH {
            return 3;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RunAs {
        RunAs::resolve("64000:64001").unwrap()
    }

    fn range(first: u32, last: u32) -> UidRange {
        UidRange { first, last }
    }

    #[test]
    fn ranges_parse_and_bad_ones_say_why() {
        assert_eq!(
            UidRange::parse("2000000000-2000000003").unwrap(),
            range(2_000_000_000, 2_000_000_003)
        );
        for (text, why) in [
            ("2000000000", "not a range of uids"),
            ("a-b", "not a range of uids"),
            ("0-3", "holds uid 0"),
            ("2000000003-2000000000", "below the first"),
            ("+2000000000-+2000000003", "not a range of uids"),
            ("4294967290-4294967295", "no uid at all"),
            ("65535-65535", "no uid at all"),
            ("2000000000-2000100000", "more than the 4096"),
            // Debian's nobody: uid 65534.
            ("65530-65534", "user \"nobody\"'s"),
        ] {
            let e = UidRange::parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        // SAFETY: geteuid cannot fail and touches no memory.
        let own = unsafe { libc::geteuid() };
        let e = UidRange::parse(&format!("{own}-{own}")).unwrap_err();
        // Root's is uid 0, refused as such; another's may be an account's too.
        let why = if own == 0 { "holds uid 0" } else { "holds uid" };
        assert!(e.contains(why), "{e}");
    }

    /// `sleep 600` as `uid`, in a session of its own (as an escaped process would be).
    fn sleeper(uid: u32) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600");
        // SAFETY: setsid and setuid are plain system calls, fine between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    }

    fn alive(child: &mut std::process::Child) -> bool {
        child.try_wait().unwrap().is_none()
    }

    #[test]
    fn a_uid_given_back_has_every_process_of_it_ended_and_no_other() {
        assert!(
            crate::run::user::is_root(),
            "this test needs root (CI runs as root): it starts processes as other uids"
        );
        let (uid, other) = (2_000_000_100, 2_000_000_101);
        let mut theirs = [sleeper(uid), sleeper(uid)];
        let mut bystander = sleeper(other);
        let uids = BuildUids::new(base(), range(uid, uid));
        let held = uids.take(None).unwrap();
        // The /proc walk sees the processes once they have their uid.
        for _ in 0..200 {
            if holders(|u| u == uid).len() == 1 && holders(|u| u == other).len() == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(holders(|u| u == uid), [uid]);
        drop(held);
        for child in &mut theirs {
            let status = child.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(libc::SIGKILL)
            );
        }
        assert!(alive(&mut bystander), "a process of another uid was ended");
        assert!(holders(|u| u == uid).is_empty());
        assert_eq!(
            uids.take(None).unwrap().user().uid,
            uid,
            "the uid is free again"
        );
        bystander.kill().unwrap();
        bystander.wait().unwrap();
    }

    #[test]
    fn runs_at_once_hold_distinct_uids_and_a_freed_one_goes_last() {
        // No account's: a uid given back has its processes ended.
        const U: u32 = 2_000_000_200;
        let uids = BuildUids::new(base(), range(U, U + 2));
        let a = uids.take(None).unwrap();
        let b = uids.take(None).unwrap();
        let c = uids.take(None).unwrap();
        assert_eq!(
            [a.user().uid, b.user().uid, c.user().uid],
            [U, U + 1, U + 2]
        );
        assert!(uids.take(None).is_none(), "every uid is held");
        assert_eq!(
            (a.user().gid, a.user().name.as_str()),
            (64001, "64000:64001")
        );
        drop(b);
        drop(a);
        // U + 1 has been free the longest; U is kept for whoever asks for it.
        let next = uids.take(None).unwrap();
        assert_eq!(next.user().uid, U + 1);
        let asked = uids.take(Some(U)).unwrap();
        assert_eq!(asked.user().uid, U);
        drop(next);
        // A uid another run holds, or one not of the range, is not given: a free one is.
        assert_eq!(uids.take(Some(U + 2)).unwrap().user().uid, U + 1);
        assert_eq!(uids.take(Some(7)).unwrap().user().uid, U + 1);
    }
}
