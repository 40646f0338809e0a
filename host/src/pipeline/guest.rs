//! The host side of the `airlock:transform` contract: bindings, the `batch` resource,
//! and the guest's `log` import.
//!
//! ```text
//! Stage::process ──push GuestBatch──▶ ResourceTable ──borrow<batch>──▶ guest `process`
//!        ▲                                                               │ get/set/read-column/...
//!        └──────── delete GuestBatch (commit or undo) ◀──────────────────┘
//! ```
//!
//! Invariants:
//! - Every write a guest makes records how to undo it (old values are moved into the
//!   undo log, not cloned). A failed call is rolled back before the batch is retried
//!   or dead-lettered, so a stage either applies all of its edits or none.
//! - Out-of-range indexes and writes past the output cap trap the guest.

use std::sync::Arc;

use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::batch::{self as host, BatchRow, BatchTable};
use super::output::RateLimitedLog;
use crate::change::{self, Op};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "transform",
    imports: { default: trappable },
    with: { "airlock:transform/types.batch": GuestBatch },
});

pub use self::airlock::transform::types as wit;

pub mod borrowed;

/// The log level of a guest's line.
pub fn tracing_level(level: wit::Level) -> tracing::Level {
    match level {
        wit::Level::Trace => tracing::Level::TRACE,
        wit::Level::Debug => tracing::Level::DEBUG,
        wit::Level::Info => tracing::Level::INFO,
        wit::Level::Warn => tracing::Level::WARN,
        wit::Level::Error => tracing::Level::ERROR,
    }
}

/// The contract version this host speaks (the WIT package version).
pub const CONTRACT_VERSION: &str = "0.1.1";
/// The WIT package name guests import.
pub const CONTRACT_PACKAGE: &str = "airlock:transform";

/// What every edit costs against the output cap besides the bytes it writes: its
/// entry in the undo log.
const EDIT_BYTES: usize = std::mem::size_of::<Undo>();

/// How to take back one guest write.
#[derive(Debug)]
enum Undo {
    Value {
        row: u32,
        column: u32,
        old_image: bool,
        value: change::Value,
    },
    Dropped {
        row: u32,
    },
    Routes {
        row: u32,
        len: usize,
    },
    RowTags {
        row: u32,
        len: usize,
    },
    ColumnTags {
        table: u32,
        column: u32,
        len: usize,
    },
    Annotations {
        row: u32,
        annotations: Vec<(String, String)>,
    },
}

/// A batch lent to one guest call, with the undo log and the output cap.
pub struct GuestBatch {
    pub batch: host::Batch,
    undo: Vec<Undo>,
    /// Bytes the guest wrote in this call.
    written: usize,
    /// How many bytes the guest may write in this call.
    cap: usize,
}

/// What one committed guest call changed in a batch: enough to undo it.
#[derive(Debug, Default)]
pub struct Edits {
    /// Oldest first.
    undo: Vec<Undo>,
    /// Bytes the call added to `written_bytes`.
    written: usize,
}

impl Edits {
    /// Every value the call wrote, as `(row, column, old image)`.
    pub fn values(&self) -> impl Iterator<Item = (u32, u32, bool)> + '_ {
        self.undo.iter().filter_map(|u| match u {
            Undo::Value {
                row,
                column,
                old_image,
                ..
            } => Some((*row, *column, *old_image)),
            _ => None,
        })
    }

    /// Edits that wrote these values (their undo is a no-op), for tests.
    #[cfg(test)]
    pub fn written(values: impl IntoIterator<Item = (u32, u32, bool)>) -> Edits {
        Edits {
            undo: values
                .into_iter()
                .map(|(row, column, old_image)| Undo::Value {
                    row,
                    column,
                    old_image,
                    value: change::Value::Null,
                })
                .collect(),
            written: 0,
        }
    }

    /// The same edits, made on a batch whose row `i` is row `rows[i]` and table `i`
    /// table `tables[i]` of another (a stage's lent rows under `when`).
    pub fn renumber(mut self, rows: &[u32], tables: &[u32]) -> Edits {
        for undo in &mut self.undo {
            match undo {
                Undo::Value { row, .. }
                | Undo::Dropped { row }
                | Undo::Routes { row, .. }
                | Undo::RowTags { row, .. }
                | Undo::Annotations { row, .. } => *row = rows[*row as usize],
                Undo::ColumnTags { table, .. } => *table = tables[*table as usize],
            }
        }
        self
    }

    /// Takes the call's edits back out of `batch`, newest first. `batch` must be the
    /// batch the call left, with every later call's edits already undone.
    pub fn undo(self, batch: &mut host::Batch) {
        batch.written_bytes -= self.written;
        for undo in self.undo.into_iter().rev() {
            match undo {
                Undo::Value {
                    row,
                    column,
                    old_image,
                    value,
                } => {
                    let change = &mut batch.rows[row as usize].change;
                    let image = if old_image {
                        &mut change.old
                    } else {
                        &mut change.new
                    };
                    if let Some(values) = image {
                        values[column as usize] = value;
                    }
                }
                Undo::Dropped { row } => batch.rows[row as usize].dropped = false,
                Undo::Routes { row, len } => batch.rows[row as usize].routes.truncate(len),
                Undo::RowTags { row, len } => batch.rows[row as usize].tags.truncate(len),
                Undo::ColumnTags { table, column, len } => {
                    batch.tables[table as usize].column_tags[column as usize].truncate(len)
                }
                Undo::Annotations { row, annotations } => {
                    batch.rows[row as usize].annotations = annotations
                }
            }
        }
    }
}

