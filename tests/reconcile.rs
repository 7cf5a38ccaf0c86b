//! Pushes made while hookci was down (or whose delivery never came) are found by
//! listing the remote's heads, and built once; refs created meanwhile are built too,
//! and a push that lands while the remote is being listed wins over that listing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

fn runs_for(d: &Daemon, commit: &str) -> Vec<Value> {
    d.runs()
        .into_iter()
        .filter(|r| r["commit"] == commit)
        .collect()
}

fn runs_of_ref(d: &Daemon, git_ref: &str) -> Vec<Value> {
    d.runs()
        .into_iter()
        .filter(|r| r["ref"] == git_ref)
        .collect()
}

/// Where the store says `git_ref` of [`REPO`] points, when reconcile recorded it.
fn reconciled_head(d: &Daemon, git_ref: &str) -> Option<String> {
    let db = rusqlite::Connection::open(d.state_dir().join("hookci.db")).ok()?;
    db.query_row(
        "SELECT commit_sha FROM ref_heads WHERE repo = ?1 AND ref = ?2 AND source = 'reconcile'",
        [REPO, git_ref],
        |r| r.get(0),
    )
    .ok()
}

/// Waits until the first reconcile pass has recorded `git_ref` at `commit`.
fn wait_first_pass(d: &Daemon, git_ref: &str, commit: &str) {
    eventually("the first reconcile recorded the existing refs", || {
        reconciled_head(d, git_ref).as_deref() == Some(commit)
    });
}

#[test]
fn pushes_and_refs_made_while_down_are_built_once() {
    let b = Builder::new().config("reconcile_interval: 1s");
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a", "1")], "one");
    let old_feature = origin.commit("feature/old", &[("a", "o")], "old feature");
    let pipeline = format!(
        "repo: {REPO}\nclone_url: {}\non:\n  branches: [main, \"feature/*\"]\n  tags: [\"v*\"]\nsteps:\n  - run: cat a\n",
        origin.url()
    );
    let mut d = b.pipeline("ci", &pipeline).start();
    // The first reconcile only records what exists.
    wait_first_pass(&d, "refs/heads/feature/old", &old_feature);
    assert!(
        d.runs().is_empty(),
        "existing refs are not built on first sight"
    );

    // A push hookci hears about.
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &c1, "x").bytes();
    let r = d.deliver("push", "seen", &body);
    assert_eq!(r.status, 202);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0));

    // While down: main moves, a new branch and a new annotated tag appear.
    let c2 = origin.commit("main", &[("a", "2")], "two");
    let feature = origin.commit("feature/x", &[("a", "f")], "feature");
    let tagged = origin.annotated_tag("v2", &c2);
    d.spawn();
    eventually("the missed push to main is built", || {
        runs_for(&d, &c2)
            .iter()
            .any(|r| r["ref"] == "refs/heads/main")
    });
    let run = &runs_of_ref(&d, "refs/heads/main")
        .into_iter()
        .find(|r| r["commit"] == c2.as_str())
        .unwrap();
    assert_eq!(run["trigger"], "reconcile");
    assert_eq!(run["before"], c1.as_str());
    assert!(run["delivery"].is_null());
    assert_eq!(
        d.wait_run(run["id"].as_i64().unwrap())["status"],
        "succeeded"
    );
    // Created while down: built as creations.
    eventually("the new branch and tag are built", || {
        runs_of_ref(&d, "refs/heads/feature/x").len() == 1
            && runs_of_ref(&d, "refs/tags/v2").len() == 1
    });
    for (git_ref, commit) in [("refs/heads/feature/x", &feature), ("refs/tags/v2", &c2)] {
        let run = &runs_of_ref(&d, git_ref)[0];
        assert_eq!(run["trigger"], "reconcile", "{run:#}");
        assert_eq!(run["before"], ZERO, "{run:#}");
        assert_eq!(
            run["commit"],
            commit.as_str(),
            "{git_ref} (tag {tagged} peeled)"
        );
        assert_eq!(
            d.wait_run(run["id"].as_i64().unwrap())["status"],
            "succeeded"
        );
    }

    // While up: a push whose delivery never arrives is found on the next interval.
    let c3 = origin.commit("main", &[("a", "3")], "three");
    eventually("the undelivered push is built", || {
        runs_for(&d, &c3).len() == 1
    });
    let id = runs_for(&d, &c3)[0]["id"].as_i64().unwrap();
    // A late delivery of that push names the existing run: nothing builds twice.
    let late = PushPayload::new(REPO, "refs/heads/main", &c2, &c3, "x").bytes();
    let r = d.deliver("push", "late", &late);
    assert_eq!(r.json()["runs"][0]["id"], id);
    assert_eq!(r.json()["runs"][0]["existing"], true);

    // Passes after that find nothing new: each ref was built once.
    let feature2 = origin.commit("feature/x", &[("a", "f2")], "feature 2");
    eventually("the moved branch is built", || {
        runs_for(&d, &feature2).len() == 1
    });
    assert_eq!(runs_for(&d, &feature2)[0]["before"], feature.as_str());
    assert!(
        runs_of_ref(&d, "refs/heads/feature/old").is_empty(),
        "a ref that existed at the first pass is never built for existing"
    );
    assert_eq!(
        d.runs().len(),
        6,
        "c1 (delivered), c2, feature/x, v2, c3 and feature/x again (reconciled): {:#?}",
        d.runs()
    );
}

