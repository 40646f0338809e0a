//! The spine's HTTP API and its single writer. See the [module documentation](super)
//! for the routes, the invariants and the hash chain.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as JsonBody, Router};
use futures::Stream;
use serde_json::{Map, Value as Json, json};
use tokio::sync::{mpsc, oneshot, watch};

use super::log::{self, LOG_FILE};
use super::{Chain, SpineError, Stored, chain, verify_file};
use crate::spine::AUDIT_STREAM_KINDS;

/// Requests committed together by the writer stop growing past this many bytes.
const GROUP_BYTES: usize = 64 << 20;
/// `GET /events` answers at most this many events (audit-stream-py's bound).
const MAX_LIMIT: i64 = 100_000;

/// The spine's shared state: the log, its index and the writer. Cheap to clone.
#[derive(Clone)]
pub struct SpineState {
    shared: Arc<Shared>,
    writer_thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

struct Shared {
    dir: PathBuf,
    path: PathBuf,
    token: Option<String>,
    kinds: Vec<String>,
    reader: File,
    store: Arc<Store>,
    writer: mpsc::Sender<WriteOp>,
    closing: watch::Sender<bool>,
}

/// What the writer thread and the handlers share.
struct Store {
    index: RwLock<Index>,
    /// The number of durable events.
    head: watch::Sender<u64>,
}

#[derive(Default)]
struct Index {
    /// Entry `n - 1` is event `n`.
    entries: Vec<Entry>,
    by_source: HashMap<Arc<str>, Vec<u64>>,
    by_kind: HashMap<Arc<str>, Vec<u64>>,
    /// Canonical `payload.event_id` → event number.
    idempotency: HashMap<String, u64>,
    latest_hash: Option<[u8; 32]>,
    /// Bytes of the log that hold durable events.
    committed_len: u64,
}

struct Entry {
    body_offset: u64,
    body_len: u64,
    kind: Arc<str>,
    source: Arc<str>,
}

impl Index {
    fn push(
        &mut self,
        entry: (u64, u64),
        kind: &str,
        source: &str,
        key: Option<String>,
        hash: [u8; 32],
    ) {
        let id = self.entries.len() as u64 + 1;
        let intern = |map: &mut HashMap<Arc<str>, Vec<u64>>, name: &str| -> Arc<str> {
            match map.get_key_value(name) {
                Some((k, _)) => k.clone(),
                None => {
                    let k: Arc<str> = name.into();
                    map.insert(k.clone(), Vec::new());
                    k
                }
            }
        };
        let kind = intern(&mut self.by_kind, kind);
        let source = intern(&mut self.by_source, source);
        self.by_kind.get_mut(&kind).expect("interned").push(id);
        self.by_source.get_mut(&source).expect("interned").push(id);
        if let Some(key) = key {
            self.idempotency.entry(key).or_insert(id);
        }
        self.entries.push(Entry {
            body_offset: entry.0,
            body_len: entry.1,
            kind,
            source,
        });
        self.latest_hash = Some(hash);
    }

    fn latest_hash_hex(&self) -> String {
        self.latest_hash
            .map_or_else(|| chain::GENESIS_HASH.to_owned(), hex::encode)
    }
}

/// One request's events on their way to the writer.
struct WriteOp {
    events: Vec<Prepared>,
    reply: oneshot::Sender<Result<Vec<Written>, String>>,
}

/// A validated event with its payload already in canonical form.
struct Prepared {
    kind: String,
    source: String,
    timestamp: String,
    payload: Vec<u8>,
    key: Option<String>,
}

enum Written {
    New { json: Vec<u8> },
    Existing { id: u64 },
}

impl SpineState {
    /// Opens (creating if needed) the spine in `dir` with audit-stream-py's kinds:
    /// locks the log, recovers it (cuts a torn tail, refuses corruption), rebuilds the
    /// index and starts the writer thread. Blocking I/O.
    pub fn open(dir: &Path, token: Option<String>) -> Result<SpineState, SpineError> {
        let kinds = AUDIT_STREAM_KINDS.iter().map(|k| (*k).to_owned()).collect();
        SpineState::open_with_kinds(dir, token, kinds)
    }

