//! From buffered rows to Arrow: the Delta type of every PostgreSQL column, the schema a
//! table needs, and the column builders that turn rows into one `RecordBatch`.
//!
//! ```text
//! [Segment{ Arc<Batch>, table, rows }] ──plan_schema──▶ Delta fields (+ added, tags)
//!                                      ──record_batch(writer's Arrow schema)──▶ RecordBatch
//! ```
//!
//! Invariants:
//! - Conversion is driven by the *target* Arrow type (the Delta table's schema), not by
//!   the value, so a table whose column type differs from today's relation still gets
//!   well-typed files.
//! - Nothing is rounded, truncated or clamped. A value the column's Delta type cannot
//!   hold exactly is written as null and its PostgreSQL text form is recorded in the
//!   row's `_special` list as `column=text`.
//! - `Value::UnchangedToast` is written as null and the column is named in `_unchanged`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryBuilder, BooleanBuilder, ListBuilder, PrimitiveBuilder, RecordBatch,
    StringBuilder, new_null_array,
};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType as ArrowType, Date32Type, Decimal128Type, Field, FieldRef,
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, SchemaRef, TimeUnit,
    TimestampMicrosecondType,
};
use deltalake::kernel::{ArrayType, DataType, DecimalType, MetadataValue, StructField, StructType};

use crate::change::json::{format_date, format_timestamp};
use crate::change::{Column, Op, TxnMeta, Value, oid};
use crate::pipeline::batch::{Batch, BatchRow};

/// Field metadata key holding a column's guest tags as a JSON array of strings.
pub const TAGS_KEY: &str = "airlock.tags";

/// The rows of one table taken from one batch, all of one relation version.
#[derive(Clone, Debug)]
pub(super) struct Segment {
    pub batch: Arc<Batch>,
    /// Index of the relation version in `batch.tables`.
    pub table: u32,
    /// Indexes into `batch.rows`, in batch order.
    pub rows: Vec<u32>,
}

impl Segment {
    pub fn row(&self, index: u32) -> &BatchRow {
        &self.batch.rows[index as usize]
    }

    pub fn txn(&self, row: &BatchRow) -> &TxnMeta {
        &self.batch.txns[row.txn as usize]
    }

    fn columns(&self) -> &[Column] {
        &self.batch.tables[self.table as usize].relation.columns
    }

    fn column_tags(&self) -> &[Vec<String>] {
        &self.batch.tables[self.table as usize].column_tags
    }
}

/// The metadata columns written after the data columns, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Meta {
    Op,
    Lsn,
    CommitLsn,
    CommitTs,
    Xid,
    Pipeline,
    Policy,
    Tags,
    Unchanged,
    Special,
    SessionUser,
    Role,
    Actor,
    ApplicationName,
    ClientAddr,
}

impl Meta {
    pub const ALL: [Meta; 15] = [
        Meta::Op,
        Meta::Lsn,
        Meta::CommitLsn,
        Meta::CommitTs,
        Meta::Xid,
        Meta::Pipeline,
        Meta::Policy,
        Meta::Tags,
        Meta::Unchanged,
        Meta::Special,
        Meta::SessionUser,
        Meta::Role,
        Meta::Actor,
        Meta::ApplicationName,
        Meta::ClientAddr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Meta::Op => "_op",
            Meta::Lsn => "_lsn",
            Meta::CommitLsn => "_commit_lsn",
            Meta::CommitTs => "_commit_ts",
            Meta::Xid => "_xid",
            Meta::Pipeline => "_pipeline",
            Meta::Policy => "_policy",
            Meta::Tags => "_tags",
            Meta::Unchanged => "_unchanged",
            Meta::Special => "_special",
            Meta::SessionUser => "_session_user",
            Meta::Role => "_role",
            Meta::Actor => "_actor",
            Meta::ApplicationName => "_application_name",
            Meta::ClientAddr => "_client_addr",
        }
    }

    fn from_name(name: &str) -> Option<Meta> {
        Meta::ALL.into_iter().find(|m| m.name() == name)
    }

    fn delta_type(self) -> DataType {
        match self {
            Meta::Op
            | Meta::Pipeline
            | Meta::Policy
            | Meta::SessionUser
            | Meta::Role
            | Meta::Actor
            | Meta::ApplicationName
            | Meta::ClientAddr => DataType::STRING,
            Meta::Lsn | Meta::CommitLsn | Meta::Xid => DataType::LONG,
            Meta::CommitTs => DataType::TIMESTAMP,
            Meta::Tags | Meta::Unchanged | Meta::Special => {
                ArrayType::new(DataType::STRING, true).into()
            }
        }
    }
}

