//! A signed push builds the matching pipelines exactly once, in a clean environment.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

fn ci_pipeline(origin: &Origin, steps: &str) -> String {
    format!(
        "repo: {REPO}\nclone_url: {}\non:\n  branches: [main, \"release/**\"]\n  tags: [\"v*\"]\nsteps:\n{steps}",
        origin.url()
    )
}

fn run_ids(response: &serde_json::Value) -> Vec<i64> {
    response["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn a_push_builds_the_commit_with_a_clean_environment() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let first = origin.commit("main", &[("README.md", "hello")], "first");
    let sha = origin.commit("main", &[("src.txt", "built from here")], "second");
    let steps = "  - name: show\n    run: cat src.txt && git rev-parse HEAD && env | sort\n    env: { STEP_VAR: step }\n  - name: second\n    run: echo second step ran\n";
    let mut d = b
        .pipeline(
            "ci",
            &ci_pipeline(&origin, steps).replace("steps:", "env: { PIPE_VAR: pipe }\nsteps:"),
        )
        .pipeline("other", "repo: someone/else\nsteps:\n  - run: 'true'\n")
        .env("HOOKCI_API_TOKEN", "daemon-api-token-must-not-leak")
        .env("DAEMON_ONLY_VAR", "leak")
        .start();
    let payload = PushPayload::new(
        REPO,
        "refs/heads/main",
        &first,
        &sha,
        "https://example.invalid/x.git",
    );
    let r = d.deliver("push", "delivery-1", &payload.bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(body["delivery"], "delivery-1");
    let ids = run_ids(&body);
    assert_eq!(body["runs"][0]["pipeline"], "ci");
    assert_eq!(ids.len(), 1);

    let run = d.wait_run(ids[0]);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.log());
    assert_eq!(run["commit"], sha.as_str());
    assert_eq!(run["trigger"], "push");
    assert_eq!(run["delivery"], "delivery-1");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert!(steps
        .iter()
        .all(|s| s["status"] == "succeeded" && s["exit_code"] == 0));

    let log = d.run_log(ids[0]);
    assert!(log.contains("built from here"), "{log}");
    assert!(log.contains(&sha), "detached HEAD at the commit: {log}");
    assert!(log.contains("second step ran"));
    let env: HashMap<&str, &str> = log.lines().filter_map(|l| l.split_once('=')).collect();
    let expect = [
        ("CI", "true"),
        ("HOOKCI", "true"),
        ("HOOKCI_PIPELINE", "ci"),
        ("HOOKCI_REPO", REPO),
        ("HOOKCI_REF", "refs/heads/main"),
        ("HOOKCI_BRANCH", "main"),
        ("HOOKCI_COMMIT", sha.as_str()),
        ("HOOKCI_BEFORE", first.as_str()),
        ("HOOKCI_DELIVERY", "delivery-1"),
        ("HOOKCI_STEP", "show"),
        ("PIPE_VAR", "pipe"),
        ("STEP_VAR", "step"),
    ];
    for (k, v) in expect {
        assert_eq!(env.get(k).copied(), Some(v), "{k} in\n{log}");
    }
    assert_eq!(
        env.get("HOOKCI_RUN_ID").copied(),
        Some(ids[0].to_string().as_str())
    );
    let ws = env.get("HOOKCI_WORKSPACE").copied().unwrap();
    assert!(ws.ends_with(&format!("workspaces/{}", ids[0])), "{ws}");
    // Removed after the run's end is stored (so a crash in between cannot run it
    // again): the end can be read a moment before the workspace is gone.
    eventually("the workspace is removed after the run", || {
        !std::path::Path::new(ws).exists()
    });
    for leak in [
        "HOOKCI_API_TOKEN",
        "DAEMON_ONLY_VAR",
        "HOOKCI_LOG",
        "HOOKCI_TAG",
    ] {
        assert!(
            !env.contains_key(leak),
            "{leak} must not reach a step:\n{log}"
        );
    }
    assert!(!log.contains(SECRET));
    assert!(!log.contains("daemon-api-token-must-not-leak"));

    // Step logs are plain files under state_dir/logs/RUN/N.log.
    let file = d.state_dir().join(format!("logs/{}/1.log", ids[0]));
    assert!(std::fs::read_to_string(file)
        .unwrap()
        .contains("built from here"));

    // The pipeline of another repository has no decision for this push.
    let why = d.get_json("/api/deliveries/delivery-1");
    let named: Vec<&Value> = why["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| &x["pipeline"])
        .collect();
    assert_eq!(named, [&json!("ci")], "{why:#}");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0));
    assert!(
        !d.log().contains(SECRET),
        "the webhook secret must never be logged"
    );
}

