//! Write–read-back tests: batches go through the sink into real Delta tables in a temp
//! directory and come back through `deltalake` (log) and `parquet` (files).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ::arrow::array::{Array, AsArray, RecordBatch, new_null_array};
use ::arrow::compute::{concat_batches, sort_to_indices, take_record_batch};
use ::arrow::datatypes::{
    Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    TimestampMicrosecondType,
};
use deltalake::kernel::{DataType, DecimalType};
use futures::TryStreamExt as _;
use object_store::ObjectStoreExt as _;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::arrow::Segment;
use super::files::{WRITE_CHUNK_ROWS, chunks, repeats};
use super::table::row_bytes;
use super::*;
use crate::change::{
    Change, Column, Op, Relation, ReplicaIdentity, Transaction, TxnMeta, Value, oid,
};
use crate::pipeline::batch::BatchRow;
use deltalake::{DeltaTable, DeltaTableBuilder};
use std::collections::BTreeSet;
use std::collections::HashMap;

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir (no `tempfile` crate here).
fn temp_dir(tag: &str) -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "airlock-lake-{tag}-{}-{n}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn settings(dir: &std::path::Path) -> LakeSettings {
    let mut settings = LakeSettings::new(
        "lake",
        format!("file://{}", dir.display()),
        "airlock:test_slot",
    );
    settings.commit_info.insert("source".into(), "db1".into());
    settings
}

fn relation(
    schema: &str,
    name: &str,
    identity: ReplicaIdentity,
    columns: &[(&str, u32, i32, bool)],
) -> Arc<Relation> {
    Arc::new(Relation {
        comment_classes: Default::default(),
        oid: 16_384,
        schema: schema.into(),
        name: name.into(),
        replica_identity: identity,
        columns: columns
            .iter()
            .map(|&(name, type_oid, type_modifier, key)| Column {
                name: name.into(),
                type_oid,
                type_modifier,
                key,
            })
            .collect(),
    })
}

const COMMIT_TS: i64 = 1_704_067_200_123_456; // 2024-01-01 00:00:00.123456 UTC

fn txn(xid: u32, commit_lsn: u64, changes: Vec<Change>) -> Transaction {
    Transaction {
        meta: TxnMeta {
            xid,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(commit_lsn + 0x10),
            commit_ts: COMMIT_TS,
            part: crate::change::Part::WHOLE,
            copied: None,
        },
        changes,
    }
}

fn change(
    relation: &Arc<Relation>,
    op: Op,
    lsn: u64,
    new: Option<Vec<Value>>,
    old: Option<Vec<Value>>,
) -> Change {
    Change {
        identity: None,
        relation: relation.clone(),
        op,
        lsn: Lsn(lsn),
        new,
        old,
    }
}

fn insert(relation: &Arc<Relation>, lsn: u64, values: Vec<Value>) -> Change {
    change(relation, Op::Insert, lsn, Some(values), None)
}

fn batch(txns: Vec<Transaction>) -> Batch {
    let mut batch = Batch::from_transactions(txns);
    batch.pipeline = Arc::from("p-abc123");
    batch.stages = Arc::from(vec![crate::pipeline::batch::StageId {
        name: "30-mask".into(),
        sha256: "5a1f".into(),
    }]);
    batch
}

fn table_url(dir: &std::path::Path, name: &str) -> String {
    format!("file://{}/{name}", dir.display())
}

async fn load(url: &str) -> DeltaTable {
    let mut table = DeltaTableBuilder::from_url(deltalake::ensure_table_uri(url).unwrap())
        .unwrap()
        .build()
        .unwrap();
    table.load().await.unwrap();
    table
}

/// Every row of the table's current files, sorted by `_lsn`.
async fn read_rows(table: &DeltaTable) -> RecordBatch {
    let store = table.object_store();
    let mut batches = Vec::new();
    let files: Vec<_> = table
        .snapshot()
        .unwrap()
        .log_data()
        .into_iter()
        .map(|f| f.object_store_path())
        .collect();
    for path in files {
        let bytes = store.get(&path).await.unwrap().bytes().await.unwrap();
        for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            batches.push(batch.unwrap());
        }
    }
    // Older files lack columns added later: read them as nulls, like a Delta reader.
    let schema = batches
        .iter()
        .map(|b| b.schema())
        .max_by_key(|s| s.fields().len())
        .unwrap();
    let batches: Vec<RecordBatch> = batches
        .iter()
        .map(|batch| {
            let columns = schema
                .fields()
                .iter()
                .map(|field| match batch.column_by_name(field.name()) {
                    Some(column) => column.clone(),
                    None => new_null_array(field.data_type(), batch.num_rows()),
                })
                .collect();
            RecordBatch::try_new(schema.clone(), columns).unwrap()
        })
        .collect();
    let all = concat_batches(&schema, &batches).unwrap();
    let order = sort_to_indices(all.column_by_name("_lsn").unwrap(), None, None).unwrap();
    take_record_batch(&all, &order).unwrap()
}

fn col<'a>(batch: &'a RecordBatch, name: &str) -> &'a dyn Array {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_ref()
}

fn strings(batch: &RecordBatch, name: &str, row: usize) -> Vec<String> {
    let list = col(batch, name).as_list::<i32>().value(row);
    list.as_string::<i32>()
        .iter()
        .map(|s| s.unwrap().to_owned())
        .collect()
}

fn text(batch: &RecordBatch, name: &str, row: usize) -> Option<String> {
    let array = col(batch, name).as_string::<i32>();
    array.is_valid(row).then(|| array.value(row).to_owned())
}

async fn last_commit_info(table: &DeltaTable) -> HashMap<String, serde_json::Value> {
    let infos: Vec<_> = table.history(Some(1)).try_collect().await.unwrap();
    infos.into_iter().next().unwrap().info
}

