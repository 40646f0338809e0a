//! The spine sink: rows routed to it become audit events, delivered in commit order to
//! an audit-stream-py compatible spine — audit-stream-py itself or the built-in
//! [`crate::spine`].
//!
//! ```text
//! accept(Arc<Batch>) ── kept rows ─▶ event JSON (no I/O) ─▶ pending: VecDeque, commit order
//!                                                               │
//! flush() ─ resync? GET {url}?source=S&limit=n ─▶ newest id signed by our slot's key ─▶ drop pending ≤ it
//!         ─ POST {url}/batch (chunks of max_events)      ─┐ one request at a time, over the
//!           or POST {url} per event (no batch endpoint)  ─┘ client's persistent connections
//!         ─ 2xx: pop what it carried · 5xx/408/429/timeout/refused: Transient
//!           · 3xx (never followed) and other 4xx: Definite
//! ```
//!
//! Invariants:
//! - An event leaves the buffer only after the spine answered 2xx for it; events are
//!   sent in commit order and, within a transaction, in change order, one request at a
//!   time. Nothing is dropped or reordered: a transient failure keeps everything and
//!   [`drive`](crate::sink::drive) retries `flush` with backoff (plus jitter here).
//! - Redirects are not followed, and a 3xx is a definite error naming where it points:
//!   a redirected POST would come back as a GET whose 2xx says nothing of delivery.
//! - Each event has a *position* `(commit_lsn, index)`, `index` being the change's
//!   place in its transaction (counting every change, whatever guests dropped or
//!   routed), and an `event_id` derived from it and signed (see [`event_id`]): an HMAC
//!   under the slot's [`Key`] over the slot, the source and the position. Positions
//!   of delivered events strictly increase.
//! - No duplicates after a restart, and no event skipped because of what someone else
//!   wrote: before its first delivery, and again after any failed request (whose events
//!   may have landed anyway), the sink asks the spine for the newest events of each of
//!   its sources (`GET {url}?source=S&limit=N`) and skips every pending event at or
//!   before the newest position among the ids that verify under its slot and key
//!   ([`parse_event_id`]). Another writer to the spine can neither forge nor predict
//!   such an id, so it can make the sink send events once more (by hiding ours behind
//!   4096 of its own, or replaying an old one of ours to audit-stream-py), never skip
//!   one. A spine that is idempotent on `payload.event_id` (the built-in one) also drops
//!   any duplicate that gets through, and nobody can take one of our future ids first.
//!   The sources asked about are the default, the `watch` sources and every source seen
//!   since start. Two pipelines on one spine may share source names when their slots
//!   or keys differ; with the same slot name and key file they must not.
//! - The key lives in a key file per slot (`key_file`, default [`default_key_file`]),
//!   created when absent and refused when others may read or replace it
//!   ([`crate::secrets`]). Ids of the unsigned form earlier versions wrote (`C-I-S`)
//!   are never trusted, so after an upgrade (or a lost key file) the events after the
//!   slot's confirmed position may be sent once more, and the built-in spine's
//!   idempotency does not catch those (their ids differ).
//! - Kinds are checked at [`SpineSink::open`] (default and `watch` kinds) against the
//!   spine's list; a guest's `spine.kind` annotation outside it is a definite error at
//!   `accept`, naming the row, rather than an event refused later.
//! - Dead-letter directories and files the sink creates are its owner's only (0700, 0600).
//!
//! # Events
//!
//! `{"kind", "source", "payload", "timestamp"}` with `timestamp` the commit time (ISO
//! 8601 UTC) and `payload`:
//! `table` (`schema.table`), `operation` (`INSERT`, `UPDATE`, `DELETE`, `TRUNCATE`,
//! `SNAPSHOT`), `new` (new image, when there is one), `old` (old image: key columns, or
//! every column with `REPLICA IDENTITY FULL`), `lsn`, `commit_lsn` (PostgreSQL's
//! `X/Y` text), `xid`, `pipeline`, `tags` (row tags), `actor` (who made the change,
//! when identity is on: [`Identity::to_json`](crate::change::identity::Identity::to_json),
//! or `null` with `unattributed: true` for a change recorded without one),
//! `copied` (for `SNAPSHOT` rows: why the table was copied, `initial snapshot` or
//! `copied again: …`),
//! `column_tags` (only when a column has tags) and `event_id`. Values are [`row_to_json`]'s: the row as the guests left
//! it (masked), exact, untouched.
//!
//! `kind` and `source`: the row's `spine.kind` / `spine.source` annotation, else the
//! first `watch` entry whose `schema.table` glob matches the table, else the defaults.
//!
//! # Policy events
//!
//! Under the source [`POLICY_SOURCE`], with ids of their own ([`policy_event_id`]:
//! about what, never when, so each is recorded once across restarts) and no row
//! position (they never move the resume point):
//! - [`BUNDLE_KIND`] at open, when the spine's latest registration of this slot and
//!   key is another policy version (or there is none), before any row;
//! - [`DENIED_KIND`] for each [`Denial`] a batch carries, before the batch's rows.
//!
//! The sink reads the latest [`POLICY_LOOKBACK`] events of the source at open and at
//! every resync, and skips those it finds.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value as Json, json};
use sha2::{Digest, Sha256};

