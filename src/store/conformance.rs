//! The store's conformance suite: every behaviour callers rely on, run against both
//! backends, SQLite in a temporary directory and PostgreSQL in a fresh database on
//! the server of `$HOOKCI_TEST_DATABASE_URL`. Without that variable the PostgreSQL
//! half fails and says so: a suite that passed without a database would prove nothing.

use std::sync::Arc;

use super::postgres::Scratch;
use super::*;

/// One backend for one test: its files or its database go when it is dropped.
pub(super) struct Backend {
    dir: tempfile::TempDir,
    scratch: Option<Scratch>,
}

impl Backend {
    fn sqlite() -> Backend {
        Backend {
            dir: tempfile::tempdir().unwrap(),
            scratch: None,
        }
    }

    fn postgres() -> Backend {
        let scratch = Scratch::from_env().unwrap_or_else(|e| panic!("{e}"));
        Backend {
            dir: tempfile::tempdir().unwrap(),
            scratch: Some(scratch),
        }
    }

    /// The store, opened again on each call as a restart of one instance would.
    fn open(&self) -> Arc<dyn Store> {
        self.open_as("test-instance")
    }

    /// The store as the instance `instance` sees it.
    fn open_as(&self, instance: &str) -> Arc<dyn Store> {
        self.open_with_lease(instance, std::time::Duration::from_secs(15))
    }

    /// [`Backend::open_as`], its claims held for `lease`.
    fn open_with_lease(&self, instance: &str, lease: std::time::Duration) -> Arc<dyn Store> {
        open(
            self.scratch.as_ref().map(Scratch::target),
            self.dir.path(),
            instance,
            lease,
        )
        .unwrap()
    }

    /// The PostgreSQL database of a shared-database test.
    fn scratch(&self) -> &Scratch {
        self.scratch.as_ref().expect("a PostgreSQL backend")
    }

    /// Lets the lease on run `id` lapse, as if its owner had stopped renewing it.
    fn lapse_lease(&self, id: i64) {
        self.scratch()
            .execute(&format!("UPDATE runs SET lease_until = 0 WHERE id = {id}"))
            .unwrap();
    }

    /// How many rows `table` holds, where no read shows it.
    fn count_rows(&self, table: &str) -> i64 {
        match &self.scratch {
            Some(scratch) => scratch.count_rows(table).unwrap(),
            None => rusqlite::Connection::open(self.dir.path().join("hookci.db"))
                .unwrap()
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap(),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Each test, once on each backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(&super::Backend::sqlite());
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                super::$name(&super::Backend::postgres());
            })*
        }
    };
}

on_both_backends!(
    per_commit_lock_and_duplicate_deliveries,
    claims_in_arrival_order_and_records_steps,
    concurrency_groups_hold_one_running_run_and_supersede_queued_ones,
    concurrent_deliveries_share_commits_and_keep_the_lock,
    retention_prunes_old_finished_runs_and_keeps_queued_ones,
    a_run_that_supersedes_others_takes_over_the_oldest_diff_base_of_its_ref,
    interrupted_fail_ends_a_run_whose_steps_had_started_and_retries_one_cut_before,
    reruns_count_generations_and_start_at_attempt_one,
    retention_keeps_the_newest_finished_runs_by_rank_despite_id_gaps,
    retention_bounds_deliveries_and_their_decisions_but_keeps_those_of_kept_runs,
    repository_keys_ignore_case,
    reconcile_applies_a_ref_only_where_its_head_is_still_the_one_it_read,
    the_outbox_keeps_the_newest_unsent_status_of_a_commit_and_goes_with_its_run,
    a_cancel_of_an_interrupted_run_is_kept_and_its_requeue_ends_it_canceled,
);

/// What recovery made of each run, as (run, attempt, status).
fn ends(recovered: Vec<Recovered>) -> Vec<(i64, i64, RunStatus)> {
    recovered
        .into_iter()
        .map(|r| (r.run, r.attempt, r.status))
        .collect()
}

fn new_run(pipeline: &str, key: &str, group: Option<&str>, supersede: Supersede) -> NewRun {
    NewRun {
        key: Some(key.into()),
        group: group.map(str::to_owned),
        supersede,
        supersede_own_ref: false,
        generation: 1,
        pipeline: pipeline.into(),
        repo: "o/r".into(),
        git_ref: "refs/heads/main".into(),
        commit: "c".repeat(40),
        before: "b".repeat(40),
        clone_url: "/tmp/x".into(),
        trigger: "push",
        skipped: None,
    }
}

/// Asserts that run `id`, as `store` reads it, ended canceled for `reason` on attempt
/// 1, with its first step canceled and its second skipped.
fn assert_canceled_in_its_first_step(store: &dyn Store, id: i64, reason: &str) {
    let run = store.run(id).unwrap().unwrap();
    assert_eq!(
        (run.status, run.attempt, run.reason.as_deref()),
        (RunStatus::Canceled, 1, Some(reason))
    );
    assert_eq!(
        store
            .steps(id)
            .unwrap()
            .iter()
            .map(|s| s.status)
            .collect::<Vec<_>>(),
        [StepStatus::Canceled, StepStatus::Skipped]
    );
}

fn run(pipeline: &str, key: &str) -> NewRun {
    new_run(pipeline, key, None, Supersede::Nothing)
}

fn delivery(id: &str, runs: Vec<NewRun>) -> NewDelivery {
    NewDelivery {
        id: id.into(),
        event: "push".into(),
        repo: "o/r".into(),
        git_ref: "refs/heads/main".into(),
        after: "c".repeat(40),
        head: Some("c".repeat(40)),
        clone_url: "/tmp/x".into(),
        decisions: runs
            .into_iter()
            .map(|r| NewDecision {
                pipeline: Some(r.pipeline.clone()),
                reason: "matched".into(),
                run: Some(r),
            })
            .chain(std::iter::once(NewDecision {
                pipeline: Some("zz-other".into()),
                reason: "branch not matched".into(),
                run: None,
            }))
            .collect(),
    }
}

fn all(store: &dyn Store) -> Vec<Run> {
    store
        .runs(&RunFilter {
            limit: 500,
            ..RunFilter::default()
        })
        .unwrap()
}

/// Reports every transition as a status of its commit, plus a notification at a
/// run's end that says what the previous result of its ref was.
struct Recorder;

impl ReportPolicy for Recorder {
    fn idle(&self) -> bool {
        false
    }

    fn reports(
        &self,
        t: &Transition<'_>,
        previous: &dyn Fn() -> Option<RunStatus>,
    ) -> Vec<NewReport> {
        let status = NewReport {
            kind: ReportKind::Status,
            target: format!("github:hookci/{}", t.pipeline),
            address: format!("repos/{}/statuses/{}", t.repo, t.commit),
            coalesce: Some(format!("{}@{}", t.repo, t.commit)),
            signing: None,
            body: Some(format!("{}{:?}", t.status.as_str(), t.step)),
            outcome: None,
        };
        let mut out = vec![status];
        if t.status.is_final() {
            out.push(NewReport {
                kind: ReportKind::Webhook,
                target: "webhook:example.com".into(),
                address: "https://example.com/ci".into(),
                coalesce: None,
                signing: Some("KEY".into()),
                body: None,
                outcome: Some(format!("after {:?}", previous())),
            });
        }
        out
    }

