//! Configuration, in two phases: `raw` is what the TOML file says (serde, unknown
//! fields refused), [`Config`] is what airlock runs with (typed, defaults applied,
//! secrets read from the environment). [`Config::from_toml`] reports every problem at
//! once, each with the path of the field, what it found and what it expected.
//!
//! ```toml
//! [source]
//! url = "postgres://airlock@db.internal:5432/app"   # password from password_env
//! password_env = "AIRLOCK_PG_PASSWORD"
//! publication = "airlock"
//! slot = "airlock"
//!
//! [plugins]
//! dir = "plugins"
//!
//! [sinks.lake]
//! type = "delta"
//! url = "file:///var/lib/airlock/lake"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::source::auth::{AuthPolicy, ChannelBinding};
use crate::source::protocol::{ConnectConfig, SSL_MODES, SslMode};

/// The file as written. Every field is documented in `docs/configuration.md`.
pub mod raw {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub source: Option<Source>,
        pub plugins: Option<Plugins>,
        #[serde(default)]
        pub sinks: BTreeMap<String, Sink>,
        pub admin: Option<Admin>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Source {
        /// `postgres://user@host:port/dbname?sslmode=...`. A password here works but is
        /// better kept in the environment (`password_env`).
        pub url: Option<String>,
        /// Name of an environment variable holding the password.
        pub password_env: Option<String>,
        /// TLS: `disable`, `prefer` (default, as libpq), `require`, `verify-ca` or
        /// `verify-full`. May be given in `url` instead (`?sslmode=`), not in both.
        pub sslmode: Option<String>,
        /// PEM file with the CA certificate(s) the server's certificate must chain to
        /// (`verify-ca`, `verify-full`). Relative to the configuration file.
        pub sslrootcert: Option<String>,
        /// Publication to stream. Default `airlock`.
        pub publication: Option<String>,
        /// Replication slot to stream from. Default `airlock`.
        pub slot: Option<String>,
        /// Tables for the publication when airlock creates it (`schema.table`).
        pub tables: Option<Vec<String>>,
        /// `never` (default) or `initial`: copy existing rows before streaming.
        pub snapshot: Option<String>,
        /// Create the slot when it does not exist. Default true.
        pub create_slot: Option<bool>,
        /// How often to confirm progress to PostgreSQL. Default `10s`.
        pub status_interval: Option<String>,
        /// How long the slot may stay in use by another consumer (retried with
        /// backoff meanwhile) before airlock stops with an error. Default `60s`, a
        /// little longer than PostgreSQL's default `wal_sender_timeout`, so that the
        /// walsender of an airlock that just died has time to go away.
        pub slot_busy_timeout: Option<String>,
        /// Client certificate (PEM) for servers that authenticate clients by
        /// certificate, with its private key (`sslkey`, mode 0600). Relative to the
        /// configuration file. May be given in `url` instead, not in both.
        pub sslcert: Option<String>,
        pub sslkey: Option<String>,
        /// The authentication methods accepted from the server, as libpq's
        /// `require_auth` (`scram-sha-256`, or `!password,!md5`). Default: all.
        pub require_auth: Option<String>,
        /// SCRAM channel binding: `disable`, `prefer` (default) or `require`.
        pub channel_binding: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Plugins {
        /// The plugin folder: every `*.wasm` in it is a stage, in file-name order.
        pub dir: Option<String>,
        /// Reload when the folder changes. Default true.
        pub watch: Option<bool>,
        /// Stages that must always be present; a reload without them is refused. Each
        /// entry is a file stem (`30-mask`), or a stem pinned to its content
        /// (`30-mask@sha256:` and the 64 hex digits `airlock check` prints).
        pub require: Option<Vec<String>>,
        /// `halt` (default) or `dead-letter`.
        pub on_error: Option<String>,
        /// Where dead-lettered transactions go (a directory). Required with `dead-letter`.
        pub dead_letter_dir: Option<String>,
        /// Where compiled components are cached. Default `$XDG_CACHE_HOME/airlock` or `~/.cache/airlock`.
        pub cache_dir: Option<String>,
        /// Tags stages may write: names, or prefixes ending in `*` (`pii:*`).
        /// Default: the tags the example guests write (`pii`, `pii:email`, …).
        pub tags: Option<Vec<String>>,
        pub limits: Option<Limits>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Limits {
        /// Linear memory per guest instance, MiB. Default 64.
        pub memory_mib: Option<i64>,
        /// Time allowed per guest call, milliseconds. Default 2000.
        pub deadline_ms: Option<i64>,
        /// Bytes a guest may write into one batch. Default 67108864.
        pub output_bytes: Option<i64>,
        /// Guest log lines per second. Default 50.
        pub log_lines_per_second: Option<i64>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Sink {
        /// `delta` (lake) or `http` (spine).
        #[serde(rename = "type")]
        pub kind: Option<String>,
        /// Where: `file:///abs/dir` or `s3://bucket/prefix` for `delta`, `http://host:port/events` for `http`.
        pub url: Option<String>,
        /// Routes this sink takes. Default `["default"]`.
        pub routes: Option<Vec<String>>,
        /// Longest time rows wait before a commit. Default `5s`.
        pub flush_interval: Option<String>,
        /// Commit when this many rows are buffered. Default 100000.
        pub max_rows: Option<i64>,
        /// Commit when this many bytes are buffered. Default 67108864.
        pub max_bytes: Option<i64>,
        /// Extra object store options for `s3://` (e.g. `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`).
        pub storage_options: Option<BTreeMap<String, String>>,
        // Lake maintenance (`delta` only); see `docs/lake.md`.
        /// Compact a table when it has more than this many small files. Default 32.
        pub compact_min_files: Option<i64>,
        /// A data file smaller than this many bytes counts as small. Default 16777216 (16 MiB).
        pub small_file_bytes: Option<i64>,
        /// Compaction merges small files into files of about this many bytes. Default 134217728 (128 MiB).
        pub target_file_bytes: Option<i64>,
        /// Write a Delta checkpoint every this many commits. Default 10.
        pub checkpoint_interval: Option<i64>,
        /// How long files removed by compaction stay for time travel before vacuum deletes them. Default `168h` (7 days).
        pub vacuum_retention: Option<String>,
        // The audit spine (`http` only); see `docs/spine.md`.
        /// Environment variable with the spine's bearer token.
        pub token_env: Option<String>,
        /// Event kinds the spine accepts. Default: audit-stream-py's EventKind values.
        pub kinds: Option<Vec<String>>,
        /// `kind` of events whose row has no `spine.kind` annotation and no `watch` entry. Default `other`.
        pub default_kind: Option<String>,
        /// `source` of events without a `spine.source` annotation or `watch` entry. Default `airlock`.
        pub default_source: Option<String>,
        /// Per-table kind and source: `[[sinks.NAME.watch]] table = "public.*"`, `kind`, `source`.
        pub watch: Option<Vec<Watch>>,
        /// Time allowed for one request to the spine before it is retried. Default `30s`.
        pub request_timeout: Option<String>,
        /// Where events the spine refuses (4xx) go, so the stream goes on. Default: none, a 4xx stops the pipeline.
        pub dead_letter_dir: Option<String>,
        /// File with the 32-byte secret that signs this sink's event ids, created (mode 0600) when absent.
        /// Default `$XDG_STATE_HOME/airlock/spine-{slot}.key`, else `~/.local/state/airlock/spine-{slot}.key`.
        pub key_file: Option<String>,
    }

    /// One `watch(table, kind, source)` entry of an `http` sink.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Watch {
        /// `schema.table` glob (`*`, `?`).
        pub table: String,
        /// Event kind for the table's rows.
        pub kind: String,
        /// Event source for the table's rows. Default: the sink's `default_source`.
        pub source: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Admin {
        /// Address of the admin API. Default `127.0.0.1:8090`.
        pub listen: Option<String>,
        /// Environment variable with the bearer token the admin API requires.
        pub token_env: Option<String>,
    }
}

/// One problem in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted path of the field, e.g. `sinks.lake.url`.
    pub path: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        writeln!(
            f,
            "{} has {n} problem{}:",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for issue in &self.issues {
            writeln!(f, "  - {issue}")?;
        }
        Ok(())
    }
}

/// What to do with a batch a guest fails twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnError {
    Halt,
    DeadLetter(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Snapshot {
    Never,
    Initial,
}

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
}

#[derive(Clone, Debug)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    pub watch: bool,
    pub require: Vec<RequiredStage>,
    pub on_error: OnError,
    pub cache_dir: Option<PathBuf>,
    pub limits: crate::pipeline::runtime::Limits,
}

/// A stage that must be in every pipeline (`[plugins] require`): by name, or by name
/// and content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequiredStage {
    /// The stage's file stem, e.g. `30-mask`.
    pub name: String,
    /// The SHA-256 of the stage's `.wasm`, lowercase hex, when the entry pins it.
    pub sha256: Option<String>,
}

