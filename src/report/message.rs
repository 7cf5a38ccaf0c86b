//! What a notification says: one line of text for Slack (`{"text"}`) and Discord
//! (`{"content"}`) naming the pipeline, the ref, the short commit, the result, the
//! failing step and the run's link; and for a generic webhook the API's run object
//! with its steps, plus `url` and `event`.

use serde_json::{json, Value};

use crate::store::{Run, Step, StepStatus};
use crate::web::api::run_json;

/// The event a generic webhook is sent (also its `X-Hookci-Event` header).
pub const EVENT: &str = "run.finished";

/// Discord refuses a message longer than this.
const DISCORD_MAX: usize = 2000;

fn short_ref(git_ref: &str) -> &str {
    git_ref
        .strip_prefix("refs/heads/")
        .or_else(|| git_ref.strip_prefix("refs/tags/"))
        .unwrap_or(git_ref)
}

/// The step that failed or timed out first, if one did.
fn failing_step(steps: &[Step]) -> Option<&Step> {
    steps
        .iter()
        .find(|s| matches!(s.status, StepStatus::Failed | StepStatus::TimedOut))
}

/// One line for people: `ci failed on main (1a2b3c4): step "test" failed ... <link>`.
pub fn text(run: &Run, steps: &[Step], outcome: &str, link: Option<&str>) -> String {
    let result = match outcome {
        "failure" if run.status == crate::store::RunStatus::TimedOut => "timed out",
        "failure" => "failed",
        "fixed" => "is fixed",
        "success" => "succeeded",
        "canceled" => "was canceled",
        "skipped" => "was skipped",
        other => other,
    };
    let short: String = run.commit.chars().take(7).collect();
    let mut line = format!(
        "{} {result} on {} ({short})",
        run.pipeline,
        short_ref(&run.git_ref)
    );
    if let Some(step) = failing_step(steps).filter(|_| outcome == "failure") {
        line.push_str(&format!(": failing step {:?}", step.name));
    }
    if let Some(reason) = run.reason.as_deref().filter(|_| outcome != "fixed") {
        line.push_str(&format!(" ({reason})"));
    }
    if let Some(link) = link {
        line.push_str(&format!(" {link}"));
    }
    line
}

pub fn slack(text: &str) -> Value {
    json!({ "text": text })
}

pub fn discord(text: &str) -> Value {
    json!({ "content": text.chars().take(DISCORD_MAX).collect::<String>() })
}

/// The generic webhook's body: the run object of the API, with `url`, `event` and
/// the `outcome` that triggered it.
pub fn webhook(run: &Run, steps: &[Step], outcome: &str, link: Option<&str>) -> Value {
    let mut body = run_json(run, Some(steps));
    body["url"] = link.map_or(Value::Null, Value::from);
    body["event"] = EVENT.into();
    body["outcome"] = outcome.into();
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RunStatus;

    fn run(status: RunStatus, reason: Option<&str>) -> Run {
        Run {
            id: 5,
            pipeline: "ci".into(),
            repo: "o/r".into(),
            git_ref: "refs/heads/main".into(),
            commit: "1a2b3c4d5e".into(),
            before: "0".into(),
            clone_url: "/x".into(),
            trigger: "push".into(),
            delivery: None,
            status,
            reason: reason.map(str::to_owned),
            attempt: 1,
            generation: 1,
            created_at: 0,
            started_at: None,
            finished_at: None,
            log_dropped: 0,
            instance: None,
            timings: None,
        }
    }

    fn step(name: &str, status: StepStatus) -> Step {
        Step {
            number: 1,
            name: name.into(),
            status,
            exit_code: None,
            signal: None,
            reason: None,
            started_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn the_text_names_pipeline_ref_commit_result_step_and_link() {
        let failed = run(RunStatus::Failed, Some("step \"test\" exited with code 3"));
        let steps = [
            step("build", StepStatus::Succeeded),
            step("test", StepStatus::Failed),
        ];
        assert_eq!(
            text(&failed, &steps, "failure", Some("https://ci/runs/5")),
            "ci failed on main (1a2b3c4): failing step \"test\" (step \"test\" exited with code 3) https://ci/runs/5"
        );
        assert_eq!(
            text(&run(RunStatus::Succeeded, None), &steps[..1], "fixed", None),
            "ci is fixed on main (1a2b3c4)"
        );
        let body = webhook(&failed, &steps, "failure", None);
        assert_eq!(body["event"], "run.finished");
        assert_eq!(body["url"], Value::Null);
        assert_eq!(body["steps"][1]["name"], "test");
        assert_eq!(
            discord(&"x".repeat(3000))["content"]
                .as_str()
                .unwrap()
                .len(),
            2000
        );
    }
}
