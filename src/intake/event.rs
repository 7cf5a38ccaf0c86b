//! GitHub push payloads: the fields hookci acts on, read from the JSON GitHub sends.
//! Pure parsing; the signature was checked by `intake` before anything here runs.

use serde::Deserialize;

use crate::git::repo::RepoName;

/// The id GitHub sends for "no commit": `before` of a new ref, `after` of a deletion.
pub const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// What a push moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefKind {
    Branch(String),
    Tag(String),
    /// Anything else under `refs/` (notes, pull heads): never triggers.
    Other,
}

/// A push, as far as matching and building need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The full ref, `refs/heads/main`.
    pub git_ref: String,
    pub kind: RefKind,
    pub before: String,
    pub after: String,
    /// The commit to build: `head_commit.id`, which for an annotated tag differs from
    /// `after` (the tag object). `None` for a deletion.
    pub commit: Option<String>,
    pub deleted: bool,
    pub created: bool,
    pub forced: bool,
    pub repo: RepoName,
    pub clone_url: String,
    pub default_branch: Option<String>,
    pub head_message: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("malformed push payload: {0}")]
    Malformed(String),
    #[error("{0}")]
    BadRepository(String),
}

#[derive(Deserialize)]
struct RawPush {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    forced: bool,
    head_commit: Option<RawCommit>,
    repository: RawRepository,
}

