//! Retention (runs, and deliveries with their decisions) and listing runs
//! (`hookci runs`, paging with `before`).

use super::*;

#[test]
fn retention_keeps_only_the_newest_runs_and_their_logs() {
    let b = Builder::new().config("retention: { runs: 2, days: 30 }");
    let origin = Origin::new(b.path());
    let d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[step("say", "echo run $HOOKCI_RUN_ID")]),
        )
        .start();
    let mut before = ZERO.to_owned();
    let mut ids = Vec::new();
    for i in 0..4 {
        let sha = origin.commit("main", &[("n", &i.to_string())], "x");
        let id = push(&d, &format!("keep-{i}"), "refs/heads/main", &before, &sha);
        assert_eq!(d.wait_run(id)["status"], "succeeded");
        ids.push(id);
        before = sha;
    }
    let listed = || -> Vec<i64> {
        let mut l: Vec<i64> = d.runs().iter().map(|r| r["id"].as_i64().unwrap()).collect();
        l.sort_unstable();
        l
    };
    eventually("only the newest 2 runs are listed", || listed() == ids[2..]);
    for old in &ids[..2] {
        let dir = d.state_dir().join(format!("logs/{old}"));
        eventually(&format!("{} is removed", dir.display()), || !dir.exists());
        assert_eq!(d.get(&format!("/api/runs/{old}")).status, 404);
    }
    for kept in &ids[2..] {
        assert!(
            d.state_dir().join(format!("logs/{kept}/1.log")).exists(),
            "run {kept}'s log is kept"
        );
        assert!(d.run_log(*kept).contains(&format!("run {kept}")));
    }
}

/// How many rows `table` of the daemon's store holds.
fn rows(d: &Daemon, table: &str) -> i64 {
    let db = rusqlite::Connection::open(d.state_dir().join("hookci.db")).unwrap();
    db.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

fn sorted_run_ids(d: &Daemon) -> Vec<i64> {
    let mut ids: Vec<i64> = d.runs().iter().map(|r| r["id"].as_i64().unwrap()).collect();
    ids.sort_unstable();
    ids
}

#[test]
fn retention_keeps_exactly_the_newest_finished_runs_when_duplicates_leave_id_gaps() {
    let b = Builder::new().config("retention: { runs: 5 }");
    let origin = Origin::new(b.path());
    let d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[step("say", "echo run $HOOKCI_RUN_ID")]),
        )
        .start();
    let mut before = ZERO.to_owned();
    let mut ids = Vec::new();
    for i in 0..8 {
        let sha = origin.commit("main", &[("n", &i.to_string())], "x");
        let body = push_body("refs/heads/main", &before, &sha, "change");
        let id = push(
            &d,
            &format!("org-hook-{i}"),
            "refs/heads/main",
            &before,
            &sha,
        );
        // The same push from a second hook (another delivery id): the lock refuses a
        // second run, and the refused insert uses a run id up.
        let r = d.deliver("push", &format!("repo-hook-{i}"), &body);
        assert_eq!(r.json()["runs"][0]["id"], id, "{}", r.text());
        assert_eq!(r.json()["runs"][0]["existing"], true, "{}", r.text());
        assert_eq!(d.wait_run(id)["status"], "succeeded");
        ids.push(id);
        before = sha;
    }
    assert!(
        ids.windows(2).all(|w| w[1] > w[0] + 1),
        "ids have gaps: {ids:?}"
    );
    eventually("exactly the newest 5 runs are kept", || {
        sorted_run_ids(&d) == ids[3..]
    });
    assert_eq!(rows(&d, "runs"), 5);
    for old in &ids[..3] {
        let dir = d.state_dir().join(format!("logs/{old}"));
        eventually(&format!("{} is removed", dir.display()), || !dir.exists());
    }
    for kept in &ids[3..] {
        assert!(d.run_log(*kept).contains(&format!("run {kept}")));
    }
}

