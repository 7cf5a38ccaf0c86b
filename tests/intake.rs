//! `POST /webhook` at the door: every kind of bad request is refused with the right
//! status and a JSON error, records nothing and runs nothing, and the daemon keeps
//! serving; real GitHub payloads (signed over their exact bytes) are decided as
//! README says.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hookci::cli::client::Response;
use hookci::intake::sign;
use serde_json::{json, Value};

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

fn pipeline(origin: &Origin) -> String {
    format!(
        "repo: {REPO}\nclone_url: {}\nsteps:\n  - name: build\n    run: echo built $HOOKCI_COMMIT\n",
        origin.url()
    )
}

/// GitHub's headers for a delivery; `None` leaves a header out.
fn headers(
    content_type: Option<&str>,
    event: Option<&str>,
    delivery: Option<&str>,
    signature: Option<&str>,
) -> Vec<(String, String)> {
    let mut h = vec![("User-Agent".to_owned(), "GitHub-Hookshot/test".to_owned())];
    for (name, value) in [
        ("Content-Type", content_type),
        ("X-GitHub-Event", event),
        ("X-GitHub-Delivery", delivery),
        ("X-Hub-Signature-256", signature),
    ] {
        if let Some(v) = value {
            h.push((name.to_owned(), v.to_owned()));
        }
    }
    h
}

fn post(d: &Daemon, headers: &[(String, String)], body: &[u8]) -> Response {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    d.post("/webhook", &h, body)
}

/// The response is `status` with a JSON `{"error": "..."}` body mentioning `fragment`.
fn assert_error(r: &Response, status: u16, fragment: &str, label: &str) {
    assert_eq!(r.status, status, "{label}: {}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{label}: error bodies are JSON: {:?}",
        r.headers
    );
    let body = r.json();
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("{label}: not a JSON object: {}", r.text()));
    assert_eq!(
        obj.keys().collect::<Vec<_>>(),
        vec!["error"],
        "{label}: {body}"
    );
    let message = obj["error"].as_str().unwrap();
    assert!(
        message.contains(fragment),
        "{label}: error {message:?} should mention {fragment:?}"
    );
}

/// Nothing was recorded for `delivery` and the run list is still `runs_before` long.
fn assert_nothing_recorded(d: &Daemon, delivery: Option<&str>, runs_before: usize, label: &str) {
    assert_eq!(
        d.runs().len(),
        runs_before,
        "{label}: no run may be created"
    );
    if let Some(id) = delivery {
        let r = d.get(&format!("/api/deliveries/{id}"));
        assert_eq!(r.status, 404, "{label}: no delivery may be recorded");
    }
}

/// A fresh commit on main, delivered properly: 202, and the run succeeds.
fn push_builds(d: &Daemon, origin: &Origin, delivery: &str) -> i64 {
    let sha = origin.commit("main", &[("marker", delivery)], delivery);
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let r = d.deliver("push", delivery, &body);
    assert_eq!(r.status, 202, "{delivery}: {}\n{}", r.text(), d.log());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["commit"], sha.as_str());
    id
}

/// A request written byte for byte onto a TCP connection, and the response read back.
fn raw_request(addr: &str, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // The server may answer (and close) before it has read everything; the answer is
    // what counts.
    let _ = stream.write_all(request);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw);
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head in {text:?}"));
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body
    } else {
        rest.to_vec()
    };
    Response {
        status,
        headers,
        body,
    }
}

