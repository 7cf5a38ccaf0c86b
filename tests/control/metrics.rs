//! `/metrics`: counters and histograms kept from the run event stream, intake and the
//! HTTP server, beside the gauges read from the store, as valid Prometheus text that
//! `promtool` (Debian's `prometheus` package) accepts.

use std::collections::HashSet;

use super::*;

#[test]
fn metrics_count_and_time_the_runs_that_ended_in_valid_prometheus_text() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[step("check", "test \"$(cat mode)\" = pass")]),
        )
        .start();
    let mut ids = Vec::new();
    for (i, mode) in ["pass", "fail", "pass"].iter().enumerate() {
        let branch = format!("b{i}");
        let sha = origin.commit(&branch, &[("mode", mode)], "x");
        let id = push(
            &d,
            &format!("metrics-{i}"),
            &format!("refs/heads/{branch}"),
            ZERO,
            &sha,
        );
        ids.push(id);
    }
    for id in &ids {
        d.wait_run(*id);
    }

    let wanted = [
        r#"hookci_runs_total{pipeline="ci",status="succeeded"} 2"#,
        r#"hookci_runs_total{pipeline="ci",status="failed"} 1"#,
        r#"hookci_run_duration_seconds_count{pipeline="ci"} 3"#,
        "hookci_queue_wait_seconds_count 3",
        r#"hookci_runs{status="succeeded"} 2"#,
        r#"hookci_runs{status="failed"} 1"#,
        r#"hookci_runs{status="queued"} 0"#,
    ];
    let mut text = String::new();
    eventually("the runs' ends are counted", || {
        let r = d.get("/metrics");
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
            "{:?}",
            r.header("content-type")
        );
        text = r.text();
        wanted.iter().all(|line| text.lines().any(|l| l == *line))
    });
    assert_valid_prometheus_text(&text);
    promtool_check_metrics(&text);
    for family in [
        "hookci_runs gauge",
        "hookci_runs_total counter",
        "hookci_run_duration_seconds histogram",
        "hookci_queue_wait_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {family}")),
            "{family} in:\n{text}"
        );
    }
}

/// The value of the sample `series` (name and labels exactly as written) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn scrape(d: &Daemon) -> String {
    let r = d.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

