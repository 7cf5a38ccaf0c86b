//! Nothing lost, nothing twice: crashes (SIGKILL), graceful stops (SIGTERM) and restarts.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

fn pipeline(origin: &Origin, steps: &str) -> String {
    format!(
        "repo: {REPO}\nclone_url: {}\non:\n  branches: [\"**\"]\nsteps:\n{steps}",
        origin.url()
    )
}

fn first_run(r: &hookci::cli::client::Response) -> i64 {
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["runs"][0]["id"].as_i64().unwrap()
}

fn read_pids(path: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A daemon SIGKILLed while its run's one step waits for a background `sleep`, which
/// writes its pid to the returned file: the daemon (stopped), the run, that file, and
/// the pid of the `sleep` the crash left running.
fn crashed_mid_step(b: Builder) -> (Daemon, i64, PathBuf, i32) {
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let pids = b.path().join("pids");
    let steps = format!(
        "  - name: long\n    run: echo attempt started; sleep 600 & echo $! >> {}; wait\n",
        pids.display()
    );
    let mut d = b.pipeline("ci", &pipeline(&origin, &steps)).start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let id = first_run(&d.deliver("push", "crash-1", &body));
    eventually("the step runs", || read_pids(&pids).len() == 1);
    let leftover = read_pids(&pids)[0];
    d.signal(libc::SIGKILL);
    d.wait();
    assert!(
        !process_gone(leftover),
        "a crashed daemon cannot kill its steps itself"
    );
    (d, id, pids, leftover)
}

#[test]
fn a_crash_mid_step_requeues_the_run_once_and_kills_what_it_left() {
    let (mut d, id, pids, first_sleep) =
        crashed_mid_step(Builder::new().config("shutdown_grace: 1s"));

    d.spawn();
    eventually("the leftover step process is killed", || {
        process_gone(first_sleep)
    });
    eventually("attempt 2 runs", || read_pids(&pids).len() == 2);
    let run = d.get_json(&format!("/api/runs/{id}"));
    assert_eq!(run["status"], "running");
    assert_eq!(run["attempt"], 2);
    assert_eq!(run["steps"][0]["status"], "running");
    let old = d.get(&format!("/api/runs/{id}/log?attempt=1")).text();
    assert!(
        old.contains("attempt started") && old.contains("(interrupted)"),
        "{old}"
    );
    assert!(d
        .state_dir()
        .join(format!("logs/{id}/attempt-1/1.log"))
        .exists());

    // A stop: the step gets shutdown_grace, then its group is killed; exit 0.
    let second_sleep = read_pids(&pids)[1];
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    assert!(
        process_gone(second_sleep),
        "no step process outlives the daemon"
    );

    // Interrupted on its second attempt: the run fails instead of looping.
    d.spawn();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "failed", "{run:#}");
    assert!(
        run["reason"]
            .as_str()
            .unwrap()
            .contains("interrupted on 2 attempts"),
        "{run:#}"
    );
    assert_eq!(read_pids(&pids).len(), 2, "no third attempt");
}

/// Moves `pid` out of its run's cgroup (where hookci makes one: as root) into this
/// test's own, so that the next start finds it as a daemon without cgroups does: by the
/// environment the step gave it.
fn out_of_its_cgroup(pid: i32) {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // mountinfo fields: id parent major:minor root mount-point ... - fstype ...
    let v2 = mounts.lines().find_map(|l| {
        let (fields, rest) = l.split_once(" - ")?;
        (rest.split_whitespace().next()? == "cgroup2").then(|| fields.split(' ').nth(4))?
    });
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"));
    if let (Some(mount), Some(own)) = (v2, own) {
        let procs = Path::new(mount)
            .join(own.trim_start_matches('/'))
            .join("cgroup.procs");
        // Without a writable cgroup v2 hookci made no cgroup either: nothing to leave.
        let _ = std::fs::write(procs, pid.to_string());
    }
}

