//! Helpers shared by the source tests (types, toast, schema, source_faults, snapshot):
//! a config with an empty plugin folder, waiting for the slot, and a lake reader that
//! keeps non-finite floats (`NaN`, `±Infinity`) as strings so that they survive JSON.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use airlock_tests::root;
use anyhow::{Context, Result, bail};
use serde_json::Value as Json;

/// A config streaming slot `slot` into a lake under `dir/lake`, with no guests;
/// `source_extra` is appended to `[source]`.
pub fn config(url: &str, dir: &Path, slot: &str, source_extra: &str) -> String {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).expect("create plugin dir");
    format!(
        "[source]\nurl = \"{url}\"\nslot = \"{slot}\"\nstatus_interval = \"1s\"\n{source_extra}\n\
         [plugins]\ndir = \"{plugins}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{lake}\"\nflush_interval = \"200ms\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        plugins = plugins.display(),
        lake = dir.join("lake").display()
    )
}

/// Waits until the host has created slot `slot`.
pub async fn wait_for_slot(db: &tokio_postgres::Client, slot: &str) -> Result<()> {
    for _ in 0..600 {
        if db.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("slot {slot} was not created within 30 s")
}

const READER: &str = r#"
import json, math, sys
sys.path.insert(0, sys.argv[1])
import read_lake
def fix(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, list):
        return [fix(x) for x in v]
    return v
for row in read_lake.read_duckdb(sys.argv[2]):
    print(json.dumps({k: fix(read_lake.plain(v)) for k, v in row.items()}, sort_keys=True))
"#;

/// The rows of a lake table read by DuckDB (`delta_scan`), in change order.
pub fn read(table: &Path) -> Result<Vec<Json>> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(READER)
        .arg(root().join("tests/tools"))
        .arg(table)
        .output()
        .context("cannot run python3: install Python 3 (the README's test command sets it up)")?;
    if !out.status.success() {
        bail!("reading {} with DuckDB failed: {}", table.display(), String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line from the reader: {l}")))
        .collect()
}

/// Polls `read` until `done(rows)` holds.
pub async fn wait_rows(table: &Path, timeout: Duration, done: impl Fn(&[Json]) -> bool) -> Result<Vec<Json>> {
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < timeout {
        if table.join("_delta_log").is_dir() {
            last = read(table)?;
            if done(&last) {
                return Ok(last);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("lake {} did not reach the expected state within {timeout:?}; last read {} rows: {last:#?}", table.display(), last.len())
}

/// The row with `id` and `_op`.
pub fn row<'a>(rows: &'a [Json], id: i64, op: &str) -> &'a Json {
    rows.iter()
        .find(|r| r["id"].as_i64() == Some(id) && r["_op"] == op)
        .unwrap_or_else(|| panic!("no row id={id} _op={op} in {rows:#?}"))
}
