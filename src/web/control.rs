//! The write API: cancel, rerun and trigger runs, and reload config and pipelines.
//! Enabled only when an API token is
//! configured; every call needs `Authorization: Bearer <token>`, compared in constant
//! time. Decisions go through the store like any other; steps are stopped through the
//! scheduler's stop switches.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::git::repo::RepoName;
use crate::intake::{concurrency_group, error_reply};
use crate::run::scheduler::{self, Canceled};
use crate::state::AppState;
use crate::store::{NewRun, Run, RunStatus, Supersede};
use crate::web::api::{blocking, flatten, run_json};

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// Compares two secrets in time independent of where they differ (and of their
/// lengths: both are hashed first).
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// The refusal, unless the request carries the configured API token.
fn refusal(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let config = state.config();
    let Some(token) = &config.api_token else {
        return Some(error_reply(
            StatusCode::FORBIDDEN,
            "the write API is disabled: configure api_token_file or HOOKCI_API_TOKEN",
        ));
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme name is case-insensitive (RFC 9110).
        .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then_some(token))
        .unwrap_or_default();
    if same_secret(given.trim().as_bytes(), token.expose().as_bytes()) {
        None
    } else {
        Some(error_reply(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token (Authorization: Bearer ...)",
        ))
    }
}

async fn load_run(state: &AppState, id: i64) -> Result<Run, Response> {
    blocking(&state.store, move |s| s.run(id))
        .await?
        .ok_or_else(|| error_reply(StatusCode::NOT_FOUND, format!("no run {id}")))
}

async fn run_reply(state: &AppState, id: i64, status: StatusCode) -> Result<Response, Response> {
    let run = load_run(state, id).await?;
    let steps = blocking(&state.store, move |s| s.steps(id)).await?;
    Ok(
        warp::reply::with_status(warp::reply::json(&run_json(&run, Some(&steps))), status)
            .into_response(),
    )
}

async fn cancel(state: Arc<AppState>, id: i64) -> Result<Response, Response> {
    cancel_run(&state, id, "canceled through the API").await?;
    run_reply(&state, id, StatusCode::ACCEPTED).await
}

/// Cancels run `id` (the API's and the dashboard's button); the refusal as the API
/// gives it.
pub(crate) async fn cancel_run(state: &AppState, id: i64, reason: &str) -> Result<(), Response> {
    match scheduler::cancel(state, id, reason.to_owned()).await {
        Ok(Canceled::Applied) => {
            tracing::info!(run = id, "cancel requested");
            Ok(())
        }
        Ok(Canceled::TooLate(status)) => Err(warp::reply::with_status(
            warp::reply::json(&json!({
                "error": format!("run {id} already ended ({})", status.as_str()),
                "status": status,
            })),
            StatusCode::CONFLICT,
        )
        .into_response()),
        Ok(Canceled::NoSuchRun) => Err(error_reply(StatusCode::NOT_FOUND, format!("no run {id}"))),
        Err(e) => {
            tracing::error!(run = id, error = %e, "cancel failed");
            Err(error_reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
        }
    }
}

/// A run like `old`, explicit: the per-commit lock does not stop it.
fn explicit_run(old: &Run, trigger: &'static str, generation: i64, state: &AppState) -> NewRun {
    let group = state
        .pipelines()
        .get(&old.pipeline)
        .and_then(|p| concurrency_group(p, &old.git_ref));
    NewRun {
        key: None,
        group,
        supersede: Supersede::Nothing,
        supersede_own_ref: false,
        generation,
        pipeline: old.pipeline.clone(),
        repo: old.repo.clone(),
        git_ref: old.git_ref.clone(),
        commit: old.commit.clone(),
        before: old.before.clone(),
        clone_url: old.clone_url.clone(),
        trigger,
        skipped: None,
    }
}

async fn rerun(state: Arc<AppState>, id: i64) -> Result<Response, Response> {
    let made = rerun_run(&state, id).await?;
    run_reply(&state, made, StatusCode::CREATED).await
}

/// Queues a rerun of run `id`; the new run's id.
pub(crate) async fn rerun_run(state: &AppState, id: i64) -> Result<i64, Response> {
    let old = load_run(state, id).await?;
    if state.pipelines().get(&old.pipeline).is_none() {
        return Err(error_reply(
            StatusCode::CONFLICT,
            format!("pipeline {:?} no longer exists", old.pipeline),
        ));
    }
    let new = explicit_run(&old, "rerun", old.generation + 1, state);
    let made = blocking(&state.store, move |s| s.create_run(new)).await?;
    state.events.runs_changed(made.changed);
    state.wake.notify_one();
    tracing::info!(run = made.id, of = id, "rerun queued");
    Ok(made.id)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    sha: Option<String>,
}

async fn trigger(
    state: Arc<AppState>,
    name: String,
    body: bytes::Bytes,
) -> Result<Response, Response> {
    let body: TriggerBody = serde_json::from_slice(&body).map_err(|e| {
        error_reply(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"ref\": \"main\", \"sha\": optional}}: {e}"),
        )
    })?;
    let made = trigger_run(&state, &name, &body.git_ref, body.sha).await?;
    run_reply(&state, made, StatusCode::CREATED).await
}

