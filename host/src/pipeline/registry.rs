//! The plugin registry: notices changes to the plugin folder, builds the whole new
//! pipeline off the hot path, and hands it to the worker, which swaps it in between
//! two batches (a transaction boundary).
//!
//! ```text
//! folder poll (debounced) ─┐
//! SIGHUP ──────────────────┼──▶ reload: scan → require check → compile/instantiate/init ──▶ swap slot
//! POST /reload ────────────┘                     │ failure: log, /status, spine event; the running pipeline stays
//!                                                ▼
//!                              worker: `if let Some(next) = slot.take() { pipeline = next }`
//! ```
//!
//! Invariants:
//! - Nothing on the hot path waits for a reload: the worker only takes a ready pipeline.
//! - A file is loaded only after its size and modification time held still for one
//!   poll interval, so a half-copied `.wasm` is never picked up; if one slips through,
//!   it fails to compile and the running pipeline stays.
//! - A reload that would remove a stage named in `require`, or replace a stage pinned
//!   there (`NAME@sha256:HEX`) by other content, is refused (fail closed).
//! - A failed reload changes nothing that runs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::runtime::{Runtime, RuntimeError};
use super::{Pipeline, PluginFile, scan};
use crate::backoff::Backoff;
use crate::status::Status;

/// A stage that must be in every pipeline (`[plugins] require`): by name, or by name
/// and content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequiredStage {
    /// The stage's file stem, e.g. `30-mask`.
    pub name: String,
    /// The SHA-256 of the stage's `.wasm`, lowercase hex, when the entry pins it.
    pub sha256: Option<String>,
    /// The stage must run before every other: `[policy]` makes it responsible for
    /// classes whose raw values no other stage may see.
    pub first: bool,
}

impl RequiredStage {
    /// The separator between a stage's name and its pinned hash in `require`.
    pub const PIN: &'static str = "@sha256:";

    /// Parses `NAME` or `NAME@sha256:HEX` (64 hex digits, either case).
    pub fn parse(entry: &str) -> Result<RequiredStage, String> {
        let expected = "expected a stage name (a file stem such as `30-mask`), optionally pinned \
                        to its content as `30-mask@sha256:` and the 64 hex digits of its SHA-256 \
                        (`airlock check` prints them)";
        let (name, sha256) = match entry.split_once(Self::PIN) {
            None => (entry, None),
            Some((name, hex)) => {
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "found `{entry}`: the pinned hash is not 64 hex digits; {expected}"
                    ));
                }
                (name, Some(hex.to_ascii_lowercase()))
            }
        };
        if name.is_empty() || name.contains(['/', '\\', '@']) {
            return Err(format!("found `{entry}`, {expected}"));
        }
        Ok(RequiredStage {
            name: name.to_owned(),
            sha256,
            first: false,
        })
    }
}

impl std::fmt::Display for RequiredStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sha256 {
            None => f.write_str(&self.name),
            Some(hex) => write!(f, "{}{}{hex}", self.name, Self::PIN),
        }
    }
}

/// How often the folder is looked at when `watch` is on.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The pipeline the worker should switch to at its next batch boundary.
#[derive(Clone, Default)]
pub struct SwapSlot(Arc<Mutex<Option<Pipeline>>>);

impl SwapSlot {
    /// Offers a pipeline to the worker, replacing one it has not taken yet.
    pub fn offer(&self, pipeline: Pipeline) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(pipeline);
    }

    /// Takes the offered pipeline, if any.
    pub fn take(&self) -> Option<Pipeline> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Why a reload was asked for, and where to send its outcome.
pub struct ReloadRequest {
    pub reason: &'static str,
    pub reply: Option<oneshot::Sender<Result<String, String>>>,
}

/// A sender of reload requests (SIGHUP handler, admin API), bounded by
/// [`RELOAD_QUEUE`]: a queued reload already picks up the folder's latest state, so a
/// full queue loses nothing.
pub type ReloadTrigger = mpsc::Sender<ReloadRequest>;

/// Reload requests that may wait at once.
pub const RELOAD_QUEUE: usize = 4;

/// What the folder looked like: names, sizes and modification times.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint(Vec<(String, u64, Option<SystemTime>)>);

fn fingerprint(dir: &std::path::Path) -> Fingerprint {
    let mut entries: Vec<(String, u64, Option<SystemTime>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            let p = e.path();
            p.extension().is_some_and(|x| x == "wasm" || x == "toml")
        })
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    entries.sort();
    Fingerprint(entries)
}

/// Tells the audit spines about failed reloads: an event of kind `other` whose
/// payload says what was refused and why, and which pipeline version keeps running.
/// Sent in the background and retried with backoff for about ten minutes.
#[derive(Clone, Default)]
pub struct ReloadNotifier {
    /// `(spine client, event source)` per `http` sink.
    pub spines: Vec<(Arc<crate::spine::client::SpineClient>, String)>,
}

impl ReloadNotifier {
    fn reload_failed(&self, reason: &str, error: &str, running: &str) {
        for (client, source) in &self.spines {
            let event = serde_json::json!({
                "kind": "other",
                "source": source,
                "payload": {
                    "event": "pipeline_reload_failed",
                    "reason": reason,
                    "error": error,
                    "running_pipeline": running,
                },
                "timestamp": chrono::Utc::now().to_rfc3339(),
            });
            let client = client.clone();
            tokio::spawn(async move {
                let body = event.to_string();
                let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(60));
                for _ in 0..20 {
                    match client.publish(body.clone()).await {
                        Ok(_) => return,
                        Err(e) if e.is_transient() => {
                            tokio::time::sleep(backoff.next_delay()).await
                        }
                        Err(e) => {
                            tracing::error!(spine = client.shown_url(), error = %e, "the spine refused the reload-failure event");
                            return;
                        }
                    }
                }
                tracing::error!(
                    spine = client.shown_url(),
                    "could not tell the spine about a failed reload"
                );
            });
        }
    }
}