    /// [`SpineState::open`] accepting the given event kinds.
    pub fn open_with_kinds(
        dir: &Path,
        token: Option<String>,
        kinds: Vec<String>,
    ) -> Result<SpineState, SpineError> {
        // The events hold row data: the directory is its owner's only.
        crate::private_files::create_dir_all(dir).map_err(|source| log::LogError::Io {
            path: dir.to_path_buf(),
            action: "create directory",
            source,
        })?;
        let path = dir.join(LOG_FILE);
        let io = |action, source| log::LogError::Io {
            path: path.clone(),
            action,
            source,
        };
        let mut writer = log::Writer::open(dir)?;
        let mut index = Index::default();
        let mut chain = Chain::default();
        let mut broken = None;
        let mut reader = log::Reader::open(&path, None)?
            .ok_or_else(|| log::LogError::NotALog { path: path.clone() })?;
        loop {
            match reader.read_next().map_err(|e| io("read", e))? {
                log::Step::Frame(frame) => {
                    let position = reader.records();
                    let stored = Stored::parse(frame.canonical()).map_err(|reason| {
                        SpineError::BadRecord {
                            path: path.clone(),
                            record: position,
                            reason,
                        }
                    })?;
                    if broken.is_none()
                        && let Err(reason) = chain.check(position, &frame)
                    {
                        broken = Some(reason);
                    }
                    let body = (frame.body_offset(), frame.body.len() as u64);
                    index.push(
                        body,
                        &stored.kind,
                        &stored.source,
                        stored.idempotency_key,
                        frame.hash(),
                    );
                }
                log::Step::End(log::End::Clean) => break,
                log::Step::End(log::End::Torn { offset, bytes }) => {
                    let aside = log::cut_torn_tail(dir, offset, bytes)?;
                    tracing::warn!(
                        log = %path.display(), offset, bytes, saved = %aside.display(),
                        "cut off the torn tail of an unacknowledged write"
                    );
                    writer.recovered(offset);
                    break;
                }
                log::Step::End(log::End::Corrupt {
                    record,
                    offset,
                    reason,
                }) => {
                    return Err(SpineError::Corrupt {
                        path,
                        record,
                        offset,
                        reason,
                    });
                }
            }
        }
        if let Some(reason) = broken {
            tracing::error!(
                log = %path.display(), reason,
                "the spine log fails verification (serving it anyway): run `airlock spine verify`"
            );
        }
        index.committed_len = writer.size();
        let count = index.entries.len() as u64;
        let reader = File::open(&path).map_err(|e| io("open", e))?;
        let store = Arc::new(Store {
            index: RwLock::new(index),
            head: watch::Sender::new(count),
        });
        let (tx, rx) = mpsc::channel(1024);
        let thread_store = store.clone();
        let thread = std::thread::Builder::new()
            .name("spine-writer".into())
            .spawn(move || run_writer(writer, thread_store, rx))
            .map_err(|e| io("start the writer thread", e))?;
        tracing::info!(dir = %dir.display(), events = count, "spine log opened");
        Ok(SpineState {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                path,
                token,
                kinds,
                reader,
                store,
                writer: tx,
                closing: watch::Sender::new(false),
            }),
            writer_thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Durable events.
    pub fn count(&self) -> u64 {
        *self.shared.store.head.borrow()
    }

    /// The spine's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Ends every `/stream` response, so a graceful shutdown can finish.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.shared.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let same = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer TOKEN`".into(),
            ))
        }
    }

    async fn append(&self, events: Vec<Prepared>) -> Result<Vec<Written>, ApiError> {
        let unavailable = |why: String| ApiError(StatusCode::SERVICE_UNAVAILABLE, why);
        let (reply, answer) = oneshot::channel();
        self.shared
            .writer
            .send(WriteOp { events, reply })
            .await
            .map_err(|_| unavailable("the spine is shutting down".into()))?;
        answer
            .await
            .map_err(|_| unavailable("the spine writer stopped".into()))?
            .map_err(unavailable)
    }

    /// Reads events by number (each `1..=count`), returning `(kind, event JSON)`.
    async fn read(&self, ids: Vec<u64>) -> Result<Vec<(Arc<str>, Vec<u8>)>, ApiError> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let places: Vec<(u64, u64, Arc<str>)> = {
                let index = state
                    .shared
                    .store
                    .index
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                ids.iter()
                    .map(|&id| {
                        let e = &index.entries[(id - 1) as usize];
                        (e.body_offset, e.body_len, e.kind.clone())
                    })
                    .collect()
            };
            places
                .into_iter()
                .map(|(offset, len, kind)| {
                    let mut body = vec![0u8; len as usize];
                    state.shared.reader.read_exact_at(&mut body, offset)?;
                    let mut hash = [0u8; 32];
                    hash.copy_from_slice(&body[..log::HASH_LEN]);
                    Ok((kind, chain::event_json(&body[log::HASH_LEN..], &hash)))
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("read task failed: {e}"),
            )
        })?
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {} failed: {e}", self.shared.path.display()),
            )
        })
    }

    /// Validates one publish request (audit-stream-py's `PublishRequest`).
    fn prepare(&self, value: Json) -> Result<Prepared, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct PublishRequest {
            kind: String,
            source: String,
            #[serde(default)]
            payload: Map<String, Json>,
            #[serde(default)]
            timestamp: Option<String>,
        }
        let request: PublishRequest = serde_json::from_value(value).map_err(|e| e.to_string())?;
        if !self.shared.kinds.contains(&request.kind) {
            return Err(format!(
                "kind `{}` is not one of: {}",
                request.kind,
                self.shared.kinds.join(", ")
            ));
        }
        if request.source.is_empty() {
            return Err("source must not be empty".into());
        }
        let key = request
            .payload
            .get("event_id")
            .filter(|v| !v.is_null())
            .map(|v| String::from_utf8(chain::canonical(v)).expect("canonical JSON is ASCII"));
        let payload = chain::canonical(&Json::Object(request.payload));
        let timestamp = request
            .timestamp
            .filter(|t| !t.is_empty())
            .unwrap_or_else(now_iso);
        Ok(Prepared {
            kind: request.kind,
            source: request.source,
            timestamp,
            payload,
            key,
        })
    }
}