impl GuestBatch {
    pub fn new(batch: host::Batch, cap: usize) -> GuestBatch {
        GuestBatch {
            batch,
            undo: Vec::new(),
            written: 0,
            cap,
        }
    }

    /// Keeps the guest's edits, and returns with them what undoes them: the
    /// pipeline takes a whole batch back to its input when a later stage fails.
    pub fn commit(mut self) -> (host::Batch, Edits) {
        self.batch.written_bytes += self.written;
        let edits = Edits {
            undo: self.undo,
            written: self.written,
        };
        (self.batch, edits)
    }

    /// Takes back every edit of the call, newest first.
    pub fn rollback(mut self) -> host::Batch {
        Edits {
            undo: std::mem::take(&mut self.undo),
            written: 0,
        }
        .undo(&mut self.batch);
        self.batch
    }

    fn charge(&mut self, bytes: usize) -> wasmtime::Result<()> {
        self.written += bytes;
        self.ensure_room(0)
    }

    /// Fails as [`GuestBatch::charge`] would if `bytes` more were written now.
    fn ensure_room(&self, bytes: usize) -> wasmtime::Result<()> {
        if self.written.saturating_add(bytes) > self.cap {
            wasmtime::bail!(
                "guest wrote more than its output cap of {} bytes into one batch \
                 (raise [plugins.limits] output_bytes if this is expected)",
                self.cap
            );
        }
        Ok(())
    }

    fn row(&self, row: u32) -> wasmtime::Result<&BatchRow> {
        self.batch.rows.get(row as usize).ok_or_else(|| {
            wasmtime::format_err!(
                "row index {row} out of range: the batch has {} rows",
                self.batch.rows.len()
            )
        })
    }

    fn check_column(&self, row: u32, column: u32) -> wasmtime::Result<()> {
        let r = self.row(row)?;
        let columns = self.batch.tables[r.table as usize].relation.columns.len();
        if column as usize >= columns {
            wasmtime::bail!(
                "column index {column} out of range: row {row}'s table has {columns} columns"
            );
        }
        Ok(())
    }

    fn table(&self, table: u32) -> wasmtime::Result<&BatchTable> {
        self.batch.tables.get(table as usize).ok_or_else(|| {
            wasmtime::format_err!(
                "table index {table} out of range: the batch has {} tables",
                self.batch.tables.len()
            )
        })
    }

    fn check_table_column(&self, table: u32, column: u32) -> wasmtime::Result<()> {
        let columns = self.table(table)?.relation.columns.len();
        if column as usize >= columns {
            wasmtime::bail!(
                "column index {column} out of range: table {table} has {columns} columns"
            );
        }
        Ok(())
    }

