//! Pipeline files: `pipelines/NAME.yml` parsed, validated and compiled once into an
//! immutable [`Pipeline`]. Every problem is reported as a [`SourceError`] with its place.
//! Loading reads files; nothing here touches the network, the store or processes.

pub mod matcher;
pub mod notify;
pub mod pattern;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::git::repo::RepoName;
use crate::pipeline::notify::NotifyTarget;
use crate::pipeline::pattern::PatternList;
use crate::yaml::{self, value_error, SourceError};

/// One compiled pipeline. The name is the file stem.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub path: PathBuf,
    pub repo: RepoName,
    pub clone_url: Option<String>,
    pub on: Triggers,
    pub dedupe: Dedupe,
    pub concurrency: Concurrency,
    pub timeout: Option<Duration>,
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<String>,
    pub steps: Vec<Step>,
    pub interrupted: Interrupted,
    /// Where the run's result is sent (`notify:`), through the outbox.
    pub notify: Vec<NotifyTarget>,
    pub workspace: Workspace,
    /// With `workspace: reuse`: the untracked paths an update leaves in place.
    pub keep: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Triggers {
    pub branches: Option<PatternList>,
    pub tags: Option<PatternList>,
    pub paths: Option<PatternList>,
}

/// What makes two triggers the same build (the per-commit lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dedupe {
    /// One run per (pipeline, ref, sha).
    #[default]
    Ref,
    /// One run per (pipeline, sha), whatever the ref.
    Commit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    #[serde(default)]
    pub group: Group,
    #[serde(default)]
    pub cancel: CancelPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    #[default]
    Ref,
    Pipeline,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CancelPolicy {
    None,
    #[default]
    Pending,
    Running,
}

/// `interrupted:`: what becomes of a run cut by a daemon crash or stop. Its steps
/// run again from the first one on a retry, so a pipeline whose steps must not run
/// twice (a deploy) says `fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interrupted {
    /// Queued again at the next start (once).
    #[default]
    Retry,
    /// Ends `failed` at the next start, once a step of it has started (cut before
    /// that, it runs nothing twice and is queued again).
    Fail,
}

/// `workspace:`: where a run's steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workspace {
    /// A new checkout per run, removed when the run ends.
    #[default]
    Fresh,
    /// One workspace per concurrency slot, kept between runs and updated in place, so
    /// incremental builds stay warm.
    Reuse,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub run: String,
    pub timeout: Option<Duration>,
    pub env: BTreeMap<String, String>,
    pub when: When,
}

/// A step's `if:`: which outcome of the steps before it lets it run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum When {
    #[default]
    Success,
    Failure,
    Always,
}

impl When {
    pub fn runs_after(self, failed_so_far: bool) -> bool {
        match self {
            When::Success => !failed_so_far,
            When::Failure => failed_so_far,
            When::Always => true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    repo: RepoName,
    #[serde(default, deserialize_with = "clone_url_text")]
    clone_url: Option<String>,
    #[serde(default)]
    on: RawTriggers,
    #[serde(default)]
    dedupe: Dedupe,
    #[serde(default)]
    concurrency: Concurrency,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "env_map")]
    env: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "secret_names")]
    secrets: Vec<String>,
    #[serde(deserialize_with = "non_empty_steps")]
    steps: Vec<RawStep>,
    #[serde(default)]
    interrupted: Interrupted,
    #[serde(default)]
    notify: Vec<NotifyTarget>,
    #[serde(default)]
    workspace: Workspace,
    #[serde(default, deserialize_with = "keep_patterns")]
    keep: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTriggers {
    #[serde(default, deserialize_with = "patterns")]
    branches: Option<PatternList>,
    #[serde(default, deserialize_with = "patterns")]
    tags: Option<PatternList>,
    #[serde(default, deserialize_with = "patterns")]
    paths: Option<PatternList>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default, deserialize_with = "name_text")]
    name: Option<String>,
    #[serde(deserialize_with = "run_text")]
    run: String,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "env_map")]
    env: BTreeMap<String, String>,
    #[serde(default, rename = "if")]
    when: When,
}

