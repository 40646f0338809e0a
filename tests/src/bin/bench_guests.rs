//! Guest cost per row, side by side with native Rust doing the same transform.
//!
//! Batches of 1024 ten-column rows go through each example guest (one stage at a
//! time, exactly as the live pipeline calls it) and through a native implementation
//! of the same transform on the same host data structure, in the same run. Prints
//! nanoseconds per row for both and the ratio.
//!
//! Then `mask` and `route` in every guest language (Rust, Python, JavaScript, C;
//! built by `cargo xtask guests`) on the same batches, side by side.
//!
//! usage: cargo run --release -p airlock-tests --bin bench_guests [-- --batches N]

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::change::{
    Change, Column, Lsn, Op, Relation, ReplicaIdentity, Transaction, TxnMeta, Value, oid,
};
use airlock::pipeline::batch::Batch;
use airlock::pipeline::runtime::{Limits, Runtime};
use airlock::pipeline::{Pipeline, PluginFile};
use sha2::Digest;

const ROWS: usize = 1024;

/// A guest's settings, as `NAME.toml` would give them.
type Settings = &'static [(&'static str, &'static str)];

fn relation() -> Arc<Relation> {
    let cols: [(&str, u32); 10] = [
        ("id", oid::INT8),
        ("name", oid::TEXT),
        ("email", oid::TEXT),
        ("phone", oid::TEXT),
        ("balance", oid::NUMERIC),
        ("active", oid::BOOL),
        ("visits", oid::INT4),
        ("score", oid::FLOAT8),
        ("signed_up", oid::TIMESTAMPTZ),
        ("note", oid::TEXT),
    ];
    Arc::new(Relation {
        comment_classes: Default::default(),
        oid: 1,
        schema: "public".into(),
        name: "customers".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: cols
            .iter()
            .map(|(n, t)| Column {
                name: (*n).into(),
                type_oid: *t,
                type_modifier: -1,
                key: *n == "id",
            })
            .collect(),
    })
}

/// One transaction of 1024 inserts.
fn batch(rel: &Arc<Relation>) -> Batch {
    let changes = (0..ROWS as i64)
        .map(|i| Change {
            identity: None,
            relation: rel.clone(),
            op: Op::Insert,
            lsn: Lsn(i as u64 + 1),
            old: None,
            new: Some(vec![
                Value::Int(i),
                Value::Text(format!("Customer number {i}")),
                Value::Text(format!("customer{i}@example.com")),
                Value::Text(format!("+1-555-{:03}-{:04}", i % 1000, i % 10_000)),
                Value::Numeric(format!("{}.{:02}", i * 7, i % 100)),
                Value::Bool(i % 3 != 0),
                Value::Int(i % 50),
                Value::Float(i as f64 / 7.0),
                Value::Timestamptz(1_700_000_000_000_000 + i),
                Value::Text("a short note".into()),
            ]),
        })
        .collect();
    Batch::from_transactions(vec![Transaction {
        meta: TxnMeta {
            xid: 1,
            commit_lsn: Lsn(ROWS as u64 + 1),
            end_lsn: Lsn(ROWS as u64 + 2),
            commit_ts: 0,
            part: airlock::change::Part::WHOLE,
            copied: None,
        },
        changes,
    }])
}

// Native equivalents, on the same data structure.

fn native_mask(b: &mut Batch) {
    let mut hex = [0u8; 64];
    for row in &mut b.rows {
        if let Some(values) = &mut row.change.new {
            for c in [2, 3] {
                if let Value::Text(s) = &mut values[c] {
                    let digest = sha2::Sha256::digest(s.as_bytes());
                    hex::encode_to_slice(digest, &mut hex).expect("64 bytes");
                    s.clear();
                    s.push_str(std::str::from_utf8(&hex).expect("hex"));
                }
            }
        }
    }
    for c in [2, 3] {
        b.tables[0].column_tags[c].push("pii".into());
    }
}

fn native_filter(b: &mut Batch) {
    for row in &mut b.rows {
        if let Some(values) = &row.change.new
            && values[5] != Value::Bool(true)
        {
            row.dropped = true;
        }
    }
}

fn native_tag(b: &mut Batch) {
    // By name, then value samples of the other text columns, as the guest does.
    let rel = b.tables[0].relation.clone();
    for (c, col) in rel.columns.iter().enumerate() {
        if col.name.contains("email") || col.name.contains("phone") {
            b.tables[0].column_tags[c].push("pii".into());
        }
    }
    for row in &mut b.rows {
        if let Some(values) = &row.change.new {
            let hit = values
                .iter()
                .take(32)
                .any(|v| matches!(v, Value::Text(s) if s.contains('@')));
            if hit {
                row.tags.push("pii".into());
            }
        }
    }
}

