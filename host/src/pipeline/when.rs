//! `[when]` in a stage's settings: which rows the stage applies to, evaluated by the
//! host so the guest is not called for the rest.
//!
//! ```text
//! batch ──matching rows?──▶ none: the stage is skipped (no guest call)
//!                          ├▶ all:  the guest sees the batch as it is
//!                          └▶ some: the guest sees a batch of those rows only
//!                                   (moved out, not copied), then they move back
//!                                   and its edits are renumbered to the batch's rows
//! ```
//!
//! Invariants:
//! - A guest under `when` sees exactly the matching rows, in batch order, with the
//!   tables they belong to; it cannot read or write any other row.
//! - Every row moves back to its place whatever the call did; the edits the stage
//!   returns address the whole batch, so undo and the policy's custody work as for
//!   any other stage.

use super::RuntimeError;
use super::batch::{Batch, BatchRow, BatchTable};
use super::guest::Edits;
use crate::change::Op;

/// The keys `[when]` takes.
const KEYS: &str = "tables, ops, routes";
/// The operations `when.ops` names, as the contract's `op` names them.
const OPS: &str = "insert, update, delete, snapshot, truncate";

/// A stage's `[when]`: each list that is given must match (tables and ops and routes);
/// within a list, any entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct When {
    /// `schema.table` or `table` (any schema), `*` matching any run of characters.
    pub tables: Vec<String>,
    pub ops: Vec<Op>,
    /// Rows that an earlier stage sent to one of these routes (`default` for rows
    /// without a route).
    pub routes: Vec<String>,
}

impl When {
    /// Takes `when.*` out of a stage's flattened settings (the guest never sees them).
    /// `None` when there are none; an error names the file, the key and the fix.
    pub fn take(
        settings: &mut Vec<(String, String)>,
        path: &str,
    ) -> Result<Option<When>, RuntimeError> {
        let mut when = When::default();
        let mut found = false;
        let mut error = None;
        settings.retain(|(key, value)| {
            let refused = |message: String| RuntimeError::Load {
                path: path.to_owned(),
                message,
            };
            let Some(what) = key.strip_prefix("when.") else {
                if key == "when" {
                    error.get_or_insert(refused(format!(
                        "`when` must be a table (`[when]` with some of {KEYS}), not a value"
                    )));
                }
                return key != "when";
            };
            found = true;
            let value = value.trim();
            if value.is_empty() {
                error.get_or_insert(refused(format!(
                    "`{key}` has an empty entry; remove it, or name a table, operation or route"
                )));
            }
            match what {
                "tables" => when.tables.push(value.to_owned()),
                "routes" => when.routes.push(value.to_owned()),
                "ops" => match Op::from_name(value) {
                    Some(op) => when.ops.push(op),
                    None => {
                        error.get_or_insert(refused(format!(
                            "`when.ops` has {value:?}, which is not an operation; expected some of {OPS}"
                        )));
                    }
                },
                other => {
                    error.get_or_insert(refused(format!(
                        "`when.{other}` is not a `[when]` key; expected {KEYS}"
                    )));
                }
            }
            false
        });
        match error {
            Some(error) => Err(error),
            None => Ok(found.then_some(when)),
        }
    }

    /// Whether the stage applies to rows of `table` at all (by `tables`).
    fn takes_table(&self, table: &BatchTable) -> bool {
        let relation = &table.relation;
        self.tables.is_empty()
            || self
                .tables
                .iter()
                .any(|p| crate::policy::matches_table(p, &relation.schema, &relation.name))
    }

    /// The rows of `batch` the stage applies to, in batch order. Table patterns are
    /// matched once per table of the batch, not per row.
    pub fn rows(&self, batch: &Batch) -> Vec<u32> {
        let tables: Vec<bool> = batch.tables.iter().map(|t| self.takes_table(t)).collect();
        batch
            .rows
            .iter()
            .enumerate()
            .filter(|(_, row)| {
                tables[row.table as usize]
                    && (self.ops.is_empty() || self.ops.contains(&row.change.op))
                    && (self.routes.is_empty() || row.has_route_in(&self.routes))
            })
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// One line for `check` and the logs, e.g. `tables public.orders; ops insert`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.tables.is_empty() {
            parts.push(format!("tables {}", self.tables.join(", ")));
        }
        if !self.ops.is_empty() {
            let ops: Vec<&str> = self.ops.iter().map(|&o| o.name()).collect();
            parts.push(format!("ops {}", ops.join(", ")));
        }
        if !self.routes.is_empty() {
            parts.push(format!("routes {}", self.routes.join(", ")));
        }
        parts.join("; ")
    }
}

