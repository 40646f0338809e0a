//! The initial snapshot (`[source] snapshot = "initial"`): every published row of every
//! published table as `Op::Read` changes, then streaming from the exact point the copy
//! saw.
//!
//! ```text
//!  SQL conn: {slot}_snapshot left by an interrupted attempt? drop it, and write 1 MiB of
//!            WAL (a logical message) so that the new chunks number above the old ones
//!  replication conn: CREATE_REPLICATION_SLOT {slot}_snapshot LOGICAL pgoutput EXPORT_SNAPSHOT
//!        │ (stays open and idle: the exported snapshot lives as long as it does)
//!  SQL conn: BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '...'
//!        │   pg_publication_tables: the tables, and (PostgreSQL 15+) per table its
//!        │     published columns (attnames) and row filter (rowfilter)
//!        │   per published table: COPY (SELECT published columns FROM [ONLY] table
//!        │     WHERE (row filter)) TO STDOUT ─▶ chunks ─▶ tx
//!        │   COMMIT; wait until the sinks made the last chunk durable
//!  SQL conn: pg_copy_logical_replication_slot('{slot}_snapshot', '{slot}')   ◀── "snapshot complete"
//!  SQL conn: pg_drop_replication_slot('{slot}_snapshot')
//!  replication conn: START_REPLICATION SLOT {slot}
//! ```
//!
//! Invariants:
//! - The snapshot copies exactly what the publication publishes, as PostgreSQL's own
//!   table sync does, so that a snapshot row has the columns of the stream's Relation
//!   message and holds nothing the stream would not send: the columns of
//!   `pg_publication_tables.attnames` in `attnum` order (generated ones only on
//!   PostgreSQL 18+, where pgoutput may publish them), the rows that the row filter
//!   (`rowfilter`, PostgreSQL's own deparsed expression) lets through, and of a plain
//!   table only its own rows (`ONLY`: an inheritance child is published, if at all, as
//!   a table of its own). `FOR ALL TABLES` and `TABLES IN SCHEMA` have neither list nor
//!   filter: every column, every row. Before PostgreSQL 15 (no column lists, no row
//!   filters): every column that is not generated, every row.
//! - The slot `{slot}` exists only once the snapshot is durable in every sink: its
//!   existence is the "snapshot complete" marker. A snapshot interrupted at any point
//!   leaves only `{slot}_snapshot`, so the next attempt (a reconnect or the next start)
//!   drops that and takes the snapshot again, from a new consistent point.
//! - Chunks are transactions of at most [`CHUNK_ROWS`](super::copy::CHUNK_ROWS) rows (or [`CHUNK_BYTES`](super::copy::CHUNK_BYTES)), sent
//!   on the same bounded channel as streamed transactions: memory stays bounded.
//! - Chunk `i` has `commit_lsn = end_lsn = base + i` with `base = consistent_point -
//!   SPAN`, or the interrupted attempt's consistent point when that is higher: strictly
//!   increasing, strictly below the consistent point (so below every streamed
//!   transaction) and above every chunk of an interrupted attempt, which is what the
//!   lake's exactly-once check (skip `commit_lsn <=` what it recorded) needs.
//! - Every chunk of one attempt has `xid` = the low 32 bits of its consistent point:
//!   after an interrupted attempt, readers keep the `_op = 'r'` rows of the last one.
//! - The slot's flush LSN is never reported past the consistent point before the
//!   snapshot is complete: streaming only starts afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::catalog;
use super::catalog::catalog_error;
use super::copy::{copy_sql, open_reader, read_copy};
use super::error::SourceError;
use super::protocol::{ReplicationConnection, SnapshotAction};
use super::settings::{SnapshotObserver, SourceSettings, shutdown_requested};
use crate::change::{Change, Lsn, Transaction, TxnMeta};
use crate::progress::{Progress, Unit};

/// Chunk LSNs count up from `consistent_point - SPAN`: room for 2^20 chunks (10^10 rows).
const SPAN: u64 = 1 << 20;
/// How often progress is logged and published.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// The name of the slot that exports the snapshot and marks an attempt in progress.
pub(super) fn snapshot_slot(slot: &str) -> String {
    let keep = slot.len().min(63 - "_snapshot".len());
    format!("{}_snapshot", &slot[..keep])
}

/// The LSN of the first chunk: `SPAN` below the consistent point, but above every
/// chunk of an interrupted attempt (all below its consistent point `previous`).
fn chunk_base(consistent_point: Lsn, previous: Option<Lsn>) -> Lsn {
    let base = consistent_point.0.saturating_sub(SPAN).max(1);
    Lsn(previous.map_or(base, |p| base.max(p.0)))
}