#[test]
fn a_start_kills_what_a_run_left_when_an_earlier_start_interrupted_it_and_died_before_that() {
    let (mut d, id, pids, leftover) = crashed_mid_step(Builder::new());
    out_of_its_cgroup(leftover);

    // A start marked the run interrupted, then died before it killed what the run left.
    let db = rusqlite::Connection::open(d.state_dir().join("hookci.db")).unwrap();
    let marked = db
        .execute("UPDATE runs SET status = 'interrupted' WHERE id = ?1", [id])
        .unwrap();
    assert_eq!(marked, 1);
    drop(db);

    d.spawn();
    eventually("the leftover step process is killed", || {
        process_gone(leftover)
    });
    eventually("attempt 2 runs", || read_pids(&pids).len() == 2);
    assert_eq!(d.get_json(&format!("/api/runs/{id}"))["attempt"], 2);
}

#[test]
fn a_crash_mid_step_fails_a_run_whose_pipeline_says_interrupted_fail_and_retries_the_default() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let (starts, pids) = (b.path().join("starts"), b.path().join("pids"));
    // The first attempt of each pipeline's run hangs until the crash; a second one ends.
    let steps = format!(
        "  - name: deploy\n    run: echo started; echo $HOOKCI_PIPELINE >> {starts}; \
         if [ ! -f {held}-$HOOKCI_PIPELINE ]; then touch {held}-$HOOKCI_PIPELINE; \
         sleep 600 & echo $! >> {pids}; wait; fi; echo finished\n",
        starts = starts.display(),
        held = b.path().join("held").display(),
        pids = pids.display(),
    );
    let mut d = b
        .pipeline(
            "deploy",
            &format!("interrupted: fail\n{}", pipeline(&origin, &steps)),
        )
        .pipeline("ci", &pipeline(&origin, &steps))
        .start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let r = d.deliver("push", "deploy-1", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    let id_of = |name: &str| {
        r.json()["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["pipeline"] == name)
            .and_then(|x| x["id"].as_i64())
            .unwrap()
    };
    let (deploy, ci) = (id_of("deploy"), id_of("ci"));
    eventually("both steps run", || read_pids(&pids).len() == 2);
    let first_sleeps = read_pids(&pids);

    d.signal(libc::SIGKILL);
    d.wait();
    d.spawn();
    for pid in first_sleeps {
        eventually("the leftover step processes are killed", || {
            process_gone(pid)
        });
    }
    let run = d.wait_run(deploy);
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(
        run["reason"], "interrupted; not retried: interrupted: fail",
        "{run:#}"
    );
    assert_eq!(run["attempt"], 1, "{run:#}");
    assert_eq!(run["steps"][0]["status"], "interrupted", "{run:#}");
    assert!(
        d.run_log(deploy).contains("started"),
        "the cut attempt's log stays readable: {}",
        d.run_log(deploy)
    );
    let run = d.wait_run(ci);
    assert_eq!(run["status"], "succeeded", "retry is the default: {run:#}");
    assert_eq!(run["attempt"], 2, "{run:#}");
    assert!(d.run_log(ci).contains("finished"), "{}", d.run_log(ci));
    let started = std::fs::read_to_string(&starts).unwrap();
    let count = |name: &str| started.lines().filter(|l| *l == name).count();
    assert_eq!(
        (count("deploy"), count("ci")),
        (1, 2),
        "the deploy step never ran again: {started}"
    );
}

#[test]
fn a_stop_lets_running_steps_finish_and_keeps_queued_runs() {
    let b = Builder::new().config("shutdown_grace: 60s\nmax_parallel_runs: 1");
    let origin = Origin::new(b.path());
    let marker = b.path().join("started");
    let steps = format!(
        "  - run: touch {}; sleep 1; echo finished\n",
        marker.display()
    );
    let mut d = b.pipeline("ci", &pipeline(&origin, &steps)).start();
    let mut ids = Vec::new();
    for i in 0..2 {
        let sha = origin.commit(&format!("b{i}"), &[("n", &i.to_string())], "x");
        let body = PushPayload::new(REPO, &format!("refs/heads/b{i}"), ZERO, &sha, "x").bytes();
        ids.push(first_run(&d.deliver("push", &format!("stop-{i}"), &body)));
    }
    eventually("the first run's step started", || marker.exists());
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0), "{}", d.log());

    d.spawn();
    let first = d.get_json(&format!("/api/runs/{}", ids[0]));
    assert_eq!(
        first["status"], "succeeded",
        "the running step finished within the grace: {first:#}"
    );
    assert_eq!(first["attempt"], 1);
    assert!(d.run_log(ids[0]).contains("finished"));
    // The queued run was never started before the stop, and runs after the restart.
    let second = d.wait_run(ids[1]);
    assert_eq!(second["status"], "succeeded");
    assert_eq!(second["attempt"], 1);
}