#[test]
fn metrics_count_deliveries_pending_reports_and_requests_by_route_name() {
    let github = FakeHttp::start();
    let bad = (502, Vec::new(), "{\"message\":\"Bad Gateway\"}".to_owned());
    github.answer(vec![bad.clone(), bad.clone(), bad]);
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .config(&format!(
            "public_url: https://ci.example.com/\ngithub:\n  api_url: {}\n",
            github.url()
        ))
        .env("HOOKCI_GITHUB_TOKEN", "ghs-metrics-token-keep-out")
        .pipeline("ci", &pipeline(&origin, "", &[step("build", "echo built")]))
        .start();

    let text = scrape(&d);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(
            &text,
            &format!("hookci_build_info{{version=\"{version}\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "# TYPE hookci_build_info gauge"));
    assert_eq!(sample(&text, "hookci_reports_pending"), Some(0.0), "{text}");
    assert!(!text.contains("hookci_deliveries_total{"), "{text}");

    // Skipped by its token: its commit status is the one report, and the receiver
    // answers 502 three times, so it stays pending for a while (1 + 2 + 4 s of backoff).
    let sha = "7".repeat(40);
    let body = push_body("refs/heads/main", ZERO, &sha, "docs [skip ci]");
    let id = push_runs(&d, "metrics-push", &body)[0].1;
    assert_eq!(d.deliver("push", "metrics-push", &body).status, 200);
    assert_eq!(d.deliver("ping", "metrics-ping", b"{}").status, 200);
    assert_eq!(d.deliver("issues", "metrics-issue", b"{}").status, 202);
    // Signed, but a name of the sender's making: it too names no series of its own.
    assert_eq!(
        d.deliver("made_up_event", "metrics-made-up", b"{}").status,
        202
    );
    let unsigned = d.post(
        "/webhook",
        &[
            ("Content-Type", "application/json"),
            ("X-GitHub-Event", "forged_event"),
            ("X-GitHub-Delivery", "metrics-forged"),
        ],
        b"{}",
    );
    assert_eq!(unsigned.status, 401);
    eventually("the report waits in the outbox", || {
        sample(&scrape(&d), "hookci_reports_pending") == Some(1.0)
    });
    let text = scrape(&d);
    for (series, n) in [
        (
            r#"hookci_deliveries_total{event="push",outcome="accepted"}"#,
            1.0,
        ),
        (
            r#"hookci_deliveries_total{event="push",outcome="duplicate"}"#,
            1.0,
        ),
        (
            r#"hookci_deliveries_total{event="ping",outcome="ignored"}"#,
            1.0,
        ),
        (
            r#"hookci_deliveries_total{event="issues",outcome="ignored"}"#,
            1.0,
        ),
        (
            r#"hookci_deliveries_total{event="other",outcome="ignored"}"#,
            1.0,
        ),
        // Nobody vouched for that event name: it names no series of its own.
        (
            r#"hookci_deliveries_total{event="unknown",outcome="unauthorized"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(n), "{series} in:\n{text}");
    }
    assert!(!text.contains("forged_event"), "{text}");
    assert!(!text.contains("made_up_event"), "{text}");

    eventually("the report is sent and leaves the outbox", || {
        sample(&scrape(&d), "hookci_reports_pending") == Some(0.0)
    });
    assert_eq!(d.wait_run(id)["status"], "skipped");
    assert_eq!(github.received().len(), 4);

    // Requests are timed by the route's name, never by the path they asked for.
    let route = |text: &str, name: &str| {
        sample(
            text,
            &format!("hookci_http_request_duration_seconds_count{{route=\"{name}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let before = scrape(&d);
    for _ in 0..3 {
        assert_eq!(d.get("/api/runs").status, 200);
    }
    assert_eq!(d.get(&format!("/runs/{id}")).status, 200);
    assert_eq!(d.get("/runs/987654").status, 404);
    assert_eq!(d.get("/no/such/path-4d2f").status, 404);
    let after = scrape(&d);
    assert_eq!(route(&after, "api_runs") - route(&before, "api_runs"), 3.0);
    assert_eq!(route(&after, "run_page") - route(&before, "run_page"), 2.0);
    assert_eq!(route(&after, "other") - route(&before, "other"), 1.0);
    // The scrape before `after` was itself timed once it was answered.
    assert!(route(&after, "metrics") >= route(&before, "metrics") + 1.0);
    assert_eq!(
        sample(
            &after,
            r#"hookci_http_request_duration_seconds_bucket{route="api_runs",le="+Inf"}"#
        ),
        Some(route(&after, "api_runs")),
        "{after}"
    );
    for raw in ["987654", "path-4d2f", "/api/runs"] {
        assert!(
            !after
                .lines()
                .filter(|l| l.starts_with("hookci_http_request"))
                .any(|l| l.contains(raw)),
            "{raw} in a route label:\n{after}"
        );
    }
    assert!(after
        .lines()
        .any(|l| l == "# TYPE hookci_http_request_duration_seconds histogram"));
    assert_valid_prometheus_text(&after);
    promtool_check_metrics(&after);
}

/// `promtool check metrics` (Debian's `prometheus` package) on a scrape: what a
/// Prometheus server's own tool says of the text, lints included. Required like
/// chromedriver is for the browser test: .ci/run installs it.
fn promtool_check_metrics(text: &str) {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect(
            "this test needs promtool from Debian's prometheus package \
             (apt-get install prometheus; .ci/run installs it)",
        );
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {:?}\n{}{}\non:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The text format's rules (version 0.0.4) as a scraper applies them: comments are
/// `# HELP name text` or `# TYPE name type` (each name typed once, before its samples),
/// a sample is `name{label="value",...} number`, its name the family's or, for a
/// histogram, the family's with `_bucket`, `_sum` or `_count`, and a family's samples
/// come together.
fn assert_valid_prometheus_text(text: &str) {
    assert!(text.ends_with('\n'), "{text}");
    let mut typed: Vec<(String, String)> = Vec::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(valid_name(name), "{line}");
            if kind == "TYPE" {
                let ty = parts.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                    "{line}"
                );
                assert!(!typed.iter().any(|(n, _)| n == name), "typed twice: {line}");
                if let Some(previous) = current.replace(name.to_owned()) {
                    done.insert(previous);
                }
                typed.push((name.to_owned(), ty.to_owned()));
            } else {
                assert_eq!(kind, "HELP", "{line}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "{line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert_valid_labels(labels, line);
        }
        let family = current
            .as_deref()
            .unwrap_or_else(|| panic!("untyped sample {line}"));
        let ty = &typed.iter().find(|(n, _)| n == family).unwrap().1;
        let belongs = name == family
            || (ty == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name == format!("{family}{s}")));
        assert!(belongs, "{line} outside its family {family}");
        assert!(!done.contains(family), "{line}: family {family} resumed");
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `{name="value",...}` with `\\`, `\"` and `\n` the only escapes in a value.
fn assert_valid_labels(labels: &str, line: &str) {
    let inner = labels
        .strip_prefix('{')
        .and_then(|l| l.strip_suffix('}'))
        .unwrap_or_else(|| panic!("{line}"));
    let mut rest = inner;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
        assert!(valid_name(name), "{line}");
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    let escaped = chars.next().map(|(_, c)| c);
                    assert!(matches!(escaped, Some('\\' | '"' | 'n')), "{line}");
                }
                Some((i, '"')) => break i,
                Some(_) => {}
                None => panic!("unterminated label value: {line}"),
            }
        };
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}
