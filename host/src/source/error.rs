//! Errors of the source, classified transient (reconnect and retry) or definite
//! (stop and tell the operator what to change).

use std::fmt;
use std::io;

use crate::change::Lsn;

use super::pgoutput::DecodeError;
use crate::change::text::ValueError;

/// An ErrorResponse (or NoticeResponse) from PostgreSQL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgError {
    /// `ERROR`, `FATAL`, `PANIC` (non-localized when the server sends it).
    pub severity: String,
    /// SQLSTATE, e.g. `42704`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl PgError {
    /// Whether retrying later may succeed: connection failures, server shutdown
    /// and restart, and resource exhaustion (e.g. too many connections).
    pub fn is_transient(&self) -> bool {
        self.code.starts_with("08")
            || self.code.starts_with("53")
            || matches!(self.code.as_str(), "57P01" | "57P02" | "57P03")
    }

    /// The first double-quoted name in the message, e.g. the slot in
    /// `replication slot "s" does not exist`.
    pub(crate) fn quoted_name(&self) -> Option<&str> {
        let (_, rest) = self.message.split_once('"')?;
        let (name, _) = rest.split_once('"')?;
        Some(name)
    }
}

/// A TLS failure of an ordinary connection, already in an operator's words.
#[derive(Debug)]
pub struct TlsFailure {
    pub reason: String,
    /// A refused certificate or unusable settings (not I/O): retrying cannot help.
    pub definite: bool,
}

impl TlsFailure {
    pub(crate) fn definite(reason: String) -> Self {
        TlsFailure {
            reason,
            definite: true,
        }
    }
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for TlsFailure {}

/// Everything that can stop the source.
///
/// [`SourceError::is_transient`] tells the retry loop whether reconnecting may help.
/// No variant ever contains the password of the source url.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid source url: {reason}")]
    InvalidUrl { reason: String },

    /// The TLS settings cannot be used (no or an unreadable `sslrootcert`, ...).
    #[error("cannot set up TLS to PostgreSQL: {reason}")]
    TlsSetup { reason: String },

    /// The server refused TLS, or its certificate did not verify: definite.
    #[error("TLS with PostgreSQL at {addr} failed: {reason}")]
    Tls { addr: String, reason: String },

    #[error("invalid source settings: {reason}")]
    InvalidSettings { reason: String },

