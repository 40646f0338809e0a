//! One Delta table and the rows waiting for it: opening it (and recovering what an
//! earlier run committed, from its application transaction), and the flush that
//! writes its files and commits them once.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, MetadataExt as _, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::{DeltaTable, DeltaTableError};

use super::arrow::{Segment, plan_schema, struct_type};
use super::error::LakeError;
use super::files::{same_shape, shape, split_segments, write_files};
use super::settings::{LakeSettings, table_handle};
use crate::change::Lsn;
use crate::pipeline::batch::{Batch, BatchRow};

/// Parquet files written for rows of a transaction whose last part had not arrived:
/// in the table's directory, but in no commit, so no reader sees them. They are
/// committed with the transaction's last rows.
pub(super) struct Staged {
    pub(super) commit_lsn: Lsn,
    pub(super) adds: Vec<deltalake::kernel::Add>,
    pub(super) rows: usize,
    /// The staged segments without their rows: relation versions and column tags for
    /// the schema plan, and pipeline lineage for the commit info.
    pub(super) shapes: Vec<Segment>,
}

/// One Delta table and the rows waiting for it.
pub(super) struct LakeTable {
    /// The original `schema.table` ([`naming::display_name`]); for a table known only
    /// from a listing of the root, the name in its Delta metadata, or its directory.
    pub(super) name: String,
    /// For a table named by a source relation, the unquoted `schema.table` older
    /// versions stored as its Delta name; `None` for a table known only from a listing.
    /// A table named by its relation never writes to a Delta table named otherwise.
    pub(super) legacy_name: Option<String>,
    /// Its directory under the root.
    pub(super) dir: String,
    pub(super) url: String,
    /// The loaded table; `None` until the first flush, and after a failed one.
    pub(super) delta: Option<DeltaTable>,
    /// The table's latest application-transaction version for our app id.
    pub(super) committed: Option<i64>,
    pub(super) pending: Vec<Segment>,
    pub(super) rows: usize,
    pub(super) bytes: usize,
    /// Files of large transactions, not committed yet.
    pub(super) staged: Vec<Staged>,
    /// Columns already warned about for `_special` values.
    pub(super) warned: BTreeSet<String>,
    /// Commits since the last checkpoint (counted from the writer's start).
    pub(super) commits_since_checkpoint: u64,
    pub(super) last_vacuum: Option<Instant>,
}

/// Where a test makes the flush stop, as if the process were killed there.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CrashPoint {
    /// The Parquet files are uploaded; the commit is not written.
    BeforeCommit,
    /// The commit is written; the flush does not return (no durable LSN, no slot ack).
    AfterCommit,
}

impl LakeTable {
    pub(super) fn new(
        name: String,
        legacy_name: Option<String>,
        dir: String,
        url: String,
    ) -> LakeTable {
        LakeTable {
            name,
            legacy_name,
            dir,
            url,
            delta: None,
            committed: None,
            pending: Vec::new(),
            rows: 0,
            bytes: 0,
            staged: Vec::new(),
            warned: BTreeSet::new(),
            commits_since_checkpoint: 0,
            last_vacuum: None,
        }
    }

    /// Loads the table (or notes that it does not exist yet) and its committed version.
    pub(super) async fn open(&mut self, settings: &LakeSettings) -> Result<(), LakeError> {
        let name = self.name.as_str();
        let mut table = table_handle(&self.url, name, settings)?;
        let exists = table
            .verify_deltatable_existence()
            .await
            .map_err(LakeError::delta(name, "checking for the table"))?;
        self.committed = None;
        if exists {
            table
                .load()
                .await
                .map_err(LakeError::delta(name, "loading the table"))?;
            let state = table
                .snapshot()
                .map_err(LakeError::delta(name, "loading the table"))?;
            self.committed = state
                .transaction_version(table.log_store().as_ref(), &settings.app_id)
                .await
                .map_err(LakeError::delta(
                    name,
                    "reading the application transaction",
                ))?;
            if self.legacy_name.is_none()
                && let Some(stored) = state.metadata().name()
            {
                self.name = stored.to_owned();
            }
        }
        self.delta = Some(table);
        Ok(())
    }

