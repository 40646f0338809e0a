//! The main job: builds every part from the configuration and runs them until
//! shutdown or a definite error.
//!
//! ```text
//! source task ──mpsc<Transaction>──▶ pipeline thread ──mpsc<Arc<Batch>>──▶ sink tasks
//!      ▲                                                                     │
//!      └───────── watch<Lsn> ◀── checkpoint tracker ◀── watch<Lsn> per sink ─┘
//! ```
//!
//! Shutdown: the source stops reading and drops its sender; the pipeline thread drains
//! what it holds; each sink flushes and exits; the source sends the final flush LSN.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::checkpoint::Tracker;
use crate::config::{Config, SinkConfig, SinkKind};
use crate::pipeline::runtime::{Runtime, RuntimeError};
use crate::pipeline::{self, Pipeline};
use crate::sink::lake::{LakeSettings, LakeSink};
use crate::sink::{self, SinkError};
use crate::source::{self, SourceError, SourceSettings};

/// Why the main job stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the plugin folder could not be loaded:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Plugins(Vec<RuntimeError>),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("{0}")]
    Internal(String),
}

/// Channel depth between the source and the pipeline, in transactions.
const SOURCE_CHANNEL: usize = 256;
/// Channel depth between the pipeline and each sink, in batches.
const SINK_CHANNEL: usize = 8;

async fn open_sink(
    config: &Config,
    sink: &SinkConfig,
    rx: mpsc::Receiver<Arc<crate::pipeline::batch::Batch>>,
    durable: watch::Sender<crate::change::Lsn>,
) -> Result<tokio::task::JoinHandle<Result<(), SinkError>>, SinkError> {
    match sink.kind {
        SinkKind::Delta => {
            let mut commit_info = serde_json::Map::new();
            commit_info.insert("airlock.slot".into(), config.source.slot.clone().into());
            commit_info.insert("airlock.publication".into(), config.source.publication.clone().into());
            let lake = LakeSink::open(LakeSettings {
                name: sink.name.clone(),
                url: sink.url.clone(),
                routes: sink.routes.clone(),
                flush_interval: sink.flush_interval,
                max_rows: sink.max_rows,
                max_bytes: sink.max_bytes,
                app_id: format!("airlock:{}", config.source.slot),
                storage_options: sink.storage_options.clone(),
                commit_info,
            })
            .await?;
            Ok(tokio::spawn(sink::drive(lake, rx, durable)))
        }
        SinkKind::Http => Err(SinkError::Definite {
            sink: sink.name.clone(),
            message: "the http sink is not available in this build".into(),
        }),
    }
}

/// Runs the main job until `shutdown` turns true (then drains and exits `Ok`) or a
/// definite error stops it.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let runtime = Runtime::new(config.plugins.limits.clone(), config.plugins.cache_dir.clone())?;
    let dir = config.plugins.dir.clone();
    let loader = runtime.clone();
    let pipeline = tokio::task::spawn_blocking(move || Pipeline::load_dir(&loader, &dir))
        .await
        .map_err(|e| RunError::Internal(format!("plugin loader panicked: {e}")))?
        .map_err(RunError::Plugins)?;
    tracing::info!(
        version = %pipeline.version,
        stages = ?pipeline.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        "pipeline loaded"
    );

    let (mut tracker, durable_rx) = Tracker::new();
    let mut sink_txs = Vec::new();
    let mut sink_tasks = Vec::new();
    for sink in &config.sinks {
        let (tx, rx) = mpsc::channel(SINK_CHANNEL);
        sink_txs.push(tx);
        sink_tasks.push((sink.name.clone(), open_sink(&config, sink, rx, tracker.register()).await?));
    }
    let tracker_task = tokio::spawn(tracker.run());

    let (txn_tx, txn_rx) = mpsc::channel(SOURCE_CHANNEL);
    let (worker_done_tx, worker_done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("airlock-pipeline".into())
        .spawn(move || {
            let result = pipeline::run_worker(pipeline, txn_rx, sink_txs);
            let _ = worker_done_tx.send(result);
        })
        .map_err(|e| RunError::Internal(format!("cannot start the pipeline thread: {e}")))?;

    let mut connect = source::protocol::ConnectConfig::from_url(&config.source.url)?;
    if let Some(password) = &config.source.password {
        connect.password = Some(password.clone());
    }
    let settings = SourceSettings {
        connect,
        slot: config.source.slot.clone(),
        publication: config.source.publication.clone(),
        create_slot: config.source.create_slot,
        status_interval: config.source.status_interval,
    };
    let source_task = tokio::spawn(source::run(settings, txn_tx, durable_rx, shutdown));

    // The source ends first (shutdown or error); then the pipeline drains, then sinks.
    let source_result = source_task.await.map_err(|e| RunError::Internal(format!("source task panicked: {e}")))?;
    let worker_result = worker_done.await.unwrap_or(Ok(()));
    let mut sink_error = None;
    for (name, task) in sink_tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(sink = %name, error = %e, "sink stopped");
                sink_error.get_or_insert(e);
            }
            Err(e) => tracing::error!(sink = %name, error = %e, "sink task panicked"),
        }
    }
    tracker_task.abort();
    if let Some(e) = sink_error {
        return Err(e.into());
    }
    worker_result?;
    source_result?;
    Ok(())
}
