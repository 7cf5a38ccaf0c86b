//! A reused workspace brought from the commit it holds to another one in place, for
//! `checkout`'s [`Mirrors::update`](crate::git::checkout::Mirrors::update): only what
//! the two trees' diff names is written or removed, tracked files a step changed are
//! found by their stat data against the index (never by reading them), and untracked
//! paths go in one walk of the work tree that skips what `keep` accepts. Nothing is
//! synced: a workspace cut short or from another boot is replaced by the caller.
//! Trees that need what only libgit2's checkout does (content filters, submodules,
//! names it would refuse) are left to it. Blocks; run in the git worker.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use git2::build::CheckoutBuilder;
use git2::{Delta, FileMode, IndexEntry, Oid, Repository};

use crate::fsx;
use crate::git::parallel;

/// A gitlink (a submodule's commit) in a tree or an index.
const GITLINK: u32 = 0o160000;

/// Brings the work tree of `repo` (at `dest`) to commit `oid` and removes every
/// untracked or ignored path `keep` does not accept (given a path relative to `dest`,
/// with a trailing `/` for a directory). `handed` is when the work tree was last handed
/// to steps (a change time, see `checkout::handed_stamp`): a tracked file changed after
/// it was changed by a step whatever its other stat data say, and without it every
/// tracked file is checked by its content. An error leaves the workspace unfit to build
/// from; the caller replaces it.
pub fn update_in_place(
    repo: &Repository,
    oid: Oid,
    dest: &Path,
    keep: &dyn Fn(&str) -> bool,
    handed: Option<(i64, i64)>,
) -> Result<(), git2::Error> {
    let new = repo.find_commit(oid)?.tree()?;
    let mut index = repo.index()?;
    // What the work tree was last made of is the index, whatever a step did to HEAD
    // (a commit, a reset) or the index (`git add`). Its tree comes from the index's own
    // cache of tree ids, which each update leaves valid, so this hashes nothing unless
    // a step staged something.
    let old = repo.find_tree(index.write_tree()?)?;
    let diff = repo.diff_tree_to_tree(Some(&old), Some(&new), None)?;
    let Some(plan) = Plan::of(&diff, &index, repo)? else {
        return update_with_libgit2(repo, &index, oid, dest, keep, handed);
    };
    let entries: Vec<IndexEntry> = index.iter().collect();
    // The walk below knows names as UTF-8: a tracked file named otherwise would look
    // untracked to it and be removed, so such trees are libgit2's.
    if entries
        .iter()
        .any(|e| std::str::from_utf8(&e.path).is_err())
    {
        return update_with_libgit2(repo, &index, oid, dest, keep, handed);
    }
    let staying: Vec<(&str, &IndexEntry)> = entries
        .iter()
        .filter_map(|e| Some((std::str::from_utf8(&e.path).ok()?, e)))
        .filter(|(path, _)| !plan.removed.contains(*path) && !plan.written.contains_key(*path))
        .collect();
    let tracked = Tracked::new(
        staying
            .iter()
            .map(|(path, _)| *path)
            .chain(plan.written.keys().map(String::as_str)),
    );
    // Every file operation below is relative to this descriptor, and no link in the
    // tree is followed: a step of another run may swap a directory for a link while
    // the update walks it (see `fsx`).
    let root = fsx::open_dir(dest).map_err(|e| io_err("opening", ".", &e))?;
    clean_root(&root, &tracked, keep)
        .map_err(|e| io_err("removing untracked files in", ".", &e))?;
    // What the new commit no longer has goes even where `keep` matches it, as a
    // checkout would remove it; after the walk, so that no link a step left stands
    // between the workspace and what is removed.
    for path in &plan.removed {
        fsx::remove_inside(root.as_fd(), OsStr::new(path))
            .map_err(|e| io_err("removing", path, &e))?;
    }
    // The walk removed whatever stood in the place of a tracked directory (a link, a
    // file), so checking a tracked file's stat data never follows a link out.
    let index_time = std::fs::metadata(repo.path().join("index"))
        .map(|m| (m.mtime(), m.mtime_nsec()))
        .map_err(|e| io_err("reading", ".git/index", &e))?;
    let mut writes: Vec<(&str, Oid, u32)> = plan
        .written
        .iter()
        .map(|(path, &(id, mode))| (path.as_str(), id, mode))
        .collect();
    for (path, entry) in &staying {
        match state_of(&dest.join(path), entry, index_time, handed) {
            State::Unchanged => {}
            State::Changed => writes.push((path, entry.id, entry.mode)),
            // Read only to be sure; once confirmed, its stat data is recorded anew (the
            // index written below is younger), so the next update trusts it.
            State::Racy(meta) => {
                if content_id(&dest.join(path), entry.mode)? == entry.id {
                    index.add(&parallel::index_entry(path, entry.id, entry.mode, &meta))?;
                } else {
                    writes.push((path, entry.id, entry.mode));
                }
            }
        }
    }
    let odb = repo.odb()?;
    for (path, id, mode) in writes {
        index.add(&write_file(&odb, root.as_fd(), path, id, mode)?)?;
    }
    for path in &plan.removed {
        index.remove_path(Path::new(path))?;
    }
    // Leaves the cache of tree ids valid for the next update, and proves the work:
    // the index now holds exactly the new commit's tree.
    let made = index.write_tree()?;
    if made != new.id() {
        return Err(git2::Error::from_str(&format!(
            "the updated index holds tree {made}, not the commit's {}",
            new.id()
        )));
    }
    index.write()?;
    repo.set_head_detached(oid)
}

