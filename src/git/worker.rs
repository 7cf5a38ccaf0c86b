//! Git work in a child process. The daemon never runs libgit2 itself: each ref listing,
//! fetch, diff and checkout runs in `hookci git-worker`, a child started for that one job,
//! which reads a request (JSON) on stdin and writes one reply (JSON) on stdout.
//!
//! Why a child: a hung remote, a cancel or a stop ends the job with a kill, which no
//! in-process libgit2 call allows; a fault inside libgit2 fails one run, not the daemon;
//! and the memory libgit2 and its TLS library take while they work goes back with the
//! child, so the idle daemon stays small. The git work itself is `checkout` (src/git/checkout.rs), run in
//! the child. This module also owns the daemon's side: one fetch at a time per mirror.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::config::{HostToken, Secret};
use crate::git::changes::Changes;
use crate::git::checkout::{self, Mirrors, Request as Checkout, Updated};
use crate::git::repo::RepoName;
use crate::pipeline::pattern::PatternList;

/// The subcommand that runs one job (hidden from `--help`).
pub const SUBCOMMAND: &str = "git-worker";

/// How long the child waits for a remote to accept the connection, and then for each
/// read from it, before it gives up on a remote that hangs.
const CONNECT_TIMEOUT_MS: i32 = 30_000;
const READ_TIMEOUT_MS: i32 = 120_000;

/// The most a reply may weigh; a ref listing of a very large repository stays far below.
const MAX_REPLY: u64 = 64 << 20;

/// The daemon's variables the child may see: what libgit2 needs to find a home directory
/// and CA certificates, and the log filter. The webhook secret and API token never go.
const CHILD_ENV: [&str; 7] = [
    "PATH",
    "HOME",
    "LANG",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HOOKCI_LOG",
    "TMPDIR",
];

#[derive(Serialize, Deserialize)]
struct Request {
    state_dir: PathBuf,
    /// The GitHub token for https remotes on its host; it travels over the pipe only,
    /// never in the child's arguments or environment.
    token: Option<WireToken>,
    job: Job,
}

