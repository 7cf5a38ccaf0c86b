//! The read API: `/healthz`, `/metrics`, `/api/runs`, `/api/runs/{id}`,
//! `/api/runs/{id}/log` and `/api/deliveries/{id}`. Only reads the store and the log
//! files; the JSON shapes here are a contract, pinned by tests.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::clock::rfc3339;
use crate::daemon::AppState;
use crate::follow::Update;
use crate::intake::error_reply;
use crate::store::{Delivery, Run, RunFilter, RunStatus, Step, Store, StoreError};
use warp::sse::Event;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

fn time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |t| Value::String(rfc3339(t)))
}

fn duration_ms(start: Option<i64>, end: Option<i64>) -> Value {
    match (start, end) {
        (Some(s), Some(e)) => json!(e - s),
        _ => Value::Null,
    }
}

/// The run object of the API.
pub fn run_json(run: &Run, steps: Option<&[Step]>) -> Value {
    let mut v = json!({
        "id": run.id,
        "pipeline": run.pipeline,
        "repo": run.repo,
        "ref": run.git_ref,
        "commit": run.commit,
        "before": run.before,
        "status": run.status,
        "reason": run.reason,
        "trigger": run.trigger,
        "delivery": run.delivery,
        "attempt": run.attempt,
        "created_at": time(Some(run.created_at)),
        "started_at": time(run.started_at),
        "finished_at": time(run.finished_at),
        "duration_ms": duration_ms(run.started_at, run.finished_at),
    });
    if let Some(steps) = steps {
        v["steps"] = steps.iter().map(step_json).collect();
    }
    v
}

fn step_json(s: &Step) -> Value {
    json!({
        "number": s.number,
        "name": s.name,
        "status": s.status,
        "exit_code": s.exit_code,
        "signal": s.signal,
        "reason": s.reason,
        "started_at": time(s.started_at),
        "finished_at": time(s.finished_at),
        "duration_ms": duration_ms(s.started_at, s.finished_at),
    })
}

pub fn delivery_json(d: &Delivery) -> Value {
    json!({
        "id": d.id,
        "event": d.event,
        "repo": d.repo,
        "ref": d.git_ref,
        "after": d.after,
        "received_at": time(Some(d.received_at)),
        "decisions": d.decisions.iter().map(|x| json!({
            "pipeline": x.pipeline,
            "outcome": x.outcome,
            "reason": x.reason,
            "run": x.run_id,
        })).collect::<Vec<_>>(),
    })
}

/// Runs a store call on a blocking thread; a failure becomes a JSON error reply.
pub(crate) async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "store call failed");
            Err(error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store failed; retry",
            ))
        }
        Err(e) => Err(error_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("store task failed: {e}"),
        )),
    }
}

fn ok_json(v: &Value) -> Response {
    warp::reply::json(v).into_response()
}

async fn list_runs(state: Arc<AppState>, q: HashMap<String, String>) -> Result<Response, Response> {
    let status = match q.get("status").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            let known: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
            error_reply(
                StatusCode::BAD_REQUEST,
                format!("unknown status {s:?}; one of {known:?}"),
            )
        })?),
    };
    let limit = match q.get("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                error_reply(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let filter = RunFilter {
        pipeline: q.get("pipeline").filter(|p| !p.is_empty()).cloned(),
        status,
        limit,
    };
    let runs = blocking(&state.store, move |s| s.runs(&filter)).await?;
    let runs: Vec<Value> = runs.iter().map(|r| run_json(r, None)).collect();
    Ok(ok_json(&json!({ "runs": runs })))
}

async fn get_run(state: Arc<AppState>, id: i64) -> Result<Response, Response> {
    let found = blocking(&state.store, move |s| {
        Ok(match s.run(id)? {
            Some(run) => Some((run, s.steps(id)?)),
            None => None,
        })
    })
    .await?;
    let (run, steps) =
        found.ok_or_else(|| error_reply(StatusCode::NOT_FOUND, format!("no run {id}")))?;
    Ok(ok_json(&run_json(&run, Some(&steps))))
}

