//! The guest runtime against real components built from `guests/`: values cross the
//! boundary exactly, misbehaving guests give clear errors and lose no data, and the
//! sandbox denies the filesystem, environment and network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::change::{
    Change, Column, Lsn, Op, Relation, ReplicaIdentity, Transaction, TxnMeta, Value, oid,
};
use airlock::pipeline::batch::Batch;
use airlock::pipeline::names::Names;
use airlock::pipeline::runtime::{Limits, Runtime, RuntimeError};
use airlock::pipeline::{Pipeline, PluginFile};
use airlock_tests::*;

/// A runtime with `limits`; limits that declare no names get the routes and tags the
/// example guests write (`spine`, `restricted`, `pii`, `pii:*`).
fn runtime(mut limits: Limits) -> Runtime {
    if *limits.names == Names::default() {
        limits.names = declared().names;
    }
    Runtime::new(limits, None).expect("runtime")
}

/// Default limits with the names the example guests write declared.
fn declared() -> Limits {
    Limits {
        names: Arc::new(Names::new(["spine", "restricted"], ["pii", "pii:*"])),
        ..Limits::default()
    }
}

fn load(
    rt: &Runtime,
    guest_name: &str,
    settings: &[(&str, &str)],
) -> Result<Pipeline, Vec<RuntimeError>> {
    let file = PluginFile {
        name: format!("10-{guest_name}"),
        wasm: guest(guest_name),
        settings: None,
    };
    let extra: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Pipeline::load(rt, &[file], &extra)
}

/// One column per contract value kind, and a row holding an example of each.
fn type_zoo() -> (Arc<Relation>, Vec<Value>) {
    let columns: Vec<(&str, u32, Value)> = vec![
        ("c_null", oid::TEXT, Value::Null),
        ("c_toast", oid::TEXT, Value::UnchangedToast),
        ("c_bool", oid::BOOL, Value::Bool(true)),
        ("c_int", oid::INT8, Value::Int(i64::MIN)),
        ("c_float", oid::FLOAT8, Value::Float(-0.1)),
        (
            "c_numeric",
            oid::NUMERIC,
            Value::Numeric("-12345678901234567890.000000000000000001".into()),
        ),
        (
            "c_text",
            oid::TEXT,
            Value::Text("héllo \u{1F600} \"quoted\"".into()),
        ),
        ("c_bytes", oid::BYTEA, Value::Bytes(vec![0, 1, 255, 128])),
        ("c_date", oid::DATE, Value::Date(i32::MAX)),
        ("c_time", oid::TIME, Value::Time(86_399_999_999)),
        ("c_ts", oid::TIMESTAMP, Value::Timestamp(-1)),
        ("c_tstz", oid::TIMESTAMPTZ, Value::Timestamptz(i64::MIN)),
        (
            "c_uuid",
            oid::UUID,
            Value::Uuid([
                0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10, 1, 2, 3, 4, 5, 6, 7, 8,
            ]),
        ),
        (
            "c_json",
            oid::JSONB,
            Value::Json("{\"a\": [1, 2.5, null]}".into()),
        ),
        (
            "c_other",
            oid::INTERVAL,
            Value::Other("1 year 2 mons -3 days".into()),
        ),
    ];
    let relation = Arc::new(Relation {
        comment_classes: Default::default(),
        oid: 16384,
        schema: "public".into(),
        name: "zoo".into(),
        replica_identity: ReplicaIdentity::Full,
        columns: columns
            .iter()
            .map(|(name, type_oid, _)| Column {
                name: (*name).into(),
                type_oid: *type_oid,
                type_modifier: -1,
                key: false,
            })
            .collect(),
    });
    (relation, columns.into_iter().map(|(_, _, v)| v).collect())
}

fn txn(n: u64, changes: Vec<Change>) -> Transaction {
    Transaction {
        meta: TxnMeta {
            xid: n as u32,
            commit_lsn: Lsn(n * 100),
            end_lsn: Lsn(n * 100 + 1),
            commit_ts: 0,
            part: airlock::change::Part::WHOLE,
            copied: None,
        },
        changes,
    }
}

fn zoo_batch(rows: usize) -> Batch {
    let (relation, values) = type_zoo();
    let txns = (1..=rows as u64)
        .map(|n| {
            txn(
                n,
                vec![Change {
                    identity: None,
                    relation: relation.clone(),
                    op: Op::Update,
                    lsn: Lsn(n * 100 - 1),
                    new: Some(values.clone()),
                    old: Some(values.clone()),
                }],
            )
        })
        .collect::<Vec<_>>();
    Batch::from_transactions(txns)
}

