//! Table maintenance inside the single writer: compaction, checkpoints, vacuum.
//!
//! ```text
//! data commit ──▶ after_commit(table)
//!                   ├─ small files > compact_min_files ─▶ lock ─▶ per bin (≤ target size):
//!                   │      read Parquet ─▶ one new file ─▶ commit Remove*(dataChange=false)
//!                   │                                      + Add(dataChange=false), no retry
//!                   ├─ commits since checkpoint ≥ checkpoint_interval ─▶ checkpoint
//!                   └─ an hour since the last vacuum ─▶ vacuum files removed > retention ago
//! ```
//!
//! Invariants:
//! - Only the writer compacts, and only while it holds the sink's writer mutex, so a
//!   compaction never runs concurrently with a flush or with another compaction of the
//!   same process. Across processes (`airlock compact` with no host running, a host
//!   started meanwhile) the lock object `{sink url}/_airlock/compact.lock`, created with
//!   put-if-absent, admits one compactor at a time.
//! - Delta's conflict checker ignores `dataChange = false` removes: two compactions of the
//!   same files both commit and duplicate rows. Hence the lock, and compaction commits
//!   are built with `max_retries = 0`: a commit that raced (or whose response was lost and
//!   actually landed) fails, the table is reloaded and the files are planned again from
//!   what is really there.
//! - A compaction commit is written only when the rows read equal the rows in the removed
//!   files' statistics and the rows written; otherwise nothing is committed.
//! - Maintenance never fails a flush: the data is already durable; errors are logged and
//!   the next commit tries again. Explicit requests ([`super::LakeHandle::compact`])
//!   return their errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::arrow::array::{RecordBatch, RecordBatchOptions, new_null_array};
use ::arrow::datatypes::SchemaRef;
use deltalake::DeltaTableBuilder;
use deltalake::kernel::Action;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::operations::vacuum::VacuumMode;
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use super::error::LakeError;
use super::settings::{LakeSettings, Maintenance};
use super::table::LakeTable;
use crate::progress::{Progress, Unit};

/// What one table's compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactReport {
    pub sink: String,
    pub table: String,
    /// Commits written (one per bin).
    pub commits: usize,
    pub files_removed: usize,
    pub files_added: usize,
    pub rows: u64,
    /// Bytes of the files removed.
    pub bytes_removed: u64,
    /// The table version after the compaction.
    pub version: Option<u64>,
}

/// Why a compaction was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Trigger {
    /// After a data commit: only past `compact_min_files`; a held lock skips quietly.
    Automatic,
    /// `airlock compact` or `POST /compact`: any two or more small files; a held lock
    /// is an error.
    Requested,
}

/// The compaction lock of one sink root: `_airlock/compact.lock`, put-if-absent.
pub(super) struct CompactLock {
    store: Arc<dyn ObjectStore>,
    path: Path,
}

#[derive(Serialize, serde::Deserialize)]
struct LockBody {
    owner: String,
    pid: u32,
    since_ms: i64,
    /// Which machine and boot the holder runs on, and when its process started: with
    /// them a lock left by a dead process on this machine is recognised at once.
    /// Absent in locks written before they were recorded.
    #[serde(default)]
    holder: Option<Holder>,
}

