//! Which pipelines a push triggers, and why each other one does not: a pure function of
//! (push, pipelines). No I/O; the store later turns `Build` decisions into runs under the
//! per-commit lock.

use std::sync::Arc;

use crate::intake::event::{Push, RefKind};
use crate::pipeline::pattern::PatternList;
use crate::pipeline::{Dedupe, Pipeline, PipelineSet};

/// Commit-message tokens that ask for no build.
pub const SKIP_TOKENS: [&str; 3] = ["[skip ci]", "[ci skip]", "[no ci]"];

/// The decision for one pipeline.
#[derive(Debug, Clone)]
pub struct Decision {
    pub pipeline: Arc<Pipeline>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Build `commit`; `key` is the per-commit lock.
    Build { key: String, commit: String },
    /// A run is recorded but ends `skipped` without a step (skip token).
    Skip {
        key: String,
        commit: String,
        reason: String,
    },
    /// Nothing is recorded but this reason.
    Ignore { reason: String },
}

/// The run key: the per-commit lock (README, "Why").
pub fn run_key(pipeline: &Pipeline, git_ref: &str, commit: &str) -> String {
    match pipeline.dedupe {
        Dedupe::Ref => format!("{}\n{git_ref}\n{commit}", pipeline.name),
        Dedupe::Commit => format!("{}\n*\n{commit}", pipeline.name),
    }
}

/// Decides every pipeline of `set` for `push`, in the set's order.
pub fn decide(push: &Push, set: &PipelineSet) -> Vec<Decision> {
    set.iter()
        .map(|p| Decision {
            pipeline: Arc::clone(p),
            verdict: decide_one(push, p),
        })
        .collect()
}

fn ignore(reason: String) -> Verdict {
    Verdict::Ignore { reason }
}

fn decide_one(push: &Push, p: &Pipeline) -> Verdict {
    if !p.repo.same_as(&push.repo) {
        return ignore(format!(
            "repository {} is not this pipeline's {}",
            push.repo, p.repo
        ));
    }
    if push.deleted {
        return ignore(format!(
            "{} was deleted; deletions never trigger",
            push.git_ref
        ));
    }
    let Some(commit) = push.commit.clone() else {
        return ignore(format!(
            "the push of {} names no commit to build",
            push.git_ref
        ));
    };
    let on = &p.on;
    match &push.kind {
        RefKind::Branch(branch) => match (&on.branches, &on.tags) {
            (Some(list), _) => {
                if let Some(reason) = unmatched("branch", branch, "on.branches", list) {
                    return ignore(reason);
                }
            }
            (None, Some(_)) => {
                return ignore(format!(
                    "branch {branch:?}: this pipeline runs on tags only"
                ))
            }
            (None, None) => {}
        },
        RefKind::Tag(tag) => match &on.tags {
            Some(list) => {
                if let Some(reason) = unmatched("tag", tag, "on.tags", list) {
                    return ignore(reason);
                }
            }
            None => return ignore(format!("tag {tag:?}: this pipeline has no on.tags")),
        },
        RefKind::Other => return ignore(format!("{} is neither a branch nor a tag", push.git_ref)),
    }
    let key = run_key(p, &push.git_ref, &commit);
    let message = push.head_message.as_deref().unwrap_or_default();
    if let Some(token) = SKIP_TOKENS.iter().find(|t| message.contains(*t)) {
        return Verdict::Skip {
            key,
            commit,
            reason: format!("head commit message contains {token}"),
        };
    }
    Verdict::Build { key, commit }
}

