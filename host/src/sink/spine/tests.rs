//! The spine sink against the built-in spine and against a fake audit-stream-py (no
//! batch endpoint, no idempotency) that can fail on purpose.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json as JsonBody, Router};
use serde_json::{Value as Json, json};
use tokio::sync::{mpsc, watch};

use super::*;
use crate::change::{Change, Column, Relation, ReplicaIdentity, Transaction, TxnMeta, Value, oid};
use crate::sink::drive;

fn relation() -> Arc<Relation> {
    let column = |name: &str, type_oid, key| Column {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        key,
    };
    Arc::new(Relation {
        comment_classes: Default::default(),
        oid: 1,
        schema: "public".into(),
        name: "accounts".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("id", oid::INT8, true),
            column("email", oid::TEXT, false),
            column("note", oid::TEXT, false),
        ],
    })
}

fn insert(relation: &Arc<Relation>, lsn: u64, id: i64, email: &str) -> Change {
    Change {
        identity: None,
        relation: relation.clone(),
        op: Op::Insert,
        lsn: Lsn(lsn),
        new: Some(vec![Value::Int(id), Value::Text(email.into()), Value::Null]),
        old: None,
    }
}

/// Transaction `n` (commit LSN n×1000) with `rows` inserts, every row routed to `spine`.
fn batch(n: u64, rows: i64) -> Arc<Batch> {
    let r = relation();
    let changes = (0..rows)
        .map(|i| insert(&r, n * 1000 + i as u64, n as i64 * 100 + i, "x@y"))
        .collect();
    let txn = Transaction {
        meta: TxnMeta {
            xid: n as u32,
            commit_lsn: Lsn(n * 1000 + 999),
            end_lsn: Lsn(n * 1000 + 1000),
            commit_ts: 1_704_067_200_000_000,
            part: crate::change::Part::WHOLE,
            copied: None,
        },
        changes,
    };
    let mut b = Batch::from_transactions([txn]);
    b.pipeline = "p1".into();
    for row in &mut b.rows {
        row.routes.push("spine".into());
    }
    Arc::new(b)
}

async fn builtin(dir: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let dir = crate::private_files::TestDir::new(&format!("spine-sink-{dir}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        crate::spine::server::serve(&dir, listener, None, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        // The spine's directory goes when the spine stops.
        drop(dir);
    });
    (url, stop)
}

/// audit-stream-py's behaviour: `POST /events` only, no dedup; can answer 503 to the
/// next `fail` requests, storing the event anyway when `store_failed` (a lost answer).
#[derive(Clone, Default)]
struct Fake {
    events: Arc<Mutex<Vec<Json>>>,
    fail: Arc<AtomicUsize>,
    store_failed: bool,
}

