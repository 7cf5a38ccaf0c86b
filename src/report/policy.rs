//! Which reports a run transition causes: a commit status for every transition when
//! statuses are on (a GitHub token set, `github.statuses` not false), and at a run's
//! end a notification to each `notify:` target whose `on:` names the outcome. Called
//! by the store inside its writer transaction, so it only computes.

use std::sync::{Arc, OnceLock, Weak};

use serde_json::json;

use crate::config::Config;
use crate::pipeline::notify::{NotifyKind, NotifyOn};
use crate::pipeline::PipelineSet;
use crate::state::AppState;
use crate::store::{NewReport, ReportKind, ReportPolicy, RunStatus, Transition};

/// GitHub's limit on a status description, in characters.
pub const DESCRIPTION_MAX: usize = 140;

/// The report policy of a daemon.
pub struct Policy {
    /// The config and pipelines until the shared state exists (recovery at start runs
    /// before); from then on the shared state's current ones, so a reload applies.
    initial: (Arc<Config>, Arc<PipelineSet>),
    state: OnceLock<Weak<AppState>>,
}

impl Policy {
    pub fn new(config: &Config, pipelines: Arc<PipelineSet>) -> Policy {
        Policy {
            initial: (Arc::new(config.clone()), pipelines),
            state: OnceLock::new(),
        }
    }

    fn config(&self) -> Arc<Config> {
        match self.shared() {
            Some(state) => state.config(),
            None => Arc::clone(&self.initial.0),
        }
    }

    fn statuses(&self) -> bool {
        self.config().github.status_token().is_some()
    }

    /// From now on the pipelines are the shared state's current ones, and each
    /// committed transition wakes the sender.
    pub fn attach(&self, state: &Arc<AppState>) {
        let _ = self.state.set(Arc::downgrade(state));
    }

    fn shared(&self) -> Option<Arc<AppState>> {
        self.state.get().and_then(Weak::upgrade)
    }

    fn pipelines(&self) -> Arc<PipelineSet> {
        match self.shared() {
            Some(state) => state.pipelines(),
            None => Arc::clone(&self.initial.1),
        }
    }
}

/// `{public_url}/runs/{id}`, when a public URL is set.
pub fn run_link(public_url: Option<&str>, run: i64) -> Option<String> {
    public_url.map(|u| format!("{}/runs/{run}", u.trim_end_matches('/')))
}

/// At most [`DESCRIPTION_MAX`] characters, cut on a character boundary.
pub fn clip(text: &str) -> String {
    text.chars().take(DESCRIPTION_MAX).collect()
}

/// The commit status a transition sets: (state, description); `None` for none (an
/// interruption: the run is queued again at the next start, or fails there).
pub fn status_of(t: &Transition<'_>) -> Option<(&'static str, String)> {
    Some(match t.status {
        RunStatus::Queued => match t.reason {
            Some(_) => ("pending", "interrupted; queued again".to_owned()),
            None => ("pending", "queued".to_owned()),
        },
        RunStatus::Running => match t.step {
            Some((n, total, name)) => ("pending", format!("running step {n}/{total}: {name}")),
            None => ("pending", "running".to_owned()),
        },
        RunStatus::Succeeded => ("success", "succeeded".to_owned()),
        RunStatus::Failed => ("failure", t.reason.unwrap_or("failed").to_owned()),
        RunStatus::TimedOut => ("failure", t.reason.unwrap_or("timed out").to_owned()),
        RunStatus::Canceled => ("error", t.reason.unwrap_or("canceled").to_owned()),
        RunStatus::Skipped => (
            "success",
            format!("skipped: {}", t.reason.unwrap_or("nothing to do")),
        ),
        RunStatus::Interrupted => return None,
    })
}

/// The outcome a finished run is notified as, given the previous result of its
/// pipeline and ref; `None` while it has not finished (or is queued again).
pub fn outcome_of(
    status: RunStatus,
    previous: impl FnOnce() -> Option<RunStatus>,
) -> Option<&'static str> {
    Some(match status {
        RunStatus::Succeeded => match previous() {
            Some(RunStatus::Failed | RunStatus::TimedOut) => "fixed",
            _ => "success",
        },
        RunStatus::Failed | RunStatus::TimedOut => "failure",
        RunStatus::Canceled => "canceled",
        RunStatus::Skipped => "skipped",
        RunStatus::Queued | RunStatus::Running | RunStatus::Interrupted => return None,
    })
}

/// Whether a target with `on` is told of `outcome` (a fix is a success too).
pub fn wanted(on: &[NotifyOn], outcome: &str) -> bool {
    on.iter().any(|o| match o {
        NotifyOn::Always => true,
        NotifyOn::Success => matches!(outcome, "success" | "fixed"),
        NotifyOn::Failure => outcome == "failure",
        NotifyOn::Fixed => outcome == "fixed",
        NotifyOn::Canceled => outcome == "canceled",
    })
}

