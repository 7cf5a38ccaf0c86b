//! The dashboard's forms: log in and out, and the buttons that change runs (cancel,
//! rerun, run now). The buttons call the write API's own code; they need the API
//! token's session and the page's CSRF token, and answer with a redirect to the run.

use std::collections::HashMap;
use std::sync::Arc;

use http_body_util::BodyExt;
use maud::html;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::state::AppState;
use crate::web::auth::{self, Access};
use crate::web::control;
use crate::web::pages::{percent_decode, viewer};
use crate::web::render::{page, problem, Viewer};

type Form = HashMap<String, String>;

/// The largest form body taken: a token, a ref and a commit id fit many times over.
const MAX_FORM: u64 = 16 * 1024;

fn see_other(location: &str) -> Response {
    let mut r = Response::new(Default::default());
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn login_page(status: StatusCode, viewer: &Viewer, next: &str, wrong: bool) -> Response {
    page(
        status,
        "Log in",
        viewer,
        html! {
            h1 { "Log in" }
            @if wrong { p.problem { "That token is not the read token or the API token." } }
            form.login method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label { "token "
                    input #token type="password" name="token" autocomplete="current-password" required;
                }
                button #login type="submit" { "Log in" }
            }
            p.note { "The read token lets you see runs; the API token also lets you cancel, rerun and run now." }
        },
    )
}

async fn login(state: Arc<AppState>, headers: HeaderMap, form: Form) -> Response {
    let next = auth::safe_next(form.get("next"));
    let given = form.get("token").map(|t| t.trim()).unwrap_or_default();
    let config = state.config();
    let token = match auth::token_access(&config, given) {
        Access::Write => config.api_token.as_ref(),
        Access::Read => config.read_token.as_ref(),
        Access::Nothing => None,
    };
    let Some(token) = token else {
        tracing::info!("dashboard login refused: wrong token");
        let viewer = viewer(&state, &headers);
        return login_page(StatusCode::UNAUTHORIZED, &viewer, &next, true);
    };
    let mut r = see_other(&next);
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(&state.config(), token)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn logout(state: Arc<AppState>) -> Response {
    let mut r = see_other("/");
    if let Ok(v) = HeaderValue::from_str(&auth::clear_cookie(&state.config())) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// The refusal of a button press without the API token or the page's CSRF token.
fn refusal(state: &AppState, viewer: &Viewer, form: &Form) -> Option<Response> {
    if viewer.access < Access::Write {
        return Some(problem(
            StatusCode::FORBIDDEN,
            viewer,
            "This needs the API token: log in with it.",
        ));
    }
    if !auth::csrf_ok(&state.config(), form.get("csrf")) {
        return Some(problem(
            StatusCode::FORBIDDEN,
            viewer,
            "This form did not come from a hookci page (its CSRF token is missing or wrong): reload the page and press again.",
        ));
    }
    None
}

/// The write API's refusal as a page: its status, and the message of its JSON body.
async fn as_page(viewer: &Viewer, refused: Response) -> Response {
    let status = refused.status();
    let message = match refused.into_body().collect().await {
        Ok(body) => serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "refused".to_owned()),
        Err(_) => "refused".to_owned(),
    };
    problem(status, viewer, &message)
}

enum Press {
    Cancel(i64),
    Rerun(i64),
    RunNow(String),
}

async fn press(state: Arc<AppState>, headers: HeaderMap, what: Press, form: Form) -> Response {
    let viewer = viewer(&state, &headers);
    if let Some(refused) = refusal(&state, &viewer, &form) {
        return refused;
    }
    let done = match what {
        Press::Cancel(id) => control::cancel_run(&state, id, "canceled from the dashboard")
            .await
            .map(|()| id),
        Press::Rerun(id) => control::rerun_run(&state, id).await,
        Press::RunNow(name) => {
            let git_ref = form.get("ref").map(|r| r.trim()).unwrap_or_default();
            if git_ref.is_empty() {
                return problem(
                    StatusCode::BAD_REQUEST,
                    &viewer,
                    "Say which branch or tag to run.",
                );
            }
            let sha = form
                .get("sha")
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty());
            control::trigger_run(&state, &name, git_ref, sha).await
        }
    };
    match done {
        Ok(run) => see_other(&format!("/runs/{run}")),
        Err(refused) => as_page(&viewer, refused).await,
    }
}

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let headers = warp::header::headers_cloned();
    let form = warp::body::content_length_limit(MAX_FORM).and(warp::body::form::<Form>());
    let login_form = warp::path!("login")
        .and(warp::get())
        .and(with_state.clone())
        .and(headers)
        .and(warp::query::<Form>())
        .map(|s: Arc<AppState>, h: HeaderMap, q: Form| {
            let viewer = viewer(&s, &h);
            login_page(
                StatusCode::OK,
                &viewer,
                &auth::safe_next(q.get("next")),
                false,
            )
        });
    let login = warp::path!("login")
        .and(warp::post())
        .and(with_state.clone())
        .and(headers)
        .and(form)
        .then(login);
    let logout = warp::path!("logout")
        .and(warp::post())
        .and(with_state.clone())
        .map(logout);
    let cancel = warp::path!("runs" / i64 / "cancel")
        .and(warp::post())
        .and(with_state.clone())
        .and(headers)
        .and(form)
        .then(|id, s, h, f| press(s, h, Press::Cancel(id), f));
    let rerun = warp::path!("runs" / i64 / "rerun")
        .and(warp::post())
        .and(with_state.clone())
        .and(headers)
        .and(form)
        .then(|id, s, h, f| press(s, h, Press::Rerun(id), f));
    let run_now = warp::path!("pipelines" / String / "run")
        .and(warp::post())
        .and(with_state)
        .and(headers)
        .and(form)
        .then(|name: String, s, h, f| async move {
            match percent_decode(&name) {
                Some(name) => press(s, h, Press::RunNow(name), f).await,
                None => {
                    warp::reply::with_status("bad name", StatusCode::BAD_REQUEST).into_response()
                }
            }
        });
    login_form
        .or(login)
        .unify()
        .or(logout)
        .unify()
        .or(cancel)
        .unify()
        .or(rerun)
        .unify()
        .or(run_now)
        .unify()
}
