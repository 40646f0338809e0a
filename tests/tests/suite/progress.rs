//! Progress of the initial snapshot and of compaction when stderr is not a terminal
//! (a file, as under systemd or in CI): periodic log lines with the rate and the ETA,
//! and no bar (no escape codes, no carriage returns). The bar itself needs a terminal.

use airlock_tests::source_support as support;

use std::process::{Command, Stdio};
use std::time::Duration;

use airlock_tests::*;
use anyhow::{Context, Result, ensure};

/// The log lines with `message`.
fn lines_with<'a>(log: &'a str, message: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(message)).collect()
}

/// The value of `field=` in a text log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..].split_whitespace().next()
}

fn assert_no_bar(log: &str) {
    assert!(
        !log.contains('\r') && !log.contains("\x1b[") && !log.contains("ETA"),
        "a bar was drawn into a file:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_compaction_log_progress_lines_with_rate_and_eta_off_a_terminal() -> Result<()>
{
    let dir = temp_dir("progress");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(
        "CREATE TABLE items (id integer PRIMARY KEY, note text);
         INSERT INTO items SELECT g, repeat('x', 100) FROM generate_series(1, 30000) g;
         ANALYZE items;
         CREATE PUBLICATION airlock FOR TABLE items;",
    )
    .await?;
    let config = support::config(
        &pg.url("postgres"),
        &dir,
        "progress",
        "snapshot = \"initial\"",
    );
    let config_path = dir.join("airlock.toml");
    std::fs::write(&config_path, &config)?;

    // The host snapshots 30 000 rows, then streams a few transactions, each its own
    // file in the lake (flush every 200 ms): small files for compaction.
    let log_path = dir.join("host.log");
    let mut host = HostProcess(
        Command::new(airlock_bin())
            .args(["run", "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()?,
    );
    let table = dir.join("lake/public.items");
    let streamed = async {
        wait_for_lake(&table, Duration::from_secs(120), |r| r.len() >= 30_000).await?;
        for round in 0..4 {
            db.execute(
                "INSERT INTO items SELECT g, 'later' FROM generate_series($1::int, $1::int + 99) g",
                &[&(100_000 + round * 1000)],
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        wait_for_lake(&table, Duration::from_secs(60), |r| r.len() >= 30_400).await
    }
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    streamed.with_context(|| format!("host log:\n{log}"))?;
    host.stop(Duration::from_secs(30))?;
    let log = std::fs::read_to_string(&log_path)?;
    assert_no_bar(&log);

    // Snapshot lines: the rows so far, the estimate, the rate and the ETA.
    let snapshot = lines_with(&log, "initial snapshot progress");
    ensure!(
        snapshot.len() >= 3,
        "too few snapshot progress lines:\n{log}"
    );
    let copying = snapshot
        .iter()
        .find(|l| field(l, "rows").is_some_and(|r| r != "0") && l.contains("state=\"copying\""))
        .with_context(|| format!("no line during the copy:\n{log}"))?;
    assert_eq!(field(copying, "rows_estimate"), Some("30000"), "{copying}");
    assert!(field(copying, "rows_per_second").is_some(), "{copying}");
    assert!(
        field(copying, "eta_seconds").is_some_and(|e| e.parse::<u64>().is_ok()),
        "an ETA once rows are copied: {copying}"
    );
    let last = snapshot.last().unwrap();
    assert!(
        last.contains("state=\"complete\"") && field(last, "rows") == Some("30000"),
        "{last}"
    );

    // Compaction, offline (no host runs): a line at the start and at the end, with
    // files and bytes merged, the rate and the ETA.
    let out = Command::new(airlock_bin())
        .args(["compact", "--config"])
        .arg(&config_path)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success(),
        "airlock compact failed:\n{stderr}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_no_bar(&stderr);
    let compaction = lines_with(&stderr, "compaction progress");
    ensure!(
        compaction.len() >= 2,
        "no compaction progress lines:\n{stderr}"
    );
    let (first, last) = (compaction[0], compaction[compaction.len() - 1]);
    let files: usize = field(first, "files").context("files")?.parse()?;
    let bytes: u64 = field(first, "bytes").context("bytes")?.parse()?;
    assert!(
        files >= 5,
        "the snapshot file and the streamed ones: {first}"
    );
    assert!(bytes > 0, "{first}");
    assert_eq!(field(first, "files_done"), Some("0"), "{first}");
    assert_eq!(
        field(first, "eta_seconds"),
        None,
        "no ETA before anything is merged: {first}"
    );
    assert_eq!(
        field(last, "files_done"),
        Some(files.to_string().as_str()),
        "{last}"
    );
    assert_eq!(
        field(last, "bytes_done"),
        Some(bytes.to_string().as_str()),
        "{last}"
    );
    assert_eq!(field(last, "eta_seconds"), Some("0"), "{last}");
    assert!(
        field(last, "bytes_per_second").is_some_and(|r| r.parse::<u64>().is_ok_and(|r| r > 0)),
        "{last}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report[0]["files_removed"], files, "{report:#}");
    Ok(())
}
