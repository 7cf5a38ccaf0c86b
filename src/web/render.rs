//! The dashboard's building blocks: the page frame (stylesheet, script, navigation),
//! statuses, ages, durations, refs and commit links. Every value goes through maud,
//! which escapes it.

use maud::{html, Markup, PreEscaped, DOCTYPE};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use crate::clock::rfc3339;
use crate::config::Config;
use crate::store::Run;
use crate::web::auth::{self, Access};

/// Who is looking: what the page may offer them.
pub struct Viewer {
    pub access: Access,
    /// The forms' CSRF token, for a viewer with the API token.
    pub csrf: Option<String>,
    /// An API token exists: logging in with it would enable the buttons.
    pub can_log_in: bool,
    /// A session cookie or token was given (a logout button makes sense).
    pub logged_in: bool,
}

impl Viewer {
    pub fn can_change(&self) -> bool {
        self.access == Access::Write && self.csrf.is_some()
    }
}

/// Bumped with the binary, so that browsers fetch new assets after an upgrade.
const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn page(status: StatusCode, title: &str, viewer: &Viewer, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · hookci" }
                link rel="stylesheet" href={ "/assets/hookci.css?v=" (VERSION) };
                script defer src={ "/assets/hookci.js?v=" (VERSION) } {}
            }
            body {
                header.top {
                    a.brand href="/" { "hookci" }
                    nav {
                        a href="/" { "Runs" }
                        a href="/pipelines" { "Pipelines" }
                        @if viewer.logged_in {
                            form.inline method="post" action="/logout" {
                                button.link type="submit" { "Log out" }
                            }
                        } @else if viewer.can_log_in {
                            a href="/login" { "Log in" }
                        }
                    }
                }
                main { (body) }
            }
        }
    };
    let mut r = warp::reply::html(markup.into_string()).into_response();
    *r.status_mut() = status;
    r.headers_mut().insert(
        "cache-control",
        warp::http::HeaderValue::from_static("no-store"),
    );
    r
}

/// A page that says what went wrong.
pub fn problem(status: StatusCode, viewer: &Viewer, message: &str) -> Response {
    page(
        status,
        status.canonical_reason().unwrap_or("error"),
        viewer,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p.problem { (message) }
        },
    )
}

/// A status word with its colour.
pub fn status(word: &str) -> Markup {
    html! { span class={ "st st-" (word) } data-status=(word) { (word) } }
}

