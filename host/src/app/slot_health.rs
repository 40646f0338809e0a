//! The slot's health for `/status` and metrics: where the slot stands, how much WAL it
//! holds, and how far the sinks lag behind the commits they were handed.
//!
//! Invariants:
//! - A figure that could not be read is cleared and `slot_health` says why
//!   (`unknown`, `missing`): a lag of 0 is never shown for a slot not looked at.
//! - Reads go through [`catalog::slot`], each bounded by [`HEALTH_TIMEOUT`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::error::RunError;
use crate::change::Lsn;
use crate::source::catalog;
use crate::source::protocol::ConnectConfig;
use crate::status::{self, Status, lsn_text};

/// How often the slot's health is read from PostgreSQL.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Commit times of transactions handed to the sinks but not yet durable everywhere:
/// the lag in seconds is the age of the oldest.
#[derive(Clone, Default)]
pub(super) struct InFlight(Arc<Mutex<VecDeque<(Lsn, i64)>>>);

impl InFlight {
    pub(super) fn push(&self, end: Lsn, commit_ts: i64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((end, commit_ts));
    }

    /// Drops what is durable; returns the commit time of the oldest still in flight.
    fn oldest_after(&self, durable: Lsn) -> Option<i64> {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while q.front().is_some_and(|(end, _)| *end <= durable) {
            q.pop_front();
        }
        q.front().map(|(_, ts)| *ts)
    }
}

/// How long one read of the slot's health may take before it counts as failed.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Clears the figures read from the slot, which are not known now, and says why.
fn clear_slot_figures(status: &Status, health: &str, error: String) {
    status.update_source(|s| {
        s.current_wal_lsn = None;
        s.restart_lsn = None;
        s.wal_status = None;
        s.safe_wal_size = None;
        s.lag_bytes = None;
        s.slot_active = None;
        s.slot_failover = None;
        s.slot_stats = None;
        s.slot_health = Some(health.to_owned());
        s.slot_health_error = Some(error);
    });
    status.metrics.remove(status::LAG_BYTES, &[]);
    publish_slot_stats(status, None);
}

/// The slot's decoding statistics as metrics; `None` removes them.
fn publish_slot_stats(status: &Status, stats: Option<&status::SlotStats>) {
    match stats {
        Some(stats) => {
            for (name, value) in stats.metrics() {
                status.metrics.set(name, &[], value as f64);
            }
        }
        None => {
            for (name, _) in status::SlotStats::default().metrics() {
                status.metrics.remove(name, &[]);
            }
        }
    }
}

/// Reads the slot's position and WAL retention from PostgreSQL for `/status` and
/// metrics, every [`HEALTH_INTERVAL`] until `stop`. When PostgreSQL cannot be read,
/// the figures are cleared and `slot_health` says `unknown` with the cause: a lag of 0
/// is never shown for a slot that could not be looked at.
pub(super) async fn monitor(
    config: ConnectConfig,
    slot: String,
    status: Arc<Status>,
    durable: watch::Receiver<Lsn>,
    in_flight: InFlight,
    mut stop: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        let read = read_slot(&config, &slot, &mut client, &status).await;
        if let Err(cause) = &read {
            tracing::debug!(error = %cause, "slot monitor cannot read the slot");
            clear_slot_figures(&status, "unknown", cause.clone());
            // Without the slot's view, the in-flight lag is not shown either.
            status.update_source(|s| s.lag_seconds = None);
            status.metrics.remove(status::LAG_SECONDS, &[]);
        }
        let durable_now = *durable.borrow();
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let lag_seconds = in_flight
            .oldest_after(durable_now)
            .map_or(0.0, |ts| ((now_us - ts) as f64 / 1e6).max(0.0));
        let known = read.is_ok();
        status.update_source(|s| {
            if known {
                s.lag_seconds = Some(lag_seconds);
            }
            if let Some(text) = lsn_text(durable_now) {
                s.confirmed_lsn.get_or_insert(text);
            }
        });
        if known {
            status.metrics.set(status::LAG_SECONDS, &[], lag_seconds);
        }
        status
            .metrics
            .set(status::CONFIRMED_LSN, &[], durable_now.0 as f64);
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
        }
    }
}

/// One read of the slot's health into `status`; the error says why it failed.
async fn read_slot(
    config: &ConnectConfig,
    slot: &str,
    client: &mut Option<tokio_postgres::Client>,
    status: &Status,
) -> Result<(), String> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = None;
        let (c, connection) = tokio::time::timeout(HEALTH_TIMEOUT, config.connect_sql())
            .await
            .map_err(|_| {
                format!(
                    "connecting to PostgreSQL at {} timed out after {HEALTH_TIMEOUT:?}",
                    config.addr()
                )
            })?
            .map_err(|e| format!("cannot connect to PostgreSQL at {}: {e}", config.addr()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *client = Some(c);
    }
    let c = client.as_ref().expect("connected above");
    let found = match tokio::time::timeout(HEALTH_TIMEOUT, catalog::slot(c, slot)).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            *client = None;
            return Err(format!(
                "reading pg_replication_slots at {} failed: {e}",
                config.addr()
            ));
        }
        Err(_) => {
            *client = None;
            return Err(format!(
                "reading pg_replication_slots at {} timed out after {HEALTH_TIMEOUT:?}",
                config.addr()
            ));
        }
    };
    let Some(found) = found else {
        clear_slot_figures(
            status,
            "missing",
            format!("no replication slot `{slot}` in pg_replication_slots"),
        );
        return Ok(());
    };
    // The decoding statistics: a failure to read them clears them, nothing more.
    let stats = match tokio::time::timeout(HEALTH_TIMEOUT, catalog::slot_stats(c, slot)).await {
        Ok(Ok(stats)) => stats,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot read pg_stat_replication_slots");
            None
        }
        Err(_) => None,
    };
    let lag = found.lag_bytes();
    let text = |lsn: Option<Lsn>| lsn.map(|l| l.to_string());
    status.update_source(|s| {
        s.current_wal_lsn = text(found.current_wal);
        s.confirmed_lsn = text(found.confirmed_flush);
        s.restart_lsn = text(found.restart_lsn);
        s.wal_status = found.wal_status.clone();
        s.safe_wal_size = found.safe_wal_size;
        s.lag_bytes = lag;
        s.slot_active = Some(found.active);
        s.slot_failover = found.failover;
        s.slot_stats.clone_from(&stats);
        s.slot_health = Some("ok".into());
        s.slot_health_error = None;
    });
    if found.active {
        status.set_ready(true);
    }
    match lag {
        Some(lag) => status.metrics.set(status::LAG_BYTES, &[], lag as f64),
        None => status.metrics.remove(status::LAG_BYTES, &[]),
    }
    publish_slot_stats(status, stats.as_ref());
    Ok(())
}
