//! PostgreSQL WAL → airlock → a Delta lake on S3 (moto's S3 API server on 127.0.0.1),
//! read back row by row with the `deltalake` Python package; exactly once across a kill
//! of the host; the catalog and an offline compaction against the same bucket.

use airlock_tests::lake_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use airlock_tests::*;
use lake_support::{Moto, read_s3_table};
use serde_json::{Value as Json, json};

const SCHEMA: &str = "
CREATE TABLE accounts (
    id       bigint PRIMARY KEY,
    owner    text NOT NULL,
    balance  numeric(12,2),
    active   boolean,
    opened   timestamptz,
    ref      uuid,
    doc      jsonb
);
CREATE PUBLICATION airlock FOR TABLE accounts;
";

fn config(pg_url: &str, plugins: &std::path::Path, moto: &Moto) -> String {
    format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{pg_url}\"\nslot = \"s3lake\"\nstatus_interval = \"1s\"\n\
         [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{plugins}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"s3://lake/zone-a\"\nflush_interval = \"200ms\"\n\
         compact_min_files = 1000\n\
         storage_options = {options}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        plugins = plugins.display(),
        options = moto.storage_options_toml(),
    )
}

async fn wait_for_rows(moto: &Moto, host: &Host, n: usize) -> anyhow::Result<Vec<Json>> {
    let url = "s3://lake/zone-a/public.accounts";
    let start = Instant::now();
    let mut last = Err(anyhow::anyhow!("not read yet"));
    while start.elapsed() < Duration::from_secs(90) {
        anyhow::ensure!(!host.is_finished(), "the host stopped early");
        last = read_s3_table(url, &moto.storage_options());
        if let Ok(rows) = &last
            && rows.len() >= n
        {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    anyhow::bail!("{url} did not reach {n} rows within 90 s; last read: {last:#?}")
}

fn assert_once(rows: &[Json]) {
    let mut seen: HashMap<(i64, String, i64), usize> = HashMap::new();
    for r in rows {
        let key = (
            r["id"].as_i64().unwrap(),
            r["_op"].as_str().unwrap().to_owned(),
            r["_lsn"].as_i64().unwrap(),
        );
        *seen.entry(key).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "changes written more than once: {twice:?}"
    );
}

async fn wait_for_slot(db: &tokio_postgres::Client) -> anyhow::Result<()> {
    for _ in 0..200 {
        if db
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 's3lake'",
                &[],
            )
            .await?
            .is_some()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the host did not create the slot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_an_s3_lake_exactly_once_across_a_kill_and_read_back_row_by_row()
-> anyhow::Result<()> {
    let moto = Moto::start();
    moto.create_bucket("lake").await?;
    let dir = temp_dir("lake-s3");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(SCHEMA).await?;
    let plugins = plugin_dir(&dir, &[]);
    let config_text = config(&pg.url("postgres"), &plugins, &moto);

    let host = Host::start(&config_text, &dir);
    wait_for_slot(&db).await?;
    db.batch_execute(
        "BEGIN;
         INSERT INTO accounts VALUES (1, 'Ada', 1234567890.12, true, '2024-02-29 23:59:59.123456+00',
                                      'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{\"tier\": \"gold\"}');
         INSERT INTO accounts VALUES (2, 'Grace', -0.01, false, '1970-01-01 00:00:00+00', NULL, NULL);
         COMMIT;
         UPDATE accounts SET balance = 99.99 WHERE id = 1;
         DELETE FROM accounts WHERE id = 2;",
    )
    .await?;
    let rows = wait_for_rows(&moto, &host, 4).await?;
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let ops: Vec<(i64, &str)> = rows
        .iter()
        .map(|r| (r["id"].as_i64().unwrap(), r["_op"].as_str().unwrap()))
        .collect();
    assert_eq!(ops, vec![(1, "c"), (2, "c"), (1, "u"), (2, "d")]);
    let ada = &rows[0];
    assert_eq!(ada["owner"], json!("Ada"));
    assert_eq!(ada["balance"], json!("1234567890.12"));
    assert_eq!(ada["active"], json!(true));
    assert_eq!(ada["opened"], json!("2024-02-29T23:59:59.123456+00:00"));
    assert_eq!(ada["ref"], json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
    assert_eq!(ada["doc"], json!("{\"tier\": \"gold\"}"));
    assert_eq!(rows[1]["balance"], json!("-0.01"));
    assert_eq!(rows[1]["ref"], Json::Null);
    assert_eq!(rows[2]["balance"], json!("99.99"));
    assert_eq!(
        rows[0]["_commit_lsn"], rows[1]["_commit_lsn"],
        "one transaction, one commit LSN"
    );

    // Kill the host (no drain, no final acknowledgement), write while it is down, start
    // it again: every change exactly once.
    host.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.batch_execute(
        "INSERT INTO accounts VALUES (3, 'Alan', 3, true, now(), NULL, '[1, 2]');
         UPDATE accounts SET active = false WHERE id = 1;",
    )
    .await?;
    let host = Host::start(&config_text, &dir);
    db.execute(
        "INSERT INTO accounts VALUES (4, 'Barbara', 4, true, now(), NULL, NULL)",
        &[],
    )
    .await?;
    let rows = wait_for_rows(&moto, &host, 7).await?;
    host.stop().await?;
    assert_once(&rows);
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 1, 2, 3, 1, 4], "{rows:#?}");
    assert_eq!(rows[4]["doc"], json!("[1, 2]"));

    // The catalog reads the same table from S3.
    let config = airlock::config::Config::from_toml("test.toml", &config_text, &dir)
        .unwrap_or_else(|e| panic!("{e}"));
    let catalog = airlock::sink::lake::catalog(config.lakes()).await?;
    let table = &catalog.sinks[0].tables[0];
    assert_eq!(
        (table.name.as_str(), table.rows),
        ("public.accounts", Some(7))
    );
    assert!(table.files >= 2, "{table:?}");
    assert!(catalog.render_table().contains("public.accounts"));

    // An offline compaction (no host running) on S3, under the lake's lock: same rows.
    let reports = airlock::sink::lake::compact_offline(config.lakes()).await?;
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(
        reports[0].files_removed >= 2 && reports[0].files_added == 1,
        "{reports:?}"
    );
    assert_eq!(reports[0].rows, 7);
    let compacted = read_s3_table("s3://lake/zone-a/public.accounts", &moto.storage_options())?;
    assert_eq!(compacted, rows, "compaction changes no row");
    let catalog = airlock::sink::lake::catalog(config.lakes()).await?;
    assert_eq!(catalog.sinks[0].tables[0].files, 1);
    Ok(())
}