/// The host of a webhook URL: what the API shows of it.
fn host_of(url: &str) -> String {
    url.parse::<warp::http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

impl ReportPolicy for Policy {
    fn idle(&self) -> bool {
        !self.statuses() && self.pipelines().iter().all(|p| p.notify.is_empty())
    }

    fn reports(
        &self,
        t: &Transition<'_>,
        previous: &dyn Fn() -> Option<RunStatus>,
    ) -> Vec<NewReport> {
        let mut out = Vec::new();
        if self.statuses() {
            if let Some((state, description)) = status_of(t) {
                let context = format!("hookci/{}", t.pipeline);
                let mut body = json!({
                    "state": state,
                    "description": clip(&description),
                    "context": context,
                });
                if let Some(link) = run_link(self.config().public_url.as_deref(), t.run) {
                    body["target_url"] = link.into();
                }
                out.push(NewReport {
                    kind: ReportKind::Status,
                    target: format!("github:{context}"),
                    address: format!("repos/{}/statuses/{}", t.repo, t.commit),
                    coalesce: Some(format!(
                        "status:{}@{}#{context}",
                        t.repo.to_ascii_lowercase(),
                        t.commit
                    )),
                    signing: None,
                    body: Some(body.to_string()),
                    outcome: None,
                });
            }
        }
        if !t.status.is_final() || t.status == RunStatus::Interrupted {
            return out;
        }
        let pipelines = self.pipelines();
        let Some(pipeline) = pipelines.get(t.pipeline).filter(|p| !p.notify.is_empty()) else {
            return out;
        };
        let Some(outcome) = outcome_of(t.status, previous) else {
            return out;
        };
        for target in pipeline.notify.iter().filter(|n| wanted(&n.on, outcome)) {
            let (kind, label, address, signing) = match &target.kind {
                NotifyKind::Slack { url_secret } => (
                    ReportKind::Slack,
                    format!("slack:{url_secret}"),
                    url_secret.clone(),
                    None,
                ),
                NotifyKind::Discord { url_secret } => (
                    ReportKind::Discord,
                    format!("discord:{url_secret}"),
                    url_secret.clone(),
                    None,
                ),
                NotifyKind::Webhook { url, signing } => (
                    ReportKind::Webhook,
                    format!("webhook:{}", host_of(url)),
                    url.clone(),
                    signing.clone(),
                ),
            };
            out.push(NewReport {
                kind,
                target: label,
                address,
                coalesce: None,
                signing,
                body: None,
                outcome: Some(outcome.to_owned()),
            });
        }
        out
    }

    fn committed(&self) {
        if let Some(state) = self.shared() {
            state.reports.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(status: RunStatus, reason: Option<&'static str>) -> Transition<'static> {
        Transition {
            run: 7,
            pipeline: "ci",
            repo: "o/r",
            git_ref: "refs/heads/main",
            commit: "c",
            status,
            reason,
            step: None,
        }
    }

    #[test]
    fn states_and_descriptions() {
        let mut running = t(RunStatus::Running, None);
        running.step = Some((2, 5, "test"));
        for (transition, state, description) in [
            (t(RunStatus::Queued, None), "pending", "queued"),
            (running, "pending", "running step 2/5: test"),
            (t(RunStatus::Succeeded, None), "success", "succeeded"),
            (
                t(RunStatus::Failed, Some("step \"test\" exited with code 3")),
                "failure",
                "step \"test\" exited with code 3",
            ),
            (
                t(RunStatus::TimedOut, Some("step \"t\" timed out after 1s")),
                "failure",
                "step \"t\" timed out after 1s",
            ),
            (
                t(RunStatus::Canceled, Some("superseded by run 41")),
                "error",
                "superseded by run 41",
            ),
            (
                t(RunStatus::Skipped, Some("no changed file matches")),
                "success",
                "skipped: no changed file matches",
            ),
            (
                t(RunStatus::Queued, Some("attempt 1 was interrupted")),
                "pending",
                "interrupted; queued again",
            ),
        ] {
            assert_eq!(
                status_of(&transition),
                Some((state, description.to_owned())),
                "{transition:?}"
            );
        }
        assert_eq!(status_of(&t(RunStatus::Interrupted, None)), None);
    }

    #[test]
    fn descriptions_are_cut_on_a_character_boundary() {
        let long = "é".repeat(200);
        let cut = clip(&long);
        assert_eq!(cut.chars().count(), DESCRIPTION_MAX);
        assert!(long.starts_with(&cut));
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn outcomes_and_who_hears_of_them() {
        let failed = || Some(RunStatus::Failed);
        let fine = || Some(RunStatus::Succeeded);
        assert_eq!(outcome_of(RunStatus::Succeeded, failed), Some("fixed"));
        assert_eq!(outcome_of(RunStatus::Succeeded, fine), Some("success"));
        assert_eq!(outcome_of(RunStatus::Succeeded, || None), Some("success"));
        assert_eq!(outcome_of(RunStatus::TimedOut, fine), Some("failure"));
        assert_eq!(outcome_of(RunStatus::Running, fine), None);
        let default = crate::pipeline::notify::DEFAULT_ON;
        for (on, outcome, told) in [
            (&default[..], "failure", true),
            (&default[..], "fixed", true),
            (&default[..], "success", false),
            (&default[..], "canceled", false),
            (&[NotifyOn::Success][..], "fixed", true),
            (&[NotifyOn::Always][..], "skipped", true),
            (&[NotifyOn::Canceled][..], "canceled", true),
            (&[NotifyOn::Failure][..], "fixed", false),
        ] {
            assert_eq!(wanted(on, outcome), told, "{on:?} {outcome}");
        }
    }
}
