//! Run control against the real daemon: concurrency groups and their cancel policies,
//! the write API (cancel, rerun, trigger) and its token, secrets and their masking,
//! path filters and skip tokens, live logs (SSE and `hookci logs -f`), a step's output
//! in bulk, the metrics kept from the same run events, retention, the API client
//! commands, what stops and signals do to runs and open streams, reloads, and what
//! keeps a run in its bounds: its user, its processes, its log, the disk, the HTTP door.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookci::cli::client::Response;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";
const TOKEN: &str = "api-token-3c1d9e7f-keep-out-of-logs";

/// A pipeline file: `extra` (top-level YAML lines, e.g. `on:` or `concurrency:`) and
/// `steps` (from [`step`]).
fn pipeline(origin: &Origin, extra: &str, steps: &[String]) -> String {
    format!(
        "repo: {REPO}\nclone_url: {}\n{extra}steps:\n{}",
        origin.url(),
        steps.concat()
    )
}

/// One step whose script is a YAML block scalar, so no shell text needs YAML quoting.
fn step(name: &str, script: &str) -> String {
    let body: String = script.lines().map(|l| format!("      {l}\n")).collect();
    format!("  - name: {name}\n    run: |\n{body}")
}

/// A step that leaves a background `sleep 600` (its pid in `PID_DIR/RUN.pid`) and waits
/// for it when the commit's `mode` file says `hang`; otherwise it just succeeds.
fn hang_step(pid_dir: &Path) -> String {
    step(
        "work",
        &format!(
            "if [ \"$(cat mode)\" = hang ]; then\n  sleep 600 &\n  echo $! > {}/$HOOKCI_RUN_ID.pid\n  wait\nfi\necho done with $HOOKCI_COMMIT",
            pid_dir.display()
        ),
    )
}

/// A directory of its own where [`hang_step`] records its background sleeps (the
/// daemon's is gone with it first); dropping it kills those still alive, so a failing
/// test leaves no `sleep 600` behind.
struct Sleeps(tempfile::TempDir);

const SLEEP_CMDLINE: &[u8] = b"sleep\x00600\x00";

impl Sleeps {
    fn new() -> Sleeps {
        Sleeps(
            tempfile::Builder::new()
                .prefix("hookci-test-pids")
                .tempdir()
                .unwrap(),
        )
    }

    fn dir(&self) -> PathBuf {
        self.0.path().to_path_buf()
    }
}

