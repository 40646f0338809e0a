//! Decoder for pgoutput protocol version 2: the payload of each XLogData message.
//!
//! ```text
//! XLogData.data: &[u8] ──decode()──▶ Message<'_> ──▶ source task (relation cache, txn assembly)
//!                                     └─ Insert/Update/Delete carry TupleData<'_>: a validated,
//!                                        borrowed view whose values are &[u8] slices of the input
//! ```
//!
//! Invariants:
//! - Never panics, whatever the input: every read is bounds-checked and every
//!   arithmetic step is checked or saturating.
//! - A message is decoded exactly or not at all: an unknown type byte, a truncated
//!   field, an unknown tag inside a message and trailing bytes are all errors that
//!   name the message type and the byte offset, never a silent misread.
//! - No allocation per value: names and tuple values borrow from the input. Only a
//!   Relation's column list and a Truncate's OID list are collected into a `Vec`.
//! - Timestamps are converted from PostgreSQL-epoch to Unix-epoch microseconds.
//!
//! - Inside a stream block (between Stream Start and Stream Stop) the messages that
//!   belong to a transaction carry its xid after the type byte: [`streamed_xid`]
//!   reads it, and the rest decodes as the same message outside a stream.
//!
//! Reference: PostgreSQL docs, "Logical Replication Message Formats" (protocol v2:
//! v1 plus streaming; the two-phase messages of v3 and the parallel-apply fields of v4
//! are not requested and are rejected).

use crate::change::{Column, Lsn, PG_EPOCH_OFFSET_MICROS, Relation, ReplicaIdentity};

/// A decoded pgoutput message, borrowing from the XLogData payload.
#[derive(Clone, Debug, PartialEq)]
pub enum Message<'a> {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin<'a>),
    Relation(RelationBody<'a>),
    Type(TypeBody<'a>),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate),
    /// A logical decoding message written with `pg_logical_emit_message`.
    Message(DecodingMessage<'a>),
    /// A block of an in-progress transaction's changes begins ('S').
    StreamStart(StreamStart),
    /// The block ends ('E').
    StreamStop,
    /// A streamed transaction committed ('c').
    StreamCommit(StreamCommit),
    /// A streamed transaction, or one of its subtransactions, rolled back ('A').
    StreamAbort(StreamAbort),
}

/// Start of a block of a streamed transaction's changes ('S').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    /// Whether this is the transaction's first block.
    pub first_segment: bool,
}

/// Commit of a streamed transaction ('c').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    /// Unused by PostgreSQL so far; kept for completeness.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts: i64,
}

/// Rollback of a streamed transaction ('A'): of the whole transaction when `subxid`
/// equals `xid`, else of that subtransaction only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
}

impl StreamAbort {
    /// Whether the whole transaction rolled back.
    pub fn is_whole(&self) -> bool {
        self.xid == self.subxid
    }
}

/// A message from inside a stream block, split: the xid it carries after its type
/// byte, and the message without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streamed<'a> {
    /// The (sub)transaction the message belongs to.
    pub xid: u32,
    pub tag: u8,
    /// The body the message has outside a stream.
    pub body: &'a [u8],
}

/// Splits a message from inside a stream block ([`Streamed`]), or `None` for the
/// messages that carry no xid (Stream Stop, Origin, ...).
pub fn streamed_xid(buf: &[u8]) -> Result<Option<Streamed<'_>>, DecodeError> {
    let (&tag, rest) = buf.split_first().ok_or(DecodeError::Empty)?;
    let carries_xid = matches!(tag, b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M');
    let Some(name) = message_name(tag).filter(|_| carries_xid) else {
        return Ok(None);
    };
    let (xid, body) = rest.split_at_checked(4).ok_or(DecodeError::Truncated {
        message: name,
        offset: 1,
        expected: "a 32-bit integer",
    })?;
    let xid = u32::from_be_bytes([xid[0], xid[1], xid[2], xid[3]]);
    Ok(Some(Streamed { xid, tag, body }))
}

/// Start of a transaction ('B').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts: i64,
    pub xid: u32,
}

/// End of a transaction ('C').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Unused by PostgreSQL so far; kept for completeness.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts: i64,
}

/// Replication origin of the transaction ('O').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin<'a> {
    pub commit_lsn: Lsn,
    pub name: &'a str,
}

/// Description of a table ('R'), sent before its first change in a session and
/// again after every schema change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationBody<'a> {
    pub oid: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: &'a str,
    pub name: &'a str,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn<'a>>,
}

/// One column of a [`RelationBody`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelationColumn<'a> {
    /// Bit 1: the column is part of the replica identity key.
    pub flags: u8,
    pub name: &'a str,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl RelationBody<'_> {
    /// The owned relation for the change model (`pg_catalog` for an empty namespace).
    pub fn to_relation(&self) -> Relation {
        let schema = if self.namespace.is_empty() {
            "pg_catalog"
        } else {
            self.namespace
        };
        Relation {
            comment_classes: Default::default(),
            oid: self.oid,
            schema: schema.to_owned(),
            name: self.name.to_owned(),
            replica_identity: self.replica_identity,
            columns: self
                .columns
                .iter()
                .map(|c| Column {
                    name: c.name.to_owned(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    key: c.flags & 1 != 0,
                })
                .collect(),
        }
    }
}

/// Description of a non-built-in data type ('Y').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeBody<'a> {
    pub oid: u32,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// A row insert ('I').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insert<'a> {
    pub relation_oid: u32,
    pub new: TupleData<'a>,
}

/// Which old image an update or delete carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': the replica identity key columns (others are null).
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A row update ('U').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update<'a> {
    pub relation_oid: u32,
    /// Present when the key changed or the table has REPLICA IDENTITY FULL.
    pub old: Option<(OldKind, TupleData<'a>)>,
    pub new: TupleData<'a>,
}

