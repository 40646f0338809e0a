//! airlock's integration tests, in one binary: each module is one area, against a
//! real PostgreSQL, real files, real HTTP servers on 127.0.0.1 and the real guests.
//! Support shared by the modules is in the `airlock_tests` library (`tests/src`).
//!
//! One binary, because each test binary links the whole host: twenty-five of them
//! took most of the suite's build time. Run one area with
//! `cargo test --release -p airlock-tests --test suite -- faults::`.

// The source: PostgreSQL, its types and its faults.
mod fuzz_pgoutput;
mod incremental;
mod large_transaction;
mod pgoutput_golden;
mod schema;
mod snapshot;
mod source_faults;
mod streaming;
mod tls;
mod toast;
mod types;

// The guests: the runtime, every language, reloads.
mod guest_cli;
mod guest_runtime;
mod languages;
mod reload;
mod reload_signal;

// The sinks: the lake and the spine.
mod end_to_end;
mod lake_s3;
mod spine;
mod spine_dead_letter;

// The whole host: faults, attacks, operations.
mod config_golden;
mod crash_loop;
mod faults;
mod hostile;
mod identity;
mod operations;
mod policy;
mod progress;
mod security;