/// A string that must contain something other than white space; the error points at
/// its `key`.
fn text_of<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Err(D::Error::custom(value_error(
            &format!("{key}:"),
            format!("`{key}` must not be empty"),
        )));
    }
    Ok(s)
}

fn run_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    text_of(d, "run")
}

fn name_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    text_of(d, "name").map(Some)
}

fn clone_url_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    text_of(d, "clone_url").map(Some)
}

fn patterns<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PatternList>, D::Error> {
    let srcs = Vec::<String>::deserialize(d)?;
    PatternList::parse(&srcs)
        .map(Some)
        .map_err(|e| D::Error::custom(value_error(&e.pattern, &e)))
}

/// `keep:` patterns, compiled once here so a bad one is reported with its place; the
/// git worker compiles the same text again in its own process.
fn keep_patterns<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let srcs = Vec::<String>::deserialize(d)?;
    if let Some(empty) = srcs.iter().find(|s| s.trim().is_empty()) {
        return Err(D::Error::custom(value_error(
            empty,
            "a `keep` pattern must not be empty",
        )));
    }
    PatternList::parse(&srcs).map_err(|e| D::Error::custom(value_error(&e.pattern, &e)))?;
    Ok(Some(srcs))
}

fn non_empty_steps<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RawStep>, D::Error> {
    let steps = Vec::<RawStep>::deserialize(d)?;
    if steps.is_empty() {
        return Err(D::Error::custom(value_error(
            "steps",
            "a pipeline needs at least one step",
        )));
    }
    Ok(steps)
}

pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn env_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    let mut env = BTreeMap::new();
    for (name, value) in raw {
        if !is_env_name(&name) {
            return Err(D::Error::custom(value_error(
                &name,
                format!("invalid environment variable name {name:?}"),
            )));
        }
        if name.starts_with("HOOKCI_") {
            // hookci sets these itself, and finds a run's processes by them.
            return Err(D::Error::custom(value_error(
                &name,
                format!("{name} is reserved: hookci sets the HOOKCI_* variables itself"),
            )));
        }
        let value = match value {
            Scalar::Text(s) => s,
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(x) => x.to_string(),
            Scalar::Bool(b) => b.to_string(),
        };
        env.insert(name, value);
    }
    Ok(env)
}

fn secret_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    if let Some(bad) = names.iter().find(|n| !is_env_name(n)) {
        return Err(D::Error::custom(value_error(
            bad,
            format!("invalid secret name {bad:?} (letters, digits and _)"),
        )));
    }
    Ok(names)
}

impl Pipeline {
    /// Parses and compiles one pipeline from its text.
    pub fn parse(path: &Path, text: &str) -> Result<Pipeline, SourceError> {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| is_pipeline_name(s))
            .ok_or_else(|| {
                SourceError::whole_file(
                    path,
                    "a pipeline's file name must be letters, digits, '.', '-' or '_'",
                )
            })?
            .to_owned();
        let raw: RawPipeline = yaml::parse(path, text)?;
        undeclared_notify_secret(path, text, &raw.notify, &raw.secrets)?;
        if raw.keep.is_some() && raw.workspace != Workspace::Reuse {
            let (line, column) = top_level_key(text, "keep").unwrap_or((0, 0));
            return Err(SourceError::at(
                path,
                text,
                line,
                column,
                "`keep` needs `workspace: reuse` (a fresh workspace keeps nothing)",
            ));
        }
        let steps = raw
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| Step {
                name: s.name.unwrap_or_else(|| format!("step {}", i + 1)),
                run: s.run,
                timeout: s.timeout,
                env: s.env,
                when: s.when,
            })
            .collect();
        Ok(Pipeline {
            name,
            path: path.to_path_buf(),
            repo: raw.repo,
            clone_url: raw.clone_url,
            on: Triggers {
                branches: raw.on.branches,
                tags: raw.on.tags,
                paths: raw.on.paths,
            },
            dedupe: raw.dedupe,
            concurrency: raw.concurrency,
            timeout: raw.timeout,
            env: raw.env,
            secrets: raw.secrets,
            steps,
            interrupted: raw.interrupted,
            notify: raw.notify,
            workspace: raw.workspace,
            keep: raw.keep.unwrap_or_default(),
        })
    }
}

