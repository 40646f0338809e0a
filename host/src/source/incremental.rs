//! Incremental snapshots: a table's existing rows copied while the stream runs, for a
//! table added to the publication after the slot exists, and for a table whose stored
//! values changed without WAL that logical decoding would carry (`ADD COLUMN … DEFAULT`,
//! a rewrite by `ALTER COLUMN … TYPE … USING`).
//!
//! ```text
//!  watch (every WATCH_INTERVAL, at each session start, after a Relation message):
//!    pg_publication_tables + pg_attribute + the storage of each table ──▶ Shape
//!    compared with the state file: new table / new column with a default WAL never
//!    carried (atthasmissing) / a type changed / storage rewritten ──▶ copy due
//!
//!  copy task (one table at a time)                 streamer
//!    replication conn: CREATE_REPLICATION_SLOT     │ tracks, from launch, the key of
//!      … TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT│ every streamed change of the table
//!      ─▶ consistent point CP                       │ (key → highest commit LSN), and
//!    SQL conn: BEGIN REPEATABLE READ;               │ its truncates
//!      SET TRANSACTION SNAPSHOT (slot dropped)      │
//!    COPY the published columns and rows           │
//!      chunk n ─────────── channel (2 in flight) ──▶│ held
//!      pg_logical_emit_message(true,               │
//!        'airlock.watermark', 'nonce:n') ── WAL ──▶ │ the watermark's transaction
//!                                                  │ (commit C, end E): chunk n, less
//!                                                  │ the rows whose key changed at or
//!                                                  │ after CP, dispatched as one
//!                                                  │ transaction at (C, E)
//!    done ────────────────────────────────────────▶│ complete once E of the last
//!                                                  │ chunk is durable: state saved
//! ```
//!
//! Invariants:
//! - Exact merge: the exported snapshot holds exactly the transactions that commit
//!   before CP. A chunk row whose key a streamed change touched at or after CP is
//!   dropped (the stream already carried a newer state, or the row's deletion); every
//!   other row is the state of its key when the chunk is dispatched, and every later
//!   change follows it. A truncate at or after CP drops every later chunk. This is
//!   the watermark scheme of DBLog with one difference: the window opens at the slot's
//!   consistent point, not at a low watermark, which closes the gap where a
//!   transaction commits in WAL before the low watermark but is not yet visible to
//!   the chunk's query.
//! - A chunk takes the LSNs of its watermark's transaction, a real transaction of the
//!   slot: chunk LSNs are strictly increasing among streamed ones, the lake's
//!   exactly-once rule holds, and acknowledging a chunk never acknowledges WAL that
//!   was not dispatched.
//! - Memory: at most two chunks are held; the copy waits for the stream.
//! - The state file (0600) keeps, per published table, its shape and whether a copy
//!   is due. A copy stays due until its last chunk is durable, so a crash or
//!   reconnect copies the table again, from a new consistent point; a watermark of an
//!   earlier session is ignored (its nonce is unknown).
//! - Only tables with a key (a primary key, `REPLICA IDENTITY USING INDEX`, or
//!   `FULL`, exact when rows are unique) are copied this way; others are refused by
//!   name, with the fix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{debug, error, info, warn};

use super::catalog::{self, catalog_error};
use super::copy::{copy_sql, open_reader, read_copy};
use super::error::SourceError;
use super::protocol::{ConnectConfig, ReplicationConnection, SnapshotAction};
use crate::change::{Change, Lsn, Op, Relation, ReplicaIdentity, Transaction, TxnMeta, Value};

/// The prefix of the logical messages that mark where a chunk goes in the stream.
pub const WATERMARK_PREFIX: &str = "airlock.watermark";
/// The prefix of the logical message `airlock snapshot` writes to ask for copies.
pub const REQUEST_PREFIX: &str = "airlock.snapshot.request";
/// How often the catalog is compared with what the lake was given.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// Chunks held at once: one being dispatched, one waiting for its watermark.
const CHUNKS_IN_FLIGHT: usize = 2;
/// How long a failed copy waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// What decides whether a table's stored rows are what the stream has carried: its
/// columns (name, type, whether existing rows have a value WAL never carried) and the
/// storage it lives in (files of its leaf partitions).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub storage: String,
    pub columns: Vec<ShapeColumn>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeColumn {
    pub name: String,
    pub type_oid: u32,
    /// `atthasmissing`: rows stored before the column existed read a default that
    /// is in the catalog, not in the rows, and never in WAL.
    pub has_missing: bool,
}

/// One published table as airlock knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableState {
    pub name: String,
    pub shape: Shape,
    /// Why the table is to be copied again; `None` when the lake has all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<String>,
    /// Rows dispatched by the copy under way (or the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Why the last copy that completed was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied: Option<String>,
}

/// What `airlock snapshot` asks of the airlock that streams from `slot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub slot: String,
    /// Tables by OID, as published when asked.
    pub tables: Vec<u32>,
    /// Names the request in the state's `due` and `copied`, so the asker sees it done.
    pub id: String,
}

impl Request {
    /// The reason a requested copy gives.
    pub fn reason(&self) -> String {
        format!("requested with airlock snapshot (request {})", self.id)
    }
}

/// The state file: every published table by OID.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables {
    pub tables: BTreeMap<u32, TableState>,
}

