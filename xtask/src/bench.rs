//! `cargo xtask bench [ARGS]`: airlock end to end beside its references.
//!
//! Builds the guests and every binary (airlock and the benches), then runs
//! `bench_e2e` (tests/src/bin/bench_e2e.rs), which starts its own throwaway
//! PostgreSQL cluster and prints the drain, latency, memory and primary-cost table.
//! `ARGS` go to `bench_e2e` (`cargo xtask bench --help` lists them);
//! `cargo xtask bench --pg 18 [ARGS]` runs it on PostgreSQL 18 (fetched and cached,
//! as `cargo xtask test --pg` does), default the system's 15.

use std::process::Command;

/// Builds what the benchmark needs and runs it with `args`.
pub fn bench(args: &[String]) -> Result<(), String> {
    let (bindir, rest) = match args {
        [flag, major, rest @ ..] if flag == "--pg" => (crate::postgres::bindir(major)?, rest),
        rest => (None, rest),
    };
    crate::ensure_postgres()?;
    crate::guests()?;
    let airlock = crate::build_host()?;
    let bench = airlock.with_file_name("bench_e2e");
    let mut command = Command::new(bench);
    command.current_dir(crate::root()).args(rest);
    if let Some(bindir) = bindir {
        eprintln!("== PostgreSQL from {}", bindir.display());
        command.env("AIRLOCK_PG_BINDIR", bindir);
    }
    crate::run(&mut command)
}
