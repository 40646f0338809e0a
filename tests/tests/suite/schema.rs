//! Schema changes between transactions, TRUNCATE, and what each replica identity
//! puts in the lake (see docs/source.md, "Schema changes" and "Replica identity").

use airlock_tests::source_support as support;

use std::time::Duration;

use airlock_tests::*;
use serde_json::{Value as Json, json};

fn specials(row: &Json) -> Vec<String> {
    row["_special"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_drop_rename_retype_and_truncate_keep_every_row() -> anyhow::Result<()> {
    let dir = temp_dir("schema");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE evolve (id integer PRIMARY KEY, a text, b integer);
         CREATE PUBLICATION airlock FOR TABLE evolve;",
    )
    .await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "schema", ""),
        &dir,
    );
    support::wait_for_slot(&db, "schema").await?;
    let table = dir.join("lake/public.evolve");

    db.batch_execute("INSERT INTO evolve VALUES (1, 'one', 1)")
        .await?;
    // Let the first schema reach the lake, so that later changes evolve a real table.
    airlock_tests::wait_for_lake(&table, Duration::from_secs(60), |r| !r.is_empty()).await?;
    for step in [
        "ALTER TABLE evolve ADD COLUMN c numeric(6,2)",
        "INSERT INTO evolve VALUES (2, 'two', 2, 1.5)",
        "ALTER TABLE evolve DROP COLUMN b",
        "INSERT INTO evolve VALUES (3, 'three', 3)",
        "ALTER TABLE evolve RENAME COLUMN a TO a2",
        "INSERT INTO evolve VALUES (4, 'four', 4)",
        "ALTER TABLE evolve ALTER COLUMN c TYPE text",
        "INSERT INTO evolve VALUES (5, 'five', 'not a number'), (6, 'six', '7.25')",
        "TRUNCATE evolve",
        "INSERT INTO evolve VALUES (7, 'seven', NULL)",
    ] {
        db.batch_execute(step).await?;
    }
    let rows =
        airlock_tests::wait_for_lake(&table, Duration::from_secs(60), |r| r.len() >= 8).await?;
    host.stop().await?;
    assert_eq!(rows.len(), 8, "{rows:#?}");
    let ops: Vec<(Json, &str)> = rows
        .iter()
        .map(|r| (r["id"].clone(), r["_op"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ops,
        vec![
            (json!(1), "c"),
            (json!(2), "c"),
            (json!(3), "c"),
            (json!(4), "c"),
            (json!(5), "c"),
            (json!(6), "c"),
            (Json::Null, "t"),
            (json!(7), "c")
        ]
    );
    let get = |i: usize, c: &str| rows[i][c].clone();
    // ADD COLUMN: a new lake column, null for the rows before it.
    assert_eq!((get(0, "c"), get(1, "c")), (Json::Null, json!("1.50")));
    // DROP COLUMN: the lake column stays; null for new rows.
    assert_eq!((get(1, "b"), get(2, "b")), (json!(2), Json::Null));
    // RENAME COLUMN: a new lake column under the new name; the old one stays, null for new rows.
    assert_eq!((get(2, "a"), get(2, "a2")), (json!("three"), Json::Null));
    assert_eq!((get(3, "a"), get(3, "a2")), (Json::Null, json!("four")));
    // ALTER TYPE: the lake column keeps its type (decimal(6,2)); values of the new
    // type (text) are null there and kept exactly in `_special`, even when they look
    // like numbers: the lake never guesses a conversion.
    for (i, text) in [(4, "not a number"), (5, "7.25")] {
        assert_eq!(get(i, "c"), Json::Null);
        assert_eq!(specials(&rows[i]), vec![format!("c={text}")]);
    }
    // TRUNCATE: one `t` row with no data.
    assert!(get(6, "a2").is_null() && get(6, "c").is_null());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identities_decide_what_old_rows_carry() -> anyhow::Result<()> {
    let dir = temp_dir("identity");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE ri_default (id integer PRIMARY KEY, code text NOT NULL, v text);
         CREATE TABLE ri_index (id integer NOT NULL, code text NOT NULL, v text);
         CREATE UNIQUE INDEX ri_index_code ON ri_index (code);
         ALTER TABLE ri_index REPLICA IDENTITY USING INDEX ri_index_code;
         CREATE TABLE ri_full (id integer PRIMARY KEY, code text NOT NULL, v text);
         ALTER TABLE ri_full REPLICA IDENTITY FULL;
         CREATE TABLE ri_nothing (id integer PRIMARY KEY, code text NOT NULL, v text);
         ALTER TABLE ri_nothing REPLICA IDENTITY NOTHING;
         CREATE TABLE no_pk (id integer, code text NOT NULL, v text);
         CREATE PUBLICATION airlock FOR TABLE ri_default, ri_index, ri_full, ri_nothing, no_pk;",
    )
    .await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "identity", ""),
        &dir,
    );
    support::wait_for_slot(&db, "identity").await?;

    for table in ["ri_default", "ri_index", "ri_full"] {
        db.batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'k1', 'a');
             UPDATE {table} SET v = 'b' WHERE id = 1;
             UPDATE {table} SET code = 'k2' WHERE id = 1;
             DELETE FROM {table} WHERE id = 1;"
        ))
        .await?;
    }
    // Without an identity PostgreSQL refuses updates and deletes of a table that
    // publishes them; inserts still flow.
    for table in ["ri_nothing", "no_pk"] {
        db.execute(&format!("INSERT INTO {table} VALUES (1, 'k1', 'a')"), &[])
            .await?;
        for change in [
            format!("UPDATE {table} SET v = 'b'"),
            format!("DELETE FROM {table}"),
        ] {
            let err = db
                .batch_execute(&change)
                .await
                .expect_err("PostgreSQL refuses it");
            let message = err
                .as_db_error()
                .map(|e| e.message().to_owned())
                .unwrap_or_default();
            assert!(
                message.contains("does not have a replica identity"),
                "{table}: {message}"
            );
        }
    }

    let lake = dir.join("lake");
    let read = |name: &str| {
        let table = lake.join(format!("public.{name}"));
        async move {
            airlock_tests::wait_for_lake(&table, Duration::from_secs(60), |r| r.len() >= 4).await
        }
    };
    let cols = |r: &Json| {
        (
            r["_op"].as_str().unwrap().to_owned(),
            r["id"].clone(),
            r["code"].clone(),
            r["v"].clone(),
        )
    };
    let s = |t: &str| json!(t);

    // DEFAULT (primary key): updates and deletes carry the new row / the old key only.
    let rows = read("ri_default").await?;
    assert_eq!(
        rows.iter().map(cols).collect::<Vec<_>>(),
        vec![
            ("c".into(), json!(1), s("k1"), s("a")),
            ("u".into(), json!(1), s("k1"), s("b")),
            ("u".into(), json!(1), s("k2"), s("b")),
            ("d".into(), json!(1), Json::Null, Json::Null),
        ]
    );
    // INDEX: the delete carries the index columns only.
    let rows = read("ri_index").await?;
    assert_eq!(
        cols(&rows[3]),
        ("d".into(), Json::Null, s("k2"), Json::Null)
    );
    // FULL: the delete carries the whole old row.
    let rows = read("ri_full").await?;
    assert_eq!(cols(&rows[3]), ("d".into(), json!(1), s("k2"), s("b")));
    for table in ["ri_nothing", "no_pk"] {
        let rows = airlock_tests::wait_for_lake(
            &dir.join(format!("lake/public.{table}")),
            Duration::from_secs(60),
            |r| !r.is_empty(),
        )
        .await?;
        assert_eq!(
            rows.iter().map(cols).collect::<Vec<_>>(),
            vec![("c".into(), json!(1), s("k1"), s("a"))]
        );
    }
    host.stop().await?;
    Ok(())
}