    /// Fails when the loaded Delta table names another source table than this one: two
    /// names the store does not tell apart (`A` and `a` on a case-insensitive
    /// filesystem) must not mix their rows. Tables without a name pass, and so does the
    /// unquoted `schema.table` older versions stored (a table moved from its old
    /// directory).
    pub(super) fn check_owner(&self) -> Result<(), LakeError> {
        let Some(legacy) = &self.legacy_name else {
            return Ok(());
        };
        let Some(stored) = self
            .delta
            .as_ref()
            .and_then(|t| t.snapshot().ok())
            .and_then(|s| s.metadata().name().map(str::to_owned))
        else {
            return Ok(());
        };
        if stored == self.name || stored == *legacy {
            return Ok(());
        }
        Err(LakeError::Occupied {
            table: self.name.clone(),
            dir: self.dir.clone(),
            holds: stored,
        })
    }

    /// Drops rows of transactions the table already holds; returns how many.
    pub(super) fn skip_committed(&mut self) -> usize {
        let Some(version) = self.committed else {
            return 0;
        };
        let done = |lsn: Lsn| lsn.0 as i64 <= version;
        let mut skipped = 0;
        self.staged.retain(|staged| {
            if done(staged.commit_lsn) {
                skipped += staged.rows;
            }
            !done(staged.commit_lsn)
        });
        self.pending.retain_mut(|segment| {
            let (first, last) = match (segment.batch.txns.first(), segment.batch.txns.last()) {
                (Some(first), Some(last)) => (first.commit_lsn, last.commit_lsn),
                _ => return true,
            };
            if !done(first) {
                return true;
            }
            if done(last) {
                skipped += segment.rows.len();
                return false;
            }
            let batch = segment.batch.clone();
            let before = segment.rows.len();
            segment
                .rows
                .retain(|&r| !done(batch.txns[batch.rows[r as usize].txn as usize].commit_lsn));
            skipped += before - segment.rows.len();
            !segment.rows.is_empty()
        });
        skipped
    }

