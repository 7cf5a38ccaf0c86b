//! Delivers the outbox: takes due reports from the store one at a time, in the order
//! they became due, and settles each (sent, due again later, or given up). Retries
//! back off exponentially from [`BACKOFF_FIRST`] to [`BACKOFF_MAX`], wait longer when
//! `Retry-After` or GitHub's `X-RateLimit-Reset` says so, and end after [`GIVE_UP`]
//! (with a last try at that deadline)
//! or at a 4xx answer other than 408 and 429. One report at a time keeps the statuses of one
//! commit in order. Entries are rows: a restart sends what was left.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::now_ms;
use crate::config::{resolve_secret, ProcessEnv, Secret};
use crate::report::message;
use crate::report::policy::run_link;
use crate::state::AppState;
use crate::store::{Attempt, Report, ReportKind, Store, StoreError};

pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// A report not delivered this long after it was written is given up.
pub const GIVE_UP: Duration = Duration::from_secs(24 * 3600);
/// How long one request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How many due reports one look at the store takes.
const BATCH: u32 = 32;
/// How long the sender sleeps with nothing due before it looks again anyway.
const IDLE: Duration = Duration::from_secs(60);

/// Why an attempt did not deliver.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// Worth another try, after `after` if the receiver said so.
    #[error("{reason}")]
    Again {
        reason: String,
        after: Option<Duration>,
    },
    /// Never worth another try.
    #[error("{0}")]
    Refused(String),
}

/// The HTTP client, built at the first report: a daemon that reports nothing never
/// pays for it (its TLS setup is most of its memory).
struct Client(OnceLock<Result<reqwest::Client, String>>);

impl Client {
    fn get(&self) -> Result<&reqwest::Client, SendError> {
        self.0
            .get_or_init(|| {
                reqwest::Client::builder()
                    .user_agent(concat!("hookci/", env!("CARGO_PKG_VERSION")))
                    .timeout(REQUEST_TIMEOUT)
                    // A redirect could carry the token elsewhere; no receiver needs one.
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| format!("cannot set up the HTTP client: {e}"))
            })
            .as_ref()
            .map_err(|e| SendError::Again {
                reason: e.clone(),
                after: None,
            })
    }
}

/// Runs store calls on a blocking thread.
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    crate::run::scheduler::blocking(store, f).await
}

