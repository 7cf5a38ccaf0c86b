//! Repository names (`owner/name`, GitHub's `full_name`), validated before they ever
//! become part of a path under the state directory.

use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::yaml::value_error;

/// `owner/name`: two segments of letters, digits, `-`, `_` and `.`, neither `.` nor `..`,
/// so joining it to a directory can never leave that directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<RepoName, String> {
        let valid_segment = |seg: &str| {
            !seg.is_empty()
                && seg.len() <= 100
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match s.split_once('/') {
            Some((owner, name)) if valid_segment(owner) && valid_segment(name) => Ok(RepoName(s.to_owned())),
            _ => Err(format!(
                "invalid repository name {s:?}: expected owner/name (letters, digits, '-', '_', '.')"
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Case-insensitive, as GitHub treats repository names.
    pub fn same_as(&self, other: &RepoName) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RepoName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RepoName::parse(&s).map_err(|e| serde::de::Error::custom(value_error(&s, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_rejected() {
        for good in ["octo-org/octo-repo", "a/b", "Me/my.repo_2", "x/.github"] {
            assert!(RepoName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "../../etc",
            "a/..",
            "../b",
            "./b",
            "/etc/passwd",
            "a/b/c",
            "a",
            "",
            "a/",
            "/b",
            "a\\b/c",
            "a/b\0",
            "a b/c",
            "a/$(id)",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