/// Why rows could not be turned into Delta fields or Arrow arrays: never worth retrying.
#[derive(Debug, thiserror::Error)]
#[error("column `{column}`: {message}")]
pub(super) struct ConvertError {
    pub column: String,
    pub message: String,
}

fn convert_error(column: &str, message: impl Into<String>) -> ConvertError {
    ConvertError {
        column: column.to_owned(),
        message: message.into(),
    }
}

/// Precision and scale of a `numeric(p, s)` type modifier, if it has one. Uses the
/// PostgreSQL 15 encoding, where the scale is an 11-bit signed number (older servers
/// only produce scales in `0..=p`, which decode the same).
pub(super) fn numeric_precision_scale(typmod: i32) -> Option<(i32, i32)> {
    if typmod < 4 {
        return None;
    }
    let raw = typmod - 4;
    let precision = (raw >> 16) & 0xffff;
    let scale = ((raw & 0x7ff) ^ 1024) - 1024;
    Some((precision, scale))
}

/// The Delta type a PostgreSQL column is written as.
pub(super) fn delta_type(column: &Column) -> DataType {
    match column.type_oid {
        oid::BOOL => DataType::BOOLEAN,
        oid::INT2 => DataType::SHORT,
        oid::INT4 => DataType::INTEGER,
        oid::INT8 | oid::OID => DataType::LONG,
        oid::FLOAT4 => DataType::FLOAT,
        oid::FLOAT8 => DataType::DOUBLE,
        oid::NUMERIC => match numeric_precision_scale(column.type_modifier) {
            Some((p, s)) if (1..=38).contains(&p) && (0..=p).contains(&s) => {
                match DecimalType::try_new(p as u8, s as u8) {
                    Ok(decimal) => decimal.into(),
                    Err(_) => DataType::STRING,
                }
            }
            _ => DataType::STRING,
        },
        oid::BYTEA => DataType::BINARY,
        oid::DATE => DataType::DATE,
        oid::TIMESTAMP => DataType::TIMESTAMP_NTZ,
        oid::TIMESTAMPTZ => DataType::TIMESTAMP,
        array => match oid::array_element(array) {
            // An array column's type modifier applies to its elements.
            Some(element) => ArrayType::new(
                delta_type(&Column {
                    name: column.name.clone(),
                    type_oid: element,
                    type_modifier: column.type_modifier,
                    key: false,
                }),
                true,
            )
            .into(),
            None => DataType::STRING,
        },
    }
}

/// The tags recorded on a Delta field.
pub(super) fn field_tags(field: &StructField) -> BTreeSet<String> {
    match field.metadata().get(TAGS_KEY) {
        Some(MetadataValue::String(json)) => serde_json::from_str::<Vec<String>>(json)
            .map(|tags| tags.into_iter().collect())
            .unwrap_or_default(),
        Some(MetadataValue::Other(serde_json::Value::Array(items))) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => BTreeSet::new(),
    }
}

fn with_tags(field: StructField, tags: &BTreeSet<String>) -> StructField {
    if tags.is_empty() {
        return field;
    }
    let json = serde_json::to_string(&tags.iter().collect::<Vec<_>>()).unwrap_or_default();
    field.add_metadata([(TAGS_KEY, MetadataValue::String(json))])
}

/// What a table's Delta schema must become to hold some segments.
#[derive(Debug)]
pub(super) struct SchemaPlan {
    /// The whole schema: existing fields (with tags merged), then `added`.
    pub fields: Vec<StructField>,
    /// Fields the table lacks: relation columns in order of first appearance, then
    /// metadata columns. All nullable.
    pub added: Vec<StructField>,
    /// Whether the tags of an existing field grew.
    pub tags_grew: bool,
}

/// Plans the schema for `segments` on top of `existing` (`None`: the table is new).
pub(super) fn plan_schema(
    existing: Option<&StructType>,
    segments: &[&Segment],
) -> Result<SchemaPlan, ConvertError> {
    // Relation columns in order of first appearance, with the union of their tags.
    let mut order: Vec<(&Column, BTreeSet<String>)> = Vec::new();
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for segment in segments {
        let tags = segment.column_tags();
        for (i, column) in segment.columns().iter().enumerate() {
            if Meta::from_name(&column.name).is_some() {
                return Err(convert_error(
                    &column.name,
                    "the name is reserved for an airlock metadata column; rename the column or drop it in a guest",
                ));
            }
            let slot = *index.entry(column.name.as_str()).or_insert_with(|| {
                order.push((column, BTreeSet::new()));
                order.len() - 1
            });
            if let Some(column_tags) = tags.get(i) {
                order[slot].1.extend(column_tags.iter().cloned());
            }
        }
    }

    let mut fields = Vec::new();
    let mut tags_grew = false;
    if let Some(existing) = existing {
        for field in existing.fields() {
            let field = match index.get(field.name().as_str()) {
                Some(&slot) => {
                    let have = field_tags(field);
                    if order[slot].1.is_subset(&have) {
                        field.clone()
                    } else {
                        tags_grew = true;
                        let all: BTreeSet<String> = have.union(&order[slot].1).cloned().collect();
                        with_tags(field.clone(), &all)
                    }
                }
                None => field.clone(),
            };
            fields.push(field);
        }
    }
    let present = |name: &str| existing.is_some_and(|schema| schema.contains(name));
    let mut added = Vec::new();
    for (column, tags) in &order {
        if !present(&column.name) {
            added.push(with_tags(
                StructField::new(column.name.clone(), delta_type(column), true),
                tags,
            ));
        }
    }
    for meta in Meta::ALL {
        if !present(meta.name()) {
            added.push(StructField::new(meta.name(), meta.delta_type(), true));
        }
    }
    fields.extend(added.iter().cloned());
    Ok(SchemaPlan {
        fields,
        added,
        tags_grew,
    })
}