    fn committed(&self) {}
}

pub(super) fn per_commit_lock_and_duplicate_deliveries(backend: &Backend) {
    let store = backend.open();
    let first = store
        .record_delivery(delivery("d1", vec![run("ci", "k1")]))
        .unwrap();
    let DeliveryOutcome::New(runs) = first else {
        panic!("{first:?}")
    };
    assert_eq!(runs.len(), 1);
    assert!(!runs[0].existing);
    let id = runs[0].id;

    // Same delivery id again: nothing new.
    let again = store
        .record_delivery(delivery("d1", vec![run("ci", "k1")]))
        .unwrap();
    // Named as they were; what the first one changed is not repeated.
    let named: Vec<RunRef> = runs
        .iter()
        .map(|r| RunRef {
            changed: Vec::new(),
            ..r.clone()
        })
        .collect();
    assert_eq!(again, DeliveryOutcome::Duplicate(named));
    assert_eq!(runs[0].changed.len(), 1);
    assert_eq!(runs[0].changed[0].status, RunStatus::Queued);

    // Another delivery of the same push: the existing run is named.
    let other = store
        .record_delivery(delivery("d2", vec![run("ci", "k1")]))
        .unwrap();
    let DeliveryOutcome::New(other) = other else {
        panic!("{other:?}")
    };
    assert_eq!((other[0].id, other[0].existing), (id, true));
    let why = store.delivery("d2").unwrap().unwrap();
    assert_eq!(why.decisions.len(), 2);
    assert_eq!(why.decisions[0].outcome, "duplicate");
    assert!(why.decisions[0].reason.contains(&format!("run {id}")));
    assert_eq!(why.decisions[1].outcome, "not_triggered");
    assert_eq!(all(&*store).len(), 1);

    // An explicit run (no key) is never stopped by the lock.
    let mut explicit = run("ci", "unused");
    explicit.key = None;
    let a = store.create_run(explicit.clone()).unwrap();
    let b = store.create_run(explicit).unwrap();
    assert!(!a.existing && !b.existing && a.id != b.id);
}

pub(super) fn claims_in_arrival_order_and_records_steps(backend: &Backend) {
    let store = backend.open();
    for i in 0..3 {
        store
            .record_delivery(delivery(
                &format!("d{i}"),
                vec![run("ci", &format!("k{i}"))],
            ))
            .unwrap();
    }
    let first = store.claim_next().unwrap().unwrap();
    let second = store.claim_next().unwrap().unwrap();
    assert!(first.id < second.id);
    assert_eq!(first.status, RunStatus::Running);
    store
        .plan_steps(first.id, vec!["a".into(), "b".into()], OnInterrupt::Retry)
        .unwrap();
    store.step_started(first.id, 1).unwrap();
    let failed = StepEnd {
        status: StepStatus::Failed,
        exit_code: Some(3),
        signal: None,
        reason: None,
    };
    store.step_finished(first.id, 1, failed).unwrap();
    store
        .finish_run(
            first.id,
            RunStatus::Failed,
            Some("step a exited 3".into()),
            StepStatus::Skipped,
        )
        .unwrap();
    let steps = store.steps(first.id).unwrap();
    assert_eq!(steps[0].status, StepStatus::Failed);
    assert_eq!(steps[0].exit_code, Some(3));
    assert_eq!(steps[1].status, StepStatus::Skipped);
    assert_eq!(steps[1].finished_at, None);

    // The second claimed run was left running: a restart marks it interrupted, then
    // queues it again as attempt 2 with fresh steps.
    drop(store);
    let store = backend.open();
    assert_eq!(store.interrupt_running().unwrap(), vec![second.id]);
    assert_eq!(
        store.run(second.id).unwrap().unwrap().status,
        RunStatus::Interrupted
    );
    assert_eq!(
        ends(store.requeue_interrupted().unwrap()),
        vec![(second.id, 1, RunStatus::Queued)]
    );
    let again = store.run(second.id).unwrap().unwrap();
    assert_eq!((again.status, again.attempt), (RunStatus::Queued, 2));
    let third = store.claim_next().unwrap().unwrap();
    assert_eq!(
        third.id, second.id,
        "the re-queued run keeps its place ahead of later ones"
    );
}

pub(super) fn concurrency_groups_hold_one_running_run_and_supersede_queued_ones(backend: &Backend) {
    let store = backend.open();
    let g = Some("ci\nrefs/heads/main");
    let make = |key: &str, supersede| {
        let DeliveryOutcome::New(r) = store
            .record_delivery(delivery(key, vec![new_run("ci", key, g, supersede)]))
            .unwrap()
        else {
            panic!()
        };
        r[0].clone()
    };
    let a = make("a", Supersede::Pending);
    assert_eq!(store.claim_next().unwrap().unwrap().id, a.id);
    let b = make("b", Supersede::Pending);
    // The group is busy: nothing to claim.
    assert!(store.claim_next().unwrap().is_none());
    let c = make("c", Supersede::Pending);
    let b_now = store.run(b.id).unwrap().unwrap();
    assert_eq!(b_now.status, RunStatus::Canceled);
    assert_eq!(
        b_now.reason.as_deref(),
        Some(format!("superseded by run {}", c.id).as_str())
    );
    assert!(
        c.supersedes.is_empty(),
        "cancel: pending leaves the running run alone"
    );
    let d = make("d", Supersede::Running);
    assert_eq!(
        d.supersedes,
        vec![a.id],
        "cancel: running names the running run"
    );
    assert_eq!(
        store.run(c.id).unwrap().unwrap().status,
        RunStatus::Canceled
    );
    store
        .finish_run(a.id, RunStatus::Canceled, None, StepStatus::Skipped)
        .unwrap();
    assert_eq!(store.claim_next().unwrap().unwrap().id, d.id);

    // Without supersede (cancel: none) runs of a group queue up in order.
    let e = make("e", Supersede::Nothing);
    let f = make("f", Supersede::Nothing);
    store
        .finish_run(d.id, RunStatus::Succeeded, None, StepStatus::Skipped)
        .unwrap();
    assert_eq!(store.claim_next().unwrap().unwrap().id, e.id);
    assert!(store.claim_next().unwrap().is_none());
    store
        .finish_run(e.id, RunStatus::Succeeded, None, StepStatus::Skipped)
        .unwrap();
    assert_eq!(store.claim_next().unwrap().unwrap().id, f.id);
}

pub(super) fn concurrent_deliveries_share_commits_and_keep_the_lock(backend: &Backend) {
    runtime().block_on(async {
        let store = backend.open();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = std::sync::Arc::clone(&store);
            // 200 deliveries of 50 distinct pushes: 50 runs.
            let d = delivery(&format!("d{i}"), vec![run("ci", &format!("k{}", i % 50))]);
            tasks.push(tokio::spawn(
                async move { s.record_delivery_async(d).await },
            ));
        }
        let mut created = 0;
        for t in tasks {
            match t.await.unwrap().unwrap() {
                DeliveryOutcome::New(runs) => {
                    created += runs.iter().filter(|r| !r.existing).count()
                }
                DeliveryOutcome::Duplicate(_) => panic!("distinct delivery ids"),
            }
        }
        assert_eq!(created, 50);
        assert_eq!(all(&*store).len(), 50);
        // Committed, not just cached: visible to a fresh store on the same file.
        let reopened = backend.open();
        assert!(reopened.delivery("d199").unwrap().is_some());
    });
}

