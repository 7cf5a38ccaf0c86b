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

/// How long a request waits for the daemon to send something (a followed log excepted).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// How much of a response body is read at a time.
const PIECE: usize = 64 * 1024;

/// Where a streamed response's body goes, a piece at a time.
type OnBody<'a> = &'a mut dyn FnMut(&[u8]);

/// Sends one request and reads the whole response.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, ClientError> {
    let stream = send(method, url, headers, body, Some(READ_TIMEOUT))?;
    read_response(url, stream, None)
}

/// Like [`request`], but a successful response's body goes to `on_body` piece by piece
/// as it arrives and is not kept (the returned body is empty): a streamed response,
/// such as a followed log, may never end and must not pile up in memory. Any other
/// response's body is kept, for its error message. `read_timeout` of `None` waits for
/// the next piece for as long as it takes.
pub fn request_streaming(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    read_timeout: Option<Duration>,
    on_body: OnBody<'_>,
) -> Result<Response, ClientError> {
    let stream = send(method, url, headers, body, read_timeout)?;
    read_response(url, stream, Some(on_body))
}

fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    read_timeout: Option<Duration>,
) -> Result<TcpStream, ClientError> {
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
    stream.set_read_timeout(read_timeout).map_err(io)?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    Ok(stream)
}

fn read_response(
    url: &str,
    stream: TcpStream,
    on_body: Option<OnBody<'_>>,
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
    let mut on_body = on_body.filter(|_| (200..300).contains(&status));
    let mut take = |piece: &[u8]| match &mut on_body {
        Some(f) => f(piece),
        None => body.extend_from_slice(piece),
    };
    let mut buf = vec![0; PIECE];
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line).map_err(io)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or_default(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let mut left = size;
            while left > 0 {
                let n = left.min(buf.len());
                reader.read_exact(&mut buf[..n]).map_err(io)?;
                take(&buf[..n]);
                left -= n;
            }
            line.clear();
            reader.read_line(&mut line).map_err(io)?;
        }
    } else {
        loop {
            let n = reader.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            take(&buf[..n]);
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

    /// Serves one connection with `response` and returns the server's address.
    fn serve_once(response: Vec<u8>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut head = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while head.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            conn.write_all(&response).unwrap();
        });
        format!("http://{addr}/")
    }

    fn chunked(status: &str, chunks: &[&[u8]]) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
        for c in chunks {
            r.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            r.extend_from_slice(c);
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"0\r\n\r\n");
        r
    }

    #[test]
    fn a_streamed_body_goes_to_the_callback_in_bounded_pieces_and_is_not_kept() {
        let big = vec![b'x'; PIECE * 2 + 7];
        let url = serve_once(chunked("200 OK", &[b"hello ", &big]));
        let mut pieces = Vec::new();
        let r = request_streaming("GET", &url, &[], b"", None, &mut |p| {
            pieces.push(p.to_vec())
        })
        .unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty(), "kept {} bytes", r.body.len());
        assert!(pieces.iter().all(|p| p.len() <= PIECE));
        assert_eq!(pieces.concat(), [b"hello ".as_slice(), &big].concat());

        // An error's body is the message: kept, not streamed.
        let url = serve_once(chunked("404 Not Found", &[b"{\"error\": \"no run 9\"}"]));
        let mut streamed = 0;
        let r =
            request_streaming("GET", &url, &[], b"", None, &mut |p| streamed += p.len()).unwrap();
        assert_eq!((r.status, streamed), (404, 0));
        assert_eq!(r.json()["error"], "no run 9");
    }
}