#[test]
fn a_repeated_delivery_and_a_second_delivery_of_one_push_build_once() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "one");
    let d = b
        .pipeline("ci", &ci_pipeline(&origin, "  - run: 'true'\n"))
        .start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let first = d.deliver("push", "d-1", &body);
    assert_eq!(first.status, 202);
    let id = run_ids(&first.json())[0];

    // GitHub's "Redeliver": same delivery id.
    let again = d.deliver("push", "d-1", &body);
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(run_ids(&again.json()), vec![id]);

    // An org hook and a repo hook: same push, another delivery id.
    let other = d.deliver("push", "d-2", &body);
    assert_eq!(other.status, 202);
    assert_eq!(run_ids(&other.json()), vec![id]);
    assert_eq!(other.json()["runs"][0]["existing"], true);
    let why = d.get_json("/api/deliveries/d-2");
    assert_eq!(why["decisions"][0]["outcome"], "duplicate");
    assert!(why["decisions"][0]["reason"]
        .as_str()
        .unwrap()
        .contains(&format!("run {id}")));

    assert_eq!(d.wait_run(id)["status"], "succeeded");
    assert_eq!(d.runs().len(), 1);
}

#[test]
fn forty_concurrent_deliveries_of_one_push_make_one_run() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "one");
    let d = b
        .pipeline("ci", &ci_pipeline(&origin, "  - run: 'true'\n"))
        .pipeline(
            "by-commit",
            &format!(
                "repo: {REPO}\nclone_url: {}\ndedupe: commit\nsteps:\n  - run: 'true'\n",
                origin.url()
            ),
        )
        .start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let responses: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let (d, body) = (&d, &body);
                s.spawn(move || {
                    let r = d.deliver("push", &format!("concurrent-{i}"), body);
                    assert_eq!(r.status, 202, "{}", r.text());
                    r.json()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids: Vec<i64> = responses.iter().flat_map(run_ids).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 2, "one run per pipeline: {ids:?}");
    let created: usize = responses
        .iter()
        .flat_map(|r| r["runs"].as_array().unwrap().clone())
        .filter(|r| r.get("existing").is_none())
        .count();
    assert_eq!(created, 2, "exactly one delivery created each run");
    for id in &ids {
        assert_eq!(d.wait_run(*id)["status"], "succeeded");
    }
    assert_eq!(d.runs().len(), 2);

    // dedupe: commit: the same commit pushed to another branch does not build again
    // for that pipeline, but does for the per-ref one.
    let body = PushPayload::new(REPO, "refs/heads/release/1", ZERO, &sha, "x").bytes();
    let r = d.deliver("push", "other-branch", &body);
    let runs = r.json()["runs"].as_array().unwrap().clone();
    let by_commit = runs.iter().find(|r| r["pipeline"] == "by-commit").unwrap();
    assert_eq!(by_commit["existing"], true);
    let ci = runs.iter().find(|r| r["pipeline"] == "ci").unwrap();
    assert!(ci.get("existing").is_none());
}

#[test]
fn a_branch_name_full_of_shell_metacharacters_is_only_data() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let marker = b.path().join("pwned");
    let branch = format!(
        "release/$(touch${{IFS}}{})`touch${{IFS}}{}`;touch${{IFS}}{}",
        marker.display(),
        marker.display(),
        marker.display()
    );
    let sha = origin.commit(&branch, &[("a", "1")], "x");
    let literal = "release/$(touch${IFS}/tmp/pwned)";
    let sha2 = origin.commit(literal, &[("b", "2")], "y");
    let _ = std::fs::remove_file("/tmp/pwned");
    let d = b
        .pipeline(
            "ci",
            &ci_pipeline(
                &origin,
                "  - run: printf 'branch=[%s]\\n' \"$HOOKCI_BRANCH\"\n",
            ),
        )
        .start();
    for (i, (name, commit)) in [(branch.as_str(), &sha), (literal, &sha2)]
        .into_iter()
        .enumerate()
    {
        let body = PushPayload::new(REPO, &format!("refs/heads/{name}"), ZERO, commit, "x").bytes();
        let r = d.deliver("push", &format!("meta-{i}"), &body);
        assert_eq!(r.status, 202, "{}", r.text());
        let id = run_ids(&r.json())[0];
        let run = d.wait_run(id);
        assert_eq!(run["status"], "succeeded", "{run:#}");
        assert_eq!(run["ref"], format!("refs/heads/{name}"));
        assert!(
            d.run_log(id).contains(&format!("branch=[{name}]")),
            "{}",
            d.run_log(id)
        );
    }
    assert!(!marker.exists(), "nothing may execute the branch name");
    assert!(
        !std::path::Path::new("/tmp/pwned").exists(),
        "nothing may execute the branch name"
    );
}

