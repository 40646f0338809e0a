//! The pipeline: guest stages in plugin-folder order, run on batches of whole
//! committed transactions, between the source and the sinks.
//!
//! ```text
//! source ──mpsc<Transaction>──▶ worker thread ──Batch──▶ stage 1 ─▶ … ─▶ stage n
//!                                   ▲                                     │
//!              reload slot ─────────┘ (swap between batches)              ▼
//!                                                      fan-out: mpsc<Arc<Batch>> per sink
//! ```
//!
//! Invariants:
//! - A batch holds whole transactions, or ends with one part of a large transaction
//!   (see [`Part`](crate::change::Part)). The pipeline is swapped only between
//!   batches outside a transaction, so a transaction is processed by exactly one
//!   pipeline version, which every output row carries (`_pipeline`). The one
//!   exception: a part the pipeline halts on is retried on a reloaded pipeline.
//! - Batches reach every sink in commit order.
//! - A batch that a stage fails twice is never sent on: `on_error` decides whether
//!   the pipeline halts (nothing past it is acknowledged) or dead-letters it. A part
//!   of a large transaction is never dead-lettered (its other parts went on): the
//!   pipeline halts on it.
//! - Under a policy with a responsible stage ([`custody::Custody`]), a batch in
//!   which that stage left a value of its classes unwritten is never sent on, retried
//!   or dead-lettered: the sinks get the denial alone, and the worker stops.

pub mod batch;
pub mod clocks;
pub mod custody;
pub mod guest;
pub mod harness;
pub mod inflow;
pub mod limiter;
pub mod names;
pub mod output;
pub mod registry;
pub mod runtime;
pub mod when;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use self::batch::Batch;
use self::inflow::InflowReceiver;
use self::registry::SwapSlot;
use self::runtime::{Runtime, RuntimeError, Stage};
use crate::backoff::Backoff;
use crate::change::Transaction;
use crate::status::{self, StageView, Status};

/// What to do with a batch a guest fails twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnError {
    Halt,
    DeadLetter(PathBuf),
}

/// A versioned, ordered set of loaded stages.
pub struct Pipeline {
    /// Short hash over the stage names and their content hashes.
    pub version: Arc<str>,
    pub stages: Vec<Stage>,
    /// The stages' names and content hashes, as every batch it processes carries them.
    pub lineage: Arc<[batch::StageId]>,
    /// The policy's hold on its responsible stage, checked on every batch (set by the
    /// worker, handed from version to version).
    pub custody: Option<custody::Custody>,
}

/// A plugin found in the folder, before loading.
#[derive(Clone, Debug)]
pub struct PluginFile {
    /// File stem, e.g. `20-mask`.
    pub name: String,
    pub wasm: PathBuf,
    /// `NAME.toml` beside the `.wasm`, when present.
    pub settings: Option<PathBuf>,
}

/// Lists `*.wasm` in `dir` in file-name order, each with its optional settings file.
pub fn scan(dir: &Path) -> Result<Vec<PluginFile>, RuntimeError> {
    let entries = std::fs::read_dir(dir).map_err(|e| RuntimeError::Load {
        path: dir.display().to_string(),
        message: format!("cannot read the plugin folder: {e}"),
    })?;
    let mut plugins: Vec<PluginFile> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
        .map(|wasm| {
            let name = wasm
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let toml = wasm.with_extension("toml");
            PluginFile {
                name,
                settings: toml.is_file().then_some(toml),
                wasm,
            }
        })
        .collect();
    plugins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(plugins)
}

/// Flattens a settings table: nested tables become dotted keys, arrays become one
/// entry per element under the same key, scalars become their text.
pub fn flatten_settings(table: &toml::Table) -> Vec<(String, String)> {
    fn walk(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            toml::Value::Array(items) => items.iter().for_each(|v| walk(prefix, v, out)),
            toml::Value::String(s) => out.push((prefix.to_owned(), s.clone())),
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", &toml::Value::Table(table.clone()), &mut out);
    out
}

/// Reads a plugin's settings file, if any, into flattened key/values.
pub fn read_settings(path: Option<&Path>) -> Result<Vec<(String, String)>, RuntimeError> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::Load {
        path: path.display().to_string(),
        message: format!("cannot read settings: {e}"),
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| RuntimeError::Load {
            path: path.display().to_string(),
            message: format!("invalid TOML: {}", e.message()),
        })?;
    Ok(flatten_settings(&table))
}

