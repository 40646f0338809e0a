//! Transactions streamed while they run (pgoutput protocol 2, `streaming = on`),
//! against a real PostgreSQL forced to stream: `logical_decoding_work_mem = 64kB`,
//! and on 16 and later also `debug_logical_replication_streaming = immediate`.
//!
//! What comes out is checked row by row against what the transactions did: a large
//! transaction with a savepoint rolled back, one released, and a savepoint released
//! inside one rolled back (nested subtransactions), interleaved with a
//! small one that commits first, and a large transaction rolled back. The primary's
//! own statistics show that it streamed and spilled nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock::demo::Cluster;
use airlock_tests::source_support::config;
use airlock_tests::*;
use anyhow::{Context, Result, bail, ensure};

/// A cluster that streams every transaction past 64 kB of decoding memory.
fn streaming_cluster() -> Cluster {
    Cluster::start("logical_decoding_work_mem = 64kB")
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"))
}

/// `(spill_bytes, stream_txns, stream_bytes)` of `slot`, from the primary.
async fn slot_stats(db: &tokio_postgres::Client, slot: &str) -> Result<(i64, i64, i64)> {
    let row = db
        .query_opt(
            "SELECT spill_bytes, stream_txns, stream_bytes FROM pg_stat_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .with_context(|| format!("no statistics for slot {slot}"))?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// A lake row as `(op, id, v, n)`.
type Row = (String, i64, Option<String>, Option<i64>);

/// The lake's rows as `(op, id, v, n)`, in commit order and, within a transaction,
/// in the order they were made.
fn lake_rows(table: &Path) -> Result<Vec<Row>> {
    let rows = query_lake(
        table,
        "SELECT _op, id, v, n FROM lake ORDER BY _commit_lsn, _lsn",
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r["_op"].as_str().unwrap_or_default().to_owned(),
                r["id"].as_i64().unwrap_or(i64::MIN),
                r["v"].as_str().map(str::to_owned),
                r["n"].as_i64(),
            )
        })
        .collect())
}

async fn wait_rows(table: &Path, count: usize) -> Result<Vec<Row>> {
    let start = Instant::now();
    loop {
        if table.join("_delta_log").is_dir() {
            let rows = lake_rows(table)?;
            if rows.len() >= count {
                return Ok(rows);
            }
        }
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "the lake did not reach {count} rows within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn insert(id: i64, v: &str) -> Row {
    ("c".into(), id, Some(v.to_owned()), Some(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_transactions_arrive_exactly_with_savepoints_and_rollbacks() -> Result<()> {
    let dir = temp_dir("streaming");
    let pg = streaming_cluster();
    let db = pg.connect("postgres").await?;
    let other = pg.connect("postgres").await?;
    let version = airlock::source::catalog::server_version(&db).await?;
    if version >= 160_000 {
        // Every transaction streams from its first change, the small ones too.
        db.batch_execute("ALTER SYSTEM SET debug_logical_replication_streaming = immediate")
            .await?;
        db.batch_execute("SELECT pg_reload_conf()").await?;
    }
    db.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text, n bigint);
         CREATE PUBLICATION airlock FOR TABLE t;",
    )
    .await?;
    let spool = dir.join("spool");
    let admin = format!("127.0.0.1:{}", airlock::demo::cluster::free_port());
    let host = Host::start(
        &config(
            &pg.url("postgres"),
            &dir,
            "streamed",
            &format!("spool_dir = \"{}\"", spool.display()),
        )
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{admin}\"")),
        &dir,
    );
    wait_slot_active(&db, "streamed").await?;

    // A: large, with a savepoint rolled back and one released; B commits while A runs.
    db.batch_execute(
        "BEGIN;
         INSERT INTO t SELECT g, 'a' || g, g FROM generate_series(1, 20000) g;",
    )
    .await?;
    // A's first block streams before B, which commits while A runs (WAL order).
    other
        .batch_execute("INSERT INTO t VALUES (500001, 'b', 500001)")
        .await?;
    db.batch_execute(
        "SAVEPOINT s1;
         INSERT INTO t SELECT g, 'rolled back', g FROM generate_series(20001, 30000) g;
         SELECT pg_logical_emit_message(true, 'airlock-test', 'in a savepoint rolled back');
         ROLLBACK TO SAVEPOINT s1;
         SAVEPOINT s2;
         INSERT INTO t SELECT g, 's' || g, g FROM generate_series(30001, 35000) g;
         RELEASE SAVEPOINT s2;
         SAVEPOINT outer_sp;
         INSERT INTO t SELECT g, 'rolled back', g FROM generate_series(40001, 42000) g;
         SAVEPOINT inner_sp;
         INSERT INTO t SELECT g, 'rolled back', g FROM generate_series(42001, 44000) g;
         RELEASE SAVEPOINT inner_sp;
         INSERT INTO t SELECT g, 'rolled back', g FROM generate_series(44001, 45000) g;
         ROLLBACK TO SAVEPOINT outer_sp;
         UPDATE t SET n = -n WHERE id <= 100;
         DELETE FROM t WHERE id > 34900 AND id <= 35000;
         SELECT pg_logical_emit_message(true, 'airlock-test', 'inside a streamed transaction');
         COMMIT;",
    )
    .await?;
    // C: large, rolled back. D: small, after everything.
    db.batch_execute(
        "BEGIN;
         INSERT INTO t SELECT g, 'rolled back', g FROM generate_series(100001, 140000) g;
         ROLLBACK;
         INSERT INTO t VALUES (500002, 'd', 500002);",
    )
    .await?;

    let mut expected: Vec<Row> = vec![insert(500001, "b")];
    expected.extend((1..=20000).map(|id| insert(id, &format!("a{id}"))));
    expected.extend((30001..=35000).map(|id| insert(id, &format!("s{id}"))));
    expected.extend((1..=100).map(|id| ("u".into(), id, Some(format!("a{id}")), Some(-id))));
    expected.extend((34901..=35000).map(|id| ("d".into(), id, None, None)));
    expected.push(insert(500002, "d"));

    let table = dir.join("lake/public.t");
    let rows = wait_rows(&table, expected.len()).await?;

    // What the primary paid, as PostgreSQL counts it, in /status and /metrics.
    let (spill, txns, bytes) = slot_stats(&db, "streamed").await?;
    let status = wait_status(
        &admin,
        Duration::from_secs(30),
        "the slot's statistics",
        |s| s["source"]["slot_stats"]["stream_bytes"].as_i64() == Some(bytes),
    )
    .await?;
    let stats = &status["source"]["slot_stats"];
    ensure!(
        stats["stream_txns"].as_i64() == Some(txns) && stats["spill_bytes"].as_i64() == Some(spill),
        "{stats:#}"
    );
    let failover = &status["source"]["slot_failover"];
    if version >= 170_000 {
        ensure!(
            *failover == serde_json::json!(false),
            "17+ says whether the slot fails over: {failover}"
        );
    } else {
        ensure!(
            failover.is_null(),
            "before 17 there are no failover slots: {failover}"
        );
    }
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .text()
        .await?;
    ensure!(
        metrics.contains(&format!("airlock_slot_streamed_bytes_total {bytes}"))
            && metrics.contains("airlock_slot_spilled_bytes_total 0"),
        "{metrics}"
    );
    host.stop().await?;
    if rows != expected {
        let first = rows
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(rows.len().min(expected.len()));
        bail!(
            "the lake differs from the transactions at row {first} of {} (expected {}): {:?} where {:?} was expected",
            rows.len(),
            expected.len(),
            rows.get(first),
            expected.get(first)
        );
    }

    let (spill, txns, bytes) = slot_stats(&db, "streamed").await?;
    ensure!(
        spill == 0,
        "the primary spilled {spill} bytes for airlock's slot"
    );
    ensure!(
        txns >= 2 && bytes > 0,
        "the primary streamed {txns} transactions, {bytes} bytes"
    );
    // The spool's files were unlinked as they were made: none is left.
    let left: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "spool files left behind: {left:?}");
    Ok(())
}