/// Why `name` is not selected by `list`, or `None` when it is.
fn unmatched(what: &str, name: &str, field: &str, list: &PatternList) -> Option<String> {
    let m = list.evaluate(name);
    if m.included {
        return None;
    }
    Some(match m.decided_by {
        Some(p) => format!(
            "{what} {name:?} is excluded by {field} pattern {:?}",
            p.as_str()
        ),
        None => {
            let all: Vec<&str> = list.patterns().iter().map(|p| p.as_str()).collect();
            format!("{what} {name:?} matches none of {field} {all:?}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn pipeline(name: &str, body: &str) -> Pipeline {
        Pipeline::parse(
            Path::new(&format!("{name}.yml")),
            &format!("{body}\nsteps:\n  - run: true\n"),
        )
        .unwrap()
    }

    fn push(git_ref: &str, message: &str, deleted: bool) -> Push {
        let after = if deleted {
            "0".repeat(40)
        } else {
            "a".repeat(40)
        };
        let head = if deleted {
            "null".to_owned()
        } else {
            format!(
                r#"{{"id":"{}","message":{}}}"#,
                "c".repeat(40),
                serde_json::json!(message)
            )
        };
        let body = format!(
            r#"{{"ref":"{git_ref}","before":"{}","after":"{after}","deleted":{deleted},"head_commit":{head},
            "repository":{{"full_name":"octo-org/octo-repo","clone_url":"https://example.com/x.git"}}}}"#,
            "b".repeat(40)
        );
        Push::parse(body.as_bytes()).unwrap()
    }

    fn verdict(p: &Pipeline, git_ref: &str, message: &str, deleted: bool) -> Verdict {
        decide_one(&push(git_ref, message, deleted), p)
    }

    #[test]
    fn table() {
        let ci = pipeline(
            "ci",
            "repo: octo-org/octo-repo\non:\n  branches: [main, \"release/**\", \"!release/old-*\"]",
        );
        let rel = pipeline("release", "repo: octo-org/octo-repo\non:\n  tags: [\"v*\"]");
        let any = pipeline("any", "repo: Octo-Org/Octo-Repo");
        let both = pipeline(
            "both",
            "repo: octo-org/octo-repo\non:\n  branches: [main]\n  tags: [\"v*\"]",
        );
        let other = pipeline("other", "repo: someone/else");
        // (pipeline, ref, message, deleted, builds?, reason fragment)
        let cases: &[(&Pipeline, &str, &str, bool, bool, &str)] = &[
            (&ci, "refs/heads/main", "fix", false, true, ""),
            (&ci, "refs/heads/release/1.0", "fix", false, true, ""),
            (&ci, "refs/heads/release/1.0/hotfix", "fix", false, true, ""),
            (
                &ci,
                "refs/heads/release/old-1",
                "fix",
                false,
                false,
                "excluded by on.branches pattern \"!release/old-*\"",
            ),
            (
                &ci,
                "refs/heads/feature",
                "fix",
                false,
                false,
                "matches none of on.branches",
            ),
            (&ci, "refs/tags/v1.0", "fix", false, false, "no on.tags"),
            (&ci, "refs/heads/main", "fix", true, false, "deleted"),
            (
                &ci,
                "refs/heads/main",
                "docs [skip ci]",
                false,
                false,
                "[skip ci]",
            ),
            (
                &ci,
                "refs/heads/main",
                "docs\n\n[ci skip]",
                false,
                false,
                "[ci skip]",
            ),
            (
                &ci,
                "refs/heads/release/$(touch${IFS}/tmp/pwned)",
                "x",
                false,
                true,
                "",
            ),
            (&rel, "refs/tags/v1.0", "x", false, true, ""),
            (
                &rel,
                "refs/tags/1.0",
                "x",
                false,
                false,
                "matches none of on.tags",
            ),
            (&rel, "refs/heads/main", "x", false, false, "tags only"),
            (&rel, "refs/tags/v1.0", "x", true, false, "deleted"),
            (&any, "refs/heads/whatever/branch", "x", false, true, ""),
            (&any, "refs/tags/v1", "x", false, false, "no on.tags"),
            (
                &any,
                "refs/notes/commits",
                "x",
                false,
                false,
                "neither a branch nor a tag",
            ),
            (&both, "refs/heads/main", "x", false, true, ""),
            (&both, "refs/tags/v2", "x", false, true, ""),
            (&both, "refs/heads/dev", "x", false, false, "on.branches"),
            (
                &other,
                "refs/heads/main",
                "x",
                false,
                false,
                "is not this pipeline's someone/else",
            ),
        ];
        for (p, git_ref, message, deleted, builds, fragment) in cases {
            let v = verdict(p, git_ref, message, *deleted);
            let label = format!("{} {git_ref} {message:?} deleted={deleted}: {v:?}", p.name);
            match &v {
                Verdict::Build { .. } => assert!(*builds, "{label}"),
                Verdict::Skip { reason, .. } | Verdict::Ignore { reason } => {
                    assert!(!*builds, "{label}");
                    assert!(reason.contains(fragment), "{label}");
                }
            }
        }
    }

    #[test]
    fn skip_token_still_records_a_run_key() {
        let ci = pipeline("ci", "repo: octo-org/octo-repo");
        assert!(matches!(
            verdict(&ci, "refs/heads/main", "wip [no ci]", false),
            Verdict::Skip { .. }
        ));
    }

    #[test]
    fn run_keys() {
        let by_ref = pipeline("a", "repo: o/r");
        let by_commit = pipeline("b", "repo: o/r\ndedupe: commit");
        assert_ne!(
            run_key(&by_ref, "refs/heads/x", "c1"),
            run_key(&by_ref, "refs/heads/y", "c1")
        );
        assert_eq!(
            run_key(&by_commit, "refs/heads/x", "c1"),
            run_key(&by_commit, "refs/tags/y", "c1")
        );
        assert_ne!(
            run_key(&by_ref, "refs/heads/x", "c1"),
            run_key(&by_commit, "refs/heads/x", "c1")
        );
    }
}
