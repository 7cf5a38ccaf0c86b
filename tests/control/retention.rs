//! Retention and `hookci runs`.

use super::*;

#[test]
fn retention_keeps_only_the_newest_runs_and_their_logs() {
    let b = Builder::new().config("retention: { runs: 2, days: 30 }");
    let origin = Origin::new(b.path());
    let d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[step("say", "echo run $HOOKCI_RUN_ID")]),
        )
        .start();
    let mut before = ZERO.to_owned();
    let mut ids = Vec::new();
    for i in 0..4 {
        let sha = origin.commit("main", &[("n", &i.to_string())], "x");
        let id = push(&d, &format!("keep-{i}"), "refs/heads/main", &before, &sha);
        assert_eq!(d.wait_run(id)["status"], "succeeded");
        ids.push(id);
        before = sha;
    }
    let listed = || -> Vec<i64> {
        let mut l: Vec<i64> = d.runs().iter().map(|r| r["id"].as_i64().unwrap()).collect();
        l.sort_unstable();
        l
    };
    eventually("only the newest 2 runs are listed", || listed() == ids[2..]);
    for old in &ids[..2] {
        let dir = d.state_dir().join(format!("logs/{old}"));
        eventually(&format!("{} is removed", dir.display()), || !dir.exists());
        assert_eq!(d.get(&format!("/api/runs/{old}")).status, 404);
    }
    for kept in &ids[2..] {
        assert!(
            d.state_dir().join(format!("logs/{kept}/1.log")).exists(),
            "run {kept}'s log is kept"
        );
        assert!(d.run_log(*kept).contains(&format!("run {kept}")));
    }
}

#[test]
fn hookci_runs_lists_every_run_with_its_status() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "on:\n  branches: [\"**\"]\n",
                &[step("check", "[ \"$(cat result)\" = ok ]")],
            ),
        )
        .start();
    let good = origin.commit("good", &[("result", "ok")], "x");
    let bad = origin.commit("bad", &[("result", "broken")], "y");
    let ok = push(&d, "list-ok", "refs/heads/good", ZERO, &good);
    let failed = push(&d, "list-bad", "refs/heads/bad", ZERO, &bad);
    assert_eq!(d.wait_run(ok)["status"], "succeeded");
    assert_eq!(d.wait_run(failed)["status"], "failed");

    let out = run_cli(&["runs", "--url", &d.url("")], None);
    let printed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{printed}{}", text(&out.stderr));
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 3, "a header and one line a run:\n{printed}");
    assert!(
        lines[0].contains("RUN") && lines[0].contains("STATUS"),
        "{printed}"
    );
    for (id, status, branch) in [(ok, "succeeded", "good"), (failed, "failed", "bad")] {
        let line = lines[1..]
            .iter()
            .find(|l| l.split_whitespace().next() == Some(id.to_string().as_str()))
            .unwrap_or_else(|| panic!("run {id} in\n{printed}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.contains(&status), "{line}");
        assert!(fields.contains(&"ci") && fields.contains(&branch), "{line}");
    }
}
