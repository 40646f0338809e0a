//! The lake sink: one Delta table of Parquet files per source table, written exactly once.
//!
//! ```text
//! accept(Arc<Batch>) ──kept rows, no I/O──▶ per table: [Segment{ batch, relation version, rows }]
//!                                                │
//! flush() ── per table with rows, in dir order:  ▼
//!   open/reload: load `{url}/{table dir}/`, read txn version V for `app_id`
//!   skip rows of transactions with commit_lsn <= V        (already committed)
//!   create the table / add missing columns                (own metadata-only commit)
//!   rows ──arrow::record_batch──▶ RecordBatchWriter ──▶ Parquet files (Add actions)
//!   one commit: Add* + [Metadata: grown tags] + Txn{ app_id, max commit_lsn } + commitInfo
//! ```
//!
//! Invariants:
//! - Each source table has its own directory directly under the sink's root, from
//!   [`naming::table_dir`]: no name PostgreSQL accepts reaches a path any other way, so a
//!   table never writes into another's directory or outside the root. A directory whose
//!   Delta table names another table (a case-insensitive store) is never written.
//! - `accept` does no I/O and never fails: every failure surfaces in `flush`, which
//!   [`drive`](crate::sink::drive) retries when it is transient.
//! - A flush writes one data commit per table. A table's buffer is cleared only after its
//!   commit landed, so a retried flush never commits a table twice.
//! - Every data commit carries the application transaction `(app_id, V)` where `V` is the
//!   largest commit LSN (as `i64`) of the transactions it holds. Rows of a transaction
//!   with `commit_lsn <= V` are never written again: after a restart they are skipped, and
//!   after any failed commit the table is reloaded first, because a commit can land even
//!   when its caller saw an error (a lost response, a failed post-commit checkpoint).
//! - A flush covers every transaction accepted whole, so a transaction is never split
//!   between two commits of one table. Rows of a transaction whose last part has not
//!   arrived (see [`Part`](crate::change::Part)) are written to staged Parquet files at
//!   a flush, referenced by no commit; the commit that holds the transaction's last
//!   rows adds them too. A staged file of a transaction that a reload finds committed
//!   is dropped; after a crash the staged files are orphans that vacuum removes.
//!
//! # Rows and types
//!
//! Each kept row (not dropped, routed to this sink) becomes one Delta row: the relation's
//! columns, then `_op` (`c`/`u`/`d`/`r`/`t`), `_lsn`, `_commit_lsn`, `_commit_ts` (UTC
//! µs), `_xid`, `_pipeline`, `_policy`, `_tags` (row tags), `_unchanged` (columns whose TOASTed value
//! PostgreSQL did not resend; written as null) and `_special` (see below). Inserts,
//! updates and snapshot reads write the new image, deletes the old one (key columns, or
//! all with `REPLICA IDENTITY FULL`), a truncate one row of nulls.
//!
//! | PostgreSQL                      | Delta                                    |
//! |---------------------------------|------------------------------------------|
//! | bool                            | boolean                                  |
//! | int2 / int4 / int8, oid         | short / integer / long                   |
//! | float4 / float8                 | float / double                           |
//! | numeric(p,s), 1 ≤ p ≤ 38, 0 ≤ s ≤ p | decimal(p,s)                         |
//! | numeric (unconstrained or wider)| string, exact text                       |
//! | bytea                           | binary                                   |
//! | date                            | date                                     |
//! | timestamp / timestamptz         | timestamp_ntz / timestamp (UTC), µs      |
//! | time                            | string `HH:MM:SS.ffffff` (Delta has no time type) |
//! | uuid                            | string, lowercase 8-4-4-4-12             |
//! | json, jsonb, text types, other  | string (PostgreSQL text form)            |
//!
//! Nothing is rounded or clamped. A value the column's Delta type cannot hold exactly —
//! `NaN` in a decimal column, `±infinity` dates and timestamps, or a guest-edited value
//! that does not fit — is written as null and recorded in the row's `_special` list as
//! `column=text` (PostgreSQL text form), so the exact value stays in the row.
//!
//! Guest column tags are stored in the Delta field metadata under `airlock.tags` (a JSON
//! array string). Tags only grow; growth is written as a Metadata action in the data
//! commit. A relation column the table lacks is added (nullable) with deltalake's
//! `add_columns` in a metadata-only commit before the data commit; a Delta column the
//! relation lacks stays and is written as null.