#[test]
fn a_timed_out_step_takes_its_whole_process_group_with_it() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let pidfile = b.path().join("bg.pid");
    let steps = format!(
        "  - name: hang\n    run: sh -c 'sleep 600 & echo $! > {}; wait'\n    timeout: 2s\n  - name: after\n    run: echo should not run\n  - name: cleanup\n    if: always\n    run: echo cleanup ran with $HOOKCI_RESULT\n",
        pidfile.display()
    );
    let d = b.pipeline("ci", &ci_pipeline(&origin, &steps)).start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let id = run_ids(&d.deliver("push", "t-1", &body).json())[0];
    let run = d.wait_run(id);
    assert_eq!(run["status"], "timed_out", "{run:#}");
    assert!(run["reason"].as_str().unwrap().contains("hang"), "{run:#}");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps[0]["status"], "timed_out");
    assert_eq!(steps[1]["status"], "skipped");
    assert_eq!(steps[2]["status"], "succeeded");
    assert!(d.run_log(id).contains("cleanup ran with failure"));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually("the background sleep is gone", || process_gone(pid));
}

#[test]
fn failures_report_the_step_and_exit_code_and_skip_the_rest() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let steps = "  - name: compile\n    run: echo compiling; exit 3\n  - name: test\n    run: echo never\n  - name: report\n    if: failure\n    run: echo reporting\n";
    let d = b.pipeline("ci", &ci_pipeline(&origin, steps)).start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let id = run_ids(&d.deliver("push", "f-1", &body).json())[0];
    let run = d.wait_run(id);
    assert_eq!(run["status"], "failed");
    assert_eq!(run["reason"], "step \"compile\" exited with code 3");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(
        (steps[0]["status"].as_str(), steps[0]["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );
    assert_eq!(steps[1]["status"], "skipped");
    assert_eq!(steps[2]["status"], "succeeded");
    assert!(!d.run_log(id).contains("never"));
}

#[test]
fn an_annotated_tag_builds_its_commit_and_deletions_never_build() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let tag = origin.annotated_tag("v1.0.0", &sha);
    assert_ne!(tag, sha);
    let d = b
        .pipeline("release", &format!("repo: {REPO}\nclone_url: {}\non:\n  tags: [\"v*\"]\nsteps:\n  - run: echo tag=$HOOKCI_TAG\n", origin.url()))
        .start();
    let mut push = PushPayload::new(REPO, "refs/tags/v1.0.0", ZERO, &tag, "x");
    push.head = Some(sha.clone());
    let id = run_ids(&d.deliver("push", "tag-1", &push.bytes()).json())[0];
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["commit"], sha.as_str());
    assert!(d.run_log(id).contains("tag=v1.0.0"));

    let mut deletion = PushPayload::new(REPO, "refs/tags/v1.0.0", &tag, ZERO, "x");
    deletion.head = None;
    let r = d.deliver("push", "tag-del", &deletion.bytes());
    assert_eq!(r.status, 202);
    assert!(r.json()["runs"].as_array().unwrap().is_empty());
    let why = d.get_json("/api/deliveries/tag-del");
    assert!(
        why["decisions"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("deleted"),
        "{why:#}"
    );
}

#[test]
fn new_branches_and_force_pushes_build() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let base = origin.commit("main", &[("a", "1")], "base");
    let old = origin.commit("main", &[("a", "2")], "old tip");
    // Force push: main now points at a commit that does not descend from `old`.
    let forced = origin.commit_on("main", Some(&base), &[("a", "3")], "rewritten");
    let feature = origin.commit_on("release/2", Some(&base), &[("f", "x")], "new branch");
    let d = b
        .pipeline("ci", &ci_pipeline(&origin, "  - run: cat a\n"))
        .start();
    let mut push = PushPayload::new(REPO, "refs/heads/main", &old, &forced, "x");
    push.forced = true;
    let id = run_ids(&d.deliver("push", "force", &push.bytes()).json())[0];
    assert_eq!(d.wait_run(id)["status"], "succeeded");
    assert!(d.run_log(id).contains('3'));
    let created = PushPayload::new(REPO, "refs/heads/release/2", ZERO, &feature, "x");
    let id = run_ids(&d.deliver("push", "created", &created.bytes()).json())[0];
    assert_eq!(d.wait_run(id)["status"], "succeeded");
}

