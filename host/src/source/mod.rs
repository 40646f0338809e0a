//! The source: committed transactions out of a PostgreSQL logical replication slot.
//!
//! ```text
//!                   ┌──────────── run(): reconnect loop, backoff 100 ms → 10 s ─────────────┐
//!  PostgreSQL       │ connect ─ IDENTIFY_SYSTEM ─ catalog checks (wal_level, publication,   │
//!  (walsender)      │           slot: create if missing) ─ START_REPLICATION from 0/0       │
//!    │ XLogData     │                                                                       │
//!    ├─────────────▶│ pgoutput::decode ─▶ Assembler (relation cache, Begin..Commit) ──┐     │
//!    │ keepalive    │                                                                 ▼     │
//!    ├─────────────▶│ received / idle LSNs                          tx.reserve().await ─┼──▶ pipeline
//!    │              │                                                                       │
//!    │ status 'r'   │ write = received, flush = apply = durable                             │
//!    ◀──────────────│   (or the idle keepalive LSN when nothing is in flight)  ◀── durable ─┼─── checkpoint
//!                   └───────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Invariants:
//! - Only committed transactions leave the source, whole, in commit order, with
//!   strictly increasing `end_lsn`. After a reconnect the server resumes at the slot's
//!   `confirmed_flush_lsn`, so it may resend transactions: those at or below the last
//!   dispatched `end_lsn` are skipped, never sent twice within one `run`.
//! - Transactions with no changes (e.g. only logical decoding messages) are not sent.
//! - The flush LSN reported to PostgreSQL is the `durable` LSN (an `end_lsn` the
//!   sinks made durable). When nothing is in flight (outside a transaction and
//!   `durable` ≥ the last dispatched `end_lsn`), a keepalive's `wal_end` may be
//!   reported instead, so an idle slot never pins WAL. The flush LSN never moves
//!   backward, also across reconnects.
//! - Backpressure: the source awaits room on the bounded `tx` channel; while it waits
//!   it keeps sending status updates, so the server does not time the connection out.
//! - Each change holds the `Arc<Relation>` current at the change; a Relation message
//!   replaces the cache entry and never alters changes already made.
//! - A column whose type is not built in is looked up in `pg_type` once (on an
//!   ordinary connection) when its Relation message arrives: a domain becomes its base
//!   type (and the domain's type modifier), an array of a domain the base's array type.
//! - With REPLICA IDENTITY FULL an unchanged TOASTed value is filled in from the old
//!   row; otherwise it stays [`Value::UnchangedToast`], never `Null`.
//! - A slot held by another consumer is retried for `slot_busy_timeout`, then the
//!   source stops with [`SourceError::SlotBusy`].
//! - With `snapshot`, a missing slot is created by [`snapshot`] after the initial copy
//!   is durable; streaming starts at its consistent point.
//! - Once a `run` has streamed from the slot, a missing slot is never created again:
//!   it was dropped under airlock, changes since its confirmed position may be gone,
//!   and the source stops with [`SourceError::SlotDropped`].
//! - What the source is doing (connecting, snapshotting, streaming, retrying and why)
//!   is told to [`SourceSettings::on_state`], for `/status`.

mod assemble;
pub mod auth;
pub mod catalog;
pub mod connect;
mod copy;
pub mod error;
pub mod incremental;
pub mod pgoutput;
pub mod protocol;
mod settings;
pub mod snapshot;
mod spool;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use assemble::Assembler;
pub use assemble::{PART_BYTES, PART_CHANGES};
use catalog::catalog_error;
pub use error::{PgError, SourceError};
use protocol::{ReplicationConnection, ReplicationEvent, ReplicationStream, SnapshotAction};
use settings::shutdown_requested;
pub use settings::{
    DEFAULT_SHUTDOWN_DRAIN, DEFAULT_SLOT_BUSY_TIMEOUT, DEFAULT_STATUS_INTERVAL, Held,
    SnapshotObserver, SourceSettings, SourceState, StateObserver, TableObserver,
    default_snapshot_connections, default_spool_dir,
};
use spool::{Spool, Spooler};

use crate::backoff::Backoff;
use crate::change::{Lsn, Transaction};

/// Events handled per wake-up before status timers and shutdown are looked at again.
const DRAIN_BUDGET: usize = 1024;
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Streams committed transactions from the slot into `tx` until `shutdown` becomes
/// true (or its sender is dropped).
///
/// `durable` carries the `end_lsn` up to which every sink has made every transaction
/// durable; it becomes the slot's flush LSN. Transient errors (network, server
/// restart, slot still held by an old connection) are retried here with exponential
/// backoff from 100 ms to 10 s; definite errors are returned. Returns `Ok` on shutdown.
pub async fn run(
    settings: SourceSettings,
    tx: mpsc::Sender<Transaction>,
    mut durable: watch::Receiver<Lsn>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    settings.validate()?;
    let mut progress = Progress::default();
    let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
    // Since when the slot has been held by another consumer, without a session between.
    let mut busy_since: Option<std::time::Instant> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let mut streamed = false;
        let result = session(
            &settings,
            &tx,
            &mut durable,
            &mut shutdown,
            &mut progress,
            &mut streamed,
        )
        .await;
        let err = match result {
            Ok(()) => return Ok(()),
            Err(err) if err.is_transient() => err,
            // The slot existed when this run streamed from it: it was dropped since
            // (between the catalog check and START_REPLICATION).
            Err(SourceError::SlotMissing { slot }) if progress.slot_used => {
                return Err(SourceError::SlotDropped {
                    slot,
                    confirmed: progress.flushed,
                });
            }
            Err(err) => return Err(err),
        };
        if streamed {
            backoff.reset();
            busy_since = None;
        }
        // A slot held by someone else is retried (the walsender of a previous airlock
        // may linger until wal_sender_timeout), but not forever: after
        // `slot_busy_timeout` it is a definite error naming the holder.
        if let SourceError::SlotInUse { slot, pid } = &err {
            let since = *busy_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= settings.slot_busy_timeout {
                return Err(SourceError::SlotBusy {
                    slot: slot.clone(),
                    pid: *pid,
                    waited_secs: since.elapsed().as_secs(),
                });
            }
        } else {
            busy_since = None;
        }
        let retry_in = backoff.next_delay();
        warn!(
            slot = %settings.slot,
            error = %err,
            retry_in_ms = retry_in.as_millis() as u64,
            "source connection failed, reconnecting"
        );
        settings.tell(SourceState::Retrying {
            error: err.to_string(),
            retry_in,
        });
        tokio::select! {
            () = tokio::time::sleep(retry_in) => {}
            () = shutdown_requested(&mut shutdown) => return Ok(()),
        }
    }
}