/// A `Transfer-Encoding: chunked` POST /webhook of `body` in chunks of `chunk` bytes,
/// with no Content-Length.
fn chunked_request(addr: &str, headers: &[(String, String)], body: &[u8], chunk: usize) -> Vec<u8> {
    let mut req = format!("POST /webhook HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Transfer-Encoding: chunked\r\n\r\n");
    let mut bytes = req.into_bytes();
    for part in body.chunks(chunk) {
        bytes.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        bytes.extend_from_slice(part);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

/// `application/x-www-form-urlencoded` encoding of a value (space as `+`).
fn form_encode(value: &[u8]) -> String {
    value
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A valid JSON document padded with trailing white space to exactly `len` bytes.
fn padded(body: &[u8], len: usize) -> Vec<u8> {
    assert!(body.len() <= len, "payload is {} bytes already", body.len());
    let mut v = body.to_vec();
    v.resize(len, b' ');
    v
}

struct Bad {
    what: &'static str,
    status: u16,
    fragment: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The delivery id sent, when it is one that could have been recorded.
    delivery: Option<String>,
}

#[test]
fn bad_requests_are_refused_with_json_errors_record_nothing_and_the_daemon_keeps_serving() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b.pipeline("ci", &pipeline(&origin)).start();
    // A push that would build if it got through: every case below starts from it.
    let sha = origin.commit("main", &[("a", "1")], "would build");
    let good = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let sig = sign(SECRET.as_bytes(), &good);
    let signed = |body: &[u8]| sign(SECRET.as_bytes(), body);
    let pretty =
        serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(&good).unwrap()).unwrap();
    let hex = sig.strip_prefix("sha256=").unwrap().to_owned();
    let json = Some("application/json");
    let malformed = br#"{"ref": "refs/heads/main", "before": "#.to_vec();
    let not_a_push = fixture("issues/octokit-opened.json");
    let escaping = PushPayload::new("../../etc", "refs/heads/main", ZERO, &sha, "x").bytes();
    let bad_after = PushPayload::new(REPO, "refs/heads/main", ZERO, "$(reboot)", "x").bytes();
    let no_form_field = b"other=1".to_vec();

    let mut cases = Vec::new();
    let mut with = |what, status, fragment, h: Vec<(String, String)>, body: &[u8]| {
        // The id is looked up afterwards unless it could never name a delivery.
        let delivery = h
            .iter()
            .find(|(k, _)| k == "X-GitHub-Delivery")
            .map(|(_, v)| v.clone())
            .filter(|v| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        cases.push(Bad {
            what,
            status,
            fragment,
            headers: h,
            body: body.to_vec(),
            delivery,
        });
    };
    with(
        "missing signature",
        401,
        "missing X-Hub-Signature-256",
        headers(json, Some("push"), Some("bad-unsigned"), None),
        &good,
    );
    with(
        "malformed body without a signature: the signature is checked first",
        401,
        "X-Hub-Signature-256",
        headers(json, Some("push"), Some("bad-unsigned-malformed"), None),
        &malformed,
    );
    with(
        "signature made with another secret",
        401,
        "signature does not match",
        headers(
            json,
            Some("push"),
            Some("bad-wrong-secret"),
            Some(&sign(b"not-the-secret", &good)),
        ),
        &good,
    );
    with(
        "signature over other bytes (the pretty-printed document)",
        401,
        "signature does not match",
        headers(
            json,
            Some("push"),
            Some("bad-other-bytes"),
            Some(&signed(&pretty)),
        ),
        &good,
    );
    with(
        "a correct digest under a sha1= prefix",
        401,
        "sha256=",
        headers(
            json,
            Some("push"),
            Some("bad-sha1-prefix"),
            Some(&format!("sha1={hex}")),
        ),
        &good,
    );
    let mut legacy = headers(json, Some("push"), Some("bad-legacy-sha1"), None);
    legacy.push(("X-Hub-Signature".into(), format!("sha1={}", &hex[..40])));
    with(
        "only the legacy X-Hub-Signature: sha1= header",
        401,
        "missing X-Hub-Signature-256",
        legacy,
        &good,
    );
    with(
        "a truncated digest",
        401,
        "signature does not match",
        headers(
            json,
            Some("push"),
            Some("bad-truncated"),
            Some(&format!("sha256={}", &hex[..32])),
        ),
        &good,
    );
    with(
        "an empty digest",
        401,
        "signature does not match",
        headers(json, Some("push"), Some("bad-empty-sig"), Some("sha256=")),
        &good,
    );
    with(
        "a digest that is not hex",
        401,
        "not hex",
        headers(
            json,
            Some("push"),
            Some("bad-not-hex"),
            Some(&format!("sha256=zz{}", &hex[2..])),
        ),
        &good,
    );
    with(
        "malformed JSON with a valid signature",
        400,
        "malformed push payload",
        headers(
            json,
            Some("push"),
            Some("bad-malformed"),
            Some(&signed(&malformed)),
        ),
        &malformed,
    );
    with(
        "an empty body with a valid signature",
        400,
        "malformed push payload",
        headers(json, Some("push"), Some("bad-empty"), Some(&signed(b""))),
        b"",
    );
    with(
        "valid JSON that is not a push payload (an issues event) sent as push",
        400,
        "push payload",
        headers(
            json,
            Some("push"),
            Some("bad-not-push"),
            Some(&signed(&not_a_push)),
        ),
        &not_a_push,
    );
    with(
        "a push whose `after` is not a commit id",
        400,
        "`after` is not a commit id",
        headers(
            json,
            Some("push"),
            Some("bad-after"),
            Some(&signed(&bad_after)),
        ),
        &bad_after,
    );
    with(
        "missing X-GitHub-Event",
        400,
        "X-GitHub-Event",
        headers(json, None, Some("bad-no-event"), Some(&sig)),
        &good,
    );
    with(
        "missing X-GitHub-Delivery",
        400,
        "X-GitHub-Delivery",
        headers(json, Some("push"), None, Some(&sig)),
        &good,
    );
    with(
        "an X-GitHub-Delivery that is not an id",
        400,
        "X-GitHub-Delivery",
        headers(json, Some("push"), Some("../../x y"), Some(&sig)),
        &good,
    );
    with(
        "text/plain",
        415,
        "content type",
        headers(
            Some("text/plain"),
            Some("push"),
            Some("bad-text"),
            Some(&sig),
        ),
        &good,
    );
    with(
        "no Content-Type at all",
        415,
        "content type",
        headers(None, Some("push"), Some("bad-no-type"), Some(&sig)),
        &good,
    );
    with(
        "a repository full_name that would escape the state directory",
        400,
        "invalid repository name",
        headers(
            json,
            Some("push"),
            Some("bad-escape"),
            Some(&signed(&escaping)),
        ),
        &escaping,
    );
    with(
        "a form body without a payload= field",
        400,
        "payload=",
        headers(
            Some("application/x-www-form-urlencoded"),
            Some("push"),
            Some("bad-form"),
            Some(&signed(&no_form_field)),
        ),
        &no_form_field,
    );

    let unnamed: Vec<&str> = cases
        .iter()
        .filter(|c| c.delivery.is_none())
        .map(|c| c.what)
        .collect();
    assert_eq!(
        unnamed.len(),
        2,
        "only these have no usable id: {unnamed:?}"
    );
    assert!(d.runs().is_empty());
    for (i, c) in cases.iter().enumerate() {
        let label = c.what;
        let runs_before = d.runs().len();
        let r = post(&d, &c.headers, &c.body);
        assert_error(&r, c.status, c.fragment, label);
        if i == 0 {
            assert!(d.runs().is_empty(), "{label}: /api/runs must stay empty");
        }
        assert_nothing_recorded(&d, c.delivery.as_deref(), runs_before, label);
        // The daemon still serves: a proper push right after builds.
        push_builds(&d, &origin, &format!("after-{i}"));
    }
    for escaped in [
        d.state_dir().join("mirrors/etc"),
        d.state_dir().join("etc"),
        d.path().join("etc"),
    ] {
        assert!(
            !escaped.exists(),
            "nothing is made from an escaping repository name: {}",
            escaped.display()
        );
    }
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_body_over_max_body_bytes_is_refused_with_content_length_or_chunked() {
    let b = Builder::new().config("max_body_bytes: 1024");
    let origin = Origin::new(b.path());
    let d = b.pipeline("ci", &pipeline(&origin)).start();
    let sha = origin.commit("main", &[("a", "1")], "x");
    let push = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();

    // 2 KiB, a valid push (white space padded) and correctly signed: only its size is wrong.
    let big = padded(&push, 2048);
    let r = d.deliver("push", "big-length", &big);
    assert_error(&r, 413, "max_body_bytes", "2 KiB with Content-Length");
    assert_nothing_recorded(&d, Some("big-length"), 0, "Content-Length");

    let h = headers(
        Some("application/json"),
        Some("push"),
        Some("big-chunked"),
        Some(&sign(SECRET.as_bytes(), &big)),
    );
    let r = raw_request(&d.addr, &chunked_request(&d.addr, &h, &big, 256));
    assert_error(&r, 413, "max_body_bytes", "2 KiB chunked");
    assert_nothing_recorded(&d, Some("big-chunked"), 0, "chunked");

    // One byte over, chunked, so no Content-Length tells it in advance.
    let over = padded(&push, 1025);
    let h = headers(
        Some("application/json"),
        Some("push"),
        Some("over-by-one"),
        Some(&sign(SECRET.as_bytes(), &over)),
    );
    let r = raw_request(&d.addr, &chunked_request(&d.addr, &h, &over, 100));
    assert_error(&r, 413, "max_body_bytes", "1025 bytes chunked");
    assert_nothing_recorded(&d, Some("over-by-one"), 0, "1025 bytes");

    // Exactly at the cap is fine, chunked or not; and the daemon still serves.
    let exact = padded(&push, 1024);
    let r = d.deliver("push", "exact", &exact);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(id)["status"], "succeeded");

    let sha2 = origin.commit("main", &[("b", "2")], "y");
    let small = PushPayload::new(REPO, "refs/heads/main", &sha, &sha2, "x").bytes();
    let h = headers(
        Some("application/json"),
        Some("push"),
        Some("small-chunked"),
        Some(&sign(SECRET.as_bytes(), &small)),
    );
    let r = raw_request(&d.addr, &chunked_request(&d.addr, &h, &small, 64));
    assert_eq!(r.status, 202, "a chunked body under the cap: {}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["commit"], sha2.as_str());
    assert_eq!(d.runs().len(), 2);
}

#[test]
fn header_names_and_the_content_type_are_case_insensitive() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b.pipeline("ci", &pipeline(&origin)).start();
    let sha = origin.commit("main", &[("a", "1")], "x");
    let body = PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes();
    let sig = sign(SECRET.as_bytes(), &body);
    // Through the client, which writes names exactly as given...
    let r = d.post(
        "/webhook",
        &[
            ("content-TYPE", "Application/JSON; charset=UTF-8"),
            ("x-github-event", "push"),
            ("X-GITHUB-DELIVERY", "odd-case-1"),
            ("X-HUB-SIGNATURE-256", &sig),
        ],
        &body,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(id)["status"], "succeeded");

    // ...and over a raw connection, every name in odd case.
    let sha2 = origin.commit("main", &[("b", "2")], "y");
    let body = PushPayload::new(REPO, "refs/heads/main", &sha, &sha2, "x").bytes();
    let request = [
        format!(
            "POST /webhook HTTP/1.1\r\nhOsT: {}\r\nCONTENT-TYPE: application/json\r\nx-GiThUb-EvEnT: push\r\nx-github-delivery: odd-case-2\r\nx-hub-signature-256: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            d.addr,
            sign(SECRET.as_bytes(), &body),
            body.len()
        )
        .into_bytes(),
        body,
    ]
    .concat();
    let r = raw_request(&d.addr, &request);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(id)["commit"], sha2.as_str());
    assert_eq!(
        d.get_json("/api/deliveries/odd-case-2")["after"],
        sha2.as_str()
    );
}

#[test]
fn a_form_encoded_push_signed_over_the_form_bytes_builds() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    // '+', '&', '=' and spaces all need their form encoding to survive.
    let branch = "feature/a+b&c=d";
    let sha = origin.commit(branch, &[("a", "1")], "x");
    let d = b.pipeline("ci", &pipeline(&origin)).start();
    let mut push = PushPayload::new(REPO, &format!("refs/heads/{branch}"), ZERO, &sha, "x");
    push.message = "a message with spaces, + and %".into();
    let form = format!("payload={}", form_encode(&push.bytes())).into_bytes();
    let form_headers = |delivery: &str, sig: &str| {
        headers(
            Some("application/x-www-form-urlencoded"),
            Some("push"),
            Some(delivery),
            Some(sig),
        )
    };

    // The signature covers the raw form bytes, not the JSON inside them.
    let r = post(
        &d,
        &form_headers("form-json-signed", &sign(SECRET.as_bytes(), &push.bytes())),
        &form,
    );
    assert_error(
        &r,
        401,
        "signature does not match",
        "form signed over its JSON",
    );
    assert_nothing_recorded(&d, Some("form-json-signed"), 0, "form signed over its JSON");

    let r = post(
        &d,
        &form_headers("form-1", &sign(SECRET.as_bytes(), &form)),
        &form,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["delivery"], "form-1");
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["ref"], format!("refs/heads/{branch}"));
    assert_eq!(run["commit"], sha.as_str());
    assert!(d.run_log(id).contains(&format!("built {sha}")));

    // A `+` in the form is a space: "[skip ci]" arrives as "[skip+ci]" and must still skip.
    let sha2 = origin.commit(branch, &[("b", "2")], "docs");
    let mut push = PushPayload::new(REPO, &format!("refs/heads/{branch}"), &sha, &sha2, "x");
    push.message = "docs only [skip ci]".into();
    let form = format!("payload={}", form_encode(&push.bytes())).into_bytes();
    assert!(
        form.windows(10).any(|w| w == b"%5Bskip+ci"),
        "spaces are sent as +"
    );
    let r = post(
        &d,
        &form_headers("form-2", &sign(SECRET.as_bytes(), &form)),
        &form,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "skipped", "{run:#}");
    assert!(
        run["reason"].as_str().unwrap().contains("[skip ci]"),
        "{run:#}"
    );
}

