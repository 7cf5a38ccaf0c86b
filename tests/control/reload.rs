//! Reload without a restart: a pipeline file added while the daemon runs is matched by
//! the next push; a broken edit plus SIGHUP keeps the old pipelines and logs each
//! problem with its place; a run in progress finishes with the pipeline it started
//! with; `POST /api/reload` and `hookci reload` answer what changed or what is wrong,
//! and new tokens take effect while restart-only settings are reported.

use super::*;

const RELOADED: &str = "reloaded config and pipelines";
const FAILED: &str = "reload failed: the running config and pipelines stay in force";

fn count(d: &Daemon, what: &str) -> usize {
    d.log().matches(what).count()
}

/// How often `what` is in the log once it has stayed the same for a while: longer than
/// the watcher's debounce and a reload take, so no reload it would make is still to come.
fn settled(d: &Daemon, what: &str) -> usize {
    let quiet = Duration::from_secs(2);
    let mut last = count(d, what);
    let mut since = Instant::now();
    eventually_within(
        Duration::from_secs(30),
        &format!("{what:?} settles"),
        || {
            let now = count(d, what);
            if now != last {
                (last, since) = (now, Instant::now());
            }
            since.elapsed() >= quiet
        },
    );
    last
}

/// The names of a run's steps.
fn step_names(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

fn pipelines_of(runs: &[(String, i64)]) -> Vec<&str> {
    let mut names: Vec<&str> = runs.iter().map(|(p, _)| p.as_str()).collect();
    names.sort_unstable();
    names
}

#[test]
fn a_pipeline_file_added_while_the_daemon_runs_is_matched_by_the_next_push() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let first = origin.commit("main", &[("a", "1")], "x");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("test", "true")]))
        .start();
    let runs = push_runs(
        &d,
        "add-1",
        &push_body("refs/heads/main", ZERO, &first, "x"),
    );
    assert_eq!(pipelines_of(&runs), ["ci"]);

    // Written the way editors save: a temporary file, renamed into place.
    let dir = d.path().join("pipelines");
    let temp = dir.join(".deploy.yml.tmp");
    std::fs::write(
        &temp,
        pipeline(&origin, "", &[step("ship", "echo shipped")]),
    )
    .unwrap();
    std::fs::rename(&temp, dir.join("deploy.yml")).unwrap();
    eventually("the watcher reloads", || count(&d, RELOADED) == 1);

    let second = origin.commit("main", &[("a", "2")], "x");
    let runs = push_runs(
        &d,
        "add-2",
        &push_body("refs/heads/main", &first, &second, "x"),
    );
    assert_eq!(pipelines_of(&runs), ["ci", "deploy"], "{}", d.log());
    let deploy = runs.iter().find(|(p, _)| p == "deploy").unwrap().1;
    assert_eq!(d.wait_run(deploy)["status"], "succeeded");
    assert!(d.run_log(deploy).contains("shipped"));

    // A removed file is gone from the next push's pipelines too.
    std::fs::remove_file(dir.join("deploy.yml")).unwrap();
    eventually("the watcher reloads again", || count(&d, RELOADED) == 2);
    let third = origin.commit("main", &[("a", "3")], "x");
    let runs = push_runs(
        &d,
        "add-3",
        &push_body("refs/heads/main", &second, &third, "x"),
    );
    assert_eq!(pipelines_of(&runs), ["ci"]);
}

