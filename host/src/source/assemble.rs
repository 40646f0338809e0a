//! Decoded pgoutput messages into committed transactions: `Begin`, the changes, then
//! `Commit` make one [`Transaction`], handed on whole, or in parts of at most
//! [`PART_CHANGES`] changes or [`PART_BYTES`] bytes of values when it grows past them.
//!
//! Invariants:
//! - A change carries the relation as it was described when the change came: a later
//!   `Relation` message never alters an earlier change.
//! - After a reconnect inside a transaction handed on in part, the changes that went on
//!   before are skipped, so no change is handed on twice.
//! - An error names the LSN of the message it is about.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tracing::debug;

use super::catalog;
use super::error::SourceError;
use super::pgoutput::{self, Message, OldKind, TupleData, TupleValue};
use crate::change::text;
use crate::change::{Change, Lsn, Op, Relation, Transaction, TxnMeta, Value};
use crate::identity::{self, Identity};
use crate::policy::COMMENT_MESSAGE_PREFIX;

/// A transaction is handed on in parts of at most this many changes...
pub const PART_CHANGES: usize = 1024;
/// ... or about this many bytes of values, whichever comes first, so that memory stays
/// bounded however large a transaction is (see [`crate::change::Part`]).
pub const PART_BYTES: usize = 4 << 20;

/// Turns decoded pgoutput messages into committed transactions, handed on whole, or
/// in parts when they grow past [`PART_CHANGES`] or [`PART_BYTES`].
#[derive(Debug, Default)]
pub(super) struct Assembler {
    pub(super) relations: HashMap<u32, Arc<Relation>>,
    pub(super) current: Option<Transaction>,
    /// Bytes of the values in `current`'s changes.
    pub(super) current_bytes: usize,
    /// Changes of the current transaction before `current`'s (in parts handed on, or
    /// skipped after a reconnect).
    pub(super) offset: u64,
    /// After a reconnect inside a transaction handed on in part: its commit LSN and
    /// how many of its changes went on before. Its first changes are not repeated.
    pub(super) resume: Option<(Lsn, u64)>,
    /// Changes of the current transaction still to skip (see `resume`).
    pub(super) skip: u64,
    /// Resolved non-built-in column types: OID → (base type OID, type modifier).
    pub(super) types: HashMap<u32, (u32, i32)>,
    /// A relation just described whose column types need a catalog lookup.
    pub(super) unresolved: Option<u32>,
    /// The relation the last Relation message described, until the streamer reads
    /// what the catalog adds to it.
    pub(super) described: Option<u32>,
    /// A relation whose column comments changed (an `airlock.policy` message, in
    /// stream order), with the classes its comments give as the message says them
    /// (`None`: a message without them, so the streamer reads the catalog).
    pub(super) comments_changed: Option<(u32, Option<BTreeMap<String, String>>)>,
    /// What to do with identity messages ([`identity::Mode`]).
    pub(super) identity_mode: identity::Mode,
    /// The last identity message of the current transaction.
    pub(super) identity: Option<Arc<Identity>>,
    /// Tables of changes handed on without an identity ([`identity::Mode::Record`]),
    /// for the streamer to report.
    pub(super) unattributed: Vec<String>,
    /// The content of an incremental snapshot's watermark in the current
    /// transaction, for the streamer (see [`super::incremental`]).
    pub(super) watermark: Option<Vec<u8>>,
    /// Requests of `airlock snapshot`, in stream order, for the streamer.
    pub(super) requests: Vec<Vec<u8>>,
}

impl Assembler {
    /// Rewrites domain columns to their base type with the types resolved so far;
    /// returns whether some non-built-in type is not resolved yet.
    pub(super) fn apply_types(&self, relation: &mut Relation) -> bool {
        let mut missing = false;
        for column in &mut relation.columns {
            if column.type_oid < catalog::FIRST_NORMAL_OID {
                continue;
            }
            match self.types.get(&column.type_oid) {
                Some(&(base, typmod)) => {
                    column.type_oid = base;
                    if column.type_modifier == -1 {
                        column.type_modifier = typmod;
                    }
                }
                None => missing = true,
            }
        }
        missing
    }

