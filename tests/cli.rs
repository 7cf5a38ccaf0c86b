//! The `hookci` commands as a user runs them: `check` reports every problem with its
//! place, `serve` refuses to start without a secret or with a bad config, `send` signs
//! and posts a payload, and `$HOOKCI_CONFIG` stands in for `-c`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const REPO: &str = "octo-org/octo-repo";

/// `hookci ARGS` in `cwd`, with none of the caller's hookci settings leaking in. A
/// command that should have exited but still runs after a generous deadline (a `serve`
/// that started when it must not) is killed and fails the test.
fn hookci(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("HOOKCI_CONFIG")
        .env_remove("HOOKCI_WEBHOOK_SECRET")
        .env_remove("HOOKCI_API_TOKEN")
        .env_remove("HOOKCI_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hookci {args:?} was still running after 60 s:\n{}",
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hookci-cli")
        .tempdir()
        .unwrap()
}

fn write(path: PathBuf, text: &str) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn check_accepts_the_repositorys_own_pipelines() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let files = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".yml") || name.ends_with(".yaml")
        })
        .count();
    assert!(files > 0, "{} holds no pipeline", dir.display());
    let cwd = tempdir();
    let o = hookci(cwd.path(), &["check", "--pipelines", s(&dir)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("ok: {files} pipeline(s) in {}\n", dir.display())
    );
}

/// (file, text, line, column, message start, source line)
const BAD_PIPELINES: &[(&str, &str, usize, usize, &str, &str)] = &[
    (
        "unknown-key.yml",
        "repo: octo-org/octo-repo\non:\n  branches: [main]\nstpes:\n  - run: make\n",
        4,
        1,
        "unknown field `stpes`",
        "stpes:",
    ),
    (
        "missing-steps.yml",
        "# no steps at all\nrepo: octo-org/octo-repo\non:\n  branches: [main]\n",
        2,
        1,
        "missing field `steps`",
        "repo: octo-org/octo-repo",
    ),
    (
        "empty-run.yml",
        "repo: octo-org/octo-repo\nsteps:\n  - name: build\n    run: make\n  - name: test\n    run: \"\"\n",
        6,
        5,
        "steps[1]: `run` must not be empty",
        "    run: \"\"",
    ),
    (
        "reserved-env.yml",
        "repo: octo-org/octo-repo\nenv: { HOOKCI_WORKSPACE: x }\nsteps:\n  - run: make\n",
        2,
        8,
        "HOOKCI_WORKSPACE is reserved",
        "env: { HOOKCI_WORKSPACE: x }",
    ),
    (
        "bad-duration.yml",
        "repo: octo-org/octo-repo\nsteps:\n  - run: make\n    timeout: 10 mins\n",
        4,
        14,
        "steps[0]: bad duration \"10 mins\"",
        "    timeout: 10 mins",
    ),
    (
        "bad-pattern.yml",
        "repo: octo-org/octo-repo\non:\n  branches: [\"main\", \"release/[abc\"]\nsteps:\n  - run: make\n",
        3,
        23,
        "on: bad pattern \"release/[abc\"",
        "  branches: [\"main\", \"release/[abc\"]",
    ),
    (
        "notify-kind.yml",
        "repo: octo-org/octo-repo\nsteps:\n  - run: make\nnotify:\n  - teams: X\n",
        5,
        5,
        "notify[0]: unknown field `teams`, expected one of `slack`, `discord`, `webhook`",
        "  - teams: X",
    ),
    (
        "notify-on.yml",
        "repo: octo-org/octo-repo\nsecrets: [S]\nsteps:\n  - run: make\nnotify:\n  - slack: S\n    on: [failure, sometimes]\n",
        7,
        19,
        "notify[0].on[1]: unknown variant `sometimes`, expected one of `success`, `failure`, `fixed`, `canceled`, `always`",
        "    on: [failure, sometimes]",
    ),
    (
        "notify-secret.yml",
        "repo: octo-org/octo-repo\nsecrets: [OTHER]\nsteps:\n  - run: make\nnotify:\n  - discord: HOOK_URL\n",
        6,
        14,
        "notify: secret HOOK_URL is not declared in `secrets:`",
        "  - discord: HOOK_URL",
    ),
    (
        "bad-interrupted.yml",
        "repo: octo-org/octo-repo\ninterrupted: never\nsteps:\n  - run: make\n",
        2,
        14,
        "interrupted: unknown variant `never`, expected `retry` or `fail`",
        "interrupted: never",
    ),
];