    /// Checks every row index of a bulk call before it writes anything.
    fn check_rows(&self, rows: &[u32]) -> wasmtime::Result<()> {
        match rows.iter().find(|&&r| r as usize >= self.batch.rows.len()) {
            Some(&row) => self.row(row).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The rows of `table` that carry `tag` or one of its sub-tags (`tag:…`).
    fn rows_tagged(&self, table: u32, tag: &str) -> wasmtime::Result<Vec<u32>> {
        let tagged = |t: &String| {
            t.strip_prefix(tag)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
        };
        Ok(self
            .table(table)?
            .rows
            .iter()
            .copied()
            .filter(|&row| self.batch.rows[row as usize].tags.iter().any(tagged))
            .collect())
    }

    fn drop_row(&mut self, row: u32) -> wasmtime::Result<()> {
        let r = &mut self.batch.rows[row as usize];
        if !r.dropped {
            r.dropped = true;
            self.undo.push(Undo::Dropped { row });
            self.charge(EDIT_BYTES)?;
        }
        Ok(())
    }

    /// Adds a route the caller has checked against the declared names.
    fn add_route(&mut self, row: u32, route: &str) -> wasmtime::Result<()> {
        if self.batch.rows[row as usize]
            .routes
            .iter()
            .any(|r| r == route)
        {
            return Ok(());
        }
        self.charge(route.len() + EDIT_BYTES)?;
        let routes = &mut self.batch.rows[row as usize].routes;
        self.undo.push(Undo::Routes {
            row,
            len: routes.len(),
        });
        routes.push(route.to_owned());
        Ok(())
    }

    /// Adds a tag the caller has checked against the declared names.
    fn tag_row(&mut self, row: u32, tag: &str) -> wasmtime::Result<()> {
        if self.batch.rows[row as usize].tags.iter().any(|t| t == tag) {
            return Ok(());
        }
        self.charge(tag.len() + EDIT_BYTES)?;
        let tags = &mut self.batch.rows[row as usize].tags;
        self.undo.push(Undo::RowTags {
            row,
            len: tags.len(),
        });
        tags.push(tag.to_owned());
        Ok(())
    }

    fn annotate(&mut self, row: u32, key: &str, value: &str) -> wasmtime::Result<()> {
        // The undo log keeps a copy of the row's annotations: it is charged too, so
        // repeated (even empty) annotations cannot grow host memory past the cap.
        let kept: usize = self.batch.rows[row as usize]
            .annotations
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2 * std::mem::size_of::<String>())
            .sum();
        self.charge(key.len() + value.len() + kept + EDIT_BYTES)?;
        let annotations = &mut self.batch.rows[row as usize].annotations;
        self.undo.push(Undo::Annotations {
            row,
            annotations: annotations.clone(),
        });
        annotations.retain(|(k, _)| k != key);
        annotations.push((key.to_owned(), value.to_owned()));
        Ok(())
    }

    /// Runs `f` over the rows of `table` (in `rows-of` order) with mutable access to
    /// the batch, after checking the table and column indexes.
    fn each_row_of(
        &mut self,
        table: u32,
        column: u32,
        mut f: impl FnMut(&mut GuestBatch, usize, u32) -> wasmtime::Result<()>,
    ) -> wasmtime::Result<()> {
        self.check_table_column(table, column)?;
        let rows = std::mem::take(&mut self.batch.tables[table as usize].rows);
        let result = rows
            .iter()
            .enumerate()
            .try_for_each(|(i, &row)| f(self, i, row));
        self.batch.tables[table as usize].rows = rows;
        result
    }

    /// The column's type, for the typed bulk calls: fails unless it is one of `kinds`.
    fn typed_column(
        &self,
        call: &str,
        table: u32,
        column: u32,
        kinds: &[Typed],
    ) -> wasmtime::Result<Typed> {
        self.check_table_column(table, column)?;
        let c = &self.batch.tables[table as usize].relation.columns[column as usize];
        match Typed::of(c.type_oid) {
            Some(t) if kinds.contains(&t) => Ok(t),
            _ => wasmtime::bail!(
                "{call}: column {column} (`{}`, {}) of table {table} is not of a type it takes \
                 (see the contract); read it with read-text-column",
                c.name,
                type_name(c.type_oid)
            ),
        }
    }

    /// A typed column write (`write-ints`, ...): a clear bit writes `null`, a set bit
    /// what `value` makes of the entry, given the column's type and the entry's index.
    #[allow(clippy::too_many_arguments)]
    fn write_typed<T: Copy>(
        &mut self,
        call: &str,
        table: u32,
        column: u32,
        image: wit::Image,
        types: &[Typed],
        valid: &[u8],
        values: &[T],
        value: impl Fn(Typed, usize, T) -> wasmtime::Result<change::Value>,
    ) -> wasmtime::Result<()> {
        let typed = self.typed_column(call, table, column, types)?;
        self.check_entries(call, table, valid.len(), values.len())?;
        self.each_row_of(table, column, |gb, i, row| {
            let v = if bit(valid, i) {
                value(typed, i, values[i])?
            } else {
                change::Value::Null
            };
            gb.put(row, column, image, v)
        })
    }

    /// Checks that a typed column write has one entry per row of the table.
    fn check_entries(
        &self,
        call: &str,
        table: u32,
        valid: usize,
        values: usize,
    ) -> wasmtime::Result<()> {
        let rows = self.table(table)?.rows.len();
        if values != rows || valid != rows.div_ceil(8) {
            wasmtime::bail!(
                "{call} got {values} values and {valid} bitmap bytes for table {table}, which has {rows} rows \
                 in this batch (expected {rows} values and {} bitmap bytes)",
                rows.div_ceil(8)
            );
        }
        Ok(())
    }

    /// Replaces one value, recording the old one. Writing to a missing image is ignored.
    fn put(
        &mut self,
        row: u32,
        column: u32,
        image: wit::Image,
        value: change::Value,
    ) -> wasmtime::Result<()> {
        self.charge(value.heap_size() + EDIT_BYTES)?;
        let old_image = matches!(image, wit::Image::Old);
        let change = &mut self.batch.rows[row as usize].change;
        let values = if old_image {
            &mut change.old
        } else {
            &mut change.new
        };
        if let Some(values) = values {
            let previous = std::mem::replace(&mut values[column as usize], value);
            self.undo.push(Undo::Value {
                row,
                column,
                old_image,
                value: previous,
            });
        }
        Ok(())
    }
}

/// The column types the typed bulk calls (`read-ints`, `write-floats`, ...) take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Typed {
    Int2,
    Int4,
    Int8,
    Oid,
    Date,
    Time,
    Timestamp,
    Timestamptz,
    Float4,
    Float8,
    Bool,
}

