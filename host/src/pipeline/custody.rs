//! Custody: a class whose action is `guest:STAGE` reaches that stage raw, and the
//! pipeline holds the stage to it. After the stage runs on a batch, every value of the
//! class that is not `null` (new and old images, key columns included) must be one
//! the stage wrote; if one is not, the batch is not delivered.
//!
//! ```text
//! gate (passes the class raw) ──▶ STAGE (first) ──▶ Custody::check(batch, STAGE's edits)
//!                                                        │ every value written: later stages, sinks
//!                                                        └ one is not: Violation ─▶ spine `request_denied`, run stops
//! ```
//!
//! Invariants:
//! - The stage runs before every other (the registry refuses a folder where it does
//!   not), so no other guest sees a value of its classes raw.
//! - A pipeline without the stage, or a stage that skips a table, a row, an image or
//!   a value, fails the check: the host does not trust the stage's own account.
//! - `null` and unchanged TOAST values hold nothing to write (the lake keeps the
//!   value it wrote before), and dropped rows go nowhere: those are not counted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::batch::Batch;
use super::guest::Edits;
use crate::change::{Relation, Value};
use crate::policy::{Policy, Violation};

/// Of one relation version: the columns in a stage's custody, as (index, class).
type Columns = Arc<[(u32, String)]>;

/// The responsible stage and, per relation version, the columns it must write.
#[derive(Debug)]
pub struct Custody {
    policy: Arc<Policy>,
    stage: String,
    /// Per relation OID: the version planned and its columns in the stage's custody
    /// (index, class).
    columns: HashMap<u32, (Arc<Relation>, Columns)>,
}

impl Custody {
    /// The custody `policy` asks for, if any of its classes names a stage.
    pub fn new(policy: Arc<Policy>) -> Option<Custody> {
        let stage = policy.custodian()?.0.to_owned();
        Some(Custody {
            policy,
            stage,
            columns: HashMap::new(),
        })
    }

    /// The responsible stage's name (its file stem).
    pub fn stage(&self) -> &str {
        &self.stage
    }

    fn columns_of(&mut self, relation: &Arc<Relation>) -> Columns {
        if let Some((planned, columns)) = self.columns.get(&relation.oid)
            && Arc::ptr_eq(planned, relation)
        {
            return columns.clone();
        }
        let columns: Columns = relation
            .columns
            .iter()
            .enumerate()
            .filter_map(|(i, column)| {
                let comment = relation.comment_classes.get(&column.name);
                let r = self.policy.resolve(
                    &relation.schema,
                    &relation.name,
                    &column.name,
                    comment.map(String::as_str),
                );
                (r.action.stage() == Some(self.stage.as_str()))
                    .then(|| (i as u32, r.class.unwrap_or_default()))
            })
            .collect();
        self.columns
            .insert(relation.oid, (relation.clone(), columns.clone()));
        columns
    }