#[test]
fn check_prints_every_error_with_its_place_source_line_and_caret() {
    let dir = tempdir();
    let pipelines = dir.path().join("pipelines");
    for (file, text, ..) in BAD_PIPELINES {
        write(pipelines.join(file), text);
    }
    write(
        pipelines.join("good.yaml"),
        &format!("repo: {REPO}\nsteps:\n  - run: make\n"),
    );
    let o = hookci(dir.path(), &["check", "--pipelines", s(&pipelines)], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    for (file, _, line, column, message, source) in BAD_PIPELINES {
        let place = format!("{}:{line}:{column}: ", pipelines.join(file).display());
        let at = lines
            .iter()
            .position(|l| l.starts_with(&place))
            .unwrap_or_else(|| panic!("no line starting {place:?} in:\n{err}"));
        assert!(
            lines[at][place.len()..].starts_with(message),
            "{file}: {:?} should say {message:?}",
            lines[at]
        );
        assert_eq!(
            lines.get(at + 1),
            Some(&format!("  | {source}").as_str()),
            "{err}"
        );
        let caret = format!("  | {}^", " ".repeat(column - 1));
        assert_eq!(lines.get(at + 2), Some(&caret.as_str()), "{file}:\n{err}");
    }
    assert!(!err.contains("good.yaml"), "{err}");
    assert!(
        err.contains(&format!("{} error(s)", BAD_PIPELINES.len())),
        "{err}"
    );
    assert!(stdout(&o).is_empty(), "no ok line: {}", stdout(&o));

    // Fixed, the directory checks clean.
    for (file, ..) in BAD_PIPELINES {
        std::fs::remove_file(pipelines.join(file)).unwrap();
    }
    let o = hookci(dir.path(), &["check", "--pipelines", s(&pipelines)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("ok: 1 pipeline(s)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn serve_without_a_secret_refuses_to_start_with_one_clear_line() {
    let dir = tempdir();
    let pipelines = dir.path().join("pipelines");
    write(
        pipelines.join("ci.yml"),
        &format!("repo: {REPO}\nsteps:\n  - run: make\n"),
    );
    let state = dir.path().join("state");
    let o = hookci(
        dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pipelines",
            s(&pipelines),
            "--state-dir",
            s(&state),
        ],
        &[],
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(o.status.code().is_some(), "it exits, it is not killed");
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line:\n{err}");
    assert!(lines[0].contains("secret"), "{err}");
    assert!(lines[0].contains("HOOKCI_WEBHOOK_SECRET"), "{err}");
    assert!(!state.exists(), "nothing was started");

    // An empty secret is no secret: it must not become an HMAC key of zero bytes.
    let o = hookci(
        dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pipelines",
            s(&pipelines),
            "--state-dir",
            s(&state),
        ],
        &[("HOOKCI_WEBHOOK_SECRET", "")],
    );
    assert_ne!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("secret"), "{}", stderr(&o));
    assert!(!state.exists(), "nothing was started");
}

#[test]
fn serve_refuses_to_start_with_an_invalid_pipeline_file() {
    let dir = tempdir();
    let pipelines = dir.path().join("pipelines");
    let bad = write(
        pipelines.join("ci.yml"),
        &format!(
            "repo: {REPO}
steps:
  - run: make
    timout: 5m
"
        ),
    );
    let state = dir.path().join("state");
    let o = hookci(
        dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pipelines",
            s(&pipelines),
            "--state-dir",
            s(&state),
        ],
        &[("HOOKCI_WEBHOOK_SECRET", "s3cret")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let place = format!("{}:4:5: ", bad.display());
    assert!(
        stderr(&o)
            .lines()
            .any(|l| l.starts_with(&place) && l.contains("unknown field `timout`")),
        "{}",
        stderr(&o)
    );
    assert!(!state.exists(), "nothing was started");
}

#[test]
fn an_unknown_config_key_fails_serve_and_check_with_its_place() {
    let dir = tempdir();
    write(
        dir.path().join("pipelines/ci.yml"),
        &format!("repo: {REPO}\nsteps:\n  - run: make\n"),
    );
    write(dir.path().join("secret"), "s3cret\n");
    let config = write(
        dir.path().join("hookci.yml"),
        "listen: 127.0.0.1:0\nwebhook_secret_file: secret\nmax_parralel_runs: 4\n",
    );
    let place = format!(
        "{}:3:1: unknown field `max_parralel_runs`",
        config.display()
    );
    for command in ["serve", "check"] {
        let o = hookci(dir.path(), &[command, "-c", s(&config)], &[]);
        assert_eq!(o.status.code(), Some(1), "{command}: {}", stderr(&o));
        assert!(stderr(&o).contains(&place), "{command}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{command}: {}", stdout(&o));
    }
    assert!(!dir.path().join(".hookci").exists());
}

/// A config file for `send`: just the secret, in a file next to it.
fn send_config(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let secret_file = write(dir.join(format!("{name}.secret")), &format!("{secret}\n"));
    write(
        dir.join(format!("{name}.yml")),
        &format!("webhook_secret_file: {}\n", secret_file.display()),
    )
}

/// `202 {...}` as `send` prints it: the status and the JSON body.
fn sent(o: &Output) -> (u16, serde_json::Value) {
    let out = stdout(o);
    let (status, body) = out
        .trim_end()
        .split_once(' ')
        .unwrap_or_else(|| panic!("send printed {out:?}; stderr {}", stderr(o)));
    (
        status.parse().unwrap(),
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}")),
    )
}

#[test]
fn send_signs_and_posts_a_payload_and_the_run_appears() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let d = b
        .pipeline(
            "ci",
            &format!(
                "repo: {REPO}\nclone_url: {}\nsteps:\n  - run: echo sent $HOOKCI_DELIVERY\n",
                origin.url()
            ),
        )
        .start();
    let dir = tempdir();
    let payload = write(
        dir.path().join("push.json"),
        std::str::from_utf8(&PushPayload::new(REPO, "refs/heads/main", ZERO, &sha, "x").bytes())
            .unwrap(),
    );
    let url = d.url("/webhook");
    let send = |config: Option<&Path>, delivery: &str, env: &[(&str, &str)]| {
        let mut args = vec![
            "send",
            s(&payload),
            "--url",
            &url,
            "--event",
            "push",
            "--delivery",
            delivery,
        ];
        if let Some(c) = config {
            args.extend(["-c", s(c)]);
        }
        hookci(dir.path(), &args, env)
    };

    // A wrong secret: 401, printed, and a failing exit.
    let wrong = send_config(dir.path(), "wrong", "not-the-secret");
    let o = send(Some(&wrong), "send-wrong", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let (status, body) = sent(&o);
    assert_eq!(status, 401);
    assert!(body["error"].as_str().unwrap().contains("signature"));
    assert!(d.runs().is_empty());
    assert_eq!(d.get("/api/deliveries/send-wrong").status, 404);

    // No config at all: nothing to sign with, so the daemon refuses it too.
    let o = send(None, "send-unsigned", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(sent(&o).0, 401);

    // The right secret from the config file.
    let right = send_config(dir.path(), "right", SECRET);
    let o = send(Some(&right), "send-1", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (status, body) = sent(&o);
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["delivery"], "send-1");
    assert_eq!(body["runs"][0]["pipeline"], "ci");
    let id = body["runs"][0]["id"].as_i64().unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["delivery"], "send-1");
    assert!(d.run_log(id).contains("sent send-1"));
    assert_eq!(d.runs().len(), 1);

    // $HOOKCI_CONFIG when there is no -c; -c wins over it.
    let o = send(None, "send-2", &[("HOOKCI_CONFIG", s(&right))]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (status, body) = sent(&o);
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["runs"][0]["id"], id, "same commit, same run");
    assert_eq!(d.get_json("/api/deliveries/send-2")["id"], "send-2");
    let o = send(Some(&wrong), "send-3", &[("HOOKCI_CONFIG", s(&right))]);
    assert_eq!(sent(&o).0, 401, "-c overrides $HOOKCI_CONFIG");
}

#[test]
fn check_reads_hookci_config_when_there_is_no_c_and_flags_override_it() {
    let dir = tempdir();
    let pipelines = dir.path().join("from-config");
    write(
        pipelines.join("one.yml"),
        &format!("repo: {REPO}\nsteps:\n  - run: make\n"),
    );
    write(
        pipelines.join("two.yml"),
        &format!("repo: {REPO}\nsteps:\n  - run: make\n"),
    );
    // Relative paths in a config file are taken from the file's folder.
    let config = write(
        dir.path().join("etc/hookci.yml"),
        "pipelines: ../from-config\n",
    );
    let cwd = tempdir();
    let o = hookci(cwd.path(), &["check"], &[("HOOKCI_CONFIG", s(&config))]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("ok: 2 pipeline(s) in "), "{out}");
    assert!(out.trim_end().ends_with("from-config"), "{out}");

    // Without it, the default ./pipelines of the working directory is used (none here).
    let o = hookci(cwd.path(), &["check"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains("pipelines"), "{}", stderr(&o));

    // A flag overrides the file.
    let other = cwd.path().join("other");
    write(
        other.join("x.yml"),
        &format!("repo: {REPO}\nsteps:\n  - run: make\n"),
    );
    let o = hookci(
        cwd.path(),
        &["check", "--pipelines", s(&other)],
        &[("HOOKCI_CONFIG", s(&config))],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("ok: 1 pipeline(s) in {}\n", other.display())
    );
}

/// Kills a test step's background sleep (by pid, only while it is still our sleep), so
/// a failing test leaves none behind.
struct KillSleep(Option<i32>);

impl Drop for KillSleep {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c == b"sleep\x00600\x00");
            if ours {
                // SAFETY: signalling this test's own step process by pid.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Pids whose environment has a `HOOKCI_WORKSPACE` under `dir`.
fn steps_under(dir: &Path) -> Vec<i32> {
    let prefix = format!("HOOKCI_WORKSPACE={}/", dir.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| !process_gone(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|var| var.starts_with(prefix.as_bytes()))
            })
        })
        .collect()
}

#[test]
fn ctrl_c_during_run_stops_the_steps_process_group_and_removes_the_scratch_directory() {
    let dir = tempdir();
    let origin = Origin::new(dir.path());
    origin.commit("main", &[("a", "1")], "x");
    let bg = dir.path().join("bg.pid");
    let pipelines = dir.path().join("pipelines");
    write(
        pipelines.join("ci.yml"),
        &format!(
            "repo: {REPO}\nsteps:\n  - name: hang\n    run: |\n      sleep 600 &\n      echo $! > {}\n      wait\n",
            bg.display()
        ),
    );
    let config = write(dir.path().join("hookci.yml"), "step_grace: 1s\n");
    // The scratch state directory goes under a TMPDIR of the test's own, so what is
    // left in it and which processes run there can be checked.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut child = Command::new(bin())
        .args(["run", "ci", "--repo", s(&origin.path), "--pipelines"])
        .arg(&pipelines)
        .arg("-c")
        .arg(&config)
        .env("TMPDIR", &tmp)
        .env_remove("HOOKCI_CONFIG")
        .env_remove("HOOKCI_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let mut sleep = KillSleep(None);
    eventually("the step started its background sleep", || {
        sleep.0 = std::fs::read_to_string(&bg)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        sleep.0.is_some()
    });
    let pid = sleep.0.unwrap();
    assert!(!steps_under(&tmp).is_empty(), "the step runs under TMPDIR");

    // SAFETY: signalling our own child process by pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "hookci run did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{status:?}");
    assert_eq!(status.code(), Some(1), "an exit, not a death by signal");
    assert!(process_gone(pid), "the step's background sleep survived");
    assert_eq!(steps_under(&tmp), Vec::<i32>::new());
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "scratch state left behind: {left:?}");
    let out = out.join().unwrap();
    assert!(out.contains("==> ci canceled: stopped by SIGINT"), "{out}");
}

#[test]
fn check_warns_when_statuses_are_on_without_a_public_url() {
    let dir = tempdir();
    let pipelines = dir.path().join("pipelines");
    write(
        pipelines.join("ci.yml"),
        &format!("repo: {REPO}\nsteps:\n  - run: make\n"),
    );
    let token = [("HOOKCI_GITHUB_TOKEN", "ghp-check-token")];
    let bare = write(dir.path().join("bare.yml"), "github: {}\n");
    let o = hookci(
        dir.path(),
        &["check", "-c", s(&bare), "--pipelines", s(&pipelines)],
        &token,
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "a warning is no error: {}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("warning: commit statuses are on") && stderr(&o).contains("public_url"),
        "{}",
        stderr(&o)
    );
    for config in [
        "public_url: https://ci.example.com\n",
        "github:\n  statuses: false\n",
    ] {
        let file = write(dir.path().join("c.yml"), config);
        let o = hookci(
            dir.path(),
            &["check", "-c", s(&file), "--pipelines", s(&pipelines)],
            &token,
        );
        assert_eq!(o.status.code(), Some(0), "{config}: {}", stderr(&o));
        // Other warnings (steps run as root, when the suite does) are not this one's.
        assert!(
            !stderr(&o).contains("commit statuses are on"),
            "{config}: {}",
            stderr(&o)
        );
    }
}