    pub(super) fn in_transaction(&self) -> bool {
        self.current.is_some()
    }

    /// Applies one XLogData payload; returns the transaction when it commits, or a
    /// part of it when it has grown past the part bounds.
    pub(super) fn apply(
        &mut self,
        lsn: Lsn,
        data: &[u8],
    ) -> Result<Option<Transaction>, SourceError> {
        let message =
            pgoutput::decode(data).map_err(|source| SourceError::Decode { lsn, source })?;
        let out_of_order = |reason: &str| SourceError::Stream {
            lsn,
            reason: reason.to_owned(),
        };
        match message {
            Message::Begin(begin) => {
                self.begin(lsn, begin.xid, begin.final_lsn, begin.commit_ts)?;
            }
            Message::Commit(commit) => {
                return self
                    .commit(lsn, commit.commit_lsn, commit.end_lsn, commit.commit_ts)
                    .map(Some);
            }
            Message::Relation(body) => {
                let mut relation = body.to_relation();
                if self.apply_types(&mut relation) {
                    self.unresolved = Some(relation.oid);
                }
                // The classes comments gave the previous version stay until the catalog
                // or a comment message says more: reading the catalog right after a
                // commit may not see it yet, and a comment must not be lost to that.
                if let Some(previous) = self.relations.get(&relation.oid) {
                    relation.comment_classes = previous.comment_classes.clone();
                }
                self.described = Some(relation.oid);
                debug!(oid = relation.oid, relation = %relation.qualified_name(), columns = relation.columns.len(), "relation described");
                self.relations.insert(relation.oid, Arc::new(relation));
            }
            Message::Insert(insert) => {
                let relation = self.relation(insert.relation_oid, lsn)?;
                let new = image(&relation, insert.new, lsn)?;
                self.push(lsn, relation, Op::Insert, Some(new), None)?;
            }
            Message::Update(update) => {
                let relation = self.relation(update.relation_oid, lsn)?;
                let old = match update.old {
                    Some((kind, tuple)) => Some((kind, image(&relation, tuple, lsn)?)),
                    None => None,
                };
                let mut new = image(&relation, update.new, lsn)?;
                // REPLICA IDENTITY FULL sends the whole old row, TOASTed values
                // included: an unchanged TOASTed value is filled from it.
                if let Some((OldKind::Full, old)) = &old {
                    for (value, before) in new.iter_mut().zip(old) {
                        if *value == Value::UnchangedToast && *before != Value::UnchangedToast {
                            *value = before.clone();
                        }
                    }
                }
                let old = old.map(|(_, image)| image);
                self.push(lsn, relation, Op::Update, Some(new), old)?;
            }
            Message::Delete(delete) => {
                let relation = self.relation(delete.relation_oid, lsn)?;
                let old = image(&relation, delete.old, lsn)?;
                self.push(lsn, relation, Op::Delete, None, Some(old))?;
            }
            Message::Truncate(truncate) => {
                for oid in truncate.relation_oids {
                    let relation = self.relation(oid, lsn)?;
                    self.push(lsn, relation, Op::Truncate, None, None)?;
                }
            }
            Message::Message(message)
                if message.transactional && message.prefix == COMMENT_MESSAGE_PREFIX =>
            {
                // Anyone may emit one; comments only tighten what the configuration says,
                // so a forged one can do no more than a comment could.
                if let Some(changed) = comment_message(message.content) {
                    self.comments_changed = Some(changed);
                }
            }
            Message::Message(message)
                if message.transactional && message.prefix == identity::MESSAGE_PREFIX =>
            {
                // Never data. Only the identity function may emit under the prefix
                // (checked at start), so one that does not parse is a defect, not noise.
                if self.identity_mode.enabled() {
                    let identity =
                        Identity::parse(message.content).map_err(|e| SourceError::Stream {
                            lsn,
                            reason: e.to_string(),
                        })?;
                    if self.identity.as_deref() != Some(&identity) {
                        self.identity = Some(Arc::new(identity));
                    }
                }
            }
            Message::Message(message)
                if message.transactional
                    && message.prefix == super::incremental::WATERMARK_PREFIX =>
            {
                self.watermark = Some(message.content.to_vec());
            }
            Message::Message(message)
                if message.transactional
                    && message.prefix == super::incremental::REQUEST_PREFIX =>
            {
                self.requests.push(message.content.to_vec());
            }
            Message::Origin(_) | Message::Type(_) | Message::Message(_) => {}
            Message::StreamStart(_)
            | Message::StreamStop
            | Message::StreamCommit(_)
            | Message::StreamAbort(_) => {
                return Err(out_of_order(
                    "a stream message where the stream's own messages go",
                ));
            }
        }
        Ok(self.take_part())
    }

