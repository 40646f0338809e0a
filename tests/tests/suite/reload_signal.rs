//! SIGHUP reloads the plugin folder of a running `airlock run` process: with the
//! folder watch off, a new stage stays out until the signal, then goes live.

use std::time::{Duration, Instant};

use airlock_tests::*;

async fn stages(admin: &str) -> Option<Vec<String>> {
    let status = admin_status(admin).await?;
    let stages = status["pipeline"]["stages"].as_array()?;
    Some(
        stages
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect(),
    )
}

async fn wait_stages(admin: &str, expected: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let now = stages(admin).await;
        if now.as_deref().is_some_and(|s| s == expected) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            anyhow::bail!("stages are {now:?}, expected {expected:?} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_plugin_folder() -> anyhow::Result<()> {
    let dir = temp_dir("sighup");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY); CREATE PUBLICATION airlock FOR TABLE t;",
    )
    .await?;
    let plugins = plugin_dir(&dir, &[("10-mask", "mask", "")]);
    let admin = format!("127.0.0.1:{}", airlock::demo::cluster::free_port());
    let config = dir.join("airlock.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"hup\"\ncreate_slot = true\n\
             [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\nwatch = false\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}/lake\"\n\
             [admin]\nlisten = \"{admin}\"\n",
            pg.url("postgres"),
            plugins.display(),
            dir.display()
        ),
    )?;
    let log = dir.join("host.log");
    let host = spawn_host(&config, &log);
    wait_stages(&admin, &["10-mask"], Duration::from_secs(30)).await?;

    // The watch is off: a new file alone changes nothing.
    std::fs::copy(guest("test_passthrough"), plugins.join("20-pass.wasm"))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        stages(&admin).await.as_deref(),
        Some(&["10-mask".to_owned()][..]),
        "the folder is not watched, so only a signal may reload it"
    );

    host.signal("-HUP");
    wait_stages(&admin, &["10-mask", "20-pass"], Duration::from_secs(20))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
    Ok(())
}
