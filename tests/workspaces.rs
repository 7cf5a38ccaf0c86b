//! `workspace: reuse`: a slot's workspace outlives its runs and a restart, is updated to
//! exactly the new commit (keeping only what `keep:` names), and is replaced when an
//! update of it was cut short.

use std::collections::HashMap;

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

/// Prints what the step finds, then leaves what a build leaves: output under `target/`
/// (kept), a stray untracked file (not kept) and an edited tracked file.
const INSPECT: &str = r#"  - name: inspect
    run: |
      echo "ws=$HOOKCI_WORKSPACE"
      echo "files=$(ls -A | grep -vx .git | sort | tr '\n' ' ')"
      echo "a=$(cat a.txt)"
      echo "head=$(git rev-parse HEAD)"
      echo "stamp=$(cat target/stamp 2>/dev/null)"
      mkdir -p target/debug && echo "warm-$HOOKCI_RUN_ID" > target/stamp
      echo junk > untracked.txt
      echo "edited by run $HOOKCI_RUN_ID" > a.txt
"#;

/// Pushes `after` (on main, after `before`) and returns what the run's step printed,
/// and its id as `run`.
fn build(d: &Daemon, n: u32, before: &str, after: &str) -> HashMap<String, String> {
    let id = push_runs(d, &format!("delivery-{n}"), before, after)[0];
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.log());
    let mut printed: HashMap<String, String> = d
        .run_log(id)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect();
    printed.insert("run".into(), id.to_string());
    printed
}

#[test]
fn a_reused_workspace_builds_the_new_commit_exactly_and_a_damaged_one_is_replaced() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c1 = origin.commit(
        "main",
        &[("a.txt", "one"), ("doomed.txt", "deleted upstream")],
        "first",
    );
    let pipeline = format!(
        "repo: {REPO}\nclone_url: {}\nworkspace: reuse\nkeep: [\"target/\"]\nsteps:\n{INSPECT}",
        origin.url()
    );
    let mut d = b.pipeline("ci", &pipeline).start();

    let first = build(&d, 1, &"0".repeat(40), &c1);
    assert_eq!(first["files"], "a.txt doomed.txt");
    assert_eq!(first["a"], "one");
    assert_eq!(first["head"], c1);
    assert_eq!(first["stamp"], "");
    let ws = first["ws"].clone();
    assert!(
        ws.starts_with(
            &d.state_dir()
                .canonicalize()
                .unwrap()
                .join("workspaces/reuse/ci/")
                .display()
                .to_string()
        ),
        "{ws}"
    );
    assert!(
        std::path::Path::new(&ws).join("target/stamp").exists(),
        "kept after the run"
    );

    // The next commit deletes a file and adds one: the same workspace, exactly that
    // commit, with `target/` still warm.
    let c2 = origin.commit_removing("main", &["doomed.txt"], "drop");
    let c3 = origin.commit("main", &[("b.txt", "two")], "add");
    let second = build(&d, 2, &c1, &c3);
    assert_eq!(second["ws"], ws, "the slot's workspace is reused");
    assert_eq!(second["files"], "a.txt b.txt target", "{second:?}");
    assert_eq!(second["a"], "one", "the edit of a tracked file is undone");
    assert_eq!(second["head"], c3);
    assert!(second["stamp"].starts_with("warm-"), "{second:?}");
    assert_ne!(c2, c3);

    // A restart (startup recovery) keeps reused workspaces.
    d.signal(libc::SIGTERM);
    d.wait();
    d.spawn();
    let c4 = origin.commit("main", &[("a.txt", "four")], "four");
    let third = build(&d, 3, &c3, &c4);
    assert_eq!(third["ws"], ws);
    assert_eq!(
        third["stamp"],
        format!("warm-{}", second["run"]),
        "{third:?}"
    );
    assert_eq!(third["a"], "four");

    // What a failed or killed update leaves: its marker. Never built from: replaced.
    let marker = format!("{ws}.updating");
    std::fs::write(&marker, "").unwrap();
    let c5 = origin.commit("main", &[("c.txt", "five")], "five");
    let fourth = build(&d, 4, &c4, &c5);
    assert_eq!(fourth["ws"], ws);
    assert_eq!(fourth["files"], "a.txt b.txt c.txt", "{fourth:?}");
    assert_eq!(fourth["stamp"], "", "a replaced workspace starts cold");
    assert_eq!(fourth["head"], c5);
    assert!(!std::path::Path::new(&marker).exists());
    assert!(d.log().contains("replacing it"), "{}", d.log());
}

