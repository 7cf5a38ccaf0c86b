//! How long hookci's matcher takes to decide one push against many pipelines, for
//! `bench/run.sh`. The pipelines are compiled from YAML text by the library's own
//! `Pipeline::parse`, exactly as pipeline files are, and the push is read by
//! `Push::parse`; what is timed is `matcher::decide` alone, the pure function intake
//! calls for every push. No files, no network, no store. A decision's reason is written
//! out only where it is shown or stored, so a second figure, `us_with_reasons`, times
//! `decide` followed by what intake adds for the pipelines of the pushed repository:
//! every reason written out as text.
//!
//!     cargo run --release --example match-bench -- 1 1000
//!
//! prints one line per count:
//! `MATCH pipelines=N us_per_push=X us_with_reasons=Y build=B ignore=I`.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hookci::intake::event::Push;
use hookci::pipeline::matcher::{self, Verdict};
use hookci::pipeline::{Pipeline, PipelineSet};

/// Each measured batch lasts about this long; the median batch is reported, so a batch
/// slowed down by another process on the machine does not move the figure.
const BATCH: Duration = Duration::from_millis(40);
const BATCHES: usize = 25;

/// Every pipeline is for the pushed repository and has the shape of DESIGN.md's example
/// (`branches: [main, "release/**", "!release/old-*"]`, `tags: ["v*"]`), so each one is
/// evaluated in full (last match wins) rather than dismissed by the repository check.
/// One in ten builds release branches; the others have their own team's branches in that
/// place and ignore the push, each with its reason (the patterns it tried), as most
/// pipelines of a large installation do for any one push.
fn pipeline_yaml(i: usize) -> String {
    let (branches, excluded) = if i % 10 == 0 {
        ("release/**".to_owned(), "release/old-*".to_owned())
    } else {
        (format!("team-{i}/**"), format!("team-{i}/old-*"))
    };
    format!(
        "repo: bench/repo\n\
         on:\n  \
           branches: [\"main\", \"{branches}\", \"!{excluded}\"]\n  \
           tags: [\"v*\"]\n\
         steps:\n  - name: build\n    run: make\n"
    )
}

fn pipelines(n: usize) -> Result<PipelineSet, Box<dyn std::error::Error>> {
    let mut list = Vec::with_capacity(n);
    for i in 0..n {
        let path = PathBuf::from(format!("pipelines/p{i:04}.yml"));
        list.push(Pipeline::parse(&path, &pipeline_yaml(i))?);
    }
    Ok(PipelineSet::new(list))
}

const PUSH: &str = r#"{"ref":"refs/heads/release/2.5","before":"1111111111111111111111111111111111111111","after":"2222222222222222222222222222222222222222","created":false,"deleted":false,"forced":false,"head_commit":{"id":"2222222222222222222222222222222222222222","message":"release 2.5"},"repository":{"full_name":"bench/repo","clone_url":"file:///nonexistent/bench/repo.git"}}"#;

/// `decide`, then every reason of a pipeline of the pushed repository as text, as intake
/// stores them.
fn decide_and_write_reasons(push: &Push, set: &PipelineSet) -> Vec<String> {
    matcher::decide(push, set)
        .iter()
        .filter(|d| d.watches_the_repository())
        .filter_map(|d| match &d.verdict {
            Verdict::Build { .. } => None,
            Verdict::Skip { reason, .. } | Verdict::Ignore { reason } => Some(reason.text()),
        })
        .collect()
}

/// Median time of one call of `work`, in microseconds.
fn measure<T>(work: impl Fn() -> T) -> f64 {
    for _ in 0..50 {
        black_box(work());
    }
    // Calls per batch, from one timed call.
    let t = Instant::now();
    black_box(work());
    let one = t.elapsed().max(Duration::from_nanos(100));
    let per_batch = (BATCH.as_nanos() / one.as_nanos()).clamp(1, 1_000_000) as u32;
    let mut samples: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                black_box(work());
            }
            t.elapsed().as_secs_f64() * 1e6 / f64::from(per_batch)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>())
        .collect::<Result<_, _>>()?;
    let counts = if counts.is_empty() {
        vec![1, 1000]
    } else {
        counts
    };
    let push = Push::parse(PUSH.as_bytes())?;
    // For instruction counts (valgrind --tool=callgrind): that many untimed calls of
    // each measured function on the last count, with nothing else around them.
    if let Some(calls) = std::env::var("MATCH_CALLS")
        .ok()
        .and_then(|c| c.parse::<u32>().ok())
    {
        let set = pipelines(counts.last().copied().unwrap_or(1000))?;
        for _ in 0..calls {
            black_box(matcher::decide(black_box(&push), black_box(&set)));
        }
        for _ in 0..calls {
            black_box(decide_and_write_reasons(black_box(&push), black_box(&set)));
        }
        return Ok(());
    }
    for n in counts {
        let set = pipelines(n)?;
        let decisions = matcher::decide(&push, &set);
        let build = decisions
            .iter()
            .filter(|d| matches!(d.verdict, Verdict::Build { .. }))
            .count();
        let ignore = decisions.len() - build;
        drop(decisions);
        let us = measure(|| matcher::decide(black_box(&push), black_box(&set)));
        let with_reasons = measure(|| decide_and_write_reasons(black_box(&push), black_box(&set)));
        println!(
            "MATCH pipelines={n} us_per_push={us:.2} us_with_reasons={with_reasons:.2} build={build} ignore={ignore}"
        );
    }
    Ok(())
}
