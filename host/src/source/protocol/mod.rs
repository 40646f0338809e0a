//! Our own replication client: PostgreSQL's frontend/backend protocol v3 in
//! replication mode, on tokio and postgres-protocol (tokio-postgres has no
//! replication mode).
//!
//! ```text
//! ReplicationConnection::connect ── startup (replication=database) ── auth (trust, password,
//!   │                                 md5, SCRAM-SHA-256) ── ParameterStatus* ── ReadyForQuery
//!   ├─ identify_system()      IDENTIFY_SYSTEM
//!   ├─ create_logical_slot()  CREATE_REPLICATION_SLOT "s" [TEMPORARY] LOGICAL pgoutput (SNAPSHOT ..)
//!   └─ start_replication()    START_REPLICATION SLOT "s" LOGICAL X/Y (proto_version '2', ..)
//!          │  CopyBothResponse
//!          ▼
//!      ReplicationStream ── next() ◀── CopyData('w' XLogData | 'k' keepalive) | CopyDone
//!                        └─ send_status() ──▶ CopyData('r' standby status update)
//! ```
//!
//! TLS (`sslmode`) is negotiated right after the TCP connect, before the startup
//! packet: see [`super::tls`].
//!
//! Invariants:
//! - The password never appears in `Debug` output, in errors or in logs;
//!   [`ConnectConfig::redacted_url`] shows it as `***`.
//! - Reads are cancel-safe: all partial input lives in a `BytesMut` owned by the
//!   connection, so [`ReplicationStream::next`] can sit in `tokio::select!`.
//!   Writes ([`ReplicationStream::send_status`]) are not: await them to completion.
//! - Backend messages are framed here (type byte + Int32 length), because
//!   postgres-protocol's parser does not know CopyBothResponse. A frame is a
//!   zero-copy `split_to().freeze()` of the read buffer; an XLogData payload is a
//!   slice of that frame.
//! - The session pins the text output of values ([`SESSION_OPTIONS`],
//!   `client_encoding=UTF8`), which `text.rs` relies on.

mod stream;
mod wire;

use std::fmt;

use bytes::Bytes;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tracing::debug;
use zeroize::Zeroize;

pub use self::stream::ReplicationStream;
use self::wire::{Reader, Wire, Writer, log_notice, parse_data_row, parse_error_fields};
use super::auth::{AuthCheck, ChannelBinding};
pub use super::connect::{CONNECT_TIMEOUT, ConnectConfig, SESSION_OPTIONS, SSL_MODES, SslMode};
use super::error::{PgError, SourceError};
use crate::change::Lsn;

pub(super) const READ_CHUNK: usize = 128 * 1024;
pub(super) const MIN_READ_SPACE: usize = 8 * 1024;
/// PostgreSQL never sends a message larger than 1 GB.
pub(super) const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Quotes an identifier for a replication command: `"name"` with `"` doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for a replication command: `'text'` with `'` doubled
/// (the replication grammar has no backslash escapes).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Result of IDENTIFY_SYSTEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// What CREATE_REPLICATION_SLOT does with the slot's snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it for other sessions (`SET TRANSACTION SNAPSHOT`).
    Export,
    NoExport,
    /// Use it in the current transaction (only inside a transaction).
    Use,
}

impl SnapshotAction {
    fn keyword(self) -> &'static str {
        match self {
            SnapshotAction::Export => "export",
            SnapshotAction::NoExport => "nothing",
            SnapshotAction::Use => "use",
        }
    }
}

/// Result of CREATE_REPLICATION_SLOT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot_name: String,
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
}

/// One message of the replication stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// A pgoutput message; `data` is a zero-copy slice of the read buffer.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        /// Server clock, PostgreSQL-epoch microseconds.
        server_time: i64,
        data: Bytes,
    },
    /// A primary keepalive: `wal_end` is what the server has sent so far.
    Keepalive {
        wal_end: Lsn,
        server_time: i64,
        reply_requested: bool,
    },
}

/// A connection in replication mode, ready for replication commands.
pub struct ReplicationConnection {
    wire: Wire,
    /// PostgreSQL's `server_version` parameter, e.g. `15.8`.
    server_version: Option<String>,
    backend_pid: Option<i32>,
}

impl fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("addr", &self.wire.addr)
            .field("server_version", &self.server_version)
            .field("backend_pid", &self.backend_pid)
            .finish()
    }
}

impl ReplicationConnection {
    /// Connects, authenticates and waits for ReadyForQuery (at most [`CONNECT_TIMEOUT`]).
    pub async fn connect(config: &ConnectConfig) -> Result<Self, SourceError> {
        config.check_tls()?;
        let addr = config.addr();
        let setup = async {
            let (reader, writer, tls) = open(config, &addr).await?;
            Self::handshake(reader, writer, tls, config).await
        };
        tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .map_err(|_| SourceError::ConnectTimeout {
                addr: addr.clone(),
                seconds: CONNECT_TIMEOUT.as_secs(),
            })?
    }

