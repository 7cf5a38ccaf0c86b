//! Getting a commit onto disk: one bare mirror per repository under
//! `state_dir/mirrors/HOST/OWNER/REPO.git`, fetched incrementally with git2, and a fresh
//! detached checkout per run in `state_dir/workspaces/RUN_ID`, or a reused workspace
//! updated in place to the new commit. Everything here blocks: callers run it on
//! blocking threads. Knows nothing of pipelines, runs or the store.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use git2::build::CheckoutBuilder;
use git2::{Cred, FetchOptions, Oid, RemoteCallbacks, Repository};

use crate::config::{HostToken, Secret};
use crate::git::changes::{self, Changes};
use crate::git::parallel;
use crate::git::repo::RepoName;
use crate::git::update;

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("unsupported clone URL host in {0:?}")]
    BadUrl(String),
    #[error("computing the changed files: {0}")]
    Changes(changes::ChangesError),
    #[error("listing the refs of {url}: {source}")]
    List { url: String, source: git2::Error },
    #[error("{0:?} is not a commit id")]
    BadCommit(String),
    #[error("fetching {url} into {mirror}: {source}")]
    Fetch {
        url: String,
        mirror: PathBuf,
        source: git2::Error,
    },
    #[error(
        "commit {commit} is not in {url} (fetched {git_ref}, then the commit itself: {detail})"
    )]
    Missing {
        commit: String,
        url: String,
        git_ref: String,
        detail: String,
    },
    #[error("preparing workspace {path}: {reason}")]
    Workspace { path: PathBuf, reason: String },
}

/// What to check out.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub repo: &'a RepoName,
    pub clone_url: &'a str,
    pub git_ref: &'a str,
    pub commit: &'a str,
}

/// Mirrors under one state directory; one lock per mirror, since concurrent fetches into
/// one repository fight over its ref locks.
pub struct Mirrors {
    root: PathBuf,
    token: Option<HostToken>,
    locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
}

/// The host part of a URL as a single safe path segment; `local` for paths and file://.
fn host_segment(url: &str) -> Result<String, CheckoutError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok("local".into());
    };
    if scheme == "file" {
        return Ok("local".into());
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .replace(':', "_");
    let valid = !host.is_empty()
        && !host.starts_with('.')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if valid {
        Ok(host.to_ascii_lowercase())
    } else {
        Err(CheckoutError::BadUrl(url.to_owned()))
    }
}

/// `STATE_DIR/mirrors/HOST/OWNER/REPO.git`; `repo` was validated, so this stays under
/// `mirrors/`.
pub fn mirror_path(
    state_dir: &Path,
    repo: &RepoName,
    clone_url: &str,
) -> Result<PathBuf, CheckoutError> {
    mirror_in(&state_dir.join("mirrors"), repo, clone_url)
}

fn mirror_in(root: &Path, repo: &RepoName, clone_url: &str) -> Result<PathBuf, CheckoutError> {
    Ok(root
        .join(host_segment(clone_url)?)
        .join(format!("{repo}.git")))
}

/// Removes what a killed fetch left in a mirror: lock files (`refs/**/*.lock`,
/// `packed-refs.lock`, `objects/pack/*.lock`, ...), which make libgit2 refuse to update
/// what they lock, and packs or objects it was still receiving, which would only take
/// space. Only for a caller that knows no other job is using the mirror.
pub fn clear_stale_locks(mirror: &Path) -> std::io::Result<usize> {
    /// A lock file, or a pack or object libgit2 was still receiving (it writes those
    /// under a temporary name, then renames them into place).
    fn leftover(name: &str) -> bool {
        name.ends_with(".lock")
            || name.starts_with("pack_git2_")
            || name.starts_with("tmp_object_git2_")
    }
    /// Cleans `dir`, and below it when `deep` (except `objects/`: thousands of loose
    /// object directories, cleaned on their own terms by the caller).
    fn clean(dir: &Path, deep: bool, removed: &mut usize) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            let name = entry.file_name();
            if kind.is_dir() && deep && name != "objects" {
                clean(&entry.path(), deep, removed)?;
            } else if kind.is_file() && leftover(&name.to_string_lossy()) {
                std::fs::remove_file(entry.path())?;
                *removed += 1;
            }
        }
        Ok(())
    }
    let mut removed = 0;
    clean(mirror, true, &mut removed)?;
    clean(&mirror.join("objects"), false, &mut removed)?;
    clean(&mirror.join("objects/pack"), false, &mut removed)?;
    if removed > 0 {
        tracing::warn!(mirror = %mirror.display(), files = removed, "removed what a stopped git job left behind");
    }
    Ok(removed)
}

