//! The audit spine: an event store with audit-stream-py's API, where airlock records
//! what left and what happened to its pipeline. Both sides live here:
//!
//! ```text
//!  sink::spine (rows → events) ──┐
//!                                ├─▶ client ──HTTP──▶ a spine: audit-stream-py, or the
//!  reload notices (registry) ────┘                     server (`airlock spine serve`)
//! ```
//!
//! - [`client`]: talks to any spine of that API; its errors say whether trying again
//!   can help.
//! - [`server`]: the built-in spine, durable and idempotent, with the same hash chain.
//!
//! Neither side knows of sinks or of the pipeline: what an event holds is decided by
//! the sink (`crate::sink::spine`) and by the reload notices.

pub mod client;
pub mod server;

/// audit-stream-py 0.1.0's `EventKind` values: the kinds both spines accept by default.
pub const AUDIT_STREAM_KINDS: &[&str] = &[
    "decision_card_drafted",
    "decision_card_signed",
    "decision_card_status_changed",
    "policy_bundle_registered",
    "request_denied",
    "request_allowed",
    "contract_promoted",
    "contract_deprecated",
    "contract_compatibility_failed",
    "watch_created",
    "watch_drifted",
    "watch_validity_flipped",
    "incident_filed",
    "remediation_planned",
    "attestation_verified",
    "attestation_tampered",
    "flag_swapped",
    "shadow_divergence_recorded",
    "other",
];
