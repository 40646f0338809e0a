//! The spine sink against real spines on 127.0.0.1 — the built-in spine and the real
//! audit-stream-py — driven with hand-built batches (no PostgreSQL): order, masked
//! values untouched, a spine that goes away and comes back, a 1 MB row, kinds checked
//! at startup, tampering found by `verify`, and `airlock spine serve` under kill -9.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock::change::Lsn;
use airlock::pipeline::batch::Batch;
use airlock::secrets::Key;
use airlock::sink::spine::{SpineSettings, SpineSink};
use airlock::sink::{SinkError, drive};
use airlock::spine::server::log;
use airlock_tests::spine_support::*;
use airlock_tests::temp_dir;
use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::sync::{mpsc, watch};

/// The key of the tests' slot, in a key file of this test process.
fn key() -> Key {
    static KEY: std::sync::OnceLock<Key> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        airlock::secrets::Key::load_or_create(&temp_dir("spine-key").join("spine-airlock.key"))
            .expect("spine key")
    })
    .clone()
}

/// The settings of the tests' sink: slot `airlock` with one key, as from its key file,
/// so that a restarted sink finds what the earlier one delivered.
fn settings(url: &str) -> SpineSettings {
    let mut s = SpineSettings::new("spine", url);
    s.slot = "airlock".into();
    s.key = Some(key());
    s.flush_interval = Duration::from_millis(50);
    s.max_events = 100;
    s.request_timeout = Duration::from_secs(5);
    s
}

/// A spine sink run by the real driver, as the pipeline runs it.
struct Driven {
    tx: mpsc::Sender<Arc<Batch>>,
    durable: watch::Receiver<Lsn>,
    task: tokio::task::JoinHandle<Result<(), SinkError>>,
}

impl Driven {
    async fn start(settings: SpineSettings) -> Result<Driven> {
        let sink = SpineSink::open(settings).await?;
        let (tx, rx) = mpsc::channel(64);
        let (durable_tx, durable) = watch::channel(Lsn::ZERO);
        let task = tokio::spawn(drive(sink, rx, durable_tx));
        Ok(Driven { tx, durable, task })
    }

    async fn send(&self, batch: Arc<Batch>) {
        self.tx.send(batch).await.expect("the sink is running");
    }

    /// Waits until the sink reports `lsn` durable.
    async fn wait(&mut self, lsn: Lsn, timeout: Duration) -> Result<()> {
        let reached = tokio::time::timeout(timeout, self.durable.wait_for(|d| *d >= lsn))
            .await
            .map(|r| r.map(|_| ()));
        match reached {
            Ok(result) => Ok(result?),
            Err(_) => bail!(
                "{lsn} not durable within {timeout:?}; at {}",
                *self.durable.borrow()
            ),
        }
    }

    async fn finish(self) -> Result<(), SinkError> {
        drop(self.tx);
        self.task.await.expect("sink task")
    }
}

/// The ids of the accounts in the spine's events of `source`, in spine order.
async fn delivered_ids(url: &str, source: &str) -> Result<Vec<u64>> {
    let events = client(url).events(None, Some(source), 100_000).await?;
    events
        .iter()
        .map(|e| {
            e["payload"]["new"]["id"]
                .as_u64()
                .with_context(|| format!("event without payload.new.id: {e}"))
        })
        .collect()
}

fn ids_of(batches: impl IntoIterator<Item = u64>, rows: u64) -> Vec<u64> {
    batches
        .into_iter()
        .flat_map(|n| (0..rows).map(move |i| n * 1000 + i))
        .collect()
}

