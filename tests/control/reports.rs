//! Reports against the real daemon and loopback fakes of GitHub's status API, Slack
//! and a webhook receiver: commit statuses through a run's life, retries, a restart
//! with a report due, notifications of a failure and its fix.

use super::*;

const GITHUB_TOKEN: &str = "ghp-test-token-9b2e4d1c-never-logged";
const PUBLIC_URL: &str = "https://ci.example.com";

/// A daemon posting commit statuses to `github` (a fake of the API).
fn reporting(b: Builder, github_url: &str) -> Builder {
    b.config(&format!(
        "public_url: {PUBLIC_URL}/\ngithub:\n  api_url: {github_url}\n"
    ))
    .env("HOOKCI_GITHUB_TOKEN", GITHUB_TOKEN)
}

/// The bodies of the statuses posted for `sha`, in the order they came.
fn statuses(github: &FakeHttp, sha: &str) -> Vec<Value> {
    let path = format!("/repos/{REPO}/statuses/{sha}");
    github
        .received()
        .iter()
        .filter(|r| r.path == path)
        .map(Received::json)
        .collect()
}

/// Waits for a status of `sha` other than `pending`, and returns all of them.
fn until_final(github: &FakeHttp, sha: &str) -> Vec<Value> {
    eventually(&format!("a final status for {sha}"), || {
        statuses(github, sha)
            .iter()
            .any(|s| s["state"] != "pending")
    });
    statuses(github, sha)
}

fn reports(d: &Daemon, id: i64) -> Vec<Value> {
    run_of(d, id)["reports"].as_array().unwrap().clone()
}

/// Waits until every report of run `id` is sent.
fn all_sent(d: &Daemon, id: i64) -> Vec<Value> {
    eventually(&format!("the reports of run {id} are sent"), || {
        let r = reports(d, id);
        !r.is_empty() && r.iter().all(|x| x["state"] == "sent")
    });
    reports(d, id)
}

#[test]
fn a_green_run_posts_pending_then_success_with_context_link_and_token() {
    let github = FakeHttp::start();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let gate = b.path().join("gate");
    let sha = origin.commit("main", &[("a", "1")], "one");
    let steps = [gated_step(&gate), step("test", "echo tested")];
    let d = reporting(b, &github.url())
        .pipeline("ci", &pipeline(&origin, "", &steps))
        .start();
    let id = push(&d, "green-1", "refs/heads/main", ZERO, &sha);
    // Held in its first step until a pending status is out: a newer state would
    // otherwise replace one not yet sent.
    eventually("a pending status", || !statuses(&github, &sha).is_empty());
    std::fs::write(&gate, "go").unwrap();
    assert_eq!(d.wait_run(id)["status"], "succeeded");

    let posted = until_final(&github, &sha);
    assert_eq!(posted.first().unwrap()["state"], "pending", "{posted:#?}");
    let last = posted.last().unwrap();
    assert_eq!(last["state"], "success", "{posted:#?}");
    assert_eq!(last["description"], "succeeded");
    for (i, status) in posted.iter().enumerate() {
        assert_eq!(status["context"], "hookci/ci");
        assert_eq!(
            status["target_url"],
            format!("{PUBLIC_URL}/runs/{id}"),
            "{status}"
        );
        if i + 1 < posted.len() {
            let description = status["description"].as_str().unwrap();
            assert!(
                [
                    "queued",
                    "running",
                    "running step 1/2: gated",
                    "running step 2/2: test"
                ]
                .contains(&description),
                "{description}"
            );
        }
    }
    for request in github.received() {
        assert_eq!(request.method, "POST");
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {GITHUB_TOKEN}").as_str())
        );
        assert_eq!(
            request.header("accept"),
            Some("application/vnd.github+json")
        );
        assert_eq!(request.header("x-github-api-version"), Some("2022-11-28"));
    }
    let shown = all_sent(&d, id);
    let last = shown.last().unwrap();
    let keys: Vec<&str> = last
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["attempts", "reason", "state", "target"], "{last}");
    assert_eq!(last["target"], "github:hookci/ci");
    assert_eq!(last["attempts"], 1);
    assert!(last["reason"].is_null());
    assert!(!d.log().contains(GITHUB_TOKEN), "the token was logged");
}

#[test]
fn a_failing_run_posts_failure_naming_the_step() {
    let github = FakeHttp::start();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "one");
    let steps = [step("build", "echo built"), step("unit tests", "exit 3")];
    let d = reporting(b, &github.url())
        .pipeline("ci", &pipeline(&origin, "", &steps))
        .start();
    let id = push(&d, "red-1", "refs/heads/main", ZERO, &sha);
    assert_eq!(d.wait_run(id)["status"], "failed");
    let last = until_final(&github, &sha).pop().unwrap();
    assert_eq!(last["state"], "failure");
    assert_eq!(
        last["description"],
        "step \"unit tests\" exited with code 3"
    );
}

