//! Several instances on one PostgreSQL database: two real daemons, each with its own
//! state directory and port, sharing the store. Deliveries spread over both are each
//! stored once, each commit builds once, both instances build, a concurrency group
//! never has two running runs across them, the runs of an instance that dies are
//! built again by the other once its leases lapse, and a cancel sent to either stops
//! a run on the other; a daemon whose database stops answering still stops.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

/// A daemon on `db` with one pipeline `ci` building `origin`'s pushes.
fn instance(db: &Scratch, origin: &Origin, extra: &str, steps: &str) -> Daemon {
    instance_with(db, origin, "", extra, steps)
}

/// [`instance`], with more config lines.
fn instance_with(db: &Scratch, origin: &Origin, config: &str, extra: &str, steps: &str) -> Daemon {
    instance_on(Builder::new().database(db), origin, config, extra, steps)
}

/// [`instance_with`], its store named by `builder`.
fn instance_on(
    builder: Builder,
    origin: &Origin,
    config: &str,
    extra: &str,
    steps: &str,
) -> Daemon {
    builder
        .config("max_parallel_runs: 3")
        .config(config)
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

/// A daemon on `db` that runs one run at a time, with two pipelines: `ci` builds
/// `main` in one concurrency group, running `steps`, and `side` builds the `side`
/// branch in none.
fn one_at_a_time(db: &Scratch, origin: &Origin, steps: &str) -> Daemon {
    let pipeline = |branch: &str, group: &str, steps: &str| {
        format!(
            "repo: {REPO}\nclone_url: {}\non:\n  branches: [{branch}]\nconcurrency: {group}\nsteps:\n{steps}",
            origin.url()
        )
    };
    Builder::new()
        .database(db)
        .config("max_parallel_runs: 1\nshutdown_grace: 60s")
        .pipeline(
            "ci",
            &pipeline("main", "{ group: pipeline, cancel: none }", steps),
        )
        .pipeline(
            "side",
            &pipeline(
                "side",
                "{ group: none }",
                "  - name: quick\n    run: echo quick\n",
            ),
        )
        .start()
}

/// Pushes a new commit of `branch` to `d`; the run it queued.
fn push_one(d: &Daemon, origin: &Origin, branch: &str, n: usize) -> i64 {
    let sha = origin.commit(branch, &[("n", &n.to_string())], &format!("commit {n}"));
    let body = PushPayload::new(REPO, &format!("refs/heads/{branch}"), ZERO, &sha, "x").bytes();
    let r = d.deliver("push", &format!("push-{n}"), &body);
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["runs"][0]["id"].as_i64().unwrap()
}

#[test]
fn a_concurrency_group_never_runs_twice_at_once_across_instances() {
    let db = test_database();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    // Each run of the group notes when its step starts and ends (one file per run), and
    // waits in between until the test opens the gate.
    let (times, gate) = (scratch.path().join("times"), scratch.path().join("gate"));
    std::fs::create_dir(&times).unwrap();
    let steps = format!(
        "  - name: build\n    run: |\n      date +%s%N >> {times}/$HOOKCI_RUN_ID\n      while [ ! -f {gate} ]; do sleep 0.05; done\n      date +%s%N >> {times}/$HOOKCI_RUN_ID\n",
        times = times.display(),
        gate = gate.display()
    );
    let started = |id: i64| times.join(id.to_string()).exists();

    // The first run of the group holds it on instance a, alone so far: its only slot.
    let mut a = one_at_a_time(&db, &origin, &steps);
    let first = push_one(&a, &origin, "main", 0);
    eventually("the group's first run is in its step", || started(first));

    // Instance b, idle, is given more of the group, and then a run of no group. It
    // takes the latter, pushed last, past the group's queued runs: they stay queued
    // while a holds the group.
    let b = one_at_a_time(&db, &origin, &steps);
    let queued: Vec<i64> = (1..5)
        .map(|n| push_one([&b, &a][n % 2], &origin, "main", n))
        .collect();
    let side = push_one(&b, &origin, "side", 5);
    let run = b.wait_run(side);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["instance"], the_instance(&b), "{run:#}");
    for id in &queued {
        let run = b.get_json(&format!("/api/runs/{id}"));
        assert_eq!(run["status"], "queued", "{run:#}");
        assert!(!started(*id), "{id} started while the group was held");
    }
    let run = b.get_json(&format!("/api/runs/{first}"));
    assert_eq!(run["status"], "running", "{run:#}");
    assert_eq!(run["instance"], the_instance(&a), "{run:#}");

    // Instance a stops: it starts nothing more, and lets its run finish. Only then does
    // the group pass to b, which builds the rest.
    a.signal(libc::SIGTERM);
    eventually("instance a is stopping", || {
        a.log().contains("stopping: no new run starts")
    });
    std::fs::write(&gate, "").unwrap();
    assert_eq!(a.wait(), Some(0), "{}", a.log());
    let runs = wait_all_ended(&b, 6);
    assert_eq!(runs.len(), 6);
    let instance_of: BTreeMap<i64, String> = runs
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "succeeded", "{r:#}");
            let id = r["id"].as_i64().unwrap();
            (id, r["instance"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(instance_of[&first], the_instance(&a));
    for id in &queued {
        assert_eq!(instance_of[id], the_instance(&b), "{id}");
    }

    // No two of the group's steps overlapped in time, whichever instance ran them.
    let mut spans: Vec<(u128, u128, i64)> = std::iter::once(first)
        .chain(queued.iter().copied())
        .map(|id| {
            let noted = std::fs::read_to_string(times.join(id.to_string())).unwrap();
            let t: Vec<u128> = noted.lines().map(|l| l.trim().parse().unwrap()).collect();
            assert_eq!(t.len(), 2, "run {id}: {noted}");
            (t[0], t[1], id)
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 < pair[1].0,
            "runs {} and {} of one group ran at once: {spans:?}",
            pair[0].2,
            pair[1].2
        );
    }
}

#[test]
fn each_change_to_a_runs_log_is_announced_to_every_instance_once_readable() {
    use hookci::store::{LogNotice, LogPiece, NewRun, RunStatus, StepEnd, StepStatus, Supersede};

    let db = test_database();
    let scratch = Builder::new();
    let open = |instance: &str| {
        let lease = std::time::Duration::from_secs(15);
        hookci::store::open(Some(db.target()), scratch.path(), instance, lease).unwrap()
    };
    let (runner, other) = (open("runner"), open("other"));
    let mut notices = other.log_notices().expect("a shared store has log notices");
    let queue = |commit: char| {
        runner
            .create_run(NewRun {
                key: None,
                group: None,
                supersede: Supersede::Nothing,
                supersede_own_ref: false,
                generation: 1,
                pipeline: "ci".into(),
                repo: REPO.into(),
                git_ref: "refs/heads/main".into(),
                commit: commit.to_string().repeat(40),
                before: ZERO.into(),
                clone_url: "/nowhere".into(),
                trigger: "manual",
                skipped: None,
            })
            .unwrap()
            .id
    };
    let (id, later) = (queue('a'), queue('b'));
    assert_ne!(id, later);
    assert_eq!(runner.claim_next().unwrap().map(|r| r.id), Some(id));
    runner
        .plan_steps(id, vec!["talk".into()], hookci::store::OnInterrupt::Retry)
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A deadline for the notice only, far above any delivery of it.
    let mut heard = || {
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), notices.recv())
                .await
                .expect("the other instance heard nothing")
                .unwrap()
        })
    };

    // Each is heard by the other instance, naming the run, after it is committed.
    runner.step_started(id, 1).unwrap().unwrap();
    assert_eq!(heard(), LogNotice::Run(id));
    assert_eq!(other.steps(id).unwrap()[0].status, StepStatus::Running);
    let mut at = 0;
    for line in ["first line\n", "second line\n"] {
        let piece = LogPiece {
            run: id,
            attempt: 1,
            step: 1,
            at,
            bytes: line.as_bytes().to_vec(),
        };
        runner.append_log(piece).unwrap();
        assert_eq!(heard(), LogNotice::Run(id));
        assert_eq!(
            other.read_log(id, 1, 1, at, 1 << 20).unwrap(),
            line.as_bytes()
        );
        at += line.len() as u64;
    }
    let end = StepEnd {
        status: StepStatus::Succeeded,
        exit_code: Some(0),
        signal: None,
        reason: None,
    };
    runner.step_finished(id, 1, end).unwrap().unwrap();
    assert_eq!(heard(), LogNotice::Run(id));
    assert_eq!(other.steps(id).unwrap()[0].status, StepStatus::Succeeded);
    runner
        .finish_run(id, RunStatus::Succeeded, None, StepStatus::Skipped)
        .unwrap()
        .unwrap();
    assert_eq!(heard(), LogNotice::Run(id));
    assert_eq!(other.run(id).unwrap().unwrap().status, RunStatus::Succeeded);

    // The next run's news names that run.
    assert_eq!(runner.claim_next().unwrap().map(|r| r.id), Some(later));
    runner
        .plan_steps(
            later,
            vec!["talk".into()],
            hookci::store::OnInterrupt::Retry,
        )
        .unwrap();
    runner.step_started(later, 1).unwrap().unwrap();
    assert_eq!(heard(), LogNotice::Run(later));

    // Recovery of a lapsed lease is news too: the run queued again, then ended
    // canceled by a cancel its lost owner never applied.
    let lapse = || {
        db.execute(&format!(
            "UPDATE runs SET lease_until = 0 WHERE id = {later}"
        ))
        .unwrap();
    };
    lapse();
    assert_eq!(
        other
            .recover_expired(&[])
            .unwrap()
            .into_iter()
            .map(|r| (r.run, r.attempt, r.status))
            .collect::<Vec<_>>(),
        vec![(later, 1, RunStatus::Queued)]
    );
    assert_eq!(heard(), LogNotice::Run(later));
    assert_eq!(other.run(later).unwrap().unwrap().status, RunStatus::Queued);
    assert_eq!(other.claim_next().unwrap().map(|r| r.id), Some(later));
    assert!(runner.request_cancel(later, "canceled".into()).unwrap());
    lapse();
    assert_eq!(
        runner
            .recover_expired(&[])
            .unwrap()
            .into_iter()
            .map(|r| (r.run, r.attempt, r.status))
            .collect::<Vec<_>>(),
        vec![(later, 2, RunStatus::Canceled)]
    );
    assert_eq!(heard(), LogNotice::Run(later));
    assert_eq!(
        other.run(later).unwrap().unwrap().status,
        RunStatus::Canceled
    );
}