    #[error(
        "cannot connect to PostgreSQL at {addr}: {source}; check that the server is running and accepts connections there"
    )]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },

    #[error("timed out after {seconds} s connecting to PostgreSQL at {addr}")]
    ConnectTimeout { addr: String, seconds: u64 },

    #[error("lost the connection to PostgreSQL at {addr} while {during}: {source}")]
    Io {
        addr: String,
        during: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("PostgreSQL at {addr} closed the connection while {during}")]
    Closed { addr: String, during: &'static str },

    #[error("PostgreSQL at {addr} ended the replication stream; reconnecting resumes it")]
    StreamEnded { addr: String },

    #[error(
        "authentication as user `{user}` at {addr} failed: {reason}; check the user and password in the source url and the server's pg_hba.conf"
    )]
    Auth {
        user: String,
        addr: String,
        reason: String,
    },

    #[error(
        "user `{user}` lacks a privilege at {addr} while {during}: {error}; grant it with `ALTER ROLE {user} WITH REPLICATION` (and SELECT on the published tables)"
    )]
    Permission {
        user: String,
        addr: String,
        during: &'static str,
        error: Box<PgError>,
    },

    #[error(
        "logical decoding is not enabled at {addr} ({reason}): set wal_level = logical in postgresql.conf and restart PostgreSQL"
    )]
    WalLevel { addr: String, reason: String },

    #[error(
        "replication slot `{slot}` does not exist: create it with `SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')` or enable slot creation in the source settings"
    )]
    SlotMissing { slot: String },

    /// The slot is missing at startup, but a sink holds changes read from it: it was
    /// dropped, and a new one would skip what was committed since. Definite.
    #[error(
        "replication slot `{slot}` does not exist, but sink `{sink}` already holds changes read from it (table {table}, through commit LSN {through}): the slot was dropped, and a new one would start at the current WAL position and leave out whatever was committed since, without a trace, so airlock does not create it. To go on: take a new snapshot into an empty lake (point sink `{sink}` at a new location, snapshot = \"initial\"), or restore the lake and the database to a matching point; to accept the gap, create the slot yourself (`SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')`) and start again (see docs/source.md, \"A dropped slot\")"
    )]
    SlotDroppedBefore {
        slot: String,
        sink: String,
        table: String,
        through: Lsn,
    },

    /// The slot this run streamed from no longer exists: definite, never recreated.
    #[error(
        "replication slot `{slot}` was dropped while airlock was streaming from it (its last confirmed position was {confirmed}): the changes committed since then may be gone, so airlock stops instead of creating the slot again at the current WAL position and silently skipping them. To go on: recreate the slot (`SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')`) and take a new snapshot into an empty lake (snapshot = \"initial\"), or restore the lake and the database to a matching point; recreating the slot and restarting as is leaves the changes of the gap out of the lake for good (see docs/source.md, \"A dropped slot\")"
    )]
    SlotDropped { slot: String, confirmed: Lsn },

    #[error(
        "replication slot `{slot}` is in use by another consumer (pid {}): stop that consumer or end it with `SELECT pg_terminate_backend(pid)`; retrying",
        .pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
    )]
    SlotInUse { slot: String, pid: Option<i32> },

    #[error(
        "replication slot `{slot}` has been in use by another consumer (pid {}) for {waited_secs} s: another airlock or replication client is streaming from it; stop it, end it with `SELECT pg_terminate_backend({})`, or give this airlock its own slot in [source] slot",
        .pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
        .pid.map_or_else(|| "pid".to_owned(), |p| p.to_string())
    )]
    SlotBusy {
        slot: String,
        pid: Option<i32>,
        waited_secs: u64,
    },

    #[error("copying the rows of `{table}` failed while {during}: {reason}")]
    Snapshot {
        table: String,
        during: &'static str,
        reason: String,
    },

    #[error(
        "replication slot `{slot}` uses output plugin `{plugin}` but airlock needs `pgoutput`: drop it with `SELECT pg_drop_replication_slot('{slot}')` or choose another slot name"
    )]
    SlotPlugin { slot: String, plugin: String },

    #[error(
        "replication slot `{slot}` can no longer be used ({reason}): PostgreSQL removed WAL the slot still needed (see max_slot_wal_keep_size); drop and recreate the slot and take a new snapshot"
    )]
    SlotInvalidated { slot: String, reason: String },

    #[error(
        "publication `{publication}` does not exist: create it with `CREATE PUBLICATION {publication} FOR TABLE ...` (or FOR ALL TABLES)"
    )]
    PublicationMissing { publication: String },

    #[error("PostgreSQL at {addr} reported an error while {during}: {error}")]
    Server {
        addr: String,
        during: &'static str,
        error: Box<PgError>,
    },

    #[error("unexpected reply from PostgreSQL at {addr} while {during}: {reason}")]
    Protocol {
        addr: String,
        during: &'static str,
        reason: String,
    },

    #[error("catalog query failed while {during}: {}", chain(source))]
    Catalog {
        during: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error(
        "cannot decode the pgoutput message at {lsn}: {source}; this is a bug in airlock or an unsupported server version"
    )]
    Decode {
        lsn: Lsn,
        #[source]
        source: DecodeError,
    },

    #[error("bad change for `{relation}` at {lsn}: {source}")]
    Value {
        relation: String,
        lsn: Lsn,
        #[source]
        source: ValueError,
    },

    #[error("pgoutput stream out of order at {lsn}: {reason}")]
    Stream { lsn: Lsn, reason: String },

    #[error(
        "the state file {path} (which tables the lake has whole) cannot be used: {reason}",
        path = path.display()
    )]
    State {
        path: std::path::PathBuf,
        reason: String,
    },

    #[error(
        "cannot keep streamed transaction {xid} in `{dir}`: {source}; set [source] spool_dir to a writable folder with room for the largest transaction (it is retried meanwhile)",
        dir = dir.display()
    )]
    Spool {
        xid: u32,
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the pipeline stopped receiving transactions")]
    PipelineClosed,

    /// A change came with no identity before it in its transaction ([source]
    /// identity = "required"): definite, nothing of the transaction goes on.
    #[error(
        "a change to `{table}` at {lsn} (transaction {xid}) carries no identity: no `airlock.identity` message came before it in its transaction, so airlock cannot say who made it. The table lacks the `airlock_identity` trigger, the trigger is disabled, or the session ran with session_replication_role = replica. Run `airlock identity install --config FILE` (it adds the trigger to every published table) or `ALTER TABLE {table} ENABLE TRIGGER airlock_identity`; `airlock check` lists the tables without it. To record such changes with no identity instead, set [source] identity = \"record\""
    )]
    Unattributed { table: String, lsn: Lsn, xid: u32 },

    /// Identity is configured but its messages cannot be trusted (see
    /// [`crate::identity::Trust`]): definite.
    #[error("identity messages in this database cannot be trusted: {}", problems.join("; "))]
    IdentityUntrusted { problems: Vec<String> },
}

