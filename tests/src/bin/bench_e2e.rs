//! airlock end to end beside its references, on one throwaway PostgreSQL cluster:
//!
//! - **drain**: a backlog of `--rows` rows (10 columns of mixed types, transactions of
//!   `--txn-rows`) read by `pg_recvlogical` (pgoutput, to /dev/null, up to the end LSN)
//!   and by the real `airlock run` with the four example guests into a Delta lake. Both
//!   slots are created before the backlog is written, so both read the same WAL.
//! - **latency**: a paced writer at `--rate` rows/s for `--latency-secs`; commit (the
//!   clock when the writer's COMMIT returns) to visible in the lake (a Delta commit
//!   holding the row appears in `_delta_log`) and to arrival at the built-in spine
//!   (`airlock spine serve`, read through its `/stream`). The lake sink runs with the
//!   default flush interval.
//! - **memory**: airlock's peak RSS (`VmHWM`) while it streams one transaction of
//!   `--memory-rows` rows, through the four example guests (`--memory-guests none`:
//!   pass-through).
//! - **primary cost**: pgbench TPS with no slot, with `pg_recvlogical` consuming a
//!   publication on the pgbench tables, and with airlock streaming them (pass-through),
//!   as ratios to the no-slot TPS.
//! - **identity**: pgbench TPS with the same tables published and airlock streaming
//!   them, with and without the identity triggers (`airlock identity install`), in
//!   interleaved rounds (at least five each); the medians side by side.
//!
//! - **snapshot**: the initial snapshot of a 10-column table of each of
//!   `--snapshot-rows` sizes (1M and 5M by default) beside `COPY … TO STDOUT` into
//!   /dev/null over one connection (psql), in the same run: `airlock run` with
//!   `snapshot = "initial"` until the snapshot is durable in the lake (the slot exists),
//!   without guests (over two connections, and over the default number) and with the
//!   four example guests.
//!
//! - **incremental**: a paced writer at 2,000 single-row transactions/s into a
//!   published table, commit → visible in the lake (p99) for `--latency-secs`, then
//!   again while a table of `--incremental-rows` rows (1M) is added to the publication
//!   and copied by an incremental snapshot: the slowdown of the p99.
//!
//! Prints each figure with its budget and PASS/FAIL, and writes them as JSON.
//!
//! usage: cargo xtask bench [-- --rows N --only drain,latency,memory,primary,identity,snapshot ...]
//! (`--help` lists every option; `AIRLOCK_BENCH_ROWS` sets `--rows`; `AIRLOCK_BENCH_WRAP`,
//! e.g. `valgrind --tool=callgrind`, runs the drain's airlock under a profiler.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use airlock::demo::Cluster;
use airlock_tests::spine_support::{free_port, wait_healthy};
use airlock_tests::{drop_slot, wait_slot_active};
use anyhow::{Context, Result, bail};
use serde_json::{Value as Json, json};
use tokio::process::{Child, Command};

/// Budgets.
const DRAIN_RATIO_MIN: f64 = 1.0;
const RSS_BUDGET_MIB: f64 = 300.0;
/// A large transaction is in the lake at most this long after its commit.
const BIG_VISIBLE_BUDGET: Duration = Duration::from_secs(5);
const PRIMARY_RATIO_SLACK: f64 = 0.03;
/// The identity budget: pgbench with the identity triggers within 5% of without.
const IDENTITY_RATIO: f64 = 0.95;
/// Interleaved rounds of each side at least, whatever `--rounds` says.
const IDENTITY_MIN_ROUNDS: u64 = 5;
/// The drain with a policy classifying every column, against the same drain without.
const POLICY_RATIO_MIN: f64 = 0.9;
/// The initial snapshot against `COPY … TO STDOUT`: without guests, with the four.
const SNAPSHOT_RATIO_BARE: f64 = 0.8;
const SNAPSHOT_RATIO_GUESTS: f64 = 0.5;
/// An incremental snapshot slows the stream's commit → lake p99 by at most this.
const INCREMENTAL_P99_SLOWDOWN: Duration = Duration::from_secs(2);
/// The writes per second the incremental snapshot runs under.
const INCREMENTAL_RATE: u64 = 2000;

/// The drain's policy: every column of the table classified, two hashed, one masked,
/// one generalised.
const DRAIN_POLICY: &str = r#"[policy]
default = "deny"
key_file = "policy.key"
[policy.classes]
public = { action = "keep" }
pii = { action = "hmac", normalize = ["trim", "lower"] }
contact = { action = "keep-last", n = 4 }
day = { action = "generalize", unit = "day" }
[policy.columns]
"public.bench_drain.*" = "public"
"public.bench_drain.name" = "pii"
"public.bench_drain.email" = "pii"
"public.bench_drain.phone" = "contact"
"public.bench_drain.signed_up" = "day"
"#;

/// One airlock drain of the backlog.
struct DrainRun {
    secs: f64,
    rate: f64,
    confirmed_secs: f64,
    cpu: f64,
    sender_cpu: f64,
    hwm: u64,
    lost: u64,
}
/// The lake's p99 budget is the flush interval plus this.
const LAKE_P99_SLACK: Duration = Duration::from_secs(1);

const USAGE: &str =
    "usage: bench_e2e [--rows N] [--txn-rows N] [--rate ROWS_PER_S] [--latency-secs S]
                 [--memory-rows N] [--pgbench-secs S] [--pgbench-scale N] [--pgbench-clients N]
                 [--rounds N] [--drain-guests examples|none] [--memory-guests examples|none]
                 [--memory-table wide|narrow] [--snapshot-rows N,N...]
                 [--incremental-rows N]
                 [--only drain,latency,memory,primary,identity,snapshot,incremental] [--json PATH]
defaults: --rows 1000000 (or $AIRLOCK_BENCH_ROWS) --txn-rows 1000 --rate 5000 --latency-secs 30
          --memory-rows 2000000 --pgbench-secs 20 --pgbench-scale 10 --pgbench-clients 4 --rounds 2
          --snapshot-rows 1000000,5000000 --incremental-rows 1000000";

struct Options {
    rows: u64,
    txn_rows: u64,
    rate: u64,
    latency_secs: u64,
    memory_rows: u64,
    pgbench_secs: u64,
    pgbench_scale: u64,
    pgbench_clients: u64,
    rounds: u64,
    drain_guests: bool,
    memory_guests: bool,
    /// The memory part's table: the drain's 10 columns, or `(id bigint, n integer)`.
    memory_narrow: bool,
    snapshot_rows: Vec<u64>,
    incremental_rows: u64,
    only: Vec<String>,
    json: Option<PathBuf>,
}

impl Options {
    fn parse() -> Result<Options> {
        let mut o = Options {
            rows: match std::env::var("AIRLOCK_BENCH_ROWS") {
                Ok(v) => v.parse().context("AIRLOCK_BENCH_ROWS takes a number")?,
                Err(_) => 1_000_000,
            },
            txn_rows: 1000,
            rate: 5000,
            latency_secs: 30,
            memory_rows: 2_000_000,
            pgbench_secs: 20,
            pgbench_scale: 10,
            pgbench_clients: 4,
            rounds: 2,
            drain_guests: true,
            memory_guests: true,
            memory_narrow: false,
            snapshot_rows: vec![1_000_000, 5_000_000],
            incremental_rows: 1_000_000,
            only: vec![],
            json: None,
        };
        // `cargo xtask bench -- --only drain` passes the `--` on: it separates nothing.
        let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--").collect();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let value = it
                .next()
                .with_context(|| format!("{flag} takes a value\n{USAGE}"))?;
            let number = || -> Result<u64> {
                value
                    .replace(['_', ','], "")
                    .parse()
                    .with_context(|| format!("{flag} takes a number, found {value:?}"))
            };
            match flag.as_str() {
                "--rows" => o.rows = number()?,
                "--txn-rows" => o.txn_rows = number()?.max(1),
                "--rate" => o.rate = number()?.max(1),
                "--latency-secs" => o.latency_secs = number()?.max(1),
                "--memory-rows" => o.memory_rows = number()?,
                "--pgbench-secs" => o.pgbench_secs = number()?.max(1),
                "--pgbench-scale" => o.pgbench_scale = number()?.max(1),
                "--pgbench-clients" => o.pgbench_clients = number()?.max(1),
                "--rounds" => o.rounds = number()?.max(1),
                "--drain-guests" => {
                    o.drain_guests = match value.as_str() {
                        "examples" => true,
                        "none" => false,
                        _ => bail!("--drain-guests takes `examples` or `none`"),
                    }
                }
                "--memory-guests" => {
                    o.memory_guests = match value.as_str() {
                        "examples" => true,
                        "none" => false,
                        _ => bail!("--memory-guests takes `examples` or `none`"),
                    }
                }
                "--memory-table" => {
                    o.memory_narrow = match value.as_str() {
                        "wide" => false,
                        "narrow" => true,
                        _ => bail!("--memory-table takes `wide` or `narrow`"),
                    }
                }
                "--incremental-rows" => o.incremental_rows = number()?.max(1),
                "--snapshot-rows" => {
                    o.snapshot_rows = value
                        .split(',')
                        .map(|n| n.trim().replace('_', "").parse::<u64>())
                        .collect::<Result<_, _>>()
                        .with_context(|| {
                            format!("--snapshot-rows takes numbers, found {value:?}")
                        })?
                }
                "--only" => o.only = value.split(',').map(|s| s.trim().to_owned()).collect(),
                "--json" => o.json = Some(PathBuf::from(value)),
                _ => bail!("unknown option {flag}\n{USAGE}"),
            }
        }
        for part in &o.only {
            if ![
                "drain",
                "latency",
                "memory",
                "primary",
                "identity",
                "snapshot",
                "incremental",
            ]
            .contains(&part.as_str())
            {
                bail!(
                    "--only takes drain, latency, memory, primary, identity, snapshot, incremental; found {part:?}"
                );
            }
        }
        Ok(o)
    }

    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// The 10-column table every part writes: mixed types, a key, 90% `active`.