async fn fake(fake: Fake) -> String {
    async fn publish(
        State(f): State<Fake>,
        JsonBody(mut e): JsonBody<Json>,
    ) -> (StatusCode, JsonBody<Json>) {
        let failing = f.fail.load(Ordering::SeqCst) > 0;
        if failing {
            f.fail.fetch_sub(1, Ordering::SeqCst);
        }
        if !failing || f.store_failed {
            let mut events = f.events.lock().unwrap();
            e["event_id"] = json!(events.len() + 1);
            events.push(e.clone());
        }
        if failing {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                JsonBody(json!({"detail": "busy"})),
            )
        } else {
            (StatusCode::CREATED, JsonBody(e))
        }
    }
    async fn query(
        State(f): State<Fake>,
        Query(q): Query<std::collections::HashMap<String, String>>,
    ) -> JsonBody<Json> {
        let limit: usize = q["limit"].parse().unwrap();
        let events = f.events.lock().unwrap();
        let matching: Vec<Json> = events
            .iter()
            .filter(|e| q.get("source").is_none_or(|s| e["source"] == **s))
            .cloned()
            .collect();
        JsonBody(Json::Array(
            matching[matching.len().saturating_sub(limit)..].to_vec(),
        ))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/events", post(publish).get(query))
        .with_state(fake);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A key of its own for each `name`, the same for every call (a restarted sink must
/// find its events).
fn key_named(name: &str) -> Key {
    use sha2::Digest as _;
    Key::from_bytes(sha2::Sha256::digest(format!("airlock test key {name}")).into())
}

/// The key of the tests' slot `airlock`.
fn key() -> Key {
    key_named("airlock")
}

fn settings(url: &str) -> SpineSettings {
    let mut s = SpineSettings::new("spine", url);
    s.request_timeout = Duration::from_secs(5);
    s.key = Some(key());
    s
}

/// This sink's id of the change at `(commit_lsn, index)`.
fn our_id(source: &str, commit_lsn: u64, index: u32) -> String {
    event_id(
        &key(),
        "airlock",
        source,
        Position {
            commit_lsn: Lsn(commit_lsn),
            index,
        },
    )
}

#[test]
fn event_ids_are_stable_signed_and_bound_to_slot_source_and_key() {
    let p = Position {
        commit_lsn: Lsn(0x16B_3748),
        index: 3,
    };
    let id = event_id(&key(), "airlock", "airlock", p);
    let tag = &hex::encode(Sha256::digest(b"airlock"))[..8];
    let prefix = format!("00000000016B3748-000003-{tag}-");
    assert!(id.starts_with(&prefix), "{id}");
    let mac = &id[prefix.len()..];
    assert!(
        mac.len() == 32 && mac.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(event_id(&key(), "airlock", "airlock", p), id, "stable");
    assert_eq!(parse_event_id(&key(), "airlock", "airlock", &id), Some(p));

    // Another slot, key or source does not verify, nor does any edit of the id.
    let other_key = key_named("other");
    assert_eq!(parse_event_id(&key(), "other_slot", "airlock", &id), None);
    assert_eq!(parse_event_id(&other_key, "airlock", "airlock", &id), None);
    assert_eq!(parse_event_id(&key(), "airlock", "other-source", &id), None);
    assert_ne!(event_id(&key(), "other_slot", "airlock", p), id);
    assert_ne!(event_id(&other_key, "airlock", "airlock", p), id);
    let later = id.replacen("000003", "000004", 1);
    assert_eq!(parse_event_id(&key(), "airlock", "airlock", &later), None);
    let higher = id.replacen("00000000016B3748", "FFFFFFFFFFFFFFFF", 1);
    assert_eq!(parse_event_id(&key(), "airlock", "airlock", &higher), None);
    let upper = format!("{prefix}{}", mac.to_uppercase());
    assert_eq!(parse_event_id(&key(), "airlock", "airlock", &upper), None);
    // The unsigned ids of earlier versions, and anything else, are not ours.
    assert_eq!(
        parse_event_id(
            &key(),
            "airlock",
            "airlock",
            &format!("FFFFFFFFFFFFFFFF-999999-{tag}")
        ),
        None
    );
    assert_eq!(parse_event_id(&key(), "airlock", "airlock", "42"), None);
    assert_eq!(parse_event_id(&key(), "airlock", "airlock", ""), None);
    // The source is length-prefixed in the MAC: moving bytes between slot and source
    // gives another id.
    assert_ne!(
        event_id(&key(), "ab", "c", p).rsplit('-').next(),
        event_id(&key(), "a", "bc", p).rsplit('-').next()
    );
    assert!(
        Position {
            commit_lsn: Lsn(5),
            index: 9
        } < Position {
            commit_lsn: Lsn(6),
            index: 0
        }
    );
}

#[test]
fn watch_patterns_match_schema_and_table_globs() {
    let r = relation();
    assert!(Watch::new("public.accounts", "other", "s").matches(&r));
    assert!(Watch::new("accounts", "other", "s").matches(&r));
    assert!(Watch::new("pub*.acc?unts", "other", "s").matches(&r));
    assert!(Watch::new("*.*", "other", "s").matches(&r));
    assert!(!Watch::new("auth.*", "other", "s").matches(&r));
    assert!(!Watch::new("account", "other", "s").matches(&r));
    assert!(glob("a*b*c", "aXbYbc") && !glob("a*b", "ab_") && glob("*", ""));
}

#[tokio::test]
async fn bad_kinds_are_refused_at_open_all_at_once() {
    let mut s = settings("http://127.0.0.1:9/events");
    s.default_kind = "watch_drifed".into();
    s.watch = vec![
        ("public.*".into(), "data_access".into(), "airlock".into()),
        ("x".into(), "other".into(), "".into()),
    ];
    let Err(error) = SpineSink::open(s).await else {
        panic!("opened")
    };
    let message = error.to_string();
    assert!(!error.is_transient());
    assert!(message.contains("default_kind: kind `watch_drifed` is not one of the spine's kinds (did you mean `watch_drifted`?)"), "{message}");
    assert!(
        message.contains("watch[0] (`public.*`): kind `data_access`"),
        "{message}"
    );
    assert!(
        message.contains("watch[1] (`x`): the source is empty"),
        "{message}"
    );
}

#[tokio::test]
async fn events_carry_the_row_and_the_change_metadata() {
    let (url, _stop) = builtin("payload").await;
    let mut s = settings(&url);
    s.watch = vec![(
        "public.acc*".into(),
        "watch_drifted".into(),
        "accounts-svc".into(),
    )];
    let mut sink = SpineSink::open(s).await.unwrap();

    let r = relation();
    let update = Change {
        identity: None,
        relation: r.clone(),
        op: Op::Update,
        lsn: Lsn(0x20),
        new: Some(vec![
            Value::Int(1),
            Value::Text("5f2c…masked".into()),
            Value::UnchangedToast,
        ]),
        old: Some(vec![Value::Int(1), Value::Null, Value::Null]),
    };
    let delete = Change {
        identity: None,
        relation: r.clone(),
        op: Op::Delete,
        lsn: Lsn(0x30),
        new: None,
        old: Some(vec![Value::Int(2), Value::Null, Value::Null]),
    };
    let txn = Transaction {
        meta: TxnMeta {
            xid: 77,
            commit_lsn: Lsn(0x40),
            end_lsn: Lsn(0x48),
            commit_ts: 1_704_067_200_123_456,
            part: crate::change::Part::WHOLE,
            copied: None,
        },
        changes: vec![update, delete],
    };
    let mut b = Batch::from_transactions([txn]);
    b.pipeline = "abc123".into();
    b.tables[0].column_tags[1] = vec!["pii".into()];
    for row in &mut b.rows {
        row.routes.push("spine".into());
    }
    b.rows[0].tags.push("restricted".into());
    b.rows[1]
        .annotations
        .push((KIND_ANNOTATION.into(), "request_denied".into()));
    b.rows[1]
        .annotations
        .push((SOURCE_ANNOTATION.into(), "guest-src".into()));
    assert!(sink.accept(Arc::new(b)).await.unwrap());
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(0x48)));

    let client = SpineClient::new(&url, None, Duration::from_secs(5)).unwrap();
    let events = client.events(None, None, 10).await.unwrap();
    assert_eq!(events.len(), 2);
    let (u, d) = (&events[0], &events[1]);
    assert_eq!(
        (u["kind"].as_str(), u["source"].as_str()),
        (Some("watch_drifted"), Some("accounts-svc"))
    );
    assert_eq!(
        (d["kind"].as_str(), d["source"].as_str()),
        (Some("request_denied"), Some("guest-src"))
    );
    assert_eq!(u["timestamp"], "2024-01-01T00:00:00.123456Z");
    let p = &u["payload"];
    assert_eq!(p["table"], "public.accounts");
    assert_eq!(p["operation"], "UPDATE");
    assert_eq!(
        p["new"],
        json!({"id": 1, "email": "5f2c…masked", "note": {"$unchanged": true}})
    );
    assert_eq!(p["old"], json!({"id": 1}));
    assert_eq!(
        (
            p["lsn"].as_str(),
            p["commit_lsn"].as_str(),
            p["xid"].as_u64()
        ),
        (Some("0/20"), Some("0/40"), Some(77))
    );
    assert_eq!(
        (p["pipeline"].as_str(), &p["tags"]),
        (Some("abc123"), &json!(["restricted"]))
    );
    assert_eq!(p["column_tags"], json!({"email": ["pii"]}));
    assert_eq!(p["event_id"], our_id("accounts-svc", 0x40, 0));
    assert_eq!(d["payload"]["operation"], "DELETE");
    assert_eq!(d["payload"]["old"], json!({"id": 2}));
    assert!(d["payload"].get("new").is_none());
    assert_eq!(d["payload"]["event_id"], our_id("guest-src", 0x40, 1));
}

#[tokio::test]
async fn unrouted_and_dropped_rows_are_not_sent_but_keep_their_index() {
    let (url, _stop) = builtin("routes").await;
    let mut sink = SpineSink::open(settings(&url)).await.unwrap();
    let mut b = (*batch(1, 3)).clone();
    b.rows[0].routes.clear();
    b.rows[1].dropped = true;
    assert!(sink.accept(Arc::new(b)).await.unwrap());
    sink.flush().await.unwrap();
    let events = SpineClient::new(&url, None, Duration::from_secs(5))
        .unwrap()
        .events(None, None, 10)
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["payload"]["event_id"], our_id("airlock", 1999, 2));
    // A batch with nothing for the spine keeps nothing.
    let mut b = (*batch(2, 1)).clone();
    b.rows[0].routes = vec!["default".into()];
    assert!(!sink.accept(Arc::new(b)).await.unwrap());
}

