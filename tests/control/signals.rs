//! Stops and signals: a SIGTERM starts no new run and ends open log streams at once;
//! a SIGHUP reloads and leaves running runs alone; both are handled from before
//! recovery on.

use super::*;

/// A step that appends its run id to `started`, then waits for `gate` to exist.
fn logged_gated_step(started: &Path, gate: &Path) -> String {
    step(
        "work",
        &format!(
            "echo $HOOKCI_RUN_ID >> {}\necho waiting\nwhile [ ! -f {} ]; do sleep 0.05; done\necho finished",
            started.display(),
            gate.display()
        ),
    )
}

/// The run ids in `started`, in the order their steps began.
fn started_runs(started: &Path) -> Vec<i64> {
    std::fs::read_to_string(started)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The warning `http::serve` logs when open requests outlast the stop's drain.
const DRAIN_CUT: &str = "in-flight requests did not finish in time";

#[test]
fn a_stop_starts_no_queued_run_and_they_succeed_on_attempt_one_after_the_restart() {
    let b = Builder::new().config("max_parallel_runs: 1\nshutdown_grace: 60s");
    let origin = Origin::new(b.path());
    let (started, gate) = (b.path().join("started"), b.path().join("gate"));
    let mut d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[logged_gated_step(&started, &gate)]),
        )
        .start();
    let ids: Vec<i64> = (0..3)
        .map(|i| {
            let branch = format!("b{i}");
            let sha = origin.commit(&branch, &[("n", &i.to_string())], "x");
            push(
                &d,
                &format!("stop-{i}"),
                &format!("refs/heads/{branch}"),
                ZERO,
                &sha,
            )
        })
        .collect();
    eventually("the first run's step runs", || {
        started_runs(&started) == ids[..1]
    });
    assert_eq!(run_of(&d, ids[1])["status"], "queued");
    assert_eq!(run_of(&d, ids[2])["status"], "queued");
    // Someone follows a queued run: an open stream the stop's HTTP drain waits for.
    let (_, follower) = stream_get(&d.addr, &format!("/api/runs/{}/log?follow=1", ids[2]));

    d.signal(libc::SIGTERM);
    // Logged just before the stop reaches the scheduler, with no await in between.
    eventually("the daemon hears the stop", || {
        d.log().contains("SIGTERM received")
    });
    // The running run finishes within shutdown_grace, during the stop: its permit
    // comes free while HTTP may still be draining.
    std::fs::write(&gate, "go").unwrap();
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    assert_eq!(
        started_runs(&started),
        ids[..1],
        "a queued run started during the stop; log:\n{}",
        d.log()
    );
    eventually("the follower's stream ends", || follower.ended());
    assert!(
        follower.text().contains("==> hookci is stopping"),
        "{}",
        follower.text()
    );
    assert!(!d.log().contains(DRAIN_CUT), "{}", d.log());

    d.spawn();
    for id in &ids {
        let run = d.wait_run(*id);
        assert_eq!(
            (run["status"].as_str(), run["attempt"].as_i64()),
            (Some("succeeded"), Some(1)),
            "{run:#}"
        );
    }
    assert_eq!(started_runs(&started), ids, "each run's step ran once");
}

