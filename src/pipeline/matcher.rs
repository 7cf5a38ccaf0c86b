//! Which pipelines a push triggers, and why each other one does not: a pure function of
//! (push, pipelines). No I/O; the store later turns `Build` decisions into runs under the
//! per-commit lock. Intake calls it for every push against every pipeline, so a decision
//! allocates nothing but what a build needs: a reason borrows the push and the pipeline
//! and is written out only where it is shown or stored.

use std::fmt;
use std::sync::Arc;

use crate::git::repo::RepoName;
use crate::intake::event::{Push, RefKind};
use crate::pipeline::pattern::{Pattern, PatternList};
use crate::pipeline::{Dedupe, Pipeline, PipelineSet};

/// Commit-message tokens that ask for no build.
pub const SKIP_TOKENS: [&str; 3] = ["[skip ci]", "[ci skip]", "[no ci]"];

/// The decision for one pipeline.
#[derive(Debug, Clone)]
pub struct Decision<'a> {
    pub pipeline: &'a Arc<Pipeline>,
    pub verdict: Verdict<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Build `commit`; `key` is the per-commit lock.
    Build { key: String, commit: String },
    /// A run is recorded but ends `skipped` without a step (skip token).
    Skip {
        key: String,
        commit: String,
        reason: Reason<'a>,
    },
    /// Nothing is recorded but this reason.
    Ignore { reason: Reason<'a> },
}

/// Which ref filter of a pipeline a reason speaks of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Branches,
    Tags,
}

impl Filter {
    /// What the filter selects, and its key in a pipeline file.
    fn words(self) -> (&'static str, &'static str) {
        match self {
            Filter::Branches => ("branch", "on.branches"),
            Filter::Tags => ("tag", "on.tags"),
        }
    }
}

/// Why a pipeline does not build a push (or records it skipped), borrowed from the
/// push and the pipeline; its `Display` is the sentence users read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason<'a> {
    OtherRepository {
        pushed: &'a RepoName,
        watched: &'a RepoName,
    },
    Deleted {
        git_ref: &'a str,
    },
    NoCommit {
        git_ref: &'a str,
    },
    /// The last pattern of the filter that matched `name` is a negated one.
    Excluded {
        filter: Filter,
        name: &'a str,
        pattern: &'a Pattern,
    },
    NoneMatched {
        filter: Filter,
        name: &'a str,
        list: &'a PatternList,
    },
    TagsOnly {
        branch: &'a str,
    },
    NoTags {
        tag: &'a str,
    },
    NeitherBranchNorTag {
        git_ref: &'a str,
    },
    SkipToken {
        token: &'static str,
    },
}

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::OtherRepository { pushed, watched } => {
                write!(f, "repository {pushed} is not this pipeline's {watched}")
            }
            Reason::Deleted { git_ref } => {
                write!(f, "{git_ref} was deleted; deletions never trigger")
            }
            Reason::NoCommit { git_ref } => {
                write!(f, "the push of {git_ref} names no commit to build")
            }
            Reason::Excluded {
                filter,
                name,
                pattern,
            } => {
                let (what, field) = filter.words();
                write!(
                    f,
                    "{what} {} is excluded by {field} pattern {}",
                    Quoted(name),
                    Quoted(pattern.as_str())
                )
            }
            Reason::NoneMatched { filter, name, list } => {
                let (what, field) = filter.words();
                write!(f, "{what} {} matches none of {field} [", Quoted(name))?;
                for (i, pattern) in list.patterns().iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    Quoted(pattern.as_str()).fmt(f)?;
                }
                f.write_str("]")
            }
            Reason::TagsOnly { branch } => {
                write!(
                    f,
                    "branch {}: this pipeline runs on tags only",
                    Quoted(branch)
                )
            }
            Reason::NoTags { tag } => {
                write!(f, "tag {}: this pipeline has no on.tags", Quoted(tag))
            }
            Reason::NeitherBranchNorTag { git_ref } => {
                write!(f, "{git_ref} is neither a branch nor a tag")
            }
            Reason::SkipToken { token } => write!(f, "head commit message contains {token}"),
        }
    }
}

/// A string as `{:?}` writes it, in quotes with what needs it escaped; a plain one
/// (printable ASCII without `"` or `\`, as refs and patterns almost always are) is
/// copied as it is, which costs a fraction of escaping it character by character.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = self
            .0
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
        if !plain {
            return write!(f, "{:?}", self.0);
        }
        f.write_str("\"")?;
        f.write_str(self.0)?;
        f.write_str("\"")
    }
}