    /// A transaction begins: pgoutput's Begin, or a streamed transaction that
    /// committed and is replayed.
    pub(super) fn begin(
        &mut self,
        lsn: Lsn,
        xid: u32,
        commit_lsn: Lsn,
        commit_ts: i64,
    ) -> Result<(), SourceError> {
        if self.current.is_some() {
            return Err(SourceError::Stream {
                lsn,
                reason: "Begin inside a transaction".into(),
            });
        }
        self.current = Some(Transaction {
            meta: TxnMeta {
                xid,
                commit_lsn,
                end_lsn: Lsn::ZERO,
                commit_ts,
                part: crate::change::Part::WHOLE,
                copied: None,
            },
            changes: Vec::new(),
        });
        self.current_bytes = 0;
        self.identity = None;
        self.watermark = None;
        self.requests.clear();
        (self.offset, self.skip) = match self.resume {
            Some((resumed, sent)) if resumed == commit_lsn => (sent, sent),
            _ => (0, 0),
        };
        Ok(())
    }

    /// The transaction commits: its last part (or the whole of it).
    pub(super) fn commit(
        &mut self,
        lsn: Lsn,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    ) -> Result<Transaction, SourceError> {
        let out_of_order = |reason: &str| SourceError::Stream {
            lsn,
            reason: reason.to_owned(),
        };
        let mut txn = self
            .current
            .take()
            .ok_or_else(|| out_of_order("Commit outside a transaction"))?;
        if self.skip > 0 {
            return Err(out_of_order(
                "the transaction resent after a reconnect is shorter than before",
            ));
        }
        txn.meta.commit_lsn = commit_lsn;
        txn.meta.end_lsn = end_lsn;
        txn.meta.commit_ts = commit_ts;
        txn.meta.part = crate::change::Part {
            offset: self.offset,
            last: true,
        };
        self.offset = 0;
        self.resume = None;
        Ok(txn)
    }

    /// The changes gathered so far as a part, when they reached a part bound.
    pub(super) fn take_part(&mut self) -> Option<Transaction> {
        let txn = self.current.as_mut()?;
        if txn.changes.len() < PART_CHANGES && self.current_bytes < PART_BYTES {
            return None;
        }
        let changes = std::mem::take(&mut txn.changes);
        let mut meta = txn.meta.clone();
        meta.part = crate::change::Part {
            offset: self.offset,
            last: false,
        };
        self.offset += changes.len() as u64;
        self.current_bytes = 0;
        Some(Transaction { meta, changes })
    }