#[tokio::test]
async fn an_unknown_kind_from_a_guest_stops_at_accept() {
    let (url, _stop) = builtin("guest-kind").await;
    let mut sink = SpineSink::open(settings(&url)).await.unwrap();
    let mut b = (*batch(1, 1)).clone();
    b.rows[0]
        .annotations
        .push((KIND_ANNOTATION.into(), "data_access".into()));
    let error = sink.accept(Arc::new(b)).await.unwrap_err();
    assert!(!error.is_transient());
    assert!(
        error
            .to_string()
            .contains("has spine.kind `data_access`, which is not one of the spine's kinds"),
        "{error}"
    );
}

#[tokio::test]
async fn a_restarted_sink_skips_what_the_spine_already_has() {
    for spine in ["builtin", "fake"] {
        let (url, _stop) = if spine == "builtin" {
            builtin("restart").await
        } else {
            (
                fake(Fake::default()).await,
                tokio::sync::oneshot::channel().0,
            )
        };
        let mut sink = SpineSink::open(settings(&url)).await.unwrap();
        for n in 1..=3 {
            sink.accept(batch(n, 2)).await.unwrap();
        }
        sink.flush().await.unwrap();
        // A new sink (after a crash) gets transactions 2..5 again.
        let mut sink = SpineSink::open(settings(&url)).await.unwrap();
        assert_eq!(
            sink.delivered(),
            Some(Position {
                commit_lsn: Lsn(3999),
                index: 1
            }),
            "{spine}"
        );
        for n in 2..=5 {
            sink.accept(batch(n, 2)).await.unwrap();
        }
        assert_eq!(sink.pending_events(), 4, "{spine}");
        sink.flush().await.unwrap();
        let events = SpineClient::new(&url, None, Duration::from_secs(5))
            .unwrap()
            .events(None, None, 100)
            .await
            .unwrap();
        let ids: Vec<u64> = events
            .iter()
            .map(|e| e["payload"]["new"]["id"].as_u64().unwrap())
            .collect();
        assert_eq!(
            ids,
            vec![100, 101, 200, 201, 300, 301, 400, 401, 500, 501],
            "{spine}"
        );
    }
}