#[test]
fn open_log_streams_end_at_a_stop_and_do_not_hold_the_drain() {
    let b = Builder::new().config("shutdown_grace: 60s");
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let (started, gate) = (b.path().join("started"), b.path().join("gate"));
    let mut d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[logged_gated_step(&started, &gate)]),
        )
        .start();
    let id = push(&d, "streams-1", "refs/heads/main", ZERO, &sha);
    let (_, text) = stream_get(&d.addr, &format!("/api/runs/{id}/log?follow=1"));
    let (_, sse) = stream_get(&d.addr, &format!("/api/runs/{id}/events"));
    eventually("both streams show the step waiting", || {
        text.text().contains("waiting")
            && find_event(&sse_events(&sse.text()), "log", |v| {
                log_text_contains(v, "waiting")
            })
            .is_some()
    });

    d.signal(libc::SIGTERM);
    // The step still waits for its gate, inside shutdown_grace: only the stop can end
    // the streams now.
    eventually("both streams end at the stop", || {
        text.ended() && sse.ended()
    });
    let printed = text.text();
    assert!(
        printed.ends_with(&format!(
            "==> hookci is stopping; run {id} was running (follow it again once hookci is back)\n"
        )),
        "{printed}"
    );
    let events = sse_events(&sse.text());
    let stopping = find_event(&events, "stopping", |v| {
        v["id"] == id && v["status"] == "running"
    });
    assert_eq!(stopping, Some(events.len() - 1), "{events:?}");
    assert!(find_event(&events, "run_finished", |_| true).is_none());

    // The run goes on within the grace, and the daemon exits once it is done.
    std::fs::write(&gate, "go").unwrap();
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    assert!(!d.log().contains(DRAIN_CUT), "{}", d.log());
    d.spawn();
    let run = run_of(&d, id);
    assert_eq!(
        (run["status"].as_str(), run["attempt"].as_i64()),
        (Some("succeeded"), Some(1)),
        "{run:#}"
    );
}

#[test]
fn a_sighup_reloads_and_leaves_the_daemon_and_its_running_run_alone() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let (started, gate) = (b.path().join("started"), b.path().join("gate"));
    let mut d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[logged_gated_step(&started, &gate)]),
        )
        .start();
    let id = push(&d, "hup-1", "refs/heads/main", ZERO, &sha);
    eventually("the step runs", || started_runs(&started) == [id]);

    d.signal(libc::SIGHUP);
    eventually("the SIGHUP reloads", || {
        d.log().contains("reloaded config and pipelines")
    });
    assert_eq!(d.get("/healthz").status, 200);
    let run = run_of(&d, id);
    assert_eq!(
        (run["status"].as_str(), run["attempt"].as_i64()),
        (Some("running"), Some(1)),
        "{run:#}"
    );

    std::fs::write(&gate, "go").unwrap();
    let run = d.wait_run(id);
    assert_eq!(
        (run["status"].as_str(), run["attempt"].as_i64()),
        (Some("succeeded"), Some(1)),
        "{run:#}"
    );
    assert_eq!(started_runs(&started), [id], "the step ran once");
    // Still serving webhooks, and still stopping on SIGTERM.
    let next = origin.commit("main", &[("a", "2")], "x");
    let second = push(&d, "hup-2", "refs/heads/main", &sha, &next);
    assert_eq!(d.wait_run(second)["status"], "succeeded");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0), "{}", d.log());
}

/// Whether process `pid` has a file named `name` open.
fn has_open(pid: u32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.ends_with(name)))
        })
        .unwrap_or(false)
}

#[test]
fn signals_during_recovery_find_their_handlers_and_a_stop_then_ends_the_start_cleanly() {
    let mut d = Builder::new().start();
    // Sent as soon as the daemon says it listens: its handlers are in place by then.
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0), "{}", d.log());

    // The store's write lock, held from here, keeps the next start in its recovery.
    let db = rusqlite::Connection::open(d.state_dir().join("hookci.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut child = Command::new(bin())
        .arg("serve")
        .arg("-c")
        .arg(d.path().join("hookci.yml"))
        .env_remove("HOOKCI_WEBHOOK_SECRET")
        .env_remove("HOOKCI_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = Captured::spawn(child.stderr.take().unwrap());
    let pid = child.id();
    eventually("the new daemon opened its store", || {
        has_open(pid, "hookci.db")
    });

    // SAFETY (both): signalling our own child process by pid.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    eventually(
        "the SIGHUP is heard, its reload put off until the start is done",
        || {
            err.text()
                .contains("SIGHUP during startup: config and pipelines are read again once started")
        },
    );
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    eventually("the stop is heard during recovery", || {
        err.text().contains("stop requested during recovery")
    });
    db.execute_batch("COMMIT").unwrap();
    let code = wait_child(&mut child, "a daemon stopped during recovery");
    eventually("its log is read", || err.ended());
    let log = err.text();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains(" listening"), "it never served: {log}");

    // Recovery was finished, not cut: the next start serves.
    d.spawn();
    assert_eq!(d.get("/healthz").status, 200);
}