/// What the diff of the two commits asks of the work tree, when this module can do it.
struct Plan {
    /// Paths the new commit no longer has as a file.
    removed: HashSet<String>,
    /// Paths to write, with their blob and mode.
    written: HashMap<String, (Oid, u32)>,
}

impl Plan {
    /// `None` when libgit2's own checkout must do the update: the repository asks for
    /// content filters, a `.gitattributes` or a submodule is involved, or a name is one
    /// a checkout must not write as it is (see `parallel::unsafe_name`).
    fn of(
        diff: &git2::Diff<'_>,
        index: &git2::Index,
        repo: &Repository,
    ) -> Result<Option<Plan>, git2::Error> {
        if parallel::needs_filters(repo)? {
            return Ok(None);
        }
        let special = |path: &[u8], mode: u32| {
            mode == GITLINK || path == b".gitattributes" || path.ends_with(b"/.gitattributes")
        };
        if index.iter().any(|e| special(&e.path, e.mode)) {
            return Ok(None);
        }
        let mut plan = Plan {
            removed: HashSet::new(),
            written: HashMap::new(),
        };
        for delta in diff.deltas() {
            let (old, new) = (delta.old_file(), delta.new_file());
            let path_of = |f: &git2::DiffFile<'_>| {
                f.path_bytes()
                    .and_then(|p| std::str::from_utf8(p).ok())
                    .filter(|p| !p.split('/').any(parallel::unsafe_name))
                    .map(str::to_owned)
            };
            let (old_mode, new_mode) = (u32::from(old.mode()), u32::from(new.mode()));
            match delta.status() {
                Delta::Deleted => match path_of(&old) {
                    Some(path) if !special(path.as_bytes(), old_mode) => {
                        plan.removed.insert(path);
                    }
                    _ => return Ok(None),
                },
                Delta::Added | Delta::Modified | Delta::Typechange => match path_of(&new) {
                    Some(path) if !special(path.as_bytes(), new_mode) => {
                        plan.written.insert(path, (new.id(), new_mode));
                    }
                    _ => return Ok(None),
                },
                // Tree-to-tree diffs without rename detection name nothing else.
                _ => return Ok(None),
            }
        }
        // A path removed as a file and added below as a directory (or back) is in both.
        plan.removed.retain(|p| !plan.written.contains_key(p));
        Ok(Some(plan))
    }
}

/// What became of a tracked file since its index entry was recorded.
enum State {
    /// The same type, executable bit, size, modification time and inode, and not
    /// changed since the work tree was handed to steps.
    Unchanged,
    /// Gone, different in one of those, or changed after the hand-over: written again,
    /// never read.
    Changed,
    /// The same, but recorded in the same clock tick as the index was written, or
    /// changed in the tick of the hand-over (or with no hand-over known), so a change
    /// then would not show in its times (git's "racily clean" entry): only its content
    /// can tell.
    Racy(std::fs::Metadata),
}

