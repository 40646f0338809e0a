//! `[sinks.NAME]`: where rows leave. Each kind is checked into the settings its sink
//! opens with ([`LakeSettings`], [`SpineSettings`]), whose defaults are the sink's
//! own named constants: nothing here restates a default.
//!
//! Invariants:
//! - A field that belongs to the other kind is refused with its path and what to do,
//!   never accepted and ignored.
//! - Every sink takes at least one route, and every route has a name.
//! - A lake's commits carry the source's slot and publication; a spine's event ids
//!   are bound to the slot.

use std::collections::BTreeMap;

use super::check::{Check, resolve};
use super::raw;
use super::source::SourceConfig;
use crate::pipeline::batch::BatchRow;
use crate::sink::lake::LakeSettings;
use crate::sink::spine::SpineSettings;

/// The kinds of sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// Delta tables on local disk or S3 (`type = "delta"`).
    Delta,
    /// An audit spine over HTTP (`type = "http"`).
    Http,
}

impl SinkKind {
    /// The kind as the file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Delta => "delta",
            SinkKind::Http => "http",
        }
    }
}

/// A sink, checked: its name and the settings it opens with.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// `NAME` in `[sinks.NAME]`.
    pub name: String,
    pub settings: SinkSettings,
}

/// What each kind of sink opens with.
#[derive(Clone, Debug)]
pub enum SinkSettings {
    /// `type = "delta"`: what [`crate::sink::lake::LakeSink::open`] takes.
    Delta(LakeSettings),
    /// `type = "http"`: what [`crate::sink::spine::SpineSink::open`] takes.
    Http(SpineSettings),
}

impl SinkConfig {
    /// The sink's kind (its `type`).
    pub fn kind(&self) -> SinkKind {
        match self.settings {
            SinkSettings::Delta(_) => SinkKind::Delta,
            SinkSettings::Http(_) => SinkKind::Http,
        }
    }

    /// Where the sink writes.
    pub fn url(&self) -> &str {
        match &self.settings {
            SinkSettings::Delta(lake) => &lake.url,
            SinkSettings::Http(spine) => &spine.url,
        }
    }

    /// The routes the sink takes.
    pub fn routes(&self) -> &[String] {
        match &self.settings {
            SinkSettings::Delta(lake) => &lake.routes,
            SinkSettings::Http(spine) => &spine.routes,
        }
    }
}

