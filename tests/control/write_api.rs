//! The write API (cancel, rerun, trigger), its token, and the matching commands.

use super::*;

#[test]
fn the_write_api_is_off_without_a_token_and_needs_the_right_bearer_token() {
    // No token configured: every write call is refused.
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("ok", "true")]))
        .env("HOOKCI_API_TOKEN", "")
        .start();
    let id = push(&d, "no-token", "refs/heads/main", ZERO, &sha);
    d.wait_run(id);
    for token in [None, Some(TOKEN)] {
        assert_json_error(
            &api_post(&d, &format!("/api/runs/{id}/cancel"), token, &json!({})),
            403,
            "write API without a configured token",
        );
    }
    drop(d);

    // A token: missing, wrong or malformed credentials are 401 and change nothing.
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let config = token_config(&b);
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("ok", "true")]))
        .config(&config)
        .start();
    let id = push(&d, "with-token", "refs/heads/main", ZERO, &sha);
    assert_eq!(d.wait_run(id)["status"], "succeeded");
    let rerun = format!("/api/runs/{id}/rerun");
    assert_json_error(
        &api_post(&d, &rerun, None, &json!({})),
        401,
        "no Authorization",
    );
    assert_json_error(
        &api_post(&d, &rerun, Some("not-the-token"), &json!({})),
        401,
        "wrong token",
    );
    assert_json_error(
        &api_post(&d, &rerun, Some(&TOKEN[..TOKEN.len() - 1]), &json!({})),
        401,
        "a prefix of the token",
    );
    for header in [
        TOKEN.to_owned(),
        format!("Basic {TOKEN}"),
        format!("Bearer {TOKEN}x"),
    ] {
        let r = d.post(
            &rerun,
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &header),
            ],
            b"{}",
        );
        assert_json_error(&r, 401, &format!("Authorization: {header}"));
    }
    assert_eq!(d.runs().len(), 1, "refused calls create nothing");

    let r = api_post(&d, &rerun, Some(TOKEN), &json!({}));
    assert_eq!(r.status, 201, "the right token works: {}", r.text());
    let new = r.json()["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(new)["status"], "succeeded");
    assert!(
        !d.log().contains(TOKEN),
        "the API token must never be logged:\n{}",
        d.log()
    );
}