#[tokio::test]
async fn server_errors_are_retried_without_loss_or_duplicates() {
    // Answers lost after the event was stored: the resync must find them.
    let f = Fake {
        store_failed: true,
        ..Fake::default()
    };
    f.fail.store(2, Ordering::SeqCst);
    let url = fake(f.clone()).await;
    let sink = SpineSink::open(settings(&url)).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    let (durable, mut durable_rx) = watch::channel(Lsn::ZERO);
    let task = tokio::spawn(drive(sink, rx, durable));
    for n in 1..=4 {
        tx.send(batch(n, 3)).await.unwrap();
    }
    drop(tx);
    task.await.unwrap().unwrap();
    assert_eq!(*durable_rx.borrow_and_update(), Lsn(5000));
    let ids: Vec<u64> = f
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e["payload"]["new"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![100, 101, 102, 200, 201, 202, 300, 301, 302, 400, 401, 402]
    );
}

#[tokio::test]
async fn an_unreachable_spine_is_transient_and_keeps_everything() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/events");
    let mut sink = SpineSink::open(settings(&url))
        .await
        .expect("opens while the spine is down");
    sink.accept(batch(1, 2)).await.unwrap();
    let error = sink.flush().await.unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(error.to_string().contains("unreachable"), "{error}");
    assert_eq!(sink.pending_events(), 2);
}

