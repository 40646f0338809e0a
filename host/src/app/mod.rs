//! The main job: builds every part from the configuration and runs them until
//! shutdown or a definite error.
//!
//! ```text
//! source task ──mpsc<Transaction>──▶ pipeline thread ──mpsc<Arc<Batch>>──▶ sink tasks
//!      ▲                                  ▲ swap slot                          │
//!      │                      registry ───┘ (folder, SIGHUP, POST /reload)     │
//!      └───────── watch<Lsn> ◀── checkpoint tracker ◀── watch<Lsn> per sink ───┘
//! admin API (status, metrics, reload) · slot health monitor (lag, wal_status)
//! ```
//!
//! Shutdown: the source stops reading and drops its sender; the pipeline thread drains
//! what it holds; each sink flushes and exits; the source sends the final flush LSN.
//! Every task is a part of one [`parts::Parts`]: a sink, the pipeline or the source
//! that fails, or any part that panics, stops the run at once with an error naming
//! it; what was not durable in every sink was never acknowledged.
//!
//! [`run`] reads as the diagram: open the source's settings, load the pipeline, start
//! reloads, serve the admin API, open the sinks (with the checkpoint tracker), start
//! the pipeline thread, watch the slot, stream, wait for every part.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::change::Lsn;
use crate::checkpoint::Tracker;
use crate::config::{Config, SinkConfig, SinkSettings};
use crate::pipeline::batch::Batch;
use crate::pipeline::registry::{self, ReloadRequest, SwapSlot};
use crate::pipeline::runtime::Runtime;
use crate::pipeline::{self, Worker};
use crate::sink::lake::{Compactors, LakeSink};
use crate::sink::spine::SpineSink;
use crate::sink::{self, SinkError};
use crate::source::{self, Held, SourceSettings};
use crate::spine::client::SpineClient;
use crate::status::{self, Status, lsn_text};

mod error;
mod parts;
mod slot_health;

pub use error::RunError;

use parts::{Parts, Role};
use slot_health::InFlight;

/// Bytes of transactions (or parts of large ones) that may wait for the guests
/// between the source and the pipeline (see [`pipeline::inflow`]).
const SOURCE_QUEUE_BYTES: usize = 16 << 20;
/// Depth of the tap in front of it, which only records commit times for the lag.
const TAP_CHANNEL: usize = 4;
/// Channel depth between the pipeline and each sink, in batches.
const SINK_CHANNEL: usize = 8;

/// Opens one sink and runs it as a part; returns what it holds from earlier runs.
async fn open_sink(
    parts: &mut Parts,
    sink: &SinkConfig,
    rx: mpsc::Receiver<Arc<Batch>>,
    durable: watch::Sender<Lsn>,
    through: watch::Receiver<Lsn>,
    compactors: &Compactors,
    status: &Arc<Status>,
) -> Result<Option<Held>, SinkError> {
    let name = format!("sink `{}`", sink.name);
    match &sink.settings {
        SinkSettings::Delta(settings) => {
            let lake = LakeSink::open(settings.clone()).await?;
            let held = held_by(&lake, &sink.name, status, parts.stop()).await?;
            compactors.register(lake.handle()); // lake: `POST /compact`
            let task = sink::drive_observed(lake, rx, durable, Some(status.clone()), Some(through));
            parts.spawn(name, Role::Sink, async { Ok(task.await?) });
            Ok(held)
        }
        SinkSettings::Http(settings) => {
            let spine = SpineSink::open(settings.clone()).await?;
            let task =
                sink::drive_observed(spine, rx, durable, Some(status.clone()), Some(through));
            parts.spawn(name, Role::Sink, async { Ok(task.await?) });
            Ok(None)
        }
    }
}