impl Tables {
    /// The state file of `slot` on the cluster `system_id`, in `dir`.
    pub fn path(dir: &Path, system_id: &str, slot: &str) -> PathBuf {
        dir.join(format!("airlock-{system_id}-{slot}.tables.json"))
    }

    /// Reads the state file; `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<Tables>, SourceError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| SourceError::State {
                    path: path.to_owned(),
                    reason: format!(
                        "it does not parse ({e}); remove it to start over from the catalog as it is"
                    ),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SourceError::State {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// Writes the state file whole (a new file renamed over the old one), `0600`.
    pub fn save(&self, path: &Path) -> Result<(), SourceError> {
        let fail = |e: std::io::Error| SourceError::State {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            crate::private_files::create_dir_all(dir).map_err(fail)?;
        }
        let scratch = path.with_extension("json.new");
        let bytes = serde_json::to_vec_pretty(self).expect("the state serializes");
        {
            use std::io::Write;
            let mut file = crate::private_files::create(&scratch).map_err(fail)?;
            file.write_all(&bytes).map_err(fail)?;
            file.sync_all().map_err(fail)?;
        }
        std::fs::rename(&scratch, path).map_err(fail)
    }

    /// The state of a catalog just copied whole (the initial snapshot): nothing due.
    pub fn baseline(shapes: BTreeMap<u32, (String, Shape)>) -> Tables {
        Tables {
            tables: shapes
                .into_iter()
                .map(|(oid, (name, shape))| {
                    (
                        oid,
                        TableState {
                            name,
                            shape,
                            due: None,
                            rows: None,
                            copied: None,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Folds the catalog as it is now into the state: a new table, and a table whose
    /// stored values changed without WAL, become due. `truncated`: tables truncated in
    /// the stream since the last look (a truncate gives a table new storage, and the
    /// stream carries it). Returns the tables that became due.
    pub fn update(
        &mut self,
        shapes: BTreeMap<u32, (String, Shape)>,
        truncated: &std::collections::HashSet<u32>,
    ) -> Vec<u32> {
        let mut due = Vec::new();
        self.tables.retain(|oid, _| shapes.contains_key(oid));
        for (oid, (name, shape)) in shapes {
            match self.tables.get_mut(&oid) {
                None => {
                    info!(table = %name, "a table was added to the publication: copying its rows");
                    due.push(oid);
                    self.tables.insert(
                        oid,
                        TableState {
                            name,
                            shape,
                            due: Some("added to the publication".into()),
                            rows: None,
                            copied: None,
                        },
                    );
                }
                Some(known) => {
                    if let Some(reason) = changed(&known.shape, &shape, truncated.contains(&oid)) {
                        info!(table = %name, reason, "rows changed without WAL: copying the table again");
                        due.push(oid);
                        known.due = Some(join(known.due.take(), reason));
                    }
                    known.name = name;
                    known.shape = shape;
                }
            }
        }
        due
    }
}

/// A reason added to those a table is already due for: each is told when done.
fn join(due: Option<String>, reason: String) -> String {
    match due {
        Some(due) if due.contains(&reason) => due,
        Some(due) => format!("{due}; {reason}"),
        None => reason,
    }
}

/// Why a table whose shape went from `old` to `new` needs its rows copied again, if
/// it does.
fn changed(old: &Shape, new: &Shape, truncated: bool) -> Option<String> {
    let mut reasons = Vec::new();
    for column in &new.columns {
        match old.columns.iter().find(|c| c.name == column.name) {
            None if column.has_missing => reasons.push(format!(
                "column `{}` was added with a default that WAL does not carry",
                column.name
            )),
            Some(before) if before.type_oid != column.type_oid => reasons.push(format!(
                "column `{}` changed type, and a rewrite is not in WAL",
                column.name
            )),
            _ => {}
        }
    }
    if reasons.is_empty() && old.storage != new.storage && !truncated {
        reasons.push(
            "the table was rewritten (ALTER TABLE, VACUUM FULL or CLUSTER), which is not in WAL"
                .into(),
        );
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// Every published table's shape, by OID, with its qualified name.
pub async fn shapes(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<BTreeMap<u32, (String, Shape)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.oid, format('%I.%I', n.nspname, c.relname), \
               (SELECT coalesce(string_agg(pc.relfilenode::text, ',' ORDER BY pc.oid), '') \
                  FROM pg_partition_tree(c.oid) t JOIN pg_class pc ON pc.oid = t.relid WHERE t.isleaf), \
               coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL), '{}'), \
               coalesce(array_agg(a.atttypid ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL), '{}'), \
               coalesce(array_agg(a.atthasmissing ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL), '{}') \
             FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE p.pubname = $1 \
             GROUP BY c.oid, n.nspname, c.relname",
            &[&publication],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let names: Vec<String> = row.get(3);
            let types: Vec<u32> = row.get(4);
            let missing: Vec<bool> = row.get(5);
            let columns = names
                .into_iter()
                .zip(types)
                .zip(missing)
                .map(|((name, type_oid), has_missing)| ShapeColumn {
                    name,
                    type_oid,
                    has_missing,
                })
                .collect();
            (
                row.get::<_, u32>(0),
                (
                    row.get(1),
                    Shape {
                        storage: row.get(2),
                        columns,
                    },
                ),
            )
        })
        .collect())
}

/// What the copy task tells the streamer.
#[derive(Debug)]
pub(super) enum CopyEvent {
    /// The snapshot is taken: rows changed at or after `consistent_point` are newer.
    Started { consistent_point: Lsn },
    /// Chunk `n`, to go where its watermark lands in the stream.
    Chunk {
        n: u64,
        changes: Vec<Change>,
        permit: OwnedSemaphorePermit,
    },
    /// Every chunk was sent, and its watermark written.
    Done { chunks: u64, rows: u64 },
    /// The copy failed; it is tried again later.
    Failed(SourceError),
}

/// The key of a row: its key columns by name (sorted), with their values.
fn key_of(relation: &Relation, values: &[Value]) -> Option<Vec<u8>> {
    let mut columns: Vec<(&str, &Value)> = relation
        .columns
        .iter()
        .zip(values)
        .filter(|(c, _)| c.key)
        .map(|(c, v)| (c.name.as_str(), v))
        .collect();
    if columns.is_empty() {
        return None;
    }
    columns.sort_by(|a, b| a.0.cmp(b.0));
    let mut key = Vec::with_capacity(32);
    for (name, value) in columns {
        key.extend_from_slice(name.as_bytes());
        key.push(0);
        encode(value, &mut key);
    }
    Some(key)
}

/// An unambiguous encoding of a value, for key equality only.
fn encode(value: &Value, out: &mut Vec<u8>) {
    let text = |out: &mut Vec<u8>, tag: u8, s: &[u8]| {
        out.push(tag);
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
    };
    match value {
        Value::Null => out.push(0),
        Value::UnchangedToast => out.push(1),
        Value::Bool(b) => out.extend_from_slice(&[2, u8::from(*b)]),
        Value::Int(i) => {
            out.push(3);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(f) => {
            out.push(4);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Numeric(s) => text(out, 5, s.as_bytes()),
        Value::Text(s) => text(out, 6, s.as_bytes()),
        Value::Bytes(b) => text(out, 7, b),
        Value::Date(d) => {
            out.push(8);
            out.extend_from_slice(&d.to_le_bytes());
        }
        Value::Time(t) | Value::Timestamp(t) | Value::Timestamptz(t) => {
            out.push(9);
            out.extend_from_slice(&t.to_le_bytes());
        }
        Value::Uuid(u) => {
            out.push(10);
            out.extend_from_slice(u);
        }
        Value::Json(s) => text(out, 11, s.as_bytes()),
        Value::Other(s) => text(out, 12, s.as_bytes()),
    }
}

/// One table being copied.
pub(super) struct Copy {
    pub oid: u32,
    pub name: String,
    pub reason: String,
    /// What the chunks say in the lake's commit info and the spine's events.
    copied: Arc<str>,
    nonce: String,
    events: mpsc::Receiver<CopyEvent>,
    /// False once the task dropped its sender.
    events_open: bool,
    task: tokio::task::JoinHandle<()>,
    consistent_point: Option<Lsn>,
    /// Keys the stream changed since the copy was launched, with the highest commit
    /// LSN of a change to each.
    changed: HashMap<Vec<u8>, Lsn>,
    /// The highest commit LSN of a truncate of the table since launch.
    truncated: Option<Lsn>,
    /// Chunks received and not yet dispatched.
    held: BTreeMap<u64, (Vec<Change>, OwnedSemaphorePermit)>,
    dispatched: u64,
    done: Option<(u64, u64)>,
    /// The end LSN of the last chunk dispatched.
    pub last_end: Option<Lsn>,
    pub rows_sent: u64,
    pub rows_dropped: u64,
    pub started: Instant,
}

impl Drop for Copy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Copy {
    /// Starts copying table `oid` (named `name` in the state).
    pub fn launch(
        connect: ConnectConfig,
        publication: String,
        slot: &str,
        oid: u32,
        name: String,
        reason: String,
    ) -> Copy {
        let mut random = [0u8; 16];
        // Unique per copy; unpredictable, so that no one can place a chunk by forging
        // its watermark (and a forged one could only place it later, which is safe).
        if crate::secrets::random_bytes(&mut random).is_err() {
            random = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .to_le_bytes();
        }
        let nonce = hex::encode(random);
        let (tx, events) = mpsc::channel(CHUNKS_IN_FLIGHT + 4);
        let temp_slot = format!("{}_copy_{}", &slot[..slot.len().min(40)], &nonce[..12]);
        let task = tokio::spawn(copy_task(
            connect,
            publication,
            temp_slot,
            oid,
            name.clone(),
            nonce.clone(),
            tx,
        ));
        info!(table = %name, reason, "incremental snapshot started");
        Copy::new(oid, name, reason, nonce, events, task)
    }

    fn new(
        oid: u32,
        name: String,
        reason: String,
        nonce: String,
        events: mpsc::Receiver<CopyEvent>,
        task: tokio::task::JoinHandle<()>,
    ) -> Copy {
        Copy {
            copied: format!("copied again: {reason}").into(),
            oid,
            name,
            reason,
            nonce,
            events,
            events_open: true,
            task,
            consistent_point: None,
            changed: HashMap::new(),
            truncated: None,
            held: BTreeMap::new(),
            dispatched: 0,
            done: None,
            last_end: None,
            rows_sent: 0,
            rows_dropped: 0,
            started: Instant::now(),
        }
    }

    /// The next event of the copy task.
    pub async fn next_event(&mut self) -> Option<CopyEvent> {
        self.events.recv().await
    }

    /// Takes in an event; returns the error of a failed copy.
    pub fn take(&mut self, event: CopyEvent) -> Result<(), SourceError> {
        match event {
            CopyEvent::Started { consistent_point } => {
                debug!(table = %self.name, consistent_point = %consistent_point, "incremental snapshot taken");
                self.consistent_point = Some(consistent_point);
            }
            CopyEvent::Chunk { n, changes, permit } => {
                self.held.insert(n, (changes, permit));
            }
            CopyEvent::Done { chunks, rows } => self.done = Some((chunks, rows)),
            CopyEvent::Failed(error) => return Err(error),
        }
        Ok(())
    }

    /// Notes the keys a dispatched transaction changes in the table.
    pub fn observe(&mut self, txn: &Transaction) {
        let commit = txn.meta.commit_lsn;
        for change in &txn.changes {
            if change.relation.oid != self.oid {
                continue;
            }
            match change.op {
                Op::Read => {}
                Op::Truncate => {
                    self.truncated = Some(self.truncated.map_or(commit, |t| t.max(commit)))
                }
                Op::Insert | Op::Update | Op::Delete => {
                    for image in [&change.old, &change.new].into_iter().flatten() {
                        if let Some(key) = key_of(&change.relation, image) {
                            let at = self.changed.entry(key).or_insert(commit);
                            *at = (*at).max(commit);
                        }
                    }
                }
            }
        }
    }

    /// Whether the transaction `meta` that carried watermark `content` is one of
    /// this copy's: then the chunk it marks, less the rows the stream changed since
    /// the snapshot, as a transaction at the watermark's LSNs. Drains the events that
    /// came meanwhile (the chunk is sent before its watermark is written).
    pub fn chunk_at(
        &mut self,
        content: &[u8],
        meta: &TxnMeta,
    ) -> Result<Option<Transaction>, SourceError> {
        let Some(n) = std::str::from_utf8(content)
            .ok()
            .and_then(|c| c.strip_prefix(self.nonce.as_str()))
            .and_then(|c| c.strip_prefix(':'))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return Ok(None);
        };
        while !self.held.contains_key(&n) {
            match self.events.try_recv() {
                Ok(event) => self.take(event)?,
                Err(_) => {
                    // The copy sends a chunk before it writes the chunk's watermark:
                    // this one was not written by it.
                    warn!(table = %self.name, chunk = n, commit_lsn = %meta.commit_lsn, "a watermark without its chunk, ignored");
                    return Ok(None);
                }
            }
        }
        let (changes, _permit) = self.held.remove(&n).expect("looked for above");
        let consistent_point = self.consistent_point.unwrap_or(Lsn::ZERO);
        let truncated = self.truncated.is_some_and(|t| t >= consistent_point);
        let before = changes.len();
        let changes: Vec<Change> = changes
            .into_iter()
            .filter(|change| {
                !truncated
                    && change
                        .new
                        .as_deref()
                        .and_then(|values| key_of(&change.relation, values))
                        .is_none_or(|key| {
                            self.changed
                                .get(&key)
                                .is_none_or(|at| *at < consistent_point)
                        })
            })
            .map(|mut change| {
                change.lsn = meta.commit_lsn;
                change
            })
            .collect();
        self.rows_dropped += (before - changes.len()) as u64;
        self.rows_sent += changes.len() as u64;
        self.dispatched = n + 1;
        self.last_end = Some(meta.end_lsn);
        debug!(table = %self.name, chunk = n, rows = changes.len(), dropped = before - changes.len(), commit_lsn = %meta.commit_lsn, "incremental snapshot chunk");
        Ok(Some(Transaction {
            meta: TxnMeta {
                part: crate::change::Part::WHOLE,
                copied: Some(self.copied.clone()),
                ..meta.clone()
            },
            changes,
        }))
    }

    /// Whether every chunk was dispatched.
    pub fn finished(&self) -> bool {
        self.done
            .is_some_and(|(chunks, _)| self.dispatched >= chunks)
    }

    /// Rows the copy read so far (known once it is done).
    pub fn rows_read(&self) -> Option<u64> {
        self.done.map(|(_, rows)| rows)
    }
}

async fn copy_task(
    connect: ConnectConfig,
    publication: String,
    temp_slot: String,
    oid: u32,
    name: String,
    nonce: String,
    tx: mpsc::Sender<CopyEvent>,
) {
    if let Err(error) = copy(&connect, &publication, &temp_slot, oid, &name, &nonce, &tx).await {
        let _ = tx.send(CopyEvent::Failed(error)).await;
    }
}

async fn copy(
    connect: &ConnectConfig,
    publication: &str,
    temp_slot: &str,
    oid: u32,
    name: &str,
    nonce: &str,
    tx: &mpsc::Sender<CopyEvent>,
) -> Result<(), SourceError> {
    let addr = connect.addr();
    let user = connect.user.clone();
    let fail = |during: &'static str| {
        let (addr, user) = (addr.clone(), user.clone());
        move |e: tokio_postgres::Error| catalog_error(&addr, &user, during, e)
    };
    let refuse = |during: &'static str, reason: String| SourceError::Snapshot {
        table: name.to_owned(),
        during,
        reason,
    };
    // The temporary slot exports a snapshot that holds exactly the transactions that
    // commit before its consistent point; it goes with the connection.
    let mut replication = ReplicationConnection::connect(connect).await?;
    let created = replication
        .create_logical_slot(temp_slot, true, SnapshotAction::Export)
        .await?;
    let snapshot = created
        .snapshot_name
        .ok_or_else(|| refuse("creating the slot", "no snapshot name".into()))?;
    let client = open_reader(connect, &snapshot).await?;
    drop(replication);
    let consistent_point = created.consistent_point;
    if tx
        .send(CopyEvent::Started { consistent_point })
        .await
        .is_err()
    {
        return Ok(());
    }
    let version = catalog::server_version(&client)
        .await
        .map_err(fail("reading the server version"))?;
    let tables = catalog::published_tables(&client, publication, version)
        .await
        .map_err(fail("listing the published tables"))?;
    let mut found = None;
    for table in tables {
        let described = catalog::describe(&client, &table, version)
            .await
            .map_err(fail("describing a published table"))?;
        if described.0.oid == oid {
            found = Some((table, described));
            break;
        }
    }
    let Some((table, (relation, plain))) = found else {
        // No longer published: nothing to copy.
        let _ = tx.send(CopyEvent::Done { chunks: 0, rows: 0 }).await;
        return Ok(());
    };
    if relation.replica_identity == ReplicaIdentity::Nothing
        || !relation.columns.iter().any(|c| c.key)
    {
        return Err(refuse(
            "looking for its key",
            "it has no primary key and no replica identity index, so its rows cannot be merged with concurrent changes; add a primary key (or ALTER TABLE … REPLICA IDENTITY USING INDEX …), and airlock copies it at its next look".into(),
        ));
    }
    let (watermarks, connection) = connect.connect_sql().await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(error = %error, "watermark connection ended");
        }
    });
    let semaphore = Arc::new(Semaphore::new(CHUNKS_IN_FLIGHT));
    let relation = Arc::new(relation);
    let sql = copy_sql(&relation, plain, table.row_filters.as_deref(), None);
    let (rows_tx, mut rows_rx) = mpsc::channel::<Vec<Change>>(1);
    let read = async move {
        read_copy(
            &client,
            &sql,
            &relation,
            consistent_point,
            &rows_tx,
            fail("copying a table"),
        )
        .await
        .map(|rows| (rows, client))
    };
    // Each chunk goes to the streamer, then its watermark into WAL.
    let forward = async {
        let mut n = 0u64;
        while let Some(changes) = rows_rx.recv().await {
            let permit = semaphore
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            if tx
                .send(CopyEvent::Chunk { n, changes, permit })
                .await
                .is_err()
            {
                break;
            }
            watermarks
                .execute(
                    "SELECT pg_logical_emit_message(true, $1, $2)",
                    &[&WATERMARK_PREFIX, &format!("{nonce}:{n}")],
                )
                .await
                .map_err(fail("writing a watermark (pg_logical_emit_message)"))?;
            n += 1;
        }
        Ok::<u64, SourceError>(n)
    };
    let (read, forwarded) = tokio::join!(read, forward);
    let n = forwarded?;
    let (rows, client) = read?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(fail("ending the snapshot transaction"))?;
    let _ = tx.send(CopyEvent::Done { chunks: n, rows }).await;
    Ok(())
}