/// Compares the file at `path` with its index entry. Its change time is compared with
/// the hand-over, not with the entry: with `run_as` each run's chown changes it after
/// the entry was recorded, and before the hand-over.
fn state_of(
    path: &Path,
    entry: &IndexEntry,
    index_time: (i64, i64),
    handed: Option<(i64, i64)>,
) -> State {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return State::Changed;
    };
    let kind_matches = if entry.mode == u32::from(FileMode::Link) {
        meta.file_type().is_symlink()
    } else {
        meta.file_type().is_file()
            && (meta.mode() & 0o100 != 0) == (entry.mode == u32::from(FileMode::BlobExecutable))
    };
    let same = kind_matches
        && meta.size() as u32 == entry.file_size
        && meta.mtime() as i32 == entry.mtime.seconds()
        && meta.mtime_nsec() as u32 == entry.mtime.nanoseconds()
        && meta.ino() as u32 == entry.ino;
    let recorded = (
        i64::from(entry.mtime.seconds()),
        i64::from(entry.mtime.nanoseconds()),
    );
    let changed_at = (meta.ctime(), meta.ctime_nsec());
    if !same || handed.is_some_and(|handed| changed_at > handed) {
        State::Changed
    } else if recorded >= index_time || handed.is_none_or(|handed| changed_at == handed) {
        State::Racy(meta)
    } else {
        State::Unchanged
    }
}

/// The blob id of what is at `path`: the file's content, or a link's target.
fn content_id(path: &Path, mode: u32) -> Result<Oid, git2::Error> {
    if mode == u32::from(FileMode::Link) {
        let target = std::fs::read_link(path)
            .map_err(|e| git2::Error::from_str(&format!("reading {}: {e}", path.display())))?;
        Oid::hash_object(git2::ObjectType::Blob, target.as_os_str().as_bytes())
    } else {
        Oid::hash_file(git2::ObjectType::Blob, path)
    }
}

/// Writes blob `id` at `path` below `root` with `mode`, replacing whatever is there, and
/// returns its index entry. Missing parent directories are made; one in the way that is
/// not a directory (a link, a file) is replaced, so the write never leaves `root`.
fn write_file(
    odb: &git2::Odb<'_>,
    root: BorrowedFd<'_>,
    path: &str,
    id: Oid,
    mode: u32,
) -> Result<IndexEntry, git2::Error> {
    let object = odb.read(id)?;
    let parent_fd;
    let (dir, name) = match path.rsplit_once('/') {
        Some((parent, name)) => {
            parent_fd = fsx::make_dirs_at(root, parent)
                .map_err(|e| io_err("creating the directory of", path, &e))?;
            (parent_fd.as_fd(), name)
        }
        None => (root, path),
    };
    let name = OsStr::new(name);
    fsx::remove_at(dir, name).map_err(|e| io_err("replacing", path, &e))?;
    let meta = parallel::write_blob_at(object.data(), dir, name, mode)
        .map_err(|e| io_err("writing", path, &e))?;
    Ok(parallel::index_entry(path, id, mode, &meta))
}

fn io_err(what: &str, path: &str, e: &std::io::Error) -> git2::Error {
    git2::Error::from_str(&format!("{what} {path}: {e}"))
}

/// The update by libgit2's checkout, for trees this module leaves to it: a checkout of
/// the new tree over the old one (it writes only the files that differ and removes
/// those the new tree no longer has), then the same removal of untracked paths.
fn update_with_libgit2(
    repo: &Repository,
    index: &git2::Index,
    oid: Oid,
    dest: &Path,
    keep: &dyn Fn(&str) -> bool,
    handed: Option<(i64, i64)>,
) -> Result<(), git2::Error> {
    // libgit2 does not weigh the hand-over (the workspace distrusts change times, as
    // each run's chown changes them): a tracked file changed since, or in its tick, is
    // removed first, so the checkout below writes it again.
    // A submodule's directory is its own checkout's, not a file of this tree.
    let root = fsx::open_dir(dest).map_err(|e| io_err("opening", ".", &e))?;
    for entry in index.iter().filter(|e| e.mode != GITLINK) {
        let path = Path::new(std::ffi::OsStr::from_bytes(&entry.path));
        let changed_at = std::fs::symlink_metadata(dest.join(path))
            .ok()
            .filter(|m| !m.is_dir())
            .map(|m| (m.ctime(), m.ctime_nsec()));
        if changed_at.is_some_and(|at| handed.is_none_or(|handed| at >= handed)) {
            fsx::remove_inside(root.as_fd(), path.as_os_str())
                .map_err(|e| io_err("removing", &path.to_string_lossy(), &e))?;
        }
    }
    let commit = repo.find_commit(oid)?;
    // Forced: a step may have edited tracked files, and the commit's content wins.
    repo.checkout_tree(commit.as_object(), Some(CheckoutBuilder::new().force()))?;
    repo.set_head_detached(oid)?;
    let paths: Vec<String> = repo
        .index()?
        .iter()
        .map(|e| String::from_utf8_lossy(&e.path).into_owned())
        .collect();
    let tracked = Tracked::new(paths.iter().map(String::as_str));
    clean_root(&root, &tracked, keep)
        .map_err(|e| git2::Error::from_str(&format!("removing untracked files: {e}")))
}