/// A process on one machine, in one boot, in one pid namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
struct Holder {
    /// `/proc/sys/kernel/random/boot_id`: changes at every boot.
    boot_id: String,
    /// The pid namespace (`/proc/self/ns/pid`): a pid means the same process only
    /// inside one (containers on one kernel share the boot id, not the namespace).
    pid_namespace: String,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`, field
    /// 22): a pid reused by another process has another.
    start_ticks: u64,
}

/// This machine's boot and this process's pid namespace (Linux only).
fn here() -> Option<(String, String)> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some((
        boot_id.trim().to_owned(),
        namespace.to_string_lossy().into_owned(),
    ))
}

impl Holder {
    /// The process `pid` of this pid namespace, if it is running (Linux only).
    fn of(pid: u32) -> Option<Holder> {
        let (boot_id, pid_namespace) = here()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count from the
        // last `)`. The start time is field 22, the 20th after it.
        let after_name = &stat[stat.rfind(')')? + 1..];
        let start_ticks = after_name.split_whitespace().nth(19)?.parse().ok()?;
        Some(Holder {
            boot_id,
            pid_namespace,
            start_ticks,
        })
    }
}

impl LockBody {
    /// Whether the lock was certainly left by a process that is gone: it was taken in
    /// this boot and pid namespace, and its pid now runs another process or none.
    /// Anything else (another machine, another container, an older lock) cannot be
    /// told, and waits for [`Maintenance::LOCK_STALE_AFTER`].
    fn holder_is_gone(&self) -> bool {
        let Some(recorded) = &self.holder else {
            return false;
        };
        let same_place = here().is_some_and(|(boot, namespace)| {
            boot == recorded.boot_id && namespace == recorded.pid_namespace
        });
        same_place && Holder::of(self.pid).is_none_or(|now| now != *recorded)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl CompactLock {
    /// The lock location for the sink rooted at `settings.url`.
    pub(super) fn for_sink(settings: &LakeSettings) -> Result<CompactLock, LakeError> {
        let url = deltalake::ensure_table_uri(settings.url.trim_end_matches('/')).map_err(
            LakeError::delta("(sink root)", "resolving the lake location"),
        )?;
        let store = DeltaTableBuilder::from_url(url)
            .and_then(|b| {
                b.with_storage_options(settings.store_options())
                    .build_storage()
            })
            .map_err(LakeError::delta("(sink root)", "opening the lake location"))?
            .object_store(None);
        Ok(CompactLock {
            store,
            path: Path::from("_airlock/compact.lock"),
        })
    }

    /// Takes the lock; `Ok(false)` when another compactor holds it.
    pub(super) async fn acquire(&self, owner: &str) -> Result<bool, LakeError> {
        for _ in 0..2 {
            let body = serde_json::to_vec(&LockBody {
                owner: owner.to_owned(),
                pid: std::process::id(),
                since_ms: now_ms(),
                holder: Holder::of(std::process::id()),
            })
            .unwrap_or_default();
            let options = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&self.path, PutPayload::from(body), options)
                .await
            {
                Ok(_) => return Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(LakeError::lock(e)),
            }
            // Held: take it over only when its holder is long gone.
            let held = match self.store.get(&self.path).await {
                Ok(got) => got.bytes().await.map_err(LakeError::lock)?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(LakeError::lock(e)),
            };
            let body = serde_json::from_slice::<LockBody>(&held).ok();
            let since = body.as_ref().map_or(0, |b| b.since_ms);
            let age = Duration::from_millis((now_ms() - since).max(0) as u64);
            let gone = body.as_ref().is_some_and(LockBody::holder_is_gone);
            if !gone && age < Maintenance::LOCK_STALE_AFTER {
                return Ok(false);
            }
            tracing::warn!(
                lock = %self.path,
                age = ?age,
                holder_gone = gone,
                "taking over a stale compaction lock"
            );
            self.release().await?;
        }
        Ok(false)
    }

    pub(super) async fn release(&self) -> Result<(), LakeError> {
        match self.store.delete(&self.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(LakeError::lock(e)),
        }
    }

    /// Who holds the lock, for error messages.
    pub(super) async fn holder(&self) -> String {
        match self.store.get(&self.path).await {
            Ok(got) => match got.bytes().await {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads `batch` as `schema`: missing columns (added to the table later) become nulls.
fn conform(
    batch: &RecordBatch,
    schema: &SchemaRef,
) -> Result<RecordBatch, ::arrow::error::ArrowError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) if column.data_type() == field.data_type() => Ok(column.clone()),
            Some(column) => ::arrow::compute::cast(column, field.data_type()),
            None => Ok(new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
}

/// One small file picked for compaction.
struct Small {
    path: Path,
    size: u64,
    rows: Option<usize>,
    remove: deltalake::kernel::Remove,
}

impl LakeTable {
    /// Runs whatever maintenance is due after `commits` new commits of this table.
    pub(super) async fn after_commit(
        &mut self,
        settings: &LakeSettings,
        lock: &CompactLock,
        commits: u64,
    ) {
        self.commits_since_checkpoint += commits;
        match self.compact(settings, lock, Trigger::Automatic).await {
            Ok(report) if report.commits > 0 => tracing::info!(
                sink = %settings.name, table = %self.name, files_removed = report.files_removed,
                files_added = report.files_added, rows = report.rows, "compacted small files"
            ),
            Ok(_) => {}
            Err(error) => {
                self.delta = None;
                tracing::warn!(sink = %settings.name, table = %self.name, error = %error, "compaction failed, will try again after the next commit");
            }
        }
        if let Err(error) = self.checkpoint_if_due(settings).await {
            tracing::warn!(sink = %settings.name, table = %self.name, error = %error, "checkpoint failed, will try again after the next commit");
        }
        if self
            .last_vacuum
            .is_none_or(|at| at.elapsed() >= Maintenance::VACUUM_EVERY)
        {
            if let Err(error) = self.vacuum(settings).await {
                self.delta = None;
                tracing::warn!(sink = %settings.name, table = %self.name, error = %error, "vacuum failed, will try again in an hour");
            }
            self.last_vacuum = Some(Instant::now());
        }
    }

    /// Writes a checkpoint when `checkpoint_interval` commits have passed since the last.
    pub(super) async fn checkpoint_if_due(
        &mut self,
        settings: &LakeSettings,
    ) -> Result<(), LakeError> {
        if self.commits_since_checkpoint < settings.maintenance.checkpoint_interval {
            return Ok(());
        }
        let Some(table) = &self.delta else {
            return Ok(());
        };
        deltalake::checkpoints::create_checkpoint(table, None)
            .await
            .map_err(LakeError::delta(&self.name, "writing a checkpoint"))?;
        tracing::debug!(sink = %settings.name, table = %self.name, version = ?table.version(), "wrote a checkpoint");
        self.commits_since_checkpoint = 0;
        Ok(())
    }

    /// Deletes files removed more than `vacuum_retention` ago, and files no commit ever
    /// referenced (a Parquet upload whose commit never happened) older than that.
    pub(super) async fn vacuum(&mut self, settings: &LakeSettings) -> Result<(), LakeError> {
        let Some(table) = self.delta.take() else {
            return Ok(());
        };
        if table.version().is_none() {
            self.delta = Some(table);
            return Ok(());
        }
        let (table, metrics) = table
            .vacuum()
            .with_retention_period(
                chrono::Duration::from_std(settings.maintenance.vacuum_retention)
                    .unwrap_or(chrono::Duration::days(7)),
            )
            .with_enforce_retention_duration(false)
            .with_mode(VacuumMode::Full)
            .with_commit_properties(CommitProperties::default().with_create_checkpoint(false))
            .await
            .map_err(LakeError::delta(&self.name, "vacuuming"))?;
        if !metrics.files_deleted.is_empty() {
            tracing::info!(sink = %settings.name, table = %self.name, files = metrics.files_deleted.len(), "vacuumed files past retention");
        }
        self.delta = Some(table);
        Ok(())
    }

    /// Merges small files into files of about the target size, one commit per bin,
    /// showing its progress (a bar on a terminal, else `compaction progress` lines).
    pub(super) async fn compact(
        &mut self,
        settings: &LakeSettings,
        lock: &CompactLock,
        trigger: Trigger,
    ) -> Result<CompactReport, LakeError> {
        let mut report = CompactReport {
            sink: settings.name.clone(),
            table: self.name.clone(),
            ..Default::default()
        };
        if self.delta.is_none() {
            self.open(settings).await?;
        }
        let threshold = match trigger {
            Trigger::Automatic => settings.maintenance.compact_min_files,
            Trigger::Requested => 1,
        };
        if self.small_files(settings)?.len() <= threshold {
            report.version = self.delta.as_ref().and_then(|t| t.version());
            return Ok(report);
        }
        if !lock.acquire(&format!("sink {}", settings.name)).await? {
            return match trigger {
                Trigger::Automatic => {
                    let holder = lock.holder().await;
                    tracing::info!(sink = %settings.name, table = %self.name, holder = %holder, "compaction lock held elsewhere, skipping");
                    Ok(report)
                }
                Trigger::Requested => Err(LakeError::Locked {
                    path: lock.path().to_string(),
                    holder: lock.holder().await,
                }),
            };
        }
        let result = self.compact_locked(settings, &mut report).await;
        let released = lock.release().await;
        result?;
        released?;
        report.version = self.delta.as_ref().and_then(|t| t.version());
        Ok(report)
    }

    fn small_files(&self, settings: &LakeSettings) -> Result<Vec<Small>, LakeError> {
        let Some(table) = &self.delta else {
            return Ok(Vec::new());
        };
        let Ok(state) = table.snapshot() else {
            return Ok(Vec::new()); // not created yet
        };
        let mut small: Vec<(i64, Small)> = state
            .log_data()
            .iter()
            .filter(|f| (f.size() as u64) < settings.maintenance.small_file_bytes)
            .map(|f| {
                (
                    f.modification_time(),
                    Small {
                        path: f.object_store_path(),
                        size: f.size() as u64,
                        rows: f.num_records(),
                        remove: f.remove_action(false),
                    },
                )
            })
            .collect();
        small.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.path.cmp(&b.1.path)));
        Ok(small.into_iter().map(|(_, s)| s).collect())
    }

    async fn compact_locked(
        &mut self,
        settings: &LakeSettings,
        report: &mut CompactReport,
    ) -> Result<(), LakeError> {
        // Plan from what is really there: another compactor may have run before the lock.
        self.open(settings).await?;
        let small = self.small_files(settings)?;
        let target = settings.maintenance.target_file_bytes;
        let mut bins: Vec<Vec<Small>> = Vec::new();
        let mut size = 0;
        for file in small {
            if bins.is_empty() || size + file.size > target {
                bins.push(Vec::new());
                size = 0;
            }
            size += file.size;
            bins.last_mut().expect("pushed above").push(file);
        }
        bins.retain(|b| b.len() > 1);
        let mut progress = CompactProgress {
            progress: Progress::start(
                &format!("compacting {}", self.name),
                Unit::Bytes,
                bins.iter().flatten().map(|f| f.size).sum(),
            ),
            files: bins.iter().map(Vec::len).sum(),
            files_done: 0,
        };
        progress.log(settings, &self.name, true);
        for bin in bins {
            self.compact_bin(settings, bin, report, &mut progress)
                .await?;
        }
        progress.log(settings, &self.name, true);
        progress.progress.finish();
        Ok(())
    }

    async fn compact_bin(
        &mut self,
        settings: &LakeSettings,
        bin: Vec<Small>,
        report: &mut CompactReport,
        progress: &mut CompactProgress,
    ) -> Result<(), LakeError> {
        let name = self.name.clone();
        let name = name.as_str();
        let table = self.delta.take().expect("opened by compact_locked");
        let store = table.object_store();
        let mut writer = RecordBatchWriter::for_table(&table)
            .map_err(LakeError::delta(name, "preparing the compaction writer"))?;
        let schema = writer.arrow_schema();
        let mut rows_read = 0u64;
        let mut rows_expected = Some(0u64);
        for file in &bin {
            let bytes = store
                .get(&file.path)
                .await
                .map_err(|e| LakeError::delta(name, "reading a file to compact")(e.into()))?
                .bytes()
                .await
                .map_err(|e| LakeError::delta(name, "reading a file to compact")(e.into()))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.build())
                .map_err(|e| LakeError::delta(name, "reading a file to compact")(e.into()))?;
            for batch in reader {
                let batch = batch
                    .map_err(|e| LakeError::delta(name, "reading a file to compact")(e.into()))?;
                let batch = conform(&batch, &schema)
                    .map_err(|e| LakeError::delta(name, "reading a file to compact")(e.into()))?;
                rows_read += batch.num_rows() as u64;
                writer
                    .write(batch)
                    .await
                    .map_err(LakeError::delta(name, "writing the compacted file"))?;
            }
            rows_expected = rows_expected.zip(file.rows).map(|(a, b)| a + b as u64);
            progress.files_done += 1;
            progress.progress.add(file.size);
            progress.log(settings, name, false);
        }
        let mut adds = writer
            .flush()
            .await
            .map_err(LakeError::delta(name, "writing the compacted file"))?;
        let rows_written: u64 = adds
            .iter()
            .map(|a| {
                a.get_stats()
                    .ok()
                    .flatten()
                    .map_or(0, |s| s.num_records as u64)
            })
            .sum();
        if rows_expected.is_some_and(|n| n != rows_read) || rows_written != rows_read {
            self.delta = Some(table);
            return Err(LakeError::Compaction {
                table: name.to_owned(),
                message: format!(
                    "read {rows_read} rows, statistics say {rows_expected:?}, wrote {rows_written}: nothing committed"
                ),
            });
        }
        for add in &mut adds {
            add.data_change = false;
        }
        let (files_removed, files_added) = (bin.len(), adds.len());
        let bytes_removed: u64 = bin.iter().map(|f| f.size).sum();
        let mut actions: Vec<Action> = bin.into_iter().map(|f| Action::Remove(f.remove)).collect();
        actions.extend(adds.into_iter().map(Action::Add));
        let mut info = self.static_info(settings);
        info.insert("airlock.operation".into(), "compact".into());
        info.insert("airlock.rows".into(), rows_read.into());
        let properties = CommitProperties::default()
            .with_metadata(info)
            .with_max_retries(0)
            .with_create_checkpoint(false);
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: settings.maintenance.target_file_bytes as i64,
        };
        let state = table
            .snapshot()
            .map_err(LakeError::delta(name, "committing the compaction"))?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(state), table.log_store(), operation)
            .await
            .map_err(LakeError::delta(name, "committing the compaction"))?;
        let mut table = table;
        table.state = Some(finalized.snapshot());
        self.delta = Some(table);
        self.commits_since_checkpoint += 1;
        report.commits += 1;
        report.files_removed += files_removed;
        report.files_added += files_added;
        report.rows += rows_read;
        report.bytes_removed += bytes_removed;
        Ok(())
    }
}

/// The progress of one table's compaction: files and bytes merged, toward the plan.
struct CompactProgress {
    progress: Progress,
    files: usize,
    files_done: usize,
}

impl CompactProgress {
    /// A `compaction progress` line when one is due (at the start, every 2 s, at the
    /// end) and no bar shows it.
    fn log(&mut self, settings: &LakeSettings, table: &str, force: bool) {
        self.progress
            .set_message(format!("{}/{} files", self.files_done, self.files));
        if self.progress.has_bar() || !self.progress.log_due(force) {
            return;
        }
        tracing::info!(
            sink = %settings.name,
            table,
            files_done = self.files_done,
            files = self.files,
            bytes_done = self.progress.done(),
            bytes = self.progress.total(),
            bytes_per_second = self.progress.rate() as u64,
            eta_seconds = self.progress.eta_seconds(),
            "compaction progress"
        );
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    fn lock_at(dir: &std::path::Path) -> CompactLock {
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap();
        CompactLock {
            store: Arc::new(store),
            path: Path::from("_airlock/compact.lock"),
        }
    }

    async fn plant(lock: &CompactLock, body: &LockBody) {
        lock.store
            .put(
                &lock.path,
                PutPayload::from(serde_json::to_vec(body).unwrap()),
            )
            .await
            .unwrap();
    }

    /// Regression: a lock left by a killed `airlock compact` blocked every compaction
    /// for an hour, though its process was gone on this very machine.
    #[tokio::test]
    async fn a_lock_whose_process_is_gone_on_this_machine_is_taken_over_at_once() {
        let dir = std::env::temp_dir().join(format!("airlock-lock-gone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = lock_at(&dir);
        // A compactor that ran here and was killed: its identity recorded while it ran.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let holder = Holder::of(pid).expect("a running process has an identity in /proc");
        child.kill().unwrap();
        child.wait().unwrap();
        plant(
            &lock,
            &LockBody {
                owner: "airlock compact (killed)".into(),
                pid,
                since_ms: now_ms(),
                holder: Some(holder),
            },
        )
        .await;
        assert!(
            lock.acquire("test").await.unwrap(),
            "the dead holder's lock is taken over"
        );
        lock.release().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_lock_held_by_a_live_process_or_elsewhere_is_respected() {
        let dir = std::env::temp_dir().join(format!("airlock-lock-live-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = lock_at(&dir);
        // This very process holds it.
        let me = std::process::id();
        plant(
            &lock,
            &LockBody {
                owner: "the running host".into(),
                pid: me,
                since_ms: now_ms(),
                holder: Holder::of(me),
            },
        )
        .await;
        assert!(
            !lock.acquire("test").await.unwrap(),
            "a live holder keeps it"
        );
        // Another machine (another boot): cannot be told, so it waits out the hour.
        let mut elsewhere = Holder::of(me).unwrap();
        elsewhere.boot_id = "00000000-0000-0000-0000-000000000000".into();
        plant(
            &lock,
            &LockBody {
                owner: "another machine".into(),
                pid: u32::MAX,
                since_ms: now_ms(),
                holder: Some(elsewhere),
            },
        )
        .await;
        assert!(
            !lock.acquire("test").await.unwrap(),
            "a holder elsewhere keeps it"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
