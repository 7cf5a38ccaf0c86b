//! Serving HTTP: accepts connections on the caller's listener and serves each with
//! hyper, routing to warp's filters (`intake`, `api`, `control`) except for the one
//! response warp cannot give, a plain-text stream (`GET /api/runs/{id}/log?follow=1`).
//! Also bounds the connections before anyone is authenticated: how many are open
//! (`max_connections`), how long a client may take to send its headers, and how long
//! it may keep an idle connection (`idle`; the body's deadline and budget are
//! intake's); and refuses requests that need the read token and lack it (`auth`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use warp::http::{header, Request, Response, StatusCode};

use crate::state::AppState;
use crate::web::auth;
use crate::web::follow::{self, Update};
use crate::web::idle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// How long a client may take to send a request's headers (slow-loris guard). hyper
/// starts this clock again when a kept-alive connection waits for its next request;
/// the idle keep-alive timeout proper is `keep_alive_timeout` (`idle`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// What hyper may buffer of a connection's input, headers included (its default is
/// ~400 KiB): bytes read ahead of a body are not in the budget of unverified bytes, so
/// with hundreds of connections trickling bodies they must stay few.
const READ_BUFFER: usize = 32 * 1024;

/// The keep-alive of a followed log: ASCII SYN ("synchronous idle"), sent while nothing
/// else is new. Terminals do not show it, and `hookci logs -f` drops it; a newline or
/// a marker line would change the text, and could break a line a step left unfinished.
pub const KEEP_ALIVE_BYTE: u8 = 0x16;

/// Serves until `shutdown` resolves, then stops accepting and gives open requests up
/// to `drain` to finish.
pub async fn serve<S>(
    listener: TcpListener,
    state: Arc<AppState>,
    routes: S,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) where
    S: tower_service::Service<
            Request<Incoming>,
            Response = warp::reply::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // `max_connections`: at the cap, nothing is accepted, and new connections wait in
    // the listen backlog until one closes.
    let slots = Arc::new(tokio::sync::Semaphore::new(state.config().max_connections));
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let activity = idle::Activity::new();
        let io = idle::IdleIo::new(
            stream,
            Arc::clone(&activity),
            state.config().keep_alive_timeout,
        );
        let (state, routes) = (Arc::clone(&state), routes.clone());
        let service = hyper::service::service_fn(move |req| {
            let in_flight = activity.request();
            let response = route(Arc::clone(&state), routes.clone(), req);
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|b| idle::Guarded::new(b, in_flight).boxed()))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(READ_BUFFER)
            .serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish in time");
    }
}

/// Answers one request, timed for `/metrics` by its route's name.
async fn route<S>(
    state: Arc<AppState>,
    mut routes: S,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible>
where
    S: tower_service::Service<
        Request<Incoming>,
        Response = warp::reply::Response,
        Error = Infallible,
    >,
{
    let started = std::time::Instant::now();
    let route_name = crate::web::metrics::route_of(req.uri().path());
    let response = answer(&state, &mut routes, req).await?;
    state.metrics.http_request(route_name, started.elapsed());
    Ok(response)
}

async fn answer<S>(
    state: &Arc<AppState>,
    routes: &mut S,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible>
where
    S: tower_service::Service<
        Request<Incoming>,
        Response = warp::reply::Response,
        Error = Infallible,
    >,
{
    if let Some(refusal) = auth::check(&state.config(), req.method(), req.uri(), req.headers()) {
        return Ok(refuse(refusal));
    }
    if let Some(id) = follow_request(&req) {
        return Ok(follow_log(Arc::clone(state), id).await);
    }
    let response = routes.call(req).await?;
    Ok(response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
}

/// Here, before any route, so that no route can be left open by mistake.
fn refuse(refusal: auth::Refusal) -> Response<Body> {
    match refusal {
        auth::Refusal::Api => {
            let (status, body) = auth::api_refusal();
            let mut r = text(status, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
        auth::Refusal::Login { next } => {
            let mut r = text(StatusCode::SEE_OTHER, String::new());
            let location = format!("/login?next={}", auth::encode_query(&next));
            if let Ok(v) = header::HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
    }
}

/// `GET /api/runs/{id}/log` with `follow=1` (or `follow=true`) in the query.
fn follow_request(req: &Request<Incoming>) -> Option<i64> {
    if req.method() != warp::http::Method::GET {
        return None;
    }
    let id = req
        .uri()
        .path()
        .strip_prefix("/api/runs/")?
        .strip_suffix("/log")?
        .parse()
        .ok()?;
    let follow = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|kv| kv == "follow=1" || kv == "follow=true");
    follow.then_some(id)
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body.into()));
    *r.status_mut() = status;
    r
}

fn full(bytes: Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

/// The run's log as it is written: each step's header and output, until the run ends.
async fn follow_log(state: Arc<AppState>, id: i64) -> Response<Body> {
    let store = Arc::clone(&state.store);
    match tokio::task::spawn_blocking(move || store.run(id)).await {
        Ok(Ok(Some(_))) => {}
        Ok(Ok(None)) => {
            return text(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": format!("no run {id}") }).to_string(),
            )
        }
        _ => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "{\"error\": \"store read failed\"}".into(),
            )
        }
    }
    let updates = match follow::follow(state, id) {
        Ok(updates) => updates,
        Err(e) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": e.to_string() }).to_string(),
            )
        }
    };
    let mut r = Response::new(BodyExt::boxed(UpdateBody(updates)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8"
            .parse()
            .unwrap_or_else(|_| unreachable!()),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        "no-cache".parse().unwrap_or_else(|_| unreachable!()),
    );
    r
}

/// A response body fed by a follower: step headers and output as plain text.
struct UpdateBody(mpsc::Receiver<Update>);

impl http_body::Body for UpdateBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let update = match self.0.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(update)) => update,
            };
            let bytes: Bytes = match update {
                Update::StepStarted(step) => {
                    format!("==> step {}: {}\n", step.number, step.name).into()
                }
                Update::Output { bytes, .. } => bytes,
                Update::StepFinished(step) => {
                    let mut line = format!("==> step {} {}", step.number, step.status.as_str());
                    if let Some(reason) = step.reason {
                        line.push_str(&format!(": {reason}"));
                    }
                    format!("\n{line}\n").into()
                }
                Update::RunFinished(run) => {
                    format!("==> run {} {}\n", run.id, run.status.as_str()).into()
                }
                Update::KeepAlive => Bytes::from_static(&[KEEP_ALIVE_BYTE]),
                Update::Stopping(run) => format!(
                    "\n==> hookci is stopping; run {} was {} (follow it again once hookci is back)\n",
                    run.id,
                    run.status.as_str()
                )
                .into(),
            };
            if !bytes.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
        }
    }
}
