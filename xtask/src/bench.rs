//! `cargo xtask bench [ARGS]`: airlock end to end beside its references.
//!
//! Builds the guests and every binary (airlock and the benches), then runs
//! `bench_e2e` (tests/src/bin/bench_e2e.rs), which starts its own throwaway
//! PostgreSQL cluster and prints the drain, latency, memory and primary-cost table.
//! `ARGS` go to `bench_e2e` (`cargo xtask bench --help` lists them).

use std::process::Command;

/// Builds what the benchmark needs and runs it with `args`.
pub fn bench(args: &[String]) -> Result<(), String> {
    crate::ensure_postgres()?;
    crate::guests()?;
    let airlock = crate::build_host()?;
    let bench = airlock.with_file_name("bench_e2e");
    crate::run(Command::new(bench).current_dir(crate::root()).args(args))
}
