//! What the running host knows about itself, for `/status`, `/metrics` and the logs.
//!
//! Every part writes its own section; readers get a consistent snapshot, a
//! [`StatusReport`]: the admin API serialises it (`GET /status`) and `airlock status`
//! reads it back and renders it, so both sides share one type. Metrics are updated
//! once per batch or per event, never per value.

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::change::Lsn;

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One stage as `/status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StageView {
    /// File stem in the plugin folder.
    pub name: String,
    /// What the guest calls itself.
    pub plugin: String,
    pub version: String,
    pub description: String,
    pub content_hash: String,
    /// The `airlock:transform` version the guest was built against, e.g. `0.1.0`.
    pub contract: Option<String>,
    /// Unix seconds.
    pub loaded_at: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceView {
    pub database: String,
    pub slot: String,
    pub publication: String,
    /// What the source does: `starting`, `connecting`, `snapshotting`, `streaming`,
    /// `retrying` (the cause in `last_error`), `stopped`.
    pub state: String,
    pub received_lsn: Option<String>,
    pub confirmed_lsn: Option<String>,
    pub current_wal_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
    /// Whether a walsender streams from the slot, as PostgreSQL last said.
    pub slot_active: Option<bool>,
    /// How fresh the slot's figures above are: `ok` (read within the last few
    /// seconds), `missing` (no such slot), `unknown` (PostgreSQL cannot be read:
    /// the figures are cleared, never shown stale; the cause in `slot_health_error`).
    pub slot_health: Option<String>,
    pub slot_health_error: Option<String>,
    /// Whether PostgreSQL (17+) keeps the slot on standbys for failover.
    pub slot_failover: Option<bool>,
    /// What decoding for the slot cost the primary (`pg_stat_replication_slots`):
    /// transactions spilled to its disk or streamed while they ran.
    pub slot_stats: Option<SlotStats>,
}

/// What decoding for the slot cost the primary, as `pg_stat_replication_slots` says:
/// counters since the statistics were last reset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotStats {
    /// Transactions spilled to the primary's disk, spills, and bytes spilled.
    pub spill_txns: i64,
    pub spill_count: i64,
    pub spill_bytes: i64,
    /// Transactions streamed while they ran, streams, and bytes streamed.
    pub stream_txns: i64,
    pub stream_count: i64,
    pub stream_bytes: i64,
    /// Transactions decoded, and their bytes.
    pub total_txns: i64,
    pub total_bytes: i64,
    pub stats_reset: Option<String>,
}

impl SlotStats {
    /// The counters published as metrics, by metric name.
    pub fn metrics(&self) -> [(&'static str, i64); 6] {
        [
            (SLOT_SPILL_TXNS, self.spill_txns),
            (SLOT_SPILL_BYTES, self.spill_bytes),
            (SLOT_SPILLS, self.spill_count),
            (SLOT_STREAM_TXNS, self.stream_txns),
            (SLOT_STREAM_BYTES, self.stream_bytes),
            (SLOT_STREAMS, self.stream_count),
        ]
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SinkView {
    pub kind: String,
    pub url: String,
    pub routes: Vec<String>,
    pub durable_lsn: Option<String>,
    /// Batches waiting in front of the sink: its backlog.
    pub queued_batches: usize,
    /// True while a write keeps failing and is being retried.
    pub retrying: bool,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReloadView {
    pub at: f64,
    pub reason: String,
    pub ok: bool,
    pub version: Option<String>,
    pub error: Option<String>,
}

/// The latest error an operator should see.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ErrorView {
    /// Unix seconds.
    pub at: f64,
    /// `source`, a sink's name, `pipeline`, …
    pub component: String,
    pub message: String,
}

/// The pipeline the worker runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PipelineView {
    pub version: String,
    /// Unix seconds since this pipeline runs.
    pub since: f64,
    pub stages: Vec<StageView>,
    pub last_reload: Option<ReloadView>,
}

/// The policy the gate applies.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyView {
    /// The policy's version (what lake rows and spine events record).
    pub version: String,
    /// `deny` or `allow`: what happens to a column nothing classifies.
    pub default: String,
    /// The key id `hmac` tokens carry, if the policy has a key.
    pub key_id: Option<String>,
    /// Columns the default denied in this run, as `schema.table.column`.
    pub denied: Vec<String>,
}

/// The `/status` document.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    /// airlock's version.
    pub version: String,
    pub uptime_seconds: f64,
    pub ready: bool,
    pub source: SourceView,
    pub pipeline: PipelineView,
    pub sinks: BTreeMap<String, SinkView>,
    /// The initial snapshot's progress, as the snapshot reports it.
    pub snapshot: Option<serde_json::Value>,
    pub policy: PolicyView,
    pub last_error: Option<ErrorView>,
}

#[derive(Default)]
struct Inner {
    policy: PolicyView,
    source: SourceView,
    pipeline: PipelineView,
    sinks: BTreeMap<String, SinkView>,
    last_error: Option<ErrorView>,
    snapshot: Option<serde_json::Value>,
    ready: bool,
}

/// The host's self-knowledge.
pub struct Status {
    started_at: f64,
    inner: RwLock<Inner>,
    pub metrics: Metrics,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            started_at: now_unix(),
            inner: RwLock::new(Inner::default()),
            metrics: Metrics::default(),
        }
    }
}

impl Status {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn update_source(&self, f: impl FnOnce(&mut SourceView)) {
        f(&mut self.write().source);
    }

    pub fn set_ready(&self, ready: bool) {
        self.write().ready = ready;
    }

    pub fn is_ready(&self) -> bool {
        self.read().ready
    }

    /// Records the pipeline the worker now runs.
    pub fn pipeline_running(&self, version: &str, stages: Vec<StageView>) {
        let pipeline = &mut self.write().pipeline;
        pipeline.version = version.to_owned();
        pipeline.stages = stages;
        pipeline.since = now_unix();
    }

    /// The version of the pipeline the worker runs.
    pub fn pipeline_version(&self) -> String {
        self.read().pipeline.version.clone()
    }

    pub fn reload_succeeded(&self, reason: &str, version: &str) {
        self.metrics.add(RELOADS, &[("outcome", "ok")], 1.0);
        self.write().pipeline.last_reload = Some(ReloadView {
            at: now_unix(),
            reason: reason.into(),
            ok: true,
            version: Some(version.into()),
            error: None,
        });
    }

    pub fn reload_failed(&self, reason: &str, error: &str) {
        self.metrics.add(RELOADS, &[("outcome", "failed")], 1.0);
        self.write().pipeline.last_reload = Some(ReloadView {
            at: now_unix(),
            reason: reason.into(),
            ok: false,
            version: None,
            error: Some(error.into()),
        });
    }

    pub fn update_sink(&self, name: &str, f: impl FnOnce(&mut SinkView)) {
        f(self.write().sinks.entry(name.to_owned()).or_default());
    }

    /// Records the latest error an operator should see.
    pub fn error(&self, component: &str, message: &str) {
        self.write().last_error = Some(ErrorView {
            at: now_unix(),
            component: component.to_owned(),
            message: message.to_owned(),
        });
    }

    pub fn clear_error(&self, component: &str) {
        let mut inner = self.write();
        if inner
            .last_error
            .as_ref()
            .is_some_and(|e| e.component == component)
        {
            inner.last_error = None;
        }
    }

    /// The policy the run applies.
    pub fn set_policy(&self, policy: &crate::policy::Policy) {
        let mut inner = self.write();
        inner.policy.version = policy.version.clone();
        inner.policy.default = policy.default.as_str().to_owned();
        inner.policy.key_id = policy.key.as_ref().map(|k| k.id.clone());
    }

    /// A column the policy's default denied.
    pub fn policy_denied(&self, table: &str, column: &str) {
        self.write().policy.denied.push(format!("{table}.{column}"));
    }

    pub fn set_snapshot(&self, progress: serde_json::Value) {
        self.write().snapshot = Some(progress);
    }

    /// The `/status` document, as of now.
    pub fn report(&self) -> StatusReport {
        let inner = self.read();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: (now_unix() - self.started_at).max(0.0),
            ready: inner.ready,
            source: inner.source.clone(),
            pipeline: inner.pipeline.clone(),
            sinks: inner.sinks.clone(),
            snapshot: inner.snapshot.clone(),
            policy: inner.policy.clone(),
            last_error: inner.last_error.clone(),
        }
    }
}

impl StatusReport {
    /// The report as `airlock status` prints it.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let mut out = String::new();
        let up = self.uptime_seconds as u64;
        let _ = writeln!(
            out,
            "airlock {} · up {}h{:02}m{:02}s · {}",
            self.version,
            up / 3600,
            up / 60 % 60,
            up % 60,
            if self.ready { "ready" } else { "not ready" }
        );
        let src = &self.source;
        let _ = writeln!(
            out,
            "source    {}  slot {}  publication {}  [{}]",
            src.database, src.slot, src.publication, src.state
        );
        let lag_bytes = src
            .lag_bytes
            .map_or_else(|| "-".into(), |b| format!("{b} B"));
        let lag_seconds = src
            .lag_seconds
            .map_or_else(|| "-".into(), |s| format!("{s:.1} s"));
        let _ = writeln!(
            out,
            "  wal     current {}  confirmed {}  restart {}  lag {lag_bytes} / {lag_seconds}  wal_status {}",
            text(&src.current_wal_lsn),
            text(&src.confirmed_lsn),
            text(&src.restart_lsn),
            text(&src.wal_status)
        );
        let p = &self.pipeline;
        let _ = writeln!(out, "pipeline  {}  ({} stages)", p.version, p.stages.len());
        for st in &p.stages {
            let _ = writeln!(
                out,
                "  {:<14} {} {}  contract {}  sha256 {}",
                st.name,
                st.plugin,
                st.version,
                st.contract.as_deref().unwrap_or("-"),
                st.content_hash.get(..12).unwrap_or(&st.content_hash)
            );
        }
        if let Some(reload) = &p.last_reload {
            let outcome = if reload.ok {
                format!("ok, version {}", text(&reload.version))
            } else {
                format!("FAILED: {}", text(&reload.error))
            };
            let _ = writeln!(out, "  last reload ({}): {outcome}", reload.reason);
        }
        let _ = writeln!(out, "sinks");
        for (name, sink) in &self.sinks {
            let _ = writeln!(
                out,
                "  {name:<10} {:<6} {}  routes {}  durable {}  backlog {} batches",
                sink.kind,
                sink.url,
                sink.routes.join(","),
                text(&sink.durable_lsn),
                sink.queued_batches
            );
            if sink.retrying {
                let _ = writeln!(out, "             RETRYING: {}", text(&sink.last_error));
            }
        }
        if let Some(snapshot) = &self.snapshot {
            let _ = writeln!(out, "snapshot  {snapshot}");
        }
        match &self.last_error {
            Some(e) => {
                let _ = writeln!(out, "last error [{}] {}", e.component, e.message);
            }
            None => {
                let _ = writeln!(out, "last error none");
            }
        }
        out
    }
}

/// Formats an optional LSN for status views.
pub fn lsn_text(lsn: Lsn) -> Option<String> {
    (lsn != Lsn::ZERO).then(|| lsn.to_string())
}

// Metric names (Prometheus), with their help text and type.
pub const ROWS_IN: &str = "airlock_rows_in_total";
pub const ROWS_OUT: &str = "airlock_rows_out_total";
pub const ROWS_DROPPED: &str = "airlock_rows_dropped_total";
pub const TRANSACTIONS: &str = "airlock_transactions_total";
pub const BATCH_ROWS: &str = "airlock_batch_rows";
pub const GUEST_SECONDS: &str = "airlock_guest_seconds";
pub const GUEST_FAILURES: &str = "airlock_guest_failures_total";
pub const SINK_FLUSH_SECONDS: &str = "airlock_sink_flush_seconds";
pub const SINK_RETRIES: &str = "airlock_sink_retries_total";
pub const SINK_DURABLE_LSN: &str = "airlock_sink_durable_lsn";
pub const LAG_BYTES: &str = "airlock_source_lag_bytes";
pub const LAG_SECONDS: &str = "airlock_source_lag_seconds";
pub const CONFIRMED_LSN: &str = "airlock_source_confirmed_lsn";
pub const RELOADS: &str = "airlock_reloads_total";
pub const SLOT_SPILL_TXNS: &str = "airlock_slot_spilled_transactions_total";
pub const SLOT_SPILL_BYTES: &str = "airlock_slot_spilled_bytes_total";
pub const SLOT_SPILLS: &str = "airlock_slot_spills_total";
pub const SLOT_STREAM_TXNS: &str = "airlock_slot_streamed_transactions_total";
pub const SLOT_STREAM_BYTES: &str = "airlock_slot_streamed_bytes_total";
pub const SLOT_STREAMS: &str = "airlock_slot_streams_total";
pub const UNATTRIBUTED: &str = "airlock_source_unattributed_changes_total";

const CATALOG: &[(&str, &str, &str)] = &[
    (
        UNATTRIBUTED,
        "counter",
        "Changes written without an identity ([source] identity = \"record\"), by table.",
    ),
    (ROWS_IN, "counter", "Rows entering the pipeline, by table."),
    (
        ROWS_OUT,
        "counter",
        "Rows leaving the pipeline, by table and route.",
    ),
    (ROWS_DROPPED, "counter", "Rows dropped by guests, by table."),
    (TRANSACTIONS, "counter", "Committed transactions processed."),
    (BATCH_ROWS, "summary", "Rows per batch."),
    (
        GUEST_SECONDS,
        "summary",
        "Time spent in each guest stage per batch.",
    ),
    (
        GUEST_FAILURES,
        "counter",
        "Failed guest calls (traps or errors), by stage.",
    ),
    (
        SINK_FLUSH_SECONDS,
        "summary",
        "Time to make a sink's buffered data durable, by sink.",
    ),
    (
        SINK_RETRIES,
        "counter",
        "Retried sink writes after transient errors, by sink.",
    ),
    (
        SINK_DURABLE_LSN,
        "gauge",
        "The LSN up to which each sink has made every change durable.",
    ),
    (
        LAG_BYTES,
        "gauge",
        "Bytes of WAL between the server's current position and the slot's confirmed position.",
    ),
    (
        LAG_SECONDS,
        "gauge",
        "Seconds since the commit of the last transaction made durable everywhere.",
    ),
    (
        CONFIRMED_LSN,
        "gauge",
        "The flush LSN confirmed to PostgreSQL.",
    ),
    (RELOADS, "counter", "Pipeline reloads, by outcome."),
    (
        SLOT_SPILL_TXNS,
        "counter",
        "Transactions the primary spilled to its disk while decoding for the slot (pg_stat_replication_slots).",
    ),
    (
        SLOT_SPILL_BYTES,
        "counter",
        "Bytes the primary spilled to its disk while decoding for the slot.",
    ),
    (
        SLOT_SPILLS,
        "counter",
        "Times the primary spilled to its disk while decoding for the slot.",
    ),
    (
        SLOT_STREAM_TXNS,
        "counter",
        "Transactions the primary streamed to airlock while they ran.",
    ),
    (
        SLOT_STREAM_BYTES,
        "counter",
        "Bytes of transactions the primary streamed to airlock while they ran.",
    ),
    (
        SLOT_STREAMS,
        "counter",
        "Times the primary streamed part of a running transaction to airlock.",
    ),
];

/// A small metrics registry rendered as Prometheus text.
#[derive(Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<(&'static str, String), f64>>,
}

fn label_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    pub fn add(&self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        *self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((name, label_text(labels)))
            .or_insert(0.0) += value;
    }

    pub fn set(&self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((name, label_text(labels)), value);
    }

    /// Records one observation of a summary (`_sum` and `_count`).
    pub fn observe(&self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        let labels = label_text(labels);
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        *series.entry((name, format!("_sum{labels}"))).or_insert(0.0) += value;
        *series
            .entry((name, format!("_count{labels}")))
            .or_insert(0.0) += 1.0;
    }

    /// Removes a series: a gauge whose value is not known now is absent, not stale.
    pub fn remove(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(name, label_text(labels)));
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, kind, help) in CATALOG {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for ((n, labels), value) in series.range((*name, String::new())..) {
                if n != name {
                    break;
                }
                // Summaries store `_sum{..}` / `_count{..}` suffixes in the label key.
                out.push_str(&format!("{name}{labels} {value}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_the_api_serves_is_the_report_the_cli_reads() {
        let status = Status::default();
        status.update_source(|s| {
            s.database = "postgres://airlock:***@db:5432/app?sslmode=verify-full".into();
            s.state = "streaming".into();
            s.lag_bytes = Some(42);
        });
        status.pipeline_running(
            "v7",
            vec![StageView {
                name: "30-mask".into(),
                plugin: "mask".into(),
                content_hash: "ab".repeat(32),
                contract: Some("0.1.0".into()),
                ..StageView::default()
            }],
        );
        status.reload_failed("SIGHUP", "stage 30-mask is required");
        status.update_sink("lake", |v| {
            v.kind = "delta".into();
            v.routes = vec!["default".into()];
            v.retrying = true;
            v.last_error = Some("s3 is down".into());
        });
        status.error("lake", "s3 is down");
        let report = status.report();
        let json = serde_json::to_value(&report).unwrap();
        // The document keeps its shape: the same keys as before the type existed.
        assert_eq!(json["source"]["state"], "streaming");
        assert_eq!(json["pipeline"]["version"], "v7");
        assert_eq!(json["pipeline"]["stages"][0]["name"], "30-mask");
        assert_eq!(json["pipeline"]["stages"][0]["contract"], "0.1.0");
        assert_eq!(json["pipeline"]["last_reload"]["ok"], false);
        assert_eq!(json["sinks"]["lake"]["retrying"], true);
        assert_eq!(json["last_error"]["component"], "lake");
        let back: StatusReport = serde_json::from_value(json).unwrap();
        let text = back.render();
        assert_eq!(text, report.render());
        for line in [
            "[streaming]",
            "lag 42 B / -",
            "pipeline  v7  (1 stages)",
            "30-mask        mask   contract 0.1.0  sha256 abababababab",
            "last reload (SIGHUP): FAILED: stage 30-mask is required",
            "RETRYING: s3 is down",
            "last error [lake] s3 is down",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
        status.clear_error("lake");
        assert!(status.report().last_error.is_none());
    }

    #[test]
    fn metrics_render_as_prometheus_text() {
        let m = Metrics::default();
        m.add(ROWS_IN, &[("table", "public.customers")], 3.0);
        m.add(ROWS_IN, &[("table", "public.customers")], 2.0);
        m.observe(GUEST_SECONDS, &[("stage", "30-mask")], 0.5);
        m.set(LAG_BYTES, &[], 42.0);
        let text = m.render();
        assert!(text.contains("# TYPE airlock_rows_in_total counter\n"));
        assert!(
            text.contains("airlock_rows_in_total{table=\"public.customers\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("airlock_guest_seconds_sum{stage=\"30-mask\"} 0.5\n"),
            "{text}"
        );
        assert!(
            text.contains("airlock_guest_seconds_count{stage=\"30-mask\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("airlock_source_lag_bytes 42\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(series.starts_with("airlock_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }
}