    pub(super) fn relation(&self, oid: u32, lsn: Lsn) -> Result<Arc<Relation>, SourceError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or_else(|| SourceError::Stream {
                lsn,
                reason: format!("change for relation {oid} before its Relation message"),
            })
    }

    pub(super) fn push(
        &mut self,
        lsn: Lsn,
        relation: Arc<Relation>,
        op: Op,
        new: Option<Vec<Value>>,
        old: Option<Vec<Value>>,
    ) -> Result<(), SourceError> {
        let txn = self.current.as_mut().ok_or_else(|| SourceError::Stream {
            lsn,
            reason: format!(
                "change to {} outside a transaction",
                relation.qualified_name()
            ),
        })?;
        if self.skip > 0 {
            // Handed on before the reconnect.
            self.skip -= 1;
            return Ok(());
        }
        let identity = match (self.identity_mode, &self.identity) {
            // `auto` is resolved before streaming; unresolved, it is off.
            (identity::Mode::Off | identity::Mode::Auto, _) => None,
            (_, Some(identity)) => Some(identity.clone()),
            (identity::Mode::Required, None) => {
                return Err(SourceError::Unattributed {
                    table: relation.qualified_name(),
                    lsn,
                    xid: txn.meta.xid,
                });
            }
            (identity::Mode::Record, None) => {
                self.unattributed.push(relation.qualified_name());
                None
            }
        };
        let change = Change {
            identity,
            relation,
            op,
            lsn,
            new,
            old,
        };
        self.current_bytes += change.approx_bytes();
        txn.changes.push(change);
        Ok(())
    }
}

/// Typed values of a tuple, one per relation column.
/// What an `airlock.policy` message says: `{"oid": N, "comments": {column: text}}`
/// as the event trigger writes it (the classes those comments give), or a bare OID.
fn comment_message(content: &[u8]) -> Option<(u32, Option<BTreeMap<String, String>>)> {
    let text = std::str::from_utf8(content).ok()?.trim();
    if let Ok(oid) = text.parse() {
        return Some((oid, None));
    }
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    // PostgreSQL writes an `oid` as a JSON number or, in some versions, a string.
    let oid = match json.get("oid")? {
        serde_json::Value::String(text) => text.parse().ok()?,
        number => u32::try_from(number.as_u64()?).ok()?,
    };
    let classes = json
        .get("comments")?
        .as_object()?
        .iter()
        .filter_map(|(column, comment)| {
            let class = crate::policy::comment_class(comment.as_str()?)?;
            Some((column.clone(), class.to_owned()))
        })
        .collect();
    Some((oid, Some(classes)))
}

