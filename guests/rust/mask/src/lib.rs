//! `mask`: masks configured columns in both the new and the old row image.
//!
//! Per batch: `tables()` once; per table, the masked columns are resolved once and
//! each is read and written a whole column at a time (`read-column`/`write-column`,
//! one host call per column, image and table), never row by row. Hex digests are
//! encoded on the stack and written into the value's own string buffer.
//!
//! Invariants: `null` stays `null`, `unchanged-toast` stays `unchanged-toast`, and a
//! column is written back only when a value in it changed.

use std::cell::RefCell;
use std::mem;

use airlock_guest::{Batch, Guest, Image, PluginInfo, Settings, TablePatterns, Value, value_text};
use sha2::{Digest, Sha256};

const REDACTED: &str = "[redacted]";
const MODES: &str = "hash, redact, null, keep-last-N (N a whole number, e.g. keep-last-4)";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Hash,
    Redact,
    Null,
    KeepLast(usize),
}

impl Mode {
    fn parse(text: &str) -> Option<Mode> {
        match text.trim() {
            "hash" => Some(Mode::Hash),
            "redact" => Some(Mode::Redact),
            "null" => Some(Mode::Null),
            other => other
                .strip_prefix("keep-last-")?
                .parse()
                .ok()
                .map(Mode::KeepLast),
        }
    }
}

/// One `columns` entry: a bare column name (any table) or `schema.table.column`
/// (the table part may use `*` and `?`).
struct Rule {
    tables: Option<TablePatterns>,
    column: String,
    mode: Mode,
}

struct Config {
    rules: Vec<Rule>,
    tag: String,
    /// SHA-256 state with the salt already absorbed; cloned per value.
    salted: Sha256,
    /// Reused buffer for the canonical text of non-string values.
    scratch: String,
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

impl Config {
    fn from_settings(settings: &Settings) -> Result<Config, String> {
        settings.deny_unknown(&["columns", "default_mode", "mode.*", "salt", "tag"])?;
        let default_mode = match settings.get("default_mode") {
            None => Mode::Hash,
            Some(m) => Mode::parse(m).ok_or_else(|| {
                format!("setting `default_mode` = {m:?}: unknown mode; allowed modes: {MODES}")
            })?,
        };
        let mut columns = settings.get_all("columns");
        if !settings.contains("columns") {
            columns.push("email");
        }
        let mut rules = Vec::with_capacity(columns.len());
        for entry in &columns {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err("setting `columns` has an empty entry; expected a column name or schema.table.column".into());
            }
            let mode = match settings.get(&format!("mode.{entry}")) {
                None => default_mode,
                Some(m) => Mode::parse(m).ok_or_else(|| {
                    format!("column `{entry}`: mode {m:?} is not a mode; allowed modes: {MODES}")
                })?,
            };
            let (tables, column) = match entry.rsplit_once('.') {
                Some((table, column)) => (Some(TablePatterns::new([table])), column),
                None => (None, entry),
            };
            rules.push(Rule {
                tables,
                column: column.to_string(),
                mode,
            });
        }
        // A table-qualified entry wins over a bare column name.
        rules.sort_by_key(|r| r.tables.is_none());
        for (key, _) in settings.pairs() {
            if let Some(column) = key.strip_prefix("mode.")
                && !columns.iter().any(|c| c.trim() == column)
            {
                return Err(format!(
                    "setting `{key}` names column `{column}`, which is not in `columns` ({}); add it there to mask it",
                    columns.join(", ")
                ));
            }
        }
        let tag = settings.get_or("tag", "pii").trim().to_string();
        let mut salted = Sha256::new();
        if let Some(salt) = settings.get("salt") {
            salted.update(salt.as_bytes());
        }
        Ok(Config {
            rules,
            tag,
            salted,
            scratch: String::new(),
        })
    }

    fn mode_for(&self, schema: &str, table: &str, column: &str) -> Option<Mode> {
        self.rules
            .iter()
            .find(|r| {
                r.column == column && r.tables.as_ref().is_none_or(|t| t.matches(schema, table))
            })
            .map(|r| r.mode)
    }

    fn process(&mut self, batch: &Batch) {
        let tables = batch.tables();
        for (ti, table) in tables.iter().enumerate() {
            let ti = ti as u32;
            for (ci, column) in table.columns.iter().enumerate() {
                let Some(mode) = self.mode_for(&table.schema, &table.name, &column.name) else {
                    continue;
                };
                let ci = ci as u32;
                if !self.tag.is_empty() {
                    batch.tag_column(ti, ci, &self.tag);
                }
                let mut new = batch.read_column(ti, ci, Image::New);
                let mut old = batch.read_column(ti, ci, Image::Old);
                let (mut new_changed, mut old_changed) = (false, false);
                for (n, o) in new.iter_mut().zip(old.iter_mut()) {
                    // REPLICA IDENTITY FULL sends unchanged columns twice: mask once.
                    if same_string(n, o) {
                        if self.mask(n, mode) {
                            *o = n.clone();
                            new_changed = true;
                            old_changed = true;
                        }
                        continue;
                    }
                    new_changed |= self.mask(n, mode);
                    old_changed |= self.mask(o, mode);
                }
                if new_changed {
                    batch.write_column(ti, ci, Image::New, &new);
                }
                if old_changed {
                    batch.write_column(ti, ci, Image::Old, &old);
                }
            }
        }
    }