/// The single writer: takes every waiting request, appends their new events with one
/// write and one fsync, then updates the index and answers.
fn run_writer(mut log: log::Writer, store: Arc<Store>, mut rx: mpsc::Receiver<WriteOp>) {
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.events.iter().map(|e| e.payload.len()).sum::<usize>();
        let mut ops = vec![first];
        while bytes < GROUP_BYTES {
            match rx.try_recv() {
                Ok(op) => {
                    bytes += op.events.iter().map(|e| e.payload.len()).sum::<usize>();
                    ops.push(op);
                }
                Err(_) => break,
            }
        }
        commit(&mut log, &store, ops);
    }
}

fn commit(log: &mut log::Writer, store: &Store, ops: Vec<WriteOp>) {
    struct New {
        body: (u64, u64),
        kind: String,
        source: String,
        key: Option<String>,
        hash: [u8; 32],
    }
    let mut frames = Vec::new();
    let mut added: Vec<New> = Vec::new();
    let mut answers: Vec<Vec<Written>> = Vec::with_capacity(ops.len());
    {
        let index = store.index.read().unwrap_or_else(|p| p.into_inner());
        let mut next_id = index.entries.len() as u64 + 1;
        let mut prev = index.latest_hash_hex();
        let mut in_group: HashMap<&str, u64> = HashMap::new();
        for op in &ops {
            let mut written = Vec::with_capacity(op.events.len());
            for event in &op.events {
                if let Some(key) = &event.key
                    && let Some(&id) = index
                        .idempotency
                        .get(key)
                        .or_else(|| in_group.get(key.as_str()))
                {
                    written.push(Written::Existing { id });
                    continue;
                }
                let body = chain::event_body(
                    next_id,
                    &event.kind,
                    &event.payload,
                    &prev,
                    &event.source,
                    &event.timestamp,
                );
                let hash = chain::hash(&body);
                let body_offset = log.size() + frames.len() as u64 + log::FRAME_HEADER;
                log::encode_frame(&hash, &body, &mut frames);
                if let Some(key) = &event.key {
                    in_group.insert(key, next_id);
                }
                added.push(New {
                    body: (body_offset, (log::HASH_LEN + body.len()) as u64),
                    kind: event.kind.clone(),
                    source: event.source.clone(),
                    key: event.key.clone(),
                    hash,
                });
                written.push(Written::New {
                    json: chain::event_json(&body, &hash),
                });
                prev = hex::encode(hash);
                next_id += 1;
            }
            answers.push(written);
        }
    }
    if !frames.is_empty() {
        if let Err(why) = log.append(&frames) {
            tracing::error!(error = %why, "spine append failed");
            for op in ops {
                let _ = op
                    .reply
                    .send(Err(format!("the spine could not store the events: {why}")));
            }
            return;
        }
        let count = {
            let mut index = store.index.write().unwrap_or_else(|p| p.into_inner());
            for new in added {
                index.push(new.body, &new.kind, &new.source, new.key, new.hash);
            }
            index.committed_len = log.size();
            index.entries.len() as u64
        };
        store.head.send_replace(count);
    }
    for (op, written) in ops.into_iter().zip(answers) {
        let _ = op.reply.send(Ok(written));
    }
}

