//! Hostile input through the running host. Each case gives a clear error or works,
//! never a panic or a silent loss. (Malformed `.wasm` files, trapping, looping and
//! memory-hungry guests and the sandbox are covered against the runtime in
//! `guest_runtime.rs`; invalid configurations in `config_golden.rs`.)
//!
//! - a plugin folder of broken components refuses to start, naming each file;
//! - a row holding a 100 MB text value arrives whole;
//! - a table of 1,600 columns (PostgreSQL's limit) arrives whole;
//! - schema, table and column names with quotes, dots, spaces and Unicode arrive as named;
//! - hostile table names (`/../../outside`, `x/../public.ok`, a newline, `"a.b".c` beside
//!   `a."b.c"`, `A` beside `a`, `%2F`, `..`, 63-byte multibyte names) each get their own
//!   table inside the lake root, and the other tables keep streaming;
//! - a slot dropped underneath the running host, and missing when it restarts: an
//!   error naming the slot, never a silent gap; the slot is never created again.

use airlock_tests::source_support as support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_tests::*;
use anyhow::{Result, ensure};
use serde_json::Value as Json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_folder_of_broken_components_refuses_to_start_naming_each_file() -> Result<()> {
    let dir = temp_dir("hostile-plugins");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION airlock FOR TABLE t;",
    )
    .await?;
    let config = support::config(&pg.url("postgres"), &dir, "broken", "");
    let plugins = dir.join("plugins");
    let good = std::fs::read(guest("mask"))?;
    std::fs::write(plugins.join("10-truncated.wasm"), &good[..good.len() / 3])?;
    std::fs::write(plugins.join("20-text.wasm"), b"#!/bin/sh\necho not wasm\n")?;
    std::fs::copy(guest("test_noexport"), plugins.join("30-noexport.wasm"))?;
    let out = std::process::Command::new(airlock_bin())
        .args(["run", "--config"])
        .arg({
            let path = dir.join("airlock.toml");
            std::fs::write(&path, &config)?;
            path
        })
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the host must refuse to start:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for expected in [
        "10-truncated.wasm",
        "20-text.wasm",
        "30-noexport.wasm",
        "process",
    ] {
        assert!(
            stderr.contains(expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
    // Nothing was streamed and no slot was left consuming.
    assert!(!dir.join("lake").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_a_100_mb_value_arrives_whole() -> Result<()> {
    let dir = temp_dir("hostile-huge");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, email text, body text);
         CREATE PUBLICATION airlock FOR TABLE big;",
    )
    .await?;
    // The same plugin folder the config names.
    plugin_dir(&dir, &[("10-mask", "mask", "")]);
    let config = support::config(&pg.url("postgres"), &dir, "huge", "");
    let host = Host::start(&config, &dir);
    support::wait_for_slot(&db, "huge").await?;
    // 100 MiB of text (1,600,000 distinct-ish 64-byte chunks), and a small row after it.
    db.batch_execute(
        "INSERT INTO big SELECT 1, 'big@example.com', string_agg(md5(g::text) || md5((g + 1)::text), '') FROM generate_series(1, 1638400) g;
         INSERT INTO big VALUES (2, 'small@example.com', 'small');",
    )
    .await?;
    let (length, digest): (i32, String) = {
        let row = db
            .query_one("SELECT length(body), md5(body) FROM big WHERE id = 1", &[])
            .await?;
        (row.get(0), row.get(1))
    };
    assert_eq!(length, 100 * 1024 * 1024);
    let table = dir.join("lake/public.big");
    let rows = wait_for_lake(&table, Duration::from_secs(180), |r| r.len() >= 2).await?;
    host.stop().await?;
    assert_eq!(rows.len(), 2);
    let body = rows[0]["body"].as_str().expect("the big value as text");
    assert_eq!(
        body.len(),
        length as usize,
        "the 100 MB value arrived whole"
    );
    assert_eq!(md5_hex(body), digest);
    assert_eq!(rows[0]["email"], Json::from(sha256_hex("big@example.com")));
    assert_eq!(rows[1]["body"], "small");
    Ok(())
}

fn md5_hex(text: &str) -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import hashlib,sys; print(hashlib.md5(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("python3 for md5");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_1600_columns_arrives_whole() -> Result<()> {
    let dir = temp_dir("hostile-wide");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    let columns: Vec<String> = (1..1600).map(|i| format!("c{i} int")).collect();
    db.batch_execute(&format!(
        "CREATE TABLE wide (id int PRIMARY KEY, {});
         CREATE PUBLICATION airlock FOR TABLE wide;",
        columns.join(", ")
    ))
    .await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "wide", ""),
        &dir,
    );
    support::wait_for_slot(&db, "wide").await?;
    let values: Vec<String> = (1..1600).map(|i| (i * 7).to_string()).collect();
    db.batch_execute(&format!(
        "INSERT INTO wide VALUES (1, {}); UPDATE wide SET c1599 = -1 WHERE id = 1;",
        values.join(", ")
    ))
    .await?;
    let rows = wait_for_lake(
        &dir.join("lake/public.wide"),
        Duration::from_secs(120),
        |r| r.len() >= 2,
    )
    .await?;
    host.stop().await?;
    for (n, row) in rows.iter().enumerate() {
        let data = row
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !k.starts_with('_'))
            .count();
        assert_eq!(data, 1600, "row {n} has every column");
        for i in (1..1599).step_by(97) {
            assert_eq!(row[format!("c{i}")], i * 7, "row {n} column c{i}");
        }
    }
    assert_eq!(rows[0]["c1599"], 1599 * 7);
    assert_eq!(rows[1]["c1599"], -1);
    assert_eq!(rows[1]["_op"], "u");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_quotes_dots_spaces_and_unicode_arrive_as_named() -> Result<()> {
    let dir = temp_dir("hostile-names");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        r#"CREATE SCHEMA "Sch ""é"" ma";
           CREATE TABLE "Sch ""é"" ma"."Straße.表 'x'" (
               "id" int PRIMARY KEY,
               "naïve col" text,
               "we""ird" text,
               "列 😀" int
           );
           CREATE PUBLICATION airlock FOR TABLE "Sch ""é"" ma"."Straße.表 'x'";"#,
    )
    .await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "names", ""),
        &dir,
    );
    support::wait_for_slot(&db, "names").await?;
    db.batch_execute(
        r#"INSERT INTO "Sch ""é"" ma"."Straße.表 'x'" VALUES (1, 'ä', 'q"uote', 42);
           UPDATE "Sch ""é"" ma"."Straße.表 'x'" SET "列 😀" = 43;"#,
    )
    .await?;
    // The table directory is `{schema}.{table}`, whatever the characters.
    let lake = dir.join("lake");
    let start = Instant::now();
    let table = loop {
        let found: Vec<_> = std::fs::read_dir(&lake)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("_delta_log").is_dir())
            .collect();
        if let [one] = found.as_slice() {
            break one.clone();
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "no lake table: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rows = wait_for_lake(&table, Duration::from_secs(60), |r| r.len() >= 2).await?;
    host.stop().await?;
    // The directory escapes every byte but ASCII letters, digits and `-`; the Delta
    // metadata keeps the original name.
    assert_eq!(
        table.file_name().unwrap().to_string_lossy(),
        "Sch_20_22_C3_A9_22_20ma.Stra_C3_9Fe_2E_E8_A1_A8_20_27x_27.x"
    );
    assert_eq!(
        delta_table_name(&table)?.as_deref(),
        Some("\"Sch \"\"é\"\" ma\".\"Straße.表 'x'\"")
    );
    assert_eq!(rows[0]["naïve col"], "ä");
    assert_eq!(rows[0]["we\"ird"], "q\"uote");
    assert_eq!(rows[0]["列 😀"], 42);
    assert_eq!(rows[1]["列 😀"], 43);
    Ok(())
}

