//! The admin API: health, readiness, status, metrics and reload, on 127.0.0.1 by
//! default.
//!
//! Invariants:
//! - When a token is configured (`[admin] token_env`), every route but `/healthz` and
//!   `/readyz` requires `Authorization: Bearer TOKEN`. A listener on anything but a
//!   loopback address must have one (the configuration refuses it otherwise).
//! - The routes that act (`POST /reload`, `POST /compact`) always require a token:
//!   without a configured one, the host makes a random one per run and writes it to
//!   [`local_token_path`] (mode 0600, in a 0700 directory), where `airlock reload`
//!   and `airlock compact` of the same user find it. Another local user reaching the
//!   port cannot act.
//! - No route reads a request body: a declared body over [`BODY_LIMIT`] is refused
//!   with 413 before any handler runs. Reload requests wait in a bounded queue; when
//!   it is full the answer is 429.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /healthz` | `ok` while the process runs |
//! | `GET /readyz` | 200 once streaming or snapshotting, else 503 |
//! | `GET /status` | JSON: source, slot, LSNs, lag, pipeline and stages, sinks, last error |
//! | `GET /metrics` | Prometheus text |
//! | `POST /reload` | rebuilds the pipeline from the plugin folder; 200 with the new version, or 409 with why not |
//! | `POST /compact` | compacts every table of every lake sink now, serially inside the writer; 200 with a report per table |

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::oneshot;

use crate::pipeline::registry::{ReloadRequest, ReloadTrigger};
use crate::status::Status;

/// The largest request body the admin API accepts (none of its routes reads one).
pub const BODY_LIMIT: u64 = 64 << 10;

/// What the admin routes need.
#[derive(Clone)]
pub struct AdminState {
    pub status: Arc<Status>,
    pub reload: ReloadTrigger,
    /// The configured token: every route but the probes requires it.
    pub token: Option<Arc<str>>,
    /// The token the routes that act require: the configured one, or the host's own
    /// per-run token (see [`local_token_path`]).
    pub control_token: Arc<str>,
    /// The lake sinks' writers, for `POST /compact`.
    pub compactors: crate::sink::lake::Compactors,
}

/// The admin API's routes.
pub fn router(state: AdminState) -> Router {
    let control = Router::new()
        .route("/reload", post(reload))
        .route("/compact", post(compact))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_control_token,
        ));
    let protected = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .merge(control)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .layer(middleware::from_fn(limit_body))
        .with_state(state)
}

/// Where a host without a configured token keeps its per-run control token for the
/// admin API on `addr`: `$XDG_RUNTIME_DIR/airlock/admin-PORT.token`, else
/// `~/.local/state/airlock/admin-PORT.token`. `None` without either variable.
pub fn local_token_path(addr: std::net::SocketAddr) -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| std::path::PathBuf::from(h).join(".local/state"))
        })?;
    Some(
        base.join("airlock")
            .join(format!("admin-{}.token", addr.port())),
    )
}

/// A new random token: 32 bytes from the operating system, hex-encoded.
pub fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    crate::secrets::random_bytes(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The per-run control token's file; removed when the host stops.
#[derive(Debug)]
pub struct LocalTokenFile(std::path::PathBuf);

impl Drop for LocalTokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes the per-run control token to `path` (0600, directory 0700), replacing an
/// older one.
pub fn write_local_token(path: &std::path::Path, token: &str) -> std::io::Result<LocalTokenFile> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        crate::private_files::create_dir_all(dir)?;
    }
    let mut file = crate::private_files::create(path)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    Ok(LocalTokenFile(path.to_owned()))
}

/// The control token a host on `addr` wrote to its token file, when this user can
/// read one.
pub fn read_local_token(addr: std::net::SocketAddr) -> Option<String> {
    let text = std::fs::read_to_string(local_token_path(addr)?).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

fn presents(request: &Request, token: &str) -> bool {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|p| crate::secrets::constant_time_eq(p.as_bytes(), token.as_bytes()))
}

fn unauthorized(hint: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(json!({ "error": format!("missing or wrong bearer token: {hint}") })),
    )
        .into_response()
}

async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token
        && !presents(&request, token)
    {
        return unauthorized("send Authorization: Bearer <token from [admin] token_env>");
    }
    next.run(request).await
}

async fn require_control_token(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    if !presents(&request, &state.control_token) {
        return unauthorized(
            "reload and compact need the [admin] token_env token, or, without one, the \
             host's own token from its token file (`airlock reload --config F` reads it)",
        );
    }
    next.run(request).await
}

async fn limit_body(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = request.headers().contains_key(header::TRANSFER_ENCODING);
    if chunked || declared.is_some_and(|n| n > BODY_LIMIT) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            axum::Json(json!({"error": format!("the admin API reads no request body (at most {BODY_LIMIT} bytes accepted)")})),
        )
            .into_response();
    }
    next.run(request).await
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.status.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn status(State(state): State<AdminState>) -> Response {
    axum::Json(state.status.report()).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.status.metrics.render(),
    )
        .into_response()
}

