//! Guest output: the `log` import and the guest's stdout/stderr, line by line into
//! `tracing`, attributed to the guest and rate-limited so a chatty or hostile guest
//! cannot flood the host's logs.
//!
//! Invariants:
//! - A guest line is at most [`MAX_LINE`] bytes when logged (the rest is cut, and the
//!   cut is said), and its control characters (newlines included) are escaped: guest
//!   text can never forge a log line of its own.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use tracing::Level;

/// Longest line kept from a guest (the `log` import, stdout, stderr); the rest of a
/// longer line is cut.
pub const MAX_LINE: usize = 4096;

/// `message` as it may be logged: cut to [`MAX_LINE`] bytes at a character boundary
/// and with every control character escaped (`\n`, `\u{1b}`, ...).
pub fn sanitize(message: &str) -> String {
    let mut end = message.len().min(MAX_LINE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 16);
    for c in message[..end].chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if end < message.len() {
        out.push_str(&format!(" … ({} more bytes cut)", message.len() - end));
    }
    out
}

/// A token bucket over log lines for one guest.
pub struct RateLimitedLog {
    guest: Arc<str>,
    per_second: u32,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(guest: Arc<str>, per_second: u32) -> RateLimitedLog {
        RateLimitedLog {
            guest,
            per_second,
            state: Mutex::new(Bucket {
                tokens: f64::from(per_second),
                last: Instant::now(),
                suppressed: 0,
            }),
        }
    }

    /// Logs one guest line at `level`, unless the guest is over its rate.
    pub fn line(&self, level: Level, message: &str) {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let rate = f64::from(self.per_second);
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * rate).min(rate);
        bucket.last = now;
        if bucket.tokens < 1.0 {
            bucket.suppressed += 1;
            return;
        }
        bucket.tokens -= 1.0;
        let suppressed = std::mem::take(&mut bucket.suppressed);
        drop(bucket);
        if suppressed > 0 {
            tracing::warn!(guest = %self.guest, suppressed, "guest log lines suppressed by the rate limit");
        }
        let guest = &*self.guest;
        let message = sanitize(message);
        match level {
            l if l == Level::TRACE => tracing::trace!(guest, "{message}"),
            l if l == Level::DEBUG => tracing::debug!(guest, "{message}"),
            l if l == Level::INFO => tracing::info!(guest, "{message}"),
            l if l == Level::WARN => tracing::warn!(guest, "{message}"),
            _ => tracing::error!(guest, "{message}"),
        }
    }
}

/// A guest's stdout or stderr: bytes are split into lines and logged.
#[derive(Clone)]
pub struct GuestOutput {
    log: Arc<RateLimitedLog>,
    level: Level,
    pending: Arc<Mutex<Vec<u8>>>,
}

impl GuestOutput {
    pub fn new(log: Arc<RateLimitedLog>, level: Level) -> GuestOutput {
        GuestOutput {
            log,
            level,
            pending: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for &byte in bytes {
            if byte == b'\n' {
                self.log
                    .line(self.level, &String::from_utf8_lossy(&pending));
                pending.clear();
            } else if pending.len() < MAX_LINE {
                pending.push(byte);
            }
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl Pollable for GuestOutput {
    fn ready<'a, 'b>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
    {
        Box::pin(async {})
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_lines_are_cut_and_cannot_forge_log_lines() {
        assert_eq!(
            sanitize("ok\n2026-01-01T00:00:00Z  INFO airlock: forged\r\u{1b}[31m"),
            "ok\\n2026-01-01T00:00:00Z  INFO airlock: forged\\r\\u{1b}[31m"
        );
        let long = "é".repeat(MAX_LINE);
        let cut = sanitize(&long);
        assert!(cut.starts_with(&"é".repeat(MAX_LINE / 2)));
        assert!(
            cut.ends_with(&format!("({} more bytes cut)", long.len() - MAX_LINE)),
            "{cut}"
        );
        assert_eq!(sanitize("plain"), "plain");
    }
}