#[test]
fn retention_bounds_deliveries_and_decisions_on_its_timer_without_any_run_ending() {
    let b = Builder::new().config("retention: { runs: 3, interval: 1s }");
    let origin = Origin::new(b.path());
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("never", "exit 1")]))
        .start();
    // Nothing here executes: skipped runs end as they are made, and pushes to a
    // repository no pipeline watches make none. Only the timer prunes.
    let mut skipped = Vec::new();
    for i in 1..=5 {
        let body = push_body("refs/heads/main", ZERO, &format!("{i:040x}"), "[skip ci]");
        let runs = push_runs(&d, &format!("skip-{i}"), &body);
        skipped.push(runs[0].1);
    }
    for i in 1..=6 {
        let body = PushPayload::new(
            "nobody/watches",
            "refs/heads/main",
            ZERO,
            &format!("{:040x}", 100 + i),
            "https://example.invalid/nobody.git",
        )
        .bytes();
        let r = d.deliver("push", &format!("unwatched-{i}"), &body);
        assert_eq!(r.status, 202, "{}", r.text());
    }
    eventually("only the newest 3 finished runs are kept", || {
        sorted_run_ids(&d) == skipped[2..]
    });
    // The newest 3 deliveries, and those the kept runs came from.
    let kept = [
        "skip-3",
        "skip-4",
        "skip-5",
        "unwatched-4",
        "unwatched-5",
        "unwatched-6",
    ];
    eventually("old deliveries are pruned", || rows(&d, "deliveries") == 6);
    for id in (1..=5)
        .map(|i| format!("skip-{i}"))
        .chain((1..=6).map(|i| format!("unwatched-{i}")))
    {
        let status = d.get(&format!("/api/deliveries/{id}")).status;
        let expected = if kept.contains(&id.as_str()) {
            200
        } else {
            404
        };
        assert_eq!(status, expected, "delivery {id}");
    }
    // One decision each: the one pipeline of the repository, or the one saying none.
    assert_eq!(rows(&d, "decisions"), 6);
}

#[test]
fn decisions_name_only_the_pipelines_of_the_pushed_repository() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("ok", "true")]))
        .pipeline(
            "lint",
            &pipeline(
                &origin,
                "on:\n  branches: [release]\n",
                &[step("ok", "true")],
            ),
        )
        .pipeline(
            "elsewhere",
            &format!(
                "repo: someone/else\nclone_url: {}\nsteps:\n{}",
                origin.url(),
                step("ok", "true")
            ),
        )
        .start();
    let sha = origin.commit("main", &[("a", "1")], "x");
    push(&d, "ours", "refs/heads/main", ZERO, &sha);
    let why = d.get_json("/api/deliveries/ours");
    let mut named: Vec<&str> = why["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["pipeline"].as_str().unwrap())
        .collect();
    named.sort_unstable();
    assert_eq!(named, ["ci", "lint"], "{why:#}");

    let body = PushPayload::new(
        "nobody/watches",
        "refs/heads/main",
        ZERO,
        &sha,
        "https://example.invalid/nobody.git",
    )
    .bytes();
    let r = d.deliver("push", "theirs", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["runs"], json!([]));
    let why = d.get_json("/api/deliveries/theirs");
    let decisions = why["decisions"].as_array().unwrap();
    assert_eq!(
        decisions.len(),
        1,
        "one row says no pipeline watches it: {why:#}"
    );
    let only = &decisions[0];
    assert!(only["pipeline"].is_null(), "{only}");
    assert!(only["run"].is_null(), "{only}");
    assert_eq!(only["outcome"], "not_triggered");
    let reason = only["reason"].as_str().unwrap();
    assert!(
        reason.contains("no pipeline watches") && reason.contains("nobody/watches"),
        "{reason}"
    );

    let out = run_cli(&["why", "theirs", "--url", &d.url("")], None);
    let printed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{printed}{}", text(&out.stderr));
    assert!(printed.contains(reason), "{printed}");
    assert_eq!(
        printed.lines().count(),
        2,
        "the delivery and its one decision:\n{printed}"
    );
}

