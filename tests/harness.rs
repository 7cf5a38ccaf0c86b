//! The test harness: starts the real `hookci` binary on 127.0.0.1:0 with a temp state
//! directory and pipelines, talks to it over loopback HTTP, and builds real git
//! repositories to push from.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookci::cli::client::{self, Response};
pub use hookci::store::postgres::{Relay, Scratch, ScratchRole};
use serde_json::{json, Value};

/// A fresh PostgreSQL database on the test server (`scripts/test` starts one), dropped
/// with the value.
pub fn test_database() -> Scratch {
    Scratch::from_env().unwrap_or_else(|e| panic!("{e}"))
}

pub const SECRET: &str = "test-secret-5a1f3c9e-do-not-log";
pub const ZERO: &str = "0000000000000000000000000000000000000000";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hookci")
}

pub fn fixture(path: &str) -> Vec<u8> {
    let full = format!(
        "{}/tests/fixtures/github/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// A daemon to start: pipelines, extra config lines, secret, environment.
pub struct Builder {
    dir: tempfile::TempDir,
    secret: Option<String>,
    config: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    user: Option<(u32, u32)>,
    /// Ambient capabilities the daemon is started with (as `user`, through `setpriv`):
    /// names as setpriv takes them, comma-separated.
    caps: Option<String>,
}

impl Builder {
    pub fn new() -> Builder {
        let dir = tempfile::Builder::new()
            .prefix("hookci-test")
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        Builder {
            dir,
            secret: Some(SECRET.to_owned()),
            config: String::new(),
            env: Vec::new(),
            args: Vec::new(),
            user: None,
            caps: None,
        }
    }

    /// Runs the daemon itself as `uid:gid` (the test directory is given to it).
    pub fn daemon_as(mut self, (uid, gid): (u32, u32)) -> Builder {
        self.user = Some((uid, gid));
        self
    }

    /// Runs the daemon as `user` holding the ambient capabilities `caps` (such as
    /// `dac_override`, or `setuid,kill`), as a service unit's `AmbientCapabilities=`
    /// makes it.
    pub fn daemon_with_caps(mut self, user: (u32, u32), caps: &str) -> Builder {
        self.user = Some(user);
        self.caps = Some(caps.to_owned());
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pipeline(self, name: &str, yaml: &str) -> Builder {
        std::fs::write(
            self.dir
                .path()
                .join("pipelines")
                .join(format!("{name}.yml")),
            yaml,
        )
        .unwrap();
        self
    }

    pub fn config(mut self, lines: &str) -> Builder {
        self.config.push_str(lines);
        self.config.push('\n');
        self
    }

    pub fn unsigned(mut self) -> Builder {
        self.secret = None;
        self.args.push("--allow-unsigned".into());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Builder {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Keeps the store in the PostgreSQL database `db` instead of SQLite (its password,
    /// if the test server's URL has one, through `database_password_file`).
    pub fn database(self, db: &Scratch) -> Builder {
        self.database_at(&db.url(), db.password().as_deref())
    }

    /// [`Builder::database`], connecting as `role` (made on the test server by
    /// [`Scratch::role`]).
    pub fn database_as(self, role: &ScratchRole) -> Builder {
        self.database_at(&role.url(), Some(role.password()))
    }

    /// [`Builder::database`], reached through `relay` (made by [`Relay::to`]).
    pub fn database_through(self, relay: &Relay) -> Builder {
        self.database_at(&relay.url(), relay.password())
    }

    fn database_at(self, url: &str, password: Option<&str>) -> Builder {
        let mut b = self.config(&format!("database: {url}"));
        if let Some(password) = password {
            let file = b.dir.path().join("database-password");
            std::fs::write(&file, password).unwrap();
            b = b.config(&format!("database_password_file: {}", file.display()));
        }
        b
    }

    /// Writes `hookci.yml` (with the test defaults the test did not set itself), for a
    /// test that starts `hookci serve` its own way; returns its path.
    pub fn write_config(&self) -> PathBuf {
        let root = self.dir.path();
        let mut config = format!(
            "listen: 127.0.0.1:0\npipelines: {}\n{}",
            root.join("pipelines").display(),
            self.config
        );
        // Short grace periods keep tests fast.
        let state = format!("state_dir: {}", root.join("state").display());
        for default in [
            "step_grace: 1s",
            "shutdown_grace: 5s",
            "reconcile_interval: 0",
            state.as_str(),
        ] {
            let key = default.split(':').next().unwrap();
            if !self.config.lines().any(|l| l.starts_with(key)) {
                config.push_str(&format!("{default}\n"));
            }
        }
        if let Some(secret) = &self.secret {
            std::fs::write(root.join("secret"), format!("{secret}\n")).unwrap();
            config.push_str(&format!(
                "webhook_secret_file: {}\n",
                root.join("secret").display()
            ));
        }
        std::fs::write(root.join("hookci.yml"), &config).unwrap();
        root.join("hookci.yml")
    }

    pub fn start(self) -> Daemon {
        self.write_config();
        let mut daemon = Daemon {
            dir: self.dir,
            secret: self.secret,
            env: self.env,
            args: self.args,
            user: self.user,
            caps: self.caps,
            child: None,
            addr: String::new(),
            log: Arc::new(Mutex::new(String::new())),
        };
        daemon.spawn();
        daemon
    }

    /// Runs `hookci serve` expecting it to refuse to start: its exit code and stderr.
    pub fn serve_expecting_failure(&self) -> (Option<i32>, String) {
        self.write_config();
        let mut cmd = Command::new(bin());
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            chown_tree(self.dir.path(), uid, gid);
            cmd.uid(uid).gid(gid).env("HOME", self.dir.path());
        }
        let out = cmd
            .arg("serve")
            .arg("-c")
            .arg(self.dir.path().join("hookci.yml"))
            .args(&self.args)
            .env_remove("HOOKCI_WEBHOOK_SECRET")
            .env_remove("HOOKCI_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

pub struct Daemon {
    dir: tempfile::TempDir,
    secret: Option<String>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    user: Option<(u32, u32)>,
    /// Ambient capabilities the daemon is started with (as `user`, through `setpriv`):
    /// names as setpriv takes them, comma-separated.
    caps: Option<String>,
    child: Option<Child>,
    pub addr: String,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The directory of the one slot `pipeline` reuses workspaces in
    /// (`workspaces/reuse/PIPELINE/SLOT`), once a run made it.
    pub fn reuse_slot(&self, pipeline: &str) -> PathBuf {
        self.state_dir()
            .join("workspaces/reuse")
            .join(pipeline)
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    }

    /// Starts (or restarts) the process and waits for its `listening` line.
    pub fn spawn(&mut self) {
        let mut cmd = match (self.user, &self.caps) {
            (Some((uid, gid)), Some(caps)) => {
                let caps: Vec<String> = caps.split(',').map(|c| format!("+{c}")).collect();
                let caps = caps.join(",");
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(format!("--inh-caps={caps}"))
                    .arg(format!("--ambient-caps={caps}"))
                    .arg("--")
                    .arg(bin());
                c
            }
            _ => Command::new(bin()),
        };
        cmd.arg("serve")
            .arg("-c")
            .arg(self.dir.path().join("hookci.yml"))
            .args(&self.args)
            .env_remove("HOOKCI_WEBHOOK_SECRET")
            .env_remove("HOOKCI_CONFIG")
            .env("HOOKCI_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            chown_tree(self.dir.path(), uid, gid);
            // Root's home is closed to that user (libgit2 looks at it).
            cmd.env("HOME", self.dir.path());
            if self.caps.is_none() {
                cmd.uid(uid).gid(gid);
            }
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            // By bytes: a line that is not UTF-8 (a step's output quoted in a log line)
            // must not end the reading, or later lines, `listening` among them, are lost.
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line);
                if line.contains(" listening") {
                    if let Some(addr) = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|s| s.split_whitespace().next())
                    {
                        let _ = tx.send(addr.to_owned());
                    }
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        self.child = Some(child);
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => self.addr = addr,
            Err(_) => panic!("daemon did not start; its log:\n{}", self.log()),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&mut self, sig: i32) {
        // SAFETY: signalling our own child process by pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs `body` to /webhook as GitHub would, signed with the daemon's secret.
    pub fn deliver(&self, event: &str, delivery: &str, body: &[u8]) -> Response {
        let sig = self
            .secret
            .as_ref()
            .map(|s| hookci::intake::sign(s.as_bytes(), body));
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("X-GitHub-Event", event),
            ("X-GitHub-Delivery", delivery),
            ("User-Agent", "GitHub-Hookshot/test"),
        ];
        if let Some(sig) = &sig {
            headers.push(("X-Hub-Signature-256", sig));
        }
        self.post("/webhook", &headers, body)
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        client::request("POST", &self.url(path), headers, body).unwrap()
    }

    pub fn get(&self, path: &str) -> Response {
        client::request("GET", &self.url(path), &[], b"").unwrap()
    }

    pub fn get_json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }

    /// Polls a run until it reaches a final state, and returns it.
    pub fn wait_run(&self, id: i64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let run = self.get_json(&format!("/api/runs/{id}"));
            let status = run["status"].as_str().unwrap().to_owned();
            if status != "queued" && status != "running" {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} stuck {status}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn run_log(&self, id: i64) -> String {
        self.get(&format!("/api/runs/{id}/log")).text()
    }

    pub fn runs(&self) -> Vec<Value> {
        self.get_json("/api/runs?limit=500")["runs"]
            .as_array()
            .unwrap()
            .clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A bare repository to push from, built with git2.
pub struct Origin {
    pub path: PathBuf,
    repo: git2::Repository,
}

impl Origin {
    pub fn new(dir: &Path) -> Origin {
        let path = dir.join("origin.git");
        let repo = git2::Repository::init_bare(&path).unwrap();
        Origin { path, repo }
    }

    pub fn url(&self) -> String {
        self.path.display().to_string()
    }

    /// Commits `files` on top of `branch` (or of `base` for a new branch) and moves the branch.
    pub fn commit_on(
        &self,
        branch: &str,
        base: Option<&str>,
        files: &[(&str, &str)],
        message: &str,
    ) -> String {
        let sig = git2::Signature::now("hookci test", "test@hookci.invalid").unwrap();
        let refname = format!("refs/heads/{branch}");
        let parent = match base {
            Some(sha) => Some(
                self.repo
                    .find_commit(git2::Oid::from_str(sha).unwrap())
                    .unwrap(),
            ),
            None => self
                .repo
                .find_reference(&refname)
                .ok()
                .and_then(|r| r.peel_to_commit().ok()),
        };
        let base_tree = match &parent {
            Some(p) => p.tree().unwrap(),
            None => {
                let empty = self.repo.treebuilder(None).unwrap().write().unwrap();
                self.repo.find_tree(empty).unwrap()
            }
        };
        // Paths may be nested (`src/lib.c`): the trees between are made as needed.
        let mut update = git2::build::TreeUpdateBuilder::new();
        for (path, content) in files {
            let blob = self.repo.blob(content.as_bytes()).unwrap();
            update.upsert(path, blob, git2::FileMode::Blob);
        }
        let tree = update.create_updated(&self.repo, &base_tree).unwrap();
        let tree = self.repo.find_tree(tree).unwrap();
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        let oid = self
            .repo
            .commit(None, &sig, &sig, message, &tree, &parents)
            .unwrap();
        self.repo.reference(&refname, oid, true, "test").unwrap();
        oid.to_string()
    }

    pub fn commit(&self, branch: &str, files: &[(&str, &str)], message: &str) -> String {
        self.commit_on(branch, None, files, message)
    }

    /// Commits the removal of `paths` on top of `branch` and moves the branch.
    pub fn commit_removing(&self, branch: &str, paths: &[&str], message: &str) -> String {
        let sig = git2::Signature::now("hookci test", "test@hookci.invalid").unwrap();
        let refname = format!("refs/heads/{branch}");
        let parent = self
            .repo
            .find_reference(&refname)
            .unwrap()
            .peel_to_commit()
            .unwrap();
        let mut tb = self
            .repo
            .treebuilder(Some(&parent.tree().unwrap()))
            .unwrap();
        for path in paths {
            tb.remove(path).unwrap();
        }
        let tree = self.repo.find_tree(tb.write().unwrap()).unwrap();
        let oid = self
            .repo
            .commit(Some(&refname), &sig, &sig, message, &tree, &[&parent])
            .unwrap();
        oid.to_string()
    }

    /// An annotated tag on `commit`; returns the tag object's id.
    pub fn annotated_tag(&self, name: &str, commit: &str) -> String {
        let sig = git2::Signature::now("hookci test", "test@hookci.invalid").unwrap();
        let target = self
            .repo
            .find_object(git2::Oid::from_str(commit).unwrap(), None)
            .unwrap();
        self.repo
            .tag(name, &target, &sig, "release", false)
            .unwrap()
            .to_string()
    }
}

/// A push payload as GitHub sends it (compact JSON).
pub struct PushPayload {
    pub repo: String,
    pub git_ref: String,
    pub before: String,
    pub after: String,
    pub head: Option<String>,
    pub message: String,
    pub clone_url: String,
    pub created: bool,
    pub deleted: bool,
    pub forced: bool,
}

impl PushPayload {
    pub fn new(
        repo: &str,
        git_ref: &str,
        before: &str,
        after: &str,
        clone_url: &str,
    ) -> PushPayload {
        PushPayload {
            repo: repo.into(),
            git_ref: git_ref.into(),
            before: before.into(),
            after: after.into(),
            head: Some(after.into()),
            message: "change".into(),
            clone_url: clone_url.into(),
            created: before == ZERO,
            deleted: after == ZERO,
            forced: false,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let head = self.head.as_ref().map(
            |id| json!({ "id": id, "message": self.message, "timestamp": "2026-11-28T12:00:00Z" }),
        );
        serde_json::to_vec(&json!({
            "ref": self.git_ref,
            "before": self.before,
            "after": self.after,
            "created": self.created,
            "deleted": self.deleted,
            "forced": self.forced,
            "base_ref": null,
            "compare": "https://example.invalid/compare",
            "commits": [],
            "head_commit": head,
            "repository": {
                "id": 1,
                "name": self.repo.split('/').nth(1),
                "full_name": self.repo,
                "clone_url": self.clone_url,
                "default_branch": "main",
            },
            "pusher": { "name": "tester", "email": "tester@example.invalid" },
        }))
        .unwrap()
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    if std::fs::symlink_metadata(path).unwrap().is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid, gid);
        }
    }
}

/// A service manager's notify socket (`NOTIFY_SOCKET`): the test's own datagram socket.
pub struct NotifySocket {
    pub path: PathBuf,
    socket: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        NotifySocket { path, socket }
    }

    pub fn env(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// The next datagram, as text.
    pub fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// The next datagram that is not a `STATUS=` or `WATCHDOG=1` line (those come at
    /// any time).
    pub fn recv_state(&self) -> String {
        loop {
            let m = self.recv();
            if !m.starts_with("STATUS=") && m != "WATCHDOG=1" {
                return m;
            }
        }
    }

    /// Datagrams until one satisfies `wanted`, which is returned.
    pub fn until(&self, what: &str, mut wanted: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no notification: {what}");
            let m = self.recv();
            if wanted(&m) {
                return m;
            }
        }
    }
}

/// The unprivileged user tests run steps (or a daemon) as.
pub const TEST_USER: &str = "hookci-test-build";

/// Creates [`TEST_USER`] if it is missing (once per test binary) and returns its uid
/// and gid. Needs root, as CI has: a test that needs this fails, never skips, elsewhere.
pub fn test_user() -> (u32, u32) {
    static USER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "this test needs root (CI runs as root): it creates the user {TEST_USER} and \
             switches to it; run the suite as root"
        );
        let id = |flag: &str| {
            Command::new("id")
                .args([flag, TEST_USER])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<u32>().ok())
        };
        if id("-u").is_none() {
            let status = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(TEST_USER)
                .status()
                .expect("useradd (package passwd) is needed to create the test user");
            // 9: it exists already (another test binary made it meanwhile).
            assert!(
                status.success() || status.code() == Some(9),
                "useradd {TEST_USER}: {status}"
            );
        }
        (
            id("-u").expect("the test user's uid"),
            id("-g").expect("the test user's gid"),
        )
    })
}

/// Sets the permission bits of `path`.
pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The daemon's children that are zombies: nobody reaped them.
pub fn zombie_children(daemon: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let mut rest = stat
            .rsplit_once(')')
            .map(|r| r.1)
            .unwrap_or("")
            .split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse::<i32>().ok()));
        if state == Some("Z") && ppid == Some(daemon) {
            out.push(pid);
        }
    }
    out
}

/// Whether a process is gone (a zombie waiting for its reaper counts as gone).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Polls `cond` for up to 20 s.
pub fn eventually(what: &str, cond: impl FnMut() -> bool) {
    eventually_within(Duration::from_secs(20), what, cond);
}

/// Polls `cond` for up to `limit`.
pub fn eventually_within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request a [`FakeHttp`] received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// An answer a [`FakeHttp`] gives: status, extra headers, body.
pub type Answer = (u16, Vec<(String, String)>, String);

/// A small HTTP/1.1 receiver on loopback standing in for GitHub's API, Slack, Discord
/// or a webhook: it records every request and answers with the scripted answers in
/// order, then `201 {}`. One connection per request (it answers `Connection: close`).
pub struct FakeHttp {
    pub addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    answers: Arc<Mutex<std::collections::VecDeque<Answer>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeHttp {
    pub fn start() -> FakeHttp {
        FakeHttp::on(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// On a port given before (a receiver that was down and is back).
    pub fn at(addr: std::net::SocketAddr) -> FakeHttp {
        FakeHttp::on(std::net::TcpListener::bind(addr).unwrap())
    }

    fn on(listener: std::net::TcpListener) -> FakeHttp {
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, a, s) = (
            Arc::clone(&received),
            Arc::clone(&answers),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (r, a) = (Arc::clone(&r), Arc::clone(&a));
                std::thread::spawn(move || serve_one(conn, &r, &a));
            }
        });
        FakeHttp {
            addr,
            received,
            answers,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next requests get these answers, in order.
    pub fn answer(&self, answers: Vec<Answer>) {
        self.answers.lock().unwrap().extend(answers);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `n` requests have come, and returns them all.
    pub fn wait_for(&self, n: usize) -> Vec<Received> {
        eventually_within(Duration::from_secs(30), &format!("{n} request(s)"), || {
            self.received.lock().unwrap().len() >= n
        });
        self.received()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop, which then sees the stop.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

fn serve_one(
    conn: std::net::TcpStream,
    received: &Mutex<Vec<Received>>,
    answers: &Mutex<std::collections::VecDeque<Answer>>,
) {
    use std::io::{Read, Write};
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let (status, extra, text) =
        answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or((201, Vec::new(), "{}".into()));
    received.lock().unwrap().push(Received {
        method,
        path,
        headers,
        body,
    });
    let mut response = format!(
        "HTTP/1.1 {status} Fake\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        text.len()
    );
    for (k, v) in extra {
        response.push_str(&format!("{k}: {v}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(&text);
    let _ = reader.get_mut().write_all(response.as_bytes());
}