    /// Startup and authentication over an already open stream.
    async fn handshake(
        reader: Reader,
        writer: Writer,
        tls: Option<TlsInfo>,
        config: &ConnectConfig,
    ) -> Result<Self, SourceError> {
        let end_point = tls.as_ref().and_then(|t| t.end_point.clone());
        let mut wire = Wire::new(reader, writer, config.addr(), config.user.clone());
        const DURING: &str = "authenticating";
        frontend::startup_message(
            [
                ("user", config.user.as_str()),
                ("database", config.dbname.as_str()),
                ("replication", "database"),
                ("application_name", "airlock"),
                ("client_encoding", "UTF8"),
                ("options", SESSION_OPTIONS),
            ],
            &mut wire.wbuf,
        )
        .map_err(|_| SourceError::InvalidUrl {
            reason: "the user or database name contains a NUL byte".into(),
        })?;
        wire.flush(DURING).await?;

        let auth_error = |wire: &Wire, reason: String| SourceError::Auth {
            user: wire.user.clone(),
            addr: wire.addr.clone(),
            reason,
        };
        let password = |wire: &Wire| {
            config.password.as_deref().ok_or_else(|| {
                auth_error(
                    wire,
                    "the server asks for a password but the source url has none".into(),
                )
            })
        };
        let mut check = AuthCheck::new(config.auth);
        if tls.is_some() {
            check.set_tls(end_point.is_some());
        }
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = wire.read_frame(DURING).await?;
            let Some(frame) = wire.asynchronous(frame) else {
                continue;
            };
            match frame.tag {
                b'R' => {}
                b'E' => {
                    let error = with_tls_hint(parse_error_fields(&frame.body), config.sslmode);
                    return Err(wire.server(DURING, error));
                }
                other => {
                    return Err(wire.protocol(
                        DURING,
                        format!("unexpected message type {:?}", char::from(other)),
                    ));
                }
            }
            let body = &frame.body[..];
            let code = body
                .get(..4)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| wire.protocol(DURING, "short authentication message"))?;
            let data = &body[4..];
            // Refused requests get no answer: nothing is sent, the connection ends.
            check
                .on_request(code, data)
                .map_err(|reason| auth_error(&wire, reason))?;
            match code {
                0 => break,
                3 => {
                    let password = password(&wire)?;
                    frontend::password_message(password.as_bytes(), &mut wire.wbuf).map_err(
                        |_| auth_error(&wire, "the password contains a NUL byte".into()),
                    )?;
                }
                5 => {
                    let salt: [u8; 4] = data
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| wire.protocol(DURING, "short md5 salt"))?;
                    let mut hash =
                        md5_hash(config.user.as_bytes(), password(&wire)?.as_bytes(), salt);
                    frontend::password_message(hash.as_bytes(), &mut wire.wbuf)
                        .map_err(|e| wire.io(DURING, e))?;
                    hash.zeroize();
                }
                10 => {
                    // Over TLS the client can bind; it says so (`y`) even when it
                    // does not use -PLUS, so a server that offers -PLUS detects a
                    // mechanism list stripped in the middle.
                    let (binding, mechanism) = match &end_point {
                        Some(hash) if check.use_plus() => (
                            sasl::ChannelBinding::tls_server_end_point(hash.clone()),
                            sasl::SCRAM_SHA_256_PLUS,
                        ),
                        Some(_) if config.auth.channel_binding != ChannelBinding::Disable => {
                            (sasl::ChannelBinding::unrequested(), sasl::SCRAM_SHA_256)
                        }
                        _ => (sasl::ChannelBinding::unsupported(), sasl::SCRAM_SHA_256),
                    };
                    let state = ScramSha256::new(password(&wire)?.as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, state.message(), &mut wire.wbuf)
                        .map_err(|e| wire.io(DURING, e))?;
                    scram = Some(state);
                }
                11 => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| wire.protocol(DURING, "SASL continue before SASL start"))?;
                    state
                        .update(data)
                        .map_err(|e| auth_error(&wire, format!("SCRAM exchange failed: {e}")))?;
                    frontend::sasl_response(state.message(), &mut wire.wbuf)
                        .map_err(|e| wire.io(DURING, e))?;
                }
                12 => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| wire.protocol(DURING, "SASL final before SASL start"))?;
                    state.finish(data).map_err(|e| {
                        auth_error(
                            &wire,
                            format!("the server's SCRAM signature did not verify: {e}"),
                        )
                    })?;
                    continue;
                }
                _ => unreachable!("AuthCheck refuses every other request"),
            }
            wire.flush(DURING).await?;
            // What was written held the password (or a proof from it): zero it.
            wire.zero_write_buffer();
        }

        let mut server_version = None;
        let mut backend_pid = None;
        loop {
            let frame = wire.read_frame(DURING).await?;
            match frame.tag {
                b'Z' => break,
                b'S' => {
                    let mut parts = frame.body.split(|&b| b == 0);
                    if parts.next() == Some(b"server_version") {
                        server_version = parts
                            .next()
                            .map(|v| String::from_utf8_lossy(v).into_owned());
                    }
                }
                b'K' => backend_pid = be_i32(&frame.body),
                b'N' => log_notice(&parse_error_fields(&frame.body)),
                b'E' => return Err(wire.server(DURING, parse_error_fields(&frame.body))),
                other => {
                    return Err(wire.protocol(
                        DURING,
                        format!("unexpected message type {:?}", char::from(other)),
                    ));
                }
            }
        }
        debug!(addr = %wire.addr, server_version = ?server_version, backend_pid = ?backend_pid, "replication connection ready");
        Ok(ReplicationConnection {
            wire,
            server_version,
            backend_pid,
        })
    }

    pub fn server_version(&self) -> Option<&str> {
        self.server_version.as_deref()
    }

    /// The server's major version (`15` for `15.8 (Debian 15.8-1)`), if it said.
    pub fn server_major(&self) -> Option<u32> {
        let version = self.server_version.as_deref()?;
        let digits = version.split(|c: char| !c.is_ascii_digit()).next()?;
        digits.parse().ok()
    }

    /// The process id of the walsender serving this connection.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// Runs a replication command that returns rows (text format).
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        self.query(sql, "running a replication command").await
    }

    async fn query(
        &mut self,
        sql: &str,
        during: &'static str,
    ) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        self.wire.queue_query(sql)?;
        self.wire.flush(during).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.wire.read_frame(during).await?;
            let Some(frame) = self.wire.asynchronous(frame) else {
                continue;
            };
            match frame.tag {
                b'T' | b'C' | b'I' => {}
                b'D' => rows.push(
                    parse_data_row(&frame.body)
                        .ok_or_else(|| self.wire.protocol(during, "malformed DataRow"))?,
                ),
                b'E' => error = Some(parse_error_fields(&frame.body)),
                b'Z' => break,
                other => {
                    return Err(self.wire.protocol(
                        during,
                        format!(
                            "unexpected message type {:?} in reply to a simple query",
                            char::from(other)
                        ),
                    ));
                }
            }
        }
        match error {
            Some(error) => Err(self.wire.server(during, error)),
            None => Ok(rows),
        }
    }

    /// IDENTIFY_SYSTEM.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, SourceError> {
        const DURING: &str = "identifying the system";
        let rows = self.query("IDENTIFY_SYSTEM", DURING).await?;
        let row = rows.first().filter(|r| r.len() >= 4).ok_or_else(|| {
            self.wire
                .protocol(DURING, "IDENTIFY_SYSTEM returned no row of 4 columns")
        })?;
        let bad = |what: &str| {
            self.wire
                .protocol(DURING, format!("bad {what} in IDENTIFY_SYSTEM"))
        };
        Ok(SystemInfo {
            system_id: row[0].clone().ok_or_else(|| bad("systemid"))?,
            timeline: row[1]
                .as_deref()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("timeline"))?,
            xlogpos: row[2]
                .as_deref()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("xlogpos"))?,
            dbname: row[3].clone(),
        })
    }

    /// CREATE_REPLICATION_SLOT for pgoutput (PostgreSQL 15 syntax).
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<SlotInfo, SourceError> {
        const DURING: &str = "creating the replication slot";
        let sql = create_slot_command(name, temporary, snapshot);
        let rows = self.query(&sql, DURING).await?;
        let row = rows.first().filter(|r| r.len() >= 3).ok_or_else(|| {
            self.wire
                .protocol(DURING, "CREATE_REPLICATION_SLOT returned no row")
        })?;
        Ok(SlotInfo {
            slot_name: row[0].clone().unwrap_or_else(|| name.to_owned()),
            consistent_point: row[1]
                .as_deref()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| self.wire.protocol(DURING, "bad consistent_point"))?,
            snapshot_name: row[2].clone(),
        })
    }

    /// START_REPLICATION for pgoutput (see [`Pgoutput::for_server`]); waits for
    /// CopyBothResponse.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publications: &[String],
    ) -> Result<ReplicationStream, SourceError> {
        const DURING: &str = "starting replication";
        let pgoutput = Pgoutput::for_server(self.server_major());
        let sql = start_replication_command(slot, start, publications, pgoutput);
        self.wire.queue_query(&sql)?;
        self.wire.flush(DURING).await?;
        loop {
            let frame = self.wire.read_frame(DURING).await?;
            let Some(frame) = self.wire.asynchronous(frame) else {
                continue;
            };
            match frame.tag {
                b'W' => break,
                b'E' => return Err(self.wire.server(DURING, parse_error_fields(&frame.body))),
                other => {
                    return Err(self.wire.protocol(
                        DURING,
                        format!(
                            "expected CopyBothResponse, got message type {:?}",
                            char::from(other)
                        ),
                    ));
                }
            }
        }
        Ok(ReplicationStream {
            wire: self.wire,
            done: false,
        })
    }

    /// Sends Terminate and closes the connection.
    pub async fn close(mut self) -> Result<(), SourceError> {
        frontend::terminate(&mut self.wire.wbuf);
        self.wire.flush("closing the connection").await?;
        let _ = self.wire.writer.shutdown().await;
        Ok(())
    }
}

