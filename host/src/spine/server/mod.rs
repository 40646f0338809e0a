//! The built-in spine: `airlock spine serve`, an audit event store with the API of
//! audit-stream-py, made durable and idempotent.
//!
//! ```text
//!  producers (SpineSink, curl, ...)                 consumers
//!     │ POST /events, POST /events/batch              ▲ GET /events?kind=&source=&limit=, /events/{id}
//!     ▼                                               │ GET /stream (SSE, Last-Event-ID replay), /verify, /stats
//!  router ──validate, canonical payload──▶ mpsc ──▶ writer thread ──────────────┐
//!     ▲                                              │ group commit:            │
//!     │ 201 + event (only after fsync)               │  dedup on payload.event_id
//!     └────────────────────── oneshot ◀──────────────┤  id, prev_hash, hash     │
//!                                                    │  frames ─write─▶ events.log ─fdatasync
//!                                                    └─▶ in-memory index (offsets, kind, source,
//!                                                        event_id → id) ─▶ watch(head) ─▶ /stream
//! ```
//!
//! # Invariants
//!
//! - A 2xx to a write means its events are in `DIR/events.log` and `fdatasync` returned:
//!   they survive `kill -9` and power loss. Readers (`GET`, `/stream`) only see events
//!   that are durable.
//! - Events are numbered `1, 2, 3, ...` in append order with no gaps; one writer thread
//!   appends, so the chain is linear. Concurrent requests are committed together (one
//!   fsync per group); a batch is appended as a whole or not at all.
//! - Idempotent on `payload.event_id`: an event whose `payload.event_id` (any JSON value,
//!   compared by its canonical text) is already stored is not appended again; the answer
//!   is the stored event with `200 OK` instead of `201 Created`.
//! - Recovery on start: a torn tail (an unacknowledged write cut short by a crash) is
//!   saved to `torn-OFFSET.bin` and cut off; a damaged record anywhere else refuses the
//!   start with the record's number (see [`log`]). No torn record is ever served.
//! - A broken chain (an edited, deleted, inserted or reordered record with intact
//!   frames) does not stop the server — appending cannot make it worse — but is logged
//!   at start and reported by `GET /verify` and `airlock spine verify`.
//!
//! # The hash chain
//!
//! Identical to audit-stream-py's, so either side's verifier accepts the other's events.
//! Event *n* has the fields `event_id` (= *n*), `timestamp`, `kind`, `source`, `payload`,
//! `prev_hash` and `hash`, where
//!
//! ```text
//! prev_hash(1) = "0" × 64
//! prev_hash(n) = hash(n − 1)
//! hash(n)      = lowercase hex SHA-256( canonical({event_id, timestamp, kind, source, payload, prev_hash}) )
//! ```
//!
//! `canonical` is Python's `json.dumps(body, sort_keys=True, separators=(",", ":"))`
//! with its default `ensure_ascii=True`, encoded as UTF-8 (all of it is ASCII):
//!
//! - objects: `{` members `}` separated by `,`, each `"key":value`, keys sorted by
//!   Unicode code point (= UTF-8 byte order), at every depth; arrays `[a,b]`; no spaces.
//! - strings: `"` … `"`; `"` → `\"`, `\` → `\\`, U+000A → `\n`, U+000D → `\r`,
//!   U+0009 → `\t`, U+0008 → `\b`, U+000C → `\f`; every other character outside
//!   U+0020..U+007E → `\uXXXX` with four lowercase hex digits per UTF-16 code unit
//!   (a surrogate pair above U+FFFF); everything else (including `/`) as is.
//! - `true`, `false`, `null`.
//! - numbers: a JSON number written without fraction or exponent is an integer and is
//!   written in decimal (`-5`, `10000000000000000000`); any other number is an IEEE
//!   double written as Python's `repr`: the shortest digits that read back to the same
//!   double; with the value as `0.DIGITS × 10^p`, fixed notation when `-4 < p <= 16`
//!   (`0.0001`, `100.0`, `1000000000000000.0`, always a `.`), otherwise
//!   `D[.DDD]e±XX` with at least two exponent digits (`1e-05`, `1.5e+300`).
//!
//! Example: `{"event_id":1,"kind":"other","payload":{"x":"\u00e9"},"prev_hash":"000…0","source":"a","timestamp":"2024-01-01T00:00:00Z"}`.
//! In Python: `hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()`.
//!
//! A chain proves order and content up to its last event; it cannot show that events
//! were cut off the end. Record `latest_hash` from `GET /stats` elsewhere to anchor it.
//! Integers must fit in 64 bits (larger ones are read as doubles).
//!
//! # Verification
//!
//! [`verify`] (and `GET /verify`, `airlock spine verify`) walks the log and reports the
//! first record *n* (1-based position) where: its frame is damaged; its `event_id` is
//! not *n* (a deleted, inserted or reordered record); its `prev_hash` is not the stored
//! hash of record *n − 1*; or the SHA-256 of its canonical body is not its stored
//! hash (an edited record).
//!
//! # API (audit-stream-py's, plus `POST /events/batch`)
//!
//! | Route | Answer |
//! |---|---|
//! | `POST /events` `{kind, source, payload?, timestamp?}` | `201` + event (`200` + the stored event for a known `payload.event_id`); `422 {"detail"}` for a bad request |
//! | `POST /events/batch` `[{kind, source, payload?, timestamp?}, ...]` | `201` + array of events, in request order; all or nothing |
//! | `GET /events?kind=&source=&limit=1000` | the last `limit` (1..100000) matching events, oldest first. Unlike audit-stream-py, `kind` and `source` together both filter |
//! | `GET /events/{id}` | the event, or `404 {"detail": "unknown event_id: N"}` |
//! | `GET /stream` | server-sent events `event: KIND`, `id: N`, `data: EVENT`; from after `Last-Event-ID` when given, else new events only |
//! | `GET /verify` | `{valid, checked, first_break_at, reason}` (+ `torn_tail_bytes`) |
//! | `GET /stats` | `{count, last_event_id, latest_hash}` |
//! | `GET /healthz`, `GET /` | `{"status": "ok"}`, service info |
//!
//! With a token, every route but `/healthz` needs `Authorization: Bearer TOKEN`.