/// An error with its causes, `: `-separated (tokio-postgres shows only its own kind).
fn chain(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut next = std::error::Error::source(error);
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

impl SourceError {
    /// Whether reconnecting may succeed: network and I/O failures, server shutdown,
    /// a slot still held by a previous connection. Definite errors (authentication,
    /// missing slot or publication, `wal_level`, privileges, bad data) need an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Connect { .. }
            | SourceError::ConnectTimeout { .. }
            | SourceError::Io { .. }
            | SourceError::Closed { .. }
            | SourceError::StreamEnded { .. }
            | SourceError::Spool { .. }
            | SourceError::SlotInUse { .. } => true,
            SourceError::Server { error, .. } => error.is_transient(),
            SourceError::Catalog { source, .. } => match source.code() {
                None => true,
                Some(code) => {
                    let code = code.code();
                    code.starts_with("08")
                        || code.starts_with("53")
                        || matches!(code, "57P01" | "57P02" | "57P03")
                }
            },
            _ => false,
        }
    }

    /// Maps an error of an ordinary (tokio-postgres) connection: a refusal by the
    /// authentication policy becomes [`SourceError::Auth`], a server error the most
    /// specific variant by its SQLSTATE, anything else [`SourceError::Catalog`].
    pub(crate) fn from_sql(
        addr: &str,
        user: &str,
        during: &'static str,
        error: tokio_postgres::Error,
    ) -> SourceError {
        if let Some(reason) = super::auth::refusal(&error) {
            return SourceError::Auth {
                user: user.to_owned(),
                addr: addr.to_owned(),
                reason: reason.to_owned(),
            };
        }
        let tls = std::error::Error::source(&error)
            .and_then(|e| e.downcast_ref::<TlsFailure>())
            .filter(|failure| failure.definite);
        if let Some(failure) = tls {
            return SourceError::Tls {
                addr: addr.to_owned(),
                reason: failure.reason.clone(),
            };
        }
        match error.as_db_error() {
            Some(db) => SourceError::from_server(
                addr,
                user,
                during,
                PgError {
                    severity: db.severity().to_owned(),
                    code: db.code().code().to_owned(),
                    message: db.message().to_owned(),
                    detail: db.detail().map(str::to_owned),
                    hint: db.hint().map(str::to_owned),
                },
            ),
            None => SourceError::Catalog {
                during,
                source: error,
            },
        }
    }

    /// Maps a server error to the most specific variant by its SQLSTATE.
    pub(crate) fn from_server(
        addr: &str,
        user: &str,
        during: &'static str,
        error: PgError,
    ) -> SourceError {
        let quoted = error.quoted_name().map(str::to_owned);
        match error.code.as_str() {
            "28P01" | "28000" => SourceError::Auth {
                user: user.to_owned(),
                addr: addr.to_owned(),
                reason: error.to_string(),
            },
            "42501" => SourceError::Permission {
                user: user.to_owned(),
                addr: addr.to_owned(),
                during,
                error: Box::new(error),
            },
            "42704" if error.message.contains("replication slot") => SourceError::SlotMissing {
                slot: quoted.unwrap_or_default(),
            },
            "42704" if error.message.contains("publication") => SourceError::PublicationMissing {
                publication: quoted.unwrap_or_default(),
            },
            "55006" => SourceError::SlotInUse {
                slot: quoted.unwrap_or_default(),
                pid: pid_in(&error.message),
            },
            "55000" if error.message.contains("wal_level") => SourceError::WalLevel {
                addr: addr.to_owned(),
                reason: error.message,
            },
            "55000" if error.message.contains("slot") => SourceError::SlotInvalidated {
                slot: quoted.unwrap_or_default(),
                reason: error.to_string(),
            },
            _ => SourceError::Server {
                addr: addr.to_owned(),
                during,
                error: Box::new(error),
            },
        }
    }
}