async fn events_arrive_in_order_with_masked_values(url: &str) -> Result<()> {
    let mut sink = Driven::start(settings(url)).await?;
    for n in 1..=40 {
        sink.send(accounts_batch(n, 5, "n")).await;
    }
    sink.wait(accounts_end(40), Duration::from_secs(60)).await?;
    sink.finish().await?;

    let events = client(url).events(None, Some("airlock"), 100_000).await?;
    let ids: Vec<u64> = events
        .iter()
        .map(|e| e["payload"]["new"]["id"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(ids, ids_of(1..=40, 5), "events in commit order, once each");
    for e in &events {
        let id = e["payload"]["new"]["id"].as_u64().unwrap();
        assert_eq!(e["kind"], "other");
        assert_eq!(e["payload"]["operation"], "INSERT");
        assert_eq!(e["payload"]["table"], "public.accounts");
        assert_eq!(
            e["payload"]["new"]["email"],
            masked(&format!("user{id}@example.com")),
            "masked value untouched"
        );
        assert_eq!(e["payload"]["column_tags"], json!({"email": ["pii"]}));
    }
    let text = serde_json::to_string(&events)?;
    assert!(
        !text.contains("@example.com"),
        "no unmasked address reaches the spine"
    );
    let event_ids: HashSet<&str> = events
        .iter()
        .filter_map(|e| e["payload"]["event_id"].as_str())
        .collect();
    assert_eq!(event_ids.len(), events.len(), "event ids are unique");
    let verified = client(url).get("/verify").await?;
    assert_eq!(verified["valid"], true, "{verified}");
    Ok(())
}

#[tokio::test]
async fn builtin_events_arrive_in_order_with_masked_values() -> Result<()> {
    let spine_dir = temp_dir("spine-order");
    let spine = BuiltinSpine::start(&spine_dir).await;
    events_arrive_in_order_with_masked_values(&spine.url).await?;
    spine.stop().await;
    Ok(())
}

#[tokio::test]
async fn audit_stream_py_events_arrive_in_order_with_masked_values() -> Result<()> {
    let spine = AuditStreamPy::start().await;
    events_arrive_in_order_with_masked_values(&spine.url).await?;
    spine.stop().await;
    Ok(())
}

#[tokio::test]
async fn builtin_spine_down_then_up_loses_and_duplicates_nothing() -> Result<()> {
    let dir = temp_dir("spine-down");
    let spine = BuiltinSpine::start(&dir).await;
    let (addr, url) = (spine.addr, spine.url.clone());
    let mut sink = Driven::start(settings(&url)).await?;
    for n in 1..=5 {
        sink.send(accounts_batch(n, 3, "")).await;
    }
    sink.wait(accounts_end(5), Duration::from_secs(30)).await?;

    spine.stop().await;
    for n in 6..=10 {
        sink.send(accounts_batch(n, 3, "")).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        *sink.durable.borrow() < accounts_end(6),
        "nothing is acknowledged while the spine is down"
    );
    let spine = BuiltinSpine::start_on(&dir, addr).await;
    sink.wait(accounts_end(10), Duration::from_secs(60)).await?;
    assert_eq!(delivered_ids(&url, "airlock").await?, ids_of(1..=10, 3));

    // The pipeline restarts from an older checkpoint and sends transactions 4..12 again.
    sink.finish().await?;
    let mut sink = Driven::start(settings(&url)).await?;
    for n in 4..=12 {
        sink.send(accounts_batch(n, 3, "")).await;
    }
    sink.wait(accounts_end(12), Duration::from_secs(30)).await?;
    sink.finish().await?;
    assert_eq!(delivered_ids(&url, "airlock").await?, ids_of(1..=12, 3));
    assert_eq!(client(&url).get("/verify").await?["valid"], true);
    spine.stop().await;
    Ok(())
}

#[tokio::test]
async fn audit_stream_py_down_then_up_loses_and_duplicates_nothing() -> Result<()> {
    let spine = AuditStreamPy::start().await;
    let (port, url) = (spine.port, spine.url.clone());
    let mut sink = Driven::start(settings(&url)).await?;
    for n in 1..=5 {
        sink.send(accounts_batch(n, 3, "")).await;
    }
    sink.wait(accounts_end(5), Duration::from_secs(30)).await?;
    assert_eq!(delivered_ids(&url, "airlock").await?, ids_of(1..=5, 3));

    spine.stop().await;
    for n in 6..=10 {
        sink.send(accounts_batch(n, 3, "")).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        *sink.durable.borrow() < accounts_end(6),
        "nothing is acknowledged while the spine is down"
    );
    // audit-stream-py keeps events in memory: it comes back empty, and gets everything
    // the sink accepted while it was away, once.
    let spine = AuditStreamPy::start_on(port).await;
    sink.wait(accounts_end(10), Duration::from_secs(60)).await?;
    assert_eq!(delivered_ids(&url, "airlock").await?, ids_of(6..=10, 3));

    // The pipeline restarts from an older checkpoint and sends transactions 4..12 again:
    // the sink asks audit-stream-py for its last event and sends only 11 and 12.
    sink.finish().await?;
    let mut sink = Driven::start(settings(&url)).await?;
    for n in 4..=12 {
        sink.send(accounts_batch(n, 3, "")).await;
    }
    sink.wait(accounts_end(12), Duration::from_secs(30)).await?;
    sink.finish().await?;
    assert_eq!(delivered_ids(&url, "airlock").await?, ids_of(6..=12, 3));
    spine.stop().await;
    Ok(())
}

async fn a_one_megabyte_row_is_delivered_whole(url: &str) -> Result<()> {
    let note = format!("é{}ü", "x".repeat(1 << 20));
    let mut sink = Driven::start(settings(url)).await?;
    sink.send(accounts_batch(1, 1, "small")).await;
    sink.send(accounts_batch(2, 2, &note)).await;
    sink.send(accounts_batch(3, 1, "small")).await;
    sink.wait(accounts_end(3), Duration::from_secs(60)).await?;
    sink.finish().await?;
    let events = client(url).events(None, Some("airlock"), 100).await?;
    assert_eq!(events.len(), 4);
    for e in &events[1..3] {
        let got = e["payload"]["new"]["note"].as_str().context("note")?;
        assert_eq!(got.len(), note.len());
        assert!(got == note, "the 1 MB value arrives byte for byte");
    }
    Ok(())
}

#[tokio::test]
async fn builtin_a_one_megabyte_row_is_delivered_whole() -> Result<()> {
    let dir = temp_dir("spine-big");
    let spine = BuiltinSpine::start(&dir).await;
    a_one_megabyte_row_is_delivered_whole(&spine.url).await?;
    spine.stop().await;
    assert!(airlock::spine::server::verify(&dir)?.valid);
    Ok(())
}

#[tokio::test]
async fn audit_stream_py_a_one_megabyte_row_is_delivered_whole() -> Result<()> {
    let spine = AuditStreamPy::start().await;
    a_one_megabyte_row_is_delivered_whole(&spine.url).await?;
    spine.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_bad_kind_is_refused_at_startup() -> Result<()> {
    let spine = AuditStreamPy::start().await;
    let mut s = settings(&spine.url);
    s.watch = vec![(
        "public.accounts".into(),
        "watch_drifed".into(),
        "accounts".into(),
    )];
    let Err(error) = SpineSink::open(s).await else {
        bail!("a typo in a kind must fail at startup")
    };
    assert!(!error.is_transient());
    let message = error.to_string();
    assert!(
        message.contains(
            "watch[0] (`public.accounts`): kind `watch_drifed` is not one of the spine's kinds"
        ),
        "{message}"
    );
    assert!(
        message.contains("did you mean `watch_drifted`?"),
        "{message}"
    );

    // A kind the sink was told to allow but the spine refuses: a definite error that
    // stops the pipeline, with the spine's answer.
    let mut s = settings(&spine.url);
    s.kinds.push("data_access".into());
    s.default_kind = "data_access".into();
    let sink = Driven::start(s).await?;
    sink.send(accounts_batch(1, 1, "")).await;
    let error = tokio::time::timeout(Duration::from_secs(30), sink.finish())
        .await?
        .expect_err("refused");
    assert!(!error.is_transient());
    let message = error.to_string();
    assert!(
        message.contains("422 Unprocessable Entity") && message.contains("literal_error"),
        "{message}"
    );
    assert!(
        message.contains("table public.accounts, kind data_access"),
        "{message}"
    );
    spine.stop().await;
    Ok(())
}

#[tokio::test]
async fn audit_stream_py_events_verify_with_the_builtin_hash_chain() -> Result<()> {
    // The same chain construction: our canonical JSON reproduces audit-stream-py's hashes.
    let spine = AuditStreamPy::start().await;
    let mut sink = Driven::start(settings(&spine.url)).await?;
    sink.send(accounts_batch(1, 3, "é 😀 \"quoted\" \u{7f} 1e-7"))
        .await;
    sink.wait(accounts_end(1), Duration::from_secs(30)).await?;
    sink.finish().await?;
    let mut prev = airlock::spine::server::chain::GENESIS_HASH.to_owned();
    for mut e in client(&spine.url).events(None, None, 100).await? {
        let hash = e
            .as_object_mut()
            .context("event")?
            .remove("hash")
            .context("hash")?;
        assert_eq!(e["prev_hash"], prev.as_str());
        assert_eq!(
            hash,
            hex::encode(airlock::spine::server::chain::hash(
                &airlock::spine::server::chain::canonical(&e)
            ))
        );
        prev = hash.as_str().context("hash")?.to_owned();
    }
    spine.stop().await;
    Ok(())
}

#[tokio::test]
async fn tampering_with_the_builtin_log_is_detected() -> Result<()> {
    let dir = temp_dir("spine-tamper");
    let spine = BuiltinSpine::start(&dir).await;
    let url = spine.url.clone();
    let mut sink = Driven::start(settings(&url)).await?;
    for n in 1..=10 {
        sink.send(accounts_batch(n, 1, "")).await;
    }
    sink.wait(accounts_end(10), Duration::from_secs(30)).await?;
    sink.finish().await?;
    spine.stop().await;
    assert!(airlock::spine::server::verify(&dir)?.valid);
    let path = dir.join(log::LOG_FILE);
    let original = std::fs::read(&path)?;

    // Someone rewrites the masked address of the 4th event in place.
    let target = masked("user4000@example.com");
    let at = original
        .windows(target.len())
        .position(|w| w == target.as_bytes())
        .context("4th event")?;
    let mut edited = original.clone();
    edited[at..at + 8].copy_from_slice(b"deadbeef");
    std::fs::write(&path, &edited)?;
    let report = airlock::spine::server::verify(&dir)?;
    assert_eq!(
        (report.valid, report.first_break_at),
        (false, Some(4)),
        "{report:?}"
    );
    let refused = airlock::spine::server::SpineState::open(&dir, None)
        .err()
        .context("the server refuses a damaged log")?;
    assert!(refused.to_string().contains("record 4"), "{refused}");

    // A careful forger swaps events 6 and 7 and re-frames them: the frames are intact,
    // the chain is not. The server still starts, and /verify names event 6.
    std::fs::write(&path, &original)?;
    let mut reader = log::Reader::open(&path, None)?.context("log")?;
    let mut frames = Vec::new();
    while let log::Step::Frame(f) = reader.read_next()? {
        frames.push(f);
    }
    frames.swap(5, 6);
    let mut forged = log::FILE_HEADER.to_vec();
    for f in &frames {
        log::encode_frame(&f.hash(), f.canonical(), &mut forged);
    }
    std::fs::write(&path, &forged)?;
    let report = airlock::spine::server::verify(&dir)?;
    assert_eq!(
        (report.valid, report.first_break_at),
        (false, Some(6)),
        "{report:?}"
    );
    assert_eq!(
        report.reason.as_deref(),
        Some("event_id should be 6, got 7")
    );
    let spine = BuiltinSpine::start(&dir).await;
    let answer = client(&spine.url).get("/verify").await?;
    assert_eq!(
        (&answer["valid"], &answer["first_break_at"]),
        (&json!(false), &json!(6)),
        "{answer}"
    );
    spine.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_spine_binary_survives_kill_9_without_losing_an_acknowledged_event() -> Result<()> {
    let dir = temp_dir("spine-kill9");
    let port = free_port();
    let spine = SpineProcess::start(&dir, port).await?;
    let url = spine.url.clone();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (url, acked) = (url.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let client = client(&url);
            for i in 0.. {
                let id = format!("w{w}-{i}");
                let size = if i % 50 == 7 { 200_000 } else { 100 };
                let event = json!({"kind": "other", "source": "kill9", "payload": {"event_id": id, "pad": "p".repeat(size)}});
                match client.publish(serde_json::to_vec(&event).expect("json")).await {
                    Ok(_) => acked.lock().expect("lock").push(id),
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    spine.kill_9().await;
    for w in writers {
        w.await?;
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 20,
        "the writers got {} answers before the kill",
        acked.len()
    );

    let spine = SpineProcess::start(&dir, port).await?;
    let stored: Vec<String> = client(&url)
        .events(None, Some("kill9"), 100_000)
        .await?
        .iter()
        .map(|e| {
            e["payload"]["event_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let set: HashSet<&String> = stored.iter().collect();
    assert_eq!(set.len(), stored.len(), "no event stored twice");
    println!(
        "kill -9: {} events acknowledged, {} stored after restart",
        acked.len(),
        stored.len()
    );
    let lost: Vec<&String> = acked.iter().filter(|id| !set.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged events lost by kill -9: {lost:?}"
    );
    assert_eq!(client(&url).get("/verify").await?["valid"], true);
    // Writing again after the crash: an event that made it in before the kill is not
    // appended twice.
    let again = json!({"kind": "other", "source": "kill9", "payload": {"event_id": acked[0], "pad": "p".repeat(100)}});
    let answer = client(&url).publish(serde_json::to_vec(&again)?).await?;
    assert_eq!(answer["payload"]["event_id"], acked[0].as_str());
    assert_eq!(client(&url).get("/stats").await?["count"], stored.len());
    spine.kill_9().await;
    let report = airlock::spine::server::verify(&dir)?;
    assert!(report.valid, "{report:?}");
    Ok(())
}

/// An id in the unsigned form of earlier airlock versions, which anyone could compute
/// from the commit LSN, the change's index and the source.
fn predictable_id(source: &str, commit_lsn: u64, index: u32) -> String {
    format!(
        "{commit_lsn:016X}-{index:06}-{}",
        &airlock_tests::sha256_hex(source)[..8]
    )
}

/// The two ways a peer with write access to the spine went about it: ids crafted at
/// the highest position (in the unsigned form, and in the signed form with a guessed
/// MAC), and the predictable (unsigned) ids of our next events, transactions 3 to 5.
fn forged_ids() -> [(&'static str, Vec<String>); 2] {
    let highest = predictable_id("airlock", u64::MAX, 999_999);
    let predicted = (3..=5)
        .flat_map(|n| (0..3).map(move |i| predictable_id("airlock", n * 1000 + 999, i)))
        .collect();
    [
        (
            "posting ids at the highest position",
            vec![highest.clone(), format!("{highest}-{}", "0".repeat(32))],
        ),
        ("posting the predictable ids of our next events", predicted),
    ]
}

/// Our sink delivers transactions 1 and 2; a peer posts events with the `forged` ids
/// to our source; our pipeline restarts from an older checkpoint and sends 1 to 5.
/// Returns the ids of our accounts in the spine, in spine order.
async fn after_a_peer_posts(url: &str, forged: &[String]) -> Result<Vec<u64>> {
    let mut sink = Driven::start(settings(url)).await?;
    for n in 1..=2 {
        sink.send(accounts_batch(n, 3, "")).await;
    }
    sink.wait(accounts_end(2), Duration::from_secs(30)).await?;
    sink.finish().await?;

    let peer = client(url);
    for id in forged {
        let event = json!({"kind": "other", "source": "airlock", "payload": {"event_id": id, "peer": true}});
        peer.publish(serde_json::to_vec(&event)?).await?;
    }

    let mut sink = Driven::start(settings(url)).await?;
    for n in 1..=5 {
        sink.send(accounts_batch(n, 3, "")).await;
    }
    sink.wait(accounts_end(5), Duration::from_secs(30)).await?;
    sink.finish().await?;
    Ok(client(url)
        .events(None, Some("airlock"), 100_000)
        .await?
        .iter()
        .filter_map(|e| e["payload"]["new"]["id"].as_u64())
        .collect())
}

/// Every one of our events must be in the spine exactly once — none skipped for the
/// peer's ids, none sent twice — whatever the attack.
fn assert_each_event_once(found: &[(&str, Vec<u64>)]) {
    let wrong: Vec<String> = found
        .iter()
        .filter(|(_, ours)| *ours != ids_of(1..=5, 3))
        .map(|(attack, ours)| format!("a peer {attack}: ours in the spine {ours:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "expected each of {:?} once; {}",
        ids_of(1..=5, 3),
        wrong.join("; ")
    );
}

#[tokio::test]
async fn builtin_a_peer_cannot_steer_the_resync() -> Result<()> {
    let mut found = Vec::new();
    for (attack, forged) in forged_ids() {
        let spine_dir = temp_dir(&format!("spine-steer-{}", forged.len()));
        let spine = BuiltinSpine::start(&spine_dir).await;
        found.push((attack, after_a_peer_posts(&spine.url, &forged).await?));
        spine.stop().await;
    }
    assert_each_event_once(&found);
    Ok(())
}

#[tokio::test]
async fn audit_stream_py_a_peer_cannot_steer_the_resync() -> Result<()> {
    let mut found = Vec::new();
    for (attack, forged) in forged_ids() {
        let spine = AuditStreamPy::start().await;
        found.push((attack, after_a_peer_posts(&spine.url, &forged).await?));
        spine.stop().await;
    }
    assert_each_event_once(&found);
    Ok(())
}

/// A server that answers every write with `301` to an address whose `GET` answers
/// `200` with an empty list (`/events/batch`) or object (`/events`), as a spine that
/// took the events would; `GET /events` (the resync) answers `[]`.
async fn redirecting_spine() -> Result<String> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let moved = |to: &'static str| {
        move || async move { (StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, to)]) }
    };
    let app = axum::Router::new()
        .route(
            "/events",
            get(|| async { axum::Json(json!([])) }).post(moved("/moved/events")),
        )
        .route("/events/batch", axum::routing::post(moved("/moved/batch")))
        .route(
            "/moved/events",
            get(|| async { axum::Json(json!({})) }).post(|| async { axum::Json(json!({})) }),
        )
        .route(
            "/moved/batch",
            get(|| async { axum::Json(json!([])) }).post(|| async { axum::Json(json!([])) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/events"))
}

#[tokio::test]
async fn a_redirect_is_not_a_delivery() -> Result<()> {
    use airlock::sink::Sink;
    let url = redirecting_spine().await?;
    let mut sink = SpineSink::open(settings(&url)).await?;
    sink.accept(accounts_batch(1, 2, "")).await?;
    let error = match sink.flush().await {
        Ok(lsn) => bail!("a 301 counted as delivered (durable {lsn:?})"),
        Err(error) => error,
    };
    assert!(!error.is_transient(), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("redirect") && message.contains("/moved/batch"),
        "{message}"
    );
    assert_eq!(sink.pending_events(), 2, "nothing is taken as delivered");

    // One event at a time (audit-stream-py has no batch endpoint): the same.
    let event = json!({"kind": "other", "source": "airlock", "payload": {}});
    let error = client(&url)
        .publish(serde_json::to_vec(&event)?)
        .await
        .expect_err("a 301 is not a stored event");
    assert!(!error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("redirect") && error.to_string().contains("/moved/events"),
        "{error}"
    );
    Ok(())
}
