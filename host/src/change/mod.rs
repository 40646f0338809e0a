//! The change model: what the source produces and every later stage consumes.
//!
//! ```text
//! source ──Transaction{ meta, changes: [Change{ relation, op, new, old }] }──▶ pipeline ──▶ sinks
//! ```
//!
//! Invariants:
//! - A [`Transaction`] is committed: the source only emits it after PostgreSQL's
//!   Commit message, and `meta.commit_lsn` / `meta.end_lsn` come from that message.
//! - Transactions are emitted in commit order; `end_lsn` strictly increases.
//! - Each [`Change`] holds an `Arc<Relation>` describing its columns at the moment
//!   of the change, so a schema change between transactions is never misapplied.
//! - [`Value::UnchangedToast`] is distinct from [`Value::Null`]: PostgreSQL did not
//!   resend a TOASTed value that the update left unchanged.

pub mod identity;
pub mod json;
pub mod text;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A position in the write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// Error for a string that is not an LSN in PostgreSQL's `X/Y` hex form.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not an LSN: expected two hex numbers separated by `/`, like `0/16B3748`")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// Days between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;

/// Well-known type OIDs (from `pg_type.dat`).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const XML: u32 = 142;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const MONEY: u32 = 790;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;

    /// The element type of a built-in one-dimensional array type (`int4[]` → `int4`).
    pub fn array_element(array_oid: u32) -> Option<u32> {
        Some(match array_oid {
            1000 => BOOL,
            1001 => BYTEA,
            1002 => CHAR,
            1003 => NAME,
            1005 => INT2,
            1007 => INT4,
            1016 => INT8,
            1028 => OID,
            1009 => TEXT,
            1014 => BPCHAR,
            1015 => VARCHAR,
            1021 => FLOAT4,
            1022 => FLOAT8,
            1231 => NUMERIC,
            1182 => DATE,
            1183 => TIME,
            1115 => TIMESTAMP,
            1185 => TIMESTAMPTZ,
            1187 => INTERVAL,
            1270 => TIMETZ,
            2951 => UUID,
            199 => JSON,
            3807 => JSONB,
            143 => XML,
            791 => MONEY,
            1041 => 869,  // inet
            651 => 650,   // cidr
            1040 => 829,  // macaddr
            1561 => 1560, // bit
            1563 => 1562, // varbit
            _ => return None,
        })
    }
}

/// A column value, typed by the column's PostgreSQL type.
///
/// Temporal values use PostgreSQL's own conventions shifted to the Unix epoch:
/// `i64::MAX` / `i64::MIN` (and `i32::MAX` / `i32::MIN` for dates) stand for
/// `infinity` / `-infinity`, exactly as PostgreSQL stores them.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value that PostgreSQL did not resend in an UPDATE.
    UnchangedToast,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Exact decimal text, including `NaN`, `Infinity` and `-Infinity`.
    Numeric(String),
    Text(String),
    Bytes(Vec<u8>),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since midnight.
    Time(i64),
    /// Microseconds since 1970-01-01 00:00:00, no time zone.
    Timestamp(i64),
    /// Microseconds since the Unix epoch, UTC.
    Timestamptz(i64),
    Uuid([u8; 16]),
    /// JSON text (from `json` or `jsonb`).
    Json(String),
    /// PostgreSQL's text form of any other type (arrays, intervals, enums, ranges, ...).
    Other(String),
}

impl Value {
    /// Bytes this value occupies in memory beyond the enum itself: used for
    /// the sinks' size bounds and the guests' output cap.
    pub fn heap_size(&self) -> usize {
        match self {
            Value::Numeric(s) | Value::Text(s) | Value::Json(s) | Value::Other(s) => s.len(),
            Value::Bytes(b) => b.len(),
            _ => 0,
        }
    }
}

/// One column of a relation as described by pgoutput's Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity (the key sent with updates and deletes).
    pub key: bool,
}

/// How PostgreSQL identifies old rows in updates and deletes (`relreplident`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

/// A table as described by the most recent Relation message for its OID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
    /// The policy classes the columns' comments give (`airlock: CLASS`), by column
    /// name, as the catalog said when this relation version was read.
    pub comment_classes: std::collections::BTreeMap<String, String>,
}

impl Relation {
    /// `schema.table`, the name of the table's lake directory.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// What happened to a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// A row copied by the initial snapshot.
    Read,
    /// The table was truncated; the change carries no row images.
    Truncate,
}

