//! Incremental snapshots (`snapshot = "initial"`): a populated table added to the
//! publication under live writes, a column added with a default (which WAL never
//! carries to existing rows), and a column's type rewritten with `USING` (no WAL
//! either): the lake's latest state per key ends equal to PostgreSQL's, also when the
//! host is killed mid-way and started again.

use airlock_tests::source_support as support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use airlock_tests::*;
use anyhow::bail;
use serde_json::Value as Json;

/// A value of the lake as text: its column, or when the column's lake type could not
/// hold it (after `ALTER COLUMN … TYPE`), its exact text in `_special`.
fn text(row: &Json, column: &str) -> Option<String> {
    match &row[column] {
        Json::Null => row["_special"].as_array().and_then(|specials| {
            specials.iter().find_map(|s| {
                s.as_str()
                    .and_then(|s| s.strip_prefix(&format!("{column}=")))
                    .map(str::to_owned)
            })
        }),
        Json::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The lake's latest state per `id`: its change log folded in order.
fn fold(rows: &[Json], columns: &[&str]) -> BTreeMap<i64, Vec<Option<String>>> {
    let mut state = BTreeMap::new();
    for row in rows {
        match row["_op"].as_str() {
            Some("t") => state.clear(),
            Some("d") => {
                state.remove(&row["id"].as_i64().expect("a delete has its key"));
            }
            _ => {
                let values = columns.iter().map(|c| text(row, c)).collect();
                state.insert(row["id"].as_i64().expect("a row has its key"), values);
            }
        }
    }
    state
}

/// PostgreSQL's state of `table`, as text, per `id`.
async fn database(
    db: &tokio_postgres::Client,
    table: &str,
    columns: &[&str],
) -> anyhow::Result<BTreeMap<i64, Vec<Option<String>>>> {
    let list: Vec<String> = columns.iter().map(|c| format!("{c}::text")).collect();
    let rows = db
        .query(
            &format!("SELECT id::int8, {} FROM {table}", list.join(", ")),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                (1..=columns.len()).map(|i| r.get(i)).collect(),
            )
        })
        .collect())
}

/// A table in the state file: its columns with their type OIDs, and why a copy is due.
type TableState = (Vec<(String, u64)>, Option<String>);

/// The state file's entry for `table`.
fn state_of(dir: &Path, slot: &str, table: &str) -> Option<TableState> {
    let suffix = format!("-{slot}.tables.json");
    let file = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(&suffix))?;
    let state: Json = serde_json::from_slice(&std::fs::read(file.path()).ok()?).ok()?;
    let entry = state["tables"]
        .as_object()?
        .values()
        .find(|t| t["name"] == table)?;
    let columns = entry["shape"]["columns"]
        .as_array()?
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["type_oid"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    Some((columns, entry["due"].as_str().map(str::to_owned)))
}