#[tokio::test]
async fn a_refused_request_is_definite_with_the_spines_answer() {
    let dir_guard = crate::private_files::TestDir::new("spine-sink-token");
    let dir = dir_guard.to_path_buf();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move {
        crate::spine::server::serve(&dir, listener, Some("t0ken".into()), std::future::pending())
            .await
    });
    let error = SpineSink::open(settings(&url))
        .await
        .err()
        .expect("refused");
    assert!(!error.is_transient());
    assert!(
        error.to_string().contains("401 Unauthorized")
            && error.to_string().contains("bearer token"),
        "{error}"
    );
    let mut s = settings(&url);
    s.token = Some("t0ken".into());
    let mut sink = SpineSink::open(s).await.unwrap();
    sink.accept(batch(1, 1)).await.unwrap();
    sink.flush().await.unwrap();
}

#[tokio::test]
async fn a_sink_trusts_only_the_events_of_its_own_slot_and_key() {
    let url = fake(Fake::default()).await;
    let mut sink = SpineSink::open(settings(&url)).await.unwrap();
    sink.accept(batch(1, 2)).await.unwrap();
    sink.flush().await.unwrap();
    let found = Some(Position {
        commit_lsn: Lsn(1999),
        index: 1,
    });
    assert_eq!(
        SpineSink::open(settings(&url)).await.unwrap().delivered(),
        found
    );
    // Another slot with the same key, or another key for the same slot: nothing of the
    // first sink's counts (its events would be sent again, never skipped).
    let mut other_slot = settings(&url);
    other_slot.slot = "other_slot".into();
    assert_eq!(SpineSink::open(other_slot).await.unwrap().delivered(), None);
    let mut other_key = settings(&url);
    other_key.key = Some(key_named("other"));
    assert_eq!(SpineSink::open(other_key).await.unwrap().delivered(), None);
}

#[tokio::test]
async fn dead_letter_files_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let refusing = Router::new().route(
        "/events",
        post(|| async {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                JsonBody(json!({"detail": "no"})),
            )
        })
        .get(|| async { JsonBody(json!([])) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, refusing).await.unwrap() });
    let base = crate::private_files::TestDir::new("spine-sink-dead-letter");
    let mut s = settings(&url);
    s.dead_letter_dir = Some(base.join("quarantine/spine"));
    let mut sink = SpineSink::open(s).await.unwrap();
    sink.accept(batch(1, 1)).await.unwrap();
    sink.flush().await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&base.join("quarantine")), 0o700);
    assert_eq!(mode(&base.join("quarantine/spine")), 0o700);
    let file = base.join("quarantine/spine/spine.jsonl");
    assert_eq!(mode(&file), 0o600);
    assert!(std::fs::read_to_string(&file).unwrap().contains("x@y"));
}

