//! File operations in a tree that processes of another run (a build's steps, with the
//! same uid) may change while hookci works in it: every operation after the first open
//! is relative to an open directory descriptor and follows no symbolic link, so a
//! directory swapped for a link between a check and an operation cannot send a removal
//! or a write out of the tree. Removals also get past directories a step left without
//! write permission (`chmod a-w`, a module cache's 0555 directories): one hookci's own
//! user owns is given its owner's rwx, and the removal is tried again.
//!
//! Serves the git stage (a reused workspace's update and its replacement) and the run
//! stage (a run's workspace and `HOME` at its end, leftovers at startup). Knows nothing
//! of git, runs or the store. Blocks: call it off the async runtime.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

/// A directory opened to be read and worked in; a link in its place is refused.
const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the directory at `path` (the root of a walk): a link at `path` itself is
/// refused, one above it followed (those directories are hookci's own).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, DIR, Mode::empty())?)
}

/// Opens `name` in `dir` if it is a real directory (`NotADirectory` for a link, a file
/// or anything else). One hookci's user owns but may not read is made readable first.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    match rustix::fs::openat(dir, name, DIR, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(e) if e == Errno::ACCESS => {
            // Located without reading it: search permission on `dir` is enough.
            let path = rustix::fs::openat(dir, name, OFlags::PATH | DIR, Mode::empty())
                .map_err(not_a_dir)?;
            if grant_owner(path.as_fd())? {
                Ok(rustix::fs::openat(dir, name, DIR, Mode::empty())?)
            } else {
                Err(e.into())
            }
        }
        Err(e) => Err(not_a_dir(e)),
    }
}

/// Opens the directory `rel` (`/`-separated, relative to `root`), making each missing
/// one and replacing each in the way that is not a real directory (a link, a file), so
/// what is made below it stays below `root`.
pub fn make_dirs_at(root: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    let mut parts = rel.split('/');
    let first = parts.next().unwrap_or_default();
    let mut dir = make_dir_at(root, OsStr::new(first))?;
    for part in parts {
        dir = make_dir_at(dir.as_fd(), OsStr::new(part))?;
    }
    Ok(dir)
}

fn make_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    match open_dir_at(dir, name) {
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => remove_at(dir, name)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    with_access(dir, || {
        rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o777))
    })?;
    open_dir_at(dir, name)
}

/// The directory holding `rel` (relative to `root`) and its last component, if every
/// directory on the way is a real one; `None` where one is missing or is not a
/// directory: behind a link or a file there is nothing of the tree.
pub fn parent_at<'p>(
    root: BorrowedFd<'_>,
    rel: &'p OsStr,
) -> io::Result<Option<(Option<OwnedFd>, &'p OsStr)>> {
    let mut parts = rel
        .as_bytes()
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty());
    let Some(mut name) = parts.next() else {
        return Ok(None);
    };
    let mut dir: Option<OwnedFd> = None;
    for next in parts {
        let at = dir.as_ref().map_or(root, AsFd::as_fd);
        match open_dir_at(at, OsStr::from_bytes(name)) {
            Ok(fd) => dir = Some(fd),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
        name = next;
    }
    Ok(Some((dir, OsStr::from_bytes(name))))
}

/// Removes `rel` (relative to `root`) if every directory on the way there is a real
/// one (see [`parent_at`]); nothing there is fine.
pub fn remove_inside(root: BorrowedFd<'_>, rel: &OsStr) -> io::Result<()> {
    match parent_at(root, rel)? {
        Some((dir, name)) => remove_at(dir.as_ref().map_or(root, AsFd::as_fd), name),
        None => Ok(()),
    }
}

/// Removes the file, link or directory tree at `path`, never following a link in it
/// (one at `path` itself is removed); nothing there is fine.
pub fn remove_all(path: &Path) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no entry of a directory", path.display()),
        )
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = match rustix::fs::open(parent, DIR.difference(OFlags::NOFOLLOW), Mode::empty()) {
        Err(e) if e == Errno::NOENT => return Ok(()),
        other => other?,
    };
    remove_at(dir.as_fd(), name)
}

