//! Pushes made while hookci was down (or whose delivery never came) are found by
//! listing the remote's heads, and built once.

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

fn runs_for(d: &Daemon, commit: &str) -> Vec<serde_json::Value> {
    d.runs()
        .into_iter()
        .filter(|r| r["commit"] == commit)
        .collect()
}

#[test]
fn pushes_missed_while_down_are_built_once_and_new_refs_are_only_recorded() {
    let b = Builder::new().config("reconcile_interval: 1s");
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a", "1")], "one");
    let pipeline = format!(
        "repo: {REPO}\nclone_url: {}\non:\n  branches: [main, \"feature/*\"]\n  tags: [\"v*\"]\nsteps:\n  - run: cat a\n",
        origin.url()
    );
    let mut d = b.pipeline("ci", &pipeline).start();
    // The first reconcile only records what exists.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        d.runs().is_empty(),
        "existing refs are not built on first sight"
    );

    // A push hookci hears about.
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &c1, "x").bytes();
    let r = d.deliver("push", "seen", &body);
    assert_eq!(r.status, 202);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0));

    // While down: main moves, a new branch and a new annotated tag appear.
    let c2 = origin.commit("main", &[("a", "2")], "two");
    let feature = origin.commit("feature/x", &[("a", "f")], "feature");
    let tagged = origin.annotated_tag("v2", &c2);
    d.spawn();
    eventually("the missed push to main is built", || {
        runs_for(&d, &c2).len() == 1
    });
    let run = &runs_for(&d, &c2)[0];
    assert_eq!(run["trigger"], "reconcile");
    assert_eq!(run["ref"], "refs/heads/main");
    assert_eq!(run["before"], c1.as_str());
    assert!(run["delivery"].is_null());
    assert_eq!(
        d.wait_run(run["id"].as_i64().unwrap())["status"],
        "succeeded"
    );

    // While up: a push whose delivery never arrives is found on the next interval.
    let c3 = origin.commit("main", &[("a", "3")], "three");
    eventually("the undelivered push is built", || {
        runs_for(&d, &c3).len() == 1
    });
    let id = runs_for(&d, &c3)[0]["id"].as_i64().unwrap();
    // A late delivery of that push names the existing run: nothing builds twice.
    let late = PushPayload::new(REPO, "refs/heads/main", &c2, &c3, "x").bytes();
    let r = d.deliver("push", "late", &late);
    assert_eq!(r.json()["runs"][0]["id"], id);
    assert_eq!(r.json()["runs"][0]["existing"], true);

    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(
        runs_for(&d, &feature).is_empty(),
        "a ref seen first is recorded, not built"
    );
    assert_eq!(
        runs_for(&d, &c2).len(),
        1,
        "reconciling again builds nothing twice"
    );
    assert!(
        d.runs().iter().all(|r| r["ref"] != "refs/tags/v2"),
        "new tag {tagged} only recorded"
    );
    assert_eq!(runs_for(&d, &c3).len(), 1);
    assert_eq!(
        d.runs().len(),
        3,
        "c1 (delivered), c2 and c3 (reconciled): {:#?}",
        d.runs()
    );

    // The new branch moves: now it is built.
    let feature2 = origin.commit("feature/x", &[("a", "f2")], "feature 2");
    eventually("the moved branch is built", || {
        runs_for(&d, &feature2).len() == 1
    });
    assert_eq!(runs_for(&d, &feature2)[0]["ref"], "refs/heads/feature/x");
}
