//! Secrets: they reach steps, never a log or the API.

use super::*;

const DEPLOY_KEY: &str = "-----BEGIN TEST PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcw
c2VjcmV0LWJ1dC1ub3QtYS1yZWFsLWtleQ==
-----END TEST PRIVATE KEY-----";
const API_TOKEN: &str = "tok-7Hq2Zx9wLp4vRk3m";

#[test]
fn secrets_reach_steps_but_never_a_log_or_the_api() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let sha = origin.commit("main", &[("a", "1")], "x");
    let secrets = b.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("DEPLOY_KEY"), format!("{DEPLOY_KEY}\n")).unwrap();
    let marker = b.path().join("missing-secret-step-ran");
    let steps = [
        step("whole", "echo visible-marker\nprintf '%s\\n' \"$DEPLOY_KEY\"\necho \"token=$API_TOKEN\""),
        step(
            "lines",
            "printf '%s\\n' \"$DEPLOY_KEY\" | sed -n 2p\nprintf '%s\\n' \"$DEPLOY_KEY\" | sed -n 3p | sed 's/^/line3: /'",
        ),
        step(
            "trickle",
            // One character a write. The runner passes output on by lines, so long
            // newline-free padding first makes a read boundary fall inside the token.
            r#"trickle() {
  t="$API_TOKEN"
  while [ -n "$t" ]; do
    r="${t#?}"
    printf '%s' "${t%"$r"}"
    t="$r"
    sleep 0.02
  done
  echo
}
trickle
for n in 4091 8187 16379; do
  head -c "$n" /dev/zero | tr '\0' x
  sleep 0.05
  trickle
done"#,
        ),
        step(
            "seen",
            // The values compared by hash, so the check itself prints nothing secret;
            // the daemon's own variable for the token must not reach the step.
            r#"set -e
sum() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
[ "$(sum "$API_TOKEN")" = "$TOKEN_SHA" ]
[ "$(sum "$DEPLOY_KEY")" = "$KEY_SHA" ]
[ -z "${HOOKCI_SECRET_API_TOKEN:-}" ]
echo secrets-seen-ok"#,
        ),
    ];
    let extra = format!(
        "env: {{ TOKEN_SHA: \"{}\", KEY_SHA: \"{}\" }}\nsecrets: [DEPLOY_KEY, API_TOKEN]\n",
        sha256_hex(API_TOKEN),
        sha256_hex(DEPLOY_KEY)
    );
    let d = b
        .pipeline("deploy", &pipeline(&origin, &extra, &steps))
        .pipeline(
            "needs",
            &pipeline(
                &origin,
                "secrets: [MISSING_SECRET_XYZ]\n",
                &[step("use", &format!("touch {}", marker.display()))],
            ),
        )
        .config(&format!("secrets_dir: {}", secrets.display()))
        .env("HOOKCI_SECRET_API_TOKEN", API_TOKEN)
        .start();
    let runs = push_runs(
        &d,
        "secrets-1",
        &push_body("refs/heads/main", ZERO, &sha, "x"),
    );
    let id_of = |name: &str| runs.iter().find(|(p, _)| p == name).unwrap().1;
    let (deploy, needs) = (id_of("deploy"), id_of("needs"));

    let run = d.wait_run(deploy);
    let api_log = d.run_log(deploy);
    assert_eq!(
        run["status"],
        "succeeded",
        "{run:#}\n{}",
        readable(&api_log)
    );
    assert!(
        api_log.contains("secrets-seen-ok"),
        "the step saw the values: {}",
        readable(&api_log)
    );
    assert!(api_log.contains("visible-marker"), "{}", readable(&api_log));
    let files = log_files(&d, deploy);
    assert!(files.contains("visible-marker"), "{}", readable(&files));
    let run_json = run.to_string();
    let daemon_log = d.log();
    let needles: Vec<&str> = DEPLOY_KEY.lines().chain([API_TOKEN]).collect();
    for needle in &needles {
        assert!(needle.len() >= 4);
        assert!(
            !files.contains(needle),
            "{needle:?} in the log files:\n{}",
            readable(&files)
        );
        assert!(
            !api_log.contains(needle),
            "{needle:?} in the API log:\n{}",
            readable(&api_log)
        );
        assert!(!run_json.contains(needle), "{needle:?} in the run JSON");
        assert!(!daemon_log.contains(needle), "{needle:?} in the daemon log");
    }
    for (what, log) in [("log files", &files), ("API log", &api_log)] {
        assert!(log.contains("token=***"), "{what}:\n{}", readable(log));
        assert!(log.contains("line3: ***"), "{what}:\n{}", readable(log));
        assert!(log.contains("x***\n"), "{what}: the split token is masked");
        assert!(
            log.matches("***").count() >= 4,
            "whole key, a line, the token, the trickled token:\n{}",
            readable(log)
        );
    }

    let run = d.wait_run(needs);
    assert_eq!(run["status"], "failed", "{run:#}");
    assert!(reason(&run).contains("MISSING_SECRET_XYZ"), "{run:#}");
    for s in run["steps"].as_array().unwrap() {
        assert_ne!(s["status"], "succeeded", "{run:#}");
    }
    assert!(!marker.exists(), "no step ran without its secret");
    assert!(log_files(&d, needs).is_empty());
}
