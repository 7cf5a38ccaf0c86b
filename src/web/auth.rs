//! Who may see and do what. Without a read token, pages and the read API are open;
//! with one, they need it or the API token, as `Authorization: Bearer` or as the
//! session cookie the login form sets. `/healthz`, `/metrics`, badges, the webhook
//! (signed on its own), the login form and the static assets stay open. Changing
//! things needs the API token; a page's forms also carry a CSRF token derived from it.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use warp::http::{header, HeaderMap, Method, StatusCode};

use crate::config::{Config, Secret};
use crate::web::control::same_secret;

/// The session cookie's name.
pub const COOKIE: &str = "hookci_session";

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Nothing,
    Read,
    /// Read, and change runs: the API token.
    Write,
}

fn mac(key: &Secret, what: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    m.update(what);
    hex::encode(m.finalize().into_bytes())
}

/// The cookie value that stands for `token`: derived from it, so the token itself
/// never sits in the browser, and a changed token ends its sessions.
pub fn session_value(token: &Secret) -> String {
    mac(token, b"hookci dashboard session")
}

/// The CSRF token of forms that change things; `None` without an API token. Only the
/// holder of the API token can know it, and pages show it only to that holder.
pub fn csrf_token(config: &Config) -> Option<String> {
    config.api_token.as_ref().map(|t| mac(t, b"hookci form"))
}

pub fn csrf_ok(config: &Config, given: Option<&String>) -> bool {
    match (csrf_token(config), given) {
        (Some(want), Some(given)) => same_secret(want.as_bytes(), given.as_bytes()),
        _ => false,
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .and_then(|(scheme, token)| {
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Whether the request carries a session cookie (valid or not: it can be ended).
pub fn has_session(headers: &HeaderMap) -> bool {
    cookie(headers).is_some_and(|v| !v.is_empty())
}

/// What the token `given` grants (a token typed into the login form).
pub fn token_access(config: &Config, given: &str) -> Access {
    if let Some(api) = &config.api_token {
        if same_secret(given.as_bytes(), api.expose().as_bytes()) {
            return Access::Write;
        }
    }
    if let Some(read) = &config.read_token {
        if same_secret(given.as_bytes(), read.expose().as_bytes()) {
            return Access::Read;
        }
    }
    Access::Nothing
}

/// What the request's credentials grant.
pub fn access(config: &Config, headers: &HeaderMap) -> Access {
    let mut granted = if config.read_token.is_none() {
        Access::Read
    } else {
        Access::Nothing
    };
    if let Some(given) = bearer(headers) {
        granted = granted.max(token_access(config, given));
    }
    if let Some(given) = cookie(headers) {
        for (token, level) in [
            (&config.api_token, Access::Write),
            (&config.read_token, Access::Read),
        ] {
            if let Some(token) = token {
                if same_secret(given.as_bytes(), session_value(token).as_bytes()) {
                    granted = granted.max(level);
                }
            }
        }
    }
    granted
}

/// Whether `path` is open to anyone, read token or not.
fn is_open(method: &Method, path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/login" | "/logout")
        || path.starts_with("/badge/")
        || path.starts_with("/assets/")
        || (method == Method::POST && path == "/webhook")
}

/// Why a request to a closed route is refused.
pub enum Refusal {
    /// An API call: 401 with a JSON error.
    Api,
    /// A page: to the login form, and back to `next` after it.
    Login { next: String },
}

/// The refusal of a request that lacks the read token where one is needed.
pub fn check(
    config: &Config,
    method: &Method,
    uri: &warp::http::Uri,
    headers: &HeaderMap,
) -> Option<Refusal> {
    let path = uri.path();
    if config.read_token.is_none() || is_open(method, path) {
        return None;
    }
    if access(config, headers) >= Access::Read {
        return None;
    }
    if path.starts_with("/api/") {
        return Some(Refusal::Api);
    }
    let next = uri
        .path_and_query()
        .map_or(path, |pq| pq.as_str())
        .to_owned();
    Some(Refusal::Login { next })
}

/// The status and JSON body of an API refusal.
pub fn api_refusal() -> (StatusCode, String) {
    (
        StatusCode::UNAUTHORIZED,
        serde_json::json!({
            "error": "this hookci needs a token to read: Authorization: Bearer <read or API token>"
        })
        .to_string(),
    )
}

/// Where the login form may send the user afterwards: a path of this site only.
/// Browsers drop tabs and line breaks from a `Location` and read `\\` as `/`, so a
/// path with any control character or backslash could name another site.
pub fn safe_next(next: Option<&String>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.chars().any(|c| c.is_control() || c == '\\')
                && !n
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect::<String>()
                    .starts_with("//") =>
        {
            n.clone()
        }
        _ => "/".to_owned(),
    }
}

/// `Set-Cookie` for a session of `token`.
pub fn set_cookie(config: &Config, token: &Secret) -> String {
    format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{}",
        session_value(token),
        secure(config)
    )
}

/// `Set-Cookie` that ends the session.
pub fn clear_cookie(config: &Config) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        secure(config)
    )
}

/// Browsers send a `Secure` cookie only over https: set it where hookci is reached so.
fn secure(config: &Config) -> &'static str {
    match &config.public_url {
        Some(url) if url.starts_with("https://") => "; Secure",
        _ => "",
    }
}

/// `text` percent-encoded for a query value or a path segment (it keeps `/`, which
/// neither a pipeline name nor a delivery id holds).
pub fn encode_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_form_only_sends_users_back_into_this_site() {
        let cases = [
            (Some("/runs/3"), "/runs/3"),
            (Some("/?status=failed"), "/?status=failed"),
            (Some("//evil.example/x"), "/"),
            (Some("https://evil.example/"), "/"),
            (Some("/\\evil.example"), "/"),
            (Some("/\t/evil.example"), "/"),
            (Some("/\n/evil.example"), "/"),
            (Some("/ /evil.example"), "/"),
            (None, "/"),
        ];
        for (next, want) in cases {
            assert_eq!(
                safe_next(next.map(str::to_owned).as_ref()),
                want,
                "{next:?}"
            );
        }
    }
}
