//! `airlock-guest`: write an airlock transform guest in Rust.
//!
//! This crate runs `wit_bindgen::generate!` over the `airlock:transform` WIT package
//! (`wit/` at the repository root) and adds the few helpers every guest wants:
//! [`Settings`] for the flattened `NAME.toml`, [`glob_match`] / [`TablePatterns`]
//! for `schema.table` patterns and [`value_text`] for a value's canonical text.
//!
//! A guest is a `cdylib` crate that implements [`Guest`] and exports it:
//!
//! ```ignore
//! use airlock_guest::{Guest, PluginInfo, Batch};
//!
//! struct Noop;
//!
//! impl Guest for Noop {
//!     fn info() -> PluginInfo {
//!         PluginInfo { name: "noop".into(), version: "0.1.0".into(), description: "does nothing".into() }
//!     }
//!     fn init(_settings: Vec<(String, String)>) -> Result<(), String> { Ok(()) }
//!     fn process(_batch: &Batch) -> Result<(), String> { Ok(()) }
//! }
//!
//! airlock_guest::export!(Noop);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`: the `.wasm` in
//! `target/wasm32-wasip2/release/` is a component, ready for the plugin folder.

use std::fmt::Write as _;
use std::str::FromStr;

/// The generated bindings. Everything a guest needs is re-exported at the crate root.
pub mod bindings {
    // `generate!` lives in a module: with `pub_export_macro` at the crate root the
    // `#[macro_export]` helper macros collide with their own re-exports.
    wit_bindgen::generate!({
        path: "../../../wit",
        world: "transform",
        // `export!` is usable from guest crates and finds the generated types here.
        pub_export_macro: true,
        default_bindings_module: "airlock_guest::bindings",
    });
}

pub use bindings::airlock::transform::types::{
    BoolColumn, Column, FloatColumn, Image, IntColumn, Op, RowMeta, Table, TextColumn, Value,
};

/// Whether entry `i` of a typed column (`read-ints`, `read-floats`, `read-bools`)
/// holds a value: bit `i % 8` of byte `i / 8` of its null bitmap.
pub fn is_valid(valid: &[u8], i: usize) -> bool {
    valid.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Marks entry `i` of a typed column's null bitmap as holding a value (`true`) or
/// `null` (`false`); the bitmap has `len.div_ceil(8)` bytes for `len` entries.
pub fn set_valid(valid: &mut [u8], i: usize, present: bool) {
    if present {
        valid[i / 8] |= 1 << (i % 8);
    } else {
        valid[i / 8] &= !(1 << (i % 8));
    }
}
pub use bindings::{Batch, Guest, Level, PluginInfo, export, log};

/// A guest's settings: the host's flattening of `NAME.toml`.
///
/// Nested tables arrive as dotted keys (`[mode] email = "redact"` is
/// `("mode.email", "redact")`), arrays as one pair per element in order
/// (`columns = ["email", "phone"]` is `("columns", "email"), ("columns", "phone")`),
/// scalars as their text (`true`, `42`, `1.5`).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pairs: Vec<(String, String)>,
}

impl Settings {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Settings { pairs }
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, in order (an array setting).
    pub fn get_all(&self, key: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of `key`, or `default`.
    pub fn get_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.get(key).unwrap_or(default)
    }