pub(super) fn retention_prunes_old_finished_runs_and_keeps_queued_ones(backend: &Backend) {
    let store = backend.open();
    let ids: Vec<i64> = (0..6)
        .map(|i| store.create_run(run("ci", &format!("k{i}"))).unwrap().id)
        .collect();
    for id in &ids[..5] {
        store
            .finish_run(*id, RunStatus::Succeeded, None, StepStatus::Skipped)
            .unwrap();
    }
    // Keep the newest 2: the 3 oldest are beyond them; all finished but none is old.
    let pruned = store.prune(2, 0).unwrap();
    assert_eq!(pruned.runs, ids[..3].to_vec());
    assert!(!pruned.more);
    assert!(store.run(ids[0]).unwrap().is_none());
    assert!(store.run(ids[3]).unwrap().is_some());
    // Older than the cutoff: every finished run goes, the queued one stays.
    let pruned = store.prune(1000, crate::clock::now_ms() + 1).unwrap();
    assert_eq!(pruned.runs, ids[3..5].to_vec());
    let left: Vec<i64> = all(&*store).iter().map(|r| r.id).collect();
    assert_eq!(left, vec![ids[5]]);
}

pub(super) fn a_run_that_supersedes_others_takes_over_the_oldest_diff_base_of_its_ref(
    backend: &Backend,
) {
    let store = backend.open();
    let push = |key: &str, git_ref: &str, before: &str, group: &str, supersede| {
        let mut r = new_run("ci", key, Some(group), supersede);
        r.git_ref = git_ref.into();
        r.before = before.repeat(40);
        store.create_run(r).unwrap().id
    };
    let main = "ci\nrefs/heads/main";
    let running = push("r", "refs/heads/main", "0", main, Supersede::Pending);
    assert_eq!(store.claim_next().unwrap().unwrap().id, running);
    let a = push("a", "refs/heads/main", "1", main, Supersede::Pending);
    let b = push("b", "refs/heads/main", "2", main, Supersede::Pending);
    let c = push("c", "refs/heads/main", "3", main, Supersede::Pending);
    let before = |id| store.run(id).unwrap().unwrap().before;
    assert_eq!(before(b), "1".repeat(40), "b stands for a's push too");
    assert_eq!(before(c), "1".repeat(40), "and c for both, through b");
    assert_eq!(before(running), "0".repeat(40), "a running run is kept");
    assert_eq!(store.run(a).unwrap().unwrap().status, RunStatus::Canceled);
    let d = push("d", "refs/heads/main", "4", main, Supersede::Running);
    assert_eq!(
        before(d),
        "0".repeat(40),
        "cancel: running: the running one's"
    );

    // One group for the whole pipeline: another ref's runs are no base of this one.
    let feature = push("f", "refs/heads/feature", "5", "ci", Supersede::Pending);
    let e = push("e", "refs/heads/main", "6", "ci", Supersede::Pending);
    assert_eq!(
        store.run(feature).unwrap().unwrap().status,
        RunStatus::Canceled
    );
    assert_eq!(before(e), "6".repeat(40));
    // Nothing superseded (cancel: none): the run's own push.
    let g = push("g", "refs/heads/main", "7", main, Supersede::Nothing);
    let h = push("h", "refs/heads/main", "8", main, Supersede::Nothing);
    assert_eq!((before(g), before(h)), ("7".repeat(40), "8".repeat(40)));
}

pub(super) fn interrupted_fail_ends_a_run_whose_steps_had_started_and_retries_one_cut_before(
    backend: &Backend,
) {
    let store = backend.open();
    let mut ids = Vec::new();
    for (key, policy, started) in [
        ("deploy", OnInterrupt::Fail, true),
        ("checkout", OnInterrupt::Fail, false),
        ("ci", OnInterrupt::Retry, true),
    ] {
        let id = store.create_run(run(key, key)).unwrap().id;
        assert_eq!(store.claim_next().unwrap().unwrap().id, id);
        store.plan_steps(id, vec!["s".into()], policy).unwrap();
        if started {
            store.step_started(id, 1).unwrap();
        }
        ids.push(id);
    }
    store.interrupt_running().unwrap();
    let outcome = ends(store.requeue_interrupted().unwrap());
    assert_eq!(
        outcome,
        vec![
            (ids[0], 1, RunStatus::Failed),
            (ids[1], 1, RunStatus::Queued),
            (ids[2], 1, RunStatus::Queued),
        ]
    );
    let deploy = store.run(ids[0]).unwrap().unwrap();
    assert_eq!(
        deploy.reason.as_deref(),
        Some("interrupted; not retried: interrupted: fail")
    );
    assert_eq!(deploy.attempt, 1);
    assert_eq!(
        store.steps(ids[0]).unwrap()[0].status,
        StepStatus::Interrupted
    );
}

pub(super) fn reruns_count_generations_and_start_at_attempt_one(backend: &Backend) {
    let store = backend.open();
    let mut rerun = run("ci", "unused");
    rerun.key = None;
    rerun.generation = 3;
    let id = store.create_run(rerun).unwrap().id;
    let made = store.run(id).unwrap().unwrap();
    assert_eq!((made.attempt, made.generation), (1, 3));
    // Interrupted once, it is queued again like any run.
    store.claim_next().unwrap();
    store.interrupt_running().unwrap();
    assert_eq!(
        ends(store.requeue_interrupted().unwrap()),
        vec![(id, 1, RunStatus::Queued)]
    );
}

pub(super) fn retention_keeps_the_newest_finished_runs_by_rank_despite_id_gaps(backend: &Backend) {
    let store = backend.open();
    let mut finished = Vec::new();
    for i in 0..8 {
        let made = store.create_run(run("ci", &format!("k{i}"))).unwrap();
        // A second push of the same commit: refused by the lock, it uses an id up.
        assert!(
            store
                .create_run(run("ci", &format!("k{i}")))
                .unwrap()
                .existing
        );
        store
            .finish_run(made.id, RunStatus::Succeeded, None, StepStatus::Skipped)
            .unwrap();
        finished.push(made.id);
    }
    let queued = store.create_run(run("ci", "queued")).unwrap().id;
    let interrupted = store.create_run(run("ci", "interrupted")).unwrap().id;
    store
        .finish_run(
            interrupted,
            RunStatus::Interrupted,
            None,
            StepStatus::Interrupted,
        )
        .unwrap();
    assert!(finished.windows(2).all(|w| w[1] > w[0] + 1), "{finished:?}");

    store.prune(5, 0).unwrap();
    let mut left: Vec<i64> = all(&*store).iter().map(|r| r.id).collect();
    left.sort_unstable();
    let mut expected = finished[3..].to_vec();
    // Neither counts as finished nor is pruned: one waits, one is queued again at start.
    expected.extend([queued, interrupted]);
    assert_eq!(left, expected);
    assert_eq!(store.prune(5, 0).unwrap(), Pruned::default());
}

