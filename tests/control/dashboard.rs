//! The dashboard's pages and badges over real HTTP: payload values render as text,
//! the read token closes every page and read API call but `/healthz`, `/metrics` and
//! badges, and the buttons need the API token's session and the page's CSRF token.

use super::*;

const READ_TOKEN: &str = "read-token-7e21b0c4-keep-out-of-logs";
const EVIL: &str = "<script>alert(1)</script>";

fn get_as(d: &Daemon, path: &str, headers: &[(&str, &str)]) -> Response {
    hookci::cli::client::request("GET", &d.url(path), headers, b"").unwrap()
}

fn post_form(d: &Daemon, path: &str, cookie: Option<&str>, form: &str) -> Response {
    let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
    if let Some(c) = cookie {
        headers.push(("Cookie", c));
    }
    d.post(path, &headers, form.as_bytes())
}

/// Logs in through the form with `token`; the session cookie (`name=value`).
fn login(d: &Daemon, token: &str) -> String {
    let r = post_form(
        d,
        "/login",
        None,
        &format!("token={token}&next=%2Fpipelines"),
    );
    assert_eq!(r.status, 303, "login: {}", r.text());
    assert_eq!(r.header("location"), Some("/pipelines"));
    let cookie = r.header("set-cookie").expect("a session cookie").to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    assert!(
        !cookie.contains(token),
        "the cookie holds the token itself: {cookie}"
    );
    cookie.split(';').next().unwrap().to_owned()
}

/// The CSRF token in a page's forms.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no CSRF field in:\n{page}"));
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

fn wait_final(d: &Daemon, id: i64, auth: &str) -> Value {
    let mut run = Value::Null;
    eventually(&format!("run {id} ends"), || {
        run = get_as(d, &format!("/api/runs/{id}"), &[("Authorization", auth)]).json();
        !matches!(run["status"].as_str(), Some("queued" | "running"))
    });
    run
}

#[test]
fn pages_show_runs_steps_logs_and_decisions_with_payload_values_as_text() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let branch = EVIL;
    let sha = origin.commit(branch, &[("a", "1")], EVIL);
    let d = b
        .pipeline(
            "ci",
            &pipeline(
                &origin,
                "",
                &[
                    step(
                        "build",
                        "printf '\\033[31mred <b>bold</b>\\033[0m plain\\n'",
                    ),
                    step("check", "echo \"$HOOKCI_BRANCH\""),
                ],
            ),
        )
        .start();
    let body = push_body(&format!("refs/heads/{branch}"), ZERO, &sha, EVIL);
    let runs = push_runs(&d, "evil-delivery", &body);
    let id = runs[0].1;
    assert_eq!(d.wait_run(id)["status"], "succeeded");

    let escaped = "&lt;script&gt;alert(1)&lt;/script&gt;";
    for path in [
        "/".to_owned(),
        format!("/runs/{id}"),
        "/pipelines".to_owned(),
        "/pipelines/ci".to_owned(),
        "/deliveries/evil-delivery".to_owned(),
        "/?pipeline=ci&status=succeeded".to_owned(),
    ] {
        let r = d.get(&path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(
            r.header("content-type").unwrap().starts_with("text/html"),
            "{path}"
        );
        let page = r.text();
        assert!(
            page.contains(escaped),
            "{path} shows the branch as text:\n{page}"
        );
        assert!(
            !page.contains(EVIL),
            "{path} has the branch as markup:\n{page}"
        );
        assert!(page.contains("name=\"viewport\""), "{path}: viewport meta");
    }
    let run_page = d.get(&format!("/runs/{id}")).text();
    // The step's colour became a class, its HTML became text.
    assert!(
        run_page.contains("<span class=\"f1\">red &lt;b&gt;bold&lt;/b&gt;</span> plain"),
        "{run_page}"
    );
    for text in ["build", "check", "succeeded", "exit 0", "evil-delivery"] {
        assert!(run_page.contains(text), "{text} on the run page");
    }
    // The delivery page says why the pipeline ran.
    let delivery = d.get("/deliveries/evil-delivery").text();
    assert!(delivery.contains(&format!("/runs/{id}")), "{delivery}");

    // Filters and paging: a status that matches nothing, and bad input refused.
    let none = d.get("/?status=failed").text();
    assert!(!none.contains(&format!("href=\"/runs/{id}\"")), "{none}");
    assert_eq!(d.get("/?status=nonsense").status, 400);
    assert_eq!(d.get("/?before=x").status, 400);
    assert_eq!(d.get("/runs/999999").status, 404);
    assert_eq!(d.get("/pipelines/nope").status, 404);
    assert_eq!(d.get("/deliveries/nope").status, 404);

    // The badge: public, short cache, the last finished run's status.
    let badge = d.get("/badge/ci.svg");
    assert_eq!(badge.status, 200);
    assert_eq!(badge.header("content-type"), Some("image/svg+xml"));
    assert!(badge
        .header("cache-control")
        .is_some_and(|c| c.contains("max-age=60")));
    assert!(badge.text().contains("succeeded"), "{}", badge.text());
    let on_ref = d.get("/badge/ci.svg?ref=%3Cscript%3Ealert(1)%3C%2Fscript%3E");
    assert!(on_ref.text().contains("succeeded"), "{}", on_ref.text());
    assert!(d.get("/badge/ci.svg?ref=main").text().contains("no runs"));
    assert_eq!(d.get("/badge/nope.svg").status, 404);

    // Assets are served from the binary.
    let css = d.get("/assets/hookci.css");
    assert_eq!(css.status, 200);
    assert!(css.text().contains(".st-succeeded"));
    assert!(d.get("/assets/hookci.js").text().contains("EventSource"));
}

