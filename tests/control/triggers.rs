//! What triggers: path filters and skip tokens.

use super::*;

#[test]
fn path_filters_use_the_repository_history_and_never_apply_to_tags() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    // The origin's default branch is main, for new branches' merge base.
    git2::Repository::open_bare(&origin.path)
        .unwrap()
        .set_head("refs/heads/main")
        .unwrap();
    let base = commit_paths(
        &origin.path,
        "main",
        None,
        &[("README", "r"), ("src/lib.rs", "1")],
        "base",
    );
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "on:\n  branches: [\"**\"]\n  tags: [\"v*\"]\n  paths: [\"src/**\"]\n",
                &[step("build", "echo built $HOOKCI_REF")],
            ),
        )
        .start();

    // Only docs changed on main: skipped.
    let docs = commit_paths(
        &origin.path,
        "main",
        None,
        &[("docs/guide.md", "g")],
        "docs",
    );
    let id = push(&d, "paths-docs", "refs/heads/main", &base, &docs);
    let run = d.wait_run(id);
    assert_eq!(run["status"], "skipped", "{run:#}");
    assert!(reason(&run).contains("on.paths"), "{run:#}");
    assert!(d.run_log(id).is_empty(), "no step ran: {}", d.run_log(id));

    // src changed: built.
    let src = commit_paths(&origin.path, "main", None, &[("src/lib.rs", "2")], "src");
    let id = push(&d, "paths-src", "refs/heads/main", &docs, &src);
    assert_eq!(d.wait_run(id)["status"], "succeeded");

    // A branch from main touching src, then force-pushed with a rewrite whose src file
    // is the same as before the rewrite: only the merge base shows the src change.
    let old = commit_paths(
        &origin.path,
        "feature/x",
        Some(&src),
        &[("src/extra.rs", "same"), ("docs/a.md", "old")],
        "old",
    );
    let id = push(&d, "paths-branch", "refs/heads/feature/x", ZERO, &old);
    assert_eq!(d.wait_run(id)["status"], "succeeded");
    let forced = commit_paths(
        &origin.path,
        "feature/x",
        Some(&src),
        &[("src/extra.rs", "same"), ("docs/b.md", "new")],
        "rewritten",
    );
    let mut force = PushPayload::new(REPO, "refs/heads/feature/x", &old, &forced, "x");
    force.forced = true;
    let runs = push_runs(&d, "paths-force", &force.bytes());
    let run = d.wait_run(runs[0].1);
    assert_eq!(
        run["status"], "succeeded",
        "the force push's new commit changes src/ against the merge base: {run:#}"
    );

    // A new branch with only a docs change on top of main: its merge base with main
    // shows no src change.
    let branch = commit_paths(
        &origin.path,
        "docs/only",
        Some(&src),
        &[("docs/c.md", "c")],
        "docs",
    );
    let id = push(
        &d,
        "paths-new-branch",
        "refs/heads/docs/only",
        ZERO,
        &branch,
    );
    let run = d.wait_run(id);
    assert_eq!(run["status"], "skipped", "{run:#}");
    assert!(reason(&run).contains("on.paths"), "{run:#}");

    // Tags: no path filter, even for a docs-only commit.
    let tagged = commit_paths(
        &origin.path,
        "main",
        None,
        &[("docs/release.md", "notes")],
        "notes",
    );
    let tag = origin.annotated_tag("v1.0.0", &tagged);
    let mut tag_push = PushPayload::new(REPO, "refs/tags/v1.0.0", ZERO, &tag, "x");
    tag_push.head = Some(tagged.clone());
    let runs = push_runs(&d, "paths-tag", &tag_push.bytes());
    let run = d.wait_run(runs[0].1);
    assert_eq!(
        run["status"], "succeeded",
        "paths never apply to tags: {run:#}"
    );
    assert!(d.run_log(runs[0].1).contains("built refs/tags/v1.0.0"));
}

#[test]
fn skip_tokens_in_the_head_commit_record_a_skipped_run() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let marker = b.path().join("ran");
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "on:\n  branches: [\"**\"]\n",
                &[step("mark", &format!("touch {}", marker.display()))],
            ),
        )
        .start();
    for (i, token) in ["[skip ci]", "[no ci]"].into_iter().enumerate() {
        let branch = format!("b{i}");
        let message = format!("update the docs {token}\n\nmore words");
        let sha = origin.commit(&branch, &[("n", &i.to_string())], &message);
        let delivery = format!("skip-{i}");
        let runs = push_runs(
            &d,
            &delivery,
            &push_body(&format!("refs/heads/{branch}"), ZERO, &sha, &message),
        );
        assert_eq!(runs.len(), 1, "{runs:?}");
        let run = d.wait_run(runs[0].1);
        assert_eq!(run["status"], "skipped", "{token}: {run:#}");
        assert!(reason(&run).contains(token), "{token}: {run:#}");
        assert_eq!(run["commit"], sha.as_str());
        let why = d.get_json(&format!("/api/deliveries/{delivery}"));
        assert_eq!(why["decisions"][0]["outcome"], "skipped", "{why:#}");
    }
    assert!(!marker.exists(), "no step ran");
}
