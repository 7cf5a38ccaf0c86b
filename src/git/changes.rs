//! Which paths a push changed, for `on.paths` filters: computed from the repository
//! itself with git2, never from the payload's `commits[]` list (GitHub truncates it and
//! it says nothing useful about force pushes). It sits between `checkout` (the mirror
//! holds `after`, and `before` if it is still reachable there) and the decision to skip
//! a run by path filter. Pure reads of a local repository: no network, no store.

use std::collections::BTreeSet;

use git2::{ErrorCode, Oid, Repository};

/// The paths a push changed and what they were measured against.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Changes {
    /// Changed paths, sorted, deduplicated, `/`-separated, relative to the repo root.
    pub paths: Vec<String>,
    /// What the diff was taken against, for the run's reason text: e.g. "before 1a2b3c4",
    /// "merge base 1a2b3c4 with main", "no base: every file".
    pub base: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    #[error("{which} {id:?} is not a commit id")]
    BadId { which: &'static str, id: String },
    #[error("{step}: {source}")]
    Git {
        /// What was being done, naming the commits or ref involved.
        step: String,
        source: git2::Error,
    },
}

/// The paths the push `before`..`after` changed.
///
/// `repo` is the (bare) mirror holding `after` (and maybe `before`); `default_ref` is e.g.
/// "refs/heads/main"; a default branch absent from the mirror counts as unavailable.
///
/// - `before` is an ancestor of `after` (or equal): the tree diff `before..after`.
/// - `before` is in the repository but not an ancestor (a force push rewrote or rewound
///   the branch): the union of `merge_base(before, after)..after` (what the new commits
///   introduce) and `before..after` (what differs from what was there, e.g. a file only
///   the discarded commits touched, now reverted). Over-triggering a pipeline is cheap;
///   silently skipping one whose inputs changed is not.
/// - `before` is all zeros (a new branch) or not in the repository (unreachable after a
///   force push, never fetched): `merge_base(after, default head)..after`. A commit that
///   is the default head or its ancestor yields no paths.
/// - No usable base (no default head, no merge base): every file of `after`'s tree.
///
/// When the push is to the default branch itself and `before` is unusable, the mirror's
/// default head already is `after`, which would yield no paths: pass `None` then.
pub fn changed_paths(
    repo: &Repository,
    before: &str,
    after: &str,
    default_ref: Option<&str>,
) -> Result<Changes, ChangesError> {
    let after_id = parse_id("after", after)?;
    if after_id.is_zero() {
        // A branch deletion: nothing to build, so nothing was changed that could matter.
        return Err(ChangesError::BadId {
            which: "after",
            id: after.to_owned(),
        });
    }
    repo.find_commit(after_id)
        .map_err(git_err(format!("finding after commit {after_id}")))?;
    let mut paths = BTreeSet::new();
    let base = match known_before(repo, before)? {
        Some(before_id) if before_id == after_id || descends(repo, after_id, before_id)? => {
            diff_into(repo, Some(before_id), after_id, &mut paths)?;
            format!("before {}", short(before_id))
        }
        Some(before_id) => {
            diff_into(repo, Some(before_id), after_id, &mut paths)?;
            match merge_base(repo, before_id, after_id)? {
                Some(mb) => {
                    diff_into(repo, Some(mb), after_id, &mut paths)?;
                    format!(
                        "force push: before {} and merge base {}",
                        short(before_id),
                        short(mb)
                    )
                }
                // An orphan rewrite: the plain tree diff is all there is to go on.
                None => format!("force push: before {}, no common history", short(before_id)),
            }
        }
        None => {
            let against_default = match default_ref {
                Some(name) => match default_head(repo, name)? {
                    Some(head) => merge_base(repo, after_id, head)?
                        .map(|mb| (mb, name.strip_prefix("refs/heads/").unwrap_or(name))),
                    None => None,
                },
                None => None,
            };
            match against_default {
                Some((mb, branch)) => {
                    diff_into(repo, Some(mb), after_id, &mut paths)?;
                    format!("merge base {} with {branch}", short(mb))
                }
                None => {
                    diff_into(repo, None, after_id, &mut paths)?;
                    "no base: every file".to_owned()
                }
            }
        }
    };
    Ok(Changes {
        paths: paths.into_iter().collect(),
        base,
    })
}

