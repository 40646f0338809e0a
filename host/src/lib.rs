//! airlock: a one-way, governed pipeline out of PostgreSQL.
//!
//! ```text
//! PostgreSQL ──pgoutput──▶ source ──Transaction──▶ pipeline (Wasm guests) ──Arc<Batch>──▶ sinks (lake, spine)
//!     ▲                                                                                    │
//!     └──────────── standby status: flush LSN = min durable over sinks ◀── checkpoint ◀────┘
//! ```
//!
//! [`run`] wires the parts together; each module's documentation states its own
//! invariants.

pub mod admin;
pub mod backoff;
pub mod change;
pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod demo;
pub mod identity;
pub mod secrets;

pub mod pipeline;
pub mod policy;
pub mod private_files;
pub mod progress;
pub mod sink;
pub mod source;
pub mod status;

mod app;

pub use app::{RunError, run};
pub mod spine;