/// The name of the Delta table in `dir`, from the `metaData` of its first commit.
fn delta_table_name(dir: &Path) -> Result<Option<String>> {
    let log = std::fs::read_to_string(dir.join("_delta_log/00000000000000000000.json"))?;
    for line in log.lines() {
        let action: Json = serde_json::from_str(line)?;
        if let Some(meta) = action.get("metaData") {
            return Ok(meta["name"].as_str().map(str::to_owned));
        }
    }
    Ok(None)
}

/// `name` as an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The tables of the lake path-escape attack, `(schema, table)`, and the original
/// name each shows in the lake: plain names as they are, others double-quoted.
fn hostile_tables() -> Vec<(String, String, String)> {
    let long = "€".repeat(21); // 63 bytes: PostgreSQL's longest name
    let long_end = "€".repeat(20) + "₤";
    let pairs = [
        ("public", "ok"),
        ("public", "line\nbreak"),
        ("public", "/../../outside"),
        ("public", "a/../b"),
        ("public", "b"),
        ("public", "x/../public.ok"),
        ("a.b", "c"),
        ("a", "b.c"),
        ("public", "A"),
        ("public", "a"),
        ("public", "%2F"),
        ("public", ".."),
        (long.as_str(), long.as_str()),
        (long.as_str(), long_end.as_str()),
    ];
    let shown = |name: &str| {
        let plain = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if plain { name.to_owned() } else { ident(name) }
    };
    pairs
        .into_iter()
        .map(|(s, t)| {
            let display = format!("{}.{}", shown(s), shown(t));
            (s.to_owned(), t.to_owned(), display)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_table_names_each_get_their_own_table_inside_the_lake_root() -> Result<()> {
    let dir = temp_dir("hostile-lake-paths");
    let lake = dir.join("lake");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    let tables = hostile_tables();
    let schemas: BTreeSet<&str> = tables.iter().map(|(s, _, _)| s.as_str()).collect();
    for schema in schemas {
        db.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", ident(schema)))
            .await?;
    }
    for (schema, table, _) in &tables {
        db.batch_execute(&format!(
            "CREATE TABLE {}.{} (id int PRIMARY KEY, tbl int NOT NULL)",
            ident(schema),
            ident(table)
        ))
        .await?;
    }
    db.batch_execute("CREATE PUBLICATION airlock FOR ALL TABLES")
        .await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "paths", ""),
        &dir,
    );
    support::wait_for_slot(&db, "paths").await?;
    // Table k gets rows 100k + 1 and 100k + 2, tagged k; then `public.ok` (table 0)
    // one more, after every hostile table's.
    let mut expected: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for (k, (schema, table, _)) in tables.iter().enumerate() {
        let k = k as i32;
        db.batch_execute(&format!(
            "INSERT INTO {}.{} VALUES ({a}, {k}), ({b}, {k})",
            ident(schema),
            ident(table),
            a = 100 * k + 1,
            b = 100 * k + 2,
        ))
        .await?;
        expected.insert(k, vec![100 * k + 1, 100 * k + 2]);
    }
    db.batch_execute("INSERT INTO public.ok VALUES (99, 0)")
        .await?;
    expected.entry(0).or_default().push(99);

    // Every failure is collected, so one run shows them all.
    let mut problems: Vec<String> = Vec::new();
    let streamed = wait_for_lake(&lake.join("public.ok"), Duration::from_secs(90), |rows| {
        rows.iter().any(|r| r["id"] == 99)
    })
    .await;
    if let Err(error) = &streamed {
        problems.push(format!("public.ok stopped streaming: {error:#}"));
        host.abort();
    } else if host.is_finished() {
        problems.push(format!("the host stopped: {:?}", host.stop().await));
    } else if let Err(error) = host.stop().await {
        problems.push(format!("the host did not stop cleanly: {error:#}"));
    }

    // Nothing beside the root but what this test made.
    for entry in std::fs::read_dir(&dir)? {
        let name = entry?.file_name();
        if name != "lake" && name != "plugins" {
            problems.push(format!(
                "{} was written outside the lake root",
                dir.join(&name).display()
            ));
        }
    }
    // In the root: one table per source table, holding its rows and only those.
    let mut found: BTreeMap<i32, Vec<PathBuf>> = BTreeMap::new();
    let table_dirs: Vec<PathBuf> = std::fs::read_dir(&lake)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|p| p.join("_delta_log").is_dir())
        .collect();
    for path in &table_dirs {
        let rows = match read_lake("duckdb", path) {
            Ok(rows) => rows,
            Err(error) => {
                problems.push(format!("cannot read {}: {error:#}", path.display()));
                continue;
            }
        };
        let mut by_table: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for row in &rows {
            let (Some(k), Some(id)) = (row["tbl"].as_i64(), row["id"].as_i64()) else {
                problems.push(format!(
                    "{}: a row without id or tbl: {row}",
                    path.display()
                ));
                continue;
            };
            by_table.entry(k as i32).or_default().push(id as i32);
        }
        if by_table.len() > 1 {
            let names: Vec<&str> = by_table
                .keys()
                .map(|&k| tables[k as usize].2.as_str())
                .collect();
            problems.push(format!("{} mixes the rows of {names:?}", path.display()));
        }
        for (k, mut ids) in by_table {
            ids.sort();
            let (_, _, name) = &tables[k as usize];
            if ids != expected[&k] {
                problems.push(format!(
                    "{name} in {}: rows {ids:?}, expected {:?}",
                    path.display(),
                    expected[&k]
                ));
            }
            match delta_table_name(path) {
                Ok(Some(stored)) if stored == *name => {}
                other => problems.push(format!(
                    "{name} in {}: the Delta table is named {other:?}",
                    path.display()
                )),
            }
            found.entry(k).or_default().push(path.clone());
        }
    }
    for (k, (_, _, name)) in tables.iter().enumerate() {
        match found.get(&(k as i32)).map(Vec::as_slice) {
            Some([_]) => {}
            None => problems.push(format!("{name}: no table in the lake holds its rows")),
            Some(many) => problems.push(format!("{name}: its rows are in {many:?}")),
        }
    }
    if table_dirs.len() != tables.len() {
        problems.push(format!(
            "{} tables in the lake for {} source tables: {table_dirs:?}",
            table_dirs.len(),
            tables.len()
        ));
    }
    ensure!(
        problems.is_empty(),
        "hostile table names broke the lake:\n- {}",
        problems.join("\n- ")
    );
    Ok(())
}