const INTS: &[Typed] = &[
    Typed::Int2,
    Typed::Int4,
    Typed::Int8,
    Typed::Oid,
    Typed::Date,
    Typed::Time,
    Typed::Timestamp,
    Typed::Timestamptz,
];
const FLOATS: &[Typed] = &[Typed::Float4, Typed::Float8];
const BOOLS: &[Typed] = &[Typed::Bool];

impl Typed {
    fn of(oid: u32) -> Option<Typed> {
        use change::oid::*;
        Some(match oid {
            INT2 => Typed::Int2,
            INT4 => Typed::Int4,
            INT8 => Typed::Int8,
            OID => Typed::Oid,
            DATE => Typed::Date,
            TIME => Typed::Time,
            TIMESTAMP => Typed::Timestamp,
            TIMESTAMPTZ => Typed::Timestamptz,
            FLOAT4 => Typed::Float4,
            FLOAT8 => Typed::Float8,
            BOOL => Typed::Bool,
            _ => return None,
        })
    }

    /// The value an integer entry stands for in a column of this type.
    fn int_value(self, v: i64) -> Option<change::Value> {
        use change::Value as V;
        Some(match self {
            Typed::Int2 => V::Int(i16::try_from(v).ok()?.into()),
            Typed::Int4 => V::Int(i32::try_from(v).ok()?.into()),
            Typed::Oid => V::Int(u32::try_from(v).ok()?.into()),
            Typed::Int8 => V::Int(v),
            Typed::Date => V::Date(i32::try_from(v).ok()?),
            Typed::Time => V::Time(v),
            Typed::Timestamp => V::Timestamp(v),
            Typed::Timestamptz => V::Timestamptz(v),
            Typed::Float4 | Typed::Float8 | Typed::Bool => return None,
        })
    }
}

/// The integer an integer-typed value holds.
fn int_of(value: &change::Value) -> Option<i64> {
    use change::Value as V;
    match value {
        V::Int(i) | V::Time(i) | V::Timestamp(i) | V::Timestamptz(i) => Some(*i),
        V::Date(d) => Some((*d).into()),
        _ => None,
    }
}

/// Whether bit `i` of a null bitmap is set.
fn bit(valid: &[u8], i: usize) -> bool {
    valid[i / 8] & (1 << (i % 8)) != 0
}

/// Reads one typed column into a null bitmap and values (`T::default()` where clear).
fn read_typed<T: Default + Copy>(
    gb: &GuestBatch,
    table: u32,
    column: u32,
    image: wit::Image,
    get: impl Fn(&change::Value) -> Option<T>,
) -> (Vec<u8>, Vec<T>) {
    let rows = &gb.batch.tables[table as usize].rows;
    let mut valid = vec![0u8; rows.len().div_ceil(8)];
    let mut values = Vec::with_capacity(rows.len());
    for (i, &row) in rows.iter().enumerate() {
        let change = &gb.batch.rows[row as usize].change;
        match image_of(change, image).and_then(|v| get(&v[column as usize])) {
            Some(value) => {
                valid[i / 8] |= 1 << (i % 8);
                values.push(value);
            }
            None => values.push(T::default()),
        }
    }
    (valid, values)
}

