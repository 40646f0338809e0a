//! The guest runtime: one wasmtime `Engine` and `Linker` per process, stages loaded
//! from components, each instance in its own sandboxed `Store`.
//!
//! ```text
//! .wasm bytes ──sha256──▶ compile cache (content hash + engine hash) ──▶ Component
//!     ──Linker::instantiate_pre──▶ TransformPre ──▶ Store{limits, epoch deadline} + init(settings)
//! ```
//!
//! Invariants:
//! - Guests get no preopened directories, no environment, no arguments, no sockets,
//!   a frozen wall clock and a deterministic monotonic clock.
//! - Every call runs under an epoch deadline and the store's memory limit, and no
//!   import blocks: a sleep returns at once (see [`super::clocks`]), so the deadline,
//!   which interrupts only guest code, bounds the whole call.
//! - An instance whose call failed (trap or error) is never used again: it is
//!   discarded and a fresh one is built from the pre-instantiated component.
//! - A failed call leaves the batch exactly as it was before the call.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::WasiCtx;

use super::batch::Batch;
use super::clocks::{FrozenClock, SharedClock};
use super::guest::{
    CONTRACT_PACKAGE, CONTRACT_VERSION, Edits, GuestBatch, GuestState, Transform, TransformPre, wit,
};
use super::limiter::GuestLimiter;
use super::names::Names;
use super::output::{GuestOutput, RateLimitedLog, sanitize};

/// How often the epoch advances; deadlines are rounded up to it.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Limits applied to every guest instance.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Linear memory per instance.
    pub memory_bytes: usize,
    /// Wall time allowed for one `init` or `process` call.
    pub deadline: Duration,
    /// Bytes a guest may write into one batch (values, routes, tags, annotations).
    pub output_bytes: usize,
    /// Guest log lines (log import, stdout, stderr) per second before lines are dropped.
    pub log_lines_per_second: u32,
    /// The route and tag names a guest may write.
    pub names: Arc<Names>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_secs(2),
            output_bytes: 64 << 20,
            log_lines_per_second: 50,
            names: Arc::new(Names::default()),
        }
    }
}

/// Why a stage could not be loaded or failed on a batch.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("plugin {path}: {message}")]
    Load { path: String, message: String },
    #[error("guest `{guest}` refused its settings: {message}")]
    Init { guest: String, message: String },
    #[error(
        "guest `{guest}` failed on a batch of {rows} rows (transactions {first_lsn}..{last_lsn}): {message}"
    )]
    Process {
        guest: String,
        rows: usize,
        first_lsn: String,
        last_lsn: String,
        message: String,
    },
    #[error("wasm runtime: {0}")]
    Engine(String),
    /// The responsible stage left a value of its class unwritten: never retried,
    /// never dead-lettered (that would let the raw value out).
    #[error("policy: {0}")]
    Denied(Box<crate::policy::Violation>),
}

/// The process-wide engine and linker.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<GuestState>>,
    cache: Option<CompileCache>,
    pub limits: Limits,
}

/// The compile cache: native code of compiled components, by content hash and engine.
///
/// Loading native code runs it, so an entry is trusted only when it carries a MAC made
/// with the cache's own key over the component's content hash, the engine's
/// compatibility hash and the code itself; the folder must belong to the user airlock
/// runs as and be closed to everyone else. Anything else is refused (the folder) or
/// compiled again (an entry).
#[derive(Clone, Debug)]
struct CompileCache {
    dir: PathBuf,
    key: crate::secrets::Key,
}

/// What an entry's MAC covers first: the format and its version.
const CACHE_MAC_DOMAIN: &[u8] = b"airlock-compile-cache-v1";

