//! The pgoutput decoder's fuzz target, for stable Rust: mutates the golden fixtures
//! and feeds the decoder for a bounded time (see `airlock_tests::pgoutput_fuzz`).
//!
//! usage: cargo run --release -p airlock-tests --bin fuzz_pgoutput [-- --secs N --seed N --corpus DIR --findings DIR]
//!
//! Exits 0 when every input gave a message or a clear error, 1 with each offending
//! input (hex) written to the findings directory otherwise.

use std::path::PathBuf;
use std::time::Duration;

use airlock_tests::pgoutput_fuzz;

fn main() {
    let mut secs: u64 = std::env::var("AIRLOCK_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut corpus = airlock_tests::root().join("tests/golden/pgoutput");
    let mut findings = std::env::temp_dir().join("airlock-fuzz-pgoutput");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next().unwrap_or_else(|| {
                eprintln!("{arg} needs a value");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--secs" => secs = value().parse().expect("--secs takes whole seconds"),
            "--seed" => seed = value().parse().expect("--seed takes a number"),
            "--corpus" => corpus = PathBuf::from(value()),
            "--findings" => findings = PathBuf::from(value()),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: fuzz_pgoutput [--secs N] [--seed N] [--corpus DIR] [--findings DIR]"
                );
                std::process::exit(2)
            }
        }
    }
    let seeds = pgoutput_fuzz::corpus(&corpus).unwrap_or_else(|e| {
        eprintln!("cannot read the corpus {}: {e}", corpus.display());
        std::process::exit(2)
    });
    if seeds.is_empty() {
        eprintln!("no *.hex fixtures in {}", corpus.display());
        std::process::exit(2);
    }
    let report = pgoutput_fuzz::run(&seeds, Duration::from_secs(secs), seed);
    println!(
        "fuzz_pgoutput: seed {seed}, {secs} s, {} inputs: {} decoded, {} refused with a clear error, {} seeds, {} findings",
        report.inputs,
        report.decoded,
        report.refused,
        report.seeds,
        report.findings.len()
    );
    println!(
        "counts inputs={} decoded={} refused={} findings={}",
        report.inputs,
        report.decoded,
        report.refused,
        report.findings.len()
    );
    if report.findings.is_empty() {
        return;
    }
    let _ = std::fs::create_dir_all(&findings);
    for (i, finding) in report.findings.iter().enumerate() {
        let path = findings.join(format!("finding-{seed}-{i}.hex"));
        let _ = std::fs::write(
            &path,
            format!("# {}\n{}\n", finding.problem, hex::encode(&finding.input)),
        );
        println!("{}: {}", path.display(), finding.problem);
    }
    std::process::exit(1);
}