impl Drop for Sleeps {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.0.path()) else {
            return;
        };
        for entry in entries.flatten() {
            let pid: Option<i32> = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|s| s.trim().parse().ok());
            // Only our own sleep: a pid that ended may have been reused since.
            let ours = pid.is_some_and(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == SLEEP_CMDLINE)
            });
            if let (Some(pid), true) = (pid, ours) {
                // SAFETY: signalling a test step's own background sleep by pid.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// A step that prints `first`, waits for `gate` to exist, then prints `second`.
fn gated_step(gate: &Path) -> String {
    step(
        "gated",
        &format!(
            "echo first\nwhile [ ! -f {} ]; do sleep 0.05; done\necho second",
            gate.display()
        ),
    )
}

fn push_body(git_ref: &str, before: &str, after: &str, message: &str) -> Vec<u8> {
    let mut p = PushPayload::new(
        REPO,
        git_ref,
        before,
        after,
        "https://example.invalid/x.git",
    );
    p.message = message.into();
    p.bytes()
}

/// Delivers a push and returns the runs it answered with (pipeline, id).
fn push_runs(d: &Daemon, delivery: &str, body: &[u8]) -> Vec<(String, i64)> {
    let r = d.deliver("push", delivery, body);
    assert_eq!(r.status, 202, "{delivery}: {}", r.text());
    r.json()["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["pipeline"].as_str().unwrap().to_owned(),
                x["id"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Delivers a push of `after` to `git_ref` and returns its one run.
fn push(d: &Daemon, delivery: &str, git_ref: &str, before: &str, after: &str) -> i64 {
    let runs = push_runs(d, delivery, &push_body(git_ref, before, after, "change"));
    assert_eq!(runs.len(), 1, "{delivery}: {runs:?}");
    runs[0].1
}

fn run_of(d: &Daemon, id: i64) -> Value {
    d.get_json(&format!("/api/runs/{id}"))
}

fn wait_status(d: &Daemon, id: i64, status: &str) {
    eventually(&format!("run {id} is {status}"), || {
        run_of(d, id)["status"] == status
    });
}

fn reason(run: &Value) -> String {
    run["reason"].as_str().unwrap_or_default().to_owned()
}

/// No step of `run` ever started (or none was even planned).
fn assert_never_started(run: &Value) {
    assert!(run["started_at"].is_null(), "{run:#}");
    for s in run["steps"].as_array().unwrap() {
        assert!(
            s["started_at"].is_null() && s["status"] != "succeeded",
            "{run:#}"
        );
    }
}

/// Waits until `path` holds a pid, and returns it.
fn read_pid(path: &Path) -> i32 {
    let mut pid = None;
    eventually(&format!("{} holds a pid", path.display()), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        pid.is_some()
    });
    pid.unwrap()
}

/// POSTs to the write API, with `Authorization: Bearer TOKEN` when given.
fn api_post(d: &Daemon, path: &str, token: Option<&str>, body: &Value) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    d.post(path, &headers, body.to_string().as_bytes())
}

fn assert_json_error(r: &Response, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert!(
        r.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: a JSON error body: {}",
        r.text()
    );
}

/// Writes the API token to a file and returns the config line naming it.
fn token_config(b: &Builder) -> String {
    let path = b.path().join("api-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    format!("api_token_file: {}", path.display())
}

/// The `hookci` command as a client: no config file, the API token only if given.
fn cli(args: &[&str], token: Option<&str>) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("HOOKCI_CONFIG")
        .env_remove("HOOKCI_API_TOKEN")
        .stdin(Stdio::null());
    if let Some(t) = token {
        cmd.env("HOOKCI_API_TOKEN", t);
    }
    cmd
}

fn run_cli(args: &[&str], token: Option<&str>) -> Output {
    cli(args, token).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Output read in the background, as it arrives, until end of stream.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<(Vec<u8>, bool)>>);

impl Captured {
    fn append(&self, bytes: &[u8]) {
        self.0.lock().unwrap().0.extend_from_slice(bytes);
    }

    fn end(&self) {
        self.0.lock().unwrap().1 = true;
    }

    fn text(&self) -> String {
        text(&self.0.lock().unwrap().0)
    }

    fn ended(&self) -> bool {
        self.0.lock().unwrap().1
    }

    /// Copies `source` into a new capture on a thread.
    fn spawn(source: impl Read + Send + 'static) -> Captured {
        let captured = Captured::default();
        let c = captured.clone();
        std::thread::spawn(move || {
            c.copy(source);
            c.end();
        });
        captured
    }

    /// Appends everything `source` yields until its end (or an error).
    fn copy(&self, mut source: impl Read) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = source.read(&mut buf) {
            if n == 0 {
                break;
            }
            self.append(&buf[..n]);
        }
    }
}

/// A GET over a raw connection whose (de-chunked) body is captured as it arrives.
/// Returns the status line and headers, and the body.
fn stream_get(addr: &str, path: &str) -> (String, Captured) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(90)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        head.push_str(&line);
    }
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = Captured::default();
    let c = body.clone();
    std::thread::spawn(move || {
        if chunked {
            loop {
                let mut size = String::new();
                if reader.read_line(&mut size).unwrap_or(0) == 0 {
                    break;
                }
                let Ok(n) = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16)
                else {
                    break;
                };
                if n == 0 {
                    break;
                }
                let mut chunk = vec![0; n + 2];
                if reader.read_exact(&mut chunk).is_err() {
                    break;
                }
                c.append(&chunk[..n]);
            }
        } else {
            c.copy(reader);
        }
        c.end();
    });
    (head, body)
}