/// The incremental snapshots of one session: the state, the copy under way.
pub(super) struct Incremental {
    /// The state file; `None` when tables are not copied (`snapshot = "never"`).
    pub path: Option<PathBuf>,
    pub state: Option<Tables>,
    pub copy: Option<Copy>,
    /// A copy whose last chunk is dispatched: the table, and the end LSN that must be
    /// durable before the table is no longer due.
    pub completing: Vec<(u32, Option<Lsn>, String)>,
    /// Tables truncated in the stream since the last look.
    pub truncated: std::collections::HashSet<u32>,
    /// A Relation message came: look at the catalog after this transaction.
    pub look_soon: bool,
    /// Tables whose copy failed, not tried again before the instant.
    pub backoff: HashMap<u32, Instant>,
    /// Tables that became due again while being copied.
    pub again: std::collections::HashSet<u32>,
}

impl Incremental {
    pub fn off() -> Incremental {
        Incremental {
            path: None,
            state: None,
            copy: None,
            completing: Vec::new(),
            truncated: Default::default(),
            look_soon: false,
            backoff: HashMap::new(),
            again: Default::default(),
        }
    }

    /// The incremental snapshots of a session on cluster `system_id`: off unless
    /// `settings.snapshot`; `baseline`, the shapes an initial snapshot just copied.
    pub fn start(
        settings: &super::SourceSettings,
        system_id: &str,
        baseline: Option<BTreeMap<u32, (String, Shape)>>,
    ) -> Result<Incremental, SourceError> {
        let mut incremental = Incremental::off();
        if !settings.snapshot {
            return Ok(incremental);
        }
        let path = Tables::path(&settings.state_dir, system_id, &settings.slot);
        incremental.state = match baseline {
            Some(shapes) => {
                let state = Tables::baseline(shapes);
                state.save(&path)?;
                Some(state)
            }
            None => Tables::load(&path)?,
        };
        incremental.path = Some(path);
        Ok(incremental)
    }

