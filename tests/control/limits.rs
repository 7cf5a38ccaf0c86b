//! Nothing grows without bound: a run's log stops at `max_log_bytes` (the step goes
//! on), and below `min_free_bytes` of free disk no run starts while webhooks are still
//! taken, until space is back.

use super::*;

const LIMIT: u64 = 1024 * 1024;
const PRINTED: u64 = 20 * 1024 * 1024;

#[test]
fn a_step_printing_past_max_log_bytes_keeps_running_and_its_log_says_what_was_dropped() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let script = format!("head -c {PRINTED} /dev/zero | tr '\\0' x\necho\necho still-running >&2");
    let d = b
        .pipeline(
            "loud",
            &pipeline(
                &origin,
                "",
                &[step("loud", &script), step("after", "echo after")],
            ),
        )
        .config(&format!("max_log_bytes: {LIMIT}"))
        .start();
    let id = push(&d, "loud-1", "refs/heads/main", ZERO, &sha);
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let file = d
        .state_dir()
        .join("logs")
        .join(id.to_string())
        .join("1.log");
    let log = std::fs::read_to_string(&file).unwrap();
    assert!(
        log.len() as u64 <= LIMIT + 200,
        "{} bytes in {}",
        log.len(),
        file.display()
    );
    // Everything after the limit was dropped, the step's last words too.
    let dropped = PRINTED + 1 + "still-running\n".len() as u64 - LIMIT;
    let last = log.lines().last().unwrap();
    assert_eq!(
        last,
        format!(
            "[hookci] max_log_bytes ({LIMIT} bytes per run) reached: {dropped} bytes of output dropped, and all output of later steps"
        )
    );
    assert!(log.starts_with("xxxx"), "{}", readable(&log));
    assert_eq!(run["log_truncated"], true, "{run:#}");
    assert_eq!(
        run["log_dropped_bytes"],
        dropped + "after\n".len() as u64,
        "{run:#}"
    );
    let api_log = d.run_log(id);
    assert!(api_log.contains(last), "{}", readable(&api_log));
    assert!(api_log.len() as u64 <= LIMIT + 1000, "{}", api_log.len());
}

#[test]
fn the_truncation_line_is_written_once_per_run_however_many_steps_follow() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let loud = format!("head -c {} /dev/zero | tr '\\0' x", 2 * LIMIT);
    let d = b
        .pipeline(
            "loud",
            &pipeline(
                &origin,
                "",
                &[
                    step("loud", &loud),
                    step("second", "echo second"),
                    step("third", "echo third"),
                    step("quiet", "true"),
                ],
            ),
        )
        .config(&format!("max_log_bytes: {LIMIT}"))
        .start();
    let id = push(&d, "once-1", "refs/heads/main", ZERO, &sha);
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let api_log = d.run_log(id);
    let told: Vec<&str> = api_log
        .lines()
        .filter(|l| l.starts_with("[hookci] max_log_bytes"))
        .collect();
    assert_eq!(
        told,
        [format!(
            "[hookci] max_log_bytes ({LIMIT} bytes per run) reached: {LIMIT} bytes of output dropped, and all output of later steps"
        )],
        "{}",
        readable(&api_log)
    );
    let logs = d.state_dir().join("logs").join(id.to_string());
    for n in 2..=4 {
        let later = std::fs::read_to_string(logs.join(format!("{n}.log"))).unwrap();
        assert_eq!(later, "", "step {n}");
    }
    assert_eq!(
        run["log_dropped_bytes"],
        LIMIT + "second\nthird\n".len() as u64,
        "{run:#}"
    );
}

/// A tmpfs mounted for the test (root only), unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs at {} failed: this test needs root",
            at.display()
        );
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn below_min_free_bytes_no_run_starts_but_webhooks_are_taken_until_space_is_back() {
    test_user();
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let state = b.path().join("state");
    let mount = Mount::tmpfs(&state, "32m");
    let d = b
        .pipeline("p", &pipeline(&origin, "", &[step("s", "echo ran")]))
        .config("min_free_bytes: 16777216")
        .start();
    assert!(d.get_json("/healthz")["runs_paused"].is_null());
    // Leave less than 16 MiB free.
    let ballast = state.join("ballast");
    std::fs::write(&ballast, vec![1u8; 20 * 1024 * 1024]).unwrap();
    eventually("runs are paused", || {
        d.get_json("/healthz")["runs_paused"].is_string()
    });
    let id = push(&d, "full-1", "refs/heads/main", ZERO, &sha);
    let why = d.get_json("/healthz")["runs_paused"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(why.contains("min_free_bytes"), "{why}");
    assert_eq!(d.get_json("/api/runs")["runs_paused"], why.as_str());
    // Several rescans later it still waits.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(run_of(&d, id)["status"], "queued");
    assert!(d.log().contains("runs paused"), "{}", d.log());
    std::fs::remove_file(&ballast).unwrap();
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert!(d.get_json("/healthz")["runs_paused"].is_null());
    drop(d);
    drop(mount);
}