#[derive(Serialize, Deserialize)]
struct WireToken {
    host: String,
    value: String,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
enum Job {
    /// The branch and tag heads of a remote (connect and list, no download).
    RemoteHeads { url: String },
    /// Fetch `commit` into the repository's mirror; then, if asked, the paths changed
    /// since `changes_since`. The daemon runs one at a time per mirror.
    Fetch {
        repo: String,
        clone_url: String,
        git_ref: String,
        commit: String,
        changes_since: Option<String>,
    },
    /// Check a fetched commit out of the mirror into `dest` (reads the mirror only).
    Checkout {
        repo: String,
        clone_url: String,
        commit: String,
        dest: PathBuf,
    },
    /// Bring the reused workspace `dest` to a fetched commit in place (see
    /// [`Mirrors::update`]), keeping the untracked paths `keep` matches.
    Update {
        repo: String,
        clone_url: String,
        commit: String,
        dest: PathBuf,
        keep: Vec<String>,
    },
}

impl Job {
    /// Whether the job may talk to a remote over https: checkouts and updates only read
    /// the mirror, and a local or `git://` remote has no TLS (an `http://` one may
    /// redirect to https).
    fn may_use_tls(&self) -> bool {
        let url = match self {
            Job::RemoteHeads { url } => url,
            Job::Fetch { clone_url, .. } => clone_url,
            Job::Checkout { .. } | Job::Update { .. } => return false,
        };
        let plain = ["/", "file://", "git://"];
        !plain.iter().any(|p| {
            url.get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Heads(Vec<(String, String)>),
    Fetched { changes: Option<Changes> },
    CheckedOut,
    Updated(Updated),
    Failed(String),
}

/// Why a git job gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The run was stopped (canceled, or the daemon is stopping) and the child killed.
    #[error("stopped")]
    Stopped,
    #[error("{0}")]
    Failed(String),
}

/// A commit to fetch.
pub struct Fetch<'a> {
    pub repo: &'a RepoName,
    pub clone_url: &'a str,
    pub git_ref: &'a str,
    pub commit: &'a str,
    /// Also compute the paths changed since this commit (for `on.paths`).
    pub changes_since: Option<&'a str>,
}

/// Starts git jobs in child processes; at most one fetch at a time per mirror, since
/// concurrent fetches into one repository fight over its ref locks.
pub struct GitWorker {
    state_dir: PathBuf,
    /// Replaced by a reload; a job takes the token current when it starts.
    token: std::sync::RwLock<Option<HostToken>>,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl GitWorker {
    pub fn new(state_dir: &Path, token: Option<HostToken>) -> GitWorker {
        GitWorker {
            state_dir: state_dir.to_path_buf(),
            token: std::sync::RwLock::new(token),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The token for jobs started from now on.
    pub fn set_token(&self, token: Option<HostToken>) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token;
    }

    /// The branch and tag heads of the repository at `url`, as (ref, commit).
    pub async fn remote_heads(&self, url: &str) -> Result<Vec<(String, String)>, String> {
        let job = Job::RemoteHeads {
            url: url.to_owned(),
        };
        match self.call(job, None).await {
            Ok(Reply::Heads(heads)) => Ok(heads),
            Ok(_) => Err("git worker: unexpected reply".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Fetches the commit into its mirror (and computes the changed paths if asked),
    /// one job at a time per mirror. A change of `stop` to true, while this waits for
    /// the mirror or while the job runs, kills the job and answers [`GitError::Stopped`].
    pub async fn fetch(
        &self,
        f: Fetch<'_>,
        stop: &watch::Receiver<bool>,
    ) -> Result<Option<Changes>, GitError> {
        let mirror = checkout::mirror_path(&self.state_dir, f.repo, f.clone_url)
            .map_err(|e| GitError::Failed(e.to_string()))?;
        let lock = self.lock_of(&mirror);
        let mut waiting = stop.clone();
        let _held = tokio::select! {
            held = lock.lock() => held,
            Ok(_) = waiting.wait_for(|stopped| *stopped) => return Err(GitError::Stopped),
        };
        let job = Job::Fetch {
            repo: f.repo.to_string(),
            clone_url: f.clone_url.to_owned(),
            git_ref: f.git_ref.to_owned(),
            commit: f.commit.to_owned(),
            changes_since: f.changes_since.map(str::to_owned),
        };
        match self.call(job, Some(stop.clone())).await? {
            Reply::Fetched { changes } => Ok(changes),
            _ => Err(GitError::Failed("git worker: unexpected reply".into())),
        }
    }

    /// Checks a commit [`GitWorker::fetch`] brought into the mirror out into `dest`.
    /// Checkouts only read the mirror, so they take no lock: runs of one repository
    /// check out side by side.
    pub async fn checkout(
        &self,
        repo: &RepoName,
        clone_url: &str,
        commit: &str,
        dest: &Path,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), GitError> {
        let job = Job::Checkout {
            repo: repo.to_string(),
            clone_url: clone_url.to_owned(),
            commit: commit.to_owned(),
            dest: dest.to_path_buf(),
        };
        match self.call(job, Some(stop.clone())).await? {
            Reply::CheckedOut => Ok(()),
            _ => Err(GitError::Failed("git worker: unexpected reply".into())),
        }
    }

    /// Brings the reused workspace `dest` to a commit [`GitWorker::fetch`] brought into
    /// the mirror, keeping the untracked paths that `keep` (filter patterns) matches.
    /// Like a checkout it only reads the mirror.
    pub async fn update(
        &self,
        repo: &RepoName,
        clone_url: &str,
        commit: &str,
        (dest, keep): (&Path, &[String]),
        stop: &watch::Receiver<bool>,
    ) -> Result<Updated, GitError> {
        let job = Job::Update {
            repo: repo.to_string(),
            clone_url: clone_url.to_owned(),
            commit: commit.to_owned(),
            dest: dest.to_path_buf(),
            keep: keep.to_vec(),
        };
        match self.call(job, Some(stop.clone())).await? {
            Reply::Updated(how) => Ok(how),
            _ => Err(GitError::Failed("git worker: unexpected reply".into())),
        }
    }

    fn lock_of(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(mirror.to_path_buf()).or_default())
    }

    /// Runs one job in a fresh child. The child dies with the future (kill on drop) and
    /// with the daemon (parent-death signal), so a crash leaves no fetch running.
    async fn call(&self, job: Job, stop: Option<watch::Receiver<bool>>) -> Result<Reply, GitError> {
        let failed =
            |what: &str, e: std::io::Error| GitError::Failed(format!("git worker: {what}: {e}"));
        let tls = job.may_use_tls();
        let request = serde_json::to_vec(&Request {
            state_dir: self.state_dir.clone(),
            token: self
                .token
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|t| WireToken {
                    host: t.host.clone(),
                    value: t.token.expose().to_owned(),
                }),
            job,
        })
        .map_err(|e| GitError::Failed(format!("git worker: {e}")))?;
        let mut cmd = tokio::process::Command::new(this_binary());
        cmd.arg(SUBCOMMAND)
            .env_clear()
            .envs(
                CHILD_ENV
                    .iter()
                    .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a signal to the daemon's group (Ctrl-C in a
            // terminal) must not end a job the daemon means to stop its own way.
            .process_group(0)
            .kill_on_drop(true);
        if !tls {
            // libgit2 loads the whole CA bundle when it starts (tens of milliseconds,
            // more than a one-file update takes); a job that never opens a TLS
            // connection gets an empty one instead.
            cmd.env("SSL_CERT_FILE", "/dev/null");
        }
        // A daemon that died between fork and prctl would leave the job running: the
        // child checks that its parent is still the daemon once the signal is armed.
        let daemon = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
        let dac_override = ambient_dac_override();
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                keep_only_dac_override(dac_override)?;
                if libc::getppid() != daemon {
                    return Err(std::io::Error::other("the daemon is gone"));
                }
                Ok(())
            });
        }
        // Tracked: a run's sweep must neither kill nor reap it (see src/run/contain.rs).
        let (mut child, _tracked) =
            crate::process::spawn_tracked(&mut cmd).map_err(|e| failed("cannot start", e))?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| GitError::Failed("git worker: no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| GitError::Failed("git worker: no stdout".into()))?;
        let exchange = async {
            stdin
                .write_all(&request)
                .await
                .map_err(|e| failed("sending the job", e))?;
            drop(stdin);
            let mut reply = Vec::new();
            stdout
                .take(MAX_REPLY)
                .read_to_end(&mut reply)
                .await
                .map_err(|e| failed("reading the reply", e))?;
            let status = child.wait().await.map_err(|e| failed("waiting", e))?;
            match serde_json::from_slice::<Reply>(&reply) {
                Ok(Reply::Failed(reason)) => Err(GitError::Failed(reason)),
                Ok(reply) => Ok(reply),
                Err(_) => Err(GitError::Failed(format!(
                    "git worker ended without a reply ({status})"
                ))),
            }
        };
        let Some(mut stop) = stop else {
            return exchange.await;
        };
        let stopped = tokio::select! {
            result = exchange => return result,
            Ok(_) = stop.wait_for(|stopped| *stopped) => GitError::Stopped,
        };
        // Killed and waited for: the next job on this mirror, and the removal of the
        // run's workspace, come after the job is really gone.
        let _ = child.kill().await;
        Err(stopped)
    }
}

/// Jobs run this very binary, by its path so that process listings name it; once an
/// upgrade replaced the file on disk, through `/proc/self/exe`, which still is the
/// running version.
fn this_binary() -> PathBuf {
    match std::env::current_exe() {
        Ok(path) if path.is_file() => path,
        _ => PathBuf::from("/proc/self/exe"),
    }
}

/// `hookci git-worker`: one job from stdin, its reply on stdout. Exit 0 whenever a reply
/// was written (a failed job is a reply too); 2 when the request was unreadable.
pub fn worker_main() -> ExitCode {
    // It holds the GitHub token: no step may read it out of this process.
    crate::process::not_dumpable();
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().take(1 << 20).read_to_end(&mut input) {
        eprintln!("hookci git-worker: reading the job: {e}");
        return ExitCode::from(2);
    }
    let request: Request = match serde_json::from_slice(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hookci git-worker: not a job: {e}");
            return ExitCode::from(2);
        }
    };
    // SAFETY: set once, before any other libgit2 call of this process.
    unsafe {
        let _ = git2::opts::set_server_connect_timeout_in_milliseconds(CONNECT_TIMEOUT_MS);
        let _ = git2::opts::set_server_timeout_in_milliseconds(READ_TIMEOUT_MS);
    }
    let reply = work(request).unwrap_or_else(Reply::Failed);
    let mut out = std::io::stdout().lock();
    match serde_json::to_writer(&mut out, &reply).map(|()| out.flush()) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

fn work(request: Request) -> Result<Reply, String> {
    let token = request.token.map(|t| HostToken {
        host: t.host,
        token: Secret::new(t.value),
    });
    let mirrors = Mirrors::new(&request.state_dir, token);
    match request.job {
        Job::RemoteHeads { url } => mirrors
            .remote_heads(&url)
            .map(Reply::Heads)
            .map_err(|e| e.to_string()),
        Job::Fetch {
            repo,
            clone_url,
            git_ref,
            commit,
            changes_since,
        } => {
            let repo = RepoName::parse(&repo)?;
            let req = Checkout {
                repo: &repo,
                clone_url: &clone_url,
                git_ref: &git_ref,
                commit: &commit,
            };
            // The daemon runs one fetch per mirror at a time, and checkouts leave no
            // lock files: whatever this finds was left by a killed job.
            let mirror = checkout::mirror_path(&request.state_dir, &repo, &clone_url)
                .map_err(|e| e.to_string())?;
            checkout::clear_stale_locks(&mirror)
                .map_err(|e| format!("clearing stale locks in {}: {e}", mirror.display()))?;
            mirrors
                .fetch(&req)
                .map_err(|e| format!("checkout failed: {e}"))?;
            let changes = match changes_since {
                Some(before) => Some(mirrors.changes(&req, &before).map_err(|e| e.to_string())?),
                None => None,
            };
            Ok(Reply::Fetched { changes })
        }
        Job::Checkout {
            repo,
            clone_url,
            commit,
            dest,
        } => {
            let repo = RepoName::parse(&repo)?;
            let req = Checkout {
                repo: &repo,
                clone_url: &clone_url,
                git_ref: "",
                commit: &commit,
            };
            mirrors
                .checkout(&req, &dest)
                .map_err(|e| format!("checkout failed: {e}"))?;
            Ok(Reply::CheckedOut)
        }
        Job::Update {
            repo,
            clone_url,
            commit,
            dest,
            keep,
        } => {
            let repo = RepoName::parse(&repo)?;
            let keep = PatternList::parse(&keep).map_err(|e| e.to_string())?;
            // A reused workspace's work tree is the `run_as` user's; `Mirrors::update`
            // checks that its `.git` is hookci's own instead.
            // SAFETY: this process runs this one job, on this thread alone, so no other
            // thread reads libgit2's options meanwhile.
            unsafe { git2::opts::set_verify_owner_validation(false) }.map_err(|e| e.to_string())?;
            let req = Checkout {
                repo: &repo,
                clone_url: &clone_url,
                git_ref: "",
                commit: &commit,
            };
            mirrors
                .update(&req, &dest, &|path| keep.is_match(path))
                .map(Reply::Updated)
                .map_err(|e| format!("updating the workspace failed: {e}"))
        }
    }
}

/// `CAP_DAC_OVERRIDE` (linux/capability.h).
const CAP_DAC_OVERRIDE: libc::c_ulong = 1;

/// Whether the daemon holds `CAP_DAC_OVERRIDE` as an ambient capability (the unit
/// grants it for `run_as`), which a job then keeps across its exec.
fn ambient_dac_override() -> bool {
    // SAFETY: prctl with plain integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
            CAP_DAC_OVERRIDE,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) == 1
    }
}

/// In the job's child, before exec: of the daemon's ambient capabilities only
/// `CAP_DAC_OVERRIDE` stays (`keep`), which an update of a reused workspace the steps'
/// user owns needs. libgit2 reads what pushes bring, so the job must not hold what
/// would let it become another user, give files away or signal other processes.
fn keep_only_dac_override(keep: bool) -> std::io::Result<()> {
    let ambient = |op: libc::c_int, cap: libc::c_ulong| {
        // SAFETY: prctl with plain integer arguments; async-signal-safe.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                op as libc::c_ulong,
                cap,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    ambient(libc::PR_CAP_AMBIENT_CLEAR_ALL, 0)?;
    if keep {
        ambient(libc::PR_CAP_AMBIENT_RAISE, CAP_DAC_OVERRIDE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_jobs_that_may_reach_an_https_remote_load_the_ca_bundle() {
        let fetch = |url: &str| Job::Fetch {
            repo: "o/r".into(),
            clone_url: url.into(),
            git_ref: "refs/heads/main".into(),
            commit: "c".repeat(40),
            changes_since: None,
        };
        for (job, tls) in [
            (fetch("https://github.com/o/r.git"), true),
            (fetch("HTTPS://github.com/o/r.git"), true),
            (fetch("http://git.example/r.git"), true),
            (fetch("/srv/git/r.git"), false),
            (fetch("file:///srv/git/r.git"), false),
            (fetch("git://127.0.0.1/r.git"), false),
            (
                Job::RemoteHeads {
                    url: "https://github.com/o/r.git".into(),
                },
                true,
            ),
            (
                Job::Checkout {
                    repo: "o/r".into(),
                    clone_url: "https://github.com/o/r.git".into(),
                    commit: "c".repeat(40),
                    dest: "/w".into(),
                },
                false,
            ),
        ] {
            assert_eq!(
                job.may_use_tls(),
                tls,
                "{}",
                serde_json::to_string(&job).unwrap()
            );
        }
    }
}
