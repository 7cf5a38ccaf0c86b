//! `GET /metrics` in the Prometheus text format (0.0.4). Read from the store at each
//! scrape: `hookci_runs{status}`, gauges of the runs in the store, and
//! `hookci_reports_pending`, the outbox's reports still to send. Kept from the run
//! event stream since the daemon started: `hookci_runs_total{pipeline,status}` (runs
//! that ended), `hookci_run_duration_seconds{pipeline}` (start to end of the runs that
//! ended), `hookci_queue_wait_seconds` (creation to start of a run's first attempt) and
//! `hookci_push_to_first_step_seconds{phase}` (a run's creation to its first step's
//! start: `total`, and its phases `queue`, `fetch`, `checkout`). Counted by intake and
//! the HTTP server: `hookci_deliveries_total{event,outcome}` and
//! `hookci_http_request_duration_seconds{route}`, the route a fixed name ([`route_of`])
//! so that no client can grow the series. And `hookci_build_info{version}`, always 1.
//! Encoded by `prometheus-client`, so the text is valid whatever the label values hold.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::run::events::{self, RecvError, RunEvent};
use crate::store::{Run, RunStatus};

/// The content type of the text format these metrics are written in.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Seconds: from a quick check to a long release build.
const DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];
/// Seconds: from a page served from memory to a slow store under load.
const HTTP_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Seconds: from a free runner at once to a backlog of builds.
const WAIT_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Ended {
    pipeline: String,
    status: &'static str,
}

/// Seconds: from an update of a warm workspace to a cold fetch of a large repository
/// behind a backlog.
const FIRST_STEP_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabel {
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    event: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type Histograms = Family<PipelineLabel, Histogram, fn() -> Histogram>;

/// The daemon's metrics; cloning shares them.
#[derive(Clone)]
struct Kept {
    in_store: Family<StatusLabel, Gauge>,
    reports_pending: Gauge,
    ended: Family<Ended, Counter>,
    duration: Histograms,
    queue_wait: Histogram,
    deliveries: Family<DeliveryLabels, Counter>,
    http: Family<RouteLabel, Histogram, fn() -> Histogram>,
    to_first_step: Family<PhaseLabel, Histogram, fn() -> Histogram>,
}

/// How a webhook delivery was answered, as `hookci_deliveries_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// A push recorded (202), with or without runs.
    Accepted,
    /// A delivery id seen before (200): nothing new.
    Duplicate,
    /// A ping or an event other than push: nothing to run.
    Ignored,
    /// A missing or wrong signature (401).
    Unauthorized,
    /// Refused as it came: malformed, too large, too slow, a wrong content type (4xx).
    Invalid,
    /// hookci could not take it now (5xx): the store failed or intake was full.
    Unavailable,
}

impl Answered {
    pub fn as_str(self) -> &'static str {
        match self {
            Answered::Accepted => "accepted",
            Answered::Duplicate => "duplicate",
            Answered::Ignored => "ignored",
            Answered::Unauthorized => "unauthorized",
            Answered::Invalid => "invalid",
            Answered::Unavailable => "unavailable",
        }
    }
}

/// The `event` label of a delivery whose event name nobody vouched for (unsigned with
/// a secret set, or not a plausible event name): anyone can send any header, and each
/// value would be a series of its own.
pub const UNKNOWN_EVENT: &str = "unknown";

/// The `event` label of a vouched-for event name that is none of [`KNOWN_EVENTS`].
pub const OTHER_EVENT: &str = "other";

/// The event names that get a series of their own: GitHub's webhook events a repository
/// sends most. A fixed list, because with `--allow-unsigned` nobody vouches for the
/// header, and even a signed sender must not be able to grow the series.
const KNOWN_EVENTS: &[&str] = &[
    "push",
    "ping",
    "create",
    "delete",
    "pull_request",
    "pull_request_review",
    "pull_request_review_comment",
    "issues",
    "issue_comment",
    "release",
    "status",
    "check_run",
    "check_suite",
    "workflow_run",
    "workflow_job",
    "deployment",
    "deployment_status",
    "fork",
    "star",
    "watch",
    "repository",
    "member",
    "public",
];

