//! The single writer of one lake sink: it takes batches into each table's buffer,
//! flushes every table with rows, says through which LSN the lake holds changes, and
//! runs compactions between flushes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::arrow::Segment;
use super::catalog;
use super::maintain::{CompactLock, CompactReport, Trigger};
use super::naming;
use super::settings::{LakeSettings, table_url};
#[cfg(test)]
use super::table::CrashPoint;
use super::table::LakeTable;
use super::table::row_bytes;
use crate::change::Lsn;
use crate::pipeline::batch::Batch;
use crate::sink::SinkError;

/// The single writer of one lake sink: every flush and every compaction runs on it,
/// one at a time (it lives behind the sink's mutex).
pub(super) struct Writer {
    pub(super) settings: LakeSettings,
    /// Tables by directory ([`naming::table_dir`]), flushed in that order. Not by
    /// `schema.table`: (`a.b`, `c`) and (`a`, `b.c`) are two tables.
    pub(super) tables: BTreeMap<String, LakeTable>,
    pub(super) rows: usize,
    pub(super) bytes: usize,
    /// End LSN of the last accepted batch not yet covered by a successful flush.
    pub(super) accepted_end: Option<Lsn>,
    /// Commit LSN of the transaction whose parts are arriving, before its last part.
    pub(super) open: Option<Lsn>,
    pub(super) lock: CompactLock,
    #[cfg(test)]
    pub(super) crash: Option<CrashPoint>,
}

impl Writer {
    /// The table in directory `dir`, added when new. `source` names the relation it is
    /// for: its display name and its unquoted `schema.table`; `None` for a directory
    /// found by listing the root.
    pub(super) fn table(&mut self, dir: &str, source: Option<(String, String)>) -> &mut LakeTable {
        if !self.tables.contains_key(dir) {
            let url = table_url(&self.settings.url, dir);
            let name = dir.to_owned();
            self.tables.insert(
                dir.to_owned(),
                LakeTable::new(name, None, dir.to_owned(), url),
            );
        }
        let table = self.tables.get_mut(dir).expect("inserted above");
        if let Some((name, legacy)) = source
            && table.legacy_name.is_none()
        {
            table.name = name;
            table.legacy_name = Some(legacy);
        }
        table
    }

    pub(super) fn accept(&mut self, batch: Arc<Batch>) -> bool {
        if let Some(end) = batch.end_lsn() {
            self.accepted_end = Some(self.accepted_end.map_or(end, |e| e.max(end)));
        }
        self.open = batch
            .txns
            .last()
            .filter(|t| !t.completes())
            .map(|t| t.commit_lsn);
        let mut kept = false;
        for (t, table) in batch.tables.iter().enumerate() {
            let mut bytes = 0;
            let rows: Vec<u32> = table
                .rows
                .iter()
                .copied()
                .filter(|&r| {
                    let row = &batch.rows[r as usize];
                    let keep = !row.dropped && row.has_route_in(&self.settings.routes);
                    if keep {
                        bytes += row_bytes(row);
                    }
                    keep
                })
                .collect();
            if rows.is_empty() {
                continue;
            }
            kept = true;
            let relation = &table.relation;
            let dir = naming::table_dir(&relation.schema, &relation.name);
            self.rows += rows.len();
            self.bytes += bytes;
            let named = self
                .tables
                .get(&dir)
                .is_some_and(|t| t.legacy_name.is_some());
            let source = (!named).then(|| {
                let name = naming::display_name(&relation.schema, &relation.name);
                (name, relation.qualified_name())
            });
            let entry = self.table(&dir, source);
            entry.rows += rows.len();
            entry.bytes += bytes;
            entry.pending.push(Segment {
                batch: batch.clone(),
                table: t as u32,
                rows,
            });
        }
        kept
    }

    pub(super) fn due(&self) -> bool {
        self.rows >= self.settings.max_rows || self.bytes >= self.settings.max_bytes
    }

    /// Whether some table holds staged files of a transaction not committed yet.
    pub(super) fn holds_open(&self) -> bool {
        self.tables.values().any(|t| !t.staged.is_empty())
    }

    pub(super) async fn flush(&mut self) -> Result<Option<Lsn>, SinkError> {
        let settings = &self.settings;
        let open = self.open;
        let mut committed = Vec::new();
        let mut failed = None;
        for table in self.tables.values_mut() {
            if !table.has_work(open) {
                continue;
            }
            let result = table
                .flush(
                    settings,
                    open,
                    #[cfg(test)]
                    self.crash,
                )
                .await;
            match result {
                Ok(commits) => committed.push((table.dir.clone(), commits)),
                Err(error) => {
                    // The commit may have landed anyway: reload before the next attempt.
                    table.delta = None;
                    failed = Some(error.into_sink_error(&settings.name));
                    break;
                }
            }
        }
        self.rows = self.tables.values().map(|t| t.rows).sum();
        self.bytes = self.tables.values().map(|t| t.bytes).sum();
        if let Some(error) = failed {
            return Err(error);
        }
        // The data is durable; maintenance never fails the flush.
        for (dir, commits) in committed {
            if commits > 0
                && let Some(table) = self.tables.get_mut(&dir)
            {
                table.after_commit(settings, &self.lock, commits).await;
            }
        }
        Ok(self.accepted_end.take())
    }

    /// The table holding the latest commit this sink made for its application id
    /// (in any earlier run), and that commit's LSN; `None` for a lake without one.
    pub(super) async fn held_through(&mut self) -> Result<Option<(String, Lsn)>, SinkError> {
        let sink = self.settings.name.clone();
        let dirs = catalog::list_tables(&self.settings)
            .await
            .map_err(|e| e.into_sink_error(&sink))?;
        let mut held: Option<(String, Lsn)> = None;
        for dir in dirs {
            self.table(&dir, None);
            let table = self.tables.get_mut(&dir).expect("inserted above");
            if table.delta.is_none() {
                table
                    .open(&self.settings)
                    .await
                    .map_err(|e| e.into_sink_error(&sink))?;
            }
            if let Some(version) = table.committed {
                let lsn = Lsn(version as u64);
                if held.as_ref().is_none_or(|(_, through)| lsn > *through) {
                    held = Some((table.name.clone(), lsn));
                }
            }
        }
        Ok(held)
    }

    /// Compacts every table of the sink, those on storage included, now.
    pub(super) async fn compact_all(&mut self) -> Result<Vec<CompactReport>, SinkError> {
        let sink = self.settings.name.clone();
        let dirs = catalog::list_tables(&self.settings)
            .await
            .map_err(|e| e.into_sink_error(&sink))?;
        for dir in &dirs {
            self.table(dir, None);
        }
        let mut reports = Vec::new();
        for table in self.tables.values_mut() {
            let report = table
                .compact(&self.settings, &self.lock, Trigger::Requested)
                .await;
            let report = match report {
                Ok(report) => report,
                Err(error) => {
                    table.delta = None;
                    return Err(error.into_sink_error(&sink));
                }
            };
            table
                .checkpoint_if_due(&self.settings)
                .await
                .map_err(|e| e.into_sink_error(&sink))?;
            if let Err(error) = table.vacuum(&self.settings).await {
                table.delta = None;
                return Err(error.into_sink_error(&sink));
            }
            table.last_vacuum = Some(Instant::now());
            reports.push(report);
        }
        Ok(reports)
    }
}