/// What the snapshot reports as it goes: a progress bar on a terminal, else a log
/// line every [`PROGRESS_INTERVAL`]; and `/status` through the observer.
struct Meter<'a> {
    observer: Option<&'a SnapshotObserver>,
    progress: Progress,
    started: Instant,
    last: Instant,
    rows: u64,
    tables_done: usize,
    tables: usize,
}

impl Meter<'_> {
    fn report(&mut self, table: &str, table_rows: u64, estimate: i64, state: &str, force: bool) {
        self.progress.set_done(self.rows);
        if force {
            self.progress.set_message(if table == "*" {
                state.to_owned()
            } else {
                format!("{table}, {}/{} tables done", self.tables_done, self.tables)
            });
        }
        if !force && self.last.elapsed() < PROGRESS_INTERVAL {
            return;
        }
        self.last = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.rows as f64 / seconds;
        let eta_seconds = self.progress.eta_seconds();
        if self.progress.has_bar() {
            debug!(
                table,
                table_rows,
                rows = self.rows,
                rows_per_second = rate as u64,
                eta_seconds,
                state,
                "initial snapshot progress"
            );
        } else {
            info!(
                table,
                table_rows,
                table_estimate = estimate,
                rows = self.rows,
                rows_estimate = self.progress.total(),
                rows_per_second = rate as u64,
                eta_seconds,
                tables_done = self.tables_done,
                tables = self.tables,
                state,
                "initial snapshot progress"
            );
        }
        if let Some(observer) = self.observer {
            (observer.0)(serde_json::json!({
                "state": state,
                "table": table,
                "table_rows": table_rows,
                "table_estimate": estimate.max(0),
                "rows": self.rows,
                "rows_per_second": rate.round(),
                "tables_done": self.tables_done,
                "tables": self.tables,
                "elapsed_seconds": seconds.round(),
                "rows_estimate": self.progress.total(),
                "eta_seconds": eta_seconds,
            }));
        }
    }
}

/// What an initial snapshot leaves: the consistent point (the slot's confirmed flush
/// LSN), the LSN of the last chunk sent, and the published tables' shapes as copied.
pub(super) struct Taken {
    pub consistent_point: Lsn,
    pub last_chunk: Option<Lsn>,
    pub shapes: std::collections::BTreeMap<u32, (String, super::incremental::Shape)>,
}