mod arrow;
mod catalog;
mod error;
mod files;
mod maintain;
mod naming;
mod settings;
mod table;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[cfg(test)]
use self::table::CrashPoint;
use self::writer::Writer;
use crate::change::Lsn;
use crate::pipeline::batch::Batch;
use crate::sink::{Sink, SinkError};

pub use self::arrow::TAGS_KEY;
pub use self::catalog::{Catalog, CatalogColumn, CatalogError, CatalogSink, CatalogTable, catalog};
use self::maintain::CompactLock;
pub use self::maintain::CompactReport;
pub use self::settings::{LakeSettings, Maintenance};

/// The Delta type (as the catalog names it: `long`, `string`, `decimal(12,2)`) a
/// column of this PostgreSQL type is written as.
pub fn lake_type(type_oid: u32, type_modifier: i32) -> String {
    catalog::type_name(&arrow::delta_type(&crate::change::Column {
        name: String::new(),
        type_oid,
        type_modifier,
        key: false,
    }))
}

/// The name the catalog gives the table of `schema.table` ([`CatalogTable::name`]).
pub fn lake_table_name(schema: &str, table: &str) -> String {
    naming::display_name(schema, table)
}

/// Writes routed rows to Delta tables under one location; see the module documentation.
///
/// The sink and its [`LakeHandle`]s share one writer behind a mutex: a compaction asked
/// for through a handle waits for the flush in progress and holds the next one back.
pub struct LakeSink {
    name: String,
    flush_interval: Duration,
    writer: Arc<tokio::sync::Mutex<Writer>>,
    /// `Writer::due` as of the last `accept` or `flush` (only they change it).
    due: bool,
    /// `Writer::holds_open` as of the last `flush` (only it changes it).
    holds_open: bool,
}

impl std::fmt::Debug for LakeSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeSink")
            .field("name", &self.name)
            .field("due", &self.due)
            .finish_non_exhaustive()
    }
}

impl LakeSink {
    /// Checks the settings and prepares the location. Tables are loaded lazily, at their
    /// first flush; a `file://` base directory is created here.
    pub async fn open(settings: LakeSettings) -> Result<LakeSink, SinkError> {
        let definite = |message: String| SinkError::Definite {
            sink: settings.name.clone(),
            message,
        };
        let url = settings.url.trim_end_matches('/');
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(definite(format!(
                    "url `{}` must be an absolute file URL like `file:///var/lib/airlock/lake`",
                    settings.url
                )));
            }
            tokio::fs::create_dir_all(path)
                .await
                .map_err(|e| definite(format!("cannot create the lake directory {path}: {e}")))?;
        } else if url.starts_with("s3://") || url.starts_with("s3a://") {
            settings::register_s3();
        } else {
            return Err(definite(format!(
                "url `{}` is not supported: use `file:///abs/path` or `s3://bucket/prefix`",
                settings.url
            )));
        }
        if settings.app_id.is_empty() {
            return Err(definite("app_id must not be empty".into()));
        }
        if settings.max_rows == 0 || settings.max_bytes == 0 {
            return Err(definite("max_rows and max_bytes must be at least 1".into()));
        }
        let m = &settings.maintenance;
        if m.compact_min_files == 0
            || m.small_file_bytes == 0
            || m.target_file_bytes == 0
            || m.checkpoint_interval == 0
        {
            return Err(definite(
                "compact_min_files, small_file_bytes, target_file_bytes and checkpoint_interval must be at least 1".into(),
            ));
        }
        let lock =
            CompactLock::for_sink(&settings).map_err(|e| e.into_sink_error(&settings.name))?;
        Ok(LakeSink {
            name: settings.name.clone(),
            flush_interval: settings.flush_interval,
            writer: Arc::new(tokio::sync::Mutex::new(Writer {
                settings,
                tables: BTreeMap::new(),
                rows: 0,
                bytes: 0,
                accepted_end: None,
                open: None,
                lock,
                #[cfg(test)]
                crash: None,
            })),
            due: false,
            holds_open: false,
        })
    }

    /// A handle for asking this sink's writer to compact now (admin API, tests).
    pub fn handle(&self) -> LakeHandle {
        LakeHandle {
            name: self.name.clone(),
            writer: self.writer.clone(),
        }
    }

    /// The table holding the latest commit this sink made for its application id in
    /// an earlier run, and that commit's LSN; `None` for a lake without one. Read at
    /// startup: a slot that is missing while the lake holds its changes was dropped.
    pub async fn held_through(&self) -> Result<Option<(String, Lsn)>, SinkError> {
        self.writer.lock().await.held_through().await
    }

    #[cfg(test)]
    async fn set_crash(&self, crash: Option<CrashPoint>) {
        self.writer.lock().await.crash = crash;
    }

    #[cfg(test)]
    async fn buffered_rows(&self) -> usize {
        self.writer.lock().await.rows
    }
}

