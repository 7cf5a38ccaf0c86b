//! `run_as`: the user every step runs as. Resolves the user once (at config load),
//! switches a step's child to it before its shell starts, checks that the daemon can
//! switch at all (root, or the capabilities), and checks that what the daemon keeps
//! secret is out of that user's reach. The daemon itself and its git worker never
//! switch.

use std::ffi::{CStr, CString};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::{chownat, openat, statat, AtFlags, Dir, FileType, Gid, Mode, OFlags, Uid, CWD};
use rustix::io::Errno;

/// A resolved `run_as` user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// As the config gave it (a name, or `uid:gid`).
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// The supplementary groups, the primary one included.
    pub groups: Vec<libc::gid_t>,
    /// Steps get `PR_SET_NO_NEW_PRIVS`: a setuid or setgid file, or one with file
    /// capabilities, runs without them. Set for the uids of `run_as_uids`, which one
    /// run after another has: a setuid file one run left must not give a later run
    /// (or any other user) the uid while another run holds it.
    pub no_new_privs: bool,
}

impl RunAs {
    /// `name` is a user name (its groups come from the group database) or `uid:gid`
    /// (that group only).
    pub fn resolve(name: &str) -> Result<RunAs, String> {
        if let Some((uid, gid)) = name.split_once(':') {
            let parse = |what: &str, v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("run_as {name:?}: {what} {v:?} is not a number"))
            };
            let (uid, gid) = (parse("uid", uid)?, parse("gid", gid)?);
            if uid == 0 {
                return Err(format!("run_as {name:?}: steps must not run as root"));
            }
            return Ok(RunAs {
                name: name.to_owned(),
                uid,
                gid,
                groups: vec![gid],
                no_new_privs: false,
            });
        }
        let cname = CString::new(name).map_err(|_| format!("run_as {name:?}: not a user name"))?;
        let (uid, gid) = lookup_user(&cname)
            .ok_or_else(|| format!("run_as {name:?}: no such user (create it, or give uid:gid)"))?;
        if uid == 0 {
            return Err(format!("run_as {name:?}: steps must not run as root"));
        }
        Ok(RunAs {
            name: name.to_owned(),
            uid,
            gid,
            groups: group_list(&cname, gid),
            no_new_privs: false,
        })
    }

    /// Whether this user may read `path` (a file) or look into it (a directory): every
    /// folder above it lets the user through, and the path itself lets the user read
    /// (a file) or read or enter (a directory). `None` when it cannot; else why it can.
    pub fn can_read(&self, path: &Path) -> Option<String> {
        let path = std::fs::canonicalize(path).ok()?;
        for dir in path.ancestors().skip(1) {
            let meta = std::fs::metadata(dir).ok()?;
            if !self.allowed(&meta, 0o1) {
                return None;
            }
        }
        let meta = std::fs::metadata(&path).ok()?;
        let wanted = if meta.is_dir() { 0o5 } else { 0o4 };
        self.allowed(&meta, wanted).then(|| {
            format!(
                "{} (mode {:04o}, owner {}:{}) is readable by run_as user {}",
                path.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                self.name
            )
        })
    }

    /// Whether the permission class that applies to this user grants any of `bits`
    /// (in `rwx` = 4, 2, 1 form).
    fn allowed(&self, meta: &std::fs::Metadata, bits: u32) -> bool {
        let mode = meta.mode();
        let class = if meta.uid() == self.uid {
            mode >> 6
        } else if meta.gid() == self.gid || self.groups.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        class & bits != 0
    }

    /// The switch, for a child between fork and exec: groups, then group, then user
    /// (the other way round the user would no longer be allowed to change its groups).
    ///
    /// # Safety
    /// Only async-signal-safe calls: for `pre_exec`.
    pub unsafe fn switch(&self) -> std::io::Result<()> {
        // SAFETY: plain syscalls on data owned by self, which outlives the call.
        unsafe {
            if libc::setgroups(self.groups.len() as _, self.groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if self.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

fn lookup_user(name: &CStr) -> Option<(libc::uid_t, libc::gid_t)> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwnam_r to fill in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: every pointer is to memory owned here and sized as passed.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

fn group_list(name: &CStr, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: `groups` holds `n` entries; getgrouplist writes at most that many
        // and says how many it needs.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        if groups.len() >= 65536 {
            return vec![gid];
        }
        groups.resize((n.max(0) as usize).max(groups.len() * 2), 0);
    }
}

/// A capability the daemon needs for `run_as`, and its bit in `/proc/self/status`.
const NEEDED: [(&str, u32); 5] = [
    ("CAP_SETUID", 7),
    ("CAP_SETGID", 6),
    // Hands the checkout to the run's user.
    ("CAP_CHOWN", 0),
    // Removes what the run's user left in its workspace and home.
    ("CAP_DAC_OVERRIDE", 1),
    // Stops a step that times out or is canceled: its process group is the run's
    // user's, and a run's cgroup only ends what is left once the step's shell is gone.
    ("CAP_KILL", 5),
];

/// The capabilities the daemon lacks to run steps as another user.
pub fn missing_capabilities() -> Vec<&'static str> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    NEEDED
        .iter()
        .filter(|(_, bit)| effective & (1 << bit) == 0)
        .map(|(name, _)| *name)
        .collect()
}

