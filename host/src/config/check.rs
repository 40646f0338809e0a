//! The problems a configuration file has ([`ConfigIssue`], [`ConfigError`]), and what
//! every section's validation shares: the problems found so far, the environment
//! secrets come from, the folder relative paths start in, and the checks that recur
//! (durations, positive numbers, PostgreSQL names).
//!
//! Invariants:
//! - A check that fails records a [`ConfigIssue`] with the field's path and returns a
//!   value to go on with, so that one run reports every problem.
//! - Nothing here reads the process environment: secrets come through `env`, so
//!   validation is a pure function of its inputs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// The state of one validation.
pub(super) struct Check<'a> {
    pub(super) issues: Vec<ConfigIssue>,
    env: &'a dyn Fn(&str) -> Option<String>,
    base: &'a Path,
}

impl<'a> Check<'a> {
    pub(super) fn new(env: &'a dyn Fn(&str) -> Option<String>, base: &'a Path) -> Check<'a> {
        Check {
            issues: Vec::new(),
            env,
            base,
        }
    }

    /// The folder relative paths start in (the configuration file's).
    pub(super) fn base(&self) -> &'a Path {
        self.base
    }

    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(super) fn duration(
        &mut self,
        path: &str,
        value: Option<&String>,
        default: Duration,
    ) -> Duration {
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

    pub(super) fn positive(&mut self, path: &str, value: Option<i64>, default: usize) -> usize {
        match value {
            None => default,
            Some(n) if n > 0 => n as usize,
            Some(n) => {
                self.add(path, format!("found {n}, expected a number greater than 0"));
                default
            }
        }
    }

    /// A slot or publication name: 1 to 63 lowercase letters, digits or underscores.
    pub(super) fn name(&mut self, path: &str, value: Option<String>, default: &str) -> String {
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

    /// The value of the environment variable `var` names (field `path`), if `var` is
    /// set; a variable that is not set is a problem naming it.
    pub(super) fn secret(&mut self, path: &str, var: Option<String>) -> Option<String> {
        let var = var?;
        let value = (self.env)(&var);
        if value.is_none() {
            self.add(
                path,
                format!(
                    "the environment variable `{var}` is not set: export it, or remove `{path}`"
                ),
            );
        }
        value
    }
}

/// `path` taken from `base` unless absolute.
pub(super) fn resolve(base: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
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