#[test]
fn a_path_skipped_run_posts_success_skipped() {
    let github = FakeHttp::start();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let first = origin.commit("main", &[("lib.rs", "1")], "code");
    let docs = origin.commit("main", &[("README.md", "words")], "docs");
    let d = reporting(b, &github.url())
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "on:\n  paths: [\"*.rs\"]\n",
                &[step("build", "echo built")],
            ),
        )
        .start();
    let id = push(&d, "docs-1", "refs/heads/main", &first, &docs);
    assert_eq!(d.wait_run(id)["status"], "skipped");
    let last = until_final(&github, &docs).pop().unwrap();
    assert_eq!(last["state"], "success");
    let description = last["description"].as_str().unwrap();
    assert!(
        description.starts_with("skipped: no changed file matches on.paths"),
        "{description}"
    );
    assert!(description.chars().count() <= 140, "{description}");
}

#[test]
fn a_superseded_run_posts_error_with_the_run_that_superseded_it() {
    let github = FakeHttp::start();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let gate = b.path().join("gate");
    let c1 = origin.commit("main", &[("n", "1")], "one");
    let c2 = origin.commit("main", &[("n", "2")], "two");
    let c3 = origin.commit("main", &[("n", "3")], "three");
    let d = reporting(b, &github.url())
        .pipeline("ci", &pipeline(&origin, "", &[gated_step(&gate)]))
        .start();
    let first = push(&d, "s-1", "refs/heads/main", ZERO, &c1);
    wait_status(&d, first, "running");
    let second = push(&d, "s-2", "refs/heads/main", &c1, &c2);
    let third = push(&d, "s-3", "refs/heads/main", &c2, &c3);
    std::fs::write(&gate, "go").unwrap();
    assert_eq!(d.wait_run(second)["status"], "canceled");
    let last = until_final(&github, &c2).pop().unwrap();
    assert_eq!(last["state"], "error");
    assert_eq!(last["description"], format!("superseded by run {third}"));
    assert_eq!(until_final(&github, &c3).pop().unwrap()["state"], "success");
}

#[test]
fn a_receiver_answering_502_twice_gets_the_status_on_the_third_try() {
    let github = FakeHttp::start();
    let bad = (502, Vec::new(), "{\"message\":\"Bad Gateway\"}".to_owned());
    github.answer(vec![bad.clone(), bad]);
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = reporting(b, &github.url())
        .pipeline("ci", &pipeline(&origin, "", &[step("build", "echo built")]))
        .start();
    // Skipped at once by its token: its one status is the only report.
    let sha = "5".repeat(40);
    let body = push_body("refs/heads/main", ZERO, &sha, "wip [skip ci]");
    let runs = push_runs(&d, "retry-1", &body);
    let id = runs[0].1;
    let posted = github.wait_for(3);
    assert_eq!(posted.len(), 3, "{posted:?}");
    assert!(posted.iter().all(|r| r.body == posted[0].body));
    assert_eq!(posted[0].json()["state"], "success");
    let shown = all_sent(&d, id);
    assert_eq!(shown.len(), 1, "{shown:#?}");
    assert_eq!(shown[0]["attempts"], 3);
    assert!(d.log().contains("HTTP 502: Bad Gateway"), "{}", d.log());
}

#[test]
fn a_receiver_refusing_with_422_is_not_tried_again_and_the_run_says_why() {
    let github = FakeHttp::start();
    let refused = (
        422,
        Vec::new(),
        "{\"message\":\"No commit found for SHA\"}".to_owned(),
    );
    github.answer(vec![refused]);
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = reporting(b, &github.url())
        .pipeline("ci", &pipeline(&origin, "", &[step("build", "echo built")]))
        .start();
    let sha = "6".repeat(40);
    let body = push_body("refs/heads/main", ZERO, &sha, "wip [skip ci]");
    let id = push_runs(&d, "refused-1", &body)[0].1;
    eventually("the refused status is given up", || {
        reports(&d, id).iter().any(|r| r["state"] == "failed")
    });
    let shown = reports(&d, id);
    assert_eq!(shown.len(), 1, "{shown:#?}");
    assert_eq!(shown[0]["attempts"], 1, "{shown:#?}");
    assert_eq!(
        shown[0]["reason"], "HTTP 422: No commit found for SHA",
        "{shown:#?}"
    );
    // Given up for good: the fake, which would now accept it, never sees it again.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(github.received().len(), 1, "{:?}", github.received());
}

