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
//! µs), `_xid`, `_pipeline`, `_tags` (row tags), `_unchanged` (columns whose TOASTed value
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
mod maintain;
mod naming;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, MetadataExt as _, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use self::arrow::{Segment, plan_schema, record_batch, struct_type};
use crate::change::Lsn;
use crate::pipeline::batch::{Batch, BatchRow};
use crate::sink::{Sink, SinkError};

pub use self::arrow::TAGS_KEY;
pub use self::catalog::{Catalog, CatalogColumn, CatalogError, CatalogSink, CatalogTable, catalog};
use self::maintain::{CompactLock, Trigger};
pub use self::maintain::{CompactReport, Maintenance};

/// Settings of one lake sink, validated by the config layer.
#[derive(Clone, Debug)]
pub struct LakeSettings {
    /// The sink's name in the configuration (`[sinks.NAME]`), used in logs and errors.
    pub name: String,
    /// Where the tables live: `file:///abs/path` or `s3://bucket/prefix`.
    pub url: String,
    /// Routes this sink takes; a row without routes takes `default`.
    pub routes: Vec<String>,
    /// How long accepted rows may wait before a flush.
    pub flush_interval: Duration,
    /// Flush when this many rows are buffered.
    pub max_rows: usize,
    /// Flush when about this many bytes of values are buffered.
    pub max_bytes: usize,
    /// The Delta application-transaction id, e.g. `airlock:<slot>`.
    pub app_id: String,
    /// Options for the object store (`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...). For
    /// `s3://`, [`LakeSettings::STORE_TIMEOUTS`] are added unless set here.
    pub storage_options: HashMap<String, String>,
    /// Static entries added to every commit's info (source database, slot, ...).
    pub commit_info: serde_json::Map<String, serde_json::Value>,
    /// Compaction, checkpoints and vacuum.
    pub maintenance: Maintenance,
}

impl LakeSettings {
    pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_MAX_ROWS: usize = 100_000;
    pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
    /// Object store request timeouts for `s3://` lakes, unless `storage_options` sets
    /// them: a request to a store that stopped answering fails (and is retried, then
    /// the flush) instead of holding the flush, and every table behind it, forever.
    pub const STORE_TIMEOUTS: [(&str, &str); 2] = [("timeout", "30s"), ("connect_timeout", "5s")];

    /// Settings with the defaults: route `default`, 5 s, 100 000 rows, 64 MiB.
    pub fn new(
        name: impl Into<String>,
        url: impl Into<String>,
        app_id: impl Into<String>,
    ) -> LakeSettings {
        LakeSettings {
            name: name.into(),
            url: url.into(),
            routes: vec![BatchRow::DEFAULT_ROUTE.to_owned()],
            flush_interval: Self::DEFAULT_FLUSH_INTERVAL,
            max_rows: Self::DEFAULT_MAX_ROWS,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            app_id: app_id.into(),
            storage_options: HashMap::new(),
            commit_info: serde_json::Map::new(),
            maintenance: Maintenance::default(),
        }
    }

    /// The object store options: `storage_options`, with [`Self::STORE_TIMEOUTS`] for
    /// `s3://` where they are not set (keys compare without case, as the store does).
    fn store_options(&self) -> HashMap<String, String> {
        let mut options = self.storage_options.clone();
        let url = self.url.trim_start();
        if url.starts_with("s3://") || url.starts_with("s3a://") {
            for (key, value) in Self::STORE_TIMEOUTS {
                if !options.keys().any(|k| k.eq_ignore_ascii_case(key)) {
                    options.insert(key.to_owned(), value.to_owned());
                }
            }
        }
        options
    }

    /// The settings of the `delta` sink `sink` of `config`: what `airlock run` writes with
    /// and what `airlock compact` and `airlock catalog` read.
    pub fn from_config(
        config: &crate::config::Config,
        sink: &crate::config::SinkConfig,
    ) -> LakeSettings {
        let mut commit_info = serde_json::Map::new();
        commit_info.insert("airlock.slot".into(), config.source.slot.clone().into());
        commit_info.insert(
            "airlock.publication".into(),
            config.source.publication.clone().into(),
        );
        LakeSettings {
            name: sink.name.clone(),
            url: sink.url.clone(),
            routes: sink.routes.clone(),
            flush_interval: sink.flush_interval,
            max_rows: sink.max_rows,
            max_bytes: sink.max_bytes,
            app_id: format!("airlock:{}", config.source.slot),
            storage_options: sink.storage_options.clone(),
            commit_info,
            maintenance: Maintenance {
                compact_min_files: sink.compact_min_files,
                small_file_bytes: sink.small_file_bytes,
                target_file_bytes: sink.target_file_bytes,
                checkpoint_interval: sink.checkpoint_interval,
                vacuum_retention: sink.vacuum_retention,
            },
        }
    }
}