    /// Takes in the catalog as it is now: what became due, saved.
    pub fn absorb(&mut self, shapes: BTreeMap<u32, (String, Shape)>) -> Result<(), SourceError> {
        let truncated = std::mem::take(&mut self.truncated);
        let Some(path) = self.path.as_ref() else {
            return Ok(());
        };
        match self.state.as_mut() {
            Some(state) => {
                let before = state.clone();
                let due = state.update(shapes, &truncated);
                // A table due again while its copy runs: that copy predates the
                // change, so finishing it does not settle the table.
                for oid in due {
                    if self.copy.as_ref().is_some_and(|c| c.oid == oid)
                        || self.completing.iter().any(|(o, _, _)| *o == oid)
                    {
                        self.again.insert(oid);
                    }
                }
                if *state != before {
                    state.save(path)?;
                }
            }
            None => {
                info!(path = %path.display(), "no state file for this slot: the lake is taken to have every published table whole as of now, and a table added or rewritten from now on is copied");
                let state = Tables::baseline(shapes);
                state.save(path)?;
                self.state = Some(state);
            }
        }
        // A table no longer published is not copied on.
        if let Some(copy) = &self.copy
            && self
                .state
                .as_ref()
                .is_some_and(|s| !s.tables.contains_key(&copy.oid))
        {
            info!(table = %copy.name, "the table left the publication; its copy stops");
            self.copy = None;
        }
        Ok(())
    }