#[derive(Deserialize)]
struct RawCommit {
    id: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct RawRepository {
    full_name: String,
    clone_url: String,
    #[serde(default)]
    default_branch: Option<String>,
}

fn is_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Push {
    /// Reads a push payload (the JSON document, already extracted from a form body).
    pub fn parse(json: &[u8]) -> Result<Push, EventError> {
        let raw: RawPush =
            serde_json::from_slice(json).map_err(|e| EventError::Malformed(e.to_string()))?;
        let repo = RepoName::parse(&raw.repository.full_name).map_err(EventError::BadRepository)?;
        for (field, value) in [("before", &raw.before), ("after", &raw.after)] {
            if !is_sha(value) {
                return Err(EventError::Malformed(format!(
                    "`{field}` is not a commit id: {value:?}"
                )));
            }
        }
        let kind = if let Some(branch) = raw.git_ref.strip_prefix("refs/heads/") {
            RefKind::Branch(branch.to_owned())
        } else if let Some(tag) = raw.git_ref.strip_prefix("refs/tags/") {
            RefKind::Tag(tag.to_owned())
        } else {
            RefKind::Other
        };
        let deleted = raw.deleted || raw.after == ZERO_SHA;
        let commit = if deleted {
            None
        } else {
            match &raw.head_commit {
                Some(c) if is_sha(&c.id) => Some(c.id.to_lowercase()),
                Some(c) => {
                    return Err(EventError::Malformed(format!(
                        "`head_commit.id` is not a commit id: {:?}",
                        c.id
                    )))
                }
                // A branch push whose head commit GitHub left out still names its commit.
                None if matches!(kind, RefKind::Branch(_)) => Some(raw.after.to_lowercase()),
                None => None,
            }
        };
        Ok(Push {
            git_ref: raw.git_ref,
            kind,
            before: raw.before.to_lowercase(),
            after: raw.after.to_lowercase(),
            commit,
            deleted,
            created: raw.created,
            forced: raw.forced,
            repo,
            clone_url: raw.repository.clone_url,
            default_branch: raw.repository.default_branch,
            head_message: raw.head_commit.map(|c| c.message),
        })
    }

    /// `HOOKCI_BRANCH` / `HOOKCI_TAG` and the short name.
    pub fn short_ref(&self) -> &str {
        match &self.kind {
            RefKind::Branch(n) | RefKind::Tag(n) => n,
            RefKind::Other => &self.git_ref,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/github/push/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn real_payloads() {
        // (file, kind, deleted, created, forced, builds a commit)
        let table: &[(&str, RefKind, bool, bool, bool, bool)] = &[
            (
                "go-playground-branch-push.json",
                RefKind::Branch("master".into()),
                false,
                false,
                false,
                true,
            ),
            (
                "jenkins-branch-push.json",
                RefKind::Branch("master".into()),
                false,
                false,
                false,
                true,
            ),
            (
                "woodpecker-branch-push.json",
                RefKind::Branch("main".into()),
                false,
                false,
                false,
                true,
            ),
            (
                "octokit-branch-created.json",
                RefKind::Branch("master".into()),
                false,
                true,
                false,
                true,
            ),
            (
                "drone-branch-created-no-commits.json",
                RefKind::Branch("feature-branch".into()),
                false,
                true,
                false,
                true,
            ),
            (
                "drone-branch-deleted.json",
                RefKind::Branch("feature-branch".into()),
                true,
                false,
                false,
                false,
            ),
            (
                "argocd-force-push.json",
                RefKind::Branch("master".into()),
                false,
                false,
                true,
                true,
            ),
            (
                "argocd-slash-branch-env-dev.json",
                RefKind::Branch("env/dev".into()),
                false,
                false,
                true,
                true,
            ),
            (
                "drone-tag-created.json",
                RefKind::Tag("v0.0.1".into()),
                false,
                true,
                false,
                true,
            ),
            (
                "argocd-tag-created.json",
                RefKind::Tag("v1.0".into()),
                false,
                true,
                false,
                true,
            ),
            (
                "octokit-ghes-tag-created.json",
                RefKind::Tag("simple-tag".into()),
                false,
                true,
                false,
                true,
            ),
            (
                "drone-tag-deleted.json",
                RefKind::Tag("v0.0.1".into()),
                true,
                false,
                false,
                false,
            ),
            (
                "octokit-tag-deleted.json",
                RefKind::Tag("simple-tag".into()),
                true,
                false,
                false,
                false,
            ),
        ];
        for (file, kind, deleted, created, forced, builds) in table {
            let push = Push::parse(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(&push.kind, kind, "{file}");
            assert_eq!(
                (push.deleted, push.created, push.forced),
                (*deleted, *created, *forced),
                "{file}"
            );
            assert_eq!(push.commit.is_some(), *builds, "{file}");
        }
    }

    #[test]
    fn a_tag_builds_its_commit_not_the_tag_object() {
        let body = br#"{"ref":"refs/tags/v1","before":"0000000000000000000000000000000000000000",
            "after":"1111111111111111111111111111111111111111","created":true,
            "head_commit":{"id":"2222222222222222222222222222222222222222","message":"release"},
            "repository":{"full_name":"o/r","clone_url":"https://example.com/o/r.git"}}"#;
        let push = Push::parse(body).unwrap();
        assert_eq!(push.after, "1111111111111111111111111111111111111111");
        assert_eq!(
            push.commit.as_deref(),
            Some("2222222222222222222222222222222222222222")
        );
    }

    #[test]
    fn rejects_bad_payloads() {
        assert!(matches!(Push::parse(b"{"), Err(EventError::Malformed(_))));
        assert!(matches!(
            Push::parse(b"{\"ref\": 1}"),
            Err(EventError::Malformed(_))
        ));
        let escaping =
            br#"{"ref":"refs/heads/main","before":"0000000000000000000000000000000000000000",
            "after":"1111111111111111111111111111111111111111","head_commit":null,
            "repository":{"full_name":"../../etc","clone_url":"x"}}"#;
        assert!(matches!(
            Push::parse(escaping),
            Err(EventError::BadRepository(_))
        ));
        let bad_sha =
            br#"{"ref":"refs/heads/main","before":"0000000000000000000000000000000000000000",
            "after":"$(reboot)","repository":{"full_name":"o/r","clone_url":"x"}}"#;
        assert!(matches!(
            Push::parse(bad_sha),
            Err(EventError::Malformed(_))
        ));
    }
}