pub(super) fn retention_bounds_deliveries_and_their_decisions_but_keeps_those_of_kept_runs(
    backend: &Backend,
) {
    let store = backend.open();
    // d0 starts a run that stays queued; d1..d9 start nothing.
    store
        .record_delivery(delivery("d0", vec![run("ci", "k0")]))
        .unwrap();
    for i in 1..10 {
        store
            .record_delivery(delivery(&format!("d{i}"), vec![]))
            .unwrap();
    }
    let pruned = store.prune(3, 0).unwrap();
    assert_eq!(pruned.deliveries, 6);
    let kept: Vec<String> = (0..10)
        .map(|i| format!("d{i}"))
        .filter(|id| store.delivery(id).unwrap().is_some())
        .collect();
    assert_eq!(kept, ["d0", "d7", "d8", "d9"]);
    let decisions = backend.count_rows("decisions");
    // d0: its run and zz-other; d7..d9: zz-other each.
    assert_eq!(decisions, 5);
    // Age: older than the cutoff goes too, unless a kept run came from it.
    let pruned = store.prune(1000, crate::clock::now_ms() + 1).unwrap();
    assert_eq!(pruned.deliveries, 3);
    assert!(store.delivery("d0").unwrap().is_some());
}

pub(super) fn repository_keys_ignore_case(backend: &Backend) {
    let store = backend.open();
    let mut d = delivery("d1", vec![run("ci", "k1")]);
    d.repo = "Octo-Org/Octo-Repo".into();
    store.record_delivery(d).unwrap();
    for spelling in [
        "octo-org/octo-repo",
        "OCTO-ORG/octo-repo",
        "Octo-Org/Octo-Repo",
    ] {
        assert_eq!(
            store.clone_url_of(spelling).unwrap().as_deref(),
            Some("/tmp/x"),
            "{spelling}"
        );
        assert_eq!(
            store.ref_heads(spelling).unwrap().get("refs/heads/main"),
            Some(&"c".repeat(40)),
            "{spelling}"
        );
    }
    // A later push spelled another way updates the same rows.
    let mut d = delivery("d2", vec![run("ci", "k2")]);
    d.repo = "octo-org/OCTO-REPO".into();
    d.clone_url = "/tmp/y".into();
    d.head = Some("d".repeat(40));
    store.record_delivery(d).unwrap();
    assert_eq!(
        store.clone_url_of("octo-org/octo-repo").unwrap().as_deref(),
        Some("/tmp/y")
    );
    let heads = store.ref_heads("Octo-Org/Octo-Repo").unwrap();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert_eq!(heads["refs/heads/main"], "d".repeat(40));
}

pub(super) fn reconcile_applies_a_ref_only_where_its_head_is_still_the_one_it_read(
    backend: &Backend,
) {
    let store = backend.open();
    let first = store.reconcile_view("o/r").unwrap();
    assert_eq!(first, ReconcileView::default());
    let change = |git_ref: &str, seen: Option<&str>, head: &str, key: &str| RefChange {
        git_ref: git_ref.into(),
        seen: seen.map(str::to_owned),
        head: head.into(),
        runs: vec![run("ci", key)],
    };
    let done = store
        .record_reconcile(
            "o/r".into(),
            vec![change("refs/heads/main", None, "a", "ka")],
        )
        .unwrap();
    assert_eq!((done.runs.len(), done.stale.len()), (1, 0));
    let view = store.reconcile_view("O/R").unwrap();
    assert!(view.reconciled);
    assert_eq!(view.heads["refs/heads/main"], "a");

    // A push lands between the pass's read and its write: main is now at c.
    let mut pushed = delivery("d1", vec![]);
    pushed.head = Some("c".repeat(40));
    store.record_delivery(pushed).unwrap();
    let done = store
        .record_reconcile(
            "o/r".into(),
            vec![
                change("refs/heads/main", Some("a"), "b", "kb"),
                change("refs/tags/v1", None, "t", "kt"),
            ],
        )
        .unwrap();
    assert_eq!(done.stale, ["refs/heads/main"]);
    assert_eq!(done.runs.len(), 1, "the tag's run only: {done:?}");
    let heads = store.ref_heads("o/r").unwrap();
    assert_eq!(
        heads["refs/heads/main"],
        "c".repeat(40),
        "the push's head stays"
    );
    assert_eq!(heads["refs/tags/v1"], "t");
    assert_eq!(
        all(&*store).len(),
        2,
        "no run for the stale listing of main"
    );
}

pub(super) fn the_outbox_keeps_the_newest_unsent_status_of_a_commit_and_goes_with_its_run(
    backend: &Backend,
) {
    let store = backend.open();
    // No policy: nothing is written.
    let quiet = store.create_run(run("ci", "quiet")).unwrap().id;
    assert!(store.reports_of(quiet).unwrap().is_empty());
    store.cancel_queued(quiet, "by hand".into()).unwrap();

    store.set_report_policy(std::sync::Arc::new(Recorder));
    let id = store.create_run(run("ci", "k1")).unwrap().id;
    let due = store.due_reports(i64::MAX, 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].body.as_deref(), Some("queuedNone"));
    // Sent: it stays, as sent. The next ones replace each other while unsent.
    store.report_attempted(due[0].id, Attempt::Sent).unwrap();
    assert_eq!(store.claim_next().unwrap().unwrap().id, id);
    store
        .plan_steps(id, vec!["build".into(), "test".into()], OnInterrupt::Retry)
        .unwrap();
    store.step_started(id, 2).unwrap();
    let due = store.due_reports(i64::MAX, 10).unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(
        due[0].body.as_deref(),
        Some("runningSome((2, 2, \"test\"))")
    );
    store
        .report_attempted(
            due[0].id,
            Attempt::Retry {
                at: 5,
                reason: "HTTP 502".into(),
            },
        )
        .unwrap();
    assert_eq!(store.next_report_at().unwrap(), Some(5));
    store
        .finish_run(
            id,
            RunStatus::Failed,
            Some("step test".into()),
            StepStatus::Skipped,
        )
        .unwrap();
    let due = store.due_reports(i64::MAX, 10).unwrap();
    let shape: Vec<(ReportKind, Option<&str>, Option<&str>, i64)> = due
        .iter()
        .map(|r| (r.kind, r.body.as_deref(), r.outcome.as_deref(), r.attempts))
        .collect();
    assert_eq!(
        shape,
        vec![
            (ReportKind::Status, Some("failedNone"), None, 0),
            (ReportKind::Webhook, None, Some("after None"), 0),
        ],
        "the retried status is replaced; the run before (canceled) is no result"
    );
    store
        .report_attempted(
            due[1].id,
            Attempt::Failed {
                reason: "HTTP 404: Not Found".into(),
            },
        )
        .unwrap();
    let shown = store.reports_of(id).unwrap();
    let shown: Vec<(&str, &str, Option<&str>, i64)> = shown
        .iter()
        .map(|r| {
            (
                r.target.as_str(),
                r.state.as_str(),
                r.reason.as_deref(),
                r.attempts,
            )
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            ("github:hookci/ci", "sent", None, 1),
            ("github:hookci/ci", "pending", None, 0),
            (
                "webhook:example.com",
                "failed",
                Some("HTTP 404: Not Found"),
                1
            ),
        ]
    );
    // A run interrupted by a crash reports nothing then, and is queued again at
    // the next start: that reports.
    let cut = store.create_run(run("ci", "k2")).unwrap().id;
    assert_eq!(store.claim_next().unwrap().unwrap().id, cut);
    store.interrupt_running().unwrap();
    let latest = |id| {
        store
            .due_reports(i64::MAX, 50)
            .unwrap()
            .into_iter()
            .filter(|r| r.run == id)
            .map(|r| r.body)
            .collect::<Vec<_>>()
    };
    assert_eq!(latest(cut), [Some("runningNone".to_owned())]);
    store.requeue_interrupted().unwrap();
    assert_eq!(latest(cut), [Some("queuedNone".to_owned())]);

    store.prune(1, 0).unwrap();
    assert!(store.run(quiet).unwrap().is_none());
    store.prune(1, i64::MAX).unwrap();
    assert!(
        store.reports_of(id).unwrap().is_empty(),
        "pruned with its run"
    );
}

