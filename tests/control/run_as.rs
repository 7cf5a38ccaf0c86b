//! Steps cannot reach the daemon: `run_as` runs them as another user, kept out of the
//! state directory, the config and the secrets; and even as the daemon's own user a
//! step cannot read the daemon's environment.

use super::*;

const DAEMON_TOKEN: &str = "daemon-api-token-9d41c7-never-in-a-step";

/// A step that tries everything a step must not manage, saying `GOT-<what>` for each
/// success, and `id`, `HOME` and the workspace for the rest.
fn probe_step(targets: &[(&str, &Path)]) -> String {
    let mut script = String::from(
        "echo \"user=$(id -un) uid=$(id -u)\"\nif cat /proc/$PPID/environ >/dev/null 2>&1; then echo GOT-environ; tr '\\0' '\\n' < /proc/$PPID/environ; fi\n",
    );
    for (what, path) in targets {
        script.push_str(&format!(
            "if cat {p} >/dev/null 2>&1 || {{ [ -d {p} ] && ls {p} >/dev/null 2>&1; }}; then echo GOT-{what}; cat {p} 2>/dev/null; fi\n",
            p = path.display()
        ));
    }
    script.push_str(
        "touch \"$HOME/home-file\" && echo home-writable\ntouch ws-file && echo workspace-writable\necho \"home=$HOME\"",
    );
    step("probe", &script)
}

#[test]
fn with_run_as_a_step_runs_as_that_user_and_reaches_nothing_of_the_daemon() {
    let (uid, _) = test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let secrets = b.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("DEPLOY_KEY"), "deploy-key-0c8e1f\n").unwrap();
    let state = b.path().join("state");
    let targets = [
        ("db", state.join("hookci.db")),
        ("logs", state.join("logs")),
        ("secret", b.path().join("secret")),
        ("config", b.path().join("hookci.yml")),
        ("secrets-dir", secrets.clone()),
        ("deploy-key", secrets.join("DEPLOY_KEY")),
    ];
    let targets: Vec<(&str, &Path)> = targets.iter().map(|(w, p)| (*w, p.as_path())).collect();
    let b = b
        .pipeline("probe", &pipeline(&origin, "", &[probe_step(&targets)]))
        .config(&format!("run_as: {TEST_USER}"))
        .config(&format!("secrets_dir: {}", secrets.display()))
        .env("HOOKCI_API_TOKEN", DAEMON_TOKEN);
    // The user must get through the test directory to its workspace.
    chmod(b.path(), 0o711);

    // The secret file and the config are written world-readable: serve refuses, naming them.
    let (code, err) = b.serve_expecting_failure();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("readable by run_as user") && err.contains("secret"),
        "{err}"
    );
    for path in ["secret", "hookci.yml"] {
        chmod(&b.path().join(path), 0o600);
    }
    chmod(&secrets, 0o700);

    let d = b.start();
    let id = push(&d, "run-as-1", "refs/heads/main", ZERO, &sha);
    let run = d.wait_run(id);
    let log = d.run_log(id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{log}");
    assert!(
        log.contains(&format!("user={TEST_USER} uid={uid}")),
        "{log}"
    );
    assert!(!log.contains("GOT-"), "the step reached something: {log}");
    assert!(log.contains("home-writable"), "{log}");
    assert!(log.contains("workspace-writable"), "{log}");
    assert!(
        log.contains(&format!(
            "home={}",
            d.state_dir().join("homes").join(id.to_string()).display()
        )),
        "{log}"
    );
    for secret in [SECRET, DAEMON_TOKEN, "deploy-key-0c8e1f"] {
        assert!(!log.contains(secret), "{secret} in the log: {log}");
    }
    // Its HOME goes with the run.
    eventually("the run's HOME is removed", || {
        !d.state_dir().join("homes").join(id.to_string()).exists()
    });
    assert!(
        !d.log().contains("steps run as root"),
        "no warning with run_as: {}",
        d.log()
    );
}