#[test]
fn every_value_type_round_trips_through_a_passthrough_guest() {
    let rt = runtime(Limits::default());
    let mut pipeline = load(&rt, "test_passthrough", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let before = zoo_batch(3);
    let after = pipeline
        .process(before.clone())
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    assert_eq!(after.rows.len(), 3);
    for (b, a) in before.rows.iter().zip(&after.rows) {
        assert_eq!(b.change.new, a.change.new);
        assert_eq!(b.change.old, a.change.old);
    }
    assert!(
        after.written_bytes > 0,
        "the passthrough guest really wrote every value back"
    );
    assert_eq!(&*after.pipeline, &*pipeline.version);
}

/// The typed bulk calls move integers, floats, booleans and bytes exactly, with
/// nulls in the bitmap: read, written back, nothing changes, and what the guest read
/// is each value itself.
#[test]
fn typed_columns_cross_the_boundary_exactly_with_their_null_bitmap() {
    let rt = runtime(Limits::default());
    let mut pipeline =
        load(&rt, "test_passthrough", &[("typed", "true")]).unwrap_or_else(|e| panic!("{e:?}"));
    let before = zoo_batch(3);
    let after = pipeline
        .process(before.clone())
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    for (b, a) in before.rows.iter().zip(&after.rows) {
        assert_eq!(b.change.new, a.change.new);
        assert_eq!(b.change.old, a.change.old);
    }
    let row = &after.rows[0];
    let read = |column: &str| {
        row.annotation(&format!("typed.{column}"))
            .map(str::to_owned)
    };
    assert_eq!(read("c_int"), Some(i64::MIN.to_string()));
    assert_eq!(read("c_float"), Some("-0.1".into()));
    assert_eq!(read("c_bool"), Some("true".into()));
    assert_eq!(read("c_date"), Some(i32::MAX.to_string()));
    assert_eq!(read("c_time"), Some("86399999999".into()));
    assert_eq!(read("c_ts"), Some("-1".into()));
    assert_eq!(read("c_tstz"), Some(i64::MIN.to_string()));
    assert_eq!(read("c_text"), None, "text has no typed call");

    // Nulls read as clear bits and are written back as nulls.
    let orders = two_tables(3);
    let after = pipeline
        .process(orders.clone())
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    let amounts: Vec<Option<&str>> = after.rows[3..]
        .iter()
        .map(|r| r.annotation("typed.amount"))
        .collect();
    assert_eq!(amounts, [Some("0.5"), Some("null"), Some("2.5")]);
    for (b, a) in orders.rows.iter().zip(&after.rows) {
        assert_eq!(b.change, a.change);
    }
}

/// A guest reads who made each change through `identity`, with the fields the host
/// holds; a change without one reads as `none`.
#[test]
fn a_guest_reads_who_made_each_change() {
    let rt = runtime(Limits::default());
    let mut pipeline = load(&rt, "test_passthrough", &[("identity", "annotate")])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let relation = customers();
    let who = Arc::new(airlock::change::identity::Identity {
        session_user: "web".into(),
        role: Some("authenticated".into()),
        client_addr: Some("10.0.0.7".into()),
        pid: Some(7),
        application_name: Some("postgrest".into()),
        actor: Some((
            "user-17".into(),
            airlock::change::identity::ActorClaim::JwtSub,
        )),
    });
    let change = |lsn: u64, identity: Option<Arc<airlock::change::identity::Identity>>| Change {
        identity,
        relation: relation.clone(),
        op: Op::Insert,
        lsn: Lsn(lsn),
        new: Some(vec![Value::Int(lsn as i64), Value::Null]),
        old: None,
    };
    let batch = Batch::from_transactions(vec![txn(1, vec![change(1, Some(who)), change(2, None)])]);
    let out = pipeline
        .process(batch)
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    let notes = |i: usize| -> Vec<(String, String)> { out.rows[i].annotations.clone() };
    assert_eq!(
        notes(0),
        [
            ("identity.session_user".to_owned(), "web".to_owned()),
            ("identity.role".to_owned(), "authenticated".to_owned()),
            ("identity.actor".to_owned(), "user-17".to_owned()),
        ]
    );
    assert_eq!(notes(1), [("identity.none".to_owned(), "true".to_owned())]);
}

#[test]
fn mask_hashes_the_email_column_and_tags_it_pii() {
    let rt = runtime(Limits::default());
    let mut pipeline = load(&rt, "mask", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let relation = customers();
    let row = |id: i64, email: Value| Some(vec![Value::Int(id), email]);
    let batch = Batch::from_transactions(vec![txn(
        1,
        vec![
            Change {
                identity: None,
                relation: relation.clone(),
                op: Op::Insert,
                lsn: Lsn(1),
                new: row(1, Value::Text("ada@example.com".into())),
                old: None,
            },
            Change {
                identity: None,
                relation: relation.clone(),
                op: Op::Insert,
                lsn: Lsn(2),
                new: row(2, Value::Null),
                old: None,
            },
            Change {
                identity: None,
                relation: relation.clone(),
                op: Op::Update,
                lsn: Lsn(3),
                new: row(1, Value::UnchangedToast),
                old: None,
            },
        ],
    )]);
    let out = pipeline
        .process(batch)
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    let email = |i: usize| out.rows[i].change.new.as_ref().unwrap()[1].clone();
    assert_eq!(email(0), Value::Text(sha256_hex("ada@example.com")));
    assert_eq!(email(1), Value::Null);
    assert_eq!(
        email(2),
        Value::UnchangedToast,
        "an unchanged TOAST value is never turned into data"
    );
    assert_eq!(out.tables[0].column_tags[1], vec!["pii".to_string()]);
    assert_eq!(
        out.rows[0].change.new.as_ref().unwrap()[0],
        Value::Int(1),
        "untouched columns stay as they were"
    );
}

/// A guest may write only the route and tag names the configuration declares: one
/// that writes another (a value it read, say) fails its batch, named, and the batch
/// comes back as it went in.
#[test]
fn routes_and_tags_a_configuration_does_not_declare_are_refused() {
    let closed = Limits {
        names: Arc::new(Names::new(["audit"], ["finance"])),
        ..Limits::default()
    };
    let rt = runtime(closed);
    let relation = customers();
    let batch = || {
        Batch::from_transactions(vec![txn(
            1,
            vec![Change {
                identity: None,
                relation: relation.clone(),
                op: Op::Insert,
                lsn: Lsn(1),
                new: Some(vec![Value::Int(1), Value::Text("ada@example.com".into())]),
                old: None,
            }],
        )])
    };

    let mut mask = load(&rt, "mask", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let (back, error) = mask
        .process(batch())
        .expect_err("the tag `pii` is not declared");
    let text = error.to_string();
    assert!(text.contains("10-mask"), "{text}");
    assert!(
        text.contains("the tag `pii` is not declared") && text.contains("[plugins] tags"),
        "{text}"
    );
    assert_eq!(
        back.rows[0].change.new.as_ref().unwrap()[1],
        Value::Text("ada@example.com".into()),
        "the batch comes back unchanged"
    );

    // A route carrying a value: refused, and the value is shown escaped and cut.
    let mut route = load(&rt, "route", &[("default_route", "ada@example.com")])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let (_, error) = route
        .process(batch())
        .expect_err("the route is not taken by any sink");
    let text = error.to_string();
    assert!(text.contains("10-route"), "{text}");
    assert!(
        text.contains("`ada@example.com` is not taken by any sink"),
        "{text}"
    );

    // Declared, the same stages run.
    let rt = runtime(Limits {
        names: Arc::new(Names::new(["audit"], ["finance", "pii"])),
        ..Limits::default()
    });
    let mut mask = load(&rt, "mask", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    mask.process(batch()).unwrap_or_else(|(_, e)| panic!("{e}"));
}

#[test]
fn a_trapped_instance_is_discarded_and_the_batch_retried_on_a_fresh_one() {
    let rt = runtime(Limits::default());
    // The guest traps on the second call of an instance only.
    let mut pipeline =
        load(&rt, "test_trap", &[("trap", "second-call")]).unwrap_or_else(|e| panic!("{e:?}"));
    let batch = zoo_batch(2);
    pipeline
        .process(batch.clone())
        .unwrap_or_else(|(_, e)| panic!("the first call passes: {e}"));
    // Second call: traps; the instance is poisoned, rebuilt, and the retry (the new
    // instance's first call) passes. wasmtime refuses to re-enter a trapped instance.
    let out = pipeline
        .process(batch.clone())
        .unwrap_or_else(|(_, e)| panic!("retry on a fresh instance should succeed: {e}"));
    assert_eq!(out.rows.len(), 2);
    assert_eq!(out.rows[0].change.new, batch.rows[0].change.new);
}

/// Regression: when a later stage failed, the batch came back as the earlier stages
/// had left it, and the retry ran those stages again on their own output (a masked
/// value was hashed twice, and a dead-letter file held masked rows as "original").
#[test]
fn a_batch_failed_by_a_later_stage_comes_back_as_it_went_in_and_is_masked_once_on_retry() {
    let rt = runtime(Limits::default());
    let stage = |name: &str, guest_name: &str| PluginFile {
        name: name.into(),
        wasm: guest(guest_name),
        settings: None,
    };
    let mut failing = Pipeline::load(
        &rt,
        &[stage("10-mask", "mask"), stage("20-error", "test_error")],
        &[],
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let email = "ada@example.com";
    let input = email_batch(email);
    let (back, error) = failing
        .process(input.clone())
        .expect_err("the second stage fails every batch");
    assert!(error.to_string().contains("20-error"), "{error}");
    assert_eq!(
        back.rows[0].change, input.rows[0].change,
        "the stages' input, not stage 1's output"
    );
    assert!(back.rows[0].tags.is_empty() && back.tables[0].column_tags[1].is_empty());
    assert_eq!(back.written_bytes, input.written_bytes);

    // The retry (here on a reloaded pipeline without the failing stage) masks once.
    let mut fixed =
        Pipeline::load(&rt, &[stage("10-mask", "mask")], &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let once = fixed.process(input).unwrap_or_else(|(_, e)| panic!("{e}"));
    let retried = fixed.process(back).unwrap_or_else(|(_, e)| panic!("{e}"));
    assert_eq!(
        retried.rows[0].change, once.rows[0].change,
        "hashed once, not twice"
    );
    assert_ne!(
        retried.rows[0].change.new.as_ref().unwrap()[1],
        Value::Text(email.into())
    );
}

#[test]
fn a_guest_that_always_traps_fails_the_batch_and_returns_it_unchanged() {
    let rt = runtime(Limits::default());
    let mut pipeline =
        load(&rt, "test_trap", &[("trap", "always")]).unwrap_or_else(|e| panic!("{e:?}"));
    let batch = zoo_batch(2);
    let (back, error) = pipeline
        .process(batch.clone())
        .expect_err("a trapping guest must fail the batch");
    let message = error.to_string();
    assert!(
        message.contains("10-test_trap"),
        "names the guest: {message}"
    );
    assert!(message.contains("trapped"), "says it trapped: {message}");
    assert!(message.contains("0/64"), "names the transaction: {message}");
    assert_eq!(back.rows.len(), batch.rows.len(), "no row lost");
    for (b, a) in batch.rows.iter().zip(&back.rows) {
        assert_eq!(
            b.change, a.change,
            "the failed batch comes back as it went in"
        );
    }
}

#[test]
fn a_guest_that_loops_forever_hits_its_deadline() {
    let rt = runtime(Limits {
        deadline: Duration::from_millis(200),
        ..Limits::default()
    });
    let mut pipeline = load(&rt, "test_spin", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let start = Instant::now();
    let (back, error) = pipeline
        .process(zoo_batch(1))
        .expect_err("an endless loop must fail");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "two attempts of 200 ms each, not forever"
    );
    assert!(error.to_string().contains("deadline"), "{error}");
    assert_eq!(back.rows.len(), 1);
}

/// Runs `pipeline` on `batch` on its own thread and waits at most `limit` for it: a
/// guest that blocks the host would otherwise hold the test as long as it holds a
/// real pipeline.
fn process_within(
    mut pipeline: Pipeline,
    batch: Batch,
    limit: Duration,
) -> Result<Batch, (Batch, RuntimeError)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(pipeline.process(batch));
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| {
        panic!("the guest held the batch for more than {limit:?}: a host call blocked past the deadline")
    })
}

#[test]
fn a_guest_that_sleeps_an_hour_does_not_hold_the_batch() {
    let rt = runtime(Limits {
        deadline: Duration::from_secs(2),
        ..Limits::default()
    });
    let pipeline = load(&rt, "test_spin", &[("mode", "sleep")]).unwrap_or_else(|e| panic!("{e:?}"));
    let start = Instant::now();
    let done = process_within(pipeline, zoo_batch(3), Duration::from_secs(20))
        .unwrap_or_else(|(_, e)| panic!("a sleep must return at once: {e}"));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the sleep took {:?}",
        start.elapsed()
    );
    assert_eq!(done.rows.len(), 3);
    assert_eq!(done.rows[0].change, zoo_batch(3).rows[0].change);
}

#[test]
fn a_guest_that_sleeps_in_a_loop_hits_its_deadline() {
    let rt = runtime(Limits {
        deadline: Duration::from_millis(200),
        ..Limits::default()
    });
    let pipeline =
        load(&rt, "test_spin", &[("mode", "sleep-loop")]).unwrap_or_else(|e| panic!("{e:?}"));
    let start = Instant::now();
    let (back, error) = process_within(pipeline, zoo_batch(1), Duration::from_secs(20))
        .expect_err("sleeping forever must fail");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "two attempts of 200 ms each, not forever"
    );
    assert!(error.to_string().contains("deadline"), "{error}");
    assert_eq!(back.rows.len(), 1);
}

#[test]
fn a_guest_that_allocates_without_bound_hits_its_memory_limit() {
    let rt = runtime(Limits {
        memory_bytes: 16 << 20,
        ..Limits::default()
    });
    let mut pipeline = load(&rt, "test_hog", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let (back, error) = pipeline
        .process(zoo_batch(1))
        .expect_err("a memory hog must fail");
    let message = error.to_string();
    assert!(message.contains("memory"), "{message}");
    assert_eq!(back.rows.len(), 1);
}

#[test]
fn a_guest_returning_an_error_fails_the_batch_with_its_message() {
    let rt = runtime(Limits::default());
    let mut pipeline = load(&rt, "test_error", &[("message", "cannot classify row")])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let (_, error) = pipeline.process(zoo_batch(1)).expect_err("must fail");
    assert!(error.to_string().contains("cannot classify row"), "{error}");
}

#[test]
fn init_can_refuse_settings_and_the_message_is_shown_verbatim() {
    let rt = runtime(Limits::default());
    let errors = load(&rt, "test_error", &[("refuse", "yes")])
        .err()
        .expect("must refuse");
    let message = errors[0].to_string();
    assert!(message.contains("refusing settings"), "{message}");
}

#[test]
fn a_guest_without_the_process_export_is_refused_at_load() {
    let rt = runtime(Limits::default());
    let errors = load(&rt, "test_noexport", &[]).err().expect("must refuse");
    let message = errors[0].to_string();
    assert!(message.contains("process"), "{message}");
}

#[test]
fn a_guest_built_for_another_contract_version_is_refused_naming_both() {
    let rt = runtime(Limits::default());
    let errors = load(&rt, "test_old_contract", &[])
        .err()
        .expect("must refuse");
    let message = errors[0].to_string();
    assert!(message.contains("airlock:transform@0.0.9"), "{message}");
    assert!(message.contains("airlock:transform@0.1.1"), "{message}");
}

/// The contract grows by additive patches: a guest built against the frozen 0.1.0
/// contract runs in one pipeline with guests built against the newest 0.1.x (whose
/// `route` uses only calls added in 0.1.1), and each stage says which it was built
/// against.
#[test]
fn a_guest_built_against_0_1_0_runs_beside_guests_built_against_the_newest_0_1_x() {
    let rt = runtime(Limits::default());
    let files = [
        PluginFile {
            name: "10-legacy".into(),
            wasm: guest("test_contract_010"),
            settings: None,
        },
        PluginFile {
            name: "20-route".into(),
            wasm: guest("route"),
            settings: None,
        },
    ];
    let mut pipeline = Pipeline::load(&rt, &files, &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let contracts: Vec<Option<&str>> = pipeline
        .stages
        .iter()
        .map(|s| s.contract.as_deref())
        .collect();
    assert_eq!(contracts, [Some("0.1.0"), Some("0.1.1")]);
    let views = pipeline.stage_views();
    assert_eq!(views[0].contract.as_deref(), Some("0.1.0"));

    let out = pipeline
        .process(email_batch("ann@example.com"))
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    let row = &out.rows[0];
    // The 0.1.0 guest's edits, through its 0.1.0 calls.
    assert_eq!(
        row.change.new.as_ref().unwrap()[1],
        Value::Text("v010:ann@example.com".into())
    );
    assert_eq!(row.tags, vec!["pii"]);
    assert_eq!(row.annotation("contract"), Some("0.1.0"));
    // The 0.1.1 guest routed the row by the tag the 0.1.0 guest gave it.
    assert_eq!(row.routes, vec!["restricted"]);
}

/// A batch of `n` inserts into `public.customers`, then `n` into `public.orders`
/// (`id bigint key, amount float8, paid bool, note bytea`), one transaction each.
fn two_tables(n: u64) -> Batch {
    let orders = Arc::new(Relation {
        comment_classes: Default::default(),
        oid: 2,
        schema: "public".into(),
        name: "orders".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: [
            ("id", oid::INT8, true),
            ("amount", oid::FLOAT8, false),
            ("paid", oid::BOOL, false),
            ("note", oid::BYTEA, false),
        ]
        .into_iter()
        .map(|(name, type_oid, key)| Column {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            key,
        })
        .collect(),
    });
    let mut txns = Vec::new();
    for i in 0..n {
        txns.push(txn(
            i + 1,
            vec![Change {
                identity: None,
                relation: customers(),
                op: Op::Insert,
                lsn: Lsn(i * 10 + 1),
                new: Some(vec![
                    Value::Int(i as i64),
                    Value::Text(format!("c{i}@example.com")),
                ]),
                old: None,
            }],
        ));
    }
    for i in 0..n {
        let op = if i % 2 == 0 { Op::Insert } else { Op::Update };
        txns.push(txn(
            n + i + 1,
            vec![Change {
                identity: None,
                relation: orders.clone(),
                op,
                lsn: Lsn((n + i) * 10 + 1),
                new: Some(vec![
                    Value::Int(i as i64),
                    if i == 1 {
                        Value::Null
                    } else {
                        Value::Float(i as f64 + 0.5)
                    },
                    Value::Bool(i % 3 != 0),
                    Value::Bytes(vec![i as u8]),
                ]),
                old: (op == Op::Update)
                    .then(|| vec![Value::Int(i as i64), Value::Null, Value::Null, Value::Null]),
            }],
        ));
    }
    Batch::from_transactions(txns)
}

/// `[when]`: the host calls the stage with the rows it names only, the rest pass
/// through untouched, and a batch with none of them skips the guest entirely. The
/// passthrough guest annotates each row it sees (`identity = "annotate"`).
#[test]
fn a_stage_under_when_sees_only_the_rows_it_names() {
    let rt = runtime(Limits::default());
    let mut pipeline = load(
        &rt,
        "test_passthrough",
        &[
            ("identity", "annotate"),
            ("when.tables", "public.ord*"),
            ("when.ops", "update"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let input = two_tables(4);
    let out = pipeline
        .process(input.clone())
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    let seen: Vec<(String, Op)> = out
        .rows
        .iter()
        .filter(|r| r.annotation("identity.none").is_some())
        .map(|r| {
            (
                out.tables[r.table as usize].relation.name.clone(),
                r.change.op,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("orders".to_string(), Op::Update),
            ("orders".to_string(), Op::Update)
        ],
        "only the updates of orders reach the guest"
    );
    // Every row is back in its place with its values.
    assert_eq!(out.rows.len(), input.rows.len());
    for (a, b) in out.rows.iter().zip(&input.rows) {
        assert_eq!(a.change, b.change);
        assert_eq!(a.table, b.table);
    }
    // A batch without a matching row: the guest is not called at all.
    let mut customers_only = load(&rt, "test_error", &[("when.tables", "public.orders")])
        .unwrap_or_else(|e| panic!("{e:?}"));
    customers_only
        .process(email_batch("a@b.c"))
        .unwrap_or_else(|(_, e)| panic!("the failing guest must not be called: {e}"));
    let error = customers_only
        .process(two_tables(1))
        .err()
        .expect("called for the orders row")
        .1;
    assert!(
        error.to_string().contains("failing a batch of 1 rows"),
        "{error}"
    );
}

/// A stage under `when` that fails a later stage's batch gives it back whole: its
/// edits are renumbered to the batch's rows and undone there.
#[test]
fn edits_of_a_stage_under_when_are_undone_on_the_whole_batch() {
    let rt = runtime(declared());
    let files = [
        PluginFile {
            name: "10-legacy".into(),
            wasm: guest("test_contract_010"),
            settings: None,
        },
        PluginFile {
            name: "20-error".into(),
            wasm: guest("test_error"),
            settings: None,
        },
    ];
    let dir = temp_dir("when-undo");
    let toml = dir.join("10-legacy.toml");
    std::fs::write(&toml, "[when]\ntables = [\"public.customers\"]\n").unwrap();
    let files = [
        PluginFile {
            settings: Some(toml.clone()),
            ..files[0].clone()
        },
        files[1].clone(),
    ];
    let mut pipeline = Pipeline::load(&rt, &files, &[]).unwrap_or_else(|e| panic!("{e:?}"));
    // The orders rows first: the lent customers rows are 0..3 of the stage's batch
    // and 3..6 of the whole one, so edits left unrenumbered would land on orders.
    let input = Batch::from_transactions(two_tables(3).into_transactions().into_iter().rev());
    assert_eq!(
        &*input.tables[input.rows[0].table as usize].relation.name,
        "orders"
    );
    let (back, _) = pipeline
        .process(input.clone())
        .err()
        .expect("20-error fails");
    for (a, b) in back.rows.iter().zip(&input.rows) {
        assert_eq!(
            (&a.change, &a.tags, &a.annotations),
            (&b.change, &b.tags, &b.annotations)
        );
    }
    // Without the failing stage the legacy guest edits the customers rows only.
    let mut alone = Pipeline::load(&rt, &files[..1], &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let out = alone.process(input).unwrap_or_else(|(_, e)| panic!("{e}"));
    let tagged: Vec<&str> = out
        .rows
        .iter()
        .filter(|r| !r.tags.is_empty())
        .map(|r| out.tables[r.table as usize].relation.name.as_str())
        .collect();
    assert_eq!(tagged, ["customers"; 3]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad `[when]` settings are refused at load, naming the file, the key and the fix.
#[test]
fn a_bad_when_is_refused_at_load_naming_the_key() {
    let rt = runtime(Limits::default());
    let error = match load(&rt, "test_passthrough", &[("when.op", "insert")]) {
        Ok(_) => panic!("an unknown [when] key must be refused"),
        Err(e) => e[0].to_string(),
    };
    assert!(
        error.contains("`when.op`") && error.contains("tables, ops, routes"),
        "{error}"
    );
}

#[test]
fn malformed_and_truncated_wasm_files_are_refused_clearly() {
    let dir = temp_dir("malformed");
    let rt = runtime(Limits::default());
    let good = std::fs::read(guest("mask")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "text",
            b"hello, not wasm".to_vec(),
            "not a WebAssembly file",
        ),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "cannot compile",
        ),
        ("empty", Vec::new(), "not a WebAssembly file"),
        (
            "core-module",
            vec![0, b'a', b's', b'm', 1, 0, 0, 0],
            "core module",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.join(format!("{name}.wasm"));
        std::fs::write(&path, bytes).unwrap();
        let files = [PluginFile {
            name: name.into(),
            wasm: path,
            settings: None,
        }];
        let errors = Pipeline::load(&rt, &files, &[])
            .err()
            .unwrap_or_else(|| panic!("{name} must be refused"));
        let message = errors[0].to_string();
        assert!(message.contains(expected), "{name}: {message}");
        assert!(
            message.contains(&format!("{name}.wasm")),
            "names the file: {message}"
        );
    }
}

#[test]
fn the_sandbox_denies_files_environment_and_network() {
    let rt = runtime(Limits::default());
    // SAFETY of the test: a variable the guest must not see.
    let mut pipeline = load(&rt, "test_escape", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let out = pipeline
        .process(zoo_batch(1))
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    let row = &out.rows[0];
    let fs = row.annotation("escape.fs").expect("fs probe ran");
    let env = row.annotation("escape.env").expect("env probe ran");
    let net = row.annotation("escape.net").expect("net probe ran");
    let clock = row.annotation("escape.clock").expect("clock probe ran");
    assert!(!fs.starts_with("read"), "the guest read a host file: {fs}");
    assert_eq!(env, "0", "the guest saw environment variables");
    assert_ne!(net, "connected", "the guest opened a socket");
    assert_eq!(clock, "0", "the guest's wall clock is frozen at the epoch");
}

/// Regression: `require` named stages only, so any guest copied in under a required
/// name passed. A pinned entry (`NAME@sha256:HEX`) accepts only those bytes.
#[test]
fn require_pins_a_stage_to_its_content() {
    use airlock::config::RequiredStage;
    use airlock::pipeline::registry;

    let rt = runtime(Limits::default());
    let dir = temp_dir("require-pin");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let mask = std::fs::read(guest("mask")).unwrap();
    let mask_sha = sha256_hex_bytes(&mask);
    let pinned = RequiredStage::parse(&format!("10-mask@sha256:{}", mask_sha.to_uppercase()))
        .expect("a pinned entry parses, in either case");
    assert_eq!(pinned.name, "10-mask");
    assert_eq!(pinned.sha256.as_deref(), Some(mask_sha.as_str()));

    // The genuine guest passes and reports its hash.
    std::fs::write(plugins.join("10-mask.wasm"), &mask).unwrap();
    let pipeline = registry::build(&rt, &plugins, std::slice::from_ref(&pinned))
        .unwrap_or_else(|e| panic!("the pinned guest must load: {e}"));
    assert_eq!(pipeline.stages[0].content_hash, mask_sha);

    // Another guest under the same name is refused, naming both hashes.
    let impostor = std::fs::read(guest("test_passthrough")).unwrap();
    std::fs::write(plugins.join("10-mask.wasm"), &impostor).unwrap();
    let error = match registry::build(&rt, &plugins, std::slice::from_ref(&pinned)) {
        Ok(_) => panic!("a different guest under a pinned name must be refused"),
        Err(e) => e,
    };
    assert!(error.contains("10-mask"), "{error}");
    assert!(error.contains(&sha256_hex_bytes(&impostor)), "{error}");
    assert!(error.contains(&mask_sha), "{error}");

    // A name-only entry still accepts any content (the documented behaviour).
    let by_name = RequiredStage::parse("10-mask").unwrap();
    assert!(registry::build(&rt, &plugins, &[by_name]).is_ok());

    // Malformed pins are refused with what is expected.
    for bad in ["10-mask@sha256:abc", "10-mask@sha256:", "@sha256:00", ""] {
        let message = RequiredStage::parse(bad).expect_err(bad);
        assert!(
            message.contains("64 hex digits") || message.contains("stage name"),
            "{message}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn sha256_hex_bytes(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Regression: native code was loaded from the compile cache as found, so whoever
/// could write the folder (or swap an entry) ran code of their choosing in the host.
/// An entry now counts only with this cache's MAC; a folder others may use is refused.
#[test]
fn the_compile_cache_runs_only_code_it_wrote_and_is_closed_to_others() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = temp_dir("compile-cache");
    let (ours, theirs) = (dir.join("ours"), dir.join("theirs"));
    let cached = |cache: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect()
    };
    // Fill both caches: `mask` in ours, `test_passthrough` in the attacker's.
    let rt = Runtime::new(declared(), Some(ours.clone())).unwrap();
    load(&rt, "mask", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let rt = Runtime::new(declared(), Some(theirs.clone())).unwrap();
    load(&rt, "test_passthrough", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let (mask_entry, other_entry) = (cached(&ours).remove(0), cached(&theirs).remove(0));
    assert_eq!(
        std::fs::metadata(&mask_entry).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Swap the other guest's compiled code in under mask's name: it must not run.
    std::fs::copy(&other_entry, &mask_entry).unwrap();
    let rt = Runtime::new(declared(), Some(ours.clone())).unwrap();
    let mut pipeline = load(&rt, "mask", &[]).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        pipeline.stages[0].info.name, "mask",
        "the forged entry was not loaded"
    );
    let out = pipeline
        .process(email_batch("ada@example.com"))
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    assert_eq!(
        out.rows[0].change.new.as_ref().unwrap()[1],
        Value::Text(sha256_hex("ada@example.com")),
        "the real mask ran"
    );

    // A cache folder other users could write (an older airlock made it 0755, or
    // worse) is closed and its key replaced: nothing written before counts.
    std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o777)).unwrap();
    let key_before = std::fs::read(ours.join("cache.key")).unwrap();
    Runtime::new(declared(), Some(ours.clone())).unwrap();
    assert_eq!(
        std::fs::metadata(&ours).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_ne!(
        std::fs::read(ours.join("cache.key")).unwrap(),
        key_before,
        "a new key"
    );

    // Another user's folder is refused, with the fix.
    let status = std::process::Command::new("chown")
        .args(["nobody"])
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(status.success(), "the tests run as root, which may chown");
    let error = match Runtime::new(declared(), Some(theirs.clone())) {
        Ok(_) => panic!("a compile cache of another user must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("owned by uid") && error.contains("chmod 700"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `public.customers (id bigint key, email text)`.
fn customers() -> Arc<Relation> {
    Arc::new(Relation {
        comment_classes: Default::default(),
        oid: 1,
        schema: "public".into(),
        name: "customers".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                name: "id".into(),
                type_oid: oid::INT8,
                type_modifier: -1,
                key: true,
            },
            Column {
                name: "email".into(),
                type_oid: oid::TEXT,
                type_modifier: -1,
                key: false,
            },
        ],
    })
}

/// A batch of one insert into `public.customers (id, email)`.
fn email_batch(email: &str) -> Batch {
    let relation = customers();
    Batch::from_transactions(vec![txn(
        1,
        vec![Change {
            identity: None,
            relation,
            op: Op::Insert,
            lsn: Lsn(1),
            new: Some(vec![Value::Int(1), Value::Text(email.into())]),
            old: None,
        }],
    )])
}

/// Fuzzes every batch call from inside a real guest: `test_fuzz` calls each batch
/// function with hostile arguments chosen by a seed mixed with the batch's commit LSN.
/// Whatever it does, the host never panics; a batch the host refuses comes back as it
/// went in; a batch it accepts stays within the output cap and renders as JSON lines.
/// Bounded by `AIRLOCK_FUZZ_SECS` (default 10).
#[test]
fn hostile_batch_calls_never_panic_the_host_and_refused_batches_come_back_unchanged() {
    let budget = Duration::from_secs(
        std::env::var("AIRLOCK_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let cap = 4 << 20;
    let rt = runtime(Limits {
        output_bytes: cap,
        ..Limits::default()
    });
    let mut pipeline =
        load(&rt, "test_fuzz", &[("calls", "40")]).unwrap_or_else(|e| panic!("{e:?}"));
    let start = Instant::now();
    let (mut accepted, mut refused, mut round) = (0u32, 0u32, 0u64);
    while start.elapsed() < budget {
        round += 1;
        let mut input = zoo_batch(3);
        for (i, t) in input.txns.iter_mut().enumerate() {
            t.commit_lsn = Lsn(round * 1000 + i as u64);
        }
        match pipeline.process(input.clone()) {
            Ok(out) => {
                accepted += 1;
                assert_eq!(out.rows.len(), input.rows.len(), "round {round}");
                assert!(out.written_bytes <= cap, "round {round}: over the cap");
                let lines = airlock::pipeline::harness::row_lines(&out);
                assert_eq!(lines.len(), out.rows.len(), "round {round}");
            }
            Err((back, error)) => {
                refused += 1;
                assert!(!error.to_string().is_empty());
                assert_eq!(back.written_bytes, input.written_bytes, "round {round}");
                for (b, a) in back.rows.iter().zip(&input.rows) {
                    assert_eq!(b.change, a.change, "round {round}: {error}");
                    assert_eq!(
                        (&b.routes, &b.tags, &b.annotations, b.dropped),
                        (&a.routes, &a.tags, &a.annotations, a.dropped),
                        "round {round}"
                    );
                }
                for (b, a) in back.tables.iter().zip(&input.tables) {
                    assert_eq!(b.column_tags, a.column_tags, "round {round}");
                }
            }
        }
    }
    eprintln!("{round} rounds: {accepted} batches accepted, {refused} refused");
    assert!(
        accepted > 0 && refused > 0,
        "both outcomes exercised: {accepted} / {refused}"
    );
}

/// The calls `test_hog` makes with one big string, in `mode = big-args`.
const BIG_ARG_CALLS: &[&str] = &[
    "log",
    "column-index",
    "add-route",
    "tag-row",
    "tag-column",
    "annotate",
    "set",
    "write-column",
    "write-text-column",
    "hash-column",
    "rows-tagged",
    "add-route-rows",
    "tag-rows",
    "annotate-rows",
    "write-bytes-column",
];

/// Runs in a child process (see below): `test_hog` in `mode` (`hold`: a 24 MiB
/// string and its copy in guest memory, no call; `big-args`: the same string passed
/// to each call in turn), 64 MiB of guest memory, an output cap of 1 MiB. Prints the
/// process's peak resident memory.
fn big_args_child(mode: &str) {
    let rt = runtime(Limits {
        memory_bytes: 64 << 20,
        output_bytes: 1 << 20,
        ..declared()
    });
    let calls: &[&str] = if mode == "hold" {
        &["log"]
    } else {
        BIG_ARG_CALLS
    };
    for call in calls {
        let mut pipeline = load(
            &rt,
            "test_hog",
            &[("mode", mode), ("call", call), ("mib", "24")],
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let _ = pipeline.process(email_batch("ada@example.com"));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    println!("peak_kib={}", peak.trim().trim_end_matches(" kB"));
}

/// Regression: the host lifted every string and list a guest passed into host memory
/// before looking at it, so a guest could make the host hold a second copy of its
/// memory (a 24 MiB `log` line, route, annotation, value …) past every limit. Now each
/// call reads its arguments in place and copies only what it keeps: the peak of a
/// process whose guest passes 24 MiB to every such call stays within 16 MiB of one
/// whose guest only holds the string (each run in its own process, so the peaks are
/// the guest's alone).
#[test]
fn guest_call_arguments_are_read_in_place_not_copied_whole() {
    // The harness names a test by its module path inside the binary.
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let name = format!("{module}::guest_call_arguments_are_read_in_place_not_copied_whole");
    if let Ok(mode) = std::env::var("AIRLOCK_BIG_ARGS_CHILD") {
        big_args_child(&mode);
        return;
    }
    let peak_kib = |mode: &str| -> u64 {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--nocapture", "--test-threads", "1"])
            .env("AIRLOCK_BIG_ARGS_CHILD", mode)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The harness prints `test NAME ... ` on the same line.
        let peak = text
            .split("peak_kib=")
            .nth(1)
            .unwrap_or_else(|| panic!("{mode}: no peak in {text}"));
        peak.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let hold = peak_kib("hold");
    let big = peak_kib("big-args");
    let extra_mib = big.saturating_sub(hold) as f64 / 1024.0;
    println!("peak: hold {hold} KiB, big-args {big} KiB, extra {extra_mib:.1} MiB");
    assert!(
        extra_mib <= 16.0,
        "passing a 24 MiB string to the host's calls raised its peak by {extra_mib:.1} MiB (hold {hold} KiB, big-args {big} KiB)"
    );
}