    /// Whether tables are copied when added or rewritten (`snapshot = "initial"`).
    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// Notes what a dispatched transaction tells the copies.
    pub fn observe(&mut self, txn: &Transaction) {
        if !self.enabled() {
            return;
        }
        for change in &txn.changes {
            if change.op == Op::Truncate {
                self.truncated.insert(change.relation.oid);
            }
        }
        if let Some(copy) = self.copy.as_mut() {
            copy.observe(txn);
        }
    }

    /// A failed copy: logged, and tried again later.
    pub fn failed(&mut self, error: &SourceError) {
        if let Some(copy) = self.copy.take() {
            error!(table = %copy.name, error = %error, retry_in_s = RETRY_AFTER.as_secs(), "incremental snapshot failed; the table stays due");
            self.backoff.insert(copy.oid, Instant::now() + RETRY_AFTER);
        }
    }

    /// Takes in the next event of the copy under way (`None`: its task ended).
    pub fn event(&mut self, event: Option<CopyEvent>) {
        let Some(copy) = self.copy.as_mut() else {
            return;
        };
        let result = match event {
            Some(event) => copy.take(event),
            None => {
                copy.events_open = false;
                if copy.done.is_some() {
                    Ok(())
                } else {
                    Err(SourceError::Snapshot {
                        table: copy.name.clone(),
                        during: "copying",
                        reason: "the copy ended before it was done".into(),
                    })
                }
            }
        };
        if let Err(error) = result {
            self.failed(&error);
        }
        self.settle();
    }