/// The rows of a batch lent to a stage under `when`, and where they came from.
pub struct Lent {
    /// Sub-batch row `i` is batch row `rows[i]`.
    rows: Vec<u32>,
    /// Sub-batch table `i` is batch table `tables[i]`.
    tables: Vec<u32>,
}

/// A row left in the batch while its own is lent out.
fn placeholder(row: &BatchRow) -> BatchRow {
    BatchRow {
        table: row.table,
        txn: row.txn,
        change: crate::change::Change {
            relation: row.change.relation.clone(),
            op: row.change.op,
            lsn: row.change.lsn,
            new: None,
            old: None,
            identity: None,
        },
        dropped: row.dropped,
        routes: Vec::new(),
        tags: Vec::new(),
        annotations: Vec::new(),
    }
}

/// Moves rows `rows` (batch order) and their tables out of `batch` into a batch of
/// their own.
pub fn lend(batch: &mut Batch, rows: Vec<u32>) -> (Batch, Lent) {
    let mut tables: Vec<u32> = Vec::new();
    let mut table_of = vec![u32::MAX; batch.tables.len()];
    let mut sub = Batch {
        txns: batch.txns.clone(),
        tables: Vec::new(),
        rows: Vec::with_capacity(rows.len()),
        // What the stage writes is counted here and added back to the batch.
        written_bytes: 0,
        pipeline: batch.pipeline.clone(),
        policy: batch.policy.clone(),
        stages: batch.stages.clone(),
        denials: Vec::new(),
    };
    for &row in &rows {
        let at = batch.rows[row as usize].table as usize;
        if table_of[at] == u32::MAX {
            table_of[at] = tables.len() as u32;
            tables.push(at as u32);
            let table = &mut batch.tables[at];
            sub.tables.push(BatchTable {
                relation: table.relation.clone(),
                column_tags: std::mem::take(&mut table.column_tags),
                rows: Vec::new(),
            });
        }
        let slot = &mut batch.rows[row as usize];
        let mut moved = std::mem::replace(slot, placeholder(slot));
        moved.table = table_of[at];
        sub.tables[moved.table as usize]
            .rows
            .push(sub.rows.len() as u32);
        sub.rows.push(moved);
    }
    (sub, Lent { rows, tables })
}

impl Lent {
    /// Moves the rows and their tables back into `batch`, and renumbers `edits` (the
    /// stage's, on the lent rows) to the batch's rows and tables.
    pub fn give_back(self, batch: &mut Batch, sub: Batch, edits: Option<Edits>) -> Option<Edits> {
        batch.written_bytes += sub.written_bytes;
        for (i, mut row) in sub.rows.into_iter().enumerate() {
            row.table = self.tables[row.table as usize];
            batch.rows[self.rows[i] as usize] = row;
        }
        for (i, table) in sub.tables.into_iter().enumerate() {
            batch.tables[self.tables[i] as usize].column_tags = table.column_tags;
        }
        edits.map(|e| e.renumber(&self.rows, &self.tables))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn when_keys_are_taken_out_of_the_guest_settings() {
        let mut s = settings(&[
            ("columns", "email"),
            ("when.tables", "public.orders"),
            ("when.ops", "insert"),
            ("when.ops", "snapshot"),
            ("when.routes", "restricted"),
        ]);
        let when = When::take(&mut s, "20-mask.toml").unwrap().unwrap();
        assert_eq!(s, settings(&[("columns", "email")]));
        assert_eq!(when.tables, vec!["public.orders"]);
        assert_eq!(when.ops, vec![Op::Insert, Op::Read]);
        assert_eq!(when.routes, vec!["restricted"]);
        assert_eq!(
            when.describe(),
            "tables public.orders; ops insert, snapshot; routes restricted"
        );
        let mut none = settings(&[("columns", "email")]);
        assert_eq!(When::take(&mut none, "x").unwrap(), None);
    }

    #[test]
    fn bad_when_settings_name_the_file_the_key_and_the_fix() {
        let err = |pairs: &[(&str, &str)]| {
            When::take(&mut settings(pairs), "plugins/20-mask.toml")
                .unwrap_err()
                .to_string()
        };
        let e = err(&[("when.op", "insert")]);
        assert!(
            e.contains("plugins/20-mask.toml")
                && e.contains("`when.op`")
                && e.contains("tables, ops, routes"),
            "{e}"
        );
        let e = err(&[("when.ops", "upsert")]);
        assert!(
            e.contains("\"upsert\"") && e.contains("insert, update, delete, snapshot, truncate"),
            "{e}"
        );
        let e = err(&[("when.tables", " ")]);
        assert!(e.contains("empty entry"), "{e}");
        let e = err(&[("when", "orders")]);
        assert!(e.contains("`when` must be a table"), "{e}");
    }
}
