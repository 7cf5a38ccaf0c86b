//! `run_as_uids`: a uid of its own for each run that runs at once. With one `run_as`
//! user, the steps of two runs are one user: each can read the other's environment
//! (`/proc/PID/environ`, its pipeline's secrets included), signal it and change its
//! files. With a range, a run takes a uid of the range no other running run holds,
//! keeps it until its last process is gone, and its steps run with that uid and
//! `run_as`'s groups; the uids need no account, and the range must hold none.
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
        let number = |v: &str| v.trim().parse::<u32>().map_err(|_| bad());
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
        if let Some((uid, name)) =
            (range.first..=range.last).find_map(|u| account(u).map(|n| (u, n)))
        {
            return Err(format!(
                "run_as_uids {text:?} holds uid {uid}, user {name:?}'s: steps would get that user's files and processes; choose uids no account has"
            ));
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

/// The name of the account with `uid`, if one has it.
fn account(uid: u32) -> Option<String> {
    let mut buf = vec![0 as c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwuid_r to fill in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: every pointer is to memory owned here and sized as passed.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_name points at a terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
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
    fn drop(&mut self) {
        lock(&self.free).push_back(self.user.uid);
    }
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
            ("2000000000-2000100000", "more than the 4096"),
            // Debian's nobody: uid 65534.
            ("65530-65535", "user \"nobody\"'s"),
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

    #[test]
    fn runs_at_once_hold_distinct_uids_and_a_freed_one_goes_last() {
        let uids = BuildUids::new(base(), range(100, 102));
        let a = uids.take(None).unwrap();
        let b = uids.take(None).unwrap();
        let c = uids.take(None).unwrap();
        assert_eq!([a.user().uid, b.user().uid, c.user().uid], [100, 101, 102]);
        assert!(uids.take(None).is_none(), "every uid is held");
        assert_eq!(
            (a.user().gid, a.user().name.as_str()),
            (64001, "64000:64001")
        );
        drop(b);
        drop(a);
        // 101 has been free the longest; 100 is kept for whoever asks for it.
        let next = uids.take(None).unwrap();
        assert_eq!(next.user().uid, 101);
        let asked = uids.take(Some(100)).unwrap();
        assert_eq!(asked.user().uid, 100);
        drop(next);
        // A uid another run holds, or one not of the range, is not given: a free one is.
        assert_eq!(uids.take(Some(102)).unwrap().user().uid, 101);
        assert_eq!(uids.take(Some(7)).unwrap().user().uid, 101);
    }
}