/// What each guest store holds: the sandboxed WASI context, the resource table, the
/// limits and the guest's log.
pub struct GuestState {
    pub wasi: WasiCtx,
    /// The guest's monotonic clock, shared with `wasi` (see [`super::clocks`]).
    pub clock: super::clocks::SharedClock,
    pub table: ResourceTable,
    pub limits: super::limiter::GuestLimiter,
    pub log: Arc<RateLimitedLog>,
    /// The route and tag names this guest may write.
    pub names: Arc<super::names::Names>,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl TransformImports for GuestState {
    fn log(&mut self, level: wit::Level, message: String) -> wasmtime::Result<()> {
        self.log.line(tracing_level(level), &message);
        Ok(())
    }
}

impl wit::Host for GuestState {}

/// Converts a host value to its contract form (clones text: it is copied into guest memory).
pub fn to_wit(value: &change::Value) -> wit::Value {
    use change::Value as V;
    match value {
        V::Null => wit::Value::Null,
        V::UnchangedToast => wit::Value::UnchangedToast,
        V::Bool(b) => wit::Value::Boolean(*b),
        V::Int(i) => wit::Value::Int(*i),
        V::Float(f) => wit::Value::Float(*f),
        V::Numeric(s) => wit::Value::Numeric(s.clone()),
        V::Text(s) => wit::Value::Text(s.clone()),
        V::Bytes(b) => wit::Value::Bytes(b.clone()),
        V::Date(d) => wit::Value::Date(*d),
        V::Time(t) => wit::Value::Time(*t),
        V::Timestamp(t) => wit::Value::Timestamp(*t),
        V::Timestamptz(t) => wit::Value::Timestamptz(*t),
        V::Uuid(u) => {
            let n = u128::from_be_bytes(*u);
            wit::Value::Uuid(((n >> 64) as u64, n as u64))
        }
        V::Json(s) => wit::Value::Json(s.clone()),
        V::Other(s) => wit::Value::Other(s.clone()),
    }
}

/// Converts a contract value back to the host form (moves text, no copy).
pub fn from_wit(value: wit::Value) -> change::Value {
    use change::Value as V;
    match value {
        wit::Value::Null => V::Null,
        wit::Value::UnchangedToast => V::UnchangedToast,
        wit::Value::Boolean(b) => V::Bool(b),
        wit::Value::Int(i) => V::Int(i),
        wit::Value::Float(f) => V::Float(f),
        wit::Value::Numeric(s) => V::Numeric(s),
        wit::Value::Text(s) => V::Text(s),
        wit::Value::Bytes(b) => V::Bytes(b),
        wit::Value::Date(d) => V::Date(d),
        wit::Value::Time(t) => V::Time(t),
        wit::Value::Timestamp(t) => V::Timestamp(t),
        wit::Value::Timestamptz(t) => V::Timestamptz(t),
        wit::Value::Uuid((hi, lo)) => {
            V::Uuid(((u128::from(hi) << 64) | u128::from(lo)).to_be_bytes())
        }
        wit::Value::Json(s) => V::Json(s),
        wit::Value::Other(s) => V::Other(s),
    }
}

fn wit_op(op: Op) -> wit::Op {
    match op {
        Op::Insert => wit::Op::Insert,
        Op::Update => wit::Op::Update,
        Op::Delete => wit::Op::Delete,
        Op::Read => wit::Op::Snapshot,
        Op::Truncate => wit::Op::Truncate,
    }
}

/// PostgreSQL's name for a built-in type, for guests that want to know.
pub fn type_name(oid: u32) -> &'static str {
    use change::oid::*;
    match oid {
        BOOL => "bool",
        BYTEA => "bytea",
        CHAR => "char",
        NAME => "name",
        INT8 => "int8",
        INT2 => "int2",
        INT4 => "int4",
        TEXT => "text",
        OID => "oid",
        JSON => "json",
        XML => "xml",
        FLOAT4 => "float4",
        FLOAT8 => "float8",
        MONEY => "money",
        BPCHAR => "bpchar",
        VARCHAR => "varchar",
        DATE => "date",
        TIME => "time",
        TIMESTAMP => "timestamp",
        TIMESTAMPTZ => "timestamptz",
        INTERVAL => "interval",
        TIMETZ => "timetz",
        NUMERIC => "numeric",
        UUID => "uuid",
        JSONB => "jsonb",
        _ => "other",
    }
}

fn image_of(change: &change::Change, image: wit::Image) -> Option<&Vec<change::Value>> {
    match image {
        wit::Image::New => change.new.as_ref(),
        wit::Image::Old => change.old.as_ref(),
    }
}

impl GuestState {
    /// Writes a packed column (`write-text-column`, `write-bytes-column`): kind 0 is
    /// `null`, 1 `unchanged-toast`, 2 the value `value` makes of the entry's bytes.
    #[allow(clippy::too_many_arguments)]
    fn write_packed(
        &mut self,
        call: &str,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
        values: wit::TextColumn,
        value: impl Fn(&[u8], usize) -> wasmtime::Result<change::Value>,
    ) -> wasmtime::Result<()> {
        let gb = self.table.get_mut(&b)?;
        gb.check_table_column(table, column)?;
        let wit::TextColumn {
            kinds,
            data,
            offsets,
        } = values;
        let rows = gb.batch.tables[table as usize].rows.len();
        if kinds.len() != rows || offsets.len() != rows + 1 {
            wasmtime::bail!(
                "{call} got {} kinds and {} offsets for table {table}, which has {rows} rows in this batch \
                 (expected {rows} kinds and {} offsets)",
                kinds.len(),
                offsets.len(),
                rows + 1
            );
        }
        gb.each_row_of(table, column, |gb, i, row| {
            let v = match kinds[i] {
                0 => change::Value::Null,
                1 => change::Value::UnchangedToast,
                2 => {
                    let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
                    let bytes = data.get(start..end).filter(|_| start <= end).ok_or_else(|| {
                        wasmtime::format_err!(
                            "{call}: offsets {start}..{end} of entry {i} are outside the {} data bytes",
                            data.len()
                        )
                    })?;
                    value(bytes, i)?
                }
                other => wasmtime::bail!(
                    "{call}: entry {i} has kind {other}; expected 0 (null), 1 (unchanged-toast) or 2 (value)"
                ),
            };
            gb.put(row, column, image, v)
        })
    }
}

impl wit::HostBatch for GuestState {
    fn len(&mut self, b: Resource<GuestBatch>) -> wasmtime::Result<u32> {
        Ok(self.table.get(&b)?.batch.rows.len() as u32)
    }

