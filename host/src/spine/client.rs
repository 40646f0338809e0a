//! The client side of the spine: one HTTP client for any spine with audit-stream-py's
//! API (`POST /events`, `POST /events/batch`, `GET /events`, ...).
//!
//! Invariants:
//! - Redirects are never followed: a redirected POST would come back as a GET whose
//!   2xx says nothing of delivery. A 3xx is a [`ClientError::Definite`] naming where
//!   it points.
//! - Every error says whether trying again can help: unreachable, timed out, 5xx, 408
//!   and 429 are [`ClientError::Transient`]; other 4xx, a bad URL or an answer that is
//!   not the API's are [`ClientError::Definite`].
//! - No text shown or logged carries the URL's user information.

use std::error::Error as _;
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use serde_json::Value as Json;

/// Why a request to the spine failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Trying again may help (the spine is down, slow or busy).
    #[error("{0}")]
    Transient(String),
    /// Trying again will not help (a refused request, a wrong URL or token).
    #[error("{0}")]
    Definite(String),
}

impl ClientError {
    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Transient(_))
    }
}

/// An HTTP client for an audit-stream-py compatible spine: one `reqwest::Client`, so
/// connections persist.
#[derive(Clone, Debug)]
pub struct SpineClient {
    http: reqwest::Client,
    events_url: String,
    /// `events_url` as it may be shown: user information replaced by `***`.
    shown_url: String,
    token: Option<String>,
}

impl SpineClient {
    /// A client for the spine whose events endpoint is `url` (`http://h:p/events`; a
    /// URL without the `/events` path gets it added).
    pub fn new(
        url: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<SpineClient, ClientError> {
        let definite = ClientError::Definite;
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| definite(format!("url `{url}` is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(definite(format!(
                "url `{url}`: expected http:// or https://"
            )));
        }
        let trimmed = url.trim_end_matches('/');
        let events_url = if parsed.path().trim_end_matches('/').ends_with("/events") {
            trimmed.to_owned()
        } else {
            format!("{trimmed}/events")
        };
        // A redirect is never followed: reqwest would turn a redirected POST into a GET
        // whose 2xx then counted as delivered. Any 3xx is a definite error (`check`).
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| definite(format!("cannot build the HTTP client: {e}")))?;
        Ok(SpineClient {
            http,
            shown_url: crate::secrets::redact_url(&events_url),
            events_url,
            token,
        })
    }

    /// The events endpoint as it may be logged or shown (no user information).
    pub fn shown_url(&self) -> &str {
        &self.shown_url
    }

    /// POSTs one event (a JSON object); returns the stored event.
    pub async fn publish(&self, event: impl Into<Bytes>) -> Result<Json, ClientError> {
        let answer = self
            .send(self.http.post(&self.events_url), Some(event.into()))
            .await?;
        self.check(&answer, "POST")?;
        self.json(&answer.body)
    }

    /// POSTs a JSON array of events to `{url}/batch`; `Ok(None)` when the spine has no
    /// batch endpoint (audit-stream-py answers 404 or 405).
    pub async fn publish_batch(
        &self,
        events: impl Into<Bytes>,
    ) -> Result<Option<Json>, ClientError> {
        let url = format!("{}/batch", self.events_url);
        let answer = self.send(self.http.post(&url), Some(events.into())).await?;
        if matches!(
            answer.status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) {
            return Ok(None);
        }
        self.check(&answer, "POST /batch")?;
        self.json(&answer.body).map(Some)
    }

    /// `GET {url}?kind=&source=&limit=`: the newest `limit` matching events, oldest first.
    pub async fn events(
        &self,
        kind: Option<&str>,
        source: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Json>, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        query.extend(kind.map(|k| ("kind", k.to_owned())));
        query.extend(source.map(|s| ("source", s.to_owned())));
        let answer = self
            .send(self.http.get(&self.events_url).query(&query), None)
            .await?;
        self.check(&answer, "GET")?;
        match self.json(&answer.body)? {
            Json::Array(events) => Ok(events),
            other => Err(ClientError::Definite(format!(
                "GET {} answered {other} instead of a list of events",
                self.shown_url
            ))),
        }
    }

    /// `GET` a path of the spine beside `/events` (`/stats`, `/verify`, `/events/7`).
    pub async fn get(&self, path: &str) -> Result<Json, ClientError> {
        let base = self
            .events_url
            .strip_suffix("/events")
            .unwrap_or(&self.events_url);
        let answer = self
            .send(self.http.get(format!("{base}{path}")), None)
            .await?;
        self.check(&answer, "GET")?;
        self.json(&answer.body)
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        body: Option<Bytes>,
    ) -> Result<Answer, ClientError> {
        let mut request = request;
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let unreachable = |e: reqwest::Error| {
            let mut message = format!("spine at {} unreachable: {e}", self.shown_url);
            let mut source = e.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            // reqwest's own text names the URL it was given, credentials and all.
            ClientError::Transient(crate::secrets::redact_url(&message))
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let location = status.is_redirection().then(|| {
            let to = response.headers().get(reqwest::header::LOCATION)?;
            let to = String::from_utf8_lossy(to.as_bytes());
            // Relative to the address asked; shown escaped and cut short, as the
            // server's text it is.
            let to = response
                .url()
                .join(&to)
                .map_or(to.into_owned(), String::from);
            Some(to.chars().take(500).flat_map(char::escape_debug).collect())
        });
        let body = response.bytes().await.map_err(unreachable)?;
        Ok(Answer {
            status,
            location: location.flatten(),
            body,
        })
    }

    fn check(&self, answer: &Answer, what: &str) -> Result<(), ClientError> {
        let status = answer.status;
        if status.is_success() {
            return Ok(());
        }
        if status.is_redirection() {
            let to = answer.location.as_deref().unwrap_or("(no Location given)");
            return Err(ClientError::Definite(format!(
                "{what} {}: the spine answered a redirect ({status}) to {to}; airlock does not \
                 follow redirects: set `url` to the final address",
                self.shown_url
            )));
        }
        let mut answer = String::from_utf8_lossy(&answer.body).into_owned();
        if answer.len() > 2000 {
            let cut = (0..=2000)
                .rev()
                .find(|&i| answer.is_char_boundary(i))
                .unwrap_or(0);
            answer.truncate(cut);
            answer.push_str("...");
        }
        let message = format!("{what} {} answered {status}: {answer}", self.shown_url);
        let transient = status.is_server_error()
            || matches!(
                status,
                StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
            );
        Err(if transient {
            ClientError::Transient(message)
        } else {
            ClientError::Definite(message)
        })
    }

    fn json(&self, body: &[u8]) -> Result<Json, ClientError> {
        serde_json::from_slice(body).map_err(|e| {
            ClientError::Definite(format!(
                "the spine at {} answered invalid JSON: {e}",
                self.shown_url
            ))
        })
    }
}

/// What the spine answered to one request.
struct Answer {
    status: StatusCode,
    /// Where a 3xx points (resolved against the request's address), for the error.
    location: Option<String>,
    body: Bytes,
}
