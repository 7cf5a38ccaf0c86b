//! Git jobs run in a child process (`hookci git-worker`): a remote that hangs holds up
//! neither a cancel nor a stop, and the child sees none of the daemon's secrets.

use std::net::TcpListener;

use super::*;

/// A "remote" that accepts connections and never answers: every fetch from it hangs.
/// The accepted connections are kept open until the listener's thread ends with the test.
pub(super) fn hung_remote() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/{REPO}.git", listener.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for conn in listener.incoming().take(4).flatten() {
            open.push(conn);
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    (url, held)
}

fn pipeline_from(url: &str) -> String {
    format!(
        "repo: {REPO}\nclone_url: {url}\nsecrets: [DEPLOY_KEY]\nsteps:\n{}",
        step("never", "echo this step must not run")
    )
}

/// The daemon's live `git-worker` children.
pub(super) fn git_workers(daemon: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let is_worker = cmdline.split(|b| *b == 0).any(|arg| arg == b"git-worker");
        if ppid == Some(daemon) && is_worker && !process_gone(pid) {
            found.push(pid);
        }
    }
    found
}

const DEPLOY_KEY: &str = "deploy-key-5e0c-never-in-a-git-job";

#[test]
fn a_cancel_ends_a_run_whose_fetch_hangs_and_kills_its_git_job() {
    let (url, _remote) = hung_remote();
    let b = Builder::new();
    let config = token_config(&b);
    let d = b
        .pipeline("ci", &pipeline_from(&url))
        .config(&config)
        .env("HOOKCI_SECRET_DEPLOY_KEY", DEPLOY_KEY)
        .start();
    let id = push(&d, "hung-fetch", "refs/heads/main", ZERO, &"c".repeat(40));
    let mut workers = Vec::new();
    eventually("the run's git job is fetching", || {
        workers = git_workers(d.pid());
        !workers.is_empty()
    });
    assert_eq!(run_of(&d, id)["status"], "running");

    // The child carries neither the daemon's secrets nor its token.
    let environ = std::fs::read(format!("/proc/{}/environ", workers[0])).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains(DEPLOY_KEY), "{environ}");
    assert!(!environ.contains("HOOKCI_SECRET_"), "{environ}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", workers[0])).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(TOKEN));
    // In a process group of its own: a signal to the daemon's group (Ctrl-C in a
    // terminal) leaves the job to the daemon, which stops it its own way.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", workers[0])).unwrap();
    let group: i32 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(2))
        .and_then(|g| g.parse().ok())
        .unwrap();
    assert_eq!(group, workers[0], "{stat}");

    let r = api_post(
        &d,
        &format!("/api/runs/{id}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    wait_status(&d, id, "canceled");
    let run = run_of(&d, id);
    assert!(
        run["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{run}"
    );
    assert_eq!(run["steps"][0]["status"], "skipped", "{run}");
    eventually("the git job is gone", || {
        workers.iter().all(|pid| process_gone(*pid))
    });
    assert!(!d.run_log(id).contains("this step must not run"));
}

#[test]
fn a_stop_does_not_wait_for_a_fetch_that_hangs() {
    let (url, _remote) = hung_remote();
    let b = Builder::new().config("shutdown_grace: 1s");
    let mut d = b
        .pipeline("ci", &pipeline_from(&url))
        .env("HOOKCI_SECRET_DEPLOY_KEY", DEPLOY_KEY)
        .start();
    let id = push(&d, "hung-at-stop", "refs/heads/main", ZERO, &"d".repeat(40));
    let mut workers = Vec::new();
    eventually("the run's git job is fetching", || {
        workers = git_workers(d.pid());
        !workers.is_empty()
    });
    d.signal(libc::SIGTERM);
    let started = Instant::now();
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    // The grace (1 s) and the kill, not the remote's silence (minutes), decide.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stop took {:?}",
        started.elapsed()
    );
    for pid in &workers {
        assert!(process_gone(*pid), "git job {pid} outlived the daemon");
    }
    // Interrupted at the stop, the run is queued again (attempt 2) at the next start.
    d.spawn();
    let run = run_of(&d, id);
    assert_eq!(run["attempt"], 2, "{run}");
}

#[test]
fn a_run_waiting_for_its_mirror_behind_a_hung_fetch_can_be_canceled() {
    let (url, _remote) = hung_remote();
    let b = Builder::new().config("max_parallel_runs: 2");
    let config = token_config(&b);
    let d = b
        .pipeline(
            "ci",
            &pipeline_from(&url).replace("steps:", "on:\n  branches: [\"**\"]\nsteps:"),
        )
        .config(&config)
        .env("HOOKCI_SECRET_DEPLOY_KEY", DEPLOY_KEY)
        .start();
    let first = push(&d, "fetching", "refs/heads/main", ZERO, &"e".repeat(40));
    eventually("the first run's git job is fetching", || {
        !git_workers(d.pid()).is_empty()
    });
    // Same repository, so the same mirror: this one waits for the first one's fetch.
    let second = push(&d, "waiting", "refs/heads/dev", ZERO, &"f".repeat(40));
    wait_status(&d, second, "running");
    assert_eq!(
        git_workers(d.pid()).len(),
        1,
        "one fetch per mirror at a time"
    );

    let r = api_post(
        &d,
        &format!("/api/runs/{second}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    wait_status(&d, second, "canceled");
    assert_eq!(run_of(&d, first)["status"], "running");
}

#[test]
fn a_git_job_keeps_of_the_daemons_capabilities_only_dac_override() {
    let user = test_user();
    let (url, _remote) = hung_remote();
    let b = Builder::new();
    let config = token_config(&b);
    let d = b
        .pipeline("ci", &pipeline_from(&url))
        .config(&config)
        .env("HOOKCI_SECRET_DEPLOY_KEY", DEPLOY_KEY)
        .daemon_with_caps(user, "kill,setuid,setgid,chown,dac_override")
        .start();
    let id = push(&d, "caps-fetch", "refs/heads/main", ZERO, &"d".repeat(40));
    let mut workers = Vec::new();
    eventually("the run's git job is fetching", || {
        workers = git_workers(d.pid());
        !workers.is_empty()
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", workers[0])).unwrap();
    // Bit 1 alone: CAP_DAC_OVERRIDE, which updating a reused workspace needs.
    assert_capabilities(
        &status,
        "0000000000000002",
        "the git job holds more than CAP_DAC_OVERRIDE",
    );
    let r = api_post(
        &d,
        &format!("/api/runs/{id}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    wait_status(&d, id, "canceled");
}