impl CompileCache {
    /// Opens (creating it, `0700`) the cache folder `dir` and its key. A folder of
    /// airlock's user that others could use (one made by an older airlock, 0755) is
    /// closed to them and its key replaced, so that nothing put there before counts;
    /// a folder of another user is refused.
    fn open(dir: PathBuf) -> Result<CompileCache, RuntimeError> {
        let refuse = |message: String| {
            RuntimeError::Engine(format!("compile cache {}: {message}", dir.display()))
        };
        crate::private_files::create_dir_all(&dir)
            .map_err(|e| refuse(format!("cannot create it: {e}")))?;
        let meta =
            std::fs::symlink_metadata(&dir).map_err(|e| refuse(format!("cannot read it: {e}")))?;
        if !meta.is_dir() {
            return Err(refuse(
                "is not a directory (a symbolic link?): set [plugins] cache_dir to a private folder"
                    .into(),
            ));
        }
        let key_path = dir.join("cache.key");
        if let Err(problem) = crate::secrets::check_private(&meta, 0o077) {
            let ours = crate::secrets::check_private(&meta, 0).is_ok();
            let closed = ours
                && std::fs::set_permissions(
                    &dir,
                    std::os::unix::fs::PermissionsExt::from_mode(crate::private_files::DIR_MODE),
                )
                .is_ok();
            if !closed {
                return Err(refuse(format!(
                    "{problem}: airlock runs native code from this folder, so it must be \
                     private to its user; `chmod 700` it, or set [plugins] cache_dir to a \
                     private folder"
                )));
            }
            // Whatever others put here (a key, entries) must not count.
            match std::fs::remove_file(&key_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(refuse(format!("cannot replace its key: {e}"))),
            }
            tracing::warn!(
                cache = %dir.display(),
                problem = %problem,
                "the compile cache was open to other users: closed it (0700) and replaced its key; its entries are compiled again"
            );
        }
        let key =
            crate::secrets::Key::load_or_create(&key_path).map_err(|e| refuse(e.to_string()))?;
        Ok(CompileCache { dir, key })
    }

    fn entry(&self, content_hash: &str, engine_hash: u64) -> PathBuf {
        self.dir
            .join(format!("{content_hash}-{engine_hash:016x}.cwasm"))
    }

    fn mac(&self, content_hash: &str, engine_hash: u64, code: &[u8]) -> [u8; 32] {
        self.key.mac(&[
            CACHE_MAC_DOMAIN,
            content_hash.as_bytes(),
            &engine_hash.to_le_bytes(),
            code,
        ])
    }

    /// The cached component, when there is an entry and its MAC verifies.
    fn load(&self, engine: &Engine, content_hash: &str, engine_hash: u64) -> Option<Component> {
        let path = self.entry(content_hash, engine_hash);
        let bytes = std::fs::read(&path).ok()?;
        let Some((tag, code)) = bytes.split_first_chunk::<32>() else {
            tracing::warn!(path = %path.display(), "ignoring a truncated compile cache entry");
            return None;
        };
        if !crate::secrets::constant_time_eq(tag, &self.mac(content_hash, engine_hash, code)) {
            tracing::warn!(
                path = %path.display(),
                "ignoring a compile cache entry that this cache did not write (its MAC does not verify)"
            );
            return None;
        }
        match deserialize_cached(engine, code) {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %error, "ignoring an unreadable compile cache entry");
                None
            }
        }
    }

    /// Stores `component`'s native code with its MAC (atomically, `0600`).
    fn store(&self, component: &Component, content_hash: &str, engine_hash: u64) {
        let path = self.entry(content_hash, engine_hash);
        let code = match component.serialize() {
            Ok(code) => code,
            Err(error) => {
                return tracing::warn!(error = %error, "cannot serialize a compiled component");
            }
        };
        let tag = self.mac(content_hash, engine_hash, &code);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = crate::private_files::create(&tmp).and_then(|mut file| {
            use std::io::Write as _;
            file.write_all(&tag)?;
            file.write_all(&code)
        });
        if written.and_then(|()| std::fs::rename(&tmp, &path)).is_err() {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %path.display(), "cannot write the compile cache entry");
        }
    }
}