    fn tables(&mut self, b: Resource<GuestBatch>) -> wasmtime::Result<Vec<wit::Table>> {
        let gb = self.table.get(&b)?;
        Ok(gb
            .batch
            .tables
            .iter()
            .map(|t| wit::Table {
                schema: t.relation.schema.clone(),
                name: t.relation.name.clone(),
                columns: t
                    .relation
                    .columns
                    .iter()
                    .map(|c| wit::Column {
                        name: c.name.clone(),
                        type_name: type_name(c.type_oid).to_owned(),
                        type_oid: c.type_oid,
                        key: c.key,
                    })
                    .collect(),
            })
            .collect())
    }

    fn column_index(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        name: String,
    ) -> wasmtime::Result<Option<u32>> {
        let gb = self.table.get(&b)?;
        let t = gb.table(table)?;
        Ok(t.relation
            .columns
            .iter()
            .position(|c| c.name == name)
            .map(|i| i as u32))
    }

    fn rows_of(&mut self, b: Resource<GuestBatch>, table: u32) -> wasmtime::Result<Vec<u32>> {
        let gb = self.table.get(&b)?;
        Ok(gb.table(table)?.rows.clone())
    }

    fn meta(&mut self, b: Resource<GuestBatch>, row: u32) -> wasmtime::Result<wit::RowMeta> {
        let gb = self.table.get(&b)?;
        let r = gb.row(row)?;
        let txn = &gb.batch.txns[r.txn as usize];
        Ok(wit::RowMeta {
            table: r.table,
            op: wit_op(r.change.op),
            lsn: r.change.lsn.0,
            commit_lsn: txn.commit_lsn.0,
            commit_time: txn.commit_ts,
            xid: txn.xid,
        })
    }

    fn identity(
        &mut self,
        b: Resource<GuestBatch>,
        row: u32,
    ) -> wasmtime::Result<Option<wit::Identity>> {
        let gb = self.table.get(&b)?;
        let r = gb.row(row)?;
        Ok(r.change.identity.as_deref().map(|who| wit::Identity {
            session_user: who.session_user.clone(),
            role: who.role.clone(),
            client_addr: who.client_addr.clone(),
            application_name: who.application_name.clone(),
            actor: who.actor.as_ref().map(|(actor, _)| actor.clone()),
        }))
    }

    fn get(
        &mut self,
        b: Resource<GuestBatch>,
        row: u32,
        column: u32,
        image: wit::Image,
    ) -> wasmtime::Result<wit::Value> {
        let gb = self.table.get(&b)?;
        gb.check_column(row, column)?;
        let change = &gb.batch.rows[row as usize].change;
        Ok(image_of(change, image).map_or(wit::Value::Null, |v| to_wit(&v[column as usize])))
    }

    fn set(
        &mut self,
        b: Resource<GuestBatch>,
        row: u32,
        column: u32,
        image: wit::Image,
        value: wit::Value,
    ) -> wasmtime::Result<()> {
        let gb = self.table.get_mut(&b)?;
        gb.check_column(row, column)?;
        gb.put(row, column, image, from_wit(value))
    }

    fn read_column(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
    ) -> wasmtime::Result<Vec<wit::Value>> {
        let gb = self.table.get(&b)?;
        gb.check_table_column(table, column)?;
        let t = &gb.batch.tables[table as usize];
        Ok(t.rows
            .iter()
            .map(|&row| {
                let change = &gb.batch.rows[row as usize].change;
                image_of(change, image).map_or(wit::Value::Null, |v| to_wit(&v[column as usize]))
            })
            .collect())
    }

    fn write_column(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
        values: Vec<wit::Value>,
    ) -> wasmtime::Result<()> {
        let gb = self.table.get_mut(&b)?;
        gb.check_table_column(table, column)?;
        let rows = gb.batch.tables[table as usize].rows.len();
        if rows != values.len() {
            wasmtime::bail!(
                "write-column got {} values for table {table}, which has {rows} rows in this batch",
                values.len()
            );
        }
        let mut values = values.into_iter();
        gb.each_row_of(table, column, |gb, _, row| {
            let value = values.next().map_or(change::Value::Null, from_wit);
            gb.put(row, column, image, value)
        })
    }

    fn read_text_column(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
    ) -> wasmtime::Result<wit::TextColumn> {
        let gb = self.table.get(&b)?;
        gb.check_table_column(table, column)?;
        let rows = &gb.batch.tables[table as usize].rows;
        let mut kinds = Vec::with_capacity(rows.len());
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        let mut data = Vec::new();
        offsets.push(0);
        for &row in rows {
            let change = &gb.batch.rows[row as usize].change;
            let kind = match image_of(change, image).map(|v| &v[column as usize]) {
                None | Some(change::Value::Null) => 0,
                Some(change::Value::UnchangedToast) => 1,
                Some(value) => {
                    change::json::value_bytes(value, &mut data);
                    2
                }
            };
            kinds.push(kind);
            let end = u32::try_from(data.len()).map_err(|_| {
                wasmtime::format_err!("read-text-column: more than 4 GiB of data in one column")
            })?;
            offsets.push(end);
        }
        Ok(wit::TextColumn {
            kinds,
            data,
            offsets,
        })
    }

