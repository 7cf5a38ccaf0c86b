//! `POST /webhook`: the door. Reads the body under the size cap, checks the HMAC of the
//! raw bytes in constant time before parsing anything, decides every pipeline and
//! records the delivery; the 202 goes out only after the store has committed it.
//! It starts nothing itself: the scheduler is woken and takes runs from the store.
//! `budget` bounds what bodies not yet verified may hold; `reconcile` finds pushes
//! missed while hookci was down; `event` parses a push.

pub mod budget;
pub mod event;
pub mod reconcile;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use tracing::Instrument;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::intake::budget::{BodyBudget, Share};
use crate::intake::event::{EventError, Push};
use crate::pipeline::matcher::{self, Verdict};
use crate::pipeline::{CancelPolicy, Group, Pipeline};
use crate::state::AppState;
use crate::store::{DeliveryOutcome, NewDecision, NewDelivery, NewRun, Supersede};
use crate::web::metrics::{self, Answered};

/// A JSON error body with `status`.
pub fn error_reply(status: StatusCode, message: impl Into<String>) -> Response {
    warp::reply::with_status(
        warp::reply::json(&json!({ "error": message.into() })),
        status,
    )
    .into_response()
}

fn json_reply(status: StatusCode, value: &serde_json::Value) -> Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("webhook")
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(warp::any().map(move || Arc::clone(&state)))
        .then(
            |headers: HeaderMap, body, state: Arc<AppState>| async move {
                let mut vouched = None;
                let answer = handle(&state, &headers, body, &mut vouched).await;
                let outcome = match &answer {
                    Ok((_, outcome)) => *outcome,
                    Err((status, _)) => failure_outcome(*status),
                };
                state
                    .metrics
                    .delivery(metrics::event_label(vouched.as_deref()), outcome);
                answer.map_or_else(
                    |(status, message)| {
                        let mut reply = error_reply(status, message);
                        if status == StatusCode::SERVICE_UNAVAILABLE {
                            reply.headers_mut().insert(
                                warp::http::header::RETRY_AFTER,
                                warp::http::HeaderValue::from_static(RETRY_AFTER_SECS),
                            );
                        }
                        reply
                    },
                    |(reply, _)| reply,
                )
            },
        )
}

type Failure = (StatusCode, String);

fn failure_outcome(status: StatusCode) -> Answered {
    if status == StatusCode::UNAUTHORIZED {
        Answered::Unauthorized
    } else if status.is_server_error() {
        Answered::Unavailable
    } else {
        Answered::Invalid
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Which body encoding GitHub used (the webhook's "Content type" setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Form,
}

fn encoding(headers: &HeaderMap) -> Result<Encoding, Failure> {
    let raw = header(headers, "content-type").unwrap_or_default();
    let essence = raw
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Encoding::Json),
        "application/x-www-form-urlencoded" => Ok(Encoding::Form),
        _ => Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported content type {raw:?}: use application/json or application/x-www-form-urlencoded"),
        )),
    }
}

/// Seconds a client told 503 is asked to wait before it tries again.
const RETRY_AFTER_SECS: &str = "5";

/// How long a client may take to send a whole body, from the end of its headers.
const BODY_DEADLINE: Duration = Duration::from_secs(30);

/// Bodies larger than this are verified and parsed on a blocking thread: hashing and
/// parsing 25 MiB would hold an async worker, and every connection it serves, for
/// tens of milliseconds.
const OFF_WORKER_BYTES: usize = 256 * 1024;

/// A body's buffer starts this big, once its first bytes arrive.
const FIRST_BUFFER: usize = 16 * 1024;