/// A `notify:` target must name secrets the pipeline declares in `secrets:`, so that
/// one list says what a pipeline can read. The error points at the first use of the
/// name under `notify:`.
fn undeclared_notify_secret(
    path: &Path,
    text: &str,
    notify: &[NotifyTarget],
    declared: &[String],
) -> Result<(), SourceError> {
    let used = notify.iter().flat_map(|t| t.kind.secrets());
    let Some(name) = used.into_iter().find(|n| !declared.iter().any(|d| d == n)) else {
        return Ok(());
    };
    let from = text
        .lines()
        .position(|l| l.starts_with("notify:"))
        .map_or(1, |i| i + 1);
    let message = format!("notify: secret {name} is not declared in `secrets:`");
    Err(match yaml::find_value(text, from, name) {
        Some((line, column)) => SourceError::at(path, text, line, column, message),
        None => SourceError::whole_file(path, message),
    })
}

/// The 1-based place of a top-level `key:` in `text`, for errors that concern the
/// whole pipeline rather than one value.
fn top_level_key(text: &str, key: &str) -> Option<(usize, usize)> {
    let prefix = format!("{key}:");
    text.lines()
        .position(|l| l.starts_with(&prefix))
        .map(|i| (i + 1, 1))
}

/// Whether a pipelines directory entry is a pipeline file by its name: `*.yml` or
/// `*.yaml`, not hidden (editors' lock and swap files, such as `.#ci.yml`, are).
pub fn is_pipeline_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
    !hidden
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yml" | "yaml")
        )
}

fn is_pipeline_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Every pipeline of a directory, compiled; immutable once built.
#[derive(Debug, Clone, Default)]
pub struct PipelineSet {
    pipelines: Vec<Arc<Pipeline>>,
}

impl PipelineSet {
    pub fn new(mut pipelines: Vec<Pipeline>) -> PipelineSet {
        pipelines.sort_by(|a, b| a.name.cmp(&b.name));
        PipelineSet {
            pipelines: pipelines.into_iter().map(Arc::new).collect(),
        }
    }

