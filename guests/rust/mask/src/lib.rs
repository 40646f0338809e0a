//! `mask`: masks configured columns in both the new and the old row image.
//!
//! Per batch: `tables()` once; per table, the masked columns are resolved once and
//! each is masked a whole column at a time, never row by row: `hash` asks the host
//! to replace the column by salted SHA-256 digests (`hash-column`: the values never
//! enter guest memory), the other modes read the column as one packed buffer
//! (`read-text-column`), rewrite it in one pass and write it back
//! (`write-text-column`).
//!
//! Invariants: `null` stays `null`, `unchanged-toast` stays `unchanged-toast`, and a
//! column is written back only when it holds a value.

use std::cell::RefCell;

use airlock_guest::{Batch, Guest, Image, PluginInfo, Settings, TablePatterns, TextColumn};

const REDACTED: &str = "[redacted]";
const MODES: &str = "hash, redact, null, keep-last-N (N a whole number, e.g. keep-last-4)";

/// Packed column kinds (see the WIT `text-column` record).
const KIND_NULL: u8 = 0;
const KIND_VALUE: u8 = 2;

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
    /// Prepended to every hashed value.
    salt: Vec<u8>,
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
        let salt = settings.get("salt").unwrap_or("").as_bytes().to_vec();
        Ok(Config { rules, tag, salt })
    }

    fn mode_for(&self, schema: &str, table: &str, column: &str) -> Option<Mode> {
        self.rules
            .iter()
            .find(|r| {
                r.column == column && r.tables.as_ref().is_none_or(|t| t.matches(schema, table))
            })
            .map(|r| r.mode)
    }

    fn process(&self, batch: &Batch) {
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
                for image in [Image::New, Image::Old] {
                    match mode {
                        Mode::Hash => {
                            batch.hash_column(ti, ci, image, &self.salt);
                        }
                        other => {
                            let column = batch.read_text_column(ti, ci, image);
                            if let Some(masked) = mask_packed(&column, other) {
                                batch.write_text_column(ti, ci, image, &masked);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Masks every value of a packed column with `mode` (not `hash`, which the host
/// does); `None` when the column holds no value (nothing to write back).
fn mask_packed(column: &TextColumn, mode: Mode) -> Option<TextColumn> {
    if !column.kinds.contains(&KIND_VALUE) {
        return None;
    }
    let mut out = TextColumn {
        kinds: column.kinds.clone(),
        data: Vec::with_capacity(column.data.len()),
        offsets: Vec::with_capacity(column.offsets.len()),
    };
    out.offsets.push(0);
    for (i, kind) in out.kinds.iter_mut().enumerate() {
        if *kind == KIND_VALUE {
            let bytes = &column.data[column.offsets[i] as usize..column.offsets[i + 1] as usize];
            match mode {
                Mode::Null => *kind = KIND_NULL,
                Mode::Redact => out.data.extend_from_slice(REDACTED.as_bytes()),
                Mode::KeepLast(n) if bytes.is_ascii() => {
                    // One byte per character: no string, no allocation.
                    let hidden = bytes.len().saturating_sub(n);
                    out.data.resize(out.data.len() + hidden, b'*');
                    out.data.extend_from_slice(&bytes[hidden..]);
                }
                Mode::KeepLast(n) => {
                    let text = String::from_utf8_lossy(bytes);
                    match star_all_but_last(&text, n) {
                        Some(masked) => out.data.extend_from_slice(masked.as_bytes()),
                        None => out.data.extend_from_slice(text.as_bytes()),
                    }
                }
                Mode::Hash => unreachable!("hash is done by the host"),
            }
        }
        out.offsets.push(out.data.len() as u32);
    }
    Some(out)
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
        CONFIG.with(|c| match c.borrow().as_ref() {
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

    fn packed(values: &[Option<&str>]) -> TextColumn {
        let mut column = TextColumn {
            kinds: Vec::new(),
            data: Vec::new(),
            offsets: vec![0],
        };
        for v in values {
            match v {
                Some(text) => {
                    column.kinds.push(KIND_VALUE);
                    column.data.extend_from_slice(text.as_bytes());
                }
                None => column.kinds.push(KIND_NULL),
            }
            column.offsets.push(column.data.len() as u32);
        }
        column
    }

    fn texts(column: &TextColumn) -> Vec<Option<String>> {
        (0..column.kinds.len())
            .map(|i| {
                (column.kinds[i] == KIND_VALUE).then(|| {
                    String::from_utf8(
                        column.data[column.offsets[i] as usize..column.offsets[i + 1] as usize]
                            .to_vec(),
                    )
                    .unwrap()
                })
            })
            .collect()
    }

    #[test]
    fn redact_null_and_keep_last_rewrite_only_values() {
        let column = packed(&[Some("ada@example.com"), None, Some("+1-555-010-4477")]);
        let redacted = mask_packed(&column, Mode::Redact).unwrap();
        assert_eq!(
            texts(&redacted),
            vec![Some(REDACTED.into()), None, Some(REDACTED.into())]
        );
        let nulled = mask_packed(&column, Mode::Null).unwrap();
        assert_eq!(texts(&nulled), vec![None, None, None]);
        let kept = mask_packed(&column, Mode::KeepLast(4)).unwrap();
        assert_eq!(
            texts(&kept),
            vec![
                Some("***********.com".into()),
                None,
                Some("***********4477".into())
            ]
        );
        assert!(
            mask_packed(&packed(&[None, None]), Mode::Redact).is_none(),
            "nothing to write back"
        );
    }

    #[test]
    fn unchanged_toast_entries_stay_unchanged() {
        let mut column = packed(&[Some("x@y.z")]);
        column.kinds.push(1);
        column.offsets.push(column.data.len() as u32);
        let out = mask_packed(&column, Mode::Redact).unwrap();
        assert_eq!(out.kinds, vec![KIND_VALUE, 1]);
    }

    #[test]
    fn keep_last_counts_characters_not_bytes() {
        assert_eq!(star_all_but_last("héllo", 2).as_deref(), Some("***lo"));
        assert_eq!(star_all_but_last("abc", 3), None);
    }

    #[test]
    fn settings_are_checked() {
        assert!(config(&[]).is_ok());
        let e = config(&[("columns", "email"), ("mode.email", "scramble")])
            .err()
            .unwrap();
        assert!(e.contains("scramble") && e.contains("allowed modes"), "{e}");
        let e = config(&[("mode.phone", "hash")]).err().unwrap();
        assert!(e.contains("not in `columns`"), "{e}");
        let c = config(&[
            ("columns", "email"),
            ("columns", "public.users.phone"),
            ("mode.public.users.phone", "keep-last-4"),
            ("salt", "s"),
        ])
        .unwrap();
        assert_eq!(
            c.mode_for("public", "users", "phone"),
            Some(Mode::KeepLast(4))
        );
        assert_eq!(c.mode_for("public", "orders", "phone"), None);
        assert_eq!(c.mode_for("x", "y", "email"), Some(Mode::Hash));
        assert_eq!(c.salt, b"s");
    }
}