impl RequiredStage {
    /// The separator between a stage's name and its pinned hash in `require`.
    pub const PIN: &'static str = "@sha256:";

    /// Parses `NAME` or `NAME@sha256:HEX` (64 hex digits, either case).
    pub fn parse(entry: &str) -> Result<RequiredStage, String> {
        let expected = "expected a stage name (a file stem such as `30-mask`), optionally pinned \
                        to its content as `30-mask@sha256:` and the 64 hex digits of its SHA-256 \
                        (`airlock check` prints them)";
        let (name, sha256) = match entry.split_once(Self::PIN) {
            None => (entry, None),
            Some((name, hex)) => {
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "found `{entry}`: the pinned hash is not 64 hex digits; {expected}"
                    ));
                }
                (name, Some(hex.to_ascii_lowercase()))
            }
        };
        if name.is_empty() || name.contains(['/', '\\', '@']) {
            return Err(format!("found `{entry}`, {expected}"));
        }
        Ok(RequiredStage {
            name: name.to_owned(),
            sha256,
        })
    }
}

impl std::fmt::Display for RequiredStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sha256 {
            None => f.write_str(&self.name),
            Some(hex) => write!(f, "{}{}{hex}", self.name, Self::PIN),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkKind {
    Delta,
    Http,
}

#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
    pub url: String,
    pub routes: Vec<String>,
    pub flush_interval: Duration,
    pub max_rows: usize,
    pub max_bytes: usize,
    pub storage_options: HashMap<String, String>,
    // Lake maintenance (`delta` sinks).
    pub compact_min_files: usize,
    pub small_file_bytes: u64,
    pub target_file_bytes: u64,
    pub checkpoint_interval: u64,
    pub vacuum_retention: Duration,
    /// Spine settings (`http` sinks).
    pub spine: SpineConfig,
}

/// What an `http` sink needs beyond the common fields.
#[derive(Clone, Debug)]
pub struct SpineConfig {
    pub token: Option<String>,
    pub kinds: Option<Vec<String>>,
    pub default_kind: String,
    pub default_source: String,
    /// `(table glob, kind, source)`.
    pub watch: Vec<(String, String, String)>,
    pub request_timeout: Duration,
    pub dead_letter_dir: Option<PathBuf>,
    /// The key file that signs the event ids (`key_file`, else the slot's default).
    pub key_file: PathBuf,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

/// The validated configuration airlock runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceConfig,
    pub plugins: PluginsConfig,
    pub sinks: Vec<SinkConfig>,
    pub admin: AdminConfig,
}

/// Parses `5s`, `250ms`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, value: Option<&String>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(text) => parse_duration(text).unwrap_or_else(|| {
                self.add(
                    path,
                    format!("found `{text}`, expected a duration like `500ms`, `5s`, `2m` or `1h`"),
                );
                default
            }),
        }
    }

    fn positive(&mut self, path: &str, value: Option<i64>, default: usize) -> usize {
        match value {
            None => default,
            Some(n) if n > 0 => n as usize,
            Some(n) => {
                self.add(path, format!("found {n}, expected a number greater than 0"));
                default
            }
        }
    }

    fn name(&mut self, path: &str, value: Option<String>, default: &str) -> String {
        let name = value.unwrap_or_else(|| default.to_owned());
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            self.add(
                path,
                format!("found `{name}`, expected 1 to 63 lowercase letters, digits or underscores (a PostgreSQL slot/publication name)"),
            );
        }
        name
    }
}