/// Now as audit-stream-py stamps it: `2026-05-15T03:14:15+00:00`.
fn now_iso() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (y, m, d) = crate::change::json::civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// An error answer: `{"detail": "..."}`, as FastAPI writes them.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, JsonBody(json!({ "detail": self.1 }))).into_response()
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Concatenates event JSON texts into a JSON array.
fn json_array(items: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut out = vec![b'['];
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&item);
    }
    out.push(b']');
    out
}

/// The largest request body the spine reads: a batch of events, or one event with a
/// large value (the sink sends batches of at most 8 MiB, and one event alone when it
/// is larger).
pub const MAX_BODY: usize = 256 << 20;

/// The spine's API over `state`. Request bodies over [`MAX_BODY`] are refused (413).
pub fn router(state: SpineState) -> Router {
    Router::new()
        .route("/", get(info))
        .route("/healthz", get(healthz))
        .route("/events", post(append_one).get(query_events))
        .route("/events/batch", post(append_batch))
        .route("/events/{id}", get(get_event))
        .route("/stream", get(stream))
        .route("/verify", get(verify_chain))
        .route("/stats", get(stats))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(refuse_declared_oversize))
        .with_state(state)
}

/// Refuses a request whose declared length is over [`MAX_BODY`] before its body is
/// read (a body without a declared length is cut at the limit as it streams in).
async fn refuse_declared_oversize(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            JsonBody(json!({"detail": format!("request body over {MAX_BODY} bytes")})),
        )
            .into_response();
    }
    next.run(request).await
}

