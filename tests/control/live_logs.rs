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

/// The keep-alive byte of a followed text log (README, HTTP API).
const SYN: char = '\u{16}';

#[test]
fn quiet_followers_get_keep_alives_while_a_step_is_silent_or_the_run_is_queued() {
    let b = Builder::new().config("max_parallel_runs: 1");
    let origin = Origin::new(b.path());
    let gate = b.path().join("gate");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[gated_step(&gate)]))
        .start();
    let running = {
        let sha = origin.commit("main", &[("a", "1")], "x");
        push(&d, "quiet-1", "refs/heads/main", ZERO, &sha)
    };
    let queued = {
        let sha = origin.commit("other", &[("a", "2")], "x");
        push(&d, "quiet-2", "refs/heads/other", ZERO, &sha)
    };
    let (_, sse) = stream_get(&d.addr, &format!("/api/runs/{running}/events"));
    let (_, text) = stream_get(&d.addr, &format!("/api/runs/{running}/log?follow=1"));
    let (_, waiting) = stream_get(&d.addr, &format!("/api/runs/{queued}/log?follow=1"));
    eventually("the step printed its first line and went silent", || {
        text.text().contains("first")
    });

    eventually_within(
        Duration::from_secs(40),
        "keep-alives on all three streams",
        || {
            sse.text().contains("\n:keep-alive\n")
                && text.text().contains(SYN)
                && waiting.text().contains(SYN)
        },
    );
    assert_eq!(run_of(&d, queued)["status"], "queued");
    assert!(!text.text().contains("second") && !sse.ended() && !text.ended());

    std::fs::write(&gate, "go").unwrap();
    eventually("all three streams end with their runs", || {
        sse.ended() && text.ended() && waiting.ended()
    });
    // The keep-alives are no events and no log text.
    let events = sse_events(&sse.text());
    assert_eq!(
        find_event(&events, "run_finished", |v| v["id"] == running),
        Some(events.len() - 1),
        "{events:?}"
    );
    let printed = text.text().replace(SYN, "");
    assert!(printed.contains("first\nsecond\n"), "{printed}");
    assert!(
        printed.ends_with(&format!("==> run {running} succeeded\n")),
        "{printed}"
    );
    assert!(waiting
        .text()
        .ends_with(&format!("==> run {queued} succeeded\n")));
}

#[test]
fn hookci_logs_follow_outlasts_a_silence_longer_than_its_read_timeout() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let silence = hookci::cli::client::READ_TIMEOUT + Duration::from_secs(5);
    let script = format!("echo before\nsleep {}\necho after", silence.as_secs());
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("quiet", &script)]))
        .start();
    let id = push(&d, "long-quiet-1", "refs/heads/main", ZERO, &sha);
    let mut child = cli(&["logs", "-f", &id.to_string(), "--url", &d.url("")], None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Captured::spawn(child.stdout.take().unwrap());
    let err = Captured::spawn(child.stderr.take().unwrap());

    let code = wait_child_within(silence * 2, &mut child, "hookci logs -f");
    eventually("its output is read", || out.ended());
    let printed = out.text();
    assert_eq!(code, Some(0), "{printed}{}", err.text());
    assert!(
        printed.contains("before\nafter\n")
            && printed.ends_with(&format!("==> run {id} succeeded\n")),
        "{printed}"
    );
    assert!(!printed.contains(SYN), "the keep-alives are dropped");
}