pub fn age(ms: i64, now: i64) -> String {
    let s = (now - ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

pub fn when(ms: i64, now: i64) -> Markup {
    html! { time datetime=(rfc3339(ms)) title=(rfc3339(ms)) { (age(ms, now)) } }
}

pub fn length(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0 => format!("{} ms", ms.max(0)),
        1..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// How long a run or step took, or has been running.
pub fn took(start: Option<i64>, end: Option<i64>, now: i64) -> String {
    match (start, end) {
        (Some(s), Some(e)) => length(e - s),
        (Some(s), None) => format!("{} so far", length(now - s)),
        _ => String::new(),
    }
}

/// A ref as people say it: the branch or tag name.
pub fn short_ref(git_ref: &str) -> Markup {
    match (
        git_ref.strip_prefix("refs/heads/"),
        git_ref.strip_prefix("refs/tags/"),
    ) {
        (Some(branch), _) => html! { span.ref title=(git_ref) { (branch) } },
        (_, Some(tag)) => html! { span.ref title=(git_ref) { (tag) " " small { "tag" } } },
        _ => html! { span.ref { (git_ref) } },
    }
}

/// The commit's page on GitHub (or the configured GitHub Enterprise host), when the
/// run's repository is cloned from there.
pub fn commit_url(config: &Config, run: &Run) -> Option<String> {
    let host = config.github.git_host()?;
    let url = run.clone_url.strip_prefix("https://")?;
    let (url_host, _) = url.split_once('/')?;
    let valid = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
    (url_host.eq_ignore_ascii_case(&host)
        && run.repo.chars().all(valid)
        && run.commit.chars().all(|c| c.is_ascii_hexdigit()))
    .then(|| format!("https://{host}/{}/commit/{}", run.repo, run.commit))
}

pub fn commit(config: &Config, run: &Run) -> Markup {
    let short: String = run.commit.chars().take(8).collect();
    html! {
        @if let Some(url) = commit_url(config, run) {
            a.sha href=(url) title=(run.commit) { (short) }
        } @else {
            code.sha title=(run.commit) { (short) }
        }
    }
}

/// The runs table of `/` and `/pipelines/{name}`. Rows of queued and running runs
/// are marked for the script to keep up to date.
pub fn runs_table(config: &Config, runs: &[Run], now: i64) -> Markup {
    html! {
        @if runs.is_empty() {
            p.empty { "No runs here yet." }
        } @else {
            div.scroll {
                table.runs {
                    thead { tr {
                        th { "run" } th { "status" } th { "pipeline" } th { "ref" }
                        th { "commit" } th { "trigger" } th { "age" } th { "duration" }
                    } }
                    tbody #runs {
                        @for run in runs {
                            tr data-run=(run.id) data-live[!run.status.is_final()] {
                                td { a href={ "/runs/" (run.id) } { "#" (run.id) } }
                                td { (status(run.status.as_str())) }
                                td { a href={ "/pipelines/" (auth::encode_query(&run.pipeline)) } { (run.pipeline) } }
                                td { (short_ref(&run.git_ref)) }
                                td { (commit(config, run)) }
                                td { (run.trigger) }
                                td { (when(run.created_at, now)) }
                                td { (took(run.started_at, run.finished_at, now)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A hidden CSRF field.
pub fn csrf_field(viewer: &Viewer) -> Markup {
    html! {
        @if let Some(token) = &viewer.csrf {
            input type="hidden" name="csrf" value=(token);
        }
    }
}

/// Already-escaped HTML (the ANSI renderer's output).
pub fn trusted(html: String) -> PreEscaped<String> {
    PreEscaped(html)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EnvSource, FileConfig, FileGithub, Overrides};

    struct NoEnv;

    impl EnvSource for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn config(api_url: Option<&str>) -> Config {
        let file = FileConfig {
            github: Some(FileGithub {
                token_file: None,
                api_url: api_url.map(str::to_owned),
                statuses: None,
            }),
            ..FileConfig::default()
        };
        Config::build(file, Overrides::default(), &NoEnv).unwrap()
    }

    fn run(clone_url: &str, repo: &str) -> Run {
        Run {
            id: 1,
            pipeline: "ci".into(),
            repo: repo.into(),
            git_ref: "refs/heads/main".into(),
            commit: "ab".repeat(20),
            before: "0".repeat(40),
            clone_url: clone_url.into(),
            trigger: "push".into(),
            delivery: None,
            status: crate::store::RunStatus::Succeeded,
            reason: None,
            attempt: 1,
            generation: 1,
            created_at: 0,
            started_at: None,
            finished_at: None,
            log_dropped: 0,
            instance: None,
            timings: None,
        }
    }

    #[test]
    fn commits_link_to_github_only_when_cloned_from_there() {
        let sha = "ab".repeat(20);
        let cases = [
            (
                None,
                "https://github.com/o/r.git",
                "o/r",
                Some(format!("https://github.com/o/r/commit/{sha}")),
            ),
            (
                None,
                "https://GitHub.com/o/r",
                "o/r",
                Some(format!("https://github.com/o/r/commit/{sha}")),
            ),
            (None, "/srv/git/r.git", "o/r", None),
            (None, "https://gitlab.example/o/r.git", "o/r", None),
            (None, "https://github.com/o/r.git", "o/r\"><x", None),
            (
                Some("https://ghe.example/api/v3"),
                "https://ghe.example/o/r.git",
                "o/r",
                Some(format!("https://ghe.example/o/r/commit/{sha}")),
            ),
            (
                Some("https://ghe.example/api/v3"),
                "https://github.com/o/r.git",
                "o/r",
                None,
            ),
        ];
        for (api, url, repo, want) in cases {
            assert_eq!(
                commit_url(&config(api), &run(url, repo)),
                want,
                "{api:?} {url}"
            );
        }
    }

    #[test]
    fn ages_and_durations_read_as_people_say_them() {
        let cases = [
            (0, "0 s ago"),
            (59_999, "59 s ago"),
            (60_000, "1 min ago"),
            (7_200_000, "2 h ago"),
            (90_000_000, "1 d ago"),
        ];
        for (ms, want) in cases {
            assert_eq!(age(0, ms), want);
        }
        let cases = [
            (250, "250 ms"),
            (1_500, "1 s"),
            (61_000, "1 min 1 s"),
            (3_720_000, "1 h 2 min"),
        ];
        for (ms, want) in cases {
            assert_eq!(length(ms), want);
        }
        assert_eq!(took(Some(0), None, 2_000), "2 s so far");
        assert_eq!(took(None, None, 2_000), "");
    }
}
