//! The dashboard's pages, rendered on the server from the store's reads: `/` (runs),
//! `/runs/{id}`, `/pipelines`, `/pipelines/{name}` and `/deliveries/{id}`, plus the
//! stylesheet and script they load. Readable without JavaScript; the script only
//! makes the live parts live (a running run's log over its event stream, and the
//! runs table's queued and running rows).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use maud::{html, Markup};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::clock::{now_ms, rfc3339};
use crate::pipeline::pattern::PatternList;
use crate::pipeline::Pipeline;
use crate::state::AppState;
use crate::store::{Delivery, Run, RunFilter, RunStatus, Step, StepStatus, StoreError};
use crate::web::ansi;
use crate::web::auth::{self, Access};
use crate::web::follow::{self, Cursor};
use crate::web::logs::StepLog;
use crate::web::render::{
    self, commit, csrf_field, page, problem, runs_table, short_ref, status, took, when, Viewer,
};

const PAGE_SIZE: u32 = 50;
/// The most of a step's log a run page shows; the whole log is at `/api/runs/{id}/log`.
const LOG_TAIL: u64 = 512 * 1024;

const STYLESHEET: &str = include_str!("assets/hookci.css");
const SCRIPT: &str = include_str!("assets/hookci.js");

pub fn viewer(state: &AppState, headers: &HeaderMap) -> Viewer {
    let access = auth::access(&state.config(), headers);
    let has_token = state.config().api_token.is_some() || state.config().read_token.is_some();
    Viewer {
        access,
        csrf: (access == Access::Write)
            .then(|| auth::csrf_token(&state.config()))
            .flatten(),
        can_log_in: has_token && access < Access::Write,
        logged_in: auth::has_session(headers),
    }
}

/// Runs a store read on a blocking thread; a failure becomes an error page.
async fn read<T: Send + 'static>(
    state: &Arc<AppState>,
    viewer: &Viewer,
    f: impl FnOnce(&AppState) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    let s = Arc::clone(state);
    match tokio::task::spawn_blocking(move || f(&s)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "store read for a page failed");
            Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                viewer,
                "The store failed; reload to retry.",
            ))
        }
        Err(e) => Err(problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            viewer,
            &format!("page task failed: {e}"),
        )),
    }
}

/// `/` and `/pipelines/{name}`: the filters of a runs list, checked.
fn runs_filter(q: &HashMap<String, String>, pipeline: Option<String>) -> Result<RunFilter, String> {
    let status = match q.get("status").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| format!("unknown status {s:?}"))?),
    };
    let before = match q.get("before").filter(|b| !b.is_empty()) {
        None => None,
        Some(b) => Some(
            b.parse::<i64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("before must be a run id, not {b:?}"))?,
        ),
    };
    Ok(RunFilter {
        pipeline: pipeline.or_else(|| q.get("pipeline").filter(|p| !p.is_empty()).cloned()),
        status,
        before,
        limit: PAGE_SIZE + 1,
    })
}

/// A page of runs and, when there are more, the id the next page starts before.
async fn runs_page_of(
    state: &Arc<AppState>,
    viewer: &Viewer,
    filter: RunFilter,
) -> Result<(Vec<Run>, Option<i64>), Response> {
    let mut runs = read(state, viewer, move |s| s.store.runs(&filter)).await?;
    let more = runs.len() > PAGE_SIZE as usize;
    runs.truncate(PAGE_SIZE as usize);
    let next = runs.last().filter(|_| more).map(|r| r.id);
    Ok((runs, next))
}

fn paging(base: &str, q: &HashMap<String, String>, next: Option<i64>) -> Markup {
    let keep: Vec<String> = ["pipeline", "status"]
        .iter()
        .filter_map(|k| q.get(*k).filter(|v| !v.is_empty()).map(|v| (k, v)))
        .map(|(k, v)| format!("{k}={}", auth::encode_query(v)))
        .collect();
    let link = |before: Option<i64>| {
        let mut parts = keep.clone();
        if let Some(b) = before {
            parts.push(format!("before={b}"));
        }
        if parts.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", parts.join("&"))
        }
    };
    html! {
        nav.paging {
            @if q.get("before").is_some_and(|b| !b.is_empty()) {
                a href=(link(None)) { "← newest" }
            }
            @if let Some(n) = next {
                a href=(link(Some(n))) rel="next" { "older →" }
            }
        }
    }
}