/// What went wrong in the lake, before it is classified for the sink contract.
#[derive(Debug, thiserror::Error)]
enum LakeError {
    #[error("table {table}: {action} failed: {source}")]
    Delta {
        table: String,
        action: &'static str,
        #[source]
        source: DeltaTableError,
    },
    #[error("table {table}: {source}")]
    Convert {
        table: String,
        #[source]
        source: arrow::ConvertError,
    },
    #[error("the compaction lock: {0}")]
    Lock(#[source] object_store::Error),
    #[error(
        "another compaction holds the lock {path} ({holder}); wait for it, or delete the lock object if no compactor is running"
    )]
    Locked { path: String, holder: String },
    #[error(
        "table {table}: its directory {dir} holds the Delta table {holds}; nothing is written there (does the store compare names without case?)"
    )]
    Occupied {
        table: String,
        dir: String,
        holds: String,
    },
    #[error("table {table}: compaction refused: {message}")]
    Compaction { table: String, message: String },
    #[cfg(test)]
    #[error("injected crash: {0}")]
    Crash(&'static str),
}

impl LakeError {
    fn delta<'a>(
        table: &'a str,
        action: &'static str,
    ) -> impl FnOnce(DeltaTableError) -> LakeError + 'a {
        move |source| LakeError::Delta {
            table: table.to_owned(),
            action,
            source,
        }
    }

    fn convert(table: &str) -> impl FnOnce(arrow::ConvertError) -> LakeError + '_ {
        move |source| LakeError::Convert {
            table: table.to_owned(),
            source,
        }
    }

    fn lock(source: object_store::Error) -> LakeError {
        LakeError::Lock(source)
    }

    fn into_sink_error(self, sink: &str) -> SinkError {
        let transient = match &self {
            LakeError::Delta { source, .. } => is_transient(source),
            LakeError::Lock(source) => object_store_transient(source),
            LakeError::Locked { .. } => true,
            LakeError::Convert { .. }
            | LakeError::Compaction { .. }
            | LakeError::Occupied { .. } => false,
            #[cfg(test)]
            LakeError::Crash(_) => true,
        };
        let message = match &self {
            LakeError::Delta { source, .. } if transient => {
                format!(
                    "{self} (will retry; check that the lake is reachable: {})",
                    root_cause(source)
                )
            }
            _ => self.to_string(),
        };
        let sink = sink.to_owned();
        if transient {
            SinkError::Transient { sink, message }
        } else {
            SinkError::Definite { sink, message }
        }
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Whether a Delta error is worth retrying: storage unreachable or busy, I/O, or a race
/// with another commit. Bad data, bad schemas and denied access are definite.
fn is_transient(error: &DeltaTableError) -> bool {
    match error {
        DeltaTableError::Io { .. } | DeltaTableError::VersionAlreadyExists(_) => return true,
        DeltaTableError::Transaction { source } => match source {
            TransactionError::VersionAlreadyExists(_)
            | TransactionError::MaxCommitAttempts(_)
            | TransactionError::LogStoreError { .. } => return true,
            TransactionError::ObjectStore { source } => return object_store_transient(source),
            _ => return false,
        },
        _ => {}
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(store) = error.downcast_ref::<object_store::Error>() {
            return object_store_transient(store);
        }
        if error.is::<std::io::Error>() {
            return true;
        }
        cause = error.source();
    }
    false
}

fn object_store_transient(error: &object_store::Error) -> bool {
    !matches!(
        error,
        object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::UnknownConfigurationKey { .. }
    )
}

/// The URL of the table in directory `dir` (from [`naming::table_dir`] or a listing of
/// the root) under the lake at `root`.
fn table_url(root: &str, dir: &str) -> String {
    format!(
        "{}/{}",
        root.trim_end_matches('/'),
        naming::dir_segment(dir)
    )
}

/// About how many bytes a kept row holds in memory, for `max_bytes`: the row, its
/// change and what the guests gave it.
fn row_bytes(row: &BatchRow) -> usize {
    use crate::change::ALLOCATION_OVERHEAD;
    let text = |s: &String| std::mem::size_of::<String>() + s.capacity() + ALLOCATION_OVERHEAD;
    std::mem::size_of::<BatchRow>() - std::mem::size_of::<crate::change::Change>()
        + row.change.approx_bytes()
        + row.routes.iter().map(text).sum::<usize>()
        + row.tags.iter().map(text).sum::<usize>()
        + row
            .annotations
            .iter()
            .map(|(k, v)| text(k) + text(v))
            .sum::<usize>()
}

/// Rows converted to Arrow at a time when a flush writes its files: the Parquet
/// writer encodes each chunk as it comes, so a flush holds one chunk's arrays, not
/// the whole buffer's.
const WRITE_CHUNK_ROWS: usize = 8192;

/// How many leading values of a column decide whether it is dictionary-encoded.
const DICTIONARY_SAMPLE: usize = 1024;

/// Parquet writer properties for `batch`: Snappy, as delta-rs writes by default, and
/// dictionary encoding only for the columns whose values repeat. A dictionary of
/// mostly distinct values (keys, timestamps, hashed e-mails) costs a hash-table
/// insert per value and makes the file no smaller.
fn writer_properties(batch: &::arrow::array::RecordBatch) -> WriterProperties {
    let mut builder = WriterProperties::builder().set_compression(Compression::SNAPPY);
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if repeats(column.as_ref()) == Some(false) {
            builder = builder
                .set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), false);
        }
    }
    builder.build()
}

