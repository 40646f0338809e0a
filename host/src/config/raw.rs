//! The file as written: what serde reads, unknown fields refused. Every field is
//! documented in `docs/configuration.md`; what each means once checked is in the
//! section's module ([`super::source`], [`super::plugins`], [`super::sinks`],
//! [`super::admin`]).

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub source: Option<Source>,
    pub plugins: Option<Plugins>,
    #[serde(default)]
    pub sinks: BTreeMap<String, Sink>,
    pub admin: Option<Admin>,
    pub policy: Option<Policy>,
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
    /// Where a transaction that PostgreSQL streams while it runs (larger than its
    /// `logical_decoding_work_mem`) is kept until it commits, past the few MiB held
    /// in memory: files `0600`, unlinked at once, as large as the transaction.
    /// Relative to the configuration file. Default `$TMPDIR`, else `/var/tmp`.
    pub spool_dir: Option<String>,
    /// Where airlock keeps which published tables the lake has whole, so that a
    /// table added to the publication or rewritten while it was stopped is copied
    /// at its next start (with `snapshot = "initial"`). A small JSON file per slot,
    /// `0600`; keep it on persistent disk. Relative to the configuration file.
    /// Default: `spool_dir`.
    pub state_dir: Option<String>,
    /// Connections the initial snapshot copies a large table over (ranges of its
    /// pages, one exported snapshot). Default: half the cores, at least 1, at most 8.
    pub snapshot_connections: Option<i64>,
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
    /// Who changed each row: `auto` (default: `required` once `airlock identity
    /// install` has been run in the database, else `off`), `required` (a change
    /// without an identity stops the run), `record` (written with none, counted) or
    /// `off`.
    pub identity: Option<String>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// What happens to a column nothing classifies: `deny` (default: it leaves no
    /// trace) or `allow` (it leaves as it is).
    pub default: Option<String>,
    /// Environment variable holding the key `hmac` classes hash with (at least 32
    /// bytes). Or `key_file`, not both.
    pub key_env: Option<String>,
    /// File holding the key, mode 0600. Relative to the configuration file.
    pub key_file: Option<String>,
    /// The key's id, written before every token (`k1:...`). Default `k1`.
    pub key_id: Option<String>,
    /// Class name to its action.
    #[serde(default)]
    pub classes: BTreeMap<String, Class>,
    /// `schema.table.column` (globs with `*`) to a class name.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    /// `keep`, `hmac`, `redact`, `null`, `keep-first`, `keep-last`, `truncate`,
    /// `generalize` or `drop` (`keep-last:4`, `generalize:day` also work).
    pub action: Option<String>,
    /// Characters kept by `keep-first`, `keep-last`, `truncate`.
    pub n: Option<i64>,
    /// The text `redact` writes. Default `[redacted]`.
    pub replacement: Option<String>,
    /// For `hmac`: any of `trim`, `lower`, `digits`, applied in that order.
    pub normalize: Option<Vec<String>>,
    /// For `generalize` of timestamps and dates: `hour`, `day`, `month`, `year`.
    pub unit: Option<String>,
    /// For `generalize` of numbers: the bucket width, a positive integer.
    pub width: Option<i64>,
}