#[test]
fn followers_hear_each_step_as_it_starts_and_ends_not_as_a_later_look_finds_it() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    // Quick steps after the gate: each starts, prints and ends within a few milliseconds,
    // so only a follower told of every transition sees each of them running.
    let quick = 2..=6;
    let mut steps = vec![gated_step(&gate)];
    steps.extend(
        quick
            .clone()
            .map(|n| step(&format!("quick-{n}"), &format!("echo line-{n}"))),
    );
    let d = b.pipeline("ci", &pipeline(&origin, "", &steps)).start();
    let id = push(&d, "events-1", "refs/heads/main", ZERO, &sha);
    let (_, sse) = stream_get(&d.addr, &format!("/api/runs/{id}/events"));
    let (_, text) = stream_get(&d.addr, &format!("/api/runs/{id}/log?follow=1"));
    eventually("both followers have the first line", || {
        text.text().contains("first")
            && find_event(&sse_events(&sse.text()), "log", |v| {
                log_text_contains(v, "first")
            })
            .is_some()
    });
    std::fs::write(&gate, "go").unwrap();

    eventually("both streams end with the run", || {
        sse.ended() && text.ended()
    });
    let events = sse_events(&sse.text());
    let mut last = 0;
    for n in quick {
        let started = find_event(&events, "step_started", |v| v["number"] == n)
            .unwrap_or_else(|| panic!("step {n} started in {events:?}"));
        let (_, data) = &events[started];
        let step: Value = serde_json::from_str(data).unwrap();
        assert_eq!(step["status"], "running", "as it started: {step}");
        assert_eq!(step["finished_at"], Value::Null, "{step}");
        let line = find_event(&events, "log", |v| {
            v["step"] == n && log_text_contains(v, &format!("line-{n}"))
        })
        .unwrap_or_else(|| panic!("step {n}'s line in {events:?}"));
        let finished = find_event(&events, "step_finished", |v| {
            v["number"] == n && v["status"] == "succeeded"
        })
        .unwrap_or_else(|| panic!("step {n} finished in {events:?}"));
        assert!(
            last < started && started < line && line < finished,
            "step {n} in order: {events:?}"
        );
        last = finished;
    }
    let run_finished = find_event(&events, "run_finished", |v| v["status"] == "succeeded");
    assert_eq!(run_finished, Some(events.len() - 1), "{events:?}");
    let printed = text.text().replace(SYN, "");
    for n in 2..=6 {
        assert!(
            printed.contains(&format!(
                "==> step {n}: quick-{n}\nline-{n}\n\n==> step {n} succeeded\n"
            )),
            "{printed}"
        );
    }
}

#[test]
fn followers_past_the_cap_are_refused_with_503_until_places_free() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[gated_step(&gate)]))
        .start();
    let id = push(&d, "cap-1", "refs/heads/main", ZERO, &sha);
    let paths = [
        format!("/api/runs/{id}/events"),
        format!("/api/runs/{id}/log?follow=1"),
    ];
    // Each returns once its answer's head is in, that is once it is following.
    let open: Vec<(String, Captured)> = (0..hookci::web::follow::MAX_FOLLOWERS)
        .map(|i| stream_get(&d.addr, &paths[i % 2]))
        .collect();
    assert!(
        open.iter()
            .all(|(head, _)| head.starts_with("HTTP/1.1 200")),
        "all followed"
    );
    for path in &paths {
        let r = d.get(path);
        assert_json_error(&r, 503, path);
        assert!(r.text().contains("too many followers"), "{}", r.text());
    }

    std::fs::write(&gate, "go").unwrap();
    eventually("every stream ends with the run", || {
        open.iter().all(|(_, body)| body.ended())
    });
    eventually("a follower is let in again", || {
        let r = d.get(&paths[1]);
        r.status == 200 && r.text().ends_with(&format!("==> run {id} succeeded\n"))
    });
}