#[tokio::test]
async fn one_row_per_type_reads_back_exactly() {
    let dir = temp_dir("types");
    let numeric_10_2 = (10 << 16 | 2) + 4;
    let rel = relation(
        "public",
        "every_type",
        ReplicaIdentity::Default,
        &[
            ("id", oid::INT4, -1, true),
            ("b", oid::BOOL, -1, false),
            ("i2", oid::INT2, -1, false),
            ("i8", oid::INT8, -1, false),
            ("o", oid::OID, -1, false),
            ("f4", oid::FLOAT4, -1, false),
            ("f8", oid::FLOAT8, -1, false),
            ("dec", oid::NUMERIC, numeric_10_2, false),
            ("num", oid::NUMERIC, -1, false),
            ("t", oid::TEXT, -1, false),
            ("vc", oid::VARCHAR, 14, false),
            ("bp", oid::BPCHAR, 7, false),
            ("nm", oid::NAME, -1, false),
            ("ch", oid::CHAR, -1, false),
            ("by", oid::BYTEA, -1, false),
            ("d", oid::DATE, -1, false),
            ("ts", oid::TIMESTAMP, -1, false),
            ("tz", oid::TIMESTAMPTZ, -1, false),
            ("tm", oid::TIME, -1, false),
            ("u", oid::UUID, -1, false),
            ("j", oid::JSON, -1, false),
            ("jb", oid::JSONB, -1, false),
            ("iv", oid::INTERVAL, -1, false),
        ],
    );
    let full = vec![
        Value::Int(1),
        Value::Bool(true),
        Value::Int(-32_768),
        Value::Int(9_007_199_254_740_993),
        Value::Int(4_294_967_295),
        Value::Float(1.5),
        Value::Float(-2.25e300),
        Value::Numeric("-12345678.91".into()),
        Value::Numeric("3.14159265358979323846264338327950288419716939937510".into()),
        Value::Text("héllo".into()),
        Value::Text("varchar".into()),
        Value::Text("bp   ".into()),
        Value::Text("a_name".into()),
        Value::Text("x".into()),
        Value::Bytes(vec![0, 1, 254, 255]),
        Value::Date(19_723),
        Value::Timestamp(1_704_067_200_000_001),
        Value::Timestamptz(-1),
        Value::Time(45_296_000_789),
        Value::Uuid(*b"\x12\x34\x56\x78\x9a\xbc\xde\xf0\x01\x23\x45\x67\x89\xab\xcd\xef"),
        Value::Json("{\"a\": 1}".into()),
        Value::Json("{\"b\": [1, 2]}".into()),
        Value::Other("1 day 02:00:00".into()),
    ];
    let mut nulls = vec![Value::Null; full.len()];
    nulls[0] = Value::Int(2);
    let mut special = vec![Value::Null; full.len()];
    special[0] = Value::Int(3);
    special[7] = Value::Numeric("NaN".into());
    special[9] = Value::UnchangedToast;
    special[16] = Value::Timestamp(i64::MAX);
    special[15] = Value::Date(i32::MIN);
    let b = batch(vec![
        txn(
            700,
            0x1000,
            vec![insert(&rel, 0x100, full), insert(&rel, 0x108, nulls)],
        ),
        txn(
            701,
            0x2000,
            vec![change(&rel, Op::Update, 0x1100, Some(special), None)],
        ),
    ]);

    let mut sink = LakeSink::open(settings(&dir)).await.unwrap();
    assert!(sink.accept(Arc::new(b)).await.unwrap());
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(0x2010)));
    assert_eq!(sink.flush().await.unwrap(), None, "nothing new");

    let table = load(&table_url(&dir, "public.every_type")).await;
    let schema = table.snapshot().unwrap().schema();
    let delta = |name: &str| schema.field(name).unwrap().data_type().clone();
    assert_eq!(delta("b"), DataType::BOOLEAN);
    assert_eq!(delta("i2"), DataType::SHORT);
    assert_eq!(delta("id"), DataType::INTEGER);
    assert_eq!(delta("o"), DataType::LONG);
    assert_eq!(delta("f4"), DataType::FLOAT);
    assert_eq!(delta("dec"), DecimalType::try_new(10, 2).unwrap().into());
    assert_eq!(delta("num"), DataType::STRING);
    assert_eq!(delta("by"), DataType::BINARY);
    assert_eq!(delta("d"), DataType::DATE);
    assert_eq!(delta("ts"), DataType::TIMESTAMP_NTZ);
    assert_eq!(delta("tz"), DataType::TIMESTAMP);
    assert_eq!(delta("tm"), DataType::STRING);
    assert_eq!(delta("_commit_ts"), DataType::TIMESTAMP);

    let rows = read_rows(&table).await;
    assert_eq!(rows.num_rows(), 3);
    // Row 0: every value.
    assert_eq!(col(&rows, "id").as_primitive::<Int32Type>().value(0), 1);
    assert!(col(&rows, "b").as_boolean().value(0));
    assert_eq!(
        col(&rows, "i2").as_primitive::<Int16Type>().value(0),
        -32_768
    );
    assert_eq!(
        col(&rows, "i8").as_primitive::<Int64Type>().value(0),
        9_007_199_254_740_993
    );
    assert_eq!(
        col(&rows, "o").as_primitive::<Int64Type>().value(0),
        4_294_967_295
    );
    assert_eq!(col(&rows, "f4").as_primitive::<Float32Type>().value(0), 1.5);
    assert_eq!(
        col(&rows, "f8").as_primitive::<Float64Type>().value(0),
        -2.25e300
    );
    let dec = col(&rows, "dec").as_primitive::<Decimal128Type>();
    assert_eq!(
        (dec.value(0), dec.precision(), dec.scale()),
        (-1_234_567_891, 10, 2)
    );
    assert_eq!(
        text(&rows, "num", 0).unwrap(),
        "3.14159265358979323846264338327950288419716939937510"
    );
    assert_eq!(text(&rows, "t", 0).unwrap(), "héllo");
    assert_eq!(text(&rows, "vc", 0).unwrap(), "varchar");
    assert_eq!(text(&rows, "bp", 0).unwrap(), "bp   ");
    assert_eq!(text(&rows, "nm", 0).unwrap(), "a_name");
    assert_eq!(text(&rows, "ch", 0).unwrap(), "x");
    assert_eq!(
        col(&rows, "by").as_binary::<i32>().value(0),
        &[0, 1, 254, 255]
    );
    assert_eq!(
        col(&rows, "d").as_primitive::<Date32Type>().value(0),
        19_723
    );
    let ts = col(&rows, "ts").as_primitive::<TimestampMicrosecondType>();
    assert_eq!((ts.value(0), ts.timezone()), (1_704_067_200_000_001, None));
    let tz = col(&rows, "tz").as_primitive::<TimestampMicrosecondType>();
    assert_eq!((tz.value(0), tz.timezone()), (-1, Some("UTC")));
    assert_eq!(text(&rows, "tm", 0).unwrap(), "12:34:56.000789");
    assert_eq!(
        text(&rows, "u", 0).unwrap(),
        "12345678-9abc-def0-0123-456789abcdef"
    );
    assert_eq!(text(&rows, "j", 0).unwrap(), "{\"a\": 1}");
    assert_eq!(text(&rows, "jb", 0).unwrap(), "{\"b\": [1, 2]}");
    assert_eq!(text(&rows, "iv", 0).unwrap(), "1 day 02:00:00");
    // Metadata columns.
    assert_eq!(text(&rows, "_op", 0).unwrap(), "c");
    assert_eq!(
        col(&rows, "_lsn").as_primitive::<Int64Type>().value(0),
        0x100
    );
    assert_eq!(
        col(&rows, "_commit_lsn")
            .as_primitive::<Int64Type>()
            .value(0),
        0x1000
    );
    let commit_ts = col(&rows, "_commit_ts").as_primitive::<TimestampMicrosecondType>();
    assert_eq!(
        (commit_ts.value(0), commit_ts.timezone()),
        (COMMIT_TS, Some("UTC"))
    );
    assert_eq!(col(&rows, "_xid").as_primitive::<Int64Type>().value(0), 700);
    assert_eq!(text(&rows, "_pipeline", 0).unwrap(), "p-abc123");
    assert!(strings(&rows, "_tags", 0).is_empty());
    assert!(strings(&rows, "_unchanged", 0).is_empty());
    assert!(strings(&rows, "_special", 0).is_empty());

    // Row 1: NULL everywhere but the key.
    for field in rows.schema().fields() {
        let name = field.name();
        if name == "id" || name.starts_with('_') {
            continue;
        }
        assert!(col(&rows, name).is_null(1), "{name} should be null");
    }
    assert!(strings(&rows, "_unchanged", 1).is_empty());

    // Row 2: an unchanged TOAST value and values the Delta types cannot hold.
    assert_eq!(text(&rows, "_op", 2).unwrap(), "u");
    assert_eq!(col(&rows, "_xid").as_primitive::<Int64Type>().value(2), 701);
    assert!(col(&rows, "t").is_null(2));
    assert!(col(&rows, "dec").is_null(2));
    assert!(col(&rows, "ts").is_null(2));
    assert_eq!(strings(&rows, "_unchanged", 2), ["t"]);
    assert_eq!(
        strings(&rows, "_special", 2),
        ["dec=NaN", "d=-infinity", "ts=infinity"]
    );

    // The commit records the application transaction and the commit info.
    let version = table
        .snapshot()
        .unwrap()
        .transaction_version(table.log_store().as_ref(), "airlock:test_slot")
        .await
        .unwrap();
    assert_eq!(version, Some(0x2000));
    let info = last_commit_info(&table).await;
    assert_eq!(info["source"], "db1");
    assert_eq!(
        info["airlock.lsn_range"],
        serde_json::json!(["0/1000", "0/2000"])
    );
    assert_eq!(info["airlock.pipeline"], "p-abc123");
    assert_eq!(
        info["airlock.stages"],
        serde_json::json!({"p-abc123": [{"name": "30-mask", "sha256": "5a1f"}]}),
        "lineage: every stage of the pipeline with its content hash"
    );
    assert_eq!(info["airlock.rows"], 3);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_reopened_sink_skips_transactions_already_committed() {
    let dir = temp_dir("once");
    let rel = relation(
        "public",
        "orders",
        ReplicaIdentity::Default,
        &[("id", oid::INT8, -1, true)],
    );
    let txn_a = || {
        txn(
            10,
            0x5000,
            vec![
                insert(&rel, 0x4000, vec![Value::Int(1)]),
                insert(&rel, 0x4008, vec![Value::Int(2)]),
            ],
        )
    };
    let txn_b = || txn(11, 0x6000, vec![insert(&rel, 0x5100, vec![Value::Int(3)])]);

    let mut first = LakeSink::open(settings(&dir)).await.unwrap();
    first.accept(Arc::new(batch(vec![txn_a()]))).await.unwrap();
    assert_eq!(first.flush().await.unwrap(), Some(Lsn(0x5010)));
    drop(first); // "crash" before the slot was acknowledged

    // The slot redelivers A, then B, in two batches flushed separately.
    let mut second = LakeSink::open(settings(&dir)).await.unwrap();
    assert!(second.accept(Arc::new(batch(vec![txn_a()]))).await.unwrap());
    assert_eq!(
        second.flush().await.unwrap(),
        Some(Lsn(0x5010)),
        "durable: already in the lake"
    );
    second
        .accept(Arc::new(batch(vec![txn_a(), txn_b()])))
        .await
        .unwrap();
    assert_eq!(second.flush().await.unwrap(), Some(Lsn(0x6010)));

    let table = load(&table_url(&dir, "public.orders")).await;
    assert_eq!(
        table.version(),
        Some(2),
        "create, A, B: no commit for the redelivered A"
    );
    let rows = read_rows(&table).await;
    let ids: Vec<i64> = col(&rows, "id")
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(ids, [1, 2, 3]);
    let version = table
        .snapshot()
        .unwrap()
        .transaction_version(table.log_store().as_ref(), "airlock:test_slot")
        .await;
    assert_eq!(version.unwrap(), Some(0x6000));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn deletes_write_the_old_key_and_dropped_or_unrouted_rows_are_not_written() {
    let dir = temp_dir("ops");
    let rel = relation(
        "app",
        "users",
        ReplicaIdentity::Default,
        &[
            ("id", oid::INT4, -1, true),
            ("email", oid::TEXT, -1, false),
            ("name", oid::TEXT, -1, false),
        ],
    );
    let row = |id: i64, email: &str| {
        vec![
            Value::Int(id),
            Value::Text(email.into()),
            Value::Text(format!("n{id}")),
        ]
    };
    let mut b = batch(vec![txn(
        20,
        0x9000,
        vec![
            insert(&rel, 0x8000, row(1, "a@x")),
            insert(&rel, 0x8008, row(2, "b@x")),
            insert(&rel, 0x8010, row(3, "c@x")),
            change(
                &rel,
                Op::Delete,
                0x8018,
                None,
                Some(vec![Value::Int(1), Value::Null, Value::Null]),
            ),
            change(&rel, Op::Truncate, 0x8020, None, None),
        ],
    )]);
    b.rows[0].tags = vec!["vip".into()];
    b.rows[1].routes = vec!["audit-only".into()];
    b.rows[2].dropped = true;
    b.tables[0].column_tags[1] = vec!["pii".into(), "email".into()];

    let mut sink = LakeSink::open(settings(&dir)).await.unwrap();
    sink.accept(Arc::new(b)).await.unwrap();
    // A batch whose only row goes elsewhere is not kept but still moves the end LSN.
    let mut elsewhere = batch(vec![txn(
        21,
        0xA000,
        vec![insert(&rel, 0x9100, row(4, "d@x"))],
    )]);
    elsewhere.rows[0].routes = vec!["audit-only".into()];
    assert!(!sink.accept(Arc::new(elsewhere)).await.unwrap());
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(0xA010)));

    let table = load(&table_url(&dir, "app.users")).await;
    let schema = table.snapshot().unwrap().schema();
    let email = schema.field("email").unwrap();
    assert_eq!(
        email.metadata().get(TAGS_KEY),
        Some(&deltalake::kernel::MetadataValue::String(
            "[\"email\",\"pii\"]".into()
        ))
    );
    let rows = read_rows(&table).await;
    assert_eq!(rows.num_rows(), 3);
    let ops: Vec<_> = (0..3).map(|i| text(&rows, "_op", i).unwrap()).collect();
    assert_eq!(ops, ["c", "d", "t"]);
    let ids = col(&rows, "id").as_primitive::<Int32Type>();
    assert_eq!((ids.value(0), ids.value(1)), (1, 1));
    assert_eq!(text(&rows, "email", 0).as_deref(), Some("a@x"));
    assert_eq!(
        text(&rows, "email", 1),
        None,
        "the delete's old image holds the key only"
    );
    assert!(
        ids.is_null(2) && col(&rows, "email").is_null(2),
        "a truncate has no data"
    );
    assert_eq!(strings(&rows, "_tags", 0), ["vip"]);
    assert!(strings(&rows, "_tags", 1).is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn new_columns_and_grown_tags_evolve_the_table() {
    let dir = temp_dir("evolve");
    let v1 = relation(
        "public",
        "evolve",
        ReplicaIdentity::Default,
        &[("id", oid::INT4, -1, true), ("name", oid::TEXT, -1, false)],
    );
    let v2 = relation(
        "public",
        "evolve",
        ReplicaIdentity::Default,
        &[
            ("id", oid::INT4, -1, true),
            ("name", oid::TEXT, -1, false),
            ("seen", oid::TIMESTAMP, -1, false),
        ],
    );
    let v3 = relation(
        "public",
        "evolve",
        ReplicaIdentity::Default,
        &[("id", oid::INT4, -1, true)],
    );

    let mut sink = LakeSink::open(settings(&dir)).await.unwrap();
    sink.accept(Arc::new(batch(vec![txn(
        1,
        0x100,
        vec![insert(
            &v1,
            0x10,
            vec![Value::Int(1), Value::Text("a".into())],
        )],
    )])))
    .await
    .unwrap();
    sink.flush().await.unwrap();

    // A new timestamp column (needs the timestampNtz feature) and a tag on `name`, then
    // a relation version without `name`, all in one flush.
    let mut b = batch(vec![
        txn(
            2,
            0x200,
            vec![insert(
                &v2,
                0x110,
                vec![
                    Value::Int(2),
                    Value::Text("b".into()),
                    Value::Timestamp(86_400_000_000),
                ],
            )],
        ),
        txn(3, 0x300, vec![insert(&v3, 0x210, vec![Value::Int(3)])]),
    ]);
    b.tables[0].column_tags[1] = vec!["pii".into()];
    sink.accept(Arc::new(b)).await.unwrap();
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(0x310)));

    let table = load(&table_url(&dir, "public.evolve")).await;
    let schema = table.snapshot().unwrap().schema();
    assert_eq!(
        schema.field("seen").unwrap().data_type(),
        &DataType::TIMESTAMP_NTZ
    );
    let names: Vec<&str> = schema.fields().map(|f| f.name().as_str()).collect();
    assert_eq!(&names[..2], ["id", "name"]);
    assert_eq!(
        names.last(),
        Some(&"seen"),
        "added after the metadata columns"
    );
    assert_eq!(
        schema.field("name").unwrap().metadata().get(TAGS_KEY),
        Some(&deltalake::kernel::MetadataValue::String(
            "[\"pii\"]".into()
        ))
    );
    let rows = read_rows(&table).await;
    let seen = col(&rows, "seen").as_primitive::<TimestampMicrosecondType>();
    assert!(seen.is_null(0));
    assert_eq!(seen.value(1), 86_400_000_000);
    assert!(seen.is_null(2));
    assert_eq!(text(&rows, "name", 1).as_deref(), Some("b"));
    assert_eq!(
        text(&rows, "name", 2),
        None,
        "a column the relation lacks is null"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn size_bounds_make_the_sink_due() {
    let dir = temp_dir("due");
    let rel = relation(
        "public",
        "small",
        ReplicaIdentity::Default,
        &[("id", oid::INT4, -1, true)],
    );
    let mut settings = settings(&dir);
    settings.max_rows = 2;
    let mut sink = LakeSink::open(settings).await.unwrap();
    sink.accept(Arc::new(batch(vec![txn(
        1,
        0x100,
        vec![insert(&rel, 0x10, vec![Value::Int(1)])],
    )])))
    .await
    .unwrap();
    assert!(!sink.due());
    sink.accept(Arc::new(batch(vec![txn(
        2,
        0x200,
        vec![insert(&rel, 0x110, vec![Value::Int(2)])],
    )])))
    .await
    .unwrap();
    assert!(sink.due());
    sink.flush().await.unwrap();
    assert!(!sink.due());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn the_byte_bound_counts_what_rows_hold_in_memory() {
    let dir = temp_dir("due-bytes");
    let rel = events();
    let body = "x".repeat(1000);
    let row = |n: u64| {
        txn(
            n as u32,
            0x1000 * n + 0x800,
            vec![insert(
                &rel,
                0x1000 * n,
                vec![Value::Int(n as i64), Value::Text(body.clone())],
            )],
        )
    };
    // What one such row holds: the row, two values and the text's allocation.
    let one = row_bytes(&batch(vec![row(1)]).rows[0]);
    let floor = std::mem::size_of::<BatchRow>() + 2 * std::mem::size_of::<Value>() + 1000;
    assert!(one >= floor, "{one} < {floor}");
    assert!(
        one < floor + 200,
        "{one} counts far more than the row holds"
    );

    let mut settings = settings(&dir);
    settings.max_bytes = 4 * one;
    let mut sink = LakeSink::open(settings).await.unwrap();
    for n in 1..=3 {
        sink.accept(Arc::new(batch(vec![row(n)]))).await.unwrap();
        assert!(!sink.due(), "due after {n} rows");
    }
    sink.accept(Arc::new(batch(vec![row(4)]))).await.unwrap();
    assert!(sink.due());
    sink.flush().await.unwrap();
    assert!(!sink.due());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn chunks_are_runs_of_whole_segments_in_order() {
    let rel = events();
    let segments: Vec<Segment> = (1..=5u64)
        .map(|n| Segment {
            batch: Arc::new(batch(vec![two_rows(&rel, n)])),
            table: 0,
            rows: (0..n as u32 % 2 + 1).collect(),
        })
        .collect();
    // Segment sizes 2, 1, 2, 1, 2.
    let sizes: Vec<Vec<usize>> = chunks(&segments, 3)
        .map(|c| c.iter().map(|s| s.rows.len()).collect())
        .collect();
    assert_eq!(sizes, vec![vec![2, 1], vec![2, 1], vec![2]]);
    assert_eq!(chunks(&segments, 100).count(), 1);
    assert_eq!(chunks(&[], 3).count(), 0);
}

#[tokio::test]
async fn a_flush_past_one_write_chunk_writes_every_row_once_in_order() {
    let dir = temp_dir("chunks");
    let rel = events();
    let mut sink = LakeSink::open(settings(&dir)).await.unwrap();
    let per_txn = 1000u64;
    let txns = 3 * WRITE_CHUNK_ROWS as u64 / per_txn + 1;
    for n in 0..txns {
        let changes = (0..per_txn)
            .map(|i| {
                let id = (n * per_txn + i) as i64;
                insert(
                    &rel,
                    0x100_000 * (n + 1) + i,
                    vec![Value::Int(id), Value::Text(format!("row {id}"))],
                )
            })
            .collect();
        sink.accept(Arc::new(batch(vec![txn(
            n as u32 + 1,
            0x100_000 * (n + 1) + 0xF_FFFF,
            changes,
        )])))
        .await
        .unwrap();
    }
    sink.flush().await.unwrap();
    let table = load(&table_url(&dir, "public.events")).await;
    let rows = read_rows(&table).await;
    let total = (txns * per_txn) as usize;
    assert!(total > 3 * WRITE_CHUNK_ROWS);
    assert_eq!(ids_of(&rows), (0..total as i64).collect::<Vec<_>>());
    for i in [0, WRITE_CHUNK_ROWS, total - 1] {
        let id = col(&rows, "id").as_primitive::<Int64Type>().value(i);
        assert_eq!(text(&rows, "body", i), Some(format!("row {id}")));
    }
    assert_eq!(last_commit_info(&table).await["airlock.rows"], total);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_reopened_sink_tells_the_latest_commit_it_holds_for_its_app_id() {
    let dir = temp_dir("held");
    let sink = LakeSink::open(settings(&dir)).await.unwrap();
    assert_eq!(sink.held_through().await.unwrap(), None, "an empty lake");
    drop(sink);
    let rel = events();
    let other = relation(
        "public",
        "other",
        ReplicaIdentity::Default,
        &[("id", oid::INT8, -1, true)],
    );
    let mut sink = LakeSink::open(settings(&dir)).await.unwrap();
    write_flushes(&mut sink, &rel, 1..=2).await;
    sink.accept(Arc::new(batch(vec![txn(
        9,
        0x9000,
        vec![insert(&other, 0x8ff0, vec![Value::Int(1)])],
    )])))
    .await
    .unwrap();
    sink.flush().await.unwrap();
    write_flushes(&mut sink, &rel, 10..=10).await;
    drop(sink);

    let sink = LakeSink::open(settings(&dir)).await.unwrap();
    assert_eq!(
        sink.held_through().await.unwrap(),
        Some(("public.events".to_owned(), Lsn(0x1000 * 10 + 0x800)))
    );
    // Another slot's application id holds nothing here.
    let mut elsewhere = settings(&dir);
    elsewhere.app_id = "airlock:another_slot".into();
    let sink = LakeSink::open(elsewhere).await.unwrap();
    assert_eq!(sink.held_through().await.unwrap(), None);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn unsupported_urls_are_definite_errors() {
    let error = LakeSink::open(LakeSettings::new("lake", "ftp://host/x", "a"))
        .await
        .unwrap_err();
    assert!(!error.is_transient());
    assert!(error.to_string().contains("file:///abs/path"), "{error}");
    let error = LakeSink::open(LakeSettings::new("lake", "file://relative/x", "a"))
        .await
        .unwrap_err();
    assert!(!error.is_transient());
}

#[test]
fn table_directories_keep_plain_names_and_escape_the_rest() {
    use naming::table_dir;
    assert_eq!(table_dir("public", "orders"), "public.orders");
    // Escaped, never percent-encoded: nothing below decodes `_2F` back into `/`.
    assert_eq!(table_dir("my schema", "t/x"), "my_20schema.t_2Fx.x");
    assert_eq!(
        super::settings::table_url("file:///lake/", "public.orders"),
        "file:///lake/public.orders"
    );
}

#[test]
fn s3_lakes_get_request_timeouts_unless_set() {
    let mut settings = LakeSettings::new("lake", "s3://lake/prefix", "a");
    let options = settings.store_options();
    assert_eq!(options["timeout"], "30s");
    assert_eq!(options["connect_timeout"], "5s");
    settings.storage_options = [("TIMEOUT".to_owned(), "2m".to_owned())].into();
    let options = settings.store_options();
    assert_eq!(options["TIMEOUT"], "2m");
    assert!(!options.contains_key("timeout"), "the user's value stands");
    assert_eq!(options["connect_timeout"], "5s");
    let file = LakeSettings::new("lake", "file:///lake", "a");
    assert!(file.store_options().is_empty());
}

/// The source tables of the lake path-escape issue: `(schema, table)`.
const HOSTILE_TABLES: [(&str, &str); 10] = [
    ("public", "ok"),
    // Plain, in a schema starting with `_`: listed like any other.
    ("_x", "t"),
    ("public", "line\nbreak"),
    ("public", "/../../outside"),
    ("public", "a/../b"),
    ("public", "b"),
    ("a.b", "c"),
    ("a", "b.c"),
    ("public", ".."),
    ("public", "%2F"),
];

#[tokio::test]
async fn hostile_table_names_get_their_own_directory_inside_the_root() {
    let dir = temp_dir("hostile");
    let root = dir.join("lake");
    let mut sink = LakeSink::open(settings(&root)).await.unwrap();
    let relations: Vec<Arc<Relation>> = HOSTILE_TABLES
        .iter()
        .map(|&(schema, name)| {
            relation(
                schema,
                name,
                ReplicaIdentity::Default,
                &[("id", oid::INT8, -1, true)],
            )
        })
        .collect();
    let changes = relations
        .iter()
        .enumerate()
        .map(|(i, rel)| insert(rel, 0x10 + i as u64, vec![Value::Int(i as i64)]))
        .collect();
    sink.accept(Arc::new(batch(vec![txn(1, 0x100, changes)])))
        .await
        .unwrap();
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(0x110)));

    // Nothing beside the root; in it, one directory per table.
    let beside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["lake"]);
    let mut dirs: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    let mut expected: Vec<String> = HOSTILE_TABLES
        .iter()
        .map(|&(s, t)| naming::table_dir(s, t))
        .collect();
    expected.sort();
    assert_eq!(dirs, expected);
    for (i, &(schema, name)) in HOSTILE_TABLES.iter().enumerate() {
        let table = load(&table_url(&root, &naming::table_dir(schema, name))).await;
        assert_eq!(
            ids_of(&read_rows(&table).await),
            [i as i64],
            "{schema}.{name}"
        );
        let stored = table
            .snapshot()
            .unwrap()
            .metadata()
            .name()
            .map(str::to_owned);
        assert_eq!(stored, Some(naming::display_name(schema, name)));
    }

    // The catalog and `held_through` show the original names.
    let toml = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u@h/db\"\nslot = \"test_slot\"\n[sinks.lake]\ntype = \"delta\"\nurl = \"file://{}\"\n",
        root.display()
    );
    let config = crate::config::Config::from_toml("t.toml", &toml, &dir).unwrap();
    let catalog = catalog(config.lakes()).await.unwrap();
    let mut names: Vec<&str> = catalog.sinks[0]
        .tables
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    names.sort();
    let mut expected: Vec<String> = HOSTILE_TABLES
        .iter()
        .map(|&(s, t)| naming::display_name(s, t))
        .collect();
    expected.sort();
    assert_eq!(names, expected);
    assert!(names.contains(&"\"a.b\".c") && names.contains(&"a.\"b.c\""));
    let text = catalog.render_table();
    assert!(text.contains("public.\"line\\nbreak\""), "{text}");
    let sink = LakeSink::open(settings(&root)).await.unwrap();
    let (_, through) = sink.held_through().await.unwrap().unwrap();
    assert_eq!(through, Lsn(0x100));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_directory_holding_another_table_is_never_written() {
    // As on a case-insensitive filesystem, where `public.a` opens `public.A`.
    let dir = temp_dir("occupied");
    let upper = relation(
        "public",
        "A",
        ReplicaIdentity::Default,
        &[("id", oid::INT8, -1, true)],
    );
    let lower = relation(
        "public",
        "a",
        ReplicaIdentity::Default,
        &[("id", oid::INT8, -1, true)],
    );
    let mut sink = LakeSink::open(settings(&dir)).await.unwrap();
    sink.accept(Arc::new(batch(vec![txn(
        1,
        0x100,
        vec![insert(&upper, 0x10, vec![Value::Int(1)])],
    )])))
    .await
    .unwrap();
    sink.flush().await.unwrap();
    drop(sink);
    std::fs::rename(dir.join("public.A"), dir.join("public.a")).unwrap();

    let mut sink = LakeSink::open(settings(&dir)).await.unwrap();
    sink.accept(Arc::new(batch(vec![txn(
        2,
        0x200,
        vec![insert(&lower, 0x110, vec![Value::Int(2)])],
    )])))
    .await
    .unwrap();
    let error = sink.flush().await.unwrap_err();
    assert!(!error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("holds the Delta table public.A"),
        "{error}"
    );
    let table = load(&table_url(&dir, "public.a")).await;
    assert_eq!(ids_of(&read_rows(&table).await), [1], "nothing mixed in");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_failed_table_does_not_make_the_retry_recommit_the_others() {
    let dir = temp_dir("partial");
    let a = relation(
        "public",
        "a",
        ReplicaIdentity::Default,
        &[("id", oid::INT4, -1, true)],
    );
    let b = relation(
        "public",
        "b",
        ReplicaIdentity::Default,
        &[("id", oid::INT4, -1, true)],
    );
    // A file where `public.b/` should be makes that table fail; `public.a` flushes first.
    let blocker = dir.join("public.b");
    std::fs::write(&blocker, b"not a directory").unwrap();

    let mut sink = LakeSink::open(settings(&dir)).await.unwrap();
    let both = txn(
        1,
        0x100,
        vec![
            insert(&a, 0x10, vec![Value::Int(1)]),
            insert(&b, 0x18, vec![Value::Int(2)]),
        ],
    );
    sink.accept(Arc::new(batch(vec![both]))).await.unwrap();
    let error = sink.flush().await.unwrap_err();
    assert!(error.to_string().contains("public.b"), "{error}");
    assert_eq!(
        sink.buffered_rows().await,
        1,
        "b's row stays buffered, a's is gone"
    );

    std::fs::remove_file(&blocker).unwrap();
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(0x110)));
    let table_a = load(&table_url(&dir, "public.a")).await;
    assert_eq!(
        table_a.version(),
        Some(1),
        "create and one write: a was not committed again"
    );
    assert_eq!(read_rows(&table_a).await.num_rows(), 1);
    let table_b = load(&table_url(&dir, "public.b")).await;
    assert_eq!(read_rows(&table_b).await.num_rows(), 1);
    std::fs::remove_dir_all(&dir).ok();
}

/// A moto S3 server on a free local port, stopped on drop.
struct Moto {
    port: u16,
    child: Option<tokio::process::Child>,
}

impl Moto {
    fn port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn start(port: u16) -> Moto {
        let child = tokio::process::Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 is needed for the S3 test: install Python 3 and `pip install 'moto[server]'`");
        let mut moto = Moto {
            port,
            child: Some(child),
        };
        for _ in 0..150 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return moto;
            }
            if let Some(status) = moto
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "moto's S3 server exited ({status}): install it with `pip install 'moto[server]'`"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto's S3 server did not listen on 127.0.0.1:{port} within 15 s");
    }

    async fn create_bucket(&self, bucket: &str) {
        let url = format!("http://127.0.0.1:{}/{bucket}", self.port);
        let response = reqwest::Client::new().put(url).send().await.unwrap();
        assert!(
            response.status().is_success(),
            "creating bucket {bucket}: {}",
            response.status()
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
    }
}

#[tokio::test]
async fn an_unreachable_s3_lake_is_transient_and_the_retry_commits_once() {
    let port = Moto::port();
    let mut settings = LakeSettings::new("lake", "s3://lake/prefix", "airlock:test_slot");
    settings.storage_options = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("max_retries", "0".into()),
        ("retry_timeout", "1s".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let rel = relation(
        "public",
        "events",
        ReplicaIdentity::Default,
        &[("id", oid::INT8, -1, true)],
    );
    let mut sink = LakeSink::open(settings.clone()).await.unwrap();
    sink.accept(Arc::new(batch(vec![txn(
        1,
        0x100,
        vec![insert(&rel, 0x10, vec![Value::Int(1)])],
    )])))
    .await
    .unwrap();

    let error = sink.flush().await.unwrap_err();
    assert!(error.is_transient(), "{error}");

    let moto = Moto::start(port).await;
    moto.create_bucket("lake").await;
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(0x110)));
    sink.accept(Arc::new(batch(vec![txn(
        2,
        0x200,
        vec![insert(&rel, 0x110, vec![Value::Int(2)])],
    )])))
    .await
    .unwrap();
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(0x210)));

    let url = deltalake::ensure_table_uri("s3://lake/prefix/public.events").unwrap();
    let mut table = DeltaTableBuilder::from_url(url)
        .unwrap()
        .with_storage_options(settings.storage_options.clone())
        .build()
        .unwrap();
    table.load().await.unwrap();
    assert_eq!(table.version(), Some(2));
    let rows = read_rows(&table).await;
    let ids: Vec<i64> = col(&rows, "id")
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(ids, [1, 2]);
    drop(moto);
}