    /// Masks one value in place; returns whether it changed.
    fn mask(&mut self, value: &mut Value, mode: Mode) -> bool {
        if matches!(value, Value::Null | Value::UnchangedToast) {
            return false;
        }
        match mode {
            Mode::Null => *value = Value::Null,
            Mode::Hash => self.hash(value),
            Mode::Redact => match value {
                Value::Text(s) => replace(s, REDACTED),
                Value::Json(s) => {
                    s.clear();
                    s.push('"');
                    s.push_str(REDACTED);
                    s.push('"');
                }
                Value::Other(s) => {
                    replace(s, REDACTED);
                    *value = Value::Text(mem::take(s));
                }
                _ => *value = Value::Null,
            },
            Mode::KeepLast(n) => return self.keep_last(value, n),
        }
        true
    }

    fn hash(&mut self, value: &mut Value) {
        let mut hex = [0u8; 64];
        match value {
            Value::Text(s) => replace(s, self.digest(s.as_bytes(), &mut hex)),
            Value::Json(s) => {
                let digest = self.digest(s.as_bytes(), &mut hex);
                s.clear();
                s.push('"');
                s.push_str(digest);
                s.push('"');
            }
            Value::Numeric(s) | Value::Other(s) => {
                replace(s, self.digest(s.as_bytes(), &mut hex));
                *value = Value::Text(mem::take(s));
            }
            Value::Bytes(b) => {
                let digest = self.digest(b, &mut hex);
                b.clear();
                b.extend_from_slice(digest.as_bytes());
            }
            _ => {
                let mut text = mem::take(&mut self.scratch);
                text.clear();
                value_text(value, &mut text);
                let digest = self.digest(text.as_bytes(), &mut hex).to_string();
                self.scratch = text;
                *value = Value::Text(digest);
            }
        }
    }

    /// Lowercase hex SHA-256 of salt ++ `bytes`, encoded into `hex`.
    fn digest<'h>(&self, bytes: &[u8], hex: &'h mut [u8; 64]) -> &'h str {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hasher = self.salted.clone();
        hasher.update(bytes);
        for (i, byte) in hasher.finalize().iter().enumerate() {
            hex[2 * i] = DIGITS[usize::from(byte >> 4)];
            hex[2 * i + 1] = DIGITS[usize::from(byte & 0xf)];
        }
        std::str::from_utf8(hex).expect("hex digits are ASCII")
    }

    fn keep_last(&mut self, value: &mut Value, n: usize) -> bool {
        match value {
            Value::Bytes(b) => {
                let masked = b.len().saturating_sub(n);
                b[..masked].fill(b'*');
                masked > 0
            }
            Value::Text(s) => match star_all_but_last(s, n) {
                Some(masked) => {
                    *s = masked;
                    true
                }
                None => false,
            },
            Value::Json(s) => match star_all_but_last(s, n) {
                Some(masked) => {
                    *s = json_string(&masked);
                    true
                }
                None => false,
            },
            _ => {
                let mut text = mem::take(&mut self.scratch);
                text.clear();
                value_text(value, &mut text);
                let masked = star_all_but_last(&text, n);
                self.scratch = text;
                match masked {
                    Some(masked) => {
                        *value = Value::Text(masked);
                        true
                    }
                    None => false,
                }
            }
        }
    }
}

/// Whether both values are the same string-carrying value (so one mask serves both).
fn same_string(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Text(x), Value::Text(y))
        | (Value::Json(x), Value::Json(y))
        | (Value::Numeric(x), Value::Numeric(y))
        | (Value::Other(x), Value::Other(y)) => x == y,
        (Value::Bytes(x), Value::Bytes(y)) => x == y,
        _ => false,
    }
}

/// Replaces the contents of `s`, reusing its buffer.
fn replace(s: &mut String, with: &str) {
    s.clear();
    s.push_str(with);
}