#[test]
fn runs_start_in_arrival_order_and_never_exceed_max_parallel_runs() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let trace = b.path().join("trace");
    let steps = format!(
        "  - run: echo start $HOOKCI_BRANCH >> {0}; sleep 0.4; echo end $HOOKCI_BRANCH >> {0}\n",
        trace.display()
    );
    let d = b
        .config("max_parallel_runs: 2")
        .pipeline(
            "ci",
            &format!("repo: {REPO}\nclone_url: {}\nsteps:\n{steps}", origin.url()),
        )
        .start();
    let mut ids = Vec::new();
    for i in 0..6 {
        let sha = origin.commit(&format!("b{i}"), &[("n", &i.to_string())], "x");
        let body = PushPayload::new(REPO, &format!("refs/heads/b{i}"), ZERO, &sha, "x").bytes();
        ids.extend(run_ids(
            &d.deliver("push", &format!("order-{i}"), &body).json(),
        ));
    }
    for id in &ids {
        assert_eq!(d.wait_run(*id)["status"], "succeeded");
    }
    let text = std::fs::read_to_string(&trace).unwrap();
    let (mut running, mut peak) = (0i32, 0i32);
    let mut starts = Vec::new();
    for line in text.lines() {
        let (what, branch) = line.split_once(' ').unwrap();
        if what == "start" {
            running += 1;
            starts.push(branch.to_owned());
        } else {
            running -= 1;
        }
        peak = peak.max(running);
    }
    assert!(peak <= 2, "at most max_parallel_runs at once:\n{text}");
    assert_eq!(peak, 2, "runs do run in parallel:\n{text}");
    // Claims are in arrival order; two running side by side may start in either order.
    let started_runs: Vec<i64> = {
        let mut runs: Vec<(i64, String)> = ids
            .iter()
            .map(|id| {
                (
                    *id,
                    d.get_json(&format!("/api/runs/{id}"))["started_at"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                )
            })
            .collect();
        runs.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        runs.into_iter().map(|(id, _)| id).collect()
    };
    assert_eq!(started_runs, ids, "claimed in arrival order");
}

#[test]
fn hookci_why_explains_every_pipeline_decision() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let d = b
        .pipeline("ci", &ci_pipeline(&origin, "  - run: 'true'\n"))
        .pipeline("deploy", &format!("repo: {REPO}\non:\n  tags: [\"v*\"]\nsteps:\n  - run: 'true'\n"))
        .pipeline("docs", &format!("repo: {REPO}\non:\n  branches: [\"docs/**\", \"!docs/old\"]\nsteps:\n  - run: 'true'\n"))
        .pipeline("elsewhere", "repo: someone/else\nsteps:\n  - run: 'true'\n")
        .start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let id = run_ids(&d.deliver("push", "why-1", &body).json())[0];
    d.deliver("push", "why-2", &body);
    let why = |delivery: &str| {
        let out = std::process::Command::new(bin())
            .args(["why", delivery, "--url", &d.url("")])
            .env_remove("HOOKCI_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = why("why-1");
    assert_eq!(code, Some(0));
    let line = |name: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("{name} in\n{out}"))
            .to_owned()
    };
    assert!(
        out.starts_with("delivery why-1 (push refs/heads/main of octo-org/octo-repo"),
        "{out}"
    );
    assert!(line("ci").contains(&format!("ran as run {id}")), "{out}");
    assert!(
        line("deploy").contains("not triggered") && line("deploy").contains("tags only"),
        "{out}"
    );
    assert!(
        line("docs").contains("matches none of on.branches"),
        "{out}"
    );
    assert!(
        !out.contains("elsewhere"),
        "a pipeline of another repository is not named: {out}"
    );
    let (_, out, _) = why("why-2");
    assert!(
        out.contains(&format!("run {id} already builds this commit")),
        "{out}"
    );
    let (code, _, err) = why("no-such-delivery");
    assert_eq!(code, Some(1));
    assert!(err.contains("no delivery"), "{err}");
}

#[test]
fn hookci_run_builds_a_pipeline_in_the_foreground() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("build.sh", "echo built from the checkout")], "x");
    let pipelines = b.path().join("pipelines");
    std::fs::write(
        pipelines.join("ci.yml"),
        format!("repo: {REPO}\nsteps:\n  - name: build\n    run: sh build.sh; echo \"at $HOOKCI_COMMIT\"\n"),
    )
    .unwrap();
    std::fs::write(
        pipelines.join("broken.yml"),
        format!("repo: {REPO}\nsteps:\n  - run: exit 7\n"),
    )
    .unwrap();
    let run = |pipeline: &str| {
        std::process::Command::new(bin())
            .args([
                "run",
                pipeline,
                "--repo",
                &origin.url(),
                "--ref",
                "main",
                "--pipelines",
            ])
            .arg(&pipelines)
            .env_remove("HOOKCI_CONFIG")
            .output()
            .unwrap()
    };
    let ok = run("ci");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        out.contains("built from the checkout") && out.contains(&format!("at {sha}")),
        "{out}"
    );
    assert!(out.contains("==> ci succeeded"), "{out}");
    let failed = run("broken");
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stdout).contains("exited with code 7"));
    let missing = run("nope");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no pipeline \"nope\""));
}

