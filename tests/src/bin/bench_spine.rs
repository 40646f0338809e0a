//! Spine benchmark: events per second the spine sink delivers (accept → durable in the
//! spine) to the built-in spine and to audit-stream-py, measured side by side in one
//! run with the same events.
//!
//! ```text
//! cargo run --release -p airlock-tests --bin bench_spine [-- --events 10000 --rows 10 --note 200]
//! ```
//!
//! The built-in spine is measured twice: as the sink uses it (`POST /events/batch`, one
//! fsync per request) and one event per request (`max_events = 1`, one fsync per event),
//! which is how the sink talks to audit-stream-py, which keeps events in memory (no fsync).

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::change::Lsn;
use airlock::pipeline::batch::Batch;
use airlock::sink::drive;
use airlock::sink::spine::{SpineSettings, SpineSink};
use airlock_tests::spine_support::{
    AuditStreamPy, BuiltinSpine, accounts_batch, accounts_end, client,
};
use airlock_tests::temp_dir;
use anyhow::{Context, Result, bail};
use tokio::sync::{mpsc, watch};

struct Args {
    events: u64,
    rows: u64,
    note: usize,
}

fn args() -> Result<Args> {
    let mut args = Args {
        events: 10_000,
        rows: 10,
        note: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => args.events = value()?.parse()?,
            "--rows" => args.rows = value()?.parse()?,
            "--note" => args.note = value()?.parse()?,
            "--bench" => {}
            other => bail!(
                "unknown argument `{other}`; expected --events N, --rows PER_TXN, --note BYTES"
            ),
        }
    }
    args.rows = args.rows.max(1);
    args.events = args.events.div_ceil(args.rows) * args.rows;
    Ok(args)
}

/// Delivers every batch through the real driver; returns the elapsed time.
async fn run(url: &str, max_events: usize, batches: &[Arc<Batch>]) -> Result<Duration> {
    let mut settings = SpineSettings::new("bench", url);
    settings.max_events = max_events;
    settings.flush_interval = Duration::from_millis(20);
    let sink = SpineSink::open(settings).await?;
    let (tx, rx) = mpsc::channel(256);
    let (durable_tx, mut durable) = watch::channel(Lsn::ZERO);
    let end = batches.len() as u64;
    let start = Instant::now();
    let task = tokio::spawn(drive(sink, rx, durable_tx));
    for b in batches {
        tx.send(b.clone()).await.context("sink stopped")?;
    }
    durable.wait_for(|d| *d >= accounts_end(end)).await?;
    let elapsed = start.elapsed();
    drop(tx);
    task.await??;
    let count = client(url).get("/stats").await?["count"]
        .as_u64()
        .unwrap_or(0);
    let want = batches.iter().map(|b| b.rows.len() as u64).sum::<u64>();
    if count != want {
        bail!("{url} holds {count} events, expected {want}");
    }
    Ok(elapsed)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let note = "n".repeat(args.note);
    let batches: Vec<Arc<Batch>> = (1..=args.events / args.rows)
        .map(|n| accounts_batch(n, args.rows, &note))
        .collect();
    println!(
        "spine benchmark: {} events ({} per transaction, ~{} B each), accept → durable in the spine",
        args.events,
        args.rows,
        args.note + 300
    );

    let mut results = Vec::new();
    let batch_dir = temp_dir("bench-spine-batch");
    let spine = BuiltinSpine::start(&batch_dir).await;
    results.push((
        "built-in spine, POST /events/batch",
        run(&spine.url, 1000, &batches).await?,
    ));
    spine.stop().await;
    let single_dir = temp_dir("bench-spine-single");
    let spine = BuiltinSpine::start(&single_dir).await;
    results.push((
        "built-in spine, POST /events (1 per request)",
        run(&spine.url, 1, &batches).await?,
    ));
    spine.stop().await;
    let spine = AuditStreamPy::start().await;
    results.push((
        "audit-stream-py, POST /events (1 per request)",
        run(&spine.url, 1000, &batches).await?,
    ));
    spine.stop().await;

    let python = results
        .last()
        .map(|(_, d)| args.events as f64 / d.as_secs_f64())
        .unwrap_or(1.0);
    println!(
        "{:<48} {:>8} {:>9} {:>11} {:>18}",
        "spine", "events", "seconds", "events/s", "vs audit-stream-py"
    );
    for (name, elapsed) in &results {
        let rate = args.events as f64 / elapsed.as_secs_f64();
        println!(
            "{name:<48} {:>8} {:>9.2} {:>11.0} {:>17.2}×",
            args.events,
            elapsed.as_secs_f64(),
            rate,
            rate / python
        );
    }
    Ok(())
}
