//! Guest output: the `log` import and the guest's stdout/stderr, line by line into
//! `tracing`, attributed to the guest and rate-limited so a chatty or hostile guest
//! cannot flood the host's logs.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::guest::wit::Level;

/// Longest line kept from guest stdout/stderr; the rest of a longer line is cut.
const MAX_LINE: usize = 4096;

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
        match level {
            Level::Trace => tracing::trace!(guest, "{message}"),
            Level::Debug => tracing::debug!(guest, "{message}"),
            Level::Info => tracing::info!(guest, "{message}"),
            Level::Warn => tracing::warn!(guest, "{message}"),
            Level::Error => tracing::error!(guest, "{message}"),
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