/// The number after `PID ` in messages like `replication slot "s" is active for PID 42`.
fn pid_in(message: &str) -> Option<i32> {
    let (_, rest) = message.split_once("PID ")?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(code: &str, message: &str) -> PgError {
        PgError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    fn map(code: &str, message: &str) -> SourceError {
        SourceError::from_server("db:5432", "app", "starting replication", pg(code, message))
    }

    #[test]
    fn sqlstates_map_to_specific_errors() {
        let e = map("42704", "replication slot \"lake\" does not exist");
        assert!(matches!(&e, SourceError::SlotMissing { slot } if slot == "lake"));
        assert!(!e.is_transient());

        let e = map("42704", "publication \"pub\" does not exist");
        assert!(
            matches!(&e, SourceError::PublicationMissing { publication } if publication == "pub")
        );
        assert!(e.to_string().contains("CREATE PUBLICATION pub"));

        let e = map("55006", "replication slot \"lake\" is active for PID 4242");
        assert!(matches!(
            &e,
            SourceError::SlotInUse {
                pid: Some(4242),
                ..
            }
        ));
        assert!(
            e.to_string()
                .contains("slot `lake` is in use by another consumer (pid 4242)"),
            "{e}"
        );
        assert!(e.is_transient());

        let e = map("55000", "logical decoding requires wal_level >= logical");
        assert!(matches!(e, SourceError::WalLevel { .. }));
        assert!(
            e.to_string()
                .contains("set wal_level = logical in postgresql.conf and restart PostgreSQL")
        );

        let e = map(
            "55000",
            "can no longer get changes from replication slot \"lake\"",
        );
        assert!(matches!(&e, SourceError::SlotInvalidated { slot, .. } if slot == "lake"));

        let e = map("42501", "permission denied to start WAL sender");
        assert!(matches!(e, SourceError::Permission { .. }));
        assert!(e.to_string().contains("ALTER ROLE app WITH REPLICATION"));

        for code in ["28P01", "28000"] {
            let e = map(code, "password authentication failed for user \"app\"");
            assert!(matches!(e, SourceError::Auth { .. }));
            assert!(!e.is_transient());
        }

        let e = map(
            "57P01",
            "terminating connection due to administrator command",
        );
        assert!(matches!(e, SourceError::Server { .. }));
        assert!(e.is_transient());
        assert!(map("53300", "sorry, too many clients already").is_transient());
        assert!(!map("XX000", "internal error").is_transient());
    }

    #[test]
    fn server_error_display_includes_detail_and_hint() {
        let mut e = pg("42P01", "relation \"t\" does not exist");
        e.detail = Some("d".into());
        e.hint = Some("h".into());
        assert_eq!(
            e.to_string(),
            "relation \"t\" does not exist (SQLSTATE 42P01); detail: d; hint: h"
        );
    }

    #[test]
    fn io_errors_are_transient() {
        let e = SourceError::Io {
            addr: "db:5432".into(),
            during: "streaming",
            source: io::Error::from(io::ErrorKind::ConnectionReset),
        };
        assert!(e.is_transient());
        assert!(!SourceError::PipelineClosed.is_transient());
    }
}