#[test]
fn a_run_queued_without_waking_the_scheduler_is_still_built() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let steps = "  - name: build\n    run: echo built $HOOKCI_COMMIT\n";
    let d = b.pipeline("ci", &ci_pipeline(&origin, steps)).start();
    // Serving the API means the daemon has set its store up.
    assert!(d.runs().is_empty());
    // Queued through the store directly, as another writer of the same database would:
    // no wake-up reaches the daemon's scheduler, only its periodic look at the queue.
    let store = hookci::store::Sqlite::open(&d.state_dir()).unwrap();
    let made = store
        .create_run(hookci::store::NewRun {
            key: None,
            group: None,
            supersede: hookci::store::Supersede::Nothing,
            supersede_own_ref: false,
            generation: 1,
            pipeline: "ci".into(),
            repo: REPO.into(),
            git_ref: "refs/heads/main".into(),
            commit: sha.clone(),
            before: ZERO.into(),
            clone_url: origin.url(),
            trigger: "manual",
            skipped: None,
        })
        .unwrap();
    drop(store);
    let run = d.wait_run(made.id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert!(d.run_log(made.id).contains(&format!("built {sha}")));
}

#[test]
fn a_timeout_too_large_for_the_clock_means_no_limit() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    // u64::MAX seconds: the pipeline file accepts it, no clock can add it.
    let steps = "  - name: build\n    run: echo built\n    timeout: 18446744073709551615\n";
    let pipeline =
        ci_pipeline(&origin, steps).replace("steps:", "timeout: 18446744073709551615\nsteps:");
    let d = b.pipeline("ci", &pipeline).start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let id = run_ids(&d.deliver("push", "huge-1", &body).json())[0];
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert!(d.run_log(id).contains("built"));
}

#[test]
fn a_pipeline_timeout_that_runs_out_between_steps_ends_the_run_timed_out() {
    let (d, run) = run_out_of_time_between_steps("");
    assert_eq!(run["status"], "timed_out", "{run:#}");
    assert_eq!(
        run["reason"], "pipeline timed out after 3s (before step \"second\")",
        "{run:#}"
    );
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps[0]["status"], "succeeded", "{run:#}");
    assert_eq!(steps[1]["status"], "skipped", "{run:#}");
    let id = run["id"].as_i64().unwrap();
    assert!(!d.run_log(id).contains("second ran"));
}

#[test]
fn time_running_out_before_a_step_that_would_not_run_anyway_changes_nothing() {
    // The second step runs only after a failure: the pipeline did all it had to do.
    let (_d, run) = run_out_of_time_between_steps("    if: failure\n");
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][1]["status"], "skipped", "{run:#}");
}

/// A pipeline with a 3 s timeout whose first step ends in time but whose end the daemon
/// can only record after the 3 s (the test holds the store's write lock); the second
/// step has `second_when` (YAML lines). The daemon and the finished run.
fn run_out_of_time_between_steps(second_when: &str) -> (Daemon, serde_json::Value) {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let (ready, go) = (b.path().join("ready"), b.path().join("go"));
    let steps = format!(
        "  - name: first\n    run: touch {}; while [ ! -f {} ]; do sleep 0.05; done\n  - name: second\n{second_when}    run: echo second ran\n",
        ready.display(),
        go.display()
    );
    let pipeline = ci_pipeline(&origin, &steps).replace("steps:", "timeout: 3s\nsteps:");
    let d = b.pipeline("ci", &pipeline).start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let id = run_ids(&d.deliver("push", "between-1", &body).json())[0];
    eventually("the first step runs", || ready.exists());
    // The first step ends well within the pipeline's 3 s; the store's write lock, held
    // by the test, keeps the daemon from recording that end (and so from going on to
    // the second step) until the 3 s are over.
    let db = rusqlite::Connection::open(d.state_dir().join("hookci.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    std::fs::write(&go, "").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3500));
    db.execute_batch("COMMIT").unwrap();
    drop(db);
    let run = d.wait_run(id);
    (d, run)
}