    fn write_text_column(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
        values: wit::TextColumn,
    ) -> wasmtime::Result<()> {
        self.write_packed(
            "write-text-column",
            b,
            table,
            column,
            image,
            values,
            |bytes, i| {
                let text = std::str::from_utf8(bytes).map_err(|_| {
                    wasmtime::format_err!("write-text-column: entry {i} is not UTF-8")
                })?;
                Ok(change::Value::Text(text.to_owned()))
            },
        )
    }

    fn hash_column(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
        salt: Vec<u8>,
    ) -> wasmtime::Result<u32> {
        use sha2::{Digest, Sha256};
        let gb = self.table.get_mut(&b)?;
        let mut bytes = Vec::new();
        let mut hex = [0u8; 64];
        let mut replaced = 0u32;
        let result = gb.each_row_of(table, column, |gb, _, row| {
            let change = &gb.batch.rows[row as usize].change;
            bytes.clear();
            let present = image_of(change, image)
                .is_some_and(|v| change::json::value_bytes(&v[column as usize], &mut bytes));
            if !present {
                return Ok(());
            }
            let digest = Sha256::new()
                .chain_update(&salt)
                .chain_update(&bytes)
                .finalize();
            hex::encode_to_slice(digest, &mut hex)
                .map_err(|e| wasmtime::format_err!("hash-column: {e}"))?;
            let text = std::str::from_utf8(&hex)
                .map_err(|e| wasmtime::format_err!("hash-column: {e}"))?
                .to_owned();
            replaced += 1;
            gb.put(row, column, image, change::Value::Text(text))
        });
        result.map(|()| replaced)
    }

    fn drop_row(&mut self, b: Resource<GuestBatch>, row: u32) -> wasmtime::Result<()> {
        let gb = self.table.get_mut(&b)?;
        gb.row(row)?;
        gb.drop_row(row)
    }

    fn is_dropped(&mut self, b: Resource<GuestBatch>, row: u32) -> wasmtime::Result<bool> {
        Ok(self.table.get(&b)?.row(row)?.dropped)
    }

    fn add_route(
        &mut self,
        b: Resource<GuestBatch>,
        row: u32,
        route: String,
    ) -> wasmtime::Result<()> {
        self.names
            .check_route(&route)
            .map_err(|e| wasmtime::format_err!("{e}"))?;
        let gb = self.table.get_mut(&b)?;
        gb.row(row)?;
        gb.add_route(row, &route)
    }

    fn routes(&mut self, b: Resource<GuestBatch>, row: u32) -> wasmtime::Result<Vec<String>> {
        Ok(self.table.get(&b)?.row(row)?.routes.clone())
    }

    fn tag_row(&mut self, b: Resource<GuestBatch>, row: u32, tag: String) -> wasmtime::Result<()> {
        self.names
            .check_tag(&tag)
            .map_err(|e| wasmtime::format_err!("{e}"))?;
        let gb = self.table.get_mut(&b)?;
        gb.row(row)?;
        gb.tag_row(row, &tag)
    }

    fn row_tags(&mut self, b: Resource<GuestBatch>, row: u32) -> wasmtime::Result<Vec<String>> {
        Ok(self.table.get(&b)?.row(row)?.tags.clone())
    }

    fn tag_column(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        tag: String,
    ) -> wasmtime::Result<()> {
        self.names
            .check_tag(&tag)
            .map_err(|e| wasmtime::format_err!("{e}"))?;
        let gb = self.table.get_mut(&b)?;
        gb.check_table_column(table, column)?;
        let tags = &gb.batch.tables[table as usize].column_tags[column as usize];
        if tags.contains(&tag) {
            return Ok(());
        }
        gb.charge(tag.len() + EDIT_BYTES)?;
        let tags = &mut gb.batch.tables[table as usize].column_tags[column as usize];
        gb.undo.push(Undo::ColumnTags {
            table,
            column,
            len: tags.len(),
        });
        tags.push(tag);
        Ok(())
    }

    fn column_tags(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
    ) -> wasmtime::Result<Vec<String>> {
        let gb = self.table.get(&b)?;
        gb.check_table_column(table, column)?;
        Ok(gb.batch.tables[table as usize].column_tags[column as usize].clone())
    }

    fn annotate(
        &mut self,
        b: Resource<GuestBatch>,
        row: u32,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        let gb = self.table.get_mut(&b)?;
        gb.row(row)?;
        gb.annotate(row, &key, &value)
    }

