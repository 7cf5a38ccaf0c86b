//! `if: failure` and `if: always` steps after a timeout or a cancel: they still run,
//! each on its own time, and the run keeps the status of what cut it short. A stop of
//! the daemon runs none, and stops one already running.

use super::*;

/// A step that runs only `when` (`failure` or `always`), with an optional `timeout`.
fn step_if(name: &str, when: &str, timeout: Option<&str>, script: &str) -> String {
    let timeout = timeout
        .map(|t| format!("    timeout: {t}\n"))
        .unwrap_or_default();
    format!("{}    if: {when}\n{timeout}", step(name, script))
}

/// A script that waits on a background `sleep 600`, its pid in `PIDS/RUN-STEP.pid`.
fn sleeper(pids: &Path) -> String {
    format!(
        "sleep 600 &\necho $! > {}/$HOOKCI_RUN_ID-$HOOKCI_STEP.pid\nwait",
        pids.display()
    )
}

fn statuses(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn an_always_step_runs_after_a_pipeline_timeout() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let sleeps = Sleeps::new();
    let steps = [
        step("work", &sleeper(&sleeps.dir())),
        step_if(
            "cleanup",
            "always",
            None,
            "echo cleanup sees $HOOKCI_RESULT",
        ),
        step("deploy", "echo this step must not run"),
    ];
    let d = b
        .pipeline("ci", &pipeline(&origin, "timeout: 2s\n", &steps))
        .start();
    let id = push(&d, "pipeline-timeout", "refs/heads/main", ZERO, &sha);
    let run = d.wait_run(id);
    assert_eq!(run["status"], "timed_out", "{run:#}");
    assert!(
        reason(&run).contains("pipeline timed out after 2s"),
        "{run:#}"
    );
    assert_eq!(
        statuses(&run),
        ["timed_out", "succeeded", "skipped"],
        "{run:#}"
    );
    let log = d.run_log(id);
    assert!(log.contains("cleanup sees failure"), "{log}");
    assert!(!log.contains("must not run"), "{log}");
}

#[test]
fn cleanup_steps_after_a_step_timeout_get_their_own_time_not_what_is_left_of_the_pipelines() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let sleeps = Sleeps::new();
    let work = format!("{}    timeout: 1s\n", step("work", &sleeper(&sleeps.dir())));
    let steps = [
        work,
        // Longer than what the pipeline has left after the step timed out (2 s).
        step_if(
            "cleanup",
            "always",
            None,
            "sleep 3\necho cleanup finished with $HOOKCI_RESULT",
        ),
        // Its own timeout still holds.
        step_if("report", "failure", Some("1s"), &sleeper(&sleeps.dir())),
    ];
    let d = b
        .pipeline("ci", &pipeline(&origin, "timeout: 3s\n", &steps))
        .start();
    let id = push(&d, "step-timeout", "refs/heads/main", ZERO, &sha);
    let run = d.wait_run(id);
    assert_eq!(run["status"], "timed_out", "{run:#}");
    assert_eq!(
        reason(&run),
        "step \"work\" timed out after 1s",
        "what happened first: {run:#}"
    );
    assert_eq!(
        statuses(&run),
        ["timed_out", "succeeded", "timed_out"],
        "{run:#}"
    );
    assert_eq!(
        run["steps"][2]["reason"], "step \"report\" timed out after 1s",
        "{run:#}"
    );
    let log = d.run_log(id);
    assert!(log.contains("cleanup finished with failure"), "{log}");
}

#[test]
fn failure_and_always_steps_run_after_a_cancel_through_the_api() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let sleeps = Sleeps::new();
    let config = token_config(&b);
    let steps = [
        step("work", &sleeper(&sleeps.dir())),
        step_if(
            "on failure",
            "failure",
            None,
            "echo failure step sees $HOOKCI_RESULT",
        ),
        step_if(
            "always",
            "always",
            None,
            "echo always step sees $HOOKCI_RESULT",
        ),
        step("deploy", "echo this step must not run"),
    ];
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &steps))
        .config(&config)
        .start();
    let id = push(&d, "cancel", "refs/heads/main", ZERO, &sha);
    let pid = read_pid(&sleeps.dir().join(format!("{id}-work.pid")));
    let r = api_post(
        &d,
        &format!("/api/runs/{id}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let run = d.wait_run(id);
    assert_eq!(run["status"], "canceled", "{run:#}");
    assert_eq!(reason(&run), "canceled through the API");
    assert_eq!(
        statuses(&run),
        ["canceled", "succeeded", "succeeded", "skipped"],
        "{run:#}"
    );
    assert!(process_gone(pid), "the canceled step's group is gone first");
    let log = d.run_log(id);
    assert!(log.contains("failure step sees failure"), "{log}");
    assert!(log.contains("always step sees failure"), "{log}");
    assert!(!log.contains("must not run"), "{log}");
}

#[test]
fn a_stop_runs_no_cleanup_step_and_stops_one_a_cancel_started() {
    let b = Builder::new().config("shutdown_grace: 1s");
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let sleeps = Sleeps::new();
    let config = token_config(&b);
    let cleanups = b.path().join("cleanups");
    let afters = b.path().join("afters");
    let steps = [
        step("work", &sleeper(&sleeps.dir())),
        step_if(
            "cleanup",
            "always",
            None,
            &format!(
                "echo $HOOKCI_RUN_ID >> {}\n{}",
                cleanups.display(),
                sleeper(&sleeps.dir())
            ),
        ),
        step_if(
            "after",
            "always",
            None,
            &format!("echo $HOOKCI_RUN_ID >> {}", afters.display()),
        ),
    ];
    let mut d = b
        .pipeline("ci", &pipeline(&origin, "", &steps))
        .config(&config)
        .start();
    let id = push(&d, "stop", "refs/heads/main", ZERO, &sha);
    let work_pid = sleeps.dir().join(format!("{id}-work.pid"));
    let first = read_pid(&work_pid);

    // A stop while the run's first step runs: no cleanup step starts.
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    assert!(process_gone(first));
    assert!(
        !cleanups.exists() && !afters.exists(),
        "a stop runs no cleanup step"
    );

    // Queued again at the start; canceled there, its cleanup step starts, and a stop
    // then stops it and starts nothing more.
    d.spawn();
    let mut second = first;
    eventually("attempt 2 runs its first step", || {
        second = std::fs::read_to_string(&work_pid)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(first);
        second != first
    });
    let r = api_post(
        &d,
        &format!("/api/runs/{id}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let cleanup = read_pid(&sleeps.dir().join(format!("{id}-cleanup.pid")));
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    assert!(process_gone(cleanup), "the stop killed the cleanup step");
    assert!(!afters.exists(), "no cleanup step starts after a stop");

    d.spawn();
    let run = run_of(&d, id);
    assert_eq!(
        (run["status"].as_str(), run["attempt"].as_i64()),
        (Some("canceled"), Some(2)),
        "the cancel came first, and the run is not queued again: {run:#}"
    );
    assert_eq!(
        statuses(&run),
        ["canceled", "interrupted", "skipped"],
        "{run:#}"
    );
}