fn native_route(b: &mut Batch) {
    let restricted = b.tables[0]
        .column_tags
        .iter()
        .any(|t| t.iter().any(|t| t == "pii"));
    for row in &mut b.rows {
        let route = if restricted || row.tags.iter().any(|t| t == "pii") {
            "restricted"
        } else {
            "default"
        };
        row.routes.push(route.into());
    }
}

fn native_passthrough(b: &mut Batch) {
    for row in &mut b.rows {
        if let Some(values) = &mut row.change.new {
            for v in values.iter_mut() {
                *v = v.clone();
            }
        }
    }
}

fn time_per_row(batches: usize, input: &Batch, mut run: impl FnMut(Batch) -> Batch) -> f64 {
    // Warm up, then time only the transform (cloning the input is outside the clock).
    for _ in 0..3 {
        run(input.clone());
    }
    let mut total = Duration::ZERO;
    for _ in 0..batches {
        let b = input.clone();
        let start = Instant::now();
        let out = run(b);
        total += start.elapsed();
        std::hint::black_box(out);
    }
    total.as_nanos() as f64 / (batches * ROWS) as f64
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let batches = args
        .iter()
        .position(|a| a == "--batches")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    // The compile cache spares a recompile of the large Python and JavaScript
    // components on every run; it does not change the code that runs.
    // Benchmarks measure the guests: every route and tag name is accepted.
    let limits = Limits {
        names: std::sync::Arc::new(airlock::pipeline::names::Names::unchecked()),
        ..Limits::default()
    };
    let rt = Runtime::new(limits, airlock::config::default_cache_dir())?;
    let rel = relation();
    let input = batch(&rel);
    let policy_ok = policy_actions(batches, &rel, &input, &rt)?;
    type Native = fn(&mut Batch);
    let cases: [(&str, Settings, &str, Native); 6] = [
        (
            "mask",
            &[("columns", "email"), ("columns", "phone")],
            "hash 2 of 10 columns",
            native_mask,
        ),
        (
            "mask",
            &[
                ("columns", "email"),
                ("columns", "phone"),
                ("default_mode", "redact"),
            ],
            "redact 2 of 10",
            |b| {
                for row in &mut b.rows {
                    if let Some(v) = &mut row.change.new {
                        v[2] = Value::Text("[redacted]".into());
                        v[3] = Value::Text("[redacted]".into());
                    }
                }
            },
        ),
        (
            "filter",
            &[
                ("where.column", "active"),
                ("where.op", "eq"),
                ("where.value", "true"),
            ],
            "drop inactive",
            native_filter,
        ),
        ("tag", &[], "classify columns", native_tag),
        ("route", &[], "route by tags", native_route),
        (
            "test_passthrough",
            &[],
            "read+write all 10 columns",
            native_passthrough,
        ),
    ];
    println!(
        "guest cost per row: batches of {ROWS} rows x 10 columns, {batches} batches each, wasm beside native Rust"
    );
    println!(
        "{:<18} {:<26} {:>12} {:>12} {:>8}",
        "guest", "work", "wasm ns/row", "native ns/row", "ratio"
    );
    for (guest, settings, work, native) in cases {
        let wasm = guest_per_row(&rt, guest, guest, settings, batches, &input)?;
        let native_ns = time_per_row(batches, &input, |mut b| {
            native(&mut b);
            b
        });
        println!(
            "{guest:<18} {work:<26} {wasm:>12.1} {native_ns:>12.1} {:>7.1}x",
            wasm / native_ns
        );
    }
    languages(&rt, batches, &input)?;
    if !policy_ok {
        anyhow::bail!("a policy action is over its budget");
    }
    Ok(())
}

/// Budgets of the policy's actions, per value.
const HMAC_BUDGET_NS: f64 = 250.0;
const ACTION_BUDGET_NS: f64 = 100.0;