/// Whether at most half of the first non-null values of `column` are distinct; `None`
/// for columns the writer's default is left to (nested and boolean columns).
fn repeats(column: &dyn ::arrow::array::Array) -> Option<bool> {
    use ::arrow::datatypes::DataType as T;
    let data = column.to_data();
    let valid = (0..data.len().min(DICTIONARY_SAMPLE)).filter(|&i| data.is_valid(i));
    // The bytes of each sampled value: slices of the values buffer.
    let sample: Vec<&[u8]> = match data.data_type() {
        T::Utf8 | T::Binary => {
            let offsets = data.buffer::<i32>(0);
            let values = data.buffers().get(1)?.as_slice();
            valid
                .map(|i| &values[offsets[i] as usize..offsets[i + 1] as usize])
                .collect()
        }
        T::LargeUtf8 | T::LargeBinary => {
            let offsets = data.buffer::<i64>(0);
            let values = data.buffers().get(1)?.as_slice();
            valid
                .map(|i| &values[offsets[i] as usize..offsets[i + 1] as usize])
                .collect()
        }
        t => {
            let width = t.primitive_width()?;
            let values = data.buffers().first()?.as_slice();
            let start = data.offset();
            valid
                .map(|i| &values[(start + i) * width..(start + i + 1) * width])
                .collect()
        }
    };
    let distinct: std::collections::HashSet<&[u8]> = sample.iter().copied().collect();
    Some(distinct.len() * 2 <= sample.len())
}

/// Converts the rows of `segments` and writes them as Parquet files (not committed);
/// returns the files and how many rows they hold.
async fn write_files(
    settings: &LakeSettings,
    name: &str,
    warned: &mut BTreeSet<String>,
    table: &DeltaTable,
    segments: &[Segment],
) -> Result<(Vec<deltalake::kernel::Add>, usize), LakeError> {
    let writer = RecordBatchWriter::for_table(table)
        .map_err(LakeError::delta(name, "preparing the writer"))?;
    let schema = writer.arrow_schema();
    let mut convert = |chunk: &[Segment]| {
        let converted = record_batch(&schema, chunk).map_err(LakeError::convert(name))?;
        for column in converted.special_columns {
            if !warned.contains(&column) {
                tracing::warn!(
                    sink = %settings.name,
                    table = %name,
                    column = %column,
                    "values that the column's Delta type cannot hold are written as null and kept in `_special`"
                );
                warned.insert(column);
            }
        }
        Ok::<_, LakeError>(converted.batch)
    };
    let mut chunks = chunks(segments, WRITE_CHUNK_ROWS);
    let Some(first) = chunks.next() else {
        return Ok((Vec::new(), 0));
    };
    let first = convert(first)?;
    // The first chunk decides the encodings (see `writer_properties`).
    let mut writer = writer.with_writer_properties(writer_properties(&first));
    let mut rows = 0;
    let mut next = Some(first);
    while let Some(batch) = next {
        rows += batch.num_rows();
        writer
            .write(batch)
            .await
            .map_err(LakeError::delta(name, "writing Parquet"))?;
        next = chunks.next().map(&mut convert).transpose()?;
    }
    let adds = writer
        .flush()
        .await
        .map_err(LakeError::delta(name, "writing Parquet"))?;
    Ok((adds, rows))
}