/// Takes the initial snapshot and creates the permanent slot. Returns what it left,
/// or `None` when shutdown was requested meanwhile.
pub(super) async fn take(
    settings: &SourceSettings,
    conn: &mut ReplicationConnection,
    tx: &mpsc::Sender<Transaction>,
    durable: &mut watch::Receiver<Lsn>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Taken>, SourceError> {
    let exporting_slot = snapshot_slot(&settings.slot);
    let addr = settings.connect.addr();
    let user = settings.connect.user.clone();
    let fail = |during: &'static str| {
        let (addr, user) = (addr.clone(), user.clone());
        move |e: tokio_postgres::Error| catalog_error(&addr, &user, during, e)
    };
    let (client, connection) = settings.connect.connect_sql().await?;
    let client = Arc::new(client);
    let connection = tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(error = %error, "snapshot connection ended");
        }
    });

    // An interrupted attempt left its slot: drop it, and put 1 MiB of WAL (more than
    // SPAN bytes) between its consistent point and the new one, so that the new chunks
    // all number above the old ones and the lake does not skip them.
    let previous: Option<Lsn> = catalog::slot(&client, &exporting_slot)
        .await
        .map_err(|e| catalog_error(&addr, &user, "looking for an interrupted snapshot", e))?
        .map(|s| s.confirmed_flush.or(s.restart_lsn).unwrap_or(Lsn::ZERO));
    if let Some(previous) = previous {
        warn!(slot = %exporting_slot, consistent_point = %previous, "an earlier initial snapshot was interrupted; taking it again (its rows already in the lake have a lower _commit_lsn and another _xid)");
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&exporting_slot])
            .await
            .map_err(fail("dropping the slot of an interrupted snapshot"))?;
        client
            .execute(
                "SELECT pg_logical_emit_message(false, 'airlock.snapshot', repeat(' ', $1))",
                &[&((SPAN + 1) as i32)],
            )
            .await
            .map_err(fail("separating the new snapshot from the interrupted one"))?;
    }
    let created = conn
        .create_logical_slot(&exporting_slot, false, SnapshotAction::Export)
        .await?;
    let consistent_point = created.consistent_point;
    let snapshot_name = created.snapshot_name.ok_or_else(|| SourceError::Snapshot {
        table: "*".into(),
        during: "creating the slot",
        reason: "CREATE_REPLICATION_SLOT returned no snapshot name".into(),
    })?;
    let base = chunk_base(consistent_point, previous);
    let xid = consistent_point.0 as u32;
    info!(slot = %settings.slot, consistent_point = %consistent_point, snapshot = %snapshot_name, first_chunk_lsn = %base, "initial snapshot started");
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            super::protocol::quote_literal(&snapshot_name)
        ))
        .await
        .map_err(fail("importing the snapshot"))?;
    let server_version = catalog::server_version(&client)
        .await
        .map_err(fail("reading the server version"))?;
    let tables = catalog::published_tables(&client, &settings.publication, server_version)
        .await
        .map_err(fail("listing the published tables"))?;
    // What the lake will have whole: the incremental snapshots start from here.
    let shapes = super::incremental::shapes(&client, &settings.publication)
        .await
        .map_err(fail("reading the published tables' columns"))?;

    // The row estimate of every published table, for the ETA.
    let rows_estimate = catalog::published_rows_estimate(&client, &settings.publication)
        .await
        .map_err(fail("estimating the table sizes"))?;
    let mut meter = Meter {
        observer: settings.on_snapshot.as_ref(),
        progress: Progress::start("initial snapshot", Unit::Rows, rows_estimate),
        started: Instant::now(),
        last: Instant::now(),
        rows: 0,
        tables_done: 0,
        tables: tables.len(),
    };
    let mut chunk_index = 0u64;
    let mut last_chunk = None;
    let copied: Arc<str> = "initial snapshot".into();
    for table in &tables {
        let (relation, plain) = catalog::describe(&client, table, server_version)
            .await
            .map_err(fail("describing a published table"))?;
        let qualified = relation.qualified_name();
        let estimate = catalog::rows_estimate(&client, relation.oid)
            .await
            .map_err(fail("estimating the table size"))?
            .map_or(-1, |rows| rows as i64);
        let relation = Arc::new(relation);
        let ranges = page_ranges(&client, relation.oid, plain, settings.snapshot_connections)
            .await
            .map_err(fail("sizing a table"))?;
        // One reader per range, each on a connection of its own in the same snapshot
        // (the first on this one); their chunks are numbered here, in arrival order.
        let (chunks_tx, mut chunks) = mpsc::channel::<Vec<Change>>(2 * ranges.len());
        let mut readers = tokio::task::JoinSet::new();
        for (i, range) in ranges.into_iter().enumerate() {
            let sql = copy_sql(&relation, plain, table.row_filters.as_deref(), range);
            debug!(table = %qualified, sql, "copying a published table");
            let reader = if i == 0 {
                client.clone()
            } else {
                open_reader(&settings.connect, &snapshot_name).await?
            };
            let (relation, out, fail) =
                (relation.clone(), chunks_tx.clone(), fail("copying a table"));
            readers.spawn(async move {
                let rows = read_copy(&reader, &sql, &relation, consistent_point, &out, fail).await;
                if i > 0 {
                    let _ = reader.batch_execute("COMMIT").await;
                }
                rows
            });
        }
        drop(chunks_tx);
        let mut table_rows = 0u64;
        meter.report(&qualified, 0, estimate, "copying", true);
        loop {
            let next = tokio::select! {
                biased;
                () = shutdown_requested(shutdown) => return Ok(None),
                next = chunks.recv() => next,
            };
            let Some(mut changes) = next else { break };
            let lsn = Lsn(base.0 + chunk_index);
            if lsn >= consistent_point {
                return Err(SourceError::Snapshot {
                    table: qualified,
                    during: "numbering chunks",
                    reason: format!(
                        "more chunks than LSNs between {base} and the consistent point {consistent_point}"
                    ),
                });
            }
            for change in &mut changes {
                change.lsn = lsn;
            }
            table_rows += changes.len() as u64;
            meter.rows += changes.len() as u64;
            let txn = Transaction {
                meta: TxnMeta {
                    xid,
                    commit_lsn: lsn,
                    end_lsn: lsn,
                    commit_ts: now_micros(),
                    part: crate::change::Part::WHOLE,
                    copied: Some(copied.clone()),
                },
                changes,
            };
            tokio::select! {
                biased;
                () = shutdown_requested(shutdown) => return Ok(None),
                sent = tx.send(txn) => sent.map_err(|_| SourceError::PipelineClosed)?,
            }
            last_chunk = Some(lsn);
            chunk_index += 1;
            meter.report(&qualified, table_rows, estimate, "copying", false);
        }
        while let Some(read) = readers.join_next().await {
            read.map_err(|e| SourceError::Snapshot {
                table: qualified.clone(),
                during: "copying a table",
                reason: e.to_string(),
            })??;
        }
        meter.tables_done += 1;
        meter.report(&qualified, table_rows, estimate, "copying", true);
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(fail("ending the snapshot transaction"))?;

    // Complete means durable: only then does the permanent slot come to exist.
    if let Some(last) = last_chunk {
        meter.report("*", 0, 0, "waiting for the sinks", true);
        settings.flush_through(last);
        loop {
            if *durable.borrow_and_update() >= last {
                break;
            }
            tokio::select! {
                biased;
                () = shutdown_requested(shutdown) => return Ok(None),
                changed = durable.changed() => if changed.is_err() {
                    return Err(SourceError::PipelineClosed);
                },
            }
        }
    }
    client
        .execute(
            // Permanent: without `false` it would copy the source's persistence.
            "SELECT pg_copy_logical_replication_slot($1, $2, false)",
            &[&exporting_slot, &settings.slot],
        )
        .await
        .map_err(fail("creating the replication slot after the snapshot"))?;
    // The exporting slot is released once created: any session may drop it.
    if let Err(error) = client
        .execute("SELECT pg_drop_replication_slot($1)", &[&exporting_slot])
        .await
    {
        warn!(slot = %exporting_slot, error = %error, "dropping the snapshot slot failed; drop it with pg_drop_replication_slot");
    }
    drop(client);
    let _ = connection.await;
    meter.report("*", 0, 0, "complete", true);
    meter.progress.finish();
    info!(slot = %settings.slot, consistent_point = %consistent_point, rows = meter.rows, chunks = chunk_index, "initial snapshot complete, created replication slot");
    Ok(Some(Taken {
        consistent_point,
        last_chunk,
        shapes,
    }))
}