use crate::backoff::Backoff;
use crate::change::json::{format_timestamp, row_to_json};
use crate::change::{Lsn, Op, Relation, ReplicaIdentity};
use crate::pipeline::batch::{Batch, BatchRow};
use crate::policy::Denial;
use crate::secrets::{Key, constant_time_eq};
use crate::sink::{Sink, SinkError};
use crate::spine::AUDIT_STREAM_KINDS;
use crate::spine::client::{ClientError, SpineClient};

/// The annotation a guest sets to choose a row's event kind.
pub const KIND_ANNOTATION: &str = "spine.kind";
/// The annotation a guest sets to choose a row's event source.
pub const SOURCE_ANNOTATION: &str = "spine.source";

/// A batch request stops growing past this many bytes (one event may be larger).
const BATCH_BYTES: usize = 8 << 20;

/// Settings of one spine sink, validated by the config layer and by [`SpineSink::open`].
#[derive(Clone, Debug)]
pub struct SpineSettings {
    /// The sink's name in the configuration (`[sinks.NAME]`), used in logs and errors.
    pub name: String,
    /// The spine's events endpoint, e.g. `http://127.0.0.1:8093/events`.
    pub url: String,
    /// Routes this sink takes (a row without routes takes `default`).
    pub routes: Vec<String>,
    /// Bearer token sent with every request.
    pub token: Option<String>,
    /// The kinds the spine accepts (its `EventKind` values).
    pub kinds: Vec<String>,
    /// Kind of events whose row has no annotation and no `watch` match.
    pub default_kind: String,
    /// Source of events whose row has no annotation and no `watch` match.
    pub default_source: String,
    /// `(schema.table glob, kind, source)`: the first match gives a table's events
    /// their kind and source. `*` and `?` wildcards; without a dot, any schema.
    pub watch: Vec<(String, String, String)>,
    /// How long accepted events may wait before a flush.
    pub flush_interval: Duration,
    /// Flush when this many events are buffered; also the most events per request.
    pub max_events: usize,
    /// Time limit of one HTTP request (connect, send, answer).
    pub request_timeout: Duration,
    /// Where events the spine refuses with a 4xx go, one JSON line each with the
    /// spine's answer, so the stream goes on. `None`: a 4xx stops the pipeline.
    pub dead_letter_dir: Option<std::path::PathBuf>,
    /// The replication slot whose changes this sink delivers. Event ids are bound to
    /// it: a sink resumes only from ids made for its own slot.
    pub slot: String,
    /// The key that signs this slot's event ids. `None`: read from `key_file` (or
    /// created there) at [`SpineSink::open`].
    pub key: Option<Key>,
    /// Where the key is kept when `key` is `None` ([`Key::load_or_create`]); `None`:
    /// the slot's default key file ([`default_key_file`]).
    pub key_file: Option<std::path::PathBuf>,
    /// The policy the rows passed: registered at start when the spine does not hold
    /// it as the latest, and the source of the denials recorded. `None`: no policy
    /// events (tests of other parts).
    pub policy: Option<PolicyRecord>,
    /// `[source] identity = "record"`: the event of a change written without an
    /// identity says so (`"actor": null, "unattributed": true`).
    pub mark_unattributed: bool,
}

/// The policy as the spine records it.
#[derive(Clone, Debug)]
pub struct PolicyRecord {
    /// [`crate::policy::Policy::version`].
    pub version: String,
    /// [`crate::policy::Policy::describe`].
    pub bundle: Json,
}

/// The source of the policy's own events (`policy_bundle_registered`,
/// `request_denied`).
pub const POLICY_SOURCE: &str = "airlock.policy";
/// The kind of the event that registers the policy in force.
pub const BUNDLE_KIND: &str = "policy_bundle_registered";
/// The kind of the events that record what the policy kept out.
pub const DENIED_KIND: &str = "request_denied";
/// How many of [`POLICY_SOURCE`]'s latest events the sink reads to know which it
/// delivered already.
const POLICY_LOOKBACK: usize = 4096;

impl SpineSettings {
    pub const DEFAULT_ROUTE: &'static str = "spine";
    pub const DEFAULT_KIND: &'static str = "other";
    pub const DEFAULT_SOURCE: &'static str = "airlock";
    pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
    pub const DEFAULT_MAX_EVENTS: usize = 1000;
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_SLOT: &'static str = "airlock";

    /// Settings with the defaults: route `spine`, audit-stream-py's kinds, kind
    /// `other`, source `airlock`, no watch map, 1 s, 1000 events, 30 s per request,
    /// slot `airlock`, the slot's default key file.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> SpineSettings {
        SpineSettings {
            name: name.into(),
            url: url.into(),
            routes: vec![Self::DEFAULT_ROUTE.to_owned()],
            token: None,
            kinds: AUDIT_STREAM_KINDS.iter().map(|k| (*k).to_owned()).collect(),
            default_kind: Self::DEFAULT_KIND.to_owned(),
            default_source: Self::DEFAULT_SOURCE.to_owned(),
            watch: Vec::new(),
            flush_interval: Self::DEFAULT_FLUSH_INTERVAL,
            max_events: Self::DEFAULT_MAX_EVENTS,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            dead_letter_dir: None,
            slot: Self::DEFAULT_SLOT.to_owned(),
            key: None,
            key_file: None,
            policy: None,
            mark_unattributed: false,
        }
    }
}