#[test]
fn ping_answers_ok_when_signed_and_other_events_are_ignored() {
    // The one raw fixture with a known secret: "123". The daemon takes it from the
    // environment (the builder's own secret file is left out with `unsigned()`).
    let raw_ping = fixture("ping/jenkins-raw-body-secret-123.json");
    let header = "sha256=85e61999573c7023720a12375e1e55d18a0870e1ef880736f6ffc9273d0519e3";
    assert_eq!(sign(b"123", &raw_ping), header);
    let d = Builder::new()
        .unsigned()
        .env("HOOKCI_WEBHOOK_SECRET", "123")
        .start();
    let ping = |sig: Option<&str>| {
        post(
            &d,
            &headers(Some("application/json"), Some("ping"), Some("ping-1"), sig),
            &raw_ping,
        )
    };
    // The environment's secret is enforced even though --allow-unsigned was passed.
    assert_error(&ping(None), 401, "X-Hub-Signature-256", "unsigned ping");
    let other = sign(SECRET.as_bytes(), &raw_ping);
    assert_error(
        &ping(Some(&other)),
        401,
        "does not match",
        "ping, other secret",
    );
    let r = ping(Some(header));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({ "ok": true }));
    assert!(!d.log().contains("UNSIGNED"), "a secret is configured");

    // Every other event is acknowledged and ignored, whatever it carries.
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b.pipeline("ci", &pipeline(&origin)).start();
    for (event, file) in [
        ("pull_request", "pull_request/octokit-opened.json"),
        ("pull_request", "pull_request/octokit-synchronize.json"),
        ("issues", "issues/octokit-opened.json"),
        ("create", "create/octokit-tag.json"),
        ("create", "create/drone-branch.json"),
        ("delete", "delete/drone-branch.json"),
        ("ping", "ping/octokit-repo-hook.json"),
    ] {
        let body = fixture(file);
        let delivery = format!("ignored-{}", file.replace(['/', '.'], "-"));
        let r = d.deliver(event, &delivery, &body);
        if event == "ping" {
            assert_eq!((r.status, r.json()), (200, json!({ "ok": true })), "{file}");
        } else {
            assert_eq!(r.status, 202, "{file}: {}", r.text());
            assert_eq!(r.json(), json!({ "ignored": event }), "{file}");
        }
        assert!(d.runs().is_empty(), "{file}: an ignored event runs nothing");
    }
    // Ignored events still need a valid signature.
    let body = fixture("issues/octokit-opened.json");
    let r = post(
        &d,
        &headers(Some("application/json"), Some("issues"), Some("i-2"), None),
        &body,
    );
    assert_error(&r, 401, "X-Hub-Signature-256", "unsigned issues event");
    push_builds(&d, &origin, "after-ignored");
}

