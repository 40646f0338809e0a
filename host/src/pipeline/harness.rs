//! `airlock guest test`: the guest author's harness. Changes come in as JSON lines,
//! run through one guest (or a folder of them) exactly as the live pipeline runs
//! them, and go out as JSON lines with their routes, tags and annotations.
//!
//! Input, one change per line (`examples/changes.jsonl`):
//! ```json
//! {"table":"public.customers","op":"insert","columns":[{"name":"id","type":"int4","key":true},{"name":"email","type":"text"}],"new":{"id":1,"email":"ada@example.com"}}
//! ```
//! `columns` is optional: without it columns are taken from the keys of `new`/`old`
//! (in alphabetical order) and typed from the JSON values. `op` is one of `insert`,
//! `update`, `delete`, `snapshot`, `truncate`; `xid`, `lsn` and `commit_time` are
//! optional. Each line is its own transaction.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::batch::Batch;
use super::{BATCH_ROWS, Pipeline};
use crate::change::json::{row_to_json, value_from_json};
use crate::change::{
    Change, Column, Lsn, Op, Relation, ReplicaIdentity, Transaction, TxnMeta, Value, oid,
};

/// Why the harness could not run.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("input line {line}: {message}")]
    Input { line: usize, message: String },
    #[error("{0}")]
    Guest(#[from] super::runtime::RuntimeError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputColumn {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default)]
    key: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputChange {
    table: String,
    op: String,
    columns: Option<Vec<InputColumn>>,
    new: Option<Map<String, Json>>,
    old: Option<Map<String, Json>>,
    xid: Option<u32>,
    lsn: Option<String>,
    commit_time: Option<i64>,
}

/// The OID and type modifier of a PostgreSQL type name as written in SQL.
pub fn type_from_name(name: &str) -> (u32, i32) {
    let lower = name.trim().to_ascii_lowercase();
    let (base, args) = match lower.split_once('(') {
        Some((b, rest)) => (b.trim(), rest.trim_end_matches(')').to_owned()),
        None => (lower.as_str(), String::new()),
    };
    let oid = match base {
        "bool" | "boolean" => oid::BOOL,
        "int2" | "smallint" => oid::INT2,
        "int4" | "int" | "integer" => oid::INT4,
        "int8" | "bigint" => oid::INT8,
        "oid" => oid::OID,
        "float4" | "real" => oid::FLOAT4,
        "float8" | "double precision" => oid::FLOAT8,
        "numeric" | "decimal" => oid::NUMERIC,
        "text" => oid::TEXT,
        "varchar" | "character varying" => oid::VARCHAR,
        "bpchar" | "char" | "character" => oid::BPCHAR,
        "name" => oid::NAME,
        "bytea" => oid::BYTEA,
        "date" => oid::DATE,
        "time" => oid::TIME,
        "timestamp" => oid::TIMESTAMP,
        "timestamptz" => oid::TIMESTAMPTZ,
        "uuid" => oid::UUID,
        "json" => oid::JSON,
        "jsonb" => oid::JSONB,
        "interval" => oid::INTERVAL,
        _ => 0,
    };
    let numbers: Vec<i32> = args
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    let typmod = match (oid, numbers.as_slice()) {
        (oid::NUMERIC, [p]) => (p << 16) + 4, // scale 0
        (oid::NUMERIC, [p, s]) => ((p << 16) | s) + 4,
        (oid::VARCHAR | oid::BPCHAR, [n]) => n + 4,
        _ => -1,
    };
    (oid, typmod)
}

fn infer_type(value: &Json) -> u32 {
    match value {
        Json::Bool(_) => oid::BOOL,
        Json::Number(n) if n.is_i64() || n.is_u64() => oid::INT8,
        Json::Number(_) => oid::FLOAT8,
        Json::Object(o) if o.contains_key("$unchanged") => oid::TEXT,
        Json::Object(_) | Json::Array(_) => oid::JSONB,
        _ => oid::TEXT,
    }
}

/// A relation as the input describes it: its name and its columns (name, type OID,
/// type modifier, key).
type RelationKey = (String, Vec<(String, u32, i32, bool)>);

/// Reads JSON lines into transactions, one per line.
pub fn read_changes(input: impl BufRead) -> Result<Vec<Transaction>, HarnessError> {
    let mut relations: HashMap<RelationKey, Arc<Relation>> = HashMap::new();
    let mut txns = Vec::new();
    for (index, line) in input.lines().enumerate() {
        let number = index + 1;
        let line = line?;
        if line.trim().is_empty() || line.trim_start().starts_with("//") {
            continue;
        }
        let bad = |message: String| HarnessError::Input {
            line: number,
            message,
        };
        let change: InputChange = serde_json::from_str(&line)
            .map_err(|e| bad(format!("{e}: expected an object like {{\"table\":\"public.t\",\"op\":\"insert\",\"new\":{{...}}}}")))?;
        let op = Op::from_name(&change.op).ok_or_else(|| {
            bad(format!(
                "unknown op `{}`: expected insert, update, delete, snapshot or truncate",
                change.op
            ))
        })?;
        let (schema, name) = change.table.split_once('.').ok_or_else(|| {
            bad(format!(
                "table `{}` must be written as `schema.table`",
                change.table
            ))
        })?;
        let columns: Vec<(String, u32, i32, bool)> = match &change.columns {
            Some(cols) => cols
                .iter()
                .map(|c| {
                    let (oid, typmod) = type_from_name(&c.type_name);
                    (c.name.clone(), oid, typmod, c.key)
                })
                .collect(),
            None => {
                let mut seen: Vec<(String, u32, i32, bool)> = Vec::new();
                for image in [&change.new, &change.old].into_iter().flatten() {
                    for (k, v) in image {
                        if !seen.iter().any(|c| &c.0 == k) {
                            seen.push((k.clone(), infer_type(v), -1, false));
                        }
                    }
                }
                seen.sort_by(|a, b| a.0.cmp(&b.0));
                seen
            }
        };
        let relation = relations
            .entry((change.table.clone(), columns.clone()))
            .or_insert_with(|| {
                Arc::new(Relation {
                    comment_classes: Default::default(),
                    oid: 0,
                    schema: schema.to_owned(),
                    name: name.to_owned(),
                    replica_identity: ReplicaIdentity::Default,
                    columns: columns
                        .iter()
                        .map(|(name, type_oid, type_modifier, key)| Column {
                            name: name.clone(),
                            type_oid: *type_oid,
                            type_modifier: *type_modifier,
                            key: *key,
                        })
                        .collect(),
                })
            })
            .clone();
        let image = |which: &str,
                     map: &Option<Map<String, Json>>|
         -> Result<Option<Vec<Value>>, HarnessError> {
            let Some(map) = map else { return Ok(None) };
            if let Some(unknown) = map
                .keys()
                .find(|k| !relation.columns.iter().any(|c| &c.name == *k))
            {
                return Err(bad(format!(
                    "`{which}` has column `{unknown}`, which is not in `columns`"
                )));
            }
            relation
                .columns
                .iter()
                .map(|c| {
                    map.get(&c.name)
                        .map_or(Ok(Value::Null), |v| value_from_json(c, v))
                        .map_err(|e| bad(format!("`{which}.{}`: {e}", c.name)))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        };
        let new = image("new", &change.new)?;
        let old = image("old", &change.old)?;
        let lsn = match &change.lsn {
            Some(text) => text.parse::<Lsn>().map_err(|e| bad(e.to_string()))?,
            None => Lsn((number as u64) << 8),
        };
        txns.push(Transaction {
            meta: TxnMeta {
                xid: change.xid.unwrap_or(number as u32),
                commit_lsn: lsn,
                end_lsn: Lsn(lsn.0 + 1),
                commit_ts: change.commit_time.unwrap_or(0),
                part: crate::change::Part::WHOLE,
                copied: None,
            },
            changes: vec![Change {
                identity: None,
                relation,
                op,
                lsn,
                new,
                old,
            }],
        });
    }
    Ok(txns)
}

/// One output line per row.
pub fn row_lines(batch: &Batch) -> Vec<Json> {
    batch
        .rows
        .iter()
        .map(|row| {
            let table = &batch.tables[row.table as usize];
            let rel = &table.relation;
            let txn = &batch.txns[row.txn as usize];
            let column_tags: Map<String, Json> = rel
                .columns
                .iter()
                .zip(&table.column_tags)
                .filter(|(_, tags)| !tags.is_empty())
                .map(|(c, tags)| (c.name.clone(), json!(tags)))
                .collect();
            let annotations: Map<String, Json> =
                row.annotations.iter().map(|(k, v)| (k.clone(), Json::from(v.as_str()))).collect();
            json!({
                "table": rel.qualified_name(),
                "op": row.change.op.name(),
                "xid": txn.xid,
                "lsn": row.change.lsn.to_string(),
                "new": row.change.new.as_ref().map(|v| row_to_json(rel, v)),
                "old": row.change.old.as_ref().map(|v| row_to_json(rel, v)),
                "dropped": row.dropped,
                "routes": if row.routes.is_empty() { vec![super::batch::BatchRow::DEFAULT_ROUTE.to_owned()] } else { row.routes.clone() },
                "tags": row.tags,
                "column_tags": column_tags,
                "annotations": annotations,
                "pipeline": &*batch.pipeline,
            })
        })
        .collect()
}

/// Runs `pipeline` over the changes read from `input` and writes one JSON line per row.
pub fn run(
    pipeline: &mut Pipeline,
    input: impl BufRead,
    mut output: impl Write,
) -> Result<usize, HarnessError> {
    let txns = read_changes(input)?;
    let mut written = 0;
    let mut pending = Vec::new();
    let mut rows = 0;
    let mut flush =
        |pending: &mut Vec<Transaction>, output: &mut dyn Write| -> Result<usize, HarnessError> {
            if pending.is_empty() {
                return Ok(0);
            }
            let batch = Batch::from_transactions(std::mem::take(pending));
            let batch = pipeline.process(batch).map_err(|(_, e)| e)?;
            let lines = row_lines(&batch);
            for line in &lines {
                writeln!(output, "{line}")?;
            }
            Ok(lines.len())
        };
    for txn in txns {
        rows += txn.changes.len();
        pending.push(txn);
        if rows >= BATCH_ROWS {
            written += flush(&mut pending, &mut output)?;
            rows = 0;
        }
    }
    written += flush(&mut pending, &mut output)?;
    Ok(written)
}