/// Reads the whole body, refusing it as soon as it grows past `limit` (also when no
/// Content-Length was sent), so an oversized body never sits in memory. What it holds
/// counts against the global budget of unverified bytes as it arrives (`budget`). The
/// returned share is to be dropped once the signature is checked.
async fn read_capped<S, B>(
    headers: &HeaderMap,
    body: S,
    limit: u64,
    budget: &BodyBudget,
) -> Result<(Bytes, Share), Failure>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than max_body_bytes ({limit} bytes)"),
        )
    };
    let declared = header(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut share = budget.share(declared.unwrap_or(0));
    // What a client declares is not trusted for allocation: a header alone must not
    // reserve 25 MiB. The buffer grows with what really arrives, and its share of the
    // budget covers all it allocates (doubling, but never past `limit`).
    let mut buf: Vec<u8> = Vec::new();
    let read = async {
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let mut chunk =
                chunk.map_err(|e| (StatusCode::BAD_REQUEST, format!("reading body: {e}")))?;
            let len = buf.len() + chunk.remaining();
            if len as u64 > limit {
                return Err(too_large());
            }
            if len > buf.capacity() {
                let capacity = (buf.capacity() * 2)
                    .max(FIRST_BUFFER)
                    .min(limit as usize)
                    .max(len);
                share
                    .hold(capacity as u64, limit)
                    .map_err(|spent| (StatusCode::SERVICE_UNAVAILABLE, spent.to_string()))?;
                buf.reserve_exact(capacity - buf.len());
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                let n = part.len();
                buf.extend_from_slice(part);
                chunk.advance(n);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(BODY_DEADLINE, read).await {
        Ok(read) => read?,
        Err(_) => {
            return Err((
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {}s",
                    BODY_DEADLINE.as_secs()
                ),
            ))
        }
    }
    Ok((Bytes::from(buf), share))
}

/// Runs `f` on a blocking thread when `len` bytes are a lot of work, else here.
async fn off_workers<T: Send + 'static>(
    len: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failure> {
    if len <= OFF_WORKER_BYTES {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("verifying the body failed: {e}"),
        )
    })
}

/// Checks `X-Hub-Signature-256` against the raw body; `verify_slice` compares in
/// constant time.
pub fn verify_signature(
    secret: &[u8],
    body: &[u8],
    header_value: Option<&str>,
) -> Result<(), &'static str> {
    let value = header_value.ok_or("missing X-Hub-Signature-256 header")?;
    let hex_digest = value
        .strip_prefix("sha256=")
        .ok_or("X-Hub-Signature-256 must start with sha256=")?;
    let digest = hex::decode(hex_digest).map_err(|_| "X-Hub-Signature-256 is not hex")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "unusable webhook secret")?;
    mac.update(body);
    mac.verify_slice(&digest)
        .map_err(|_| "signature does not match")
}

/// `sha256=<hex>` for `body`: what GitHub sends, and what `hookci send` signs with.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // new_from_slice accepts keys of any length for HMAC.
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn valid_delivery_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The JSON document of a form-encoded body: the `payload` field, percent-decoded.
fn form_payload(body: &[u8]) -> Result<Vec<u8>, String> {
    body.split(|b| *b == b'&')
        .find_map(|pair| pair.strip_prefix(b"payload="))
        .ok_or_else(|| "form body has no payload= field".to_owned())
        .and_then(percent_decode)
}

fn percent_decode(s: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .ok_or("truncated %-escape in form body")?;
                let hex = std::str::from_utf8(hex).map_err(|_| "bad %-escape in form body")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad %-escape in form body")?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Ok(out)
}

/// Answers one delivery; `vouched` gets its event name once the signature is checked
/// (or none is asked for).
async fn handle<S, B>(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: S,
    vouched: &mut Option<String>,
) -> Result<(Response, Answered), Failure>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let encoding = encoding(headers)?;
    let (raw, share) = read_capped(
        headers,
        body,
        state.config().max_body_bytes,
        &state.unverified,
    )
    .await?;
    if let Some(secret) = state.config().webhook_secret.clone() {
        let signature = header(headers, "x-hub-signature-256").map(str::to_owned);
        let body = raw.clone();
        off_workers(raw.len(), move || {
            verify_signature(secret.expose().as_bytes(), &body, signature.as_deref())
        })
        .await?
        .map_err(|e| (StatusCode::UNAUTHORIZED, e.to_owned()))?;
    }
    // Verified (or unsigned by choice): the budget is for what nobody vouched for yet.
    drop(share);
    *vouched = header(headers, "x-github-event").map(str::to_owned);
    let event = header(headers, "x-github-event").ok_or((
        StatusCode::BAD_REQUEST,
        "missing X-GitHub-Event header".to_owned(),
    ))?;
    let delivery = header(headers, "x-github-delivery").ok_or((
        StatusCode::BAD_REQUEST,
        "missing X-GitHub-Delivery header".to_owned(),
    ))?;
    if !valid_delivery_id(delivery) {
        return Err((
            StatusCode::BAD_REQUEST,
            "X-GitHub-Delivery is not a delivery id".to_owned(),
        ));
    }
    let json = match encoding {
        Encoding::Json => raw,
        Encoding::Form => {
            let form = raw.clone();
            off_workers(raw.len(), move || form_payload(&form))
                .await?
                .map(Bytes::from)
                .map_err(|e| (StatusCode::BAD_REQUEST, e))?
        }
    };
    let span = tracing::info_span!("delivery", delivery, event);
    dispatch(state, event, delivery, json)
        .instrument(span)
        .await
}

