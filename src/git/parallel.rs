//! A fresh checkout that writes the files of a commit on several threads at once.
//! libgit2's own checkout writes one file after the other; on a tree of thousands of
//! files most of that time is inflating blobs and creating files, which threads share
//! well. The result is what libgit2's checkout leaves: the files, the index (with each
//! file's stat data, so the next status or update need not read them again) and a
//! detached HEAD. Trees that need content filters (`.gitattributes`, `core.autocrlf`)
//! are left to libgit2, which applies them. Blocks; run in the git worker.

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use git2::{
    FileMode, IndexEntry, IndexTime, ObjectType, Oid, Repository, TreeWalkMode, TreeWalkResult,
};

/// Below this many files, threads cost more than they save.
const MIN_FILES: usize = 256;
/// Writers at most. Creating a file mostly waits for the file system (its journal,
/// its directory locks), not for a CPU, so more writers than cores still gain; past
/// this they only contend for the same directories.
const MAX_THREADS: usize = 8;

struct File {
    path: String,
    id: Oid,
    mode: i32,
}

/// Checks `commit` out into the empty work tree of `repo` (a new repository whose
/// objects are reachable through its alternates). `Ok(false)`: this tree is not one
/// for parallel writing, and nothing was written; the caller checks it out itself.
pub fn checkout(repo: &Repository, commit: Oid) -> Result<bool, git2::Error> {
    let workdir = repo
        .workdir()
        .ok_or_else(|| git2::Error::from_str("the workspace has no work tree"))?
        .to_path_buf();
    let tree = repo.find_commit(commit)?.tree()?;
    if needs_filters(repo)? {
        return Ok(false);
    }
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    // Attributes may ask for filters; a name that is not UTF-8 is left to libgit2 too,
    // and so is one libgit2 refuses to write (see `unsafe_name`): what it does with
    // those is what the workspace gets. A submodule (a gitlink) goes to it as well.
    let mut unsuitable = false;
    tree.walk(TreeWalkMode::PreOrder, |root, entry| {
        let name = match entry.name() {
            Ok(name)
                if name != ".gitattributes"
                    && !unsafe_name(name)
                    && entry.kind() != Some(ObjectType::Commit) =>
            {
                name
            }
            _ => {
                unsuitable = true;
                return TreeWalkResult::Abort;
            }
        };
        let path = format!("{root}{name}");
        match entry.kind() {
            Some(ObjectType::Tree) => dirs.push(path),
            _ => files.push(File {
                path,
                id: entry.id(),
                mode: entry.filemode(),
            }),
        }
        TreeWalkResult::Ok
    })
    .or_else(|e| if unsuitable { Ok(()) } else { Err(e) })?;
    if unsuitable || files.len() < MIN_FILES {
        return Ok(false);
    }
    for dir in &dirs {
        std::fs::create_dir(workdir.join(dir)).map_err(|e| io_err(dir, &e))?;
    }
    let threads = (files.len() / MIN_FILES).clamp(1, MAX_THREADS);
    let chunk = files.len().div_ceil(threads);
    let git_dir = repo.path().to_path_buf();
    let written: Vec<Result<Vec<IndexEntry>, git2::Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                let (git_dir, workdir) = (&git_dir, &workdir);
                s.spawn(move || write_files(git_dir, workdir, part))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(git2::Error::from_str("a checkout thread panicked")))
            })
            .collect()
    });
    let mut index = repo.index()?;
    index.clear()?;
    for part in written {
        for entry in part? {
            index.add(&entry)?;
        }
    }
    index.write()?;
    repo.set_head_detached(commit)?;
    Ok(true)
}

/// Whether a tree entry's name could write outside its directory or into a `.git`:
/// no tree git makes has one, but a pushed tree may, and this writer joins names to
/// the work tree as they are.
pub(crate) fn unsafe_name(name: &str) -> bool {
    name.is_empty()
        || name == "."
        || name == ".."
        || name.eq_ignore_ascii_case(".git")
        || name.contains(['/', '\\', '\0'])
}

/// Whether the repository's configuration asks for content filters on checkout.
pub(crate) fn needs_filters(repo: &Repository) -> Result<bool, git2::Error> {
    let config = repo.config()?;
    let autocrlf = config.get_string("core.autocrlf").unwrap_or_default();
    let eol = config.get_string("core.eol").unwrap_or_default();
    Ok(!matches!(autocrlf.as_str(), "" | "false") || !eol.is_empty())
}

fn io_err(path: &str, e: &std::io::Error) -> git2::Error {
    git2::Error::from_str(&format!("writing {path}: {e}"))
}