/// A row delete ('D').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delete<'a> {
    pub relation_oid: u32,
    pub old_kind: OldKind,
    pub old: TupleData<'a>,
}

/// A TRUNCATE of one or more tables ('T').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_oids: Vec<u32>,
}

/// A logical decoding message ('M').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodingMessage<'a> {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: &'a str,
    pub content: &'a [u8],
}

/// One column value of a tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TupleValue<'a> {
    Null,
    /// An unchanged TOASTed value that was not resent.
    UnchangedToast,
    /// The type's text output.
    Text(&'a [u8]),
    /// The type's binary output (only sent when binary mode is requested).
    Binary(&'a [u8]),
}

/// A validated tuple ('TupleData'): iterate it to get the column values.
///
/// Validation happens in [`decode`], so iteration cannot fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleData<'a> {
    /// The column entries, without the leading column count.
    raw: &'a [u8],
    columns: u16,
}

impl<'a> TupleData<'a> {
    /// Number of columns in the tuple.
    pub fn len(&self) -> usize {
        usize::from(self.columns)
    }

    pub fn is_empty(&self) -> bool {
        self.columns == 0
    }

    pub fn iter(&self) -> TupleIter<'a> {
        TupleIter {
            raw: self.raw,
            remaining: self.columns,
        }
    }
}

impl<'a> IntoIterator for TupleData<'a> {
    type Item = TupleValue<'a>;
    type IntoIter = TupleIter<'a>;
    fn into_iter(self) -> TupleIter<'a> {
        self.iter()
    }
}

/// Iterator over the values of a [`TupleData`].
#[derive(Clone, Debug)]
pub struct TupleIter<'a> {
    raw: &'a [u8],
    remaining: u16,
}

impl<'a> Iterator for TupleIter<'a> {
    type Item = TupleValue<'a>;

    fn next(&mut self) -> Option<TupleValue<'a>> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let (&kind, rest) = self.raw.split_first()?;
        match kind {
            b'n' => {
                self.raw = rest;
                Some(TupleValue::Null)
            }
            b'u' => {
                self.raw = rest;
                Some(TupleValue::UnchangedToast)
            }
            b't' | b'b' => {
                let len_bytes = rest.get(..4)?;
                let len =
                    u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
                let len = usize::try_from(len).ok()?;
                let end = 4usize.checked_add(len)?;
                let value = rest.get(4..end)?;
                self.raw = rest.get(end..)?;
                Some(if kind == b't' {
                    TupleValue::Text(value)
                } else {
                    TupleValue::Binary(value)
                })
            }
            // Unreachable after validation; ending the iteration keeps it panic-free.
            _ => {
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(usize::from(self.remaining)))
    }
}

/// Why a pgoutput message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message: expected a message type byte")]
    Empty,
    #[error(
        "unknown pgoutput message type {} (0x{byte:02x}) at offset 0: airlock speaks pgoutput protocol version 2",
        printable(*.byte)
    )]
    UnknownType { byte: u8 },
    #[error("truncated {message} message at offset {offset}: expected {expected}")]
    Truncated {
        message: &'static str,
        offset: usize,
        expected: &'static str,
    },
    #[error("invalid {message} message at offset {offset}: {problem}")]
    Invalid {
        message: &'static str,
        offset: usize,
        problem: String,
    },
}

fn printable(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}'", char::from(byte))
    } else {
        format!("byte {byte}")
    }
}

/// The name of the message with type byte `tag`, as errors say it.
fn message_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => return None,
    })
}

/// Decodes one pgoutput message.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let (&tag, _) = buf.split_first().ok_or(DecodeError::Empty)?;
    let name = message_name(tag).ok_or(DecodeError::UnknownType { byte: tag })?;
    let mut r = Reader {
        buf,
        pos: 1,
        message: name,
    };
    let message = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn()?,
            commit_ts: r.timestamp()?,
            xid: r.u32()?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_ts: r.timestamp()?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: r.lsn()?,
            name: r.cstr()?,
        }),
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type(TypeBody {
            oid: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        }),
        b'I' => {
            let relation_oid = r.u32()?;
            r.expect_tag(b'N', "'N' (new tuple)")?;
            Message::Insert(Insert {
                relation_oid,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let relation_oid = r.u32()?;
            let at = r.pos;
            let old = match r.u8("'K', 'O' or 'N'")? {
                b'N' => None,
                b'K' => Some(OldKind::Key),
                b'O' => Some(OldKind::Full),
                other => return Err(r.invalid_tag(at, other, "'K', 'O' or 'N'")),
            };
            let old = match old {
                None => None,
                Some(kind) => {
                    let tuple = r.tuple()?;
                    r.expect_tag(b'N', "'N' (new tuple)")?;
                    Some((kind, tuple))
                }
            };
            Message::Update(Update {
                relation_oid,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation_oid = r.u32()?;
            let at = r.pos;
            let old_kind = match r.u8("'K' or 'O'")? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                other => return Err(r.invalid_tag(at, other, "'K' or 'O'")),
            };
            Message::Delete(Delete {
                relation_oid,
                old_kind,
                old: r.tuple()?,
            })
        }
        b'T' => {
            let count = r.u32()?;
            let options = r.u8("option bits")?;
            // Never trust the count for the allocation: cap it by what the input can hold.
            let cap = usize::try_from(count)
                .unwrap_or(usize::MAX)
                .min(r.remaining() / 4);
            let mut relation_oids = Vec::with_capacity(cap);
            for _ in 0..count {
                relation_oids.push(r.u32()?);
            }
            Message::Truncate(Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_oids,
            })
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.lsn()?;
            let prefix = r.cstr()?;
            let len = r.u32()?;
            let content = r.bytes(len, "the message content")?;
            Message::Message(DecodingMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            })
        }
        b'S' => {
            let xid = r.u32()?;
            let at = r.pos;
            let first_segment = match r.u8("first-segment flag")? {
                0 => false,
                1 => true,
                other => return Err(r.invalid_tag(at, other, "0 or 1")),
            };
            Message::StreamStart(StreamStart { xid, first_segment })
        }
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: r.u32()?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_ts: r.timestamp()?,
        }),
        b'A' => Message::StreamAbort(StreamAbort {
            xid: r.u32()?,
            subxid: r.u32()?,
        }),
        _ => return Err(DecodeError::UnknownType { byte: tag }),
    };
    r.finish()?;
    Ok(message)
}

