//! Test support for airlock's integration tests: a real PostgreSQL cluster (started
//! by the harness), the real guests built from `guests/`, an airlock host running the
//! real pipeline, and independent readers of the lake (DuckDB, deltalake).
//!
//! Anything missing makes the test fail with the command that installs it; nothing
//! is skipped silently.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;
use tokio::sync::watch;

pub use airlock::demo::Cluster;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// A built guest component from `guests/dist` (`mask`, or `mask-python`, `mask-js`,
/// `mask-c` for the other languages).
pub fn guest(name: &str) -> PathBuf {
    let path = root().join("guests/dist").join(format!("{name}.wasm"));
    let lang = ["python", "js", "c"]
        .into_iter()
        .find(|l| name.ends_with(&format!("-{l}")))
        .unwrap_or("rust");
    assert!(
        path.is_file(),
        "guest {} is not built: run `cargo xtask guests --lang {lang}` (the README's test command builds every language)",
        path.display()
    );
    path
}

/// The `airlock` binary built beside the tests (`cargo xtask test` builds it first).
pub fn airlock_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/release")
        .join("airlock");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build --release --workspace --bins` (the README's test command does)",
        bin.display()
    );
    bin
}

/// A test's temporary directory, removed with everything in it when the guard is
/// dropped (at the end of the test, passed or failed), unless `AIRLOCK_KEEP_TEST_DIRS`
/// is set. Use it as a `&Path`.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// The directory's path, for a caller that needs to own one.
    pub fn path_buf(&self) -> PathBuf {
        self.0.clone()
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("AIRLOCK_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        // Files a test made read-only, or a cluster's data owned by `postgres`: root
        // removes them all the same.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, empty temporary directory for one test, removed when the guard drops.
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("airlock-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    TempDir(dir)
}

/// Starts a throwaway cluster, failing with the install command if PostgreSQL is absent.
pub fn cluster() -> Cluster {
    Cluster::start("").unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"))
}

/// A plugin folder with the given guests as stages `(stage name, guest, settings TOML)`.
pub fn plugin_dir(dir: &Path, stages: &[(&str, &str, &str)]) -> PathBuf {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).expect("create plugin dir");
    for (stage, guest_name, settings) in stages {
        std::fs::copy(guest(guest_name), plugins.join(format!("{stage}.wasm")))
            .expect("copy guest");
        if !settings.is_empty() {
            std::fs::write(plugins.join(format!("{stage}.toml")), settings)
                .expect("write settings");
        }
    }
    plugins
}

/// A running airlock host (the library's `run`, in this process).
pub struct Host {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), airlock::RunError>>,
}

impl Host {
    /// Validates `config_toml` (relative paths from `base`) and starts the pipeline.
    pub fn start(config_toml: &str, base: &Path) -> Host {
        let mut config = airlock::config::Config::from_toml("test.toml", config_toml, base)
            .unwrap_or_else(|e| panic!("{e}"));
        // The state file goes with the test's files, not into the shared `$TMPDIR`.
        if !config_toml.contains("state_dir") {
            config.source.state_dir = base.to_path_buf();
        }
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(airlock::run(config, rx));
        Host { stop, task }
    }

    /// Asks for a graceful shutdown and waits for it.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .context("host did not stop within 60 s")???;
        Ok(())
    }

    /// Stops the host without letting it drain or acknowledge: as if killed.
    pub fn abort(self) {
        self.task.abort();
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits up to 60 s for the host to stop by itself with an error; returns its text.
    pub async fn failure(self) -> Result<String> {
        let start = Instant::now();
        while !self.is_finished() {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "the host did not stop with an error within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match self.stop().await {
            Ok(()) => anyhow::bail!("the host stopped without an error"),
            Err(e) => Ok(format!("{e:#}")),
        }
    }
}

/// Waits up to 60 s until a consumer streams from `slot` (its `active` is true).
pub async fn wait_slot_active(db: &tokio_postgres::Client, slot: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let row = db
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        if row.is_some_and(|r| r.get::<_, bool>(0)) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("slot {slot} not in use within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drops `slot`, retrying for up to 60 s while it is still active (a walsender ends a
/// moment after its client went away).
pub async fn drop_slot(db: &tokio_postgres::Client, slot: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        match db
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Rows of a lake table read by an independent reader (`duckdb` or `deltalake`),
/// in change order.
pub fn read_lake(reader: &str, table: &Path) -> Result<Vec<Json>> {
    run_read_lake(reader, table, None)
}

/// The rows of `query` over a lake table, read by DuckDB's delta extension; the query
/// names the table `lake` (e.g. `SELECT count(*) AS n FROM lake`).
pub fn query_lake(table: &Path, query: &str) -> Result<Vec<Json>> {
    run_read_lake("duckdb-query", table, Some(query))
}

fn run_read_lake(reader: &str, table: &Path, query: Option<&str>) -> Result<Vec<Json>> {
    let script = root().join("tests/tools/read_lake.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(reader)
        .arg(table)
        .args(query)
        .output()
        .context("cannot run python3: install Python 3 (the README's test command sets it up)")?;
    if !out.status.success() {
        bail!(
            "{} {reader} {} failed: {}",
            script.display(),
            table.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line from the reader: {l}")))
        .collect()
}

/// Polls `read_lake` until `done(rows)` holds or `timeout` passes.
pub async fn wait_for_lake(
    table: &Path,
    timeout: Duration,
    done: impl Fn(&[Json]) -> bool,
) -> Result<Vec<Json>> {
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < timeout {
        if table.join("_delta_log").is_dir() {
            last = read_lake("duckdb", table)?;
            if done(&last) {
                return Ok(last);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "lake {} did not reach the expected state within {timeout:?}; last read {} rows: {last:#?}",
        table.display(),
        last.len()
    )
}

/// Lowercase SHA-256 hex of `text`: what the `mask` guest writes.
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out
}
pub mod lake_support;
pub mod pgoutput_fuzz;
pub mod source_support;
pub mod spine_support;

/// A child process (an `airlock` host, a spine), killed and reaped when dropped, so a
/// failing test leaves nothing running.
pub struct HostProcess(pub Child);

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl HostProcess {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Sends `sig` (e.g. `-TERM`, `-HUP`) with `kill`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} failed");
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal("-TERM");
        self.wait_exit(timeout)
            .with_context(|| format!("the process did not stop within {timeout:?} of SIGTERM"))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// Waits up to a minute for `host` to exit, which it must do with a failure (else
/// `why`); returns its log.
pub fn failed(host: &mut HostProcess, log: &Path, why: &str) -> Result<String> {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = host.wait_exit(Duration::from_millis(200)) {
            break status;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "{why}");
    };
    anyhow::ensure!(!status.success(), "airlock exited 0: {why}");
    Ok(std::fs::read_to_string(log)?)
}

/// `airlock run --config CONFIG`, its stderr (the log) to `log`.
pub fn spawn_host(config: &Path, log: &Path) -> HostProcess {
    HostProcess(
        Command::new(airlock_bin())
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("spawn airlock run"),
    )
}

/// A value of `/proc/PID/status` in KiB, e.g. `VmHWM` (peak resident set) or `VmRSS`.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `/status` of the host whose admin API listens on `admin`, through the client
/// `airlock status` uses; `None` while it does not answer.
pub async fn admin_status(admin: &str) -> Option<Json> {
    let args = airlock::cli::AdminArgs {
        config: None,
        admin: admin.to_owned(),
        token: None,
    };
    match airlock::cli::admin_request(&args, reqwest::Method::GET, "/status").await {
        Ok((200, status)) => Some(status),
        _ => None,
    }
}

/// Polls `/status` until `seen` holds; returns that document. The error names `what`
/// and shows the last document seen.
pub async fn wait_status(
    admin: &str,
    timeout: Duration,
    what: &str,
    seen: impl Fn(&Json) -> bool,
) -> Result<Json> {
    let start = Instant::now();
    let mut last = Json::Null;
    while start.elapsed() < timeout {
        if let Some(s) = admin_status(admin).await {
            if seen(&s) {
                return Ok(s);
            }
            last = s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("/status never showed {what} within {timeout:?}; last: {last:#}")
}

/// What `airlock guest test` did: whether it succeeded, its JSON lines, its stderr.
pub struct GuestTestOutcome {
    pub ok: bool,
    pub lines: Vec<Json>,
    pub stderr: String,
}

/// `airlock guest test PLUGIN --setting k=v... < input`.
pub fn guest_test(plugin: &Path, settings: &[&str], input: &[u8]) -> GuestTestOutcome {
    use std::io::Write;
    let mut cmd = Command::new(airlock_bin());
    cmd.args(["guest", "test"]).arg(plugin);
    for s in settings {
        cmd.args(["--setting", s]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn airlock guest test");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    let out = child
        .wait_with_output()
        .expect("wait for airlock guest test");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l}: {e}")))
        .collect();
    GuestTestOutcome {
        ok: out.status.success(),
        lines,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