/// Writes `files` into `workdir` through a repository handle of this thread's own, and
/// returns their index entries.
fn write_files(
    git_dir: &Path,
    workdir: &Path,
    files: &[File],
) -> Result<Vec<IndexEntry>, git2::Error> {
    let repo = Repository::open(git_dir)?;
    let odb = repo.odb()?;
    let mut entries = Vec::with_capacity(files.len());
    for f in files {
        let object = odb.read(f.id)?;
        let dest = workdir.join(&f.path);
        // The stat data of what was written, for the index: of the open file itself
        // where there is one (no second lookup of its path).
        let meta =
            write_blob(object.data(), &dest, f.mode as u32).map_err(|e| io_err(&f.path, &e))?;
        entries.push(index_entry(&f.path, f.id, f.mode as u32, &meta));
    }
    Ok(entries)
}

/// The index entry of blob `id` just written at `path` with `mode`, with the stat data
/// of what was written (`meta`), so the next update need not read the file again.
/// Writes a blob's `data` as a new file at `dest` (never through what is there: it must
/// be gone), or as a link when `mode` says so; the stat data of what was written, of the
/// open file itself where there is one (no second lookup of its path).
pub(crate) fn write_blob(
    data: &[u8],
    dest: &Path,
    mode: u32,
) -> std::io::Result<std::fs::Metadata> {
    if mode == u32::from(FileMode::Link) {
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(data), dest)?;
        return std::fs::symlink_metadata(dest);
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(file_perm(mode))
        .open(dest)?;
    out.write_all(data)?;
    out.metadata()
}

/// [`write_blob`] as `name` in the open directory `dir`: nothing on the way to it is
/// looked up by path, and a link in its place makes it fail, never followed.
pub(crate) fn write_blob_at(
    data: &[u8],
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mode: u32,
) -> std::io::Result<std::fs::Metadata> {
    if mode == u32::from(FileMode::Link) {
        return crate::fsx::symlink_at(dir, name, OsStr::from_bytes(data));
    }
    let mut out = crate::fsx::create_new_at(dir, name, file_perm(mode))?;
    out.write_all(data)?;
    out.metadata()
}

/// The permissions a blob of `mode` is created with (less the umask).
fn file_perm(mode: u32) -> u32 {
    if mode == u32::from(FileMode::BlobExecutable) {
        0o777
    } else {
        0o666
    }
}