fn create_table(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (
            id        bigint PRIMARY KEY,
            name      text NOT NULL,
            email     text NOT NULL,
            phone     text,
            balance   numeric(12,2) NOT NULL,
            active    boolean NOT NULL,
            visits    integer NOT NULL,
            score     double precision,
            signed_up timestamptz NOT NULL,
            note      text);
         CREATE PUBLICATION {name} FOR TABLE {name};"
    )
}

/// Inserts rows `$1 ..= $2` of the 10-column table; `active` is false for every tenth
/// row unless `all_active`.
fn insert_range(table: &str, all_active: bool) -> String {
    let active = if all_active { "true" } else { "g % 10 <> 0" };
    format!(
        "INSERT INTO {table} SELECT g, 'Customer ' || g, 'customer' || g || '@example.com',
            '+1-555-' || lpad((g % 10000000)::text, 7, '0'), (g * 7 % 100000) + (g % 100) / 100.0,
            {active}, g % 1000, g * 0.25, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
            'a short note'
         FROM generate_series($1::bigint, $2::bigint) g"
    )
}

/// Fills `table` with rows `from ..= to` (`insert_range`), 100,000 per statement.
async fn fill(
    client: &tokio_postgres::Client,
    table: &str,
    from: u64,
    to: u64,
    all_active: bool,
) -> Result<()> {
    let insert = client.prepare(&insert_range(table, all_active)).await?;
    let mut first = from;
    while first <= to {
        let last = (first + 99_999).min(to);
        client
            .execute(&insert, &[&(first as i64), &(last as i64)])
            .await?;
        first = last + 1;
    }
    Ok(())
}

/// The example guests, configured so most rows pass: `filter` keeps active rows,
/// `tag` classifies by default, `mask` hashes `email` and keeps the last 4 of `phone`,
/// `route` sends rows of `spine_tables` to the spine too.
fn example_plugins(dir: &Path, spine_tables: &[&str]) -> Result<PathBuf> {
    let stages: [(&str, &str, String); 4] = [
        (
            "filter",
            "10-filter",
            "[where]\ncolumn = \"active\"\nop = \"eq\"\nvalue = \"true\"\n".into(),
        ),
        ("tag", "20-tag", String::new()),
        (
            "mask",
            "30-mask",
            "columns = [\"email\", \"phone\"]\n\n[mode]\nphone = \"keep-last-4\"\n".into(),
        ),
        (
            "route",
            "40-route",
            format!(
                "spine_tables = [{}]\n",
                spine_tables
                    .iter()
                    .map(|t| format!("\"{t}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    ];
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    for (guest, stage, settings) in &stages {
        std::fs::copy(
            airlock_tests::guest(guest),
            plugins.join(format!("{stage}.wasm")),
        )?;
        std::fs::write(plugins.join(format!("{stage}.toml")), settings)?;
    }
    Ok(plugins)
}

/// The policy of every run but the drain's second: every column as it is.
const ALLOW_ALL: &str = "[policy]\ndefault = \"allow\"\n";

/// An `airlock.toml`: the lake takes the default and restricted routes; `extra` adds
/// sinks or settings; `lake_flush` sets the lake's flush interval (None: the default).
fn config(
    cluster: &Cluster,
    db: &str,
    name: &str,
    dir: &Path,
    lake_flush: Option<&str>,
    extra: &str,
    policy: &str,
) -> String {
    let flush = lake_flush
        .map(|f| format!("flush_interval = \"{f}\"\n"))
        .unwrap_or_default();
    format!(
        "{policy}[source]\nurl = \"{url}\"\npublication = \"{name}\"\nslot = \"{name}\"\nstatus_interval = \"1s\"\n\n\
         [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"plugins\"\nwatch = false\n\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{lake}\"\nroutes = [\"default\", \"restricted\"]\n{flush}\n\
         {extra}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        url = cluster.url(db),
        lake = dir.join("lake").display(),
    )
}

/// The `airlock` binary: `$AIRLOCK_BIN`, or the one beside this benchmark
/// (`target/release/airlock`).
fn airlock_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("AIRLOCK_BIN") {
        return PathBuf::from(bin);
    }
    let bin = std::env::current_exe()
        .expect("the benchmark's path")
        .with_file_name("airlock");
    assert!(
        bin.is_file(),
        "{} is not built: run `cargo build --release --workspace --bins` (`cargo xtask bench` does)",
        bin.display()
    );
    bin
}

/// User plus system CPU seconds of process `pid` so far (from `/proc/PID/stat`, in
/// clock ticks of 1/100 s, Linux's `USER_HZ`).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is the 3rd field, utime
    // and stime the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// The walsender process serving `slot`, while one does.
async fn slot_pid(client: &tokio_postgres::Client, slot: &str) -> Result<Option<u32>> {
    let row = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<i32>>(0))
        .map(|pid| pid as u32))
}

/// `airlock spine serve` on a free port.
struct Spine {
    /// The events endpoint.
    url: String,
    child: Child,
}

impl Spine {
    async fn start(dir: &Path) -> Result<Spine> {
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(airlock_binary())
            .args(["spine", "serve", "--dir"])
            .arg(dir)
            .args(["--listen", &listen])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.with_extension("log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot run airlock spine serve")?;
        let url = format!("http://{listen}/events");
        wait_healthy(&url, Duration::from_secs(30)).await?;
        Ok(Spine { url, child })
    }
}

/// A running `airlock run`.
struct Airlock {
    child: Child,
    log: PathBuf,
}

impl Airlock {
    async fn start(config_text: &str, dir: &Path) -> Result<Airlock> {
        Airlock::start_wrapped(config_text, dir, None).await
    }

    /// Runs airlock under `wrapper` (a command line such as
    /// `valgrind --tool=callgrind`), in `dir`.
    async fn start_wrapped(
        config_text: &str,
        dir: &Path,
        wrapper: Option<&str>,
    ) -> Result<Airlock> {
        let config_path = dir.join("airlock.toml");
        std::fs::write(&config_path, config_text)?;
        let log = dir.join("airlock.log");
        let mut words = wrapper.unwrap_or_default().split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(airlock_binary());
                c
            }
            None => Command::new(airlock_binary()),
        };
        let child = command
            .current_dir(dir)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot run airlock")?;
        Ok(Airlock { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Fails with the log when the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "airlock exited with {status}; its log ({}):\n{}",
                self.log.display(),
                tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
            );
        }
        Ok(())
    }

    /// `VmHWM` (peak resident set) and `VmRSS` of the process, in bytes.
    fn memory(&self) -> Option<(u64, u64)> {
        let kib = |field| airlock_tests::proc_status_kib(self.pid(), field);
        Some((kib("VmHWM")? * 1024, kib("VmRSS")? * 1024))
    }

    /// SIGTERM (graceful: drain, flush, acknowledge), then wait.
    async fn stop(mut self) -> Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                let _ = self.child.kill().await;
            }
        }
        Ok(())
    }
}