/// The token for a credential libgit2 asks for at `asked`: only an https URL on the
/// token's own host gets it, whatever URL the fetch started from.
fn offered<'t>(token: &'t HostToken, asked: &str) -> Result<&'t Secret, git2::Error> {
    token.for_url(asked).ok_or_else(|| {
        let host = asked
            .parse::<warp::http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_default();
        tracing::warn!(asked = %host, allowed = %token.host, "not offering the GitHub token to another host");
        git2::Error::from_str(&format!(
            "the GitHub token goes to https://{} only, not to {host:?}",
            token.host
        ))
    })
}

fn parse_oid(commit: &str) -> Result<Oid, CheckoutError> {
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CheckoutError::BadCommit(commit.to_owned()));
    }
    Oid::from_str(commit).map_err(|_| CheckoutError::BadCommit(commit.to_owned()))
}

impl Mirrors {
    pub fn new(state_dir: &Path, token: Option<HostToken>) -> Mirrors {
        Mirrors {
            root: state_dir.join("mirrors"),
            token,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn mirror_path(&self, repo: &RepoName, clone_url: &str) -> Result<PathBuf, CheckoutError> {
        mirror_in(&self.root, repo, clone_url)
    }

    /// Credentials for `url`: the GitHub token, for https on the GitHub host only (a
    /// pipeline's clone URL may point anywhere), as a credential (never in the URL, so it
    /// cannot end up in a log line or a workspace's config). The URL libgit2 asks for
    /// is checked again: a redirect may have taken the request elsewhere.
    fn callbacks(&self, url: &str) -> RemoteCallbacks<'static> {
        let mut cb = RemoteCallbacks::new();
        if let Some(token) = self.token.clone().filter(|t| t.for_url(url).is_some()) {
            cb.credentials(move |asked, _, _| {
                let offered = offered(&token, asked)?;
                Cred::userpass_plaintext("x-access-token", offered.expose())
            });
        }
        cb
    }

    fn fetch_options(&self, url: &str) -> FetchOptions<'static> {
        let mut fo = FetchOptions::new();
        fo.remote_callbacks(self.callbacks(url));
        fo
    }

    /// The branch and tag heads of the repository at `url`, as (ref, commit): connects
    /// and lists, downloads no objects. Annotated tags are peeled to their commit.
    pub fn remote_heads(&self, url: &str) -> Result<Vec<(String, String)>, CheckoutError> {
        let list_err = |source| CheckoutError::List {
            url: url.to_owned(),
            source,
        };
        let mut remote = git2::Remote::create_detached(url).map_err(list_err)?;
        let conn = remote
            .connect_auth(git2::Direction::Fetch, Some(self.callbacks(url)), None)
            .map_err(list_err)?;
        let mut heads: Vec<(String, String)> = Vec::new();
        for head in conn.list().map_err(list_err)? {
            let name = head.name();
            let oid = head.oid().to_string();
            if let Some(tag) = name.strip_suffix("^{}") {
                // The peeled entry follows its tag: it names the commit to build.
                match heads.iter_mut().find(|(r, _)| r == tag) {
                    Some(entry) => entry.1 = oid,
                    None => heads.push((tag.to_owned(), oid)),
                }
            } else if name.starts_with("refs/heads/") || name.starts_with("refs/tags/") {
                heads.push((name.to_owned(), oid));
            }
        }
        Ok(heads)
    }

