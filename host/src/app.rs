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
//! A sink task or the pipeline thread that panics ends the run with an error naming
//! it; what it had not made durable was never acknowledged.
//!
//! [`run`] reads as the diagram: open the source's settings, load the pipeline, start
//! reloads, serve the admin API, open the sinks (with the checkpoint tracker), start
//! the pipeline thread, watch the slot, stream, wind down.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};

use crate::change::Lsn;
use crate::checkpoint::Tracker;
use crate::config::{Config, SinkConfig, SinkKind};
use crate::pipeline::batch::Batch;
use crate::pipeline::registry::{self, ReloadRequest, SwapSlot};
use crate::pipeline::runtime::{Runtime, RuntimeError};
use crate::pipeline::{self, Worker};
use crate::sink::lake::{Compactors, LakeSettings, LakeSink};
use crate::sink::spine::{SpineSettings, SpineSink};
use crate::sink::{self, SinkError};
use crate::source::{self, Held, SourceError, SourceSettings};
use crate::status::{self, Status, lsn_text};

/// Why the main job stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the plugin folder could not be loaded: {0}")]
    Plugins(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("admin API: cannot listen on {addr}: {error} (set [admin] listen to a free address)")]
    Admin { addr: String, error: std::io::Error },
    #[error("{0}")]
    Internal(String),
}

/// Bytes of transactions (or parts of large ones) that may wait for the guests
/// between the source and the pipeline (see [`pipeline::inflow`]).
const SOURCE_QUEUE_BYTES: usize = 16 << 20;
/// Depth of the tap in front of it, which only records commit times for the lag.
const TAP_CHANNEL: usize = 4;
/// Channel depth between the pipeline and each sink, in batches.
const SINK_CHANNEL: usize = 8;
/// How often the slot's health is read from PostgreSQL.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

type SinkTask = tokio::task::JoinHandle<Result<(), SinkError>>;