#[test]
fn a_character_cut_between_two_writes_reaches_the_event_stream_whole() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    // The runner publishes a line that has no end yet once 8 KiB of it are in: 8190
    // bytes and the first two of the euro sign's three, then, a second later, its last
    // byte and the end of the line.
    let script = format!(
        "while [ ! -f {} ]; do sleep 0.05; done\n\
         head -c 8190 /dev/zero | tr '\\0' a\n\
         printf '\\342\\202'\nsleep 1\nprintf '\\254 done\\n'",
        gate.display()
    );
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("euro", &script)]))
        .start();
    let id = push(&d, "utf8-cut", "refs/heads/main", ZERO, &sha);
    let (head, body) = stream_get(&d.addr, &format!("/api/runs/{id}/events"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    eventually("the step started", || {
        find_event(&sse_events(&body.text()), "step_started", |_| true).is_some()
    });
    std::fs::write(&gate, "go").unwrap();
    eventually("the stream ends with the run", || body.ended());

    let events = sse_events(&body.text());
    let texts: Vec<String> = events
        .iter()
        .filter(|(e, _)| e == "log")
        .map(|(_, data)| {
            let v: Value = serde_json::from_str(data).unwrap();
            v["text"].as_str().unwrap().to_owned()
        })
        .collect();
    let whole: String = texts.concat();
    assert_eq!(whole, format!("{}\u{20ac} done\n", "a".repeat(8190)));
    assert!(
        texts.iter().any(|t| t.starts_with('\u{20ac}')),
        "the character came in a piece of its own, after the wait: {texts:?}"
    );
    assert!(texts.iter().all(|t| !t.contains('\u{fffd}')), "{texts:?}");
}

#[test]
fn a_run_page_follows_only_what_comes_after_the_log_it_was_loaded_with() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[gated_step(&gate)]))
        .start();
    let id = push(&d, "page-from", "refs/heads/main", ZERO, &sha);
    eventually("the step printed its first line", || {
        d.run_log(id).contains("first")
    });

    // The page has the log so far, and the stream its script opens starts after it.
    let page = d.get(&format!("/runs/{id}")).text();
    assert!(page.contains("<pre>first\n</pre>"), "{page}");
    let at = page
        .find("data-events=\"")
        .unwrap_or_else(|| panic!("no event stream on the page:\n{page}"));
    let rest = &page[at + "data-events=\"".len()..];
    let url = rest[..rest.find('"').unwrap()].replace("&amp;", "&");
    assert_eq!(url, format!("/api/runs/{id}/events?from=1:6"));
    let (head, body) = stream_get(&d.addr, &url);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    std::fs::write(&gate, "go").unwrap();
    eventually("the stream ends with the run", || body.ended());

    let raw = body.text();
    let events = sse_events(&raw);
    assert!(
        find_event(&events, "log", |v| log_text_contains(v, "first")).is_none(),
        "the page's log was sent again: {events:?}"
    );
    assert!(
        find_event(&events, "step_started", |_| true).is_none(),
        "{events:?}"
    );
    let second = find_event(&events, "log", |v| v["text"] == "second\n");
    let finished = find_event(&events, "step_finished", |v| v["status"] == "succeeded");
    assert!(
        second.is_some() && finished > second,
        "the rest, once: {events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|(e, d)| e == "log" && d.contains("second"))
            .count(),
        1
    );
    // Each event carries the reader's place, for a browser that reconnects.
    assert!(
        raw.replace("\r\n", "\n")
            .lines()
            .any(|l| l == "id:1:13" || l == "id: 1:13"),
        "{raw}"
    );

    // A place in a step the run does not have means nothing.
    let (head, far) = stream_get(
        &d.addr,
        &format!("/api/runs/{id}/events?from=1:6,9223372036854775807:0"),
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    eventually("the stream of the ended run ends", || far.ended());
    let events = sse_events(&far.text());
    assert!(
        find_event(&events, "log", |v| v["text"] == "second\n").is_some()
            && find_event(&events, "run_finished", |_| true).is_some(),
        "{events:?}"
    );

    // A place that is not one is refused, with a reason.
    let r = d.get(&format!("/api/runs/{id}/events?from=one"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("STEP:BYTES"), "{}", r.text());
}

#[test]
fn the_runs_event_stream_tells_each_queueing_start_and_end_and_nothing_else() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[gated_step(&gate)]))
        .start();
    let (head, body) = stream_get(&d.addr, "/api/events");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    let id = push(&d, "all-events", "refs/heads/main", ZERO, &sha);
    let status_of = |status: &'static str| {
        move |v: &Value| v["id"] == id && v["status"] == status && v.get("steps").is_none()
    };
    eventually("the run's queueing and start", || {
        let events = sse_events(&body.text());
        find_event(&events, "run", status_of("running")).is_some()
    });
    std::fs::write(&gate, "go").unwrap();
    eventually("the run's end", || {
        find_event(&sse_events(&body.text()), "run", status_of("succeeded")).is_some()
    });
    let events = sse_events(&body.text());
    let queued = find_event(&events, "run", status_of("queued"));
    let running = find_event(&events, "run", status_of("running"));
    let ended = find_event(&events, "run", status_of("succeeded"));
    assert!(
        queued.is_some() && queued < running && running < ended,
        "{events:?}"
    );
    assert!(
        events.iter().all(|(e, _)| e == "run"),
        "no step or log events: {events:?}"
    );
    assert!(!body.ended(), "the stream outlives the run");
}
