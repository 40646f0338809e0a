//! Faults at the source, through a real cluster: a PostgreSQL restart mid-stream
//! (reconnect, resume from the slot, nothing lost or repeated), the errors an operator
//! sees for a misconfigured server (each asserted: what happened and what to do), the
//! publication created from `[source] tables`, a slot held by another consumer, an
//! invalidated slot, and an idle slot that still advances.

use airlock_tests::source_support as support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use airlock_tests::*;
use anyhow::Result;
use serde_json::json;

async fn slot_lsns(db: &tokio_postgres::Client, slot: &str) -> Result<(u64, u64)> {
    let row = db
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0')::int8, (restart_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_stream_loses_and_repeats_nothing() -> Result<()> {
    let dir = temp_dir("faults-restart");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute("CREATE TABLE events (id integer PRIMARY KEY, v text); CREATE PUBLICATION airlock FOR TABLE events;").await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "restart", ""),
        &dir,
    );
    support::wait_for_slot(&db, "restart").await?;

    for id in 1..=100 {
        db.execute("INSERT INTO events VALUES ($1, 'before')", &[&id])
            .await?;
    }
    // Restart while the host is streaming (and probably mid-flush).
    tokio::task::block_in_place(|| pg.restart())?;
    let db = pg.connect("postgres").await?;
    for id in 101..=150 {
        db.execute("INSERT INTO events VALUES ($1, 'after restart')", &[&id])
            .await?;
    }
    // And once more, the hard way: no shutdown checkpoint, crash recovery.
    tokio::task::block_in_place(|| pg.stop_server("immediate").and_then(|()| pg.start_server()))?;
    let db = pg.connect("postgres").await?;
    for id in 151..=200 {
        db.execute("INSERT INTO events VALUES ($1, 'after crash')", &[&id])
            .await?;
    }
    let table = dir.join("lake/public.events");
    let rows =
        airlock_tests::wait_for_lake(&table, Duration::from_secs(120), |r| r.len() >= 200).await?;
    // Give a duplicate, if any, the time to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows = if airlock_tests::read_lake("duckdb", &table)?.len() != rows.len() {
        airlock_tests::read_lake("duckdb", &table)?
    } else {
        rows
    };
    host.stop().await?;
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=200).collect::<Vec<_>>(),
        "every row once, in commit order"
    );
    let lsns: HashSet<i64> = rows.iter().map(|r| r["_lsn"].as_i64().unwrap()).collect();
    assert_eq!(lsns.len(), 200, "no change twice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_a_clear_error() -> Result<()> {
    let dir = temp_dir("faults-wal");
    let pg = Cluster::start("wal_level = replica")?;
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE t (id integer PRIMARY KEY); CREATE PUBLICATION airlock FOR TABLE t;",
    )
    .await?;
    let error = Host::start(&support::config(&pg.url("postgres"), &dir, "wal", ""), &dir)
        .failure()
        .await?;
    assert!(error.contains("wal_level is `replica`"), "{error}");
    assert!(
        error.contains("set wal_level = logical in postgresql.conf and restart PostgreSQL"),
        "{error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_is_a_clear_error() -> Result<()> {
    let dir = temp_dir("faults-role");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE t (id integer PRIMARY KEY); CREATE PUBLICATION airlock FOR TABLE t;
         CREATE ROLE reader LOGIN; GRANT SELECT ON t TO reader;",
    )
    .await?;
    let url = format!("postgres://reader@127.0.0.1:{}/postgres", pg.port);
    let error = Host::start(&support::config(&url, &dir, "role", ""), &dir)
        .failure()
        .await?;
    assert!(error.contains("user `reader` lacks a privilege"), "{error}");
    assert!(
        error.contains("ALTER ROLE reader WITH REPLICATION"),
        "{error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_publication_is_an_error_or_created_from_tables() -> Result<()> {
    let dir = temp_dir("faults-pub");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute("CREATE SCHEMA sales; CREATE TABLE sales.\"Orders\" (id integer PRIMARY KEY); CREATE TABLE other (id integer);").await?;

    // Without `tables`: stop, naming the publication and the fix.
    let error = Host::start(&support::config(&pg.url("postgres"), &dir, "pub", ""), &dir)
        .failure()
        .await?;
    assert!(
        error.contains("publication `airlock` does not exist"),
        "{error}"
    );
    assert!(
        error.contains("CREATE PUBLICATION airlock FOR TABLE"),
        "{error}"
    );

    // With `tables`: airlock creates it and streams.
    let config = support::config(
        &pg.url("postgres"),
        &dir,
        "pub",
        "tables = [\"sales.Orders\"]",
    );
    let host = Host::start(&config, &dir);
    support::wait_for_slot(&db, "pub").await?;
    let published: Vec<String> = db
        .query("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'airlock'", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(published, vec!["sales.Orders".to_owned()]);
    db.batch_execute("INSERT INTO sales.\"Orders\" VALUES (1); INSERT INTO other VALUES (1);")
        .await?;
    let rows = airlock_tests::wait_for_lake(
        &dir.join("lake/sales.Orders"),
        Duration::from_secs(60),
        |r| !r.is_empty(),
    )
    .await?;
    assert_eq!(rows[0]["id"], json!(1));
    host.stop().await?;
    assert!(!dir.join("lake/public.other").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_held_by_another_consumer_is_retried_then_reported() -> Result<()> {
    let dir = temp_dir("faults-busy");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE t (id integer PRIMARY KEY); CREATE PUBLICATION airlock FOR TABLE t;",
    )
    .await?;
    let first = Host::start(
        &support::config(&pg.url("postgres"), &dir.join("first"), "busy", ""),
        &dir.join("first"),
    );
    support::wait_for_slot(&db, "busy").await?;
    for _ in 0..100 {
        let active: bool = db
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'busy'",
                &[],
            )
            .await?
            .get(0);
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid: i32 = db
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'busy'",
            &[],
        )
        .await?
        .get(0);

    let second_dir = dir.join("second");
    let started = Instant::now();
    let config = support::config(
        &pg.url("postgres"),
        &second_dir,
        "busy",
        "slot_busy_timeout = \"2s\"",
    );
    let error = Host::start(&config, &second_dir).failure().await?;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "retried for slot_busy_timeout first"
    );
    assert!(
        error.contains("replication slot `busy` has been in use by another consumer"),
        "{error}"
    );
    assert!(
        error.contains(&format!("pg_terminate_backend({pid})")),
        "{error}"
    );

    // The first host is not disturbed.
    db.execute("INSERT INTO t VALUES (1)", &[]).await?;
    airlock_tests::wait_for_lake(
        &dir.join("first/lake/public.t"),
        Duration::from_secs(60),
        |r| r.len() == 1,
    )
    .await?;
    assert!(!first.is_finished());
    first.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_a_clear_error() -> Result<()> {
    let dir = temp_dir("faults-lost");
    let pg = Cluster::start("max_slot_wal_keep_size = 1MB")?;
    let db = pg.connect("postgres").await?;
    db.batch_execute("CREATE TABLE t (id integer PRIMARY KEY); CREATE TABLE filler (x text); CREATE PUBLICATION airlock FOR TABLE t;").await?;
    let config = support::config(&pg.url("postgres"), &dir, "lost", "");
    let host = Host::start(&config, &dir);
    support::wait_for_slot(&db, "lost").await?;
    host.stop().await?;
    // Write past max_slot_wal_keep_size while nobody reads the slot.
    for _ in 0..6 {
        db.batch_execute("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000); SELECT pg_switch_wal();").await?;
    }
    db.batch_execute("CHECKPOINT").await?;
    let status: Option<String> = db
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'lost'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(status.as_deref(), Some("lost"));

    let error = Host::start(&config, &dir).failure().await?;
    assert!(
        error.contains("replication slot `lost` can no longer be used"),
        "{error}"
    );
    assert!(error.contains("drop and recreate the slot"), "{error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_slot_advances_past_unpublished_writes() -> Result<()> {
    let dir = temp_dir("faults-idle");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE published (id integer PRIMARY KEY); CREATE TABLE unpublished (id integer);
         CREATE PUBLICATION airlock FOR TABLE published;",
    )
    .await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "idle", ""),
        &dir,
    );
    support::wait_for_slot(&db, "idle").await?;
    let (confirmed_before, restart_before) = slot_lsns(&db, "idle").await?;
    for i in 0..20 {
        db.execute("INSERT INTO unpublished VALUES ($1)", &[&i])
            .await?;
    }
    // A checkpoint lets restart_lsn move too (it needs a newer running-xacts record).
    db.batch_execute("CHECKPOINT").await?;
    let written: i64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
        .await?
        .get(0);
    let start = Instant::now();
    let mut last = (confirmed_before, restart_before);
    while start.elapsed() < Duration::from_secs(30) {
        last = slot_lsns(&db, "idle").await?;
        if last.0 >= written as u64 && last.1 > restart_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    host.stop().await?;
    assert!(
        last.0 >= written as u64,
        "confirmed_flush_lsn {:X} did not reach {written:X}",
        last.0
    );
    assert!(
        last.1 > restart_before,
        "restart_lsn did not move from {restart_before:X}"
    );
    assert!(!dir.join("lake/public.unpublished").exists());
    Ok(())
}
