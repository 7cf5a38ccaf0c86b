//! `GET /badge/{pipeline}.svg?ref=main`: an SVG badge of the pipeline's last run that
//! ran to an end, skipped runs passed over (on that branch or tag when `ref` is given). Public, read token or not, so a
//! README can show it; cached briefly, so it follows new runs.

use std::collections::HashMap;
use std::sync::Arc;

use maud::html;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::state::AppState;
use crate::store::RunStatus;
use crate::web::pages::percent_decode;

/// Short enough that a badge catches up with a run within a minute.
const CACHE: &str = "public, max-age=60, must-revalidate";

fn colour(status: Option<RunStatus>) -> &'static str {
    match status {
        Some(RunStatus::Succeeded) => "#2e7d32",
        Some(RunStatus::Failed | RunStatus::TimedOut) => "#c62828",
        Some(RunStatus::Canceled) => "#8d6e00",
        _ => "#6b6b6b",
    }
}

/// An estimate of a text's width in the badge's 11 px sans-serif, enough for a box.
fn width(text: &str) -> usize {
    text.chars().count() * 7 + 12
}

pub fn svg(label: &str, message: &str, fill: &str) -> String {
    let (lw, mw) = (width(label), width(message));
    let total = lw + mw;
    html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(total) height="20" role="img"
            aria-label={ (label) ": " (message) } {
            title { (label) ": " (message) }
            rect width=(lw) height="20" fill="#555" {}
            rect x=(lw) width=(mw) height="20" fill=(fill) {}
            g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" {
                text x=(lw / 2) y="14" { (label) }
                text x=(lw + mw / 2) y="14" { (message) }
            }
        }
    }
    .into_string()
}

async fn badge(state: Arc<AppState>, file: String, q: HashMap<String, String>) -> Response {
    let reply = |status: StatusCode, body: String| {
        let mut r = warp::reply::with_status(body, status).into_response();
        let h = r.headers_mut();
        h.insert("content-type", HeaderValue::from_static("image/svg+xml"));
        h.insert("cache-control", HeaderValue::from_static(CACHE));
        r
    };
    let Some(name) = file.strip_suffix(".svg").and_then(percent_decode) else {
        return reply(
            StatusCode::NOT_FOUND,
            svg("hookci", "no such badge", colour(None)),
        );
    };
    if state.pipelines().get(&name).is_none() {
        return reply(
            StatusCode::NOT_FOUND,
            svg(&name, "no such pipeline", colour(None)),
        );
    }
    let refs = match q.get("ref").map(|r| r.trim()).filter(|r| !r.is_empty()) {
        None => Vec::new(),
        Some(r) if r.starts_with("refs/") => vec![r.to_owned()],
        Some(r) => vec![format!("refs/heads/{r}"), format!("refs/tags/{r}")],
    };
    let store = Arc::clone(&state.store);
    let key = name.clone();
    let last = tokio::task::spawn_blocking(move || store.last_finished(&key, &refs)).await;
    match last {
        Ok(Ok(run)) => {
            let status = run.map(|r| r.status);
            let word = status.map_or("no runs", RunStatus::as_str);
            reply(StatusCode::OK, svg(&name, word, colour(status)))
        }
        Ok(Err(e)) => {
            tracing::error!(pipeline = %name, error = %e, "badge read failed");
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                svg(&name, "unavailable", colour(None)),
            )
        }
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            svg(&name, "unavailable", colour(None)),
        ),
    }
}

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("badge" / String)
        .and(warp::get())
        .and(warp::any().map(move || Arc::clone(&state)))
        .and(warp::query::<HashMap<String, String>>())
        .then(|file, state, q| badge(state, file, q))
}