/// Sends reports until `stop` turns true. A report in flight at the stop stays
/// pending and is sent again after the next start.
pub async fn run(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let client = Client(OnceLock::new());
    loop {
        if *stop.borrow() {
            return;
        }
        let due = match blocking(&state.store, |s| s.due_reports(now_ms(), BATCH)).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox");
                // A store that fails every read must not make the sender spin.
                tokio::select! {
                    () = tokio::time::sleep(BACKOFF_FIRST) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let full = due.len() == BATCH as usize;
        let mut unrecorded = false;
        for report in due {
            let attempt = tokio::select! {
                a = attempt(&state, &client, &report) => a,
                _ = stop.changed() => return,
            };
            let id = report.id;
            if let Err(e) = blocking(&state.store, move |s| s.report_attempted(id, attempt)).await {
                tracing::warn!(run = report.run, error = %e, "cannot record a report's attempt");
                unrecorded = true;
            }
        }
        if unrecorded {
            // Still due as far as the store knows: sent again after a pause, not at once.
            tokio::select! {
                () = tokio::time::sleep(BACKOFF_FIRST) => continue,
                _ = stop.changed() => return,
            }
        }
        if full {
            continue;
        }
        let wait = match blocking(&state.store, |s| s.next_report_at()).await {
            Ok(Some(at)) => Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)),
            _ => IDLE,
        }
        .min(IDLE);
        tokio::select! {
            () = state.reports.notified() => {}
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One attempt at `report`, and what becomes of it.
async fn attempt(state: &AppState, client: &Client, report: &Report) -> Attempt {
    let span = tracing::info_span!("report", run = report.run, target = %report.target);
    let _enter = span.enter();
    let result = match send(state, client, report).await {
        Ok(()) => {
            tracing::info!(attempts = report.attempts + 1, "report sent");
            return Attempt::Sent;
        }
        Err(e) => e,
    };
    match result {
        SendError::Refused(reason) => {
            tracing::warn!(%reason, "report refused; not tried again");
            Attempt::Failed { reason }
        }
        SendError::Again { reason, after } => {
            // Never sooner than the backoff: a receiver answering `Retry-After: 0` to
            // every try must not make the sender spin.
            let wait = backoff(report.attempts).max(after.unwrap_or_default());
            let at = now_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
            let deadline = report
                .created_at
                .saturating_add(i64::try_from(GIVE_UP.as_millis()).unwrap_or(i64::MAX));
            match next_try(now_ms(), at, deadline) {
                None => {
                    let reason = format!("given up after {} h: {reason}", GIVE_UP.as_secs() / 3600);
                    tracing::warn!(%reason, "report not delivered");
                    Attempt::Failed { reason }
                }
                Some(at) => {
                    tracing::info!(%reason, retry_in = ?wait, "report not delivered; retrying");
                    Attempt::Retry { at, reason }
                }
            }
        }
    }
}

/// When to try again a report that failed at `now` and would next be due at `at`, with
/// its deadline at `deadline` (`None`: give up). A retry that would land past the
/// deadline becomes a last try at the deadline itself, unless that has come already.
fn next_try(now: i64, at: i64, deadline: i64) -> Option<i64> {
    if at <= deadline {
        Some(at)
    } else if now < deadline {
        Some(deadline)
    } else {
        None
    }
}

/// A `Retry-After` value: a number of seconds, or an HTTP date (a date already past
/// means now).
fn retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The pause after the `attempts`-th failure: 1 s, doubling, at most 10 min.
pub fn backoff(attempts: i64) -> Duration {
    let doublings = u32::try_from(attempts.clamp(0, 20)).unwrap_or(20);
    BACKOFF_FIRST
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(BACKOFF_MAX)
}

/// A secret that holds a URL or a key, looked up as `secrets:` are.
fn secret(state: &AppState, name: &str) -> Result<Secret, SendError> {
    resolve_secret(name, state.config().secrets_dir.as_deref(), &ProcessEnv).map_err(|reason| {
        SendError::Again {
            reason,
            after: None,
        }
    })
}

async fn send(state: &AppState, client: &Client, report: &Report) -> Result<(), SendError> {
    let client = client.get()?;
    let request = match report.kind {
        ReportKind::Status => {
            let config = state.config();
            let token = config
                .github
                .status_token()
                .ok_or_else(|| SendError::Refused("no GitHub token is configured".into()))?;
            let url = format!(
                "{}/{}",
                config.github.api_url.trim_end_matches('/'),
                report.address
            );
            client
                .post(url)
                .bearer_auth(token.expose())
                .header("Accept", "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28")
                .header("Content-Type", "application/json")
                .body(report.body.clone().unwrap_or_default())
        }
        ReportKind::Slack | ReportKind::Discord | ReportKind::Webhook => {
            notification(state, client, report).await?
        }
    };
    let response = request.send().await.map_err(|e| SendError::Again {
        reason: transport_error(e),
        after: None,
    })?;
    judge(response).await
}

/// What went wrong on the way, with its causes, but never the URL: it may be a
/// secret (only reqwest's own error names it).
fn transport_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// The request of a notification, its body built from the finished run.
async fn notification(
    state: &AppState,
    client: &reqwest::Client,
    report: &Report,
) -> Result<reqwest::RequestBuilder, SendError> {
    let id = report.run;
    let found = blocking(&state.store, move |s| {
        Ok(match s.run(id)? {
            Some(run) => Some((run, s.steps(id)?)),
            None => None,
        })
    })
    .await
    .map_err(|reason| SendError::Again {
        reason,
        after: None,
    })?;
    let (run, steps) =
        found.ok_or_else(|| SendError::Refused(format!("run {id} no longer exists")))?;
    let outcome = report.outcome.as_deref().unwrap_or("always");
    let link = run_link(state.config().public_url.as_deref(), run.id);
    let text = message::text(&run, &steps, outcome, link.as_deref());
    Ok(match report.kind {
        ReportKind::Slack => {
            let url = secret(state, &report.address)?;
            client
                .post(url.expose())
                .header("Content-Type", "application/json")
                .body(message::slack(&text).to_string())
        }
        ReportKind::Discord => {
            let url = secret(state, &report.address)?;
            client
                .post(url.expose())
                .header("Content-Type", "application/json")
                .body(message::discord(&text).to_string())
        }
        _ => {
            let body = message::webhook(&run, &steps, outcome, link.as_deref()).to_string();
            let mut request = client
                .post(&report.address)
                .header("Content-Type", "application/json")
                .header("X-Hookci-Event", message::EVENT);
            if let Some(name) = &report.signing {
                let key = secret(state, name)?;
                request = request.header("X-Hookci-Signature-256", sign(key.expose(), &body));
            }
            request.body(body)
        }
    })
}

/// `sha256=<hex HMAC-SHA256 of body>`, as GitHub signs its webhooks.
pub fn sign(key: &str, body: &str) -> String {
    crate::intake::sign(key.as_bytes(), body.as_bytes())
}

/// What an answer means: delivered, worth another try (when), or refused for good.
async fn judge(response: reqwest::Response) -> Result<(), SendError> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let headers = response.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let retry_after = header("retry-after").and_then(retry_after);
    let limited = header("x-ratelimit-remaining") == Some("0");
    let reset = header("x-ratelimit-reset")
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|_| limited)
        .map(|epoch| {
            let ms = epoch.saturating_mul(1000).saturating_sub(now_ms()).max(0);
            Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        });
    let message = answer_message(&response_text(response).await);
    let reason = match &message {
        Some(m) => format!("HTTP {}: {m}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    };
    let code = status.as_u16();
    // GitHub answers a spent rate limit with 403 (or 429) and says when it resets.
    let again = code == 408
        || code == 429
        || status.is_server_error()
        || limited
        || (code == 403 && retry_after.is_some());
    if again {
        Err(SendError::Again {
            reason,
            after: retry_after.or(reset),
        })
    } else {
        Err(SendError::Refused(reason))
    }
}

async fn response_text(response: reqwest::Response) -> String {
    response.text().await.unwrap_or_default()
}

/// The answer's `message` (GitHub's JSON errors), else its first line of text.
fn answer_message(body: &str) -> Option<String> {
    let message = match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) => v.get("message").and_then(|m| m.as_str()).map(str::to_owned),
        Err(_) => body.lines().next().map(str::to_owned),
    }?;
    let message: String = message.trim().chars().take(200).collect();
    (!message.is_empty()).then_some(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_ten_minutes() {
        let secs: Vec<u64> = (0..12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(backoff(i64::MAX), BACKOFF_MAX);
    }

    fn answer(status: u16, headers: &[(&str, String)], body: &str) -> reqwest::Response {
        let mut b = warp::http::Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        reqwest::Response::from(b.body(body.to_owned()).unwrap())
    }

    async fn judged(status: u16, headers: &[(&str, String)], body: &str) -> SendError {
        judge(answer(status, headers, body)).await.unwrap_err()
    }

    #[tokio::test]
    async fn answers_are_retried_when_the_receiver_may_take_them_later() {
        assert!(judge(answer(201, &[], "{}")).await.is_ok());
        for code in [408, 429, 500, 502, 503] {
            let SendError::Again { reason, after } = judged(code, &[], "").await else {
                panic!("{code} is tried again");
            };
            assert_eq!((reason, after), (format!("HTTP {code}"), None));
        }
        let SendError::Again { after, .. } = judged(503, &[("retry-after", "7".into())], "").await
        else {
            panic!("tried again")
        };
        assert_eq!(after, Some(Duration::from_secs(7)));
        let in_a_minute =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
        let SendError::Again { after, .. } = judged(503, &[("retry-after", in_a_minute)], "").await
        else {
            panic!("tried again")
        };
        let after = after.unwrap();
        assert!(
            after > Duration::from_secs(55) && after <= Duration::from_secs(60),
            "{after:?}"
        );
        let past = httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(1));
        let SendError::Again { after, .. } = judged(429, &[("retry-after", past)], "").await else {
            panic!("tried again")
        };
        assert_eq!(after, Some(Duration::ZERO));
        // A spent rate limit: 403, nothing left, and when it resets.
        let reset = (now_ms() / 1000 + 120).to_string();
        let limited = [
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", reset),
        ];
        let SendError::Again { after, reason } =
            judged(403, &limited, r#"{"message":"API rate limit exceeded"}"#).await
        else {
            panic!("a rate limit is waited out")
        };
        assert_eq!(reason, "HTTP 403: API rate limit exceeded");
        let after = after.unwrap();
        assert!(
            after > Duration::from_secs(110) && after <= Duration::from_secs(120),
            "{after:?}"
        );
    }

    #[tokio::test]
    async fn other_4xx_answers_are_refused_with_their_message() {
        for (code, body, reason) in [
            (
                422,
                r#"{"message":"Validation Failed"}"#,
                "HTTP 422: Validation Failed",
            ),
            (
                403,
                r#"{"message":"Resource not accessible"}"#,
                "HTTP 403: Resource not accessible",
            ),
            (404, "no_service\n", "HTTP 404: no_service"),
            (401, "", "HTTP 401"),
        ] {
            let SendError::Refused(said) = judged(code, &[], body).await else {
                panic!("{code} is refused");
            };
            assert_eq!(said, reason);
        }
    }

    #[test]
    fn a_retry_past_the_deadline_is_a_last_try_at_the_deadline() {
        assert_eq!(next_try(1_000, 2_000, 5_000), Some(2_000));
        assert_eq!(next_try(1_000, 9_000, 5_000), Some(5_000));
        assert_eq!(next_try(5_000, 9_000, 5_000), None);
        assert_eq!(next_try(6_000, 9_000, 5_000), None);
    }

    #[test]
    fn the_answers_message_is_what_a_refusal_says() {
        assert_eq!(
            answer_message(r#"{"message":"Validation Failed","errors":[]}"#).as_deref(),
            Some("Validation Failed")
        );
        assert_eq!(
            answer_message("invalid_token\n").as_deref(),
            Some("invalid_token")
        );
        assert_eq!(answer_message(""), None);
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // The example of GitHub's webhook documentation, signed the same way.
        assert_eq!(
            sign("It's a Secret to Everybody", "Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }
}
