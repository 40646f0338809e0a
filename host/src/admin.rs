//! The admin API: health, readiness, status, metrics and reload, on 127.0.0.1 by
//! default. When a token is configured every route but `/healthz` and `/readyz`
//! requires `Authorization: Bearer TOKEN`.
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
use tokio::sync::oneshot;

use crate::pipeline::registry::{ReloadRequest, ReloadTrigger};
use crate::status::Status;

/// What the admin routes need.
#[derive(Clone)]
pub struct AdminState {
    pub status: Arc<Status>,
    pub reload: ReloadTrigger,
    pub token: Option<Arc<str>>,
    /// The lake sinks' writers, for `POST /compact`.
    pub compactors: crate::sink::lake::Compactors,
}

/// The admin API's routes.
pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .route("/compact", post(compact))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(state)
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(json!({"error": "missing or wrong bearer token: send Authorization: Bearer <token from [admin] token_env>"})),
            )
                .into_response();
        }
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
    axum::Json(state.status.to_json()).into_response()
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
    if state
        .reload
        .send(ReloadRequest {
            reason: "admin API",
            reply: Some(tx),
        })
        .is_err()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ok": false, "error": "the host is shutting down"})),
        )
            .into_response();
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
