//! `[source]`: where PostgreSQL is, how to reach it safely, and what to stream.
//!
//! Invariants:
//! - A setting that may be given in the url or in its own field (`sslmode`,
//!   `sslrootcert`, `sslcert`, `sslkey`, `require_auth`, `channel_binding`) is taken
//!   from either, and refused when both give it differently.
//! - A mode that verifies certificates has a CA; a CA is never given to a mode that
//!   would not check it; channel binding `require` has TLS.

use std::path::PathBuf;
use std::time::Duration;

use super::check::{Check, resolve};
use super::raw;
use crate::source::auth::{AuthPolicy, ChannelBinding};
use crate::source::connect::{ConnectConfig, SSL_MODES, SslMode};

/// The publication streamed when `[source] publication` is not set.
pub const DEFAULT_PUBLICATION: &str = "airlock";
/// The slot streamed from when `[source] slot` is not set.
pub const DEFAULT_SLOT: &str = "airlock";

/// Whether existing rows are copied before streaming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Snapshot {
    Never,
    Initial,
}

/// `[source]`, checked.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub url: String,
    pub password: Option<String>,
    /// The effective sslmode (`[source] sslmode`, else the url's, else `prefer`).
    pub sslmode: SslMode,
    /// The effective CA file for `verify-ca` / `verify-full`.
    pub sslrootcert: Option<PathBuf>,
    /// The effective client certificate and key.
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// The effective `require_auth` and `channel_binding`.
    pub auth: AuthPolicy,
    pub publication: String,
    pub slot: String,
    pub tables: Vec<String>,
    pub snapshot: Snapshot,
    pub create_slot: bool,
    pub status_interval: Duration,
    pub slot_busy_timeout: Duration,
    pub spool_dir: PathBuf,
    pub state_dir: PathBuf,
    pub snapshot_connections: usize,
    pub identity: crate::identity::Mode,
}