/// Waits for `host` to stop with an error saying every one of `needles`, and checks
/// that it left no slot `dropped` behind.
async fn refused_without_a_slot(
    db: &tokio_postgres::Client,
    host: Host,
    needles: &[&str],
) -> Result<()> {
    let error = host.failure().await?;
    for needle in needles {
        assert!(error.contains(needle), "the error says `{needle}`: {error}");
    }
    let created = db
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'dropped'",
            &[],
        )
        .await?;
    assert!(created.is_none(), "the slot was created again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_stops_the_running_host_and_its_restart_and_is_never_recreated() -> Result<()>
{
    let dir = temp_dir("hostile-dropped");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION airlock FOR TABLE t;",
    )
    .await?;
    let host = Host::start(
        &support::config(&pg.url("postgres"), &dir, "dropped", ""),
        &dir,
    );
    support::wait_for_slot(&db, "dropped").await?;
    db.execute("INSERT INTO t VALUES (1)", &[]).await?;
    let table = dir.join("lake/public.t");
    wait_for_lake(&table, Duration::from_secs(60), |r| r.len() == 1).await?;
    // Drop it: end its walsender and drop the slot before the host reconnects.
    let start = Instant::now();
    loop {
        let dropped = db
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'dropped' AND active_pid IS NOT NULL;
                 SELECT pg_drop_replication_slot('dropped');",
            )
            .await;
        if dropped.is_ok() {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "cannot drop the slot: {dropped:?}"
        );
    }
    // Rows committed while no slot exists: no slot airlock could create now would
    // hold them.
    for id in 2..=5 {
        db.execute("INSERT INTO t VALUES ($1)", &[&id]).await?;
    }
    // The host (create_slot = true) reconnects, finds its slot gone and stops with an
    // error rather than creating the slot again past the rows above.
    refused_without_a_slot(
        &db,
        host,
        &[
            "replication slot `dropped` was dropped while airlock was streaming from it",
            "changes committed since then may be gone",
            "pg_create_logical_replication_slot('dropped', 'pgoutput')",
            "take a new snapshot",
        ],
    )
    .await?;
    // Nothing was written past the drop as if the stream had gone on.
    let rows = read_lake("duckdb", &table)?;
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![1]);

    // A restart cannot tell from the slot alone that it was dropped, but the lake
    // holds its commits: it refuses to create the slot too.
    let config = support::config(&pg.url("postgres"), &dir, "dropped", "");
    refused_without_a_slot(
        &db,
        Host::start(&config, &dir),
        &[
            "replication slot `dropped` does not exist, but sink `lake` already holds changes read from it",
            "table public.t, through commit LSN",
            "take a new snapshot into an empty lake",
            "pg_create_logical_replication_slot('dropped', 'pgoutput')",
        ],
    )
    .await?;

    // Accepting the gap is the operator's explicit step: with the slot created by
    // hand, the host goes on from there.
    db.batch_execute("SELECT pg_create_logical_replication_slot('dropped', 'pgoutput')")
        .await?;
    let resumed = Host::start(&config, &dir);
    support::wait_for_slot(&db, "dropped").await?;
    db.execute("INSERT INTO t VALUES (6)", &[]).await?;
    wait_for_lake(&table, Duration::from_secs(60), |r| r.len() == 2).await?;
    resumed.stop().await?;
    let rows = read_lake("duckdb", &table)?;
    let mut ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, vec![1, 6]);
    Ok(())
}