impl Runtime {
    /// Creates the engine (epoch interruption on, a ticker thread) and the linker with
    /// the contract's imports and a locked-down WASI.
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> Result<Runtime, RuntimeError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<GuestState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        super::clocks::replace_monotonic_clock(&mut linker, |s: &mut GuestState| {
            super::clocks::ClockView::new(&s.clock, &mut s.table)
        })
        .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        Transform::add_to_linker::<_, HasSelf<GuestState>>(&mut linker, |s| s)
            .and_then(|()| super::guest::borrowed::define(&mut linker))
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("airlock-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticker.increment_epoch();
                }
            })
            .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch thread: {e}")))?;
        let cache = cache_dir.map(CompileCache::open).transpose()?;
        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            cache,
            limits,
        })
    }

    /// A hash that changes whenever compiled code from this engine would not load.
    fn engine_hash(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        hasher.finish()
    }

    /// Compiles (or loads from the cache) a component.
    fn compile(
        &self,
        path: &str,
        wasm: &[u8],
        content_hash: &str,
    ) -> Result<Component, RuntimeError> {
        let load_err = |message: String| RuntimeError::Load {
            path: path.to_owned(),
            message,
        };
        let engine_hash = self.engine_hash();
        if let Some(component) = self
            .cache
            .as_ref()
            .and_then(|cache| cache.load(&self.engine, content_hash, engine_hash))
        {
            return Ok(component);
        }
        if !wasm.starts_with(b"\0asm") {
            return Err(load_err(
                "not a WebAssembly file (no `\\0asm` header): build the guest for wasm32-wasip2"
                    .into(),
            ));
        }
        let component = Component::new(&self.engine, wasm).map_err(|e| {
            let hint = if wasm.len() >= 8 && wasm[4..8] == [1, 0, 0, 0] {
                ": this is a core module, not a component; build it for wasm32-wasip2 (or wrap it with a component adapter)"
            } else {
                ""
            };
            load_err(format!("cannot compile: {e:#}{hint}"))
        })?;
        if let Some(cache) = &self.cache {
            cache.store(&component, content_hash, engine_hash);
        }
        Ok(component)
    }

    /// Loads one stage: compiles, checks the contract version, pre-instantiates,
    /// instantiates once and calls `info` and `init(settings)`.
    pub fn load_stage(
        &self,
        name: &str,
        path: &str,
        wasm: &[u8],
        settings: Vec<(String, String)>,
    ) -> Result<Stage, RuntimeError> {
        let mut settings = settings;
        let when = super::when::When::take(
            &mut settings,
            &Path::new(path).with_extension("toml").display().to_string(),
        )?;
        let content_hash = hex::encode(Sha256::digest(wasm));
        let component = self.compile(path, wasm, &content_hash)?;
        let contract =
            check_contract(&self.engine, &component).map_err(|message| RuntimeError::Load {
                path: path.to_owned(),
                message,
            })?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| RuntimeError::Load {
                path: path.to_owned(),
                message: format!("cannot link: {e:#}"),
            })?;
        let pre = TransformPre::new(pre).map_err(|e| RuntimeError::Load {
            path: path.to_owned(),
            message: format!("does not export the `transform` world ({e:#}): it must export info, init and process"),
        })?;
        let log = Arc::new(RateLimitedLog::new(
            Arc::from(name),
            self.limits.log_lines_per_second,
        ));
        let mut stage = Stage {
            name: name.to_owned(),
            info: wit::PluginInfo {
                name: name.to_owned(),
                version: String::new(),
                description: String::new(),
            },
            content_hash,
            contract,
            when,
            loaded_at: SystemTime::now(),
            settings,
            pre,
            runtime: self.clone(),
            log,
            live: None,
        };
        let mut live = stage.instantiate()?;
        live.store.set_epoch_deadline(ticks(self.limits.deadline));
        stage.info = live
            .bindings
            .call_info(&mut live.store)
            .map_err(|e| RuntimeError::Load {
                path: path.to_owned(),
                message: format!("`info` failed: {e:#}"),
            })?;
        stage.live = Some(live);
        Ok(stage)
    }
}

#[allow(unsafe_code)]
fn deserialize_cached(engine: &Engine, code: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `code` is what `Component::serialize` gave for this engine configuration
    // (the entry's name and MAC cover the engine's compatibility hash): its MAC, made
    // with the cache's private key over the code, verified before this call.
    unsafe { Component::deserialize(engine, code) }
}

/// The contract version a component was built against (the newest `0.1.x` among its
/// imports and exports; `None` when it names no version of the package, as a guest
/// that calls nothing of the batch may). Refuses another minor version, or a patch
/// newer than this host's, naming both.
fn check_contract(engine: &Engine, component: &Component) -> Result<Option<String>, String> {
    let ty = component.component_type();
    let names = ty
        .imports(engine)
        .map(|(n, _)| n.to_owned())
        .chain(ty.exports(engine).map(|(n, _)| n.to_owned()));
    let mut newest: Option<(u64, String)> = None;
    for name in names {
        let Some(rest) = name.strip_prefix(CONTRACT_PACKAGE) else {
            continue;
        };
        let Some((_, version)) = rest.split_once('@') else {
            continue;
        };
        let patch = compatible_patch(version).ok_or_else(|| {
            format!(
                "built for {CONTRACT_PACKAGE}@{version}, but this airlock speaks {CONTRACT_PACKAGE}@{CONTRACT_VERSION} \
                 (and every earlier {}.x): rebuild the guest against the wit/ folder of this airlock release",
                minor(CONTRACT_VERSION)
            )
        })?;
        if newest.as_ref().is_none_or(|(p, _)| patch > *p) {
            newest = Some((patch, version.to_owned()));
        }
    }
    Ok(newest.map(|(_, v)| v))
}