async fn dispatch(
    state: &Arc<AppState>,
    event: &str,
    delivery: &str,
    json: Bytes,
) -> Result<(Response, Answered), Failure> {
    match event {
        "ping" => {
            return Ok((
                json_reply(StatusCode::OK, &json!({ "ok": true })),
                Answered::Ignored,
            ))
        }
        "push" => {}
        other => {
            tracing::debug!("event ignored");
            return Ok((
                json_reply(StatusCode::ACCEPTED, &json!({ "ignored": other })),
                Answered::Ignored,
            ));
        }
    }
    let len = json.len();
    let push = off_workers(len, move || Push::parse(&json))
        .await?
        .map_err(|e| match e {
            EventError::Malformed(_) | EventError::BadRepository(_) => {
                (StatusCode::BAD_REQUEST, e.to_string())
            }
        })?;
    let record = new_delivery(delivery, &push, &state.pipelines());
    // In a task of its own: hyper drops this handler when the client hangs up, and a
    // delivery the store has committed must still wake the scheduler and stop the runs
    // it supersedes, or its run would wait for the next push.
    let outcome = tokio::spawn(record_and_wake(Arc::clone(state), record).in_current_span())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| {
            tracing::error!(error = %e, "recording the delivery failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the delivery could not be stored; retry".to_owned(),
            )
        })?;
    Ok(match outcome {
        DeliveryOutcome::New(runs) => {
            // Debug, not info: one line a push costs intake a write(2) each; the store keeps
            // every delivery and `hookci why` explains it.
            tracing::debug!(git_ref = %push.git_ref, runs = runs.len(), "push recorded");
            (
                json_reply(
                    StatusCode::ACCEPTED,
                    &json!({ "delivery": delivery, "runs": runs }),
                ),
                Answered::Accepted,
            )
        }
        DeliveryOutcome::Duplicate(runs) => {
            tracing::info!("delivery seen before; nothing new runs");
            (
                json_reply(
                    StatusCode::OK,
                    &json!({ "duplicate": true, "delivery": delivery, "runs": runs }),
                ),
                Answered::Duplicate,
            )
        }
    })
}

/// Records the delivery, then wakes the scheduler for its new runs and stops the
/// running runs they supersede (`cancel: running`).
async fn record_and_wake(
    state: Arc<AppState>,
    record: NewDelivery,
) -> Result<DeliveryOutcome, crate::store::StoreError> {
    let outcome = state.store.record_delivery_async(record).await?;
    state.delivered();
    if let DeliveryOutcome::New(runs) = &outcome {
        state
            .events
            .runs_changed(runs.iter().flat_map(|r| r.changed.iter().cloned()));
        for new in runs {
            for old in &new.supersedes {
                crate::run::scheduler::supersede(&state, *old, new.id).await;
            }
        }
        if runs.iter().any(|r| !r.existing) {
            state.wake.notify_one();
        }
    }
    Ok(outcome)
}

/// The store record of a push: every pipeline's verdict, with runs for the triggered ones.
fn new_delivery(id: &str, push: &Push, pipelines: &crate::pipeline::PipelineSet) -> NewDelivery {
    NewDelivery {
        id: id.to_owned(),
        event: "push".into(),
        repo: push.repo.to_string(),
        git_ref: push.git_ref.clone(),
        after: push.after.clone(),
        head: push.commit.clone(),
        clone_url: push.clone_url.clone(),
        decisions: decisions(push, pipelines, "push"),
    }
}

/// The concurrency group of a run of `p` on `git_ref` (the pipeline's `concurrency.group`).
pub fn concurrency_group(p: &Pipeline, git_ref: &str) -> Option<String> {
    match p.concurrency.group {
        Group::Ref => Some(format!("{}\n{git_ref}", p.name)),
        Group::Pipeline => Some(p.name.clone()),
        Group::None => None,
    }
}

