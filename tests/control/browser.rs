//! The dashboard in a real browser: headless Chromium driven through chromedriver
//! (WebDriver) against the real daemon. A run's page follows its log as it is printed
//! and shows its end without a reload; the runs page lists the run and keeps a
//! running one's row up to date; with the API token, the cancel button cancels a
//! running run.

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;

use super::*;

const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver and a Chromium session with a profile of its own; both end on drop.
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

impl Browser {
    fn start() -> Browser {
        let driver_bin = on_path("chromedriver");
        assert!(
            Path::new(CHROMIUM).is_file() && driver_bin.is_some(),
            "the browser test needs Debian's chromium and chromium-driver \
             (apt-get install chromium chromium-driver; .ci/run installs them)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(driver_bin.unwrap())
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        eventually("chromedriver listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let profile = tempfile::Builder::new()
            .prefix("hookci-test-chromium")
            .tempdir()
            .unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1200,900",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt
            .block_on(
                ClientBuilder::new(HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a Chromium session through chromedriver");
        Browser {
            rt,
            client: Some(client),
            driver,
            _profile: profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    fn goto(&self, url: &str) {
        self.rt.block_on(self.client().goto(url)).unwrap();
    }

    /// Runs `script` in the page and returns its result.
    fn js(&self, script: &str) -> Value {
        self.rt
            .block_on(self.client().execute(script, Vec::new()))
            .unwrap()
    }

    fn text_of(&self, selector: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.textContent : null;",
            json!(selector)
        );
        self.js(&script).as_str().unwrap_or_default().to_owned()
    }

    fn click(&self, selector: &str) {
        self.rt
            .block_on(async {
                self.client()
                    .find(Locator::Css(selector))
                    .await?
                    .click()
                    .await
            })
            .unwrap();
    }

    fn type_into(&self, selector: &str, text: &str) {
        self.rt
            .block_on(async {
                self.client()
                    .find(Locator::Css(selector))
                    .await?
                    .send_keys(text)
                    .await
            })
            .unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.rt.block_on(client.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn a_run_page_follows_the_log_live_and_the_cancel_button_cancels() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let main = origin.commit("main", &[("a", "1")], "count");
    let hang = origin.commit("hang", &[("a", "2")], "hang");
    let hang2 = origin.commit("hang2", &[("a", "3")], "hang too");
    let config = token_config(&b);
    let d = b
        .pipeline(
            "count",
            &pipeline(
                &origin,
                "on:\n  branches: [main]\n",
                &[step(
                    "count",
                    "printf '\\033[32m'; for i in 1 2 3 4 5; do echo \"line $i\"; sleep 1; done",
                )],
            ),
        )
        .pipeline(
            "hang",
            &pipeline(
                &origin,
                "on:\n  branches: [hang, hang2]\n",
                &[step("wait", "echo waiting\nsleep 600")],
            ),
        )
        .config(&config)
        .start();
    let browser = Browser::start();

    let id = push(&d, "browser-count", "refs/heads/main", ZERO, &main);
    wait_status(&d, id, "running");
    // Opened once the first line is out: the page comes with it, the rest follows.
    eventually("the step printed its first line", || {
        d.run_log(id).contains("line 1")
    });
    browser.goto(&d.url(&format!("/runs/{id}")));
    let shown = browser.text_of("#run-status");
    assert!(
        shown == "running" || shown == "queued",
        "the page was opened while the run runs: {shown}"
    );
    // Gone if the page reloads.
    browser.js("window.hookciTestMark = 42; return null;");
    let log = || browser.text_of("#log-1 pre");
    eventually("the page shows line 2", || log().contains("line 2"));
    assert!(
        !log().contains("line 5"),
        "line 2 showed while later lines were still to come: {}",
        log()
    );
    eventually("the page shows the run succeeded", || {
        browser.text_of("#run-status") == "succeeded"
    });
    assert_eq!(run_of(&d, id)["status"], "succeeded");
    let text = log();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["line 1", "line 2", "line 3", "line 4", "line 5"],
        "each line once, in order"
    );
    assert_eq!(
        browser.js("return window.hookciTestMark === 42;"),
        json!(true),
        "the page was not reloaded"
    );
    assert_eq!(browser.text_of("#step-1 .status"), "succeeded");
    // The colour set before line 1 holds for every line, those the page was loaded
    // with and those that followed.
    assert_eq!(
        browser.js(
            "return [...document.querySelectorAll('#log-1 pre span.f2')].map(s => s.textContent).join('');"
        ),
        json!(text),
        "{}",
        browser.js("return document.querySelector('#log-1 pre').innerHTML;")
    );

    // The runs page lists the new run.
    browser.goto(&d.url("/"));
    let row = format!("tr[data-run=\"{id}\"]");
    assert!(
        browser.text_of(&row).contains("succeeded"),
        "{}",
        browser.text_of("#runs")
    );
    assert!(browser.text_of(&row).contains("count"));

    // A running run's row follows it there without a reload.
    let other = push(&d, "browser-hang2", "refs/heads/hang2", ZERO, &hang2);
    wait_status(&d, other, "running");
    let streams = |d: &Daemon| {
        let text = d.get("/metrics").text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(r#"hookci_http_request_duration_seconds_count{route="api_events"} "#)
            })
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    let before = streams(&d);
    browser.goto(&d.url("/"));
    browser.js("window.hookciTestMark = 43; return null;");
    // The runs page listens to the runs event stream instead of fetching itself on a
    // timer.
    eventually("the runs page opens the runs event stream", || {
        streams(&d) > before
    });
    let other_row = format!("tr[data-run=\"{other}\"]");
    assert!(browser.text_of(&other_row).contains("running"));
    let r = api_post(
        &d,
        &format!("/api/runs/{other}/cancel"),
        Some(TOKEN),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    eventually("the runs page shows the run canceled", || {
        browser.text_of(&other_row).contains("canceled")
    });
    assert_eq!(
        browser.js("return window.hookciTestMark === 43;"),
        json!(true),
        "the runs page was not reloaded"
    );

    // With the API token, the cancel button cancels a running run.
    let hang_id = push(&d, "browser-hang", "refs/heads/hang", ZERO, &hang);
    wait_status(&d, hang_id, "running");
    browser.goto(&d.url(&format!("/login?next=/runs/{hang_id}")));
    browser.type_into("#token", TOKEN);
    browser.click("#login");
    eventually("the login leads to the run page", || {
        browser.text_of("#cancel button") == "Cancel"
    });
    eventually("the page shows the run's output", || {
        browser.text_of("#log-1 pre").contains("waiting")
    });
    browser.click("#cancel button");
    eventually("the page shows the run canceled", || {
        browser.text_of("#run-status") == "canceled"
    });
    assert_eq!(run_of(&d, hang_id)["status"], "canceled");
}

#[test]
fn a_run_page_says_so_when_its_live_log_is_refused() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let gate = b.path().join("gate");
    let d = b
        .pipeline("ci", &pipeline(&origin, "", &[gated_step(&gate)]))
        .start();
    let id = push(&d, "browser-refused", "refs/heads/main", ZERO, &sha);
    eventually("the step printed its first line", || {
        d.run_log(id).contains("first")
    });
    // Every place among the followers taken: the page's stream gets 503.
    let open: Vec<(String, Captured)> = (0..hookci::web::follow::MAX_FOLLOWERS)
        .map(|_| stream_get(&d.addr, &format!("/api/runs/{id}/log?follow=1")))
        .collect();
    assert!(open
        .iter()
        .all(|(head, _)| head.starts_with("HTTP/1.1 200")));
    assert_eq!(d.get(&format!("/api/runs/{id}/events")).status, 503);

    let browser = Browser::start();
    browser.goto(&d.url(&format!("/runs/{id}")));
    eventually("the page says the live log was refused", || {
        browser.js("return !document.getElementById('refused').hidden;") == json!(true)
    });
    let note = browser.text_of("#refused");
    assert!(note.contains("refused to stream this run live"), "{note}");
    assert!(note.contains("Reload"), "{note}");
    // What the page was loaded with is still there.
    assert_eq!(browser.text_of("#log-1 pre"), "first\n");
    assert_eq!(browser.text_of("#run-status"), "running");
    std::fs::write(&gate, "go").unwrap();
    eventually("the followers' streams end with the run", || {
        open.iter().all(|(_, body)| body.ended())
    });
}
