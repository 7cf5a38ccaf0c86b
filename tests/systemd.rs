//! hookci as a systemd service, against the real binary: the notify socket hears
//! `READY=1`, `RELOADING=1` with `MONOTONIC_USEC` then `READY=1` around a reload,
//! `WATCHDOG=1` from the scheduler and a current `STATUS=` line; a socket passed by
//! `systemd-socket-activate` serves, and a passed descriptor that is not a listening
//! socket is refused.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

#[test]
fn the_notify_socket_hears_ready_reloading_watchdog_and_a_current_status() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let notify = NotifySocket::bind(b.path());
    let mut d = b
        .config("watch_pipelines: false")
        .pipeline(
            "ci",
            &format!(
                "repo: {REPO}\nclone_url: {}\nsteps:\n  - run: \"true\"\n",
                origin.url()
            ),
        )
        .env("NOTIFY_SOCKET", notify.env())
        // A beat every 0.25 s.
        .env("WATCHDOG_USEC", "500000")
        .start();
    // In any order: the scheduler starts before the daemon says it is ready.
    let mut seen = Vec::new();
    notify.until("READY=1, WATCHDOG=1 and a status line", |m| {
        seen.push(m.to_owned());
        ["READY=1", "WATCHDOG=1"]
            .iter()
            .all(|w| seen.iter().any(|s| s == w))
            && seen.iter().any(|s| s.starts_with("STATUS="))
    });
    assert!(
        seen.iter()
            .any(|s| s == "STATUS=0 running, 0 queued; no delivery since start"),
        "{seen:?}"
    );

    let body = PushPayload::new(
        REPO,
        "refs/heads/main",
        ZERO,
        &sha,
        "https://example.invalid/x.git",
    )
    .bytes();
    let r = d.deliver("push", "status-1", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["runs"][0]["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(id)["status"], "succeeded");
    let status = notify.until("the delivery in the status", |m| {
        m.starts_with("STATUS=0 running, 0 queued; last delivery 20")
    });
    assert!(status.ends_with('Z'), "{status}");

    d.signal(libc::SIGHUP);
    let reloading = notify.until("RELOADING=1", |m| m.starts_with("RELOADING=1"));
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec.parse::<u64>().unwrap() > 0, "{reloading:?}");
    assert_eq!(notify.recv_state(), "READY=1");
    // The scheduler goes on feeding the watchdog after the reload.
    notify.until("the watchdog is fed after the reload", |m| {
        m == "WATCHDOG=1"
    });

    d.signal(libc::SIGTERM);
    assert_eq!(notify.recv_state(), "STOPPING=1");
    assert_eq!(d.wait(), Some(0), "{}", d.log());
}

/// A port nothing listens on now (bound, then let go).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn a_socket_passed_by_systemd_socket_activate_serves() {
    let b = Builder::new();
    let config = b.write_config();
    let port = free_port();
    let mut child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-E")
        .arg("HOOKCI_LOG=info")
        .arg(bin())
        .arg("serve")
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd)");
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let text = || log.lock().unwrap().clone();
    eventually("the socket is passed on", || {
        text().contains(&format!("Listening on 127.0.0.1:{port}"))
    });

    // The first connection starts hookci, which answers on the socket it was passed.
    let url = format!("http://127.0.0.1:{port}");
    let r = hookci::cli::client::request("GET", &format!("{url}/healthz"), &[], b"").unwrap();
    assert_eq!(r.status, 200, "{}", text());
    let r = hookci::cli::client::request("GET", &format!("{url}/api/runs"), &[], b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        text().contains("serving on the socket systemd passed"),
        "{}",
        text()
    );
    // systemd-socket-activate became hookci (exec): a SIGTERM stops it cleanly.
    eventually("hookci says it listens", || text().contains(" listening"));
    // SAFETY: signalling our own child process by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{}", text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", text());
}

#[test]
fn a_passed_descriptor_that_is_not_a_listening_socket_is_refused() {
    let b = Builder::new();
    let config = b.write_config();
    // LISTEN_PID must name the process itself: the shell's pid, which exec keeps.
    let out = Command::new("sh")
        .arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve -c \"$1\" 3</dev/null")
        .arg(bin())
        .arg(&config)
        .env_remove("HOOKCI_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot use the socket systemd passed")
            && err.contains("not a listening TCP socket"),
        "{err}"
    );
}
