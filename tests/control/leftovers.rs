//! Nothing a run started outlives it: processes that left their step's process group
//! (`setsid`, a double fork, `nohup`, an emptied environment) are gone once the run
//! has ended, however it ended, and no zombie is left behind. As root hookci uses a
//! cgroup per run where it can; as an unprivileged daemon it sweeps as a subreaper,
//! finding a run's processes by ancestry: what a step says in its environment neither
//! hides a process nor exposes another run's.

use super::*;

/// Starts escapees of every kind, each writing its pid to `DIR/<kind>.<run>.pid`, and
/// waits until all have.
fn escapes(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"setsid sh -c 'echo $$ > {d}/setsid.'$HOOKCI_RUN_ID'.pid; exec sleep 600' &
( sh -c 'echo $$ > {d}/double.'$HOOKCI_RUN_ID'.pid; exec sleep 600' & ) &
nohup setsid sh -c 'echo $$ > {d}/nohup.'$HOOKCI_RUN_ID'.pid; exec sleep 600' >/dev/null 2>&1 &
setsid env -i sh -c 'echo $$ > {d}/bare.$1.pid; exec sleep 600' sh $HOOKCI_RUN_ID &
for k in setsid double nohup bare; do
  until [ -s {d}/$k.$HOOKCI_RUN_ID.pid ]; do sleep 0.05; done
done
echo escaped"#
    )
}

const KINDS: [&str; 4] = ["setsid", "double", "nohup", "bare"];

fn pids_of(dir: &Path, run: i64) -> Vec<i32> {
    KINDS
        .iter()
        .map(|k| read_pid(&dir.join(format!("{k}.{run}.pid"))))
        .collect()
}

/// Whether `pid` is the escapee: still there (a zombie counts), running our sleep.
fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn kill_all(pids: &[i32]) {
    for pid in pids {
        let sleeping =
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x00600\x00");
        if sleeping {
            // SAFETY: signalling a test's own leftover sleep by pid.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
}

/// How the daemon contains runs, as its log says: `cgroup` or `subreaper`.
fn check_nothing_outlives_runs(b: Builder, containment: &str) {
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let pids = tempfile::Builder::new()
        .prefix("hookci-test-escapes")
        .tempdir()
        .unwrap();
    chmod(pids.path(), 0o777);
    let dir = pids.path();
    let succeeds = pipeline(&origin, "", &[step("escape", &escapes(dir))]);
    let times_out = pipeline(
        &origin,
        "",
        &[format!(
            "{}    timeout: 3s\n",
            step("escape", &format!("{}\nsleep 600", escapes(dir)))
        )],
    );
    let d = b
        .pipeline("succeeds", &succeeds)
        .pipeline("times-out", &times_out)
        .start();
    let runs = push_runs(
        &d,
        "escape-1",
        &push_body("refs/heads/main", ZERO, &sha, "x"),
    );
    let id_of = |name: &str| runs.iter().find(|(p, _)| p == name).unwrap().1;
    let mut all = Vec::new();
    let mut outlived = Vec::new();
    for (name, status) in [("succeeds", "succeeded"), ("times-out", "timed_out")] {
        let id = id_of(name);
        let run = d.wait_run(id);
        let pids = pids_of(dir, id);
        all.extend(&pids);
        if run["status"] != status || !d.run_log(id).contains("escaped") {
            kill_all(&all);
            panic!("{name}: expected {status}: {run:#}\n{}", d.run_log(id));
        }
        // The end is stored after the sweep: nothing may be left once it reads ended.
        outlived.extend(pids.into_iter().filter(|p| exists(*p)).map(|p| (name, p)));
    }
    kill_all(&all);
    assert!(
        outlived.is_empty(),
        "processes outlived their runs: {outlived:?}\n{}",
        d.log()
    );
    let zombies = zombie_children(d.pid());
    assert!(zombies.is_empty(), "zombies of the daemon: {zombies:?}");
    assert_contained_by(&d, containment);
}

/// The daemon said it contains runs by `containment`, and never fell back to another
/// way (at its start, or for one run): a silent fallback would let the other way pass
/// for this one.
fn assert_contained_by(d: &Daemon, containment: &str) {
    let log = d.log();
    let said: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("containment=\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        !said.is_empty() && said.iter().all(|c| *c == containment),
        "expected containment {containment:?}, the daemon said {said:?}\n{log}"
    );
}

#[test]
fn as_root_nothing_a_run_started_outlives_it() {
    test_user();
    check_nothing_outlives_runs(Builder::new(), "cgroup");
}

#[test]
fn as_an_unprivileged_daemon_nothing_a_run_started_outlives_it() {
    let user = test_user();
    check_nothing_outlives_runs(Builder::new().daemon_as(user), "subreaper");
}

/// A directory every user may write pid files to, removed at the end.
fn pid_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("hookci-test-escapes")
        .tempdir()
        .unwrap();
    chmod(dir.path(), 0o777);
    dir
}

/// Whether `pid` is alive: there and not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

#[test]
fn as_an_unprivileged_daemon_a_step_cannot_hide_what_it_left_by_its_environment() {
    let user = test_user();
    let b = Builder::new().daemon_as(user);
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let pids = pid_dir();
    let d = pids.path().display();
    // Escapees whose workspace variable says another run's, some other place, or none.
    let script = format!(
        r#"HOOKCI_WORKSPACE=/elsewhere setsid sh -c 'echo $$ > {d}/rewritten.pid; exec sleep 600' &
( HOOKCI_WORKSPACE="$HOOKCI_WORKSPACE/../1" sh -c 'echo $$ > {d}/forged.pid; exec sleep 600' & ) &
env -u HOOKCI_WORKSPACE setsid sh -c 'echo $$ > {d}/removed.pid; exec sleep 600' &
for k in rewritten forged removed; do
  until [ -s {d}/$k.pid ]; do sleep 0.05; done
done
echo escaped"#
    );
    let d = b
        .pipeline("hides", &pipeline(&origin, "", &[step("hide", &script)]))
        .start();
    let id = push(&d, "hide-1", "refs/heads/main", ZERO, &sha);
    let run = d.wait_run(id);
    let left: Vec<i32> = ["rewritten", "forged", "removed"]
        .iter()
        .map(|k| read_pid(&pids.path().join(format!("{k}.pid"))))
        .collect();
    let outlived: Vec<i32> = left.iter().copied().filter(|p| exists(*p)).collect();
    kill_all(&left);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.run_log(id));
    assert!(
        outlived.is_empty(),
        "processes outlived their run: {outlived:?} of {left:?}\n{}",
        d.log()
    );
    let zombies = zombie_children(d.pid());
    assert!(zombies.is_empty(), "zombies of the daemon: {zombies:?}");
    assert_contained_by(&d, "subreaper");
}