fn env_secret(
    issues: &mut Issues,
    env: &dyn Fn(&str) -> Option<String>,
    path: &str,
    var: Option<String>,
) -> Option<String> {
    let var = var?;
    match env(&var) {
        Some(value) => Some(value),
        None => {
            issues.add(
                path,
                format!(
                    "the environment variable `{var}` is not set: export it, or remove `{path}`"
                ),
            );
            None
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            issues: vec![ConfigIssue {
                path: "(file)".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&file, &text, base)
    }

    /// Validates configuration text; relative paths are taken from `base`, secrets
    /// from the process environment.
    pub fn from_toml(file: &str, text: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(file, text, base, &|var| std::env::var(var).ok())
    }

    /// Validates configuration text with secrets looked up through `env`: a pure
    /// function of its inputs.
    pub fn from_toml_with_env(
        file: &str,
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let error = |issues| ConfigError {
            file: file.to_owned(),
            issues,
        };
        let (raw, shape_issues) = parse_raw(text).map_err(error)?;
        let mut issues = Issues(Vec::new());
        let resolve = |p: &str| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        // [source]
        let source = match raw.source {
            None => {
                issues.add(
                    "source",
                    "missing: add a [source] section with at least `url`",
                );
                None
            }
            Some(s) => {
                let url = s.url.unwrap_or_else(|| {
                    issues.add(
                        "source.url",
                        "missing: expected `postgres://user@host:port/dbname`",
                    );
                    String::new()
                });
                let mut parsed = None;
                let postgres_url =
                    url.starts_with("postgres://") || url.starts_with("postgresql://");
                if !url.is_empty() && !postgres_url {
                    issues.add(
                        "source.url",
                        "expected a URL starting with `postgres://` or `postgresql://`",
                    );
                } else if !url.is_empty() {
                    match ConnectConfig::from_url(&url) {
                        Ok(c) => parsed = Some(c),
                        Err(crate::source::error::SourceError::InvalidUrl { reason }) => {
                            issues.add("source.url", reason)
                        }
                        Err(other) => issues.add("source.url", other.to_string()),
                    }
                }
                let password = env_secret(&mut issues, env, "source.password_env", s.password_env);
                let url_sslmode =
                    url_param(&url, "sslmode").and(parsed.as_ref().map(|c| c.sslmode));
                let sslmode = match s.sslmode.as_deref() {
                    None => url_sslmode.unwrap_or_default(),
                    Some(text) => match SslMode::parse(text) {
                        Some(mode) => {
                            if let Some(in_url) = url_sslmode.filter(|m| *m != mode) {
                                issues.add(
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
                            issues.add(
                                "source.sslmode",
                                format!("found `{text}`, expected {SSL_MODES}"),
                            );
                            SslMode::default()
                        }
                    },
                };
                let url_rootcert = parsed.as_ref().and_then(|c| c.sslrootcert.clone());
                let sslrootcert = match (s.sslrootcert.as_deref(), url_rootcert) {
                    (Some(field), Some(in_url))
                        if resolve(field) != resolve(&in_url.to_string_lossy()) =>
                    {
                        issues.add(
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
                    (true, None) => issues.add(
                        "source.sslrootcert",
                        format!(
                            "missing: sslmode `{}` verifies the server's certificate and needs the CA that signed it: set sslrootcert to a PEM file with the CA certificate(s)",
                            sslmode.as_str()
                        ),
                    ),
                    (false, Some(path)) => issues.add(
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
                    let in_url =
                        url_param(&url, key).and_then(crate::source::connect::percent_decode);
                    match (field, in_url) {
                        (Some(field), Some(in_url)) if field != in_url => {
                            issues.add(
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
                        Err(e) => issues.add("source.require_auth", e),
                    }
                }
                if let Some(text) = channel_binding {
                    match text.parse() {
                        Ok(c) => auth.channel_binding = c,
                        Err(e) => issues.add("source.channel_binding", e),
                    }
                }
                if sslcert.is_some() != sslkey.is_some() {
                    issues.add(
                        if sslcert.is_some() {
                            "source.sslkey"
                        } else {
                            "source.sslcert"
                        },
                        "missing: a client certificate needs both sslcert and sslkey",
                    );
                }
                if auth.channel_binding == ChannelBinding::Require && sslmode == SslMode::Disable {
                    issues.add(
                        "source.channel_binding",
                        "`require` needs TLS, but sslmode is `disable`: set sslmode = \"verify-full\", or channel_binding = \"prefer\"",
                    );
                }
                let snapshot = match s.snapshot.as_deref() {
                    None | Some("never") => Snapshot::Never,
                    Some("initial") => Snapshot::Initial,
                    Some(other) => {
                        issues.add(
                            "source.snapshot",
                            format!("found `{other}`, expected `initial` or `never`"),
                        );
                        Snapshot::Never
                    }
                };
                let tables = s.tables.unwrap_or_default();
                for (i, t) in tables.iter().enumerate() {
                    if t.split('.').count() != 2 {
                        issues.add(
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
                    publication: issues.name("source.publication", s.publication, "airlock"),
                    slot: issues.name("source.slot", s.slot, "airlock"),
                    tables,
                    snapshot,
                    create_slot: s.create_slot.unwrap_or(true),
                    status_interval: issues.duration(
                        "source.status_interval",
                        s.status_interval.as_ref(),
                        Duration::from_secs(10),
                    ),
                    slot_busy_timeout: issues.duration(
                        "source.slot_busy_timeout",
                        s.slot_busy_timeout.as_ref(),
                        Duration::from_secs(60),
                    ),
                })
            }
        };

        // [plugins]
        let p = raw.plugins.unwrap_or(raw::Plugins {
            tags: None,
            dir: None,
            watch: None,
            require: None,
            on_error: None,
            dead_letter_dir: None,
            cache_dir: None,
            limits: None,
        });
        let dir = resolve(p.dir.as_deref().unwrap_or("plugins"));
        let on_error = match (p.on_error.as_deref(), p.dead_letter_dir) {
            (None | Some("halt"), _) => OnError::Halt,
            (Some("dead-letter"), Some(d)) => OnError::DeadLetter(resolve(&d)),
            (Some("dead-letter"), None) => {
                issues.add("plugins.dead_letter_dir", "missing: `on_error = \"dead-letter\"` needs a directory for the quarantined transactions");
                OnError::Halt
            }
            (Some(other), _) => {
                issues.add(
                    "plugins.on_error",
                    format!("found `{other}`, expected `halt` or `dead-letter`"),
                );
                OnError::Halt
            }
        };
        let defaults = crate::pipeline::runtime::Limits::default();
        let l = p.limits.unwrap_or(raw::Limits {
            memory_mib: None,
            deadline_ms: None,
            output_bytes: None,
            log_lines_per_second: None,
        });
        let limits = crate::pipeline::runtime::Limits {
            memory_bytes: issues.positive(
                "plugins.limits.memory_mib",
                l.memory_mib,
                defaults.memory_bytes >> 20,
            ) << 20,
            deadline: Duration::from_millis(issues.positive(
                "plugins.limits.deadline_ms",
                l.deadline_ms,
                defaults.deadline.as_millis() as usize,
            ) as u64),
            output_bytes: issues.positive(
                "plugins.limits.output_bytes",
                l.output_bytes,
                defaults.output_bytes,
            ),
            log_lines_per_second: issues.positive(
                "plugins.limits.log_lines_per_second",
                l.log_lines_per_second,
                defaults.log_lines_per_second as usize,
            ) as u32,
            // Set below, once the sinks (and so the routes) are known.
            names: defaults.names.clone(),
        };
        let tags = p.tags.unwrap_or_else(|| {
            crate::pipeline::names::DEFAULT_TAGS
                .iter()
                .map(|t| (*t).to_owned())
                .collect()
        });
        for (i, tag) in tags.iter().enumerate() {
            if let Err(e) = crate::pipeline::names::Names::check_pattern(tag) {
                issues.add(format!("plugins.tags[{i}]"), e);
            }
        }
        let plugins = PluginsConfig {
            dir,
            watch: p.watch.unwrap_or(true),
            require: p
                .require
                .unwrap_or_default()
                .iter()
                .enumerate()
                .filter_map(|(i, entry)| {
                    RequiredStage::parse(entry)
                        .map_err(|e| issues.add(format!("plugins.require[{i}]"), e))
                        .ok()
                })
                .collect(),
            on_error,
            cache_dir: p.cache_dir.map(|d| resolve(&d)).or_else(default_cache_dir),
            limits,
        };

        // [sinks.*]
        if raw.sinks.is_empty() {
            issues.add("sinks", "no sink configured: add e.g. [sinks.lake] with type = \"delta\" and url = \"file:///path\"");
        }
        let mut sinks = Vec::new();
        for (name, s) in raw.sinks {
            let at = |field: &str| format!("sinks.{name}.{field}");
            let kind = match s.kind.as_deref() {
                Some("delta") => SinkKind::Delta,
                Some("http") => SinkKind::Http,
                Some(other) => {
                    issues.add(
                        at("type"),
                        format!("found `{other}`, expected `delta` or `http`"),
                    );
                    SinkKind::Delta
                }
                None => {
                    issues.add(at("type"), "missing: expected `delta` or `http`");
                    SinkKind::Delta
                }
            };
            let url = s.url.unwrap_or_default();
            match kind {
                SinkKind::Delta if url.is_empty() => issues.add(
                    at("url"),
                    "missing: expected `file:///absolute/dir` or `s3://bucket/prefix`",
                ),
                SinkKind::Http if url.is_empty() => {
                    issues.add(at("url"), "missing: expected `http://host:port/events`")
                }
                SinkKind::Delta if !(url.starts_with("file://") || url.starts_with("s3://")) => {
                    issues.add(
                        at("url"),
                        format!(
                            "found `{url}`, expected `file:///absolute/dir` or `s3://bucket/prefix`"
                        ),
                    )
                }
                SinkKind::Http if !(url.starts_with("http://") || url.starts_with("https://")) => {
                    issues.add(
                        at("url"),
                        format!("found `{url}`, expected `http://host:port/events`"),
                    )
                }
                _ => {}
            }
            let http = kind == SinkKind::Http;
            let default_source = s.default_source.clone().unwrap_or_else(|| "airlock".into());
            let spine = SpineConfig {
                token: if http {
                    env_secret(&mut issues, env, &at("token_env"), s.token_env.clone())
                } else {
                    None
                },
                kinds: s.kinds.clone(),
                default_kind: s.default_kind.clone().unwrap_or_else(|| "other".into()),
                watch: s
                    .watch
                    .iter()
                    .flatten()
                    .map(|w| {
                        (
                            w.table.clone(),
                            w.kind.clone(),
                            w.source.clone().unwrap_or_else(|| default_source.clone()),
                        )
                    })
                    .collect(),
                default_source,
                request_timeout: issues.duration(
                    &at("request_timeout"),
                    s.request_timeout.as_ref(),
                    Duration::from_secs(30),
                ),
                dead_letter_dir: s.dead_letter_dir.as_deref().map(resolve),
                key_file: match s.key_file.as_deref() {
                    Some("") if http => {
                        issues.add(at("key_file"), "found an empty path, expected the file that holds the spine key (created when absent): set it, or remove the field for the default");
                        PathBuf::new()
                    }
                    Some(file) => resolve(file),
                    None => {
                        let slot = source.as_ref().map_or("airlock", |s| s.slot.as_str());
                        let default = crate::sink::spine::default_key_file(slot);
                        if http && default.is_none() {
                            issues.add(at("key_file"), "missing: neither XDG_STATE_HOME nor HOME is set, so the spine key has no default place: set key_file to a path");
                        }
                        default.unwrap_or_default()
                    }
                },
            };
            if !http {
                for (field, set) in [
                    ("token_env", s.token_env.is_some()),
                    ("kinds", s.kinds.is_some()),
                    ("default_kind", s.default_kind.is_some()),
                    ("default_source", s.default_source.is_some()),
                    ("watch", s.watch.is_some()),
                    ("request_timeout", s.request_timeout.is_some()),
                    ("dead_letter_dir", s.dead_letter_dir.is_some()),
                    ("key_file", s.key_file.is_some()),
                ] {
                    if set {
                        issues.add(
                            at(field),
                            "only `http` sinks take this field: remove it, or set type = \"http\"",
                        );
                    }
                }
            } else {
                // Accepted and ignored before: now named, so nobody believes they act.
                for (field, set) in [
                    ("storage_options", s.storage_options.is_some()),
                    ("compact_min_files", s.compact_min_files.is_some()),
                    ("small_file_bytes", s.small_file_bytes.is_some()),
                    ("target_file_bytes", s.target_file_bytes.is_some()),
                    ("checkpoint_interval", s.checkpoint_interval.is_some()),
                    ("vacuum_retention", s.vacuum_retention.is_some()),
                ] {
                    if set {
                        issues.add(
                            at(field),
                            "only `delta` sinks take this field (an `http` sink ignores it): remove it from this sink",
                        );
                    }
                }
            }
            let default_routes = if http {
                vec!["spine".to_owned()]
            } else {
                vec!["default".to_owned()]
            };
            let default_flush = if http {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(5)
            };
            if s.routes.as_ref().is_some_and(Vec::is_empty) {
                issues.add(
                    at("routes"),
                    format!(
                        "found `[]`: a sink with no routes is given no rows; list the routes it takes (default `[\"{}\"]`), or remove the sink",
                        default_routes[0]
                    ),
                );
            }
            for (i, route) in s.routes.iter().flatten().enumerate() {
                if route.trim().is_empty() {
                    issues.add(
                        format!("sinks.{name}.routes[{i}]"),
                        "found an empty route name, expected a route such as `default`",
                    );
                }
            }
            if s.default_kind
                .as_deref()
                .is_some_and(|k| k.trim().is_empty())
            {
                issues.add(
                    at("default_kind"),
                    "found an empty kind, expected the event kind the spine gets for rows without one (e.g. `other`, the default): set it, or remove the field",
                );
            }
            sinks.push(SinkConfig {
                kind,
                url,
                routes: s.routes.unwrap_or(default_routes),
                flush_interval: issues.duration(
                    &at("flush_interval"),
                    s.flush_interval.as_ref(),
                    default_flush,
                ),
                max_rows: issues.positive(
                    &at("max_rows"),
                    s.max_rows,
                    if http { 1000 } else { 100_000 },
                ),
                max_bytes: issues.positive(&at("max_bytes"), s.max_bytes, 64 << 20),
                storage_options: s.storage_options.unwrap_or_default().into_iter().collect(),
                // Lake maintenance.
                compact_min_files: issues.positive(
                    &at("compact_min_files"),
                    s.compact_min_files,
                    32,
                ),
                small_file_bytes: issues.positive(
                    &at("small_file_bytes"),
                    s.small_file_bytes,
                    16 << 20,
                ) as u64,
                target_file_bytes: issues.positive(
                    &at("target_file_bytes"),
                    s.target_file_bytes,
                    128 << 20,
                ) as u64,
                checkpoint_interval: issues.positive(
                    &at("checkpoint_interval"),
                    s.checkpoint_interval,
                    10,
                ) as u64,
                vacuum_retention: issues.duration(
                    &at("vacuum_retention"),
                    s.vacuum_retention.as_ref(),
                    Duration::from_secs(7 * 24 * 3600),
                ),
                spine,
                name,
            });
        }

        // [admin]
        let a = raw.admin.unwrap_or(raw::Admin {
            listen: None,
            token_env: None,
        });
        let listen_text = a.listen.unwrap_or_else(|| "127.0.0.1:8090".into());
        let listen = listen_text.parse().unwrap_or_else(|_| {
            issues.add(
                "admin.listen",
                format!("found `{listen_text}`, expected an address like `127.0.0.1:8090`"),
            );
            SocketAddr::from(([127, 0, 0, 1], 8090))
        });
        let token_env_set = a.token_env.is_some();
        let token = env_secret(&mut issues, env, "admin.token_env", a.token_env);
        if !listen.ip().is_loopback() && !token_env_set {
            issues.add(
                "admin.listen",
                format!(
                    "found `{listen}`, which is not a loopback address, and no token: anyone who \
                     reaches it could read the status and reload the pipeline; set \
                     [admin] token_env, or listen on 127.0.0.1"
                ),
            );
        }

        // A field with the wrong type was reported (and left out) while parsing: the
        // checks above found it missing, which says nothing more.
        let reported: Vec<&str> = shape_issues.iter().map(|i| issue_field(&i.path)).collect();
        // (Nor does a section found empty when one of its entries was left out.)
        issues.0.retain(|i| {
            let field = issue_field(&i.path);
            !reported.iter().any(|r| related_fields(r, field))
        });
        let issues = Issues(shape_issues.iter().cloned().chain(issues.0).collect());
        let mut plugins = plugins;
        plugins.limits.names = std::sync::Arc::new(crate::pipeline::names::Names::new(
            sinks
                .iter()
                .flat_map(|s: &SinkConfig| s.routes.iter().cloned()),
            tags,
        ));
        match source {
            Some(source) if issues.0.is_empty() => Ok(Config {
                source,
                plugins,
                sinks,
                admin: AdminConfig { listen, token },
            }),
            _ => Err(error(issues.0)),
        }
    }
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

/// The file as written, with every field of the wrong type (or unknown, or a table
/// missing a required field) reported with its path and line, then left out so
/// that the rest is still read and checked. A file that is not TOML at all is one
/// issue: where the syntax breaks.
fn parse_raw(text: &str) -> Result<(raw::File, Vec<ConfigIssue>), Vec<ConfigIssue>> {
    use serde::Deserialize as _;
    let syntax = |e: toml::de::Error| {
        let path = e
            .span()
            .map(|span| field_path(text, span))
            .unwrap_or_else(|| "(file)".into());
        vec![ConfigIssue {
            path,
            message: e.message().trim().to_owned(),
        }]
    };
    let mut root = toml::de::DeTable::parse(text).map_err(syntax)?;
    // (line, issue), shown in the order of the file.
    let mut issues: Vec<(usize, ConfigIssue)> = Vec::new();
    let done = |mut issues: Vec<(usize, ConfigIssue)>| {
        issues.sort_by_key(|(line, _)| *line);
        issues
            .into_iter()
            .map(|(_, issue)| issue)
            .collect::<Vec<_>>()
    };
    // Each round takes one bad field out: bounded by the number of fields.
    for _ in 0..256 {
        let e = match raw::File::deserialize(toml::de::Deserializer::from(root.clone())) {
            Ok(raw) => return Ok((raw, done(issues))),
            Err(e) => e,
        };
        let path = e
            .span()
            .map(|span| path_at(root.get_ref(), &span))
            .unwrap_or_default();
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let shown = match (path_text(&path), line) {
            (p, Some(line)) if p.is_empty() => format!("line {line}"),
            (p, Some(line)) => format!("{p} (line {line})"),
            (p, None) if p.is_empty() => "(file)".into(),
            (p, None) => p,
        };
        issues.push((
            line.unwrap_or(0),
            ConfigIssue {
                path: shown,
                message: type_message(e.message().trim()),
            },
        ));
        if !remove_field(root.get_mut(), &path) {
            return Err(done(issues));
        }
    }
    Err(done(issues))
}

/// Whether two field paths are the same field or one holds the other.
fn related_fields(a: &str, b: &str) -> bool {
    let holds = |outer: &str, inner: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
    };
    holds(a, b) || holds(b, a)
}

/// One step of a field's path: a key or an index into an array.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// `plugins.limits.memory_mib`, `sinks.spine.watch[1].kind`.
fn path_text(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(key) if out.is_empty() => out.push_str(key),
            Step::Key(key) => {
                out.push('.');
                out.push_str(key);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The field of an issue's path, without the line: `a.b (line 3)` → `a.b`.
fn issue_field(path: &str) -> &str {
    path.split_once(" (line ").map_or(path, |(field, _)| field)
}

fn contains(outer: &std::ops::Range<usize>, inner: &std::ops::Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer.start < outer.end
}

/// The path of the deepest key whose key or value covers `span`.
fn path_at(table: &toml::de::DeTable<'_>, span: &std::ops::Range<usize>) -> Vec<Step> {
    for (key, value) in table.iter() {
        if contains(&key.span(), span) {
            return vec![Step::Key(key.get_ref().to_string())];
        }
        if contains(&value.span(), span) {
            let mut path = vec![Step::Key(key.get_ref().to_string())];
            path.extend(value_path_at(value.get_ref(), span));
            return path;
        }
    }
    // Tables defined by `[header]`s may not span their keys: look inside them too.
    for (key, value) in table.iter() {
        if let toml::de::DeValue::Table(inner) = value.get_ref() {
            let inner_path = path_at(inner, span);
            if !inner_path.is_empty() {
                let mut path = vec![Step::Key(key.get_ref().to_string())];
                path.extend(inner_path);
                return path;
            }
        }
        if let toml::de::DeValue::Array(items) = value.get_ref() {
            for (i, item) in items.iter().enumerate() {
                if let toml::de::DeValue::Table(inner) = item.get_ref() {
                    let inner_path = path_at(inner, span);
                    if !inner_path.is_empty() || contains(&item.span(), span) {
                        let mut path = vec![Step::Key(key.get_ref().to_string()), Step::Index(i)];
                        path.extend(inner_path);
                        return path;
                    }
                }
            }
        }
    }
    Vec::new()
}

fn value_path_at(value: &toml::de::DeValue<'_>, span: &std::ops::Range<usize>) -> Vec<Step> {
    match value {
        toml::de::DeValue::Table(table) => path_at(table, span),
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if contains(&item.span(), span) {
                    let mut path = vec![Step::Index(i)];
                    path.extend(value_path_at(item.get_ref(), span));
                    return path;
                }
            }
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// Takes out the field at `path` (the whole array when the path goes into one).
/// Returns false when there is nothing to take out.
fn remove_field(table: &mut toml::de::DeTable<'_>, path: &[Step]) -> bool {
    let end = path
        .iter()
        .position(|s| matches!(s, Step::Index(_)))
        .unwrap_or(path.len());
    end > 0 && remove_in_table(table, &path[..end])
}

fn remove_in_table(table: &mut toml::de::DeTable<'_>, path: &[Step]) -> bool {
    match path {
        [Step::Key(key)] => table.remove(key.as_str()).is_some(),
        [Step::Key(key), rest @ ..] => table
            .get_mut(key.as_str())
            .is_some_and(|value| remove_in_value(value.get_mut(), rest)),
        _ => false,
    }
}

fn remove_in_value(value: &mut toml::de::DeValue<'_>, path: &[Step]) -> bool {
    match (value, path.first()) {
        (toml::de::DeValue::Table(table), Some(Step::Key(_))) => remove_in_table(table, path),
        (toml::de::DeValue::Array(items), Some(Step::Index(i))) => items
            .get_mut(*i)
            .is_some_and(|item| remove_in_value(item.get_mut(), &path[1..])),
        _ => false,
    }
}

/// serde's `invalid type: string "lots", expected i64` as `found the string "lots",
/// expected an integer`; other messages (unknown and missing fields) as they are.
fn type_message(message: &str) -> String {
    let Some(rest) = message.strip_prefix("invalid type: ") else {
        return message.to_owned();
    };
    let Some((found, expected)) = rest.rsplit_once(", expected ") else {
        return message.to_owned();
    };
    let expected = match expected {
        "i64" | "u64" | "i32" | "u32" => "an integer".to_owned(),
        "a boolean" => "`true` or `false`".to_owned(),
        "a sequence" => "an array, e.g. `[\"a\", \"b\"]`".to_owned(),
        "a map" => "a table".to_owned(),
        e if e.starts_with("struct ") => "a table".to_owned(),
        e => e.to_owned(),
    };
    let found = found.replace("floating point", "number");
    let found = match found.split_once(' ') {
        Some((kind, value)) => format!("the {kind} {value}"),
        None => format!("a {found}"),
    };
    format!("found {found}, expected {expected}")
}

/// Where a parse error is: `section.key (line N)` when the span covers a key under a
/// `[section]` header, else `line N`.
fn field_path(text: &str, span: std::ops::Range<usize>) -> String {
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let key = text.get(span.clone()).map(str::trim).filter(|k| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    });
    let section = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    match (section, key) {
        (Some(section), Some(key)) => format!("{section}.{key} (line {line})"),
        (None, Some(key)) => format!("{key} (line {line})"),
        _ => format!("line {line}"),
    }
}

/// `$XDG_CACHE_HOME/airlock/components` or `~/.cache/airlock/components`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("airlock").join("components"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(text: &str) -> Vec<String> {
        match Config::from_toml("airlock.toml", text, Path::new("/etc/airlock")) {
            Ok(_) => Vec::new(),
            Err(e) => e.issues.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn stages_may_write_the_routes_sinks_take_and_the_declared_tags() {
        let load = |extra: &str| {
            Config::from_toml(
                "airlock.toml",
                &format!(
                    "[source]\nurl = \"postgres://a@h/d\"\n[plugins]\n{extra}\n\
                     [sinks.lake]\ntype = \"delta\"\nurl = \"file:///lake\"\nroutes = [\"default\", \"restricted\"]\n"
                ),
                Path::new("/etc/airlock"),
            )
            .unwrap_or_else(|e| panic!("{e}"))
            .plugins
            .limits
            .names
        };
        let names = load("");
        names.check_route("restricted").unwrap();
        names.check_route("default").unwrap();
        assert!(names.check_route("spine").is_err());
        for tag in crate::pipeline::names::DEFAULT_TAGS {
            names.check_tag(tag).unwrap();
        }
        assert!(names.check_tag("pii:ada@example.com").is_err());
        let none = load("tags = []");
        assert!(none.check_tag("pii").is_err());
        let declared = load("tags = [\"finance\", \"pii:*\"]");
        declared.check_tag("finance").unwrap();
        declared.check_tag("pii:anything").unwrap();
        assert!(declared.check_tag("pii").is_err());
        let bad = issues(
            "[source]\nurl = \"postgres://a@h/d\"\n[plugins]\ntags = [\"*\", \"p*i\"]\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file:///lake\"\n",
        );
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].contains("plugins.tags[0]") && bad[1].contains("plugins.tags[1]"),
            "{bad:?}"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::from_toml(
            "airlock.toml",
            "[source]\nurl = \"postgres://u@h/db\"\n[sinks.lake]\ntype = \"delta\"\nurl = \"file:///tmp/lake\"\n",
            Path::new("/etc/airlock"),
        )
        .unwrap();
        assert_eq!(config.source.slot, "airlock");
        assert_eq!(config.plugins.dir, PathBuf::from("/etc/airlock/plugins"));
        assert_eq!(config.sinks[0].routes, vec!["default".to_string()]);
        assert_eq!(config.sinks[0].flush_interval, Duration::from_secs(5));
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:8090");
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_path() {
        let found = issues(
            "[source]\nurl = \"mysql://x\"\nslot = \"Bad-Slot\"\n[sinks.lake]\ntype = \"parquet\"\nflush_interval = \"soon\"\n",
        );
        assert_eq!(
            found,
            vec![
                "source.url: expected a URL starting with `postgres://` or `postgresql://`",
                "source.slot: found `Bad-Slot`, expected 1 to 63 lowercase letters, digits or underscores (a PostgreSQL slot/publication name)",
                "sinks.lake.type: found `parquet`, expected `delta` or `http`",
                "sinks.lake.url: missing: expected `file:///absolute/dir` or `s3://bucket/prefix`",
                "sinks.lake.flush_interval: found `soon`, expected a duration like `500ms`, `5s`, `2m` or `1h`",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let found = issues(
            "[source]\nurl = \"postgres://u@h/db\"\nslots = \"x\"\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file:///lake\"\n",
        );
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("source.slots (line 3): unknown field `slots`"),
            "{found:?}"
        );
    }

    #[test]
    fn an_http_sinks_key_file_defaults_to_its_slots_and_only_http_sinks_take_one() {
        let config = Config::from_toml(
            "airlock.toml",
            "[source]\nurl = \"postgres://u@h/db\"\nslot = \"s1\"\n\
             [sinks.a]\ntype = \"http\"\nurl = \"http://h/events\"\n\
             [sinks.b]\ntype = \"http\"\nurl = \"http://h/events\"\nkey_file = \"keys/b.key\"\n",
            Path::new("/etc/airlock"),
        )
        .unwrap();
        let default = crate::sink::spine::default_key_file("s1").expect("HOME is set");
        assert!(default.ends_with("airlock/spine-s1.key"), "{default:?}");
        assert_eq!(config.sinks[0].spine.key_file, default);
        assert_eq!(
            config.sinks[1].spine.key_file,
            PathBuf::from("/etc/airlock/keys/b.key")
        );
        let found = issues(
            "[source]\nurl = \"postgres://u@h/db\"\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"file:///l\"\nkey_file = \"k\"\n\
             [sinks.spine]\ntype = \"http\"\nurl = \"http://h/events\"\nkey_file = \"\"\n",
        );
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("sinks.lake.key_file: only `http` sinks take this field"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("sinks.spine.key_file: found an empty path"),
            "{found:?}"
        );
    }

    #[test]
    fn sslmode_comes_from_the_field_or_the_url_and_verifying_needs_a_ca() {
        let base = "[sinks.lake]\ntype = \"delta\"\nurl = \"file:///tmp/lake\"\n";
        let load = |source: &str| {
            Config::from_toml(
                "airlock.toml",
                &format!("[source]\n{source}\n{base}"),
                Path::new("/etc/airlock"),
            )
        };
        let c = load("url = \"postgres://u@h/db\"").unwrap();
        assert_eq!(
            (c.source.sslmode, c.source.sslrootcert),
            (SslMode::Prefer, None)
        );
        let c = load("url = \"postgres://u@h/db?sslmode=require\"").unwrap();
        assert_eq!(c.source.sslmode, SslMode::Require);
        let c = load(
            "url = \"postgres://u:pw@h/db\"\nsslmode = \"verify-full\"\nsslrootcert = \"tls/ca.pem\"",
        )
        .unwrap();
        assert_eq!(c.source.sslmode, SslMode::VerifyFull);
        let connect = c.source.connect_config().unwrap();
        assert_eq!(connect.sslmode, SslMode::VerifyFull);
        assert_eq!(
            connect.sslrootcert.as_deref(),
            Some(Path::new("/etc/airlock/tls/ca.pem"))
        );
        assert_eq!(connect.password.as_deref(), Some("pw"));

        let found = issues(&format!(
            "[source]\nurl = \"postgres://u@h/db?sslmode=disable\"\nsslmode = \"require\"\n{base}"
        ));
        assert_eq!(
            found,
            vec![
                "source.sslmode: found `require`, but source.url says sslmode=disable: keep one of them"
            ]
        );
        let found = issues(&format!(
            "[source]\nurl = \"postgres://u@h/db\"\nsslmode = \"require\"\nsslrootcert = \"/ca.pem\"\n{base}"
        ));
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("source.sslrootcert: found `/ca.pem`, but sslmode `require` does not check certificates"), "{found:?}");
        let found = issues(&format!(
            "[source]\nurl = \"postgres://u:hunter2@h/db?sslmode=sometimes\"\n{base}"
        ));
        assert_eq!(
            found,
            vec![
                "source.url: sslmode `sometimes` is not one of disable, prefer, require, verify-ca, verify-full"
            ]
        );
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
    }
}

/// Property tests over hostile configuration text: the parser and the validation never
/// panic, and every problem they report names a field path and says something.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// Every field the configuration knows, by section, to build plausible files from.
    const FIELDS: &[(&str, &[&str])] = &[
        (
            "source",
            &[
                "url",
                "password_env",
                "sslmode",
                "sslrootcert",
                "publication",
                "slot",
                "tables",
                "snapshot",
                "create_slot",
                "status_interval",
                "slot_busy_timeout",
                "sslcert",
                "sslkey",
                "require_auth",
                "channel_binding",
            ],
        ),
        (
            "plugins",
            &[
                "dir",
                "watch",
                "require",
                "on_error",
                "dead_letter_dir",
                "cache_dir",
                "tags",
            ],
        ),
        (
            "plugins.limits",
            &[
                "memory_mib",
                "deadline_ms",
                "output_bytes",
                "log_lines_per_second",
            ],
        ),
        (
            "sinks.lake",
            &[
                "type",
                "url",
                "routes",
                "flush_interval",
                "max_rows",
                "max_bytes",
                "storage_options",
                "compact_min_files",
                "token_env",
                "kinds",
                "watch",
                "default_kind",
                "dead_letter_dir",
            ],
        ),
        ("admin", &["listen", "token_env"]),
    ];

    /// A TOML value of any kind, with hostile text in it.
    fn value() -> impl Strategy<Value = String> {
        let text = prop_oneof![
            Just(String::new()),
            "[ -~]{0,40}",
            "\\PC{0,20}",
            Just("postgres://u:p@h:5432/db?sslmode=verify-full".to_owned()),
            Just("file:///tmp/lake".to_owned()),
            Just("s3://bucket/prefix".to_owned()),
            Just("10-mask@sha256:".to_owned() + &"a".repeat(64)),
            Just("0.0.0.0:8090".to_owned()),
            Just("5s".to_owned()),
            Just("-1ms".to_owned()),
        ];
        let scalar = prop_oneof![
            text.clone()
                .prop_map(|t| toml::Value::String(t).to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
        ];
        prop_oneof![
            3 => scalar.clone(),
            1 => prop::collection::vec(scalar, 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            1 => prop::collection::vec((text.clone(), text), 0..3).prop_map(|kv| {
                let inner: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{} = {}", toml::Value::String(k), toml::Value::String(v)))
                    .collect();
                format!("{{ {} }}", inner.join(", "))
            }),
        ]
    }

    /// A configuration file made of known sections and fields with random values.
    fn file() -> impl Strategy<Value = String> {
        let entry = (0..FIELDS.len(), any::<prop::sample::Index>(), value());
        prop::collection::vec(entry, 0..24).prop_map(|entries| {
            let mut by_section: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
            for (section, field, value) in entries {
                let (name, fields) = FIELDS[section];
                by_section
                    .entry(name)
                    .or_default()
                    .insert(*field.get(fields), value);
            }
            let mut text = String::new();
            for (section, fields) in by_section {
                text.push_str(&format!("[{section}]\n"));
                for (field, value) in fields {
                    text.push_str(&format!("{field} = {value}\n"));
                }
            }
            text
        })
    }

    fn check(text: &str) {
        let env = |var: &str| var.len().is_multiple_of(2).then(|| "secret".to_owned());
        if let Err(error) =
            Config::from_toml_with_env("fuzz.toml", text, Path::new("/etc/airlock"), &env)
        {
            for issue in &error.issues {
                assert!(!issue.message.is_empty(), "an empty message in {error}");
            }
            assert!(!error.to_string().is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn any_file_of_known_fields_is_validated_without_panicking(text in file()) {
            check(&text);
        }

        #[test]
        fn any_bytes_are_refused_or_validated_without_panicking(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            check(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn mutations_of_a_valid_file_are_validated_without_panicking(
            cut in 0usize..400,
            insert in "\\PC{0,8}",
        ) {
            let valid = "[source]\nurl = \"postgres://u@h/db\"\nslot = \"s\"\n\
                         [plugins]\nrequire = [\"10-mask\"]\n[plugins.limits]\nmemory_mib = 64\n\
                         [sinks.lake]\ntype = \"delta\"\nurl = \"file:///tmp/lake\"\n\
                         [sinks.spine]\ntype = \"http\"\nurl = \"http://127.0.0.1:8093/events\"\n\
                         [admin]\nlisten = \"127.0.0.1:8090\"\n";
            let mut at = cut.min(valid.len());
            while !valid.is_char_boundary(at) {
                at -= 1;
            }
            check(&format!("{}{insert}{}", &valid[..at], &valid[at..]));
        }
    }
}
