//! The command line's API clients (`why`, `runs`, `logs`, `cancel`, `rerun`,
//! `trigger`, `reload`): thin wrappers over the daemon's HTTP API that print for people;
//! `reload --local` asks through the daemon's reload socket instead. They return the
//! process's exit status: 0 done, 1 the daemon said no.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::client::{self, ClientError, Response};
use crate::config::{Config, Secret};
use crate::reload::socket;
use crate::web::http::KEEP_ALIVE_BYTE;

/// A daemon to talk to.
pub struct Remote {
    base: String,
    token: Option<Secret>,
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// Prints the daemon's error (`{"error": ...}`) and returns exit status 1.
fn refused(r: &Response) -> u8 {
    let body = r.json();
    let _ = writeln!(
        std::io::stderr(),
        "hookci: {} ({})",
        body["error"].as_str().unwrap_or(&r.text()),
        r.status
    );
    1
}

impl Remote {
    /// `url`, else http:// and the config's listen address (loopback for 0.0.0.0).
    pub fn new(url: Option<String>, config: &Config) -> Remote {
        let base = url.unwrap_or_else(|| {
            let mut addr = config.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        });
        Remote {
            base: base.trim_end_matches('/').to_owned(),
            token: config.api_token.clone(),
        }
    }

    fn get(&self, path: &str) -> Result<Response, ClientError> {
        client::request("GET", &format!("{}{path}", self.base), &[], b"")
    }

    fn post(&self, path: &str, body: &Value) -> Result<Response, ClientError> {
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Bearer {}", t.expose()));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth.as_str()));
        }
        client::request(
            "POST",
            &format!("{}{path}", self.base),
            &headers,
            body.to_string().as_bytes(),
        )
    }

    /// For every pipeline, whether the delivery ran it and why (not).
    pub fn why(&self, delivery: &str) -> Result<u8, ClientError> {
        let r = self.get(&format!("/api/deliveries/{delivery}"))?;
        if r.status != 200 {
            return Ok(refused(&r));
        }
        let body = r.json();
        println!(
            "delivery {} ({} {} of {} at {}, received {})",
            s(&body["id"]),
            s(&body["event"]),
            s(&body["ref"]),
            s(&body["repo"]),
            s(&body["after"]),
            s(&body["received_at"]),
        );
        let decisions = body["decisions"].as_array().cloned().unwrap_or_default();
        let width = decisions
            .iter()
            .map(|d| s(&d["pipeline"]).len())
            .max()
            .unwrap_or(0);
        for d in &decisions {
            if d["pipeline"].is_null() {
                println!("  {}", s(&d["reason"]));
                continue;
            }
            let verdict = match (s(&d["outcome"]), d["run"].as_i64()) {
                ("run", Some(id)) => format!("ran as run {id}"),
                ("duplicate", Some(id)) => {
                    format!("did not run again: run {id} already builds this commit")
                }
                ("skipped", Some(id)) => format!("skipped (run {id})"),
                (other, _) => other.replace('_', " "),
            };
            println!(
                "  {:width$}  {verdict}: {}",
                s(&d["pipeline"]),
                s(&d["reason"])
            );
        }
        if decisions.is_empty() {
            println!("  no pipelines were configured when it arrived");
        }
        Ok(0)
    }