async fn runs(state: Arc<AppState>, headers: HeaderMap, q: HashMap<String, String>) -> Response {
    let viewer = viewer(&state, &headers);
    let filter = match runs_filter(&q, None) {
        Ok(f) => f,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &viewer, &e),
    };
    let (runs, next) = match runs_page_of(&state, &viewer, filter.clone()).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let pipelines = state.pipelines();
    let chosen = filter.pipeline.clone().unwrap_or_default();
    let chosen_status = filter.status.map(RunStatus::as_str).unwrap_or_default();
    let body = html! {
        h1 { "Runs" }
        form.filters method="get" action="/" {
            label { "pipeline "
                select name="pipeline" {
                    option value="" { "all" }
                    @for p in pipelines.iter() {
                        option value=(p.name) selected[p.name == chosen] { (p.name) }
                    }
                }
            }
            label { "status "
                select name="status" {
                    option value="" { "all" }
                    @for st in RunStatus::ALL {
                        option value=(st.as_str()) selected[st.as_str() == chosen_status] { (st.as_str()) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        div data-refresh[filter.before.is_none()] { (runs_table(&state.config(), &runs, now_ms())) }
        (paging("/", &q, next))
    };
    page(StatusCode::OK, "Runs", &viewer, body)
}

/// What a run page shows of a step's log.
#[derive(Default)]
struct Shown {
    text: String,
    /// The start was cut: the page shows only the end.
    cut: bool,
    /// Where the text shown ends in the log file: the page follows from there.
    end: u64,
}

/// The end of a step's log, up to [`LOG_TAIL`]. For a step that is still writing
/// (`whole_lines`), only up to its last complete line: the rest, which may end inside
/// a character or a colour code, comes over the event stream from `end`.
fn log_tail(log: StepLog<'_>, whole_lines: bool) -> Shown {
    let nothing = Shown {
        text: String::new(),
        cut: false,
        end: 0,
    };
    let (start, mut bytes) = match std::fs::File::open(log.path) {
        Ok(mut file) => {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let start = len.saturating_sub(LOG_TAIL);
            if start > 0 && file.seek(SeekFrom::Start(start)).is_err() {
                return nothing;
            }
            let mut bytes = Vec::new();
            if file.take(LOG_TAIL).read_to_end(&mut bytes).is_err() {
                return nothing;
            }
            (start, bytes)
        }
        // Another instance ran the step: the store has its log.
        Err(_) => match log.stored_tail(LOG_TAIL) {
            Ok(Some(tail)) => tail,
            _ => return nothing,
        },
    };
    let cut = start > 0;
    if whole_lines {
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(keep);
    }
    let end = start + bytes.len() as u64;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    match (cut, text.find('\n')) {
        // Starts mid-line: begin at the next whole line.
        (true, Some(nl)) => Shown {
            text: text[nl + 1..].to_owned(),
            cut: true,
            end,
        },
        _ => Shown { text, cut, end },
    }
}

/// A step the follower counts as started: the page has its log so far.
fn reached(step: &Step) -> bool {
    !matches!(step.status, StepStatus::Pending) && step.started_at.is_some()
}

fn step_end(step: &Step) -> String {
    match (step.exit_code, step.signal) {
        (_, Some(sig)) => format!("signal {sig}"),
        (Some(code), None) => format!("exit {code}"),
        _ => String::new(),
    }
}

type RunView = (Run, Vec<Step>, Vec<Shown>, Option<Delivery>);

async fn run_page(state: Arc<AppState>, headers: HeaderMap, id: i64) -> Response {
    let viewer = viewer(&state, &headers);
    let found = read(
        &state,
        &viewer,
        move |s| -> Result<Option<RunView>, StoreError> {
            let Some(run) = s.store.run(id)? else {
                return Ok(None);
            };
            let steps = s.store.steps(id)?;
            let logs = steps
                .iter()
                .map(|st| {
                    // A step read as pending shows nothing, even if it started since:
                    // the stream, not given its place, sends its log from the start.
                    if !reached(st) {
                        return Shown::default();
                    }
                    let writing = matches!(st.status, StepStatus::Running);
                    let path = s.log_path(id, st.number);
                    let log = StepLog {
                        store: &*s.store,
                        path: &path,
                        run: id,
                        attempt: run.attempt,
                        step: st.number,
                    };
                    log_tail(log, writing)
                })
                .collect();
            let delivery = match &run.delivery {
                Some(d) => s.store.delivery(d)?,
                None => None,
            };
            Ok(Some((run, steps, logs, delivery)))
        },
    )
    .await;
    let (run, steps, logs, delivery) = match found {
        Ok(Some(v)) => v,
        Ok(None) => return problem(StatusCode::NOT_FOUND, &viewer, &format!("No run {id}.")),
        Err(e) => return e,
    };
    let now = now_ms();
    let live = !run.status.is_final();
    // The page has each started step's log up to its end; the stream sends the rest.
    let mut from = Cursor::default();
    for (st, shown) in steps.iter().zip(&logs) {
        if reached(st) {
            from.set(st.number, shown.end);
        }
    }
    let events = format!("/api/runs/{}/events?from={from}", run.id);
    let body = html! {
        div.run data-run=(run.id) data-live[live] data-events=[live.then_some(&events)] {
            h1 { "Run #" (run.id) " " span #run-status { (status(run.status.as_str())) } }
            dl.facts {
                dt { "pipeline" } dd { a href={ "/pipelines/" (auth::encode_query(&run.pipeline)) } { (run.pipeline) } }
                dt { "repository" } dd { (run.repo) }
                dt { "ref" } dd { (short_ref(&run.git_ref)) }
                dt { "commit" } dd { (commit(&state.config(), &run)) }
                dt { "trigger" } dd {
                    (run.trigger)
                    @if let Some(d) = &run.delivery {
                        " (delivery " a href={ "/deliveries/" (auth::encode_query(d)) } { (d) } ")"
                    }
                }
                @if run.attempt > 1 || run.generation > 1 {
                    dt { "attempt" } dd { (run.attempt) ", generation " (run.generation) }
                }
                dt { "queued" } dd { (when(run.created_at, now)) }
                dt { "duration" } dd #run-duration { (took(run.started_at, run.finished_at, now)) }
            }
            p.reason #run-reason hidden[run.reason.is_none()] { (run.reason.clone().unwrap_or_default()) }
            (actions(&state, &viewer, &run))
            h2 { "Steps" }
            @if steps.is_empty() {
                p.empty #no-steps { "No steps yet." }
            }
            div.scroll {
                table.steps {
                    thead { tr { th { "#" } th { "step" } th { "status" } th { "end" } th { "duration" } th { "reason" } } }
                    tbody #steps {
                        @for st in &steps {
                            tr #{ "step-" (st.number) } {
                                td { (st.number) }
                                td { a href={ "#log-" (st.number) } { (st.name) } }
                                td.status { (status(st.status.as_str())) }
                                td.end { (step_end(st)) }
                                td.took { (took(st.started_at, st.finished_at, now)) }
                                td.why { (st.reason.clone().unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
            h2 { "Log" }
            p { a href={ "/api/runs/" (run.id) "/log" } { "plain text" } }
            div #logs {
                @for (st, shown) in steps.iter().zip(&logs) {
                    @let (log, style) = ansi::to_html_and_style(&shown.text);
                    // A running step's colours go on in the output that follows.
                    @let going_on = live && matches!(st.status, StepStatus::Running);
                    section.log #{ "log-" (st.number) } data-sgr=[going_on.then_some(&style)] {
                        h3 { (st.number) ". " (st.name) }
                        @if shown.cut {
                            p.cut { "Earlier output is not shown here; the plain text has all of it." }
                        }
                        pre { (render::trusted(log)) }
                    }
                }
            }
            p.note #stopping hidden { "hookci is stopping; reload this page once it is back." }
            p.note #refused hidden {
                "hookci refused to stream this run live (most often because it already follows "
                (follow::MAX_FOLLOWERS) " logs at once): the log above stops where the page was loaded. Reload to try again."
            }
            @if let Some(d) = &delivery {
                h2 { "Delivery " a href={ "/deliveries/" (auth::encode_query(&d.id)) } { (d.id) } }
                (decisions(d))
            }
        }
    };
    page(StatusCode::OK, &format!("Run #{id}"), &viewer, body)
}

/// Cancel (while it runs) and rerun (once it ended): both are rendered, the script
/// swaps them when the run ends.
fn actions(state: &AppState, viewer: &Viewer, run: &Run) -> Markup {
    let live = !run.status.is_final();
    html! {
        div.actions {
            @if viewer.can_change() {
                form #cancel method="post" action={ "/runs/" (run.id) "/cancel" } hidden[!live] {
                    (csrf_field(viewer))
                    button.danger type="submit" { "Cancel" }
                }
                @if state.pipelines().get(&run.pipeline).is_some() {
                    form #rerun method="post" action={ "/runs/" (run.id) "/rerun" } hidden[live] {
                        (csrf_field(viewer))
                        button type="submit" { "Rerun" }
                    }
                }
            } @else if state.config().api_token.is_some() {
                p.note { a href={ "/login?next=/runs/" (run.id) } { "Log in with the API token" } " to cancel or rerun." }
            }
        }
    }
}

fn decisions(d: &Delivery) -> Markup {
    html! {
        div.scroll {
            table.decisions {
                thead { tr { th { "pipeline" } th { "outcome" } th { "why" } th { "run" } } }
                tbody {
                    @for x in &d.decisions {
                        tr {
                            td { @if let Some(p) = &x.pipeline { a href={ "/pipelines/" (auth::encode_query(p)) } { (p) } } @else { "—" } }
                            td { (status(&x.outcome)) }
                            td { (x.reason) }
                            td { @if let Some(r) = x.run_id { a href={ "/runs/" (r) } { "#" (r) } } }
                        }
                    }
                }
            }
        }
    }
}

fn patterns(list: &Option<PatternList>) -> String {
    list.as_ref().map_or_else(String::new, |l| {
        l.patterns()
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    })
}

fn triggers(p: &Pipeline) -> Markup {
    let on = &p.on;
    html! {
        @if on.branches.is_none() && on.tags.is_none() {
            span { "every branch" }
        }
        @if on.branches.is_some() {
            span { "branches: " code { (patterns(&on.branches)) } " " }
        }
        @if on.tags.is_some() {
            span { "tags: " code { (patterns(&on.tags)) } " " }
        }
        @if on.paths.is_some() {
            span { "paths: " code { (patterns(&on.paths)) } }
        }
    }
}

async fn pipelines(state: Arc<AppState>, headers: HeaderMap) -> Response {
    let viewer = viewer(&state, &headers);
    let latest = match read(&state, &viewer, |s| s.store.latest_per_ref()).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let mut by_pipeline: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for run in &latest {
        by_pipeline.entry(&run.pipeline).or_default().push(run);
    }
    let now = now_ms();
    let set = state.pipelines();
    let body = html! {
        h1 { "Pipelines" }
        @if set.is_empty() { p.empty { "No pipelines are loaded." } }
        @for p in set.iter() {
            section.pipeline {
                h2 { a href={ "/pipelines/" (auth::encode_query(&p.name)) } { (p.name) } }
                p { (p.repo.to_string()) " · " (triggers(p)) }
                @let runs = by_pipeline.get(p.name.as_str()).cloned().unwrap_or_default();
                @if runs.is_empty() {
                    p.empty { "No runs yet." }
                } @else {
                    ul.latest {
                        @for run in runs {
                            li {
                                (short_ref(&run.git_ref)) " "
                                (status(run.status.as_str())) " "
                                a href={ "/runs/" (run.id) } { "#" (run.id) } " "
                                (when(run.created_at, now))
                            }
                        }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, "Pipelines", &viewer, body)
}

async fn pipeline(
    state: Arc<AppState>,
    headers: HeaderMap,
    name: String,
    q: HashMap<String, String>,
) -> Response {
    let viewer = viewer(&state, &headers);
    let Some(p) = state.pipelines().get(&name).cloned() else {
        return problem(
            StatusCode::NOT_FOUND,
            &viewer,
            &format!("No pipeline {name:?}."),
        );
    };
    let filter = match runs_filter(&q, Some(name.clone())) {
        Ok(f) => f,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &viewer, &e),
    };
    let (runs, next) = match runs_page_of(&state, &viewer, filter.clone()).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let body = html! {
        h1 { "Pipeline " (p.name) }
        p { (p.repo.to_string()) " · " (triggers(&p)) }
        ol.stepnames { @for st in &p.steps { li { (st.name) } } }
        @if viewer.can_change() {
            form.runnow method="post" action={ "/pipelines/" (auth::encode_query(&p.name)) "/run" } {
                (csrf_field(&viewer))
                label { "ref " input name="ref" required placeholder="main" value="main"; }
                label { "commit " input name="sha" placeholder="newest" pattern="[0-9a-fA-F]{40}"; }
                button type="submit" { "Run now" }
            }
        } @else if state.config().api_token.is_some() {
            p.note { a href={ "/login?next=/pipelines/" (auth::encode_query(&p.name)) } { "Log in with the API token" } " to run it now." }
        }
        h2 { "Recent runs" }
        div data-refresh[filter.before.is_none()] { (runs_table(&state.config(), &runs, now_ms())) }
        (paging(&format!("/pipelines/{}", auth::encode_query(&p.name)), &q, next))
    };
    page(StatusCode::OK, &p.name, &viewer, body)
}

async fn delivery(state: Arc<AppState>, headers: HeaderMap, id: String) -> Response {
    let viewer = viewer(&state, &headers);
    let key = id.clone();
    let d = match read(&state, &viewer, move |s| s.store.delivery(&key)).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                &viewer,
                &format!("No delivery {id:?}."),
            )
        }
        Err(e) => return e,
    };
    let body = html! {
        h1 { "Delivery " (d.id) }
        dl.facts {
            dt { "event" } dd { (d.event) }
            dt { "repository" } dd { (d.repo) }
            dt { "ref" } dd { (short_ref(&d.git_ref)) }
            dt { "after" } dd { code { (d.after) } }
            dt { "received" } dd { time datetime=(rfc3339(d.received_at)) { (rfc3339(d.received_at)) } }
        }
        h2 { "Why each pipeline did or did not run" }
        (decisions(&d))
    };
    page(StatusCode::OK, &format!("Delivery {id}"), &viewer, body)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = Response::new(body.into());
    let h = r.headers_mut();
    h.insert(
        "content-type",
        warp::http::HeaderValue::from_static(content_type),
    );
    // The links carry the version, so a cached copy is never stale.
    h.insert(
        "cache-control",
        warp::http::HeaderValue::from_static("public, max-age=86400"),
    );
    r
}

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let headers = warp::header::headers_cloned();
    let query = warp::query::<HashMap<String, String>>();
    let index = warp::path::end()
        .and(warp::get())
        .and(with_state.clone())
        .and(headers)
        .and(query)
        .then(runs);
    let run = warp::path!("runs" / i64)
        .and(warp::get())
        .and(with_state.clone())
        .and(headers)
        .then(|id, s, h| run_page(s, h, id));
    let pipelines = warp::path!("pipelines")
        .and(warp::get())
        .and(with_state.clone())
        .and(headers)
        .then(pipelines);
    let pipeline = warp::path!("pipelines" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and(headers)
        .and(query)
        .then(|name: String, s, h, q| async move {
            match percent_decode(&name) {
                Some(name) => pipeline(s, h, name, q).await,
                None => {
                    warp::reply::with_status("bad name", StatusCode::BAD_REQUEST).into_response()
                }
            }
        });
    let delivery = warp::path!("deliveries" / String)
        .and(warp::get())
        .and(with_state)
        .and(headers)
        .then(|id: String, s, h| async move {
            match percent_decode(&id) {
                Some(id) => delivery(s, h, id).await,
                None => warp::reply::with_status("bad id", StatusCode::BAD_REQUEST).into_response(),
            }
        });
    let css = warp::path!("assets" / "hookci.css")
        .and(warp::get())
        .map(|| asset(STYLESHEET, "text/css; charset=utf-8"));
    let js = warp::path!("assets" / "hookci.js")
        .and(warp::get())
        .map(|| asset(SCRIPT, "text/javascript; charset=utf-8"));
    index
        .or(run)
        .unify()
        .or(pipelines)
        .unify()
        .or(pipeline)
        .unify()
        .or(delivery)
        .unify()
        .or(css)
        .unify()
        .or(js)
        .unify()
}

/// A path segment as written before percent-encoding; `None` if it is not UTF-8.
pub fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}