    /// Makes sure the mirror holds `commit`, fetching only what is missing: the pushed ref
    /// first, then the commit by id (a force push may have made it unreachable).
    pub fn fetch(&self, req: &Request<'_>) -> Result<PathBuf, CheckoutError> {
        let oid = parse_oid(req.commit)?;
        let path = self.mirror_path(req.repo, req.clone_url)?;
        let lock = self.lock_of(&path);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let fetch_err = |source| CheckoutError::Fetch {
            url: req.clone_url.to_owned(),
            mirror: path.clone(),
            source,
        };
        let repo = match Repository::open_bare(&path) {
            Ok(r) => r,
            Err(_) => Repository::init_bare(&path).map_err(fetch_err)?,
        };
        if repo.find_commit(oid).is_ok() {
            return Ok(path);
        }
        let mut remote = repo.remote_anonymous(req.clone_url).map_err(fetch_err)?;
        if req.git_ref.starts_with("refs/heads/") || req.git_ref.starts_with("refs/tags/") {
            let spec = format!("+{0}:{0}", req.git_ref);
            // A ref that is gone again is not an error yet: the commit may still be fetched by id.
            if let Err(e) = remote.fetch(
                &[spec.as_str()],
                Some(&mut self.fetch_options(req.clone_url)),
                None,
            ) {
                tracing::debug!(git_ref = req.git_ref, error = %e, "fetching the ref failed; trying the commit");
            }
        }
        if repo.find_commit(oid).is_err() {
            let spec = format!("+{0}:refs/hookci/{0}", req.commit);
            let by_id = remote.fetch(
                &[spec.as_str()],
                Some(&mut self.fetch_options(req.clone_url)),
                None,
            );
            if repo.find_commit(oid).is_err() {
                return Err(CheckoutError::Missing {
                    commit: req.commit.to_owned(),
                    url: req.clone_url.to_owned(),
                    git_ref: req.git_ref.to_owned(),
                    detail: by_id
                        .err()
                        .map(|e| e.message().to_owned())
                        .unwrap_or_default(),
                });
            }
        }
        Ok(path)
    }

    /// The files the push of `req.commit` changed since `before` (see `changes`). When the
    /// diff needs a merge base with the default branch (a new branch, or a `before` the
    /// mirror does not have), the remote's default branch is fetched into the mirror first.
    pub fn changes(&self, req: &Request<'_>, before: &str) -> Result<Changes, CheckoutError> {
        let path = self.mirror_path(req.repo, req.clone_url)?;
        let lock = self.lock_of(&path);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let fetch_err = |source| CheckoutError::Fetch {
            url: req.clone_url.to_owned(),
            mirror: path.clone(),
            source,
        };
        let repo = Repository::open_bare(&path).map_err(fetch_err)?;
        let known_before =
            Oid::from_str(before).is_ok_and(|oid| !oid.is_zero() && repo.find_commit(oid).is_ok());
        let mut default_ref = None;
        if !known_before {
            let mut remote = repo.remote_anonymous(req.clone_url).map_err(fetch_err)?;
            let default = {
                let conn = remote
                    .connect_auth(
                        git2::Direction::Fetch,
                        Some(self.callbacks(req.clone_url)),
                        None,
                    )
                    .map_err(fetch_err)?;
                conn.default_branch()
                    .ok()
                    .and_then(|b| b.as_str().ok().map(str::to_owned))
            };
            // Pushing the default branch itself: its head is the new commit, no base.
            if let Some(default) =
                default.filter(|d| d != req.git_ref && d.starts_with("refs/heads/"))
            {
                let spec = format!("+{default}:{default}");
                remote
                    .fetch(
                        &[spec.as_str()],
                        Some(&mut self.fetch_options(req.clone_url)),
                        None,
                    )
                    .map_err(fetch_err)?;
                default_ref = Some(default);
            }
        }
        changes::changed_paths(&repo, before, req.commit, default_ref.as_deref())
            .map_err(CheckoutError::Changes)
    }

    /// The lock of one mirror (concurrent fetches into one repository fight over refs).
    fn lock_of(&self, mirror: &Path) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(mirror.to_path_buf()).or_default())
    }

    /// A fresh working tree of `commit` at `dest` with a detached HEAD. Its objects are
    /// borrowed from the mirror (git alternates), so nothing is copied. The mirror must
    /// hold the commit already ([`Mirrors::fetch`]); this only reads it, so checkouts
    /// from one mirror may run side by side, and beside its next fetch.
    pub fn checkout(&self, req: &Request<'_>, dest: &Path) -> Result<(), CheckoutError> {
        let mirror = self.mirror_path(req.repo, req.clone_url)?;
        let ws_err = |reason: String| CheckoutError::Workspace {
            path: dest.to_path_buf(),
            reason,
        };
        // What a step left there (links, directories it made read-only) goes without
        // being followed or wedging the slot.
        crate::fsx::remove_all(dest).map_err(|e| ws_err(e.to_string()))?;
        // Closed from the start (the steps' user gets it whole, later): with `run_as`,
        // no step of another run enters it while it is filled.
        crate::fsx::closed_dir(dest).map_err(|e| ws_err(e.to_string()))?;
        let repo = Repository::init(dest).map_err(|e| ws_err(e.to_string()))?;
        let objects =
            std::fs::canonicalize(mirror.join("objects")).map_err(|e| ws_err(e.to_string()))?;
        std::fs::write(
            repo.path().join("objects/info/alternates"),
            format!("{}\n", objects.display()),
        )
        .map_err(|e| ws_err(e.to_string()))?;
        let repo = Repository::open(dest).map_err(|e| ws_err(e.to_string()))?;
        repo.remote("origin", req.clone_url)
            .map_err(|e| ws_err(e.to_string()))?;
        let oid = parse_oid(req.commit)?;
        if parallel::checkout(&repo, oid).map_err(|e| ws_err(e.to_string()))? {
            return Ok(());
        }
        repo.set_head_detached(oid)
            .map_err(|e| ws_err(e.to_string()))?;
        repo.checkout_head(Some(CheckoutBuilder::new().force()))
            .map_err(|e| ws_err(e.to_string()))?;
        Ok(())
    }
}

