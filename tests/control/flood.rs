//! HTTP is bounded before authentication: unsigned clients that announce large bodies
//! and send them slowly cannot make the daemon hold their bytes, and a signed push
//! still gets through at once.

use super::*;
use std::net::TcpStream;

const CONNECTIONS: usize = 300;
const ANNOUNCED: usize = 25 * 1024 * 1024;
/// What each connection sends at once before it trickles.
const UPFRONT: usize = 512 * 1024;

fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

/// Lets this process hold the flood's sockets.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a struct owned here.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// Opens a connection announcing a 25 MiB signed-looking webhook and sends what the
/// socket takes of `UPFRONT` bytes without waiting.
fn flood_connection(addr: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(
        s,
        "POST /webhook HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: push\r\nX-GitHub-Delivery: flood\r\n\
         X-Hub-Signature-256: sha256={}\r\nContent-Length: {ANNOUNCED}\r\n\r\n",
        "0".repeat(64)
    )
    .ok()?;
    s.set_nonblocking(true).ok()?;
    let chunk = vec![b' '; UPFRONT];
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_millis(200);
    while sent < UPFRONT && Instant::now() < deadline {
        match s.write(&chunk[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => break,
        }
    }
    Some(s)
}

#[test]
fn slow_unsigned_bodies_cannot_fill_the_daemon_and_a_signed_push_still_gets_202() {
    raise_fd_limit();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let d = b
        .pipeline("p", &pipeline(&origin, "", &[step("s", "true")]))
        .start();
    let before = rss_bytes(d.pid());
    let mut flood: Vec<TcpStream> = (0..CONNECTIONS)
        .filter_map(|_| flood_connection(&d.addr))
        .collect();
    assert!(
        flood.len() >= CONNECTIONS * 9 / 10,
        "{} connections",
        flood.len()
    );
    // Trickle: one byte a connection, a few rounds, while measuring.
    let mut peak = 0;
    for _ in 0..10 {
        for s in &mut flood {
            let _ = s.write(b" ");
        }
        peak = peak.max(rss_bytes(d.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    let r = d.deliver(
        "push",
        "flood-push-1",
        &push_body("refs/heads/main", ZERO, &sha, "x"),
    );
    let answered = started.elapsed();
    peak = peak.max(rss_bytes(d.pid()));
    eprintln!(
        "flood of {} connections: daemon RSS {} KiB before, {} KiB at most during; signed push answered {} in {answered:?}",
        flood.len(),
        before / 1024,
        peak / 1024,
        r.status
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(
        answered < Duration::from_secs(1),
        "the push took {answered:?}"
    );
    assert!(
        peak < 100 * 1024 * 1024,
        "daemon RSS reached {} KiB",
        peak / 1024
    );
    drop(flood);
}

#[test]
fn bodies_that_announce_the_budget_and_trickle_hold_only_what_they_sent() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let d = b
        .pipeline("p", &pipeline(&origin, "", &[step("s", "true")]))
        .config("max_body_bytes: 1048576\nmax_unverified_bytes: 3145728")
        .start();
    // Three bodies announce a third of the budget each, send a little, then trickle.
    let mut slow: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(&d.addr).unwrap();
            write!(
                s,
                "POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 X-GitHub-Event: push\r\nX-GitHub-Delivery: slow\r\n\
                 X-Hub-Signature-256: sha256={}\r\nContent-Length: 1048576\r\n\r\n{{\"a\":\"",
                "0".repeat(64)
            )
            .unwrap();
            s
        })
        .collect();
    // Long enough for the daemon to have read every announcement.
    for _ in 0..5 {
        for s in &mut slow {
            s.write_all(b"x").unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = d.deliver(
        "push",
        "trickle-push-1",
        &push_body("refs/heads/main", ZERO, &sha, "x"),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    // The slow bodies are still being taken, not refused.
    for s in &mut slow {
        s.write_all(b"x").unwrap();
    }
    drop(slow);
}

/// Sends `head` on a new connection and returns the status line of the answer read
/// within `wait` (empty if none came).
fn status_line(addr: &str, head: &str, wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line
}

#[test]
fn past_the_unverified_budget_a_body_gets_503_with_retry_after_and_a_slow_one_408() {
    let d = Builder::new()
        .config("max_body_bytes: 65536\nmax_unverified_bytes: 65536")
        .start();
    let head = |len: usize| {
        format!(
            "POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             X-GitHub-Event: push\r\nX-GitHub-Delivery: budget\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    // Announces 60 000 bytes and sends 58 000: what it holds fills the budget.
    let mut slow = TcpStream::connect(&d.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        slow,
        "{}{{\"partial\":\"{}",
        head(60_000),
        "x".repeat(58_000)
    )
    .unwrap();
    // A probe that came first would take its own share and leave too little for the
    // slow body, which would then be the one refused: give the daemon time to read
    // the slow body's headers before probing.
    std::thread::sleep(Duration::from_secs(1));
    let probe = format!("{}{}", head(10_000), " ".repeat(10_000));
    eventually("the slow body holds its share", || {
        status_line(&d.addr, &probe, Duration::from_secs(2)).starts_with("HTTP/1.1 503")
    });
    let mut answer = String::new();
    let mut reader = BufReader::new(TcpStream::connect(&d.addr).unwrap());
    reader
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    reader.get_mut().write_all(probe.as_bytes()).unwrap();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        answer.push_str(&line.to_ascii_lowercase());
    }
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 5"), "{answer}");

    // Its body never arrives whole: 408 at the deadline.
    let mut line = String::new();
    BufReader::new(slow).read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 408"), "{line:?}");
}

#[test]
fn past_max_connections_a_new_connection_waits_until_one_closes() {
    let d = Builder::new().config("max_connections: 2").start();
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&d.addr).unwrap())
        .collect();
    let mut third = TcpStream::connect(&d.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let early = third.read(&mut buf);
    assert!(
        early.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "answered past the cap: {early:?}"
    );
    drop(held);
    third
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    BufReader::new(third).read_line(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// Reads one response from a kept-alive connection and returns its status line; `None`
/// if the connection was closed before one came.
fn response_on(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut status = String::new();
    if reader.read_line(&mut status).ok()? == 0 {
        return None;
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    Some(status.trim_end().to_owned())
}

fn keep_alive_connection(addr: &str) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).unwrap();
    // Well inside the 30 s header timeout, which closes idle connections too.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn an_idle_keep_alive_connection_is_closed_after_keep_alive_timeout_and_a_busy_one_is_not() {
    let d = Builder::new().config("keep_alive_timeout: 1s").start();

    let mut idle = keep_alive_connection(&d.addr);
    idle.get_mut().write_all(HEALTHZ).unwrap();
    assert_eq!(response_on(&mut idle).as_deref(), Some("HTTP/1.1 200 OK"));
    let mut rest = Vec::new();
    let closed = idle.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)),
        "the idle connection was not closed: {closed:?}"
    );

    // Requests every 400 ms for 3 s: never idle long enough.
    let mut busy = keep_alive_connection(&d.addr);
    for _ in 0..8 {
        busy.get_mut().write_all(HEALTHZ).unwrap();
        assert_eq!(response_on(&mut busy).as_deref(), Some("HTTP/1.1 200 OK"));
        std::thread::sleep(Duration::from_millis(400));
    }

    // A request in flight is not idle, however quiet: its body pauses for 2 s.
    let mut slow = keep_alive_connection(&d.addr);
    let body = b"{\"zen\": \"quiet\"}";
    write!(
        slow.get_mut(),
        "POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: ping\r\nX-GitHub-Delivery: quiet\r\nContent-Length: {}\r\n\r\n{{",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    slow.get_mut().write_all(&body[1..]).unwrap();
    let answer = response_on(&mut slow);
    assert!(
        answer
            .as_deref()
            .is_some_and(|s| s.starts_with("HTTP/1.1 401")),
        "{answer:?}"
    );
}