/// Where an event comes from in the change stream: its transaction's commit LSN and
/// the change's index in that transaction. Ordered as the stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub index: u32,
}

/// The `event_id` of the change at `position` of `slot`, delivered under `source`:
/// `CCCCCCCCCCCCCCCC-IIIIII-SSSSSSSS-MMMM…` (32 `M`s), the commit LSN as 16 uppercase
/// hex digits, the change's index in its transaction in (at least 6) decimal digits,
/// the first 8 hex digits of SHA-256(`source`) and the MAC: the first 16 bytes, in
/// lowercase hex, of
///
/// ```text
/// HMAC-SHA256(key, "airlock-spine-event-v1" ‖ 0x00 ‖ u32be(len slot) ‖ slot
///                  ‖ u32be(len source) ‖ source ‖ u64be(commit_lsn) ‖ u32be(index))
/// ```
///
/// Redelivery of the same change under the same source, slot and key gives the same
/// id (so a spine idempotent on `payload.event_id` drops the copy); without the key
/// nobody can make or predict one. (The change's own LSN adds nothing to
/// `(commit_lsn, index)`, and one TRUNCATE of several tables gives several changes
/// with one LSN, so it is not part of the id.)
pub fn event_id(key: &Key, slot: &str, source: &str, position: Position) -> String {
    format!(
        "{:016X}-{:06}-{}-{}",
        position.commit_lsn.0,
        position.index,
        source_tag(source),
        hex::encode(event_mac(key, slot, source, position))
    )
}

/// Bytes of the MAC in an event id.
const MAC_LEN: usize = 16;

fn event_mac(key: &Key, slot: &str, source: &str, position: Position) -> [u8; MAC_LEN] {
    let full = key.mac(&[
        b"airlock-spine-event-v1\0",
        &(slot.len() as u32).to_be_bytes(),
        slot.as_bytes(),
        &(source.len() as u32).to_be_bytes(),
        source.as_bytes(),
        &position.commit_lsn.0.to_be_bytes(),
        &position.index.to_be_bytes(),
    ]);
    let mut mac = [0; MAC_LEN];
    mac.copy_from_slice(&full[..MAC_LEN]);
    mac
}

fn source_tag(source: &str) -> String {
    hex::encode(&Sha256::digest(source.as_bytes())[..4])
}

/// The position of an `event_id` that [`event_id`] made for `source` with this `slot`
/// and `key` (the MAC is checked in constant time); `None` for any other id: another
/// producer's event, another slot's, one made with another key, or one of the
/// unsigned form of earlier airlock versions.
pub fn parse_event_id(key: &Key, slot: &str, source: &str, id: &str) -> Option<Position> {
    let mut parts = id.split('-');
    let (lsn, index) = (parts.next()?, parts.next()?);
    if lsn.len() != 16 || !lsn.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let position = Position {
        commit_lsn: Lsn(u64::from_str_radix(lsn, 16).ok()?),
        index: index.parse().ok()?,
    };
    // The one id this key makes for the position, compared whole: no other spelling
    // of it (case, leading zeros) is taken either.
    let expected = event_id(key, slot, source, position);
    constant_time_eq(expected.as_bytes(), id.as_bytes()).then_some(position)
}

/// The `event_id` of a policy event: `policy-` and 32 hex digits, the first 16
/// bytes of
///
/// ```text
/// HMAC-SHA256(key, "airlock-spine-policy-v1" ‖ 0x00 ‖ for slot, source and each part:
///                  u32be(len) ‖ bytes)
/// ```
///
/// The parts say what the event is about (e.g. `column`, the policy version, the
/// table and the column), never when: the same denial gives the same id after a
/// restart, so it is recorded once. Row-event ids never take this form.
pub fn policy_event_id(key: &Key, slot: &str, parts: &[&str]) -> String {
    let mut fields: Vec<&[u8]> = vec![b"airlock-spine-policy-v1\0"];
    let lengths: Vec<[u8; 4]> = [slot, POLICY_SOURCE]
        .iter()
        .chain(parts)
        .map(|p| (p.len() as u32).to_be_bytes())
        .collect();
    for (part, len) in [slot, POLICY_SOURCE].iter().chain(parts).zip(&lengths) {
        fields.push(len);
        fields.push(part.as_bytes());
    }
    format!("policy-{}", hex::encode(&key.mac(&fields)[..MAC_LEN]))
}

/// The id of the registration of policy `version` after `previous` (empty: none):
/// registering the same change again gives the same id.
fn bundle_id(key: &Key, slot: &str, version: &str, previous: &str) -> String {
    policy_event_id(key, slot, &["bundle", version, previous])
}

/// The default key file of `slot`'s spine events:
/// `$XDG_STATE_HOME/airlock/spine-{slot}.key`, else
/// `~/.local/state/airlock/spine-{slot}.key` (a relative `XDG_STATE_HOME` is ignored,
/// as the XDG base directory specification asks); `None` without either variable.
pub fn default_key_file(slot: &str) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("airlock").join(format!("spine-{slot}.key")))
}

/// A compiled `watch` entry.
#[derive(Clone, Debug)]
struct Watch {
    schema: Option<String>,
    table: String,
    kind: String,
    source: String,
}

