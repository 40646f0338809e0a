//! A spine that refuses an event (4xx): by default the pipeline stops with the spine's
//! answer; with `dead_letter_dir` the refused event is quarantined and every other
//! event is still delivered, in order. The refusing spine is a real HTTP server on
//! 127.0.0.1 that answers 422 to any event whose note is `poison`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock::change::Lsn;
use airlock::sink::spine::{SpineSettings, SpineSink};
use airlock::sink::{SinkError, drive};
use airlock_tests::spine_support::*;
use airlock_tests::temp_dir;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::{Value as Jv, json};
use tokio::sync::{mpsc, watch};

type Store = Arc<Mutex<Vec<Jv>>>;

fn poisoned(event: &Jv) -> bool {
    event["payload"]["new"]["note"] == "poison"
}

async fn post_one(State(store): State<Store>, Json(event): Json<Jv>) -> (StatusCode, Json<Jv>) {
    if poisoned(&event) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": "poison is not allowed"})),
        );
    }
    store.lock().unwrap().push(event.clone());
    (StatusCode::CREATED, Json(event))
}

async fn post_batch(
    State(store): State<Store>,
    Json(events): Json<Vec<Jv>>,
) -> (StatusCode, Json<Jv>) {
    if events.iter().any(poisoned) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": "poison is not allowed"})),
        );
    }
    store.lock().unwrap().extend(events.iter().cloned());
    (StatusCode::OK, Json(Jv::Array(events)))
}

async fn list(State(store): State<Store>) -> Json<Jv> {
    Json(Jv::Array(store.lock().unwrap().clone()))
}

/// Serves the refusing spine; returns its events URL and what it accepted.
async fn refusing_spine() -> (String, Store) {
    let store: Store = Arc::default();
    let app = axum::Router::new()
        .route("/events", post(post_one).get(list))
        .route("/events/batch", post(post_batch))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .with_state(store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/events"), store)
}

async fn run(
    settings: SpineSettings,
    batches: Vec<Arc<airlock::pipeline::batch::Batch>>,
    until: Lsn,
) -> Result<(), SinkError> {
    let sink = SpineSink::open(settings).await?;
    let (tx, rx) = mpsc::channel(16);
    let (durable_tx, mut durable) = watch::channel(Lsn::ZERO);
    let task = tokio::spawn(drive(sink, rx, durable_tx));
    for batch in batches {
        tx.send(batch).await.expect("the sink runs");
    }
    let reached = tokio::time::timeout(Duration::from_secs(30), durable.wait_for(|d| *d >= until))
        .await
        .expect("the sink neither finished nor failed within 30 s");
    if reached.is_err() {
        // The sink stopped (its durable sender is gone): its task says why.
        return task.await.expect("sink task");
    }
    drop(tx);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_is_dead_lettered_and_the_others_are_delivered_in_order() {
    let (url, store) = refusing_spine().await;
    let quarantine = temp_dir("spine-dead-letter");
    let mut settings = SpineSettings::new("spine", url);
    settings.dead_letter_dir = Some(quarantine.path_buf());
    settings.flush_interval = Duration::from_millis(50);
    let batches = vec![
        accounts_batch(1, 3, "fine"),
        accounts_batch(2, 2, "poison"),
        accounts_batch(3, 3, "fine"),
    ];
    run(settings, batches, accounts_end(3))
        .await
        .expect("the stream goes on past the refused events");

    let ids: Vec<i64> = store
        .lock()
        .unwrap()
        .iter()
        .map(|e| e["payload"]["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![1000, 1001, 1002, 3000, 3001, 3002],
        "the accepted events, in commit order, once"
    );
    let text = std::fs::read_to_string(quarantine.join("spine.jsonl")).expect("dead-letter file");
    let lines: Vec<Jv> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["event"]["payload"]["new"]["id"], 2000);
    assert_eq!(lines[1]["event"]["payload"]["new"]["id"], 2001);
    assert!(
        lines[0]["refused"]
            .as_str()
            .unwrap()
            .contains("poison is not allowed"),
        "the spine's answer is kept: {}",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dead_lettering_a_refused_event_stops_the_sink_with_the_spines_answer() {
    let (url, store) = refusing_spine().await;
    let mut settings = SpineSettings::new("spine", url);
    settings.flush_interval = Duration::from_millis(50);
    let batches = vec![accounts_batch(1, 1, "fine"), accounts_batch(2, 1, "poison")];
    let error = run(settings, batches, accounts_end(2))
        .await
        .expect_err("a 4xx is definite");
    assert!(!error.is_transient());
    assert!(
        error.to_string().contains("poison is not allowed"),
        "{error}"
    );
    let accepted = store.lock().unwrap().len();
    assert!(accepted <= 1, "nothing past the refused event is delivered");
}