    /// Checks `batch` as the stage left it: `edits` are the stage's own, `None` when
    /// the pipeline has no such stage.
    pub fn check(&mut self, batch: &Batch, edits: Option<&Edits>) -> Result<(), Violation> {
        let mut written: Option<HashSet<(u32, u32, bool)>> = None;
        let mut first: Option<(u32, u32, String)> = None;
        let mut unwritten = 0usize;
        for table in &batch.tables {
            let columns = self.columns_of(&table.relation);
            if columns.is_empty() {
                continue;
            }
            let written = written
                .get_or_insert_with(|| edits.map(|e| e.values().collect()).unwrap_or_default());
            for &row in &table.rows {
                let r = &batch.rows[row as usize];
                if r.dropped {
                    continue;
                }
                let images = [(&r.change.new, false), (&r.change.old, true)];
                for (image, old) in images {
                    let Some(values) = image else { continue };
                    for (column, class) in columns.iter() {
                        let value = &values[*column as usize];
                        if matches!(value, Value::Null | Value::UnchangedToast)
                            || written.contains(&(row, *column, old))
                        {
                            continue;
                        }
                        unwritten += 1;
                        if first.is_none() {
                            first = Some((row, *column, class.clone()));
                        }
                    }
                }
            }
        }
        match first {
            None => Ok(()),
            Some((row, column, class)) => {
                let r = &batch.rows[row as usize];
                let relation = &batch.tables[r.table as usize].relation;
                let txn = &batch.txns[r.txn as usize];
                Err(Violation {
                    table: relation.qualified_name(),
                    column: relation.columns[column as usize].name.clone(),
                    class,
                    stage: self.stage.clone(),
                    unwritten,
                    xid: txn.xid,
                    commit_lsn: txn.commit_lsn,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::change::{
        Change, Column, Lsn, Op, Part, ReplicaIdentity, Transaction, TxnMeta, oid,
    };
    use crate::policy::{Action, Rule, Unclassified};

    fn policy() -> Arc<Policy> {
        let classes = BTreeMap::from([
            ("public".to_owned(), Action::Keep),
            ("secret".to_owned(), Action::Guest("10-mask".into())),
        ]);
        let rules = vec![
            Rule {
                pattern: "public.t.id".into(),
                class: "public".into(),
            },
            Rule {
                pattern: "public.t.email".into(),
                class: "secret".into(),
            },
        ];
        Arc::new(Policy::new(Unclassified::Deny, classes, rules, None))
    }

    fn batch(rows: &[(Option<&str>, Option<&str>)]) -> Batch {
        let relation = Arc::new(Relation {
            comment_classes: Default::default(),
            oid: 7,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: ["id", "email"]
                .iter()
                .map(|n| Column {
                    name: (*n).into(),
                    type_oid: if *n == "id" { oid::INT8 } else { oid::TEXT },
                    type_modifier: -1,
                    key: *n == "id",
                })
                .collect(),
        });
        let image = |email: Option<&str>| {
            email.map(|e| {
                vec![
                    Value::Int(1),
                    if e.is_empty() {
                        Value::Null
                    } else {
                        Value::Text(e.into())
                    },
                ]
            })
        };
        let changes = rows
            .iter()
            .map(|(new, old)| Change {
                identity: None,
                relation: relation.clone(),
                op: Op::Update,
                lsn: Lsn(5),
                new: image(*new),
                old: image(*old),
            })
            .collect();
        Batch::from_transactions([Transaction {
            meta: TxnMeta {
                xid: 42,
                commit_lsn: Lsn(0x10),
                end_lsn: Lsn(0x11),
                commit_ts: 0,
                part: Part::WHOLE,
                copied: None,
            },
            changes,
        }])
    }

    #[test]
    fn every_value_of_the_class_must_be_written_by_the_stage() {
        let mut custody = Custody::new(policy()).expect("a class names a stage");
        assert_eq!(custody.stage(), "10-mask");
        let b = batch(&[(Some("a@x"), Some("b@x")), (Some(""), None)]);
        // Nothing written: both values of row 0 count; the null of row 1 does not.
        let v = custody.check(&b, Some(&Edits::default())).unwrap_err();
        assert_eq!(
            (
                v.table.as_str(),
                v.column.as_str(),
                v.class.as_str(),
                v.unwritten,
                v.xid
            ),
            ("public.t", "email", "secret", 2, 42)
        );
        // Without the stage at all: the same.
        assert_eq!(custody.check(&b, None).unwrap_err().unwritten, 2);
        // The new image written, the old one not: still refused.
        let edits = Edits::written([(0, 1, false)]);
        assert_eq!(custody.check(&b, Some(&edits)).unwrap_err().unwritten, 1);
        let edits = Edits::written([(0, 1, false), (0, 1, true)]);
        assert_eq!(custody.check(&b, Some(&edits)), Ok(()));
        // A dropped row goes nowhere.
        let mut dropped = b.clone();
        dropped.rows[0].dropped = true;
        assert_eq!(custody.check(&dropped, Some(&Edits::default())), Ok(()));
    }

    #[test]
    fn a_policy_without_a_stage_class_needs_no_custody() {
        let p = Policy::new(Unclassified::Deny, BTreeMap::new(), Vec::new(), None);
        assert!(Custody::new(Arc::new(p)).is_none());
    }
}