/// Removes a part's directory (its lake, logs) once done, unless `AIRLOCK_KEEP_BENCH`
/// asks to keep everything.
fn discard(dir: &Path) {
    if std::env::var_os("AIRLOCK_KEEP_BENCH").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Rows committed to a Delta table, read from its `_delta_log` (the `numRecords` of
/// every `add` with `dataChange`), with the time each commit was first seen.
struct LakeWatch {
    log_dir: PathBuf,
    seen: HashMap<String, u64>,
    rows: u64,
}

impl LakeWatch {
    fn new(table: &Path) -> LakeWatch {
        LakeWatch {
            log_dir: table.join("_delta_log"),
            seen: HashMap::new(),
            rows: 0,
        }
    }

    /// Reads commits not seen before; returns the rows in the lake now.
    fn poll(&mut self) -> u64 {
        let Ok(entries) = std::fs::read_dir(&self.log_dir) else {
            return self.rows;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") || name.starts_with('.') || self.seen.contains_key(&name) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let mut rows = 0;
            for line in text.lines() {
                let Ok(action) = serde_json::from_str::<Json>(line) else {
                    continue;
                };
                let Some(add) = action.get("add") else {
                    continue;
                };
                if add.get("dataChange") != Some(&Json::Bool(true)) {
                    continue;
                }
                let records = add
                    .get("stats")
                    .and_then(Json::as_str)
                    .and_then(|s| serde_json::from_str::<Json>(s).ok())
                    .and_then(|s| s.get("numRecords").and_then(Json::as_u64));
                rows += records.unwrap_or(0);
            }
            self.seen.insert(name, rows);
            self.rows += rows;
        }
        self.rows
    }
}

async fn pg_lsn(client: &tokio_postgres::Client, sql: &str) -> Result<String> {
    Ok(client.query_one(sql, &[]).await?.get::<_, String>(0))
}

async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Result<String> {
    Ok(client
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .map_or_else(|| "0/0".to_owned(), |r| r.get(0)))
}

fn lsn_value(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

/// Host, port and user, as every client tool takes them.
fn server_args(cluster: &Cluster) -> Vec<String> {
    vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        cluster.port.to_string(),
        "-U".into(),
        "postgres".into(),
    ]
}

/// Waits until `slot` confirmed the WAL written so far (at most two minutes); returns
/// how long that took: how far behind its consumer was.
async fn caught_up(client: &tokio_postgres::Client, slot: &str) -> Result<Duration> {
    let end = lsn_value(&pg_lsn(client, "SELECT pg_current_wal_lsn()::text").await?);
    let started = Instant::now();
    while lsn_value(&confirmed_flush(client, slot).await?) < end
        && started.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}

/// `airlock ARGS --config CONFIG`, failing with its output when it fails.
fn airlock_command(args: &[&str], config: &Path) -> Result<()> {
    let out = std::process::Command::new(airlock_binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()?;
    if !out.status.success() {
        bail!(
            "airlock {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `server_args` plus `-d DB` (pg_recvlogical; pgbench takes the database last, its
/// `-d` is `--debug`).
fn conn_args(cluster: &Cluster, db: &str) -> Vec<String> {
    let mut args = server_args(cluster);
    args.extend(["-d".into(), db.into()]);
    args
}

fn tool(bindir: &Path, name: &str) -> Command {
    let mut c = Command::new(bindir.join(name));
    c.kill_on_drop(true);
    c
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// `q`-quantile of sorted durations.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Bench {
    cluster: Cluster,
    bindir: PathBuf,
    work: PathBuf,
    opts: Options,
}

/// One printed line of the result table.
struct Line {
    figure: String,
    airlock: String,
    reference: String,
    budget: String,
    result: &'static str,
}

impl Bench {
    fn dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.work.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Compiles the example guests into the component cache, so no run pays for it.
    async fn warm_guests(&self) -> Result<()> {
        let dir = self.dir("warm")?;
        example_plugins(&dir, &[])?;
        std::fs::write(
            dir.join("airlock.toml"),
            config(&self.cluster, "postgres", "warm", &dir, None, "", ALLOW_ALL),
        )?;
        // `check` compiles every plugin; its other findings (no publication) do not matter here.
        let _ = Command::new(airlock_binary())
            .args(["check", "--config"])
            .arg(dir.join("airlock.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        Ok(())
    }

    async fn drain(
        &self,
        report: &mut Vec<Line>,
        out: &mut serde_json::Map<String, Json>,
    ) -> Result<()> {
        let o = &self.opts;
        println!(
            "drain: writing a backlog of {} rows in transactions of {} ...",
            thousands(o.rows as f64),
            o.txn_rows
        );
        let client = self.cluster.connect("postgres").await?;
        client.batch_execute(&create_table("bench_drain")).await?;
        let lsn_recv = pg_lsn(
            &client,
            "SELECT lsn::text FROM pg_create_logical_replication_slot('drain_recvlogical', 'pgoutput')",
        )
        .await?;
        let lsn_airlock = pg_lsn(
            &client,
            "SELECT lsn::text FROM pg_create_logical_replication_slot('bench_drain', 'pgoutput')",
        )
        .await?;
        // airlock again, with the policy.
        client
            .batch_execute("CREATE PUBLICATION drain_policy FOR TABLE bench_drain")
            .await?;
        client
            .batch_execute("SELECT pg_create_logical_replication_slot('drain_policy', 'pgoutput')")
            .await?;
        // A slot for pg_recvlogical again, with pgoutput's `binary = true`.
        client
            .batch_execute("SELECT pg_create_logical_replication_slot('drain_binary', 'pgoutput')")
            .await?;
        let insert = client.prepare(&insert_range("bench_drain", false)).await?;
        let written = Instant::now();
        let mut first = 1i64;
        while first <= o.rows as i64 {
            let last = (first + o.txn_rows as i64 - 1).min(o.rows as i64);
            client.execute(&insert, &[&first, &last]).await?;
            first = last + 1;
        }
        let end_lsn = pg_lsn(&client, "SELECT pg_current_wal_lsn()::text").await?;
        let expected: i64 = client
            .query_one(
                if o.drain_guests {
                    "SELECT count(*) FROM bench_drain WHERE active"
                } else {
                    "SELECT count(*) FROM bench_drain"
                },
                &[],
            )
            .await?
            .get(0);
        let wal_bytes = lsn_value(&end_lsn) - lsn_value(&lsn_airlock);
        println!(
            "  written in {:.1} s: {:.0} MiB of WAL; slots at {lsn_recv} and {lsn_airlock}, end at {end_lsn}",
            written.elapsed().as_secs_f64(),
            mib(wal_bytes)
        );

        // pg_recvlogical: pgoutput v1 into /dev/null until the end LSN, as text (the
        // reference) and with `binary = true` (what binary values cost the walsender).
        let (recv_secs, recv_cpu, recv_sender_cpu) = self
            .recvlogical(&client, "drain_recvlogical", &end_lsn, false)
            .await?;
        let recv_rate = o.rows as f64 / recv_secs;
        println!(
            "  pg_recvlogical: {recv_secs:.2} s, {} rows/s; CPU: walsender {recv_sender_cpu:.2} s, pg_recvlogical {recv_cpu:.2} s",
            thousands(recv_rate)
        );
        let (binary_secs, binary_cpu, binary_sender_cpu) = self
            .recvlogical(&client, "drain_binary", &end_lsn, true)
            .await?;
        println!(
            "  pg_recvlogical, binary = true: {binary_secs:.2} s, {} rows/s; CPU: walsender {binary_sender_cpu:.2} s, pg_recvlogical {binary_cpu:.2} s",
            thousands(o.rows as f64 / binary_secs)
        );
        report.push(Line {
            figure: "drain: walsender CPU, pgoutput binary = true / text".into(),
            airlock: format!("{binary_sender_cpu:.2} s"),
            reference: format!("{recv_sender_cpu:.2} s"),
            budget: "measured".into(),
            result: "-",
        });
        out.insert(
            "binary".into(),
            json!({
                "rows": o.rows,
                "text": { "secs": recv_secs, "walsender_cpu_secs": recv_sender_cpu, "client_cpu_secs": recv_cpu },
                "binary": { "secs": binary_secs, "walsender_cpu_secs": binary_sender_cpu, "client_cpu_secs": binary_cpu },
            }),
        );

        // airlock: the example guests (or none) into the lake, flushed every second;
        // then again on its own slot with a policy classifying every column.
        let plain = self
            .drain_airlock(&client, "bench_drain", &end_lsn, expected, ALLOW_ALL)
            .await?;
        let policed = self
            .drain_airlock(&client, "drain_policy", &end_lsn, expected, DRAIN_POLICY)
            .await?;
        let recv = (recv_secs, recv_rate, recv_cpu, recv_sender_cpu);
        for (run, name) in [(&plain, "drain"), (&policed, "drain_policy")] {
            let ratio = run.rate / recv_rate;
            out.insert(
                name.into(),
                json!({
                    "rows": o.rows, "txn_rows": o.txn_rows, "wal_bytes": wal_bytes,
                    "rows_in_lake": expected, "end_lsn": end_lsn,
                    "pg_recvlogical_secs": recv.0, "pg_recvlogical_rows_per_s": recv.1,
                    "airlock_secs": run.secs, "airlock_rows_per_s": run.rate,
                    "airlock_slot_confirmed_secs": run.confirmed_secs,
                    "pg_recvlogical_cpu_secs": recv.2, "pg_recvlogical_walsender_cpu_secs": recv.3,
                    "airlock_cpu_secs": run.cpu, "airlock_walsender_cpu_secs": run.sender_cpu,
                    "airlock_peak_rss_bytes": run.hwm, "lake_flush_interval": "1s", "guests": if o.drain_guests { "filter, tag, mask, route" } else { "none" },
                    "policy": name == "drain_policy",
                    "ratio": ratio, "budget_min_ratio": DRAIN_RATIO_MIN, "rows_lost": run.lost,
                    "pass": ratio >= DRAIN_RATIO_MIN && run.lost == 0,
                }),
            );
        }
        let ratio = plain.rate / recv_rate;
        report.push(Line {
            figure: format!("drain, {} rows: rows/s", thousands(o.rows as f64)),
            airlock: thousands(plain.rate),
            reference: format!("{} (pg_recvlogical)", thousands(recv_rate)),
            budget: format!("ratio {ratio:.2} >= {DRAIN_RATIO_MIN}"),
            result: pass(ratio >= DRAIN_RATIO_MIN && plain.lost == 0),
        });
        let policy_ratio = policed.rate / plain.rate;
        report.push(Line {
            figure: format!(
                "drain, {} rows: with the policy / without",
                thousands(o.rows as f64)
            ),
            airlock: thousands(policed.rate),
            reference: format!("{} (no policy)", thousands(plain.rate)),
            budget: format!("ratio {policy_ratio:.2} >= {POLICY_RATIO_MIN}"),
            result: pass(policy_ratio >= POLICY_RATIO_MIN && policed.lost == 0),
        });
        for run in [&plain, &policed] {
            if run.lost > 0 {
                report.push(Line {
                    figure: "drain: rows lost".into(),
                    airlock: thousands(run.lost as f64),
                    reference: "0".into(),
                    budget: "0".into(),
                    result: "FAIL",
                });
            }
        }
        client
            .batch_execute(
                "SELECT pg_drop_replication_slot('drain_recvlogical'); SELECT pg_drop_replication_slot('drain_binary'); DROP PUBLICATION drain_policy; DROP TABLE bench_drain; CHECKPOINT",
            )
            .await?;
        Ok(())
    }

    /// airlock draining the backlog from `slot` into a lake of its own, with `policy`
    /// ([`ALLOW_ALL`]: every column as it is).
    /// The initial snapshot beside `COPY … TO STDOUT` for each table size.
    async fn snapshot(
        &self,
        report: &mut Vec<Line>,
        out: &mut serde_json::Map<String, Json>,
    ) -> Result<()> {
        let client = self.scratch_database("bench_snapshot").await?;
        client.batch_execute(&create_table("bench_snap")).await?;
        let mut have = 0u64;
        let mut results = Vec::new();
        for &rows in &self.opts.snapshot_rows {
            println!("snapshot: {} rows ...", thousands(rows as f64));
            if have < rows {
                fill(&client, "bench_snap", have + 1, rows, false).await?;
                have = rows;
            }
            client.batch_execute("ANALYZE bench_snap").await?;
            client.batch_execute("CHECKPOINT").await?;
            // The reference: the same rows over one connection into /dev/null.
            let started = Instant::now();
            let status = tool(&self.bindir, "psql")
                .args(conn_args(&self.cluster, "bench_snapshot"))
                .args(["-q", "-c", "COPY bench_snap TO STDOUT"])
                .stdout(Stdio::null())
                .status()
                .await?;
            anyhow::ensure!(status.success(), "psql COPY failed");
            let copy_rate = rows as f64 / started.elapsed().as_secs_f64();
            let mut line = json!({ "rows": rows, "copy_rows_per_s": copy_rate.round() });
            // (label, guests, connections: None for the default, budget, JSON key)
            for (label, guests, connections, budget, key) in [
                (
                    "without guests, two connections",
                    false,
                    Some(2),
                    None,
                    "two_connections_rows_per_s",
                ),
                (
                    "without guests",
                    false,
                    None,
                    Some(SNAPSHOT_RATIO_BARE),
                    "bare_rows_per_s",
                ),
                (
                    "with the four example guests",
                    true,
                    None,
                    Some(SNAPSHOT_RATIO_GUESTS),
                    "guests_rows_per_s",
                ),
            ] {
                let slot = match (guests, connections) {
                    (true, _) => "bench_snap_guests",
                    (false, Some(_)) => "bench_snap_two",
                    (false, None) => "bench_snap",
                };
                let connections = connections
                    .map(|n| format!("\nsnapshot_connections = {n}"))
                    .unwrap_or_default();
                let dir = self.dir(slot)?;
                if guests {
                    example_plugins(&dir, &[])?;
                } else {
                    std::fs::create_dir_all(dir.join("plugins"))?;
                }
                let text = config(
                    &self.cluster,
                    "bench_snapshot",
                    "bench_snap",
                    &dir,
                    None,
                    "",
                    ALLOW_ALL,
                )
                .replace(
                    "slot = \"bench_snap\"",
                    &format!("slot = \"{slot}\"\nsnapshot = \"initial\"\nstate_dir = \"state\"{connections}"),
                );
                let started = Instant::now();
                let mut airlock = Airlock::start(&text, &dir).await?;
                let cpu_before = cpu_secs(airlock.pid()).unwrap_or(0.0);
                // Done when the snapshot is durable: then the slot exists.
                loop {
                    airlock.check_alive()?;
                    let exists = client
                        .query_opt(
                            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                            &[&slot],
                        )
                        .await?
                        .is_some();
                    if exists {
                        break;
                    }
                    anyhow::ensure!(
                        started.elapsed() < Duration::from_secs(1800),
                        "the snapshot took over 30 minutes"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let secs = started.elapsed().as_secs_f64();
                let cpu = cpu_secs(airlock.pid()).unwrap_or(0.0) - cpu_before;
                airlock.stop().await?;
                drop_slot(&client, slot).await?;
                discard(&dir);
                let rate = rows as f64 / secs;
                let ratio = rate / copy_rate;
                println!(
                    "  airlock {label}: {:.1} s, {} rows/s ({ratio:.2}x COPY at {} rows/s), {cpu:.1} s of CPU",
                    secs,
                    thousands(rate),
                    thousands(copy_rate)
                );
                line[key] = rate.round().into();
                report.push(Line {
                    figure: format!(
                        "initial snapshot of {} rows, {label}",
                        thousands(rows as f64)
                    ),
                    airlock: format!("{} rows/s ({ratio:.2}x)", thousands(rate)),
                    reference: format!("COPY {} rows/s", thousands(copy_rate)),
                    budget: budget.map_or_else(|| "none".into(), |b| format!(">= {b:.1}x")),
                    result: budget.map_or("-", |b| pass(ratio >= b)),
                });
            }
            results.push(line);
        }
        drop(client);
        self.drop_database("bench_snapshot").await;
        out.insert("snapshot".into(), Json::Array(results));
        Ok(())
    }

    /// The stream's commit → lake p99 at 2,000 writes/s, without and then with an
    /// incremental snapshot of a large table running.
    async fn incremental(
        &self,
        report: &mut Vec<Line>,
        out: &mut serde_json::Map<String, Json>,
    ) -> Result<()> {
        let o = &self.opts;
        let client = self.scratch_database("bench_incremental").await?;
        client.batch_execute(&create_table("bench_live")).await?;
        client.batch_execute(&create_table("bench_big")).await?;
        println!(
            "incremental: writing {} rows to copy later ...",
            thousands(o.incremental_rows as f64)
        );
        fill(&client, "bench_big", 1, o.incremental_rows, true).await?;
        client.batch_execute("ANALYZE bench_big").await?;
        let dir = self.dir("incremental")?;
        std::fs::create_dir_all(dir.join("plugins"))?;
        let text = config(
            &self.cluster,
            "bench_incremental",
            "bench_live",
            &dir,
            None,
            "",
            ALLOW_ALL,
        )
        .replace(
            "slot = \"bench_live\"",
            "slot = \"bench_live\"\nsnapshot = \"initial\"\nstate_dir = \"state\"",
        );
        let mut airlock = Airlock::start(&text, &dir).await?;
        let ready = Instant::now();
        while !client
            .query_one(
                "SELECT count(*) > 0 FROM pg_replication_slots WHERE slot_name = 'bench_live' AND active",
                &[],
            )
            .await?
            .get::<_, bool>(0)
        {
            airlock.check_alive()?;
            anyhow::ensure!(ready.elapsed() < Duration::from_secs(60), "airlock did not stream within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let per_phase = INCREMENTAL_RATE * o.latency_secs;
        let mut lake = LakeWatch::new(&dir.join("lake/public.bench_live"));
        let mut p99s = Vec::new();
        let mut copy_secs = None;
        for phase in ["alone", "with an incremental snapshot"] {
            let first_id = p99s.len() as u64 * per_phase + 1;
            let copy_started = Instant::now();
            if phase != "alone" {
                client
                    .batch_execute("ALTER PUBLICATION bench_live ADD TABLE bench_big")
                    .await?;
            }
            println!(
                "  {} single-row transactions/s for {} s, {phase} ...",
                thousands(INCREMENTAL_RATE as f64),
                o.latency_secs
            );
            let writer_client = self.cluster.connect("bench_incremental").await?;
            let insert = writer_client
                .prepare(&insert_range("bench_live", true))
                .await?;
            let gap = Duration::from_secs_f64(1.0 / INCREMENTAL_RATE as f64);
            let mut writer = tokio::spawn(async move {
                let mut commits: Vec<Instant> = Vec::with_capacity(per_phase as usize);
                let start = tokio::time::Instant::now();
                for k in 0..per_phase {
                    tokio::time::sleep_until(start + gap.mul_f64(k as f64)).await;
                    let id = (first_id + k) as i64;
                    writer_client.execute(&insert, &[&id, &id]).await?;
                    commits.push(Instant::now());
                }
                anyhow::Ok(commits)
            });
            let mut steps: Vec<(u64, Instant)> = Vec::new();
            let mut commits = None;
            let target = first_id - 1 + per_phase;
            let mut done_at = None;
            loop {
                let rows = lake.poll();
                if steps.last().is_none_or(|(r, _)| *r < rows) {
                    steps.push((rows, Instant::now()));
                }
                if copy_secs.is_none() && phase != "alone" {
                    let state = std::fs::read_dir(dir.join("state"))?
                        .flatten()
                        .find(|e| e.file_name().to_string_lossy().ends_with(".tables.json"))
                        .and_then(|e| std::fs::read_to_string(e.path()).ok())
                        .unwrap_or_default();
                    if state.contains("bench_big") && !state.contains("\"due\"") {
                        copy_secs = Some(copy_started.elapsed().as_secs_f64());
                    }
                }
                if commits.is_none() && writer.is_finished() {
                    commits = Some((&mut writer).await??);
                    done_at = Some(Instant::now());
                }
                if let Some(at) = done_at
                    && (rows >= target || at.elapsed() > Duration::from_secs(60))
                {
                    break;
                }
                airlock.check_alive()?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let commits = commits.expect("the writer finished");
            let mut delays = Vec::with_capacity(commits.len());
            let mut step = 0;
            for (k, committed) in commits.iter().enumerate() {
                let seq = first_id + k as u64;
                while step < steps.len() && steps[step].0 < seq {
                    step += 1;
                }
                if let Some((_, at)) = steps.get(step) {
                    delays.push(at.saturating_duration_since(*committed));
                }
            }
            anyhow::ensure!(
                delays.len() == commits.len(),
                "{} of {} rows never reached the lake",
                commits.len() - delays.len(),
                commits.len()
            );
            delays.sort();
            let (p50, p99) = (quantile(&delays, 0.5), quantile(&delays, 0.99));
            println!("    commit -> lake p50 {} p99 {}", millis(p50), millis(p99));
            p99s.push(p99);
        }
        airlock.stop().await?;
        discard(&dir);
        drop(client);
        self.drop_database("bench_incremental").await;
        let slowdown = p99s[1].saturating_sub(p99s[0]);
        let copied = copy_secs.map_or_else(
            || "not done within the phase".into(),
            |s| format!("copied in {s:.1} s"),
        );
        println!(
            "  {} rows {copied}; p99 slower by {}",
            thousands(o.incremental_rows as f64),
            millis(slowdown)
        );
        report.push(Line {
            figure: format!(
                "commit -> lake p99 at {} writes/s, with an incremental snapshot of {} rows",
                thousands(INCREMENTAL_RATE as f64),
                thousands(o.incremental_rows as f64)
            ),
            airlock: format!("{} ({copied})", millis(p99s[1])),
            reference: format!("{} without", millis(p99s[0])),
            budget: format!("<= +{}", humantime(INCREMENTAL_P99_SLOWDOWN)),
            result: pass(slowdown <= INCREMENTAL_P99_SLOWDOWN && copy_secs.is_some()),
        });
        out.insert(
            "incremental".into(),
            json!({
                "rows": o.incremental_rows,
                "p99_alone_ms": ms(p99s[0]),
                "p99_with_copy_ms": ms(p99s[1]),
                "copy_seconds": copy_secs,
            }),
        );
        Ok(())
    }

    async fn drain_airlock(
        &self,
        client: &tokio_postgres::Client,
        slot: &str,
        end_lsn: &str,
        expected: i64,
        policy: &str,
    ) -> Result<DrainRun> {
        let o = &self.opts;
        let dir = self.dir(slot)?;
        if o.drain_guests {
            example_plugins(&dir, &[])?;
        } else {
            std::fs::create_dir_all(dir.join("plugins"))?;
        }
        let text = config(
            &self.cluster,
            "postgres",
            slot,
            &dir,
            Some("1s"),
            "",
            policy,
        );
        if policy != ALLOW_ALL {
            let key = dir.join("policy.key");
            std::fs::write(&key, "bench-policy-key-0123456789abcdef0123456789")?;
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        let mut lake = LakeWatch::new(&dir.join("lake/public.bench_drain"));
        let start = Instant::now();
        // `AIRLOCK_BENCH_WRAP` runs the drain's airlock under a profiler.
        let wrapper = std::env::var("AIRLOCK_BENCH_WRAP").ok();
        let mut airlock = Airlock::start_wrapped(&text, &dir, wrapper.as_deref()).await?;
        let deadline = Duration::from_secs(3600);
        let mut checked = Instant::now();
        let (mut airlock_cpu, mut sender_cpu) = (0.0f64, 0.0f64);
        // Done when the lake holds every row, or when the slot is acknowledged past the
        // end (everything is durable: a shortfall then is rows lost, reported below).
        while lake.poll() < expected as u64 {
            airlock.check_alive()?;
            airlock_cpu = cpu_secs(airlock.pid()).unwrap_or(airlock_cpu);
            if let Some(pid) = slot_pid(client, slot).await? {
                sender_cpu = cpu_secs(pid).unwrap_or(sender_cpu);
            }
            if start.elapsed() > deadline {
                bail!("airlock did not drain the backlog within {deadline:?}");
            }
            if checked.elapsed() > Duration::from_millis(100) {
                checked = Instant::now();
                let confirmed = confirmed_flush(client, slot).await?;
                if lsn_value(&confirmed) >= lsn_value(end_lsn) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let airlock_secs = start.elapsed().as_secs_f64();
        airlock_cpu = cpu_secs(airlock.pid()).unwrap_or(airlock_cpu);
        let (hwm, _) = airlock.memory().unwrap_or((0, 0));
        // The slot follows once the durable position is acknowledged.
        let mut confirmed = String::new();
        let acked = Instant::now();
        while acked.elapsed() < Duration::from_secs(30) {
            confirmed = confirmed_flush(client, slot).await?;
            if lsn_value(&confirmed) >= lsn_value(end_lsn) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let confirmed_secs = airlock_secs + acked.elapsed().as_secs_f64();
        airlock.stop().await?;
        let lost = expected as u64 - lake.poll().min(expected as u64);
        if lost > 0 {
            println!(
                "  LOST ROWS: the slot is acknowledged past the end, but the lake holds {} of {} rows",
                thousands(lake.poll() as f64),
                thousands(expected as f64)
            );
        }
        let airlock_rate = o.rows as f64 / airlock_secs;
        println!(
            "  airlock{}: {airlock_secs:.2} s to {} rows in the lake ({} filtered out), {} rows/s; \
             slot confirmed {confirmed} after {confirmed_secs:.2} s; peak RSS {:.0} MiB; \
             CPU: walsender {sender_cpu:.2} s, airlock {airlock_cpu:.2} s",
            if policy == ALLOW_ALL {
                ""
            } else {
                " with the policy"
            },
            thousands(expected as f64),
            thousands((o.rows as i64 - expected) as f64),
            thousands(airlock_rate),
            mib(hwm)
        );
        drop_slot(client, slot).await?;
        discard(&dir);
        Ok(DrainRun {
            secs: airlock_secs,
            rate: airlock_rate,
            confirmed_secs,
            cpu: airlock_cpu,
            sender_cpu,
            hwm,
            lost,
        })
    }

    async fn latency(
        &self,
        report: &mut Vec<Line>,
        out: &mut serde_json::Map<String, Json>,
    ) -> Result<()> {
        let o = &self.opts;
        let client = self.cluster.connect("postgres").await?;
        client.batch_execute(&create_table("bench_ticks")).await?;
        client
            .batch_execute("SELECT pg_create_logical_replication_slot('bench_ticks', 'pgoutput')")
            .await?;
        let dir = self.dir("latency")?;
        example_plugins(&dir, &["public.bench_ticks"])?;
        let spine_dir = dir.join("spine");
        let mut spine = Spine::start(&spine_dir).await?;
        let text = config(
            &self.cluster,
            "postgres",
            "bench_ticks",
            &dir,
            None,
            &format!(
                "[sinks.spine]\ntype = \"http\"\nurl = \"{}\"\nroutes = [\"spine\"]\n",
                spine.url
            ),
            ALLOW_ALL,
        );
        // The default flush interval, as airlock reads it from this configuration.
        let flush = airlock::config::Config::from_toml("bench.toml", &text, &dir)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .lakes()
            .find(|s| s.name == "lake")
            .context("the lake sink")?
            .flush_interval;
        let budget = flush + LAKE_P99_SLACK;

        // Arrivals at the spine, from its server-sent event stream.
        let stream_url = spine.url.trim_end_matches("/events").to_owned() + "/stream";
        let mut response = reqwest::Client::new().get(&stream_url).send().await?;
        let (arrival_tx, mut arrival_rx) = tokio::sync::mpsc::unbounded_channel::<(i64, Instant)>();
        let reader = tokio::spawn(async move {
            let mut buffer = String::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                let now = Instant::now();
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let event: String = buffer.drain(..end + 2).collect();
                    let data: String = event
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(str::trim_start)
                        .collect::<Vec<_>>()
                        .join("\n");
                    let Ok(json) = serde_json::from_str::<Json>(&data) else {
                        continue;
                    };
                    let id = &json["payload"]["new"]["id"];
                    let id = id
                        .as_i64()
                        .or_else(|| id.as_str().and_then(|s| s.parse().ok()));
                    if let Some(id) = id
                        && arrival_tx.send((id, now)).is_err()
                    {
                        return;
                    }
                }
            }
        });

        let mut airlock = Airlock::start(&text, &dir).await?;
        // Wait until airlock streams from its slot.
        let ready = Instant::now();
        loop {
            let active: bool = client
                .query_one(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = 'bench_ticks'",
                    &[],
                )
                .await?
                .get(0);
            if active {
                break;
            }
            airlock.check_alive()?;
            if ready.elapsed() > Duration::from_secs(60) {
                bail!("airlock did not start streaming within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        // The paced writer: transactions of `per_txn` rows on a fixed schedule, the
        // clock read when each COMMIT returns.
        let per_txn = (o.rate / 100).max(1);
        let txns = o.rate * o.latency_secs / per_txn;
        let total = txns * per_txn;
        println!(
            "latency: {} rows/s for {} s ({} transactions of {per_txn} rows); lake flush interval {} (the default) ...",
            thousands(o.rate as f64),
            o.latency_secs,
            thousands(txns as f64),
            humantime(flush)
        );
        let writer_client = self.cluster.connect("postgres").await?;
        let insert = writer_client
            .prepare(&insert_range("bench_ticks", true))
            .await?;
        let gap = Duration::from_secs_f64(per_txn as f64 / o.rate as f64);
        let mut writer = tokio::spawn(async move {
            let mut commits: Vec<Instant> = Vec::with_capacity(txns as usize);
            let start = tokio::time::Instant::now();
            for k in 0..txns {
                tokio::time::sleep_until(start + gap.mul_f64(k as f64)).await;
                let first = (k * per_txn + 1) as i64;
                let last = first + per_txn as i64 - 1;
                writer_client.execute(&insert, &[&first, &last]).await?;
                commits.push(Instant::now());
            }
            let achieved = total as f64 / start.elapsed().as_secs_f64();
            anyhow::Ok((commits, achieved))
        });

        // Observe the lake (every 20 ms) and the spine while the writer runs, then until
        // both hold every row.
        let mut lake = LakeWatch::new(&dir.join("lake/public.bench_ticks"));
        let mut lake_steps: Vec<(u64, Instant)> = Vec::new();
        let mut spine_at: Vec<Option<Instant>> = vec![None; total as usize + 1];
        let mut spine_count = 0u64;
        let mut written = None;
        let mut done_at = None;
        loop {
            let rows = lake.poll();
            if lake_steps.last().is_none_or(|(r, _)| *r < rows) {
                lake_steps.push((rows, Instant::now()));
            }
            while let Ok((id, at)) = arrival_rx.try_recv() {
                if let Some(slot) = spine_at.get_mut(id as usize)
                    && slot.is_none()
                {
                    *slot = Some(at);
                    spine_count += 1;
                }
            }
            if written.is_none() && writer.is_finished() {
                written = Some((&mut writer).await??);
                done_at = Some(Instant::now());
            }
            if let Some(at) = done_at {
                if rows >= total && spine_count >= total {
                    break;
                }
                if at.elapsed() > budget * 2 + Duration::from_secs(10) {
                    println!(
                        "  LOST ROWS: {:?} after the writer stopped, the lake holds {rows} and the spine {spine_count} of {total} rows",
                        at.elapsed()
                    );
                    break;
                }
            }
            airlock.check_alive()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        airlock.stop().await?;
        let _ = spine.child.kill().await;
        reader.abort();
        let (commits, achieved) = written.expect("the writer finished");

        // Per row: commit of its transaction to the first lake commit holding it, and
        // to its arrival at the spine.
        let mut to_lake = Vec::with_capacity(total as usize);
        let mut to_spine = Vec::with_capacity(total as usize);
        let mut step = 0;
        for seq in 1..=total {
            let committed = commits[((seq - 1) / per_txn) as usize];
            while step < lake_steps.len() && lake_steps[step].0 < seq {
                step += 1;
            }
            // A row the lake never held (lost) counts as never visible: left out.
            if let Some((_, at)) = lake_steps.get(step) {
                to_lake.push(at.saturating_duration_since(committed));
            }
            if let Some(at) = spine_at[seq as usize] {
                to_spine.push(at.saturating_duration_since(committed));
            }
        }
        to_lake.sort();
        to_spine.sort();
        let (lake50, lake99) = (quantile(&to_lake, 0.5), quantile(&to_lake, 0.99));
        let (spine50, spine99) = (quantile(&to_spine, 0.5), quantile(&to_spine, 0.99));
        println!(
            "  writer achieved {} rows/s; lake p50 {} p99 {}; spine p50 {} p99 {}",
            thousands(achieved),
            millis(lake50),
            millis(lake99),
            millis(spine50),
            millis(spine99)
        );
        let lost_lake = total - to_lake.len() as u64;
        let lost_spine = total - to_spine.len() as u64;
        let lake_ok = lake99 <= budget && lost_lake == 0;
        report.push(Line {
            figure: format!(
                "commit -> lake p50 / p99 at {} rows/s",
                thousands(o.rate as f64)
            ),
            airlock: format!("{} / {}", millis(lake50), millis(lake99)),
            reference: format!("flush interval {} (default)", humantime(flush)),
            budget: format!("p99 <= {} (flush + 1 s)", humantime(budget)),
            result: pass(lake_ok),
        });
        report.push(Line {
            figure: format!(
                "commit -> spine p50 / p99 at {} rows/s",
                thousands(o.rate as f64)
            ),
            airlock: format!("{} / {}", millis(spine50), millis(spine99)),
            reference: "http sink flush 1 s (default)".into(),
            budget: "none".into(),
            result: "-",
        });
        out.insert(
            "latency".into(),
            json!({
                "rate_rows_per_s": o.rate, "achieved_rows_per_s": achieved, "secs": o.latency_secs,
                "rows": total, "txn_rows": per_txn,
                "lake_flush_interval_ms": flush.as_millis() as u64,
                "lake_p50_ms": ms(lake50), "lake_p99_ms": ms(lake99),
                "spine_p50_ms": ms(spine50), "spine_p99_ms": ms(spine99),
                "lake_budget_p99_ms": ms(budget), "pass": lake_ok,
                "rows_lost_lake": lost_lake, "rows_lost_spine": lost_spine,
            }),
        );
        drop_slot(&client, "bench_ticks").await?;
        client
            .batch_execute("DROP TABLE bench_ticks; CHECKPOINT")
            .await?;
        discard(&dir);
        Ok(())
    }

    async fn memory(
        &self,
        report: &mut Vec<Line>,
        out: &mut serde_json::Map<String, Json>,
    ) -> Result<()> {
        let rows = self.opts.memory_rows;
        let client = self.cluster.connect("postgres").await?;
        if self.opts.memory_narrow {
            client
                .batch_execute(
                    "CREATE TABLE bench_big (id bigint PRIMARY KEY, n integer);
                     CREATE PUBLICATION bench_big FOR TABLE bench_big;",
                )
                .await?;
        } else {
            client.batch_execute(&create_table("bench_big")).await?;
        }
        client
            .batch_execute("SELECT pg_create_logical_replication_slot('bench_big', 'pgoutput')")
            .await?;
        let dir = self.dir("memory")?;
        // Every row is `active`, so the filter keeps them all.
        if self.opts.memory_guests {
            example_plugins(&dir, &[])?;
        } else {
            std::fs::create_dir_all(dir.join("plugins"))?;
        }
        let guests = if self.opts.memory_guests {
            "the example guests"
        } else {
            "pass-through"
        };
        let text = config(
            &self.cluster,
            "postgres",
            "bench_big",
            &dir,
            None,
            "",
            ALLOW_ALL,
        );
        let mut airlock = Airlock::start(&text, &dir).await?;
        wait_slot_active(&client, "bench_big").await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, idle) = airlock.memory().unwrap_or((0, 0));
        println!(
            "memory: one transaction of {} rows, airlock with {guests} ...",
            thousands(rows as f64)
        );
        let writer_client = self.cluster.connect("postgres").await?;
        let insert = if self.opts.memory_narrow {
            "INSERT INTO bench_big SELECT g, g % 1000 FROM generate_series($1::bigint, $2::bigint) g"
                .to_owned()
        } else {
            insert_range("bench_big", true)
        };
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            writer_client
                .execute(&insert, &[&1i64, &(rows as i64)])
                .await
        });
        let mut lake = LakeWatch::new(&dir.join("lake/public.bench_big"));
        let mut peak_rss = 0;
        let mut end_lsn = None;
        let mut settled = false;
        let mut checked = Instant::now();
        // When the writer's COMMIT returned (autocommit: when its statement did).
        let mut committed: Option<Instant> = None;
        let mut visible_after = None;
        let mut sent_after: Option<Duration> = None;
        // airlock's CPU seconds when the walsender had sent the commit, and when the
        // lake had it: how busy it was while only it worked.
        let (mut cpu_at_sent, mut cpu_at_visible) = (None, None);
        // The walsender's CPU seconds, last seen: is it the one that sets the pace?
        let mut sender_cpu = 0.0f64;
        let outcome = loop {
            if let Some((_, rss)) = airlock.memory() {
                peak_rss = peak_rss.max(rss);
            }
            if sent_after.is_none()
                && let Some(pid) = slot_pid(&client, "bench_big").await?
            {
                sender_cpu = cpu_secs(pid).unwrap_or(sender_cpu);
            }
            if committed.is_none() && writer.is_finished() {
                committed = Some(Instant::now());
            }
            if lake.poll() >= rows {
                visible_after = committed.map(|c| c.elapsed());
                cpu_at_visible = cpu_secs(airlock.pid());
                break Ok(());
            }
            if end_lsn.is_none() && writer.is_finished() {
                end_lsn = Some(lsn_value(
                    &pg_lsn(&client, "SELECT pg_current_wal_lsn()::text").await?,
                ));
            }
            // The floor: when the walsender has decoded and sent the commit.
            if let (Some(end), Some(at), None) = (end_lsn, committed, sent_after) {
                let sent = client
                    .query_opt(
                        "SELECT sent_lsn::text FROM pg_stat_replication r \
                         JOIN pg_replication_slots s ON s.active_pid = r.pid \
                         WHERE s.slot_name = 'bench_big'",
                        &[],
                    )
                    .await?
                    .and_then(|row| row.get::<_, Option<String>>(0));
                if sent.is_some_and(|s| lsn_value(&s) >= end) {
                    sent_after = Some(at.elapsed());
                    cpu_at_sent = cpu_secs(airlock.pid());
                }
            }
            if let Some(end) = end_lsn
                && checked.elapsed() > Duration::from_millis(500)
            {
                checked = Instant::now();
                let confirmed = confirmed_flush(&client, "bench_big").await?;
                if lsn_value(&confirmed) >= end {
                    if settled {
                        println!(
                            "  LOST ROWS: the slot is acknowledged up to {confirmed}, but the lake holds {} of {rows} rows",
                            lake.poll()
                        );
                        break Ok(());
                    }
                    settled = true;
                }
            }
            if let Err(e) = airlock.check_alive() {
                break Err(e);
            }
            if start.elapsed() > Duration::from_secs(3600) {
                break Err(anyhow::anyhow!(
                    "the lake did not hold the transaction within an hour"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let secs = start.elapsed().as_secs_f64();
        let hwm = airlock.memory().map(|(h, _)| h).unwrap_or(peak_rss);
        writer.await??;
        let _ = airlock.stop().await;
        // What the primary paid for the slot: spilled to its disk, or streamed.
        let stats = client
            .query_one(
                "SELECT spill_bytes, stream_bytes, stream_txns FROM pg_stat_replication_slots \
                 WHERE slot_name = 'bench_big'",
                &[],
            )
            .await?;
        let (spill_bytes, stream_bytes): (i64, i64) = (stats.get(0), stats.get(1));
        println!(
            "  the walsender used {sender_cpu:.2} CPU s until it sent the commit, {:.2} s after the first row",
            committed
                .zip(sent_after)
                .map_or(0.0, |(c, s)| (c.duration_since(start) + s).as_secs_f64())
        );
        println!(
            "  the primary spilled {} bytes and streamed {} bytes for the slot; the walsender sent the commit {} after it, the lake had it {} after it",
            thousands(spill_bytes as f64),
            thousands(stream_bytes as f64),
            sent_after.map_or_else(|| "-".into(), |v| format!("{:.2} s", v.as_secs_f64())),
            visible_after.map_or_else(|| "-".into(), |v| format!("{:.2} s", v.as_secs_f64()))
        );
        let visible_ok = visible_after.is_some_and(|v| v <= BIG_VISIBLE_BUDGET);
        let after_sent = match (sent_after, visible_after, cpu_at_sent, cpu_at_visible) {
            (Some(s), Some(v), Some(c0), Some(c1)) if v > s => {
                let wall = (v - s).as_secs_f64();
                println!(
                    "  after the walsender sent the commit: {wall:.2} s to the lake, airlock busy {:.2} CPU s ({:.2} cores)",
                    c1 - c0,
                    (c1 - c0) / wall
                );
                Some((wall, c1 - c0))
            }
            _ => None,
        };
        report.push(Line {
            figure: format!(
                "one {}-row transaction: primary's spill_bytes",
                thousands(rows as f64)
            ),
            airlock: thousands(spill_bytes as f64),
            reference: format!("streamed {}", thousands(stream_bytes as f64)),
            budget: "0".into(),
            result: pass(spill_bytes == 0 && outcome.is_ok()),
        });
        report.push(Line {
            figure: format!(
                "one {}-row transaction: commit -> lake",
                thousands(rows as f64)
            ),
            airlock: visible_after
                .map_or_else(|| "-".into(), |v| format!("{:.2} s", v.as_secs_f64())),
            reference: sent_after.map_or_else(
                || "-".into(),
                |s| format!("walsender sent it after {:.2} s", s.as_secs_f64()),
            ),
            budget: format!("<= {}", humantime(BIG_VISIBLE_BUDGET)),
            result: pass(visible_ok && outcome.is_ok()),
        });
        let ok = outcome.is_ok() && mib(hwm) <= RSS_BUDGET_MIB;
        match &outcome {
            Ok(()) => println!(
                "  in the lake after {secs:.1} s; VmHWM {:.0} MiB (idle before: {:.0} MiB)",
                mib(hwm),
                mib(idle)
            ),
            Err(e) => println!("  airlock did not stream it: {e}"),
        }
        report.push(Line {
            figure: format!(
                "peak RSS, one {}-row transaction ({})",
                thousands(rows as f64),
                if self.opts.memory_guests {
                    "guests"
                } else {
                    "no guests"
                }
            ),
            airlock: match &outcome {
                Ok(()) if lake.poll() < rows => format!(
                    "{:.0} MiB ({} rows lost)",
                    mib(hwm),
                    thousands((rows - lake.poll()) as f64)
                ),
                Ok(()) => format!("{:.0} MiB", mib(hwm)),
                Err(_) => format!("failed ({:.0} MiB seen)", mib(hwm)),
            },
            reference: format!("idle {:.0} MiB", mib(idle)),
            budget: format!("<= {RSS_BUDGET_MIB:.0} MiB"),
            result: pass(ok),
        });
        out.insert(
            "memory".into(),
            json!({
                "rows": rows, "rows_lost": rows - lake.poll().min(rows), "peak_rss_bytes": hwm, "idle_rss_bytes": idle, "secs": secs,
                "spill_bytes": spill_bytes, "stream_bytes": stream_bytes,
                "visible_after_commit_secs": visible_after.map(|v| v.as_secs_f64()),
                "walsender_sent_after_commit_secs": sent_after.map(|v| v.as_secs_f64()),
                "walsender_cpu_secs": sender_cpu,
                "airlock_after_sent": after_sent.map(|(wall, cpu)| json!({ "secs": wall, "cpu_secs": cpu })),
                "visible_budget_secs": BIG_VISIBLE_BUDGET.as_secs_f64(),
                "error": outcome.as_ref().err().map(|e| e.to_string()),
                "budget_bytes": (RSS_BUDGET_MIB * 1024.0 * 1024.0) as u64, "pass": ok,
                "guests": guests,
            }),
        );
        discard(&dir);
        client
            .batch_execute(
                "SELECT pg_drop_replication_slot('bench_big'); DROP TABLE bench_big; CHECKPOINT",
            )
            .await?;
        Ok(())
    }

    /// `pg_recvlogical` on `slot` (pgoutput v1, `binary` values or text) into
    /// /dev/null until `end_lsn`: its seconds, and the CPU seconds of it and of its
    /// walsender, sampled while it runs.
    async fn recvlogical(
        &self,
        client: &tokio_postgres::Client,
        slot: &str,
        end_lsn: &str,
        binary: bool,
    ) -> Result<(f64, f64, f64)> {
        let start = Instant::now();
        let mut recv = tool(&self.bindir, "pg_recvlogical")
            .args(conn_args(&self.cluster, "postgres"))
            .args(["--slot", slot, "--start", "--no-loop"])
            .args(["--endpos", end_lsn])
            .args([
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=bench_drain",
            ])
            .args(if binary {
                &["-o", "binary=true"][..]
            } else {
                &[][..]
            })
            .args(["-f", "/dev/null"])
            .spawn()?;
        let recv_pid = recv.id().unwrap_or(0);
        let (mut recv_cpu, mut sender_cpu) = (0.0f64, 0.0f64);
        let status = loop {
            if let Some(status) = recv.try_wait()? {
                break status;
            }
            recv_cpu = cpu_secs(recv_pid).unwrap_or(recv_cpu);
            if let Some(pid) = slot_pid(client, slot).await? {
                sender_cpu = cpu_secs(pid).unwrap_or(sender_cpu);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let secs = start.elapsed().as_secs_f64();
        if !status.success() {
            bail!("pg_recvlogical on {slot} failed with {status}");
        }
        Ok((secs, recv_cpu, sender_cpu))
    }

    /// One pgbench run; returns its TPS (without initial connection time).
    async fn pgbench(&self) -> Result<f64> {
        let o = &self.opts;
        let client = self.cluster.connect("bench_pgbench").await?;
        client.batch_execute("CHECKPOINT").await?;
        let output = tool(&self.bindir, "pgbench")
            .args(server_args(&self.cluster))
            .args(["-n", "-c", &o.pgbench_clients.to_string()])
            .args(["-j", &o.pgbench_clients.div_ceil(2).to_string()])
            .args(["-T", &o.pgbench_secs.to_string(), "bench_pgbench"])
            .stdin(Stdio::null())
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "pgbench failed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        stdout
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|t| t.parse().ok())
            .with_context(|| format!("no tps in pgbench's output: {stdout}"))
    }

    /// The pgbench database (`pgbench -i` at `--pgbench-scale`) with its four tables
    /// published as `bench_pgbench`: created by the first part that needs it.
    /// A new, empty database `name` (dropped first if a run left it).
    async fn scratch_database(&self, name: &str) -> Result<tokio_postgres::Client> {
        let admin = self.cluster.connect("postgres").await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(self.cluster.connect(name).await?)
    }

    /// Drops a database `scratch_database` made.
    async fn drop_database(&self, name: &str) {
        if let Ok(admin) = self.cluster.connect("postgres").await {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                .await;
        }
    }

    async fn pgbench_database(&self) -> Result<tokio_postgres::Client> {
        let o = &self.opts;
        let admin = self.cluster.connect("postgres").await?;
        let exists = admin
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = 'bench_pgbench'",
                &[],
            )
            .await?
            .is_some();
        if exists {
            return Ok(self.cluster.connect("bench_pgbench").await?);
        }
        admin.batch_execute("CREATE DATABASE bench_pgbench").await?;
        println!("primary: pgbench -i -s {} ...", o.pgbench_scale);
        let init = tool(&self.bindir, "pgbench")
            .args(server_args(&self.cluster))
            .args([
                "-i",
                "-q",
                "-s",
                &o.pgbench_scale.to_string(),
                "bench_pgbench",
            ])
            .stdin(Stdio::null())
            .output()
            .await?;
        if !init.status.success() {
            bail!(
                "pgbench -i failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
        }
        let client = self.cluster.connect("bench_pgbench").await?;
        // pgbench_history has no key: FULL identity lets its rows be replicated whatever
        // is published (pgbench only inserts there).
        client
            .batch_execute(
                "ALTER TABLE pgbench_history REPLICA IDENTITY FULL;
                 CREATE PUBLICATION bench_pgbench FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history;",
            )
            .await?;
        Ok(client)
    }

    async fn primary(
        &self,
        report: &mut Vec<Line>,
        out: &mut serde_json::Map<String, Json>,
    ) -> Result<()> {
        let o = &self.opts;
        let client = self.pgbench_database().await?;
        let mut none = Vec::new();
        let mut recv = Vec::new();
        let mut air = Vec::new();
        let mut catch_up = Vec::new();
        let mut air_errors: Vec<String> = Vec::new();
        for round in 1..=o.rounds {
            println!(
                "  round {round}/{}: pgbench -c {} -j {} -T {} with no slot, with pg_recvlogical, with airlock (order alternates by round)",
                o.rounds,
                o.pgbench_clients,
                o.pgbench_clients.div_ceil(2),
                o.pgbench_secs
            );
            // Alternate the order (ABC, CBA, ...) so a trend in the machine's load
            // does not favour one side.
            let mut order = ["none", "pg_recvlogical", "airlock"];
            if round % 2 == 0 {
                order.reverse();
            }
            for which in order {
                match which {
                    "none" => {
                        none.push(self.pgbench().await?);
                    }
                    "pg_recvlogical" => {
                        client
                        .batch_execute(
                            "SELECT pg_create_logical_replication_slot('pgbench_recvlogical', 'pgoutput')",
                        )
                        .await?;
                        let mut consumer = tool(&self.bindir, "pg_recvlogical")
                            .args(conn_args(&self.cluster, "bench_pgbench"))
                            .args(["--slot", "pgbench_recvlogical", "--start", "--no-loop"])
                            .args([
                                "-o",
                                "proto_version=1",
                                "-o",
                                "publication_names=bench_pgbench",
                            ])
                            .args(["-f", "/dev/null"])
                            .stdin(Stdio::null())
                            .spawn()?;
                        wait_slot_active(&client, "pgbench_recvlogical").await?;
                        recv.push(self.pgbench().await?);
                        let _ = consumer.kill().await;
                        drop_slot(&client, "pgbench_recvlogical").await?;
                    }
                    _ => {
                        client
                        .batch_execute(
                            "SELECT pg_create_logical_replication_slot('bench_pgbench', 'pgoutput')",
                        )
                        .await?;
                        let dir = self.dir(&format!("primary-{round}"))?;
                        std::fs::create_dir_all(dir.join("plugins"))?;
                        let text = config(
                            &self.cluster,
                            "bench_pgbench",
                            "bench_pgbench",
                            &dir,
                            None,
                            "",
                            ALLOW_ALL,
                        );
                        let mut airlock = Airlock::start(&text, &dir).await?;
                        wait_slot_active(&client, "bench_pgbench").await?;
                        let tps = self.pgbench().await?;
                        if let Err(e) = airlock.check_alive() {
                            // A run during which airlock stopped does not measure its cost.
                            let message = e.to_string();
                            let last = message.lines().last().unwrap_or_default().to_owned();
                            println!("  airlock stopped during the run: {last}");
                            air_errors.push(last);
                            drop_slot(&client, "bench_pgbench").await?;
                            discard(&dir);
                            continue;
                        }
                        air.push(tps);
                        // How far behind airlock was when pgbench stopped.
                        catch_up.push(caught_up(&client, "bench_pgbench").await?.as_secs_f64());
                        airlock.stop().await?;
                        drop_slot(&client, "bench_pgbench").await?;
                        discard(&dir);
                    }
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (tps_none, tps_recv, tps_air) = (mean(&none), mean(&recv), mean(&air));
        let (r_recv, r_air) = (tps_recv / tps_none, tps_air / tps_none);
        let ok = air_errors.is_empty() && r_air >= r_recv - PRIMARY_RATIO_SLACK;
        println!(
            "  TPS no slot {none:.0?}, pg_recvlogical {recv:.0?}, airlock {air:.0?}; airlock caught up {catch_up:.1?} s after pgbench stopped"
        );
        report.push(Line {
            figure: format!(
                "primary cost: pgbench TPS / no slot ({})",
                thousands(tps_none)
            ),
            airlock: if air_errors.is_empty() {
                format!("{r_air:.3} ({})", thousands(tps_air))
            } else {
                format!("stopped in {}/{} runs", air_errors.len(), o.rounds)
            },
            reference: format!("{r_recv:.3} ({}) (pg_recvlogical)", thousands(tps_recv)),
            budget: format!("within {PRIMARY_RATIO_SLACK} of pg_recvlogical"),
            result: pass(ok),
        });
        out.insert(
            "primary".into(),
            json!({
                "scale": o.pgbench_scale, "clients": o.pgbench_clients, "secs": o.pgbench_secs,
                "rounds": o.rounds, "tps_no_slot": none, "tps_pg_recvlogical": recv, "tps_airlock": air,
                "airlock_catch_up_secs": catch_up, "airlock_errors": air_errors,
                "ratio_pg_recvlogical": r_recv, "ratio_airlock": r_air,
                "budget_slack": PRIMARY_RATIO_SLACK, "pass": ok, "airlock_guests": "none (pass-through)",
            }),
        );
        Ok(())
    }
    /// pgbench with its tables published and airlock streaming them (identity
    /// `record`, pass-through), with the identity triggers enabled and disabled in
    /// interleaved rounds (at least five each); the medians side by side.
    async fn identity(
        &self,
        report: &mut Vec<Line>,
        out: &mut serde_json::Map<String, Json>,
    ) -> Result<()> {
        let o = &self.opts;
        let client = self.pgbench_database().await?;
        let rounds = o.rounds.max(IDENTITY_MIN_ROUNDS);
        let dir = self.dir("identity")?;
        std::fs::create_dir_all(dir.join("plugins"))?;
        let text = config(
            &self.cluster,
            "bench_pgbench",
            "bench_pgbench",
            &dir,
            None,
            "",
            ALLOW_ALL,
        )
        .replace(
            "status_interval = \"1s\"\n",
            "status_interval = \"1s\"\nidentity = \"record\"\n",
        );
        std::fs::write(dir.join("airlock.toml"), &text)?;
        airlock_command(&["identity", "install"], &dir.join("airlock.toml"))?;
        client
            .batch_execute("SELECT pg_create_logical_replication_slot('bench_pgbench', 'pgoutput')")
            .await?;
        let mut airlock = Airlock::start(&text, &dir).await?;
        wait_slot_active(&client, "bench_pgbench").await?;
        let tables = [
            "pgbench_accounts",
            "pgbench_branches",
            "pgbench_tellers",
            "pgbench_history",
        ];
        let mut with = Vec::new();
        let mut without = Vec::new();
        for round in 1..=rounds {
            println!(
                "  identity round {round}/{rounds}: pgbench -c {} -T {} with and without the identity triggers (order alternates)",
                o.pgbench_clients, o.pgbench_secs
            );
            let mut order = [true, false];
            if round % 2 == 0 {
                order.reverse();
            }
            for triggers in order {
                let verb = if triggers { "ENABLE" } else { "DISABLE" };
                for table in tables {
                    client
                        .batch_execute(&format!(
                            "ALTER TABLE {table} {verb} TRIGGER airlock_identity"
                        ))
                        .await?;
                }
                let tps = self.pgbench().await?;
                airlock.check_alive()?;
                if triggers {
                    with.push(tps);
                } else {
                    without.push(tps);
                }
                // Caught up before the next run, so no backlog bleeds into it.
                caught_up(&client, "bench_pgbench").await?;
            }
        }
        airlock.stop().await?;
        drop_slot(&client, "bench_pgbench").await?;
        airlock_command(&["identity", "uninstall"], &dir.join("airlock.toml"))?;
        discard(&dir);
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        };
        let (m_with, m_without) = (median(&with), median(&without));
        let ratio = m_with / m_without;
        let ok = ratio >= IDENTITY_RATIO;
        println!("  TPS with the identity triggers {with:.0?}, without {without:.0?}");
        report.push(Line {
            figure: format!("identity: pgbench TPS, median of {rounds} interleaved"),
            airlock: format!("{} (triggers)", thousands(m_with)),
            reference: format!("{} (no triggers)", thousands(m_without)),
            budget: format!("ratio {ratio:.3} >= {IDENTITY_RATIO}"),
            result: pass(ok),
        });
        out.insert(
            "identity".into(),
            json!({
                "scale": o.pgbench_scale, "clients": o.pgbench_clients, "secs": o.pgbench_secs,
                "rounds": rounds, "tps_with_triggers": with, "tps_without_triggers": without,
                "median_with": m_with, "median_without": m_without, "ratio": ratio,
                "budget": IDENTITY_RATIO, "pass": ok,
            }),
        );
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn millis(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.0} ms", ms(d))
    }
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// nproc, CPU model, memory and the load average.
fn machine() -> Json {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let opts = Options::parse()?;
    let bindir = airlock::demo::cluster::find_bindir()?;
    let json_path = opts.json.clone().unwrap_or_else(|| {
        // target/release/bench_e2e -> target/bench/e2e.json
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent()?.parent().map(Path::to_path_buf))
            .unwrap_or_else(std::env::temp_dir)
            .join("bench/e2e.json")
    });
    let machine = machine();
    let load_before = loadavg();
    println!(
        "machine: {} cores, {}, {} GiB; load average {load_before}",
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["memory_gib"]
    );
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start("max_wal_size = 1GB\ncheckpoint_timeout = 30min\nwal_sender_timeout = 0\n")
    })
    .await??;
    let work = std::env::temp_dir().join(format!("airlock-bench-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let bench = Bench {
        cluster,
        bindir,
        work: work.clone(),
        opts,
    };
    bench.warm_guests().await?;

    let mut report = Vec::new();
    let mut out = serde_json::Map::new();
    let mut failures = Vec::new();
    let parts: [(&str, bool); 7] = [
        ("snapshot", bench.opts.runs("snapshot")),
        ("incremental", bench.opts.runs("incremental")),
        ("drain", bench.opts.runs("drain")),
        ("latency", bench.opts.runs("latency")),
        ("memory", bench.opts.runs("memory")),
        ("primary", bench.opts.runs("primary")),
        ("identity", bench.opts.runs("identity")),
    ];
    for (part, wanted) in parts {
        if !wanted {
            continue;
        }
        let result = match part {
            "drain" => bench.drain(&mut report, &mut out).await,
            "latency" => bench.latency(&mut report, &mut out).await,
            "memory" => bench.memory(&mut report, &mut out).await,
            "primary" => bench.primary(&mut report, &mut out).await,
            "snapshot" => bench.snapshot(&mut report, &mut out).await,
            "incremental" => bench.incremental(&mut report, &mut out).await,
            _ => bench.identity(&mut report, &mut out).await,
        };
        if let Err(e) = result {
            println!("{part}: failed: {e:#}");
            failures.push(part);
            report.push(Line {
                figure: part.into(),
                airlock: "error".into(),
                reference: String::new(),
                budget: String::new(),
                result: "FAIL",
            });
            out.insert(part.into(), json!({ "error": format!("{e:#}") }));
        }
    }
    let load_after = loadavg();

    println!(
        "\nairlock end to end, side by side (load average before {load_before}, after {load_after})"
    );
    let widths = [
        report
            .iter()
            .map(|l| l.figure.len())
            .max()
            .unwrap_or(0)
            .max(6),
        report
            .iter()
            .map(|l| l.airlock.len())
            .max()
            .unwrap_or(0)
            .max(7),
        report
            .iter()
            .map(|l| l.reference.len())
            .max()
            .unwrap_or(0)
            .max(9),
        report
            .iter()
            .map(|l| l.budget.len())
            .max()
            .unwrap_or(0)
            .max(6),
    ];
    println!(
        "{:<w0$}  {:>w1$}  {:>w2$}  {:<w3$}  result",
        "figure",
        "airlock",
        "reference",
        "budget",
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2],
        w3 = widths[3]
    );
    for l in &report {
        println!(
            "{:<w0$}  {:>w1$}  {:>w2$}  {:<w3$}  {}",
            l.figure,
            l.airlock,
            l.reference,
            l.budget,
            l.result,
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }

    let mut doc = serde_json::Map::new();
    doc.insert("machine".into(), machine);
    doc.insert("load_before".into(), load_before.into());
    doc.insert("load_after".into(), load_after.into());
    doc.insert(
        "when_unix".into(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .into(),
    );
    doc.extend(out);
    if let Some(parent) = json_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&Json::Object(doc))?,
    )?;
    println!("\nresults as JSON: {}", json_path.display());
    drop(bench);
    if std::env::var_os("AIRLOCK_KEEP_BENCH").is_some() {
        println!("kept {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    if !failures.is_empty() {
        bail!("{} failed to run", failures.join(", "));
    }
    Ok(())
}