/// Checks that every required stage is present among `files` (by name; the pinned
/// hashes are checked on what was loaded, by [`check_pins`]).
pub fn check_required(files: &[PluginFile], require: &[RequiredStage]) -> Result<(), String> {
    let missing: Vec<&str> = require
        .iter()
        .filter(|r| !files.iter().any(|f| f.name == r.name))
        .map(|r| r.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "required stage{} {} missing from the plugin folder ([plugins] require): refusing to run without {}",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            if missing.len() == 1 { "it" } else { "them" }
        ));
    }
    for r in require.iter().filter(|r| r.first) {
        let before: Vec<&str> = files
            .iter()
            .take_while(|f| f.name != r.name)
            .map(|f| f.name.as_str())
            .collect();
        if !before.is_empty() {
            return Err(format!(
                "stage{} {} would run before `{}`, which [policy] makes responsible for raw values no other stage may see: \
                 refusing to run (rename the files so that `{}` sorts first in the plugin folder)",
                if before.len() == 1 { "" } else { "s" },
                before
                    .iter()
                    .map(|b| format!("`{b}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.name,
                r.name
            ));
        }
    }
    Ok(())
}

/// Checks that every stage pinned in `require` has the pinned content: the SHA-256
/// of the bytes that were compiled, not of a file read again later.
///
/// A stage the policy makes responsible for raw values (`first`) may not have a
/// `[when]`: rows it skipped would reach the sinks unmasked (the custody check would
/// then deny every such batch at run time).
pub fn check_pins(pipeline: &Pipeline, require: &[RequiredStage]) -> Result<(), String> {
    for r in require.iter().filter(|r| r.first) {
        if let Some(when) = pipeline
            .stages
            .iter()
            .find(|s| s.name == r.name)
            .and_then(|s| s.when.as_ref())
        {
            return Err(format!(
                "stage `{}` is responsible for raw values ([policy]), but its `[when]` ({}) would skip the rows \
                 it does not name, leaving their values unmasked: refusing to run (remove `[when]` from {}.toml)",
                r.name,
                when.describe(),
                r.name
            ));
        }
    }
    let wrong: Vec<String> = require
        .iter()
        .filter_map(|r| {
            let pinned = r.sha256.as_deref()?;
            let stage = pipeline.stages.iter().find(|s| s.name == r.name)?;
            (stage.content_hash != pinned).then(|| {
                format!(
                    "stage {} is not the pinned guest: its sha256 is {}, [plugins] require pins {}",
                    r.name, stage.content_hash, pinned
                )
            })
        })
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: refusing to run it (put the pinned build back, or pin the new one in [plugins] require)",
            wrong.join("; ")
        ))
    }
}

/// Builds a complete pipeline from the folder, or says why not.
pub fn build(
    runtime: &Runtime,
    dir: &std::path::Path,
    require: &[RequiredStage],
) -> Result<Pipeline, String> {
    let files = scan(dir).map_err(|e| e.to_string())?;
    check_required(&files, require)?;
    let pipeline = Pipeline::load(runtime, &files, &[]).map_err(|errors: Vec<RuntimeError>| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    check_pins(&pipeline, require)?;
    Ok(pipeline)
}

/// Watches the folder and serves reload requests until `requests` closes.
#[allow(clippy::too_many_arguments)] // each is a separate handle the app owns
pub async fn run(
    runtime: Runtime,
    dir: PathBuf,
    require: Vec<RequiredStage>,
    watch: bool,
    slot: SwapSlot,
    status: Arc<Status>,
    notifier: ReloadNotifier,
    mut requests: mpsc::Receiver<ReloadRequest>,
) {
    let mut seen = fingerprint(&dir);
    let mut running = String::new();
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let request = tokio::select! {
            request = requests.recv() => match request {
                Some(r) => r,
                None => return,
            },
            _ = ticker.tick(), if watch => {
                let now = fingerprint(&dir);
                if now == seen {
                    continue;
                }
                // Debounce: wait until the folder holds still for one interval.
                tokio::time::sleep(POLL_INTERVAL).await;
                let settled = fingerprint(&dir);
                if settled != now {
                    continue;
                }
                seen = settled;
                ReloadRequest { reason: "plugin folder changed", reply: None }
            }
        };
        let (runtime, dir2, require2) = (runtime.clone(), dir.clone(), require.clone());
        let started = std::time::Instant::now();
        let built = tokio::task::spawn_blocking(move || build(&runtime, &dir2, &require2))
            .await
            .unwrap_or_else(|e| Err(format!("the reload task panicked: {e}")));
        let outcome = match built {
            Ok(pipeline) => {
                let version = pipeline.version.to_string();
                tracing::info!(
                    reason = request.reason,
                    version = %version,
                    stages = ?pipeline.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
                    took = ?started.elapsed(),
                    "new pipeline ready; swapping at the next transaction boundary"
                );
                slot.offer(pipeline);
                status.reload_succeeded(request.reason, &version);
                running = version.clone();
                Ok(version)
            }
            Err(error) => {
                tracing::error!(reason = request.reason, error = %error, "reload failed; the running pipeline stays");
                status.reload_failed(request.reason, &error);
                let current = if running.is_empty() {
                    status.pipeline_version()
                } else {
                    running.clone()
                };
                notifier.reload_failed(request.reason, &error, &current);
                Err(error)
            }
        };
        if let Some(reply) = request.reply {
            let _ = reply.send(outcome);
        }
    }
}