const TOKEN: &str = "instances-api-token";

/// Config for instances that take API calls and hold their runs for a short lease.
fn short_leases(scratch: &Builder) -> String {
    leases_of(scratch, "2s")
}

/// Config for instances that take API calls and hold their runs for `lease` (at
/// least 2 s: a shared database wants `step_grace` within a third of it).
fn leases_of(scratch: &Builder, lease: &str) -> String {
    leases_and_grace(scratch, lease, "500ms")
}

/// [`leases_of`], steps given `grace` (at most a third of `lease`) to stop.
fn leases_and_grace(scratch: &Builder, lease: &str, grace: &str) -> String {
    let token = scratch.path().join("api-token");
    std::fs::write(&token, TOKEN).unwrap();
    format!(
        "lease: {lease}\nstep_grace: {grace}\napi_token_file: {}",
        token.display()
    )
}

/// Run `id`'s column `column`, as the database holds it.
fn run_column(db: &Scratch, id: i64, column: &str) -> Option<i64> {
    db.number(&format!("SELECT {column} FROM runs WHERE id = {id}"))
        .unwrap()
}

fn db_clock(db: &Scratch) -> i64 {
    db.number("SELECT hookci_clock_ms()").unwrap().unwrap()
}

fn read_pids(path: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Pushes one commit to `d` and waits until its run's long step runs (its pid in
/// `pids`); the run's id and the instance running it.
fn start_long_run(d: &Daemon, origin: &Origin, pids: &std::path::Path) -> (i64, String) {
    let sha = origin.commit("main", &[("a", "1")], "long");
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let r = d.deliver("push", "long-1", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    eventually("the long step runs", || read_pids(pids).len() == 1);
    let run = d.get_json(&format!("/api/runs/{id}"));
    assert_eq!(run["status"], "running", "{run:#}");
    (id, run["instance"].as_str().unwrap().to_owned())
}

/// Kills the processes a test's steps left behind (a SIGKILLed daemon cannot).
fn kill_all(pids: &[i32]) {
    for pid in pids {
        // SAFETY: signalling a process by pid; at worst it is gone already.
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
        }
    }
}

#[test]
fn the_runs_of_an_instance_killed_mid_step_are_built_again_by_the_other() {
    let db = test_database();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    let config = short_leases(&scratch);
    // The first attempt sleeps until killed; the next one, wherever it runs, ends.
    let (pids, marker) = (scratch.path().join("pids"), scratch.path().join("tried"));
    let steps = format!(
        "  - name: long\n    run: |\n      if [ -e {marker} ]; then echo again; exit 0; fi\n      touch {marker}\n      sleep 600 & echo $! >> {pids}; wait\n",
        marker = marker.display(),
        pids = pids.display()
    );
    let a = instance_with(&db, &origin, &config, "", &steps);
    let b = instance_with(&db, &origin, &config, "", &steps);
    let (id, owner) = start_long_run(&a, &origin, &pids);
    let (mut dead, survivor) = if owner == the_instance(&a) {
        (a, b)
    } else {
        (b, a)
    };

    // Read before the kill: a renewal after the read holds the run even longer.
    let held_until = run_column(&db, id, "lease_until").unwrap();
    dead.signal(libc::SIGKILL);
    dead.wait();
    let run = survivor.wait_run(id);
    kill_all(&read_pids(&pids));
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", survivor.log());
    assert_eq!(run["attempt"], 2, "{run:#}");
    let restarted = run_column(&db, id, "started_at").unwrap();
    assert!(
        restarted >= held_until,
        "attempt 2 started at {restarted}, before attempt 1's lease ran out at {held_until}"
    );
    assert_eq!(run["instance"], the_instance(&survivor), "{run:#}");
    assert_ne!(run["instance"], owner.as_str());
    assert!(
        survivor
            .log()
            .contains("recovered a run whose instance's lease lapsed"),
        "{}",
        survivor.log()
    );
    assert_eq!(read_pids(&pids).len(), 1, "attempt 2 did not sleep");
}

#[test]
fn an_instance_cut_off_from_the_database_stops_its_steps_before_another_runs_them_again() {
    let db = test_database();
    // The instance that runs the step connects as a role of its own, which the test
    // then locks out: for that instance the database is gone, for the other not.
    let role = db.role().unwrap();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    let config = short_leases(&scratch);
    let (pids, marker, overlap) = (
        scratch.path().join("pids"),
        scratch.path().join("tried"),
        scratch.path().join("overlap"),
    );
    // Attempt 2 notes whether attempt 1's sleep still runs (a zombie does not count).
    let steps = format!(
        "  - name: long\n    run: |\n      if [ -e {marker} ]; then\n        for p in $(cat {pids}); do\n          s=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null)\n          case \"$s\" in ''|Z|X) ;; *) echo $p >> {overlap} ;; esac\n        done\n        echo again; exit 0\n      fi\n      touch {marker}\n      sleep 600 & echo $! >> {pids}; wait\n",
        marker = marker.display(),
        pids = pids.display(),
        overlap = overlap.display(),
    );
    let cut = instance_on(
        Builder::new().database_as(&role),
        &origin,
        &config,
        "",
        &steps,
    );
    let (id, owner) = start_long_run(&cut, &origin, &pids);
    assert_eq!(owner, the_instance(&cut));
    let other = instance_with(&db, &origin, &config, "", &steps);
    let sleep = read_pids(&pids)[0];

    db.lock_out(&role).unwrap();
    let run = other.wait_run(id);
    let gone = process_gone(sleep);
    kill_all(&read_pids(&pids));
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", other.log());
    assert_eq!(run["attempt"], 2, "{run:#}");
    assert_eq!(run["instance"], the_instance(&other), "{run:#}");
    assert!(
        !overlap.exists(),
        "attempt 1's step still ran when attempt 2 started:\n{}",
        cut.log()
    );
    assert!(gone, "attempt 1's step was stopped");
    assert!(
        cut.log().contains("cannot renew this instance's leases"),
        "{}",
        cut.log()
    );
}

#[test]
fn the_end_of_a_steps_output_waits_out_a_database_that_is_gone_for_a_while() {
    let db = test_database();
    // The instance that runs the step connects as a role of its own, locked out as the
    // step ends: its output's last batch can only reach the store once the role is let
    // in again, more than a second later.
    let role = db.role().unwrap();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    // Long: the outage stays well within a third of it, so the run stays this
    // instance's (no fencing, no recovery elsewhere).
    let config = leases_of(&scratch, "20s");
    let (ready, go) = (scratch.path().join("ready"), scratch.path().join("go"));
    let steps = format!(
        "  - name: talk\n    run: |\n      echo first-line\n      touch {ready}\n      while [ ! -e {go} ]; do sleep 0.05; done\n      echo last-line\n",
        ready = ready.display(),
        go = go.display(),
    );
    let cut = instance_on(
        Builder::new().database_as(&role),
        &origin,
        &config,
        "",
        &steps,
    );
    let other = instance_with(&db, &origin, &config, "", &steps);
    let id = push_one(&cut, &origin, "main", 1);
    eventually("the step has printed its first line", || ready.exists());

    db.lock_out(&role).unwrap();
    std::fs::write(&go, "").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    db.let_in(&role).unwrap();

    let run = other.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", cut.log());
    assert_eq!(run["attempt"], 1, "{run:#}");
    let log = other.run_log(id);
    assert!(
        log.contains("first-line") && log.contains("last-line"),
        "the other instance serves the whole log: {log}\n{}",
        cut.log()
    );
    assert!(
        !cut.log().contains("could not be kept in the store"),
        "{}",
        cut.log()
    );
}

#[test]
fn an_instance_that_cannot_renew_claims_no_run_until_it_can() {
    let db = test_database();
    let role = db.role().unwrap();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    let config = short_leases(&scratch);
    let (pids, marker) = (scratch.path().join("pids"), scratch.path().join("tried"));
    // The first run's step sleeps until killed; every later one ends at once.
    let steps = format!(
        "  - name: long\n    run: |\n      if [ -e {marker} ]; then echo again; exit 0; fi\n      touch {marker}\n      sleep 600 & echo $! >> {pids}; wait\n",
        marker = marker.display(),
        pids = pids.display()
    );
    let cut = instance_on(
        Builder::new().database_as(&role),
        &origin,
        &config,
        "",
        &steps,
    );
    let (first, _) = start_long_run(&cut, &origin, &pids);

    // Its pool still works (it takes the push below), its renewals do not.
    db.cut_renewals(&role).unwrap();
    eventually("the instance stops claiming", || {
        cut.log()
            .contains("it claims no run until a renewal goes through")
    });
    let sha = origin.commit("main", &[("b", "2")], "second");
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let r = cut.deliver("push", "second-1", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    let second = r.json()["runs"][0]["id"].as_i64().unwrap();

    let other = instance_with(&db, &origin, &config, "", &steps);
    let run = other.wait_run(second);
    let again = other.wait_run(first);
    kill_all(&read_pids(&pids));
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", cut.log());
    assert_eq!(
        (&run["attempt"], &run["instance"]),
        (&Value::from(1), &Value::from(the_instance(&other))),
        "claimed once, by the instance that can hold it: {run:#}\n{}",
        cut.log()
    );
    assert_eq!(again["status"], "succeeded", "{again:#}");
    assert_eq!(again["attempt"], 2, "{again:#}");
}

#[test]
fn one_failed_renewal_stops_no_run() {
    let db = test_database();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    // Long enough that the test surely sees the renewal wait before it gives up.
    let config = leases_of(&scratch, "12s");
    let (pids, go) = (scratch.path().join("pids"), scratch.path().join("go"));
    // Runs until the test lets it end.
    let steps = format!(
        "  - name: long\n    run: |\n      echo $$ >> {pids}\n      while [ ! -e {go} ]; do sleep 0.05; done\n",
        pids = pids.display(),
        go = go.display()
    );
    let d = instance_with(&db, &origin, &config, "", &steps);
    let (id, _) = start_long_run(&d, &origin, &pids);

    // One renewal fails: held up by a lock on the run, its connection is then ended.
    let renewer = hookci::store::postgres::RENEWER_NAME;
    let waiting = format!(
        "SELECT pid::BIGINT AS pid FROM pg_stat_activity WHERE datname = current_database()
          AND application_name = '{renewer}' AND wait_event_type = 'Lock'"
    );
    let held = db
        .hold(&format!(
            "SELECT 1 FROM runs WHERE id = {id} FOR NO KEY UPDATE"
        ))
        .unwrap();
    eventually("a renewal waits for the run's lock", || {
        db.number(&waiting).unwrap().is_some()
    });
    let before = run_column(&db, id, "lease_until").unwrap();
    db.execute(&format!(
        "SELECT pg_terminate_backend(pid::INT) FROM ({waiting}) w"
    ))
    .unwrap();
    drop(held);
    eventually("a renewal goes through again", || {
        run_column(&db, id, "lease_until").unwrap() > before
    });
    std::fs::write(&go, "").unwrap();
    let run = d.wait_run(id);
    kill_all(&read_pids(&pids));
    assert!(
        d.log()
            .contains("cannot renew the leases of the running runs"),
        "{}",
        d.log()
    );
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.log());
    assert_eq!(run["attempt"], 1, "{run:#}\n{}", d.log());
    assert!(!d.log().contains("stopping the run's steps"), "{}", d.log());
}

/// A run of two instances sharing `db`, its owner killed, and a cancel of it answered
/// 202 by the other instance. The pipeline's one step records in `again` that it was
/// built again (after its first attempt's processes went to `pids`).
struct Orphaned {
    dead: Daemon,
    other: Daemon,
    id: i64,
    owner: String,
    pids: std::path::PathBuf,
    again: std::path::PathBuf,
    /// The run's lease when its owner was killed, and the database's clock when the
    /// cancel was answered.
    held_until: i64,
    asked_at: i64,
    _scratch: Builder,
}

fn orphaned_then_canceled(db: &Scratch, lease: &str) -> Orphaned {
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    let config = leases_of(&scratch, lease);
    let (pids, again) = (scratch.path().join("pids"), scratch.path().join("again"));
    let steps = format!(
        "  - name: long\n    run: |\n      if [ -s {pids} ]; then echo $HOOKCI_RUN_ID >> {again}; exit 0; fi\n      sleep 600 & echo $! >> {pids}; wait\n",
        pids = pids.display(),
        again = again.display(),
    );
    let a = instance_with(db, &origin, &config, "", &steps);
    let b = instance_with(db, &origin, &config, "", &steps);
    let (id, owner) = start_long_run(&a, &origin, &pids);
    let (mut dead, other) = if owner == the_instance(&a) {
        (a, b)
    } else {
        (b, a)
    };
    let held_until = run_column(db, id, "lease_until").unwrap();
    dead.signal(libc::SIGKILL);
    dead.wait();
    let r = other.post(
        &format!("/api/runs/{id}/cancel"),
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("content-type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let asked_at = db_clock(db);
    Orphaned {
        dead,
        other,
        id,
        owner,
        pids,
        again,
        held_until,
        asked_at,
        _scratch: scratch,
    }
}

#[test]
fn a_cancel_sent_while_a_dead_instance_still_held_the_run_ends_it_canceled() {
    let db = test_database();
    // Long enough that the cancel is surely sent before the dead instance's lease lapses.
    let o = orphaned_then_canceled(&db, "10s");
    let (survivor, id, pids, again) = (&o.other, o.id, &o.pids, &o.again);
    assert!(
        o.asked_at < o.held_until,
        "the cancel came after the lease lapsed: this test needs a longer lease here"
    );
    let run = survivor.wait_run(id);
    kill_all(&read_pids(pids));
    assert_eq!(run["status"], "canceled", "{run:#}\n{}", survivor.log());
    assert_eq!(run["reason"], "canceled through the API", "{run:#}");
    assert_eq!(run["attempt"], 1, "{run:#}");
    assert_eq!(run["steps"][0]["status"], "canceled", "{run:#}");
    assert!(!again.exists(), "the run was built again");
    // Logged once the recovery's commit is in, which the API may show first.
    eventually("the recovering instance logs the run it canceled", || {
        canceled_lines(survivor, id, "run of a lapsed lease canceled") > 0
    });
    assert_eq!(
        canceled_lines(survivor, id, "run of a lapsed lease canceled"),
        1,
        "{}",
        survivor.log()
    );
}

/// How many `info` lines of `d`'s log say `what` of run `id` of pipeline `ci`.
fn canceled_lines(d: &Daemon, id: i64, what: &str) -> usize {
    d.log()
        .lines()
        .filter(|l| {
            l.contains(" INFO ")
                && l.contains(what)
                && l.split_whitespace().any(|w| w == format!("run={id}"))
                && l.split_whitespace().any(|w| w == "pipeline=ci")
        })
        .count()
}

#[test]
fn a_cancel_sent_while_its_instance_was_down_ends_the_run_canceled_at_its_restart() {
    let db = test_database();
    // Long enough that the dead instance is back before its lease lapses: the other
    // one does not recover the run first.
    let mut o = orphaned_then_canceled(&db, "60s");
    let (down, other) = (&mut o.dead, &o.other);
    let (id, owner, pids, again) = (o.id, &o.owner, &o.pids, &o.again);
    down.spawn();
    let run = down.wait_run(id);
    kill_all(&read_pids(pids));
    assert_eq!(run["status"], "canceled", "{run:#}\n{}", down.log());
    assert_eq!(run["reason"], "canceled through the API", "{run:#}");
    assert_eq!(run["attempt"], 1, "{run:#}");
    assert_eq!(run["instance"], owner.as_str(), "{run:#}");
    assert_eq!(run["steps"][0]["status"], "canceled", "{run:#}");
    assert!(!again.exists(), "the run was built again");
    assert_eq!(
        canceled_lines(down, id, "interrupted run canceled"),
        1,
        "{}",
        down.log()
    );
    assert!(
        !other
            .log()
            .contains("recovered a run whose instance's lease lapsed"),
        "{}",
        other.log()
    );
}

#[test]
fn a_cancel_sent_to_one_instance_stops_a_run_running_on_the_other() {
    let db = test_database();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    let config = short_leases(&scratch);
    let pids = scratch.path().join("pids");
    let steps = format!(
        "  - name: long\n    run: sleep 600 & echo $! >> {}; wait\n",
        pids.display()
    );
    let a = instance_with(&db, &origin, &config, "", &steps);
    let b = instance_with(&db, &origin, &config, "", &steps);
    let (id, owner) = start_long_run(&a, &origin, &pids);
    let (running, other) = if owner == the_instance(&a) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let sleep = read_pids(&pids)[0];

    let r = other.post(
        &format!("/api/runs/{id}/cancel"),
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("content-type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let run = other.wait_run(id);
    let gone = process_gone(sleep);
    kill_all(&[sleep]);
    assert_eq!(run["status"], "canceled", "{run:#}\n{}", running.log());
    assert_eq!(run["reason"], "canceled through the API", "{run:#}");
    assert_eq!(run["instance"], owner.as_str(), "{run:#}");
    assert_eq!(run["steps"][0]["status"], "canceled", "{run:#}");
    assert!(gone, "the step's process was stopped with its run");
}

#[test]
fn a_log_is_served_live_and_whole_by_the_instance_not_running_the_step() {
    let db = test_database();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    let go = scratch.path().join("go");
    // The first step prints, pauses until the test has seen its first lines elsewhere,
    // then prints more; a second step follows.
    let steps = format!(
        "  - name: talk\n    run: echo first line; sleep 0.3; echo more of it; while [ ! -f {} ]; do sleep 0.05; done; echo second line\n  - name: after\n    run: echo after step\n",
        go.display()
    );
    let a = instance(&db, &origin, "", &steps);
    let b = instance(&db, &origin, "", &steps);
    let sha = origin.commit("main", &[("a", "1")], "x");
    let r = a.deliver(
        "push",
        "live-log",
        &PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    let mut owner = String::new();
    eventually("the run starts on one instance", || {
        let run = a.get_json(&format!("/api/runs/{id}"));
        owner = run["instance"].as_str().unwrap_or_default().to_owned();
        run["status"] == "running" && !owner.is_empty()
    });
    let (runner, reader) = if owner == the_instance(&a) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(owner, the_instance(runner));
    let reader_logs = reader.state_dir().join("logs").join(id.to_string());

    // Followed on the instance that is not running it, while the step still runs.
    let mut stream = std::net::TcpStream::connect(&reader.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    std::io::Write::write_all(
        &mut stream,
        format!(
            "GET /api/runs/{id}/log?follow=1 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            reader.addr
        )
        .as_bytes(),
    )
    .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("more of it") {
        let n = std::io::Read::read(&mut stream, &mut buf).unwrap();
        assert!(
            n > 0,
            "the follow stream ended before the first lines: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    }
    let live = String::from_utf8_lossy(&received).into_owned();
    assert!(live.contains("first line"), "{live}");
    assert!(!live.contains("second line"), "{live}");
    assert_eq!(
        reader.get_json(&format!("/api/runs/{id}"))["status"],
        "running"
    );
    // The dashboard's run page there shows the log so far too.
    let page = reader.get(&format!("/runs/{id}"));
    assert_eq!(page.status, 200);
    assert!(page.text().contains("more of it"), "{}", page.text());

    std::fs::write(&go, "").unwrap();
    let _ = std::io::Read::read_to_end(&mut stream, &mut received);
    let followed = String::from_utf8_lossy(&received).into_owned();
    assert!(followed.starts_with("HTTP/1.1 200"), "{followed}");
    for line in ["first line", "more of it", "second line", "after step"] {
        assert_eq!(followed.matches(line).count(), 1, "{line}: {followed}");
    }
    assert_eq!(runner.wait_run(id)["status"], "succeeded");

    // Finished: the whole log, as the instance that ran it serves it, also from the
    // other, which has no file of it, and on its event stream.
    let whole = runner.run_log(id);
    assert!(
        whole.contains("second line") && whole.contains("after step"),
        "{whole}"
    );
    assert_eq!(reader.run_log(id), whole);
    assert!(!reader_logs.exists(), "{}", reader_logs.display());
    let events = reader.get(&format!("/api/runs/{id}/events")).text();
    for line in ["first line", "more of it", "second line", "after step"] {
        assert!(events.contains(line), "{line}: {events}");
    }
    assert!(events.contains("run_finished"), "{events}");
}

/// A run whose instance lost it (its renewals cut, it fenced itself) while its step,
/// which ignores SIGTERM, still runs out its grace; `cancel` then asks that instance
/// to cancel it, and the run, as the other instance ends it, is returned, with the ids
/// of the runs whose step was built again.
fn lost_then(cancel: impl FnOnce(&Daemon, &Origin, i64), extra: &str) -> (Value, String) {
    let db = test_database();
    let role = db.role().unwrap();
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    // A grace long enough that the cancel surely comes while the lost run's step runs.
    let config = leases_and_grace(&scratch, "12s", "4s");
    let (pids, marker, termed, again) = (
        scratch.path().join("pids"),
        scratch.path().join("tried"),
        scratch.path().join("termed"),
        scratch.path().join("again"),
    );
    let steps = format!(
        "  - name: long\n    run: |\n      if [ -e {marker} ]; then echo $HOOKCI_RUN_ID >> {again}; exit 0; fi\n      touch {marker}\n      trap 'touch {termed}' TERM\n      echo $$ >> {pids}\n      while true; do sleep 0.05; done\n",
        marker = marker.display(),
        again = again.display(),
        termed = termed.display(),
        pids = pids.display(),
    );
    let cut = instance_on(
        Builder::new().database_as(&role),
        &origin,
        &config,
        extra,
        &steps,
    );
    let (id, owner) = start_long_run(&cut, &origin, &pids);
    assert_eq!(owner, the_instance(&cut));
    let other = instance_with(&db, &origin, &config, extra, &steps);

    // Its pool still works (it takes the cancel), its renewals do not.
    db.cut_renewals(&role).unwrap();
    eventually("the lost run's step is told to stop", || termed.exists());
    cancel(&cut, &origin, id);
    let run = other.wait_run(id);
    kill_all(&read_pids(&pids));
    assert!(
        cut.log().contains("this instance lost its lease on it"),
        "the run was lost, not ended by its instance:\n{}",
        cut.log()
    );
    (run, std::fs::read_to_string(&again).unwrap_or_default())
}

#[test]
fn a_cancel_sent_to_the_instance_that_lost_the_run_ends_it_canceled_where_it_is_recovered() {
    let (run, again) = lost_then(
        |cut, _, id| {
            let r = cut.post(
                &format!("/api/runs/{id}/cancel"),
                &[
                    ("authorization", &format!("Bearer {TOKEN}")),
                    ("content-type", "application/json"),
                ],
                b"{}",
            );
            assert_eq!(r.status, 202, "{}", r.text());
        },
        "",
    );
    assert_eq!(run["status"], "canceled", "{run:#}");
    assert_eq!(run["reason"], "canceled through the API", "{run:#}");
    assert_eq!(run["attempt"], 1, "{run:#}");
    assert!(again.is_empty(), "built again: {again}");
}

#[test]
fn a_push_that_supersedes_a_run_its_instance_lost_ends_that_run_canceled() {
    let mut newer = None;
    let (run, again) = lost_then(
        |cut, origin, _| {
            let sha = origin.commit("main", &[("b", "2")], "newer");
            let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
            let r = cut.deliver("push", "newer-1", &body);
            assert_eq!(r.status, 202, "{}", r.text());
            newer = r.json()["runs"][0]["id"].as_i64();
        },
        "concurrency: { cancel: running }\n",
    );
    let newer = newer.expect("the push made a run");
    assert_eq!(run["status"], "canceled", "{run:#}");
    assert_eq!(
        run["reason"],
        format!("superseded by run {newer}").as_str(),
        "{run:#}"
    );
    assert_eq!(run["attempt"], 1, "{run:#}");
    let id = run["id"].as_i64().unwrap().to_string();
    assert!(
        !again.lines().any(|l| l == id),
        "the superseded run was built again: {again}"
    );
}

#[test]
fn a_daemon_whose_database_stops_answering_mid_step_still_stops() {
    let db = test_database();
    let relay = Relay::to(&db);
    let scratch = Builder::new();
    let origin = Origin::new(scratch.path());
    let config = leases_of(&scratch, "3s");
    let (ready, go) = (scratch.path().join("ready"), scratch.path().join("go"));
    let steps = format!(
        "  - name: talk\n    run: |\n      echo first-line\n      touch {ready}\n      while [ ! -e {go} ]; do sleep 0.05; done\n      echo last-line\n",
        ready = ready.display(),
        go = go.display(),
    );
    let mut d = instance_on(
        Builder::new().database_through(&relay),
        &origin,
        &config,
        "",
        &steps,
    );
    push_one(&d, &origin, "main", 1);
    eventually("the step has printed its first line", || ready.exists());

    // The step's last output then waits for a database that never answers.
    relay.silence();
    std::fs::write(&go, "").unwrap();
    d.signal(libc::SIGTERM);
    // Within the harness's deadline, far above the lease: only a stop that hangs
    // misses it.
    assert!(d.wait().is_some(), "it ended on its own:\n{}", d.log());
}