/// `text` with all but its last `n` characters replaced by `*`, or `None` when it
/// has no more than `n` characters (nothing to mask).
fn star_all_but_last(text: &str, n: usize) -> Option<String> {
    let count = text.chars().count();
    if count <= n {
        return None;
    }
    let hidden = count - n;
    let split = text
        .char_indices()
        .nth(hidden)
        .map_or(text.len(), |(i, _)| i);
    let mut out = String::with_capacity(hidden + text.len() - split);
    out.extend(std::iter::repeat_n('*', hidden));
    out.push_str(&text[split..]);
    Some(out)
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Mask;

impl Guest for Mask {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "mask".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "masks configured columns (hash, redact, null, keep-last-N) in new and old images and tags them".into(),
        }
    }

    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        let config = Config::from_settings(&Settings::new(settings))?;
        CONFIG.with(|c| *c.borrow_mut() = Some(config));
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        CONFIG.with(|c| match c.borrow_mut().as_mut() {
            Some(config) => {
                config.process(batch);
                Ok(())
            }
            None => Err("mask: process called before init".into()),
        })
    }
}

airlock_guest::export!(Mask);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_settings(&Settings::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    fn text(v: &Value) -> &str {
        match v {
            Value::Text(s) | Value::Json(s) => s,
            other => panic!("not text: {other:?}"),
        }
    }

    #[test]
    fn hash_is_lowercase_sha256_hex_of_salt_and_text() {
        let mut c = config(&[]).unwrap();
        let mut v = Value::Text("abc".into());
        assert!(c.mask(&mut v, Mode::Hash));
        assert_eq!(
            text(&v),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut c = config(&[("salt", "a")]).unwrap();
        let mut v = Value::Text("bc".into());
        c.mask(&mut v, Mode::Hash);
        assert_eq!(
            text(&v),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut v = Value::Int(42);
        c.mask(&mut v, Mode::Hash);
        assert_eq!(text(&v).len(), 64);
    }

    #[test]
    fn null_and_unchanged_toast_stay() {
        let mut c = config(&[]).unwrap();
        for mode in [Mode::Hash, Mode::Redact, Mode::Null, Mode::KeepLast(2)] {
            let mut v = Value::UnchangedToast;
            assert!(!c.mask(&mut v, mode));
            assert!(matches!(v, Value::UnchangedToast));
            let mut v = Value::Null;
            assert!(!c.mask(&mut v, mode));
            assert!(matches!(v, Value::Null));
        }
    }

    #[test]
    fn redact_and_keep_last() {
        let mut c = config(&[]).unwrap();
        let mut v = Value::Text("secret".into());
        c.mask(&mut v, Mode::Redact);
        assert_eq!(text(&v), "[redacted]");
        let mut v = Value::Int(7);
        c.mask(&mut v, Mode::Redact);
        assert!(matches!(v, Value::Null));
        let mut v = Value::Text("4111111111111111".into());
        c.mask(&mut v, Mode::KeepLast(4));
        assert_eq!(text(&v), "************1111");
        let mut v = Value::Text("ünï".into());
        c.mask(&mut v, Mode::KeepLast(1));
        assert_eq!(text(&v), "**ï");
        let mut v = Value::Json("\"ab\"".into());
        c.mask(&mut v, Mode::KeepLast(2));
        assert_eq!(text(&v), "\"**b\\\"\"");
    }

    #[test]
    fn settings_are_checked() {
        let err = config(&[("columns", "ssn"), ("mode.ssn", "scramble")])
            .err()
            .unwrap();
        assert!(
            err.contains("`ssn`") && err.contains("keep-last-N"),
            "{err}"
        );
        let err = config(&[("mode.phone", "null")]).err().unwrap();
        assert!(err.contains("mode.phone"), "{err}");
        assert!(config(&[("colums", "x")]).is_err());
        let c = config(&[
            ("columns", "email"),
            ("columns", "public.users.phone"),
            ("mode.public.users.phone", "keep-last-4"),
        ])
        .unwrap();
        assert_eq!(
            c.mode_for("public", "users", "phone"),
            Some(Mode::KeepLast(4))
        );
        assert_eq!(c.mode_for("public", "orders", "phone"), None);
        assert_eq!(c.mode_for("x", "y", "email"), Some(Mode::Hash));
    }
}

#[cfg(test)]
mod throughput {
    use super::*;

    /// Rough native cost of the masking loop alone (no host calls):
    /// `cargo test --release -p mask -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn hash_two_columns_of_1024_rows() {
        let mut c = Config::from_settings(&Settings::default()).unwrap();
        let column: Vec<Value> = (0..1024)
            .map(|i| Value::Text(format!("user{i}@example.com")))
            .collect();
        let rounds = 200;
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            for _ in 0..2 {
                let mut values = column.clone();
                for v in &mut values {
                    c.mask(v, Mode::Hash);
                }
                std::hint::black_box(&values);
            }
        }
        let per_row = start.elapsed().as_nanos() / (rounds * 1024);
        println!("hash, 2 columns: {per_row} ns per row (native, clone included)");
    }
}