/// Server-sent events as (event, data), parsed as the SSE spec says (a field's value
/// loses one leading space; several `data` lines join with newlines).
fn sse_events(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for block in body.replace("\r\n", "\n").split("\n\n") {
        let (mut event, mut data) = (String::new(), Vec::new());
        for line in block.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = value.to_owned(),
                "data" => data.push(value.to_owned()),
                _ => {}
            }
        }
        if !event.is_empty() || !data.is_empty() {
            out.push((event, data.join("\n")));
        }
    }
    out
}

/// The index of the first event named `name` whose data satisfies `pred`.
fn find_event(
    events: &[(String, String)],
    name: &str,
    pred: impl Fn(&Value) -> bool,
) -> Option<usize> {
    events.iter().position(|(e, data)| {
        e == name && serde_json::from_str::<Value>(data).is_ok_and(|v| pred(&v))
    })
}

fn log_text_contains(v: &Value, needle: &str) -> bool {
    v["text"].as_str().is_some_and(|t| t.contains(needle))
}

/// Waits for a child process to exit (generous deadline) and returns its exit code.
fn wait_child(child: &mut Child, what: &str) -> Option<i32> {
    wait_child_within(Duration::from_secs(60), child, what)
}

/// [`wait_child`] for up to `limit`.
fn wait_child_within(limit: Duration, child: &mut Child, what: &str) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every step log file of a run, concatenated.
fn log_files(d: &Daemon, id: i64) -> String {
    let dir = d.state_dir().join(format!("logs/{id}"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// Commits `files` (nested paths allowed) on top of `base` (else the branch's tip) in
/// the bare repository at `path`, and moves `branch` there.
fn commit_paths(
    path: &Path,
    branch: &str,
    base: Option<&str>,
    files: &[(&str, &str)],
    message: &str,
) -> String {
    let repo = git2::Repository::open_bare(path).unwrap();
    let refname = format!("refs/heads/{branch}");
    let parent = match base {
        Some(sha) => Some(repo.find_commit(git2::Oid::from_str(sha).unwrap()).unwrap()),
        None => repo
            .find_reference(&refname)
            .ok()
            .and_then(|r| r.peel_to_commit().ok()),
    };
    let baseline = match &parent {
        Some(p) => p.tree().unwrap(),
        None => {
            let empty = repo.treebuilder(None).unwrap().write().unwrap();
            repo.find_tree(empty).unwrap()
        }
    };
    let mut update = git2::build::TreeUpdateBuilder::new();
    for (name, content) in files {
        let blob = repo.blob(content.as_bytes()).unwrap();
        update.upsert(*name, blob, git2::FileMode::Blob);
    }
    let tree = repo
        .find_tree(update.create_updated(&repo, &baseline).unwrap())
        .unwrap();
    let sig = git2::Signature::now("hookci test", "test@hookci.invalid").unwrap();
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let oid = repo
        .commit(None, &sig, &sig, message, &tree, &parents)
        .unwrap();
    repo.reference(&refname, oid, true, "test").unwrap();
    oid.to_string()
}

/// `log` with the long runs of `x` padding shortened, for failure messages.
fn readable(log: &str) -> String {
    let mut out = String::new();
    let mut run = 0;
    for c in log.chars() {
        run = if c == 'x' { run + 1 } else { 0 };
        if run <= 8 {
            out.push(c);
        } else if run == 9 {
            out.push_str("...");
        }
    }
    out
}

fn sha256_hex(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

mod browser;
mod cleanup_steps;
mod clone_token;
mod concurrency;
mod dashboard;
mod exact_cancel;
mod flood;
mod git_jobs;
mod leftovers;
mod limits;
mod live_logs;
mod metrics;
mod reload;
mod reports;
mod retention;
mod run_as;
mod run_end;
mod secrets;
mod signals;
mod step_output;
mod triggers;
mod write_api;

/// Asserts that the permitted, effective and ambient capability sets in `status` (a
/// `/proc/PID/status` text or a step's log of those lines) are each `expected` (hex).
fn assert_capabilities(status: &str, expected: &str, what: &str) {
    for set in ["CapPrm", "CapEff", "CapAmb"] {
        let line = status
            .lines()
            .find(|l| l.starts_with(set))
            .unwrap_or_else(|| panic!("no {set} in {status}"));
        assert!(line.ends_with(expected), "{what}: {line}\n{status}");
    }
}
