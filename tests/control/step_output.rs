//! A step's output in bulk: the pipes it writes to, and megabytes through them on both
//! streams at once reaching the log file and a live follower whole, by line, masked.

use super::*;

const API_TOKEN: &str = "tok-5Rk2Wm8qZt3Lx7Vn";
const LINES: usize = 40_000;

/// The line `gen NAME` prints as its `i`th, as the log must hold it (masked).
fn line(name: &str, i: usize) -> String {
    format!("{name} {i} tok:***:{}", "x".repeat(i % 200))
}

#[test]
fn a_step_writes_to_roomy_pipes_and_megabytes_on_both_streams_reach_the_log_whole_and_masked() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    // F_GETPIPE_SZ is 1032; perl is part of every Debian system.
    let script = format!(
        r#"perl -e 'printf "pipes: %d %d\n", fcntl(STDOUT, 1032, 0), fcntl(STDERR, 1032, 0)'
gen() {{
  perl -e 'my ($name, $n) = @ARGV;
    for my $i (1 .. $n) {{ print "$name $i tok:$ENV{{API_TOKEN}}:" . ("x" x ($i % 200)) . "\n" }}' "$@"
}}
gen out {LINES} &
gen err {LINES} >&2 &
wait
echo done"#
    );
    let d = b
        .pipeline(
            "loud",
            &pipeline(&origin, "secrets: [API_TOKEN]\n", &[step("loud", &script)]),
        )
        .env("HOOKCI_SECRET_API_TOKEN", API_TOKEN)
        .start();
    let id = push(&d, "loud-1", "refs/heads/main", ZERO, &sha);
    let (head, body) = stream_get(&d.addr, &format!("/api/runs/{id}/events"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let run = d.wait_run(id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let log = log_files(&d, id);
    assert!(!log.contains(API_TOKEN), "the token is in the log");

    let mut lines = log.lines();
    assert_eq!(
        lines.next(),
        Some("pipes: 1048576 1048576"),
        "the step's stdout and stderr pipes hold 1 MiB"
    );
    // The streams are two pipes: how their lines interleave, and where stdout's `done`
    // falls among stderr's last lines, is the order they reached the daemon in.
    let mut next = [1usize, 1usize];
    let mut done = 0;
    for text in lines {
        if text == "done" {
            done += 1;
            continue;
        }
        let (name, rest) = text.split_once(' ').unwrap_or((text, ""));
        let which = match name {
            "out" => 0,
            "err" => 1,
            _ => panic!("a line cut or mixed with another: {:.200}", text),
        };
        let i: usize = rest.split(' ').next().unwrap().parse().unwrap();
        assert_eq!(i, next[which], "{name}: lines in order, each once");
        assert_eq!(text, line(name, i), "{name} line {i} whole and masked");
        next[which] += 1;
    }
    assert_eq!(next, [LINES + 1, LINES + 1], "every line of both streams");
    assert_eq!(done, 1, "the step's last line, once");

    eventually("the event stream ends with the run", || body.ended());
    let followed: String = sse_events(&body.text())
        .iter()
        .filter(|(event, _)| event == "log")
        .map(|(_, data)| serde_json::from_str::<Value>(data).unwrap())
        .filter(|v| v["step"] == 1)
        .map(|v| v["text"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        followed == log,
        "a follower gets the log as the file has it ({} bytes, the file {})",
        followed.len(),
        log.len()
    );
}