impl Watch {
    fn new(pattern: &str, kind: &str, source: &str) -> Watch {
        let (schema, table) = match pattern.split_once('.') {
            Some((s, t)) => (Some(s.to_owned()), t.to_owned()),
            None => (None, pattern.to_owned()),
        };
        Watch {
            schema,
            table,
            kind: kind.to_owned(),
            source: source.to_owned(),
        }
    }

    fn matches(&self, relation: &Relation) -> bool {
        self.schema
            .as_deref()
            .is_none_or(|s| glob(s, &relation.schema))
            && glob(&self.table, &relation.name)
    }
}

/// `*` (any run) and `?` (any one character) wildcards.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// One event waiting for delivery.
struct Pending {
    /// A row event's place in the stream; `None` for a policy event, which its
    /// `event_id` identifies instead.
    position: Option<Position>,
    event_id: String,
    /// `table T, kind K, source S`, for error messages.
    about: String,
    body: Bytes,
}

/// The spine sink. See the [module documentation](self).
pub struct SpineSink {
    settings: SpineSettings,
    /// `settings.key`, or the one in the slot's default key file.
    key: Key,
    client: SpineClient,
    watch: Vec<Watch>,
    pending: VecDeque<Pending>,
    /// End LSN of the last accepted transaction not yet reported by `flush`.
    accepted_end: Option<Lsn>,
    /// The newest position known to be in the spine.
    delivered: Option<Position>,
    /// Ask the spine what it has before sending (at start when it was unreachable,
    /// and after a failed request).
    resync: bool,
    /// Sources to ask the spine about.
    sources: BTreeSet<String>,
    /// Whether the spine takes `POST {url}/batch` (unknown until tried).
    batch_endpoint: Option<bool>,
    /// Events at the front of `pending` to send one at a time: a batch holding them
    /// was refused, and one-by-one delivery finds the event the spine refuses.
    isolate: usize,
    /// Whether the last flush failed transiently (the next one waits a jittered delay).
    failed: bool,
    jitter: Backoff,
    /// The ids of [`POLICY_SOURCE`] events the spine holds (of its latest
    /// [`POLICY_LOOKBACK`]) or that this sink delivered.
    policy_known: std::collections::HashSet<String>,
    /// Whether the policy in force has been compared with the spine's latest.
    policy_synced: bool,
}