/// Deliveries acknowledged before a crash: delivery id -> run ids in the response.
type Acked = Mutex<HashMap<String, Vec<i64>>>;

/// Sends distinct pushes from several threads until the daemon goes away (at most
/// 20 a thread, so every run fits in one `/api/runs` page).
fn flood(d: &Daemon, sha: &str, round: usize, acked: &Acked, stop: &AtomicBool) {
    std::thread::scope(|s| {
        for t in 0..6 {
            s.spawn(move || {
                for i in 0..20 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let delivery = format!("r{round}-t{t}-{i}");
                    let body =
                        PushPayload::new(REPO, &format!("refs/heads/{delivery}"), ZERO, sha, "x")
                            .bytes();
                    let sig = hookci::intake::sign(SECRET.as_bytes(), &body);
                    let headers = [
                        ("Content-Type", "application/json"),
                        ("X-GitHub-Event", "push"),
                        ("X-GitHub-Delivery", delivery.as_str()),
                        ("X-Hub-Signature-256", sig.as_str()),
                    ];
                    match hookci::cli::client::request("POST", &d.url("/webhook"), &headers, &body)
                    {
                        Ok(r) if (200..300).contains(&r.status) => {
                            let ids = r.json()["runs"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|x| x["id"].as_i64().unwrap())
                                .collect();
                            acked.lock().unwrap().insert(delivery, ids);
                        }
                        // Killed mid-request: no answer, so no promise was made.
                        _ => return,
                    }
                }
            });
        }
    });
}

