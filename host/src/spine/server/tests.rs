//! The spine: hash chain, recovery, tamper detection and the HTTP API (on a real
//! listener on 127.0.0.1).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::log::{self, LOG_FILE};
use super::*;

/// A fresh directory for one test, removed when the test ends.
fn dir(name: &str) -> crate::private_files::TestDir {
    crate::private_files::TestDir::new(&format!("spine-{name}"))
}

struct Running {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), SpineError>>,
    http: reqwest::Client,
}

impl Running {
    async fn start(dir: &Path, token: Option<&str>) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let dir = dir.to_path_buf();
        let token = token.map(str::to_owned);
        let task = tokio::spawn(async move {
            serve(&dir, listener, token, async move {
                let _ = stopped.await;
            })
            .await
        });
        Running {
            url,
            stop: Some(stop),
            task,
            http: reqwest::Client::new(),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("spine stops")
            .unwrap()
            .unwrap();
    }

    async fn post(&self, path: &str, body: Json) -> (u16, Json) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, Json) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }
}

fn event(i: u64) -> Json {
    json!({"kind": "other", "source": "test", "payload": {"n": i, "event_id": format!("e{i}"), "text": "é"}, "timestamp": "2024-01-01T00:00:00Z"})
}

/// Writes `n` events to a fresh spine in `dir` and stops it.
async fn fill(dir: &Path, n: u64) {
    let spine = Running::start(dir, None).await;
    for i in 1..=n {
        let (status, _) = spine.post("/events", event(i)).await;
        assert_eq!(status, 201);
    }
    spine.stop().await;
}

/// The log's frames as `(stored hash, canonical body)`.
fn frames(dir: &Path) -> Vec<([u8; 32], Vec<u8>)> {
    let mut reader = log::Reader::open(&dir.join(LOG_FILE), None)
        .unwrap()
        .unwrap();
    let mut out = Vec::new();
    while let log::Step::Frame(f) = reader.read_next().unwrap() {
        out.push((f.hash(), f.canonical().to_vec()));
    }
    out
}

/// Rewrites the log from frames, with valid frame checksums (a careful forger).
fn rewrite(dir: &Path, frames: &[([u8; 32], Vec<u8>)]) {
    let mut bytes = log::FILE_HEADER.to_vec();
    for (hash, body) in frames {
        log::encode_frame(hash, body, &mut bytes);
    }
    std::fs::write(dir.join(LOG_FILE), bytes).unwrap();
}

#[tokio::test]
async fn events_are_chained_as_audit_stream_py_chains_them() {
    let d = dir("chain");
    let spine = Running::start(&d, None).await;
    let mut prev = chain::GENESIS_HASH.to_owned();
    for i in 1..=3 {
        let (status, e) = spine.post("/events", event(i)).await;
        assert_eq!(status, 201, "{e}");
        assert_eq!(e["event_id"], i);
        assert_eq!(e["prev_hash"], prev.as_str());
        // audit-stream-py's `_canonical_hash` over every field but `hash`.
        let mut body = e.clone();
        body.as_object_mut().unwrap().remove("hash");
        assert_eq!(
            e["hash"],
            hex::encode(chain::hash(&chain::canonical(&body)))
        );
        prev = e["hash"].as_str().unwrap().to_owned();
    }
    let (_, stats) = spine.get("/stats").await;
    assert_eq!(
        stats,
        json!({"count": 3, "last_event_id": 3, "latest_hash": prev})
    );
    let (_, report) = spine.get("/verify").await;
    assert_eq!(report["valid"], true);
    assert_eq!(report["checked"], 3);
    spine.stop().await;
    let report = verify(&d).unwrap();
    assert!(
        report.valid && report.checked == 3 && report.latest_hash.as_deref() == Some(prev.as_str()),
        "{report:?}"
    );
}