async fn open_sink(
    config: &Config,
    sink: &SinkConfig,
    rx: mpsc::Receiver<Arc<Batch>>,
    durable: watch::Sender<Lsn>,
    compactors: &Compactors,
    status: &Arc<Status>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(SinkTask, Option<Held>), SinkError> {
    match sink.kind {
        SinkKind::Delta => {
            let lake = LakeSink::open(LakeSettings::from_config(config, sink)).await?;
            let held = held_by(&lake, &sink.name, status, shutdown.clone()).await?;
            compactors.register(lake.handle()); // lake: `POST /compact`
            let task = tokio::spawn(sink::drive_observed(
                lake,
                rx,
                durable,
                Some(status.clone()),
            ));
            Ok((task, held))
        }
        SinkKind::Http => {
            let mut settings = SpineSettings::new(sink.name.clone(), sink.url.clone());
            settings.routes = sink.routes.clone();
            settings.token = sink.spine.token.clone();
            if let Some(kinds) = &sink.spine.kinds {
                settings.kinds = kinds.clone();
            }
            settings.default_kind = sink.spine.default_kind.clone();
            settings.default_source = sink.spine.default_source.clone();
            settings.watch = sink.spine.watch.clone();
            settings.flush_interval = sink.flush_interval;
            settings.max_events = sink.max_rows;
            settings.request_timeout = sink.spine.request_timeout;
            settings.dead_letter_dir = sink.spine.dead_letter_dir.clone();
            settings.slot = config.source.slot.clone();
            let key_file = sink.spine.key_file.clone();
            let key =
                tokio::task::spawn_blocking(move || crate::secrets::Key::load_or_create(&key_file))
                    .await
                    .map_err(|e| SinkError::Definite {
                        sink: sink.name.clone(),
                        message: format!("reading the spine key panicked: {e}"),
                    })?;
            settings.key = Some(key.map_err(|e| SinkError::Definite {
                sink: sink.name.clone(),
                message: e.to_string(),
            })?);
            let spine = SpineSink::open(settings).await?;
            let task = tokio::spawn(sink::drive_observed(
                spine,
                rx,
                durable,
                Some(status.clone()),
            ));
            Ok((task, None))
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
    let mut backoff = Duration::from_millis(100);
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
                tracing::warn!(sink, %error, retry_in = ?backoff, "cannot read what the lake holds; streaming starts once it answers");
                status.update_sink(sink, |v| {
                    v.last_error = Some(error.to_string());
                    v.retrying = true;
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Err(error),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Commit times of transactions handed to the sinks but not yet durable everywhere:
/// the lag in seconds is the age of the oldest.
#[derive(Clone, Default)]
struct InFlight(Arc<Mutex<VecDeque<(Lsn, i64)>>>);

impl InFlight {
    fn push(&self, end: Lsn, commit_ts: i64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((end, commit_ts));
    }

    /// Drops what is durable; returns the commit time of the oldest still in flight.
    fn oldest_after(&self, durable: Lsn) -> Option<i64> {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while q.front().is_some_and(|(end, _)| *end <= durable) {
            q.pop_front();
        }
        q.front().map(|(_, ts)| *ts)
    }
}

/// How long one read of the slot's health may take before it counts as failed.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Clears the figures read from the slot, which are not known now, and says why.
fn clear_slot_figures(status: &Status, health: &str, error: String) {
    status.update_source(|s| {
        s.current_wal_lsn = None;
        s.restart_lsn = None;
        s.wal_status = None;
        s.safe_wal_size = None;
        s.lag_bytes = None;
        s.slot_active = None;
        s.slot_health = Some(health.to_owned());
        s.slot_health_error = Some(error);
    });
    status.metrics.remove(status::LAG_BYTES, &[]);
}

/// Reads the slot's position and WAL retention from PostgreSQL for `/status` and
/// metrics. When PostgreSQL cannot be read, the figures are cleared and
/// `slot_health` says `unknown` with the cause: a lag of 0 is never shown for a
/// slot that could not be looked at.
async fn monitor_slot(
    config: source::protocol::ConnectConfig,
    slot: String,
    status: Arc<Status>,
    durable: watch::Receiver<Lsn>,
    in_flight: InFlight,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        let read = read_slot(&config, &slot, &mut client, &status).await;
        if let Err(cause) = &read {
            tracing::debug!(error = %cause, "slot monitor cannot read the slot");
            clear_slot_figures(&status, "unknown", cause.clone());
            // Without the slot's view, the in-flight lag is not shown either.
            status.update_source(|s| s.lag_seconds = None);
            status.metrics.remove(status::LAG_SECONDS, &[]);
        }
        let durable_now = *durable.borrow();
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let lag_seconds = in_flight
            .oldest_after(durable_now)
            .map_or(0.0, |ts| ((now_us - ts) as f64 / 1e6).max(0.0));
        let known = read.is_ok();
        status.update_source(|s| {
            if known {
                s.lag_seconds = Some(lag_seconds);
            }
            if let Some(text) = lsn_text(durable_now) {
                s.confirmed_lsn.get_or_insert(text);
            }
        });
        if known {
            status.metrics.set(status::LAG_SECONDS, &[], lag_seconds);
        }
        status
            .metrics
            .set(status::CONFIRMED_LSN, &[], durable_now.0 as f64);
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One read of the slot's health into `status`; the error says why it failed.
async fn read_slot(
    config: &source::protocol::ConnectConfig,
    slot: &str,
    client: &mut Option<tokio_postgres::Client>,
    status: &Status,
) -> Result<(), String> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = None;
        let (c, connection) = tokio::time::timeout(HEALTH_TIMEOUT, config.connect_sql())
            .await
            .map_err(|_| {
                format!(
                    "connecting to PostgreSQL at {} timed out after {HEALTH_TIMEOUT:?}",
                    config.addr()
                )
            })?
            .map_err(|e| format!("cannot connect to PostgreSQL at {}: {e}", config.addr()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *client = Some(c);
    }
    let c = client.as_ref().expect("connected above");
    let query = "SELECT pg_current_wal_lsn()::text, s.confirmed_flush_lsn::text, s.restart_lsn::text, \
                 s.wal_status, s.safe_wal_size, s.active, \
                 (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8 \
                 FROM pg_replication_slots s WHERE s.slot_name = $1";
    let row = match tokio::time::timeout(HEALTH_TIMEOUT, c.query_opt(query, &[&slot])).await {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => {
            *client = None;
            return Err(format!(
                "reading pg_replication_slots at {} failed: {e}",
                config.addr()
            ));
        }
        Err(_) => {
            *client = None;
            return Err(format!(
                "reading pg_replication_slots at {} timed out after {HEALTH_TIMEOUT:?}",
                config.addr()
            ));
        }
    };
    let Some(row) = row else {
        clear_slot_figures(
            status,
            "missing",
            format!("no replication slot `{slot}` in pg_replication_slots"),
        );
        return Ok(());
    };
    let lag: Option<i64> = row.get(6);
    let active: bool = row.get(5);
    status.update_source(|s| {
        s.current_wal_lsn = row.get(0);
        s.confirmed_lsn = row.get(1);
        s.restart_lsn = row.get(2);
        s.wal_status = row.get(3);
        s.safe_wal_size = row.get(4);
        s.lag_bytes = lag.map(|l| l.max(0) as u64);
        s.slot_active = Some(active);
        s.slot_health = Some("ok".into());
        s.slot_health_error = None;
    });
    if active {
        status.set_ready(true);
    }
    match lag {
        Some(lag) => status
            .metrics
            .set(status::LAG_BYTES, &[], lag.max(0) as f64),
        None => status.metrics.remove(status::LAG_BYTES, &[]),
    }
    Ok(())
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
/// definite error stops it.
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
    let slot = SwapSlot::default();
    let reloads = start_reloads(&config, &runtime, &slot, &status)?;
    let compactors = Compactors::default(); // the lake sinks', for `POST /compact`
    let admin = serve_admin(&config, &status, &reloads, &compactors, &shutdown).await?;
    let sinks = open_sinks(&config, &status, &compactors, &shutdown).await?;
    let flow = start_pipeline(pipeline, slot, &status, &config, sinks.inputs)?;
    let monitor = tokio::spawn(monitor_slot(
        connect.clone(),
        config.source.slot.clone(),
        status.clone(),
        sinks.durable.clone(),
        flow.in_flight.clone(),
        shutdown.clone(),
    ));
    let settings = source_settings(&config, connect, &status, sinks.held);
    let source = tokio::spawn(source::run(
        settings,
        flow.transactions,
        sinks.durable,
        shutdown,
    ));
    let result = wind_down(source, flow.tap, flow.worker, sinks.tasks, &status).await;
    for task in [
        sinks.tracker,
        reloads.registry,
        reloads.hup,
        monitor.abort_handle(),
        admin.task,
    ] {
        task.abort();
    }
    tracing::debug!("run: background tasks stopped");
    drop(admin.local_token);
    if result.is_ok() {
        tracing::info!("stopped cleanly");
    }
    result
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
    registry: tokio::task::AbortHandle,
    hup: tokio::task::AbortHandle,
}

fn start_reloads(
    config: &Config,
    runtime: &Runtime,
    slot: &SwapSlot,
    status: &Arc<Status>,
) -> Result<Reloads, RunError> {
    let (requests, reload_rx) = mpsc::channel::<ReloadRequest>(registry::RELOAD_QUEUE);
    let mut notifier = registry::ReloadNotifier::default();
    for sink in config.sinks.iter().filter(|s| s.kind == SinkKind::Http) {
        let client = crate::sink::spine::SpineClient::new(
            &sink.name,
            &sink.url,
            sink.spine.token.clone(),
            sink.spine.request_timeout,
        )?;
        notifier
            .spines
            .push((Arc::new(client), sink.spine.default_source.clone()));
    }
    let registry = tokio::spawn(registry::run(
        runtime.clone(),
        config.plugins.dir.clone(),
        config.plugins.require.clone(),
        config.plugins.watch,
        slot.clone(),
        status.clone(),
        notifier,
        reload_rx,
    ));
    let hup_tx = requests.clone();
    let hup = tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            match hup_tx.try_send(ReloadRequest {
                reason: "SIGHUP",
                reply: None,
            }) {
                // A full queue already holds reloads that will see the folder as it is.
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    });
    Ok(Reloads {
        requests,
        registry: registry.abort_handle(),
        hup: hup.abort_handle(),
    })
}

/// The admin API while it serves, and the per-run token file it removes when dropped.
struct Admin {
    task: tokio::task::AbortHandle,
    local_token: Option<crate::admin::LocalTokenFile>,
}

async fn serve_admin(
    config: &Config,
    status: &Arc<Status>,
    reloads: &Reloads,
    compactors: &Compactors,
    shutdown: &watch::Receiver<bool>,
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
        reload: reloads.requests.clone(),
        token: config.admin.token.as_deref().map(Arc::from),
        control_token,
        compactors: compactors.clone(),
    };
    let mut stop = shutdown.clone();
    let task = tokio::spawn(crate::admin::serve(listener, state, async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    Ok(Admin {
        task: task.abort_handle(),
        local_token,
    })
}

/// The sinks, open, with the checkpoint tracker over them.
struct Sinks {
    /// One input per sink, in configuration order.
    inputs: Vec<mpsc::Sender<Arc<Batch>>>,
    tasks: Vec<(String, SinkTask)>,
    /// The LSN every sink has made durable.
    durable: watch::Receiver<Lsn>,
    tracker: tokio::task::AbortHandle,
    /// The latest changes any sink holds from an earlier run (see [`Held`]).
    held: Option<Held>,
}

async fn open_sinks(
    config: &Config,
    status: &Arc<Status>,
    compactors: &Compactors,
    shutdown: &watch::Receiver<bool>,
) -> Result<Sinks, RunError> {
    let (mut tracker, durable) = Tracker::new();
    let mut inputs = Vec::new();
    let mut tasks = Vec::new();
    let mut held: Option<Held> = None;
    for sink in &config.sinks {
        let (tx, rx) = mpsc::channel(SINK_CHANNEL);
        inputs.push(tx);
        let sink_durable = tracker.register();
        let mut watch_durable = sink_durable.subscribe();
        let (name, st) = (sink.name.clone(), status.clone());
        status.update_sink(&sink.name, |v| {
            v.kind = format!("{:?}", sink.kind).to_lowercase();
            v.url = crate::secrets::redact_url(&sink.url);
            v.routes = sink.routes.clone();
        });
        tokio::spawn(async move {
            while watch_durable.changed().await.is_ok() {
                let lsn = *watch_durable.borrow();
                st.update_sink(&name, |v| v.durable_lsn = lsn_text(lsn));
                st.metrics
                    .set(status::SINK_DURABLE_LSN, &[("sink", &name)], lsn.0 as f64);
            }
        });
        let (task, held_here) =
            open_sink(config, sink, rx, sink_durable, compactors, status, shutdown).await?;
        tasks.push((sink.name.clone(), task));
        if held_here.as_ref().map(|h| h.through) > held.as_ref().map(|h| h.through) {
            held = held_here;
        }
    }
    let tracker = tokio::spawn(tracker.run()).abort_handle();
    Ok(Sinks {
        inputs,
        tasks,
        durable,
        tracker,
        held,
    })
}

/// The pipeline thread, fed through a tap that remembers commit times for the lag.
struct Flow {
    /// Where the source sends transactions.
    transactions: mpsc::Sender<crate::change::Transaction>,
    tap: tokio::task::JoinHandle<()>,
    /// The pipeline thread's result, when it ends (dropped unsent if it panics).
    worker: tokio::sync::oneshot::Receiver<Result<(), RuntimeError>>,
    in_flight: InFlight,
}

fn start_pipeline(
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
    let tap = tokio::spawn(async move {
        while let Some(txn) = tap_rx.recv().await {
            if txn.meta.completes() {
                tap_in_flight.push(txn.meta.end_lsn, txn.meta.commit_ts);
            }
            if worker_tx.send(txn).await.is_err() {
                return;
            }
        }
    });
    let worker = Worker::new(
        pipeline,
        slot,
        status.clone(),
        config.plugins.on_error.clone(),
    );
    let (done_tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("airlock-pipeline".into())
        .spawn(move || {
            let result = pipeline::run_worker(worker, worker_rx, sinks);
            let _ = done_tx.send(result);
        })
        .map_err(|e| RunError::Internal(format!("cannot start the pipeline thread: {e}")))?;
    Ok(Flow {
        transactions,
        tap,
        worker: done,
        in_flight,
    })
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
            source::snapshot::SnapshotObserver(Arc::new(move |progress| {
                status.set_snapshot(progress)
            }))
        }),
        on_state: Some({
            let status = status.clone(); // the source's state and retries in `/status`
            source::StateObserver(Arc::new(move |state| source_state(&status, state)))
        }),
        held,
    }
}

/// The source ends first (shutdown or error); then the pipeline drains, then the
/// sinks flush. A part that panicked stops the run with an error naming it (nothing
/// it had not made durable was acknowledged), before the others' errors.
async fn wind_down(
    source: tokio::task::JoinHandle<Result<(), SourceError>>,
    tap: tokio::task::JoinHandle<()>,
    worker: tokio::sync::oneshot::Receiver<Result<(), RuntimeError>>,
    sinks: Vec<(String, SinkTask)>,
    status: &Status,
) -> Result<(), RunError> {
    let source_result = source
        .await
        .map_err(|e| RunError::Internal(format!("source task panicked: {e}")))?;
    if let Err(e) = &source_result {
        status.error("source", &e.to_string());
    }
    status.update_source(|s| s.state = "stopped".into());
    let _ = tap.await;
    tracing::info!("source stopped; draining the pipeline");
    let worker_result = match worker.await {
        Ok(result) => result.map_err(RunError::from),
        Err(_) => Err(RunError::Internal(
            "the pipeline thread panicked (see the log above)".into(),
        )),
    };
    tracing::info!("pipeline drained; flushing sinks");
    let mut sink_error = None;
    for (name, task) in sinks {
        let error = match task.await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => {
                tracing::error!(sink = %name, error = %e, "sink stopped");
                RunError::from(e)
            }
            Err(e) => {
                tracing::error!(sink = %name, error = %e, "sink task panicked");
                RunError::Internal(format!("sink `{name}` panicked: {e}"))
            }
        };
        sink_error.get_or_insert(error);
    }
    tracing::info!("sinks flushed");
    if let Some(e) = sink_error {
        return Err(e);
    }
    worker_result?;
    source_result?;
    Ok(())
}
