//! PostgreSQL WAL → mask guest → Delta lake, end to end, through a real cluster and
//! read back with DuckDB's delta extension.

use std::collections::HashMap;
use std::time::Duration;

use airlock_tests::*;
use serde_json::{Value as Json, json};

const SCHEMA: &str = "
CREATE TABLE customers (
    id        bigint PRIMARY KEY,
    name      text NOT NULL,
    email     text,
    balance   numeric(12,2),
    active    boolean,
    visits    integer,
    tier      smallint,
    score     double precision,
    signed_up timestamptz,
    note      varchar(20)
);
CREATE PUBLICATION airlock FOR TABLE customers;
";

fn config(url: &str, plugins: &std::path::Path, lake: &std::path::Path) -> String {
    format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{url}\"\nslot = \"e2e\"\nstatus_interval = \"1s\"\n\
         [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{plugins}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{lake}\"\nflush_interval = \"200ms\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        plugins = plugins.display(),
        lake = lake.display()
    )
}

fn by_key(rows: &[Json]) -> HashMap<(i64, String, i64), usize> {
    let mut seen = HashMap::new();
    for r in rows {
        let key = (
            r["id"].as_i64().unwrap_or(-1),
            r["_op"].as_str().unwrap_or("").to_owned(),
            r["_lsn"].as_i64().unwrap_or(-1),
        );
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_and_deletes_arrive_masked_and_exact_and_exactly_once_across_restarts()
-> anyhow::Result<()> {
    let dir = temp_dir("e2e");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(SCHEMA).await?;
    let plugins = plugin_dir(&dir, &[("10-mask", "mask", "")]);
    let lake = dir.join("lake");
    let table = lake.join("public.customers");
    let config = config(&pg.url("postgres"), &plugins, &lake);

    let host = Host::start(&config, &dir);
    // The host creates the slot; wait for it before writing so nothing predates it.
    for _ in 0..200 {
        if db
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'e2e'",
                &[],
            )
            .await?
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.batch_execute(
        "BEGIN;
         INSERT INTO customers VALUES (1, 'Ada Lovelace', 'ada@example.com', 1234567890.12, true, 7, 2, 0.1, '2024-02-29 23:59:59.123456+00', 'first');
         INSERT INTO customers VALUES (2, 'Grace Hopper', 'grace@example.com', -0.01, false, 0, 1, -1.5e300, '1970-01-01 00:00:00+00', NULL);
         COMMIT;
         INSERT INTO customers VALUES (3, 'Alan Turing', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         UPDATE customers SET balance = 99.99, email = 'ada@newmail.example.org' WHERE id = 1;
         DELETE FROM customers WHERE id = 2;",
    )
    .await?;

    let rows = wait_for_lake(&table, Duration::from_secs(60), |rows| rows.len() >= 5).await?;
    assert_eq!(rows.len(), 5, "{rows:#?}");
    let ops: Vec<(i64, &str)> = rows
        .iter()
        .map(|r| (r["id"].as_i64().unwrap(), r["_op"].as_str().unwrap()))
        .collect();
    assert_eq!(ops, vec![(1, "c"), (2, "c"), (3, "c"), (1, "u"), (2, "d")]);

    let ada = &rows[0];
    assert_eq!(ada["name"], json!("Ada Lovelace"));
    assert_eq!(ada["email"], json!(sha256_hex("ada@example.com")));
    assert_eq!(ada["balance"], json!("1234567890.12"));
    assert_eq!(ada["active"], json!(true));
    assert_eq!(ada["visits"], json!(7));
    assert_eq!(ada["tier"], json!(2));
    assert_eq!(ada["score"], json!(0.1));
    assert_eq!(ada["signed_up"], json!("2024-02-29T23:59:59.123456+00:00"));
    assert_eq!(ada["note"], json!("first"));
    let grace = &rows[1];
    assert_eq!(grace["balance"], json!("-0.01"));
    assert_eq!(grace["score"], json!(-1.5e300));
    assert_eq!(grace["signed_up"], json!("1970-01-01T00:00:00+00:00"));
    assert_eq!(grace["note"], Json::Null);
    assert_eq!(
        rows[2]["email"],
        Json::Null,
        "NULL stays NULL through the mask"
    );
    assert_eq!(
        rows[3]["email"],
        json!(sha256_hex("ada@newmail.example.org"))
    );
    assert_eq!(rows[3]["balance"], json!("99.99"));
    // The delete carries the old key.
    assert_eq!(rows[4]["id"], json!(2));
    // Metadata columns.
    for r in &rows {
        assert!(r["_commit_lsn"].as_i64().unwrap() > 0);
        assert!(r["_lsn"].as_i64().unwrap() > 0);
        assert!(r["_xid"].as_i64().unwrap() > 0);
        assert_eq!(r["_pipeline"].as_str().unwrap().len(), 12);
        assert!(r["_commit_ts"].as_str().is_some());
    }
    assert_eq!(
        rows[0]["_commit_lsn"], rows[1]["_commit_lsn"],
        "one transaction, one commit LSN"
    );

    // Stop, write while stopped, start again: every committed row exactly once.
    host.stop().await?;
    db.batch_execute(
        "INSERT INTO customers VALUES (4, 'Edsger Dijkstra', 'ewd@example.com', 1, true, 1, 1, 1, now(), 'while stopped');
         UPDATE customers SET visits = 8 WHERE id = 1;",
    )
    .await?;
    let host = Host::start(&config, &dir);
    db.execute("INSERT INTO customers VALUES (5, 'Barbara Liskov', 'liskov@example.com', 2, true, 1, 1, 1, now(), 'after')", &[])
        .await?;
    let rows = wait_for_lake(&table, Duration::from_secs(60), |rows| rows.len() >= 8).await?;
    host.stop().await?;
    let counts = by_key(&rows);
    assert!(
        counts.values().all(|&n| n == 1),
        "a change appears twice: {counts:?}"
    );
    assert_eq!(rows.len(), 8, "{rows:#?}");
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3, 1, 2, 4, 1, 5]);
    assert_eq!(rows[5]["email"], json!(sha256_hex("ewd@example.com")));

    // No raw address anywhere in the lake's files.
    for file in files_under(&lake) {
        let bytes = std::fs::read(&file)?;
        for raw in [
            "ada@example.com",
            "grace@example.com",
            "ewd@example.com",
            "liskov@example.com",
            "newmail",
        ] {
            assert!(
                !bytes.windows(raw.len()).any(|w| w == raw.as_bytes()),
                "{} contains the raw address {raw}",
                file.display()
            );
        }
    }
    Ok(())
}
