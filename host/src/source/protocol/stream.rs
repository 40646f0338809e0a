//! The replication stream: after `START_REPLICATION`, CopyBoth messages in both
//! directions: XLogData and keepalives in, standby status updates out.
//!
//! Invariants:
//! - [`ReplicationStream::next`] and [`ReplicationStream::try_next`] are cancel-safe;
//!   [`ReplicationStream::send_status`] is not: await it to completion.
//! - An XLogData payload is a slice of its frame: nothing is copied.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

use super::super::error::SourceError;
use super::ReplicationEvent;
use super::wire::{Wire, be_u64, parse_error_fields, pg_now_micros};
use crate::change::Lsn;

pub(super) const STREAMING: &str = "streaming changes";

/// The CopyBoth stream of a started replication: read events, send status updates.
pub struct ReplicationStream {
    pub(super) wire: Wire,
    pub(super) done: bool,
}

impl fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("addr", &self.wire.addr)
            .field("done", &self.done)
            .finish()
    }
}

impl ReplicationStream {
    /// The next event, or `None` once the server ended the stream with CopyDone.
    ///
    /// Cancel-safe: it can be a branch of `tokio::select!` without losing data.
    pub async fn next(&mut self) -> Result<Option<ReplicationEvent>, SourceError> {
        loop {
            if let Some(event) = self.buffered()? {
                return Ok(event);
            }
            self.wire.fill(STREAMING).await?;
        }
    }

    /// The next event if one is already fully buffered, without waiting for input.
    /// Lets a consumer drain a burst without a `select!` round per message.
    pub fn try_next(&mut self) -> Result<Option<ReplicationEvent>, SourceError> {
        Ok(self.buffered()?.flatten())
    }

    /// `Some(Some(event))`, `Some(None)` at the end of the stream, or `None`
    /// when more input is needed.
    pub(super) fn buffered(&mut self) -> Result<Option<Option<ReplicationEvent>>, SourceError> {
        loop {
            if self.done {
                return Ok(Some(None));
            }
            let Some(frame) = self.wire.try_frame(STREAMING)? else {
                return Ok(None);
            };
            let Some(frame) = self.wire.asynchronous(frame) else {
                continue;
            };
            return match frame.tag {
                b'd' => self.copy_data(frame.body).map(|e| Some(Some(e))),
                // CopyDone; or CommandComplete without CopyDone, which is how a
                // walsender ends the stream when the server shuts down (`WalSndDone`).
                b'c' | b'C' => {
                    self.done = true;
                    Ok(Some(None))
                }
                b'E' => Err(self.wire.server(STREAMING, parse_error_fields(&frame.body))),
                other => Err(self.wire.protocol(
                    STREAMING,
                    format!("unexpected message type {:?}", char::from(other)),
                )),
            };
        }
    }

    pub(super) fn copy_data(&self, body: Bytes) -> Result<ReplicationEvent, SourceError> {
        const DURING: &str = STREAMING;
        match body.first() {
            Some(b'w') => {
                let (Some(wal_start), Some(wal_end), Some(time)) =
                    (be_u64(&body, 1), be_u64(&body, 9), be_u64(&body, 17))
                else {
                    return Err(self.wire.protocol(DURING, "short XLogData header"));
                };
                Ok(ReplicationEvent::XLogData {
                    wal_start: Lsn(wal_start),
                    wal_end: Lsn(wal_end),
                    server_time: time as i64,
                    data: body.slice(25..),
                })
            }
            Some(b'k') => {
                let (Some(wal_end), Some(time), Some(&reply)) =
                    (be_u64(&body, 1), be_u64(&body, 9), body.get(17))
                else {
                    return Err(self.wire.protocol(DURING, "short primary keepalive"));
                };
                Ok(ReplicationEvent::Keepalive {
                    wal_end: Lsn(wal_end),
                    server_time: time as i64,
                    reply_requested: reply != 0,
                })
            }
            Some(&other) => Err(self.wire.protocol(
                DURING,
                format!("unknown CopyData message {:?}", char::from(other)),
            )),
            None => Err(self.wire.protocol(DURING, "empty CopyData")),
        }
    }

    /// Sends a Standby Status Update. Not cancel-safe: await it to completion.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), SourceError> {
        queue_status(
            &mut self.wire.wbuf,
            write,
            flush,
            apply,
            pg_now_micros(),
            reply_requested,
        );
        self.wire.flush("sending a status update").await
    }

    /// Sends CopyDone and Terminate, then closes the connection.
    pub async fn close(mut self) -> Result<(), SourceError> {
        if !self.done {
            frontend::copy_done(&mut self.wire.wbuf);
        }
        frontend::terminate(&mut self.wire.wbuf);
        self.wire.flush("closing the connection").await?;
        let _ = self.wire.writer.shutdown().await;
        Ok(())
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.wire.addr
    }
}

pub(super) fn queue_status(
    buf: &mut BytesMut,
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now: i64,
    reply: bool,
) {
    buf.put_u8(b'd');
    buf.put_i32(4 + 34);
    buf.put_u8(b'r');
    buf.put_u64(write.0);
    buf.put_u64(flush.0);
    buf.put_u64(apply.0);
    buf.put_i64(now);
    buf.put_u8(u8::from(reply));
}
