//! The crash loop: under continuous writes, the real `airlock run` process is killed
//! with SIGKILL at random moments — while starting, while streaming, in the middle of
//! a flush — and started again, `AIRLOCK_CRASH_KILLS` times (default 20). Then one last
//! run drains, and the lake (Delta, read by DuckDB) and the built-in spine (`airlock
//! spine serve`) must hold every committed change exactly once, in commit order,
//! masked, row by row as the writer committed them; and the lake's latest state of each
//! row must equal the table in PostgreSQL.
//!
//! The kill moments come from a seed printed at the start; `AIRLOCK_CRASH_SEED`
//! replays a run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use airlock_tests::pgoutput_fuzz::Rng;
use airlock_tests::spine_support::SpineProcess;
use airlock_tests::*;
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value as Json;

/// One committed change, as the writer made it.
#[derive(Clone, Debug, PartialEq)]
struct Committed {
    op: &'static str,
    id: i64,
    /// The raw address (inserts and updates); the sinks must hold its digest.
    email: Option<String>,
    n: Option<i32>,
}

/// Writes transactions of one to four changes until `stop`, and returns what it committed.
async fn write_until(
    client: &mut tokio_postgres::Client,
    stop: tokio::sync::watch::Receiver<bool>,
    seed: u64,
) -> Result<Vec<Committed>> {
    let mut rng = Rng::new(seed);
    let mut committed = Vec::new();
    let mut live: Vec<(i64, i32)> = Vec::new();
    let mut next_id = 0i64;
    while !*stop.borrow() {
        let txn = client.transaction().await?;
        let mut changes = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let choice = rng.below(10);
            if live.is_empty() || choice < 5 {
                next_id += 1;
                let email = format!("user{next_id}@example.com");
                txn.execute(
                    "INSERT INTO t (id, email, n) VALUES ($1, $2, 0)",
                    &[&next_id, &email],
                )
                .await?;
                live.push((next_id, 0));
                changes.push(Committed {
                    op: "c",
                    id: next_id,
                    email: Some(email),
                    n: Some(0),
                });
            } else if choice < 8 {
                let i = rng.below(live.len());
                let (id, n) = live[i];
                let email = format!("user{id}.{}@example.com", n + 1);
                txn.execute(
                    "UPDATE t SET email = $2, n = $3 WHERE id = $1",
                    &[&id, &email, &(n + 1)],
                )
                .await?;
                live[i].1 = n + 1;
                changes.push(Committed {
                    op: "u",
                    id,
                    email: Some(email),
                    n: Some(n + 1),
                });
            } else {
                let (id, _) = live.swap_remove(rng.below(live.len()));
                txn.execute("DELETE FROM t WHERE id = $1", &[&id]).await?;
                changes.push(Committed {
                    op: "d",
                    id,
                    email: None,
                    n: None,
                });
            }
        }
        txn.commit().await?;
        committed.extend(changes);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    Ok(committed)
}

fn email_digest(email: &Option<String>) -> Json {
    email
        .as_deref()
        .map(|e| Json::from(sha256_hex(e)))
        .unwrap_or(Json::Null)
}