async fn get_log(
    state: Arc<AppState>,
    id: i64,
    q: HashMap<String, String>,
) -> Result<Response, Response> {
    let attempt = match q.get("attempt") {
        None => None,
        Some(a) => Some(a.parse::<i64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            error_reply(StatusCode::BAD_REQUEST, "attempt must be a number from 1")
        })?),
    };
    let found = blocking(&state.store, move |s| {
        s.run(id)?
            .map(|run| Ok((run.attempt, s.steps_of(id, attempt)?)))
            .transpose()
    })
    .await?;
    let (current, steps) =
        found.ok_or_else(|| error_reply(StatusCode::NOT_FOUND, format!("no run {id}")))?;
    let dir = match attempt {
        Some(a) if a != current => state.log_dir(id).join(format!("attempt-{a}")),
        _ => state.log_dir(id),
    };
    let mut text = String::new();
    for step in steps {
        let Ok(body) = tokio::fs::read(dir.join(format!("{}.log", step.number))).await else {
            continue;
        };
        text.push_str(&format!(
            "==> step {}: {} ({})\n",
            step.number,
            step.name,
            step.status.as_str()
        ));
        text.push_str(&String::from_utf8_lossy(&body));
        if !text.ends_with('\n') {
            text.push('\n');
        }
    }
    Ok(warp::reply::with_header(text, "content-type", "text/plain; charset=utf-8").into_response())
}

async fn get_delivery(state: Arc<AppState>, id: String) -> Result<Response, Response> {
    let key = id.clone();
    let found = blocking(&state.store, move |s| s.delivery(&key)).await?;
    let d =
        found.ok_or_else(|| error_reply(StatusCode::NOT_FOUND, format!("no delivery {id:?}")))?;
    Ok(ok_json(&delivery_json(&d)))
}

async fn metrics(state: Arc<AppState>) -> Result<Response, Response> {
    let counts = blocking(&state.store, |s| s.count_by_status()).await?;
    let mut text =
        String::from("# HELP hookci_runs Runs in the store by status.\n# TYPE hookci_runs gauge\n");
    for status in RunStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n);
        text.push_str(&format!(
            "hookci_runs{{status=\"{}\"}} {n}\n",
            status.as_str()
        ));
    }
    Ok(warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4").into_response())
}

/// `GET /api/runs/{id}/events`: server-sent events for a dashboard: `step_started`,
/// `log` (`{"step", "text"}`), `step_finished`, `run_finished`; the stream ends with
/// the run.
async fn events(state: Arc<AppState>, id: i64) -> Result<Response, Response> {
    if blocking(&state.store, move |s| s.run(id)).await?.is_none() {
        return Err(error_reply(StatusCode::NOT_FOUND, format!("no run {id}")));
    }
    let updates = crate::follow::follow(state, id);
    let stream = futures_util::stream::unfold(updates, |mut rx| async move {
        let update = rx.recv().await?;
        let event = match update {
            Update::StepStarted(step) => Event::default()
                .event("step_started")
                .data(step_json(&step).to_string()),
            Update::Output { step, bytes } => Event::default()
                .event("log")
                .data(json!({ "step": step, "text": String::from_utf8_lossy(&bytes) }).to_string()),
            Update::StepFinished(step) => Event::default()
                .event("step_finished")
                .data(step_json(&step).to_string()),
            Update::RunFinished(run) => Event::default()
                .event("run_finished")
                .data(run_json(&run, None).to_string()),
        };
        Some((Ok::<_, std::convert::Infallible>(event), rx))
    });
    Ok(warp::sse::reply(stream).into_response())
}

/// A handler's answer, whether it succeeded or refused.
pub(crate) fn flatten(r: Result<Response, Response>) -> Response {
    r.unwrap_or_else(|e| e)
}

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| ok_json(&json!({ "ok": true })));
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state.clone())
        .then(|s| async move { flatten(metrics(s).await) });
    let runs = warp::path!("api" / "runs")
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::query::<HashMap<String, String>>())
        .then(|s, q| async move { flatten(list_runs(s, q).await) });
    let run = warp::path!("api" / "runs" / i64)
        .and(warp::get())
        .and(with_state.clone())
        .then(|id, s| async move { flatten(get_run(s, id).await) });
    let log = warp::path!("api" / "runs" / i64 / "log")
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::query::<HashMap<String, String>>())
        .then(|id, s, q| async move { flatten(get_log(s, id, q).await) });
    let events = warp::path!("api" / "runs" / i64 / "events")
        .and(warp::get())
        .and(with_state.clone())
        .then(|id, s| async move { flatten(events(s, id).await) });
    let delivery = warp::path!("api" / "deliveries" / String)
        .and(warp::get())
        .and(with_state)
        .then(|id, s| async move { flatten(get_delivery(s, id).await) });
    healthz
        .or(metrics)
        .unify()
        .or(runs)
        .unify()
        .or(run)
        .unify()
        .or(log)
        .unify()
        .or(events)
        .unify()
        .or(delivery)
        .unify()
}
