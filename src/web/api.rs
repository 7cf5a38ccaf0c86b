//! The read API: `/healthz`, `/metrics`, `/api/runs`, `/api/runs/{id}`,
//! `/api/runs/{id}/log`, `/api/deliveries/{id}` and the event streams
//! (`/api/runs/{id}/events`, `/api/events`). Only reads the store and the log
//! files; the JSON shapes here are a contract, pinned by tests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use serde_json::{json, Value};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::clock::rfc3339;
use crate::intake::error_reply;
use crate::state::AppState;
use crate::store::{Delivery, ReportView, Run, RunFilter, RunStatus, Step, Store, StoreError};
use crate::web::follow::{self, Cursor, RunsUpdate, Update};
use crate::web::logs::StepLog;
use crate::web::metrics;
use futures_util::StreamExt;
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
        "generation": run.generation,
        "created_at": time(Some(run.created_at)),
        "started_at": time(run.started_at),
        "finished_at": time(run.finished_at),
        "duration_ms": duration_ms(run.started_at, run.finished_at),
        "log_truncated": run.log_dropped > 0,
        "log_dropped_bytes": run.log_dropped,
        "instance": run.instance,
        "timings": run.timings.map(|t| json!({
            "queue_ms": t.queue_ms,
            "fetch_ms": t.fetch_ms,
            "checkout_ms": t.checkout_ms,
            "to_first_step_ms": t.to_first_step_ms,
        })),
    });
    if let Some(steps) = steps {
        v["steps"] = steps.iter().map(step_json).collect();
    }
    v
}

/// A report of a run: where it goes (never a URL held in a secret), whether it went.
fn report_json(r: &ReportView) -> Value {
    json!({
        "target": r.target,
        "state": r.state,
        "reason": r.reason,
        "attempts": r.attempts,
    })
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
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || f(&*store)).await {
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
    let before = match q.get("before").filter(|b| !b.is_empty()) {
        None => None,
        Some(b) => Some(b.parse::<i64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            error_reply(
                StatusCode::BAD_REQUEST,
                "before must be a run id (a number from 1)",
            )
        })?),
    };
    let filter = RunFilter {
        pipeline: q.get("pipeline").filter(|p| !p.is_empty()).cloned(),
        status,
        before,
        // One more than asked: whether it exists says whether there is a next page.
        limit: limit + 1,
    };
    let mut runs = blocking(&state.store, move |s| s.runs(&filter)).await?;
    let more = runs.len() > limit as usize;
    runs.truncate(limit as usize);
    let next_before = runs.last().filter(|_| more).map(|r| r.id);
    let runs: Vec<Value> = runs.iter().map(|r| run_json(r, None)).collect();
    Ok(ok_json(
        &json!({ "runs": runs, "next_before": next_before, "runs_paused": state.paused() }),
    ))
}

async fn get_run(state: Arc<AppState>, id: i64) -> Result<Response, Response> {
    let found = blocking(&state.store, move |s| {
        Ok(match s.run(id)? {
            Some(run) => Some((run, s.steps(id)?, s.reports_of(id)?)),
            None => None,
        })
    })
    .await?;
    let (run, steps, reports) =
        found.ok_or_else(|| error_reply(StatusCode::NOT_FOUND, format!("no run {id}")))?;
    let mut v = run_json(&run, Some(&steps));
    v["reports"] = reports.iter().map(report_json).collect();
    Ok(ok_json(&v))
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
    let (tx, mut rx) = mpsc::channel(4);
    let from = LogsOf {
        store: Arc::clone(&state.store),
        dir,
        run: id,
        attempt: attempt.unwrap_or(current),
    };
    tokio::spawn(send_logs(from, steps, tx));
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok(warp::reply::with_header(
        warp::reply::stream(body),
        "content-type",
        "text/plain; charset=utf-8",
    )
    .into_response())
}

/// How much of a log file is read at a time.
const LOG_CHUNK: usize = 64 * 1024;

/// Where one attempt's step logs are: files in `dir`, or pieces in the store.
struct LogsOf {
    store: Arc<dyn Store>,
    dir: PathBuf,
    run: i64,
    attempt: i64,
}