    /// Whether `key` is present at all.
    pub fn contains(&self, key: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == key)
    }

    /// `key` parsed as `T`: `Ok(None)` when absent, an error naming the key, the
    /// value and the expected type when it does not parse.
    pub fn parse<T: FromStr>(&self, key: &str) -> Result<Option<T>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(text) => text.trim().parse::<T>().map(Some).map_err(|_| {
                format!(
                    "setting `{key}` = {text:?}: expected {}",
                    expected_name::<T>()
                )
            }),
        }
    }

    /// `key` parsed as `T`, or `default` when absent.
    pub fn parse_or<T: FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        Ok(self.parse(key)?.unwrap_or(default))
    }

    /// `key` as a boolean (`true`/`false`/`yes`/`no`/`on`/`off`/`1`/`0`), or `default`.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "true" | "yes" | "on" | "1" => Ok(true),
                "false" | "no" | "off" | "0" => Ok(false),
                _ => Err(format!(
                    "setting `{key}` = {v:?}: expected a boolean (true or false)"
                )),
            },
        }
    }

    /// All pairs, in the host's order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// Refuse keys that no `allowed` entry accepts: an entry `"name"` accepts the key
    /// `name`, an entry `"prefix.*"` accepts every key under `prefix.`. Returns one
    /// error listing every unknown key, so a typo in `NAME.toml` is never silent.
    pub fn deny_unknown(&self, allowed: &[&str]) -> Result<(), String> {
        let mut unknown: Vec<&str> = Vec::new();
        for (key, _) in &self.pairs {
            let known = allowed.iter().any(|a| match a.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix) && key.len() > prefix.len(),
                None => key == a,
            });
            if !known && !unknown.contains(&key.as_str()) {
                unknown.push(key);
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        Err(format!(
            "unknown setting{} {}; known settings: {}",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            allowed.join(", ")
        ))
    }
}

fn expected_name<T>() -> &'static str {
    let name = std::any::type_name::<T>();
    match name {
        "bool" => "a boolean (true or false)",
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative integer",
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer",
        "f32" | "f64" => "a number",
        _ => name,
    }
}

/// Whether `text` matches the glob `pattern`: `*` matches any run of characters
/// (dots included), `?` exactly one character, everything else itself.
///
/// For `schema.table` patterns: `public.*`, `*.users`, `audit.log_????`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with backtracking to the last `*`: linear in practice.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A set of `schema.table` globs. A pattern without a dot is taken as a table name
/// in any schema (`users` is `*.users`).
#[derive(Debug, Clone, Default)]
pub struct TablePatterns {
    patterns: Vec<String>,
}

impl TablePatterns {
    pub fn new<S: AsRef<str>>(patterns: impl IntoIterator<Item = S>) -> Self {
        let patterns = patterns
            .into_iter()
            .map(|p| {
                let p = p.as_ref().trim();
                if p.contains('.') {
                    p.to_string()
                } else {
                    format!("*.{p}")
                }
            })
            .collect();
        TablePatterns { patterns }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether any pattern matches the table.
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        let qualified = format!("{schema}.{table}");
        self.patterns.iter().any(|p| glob_match(p, &qualified))
    }
}

/// Appends the canonical text of `value` to `out`, and returns `false` (appending
/// nothing) for `null` and `unchanged-toast`, which have none.
///
/// The forms are PostgreSQL's text forms as the host's JSON shows them: strings
/// (`text`, `numeric`, `json`, `other`) are themselves; `boolean` is `true`/`false`;
/// `int` is decimal; `float` is Rust's shortest round-trip form, or `NaN`,
/// `Infinity`, `-Infinity`; `bytes` is `\x` followed by lowercase hex; `date` is
/// `YYYY-MM-DD`; `time` is `HH:MM:SS[.ffffff]`; `timestamp` is
/// `YYYY-MM-DDTHH:MM:SS[.ffffff]` and `timestamptz` the same with `Z` (UTC);
/// `infinity`/`-infinity` for the extreme temporal values; `uuid` is lowercase
/// `8-4-4-4-12` hex.
pub fn value_text(value: &Value, out: &mut String) -> bool {
    match value {
        Value::Null | Value::UnchangedToast => return false,
        Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) if f.is_nan() => out.push_str("NaN"),
        Value::Float(f) if f.is_infinite() => {
            out.push_str(if *f > 0.0 { "Infinity" } else { "-Infinity" })
        }
        Value::Float(f) => {
            let _ = write!(out, "{f}");
        }
        Value::Numeric(s) | Value::Text(s) | Value::Json(s) | Value::Other(s) => out.push_str(s),
        Value::Bytes(b) => {
            out.push_str("\\x");
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
        }
        Value::Date(d) => write_date(out, i64::from(*d), *d == i32::MAX, *d == i32::MIN),
        Value::Time(t) => write_time(out, *t),
        Value::Timestamp(t) | Value::Timestamptz(t) => {
            if *t == i64::MAX || *t == i64::MIN {
                out.push_str(if *t == i64::MAX {
                    "infinity"
                } else {
                    "-infinity"
                });
            } else {
                write_date(out, t.div_euclid(86_400_000_000), false, false);
                out.push('T');
                write_time(out, t.rem_euclid(86_400_000_000));
                if matches!(value, Value::Timestamptz(_)) {
                    out.push('Z');
                }
            }
        }
        Value::Uuid((hi, lo)) => {
            let _ = write!(
                out,
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                hi >> 32,
                (hi >> 16) & 0xffff,
                hi & 0xffff,
                lo >> 48,
                lo & 0xffff_ffff_ffff
            );
        }
    }
    true
}