    /// Lists runs newest first; `before` starts below that run id (the next page), and
    /// when more runs exist the `--before` that lists them is said on stderr.
    pub fn runs(
        &self,
        pipeline: Option<&str>,
        status: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<u8, ClientError> {
        let mut query = format!("?limit={limit}");
        let before = before.map(|b| b.to_string());
        for (k, v) in [
            ("pipeline", pipeline),
            ("status", status),
            ("before", before.as_deref()),
        ] {
            if let Some(v) = v {
                query.push_str(&format!("&{k}={v}"));
            }
        }
        let r = self.get(&format!("/api/runs{query}"))?;
        if r.status != 200 {
            return Ok(refused(&r));
        }
        let body = r.json();
        println!(
            "{:>6}  {:<12} {:<16} {:<24} {:<8} {:<8} CREATED",
            "RUN", "STATUS", "PIPELINE", "REF", "COMMIT", "TRIGGER"
        );
        for run in body["runs"].as_array().cloned().unwrap_or_default() {
            let git_ref = s(&run["ref"]);
            let short_ref = git_ref.strip_prefix("refs/heads/").unwrap_or(git_ref);
            println!(
                "{:>6}  {:<12} {:<16} {:<24} {:<8} {:<8} {}",
                run["id"],
                s(&run["status"]),
                s(&run["pipeline"]),
                short_ref,
                s(&run["commit"]).get(..7).unwrap_or("-"),
                s(&run["trigger"]),
                s(&run["created_at"]),
            );
        }
        if let Some(next) = body["next_before"].as_i64() {
            let _ = writeln!(
                std::io::stderr(),
                "hookci: more runs: list them with --before {next}"
            );
        }
        Ok(0)
    }

    /// The run's log, printed as it arrives; with `follow`, streamed until the run ends
    /// (or the daemon stops), however long a step stays silent.
    pub fn logs(&self, run: i64, follow: bool) -> Result<u8, ClientError> {
        let (query, read_timeout) = if follow {
            ("?follow=1", None)
        } else {
            ("", Some(client::READ_TIMEOUT))
        };
        let url = format!("{}/api/runs/{run}/log{query}", self.base);
        let mut out = std::io::stdout();
        let mut print = |piece: &[u8]| {
            let _ = if follow && piece.contains(&KEEP_ALIVE_BYTE) {
                let text: Vec<u8> = piece
                    .iter()
                    .copied()
                    .filter(|b| *b != KEEP_ALIVE_BYTE)
                    .collect();
                out.write_all(&text)
            } else {
                out.write_all(piece)
            };
            let _ = out.flush();
        };
        let r = client::request_streaming("GET", &url, &[], b"", read_timeout, &mut print)?;
        Ok(if r.status == 200 { 0 } else { refused(&r) })
    }

    fn show_run(r: &Response, verb: &str) -> u8 {
        let run = r.json();
        println!(
            "run {} {verb}: {} {} at {} ({})",
            run["id"],
            s(&run["pipeline"]),
            s(&run["ref"]),
            s(&run["commit"]),
            s(&run["status"])
        );
        0
    }

    pub fn cancel(&self, run: i64) -> Result<u8, ClientError> {
        let r = self.post(&format!("/api/runs/{run}/cancel"), &json!({}))?;
        Ok(if r.status < 300 {
            Self::show_run(&r, "is being canceled")
        } else {
            refused(&r)
        })
    }

    pub fn rerun(&self, run: i64) -> Result<u8, ClientError> {
        let r = self.post(&format!("/api/runs/{run}/rerun"), &json!({}))?;
        Ok(if r.status < 300 {
            Self::show_run(&r, "queued")
        } else {
            refused(&r)
        })
    }

    pub fn trigger(
        &self,
        pipeline: &str,
        git_ref: &str,
        sha: Option<&str>,
    ) -> Result<u8, ClientError> {
        let mut body = json!({ "ref": git_ref });
        if let Some(sha) = sha {
            body["sha"] = json!(sha);
        }
        let r = self.post(&format!("/api/pipelines/{pipeline}/trigger"), &body)?;
        Ok(if r.status < 300 {
            Self::show_run(&r, "queued")
        } else {
            refused(&r)
        })
    }

    /// Asks the daemon to reload; prints what changed, or each problem (one a line).
    pub fn reload(&self) -> Result<u8, ClientError> {
        let r = self.post("/api/reload", &json!({}))?;
        if r.status < 300 {
            return Ok(reloaded(&r.json()));
        }
        print_problems(&r.json());
        Ok(refused(&r))
    }
}

/// Prints what a reload changed; exit status 0.
fn reloaded(body: &Value) -> u8 {
    let report = &body["report"];
    let names = |key: &str| {
        report[key]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "reloaded: pipelines {}", names("pipelines"));
    for (key, what) in [("added", "added"), ("removed", "removed")] {
        if report[key].as_array().is_some_and(|a| !a.is_empty()) {
            let _ = writeln!(out, "{what}: {}", names(key));
        }
    }
    if report["restart_required"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        let _ = writeln!(
            out,
            "changed, applied at the next restart: {}",
            names("restart_required")
        );
    }
    0
}

/// Prints each problem of a failed reload, one a line.
fn print_problems(body: &Value) {
    if let Some(problems) = body["problems"].as_array() {
        let mut err = std::io::stderr();
        for p in problems {
            let _ = writeln!(err, "{}", s(p));
        }
    }
}

/// How long `reload_local` waits for the daemon's answer: a reload reads and checks
/// every file, and the service manager gives `ExecReload=` 90 s by default.
const LOCAL_WAIT: Duration = Duration::from_secs(90);

/// Asks the daemon whose state directory is `state_dir` to reload, through its reload
/// socket (`reload::socket`: no API token, the socket's mode is the access control),
/// and waits for the outcome: 0 reloaded, 1 failed (each problem printed).
pub fn reload_local(state_dir: &Path) -> Result<u8, ClientError> {
    let path = socket::path(state_dir);
    let io = |source: std::io::Error| ClientError::Io {
        url: path.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(&path).map_err(io)?;
    stream.set_read_timeout(Some(LOCAL_WAIT)).map_err(io)?;
    stream
        .write_all(format!("{}\n", socket::REQUEST).as_bytes())
        .map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    let body: Value = serde_json::from_str(&answer).map_err(|e| ClientError::Response {
        url: path.display().to_string(),
        reason: e.to_string(),
    })?;
    if body["reloaded"] == json!(true) {
        return Ok(reloaded(&body));
    }
    print_problems(&body);
    let _ = writeln!(std::io::stderr(), "hookci: {}", s(&body["error"]));
    Ok(1)
}