/// A server that takes this user only over TLS (`hostssl` in pg_hba.conf) refuses a
/// plain connection with `no pg_hba.conf entry for … no encryption`: say what to change.
fn with_tls_hint(mut error: PgError, mode: SslMode) -> PgError {
    if error.code == "28000" && error.message.contains("no encryption") && error.hint.is_none() {
        error.hint = Some(format!(
            "the connection was not encrypted (sslmode={}); if pg_hba.conf accepts this user only with hostssl, set sslmode = \"verify-full\" (or \"require\")",
            mode.as_str()
        ));
    }
    error
}

fn be_i32(bytes: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// What a TLS connection tells the authentication: the channel binding data.
struct TlsInfo {
    end_point: Option<Vec<u8>>,
}

/// Opens the TCP (or Unix socket) connection, with TLS as `sslmode` says (never on
/// a Unix socket), split into boxed halves.
async fn open(
    config: &ConnectConfig,
    addr: &str,
) -> Result<(Reader, Writer, Option<TlsInfo>), SourceError> {
    let connect_error = |source| SourceError::Connect {
        addr: addr.to_owned(),
        source,
    };
    #[cfg(unix)]
    if config.is_unix_socket() {
        let stream = tokio::net::UnixStream::connect(config.socket_path())
            .await
            .map_err(connect_error)?;
        let (r, w) = stream.into_split();
        return Ok((Box::new(r), Box::new(w), None));
    }
    let stream = tokio::net::TcpStream::connect((config.host.as_str(), config.port))
        .await
        .map_err(connect_error)?;
    stream.set_nodelay(true).map_err(connect_error)?;
    match super::tls::negotiate(stream, config, addr).await? {
        Ok((tls, end_point)) => {
            debug!(addr = %addr, sslmode = config.sslmode.as_str(), channel_binding = end_point.is_some(), "tls established");
            let (r, w) = tokio::io::split(tls);
            Ok((Box::new(r), Box::new(w), Some(TlsInfo { end_point })))
        }
        Err(plain) => {
            let (r, w) = plain.into_split();
            Ok((Box::new(r), Box::new(w), None))
        }
    }
}

fn create_slot_command(name: &str, temporary: bool, snapshot: SnapshotAction) -> String {
    format!(
        "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput (SNAPSHOT '{}')",
        quote_ident(name),
        if temporary { " TEMPORARY" } else { "" },
        snapshot.keyword()
    )
}

/// What airlock asks pgoutput for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pgoutput {
    /// Protocol version 1: a transaction comes only once committed, whole.
    V1,
    /// Protocol version 2 with `streaming` on and logical decoding messages: a
    /// transaction larger than `logical_decoding_work_mem` is streamed while it runs
    /// instead of spilled to the server's disk (PostgreSQL 14 and later).
    V2Streaming,
}

