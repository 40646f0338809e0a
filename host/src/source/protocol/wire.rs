//! The frontend/backend protocol's framing, shared by the connection and the
//! replication stream: a backend message is a type byte, an Int32 length and a body.
//!
//! Invariants:
//! - Reads are cancel-safe: all partial input lives in `rbuf`, owned here; a frame is a
//!   zero-copy `split_to().freeze()` of it.
//! - No message longer than [`super::MAX_MESSAGE_LEN`] is buffered.
//! - The write buffer is zeroed after it carried a password or proof.
//! - Notices and parameter changes that arrive at any time are handled here and never
//!   reach the caller.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::super::error::{PgError, SourceError};
use super::{MAX_MESSAGE_LEN, MIN_READ_SPACE, READ_CHUNK};
use crate::change::PG_EPOCH_OFFSET_MICROS;

/// A backend message: type byte and body (without the length).
pub(super) struct Frame {
    pub(super) tag: u8,
    pub(super) body: Bytes,
}

pub(super) type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub(super) type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Buffered, framed I/O shared by the connection and the stream.
pub(super) struct Wire {
    pub(super) reader: Reader,
    pub(super) writer: Writer,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    pub(super) addr: String,
    pub(super) user: String,
}

impl Wire {
    pub(super) fn new(reader: Reader, writer: Writer, addr: String, user: String) -> Self {
        Wire {
            reader,
            writer,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
            addr,
            user,
        }
    }

    pub(super) fn protocol(&self, during: &'static str, reason: impl Into<String>) -> SourceError {
        SourceError::Protocol {
            addr: self.addr.clone(),
            during,
            reason: reason.into(),
        }
    }

    pub(super) fn server(&self, during: &'static str, error: PgError) -> SourceError {
        SourceError::from_server(&self.addr, &self.user, during, error)
    }

    pub(super) fn io(&self, during: &'static str, source: std::io::Error) -> SourceError {
        SourceError::Io {
            addr: self.addr.clone(),
            during,
            source,
        }
    }

    /// The next complete frame already in the buffer, if any.
    pub(super) fn try_frame(&mut self, during: &'static str) -> Result<Option<Frame>, SourceError> {
        let Some(header) = self.rbuf.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| (4..=MAX_MESSAGE_LEN).contains(&l))
            .ok_or_else(|| self.protocol(during, format!("invalid message length {len}")))?;
        let total = len + 1;
        if self.rbuf.len() < total {
            self.rbuf.reserve(total - self.rbuf.len());
            return Ok(None);
        }
        let mut frame = self.rbuf.split_to(total);
        frame.advance(5);
        Ok(Some(Frame {
            tag,
            body: frame.freeze(),
        }))
    }

    /// Reads the next frame. Cancel-safe: partial input stays in `rbuf`.
    pub(super) async fn read_frame(&mut self, during: &'static str) -> Result<Frame, SourceError> {
        loop {
            if let Some(frame) = self.try_frame(during)? {
                return Ok(frame);
            }
            self.fill(during).await?;
        }
    }

    /// Reads more input into `rbuf`. Cancel-safe.
    pub(super) async fn fill(&mut self, during: &'static str) -> Result<(), SourceError> {
        if self.rbuf.capacity() - self.rbuf.len() < MIN_READ_SPACE {
            self.rbuf.reserve(READ_CHUNK);
        }
        match self.reader.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(SourceError::Closed {
                addr: self.addr.clone(),
                during,
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(self.io(during, e)),
        }
    }

    /// Overwrites the whole write buffer with zeros (after it held a secret).
    pub(super) fn zero_write_buffer(&mut self) {
        let capacity = self.wbuf.capacity();
        self.wbuf.clear();
        self.wbuf.resize(capacity, 0);
        self.wbuf.clear();
    }

    /// Writes out everything queued in `wbuf`. Not cancel-safe.
    pub(super) async fn flush(&mut self, during: &'static str) -> Result<(), SourceError> {
        let result = async {
            self.writer.write_all(&self.wbuf).await?;
            self.writer.flush().await
        }
        .await;
        self.wbuf.clear();
        result.map_err(|e| self.io(during, e))
    }

    pub(super) fn queue_query(&mut self, sql: &str) -> Result<(), SourceError> {
        frontend::query(sql, &mut self.wbuf).map_err(|_| SourceError::InvalidSettings {
            reason: "a name in a replication command contains a NUL byte".into(),
        })
    }

    /// Handles the asynchronous messages that may arrive at any time.
    /// Returns the frame back if it is something else.
    pub(super) fn asynchronous(&mut self, frame: Frame) -> Option<Frame> {
        match frame.tag {
            b'N' => {
                log_notice(&parse_error_fields(&frame.body));
                None
            }
            b'S' => {
                let mut parts = frame.body.split(|&b| b == 0);
                let name = String::from_utf8_lossy(parts.next().unwrap_or_default());
                let value = String::from_utf8_lossy(parts.next().unwrap_or_default());
                debug!(name = %name, value = %value, "server parameter");
                None
            }
            _ => Some(frame),
        }
    }
}

pub(super) fn log_notice(notice: &PgError) {
    if notice.severity == "WARNING" {
        warn!(code = %notice.code, message = %notice.message, detail = ?notice.detail, "postgresql warning");
    } else {
        info!(severity = %notice.severity, code = %notice.code, message = %notice.message, detail = ?notice.detail, "postgresql notice");
    }
}

/// Parses the fields of an ErrorResponse or NoticeResponse body.
pub(super) fn parse_error_fields(body: &[u8]) -> PgError {
    let mut error = PgError::default();
    let mut localized_severity = None;
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        rest = tail.get(end + 1..).unwrap_or_default();
        match kind {
            b'V' => error.severity = value,
            b'S' => localized_severity = Some(value),
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    if error.severity.is_empty() {
        error.severity = localized_severity.unwrap_or_default();
    }
    error
}

/// Parses a DataRow body into text columns.
pub(super) fn parse_data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let mut rest = body;
    let count = i16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
    rest = &rest[2..];
    let mut row = Vec::with_capacity(usize::try_from(count).ok()?);
    for _ in 0..count {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = usize::try_from(len).ok()?;
        let value = rest.get(..len)?;
        rest = &rest[len..];
        row.push(Some(String::from_utf8(value.to_vec()).ok()?));
    }
    Some(row)
}

pub(super) fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Now, in PostgreSQL-epoch microseconds.
pub(super) fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}
