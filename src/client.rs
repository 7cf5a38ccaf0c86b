//! A small blocking HTTP/1.1 client for hookci's own commands (`hookci send`) and tests:
//! plain `http://` only, one request per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}: only http://HOST:PORT/PATH URLs are supported (put TLS in front of hookci, not inside it)")]
    Url(String),
    #[error("{url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("{url}: malformed response: {reason}")]
    Response { url: String, reason: String },
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Splits `http://host:port/path` into (`host:port`, `/path`).
fn split_url(url: &str) -> Result<(&str, &str), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Url(url.to_owned()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(ClientError::Url(url.to_owned()));
    }
    Ok((authority, path))
}

/// Sends one request and reads the whole response.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, ClientError> {
    request_streaming(method, url, headers, body, &mut |_| {})
}

/// Like [`request`], also handing each piece of a successful response's body to
/// `on_body` as it arrives (for streamed responses such as a followed log).
pub fn request_streaming(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    on_body: &mut dyn FnMut(&[u8]),
) -> Result<Response, ClientError> {
    let (authority, path) = split_url(url)?;
    let io = |source| ClientError::Io {
        url: url.to_owned(),
        source,
    };
    let authority_with_port = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let mut stream = TcpStream::connect(&authority_with_port).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io)?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    read_response(url, stream, on_body)
}

fn read_response(
    url: &str,
    stream: TcpStream,
    on_body: &mut dyn FnMut(&[u8]),
) -> Result<Response, ClientError> {
    let bad = |reason: &str| ClientError::Response {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let io = |source| ClientError::Io {
        url: url.to_owned(),
        source,
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(io)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad("bad header line"))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line).map_err(io)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or_default(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).map_err(io)?;
            if (200..300).contains(&status) {
                on_body(&body[start..]);
            }
            line.clear();
            reader.read_line(&mut line).map_err(io)?;
        }
    } else {
        reader.read_to_end(&mut body).map_err(io)?;
        if (200..300).contains(&status) {
            on_body(&body);
        }
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:8080/webhook").unwrap(),
            ("127.0.0.1:8080", "/webhook")
        );
        assert_eq!(split_url("http://localhost").unwrap(), ("localhost", "/"));
        assert!(split_url("https://ci.example.com/webhook").is_err());
        assert!(split_url("http:///x").is_err());
    }
}