pub(crate) fn index_entry(path: &str, id: Oid, mode: u32, meta: &std::fs::Metadata) -> IndexEntry {
    IndexEntry {
        ctime: IndexTime::new(meta.ctime() as i32, meta.ctime_nsec() as u32),
        mtime: IndexTime::new(meta.mtime() as i32, meta.mtime_nsec() as u32),
        dev: meta.dev() as u32,
        ino: meta.ino() as u32,
        mode,
        uid: meta.uid(),
        gid: meta.gid(),
        file_size: meta.size() as u32,
        id,
        flags: (path.len().min(0xfff)) as u16,
        flags_extended: 0,
        path: path.as_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit of `files` (nested paths allowed) in the bare `repo`.
    fn commit_tree(repo: &Repository, files: &[(String, &[u8], i32)]) -> Oid {
        let mut index = git2::Index::new().unwrap();
        for (path, content, mode) in files {
            let id = repo.blob(content).unwrap();
            index
                .add(&IndexEntry {
                    ctime: IndexTime::new(0, 0),
                    mtime: IndexTime::new(0, 0),
                    dev: 0,
                    ino: 0,
                    mode: *mode as u32,
                    uid: 0,
                    gid: 0,
                    file_size: content.len() as u32,
                    id,
                    flags: path.len() as u16,
                    flags_extended: 0,
                    path: path.clone().into_bytes(),
                })
                .unwrap();
        }
        let tree = repo.find_tree(index.write_tree_to(repo).unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@hookci.invalid").unwrap();
        repo.commit(None, &sig, &sig, "many", &tree, &[]).unwrap()
    }

    #[test]
    fn a_parallel_checkout_leaves_what_libgit2_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("o.git")).unwrap();
        let mut files: Vec<(String, Vec<u8>, i32)> = (0..600)
            .map(|i| {
                (
                    format!("src/d{}/f{i}.c", i % 7),
                    format!("file {i}\n").repeat(i % 50 + 1).into_bytes(),
                    0o100644,
                )
            })
            .collect();
        files.push(("run.sh".into(), b"#!/bin/sh\necho hi\n".to_vec(), 0o100755));
        files.push(("link".into(), b"src/d0/f0.c".to_vec(), 0o120000));
        let borrowed: Vec<(String, &[u8], i32)> = files
            .iter()
            .map(|(p, c, m)| (p.clone(), c.as_slice(), *m))
            .collect();
        let id = commit_tree(&origin, &borrowed);

        let ws = dir.path().join("ws");
        let repo = Repository::init(&ws).unwrap();
        std::fs::write(
            repo.path().join("objects/info/alternates"),
            format!("{}\n", dir.path().join("o.git/objects").display()),
        )
        .unwrap();
        let repo = Repository::open(&ws).unwrap();
        assert!(
            checkout(&repo, id).unwrap(),
            "600 files are written in parallel"
        );
        for (path, content, _) in &files[..600] {
            assert_eq!(&std::fs::read(ws.join(path)).unwrap(), content, "{path}");
        }
        let exec = std::fs::metadata(ws.join("run.sh")).unwrap().mode();
        assert_ne!(exec & 0o111, 0, "run.sh is executable");
        assert_eq!(
            std::fs::read_link(ws.join("link")).unwrap(),
            Path::new("src/d0/f0.c")
        );
        assert_eq!(repo.head().unwrap().target(), Some(id));
        assert!(repo.head_detached().unwrap());
        // The index matches the work tree and HEAD: nothing to report.
        let statuses = repo.statuses(None).unwrap();
        let dirty: Vec<_> = statuses
            .iter()
            .map(|s| (s.path().map(str::to_owned), s.status()))
            .collect();
        assert!(dirty.is_empty(), "{dirty:?}");
    }

    #[test]
    fn trees_with_attributes_are_left_to_libgit2() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("o.git")).unwrap();
        let mut files: Vec<(String, &[u8], i32)> = (0..300)
            .map(|i| (format!("f{i}"), &b"x\n"[..], 0o100644))
            .collect();
        files.push(("sub/.gitattributes".into(), b"* text eol=crlf\n", 0o100644));
        let id = commit_tree(&origin, &files);
        let ws = dir.path().join("ws");
        let repo = Repository::init(&ws).unwrap();
        std::fs::write(
            repo.path().join("objects/info/alternates"),
            format!("{}\n", dir.path().join("o.git/objects").display()),
        )
        .unwrap();
        let repo = Repository::open(&ws).unwrap();
        assert!(!checkout(&repo, id).unwrap());
        assert!(!ws.join("f0").exists(), "nothing written");
    }

    /// A workspace whose objects are those of `origin`, the bare repository in `dir`.
    fn workspace(dir: &Path) -> Repository {
        let ws = dir.join("ws");
        let repo = Repository::init(&ws).unwrap();
        std::fs::write(
            repo.path().join("objects/info/alternates"),
            format!("{}\n", dir.join("o.git/objects").display()),
        )
        .unwrap();
        Repository::open(&ws).unwrap()
    }

    /// A commit of 300 files and one more entry, written as a raw tree object: libgit2
    /// would refuse to build a tree with some of these names itself.
    fn commit_with(repo: &Repository, name: &str, mode: &str, id: Oid) -> Oid {
        let blob = repo.blob(b"x\n").unwrap();
        let mut entries: Vec<(String, &str, Oid)> = (0..300)
            .map(|i| (format!("f{i}"), "100644", blob))
            .collect();
        entries.push((name.to_owned(), mode, id));
        entries.sort();
        let mut raw = Vec::new();
        for (name, mode, id) in &entries {
            raw.extend_from_slice(format!("{mode} {name}\0").as_bytes());
            raw.extend_from_slice(id.as_bytes());
        }
        let tree = repo.odb().unwrap().write(ObjectType::Tree, &raw).unwrap();
        let tree = repo.find_tree(tree).unwrap();
        let sig = git2::Signature::now("t", "t@hookci.invalid").unwrap();
        repo.commit(None, &sig, &sig, "odd", &tree, &[]).unwrap()
    }

    #[test]
    fn trees_with_submodules_or_unsafe_names_are_left_to_libgit2() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("o.git")).unwrap();
        let blob = origin.blob(b"planted\n").unwrap();
        let inner = {
            let mut b = origin.treebuilder(None).unwrap();
            b.insert("config", blob, 0o100644).unwrap();
            b.write().unwrap()
        };
        let gitlink = Oid::from_str("0123456789abcdef0123456789abcdef01234567").unwrap();
        let cases = [
            ("sub", "160000", gitlink),
            (".git", "40000", inner),
            (".GiT", "40000", inner),
            ("..", "40000", inner),
            (".", "40000", inner),
            (".git", "100644", blob),
        ];
        for (n, (name, mode, id)) in cases.into_iter().enumerate() {
            let case = dir.path().join(n.to_string());
            std::fs::create_dir(&case).unwrap();
            std::os::unix::fs::symlink(dir.path().join("o.git"), case.join("o.git")).unwrap();
            let commit = commit_with(&origin, name, mode, id);
            let repo = workspace(&case);
            assert!(!checkout(&repo, commit).unwrap(), "{name} ({mode})");
            assert!(!case.join("ws/f0").exists(), "nothing written for {name}");
        }
        assert!(unsafe_name("a/b") && unsafe_name("") && !unsafe_name(".github"));
    }
}
