//! Operating airlock: `airlock check` lists every problem, SIGTERM drains and exits 0
//! with nothing lost or repeated on restart, and a failing guest either halts the
//! stream (nothing past it acknowledged) or dead-letters the transaction.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use airlock_tests::*;

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("airlock.toml");
    std::fs::write(&path, body).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_lists_every_problem_at_once() -> anyhow::Result<()> {
    let dir = temp_dir("check");
    let pg = Cluster::start("wal_level = replica").unwrap_or_else(|e| panic!("{e}"));
    let plugins = plugin_dir(&dir, &[("10-mask", "mask", "")]);
    std::fs::write(plugins.join("20-broken.wasm"), b"not wasm at all")?;
    let config = write_config(
        &dir,
        &format!(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\npublication = \"nothere\"\nslot = \"nothere\"\ncreate_slot = false\n\
             [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"plugins\"\nrequire = [\"30-mask\"]\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}/lake\"\n",
            pg.url("postgres"),
            dir.display()
        ),
    );
    let out = Command::new(airlock_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check must fail:\n{stdout}");
    for expected in [
        "ok   connection",
        "FAIL wal_level              is `replica`: set wal_level = logical",
        "FAIL publication            `nothere` does not exist",
        "FAIL slot                   `nothere` does not exist and create_slot = false",
        "FAIL plugins.require        required stage 30-mask missing",
        "FAIL plugin ",
        "20-broken.wasm",
        "ok   sink lake",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    assert!(stderr.contains("problems found"), "{stderr}");

    // A bad configuration file lists every invalid field, with its path.
    let bad = write_config(
        &dir,
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"mysql://x\"\nslot = \"Bad\"\n[sinks.lake]\ntype = \"parquet\"\n",
    );
    let out = Command::new(airlock_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    for expected in [
        "source.url:",
        "source.slot:",
        "sinks.lake.type:",
        "sinks.lake.url:",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_a_restart_loses_and_repeats_nothing()
-> anyhow::Result<()> {
    let dir = temp_dir("sigterm");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, email text); CREATE PUBLICATION airlock FOR TABLE t;").await?;
    // The slot exists before the first write, so every row is in its stream.
    db.batch_execute("SELECT pg_create_logical_replication_slot('term', 'pgoutput')")
        .await?;
    plugin_dir(&dir, &[("10-mask", "mask", "")]);
    let config = write_config(
        &dir,
        &format!(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"term\"\nstatus_interval = \"1s\"\n[plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"plugins\"\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}/lake\"\nflush_interval = \"1s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            pg.url("postgres"),
            dir.display()
        ),
    );
    let writer_db = pg.connect("postgres").await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        let mut id = 0i64;
        while !*stop_rx.borrow() {
            id += 1;
            writer_db
                .execute(
                    "INSERT INTO t VALUES ($1, $2)",
                    &[&id, &format!("u{id}@example.com")],
                )
                .await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::Ok(id)
    });

    for round in 0..3 {
        let mut host = spawn_host(&config, &dir.join(format!("host{round}.log")));
        wait_slot_active(&db, "term").await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        host.signal("-TERM");
        let status = host.wait_exit(Duration::from_secs(30));
        let log = std::fs::read_to_string(dir.join(format!("host{round}.log"))).unwrap_or_default();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "round {round}: SIGTERM must exit 0 within 30 s; log:\n{log}"
        );
    }
    let _ = stop_tx.send(true);
    let written = writer.await??;

    // A last run drains what was written while stopped.
    let mut host = spawn_host(&config, &dir.join("final.log"));
    let table = dir.join("lake/public.t");
    let rows = wait_for_lake(&table, Duration::from_secs(60), |rows| {
        rows.len() >= written as usize
    })
    .await?;
    host.signal("-TERM");
    assert_eq!(
        host.wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a row was written twice");
    // Each clean stop acknowledged everything it had made durable: no later run was
    // sent a transaction the lake already held.
    for log in ["host1.log", "host2.log", "final.log"] {
        let text = std::fs::read_to_string(dir.join(log))?;
        assert!(
            !text.contains("skipping rows the lake already holds"),
            "{log}: PostgreSQL resent durable changes after a clean stop"
        );
    }
    assert_eq!(
        ids.len(),
        written as usize,
        "every committed row is in the lake"
    );
    // The slot was acknowledged: nothing is pending in it after the final run.
    let pending: i64 = db
        .query_one("SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'term'", &[])
        .await?
        .get(0);
    assert!(
        pending < 64 * 1024,
        "the slot still holds {pending} bytes after a clean stop"
    );
    // Regression: the lake's files took the umask (0644): row data readable by anyone.
    assert_private(&dir.join("lake"));
    Ok(())
}

/// Every file under `dir` is its owner's only (0600) and every directory 0700.
fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut open = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        let expected = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode != expected {
            open.push(format!("{} is {mode:o}", path.display()));
        }
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(
        open.is_empty(),
        "files with row data open to others: {open:#?}"
    );
}

/// A cluster with table `t` published and slot `slot`, and a plugin folder whose one
/// stage (`10-check`) traps on a row whose value is `poison`.
async fn poisoned(
    slot: &str,
) -> anyhow::Result<(TempDir, Cluster, tokio_postgres::Client, PathBuf)> {
    let dir = temp_dir(slot);
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, name text); CREATE PUBLICATION airlock FOR TABLE t;",
    )
    .await?;
    db.batch_execute(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ))
    .await?;
    let plugins = plugin_dir(
        &dir,
        &[(
            "10-check",
            "test_trap",
            "trap = \"row-value\"\nvalue = \"poison\"\n",
        )],
    );
    Ok((dir, pg, db, plugins))
}