/// Every spine event, in the order the spine appended them.
async fn spine_events(url: &str) -> Result<Vec<Json>> {
    let events: Json = reqwest::get(format!("{url}?limit=100000"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(events.as_array().cloned().unwrap_or_default())
}

fn check_lake(rows: &[Json], expected: &[Committed]) -> Result<()> {
    ensure!(
        rows.len() == expected.len(),
        "the lake holds {} changes, {} were committed",
        rows.len(),
        expected.len()
    );
    for (i, (row, want)) in rows.iter().zip(expected).enumerate() {
        let ok = row["_op"] == want.op
            && row["id"] == want.id
            && (want.op == "d"
                || (row["email"] == email_digest(&want.email)
                    && row["n"] == want.n.map(Json::from).unwrap_or(Json::Null)));
        ensure!(ok, "lake change #{i}: found {row}, committed {want:?}");
    }
    Ok(())
}

fn check_spine(events: &[Json], expected: &[Committed]) -> Result<()> {
    // The policy is registered once, across every restart; the rest are the changes.
    let (policy, events): (Vec<Json>, Vec<Json>) = events
        .iter()
        .cloned()
        .partition(|e| e["source"] == "airlock.policy");
    ensure!(
        policy.len() == 1 && policy[0]["kind"] == "policy_bundle_registered",
        "the policy is registered once across restarts: {policy:#?}"
    );
    ensure!(
        events.len() == expected.len(),
        "the spine holds {} events, {} changes were committed",
        events.len(),
        expected.len()
    );
    for (i, (event, want)) in events.iter().zip(expected).enumerate() {
        let p = &event["payload"];
        let ok = match want.op {
            "c" | "u" => {
                p["operation"] == if want.op == "c" { "INSERT" } else { "UPDATE" }
                    && p["new"]["id"] == want.id
                    && p["new"]["email"] == email_digest(&want.email)
                    && p["new"]["n"] == want.n.map(Json::from).unwrap_or(Json::Null)
            }
            _ => p["operation"] == "DELETE" && p["old"]["id"] == want.id,
        };
        ensure!(ok, "spine event #{i}: found {p}, committed {want:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_under_writes_loses_and_repeats_nothing() -> Result<()> {
    let kills: usize = std::env::var("AIRLOCK_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("AIRLOCK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("crash loop: {kills} kills, AIRLOCK_CRASH_SEED={seed}");
    let mut rng = Rng::new(seed);

    let dir = temp_dir("crash-loop");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, email text, n integer);
         CREATE PUBLICATION airlock FOR TABLE t;",
    )
    .await?;
    db.batch_execute("SELECT pg_create_logical_replication_slot('crash', 'pgoutput')")
        .await?;
    let spine_dir = dir.join("spine");
    std::fs::create_dir_all(&spine_dir)?;
    let spine = SpineProcess::start(&spine_dir, spine_support::free_port()).await?;
    let plugins = plugin_dir(
        &dir,
        &[
            ("10-mask", "mask", ""),
            ("20-route", "route", "spine_tables = [\"public.t\"]\n"),
        ],
    );
    let config = dir.join("airlock.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"crash\"\nstatus_interval = \"1s\"\n\
             [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\nrequire = [\"10-mask\"]\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}/lake\"\nroutes = [\"default\", \"restricted\"]\nflush_interval = \"200ms\"\n\
             [sinks.spine]\ntype = \"http\"\nurl = \"{}\"\nflush_interval = \"200ms\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            pg.url("postgres"),
            plugins.display(),
            dir.display(),
            spine.url
        ),
    )?;

    let mut writer_db = pg.connect("postgres").await?;
    let (stop_writes, stop_rx) = tokio::sync::watch::channel(false);
    let writer_seed = rng.next_u64();
    let writer =
        tokio::spawn(async move { write_until(&mut writer_db, stop_rx, writer_seed).await });

    let table = dir.join("lake/public.t");
    let started = Instant::now();
    let mut lake_rows_seen = 0;
    for round in 0..kills {
        let log = dir.join(format!("host{round}.log"));
        let mut host = spawn_host(&config, &log);
        // Half the kills land early (connecting, loading guests, first flush), half
        // later, while streaming and flushing.
        let life = if round % 2 == 0 {
            100 + rng.below(900)
        } else {
            1000 + rng.below(2500)
        };
        tokio::time::sleep(Duration::from_millis(life as u64)).await;
        if let Ok(Some(status)) = host.0.try_wait() {
            bail!(
                "round {round}: the host exited by itself ({status}) before the kill:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        host.0.kill()?; // SIGKILL
        host.0.wait()?;
        if round % 5 == 4 && table.join("_delta_log").is_dir() {
            lake_rows_seen = read_lake("duckdb", &table)?.len();
        }
    }
    let _ = stop_writes.send(true);
    let committed = writer.await??;
    eprintln!(
        "crash loop: {kills} kills in {:?}; {} changes committed; {lake_rows_seen} in the lake before the last run",
        started.elapsed(),
        committed.len()
    );
    ensure!(
        lake_rows_seen > 0,
        "the killed hosts never wrote to the lake: the kills did not hit a working host"
    );

    // The last run drains everything, then stops cleanly.
    let final_log = dir.join("final.log");
    let mut host = spawn_host(&config, &final_log);
    let rows = wait_for_lake(&table, Duration::from_secs(180), |rows| {
        rows.len() >= committed.len()
    })
    .await
    .with_context(|| std::fs::read_to_string(&final_log).unwrap_or_default())?;
    let start = Instant::now();
    let mut events = spine_events(&spine.url).await?;
    while events.len() < committed.len() && start.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        events = spine_events(&spine.url).await?;
    }
    // Let a duplicate, if any were coming, arrive before the final reads.
    tokio::time::sleep(Duration::from_secs(2)).await;
    host.stop(Duration::from_secs(60))?;
    let rows = if read_lake("duckdb", &table)?.len() != rows.len() {
        read_lake("duckdb", &table)?
    } else {
        rows
    };
    let events = spine_events(&spine.url).await?;

    check_lake(&rows, &committed)?;
    check_spine(&events, &committed)?;

    // The lake's latest image of each row is the table as PostgreSQL holds it.
    let mut latest: BTreeMap<i64, (Json, Json)> = BTreeMap::new();
    for row in &rows {
        let id = row["id"].as_i64().context("id")?;
        if row["_op"] == "d" {
            latest.remove(&id);
        } else {
            latest.insert(id, (row["email"].clone(), row["n"].clone()));
        }
    }
    let table_rows: BTreeMap<i64, (Json, Json)> = db
        .query("SELECT id, email, n FROM t", &[])
        .await?
        .iter()
        .map(|r| {
            let email: Option<String> = r.get(1);
            let n: Option<i32> = r.get(2);
            (
                r.get::<_, i64>(0),
                (
                    email_digest(&email),
                    n.map(Json::from).unwrap_or(Json::Null),
                ),
            )
        })
        .collect();
    assert_eq!(
        latest.len(),
        table_rows.len(),
        "rows in the lake's latest state vs the table"
    );
    assert!(
        latest == table_rows,
        "the lake's latest state differs from the table"
    );

    // No raw address reached a lake file or the spine's log.
    let sample: Vec<&str> = committed
        .iter()
        .filter_map(|c| c.email.as_deref())
        .step_by(50)
        .collect();
    for file in files_under(&dir.join("lake"))
        .into_iter()
        .chain(files_under(&spine_dir))
    {
        let bytes = std::fs::read(&file)?;
        for raw in &sample {
            assert!(
                !bytes.windows(raw.len()).any(|w| w == raw.as_bytes()),
                "{} holds the raw address {raw}",
                file.display()
            );
        }
    }
    for i in 0..kills {
        let log = std::fs::read_to_string(dir.join(format!("host{i}.log"))).unwrap_or_default();
        assert!(!log.contains("panicked"), "host{i}.log:\n{log}");
    }
    let verify: Json = reqwest::get(spine.url.replace("/events", "/verify"))
        .await?
        .json()
        .await?;
    assert_eq!(
        verify["valid"], true,
        "the spine's hash chain verifies: {verify}"
    );
    spine.kill_9().await;
    Ok(())
}