/// One row to convert: where it comes from and which image it writes.
struct RowView<'a> {
    segment: usize,
    row: &'a BatchRow,
    txn: &'a TxnMeta,
    /// The image written: `new` for inserts, updates and snapshot reads, `old` for
    /// deletes, none for truncates.
    image: Option<&'a [Value]>,
}

fn image(row: &BatchRow) -> Option<&[Value]> {
    match row.change.op {
        Op::Insert | Op::Update | Op::Read => row.change.new.as_deref(),
        Op::Delete => row.change.old.as_deref(),
        Op::Truncate => None,
    }
}

/// Per-row notes collected while building data columns.
#[derive(Default)]
struct Notes {
    /// (row, column name) of unchanged TOASTed values.
    unchanged: Vec<(u32, Arc<str>)>,
    /// (row, `column=text`) of values the column type cannot hold.
    special: Vec<(u32, String)>,
    /// Column names with at least one special value, for a warning.
    special_columns: BTreeSet<String>,
}

/// What a data column's rows hold, as seen by one builder.
struct Cells<'a> {
    rows: &'a [RowView<'a>],
    /// Per segment: the index of this field's column in the segment's relation.
    map: Vec<Option<usize>>,
    name: Arc<str>,
    /// Instead of `rows`: plain values (the elements of array columns).
    flat: Option<&'a [Value]>,
}

impl<'a> Cells<'a> {
    fn len(&self) -> usize {
        self.flat.map_or(self.rows.len(), <[Value]>::len)
    }

    fn value(&self, i: usize) -> Option<&'a Value> {
        if let Some(flat) = self.flat {
            return flat.get(i);
        }
        let view = &self.rows[i];
        match (view.image, self.map[view.segment]) {
            (Some(image), Some(column)) => image.get(column),
            _ => None,
        }
    }

    /// Calls `put(Some(value))` for each present, non-null value and `put(None)` for a
    /// null; `put` returns false when it cannot hold the value, which then becomes a null
    /// and a `_special` entry.
    fn fill(&self, notes: &mut Notes, mut put: impl FnMut(Option<&Value>) -> bool) {
        for i in 0..self.len() {
            match self.value(i) {
                None | Some(Value::Null) => {
                    put(None);
                }
                Some(Value::UnchangedToast) => {
                    notes.unchanged.push((i as u32, self.name.clone()));
                    put(None);
                }
                Some(value) => {
                    if !put(Some(value)) {
                        put(None);
                        let mut text = String::with_capacity(self.name.len() + 16);
                        text.push_str(&self.name);
                        text.push('=');
                        write_text(&mut text, value);
                        notes.special.push((i as u32, text));
                        if !notes.special_columns.contains(&*self.name) {
                            notes.special_columns.insert(self.name.to_string());
                        }
                    }
                }
            }
        }
    }

    fn primitive<T: ArrowPrimitiveType>(
        &self,
        target: &ArrowType,
        notes: &mut Notes,
        convert: impl Fn(&Value) -> Option<T::Native>,
    ) -> ArrayRef {
        let mut builder =
            PrimitiveBuilder::<T>::with_capacity(self.len()).with_data_type(target.clone());
        self.fill(notes, |value| match value {
            None => {
                builder.append_null();
                true
            }
            Some(value) => match convert(value) {
                Some(native) => {
                    builder.append_value(native);
                    true
                }
                None => false,
            },
        });
        Arc::new(builder.finish())
    }
}

/// The converted rows and what happened to them.
pub(super) struct Converted {
    pub batch: RecordBatch,
    /// Columns that had values their Delta type could not hold (see `_special`).
    pub special_columns: BTreeSet<String>,
}