impl LogsOf {
    /// Up to `LOG_CHUNK` bytes of step `step`'s log from `offset` (see `StepLog::read_at`).
    async fn read(&self, step: i64, offset: u64) -> std::io::Result<Option<Vec<u8>>> {
        let (store, path) = (
            Arc::clone(&self.store),
            self.dir.join(format!("{step}.log")),
        );
        let (run, attempt) = (self.run, self.attempt);
        tokio::task::spawn_blocking(move || {
            StepLog {
                store: &*store,
                path: &path,
                run,
                attempt,
                step,
            }
            .read_at(offset, LOG_CHUNK)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// Each step's header and log text, a piece at a time, so that a large log never sits
/// in memory whole. Stops when the client has gone away.
async fn send_logs(from: LogsOf, steps: Vec<Step>, tx: mpsc::Sender<std::io::Result<Bytes>>) {
    for step in steps {
        // A step that never started has no log; one that ran elsewhere has no file here.
        let first = match from.read(step.number, 0).await {
            Ok(Some(first))
                if !from.store.shares_logs() || step.started_at.is_some() || !first.is_empty() =>
            {
                first
            }
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let header = format!(
            "==> step {}: {} ({})\n",
            step.number,
            step.name,
            step.status.as_str()
        );
        if tx.send(Ok(header.into())).await.is_err() {
            return;
        }
        let mut text = LossyUtf8::default();
        let mut at_line_start = true;
        let mut offset = 0u64;
        let mut next = Some(first);
        loop {
            let buf = match next.take() {
                Some(buf) => buf,
                None => match from.read(step.number, offset).await {
                    Ok(buf) => buf.unwrap_or_default(),
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                },
            };
            let n = buf.len();
            offset += n as u64;
            let piece = if n == 0 {
                text.finish()
            } else {
                text.push(&buf)
            };
            if let Some(last) = piece.as_bytes().last() {
                at_line_start = *last == b'\n';
                if tx.send(Ok(piece.into())).await.is_err() {
                    return;
                }
            }
            if n == 0 {
                break;
            }
        }
        if !at_line_start && tx.send(Ok(Bytes::from_static(b"\n"))).await.is_err() {
            return;
        }
    }
}

/// Decodes UTF-8 that arrives in pieces into the same text `String::from_utf8_lossy`
/// gives for the whole: a character split between two pieces is held back until its
/// end arrives, instead of becoming two replacement characters.
#[derive(Default)]
struct LossyUtf8 {
    /// The start of a character whose end has not arrived yet.
    held: Vec<u8>,
}

impl LossyUtf8 {
    fn push(&mut self, bytes: &[u8]) -> String {
        let mut input = std::mem::take(&mut self.held);
        input.extend_from_slice(bytes);
        let mut out = String::with_capacity(input.len());
        let mut rest = &input[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // Valid, as from_utf8 just said: borrowed as it is, nothing replaced.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            self.held = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// What is still held: the input ended inside a character.
    fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.held)).into_owned()
    }
}

async fn get_delivery(state: Arc<AppState>, id: String) -> Result<Response, Response> {
    let key = id.clone();
    let found = blocking(&state.store, move |s| s.delivery(&key)).await?;
    let d =
        found.ok_or_else(|| error_reply(StatusCode::NOT_FOUND, format!("no delivery {id:?}")))?;
    Ok(ok_json(&delivery_json(&d)))
}

async fn metrics(state: Arc<AppState>) -> Result<Response, Response> {
    let (counts, pending) = blocking(&state.store, |s| {
        Ok((s.count_by_status()?, s.reports_pending()?))
    })
    .await?;
    let text = state.metrics.encode(&counts, pending).map_err(|e| {
        error_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the metrics: {e}"),
        )
    })?;
    Ok(warp::reply::with_header(text, "content-type", metrics::CONTENT_TYPE).into_response())
}

/// `GET /api/runs/{id}/events`: server-sent events for a dashboard: `step_started`,
/// `log` (`{"step", "text"}`), `step_finished`, `run_finished`; the stream ends with
/// the run, or with `stopping` (the run as last seen) when the daemon stops first. A
/// `:keep-alive` comment comes while nothing else does. `from` (a [`Cursor`]) says
/// what of the logs the reader has: a run page has the logs so far, and follows only
/// what comes after. Each event's id is the reader's cursor after it, so a browser
/// that reconnects (sending `Last-Event-ID`) neither misses nor repeats output.
async fn events(
    state: Arc<AppState>,
    id: i64,
    q: HashMap<String, String>,
    last_event_id: Option<String>,
) -> Result<Response, Response> {
    // A reconnecting browser sends the page's `from` again, and its place since then.
    let from = match last_event_id
        .filter(|l| !l.is_empty())
        .or_else(|| q.get("from").cloned())
    {
        None => Cursor::default(),
        Some(text) => Cursor::parse(&text).map_err(|e| {
            error_reply(
                StatusCode::BAD_REQUEST,
                format!("from (or Last-Event-ID): {e}"),
            )
        })?,
    };
    let steps = blocking(&state.store, move |s| {
        s.run(id)?.map(|_| Ok(s.steps(id)?.len())).transpose()
    })
    .await?;
    let Some(steps) = steps else {
        return Err(error_reply(StatusCode::NOT_FOUND, format!("no run {id}")));
    };
    // Only the run's own steps: a place in a step it does not have (an attempt with
    // fewer steps, or a made-up number) means nothing, and costs nothing.
    let from = from.within(i64::try_from(steps).unwrap_or(i64::MAX));
    let updates = follow::follow_from(state, id, &from.pairs())
        .map_err(|e| error_reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let reader = EventReader {
        cursor: from,
        text: HashMap::new(),
    };
    let stream =
        futures_util::stream::unfold((updates, reader), |(mut rx, mut reader)| async move {
            let update = rx.recv().await?;
            let events = reader.events(update);
            Some((events, (rx, reader)))
        })
        .flat_map(|events| {
            futures_util::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>))
        });
    Ok(warp::sse::reply(stream).into_response())
}

/// `GET /api/events`: server-sent events for the runs tables: `run` (the run, without
/// steps) whenever a run is queued, starts or ends, and `lagged` when the reader fell
/// behind and missed some (look again at the runs); `stopping` ends the stream when the
/// daemon stops. A `:keep-alive` comment comes while nothing else does.
async fn all_events(state: Arc<AppState>) -> Result<Response, Response> {
    let updates = follow::watch_runs(state)
        .map_err(|e| error_reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let stream = futures_util::stream::unfold(updates, |mut rx| async move {
        let event = match rx.recv().await? {
            RunsUpdate::Run(run) => Event::default()
                .event("run")
                .data(run_json(&run, None).to_string()),
            RunsUpdate::Lagged => Event::default().event("lagged").data("{}"),
            RunsUpdate::KeepAlive => Event::default().comment("keep-alive"),
            RunsUpdate::Stopping => Event::default().event("stopping").data("{}"),
        };
        Some((Ok::<_, std::convert::Infallible>(event), rx))
    });
    Ok(warp::sse::reply(stream).into_response())
}

/// One event stream's reader: where it is in each step's log, and each step's text
/// decoded so far (a character cut between two pieces of output is held back until
/// its end comes, instead of becoming two replacement characters).
struct EventReader {
    cursor: Cursor,
    text: HashMap<i64, LossyUtf8>,
}

impl EventReader {
    fn events(&mut self, update: Update) -> Vec<Event> {
        match update {
            Update::StepStarted(step) => {
                if self.cursor.get(step.number).is_none() {
                    self.cursor.set(step.number, 0);
                }
                vec![self.event("step_started", step_json(&step))]
            }
            Update::Output { step, bytes, end } => {
                let decoder = self.text.entry(step).or_default();
                let text = decoder.push(&bytes);
                self.cursor.set(step, end - decoder.held.len() as u64);
                if text.is_empty() {
                    return Vec::new();
                }
                vec![self.event("log", json!({ "step": step, "text": text }))]
            }
            Update::StepFinished(step) => {
                let mut out = Vec::new();
                // The step ended inside a character: what is held is all there is.
                if let Some(mut decoder) = self.text.remove(&step.number) {
                    let held = decoder.held.len() as u64;
                    let text = decoder.finish();
                    if !text.is_empty() {
                        let at = self.cursor.get(step.number).unwrap_or(0);
                        self.cursor.set(step.number, at + held);
                        let number = step.number;
                        out.push(self.event("log", json!({ "step": number, "text": text })));
                    }
                }
                out.push(self.event("step_finished", step_json(&step)));
                out
            }
            Update::RunFinished(run) => vec![self.event("run_finished", run_json(&run, None))],
            Update::KeepAlive => vec![Event::default().comment("keep-alive")],
            Update::Stopping(run) => vec![self.event("stopping", run_json(&run, None))],
        }
    }

    fn event(&self, name: &str, data: Value) -> Event {
        Event::default()
            .event(name)
            .id(self.cursor.to_string())
            .data(data.to_string())
    }
}

/// A handler's answer, whether it succeeded or refused.
pub(crate) fn flatten(r: Result<Response, Response>) -> Response {
    r.unwrap_or_else(|e| e)
}

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = warp::any().map(move || Arc::clone(&state));
    // Up while runs are paused: webhooks are still taken, and a restart frees no space.
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .and(with_state.clone())
        .map(|s: Arc<AppState>| ok_json(&json!({ "ok": true, "runs_paused": s.paused() })));
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
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::optional::<String>("last-event-id"))
        .then(|id, s, q, last| async move { flatten(events(s, id, q, last).await) });
    let all_events = warp::path!("api" / "events")
        .and(warp::get())
        .and(with_state.clone())
        .then(|s| async move { flatten(all_events(s).await) });
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
        .or(all_events)
        .unify()
        .or(delivery)
        .unify()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_text_decoded_in_pieces_is_the_text_of_the_whole() {
        let cases: [&[u8]; 7] = [
            b"plain ascii\n",
            "h\u{e9}llo w\u{f6}rld \u{1f600} \u{4e2d}\u{6587}\n".as_bytes(),
            b"bad \xff byte and \xc3\x28 pair",
            b"cut at the end \xe2\x82",
            b"\xf0\x9f\x98",
            b"\xed\xa0\x80 surrogate, \xf4\x90\x80\x80 too high",
            b"",
        ];
        for whole in cases {
            let expected = String::from_utf8_lossy(whole);
            // Every way of cutting the bytes in two, and one byte at a time.
            for cut in 0..=whole.len() {
                let mut d = LossyUtf8::default();
                let text = d.push(&whole[..cut]) + &d.push(&whole[cut..]) + &d.finish();
                assert_eq!(text, expected, "{whole:?} cut at {cut}");
            }
            let mut d = LossyUtf8::default();
            let mut text: String = whole.iter().map(|b| d.push(&[*b])).collect();
            text += &d.finish();
            assert_eq!(text, expected, "{whole:?} byte by byte");
        }
    }
}