impl Op {
    /// The single-letter code written to the lake's `_op` column.
    pub fn code(self) -> &'static str {
        match self {
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }

    /// The operation's name as the guest contract's `op` has it (`snapshot` for a
    /// snapshot read), and as `airlock guest test` and `[when] ops` write it.
    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Read => "snapshot",
            Op::Truncate => "truncate",
        }
    }

    /// The operation [`Op::name`] gives `name`.
    pub fn from_name(name: &str) -> Option<Op> {
        [Op::Insert, Op::Update, Op::Delete, Op::Read, Op::Truncate]
            .into_iter()
            .find(|op| op.name() == name)
    }
}

/// One row change inside a transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub relation: Arc<Relation>,
    pub op: Op,
    /// The LSN of the change record itself (the XLogData start of its message).
    pub lsn: Lsn,
    /// The new image (insert, update, snapshot read); one value per relation column.
    pub new: Option<Vec<Value>>,
    /// The old image (update and delete): the key columns, or every column with
    /// REPLICA IDENTITY FULL; columns outside the key are `Null`.
    pub old: Option<Vec<Value>>,
    /// Who made the change: the last identity message before it in its transaction
    /// (see `crate::identity`); `None` without one, and for snapshot reads.
    pub identity: Option<Arc<identity::Identity>>,
}

impl Change {
    /// About how many bytes the change holds in memory: the struct, its images and
    /// what their values own, each allocation with the allocator's header. What the
    /// source's parts, the pipeline queue and the lake buffer are bounded by.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Change>() + image_bytes(&self.new) + image_bytes(&self.old)
    }
}

/// What an allocation costs beyond its contents: the allocator's header and rounding.
pub const ALLOCATION_OVERHEAD: usize = 16;

/// Bytes of an image in memory: its vector of values and each value's own allocation.
pub fn image_bytes(image: &Option<Vec<Value>>) -> usize {
    image.as_ref().map_or(0, |values| {
        ALLOCATION_OVERHEAD
            + values.capacity() * std::mem::size_of::<Value>()
            + values
                .iter()
                .map(|v| match v.heap_size() {
                    0 => 0,
                    n => n + ALLOCATION_OVERHEAD,
                })
                .sum::<usize>()
    })
}

/// Commit metadata shared by every change of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnMeta {
    pub xid: u32,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: what the slot is acknowledged up to.
    /// [`Lsn::ZERO`] in a part that is not the transaction's last (see [`Part`]).
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts: i64,
    /// Which part of the transaction this is; [`Part::WHOLE`] for all but large ones.
    pub part: Part,
    /// Why these rows were copied rather than streamed (a snapshot: `initial
    /// snapshot`, or why a table was copied again); `None` for streamed changes.
    pub copied: Option<Arc<str>>,
}

impl TxnMeta {
    /// Whether this is the transaction's last (or only) part: its end is known, and
    /// once it is durable the slot may be acknowledged past the whole transaction.
    pub fn completes(&self) -> bool {
        self.part.last
    }
}

/// Where a piece of a transaction sits in it.
///
/// The source hands a transaction larger than its part bound (see
/// [`crate::source::PART_CHANGES`]) to the pipeline in several parts, so memory stays
/// bounded however large a transaction is. Every part is a [`Transaction`] with the
/// same `xid`, `commit_lsn` and `commit_ts` (pgoutput's Begin message carries them);
/// only the last knows `end_lsn`. Parts arrive in order and nothing else arrives
/// between them. Sinks may stage a part's rows, but make them visible only with the
/// last part, and acknowledge nothing of the transaction before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// Index in the transaction of the part's first change.
    pub offset: u64,
    /// Whether this is the transaction's last part.
    pub last: bool,
}

impl Part {
    /// A transaction in one piece.
    pub const WHOLE: Part = Part {
        offset: 0,
        last: true,
    };

    pub fn is_whole(self) -> bool {
        self == Part::WHOLE
    }
}

/// A committed transaction and its changes, in the order PostgreSQL made them.
#[derive(Clone, Debug, PartialEq)]
pub struct Transaction {
    pub meta: TxnMeta,
    pub changes: Vec<Change>,
}

impl Transaction {
    /// About how many bytes the transaction holds in memory (see [`Change::approx_bytes`]).
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Transaction>()
            + self.changes.iter().map(Change::approx_bytes).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_postgres_text_form() {
        for text in ["0/0", "0/16B3748", "1/0", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!("1/2".parse::<Lsn>().unwrap(), Lsn((1 << 32) | 2));
        assert!("12".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }
}