/// Opens the spine in `dir` and serves it on `listener` until `shutdown` resolves;
/// then ends `/stream` responses, finishes open requests and closes the log. A
/// listener on anything but a loopback address needs a token.
pub async fn serve(
    dir: &Path,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SpineError> {
    if let Ok(addr) = listener.local_addr()
        && !addr.ip().is_loopback()
        && token.is_none()
    {
        return Err(SpineError::OpenWithoutToken { addr });
    }
    let owned = dir.to_path_buf();
    let state = tokio::task::spawn_blocking(move || SpineState::open(&owned, token))
        .await
        .map_err(|e| SpineError::Serve(std::io::Error::other(e)))??;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, dir = %dir.display(), "spine listening");
    }
    let closer = state.clone();
    let result = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(async move {
            shutdown.await;
            closer.close();
        })
        .await;
    let thread = state
        .writer_thread
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    drop(state);
    if let Some(thread) = thread {
        // Every clone is gone once the connections are: the writer sees its channel
        // close, finishes and releases the log.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    result.map_err(SpineError::Serve)
}

async fn info(
    State(state): State<SpineState>,
    headers: HeaderMap,
) -> Result<JsonBody<Json>, ApiError> {
    state.authorize(&headers)?;
    Ok(JsonBody(json!({
        "name": "airlock-spine",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "airlock's built-in audit spine: audit-stream-py's API, durable, hash-chained, idempotent on payload.event_id",
        "endpoints": {
            "GET  /": "this page",
            "GET  /healthz": "liveness probe",
            "POST /events": "append one event",
            "POST /events/batch": "append a list of events, all or nothing",
            "GET  /events": "query events (kind / source / limit)",
            "GET  /events/{id}": "fetch one event",
            "GET  /stream": "live tail via Server-Sent Events (Last-Event-ID replays)",
            "GET  /verify": "verify the hash chain end-to-end",
            "GET  /stats": "summary stats",
        },
    })))
}

async fn healthz() -> JsonBody<Json> {
    JsonBody(json!({"status": "ok"}))
}

async fn append_one(
    State(state): State<SpineState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.authorize(&headers)?;
    let value: Json = serde_json::from_slice(&body)
        .map_err(|e| unprocessable(format!("body is not JSON: {e}")))?;
    let event = state.prepare(value).map_err(unprocessable)?;
    let written = state.append(vec![event]).await?;
    let (status, json) = answer(&state, written).await?;
    Ok(json_response(
        status,
        json.into_iter().next().unwrap_or_default(),
    ))
}

async fn append_batch(
    State(state): State<SpineState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.authorize(&headers)?;
    let value: Json = serde_json::from_slice(&body)
        .map_err(|e| unprocessable(format!("body is not JSON: {e}")))?;
    let Json::Array(items) = value else {
        return Err(unprocessable("body must be a JSON array of events".into()));
    };
    let events = items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            state
                .prepare(v)
                .map_err(|e| unprocessable(format!("event {i}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let written = if events.is_empty() {
        Vec::new()
    } else {
        state.append(events).await?
    };
    let (status, json) = answer(&state, written).await?;
    Ok(json_response(status, json_array(json)))
}

/// The events to answer a write with, and `201` if any is new, else `200`.
async fn answer(
    state: &SpineState,
    written: Vec<Written>,
) -> Result<(StatusCode, Vec<Vec<u8>>), ApiError> {
    let existing: Vec<u64> = written
        .iter()
        .filter_map(|w| match w {
            Written::Existing { id } => Some(*id),
            Written::New { .. } => None,
        })
        .collect();
    let status = if existing.len() < written.len() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut stored = state.read(existing).await?.into_iter();
    let json = written
        .into_iter()
        .map(|w| match w {
            Written::New { json } => json,
            Written::Existing { .. } => stored.next().map(|(_, j)| j).unwrap_or_default(),
        })
        .collect();
    Ok((status, json))
}

fn unprocessable(detail: String) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, detail)
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    kind: Option<String>,
    source: Option<String>,
    limit: Option<i64>,
}