/// Builds one record batch with exactly `schema` (the writer's Arrow schema for the
/// table) from the segments' rows, in segment and row order.
pub(super) fn record_batch(
    schema: &SchemaRef,
    segments: &[Segment],
) -> Result<Converted, ConvertError> {
    let total: usize = segments.iter().map(|s| s.rows.len()).sum();
    let mut rows = Vec::with_capacity(total);
    for (s, segment) in segments.iter().enumerate() {
        for &index in &segment.rows {
            let row = segment.row(index);
            rows.push(RowView {
                segment: s,
                row,
                txn: segment.txn(row),
                image: image(row),
            });
        }
    }

    let mut notes = Notes::default();
    let mut columns: Vec<Option<ArrayRef>> = vec![None; schema.fields().len()];
    let mut deferred = Vec::new();
    for (f, field) in schema.fields().iter().enumerate() {
        if let Some(meta) = Meta::from_name(field.name()) {
            if matches!(meta, Meta::Unchanged | Meta::Special) {
                deferred.push((f, meta));
            } else {
                columns[f] = Some(conform(field, meta_column(meta, field, segments, &rows))?);
            }
            continue;
        }
        let map: Vec<Option<usize>> = segments
            .iter()
            .map(|s| s.columns().iter().position(|c| c.name == *field.name()))
            .collect();
        let array = if map.iter().all(Option::is_none) {
            new_null_array(field.data_type(), rows.len())
        } else {
            let cells = Cells {
                rows: &rows,
                map,
                name: Arc::from(field.name().as_str()),
                flat: None,
            };
            data_column(field, &cells, &mut notes)?
        };
        columns[f] = Some(array);
    }
    for (f, meta) in deferred {
        let field = &schema.fields()[f];
        let array = match meta {
            Meta::Unchanged => {
                let mut entries = std::mem::take(&mut notes.unchanged);
                entries.sort_by_key(|(row, _)| *row);
                list_column(
                    field,
                    rows.len(),
                    entries.iter().map(|(row, name)| (*row, &**name)),
                )
            }
            _ => {
                let mut entries = std::mem::take(&mut notes.special);
                entries.sort_by_key(|(row, _)| *row);
                list_column(
                    field,
                    rows.len(),
                    entries.iter().map(|(row, text)| (*row, text.as_str())),
                )
            }
        };
        columns[f] = Some(conform(field, array)?);
    }
    let columns: Vec<ArrayRef> = columns
        .into_iter()
        .map(|c| c.expect("every field is built"))
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| convert_error("*", format!("cannot assemble the record batch: {e}")))?;
    Ok(Converted {
        batch,
        special_columns: notes.special_columns,
    })
}

/// Casts a metadata array to its field's type when an older table declared it differently.
fn conform(field: &Field, array: ArrayRef) -> Result<ArrayRef, ConvertError> {
    if array.data_type() == field.data_type() {
        return Ok(array);
    }
    arrow::compute::cast(&array, field.data_type()).map_err(|e| {
        convert_error(
            field.name(),
            format!(
                "the Delta table declares it as {}, which airlock cannot write: {e}",
                field.data_type()
            ),
        )
    })
}

fn element_field(field: &Field) -> FieldRef {
    match field.data_type() {
        ArrowType::List(element) => element.clone(),
        _ => Arc::new(Field::new("element", ArrowType::Utf8, true)),
    }
}

/// A list-of-strings column from entries sorted by row.
fn list_column<'a>(
    field: &Field,
    rows: usize,
    entries: impl Iterator<Item = (u32, &'a str)>,
) -> ArrayRef {
    let mut builder =
        ListBuilder::with_capacity(StringBuilder::new(), rows).with_field(element_field(field));
    let mut entries = entries.peekable();
    for row in 0..rows as u32 {
        while let Some((_, text)) = entries.next_if(|(r, _)| *r == row) {
            builder.values().append_value(text);
        }
        builder.append(true);
    }
    Arc::new(builder.finish())
}

