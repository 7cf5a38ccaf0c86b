//! Concurrency groups and their cancel policies.

use super::*;

#[test]
fn a_newer_push_to_a_ref_supersedes_its_queued_run_by_default() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let gate = b.path().join("gate");
    let c1 = origin.commit("main", &[("n", "1")], "one");
    let c2 = origin.commit("main", &[("n", "2")], "two");
    let c3 = origin.commit("main", &[("n", "3")], "three");
    let steps = [
        // The gate holds the first run until the later pushes are in.
        step(
            "build",
            &format!(
                "while [ ! -f {} ]; do sleep 0.05; done\necho built $HOOKCI_COMMIT",
                gate.display()
            ),
        ),
        step("after", "echo after"),
    ];
    let d = b.pipeline("ci", &pipeline(&origin, "", &steps)).start();
    let first = push(&d, "p-1", "refs/heads/main", ZERO, &c1);
    wait_status(&d, first, "running");
    let second = push(&d, "p-2", "refs/heads/main", &c1, &c2);
    let third = push(&d, "p-3", "refs/heads/main", &c2, &c3);
    std::fs::write(&gate, "go").unwrap();

    let one = d.wait_run(first);
    assert_eq!(
        one["status"], "succeeded",
        "the running run is kept: {one:#}"
    );
    let two = d.wait_run(second);
    assert_eq!(two["status"], "canceled", "{two:#}");
    assert_eq!(reason(&two), format!("superseded by run {third}"));
    assert_never_started(&two);
    let three = d.wait_run(third);
    assert_eq!(three["status"], "succeeded", "{three:#}");
    assert_eq!(three["commit"], c3.as_str());
    assert!(d.run_log(third).contains(&format!("built {c3}")));
}

#[test]
fn a_pipeline_group_without_cancel_builds_every_push_one_at_a_time_in_order() {
    let b = Builder::new().config("max_parallel_runs: 3");
    let origin = Origin::new(b.path());
    let trace = b.path().join("trace");
    let steps = [step(
        "deploy",
        &format!(
            "echo start $HOOKCI_COMMIT >> {0}\nsleep 0.5\necho end $HOOKCI_COMMIT >> {0}",
            trace.display()
        ),
    )];
    let d = b
        .pipeline(
            "deploy",
            &pipeline(
                &origin,
                "on:\n  branches: [\"**\"]\nconcurrency: { group: pipeline, cancel: none }\n",
                &steps,
            ),
        )
        .start();
    // Three refs: a per-ref group would let them overlap; one pipeline group may not.
    let mut shas = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let sha = origin.commit(&format!("env/{i}"), &[("n", &i.to_string())], "x");
        ids.push(push(
            &d,
            &format!("deploy-{i}"),
            &format!("refs/heads/env/{i}"),
            ZERO,
            &sha,
        ));
        shas.push(sha);
    }
    for id in &ids {
        let run = d.wait_run(*id);
        assert_eq!(
            run["status"], "succeeded",
            "cancel: none keeps every run: {run:#}"
        );
    }
    let lines: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = shas
        .iter()
        .flat_map(|s| [format!("start {s}"), format!("end {s}")])
        .collect();
    assert_eq!(lines, expected, "one at a time, in push order");
}

/// A daemon whose pipeline cancels a running run for a newer push of its ref, and two
/// commits on main: the first hangs in its step, the second finishes at once.
fn hang_then_fix() -> (Daemon, Sleeps, String, String) {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sleeps = Sleeps::new();
    let c1 = origin.commit("main", &[("mode", "hang")], "slow");
    let c2 = origin.commit("main", &[("mode", "fast")], "fix");
    let d = start_cancel_running(b, &origin, &sleeps);
    (d, sleeps, c1, c2)
}

/// Starts a daemon whose one pipeline runs [`hang_step`] and cancels a running run for
/// a newer push of its ref.
fn start_cancel_running(b: Builder, origin: &Origin, sleeps: &Sleeps) -> Daemon {
    b.pipeline(
        "ci",
        &pipeline(
            origin,
            "concurrency: { group: ref, cancel: running }\n",
            &[hang_step(&sleeps.dir())],
        ),
    )
    .start()
}

#[test]
fn cancel_running_stops_the_running_run_and_its_processes_for_a_newer_push() {
    let (d, sleeps, c1, c2) = hang_then_fix();
    let pids = sleeps.dir();
    let first = push(&d, "r-1", "refs/heads/main", ZERO, &c1);
    let pid = read_pid(&pids.join(format!("{first}.pid")));
    let second = push(&d, "r-2", "refs/heads/main", &c1, &c2);

    let one = d.wait_run(first);
    assert_eq!(one["status"], "canceled", "{one:#}");
    assert!(reason(&one).contains("superseded"), "{one:#}");
    assert!(reason(&one).contains(&format!("run {second}")), "{one:#}");
    assert_eq!(one["steps"][0]["status"], "canceled", "{one:#}");
    eventually("the canceled step's background sleep is gone", || {
        process_gone(pid)
    });
    let two = d.wait_run(second);
    assert_eq!(two["status"], "succeeded", "{two:#}");
    assert!(d.run_log(second).contains(&format!("done with {c2}")));
}