#[test]
fn a_broken_edit_and_a_sighup_keep_the_old_pipelines_and_log_each_place() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let token = token_config(&b);
    let mut d = b
        .config("watch_pipelines: false")
        .config(&token)
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[step("old", "echo old pipeline")]),
        )
        .start();

    let file = d.path().join("pipelines").join("ci.yml");
    let good = std::fs::read_to_string(&file).unwrap();
    // An unknown key on line 3, and a second broken file beside it.
    let broken = good.replacen("steps:", "stepz: []\nsteps:", 1);
    std::fs::write(&file, &broken).unwrap();
    std::fs::write(
        d.path().join("pipelines").join("other.yml"),
        format!("repo: {REPO}\non:\n  branches: [\"x[[\"]\nsteps: []\n"),
    )
    .unwrap();
    let line = broken.lines().position(|l| l == "stepz: []").unwrap() + 1;
    d.signal(libc::SIGHUP);
    eventually("the reload fails", || count(&d, FAILED) == 1);
    let log = d.log();
    let place = format!("{}:{line}:1: unknown field `stepz`", file.display());
    assert!(log.contains(&place), "{place} in:\n{log}");
    assert!(
        log.contains(&format!(
            "{}:",
            d.path().join("pipelines").join("other.yml").display()
        )),
        "{log}"
    );
    assert_eq!(count(&d, RELOADED), 0);

    // The daemon lives on with the old pipeline.
    assert_eq!(d.get("/healthz").status, 200);
    let id = push(&d, "broken-1", "refs/heads/main", ZERO, &sha);
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step_names(&run), ["old"]);

    // The API and the command say so too, with every problem.
    let r = api_post(&d, "/api/reload", Some(TOKEN), &json!({}));
    assert_json_error(&r, 422, "a failed reload");
    let problems: Vec<String> = r.json()["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems.iter().any(|p| p.starts_with(&place)),
        "{problems:?}"
    );
    let out = run_cli(&["reload", "--url", &d.url("")], Some(TOKEN));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(&place), "{}", text(&out.stderr));

    // Fixed, the next reload applies.
    std::fs::remove_file(d.path().join("pipelines").join("other.yml")).unwrap();
    std::fs::write(&file, good.replace("old", "new")).unwrap();
    let out = run_cli(&["reload", "--url", &d.url("")], Some(TOKEN));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("reloaded: pipelines ci"));
    let next = origin.commit("main", &[("a", "2")], "x");
    let id = push(&d, "broken-2", "refs/heads/main", &sha, &next);
    assert_eq!(step_names(&d.wait_run(id)), ["new"]);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0), "{}", d.log());
}

#[test]
fn a_run_in_progress_during_a_reload_finishes_with_the_pipeline_it_started_with() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    let token = token_config(&b);
    let d = b
        .config("watch_pipelines: false")
        .config(&token)
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "",
                &[gated_step(&gate), step("old-last", "echo old last step")],
            ),
        )
        .start();
    let id = push(&d, "inflight-1", "refs/heads/main", ZERO, &sha);
    eventually("the gated step runs", || d.run_log(id).contains("first"));

    std::fs::write(
        d.path().join("pipelines").join("ci.yml"),
        pipeline(&origin, "", &[step("new-only", "echo new pipeline")]),
    )
    .unwrap();
    let r = api_post(&d, "/api/reload", Some(TOKEN), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["report"]["pipelines"], json!(["ci"]));

    std::fs::write(&gate, "go").unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step_names(&run), ["gated", "old-last"]);
    let log = d.run_log(id);
    assert!(
        log.contains("second") && log.contains("old last step"),
        "{log}"
    );

    let next = origin.commit("main", &[("a", "2")], "x");
    let second = push(&d, "inflight-2", "refs/heads/main", &sha, &next);
    let run = d.wait_run(second);
    assert_eq!(step_names(&run), ["new-only"], "{run:#}");
}