/// The fields only `http` sinks take, and whether `s` sets each.
fn spine_fields(s: &raw::Sink) -> [(&'static str, bool); 8] {
    [
        ("token_env", s.token_env.is_some()),
        ("kinds", s.kinds.is_some()),
        ("default_kind", s.default_kind.is_some()),
        ("default_source", s.default_source.is_some()),
        ("watch", s.watch.is_some()),
        ("request_timeout", s.request_timeout.is_some()),
        ("dead_letter_dir", s.dead_letter_dir.is_some()),
        ("key_file", s.key_file.is_some()),
    ]
}

/// The fields only `delta` sinks take, and whether `s` sets each.
fn lake_fields(s: &raw::Sink) -> [(&'static str, bool); 7] {
    [
        ("max_bytes", s.max_bytes.is_some()),
        ("storage_options", s.storage_options.is_some()),
        ("compact_min_files", s.compact_min_files.is_some()),
        ("small_file_bytes", s.small_file_bytes.is_some()),
        ("target_file_bytes", s.target_file_bytes.is_some()),
        ("checkpoint_interval", s.checkpoint_interval.is_some()),
        ("vacuum_retention", s.vacuum_retention.is_some()),
    ]
}

/// Checks every `[sinks.NAME]`; `source` (when valid) gives the slot and publication.
pub(super) fn validate(
    raw: BTreeMap<String, raw::Sink>,
    source: Option<&SourceConfig>,
    check: &mut Check,
) -> Vec<SinkConfig> {
    if raw.is_empty() {
        check.add(
            "sinks",
            "no sink configured: add e.g. [sinks.lake] with type = \"delta\" and url = \"file:///path\"",
        );
    }
    let (slot, publication) = source.map_or(
        (
            super::source::DEFAULT_SLOT,
            super::source::DEFAULT_PUBLICATION,
        ),
        |s| (s.slot.as_str(), s.publication.as_str()),
    );
    let mut sinks = Vec::new();
    for (name, s) in raw {
        let at = |field: &str| format!("sinks.{name}.{field}");
        let kind = match s.kind.as_deref() {
            Some("delta") => SinkKind::Delta,
            Some("http") => SinkKind::Http,
            Some(other) => {
                check.add(
                    at("type"),
                    format!("found `{other}`, expected `delta` or `http`"),
                );
                SinkKind::Delta
            }
            None => {
                check.add(at("type"), "missing: expected `delta` or `http`");
                SinkKind::Delta
            }
        };
        let (others, hint) = match kind {
            SinkKind::Delta => (
                spine_fields(&s).to_vec(),
                "only `http` sinks take this field: remove it, or set type = \"http\"",
            ),
            // Accepted and ignored before: now named, so nobody believes they act.
            SinkKind::Http => (
                lake_fields(&s).to_vec(),
                "only `delta` sinks take this field (an `http` sink ignores it): remove it from this sink",
            ),
        };
        for (field, _) in others.into_iter().filter(|(_, set)| *set) {
            check.add(at(field), hint);
        }
        let settings = match kind {
            SinkKind::Delta => SinkSettings::Delta(lake(&name, s, slot, publication, check)),
            SinkKind::Http => SinkSettings::Http(spine(&name, s, slot, check)),
        };
        sinks.push(SinkConfig { name, settings });
    }
    sinks
}

/// The fields every kind takes: where, which routes (the kind's default when not
/// set), how long rows wait, and how many rows make a flush.
struct Common {
    url: String,
    routes: Vec<String>,
    flush_interval: std::time::Duration,
    max_rows: usize,
}

fn common(
    name: &str,
    s: &raw::Sink,
    kind: SinkKind,
    defaults: (&str, std::time::Duration, usize),
    check: &mut Check,
) -> Common {
    let at = |field: &str| format!("sinks.{name}.{field}");
    let (default_route, default_flush, default_rows) = defaults;
    let url = s.url.clone().unwrap_or_default();
    let (expected, schemes): (&str, &[&str]) = match kind {
        SinkKind::Delta => (
            "`file:///absolute/dir` or `s3://bucket/prefix`",
            &["file://", "s3://"],
        ),
        SinkKind::Http => ("`http://host:port/events`", &["http://", "https://"]),
    };
    if url.is_empty() {
        check.add(at("url"), format!("missing: expected {expected}"));
    } else if !schemes.iter().any(|scheme| url.starts_with(scheme)) {
        check.add(at("url"), format!("found `{url}`, expected {expected}"));
    }
    if s.routes.as_ref().is_some_and(Vec::is_empty) {
        check.add(
            at("routes"),
            format!(
                "found `[]`: a sink with no routes is given no rows; list the routes it takes (default `[\"{default_route}\"]`), or remove the sink"
            ),
        );
    }
    for (i, route) in s.routes.iter().flatten().enumerate() {
        if route.trim().is_empty() {
            check.add(
                format!("sinks.{name}.routes[{i}]"),
                "found an empty route name, expected a route such as `default`",
            );
        }
    }
    Common {
        url,
        routes: s
            .routes
            .clone()
            .unwrap_or_else(|| vec![default_route.to_owned()]),
        flush_interval: check.duration(
            &at("flush_interval"),
            s.flush_interval.as_ref(),
            default_flush,
        ),
        max_rows: check.positive(&at("max_rows"), s.max_rows, default_rows),
    }
}

/// A `delta` sink: the lake's settings.
fn lake(
    name: &str,
    s: raw::Sink,
    slot: &str,
    publication: &str,
    check: &mut Check,
) -> LakeSettings {
    let at = |field: &str| format!("sinks.{name}.{field}");
    let defaults = (
        BatchRow::DEFAULT_ROUTE,
        LakeSettings::DEFAULT_FLUSH_INTERVAL,
        LakeSettings::DEFAULT_MAX_ROWS,
    );
    let common = common(name, &s, SinkKind::Delta, defaults, check);
    let mut settings = LakeSettings::new(name, common.url, format!("airlock:{slot}"));
    settings.routes = common.routes;
    settings.flush_interval = common.flush_interval;
    settings.max_rows = common.max_rows;
    settings.max_bytes = check.positive(&at("max_bytes"), s.max_bytes, settings.max_bytes);
    settings.storage_options = s.storage_options.unwrap_or_default().into_iter().collect();
    settings
        .commit_info
        .insert("airlock.slot".into(), slot.into());
    settings
        .commit_info
        .insert("airlock.publication".into(), publication.into());
    // Each default is the one `LakeSettings::new` set.
    let m = &mut settings.maintenance;
    let mut count = |field: &str, value: Option<i64>, default: u64| {
        check.positive(&at(field), value, default as usize) as u64
    };
    m.compact_min_files = count(
        "compact_min_files",
        s.compact_min_files,
        m.compact_min_files as u64,
    ) as usize;
    m.small_file_bytes = count("small_file_bytes", s.small_file_bytes, m.small_file_bytes);
    m.target_file_bytes = count(
        "target_file_bytes",
        s.target_file_bytes,
        m.target_file_bytes,
    );
    m.checkpoint_interval = count(
        "checkpoint_interval",
        s.checkpoint_interval,
        m.checkpoint_interval,
    );
    m.vacuum_retention = check.duration(
        &at("vacuum_retention"),
        s.vacuum_retention.as_ref(),
        m.vacuum_retention,
    );
    settings
}

/// An `http` sink: the spine's settings.
fn spine(name: &str, s: raw::Sink, slot: &str, check: &mut Check) -> SpineSettings {
    let at = |field: &str| format!("sinks.{name}.{field}");
    let defaults = (
        SpineSettings::DEFAULT_ROUTE,
        SpineSettings::DEFAULT_FLUSH_INTERVAL,
        SpineSettings::DEFAULT_MAX_EVENTS,
    );
    let common = common(name, &s, SinkKind::Http, defaults, check);
    let mut settings = SpineSettings::new(name, common.url);
    settings.routes = common.routes;
    settings.flush_interval = common.flush_interval;
    settings.max_events = common.max_rows;
    settings.slot = slot.to_owned();
    settings.token = check.secret(&at("token_env"), s.token_env);
    if let Some(kinds) = s.kinds {
        settings.kinds = kinds;
    }
    if let Some(kind) = s.default_kind {
        if kind.trim().is_empty() {
            check.add(
                at("default_kind"),
                "found an empty kind, expected the event kind the spine gets for rows without one (e.g. `other`, the default): set it, or remove the field",
            );
        }
        settings.default_kind = kind;
    }
    if let Some(source) = s.default_source {
        settings.default_source = source;
    }
    settings.watch = s
        .watch
        .into_iter()
        .flatten()
        .map(|w| {
            let source = w.source.unwrap_or_else(|| settings.default_source.clone());
            (w.table, w.kind, source)
        })
        .collect();
    settings.request_timeout = check.duration(
        &at("request_timeout"),
        s.request_timeout.as_ref(),
        settings.request_timeout,
    );
    let base = check.base();
    settings.dead_letter_dir = s.dead_letter_dir.as_deref().map(|d| resolve(base, d));
    settings.key_file = match s.key_file.as_deref() {
        Some("") => {
            check.add(at("key_file"), "found an empty path, expected the file that holds the spine key (created when absent): set it, or remove the field for the default");
            None
        }
        Some(file) => Some(resolve(base, file)),
        None => {
            let default = crate::sink::spine::default_key_file(slot);
            if default.is_none() {
                check.add(at("key_file"), "missing: neither XDG_STATE_HOME nor HOME is set, so the spine key has no default place: set key_file to a path");
            }
            default
        }
    };
    settings
}