#[test]
fn cancel_stops_a_running_step_and_a_queued_run_and_refuses_a_finished_one() {
    let b = Builder::new().config("max_parallel_runs: 1");
    let origin = Origin::new(b.path());
    let sleeps = Sleeps::new();
    let pids = sleeps.dir();
    let config = token_config(&b);
    let d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "on:\n  branches: [\"**\"]\n", &[hang_step(&pids)]),
        )
        .config(&config)
        .start();
    // Different branches, so no concurrency group cancels anything by itself.
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let sha = origin.commit(name, &[("mode", "hang")], name);
        ids.push((
            push(
                &d,
                &format!("cancel-{name}"),
                &format!("refs/heads/{name}"),
                ZERO,
                &sha,
            ),
            sha,
        ));
    }
    let (running, queued, by_cli) = (ids[0].0, ids[1].0, ids[2].0);
    let pid = read_pid(&pids.join(format!("{running}.pid")));
    assert_eq!(run_of(&d, queued)["status"], "queued");

    // A queued run ends without ever starting.
    let r = api_post(
        &d,
        &format!("/api/runs/{queued}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["id"], queued);
    let run = d.wait_run(queued);
    assert_eq!(run["status"], "canceled", "{run:#}");
    assert_eq!(reason(&run), "canceled through the API");

    // A running one: its step's whole process group goes.
    let r = api_post(
        &d,
        &format!("/api/runs/{running}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let run = d.wait_run(running);
    assert_eq!(run["status"], "canceled", "{run:#}");
    assert_eq!(reason(&run), "canceled through the API");
    assert_eq!(run["steps"][0]["status"], "canceled", "{run:#}");
    eventually("the canceled step's background sleep is gone", || {
        process_gone(pid)
    });

    // The CLI, with the token from its environment.
    let cli_pid = read_pid(&pids.join(format!("{by_cli}.pid")));
    let out = run_cli(
        &["cancel", &by_cli.to_string(), "--url", &d.url("")],
        Some(TOKEN),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(&format!("run {by_cli}")),
        "{}",
        text(&out.stdout)
    );
    let run = d.wait_run(by_cli);
    assert_eq!(run["status"], "canceled", "{run:#}");
    eventually("the CLI-canceled step's background sleep is gone", || {
        process_gone(cli_pid)
    });

    // The queued run never started, even after the runs before it ended.
    let run = run_of(&d, queued);
    assert_eq!(run["status"], "canceled");
    assert_never_started(&run);
    assert!(!pids.join(format!("{queued}.pid")).exists());

    // A finished run cannot be canceled.
    assert_json_error(
        &api_post(
            &d,
            &format!("/api/runs/{running}/cancel"),
            Some(TOKEN),
            &json!({}),
        ),
        409,
        "cancel of a finished run",
    );
    let out = run_cli(
        &["cancel", &running.to_string(), "--url", &d.url("")],
        Some(TOKEN),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_json_error(
        &api_post(&d, "/api/runs/9999/cancel", Some(TOKEN), &json!({})),
        404,
        "cancel of an unknown run",
    );
}

#[test]
fn rerun_builds_the_same_commit_again_despite_the_per_commit_lock() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let config = token_config(&b);
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "",
                &[step("show", "echo run $HOOKCI_RUN_ID at $HOOKCI_COMMIT")],
            ),
        )
        .config(&config)
        .start();
    let id = push(&d, "rerun-1", "refs/heads/main", ZERO, &sha);
    let old = d.wait_run(id);
    assert_eq!(old["status"], "succeeded");

    let r = api_post(
        &d,
        &format!("/api/runs/{id}/rerun"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let made = r.json();
    let new = made["id"].as_i64().unwrap();
    assert_ne!(new, id);
    assert_eq!(made["trigger"], "rerun");
    assert_eq!(made["attempt"], 1, "a rerun is a run of its own: {made:#}");
    assert_eq!(made["generation"], old["generation"].as_i64().unwrap() + 1);
    let run = d.wait_run(new);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["trigger"], "rerun");
    assert_eq!(run["commit"], sha.as_str());
    assert_eq!(run["ref"], "refs/heads/main");
    assert!(
        d.run_log(new).contains(&format!("run {new} at {sha}")),
        "the steps ran again: {}",
        d.run_log(new)
    );

    // The CLI: a rerun of the rerun.
    let out = run_cli(
        &["rerun", &new.to_string(), "--url", &d.url("")],
        Some(TOKEN),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let runs = d.runs();
    assert_eq!(runs.len(), 3, "{runs:#?}");
    let third = runs
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .max()
        .unwrap();
    assert!(
        text(&out.stdout).contains(&format!("run {third}")),
        "{}",
        text(&out.stdout)
    );
    let run = d.wait_run(third);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["trigger"], "rerun");
    assert_eq!(
        run["generation"],
        run_of(&d, new)["generation"].as_i64().unwrap() + 1
    );
    assert_eq!(run["commit"], sha.as_str());

    assert_json_error(
        &api_post(&d, "/api/runs/9999/rerun", Some(TOKEN), &json!({})),
        404,
        "rerun of an unknown run",
    );
}

#[test]
fn a_rerun_interrupted_by_a_crash_is_queued_again_like_any_run() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let config = token_config(&b);
    let sleeps = Sleeps::new();
    let (hold, held) = (b.path().join("hold"), b.path().join("held"));
    // Once `hold` exists, a run's first attempt hangs (until the crash); later ones end.
    let script = format!(
        "if [ -f {hold} ] && [ ! -f {held}-$HOOKCI_RUN_ID ]; then\n  touch {held}-$HOOKCI_RUN_ID\n  \
         sleep 600 &\n  echo $! > {pids}/$HOOKCI_RUN_ID.pid\n  wait\nfi\necho done in run $HOOKCI_RUN_ID",
        hold = hold.display(),
        held = held.display(),
        pids = sleeps.dir().display(),
    );
    let mut d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("work", &script)]))
        .config(&config)
        .start();
    let id = push(&d, "rerun-crash", "refs/heads/main", ZERO, &sha);
    assert_eq!(d.wait_run(id)["status"], "succeeded");

    std::fs::write(&hold, "").unwrap();
    let r = api_post(
        &d,
        &format!("/api/runs/{id}/rerun"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let rerun = r.json()["id"].as_i64().unwrap();
    let pid = read_pid(&sleeps.dir().join(format!("{rerun}.pid")));
    d.signal(libc::SIGKILL);
    d.wait();
    d.spawn();

    let run = d.wait_run(rerun);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["trigger"], "rerun");
    assert_eq!(
        (&run["attempt"], &run["generation"]),
        (&json!(2), &json!(2))
    );
    assert!(
        d.run_log(rerun).contains(&format!("done in run {rerun}")),
        "{}",
        d.run_log(rerun)
    );
    let cut = d.get(&format!("/api/runs/{rerun}/log?attempt=1")).text();
    assert!(cut.contains("(interrupted)"), "{cut}");
    eventually("the cut attempt's background sleep is gone", || {
        process_gone(pid)
    });
}

