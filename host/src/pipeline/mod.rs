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
//! - A batch holds whole transactions, so swapping the pipeline between batches
//!   swaps it at a transaction boundary: a transaction is processed by exactly one
//!   pipeline version, which every output row carries (`_pipeline`).
//! - Batches reach every sink in commit order.
//! - A batch that a stage fails twice is never sent on: `on_error` decides whether
//!   the pipeline halts (nothing past it is acknowledged) or dead-letters it.

pub mod batch;
pub mod guest;
pub mod harness;
pub mod output;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use self::batch::Batch;
use self::runtime::{Runtime, RuntimeError, Stage};
use crate::change::Transaction;

/// A versioned, ordered set of loaded stages.
pub struct Pipeline {
    /// Short hash over the stage names and their content hashes.
    pub version: Arc<str>,
    pub stages: Vec<Stage>,
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
            let name = wasm.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            let toml = wasm.with_extension("toml");
            PluginFile { name, settings: toml.is_file().then_some(toml), wasm }
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
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
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
    let Some(path) = path else { return Ok(Vec::new()) };
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::Load {
        path: path.display().to_string(),
        message: format!("cannot read settings: {e}"),
    })?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| RuntimeError::Load {
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
    pub fn load(runtime: &Runtime, files: &[PluginFile], extra_settings: &[(String, String)]) -> Result<Pipeline, Vec<RuntimeError>> {
        let mut stages = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            let loaded = std::fs::read(&file.wasm)
                .map_err(|e| RuntimeError::Load { path: file.wasm.display().to_string(), message: format!("cannot read: {e}") })
                .and_then(|wasm| {
                    let mut settings = read_settings(file.settings.as_deref())?;
                    settings.extend(extra_settings.iter().cloned());
                    runtime.load_stage(&file.name, &file.wasm.display().to_string(), &wasm, settings)
                });
            match loaded {
                Ok(stage) => stages.push(stage),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let version = version_of(stages.iter().map(|s| (s.name.as_str(), s.content_hash.as_str())));
        Ok(Pipeline { version: Arc::from(version), stages })
    }

    /// Loads the plugin folder.
    pub fn load_dir(runtime: &Runtime, dir: &Path) -> Result<Pipeline, Vec<RuntimeError>> {
        let files = scan(dir).map_err(|e| vec![e])?;
        Pipeline::load(runtime, &files, &[])
    }

    /// Runs every stage on `batch`, in order. On failure returns the batch as it was
    /// before the failing stage's call, and the error.
    pub fn process(&mut self, mut batch: Batch) -> Result<Batch, (Batch, RuntimeError)> {
        for stage in &mut self.stages {
            batch = stage.process(batch)?;
        }
        batch.pipeline = self.version.clone();
        Ok(batch)
    }
}

/// How many rows the worker gathers into one batch before running the stages.
pub const BATCH_ROWS: usize = 1024;

/// Runs the pipeline on a dedicated thread: gathers whole transactions into batches,
/// runs the stages, and sends each result to every sink. Returns when the source
/// channel closes (after forwarding everything) or a batch fails for good.
pub fn run_worker(
    mut pipeline: Pipeline,
    mut rx: mpsc::Receiver<Transaction>,
    sinks: Vec<mpsc::Sender<Arc<Batch>>>,
) -> Result<(), RuntimeError> {
    while let Some(first) = rx.blocking_recv() {
        let mut rows = first.changes.len();
        let mut txns = vec![first];
        while rows < BATCH_ROWS {
            match rx.try_recv() {
                Ok(txn) => {
                    rows += txn.changes.len();
                    txns.push(txn);
                }
                Err(_) => break,
            }
        }
        let batch = Batch::from_transactions(txns);
        let batch = match pipeline.process(batch) {
            Ok(batch) => Arc::new(batch),
            Err((_, error)) => {
                tracing::error!(error = %error, "pipeline halted: nothing past this batch is acknowledged");
                return Err(error);
            }
        };
        for sink in &sinks {
            if sink.blocking_send(batch.clone()).is_err() {
                // The sink stopped; its task reports why.
                return Ok(());
            }
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