// ---- Maintenance: compaction, checkpoints, vacuum -------------------------------------

fn ids_of(rows: &RecordBatch) -> Vec<i64> {
    let mut ids: Vec<i64> = col(rows, "id")
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    ids.sort();
    ids
}

fn events() -> Arc<Relation> {
    relation(
        "public",
        "events",
        ReplicaIdentity::Default,
        &[("id", oid::INT8, -1, true), ("body", oid::TEXT, -1, false)],
    )
}

/// Transaction `n` (1-based): two inserts, ids `2n-1` and `2n`.
fn two_rows(rel: &Arc<Relation>, n: u64) -> Transaction {
    let id = 2 * n as i64;
    txn(
        n as u32,
        0x1000 * n + 0x800,
        vec![
            insert(
                rel,
                0x1000 * n,
                vec![Value::Int(id - 1), Value::Text(format!("row {}", id - 1))],
            ),
            insert(
                rel,
                0x1000 * n + 8,
                vec![Value::Int(id), Value::Text(format!("row {id}"))],
            ),
        ],
    )
}

async fn write_flushes(
    sink: &mut LakeSink,
    rel: &Arc<Relation>,
    range: std::ops::RangeInclusive<u64>,
) {
    for n in range {
        sink.accept(Arc::new(batch(vec![two_rows(rel, n)])))
            .await
            .unwrap();
        sink.flush().await.unwrap();
    }
}