/// Consecutive runs of whole segments of at least `rows` rows each (the last may hold
/// fewer), in order.
fn chunks(segments: &[Segment], rows: usize) -> impl Iterator<Item = &[Segment]> {
    let mut rest = segments;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut taken = 0;
        let mut end = 0;
        while end < rest.len() && taken < rows {
            taken += rest[end].rows.len();
            end += 1;
        }
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

/// Splits segments into the rows of the transaction committed at `open` and the rest,
/// keeping their order.
fn split_segments(segments: &[Segment], open: Lsn) -> (Vec<Segment>, Vec<Segment>) {
    let mut staged = Vec::new();
    let mut rest = Vec::new();
    for segment in segments {
        let (mine, others): (Vec<u32>, Vec<u32>) = segment
            .rows
            .iter()
            .partition(|&&r| segment.txn(segment.row(r)).commit_lsn == open);
        for (rows, out) in [(mine, &mut staged), (others, &mut rest)] {
            if !rows.is_empty() {
                out.push(Segment {
                    batch: segment.batch.clone(),
                    table: segment.table,
                    rows,
                });
            }
        }
    }
    (staged, rest)
}

/// A segment without rows and without the rest of its batch: its relation version,
/// column tags and lineage, for a later schema plan and commit info.
fn shape(segment: &Segment) -> Segment {
    let table = &segment.batch.tables[segment.table as usize];
    Segment {
        batch: Arc::new(Batch {
            tables: vec![crate::pipeline::batch::BatchTable {
                relation: table.relation.clone(),
                column_tags: table.column_tags.clone(),
                rows: Vec::new(),
            }],
            pipeline: segment.batch.pipeline.clone(),
            stages: segment.batch.stages.clone(),
            ..Batch::default()
        }),
        table: 0,
        rows: Vec::new(),
    }
}

/// Whether `shape` already stands for `segment`'s relation version, tags and lineage.
fn same_shape(shape: &Segment, segment: &Segment) -> bool {
    let a = &shape.batch.tables[shape.table as usize];
    let b = &segment.batch.tables[segment.table as usize];
    Arc::ptr_eq(&a.relation, &b.relation)
        && a.column_tags == b.column_tags
        && shape.batch.pipeline == segment.batch.pipeline
}

/// Parquet files written for rows of a transaction whose last part had not arrived:
/// in the table's directory, but in no commit, so no reader sees them. They are
/// committed with the transaction's last rows.
struct Staged {
    commit_lsn: Lsn,
    adds: Vec<deltalake::kernel::Add>,
    rows: usize,
    /// The staged segments without their rows: relation versions and column tags for
    /// the schema plan, and pipeline lineage for the commit info.
    shapes: Vec<Segment>,
}

/// One Delta table and the rows waiting for it.
struct LakeTable {
    /// The original `schema.table` ([`naming::display_name`]); for a table known only
    /// from a listing of the root, the name in its Delta metadata, or its directory.
    name: String,
    /// For a table named by a source relation, the unquoted `schema.table` older
    /// versions stored as its Delta name; `None` for a table known only from a listing.
    /// A table named by its relation never writes to a Delta table named otherwise.
    legacy_name: Option<String>,
    /// Its directory under the root.
    dir: String,
    url: String,
    /// The loaded table; `None` until the first flush, and after a failed one.
    delta: Option<DeltaTable>,
    /// The table's latest application-transaction version for our app id.
    committed: Option<i64>,
    pending: Vec<Segment>,
    rows: usize,
    bytes: usize,
    /// Files of large transactions, not committed yet.
    staged: Vec<Staged>,
    /// Columns already warned about for `_special` values.
    warned: BTreeSet<String>,
    /// Commits since the last checkpoint (counted from the writer's start).
    commits_since_checkpoint: u64,
    last_vacuum: Option<Instant>,
}

/// Where a test makes the flush stop, as if the process were killed there.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CrashPoint {
    /// The Parquet files are uploaded; the commit is not written.
    BeforeCommit,
    /// The commit is written; the flush does not return (no durable LSN, no slot ack).
    AfterCommit,
}

impl LakeTable {
    fn new(name: String, legacy_name: Option<String>, dir: String, url: String) -> LakeTable {
        LakeTable {
            name,
            legacy_name,
            dir,
            url,
            delta: None,
            committed: None,
            pending: Vec::new(),
            rows: 0,
            bytes: 0,
            staged: Vec::new(),
            warned: BTreeSet::new(),
            commits_since_checkpoint: 0,
            last_vacuum: None,
        }
    }

    /// Loads the table (or notes that it does not exist yet) and its committed version.
    async fn open(&mut self, settings: &LakeSettings) -> Result<(), LakeError> {
        let name = self.name.as_str();
        let mut table = table_handle(&self.url, name, settings)?;
        let exists = table
            .verify_deltatable_existence()
            .await
            .map_err(LakeError::delta(name, "checking for the table"))?;
        self.committed = None;
        if exists {
            table
                .load()
                .await
                .map_err(LakeError::delta(name, "loading the table"))?;
            let state = table
                .snapshot()
                .map_err(LakeError::delta(name, "loading the table"))?;
            self.committed = state
                .transaction_version(table.log_store().as_ref(), &settings.app_id)
                .await
                .map_err(LakeError::delta(
                    name,
                    "reading the application transaction",
                ))?;
            if self.legacy_name.is_none()
                && let Some(stored) = state.metadata().name()
            {
                self.name = stored.to_owned();
            }
        }
        self.delta = Some(table);
        Ok(())
    }