/// airlock killed while a transaction streams to it: the restarted host takes the
/// transaction streamed again from its start, and every row lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_stream_resumes_and_lands_every_row_once() -> Result<()> {
    let dir = temp_dir("streaming-crash");
    let pg = streaming_cluster();
    let db = pg.connect("postgres").await?;
    let other = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text, n bigint);
         CREATE PUBLICATION airlock FOR TABLE t;",
    )
    .await?;
    let spool = dir.join("spool");
    let config_path = dir.join("airlock.toml");
    std::fs::write(
        &config_path,
        config(
            &pg.url("postgres"),
            &dir,
            "crash",
            &format!("spool_dir = \"{}\"", spool.display()),
        ),
    )?;
    let log = dir.join("host.log");
    let mut host = spawn_host(&config_path, &log);
    wait_slot_active(&db, "crash").await?;

    db.batch_execute(
        "BEGIN; INSERT INTO t SELECT g, 'v' || g, g FROM generate_series(1, 60000) g;",
    )
    .await?;
    // A commit elsewhere flushes the WAL written so far, which the walsender streams.
    // (PostgreSQL counts a stream in pg_stat_replication_slots when it next decodes a
    // commit, seen on 15 and 16: airlock's own spool is the witness.)
    other.batch_execute("SELECT txid_current()").await?;
    // The spool is on disk, and unlinked: airlock holds a deleted file in the folder.
    let pid = host.id();
    let start = Instant::now();
    loop {
        let held = std::fs::read_dir(format!("/proc/{pid}/fd"))?
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|target| {
                let target = target.to_string_lossy().into_owned();
                target.starts_with(&*spool.to_string_lossy()) && target.ends_with("(deleted)")
            });
        if held {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "airlock holds no unlinked spool file in {} after 60 s; log:\n{}",
            spool.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.signal("-KILL");
    host.wait_exit(Duration::from_secs(10))
        .context("airlock did not die of SIGKILL")?;
    drop(host);

    db.batch_execute(
        "INSERT INTO t SELECT g, 'v' || g, g FROM generate_series(60001, 70000) g; COMMIT;",
    )
    .await?;
    let _host = spawn_host(&config_path, &log);
    let table = dir.join("lake/public.t");
    let rows = wait_rows(&table, 70_000).await?;
    let mut ids: Vec<i64> = rows.iter().map(|r| r.1).collect();
    ids.sort_unstable();
    ensure!(
        ids == (1..=70_000).collect::<Vec<_>>(),
        "{} rows in the lake, {} distinct; expected 70,000 once each",
        ids.len(),
        {
            ids.dedup();
            ids.len()
        }
    );
    let left: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "spool files left behind: {left:?}");
    Ok(())
}
