//! The test harness: starts the real `hookci` binary on 127.0.0.1:0 with a temp state
//! directory and pipelines, talks to it over loopback HTTP, and builds real git
//! repositories to push from.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookci::cli::client::{self, Response};
use serde_json::{json, Value};

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
        }
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

    /// Writes `hookci.yml` (with the test defaults the test did not set itself).
    fn write_config(&self) {
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
        std::fs::write(root.join("hookci.yml"), config).unwrap();
    }

    pub fn start(self) -> Daemon {
        self.write_config();
        let mut daemon = Daemon {
            dir: self.dir,
            secret: self.secret,
            env: self.env,
            args: self.args,
            child: None,
            addr: String::new(),
            log: Arc::new(Mutex::new(String::new())),
        };
        daemon.spawn();
        daemon
    }

    /// Runs `hookci serve` expecting it to refuse to start: its exit code and stderr.
    pub fn serve_expecting_failure(self) -> (Option<i32>, String) {
        self.write_config();
        let out = Command::new(bin())
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

    /// Starts (or restarts) the process and waits for its `listening` line.
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(bin());
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
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
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
        let base_tree = parent.as_ref().map(|p| p.tree().unwrap());
        let mut tb = self.repo.treebuilder(base_tree.as_ref()).unwrap();
        for (name, content) in files {
            let blob = self.repo.blob(content.as_bytes()).unwrap();
            tb.insert(name, blob, 0o100644).unwrap();
        }
        let tree = self.repo.find_tree(tb.write().unwrap()).unwrap();
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