/// The decision of each pipeline of the pushed repository, with the run to create
/// where one triggers. The other pipelines are not named: a decision row per pipeline
/// and push would grow with every pipeline added, for pushes they never watch. A push
/// no pipeline watches gets one decision that says so.
pub fn decisions(
    push: &Push,
    pipelines: &crate::pipeline::PipelineSet,
    trigger: &'static str,
) -> Vec<NewDecision> {
    let decided: Vec<NewDecision> = matcher::decide(push, pipelines)
        .into_iter()
        .filter(matcher::Decision::watches_the_repository)
        .map(|d| {
            let p = d.pipeline;
            let run = |key: String, commit: String, skipped: Option<String>| NewRun {
                key: Some(key),
                group: concurrency_group(p, &push.git_ref),
                supersede: match p.concurrency.cancel {
                    CancelPolicy::None => Supersede::Nothing,
                    CancelPolicy::Pending => Supersede::Pending,
                    CancelPolicy::Running => Supersede::Running,
                },
                // Path filters apply to branches only (README, "Pipelines").
                supersede_own_ref: p.on.paths.is_some() && push.git_ref.starts_with("refs/heads/"),
                generation: 1,
                pipeline: p.name.clone(),
                repo: p.repo.to_string(),
                git_ref: push.git_ref.clone(),
                commit,
                before: push.before.clone(),
                clone_url: p
                    .clone_url
                    .clone()
                    .unwrap_or_else(|| push.clone_url.clone()),
                trigger,
                skipped,
            };
            match d.verdict {
                Verdict::Build { key, commit } => NewDecision {
                    pipeline: Some(p.name.clone()),
                    reason: format!("{} matched", push.git_ref),
                    run: Some(run(key, commit, None)),
                },
                Verdict::Skip {
                    key,
                    commit,
                    reason,
                } => NewDecision {
                    pipeline: Some(p.name.clone()),
                    reason: reason.text(),
                    run: Some(run(key, commit, Some(reason.text()))),
                },
                Verdict::Ignore { reason } => NewDecision {
                    pipeline: Some(p.name.clone()),
                    reason: reason.text(),
                    run: None,
                },
            }
        })
        .collect();
    if decided.is_empty() {
        return vec![NewDecision {
            pipeline: None,
            reason: format!("no pipeline watches repository {}", push.repo),
            run: None,
        }];
    }
    decided
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_test_vector() {
        // GitHub's documented example: secret "It's a Secret to Everybody", body "Hello, World!".
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            expected
        );
        assert_eq!(
            verify_signature(
                b"It's a Secret to Everybody",
                b"Hello, World!",
                Some(expected)
            ),
            Ok(())
        );
    }

    #[test]
    fn raw_fixture_signature() {
        let body =
            include_bytes!("../../tests/fixtures/github/ping/jenkins-raw-body-secret-123.json");
        let header = "sha256=85e61999573c7023720a12375e1e55d18a0870e1ef880736f6ffc9273d0519e3";
        assert_eq!(verify_signature(b"123", body, Some(header)), Ok(()));
        assert!(verify_signature(b"124", body, Some(header)).is_err());
        assert!(verify_signature(b"123", &body[1..], Some(header)).is_err());
        assert!(verify_signature(b"123", body, Some(&header[..20])).is_err());
        assert!(verify_signature(b"123", body, Some("sha1=abc")).is_err());
        assert!(verify_signature(b"123", body, None).is_err());
    }

    #[test]
    fn form_bodies() {
        assert_eq!(
            form_payload(b"payload=%7B%22a%22%3A+1%7D").unwrap(),
            b"{\"a\": 1}"
        );
        assert_eq!(form_payload(b"x=1&payload=%7B%7D").unwrap(), b"{}");
        assert!(form_payload(b"x=1").is_err());
        assert!(form_payload(b"payload=%7").is_err());
        assert!(form_payload(b"payload=%zz").is_err());
    }

    #[test]
    fn delivery_ids() {
        assert!(valid_delivery_id("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
        assert!(!valid_delivery_id(""));
        assert!(!valid_delivery_id("a b"));
        assert!(!valid_delivery_id(&"a".repeat(129)));
    }
}
