//! The initial snapshot (`[source] snapshot = "initial"`): rows that exist before the
//! host starts arrive as `_op = 'r'`, then streaming continues from the snapshot's
//! consistent point: nothing missed, nothing twice, also for rows written during the
//! copy, and a restart does not copy again.

use airlock_tests::source_support as support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use airlock_tests::*;
use serde_json::{Value as Json, json};

const ROWS: i32 = 25_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_arrive_as_reads_then_streaming_continues_exactly_once() -> anyhow::Result<()>
{
    let dir = temp_dir("snapshot");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(&format!(
        "CREATE DOMAIN label AS varchar(20);
         CREATE TABLE items (id integer PRIMARY KEY, v label, amount numeric(8,2), tags text[], note text);
         INSERT INTO items SELECT i, 'v' || i, i / 100.0, ARRAY['a', NULL], CASE WHEN i % 2 = 0 THEN E'tab\\there\\nline' END
           FROM generate_series(1, {ROWS}) i;
         CREATE TABLE empty_one (id integer PRIMARY KEY);
         CREATE PUBLICATION airlock FOR TABLE items, empty_one;"
    ))
    .await?;
    let config = support::config(&pg.url("postgres"), &dir, "snap", "snapshot = \"initial\"");
    let host = Host::start(&config, &dir);

    // Write while the snapshot runs: each of these lands in the copy or in the stream.
    let writer = {
        let db = pg.connect("postgres").await?;
        tokio::spawn(async move {
            for i in 1..=200 {
                db.execute(
                    "INSERT INTO items (id, v) VALUES ($1, 'during')",
                    &[&(1_000_000 + i)],
                )
                .await?;
                db.execute("UPDATE items SET v = 'updated' WHERE id = $1", &[&i])
                    .await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(())
        })
    };
    support::wait_for_slot(&db, "snap").await?;
    writer.await??;
    db.batch_execute(
        "INSERT INTO items (id, v) VALUES (2000000, 'after'); DELETE FROM items WHERE id = 3;",
    )
    .await?;

    let table = dir.join("lake/public.items");
    let done = |rows: &[Json]| rows.iter().any(|r| r["id"] == json!(3) && r["_op"] == "d");
    let rows = airlock_tests::wait_for_lake(&table, Duration::from_secs(120), done).await?;

    // Restart: the slot exists, so no second snapshot.
    host.stop().await?;
    let host = Host::start(&config, &dir);
    db.execute(
        "INSERT INTO items (id, v) VALUES (2000001, 'after restart')",
        &[],
    )
    .await?;
    let rows_after =
        airlock_tests::wait_for_lake(&table, Duration::from_secs(60), |r| r.len() > rows.len())
            .await?;
    host.stop().await?;
    assert_eq!(
        rows_after.len(),
        rows.len() + 1,
        "only the new insert after the restart"
    );
    let rows = rows_after;

    // Every change once.
    let keys: HashSet<(i64, String, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                r["_op"].as_str().unwrap().to_owned(),
                r["_lsn"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(keys.len(), rows.len(), "a change appears twice");
    let reads: Vec<&Json> = rows.iter().filter(|r| r["_op"] == "r").collect();
    let read_ids: HashSet<i64> = reads.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(read_ids.len(), reads.len(), "a row was copied twice");
    assert!(
        (1..=ROWS as i64).all(|id| read_ids.contains(&id)),
        "every pre-existing row is copied"
    );
    // A row inserted during the copy is either in the snapshot or streamed, never both.
    for r in rows.iter().filter(|r| r["_op"] == "c") {
        assert!(
            !read_ids.contains(&r["id"].as_i64().unwrap()),
            "copied and streamed: {r}"
        );
    }
    // Snapshot rows come first, below every streamed commit LSN, strictly increasing by chunk.
    let first_stream = rows.iter().position(|r| r["_op"] != "r").unwrap();
    assert!(rows[..first_stream].iter().all(|r| r["_op"] == "r"));
    assert_eq!(first_stream, reads.len());
    let chunks: Vec<i64> = reads
        .iter()
        .map(|r| r["_commit_lsn"].as_i64().unwrap())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    assert!(
        chunks.len() >= 3,
        "25 000 rows make at least 3 chunks: {chunks:?}"
    );

    // Typed values in snapshot rows (domain as its base type, arrays as lists, COPY escapes).
    let r2 = reads.iter().find(|r| r["id"] == json!(2)).unwrap();
    assert_eq!(r2["amount"], json!("0.02"));
    assert_eq!(r2["tags"], json!(["a", null]));
    assert_eq!(r2["note"], json!("tab\there\nline"));
    assert!(reads.iter().find(|r| r["id"] == json!(1)).unwrap()["note"].is_null());

    // The lake, replayed, equals the table.
    let mut replay: HashMap<i64, Json> = HashMap::new();
    for r in &rows {
        let id = r["id"].as_i64().unwrap();
        if r["_op"] == "d" {
            replay.remove(&id);
        } else {
            replay.insert(id, r["v"].clone());
        }
    }
    let table_now: HashMap<i64, Json> = db
        .query("SELECT id, v::text FROM items", &[])
        .await?
        .iter()
        .map(|r| {
            (
                i64::from(r.get::<_, i32>(0)),
                json!(r.get::<_, Option<String>>(1)),
            )
        })
        .collect();
    assert_eq!(replay.len(), table_now.len());
    assert!(
        replay == table_now,
        "the lake replayed differs from the table"
    );
    assert!(
        !dir.join("lake/public.empty_one").exists()
            || airlock_tests::read_lake("duckdb", &dir.join("lake/public.empty_one"))?.is_empty()
    );
    Ok(())
}

/// The names of the cluster's replication slots.
async fn slot_names(db: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let rows = db
        .query("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A cluster with `rows` rows in `items` (published), and a configuration that
/// snapshots them through `slot`.
async fn items(
    tag: &str,
    slot: &str,
    rows: usize,
) -> anyhow::Result<(TempDir, Cluster, tokio_postgres::Client, String)> {
    let dir = temp_dir(tag);
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(&format!(
        "CREATE TABLE items (id integer PRIMARY KEY, v text);
         INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, {rows}) i;
         CREATE PUBLICATION airlock FOR TABLE items;"
    ))
    .await?;
    let config = support::config(&pg.url("postgres"), &dir, slot, "snapshot = \"initial\"");
    Ok((dir, pg, db, config))
}

/// An interrupted snapshot is taken again: the rows of the interrupted attempt stay in
/// the lake, but every row of the last attempt arrives (none skipped by the lake's
/// exactly-once check), and that attempt's rows share one `_xid`, above the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_snapshot_is_taken_again_and_the_last_attempt_is_whole() -> anyhow::Result<()>
{
    let rows = 30_000;
    let (dir, _pg, db, config) = items("snapshot-retry", "retry", rows).await?;
    let host = Host::start(&config, &dir);

    // The copy is done and committed; the source waits for the lake before it creates
    // the slot: end the snapshot's SQL connection right then.
    let mut killed = false;
    for _ in 0..1500 {
        let pids: Vec<i32> = db
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'airlock' AND backend_type = 'client backend' \
                 AND state = 'idle' AND query = 'COMMIT'",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(pid) = pids.first() {
            db.execute("SELECT pg_terminate_backend($1)", &[pid])
                .await?;
            killed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        killed,
        "did not catch the snapshot between its copy and the slot creation"
    );
    support::wait_for_slot(&db, "retry").await?;
    db.execute("INSERT INTO items VALUES (0, 'streamed')", &[])
        .await?;
    let table = dir.join("lake/public.items");
    let lake = airlock_tests::wait_for_lake(&table, Duration::from_secs(120), |r| {
        r.iter().any(|r| r["_op"] == "c")
    })
    .await?;
    host.stop().await?;

    let reads: Vec<&Json> = lake.iter().filter(|r| r["_op"] == "r").collect();
    assert_eq!(
        reads.len(),
        2 * rows,
        "both attempts are in the lake, whole"
    );
    let last_xid = &reads.last().unwrap()["_xid"];
    let last: Vec<&&Json> = reads.iter().filter(|r| &r["_xid"] == last_xid).collect();
    let ids: HashSet<i64> = last.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(
        (last.len(), ids.len()),
        (rows, rows),
        "the last attempt has every row once"
    );
    let first_of_last = last
        .iter()
        .map(|r| r["_commit_lsn"].as_i64().unwrap())
        .min()
        .unwrap();
    assert!(
        reads
            .iter()
            .filter(|r| &r["_xid"] != last_xid)
            .all(|r| r["_commit_lsn"].as_i64().unwrap() < first_of_last)
    );
    let slots = slot_names(&db).await?;
    assert_eq!(slots, vec!["retry".to_owned()], "the snapshot slot is gone");
    Ok(())
}

/// At startup, a missing slot while the lake holds the slot's commits is a snapshot
/// stopped before it completed (its own slot is there: it is taken again) or a dropped
/// slot (refused: a new snapshot would add every row again beside a gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_takes_a_stopped_snapshot_again_but_refuses_a_dropped_slot() -> anyhow::Result<()>
{
    let rows = 1_000;
    let (dir, _pg, db, config) = items("snapshot-restart", "again", rows).await?;
    let table = dir.join("lake/public.items");
    let host = Host::start(&config, &dir);
    support::wait_for_slot(&db, "again").await?;
    wait_for_lake(&table, Duration::from_secs(60), |r| r.len() == rows).await?;
    host.stop().await?;

    // As a stop in the middle of a later attempt leaves it: the attempt's slot, not
    // the slot itself.
    drop_slot(&db, "again").await?;
    db.batch_execute("SELECT pg_create_logical_replication_slot('again_snapshot', 'pgoutput')")
        .await?;
    let host = Host::start(&config, &dir);
    support::wait_for_slot(&db, "again").await?;
    let lake = wait_for_lake(&table, Duration::from_secs(60), |r| r.len() == 2 * rows).await?;
    host.stop().await?;
    let xids: HashSet<i64> = lake.iter().map(|r| r["_xid"].as_i64().unwrap()).collect();
    assert_eq!(xids.len(), 2, "two attempts, each whole");
    let slots = slot_names(&db).await?;
    assert_eq!(slots, vec!["again".to_owned()]);

    // The slot dropped while airlock was stopped: refused, nothing created or copied.
    drop_slot(&db, "again").await?;
    let error = Host::start(&config, &dir).failure().await?;
    assert!(
        error.contains("replication slot `again` does not exist, but sink `lake` already holds changes read from it"),
        "{error}"
    );
    assert!(slot_names(&db).await?.is_empty(), "no slot was created");
    assert_eq!(read_lake("duckdb", &table)?.len(), 2 * rows);
    Ok(())
}

/// Rows of a lake table read by DuckDB, once every change up to `last` is there.
async fn lake_until(
    table: &std::path::Path,
    last: impl Fn(&Json) -> bool,
) -> anyhow::Result<Vec<Json>> {
    wait_for_lake(table, Duration::from_secs(120), |rows| {
        rows.iter().any(&last)
    })
    .await
}

/// The data columns (not airlock's `_` columns) of every schema the Delta log of
/// `table` ever recorded.
fn delta_columns(table: &std::path::Path) -> anyhow::Result<HashSet<String>> {
    let mut columns = HashSet::new();
    for file in files_under(&table.join("_delta_log")) {
        if file.extension().is_none_or(|e| e != "json") {
            continue;
        }
        for line in std::fs::read_to_string(&file)?.lines() {
            let action: Json = serde_json::from_str(line)?;
            if let Some(schema) = action["metaData"]["schemaString"].as_str() {
                let schema: Json = serde_json::from_str(schema)?;
                for field in schema["fields"].as_array().into_iter().flatten() {
                    let name = field["name"].as_str().unwrap_or_default();
                    if !name.starts_with('_') {
                        columns.insert(name.to_owned());
                    }
                }
            }
        }
    }
    Ok(columns)
}

/// `(id, _op)` of every row, sorted.
fn ops(rows: &[Json]) -> Vec<(i64, String)> {
    let mut ops: Vec<(i64, String)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                r["_op"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ops.sort();
    ops
}

/// `(id, _op)` for the given ids and operation.
fn expect(ids: impl IntoIterator<Item = i64>, op: &str) -> Vec<(i64, String)> {
    ids.into_iter().map(|id| (id, op.to_owned())).collect()
}

/// Regression (security): the initial snapshot copied every column and every row of a
/// published table, so a column left out of the publication's column list, rows its
/// row filter excludes, and rows of an unpublished inheritance child (`FOR TABLE ONLY`)
/// reached the lake, although the stream never sends them. The snapshot now copies
/// exactly what the publication publishes, like PostgreSQL's own table sync: checked
/// for a column list with a row filter, `TABLES IN SCHEMA` beside a filtered table, and
/// `FOR ALL TABLES`, each through the snapshot and then the stream; and a generated
/// column, which these publications do not publish (pgoutput leaves it out), is left
/// out of the copy too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_copies_only_the_published_columns_and_rows() -> anyhow::Result<()> {
    const SECRET: &str = "TOPSECRET-Q7ZX";
    const US_ONLY: &str = "US-ONLY-MARKER";
    const CHILD_ONLY: &str = "ARCHIVE-ONLY-MARKER";
    let dir = temp_dir("snapshot-publication");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    // The row filter's column is part of the key (the replica identity), so that
    // updates and deletes stay possible with the filter and the column list.
    db.batch_execute(&format!(
        "CREATE TABLE accounts (id integer, region text, public_col text, secret_code text, PRIMARY KEY (id, region));
         INSERT INTO accounts SELECT i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END,
           CASE WHEN i % 2 = 0 THEN 'eu-public-' || i ELSE '{US_ONLY}' END, '{SECRET}'
           FROM generate_series(1, 100) i;
         CREATE TABLE accounts_archive () INHERITS (accounts);
         INSERT INTO accounts_archive VALUES (1000, 'eu', '{CHILD_ONLY}', '{SECRET}');
         CREATE SCHEMA other;
         CREATE TABLE other.notes (id integer PRIMARY KEY, body text, hidden text,
           doubled integer GENERATED ALWAYS AS (id * 2) STORED);
         INSERT INTO other.notes SELECT i, 'note ' || i, 'hidden ' || i FROM generate_series(1, 20) i;
         CREATE PUBLICATION narrow FOR TABLE ONLY accounts (id, region, public_col) WHERE (region = 'eu');
         CREATE PUBLICATION wide FOR TABLES IN SCHEMA other, TABLE ONLY accounts WHERE (region = 'eu');
         CREATE PUBLICATION everything FOR ALL TABLES;"
    ))
    .await?;
    // PostgreSQL 15 refuses a column list in a publication with TABLES IN SCHEMA:
    // one host per publication, side by side.
    let mut hosts = Vec::new();
    for name in ["narrow", "wide", "everything"] {
        let dir = dir.join(name);
        let config = support::config(
            &pg.url("postgres"),
            &dir,
            name,
            &format!("snapshot = \"initial\"\npublication = \"{name}\""),
        );
        hosts.push(Host::start(&config, &dir));
    }
    for name in ["narrow", "wide", "everything"] {
        support::wait_for_slot(&db, name).await?;
    }

    // Streamed: filtered and narrowed the same way.
    db.batch_execute(&format!(
        "INSERT INTO accounts VALUES (101, 'us', '{US_ONLY}', '{SECRET}'), (102, 'eu', 'eu-public-102', '{SECRET}');
         INSERT INTO accounts_archive VALUES (1001, 'eu', '{CHILD_ONLY}', '{SECRET}');
         INSERT INTO other.notes VALUES (21, 'note 21', 'hidden 21');
         UPDATE ONLY accounts SET public_col = 'eu-public-2 updated' WHERE id = 2;"
    ))
    .await?;
    let updated = |r: &Json| r["id"] == json!(2) && r["_op"] == "u";
    let lake = |name: &str, table: &str| dir.join(name).join("lake").join(table);
    let narrow = lake_until(&lake("narrow", "public.accounts"), updated).await?;
    let wide = lake_until(&lake("wide", "public.accounts"), updated).await?;
    let wide_notes = lake_until(&lake("wide", "other.notes"), |r| r["id"] == json!(21)).await?;
    let all = lake_until(&lake("everything", "public.accounts"), updated).await?;
    let all_archive = lake_until(&lake("everything", "public.accounts_archive"), |r| {
        r["id"] == json!(1001)
    })
    .await?;
    let all_notes =
        lake_until(&lake("everything", "other.notes"), |r| r["id"] == json!(21)).await?;
    for host in hosts {
        host.stop().await?;
    }

    let eu: Vec<i64> = (2..=100).step_by(2).collect();
    let published_ops = [
        expect(eu.iter().copied(), "r"),
        expect([102], "c"),
        expect([2], "u"),
    ]
    .concat();
    let sorted = |mut v: Vec<(i64, String)>| {
        v.sort();
        v
    };

    // A column list with a row filter, on the parent only: the published columns of
    // the rows the filter lets through, and not a byte of anything else.
    let table = lake("narrow", "public.accounts");
    assert_eq!(
        delta_columns(&table)?,
        HashSet::from(["id".into(), "region".into(), "public_col".into()]),
        "the Delta schema holds exactly the published columns"
    );
    for row in &narrow {
        let columns: HashSet<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|k| !k.starts_with('_'))
            .collect();
        assert_eq!(
            columns,
            HashSet::from(["id", "region", "public_col"]),
            "{row}"
        );
        assert_eq!(
            row["region"],
            json!("eu"),
            "a row the filter excludes: {row}"
        );
    }
    assert_eq!(ops(&narrow), sorted(published_ops.clone()));
    for file in files_under(&table) {
        let bytes = std::fs::read(&file)?;
        for secret in ["secret_code", SECRET, US_ONLY, CHILD_ONLY] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds `{secret}`",
                file.display()
            );
        }
    }
    assert!(
        !lake("narrow", "public.accounts_archive").exists()
            && !lake("narrow", "other.notes").exists(),
        "only the published table has a lake table"
    );

    // TABLES IN SCHEMA beside a filtered table: the schema's table whole, every column
    // of the filtered one (none is left out), its rows filtered.
    assert_eq!(
        delta_columns(&lake("wide", "public.accounts"))?,
        HashSet::from([
            "id".into(),
            "region".into(),
            "public_col".into(),
            "secret_code".into()
        ])
    );
    assert_eq!(ops(&wide), sorted(published_ops));
    assert!(wide.iter().all(|r| r["region"] == json!("eu")));
    assert_eq!(
        ops(&wide_notes),
        sorted([expect(1..=20, "r"), expect([21], "c")].concat())
    );
    let notes_columns = HashSet::from(["id".into(), "body".into(), "hidden".into()]);
    assert_eq!(delta_columns(&lake("wide", "other.notes"))?, notes_columns);
    let note = wide_notes.iter().find(|r| r["id"] == json!(7)).unwrap();
    assert_eq!(
        (&note["body"], &note["hidden"]),
        (&json!("note 7"), &json!("hidden 7"))
    );
    assert!(!lake("wide", "public.accounts_archive").exists());

    // FOR ALL TABLES: every column and row of each table, the child's rows in the
    // child's own table only.
    assert_eq!(
        ops(&all),
        sorted(
            [
                expect(1..=100, "r"),
                expect([101, 102], "c"),
                expect([2], "u")
            ]
            .concat()
        )
    );
    let first = all.iter().find(|r| r["id"] == json!(1)).unwrap();
    assert_eq!(
        (&first["public_col"], &first["secret_code"]),
        (&json!(US_ONLY), &json!(SECRET))
    );
    assert_eq!(
        ops(&all_archive),
        sorted([expect([1000], "r"), expect([1001], "c")].concat())
    );
    assert_eq!(
        delta_columns(&lake("everything", "other.notes"))?,
        notes_columns
    );
    assert_eq!(
        ops(&all_notes),
        sorted([expect(1..=20, "r"), expect([21], "c")].concat())
    );
    Ok(())
}

/// PostgreSQL 18 publishes stored generated columns when the publication says
/// `publish_generated_columns = stored`; before 18 no publication can. The snapshot
/// copies what the stream sends, on every version: the generated column on 18 with
/// the option (its values computed by PostgreSQL), nowhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_are_copied_and_streamed_where_the_publication_publishes_them()
-> anyhow::Result<()> {
    let dir = temp_dir("snapshot-generated");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    let version = airlock::source::catalog::server_version(&db).await?;
    let publishes = version >= 180_000;
    let option = if publishes {
        " WITH (publish_generated_columns = stored)"
    } else {
        ""
    };
    db.batch_execute(&format!(
        "CREATE TABLE gen (id integer PRIMARY KEY, body text,
           doubled integer GENERATED ALWAYS AS (id * 2) STORED);
         INSERT INTO gen (id, body) SELECT i, 'row ' || i FROM generate_series(1, 10) i;
         CREATE PUBLICATION airlock FOR TABLE gen{option};"
    ))
    .await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "gen", "snapshot = \"initial\""),
        &dir,
    );
    support::wait_for_slot(&db, "gen").await?;
    db.batch_execute("INSERT INTO gen (id, body) VALUES (11, 'streamed')")
        .await?;
    let table = dir.join("lake/public.gen");
    let rows = lake_until(&table, |r| r["id"] == json!(11)).await?;
    host.stop().await?;

    let mut expected: HashSet<String> = HashSet::from(["id".into(), "body".into()]);
    if publishes {
        expected.insert("doubled".into());
    }
    assert_eq!(delta_columns(&table)?, expected, "server version {version}");
    assert_eq!(rows.len(), 11);
    for row in &rows {
        let id = row["id"].as_i64().unwrap();
        if publishes {
            assert_eq!(row["doubled"], json!(id * 2), "{row}");
        } else {
            assert!(row.get("doubled").is_none_or(Json::is_null), "{row}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_table_is_copied_over_several_connections_every_row_once() -> anyhow::Result<()> {
    let dir = temp_dir("snapshot_ranges");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    // About 80 MiB: past two ranges of 32 MiB, so three connections each read one.
    db.batch_execute(
        "CREATE TABLE wide (id integer PRIMARY KEY, pad text);
         ALTER TABLE wide ALTER COLUMN pad SET STORAGE PLAIN;
         INSERT INTO wide SELECT i, repeat(chr(97 + i % 26), 1000) FROM generate_series(1, 70000) i;
         CREATE PUBLICATION airlock FOR TABLE wide;",
    )
    .await?;
    let pages: i64 = db
        .query_one("SELECT pg_relation_size('wide') / 8192", &[])
        .await?
        .get(0);
    assert!(
        pages >= 8192,
        "the table spans two ranges at least: {pages} pages"
    );
    let config = support::config(
        &pg.url("postgres"),
        &dir,
        "ranges",
        "snapshot = \"initial\"\nsnapshot_connections = 3",
    );
    let host = Host::start(&config, &dir);
    support::wait_for_slot(&db, "ranges").await?;
    let table = dir.join("lake/public.wide");
    let rows = query_lake(
        &table,
        "SELECT count(*) AS n, count(DISTINCT id) AS ids, min(id) AS lo, max(id) AS hi, \
         count(*) FILTER (WHERE pad = repeat(chr(97 + id % 26), 1000)) AS exact FROM lake WHERE _op = 'r'",
    )?;
    host.stop().await?;
    assert_eq!(
        rows,
        [json!({"n": 70000, "ids": 70000, "lo": 1, "hi": 70000, "exact": 70000})],
        "every row once, whole"
    );
    // The ranges were read side by side: in the lake's order the ids are not one run.
    let order = query_lake(
        &table,
        "SELECT count(*) AS breaks FROM (SELECT id - lag(id) OVER (ORDER BY _commit_lsn, _lsn) AS step FROM lake) WHERE step <> 1",
    )?;
    assert!(
        order[0]["breaks"].as_i64().unwrap_or(0) > 0,
        "one reader only: {order:?}"
    );
    Ok(())
}
