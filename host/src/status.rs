//! What the running host knows about itself, for `/status`, `/metrics` and the logs.
//!
//! Every part writes its own section; readers get a consistent snapshot as JSON.
//! Metrics are updated once per batch or per event, never per value.

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;

use crate::change::Lsn;

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One stage as `/status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct StageView {
    /// File stem in the plugin folder.
    pub name: String,
    /// What the guest calls itself.
    pub plugin: String,
    pub version: String,
    pub description: String,
    pub content_hash: String,
    /// Unix seconds.
    pub loaded_at: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
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
}

#[derive(Clone, Debug, Default, Serialize)]
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

#[derive(Clone, Debug, Serialize)]
pub struct ReloadView {
    pub at: f64,
    pub reason: String,
    pub ok: bool,
    pub version: Option<String>,
    pub error: Option<String>,
}

#[derive(Default, Serialize)]
struct Inner {
    source: SourceView,
    pipeline_version: String,
    stages: Vec<StageView>,
    pipeline_since: f64,
    reload: Option<ReloadView>,
    sinks: BTreeMap<String, SinkView>,
    last_error: Option<serde_json::Value>,
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
        let mut inner = self.write();
        inner.pipeline_version = version.to_owned();
        inner.stages = stages;
        inner.pipeline_since = now_unix();
    }

    /// The version of the pipeline the worker runs.
    pub fn pipeline_version(&self) -> String {
        self.read().pipeline_version.clone()
    }

    pub fn reload_succeeded(&self, reason: &str, version: &str) {
        self.metrics.add(RELOADS, &[("outcome", "ok")], 1.0);
        self.write().reload = Some(ReloadView {
            at: now_unix(),
            reason: reason.into(),
            ok: true,
            version: Some(version.into()),
            error: None,
        });
    }

    pub fn reload_failed(&self, reason: &str, error: &str) {
        self.metrics.add(RELOADS, &[("outcome", "failed")], 1.0);
        self.write().reload = Some(ReloadView {
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
        self.write().last_error =
            Some(json!({"at": now_unix(), "component": component, "message": message}));
    }

    pub fn clear_error(&self, component: &str) {
        let mut inner = self.write();
        if inner
            .last_error
            .as_ref()
            .and_then(|e| e["component"].as_str())
            == Some(component)
        {
            inner.last_error = None;
        }
    }

    pub fn set_snapshot(&self, progress: serde_json::Value) {
        self.write().snapshot = Some(progress);
    }

    /// The `/status` document.
    pub fn to_json(&self) -> serde_json::Value {
        let inner = self.read();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": (now_unix() - self.started_at).max(0.0),
            "ready": inner.ready,
            "source": inner.source,
            "pipeline": {
                "version": inner.pipeline_version,
                "since": inner.pipeline_since,
                "stages": inner.stages,
                "last_reload": inner.reload,
            },
            "sinks": inner.sinks,
            "snapshot": inner.snapshot,
            "last_error": inner.last_error,
        })
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

const CATALOG: &[(&str, &str, &str)] = &[
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
