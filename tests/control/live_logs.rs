//! Live logs: server-sent events and `hookci logs -f`.

use super::*;

#[test]
fn run_events_stream_steps_and_output_live_until_the_run_ends() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[gated_step(&gate)]))
        .start();
    let id = push(&d, "sse-1", "refs/heads/main", ZERO, &sha);
    let (head, body) = stream_get(&d.addr, &format!("/api/runs/{id}/events"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );

    eventually(
        "step_started and the first line, while the step waits",
        || {
            let events = sse_events(&body.text());
            find_event(&events, "step_started", |v| v["name"] == "gated").is_some()
                && find_event(&events, "log", |v| log_text_contains(v, "first")).is_some()
        },
    );
    let early = sse_events(&body.text());
    assert!(
        find_event(&early, "log", |v| log_text_contains(v, "second")).is_none()
            && find_event(&early, "run_finished", |_| true).is_none(),
        "{early:?}"
    );
    assert!(!body.ended());
    std::fs::write(&gate, "go").unwrap();

    eventually("the stream ends with the run", || body.ended());
    let events = sse_events(&body.text());
    let at = |name: &str, pred: &dyn Fn(&Value) -> bool| {
        find_event(&events, name, pred).unwrap_or_else(|| panic!("{name} in {events:?}"))
    };
    let started = at("step_started", &|v| v["number"] == 1);
    let first = at("log", &|v| log_text_contains(v, "first"));
    let second = at("log", &|v| log_text_contains(v, "second"));
    let finished = at("step_finished", &|v| v["status"] == "succeeded");
    let run_finished = at("run_finished", &|v| {
        v["id"] == id && v["status"] == "succeeded"
    });
    assert!(
        started < first && first < second && second < finished && finished < run_finished,
        "{events:?}"
    );
    assert_eq!(
        run_finished,
        events.len() - 1,
        "run_finished is last: {events:?}"
    );
}

#[test]
fn hookci_logs_follow_prints_output_as_it_comes_and_exits_when_the_run_ends() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[gated_step(&gate)]))
        .start();
    let id = push(&d, "follow-1", "refs/heads/main", ZERO, &sha);
    let mut child = cli(&["logs", "-f", &id.to_string(), "--url", &d.url("")], None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Captured::spawn(child.stdout.take().unwrap());
    let err = Captured::spawn(child.stderr.take().unwrap());
    eventually("hookci logs -f prints the first line", || {
        out.text().contains("first")
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "still following: {}{}",
        out.text(),
        err.text()
    );
    assert!(!out.text().contains("second"));
    std::fs::write(&gate, "go").unwrap();

    let code = wait_child(&mut child, "hookci logs -f");
    eventually("its output is read", || out.ended());
    let printed = out.text();
    assert_eq!(code, Some(0), "{printed}{}", err.text());
    let (first, second) = (printed.find("first").unwrap(), printed.find("second"));
    assert!(second.is_some_and(|s| s > first), "{printed}");
    assert_eq!(d.wait_run(id)["status"], "succeeded");
}