impl SpineSink {
    /// Validates the settings (every kind against `kinds`, every problem at once),
    /// builds the client and asks the spine which of this sink's events it already has.
    /// A spine that cannot be reached is asked again before the first delivery; a
    /// definite answer (bad token, wrong URL) fails here.
    pub async fn open(settings: SpineSettings) -> Result<SpineSink, SinkError> {
        let watch = validate(&settings)?;
        let key = match &settings.key {
            Some(key) => key.clone(),
            None => load_key(&settings).await?,
        };
        let client = SpineClient::new(
            &settings.url,
            settings.token.clone(),
            settings.request_timeout,
        )
        .map_err(|e| sink_error(&settings.name, e, None))?;
        let mut sources: BTreeSet<String> = watch.iter().map(|w| w.source.clone()).collect();
        sources.insert(settings.default_source.clone());
        let mut sink = SpineSink {
            settings,
            key,
            client,
            watch,
            pending: VecDeque::new(),
            accepted_end: None,
            delivered: None,
            resync: true,
            sources,
            batch_endpoint: None,
            isolate: 0,
            failed: false,
            jitter: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).full_jitter(),
            policy_known: Default::default(),
            policy_synced: false,
        };
        let asked = async {
            let found = sink.last_delivered().await?;
            sink.sync_policy().await?;
            Ok::<_, SinkError>(found)
        };
        match asked.await {
            Ok(found) => {
                sink.delivered = found;
                sink.resync = false;
                if let Some(p) = found {
                    tracing::info!(
                        sink = %sink.settings.name, url = sink.client.shown_url(), commit_lsn = %p.commit_lsn, index = p.index,
                        "the spine has events up to this position; skipping them"
                    );
                }
            }
            Err(error) if error.is_transient() => {
                tracing::warn!(sink = %sink.settings.name, %error, "spine unreachable at start; will ask it again before the first delivery");
            }
            Err(error) => return Err(error),
        }
        // The policy in force is on record before any row.
        if !sink.pending.is_empty()
            && let Err(error) = sink.deliver().await
        {
            if !error.is_transient() {
                return Err(error);
            }
            tracing::warn!(sink = %sink.settings.name, %error, "cannot register the policy with the spine yet; it goes before the first row");
            sink.resync = true;
        }
        Ok(sink)
    }

    /// Learns which policy events the spine holds, and queues the registration of
    /// the policy in force when the spine's latest registration (of this slot and
    /// key) is another version, or there is none.
    async fn sync_policy(&mut self) -> Result<(), SinkError> {
        let Some(policy) = self.settings.policy.clone() else {
            return Ok(());
        };
        let events = self
            .client
            .events(None, Some(POLICY_SOURCE), POLICY_LOOKBACK)
            .await
            .map_err(|e| sink_error(&self.settings.name, e, None))?;
        let mut latest: Option<String> = None;
        for event in &events {
            let payload = event.get("payload");
            let Some(id) = payload.and_then(|p| p.get("event_id")?.as_str()) else {
                continue;
            };
            self.policy_known.insert(id.to_owned());
            if event.get("kind").and_then(Json::as_str) != Some(BUNDLE_KIND) {
                continue;
            }
            let field = |name: &str| payload.and_then(|p| p.get(name)?.as_str()).unwrap_or("");
            let (version, previous) = (field("policy"), field("previous"));
            let expected = bundle_id(&self.key, &self.settings.slot, version, previous);
            // Oldest first: the last one that verifies is the latest.
            if constant_time_eq(expected.as_bytes(), id.as_bytes()) {
                latest = Some(version.to_owned());
            }
        }
        if self.policy_synced {
            return Ok(());
        }
        self.policy_synced = true;
        if latest.as_deref() == Some(policy.version.as_str()) {
            return Ok(());
        }
        let previous = latest.unwrap_or_default();
        let id = bundle_id(&self.key, &self.settings.slot, &policy.version, &previous);
        let mut payload = Map::new();
        payload.insert("policy".into(), policy.version.clone().into());
        payload.insert(
            "previous".into(),
            if previous.is_empty() {
                Json::Null
            } else {
                previous.into()
            },
        );
        payload.insert("bundle".into(), policy.bundle.clone());
        payload.insert("slot".into(), self.settings.slot.clone().into());
        self.pending.push_front(self.policy_event(
            BUNDLE_KIND,
            id,
            payload,
            "the policy in force",
        )?);
        Ok(())
    }

    /// A policy event, ready to send.
    fn policy_event(
        &self,
        kind: &str,
        id: String,
        mut payload: Map<String, Json>,
        about: &str,
    ) -> Result<Pending, SinkError> {
        payload.insert("event_id".into(), id.clone().into());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let body = serde_json::to_vec(&json!({
            "kind": kind,
            "source": POLICY_SOURCE,
            "payload": Json::Object(payload),
            "timestamp": format_timestamp(now, true),
        }))
        .map_err(|e| self.definite(format!("cannot encode event {id}: {e}")))?;
        Ok(Pending {
            position: None,
            about: format!("{about}, kind {kind}, source {POLICY_SOURCE}"),
            event_id: id,
            body: Bytes::from(body),
        })
    }

    /// The `request_denied` event of a denial, unless the spine holds it already.
    fn denial_event(&self, denial: &Denial, policy: &str) -> Result<Option<Pending>, SinkError> {
        let slot = &self.settings.slot;
        let mut payload = Map::new();
        payload.insert("policy".into(), policy.into());
        let (id, about) = match denial {
            Denial::Column { table, column, key } => {
                payload.insert("reason".into(), "unclassified column".into());
                payload.insert("table".into(), table.clone().into());
                payload.insert("column".into(), column.clone().into());
                payload.insert("action".into(), "drop".into());
                payload.insert("replica_identity".into(), (*key).into());
                let id = policy_event_id(&self.key, slot, &["column", policy, table, column]);
                (id, format!("denied column {table}.{column}"))
            }
            Denial::Unwritten(v) => {
                payload.insert(
                    "reason".into(),
                    "responsible stage left values unwritten".into(),
                );
                payload.insert("table".into(), v.table.clone().into());
                payload.insert("column".into(), v.column.clone().into());
                payload.insert("class".into(), v.class.clone().into());
                payload.insert("stage".into(), v.stage.clone().into());
                payload.insert("unwritten".into(), v.unwritten.into());
                payload.insert("xid".into(), v.xid.into());
                payload.insert("commit_lsn".into(), v.commit_lsn.to_string().into());
                let lsn = v.commit_lsn.to_string();
                let parts = ["unwritten", policy, &v.table, &v.column, &v.stage, &lsn];
                let id = policy_event_id(&self.key, slot, &parts);
                (id, format!("undelivered batch of {}.{}", v.table, v.column))
            }
        };
        if self.policy_known.contains(&id) || self.pending.iter().any(|p| p.event_id == id) {
            return Ok(None);
        }
        self.policy_event(DENIED_KIND, id, payload, &about)
            .map(Some)
    }

    /// The settings the sink runs with.
    pub fn settings(&self) -> &SpineSettings {
        &self.settings
    }

    /// Events accepted and not yet delivered.
    pub fn pending_events(&self) -> usize {
        self.pending.len()
    }

    /// The newest position the spine is known to hold.
    pub fn delivered(&self) -> Option<Position> {
        self.delivered
    }

    fn definite(&self, message: String) -> SinkError {
        SinkError::Definite {
            sink: self.settings.name.clone(),
            message,
        }
    }

    /// The newest position among the spine's events of this sink's sources whose
    /// `event_id` this sink's slot and key made. Nothing else counts: whatever another
    /// producer posts can only make this older (events sent once more), never newer.
    async fn last_delivered(&self) -> Result<Option<Position>, SinkError> {
        let mut newest = None;
        for source in &self.sources {
            // Other producers may share the source: look further back until one of ours.
            for limit in [1, 16, 256, 4096] {
                let events = self.client.events(None, Some(source), limit).await;
                let events = events.map_err(|e| sink_error(&self.settings.name, e, None))?;
                let ours = events
                    .iter()
                    .filter_map(|e| {
                        let id = e.get("payload")?.get("event_id")?.as_str()?;
                        parse_event_id(&self.key, &self.settings.slot, source, id)
                    })
                    .max();
                if let Some(p) = ours {
                    newest = newest.max(Some(p));
                    break;
                }
                if events.len() < limit {
                    break;
                }
            }
        }
        Ok(newest)
    }

    /// Drops the pending events the spine holds: row events at or before the newest
    /// delivered position, policy events it has by id.
    fn skip_delivered(&mut self) {
        let (delivered, known) = (self.delivered, &self.policy_known);
        self.pending.retain(|e| match e.position {
            Some(p) => delivered.is_none_or(|d| p > d),
            None => !known.contains(&e.event_id),
        });
    }

    /// Notes a delivered event.
    fn delivered_one(&mut self, event: Pending) {
        match event.position {
            Some(p) => self.delivered = Some(p),
            None => {
                self.policy_known.insert(event.event_id);
            }
        }
    }

    async fn deliver(&mut self) -> Result<(), SinkError> {
        if self.resync {
            let found = self.last_delivered().await?;
            self.sync_policy().await?;
            self.delivered = self.delivered.max(found);
            self.resync = false;
            self.skip_delivered();
        }
        while !self.pending.is_empty() {
            if self.batch_endpoint != Some(false) && self.isolate == 0 {
                let mut count = 0;
                let mut bytes = 0;
                let mut body =
                    Vec::with_capacity(self.pending.front().map_or(0, |p| p.body.len()) + 2);
                body.push(b'[');
                for event in &self.pending {
                    if count == self.settings.max_events.max(1)
                        || (count > 0 && bytes + event.body.len() > BATCH_BYTES)
                    {
                        break;
                    }
                    if count > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&event.body);
                    bytes += event.body.len();
                    count += 1;
                }
                body.push(b']');
                let first = &self.pending[0];
                let context = format!("{count} events from {} ({})", first.event_id, first.about);
                let answer = match self.client.publish_batch(Bytes::from(body)).await {
                    Err(ClientError::Definite(_)) if self.settings.dead_letter_dir.is_some() => {
                        // Find the refused event by sending this batch's events singly.
                        self.isolate = count;
                        continue;
                    }
                    other => {
                        other.map_err(|e| sink_error(&self.settings.name, e, Some(&context)))?
                    }
                };
                match answer {
                    Some(_) => {
                        self.batch_endpoint = Some(true);
                        let sent: Vec<Pending> = self.pending.drain(..count).collect();
                        for event in sent {
                            self.delivered_one(event);
                        }
                    }
                    None => {
                        tracing::info!(sink = %self.settings.name, url = self.client.shown_url(), "the spine has no batch endpoint; posting events one by one");
                        self.batch_endpoint = Some(false);
                    }
                }
            } else {
                let event = &self.pending[0];
                let context = format!("event {} ({})", event.event_id, event.about);
                let name = &self.settings.name;
                match self.client.publish(event.body.clone()).await {
                    Ok(_) => {}
                    Err(error @ ClientError::Definite(_))
                        if self.settings.dead_letter_dir.is_some() =>
                    {
                        let error = sink_error(name, error, Some(&context));
                        let path = self.dead_letter(&error).await?;
                        tracing::warn!(sink = %self.settings.name, error = %error, file = %path.display(), "the spine refused an event; dead-lettered");
                    }
                    Err(error) => return Err(sink_error(name, error, Some(&context))),
                }
                let event = self.pending.pop_front().expect("not empty");
                self.delivered_one(event);
                self.isolate = self.isolate.saturating_sub(1);
            }
        }
        Ok(())
    }
}