/// Whether the daemon runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Gives `path` and everything under it to the user (the checkout the git worker made
/// as the daemon). Symbolic links are changed themselves, never what they point to.
/// What the user owns already is left as it is: a chown changes a file's ctime even
/// when it gives nothing, and a reused workspace's `keep:` paths would be touched on
/// every run.
///
/// Steps of other runs, which run as the same user, may change the tree meanwhile
/// (what is given already is theirs to change, and a reused workspace is theirs
/// throughout). So below `path` nothing is looked up by a path from the top again:
/// each directory is opened once, relative to its parent's descriptor and without
/// following a link, and its entries are examined and changed relative to it. A
/// directory swapped for a link to `/etc` while the walk goes on is then a link, which
/// is given, not entered. `path` itself is reached through the state directory, which
/// is the daemon's.
pub fn chown_tree(path: &Path, user: &RunAs) -> std::io::Result<()> {
    give_tree(path, user, false)
}

/// [`chown_tree`] for a reused workspace: everything but its `.git`, which stays the
/// daemon's (the update checks that it is; see `git::checkout`).
pub fn chown_work_tree(path: &Path, user: &RunAs) -> std::io::Result<()> {
    give_tree(path, user, true)
}

/// How many directories deep a tree is given away: far more than any checkout or build
/// holds (paths stop at 4,096 bytes), and a bound on the directories the walk holds
/// open. A step can nest directories without end in a kept path; such a tree is
/// refused, not walked.
const MAX_DEPTH: usize = 512;

/// The walk of [`chown_tree`], on a stack of open directories rather than the call
/// stack; `skip_git`: not the `.git` directly inside `path`.
fn give_tree(path: &Path, user: &RunAs, skip_git: bool) -> std::io::Result<()> {
    let Some(top) = give(CWD, path, user)? else {
        return Ok(());
    };
    let mut open = vec![top];
    loop {
        let at_top = open.len() == 1;
        let Some(dir) = open.last_mut() else {
            return Ok(());
        };
        let Some(entry) = dir.read() else {
            open.pop();
            continue;
        };
        let entry = entry?;
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." || (skip_git && at_top && bytes == b".git") {
            continue;
        }
        let inside = match give(dir.fd()?, name, user) {
            Ok(inside) => inside,
            // Removed by a step meanwhile: nothing left to give.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Some(inside) = inside {
            if open.len() >= MAX_DEPTH {
                return Err(std::io::Error::other(format!(
                    "{} holds directories more than {MAX_DEPTH} deep",
                    path.display()
                )));
            }
            open.push(inside);
        }
    }
}