impl Reason<'_> {
    /// The sentence as text, in one allocation for the common lengths.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut text = String::with_capacity(128);
        let _ = write!(text, "{self}");
        text
    }
}

impl Decision<'_> {
    /// Whether the pipeline watches the pushed repository at all.
    pub fn watches_the_repository(&self) -> bool {
        !matches!(
            self.verdict,
            Verdict::Ignore {
                reason: Reason::OtherRepository { .. }
            }
        )
    }
}

/// The run key: the per-commit lock (README, "Why"). Joined by hand: it is made for
/// every pipeline a push builds, and the formatting machinery costs more than the copy.
pub fn run_key(pipeline: &Pipeline, git_ref: &str, commit: &str) -> String {
    let git_ref = match pipeline.dedupe {
        Dedupe::Ref => git_ref,
        Dedupe::Commit => "*",
    };
    let mut key = String::with_capacity(pipeline.name.len() + git_ref.len() + commit.len() + 2);
    for (i, part) in [pipeline.name.as_str(), git_ref, commit]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            key.push('\n');
        }
        key.push_str(part);
    }
    key
}

/// Decides every pipeline of `set` for `push`, in the set's order.
pub fn decide<'a>(push: &'a Push, set: &'a PipelineSet) -> Vec<Decision<'a>> {
    set.iter()
        .map(|p| Decision {
            pipeline: p,
            verdict: decide_one(push, p),
        })
        .collect()
}

fn decide_one<'a>(push: &'a Push, p: &'a Pipeline) -> Verdict<'a> {
    let ignore = |reason| Verdict::Ignore { reason };
    if !p.repo.same_as(&push.repo) {
        return ignore(Reason::OtherRepository {
            pushed: &push.repo,
            watched: &p.repo,
        });
    }
    let git_ref = push.git_ref.as_str();
    if push.deleted {
        return ignore(Reason::Deleted { git_ref });
    }
    let Some(commit) = &push.commit else {
        return ignore(Reason::NoCommit { git_ref });
    };
    let on = &p.on;
    match &push.kind {
        RefKind::Branch(branch) => match (&on.branches, &on.tags) {
            (Some(list), _) => {
                if let Some(reason) = unmatched(Filter::Branches, branch, list) {
                    return ignore(reason);
                }
            }
            (None, Some(_)) => return ignore(Reason::TagsOnly { branch }),
            (None, None) => {}
        },
        RefKind::Tag(tag) => match &on.tags {
            Some(list) => {
                if let Some(reason) = unmatched(Filter::Tags, tag, list) {
                    return ignore(reason);
                }
            }
            None => return ignore(Reason::NoTags { tag }),
        },
        RefKind::Other => return ignore(Reason::NeitherBranchNorTag { git_ref }),
    }
    let key = run_key(p, git_ref, commit);
    let message = push.head_message.as_deref().unwrap_or_default();
    if let Some(token) = SKIP_TOKENS.into_iter().find(|t| message.contains(t)) {
        return Verdict::Skip {
            key,
            commit: commit.clone(),
            reason: Reason::SkipToken { token },
        };
    }
    Verdict::Build {
        key,
        commit: commit.clone(),
    }
}