impl SpineSink {
    /// Appends the front event and the spine's answer to `{dead_letter_dir}/{sink}.jsonl`,
    /// durably. The event holds masked data only: it already went through the guests.
    /// A directory or file it creates is its owner's only (0700, 0600).
    async fn dead_letter(&self, error: &SinkError) -> Result<std::path::PathBuf, SinkError> {
        use tokio::io::AsyncWriteExt;
        let dir = self
            .settings
            .dead_letter_dir
            .as_ref()
            .expect("checked by the caller");
        let path = dir.join(format!("{}.jsonl", self.settings.name));
        let event: Json = serde_json::from_slice(&self.pending[0].body).unwrap_or(Json::Null);
        let line =
            serde_json::json!({"event": event, "refused": error.to_string()}).to_string() + "\n";
        let definite = |e: std::io::Error| SinkError::Definite {
            sink: self.settings.name.clone(),
            message: format!("cannot write the dead-letter file {}: {e}", path.display()),
        };
        // Row data, if masked: readable by this user only.
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(crate::private_files::DIR_MODE)
            .create(dir)
            .await
            .map_err(definite)?;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(crate::private_files::FILE_MODE)
            .open(&path)
            .await
            .map_err(definite)?;
        file.write_all(line.as_bytes()).await.map_err(definite)?;
        file.sync_all().await.map_err(definite)?;
        Ok(path)
    }
}