    /// Whether the copy under way may have events to take.
    pub fn listening(&self) -> bool {
        self.copy.as_ref().is_some_and(|c| c.events_open)
    }

    /// Moves a copy whose chunks are all dispatched to `completing`.
    pub fn settle(&mut self) {
        if self.copy.as_ref().is_some_and(Copy::finished) {
            let copy = self.copy.take().expect("checked above");
            info!(
                table = %copy.name,
                rows = copy.rows_sent,
                rows_newer_in_stream = copy.rows_dropped,
                rows_read = copy.rows_read().unwrap_or(0),
                seconds = copy.started.elapsed().as_secs_f64(),
                reason = %copy.reason,
                "incremental snapshot dispatched; complete once durable"
            );
            self.completing
                .push((copy.oid, copy.last_end, copy.reason.clone()));
        }
    }

    /// Marks the tables whose copy is durable as no longer due; saves the state.
    /// Returns the tables completed (name, reason).
    pub fn durable(&mut self, durable: Lsn) -> Result<Vec<(String, String)>, SourceError> {
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.completing)
            .into_iter()
            .partition(|(_, end, _)| end.is_none_or(|end| durable >= end));
        self.completing = rest;
        let mut completed = Vec::new();
        if done.is_empty() {
            return Ok(completed);
        }
        let (Some(state), Some(path)) = (self.state.as_mut(), self.path.as_ref()) else {
            return Ok(completed);
        };
        for (oid, _, reason) in done {
            if self.again.remove(&oid) {
                continue;
            }
            if let Some(table) = state.tables.get_mut(&oid) {
                info!(table = %table.name, reason, "incremental snapshot complete");
                table.due = None;
                completed.push((table.name.clone(), reason.clone()));
                table.copied = Some(reason);
            }
        }
        state.save(path)?;
        Ok(completed)
    }

    /// Takes in a request of `airlock snapshot` (read in stream order): the tables it
    /// names become due. A request for another slot is not this airlock's.
    pub fn request(&mut self, content: &[u8]) -> Result<(), SourceError> {
        let Ok(request) = serde_json::from_slice::<Request>(content) else {
            warn!(content = %String::from_utf8_lossy(content), "a snapshot request that does not parse, ignored");
            return Ok(());
        };
        let (Some(state), Some(path)) = (self.state.as_mut(), self.path.as_ref()) else {
            return Ok(());
        };
        let mut any = false;
        for oid in &request.tables {
            match state.tables.get_mut(oid) {
                Some(table) => {
                    info!(table = %table.name, request = %request.id, "a copy was requested");
                    table.due = Some(join(table.due.take(), request.reason()));
                    any = true;
                    if self.copy.as_ref().is_some_and(|c| c.oid == *oid)
                        || self.completing.iter().any(|(o, _, _)| o == oid)
                    {
                        self.again.insert(*oid);
                    }
                }
                None => {
                    warn!(oid, request = %request.id, "a copy was requested of a table that is not published, ignored")
                }
            }
        }
        self.backoff.clear();
        if any {
            state.save(path)?;
        }
        Ok(())
    }

    /// Notes in the state how far the copy under way is (after each chunk).
    pub fn progress(&mut self) -> Result<(), SourceError> {
        let (Some(copy), Some(state), Some(path)) =
            (self.copy.as_ref(), self.state.as_mut(), self.path.as_ref())
        else {
            return Ok(());
        };
        if let Some(table) = state.tables.get_mut(&copy.oid) {
            table.rows = Some(copy.rows_sent + copy.rows_dropped);
            state.save(path)?;
        }
        Ok(())
    }

    /// The table to copy next, if no copy is under way.
    pub fn next(&self) -> Option<(u32, String, String)> {
        if !self.enabled() || self.copy.is_some() {
            return None;
        }
        let state = self.state.as_ref()?;
        let busy: Vec<u32> = self.completing.iter().map(|(oid, _, _)| *oid).collect();
        state
            .tables
            .iter()
            .filter(|(oid, _)| !busy.contains(oid))
            .find(|(oid, t)| {
                t.due.is_some()
                    && self
                        .backoff
                        .get(oid)
                        .is_none_or(|until| Instant::now() >= *until)
            })
            .map(|(oid, t)| (*oid, t.name.clone(), t.due.clone().unwrap_or_default()))
    }
}