/// How many directories one removal holds open at once.
const MAX_OPEN: usize = 256;

/// Removes `name` in `dir`, a directory with everything in it; a link is removed, not
/// followed; nothing there is fine.
///
/// The walk keeps its open directories on a stack of its own, not the call stack: a
/// step can nest directories without end (`mkdir d && cd d` in a loop), and the daemon
/// removes what a run left. Past [`MAX_OPEN`] levels a directory is moved up to the top
/// of the removal and emptied from there, so no depth costs more descriptors or stack.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let Some(top) = open_to_remove(dir, name)? else {
        return Ok(());
    };
    let mut open = vec![top];
    let mut moved = 0u64;
    loop {
        let depth = open.len();
        let Some(child) = open.last_mut().and_then(|level| level.left.pop()) else {
            let Some(done) = open.pop() else {
                return Ok(());
            };
            drop(done.fd);
            let parent = open.last().map_or(dir, |level| level.fd.as_fd());
            match remove_empty_dir_at(parent, &done.name) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
            continue;
        };
        let at = open[depth - 1].fd.as_fd();
        if depth < MAX_OPEN {
            if let Some(inner) = open_to_remove(at, &child)? {
                open.push(inner);
            }
            continue;
        }
        if unlink_unless_dir(at, &child)? {
            continue;
        }
        // A directory too deep to hold open as well: under a new name at the top.
        let up = loop {
            moved += 1;
            let up = OsString::from(format!(".hookci-removing-{moved}"));
            let top = open[0].fd.as_fd();
            let rename = || rustix::fs::renameat_with(at, &child, top, &up, RenameFlags::NOREPLACE);
            match with_access(at, rename) {
                Ok(()) => break Some(up),
                Err(e) => match e.raw_os_error().map(Errno::from_raw_os_error) {
                    Some(Errno::EXIST | Errno::NOTEMPTY) => continue,
                    Some(Errno::NOENT) => break None,
                    _ => return Err(e),
                },
            }
        };
        open[0].left.extend(up);
    }
}

/// A directory being removed: its name in its parent, and the names in it left to remove.
struct Level {
    name: OsString,
    fd: OwnedFd,
    left: Vec<OsString>,
}

/// Unlinks `name` in `dir` unless it is a directory, which is opened and listed.
fn open_to_remove(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Level>> {
    if unlink_unless_dir(dir, name)? {
        return Ok(None);
    }
    let fd = match open_dir_at(dir, name) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // Swapped for something else since: that is unlinked, never entered.
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            remove_file_at(dir, name)?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut left = Vec::new();
    // Listed through a duplicate of this descriptor, not a new open of ".", which would
    // need search permission a step may have taken away (`chmod 644 dir`).
    for entry in Dir::new(rustix::io::dup(&fd)?)? {
        let entry = entry?;
        let child = entry.file_name().to_bytes();
        if child != b"." && child != b".." {
            left.push(OsStr::from_bytes(child).to_os_string());
        }
    }
    Ok(Some(Level {
        name: name.to_os_string(),
        fd,
        left,
    }))
}

/// Unlinks `name` in `dir` at once when it is not a directory (no stat first, that a
/// swap could outdate); whether nothing is there now.
fn unlink_unless_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    match with_access(dir, || rustix::fs::unlinkat(dir, name, AtFlags::empty())) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(Errno::ISDIR.raw_os_error()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Unlinks the file or link `name` in `dir`.
pub fn remove_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    with_access(dir, || rustix::fs::unlinkat(dir, name, AtFlags::empty()))
}

/// Removes the empty directory `name` in `dir`.
pub fn remove_empty_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    with_access(dir, || rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR))
}

/// Creates the file `name` in `dir` for writing, with `perm` (less the umask); what is
/// there already, a link too, makes it fail.
pub fn create_new_at(dir: BorrowedFd<'_>, name: &OsStr, perm: u32) -> io::Result<File> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = with_access(dir, || {
        rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(perm))
    })?;
    Ok(File::from(fd))
}

