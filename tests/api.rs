//! The read API's shapes are a contract: every key, its type, and the
//! errors, pinned against the real daemon after real runs.

use std::collections::BTreeSet;

use hookci::cli::client::Response;
use serde_json::{json, Value};

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

const RUN_KEYS: &[&str] = &[
    "id",
    "pipeline",
    "repo",
    "ref",
    "commit",
    "before",
    "status",
    "reason",
    "trigger",
    "delivery",
    "attempt",
    "generation",
    "created_at",
    "started_at",
    "finished_at",
    "duration_ms",
    "log_truncated",
    "log_dropped_bytes",
    "instance",
    "timings",
];

const TIMING_KEYS: &[&str] = &["queue_ms", "fetch_ms", "checkout_ms", "to_first_step_ms"];

const STEP_KEYS: &[&str] = &[
    "number",
    "name",
    "status",
    "exit_code",
    "signal",
    "reason",
    "started_at",
    "finished_at",
    "duration_ms",
];

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set<'a>(names: &[&'a str]) -> BTreeSet<&'a str> {
    names.iter().copied().collect()
}

/// `2026-11-28T12:00:00Z` or with a fraction: `2026-11-28T12:00:00.123Z`.
fn is_rfc3339_utc(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let fixed = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    let tail = &s[19.min(s.len())..];
    let fraction_ok = match tail.strip_prefix('.') {
        Some(f) => f
            .strip_suffix('Z')
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit())),
        None => tail == "Z",
    };
    fixed && fraction_ok
}

fn assert_time(v: &Value, what: &str) {
    assert!(is_rfc3339_utc(v), "{what} is not an RFC 3339 UTC time: {v}");
}

fn assert_json_error(r: &Response, status: u16, label: &str) {
    assert_eq!(r.status, status, "{label}: {}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{label}: {:?}",
        r.headers
    );
    let body = r.json();
    assert_eq!(keys(&body), set(&["error"]), "{label}: {body}");
    assert!(
        !body["error"].as_str().unwrap().is_empty(),
        "{label}: {body}"
    );
}