#[test]
fn hookci_runs_lists_every_run_with_its_status() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "on:\n  branches: [\"**\"]\n",
                &[step("check", "[ \"$(cat result)\" = ok ]")],
            ),
        )
        .start();
    let good = origin.commit("good", &[("result", "ok")], "x");
    let bad = origin.commit("bad", &[("result", "broken")], "y");
    let ok = push(&d, "list-ok", "refs/heads/good", ZERO, &good);
    let failed = push(&d, "list-bad", "refs/heads/bad", ZERO, &bad);
    assert_eq!(d.wait_run(ok)["status"], "succeeded");
    assert_eq!(d.wait_run(failed)["status"], "failed");

    let out = run_cli(&["runs", "--url", &d.url("")], None);
    let printed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{printed}{}", text(&out.stderr));
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 3, "a header and one line a run:\n{printed}");
    assert!(
        lines[0].contains("RUN") && lines[0].contains("STATUS"),
        "{printed}"
    );
    for (id, status, branch) in [(ok, "succeeded", "good"), (failed, "failed", "bad")] {
        let line = lines[1..]
            .iter()
            .find(|l| l.split_whitespace().next() == Some(id.to_string().as_str()))
            .unwrap_or_else(|| panic!("run {id} in\n{printed}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.contains(&status), "{line}");
        assert!(fields.contains(&"ci") && fields.contains(&branch), "{line}");
    }
}

/// The ids of a `GET /api/runs` answer, in its order.
fn listed_ids(page: &Value) -> Vec<i64> {
    page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn before_pages_through_every_run_without_gap_or_repeat() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "",
                &[step("never", "echo skipped runs run nothing")],
            ),
        )
        .start();
    // Skipped runs (skip token) cost no checkout: thirty of them in a moment.
    let mut newest_first = Vec::new();
    for i in 1..=30 {
        let body = push_body(
            "refs/heads/main",
            ZERO,
            &format!("{i:040x}"),
            "docs [skip ci]",
        );
        let runs = push_runs(&d, &format!("page-{i}"), &body);
        assert_eq!(runs.len(), 1, "{runs:?}");
        newest_first.insert(0, runs[0].1);
    }

    let mut pages: Vec<Vec<i64>> = Vec::new();
    let mut path = "/api/runs?limit=3".to_owned();
    loop {
        let page = d.get_json(&path);
        let ids = listed_ids(&page);
        if let Some(before) = path.split("before=").nth(1) {
            let before: i64 = before.parse().unwrap();
            assert!(ids.iter().all(|id| *id < before), "{path}: {ids:?}");
        }
        pages.push(ids.clone());
        assert!(pages.len() <= 10, "more pages than runs: {pages:?}");
        match page["next_before"].as_i64() {
            Some(next) => {
                assert_eq!(Some(&next), ids.last(), "{page:#}");
                path = format!("/api/runs?limit=3&before={next}");
            }
            None => break,
        }
    }
    assert_eq!(pages.len(), 10, "{pages:?}");
    assert!(pages.iter().all(|p| p.len() == 3), "{pages:?}");
    assert_eq!(
        pages.concat(),
        newest_first,
        "no gap, no repeat, newest first"
    );

    // `before` combines with the filters, and pages past the oldest run are empty.
    let filtered = d.get_json(&format!(
        "/api/runs?pipeline=ci&status=skipped&limit=3&before={}",
        newest_first[2]
    ));
    assert_eq!(listed_ids(&filtered), newest_first[3..6].to_vec());
    let past = d.get_json(&format!("/api/runs?before={}", newest_first[29]));
    assert_eq!(listed_ids(&past), Vec::<i64>::new());
    assert!(past["next_before"].is_null(), "{past:#}");

    // `hookci runs --before`: the page below a run, and how to list the next one.
    let url = d.url("");
    let before = newest_first[3].to_string();
    let out = run_cli(
        &["runs", "--url", &url, "--limit", "3", "--before", &before],
        None,
    );
    let printed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{printed}{}", text(&out.stderr));
    let shown: Vec<i64> = printed
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(shown, newest_first[4..7].to_vec(), "{printed}");
    assert!(
        text(&out.stderr).contains(&format!("--before {}", newest_first[6])),
        "{}",
        text(&out.stderr)
    );
    let before = newest_first[27].to_string();
    let out = run_cli(
        &["runs", "--url", &url, "--limit", "3", "--before", &before],
        None,
    );
    assert_eq!(
        text(&out.stdout).lines().count(),
        3,
        "{}",
        text(&out.stdout)
    );
    assert!(
        !text(&out.stderr).contains("--before"),
        "the last page names no next one: {}",
        text(&out.stderr)
    );
}