#[tokio::test]
async fn the_api_answers_like_audit_stream_py() {
    let d = dir("api");
    let spine = Running::start(&d, None).await;
    assert_eq!(spine.get("/healthz").await, (200, json!({"status": "ok"})));
    for (i, source) in ["a", "b", "a", "c", "a"].iter().enumerate() {
        let kind = if i == 3 { "flag_swapped" } else { "other" };
        let (status, _) = spine
            .post(
                "/events",
                json!({"kind": kind, "source": source, "payload": {"i": i}}),
            )
            .await;
        assert_eq!(status, 201);
    }
    let ids = |v: &Json| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&spine.get("/events?source=a&limit=2").await.1),
        vec![3, 5]
    );
    assert_eq!(ids(&spine.get("/events?source=a").await.1), vec![1, 3, 5]);
    assert_eq!(
        ids(&spine.get("/events?kind=flag_swapped").await.1),
        vec![4]
    );
    assert_eq!(ids(&spine.get("/events?limit=2").await.1), vec![4, 5]);
    assert_eq!(
        ids(&spine.get("/events?source=zz&limit=1").await.1),
        Vec::<u64>::new()
    );
    assert_eq!(
        spine.get("/events?limit=0").await,
        (400, json!({"detail": "limit must be in 1..100000"}))
    );
    assert_eq!(
        spine.get("/events/9").await,
        (404, json!({"detail": "unknown event_id: 9"}))
    );
    let (status, one) = spine.get("/events/2").await;
    assert_eq!(
        (status, &one["source"], &one["payload"]),
        (200, &json!("b"), &json!({"i": 1}))
    );
    // The server stamps a timestamp when none is given, as audit-stream-py does.
    assert!(
        one["timestamp"].as_str().unwrap().ends_with("+00:00"),
        "{one}"
    );

    let (status, e) = spine
        .post("/events", json!({"kind": "data_access", "source": "a"}))
        .await;
    assert_eq!(status, 422);
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("kind `data_access` is not one of"),
        "{e}"
    );
    let (status, _) = spine
        .post(
            "/events",
            json!({"kind": "other", "source": "a", "extra": 1}),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = spine
        .post("/events", json!({"kind": "other", "source": ""}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(spine.get("/stats").await.1["count"], 5);
    spine.stop().await;
}

#[tokio::test]
async fn writes_are_idempotent_on_payload_event_id_and_batches_are_all_or_nothing() {
    let d = dir("idem");
    let spine = Running::start(&d, None).await;
    let (status, first) = spine.post("/events", event(1)).await;
    assert_eq!(status, 201);
    let (status, again) = spine.post("/events", event(1)).await;
    assert_eq!((status, &again), (200, &first));

    let batch = json!([event(1), event(2), event(3), event(2)]);
    let (status, answer) = spine.post("/events/batch", batch).await;
    assert_eq!(status, 201);
    let ids: Vec<u64> = answer
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 2]);

    let bad = json!([event(4), {"kind": "nope", "source": "x"}]);
    let (status, answer) = spine.post("/events/batch", bad).await;
    assert_eq!(status, 422);
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .starts_with("event 1: kind `nope`"),
        "{answer}"
    );
    assert_eq!(spine.get("/stats").await.1["count"], 3);
    assert_eq!(
        spine.post("/events/batch", json!([])).await,
        (200, json!([]))
    );
    spine.stop().await;

    // The idempotency index is rebuilt from the log.
    let spine = Running::start(&d, None).await;
    assert_eq!(spine.post("/events", event(3)).await.0, 200);
    assert_eq!(spine.post("/events", event(4)).await.0, 201);
    assert_eq!(spine.get("/stats").await.1["count"], 4);
    spine.stop().await;
}