/// `major.minor` of a version.
fn minor(version: &str) -> &str {
    version.rsplit_once('.').map_or(version, |(m, _)| m)
}

/// The patch number of `version` when this host can run a guest built against it:
/// the same `major.minor` as [`CONTRACT_VERSION`] and a patch no newer than its own.
fn compatible_patch(version: &str) -> Option<u64> {
    let (ours_minor, ours_patch) = CONTRACT_VERSION.rsplit_once('.')?;
    let (theirs_minor, theirs_patch) = version.rsplit_once('.')?;
    let (ours_patch, theirs_patch) = (
        ours_patch.parse::<u64>().ok()?,
        theirs_patch.parse::<u64>().ok()?,
    );
    (theirs_minor == ours_minor && theirs_patch <= ours_patch).then_some(theirs_patch)
}

#[cfg(test)]
mod contract_tests {
    use super::*;

    #[test]
    fn earlier_patches_of_the_contract_are_accepted_and_others_refused() {
        assert_eq!(CONTRACT_VERSION, "0.1.1");
        assert_eq!(compatible_patch("0.1.0"), Some(0));
        assert_eq!(compatible_patch("0.1.1"), Some(1));
        assert_eq!(
            compatible_patch("0.1.2"),
            None,
            "a newer patch may call what this host lacks"
        );
        assert_eq!(compatible_patch("0.2.0"), None);
        assert_eq!(compatible_patch("0.0.9"), None);
        assert_eq!(compatible_patch("1.1.0"), None);
        assert_eq!(compatible_patch("0.1.0-rc1"), None);
        assert_eq!(minor("0.1.1"), "0.1");
    }
}

fn ticks(deadline: Duration) -> u64 {
    (deadline.as_millis().div_ceil(EPOCH_TICK.as_millis())).max(1) as u64
}

/// A live instance: its store and typed exports.
struct Live {
    store: Store<GuestState>,
    bindings: Transform,
}

/// One stage of a pipeline: a loaded guest and, when healthy, a live instance.
pub struct Stage {
    /// The file stem in the plugin folder, e.g. `20-mask`.
    pub name: String,
    pub info: wit::PluginInfo,
    /// SHA-256 of the `.wasm`, hex.
    pub content_hash: String,
    /// The contract version the guest was built against, e.g. `0.1.0`; `None` when
    /// its imports name none.
    pub contract: Option<String>,
    /// The rows it applies to (`[when]` in its settings); `None`: every row.
    pub when: Option<super::when::When>,
    pub loaded_at: SystemTime,
    settings: Vec<(String, String)>,
    pre: TransformPre<GuestState>,
    runtime: Runtime,
    log: Arc<RateLimitedLog>,
    live: Option<Live>,
}