    /// Loads every `*.yml` / `*.yaml` file of `dir`. All errors of all files are returned
    /// together, so a user fixes them in one round.
    pub fn load(dir: &Path) -> Result<PipelineSet, Vec<SourceError>> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            vec![SourceError::whole_file(
                dir,
                format!("cannot read pipelines directory: {e}"),
            )]
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_pipeline_file(p))
            .filter(|p| match std::fs::metadata(p) {
                // Reading a FIFO (or a device) would wait for a writer for ever, and a
                // reload with it.
                Ok(meta) if !meta.is_file() => {
                    tracing::warn!(path = %p.display(), "skipping a pipelines directory entry that is not a regular file");
                    false
                }
                // Unreadable or a dangling link: reading it says why, as an error.
                _ => true,
            })
            .collect();
        paths.sort();
        let mut pipelines = Vec::new();
        let mut errors = Vec::new();
        for path in paths {
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| SourceError::whole_file(&path, format!("cannot read: {e}")))
                .and_then(|text| Pipeline::parse(&path, &text));
            match parsed {
                Ok(p) => pipelines.push(p),
                Err(e) => errors.push(e),
            }
        }
        let mut seen = BTreeMap::new();
        for p in &pipelines {
            if let Some(first) = seen.insert(p.name.clone(), p.path.clone()) {
                errors.push(SourceError::whole_file(
                    &p.path,
                    format!(
                        "pipeline name {:?} is also used by {}",
                        p.name,
                        first.display()
                    ),
                ));
            }
        }
        if errors.is_empty() {
            Ok(PipelineSet::new(pipelines))
        } else {
            Err(errors)
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pipeline>> {
        self.pipelines.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pipeline>> {
        self.pipelines.iter().find(|p| p.name == name)
    }

    pub fn len(&self) -> usize {
        self.pipelines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pipelines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline, SourceError> {
        Pipeline::parse(Path::new("pipelines/test.yml"), text)
    }

    const FULL: &str = r#"repo: octo-org/octo-repo
clone_url: file:///srv/git/x.git
on:
  branches: [main, "release/**", "!release/old-*"]
  tags: ["v*"]
  paths: ["src/**", "Cargo.*"]
dedupe: commit
concurrency:
  group: pipeline
  cancel: running
timeout: 30m
env: { RUST_LOG: info, THREADS: 4 }
secrets: [DEPLOY_TOKEN]
steps:
  - name: test
    run: cargo test --locked
    timeout: 20m
    env: { RUST_BACKTRACE: "1" }
  - run: ./scripts/notify.sh "$HOOKCI_RESULT"
    if: failure
interrupted: fail
"#;

    #[test]
    fn compiles_every_field() {
        let p = parse(FULL).unwrap();
        assert_eq!(p.name, "test");
        assert_eq!(p.repo.as_str(), "octo-org/octo-repo");
        assert_eq!(p.clone_url.as_deref(), Some("file:///srv/git/x.git"));
        assert!(p.on.branches.as_ref().unwrap().is_match("release/1.0"));
        assert!(!p.on.branches.as_ref().unwrap().is_match("release/old-1"));
        assert!(p.on.tags.as_ref().unwrap().is_match("v1.2"));
        assert_eq!(p.on.paths.as_ref().unwrap().patterns().len(), 2);
        assert_eq!(p.dedupe, Dedupe::Commit);
        assert_eq!(
            p.concurrency,
            Concurrency {
                group: Group::Pipeline,
                cancel: CancelPolicy::Running
            }
        );
        assert_eq!(p.timeout, Some(Duration::from_secs(1800)));
        assert_eq!(p.env.get("THREADS").map(String::as_str), Some("4"));
        assert_eq!(p.secrets, vec!["DEPLOY_TOKEN"]);
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.steps[0].timeout, Some(Duration::from_secs(1200)));
        assert_eq!(p.steps[1].name, "step 2");
        assert_eq!(p.steps[1].when, When::Failure);
        assert_eq!(p.interrupted, Interrupted::Fail);
    }

    #[test]
    fn defaults() {
        let p = parse("repo: a/b\nsteps:\n  - run: make\n").unwrap();
        assert_eq!(p.dedupe, Dedupe::Ref);
        assert_eq!(
            p.concurrency,
            Concurrency {
                group: Group::Ref,
                cancel: CancelPolicy::Pending
            }
        );
        assert!(p.on.branches.is_none() && p.on.tags.is_none() && p.on.paths.is_none());
        assert_eq!(p.steps[0].when, When::Success);
        assert_eq!(p.interrupted, Interrupted::Retry);
        assert_eq!(p.workspace, Workspace::Fresh);
        assert!(p.keep.is_empty());
    }

    /// (text, line, column, message fragment)
    const BAD: &[(&str, usize, usize, &str)] = &[
        (
            "repo: a/b\nstep:\n  - run: x\n",
            2,
            1,
            "unknown field `step`",
        ),
        ("steps:\n  - run: x\n", 1, 1, "missing field `repo`"),
        ("repo: a/b\n", 1, 1, "missing field `steps`"),
        ("repo: a/b\nsteps: []\n", 2, 1, "at least one step"),
        (
            "repo: a/b\nsteps:\n  - name: x\n    run: \"  \"\n",
            4,
            5,
            "`run` must not be empty",
        ),
        (
            "repo: a/b\nsteps:\n  - name: x\n",
            3,
            5,
            "missing field `run`",
        ),
        (
            "repo: a/b\ntimeout: 5 minutes\nsteps:\n  - run: x\n",
            2,
            10,
            "bad duration",
        ),
        (
            "repo: a/b\nsteps:\n  - run: x\n    timeout: 10x\n",
            4,
            14,
            "unknown unit",
        ),
        (
            "repo: a/b\non:\n  branches: [main, \"x[\"]\nsteps:\n  - run: x\n",
            3,
            21,
            "bad pattern",
        ),
        (
            "repo: a/b\non:\n  branch: [main]\nsteps:\n  - run: x\n",
            3,
            3,
            "unknown field `branch`",
        ),
        (
            "repo: ../../etc\nsteps:\n  - run: x\n",
            1,
            7,
            "invalid repository name",
        ),
        (
            "repo: a/b\ndedupe: sha\nsteps:\n  - run: x\n",
            2,
            9,
            "unknown variant `sha`",
        ),
        (
            "repo: a/b\nenv: { \"BAD-NAME\": 1 }\nsteps:\n  - run: x\n",
            2,
            9,
            "invalid environment variable name",
        ),
        (
            "repo: a/b\nsteps:\n  - run: x\n    env: { HOOKCI_WORKSPACE: x }\n",
            4,
            12,
            "HOOKCI_WORKSPACE is reserved",
        ),
        (
            "repo: a/b\nsteps:\n  - run: x\n    if: sometimes\n",
            4,
            9,
            "unknown variant `sometimes`",
        ),
        (
            "repo: a/b\ninterrupted: twice\nsteps:\n  - run: x\n",
            2,
            14,
            "unknown variant `twice`, expected `retry` or `fail`",
        ),
        (
            "repo: a/b\nworkspace: shared\nsteps:\n  - run: x\n",
            2,
            12,
            "unknown variant `shared`, expected `fresh` or `reuse`",
        ),
        (
            "repo: a/b\nsteps:\n  - run: x\nkeep: [\"target/\"]\n",
            4,
            1,
            "`keep` needs `workspace: reuse`",
        ),
        (
            "repo: a/b\nworkspace: reuse\nkeep: [\"target/\", \"[z-a]\"]\nsteps:\n  - run: x\n",
            3,
            20,
            "bad pattern",
        ),
        (
            "repo: a/b\nsteps:\n  - run: [x\n",
            3,
            10,
            "expected a string",
        ),
        (
            "repo: a/b\nsteps:\n  - run: \"x\n",
            4,
            1,
            "found unexpected end of stream",
        ),
    ];

    #[test]
    fn reuse_keeps_its_patterns() {
        let p = parse(
            "repo: a/b\nworkspace: reuse\nkeep: [\"target/\", \"**/*.o\"]\nsteps:\n  - run: x\n",
        )
        .unwrap();
        assert_eq!(p.workspace, Workspace::Reuse);
        assert_eq!(p.keep, ["target/", "**/*.o"]);
    }

    #[test]
    fn errors_carry_their_place() {
        for (text, line, column, fragment) in BAD {
            let err = parse(text).expect_err(text);
            assert!(err.message.contains(fragment), "{text:?}: {}", err.message);
            assert_eq!((err.line, err.column), (*line, *column), "{text:?}: {err}");
            assert!(err
                .to_string()
                .starts_with(&format!("pipelines/test.yml:{line}:{column}: ")));
        }
    }

    #[test]
    fn load_reports_every_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("good.yml"),
            "repo: a/b\nsteps:\n  - run: x\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("bad1.yaml"), "repo: a/b\n").unwrap();
        std::fs::write(
            dir.path().join("bad2.yml"),
            "repo: a/b\nsteps:\n  - runn: x\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a pipeline").unwrap();
        let errors = PipelineSet::load(dir.path()).unwrap_err();
        assert_eq!(errors.len(), 2);
        std::fs::remove_file(dir.path().join("bad1.yaml")).unwrap();
        std::fs::remove_file(dir.path().join("bad2.yml")).unwrap();
        let set = PipelineSet::load(dir.path()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.get("good").is_some());
    }
}
