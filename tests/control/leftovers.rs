//! Nothing a run started outlives it: processes that left their step's process group
//! (`setsid`, a double fork, `nohup`, an emptied environment) are gone once the run
//! has ended, however it ended, and no zombie is left behind. As root hookci uses a
//! cgroup per run where it can; as an unprivileged daemon it sweeps as a subreaper.

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
