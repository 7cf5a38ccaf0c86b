//! `/metrics`: counters and histograms kept from the run event stream, beside the
//! gauges read from the store, as valid Prometheus text.

use std::collections::HashSet;

use super::*;

#[test]
fn metrics_count_and_time_the_runs_that_ended_in_valid_prometheus_text() {
    let b = Builder::new();
    let origin = Origin::new(b.path());
    let d = b
        .pipeline(
            "ci",
            &pipeline(&origin, "", &[step("check", "test \"$(cat mode)\" = pass")]),
        )
        .start();
    let mut ids = Vec::new();
    for (i, mode) in ["pass", "fail", "pass"].iter().enumerate() {
        let branch = format!("b{i}");
        let sha = origin.commit(&branch, &[("mode", mode)], "x");
        let id = push(
            &d,
            &format!("metrics-{i}"),
            &format!("refs/heads/{branch}"),
            ZERO,
            &sha,
        );
        ids.push(id);
    }
    for id in &ids {
        d.wait_run(*id);
    }

    let wanted = [
        r#"hookci_runs_total{pipeline="ci",status="succeeded"} 2"#,
        r#"hookci_runs_total{pipeline="ci",status="failed"} 1"#,
        r#"hookci_run_duration_seconds_count{pipeline="ci"} 3"#,
        "hookci_queue_wait_seconds_count 3",
        r#"hookci_runs{status="succeeded"} 2"#,
        r#"hookci_runs{status="failed"} 1"#,
        r#"hookci_runs{status="queued"} 0"#,
    ];
    let mut text = String::new();
    eventually("the runs' ends are counted", || {
        let r = d.get("/metrics");
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
            "{:?}",
            r.header("content-type")
        );
        text = r.text();
        wanted.iter().all(|line| text.lines().any(|l| l == *line))
    });
    assert_valid_prometheus_text(&text);
    for family in [
        "hookci_runs gauge",
        "hookci_runs_total counter",
        "hookci_run_duration_seconds histogram",
        "hookci_queue_wait_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {family}")),
            "{family} in:\n{text}"
        );
    }
}

/// The text format's rules (version 0.0.4) as a scraper applies them: comments are
/// `# HELP name text` or `# TYPE name type` (each name typed once, before its samples),
/// a sample is `name{label="value",...} number`, its name the family's or, for a
/// histogram, the family's with `_bucket`, `_sum` or `_count`, and a family's samples
/// come together.
fn assert_valid_prometheus_text(text: &str) {
    assert!(text.ends_with('\n'), "{text}");
    let mut typed: Vec<(String, String)> = Vec::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(valid_name(name), "{line}");
            if kind == "TYPE" {
                let ty = parts.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                    "{line}"
                );
                assert!(!typed.iter().any(|(n, _)| n == name), "typed twice: {line}");
                if let Some(previous) = current.replace(name.to_owned()) {
                    done.insert(previous);
                }
                typed.push((name.to_owned(), ty.to_owned()));
            } else {
                assert_eq!(kind, "HELP", "{line}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "{line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert_valid_labels(labels, line);
        }
        let family = current
            .as_deref()
            .unwrap_or_else(|| panic!("untyped sample {line}"));
        let ty = &typed.iter().find(|(n, _)| n == family).unwrap().1;
        let belongs = name == family
            || (ty == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name == format!("{family}{s}")));
        assert!(belongs, "{line} outside its family {family}");
        assert!(!done.contains(family), "{line}: family {family} resumed");
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `{name="value",...}` with `\\`, `\"` and `\n` the only escapes in a value.
fn assert_valid_labels(labels: &str, line: &str) {
    let inner = labels
        .strip_prefix('{')
        .and_then(|l| l.strip_suffix('}'))
        .unwrap_or_else(|| panic!("{line}"));
    let mut rest = inner;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
        assert!(valid_name(name), "{line}");
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    let escaped = chars.next().map(|(_, c)| c);
                    assert!(matches!(escaped, Some('\\' | '"' | 'n')), "{line}");
                }
                Some((i, '"')) => break i,
                Some(_) => {}
                None => panic!("unterminated label value: {line}"),
            }
        };
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}