#[test]
fn a_push_whose_sender_hangs_up_before_the_answer_still_supersedes_and_builds() {
    let (d, sleeps, c1, c2) = hang_then_fix();
    let pids = sleeps.dir();
    let first = push(&d, "h-1", "refs/heads/main", ZERO, &c1);
    let pid = read_pid(&pids.join(format!("{first}.pid")));

    // The store's write lock, held from here, keeps the second delivery from committing
    // until its sender has hung up: the daemon then drops the request mid-way.
    let db = rusqlite::Connection::open(d.state_dir().join("hookci.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let body = push_body("refs/heads/main", &c1, &c2, "fix");
    let mut request = format!(
        "POST /webhook HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: push\r\nX-GitHub-Delivery: h-2\r\nX-Hub-Signature-256: {}\r\n\
         Content-Length: {}\r\n\r\n",
        d.addr,
        hookci::intake::sign(SECRET.as_bytes(), &body),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let mut stream = std::net::TcpStream::connect(&d.addr).unwrap();
    stream.write_all(&request).unwrap();
    // Time for the daemon to read the whole request and reach the store, where the
    // lock stops it (a request cut short before its body is read is rightly never
    // recorded), then for it to notice the hang-up and drop the request.
    std::thread::sleep(Duration::from_millis(500));
    drop(stream);
    std::thread::sleep(Duration::from_millis(500));
    db.execute_batch("COMMIT").unwrap();
    drop(db);

    let mut second = None;
    eventually("the hung-up delivery is recorded", || {
        let r = d.get("/api/deliveries/h-2");
        second = (r.status == 200)
            .then(|| r.json()["decisions"][0]["run"].as_i64())
            .flatten();
        second.is_some()
    });
    let second = second.unwrap();
    let one = d.wait_run(first);
    assert_eq!(one["status"], "canceled", "{one:#}");
    assert_eq!(reason(&one), format!("superseded by run {second}"));
    eventually("the canceled step's background sleep is gone", || {
        process_gone(pid)
    });
    let two = d.wait_run(second);
    assert_eq!(two["status"], "succeeded", "{two:#}");
    assert!(d.run_log(second).contains(&format!("done with {c2}")));
}

#[test]
fn a_missed_push_found_by_reconcile_supersedes_a_running_run_too() {
    let b = Builder::new().config("reconcile_interval: 1s");
    let origin = Origin::new(b.path());
    let sleeps = Sleeps::new();
    let pids = sleeps.dir();
    let c1 = origin.commit("main", &[("mode", "hang")], "slow");
    let d = start_cancel_running(b, &origin, &sleeps);
    let first = push(&d, "seen", "refs/heads/main", ZERO, &c1);
    let pid = read_pid(&pids.join(format!("{first}.pid")));
    // A push whose delivery never came: reconcile finds it.
    let c2 = origin.commit("main", &[("mode", "fast")], "fix");
    let one = d.wait_run(first);
    assert_eq!(one["status"], "canceled", "{one:#}");
    assert!(reason(&one).contains("superseded"), "{one:#}");
    eventually("the canceled step's background sleep is gone", || {
        process_gone(pid)
    });
    let runs = d.runs();
    let found = runs
        .iter()
        .find(|r| r["commit"] == c2.as_str())
        .unwrap_or_else(|| panic!("no run for the missed push: {runs:#?}"));
    assert_eq!(found["trigger"], "reconcile", "{found:#}");
    let two = d.wait_run(found["id"].as_i64().unwrap());
    assert_eq!(two["status"], "succeeded", "{two:#}");
}

/// A step `build` that waits until the file `gate` exists, then runs `then`.
fn gated_step(gate: &Path, then: &str) -> String {
    step(
        "build",
        &format!(
            "while [ ! -f {} ]; do sleep 0.05; done\n{then}",
            gate.display()
        ),
    )
}

/// A base commit with a `src/` file, and a daemon whose one pipeline builds only
/// changes to `src/**` on main, with `concurrency` as given and `step` its only step.
fn src_only(b: Builder, origin: &Origin, concurrency: &str, step: String) -> (Daemon, String) {
    let base = commit_paths(&origin.path, "main", None, &[("src/lib.rs", "0")], "base");
    let extra = format!("on:\n  branches: [main]\n  paths: [\"src/**\"]\n{concurrency}");
    let d = b.pipeline("ci", &pipeline(origin, &extra, &[step])).start();
    (d, base)
}

#[test]
fn a_run_that_supersedes_a_queued_src_change_builds_it_though_its_own_push_is_docs_only() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let gate = b.path().join("gate");
    let build = gated_step(&gate, "echo built $HOOKCI_COMMIT since $HOOKCI_BEFORE");
    let (d, base) = src_only(b, &origin, "", build);
    // A first push holds the group, so the next ones wait in the queue.
    let held = commit_paths(&origin.path, "main", None, &[("src/lib.rs", "1")], "one");
    let first = push(&d, "sup-held", "refs/heads/main", &base, &held);
    wait_status(&d, first, "running");
    let a = commit_paths(&origin.path, "main", None, &[("src/lib.rs", "2")], "A");
    let run_a = push(&d, "sup-a", "refs/heads/main", &held, &a);
    let b_sha = commit_paths(&origin.path, "main", None, &[("docs/guide.md", "g")], "B");
    let run_b = push(&d, "sup-b", "refs/heads/main", &a, &b_sha);
    std::fs::write(&gate, "go").unwrap();

    assert_eq!(d.wait_run(first)["status"], "succeeded");
    let one = d.wait_run(run_a);
    assert_eq!(one["status"], "canceled", "{one:#}");
    assert_eq!(reason(&one), format!("superseded by run {run_b}"));
    let two = d.wait_run(run_b);
    assert_eq!(
        two["status"], "succeeded",
        "B stands for A's src change: {two:#}"
    );
    assert_eq!(two["before"], held.as_str(), "{two:#}");
    assert!(
        d.run_log(run_b)
            .contains(&format!("built {b_sha} since {held}")),
        "B's step ran: {}",
        d.run_log(run_b)
    );
}

#[test]
fn a_path_filtered_run_leaves_the_queued_runs_of_other_refs_of_its_group_to_run() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let gate = b.path().join("gate");
    let build = gated_step(&gate, "echo built $HOOKCI_REF");
    let base = commit_paths(&origin.path, "main", None, &[("src/lib.rs", "0")], "base");
    let extra = "on:\n  branches: [main, feature]\n  paths: [\"src/**\"]\n\
                 concurrency: { group: pipeline, cancel: pending }\n";
    let d = b
        .pipeline("ci", &pipeline(&origin, extra, &[build]))
        .start();
    // A first push holds the group; A (feature, touches src/) waits behind it.
    let held = commit_paths(&origin.path, "main", None, &[("src/lib.rs", "1")], "one");
    let first = push(&d, "own-held", "refs/heads/main", &base, &held);
    wait_status(&d, first, "running");
    let a = commit_paths(
        &origin.path,
        "feature",
        Some(&held),
        &[("src/x.rs", "a")],
        "A",
    );
    let run_a = push(&d, "own-a", "refs/heads/feature", ZERO, &a);
    // B (main, docs only) would supersede A across refs, and then skip by its filter.
    let b_sha = commit_paths(&origin.path, "main", None, &[("docs/guide.md", "g")], "B");
    let run_b = push(&d, "own-b", "refs/heads/main", &held, &b_sha);
    std::fs::write(&gate, "go").unwrap();

    assert_eq!(d.wait_run(first)["status"], "succeeded");
    let one = d.wait_run(run_a);
    assert_eq!(
        one["status"], "succeeded",
        "A's change still builds: {one:#}"
    );
    assert!(d.run_log(run_a).contains("built refs/heads/feature"));
    let two = d.wait_run(run_b);
    assert_eq!(two["status"], "skipped", "{two:#}");
}

#[test]
fn a_run_that_supersedes_a_running_src_change_builds_it_though_its_own_push_is_docs_only() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sleeps = Sleeps::new();
    let (d, base) = src_only(
        b,
        &origin,
        "concurrency: { group: ref, cancel: running }\n",
        hang_step(&sleeps.dir()),
    );
    let a = commit_paths(
        &origin.path,
        "main",
        None,
        &[("src/lib.rs", "1"), ("mode", "hang")],
        "A",
    );
    let run_a = push(&d, "sup-run-a", "refs/heads/main", &base, &a);
    let pid = read_pid(&sleeps.dir().join(format!("{run_a}.pid")));
    let b_sha = commit_paths(
        &origin.path,
        "main",
        None,
        &[("docs/guide.md", "g"), ("mode", "fast")],
        "B",
    );
    let run_b = push(&d, "sup-run-b", "refs/heads/main", &a, &b_sha);

    let one = d.wait_run(run_a);
    assert_eq!(one["status"], "canceled", "{one:#}");
    assert_eq!(reason(&one), format!("superseded by run {run_b}"));
    eventually("the canceled step's background sleep is gone", || {
        process_gone(pid)
    });
    let two = d.wait_run(run_b);
    assert_eq!(
        two["status"], "succeeded",
        "B stands for A's src change: {two:#}"
    );
    assert_eq!(two["before"], base.as_str(), "{two:#}");
    assert!(
        d.run_log(run_b).contains(&format!("done with {b_sha}")),
        "B's step ran: {}",
        d.run_log(run_b)
    );
}