    /// Fails when the loaded Delta table names another source table than this one: two
    /// names the store does not tell apart (`A` and `a` on a case-insensitive
    /// filesystem) must not mix their rows. Tables without a name pass, and so does the
    /// unquoted `schema.table` older versions stored (a table moved from its old
    /// directory).
    fn check_owner(&self) -> Result<(), LakeError> {
        let Some(legacy) = &self.legacy_name else {
            return Ok(());
        };
        let Some(stored) = self
            .delta
            .as_ref()
            .and_then(|t| t.snapshot().ok())
            .and_then(|s| s.metadata().name().map(str::to_owned))
        else {
            return Ok(());
        };
        if stored == self.name || stored == *legacy {
            return Ok(());
        }
        Err(LakeError::Occupied {
            table: self.name.clone(),
            dir: self.dir.clone(),
            holds: stored,
        })
    }

    /// Drops rows of transactions the table already holds; returns how many.
    fn skip_committed(&mut self) -> usize {
        let Some(version) = self.committed else {
            return 0;
        };
        let done = |lsn: Lsn| lsn.0 as i64 <= version;
        let mut skipped = 0;
        self.staged.retain(|staged| {
            if done(staged.commit_lsn) {
                skipped += staged.rows;
            }
            !done(staged.commit_lsn)
        });
        self.pending.retain_mut(|segment| {
            let (first, last) = match (segment.batch.txns.first(), segment.batch.txns.last()) {
                (Some(first), Some(last)) => (first.commit_lsn, last.commit_lsn),
                _ => return true,
            };
            if !done(first) {
                return true;
            }
            if done(last) {
                skipped += segment.rows.len();
                return false;
            }
            let batch = segment.batch.clone();
            let before = segment.rows.len();
            segment
                .rows
                .retain(|&r| !done(batch.txns[batch.rows[r as usize].txn as usize].commit_lsn));
            skipped += before - segment.rows.len();
            !segment.rows.is_empty()
        });
        skipped
    }