    fn annotations(
        &mut self,
        b: Resource<GuestBatch>,
        row: u32,
    ) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.table.get(&b)?.row(row)?.annotations.clone())
    }

    fn rows_tagged(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        tag: String,
    ) -> wasmtime::Result<Vec<u32>> {
        self.table.get(&b)?.rows_tagged(table, &tag)
    }

    fn drop_rows(&mut self, b: Resource<GuestBatch>, rows: Vec<u32>) -> wasmtime::Result<()> {
        let gb = self.table.get_mut(&b)?;
        gb.check_rows(&rows)?;
        rows.into_iter().try_for_each(|row| gb.drop_row(row))
    }

    fn add_route_rows(
        &mut self,
        b: Resource<GuestBatch>,
        rows: Vec<u32>,
        route: String,
    ) -> wasmtime::Result<()> {
        self.names
            .check_route(&route)
            .map_err(|e| wasmtime::format_err!("{e}"))?;
        let gb = self.table.get_mut(&b)?;
        gb.check_rows(&rows)?;
        rows.into_iter()
            .try_for_each(|row| gb.add_route(row, &route))
    }

    fn tag_rows(
        &mut self,
        b: Resource<GuestBatch>,
        rows: Vec<u32>,
        tag: String,
    ) -> wasmtime::Result<()> {
        self.names
            .check_tag(&tag)
            .map_err(|e| wasmtime::format_err!("{e}"))?;
        let gb = self.table.get_mut(&b)?;
        gb.check_rows(&rows)?;
        rows.into_iter().try_for_each(|row| gb.tag_row(row, &tag))
    }

    fn annotate_rows(
        &mut self,
        b: Resource<GuestBatch>,
        rows: Vec<u32>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        let gb = self.table.get_mut(&b)?;
        gb.check_rows(&rows)?;
        rows.into_iter()
            .try_for_each(|row| gb.annotate(row, &key, &value))
    }

    fn read_ints(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
    ) -> wasmtime::Result<wit::IntColumn> {
        let gb = self.table.get(&b)?;
        gb.typed_column("read-ints", table, column, INTS)?;
        let (valid, values) = read_typed(gb, table, column, image, int_of);
        Ok(wit::IntColumn { valid, values })
    }

    fn write_ints(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
        values: wit::IntColumn,
    ) -> wasmtime::Result<()> {
        let call = "write-ints";
        self.table.get_mut(&b)?.write_typed(
            call,
            table,
            column,
            image,
            INTS,
            &values.valid,
            &values.values,
            |typed, i, v| {
                typed.int_value(v).ok_or_else(|| {
                    wasmtime::format_err!(
                        "{call}: entry {i} ({v}) is out of the range of column {column}'s type"
                    )
                })
            },
        )
    }

    fn read_floats(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
    ) -> wasmtime::Result<wit::FloatColumn> {
        let gb = self.table.get(&b)?;
        gb.typed_column("read-floats", table, column, FLOATS)?;
        let (valid, values) = read_typed(gb, table, column, image, |v| match v {
            change::Value::Float(f) => Some(*f),
            _ => None,
        });
        Ok(wit::FloatColumn { valid, values })
    }

    fn write_floats(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
        values: wit::FloatColumn,
    ) -> wasmtime::Result<()> {
        self.table.get_mut(&b)?.write_typed(
            "write-floats",
            table,
            column,
            image,
            FLOATS,
            &values.valid,
            &values.values,
            // A `real` holds what an f32 holds: rounded as PostgreSQL would.
            |typed, _, v| {
                Ok(change::Value::Float(if typed == Typed::Float4 {
                    f64::from(v as f32)
                } else {
                    v
                }))
            },
        )
    }

    fn read_bools(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
    ) -> wasmtime::Result<wit::BoolColumn> {
        let gb = self.table.get(&b)?;
        gb.typed_column("read-bools", table, column, BOOLS)?;
        let (valid, values) = read_typed(gb, table, column, image, |v| match v {
            change::Value::Bool(b) => Some(*b),
            _ => None,
        });
        Ok(wit::BoolColumn { valid, values })
    }

    fn write_bools(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
        values: wit::BoolColumn,
    ) -> wasmtime::Result<()> {
        self.table.get_mut(&b)?.write_typed(
            "write-bools",
            table,
            column,
            image,
            BOOLS,
            &values.valid,
            &values.values,
            |_, _, v| Ok(change::Value::Bool(v)),
        )
    }

    fn write_bytes_column(
        &mut self,
        b: Resource<GuestBatch>,
        table: u32,
        column: u32,
        image: wit::Image,
        values: wit::TextColumn,
    ) -> wasmtime::Result<()> {
        self.write_packed(
            "write-bytes-column",
            b,
            table,
            column,
            image,
            values,
            |bytes, _| Ok(change::Value::Bytes(bytes.to_vec())),
        )
    }

    fn drop(&mut self, _b: Resource<GuestBatch>) -> wasmtime::Result<()> {
        // The host owns every batch and takes it back after the call; guests only
        // ever hold borrows, so there is nothing to free here.
        Ok(())
    }
}