#[test]
fn a_reload_applies_new_tokens_and_secrets_and_reports_restart_only_settings() {
    let b = Builder::new();
    let token = token_config(&b);
    let d = b.config("watch_pipelines: false").config(&token).start();
    let before = std::fs::read_to_string(d.path().join("hookci.yml")).unwrap();
    let changed = before.replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:9");
    std::fs::write(d.path().join("hookci.yml"), changed).unwrap();
    std::fs::write(d.path().join("api-token"), "the-next-token\n").unwrap();
    assert_eq!(d.deliver("ping", "before-reload", b"{}").status, 200);
    std::fs::write(d.path().join("secret"), "the-next-secret\n").unwrap();

    let r = api_post(&d, "/api/reload", Some(TOKEN), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["report"]["restart_required"], json!(["listen"]));
    eventually("the restart-only change is logged", || {
        d.log()
            .contains("listen changed in the config: it takes effect at the next restart")
    });
    // Still served where it listened; the old token is refused, the new one works.
    let r = api_post(&d, "/api/reload", Some(TOKEN), &json!({}));
    assert_json_error(&r, 401, "the old token");
    let r = api_post(&d, "/api/reload", Some("the-next-token"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    // The webhook secret too: a delivery signed with the old one is refused.
    assert_eq!(d.deliver("ping", "after-reload", b"{}").status, 401);
}

#[test]
fn a_reload_that_raises_max_parallel_runs_starts_a_waiting_run_at_once() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    let token = token_config(&b);
    // Two pipelines: two concurrency groups, so only the permits hold one back.
    let d = b
        .config("watch_pipelines: false")
        .config("max_parallel_runs: 1")
        .config(&token)
        .pipeline("one", &pipeline(&origin, "", &[gated_step(&gate)]))
        .pipeline("two", &pipeline(&origin, "", &[gated_step(&gate)]))
        .start();
    let runs = push_runs(
        &d,
        "parallel-1",
        &push_body("refs/heads/main", ZERO, &sha, "x"),
    );
    assert_eq!(runs.len(), 2, "{runs:?}");
    let with_status = |status: &str| -> Vec<i64> {
        runs.iter()
            .map(|(_, id)| *id)
            .filter(|id| run_of(&d, *id)["status"] == status)
            .collect()
    };
    eventually("one run takes the only permit", || {
        with_status("running").len() == 1
    });
    let waiting = with_status("queued");
    assert_eq!(waiting.len(), 1, "{}", d.log());

    let config = d.path().join("hookci.yml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("max_parallel_runs: 1", "max_parallel_runs: 2");
    std::fs::write(&config, text).unwrap();
    let r = api_post(&d, "/api/reload", Some(TOKEN), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["report"]["restart_required"], json!([]));
    // The gate is still closed: the first run still holds its permit.
    wait_status(&d, waiting[0], "running");

    std::fs::write(&gate, "go").unwrap();
    for (_, id) in &runs {
        assert_eq!(d.wait_run(*id)["status"], "succeeded");
    }
}

#[test]
fn hookci_reload_local_waits_for_the_outcome_and_fails_with_the_reason() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    // No API token: the reload socket needs none.
    let d = b
        .config("watch_pipelines: false")
        .pipeline("ci", &pipeline(&origin, "", &[step("old", "true")]))
        .start();
    let state_dir = d.state_dir();
    let reload = || {
        cli(&["reload", "--local", "--state-dir"], None)
            .arg(&state_dir)
            .output()
            .unwrap()
    };
    let socket = state_dir.join("reload.sock");
    // Opened after the `listening` line the harness waits for, before READY=1.
    eventually("the reload socket is open", || {
        d.log().contains("hookci reload --local asks here")
    });
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A bad config: the daemon reads it, says why, and changes nothing.
    let config = d.path().join("hookci.yml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}max_parallel_runz: 3\n")).unwrap();
    let line = good.lines().count() + 1;
    let out = reload();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let place = format!(
        "{}:{line}:1: unknown field `max_parallel_runz`",
        config.display()
    );
    let err = text(&out.stderr);
    assert!(err.contains(&place), "{place} in:\n{err}");
    assert!(err.contains("reload failed: nothing changed"), "{err}");
    eventually("the daemon logs the failure", || count(&d, FAILED) == 1);

    // Fixed, the next one applies, and says what changed.
    std::fs::write(&config, &good).unwrap();
    std::fs::write(
        d.path().join("pipelines").join("deploy.yml"),
        pipeline(&origin, "", &[step("ship", "true")]),
    )
    .unwrap();
    let out = reload();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("reloaded: pipelines ci, deploy"), "{said}");
    assert!(said.contains("added: deploy"), "{said}");
    // The daemon's log is read on a thread of its own: its line may come a moment later.
    eventually("the daemon logs the reload", || count(&d, RELOADED) == 1);

    // No daemon there: an error naming the socket, not a hang.
    let out = cli(&["reload", "--local", "--state-dir"], None)
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("reload.sock"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_pipelines_directory_replaced_as_a_whole_is_watched_again() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let mut sha = origin.commit("main", &[("a", "0")], "x");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("test", "true")]))
        .start();
    let dir = d.path().join("pipelines");
    let yaml = |name: &str| pipeline(&origin, "", &[step(name, "true")]);
    let mut pushes = 0;
    let mut next_push = |d: &Daemon| {
        pushes += 1;
        let next = origin.commit("main", &[("a", &pushes.to_string())], "x");
        let runs = push_runs(
            d,
            &format!("replaced-{pushes}"),
            &push_body("refs/heads/main", &sha, &next, "x"),
        );
        sha = next;
        let mut names: Vec<String> = runs.into_iter().map(|(p, _)| p).collect();
        names.sort_unstable();
        names
    };

    // Set up after the `listening` line the harness waits for.
    eventually("the watch is set up", || {
        d.log().contains("watching the pipelines directory")
    });

    // A new directory renamed into place, as a deploy does it.
    let staged = d.path().join("pipelines.new");
    std::fs::create_dir(&staged).unwrap();
    std::fs::write(staged.join("ci.yml"), yaml("test")).unwrap();
    std::fs::write(staged.join("deploy.yml"), yaml("ship")).unwrap();
    std::fs::rename(&dir, d.path().join("pipelines.old")).unwrap();
    std::fs::rename(&staged, &dir).unwrap();
    eventually("the replaced directory is read", || {
        count(&d, RELOADED) >= 1
    });
    eventually("its pipelines are in force", || {
        next_push(&d) == ["ci", "deploy"]
    });
    // The old directory is not watched any more: a file written there reloads
    // nothing (the rename's reloads are all done first)...
    let reloads = settled(&d, RELOADED);
    std::fs::write(d.path().join("pipelines.old").join("stale.yml"), yaml("x")).unwrap();
    assert_eq!(settled(&d, RELOADED), reloads, "{}", d.log());
    // ...and the new one is.
    std::fs::write(dir.join("lint.yml"), yaml("lint")).unwrap();
    eventually("a file added to the new directory reloads", || {
        count(&d, RELOADED) > reloads
    });
    assert_eq!(next_push(&d), ["ci", "deploy", "lint"], "{}", d.log());

    // Removed and made again.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("only.yml"), yaml("only")).unwrap();
    eventually("the remade directory's pipelines are in force", || {
        next_push(&d) == ["only"]
    });
    let reloads = count(&d, RELOADED);
    std::fs::write(dir.join("more.yml"), yaml("more")).unwrap();
    eventually("a file added to the remade directory reloads", || {
        count(&d, RELOADED) > reloads
    });
    // Its creation and its write may be two reloads, the first of an empty file.
    eventually("the added file's pipeline is in force", || {
        next_push(&d) == ["more", "only"]
    });
}