/// The pipeline version: a short hash over the stage names and content hashes.
pub fn version_of<'a>(stages: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut hasher = Sha256::new();
    for (name, hash) in stages {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(hash.as_bytes());
        hasher.update([b'\n']);
    }
    hex::encode(&hasher.finalize()[..6])
}

impl Pipeline {
    /// Loads every plugin of `files` (with `extra_settings` added to each stage's own),
    /// reporting every failure at once.
    pub fn load(
        runtime: &Runtime,
        files: &[PluginFile],
        extra_settings: &[(String, String)],
    ) -> Result<Pipeline, Vec<RuntimeError>> {
        let mut stages = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            let loaded = std::fs::read(&file.wasm)
                .map_err(|e| RuntimeError::Load {
                    path: file.wasm.display().to_string(),
                    message: format!("cannot read: {e}"),
                })
                .and_then(|wasm| {
                    let mut settings = read_settings(file.settings.as_deref())?;
                    settings.extend(extra_settings.iter().cloned());
                    runtime.load_stage(
                        &file.name,
                        &file.wasm.display().to_string(),
                        &wasm,
                        settings,
                    )
                });
            match loaded {
                Ok(stage) => stages.push(stage),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let version = version_of(
            stages
                .iter()
                .map(|s| (s.name.as_str(), s.content_hash.as_str())),
        );
        let lineage = stages
            .iter()
            .map(|s| batch::StageId {
                name: s.name.clone(),
                sha256: s.content_hash.clone(),
            })
            .collect();
        Ok(Pipeline {
            version: Arc::from(version),
            stages,
            lineage,
            custody: None,
        })
    }

    /// Loads the plugin folder.
    pub fn load_dir(runtime: &Runtime, dir: &Path) -> Result<Pipeline, Vec<RuntimeError>> {
        let files = scan(dir).map_err(|e| vec![e])?;
        Pipeline::load(runtime, &files, &[])
    }

    /// Runs every stage on `batch`, in order. On failure returns the batch exactly as
    /// it came in (every earlier stage's edits undone), and the error: whoever runs it
    /// again, on this pipeline or a reloaded one, starts from the stages' own input and
    /// never from a later stage's output (a value is never masked twice). With
    /// custody, the responsible stage's work is checked right after it ran (or at the
    /// end, when the pipeline has no such stage): a value it left unwritten fails the
    /// batch with [`RuntimeError::Denied`].
    pub fn process(&mut self, batch: Batch) -> Result<Batch, (Batch, RuntimeError)> {
        self.process_observed(batch, None)
    }

    /// Like [`Pipeline::process`], recording each stage's time and failures.
    pub fn process_observed(
        &mut self,
        mut batch: Batch,
        status: Option<&Status>,
    ) -> Result<Batch, (Batch, RuntimeError)> {
        let mut done: Vec<guest::Edits> = Vec::with_capacity(self.stages.len());
        let mut checked = false;
        for stage in &mut self.stages {
            let started = Instant::now();
            let result = stage.process(batch);
            if let Some(status) = status {
                let labels = [("stage", stage.name.as_str())];
                status.metrics.observe(
                    status::GUEST_SECONDS,
                    &labels,
                    started.elapsed().as_secs_f64(),
                );
                if result.is_err() {
                    status.metrics.add(status::GUEST_FAILURES, &labels, 1.0);
                }
            }
            match result {
                Ok((next, edits)) => {
                    batch = next;
                    let custody = self.custody.as_mut().filter(|c| c.stage() == stage.name);
                    let denied = custody.and_then(|c| c.check(&batch, Some(&edits)).err());
                    checked |= self
                        .custody
                        .as_ref()
                        .is_some_and(|c| c.stage() == stage.name);
                    done.push(edits);
                    if let Some(violation) = denied {
                        return Err(undo(batch, done, RuntimeError::Denied(Box::new(violation))));
                    }
                }
                Err((back, error)) => return Err(undo(back, done, error)),
            }
        }
        if !checked
            && let Some(custody) = &mut self.custody
            && let Err(violation) = custody.check(&batch, None)
        {
            return Err(undo(batch, done, RuntimeError::Denied(Box::new(violation))));
        }
        batch.pipeline = self.version.clone();
        batch.stages = self.lineage.clone();
        Ok(batch)
    }

    /// The stages as `/status` shows them.
    pub fn stage_views(&self) -> Vec<StageView> {
        self.stages
            .iter()
            .map(|s| StageView {
                name: s.name.clone(),
                plugin: s.info.name.clone(),
                version: s.info.version.clone(),
                description: s.info.description.clone(),
                content_hash: s.content_hash.clone(),
                contract: s.contract.clone(),
                loaded_at: s
                    .loaded_at
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            })
            .collect()
    }
}

/// What the pipeline thread works with.
pub struct Worker {
    pub pipeline: Pipeline,
    /// The version of the policy the gate in front of the worker applies.
    policy: Arc<str>,
    /// What the gate denied, handed on with the batches of its transactions.
    denials: crate::policy::DenialQueue,
    /// Where the registry offers the next pipeline.
    pub slot: SwapSlot,
    pub status: Arc<Status>,
    pub on_error: OnError,
    /// Inside a transaction handed on in parts: the pipeline is not swapped until its
    /// last part went through.
    open: bool,
    /// The runtime the worker waits on while idle, so that a reloaded pipeline is
    /// swapped in without waiting for traffic. Without one, it is swapped at the next batch.
    runtime: Option<tokio::runtime::Handle>,
}

impl Worker {
    /// A worker behind the gate of `policy`, whose denials come through `denials`.
    pub fn new(
        mut pipeline: Pipeline,
        slot: SwapSlot,
        status: Arc<Status>,
        on_error: OnError,
        policy: &Arc<crate::policy::Policy>,
        denials: crate::policy::DenialQueue,
    ) -> Worker {
        pipeline.custody = custody::Custody::new(policy.clone());
        Worker {
            policy: policy.version.as_str().into(),
            denials,
            pipeline,
            slot,
            status,
            on_error,
            open: false,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Waits for the next transaction; while none comes, swaps in an offered pipeline
    /// (outside a transaction) every [`IDLE_SWAP_CHECK`]. `None` once the channel closed.
    fn next_transaction(&mut self, rx: &mut InflowReceiver) -> Option<Transaction> {
        let Some(runtime) = self.runtime.clone() else {
            return rx.blocking_recv();
        };
        loop {
            // The timer is made inside the runtime: it needs its context.
            match runtime.block_on(async { tokio::time::timeout(IDLE_SWAP_CHECK, rx.recv()).await })
            {
                Ok(next) => return next,
                Err(_) => self.swap_if_offered(),
            }
        }
    }

    /// Swaps in the pipeline the registry offers, at a transaction boundary.
    fn swap_if_offered(&mut self) {
        if !self.open {
            self.swap_offered();
        }
    }

    fn swap_offered(&mut self) {
        if let Some(mut next) = self.slot.take() {
            next.custody = self.pipeline.custody.take();
            self.pipeline = next;
            self.status
                .pipeline_running(&self.pipeline.version, self.pipeline.stage_views());
            tracing::info!(version = %self.pipeline.version, "pipeline swapped in");
        }
    }

    fn count_in(&self, batch: &Batch) {
        let metrics = &self.status.metrics;
        metrics.add(status::TRANSACTIONS, &[], batch.txns.len() as f64);
        metrics.observe(status::BATCH_ROWS, &[], batch.rows.len() as f64);
        for table in &batch.tables {
            let name = table.relation.qualified_name();
            metrics.add(
                status::ROWS_IN,
                &[("table", &name)],
                table.rows.len() as f64,
            );
        }
    }

    /// Counts rows out per table and route, and rows dropped per table: tallied in
    /// the batch first, so the metrics are touched once per (table, route), not per row.
    fn count_out(&self, batch: &Batch) {
        let mut tally: HashMap<(u32, Option<&str>), u64> = HashMap::new();
        for row in &batch.rows {
            if row.dropped {
                *tally.entry((row.table, None)).or_default() += 1;
            } else if row.routes.is_empty() {
                *tally
                    .entry((row.table, Some(batch::BatchRow::DEFAULT_ROUTE)))
                    .or_default() += 1;
            } else {
                for route in &row.routes {
                    *tally.entry((row.table, Some(route.as_str()))).or_default() += 1;
                }
            }
        }
        let metrics = &self.status.metrics;
        for ((table, route), count) in tally {
            let table = batch.tables[table as usize].relation.qualified_name();
            match route {
                None => metrics.add(status::ROWS_DROPPED, &[("table", &table)], count as f64),
                Some(route) => metrics.add(
                    status::ROWS_OUT,
                    &[("table", &table), ("route", route)],
                    count as f64,
                ),
            }
        }
    }

    /// Runs the stages on one batch under the `on_error` policy. When a batch of
    /// several transactions fails, its transactions are run again one by one, so the
    /// policy applies to the failing transaction alone: those before it go through
    /// (handed to `emit` at once, before any halt), and only it is halted on or
    /// dead-lettered. Returns false when the stream should stop: the source went away
    /// while a transaction was halted, or `emit` found the sinks gone.
    fn process(
        &mut self,
        batch: Batch,
        source_gone: impl Fn() -> bool,
        mut emit: impl FnMut(&Self, Batch) -> bool,
    ) -> Result<bool, RuntimeError> {
        self.swap_if_offered();
        let ends_open = batch.ends_open();
        let result = self.process_inner(batch, source_gone, &mut emit);
        // Whatever became of the batch, the stream is now inside or outside a
        // transaction as the batch left it.
        self.open = ends_open;
        result
    }

    fn process_inner(
        &mut self,
        batch: Batch,
        source_gone: impl Fn() -> bool,
        emit: &mut impl FnMut(&Self, Batch) -> bool,
    ) -> Result<bool, RuntimeError> {
        match self.pipeline.process_observed(batch, Some(&self.status)) {
            Ok(done) => {
                self.status.clear_error("pipeline");
                Ok(emit(self, done))
            }
            Err((back, RuntimeError::Denied(violation))) => Err(self.deny(back, *violation, emit)),
            Err((back, error)) if back.txns.len() > 1 => {
                tracing::warn!(
                    error = %error,
                    transactions = back.txns.len(),
                    "a batch failed; running its transactions one by one to isolate the failing one"
                );
                for txn in back.into_transactions() {
                    let one = Batch::from_transactions([txn]);
                    let Some(batch) = self.process_one(one, &source_gone, emit)? else {
                        return Ok(false);
                    };
                    if !emit(self, batch) {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Err((back, error)) => match self.on_failure(back, error, &source_gone, emit)? {
                Some(batch) => Ok(emit(self, batch)),
                None => Ok(false),
            },
        }
    }

    /// Stops on a batch its responsible stage did not fully write: the batch is not
    /// delivered; the sinks get the denial alone (the spine records it), then the
    /// run stops, nothing of the transaction acknowledged.
    fn deny(
        &self,
        batch: Batch,
        violation: crate::policy::Violation,
        emit: &mut impl FnMut(&Self, Batch) -> bool,
    ) -> RuntimeError {
        tracing::error!(
            table = %violation.table, column = %violation.column, class = %violation.class,
            stage = %violation.stage, unwritten = violation.unwritten,
            "the responsible stage left values of its class unwritten; the batch is not delivered"
        );
        drop(batch);
        emit(
            self,
            Batch {
                pipeline: self.pipeline.version.clone(),
                stages: self.pipeline.lineage.clone(),
                denials: vec![crate::policy::Denial::Unwritten(violation.clone())],
                ..Batch::default()
            },
        );
        RuntimeError::Denied(Box::new(violation))
    }

    /// Runs one transaction's batch until it passes, or the policy disposes of it.
    fn process_one(
        &mut self,
        batch: Batch,
        source_gone: &impl Fn() -> bool,
        emit: &mut impl FnMut(&Self, Batch) -> bool,
    ) -> Result<Option<Batch>, RuntimeError> {
        self.swap_if_offered();
        match self.pipeline.process_observed(batch, Some(&self.status)) {
            Ok(done) => {
                self.status.clear_error("pipeline");
                Ok(Some(done))
            }
            Err((back, RuntimeError::Denied(violation))) => Err(self.deny(back, *violation, emit)),
            Err((back, error)) => self.on_failure(back, error, source_gone, emit),
        }
    }

    /// Applies `on_error` to a failed single-transaction batch.
    /// `Ok(None)` when the source went away during a halt.
    ///
    /// A part of a transaction handed on in parts is never dead-lettered: its other
    /// parts have gone on (or will), so quarantining this one would leave the
    /// transaction incomplete downstream. The pipeline halts on it instead.
    fn on_failure(
        &mut self,
        mut batch: Batch,
        mut error: RuntimeError,
        source_gone: &impl Fn() -> bool,
        emit: &mut impl FnMut(&Self, Batch) -> bool,
    ) -> Result<Option<Batch>, RuntimeError> {
        let in_parts = batch.txns.iter().any(|t| !t.part.is_whole());
        let policy = match &self.on_error {
            OnError::DeadLetter(_) if in_parts => {
                tracing::error!(
                    error = %error,
                    "a part of a large transaction failed: it cannot be dead-lettered without \
                     splitting the transaction, so the pipeline halts on it"
                );
                OnError::Halt
            }
            policy => policy.clone(),
        };
        let dir = match policy {
            OnError::DeadLetter(dir) => dir,
            OnError::Halt => {
                let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
                loop {
                    self.status.error("pipeline", &error.to_string());
                    if source_gone() {
                        tracing::error!(error = %error, "stopping while halted: the transaction stays unacknowledged in the slot");
                        return Ok(None);
                    }
                    let retry_in = backoff.next_delay();
                    tracing::error!(
                        error = %error,
                        ?retry_in,
                        "pipeline halted: nothing past this transaction is acknowledged; \
                         retrying (fix or replace the guest: a reload is picked up here)"
                    );
                    std::thread::sleep(retry_in);
                    // A fixed guest is picked up here, even inside a transaction handed
                    // on in parts (its earlier parts ran on the version before): halted,
                    // nothing else could ever finish it. Each row's `_pipeline` says
                    // which version processed it.
                    self.swap_offered();
                    match self.pipeline.process_observed(batch, Some(&self.status)) {
                        Ok(done) => {
                            self.status.clear_error("pipeline");
                            return Ok(Some(done));
                        }
                        Err((back, RuntimeError::Denied(violation))) => {
                            return Err(self.deny(back, *violation, emit));
                        }
                        Err((back, again)) => {
                            batch = back;
                            error = again;
                        }
                    }
                }
            }
        };
        let path = dead_letter(&dir, &batch, &error).map_err(|e| {
            RuntimeError::Engine(format!(
                "cannot write the dead-letter file in {}: {e}; halting",
                dir.display()
            ))
        })?;
        tracing::warn!(error = %error, file = %path.display(), "transaction dead-lettered");
        self.status.error(
            "pipeline",
            &format!("dead-lettered to {}: {error}", path.display()),
        );
        // The transaction still counts as done: sinks receive it without rows, so the
        // slot moves past it.
        Ok(Some(Batch {
            txns: batch.txns,
            pipeline: self.pipeline.version.clone(),
            stages: self.pipeline.lineage.clone(),
            ..Batch::default()
        }))
    }
}

/// `batch` taken back to the pipeline's input: every stage's edits undone, newest first.
fn undo(mut batch: Batch, done: Vec<guest::Edits>, error: RuntimeError) -> (Batch, RuntimeError) {
    for edits in done.into_iter().rev() {
        edits.undo(&mut batch);
    }
    (batch, error)
}

/// Writes a failed batch's original transactions as JSON lines, durably.
/// The file holds the data as it came from PostgreSQL, unmasked: the quarantine
/// directory must be as protected as the database.
fn dead_letter(dir: &Path, batch: &Batch, error: &RuntimeError) -> std::io::Result<PathBuf> {
    use std::io::Write;
    crate::private_files::create_dir_all(dir)?;
    let first = batch.txns.first().map(|t| t.commit_lsn.0).unwrap_or(0);
    let last = batch.txns.last().map(|t| t.commit_lsn.0).unwrap_or(0);
    let path = dir.join(format!("{first:016X}-{last:016X}.jsonl"));
    let mut out = std::io::BufWriter::new(crate::private_files::create(&path)?);
    for row in harness::row_lines(batch) {
        let mut row = row;
        row["error"] = serde_json::Value::from(error.to_string());
        writeln!(out, "{row}")?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(path)
}

/// How many rows the worker gathers into one batch before running the stages.
pub const BATCH_ROWS: usize = 1024;

/// How often an idle worker looks for a reloaded pipeline to swap in.
pub const IDLE_SWAP_CHECK: Duration = Duration::from_millis(100);

/// Runs the pipeline on a dedicated thread: gathers whole transactions (or one part of
/// a large one) into batches, swaps in a reloaded pipeline between transactions, runs the stages, and sends each
/// result to every sink. Returns when the source channel closes (after forwarding
/// everything) or a batch fails for good.
pub fn run_worker(
    mut worker: Worker,
    mut rx: InflowReceiver,
    sinks: Vec<mpsc::Sender<Arc<Batch>>>,
) -> Result<(), RuntimeError> {
    worker
        .status
        .pipeline_running(&worker.pipeline.version, worker.pipeline.stage_views());
    while let Some(first) = worker.next_transaction(&mut rx) {
        let mut rows = first.changes.len();
        let mut open = !first.meta.completes();
        let mut txns = vec![first];
        // A part that more parts follow ends its batch.
        while rows < BATCH_ROWS && !open {
            match rx.try_recv() {
                Some(txn) => {
                    rows += txn.changes.len();
                    open = !txn.meta.completes();
                    txns.push(txn);
                }
                None => break,
            }
        }
        let batch = Batch::from_transactions(txns);
        worker.count_in(&batch);
        let emit = |worker: &Worker, mut batch: Batch| {
            worker.count_out(&batch);
            // Every batch, however it got here (whole, one by one, dead-lettered):
            // the policy its rows passed, and what the gate denied up to its end.
            batch.policy = worker.policy.clone();
            if let Some(last) = batch.txns.last() {
                batch
                    .denials
                    .extend(worker.denials.take_through(last.commit_lsn));
            }
            let batch = Arc::new(batch);
            // A failed send means a sink stopped; its task reports why.
            sinks
                .iter()
                .all(|sink| sink.blocking_send(batch.clone()).is_ok())
        };
        if !worker.process(batch, || rx.is_closed(), emit)? {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_flatten_tables_to_dotted_keys_and_arrays_to_repeated_keys() {
        let table: toml::Table = r#"
            columns = ["email", "phone"]
            salt = "s"
            [mode]
            phone = "keep-last-4"
            limit = 3
        "#
        .parse()
        .unwrap();
        let mut flat = flatten_settings(&table);
        flat.sort();
        assert_eq!(
            flat,
            vec![
                ("columns".into(), "email".into()),
                ("columns".into(), "phone".into()),
                ("mode.limit".into(), "3".into()),
                ("mode.phone".into(), "keep-last-4".into()),
                ("salt".into(), "s".into()),
            ]
        );
    }

    #[test]
    fn version_depends_on_names_and_content() {
        let a = version_of([("10-mask", "aa")]);
        assert_eq!(a.len(), 12);
        assert_ne!(a, version_of([("10-mask", "ab")]));
        assert_ne!(a, version_of([("20-mask", "aa")]));
        assert_eq!(a, version_of([("10-mask", "aa")]));
    }
}