/// The event name as a label: one of [`KNOWN_EVENTS`], [`OTHER_EVENT`] for another
/// name, or [`UNKNOWN_EVENT`] when nobody vouched for it.
pub fn event_label(verified_event: Option<&str>) -> String {
    match verified_event {
        Some(e) => match KNOWN_EVENTS.iter().find(|k| **k == e) {
            Some(k) => (*k).to_owned(),
            None => OTHER_EVENT.to_owned(),
        },
        None => UNKNOWN_EVENT.to_owned(),
    }
}

/// The fixed name of the route a request path belongs to, for
/// `hookci_http_request_duration_seconds{route}`: never the path itself, which holds
/// run ids, pipeline names and whatever a client sends.
pub fn route_of(path: &str) -> &'static str {
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    match segments.as_slice() {
        [""] => "runs_page",
        ["webhook"] => "webhook",
        ["healthz"] => "healthz",
        ["metrics"] => "metrics",
        ["login"] => "login",
        ["logout"] => "logout",
        ["runs", _] => "run_page",
        ["runs", _, "cancel" | "rerun"] => "run_form",
        ["pipelines"] => "pipelines_page",
        ["pipelines", _] => "pipeline_page",
        ["pipelines", _, "run"] => "pipeline_form",
        ["deliveries", _] => "delivery_page",
        ["badge", _] => "badge",
        ["assets", _] => "asset",
        ["api", "events"] => "api_events",
        ["api", "runs"] => "api_runs",
        ["api", "runs", _] => "api_run",
        ["api", "runs", _, "log"] => "api_run_log",
        ["api", "runs", _, "events"] => "api_run_events",
        ["api", "runs", _, "cancel"] => "api_run_cancel",
        ["api", "runs", _, "rerun"] => "api_run_rerun",
        ["api", "pipelines", _, "trigger"] => "api_pipeline_trigger",
        ["api", "deliveries", _] => "api_delivery",
        ["api", "reload"] => "api_reload",
        _ => "other",
    }
}