/// What a lake sink holds from earlier runs (see [`Held`]). Streaming cannot start
/// without the answer: an unreachable store is asked again, with backoff, and shown in
/// `/status` meanwhile, until it answers or the host is asked to stop.
async fn held_by(
    lake: &LakeSink,
    sink: &str,
    status: &Status,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<Held>, SinkError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        match lake.held_through().await {
            Ok(held) => {
                status.update_sink(sink, |v| {
                    v.last_error = None;
                    v.retrying = false;
                });
                return Ok(held.map(|(table, through)| Held {
                    sink: sink.to_owned(),
                    table,
                    through,
                }));
            }
            Err(error) if error.is_transient() => {
                let retry_in = backoff.next_delay();
                tracing::warn!(sink, %error, ?retry_in, "cannot read what the lake holds; streaming starts once it answers");
                status.update_sink(sink, |v| {
                    v.last_error = Some(error.to_string());
                    v.retrying = true;
                });
                tokio::select! {
                    _ = tokio::time::sleep(retry_in) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Err(error),
                }
            }
            Err(error) => return Err(error),
        }
    }
}

/// Shows what the source does in `/status`: a retry sets `state = "retrying"` and
/// `last_error` (component `source`) with its cause; streaming again clears it.
fn source_state(status: &Status, state: source::SourceState) {
    use source::SourceState;
    match state {
        SourceState::Connecting => status.update_source(|s| s.state = "connecting".into()),
        SourceState::Snapshotting => {
            status.update_source(|s| s.state = "snapshotting".into());
            status.set_ready(true);
        }
        SourceState::Streaming => {
            status.update_source(|s| s.state = "streaming".into());
            status.clear_error("source");
            status.set_ready(true);
        }
        SourceState::Retrying { error, retry_in } => {
            status.update_source(|s| s.state = "retrying".into());
            status.error(
                "source",
                &format!("{error} (retrying in {} ms)", retry_in.as_millis()),
            );
        }
    }
}

/// Runs the main job until `shutdown` turns true (then drains and exits `Ok`) or a
/// part fails (then stops at once, see [`parts`]).
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let status = Arc::new(Status::default());
    let connect = config.source.connect_config()?;
    show_source(&status, &config, &connect);
    // The pipeline: built completely before anything streams.
    let runtime = Runtime::new(
        config.plugins.limits.clone(),
        config.plugins.cache_dir.clone(),
    )?;
    let pipeline = load_pipeline(&runtime, &config).await?;
    let mut parts = Parts::new(shutdown);
    let slot = SwapSlot::default();
    let reloads = start_reloads(&mut parts, &config, &runtime, &slot, &status)?;
    let compactors = Compactors::default(); // the lake sinks', for `POST /compact`
    let admin = serve_admin(&mut parts, &config, &status, reloads, &compactors).await?;
    let sinks = open_sinks(&mut parts, &config, &status, &compactors).await?;
    let flow = start_pipeline(&mut parts, pipeline, slot, &status, &config, sinks.inputs)?;
    parts.spawn(
        "slot health",
        Role::Background,
        slot_health::monitor(
            connect.clone(),
            config.source.slot.clone(),
            status.clone(),
            sinks.durable.clone(),
            flow.in_flight,
            parts.stop(),
        ),
    );
    let mut settings = source_settings(&config, connect, &status, sinks.held);
    settings.flush_through = Some(sinks.flush_through.clone());
    start_source(
        &mut parts,
        settings,
        flow.transactions,
        sinks.durable,
        &status,
    );
    let result = parts.wait().await;
    drop(admin); // removes the per-run token file
    if result.is_ok() {
        tracing::info!("stopped cleanly");
    }
    result
}

/// Streams from the slot into the pipeline, acknowledging what every sink made durable.
fn start_source(
    parts: &mut Parts,
    settings: SourceSettings,
    transactions: mpsc::Sender<crate::change::Transaction>,
    durable: watch::Receiver<Lsn>,
    status: &Arc<Status>,
) {
    let source = source::run(settings, transactions, durable, parts.stop());
    let status = status.clone();
    parts.spawn("the source", Role::Source, async move {
        let result = source.await;
        if let Err(e) = &result {
            status.error("source", &e.to_string());
        }
        status.update_source(|s| s.state = "stopped".into());
        tracing::info!("source stopped; draining the pipeline");
        Ok(result?)
    });
}