/// Three transactions; the second poisons the guest.
async fn insert_fine_poison_after(db: &tokio_postgres::Client) -> anyhow::Result<()> {
    for (id, name) in [(1i64, "fine"), (2, "poison"), (3, "after")] {
        db.execute("INSERT INTO t VALUES ($1, $2)", &[&id, &name])
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_pipeline_acknowledges_nothing_and_resumes_when_the_guest_is_fixed()
-> anyhow::Result<()> {
    let (dir, pg, db, plugins) = poisoned("halt").await?;
    let admin = format!("127.0.0.1:{}", airlock::demo::cluster::free_port());
    let config = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"halt\"\nstatus_interval = \"1s\"\n[plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}/lake\"\nflush_interval = \"200ms\"\n[admin]\nlisten = \"{admin}\"\n",
        pg.url("postgres"),
        plugins.display(),
        dir.display()
    );
    let host = Host::start(&config, &dir);
    insert_fine_poison_after(&db).await?;
    let table = dir.join("lake/public.t");
    wait_for_lake(&table, Duration::from_secs(30), |rows| !rows.is_empty()).await?;
    // The poisoned transaction halts the stream: its error shows in /status.
    let status = wait_status(&admin, Duration::from_secs(30), "the halt error", |s| {
        s["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("10-check"))
    })
    .await?;
    assert!(
        status["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("trapped"),
        "{status:#}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows = read_lake("duckdb", &table)?;
    assert_eq!(
        rows.iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![1],
        "nothing past the halt is written"
    );
    let confirmed: String = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'halt'",
            &[],
        )
        .await?
        .get(0);

    // Fix the guest (same stage name, a guest that does not trap): the halted batch goes through.
    std::fs::write(plugins.join("10-check.toml"), "trap = \"never\"\n")?;
    let rows = wait_for_lake(&table, Duration::from_secs(60), |rows| rows.len() >= 3).await?;
    host.stop().await?;
    assert_eq!(
        rows.iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let after: String = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'halt'",
            &[],
        )
        .await?
        .get(0);
    assert_ne!(
        confirmed, after,
        "the slot moves once the halted transaction is through"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_quarantines_the_failing_transaction_and_the_stream_goes_on()
-> anyhow::Result<()> {
    let (dir, pg, db, plugins) = poisoned("dl").await?;
    let quarantine = dir.join("quarantine");
    let config = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"dl\"\nstatus_interval = \"1s\"\n\
         [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\non_error = \"dead-letter\"\ndead_letter_dir = \"{}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}/lake\"\nflush_interval = \"200ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        pg.url("postgres"),
        plugins.display(),
        quarantine.display(),
        dir.display()
    );
    let host = Host::start(&config, &dir);
    // Three transactions, committed back to back (they may share a batch): only the
    // poisoned one is quarantined.
    insert_fine_poison_after(&db).await?;
    let table = dir.join("lake/public.t");
    let rows = wait_for_lake(&table, Duration::from_secs(60), |rows| {
        rows.iter().any(|r| r["id"] == 3)
    })
    .await?;
    host.stop().await?;
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(
        ids,
        vec![1, 3],
        "the poisoned transaction is not in the lake, the others are"
    );
    let files = files_under(&quarantine);
    assert_eq!(files.len(), 1, "one dead-letter file: {files:?}");
    // Regression: dead letters (unmasked rows) were written 0644.
    assert_private(&quarantine);
    let text = std::fs::read_to_string(&files[0])?;
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap())?;
    assert_eq!(line["new"]["id"], 2);
    assert_eq!(line["new"]["name"], "poison");
    assert!(
        line["error"].as_str().unwrap().contains("10-check"),
        "{line}"
    );
    Ok(())
}

/// GET a JSON document; `None` while the server does not answer yet.
async fn get_json(url: &str) -> Option<serde_json::Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spine_that_is_down_shows_in_status_and_metrics_and_gets_everything_when_back()
-> anyhow::Result<()> {
    let dir = temp_dir("spinedown");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, email text); CREATE PUBLICATION airlock FOR TABLE t;").await?;
    db.batch_execute("SELECT pg_create_logical_replication_slot('down', 'pgoutput')")
        .await?;
    let plugins = plugin_dir(
        &dir,
        &[
            ("10-mask", "mask", ""),
            ("20-route", "route", "spine_tables = [\"public.t\"]\n"),
        ],
    );
    let spine_port = airlock::demo::cluster::free_port();
    let admin = format!("127.0.0.1:{}", airlock::demo::cluster::free_port());
    let config = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"down\"\nstatus_interval = \"1s\"\n[plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}/lake\"\nroutes = [\"default\", \"restricted\"]\nflush_interval = \"200ms\"\n\
         [sinks.spine]\ntype = \"http\"\nurl = \"http://127.0.0.1:{spine_port}/events\"\ndefault_source = \"ops\"\nflush_interval = \"200ms\"\n\
         [admin]\nlisten = \"{admin}\"\n",
        pg.url("postgres"),
        plugins.display(),
        dir.display()
    );
    // No spine listens yet: the host starts, and the spine sink retries.
    let host = Host::start(&config, &dir);
    for id in 1..=5i64 {
        db.execute(
            "INSERT INTO t VALUES ($1, $2)",
            &[&id, &format!("u{id}@example.com")],
        )
        .await?;
    }
    let start = Instant::now();
    loop {
        // The admin API may not listen yet right after the start; a host that stopped
        // by itself fails the test with its own error.
        let Some(s) = get_json(&format!("http://{admin}/status")).await else {
            if host.is_finished() {
                host.stop().await?;
                anyhow::bail!("the host stopped by itself");
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "the admin API at {admin} does not answer"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let spine = &s["sinks"]["spine"];
        if spine["retrying"] == true {
            assert!(
                spine["last_error"].as_str().is_some_and(|e| !e.is_empty()),
                "{spine}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the spine outage never showed in /status: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("airlock_sink_retries_total{sink=\"spine\"}"),
        "{metrics}"
    );
    // Rows out per table and route: every row went to `restricted` (mask tags its
    // table's email column pii) and to `spine`; none was dropped.
    for series in [
        "airlock_rows_in_total{table=\"public.t\"} 5\n",
        "airlock_rows_out_total{table=\"public.t\",route=\"restricted\"} 5\n",
        "airlock_rows_out_total{table=\"public.t\",route=\"spine\"} 5\n",
    ] {
        assert!(
            metrics.contains(series),
            "missing `{}` in:\n{metrics}",
            series.trim()
        );
    }
    assert!(
        !metrics.contains("airlock_rows_dropped_total{"),
        "{metrics}"
    );

    // The spine comes up: every event arrives, once, masked; the status clears.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", spine_port)).await?;
    let spine_dir = dir.join("spine");
    tokio::spawn(async move {
        airlock::spine::server::serve(&spine_dir, listener, None, std::future::pending::<()>())
            .await
    });
    let start = Instant::now();
    let events = loop {
        // The route guest annotates `spine.source`, which wins over the sink's default.
        let events: serde_json::Value = reqwest::get(format!(
            "http://127.0.0.1:{spine_port}/events?source=airlock"
        ))
        .await?
        .json()
        .await?;
        if events.as_array().is_some_and(|a| a.len() >= 5) {
            break events;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "events did not arrive after the spine came back: {events:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ids: Vec<i64> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["payload"]["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5], "in commit order, each once");
    for e in events.as_array().unwrap() {
        let id = e["payload"]["new"]["id"].as_i64().unwrap();
        assert_eq!(
            e["payload"]["new"]["email"],
            serde_json::Value::from(sha256_hex(&format!("u{id}@example.com")))
        );
    }
    let start = Instant::now();
    loop {
        // The admin API may not listen yet right after the start; a host that stopped
        // by itself fails the test with its own error.
        let Some(s) = get_json(&format!("http://{admin}/status")).await else {
            if host.is_finished() {
                host.stop().await?;
                anyhow::bail!("the host stopped by itself");
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "the admin API at {admin} does not answer"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if s["sinks"]["spine"]["retrying"] == false {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still retrying: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    host.stop().await?;
    Ok(())
}