/// Makes the link `name` in `dir` pointing to `target`, and returns the link's own stat
/// data, read through a descriptor of the link itself.
pub fn symlink_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    target: &OsStr,
) -> io::Result<std::fs::Metadata> {
    with_access(dir, || rustix::fs::symlinkat(target, dir, name))?;
    let link = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    File::from(link).metadata()
}

/// Whether `name` in `dir` is a directory (a link to one is not); `None` when nothing
/// is there.
pub fn is_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<bool>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(
            FileType::from_raw_mode(stat.st_mode) == FileType::Directory,
        )),
        Err(e) if e == Errno::NOENT => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Runs `op`, a change of an entry of `dir`, and runs it once more when it failed for
/// want of permission on `dir` and `dir` could be given its owner's rwx.
fn with_access<T>(dir: BorrowedFd<'_>, op: impl Fn() -> rustix::io::Result<T>) -> io::Result<T> {
    match op() {
        Err(e) if (e == Errno::ACCESS || e == Errno::PERM) && grant_owner(dir)? => Ok(op()?),
        other => Ok(other?),
    }
}

/// Gives the directory `dir` its owner's rwx if hookci's user owns it and it lacks
/// some; whether it did. Never for another user's directory: that one's permissions are
/// its owner's word.
fn grant_owner(dir: BorrowedFd<'_>) -> io::Result<bool> {
    let stat = rustix::fs::fstat(dir)?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    let mode = stat.st_mode & 0o7777;
    if stat.st_uid != me || mode & 0o700 == 0o700 {
        return Ok(false);
    }
    let wanted = Mode::from_raw_mode(mode | 0o700);
    match rustix::fs::fchmod(dir, wanted) {
        // A descriptor opened only to locate the directory (`O_PATH`) cannot be given a
        // mode; its entry under /proc names the same directory, whatever its path now.
        Err(e) if e == Errno::BADF => {
            rustix::fs::chmod(
                format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir)),
                wanted,
            )?;
        }
        other => other?,
    }
    Ok(true)
}

/// A link, or a file, where a directory was asked for.
fn not_a_dir(e: Errno) -> io::Error {
    if e == Errno::LOOP || e == Errno::NOTDIR {
        io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory (a link, a file)",
        )
    } else {
        e.into()
    }
}

/// Makes the directory `path` (its parent as usual), open to hookci alone (0700); one
/// already there is taken back ([`reclaim_dir`]). For what hookci is about to give to a
/// run's user: nothing of another run can enter it meanwhile.
pub fn closed_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => reclaim_dir(path),
        done => done,
    }
}