#[test]
fn the_read_token_closes_pages_and_the_read_api_but_not_health_metrics_or_badges() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let config = token_config(&b);
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[step("ok", "echo fine")]))
        .config(&config)
        .env("HOOKCI_READ_TOKEN", READ_TOKEN)
        .start();
    let id = push(&d, "closed", "refs/heads/main", ZERO, &sha);
    let read_auth = format!("Bearer {READ_TOKEN}");
    let api_auth = format!("Bearer {TOKEN}");
    assert_eq!(wait_final(&d, id, &read_auth)["status"], "succeeded");

    let pages = [
        "/".to_owned(),
        "/?status=succeeded".to_owned(),
        format!("/runs/{id}"),
        "/pipelines".to_owned(),
        "/pipelines/ci".to_owned(),
        "/deliveries/closed".to_owned(),
    ];
    let api = [
        "/api/runs".to_owned(),
        format!("/api/runs/{id}"),
        format!("/api/runs/{id}/log"),
        format!("/api/runs/{id}/log?follow=1"),
        format!("/api/runs/{id}/events"),
        "/api/deliveries/closed".to_owned(),
    ];
    // The runs event stream never ends by itself, so only its refusal is asked for.
    assert_json_error(&d.get("/api/events"), 401, "/api/events");
    let read_cookie = login(&d, READ_TOKEN);
    let api_cookie = login(&d, TOKEN);
    for path in pages.iter().chain(&api) {
        let r = d.get(path);
        if path.starts_with("/api/") {
            assert_json_error(&r, 401, path);
        } else {
            assert_eq!(r.status, 303, "{path}: {}", r.text());
            let to = r.header("location").unwrap();
            assert!(to.starts_with("/login?next=/"), "{path} -> {to}");
        }
        for (what, header) in [
            ("wrong token", ("Authorization", "Bearer nope")),
            ("wrong cookie", ("Cookie", "hookci_session=nope")),
        ] {
            let status = get_as(&d, path, &[header]).status;
            assert!(
                status == 401 || status == 303,
                "{path} with a {what}: {status}"
            );
        }
        for (what, header) in [
            ("read token", ("Authorization", read_auth.as_str())),
            ("API token", ("Authorization", api_auth.as_str())),
            ("read session", ("Cookie", read_cookie.as_str())),
            ("API session", ("Cookie", api_cookie.as_str())),
        ] {
            let r = get_as(&d, path, &[header]);
            assert_eq!(r.status, 200, "{path} with the {what}: {}", r.text());
        }
    }
    // Open to anyone.
    for path in [
        "/healthz",
        "/metrics",
        "/badge/ci.svg",
        "/badge/ci.svg?ref=main",
        "/login",
        "/assets/hookci.css",
        "/assets/hookci.js",
    ] {
        let r = d.get(path);
        assert_eq!(r.status, 200, "{path} is open: {}", r.text());
    }
    assert!(d.get("/badge/ci.svg?ref=main").text().contains("succeeded"));
    // A wrong token at the login form sets no cookie.
    let wrong = post_form(&d, "/login", None, "token=nope&next=%2F");
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());
    // The login form only sends people back into this site.
    let away = post_form(
        &d,
        "/login",
        None,
        &format!("token={READ_TOKEN}&next=%2F%2Fevil.example"),
    );
    assert_eq!(away.header("location"), Some("/"));

    // Buttons: the read session sees none and may press none.
    let run_page = get_as(&d, &format!("/runs/{id}"), &[("Cookie", &read_cookie)]).text();
    assert!(!run_page.contains("name=\"csrf\""), "{run_page}");
    let rerun = format!("/runs/{id}/rerun");
    let api_page = get_as(&d, &format!("/runs/{id}"), &[("Cookie", &api_cookie)]).text();
    let csrf = csrf_of(&api_page);
    for (what, cookie, form, status) in [
        ("no session", None, format!("csrf={csrf}"), 303),
        (
            "the read session",
            Some(read_cookie.as_str()),
            format!("csrf={csrf}"),
            403,
        ),
        (
            "no CSRF token",
            Some(api_cookie.as_str()),
            String::new(),
            403,
        ),
        (
            "a wrong CSRF token",
            Some(api_cookie.as_str()),
            "csrf=forged".to_owned(),
            403,
        ),
    ] {
        let r = post_form(&d, &rerun, cookie, &form);
        assert_eq!(r.status, status, "rerun with {what}: {}", r.text());
    }
    let before = get_as(&d, "/api/runs", &[("Authorization", &read_auth)]).json()["runs"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, 1, "refused presses made no run");
    let r = post_form(&d, &rerun, Some(&api_cookie), &format!("csrf={csrf}"));
    assert_eq!(r.status, 303, "{}", r.text());
    let to = r.header("location").unwrap().to_owned();
    let new_id: i64 = to.strip_prefix("/runs/").unwrap().parse().unwrap();
    assert!(new_id > id);
    assert_eq!(wait_final(&d, new_id, &read_auth)["trigger"], "rerun");

    // Run now, from the pipeline's page.
    let form = format!("csrf={csrf}&ref=main&sha=");
    let r = post_form(&d, "/pipelines/ci/run", Some(&api_cookie), &form);
    assert_eq!(r.status, 303, "{}", r.text());
    let manual: i64 = r.header("location").unwrap()["/runs/".len()..]
        .parse()
        .unwrap();
    let run = wait_final(&d, manual, &api_auth);
    assert_eq!(run["trigger"], "manual");
    assert_eq!(run["commit"], sha);
    let bad = post_form(
        &d,
        "/pipelines/ci/run",
        Some(&api_cookie),
        &format!("csrf={csrf}&ref=nope"),
    );
    assert_eq!(bad.status, 404, "{}", bad.text());
    assert!(bad.text().contains("does not exist"), "{}", bad.text());

    // Logging out ends the session in the browser.
    let out = post_form(&d, "/logout", Some(&api_cookie), "");
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
}