/// Waits until the state says `table` has `column` of type `type_oid` and no copy is
/// due for it: the change was seen, and its copy is durable.
async fn wait_settled(
    dir: &Path,
    slot: &str,
    table: &str,
    column: &str,
    type_oid: u64,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let state = state_of(dir, slot, table);
        if let Some((columns, None)) = &state
            && columns
                .iter()
                .any(|(name, t)| name == column && *t == type_oid)
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "{table} did not settle with {column} of type {type_oid} within 120 s: {state:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_added_or_rewritten_under_live_writes_end_equal_to_postgres() -> anyhow::Result<()> {
    let dir = temp_dir("incremental");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE accounts (id integer PRIMARY KEY, v integer NOT NULL);
         INSERT INTO accounts SELECT i, i FROM generate_series(1, 2000) i;
         CREATE TABLE later (id integer PRIMARY KEY, v integer NOT NULL);
         INSERT INTO later SELECT i, i FROM generate_series(1, 20000) i;
         CREATE PUBLICATION airlock FOR TABLE accounts;",
    )
    .await?;
    let config = support::config(&pg.url("postgres"), &dir, "incr", "snapshot = \"initial\"");
    let host = Host::start(&config, &dir);
    support::wait_for_slot(&db, "incr").await?;

    // Live writes to both tables throughout: inserts, updates, deletes.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let db = pg.connect("postgres").await?;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i: i32 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                db.batch_execute(&format!(
                    "UPDATE accounts SET v = v + 1 WHERE id = {a};
                     INSERT INTO accounts (id, v) VALUES ({new}, {i});
                     DELETE FROM accounts WHERE id = {gone};
                     INSERT INTO later VALUES ({new}, {i});
                     UPDATE later SET v = -v WHERE id = {b};
                     DELETE FROM later WHERE id = {c};",
                    a = i * 7 % 2000 + 1,
                    gone = i * 11 % 2000 + 1,
                    new = 100_000 + i,
                    b = i * 13 % 20_000 + 1,
                    c = i * 17 % 20_000 + 1,
                ))
                .await?;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            anyhow::Ok(i)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A populated table joins the publication; the host is killed soon after and
    // started again: the copy happens (again) whichever point it had reached.
    db.batch_execute("ALTER PUBLICATION airlock ADD TABLE later")
        .await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    host.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let host = Host::start(&config, &dir);
    wait_settled(&dir, "incr", "public.later", "v", 23).await?;

    // A column with a default: stored rows read 7, and WAL never says so.
    db.batch_execute("ALTER TABLE accounts ADD COLUMN c integer DEFAULT 7")
        .await?;
    wait_settled(&dir, "incr", "public.accounts", "c", 23).await?;
    // A rewrite that changes every stored value, again without WAL.
    db.batch_execute("ALTER TABLE accounts ALTER COLUMN v TYPE numeric USING round(v / 3.0)")
        .await?;
    wait_settled(&dir, "incr", "public.accounts", "v", 1700).await?;

    stop.store(true, Ordering::Relaxed);
    let writes = writer.await??;
    assert!(writes > 100, "the writer ran along: {writes} rounds");
    // Everything written is in the lake once this last change is.
    db.batch_execute("INSERT INTO later VALUES (-1, 0); INSERT INTO accounts VALUES (-1, 0)")
        .await?;
    let marker = |rows: &[Json]| rows.iter().any(|r| r["id"] == -1);
    let accounts = wait_for_lake(
        &dir.join("lake/public.accounts"),
        Duration::from_secs(60),
        marker,
    )
    .await?;
    let later = wait_for_lake(
        &dir.join("lake/public.later"),
        Duration::from_secs(60),
        marker,
    )
    .await?;
    host.stop().await?;

    // Each copy says why in the commit info of the lake.
    let copied_because = |table: &str| -> Vec<String> {
        files_under(&dir.join("lake").join(table).join("_delta_log"))
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "json"))
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter_map(|line| serde_json::from_str::<Json>(&line).ok())
            .filter_map(|action| action["commitInfo"]["airlock.copied"].as_array().cloned())
            .flatten()
            .filter_map(|reason| reason.as_str().map(str::to_owned))
            .collect()
    };
    let later_reasons = copied_because("public.later");
    assert!(
        later_reasons
            .iter()
            .any(|r| r == "copied again: added to the publication"),
        "{later_reasons:?}"
    );
    let accounts_reasons = copied_because("public.accounts");
    for expected in [
        "initial snapshot",
        "`c` was added with a default",
        "`v` changed type",
    ] {
        assert!(
            accounts_reasons.iter().any(|r| r.contains(expected)),
            "no commit says {expected}: {accounts_reasons:?}"
        );
    }
    let copied = later.iter().filter(|r| r["_op"] == "r").count();
    assert!(
        copied >= 19_000,
        "the existing rows of `later` were copied: {copied} reads"
    );
    for (name, rows, columns) in [
        ("accounts", &accounts, &["v", "c"][..]),
        ("later", &later, &["v"][..]),
    ] {
        let lake = fold(rows, columns);
        let postgres = database(&db, name, columns).await?;
        let differing: Vec<_> = postgres
            .iter()
            .filter(|(id, values)| lake.get(id) != Some(values))
            .map(|(id, values)| (id, values, lake.get(id)))
            .take(5)
            .collect();
        let extra: Vec<_> = lake
            .keys()
            .filter(|id| !postgres.contains_key(id))
            .take(5)
            .collect();
        assert!(
            differing.is_empty() && extra.is_empty() && lake.len() == postgres.len(),
            "{name}: lake {} keys, PostgreSQL {}; differing (id, postgres, lake): {differing:?}; only in the lake: {extra:?}",
            lake.len(),
            postgres.len()
        );
    }
    // The slots of the copies were temporary: only airlock's own remains.
    let slots: Vec<String> = db
        .query("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, ["incr"], "no copy slot is left behind");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airlock_snapshot_copies_a_table_again_on_demand_and_names_what_it_cannot()
-> anyhow::Result<()> {
    let dir = temp_dir("snapshot_cli");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE items (id integer PRIMARY KEY, v text);
         INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 3000) i;
         CREATE TABLE hidden (id integer PRIMARY KEY);
         CREATE PUBLICATION airlock FOR TABLE items;",
    )
    .await?;
    let config = support::config(
        &pg.url("postgres"),
        &dir,
        "again",
        &format!(
            "snapshot = \"initial\"\nstate_dir = \"{}\"",
            dir.join("state").display()
        ),
    );
    let file = dir.join("airlock.toml");
    let file_for_cli = file.clone();
    std::fs::write(&file, &config)?;
    let host = Host::start(&config, &dir);
    support::wait_for_slot(&db, "again").await?;
    let table = dir.join("lake/public.items");
    let reads = |rows: &[Json]| rows.iter().filter(|r| r["_op"] == "r").count();
    wait_for_lake(&table, Duration::from_secs(60), |rows| reads(rows) == 3000).await?;

    let snapshot = move |args: &[&str]| {
        std::process::Command::new(airlock_bin())
            .arg("snapshot")
            .arg("--config")
            .arg(&file_for_cli)
            .args(args)
            .output()
    };
    // Not published: refused by name, with the fix.
    let out = snapshot(&["public.hidden"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("`public.hidden` is not published")
            && stderr.contains("ALTER PUBLICATION airlock ADD TABLE public.hidden"),
        "{stderr}"
    );

    // Published: copied again while the host streams; the command returns once durable.
    db.batch_execute("UPDATE items SET v = 'changed' WHERE id <= 10")
        .await?;
    let again = snapshot.clone();
    let out = tokio::task::spawn_blocking(move || again(&["items"])).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("copied public.items"), "{stderr}");
    let rows = wait_for_lake(&table, Duration::from_secs(30), |rows| reads(rows) == 6000).await?;

    // A table without a key cannot be merged with its changes: refused by name (it
    // stays due, nothing of it is copied), and `airlock check` says so beforehand.
    db.batch_execute(
        "CREATE TABLE nokey (v integer); INSERT INTO nokey VALUES (1), (1);
         ALTER PUBLICATION airlock ADD TABLE nokey;",
    )
    .await?;
    let state = dir.join("state");
    let start = std::time::Instant::now();
    while state_of(&state, "again", "public.nokey").is_none_or(|(_, due)| due.is_none()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nokey never became due"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        state_of(&state, "again", "public.nokey").is_some_and(|(_, due)| due.is_some()),
        "a refused copy stays due"
    );
    assert!(
        !dir.join("lake/public.nokey").exists(),
        "nothing of a keyless table is copied"
    );
    let check = std::process::Command::new(airlock_bin())
        .args(["check", "--config"])
        .arg(&file)
        .output()?;
    let said = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(
        said.contains("public.nokey have no key") && said.contains("add a primary key"),
        "{said}"
    );
    host.stop().await?;
    // The second copy sees the update: its reads of ids 1..=10 say `changed`, and they
    // come after the update in the lake.
    let second: Vec<&Json> = rows.iter().filter(|r| r["_op"] == "r").skip(3000).collect();
    let changed = second.iter().filter(|r| r["v"] == "changed").count();
    assert_eq!(changed, 10, "the copy is of the table as it is now");
    let update_at = rows
        .iter()
        .position(|r| r["_op"] == "u")
        .expect("the update is in the lake");
    let first_second = rows
        .iter()
        .position(|r| std::ptr::eq(r, second[0]))
        .unwrap();
    assert!(
        update_at < first_second,
        "the copy lands after the update it saw"
    );
    Ok(())
}