fn relation<'a>(r: &mut Reader<'a>) -> Result<RelationBody<'a>, DecodeError> {
    let oid = r.u32()?;
    let namespace = r.cstr()?;
    let name = r.cstr()?;
    let at = r.pos;
    let replica_identity = match r.u8("a replica identity setting")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        other => return Err(r.invalid_tag(at, other, "'d', 'n', 'f' or 'i'")),
    };
    let count = r.count()?;
    // Each column takes at least 10 bytes: cap the allocation by the input size.
    let mut columns = Vec::with_capacity(usize::from(count).min(r.remaining() / 10));
    for _ in 0..count {
        columns.push(RelationColumn {
            flags: r.u8("column flags")?,
            name: r.cstr()?,
            type_oid: r.u32()?,
            type_modifier: r.i32()?,
        });
    }
    Ok(RelationBody {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// A bounds-checked cursor over one message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, expected: &'static str) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            offset: self.pos,
            expected,
        }
    }

    fn invalid_tag(&self, offset: usize, found: u8, expected: &str) -> DecodeError {
        DecodeError::Invalid {
            message: self.message,
            offset,
            problem: format!("expected {expected}, found {}", printable(found)),
        }
    }

    fn take<const N: usize>(&mut self, expected: &'static str) -> Result<[u8; N], DecodeError> {
        let end = self
            .pos
            .checked_add(N)
            .ok_or_else(|| self.truncated(expected))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .ok_or_else(|| self.truncated(expected))?;
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self, expected: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>(expected)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take("a 32-bit integer")?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take("a 32-bit integer")?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.take("a 64-bit LSN")?)))
    }

    /// A PostgreSQL-epoch timestamp, returned in Unix-epoch microseconds.
    fn timestamp(&mut self) -> Result<i64, DecodeError> {
        let pg = i64::from_be_bytes(self.take("a 64-bit timestamp")?);
        Ok(pg.saturating_add(PG_EPOCH_OFFSET_MICROS))
    }

    /// An Int16 count that must not be negative.
    fn count(&mut self) -> Result<u16, DecodeError> {
        let at = self.pos;
        let n = i16::from_be_bytes(self.take("a 16-bit column count")?);
        u16::try_from(n).map_err(|_| DecodeError::Invalid {
            message: self.message,
            offset: at,
            problem: format!("negative column count {n}"),
        })
    }

    fn bytes(&mut self, len: u32, expected: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| self.pos.checked_add(len))
            .ok_or_else(|| self.truncated(expected))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(expected))?;
        self.pos = end;
        Ok(bytes)
    }

    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated("a null-terminated string"))?;
        let s = std::str::from_utf8(&rest[..len]).map_err(|e| DecodeError::Invalid {
            message: self.message,
            offset: self.pos + e.valid_up_to(),
            problem: "string is not valid UTF-8".to_owned(),
        })?;
        self.pos += len + 1;
        Ok(s)
    }

    fn expect_tag(&mut self, tag: u8, expected: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        let found = self.u8(expected)?;
        if found == tag {
            Ok(())
        } else {
            Err(self.invalid_tag(at, found, expected))
        }
    }

    /// Validates a TupleData and returns a borrowed view of it.
    fn tuple(&mut self) -> Result<TupleData<'a>, DecodeError> {
        let columns = self.count()?;
        let start = self.pos;
        for _ in 0..columns {
            let at = self.pos;
            match self.u8("a tuple value kind ('n', 'u', 't' or 'b')")? {
                b'n' | b'u' => {}
                b't' | b'b' => {
                    let len_at = self.pos;
                    let len = self.i32()?;
                    let len = u32::try_from(len).map_err(|_| DecodeError::Invalid {
                        message: self.message,
                        offset: len_at,
                        problem: format!("negative value length {len}"),
                    })?;
                    self.bytes(len, "the bytes of a column value")?;
                }
                other => return Err(self.invalid_tag(at, other, "'n', 'u', 't' or 'b'")),
            }
        }
        Ok(TupleData {
            raw: self.buf.get(start..self.pos).unwrap_or_default(),
            columns,
        })
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Invalid {
                message: self.message,
                offset: self.pos,
                problem: format!("{n} unexpected trailing bytes"),
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput messages by hand, following "Logical Replication Message Formats".
    #[derive(Default)]
    pub(crate) struct Msg(pub Vec<u8>);

    impl Msg {
        pub fn new(tag: u8) -> Self {
            Msg(vec![tag])
        }
        pub fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        pub fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        /// TupleData: `None` is null, `Some(None)` unchanged toast, `Some(Some(t))` text.
        pub fn tuple(mut self, values: &[Option<Option<&str>>]) -> Self {
            self = self.i16(values.len() as i16);
            for v in values {
                self = match v {
                    None => self.u8(b'n'),
                    Some(None) => self.u8(b'u'),
                    Some(Some(t)) => self.u8(b't').i32(t.len() as i32).raw(t.as_bytes()),
                };
            }
            self
        }
    }

    /// 2024-01-02 03:04:05.678901 UTC in PostgreSQL-epoch microseconds.
    pub(crate) const PG_TS: i64 = 757_479_845_678_901;
    const UNIX_TS: i64 = PG_TS + PG_EPOCH_OFFSET_MICROS;

    pub(crate) fn begin() -> Vec<u8> {
        Msg::new(b'B').u64(0x1_0000_0100).i64(PG_TS).u32(731).0
    }
    pub(crate) fn commit() -> Vec<u8> {
        Msg::new(b'C')
            .u8(0)
            .u64(0x1_0000_0100)
            .u64(0x1_0000_0130)
            .i64(PG_TS)
            .0
    }
    fn origin() -> Vec<u8> {
        Msg::new(b'O').u64(0x2A).cstr("node_a").0
    }
    pub(crate) fn relation() -> Vec<u8> {
        Msg::new(b'R')
            .u32(16_384)
            .cstr("public")
            .cstr("users")
            .u8(b'd')
            .i16(3)
            .u8(1)
            .cstr("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .cstr("email")
            .u32(1043)
            .i32(259)
            .u8(0)
            .cstr("born")
            .u32(1082)
            .i32(-1)
            .0
    }
    fn type_() -> Vec<u8> {
        Msg::new(b'Y').u32(90_001).cstr("public").cstr("mood").0
    }
    pub(crate) fn insert() -> Vec<u8> {
        Msg::new(b'I')
            .u32(16_384)
            .u8(b'N')
            .tuple(&[Some(Some("1")), Some(Some("a@example.com")), None])
            .0
    }
    pub(crate) fn update_with_key() -> Vec<u8> {
        Msg::new(b'U')
            .u32(16_384)
            .u8(b'K')
            .tuple(&[Some(Some("1")), None, None])
            .u8(b'N')
            .tuple(&[Some(Some("2")), Some(None), Some(Some("1990-05-01"))])
            .0
    }
    fn update_plain() -> Vec<u8> {
        Msg::new(b'U')
            .u32(16_384)
            .u8(b'N')
            .tuple(&[Some(Some("1")), Some(Some("b@example.com")), None])
            .0
    }
    fn update_full() -> Vec<u8> {
        Msg::new(b'U')
            .u32(16_384)
            .u8(b'O')
            .tuple(&[Some(Some("1")), Some(Some("a@example.com")), None])
            .u8(b'N')
            .tuple(&[Some(Some("1")), Some(Some("b@example.com")), None])
            .0
    }
    pub(crate) fn delete() -> Vec<u8> {
        Msg::new(b'D')
            .u32(16_384)
            .u8(b'K')
            .tuple(&[Some(Some("1")), None, None])
            .0
    }
    pub(crate) fn truncate() -> Vec<u8> {
        Msg::new(b'T').u32(2).u8(3).u32(16_384).u32(16_390).0
    }
    pub(crate) fn message() -> Vec<u8> {
        Msg::new(b'M')
            .u8(1)
            .u64(0x30)
            .cstr("airlock")
            .u32(5)
            .raw(b"hello")
            .0
    }
    pub(crate) fn stream_start(xid: u32, first: bool) -> Vec<u8> {
        Msg::new(b'S').u32(xid).u8(u8::from(first)).0
    }
    pub(crate) fn stream_stop() -> Vec<u8> {
        Msg::new(b'E').0
    }
    pub(crate) fn stream_commit(xid: u32, commit_lsn: u64, end_lsn: u64) -> Vec<u8> {
        Msg::new(b'c')
            .u32(xid)
            .u8(0)
            .u64(commit_lsn)
            .u64(end_lsn)
            .i64(PG_TS)
            .0
    }
    pub(crate) fn stream_abort(xid: u32, subxid: u32) -> Vec<u8> {
        Msg::new(b'A').u32(xid).u32(subxid).0
    }
    /// `message` as it comes inside a stream block: its xid after the type byte.
    pub(crate) fn streamed(xid: u32, message: &[u8]) -> Vec<u8> {
        let mut out = vec![message[0]];
        out.extend_from_slice(&xid.to_be_bytes());
        out.extend_from_slice(&message[1..]);
        out
    }
    fn binary_insert() -> Vec<u8> {
        Msg::new(b'I')
            .u32(7)
            .u8(b'N')
            .i16(1)
            .u8(b'b')
            .i32(4)
            .raw(&[0, 0, 0, 42])
            .0
    }

    fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("begin", begin()),
            ("commit", commit()),
            ("origin", origin()),
            ("relation", relation()),
            ("type", type_()),
            ("insert", insert()),
            ("update_with_key", update_with_key()),
            ("update_plain", update_plain()),
            ("update_full", update_full()),
            ("delete", delete()),
            ("truncate", truncate()),
            ("message", message()),
            ("binary_insert", binary_insert()),
            ("stream_start", stream_start(9, true)),
            ("stream_stop", stream_stop()),
            ("stream_commit", stream_commit(9, 0x40, 0x48)),
            ("stream_abort", stream_abort(9, 10)),
        ]
    }

    #[test]
    fn stream_messages() {
        assert_eq!(
            decode(&stream_start(9, true)).unwrap(),
            Message::StreamStart(StreamStart {
                xid: 9,
                first_segment: true
            })
        );
        assert_eq!(decode(&stream_stop()).unwrap(), Message::StreamStop);
        assert_eq!(
            decode(&stream_commit(9, 0x40, 0x48)).unwrap(),
            Message::StreamCommit(StreamCommit {
                xid: 9,
                flags: 0,
                commit_lsn: Lsn(0x40),
                end_lsn: Lsn(0x48),
                commit_ts: UNIX_TS,
            })
        );
        let Message::StreamAbort(abort) = decode(&stream_abort(9, 10)).unwrap() else {
            panic!()
        };
        assert!(!abort.is_whole());
        let Message::StreamAbort(abort) = decode(&stream_abort(9, 9)).unwrap() else {
            panic!()
        };
        assert!(abort.is_whole());
        let err = decode(&Msg::new(b'S').u32(1).u8(2).0).unwrap_err();
        assert!(err.to_string().contains("expected 0 or 1"), "{err}");
    }

    #[test]
    fn a_streamed_message_carries_its_xid_after_the_type_byte() {
        for (name, plain) in [
            ("relation", relation()),
            ("type", type_()),
            ("insert", insert()),
            ("update", update_full()),
            ("delete", delete()),
            ("truncate", truncate()),
            ("message", message()),
        ] {
            let inside = streamed(0xDEAD_BEEF, &plain);
            let Streamed { xid, tag, body } = streamed_xid(&inside).unwrap().unwrap();
            assert_eq!(xid, 0xDEAD_BEEF, "{name}");
            assert_eq!((tag, body), (plain[0], &plain[1..]), "{name}");
            let err = streamed_xid(&inside[..3]).unwrap_err();
            assert!(
                matches!(err, DecodeError::Truncated { offset: 1, .. }),
                "{name}"
            );
        }
        for plain in [origin(), stream_stop(), stream_commit(1, 2, 3), begin()] {
            assert_eq!(streamed_xid(&plain).unwrap(), None);
        }
    }

    fn values<'a>(t: &TupleData<'a>) -> Vec<TupleValue<'a>> {
        t.iter().collect()
    }

    #[test]
    fn begin_converts_commit_time_to_unix_epoch() {
        assert_eq!(
            decode(&begin()).unwrap(),
            Message::Begin(Begin {
                final_lsn: Lsn(0x1_0000_0100),
                commit_ts: UNIX_TS,
                xid: 731
            })
        );
        // 2024-01-02T03:04:05.678901Z
        assert_eq!(UNIX_TS, 1_704_164_645_678_901);
    }

    #[test]
    fn commit_carries_both_lsns() {
        assert_eq!(
            decode(&commit()).unwrap(),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x1_0000_0100),
                end_lsn: Lsn(0x1_0000_0130),
                commit_ts: UNIX_TS
            })
        );
    }

    #[test]
    fn origin_and_type() {
        assert_eq!(
            decode(&origin()).unwrap(),
            Message::Origin(Origin {
                commit_lsn: Lsn(0x2A),
                name: "node_a"
            })
        );
        assert_eq!(
            decode(&type_()).unwrap(),
            Message::Type(TypeBody {
                oid: 90_001,
                namespace: "public",
                name: "mood"
            })
        );
    }

    #[test]
    fn relation_becomes_change_model_relation() {
        let bytes = relation();
        let Message::Relation(body) = decode(&bytes).unwrap() else {
            panic!("not a relation")
        };
        let rel = body.to_relation();
        assert_eq!(rel.oid, 16_384);
        assert_eq!(rel.qualified_name(), "public.users");
        assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
        assert_eq!(
            rel.columns,
            vec![
                Column {
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                    key: true
                },
                Column {
                    name: "email".into(),
                    type_oid: 1043,
                    type_modifier: 259,
                    key: false
                },
                Column {
                    name: "born".into(),
                    type_oid: 1082,
                    type_modifier: -1,
                    key: false
                },
            ]
        );
    }

    #[test]
    fn relation_in_pg_catalog_has_empty_namespace() {
        let bytes = Msg::new(b'R').u32(1).cstr("").cstr("t").u8(b'f').i16(0).0;
        let Message::Relation(body) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(body.to_relation().schema, "pg_catalog");
        assert_eq!(body.replica_identity, ReplicaIdentity::Full);
    }

    #[test]
    fn insert_borrows_values() {
        let bytes = insert();
        let Message::Insert(ins) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(ins.relation_oid, 16_384);
        assert_eq!(ins.new.len(), 3);
        assert_eq!(
            values(&ins.new),
            vec![
                TupleValue::Text(b"1"),
                TupleValue::Text(b"a@example.com"),
                TupleValue::Null
            ]
        );
    }

    #[test]
    fn update_variants() {
        let bytes = update_with_key();
        let Message::Update(u) = decode(&bytes).unwrap() else {
            panic!()
        };
        let (kind, old) = u.old.unwrap();
        assert_eq!(kind, OldKind::Key);
        assert_eq!(
            values(&old),
            vec![TupleValue::Text(b"1"), TupleValue::Null, TupleValue::Null]
        );
        assert_eq!(
            values(&u.new),
            vec![
                TupleValue::Text(b"2"),
                TupleValue::UnchangedToast,
                TupleValue::Text(b"1990-05-01")
            ]
        );

        let bytes = update_plain();
        let Message::Update(u) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert!(u.old.is_none());
        assert_eq!(u.new.len(), 3);

        let bytes = update_full();
        let Message::Update(u) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(u.old.unwrap().0, OldKind::Full);
        assert_eq!(values(&u.new)[1], TupleValue::Text(b"b@example.com"));
    }

    #[test]
    fn delete_with_key() {
        let bytes = delete();
        let Message::Delete(d) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(d.relation_oid, 16_384);
        assert_eq!(d.old_kind, OldKind::Key);
        assert_eq!(values(&d.old)[0], TupleValue::Text(b"1"));
    }

    #[test]
    fn truncate_options_and_oids() {
        assert_eq!(
            decode(&truncate()).unwrap(),
            Message::Truncate(Truncate {
                cascade: true,
                restart_identity: true,
                relation_oids: vec![16_384, 16_390]
            })
        );
        let only_cascade = Msg::new(b'T').u32(1).u8(1).u32(5).0;
        let Message::Truncate(t) = decode(&only_cascade).unwrap() else {
            panic!()
        };
        assert!(t.cascade && !t.restart_identity);
    }

    #[test]
    fn logical_decoding_message() {
        assert_eq!(
            decode(&message()).unwrap(),
            Message::Message(DecodingMessage {
                transactional: true,
                lsn: Lsn(0x30),
                prefix: "airlock",
                content: b"hello"
            })
        );
    }

    #[test]
    fn binary_values_are_reported_as_binary() {
        let bytes = binary_insert();
        let Message::Insert(ins) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(values(&ins.new), vec![TupleValue::Binary(&[0, 0, 0, 42])]);
    }

    #[test]
    fn every_truncation_of_every_fixture_is_an_error() {
        for (name, bytes) in fixtures() {
            decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            for len in 0..bytes.len() {
                assert!(
                    decode(&bytes[..len]).is_err(),
                    "{name} truncated to {len} bytes decoded without error"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for (name, mut bytes) in fixtures() {
            bytes.push(0);
            let err = decode(&bytes).unwrap_err();
            assert!(
                err.to_string().contains("trailing"),
                "{name}: unexpected error {err}"
            );
        }
    }

    #[test]
    fn errors_name_the_message_and_offset() {
        let bytes = relation();
        // Cut inside the namespace string: offset 5 is where the string starts.
        let err = decode(&bytes[..8]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "truncated Relation message at offset 5: expected a null-terminated string"
        );
        let err = decode(&bytes[..3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "truncated Relation message at offset 1: expected a 32-bit integer"
        );
        let bad_identity = Msg::new(b'R').u32(1).cstr("s").cstr("t").u8(b'x').i16(0).0;
        assert_eq!(
            decode(&bad_identity).unwrap_err().to_string(),
            "invalid Relation message at offset 9: expected 'd', 'n', 'f' or 'i', found 'x'"
        );
    }

    #[test]
    fn unknown_and_unsupported_types_name_the_byte() {
        // 'P' is Prepare (protocol v3, two-phase): never silently misread.
        let err = decode(b"P\0\0\0\x01\x01").unwrap_err();
        assert_eq!(err, DecodeError::UnknownType { byte: b'P' });
        assert!(err.to_string().contains("'P' (0x50)"), "{err}");
        assert!(decode(&[0xff]).unwrap_err().to_string().contains("0xff"));
        assert_eq!(decode(&[]).unwrap_err(), DecodeError::Empty);
    }

    #[test]
    fn bad_tuple_tags_and_lengths_are_errors() {
        let bad_kind = Msg::new(b'I').u32(1).u8(b'N').i16(1).u8(b'x').0;
        assert!(
            decode(&bad_kind)
                .unwrap_err()
                .to_string()
                .contains("found 'x'")
        );
        let negative_len = Msg::new(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-5).0;
        assert!(
            decode(&negative_len)
                .unwrap_err()
                .to_string()
                .contains("negative value length")
        );
        let negative_count = Msg::new(b'I').u32(1).u8(b'N').i16(-1).0;
        assert!(
            decode(&negative_count)
                .unwrap_err()
                .to_string()
                .contains("negative column count")
        );
        let huge_len = Msg::new(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(i32::MAX)
            .0;
        assert!(matches!(
            decode(&huge_len).unwrap_err(),
            DecodeError::Truncated { .. }
        ));
        let insert_without_n = Msg::new(b'I').u32(1).u8(b'K').i16(0).0;
        assert!(decode(&insert_without_n).is_err());
        let update_bad_tag = Msg::new(b'U').u32(1).u8(b'X').0;
        assert!(decode(&update_bad_tag).is_err());
        let huge_truncate = Msg::new(b'T').u32(u32::MAX).u8(0).u32(1).0;
        assert!(decode(&huge_truncate).is_err());
        let bad_utf8 = Msg::new(b'O').u64(1).raw(&[0xff, 0xfe, 0]).0;
        assert!(decode(&bad_utf8).unwrap_err().to_string().contains("UTF-8"));
    }

    /// A tiny deterministic PRNG so the fuzz-style tests need no extra crate.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn mutated_fixtures_never_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for (_, bytes) in fixtures() {
            for i in 0..bytes.len() {
                for v in [0u8, 1, 0x7f, 0x80, 0xff, b'n', b't', b'u', b'N'] {
                    let mut m = bytes.clone();
                    m[i] = v;
                    if let Ok(msg) = decode(&m) {
                        touch(&msg);
                    }
                }
            }
            for _ in 0..2_000 {
                let mut m = bytes.clone();
                let flips = 1 + rng.next() % 4;
                for _ in 0..flips {
                    let i = (rng.next() as usize) % m.len();
                    m[i] = rng.next() as u8;
                }
                if let Ok(msg) = decode(&m) {
                    touch(&msg);
                }
            }
        }
        for _ in 0..20_000 {
            let len = (rng.next() % 64) as usize;
            let mut m: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if let Some(first) = m.first_mut() {
                *first = b"BCORYIUDTM"[(rng.next() % 10) as usize];
            }
            if let Ok(msg) = decode(&m) {
                touch(&msg);
            }
        }
    }

    /// Walks every tuple of a decoded message, so iteration is exercised too.
    fn touch(msg: &Message<'_>) {
        let tuples: Vec<TupleData<'_>> = match msg {
            Message::Insert(i) => vec![i.new],
            Message::Update(u) => u.old.iter().map(|o| o.1).chain([u.new]).collect(),
            Message::Delete(d) => vec![d.old],
            Message::Relation(r) => {
                let _ = r.to_relation();
                vec![]
            }
            _ => vec![],
        };
        for t in tuples {
            assert_eq!(t.iter().count(), t.len());
        }
    }

    /// Property tests: every message the model can describe survives encoding and
    /// decoding exactly; every strict prefix and every extension of it is an error
    /// that names the message and an offset inside the input; no input panics.
    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum V {
            Null,
            Toast,
            Text(Vec<u8>),
            Binary(Vec<u8>),
        }

        #[derive(Clone, Debug)]
        enum Model {
            Begin(u64, i64, u32),
            Commit(u8, u64, u64, i64),
            Origin(u64, String),
            Relation(u32, String, String, u8, Vec<(u8, String, u32, i32)>),
            Type(u32, String, String),
            Insert(u32, Vec<V>),
            Update(u32, Option<(u8, Vec<V>)>, Vec<V>),
            Delete(u32, u8, Vec<V>),
            Truncate(u8, Vec<u32>),
            Message(u8, u64, String, Vec<u8>),
        }

        fn name() -> impl Strategy<Value = String> {
            any::<String>().prop_map(|s| s.replace('\0', ""))
        }

        fn value() -> impl Strategy<Value = V> {
            prop_oneof![
                Just(V::Null),
                Just(V::Toast),
                vec(any::<u8>(), 0..40).prop_map(V::Text),
                vec(any::<u8>(), 0..40).prop_map(V::Binary),
            ]
        }

        fn tuple() -> impl Strategy<Value = Vec<V>> {
            vec(value(), 0..12)
        }

        fn model() -> impl Strategy<Value = Model> {
            prop_oneof![
                (any::<u64>(), any::<i64>(), any::<u32>())
                    .prop_map(|(a, b, c)| Model::Begin(a, b, c)),
                (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>())
                    .prop_map(|(a, b, c, d)| Model::Commit(a, b, c, d)),
                (any::<u64>(), name()).prop_map(|(a, b)| Model::Origin(a, b)),
                (
                    any::<u32>(),
                    name(),
                    name(),
                    prop::sample::select(vec![b'd', b'n', b'f', b'i']),
                    vec((any::<u8>(), name(), any::<u32>(), any::<i32>()), 0..10)
                )
                    .prop_map(|(a, b, c, d, e)| Model::Relation(a, b, c, d, e)),
                (any::<u32>(), name(), name()).prop_map(|(a, b, c)| Model::Type(a, b, c)),
                (any::<u32>(), tuple()).prop_map(|(a, b)| Model::Insert(a, b)),
                (
                    any::<u32>(),
                    proptest::option::of((prop::sample::select(vec![b'K', b'O']), tuple())),
                    tuple()
                )
                    .prop_map(|(a, b, c)| Model::Update(a, b, c)),
                (
                    any::<u32>(),
                    prop::sample::select(vec![b'K', b'O']),
                    tuple()
                )
                    .prop_map(|(a, b, c)| Model::Delete(a, b, c)),
                (any::<u8>(), vec(any::<u32>(), 0..20)).prop_map(|(a, b)| Model::Truncate(a, b)),
                (any::<u8>(), any::<u64>(), name(), vec(any::<u8>(), 0..64))
                    .prop_map(|(a, b, c, d)| Model::Message(a, b, c, d)),
            ]
        }

        fn put_tuple(mut m: Msg, values: &[V]) -> Msg {
            m = m.i16(values.len() as i16);
            for v in values {
                m = match v {
                    V::Null => m.u8(b'n'),
                    V::Toast => m.u8(b'u'),
                    V::Text(b) => m.u8(b't').i32(b.len() as i32).raw(b),
                    V::Binary(b) => m.u8(b'b').i32(b.len() as i32).raw(b),
                };
            }
            m
        }

        fn encode(model: &Model) -> Vec<u8> {
            match model {
                Model::Begin(lsn, ts, xid) => Msg::new(b'B').u64(*lsn).i64(*ts).u32(*xid).0,
                Model::Commit(flags, commit, end, ts) => {
                    Msg::new(b'C').u8(*flags).u64(*commit).u64(*end).i64(*ts).0
                }
                Model::Origin(lsn, name) => Msg::new(b'O').u64(*lsn).cstr(name).0,
                Model::Relation(oid, ns, name, ident, cols) => {
                    let mut m = Msg::new(b'R')
                        .u32(*oid)
                        .cstr(ns)
                        .cstr(name)
                        .u8(*ident)
                        .i16(cols.len() as i16);
                    for (flags, col, type_oid, modifier) in cols {
                        m = m.u8(*flags).cstr(col).u32(*type_oid).i32(*modifier);
                    }
                    m.0
                }
                Model::Type(oid, ns, name) => Msg::new(b'Y').u32(*oid).cstr(ns).cstr(name).0,
                Model::Insert(oid, new) => put_tuple(Msg::new(b'I').u32(*oid).u8(b'N'), new).0,
                Model::Update(oid, old, new) => {
                    let mut m = Msg::new(b'U').u32(*oid);
                    if let Some((kind, old)) = old {
                        m = put_tuple(m.u8(*kind), old);
                    }
                    put_tuple(m.u8(b'N'), new).0
                }
                Model::Delete(oid, kind, old) => {
                    put_tuple(Msg::new(b'D').u32(*oid).u8(*kind), old).0
                }
                Model::Truncate(options, oids) => {
                    let mut m = Msg::new(b'T').u32(oids.len() as u32).u8(*options);
                    for oid in oids {
                        m = m.u32(*oid);
                    }
                    m.0
                }
                Model::Message(flags, lsn, prefix, content) => {
                    Msg::new(b'M')
                        .u8(*flags)
                        .u64(*lsn)
                        .cstr(prefix)
                        .u32(content.len() as u32)
                        .raw(content)
                        .0
                }
            }
        }

        fn same_tuple(model: &[V], decoded: &TupleData<'_>) -> bool {
            decoded.len() == model.len()
                && decoded.iter().zip(model).all(|(d, m)| match (d, m) {
                    (TupleValue::Null, V::Null) | (TupleValue::UnchangedToast, V::Toast) => true,
                    (TupleValue::Text(a), V::Text(b)) | (TupleValue::Binary(a), V::Binary(b)) => {
                        a == b.as_slice()
                    }
                    _ => false,
                })
        }

        fn kind(tag: u8) -> OldKind {
            if tag == b'K' {
                OldKind::Key
            } else {
                OldKind::Full
            }
        }

        fn identity(tag: u8) -> ReplicaIdentity {
            match tag {
                b'd' => ReplicaIdentity::Default,
                b'n' => ReplicaIdentity::Nothing,
                b'f' => ReplicaIdentity::Full,
                _ => ReplicaIdentity::Index,
            }
        }

        fn ts(pg: i64) -> i64 {
            pg.saturating_add(PG_EPOCH_OFFSET_MICROS)
        }

        /// Whether `decoded` says exactly what `model` says.
        fn matches(model: &Model, decoded: &Message<'_>) -> bool {
            match (model, decoded) {
                (Model::Begin(lsn, t, xid), Message::Begin(b)) => {
                    *b == Begin {
                        final_lsn: Lsn(*lsn),
                        commit_ts: ts(*t),
                        xid: *xid,
                    }
                }
                (Model::Commit(flags, commit, end, t), Message::Commit(c)) => {
                    *c == Commit {
                        flags: *flags,
                        commit_lsn: Lsn(*commit),
                        end_lsn: Lsn(*end),
                        commit_ts: ts(*t),
                    }
                }
                (Model::Origin(lsn, name), Message::Origin(o)) => {
                    o.commit_lsn == Lsn(*lsn) && o.name == name
                }
                (Model::Relation(oid, ns, name, ident, cols), Message::Relation(r)) => {
                    r.oid == *oid
                        && r.namespace == ns
                        && r.name == name
                        && r.replica_identity == identity(*ident)
                        && r.columns.len() == cols.len()
                        && r.columns.iter().zip(cols).all(|(c, (flags, n, t, m))| {
                            c.flags == *flags
                                && c.name == n
                                && c.type_oid == *t
                                && c.type_modifier == *m
                        })
                }
                (Model::Type(oid, ns, name), Message::Type(t)) => {
                    t.oid == *oid && t.namespace == ns && t.name == name
                }
                (Model::Insert(oid, new), Message::Insert(i)) => {
                    i.relation_oid == *oid && same_tuple(new, &i.new)
                }
                (Model::Update(oid, old, new), Message::Update(u)) => {
                    u.relation_oid == *oid
                        && same_tuple(new, &u.new)
                        && match (old, &u.old) {
                            (None, None) => true,
                            (Some((k, o)), Some((dk, d))) => kind(*k) == *dk && same_tuple(o, d),
                            _ => false,
                        }
                }
                (Model::Delete(oid, k, old), Message::Delete(d)) => {
                    d.relation_oid == *oid && d.old_kind == kind(*k) && same_tuple(old, &d.old)
                }
                (Model::Truncate(options, oids), Message::Truncate(t)) => {
                    t.cascade == (options & 1 != 0)
                        && t.restart_identity == (options & 2 != 0)
                        && &t.relation_oids == oids
                }
                (Model::Message(flags, lsn, prefix, content), Message::Message(m)) => {
                    m.transactional == (flags & 1 != 0)
                        && m.lsn == Lsn(*lsn)
                        && m.prefix == prefix
                        && m.content == content.as_slice()
                }
                _ => false,
            }
        }

        /// The offset an error names, if it is one that names an offset.
        fn offset(error: &DecodeError) -> Option<(&'static str, usize)> {
            match error {
                DecodeError::Truncated {
                    message, offset, ..
                }
                | DecodeError::Invalid {
                    message, offset, ..
                } => Some((message, *offset)),
                _ => None,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn every_message_round_trips(model in model()) {
                let bytes = encode(&model);
                let decoded = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(matches(&model, &decoded), "{model:?} decoded as {decoded:?}");
            }

            #[test]
            fn every_strict_prefix_is_an_error_inside_the_prefix(model in model(), cut in any::<prop::sample::Index>()) {
                let bytes = encode(&model);
                // Every message is at least two bytes long: cut to 1..len-1 bytes.
                let prefix = &bytes[..1 + cut.index(bytes.len() - 1)];
                let error = decode(prefix).expect_err("a strict prefix must not decode");
                let (message, at) = offset(&error).unwrap_or_else(|| panic!("no offset in {error}"));
                let expected = decode(&bytes).map(|m| format!("{m:?}")).unwrap_or_default();
                prop_assert!(expected.starts_with(message), "{error} for a {expected}");
                prop_assert!(at >= 1 && at <= prefix.len(), "{error} for {} bytes", prefix.len());
                let text = format!("at offset {at}");
                prop_assert!(error.to_string().contains(&text), "{}", error);
            }

            #[test]
            fn every_extension_is_a_trailing_bytes_error(model in model(), extra in vec(any::<u8>(), 1..16)) {
                let mut bytes = encode(&model);
                let end = bytes.len();
                bytes.extend_from_slice(&extra);
                let error = decode(&bytes).expect_err("trailing bytes must not decode");
                prop_assert_eq!(offset(&error).map(|(_, at)| at), Some(end), "{}", error);
                prop_assert!(error.to_string().contains("trailing"), "{}", error);
            }

            #[test]
            fn any_body_after_any_type_byte_is_a_message_or_a_located_error(
                tag in prop::sample::select(b"BCORYIUDTM".to_vec()),
                body in vec(any::<u8>(), 0..200),
            ) {
                let mut bytes = vec![tag];
                bytes.extend_from_slice(&body);
                match decode(&bytes) {
                    Ok(message) => {
                        let tuples: Vec<TupleData<'_>> = match &message {
                            Message::Insert(i) => vec![i.new],
                            Message::Update(u) => u.old.iter().map(|o| o.1).chain([u.new]).collect(),
                            Message::Delete(d) => vec![d.old],
                            _ => vec![],
                        };
                        for t in tuples {
                            prop_assert_eq!(t.iter().count(), t.len());
                        }
                    }
                    Err(error) => {
                        let (_, at) = offset(&error).unwrap_or_else(|| panic!("no offset in {error}"));
                        prop_assert!(at >= 1 && at <= bytes.len(), "{}", error);
                    }
                }
            }
        }
    }
}