fn meta_column(meta: Meta, field: &Field, segments: &[Segment], rows: &[RowView<'_>]) -> ArrayRef {
    let n = rows.len();
    match meta {
        Meta::Op => {
            let mut b = StringBuilder::with_capacity(n, n);
            rows.iter()
                .for_each(|r| b.append_value(r.row.change.op.code()));
            Arc::new(b.finish())
        }
        Meta::Pipeline | Meta::Policy => {
            let of = |batch: &Batch| -> Arc<str> {
                match meta {
                    Meta::Pipeline => batch.pipeline.clone(),
                    _ => batch.policy.clone(),
                }
            };
            let bytes = segments
                .iter()
                .map(|s| of(&s.batch).len() * s.rows.len())
                .sum();
            let mut b = StringBuilder::with_capacity(n, bytes);
            let values: Vec<Arc<str>> = segments.iter().map(|s| of(&s.batch)).collect();
            rows.iter()
                .for_each(|r| b.append_value(&*values[r.segment]));
            Arc::new(b.finish())
        }
        Meta::Lsn | Meta::CommitLsn | Meta::Xid => {
            let mut b = PrimitiveBuilder::<Int64Type>::with_capacity(n);
            for r in rows {
                b.append_value(match meta {
                    Meta::Lsn => r.row.change.lsn.0 as i64,
                    Meta::CommitLsn => r.txn.commit_lsn.0 as i64,
                    _ => i64::from(r.txn.xid),
                });
            }
            Arc::new(b.finish())
        }
        Meta::CommitTs => {
            let mut b =
                PrimitiveBuilder::<TimestampMicrosecondType>::with_capacity(n).with_timezone("UTC");
            rows.iter().for_each(|r| b.append_value(r.txn.commit_ts));
            Arc::new(b.finish())
        }
        Meta::Tags => {
            let mut b = ListBuilder::with_capacity(StringBuilder::new(), n)
                .with_field(element_field(field));
            for r in rows {
                for tag in &r.row.tags {
                    b.values().append_value(tag);
                }
                b.append(true);
            }
            Arc::new(b.finish())
        }
        Meta::Unchanged | Meta::Special => new_null_array(field.data_type(), n),
        Meta::SessionUser | Meta::Role | Meta::Actor | Meta::ApplicationName | Meta::ClientAddr => {
            fn value(meta: Meta, identity: &crate::change::identity::Identity) -> Option<&str> {
                match meta {
                    // Empty when the policy removed it.
                    Meta::SessionUser => {
                        Some(identity.session_user.as_str()).filter(|s| !s.is_empty())
                    }
                    Meta::Role => identity.role.as_deref(),
                    Meta::Actor => identity.actor.as_ref().map(|(a, _)| a.as_str()),
                    Meta::ApplicationName => identity.application_name.as_deref(),
                    _ => identity.client_addr.as_deref(),
                }
            }
            let mut b = StringBuilder::with_capacity(n, 0);
            for r in rows {
                b.append_option(
                    r.row
                        .change
                        .identity
                        .as_deref()
                        .and_then(|i| value(meta, i)),
                );
            }
            Arc::new(b.finish())
        }
    }
}

fn data_column(
    field: &Field,
    cells: &Cells<'_>,
    notes: &mut Notes,
) -> Result<ArrayRef, ConvertError> {
    let target = field.data_type();
    let array: ArrayRef = match target {
        ArrowType::Boolean => {
            let mut b = BooleanBuilder::with_capacity(cells.len());
            cells.fill(notes, |value| match value {
                None => {
                    b.append_null();
                    true
                }
                Some(Value::Bool(v)) => {
                    b.append_value(*v);
                    true
                }
                Some(_) => false,
            });
            Arc::new(b.finish())
        }
        ArrowType::Int16 => cells.primitive::<Int16Type>(target, notes, |v| match v {
            Value::Int(i) => i16::try_from(*i).ok(),
            _ => None,
        }),
        ArrowType::Int32 => cells.primitive::<Int32Type>(target, notes, |v| match v {
            Value::Int(i) => i32::try_from(*i).ok(),
            _ => None,
        }),
        ArrowType::Int64 => cells.primitive::<Int64Type>(target, notes, |v| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }),
        ArrowType::Float32 => cells.primitive::<Float32Type>(target, notes, |v| match v {
            Value::Float(f) if is_float4(*f) => Some(*f as f32),
            _ => None,
        }),
        ArrowType::Float64 => cells.primitive::<Float64Type>(target, notes, |v| match v {
            Value::Float(f) => Some(*f),
            Value::Int(i) if i.unsigned_abs() <= 1 << 53 => Some(*i as f64),
            _ => None,
        }),
        ArrowType::Decimal128(precision, scale) => {
            let (p, s) = (
                u32::from(*precision),
                u32::try_from(*scale).unwrap_or(u32::MAX),
            );
            cells.primitive::<Decimal128Type>(target, notes, |v| match v {
                Value::Numeric(text) => parse_decimal(text, p, s),
                Value::Int(i) => parse_decimal(&i.to_string(), p, s),
                _ => None,
            })
        }
        ArrowType::Date32 => cells.primitive::<Date32Type>(target, notes, |v| match v {
            Value::Date(d) if *d != i32::MAX && *d != i32::MIN => Some(*d),
            _ => None,
        }),
        ArrowType::Timestamp(TimeUnit::Microsecond, None) => cells
            .primitive::<TimestampMicrosecondType>(target, notes, |v| match v {
                Value::Timestamp(t) if *t != i64::MAX && *t != i64::MIN => Some(*t),
                _ => None,
            }),
        ArrowType::Timestamp(TimeUnit::Microsecond, Some(_)) => cells
            .primitive::<TimestampMicrosecondType>(target, notes, |v| match v {
                Value::Timestamptz(t) if *t != i64::MAX && *t != i64::MIN => Some(*t),
                _ => None,
            }),
        ArrowType::Utf8 => {
            let mut b = StringBuilder::with_capacity(cells.len(), cells.len() * 16);
            cells.fill(notes, |value| {
                match value {
                    None => b.append_null(),
                    Some(Value::Text(s) | Value::Numeric(s) | Value::Json(s) | Value::Other(s)) => {
                        b.append_value(s)
                    }
                    Some(value) => {
                        write_text(&mut b, value);
                        b.append_value("");
                    }
                }
                true
            });
            Arc::new(b.finish())
        }
        ArrowType::List(element) => list_column_of(element, cells, notes)?,
        ArrowType::Binary => {
            let mut b = BinaryBuilder::with_capacity(cells.len(), cells.len() * 16);
            cells.fill(notes, |value| match value {
                None => {
                    b.append_null();
                    true
                }
                Some(Value::Bytes(bytes)) => {
                    b.append_value(bytes);
                    true
                }
                Some(_) => false,
            });
            Arc::new(b.finish())
        }
        other => {
            return Err(convert_error(
                field.name(),
                format!("the Delta table declares it as {other}, which airlock cannot write"),
            ));
        }
    };
    Ok(array)
}

