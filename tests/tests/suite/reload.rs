//! Hot reload on a running host under continuous inserts: a new stage goes live
//! without a restart, a broken guest and the removal of a required stage are refused
//! with the running pipeline kept, and every row arrives exactly once, masked, with
//! every transaction processed by exactly one pipeline version.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use airlock_tests::*;
use serde_json::Value as Json;

const TXN_ROWS: i64 = 5;

fn version(s: &Json) -> String {
    s["pipeline"]["version"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_reload_live_without_loss_and_bad_reloads_are_refused() -> anyhow::Result<()> {
    let dir = temp_dir("reload");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE events (id bigint PRIMARY KEY, txn bigint NOT NULL, email text NOT NULL);
         CREATE PUBLICATION airlock FOR TABLE events;",
    )
    .await?;
    db.batch_execute("SELECT pg_create_logical_replication_slot('reload', 'pgoutput')")
        .await?;
    let plugins = plugin_dir(&dir, &[("10-mask", "mask", "")]);
    let lake = dir.join("lake");
    let admin = format!("127.0.0.1:{}", airlock::demo::cluster::free_port());
    // A built-in spine, to receive the failed-reload event.
    let spine_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let spine_addr = spine_listener.local_addr()?;
    let spine_dir = dir.join("spine");
    tokio::spawn(async move {
        airlock::spine::server::serve(
            &spine_dir,
            spine_listener,
            None,
            std::future::pending::<()>(),
        )
        .await
    });
    let config = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"reload\"\nstatus_interval = \"1s\"\n\
         [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\nrequire = [\"10-mask\"]\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}\"\nflush_interval = \"300ms\"\n\
         [sinks.spine]\ntype = \"http\"\nurl = \"http://{spine_addr}/events\"\ndefault_source = \"reload-test\"\n\
         [admin]\nlisten = \"{admin}\"\n",
        pg.url("postgres"),
        plugins.display(),
        lake.display()
    );
    let host = Host::start(&config, &dir);
    let first = wait_status(&admin, Duration::from_secs(30), "the first pipeline", |s| {
        !version(s).is_empty()
    })
    .await?;
    let v1 = version(&first);
    assert_eq!(first["pipeline"]["stages"][0]["name"], "10-mask");

    // Continuous writes: transactions of TXN_ROWS rows each.
    let writer_db = pg.connect("postgres").await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        let mut txn = 0i64;
        while !*stop_rx.borrow() {
            txn += 1;
            let mut sql = String::from("BEGIN;");
            for i in 0..TXN_ROWS {
                let id = txn * TXN_ROWS + i;
                sql.push_str(&format!(
                    "INSERT INTO events VALUES ({id}, {txn}, 'user{id}@example.com');"
                ));
            }
            sql.push_str("COMMIT;");
            writer_db.batch_execute(&sql).await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(txn)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. A new stage, copied in while rows flow: live without a restart.
    let copied = Instant::now();
    std::fs::copy(guest("test_passthrough"), plugins.join("20-pass.wasm"))?;
    let second = wait_status(&admin, Duration::from_secs(20), "the new stage live", |s| {
        version(s) != v1
    })
    .await?;
    let v2 = version(&second);
    eprintln!("new stage live {:?} after the copy", copied.elapsed());
    let stages: Vec<&str> = second["pipeline"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages, vec!["10-mask", "20-pass"]);
    assert_eq!(
        second["pipeline"]["stages"][1]["content_hash"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. A broken guest: refused, the running pipeline stays, the error is visible.
    std::fs::write(
        plugins.join("30-broken.wasm"),
        b"\0asm\x0d\x00\x01\x00truncated",
    )?;
    let broken = wait_status(&admin, Duration::from_secs(20), "a failed reload", |s| {
        s["pipeline"]["last_reload"]["ok"] == Json::Bool(false)
    })
    .await?;
    assert_eq!(
        version(&broken),
        v2,
        "a failed reload leaves the running pipeline"
    );
    let error = broken["pipeline"]["last_reload"]["error"].as_str().unwrap();
    assert!(error.contains("30-broken.wasm"), "{error}");
    // ... and in an event on the audit spine.
    let start = Instant::now();
    loop {
        let events: Json = reqwest::get(format!("http://{spine_addr}/events?source=reload-test"))
            .await?
            .json()
            .await?;
        let found = events
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["payload"]["event"] == "pipeline_reload_failed");
        if let Some(event) = found {
            assert!(
                event["payload"]["error"]
                    .as_str()
                    .unwrap()
                    .contains("30-broken.wasm"),
                "{event}"
            );
            assert_eq!(event["payload"]["running_pipeline"], Json::from(v2.clone()));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no reload-failure event on the spine: {events:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::remove_file(plugins.join("30-broken.wasm"))?;
    wait_status(
        &admin,
        Duration::from_secs(20),
        "a successful reload",
        |s| s["pipeline"]["last_reload"]["ok"] == Json::Bool(true),
    )
    .await?;

    // 3. Removing the required masking stage: refused (fail closed).
    std::fs::rename(plugins.join("10-mask.wasm"), dir.join("10-mask.wasm.away"))?;
    let refused = wait_status(&admin, Duration::from_secs(20), "a refused reload", |s| {
        s["pipeline"]["last_reload"]["ok"] == Json::Bool(false)
    })
    .await?;
    let error = refused["pipeline"]["last_reload"]["error"]
        .as_str()
        .unwrap();
    assert!(
        error.contains("10-mask") && error.contains("require"),
        "{error}"
    );
    let running: Vec<&str> = refused["pipeline"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        running.contains(&"10-mask"),
        "the masking stage keeps running: {running:?}"
    );
    // The admin API's reload says the same, synchronously.
    let token = airlock::admin::read_local_token(admin.parse()?)
        .expect("a host without [admin] token_env keeps its control token for its user");
    let answer = reqwest::Client::new()
        .post(format!("http://{admin}/reload"))
        .bearer_auth(token)
        .send()
        .await?;
    assert_eq!(answer.status().as_u16(), 409);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let _ = stop_tx.send(true);
    let txns = writer.await??;
    let expected = (txns * TXN_ROWS) as usize;
    let rows = wait_for_lake(
        &lake.join("public.events"),
        Duration::from_secs(60),
        |rows| rows.len() >= expected,
    )
    .await?;
    host.stop().await?;

    // Every row exactly once, masked.
    assert_eq!(rows.len(), expected);
    let ids: HashSet<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), expected, "a row appears twice");
    for r in &rows {
        let id = r["id"].as_i64().unwrap();
        assert_eq!(
            r["email"].as_str().unwrap(),
            sha256_hex(&format!("user{id}@example.com")),
            "row {id} not masked"
        );
    }
    // Each transaction carries exactly one pipeline version; both versions were used.
    let mut per_txn: HashMap<i64, HashSet<String>> = HashMap::new();
    for r in &rows {
        per_txn
            .entry(r["txn"].as_i64().unwrap())
            .or_default()
            .insert(r["_pipeline"].as_str().unwrap().to_owned());
    }
    assert!(
        per_txn.values().all(|v| v.len() == 1),
        "a transaction was split across pipeline versions"
    );
    let versions: HashSet<&String> = per_txn.values().flatten().collect();
    assert!(
        versions.contains(&v1) && versions.contains(&v2),
        "rows before and after the swap: {versions:?}"
    );
    Ok(())
}