/// What survives a reconnect within one `run`.
#[derive(Debug, Default)]
struct Progress {
    /// `end_lsn` of the last transaction sent on `tx` (its last part, when in parts).
    dispatched: Lsn,
    /// A transaction sent in part, not yet to its last: its commit LSN and how many
    /// of its changes went on.
    open: Option<(Lsn, u64)>,
    /// The highest flush LSN reported to the server.
    flushed: Lsn,
    /// Whether this run has streamed from the slot: from then on the slot must exist.
    slot_used: bool,
}

/// One connection's lifetime: connect, check, stream.
async fn session(
    settings: &SourceSettings,
    tx: &mpsc::Sender<Transaction>,
    durable: &mut watch::Receiver<Lsn>,
    shutdown: &mut watch::Receiver<bool>,
    progress: &mut Progress,
    streamed: &mut bool,
) -> Result<(), SourceError> {
    settings.tell(SourceState::Connecting);
    let mut conn = ReplicationConnection::connect(&settings.connect).await?;
    let system = conn.identify_system().await?;
    info!(
        url = %settings.connect.redacted_url(),
        system_id = %system.system_id,
        timeline = system.timeline,
        xlogpos = %system.xlogpos,
        server_version = conn.server_version().unwrap_or("unknown"),
        "connected to postgresql"
    );
    // The identity mode in force: `auto` is decided by what the database holds.
    let mut identity = settings.identity;
    let mut baseline = None;
    let confirmed = match check_catalog(settings, &mut conn, progress, &mut identity).await? {
        Some(confirmed) => confirmed,
        None => {
            settings.tell(SourceState::Snapshotting);
            let taken = snapshot::take(settings, &mut conn, tx, durable, shutdown).await?;
            match taken {
                Some(taken) => {
                    if let Some(last) = taken.last_chunk {
                        progress.dispatched = progress.dispatched.max(last);
                    }
                    baseline = Some(taken.shapes);
                    taken.consistent_point
                }
                None => return Ok(()),
            }
        }
    };
    let incremental = incremental::Incremental::start(settings, &system.system_id, baseline)?;
    progress.flushed = progress.flushed.max(confirmed);
    let stream = conn
        .start_replication(
            &settings.slot,
            Lsn::ZERO,
            std::slice::from_ref(&settings.publication),
        )
        .await?;
    info!(slot = %settings.slot, publication = %settings.publication, lsn = %confirmed, "streaming started");
    *streamed = true;
    progress.slot_used = true;
    settings.tell(SourceState::Streaming);
    let resume = progress.open;
    Streamer {
        stream,
        settings,
        tx,
        durable,
        durable_open: true,
        shutdown,
        progress,
        assembler: Assembler {
            resume,
            identity_mode: identity,
            ..Assembler::default()
        },
        received: Lsn::ZERO,
        idle: Lsn::ZERO,
        catalog: None,
        spooler: Spooler::new(settings.spool_dir.clone()),
        block: None,
        incremental,
    }
    .run()
    .await
}

/// Checks `wal_level`, the publication and the slot over an ordinary SQL connection,
/// creating the publication from `tables` and the slot when allowed. Returns the
/// slot's confirmed flush LSN, or `None` when the slot is missing and the initial
/// snapshot is to create it. A slot missing after this run streamed from it was
/// dropped under airlock: [`SourceError::SlotDropped`], never created again.
async fn check_catalog(
    settings: &SourceSettings,
    conn: &mut ReplicationConnection,
    progress: &Progress,
    identity: &mut crate::identity::Mode,
) -> Result<Option<Lsn>, SourceError> {
    let addr = settings.connect.addr();
    let user = settings.connect.user.as_str();
    let fail = |during: &'static str| {
        let addr = addr.clone();
        move |e: tokio_postgres::Error| catalog_error(&addr, user, during, e)
    };
    let (client, connection) = settings.connect.connect_sql().await?;
    let connection = tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(error = %error, "catalog connection ended");
        }
    });

    let mut snapshot_interrupted = false;
    let checks = async {
        let wal_level = catalog::wal_level(&client)
            .await
            .map_err(fail("checking wal_level"))?;
        if wal_level != catalog::WalLevel::Logical {
            return Err(SourceError::WalLevel {
                addr: addr.clone(),
                reason: format!("wal_level is `{wal_level}`"),
            });
        }

        let publication = catalog::publication(&client, &settings.publication)
            .await
            .map_err(fail("checking the publication"))?;
        if publication.is_none() {
            if settings.tables.is_empty() {
                return Err(SourceError::PublicationMissing {
                    publication: settings.publication.clone(),
                });
            }
            catalog::create_publication(&client, &settings.publication, &settings.tables)
                .await
                .map_err(fail("creating the publication from [source] tables"))?;
            info!(publication = %settings.publication, tables = ?settings.tables, "created publication");
        }

        if settings.identity.may_be_on() {
            let trust = crate::identity::trust(&client, user)
                .await
                .map_err(fail("checking that identity messages can be trusted"))?;
            *identity = settings.identity.resolve(trust.owner.is_some());
            if identity.enabled() {
                let problems = trust.problems();
                if !problems.is_empty() {
                    return Err(SourceError::IdentityUntrusted { problems });
                }
                let uncovered = crate::identity::uncovered(&client, &settings.publication)
                    .await
                    .map_err(fail("listing published tables without the identity trigger"))?;
                if !uncovered.is_empty() {
                    warn!(
                        tables = ?uncovered,
                        mode = identity.name(),
                        "published tables without the identity trigger: their changes carry no identity (run `airlock identity install` to add it)"
                    );
                }
                info!(mode = identity.name(), "identity on: every change carries who made it");
            }
        }

        let slot_error = |e| catalog_error(&addr, user, "checking the replication slot", e);
        let Some(slot) = catalog::slot(&client, &settings.slot)
            .await
            .map_err(slot_error)?
        else {
            if settings.snapshot && settings.held.is_some() {
                // A snapshot interrupted after some chunks were durable: no slot yet
                // (it marks the snapshot complete), only the attempt's own.
                let attempt = snapshot::snapshot_slot(&settings.slot);
                snapshot_interrupted = catalog::slot(&client, &attempt)
                    .await
                    .map_err(slot_error)?
                    .is_some();
            }
            return Ok(None);
        };
        if !slot.is_pgoutput() {
            return Err(SourceError::SlotPlugin {
                slot: settings.slot.clone(),
                plugin: slot
                    .plugin
                    .unwrap_or_else(|| "none (a physical slot)".into()),
            });
        }
        if slot.active {
            return Err(SourceError::SlotInUse {
                slot: settings.slot.clone(),
                pid: slot.active_pid,
            });
        }
        if slot.is_lost() {
            return Err(SourceError::SlotInvalidated {
                slot: settings.slot.clone(),
                reason: slot.lost_reason(),
            });
        }
        Ok(Some(slot.confirmed_flush.unwrap_or(Lsn::ZERO)))
    }
    .await;
    drop(client);
    let _ = connection.await;

    match checks? {
        Some(confirmed) => Ok(Some(confirmed)),
        None if progress.slot_used => Err(SourceError::SlotDropped {
            slot: settings.slot.clone(),
            confirmed: progress.flushed,
        }),
        // What the sinks hold came from this slot, unless from an unfinished snapshot.
        None if let Some(held) = settings.held.as_ref().filter(|_| !snapshot_interrupted) => {
            Err(SourceError::SlotDroppedBefore {
                slot: settings.slot.clone(),
                sink: held.sink.clone(),
                table: held.table.clone(),
                through: held.through,
            })
        }
        // The snapshot creates the slot once it is complete.
        None if settings.create_slot && settings.snapshot => Ok(None),
        None if settings.create_slot => {
            let created = conn
                .create_logical_slot(&settings.slot, false, SnapshotAction::NoExport)
                .await?;
            info!(slot = %created.slot_name, lsn = %created.consistent_point, "created replication slot");
            Ok(Some(created.consistent_point))
        }
        None => Err(SourceError::SlotMissing {
            slot: settings.slot.clone(),
        }),
    }
}

