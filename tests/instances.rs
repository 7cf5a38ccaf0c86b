//! Several instances on one PostgreSQL database: two real daemons, each with its own
//! state directory and port, sharing the store. Deliveries spread over both are each
//! stored once, each commit builds once, both instances build, and a concurrency
//! group never has two running runs across them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

/// A daemon on `db` with one pipeline `ci` building `origin`'s pushes.
fn instance(db: &Scratch, origin: &Origin, extra: &str, steps: &str) -> Daemon {
    Builder::new()
        .database(db)
        .config("max_parallel_runs: 3")
        .pipeline(
            "ci",
            &format!(
                "repo: {REPO}\nclone_url: {}\non:\n  branches: [main]\n{extra}steps:\n{steps}",
                origin.url()
            ),
        )
        .start()
}

/// Every run, through one daemon's API (it reads the shared store), newest first.
fn all_runs(d: &Daemon) -> Vec<Value> {
    let mut runs = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let page = match before {
            Some(id) => d.get_json(&format!("/api/runs?limit=500&before={id}")),
            None => d.get_json("/api/runs?limit=500"),
        };
        runs.extend(page["runs"].as_array().unwrap().iter().cloned());
        match page["next_before"].as_i64() {
            Some(id) => before = Some(id),
            None => return runs,
        }
    }
}

fn the_instance(d: &Daemon) -> String {
    std::fs::read_to_string(d.state_dir().join("instance"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Waits until every run ends.
fn wait_all_ended(d: &Daemon, expected: usize) -> Vec<Value> {
    let mut runs = Vec::new();
    eventually_within(Duration::from_secs(240), "every run ends", || {
        runs = all_runs(d);
        runs.len() >= expected
            && runs
                .iter()
                .all(|r| r["status"] != "queued" && r["status"] != "running")
    });
    runs
}

#[test]
fn two_instances_store_each_delivery_once_and_build_each_commit_once() {
    let db = test_database();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    let mut commits = Vec::new();
    let mut before = ZERO.to_owned();
    for i in 0..200 {
        let sha = origin.commit("main", &[("n", &i.to_string())], &format!("commit {i}"));
        commits.push((before.clone(), sha.clone()));
        before = sha;
    }
    // No group: runs of one branch build side by side, on whichever instance is free.
    let group = "concurrency: { group: none }\n";
    let steps = "  - name: build\n    run: echo built $HOOKCI_COMMIT\n";
    let a = instance(&db, &origin, group, steps);
    let b = instance(&db, &origin, group, steps);
    let daemons = [&a, &b];
    let push = |(before, after): &(String, String)| {
        PushPayload::new(REPO, "refs/heads/main", before, after, "x").bytes()
    };

    // 200 distinct pushes, alternating between the instances, four senders at once.
    let statuses: Vec<(String, u16)> = std::thread::scope(|s| {
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let commits = &commits;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for (i, c) in commits.iter().enumerate().filter(|(i, _)| i % 4 == t) {
                        let id = format!("push-{i}");
                        let r = daemons[i % 2].deliver("push", &id, &push(c));
                        out.push((id, r.status));
                    }
                    out
                })
            })
            .collect();
        senders
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(
        statuses.iter().all(|(_, st)| *st == 202),
        "{:?}",
        statuses
            .iter()
            .filter(|(_, st)| *st != 202)
            .collect::<Vec<_>>()
    );

    // 40 duplicates at once, spread over both: 20 redeliveries of one delivery id,
    // and 20 new ids for one push (as an org hook and a repo hook send it).
    let last = &commits[199];
    let duplicates: Vec<(String, u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..40)
            .map(|i| {
                s.spawn(move || {
                    let id = if i < 20 {
                        "push-7".to_owned()
                    } else {
                        format!("again-{i}")
                    };
                    let r = daemons[i % 2].deliver("push", &id, &push(last));
                    (id, r.status, r.json())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (id, status, body) in &duplicates {
        if id == "push-7" {
            assert_eq!(
                (*status, &body["duplicate"]),
                (200, &Value::Bool(true)),
                "{id}: {body}"
            );
        } else {
            assert_eq!(*status, 202, "{id}: {body}");
            assert_eq!(body["runs"][0]["existing"], true, "{id}: {body}");
        }
    }

    // Every acknowledged delivery is stored, once, and readable through either.
    let mut acknowledged: BTreeSet<String> = statuses.into_iter().map(|(id, _)| id).collect();
    acknowledged.extend(duplicates.into_iter().map(|(id, _, _)| id));
    assert_eq!(acknowledged.len(), 220);
    for (i, id) in acknowledged.iter().enumerate() {
        let r = daemons[i % 2].get(&format!("/api/deliveries/{id}"));
        assert_eq!(r.status, 200, "{id}: {}", r.text());
    }
    assert_eq!(db.count_rows("deliveries").unwrap(), 220);

    // Exactly one run per commit, every one ended, and both instances built.
    let runs = wait_all_ended(&a, 200);
    let mut per_commit: BTreeMap<&str, usize> = BTreeMap::new();
    for run in &runs {
        *per_commit
            .entry(run["commit"].as_str().unwrap())
            .or_default() += 1;
        assert_eq!(run["status"], "succeeded", "{run:#}");
    }
    assert_eq!(runs.len(), 200);
    assert_eq!(per_commit.len(), 200);
    assert!(per_commit.values().all(|n| *n == 1), "{per_commit:?}");
    let by_instance: BTreeMap<String, usize> = runs.iter().fold(BTreeMap::new(), |mut m, run| {
        *m.entry(run["instance"].as_str().unwrap().to_owned())
            .or_default() += 1;
        m
    });
    assert_eq!(
        by_instance.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([the_instance(&a), the_instance(&b)]),
        "both instances ran some: {by_instance:?}"
    );
}

#[test]
fn a_concurrency_group_never_runs_twice_at_once_across_instances() {
    let db = test_database();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    // Each run's step holds a lock directory for a moment: a second run of the group
    // in its step at the same time, on either instance, finds it taken.
    let lock = scratch.path().join("held");
    let overlaps = scratch.path().join("overlaps");
    let steps = format!(
        "  - name: build\n    run: |\n      if mkdir {lock}; then sleep 0.3; rmdir {lock}; else echo $HOOKCI_RUN_ID >> {overlaps}; fi\n",
        lock = lock.display(),
        overlaps = overlaps.display()
    );
    let group = "concurrency: { group: pipeline, cancel: none }\n";
    let a = instance(&db, &origin, group, &steps);
    let b = instance(&db, &origin, group, &steps);
    let daemons = [&a, &b];
    let mut before = ZERO.to_owned();
    for i in 0..12 {
        let sha = origin.commit("main", &[("n", &i.to_string())], &format!("commit {i}"));
        let body = PushPayload::new(REPO, "refs/heads/main", &before, &sha, "x").bytes();
        let r = daemons[i % 2].deliver("push", &format!("group-{i}"), &body);
        assert_eq!(r.status, 202, "{}", r.text());
        before = sha;
    }
    let runs = wait_all_ended(&b, 12);
    assert_eq!(runs.len(), 12);
    for run in &runs {
        assert_eq!(run["status"], "succeeded", "{run:#}");
    }
    assert!(
        !overlaps.exists(),
        "runs of one group ran at once: {}",
        std::fs::read_to_string(&overlaps).unwrap_or_default()
    );
}