pub struct Metrics {
    registry: Registry,
    kept: Kept,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let kept = Kept {
            in_store: Family::default(),
            reports_pending: Gauge::default(),
            ended: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            queue_wait: Histogram::new(WAIT_BUCKETS),
            deliveries: Family::default(),
            http: Family::new_with_constructor(|| Histogram::new(HTTP_BUCKETS)),
            to_first_step: Family::new_with_constructor(|| Histogram::new(FIRST_STEP_BUCKETS)),
        };
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let mut registry = Registry::default();
        // Encoded as `hookci_build_info`: a gauge whose label says which hookci runs.
        registry.register(
            "hookci_build_info",
            "The running hookci's version, as a label of a gauge that is always 1",
            build_info,
        );
        registry.register(
            "hookci_runs",
            "Runs in the store by status",
            kept.in_store.clone(),
        );
        // Encoded as `hookci_runs_total`.
        registry.register(
            "hookci_runs",
            "Runs that ended since the daemon started, by pipeline and status",
            kept.ended.clone(),
        );
        registry.register(
            "hookci_run_duration_seconds",
            "How long runs that ended ran, from start to end",
            kept.duration.clone(),
        );
        registry.register(
            "hookci_queue_wait_seconds",
            "How long runs waited from being queued to their first start",
            kept.queue_wait.clone(),
        );
        registry.register(
            "hookci_reports_pending",
            "Commit statuses and notifications in the outbox still to send",
            kept.reports_pending.clone(),
        );
        // Encoded as `hookci_deliveries_total`.
        registry.register(
            "hookci_deliveries",
            "Webhook deliveries since the daemon started, by event and how they were answered",
            kept.deliveries.clone(),
        );
        registry.register(
            "hookci_http_request_duration_seconds",
            "How long HTTP requests took to answer (to the response head for streams), by route",
            kept.http.clone(),
        );
        registry.register(
            "hookci_push_to_first_step_seconds",
            "How long runs took from their push (or trigger) to their first step's start (total), \
             and the phases of it: queue wait, fetch and checkout",
            kept.to_first_step.clone(),
        );
        Metrics { registry, kept }
    }

    /// Counts a webhook delivery; `event` from [`event_label`].
    pub fn delivery(&self, event: String, outcome: Answered) {
        self.kept
            .deliveries
            .get_or_create(&DeliveryLabels {
                event,
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Observes how long a request to `route` (from [`route_of`]) took.
    pub fn http_request(&self, route: &'static str, took: std::time::Duration) {
        self.kept
            .http
            .get_or_create(&RouteLabel { route })
            .observe(took.as_secs_f64());
    }

    /// Counts and observes the runs on `events` until the stream ends: the subscriber
    /// of the metrics, to be spawned as a task.
    pub fn record(&self, mut events: events::Receiver) -> impl std::future::Future<Output = ()> {
        let kept = self.kept.clone();
        async move {
            loop {
                match events.recv().await {
                    Ok(event) => kept.count(&event),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(
                            missed,
                            "metrics fell behind the run events; the counters miss what they held"
                        );
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        }
    }

    /// The text of a scrape, given how many runs the store holds in each state and how
    /// many reports are pending.
    pub fn encode(
        &self,
        in_store: &[(RunStatus, i64)],
        reports_pending: i64,
    ) -> Result<String, std::fmt::Error> {
        self.kept.reports_pending.set(reports_pending);
        for status in RunStatus::ALL {
            let n = in_store
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n);
            self.kept
                .in_store
                .get_or_create(&StatusLabel {
                    status: status.as_str(),
                })
                .set(n);
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl Kept {
    fn count(&self, event: &RunEvent) {
        match event {
            RunEvent::Started(run) if run.attempt == 1 => {
                if let Some(wait) = seconds(Some(run.created_at), run.started_at) {
                    self.queue_wait.observe(wait);
                }
            }
            RunEvent::StepStarted {
                timings: Some(t), ..
            } => {
                for (phase, ms) in [
                    ("total", t.to_first_step_ms),
                    ("queue", t.queue_ms),
                    ("fetch", t.fetch_ms),
                    ("checkout", t.checkout_ms),
                ] {
                    self.to_first_step
                        .get_or_create(&PhaseLabel { phase })
                        .observe(ms.max(0) as f64 / 1000.0);
                }
            }
            RunEvent::Finished { run, .. } => self.ended(run),
            _ => {}
        }
    }

    fn ended(&self, run: &Run) {
        self.ended
            .get_or_create(&Ended {
                pipeline: run.pipeline.clone(),
                status: run.status.as_str(),
            })
            .inc();
        if let Some(ran) = seconds(run.started_at, run.finished_at) {
            self.duration
                .get_or_create(&PipelineLabel {
                    pipeline: run.pipeline.clone(),
                })
                .observe(ran);
        }
    }
}

/// Seconds from `from` to `to` (milliseconds since the epoch), when both are known.
fn seconds(from: Option<i64>, to: Option<i64>) -> Option<f64> {
    let (from, to) = (from?, to?);
    Some((to - from).max(0) as f64 / 1000.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{Step, StepStatus, Timings};

    fn run(
        id: i64,
        status: RunStatus,
        created: i64,
        started: Option<i64>,
        end: Option<i64>,
    ) -> Run {
        Run {
            id,
            pipeline: "ci \"main\"\n".into(),
            repo: "o/r".into(),
            git_ref: "refs/heads/main".into(),
            commit: "c".repeat(40),
            before: "b".repeat(40),
            clone_url: "/nowhere".into(),
            trigger: "push".into(),
            delivery: None,
            status,
            reason: None,
            attempt: 1,
            generation: 1,
            created_at: created,
            started_at: started,
            finished_at: end,
            log_dropped: 0,
            instance: None,
            timings: None,
        }
    }

    fn step() -> Step {
        Step {
            number: 1,
            name: "build".into(),
            status: StepStatus::Running,
            exit_code: None,
            signal: None,
            reason: None,
            started_at: Some(1_600),
            finished_at: None,
        }
    }

    #[test]
    fn runs_from_the_stream_are_counted_and_timed_with_labels_escaped() {
        let metrics = Metrics::new();
        let started = run(1, RunStatus::Running, 1_000, Some(1_500), None);
        metrics.kept.count(&RunEvent::Started(started));
        for (id, status, end) in [
            (1, RunStatus::Succeeded, 4_500),
            (2, RunStatus::Failed, 2_000),
        ] {
            metrics.kept.count(&RunEvent::Finished {
                run: run(id, status, 1_000, Some(1_500), Some(end)),
                steps: Vec::new(),
            });
        }
        metrics.kept.count(&RunEvent::StepStarted {
            run: 1,
            step: step(),
            timings: Some(Timings {
                queue_ms: 5,
                fetch_ms: 40,
                checkout_ms: 60,
                to_first_step_ms: 120,
            }),
        });
        // Not the first step: no timings, nothing observed.
        metrics.kept.count(&RunEvent::StepStarted {
            run: 1,
            step: step(),
            timings: None,
        });
        // Never started: counted, not timed.
        metrics.kept.count(&RunEvent::Finished {
            run: run(3, RunStatus::Skipped, 1_000, None, Some(1_000)),
            steps: Vec::new(),
        });
        let text = metrics.encode(&[(RunStatus::Queued, 4)], 0).unwrap();
        let pipeline = r#"pipeline="ci \"main\"\n""#;
        for line in [
            "# TYPE hookci_runs gauge".to_owned(),
            r#"hookci_runs{status="queued"} 4"#.to_owned(),
            r#"hookci_runs{status="running"} 0"#.to_owned(),
            "# TYPE hookci_runs_total counter".to_owned(),
            format!(r#"hookci_runs_total{{{pipeline},status="succeeded"}} 1"#),
            format!(r#"hookci_runs_total{{{pipeline},status="failed"}} 1"#),
            format!(r#"hookci_runs_total{{{pipeline},status="skipped"}} 1"#),
            "# TYPE hookci_run_duration_seconds histogram".to_owned(),
            format!("hookci_run_duration_seconds_count{{{pipeline}}} 2"),
            format!("hookci_run_duration_seconds_sum{{{pipeline}}} 3.5"),
            format!(r#"hookci_run_duration_seconds_bucket{{{pipeline},le="1"}} 1"#),
            format!(r#"hookci_run_duration_seconds_bucket{{{pipeline},le="5"}} 2"#),
            "hookci_queue_wait_seconds_bucket{le=\"0.5\"} 1".to_owned(),
            "hookci_queue_wait_seconds_count 1".to_owned(),
            "hookci_queue_wait_seconds_sum 0.5".to_owned(),
            "# TYPE hookci_push_to_first_step_seconds histogram".to_owned(),
            r#"hookci_push_to_first_step_seconds_count{phase="total"} 1"#.to_owned(),
            r#"hookci_push_to_first_step_seconds_sum{phase="total"} 0.12"#.to_owned(),
            r#"hookci_push_to_first_step_seconds_bucket{phase="total",le="0.1"} 0"#.to_owned(),
            r#"hookci_push_to_first_step_seconds_bucket{phase="total",le="0.25"} 1"#.to_owned(),
            r#"hookci_push_to_first_step_seconds_sum{phase="queue"} 0.005"#.to_owned(),
            r#"hookci_push_to_first_step_seconds_sum{phase="fetch"} 0.04"#.to_owned(),
            r#"hookci_push_to_first_step_seconds_sum{phase="checkout"} 0.06"#.to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn routes_are_fixed_names_whatever_the_path_holds() {
        for (path, route) in [
            ("/", "runs_page"),
            ("/webhook", "webhook"),
            ("/runs/12", "run_page"),
            ("/runs/12/rerun", "run_form"),
            ("/pipelines/a%20b", "pipeline_page"),
            ("/badge/ci.svg", "badge"),
            ("/api/runs/7/log", "api_run_log"),
            ("/api/runs/7/events", "api_run_events"),
            ("/api/deliveries/<script>", "api_delivery"),
            ("/api/runs/7/log/more", "other"),
            ("/no/such/page", "other"),
            ("", "runs_page"),
        ] {
            assert_eq!(route_of(path), route, "{path}");
        }
        assert_eq!(event_label(Some("push")), "push");
        assert_eq!(event_label(Some("pull_request")), "pull_request");
        assert_eq!(event_label(None), UNKNOWN_EVENT);
        for odd in ["", "Push\n", "made_up_event", &*"x".repeat(65)] {
            assert_eq!(event_label(Some(odd)), OTHER_EVENT, "{odd:?}");
        }
    }
}