#[test]
fn a_tag_pushed_while_the_daemon_is_stopped_runs_the_tag_pipeline_after_start() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a", "1")], "one");
    let released = origin.annotated_tag("v1.0.0", &c1);
    let d = b
        .pipeline(
            "ci",
            &format!(
                "repo: {REPO}\nclone_url: {}\nsteps:\n  - run: 'true'\n",
                origin.url()
            ),
        )
        .pipeline(
            "release",
            &format!(
                "repo: {REPO}\nclone_url: {}\non:\n  tags: [\"v*\"]\nsteps:\n  - run: echo releasing $HOOKCI_TAG at $HOOKCI_COMMIT\n",
                origin.url()
            ),
        );
    // Reconcile only at start (and never again), as after a restart.
    let mut d = d.config("reconcile_interval: 1h").start();
    wait_first_pass(&d, "refs/tags/v1.0.0", &c1);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0));

    let c2 = origin.commit("main", &[("a", "2")], "two");
    let tag = origin.annotated_tag("v1.2.0", &c2);
    d.spawn();
    eventually("the tag pipeline runs for v1.2.0", || {
        !runs_of_ref(&d, "refs/tags/v1.2.0").is_empty()
    });
    let tag_runs = runs_of_ref(&d, "refs/tags/v1.2.0");
    assert_eq!(tag_runs.len(), 1, "{tag_runs:#?}");
    let run = &tag_runs[0];
    assert_eq!(run["pipeline"], "release");
    assert_eq!(run["trigger"], "reconcile");
    assert_eq!(run["before"], ZERO);
    assert_eq!(run["commit"], c2.as_str(), "the tag object {tag} is peeled");
    let id = run["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(id)["status"], "succeeded");
    assert!(
        d.run_log(id).contains(&format!("releasing v1.2.0 at {c2}")),
        "{}",
        d.run_log(id)
    );
    // The same pass builds main, which moved, with the branch pipeline only.
    let main_runs = runs_of_ref(&d, "refs/heads/main");
    assert_eq!(main_runs.len(), 1, "{main_runs:#?}");
    assert_eq!(main_runs[0]["pipeline"], "ci");
    assert_eq!(main_runs[0]["trigger"], "reconcile");
    assert_eq!(main_runs[0]["before"], c1.as_str());
    assert!(
        runs_of_ref(&d, "refs/tags/v1.0.0").is_empty(),
        "the tag {released} that existed at the first reconcile is not built"
    );
    assert_eq!(d.runs().len(), 2, "{:#?}", d.runs());
}

/// A git remote over smart HTTP (`git upload-pack --stateless-rpc`) whose next ref
/// listing can be held: its answer is read from the repository when the request
/// arrives, and sent only when the test lets it go. Fetches go through as well.
struct HttpRemote {
    url: String,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Ref advertisements sent so far (a listing, or the first half of a fetch).
    listings: AtomicUsize,
    /// The next listing to hold: told when it arrived, then waits to be let go.
    hold: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

/// A listing being held by [`HttpRemote`].
struct Held {
    arrived: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl Held {
    fn wait_arrived(&self) {
        self.arrived
            .recv_timeout(Duration::from_secs(30))
            .expect("no ref listing arrived");
    }

    fn release(&self) {
        self.release.send(()).unwrap();
    }
}

impl HttpRemote {
    fn serve(repo: &Path) -> HttpRemote {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/{REPO}.git", listener.local_addr().unwrap());
        let shared = Arc::new(Shared::default());
        let (s, repo) = (Arc::clone(&shared), repo.to_path_buf());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, repo) = (Arc::clone(&s), repo.clone());
                std::thread::spawn(move || serve_request(conn, &repo, &s));
            }
        });
        HttpRemote { url, shared }
    }

    fn listings(&self) -> usize {
        self.shared.listings.load(Ordering::SeqCst)
    }

    fn hold_next_listing(&self) -> Held {
        let (arrived_tx, arrived) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        *self.shared.hold.lock().unwrap() = Some((arrived_tx, release_rx));
        Held { arrived, release }
    }
}

