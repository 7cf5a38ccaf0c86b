//! The end of a run is stored before its workspace is removed, and an end the store
//! refuses for a while is stored once it can be: never lost, never run again.

use super::git_jobs::{git_workers, hung_remote};
use super::*;

/// Files the step leaves in its workspace, so that removing it takes a while.
const FILES: usize = 20_000;

#[test]
fn a_crash_while_an_ended_runs_workspace_is_removed_does_not_run_it_again() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let executions = b.path().join("executions");
    let filled = b.path().join("filled");
    let script = format!(
        "echo $HOOKCI_RUN_ID >> {}\nmkdir junk\n(cd junk && seq 1 {FILES} | xargs touch)\ntouch {}",
        executions.display(),
        filled.display()
    );
    let mut d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("fill", &script)]))
        .start();
    let id = push(&d, "slow-removal", "refs/heads/main", ZERO, &sha);
    let workspace = d.state_dir().join(format!("workspaces/{id}"));
    // Thousands of files take a while on a loaded machine.
    eventually_within(
        Duration::from_secs(90),
        "the step filled its workspace",
        || filled.exists(),
    );

    // Killed as soon as the workspace is being removed (fewer files than the step left,
    // or none): from then on the run must count as ended.
    let junk = workspace.join("junk");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&junk).map_or(0, |e| e.count()) >= FILES {
        assert!(Instant::now() < deadline, "the workspace was never removed");
        std::thread::sleep(Duration::from_millis(2));
    }
    d.signal(libc::SIGKILL);
    d.wait();

    d.spawn();
    let run = run_of(&d, id);
    assert_eq!(
        (run["status"].as_str(), run["attempt"].as_i64()),
        (Some("succeeded"), Some(1)),
        "an ended run is not queued again: {run:#}"
    );
    assert_eq!(run["steps"][0]["status"], "succeeded", "{run:#}");
    let runs = std::fs::read_to_string(&executions).unwrap();
    assert_eq!(runs.lines().count(), 1, "executed once: {runs}");
    assert!(
        !workspace.exists(),
        "the start removes what the crash left of the workspace"
    );
}

#[test]
fn an_end_the_store_refuses_for_a_while_is_stored_later_and_the_group_moves_on() {
    let (hung, _remote) = hung_remote();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let config = token_config(&b);
    // No clone_url: each run fetches from its push's, so the first one can hang in its
    // fetch (the end is then its only write) while the second one can build.
    let yaml = format!(
        "repo: {REPO}\nsteps:\n{}",
        step("build", "echo built $HOOKCI_COMMIT")
    );
    let d = b.pipeline("ci", &yaml).config(&config).start();
    let from = |url: &str, after: &str| PushPayload::new(REPO, "refs/heads/main", ZERO, after, url);
    let first = push_runs(&d, "hangs", &from(&hung, &"c".repeat(40)).bytes())[0].1;
    eventually("the first run's git job is fetching", || {
        !git_workers(d.pid()).is_empty()
    });
    let second = push_runs(&d, "builds", &from(&origin.url(), &sha).bytes())[0].1;
    assert_eq!(
        run_of(&d, second)["status"],
        "queued",
        "same ref, same group: it waits for the first"
    );

    // The test takes the store's write lock and holds it past the store's busy timeout.
    let db = rusqlite::Connection::open(d.state_dir().join("hookci.db")).unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let r = api_post(
        &d,
        &format!("/api/runs/{first}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    // The store gives up on a write after its busy timeout (10 s); a write queued
    // behind another one the lock also holds up waits out both.
    eventually_within(
        Duration::from_secs(45),
        "writing the first run's end fails",
        || {
            let log = d.log();
            log.lines()
                .any(|l| l.contains("cannot record") && l.contains("the end of the run"))
        },
    );
    assert_eq!(run_of(&d, first)["status"], "running", "not stored yet");
    db.execute_batch("ROLLBACK").unwrap();

    let run = d.wait_run(first);
    assert_eq!(run["status"], "canceled", "{run:#}");
    assert_eq!(reason(&run), "canceled through the API");
    let run = d.wait_run(second);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert!(d.run_log(second).contains(&format!("built {sha}")));
}
