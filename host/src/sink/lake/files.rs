//! Parquet files from buffered rows: converted to Arrow a chunk at a time, encoded
//! with dictionaries only where values repeat, written into a table's directory and
//! returned as the `Add` actions a commit will carry. Nothing here commits.

use std::collections::BTreeSet;
use std::sync::Arc;

use deltalake::DeltaTable;
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::arrow::{Segment, record_batch};
use super::error::LakeError;
use super::settings::LakeSettings;
use crate::change::Lsn;
use crate::pipeline::batch::Batch;

/// Rows converted to Arrow at a time when a flush writes its files: the Parquet
/// writer encodes each chunk as it comes, so a flush holds one chunk's arrays, not
/// the whole buffer's.
pub(super) const WRITE_CHUNK_ROWS: usize = 8192;

/// How many leading values of a column decide whether it is dictionary-encoded.
pub(super) const DICTIONARY_SAMPLE: usize = 1024;

/// Parquet writer properties for `batch`: Snappy, as delta-rs writes by default, and
/// dictionary encoding only for the columns whose values repeat. A dictionary of
/// mostly distinct values (keys, timestamps, hashed e-mails) costs a hash-table
/// insert per value and makes the file no smaller.
pub(super) fn writer_properties(batch: &::arrow::array::RecordBatch) -> WriterProperties {
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
pub(super) fn repeats(column: &dyn ::arrow::array::Array) -> Option<bool> {
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
pub(super) async fn write_files(
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
pub(super) fn chunks(segments: &[Segment], rows: usize) -> impl Iterator<Item = &[Segment]> {
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
pub(super) fn split_segments(segments: &[Segment], open: Lsn) -> (Vec<Segment>, Vec<Segment>) {
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
pub(super) fn shape(segment: &Segment) -> Segment {
    let table = &segment.batch.tables[segment.table as usize];
    Segment {
        batch: Arc::new(Batch {
            tables: vec![crate::pipeline::batch::BatchTable {
                relation: table.relation.clone(),
                column_tags: table.column_tags.clone(),
                rows: Vec::new(),
            }],
            pipeline: segment.batch.pipeline.clone(),
            policy: segment.batch.policy.clone(),
            stages: segment.batch.stages.clone(),
            ..Batch::default()
        }),
        table: 0,
        rows: Vec::new(),
    }
}

/// Whether `shape` already stands for `segment`'s relation version, tags and lineage.
pub(super) fn same_shape(shape: &Segment, segment: &Segment) -> bool {
    let a = &shape.batch.tables[shape.table as usize];
    let b = &segment.batch.tables[segment.table as usize];
    Arc::ptr_eq(&a.relation, &b.relation)
        && a.column_tags == b.column_tags
        && shape.batch.pipeline == segment.batch.pipeline
        && shape.batch.policy == segment.batch.policy
}