/// How [`Mirrors::update`] brought a reused workspace to its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Updated {
    /// The workspace was there and sound: only what differs was written.
    InPlace,
    /// None was there yet, or the last update of it was cut short: checked out afresh.
    Fresh,
    /// It was damaged (an update cut short, or not a workspace of this mirror): replaced.
    Replaced,
}

/// The marker beside a reused workspace while it is being updated: written before the
/// update touches a file, removed once the workspace holds the commit exactly. Found at
/// the start of an update, it says the last one was cut short (a failed update, a
/// killed git job, a crash of hookci), and the workspace is never built from.
pub fn updating_marker(dest: &Path) -> PathBuf {
    beside(dest, ".updating")
}

/// The file beside a reused workspace that names the boot its last complete update was
/// made in. Nothing of an update is synced to disk (that would cost more than the
/// update), so after the machine itself went down neither the marker nor the files
/// can be trusted: a workspace last updated in another boot is replaced.
fn boot_stamp(dest: &Path) -> PathBuf {
    beside(dest, ".boot")
}

/// The file beside a reused workspace that hookci rewrites once the workspace is handed
/// to a run's steps (after it is given to `run_as`): its change time is the moment
/// from which only steps changed the work tree. A tracked file whose change time is
/// later was changed by a step, even where the step put its size and modification time
/// back (which the owner of a file may do; its change time no process can set).
pub fn handed_stamp(dest: &Path) -> PathBuf {
    beside(dest, ".handed")
}