/// A cancel that comes while a restarting owner has interrupted its runs but not yet
/// queued them again: through another instance where the database is shared.
pub(super) fn a_cancel_of_an_interrupted_run_is_kept_and_its_requeue_ends_it_canceled(
    backend: &Backend,
) {
    let store = backend.open();
    let id = store.create_run(run("ci", "k1")).unwrap().id;
    let other = store.create_run(run("ci", "k2")).unwrap().id;
    assert_eq!(store.claim_next().unwrap().unwrap().id, id);
    assert_eq!(store.claim_next().unwrap().unwrap().id, other);
    store
        .plan_steps(id, vec!["build".into(), "test".into()], OnInterrupt::Retry)
        .unwrap();
    store.step_started(id, 1).unwrap();
    drop(store);
    let store = backend.open();
    assert_eq!(store.interrupt_running().unwrap(), vec![id, other]);
    let asker = match backend.scratch {
        Some(_) => backend.open_as("another-instance"),
        None => Arc::clone(&store),
    };
    assert_eq!(
        asker
            .cancel_queued(id, "canceled through the API".into())
            .unwrap(),
        QueuedCancel::Asked
    );
    assert_eq!(
        asker.run(id).unwrap().unwrap().status,
        RunStatus::Interrupted,
        "its owner ends it"
    );
    assert_eq!(
        ends(store.requeue_interrupted().unwrap()),
        vec![(id, 1, RunStatus::Canceled), (other, 1, RunStatus::Queued)]
    );
    assert_canceled_in_its_first_step(&*asker, id, "canceled through the API");
    assert!(matches!(
        asker.cancel_queued(id, "again".into()).unwrap(),
        QueuedCancel::NotQueued(RunStatus::Canceled)
    ));
    assert_eq!(asker.claim_next().unwrap().unwrap().id, other);
    assert!(store.claim_next().unwrap().is_none(), "not queued again");
}

/// What only a database shared by several instances has: each test opens it as two.
mod shared_database {
    use super::*;

    /// Plans two steps of run `id`, claimed by `owner`, and starts the first.
    fn mid_step(owner: &dyn Store, id: i64) {
        owner
            .plan_steps(id, vec!["build".into(), "test".into()], OnInterrupt::Retry)
            .unwrap();
        owner.step_started(id, 1).unwrap();
    }