impl Stage {
    /// A fresh, initialised instance in a new sandboxed store.
    fn instantiate(&self) -> Result<Live, RuntimeError> {
        let limits = &self.runtime.limits;
        let clock = SharedClock::default();
        let mut wasi = WasiCtx::builder();
        wasi.stdout(GuestOutput::new(self.log.clone(), tracing::Level::INFO))
            .stderr(GuestOutput::new(self.log.clone(), tracing::Level::WARN))
            .wall_clock(FrozenClock)
            .monotonic_clock(clock.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let state = GuestState {
            wasi: wasi.build(),
            clock,
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(super::limiter::RESOURCES);
                table
            },
            limits: GuestLimiter::new(limits.memory_bytes),
            log: self.log.clone(),
            names: limits.names.clone(),
        };
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(limits.deadline));
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| RuntimeError::Init {
                guest: self.name.clone(),
                message: format!("cannot instantiate: {e:#}"),
            })?;
        store.set_epoch_deadline(ticks(limits.deadline));
        match bindings.call_init(&mut store, &self.settings) {
            Ok(Ok(())) => Ok(Live { store, bindings }),
            Ok(Err(message)) => Err(RuntimeError::Init {
                guest: self.name.clone(),
                message: sanitize(&message),
            }),
            Err(e) => Err(RuntimeError::Init {
                guest: self.name.clone(),
                message: format!("`init` trapped: {}", describe_trap(&e, limits)),
            }),
        }
    }

    /// Runs the guest on `batch`, returning it with the call's [`Edits`] (what undoes
    /// them). On failure the instance is discarded and the batch retried once, as it
    /// came in, on a fresh instance; a second failure returns the batch unchanged
    /// together with the error.
    pub fn process(&mut self, mut batch: Batch) -> Result<(Batch, Edits), (Batch, RuntimeError)> {
        let Some(when) = &self.when else {
            return self.process_all(batch);
        };
        let rows = when.rows(&batch);
        if rows.is_empty() {
            return Ok((batch, Edits::default()));
        }
        if rows.len() == batch.rows.len() {
            return self.process_all(batch);
        }
        let (sub, lent) = super::when::lend(&mut batch, rows);
        match self.process_all(sub) {
            Ok((sub, edits)) => {
                let edits = lent.give_back(&mut batch, sub, Some(edits));
                Ok((batch, edits.unwrap_or_default()))
            }
            Err((sub, error)) => {
                lent.give_back(&mut batch, sub, None);
                Err((batch, error))
            }
        }
    }

    /// [`Stage::process`] on every row of the batch.
    fn process_all(&mut self, mut batch: Batch) -> Result<(Batch, Edits), (Batch, RuntimeError)> {
        let mut last_error = String::new();
        for attempt in 0..2 {
            let mut live = match self.live.take() {
                Some(live) => live,
                None => match self.instantiate() {
                    Ok(live) => live,
                    Err(e) => {
                        last_error = e.to_string();
                        continue;
                    }
                },
            };
            live.store
                .set_epoch_deadline(ticks(self.runtime.limits.deadline));
            let resource = match live
                .store
                .data_mut()
                .table
                .push(GuestBatch::new(batch, self.runtime.limits.output_bytes))
            {
                Ok(r) => r,
                Err(e) => unreachable_table(e),
            };
            let rep = resource.rep();
            let outcome = live.bindings.call_process(
                &mut live.store,
                wasmtime::component::Resource::new_borrow(rep),
            );
            let lent = match live.store.data_mut().table.delete(resource) {
                Ok(lent) => lent,
                Err(e) => unreachable_table(e),
            };
            match outcome {
                Ok(Ok(())) => {
                    self.live = Some(live);
                    return Ok(lent.commit());
                }
                Ok(Err(message)) => {
                    batch = lent.rollback();
                    last_error = format!("returned an error: {}", sanitize(&message));
                }
                Err(trap) => {
                    batch = lent.rollback();
                    last_error = format!("trapped: {}", describe_trap(&trap, &self.runtime.limits));
                }
            }
            // The instance is poisoned (or its state suspect): drop it, rebuild on retry.
            drop(live);
            if attempt == 0 {
                tracing::warn!(guest = %self.name, error = %last_error, "guest failed a batch; retrying once on a fresh instance");
            }
        }
        let first = batch
            .txns
            .first()
            .map(|t| t.commit_lsn.to_string())
            .unwrap_or_default();
        let last = batch
            .txns
            .last()
            .map(|t| t.commit_lsn.to_string())
            .unwrap_or_default();
        let rows = batch.rows.len();
        Err((
            batch,
            RuntimeError::Process {
                guest: self.name.clone(),
                rows,
                first_lsn: first,
                last_lsn: last,
                message: last_error,
            },
        ))
    }
}

fn unreachable_table(e: wasmtime::component::ResourceTableError) -> ! {
    // The table is private to the store and only ever holds the one batch we lend.
    panic!("guest resource table inconsistent: {e}")
}

/// Turns a trap into a sentence an operator can act on.
fn describe_trap(error: &wasmtime::Error, limits: &Limits) -> String {
    if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
        match trap {
            wasmtime::Trap::Interrupt => {
                return format!(
                    "exceeded its deadline of {:?} per call (an endless loop? raise [plugins.limits] deadline_ms if not)",
                    limits.deadline
                );
            }
            wasmtime::Trap::UnreachableCodeReached => {
                return format!("hit `unreachable` (a panic or abort in the guest): {error:#}");
            }
            _ => {}
        }
    }
    let text = format!("{error:#}");
    if text.contains("forcing trap when growing memory")
        || text.contains("memory") && text.contains("limit")
    {
        return format!(
            "exceeded its memory limit of {} MiB (raise [plugins.limits] memory_mib if this is expected): {text}",
            limits.memory_bytes >> 20
        );
    }
    text
}