impl Pgoutput {
    /// Streaming where the server has it (14+); version 1 when it is older or did not
    /// say its version.
    pub fn for_server(major: Option<u32>) -> Self {
        match major {
            Some(major) if major >= 14 => Pgoutput::V2Streaming,
            _ => Pgoutput::V1,
        }
    }
}

fn start_replication_command(
    slot: &str,
    start: Lsn,
    publications: &[String],
    pgoutput: Pgoutput,
) -> String {
    let names: Vec<String> = publications.iter().map(|p| quote_ident(p)).collect();
    let options = match pgoutput {
        Pgoutput::V1 => "proto_version '1'",
        Pgoutput::V2Streaming => "proto_version '2', streaming 'on', messages 'true'",
    };
    format!(
        "START_REPLICATION SLOT {} LOGICAL {} ({options}, publication_names {})",
        quote_ident(slot),
        start,
        quote_literal(&names.join(","))
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use bytes::BytesMut;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream};

    use super::stream::queue_status;
    use super::*;

    #[test]
    fn a_hostssl_refusal_says_to_turn_tls_on() {
        let refusal = PgError {
            severity: "FATAL".into(),
            code: "28000".into(),
            message: "no pg_hba.conf entry for host \"127.0.0.1\", user \"u\", database \"d\", no encryption".into(),
            ..PgError::default()
        };
        let hinted = with_tls_hint(refusal.clone(), SslMode::Disable);
        assert!(
            hinted.to_string().contains("sslmode=disable")
                && hinted.to_string().contains("hostssl"),
            "{hinted}"
        );
        let other = PgError {
            message: "role \"u\" does not exist".into(),
            ..refusal
        };
        assert_eq!(with_tls_hint(other.clone(), SslMode::Disable), other);
    }

    #[test]
    fn commands_quote_names() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            start_replication_command(
                "lake",
                Lsn((1 << 32) | 0x16B3748),
                &["orders".into(), "we\"ird's".into()],
                Pgoutput::V1,
            ),
            r#"START_REPLICATION SLOT "lake" LOGICAL 1/16B3748 (proto_version '1', publication_names '"orders","we""ird''s"')"#
        );
        assert_eq!(
            start_replication_command("lake", Lsn(0), &["p".into()], Pgoutput::V2Streaming),
            r#"START_REPLICATION SLOT "lake" LOGICAL 0/0 (proto_version '2', streaming 'on', messages 'true', publication_names '"p"')"#
        );
        assert_eq!(Pgoutput::for_server(Some(18)), Pgoutput::V2Streaming);
        assert_eq!(Pgoutput::for_server(Some(14)), Pgoutput::V2Streaming);
        assert_eq!(Pgoutput::for_server(Some(13)), Pgoutput::V1);
        assert_eq!(Pgoutput::for_server(None), Pgoutput::V1);
        assert_eq!(
            create_slot_command("lake", true, SnapshotAction::Export),
            r#"CREATE_REPLICATION_SLOT "lake" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"#
        );
        assert_eq!(
            create_slot_command("lake", false, SnapshotAction::NoExport),
            r#"CREATE_REPLICATION_SLOT "lake" LOGICAL pgoutput (SNAPSHOT 'nothing')"#
        );
    }

    #[test]
    fn status_update_layout() {
        let mut buf = BytesMut::new();
        queue_status(&mut buf, Lsn(1), Lsn(2), Lsn(3), 4, true);
        let mut expected = vec![b'd', 0, 0, 0, 38, b'r'];
        for v in [1u64, 2, 3, 4] {
            expected.extend_from_slice(&v.to_be_bytes());
        }
        expected.push(1);
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn error_fields_and_data_rows() {
        let mut body = Vec::new();
        for (k, v) in [
            (b'S', "FEHLER"),
            (b'V', "ERROR"),
            (b'C', "42704"),
            (b'M', "boom"),
            (b'H', "try"),
        ] {
            body.push(k);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let e = parse_error_fields(&body);
        assert_eq!(
            (e.severity.as_str(), e.code.as_str(), e.message.as_str()),
            ("ERROR", "42704", "boom")
        );
        assert_eq!(e.hint.as_deref(), Some("try"));
        // Truncated bodies do not panic.
        for len in 0..body.len() {
            let _ = parse_error_fields(&body[..len]);
        }

        let row = [0, 2, 0, 0, 0, 2, b'h', b'i', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            parse_data_row(&row),
            Some(vec![Some("hi".to_owned()), None])
        );
        for len in 0..row.len() {
            assert_eq!(parse_data_row(&row[..len]), None);
        }
    }

    /// A scripted fake server: the test writes backend messages and reads frontend ones.
    pub(crate) struct FakeServer {
        pub io: DuplexStream,
    }

    impl FakeServer {
        pub async fn send(&mut self, tag: u8, body: &[u8]) {
            let mut m = vec![tag];
            m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            m.extend_from_slice(body);
            self.io.write_all(&m).await.unwrap();
        }

        /// Writes pre-built messages in one write, so they arrive as one burst.
        pub async fn send_raw(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.unwrap();
        }

        /// Reads one frontend message: (tag, body).
        pub async fn recv(&mut self) -> (u8, Vec<u8>) {
            let tag = self.io.read_u8().await.unwrap();
            let len = self.io.read_i32().await.unwrap() as usize;
            let mut body = vec![0; len - 4];
            self.io.read_exact(&mut body).await.unwrap();
            (tag, body)
        }

        /// Reads the startup packet (no tag) and returns its parameters.
        pub async fn recv_startup(&mut self) -> Vec<(String, String)> {
            let len = self.io.read_i32().await.unwrap() as usize;
            let mut body = vec![0; len - 4];
            self.io.read_exact(&mut body).await.unwrap();
            assert_eq!(&body[..4], &[0, 3, 0, 0]);
            let parts: Vec<String> = body[4..]
                .split(|&b| b == 0)
                .map(|s| String::from_utf8(s.to_vec()).unwrap())
                .collect();
            parts
                .chunks(2)
                .filter(|c| c.len() == 2 && !c[0].is_empty())
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect()
        }

        pub async fn auth(&mut self, code: i32, extra: &[u8]) {
            let mut body = code.to_be_bytes().to_vec();
            body.extend_from_slice(extra);
            self.send(b'R', &body).await;
        }

        pub async fn ready(&mut self) {
            self.send(b'S', b"server_version\x0015.8\x00").await;
            self.send(b'K', &[0, 0, 0x10, 0, 0, 0, 0, 1]).await;
            self.send(b'Z', b"I").await;
        }

        pub async fn error(&mut self, code: &str, message: &str) {
            let body = format!("SERROR\0VERROR\0C{code}\0M{message}\0\0");
            self.send(b'E', body.as_bytes()).await;
        }

        pub async fn row(&mut self, values: &[Option<&str>]) {
            let mut body = (values.len() as i16).to_be_bytes().to_vec();
            for v in values {
                match v {
                    None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        body.extend_from_slice(v.as_bytes());
                    }
                }
            }
            self.send(b'D', &body).await;
        }

        pub async fn xlog(&mut self, wal_start: u64, data: &[u8]) {
            let mut body = vec![b'w'];
            body.extend_from_slice(&wal_start.to_be_bytes());
            body.extend_from_slice(&(wal_start + 100).to_be_bytes());
            body.extend_from_slice(&7i64.to_be_bytes());
            body.extend_from_slice(data);
            self.send(b'd', &body).await;
        }

        pub async fn keepalive(&mut self, wal_end: u64, reply: bool) {
            let mut body = vec![b'k'];
            body.extend_from_slice(&wal_end.to_be_bytes());
            body.extend_from_slice(&9i64.to_be_bytes());
            body.push(u8::from(reply));
            self.send(b'd', &body).await;
        }
    }

    pub(crate) fn pair() -> (Reader, Writer, FakeServer) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(client);
        (Box::new(r), Box::new(w), FakeServer { io: server })
    }

    fn config(password: Option<&str>) -> ConnectConfig {
        ConnectConfig::new("db", 5432, "app", password, "orders")
    }

    /// Drives a trust-auth startup and returns the connected client.
    pub(crate) async fn connected() -> (ReplicationConnection, FakeServer) {
        let (r, w, mut server) = pair();
        let client = tokio::spawn(async move {
            ReplicationConnection::handshake(r, w, None, &config(None)).await
        });
        server.recv_startup().await;
        server.auth(0, &[]).await;
        server.ready().await;
        (client.await.unwrap().unwrap(), server)
    }

    #[tokio::test]
    async fn startup_sends_replication_parameters_and_md5() {
        let (r, w, mut server) = pair();
        let client = tokio::spawn(async move {
            ReplicationConnection::handshake(r, w, None, &config(Some("pw"))).await
        });
        let params = server.recv_startup().await;
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("user"), Some("app"));
        assert_eq!(get("database"), Some("orders"));
        assert_eq!(get("replication"), Some("database"));
        assert_eq!(get("application_name"), Some("airlock"));
        assert_eq!(get("client_encoding"), Some("UTF8"));
        assert_eq!(get("options"), Some(SESSION_OPTIONS));

        server.auth(5, &[1, 2, 3, 4]).await;
        let (tag, body) = server.recv().await;
        assert_eq!(tag, b'p');
        let expected = md5_hash(b"app", b"pw", [1, 2, 3, 4]);
        assert_eq!(&body[..body.len() - 1], expected.as_bytes());
        server.auth(0, &[]).await;
        server
            .send(b'N', b"SNOTICE\0VNOTICE\0C00000\0Mhello\0\0")
            .await;
        server.ready().await;
        let conn = client.await.unwrap().unwrap();
        assert_eq!(conn.server_version(), Some("15.8"));
        assert_eq!(conn.server_major(), Some(15));
        assert_eq!(conn.backend_pid(), Some(0x1000));
    }

    #[tokio::test]
    async fn cleartext_password_and_missing_password() {
        let (r, w, mut server) = pair();
        let client = tokio::spawn(async move {
            ReplicationConnection::handshake(r, w, None, &config(Some("pw"))).await
        });
        server.recv_startup().await;
        server.auth(3, &[]).await;
        assert_eq!(server.recv().await, (b'p', b"pw\0".to_vec()));
        server.auth(0, &[]).await;
        server.ready().await;
        client.await.unwrap().unwrap();

        let (r, w, mut server) = pair();
        let client = tokio::spawn(async move {
            ReplicationConnection::handshake(r, w, None, &config(None)).await
        });
        server.recv_startup().await;
        server.auth(3, &[]).await;
        let err = client.await.unwrap().unwrap_err();
        assert!(matches!(err, SourceError::Auth { .. }));
        assert!(err.to_string().contains("source url has none"), "{err}");
    }

    #[tokio::test]
    async fn scram_starts_with_a_no_channel_binding_initial_response() {
        let (r, w, mut server) = pair();
        let client = tokio::spawn(async move {
            ReplicationConnection::handshake(r, w, None, &config(Some("pw"))).await
        });
        server.recv_startup().await;
        server.auth(10, b"SCRAM-SHA-256\0\0").await;
        let (tag, body) = server.recv().await;
        assert_eq!(tag, b'p');
        assert!(body.starts_with(b"SCRAM-SHA-256\0"));
        let first = &body[14 + 4..];
        assert!(
            first.starts_with(b"n,,n=,r="),
            "{:?}",
            String::from_utf8_lossy(first)
        );
        server
            .error("28P01", "password authentication failed for user \"app\"")
            .await;
        let err = client.await.unwrap().unwrap_err();
        assert!(matches!(err, SourceError::Auth { .. }));
        assert!(!err.is_transient());
    }

    /// The client nonce of a SCRAM initial response (`SCRAM-SHA-256\0` len `n,,n=,r=…`).
    fn client_nonce(initial: &[u8]) -> String {
        let text = String::from_utf8_lossy(initial);
        text.split(",r=").nth(1).expect("a client nonce").to_owned()
    }

    /// Plays a hostile server up to the SCRAM server-first-message with `iterations`,
    /// over any stream.
    async fn scram_until_server_first<S: AsyncRead + AsyncWrite + Unpin>(
        io: &mut S,
        iterations: u32,
    ) {
        async fn send<S: AsyncWrite + Unpin>(io: &mut S, code: i32, data: &[u8]) {
            let mut m = vec![b'R'];
            m.extend_from_slice(&((data.len() + 8) as i32).to_be_bytes());
            m.extend_from_slice(&code.to_be_bytes());
            m.extend_from_slice(data);
            io.write_all(&m).await.unwrap();
        }
        send(io, 10, b"SCRAM-SHA-256\0\0").await;
        assert_eq!(io.read_u8().await.unwrap(), b'p');
        let len = io.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        io.read_exact(&mut body).await.unwrap();
        let nonce = client_nonce(&body);
        let first = format!("r={nonce}srv,s=c2FsdHNhbHQ=,i={iterations}");
        send(io, 11, first.as_bytes()).await;
    }

    /// Reads the startup packet of a plain connection.
    async fn read_startup<S: AsyncRead + Unpin>(io: &mut S) {
        let len = io.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        io.read_exact(&mut body).await.unwrap();
    }

    #[tokio::test]
    async fn authentication_ok_without_the_scram_server_signature_is_refused() {
        // A server that does not know the password answers the client's proof with
        // AuthenticationOk, skipping SASLFinal (the server signature).
        let (r, w, mut server) = pair();
        let client = tokio::spawn(async move {
            ReplicationConnection::handshake(r, w, None, &config(Some("pw"))).await
        });
        server.recv_startup().await;
        scram_until_server_first(&mut server.io, 4096).await;
        let (tag, _) = server.recv().await;
        assert_eq!(tag, b'p', "the client answers the server-first-message");
        server.auth(0, &[]).await;
        server.ready().await;
        let err = client.await.unwrap().unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SourceError::Auth { .. }), "{text}");
        assert!(text.contains("no SCRAM server signature"), "{text}");
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn a_huge_scram_iteration_count_is_refused_before_any_work() {
        let (r, w, mut server) = pair();
        let client = tokio::spawn(async move {
            ReplicationConnection::handshake(r, w, None, &config(Some("pw"))).await
        });
        server.recv_startup().await;
        scram_until_server_first(&mut server.io, i32::MAX as u32).await;
        // 2^31 PBKDF2 rounds would take the client about a quarter of an hour.
        let err = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .expect("the client must refuse at once, not compute the iterations")
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("2147483647 SCRAM iterations"), "{err}");
    }

    #[tokio::test]
    async fn require_auth_refuses_a_downgrade_and_sends_no_password() {
        for (code, data, method) in [
            (3, &[][..], "cleartext password"),
            (5, &[1, 2, 3, 4][..], "md5 password"),
            (0, &[][..], "trust"),
        ] {
            let (r, w, mut server) = pair();
            let client = tokio::spawn(async move {
                let mut c = config(Some("s3cret-pw"));
                c.auth.require_auth = "scram-sha-256".parse().unwrap();
                ReplicationConnection::handshake(r, w, None, &c).await
            });
            server.recv_startup().await;
            server.auth(code, data).await;
            if code == 0 {
                server.ready().await;
            }
            let err = client.await.unwrap().unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, SourceError::Auth { .. }), "{text}");
            assert!(
                text.contains(method) && text.contains("require_auth=scram-sha-256"),
                "{text}"
            );
            // The client went away without a word: no PasswordMessage.
            let mut rest = Vec::new();
            server.io.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "the client sent {rest:?}");
        }
    }

    /// A hostile server on 127.0.0.1 for the SQL (tokio-postgres) stack: plays
    /// `script` on the first connection and returns what the client sent after it.
    async fn hostile_sql_server<F, Fut>(script: F) -> (u16, tokio::task::JoinHandle<Vec<u8>>)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = tokio::net::TcpStream> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut io, _) = listener.accept().await.unwrap();
            read_startup(&mut io).await;
            let mut io = script(io).await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut rest)).await;
            rest
        });
        (port, server)
    }

    fn sql_config(port: u16) -> ConnectConfig {
        ConnectConfig::new("127.0.0.1", port, "app", Some("s3cret-pw"), "orders")
    }

    #[tokio::test]
    async fn the_sql_connection_refuses_a_cleartext_downgrade_and_sends_no_password() {
        let (port, server) = hostile_sql_server(|mut io| async move {
            io.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await.unwrap();
            io
        })
        .await;
        let mut c = sql_config(port);
        c.auth.require_auth = "scram-sha-256".parse().unwrap();
        let err = match c.connect_sql().await {
            Ok(_) => panic!("a cleartext request must be refused"),
            Err(e) => e,
        };
        let text = err.to_string();
        assert!(matches!(err, SourceError::Auth { .. }), "{text}");
        assert!(
            text.contains("cleartext password") && text.contains("require_auth=scram-sha-256"),
            "{text}"
        );
        let sent = server.await.unwrap();
        assert!(
            !sent.windows(9).any(|w| w == b"s3cret-pw"),
            "the password went out: {:?}",
            String::from_utf8_lossy(&sent)
        );
    }

    #[tokio::test]
    async fn the_sql_connection_refuses_a_huge_scram_iteration_count() {
        let (port, _server) = hostile_sql_server(|mut io| async move {
            scram_until_server_first(&mut io, i32::MAX as u32).await;
            io
        })
        .await;
        let c = sql_config(port);
        let result = tokio::time::timeout(Duration::from_secs(10), c.connect_sql())
            .await
            .expect("the client must refuse at once, not compute the iterations");
        let err = match result {
            Ok(_) => panic!("a huge iteration count must be refused"),
            Err(e) => e,
        };
        let text = err.to_string();
        assert!(matches!(err, SourceError::Auth { .. }), "{text}");
        assert!(text.contains("2147483647 SCRAM iterations"), "{text}");
    }

    #[tokio::test]
    async fn unsupported_auth_methods_are_named() {
        let (r, w, mut server) = pair();
        let client = tokio::spawn(async move {
            ReplicationConnection::handshake(r, w, None, &config(Some("pw"))).await
        });
        server.recv_startup().await;
        server.auth(7, &[]).await;
        let err = client.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("GSSAPI"), "{err}");
    }

    #[tokio::test]
    async fn identify_system_and_create_slot() {
        let (mut conn, mut server) = connected().await;
        let client = tokio::spawn(async move {
            let info = conn.identify_system().await.unwrap();
            let slot = conn
                .create_logical_slot("lake", false, SnapshotAction::Export)
                .await
                .unwrap();
            let err = conn.simple_query("BAD").await.unwrap_err();
            (info, slot, err)
        });
        assert_eq!(server.recv().await, (b'Q', b"IDENTIFY_SYSTEM\0".to_vec()));
        server.send(b'T', &[0, 4]).await;
        server
            .row(&[Some("7001"), Some("1"), Some("0/16B3748"), Some("orders")])
            .await;
        server.send(b'C', b"IDENTIFY_SYSTEM\0").await;
        server.send(b'Z', b"I").await;
        let (tag, body) = server.recv().await;
        assert_eq!(tag, b'Q');
        assert_eq!(
            body,
            b"CREATE_REPLICATION_SLOT \"lake\" LOGICAL pgoutput (SNAPSHOT 'export')\0"
        );
        server
            .row(&[
                Some("lake"),
                Some("0/16B3780"),
                Some("00000003-1"),
                Some("pgoutput"),
            ])
            .await;
        server.send(b'Z', b"I").await;
        server.recv().await;
        server.error("42601", "syntax error").await;
        server.send(b'Z', b"I").await;

        let (info, slot, err) = client.await.unwrap();
        assert_eq!(
            info,
            SystemInfo {
                system_id: "7001".into(),
                timeline: 1,
                xlogpos: "0/16B3748".parse().unwrap(),
                dbname: Some("orders".into())
            }
        );
        assert_eq!(slot.consistent_point, "0/16B3780".parse().unwrap());
        assert_eq!(slot.snapshot_name.as_deref(), Some("00000003-1"));
        assert!(
            err.to_string().contains("syntax error (SQLSTATE 42601)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn stream_events_status_and_end() {
        let (conn, mut server) = connected().await;
        let client = tokio::spawn(async move {
            let mut stream = conn
                .start_replication("lake", Lsn::ZERO, &["pub".into()])
                .await
                .unwrap();
            let mut events = Vec::new();
            while let Some(event) = stream.next().await.unwrap() {
                if let ReplicationEvent::Keepalive { wal_end, .. } = event {
                    stream
                        .send_status(wal_end, Lsn(5), Lsn(5), false)
                        .await
                        .unwrap();
                }
                events.push(event);
            }
            assert_eq!(stream.next().await.unwrap(), None);
            events
        });
        let (_, query) = server.recv().await;
        assert!(query.starts_with(b"START_REPLICATION SLOT \"lake\" LOGICAL 0/0"));
        server.send(b'W', &[0, 0, 0]).await;
        server.xlog(0x100, b"Bpayload").await;
        server.keepalive(0x200, true).await;
        let (tag, body) = server.recv().await;
        assert_eq!((tag, body[0], body.len()), (b'd', b'r', 34));
        assert_eq!(&body[1..9], &0x200u64.to_be_bytes());
        assert_eq!(&body[9..17], &5u64.to_be_bytes());
        server.send(b'c', &[]).await;
        let events = client.await.unwrap();
        assert_eq!(
            events,
            vec![
                ReplicationEvent::XLogData {
                    wal_start: Lsn(0x100),
                    wal_end: Lsn(0x164),
                    server_time: 7,
                    data: Bytes::from_static(b"Bpayload")
                },
                ReplicationEvent::Keepalive {
                    wal_end: Lsn(0x200),
                    server_time: 9,
                    reply_requested: true
                }
            ]
        );
    }

    #[tokio::test]
    async fn start_replication_errors_are_mapped() {
        let (conn, mut server) = connected().await;
        let client =
            tokio::spawn(async move { conn.start_replication("lake", Lsn::ZERO, &[]).await });
        server.recv().await;
        server
            .error("55006", "replication slot \"lake\" is active for PID 77")
            .await;
        let err = client.await.unwrap().unwrap_err();
        assert!(
            matches!(&err, SourceError::SlotInUse { slot, pid: Some(77) } if slot == "lake"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn next_is_cancel_safe_across_partial_messages() {
        let (conn, mut server) = connected().await;
        let client = tokio::spawn(async move {
            conn.start_replication("lake", Lsn::ZERO, &[])
                .await
                .unwrap()
        });
        server.recv().await;
        server.send(b'W', &[0, 0, 0]).await;
        let mut stream = client.await.unwrap();

        // Write one XLogData message in two halves, cancelling next() in between.
        let mut body = vec![b'w'];
        body.extend_from_slice(&1u64.to_be_bytes());
        body.extend_from_slice(&2u64.to_be_bytes());
        body.extend_from_slice(&3i64.to_be_bytes());
        body.extend_from_slice(b"data");
        let mut msg = vec![b'd'];
        msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        msg.extend_from_slice(&body);
        server.io.write_all(&msg[..10]).await.unwrap();
        let timed_out = tokio::time::timeout(Duration::from_millis(20), stream.next()).await;
        assert!(timed_out.is_err());
        server.io.write_all(&msg[10..]).await.unwrap();
        let event = stream.next().await.unwrap().unwrap();
        assert!(matches!(event, ReplicationEvent::XLogData { data, .. } if &data[..] == b"data"));

        // EOF without CopyDone is a transient error.
        drop(server);
        let err = stream.next().await.unwrap_err();
        assert!(err.is_transient(), "{err}");
    }
}