    #[test]
    fn a_run_queued_by_one_instance_wakes_the_other() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let woken = b.wakeups();
        let notified = woken.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        a.create_run(run("ci", "k1")).unwrap();
        // A deadline for the wake-up only, far above any delivery of it.
        runtime().block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), notified)
                .await
                .expect("instance b heard of the run instance a queued");
        });
        assert_eq!(
            b.claim_next().unwrap().map(|r| r.instance),
            Some(Some("b".into()))
        );
    }

    #[test]
    fn step_output_kept_by_one_instance_is_read_by_the_other_and_pruned_with_its_run() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        assert!(a.shares_logs() && b.shares_logs());
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        let piece = |at: u64, text: &str| LogPiece {
            run: id,
            attempt: 1,
            step: 1,
            at,
            bytes: text.as_bytes().to_vec(),
        };
        a.append_log(piece(0, "first\n")).unwrap();
        a.append_log(piece(6, "second\n")).unwrap();
        // Written again after a lost answer: the same piece, kept once.
        a.append_log(piece(6, "second\n")).unwrap();
        assert_eq!(
            b.read_log(id, 1, 1, 0, 1 << 20).unwrap(),
            b"first\nsecond\n"
        );
        assert_eq!(b.read_log(id, 1, 1, 3, 1 << 20).unwrap(), b"st\nsecond\n");
        assert_eq!(b.read_log(id, 1, 1, 0, 8).unwrap(), b"first\nse");
        assert!(b.read_log(id, 1, 1, 13, 1 << 20).unwrap().is_empty());
        // Past a piece not committed yet, nothing: a reader never skips text.
        a.append_log(piece(20, "later\n")).unwrap();
        assert_eq!(
            b.read_log(id, 1, 1, 0, 1 << 20).unwrap(),
            b"first\nsecond\n"
        );
        assert!(b.read_log(id, 1, 2, 0, 1 << 20).unwrap().is_empty());
        assert!(b.read_log(id, 2, 1, 0, 1 << 20).unwrap().is_empty());
        b.finish_run(id, RunStatus::Succeeded, None, StepStatus::Skipped)
            .unwrap();
        b.prune(0, crate::clock::now_ms() + 1).unwrap();
        assert_eq!(backend.count_rows("log_chunks"), 0);
    }

    #[test]
    fn sqlite_keeps_logs_in_files_only() {
        let backend = Backend::sqlite();
        let store = backend.open();
        assert!(!store.shares_logs());
        store
            .append_log(LogPiece {
                run: 1,
                attempt: 1,
                step: 1,
                at: 0,
                bytes: b"x".to_vec(),
            })
            .unwrap();
        assert!(store.read_log(1, 1, 1, 0, 100).unwrap().is_empty());
    }

    #[test]
    fn an_instance_recovers_only_its_own_runs() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let mine = a.create_run(run("ci", "k1")).unwrap().id;
        let theirs = b.create_run(run("ci", "k2")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, mine);
        assert_eq!(b.claim_next().unwrap().unwrap().id, theirs);
        // a restarts: its run is interrupted and queued again, b's runs on.
        drop(a);
        let a = backend.open_as("a");
        assert_eq!(a.interrupt_running().unwrap(), vec![mine]);
        assert_eq!(
            ends(a.requeue_interrupted().unwrap()),
            vec![(mine, 1, RunStatus::Queued)]
        );
        assert_eq!(b.run(theirs).unwrap().unwrap().status, RunStatus::Running);
        assert_eq!(b.interrupt_running().unwrap(), vec![theirs]);
    }

    #[test]
    fn runs_an_instance_interrupted_as_it_started_are_taken_over_once_it_dies_before_requeuing() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let built = a.create_run(run("ci", "k1")).unwrap().id;
        let dropped = a.create_run(run("ci", "k2")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, built);
        assert_eq!(a.claim_next().unwrap().unwrap().id, dropped);
        // a dies; when it starts again its claims' leases have lapsed. It interrupts
        // its runs, and dies before it queues them again.
        drop(a);
        let lapse = || {
            backend
                .scratch()
                .execute("UPDATE runs SET lease_until = 0")
                .unwrap()
        };
        lapse();
        let a = backend.open_as("a");
        assert_eq!(a.interrupt_running().unwrap(), vec![built, dropped]);
        drop(a);
        assert_eq!(
            b.cancel_queued(dropped, "canceled through the API".into())
                .unwrap(),
            QueuedCancel::Asked
        );
        assert!(
            b.recover_expired(&[]).unwrap().is_empty(),
            "a holds them for a lease while it kills what they left"
        );

        lapse();
        assert_eq!(
            ends(b.recover_expired(&[]).unwrap()),
            vec![
                (built, 1, RunStatus::Queued),
                (dropped, 1, RunStatus::Canceled)
            ]
        );
        let queued = b.run(built).unwrap().unwrap();
        assert_eq!((queued.status, queued.attempt), (RunStatus::Queued, 2));
        assert_eq!(
            b.run(dropped).unwrap().unwrap().status,
            RunStatus::Canceled,
            "the cancel answered as applied holds"
        );
        assert!(b.recover_expired(&[]).unwrap().is_empty(), "once");
        assert_eq!(b.claim_next().unwrap().unwrap().id, built);
    }

    #[test]
    fn a_run_a_stop_interrupted_waits_for_its_own_instance_to_start_again() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        // A stop whose grace ran out cuts the run.
        a.finish_run(
            id,
            RunStatus::Interrupted,
            Some("the daemon stopped".into()),
            StepStatus::Interrupted,
        )
        .unwrap();
        drop(a);
        // Long after the lease its claim had.
        shift_db_clock(&backend, DAY_MS);
        assert!(
            b.recover_expired(&[]).unwrap().is_empty(),
            "another instance leaves it"
        );
        assert_eq!(b.run(id).unwrap().unwrap().status, RunStatus::Interrupted);
        let a = backend.open_as("a");
        assert!(a.interrupt_running().unwrap().is_empty());
        assert_eq!(
            ends(a.requeue_interrupted().unwrap()),
            vec![(id, 1, RunStatus::Queued)]
        );
    }

    #[test]
    fn a_lapsed_lease_is_recovered_once_and_its_old_owner_writes_nothing_more() {
        let backend = Backend::postgres();
        let (a, b, c) = (
            backend.open_as("a"),
            backend.open_as("b"),
            backend.open_as("c"),
        );
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        a.set_lease(std::time::Duration::from_secs(3600));
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        mid_step(&*a, id);
        assert!(b.recover_expired(&[]).unwrap().is_empty(), "a holds it");
        assert_eq!(a.renew_leases(&[id]).unwrap(), vec![id]);

        // a stops renewing: its lease lapses, and b and c look at once.
        backend.lapse_lease(id);
        let recovered: Vec<_> = std::thread::scope(|s| {
            let looks: Vec<_> = [&b, &c]
                .into_iter()
                .map(|store| s.spawn(move || store.recover_expired(&[]).unwrap()))
                .collect();
            ends(looks.into_iter().flat_map(|h| h.join().unwrap()).collect())
        });
        assert_eq!(recovered, vec![(id, 1, RunStatus::Queued)], "once");
        let steps = b.steps_of(id, Some(1)).unwrap();
        assert_eq!(
            steps.iter().map(|s| s.status).collect::<Vec<_>>(),
            [StepStatus::Interrupted, StepStatus::Interrupted]
        );
        let queued = b.run(id).unwrap().unwrap();
        assert_eq!((queued.status, queued.attempt), (RunStatus::Queued, 2));
        // a, cut off meanwhile, ends its attempt before anyone claims the next one:
        // that end is not the run's, which stays queued for attempt 2.
        assert!(a
            .finish_run(id, RunStatus::Succeeded, None, StepStatus::Skipped)
            .unwrap()
            .is_none());
        let still = b.run(id).unwrap().unwrap();
        assert_eq!((still.status, still.attempt), (RunStatus::Queued, 2));

        // b runs attempt 2; a learns at its next renewal that the run is not its own,
        // and what it still writes of attempt 1 changes nothing.
        b.set_lease(std::time::Duration::from_secs(3600));
        assert_eq!(b.claim_next().unwrap().unwrap().id, id);
        b.plan_steps(id, vec!["build".into(), "test".into()], OnInterrupt::Retry)
            .unwrap();
        assert!(a.renew_leases(&[id]).unwrap().is_empty());
        assert!(a
            .step_finished(
                id,
                1,
                StepEnd {
                    status: StepStatus::Succeeded,
                    exit_code: Some(0),
                    signal: None,
                    reason: None,
                }
            )
            .unwrap()
            .is_none());
        assert!(a
            .finish_run(id, RunStatus::Interrupted, None, StepStatus::Interrupted)
            .unwrap()
            .is_none());
        let run = b.run(id).unwrap().unwrap();
        assert_eq!((run.status, run.attempt), (RunStatus::Running, 2));
        assert_eq!(run.instance.as_deref(), Some("b"));
        assert!(b
            .steps_of(id, Some(2))
            .unwrap()
            .iter()
            .all(|s| s.status == StepStatus::Pending));
        assert_eq!(b.renew_leases(&[id]).unwrap(), vec![id]);
    }

    /// The database's clock, and the lease of run `id`, by it.
    fn db_clock(backend: &Backend) -> i64 {
        backend
            .scratch()
            .number("SELECT hookci_clock_ms()")
            .unwrap()
            .unwrap()
    }

    fn lease_until(backend: &Backend, id: i64) -> Option<i64> {
        backend
            .scratch()
            .number(&format!("SELECT lease_until FROM runs WHERE id = {id}"))
            .unwrap()
    }

    /// Sets the database's clock `ahead_ms` ahead of the machine's, as a database
    /// server whose clock differs from the instances' would have it.
    fn shift_db_clock(backend: &Backend, ahead_ms: i64) {
        backend
            .scratch()
            .execute(&format!(
                "CREATE OR REPLACE FUNCTION hookci_clock_ms() RETURNS BIGINT LANGUAGE sql VOLATILE
                 AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT + {ahead_ms} $$"
            ))
            .unwrap();
    }

    const DAY_MS: i64 = 86_400_000;

    #[test]
    fn leases_are_set_and_compared_by_the_database_clock() {
        let backend = Backend::postgres();
        let lease = std::time::Duration::from_secs(600);
        let (a, b) = (
            backend.open_with_lease("a", lease),
            backend.open_with_lease("b", lease),
        );
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        shift_db_clock(&backend, DAY_MS);
        let before = db_clock(&backend);
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        let after = db_clock(&backend);
        let claimed = lease_until(&backend, id).unwrap();
        assert!(
            (before + 600_000..=after + 600_000).contains(&claimed),
            "claimed until {claimed}, the database's clock read {before} and {after}"
        );
        let before = db_clock(&backend);
        assert_eq!(a.renew_leases(&[id]).unwrap(), vec![id]);
        let after = db_clock(&backend);
        let renewed = lease_until(&backend, id).unwrap();
        assert!(
            (before + 600_000..=after + 600_000).contains(&renewed),
            "renewed until {renewed}, the database's clock read {before} and {after}"
        );
        assert!(b.recover_expired(&[]).unwrap().is_empty(), "a holds it");
        // A day later by the database's clock, whatever the machines' say: lapsed.
        shift_db_clock(&backend, 2 * DAY_MS);
        assert_eq!(
            ends(b.recover_expired(&[]).unwrap()),
            vec![(id, 1, RunStatus::Queued)]
        );
    }

    #[test]
    fn a_claim_right_after_open_holds_the_lease_the_store_was_opened_with() {
        let backend = Backend::postgres();
        let a = backend.open_with_lease("a", std::time::Duration::from_secs(2));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        let before = db_clock(&backend);
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        let after = db_clock(&backend);
        let until = lease_until(&backend, id).unwrap();
        assert!(
            (before + 2_000..=after + 2_000).contains(&until),
            "claimed until {until}, the database's clock read {before} and {after}"
        );
    }

    #[test]
    fn a_run_without_a_lease_is_recovered_by_another_instance_only() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        // As a claim of a hookci from before leases leaves it.
        backend
            .scratch()
            .execute(&format!(
                "UPDATE runs SET lease_until = NULL WHERE id = {id}"
            ))
            .unwrap();
        assert!(a.recover_expired(&[]).unwrap().is_empty(), "its own claim");
        assert_eq!(
            ends(b.recover_expired(&[]).unwrap()),
            vec![(id, 1, RunStatus::Queued)]
        );
        assert_eq!(a.run(id).unwrap().unwrap().status, RunStatus::Queued);
    }

    #[test]
    fn renewals_hold_only_the_runs_named_and_an_instance_recovers_its_own_it_let_go() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let kept = a.create_run(run("ci", "k1")).unwrap().id;
        let dropped = a.create_run(run("ci", "k2")).unwrap().id;
        a.set_lease(std::time::Duration::from_millis(1));
        assert_eq!(a.claim_next().unwrap().unwrap().id, kept);
        assert_eq!(a.claim_next().unwrap().unwrap().id, dropped);
        std::thread::sleep(std::time::Duration::from_millis(20));
        // a stopped `dropped` (it could not renew in time) and holds `kept` only.
        a.set_lease(std::time::Duration::from_secs(3600));
        assert_eq!(a.renew_leases(&[kept]).unwrap(), vec![kept]);
        // a itself recovers the run it let go (no other instance may be there to).
        assert_eq!(
            ends(a.recover_expired(&[kept]).unwrap()),
            vec![(dropped, 1, RunStatus::Queued)]
        );
        assert!(b.recover_expired(&[]).unwrap().is_empty(), "once");
        assert_eq!(a.run(kept).unwrap().unwrap().status, RunStatus::Running);
        assert!(
            a.recover_expired(&[]).unwrap().is_empty(),
            "kept holds its renewed lease"
        );
    }

    /// Upkeep may take longer than a lease (a retention pass deleting large logs, the
    /// first reconcile of a repository with many refs): a wait longer than the lease
    /// does not cut it off, as it would a run's write.
    #[test]
    fn retention_waits_out_a_lock_held_longer_than_the_lease() {
        let backend = Backend::postgres();
        let a = backend.open_with_lease("a", std::time::Duration::from_secs(1));
        let old = a.create_run(run("ci", "k1")).unwrap().id;
        let new = a.create_run(run("ci", "k2")).unwrap().id;
        for id in [old, new] {
            assert_eq!(a.claim_next().unwrap().unwrap().id, id);
            a.finish_run(id, RunStatus::Succeeded, None, StepStatus::Skipped)
                .unwrap();
        }
        let held = backend
            .scratch()
            .hold(&format!("SELECT 1 FROM runs WHERE id = {old} FOR UPDATE"))
            .unwrap();
        let released = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(3));
            drop(held);
        });
        let pruned = a.prune(1, 0).unwrap();
        released.join().unwrap();
        assert_eq!(pruned.runs, vec![old]);
        assert!(a.run(old).unwrap().is_none());
    }

    #[test]
    fn a_renewal_the_database_does_not_answer_fails_within_the_lease() {
        let backend = Backend::postgres();
        let a = backend.open_with_lease("a", std::time::Duration::from_secs(2));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        assert_eq!(a.renew_leases(&[id]).unwrap(), vec![id]);
        // The run's row locked elsewhere: the renewal waits on it, until it gives up.
        let held = backend
            .scratch()
            .hold(&format!("SELECT 1 FROM runs WHERE id = {id} FOR UPDATE"))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let renewing = Arc::clone(&a);
        std::thread::spawn(move || {
            let _ = tx.send(renewing.renew_leases(&[id]));
        });
        // A deadline far above any answer: only a renewal that hangs misses it.
        let answer = rx.recv_timeout(std::time::Duration::from_secs(30));
        drop(held);
        // Given up by the server (`statement_timeout`) or by hookci, whichever is first.
        assert!(
            answer.expect("the renewal hung behind the lock").is_err(),
            "renewed through the lock"
        );
        assert_eq!(a.renew_leases(&[id]).unwrap(), vec![id], "connects again");
    }

    #[test]
    fn a_failure_the_server_reports_is_told_in_its_own_words() {
        let backend = Backend::postgres();
        let a = backend.open_as("a");
        backend
            .scratch()
            .execute("ALTER TABLE runs RENAME TO runs_elsewhere")
            .unwrap();
        let err = a.run(1).unwrap_err().to_string();
        assert!(
            err.contains("relation \"runs\" does not exist") && err.contains("42P01"),
            "{err}"
        );
    }

    #[test]
    fn a_cancel_asked_before_the_owners_lease_lapsed_ends_the_run_canceled() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        mid_step(&*a, id);
        assert!(b.request_cancel(id, "canceled through b".into()).unwrap());
        // a dies before it applies the cancel; its lease lapses.
        drop(a);
        backend.lapse_lease(id);
        assert_eq!(
            ends(b.recover_expired(&[]).unwrap()),
            vec![(id, 1, RunStatus::Canceled)]
        );
        assert_canceled_in_its_first_step(&*b, id, "canceled through b");
        assert!(b.claim_next().unwrap().is_none(), "not queued again");
    }

    #[test]
    fn a_cancel_asked_while_the_owner_was_down_ends_the_run_canceled_at_its_restart() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        let other = a.create_run(run("ci", "k2")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        assert_eq!(a.claim_next().unwrap().unwrap().id, other);
        mid_step(&*a, id);
        // a dies; the cancel comes through b before a restarts, within a's lease.
        drop(a);
        assert!(b.request_cancel(id, "canceled through b".into()).unwrap());
        let a = backend.open_as("a");
        let mut stopped = a.interrupt_running().unwrap();
        stopped.sort_unstable();
        assert_eq!(stopped, vec![id, other], "both runs' workspaces go");
        assert_eq!(
            ends(a.requeue_interrupted().unwrap()),
            vec![(id, 1, RunStatus::Canceled), (other, 1, RunStatus::Queued)],
            "only the run nobody canceled is built again"
        );
        assert_canceled_in_its_first_step(&*b, id, "canceled through b");
        assert_eq!(b.claim_next().unwrap().unwrap().id, other);
        assert!(b.claim_next().unwrap().is_none(), "not queued again");
    }

    #[test]
    fn a_cancel_passed_on_to_an_owner_that_stopped_before_applying_it_holds_at_its_restart() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        mid_step(&*a, id);
        assert!(b.request_cancel(id, "canceled through b".into()).unwrap());
        // a stops and its grace cuts the run before it heard of the cancel.
        a.finish_run(
            id,
            RunStatus::Interrupted,
            Some("stopped".into()),
            StepStatus::Interrupted,
        )
        .unwrap()
        .unwrap();
        drop(a);
        let a = backend.open_as("a");
        assert!(a.interrupt_running().unwrap().is_empty());
        assert_eq!(
            ends(a.requeue_interrupted().unwrap()),
            vec![(id, 1, RunStatus::Canceled)],
            "a cancel answered as applied is not built again"
        );
        let run = b.run(id).unwrap().unwrap();
        assert_eq!(
            (run.status, run.reason.as_deref()),
            (RunStatus::Canceled, Some("canceled through b"))
        );
        assert!(b.claim_next().unwrap().is_none(), "not queued again");
    }

    #[test]
    fn a_run_given_back_after_a_cancel_was_asked_of_it_ends_canceled() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        let kept = a.create_run(run("ci", "k2")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        assert_eq!(a.claim_next().unwrap().unwrap().id, kept);
        // a stops right after its claims; a cancel of one comes through b first.
        assert!(b.request_cancel(id, "canceled through b".into()).unwrap());
        let canceled = a.unclaim(id).unwrap().expect("the run ended canceled");
        assert_eq!(
            (canceled.id, canceled.status, canceled.attempt),
            (id, RunStatus::Canceled, 1)
        );
        assert_eq!(canceled.reason.as_deref(), Some("canceled through b"));
        assert_eq!(b.run(id).unwrap().unwrap(), canceled, "as committed");
        assert_eq!(a.unclaim(kept).unwrap(), None, "nobody canceled it");
        assert_eq!(b.run(kept).unwrap().unwrap().status, RunStatus::Queued);
        assert_eq!(b.claim_next().unwrap().unwrap().id, kept);
        assert!(a.claim_next().unwrap().is_none(), "never claimed again");
        assert!(b.claim_next().unwrap().is_none(), "never claimed again");
    }

    #[test]
    fn a_give_back_that_comes_after_another_instance_took_the_run_over_leaves_it_alone() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        // a's give-back is late: its lease lapsed, b recovered the run and runs it.
        backend.lapse_lease(id);
        assert_eq!(b.recover_expired(&[]).unwrap().len(), 1);
        assert_eq!(b.claim_next().unwrap().unwrap().id, id);
        assert!(b.request_cancel(id, "not a's".into()).is_ok());
        assert_eq!(a.unclaim(id).unwrap(), None);
        let run = b.run(id).unwrap().unwrap();
        assert_eq!(
            (run.status, run.attempt, run.instance.as_deref()),
            (RunStatus::Running, 2, Some("b")),
            "b's attempt runs on, neither queued again nor canceled by a: {run:?}"
        );
    }

    #[test]
    fn a_cancel_of_a_run_running_on_another_instance_reaches_its_owner() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let queued = a.create_run(run("ci", "k0")).unwrap().id;
        assert!(
            !b.request_cancel(queued, "no".into()).unwrap(),
            "a queued run is canceled where it is asked"
        );
        let id = queued;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        let heard = a.cancel_wakeups();
        let notified = heard.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        assert!(b.request_cancel(id, "canceled through b".into()).unwrap());
        runtime().block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), notified)
                .await
                .expect("instance a heard of the cancel sent to b");
        });
        assert_eq!(
            a.cancel_requests().unwrap(),
            vec![(id, "canceled through b".to_owned())]
        );
        assert!(b.cancel_requests().unwrap().is_empty(), "not b's run");
        // The cancel was answered as applied: a run that then succeeds ends canceled.
        let (ended, _) = a
            .finish_run(id, RunStatus::Succeeded, None, StepStatus::Skipped)
            .unwrap()
            .unwrap();
        assert_eq!(ended.status, RunStatus::Canceled);
        assert_eq!(ended.reason.as_deref(), Some("canceled through b"));
        assert!(!b.request_cancel(id, "late".into()).unwrap(), "it ended");
    }

    #[test]
    fn a_cancel_the_owner_asked_of_a_run_it_lost_ends_the_run_canceled_where_it_is_recovered() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        let id = a.create_run(run("ci", "k1")).unwrap().id;
        assert_eq!(a.claim_next().unwrap().unwrap().id, id);
        mid_step(&*a, id);
        // a stopped the run's steps, its lease on it lost, and left its end to b.
        assert!(a.request_cancel(id, "canceled through a".into()).unwrap());
        assert_eq!(
            a.cancel_requests().unwrap(),
            vec![(id, "canceled through a".to_owned())]
        );
        backend.lapse_lease(id);
        assert_eq!(
            ends(b.recover_expired(&[]).unwrap()),
            vec![(id, 1, RunStatus::Canceled)]
        );
        assert_canceled_in_its_first_step(&*b, id, "canceled through a");
        assert!(b.claim_next().unwrap().is_none(), "not queued again");
        assert!(!a.request_cancel(id, "late".into()).unwrap(), "it ended");
    }

    #[test]
    fn a_database_that_stops_answering_fails_each_call_instead_of_hanging_it() {
        let backend = Backend::postgres();
        let relay = crate::store::postgres::Relay::to(backend.scratch());
        let target = relay.target();
        let dir = tempfile::tempdir().unwrap();
        let lease = std::time::Duration::from_secs(1);
        let store = open(Some(target), dir.path(), "a", lease).unwrap();
        assert!(
            store.run(1).unwrap().is_none(),
            "answered through the relay"
        );

        relay.silence();
        // A read on the pooled connection, a write on it, then one on a new connection.
        for what in ["read", "write", "write on a new connection"] {
            let (tx, rx) = std::sync::mpsc::channel();
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let _ = tx.send(match what {
                    "read" => store.run(1).map(drop),
                    _ => store.create_run(run("ci", what)).map(drop),
                });
            });
            // A deadline far above the lease: only a call that hangs misses it.
            let answer = rx.recv_timeout(std::time::Duration::from_secs(60));
            let err = answer
                .unwrap_or_else(|_| panic!("the {what} hung"))
                .expect_err("no database answered");
            assert!(err.to_string().contains("127.0.0.1"), "{what}: {err}");
        }
    }

    #[test]
    fn one_instance_reconciles_at_a_time() {
        let backend = Backend::postgres();
        let (a, b) = (backend.open_as("a"), backend.open_as("b"));
        // The lock goes with its connection, which the server closes a moment after
        // the guard is dropped: wait for that, with a deadline.
        let acquire = |store: &Arc<dyn Store>| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                if let Some(guard) = store.try_reconcile().unwrap() {
                    return guard;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the lock was never released"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        let held = acquire(&a);
        assert!(b.try_reconcile().unwrap().is_none(), "a holds it");
        drop(held);
        let held = acquire(&b);
        assert!(a.try_reconcile().unwrap().is_none(), "b holds it now");
        drop(held);
        // The end of its holder releases it too.
        let _held = acquire(&a);
        assert!(b.try_reconcile().unwrap().is_none());
        drop(a);
        drop(acquire(&b));
    }
}