/// Asks a running lake sink's writer to maintain its tables. Cloning is cheap.
#[derive(Clone)]
pub struct LakeHandle {
    name: String,
    writer: Arc<tokio::sync::Mutex<Writer>>,
}

impl std::fmt::Debug for LakeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeHandle")
            .field("name", &self.name)
            .finish()
    }
}

impl LakeHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compacts every table of the sink now (any two or more small files), writes a
    /// checkpoint when one is due, and vacuums files past retention. Waits for a flush
    /// in progress; holds flushes back while it runs. Fails when another process holds
    /// the compaction lock.
    pub async fn compact(&self) -> Result<Vec<CompactReport>, SinkError> {
        self.writer.lock().await.compact_all().await
    }
}

/// The lake sinks of a running host, for `POST /compact`. Cloning shares the list.
#[derive(Clone, Debug, Default)]
pub struct Compactors(Arc<std::sync::Mutex<Vec<LakeHandle>>>);

impl Compactors {
    pub fn register(&self, handle: LakeHandle) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    /// Compacts every table of every registered lake sink, one sink after another.
    pub async fn compact_all(&self) -> Result<Vec<CompactReport>, SinkError> {
        let handles = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut reports = Vec::new();
        for handle in handles {
            reports.extend(handle.compact().await?);
        }
        Ok(reports)
    }
}

/// `airlock compact` with no host running: compacts every table of every lake in
/// `lakes` under each one's compaction lock (an error when it is held).
pub async fn compact_offline(
    lakes: impl IntoIterator<Item = &LakeSettings>,
) -> Result<Vec<CompactReport>, SinkError> {
    let mut reports = Vec::new();
    for settings in lakes {
        let lake = LakeSink::open(settings.clone()).await?;
        reports.extend(lake.handle().compact().await?);
    }
    Ok(reports)
}

impl Sink for LakeSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn accept(&mut self, batch: Arc<Batch>) -> Result<bool, SinkError> {
        let mut writer = self.writer.lock().await;
        let kept = writer.accept(batch);
        self.due = writer.due();
        Ok(kept)
    }

    fn due(&self) -> bool {
        self.due
    }

    async fn flush(&mut self) -> Result<Option<Lsn>, SinkError> {
        let mut writer = self.writer.lock().await;
        let result = writer.flush().await;
        self.due = writer.due();
        self.holds_open = writer.holds_open();
        result
    }

    fn flush_interval(&self) -> Duration {
        self.flush_interval
    }

    fn holds_open(&self) -> bool {
        self.holds_open
    }
}