#[tokio::test]
async fn a_token_guards_reads_and_writes_but_not_the_health_probe() {
    let d = dir("token");
    let spine = Running::start(&d, Some("s3cret")).await;
    assert_eq!(spine.get("/healthz").await.0, 200);
    assert_eq!(spine.get("/events").await.0, 401);
    assert_eq!(spine.post("/events", event(1)).await.0, 401);
    let r = spine
        .http
        .post(format!("{}/events", spine.url))
        .bearer_auth("s3cret")
        .json(&event(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = spine
        .http
        .get(format!("{}/stats", spine.url))
        .bearer_auth("wrong!")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    spine.stop().await;
}

#[tokio::test]
async fn the_stream_replays_after_last_event_id_then_tails() {
    let d = dir("stream");
    let spine = Running::start(&d, None).await;
    for i in 1..=3 {
        spine.post("/events", event(i)).await;
    }
    let mut response = spine
        .http
        .get(format!("{}/stream", spine.url))
        .header("Last-Event-ID", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut text = String::new();
    let mut posted = false;
    while text.matches("\nid: ").count() + usize::from(text.starts_with("id: ")) < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        if !posted && text.contains("id: 3") {
            posted = true;
            spine.post("/events", event(4)).await;
        }
    }
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids, ["2", "3", "4"], "{text}");
    assert!(text.contains("event: other"), "{text}");
    let data: Json =
        serde_json::from_str(text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
    assert_eq!(data["event_id"], 2);
    // Shutdown ends the open stream instead of waiting for it.
    spine.stop().await;
}

#[tokio::test]
async fn a_one_megabyte_event_is_stored_whole() {
    let d = dir("big");
    let spine = Running::start(&d, None).await;
    let big = "x".repeat(1 << 20) + "é";
    let (status, e) = spine
        .post(
            "/events",
            json!({"kind": "other", "source": "s", "payload": {"big": big}}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(e["payload"]["big"].as_str().unwrap(), big);
    assert_eq!(
        spine.get("/events/1").await.1["payload"]["big"]
            .as_str()
            .unwrap(),
        big
    );
    spine.stop().await;
    assert!(verify(&d).unwrap().valid);
}

#[tokio::test]
async fn recovery_cuts_a_torn_tail_and_keeps_every_acknowledged_event() {
    let d = dir("torn");
    fill(&d, 3).await;
    let path = d.join(LOG_FILE);
    let good = std::fs::metadata(&path).unwrap().len();
    // Half of a fourth frame, as a crash in the middle of the write leaves it.
    let mut frame = Vec::new();
    log::encode_frame(&[1; 32], br#"{"event_id":4}"#, &mut frame);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&frame[..frame.len() / 2]);
    std::fs::write(&path, &bytes).unwrap();
    let report = verify(&d).unwrap();
    assert!(
        report.valid && report.checked == 3 && report.torn_tail_bytes > 0,
        "{report:?}"
    );

    let spine = Running::start(&d, None).await;
    assert_eq!(spine.get("/stats").await.1["count"], 3);
    let (status, e) = spine.post("/events", event(4)).await;
    assert_eq!((status, &e["event_id"]), (201, &json!(4)));
    spine.stop().await;
    assert!(d.join(format!("torn-{good}.bin")).is_file());
    let report = verify(&d).unwrap();
    assert!(
        report.valid && report.checked == 4 && report.torn_tail_bytes == 0,
        "{report:?}"
    );
}

#[tokio::test]
async fn recovery_refuses_a_damaged_record_in_the_middle() {
    let d = dir("corrupt");
    fill(&d, 3).await;
    let path = d.join(LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let second = bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w == log::FRAME_MAGIC)
        .nth(1)
        .unwrap()
        .0;
    bytes[second + 60] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let error = SpineState::open(&d, None).err().expect("refused");
    let message = error.to_string();
    assert!(
        matches!(error, SpineError::Corrupt { record: 2, .. }),
        "{message}"
    );
    assert!(
        message.contains("record 2") && message.contains("airlock spine verify"),
        "{message}"
    );
    let report = verify(&d).unwrap();
    assert_eq!(
        (report.valid, report.first_break_at, report.checked),
        (false, Some(2), 1),
        "{report:?}"
    );
}

#[tokio::test]
async fn verify_names_the_first_edited_deleted_inserted_or_reordered_record() {
    let d = dir("tamper");
    fill(&d, 5).await;
    let original = frames(&d);
    let check = |frames: &[([u8; 32], Vec<u8>)]| {
        rewrite(&d, frames);
        verify(&d).unwrap()
    };
    let expect = |report: VerifyReport, at: u64, reason: &str| {
        assert!(!report.valid, "{report:?}");
        assert_eq!(report.first_break_at, Some(at), "{report:?}");
        assert_eq!(report.checked, at - 1, "{report:?}");
        assert!(
            report.reason.as_deref().unwrap().contains(reason),
            "{report:?}"
        );
    };
    assert!(check(&original).valid);

    // Edited payload, frame checksum recomputed: the stored hash no longer matches.
    let mut edited = original.clone();
    let body = String::from_utf8(edited[2].1.clone())
        .unwrap()
        .replace("\"n\":3", "\"n\":9");
    edited[2].1 = body.into_bytes();
    expect(check(&edited), 3, "hash mismatch at event #3");

    // Edited and re-hashed: the next record's prev_hash no longer matches.
    let mut rehashed = edited.clone();
    rehashed[2].0 = chain::hash(&rehashed[2].1);
    expect(check(&rehashed), 4, "prev_hash mismatch at event #4");

    // Deleted.
    let mut deleted = original.clone();
    deleted.remove(1);
    expect(check(&deleted), 2, "event_id should be 2, got 3");

    // Inserted (a copy of record 2 after itself).
    let mut inserted = original.clone();
    inserted.insert(2, original[1].clone());
    expect(check(&inserted), 3, "event_id should be 3, got 2");

    // Reordered.
    let mut reordered = original.clone();
    reordered.swap(3, 4);
    expect(check(&reordered), 4, "event_id should be 4, got 5");

    // Edited in place with a byte editor: the frame checksum catches it.
    rewrite(&d, &original);
    let path = d.join(LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(6).position(|w| w == b"\"n\":2,").unwrap();
    bytes[at + 4] = b'7';
    std::fs::write(&path, &bytes).unwrap();
    let report = verify(&d).unwrap();
    expect(report, 2, "checksum mismatch");

    // The server serves a log with a broken chain, and says so on /verify.
    rewrite(&d, &reordered);
    let spine = Running::start(&d, None).await;
    let (_, report) = spine.get("/verify").await;
    assert_eq!(
        (report["valid"].clone(), report["first_break_at"].clone()),
        (json!(false), json!(4)),
        "{report}"
    );
    spine.stop().await;
}

/// Regression: request bodies had no size limit, so one request could make the
/// spine buffer any amount of memory.
#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_it_is_read() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let d = dir("body-limit");
    let spine = Running::start(&d, None).await;
    let addr = spine.url.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{{",
        super::http::MAX_BODY + 1
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    spine.stop().await;
}

/// Regression: `airlock spine serve --listen 0.0.0.0:8093` served every event to
/// anyone, and took forged ones, when no token was set.
#[tokio::test]
async fn a_listener_others_can_reach_needs_a_token() {
    let d = dir("open-listener");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let error = super::serve(&d, listener, None, std::future::ready(()))
        .await
        .expect_err("no token on 0.0.0.0 must be refused");
    assert!(
        matches!(error, SpineError::OpenWithoutToken { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("AIRLOCK_SPINE_TOKEN"), "{error}");
    // With a token it serves (and stops at once here).
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    super::serve(&d, listener, Some("t".into()), std::future::ready(()))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_spines_files_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // A directory the spine creates, parents included.
    let root = dir("modes");
    let d = root.join("spine/data");
    fill(&d, 2).await;
    assert_eq!(mode(&d), 0o700);
    assert_eq!(mode(d.parent().unwrap()), 0o700);
    assert_eq!(mode(&d.join(LOG_FILE)), crate::private_files::FILE_MODE);
    // A torn tail it saves aside.
    let mut bytes = std::fs::read(d.join(LOG_FILE)).unwrap();
    bytes.extend_from_slice(b"EVT1\x40");
    std::fs::write(d.join(LOG_FILE), &bytes).unwrap();
    let spine = Running::start(&d, None).await;
    assert_eq!(spine.get("/stats").await.1["count"], 2);
    spine.stop().await;
    let torn: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    assert_eq!(torn.len(), 1, "{torn:?}");
    assert_eq!(mode(&torn[0]), crate::private_files::FILE_MODE);
}

/// A small deterministic generator for the intake fuzz (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// JSON text from fragments chosen to hit the edges of parsing and canonical
/// encoding: lone surrogate escapes, huge and tiny numbers, deep nesting, control
/// characters, duplicate keys, non-string event ids.
fn hostile_json(rng: &mut Rng, depth: usize) -> String {
    const SCALARS: &[&str] = &[
        "null",
        "true",
        "false",
        "0",
        "-0",
        "-1e-400",
        "18446744073709551616",
        "-9223372036854775809",
        "1.5",
        "1E2",
        "0.1",
        "123456789012345678901234567890",
        "\"\"",
        "\"é\"",
        "\"\\ud83d\\udca5\"",
        "\"\\u0000\"",
        "\"\\n\\t\"",
        "\"💥\"",
        "\"a\\\"b\"",
        "\"\\/\"",
        "\"\u{7f}\"",
        "5e-324",
    ];
    // Not JSON at all: chosen now and then.
    const INVALID: &[&str] = &[
        "NaN",
        "Infinity",
        "01",
        "1.",
        ".5",
        "\"\\ud800\"",
        "\"\\udc00\\ud800\"",
        "'a'",
        "1e400",
    ];
    if depth == 0 || rng.below(3) == 0 {
        return if rng.below(16) == 0 {
            rng.pick(INVALID).to_string()
        } else {
            rng.pick(SCALARS).to_string()
        };
    }
    match rng.below(3) {
        0 => {
            let items: Vec<String> = (0..rng.below(4))
                .map(|_| hostile_json(rng, depth - 1))
                .collect();
            format!("[{}]", items.join(","))
        }
        _ => {
            const KEYS: &[&str] = &[
                "\"event_id\"",
                "\"n\"",
                "\"\"",
                "\"é\"",
                "\"\\ud83d\\udca5\"",
                "\"kind\"",
                "\"a\"",
            ];
            let members: Vec<String> = (0..rng.below(4))
                .map(|_| format!("{}:{}", rng.pick(KEYS), hostile_json(rng, depth - 1)))
                .collect();
            format!("{{{}}}", members.join(","))
        }
    }
}

/// One request body: a well-formed event with a hostile payload, a hostile event,
/// a deep nest, a mutation of a good body, or random bytes.
fn hostile_body(rng: &mut Rng, batch: bool) -> Vec<u8> {
    let one = |rng: &mut Rng| -> String {
        match rng.below(6) {
            0..=3 => format!(
                r#"{{"kind":"other","source":"fuzz","payload":{}}}"#,
                hostile_json(rng, 4)
            ),
            4 => format!(
                r#"{{"kind":{},"source":{},"payload":{},"timestamp":{}}}"#,
                hostile_json(rng, 1),
                hostile_json(rng, 1),
                hostile_json(rng, 3),
                hostile_json(rng, 1)
            ),
            _ => hostile_json(rng, 3),
        }
    };
    let mut body = if batch {
        let items: Vec<String> = (0..rng.below(5)).map(|_| one(rng)).collect();
        format!("[{}]", items.join(",")).into_bytes()
    } else {
        one(rng).into_bytes()
    };
    match rng.below(16) {
        0 => body = vec![b'['; 1 + rng.below(4000)],
        1 if !body.is_empty() => {
            let at = rng.below(body.len());
            body[at] ^= 1 << rng.below(8);
        }
        2 if !body.is_empty() => body.truncate(rng.below(body.len())),
        3 => body = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
        _ => {}
    }
    body
}

/// The spine's intake under hostile bodies: every answer is a 2xx or a 4xx (never a
/// 5xx, a panic or a hang), every accepted event reads back with the payload it
/// was stored with, and the log stays a valid chain that reopens. Then the log
/// reader under damage: every mutation of the file is detected, none panics.
#[tokio::test]
async fn hostile_intake_bodies_and_damaged_logs_never_break_the_spine() {
    let d = dir("fuzz");
    let spine = Running::start(&d, None).await;
    let seed = std::env::var("AIRLOCK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_eda1_b0c0_ffee);
    let mut rng = Rng(seed);
    let mut accepted = 0u64;
    for case in 0..600 {
        let batch = rng.below(3) == 0;
        let body = hostile_body(&mut rng, batch);
        let path = if batch { "/events/batch" } else { "/events" };
        let response = spine
            .http
            .post(format!("{}{path}", spine.url))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("case {case} (seed {seed}): no answer: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert!(
            (200..300).contains(&status) || (400..500).contains(&status),
            "case {case} (seed {seed}): {status} for {:?}: {text}",
            String::from_utf8_lossy(&body)
        );
        if status == 201 {
            let answer: Json = serde_json::from_str(&text).unwrap();
            let events = match answer {
                Json::Array(events) => events,
                one => vec![one],
            };
            for e in events {
                let id = e["event_id"].as_u64().expect("an event id");
                let (status, stored) = spine.get(&format!("/events/{id}")).await;
                assert_eq!(status, 200, "case {case}: event {id} does not read back");
                assert_eq!(stored["payload"], e["payload"], "case {case}: event {id}");
                accepted = accepted.max(id);
            }
        }
    }
    assert!(
        accepted > 50,
        "the fuzz must also store events (stored {accepted})"
    );
    let (_, verified) = spine.get("/verify").await;
    assert_eq!(verified["valid"], true, "{verified}");
    spine.stop().await;
    let report = verify(&d).unwrap();
    assert!(
        report.valid && report.torn_tail_bytes == 0 && report.checked == accepted,
        "{report:?}"
    );

    // Damage: flips, truncations, duplicated and dropped ranges, garbage appended.
    let path = d.join(LOG_FILE);
    let good = std::fs::read(&path).unwrap();
    let copy = d.join("damaged");
    std::fs::create_dir_all(&copy).unwrap();
    for case in 0..300 {
        let mut bytes = good.clone();
        match rng.below(5) {
            0 => {
                let at = rng.below(bytes.len());
                bytes[at] ^= 1 << rng.below(8);
            }
            1 => bytes.truncate(rng.below(bytes.len())),
            2 => {
                let from = rng.below(bytes.len());
                let to = (from + 1 + rng.below(200)).min(bytes.len());
                let range = bytes[from..to].to_vec();
                let at = rng.below(bytes.len());
                bytes.splice(at..at, range);
            }
            3 => {
                let from = rng.below(bytes.len());
                let to = (from + 1 + rng.below(200)).min(bytes.len());
                bytes.drain(from..to);
            }
            _ => bytes.extend((0..1 + rng.below(64)).map(|_| rng.next() as u8)),
        }
        if bytes == good {
            continue;
        }
        std::fs::write(copy.join(LOG_FILE), &bytes).unwrap();
        let report = match verify(&copy) {
            Ok(report) => report,
            Err(_) => continue,
        };
        assert!(
            !(report.valid && report.torn_tail_bytes == 0 && report.checked == accepted),
            "case {case} (seed {seed}): damage went unnoticed: {report:?}"
        );
        // Opening either cuts a torn tail or refuses by name; it never panics.
        let _ = SpineState::open(&copy, None).map(|state| state.close());
    }
}