#[test]
fn deliveries_acknowledged_before_a_sigkill_are_all_there_after_restart() {
    let b = Builder::new().config("max_parallel_runs: 2");
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let mut d = b
        .pipeline("ci", &pipeline(&origin, "  - run: 'true'\n"))
        .start();
    let acked: Acked = Mutex::new(HashMap::new());
    // Kill points spread over the first quarter second of load, different each round.
    let seed = std::process::id() as u64;
    for round in 0..4 {
        let delay = Duration::from_millis(
            20 + (seed
                .wrapping_mul(2_654_435_761)
                .wrapping_add(round as u64 * 7919)
                % 250),
        );
        let stop = AtomicBool::new(false);
        let pid = d.pid();
        std::thread::scope(|s| {
            s.spawn(|| flood(&d, &sha, round, &acked, &stop));
            std::thread::sleep(delay);
            // SAFETY: signalling the daemon child by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            stop.store(true, Ordering::Relaxed);
        });
        d.wait();
        d.spawn();
    }
    let acked = acked.into_inner().unwrap();
    assert!(
        acked.len() > 20,
        "the load reached the daemon: {}",
        acked.len()
    );
    for (delivery, ids) in &acked {
        let stored = d.get(&format!("/api/deliveries/{delivery}"));
        assert_eq!(
            stored.status, 200,
            "acknowledged delivery {delivery} was lost"
        );
        let decision_runs: Vec<i64> = stored.json()["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|x| x["run"].as_i64())
            .collect();
        assert_eq!(&decision_runs, ids, "{delivery}");
    }
    // Every run finishes, once per key (one branch per delivery here).
    let runs = d.runs();
    let mut refs = HashSet::new();
    for run in &runs {
        let id = run["id"].as_i64().unwrap();
        let done = d.wait_run(id);
        // A run caught by two of the kills gives up rather than loop.
        let gave_up = done["status"] == "failed"
            && done["reason"]
                .as_str()
                .is_some_and(|r| r.contains("interrupted on 2 attempts"));
        assert!(done["status"] == "succeeded" || gave_up, "{done:#}");
        assert!(
            refs.insert(done["ref"].as_str().unwrap().to_owned()),
            "a run key ran twice"
        );
    }
    assert!(runs.len() >= acked.len());
    let healthz = d.get("/healthz");
    assert_eq!(healthz.status, 200);
}

#[test]
fn a_damaged_store_or_an_unusable_state_directory_stops_the_start_with_a_clear_error() {
    let b = Builder::new();
    std::fs::create_dir_all(b.path().join("state")).unwrap();
    std::fs::write(b.path().join("state/hookci.db"), vec![0x5a; 8192]).unwrap();
    let (code, stderr) = b.serve_expecting_failure();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("hookci.db is damaged"), "{stderr}");
    assert_eq!(
        stderr.matches("is damaged").count(),
        1,
        "said once: {stderr}"
    );

    let b = Builder::new();
    let file = b.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let b = b.config(&format!("state_dir: {}/state", file.display()));
    let (code, stderr) = b.serve_expecting_failure();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("a-file/state is not usable"), "{stderr}");
}

#[test]
fn a_second_daemon_on_the_same_state_directory_refuses_to_start_and_leaves_the_first_alone() {
    let b = Builder::new().config("shutdown_grace: 1s");
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let pids = b.path().join("pids");
    let steps = format!(
        "  - name: long\n    run: sleep 600 & echo $! >> {}; wait\n",
        pids.display()
    );
    let mut d = b.pipeline("ci", &pipeline(&origin, &steps)).start();
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let id = first_run(&d.deliver("push", "lock-1", &body));
    eventually("the step runs", || read_pids(&pids).len() == 1);
    let sleep = read_pids(&pids)[0];

    let mut second = std::process::Command::new(bin())
        .arg("serve")
        .arg("-c")
        .arg(d.path().join("hookci.yml"))
        .env_remove("HOOKCI_WEBHOOK_SECRET")
        .env_remove("HOOKCI_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = second.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
        text
    });
    // One that starts serving instead has to be stopped, not waited for.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = err.join().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    let state = std::fs::canonicalize(d.state_dir()).unwrap();
    assert!(
        stderr.contains(&format!(
            "state directory {} is in use by another hookci daemon",
            state.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains(" listening"), "{stderr}");

    // The first daemon's run goes on untouched, and it still serves.
    assert!(!process_gone(sleep), "the first daemon's step was killed");
    let run = d.get_json(&format!("/api/runs/{id}"));
    assert_eq!(
        (run["status"].as_str(), run["attempt"].as_i64()),
        (Some("running"), Some(1)),
        "{run:#}"
    );
    assert_eq!(read_pids(&pids).len(), 1, "no second attempt started");

    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    assert!(process_gone(sleep));
}

#[test]
fn the_service_manager_hears_ready_once_serving_and_stopping_at_a_stop() {
    let b = Builder::new();
    let notify = NotifySocket::bind(b.path());
    let mut d = b.env("NOTIFY_SOCKET", notify.env()).start();
    assert_eq!(notify.recv_state(), "READY=1");
    // Ready means serving.
    assert_eq!(d.get("/api/runs").status, 200);

    d.signal(libc::SIGTERM);
    assert_eq!(notify.recv_state(), "STOPPING=1");
    assert_eq!(d.wait(), Some(0), "{}", d.log());
}