/// The key in `key_file`, else in the default key file of the settings' slot, read
/// or created.
async fn load_key(settings: &SpineSettings) -> Result<Key, SinkError> {
    let definite = |message: String| SinkError::Definite {
        sink: settings.name.clone(),
        message,
    };
    let path = settings.key_file.clone();
    let path = path
        .or_else(|| default_key_file(&settings.slot))
        .ok_or_else(|| {
            definite(
                "no key for the event ids and no default key file (neither XDG_STATE_HOME nor \
             HOME is set): set the sink's key_file"
                    .to_owned(),
            )
        })?;
    tokio::task::spawn_blocking(move || Key::load_or_create(&path))
        .await
        .map_err(|e| definite(format!("reading the key file failed: {e}")))?
        .map_err(|e| definite(e.to_string()))
}

/// A failed request to the spine as the sink's error, with what it carried.
pub(crate) fn sink_error(sink: &str, error: ClientError, context: Option<&str>) -> SinkError {
    let transient = error.is_transient();
    let message = match context {
        Some(context) => format!("{context}: {error}"),
        None => error.to_string(),
    };
    let sink = sink.to_owned();
    if transient {
        SinkError::Transient { sink, message }
    } else {
        SinkError::Definite { sink, message }
    }
}

/// Checks the settings; every problem at once.
fn validate(settings: &SpineSettings) -> Result<Vec<Watch>, SinkError> {
    let mut problems = Vec::new();
    let kinds = &settings.kinds;
    let check_kind = |what: String, kind: &str, problems: &mut Vec<String>| {
        if !kinds.iter().any(|k| k == kind) {
            let hint = closest(kind, kinds)
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            problems.push(format!(
                "{what}: kind `{kind}` is not one of the spine's kinds{hint}: {}",
                kinds.join(", ")
            ));
        }
    };
    if kinds.is_empty() {
        problems.push("kinds: the list of the spine's kinds is empty".to_owned());
    } else {
        check_kind(
            "default_kind".to_owned(),
            &settings.default_kind,
            &mut problems,
        );
    }
    if settings.default_source.is_empty() {
        problems.push("default_source: must not be empty".to_owned());
    }
    if settings.policy.is_some() && !kinds.is_empty() {
        for kind in [BUNDLE_KIND, DENIED_KIND] {
            if !kinds.iter().any(|k| k == kind) {
                problems.push(format!(
                    "kinds: `{kind}` is missing, and airlock records the policy with it: add it to the sink's kinds"
                ));
            }
        }
    }
    let mut watch = Vec::with_capacity(settings.watch.len());
    for (i, (pattern, kind, source)) in settings.watch.iter().enumerate() {
        let what = format!("watch[{i}] (`{pattern}`)");
        if pattern.is_empty() {
            problems.push(format!("{what}: the table pattern is empty"));
        }
        if !kinds.is_empty() {
            check_kind(what.clone(), kind, &mut problems);
        }
        if source.is_empty() {
            problems.push(format!("{what}: the source is empty"));
        }
        watch.push(Watch::new(pattern, kind, source));
    }
    if problems.is_empty() {
        Ok(watch)
    } else {
        Err(SinkError::Definite {
            sink: settings.name.clone(),
            message: problems.join("; "),
        })
    }
}

/// The kind nearest to `kind` by edit distance, when it is near enough to be a typo.
fn closest<'a>(kind: &str, kinds: &'a [String]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, &cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    kinds
        .iter()
        .map(|k| (distance(kind, k), k.as_str()))
        .min()
        .filter(|(d, _)| *d <= 2.max(kind.len() / 4))
        .map(|(_, k)| k)
}

fn operation(op: Op) -> &'static str {
    match op {
        Op::Insert => "INSERT",
        Op::Update => "UPDATE",
        Op::Delete => "DELETE",
        Op::Truncate => "TRUNCATE",
        Op::Read => "SNAPSHOT",
    }
}

/// The old image: the key columns, or every column with `REPLICA IDENTITY FULL` (the
/// others hold no value, only `Null` placeholders).
fn old_image(relation: &Relation, values: &[crate::change::Value]) -> Map<String, Json> {
    let all = row_to_json(relation, values);
    if relation.replica_identity == ReplicaIdentity::Full || !relation.columns.iter().any(|c| c.key)
    {
        return all;
    }
    let keys: BTreeSet<&str> = relation
        .columns
        .iter()
        .filter(|c| c.key)
        .map(|c| c.name.as_str())
        .collect();
    all.into_iter()
        .filter(|(name, _)| keys.contains(name.as_str()))
        .collect()
}

impl Sink for SpineSink {
    fn name(&self) -> &str {
        &self.settings.name
    }