/// Marks the reused workspace `dest` as handed to a run's steps (see [`handed_stamp`]).
pub fn mark_handed(dest: &Path) -> std::io::Result<()> {
    use std::io::Write;
    // Made anew, and its change time at birth written into it: what a later link to
    // it, or any other change of its inode, does to its change time does not move it.
    let stamp = handed_stamp(dest);
    match std::fs::remove_file(&stamp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::File::create(&stamp)?;
    let born = file.metadata()?;
    writeln!(file, "{} {}", born.ctime(), born.ctime_nsec())
}

/// The moment `dest` was last handed to steps, from its [`handed_stamp`]; `None` where
/// there is none (a workspace never handed over since stamps were made) or it does not
/// read as one.
fn handed_at(dest: &Path) -> Option<(i64, i64)> {
    let stamp = handed_stamp(dest);
    let text = std::fs::read_to_string(&stamp).ok()?;
    let (secs, nanos) = text.trim().split_once(' ')?;
    let at: (i64, i64) = (secs.parse().ok()?, nanos.parse().ok()?);
    // Written after its birth, never later than its own change time: a moment past it
    // was not written by hookci (a step running as the daemon's user could), and is
    // not trusted.
    let meta = std::fs::metadata(&stamp).ok()?;
    (at <= (meta.ctime(), meta.ctime_nsec())).then_some(at)
}

/// The file beside a reused workspace that names the uid of `run_as_uids` its last run
/// had: the next run asks for that uid, whose files the workspace's are.
pub fn uid_stamp(dest: &Path) -> PathBuf {
    beside(dest, ".uid")
}

fn beside(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dest.with_file_name(name)
}

/// This boot of the machine (Linux's boot id; empty where there is none, so a
/// restart of the machine goes unseen there).
fn this_boot() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

impl Mirrors {
    /// Brings the reused workspace `dest` to `commit` in place (see `update`: only the
    /// files that differ are written, those the new tree no longer has removed, and
    /// every untracked or ignored path goes except those `keep` accepts, given a path
    /// relative to `dest` with a trailing `/` for a directory). A missing or damaged
    /// workspace is replaced by a fresh checkout.
    pub fn update(
        &self,
        req: &Request<'_>,
        dest: &Path,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Updated, CheckoutError> {
        let ws_err = |reason: String| CheckoutError::Workspace {
            path: dest.to_path_buf(),
            reason,
        };
        let oid = parse_oid(req.commit)?;
        let marker = updating_marker(dest);
        let stamp = boot_stamp(dest);
        let boot = this_boot();
        let existed = dest.exists();
        let cut_short = marker.exists();
        let other_boot =
            existed && !std::fs::read_to_string(&stamp).is_ok_and(|b| b.trim() == boot);
        if let Some(parent) = dest.parent() {
            // Passable but not listable, as `workspaces/` is for a `run_as` user.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(parent)
                .map_err(|e| ws_err(e.to_string()))?;
        }
        std::fs::File::create(&marker)
            .map_err(|e| ws_err(format!("writing {}: {e}", marker.display())))?;
        let outcome = if cut_short || other_boot {
            let why = if cut_short {
                "the last update of this workspace was cut short"
            } else {
                "the machine restarted since this workspace was last updated"
            };
            tracing::warn!(workspace = %dest.display(), "{why}: replacing it");
            self.checkout(req, dest)?;
            Updated::Replaced
        } else if !existed {
            self.checkout(req, dest)?;
            Updated::Fresh
        } else {
            match self.open_reused(req, dest) {
                Ok(repo) => {
                    match update::update_in_place(&repo, oid, dest, keep, handed_at(dest)) {
                        Ok(()) => Updated::InPlace,
                        // What the failed update left is never built from, and a fresh
                        // checkout does not depend on what broke it (a step may have
                        // damaged `.git` itself).
                        Err(e) => {
                            drop(repo);
                            tracing::warn!(workspace = %dest.display(), error = %e, "updating the workspace in place failed: replacing it");
                            self.checkout(req, dest)?;
                            Updated::Replaced
                        }
                    }
                }
                Err(why) => {
                    tracing::warn!(workspace = %dest.display(), reason = %why, "not a sound workspace of this mirror: replacing it");
                    self.checkout(req, dest)?;
                    Updated::Replaced
                }
            }
        };
        distrust_ctime(dest).map_err(|e| ws_err(format!("setting core.trustctime: {e}")))?;
        std::fs::write(&stamp, format!("{boot}\n"))
            .map_err(|e| ws_err(format!("writing {}: {e}", stamp.display())))?;
        std::fs::remove_file(&marker)
            .map_err(|e| ws_err(format!("removing {}: {e}", marker.display())))?;
        Ok(outcome)
    }

    /// The reused workspace's repository, if it borrows its objects from this mirror.
    /// Its work tree may be the `run_as` user's, which libgit2 refuses unless owner
    /// validation is off (the git worker turns it off for updates): what could send the
    /// update elsewhere is `.git`, and that is checked here.
    fn open_reused(&self, req: &Request<'_>, dest: &Path) -> Result<Repository, String> {
        // With `run_as` a step owns the work tree but not `.git`: a `.git` it could
        // have made (a link, a `gitdir:` file, one of its own) could send this update,
        // run by the daemon, out of the workspace.
        let git_dir = std::fs::symlink_metadata(dest.join(".git"))
            .map_err(|e| format!("reading its .git: {e}"))?;
        // SAFETY: geteuid cannot fail and touches no memory.
        let daemon = unsafe { libc::geteuid() };
        if !git_dir.is_dir() || git_dir.uid() != daemon {
            return Err(format!(
                "its .git is not a directory of hookci's own (uid {daemon})"
            ));
        }
        let repo = Repository::open(dest).map_err(|e| e.to_string())?;
        let workdir = repo.workdir().map(std::fs::canonicalize).transpose();
        if workdir.ok().flatten() != std::fs::canonicalize(dest).ok() {
            return Err("its work tree is configured to be elsewhere".into());
        }
        let mirror = self
            .mirror_path(req.repo, req.clone_url)
            .map_err(|e| e.to_string())?;
        let objects = std::fs::canonicalize(mirror.join("objects")).map_err(|e| e.to_string())?;
        let alternates = std::fs::read_to_string(repo.path().join("objects/info/alternates"))
            .map_err(|e| format!("reading its alternates: {e}"))?;
        if alternates.trim_end() != objects.to_string_lossy() {
            return Err(format!(
                "it borrows objects from {:?}, not {}",
                alternates.trim_end(),
                objects.display()
            ));
        }
        Ok(repo)
    }
}

/// With `run_as` the work tree is given to the steps' user after each update, and a
/// chown changes a file's ctime: with ctime trusted, the next update would hash every
/// file it gave to see whether it changed. Set once per workspace.
fn distrust_ctime(dest: &Path) -> Result<(), git2::Error> {
    let repo = Repository::open(dest)?;
    let mut config = repo.config()?.open_level(git2::ConfigLevel::Local)?;
    if config.get_bool("core.trustctime").ok() != Some(false) {
        config.set_bool("core.trustctime", false)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Commits `files` on top of `branch` in `repo` (created if needed) and returns the id.
    pub(crate) fn commit(
        repo: &Repository,
        branch: &str,
        files: &[(&str, &str)],
        message: &str,
    ) -> Oid {
        let sig = git2::Signature::now("hookci test", "test@hookci.invalid").unwrap();
        let refname = format!("refs/heads/{branch}");
        let parent = repo
            .find_reference(&refname)
            .ok()
            .and_then(|r| r.peel_to_commit().ok());
        let mut builder = repo
            .treebuilder(parent.as_ref().map(|p| p.tree().unwrap()).as_ref())
            .unwrap();
        for (name, content) in files {
            let blob = repo.blob(content.as_bytes()).unwrap();
            builder.insert(name, blob, 0o100644).unwrap();
        }
        let tree = repo.find_tree(builder.write().unwrap()).unwrap();
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        repo.commit(Some(&refname), &sig, &sig, message, &tree, &parents)
            .unwrap()
    }

    #[test]
    fn the_token_is_offered_to_https_on_its_host_only() {
        let token = HostToken {
            host: "github.com".to_owned(),
            token: Secret::new("tok-8d1e"),
        };
        let enterprise = HostToken {
            host: "ghe.example.com:8443".to_owned(),
            token: Secret::new("tok-77c2"),
        };
        let table = [
            (&token, "https://github.com/o/r.git", true),
            (&token, "https://GitHub.com/o/r", true),
            (&token, "https://github.com:443/o/r", true),
            (&token, "https://x-access-token@github.com/o/r", true),
            (&token, "http://github.com/o/r.git", false),
            (&token, "https://evil.example/o/r.git", false),
            (&token, "https://github.com.evil.example/o/r", false),
            (&token, "https://github.com:8443/o/r", false),
            (&token, "https://api.github.com/o/r", false),
            (&token, "ssh://git@github.com/o/r", false),
            (&token, "not a url", false),
            (&enterprise, "https://ghe.example.com:8443/o/r", true),
            (&enterprise, "https://ghe.example.com/o/r", false),
        ];
        for (token, asked, ok) in table {
            let got = offered(token, asked);
            assert_eq!(got.is_ok(), ok, "{asked}");
            if let Ok(secret) = got {
                assert_eq!(secret.expose(), token.token.expose());
            }
        }
    }

    #[test]
    fn mirrors_fetch_incrementally_and_check_out_detached() {
        let dir = tempfile::tempdir().unwrap();
        let origin_path = dir.path().join("origin.git");
        let origin = Repository::init_bare(&origin_path).unwrap();
        let c1 = commit(&origin, "main", &[("a.txt", "one")], "first");
        let mirrors = Mirrors::new(&dir.path().join("state"), None);
        let repo = RepoName::parse("o/r").unwrap();
        let url = origin_path.to_str().unwrap();
        let c1s = c1.to_string();
        let req = Request {
            repo: &repo,
            clone_url: url,
            git_ref: "refs/heads/main",
            commit: &c1s,
        };
        let ws = dir.path().join("ws1");
        mirrors.fetch(&req).unwrap();
        mirrors.checkout(&req, &ws).unwrap();
        assert_eq!(std::fs::read_to_string(ws.join("a.txt")).unwrap(), "one");
        let wsrepo = Repository::open(&ws).unwrap();
        assert!(wsrepo.head_detached().unwrap());
        assert_eq!(wsrepo.head().unwrap().target(), Some(c1));
        let mirror = mirrors.mirror_path(&repo, url).unwrap();
        assert_eq!(mirror, dir.path().join("state/mirrors/local/o/r.git"));

        // A second commit: the mirror fetches only what is new.
        let c2 = commit(&origin, "main", &[("a.txt", "two")], "second");
        // A commit the pushed ref does not reach (the ref moved on) is fetched by id.
        let elsewhere = commit(&origin, "tmp", &[("b.txt", "x")], "elsewhere");
        for (oid, file, content) in [(c2, "a.txt", "two"), (elsewhere, "b.txt", "x")] {
            let s = oid.to_string();
            let req = Request {
                commit: &s,
                ..req.clone()
            };
            let ws = dir.path().join(format!("ws-{s}"));
            mirrors.fetch(&req).unwrap();
            mirrors.checkout(&req, &ws).unwrap();
            assert_eq!(std::fs::read_to_string(ws.join(file)).unwrap(), content);
        }

        let missing = "1".repeat(40);
        let err = mirrors
            .fetch(&Request {
                commit: &missing,
                ..req.clone()
            })
            .unwrap_err();
        assert!(err.to_string().contains(&missing), "{err}");
    }

    #[test]
    fn an_update_in_place_writes_the_new_commit_exactly_and_keeps_what_it_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("o.git")).unwrap();
        let url = dir.path().join("o.git").display().to_string();
        let repo = RepoName::parse("o/r").unwrap();
        let mirrors = Mirrors::new(&dir.path().join("state"), None);
        let c1 = commit(
            &origin,
            "main",
            &[("a", "1"), ("gone", "x"), ("b", "b")],
            "one",
        )
        .to_string();
        let req = |commit| Request {
            repo: &repo,
            clone_url: &url,
            git_ref: "refs/heads/main",
            commit,
        };
        let ws = dir.path().join("slot/0");
        let keep = |p: &str| p == "target/" || p == "src/kept.o";
        mirrors.fetch(&req(&c1)).unwrap();
        assert_eq!(
            mirrors.update(&req(&c1), &ws, &keep).unwrap(),
            Updated::Fresh
        );
        for (path, content) in [
            ("target/debug/x", "warm"),
            ("untracked/deep/f", "u"),
            ("stray", "s"),
            ("src/kept.o", "o"),
            ("src/drop.o", "o"),
            ("a", "edited by a step"),
        ] {
            std::fs::create_dir_all(ws.join(path).parent().unwrap()).unwrap();
            std::fs::write(ws.join(path), content).unwrap();
        }
        let mut tb = origin
            .treebuilder(Some(
                &origin
                    .find_commit(Oid::from_str(&c1).unwrap())
                    .unwrap()
                    .tree()
                    .unwrap(),
            ))
            .unwrap();
        tb.remove("gone").unwrap();
        let tree = origin.find_tree(tb.write().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@hookci.invalid").unwrap();
        let parent = origin.find_commit(Oid::from_str(&c1).unwrap()).unwrap();
        origin
            .commit(
                Some("refs/heads/main"),
                &sig,
                &sig,
                "drop",
                &tree,
                &[&parent],
            )
            .unwrap();
        let c2 = commit(&origin, "main", &[("c", "new")], "two").to_string();
        mirrors.fetch(&req(&c2)).unwrap();
        assert_eq!(
            mirrors.update(&req(&c2), &ws, &keep).unwrap(),
            Updated::InPlace
        );
        let read = |p: &str| std::fs::read_to_string(ws.join(p)).ok();
        assert_eq!(read("a").as_deref(), Some("1"));
        assert_eq!(read("c").as_deref(), Some("new"));
        assert_eq!(read("b").as_deref(), Some("b"));
        assert_eq!(read("target/debug/x").as_deref(), Some("warm"));
        assert_eq!(read("src/kept.o").as_deref(), Some("o"));
        for gone in ["gone", "stray", "src/drop.o", "untracked"] {
            assert!(!ws.join(gone).exists(), "{gone} is still there");
        }
        let head = Repository::open(&ws)
            .unwrap()
            .head()
            .unwrap()
            .target()
            .unwrap();
        assert_eq!(head.to_string(), c2);

        // An update cut short leaves its marker: the workspace is replaced, keep or not.
        std::fs::write(updating_marker(&ws), "").unwrap();
        assert_eq!(
            mirrors.update(&req(&c2), &ws, &keep).unwrap(),
            Updated::Replaced
        );
        assert!(!ws.join("target").exists());
        assert!(!updating_marker(&ws).exists());
        assert_eq!(read("c").as_deref(), Some("new"));

        // Sound again: updated in place. Last updated in another boot of the machine
        // (nothing of an update is synced): replaced.
        std::fs::create_dir_all(ws.join("target")).unwrap();
        assert_eq!(
            mirrors.update(&req(&c2), &ws, &keep).unwrap(),
            Updated::InPlace
        );
        assert!(ws.join("target").exists());
        std::fs::write(boot_stamp(&ws), "another-boot\n").unwrap();
        assert_eq!(
            mirrors.update(&req(&c2), &ws, &keep).unwrap(),
            Updated::Replaced
        );
        assert!(!ws.join("target").exists());
        assert_eq!(
            std::fs::read_to_string(boot_stamp(&ws)).unwrap().trim(),
            this_boot()
        );
    }

    #[test]
    fn file_urls_work_like_paths() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("o.git")).unwrap();
        let c1 = commit(&origin, "main", &[("a.txt", "via file://")], "one").to_string();
        let url = format!("file://{}", dir.path().join("o.git").display());
        let repo = RepoName::parse("o/r").unwrap();
        let mirrors = Mirrors::new(&dir.path().join("state"), None);
        let req = Request {
            repo: &repo,
            clone_url: &url,
            git_ref: "refs/heads/main",
            commit: &c1,
        };
        mirrors.fetch(&req).unwrap();
        mirrors.checkout(&req, &dir.path().join("ws")).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ws/a.txt")).unwrap(),
            "via file://"
        );
        assert_eq!(
            mirrors.mirror_path(&repo, &url).unwrap(),
            dir.path().join("state/mirrors/local/o/r.git")
        );
    }

    #[test]
    fn remote_heads_peel_annotated_tags() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("o.git")).unwrap();
        let c1 = commit(&origin, "main", &[("a", "1")], "one");
        let sig = git2::Signature::now("t", "t@hookci.invalid").unwrap();
        let tag = origin
            .tag(
                "v1",
                &origin.find_object(c1, None).unwrap(),
                &sig,
                "release",
                false,
            )
            .unwrap();
        assert_ne!(tag, c1);
        let mirrors = Mirrors::new(dir.path(), None);
        let mut heads = mirrors
            .remote_heads(dir.path().join("o.git").to_str().unwrap())
            .unwrap();
        heads.sort();
        assert_eq!(
            heads,
            vec![
                ("refs/heads/main".to_owned(), c1.to_string()),
                ("refs/tags/v1".to_owned(), c1.to_string())
            ]
        );
        assert!(mirrors.remote_heads("/nonexistent/repo.git").is_err());
    }

    #[test]
    fn a_fetch_killed_midway_leaves_no_lock_that_blocks_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("o.git")).unwrap();
        let url = dir.path().join("o.git").display().to_string();
        let mirrors = Mirrors::new(dir.path(), None);
        let repo = RepoName::parse("o/r").unwrap();
        let req = |commit| Request {
            repo: &repo,
            clone_url: &url,
            git_ref: "refs/heads/main",
            commit,
        };
        let c1 = commit(&origin, "main", &[("a", "1")], "first").to_string();
        let mirror = mirrors.fetch(&req(&c1)).unwrap();
        let main_of = || {
            let fetched = Repository::open_bare(&mirror).unwrap();
            let id = fetched.refname_to_id("refs/heads/main").unwrap();
            id.to_string()
        };
        // What a fetch killed while it updated refs leaves behind.
        let leftovers = [
            mirror.join("refs/heads/main.lock"),
            mirror.join("packed-refs.lock"),
            mirror.join("objects/pack/pack_git2_3f1c0a"),
            mirror.join("objects/pack/pack-0123abcd.idx.lock"),
            mirror.join("objects/tmp_object_git2_9d2e"),
        ];
        for path in &leftovers {
            std::fs::write(path, "").unwrap();
        }
        // The commit still arrives (fetched by id), but the locked branch stays behind.
        let c2 = commit(&origin, "main", &[("a", "2")], "second").to_string();
        mirrors.fetch(&req(&c2)).unwrap();
        assert_eq!(main_of(), c1, "libgit2 honours the lock");
        assert_eq!(clear_stale_locks(&mirror).unwrap(), leftovers.len());
        assert!(leftovers.iter().all(|p| !p.exists()));
        let c3 = commit(&origin, "main", &[("a", "3")], "third").to_string();
        mirrors.fetch(&req(&c3)).unwrap();
        assert_eq!(main_of(), c3);
        let absent = dir.path().join("no-such-mirror");
        assert_eq!(clear_stale_locks(&absent).unwrap(), 0);
    }

    #[test]
    fn host_segments_stay_one_safe_segment() {
        assert_eq!(
            host_segment("https://github.com/o/r.git").unwrap(),
            "github.com"
        );
        assert_eq!(
            host_segment("https://x-access-token:abc@GHE.corp:8443/o/r").unwrap(),
            "ghe.corp_8443"
        );
        assert_eq!(host_segment("/srv/git/r.git").unwrap(), "local");
        assert_eq!(host_segment("file:///srv/git/r.git").unwrap(), "local");
        assert!(host_segment("https://../o/r").is_err());
        assert!(host_segment("https:///o/r").is_err());
        assert!(host_segment("ssh://ho st/x").is_err());
    }
}
