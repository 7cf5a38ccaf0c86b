//! `run_as_uids`: a uid of its own for each run that runs at once. With one `run_as`
//! user, the steps of two runs are one user: each can read the other's environment
//! (`/proc/PID/environ`, its pipeline's secrets included), signal it and change its
//! files. With a range, a run takes a uid of the range no other running run holds,
//! keeps it until its last process is gone, and its steps run with that uid and
//! `run_as`'s groups; the uids need no account, and the range must hold none.
//!
//! A uid goes back to the range only once no process of it can run on: its run's
//! cgroup or sweep ends what the run started, and then a process that takes the uid
//! SIGKILLs everything else of it (`end_all_of`); a uid that could not be swept so is
//! kept out, and tried again later. The range is swept so when the daemon starts.
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
    /// Steps get `base`'s name (as `USER`) and groups, and a uid of `range`. Every
    /// process of the range's uids is ended first (a crash's leftovers, where no
    /// cgroup held them): a uid only joins the free ones once nothing of it can run on.
    /// `Err` when that cannot be done at all (the daemon cannot take the uids, or give
    /// up its capabilities): runs would wait for ever. Blocks for a fork per uid.
    pub fn start(base: RunAs, range: UidRange) -> Result<BuildUids, String> {
        let uids = BuildUids {
            base: RunAs {
                no_new_privs: true,
                ..base
            },
            range,
            free: Arc::new(Mutex::new(VecDeque::new())),
        };
        for uid in range.first..=range.last {
            match kill_as(uid) {
                Ok(()) => lock(&uids.free).push_back(uid),
                Err(Sweep::Refused(why)) => {
                    return Err(format!(
                        "run_as_uids: cannot end the processes of uid {uid}: {why}"
                    ))
                }
                Err(Sweep::Failed(_)) => give_back(uid, Arc::clone(&uids.free)),
            }
        }
        Ok(uids)
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
    /// longest; `None` while every uid is held (or kept out, see [`give_back`]).
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

/// A uid held by one run; given back when dropped, which is once the run's cgroup or
/// sweep has ended what it started.
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
    /// Blocks for as long as ending the uid's processes takes: a fork and a signal,
    /// when the run left nothing.
    fn drop(&mut self) {
        give_back(self.user.uid, Arc::clone(&self.free));
    }
}

/// Ends every process of `uid` and puts it among the free ones, last. A uid whose
/// processes could not be signalled (no fork was possible, say) is kept out, and tried
/// again from a thread of its own, at growing intervals, until they are.
fn give_back(uid: u32, free: Arc<Mutex<VecDeque<u32>>>) {
    let why = match end_all_of(uid) {
        Ok(()) => {
            lock(&free).push_back(uid);
            return;
        }
        Err(why) => why,
    };
    tracing::error!(uid, error = %why, "a uid of run_as_uids is kept out until nothing of it is left");
    let retried = std::thread::Builder::new()
        .name("hookci-uid".into())
        .spawn(move || {
            let mut pause = std::time::Duration::from_secs(1);
            loop {
                std::thread::sleep(pause);
                match end_all_of(uid) {
                    Ok(()) => {
                        tracing::info!(uid, "a uid of run_as_uids kept out is free again");
                        lock(&free).push_back(uid);
                        return;
                    }
                    Err(_) => pause = (pause * 2).min(std::time::Duration::from_secs(60)),
                }
            }
        });
    if let Err(e) = retried {
        tracing::error!(uid, error = %e, "cannot try the uid again: kept out until hookci starts again");
    }
}

/// Ends every process of `uid`. A child of the daemon takes the uid, gives up every
/// capability and signals all it may, which is exactly the uid's processes
/// (`kill(-1, SIGKILL)`). The kernel signals them all in one pass, and a process with a
/// SIGKILL pending can fork no more: so once the call returns, no process of the uid
/// runs another instruction of its own (one inside a system call ends when that
/// returns), whatever it did to hide, and without a look at `/proc`, which a unit's
/// `ProtectProc=` may hide from the daemon.
fn end_all_of(uid: u32) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..3 {
        match kill_as(uid) {
            Ok(()) => return Ok(()),
            Err(Sweep::Refused(e) | Sweep::Failed(e)) => last = e,
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(last)
}

/// Why a sweep of one uid did not happen.
#[derive(Debug)]
enum Sweep {
    /// It never can: the daemon cannot take the uid or give up its capabilities.
    Refused(String),
    /// Not this time (no fork was possible, or the child was held up).
    Failed(String),
}

/// How long the child of [`kill_as`] may take: a few system calls.
const SWEEP_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The exit statuses of [`signal_all_as`].
const SIGNALLED: i32 = 0;
const NO_SWITCH: i32 = 1;
const CAPABILITIES_KEPT: i32 = 2;
const SIGNAL_FAILED: i32 = 3;

/// One child of [`end_all_of`]; `Ok` once every process of `uid` has been signalled.
/// Once the child has the uid, the uid's processes may signal it too: one that stops it
/// is answered with SIGCONT, and a child that has not ended within [`SWEEP_LIMIT`] is
/// killed and the sweep counted as failed.
fn kill_as(uid: u32) -> Result<(), Sweep> {
    // SAFETY: the child makes plain system calls on its own stack and exits; nothing
    // in it allocates or takes a lock another thread may have held at the fork.
    // Tracked, so that no run's sweep kills or reaps it meanwhile.
    let forked = unsafe { crate::process::fork_tracked() };
    let (pid, _tracked) = match forked {
        Err(e) => {
            return Err(Sweep::Failed(format!(
                "cannot fork to end the uid's processes: {e}"
            )))
        }
        // SAFETY: as above; `_exit` never returns.
        Ok(None) => unsafe { libc::_exit(signal_all_as(uid)) },
        Ok(Some(child)) => child,
    };
    let deadline = std::time::Instant::now() + SWEEP_LIMIT;
    let mut status = 0;
    let ended = loop {
        // SAFETY: waits for the child forked above, writing its status to a local.
        let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::WUNTRACED) };
        if got == pid && libc::WIFSTOPPED(status) {
            // SAFETY: signals the child forked above, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        } else if got == pid {
            break true;
        } else if got < 0
            && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
        {
            break false;
        }
        if std::time::Instant::now() >= deadline {
            // SAFETY: as above; then reaped, whatever it was doing.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above.
            while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            {
            }
            break false;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    };
    if !ended {
        return Err(Sweep::Failed(
            "the child ending the uid's processes did not end in time".into(),
        ));
    }
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(SIGNALLED) => Ok(()),
        Some(NO_SWITCH) => Err(Sweep::Refused("the daemon cannot take the uid".into())),
        Some(CAPABILITIES_KEPT) => Err(Sweep::Refused(
            "the daemon cannot give up its capabilities as the uid".into(),
        )),
        Some(SIGNAL_FAILED) => Err(Sweep::Refused("kill(-1) failed as the uid".into())),
        _ => Err(Sweep::Failed(format!(
            "the child ending the uid's processes ended with status {status:#x}"
        ))),
    }
}