fn ids(list: &Value) -> Vec<i64> {
    list["runs"]
        .as_array()
        .unwrap_or_else(|| panic!("no runs array: {list}"))
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

/// A run (as listed, without steps) has exactly the contract's keys and types; one
/// read alone (`with_steps`) has its steps and its reports too.
fn assert_run_shape(run: &Value, with_steps: bool) {
    let mut expected = set(RUN_KEYS);
    if with_steps {
        expected.insert("steps");
        expected.insert("reports");
        assert!(run["reports"].is_array(), "{run:#}");
    }
    assert_eq!(keys(run), expected, "{run:#}");
    assert!(run["id"].is_i64(), "{run:#}");
    for k in [
        "pipeline", "repo", "ref", "commit", "before", "status", "trigger",
    ] {
        assert!(run[k].is_string(), "{k}: {run:#}");
    }
    assert!(
        run["reason"].is_null() || run["reason"].is_string(),
        "{run:#}"
    );
    assert!(
        run["delivery"].is_null() || run["delivery"].is_string(),
        "{run:#}"
    );
    assert!(run["attempt"].is_i64(), "{run:#}");
    assert!(run["generation"].is_i64(), "{run:#}");
    assert!(
        run["instance"].is_null() || run["instance"].is_string(),
        "{run:#}"
    );
    assert_time(&run["created_at"], "created_at");
}

#[test]
fn runs_steps_deliveries_and_logs_have_their_contract_shapes() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let first = origin.commit("main", &[("a", "1")], "first");
    let sha = origin.commit("main", &[("a", "2")], "second");
    let dev = origin.commit("dev", &[("b", "1")], "dev");
    let d = b
        .pipeline(
            "ci",
            &format!(
                "repo: {REPO}\nclone_url: {}\non:\n  branches: [main]\nsteps:\n  - name: compile\n    run: echo compiling\n  - name: unit tests\n    run: echo testing; echo to stderr >&2\n",
                origin.url()
            ),
        )
        .pipeline(
            "lint",
            &format!(
                "repo: {REPO}\nclone_url: {}\nsteps:\n  - name: lint\n    run: echo lint failed; exit 4\n  - name: never\n    run: echo never\n",
                origin.url()
            ),
        )
        .start();

    let r = d.deliver(
        "push",
        "api-1",
        &PushPayload::new(REPO, "refs/heads/main", &first, &sha, "x").bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(keys(&body), set(&["delivery", "runs"]));
    let runs = body["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        assert_eq!(keys(r), set(&["id", "pipeline"]), "{r}");
    }
    let by_name = |name: &str| {
        runs.iter().find(|r| r["pipeline"] == name).unwrap()["id"]
            .as_i64()
            .unwrap()
    };
    let (ci, lint) = (by_name("ci"), by_name("lint"));
    let r = d.deliver(
        "push",
        "api-2",
        &PushPayload::new(REPO, "refs/heads/dev", ZERO, &dev, "x").bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["runs"].as_array().unwrap().len(), 1);
    let lint_dev = r.json()["runs"][0]["id"].as_i64().unwrap();
    for id in [ci, lint, lint_dev] {
        d.wait_run(id);
    }

    // GET /api/runs/{id}: the successful run, every key and type.
    let run = d.get_json(&format!("/api/runs/{ci}"));
    assert_run_shape(&run, true);
    assert_eq!(run["id"], ci);
    assert_eq!(run["pipeline"], "ci");
    assert_eq!(run["repo"], REPO);
    assert_eq!(run["ref"], "refs/heads/main");
    assert_eq!(run["commit"], sha.as_str());
    assert_eq!(run["before"], first.as_str());
    assert_eq!(run["status"], "succeeded");
    assert!(run["reason"].is_null(), "{run:#}");
    assert_eq!(run["trigger"], "push");
    assert_eq!(run["delivery"], "api-1");
    assert_eq!(run["attempt"], 1);
    assert_eq!(run["generation"], 1);
    // The instance that ran it: the name kept in its state directory.
    let instance = std::fs::read_to_string(d.state_dir().join("instance")).unwrap();
    assert_eq!(run["instance"], instance.trim());
    for k in ["started_at", "finished_at"] {
        assert_time(&run[k], k);
    }
    let (created, started, finished) = (
        run["created_at"].as_str().unwrap(),
        run["started_at"].as_str().unwrap(),
        run["finished_at"].as_str().unwrap(),
    );
    assert!(created <= started && started <= finished, "{run:#}");
    assert!(
        run["duration_ms"].as_i64().is_some_and(|n| n >= 0),
        "{run:#}"
    );
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(keys(step), set(STEP_KEYS), "{step:#}");
        assert_eq!(step["number"], i as i64 + 1);
        assert_eq!(step["name"], ["compile", "unit tests"][i]);
        assert_eq!(step["status"], "succeeded");
        assert_eq!(step["exit_code"], 0);
        assert!(
            step["signal"].is_null() && step["reason"].is_null(),
            "{step:#}"
        );
        assert_time(&step["started_at"], "step started_at");
        assert_time(&step["finished_at"], "step finished_at");
        assert!(
            step["duration_ms"].as_i64().is_some_and(|n| n >= 0),
            "{step:#}"
        );
    }

    // The failed run: a reason, the failing step's exit code, the rest skipped.
    let failed = d.get_json(&format!("/api/runs/{lint}"));
    assert_run_shape(&failed, true);
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["reason"].as_str().unwrap().contains("lint"),
        "{failed:#}"
    );
    assert_eq!(keys(&failed["timings"]), set(TIMING_KEYS), "{failed:#}");
    let steps = failed["steps"].as_array().unwrap();
    assert_eq!(
        (steps[0]["status"].as_str(), steps[0]["exit_code"].as_i64()),
        (Some("failed"), Some(4))
    );
    assert!(steps[0]["reason"].is_string(), "{failed:#}");
    assert_eq!(steps[1]["status"], "skipped");
    assert!(steps[1]["exit_code"].is_null() && steps[1]["started_at"].is_null());
    assert!(steps[1]["duration_ms"].is_null(), "{failed:#}");

    // GET /api/runs: newest first, each without steps.
    let list = d.get_json("/api/runs");
    assert_eq!(keys(&list), set(&["runs", "next_before", "runs_paused"]));
    assert!(list["next_before"].is_null(), "one page holds them all");
    let mut newest_first = vec![ci, lint, lint_dev];
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids(&list), newest_first);
    for r in list["runs"].as_array().unwrap() {
        assert_run_shape(r, false);
    }
    let listed = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == ci)
        .unwrap()
        .clone();
    let mut single = run.clone();
    single.as_object_mut().unwrap().remove("steps");
    single.as_object_mut().unwrap().remove("reports");
    assert_eq!(
        listed, single,
        "a listed run is the same object without steps and reports"
    );

    // Filters.
    let mut lints = vec![lint, lint_dev];
    lints.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids(&d.get_json("/api/runs?pipeline=lint")), lints);
    assert_eq!(ids(&d.get_json("/api/runs?pipeline=ci")), vec![ci]);
    assert_eq!(
        ids(&d.get_json("/api/runs?pipeline=nope")),
        Vec::<i64>::new()
    );
    assert_eq!(ids(&d.get_json("/api/runs?status=succeeded")), vec![ci]);
    assert_eq!(ids(&d.get_json("/api/runs?status=failed")), lints);
    assert_eq!(
        ids(&d.get_json("/api/runs?status=queued")),
        Vec::<i64>::new()
    );
    assert_eq!(ids(&d.get_json("/api/runs?limit=1")), vec![newest_first[0]]);
    assert_eq!(
        ids(&d.get_json("/api/runs?limit=2")),
        newest_first[..2].to_vec()
    );
    assert_eq!(
        ids(&d.get_json("/api/runs?pipeline=lint&status=failed&limit=1")),
        vec![lints[0]]
    );
    assert_eq!(
        ids(&d.get_json("/api/runs?pipeline=ci&status=failed")),
        Vec::<i64>::new()
    );
    for bad in [
        "/api/runs?status=bogus",
        "/api/runs?status=SUCCEEDED",
        "/api/runs?limit=0",
        "/api/runs?limit=-1",
        "/api/runs?limit=abc",
        "/api/runs?limit=100000",
        "/api/runs?before=abc",
        "/api/runs?before=0",
    ] {
        assert_json_error(&d.get(bad), 400, bad);
    }
    let r = d.get("/api/runs?status=bogus");
    let msg = r.json()["error"].as_str().unwrap().to_owned();
    assert!(msg.contains("bogus") && msg.contains("succeeded"), "{msg}");
    assert!(d.get("/api/runs?limit=abc").json()["error"]
        .as_str()
        .unwrap()
        .contains("limit"));

    // 404s are JSON too.
    assert_json_error(&d.get("/api/runs/999"), 404, "/api/runs/999");
    assert_json_error(&d.get("/api/runs/999/log"), 404, "/api/runs/999/log");
    assert_json_error(&d.get("/api/deliveries/nope"), 404, "/api/deliveries/nope");

    // GET /api/deliveries/{id}: exact shape, one decision per pipeline.
    let why = d.get_json("/api/deliveries/api-2");
    assert_eq!(
        keys(&why),
        set(&[
            "id",
            "event",
            "repo",
            "ref",
            "after",
            "received_at",
            "decisions"
        ])
    );
    assert_eq!(why["id"], "api-2");
    assert_eq!(why["event"], "push");
    assert_eq!(why["repo"], REPO);
    assert_eq!(why["ref"], "refs/heads/dev");
    assert_eq!(why["after"], dev.as_str());
    assert_time(&why["received_at"], "received_at");
    let decisions = why["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 2, "{why:#}");
    for x in decisions {
        assert_eq!(
            keys(x),
            set(&["pipeline", "outcome", "reason", "run"]),
            "{x}"
        );
        assert!(x["reason"].as_str().is_some_and(|r| !r.is_empty()), "{x}");
    }
    let decision = |name: &str| decisions.iter().find(|x| x["pipeline"] == name).unwrap();
    assert_eq!(decision("ci")["outcome"], "not_triggered");
    assert!(decision("ci")["run"].is_null());
    assert!(decision("ci")["reason"].as_str().unwrap().contains("dev"));
    assert_eq!(decision("lint")["outcome"], "run");
    assert_eq!(decision("lint")["run"], lint_dev);

    // GET /api/runs/{id}/log: plain text, a header per step, output under it.
    let r = d.get(&format!("/api/runs/{ci}/log"));
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    let log = r.text();
    let first_header = log.find("==> step 1: compile (succeeded)\n").expect(&log);
    let compiling = log.find("compiling").expect(&log);
    let second_header = log
        .find("==> step 2: unit tests (succeeded)\n")
        .expect(&log);
    let testing = log.find("testing").expect(&log);
    assert!(
        first_header < compiling && compiling < second_header && second_header < testing,
        "{log}"
    );
    assert!(log.contains("to stderr"), "stderr is in the log: {log}");
    assert!(log.starts_with("==> step 1: "), "{log}");
    let failed_log = d.run_log(lint);
    assert!(
        failed_log.contains("==> step 1: lint (failed)\n"),
        "{failed_log}"
    );
    assert!(failed_log.contains("lint failed"), "{failed_log}");
    assert!(
        !failed_log.contains("echo never") && !failed_log.contains("\nnever"),
        "{failed_log}"
    );

    // Ops.
    let r = d.get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({ "ok": true, "runs_paused": null }));
    let r = d.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let metrics = r.text();
    for line in [
        "hookci_runs{status=\"succeeded\"} 1",
        "hookci_runs{status=\"failed\"} 2",
        "hookci_runs{status=\"queued\"} 0",
        "hookci_runs{status=\"running\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    assert!(metrics.contains("# TYPE hookci_runs gauge"), "{metrics}");

    // Unknown paths and wrong methods.
    assert_json_error(&d.get("/nope"), 404, "/nope");
    assert_json_error(
        &d.get("/api/runs/not-a-number"),
        404,
        "/api/runs/not-a-number",
    );
    assert_json_error(&d.get("/webhook"), 405, "GET /webhook");
    assert_json_error(&d.post("/healthz", &[], b""), 405, "POST /healthz");
    assert_json_error(&d.post("/api/runs", &[], b""), 405, "POST /api/runs");
}

#[test]
fn push_to_first_step_is_recorded_per_run_in_its_phases() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let first = origin.commit("main", &[("a", "1")], "first");
    let sha = origin.commit("main", &[("a", "2")], "second");
    let d = b
        .pipeline(
            "ci",
            &format!(
                "repo: {REPO}\nclone_url: {}\nsteps:\n  - name: build\n    run: cat a\n",
                origin.url()
            ),
        )
        .start();
    let r = d.deliver(
        "push",
        "timed-1",
        &PushPayload::new(REPO, "refs/heads/main", &first, &sha, "x").bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let timings = &run["timings"];
    assert_eq!(keys(timings), set(TIMING_KEYS), "{run:#}");
    let ms = |k: &str| {
        timings[k]
            .as_i64()
            .filter(|n| *n >= 0)
            .unwrap_or_else(|| panic!("{k} is not a non-negative integer: {run:#}"))
    };
    let phases = ms("queue_ms") + ms("fetch_ms") + ms("checkout_ms");
    assert!(phases <= ms("to_first_step_ms"), "{run:#}");
    // The listing carries the same numbers.
    let listed = d.get_json("/api/runs?pipeline=ci")["runs"][0].clone();
    assert_eq!(listed["timings"], *timings, "{listed:#}");
    // And the metrics observe each phase, and the whole, once for this one run.
    let counts: Vec<String> = ["total", "queue", "fetch", "checkout"]
        .iter()
        .map(|phase| format!("hookci_push_to_first_step_seconds_count{{phase=\"{phase}\"}} 1"))
        .collect();
    let mut metrics = String::new();
    eventually("the metrics observe the run's first step", || {
        metrics = d.get("/metrics").text();
        counts.iter().all(|c| metrics.lines().any(|l| l == c))
    });
    let sum = |phase: &str| -> f64 {
        let prefix = format!("hookci_push_to_first_step_seconds_sum{{phase=\"{phase}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
    };
    assert_eq!(sum("total"), ms("to_first_step_ms") as f64 / 1000.0);
    assert_eq!(sum("checkout"), ms("checkout_ms") as f64 / 1000.0);
}

#[test]
fn log_follow_streams_until_the_run_ends() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let go = b.path().join("go");
    let d = b
        .pipeline(
            "ci",
            &format!(
                "repo: {REPO}\nclone_url: {}\nsteps:\n  - name: wait\n    run: echo first line; while [ ! -f {} ]; do sleep 0.05; done; echo second line\n  - name: after\n    run: echo after step\n",
                origin.url(),
                go.display()
            ),
        )
        .start();
    let r = d.deliver(
        "push",
        "follow-1",
        &PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes(),
    );
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    eventually("the first step has written its first line", || {
        d.run_log(id).contains("first line")
    });

    // A raw connection, so the streamed body can be read while the step still runs.
    let mut stream = std::net::TcpStream::connect(&d.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    std::io::Write::write_all(
        &mut stream,
        format!(
            "GET /api/runs/{id}/log?follow=1 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            d.addr
        )
        .as_bytes(),
    )
    .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("first line") {
        let n = std::io::Read::read(&mut stream, &mut buf).unwrap();
        assert!(
            n > 0,
            "the response ended before the first line: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    }
    // Only now may the step finish; a follow response must carry what comes after.
    assert_eq!(d.get_json(&format!("/api/runs/{id}"))["status"], "running");
    std::fs::write(&go, "").unwrap();
    let _ = std::io::Read::read_to_end(&mut stream, &mut received);
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("second line"),
        "?follow=1 must stream until the run ends:\n{text}"
    );
    assert!(text.contains("after step"), "{text}");
    assert_eq!(d.wait_run(id)["status"], "succeeded");
}

#[test]
fn a_large_log_is_streamed_with_the_same_text() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    // 14-byte lines of two-byte characters, cut inside a character at the end and,
    // at 64 KiB, inside one too: the text must still be what the whole file decodes to.
    let steps = "  - name: talk\n    run: yes 'h\u{e9}llo w\u{f6}rld' | head -c 300001\n  - name: quiet\n    run: 'true'\n";
    let d = b
        .pipeline(
            "ci",
            &format!("repo: {REPO}\nclone_url: {}\nsteps:\n{steps}", origin.url()),
        )
        .start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let r = d.deliver("push", "big-log", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(id)["status"], "succeeded");

    let r = d.get(&format!("/api/runs/{id}/log"));
    assert_eq!(r.status, 200);
    // Sent as it is read, so its length is not known up front.
    assert_eq!(
        r.header("transfer-encoding"),
        Some("chunked"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("content-length"), None);
    let file = std::fs::read(d.state_dir().join(format!("logs/{id}/1.log"))).unwrap();
    assert_eq!(file.len(), 300_001);
    let expected = format!(
        "==> step 1: talk (succeeded)\n{}\n==> step 2: quiet (succeeded)\n",
        String::from_utf8_lossy(&file)
    );
    assert!(expected.contains("w\u{fffd}\n==> step 2"));
    assert!(r.text() == expected, "the log differs from its files");
}