/// Whether a double is exactly a float4 value: the same number, or the value of the
/// float4's shortest decimal text (PostgreSQL sends `0.1` for the float4 nearest 0.1;
/// read as a double that is not the float4, but it names it exactly).
fn is_float4(f: f64) -> bool {
    let single = f as f32;
    f.is_nan()
        || f64::from(single) == f
        || (single.is_finite() && single.to_string().parse::<f64>() == Ok(f))
}

/// The PostgreSQL type whose text form an array element of Arrow type `target` is
/// parsed as; `None`: kept as the element's text.
fn element_type(target: &ArrowType) -> Option<u32> {
    Some(match target {
        ArrowType::Boolean => oid::BOOL,
        ArrowType::Int16 | ArrowType::Int32 | ArrowType::Int64 => oid::INT8,
        ArrowType::Float32 | ArrowType::Float64 => oid::FLOAT8,
        ArrowType::Decimal128(..) => oid::NUMERIC,
        ArrowType::Date32 => oid::DATE,
        ArrowType::Timestamp(_, None) => oid::TIMESTAMP,
        ArrowType::Timestamp(_, Some(_)) => oid::TIMESTAMPTZ,
        ArrowType::Binary => oid::BYTEA,
        _ => return None,
    })
}

/// A list column from PostgreSQL array text: one-dimensional arrays become lists of
/// the element type; an array that is not one-dimensional, or with an element the
/// element type cannot hold exactly, is written as null and recorded in `_special`.
fn list_column_of(
    element: &FieldRef,
    cells: &Cells<'_>,
    notes: &mut Notes,
) -> Result<ArrayRef, ConvertError> {
    let parse_as = element_type(element.data_type()).map(|type_oid| Column {
        name: cells.name.to_string(),
        type_oid,
        type_modifier: -1,
        key: false,
    });
    let mut values: Vec<Value> = Vec::new();
    let mut offsets: Vec<i32> = vec![0];
    let mut valid: Vec<bool> = Vec::with_capacity(cells.len());
    // Row of each element, to find the rows of elements that did not fit.
    let mut owner: Vec<u32> = Vec::new();
    let mut row = 0u32;
    cells.fill(notes, |value| {
        let parsed = match value {
            None => None,
            Some(Value::Other(text) | Value::Text(text)) => {
                let elements = crate::change::text::parse_array(text).and_then(|elements| {
                    elements
                        .into_iter()
                        .map(|e| match (e, &parse_as) {
                            (None, _) => Some(Value::Null),
                            (Some(text), Some(column)) => {
                                crate::change::text::parse_value(column, text.as_bytes()).ok()
                            }
                            (Some(text), None) => Some(Value::Text(text)),
                        })
                        .collect::<Option<Vec<Value>>>()
                });
                match elements {
                    Some(elements) => Some(elements),
                    None => return false,
                }
            }
            Some(_) => return false,
        };
        match parsed {
            None => valid.push(false),
            Some(elements) => {
                owner.extend(std::iter::repeat_n(row, elements.len()));
                values.extend(elements);
                valid.push(true);
            }
        }
        offsets.push(values.len() as i32);
        row += 1;
        true
    });
    let element_cells = Cells {
        rows: &[],
        map: Vec::new(),
        name: cells.name.clone(),
        flat: Some(&values),
    };
    let mut element_notes = Notes::default();
    let child = data_column(element, &element_cells, &mut element_notes)?;
    // Elements that did not fit: their whole array goes to `_special`, the list is null.
    let mut failed: Vec<u32> = element_notes
        .special
        .iter()
        .map(|(i, _)| owner[*i as usize])
        .collect();
    failed.dedup();
    for r in failed {
        if !std::mem::replace(&mut valid[r as usize], false) {
            continue;
        }
        if let Some(value) = cells.value(r as usize) {
            let mut text = format!("{}=", cells.name);
            write_text(&mut text, value);
            notes.special.push((r, text));
            notes.special_columns.insert(cells.name.to_string());
        }
    }
    let list = arrow::array::ListArray::try_new(
        element.clone(),
        arrow::buffer::OffsetBuffer::new(offsets.into()),
        child,
        Some(arrow::buffer::NullBuffer::from(valid)),
    )
    .map_err(|e| convert_error(&cells.name, format!("cannot build the list column: {e}")))?;
    Ok(Arc::new(list))
}

