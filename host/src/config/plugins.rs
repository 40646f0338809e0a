//! `[plugins]`: the plugin folder, what a stage may do (limits, the routes and tags it
//! may write), what must always run, and what happens when a stage fails.
//!
//! Invariants:
//! - `on_error = "dead-letter"` has a directory; each `require` entry parses.
//! - The routes a stage may write are the sinks' (known once `[sinks]` is checked:
//!   see [`super::Config`]); the tags are `tags`, by default the example guests'.

use std::path::PathBuf;
use std::time::Duration;

use super::check::{Check, resolve};
use super::raw;
pub use crate::pipeline::OnError;
pub use crate::pipeline::registry::RequiredStage;

/// `[plugins]`, checked.
#[derive(Clone, Debug)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    pub watch: bool,
    pub require: Vec<RequiredStage>,
    pub on_error: OnError,
    pub cache_dir: Option<PathBuf>,
    /// The guests' limits; `names` is filled in once the sinks' routes are known.
    pub limits: crate::pipeline::runtime::Limits,
    /// The tags stages may write (names, or prefixes ending in `*`).
    pub tags: Vec<String>,
}

/// Checks `[plugins]` (absent: every default).
pub(super) fn validate(raw: Option<raw::Plugins>, check: &mut Check) -> PluginsConfig {
    let base = check.base();
    let resolve = |p: &str| resolve(base, p);
    let p = raw.unwrap_or(raw::Plugins {
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
            check.add("plugins.dead_letter_dir", "missing: `on_error = \"dead-letter\"` needs a directory for the quarantined transactions");
            OnError::Halt
        }
        (Some(other), _) => {
            check.add(
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
        memory_bytes: check.positive(
            "plugins.limits.memory_mib",
            l.memory_mib,
            defaults.memory_bytes >> 20,
        ) << 20,
        deadline: Duration::from_millis(check.positive(
            "plugins.limits.deadline_ms",
            l.deadline_ms,
            defaults.deadline.as_millis() as usize,
        ) as u64),
        output_bytes: check.positive(
            "plugins.limits.output_bytes",
            l.output_bytes,
            defaults.output_bytes,
        ),
        log_lines_per_second: check.positive(
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
            check.add(format!("plugins.tags[{i}]"), e);
        }
    }
    PluginsConfig {
        dir,
        watch: p.watch.unwrap_or(true),
        require: p
            .require
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| {
                RequiredStage::parse(entry)
                    .map_err(|e| check.add(format!("plugins.require[{i}]"), e))
                    .ok()
            })
            .collect(),
        on_error,
        cache_dir: p.cache_dir.map(|d| resolve(&d)).or_else(default_cache_dir),
        limits,
        tags,
    }
}

/// `$XDG_CACHE_HOME/airlock/components` or `~/.cache/airlock/components`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("airlock").join("components"))
}