#[test]
fn as_the_daemons_own_user_a_step_cannot_read_the_daemons_environment() {
    let (uid, gid) = test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let d = b
        .pipeline("probe", &pipeline(&origin, "", &[probe_step(&[])]))
        .env("HOOKCI_API_TOKEN", DAEMON_TOKEN)
        .daemon_as((uid, gid))
        .start();
    let id = push(&d, "same-uid-1", "refs/heads/main", ZERO, &sha);
    let run = d.wait_run(id);
    let log = d.run_log(id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{log}");
    assert!(log.contains(&format!("uid={uid}")), "same uid: {log}");
    assert!(!log.contains("GOT-environ"), "{log}");
    assert!(!log.contains(DAEMON_TOKEN), "{log}");
}

#[test]
fn a_step_holds_none_of_the_capabilities_the_daemon_was_given() {
    let user = test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let probe = step("caps", "grep -E '^Cap(Prm|Eff|Amb):' /proc/self/status");
    let d = b
        .pipeline("caps", &pipeline(&origin, "", &[probe]))
        .daemon_with_caps(user, "dac_override")
        .start();
    let id = push(&d, "caps-1", "refs/heads/main", ZERO, &sha);
    let run = d.wait_run(id);
    let log = d.run_log(id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{log}");
    assert_capabilities(
        &log,
        "0000000000000000",
        "a step has the daemon's capabilities",
    );
}

#[test]
fn as_root_without_run_as_serve_and_check_warn_that_steps_run_as_root() {
    test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .pipeline("p", &pipeline(&origin, "", &[step("s", "true")]))
        .start();
    assert!(d.log().contains("steps run as root"), "{}", d.log());
    let config = d.path().join("hookci.yml");
    let out = run_cli(&["check", "-c", config.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("warning: hookci runs as root and run_as is not set"),
        "{}",
        text(&out.stderr)
    );
    let with = d.path().join("with-run-as.yml");
    let mut yaml = std::fs::read_to_string(&config).unwrap();
    yaml.push_str(&format!("run_as: {TEST_USER}\n"));
    std::fs::write(&with, yaml).unwrap();
    let out = run_cli(&["check", "-c", with.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_daemon_that_cannot_switch_users_says_what_it_lacks() {
    let user = test_user();
    let b = Builder::new().config("run_as: 54321:54321").daemon_as(user);
    let (code, err) = b.serve_expecting_failure();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("steps are to run as 54321:54321")
            && err.contains("CAP_SETUID")
            && err.contains("CAP_SETGID"),
        "{err}"
    );
}

/// Starts a daemon with `run_as` the test user, its own files closed to that user, and
/// one pipeline `ci` of `origin` with `extra` (YAML: `workspace: reuse` and the like)
/// and `step`.
fn reusing_as_test_user(b: Builder, origin: &Origin, extra: &str, step: String) -> Daemon {
    let b = b
        .pipeline("ci", &pipeline(origin, extra, &[step]))
        .config(&format!("run_as: {TEST_USER}"));
    chmod(b.path(), 0o711);
    b.write_config();
    for path in ["secret", "hookci.yml"] {
        chmod(&b.path().join(path), 0o600);
    }
    b.start()
}

/// With `run_as`, a reused workspace is the steps' user's but its `.git` is hookci's:
/// git in a step reads it, a step cannot write it, and a `.git` a step put in its place
/// makes the next run replace the workspace rather than let hookci update through it.
#[test]
fn with_run_as_a_reused_workspace_keeps_its_git_out_of_the_steps_reach() {
    test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a", "1"), ("mode", "look")], "one");
    let script = "echo \"head=$(git rev-parse HEAD)\"\n\
        echo \"stamp=$(cat target/stamp 2>/dev/null)\"\n\
        if touch .git/planted 2>/dev/null; then echo GOT-git-writable; fi\n\
        mkdir -p target && echo \"warm-$HOOKCI_RUN_ID\" > target/stamp\n\
        if [ \"$(cat mode)\" = plant ]; then mv .git .git-away && git init -q . && echo planted; fi";
    let d = reusing_as_test_user(
        b,
        &origin,
        "workspace: reuse\nkeep: [\"target/\"]\n",
        step("look", script),
    );
    let run = |n: u32, before: &str, after: &str| {
        let id = push(
            &d,
            &format!("reuse-as-{n}"),
            "refs/heads/main",
            before,
            after,
        );
        let run = d.wait_run(id);
        let log = d.run_log(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{log}\n{}", d.log());
        assert!(!log.contains("GOT-"), "the step wrote into .git: {log}");
        log
    };
    let first = run(1, ZERO, &c1);
    assert!(first.contains(&format!("head={c1}")), "{first}");

    let c2 = origin.commit("main", &[("mode", "plant")], "two");
    let second = run(2, &c1, &c2);
    assert!(second.contains(&format!("head={c2}")), "{second}");
    assert!(
        second.contains("stamp=warm-"),
        "updated in place: {second}\n{}",
        d.log()
    );
    assert!(second.contains("planted"), "{second}");

    let c3 = origin.commit("main", &[("mode", "look")], "three");
    let third = run(3, &c2, &c3);
    assert!(third.contains(&format!("head={c3}")), "{third}");
    assert!(
        third.contains("stamp=\n") || third.contains("stamp=\r"),
        "replaced, cold: {third}"
    );
    assert!(d.log().contains("replacing it"), "{}", d.log());
}

/// With `run_as`, a step owns the reused workspace's files and may put back the size and
/// modification time of one it changed: the next update finds it by its change time,
/// later than the hand-over, and writes it again.
#[test]
fn with_run_as_a_file_a_step_changed_behind_its_times_is_rewritten() {
    test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a", "1"), ("mode", "look")], "one");
    let script = "echo \"a=$(cat a)\"\n\
        if [ \"$(cat mode)\" = tamper ]; then\n\
          touch -r a \"$HOME/ref\" && printf 9 > a && touch -r \"$HOME/ref\" a && echo tampered\n\
        fi";
    let d = reusing_as_test_user(b, &origin, "workspace: reuse\n", step("look", script));
    let run = |n: u32, before: &str, after: &str| {
        let id = push(&d, &format!("behind-{n}"), "refs/heads/main", before, after);
        let run = d.wait_run(id);
        let log = d.run_log(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{log}\n{}", d.log());
        log
    };
    run(1, ZERO, &c1);
    let c2 = origin.commit("main", &[("mode", "tamper")], "two");
    let second = run(2, &c1, &c2);
    assert!(
        second.contains("a=1") && second.contains("tampered"),
        "{second}"
    );
    let c3 = origin.commit("main", &[("mode", "look")], "three");
    let third = run(3, &c2, &c3);
    assert!(
        third.contains("a=1"),
        "built from what the step left: {third}"
    );
    assert!(
        !d.log().contains("replacing it"),
        "updated in place: {}",
        d.log()
    );
}

/// The capabilities `systemd/hookci.service` grants the daemon (`AmbientCapabilities=`),
/// as setpriv names them.
fn unit_capabilities() -> String {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/hookci.service"
    ))
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit grants capabilities");
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    caps.join(",")
}

#[test]
fn under_the_units_capabilities_run_as_steps_that_time_out_or_are_canceled_are_stopped() {
    let user = test_user();
    let sleeps = Sleeps::new();
    chmod(&sleeps.dir(), 0o777);
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let sleeper = |branch: &str, timeout: &str| {
        let script = format!(
            "echo started\necho $$ > {}/$HOOKCI_RUN_ID.pid\nexec sleep 600",
            sleeps.dir().display()
        );
        pipeline(
            &origin,
            &format!("on:\n  branches: [{branch}]\n"),
            &[format!("{}{timeout}", step("sleep", &script))],
        )
    };
    let config = token_config(&b);
    let b = b
        .pipeline("times-out", &sleeper("main", "    timeout: 1s\n"))
        .pipeline("canceled", &sleeper("cancel", ""))
        .config("run_as: 54321:54321")
        .config(&config)
        .daemon_with_caps(user, &unit_capabilities());
    // The run's user must get through the test directory to its workspace, and
    // reach none of the daemon's files.
    b.write_config();
    chmod(b.path(), 0o711);
    for path in ["secret", "hookci.yml", "api-token"] {
        chmod(&b.path().join(path), 0o600);
    }
    let d = b.start();
    let ended = |id: i64| {
        let mut run = Value::Null;
        eventually(&format!("run {id} ends"), || {
            run = run_of(&d, id);
            run["status"] != "queued" && run["status"] != "running"
        });
        run
    };

    let id = push(&d, "caps-timeout", "refs/heads/main", ZERO, &sha);
    let run = ended(id);
    assert_eq!(run["status"], "timed_out", "{run:#}\n{}", d.log());
    let pid = read_pid(&sleeps.dir().join(format!("{id}.pid")));
    assert!(process_gone(pid), "the step's sleep is still there");

    let id = push(&d, "caps-cancel", "refs/heads/cancel", ZERO, &sha);
    let pid = read_pid(&sleeps.dir().join(format!("{id}.pid")));
    let r = api_post(
        &d,
        &format!("/api/runs/{id}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let run = ended(id);
    assert_eq!(run["status"], "canceled", "{run:#}\n{}", d.log());
    assert!(process_gone(pid), "the step's sleep is still there");
    assert!(
        !d.log().contains("signalling step process group failed"),
        "{}",
        d.log()
    );
}

/// A reused workspace is the steps' user's between runs too, at a path that can be
/// worked out: a step of another pipeline must not plant a build output in its `keep:`
/// paths for this pipeline's next run (and its secrets) to use.
#[test]
fn with_run_as_a_reused_workspace_is_closed_to_other_pipelines_between_its_runs() {
    use std::os::unix::fs::PermissionsExt;
    test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a", "1")], "one");
    let other = origin.commit("other", &[("a", "1")], "other");
    let aim = b.path().join("aim");
    let plant = format!(
        "p=$(cat {})\n\
         if ls \"$p\" >/dev/null 2>&1; then echo GOT-listed; fi\n\
         if echo poison > \"$p/target/planted\" 2>/dev/null; then echo GOT-planted; fi",
        aim.display()
    );
    let b = b.pipeline(
        "other",
        &pipeline(
            &origin,
            "on:\n  branches: [other]\n",
            &[step("plant", &plant)],
        ),
    );
    let d = reusing_as_test_user(
        b,
        &origin,
        "on:\n  branches: [main]\nworkspace: reuse\nkeep: [\"target/\"]\n",
        step(
            "build",
            "mkdir -p target && cat target/planted 2>/dev/null; echo built > target/out",
        ),
    );
    let built = |n: u32, before: &str, after: &str| {
        let id = push(&d, &format!("closed-{n}"), "refs/heads/main", before, after);
        let run = d.wait_run(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.log());
        d.get(&format!("/api/runs/{id}/log")).text()
    };
    built(1, ZERO, &c1);
    let slot = d.reuse_slot("ci");
    assert!(slot.join("0/target/out").exists());
    // Closed once the run let its workspace go, a moment after its end is recorded.
    let closed = || std::fs::metadata(&slot).unwrap().permissions().mode() & 0o777 == 0o700;
    eventually("the slot is closed", closed);

    std::fs::write(&aim, slot.join("0").display().to_string()).unwrap();
    chmod(&aim, 0o644);
    let id = push(&d, "closed-plant", "refs/heads/other", ZERO, &other);
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let log = d.get(&format!("/api/runs/{id}/log")).text();
    assert!(!log.contains("GOT-"), "{log}");
    assert!(!slot.join("0/target/planted").exists());

    let c2 = origin.commit("main", &[("a", "2")], "two");
    let log = built(2, &c1, &c2);
    assert!(!log.contains("poison"), "{log}");
    eventually("the slot is closed again", closed);
}

/// A kept path nested deeper than the hand-over walks fails that run's hand-over, and
/// the next run of the slot starts from a fresh checkout rather than fail on it again.
#[test]
fn with_run_as_a_reused_workspace_the_hand_over_refuses_is_replaced() {
    test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a", "1"), ("mode", "nest")], "one");
    let script = "if [ \"$(cat mode)\" = nest ] && [ ! -d target ]; then\n\
                  p=target; i=0; while [ $i -lt 600 ]; do p=$p/d; i=$((i+1)); done; mkdir -p $p\n\
                  fi\n\
                  echo \"target=$(ls -d target 2>/dev/null)\"";
    let d = reusing_as_test_user(
        b,
        &origin,
        "workspace: reuse\nkeep: [\"target/\"]\n",
        step("build", script),
    );
    let run = |n: u32, before: &str, after: &str| {
        let id = push(&d, &format!("deep-{n}"), "refs/heads/main", before, after);
        d.wait_run(id)
    };
    let first = run(1, ZERO, &c1);
    assert_eq!(first["status"], "succeeded", "{first:#}");
    let c2 = origin.commit("main", &[("mode", "look")], "two");
    let second = run(2, &c1, &c2);
    assert_eq!(second["status"], "failed", "{second:#}");
    assert!(
        second["reason"].as_str().unwrap().contains("deep"),
        "{second:#}"
    );
    let c3 = origin.commit("main", &[("a", "3")], "three");
    let third = run(3, &c2, &c3);
    assert_eq!(third["status"], "succeeded", "{third:#}\n{}", d.log());
    let log = d.get(&format!("/api/runs/{}/log", third["id"])).text();
    assert!(
        log.contains("target=\n") || log.ends_with("target="),
        "{log}"
    );
}

/// With `run_as`, what the steps' user already owns in a reused workspace is not given
/// to it again: a `keep:` path and an unchanged tracked file keep their ctime across
/// runs, and the workspace does not trust ctime, so the chown of a changed file never
/// makes the next update hash it.
#[test]
fn with_run_as_a_reused_workspace_is_not_chowned_again() {
    use std::os::unix::fs::MetadataExt;
    test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a", "1"), ("b", "1")], "one");
    let script = "mkdir -p target && { [ -e target/kept ] || echo once > target/kept; }";
    let d = reusing_as_test_user(
        b,
        &origin,
        "workspace: reuse\nkeep: [\"target/\"]\n",
        step("build", script),
    );
    let run = |n: u32, before: &str, after: &str| {
        let id = push(
            &d,
            &format!("rechown-{n}"),
            "refs/heads/main",
            before,
            after,
        );
        let run = d.wait_run(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.log());
    };
    run(1, ZERO, &c1);
    let ws = d.reuse_slot("ci").join("0");
    let ctime = |p: &str| {
        let m = std::fs::symlink_metadata(ws.join(p)).unwrap();
        (m.ctime(), m.ctime_nsec())
    };
    let before = (ctime("target/kept"), ctime("target"), ctime("a"));

    let c2 = origin.commit("main", &[("b", "2")], "two");
    run(2, &c1, &c2);
    assert_eq!(
        (ctime("target/kept"), ctime("target"), ctime("a")),
        before,
        "what the user owned was chowned again"
    );
    assert_eq!(std::fs::read_to_string(ws.join("b")).unwrap(), "2");
    let config = std::fs::read_to_string(ws.join(".git/config")).unwrap();
    assert!(config.contains("trustctime = false"), "{config}");
}

/// The uids [`TEST_USER`]'s runs take with `run_as_uids` in the tests below: no account
/// has them. Each test has a range of its own (a daemon ends every process of its
/// range's uids as their runs give them back, and tests run side by side).
const FIRST_UID: u32 = 2_000_000_000;
const REUSE_FIRST_UID: u32 = 2_000_000_010;

/// With `run_as_uids`, two runs at once run with uids of their own: a step of one cannot
/// read the environment of the other's step (its pipeline's secret), signal it, or look
/// into its workspace or `HOME`, which it could all do as the one `run_as` user.
#[test]
fn with_run_as_uids_runs_at_once_cannot_reach_each_others_secrets_processes_or_files() {
    let (_, gid) = test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c_alpha = origin.commit("alpha", &[("a", "alpha's file")], "alpha");
    let c_beta = origin.commit("beta", &[("a", "beta's file")], "beta");
    let meet = b.path().join("meet");
    std::fs::create_dir(&meet).unwrap();
    chmod(&meet, 0o1777);
    let m = meet.display();
    let wait_for = |file: &str| {
        format!(
            "n=0; while [ ! -e {m}/{file} ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done\n\
             [ -e {m}/{file} ] || {{ echo never-came-{file}; touch {m}/beta.done; exit 1; }}\n"
        )
    };
    let alpha = format!(
        "echo \"uid=$(id -u) gid=$(id -g)\"\n\
         echo $$ > {m}/alpha.pid; pwd > {m}/alpha.ws; echo \"$HOME\" > {m}/alpha.home\n\
         touch \"$HOME/mine\" {m}/alpha.ready\n{}",
        wait_for("beta.done")
    );
    let beta = format!(
        "{}echo \"uid=$(id -u) gid=$(id -g)\"\n\
         pid=$(cat {m}/alpha.pid)\n\
         if tr '\\0' '\\n' < /proc/$pid/environ 2>/dev/null | grep -q ALPHA_TOKEN; then echo GOT-environ; fi\n\
         if kill -0 $pid 2>/dev/null; then echo GOT-signal; fi\n\
         if ls \"$(cat {m}/alpha.ws)\" >/dev/null 2>&1; then echo GOT-workspace; fi\n\
         if cat \"$(cat {m}/alpha.ws)/a\" >/dev/null 2>&1; then echo GOT-file; fi\n\
         if ls \"$(cat {m}/alpha.home)\" >/dev/null 2>&1; then echo GOT-home; fi\n\
         if tr '\\0' '\\n' < /proc/$$/environ | grep -q BETA_TOKEN; then echo own-environ-readable; fi\n\
         if grep -q '^NoNewPrivs:[[:space:]]*1' /proc/$$/status; then echo no-new-privs; fi\n\
         touch {m}/beta.done",
        wait_for("alpha.ready")
    );
    let b = b
        .pipeline(
            "alpha",
            &pipeline(
                &origin,
                "on:\n  branches: [alpha]\nsecrets: [ALPHA_TOKEN]\n",
                &[step("alpha", &alpha)],
            ),
        )
        .pipeline(
            "beta",
            &pipeline(
                &origin,
                "on:\n  branches: [beta]\nsecrets: [BETA_TOKEN]\n",
                &[step("beta", &beta)],
            ),
        )
        .config(&format!("run_as: {TEST_USER}"))
        .config(&format!("run_as_uids: {FIRST_UID}-{}", FIRST_UID + 1))
        .config("max_parallel_runs: 2")
        .env("HOOKCI_SECRET_ALPHA_TOKEN", "alpha-token-5e0b2d")
        .env("HOOKCI_SECRET_BETA_TOKEN", "beta-token-77a9c4");
    chmod(b.path(), 0o711);
    b.write_config();
    for path in ["secret", "hookci.yml"] {
        chmod(&b.path().join(path), 0o600);
    }
    let d = b.start();
    let a = push(&d, "uids-alpha", "refs/heads/alpha", ZERO, &c_alpha);
    let b = push(&d, "uids-beta", "refs/heads/beta", ZERO, &c_beta);
    let (run_a, run_b) = (d.wait_run(a), d.wait_run(b));
    let (log_a, log_b) = (d.run_log(a), d.run_log(b));
    assert_eq!(run_a["status"], "succeeded", "{run_a:#}\n{log_a}");
    assert_eq!(run_b["status"], "succeeded", "{run_b:#}\n{log_b}");
    let uid_of = |log: &str| -> u32 {
        let line = log.lines().find(|l| l.starts_with("uid=")).unwrap();
        assert!(line.ends_with(&format!(" gid={gid}")), "{line}");
        line["uid=".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (uid_a, uid_b) = (uid_of(&log_a), uid_of(&log_b));
    assert_ne!(uid_a, uid_b, "two runs at once shared a uid");
    for uid in [uid_a, uid_b] {
        assert!((FIRST_UID..=FIRST_UID + 1).contains(&uid), "{uid}");
    }
    assert!(log_b.contains("own-environ-readable"), "{log_b}");
    assert!(log_b.contains("no-new-privs"), "{log_b}");
    assert!(!log_b.contains("GOT-"), "beta reached alpha: {log_b}");
}

/// A reused workspace's next run gets the uid its last run had, free the longest or
/// not, so its files are not given away again; and the workspace, which a step had
/// opened to everyone, is closed again before the next run's steps get it.
#[test]
fn with_run_as_uids_a_reused_workspace_keeps_its_uid_from_run_to_run() {
    use std::os::unix::fs::MetadataExt;
    test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a", "1")], "one");
    let script = "echo \"uid=$(id -u)\"\necho \"modes=$(stat -c %a . \"$HOME\" | tr '\\n' ' ')\"\n\
                  mkdir -p target && { [ -e target/kept ] || echo once > target/kept; }\n\
                  chmod 755 .";
    // One run at a time: the second starts once the first has given its uid back.
    let b = b
        .config(&format!(
            "run_as_uids: {REUSE_FIRST_UID}-{}",
            REUSE_FIRST_UID + 2
        ))
        .config("max_parallel_runs: 1");
    let d = reusing_as_test_user(
        b,
        &origin,
        "workspace: reuse\nkeep: [\"target/\"]\n",
        step("build", script),
    );
    let run = |n: u32, before: &str, after: &str| {
        let id = push(&d, &format!("uid-{n}"), "refs/heads/main", before, after);
        let run = d.wait_run(id);
        let log = d.run_log(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{log}");
        let modes = log.lines().find(|l| l.starts_with("modes=")).unwrap();
        assert_eq!(modes.trim(), "modes=700 700", "{log}");
        log.lines()
            .find(|l| l.starts_with("uid="))
            .unwrap()
            .to_owned()
    };
    let first = run(1, ZERO, &c1);
    assert_eq!(first, format!("uid={REUSE_FIRST_UID}"));
    // Between runs its top folder is hookci's again, and closed (the step opened it),
    // and the uid it asks for is written beside it.
    let ws = d.reuse_slot("ci").join("0");
    eventually("the workspace is taken back from the run's uid", || {
        let meta = std::fs::symlink_metadata(&ws).unwrap();
        meta.uid() == 0 && meta.mode() & 0o777 == 0o700
    });
    let stamp = std::fs::read_to_string(d.reuse_slot("ci").join("0.uid")).unwrap();
    assert_eq!(stamp.trim(), REUSE_FIRST_UID.to_string());
    let kept = ws.join("target/kept");
    let meta = std::fs::symlink_metadata(&kept).unwrap();
    assert_eq!(meta.uid(), REUSE_FIRST_UID);
    let ctime = (meta.ctime(), meta.ctime_nsec());
    let c2 = origin.commit("main", &[("a", "2")], "two");
    assert_eq!(
        run(2, &c1, &c2),
        first,
        "the workspace's uid was not given again"
    );
    let meta = std::fs::symlink_metadata(&kept).unwrap();
    assert_eq!(
        (meta.ctime(), meta.ctime_nsec()),
        ctime,
        "the kept file was given away again"
    );
}