fn parse_id(which: &'static str, id: &str) -> Result<Oid, ChangesError> {
    // Oid::from_str accepts abbreviations; a payload always carries full ids, and an
    // abbreviation here would silently mean "some other object".
    let full = id.len() == 40 && id.bytes().all(|b| b.is_ascii_hexdigit());
    match Oid::from_str(id) {
        Ok(oid) if full => Ok(oid),
        _ => Err(ChangesError::BadId {
            which,
            id: id.to_owned(),
        }),
    }
}

/// `before` as a commit of this repository, or `None` for a new branch (all zeros) or a
/// commit the mirror does not hold.
fn known_before(repo: &Repository, before: &str) -> Result<Option<Oid>, ChangesError> {
    let id = parse_id("before", before)?;
    if id.is_zero() {
        return Ok(None);
    }
    match repo.find_commit(id) {
        Ok(c) => Ok(Some(c.id())),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
        Err(e) => Err(git_err(format!("finding before commit {id}"))(e)),
    }
}

fn default_head(repo: &Repository, name: &str) -> Result<Option<Oid>, ChangesError> {
    let found = repo
        .find_reference(name)
        .and_then(|r| r.peel_to_commit())
        .map(|c| c.id());
    match found {
        Ok(id) => Ok(Some(id)),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
        Err(e) => Err(git_err(format!("resolving default branch {name}"))(e)),
    }
}

fn descends(repo: &Repository, commit: Oid, ancestor: Oid) -> Result<bool, ChangesError> {
    repo.graph_descendant_of(commit, ancestor)
        .map_err(git_err(format!("is {commit} a descendant of {ancestor}")))
}

fn merge_base(repo: &Repository, one: Oid, two: Oid) -> Result<Option<Oid>, ChangesError> {
    match repo.merge_base(one, two) {
        Ok(mb) => Ok(Some(mb)),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
        Err(e) => Err(git_err(format!("merge base of {one} and {two}"))(e)),
    }
}

/// Adds every path that differs between the trees of `from` (none: the empty tree) and
/// `to`. Rename detection stays off: a rename then shows as a deletion plus an addition,
/// so both the old and the new path count, which is what a path filter wants.
fn diff_into(
    repo: &Repository,
    from: Option<Oid>,
    to: Oid,
    out: &mut BTreeSet<String>,
) -> Result<(), ChangesError> {
    let tree_of = |id: Oid| {
        repo.find_commit(id)
            .and_then(|c| c.tree())
            .map_err(git_err(format!("reading the tree of {id}")))
    };
    let old = from.map(tree_of).transpose()?;
    let new = tree_of(to)?;
    let step = match from {
        Some(f) => format!("diffing {f}..{to}"),
        None => format!("listing the tree of {to}"),
    };
    let diff = repo
        .diff_tree_to_tree(old.as_ref(), Some(&new), None)
        .map_err(git_err(step))?;
    for delta in diff.deltas() {
        // Git stores paths `/`-separated whatever the platform; bytes avoid any
        // OS-specific Path conversion. Non-UTF-8 names are kept, lossily, rather than lost.
        for file in [delta.old_file(), delta.new_file()] {
            if let Some(p) = file.path_bytes() {
                out.insert(String::from_utf8_lossy(p).into_owned());
            }
        }
    }
    Ok(())
}

fn short(id: Oid) -> String {
    let mut s = id.to_string();
    s.truncate(7);
    s
}