async fn reload(State(state): State<AdminState>) -> Response {
    let (tx, rx) = oneshot::channel();
    match state.reload.try_send(ReloadRequest {
        reason: "admin API",
        reply: Some(tx),
    }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(json!({"ok": false, "error": "reloads are already queued: try again when they finish"})),
            )
                .into_response();
        }
        Err(TrySendError::Closed(_)) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"ok": false, "error": "the host is shutting down"})),
            )
                .into_response();
        }
    }
    match tokio::time::timeout(Duration::from_secs(120), rx).await {
        Ok(Ok(Ok(version))) => axum::Json(json!({"ok": true, "version": version})).into_response(),
        Ok(Ok(Err(error))) => (
            StatusCode::CONFLICT,
            axum::Json(json!({"ok": false, "error": error})),
        )
            .into_response(),
        _ => (
            StatusCode::GATEWAY_TIMEOUT,
            axum::Json(json!({"ok": false, "error": "the reload did not finish within 120 s"})),
        )
            .into_response(),
    }
}

async fn compact(State(state): State<AdminState>) -> Response {
    match state.compactors.compact_all().await {
        Ok(reports) => axum::Json(json!({"ok": true, "tables": reports})).into_response(),
        Err(error) => (
            StatusCode::CONFLICT,
            axum::Json(json!({"ok": false, "error": error.to_string()})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves the admin API on a free loopback port; returns its address and the
    /// reload queue's receiving end (nobody serves it unless the test does).
    async fn serve_admin(
        token: Option<&str>,
        control: &str,
    ) -> (String, tokio::sync::mpsc::Receiver<ReloadRequest>) {
        let (reload, requests) =
            tokio::sync::mpsc::channel(crate::pipeline::registry::RELOAD_QUEUE);
        let state = AdminState {
            status: Arc::new(Status::default()),
            reload,
            token: token.map(Arc::from),
            control_token: Arc::from(control),
            compactors: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(serve(listener, state, std::future::pending()));
        (addr, requests)
    }

    /// Regression: without `[admin] token_env`, anyone reaching the port (any local
    /// user) could reload the pipeline and compact the lake.
    #[tokio::test]
    async fn acting_routes_need_the_control_token_even_without_a_configured_one() {
        let (addr, mut requests) = serve_admin(None, "per-run-secret").await;
        let http = reqwest::Client::new();
        for path in ["/reload", "/compact"] {
            let url = format!("http://{addr}{path}");
            let answer = http.post(&url).send().await.unwrap();
            assert_eq!(answer.status(), 401, "{path} without a token");
            let answer = http.post(&url).bearer_auth("guess").send().await.unwrap();
            assert_eq!(answer.status(), 401, "{path} with a wrong token");
        }
        assert!(requests.try_recv().is_err(), "no reload was queued");
        // Reading stays open on loopback without a configured token.
        let status = http
            .get(format!("http://{addr}/status"))
            .send()
            .await
            .unwrap();
        assert_eq!(status.status(), 200);
        // With the token the reload is queued (and answered here).
        tokio::spawn(async move {
            if let Some(request) = requests.recv().await {
                let _ = request.reply.unwrap().send(Ok("v2".into()));
            }
        });
        let answer = http
            .post(format!("http://{addr}/reload"))
            .bearer_auth("per-run-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }

    #[tokio::test]
    async fn bodies_past_the_limit_are_refused_and_the_reload_queue_is_bounded() {
        let (addr, requests) = serve_admin(Some("t"), "t").await;
        let http = reqwest::Client::new();
        let answer = http
            .post(format!("http://{addr}/reload"))
            .bearer_auth("t")
            .body(vec![b'x'; (BODY_LIMIT + 1) as usize])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 413);

        // Nobody serves the queue: it fills, then a further reload is refused at once.
        let mut waiting = Vec::new();
        for _ in 0..crate::pipeline::registry::RELOAD_QUEUE {
            let request = http
                .post(format!("http://{addr}/reload"))
                .bearer_auth("t")
                .send();
            waiting.push(tokio::spawn(request));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while requests.len() < crate::pipeline::registry::RELOAD_QUEUE {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue never filled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let answer = http
            .post(format!("http://{addr}/reload"))
            .bearer_auth("t")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 429);
        for request in waiting {
            request.abort();
        }
    }

    #[test]
    fn the_token_file_is_private_and_removed_with_its_guard() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("airlock-admin-token-{}", std::process::id()));
        let path = dir.join("airlock").join("admin-1.token");
        let guard = write_local_token(&path, "abc").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abc");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        drop(guard);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