/// The child's part of [`kill_as`]: its exit status.
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
    let (mut real, mut effective, mut saved) = (0, 0, 0);
    // SAFETY: system calls on locals. The uid first (it needs CAP_SETUID) and checked
    // (a uid the call could not represent must not leave the child root or hookci),
    // then not dumpable (a process of the uid must not read the daemon's memory in
    // it), then every capability given up: a non-root daemon keeps its capabilities
    // across the change, and with CAP_KILL `kill(-1)` would reach every process of
    // the machine.
    unsafe {
        if libc::setresuid(uid, uid, uid) != 0
            || libc::getresuid(&mut real, &mut effective, &mut saved) != 0
            || [real, effective, saved] != [uid; 3]
        {
            return NO_SWITCH;
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0
        {
            return CAPABILITIES_KEPT;
        }
        header.version = VERSION_3;
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0
            || data.iter().any(|d| d.effective != 0 || d.permitted != 0)
        {
            return CAPABILITIES_KEPT;
        }
        // Processes it may not signal are passed over; ESRCH: no other process at all.
        if libc::kill(-1, libc::SIGKILL) != 0 && *libc::__errno_location() != libc::ESRCH {
            return SIGNAL_FAILED;
        }
    }
    SIGNALLED
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

    /// `sleep 600` as `uid`, in a session of its own (as an escaped process would be),
    /// tracked as the daemon's steps are, so no other test's sweep ends it.
    fn sleeper(uid: u32) -> (tokio::process::Child, crate::process::Tracked) {
        let mut cmd = tokio::process::Command::new("sleep");
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
        crate::process::spawn_tracked(&mut cmd).unwrap()
    }

    /// Whether `pid` has uid `uid` yet (it takes it between fork and exec).
    fn has_uid(pid: u32, uid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines().any(|l| {
                l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string())
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_uid_given_back_has_every_process_of_it_ended_and_no_other() {
        assert!(
            crate::run::user::is_root(),
            "this test needs root (CI runs as root): it starts processes as other uids"
        );
        let (uid, other) = (2_000_000_100, 2_000_000_101);
        let uids = BuildUids::start(base(), range(uid, uid)).unwrap();
        let held = uids.take(None).unwrap();
        assert!(
            held.user().no_new_privs,
            "a step could run a setuid file of the uid"
        );
        let theirs = [sleeper(uid), sleeper(uid)];
        let (mut bystander, _tracked) = sleeper(other);
        let pids: Vec<u32> = theirs.iter().map(|(c, _)| c.id().unwrap()).collect();
        let switched = |b: &tokio::process::Child| {
            pids.iter().all(|&p| has_uid(p, uid)) && has_uid(b.id().unwrap(), other)
        };
        for _ in 0..200 {
            if switched(&bystander) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(switched(&bystander), "the sleepers did not take their uids");
        // Waited for meanwhile, as the daemon waits for its children: the killed ones
        // do not stay zombies.
        let waits: Vec<_> = theirs
            .into_iter()
            .map(|(mut child, tracked)| {
                tokio::spawn(async move {
                    let status = child.wait().await.unwrap();
                    drop(tracked);
                    status
                })
            })
            .collect();
        tokio::task::spawn_blocking(move || drop(held))
            .await
            .unwrap();
        for wait in waits {
            let status = wait.await.unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(libc::SIGKILL)
            );
        }
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "a process of another uid was ended"
        );
        assert_eq!(
            uids.take(None).unwrap().user().uid,
            uid,
            "the uid is free again"
        );
        bystander.kill().await.unwrap();
    }

    #[test]
    fn runs_at_once_hold_distinct_uids_and_a_freed_one_goes_last() {
        assert!(
            crate::run::user::is_root(),
            "this test needs root (CI runs as root): a uid given back has its processes ended as that uid"
        );
        // No account's.
        const U: u32 = 2_000_000_200;
        let uids = BuildUids::start(base(), range(U, U + 2)).unwrap();
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