/// The paths of the new commit: files (and submodules), and every directory that holds
/// one.
struct Tracked<'a> {
    files: HashSet<&'a str>,
    dirs: HashSet<&'a str>,
}

impl<'a> Tracked<'a> {
    fn new(files: impl Iterator<Item = &'a str>) -> Tracked<'a> {
        let mut tracked = Tracked {
            files: HashSet::new(),
            dirs: HashSet::new(),
        };
        for path in files {
            let mut dir = path;
            while let Some((parent, _)) = dir.rsplit_once('/') {
                if !tracked.dirs.insert(parent) {
                    break;
                }
                dir = parent;
            }
            tracked.files.insert(path);
        }
        tracked
    }
}

/// [`clean`] of the whole work tree open at `root`.
fn clean_root(
    root: &OwnedFd,
    tracked: &Tracked,
    keep: &dyn Fn(&str) -> bool,
) -> std::io::Result<()> {
    clean(root.try_clone()?, "", tracked, keep, false).map(drop)
}

/// Removes from the directory open at `dir` (at `rel` below the workspace) every path
/// neither tracked nor kept; returns whether `dir` is left empty. A kept directory
/// (`target/`) is entered only where it holds tracked directories, and only to remove
/// what stands in their place (a link, a file): `kept_above` says `dir` is inside a
/// kept one. Entries are worked on relative to `dir` and never followed.
fn clean(
    dir: OwnedFd,
    rel: &str,
    tracked: &Tracked,
    keep: &dyn Fn(&str) -> bool,
    kept_above: bool,
) -> std::io::Result<bool> {
    let mut empty = true;
    let mut path = String::with_capacity(rel.len() + 64);
    let mut entries = rustix::fs::Dir::new(dir)?;
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let raw = entry.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        let name = String::from_utf8_lossy(raw);
        let os_name = OsStr::from_bytes(raw);
        let dir = entries.fd()?;
        if rel.is_empty() && name == ".git" {
            empty = false;
            continue;
        }
        path.clear();
        if !rel.is_empty() {
            path.push_str(rel);
            path.push('/');
        }
        path.push_str(&name);
        // Not followed: a symbolic link is removed or kept as the link itself.
        let is_dir = match entry.file_type() {
            rustix::fs::FileType::Directory => true,
            rustix::fs::FileType::Unknown => fsx::is_dir_at(dir, os_name)?.unwrap_or(false),
            _ => false,
        };
        let tracked_dir = tracked.dirs.contains(path.as_str());
        if tracked_dir && !is_dir {
            // Whatever `keep` says: tracked files are checked through this path, which
            // must not lead out of the workspace.
            fsx::remove_file_at(dir, os_name)?;
            continue;
        }
        let kept = kept_above || tracked.files.contains(path.as_str()) || keep(&path) || {
            is_dir && {
                path.push('/');
                let kept = keep(&path);
                path.pop();
                kept
            }
        };
        if kept {
            empty = false;
            if tracked_dir {
                match fsx::open_dir_at(dir, os_name) {
                    Ok(inner) => {
                        clean(inner, &path, tracked, keep, true)?;
                    }
                    // Swapped for a link since it was listed: not entered, and gone.
                    Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                        fsx::remove_at(dir, os_name)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        } else if is_dir {
            let inner = match fsx::open_dir_at(dir, os_name) {
                Ok(inner) => inner,
                Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                    fsx::remove_at(dir, os_name)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let left_empty = clean(inner, &path, tracked, keep, false)?;
            if left_empty && !tracked.dirs.contains(path.as_str()) {
                fsx::remove_empty_dir_at(dir, os_name)?;
            } else {
                empty = false;
            }
        } else {
            fsx::remove_file_at(dir, os_name)?;
        }
    }
    Ok(empty)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use super::*;
    use crate::git::checkout::tests::commit;
    use crate::git::checkout::{Mirrors, Request, Updated};
    use crate::git::repo::RepoName;

    /// Sets the access and modification times of `path` to `secs`.`nanos`, as a step
    /// may on a file it owns.
    fn set_times(path: &Path, secs: i64, nanos: i64) {
        let t = libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        };
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path and two valid timespecs.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    /// A mirror fed from a bare origin, and one reused workspace of it.
    struct Fixture {
        dir: tempfile::TempDir,
        origin: Repository,
        url: String,
        repo: RepoName,
        mirrors: Mirrors,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let origin = Repository::init_bare(dir.path().join("o.git")).unwrap();
            let url = dir.path().join("o.git").display().to_string();
            let mirrors = Mirrors::new(&dir.path().join("state"), None);
            Fixture {
                origin,
                url,
                repo: RepoName::parse("o/r").unwrap(),
                mirrors,
                dir,
            }
        }

        fn ws(&self) -> PathBuf {
            self.dir.path().join("slot/0")
        }

        /// Fetches `commit` and updates the workspace to it, keeping `target/`.
        fn update(&self, commit: Oid) -> Updated {
            self.update_keeping(commit, &|p: &str| p == "target/")
        }

        /// Fetches `commit` and updates the workspace to it, keeping what `keep` says.
        fn update_keeping(&self, commit: Oid, keep: &dyn Fn(&str) -> bool) -> Updated {
            let commit = commit.to_string();
            let req = Request {
                repo: &self.repo,
                clone_url: &self.url,
                git_ref: "refs/heads/main",
                commit: &commit,
            };
            self.mirrors.fetch(&req).unwrap();
            self.mirrors.update(&req, &self.ws(), keep).unwrap()
        }

        /// A commit of exactly `files` (path, content, mode), whatever `main` held.
        fn commit_exactly(&self, files: &[(&str, &str, i32)]) -> Oid {
            let mut index = git2::Index::new().unwrap();
            for (path, content, mode) in files {
                let id = self.origin.blob(content.as_bytes()).unwrap();
                index
                    .add(&IndexEntry {
                        ctime: git2::IndexTime::new(0, 0),
                        mtime: git2::IndexTime::new(0, 0),
                        dev: 0,
                        ino: 0,
                        mode: *mode as u32,
                        uid: 0,
                        gid: 0,
                        file_size: 0,
                        id,
                        flags: path.len() as u16,
                        flags_extended: 0,
                        path: path.as_bytes().to_vec(),
                    })
                    .unwrap();
            }
            self.commit_index(&mut index)
        }

        /// A commit on `main` of exactly what `index` holds.
        fn commit_index(&self, index: &mut git2::Index) -> Oid {
            let tree = self
                .origin
                .find_tree(index.write_tree_to(&self.origin).unwrap())
                .unwrap();
            let sig = git2::Signature::now("t", "t@hookci.invalid").unwrap();
            let parent = self
                .origin
                .find_reference("refs/heads/main")
                .ok()
                .and_then(|r| r.peel_to_commit().ok());
            let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
            self.origin
                .commit(Some("refs/heads/main"), &sig, &sig, "c", &tree, &parents)
                .unwrap()
        }

        /// Every path of the work tree but `.git` and `target`, with what it holds: a
        /// file's content and whether it is executable, or a link's target.
        fn listing(&self) -> Vec<(String, String)> {
            fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, String)>) {
                for entry in std::fs::read_dir(dir).unwrap() {
                    let entry = entry.unwrap();
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let path = if rel.is_empty() {
                        name.clone()
                    } else {
                        format!("{rel}/{name}")
                    };
                    if path == ".git" || path == "target" {
                        continue;
                    }
                    let meta = std::fs::symlink_metadata(entry.path()).unwrap();
                    if meta.file_type().is_symlink() {
                        let to = std::fs::read_link(entry.path()).unwrap();
                        out.push((path, format!("-> {}", to.display())));
                    } else if meta.is_dir() {
                        walk(&entry.path(), &path, out);
                    } else {
                        let exec = if meta.mode() & 0o100 != 0 { " (x)" } else { "" };
                        let text = std::fs::read_to_string(entry.path()).unwrap();
                        out.push((path, format!("{text}{exec}")));
                    }
                }
            }
            let mut out = Vec::new();
            walk(&self.ws(), "", &mut out);
            out.sort();
            out
        }

        /// The workspace's own repository, as a step's git would see it.
        fn ws_repo(&self) -> Repository {
            Repository::open(self.ws()).unwrap()
        }
    }

    fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
            .collect()
    }

    /// What steps do to a workspace (stage a file, put a link or a directory where a
    /// tracked one was, edit or chmod a tracked file) is undone by the next update,
    /// which writes through no link, and changes of type and mode between the commits
    /// arrive: the work tree, the index and HEAD are exactly the new commit.
    #[test]
    fn an_update_undoes_what_steps_did_and_follows_every_kind_of_change() {
        let f = Fixture::new();
        let regular = 0o100644;
        let c1 = f.commit_exactly(&[
            ("src/lib.c", "lib", regular),
            ("src/gone.c", "deleted upstream", regular),
            ("src/deep/x.c", "x", regular),
            ("b", "b", regular),
            ("c", "c", regular),
            ("d", "d was a file", regular),
            ("e", "e", regular),
            ("same-size", "aaaa", regular),
        ]);
        assert_eq!(f.update(c1), Updated::Fresh);
        let ws = f.ws();
        let outside = f.dir.path().join("outside");
        std::fs::create_dir_all(outside.join("deep")).unwrap();
        std::fs::write(outside.join("lib.c"), "not hookci's").unwrap();
        std::fs::write(outside.join("gone.c"), "not hookci's either").unwrap();
        // What steps did.
        std::fs::write(ws.join("staged.txt"), "staged").unwrap();
        let step_repo = f.ws_repo();
        let mut index = step_repo.index().unwrap();
        index.add_path(Path::new("staged.txt")).unwrap();
        index.write().unwrap();
        std::fs::remove_dir_all(ws.join("src")).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("src")).unwrap();
        std::fs::remove_file(ws.join("b")).unwrap();
        std::fs::create_dir_all(ws.join("b/inner")).unwrap();
        std::fs::set_permissions(ws.join("c"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(ws.join("same-size"), "bbbb").unwrap();
        std::fs::create_dir_all(ws.join("target/debug")).unwrap();
        std::fs::write(ws.join("target/debug/warm"), "kept").unwrap();

        let c2 = f.commit_exactly(&[
            ("src/lib.c", "lib 2", regular),
            ("src/deep/x.c", "x", regular),
            ("b", "b", regular),
            ("c", "c", regular),
            ("d/now-a-dir", "d", regular),
            ("e", "e", 0o100755),
            ("link", "src/lib.c", 0o120000),
            ("same-size", "aaaa", regular),
        ]);
        assert_eq!(f.update(c2), Updated::InPlace);
        assert_eq!(
            f.listing(),
            owned(&[
                ("b", "b"),
                ("c", "c"),
                ("d/now-a-dir", "d"),
                ("e", "e (x)"),
                ("link", "-> src/lib.c"),
                ("same-size", "aaaa"),
                ("src/deep/x.c", "x"),
                ("src/lib.c", "lib 2"),
            ])
        );
        assert_eq!(
            std::fs::read_to_string(outside.join("lib.c")).unwrap(),
            "not hookci's"
        );
        assert!(!outside.join("deep/x.c").exists(), "written through a link");
        assert!(outside.join("gone.c").exists(), "removed through a link");
        assert_eq!(
            std::fs::read_to_string(ws.join("target/debug/warm")).unwrap(),
            "kept"
        );
        let repo = f.ws_repo();
        let tree = repo.find_commit(c2).unwrap().tree().unwrap().id();
        assert_eq!(repo.index().unwrap().write_tree().unwrap(), tree);
        assert_eq!(repo.head().unwrap().target(), Some(c2));
        let status = repo
            .statuses(Some(git2::StatusOptions::new().include_untracked(false)))
            .unwrap();
        assert!(status.is_empty(), "the index matches the work tree");

        // Back: a directory becomes a file again, the link and the mode go.
        let c3 = f.commit_exactly(&[("d", "d is a file", regular), ("e", "e", regular)]);
        assert_eq!(f.update(c3), Updated::InPlace);
        assert_eq!(f.listing(), owned(&[("d", "d is a file"), ("e", "e")]));
    }

    /// A link a step put where a tracked directory was goes also when `keep` names
    /// that directory, so the next build reads the commit's files, not the link's.
    #[test]
    fn a_link_in_place_of_a_kept_tracked_directory_is_replaced() {
        let f = Fixture::new();
        let regular = 0o100644;
        let keep = |p: &str| p == "vendor/" || p == "vendor";
        let c1 = f.commit_exactly(&[
            ("vendor/a", "a", regular),
            ("vendor/deep/b", "b", regular),
            ("top", "t", regular),
        ]);
        assert_eq!(f.update_keeping(c1, &keep), Updated::Fresh);
        let ws = f.ws();
        let outside = f.dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::rename(ws.join("vendor/deep"), outside.join("deep")).unwrap();
        std::os::unix::fs::symlink(outside.join("deep"), ws.join("vendor/deep")).unwrap();
        std::fs::write(ws.join("vendor/untracked"), "kept").unwrap();

        let c2 = f.commit_exactly(&[
            ("vendor/a", "a 2", regular),
            ("vendor/deep/b", "b", regular),
            ("top", "t", regular),
        ]);
        assert_eq!(f.update_keeping(c2, &keep), Updated::InPlace);
        assert_eq!(
            f.listing(),
            owned(&[
                ("top", "t"),
                ("vendor/a", "a 2"),
                ("vendor/deep/b", "b"),
                ("vendor/untracked", "kept"),
            ])
        );
        assert!(outside.join("deep/b").exists(), "removed through a link");
    }

    /// A step swaps an untracked directory for a link to a directory outside just
    /// after the walk found it to be a directory (`keep` is asked about it in between,
    /// and does the swap): the walk does not enter the link, and what it points to
    /// stays, while the workspace ends up as the commit.
    #[test]
    fn a_directory_swapped_for_a_link_during_the_walk_is_not_entered() {
        let f = Fixture::new();
        let regular = 0o100644;
        let c1 = f.commit_exactly(&[("src/a.c", "a", regular)]);
        assert_eq!(f.update(c1), Updated::Fresh);
        let ws = f.ws();
        let outside = f.dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), "not hookci's").unwrap();
        std::fs::create_dir_all(ws.join("junk")).unwrap();
        std::fs::write(ws.join("junk/stray"), "untracked").unwrap();
        let swapped = std::cell::Cell::new(false);
        let keep = |p: &str| {
            if p == "junk" && !swapped.replace(true) {
                std::fs::remove_dir_all(ws.join("junk")).unwrap();
                std::os::unix::fs::symlink(&outside, ws.join("junk")).unwrap();
            }
            p == "target/"
        };
        let c2 = f.commit_exactly(&[("src/a.c", "a 2", regular)]);
        let updated = f.update_keeping(c2, &keep);
        assert!(swapped.get(), "the walk asked about junk");
        assert!(outside.join("precious").exists(), "removed through a link");
        assert_eq!(updated, Updated::InPlace);
        assert_eq!(f.listing(), owned(&[("src/a.c", "a 2")]));
    }

    /// A tracked file whose name is not UTF-8 stays through an update that does not
    /// change it.
    #[test]
    fn a_tracked_file_named_in_other_bytes_survives_an_update() {
        use std::os::unix::ffi::OsStrExt;
        let f = Fixture::new();
        let latin1: &[u8] = b"caf\xe9.txt";
        // Committed by bytes, as another git would.
        let commit_bytes = |files: &[(&[u8], &[u8])]| {
            let mut index = git2::Index::new().unwrap();
            for (path, content) in files {
                let id = f.origin.blob(content).unwrap();
                let mut entry = parallel::index_entry(
                    "x",
                    id,
                    0o100644,
                    &std::fs::metadata(f.dir.path()).unwrap(),
                );
                entry.flags = path.len() as u16;
                entry.path = path.to_vec();
                index.add(&entry).unwrap();
            }
            f.commit_index(&mut index)
        };
        let c1 = commit_bytes(&[(b"a", b"1"), (latin1, b"bytes")]);
        assert_eq!(f.update(c1), Updated::Fresh);
        let c2 = commit_bytes(&[(b"a", b"2"), (latin1, b"bytes")]);
        f.update(c2);
        let ws = f.ws();
        assert_eq!(std::fs::read(ws.join("a")).unwrap(), b"2");
        let name = std::ffi::OsStr::from_bytes(latin1);
        assert_eq!(std::fs::read(ws.join(name)).unwrap(), b"bytes");
    }

    /// A file whose stat data matches its entry is trusted without being read, except
    /// one recorded in the same clock tick as the index: its content decides, and an
    /// unchanged one is left as it is (its inode and time too), so incremental builds
    /// see nothing new.
    #[test]
    fn a_racily_clean_file_is_read_and_only_rewritten_when_it_changed() {
        use std::os::unix::fs::MetadataExt;
        let f = Fixture::new();
        let c1 = commit(&f.origin, "main", &[("a", "1111"), ("b", "2222")], "one");
        f.update(c1);
        let c2 = commit(&f.origin, "main", &[("c", "new")], "two");
        f.update(c2);
        let ws = f.ws();
        let index_file = ws.join(".git/index");
        let stat = |p: &str| {
            let m = std::fs::metadata(ws.join(p)).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec())
        };
        // `a` is changed in a way its stat data cannot show (same size, inode and
        // time), and the index claims the tick of both files' times: both are racy.
        let (a, b) = (stat("a"), stat("b"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(ws.join("a"))
            .and_then(|mut file| file.write_all(b"9999"))
            .unwrap();
        set_times(&ws.join("a"), a.1, a.2);
        assert_eq!(stat("a"), a);
        let earliest = std::cmp::min((a.1, a.2), (b.1, b.2));
        set_times(&index_file, earliest.0, earliest.1);

        let c3 = commit(&f.origin, "main", &[("d", "new")], "three");
        assert_eq!(f.update(c3), Updated::InPlace);
        assert_eq!(std::fs::read_to_string(ws.join("a")).unwrap(), "1111");
        assert_ne!(stat("a"), a, "rewritten");
        assert_eq!(stat("b"), b, "read, found unchanged, left alone");
    }

    /// A step, after the hand-over, writes `a` anew with the same size and puts its
    /// modification time back; the next update must write it again, and leave `b`,
    /// which nothing changed, as it is (where hookci updates itself). With
    /// `attributes`, the tree has a `.gitattributes`, so libgit2's checkout updates it.
    fn a_change_behind_restored_times_is_undone(attributes: bool) {
        use std::os::unix::fs::MetadataExt;
        let f = Fixture::new();
        let mut files = vec![("a", "1111"), ("b", "2222")];
        if attributes {
            files.push((".gitattributes", "*.txt text\n"));
        }
        let c1 = commit(&f.origin, "main", &files, "one");
        f.update(c1);
        let ws = f.ws();
        let stat = |p: &str| {
            let m = std::fs::metadata(ws.join(p)).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec())
        };
        // No entry is racily clean: the index is younger than every file, so only
        // stat data (and the change time) can tell what a step did.
        let (a, b) = (stat("a"), stat("b"));
        set_times(&ws.join(".git/index"), a.1.max(b.1) + 3600, 0);
        crate::git::checkout::mark_handed(&ws).unwrap();
        let stamp = std::fs::read_to_string(crate::git::checkout::handed_stamp(&ws)).unwrap();
        let (secs, nanos) = stamp.trim().split_once(' ').unwrap();
        let handed: (i64, i64) = (secs.parse().unwrap(), nanos.parse().unwrap());
        // The step comes later than the hand-over: the clock's next tick.
        let probe = ws.join("probe");
        loop {
            std::fs::write(&probe, "").unwrap();
            let m = std::fs::metadata(&probe).unwrap();
            if (m.ctime(), m.ctime_nsec()) > handed {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(ws.join("a"))
            .and_then(|mut file| file.write_all(b"9999"))
            .unwrap();
        set_times(&ws.join("a"), a.1, a.2);
        assert_eq!(stat("a"), a, "its stat data look untouched");

        let c2 = commit(&f.origin, "main", &[("c", "new")], "two");
        assert_eq!(f.update(c2), Updated::InPlace);
        assert_eq!(std::fs::read_to_string(ws.join("a")).unwrap(), "1111");
        assert_ne!(stat("a"), a, "rewritten");
        if !attributes {
            assert_eq!(stat("b"), b, "unchanged since the hand-over: left alone");
        }
        assert_eq!(std::fs::read_to_string(ws.join("b")).unwrap(), "2222");
        assert!(!probe.exists(), "untracked: removed");
    }

    #[test]
    fn a_file_a_step_changed_and_put_its_times_back_on_is_found_by_its_change_time() {
        a_change_behind_restored_times_is_undone(false);
    }

    #[test]
    fn where_libgit2_updates_a_file_changed_behind_its_times_is_written_again() {
        a_change_behind_restored_times_is_undone(true);
    }

    /// Trees that ask for content filters are left to libgit2's checkout, which
    /// applies them; the update is still exact.
    #[test]
    fn trees_with_attributes_are_updated_by_libgit2() {
        let f = Fixture::new();
        let c1 = commit(&f.origin, "main", &[("a", "1")], "one");
        f.update(c1);
        std::fs::write(f.ws().join("stray"), "s").unwrap();
        let c2 = commit(
            &f.origin,
            "main",
            &[(".gitattributes", "*.txt text\n"), ("b.txt", "2")],
            "two",
        );
        assert_eq!(f.update(c2), Updated::InPlace);
        assert_eq!(
            f.listing(),
            owned(&[
                (".gitattributes", "*.txt text\n"),
                ("a", "1"),
                ("b.txt", "2")
            ])
        );
    }
}