/// Why `name` is not selected by `list`, or `None` when it is.
fn unmatched<'a>(filter: Filter, name: &'a str, list: &'a PatternList) -> Option<Reason<'a>> {
    let m = list.evaluate(name);
    if m.included {
        return None;
    }
    Some(match m.decided_by {
        Some(pattern) => Reason::Excluded {
            filter,
            name,
            pattern,
        },
        None => Reason::NoneMatched { filter, name, list },
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

    /// A verdict without its borrows: whether it builds, skips or ignores, and why.
    #[derive(Debug)]
    enum Outcome {
        Build,
        Skip(String),
        Ignore(String),
    }

    fn verdict(p: &Pipeline, git_ref: &str, message: &str, deleted: bool) -> Outcome {
        match decide_one(&push(git_ref, message, deleted), p) {
            Verdict::Build { .. } => Outcome::Build,
            Verdict::Skip { reason, .. } => Outcome::Skip(reason.to_string()),
            Verdict::Ignore { reason } => Outcome::Ignore(reason.to_string()),
        }
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
                Outcome::Build => assert!(*builds, "{label}"),
                Outcome::Skip(reason) | Outcome::Ignore(reason) => {
                    assert!(!*builds, "{label}");
                    assert!(reason.contains(fragment), "{label}");
                }
            }
        }
    }

    /// Every reason, word for word: what `hookci why`, the API's `decisions` and the
    /// store keep.
    #[test]
    fn reasons_read_exactly() {
        let ci = pipeline(
            "ci",
            "repo: octo-org/octo-repo\non:\n  branches: [main, \"release/**\", \"!release/old-*\"]",
        );
        let rel = pipeline(
            "release",
            "repo: octo-org/octo-repo\non:\n  tags: [\"v*\", \"!v0.*\"]",
        );
        let any = pipeline("any", "repo: octo-org/octo-repo");
        let other = pipeline("other", "repo: someone/else");
        let cases: &[(&Pipeline, &str, &str, bool, &str)] = &[
            (
                &other,
                "refs/heads/main",
                "x",
                false,
                "repository octo-org/octo-repo is not this pipeline's someone/else",
            ),
            (
                &ci,
                "refs/heads/main",
                "x",
                true,
                "refs/heads/main was deleted; deletions never trigger",
            ),
            (
                &ci,
                "refs/heads/release/old-1",
                "x",
                false,
                r#"branch "release/old-1" is excluded by on.branches pattern "!release/old-*""#,
            ),
            (
                &ci,
                "refs/heads/feature",
                "x",
                false,
                r#"branch "feature" matches none of on.branches ["main", "release/**", "!release/old-*"]"#,
            ),
            (
                &ci,
                "refs/tags/v1",
                "x",
                false,
                r#"tag "v1": this pipeline has no on.tags"#,
            ),
            (
                &rel,
                "refs/heads/main",
                "x",
                false,
                r#"branch "main": this pipeline runs on tags only"#,
            ),
            (
                &rel,
                "refs/tags/v0.9",
                "x",
                false,
                r#"tag "v0.9" is excluded by on.tags pattern "!v0.*""#,
            ),
            (
                &rel,
                "refs/tags/1.0",
                "x",
                false,
                r#"tag "1.0" matches none of on.tags ["v*", "!v0.*"]"#,
            ),
            (
                &any,
                "refs/notes/commits",
                "x",
                false,
                "refs/notes/commits is neither a branch nor a tag",
            ),
            (
                &any,
                "refs/heads/main",
                "wip [no ci]",
                false,
                "head commit message contains [no ci]",
            ),
        ];
        for (p, git_ref, message, deleted, want) in cases {
            let got = match verdict(p, git_ref, message, *deleted) {
                Outcome::Skip(reason) | Outcome::Ignore(reason) => reason,
                v => panic!("{git_ref}: {v:?}"),
            };
            assert_eq!(got, *want, "{} {git_ref}", p.name);
        }
        let mut tag = push("refs/tags/v1", "x", false);
        tag.commit = None;
        match decide_one(&tag, &rel) {
            Verdict::Ignore { reason } => assert_eq!(
                reason.to_string(),
                "the push of refs/tags/v1 names no commit to build"
            ),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn one_decision_per_pipeline_in_order_and_the_repository_compared_once() {
        let set = PipelineSet::new(vec![
            pipeline("a", "repo: octo-org/octo-repo\non:\n  branches: [dev]"),
            pipeline("b", "repo: someone/else"),
            pipeline("c", "repo: Octo-Org/Octo-Repo"),
        ]);
        let push = push("refs/heads/main", "x", false);
        let decisions = decide(&push, &set);
        let seen: Vec<(&str, bool, bool)> = decisions
            .iter()
            .map(|d| {
                let builds = matches!(d.verdict, Verdict::Build { .. });
                (d.pipeline.name.as_str(), d.watches_the_repository(), builds)
            })
            .collect();
        assert_eq!(
            seen,
            [("a", true, false), ("b", false, false), ("c", true, true)]
        );
    }

    #[test]
    fn quoted_is_what_debug_writes() {
        for s in [
            "main",
            "release/**",
            "a b",
            "it's",
            "q\"x",
            "back\\slash",
            "tab\t",
            "café",
            "🦀",
            "\u{7f}",
            "",
        ] {
            assert_eq!(Quoted(s).to_string(), format!("{s:?}"), "{s:?}");
        }
    }

    #[test]
    fn skip_token_still_records_a_run_key() {
        let ci = pipeline("ci", "repo: octo-org/octo-repo");
        assert!(matches!(
            verdict(&ci, "refs/heads/main", "wip [no ci]", false),
            Outcome::Skip(_)
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