/// `YYYY-MM-DD` (` BC` for years before 1) of a day count since 1970-01-01.
fn write_date(out: &mut String, days: i64, infinity: bool, minus_infinity: bool) {
    if infinity || minus_infinity {
        out.push_str(if infinity { "infinity" } else { "-infinity" });
        return;
    }
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if year <= 0 {
        let _ = write!(out, "{:04}-{month:02}-{day:02} BC", 1 - year);
    } else {
        let _ = write!(out, "{year:04}-{month:02}-{day:02}");
    }
}

/// `HH:MM:SS[.ffffff]` of microseconds since midnight.
fn write_time(out: &mut String, micros: i64) {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    if frac != 0 {
        let _ = write!(out, ".{frac:06}");
    }
}

/// Logs at `level` through the host (attributed to this guest, rate-limited).
pub fn log_at(level: Level, message: &str) {
    log(level, message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("public.*", "public.users"));
        assert!(glob_match("*.users", "auth.users"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*a*b", "xxaxxb"));
        assert!(!glob_match("*a*b", "xxaxxbc"));
        assert!(TablePatterns::new(["users"]).matches("public", "users"));
    }

    #[test]
    fn canonical_text() {
        let text = |v: Value| {
            let mut s = String::new();
            value_text(&v, &mut s);
            s
        };
        assert_eq!(text(Value::Date(0)), "1970-01-01");
        assert_eq!(text(Value::Date(19_753)), "2024-01-31");
        assert_eq!(
            text(Value::Timestamptz(86_400_000_001)),
            "1970-01-02T00:00:00.000001Z"
        );
        assert_eq!(text(Value::Timestamp(-1)), "1969-12-31T23:59:59.999999");
        assert_eq!(text(Value::Bytes(vec![0xde, 0xad])), "\\xdead");
        assert_eq!(text(Value::Float(f64::NEG_INFINITY)), "-Infinity");
        assert_eq!(
            text(Value::Uuid((0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210))),
            "01234567-89ab-cdef-fedc-ba9876543210"
        );
        assert!(!value_text(&Value::UnchangedToast, &mut String::new()));
    }

    #[test]
    fn settings() {
        let s = Settings::new(vec![
            ("columns".into(), "email".into()),
            ("columns".into(), "phone".into()),
            ("n".into(), "x".into()),
        ]);
        assert_eq!(s.get_all("columns"), ["email", "phone"]);
        assert_eq!(s.get_or("salt", "none"), "none");
        let err = s.parse::<u32>("n").unwrap_err();
        assert!(
            err.contains("`n`") && err.contains("\"x\"") && err.contains("integer"),
            "{err}"
        );
        assert!(s.deny_unknown(&["columns"]).unwrap_err().contains("`n`"));
        assert!(s.deny_unknown(&["columns", "n"]).is_ok());
    }
}