/// Prints what the step finds, leaves `target/stamp` (kept), and breaks the
/// workspace's index when the commit's `mode` file says `corrupt` (the next update in
/// place fails).
const DAMAGE: &str = r#"  - name: inspect
    run: |
      echo "files=$(ls -A | grep -vx .git | sort | tr '\n' ' ')"
      echo "head=$(git rev-parse HEAD)"
      echo "stamp=$(cat target/stamp 2>/dev/null)"
      mkdir -p target && echo "warm-$HOOKCI_RUN_ID" > target/stamp
      if [ "$(cat mode)" = corrupt ]; then echo "not an index" > .git/index; fi
"#;

fn push_main(d: &Daemon, n: u32, before: &str, after: &str) -> i64 {
    push_runs(d, &format!("damage-{n}"), before, after)[0]
}

/// Delivers a push of `after` on main (after `before`); the ids of the runs it made.
fn push_runs(d: &Daemon, delivery: &str, before: &str, after: &str) -> Vec<i64> {
    let payload = PushPayload::new(
        REPO,
        "refs/heads/main",
        before,
        after,
        "https://example.invalid/x.git",
    );
    let r = d.deliver("push", delivery, &payload.bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    let runs = r.json()["runs"].as_array().unwrap().clone();
    runs.iter().map(|run| run["id"].as_i64().unwrap()).collect()
}

fn printed(d: &Daemon, id: i64) -> HashMap<String, String> {
    d.run_log(id)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

// What a killed update leaves (its marker) is covered above, by leaving the marker
// itself: killing an update while it runs cannot be timed from here without a race.
#[test]
fn a_workspace_whose_update_failed_is_replaced_never_built_from() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let pipeline = format!(
        "repo: {REPO}\nclone_url: {}\nworkspace: reuse\nkeep: [\"target/\"]\nsteps:\n{DAMAGE}",
        origin.url()
    );
    let d = b.pipeline("ci", &pipeline).start();
    let ok = |id: i64| {
        let run = d.wait_run(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.log());
        printed(&d, id)
    };

    // A step breaks the workspace's index: the next update in place fails.
    let c1 = origin.commit("main", &[("a.txt", "1"), ("mode", "corrupt")], "one");
    let first = ok(push_main(&d, 1, &"0".repeat(40), &c1));
    assert_eq!(first["head"], c1);
    let ws = d.reuse_slot("ci").join("0");
    let marker = format!("{}.updating", ws.display());

    // Its run still builds, from a fresh checkout: nothing of the old workspace,
    // `target/` cold.
    let c2 = origin.commit("main", &[("b.txt", "2"), ("mode", "plain")], "two");
    let second_id = push_main(&d, 2, &c1, &c2);
    let second = ok(second_id);
    assert_eq!(second["files"], "a.txt b.txt mode", "{second:?}");
    assert_eq!(
        second["stamp"], "",
        "a replaced workspace starts cold: {second:?}"
    );
    assert_eq!(second["head"], c2);
    assert!(!std::path::Path::new(&marker).exists());
    assert!(
        d.log()
            .contains("updating the workspace in place failed: replacing it"),
        "{}",
        d.log()
    );

    // The replacement is a sound workspace again: the next update is in place.
    let c3 = origin.commit("main", &[("c.txt", "3")], "three");
    let third = ok(push_main(&d, 3, &c2, &c3));
    assert_eq!(third["files"], "a.txt b.txt c.txt mode target", "{third:?}");
    assert_eq!(third["stamp"], format!("warm-{second_id}"), "{third:?}");
    assert_eq!(third["head"], c3);
}

/// Only what changed is written: a tracked file the new commit leaves as it was keeps
/// its inode and its mtime across an update in place.
#[test]
fn a_reused_update_writes_only_the_changed_files() {
    use std::os::unix::fs::MetadataExt;
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let c1 = origin.commit("main", &[("a.txt", "1"), ("b.txt", "1")], "one");
    let pipeline = format!(
        "repo: {REPO}\nclone_url: {}\nworkspace: reuse\nsteps:\n  - name: look\n    run: cat b.txt\n",
        origin.url()
    );
    let d = b.pipeline("ci", &pipeline).start();
    let ok = |id: i64| {
        let run = d.wait_run(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.log());
    };
    ok(push_main(&d, 1, &"0".repeat(40), &c1));
    let ws = d.reuse_slot("ci").join("0");
    let stat = |p: &str| {
        let m = std::fs::metadata(ws.join(p)).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec())
    };
    let (a, b1) = (stat("a.txt"), stat("b.txt"));

    let c2 = origin.commit("main", &[("b.txt", "2")], "two");
    ok(push_main(&d, 2, &c1, &c2));
    assert_eq!(stat("a.txt"), a, "the unchanged file was written again");
    assert_ne!(stat("b.txt"), b1, "the changed file was written");
    assert_eq!(std::fs::read_to_string(ws.join("b.txt")).unwrap(), "2");
}