pub mod chain;
mod http;
pub mod log;

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

pub use http::{SpineState, router, serve};

/// Why the spine could not start, serve or verify.
#[derive(Debug, thiserror::Error)]
pub enum SpineError {
    #[error(transparent)]
    Log(#[from] log::LogError),
    /// A damaged record that is not a torn tail: the log is refused.
    #[error(
        "{path}: record {record} at byte {offset} is damaged ({reason}); the log was edited or \
         the disk damaged it. Run `airlock spine verify --dir {dir}` and restore the log from a \
         copy; if it is the unacknowledged tail of a crash, cut it off with `truncate -s {offset} {path}`",
        path = path.display(),
        dir = path.parent().unwrap_or(Path::new(".")).display()
    )]
    Corrupt {
        path: PathBuf,
        record: u64,
        offset: u64,
        reason: String,
    },
    #[error("{path}: record {record} is not a spine event: {reason}", path = path.display())]
    BadRecord {
        path: PathBuf,
        record: u64,
        reason: String,
    },
    #[error("spine server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// A listener that others can reach, without a token.
    #[error(
        "refusing to serve the spine on {addr} without a token: anyone who reaches that \
         address could read every event and write forged ones; set AIRLOCK_SPINE_TOKEN \
         (or --token), or listen on 127.0.0.1"
    )]
    OpenWithoutToken { addr: std::net::SocketAddr },
}

/// The outcome of walking a log's hash chain.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// No record is damaged and the chain holds.
    pub valid: bool,
    /// Records that passed every check (all of them when `valid`).
    pub checked: u64,
    /// Position (1-based, = the expected `event_id`) of the first bad record.
    pub first_break_at: Option<u64>,
    /// What is wrong with it.
    pub reason: Option<String>,
    /// Bytes of an unacknowledged write cut short by a crash at the end of the log
    /// (cut off at the next start); 0 normally.
    pub torn_tail_bytes: u64,
    /// Hash of the last checked record.
    pub latest_hash: Option<String>,
}