#[test]
fn allow_unsigned_accepts_an_unsigned_push_and_warns_at_start() {
    let b = Builder::new().unsigned();
    let origin = Origin::new(b.path());
    let d = b.pipeline("ci", &pipeline(&origin)).start();
    let warning = d
        .log()
        .lines()
        .find(|l| l.contains("WARN") && l.to_lowercase().contains("unsigned"))
        .map(str::to_owned);
    assert!(warning.is_some(), "a warning at start:\n{}", d.log());
    // `deliver` signs nothing for an unsigned daemon.
    let id = push_builds(&d, &origin, "unsigned-1");
    assert_eq!(
        d.get_json(&format!("/api/runs/{id}"))["delivery"],
        "unsigned-1"
    );

    // A signed daemon logs no such warning.
    let d = Builder::new().start();
    assert!(!d.log().to_lowercase().contains("unsigned"), "{}", d.log());
}

const DRONE: &str = "bradrydzewski/drone-test-go";

/// (pipeline, outcome, fragments its reason must contain)
type Expect = &'static [(&'static str, &'static str, &'static [&'static str])];

/// The outcome of a pipeline of another repository: it has no decision at all.
const ABSENT: &str = "absent";

/// The pipelines of `real_push_payloads_are_decided_by_their_exact_bytes` by repository.
const WATCHERS: [(&str, &str); 5] = [
    ("drone", DRONE),
    ("drone-release", DRONE),
    ("hello-tags", "Codertocat/Hello-World"),
    ("envs", "org/repo"),
    ("sample", "binkkatal/sample_app"),
];

#[test]
fn real_push_payloads_are_decided_by_their_exact_bytes() {
    let b = Builder::new();
    // An empty local repository: runs that get this far fail at checkout without the
    // network.
    let empty = Origin::new(b.path());
    let mut d = b
        .pipeline(
            "drone",
            &format!("repo: {DRONE}\nclone_url: {}\nsteps:\n  - run: 'true'\n", empty.url()),
        )
        .pipeline(
            "drone-release",
            &format!(
                "repo: {DRONE}\nclone_url: {}\non:\n  tags: [\"v*\"]\nsteps:\n  - run: 'true'\n",
                empty.url()
            ),
        )
        .pipeline(
            "hello-tags",
            &format!(
                "repo: Codertocat/Hello-World\nclone_url: {}\non:\n  tags: [\"simple-*\"]\nsteps:\n  - run: 'true'\n",
                empty.url()
            ),
        )
        // The payload's own clone_url (github.com), which cannot be fetched here.
        .pipeline(
            "envs",
            "repo: org/repo\non:\n  branches: [\"env/**\"]\nsteps:\n  - run: 'true'\n",
        )
        .pipeline(
            "sample",
            "repo: binkkatal/sample_app\non:\n  branches: [main]\nsteps:\n  - run: 'true'\n",
        )
        .start();
    let table: &[(&str, Expect)] = &[
        (
            "push/drone-branch-deleted.json",
            &[
                (
                    "drone",
                    "not_triggered",
                    &["refs/heads/feature-branch", "deleted"],
                ),
                ("drone-release", "not_triggered", &["deleted"]),
                ("envs", ABSENT, &[]),
            ],
        ),
        (
            "push/drone-tag-deleted.json",
            &[(
                "drone-release",
                "not_triggered",
                &["refs/tags/v0.0.1", "deleted"],
            )],
        ),
        (
            "push/octokit-tag-deleted.json",
            &[
                (
                    "hello-tags",
                    "not_triggered",
                    &["refs/tags/simple-tag", "deleted"],
                ),
                ("drone", ABSENT, &[]),
            ],
        ),
        (
            "push/octokit-tag-deleted-with-installation.json",
            &[("hello-tags", "not_triggered", &["deleted"])],
        ),
        (
            "push/octokit-tag-deleted-with-organization.json",
            &[("hello-tags", "not_triggered", &["deleted"])],
        ),
        (
            "push/argocd-slash-branch-env-dev.json",
            &[
                ("envs", "run", &["refs/heads/env/dev"]),
                ("sample", ABSENT, &[]),
            ],
        ),
        (
            "push/drone-tag-created.json",
            &[
                ("drone-release", "run", &["refs/tags/v0.0.1"]),
                ("drone", "not_triggered", &["v0.0.1", "tags"]),
                ("hello-tags", ABSENT, &[]),
            ],
        ),
        (
            "push/go-playground-branch-push.json",
            &[
                (
                    "sample",
                    "not_triggered",
                    &["\"master\"", "on.branches", "main"],
                ),
                ("drone", ABSENT, &[]),
            ],
        ),
        (
            "push/drone-branch-created-no-commits.json",
            &[
                ("drone", "run", &["refs/heads/feature-branch"]),
                (
                    "drone-release",
                    "not_triggered",
                    &["feature-branch", "tags only"],
                ),
            ],
        ),
    ];
    let mut runs = Vec::new();
    for (i, (file, expect)) in table.iter().enumerate() {
        let body = fixture(file);
        let source: Value = serde_json::from_slice(&body).unwrap();
        let delivery = format!("fixture-{i}");
        let r = d.deliver("push", &delivery, &body);
        assert_eq!(r.status, 202, "{file}: {}", r.text());
        assert_eq!(r.json()["delivery"], delivery.as_str());
        let why = d.get_json(&format!("/api/deliveries/{delivery}"));
        assert_eq!(why["event"], "push", "{file}");
        assert_eq!(why["repo"], source["repository"]["full_name"], "{file}");
        assert_eq!(why["ref"], source["ref"], "{file}");
        assert_eq!(why["after"], source["after"], "{file}");
        let decisions = why["decisions"].as_array().unwrap();
        let repo = source["repository"]["full_name"].as_str().unwrap();
        let mut watching: Vec<&str> = WATCHERS
            .iter()
            .filter(|(_, r)| r.eq_ignore_ascii_case(repo))
            .map(|(p, _)| *p)
            .collect();
        watching.sort_unstable();
        let mut named: Vec<&str> = decisions
            .iter()
            .map(|x| x["pipeline"].as_str().unwrap())
            .collect();
        named.sort_unstable();
        assert_eq!(
            named, watching,
            "one decision per pipeline of the pushed repository: {why:#}"
        );
        for (pipeline, outcome, fragments) in expect.iter() {
            if *outcome == ABSENT {
                assert!(
                    decisions.iter().all(|x| x["pipeline"] != *pipeline),
                    "{file}: {pipeline} watches another repository: {why:#}"
                );
                continue;
            }
            let dec = decisions
                .iter()
                .find(|x| x["pipeline"] == *pipeline)
                .unwrap_or_else(|| panic!("{file}: no decision for {pipeline}: {why:#}"));
            assert_eq!(dec["outcome"], *outcome, "{file} {pipeline}: {dec:#}");
            let reason = dec["reason"].as_str().unwrap();
            for f in fragments.iter() {
                assert!(
                    reason.contains(f),
                    "{file} {pipeline}: {reason:?} lacks {f:?}"
                );
            }
            if *outcome == "run" {
                let id = dec["run"].as_i64().unwrap();
                assert_eq!(r.json()["runs"][0]["id"], id, "{file}");
                runs.push((file, id));
            } else {
                assert!(dec["run"].is_null(), "{file} {pipeline}: {dec:#}");
            }
        }
        let triggered = decisions.iter().filter(|x| x["outcome"] == "run").count();
        assert_eq!(
            r.json()["runs"].as_array().unwrap().len(),
            triggered,
            "{file}: the response names exactly the triggered runs"
        );
    }
    assert_eq!(d.runs().len(), runs.len());
    for (file, id) in runs {
        let run = d.wait_run(id);
        assert_eq!(run["status"], "failed", "{file}: {run:#}");
        let reason = run["reason"].as_str().unwrap();
        assert!(reason.contains("checkout"), "{file}: {reason}");
        assert!(
            run["steps"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["status"] != "succeeded" && s["exit_code"].is_null()),
            "{file}: no step ran: {run:#}"
        );
    }
    // The daemon stops cleanly after all that, without a panic.
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(), Some(0));
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn every_real_push_fixture_is_accepted_and_recorded_as_sent() {
    let d = Builder::new()
        .pipeline("none", "repo: nobody/nothing\nsteps:\n  - run: 'true'\n")
        .start();
    let dir = format!("{}/tests/fixtures/github/push", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "{files:?}");
    for (i, name) in files.iter().enumerate() {
        let body = fixture(&format!("push/{name}"));
        let source: Value = serde_json::from_slice(&body).unwrap();
        let delivery = format!("all-{i}");
        let r = d.deliver("push", &delivery, &body);
        assert_eq!(r.status, 202, "{name}: {}", r.text());
        assert_eq!(
            r.json(),
            json!({ "delivery": delivery, "runs": [] }),
            "{name}"
        );
        let why = d.get_json(&format!("/api/deliveries/{delivery}"));
        assert_eq!(why["ref"], source["ref"], "{name}");
        assert_eq!(why["after"], source["after"], "{name}");
        assert_eq!(why["repo"], source["repository"]["full_name"], "{name}");
        // One decision, naming no pipeline: none watches the pushed repository.
        assert_eq!(
            why["decisions"].as_array().unwrap().len(),
            1,
            "{name}: {why:#}"
        );
        assert!(why["decisions"][0]["pipeline"].is_null(), "{name}: {why:#}");
        let reason = why["decisions"][0]["reason"].as_str().unwrap();
        let repo = source["repository"]["full_name"].as_str().unwrap();
        assert!(
            reason.contains("no pipeline watches") && reason.contains(repo),
            "{name}: {reason}"
        );
        // The same bytes again: a redelivery.
        let again = d.deliver("push", &delivery, &body);
        assert_eq!(again.status, 200, "{name}");
        assert_eq!(again.json()["duplicate"], true, "{name}");
    }
    assert!(d.runs().is_empty());
}

#[test]
fn a_push_that_touches_none_of_on_paths_is_skipped_with_a_reason() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let base = origin.commit("main", &[("lib.rs", "1"), ("README.md", "1")], "base");
    let docs = origin.commit("main", &[("README.md", "2")], "docs only");
    let code = origin.commit("main", &[("lib.rs", "2")], "code");
    let d = b
        .pipeline(
            "ci",
            &format!(
                "repo: {REPO}\nclone_url: {}\non:\n  paths: [\"*.rs\"]\nsteps:\n  - run: 'true'\n",
                origin.url()
            ),
        )
        .start();

    let r = d.deliver(
        "push",
        "paths-docs",
        &PushPayload::new(REPO, "refs/heads/main", &base, &docs, "x").bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    // Whether the filter is decided at intake or once the mirror knows the changed
    // files, the push must not build and must say why.
    let why = d.get_json("/api/deliveries/paths-docs");
    let decision = &why["decisions"][0];
    match decision["run"].as_i64() {
        Some(id) => {
            let run = d.wait_run(id);
            assert_eq!(run["status"], "skipped", "a path filter skips: {run:#}");
            assert!(run["reason"].as_str().unwrap().contains("paths"), "{run:#}");
            assert!(
                run["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|s| s["status"] != "succeeded"),
                "{run:#}"
            );
        }
        None => assert!(
            decision["reason"].as_str().unwrap().contains("paths"),
            "{why:#}"
        ),
    }

    let r = d.deliver(
        "push",
        "paths-code",
        &PushPayload::new(REPO, "refs/heads/main", &docs, &code, "x").bytes(),
    );
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(id)["status"], "succeeded");
}