#[test]
fn a_status_due_while_github_is_down_is_delivered_after_a_sigkill_and_restart() {
    // A port nothing listens on, until the fake comes up there.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = down.local_addr().unwrap();
    drop(down);
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let mut d = reporting(b, &format!("http://{addr}"))
        .pipeline("ci", &pipeline(&origin, "", &[step("build", "echo built")]))
        .start();
    let sha = "6".repeat(40);
    let body = push_body("refs/heads/main", ZERO, &sha, "docs [skip ci]");
    let id = push_runs(&d, "down-1", &body)[0].1;
    eventually("a failed attempt", || {
        reports(&d, id)
            .first()
            .is_some_and(|r| r["state"] == "pending" && r["attempts"].as_i64() >= Some(1))
    });
    let reason = reports(&d, id)[0]["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("refused"), "{reason}");
    assert!(
        !reason.contains("127.0.0.1"),
        "no URL in a reason: {reason}"
    );
    d.signal(libc::SIGKILL);
    d.wait();

    let github = FakeHttp::at(addr);
    d.spawn();
    let posted = github.wait_for(1);
    assert_eq!(posted[0].path, format!("/repos/{REPO}/statuses/{sha}"));
    assert_eq!(posted[0].json()["state"], "success");
    let shown = all_sent(&d, id);
    assert!(shown[0]["attempts"].as_i64().unwrap() >= 2, "{shown:#?}");
}

#[test]
fn a_failure_then_a_fix_notify_slack_discord_and_a_signed_webhook() {
    let slack = FakeHttp::start();
    let discord = FakeHttp::start();
    let hook = FakeHttp::start();
    let discord_url = format!("{}/api/webhooks/1/discord-token-5e9a", discord.url());
    let slack_url = format!("{}/services/T0/B0/slack-secret-path-41d7", slack.url());
    let signing_key = "webhook-signing-key-8c3f";
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let bad = origin.commit("main", &[("mode", "bad")], "break");
    let good = origin.commit("main", &[("mode", "ok")], "fix");
    let notify = format!(
        "secrets: [SLACK_URL, DISCORD_URL, HOOK_KEY]\nnotify:\n  - slack: SLACK_URL\n  - discord: DISCORD_URL\n    on: [failure]\n  - webhook: {}/ci\n    secret: HOOK_KEY\n    on: [always]\n",
        hook.url()
    );
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                &notify,
                &[step("check", "[ \"$(cat mode)\" = ok ]")],
            ),
        )
        .config(&format!("public_url: {PUBLIC_URL}"))
        .env("HOOKCI_SECRET_SLACK_URL", &slack_url)
        .env("HOOKCI_SECRET_DISCORD_URL", &discord_url)
        .env("HOOKCI_SECRET_HOOK_KEY", signing_key)
        .start();
    let broken = push(&d, "n-1", "refs/heads/main", ZERO, &bad);
    assert_eq!(d.wait_run(broken)["status"], "failed");
    slack.wait_for(1);
    hook.wait_for(1);
    let fixed = push(&d, "n-2", "refs/heads/main", &bad, &good);
    assert_eq!(d.wait_run(fixed)["status"], "succeeded");
    let said = slack.wait_for(2);
    let hooked = hook.wait_for(2);
    all_sent(&d, fixed);
    // `on: [failure]`: told of the failure only.
    let told = discord.received();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].path, "/api/webhooks/1/discord-token-5e9a");
    let content = told[0].json()["content"].as_str().unwrap().to_owned();
    assert!(content.starts_with("ci failed on main ("), "{content}");

    assert!(said
        .iter()
        .all(|r| r.path == "/services/T0/B0/slack-secret-path-41d7"));
    let failure = said[0].json()["text"].as_str().unwrap().to_owned();
    let short = &bad[..7];
    assert!(
        failure.starts_with(&format!(
            "ci failed on main ({short}): failing step \"check\""
        )),
        "{failure}"
    );
    assert!(
        failure.ends_with(&format!("{PUBLIC_URL}/runs/{broken}")),
        "{failure}"
    );
    let fix = said[1].json()["text"].as_str().unwrap().to_owned();
    assert!(
        fix.starts_with(&format!("ci is fixed on main ({})", &good[..7])),
        "{fix}"
    );

    for (request, (id, outcome)) in hooked.iter().zip([(broken, "failure"), (fixed, "fixed")]) {
        assert_eq!(request.path, "/ci");
        assert_eq!(request.header("x-hookci-event"), Some("run.finished"));
        assert_eq!(
            request.header("x-hookci-signature-256"),
            Some(hookci::intake::sign(signing_key.as_bytes(), &request.body).as_str()),
            "the signature is the HMAC of the exact body"
        );
        let body = request.json();
        assert_eq!(body["id"], id);
        assert_eq!(body["event"], "run.finished");
        assert_eq!(body["outcome"], outcome);
        assert_eq!(body["url"], format!("{PUBLIC_URL}/runs/{id}"));
        assert_eq!(body["steps"][0]["name"], "check");
    }
    let shown = all_sent(&d, broken);
    let targets: Vec<&str> = shown
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        [
            "slack:SLACK_URL",
            "discord:DISCORD_URL",
            "webhook:127.0.0.1"
        ]
    );
    let api = run_of(&d, broken).to_string();
    let log = d.log();
    for secret in [
        slack_url.as_str(),
        "slack-secret-path-41d7",
        discord_url.as_str(),
        "discord-token-5e9a",
        signing_key,
    ] {
        assert!(!log.contains(secret), "{secret} in the log");
        assert!(!api.contains(secret), "{secret} in the API");
    }
}