    async fn accept(&mut self, batch: Arc<Batch>) -> Result<bool, SinkError> {
        if let Some(end) = batch.end_lsn() {
            self.accepted_end = Some(self.accepted_end.map_or(end, |e| e.max(end)));
        }
        let table_watch: Vec<Option<usize>> = batch
            .tables
            .iter()
            .map(|t| self.watch.iter().position(|w| w.matches(&t.relation)))
            .collect();
        let mut kept = false;
        if let Some(policy) = self.settings.policy.as_ref().map(|p| p.version.clone()) {
            // What the policy kept out, before the rows it let through.
            for denial in &batch.denials {
                if let Some(event) = self.denial_event(denial, &policy)? {
                    self.pending.push_back(event);
                    kept = true;
                }
            }
        }
        let mut index_in_txn = vec![0u32; batch.txns.len()];
        for row in &batch.rows {
            // The row's place in its whole transaction, across the parts of a large one.
            let index =
                batch.txns[row.txn as usize].part.offset as u32 + index_in_txn[row.txn as usize];
            index_in_txn[row.txn as usize] += 1;
            if row.dropped || !row.has_route_in(&self.settings.routes) {
                continue;
            }
            let txn = &batch.txns[row.txn as usize];
            let relation = &batch.tables[row.table as usize].relation;
            let watch = table_watch[row.table as usize].map(|w| &self.watch[w]);
            let kind = row
                .annotation(KIND_ANNOTATION)
                .or(watch.map(|w| w.kind.as_str()))
                .unwrap_or(&self.settings.default_kind);
            let source = row
                .annotation(SOURCE_ANNOTATION)
                .or(watch.map(|w| w.source.as_str()))
                .unwrap_or(&self.settings.default_source);
            let table = relation.qualified_name();
            if !self.settings.kinds.iter().any(|k| k == kind) {
                let hint = closest(kind, &self.settings.kinds)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                return Err(self.definite(format!(
                    "a row of {table} (lsn {}) has {KIND_ANNOTATION} `{kind}`, which is not one of the spine's kinds{hint}: \
                     fix the guest's setting or add the kind to the sink's `kinds`",
                    row.change.lsn
                )));
            }
            if source.is_empty() {
                return Err(self.definite(format!(
                    "a row of {table} (lsn {}) has an empty {SOURCE_ANNOTATION}",
                    row.change.lsn
                )));
            }
            kept = true;
            let position = Position {
                commit_lsn: txn.commit_lsn,
                index,
            };
            if self.delivered.is_some_and(|d| position <= d) {
                continue;
            }
            let id = event_id(&self.key, &self.settings.slot, source, position);
            let body = serde_json::to_vec(&json!({
                "kind": kind,
                "source": source,
                "payload": payload(&batch, row, relation, &id, self.settings.mark_unattributed),
                "timestamp": format_timestamp(txn.commit_ts, true),
            }))
            .map_err(|e| self.definite(format!("cannot encode event {id}: {e}")))?;
            if !self.sources.contains(source) {
                self.sources.insert(source.to_owned());
            }
            self.pending.push_back(Pending {
                position: Some(position),
                about: format!("table {table}, kind {kind}, source {source}"),
                event_id: id,
                body: Bytes::from(body),
            });
        }
        Ok(kept)
    }

    fn due(&self) -> bool {
        self.pending.len() >= self.settings.max_events.max(1)
    }

    async fn flush(&mut self) -> Result<Option<Lsn>, SinkError> {
        if self.failed {
            // Jitter on top of the driver's backoff: spines that failed together
            // are not all tried again at once.
            tokio::time::sleep(self.jitter.next_delay()).await;
        }
        match self.deliver().await {
            Ok(()) => {
                self.failed = false;
                self.jitter.reset();
                Ok(self.accepted_end.take())
            }
            Err(error) => {
                if error.is_transient() {
                    self.failed = true;
                    // The request may have landed: ask the spine before sending again.
                    self.resync = true;
                }
                Err(error)
            }
        }
    }

    fn flush_interval(&self) -> Duration {
        self.settings.flush_interval
    }
}

/// The event payload of one row.
fn payload(
    batch: &Batch,
    row: &BatchRow,
    relation: &Relation,
    event_id: &str,
    mark_unattributed: bool,
) -> Json {
    let txn = &batch.txns[row.txn as usize];
    let mut payload = Map::new();
    payload.insert("table".into(), relation.qualified_name().into());
    payload.insert("operation".into(), operation(row.change.op).into());
    if let Some(new) = &row.change.new {
        payload.insert("new".into(), Json::Object(row_to_json(relation, new)));
    }
    if let Some(old) = &row.change.old {
        payload.insert("old".into(), Json::Object(old_image(relation, old)));
    }
    payload.insert("lsn".into(), row.change.lsn.to_string().into());
    payload.insert("commit_lsn".into(), txn.commit_lsn.to_string().into());
    payload.insert("xid".into(), txn.xid.into());
    payload.insert("pipeline".into(), (*batch.pipeline).into());
    payload.insert("policy".into(), (*batch.policy).into());
    payload.insert("tags".into(), row.tags.clone().into());
    if let Some(copied) = &txn.copied {
        payload.insert("copied".into(), (**copied).into());
    }
    match &row.change.identity {
        Some(who) => {
            payload.insert("actor".into(), who.to_json());
        }
        None if mark_unattributed => {
            payload.insert("actor".into(), Json::Null);
            // A snapshot read is the table as it was, not a change anyone made.
            if row.change.op != Op::Read {
                payload.insert("unattributed".into(), true.into());
            }
        }
        None => {}
    }
    let table = &batch.tables[row.table as usize];
    if table.column_tags.iter().any(|t| !t.is_empty()) {
        let tags: Map<String, Json> = relation
            .columns
            .iter()
            .zip(&table.column_tags)
            .filter(|(_, t)| !t.is_empty())
            .map(|(c, t)| (c.name.clone(), t.clone().into()))
            .collect();
        payload.insert("column_tags".into(), Json::Object(tags));
    }
    payload.insert("event_id".into(), event_id.into());
    Json::Object(payload)
}

#[cfg(test)]
mod tests;
