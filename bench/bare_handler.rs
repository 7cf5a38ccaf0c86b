//! The ceiling for the intake benchmark: a warp server on the same stack as hookci
//! that reads a POSTed body and answers 202 with the delivery id, doing nothing else
//! (no signature, no parsing, no store). `bench/intake.sh` runs it beside hookci.
//!
//!     cargo run --release --example bare-handler -- 127.0.0.1:0

use warp::http::StatusCode;
use warp::Filter;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("listening addr={}", listener.local_addr()?);
    let route = warp::path!("webhook")
        .and(warp::post())
        .and(warp::header::optional::<String>("x-github-delivery"))
        .and(warp::body::content_length_limit(25 * 1024 * 1024))
        .and(warp::body::bytes())
        .map(|delivery: Option<String>, _body: bytes::Bytes| {
            let body = serde_json::json!({ "delivery": delivery, "runs": [] });
            warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED)
        });
    warp::serve(route).incoming(listener).run().await;
    Ok(())
}