/// Gives `name` (relative to `dir`), and opens it if it is a directory, without
/// following a link either time. A file with other links is left as it is: with
/// `fs.protected_hardlinks` off, a step can link someone else's file into the tree.
fn give<P: rustix::path::Arg + Copy>(
    dir: BorrowedFd<'_>,
    name: P,
    user: &RunAs,
) -> std::io::Result<Option<Dir>> {
    let stat = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
    let theirs = stat.st_uid == user.uid && stat.st_gid == user.gid;
    if !theirs && (is_dir || stat.st_nlink <= 1) {
        chownat(
            dir,
            name,
            Some(Uid::from_raw(user.uid)),
            Some(Gid::from_raw(user.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    if !is_dir {
        return Ok(None);
    }
    match openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(Dir::new(fd)?)),
        // No longer a directory (swapped for a link or a file since): given above as
        // what it was, and not followed.
        Err(Errno::LOOP | Errno::NOTDIR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step can nest directories without end (in a kept `target/`, say): the walk
    /// refuses such a tree rather than follow it down (its old recursion overflowed the
    /// stack of the daemon's thread, and aborted the daemon, at some depth).
    #[test]
    fn a_tree_nested_deeper_than_the_bound_is_refused() {
        assert!(
            is_root(),
            "this test needs root (CI runs as root): only root gives files away"
        );
        let tmp = tempfile::tempdir().unwrap();
        let mut deep = tmp.path().join("ws");
        for _ in 0..=MAX_DEPTH {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let user = RunAs::resolve("54321:54321").unwrap();
        let err = chown_tree(&tmp.path().join("ws"), &user).unwrap_err();
        assert!(err.to_string().contains("deep"), "{err}");
        let mut shallow = tmp.path().join("shallow");
        for _ in 0..MAX_DEPTH - 1 {
            shallow.push("d");
        }
        std::fs::create_dir_all(&shallow).unwrap();
        chown_tree(&tmp.path().join("shallow"), &user).unwrap();
        assert_eq!(std::fs::metadata(&shallow).unwrap().uid(), 54321);
    }

    /// A step of another run (the same user) swaps a directory of the tree being given
    /// with a link to a directory outside, over and over, while the daemon gives the
    /// tree away again and again: nothing outside is ever given.
    #[test]
    fn giving_a_tree_away_never_follows_a_directory_swapped_for_a_link_meanwhile() {
        use rustix::fs::{renameat_with, RenameFlags};
        use std::os::unix::fs::{lchown, symlink};
        assert!(
            is_root(),
            "this test needs root (CI runs as root): only root gives files away"
        );
        let tmp = tempfile::tempdir().unwrap();
        let (tree, outside) = (tmp.path().join("ws"), tmp.path().join("etc"));
        std::fs::create_dir_all(tree.join("d/sub")).unwrap();
        std::fs::write(tree.join("d/sub/shadow"), "mine").unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("shadow"), "root's").unwrap();
        symlink(&outside, tree.join("d/alt")).unwrap();
        let user = RunAs::resolve("54321:54321").unwrap();

        let stop = std::sync::atomic::AtomicBool::new(false);
        let d = std::fs::File::open(tree.join("d")).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    renameat_with(&d, "sub", &d, "alt", RenameFlags::EXCHANGE).unwrap();
                }
            });
            for _ in 0..3000 {
                chown_tree(&tree, &user).unwrap();
                let owners = [&outside, &outside.join("shadow")]
                    .map(|p| std::fs::metadata(p).unwrap().uid());
                if owners != [0, 0] {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    panic!("a file outside the tree was given away");
                }
                // The tree the daemon's again, so that the next walk gives it all anew.
                for path in ["", "d", "d/sub", "d/alt", "d/sub/shadow", "d/alt/shadow"] {
                    let _ = lchown(tree.join(path), Some(0), Some(0));
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }

    #[test]
    fn numeric_users_resolve_and_root_is_refused() {
        let u = RunAs::resolve("12345:23456").unwrap();
        assert_eq!(
            (u.uid, u.gid, u.groups.clone()),
            (12345, 23456, vec![23456])
        );
        assert!(RunAs::resolve("0:0").unwrap_err().contains("root"));
        assert!(RunAs::resolve("root").unwrap_err().contains("root"));
        assert!(RunAs::resolve("x:y").unwrap_err().contains("not a number"));
        assert!(RunAs::resolve("no-such-user-hookci")
            .unwrap_err()
            .contains("no such user"));
    }

    #[test]
    fn readable_follows_the_permission_class() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let other = RunAs::resolve("54321:54321").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(other.can_read(&file).is_some());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(other.can_read(&file).is_none());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(other.can_read(&file).is_none(), "its folder keeps it out");
    }
}