/// Walks the log in `dir` and reports the first edited, deleted, inserted, reordered or
/// damaged record. Reads only; safe while a server appends (an in-flight write may show
/// as a torn tail).
pub fn verify(dir: &Path) -> Result<VerifyReport, SpineError> {
    verify_file(&dir.join(log::LOG_FILE), None)
}

/// [`verify`] over the first `len` bytes of the log file at `path`.
pub(crate) fn verify_file(path: &Path, len: Option<u64>) -> Result<VerifyReport, SpineError> {
    let mut report = VerifyReport {
        valid: true,
        checked: 0,
        first_break_at: None,
        reason: None,
        torn_tail_bytes: 0,
        latest_hash: None,
    };
    let Some(mut reader) = log::Reader::open(path, len)? else {
        return Ok(report);
    };
    let mut chain = Chain::default();
    loop {
        let step = reader.read_next().map_err(|source| log::LogError::Io {
            path: path.to_path_buf(),
            action: "read",
            source,
        })?;
        match step {
            log::Step::Frame(frame) => {
                let position = reader.records();
                if let Err(reason) = chain.check(position, &frame).map(drop) {
                    report.valid = false;
                    report.first_break_at = Some(position);
                    report.reason = Some(reason);
                    return Ok(report);
                }
                report.checked = position;
                report.latest_hash = Some(chain.prev.clone());
            }
            log::Step::End(log::End::Clean) => return Ok(report),
            log::Step::End(log::End::Torn { bytes, .. }) => {
                report.torn_tail_bytes = bytes;
                return Ok(report);
            }
            log::Step::End(log::End::Corrupt {
                record,
                offset,
                reason,
            }) => {
                report.valid = false;
                report.first_break_at = Some(record);
                report.reason = Some(format!("event #{record} at byte {offset}: {reason}"));
                return Ok(report);
            }
        }
    }
}

/// The fields of a stored event the spine needs, read from its canonical body.
#[derive(Debug)]
pub(crate) struct Stored {
    pub event_id: u64,
    pub kind: String,
    pub source: String,
    pub prev_hash: String,
    /// Canonical text of `payload.event_id`, when present and not null.
    pub idempotency_key: Option<String>,
}

impl Stored {
    pub fn parse(canonical: &[u8]) -> Result<Stored, String> {
        let value: Json =
            serde_json::from_slice(canonical).map_err(|e| format!("not JSON: {e}"))?;
        let text = |key: &str| {
            value
                .get(key)
                .and_then(Json::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("no string `{key}`"))
        };
        let event_id = value
            .get("event_id")
            .and_then(Json::as_u64)
            .ok_or("no integer `event_id`")?;
        let payload = value
            .get("payload")
            .and_then(Json::as_object)
            .ok_or("no object `payload`")?;
        let idempotency_key = payload
            .get("event_id")
            .filter(|v| !v.is_null())
            .map(|v| String::from_utf8(chain::canonical(v)).expect("canonical JSON is ASCII"));
        let _ = text("timestamp")?;
        Ok(Stored {
            event_id,
            kind: text("kind")?,
            source: text("source")?,
            prev_hash: text("prev_hash")?,
            idempotency_key,
        })
    }
}

/// The running check of a chain: what `prev_hash` the next record must carry.
#[derive(Debug)]
pub(crate) struct Chain {
    pub prev: String,
}

impl Default for Chain {
    fn default() -> Chain {
        Chain {
            prev: chain::GENESIS_HASH.to_owned(),
        }
    }
}

impl Chain {
    /// Checks record `position` (1-based) and moves on to the next. The `Err` is the
    /// reason, in audit-stream-py's words where it has them.
    pub fn check(&mut self, position: u64, frame: &log::Frame) -> Result<Stored, String> {
        let stored = Stored::parse(frame.canonical())
            .map_err(|e| format!("event #{position} is not a valid event: {e}"))?;
        if stored.event_id != position {
            return Err(format!(
                "event_id should be {position}, got {}",
                stored.event_id
            ));
        }
        if stored.prev_hash != self.prev {
            return Err(format!("prev_hash mismatch at event #{position}"));
        }
        if chain::hash(frame.canonical()) != frame.hash() {
            return Err(format!("hash mismatch at event #{position}"));
        }
        self.prev = hex::encode(frame.hash());
        Ok(stored)
    }
}

#[cfg(test)]
mod tests;