#[test]
fn trigger_runs_a_pipeline_on_a_ref_head_or_a_given_commit() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let older = origin.commit("main", &[("a", "1")], "older");
    let head = origin.commit("main", &[("a", "2")], "head");
    let config = token_config(&b);
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "",
                &[step("show", "echo at $HOOKCI_COMMIT; cat a")],
            ),
        )
        .config(&config)
        .start();
    let trigger = |name: &str, body: Value| {
        api_post(
            &d,
            &format!("/api/pipelines/{name}/trigger"),
            Some(TOKEN),
            &body,
        )
    };

    let r = trigger("ci", json!({ "ref": "main" }));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["trigger"], "manual");
    assert_eq!(run["commit"], head.as_str(), "the ref's current head");
    assert_eq!(run["ref"], "refs/heads/main");
    assert!(d.run_log(id).contains(&format!("at {head}")));

    let r = trigger("ci", json!({ "ref": "main", "sha": older }));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["commit"], older.as_str());
    assert!(d.run_log(id).contains(&format!("at {older}")));

    assert_json_error(
        &trigger("nope", json!({ "ref": "main" })),
        404,
        "unknown pipeline",
    );
    assert_json_error(
        &trigger("ci", json!({ "ref": "no-such-branch" })),
        404,
        "unknown ref",
    );
    assert_json_error(
        &trigger("ci", json!({ "ref": "main", "sha": "xyz" })),
        400,
        "bad sha",
    );
    assert_json_error(&trigger("ci", json!({ "sha": head })), 400, "no ref");
    assert_eq!(d.runs().len(), 2, "refused triggers create nothing");

    let out = run_cli(
        &["trigger", "ci", "--ref", "main", "--url", &d.url("")],
        Some(TOKEN),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains(&head), "{}", text(&out.stdout));
    let newest = d.runs()[0]["id"].as_i64().unwrap();
    let run = d.wait_run(newest);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["trigger"], "manual");
    assert_eq!(run["commit"], head.as_str());
}

#[test]
fn trigger_finds_the_clone_url_of_a_push_that_spelled_the_repository_in_another_case() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let first = origin.commit("main", &[("a", "1")], "first");
    let config = token_config(&b);
    // No clone_url: the trigger needs the one the last push named.
    let d = b
        .pipeline(
            "ci",
            &format!(
                "repo: {REPO}\nsteps:\n{}",
                step("show", "echo at $HOOKCI_COMMIT")
            ),
        )
        .config(&config)
        .start();
    // GitHub owner and repository names are case-insensitive.
    let shouted = REPO.to_ascii_uppercase();
    let body = PushPayload::new(&shouted, "refs/heads/main", ZERO, &first, &origin.url()).bytes();
    let r = d.deliver("push", "case-1", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(id)["status"], "succeeded");

    let head = origin.commit("main", &[("a", "2")], "head");
    let r = api_post(
        &d,
        "/api/pipelines/ci/trigger",
        Some(TOKEN),
        &json!({ "ref": "main" }),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["commit"], head.as_str());
}