fn upload_pack(repo: &Path, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("git")
        .arg("upload-pack")
        .arg("--stateless-rpc")
        .args(args)
        .arg(repo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "git upload-pack failed");
    out.stdout
}

/// Answers one HTTP request (the connection is closed after it).
fn serve_request(mut conn: TcpStream, repo: &Path, shared: &Shared) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let (mut length, mut chunked) = (0, false);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((&header, ""));
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..n]);
            if n == 0 {
                break;
            }
        }
    } else {
        body.resize(length, 0);
        reader.read_exact(&mut body).unwrap();
    }
    let (content_type, reply) = if target.ends_with("/info/refs?service=git-upload-pack") {
        let mut reply = b"001e# service=git-upload-pack\n0000".to_vec();
        reply.extend(upload_pack(repo, &["--advertise-refs"], b""));
        let held = shared.hold.lock().unwrap().take();
        if let Some((arrived, release)) = held {
            arrived.send(()).unwrap();
            let _ = release.recv();
        }
        shared.listings.fetch_add(1, Ordering::SeqCst);
        ("application/x-git-upload-pack-advertisement", reply)
    } else if target.ends_with("/git-upload-pack") {
        (
            "application/x-git-upload-pack-result",
            upload_pack(repo, &[], &body),
        )
    } else {
        let _ = write!(
            conn,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    };
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        reply.len()
    );
    let _ = conn.write_all(&reply);
}

#[test]
fn a_push_that_lands_while_reconcile_lists_the_remote_is_not_superseded_by_it() {
    let b = Builder::new().config("reconcile_interval: 1s");
    let origin = Origin::new(b.path());
    let remote = HttpRemote::serve(&origin.path);
    let gate = b.path().join("gate");
    let c1 = origin.commit("main", &[("mode", "quick")], "one");
    let pipeline = format!(
        "repo: {REPO}\nclone_url: {}\nconcurrency: {{ cancel: running }}\nsteps:\n  - name: work\n    run: |\n      if [ \"$(cat mode)\" = wait ]; then\n        while [ ! -f {} ]; do sleep 0.05; done\n      fi\n      echo built $HOOKCI_COMMIT\n",
        remote.url,
        gate.display()
    );
    let mut d = b.pipeline("ci", &pipeline).start();
    wait_first_pass(&d, "refs/heads/main", &c1);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0));

    // Missed while down: main moved to c2. The first pass after the start lists it,
    // and its answer (main at c2) is held back.
    let c2 = origin.commit("main", &[("mode", "quick")], "two");
    let held = remote.hold_next_listing();
    d.spawn();
    held.wait_arrived();

    // Meanwhile c3 is pushed, and its delivery arrives: its run starts its step.
    let c3 = origin.commit("main", &[("mode", "wait")], "three");
    let body = PushPayload::new(REPO, "refs/heads/main", &c2, &c3, "x").bytes();
    let r = d.deliver("push", "during-listing", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    let pushed = r.json()["runs"][0]["id"].as_i64().unwrap();
    eventually("the pushed run is in its step", || {
        d.get_json(&format!("/api/runs/{pushed}"))["steps"][0]["status"] == "running"
    });

    // Now the listing, older than the push, reaches the daemon; the pass ends when
    // the next one lists again.
    let listed = remote.listings();
    held.release();
    eventually("the held reconcile pass is over", || {
        remote.listings() >= listed + 2
    });
    let run = d.get_json(&format!("/api/runs/{pushed}"));
    assert_eq!(run["status"], "running", "not superseded: {run:#}");
    let runs = d.runs();
    assert_eq!(runs.len(), 1, "no reconcile run for main: {runs:#?}");
    assert!(
        runs_for(&d, &c2).is_empty(),
        "the stale head c2 is not built"
    );

    std::fs::write(&gate, b"").unwrap();
    let run = d.wait_run(pushed);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["trigger"], "push");
    // Later passes see the push's head on the remote too: still nothing to do.
    let listed = remote.listings();
    eventually("another reconcile pass", || remote.listings() >= listed + 2);
    assert_eq!(d.runs().len(), 1, "{:#?}", d.runs());
}