    /// Commits every pending row of this table, except rows of `open` (a transaction
    /// whose last part has not arrived), which are written to staged files. On `Ok`
    /// the buffer is empty and the result is how many commits were written (schema
    /// changes and data).
    pub(super) async fn flush(
        &mut self,
        settings: &LakeSettings,
        open: Option<Lsn>,
        #[cfg(test)] crash: Option<CrashPoint>,
    ) -> Result<u64, LakeError> {
        if self.delta.is_none() {
            self.open(settings).await?;
        }
        self.check_owner()?;
        let skipped = self.skip_committed();
        if skipped > 0 {
            tracing::info!(
                sink = %settings.name,
                table = %self.name,
                skipped,
                through = %Lsn(self.committed.unwrap_or_default() as u64),
                "skipping rows the lake already holds"
            );
        }
        if !self.has_work(open) {
            self.clear();
            return Ok(0);
        }
        let mut commits = 0;
        let name = self.name.clone();
        let name = name.as_str();
        let mut table = self.delta.take().expect("opened above");

        // The schema: create the table, or add the columns it lacks. Staged rows count:
        // their column tags are committed with them.
        let shapes: Vec<&Segment> = self
            .pending
            .iter()
            .chain(self.staged.iter().flat_map(|s| s.shapes.iter()))
            .collect();
        let existing = table.snapshot().ok().map(|s| s.schema());
        let mut plan =
            plan_schema(existing.as_deref(), &shapes).map_err(LakeError::convert(name))?;
        if existing.is_none() {
            table = table
                .create()
                .with_columns(plan.fields.clone())
                .with_table_name(name)
                .with_save_mode(SaveMode::Ignore)
                .with_commit_properties(
                    CommitProperties::default().with_metadata(self.static_info(settings)),
                )
                .await
                .map_err(LakeError::delta(name, "creating the table"))?;
            commits += 1;
            tracing::info!(sink = %settings.name, table = %name, url = %self.url, "created lake table");
            let schema = table
                .snapshot()
                .map_err(LakeError::delta(name, "creating the table"))?
                .schema();
            plan = plan_schema(Some(schema.as_ref()), &shapes).map_err(LakeError::convert(name))?;
        }
        if !plan.added.is_empty() {
            let added: Vec<String> = plan.added.iter().map(|f| f.name().clone()).collect();
            table = table
                .add_columns()
                .with_fields(plan.added.clone())
                .with_commit_properties(
                    CommitProperties::default().with_metadata(self.static_info(settings)),
                )
                .await
                .map_err(LakeError::delta(name, "adding columns"))?;
            commits += 1;
            tracing::info!(sink = %settings.name, table = %name, columns = ?added, "added lake columns");
            let schema = table
                .snapshot()
                .map_err(LakeError::delta(name, "adding columns"))?
                .schema();
            plan = plan_schema(Some(schema.as_ref()), &shapes).map_err(LakeError::convert(name))?;
        }

        // Rows of the open transaction: staged, not committed. (On an error the
        // caller drops the loaded table, so the next attempt reloads it.)
        if let Some(open) = open {
            let (staged, rest) = split_segments(&self.pending, open);
            if !staged.is_empty() {
                let (adds, rows) =
                    write_files(settings, name, &mut self.warned, &table, &staged).await?;
                tracing::debug!(
                    sink = %settings.name,
                    table = %name,
                    rows,
                    files = adds.len(),
                    commit_lsn = %open,
                    "staged rows of a large transaction until its commit"
                );
                let mut shapes: Vec<Segment> = Vec::new();
                for segment in &staged {
                    if !shapes.iter().any(|s| same_shape(s, segment)) {
                        shapes.push(shape(segment));
                    }
                }
                self.staged.push(Staged {
                    commit_lsn: open,
                    adds,
                    rows,
                    shapes,
                });
                self.pending = rest;
                self.recount();
            }
        }
        let completed: Vec<&Staged> = self
            .staged
            .iter()
            .filter(|s| Some(s.commit_lsn) != open)
            .collect();
        if self.pending.is_empty() && completed.is_empty() {
            self.delta = Some(table);
            return Ok(commits);
        }

        let mut actions = Vec::new();
        if plan.tags_grew {
            let schema = struct_type(plan.fields).map_err(LakeError::convert(name))?;
            let metadata = table
                .snapshot()
                .map_err(LakeError::delta(name, "updating column tags"))?
                .metadata()
                .clone()
                .with_schema(&schema)
                .map_err(DeltaTableError::from)
                .map_err(LakeError::delta(name, "updating column tags"))?;
            actions.push(Action::Metadata(metadata));
        }

        // The files: the pending rows', and those staged for transactions now complete.
        let (adds, rows) = if self.pending.is_empty() {
            (Vec::new(), 0)
        } else {
            write_files(settings, name, &mut self.warned, &table, &self.pending).await?
        };
        let staged_rows: usize = completed.iter().map(|s| s.rows).sum();
        actions.extend(adds.into_iter().map(Action::Add));
        actions.extend(
            completed
                .iter()
                .flat_map(|s| s.adds.iter().cloned())
                .map(Action::Add),
        );
        #[cfg(test)]
        if crash == Some(CrashPoint::BeforeCommit) {
            return Err(LakeError::Crash(
                "after the Parquet upload, before the commit",
            ));
        }

        // The commit.
        let (first, last) = self.commit_lsn_range(open);
        let rows = rows + staged_rows;
        let mut info = self.static_info(settings);
        info.insert(
            "airlock.lsn_range".into(),
            serde_json::json!([first.to_string(), last.to_string()]),
        );
        let (pipeline, stages) = self.lineage(open);
        info.insert("airlock.pipeline".into(), pipeline);
        info.insert("airlock.stages".into(), stages);
        info.insert("airlock.rows".into(), rows.into());
        let copied = self.copied();
        if !copied.is_empty() {
            info.insert("airlock.copied".into(), copied.into());
        }
        let version = last.0 as i64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let properties = CommitProperties::default()
            .with_application_transaction(Transaction::new_with_last_update(
                &settings.app_id,
                version,
                Some(now),
            ))
            .with_metadata(info);
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        let state = table
            .snapshot()
            .map_err(LakeError::delta(name, "committing"))?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(state), table.log_store(), operation)
            .await
            .map_err(LakeError::delta(name, "committing"))?;
        tracing::debug!(
            sink = %settings.name,
            table = %name,
            version = finalized.version(),
            rows,
            first = %first,
            last = %last,
            "committed to the lake"
        );
        table.state = Some(finalized.snapshot());
        self.delta = Some(table);
        self.committed = Some(version);
        #[cfg(test)]
        if crash == Some(CrashPoint::AfterCommit) {
            return Err(LakeError::Crash(
                "after the commit, before the flush returned",
            ));
        }
        self.staged.retain(|s| Some(s.commit_lsn) == open);
        self.clear();
        Ok(commits + 1)
    }

    /// Whether a flush has anything to do: rows pending, or staged files of a
    /// transaction that is no longer `open` (its last part arrived).
    pub(super) fn has_work(&self, open: Option<Lsn>) -> bool {
        !self.pending.is_empty() || self.staged.iter().any(|s| Some(s.commit_lsn) != open)
    }

    pub(super) fn clear(&mut self) {
        self.pending.clear();
        self.rows = 0;
        self.bytes = 0;
    }

    /// Recounts the pending rows and bytes.
    pub(super) fn recount(&mut self) {
        self.rows = self.pending.iter().map(|s| s.rows.len()).sum();
        self.bytes = self
            .pending
            .iter()
            .flat_map(|s| s.rows.iter().map(|&r| row_bytes(s.row(r))))
            .sum();
    }

    /// Smallest and largest commit LSN of what the next commit holds: the pending rows'
    /// transactions and the staged ones not `open`.
    pub(super) fn commit_lsn_range(&self, open: Option<Lsn>) -> (Lsn, Lsn) {
        let mut range: Option<(Lsn, Lsn)> = None;
        let mut widen = |lsn: Lsn| {
            range = Some(range.map_or((lsn, lsn), |(lo, hi)| (lo.min(lsn), hi.max(lsn))));
        };
        for segment in &self.pending {
            for &r in &segment.rows {
                widen(segment.txn(segment.row(r)).commit_lsn);
            }
        }
        for staged in &self.staged {
            if Some(staged.commit_lsn) != open {
                widen(staged.commit_lsn);
            }
        }
        range.unwrap_or_default()
    }

    /// Why the copied rows of the next commit were copied (see
    /// [`TxnMeta::copied`]), each reason once.
    pub(super) fn copied(&self) -> Vec<String> {
        let mut reasons: Vec<String> = Vec::new();
        for segment in &self.pending {
            // Rows of one transaction are consecutive: look at each transaction once.
            let mut last = None;
            for &r in &segment.rows {
                let txn = segment.row(r).txn;
                if last.replace(txn) == Some(txn) {
                    continue;
                }
                if let Some(copied) = &segment.batch.txns[txn as usize].copied
                    && !reasons.iter().any(|known| **known == **copied)
                {
                    reasons.push(copied.to_string());
                }
            }
        }
        reasons
    }

    /// The lineage of what the next commit holds: the pipeline version (a string, or
    /// an array when a reload happened between rows) and the stages of each version
    /// with their content hashes.
    pub(super) fn lineage(&self, open: Option<Lsn>) -> (serde_json::Value, serde_json::Value) {
        let mut seen: Vec<&Batch> = Vec::new();
        let staged = self
            .staged
            .iter()
            .filter(|s| Some(s.commit_lsn) != open)
            .flat_map(|s| s.shapes.iter());
        for segment in staged.chain(&self.pending) {
            if !seen.iter().any(|b| b.pipeline == segment.batch.pipeline) {
                seen.push(&segment.batch);
            }
        }
        let pipeline = match seen.as_slice() {
            [one] => (*one.pipeline).into(),
            many => many
                .iter()
                .map(|b| serde_json::Value::from(&*b.pipeline))
                .collect(),
        };
        let stages: serde_json::Map<String, serde_json::Value> = seen
            .iter()
            .map(|b| {
                let stages = serde_json::to_value(&*b.stages).unwrap_or_default();
                (b.pipeline.to_string(), stages)
            })
            .collect();
        (pipeline, serde_json::Value::Object(stages))
    }

    pub(super) fn static_info(
        &self,
        settings: &LakeSettings,
    ) -> HashMap<String, serde_json::Value> {
        let mut info: HashMap<String, serde_json::Value> = settings
            .commit_info
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        info.insert("airlock.sink".into(), settings.name.clone().into());
        info.insert("airlock.table".into(), self.name.clone().into());
        info
    }
}

/// About how many bytes a kept row holds in memory, for `max_bytes`: the row, its
/// change and what the guests gave it.
pub(super) fn row_bytes(row: &BatchRow) -> usize {
    use crate::change::ALLOCATION_OVERHEAD;
    let text = |s: &String| std::mem::size_of::<String>() + s.capacity() + ALLOCATION_OVERHEAD;
    std::mem::size_of::<BatchRow>() - std::mem::size_of::<crate::change::Change>()
        + row.change.approx_bytes()
        + row.routes.iter().map(text).sum::<usize>()
        + row.tags.iter().map(text).sum::<usize>()
        + row
            .annotations
            .iter()
            .map(|(k, v)| text(k) + text(v))
            .sum::<usize>()
}