impl std::fmt::Debug for Copy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copy")
            .field("table", &self.name)
            .field("dispatched", &self.dispatched)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Column;

    fn shape(storage: &str, columns: &[(&str, u32, bool)]) -> Shape {
        Shape {
            storage: storage.into(),
            columns: columns
                .iter()
                .map(|(name, type_oid, has_missing)| ShapeColumn {
                    name: (*name).into(),
                    type_oid: *type_oid,
                    has_missing: *has_missing,
                })
                .collect(),
        }
    }

    #[test]
    fn a_copy_is_due_when_stored_values_changed_without_wal() {
        let before = shape("100", &[("id", 23, false), ("v", 23, false)]);
        let none = std::collections::HashSet::new();
        // A column without a default: existing rows are NULL, which is what the lake
        // says too.
        let added = shape(
            "100",
            &[("id", 23, false), ("v", 23, false), ("c", 25, false)],
        );
        assert_eq!(changed(&before, &added, false), None);
        let defaulted = shape(
            "100",
            &[("id", 23, false), ("v", 23, false), ("c", 25, true)],
        );
        assert!(
            changed(&before, &defaulted, false)
                .unwrap()
                .contains("`c` was added with a default")
        );
        // Once copied, the same shape asks for nothing.
        assert_eq!(changed(&defaulted, &defaulted, false), None);
        let retyped = shape("200", &[("id", 23, false), ("v", 1700, false)]);
        assert!(
            changed(&before, &retyped, false)
                .unwrap()
                .contains("`v` changed type")
        );
        // A rewrite to the same type (USING) shows only in the storage.
        let rewritten = shape("200", &[("id", 23, false), ("v", 23, false)]);
        assert!(
            changed(&before, &rewritten, false)
                .unwrap()
                .contains("rewritten")
        );
        // A truncate gives new storage, and the stream carries it.
        assert_eq!(changed(&before, &rewritten, true), None);
        let mut tables = Tables::baseline(BTreeMap::from([(
            1,
            ("public.t".to_owned(), before.clone()),
        )]));
        assert!(
            tables
                .update(
                    BTreeMap::from([(1, ("public.t".to_owned(), before.clone()))]),
                    &none
                )
                .is_empty()
        );
        assert_eq!(
            tables.update(
                BTreeMap::from([
                    (1, ("public.t".to_owned(), defaulted.clone())),
                    (2, ("public.new".to_owned(), before.clone()))
                ]),
                &none
            ),
            [1, 2]
        );
        assert_eq!(
            tables.tables[&2].due.as_deref(),
            Some("added to the publication")
        );
        assert!(tables.tables[&1].due.is_some());
        // A table no longer published is forgotten.
        assert!(
            tables
                .update(
                    BTreeMap::from([(2, ("public.new".to_owned(), before))]),
                    &none
                )
                .is_empty()
        );
        assert_eq!(tables.tables.keys().collect::<Vec<_>>(), [&2]);
    }

    #[test]
    fn the_state_file_is_private_and_round_trips() {
        let dir = crate::private_files::TestDir::new("incremental-state");
        let path = Tables::path(&dir, "7345", "lake");
        assert_eq!(Tables::load(&path).unwrap(), None);
        let mut tables = Tables::baseline(BTreeMap::from([(
            5,
            ("public.t".to_owned(), shape("1", &[("id", 23, false)])),
        )]));
        tables.tables.get_mut(&5).unwrap().due = Some("added to the publication".into());
        tables.tables.get_mut(&5).unwrap().rows = Some(10);
        tables.save(&path).unwrap();
        assert_eq!(Tables::load(&path).unwrap(), Some(tables));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, b"{").unwrap();
        let error = Tables::load(&path).unwrap_err().to_string();
        assert!(error.contains("does not parse"), "{error}");
    }

    fn relation(key_on_id: bool) -> Arc<Relation> {
        let column = |name: &str, key: bool| Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            key,
        };
        Arc::new(Relation {
            comment_classes: Default::default(),
            oid: 42,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![column("id", key_on_id), column("v", false)],
        })
    }

    fn change(relation: &Arc<Relation>, op: Op, id: i64, v: i64) -> Change {
        let image = vec![Value::Int(id), Value::Int(v)];
        let (new, old) = match op {
            Op::Delete => (None, Some(vec![Value::Int(id), Value::Null])),
            _ => (Some(image), None),
        };
        Change {
            identity: None,
            relation: relation.clone(),
            op,
            lsn: Lsn(1),
            new,
            old,
        }
    }

    fn txn(commit: u64, changes: Vec<Change>) -> Transaction {
        Transaction {
            meta: TxnMeta {
                xid: 1,
                commit_lsn: Lsn(commit),
                end_lsn: Lsn(commit + 1),
                commit_ts: 0,
                part: crate::change::Part::WHOLE,
                copied: None,
            },
            changes,
        }
    }

    fn copy_at(consistent_point: u64) -> (Copy, mpsc::Sender<CopyEvent>) {
        let (tx, events) = mpsc::channel(8);
        let mut copy = Copy::new(
            42,
            "public.t".into(),
            "test".into(),
            "n0".into(),
            events,
            tokio::spawn(async {}),
        );
        copy.consistent_point = Some(Lsn(consistent_point));
        (copy, tx)
    }

    #[tokio::test]
    async fn a_chunk_drops_the_rows_the_stream_changed_since_the_snapshot() {
        let relation = relation(true);
        let (mut copy, tx) = copy_at(100);
        // Before the consistent point: in the snapshot already, the row stays.
        copy.observe(&txn(90, vec![change(&relation, Op::Update, 1, 10)]));
        // At and after it: the stream has newer states (or the deletion).
        copy.observe(&txn(100, vec![change(&relation, Op::Update, 2, 20)]));
        copy.observe(&txn(110, vec![change(&relation, Op::Delete, 3, 0)]));
        // Another table's change with the same key is not this table's.
        let other = Arc::new(Relation {
            oid: 7,
            ..(*relation).clone()
        });
        copy.observe(&txn(120, vec![change(&other, Op::Update, 4, 0)]));
        let semaphore = Arc::new(Semaphore::new(2));
        let rows: Vec<Change> = (1..=4)
            .map(|id| change(&relation, Op::Read, id, 0))
            .collect();
        tx.send(CopyEvent::Chunk {
            n: 0,
            changes: rows,
            permit: semaphore.clone().acquire_owned().await.unwrap(),
        })
        .await
        .unwrap();
        // Not this copy's watermark.
        assert!(
            copy.chunk_at(b"other:0", &txn(130, vec![]).meta)
                .unwrap()
                .is_none()
        );
        let chunk = copy
            .chunk_at(b"n0:0", &txn(130, vec![]).meta)
            .unwrap()
            .unwrap();
        let ids: Vec<&Value> = chunk
            .changes
            .iter()
            .map(|c| &c.new.as_ref().unwrap()[0])
            .collect();
        assert_eq!(ids, [&Value::Int(1), &Value::Int(4)]);
        assert!(
            chunk
                .changes
                .iter()
                .all(|c| c.lsn == Lsn(130) && c.op == Op::Read)
        );
        assert_eq!(chunk.meta.end_lsn, Lsn(131));
        assert_eq!((copy.rows_sent, copy.rows_dropped), (2, 2));
        // The permit went with the chunk.
        assert_eq!(semaphore.available_permits(), 2);
        // A truncate after the snapshot: the stream holds the table's whole state.
        copy.observe(&txn(140, vec![change(&relation, Op::Truncate, 0, 0)]));
        tx.send(CopyEvent::Chunk {
            n: 1,
            changes: vec![change(&relation, Op::Read, 9, 0)],
            permit: semaphore.clone().acquire_owned().await.unwrap(),
        })
        .await
        .unwrap();
        assert!(
            copy.chunk_at(b"n0:1", &txn(150, vec![]).meta)
                .unwrap()
                .unwrap()
                .changes
                .is_empty()
        );
        tx.send(CopyEvent::Done { chunks: 2, rows: 5 })
            .await
            .unwrap();
        let event = copy.next_event().await.unwrap();
        copy.take(event).unwrap();
        assert!(copy.finished());
        // A watermark whose chunk never came (forged, or repeated) places nothing.
        assert!(
            copy.chunk_at(b"n0:7", &txn(160, vec![]).meta)
                .unwrap()
                .is_none()
        );
        assert!(
            copy.chunk_at(b"n0:1", &txn(170, vec![]).meta)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn keys_are_by_name_and_value() {
        let relation = relation(true);
        let a = key_of(&relation, &[Value::Int(1), Value::Int(5)]);
        assert_eq!(a, key_of(&relation, &[Value::Int(1), Value::Int(6)]));
        assert_ne!(a, key_of(&relation, &[Value::Int(2), Value::Int(5)]));
        assert_ne!(
            key_of(&relation, &[Value::Text("1".into()), Value::Null]),
            key_of(&relation, &[Value::Numeric("1".into()), Value::Null])
        );
        assert_eq!(
            key_of(
                &self::tests::relation(false),
                &[Value::Int(1), Value::Int(5)]
            ),
            None
        );
    }
}
