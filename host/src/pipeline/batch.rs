//! The batch: a group of whole committed transactions as the guests see and edit it,
//! and as the sinks receive it once every stage has run.
//!
//! ```text
//! [Transaction] ──Batch::from_transactions──▶ Batch ──stage 1..n (edit in place)──▶ Arc<Batch> ──▶ sinks
//! ```
//!
//! Invariants:
//! - A batch holds whole transactions, in commit order, except that its last entry may
//!   be a part of a large transaction that more parts follow (see
//!   [`Part`](crate::change::Part)); the transaction's other parts come in the
//!   batches right after, the last of them first in its batch.
//! - Rows keep the order of their changes; `rows[i].txn` indexes `txns`.
//! - A table entry is one relation *version* (`Arc<Relation>` identity): a schema change
//!   inside a batch yields two entries for the same table name.
//! - Edits only grow `written_bytes`; the runtime compares it to the output cap.

use std::collections::HashMap;
use std::sync::Arc;

use crate::change::{Change, Lsn, Relation, Transaction, TxnMeta, Value};

/// A table in a batch: one relation version and the tags guests gave its columns.
#[derive(Clone, Debug)]
pub struct BatchTable {
    pub relation: Arc<Relation>,
    /// Tags per column, in column order.
    pub column_tags: Vec<Vec<String>>,
    /// Indexes of the batch rows that belong to this table, in batch order.
    pub rows: Vec<u32>,
}

/// One row of a batch and what the guests decided about it.
#[derive(Clone, Debug)]
pub struct BatchRow {
    /// Index of the row's table in `Batch::tables`.
    pub table: u32,
    /// Index of the row's transaction in `Batch::txns`.
    pub txn: u32,
    pub change: Change,
    pub dropped: bool,
    pub routes: Vec<String>,
    pub tags: Vec<String>,
    pub annotations: Vec<(String, String)>,
}

impl BatchRow {
    /// The route a row takes when no guest added one.
    pub const DEFAULT_ROUTE: &'static str = "default";

    /// Whether the row goes to a sink that takes `routes`.
    pub fn has_route_in(&self, routes: &[String]) -> bool {
        if self.routes.is_empty() {
            routes.iter().any(|r| r == Self::DEFAULT_ROUTE)
        } else {
            self.routes.iter().any(|r| routes.contains(r))
        }
    }

    /// The value of an annotation, if a guest set it.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A group of whole committed transactions.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub txns: Vec<TxnMeta>,
    pub tables: Vec<BatchTable>,
    pub rows: Vec<BatchRow>,
    /// Bytes written by guests into this batch so far (values, routes, tags, annotations).
    pub written_bytes: usize,
    /// The pipeline version that processed the batch (`_pipeline`); empty before.
    pub pipeline: Arc<str>,
    /// The version of the policy its rows passed (`_policy`); empty where no gate ran.
    pub policy: Arc<str>,
    /// The stages of that pipeline, in order, for lineage (the lake's commit info).
    pub stages: Arc<[StageId]>,
    /// What the policy kept out of these transactions (or, in a batch without
    /// transactions, out of one it stopped): the spine records each as an event.
    pub denials: Vec<crate::policy::Denial>,
}

/// A stage as lineage records it: its name in the plugin folder and the SHA-256 of
/// its `.wasm`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StageId {
    pub name: String,
    pub sha256: String,
}

impl Batch {
    /// Builds a batch from transactions in commit order.
    pub fn from_transactions(txns: impl IntoIterator<Item = Transaction>) -> Batch {
        let mut batch = Batch::default();
        let mut table_of: HashMap<*const Relation, u32> = HashMap::new();
        for txn in txns {
            let txn_index = batch.txns.len() as u32;
            batch.txns.push(txn.meta);
            batch.rows.reserve(txn.changes.len());
            for change in txn.changes {
                let key = Arc::as_ptr(&change.relation);
                let table = *table_of.entry(key).or_insert_with(|| {
                    batch.tables.push(BatchTable {
                        column_tags: vec![Vec::new(); change.relation.columns.len()],
                        relation: change.relation.clone(),
                        rows: Vec::new(),
                    });
                    (batch.tables.len() - 1) as u32
                });
                let row = batch.rows.len() as u32;
                batch.tables[table as usize].rows.push(row);
                batch.rows.push(BatchRow {
                    table,
                    txn: txn_index,
                    change,
                    dropped: false,
                    routes: Vec::new(),
                    tags: Vec::new(),
                    annotations: Vec::new(),
                });
            }
        }
        batch
    }

    /// The end LSN of the last transaction this batch completes: what the slot may be
    /// acknowledged up to once every sink has made it (and the parts before) durable.
    /// `None` when the batch only holds a part that more parts follow.
    pub fn end_lsn(&self) -> Option<Lsn> {
        self.txns
            .iter()
            .rev()
            .find(|t| t.completes())
            .map(|t| t.end_lsn)
    }

    /// Whether the batch ends inside a transaction: its last entry is a part that
    /// more parts follow.
    pub fn ends_open(&self) -> bool {
        self.txns.last().is_some_and(|t| !t.completes())
    }

    /// Total size of the batch's values, for size bounds.
    pub fn value_bytes(&self) -> usize {
        self.rows
            .iter()
            .map(|r| {
                let image = |v: &Option<Vec<Value>>| {
                    v.as_ref().map_or(0, |vs| {
                        vs.iter().map(Value::heap_size).sum::<usize>() + vs.len() * 8
                    })
                };
                image(&r.change.new) + image(&r.change.old)
            })
            .sum()
    }

    /// Transactions as they went in, for the dead-letter queue: the original changes
    /// of every row. Only meaningful before any stage edited the batch.
    pub fn into_transactions(self) -> Vec<Transaction> {
        let mut out: Vec<Transaction> = self
            .txns
            .into_iter()
            .map(|meta| Transaction {
                meta,
                changes: Vec::new(),
            })
            .collect();
        for row in self.rows {
            out[row.txn as usize].changes.push(row.change);
        }
        out
    }
}