/// Checks `[source]`; `None` when it is missing or unusable (the problems are in
/// `check`).
pub(super) fn validate(raw: Option<raw::Source>, check: &mut Check) -> Option<SourceConfig> {
    let Some(s) = raw else {
        check.add(
            "source",
            "missing: add a [source] section with at least `url`",
        );
        return None;
    };
    let base = check.base();
    let resolve = |p: &str| resolve(base, p);
    let url = s.url.unwrap_or_else(|| {
        check.add(
            "source.url",
            "missing: expected `postgres://user@host:port/dbname`",
        );
        String::new()
    });
    let mut parsed = None;
    let postgres_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !url.is_empty() && !postgres_url {
        check.add(
            "source.url",
            "expected a URL starting with `postgres://` or `postgresql://`",
        );
    } else if !url.is_empty() {
        match ConnectConfig::from_url(&url) {
            Ok(c) => parsed = Some(c),
            Err(crate::source::error::SourceError::InvalidUrl { reason }) => {
                check.add("source.url", reason)
            }
            Err(other) => check.add("source.url", other.to_string()),
        }
    }
    let password = check.secret("source.password_env", s.password_env);
    let url_sslmode = url_param(&url, "sslmode").and(parsed.as_ref().map(|c| c.sslmode));
    let sslmode = match s.sslmode.as_deref() {
        None => url_sslmode.unwrap_or_default(),
        Some(text) => match SslMode::parse(text) {
            Some(mode) => {
                if let Some(in_url) = url_sslmode.filter(|m| *m != mode) {
                    check.add(
                        "source.sslmode",
                        format!(
                            "found `{text}`, but source.url says sslmode={}: keep one of them",
                            in_url.as_str()
                        ),
                    );
                }
                mode
            }
            None => {
                check.add(
                    "source.sslmode",
                    format!("found `{text}`, expected {SSL_MODES}"),
                );
                SslMode::default()
            }
        },
    };
    let url_rootcert = parsed.as_ref().and_then(|c| c.sslrootcert.clone());
    let sslrootcert = match (s.sslrootcert.as_deref(), url_rootcert) {
        (Some(field), Some(in_url)) if resolve(field) != resolve(&in_url.to_string_lossy()) => {
            check.add(
                "source.sslrootcert",
                format!(
                    "found `{field}`, but source.url says sslrootcert={}: keep one of them",
                    in_url.display()
                ),
            );
            None
        }
        (Some(field), _) => Some(resolve(field)),
        (None, in_url) => in_url.map(|p| resolve(&p.to_string_lossy())),
    };
    match (sslmode.verifies(), &sslrootcert) {
        (true, None) => check.add(
            "source.sslrootcert",
            format!(
                "missing: sslmode `{}` verifies the server's certificate and needs the CA that signed it: set sslrootcert to a PEM file with the CA certificate(s)",
                sslmode.as_str()
            ),
        ),
        (false, Some(path)) => check.add(
            "source.sslrootcert",
            format!(
                "found `{}`, but sslmode `{}` does not check certificates: set sslmode = \"verify-full\" (or \"verify-ca\") to use it, or remove sslrootcert",
                path.display(),
                sslmode.as_str()
            ),
        ),
        _ => {}
    }
    // Set in the url or in the field, not differently in both.
    let mut one_of = |key: &str, field: Option<&str>| -> Option<String> {
        let in_url = url_param(&url, key).and_then(crate::source::connect::percent_decode);
        match (field, in_url) {
            (Some(field), Some(in_url)) if field != in_url => {
                check.add(
                    format!("source.{key}"),
                    format!(
                        "found `{field}`, but source.url says {key}={in_url}: keep one of them"
                    ),
                );
                None
            }
            (Some(field), _) => Some(field.to_owned()),
            (None, in_url) => in_url,
        }
    };
    let sslcert = one_of("sslcert", s.sslcert.as_deref()).map(|p| resolve(&p));
    let sslkey = one_of("sslkey", s.sslkey.as_deref()).map(|p| resolve(&p));
    let require_auth = one_of("require_auth", s.require_auth.as_deref());
    let channel_binding = one_of("channel_binding", s.channel_binding.as_deref());
    let mut auth = AuthPolicy::default();
    if let Some(text) = require_auth {
        match text.parse() {
            Ok(r) => auth.require_auth = r,
            Err(e) => check.add("source.require_auth", e),
        }
    }
    if let Some(text) = channel_binding {
        match text.parse() {
            Ok(c) => auth.channel_binding = c,
            Err(e) => check.add("source.channel_binding", e),
        }
    }
    if sslcert.is_some() != sslkey.is_some() {
        check.add(
            if sslcert.is_some() {
                "source.sslkey"
            } else {
                "source.sslcert"
            },
            "missing: a client certificate needs both sslcert and sslkey",
        );
    }
    if auth.channel_binding == ChannelBinding::Require && sslmode == SslMode::Disable {
        check.add(
            "source.channel_binding",
            "`require` needs TLS, but sslmode is `disable`: set sslmode = \"verify-full\", or channel_binding = \"prefer\"",
        );
    }
    let snapshot = match s.snapshot.as_deref() {
        None | Some("never") => Snapshot::Never,
        Some("initial") => Snapshot::Initial,
        Some(other) => {
            check.add(
                "source.snapshot",
                format!("found `{other}`, expected `initial` or `never`"),
            );
            Snapshot::Never
        }
    };
    let identity = match s.identity.as_deref() {
        None => crate::identity::Mode::Auto,
        Some(text) => crate::identity::Mode::parse(text).unwrap_or_else(|| {
            check.add(
                "source.identity",
                format!("found `{text}`, expected `auto`, `required`, `record` or `off`"),
            );
            crate::identity::Mode::Off
        }),
    };
    let tables = s.tables.unwrap_or_default();
    for (i, t) in tables.iter().enumerate() {
        if t.split('.').count() != 2 {
            check.add(
                format!("source.tables[{i}]"),
                format!("found `{t}`, expected `schema.table`"),
            );
        }
    }
    Some(SourceConfig {
        url,
        password,
        sslmode,
        sslrootcert,
        sslcert,
        sslkey,
        auth,
        publication: check.name("source.publication", s.publication, DEFAULT_PUBLICATION),
        slot: check.name("source.slot", s.slot, DEFAULT_SLOT),
        tables,
        snapshot,
        create_slot: s.create_slot.unwrap_or(true),
        status_interval: check.duration(
            "source.status_interval",
            s.status_interval.as_ref(),
            crate::source::DEFAULT_STATUS_INTERVAL,
        ),
        slot_busy_timeout: check.duration(
            "source.slot_busy_timeout",
            s.slot_busy_timeout.as_ref(),
            crate::source::DEFAULT_SLOT_BUSY_TIMEOUT,
        ),
        snapshot_connections: match s.snapshot_connections {
            None => crate::source::default_snapshot_connections(),
            Some(n @ 1..=64) => n as usize,
            Some(n) => {
                check.add(
                    "source.snapshot_connections",
                    format!("found {n}, expected 1 to 64 connections"),
                );
                1
            }
        },
        state_dir: s
            .state_dir
            .as_deref()
            .or(s.spool_dir.as_deref())
            .map_or_else(crate::source::default_spool_dir, resolve),
        spool_dir: s
            .spool_dir
            .map_or_else(crate::source::default_spool_dir, |d| resolve(&d)),
        identity,
    })
}

/// The raw value of query parameter `name` in a url, if present.
fn url_param<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = url.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

impl SourceConfig {
    /// Where and how to connect: the url, with the password from `password_env` and
    /// the effective `sslmode` and `sslrootcert`.
    pub fn connect_config(&self) -> Result<ConnectConfig, crate::source::error::SourceError> {
        let mut connect = ConnectConfig::from_url(&self.url)?;
        if let Some(password) = &self.password {
            connect.password = Some(password.clone());
        }
        connect.sslmode = self.sslmode;
        connect.sslrootcert = self.sslrootcert.clone();
        connect.sslcert = self.sslcert.clone();
        connect.sslkey = self.sslkey.clone();
        connect.auth = self.auth;
        Ok(connect)
    }
}
