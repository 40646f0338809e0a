//! The `airlock` command: parses arguments, sets up the process and hands over to
//! the library ([`airlock::cli`]).

use std::process::ExitCode;

use clap::Parser;

/// Caps glibc's malloc at two arenas unless `MALLOC_ARENA_MAX` says otherwise.
///
/// By default glibc gives each thread that allocates under contention its own arena,
/// up to eight per core, and memory freed into one arena is not reused by the others.
/// Rows are decoded on one thread, edited on the pipeline thread and freed on the
/// runtime's, so freed memory piles up in arenas that no longer allocate. Streaming a
/// 2,000,000-row transaction (`bench_e2e --only memory`) peaked at 250 MiB RSS with
/// glibc's default and 221 MiB with two arenas, and two arenas drained 1,000,000 rows
/// no slower (`--only drain`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` only sets an allocator tunable; it runs first in `main`,
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    airlock::private_files::restrict_umask();
    let cli = airlock::cli::Cli::parse();
    airlock::cli::init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(airlock::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