async fn query_events(
    State(state): State<SpineState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    state.authorize(&headers)?;
    let limit = q.limit.unwrap_or(1000);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "limit must be in 1..100000".into(),
        ));
    }
    if let Some(kind) = &q.kind
        && !state.shared.kinds.contains(kind)
    {
        return Err(unprocessable(format!(
            "kind `{kind}` is not one of: {}",
            state.shared.kinds.join(", ")
        )));
    }
    let limit = limit as usize;
    let ids: Vec<u64> = {
        let index = state
            .shared
            .store
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let last = |ids: Option<&Vec<u64>>, source: Option<&str>| -> Vec<u64> {
            let mut out: Vec<u64> = ids
                .into_iter()
                .flatten()
                .rev()
                .filter(|&&id| {
                    source.is_none_or(|s| &*index.entries[(id - 1) as usize].source == s)
                })
                .take(limit)
                .copied()
                .collect();
            out.reverse();
            out
        };
        match (&q.kind, &q.source) {
            (Some(kind), source) => last(index.by_kind.get(kind.as_str()), source.as_deref()),
            (None, Some(source)) => last(index.by_source.get(source.as_str()), None),
            (None, None) => {
                let count = index.entries.len() as u64;
                (count.saturating_sub(limit as u64) + 1..=count).collect()
            }
        }
    };
    let events = state.read(ids).await?;
    Ok(json_response(
        StatusCode::OK,
        json_array(events.into_iter().map(|(_, j)| j)),
    ))
}

async fn get_event(
    State(state): State<SpineState>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    state.authorize(&headers)?;
    let id: u64 = id
        .parse()
        .map_err(|_| unprocessable(format!("event_id must be an integer, got `{id}`")))?;
    if id == 0 || id > state.count() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("unknown event_id: {id}"),
        ));
    }
    let mut events = state.read(vec![id]).await?;
    Ok(json_response(
        StatusCode::OK,
        events.pop().map(|(_, j)| j).unwrap_or_default(),
    ))
}

async fn stream(
    State(state): State<SpineState>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    state.authorize(&headers)?;
    let head = state.shared.store.head.subscribe();
    let closing = state.shared.closing.subscribe();
    let from = match headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::parse::<u64>))
    {
        Some(Ok(Ok(last))) => last + 1,
        Some(_) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID must be an event_id".into(),
            ));
        }
        None => *head.borrow() + 1,
    };
    let events = futures::stream::unfold(
        (state, from, head, closing),
        |(state, next, mut head, mut closing)| async move {
            loop {
                if *closing.borrow_and_update() {
                    return None;
                }
                if next <= *head.borrow_and_update() {
                    let (kind, json) = state.read(vec![next]).await.ok()?.pop()?;
                    let event = Event::default()
                        .event(&*kind)
                        .id(next.to_string())
                        .data(String::from_utf8(json).ok()?);
                    return Some((Ok(event), (state, next + 1, head, closing)));
                }
                tokio::select! {
                    changed = head.changed() => changed.ok()?,
                    changed = closing.changed() => changed.ok()?,
                }
            }
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

async fn verify_chain(
    State(state): State<SpineState>,
    headers: HeaderMap,
) -> Result<JsonBody<Json>, ApiError> {
    state.authorize(&headers)?;
    let len = state
        .shared
        .store
        .index
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .committed_len;
    let path = state.shared.path.clone();
    let report = tokio::task::spawn_blocking(move || verify_file(&path, Some(len)))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("verify task failed: {e}"),
            )
        })?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(JsonBody(serde_json::to_value(report).unwrap_or_default()))
}

async fn stats(
    State(state): State<SpineState>,
    headers: HeaderMap,
) -> Result<JsonBody<Json>, ApiError> {
    state.authorize(&headers)?;
    let index = state
        .shared
        .store
        .index
        .read()
        .unwrap_or_else(|p| p.into_inner());
    let count = index.entries.len();
    Ok(JsonBody(json!({
        "count": count,
        "last_event_id": count,
        "latest_hash": index.latest_hash.map(hex::encode),
    })))
}