#[test]
fn as_an_unprivileged_daemon_a_run_ending_leaves_the_processes_of_a_running_one_alone() {
    let user = test_user();
    let b = Builder::new().daemon_as(user);
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let pids = pid_dir();
    let d = pids.path().display();
    // The long run's step orphans a process (a double fork) and goes on until told;
    // the short run ends meanwhile, sweeping after its step.
    let long = format!(
        r#"( sh -c 'echo $$ > {d}/long.pid; exec sleep 600' & ) &
until [ -e {d}/release ]; do sleep 0.05; done
echo released"#
    );
    let short = format!("until [ -s {d}/long.pid ]; do sleep 0.05; done\necho short");
    let d = b
        .pipeline("long", &pipeline(&origin, "", &[step("wait", &long)]))
        .pipeline("short", &pipeline(&origin, "", &[step("end", &short)]))
        .config("max_parallel_runs: 2")
        .start();
    let runs = push_runs(&d, "two-1", &push_body("refs/heads/main", ZERO, &sha, "x"));
    let id_of = |name: &str| runs.iter().find(|(p, _)| p == name).unwrap().1;
    let short_run = d.wait_run(id_of("short"));
    let orphan = read_pid(&pids.path().join("long.pid"));
    let kept = alive(orphan);
    std::fs::write(pids.path().join("release"), "").unwrap();
    let long_run = d.wait_run(id_of("long"));
    let outlived = exists(orphan);
    kill_all(&[orphan]);
    assert_eq!(short_run["status"], "succeeded", "{short_run:#}");
    assert_eq!(long_run["status"], "succeeded", "{long_run:#}");
    assert!(
        kept,
        "the end of another run killed the running step's process\n{}",
        d.log()
    );
    assert!(!outlived, "the long run's orphan outlived it\n{}", d.log());
    assert_contained_by(&d, "subreaper");
}