    /// Commits every pending row of this table, except rows of `open` (a transaction
    /// whose last part has not arrived), which are written to staged files. On `Ok`
    /// the buffer is empty and the result is how many commits were written (schema
    /// changes and data).
    async fn flush(
        &mut self,
        settings: &LakeSettings,
        open: Option<Lsn>,
        #[cfg(test)] crash: Option<CrashPoint>,
    ) -> Result<u64, LakeError> {
        if self.delta.is_none() {
            self.open(settings).await?;
        }
        self.check_owner()?;
        let skipped = self.skip_committed();
        if skipped > 0 {
            tracing::info!(
                sink = %settings.name,
                table = %self.name,
                skipped,
                through = %Lsn(self.committed.unwrap_or_default() as u64),
                "skipping rows the lake already holds"
            );
        }
        if !self.has_work(open) {
            self.clear();
            return Ok(0);
        }
        let mut commits = 0;
        let name = self.name.clone();
        let name = name.as_str();
        let mut table = self.delta.take().expect("opened above");

        // The schema: create the table, or add the columns it lacks. Staged rows count:
        // their column tags are committed with them.
        let shapes: Vec<&Segment> = self
            .pending
            .iter()
            .chain(self.staged.iter().flat_map(|s| s.shapes.iter()))
            .collect();
        let existing = table.snapshot().ok().map(|s| s.schema());
        let mut plan =
            plan_schema(existing.as_deref(), &shapes).map_err(LakeError::convert(name))?;
        if existing.is_none() {
            table = table
                .create()
                .with_columns(plan.fields.clone())
                .with_table_name(name)
                .with_save_mode(SaveMode::Ignore)
                .with_commit_properties(
                    CommitProperties::default().with_metadata(self.static_info(settings)),
                )
                .await
                .map_err(LakeError::delta(name, "creating the table"))?;
            commits += 1;
            tracing::info!(sink = %settings.name, table = %name, url = %self.url, "created lake table");
            let schema = table
                .snapshot()
                .map_err(LakeError::delta(name, "creating the table"))?
                .schema();
            plan = plan_schema(Some(schema.as_ref()), &shapes).map_err(LakeError::convert(name))?;
        }
        if !plan.added.is_empty() {
            let added: Vec<String> = plan.added.iter().map(|f| f.name().clone()).collect();
            table = table
                .add_columns()
                .with_fields(plan.added.clone())
                .with_commit_properties(
                    CommitProperties::default().with_metadata(self.static_info(settings)),
                )
                .await
                .map_err(LakeError::delta(name, "adding columns"))?;
            commits += 1;
            tracing::info!(sink = %settings.name, table = %name, columns = ?added, "added lake columns");
            let schema = table
                .snapshot()
                .map_err(LakeError::delta(name, "adding columns"))?
                .schema();
            plan = plan_schema(Some(schema.as_ref()), &shapes).map_err(LakeError::convert(name))?;
        }

        // Rows of the open transaction: staged, not committed. (On an error the
        // caller drops the loaded table, so the next attempt reloads it.)
        if let Some(open) = open {
            let (staged, rest) = split_segments(&self.pending, open);
            if !staged.is_empty() {
                let (adds, rows) =
                    write_files(settings, name, &mut self.warned, &table, &staged).await?;
                tracing::debug!(
                    sink = %settings.name,
                    table = %name,
                    rows,
                    files = adds.len(),
                    commit_lsn = %open,
                    "staged rows of a large transaction until its commit"
                );
                let mut shapes: Vec<Segment> = Vec::new();
                for segment in &staged {
                    if !shapes.iter().any(|s| same_shape(s, segment)) {
                        shapes.push(shape(segment));
                    }
                }
                self.staged.push(Staged {
                    commit_lsn: open,
                    adds,
                    rows,
                    shapes,
                });
                self.pending = rest;
                self.recount();
            }
        }
        let completed: Vec<&Staged> = self
            .staged
            .iter()
            .filter(|s| Some(s.commit_lsn) != open)
            .collect();
        if self.pending.is_empty() && completed.is_empty() {
            self.delta = Some(table);
            return Ok(commits);
        }

        let mut actions = Vec::new();
        if plan.tags_grew {
            let schema = struct_type(plan.fields).map_err(LakeError::convert(name))?;
            let metadata = table
                .snapshot()
                .map_err(LakeError::delta(name, "updating column tags"))?
                .metadata()
                .clone()
                .with_schema(&schema)
                .map_err(DeltaTableError::from)
                .map_err(LakeError::delta(name, "updating column tags"))?;
            actions.push(Action::Metadata(metadata));
        }

        // The files: the pending rows', and those staged for transactions now complete.
        let (adds, rows) = if self.pending.is_empty() {
            (Vec::new(), 0)
        } else {
            write_files(settings, name, &mut self.warned, &table, &self.pending).await?
        };
        let staged_rows: usize = completed.iter().map(|s| s.rows).sum();
        actions.extend(adds.into_iter().map(Action::Add));
        actions.extend(
            completed
                .iter()
                .flat_map(|s| s.adds.iter().cloned())
                .map(Action::Add),
        );
        #[cfg(test)]
        if crash == Some(CrashPoint::BeforeCommit) {
            return Err(LakeError::Crash(
                "after the Parquet upload, before the commit",
            ));
        }

        // The commit.
        let (first, last) = self.commit_lsn_range(open);
        let rows = rows + staged_rows;
        let mut info = self.static_info(settings);
        info.insert(
            "airlock.lsn_range".into(),
            serde_json::json!([first.to_string(), last.to_string()]),
        );
        let (pipeline, stages) = self.lineage(open);
        info.insert("airlock.pipeline".into(), pipeline);
        info.insert("airlock.stages".into(), stages);
        info.insert("airlock.rows".into(), rows.into());
        let version = last.0 as i64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let properties = CommitProperties::default()
            .with_application_transaction(Transaction::new_with_last_update(
                &settings.app_id,
                version,
                Some(now),
            ))
            .with_metadata(info);
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        let state = table
            .snapshot()
            .map_err(LakeError::delta(name, "committing"))?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(state), table.log_store(), operation)
            .await
            .map_err(LakeError::delta(name, "committing"))?;
        tracing::debug!(
            sink = %settings.name,
            table = %name,
            version = finalized.version(),
            rows,
            first = %first,
            last = %last,
            "committed to the lake"
        );
        table.state = Some(finalized.snapshot());
        self.delta = Some(table);
        self.committed = Some(version);
        #[cfg(test)]
        if crash == Some(CrashPoint::AfterCommit) {
            return Err(LakeError::Crash(
                "after the commit, before the flush returned",
            ));
        }
        self.staged.retain(|s| Some(s.commit_lsn) == open);
        self.clear();
        Ok(commits + 1)
    }

    /// Whether a flush has anything to do: rows pending, or staged files of a
    /// transaction that is no longer `open` (its last part arrived).
    fn has_work(&self, open: Option<Lsn>) -> bool {
        !self.pending.is_empty() || self.staged.iter().any(|s| Some(s.commit_lsn) != open)
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.rows = 0;
        self.bytes = 0;
    }

    /// Recounts the pending rows and bytes.
    fn recount(&mut self) {
        self.rows = self.pending.iter().map(|s| s.rows.len()).sum();
        self.bytes = self
            .pending
            .iter()
            .flat_map(|s| s.rows.iter().map(|&r| row_bytes(s.row(r))))
            .sum();
    }

    /// Smallest and largest commit LSN of what the next commit holds: the pending rows'
    /// transactions and the staged ones not `open`.
    fn commit_lsn_range(&self, open: Option<Lsn>) -> (Lsn, Lsn) {
        let mut range: Option<(Lsn, Lsn)> = None;
        let mut widen = |lsn: Lsn| {
            range = Some(range.map_or((lsn, lsn), |(lo, hi)| (lo.min(lsn), hi.max(lsn))));
        };
        for segment in &self.pending {
            for &r in &segment.rows {
                widen(segment.txn(segment.row(r)).commit_lsn);
            }
        }
        for staged in &self.staged {
            if Some(staged.commit_lsn) != open {
                widen(staged.commit_lsn);
            }
        }
        range.unwrap_or_default()
    }

    /// The lineage of what the next commit holds: the pipeline version (a string, or
    /// an array when a reload happened between rows) and the stages of each version
    /// with their content hashes.
    fn lineage(&self, open: Option<Lsn>) -> (serde_json::Value, serde_json::Value) {
        let mut seen: Vec<&Batch> = Vec::new();
        let staged = self
            .staged
            .iter()
            .filter(|s| Some(s.commit_lsn) != open)
            .flat_map(|s| s.shapes.iter());
        for segment in staged.chain(&self.pending) {
            if !seen.iter().any(|b| b.pipeline == segment.batch.pipeline) {
                seen.push(&segment.batch);
            }
        }
        let pipeline = match seen.as_slice() {
            [one] => (*one.pipeline).into(),
            many => many
                .iter()
                .map(|b| serde_json::Value::from(&*b.pipeline))
                .collect(),
        };
        let stages: serde_json::Map<String, serde_json::Value> = seen
            .iter()
            .map(|b| {
                let stages = serde_json::to_value(&*b.stages).unwrap_or_default();
                (b.pipeline.to_string(), stages)
            })
            .collect();
        (pipeline, serde_json::Value::Object(stages))
    }

    fn static_info(&self, settings: &LakeSettings) -> HashMap<String, serde_json::Value> {
        let mut info: HashMap<String, serde_json::Value> = settings
            .commit_info
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        info.insert("airlock.sink".into(), settings.name.clone().into());
        info.insert("airlock.table".into(), self.name.clone().into());
        info
    }
}