#[test]
fn a_run_keeps_the_config_it_was_claimed_with_when_a_reload_changes_it() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    let token = token_config(&b);
    // The late step's timeout sends SIGTERM; its trap takes a second to clean up,
    // which the claimed config's step_grace (30 s) allows and the reloaded one
    // (100 ms) would not.
    let late = format!(
        "{}    timeout: 1s\n",
        step(
            "late",
            "trap 'echo got TERM; sleep 1; echo cleaned up; exit 3' TERM\nsleep 600 &\nwait"
        )
    );
    let d = b
        .config("watch_pipelines: false")
        .config("step_grace: 30s")
        .config(&token)
        .pipeline("ci", &pipeline(&origin, "", &[gated_step(&gate), late]))
        .start();
    let id = push(&d, "claimed-1", "refs/heads/main", ZERO, &sha);
    eventually("the gated step runs", || d.run_log(id).contains("first"));

    let config = d.path().join("hookci.yml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("step_grace: 30s", "step_grace: 100ms");
    std::fs::write(&config, text).unwrap();
    let r = api_post(&d, "/api/reload", Some(TOKEN), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());

    std::fs::write(&gate, "go").unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "timed_out", "{run:#}");
    let log = d.run_log(id);
    assert!(
        log.contains("got TERM") && log.contains("cleaned up"),
        "the step had the grace of the config it was claimed with:\n{log}"
    );
}