/// Queues a manual run of pipeline `name` on `git_ref` (a branch name or a full
/// ref), at `sha` or else the ref's newest commit; the new run's id.
pub(crate) async fn trigger_run(
    state: &AppState,
    name: &str,
    git_ref: &str,
    sha: Option<String>,
) -> Result<i64, Response> {
    let pipeline = state
        .pipelines()
        .get(name)
        .cloned()
        .ok_or_else(|| error_reply(StatusCode::NOT_FOUND, format!("no pipeline {name:?}")))?;
    let git_ref = if git_ref.starts_with("refs/") {
        git_ref.to_owned()
    } else {
        format!("refs/heads/{git_ref}")
    };
    if !(git_ref.starts_with("refs/heads/") || git_ref.starts_with("refs/tags/"))
        || git_ref.contains("..")
    {
        return Err(error_reply(
            StatusCode::BAD_REQUEST,
            format!("{git_ref:?} is not a branch or tag"),
        ));
    }
    let repo: RepoName = pipeline.repo.clone();
    let clone_url = match pipeline.clone_url.clone() {
        Some(url) => url,
        None => {
            let r = repo.to_string();
            blocking(&state.store, move |s| s.clone_url_of(&r))
                .await?
                .ok_or_else(|| {
                    error_reply(
                    StatusCode::CONFLICT,
                    "no clone URL known for this repository yet: set clone_url or wait for a push",
                )
                })?
        }
    };
    let sha = match sha {
        Some(sha) if sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()) => {
            sha.to_ascii_lowercase()
        }
        Some(sha) => {
            return Err(error_reply(
                StatusCode::BAD_REQUEST,
                format!("{sha:?} is not a full commit id"),
            ))
        }
        None => {
            let (url, wanted) = (clone_url.clone(), git_ref.clone());
            let heads = state
                .git
                .remote_heads(&url)
                .await
                .map_err(|e| error_reply(StatusCode::BAD_GATEWAY, e))?;
            heads
                .into_iter()
                .find(|(r, _)| *r == wanted)
                .map(|(_, sha)| sha)
                .ok_or_else(|| {
                    error_reply(
                        StatusCode::NOT_FOUND,
                        format!("{wanted} does not exist in {clone_url}"),
                    )
                })?
        }
    };
    let template = Run {
        id: 0,
        pipeline: pipeline.name.clone(),
        repo: repo.to_string(),
        git_ref,
        commit: sha,
        before: ZERO_SHA.to_owned(),
        clone_url,
        trigger: "manual".into(),
        delivery: None,
        status: RunStatus::Queued,
        reason: None,
        attempt: 1,
        generation: 1,
        created_at: 0,
        started_at: None,
        finished_at: None,
        log_dropped: 0,
        instance: None,
        timings: None,
    };
    let new = explicit_run(&template, "manual", 1, state);
    let made = blocking(&state.store, move |s| s.create_run(new)).await?;
    state.events.runs_changed(made.changed);
    state.wake.notify_one();
    tracing::info!(run = made.id, pipeline = %name, "manual run queued");
    Ok(made.id)
}

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let authorized = warp::post()
        .and(warp::header::headers_cloned())
        .and(with_state)
        .and_then(|headers: HeaderMap, state: Arc<AppState>| async move {
            match refusal(&state, &headers) {
                None => Ok::<_, Rejection>(Ok(state)),
                Some(denied) => Ok(Err(denied)),
            }
        });
    let cancel = warp::path!("api" / "runs" / i64 / "cancel")
        .and(authorized.clone())
        .then(|id, s: Result<Arc<AppState>, Response>| async move {
            match s {
                Ok(s) => flatten(cancel(s, id).await),
                Err(denied) => denied,
            }
        });
    let rerun = warp::path!("api" / "runs" / i64 / "rerun")
        .and(authorized.clone())
        .then(|id, s: Result<Arc<AppState>, Response>| async move {
            match s {
                Ok(s) => flatten(rerun(s, id).await),
                Err(denied) => denied,
            }
        });
    let trigger = warp::path!("api" / "pipelines" / String / "trigger")
        .and(authorized.clone())
        .and(warp::body::content_length_limit(64 * 1024))
        .and(warp::body::bytes())
        .then(
            |name, s: Result<Arc<AppState>, Response>, body| async move {
                match s {
                    Ok(s) => flatten(trigger(s, name, body).await),
                    Err(denied) => denied,
                }
            },
        );
    let reload = warp::path!("api" / "reload").and(authorized).then(
        |s: Result<Arc<AppState>, Response>| async move {
            match s {
                Ok(s) => reload(s).await,
                Err(denied) => denied,
            }
        },
    );
    cancel
        .or(rerun)
        .unify()
        .or(trigger)
        .unify()
        .or(reload)
        .unify()
}

/// `POST /api/reload`: 200 with what changed, or 422 with every problem and nothing
/// changed.
async fn reload(state: Arc<AppState>) -> Response {
    match crate::reload::reload_to_end(state, "POST /api/reload").await {
        Ok(report) => {
            warp::reply::json(&json!({ "reloaded": true, "report": report })).into_response()
        }
        Err(crate::reload::ReloadError::Invalid { problems }) => warp::reply::with_status(
            warp::reply::json(&json!({
                "error": "reload failed: nothing changed",
                "problems": problems,
            })),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .into_response(),
        Err(e) => error_reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