/// The single writer of one lake sink: every flush and every compaction runs on it,
/// one at a time (it lives behind the sink's mutex).
struct Writer {
    settings: LakeSettings,
    /// Tables by directory ([`naming::table_dir`]), flushed in that order. Not by
    /// `schema.table`: (`a.b`, `c`) and (`a`, `b.c`) are two tables.
    tables: BTreeMap<String, LakeTable>,
    rows: usize,
    bytes: usize,
    /// End LSN of the last accepted batch not yet covered by a successful flush.
    accepted_end: Option<Lsn>,
    /// Commit LSN of the transaction whose parts are arriving, before its last part.
    open: Option<Lsn>,
    lock: CompactLock,
    #[cfg(test)]
    crash: Option<CrashPoint>,
}

impl Writer {
    /// The table in directory `dir`, added when new. `source` names the relation it is
    /// for: its display name and its unquoted `schema.table`; `None` for a directory
    /// found by listing the root.
    fn table(&mut self, dir: &str, source: Option<(String, String)>) -> &mut LakeTable {
        if !self.tables.contains_key(dir) {
            let url = table_url(&self.settings.url, dir);
            let name = dir.to_owned();
            self.tables.insert(
                dir.to_owned(),
                LakeTable::new(name, None, dir.to_owned(), url),
            );
        }
        let table = self.tables.get_mut(dir).expect("inserted above");
        if let Some((name, legacy)) = source
            && table.legacy_name.is_none()
        {
            table.name = name;
            table.legacy_name = Some(legacy);
        }
        table
    }

    fn accept(&mut self, batch: Arc<Batch>) -> bool {
        if let Some(end) = batch.end_lsn() {
            self.accepted_end = Some(self.accepted_end.map_or(end, |e| e.max(end)));
        }
        self.open = batch
            .txns
            .last()
            .filter(|t| !t.completes())
            .map(|t| t.commit_lsn);
        let mut kept = false;
        for (t, table) in batch.tables.iter().enumerate() {
            let mut bytes = 0;
            let rows: Vec<u32> = table
                .rows
                .iter()
                .copied()
                .filter(|&r| {
                    let row = &batch.rows[r as usize];
                    let keep = !row.dropped && row.has_route_in(&self.settings.routes);
                    if keep {
                        bytes += row_bytes(row);
                    }
                    keep
                })
                .collect();
            if rows.is_empty() {
                continue;
            }
            kept = true;
            let relation = &table.relation;
            let dir = naming::table_dir(&relation.schema, &relation.name);
            self.rows += rows.len();
            self.bytes += bytes;
            let named = self
                .tables
                .get(&dir)
                .is_some_and(|t| t.legacy_name.is_some());
            let source = (!named).then(|| {
                let name = naming::display_name(&relation.schema, &relation.name);
                (name, relation.qualified_name())
            });
            let entry = self.table(&dir, source);
            entry.rows += rows.len();
            entry.bytes += bytes;
            entry.pending.push(Segment {
                batch: batch.clone(),
                table: t as u32,
                rows,
            });
        }
        kept
    }