/// Each built-in action's cost per value, against its budget, then the whole gate per
/// row beside the `mask` guest doing the same masking. Returns whether every action
/// is within its budget.
fn policy_actions(
    batches: usize,
    rel: &Arc<Relation>,
    input: &Batch,
    rt: &Runtime,
) -> anyhow::Result<bool> {
    use airlock::policy::{Action, Generalize, Keyed, Normalize};
    let key = Keyed::new("k1", b"0123456789abcdef0123456789abcdef");
    // 24-byte e-mail addresses, each different.
    let emails: Vec<Value> = (0..ROWS)
        .map(|i| Value::Text(format!("customer{:06}@email.org", i)))
        .collect();
    assert!(
        emails
            .iter()
            .all(|v| matches!(v, Value::Text(s) if s.len() == 24))
    );
    let phones: Vec<Value> = (0..ROWS)
        .map(|i| Value::Text(format!("+1-555-{:03}-{:04}", i % 1000, i)))
        .collect();
    let times: Vec<Value> = (0..ROWS as i64)
        .map(|i| Value::Timestamptz(1_700_000_000_000_000 + i * 1_000_003))
        .collect();
    let ints: Vec<Value> = (0..ROWS as i64).map(Value::Int).collect();
    let cases: Vec<(&str, Action, &Vec<Value>, f64)> = vec![
        (
            "hmac",
            Action::Hmac(Normalize::default()),
            &emails,
            HMAC_BUDGET_NS,
        ),
        (
            "hmac trim+lower",
            Action::Hmac(Normalize {
                trim: true,
                lower: true,
                digits: false,
            }),
            &emails,
            HMAC_BUDGET_NS,
        ),
        (
            "keep-last:4",
            Action::KeepLast(4),
            &phones,
            ACTION_BUDGET_NS,
        ),
        (
            "keep-first:3",
            Action::KeepFirst(3),
            &phones,
            ACTION_BUDGET_NS,
        ),
        ("truncate:6", Action::Truncate(6), &phones, ACTION_BUDGET_NS),
        (
            "redact",
            Action::Redact("[redacted]".into()),
            &phones,
            ACTION_BUDGET_NS,
        ),
        ("null", Action::Null, &phones, ACTION_BUDGET_NS),
        (
            "generalize:day",
            Action::Generalize(Generalize::Day),
            &times,
            ACTION_BUDGET_NS,
        ),
        (
            "generalize:month",
            Action::Generalize(Generalize::Month),
            &times,
            ACTION_BUDGET_NS,
        ),
        (
            "generalize:10",
            Action::Generalize(Generalize::Width(10)),
            &ints,
            ACTION_BUDGET_NS,
        ),
    ];
    println!(
        "policy actions at the gate: ns per value, best of 3 runs of {batches} x {ROWS} values"
    );
    println!(
        "{:<18} {:<22} {:>9} {:>8} {:>7}",
        "action", "values", "ns/value", "budget", "result"
    );
    let mut all_ok = true;
    for (name, action, values, budget) in cases {
        let mut scratch = Vec::new();
        // The best of three runs: the first also pays for the allocator's growth.
        let mut ns = f64::MAX;
        for _ in 0..3 {
            let mut rounds: Vec<Vec<Value>> = (0..batches).map(|_| values.clone()).collect();
            let start = Instant::now();
            for round in &mut rounds {
                for v in round.iter_mut() {
                    action.apply(v, Some(&key), &mut scratch);
                }
            }
            ns = ns.min(start.elapsed().as_nanos() as f64 / (batches * ROWS) as f64);
            std::hint::black_box(&rounds);
        }
        let ok = ns <= budget;
        all_ok &= ok;
        let kind = match &values[0] {
            Value::Text(s) => format!("{}-byte text", s.len()),
            Value::Timestamptz(_) => "timestamptz".into(),
            _ => "bigint".into(),
        };
        println!(
            "{name:<18} {kind:<22} {ns:>9.1} {budget:>8.0} {:>7}",
            if ok { "PASS" } else { "FAIL" }
        );
    }
    // The gate on whole rows, beside the mask guest hashing the same two columns.
    let policy = Arc::new(airlock::policy::Policy::new(
        airlock::policy::Unclassified::Deny,
        std::collections::BTreeMap::from([
            ("public".to_owned(), Action::Keep),
            ("pii".to_owned(), Action::Hmac(Normalize::default())),
            ("contact".to_owned(), Action::KeepLast(4)),
        ]),
        [
            ("public.customers.*", "public"),
            ("public.customers.email", "pii"),
            ("public.customers.phone", "contact"),
            ("public.customers.note", "pii"),
        ]
        .iter()
        .map(|(p, c)| airlock::policy::Rule {
            pattern: (*p).into(),
            class: (*c).into(),
        })
        .collect(),
        Some(key.clone()),
    ));
    let txn = || Transaction {
        meta: input.txns[0].clone(),
        changes: input.rows.iter().map(|r| r.change.clone()).collect(),
    };
    let mut gate = airlock::policy::Gate::new(policy, false);
    let mut txns: Vec<Transaction> = (0..batches).map(|_| txn()).collect();
    let start = Instant::now();
    for t in &mut txns {
        gate.apply(t).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let gate_ns = start.elapsed().as_nanos() as f64 / (batches * ROWS) as f64;
    let _ = rel;
    let mask = guest_per_row(
        rt,
        "mask",
        "mask",
        &[
            ("columns", "email"),
            ("columns", "phone"),
            ("columns", "note"),
            ("mode.phone", "keep-last-4"),
        ],
        batches,
        input,
    )?;
    println!(
        "{:<18} {:<22} {:>9.1} ns/row; the mask guest, same three columns: {mask:.1} ns/row ({:.2}x the gate)",
        "gate, whole rows",
        "hmac 2 + keep-last 1",
        gate_ns,
        mask / gate_ns
    );
    println!();
    Ok(all_ok)
}

/// Nanoseconds per row of one guest (`dist` names the file in guests/dist) as the
/// live pipeline runs it.
fn guest_per_row(
    rt: &Runtime,
    guest: &str,
    dist: &str,
    settings: &[(&str, &str)],
    batches: usize,
    input: &Batch,
) -> anyhow::Result<f64> {
    let file = PluginFile {
        name: guest.into(),
        wasm: airlock_tests::guest(dist),
        settings: None,
    };
    let extra: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut pipeline =
        Pipeline::load(rt, &[file], &extra).map_err(|e| anyhow::anyhow!("{dist}: {e:?}"))?;
    Ok(time_per_row(batches, input, |b| {
        pipeline.process(b).unwrap_or_else(|(_, e)| panic!("{e}"))
    }))
}

/// `mask` and `route` in every language, side by side with the Rust guest.
fn languages(rt: &Runtime, batches: usize, input: &Batch) -> anyhow::Result<()> {
    const LANGUAGES: [(&str, &str); 4] = [
        ("rust", ""),
        ("python", "-python"),
        ("js", "-js"),
        ("c", "-c"),
    ];
    let cases: [(&str, Settings, &str); 4] = [
        (
            "mask",
            &[("columns", "email"), ("columns", "phone")],
            "hash 2 of 10 columns",
        ),
        (
            "mask",
            &[
                ("columns", "email"),
                ("columns", "phone"),
                ("default_mode", "redact"),
            ],
            "redact 2 of 10",
        ),
        (
            "mask",
            &[
                ("columns", "email"),
                ("columns", "phone"),
                ("default_mode", "keep-last-4"),
            ],
            "keep-last-4 2 of 10",
        ),
        ("route", &[("spine_tables", "public.*")], "route + spine"),
    ];
    println!();
    println!(
        "guests by language: ns/row on the same batches ({batches} batches each), ratio to the Rust guest; \
         budget {RUST_C_BUDGET_NS} ns/row for Rust and C, {OTHER_BUDGET_NS} for Python and JavaScript"
    );
    print!("{:<8} {:<22}", "guest", "work");
    for (language, _) in LANGUAGES {
        print!(" {:>20}", format!("{language} ns/row"));
    }
    println!();
    let mut over = Vec::new();
    for (guest, settings, work) in cases {
        let mut rust = 0.0;
        print!("{guest:<8} {work:<22}");
        for (language, suffix) in LANGUAGES {
            let ns = guest_per_row(
                rt,
                guest,
                &format!("{guest}{suffix}"),
                settings,
                batches,
                input,
            )?;
            let budget = match language {
                "rust" | "c" => RUST_C_BUDGET_NS,
                _ => OTHER_BUDGET_NS,
            };
            let verdict = if ns <= budget { "" } else { " FAIL" };
            over.extend((ns > budget).then(|| format!("{guest} ({work}) in {language}")));
            if language == "rust" {
                rust = ns;
                print!(" {:>20}", format!("{ns:.1}{verdict}"));
            } else {
                print!(" {:>20}", format!("{ns:.1} ({:.1}x){verdict}", ns / rust));
            }
            std::io::Write::flush(&mut std::io::stdout())?;
        }
        println!();
    }
    if over.is_empty() {
        println!("every guest in every language within its budget: PASS");
    } else {
        println!("over budget: {}", over.join(", "));
    }
    Ok(())
}

/// Per row, on a 1,024-row batch: compiled guests.
const RUST_C_BUDGET_NS: f64 = 300.0;
/// Per row, on a 1,024-row batch: interpreted guests.
const OTHER_BUDGET_NS: f64 = 2000.0;
