//! TOAST: an UPDATE that leaves a TOASTed value unchanged makes PostgreSQL leave the
//! value out of the new row. airlock never writes that as NULL data:
//! - REPLICA IDENTITY DEFAULT: the column is null and named in `_unchanged` (guests
//!   see `unchanged-toast`);
//! - REPLICA IDENTITY FULL: the old row carries the value, and the source fills it in.

use airlock_tests::source_support as support;

use std::time::Duration;

use airlock_tests::*;
use serde_json::{Value as Json, json};

const SCHEMA: &str = "
CREATE TABLE docs_default (id integer PRIMARY KEY, n integer, body text);
CREATE TABLE docs_full (id integer PRIMARY KEY, n integer, body text);
ALTER TABLE docs_full REPLICA IDENTITY FULL;
-- Stored out of line, uncompressed: a value over ~2 kB is TOASTed whatever it holds.
ALTER TABLE docs_default ALTER COLUMN body SET STORAGE EXTERNAL;
ALTER TABLE docs_full ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE PUBLICATION airlock FOR TABLE docs_default, docs_full;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_is_marked_or_filled_never_null() -> anyhow::Result<()> {
    let dir = temp_dir("toast");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(SCHEMA).await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "toast", ""),
        &dir,
    );
    support::wait_for_slot(&db, "toast").await?;

    // 4 kB of random hex: incompressible for pglz, well over the TOAST threshold.
    let big: String = db
        .query_one(
            "SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 128)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(big.len(), 4096);
    for table in ["docs_default", "docs_full"] {
        db.execute(&format!("INSERT INTO {table} VALUES (1, 0, $1)"), &[&big])
            .await?;
        db.execute(&format!("UPDATE {table} SET n = 1 WHERE id = 1"), &[])
            .await?;
        // An explicit NULL stays a NULL, and is not `_unchanged`.
        db.execute(
            &format!("UPDATE {table} SET n = 2, body = NULL WHERE id = 1"),
            &[],
        )
        .await?;
    }
    let toasted: bool = db
        .query_one(
            "SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE relname = 'docs_full'",
            &[],
        )
        .await?
        .get(0);
    assert!(toasted, "the test value was not TOASTed");

    let unchanged = |r: &Json| r["_unchanged"].as_array().cloned().unwrap_or_default();
    let rows = airlock_tests::wait_for_lake(
        &dir.join("lake/public.docs_default"),
        Duration::from_secs(60),
        |r| r.len() >= 3,
    )
    .await?;
    let ns: Vec<(i64, &str)> = rows
        .iter()
        .map(|r| (r["n"].as_i64().unwrap(), r["_op"].as_str().unwrap()))
        .collect();
    assert_eq!(ns, vec![(0, "c"), (1, "u"), (2, "u")]);
    assert_eq!(rows[0]["body"], json!(big));
    assert_eq!(
        rows[1]["body"],
        Json::Null,
        "DEFAULT identity: the value was not sent"
    );
    assert_eq!(
        unchanged(&rows[1]),
        vec![json!("body")],
        "and the lake says so: {:#?}",
        rows[1]
    );
    assert_eq!(rows[2]["body"], Json::Null);
    assert!(
        unchanged(&rows[2]).is_empty(),
        "a real NULL is not `_unchanged`"
    );

    let rows = airlock_tests::wait_for_lake(
        &dir.join("lake/public.docs_full"),
        Duration::from_secs(60),
        |r| r.len() >= 3,
    )
    .await?;
    host.stop().await?;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1]["n"], json!(1));
    assert_eq!(
        rows[1]["body"],
        json!(big),
        "FULL identity: filled from the old row"
    );
    assert!(unchanged(&rows[1]).is_empty(), "{:#?}", rows[1]);
    assert_eq!(rows[2]["body"], Json::Null);
    assert!(unchanged(&rows[2]).is_empty());
    Ok(())
}