#[test]
fn a_badge_shows_the_last_run_that_ran_passing_over_skipped_ones() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[step("check", "test \"$(cat mode)\" = pass")]),
        )
        .start();
    let badge = |d: &Daemon| {
        let svg = d.get("/badge/ci.svg?ref=main").text();
        let title = svg.find("<title>").map(|at| &svg[at + 7..]).unwrap_or("");
        title[..title.find("</title>").unwrap_or(0)].to_owned()
    };

    let failing = origin.commit("main", &[("mode", "fail")], "breaks");
    let id = push(&d, "badge-fail", "refs/heads/main", ZERO, &failing);
    assert_eq!(d.wait_run(id)["status"], "failed");
    assert_eq!(badge(&d), "ci: failed");

    // A docs-only push skipped with the skip token: nothing was built, so the badge
    // still says how the code last fared.
    let skipped = origin.commit("main", &[("mode", "fail"), ("docs", "d")], "docs");
    let body = push_body("refs/heads/main", &failing, &skipped, "docs [skip ci]");
    let runs = push_runs(&d, "badge-skip", &body);
    assert_eq!(d.wait_run(runs[0].1)["status"], "skipped");
    assert_eq!(badge(&d), "ci: failed");
    assert!(d.get("/badge/ci.svg").text().contains("failed"));

    let fixed = origin.commit("main", &[("mode", "pass")], "fixes");
    let id = push(&d, "badge-pass", "refs/heads/main", &skipped, &fixed);
    assert_eq!(d.wait_run(id)["status"], "succeeded");
    assert_eq!(badge(&d), "ci: succeeded");
}