/// What steps do to a checkout beyond build output: commit, stage, put a link where a
/// tracked directory was (pointing out of the workspace) and a directory where a
/// tracked file was. The next update still gives exactly the new commit, with a clean
/// status, and writes nothing through the link.
const MESS: &str = r#"  - name: inspect
    run: |
      echo "files=$(find . -path ./.git -prune -o \( -type f -o -type l \) -print | sort | tr '\n' ' ')"
      echo "head=$(git rev-parse HEAD)"
      echo "status=$(git status --porcelain | tr '\n' ' ')"
      echo "lib=$(cat src/lib.c)"
      if [ "$(cat mode)" = mess ]; then
        echo local > committed.txt && git add committed.txt
        git -c user.name=step -c user.email=step@hookci.invalid commit -qm local
        echo staged > staged.txt && git add staged.txt
        rm -rf src && ln -s "$OUTSIDE" src
        rm b && mkdir -p b/inner && echo x > b/inner/f
        echo "edited" > a.txt
        echo messed=yes
      fi
"#;

#[test]
fn an_update_undoes_commits_staging_links_and_directories_a_step_left() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let outside = b.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("lib.c"), "not the workspace's").unwrap();
    let c1 = origin.commit(
        "main",
        &[
            ("a.txt", "a"),
            ("b", "b"),
            ("src/lib.c", "lib 1"),
            ("src/deep/x.c", "x"),
            ("mode", "mess"),
        ],
        "one",
    );
    let pipeline = format!(
        "repo: {REPO}\nclone_url: {}\nworkspace: reuse\nenv: {{ OUTSIDE: \"{}\" }}\nsteps:\n{MESS}",
        origin.url(),
        outside.display()
    );
    let d = b.pipeline("ci", &pipeline).start();
    let ok = |id: i64| {
        let run = d.wait_run(id);
        assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.log());
        printed(&d, id)
    };
    let first = ok(push_main(&d, 1, &"0".repeat(40), &c1));
    assert_eq!(first["head"], c1);
    assert_eq!(first["messed"], "yes", "{first:?}");

    let c2 = origin.commit("main", &[("src/lib.c", "lib 2"), ("mode", "look")], "two");
    let second = ok(push_main(&d, 2, &c1, &c2));
    assert_eq!(
        second["files"], "./a.txt ./b ./mode ./src/deep/x.c ./src/lib.c",
        "{second:?}"
    );
    assert_eq!(second["head"], c2);
    assert_eq!(second["status"], "", "{second:?}");
    assert_eq!(second["lib"], "lib 2");
    assert!(
        !d.log().contains("replacing it"),
        "updated in place: {}",
        d.log()
    );
    let outside_files: Vec<String> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(outside_files, ["lib.c"]);
    assert_eq!(
        std::fs::read_to_string(outside.join("lib.c")).unwrap(),
        "not the workspace's"
    );
}