fn image(relation: &Relation, tuple: TupleData<'_>, lsn: Lsn) -> Result<Vec<Value>, SourceError> {
    if tuple.len() != relation.columns.len() {
        return Err(SourceError::Stream {
            lsn,
            reason: format!(
                "a row of {} has {} columns but its Relation message described {}",
                relation.qualified_name(),
                tuple.len(),
                relation.columns.len()
            ),
        });
    }
    let mut values = Vec::with_capacity(tuple.len());
    for (column, value) in relation.columns.iter().zip(tuple) {
        values.push(match value {
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => Value::UnchangedToast,
            TupleValue::Text(text) => {
                text::parse_value(column, text).map_err(|source| SourceError::Value {
                    relation: relation.qualified_name(),
                    lsn,
                    source,
                })?
            }
            TupleValue::Binary(_) => {
                return Err(SourceError::Value {
                    relation: relation.qualified_name(),
                    lsn,
                    source: text::ValueError {
                        column: column.name.clone(),
                        type_name: text::type_name(column.type_oid),
                        reason: "the server sent binary format but airlock asked for text",
                    },
                });
            }
        });
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::tests::{self as fx, Msg};
    use super::*;
    use crate::change::{PG_EPOCH_OFFSET_MICROS, ReplicaIdentity};

    fn apply(a: &mut Assembler, lsn: u64, data: &[u8]) -> Option<Transaction> {
        a.apply(Lsn(lsn), data).unwrap()
    }

    #[test]
    fn assembles_a_transaction_with_typed_values() {
        let mut a = Assembler::default();
        assert!(apply(&mut a, 1, &fx::begin()).is_none());
        assert!(a.in_transaction());
        apply(&mut a, 2, &fx::relation());
        apply(&mut a, 3, &fx::insert());
        apply(&mut a, 4, &fx::update_with_key());
        apply(&mut a, 5, &fx::delete());
        let txn = apply(&mut a, 6, &fx::commit()).unwrap();
        assert!(!a.in_transaction());

        assert_eq!(
            txn.meta,
            TxnMeta {
                xid: 731,
                commit_lsn: Lsn(0x1_0000_0100),
                end_lsn: Lsn(0x1_0000_0130),
                commit_ts: fx::PG_TS + PG_EPOCH_OFFSET_MICROS,
                part: crate::change::Part::WHOLE,
                copied: None,
            }
        );
        let ops: Vec<_> = txn.changes.iter().map(|c| (c.op, c.lsn.0)).collect();
        assert_eq!(ops, vec![(Op::Insert, 3), (Op::Update, 4), (Op::Delete, 5)]);
        let users = &txn.changes[0].relation;
        assert_eq!(users.qualified_name(), "public.users");
        assert_eq!(users.replica_identity, ReplicaIdentity::Default);
        assert_eq!(
            txn.changes[0].new,
            Some(vec![
                Value::Int(1),
                Value::Text("a@example.com".into()),
                Value::Null
            ])
        );
        assert_eq!(txn.changes[0].old, None);
        let update = &txn.changes[1];
        assert_eq!(
            update.old,
            Some(vec![Value::Int(1), Value::Null, Value::Null])
        );
        assert_eq!(
            update.new,
            Some(vec![
                Value::Int(2),
                Value::UnchangedToast,
                Value::Date(7425)
            ])
        );
        assert_eq!(txn.changes[2].new, None);
        assert!(txn.changes[2].old.is_some());
    }

    /// Feeds a transaction of `rows` inserts; returns what the assembler handed on.
    fn large_transaction(a: &mut Assembler, rows: u64) -> Vec<Transaction> {
        let mut out = Vec::new();
        out.extend(apply(a, 1, &fx::begin()));
        out.extend(apply(a, 2, &fx::relation()));
        for i in 0..rows {
            out.extend(apply(a, 3 + i, &fx::insert()));
        }
        out.extend(apply(a, 3 + rows, &fx::commit()));
        out
    }

    #[test]
    fn a_large_transaction_is_handed_on_in_bounded_parts() {
        let mut a = Assembler::default();
        let rows = 2 * PART_CHANGES as u64 + 452;
        let parts = large_transaction(&mut a, rows);
        let shape: Vec<_> = parts
            .iter()
            .map(|p| {
                (
                    p.meta.part.offset,
                    p.meta.part.last,
                    p.changes.len(),
                    p.meta.end_lsn,
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, false, PART_CHANGES, Lsn::ZERO),
                (PART_CHANGES as u64, false, PART_CHANGES, Lsn::ZERO),
                (2 * PART_CHANGES as u64, true, 452, Lsn(0x1_0000_0130)),
            ]
        );
        for part in &parts {
            assert_eq!(part.meta.xid, 731);
            assert_eq!(part.meta.commit_lsn, Lsn(0x1_0000_0100));
        }
        // Every change once, in order.
        let lsns: Vec<u64> = parts
            .iter()
            .flat_map(|p| p.changes.iter().map(|c| c.lsn.0))
            .collect();
        assert_eq!(lsns, (3..3 + rows).collect::<Vec<_>>());
        assert!(!a.in_transaction());

        // A transaction that fills its last part exactly still ends with a last part,
        // without changes, which carries the end.
        let parts = large_transaction(&mut Assembler::default(), PART_CHANGES as u64);
        assert_eq!(parts.len(), 2);
        assert!(parts[1].changes.is_empty());
        assert!(parts[1].meta.completes());
        assert_eq!(parts[1].meta.part.offset, PART_CHANGES as u64);
    }

    #[test]
    fn a_transaction_resent_after_a_reconnect_resumes_after_its_parts_handed_on() {
        let rows = PART_CHANGES as u64 + 10;
        let mut a = Assembler {
            resume: Some((Lsn(0x1_0000_0100), PART_CHANGES as u64)),
            ..Assembler::default()
        };
        let parts = large_transaction(&mut a, rows);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].meta.part.offset, PART_CHANGES as u64);
        assert!(parts[0].meta.completes());
        let lsns: Vec<u64> = parts[0].changes.iter().map(|c| c.lsn.0).collect();
        assert_eq!(
            lsns,
            (3 + PART_CHANGES as u64..3 + rows).collect::<Vec<_>>()
        );
        // The next transaction starts from scratch.
        let parts = large_transaction(&mut a, 3);
        assert_eq!(parts[0].meta.part, crate::change::Part::WHOLE);
        assert_eq!(parts[0].changes.len(), 3);
    }

    #[test]
    fn truncate_yields_one_change_per_relation() {
        let mut a = Assembler::default();
        apply(&mut a, 1, &fx::begin());
        apply(&mut a, 2, &fx::relation());
        let other = Msg::new(b'R')
            .u32(16_390)
            .cstr("public")
            .cstr("orders")
            .u8(b'f')
            .i16(0)
            .0;
        apply(&mut a, 3, &other);
        apply(&mut a, 4, &fx::truncate());
        let txn = apply(&mut a, 5, &fx::commit()).unwrap();
        let names: Vec<_> = txn
            .changes
            .iter()
            .map(|c| {
                (
                    c.op,
                    c.relation.name.as_str(),
                    c.new.is_none() && c.old.is_none(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                (Op::Truncate, "users", true),
                (Op::Truncate, "orders", true)
            ]
        );
    }

    #[test]
    fn a_relation_message_does_not_alter_earlier_changes() {
        let mut a = Assembler::default();
        apply(&mut a, 1, &fx::begin());
        apply(&mut a, 2, &fx::relation());
        apply(&mut a, 3, &fx::insert());
        let renamed = Msg::new(b'R')
            .u32(16_384)
            .cstr("public")
            .cstr("people")
            .u8(b'd')
            .i16(1)
            .u8(1)
            .cstr("id")
            .u32(23)
            .i32(-1)
            .0;
        apply(&mut a, 4, &renamed);
        let one_col = Msg::new(b'I')
            .u32(16_384)
            .u8(b'N')
            .tuple(&[Some(Some("9"))])
            .0;
        apply(&mut a, 5, &one_col);
        let txn = apply(&mut a, 6, &fx::commit()).unwrap();
        assert_eq!(txn.changes[0].relation.name, "users");
        assert_eq!(txn.changes[1].relation.name, "people");
    }

    #[test]
    fn comment_messages_give_their_classes_or_ask_for_the_catalog() {
        assert_eq!(comment_message(b"16400"), Some((16400, None)));
        let (oid, classes) = comment_message(
            // As PostgreSQL's json_build_object writes an oid: a string.
            br#"{"oid" : "16400", "comments" : {"phone" : "Phone. airlock: pii", "note" : "no class"}}"#,
        )
        .unwrap();
        assert_eq!(oid, 16400);
        assert_eq!(
            classes,
            Some(BTreeMap::from([("phone".to_owned(), "pii".to_owned())]))
        );
        assert_eq!(comment_message(b"{\"oid\": -1}"), None);
        assert_eq!(comment_message(b"\xff"), None);
    }

    fn identity_message(body: &str) -> Vec<u8> {
        Msg::new(b'M')
            .u8(1)
            .u64(0x30)
            .cstr(identity::MESSAGE_PREFIX)
            .u32(body.len() as u32)
            .raw(body.as_bytes())
            .0
    }

    #[test]
    fn each_change_takes_the_last_identity_before_it_in_its_transaction() {
        let mut a = Assembler {
            identity_mode: identity::Mode::Required,
            ..Assembler::default()
        };
        apply(&mut a, 1, &fx::begin());
        apply(&mut a, 2, &fx::relation());
        apply(
            &mut a,
            3,
            &identity_message(r#"{"session_user": "alice", "actor": "first"}"#),
        );
        apply(&mut a, 4, &fx::insert());
        apply(
            &mut a,
            5,
            &identity_message(r#"{"session_user": "alice", "actor": "second"}"#),
        );
        apply(&mut a, 6, &fx::insert());
        // A message under another prefix is neither data nor identity.
        apply(&mut a, 7, &fx::message());
        apply(&mut a, 8, &fx::delete());
        let txn = apply(&mut a, 9, &fx::commit()).unwrap();
        let actors: Vec<Option<&str>> = txn
            .changes
            .iter()
            .map(|c| {
                c.identity
                    .as_ref()
                    .and_then(|i| i.actor.as_ref())
                    .map(|(a, _)| a.as_str())
            })
            .collect();
        assert_eq!(actors, [Some("first"), Some("second"), Some("second")]);
        // Consecutive changes share one identity.
        assert!(Arc::ptr_eq(
            txn.changes[1].identity.as_ref().unwrap(),
            txn.changes[2].identity.as_ref().unwrap()
        ));

        // The next transaction starts with none: its first change stops the source,
        // naming the table.
        apply(&mut a, 10, &fx::begin());
        let error = a.apply(Lsn(11), &fx::insert()).unwrap_err();
        assert!(matches!(error, SourceError::Unattributed { .. }));
        let text = error.to_string();
        assert!(
            text.contains("`public.users`") && text.contains("0/B"),
            "{text}"
        );
        assert!(!error.is_transient());
    }

    #[test]
    fn record_mode_hands_on_changes_without_identity_and_says_which() {
        let mut a = Assembler {
            identity_mode: identity::Mode::Record,
            ..Assembler::default()
        };
        apply(&mut a, 1, &fx::begin());
        apply(&mut a, 2, &fx::relation());
        apply(&mut a, 3, &fx::insert());
        let txn = apply(&mut a, 4, &fx::commit()).unwrap();
        assert!(txn.changes[0].identity.is_none());
        assert_eq!(a.unattributed, ["public.users"]);

        // Off: identity messages are ignored, and nothing is required.
        let mut a = Assembler::default();
        apply(&mut a, 1, &fx::begin());
        apply(&mut a, 2, &fx::relation());
        apply(&mut a, 3, &identity_message(r#"{"session_user": "alice"}"#));
        apply(&mut a, 4, &fx::insert());
        let txn = apply(&mut a, 5, &fx::commit()).unwrap();
        assert!(txn.changes[0].identity.is_none());
        assert!(a.unattributed.is_empty());

        // On, a message under the prefix that is not an identity is a defect.
        let mut a = Assembler {
            identity_mode: identity::Mode::Record,
            ..Assembler::default()
        };
        apply(&mut a, 1, &fx::begin());
        let error = a
            .apply(Lsn(2), &identity_message("{}"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("session_user") && error.contains("0/2"),
            "{error}"
        );
    }

    #[test]
    fn stream_errors_name_the_lsn() {
        let mut a = Assembler::default();
        let err = a.apply(Lsn(7), &fx::commit()).unwrap_err();
        assert!(
            err.to_string().contains("Commit outside a transaction"),
            "{err}"
        );
        apply(&mut a, 8, &fx::begin());
        let err = a.apply(Lsn(9), &fx::begin()).unwrap_err();
        assert!(err.to_string().contains("0/9"), "{err}");
        let err = a.apply(Lsn(10), &fx::insert()).unwrap_err();
        assert!(
            err.to_string().contains("before its Relation message"),
            "{err}"
        );
        let err = a.apply(Lsn(11), b"S\0").unwrap_err();
        assert!(matches!(err, SourceError::Decode { .. }));
        assert!(!err.is_transient());

        apply(&mut a, 12, &fx::relation());
        let bad_date = Msg::new(b'I')
            .u32(16_384)
            .u8(b'N')
            .tuple(&[Some(Some("1")), None, Some(Some("not a date"))])
            .0;
        let err = a.apply(Lsn(13), &bad_date).unwrap_err().to_string();
        assert!(
            err.contains("public.users") && err.contains("`born`"),
            "{err}"
        );
        let short = Msg::new(b'I').u32(16_384).u8(b'N').tuple(&[None]).0;
        assert!(a.apply(Lsn(14), &short).is_err());
    }
}