#[test]
fn editor_lock_files_and_fifos_in_the_pipelines_directory_hold_no_reload_back() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let mut sha = origin.commit("main", &[("a", "0")], "x");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("test", "true")]))
        .start();
    eventually("the watch is set up", || {
        d.log().contains("watching the pipelines directory")
    });
    let dir = d.path().join("pipelines");
    let yaml = |name: &str| pipeline(&origin, "", &[step(name, "true")]);
    let mut pushes = 0;
    let mut next_push = |d: &Daemon| {
        pushes += 1;
        let next = origin.commit("main", &[("a", &pushes.to_string())], "x");
        let runs = push_runs(
            d,
            &format!("skipped-{pushes}"),
            &push_body("refs/heads/main", &sha, &next, "x"),
        );
        sha = next;
        pipelines_of(&runs)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    // An editor's lock file while ci.yml is edited: a dangling symlink.
    std::os::unix::fs::symlink("root@build-host.4242:1764590000", dir.join(".#ci.yml")).unwrap();
    std::fs::write(dir.join("deploy.yml"), yaml("ship")).unwrap();
    eventually("the watcher reloads", || count(&d, RELOADED) >= 1);
    assert_eq!(count(&d, FAILED), 0, "{}", d.log());
    assert_eq!(next_push(&d), ["ci", "deploy"]);

    // A FIFO named like a pipeline file: reading it would wait for a writer for ever.
    let fifo = dir.join("held.yml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path it is given.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reloads = settled(&d, RELOADED);
    std::fs::write(dir.join("lint.yml"), yaml("lint")).unwrap();
    eventually("the next reload ends", || count(&d, RELOADED) > reloads);
    assert_eq!(count(&d, FAILED), 0, "{}", d.log());
    assert_eq!(next_push(&d), ["ci", "deploy", "lint"]);
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("not a regular file") && l.contains(&fifo.display().to_string())),
        "{log}"
    );
}

#[test]
fn hookci_reload_local_finds_the_socket_in_the_configs_state_dir_even_when_it_is_broken() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .config("watch_pipelines: false")
        .pipeline("ci", &pipeline(&origin, "", &[step("old", "true")]))
        .start();
    eventually("the reload socket is open", || {
        d.log().contains("hookci reload --local asks here")
    });
    let config = d.path().join("hookci.yml");
    // Somewhere with no ./.hookci and no $STATE_DIRECTORY: only the config says where.
    let elsewhere = tempfile::tempdir().unwrap();
    let reload = |how: &dyn Fn(&mut Command)| {
        let mut cmd = cli(&["reload", "--local"], None);
        cmd.current_dir(elsewhere.path())
            .env_remove("STATE_DIRECTORY");
        how(&mut cmd);
        cmd.output().unwrap()
    };
    let out = reload(&|c| {
        c.arg("-c").arg(&config);
    });
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("reloaded: pipelines ci"));
    let out = reload(&|c| {
        c.env("HOOKCI_CONFIG", &config);
    });
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(count(&d, RELOADED), 2);

    // A broken config still names the state directory: the daemon says what is wrong.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}max_parallel_runz: 3\n")).unwrap();
    let out = reload(&|c| {
        c.arg("-c").arg(&config);
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("unknown field `max_parallel_runz`"), "{err}");
    assert!(err.contains("reload failed: nothing changed"), "{err}");

    // A value refused once the file is parsed is told at its key's place too.
    std::fs::write(&config, format!("{good}max_parallel_runs: 0\n")).unwrap();
    let out = reload(&|c| {
        c.arg("-c").arg(&config);
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let place = format!(
        "{}:{}:1: max_parallel_runs must be at least 1",
        config.display(),
        good.lines().count() + 1
    );
    let err = text(&out.stderr);
    assert!(err.contains(&place), "{place} in:\n{err}");
}
