//! A cancel is exact: applied (202, the run ends `canceled`) or refused (409 naming the
//! status it ended with), also when it comes as the run ends.

use super::*;

/// Files the step leaves in its workspace. Removing them takes a moment, which would
/// widen the window between the last step and the stored end, were the removal to
/// come before the end.
const FILES: usize = 2_000;

#[test]
fn cancels_at_a_run_as_it_ends_are_each_applied_or_refused_with_its_final_status() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let config = token_config(&b);
    let gates = b.path().join("gates");
    std::fs::create_dir_all(&gates).unwrap();
    let g = gates.display();
    let script = format!(
        "mkdir junk\n(cd junk && seq 1 {FILES} | xargs touch)\ntouch {g}/$HOOKCI_RUN_ID.ready\n\
         while [ ! -f {g}/$HOOKCI_RUN_ID.go ]; do sleep 0.01; done\ntouch {g}/$HOOKCI_RUN_ID.done"
    );
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "on:\n  branches: [\"**\"]\n",
                &[step("last", &script)],
            ),
        )
        .config(&config)
        .start();
    let mut ended = Vec::new();
    for round in 0..3 {
        let branch = format!("r{round}");
        let sha = origin.commit(&branch, &[("n", &round.to_string())], "x");
        let id = push(&d, &branch, &format!("refs/heads/{branch}"), ZERO, &sha);
        eventually("the step is ready", || {
            gates.join(format!("{id}.ready")).exists()
        });
        std::fs::write(gates.join(format!("{id}.go")), "").unwrap();
        let done = gates.join(format!("{id}.done"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done.exists() {
            assert!(Instant::now() < deadline, "the step never got to its end");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The step is through: every cancel now races the run's end.
        let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
            let burst: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        let mut got = Vec::new();
                        let deadline = Instant::now() + Duration::from_secs(20);
                        while Instant::now() < deadline {
                            let r = api_post(
                                &d,
                                &format!("/api/runs/{id}/cancel"),
                                Some(TOKEN),
                                &json!({}),
                            );
                            let refused = r.status == 409;
                            got.push((r.status, r.json()));
                            if refused {
                                break;
                            }
                        }
                        got
                    })
                })
                .collect();
            burst.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        let run = d.wait_run(id);
        let end = run["status"].as_str().unwrap();
        for (status, body) in &answers {
            match status {
                202 => assert_eq!(end, "canceled", "a cancel answered 202 was lost: {run:#}"),
                409 => {
                    let error = body["error"].as_str().unwrap();
                    assert!(
                        error.contains(&format!("already ended ({end})")),
                        "{error} vs {run:#}"
                    );
                }
                other => panic!("cancel answered {other}: {body}"),
            }
        }
        assert!(
            answers.iter().any(|(s, _)| *s == 409),
            "every canceller was refused in the end: {answers:?}"
        );
        ended.push((id, end.to_owned()));
    }

    // Long over: refused with the status, as a field too, and nothing changes.
    for (id, end) in ended {
        let r = api_post(
            &d,
            &format!("/api/runs/{id}/cancel"),
            Some(TOKEN),
            &json!({}),
        );
        assert_eq!(r.status, 409, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({ "error": format!("run {id} already ended ({end})"), "status": end })
        );
        assert_eq!(run_of(&d, id)["status"], end.as_str());
    }
}
