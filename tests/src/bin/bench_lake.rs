//! Rows per second into the lake and commit latency, local files and S3 side by side.
//!
//! One ten-column table; each commit holds one transaction of `--rows` inserts (default
//! 10 000); `--commits` commits per store (default 30). The same batches go through the
//! real `LakeSink` (Arrow conversion, Parquet, Delta commit with the application
//! transaction) into a local `file://` lake and into an S3 lake on moto's S3 server on
//! 127.0.0.1, in the same run. Prints rows/s and commit (flush) latency p50/p99.
//!
//! moto is a Python server: its S3 figures measure airlock plus moto, a floor rather
//! than what AWS S3 gives.
//!
//! usage: cargo run --release -p airlock-tests --bin bench_lake [-- --rows N --commits N]

use airlock_tests::lake_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::change::{
    Change, Column, Lsn, Op, Relation, ReplicaIdentity, Transaction, TxnMeta, Value, oid,
};
use airlock::pipeline::batch::Batch;
use airlock::sink::Sink as _;
use airlock::sink::lake::{LakeSettings, LakeSink};

fn relation() -> Arc<Relation> {
    let cols: [(&str, u32, i32); 10] = [
        ("id", oid::INT8, -1),
        ("name", oid::TEXT, -1),
        ("email", oid::TEXT, -1),
        ("phone", oid::TEXT, -1),
        ("balance", oid::NUMERIC, (12 << 16) + 2 + 4),
        ("active", oid::BOOL, -1),
        ("visits", oid::INT4, -1),
        ("score", oid::FLOAT8, -1),
        ("signed_up", oid::TIMESTAMPTZ, -1),
        ("note", oid::TEXT, -1),
    ];
    Arc::new(Relation {
        comment_classes: Default::default(),
        oid: 1,
        schema: "public".into(),
        name: "customers".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: cols
            .iter()
            .map(|(n, t, m)| Column {
                name: (*n).into(),
                type_oid: *t,
                type_modifier: *m,
                key: *n == "id",
            })
            .collect(),
    })
}

/// Commit `n`: one transaction of `rows` inserts.
fn batch(rel: &Arc<Relation>, n: u64, rows: usize) -> Batch {
    let base = n * (rows as u64 + 1) * 16;
    let changes = (0..rows)
        .map(|i| {
            let id = (n as usize * rows + i) as i64;
            Change {
                identity: None,
                relation: rel.clone(),
                op: Op::Insert,
                lsn: Lsn(base + i as u64 * 16),
                new: Some(vec![
                    Value::Int(id),
                    Value::Text(format!("Customer {id}")),
                    Value::Text(format!("customer{id}@example.com")),
                    Value::Text(format!("+1-555-{:07}", id % 10_000_000)),
                    Value::Numeric(format!("{}.{:02}", id * 7 % 100_000, id % 100)),
                    Value::Bool(id % 3 == 0),
                    Value::Int(id % 1000),
                    Value::Float(id as f64 * 0.25),
                    Value::Timestamptz(1_704_067_200_000_000 + id * 1_000_000),
                    Value::Text("a short note".into()),
                ]),
                old: None,
            }
        })
        .collect();
    let commit = base + rows as u64 * 16;
    let mut batch = Batch::from_transactions([Transaction {
        meta: TxnMeta {
            xid: n as u32,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(commit + 16),
            commit_ts: 1_704_067_200_000_000,
            part: airlock::change::Part::WHOLE,
            copied: None,
        },
        changes,
    }]);
    batch.pipeline = Arc::from("bench");
    batch
}

struct Figures {
    rows_per_second: f64,
    p50: Duration,
    p99: Duration,
}

async fn run(settings: LakeSettings, batches: &[Arc<Batch>]) -> Figures {
    let mut sink = LakeSink::open(settings).await.expect("open the lake sink");
    let mut latencies = Vec::with_capacity(batches.len());
    let mut rows = 0;
    let start = Instant::now();
    for batch in batches {
        rows += batch.rows.len();
        sink.accept(batch.clone()).await.expect("accept");
        let commit = Instant::now();
        sink.flush().await.expect("flush");
        latencies.push(commit.elapsed());
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    Figures {
        rows_per_second: rows as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rows = arg("--rows", 10_000);
    let commits = arg("--commits", 30);
    let rel = relation();
    let batches: Vec<Arc<Batch>> = (1..=commits as u64)
        .map(|n| Arc::new(batch(&rel, n, rows)))
        .collect();
    let settings = |url: String| {
        let mut s = LakeSettings::new("bench", url, "airlock:bench");
        s.max_rows = usize::MAX;
        s.max_bytes = usize::MAX;
        s.maintenance.compact_min_files = usize::MAX; // measure writes, not compaction
        s
    };

    let dir = std::env::temp_dir().join(format!("airlock-bench-lake-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let local = run(settings(format!("file://{}", dir.display())), &batches).await;
    let _ = std::fs::remove_dir_all(&dir);

    let moto = lake_support::Moto::start();
    moto.create_bucket("bench").await?;
    let mut s3_settings = settings("s3://bench/lake".into());
    s3_settings.storage_options = moto.storage_options().into_iter().collect();
    let s3 = run(s3_settings, &batches).await;

    println!(
        "lake write: 10-column table, {commits} commits x {rows} rows (one transaction per commit)"
    );
    println!(
        "{:<22} {:>14} {:>14} {:>9}",
        "", "local file://", "S3 (moto)", "ratio"
    );
    println!(
        "{:<22} {:>14.0} {:>14.0} {:>8.2}x",
        "rows/s",
        local.rows_per_second,
        s3.rows_per_second,
        local.rows_per_second / s3.rows_per_second
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (label, l, s) in [
        ("commit latency p50 ms", local.p50, s3.p50),
        ("commit latency p99 ms", local.p99, s3.p99),
    ] {
        println!(
            "{:<22} {:>14.1} {:>14.1} {:>8.2}x",
            label,
            ms(l),
            ms(s),
            ms(s) / ms(l)
        );
    }
    Ok(())
}