/// The streaming loop of one session.
struct Streamer<'a> {
    stream: ReplicationStream,
    settings: &'a SourceSettings,
    tx: &'a mpsc::Sender<Transaction>,
    durable: &'a mut watch::Receiver<Lsn>,
    /// False once the `durable` sender is gone: its last value stays in force.
    durable_open: bool,
    shutdown: &'a mut watch::Receiver<bool>,
    progress: &'a mut Progress,
    assembler: Assembler,
    /// Highest LSN received (XLogData start or keepalive end): the write LSN.
    received: Lsn,
    /// Highest LSN known to hold nothing for us, seen outside a transaction.
    idle: Lsn,
    /// An ordinary connection for catalog lookups (column types), opened on demand.
    catalog: Option<tokio_postgres::Client>,
    /// The transactions PostgreSQL is streaming while they run.
    spooler: Spooler,
    /// The streamed transaction whose block is open (between Stream Start and Stop).
    block: Option<u32>,
    /// Tables copied while the stream runs (added to the publication, rewritten).
    incremental: incremental::Incremental,
}

impl Streamer<'_> {
    async fn run(mut self) -> Result<(), SourceError> {
        let mut ticker = tokio::time::interval(self.settings.status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut looker = tokio::time::interval(incremental::WATCH_INTERVAL);
        looker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'stream: loop {
            tokio::select! {
                biased;
                () = shutdown_requested(self.shutdown) => break,
                changed = self.durable.changed(), if self.durable_open => {
                    if changed.is_err() {
                        self.durable_open = false;
                    } else {
                        self.send_status(false).await?;
                        self.copies_durable()?;
                    }
                }
                _ = ticker.tick() => self.send_status(false).await?,
                _ = looker.tick(), if self.incremental.enabled() => self.look().await?,
                event = async {
                    match self.incremental.copy.as_mut() {
                        Some(copy) => copy.next_event().await,
                        None => std::future::pending().await,
                    }
                }, if self.incremental.listening() => {
                    self.incremental.event(event);
                    self.launch_next();
                }
                event = self.stream.next() => {
                    // Drain what is already buffered before the next select round,
                    // up to a budget: an event is taken off the stream only when it
                    // will be handled in this round.
                    let mut event = event?;
                    let mut budget = DRAIN_BUDGET;
                    loop {
                        let Some(next) = event else {
                            return Err(SourceError::StreamEnded {
                                addr: self.stream.addr().to_owned(),
                            });
                        };
                        if !self.handle(next, &mut ticker).await? {
                            break 'stream;
                        }
                        budget -= 1;
                        if budget == 0 {
                            break;
                        }
                        match self.stream.try_next()? {
                            Some(next) => event = Some(next),
                            None => break,
                        }
                    }
                }
            }
        }
        // Stop reading, but stay connected until the pipeline has drained: the sinks
        // flush what they hold, and the final status acknowledges it.
        let target = self.progress.dispatched;
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_drain;
        while self.durable_open && *self.durable.borrow() < target {
            tokio::select! {
                changed = self.durable.changed() => match changed {
                    Ok(()) => self.send_status(false).await?,
                    Err(_) => self.durable_open = false,
                },
                () = tokio::time::sleep_until(deadline) => {
                    warn!(
                        slot = %self.settings.slot,
                        durable = %*self.durable.borrow(),
                        dispatched = %target,
                        "stopping before the sinks made everything durable; the slot keeps the rest"
                    );
                    break;
                }
            }
        }
        self.send_status(false).await?;
        info!(slot = %self.settings.slot, flush_lsn = %self.progress.flushed, "source stopped");
        if let Err(error) = self.stream.close().await {
            debug!(error = %error, "closing the replication connection failed");
        }
        Ok(())
    }

    /// Handles one event. Returns false when shutdown was requested meanwhile.
    async fn handle(
        &mut self,
        event: ReplicationEvent,
        ticker: &mut tokio::time::Interval,
    ) -> Result<bool, SourceError> {
        match event {
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                self.received = self.received.max(wal_start);
                if matches!(data.first(), Some(b'S' | b'E' | b'c' | b'A')) {
                    return self.stream_message(wal_start, &data, ticker).await;
                }
                if let Some(top) = self.block {
                    return self.spool(top, wal_start, &data).map(|()| true);
                }
                return self.apply(wal_start, &data, ticker).await;
            }
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.received = self.received.max(wal_end);
                if !self.in_transaction() {
                    self.idle = self.idle.max(wal_end);
                }
                if reply_requested {
                    self.send_status(false).await?;
                }
            }
        }
        Ok(true)
    }

    /// Applies one message outside stream blocks (or replayed from a spool), and
    /// dispatches the transaction or part it completes. Returns false when shutdown
    /// was requested meanwhile.
    async fn apply(
        &mut self,
        lsn: Lsn,
        data: &[u8],
        ticker: &mut tokio::time::Interval,
    ) -> Result<bool, SourceError> {
        let txn = self.assembler.apply(lsn, data)?;
        for table in self.assembler.unattributed.drain(..) {
            if let Some(observer) = &self.settings.on_unattributed {
                (observer.0)(&table);
            }
        }
        if let Some(oid) = self.assembler.unresolved.take() {
            self.resolve_types(oid).await?;
        }
        // A table's columns may have changed: look at the catalog once it committed.
        if self.assembler.described.is_some() {
            self.incremental.look_soon = self.incremental.enabled();
        }
        if let Some(oid) = self.assembler.described.take()
            && self.settings.read_comments
        {
            self.read_comments(oid, None).await?;
        }
        if let Some((oid, classes)) = self.assembler.comments_changed.take()
            && self.settings.read_comments
        {
            self.read_comments(oid, classes).await?;
        }
        let Some(txn) = txn else {
            return Ok(true);
        };
        if txn.meta.completes() {
            for request in std::mem::take(&mut self.assembler.requests) {
                self.incremental.request(&request)?;
                self.incremental.look_soon = self.incremental.enabled();
            }
        }
        if let Some(content) = self.assembler.watermark.take()
            && txn.changes.is_empty()
            && txn.meta.part.is_whole()
            && let Some(copy) = self.incremental.copy.as_mut()
        {
            match copy.chunk_at(&content, &txn.meta) {
                Ok(Some(chunk)) => {
                    let go = self.commit(chunk, ticker).await?;
                    self.incremental.progress()?;
                    if let Some(copy) = &self.incremental.copy {
                        let (name, reason, rows) =
                            (copy.name.clone(), copy.reason.clone(), copy.rows_sent);
                        self.tell_copy("copying", &name, &reason, rows);
                    }
                    self.incremental.settle();
                    // A copy just dispatched whole: durable soon, not at the interval.
                    if let Some(end) = self
                        .incremental
                        .completing
                        .iter()
                        .filter_map(|(_, end, _)| *end)
                        .max()
                    {
                        self.settings.flush_through(end);
                    }
                    self.launch_next();
                    return Ok(go);
                }
                Ok(None) => {}
                Err(error) => self.incremental.failed(&error),
            }
        }
        let go = self.commit(txn, ticker).await?;
        if go && self.incremental.look_soon && !self.in_transaction() {
            self.look().await?;
        }
        Ok(go)
    }

    /// Compares the catalog with what the lake was given, and starts the copy of a
    /// table that became due.
    async fn look(&mut self) -> Result<(), SourceError> {
        self.incremental.look_soon = false;
        if !self.incremental.enabled() {
            return Ok(());
        }
        self.open_catalog().await?;
        let client = self.catalog.as_ref().expect("opened above");
        let shapes = incremental::shapes(client, &self.settings.publication)
            .await
            .map_err(|e| {
                catalog_error(
                    &self.settings.connect.addr(),
                    &self.settings.connect.user,
                    "comparing the published tables with the lake's",
                    e,
                )
            })?;
        self.incremental.absorb(shapes)?;
        self.copies_durable()?;
        self.launch_next();
        Ok(())
    }

    /// Settles the copies now durable, and says so in `/status`.
    fn copies_durable(&mut self) -> Result<(), SourceError> {
        for (table, reason) in self.incremental.durable(*self.durable.borrow())? {
            self.tell_copy("complete", &table, &reason, 0);
        }
        Ok(())
    }

    /// Tells `/status` how the incremental snapshot under way (or the last) goes.
    fn tell_copy(&self, state: &str, table: &str, reason: &str, rows: u64) {
        if let Some(observer) = &self.settings.on_snapshot {
            (observer.0)(serde_json::json!({
                "kind": "incremental",
                "state": state,
                "table": table,
                "reason": reason,
                "rows": rows,
            }));
        }
    }

    /// Starts the copy of the next table due, when none is under way.
    fn launch_next(&mut self) {
        if let Some((oid, name, reason)) = self.incremental.next() {
            self.tell_copy("copying", &name, &reason, 0);
            self.incremental.copy = Some(incremental::Copy::launch(
                self.settings.connect.clone(),
                self.settings.publication.clone(),
                &self.settings.slot,
                oid,
                name,
                reason,
            ));
        }
    }

    /// Keeps a message of the open stream block in its transaction's spool.
    fn spool(&mut self, top: u32, lsn: Lsn, data: &[u8]) -> Result<(), SourceError> {
        let pgoutput::Streamed { xid, tag, body } = match pgoutput::streamed_xid(data) {
            Ok(Some(streamed)) => streamed,
            // Origin: nothing airlock keeps.
            Ok(None) if data.first() == Some(&b'O') => return Ok(()),
            Ok(None) => {
                return Err(SourceError::Stream {
                    lsn,
                    reason: format!(
                        "message {:?} inside the stream block of transaction {top}",
                        data.first().map(|b| char::from(*b))
                    ),
                });
            }
            Err(source) => return Err(SourceError::Decode { lsn, source }),
        };
        self.spooler.append(top, lsn, xid, tag, body)
    }

    /// Stream Start, Stop, Commit and Abort. Returns false when shutdown was
    /// requested while a committed transaction was dispatched.
    async fn stream_message(
        &mut self,
        lsn: Lsn,
        data: &[u8],
        ticker: &mut tokio::time::Interval,
    ) -> Result<bool, SourceError> {
        let message =
            pgoutput::decode(data).map_err(|source| SourceError::Decode { lsn, source })?;
        let out_of_order = |reason: String| SourceError::Stream { lsn, reason };
        match message {
            pgoutput::Message::StreamStart(start) => {
                if let Some(open) = self.block {
                    return Err(out_of_order(format!(
                        "Stream Start of transaction {} inside the block of {open}",
                        start.xid
                    )));
                }
                if self.assembler.in_transaction() {
                    return Err(out_of_order("Stream Start inside a transaction".into()));
                }
                self.spooler
                    .start(start.xid, start.first_segment)
                    .map_err(out_of_order)?;
                self.block = Some(start.xid);
            }
            pgoutput::Message::StreamStop => {
                if self.block.take().is_none() {
                    return Err(out_of_order("Stream Stop outside a stream block".into()));
                }
            }
            pgoutput::Message::StreamAbort(abort) => {
                if self.block.is_some() {
                    return Err(out_of_order("Stream Abort inside a stream block".into()));
                }
                // PostgreSQL may also abort a transaction it never streamed a change
                // of: nothing was kept, nothing is to drop.
                let known = self.spooler.abort(abort.xid, abort.subxid);
                debug!(
                    xid = abort.xid,
                    subxid = abort.subxid,
                    known,
                    "streamed transaction rolled back"
                );
            }
            pgoutput::Message::StreamCommit(commit) => {
                if self.block.is_some() {
                    return Err(out_of_order("Stream Commit inside a stream block".into()));
                }
                let Some(spool) = self.spooler.take(commit.xid) else {
                    return Err(out_of_order(format!(
                        "Stream Commit of transaction {}, which was not streaming",
                        commit.xid
                    )));
                };
                return self.replay(lsn, commit, spool, ticker).await;
            }
            _ => unreachable!("called for stream messages only"),
        }
        Ok(true)
    }

    /// Hands on a streamed transaction that committed: its kept messages, through
    /// the same assembly as a transaction sent whole, in parts as large ones are.
    async fn replay(
        &mut self,
        lsn: Lsn,
        commit: pgoutput::StreamCommit,
        spool: Spool,
        ticker: &mut tokio::time::Interval,
    ) -> Result<bool, SourceError> {
        debug!(
            xid = commit.xid,
            commit_lsn = %commit.commit_lsn,
            messages = spool.records(),
            bytes = spool.bytes(),
            on_disk = spool.on_disk(),
            "streamed transaction committed"
        );
        let mut replay = spool
            .replay()
            .map_err(|source| self.spooler.failed(commit.xid, source))?;
        self.assembler
            .begin(lsn, commit.xid, commit.commit_lsn, commit.commit_ts)?;
        let mut since_status = 0usize;
        loop {
            let next = replay
                .next()
                .map_err(|source| self.spooler.failed(commit.xid, source))?;
            let Some((at, message)) = next else { break };
            if !self.apply(at, message, ticker).await? {
                return Ok(false);
            }
            // A long replay keeps the server's timeout at bay.
            since_status += 1;
            if since_status >= DRAIN_BUDGET {
                since_status = 0;
                if futures::FutureExt::now_or_never(ticker.tick()).is_some() {
                    self.send_status(false).await?;
                }
            }
        }
        let txn =
            self.assembler
                .commit(lsn, commit.commit_lsn, commit.end_lsn, commit.commit_ts)?;
        self.commit(txn, ticker).await
    }

    /// Whether a transaction is under way: being assembled, or handed on in part.
    fn in_transaction(&self) -> bool {
        self.assembler.in_transaction() || self.progress.open.is_some()
    }

    /// Dispatches a committed transaction (or a part of one), waiting for room on `tx`.
    /// Returns false when shutdown was requested while waiting.
    async fn commit(
        &mut self,
        txn: Transaction,
        ticker: &mut tokio::time::Interval,
    ) -> Result<bool, SourceError> {
        let end = txn.meta.end_lsn;
        // A transaction that commits before the last one dispatched ends before it
        // too: it was resent after a reconnect. (Parts do not know their end yet.)
        if txn.meta.commit_lsn < self.progress.dispatched {
            debug!(xid = txn.meta.xid, commit_lsn = %txn.meta.commit_lsn, "skipping a transaction already dispatched");
            if txn.meta.completes() {
                self.idle = self.idle.max(end);
            }
            return Ok(true);
        }
        if txn.changes.is_empty() && txn.meta.part.is_whole() {
            self.idle = self.idle.max(end);
            return Ok(true);
        }
        let permit = loop {
            tokio::select! {
                biased;
                () = shutdown_requested(self.shutdown) => return Ok(false),
                permit = self.tx.reserve() => break permit.map_err(|_| SourceError::PipelineClosed)?,
                changed = self.durable.changed(), if self.durable_open => {
                    if changed.is_err() {
                        self.durable_open = false;
                    } else {
                        self.send_status(false).await?;
                    }
                }
                _ = ticker.tick() => self.send_status(false).await?,
            }
        };
        debug!(
            xid = txn.meta.xid,
            end_lsn = %end,
            offset = txn.meta.part.offset,
            last = txn.meta.part.last,
            changes = txn.changes.len(),
            "transaction dispatched"
        );
        self.incremental.observe(&txn);
        if txn.meta.completes() {
            self.progress.dispatched = end;
            self.progress.open = None;
        } else {
            let sent = txn.meta.part.offset + txn.changes.len() as u64;
            self.progress.open = Some((txn.meta.commit_lsn, sent));
        }
        permit.send(txn);
        Ok(true)
    }

    /// Looks up the column types of relation `oid` that are not built in (domains,
    /// arrays of domains) in the catalog, and rewrites the cached relation so that a
    /// domain column has its base type (and the domain's type modifier).
    async fn resolve_types(&mut self, oid: u32) -> Result<(), SourceError> {
        let Some(relation) = self.assembler.relations.get(&oid).cloned() else {
            return Ok(());
        };
        let missing: Vec<u32> = relation
            .columns
            .iter()
            .map(|c| c.type_oid)
            .filter(|t| *t >= catalog::FIRST_NORMAL_OID && !self.assembler.types.contains_key(t))
            .collect();
        if !missing.is_empty() {
            let addr = self.settings.connect.addr();
            let user = self.settings.connect.user.clone();
            let fail = |e| catalog_error(&addr, &user, "resolving column types", e);
            self.open_catalog().await?;
            let client = self.catalog.as_ref().expect("opened above");
            for type_oid in missing {
                let resolved = catalog::resolve_type(client, type_oid)
                    .await
                    .map_err(fail)?;
                if resolved.0 != type_oid {
                    debug!(
                        type_oid,
                        base_oid = resolved.0,
                        "resolved a domain to its base type"
                    );
                }
                self.assembler.types.insert(type_oid, resolved);
            }
        }
        let mut relation = (*relation).clone();
        self.assembler.apply_types(&mut relation);
        self.assembler.relations.insert(oid, Arc::new(relation));
        Ok(())
    }

    /// Adds to relation `oid` the policy classes its columns' comments give, as the
    /// catalog says now.
    async fn read_comments(
        &mut self,
        oid: u32,
        given: Option<std::collections::BTreeMap<String, String>>,
    ) -> Result<(), SourceError> {
        let Some(relation) = self.assembler.relations.get(&oid).cloned() else {
            return Ok(());
        };
        let classes = match given {
            // What the comment trigger wrote, inside the commenting transaction.
            Some(classes) => classes,
            // The catalog, over what earlier versions had: it may not see a commit
            // that was just decoded, so it adds and never removes.
            None => {
                self.open_catalog().await?;
                let client = self.catalog.as_ref().expect("opened above");
                let addr = self.settings.connect.addr();
                let user = self.settings.connect.user.clone();
                let mut classes = relation.comment_classes.clone();
                classes.extend(
                    catalog::comment_classes(client, oid)
                        .await
                        .map_err(|e| catalog_error(&addr, &user, "reading column comments", e))?,
                );
                classes
            }
        };
        if classes != relation.comment_classes {
            let mut relation = (*relation).clone();
            relation.comment_classes = classes;
            self.assembler.relations.insert(oid, Arc::new(relation));
        }
        Ok(())
    }

    /// Opens the catalog connection when it is not open.
    async fn open_catalog(&mut self) -> Result<(), SourceError> {
        if self.catalog.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = self.settings.connect.connect_sql().await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    debug!(error = %error, "catalog connection ended");
                }
            });
            self.catalog = Some(client);
        }
        Ok(())
    }

    /// The flush LSN to report now; never lower than one reported before.
    fn flush_lsn(&mut self) -> Lsn {
        let durable = *self.durable.borrow();
        let mut flush = durable;
        if !self.in_transaction() && durable >= self.progress.dispatched {
            flush = flush.max(self.idle);
        }
        flush = flush.max(self.progress.flushed);
        self.progress.flushed = flush;
        flush
    }

    async fn send_status(&mut self, reply_requested: bool) -> Result<(), SourceError> {
        let flush = self.flush_lsn();
        let write = self.received.max(flush);
        debug!(write_lsn = %write, flush_lsn = %flush, "sending standby status");
        self.stream
            .send_status(write, flush, flush, reply_requested)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::pgoutput::tests::{self as fx, Msg};
    use super::protocol::tests::{FakeServer, connected};
    use super::*;
    use crate::change::Op;

    #[test]
    fn settings_are_validated() {
        let connect = protocol::ConnectConfig::new("h", 5432, "u", None, "d");
        assert!(
            SourceSettings::new(connect.clone(), "lake_1", "pub")
                .validate()
                .is_ok()
        );
        for slot in ["", "Lake", "a-b", &"x".repeat(64)] {
            let err = SourceSettings::new(connect.clone(), slot, "pub")
                .validate()
                .unwrap_err();
            assert!(matches!(err, SourceError::InvalidSettings { .. }));
        }
        let mut s = SourceSettings::new(connect, "lake", "pub");
        s.status_interval = Duration::ZERO;
        assert!(s.validate().is_err());
    }

    struct Harness {
        server: FakeServer,
        rx: mpsc::Receiver<Transaction>,
        durable: watch::Sender<Lsn>,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<(Result<(), SourceError>, Progress)>,
    }

    /// Runs the streaming loop of one session against the fake server.
    async fn harness(capacity: usize, progress: Progress) -> Harness {
        let (conn, mut server) = connected().await;
        let start = tokio::spawn(async move {
            conn.start_replication("lake", Lsn::ZERO, &["pub".into()])
                .await
                .unwrap()
        });
        server.recv().await;
        server.send(b'W', &[0, 0, 0]).await;
        let stream = start.await.unwrap();
        let (tx, rx) = mpsc::channel(capacity);
        let (durable_tx, mut durable_rx) = watch::channel(Lsn::ZERO);
        let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut settings = SourceSettings::new(
                protocol::ConnectConfig::new("db", 5432, "app", None, "orders"),
                "lake",
                "pub",
            );
            // These harness sinks never make anything durable: do not wait for them.
            settings.shutdown_drain = Duration::from_millis(50);
            let mut progress = progress;
            let result = Streamer {
                stream,
                settings: &settings,
                tx: &tx,
                durable: &mut durable_rx,
                durable_open: true,
                shutdown: &mut shutdown_rx,
                progress: &mut progress,
                assembler: Assembler::default(),
                received: Lsn::ZERO,
                idle: Lsn::ZERO,
                catalog: None,
                spooler: Spooler::new(settings.spool_dir.clone()),
                block: None,
                incremental: incremental::Incremental::off(),
            }
            .run()
            .await;
            (result, progress)
        });
        let mut h = Harness {
            server,
            rx,
            durable: durable_tx,
            shutdown: shutdown_tx,
            task,
        };
        // The interval's first tick sends a status right away.
        h.status().await;
        h
    }

    impl Harness {
        /// The next standby status update: (write, flush, apply, reply).
        async fn status(&mut self) -> (u64, u64, u64, u8) {
            let (tag, body) = self.server.recv().await;
            assert_eq!((tag, body[0]), (b'd', b'r'), "expected a status update");
            let at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap());
            (at(1), at(9), at(17), body[33])
        }

        async fn transaction(&mut self, begin_lsn: u64) {
            self.server.xlog(begin_lsn, &fx::begin()).await;
            self.server.xlog(begin_lsn + 1, &fx::relation()).await;
            self.server.xlog(begin_lsn + 2, &fx::insert()).await;
            self.server.xlog(begin_lsn + 3, &fx::commit()).await;
        }
    }

    /// Appends an XLogData CopyData frame to `burst`, to send many in one write.
    fn xlog_frame(burst: &mut Vec<u8>, lsn: u64, data: &[u8]) {
        let mut body = vec![b'w'];
        body.extend_from_slice(&lsn.to_be_bytes());
        body.extend_from_slice(&(lsn + 100).to_be_bytes());
        body.extend_from_slice(&7i64.to_be_bytes());
        body.extend_from_slice(data);
        burst.push(b'd');
        burst.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        burst.extend_from_slice(&body);
    }

    #[tokio::test]
    async fn a_backlog_past_the_drain_budget_loses_no_message() {
        let mut h = harness(64, Progress::default()).await;
        let rows = 3 * DRAIN_BUDGET as u64 + 7;
        let base = 0x1_0000_0000;
        // One burst, so that more messages than the budget are buffered at once.
        let mut burst = Vec::new();
        let mut xlog = |lsn: u64, data: &[u8]| xlog_frame(&mut burst, lsn, data);
        xlog(base, &fx::begin());
        xlog(base + 1, &fx::relation());
        for i in 0..rows {
            xlog(base + 2 + i, &fx::insert());
        }
        xlog(base + 2 + rows, &fx::commit());
        h.server.send_raw(&burst).await;
        let mut lsns = Vec::new();
        loop {
            let part = h.rx.recv().await.unwrap();
            lsns.extend(part.changes.iter().map(|c| c.lsn.0 - base - 2));
            if part.meta.completes() {
                break;
            }
        }
        assert_eq!(
            lsns,
            (0..rows).collect::<Vec<_>>(),
            "every change once, in order"
        );
    }

    #[tokio::test]
    async fn streams_transactions_and_reports_durable_flush() {
        let mut h = harness(4, Progress::default()).await;
        h.transaction(0x1_0000_0000).await;
        let txn = h.rx.recv().await.unwrap();
        assert_eq!(txn.meta.end_lsn, Lsn(0x1_0000_0130));
        assert_eq!(txn.changes[0].lsn, Lsn(0x1_0000_0002));

        // In flight and not durable: a keepalive must not advance flush.
        h.server.keepalive(0x1_0000_0500, true).await;
        assert_eq!(h.status().await, (0x1_0000_0500, 0, 0, 0));

        // Durable catches up: a status at once, and since nothing arrived after that
        // keepalive but the keepalive itself, its wal_end is safe to flush.
        h.durable.send(Lsn(0x1_0000_0130)).unwrap();
        assert_eq!(h.status().await.1, 0x1_0000_0500);

        // Nothing in flight: the keepalive's wal_end becomes the flush LSN.
        h.server.keepalive(0x1_0000_0600, true).await;
        assert_eq!(h.status().await.1, 0x1_0000_0600);

        // A lower durable value never moves flush backward.
        h.durable.send(Lsn(0x10)).unwrap();
        assert_eq!(h.status().await.1, 0x1_0000_0600);

        // Shutdown: a final status, then CopyDone and Terminate.
        h.shutdown.send(true).unwrap();
        assert_eq!(h.status().await.1, 0x1_0000_0600);
        assert_eq!(h.server.recv().await.0, b'c');
        assert_eq!(h.server.recv().await.0, b'X');
        let (result, progress) = h.task.await.unwrap();
        result.unwrap();
        assert_eq!(progress.dispatched, Lsn(0x1_0000_0130));
        assert_eq!(progress.flushed, Lsn(0x1_0000_0600));
    }

    #[tokio::test]
    async fn resent_transactions_are_skipped_after_a_reconnect() {
        let progress = Progress {
            dispatched: Lsn(0x1_0000_0130),
            flushed: Lsn::ZERO,
            open: None,
            slot_used: true,
        };
        let mut h = harness(4, progress).await;
        h.transaction(0x1_0000_0000).await;
        h.server.keepalive(0x1_0000_0200, true).await;
        // Not durable yet: nothing advances; and nothing was dispatched.
        assert_eq!(h.status().await.1, 0);
        assert!(h.rx.try_recv().is_err());
        h.shutdown.send(true).unwrap();
        h.status().await;
        let (result, _) = h.task.await.unwrap();
        result.unwrap();
    }

    #[tokio::test]
    async fn backpressure_keeps_answering_and_shutdown_interrupts_it() {
        let mut h = harness(1, Progress::default()).await;
        h.transaction(0x100).await;
        // The first fills the channel; the second waits for room.
        let second = Msg::new(b'C')
            .u8(0)
            .u64(0x1_0000_0200)
            .u64(0x1_0000_0230)
            .i64(0)
            .0;
        h.server.xlog(0x1_0000_0150, &fx::begin()).await;
        h.server.xlog(0x1_0000_0151, &fx::insert()).await;
        h.server.xlog(0x1_0000_0152, &second).await;
        // While blocked on the channel, a durable change still produces a status.
        h.durable.send(Lsn(0x42)).unwrap();
        assert_eq!(h.status().await.1, 0x42);
        h.shutdown.send(true).unwrap();
        h.status().await;
        let (result, progress) = h.task.await.unwrap();
        result.unwrap();
        assert_eq!(progress.dispatched, Lsn(0x1_0000_0130));
        assert_eq!(h.rx.recv().await.unwrap().meta.end_lsn, Lsn(0x1_0000_0130));
    }

    /// Two transactions streamed while they run, in interleaved blocks, around one
    /// sent whole: the one that commits comes out whole at its commit, without its
    /// rolled-back subtransaction; the one rolled back never comes out; an abort of a
    /// transaction never streamed is harmless.
    #[tokio::test]
    async fn streamed_transactions_come_out_at_their_commit_without_what_rolled_back() {
        let mut h = harness(8, Progress::default()).await;
        let s = |xid, m: &[u8]| fx::streamed(xid, m);
        let sub_insert = Msg::new(b'I')
            .u32(16_384)
            .u8(b'N')
            .tuple(&[Some(Some("99")), None, None])
            .0;
        // Transaction 800 (kept) and 900 (rolled back), interleaved.
        h.server.xlog(0x10, &fx::stream_start(800, true)).await;
        h.server.xlog(0x11, &s(800, &fx::relation())).await;
        h.server.xlog(0x12, &s(800, &fx::insert())).await;
        h.server.xlog(0x13, &s(801, &sub_insert)).await;
        h.server.xlog(0x14, &s(800, &fx::message())).await;
        h.server.xlog(0x15, &fx::stream_stop()).await;
        h.server.xlog(0x16, &fx::stream_start(900, true)).await;
        h.server.xlog(0x17, &s(900, &fx::relation())).await;
        h.server.xlog(0x18, &s(900, &fx::delete())).await;
        h.server.xlog(0x19, &fx::stream_stop()).await;
        // Savepoint 801 of 800 rolls back; 900 rolls back; 950 was never streamed.
        h.server.xlog(0x1A, &fx::stream_abort(800, 801)).await;
        h.server.xlog(0x1B, &fx::stream_abort(900, 900)).await;
        h.server.xlog(0x1C, &fx::stream_abort(950, 950)).await;
        // A small transaction sent whole commits first.
        h.transaction(0x20).await;
        h.server.xlog(0x30, &fx::stream_start(800, false)).await;
        h.server.xlog(0x31, &s(800, &fx::update_with_key())).await;
        h.server.xlog(0x32, &fx::stream_stop()).await;
        h.server
            .xlog(0x40, &fx::stream_commit(800, 0x2_0000_0000, 0x2_0000_0040))
            .await;

        let whole = h.rx.recv().await.unwrap();
        assert_eq!(whole.meta.end_lsn, Lsn(0x1_0000_0130));
        let streamed = h.rx.recv().await.unwrap();
        assert!(streamed.meta.part.is_whole());
        assert_eq!(streamed.meta.xid, 800);
        assert_eq!(streamed.meta.commit_lsn, Lsn(0x2_0000_0000));
        assert_eq!(streamed.meta.end_lsn, Lsn(0x2_0000_0040));
        let shape: Vec<_> = streamed
            .changes
            .iter()
            .map(|c| (c.op, c.lsn.0, c.relation.name.as_str()))
            .collect();
        assert_eq!(
            shape,
            vec![(Op::Insert, 0x12, "users"), (Op::Update, 0x31, "users")]
        );
        h.shutdown.send(true).unwrap();
        h.status().await;
        let (result, progress) = h.task.await.unwrap();
        result.unwrap();
        assert_eq!(progress.dispatched, Lsn(0x2_0000_0040));
        assert!(h.rx.try_recv().is_err(), "nothing of 900 came out");
    }

    /// A streamed transaction larger than a part comes out in parts, all at its
    /// commit, from its spool on disk.
    #[tokio::test]
    async fn a_large_streamed_transaction_comes_out_in_parts_from_disk() {
        let mut h = harness(64, Progress::default()).await;
        let rows = spool::STREAM_MEMORY as u64 / 8;
        let mut burst = Vec::new();
        let mut xlog = |lsn: u64, data: &[u8]| xlog_frame(&mut burst, lsn, data);
        xlog(1, &fx::stream_start(5, true));
        xlog(2, &fx::streamed(5, &fx::relation()));
        for i in 0..rows {
            xlog(10 + i, &fx::streamed(5, &fx::insert()));
        }
        xlog(10 + rows, &fx::stream_stop());
        h.server.send_raw(&burst).await;
        // Nothing comes out before the commit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(h.rx.try_recv().is_err());
        h.server
            .xlog(
                10 + rows + 1,
                &fx::stream_commit(5, 0x9_0000_0000, 0x9_0000_0010),
            )
            .await;
        let mut lsns = Vec::new();
        let mut parts = 0;
        loop {
            let part = h.rx.recv().await.unwrap();
            parts += 1;
            assert_eq!(part.meta.commit_lsn, Lsn(0x9_0000_0000));
            lsns.extend(part.changes.iter().map(|c| c.lsn.0 - 10));
            if part.meta.completes() {
                assert_eq!(part.meta.end_lsn, Lsn(0x9_0000_0010));
                break;
            }
        }
        assert_eq!(
            lsns,
            (0..rows).collect::<Vec<_>>(),
            "every change once, in order"
        );
        assert!(parts > 1, "handed on in parts");
    }

    #[tokio::test]
    async fn stream_messages_out_of_order_stop_the_session() {
        for messages in [
            vec![fx::stream_stop()],
            vec![fx::stream_start(1, false)],
            vec![fx::stream_commit(3, 0x10, 0x20)],
            vec![fx::stream_start(1, true), fx::stream_start(2, true)],
            vec![fx::stream_start(1, true), fx::begin()],
            vec![fx::begin(), fx::stream_start(1, true)],
        ] {
            let mut h = harness(4, Progress::default()).await;
            for (i, m) in messages.iter().enumerate() {
                h.server.xlog(0x100 + i as u64, m).await;
            }
            let (result, _) = h.task.await.unwrap();
            let err = result.unwrap_err();
            assert!(
                matches!(err, SourceError::Stream { .. }),
                "{messages:?}: {err}"
            );
        }
    }

    /// Regression: at a fast shutdown the walsender sends CommandComplete without
    /// CopyDone; that ended the source with a definite protocol error instead of a
    /// reconnect.
    #[tokio::test]
    async fn command_complete_at_server_shutdown_is_a_transient_end_of_stream() {
        let mut h = harness(4, Progress::default()).await;
        h.server.send(b'C', b"COPY 0\0").await;
        let (result, _) = h.task.await.unwrap();
        let err = result.unwrap_err();
        assert!(matches!(err, SourceError::StreamEnded { .. }), "{err}");
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn server_errors_and_end_of_stream_stop_the_session() {
        let mut h = harness(4, Progress::default()).await;
        h.server
            .error(
                "57P01",
                "terminating connection due to administrator command",
            )
            .await;
        let (result, _) = h.task.await.unwrap();
        let err = result.unwrap_err();
        assert!(err.is_transient(), "{err}");

        let mut h = harness(4, Progress::default()).await;
        h.server.send(b'c', &[]).await;
        let (result, _) = h.task.await.unwrap();
        assert!(matches!(
            result.unwrap_err(),
            SourceError::StreamEnded { .. }
        ));

        let mut h = harness(4, Progress::default()).await;
        h.server
            .error("42704", "publication \"pub\" does not exist")
            .await;
        let (result, _) = h.task.await.unwrap();
        let err = result.unwrap_err();
        assert!(matches!(err, SourceError::PublicationMissing { .. }));
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn run_returns_at_once_when_already_shut_down() {
        let settings = SourceSettings::new(
            protocol::ConnectConfig::new("127.0.0.1", 1, "u", None, "d"),
            "lake",
            "pub",
        );
        let (tx, _rx) = mpsc::channel(1);
        let (_d, durable) = watch::channel(Lsn::ZERO);
        let (_s, shutdown) = watch::channel(true);
        run(settings, tx, durable, shutdown).await.unwrap();
    }

    #[tokio::test]
    async fn run_retries_transient_errors_until_shutdown() {
        // Port 1 on localhost refuses connections: a transient error, retried.
        let settings = SourceSettings::new(
            protocol::ConnectConfig::new("127.0.0.1", 1, "u", None, "d"),
            "lake",
            "pub",
        );
        let (tx, _rx) = mpsc::channel(1);
        let (_d, durable) = watch::channel(Lsn::ZERO);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(run(settings, tx, durable, shutdown));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!task.is_finished());
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn run_returns_definite_errors() {
        let settings = SourceSettings::new(
            protocol::ConnectConfig::new("127.0.0.1", 1, "u", None, "d"),
            "Bad-Slot",
            "pub",
        );
        let (tx, _rx) = mpsc::channel(1);
        let (_d, durable) = watch::channel(Lsn::ZERO);
        let (_s, shutdown) = watch::channel(false);
        let err = run(settings, tx, durable, shutdown).await.unwrap_err();
        assert!(matches!(err, SourceError::InvalidSettings { .. }));
    }
}