/// The source's settings in `/status` before it connects.
fn show_source(status: &Status, config: &Config, connect: &source::protocol::ConnectConfig) {
    status.update_source(|s| {
        s.database = connect.redacted_url();
        s.slot = config.source.slot.clone();
        s.publication = config.source.publication.clone();
        s.state = "starting".into();
    });
}

/// Compiles and initialises every stage of the plugin folder.
async fn load_pipeline(runtime: &Runtime, config: &Config) -> Result<pipeline::Pipeline, RunError> {
    let (loader, dir, require) = (
        runtime.clone(),
        config.plugins.dir.clone(),
        config.plugins.require.clone(),
    );
    let pipeline = tokio::task::spawn_blocking(move || registry::build(&loader, &dir, &require))
        .await
        .map_err(|e| RunError::Internal(format!("plugin loader panicked: {e}")))?
        .map_err(RunError::Plugins)?;
    tracing::info!(
        version = %pipeline.version,
        stages = ?pipeline.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        "pipeline loaded"
    );
    Ok(pipeline)
}

/// Reloads: the folder watch, SIGHUP and the admin API feed one queue.
struct Reloads {
    requests: mpsc::Sender<ReloadRequest>,
}

fn start_reloads(
    parts: &mut Parts,
    config: &Config,
    runtime: &Runtime,
    slot: &SwapSlot,
    status: &Arc<Status>,
) -> Result<Reloads, RunError> {
    let (requests, reload_rx) = mpsc::channel::<ReloadRequest>(registry::RELOAD_QUEUE);
    let mut notifier = registry::ReloadNotifier::default();
    for spine in config.spines() {
        let client = SpineClient::new(&spine.url, spine.token.clone(), spine.request_timeout)
            .map_err(|e| crate::sink::spine::sink_error(&spine.name, e, None))?;
        notifier
            .spines
            .push((Arc::new(client), spine.default_source.clone()));
    }
    let registry = registry::run(
        runtime.clone(),
        config.plugins.dir.clone(),
        config.plugins.require.clone(),
        config.plugins.watch,
        slot.clone(),
        status.clone(),
        notifier,
        reload_rx,
    );
    parts.spawn("reloads", Role::Background, async move {
        registry.await;
        Ok(())
    });
    let hup_tx = requests.clone();
    parts.spawn("SIGHUP", Role::Background, async move {
        let kind = tokio::signal::unix::SignalKind::hangup();
        let mut hup = tokio::signal::unix::signal(kind)
            .map_err(|e| RunError::Internal(format!("cannot listen for SIGHUP: {e}")))?;
        while hup.recv().await.is_some() {
            let reload = ReloadRequest {
                reason: "SIGHUP",
                reply: None,
            };
            match hup_tx.try_send(reload) {
                // A full queue already holds reloads that will see the folder as it is.
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        Ok(())
    });
    Ok(Reloads { requests })
}

/// The admin API's per-run token file, removed when dropped.
struct Admin {
    _local_token: Option<crate::admin::LocalTokenFile>,
}

async fn serve_admin(
    parts: &mut Parts,
    config: &Config,
    status: &Arc<Status>,
    reloads: Reloads,
    compactors: &Compactors,
) -> Result<Admin, RunError> {
    let listen = config.admin.listen.to_string();
    let admin_error = |addr: String| move |error| RunError::Admin { addr, error };
    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(admin_error(listen.clone()))?;
    let addr = listener.local_addr().map_err(admin_error(listen))?;
    tracing::info!(addr = %addr, "admin API listening");
    // Without a configured token, the routes that act take a per-run token that only
    // this user can read (see `admin::local_token_path`).
    let (control_token, local_token) = match &config.admin.token {
        Some(token) => (Arc::from(token.as_str()), None),
        None => {
            let token = crate::admin::random_token().map_err(admin_error(addr.to_string()))?;
            let file = match crate::admin::local_token_path(addr) {
                Some(path) => Some(crate::admin::write_local_token(&path, &token).map_err(
                    admin_error(format!("{addr} (token file {})", path.display())),
                )?),
                None => None,
            };
            (Arc::from(token.as_str()), file)
        }
    };
    let state = crate::admin::AdminState {
        status: status.clone(),
        reload: reloads.requests,
        token: config.admin.token.as_deref().map(Arc::from),
        control_token,
        compactors: compactors.clone(),
    };
    let mut stop = parts.stop();
    let serve = crate::admin::serve(listener, state, async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    parts.spawn("the admin API", Role::Background, async move {
        let stopped = |e| RunError::Internal(format!("the admin API stopped: {e}"));
        serve.await.map_err(stopped)
    });
    Ok(Admin {
        _local_token: local_token,
    })
}

/// The sinks, open and running as parts, with the checkpoint tracker over them.
struct Sinks {
    /// One input per sink, in configuration order.
    inputs: Vec<mpsc::Sender<Arc<Batch>>>,
    /// The LSN every sink has made durable.
    durable: watch::Receiver<Lsn>,
    /// The latest changes any sink holds from an earlier run (see [`Held`]).
    held: Option<Held>,
    /// What the source waits to see durable now (a snapshot's end): flushed at once.
    flush_through: Arc<watch::Sender<Lsn>>,
}

async fn open_sinks(
    parts: &mut Parts,
    config: &Config,
    status: &Arc<Status>,
    compactors: &Compactors,
) -> Result<Sinks, RunError> {
    let (mut tracker, durable) = Tracker::new();
    let (flush_through, through) = watch::channel(Lsn::ZERO);
    let mut inputs = Vec::new();
    let mut held: Option<Held> = None;
    for sink in &config.sinks {
        let (tx, rx) = mpsc::channel(SINK_CHANNEL);
        inputs.push(tx);
        let sink_durable = tracker.register();
        show_durable(parts, status, sink, sink_durable.subscribe());
        let held_here = open_sink(
            parts,
            sink,
            rx,
            sink_durable,
            through.clone(),
            compactors,
            status,
        )
        .await?;
        if held_here.as_ref().map(|h| h.through) > held.as_ref().map(|h| h.through) {
            held = held_here;
        }
    }
    parts.spawn_checkpoint(tracker.run());
    Ok(Sinks {
        inputs,
        durable,
        held,
        flush_through: Arc::new(flush_through),
    })
}

/// Shows a sink in `/status`, and what it has made durable as it moves.
fn show_durable(
    parts: &mut Parts,
    status: &Arc<Status>,
    sink: &SinkConfig,
    mut durable: watch::Receiver<Lsn>,
) {
    status.update_sink(&sink.name, |v| {
        v.kind = sink.kind().as_str().to_owned();
        v.url = crate::secrets::redact_url(sink.url());
        v.routes = sink.routes().to_vec();
    });
    let (name, status) = (sink.name.clone(), status.clone());
    parts.spawn(
        format!("sink `{name}` status"),
        Role::Background,
        async move {
            while durable.changed().await.is_ok() {
                let lsn = *durable.borrow();
                status.update_sink(&name, |v| v.durable_lsn = lsn_text(lsn));
                let labels = [("sink", name.as_str())];
                status
                    .metrics
                    .set(status::SINK_DURABLE_LSN, &labels, lsn.0 as f64);
            }
            Ok(())
        },
    );
}

/// The pipeline thread, fed through a tap that remembers commit times for the lag.
struct Flow {
    /// Where the source sends transactions.
    transactions: mpsc::Sender<crate::change::Transaction>,
    in_flight: InFlight,
}

fn start_pipeline(
    parts: &mut Parts,
    pipeline: pipeline::Pipeline,
    slot: SwapSlot,
    status: &Arc<Status>,
    config: &Config,
    sinks: Vec<mpsc::Sender<Arc<Batch>>>,
) -> Result<Flow, RunError> {
    let in_flight = InFlight::default();
    let (transactions, mut tap_rx) = mpsc::channel::<crate::change::Transaction>(TAP_CHANNEL);
    let (worker_tx, worker_rx) = pipeline::inflow::channel(SOURCE_QUEUE_BYTES);
    let tap_in_flight = in_flight.clone();
    status.set_policy(&config.policy);
    let mut gate =
        crate::policy::Gate::new(config.policy.clone(), config.source.identity.may_be_on());
    let gate_status = status.clone();
    let denials = crate::policy::DenialQueue::default();
    let gate_denials = denials.clone();
    parts.spawn("the tap", Role::Pipeline, async move {
        while let Some(mut txn) = tap_rx.recv().await {
            // The policy, before any guest sees a value.
            for denial in gate.apply(&mut txn)? {
                policy_notice(&gate_status, &denial);
                gate_denials.push(txn.meta.commit_lsn, denial);
            }
            if txn.meta.completes() {
                tap_in_flight.push(txn.meta.end_lsn, txn.meta.commit_ts);
            }
            if worker_tx.send(txn).await.is_err() {
                break; // the pipeline stopped; its part says why
            }
        }
        Ok(())
    });
    let worker = Worker::new(
        pipeline,
        slot,
        status.clone(),
        config.plugins.on_error.clone(),
        &config.policy,
        denials,
    );
    let (done_tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("airlock-pipeline".into())
        .spawn(move || {
            let result = pipeline::run_worker(worker, worker_rx, sinks);
            let _ = done_tx.send(result);
        })
        .map_err(|e| RunError::Internal(format!("cannot start the pipeline thread: {e}")))?;
    parts.spawn("the pipeline", Role::Pipeline, async move {
        let result = done.await.map_err(|_| RunError::Panicked {
            part: "the pipeline thread".into(),
            message: "its result never came".into(),
        })?;
        tracing::info!("pipeline drained; flushing sinks");
        Ok(result?)
    });
    Ok(Flow {
        transactions,
        in_flight,
    })
}

/// Tells an operator what the gate did: a log line and `/status`, never a value.
fn policy_notice(status: &Status, denial: &crate::policy::Denial) {
    match denial {
        crate::policy::Denial::Unwritten(_) => {}
        crate::policy::Denial::Column { table, column, key } => {
            if *key {
                tracing::warn!(%table, %column, "a column of the replica identity is denied by the policy's default: it leaves no trace, and deletes and key updates of the table carry no value for it; classify it in [policy.columns]");
            } else {
                tracing::warn!(%table, %column, "a column nothing classifies is denied by the policy's default: it leaves no trace; classify it in [policy.columns] to let it out");
            }
            status.policy_denied(table, column);
        }
    }
}

fn source_settings(
    config: &Config,
    connect: source::protocol::ConnectConfig,
    status: &Arc<Status>,
    held: Option<Held>,
) -> SourceSettings {
    SourceSettings {
        connect,
        slot: config.source.slot.clone(),
        publication: config.source.publication.clone(),
        create_slot: config.source.create_slot,
        status_interval: config.source.status_interval,
        tables: config.source.tables.clone(),
        slot_busy_timeout: config.source.slot_busy_timeout,
        shutdown_drain: source::DEFAULT_SHUTDOWN_DRAIN,
        snapshot: config.source.snapshot == crate::config::Snapshot::Initial,
        on_snapshot: Some({
            let status = status.clone(); // initial snapshot progress in `/status`
            source::SnapshotObserver(Arc::new(move |progress| status.set_snapshot(progress)))
        }),
        on_state: Some({
            let status = status.clone(); // the source's state and retries in `/status`
            source::StateObserver(Arc::new(move |state| source_state(&status, state)))
        }),
        held,
        spool_dir: config.source.spool_dir.clone(),
        state_dir: config.source.state_dir.clone(),
        snapshot_connections: config.source.snapshot_connections,
        // Set once the sinks are open.
        flush_through: None,
        // Comments name classes: with none, they can change nothing.
        read_comments: !config.policy.classes.is_empty(),
        identity: config.source.identity,
        on_unattributed: Some({
            let status = status.clone(); // changes without an identity in `/metrics`
            let warned = std::sync::Mutex::new(std::collections::BTreeSet::new());
            source::TableObserver(Arc::new(move |table| {
                status
                    .metrics
                    .add(status::UNATTRIBUTED, &[("table", table)], 1.0);
                let first = warned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(table.to_owned());
                if first {
                    tracing::warn!(
                        table,
                        "changes without an identity are written with none ([source] identity = \"record\"; counted in airlock_source_unattributed_changes_total)"
                    );
                }
            }))
        }),
    }
}