fn parquet_files(dir: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect()
}

#[tokio::test]
async fn compaction_keeps_every_row_exactly_once_and_the_history_readable() {
    let dir = temp_dir("compact");
    let rel = events();
    let mut settings = settings(&dir);
    settings.maintenance.compact_min_files = 100; // only on request
    let mut sink = LakeSink::open(settings.clone()).await.unwrap();
    write_flushes(&mut sink, &rel, 1..=6).await;

    let url = table_url(&dir, "public.events");
    let before = load(&url).await;
    let version_before = before.version().unwrap();
    assert_eq!(before.snapshot().unwrap().log_data().num_files(), 6);
    let rows_before = read_rows(&before).await;

    let reports = sink.handle().compact().await.unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let report = &reports[0];
    assert_eq!(
        (report.files_removed, report.files_added, report.rows),
        (6, 1, 12),
        "{report:?}"
    );
    assert_eq!(report.commits, 1);

    let after = load(&url).await;
    assert_eq!(after.version(), Some(version_before + 1));
    assert_eq!(after.snapshot().unwrap().log_data().num_files(), 1);
    let rows_after = read_rows(&after).await;
    assert_eq!(
        ids_of(&rows_after),
        (1..=12).collect::<Vec<_>>(),
        "every row exactly once"
    );
    assert_eq!(
        rows_after, rows_before,
        "the same rows, values and metadata columns"
    );

    // The compaction commit changes no data and says so.
    let info = last_commit_info(&after).await;
    assert_eq!(info["airlock.operation"], "compact");
    let infos: Vec<_> = after.history(Some(1)).try_collect().await.unwrap();
    assert_eq!(infos[0].operation.as_deref(), Some("OPTIMIZE"));
    let log = std::fs::read_to_string(
        dir.join("public.events/_delta_log")
            .join(format!("{:020}.json", version_before + 1)),
    )
    .unwrap();
    assert_eq!(log.matches("\"remove\"").count(), 6);
    assert_eq!(log.matches("\"dataChange\":false").count(), 7, "{log}");
    assert!(!log.contains("\"dataChange\":true"), "{log}");

    // Time travel: every older version still reads as it was.
    for (version, rows) in [(version_before, 12), (2, 4)] {
        let mut old = load(&url).await;
        old.load_version(version).await.unwrap();
        assert_eq!(
            ids_of(&read_rows(&old).await),
            (1..=rows).collect::<Vec<_>>(),
            "version {version}"
        );
    }

    // More writes after the compaction, then the application transaction still holds:
    // a redelivered transaction is skipped.
    write_flushes(&mut sink, &rel, 6..=7).await;
    let after = load(&url).await;
    assert_eq!(
        ids_of(&read_rows(&after).await),
        (1..=14).collect::<Vec<_>>()
    );

    // Nothing left to compact: a second request changes nothing.
    let again = sink.handle().compact().await.unwrap();
    assert_eq!(again[0].commits, 1, "the two new small files merge");
    let again = sink.handle().compact().await.unwrap();
    assert_eq!(again[0].commits, 0);

    // Vacuum with no retention deletes the compacted-away files, and only those.
    drop(sink);
    settings.maintenance.vacuum_retention = Duration::ZERO;
    let sink = LakeSink::open(settings).await.unwrap();
    sink.handle().compact().await.unwrap();
    let table = load(&url).await;
    let live: BTreeSet<String> = table
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .map(|f| f.path().into_owned())
        .collect();
    let on_disk: BTreeSet<String> = parquet_files(&dir.join("public.events"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(on_disk, live, "vacuum leaves exactly the live files");
    assert_eq!(
        ids_of(&read_rows(&table).await),
        (1..=14).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn the_writer_compacts_past_the_threshold_and_checkpoints_every_n_commits() {
    let dir = temp_dir("autocompact");
    let rel = events();
    let mut settings = settings(&dir);
    settings.maintenance.compact_min_files = 3;
    settings.maintenance.checkpoint_interval = 4;
    let mut sink = LakeSink::open(settings).await.unwrap();
    write_flushes(&mut sink, &rel, 1..=3).await;
    let url = table_url(&dir, "public.events");
    assert_eq!(
        load(&url).await.snapshot().unwrap().log_data().num_files(),
        3,
        "not past 3 yet"
    );
    write_flushes(&mut sink, &rel, 4..=4).await;
    let table = load(&url).await;
    assert_eq!(
        table.snapshot().unwrap().log_data().num_files(),
        1,
        "4 small files > 3: compacted"
    );
    assert_eq!(
        ids_of(&read_rows(&table).await),
        (1..=8).collect::<Vec<_>>()
    );
    write_flushes(&mut sink, &rel, 5..=9).await;
    let table = load(&url).await;
    assert_eq!(
        ids_of(&read_rows(&table).await),
        (1..=18).collect::<Vec<_>>()
    );
    let checkpoints = std::fs::read_dir(dir.join("public.events/_delta_log"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".checkpoint."))
        .count();
    assert!(
        checkpoints >= 2,
        "{checkpoints} checkpoints for {:?} versions",
        table.version()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_held_compaction_lock_refuses_a_requested_compaction_and_skips_an_automatic_one() {
    let dir = temp_dir("lock");
    let rel = events();
    let mut settings = settings(&dir);
    settings.maintenance.compact_min_files = 2;
    let other = CompactLock::for_sink(&settings).unwrap();
    assert!(other.acquire("another compactor").await.unwrap());

    let mut sink = LakeSink::open(settings).await.unwrap();
    write_flushes(&mut sink, &rel, 1..=3).await; // past the threshold, but locked
    let url = table_url(&dir, "public.events");
    assert_eq!(
        load(&url).await.snapshot().unwrap().log_data().num_files(),
        3
    );
    let error = sink.handle().compact().await.unwrap_err();
    assert!(error.to_string().contains("another compactor"), "{error}");

    other.release().await.unwrap();
    let reports = sink.handle().compact().await.unwrap();
    assert_eq!(reports[0].files_removed, 3);
    assert!(
        !dir.join("_airlock/compact.lock").exists(),
        "released after use"
    );
    assert_eq!(
        ids_of(&read_rows(&load(&url).await).await),
        (1..=6).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---- Exactly once across a kill --------------------------------------------------------

#[tokio::test]
async fn a_kill_between_the_parquet_upload_and_the_commit_writes_each_row_once() {
    let dir = temp_dir("crash-before");
    let rel = events();
    let mut settings = settings(&dir);
    settings.maintenance.vacuum_retention = Duration::ZERO;
    let mut first = LakeSink::open(settings.clone()).await.unwrap();
    write_flushes(&mut first, &rel, 1..=1).await;
    first.set_crash(Some(CrashPoint::BeforeCommit)).await;
    first
        .accept(Arc::new(batch(vec![two_rows(&rel, 2)])))
        .await
        .unwrap();
    first.flush().await.unwrap_err();
    drop(first); // killed: the Parquet file is uploaded, no commit references it
    let table_dir = dir.join("public.events");
    assert_eq!(
        parquet_files(&table_dir).len(),
        2,
        "one committed file, one orphan"
    );
    let url = table_url(&dir, "public.events");
    assert_eq!(
        ids_of(&read_rows(&load(&url).await).await),
        [1, 2],
        "readers never see the orphan"
    );

    // The slot was not acknowledged past transaction 1: it redelivers 1 and 2.
    let mut second = LakeSink::open(settings).await.unwrap();
    second
        .accept(Arc::new(batch(vec![two_rows(&rel, 1), two_rows(&rel, 2)])))
        .await
        .unwrap();
    assert_eq!(second.flush().await.unwrap(), Some(Lsn(0x2810)));
    let table = load(&url).await;
    assert_eq!(
        ids_of(&read_rows(&table).await),
        [1, 2, 3, 4],
        "each row once"
    );

    // Vacuum (retention zero here) deletes the orphan and nothing live.
    second.handle().compact().await.unwrap();
    let table = load(&url).await;
    assert_eq!(ids_of(&read_rows(&table).await), [1, 2, 3, 4]);
    assert_eq!(
        parquet_files(&table_dir).len(),
        table.snapshot().unwrap().log_data().num_files()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_kill_between_the_commit_and_the_slot_acknowledgement_writes_each_row_once() {
    let dir = temp_dir("crash-after");
    let rel = events();
    let url = table_url(&dir, "public.events");

    // In-process retry: the commit landed but the flush failed; the retry must not
    // commit again.
    let mut sink = LakeSink::open(settings(&dir)).await.unwrap();
    sink.set_crash(Some(CrashPoint::AfterCommit)).await;
    sink.accept(Arc::new(batch(vec![two_rows(&rel, 1)])))
        .await
        .unwrap();
    let error = sink.flush().await.unwrap_err();
    assert!(error.is_transient(), "{error}");
    sink.set_crash(None).await;
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(0x1810)));
    let version = load(&url).await.version();

    // Killed after the commit of transaction 2: no durable LSN reached the slot.
    sink.set_crash(Some(CrashPoint::AfterCommit)).await;
    sink.accept(Arc::new(batch(vec![two_rows(&rel, 2)])))
        .await
        .unwrap();
    sink.flush().await.unwrap_err();
    drop(sink);
    assert_eq!(
        load(&url).await.version(),
        version.map(|v| v + 1),
        "the commit landed"
    );

    // The slot redelivers 2, then 3.
    let mut restarted = LakeSink::open(settings(&dir)).await.unwrap();
    restarted
        .accept(Arc::new(batch(vec![two_rows(&rel, 2), two_rows(&rel, 3)])))
        .await
        .unwrap();
    assert_eq!(restarted.flush().await.unwrap(), Some(Lsn(0x3810)));
    let table = load(&url).await;
    assert_eq!(
        ids_of(&read_rows(&table).await),
        [1, 2, 3, 4, 5, 6],
        "each row once"
    );
    assert_eq!(
        table.version(),
        version.map(|v| v + 2),
        "only transaction 3 was committed again"
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---- Catalog --------------------------------------------------------------------------

#[tokio::test]
async fn the_catalog_lists_tables_columns_tags_rows_and_versions() {
    let dir = temp_dir("catalog");
    let rel = events();
    let mut settings = settings(&dir);
    settings.app_id = "airlock:airlock".into();
    let mut sink = LakeSink::open(settings).await.unwrap();
    let mut b = batch(vec![two_rows(&rel, 1)]);
    b.tables[0].column_tags[1] = vec!["pii".into()];
    sink.accept(Arc::new(b)).await.unwrap();
    sink.flush().await.unwrap();
    write_flushes(&mut sink, &rel, 2..=2).await;

    let toml = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://u@h/db\"\n[sinks.lake]\ntype = \"delta\"\nurl = \"file://{}\"\n\
         [sinks.empty]\ntype = \"delta\"\nurl = \"file://{}/nothing\"\n",
        dir.display(),
        dir.display()
    );
    let config = crate::config::Config::from_toml("t.toml", &toml, &dir).unwrap();
    let catalog = catalog(config.lakes()).await.unwrap();
    let lake = catalog.sinks.iter().find(|s| s.name == "lake").unwrap();
    assert_eq!(lake.tables.len(), 1);
    let t = &lake.tables[0];
    assert_eq!(
        (t.name.as_str(), t.rows, t.files, t.version),
        ("public.events", Some(4), 2, 2)
    );
    let body = t.columns.iter().find(|c| c.name == "body").unwrap();
    assert_eq!(
        (body.data_type.as_str(), body.tags.clone()),
        ("string", vec!["pii".to_owned()])
    );
    let id = t.columns.iter().find(|c| c.name == "id").unwrap();
    assert_eq!(id.data_type, "long");
    assert!(t.columns.iter().any(|c| c.name == "_commit_lsn"));
    assert!(
        t.last_commit_info.contains_key("airlock.lsn_range"),
        "{:?}",
        t.last_commit_info
    );
    let empty = catalog.sinks.iter().find(|s| s.name == "empty").unwrap();
    assert!(empty.tables.is_empty());

    let text = catalog.render_table();
    assert!(
        text.contains("public.events  version 2  rows 4  files 2"),
        "{text}"
    );
    assert!(text.contains("pii"), "{text}");
    let json = catalog.to_json();
    assert_eq!(
        json["sinks"][1]["tables"][0]["columns"][1]["tags"][0], "pii",
        "{json}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Transaction `n` of `rows` inserts (ids `1000n + i`) cut into parts of `part_rows`.
fn parts(rel: &Arc<Relation>, n: u64, rows: u64, part_rows: u64) -> Vec<Transaction> {
    let commit_lsn = 0x10_0000 * n + 0xF_0000;
    let changes: Vec<Change> = (0..rows)
        .map(|i| {
            let id = (1000 * n + i) as i64;
            insert(
                rel,
                0x10_0000 * n + 8 * i,
                vec![Value::Int(id), Value::Text(format!("row {id}"))],
            )
        })
        .collect();
    let mut out = Vec::new();
    let mut offset = 0;
    let mut chunks = changes.chunks(part_rows as usize).peekable();
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let mut t = txn(n as u32, commit_lsn, chunk.to_vec());
        t.meta.part = crate::change::Part { offset, last };
        if !last {
            t.meta.end_lsn = Lsn::ZERO;
        }
        offset += chunk.len() as u64;
        out.push(t);
    }
    out
}

#[tokio::test]
async fn a_transaction_past_the_bounds_is_staged_in_files_and_committed_only_with_its_last_part() {
    let dir = temp_dir("parts");
    let rel = events();
    let url = table_url(&dir, "public.events");
    let mut settings = settings(&dir);
    settings.max_rows = 4;
    let mut sink = LakeSink::open(settings.clone()).await.unwrap();
    write_flushes(&mut sink, &rel, 1..=1).await; // ids 1, 2

    let mut big = parts(&rel, 7, 10, 4).into_iter();
    for _ in 0..2 {
        sink.accept(Arc::new(batch(vec![big.next().unwrap()])))
            .await
            .unwrap();
        assert!(sink.due(), "4 rows buffered");
        assert_eq!(sink.flush().await.unwrap(), None, "nothing completed");
        assert!(sink.holds_open());
        assert!(!sink.due(), "the rows went to staged files");
        assert_eq!(
            ids_of(&read_rows(&load(&url).await).await),
            [1, 2],
            "staged rows are invisible"
        );
    }
    assert_eq!(parquet_files(&dir.join("public.events")).len(), 3);

    // The last part and a whole transaction after it: one commit holds all of it.
    let last = big.next().unwrap();
    assert!(last.meta.completes());
    let after = two_rows(&rel, 3000); // commits after it: ids 5999, 6000
    let end = after.meta.end_lsn;
    sink.accept(Arc::new(batch(vec![last, after])))
        .await
        .unwrap();
    assert_eq!(sink.flush().await.unwrap(), Some(end));
    assert!(!sink.holds_open());
    let table = load(&url).await;
    let mut expected = vec![1, 2, 5999, 6000];
    expected.extend(7000..7010);
    expected.sort();
    assert_eq!(ids_of(&read_rows(&table).await), expected);
    let info = last_commit_info(&table).await;
    assert_eq!(info["airlock.rows"], 12);
    assert_eq!(
        info["airlock.lsn_range"],
        serde_json::json!([Lsn(0x7F_0000).to_string(), Lsn(0xBB_8800).to_string()])
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_kill_inside_a_large_transaction_leaves_only_orphans_and_the_resend_writes_each_row_once()
{
    let dir = temp_dir("parts-crash");
    let rel = events();
    let url = table_url(&dir, "public.events");
    let mut settings = settings(&dir);
    settings.max_rows = 3;
    settings.maintenance.vacuum_retention = Duration::ZERO;
    let mut first = LakeSink::open(settings.clone()).await.unwrap();
    write_flushes(&mut first, &rel, 1..=1).await;
    let mut big = parts(&rel, 5, 8, 3).into_iter();
    first
        .accept(Arc::new(batch(vec![big.next().unwrap()])))
        .await
        .unwrap();
    assert_eq!(first.flush().await.unwrap(), None);
    drop(first); // killed with a part staged

    // The restart resends the whole transaction, in parts.
    let mut second = LakeSink::open(settings).await.unwrap();
    let mut end = None;
    for part in parts(&rel, 5, 8, 3) {
        second.accept(Arc::new(batch(vec![part]))).await.unwrap();
        end = second.flush().await.unwrap().or(end);
    }
    assert_eq!(end, Some(Lsn(0x5F_0010)));
    let mut expected = vec![1, 2];
    expected.extend(5000..5008);
    assert_eq!(ids_of(&read_rows(&load(&url).await).await), expected);

    // Vacuum (retention zero here) deletes the orphan and nothing live.
    second.handle().compact().await.unwrap();
    let table = load(&url).await;
    assert_eq!(ids_of(&read_rows(&table).await), expected);
    assert_eq!(
        parquet_files(&dir.join("public.events")).len(),
        table.snapshot().unwrap().log_data().num_files()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dictionary_encoding_is_kept_only_for_columns_whose_values_repeat() {
    use ::arrow::array::{BooleanArray, Int64Array, LargeStringArray, StringArray};
    let repeating = StringArray::from_iter((0..2000).map(|i| Some(["a", "b", "c"][i % 3])));
    assert_eq!(repeats(&repeating), Some(true));
    let distinct = StringArray::from_iter((0..2000).map(|i| Some(format!("row {i}"))));
    assert_eq!(repeats(&distinct), Some(false));
    let large = LargeStringArray::from_iter((0..2000).map(|i| Some(format!("row {i}"))));
    assert_eq!(repeats(&large), Some(false));
    let keys = Int64Array::from_iter_values(0..2000);
    assert_eq!(repeats(&keys), Some(false));
    // Only the first sampled values count, nulls not at all, and a slice starts where
    // it starts: here 600 distinct values, then only repeats.
    let ids = Int64Array::from_iter((0..3000).map(|i| match i {
        i if i % 2 == 1 => None,
        i if i < 1200 => Some(i),
        _ => Some(7),
    }));
    assert_eq!(repeats(&ids), Some(false), "600 distinct of 600 present");
    assert_eq!(repeats(&ids.slice(1200, 1800)), Some(true));
    assert_eq!(repeats(&BooleanArray::from(vec![true, false])), None);
}
