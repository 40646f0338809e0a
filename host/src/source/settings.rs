//! What the source is given: where to read and how ([`SourceSettings`], with its
//! defaults), what it tells while it works ([`SourceState`], the snapshot's
//! progress), and the stop it watches.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::connect::ConnectConfig;
use super::error::SourceError;
use crate::change::Lsn;

/// How often a standby status update is sent when nothing else triggers one.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How long a slot held by another consumer is retried before giving up.
pub const DEFAULT_SLOT_BUSY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`SourceSettings::shutdown_drain`].
pub const DEFAULT_SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);
/// What the source reads and how.
#[derive(Clone, Debug)]
pub struct SourceSettings {
    pub connect: ConnectConfig,
    /// The logical replication slot (lowercase letters, digits, underscores).
    pub slot: String,
    /// The publication that selects the tables.
    pub publication: String,
    /// Create the slot (pgoutput, permanent, no snapshot) if it does not exist.
    pub create_slot: bool,
    /// Interval of standby status updates; default [`DEFAULT_STATUS_INTERVAL`].
    pub status_interval: Duration,
    /// Tables (`schema.table`) for the publication when it does not exist: airlock
    /// creates it `FOR TABLE` these. Empty: a missing publication is an error.
    pub tables: Vec<String>,
    /// How long the slot may be held by another consumer (retried meanwhile) before
    /// [`SourceError::SlotBusy`] stops the source; default [`DEFAULT_SLOT_BUSY_TIMEOUT`].
    pub slot_busy_timeout: Duration,
    /// How long a stopping source waits for the sinks to make what it dispatched
    /// durable, so its final standby status covers it. Past this, the slot keeps the
    /// rest and a restart resends it, which the sinks skip.
    pub shutdown_drain: Duration,
    /// Take an initial snapshot when the slot does not exist yet (and create it then).
    pub snapshot: bool,
    /// Told the snapshot's progress, for `/status`.
    pub on_snapshot: Option<SnapshotObserver>,
    /// Told what the source is doing (and why it retries), for `/status`.
    pub on_state: Option<StateObserver>,
    /// What a sink already held at startup (read from the sink, e.g. the lake's
    /// commits): a missing slot is then one that was dropped, never created anew.
    pub held: Option<Held>,
    /// Where a transaction PostgreSQL streams while it runs is kept, past what memory
    /// holds, until it commits; default [`default_spool_dir`].
    pub spool_dir: std::path::PathBuf,
    /// Where the state file of the incremental snapshots is kept (which published
    /// tables the lake has whole); default [`default_spool_dir`].
    pub state_dir: std::path::PathBuf,
    /// Connections the initial snapshot copies a large table over, each a range of
    /// its pages; default [`default_snapshot_connections`].
    pub snapshot_connections: usize,
    /// Asks the sinks to make an LSN durable at once rather than at their next
    /// interval: the end of a snapshot, which the source waits for.
    pub flush_through: Option<Arc<tokio::sync::watch::Sender<Lsn>>>,
    /// Read the policy classes in the columns' comments (`airlock: CLASS`) whenever
    /// PostgreSQL describes a relation, so that the gate sees them with the relation.
    pub read_comments: bool,
    /// What to do with identity messages, resolved at every start (`auto`: whether
    /// the function is installed); when on, the source checks that they can be
    /// trusted.
    pub identity: crate::identity::Mode,
    /// Told the table of each change handed on without an identity
    /// ([`crate::identity::Mode::Record`]).
    pub on_unattributed: Option<TableObserver>,
}

/// See [`SourceSettings::on_unattributed`].
#[derive(Clone)]
pub struct TableObserver(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for TableObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TableObserver")
    }
}

impl SourceSettings {
    /// Asks the sinks to flush as soon as they hold `lsn` (see `flush_through`).
    pub fn flush_through(&self, lsn: Lsn) {
        if let Some(through) = &self.flush_through {
            through.send_if_modified(|at| {
                let moved = lsn > *at;
                *at = (*at).max(lsn);
                moved
            });
        }
    }
}

/// One connection per two cores, up to 8: each range costs a PostgreSQL backend, and
/// airlock's pipeline and sinks need the other cores (on 2 cores one connection is
/// the fastest: `cargo xtask bench -- --only snapshot`).
pub fn default_snapshot_connections() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 8))
}

/// `$TMPDIR`, else `/var/tmp` (on disk, where `/tmp` may be memory).
pub fn default_spool_dir() -> std::path::PathBuf {
    std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| "/var/tmp".into(), std::path::PathBuf::from)
}

/// Changes a sink holds from an earlier run: where, and through which commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub sink: String,
    pub table: String,
    pub through: Lsn,
}

/// What the source is doing, as told to [`SourceSettings::on_state`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Connecting to PostgreSQL and checking the catalog.
    Connecting,
    /// Copying the tables' existing rows (the initial snapshot).
    Snapshotting,
    /// Replication started: changes flow from the slot.
    Streaming,
    /// The last attempt failed with a transient error; the next is in `retry_in`.
    Retrying { error: String, retry_in: Duration },
}

/// Receives the source's [`SourceState`] whenever it changes.
#[derive(Clone)]
pub struct StateObserver(pub Arc<dyn Fn(SourceState) + Send + Sync>);

impl std::fmt::Debug for StateObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateObserver")
    }
}

impl SourceSettings {
    pub(super) fn tell(&self, state: SourceState) {
        if let Some(observer) = &self.on_state {
            (observer.0)(state);
        }
    }
}

impl SourceSettings {
    /// Settings with the defaults: no slot creation, status every 10 s.
    pub fn new(connect: ConnectConfig, slot: &str, publication: &str) -> Self {
        SourceSettings {
            connect,
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            create_slot: false,
            status_interval: DEFAULT_STATUS_INTERVAL,
            tables: Vec::new(),
            slot_busy_timeout: DEFAULT_SLOT_BUSY_TIMEOUT,
            shutdown_drain: DEFAULT_SHUTDOWN_DRAIN,
            snapshot: false,
            on_snapshot: None,
            on_state: None,
            held: None,
            spool_dir: default_spool_dir(),
            state_dir: default_spool_dir(),
            snapshot_connections: default_snapshot_connections(),
            flush_through: None,
            read_comments: false,
            identity: crate::identity::Mode::Off,
            on_unattributed: None,
        }
    }

    /// Checks what can be checked without a server.
    pub fn validate(&self) -> Result<(), SourceError> {
        let invalid = |reason: String| Err(SourceError::InvalidSettings { reason });
        let slot_ok = !self.slot.is_empty()
            && self.slot.len() <= 63
            && self
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slot_ok {
            return invalid(format!(
                "slot name `{}` is invalid: use 1 to 63 lowercase letters, digits and underscores",
                self.slot
            ));
        }
        if self.publication.is_empty() || self.publication.contains('\0') {
            return invalid("the publication name must be non-empty and contain no NUL".into());
        }
        if self.status_interval.is_zero() {
            return invalid("the status interval must be greater than zero".into());
        }
        self.connect.check_tls()
    }
}

/// Called with the snapshot's progress as JSON (for `/status`).
#[derive(Clone)]
pub struct SnapshotObserver(pub Arc<dyn Fn(serde_json::Value) + Send + Sync>);

impl std::fmt::Debug for SnapshotObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotObserver")
    }
}

/// Completes when shutdown is requested or the shutdown sender is gone. Cancel-safe.
pub(super) async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}