    fn due(&self) -> bool {
        self.rows >= self.settings.max_rows || self.bytes >= self.settings.max_bytes
    }

    /// Whether some table holds staged files of a transaction not committed yet.
    fn holds_open(&self) -> bool {
        self.tables.values().any(|t| !t.staged.is_empty())
    }

    async fn flush(&mut self) -> Result<Option<Lsn>, SinkError> {
        let settings = &self.settings;
        let open = self.open;
        let mut committed = Vec::new();
        let mut failed = None;
        for table in self.tables.values_mut() {
            if !table.has_work(open) {
                continue;
            }
            let result = table
                .flush(
                    settings,
                    open,
                    #[cfg(test)]
                    self.crash,
                )
                .await;
            match result {
                Ok(commits) => committed.push((table.dir.clone(), commits)),
                Err(error) => {
                    // The commit may have landed anyway: reload before the next attempt.
                    table.delta = None;
                    failed = Some(error.into_sink_error(&settings.name));
                    break;
                }
            }
        }
        self.rows = self.tables.values().map(|t| t.rows).sum();
        self.bytes = self.tables.values().map(|t| t.bytes).sum();
        if let Some(error) = failed {
            return Err(error);
        }
        // The data is durable; maintenance never fails the flush.
        for (dir, commits) in committed {
            if commits > 0
                && let Some(table) = self.tables.get_mut(&dir)
            {
                table.after_commit(settings, &self.lock, commits).await;
            }
        }
        Ok(self.accepted_end.take())
    }

    /// The table holding the latest commit this sink made for its application id
    /// (in any earlier run), and that commit's LSN; `None` for a lake without one.
    async fn held_through(&mut self) -> Result<Option<(String, Lsn)>, SinkError> {
        let sink = self.settings.name.clone();
        let dirs = catalog::list_tables(&self.settings)
            .await
            .map_err(|e| e.into_sink_error(&sink))?;
        let mut held: Option<(String, Lsn)> = None;
        for dir in dirs {
            self.table(&dir, None);
            let table = self.tables.get_mut(&dir).expect("inserted above");
            if table.delta.is_none() {
                table
                    .open(&self.settings)
                    .await
                    .map_err(|e| e.into_sink_error(&sink))?;
            }
            if let Some(version) = table.committed {
                let lsn = Lsn(version as u64);
                if held.as_ref().is_none_or(|(_, through)| lsn > *through) {
                    held = Some((table.name.clone(), lsn));
                }
            }
        }
        Ok(held)
    }

    /// Compacts every table of the sink, those on storage included, now.
    async fn compact_all(&mut self) -> Result<Vec<CompactReport>, SinkError> {
        let sink = self.settings.name.clone();
        let dirs = catalog::list_tables(&self.settings)
            .await
            .map_err(|e| e.into_sink_error(&sink))?;
        for dir in &dirs {
            self.table(dir, None);
        }
        let mut reports = Vec::new();
        for table in self.tables.values_mut() {
            let report = table
                .compact(&self.settings, &self.lock, Trigger::Requested)
                .await;
            let report = match report {
                Ok(report) => report,
                Err(error) => {
                    table.delta = None;
                    return Err(error.into_sink_error(&sink));
                }
            };
            table
                .checkpoint_if_due(&self.settings)
                .await
                .map_err(|e| e.into_sink_error(&sink))?;
            if let Err(error) = table.vacuum(&self.settings).await {
                table.delta = None;
                return Err(error.into_sink_error(&sink));
            }
            table.last_vacuum = Some(Instant::now());
            reports.push(report);
        }
        Ok(reports)
    }
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

static REGISTER_S3: Once = Once::new();

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
            REGISTER_S3.call_once(|| deltalake::aws::register_handlers(None));
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

/// A handle on the Delta table at `location` (not loaded yet), for table `name`.
fn table_handle(
    location: &str,
    name: &str,
    settings: &LakeSettings,
) -> Result<DeltaTable, LakeError> {
    let url = deltalake::ensure_table_uri(location)
        .map_err(LakeError::delta(name, "resolving the table location"))?;
    DeltaTableBuilder::from_url(url)
        .and_then(|b| b.with_storage_options(settings.store_options()).build())
        .map_err(LakeError::delta(name, "opening the table"))
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

/// `airlock compact` with no host running: compacts every table of every `delta` sink
/// of `config` under each sink's compaction lock (an error when it is held).
pub async fn compact_offline(
    config: &crate::config::Config,
) -> Result<Vec<CompactReport>, SinkError> {
    let mut reports = Vec::new();
    for sink in &config.sinks {
        if sink.kind != crate::config::SinkKind::Delta {
            continue;
        }
        let lake = LakeSink::open(LakeSettings::from_config(config, sink)).await?;
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