/// Pages per range of a table copied over several connections: tables under two
/// ranges are copied over one.
const RANGE_PAGES: i64 = 4096;

/// The page ranges `[from, to)` (`to` open for the last) in which a plain table is
/// copied over `connections` connections, one per range; `[None]`: one COPY of it all.
pub(super) async fn page_ranges(
    client: &tokio_postgres::Client,
    oid: u32,
    plain: bool,
    connections: usize,
) -> Result<Vec<Option<(i64, Option<i64>)>>, tokio_postgres::Error> {
    if !plain || connections < 2 {
        return Ok(vec![None]);
    }
    let pages: i64 = client
        .query_one(
            "SELECT pg_relation_size($1::oid::regclass) / current_setting('block_size')::int8",
            &[&oid],
        )
        .await?
        .get(0);
    Ok(split_pages(pages, connections))
}

fn split_pages(pages: i64, connections: usize) -> Vec<Option<(i64, Option<i64>)>> {
    let k = (pages / RANGE_PAGES).min(connections as i64);
    if k < 2 {
        return vec![None];
    }
    (0..k)
        .map(|i| Some((pages * i / k, (i + 1 < k).then(|| pages * (i + 1) / k))))
        .collect()
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_tables_are_split_into_page_ranges_that_cover_every_page_once() {
        assert_eq!(split_pages(RANGE_PAGES * 2 - 1, 4), vec![None]);
        assert_eq!(split_pages(RANGE_PAGES * 10, 1), vec![None]);
        let ranges = split_pages(RANGE_PAGES * 10 + 7, 3);
        assert_eq!(ranges.len(), 3);
        assert_eq!(ranges[0].unwrap().0, 0);
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].unwrap().1, Some(pair[1].unwrap().0));
        }
        // The last is open: rows the estimate missed are still read.
        assert_eq!(ranges[2].unwrap().1, None);
    }

    #[test]
    fn chunks_number_below_the_consistent_point_and_above_an_interrupted_attempt() {
        let cp = Lsn(0x1_6B3_748);
        assert_eq!(chunk_base(cp, None), Lsn(cp.0 - SPAN));
        assert_eq!(chunk_base(Lsn(10), None), Lsn(1));
        // A retry after 1 MiB of WAL: above every chunk of the first attempt.
        let retry = Lsn(cp.0 + SPAN + 100);
        assert!(chunk_base(retry, Some(cp)) >= cp);
        assert!(chunk_base(retry, Some(cp)).0 + SPAN / 2 < retry.0);
        assert_eq!(snapshot_slot(&"x".repeat(63)).len(), 63);
    }
}