/// Makes the directory `path` (itself, not what it holds) hookci's and closed to
/// everyone else (0700). Its mode is changed once it is hookci's: changing the mode of
/// another's file takes more than the capabilities `run_as` needs (CAP_CHOWN does).
pub fn reclaim_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    let (me, my_group) = unsafe { (libc::geteuid(), libc::getegid()) };
    if std::fs::symlink_metadata(path)?.uid() != me {
        std::os::unix::fs::lchown(path, Some(me), Some(my_group))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Directories nested far deeper than a removal holds open (and than a path can
    /// name), with a file at every level: all gone, on a bounded stack of descriptors.
    #[test]
    fn a_tree_nested_without_end_is_removed_whole() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("deep")).unwrap();
        let mut at = open_dir(&tmp.path().join("deep")).unwrap();
        for level in 0..3000 {
            let file = create_new_at(at.as_fd(), OsStr::new("f"), 0o644).unwrap();
            drop(file);
            if level % 7 == 0 {
                // Left without write permission, as a step may leave it.
                rustix::fs::mkdirat(at.as_fd(), "ro", Mode::from_raw_mode(0o555)).unwrap();
            }
            rustix::fs::mkdirat(at.as_fd(), "d", Mode::from_raw_mode(0o755)).unwrap();
            at = open_dir_at(at.as_fd(), OsStr::new("d")).unwrap();
        }
        drop(at);
        remove_all(&tmp.path().join("deep")).unwrap();
        assert!(!tmp.path().join("deep").exists());
    }

    /// A tree, and a directory outside it holding a file, which nothing here may touch.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let f = Fixture {
                dir: tempfile::tempdir().unwrap(),
            };
            std::fs::create_dir_all(f.outside()).unwrap();
            std::fs::write(f.outside().join("precious"), "not hookci's").unwrap();
            std::fs::create_dir_all(f.tree()).unwrap();
            f
        }

        fn tree(&self) -> std::path::PathBuf {
            self.dir.path().join("tree")
        }

        fn outside(&self) -> std::path::PathBuf {
            self.dir.path().join("outside")
        }

        /// `tree/<name>` made a link to the outside directory.
        fn link(&self, name: &str) {
            let at = self.tree().join(name);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(self.outside(), at).unwrap();
        }

        fn outside_intact(&self) {
            assert_eq!(
                std::fs::read_to_string(self.outside().join("precious")).unwrap(),
                "not hookci's"
            );
            let names: Vec<_> = std::fs::read_dir(self.outside())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["precious"], "nothing made outside");
        }
    }

    #[test]
    fn a_removal_through_a_linked_middle_component_is_refused() {
        let f = Fixture::new();
        f.link("a/b");
        let root = open_dir(&f.tree()).unwrap();
        remove_inside(root.as_fd(), OsStr::new("a/b/precious")).unwrap();
        f.outside_intact();
        assert!(parent_at(root.as_fd(), OsStr::new("a/b/precious"))
            .unwrap()
            .is_none());
        // The link itself, as the last component, is removed, not followed.
        remove_inside(root.as_fd(), OsStr::new("a/b")).unwrap();
        assert!(std::fs::symlink_metadata(f.tree().join("a/b")).is_err());
        f.outside_intact();
    }

    #[test]
    fn a_tree_removal_unlinks_links_inside_and_never_enters_them() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.tree().join("ws/deep")).unwrap();
        std::fs::write(f.tree().join("ws/deep/file"), "x").unwrap();
        f.link("ws/deep/out");
        f.link("ws/out");
        remove_all(&f.tree().join("ws")).unwrap();
        assert!(!f.tree().join("ws").exists());
        f.outside_intact();
        // A link at the removed path itself goes as a link.
        f.link("top");
        remove_all(&f.tree().join("top")).unwrap();
        assert!(std::fs::symlink_metadata(f.tree().join("top")).is_err());
        f.outside_intact();
        remove_all(&f.tree().join("missing")).unwrap();
    }

    #[test]
    fn making_directories_replaces_a_link_in_the_way_instead_of_following_it() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.tree().join("a")).unwrap();
        f.link("a/b");
        let root = open_dir(&f.tree()).unwrap();
        let dir = make_dirs_at(root.as_fd(), "a/b/c").unwrap();
        let mut file = create_new_at(dir.as_fd(), OsStr::new("precious"), 0o644).unwrap();
        std::io::Write::write_all(&mut file, b"pushed").unwrap();
        f.outside_intact();
        assert!(std::fs::symlink_metadata(f.tree().join("a/b"))
            .unwrap()
            .is_dir());
        assert_eq!(
            std::fs::read_to_string(f.tree().join("a/b/c/precious")).unwrap(),
            "pushed"
        );
        // A link in place of the file to create is not written through.
        std::os::unix::fs::symlink(f.outside().join("precious"), f.tree().join("a/b/c/l")).unwrap();
        assert!(create_new_at(dir.as_fd(), OsStr::new("l"), 0o644).is_err());
        f.outside_intact();
    }

    #[test]
    fn the_root_of_a_walk_may_not_be_a_link() {
        let f = Fixture::new();
        f.link("root");
        let e = open_dir(&f.tree().join("root")).unwrap_err();
        let refused = [Errno::LOOP, Errno::NOTDIR].map(|e| Some(e.raw_os_error()));
        assert!(refused.contains(&e.raw_os_error()), "{e}");
        let root = open_dir(&f.tree()).unwrap();
        let e = open_dir_at(root.as_fd(), OsStr::new("root")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotADirectory);
    }
}