/// Leaves what a Go module cache or `chmod -R a-w` leaves: a directory tree no one may
/// write to, which only its owner's chmod makes removable again.
const READ_ONLY: &str = r#"  - name: read-only
    run: |
      echo "ws=$HOOKCI_WORKSPACE"
      echo "files=$(ls -A | grep -vx .git | sort | tr '\n' ' ')"
      mkdir -p ro/sub target/ro ns && echo x > ro/sub/f && echo y > target/ro/f && echo z > ns/f
      chmod -R a-w ro target/ro
      chmod 644 ns
"#;

/// A directory a step left without write permission (or one it can no longer enter,
/// `ns/`) wedges nothing when the daemon is not root (no override of file
/// permissions): the next run of a reused slot is
/// updated in place without it (a kept one stays), and a fresh workspace holding one
/// is removed when its run ends.
#[test]
fn read_only_directories_a_step_leaves_are_removed_by_an_unprivileged_daemon() {
    let b = Builder::new().daemon_as(test_user());
    let origin = Origin::new(b.path());
    let reuse = format!(
        "repo: {REPO}\nclone_url: {}\nworkspace: reuse\nkeep: [\"target/\"]\nsteps:\n{READ_ONLY}",
        origin.url()
    );
    let fresh = format!(
        "repo: {REPO}\nclone_url: {}\nsteps:\n{READ_ONLY}",
        origin.url()
    );
    let d = b
        .pipeline("reuse", &reuse)
        .pipeline("fresh", &fresh)
        .start();
    let push = |n: u32, before: &str, after: &str| push_runs(&d, &format!("ro-{n}"), before, after);
    let ended = |ids: &[i64]| -> HashMap<String, HashMap<String, String>> {
        ids.iter()
            .map(|&id| {
                let run = d.wait_run(id);
                assert_eq!(run["status"], "succeeded", "{run:#}\n{}", d.log());
                let name = run["pipeline"].as_str().unwrap().to_owned();
                (name, printed(&d, id))
            })
            .collect()
    };

    let c1 = origin.commit("main", &[("a.txt", "1")], "one");
    let first = ended(&push(1, &"0".repeat(40), &c1));
    assert_eq!(first.len(), 2, "{first:?}");
    let fresh_ws = std::path::PathBuf::from(&first["fresh"]["ws"]);
    eventually(
        "the fresh workspace with a read-only tree is removed",
        || !fresh_ws.exists(),
    );

    let c2 = origin.commit("main", &[("b.txt", "2")], "two");
    let second = ended(&push(2, &c1, &c2));
    assert_eq!(
        second["reuse"]["ws"], first["reuse"]["ws"],
        "the slot's workspace is reused"
    );
    assert_eq!(
        second["reuse"]["files"], "a.txt b.txt target",
        "ro/ gone, the kept target/ stays: {second:?}"
    );
    let ws = std::path::Path::new(&second["reuse"]["ws"]);
    assert!(ws.join("target/ro/f").exists(), "kept");
    assert!(!std::path::Path::new(&format!("{}.updating", ws.display())).exists());
    assert!(
        !d.log().contains("replacing it"),
        "updated in place, not replaced: {}",
        d.log()
    );
    let fresh_ws = std::path::PathBuf::from(&second["fresh"]["ws"]);
    eventually("the second fresh workspace is removed", || {
        !fresh_ws.exists()
    });
}