/// Parses PostgreSQL numeric text into an unscaled `decimal(p, s)` value; `None` when
/// it is `NaN`/`Infinity` or does not fit exactly (more integer digits than `p - s`, or
/// nonzero digits beyond the scale).
pub(super) fn parse_decimal(text: &str, precision: u32, scale: u32) -> Option<i128> {
    if precision == 0 || precision > 38 || scale > precision {
        return None;
    }
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part
        .bytes()
        .chain(frac_part.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let int_part = int_part.trim_start_matches('0');
    if int_part.len() > (precision - scale) as usize {
        return None;
    }
    let (kept, dropped) = frac_part.split_at(frac_part.len().min(scale as usize));
    if dropped.bytes().any(|b| b != b'0') {
        return None;
    }
    let mut value: i128 = 0;
    for b in int_part.bytes().chain(kept.bytes()) {
        value = value * 10 + i128::from(b - b'0');
    }
    for _ in kept.len()..scale as usize {
        value *= 10;
    }
    Some(if negative { -value } else { value })
}

/// Writes a value's text form: what string columns and `_special` entries hold. Text
/// types as they are; dates and timestamps in the ISO 8601 form the spine uses; `time`
/// always with six fractional digits so that the text sorts like the time.
pub(super) fn write_text(out: &mut impl std::fmt::Write, value: &Value) {
    let _ = match value {
        Value::Null | Value::UnchangedToast => Ok(()),
        Value::Bool(b) => out.write_str(if *b { "true" } else { "false" }),
        Value::Int(i) => write!(out, "{i}"),
        Value::Float(f) if f.is_nan() => out.write_str("NaN"),
        Value::Float(f) if f.is_infinite() => {
            out.write_str(if *f > 0.0 { "Infinity" } else { "-Infinity" })
        }
        Value::Float(f) => write!(out, "{f}"),
        Value::Numeric(s) | Value::Text(s) | Value::Json(s) | Value::Other(s) => out.write_str(s),
        Value::Bytes(bytes) => {
            let _ = out.write_str("\\x");
            bytes.iter().try_for_each(|b| write!(out, "{b:02x}"))
        }
        Value::Date(d) => out.write_str(&format_date(*d)),
        Value::Time(t) => write_time(out, *t),
        Value::Timestamp(t) => out.write_str(&format_timestamp(*t, false)),
        Value::Timestamptz(t) => out.write_str(&format_timestamp(*t, true)),
        Value::Uuid(u) => write_uuid(out, u),
    };
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Canonical lowercase `8-4-4-4-12` text of a UUID, without allocating.
fn write_uuid(out: &mut impl std::fmt::Write, u: &[u8; 16]) -> std::fmt::Result {
    let mut text = [b'-'; 36];
    let mut at = 0;
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        text[at] = HEX[usize::from(b >> 4)];
        text[at + 1] = HEX[usize::from(b & 0xf)];
        at += 2;
    }
    out.write_str(std::str::from_utf8(&text).map_err(|_| std::fmt::Error)?)
}

/// `HH:MM:SS.ffffff`, always six fractional digits (`24:00:00.000000` included), without
/// allocating.
fn write_time(out: &mut impl std::fmt::Write, micros: i64) -> std::fmt::Result {
    if !(0..=86_400_000_000).contains(&micros) {
        // Not a PostgreSQL time; keep whatever it says.
        return write!(out, "{micros}us");
    }
    let (secs, frac) = (micros / 1_000_000, micros % 1_000_000);
    let mut text = *b"00:00:00.000000";
    let mut put = |at: usize, value: i64, digits: u32| {
        for d in 0..digits {
            let digit = value / 10_i64.pow(digits - 1 - d) % 10;
            text[at + d as usize] = b'0' + digit as u8;
        }
    };
    put(0, secs / 3600, 2);
    put(3, secs / 60 % 60, 2);
    put(6, secs % 60, 2);
    put(9, frac, 6);
    out.write_str(std::str::from_utf8(&text).map_err(|_| std::fmt::Error)?)
}

/// The Delta schema as it stands, for `plan_schema`.
pub(super) fn struct_type(fields: Vec<StructField>) -> Result<StructType, ConvertError> {
    StructType::try_new(fields)
        .map_err(|e| convert_error("*", format!("invalid Delta schema: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: Value) -> String {
        let mut out = String::new();
        write_text(&mut out, &value);
        out
    }

    #[test]
    fn float4_values_are_recognised_from_their_shortest_text() {
        for f in [0.1, 1.5, -3.4028235e38, 1e-45, f64::NAN, f64::INFINITY] {
            assert!(is_float4(f), "{f}");
        }
        for f in [0.1000000000001, 1e300, std::f64::consts::PI] {
            assert!(!is_float4(f), "{f}");
        }
    }

    #[test]
    fn decimals_parse_exactly_or_not_at_all() {
        assert_eq!(parse_decimal("123.45", 10, 2), Some(12345));
        assert_eq!(parse_decimal("-0.5", 10, 2), Some(-50));
        assert_eq!(parse_decimal("7", 10, 2), Some(700));
        assert_eq!(parse_decimal("1.230", 10, 2), Some(123));
        assert_eq!(
            parse_decimal("123456789.12", 10, 2),
            None,
            "9 integer digits > 8"
        );
        assert_eq!(parse_decimal("12345678.12", 10, 2), Some(1_234_567_812));
        assert_eq!(parse_decimal("1.234", 10, 2), None, "would round");
        assert_eq!(parse_decimal("NaN", 10, 2), None);
        assert_eq!(parse_decimal("Infinity", 10, 2), None);
        assert_eq!(parse_decimal("-", 10, 2), None);
        assert_eq!(parse_decimal(".5", 3, 1), Some(5));
        let max = "9".repeat(38);
        assert_eq!(parse_decimal(&max, 38, 0), Some(max.parse().unwrap()));
    }

    #[test]
    fn numeric_typmods_decode_like_postgres() {
        // numeric(10,2): ((10 << 16) | 2) + 4
        assert_eq!(numeric_precision_scale((10 << 16 | 2) + 4), Some((10, 2)));
        assert_eq!(numeric_precision_scale(-1), None);
        // PostgreSQL 15: numeric(3,-2) stores the scale as 11-bit two's complement.
        assert_eq!(
            numeric_precision_scale((3 << 16 | (-2i32 & 0x7ff)) + 4),
            Some((3, -2))
        );
        let column = |typmod| Column {
            name: "n".into(),
            type_oid: oid::NUMERIC,
            type_modifier: typmod,
            key: false,
        };
        assert_eq!(
            delta_type(&column((3 << 16 | (-2i32 & 0x7ff)) + 4)),
            DataType::STRING
        );
        assert_eq!(delta_type(&column(-1)), DataType::STRING);
        assert_eq!(delta_type(&column((39 << 16) + 4)), DataType::STRING);
        assert_eq!(
            delta_type(&column((38 << 16 | 6) + 4)),
            DecimalType::try_new(38, 6).unwrap().into()
        );
    }

    #[test]
    fn text_forms_follow_postgres() {
        assert_eq!(text(Value::Date(0)), "1970-01-01");
        assert_eq!(text(Value::Date(19_723)), "2024-01-01");
        assert_eq!(text(Value::Date(-719_163)), "0001-12-31 BC");
        assert_eq!(text(Value::Date(i32::MAX)), "infinity");
        assert_eq!(text(Value::Time(45_296_000_789)), "12:34:56.000789");
        assert_eq!(text(Value::Time(86_400_000_000)), "24:00:00.000000");
        assert_eq!(
            text(Value::Timestamp(1_704_067_200_000_001)),
            "2024-01-01T00:00:00.000001"
        );
        assert_eq!(text(Value::Timestamptz(-1)), "1969-12-31T23:59:59.999999Z");
        assert_eq!(text(Value::Timestamptz(i64::MIN)), "-infinity");
        assert_eq!(
            text(Value::Uuid(
                *b"\x12\x34\x56\x78\x9a\xbc\xde\xf0\x01\x23\x45\x67\x89\xab\xcd\xef"
            )),
            "12345678-9abc-def0-0123-456789abcdef"
        );
        assert_eq!(text(Value::Bytes(vec![0, 255])), "\\x00ff");
        assert_eq!(text(Value::Float(f64::NEG_INFINITY)), "-Infinity");
        assert_eq!(text(Value::Float(1.5)), "1.5");
    }
}