fn git_err(step: String) -> impl FnOnce(git2::Error) -> ChangesError {
    move |source| ChangesError::Git { step, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use git2::build::TreeUpdateBuilder;
    use git2::{FileMode, Signature};

    const ZEROS: &str = "0000000000000000000000000000000000000000";

    /// Commits `files` (path -> Some(content), or None to delete) on top of the first
    /// parent's tree (the empty tree without parents), then points `branch` at it.
    fn commit(
        repo: &Repository,
        branch: Option<&str>,
        parents: &[Oid],
        files: &[(&str, Option<&str>)],
    ) -> Oid {
        let baseline = match parents.first() {
            Some(p) => repo.find_commit(*p).unwrap().tree().unwrap(),
            None => {
                let empty = repo.treebuilder(None).unwrap().write().unwrap();
                repo.find_tree(empty).unwrap()
            }
        };
        let mut update = TreeUpdateBuilder::new();
        for (path, content) in files {
            match content {
                Some(c) => update.upsert(*path, repo.blob(c.as_bytes()).unwrap(), FileMode::Blob),
                None => update.remove(*path),
            };
        }
        let tree = repo
            .find_tree(update.create_updated(repo, &baseline).unwrap())
            .unwrap();
        let parents: Vec<_> = parents
            .iter()
            .map(|p| repo.find_commit(*p).unwrap())
            .collect();
        let parents: Vec<_> = parents.iter().collect();
        let sig = Signature::now("t", "t@example.com").unwrap();
        let id = repo.commit(None, &sig, &sig, "c", &tree, &parents).unwrap();
        if let Some(b) = branch {
            repo.reference(&format!("refs/heads/{b}"), id, true, "test")
                .unwrap();
        }
        id
    }

    fn bare() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        (dir, repo)
    }

    fn changed(repo: &Repository, before: &str, after: Oid, default: Option<&str>) -> Changes {
        changed_paths(repo, before, &after.to_string(), default).unwrap()
    }

    /// main: c0 (README, src/a/b.rs) <- c1 (src/lib.rs).
    fn main_history(repo: &Repository) -> (Oid, Oid) {
        let c0 = commit(
            repo,
            Some("main"),
            &[],
            &[("README", Some("r")), ("src/a/b.rs", Some("b"))],
        );
        let c1 = commit(repo, Some("main"), &[c0], &[("src/lib.rs", Some("l"))]);
        (c0, c1)
    }

    #[test]
    fn ordinary_push_counts_every_pushed_commit_with_slash_paths() {
        let (_d, repo) = bare();
        let (_, c1) = main_history(&repo);
        let c2 = commit(&repo, Some("main"), &[c1], &[("src/a/b.rs", Some("b2"))]);
        let c3 = commit(&repo, Some("main"), &[c2], &[("docs/x/y.md", Some("y"))]);
        let got = changed(&repo, &c1.to_string(), c3, Some("refs/heads/main"));
        assert_eq!(got.paths, ["docs/x/y.md", "src/a/b.rs"]);
        assert_eq!(got.base, format!("before {}", short(c1)));
    }

    #[test]
    fn deleted_file_counts() {
        let (_d, repo) = bare();
        let (_, c1) = main_history(&repo);
        let c2 = commit(&repo, Some("main"), &[c1], &[("src/a/b.rs", None)]);
        assert_eq!(
            changed(&repo, &c1.to_string(), c2, None).paths,
            ["src/a/b.rs"]
        );
    }

    #[test]
    fn renamed_file_counts_both_paths() {
        let (_d, repo) = bare();
        let (_, c1) = main_history(&repo);
        let c2 = commit(
            &repo,
            Some("main"),
            &[c1],
            &[("src/a/b.rs", None), ("src/c/b.rs", Some("b"))],
        );
        let got = changed(&repo, &c1.to_string(), c2, None);
        assert_eq!(got.paths, ["src/a/b.rs", "src/c/b.rs"]);
    }

    #[test]
    fn new_branch_uses_merge_base_with_default() {
        let (_d, repo) = bare();
        let (_, c1) = main_history(&repo);
        let f1 = commit(&repo, Some("feature"), &[c1], &[("feat/one.rs", Some("1"))]);
        let f2 = commit(&repo, Some("feature"), &[f1], &[("feat/two.rs", Some("2"))]);
        // main moves on after the branch point: its changes are not the branch's.
        commit(&repo, Some("main"), &[c1], &[("main-only.txt", Some("m"))]);
        let got = changed(&repo, ZEROS, f2, Some("refs/heads/main"));
        assert_eq!(got.paths, ["feat/one.rs", "feat/two.rs"]);
        assert_eq!(got.base, format!("merge base {} with main", short(c1)));
    }

    #[test]
    fn new_branch_at_or_behind_default_head_is_empty() {
        let (_d, repo) = bare();
        let (c0, c1) = main_history(&repo);
        for at in [c1, c0] {
            let got = changed(&repo, ZEROS, at, Some("refs/heads/main"));
            assert!(got.paths.is_empty(), "{got:?}");
        }
    }

    #[test]
    fn force_push_rewrite_counts_new_commits_and_discarded_files() {
        let (_d, repo) = bare();
        let (_, c1) = main_history(&repo);
        let old = commit(
            &repo,
            None,
            &[c1],
            &[("old.txt", Some("o")), ("same.txt", Some("s"))],
        );
        // The rewrite writes same.txt identically: only merge_base..after shows it.
        let new = commit(
            &repo,
            None,
            &[c1],
            &[("new.txt", Some("n")), ("same.txt", Some("s"))],
        );
        let got = changed(&repo, &old.to_string(), new, Some("refs/heads/main"));
        // old.txt was only in the discarded commit: it is gone now, so it changed.
        assert_eq!(got.paths, ["new.txt", "old.txt", "same.txt"]);
        assert_eq!(
            got.base,
            format!(
                "force push: before {} and merge base {}",
                short(old),
                short(c1)
            )
        );
        // A rewind to an ancestor: the dropped commit's files revert.
        let rewind = changed(&repo, &old.to_string(), c1, None);
        assert_eq!(rewind.paths, ["old.txt", "same.txt"]);
    }

    #[test]
    fn unknown_before_uses_merge_base_with_default() {
        let (_d, repo) = bare();
        let (c0, _) = main_history(&repo);
        let f1 = commit(&repo, Some("feature"), &[c0], &[("f.txt", Some("f"))]);
        let got = changed(
            &repo,
            "0123456789abcdef0123456789abcdef01234567",
            f1,
            Some("refs/heads/main"),
        );
        assert_eq!(got.paths, ["f.txt"]);
        assert_eq!(got.base, format!("merge base {} with main", short(c0)));
    }

    #[test]
    fn no_usable_base_is_every_file() {
        let (_d, repo) = bare();
        main_history(&repo);
        let orphan = commit(
            &repo,
            Some("orphan"),
            &[],
            &[("a/b/c.txt", Some("c")), ("top.txt", Some("t"))],
        );
        // Unrelated to main, main absent from the mirror, or no default at all.
        for default in [Some("refs/heads/main"), Some("refs/heads/gone"), None] {
            let got = changed(&repo, ZEROS, orphan, default);
            assert_eq!(got.paths, ["a/b/c.txt", "top.txt"], "{default:?}");
            assert_eq!(got.base, "no base: every file");
        }
    }

    #[test]
    fn bad_or_missing_after_is_an_error() {
        let (_d, repo) = bare();
        let (c0, _) = main_history(&repo);
        let c0 = c0.to_string();
        for after in [ZEROS, "abc", "0123456789abcdef0123456789abcdef01234567"] {
            assert!(changed_paths(&repo, &c0, after, None).is_err(), "{after}");
        }
        assert!(changed_paths(&repo, "xyz", &c0, None).is_err());
    }
}