/// Regression: the spine's URL was shown as configured in errors, logs and `/status`,
/// so `http://user:password@host/events` printed the password.
#[tokio::test]
async fn credentials_in_the_spine_url_are_never_shown() {
    let client = SpineClient::new(
        "http://ops:hunter2@127.0.0.1:1/events",
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(client.shown_url(), "http://***@127.0.0.1:1/events");
    let error = client
        .publish(Bytes::from_static(b"{}"))
        .await
        .expect_err("nothing listens on port 1");
    let text = error.to_string();
    assert!(error.is_transient(), "{text}");
    assert!(
        !text.contains("hunter2") && text.contains("***@127.0.0.1:1"),
        "{text}"
    );
}

#[tokio::test]
async fn the_policy_is_registered_once_per_change_and_each_denial_once_across_restarts() {
    // audit-stream-py's behaviour: no idempotency, so the sink alone keeps them single.
    let store = Fake::default();
    let url = fake(store.clone()).await;
    let with_policy = |version: &str| {
        let mut s = settings(&url);
        s.policy = Some(PolicyRecord {
            version: version.into(),
            bundle: json!({"version": version, "default": "deny"}),
        });
        s
    };
    let of_kind = |kind: &str| -> Vec<Json> {
        let events = store.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e["kind"] == kind)
            .cloned()
            .collect()
    };
    let denial = || crate::policy::Denial::Column {
        table: "public.accounts".into(),
        column: "ssn".into(),
        key: false,
    };
    let with_denial = |n: u64| {
        let mut b = (*batch(n, 1)).clone();
        b.denials.push(denial());
        Arc::new(b)
    };

    // At open, before any row: the policy in force.
    let mut sink = SpineSink::open(with_policy("aaaaaaaaaaaa")).await.unwrap();
    let bundles = of_kind(BUNDLE_KIND);
    assert_eq!(bundles.len(), 1);
    assert_eq!(bundles[0]["source"], POLICY_SOURCE);
    assert_eq!(bundles[0]["payload"]["policy"], "aaaaaaaaaaaa");
    assert_eq!(bundles[0]["payload"]["previous"], Json::Null);
    assert_eq!(bundles[0]["payload"]["bundle"]["default"], "deny");
    // A denial goes before the rows of its batch, once.
    assert!(sink.accept(with_denial(1)).await.unwrap());
    assert!(sink.accept(with_denial(2)).await.unwrap());
    assert_eq!(sink.flush().await.unwrap(), Some(Lsn(3000)));
    let events = store.events.lock().unwrap().clone();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, [BUNDLE_KIND, DENIED_KIND, "other", "other"]);
    let denied = &events[1]["payload"];
    assert_eq!(
        (&denied["table"], &denied["column"], &denied["action"]),
        (&json!("public.accounts"), &json!("ssn"), &json!("drop"))
    );
    assert!(
        denied["event_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("policy-") && id.len() == 39),
        "{denied}"
    );

    // A restart under the same policy: no second registration, the denial (seen
    // again by a fresh gate) not sent again, the rows after it delivered.
    let mut again = SpineSink::open(with_policy("aaaaaaaaaaaa")).await.unwrap();
    assert!(again.accept(with_denial(3)).await.unwrap());
    assert_eq!(again.flush().await.unwrap(), Some(Lsn(4000)));
    assert_eq!(of_kind(BUNDLE_KIND).len(), 1);
    assert_eq!(of_kind(DENIED_KIND).len(), 1);
    assert_eq!(of_kind("other").len(), 3);

    // Another policy: registered, naming the one before; its denials are its own.
    let mut changed = SpineSink::open(with_policy("bbbbbbbbbbbb")).await.unwrap();
    assert!(changed.accept(with_denial(4)).await.unwrap());
    changed.flush().await.unwrap();
    let bundles = of_kind(BUNDLE_KIND);
    assert_eq!(bundles.len(), 2);
    assert_eq!(bundles[1]["payload"]["previous"], "aaaaaaaaaaaa");
    assert_eq!(of_kind(DENIED_KIND).len(), 2);
    // And back: the change back is a change too.
    SpineSink::open(with_policy("aaaaaaaaaaaa")).await.unwrap();
    let bundles = of_kind(BUNDLE_KIND);
    assert_eq!(bundles.len(), 3);
    assert_eq!(bundles[2]["payload"]["previous"], "bbbbbbbbbbbb");

    // A spine whose kinds lack the policy's is refused at open.
    let mut s = with_policy("aaaaaaaaaaaa");
    s.kinds = vec!["other".into()];
    let Err(error) = SpineSink::open(s).await else {
        panic!("opened")
    };
    assert!(
        error
            .to_string()
            .contains("kinds: `policy_bundle_registered` is missing"),
        "{error}"
    );
}
