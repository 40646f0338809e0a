//! `tag`: classifies columns and rows as PII by column name and by value.
//!
//! Four classifiers: `email`, `phone`, `card` (payment card number) and
//! `national_id` (US SSN). Each yields the general tag (`tag`, default `pii`) and its
//! own tag (`<kind>.tag`, default `pii:<kind>`).
//!
//! Per table and column: a column whose name contains one of a classifier's
//! `<kind>.names` is tagged by name, and every row with a value in it is tagged;
//! only the first `sample` values of such a column are matched against the other
//! classifiers. Any other column of a string type is matched value by value.
//! Both images are read (the old one for replica-identity columns only), one
//! `read-text-column` per column and image: one packed buffer per column, no
//! allocation per value. Only values of the text-like variants (`text` and `other`,
//! i.e. every type the host does not map to a typed variant) are matched.

use std::cell::RefCell;

use airlock_guest::{Batch, Guest, Image, PluginInfo, Settings};

const KINDS: [&str; 4] = ["email", "phone", "card", "national_id"];
const EMAIL: u8 = 1;
const PHONE: u8 = 2;
const CARD: u8 = 4;
const NATIONAL_ID: u8 = 8;

/// PostgreSQL types whose values can never hold a matching string: not read unless
/// the column is tagged by name. These, and every type of [`TYPED_VARIANT_TYPES`].
const OTHER_NON_TEXT_TYPES: &[&str] = &["timetz", "interval"];

/// PostgreSQL types the host maps to a variant other than `text` or `other` (see
/// `value` in wit/transform.wit): their packed text is a canonical form (digits,
/// dates, ...) that is never matched, as a `read-column` value would not be.
const TYPED_VARIANT_TYPES: &[&str] = &[
    "bool",
    "int2",
    "int4",
    "int8",
    "oid",
    "float4",
    "float8",
    "numeric",
    "bytea",
    "date",
    "time",
    "timestamp",
    "timestamptz",
    "uuid",
    "json",
    "jsonb",
];

/// `read-text-column`'s kind of a row that holds a value (0 null, 1 unchanged-toast).
const KIND_VALUE: u8 = 2;

struct Config {
    /// Bitmask of the enabled classifiers.
    enabled: u8,
    tag: String,
    /// Per classifier (bit order): its own tag and its name fragments (lowercase).
    kind_tags: [String; 4],
    names: [Vec<String>; 4],
    sample: usize,
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

impl Config {
    fn from_settings(s: &Settings) -> Result<Config, String> {
        s.deny_unknown(&[
            "classifiers",
            "tag",
            "sample",
            "email.tag",
            "email.names",
            "phone.tag",
            "phone.names",
            "card.tag",
            "card.names",
            "national_id.tag",
            "national_id.names",
        ])?;
        let mut enabled = 0;
        if s.contains("classifiers") {
            for name in s.get_all("classifiers") {
                let bit = KINDS.iter().position(|k| *k == name.trim()).ok_or_else(|| {
                    format!("setting `classifiers` = {name:?}: unknown classifier; expected one of {}", KINDS.join(", "))
                })?;
                enabled |= 1 << bit;
            }
        } else {
            enabled = EMAIL | PHONE | CARD | NATIONAL_ID;
        }
        let default_names: [&[&str]; 4] = [&["email"], &["phone", "mobile"], &[], &[]];
        let kind_tags = KINDS.map(|k| {
            s.get(&format!("{k}.tag"))
                .map_or(format!("pii:{k}"), |t| t.trim().to_string())
        });
        let mut names: [Vec<String>; 4] = Default::default();
        for (bit, kind) in KINDS.iter().enumerate() {
            let key = format!("{kind}.names");
            names[bit] = if s.contains(&key) {
                s.get_all(&key)
                    .iter()
                    .map(|n| n.trim().to_lowercase())
                    .filter(|n| !n.is_empty())
                    .collect()
            } else {
                default_names[bit].iter().map(|n| n.to_string()).collect()
            };
        }
        Ok(Config {
            enabled,
            tag: s.get_or("tag", "pii").trim().to_string(),
            kind_tags,
            names,
            sample: s.parse_or("sample", 32usize)?,
        })
    }

    fn kinds_by_name(&self, column: &str) -> u8 {
        let column = column.to_lowercase();
        let mut kinds = 0;
        for bit in 0..KINDS.len() {
            if self.enabled & (1 << bit) != 0
                && self.names[bit].iter().any(|n| column.contains(n.as_str()))
            {
                kinds |= 1 << bit;
            }
        }
        kinds
    }

    fn tags(&self, kinds: u8) -> impl Iterator<Item = &str> {
        let general = (kinds != 0 && !self.tag.is_empty()).then_some(self.tag.as_str());
        general.into_iter().chain(
            (0..KINDS.len())
                .filter(move |bit| kinds & (1 << bit) != 0 && !self.kind_tags[*bit].is_empty())
                .map(|bit| self.kind_tags[bit].as_str()),
        )
    }

    fn process(&self, batch: &Batch) {
        let tables = batch.tables();
        for (ti, table) in tables.iter().enumerate() {
            let ti = ti as u32;
            let rows = batch.rows_of(ti);
            let mut row_kinds = vec![0u8; rows.len()];
            for (ci, column) in table.columns.iter().enumerate() {
                let ci = ci as u32;
                let by_name = self.kinds_by_name(&column.name);
                let type_name = column.type_name.as_str();
                let textual = !TYPED_VARIANT_TYPES.contains(&type_name);
                let never_matches = !textual || OTHER_NON_TEXT_TYPES.contains(&type_name);
                if by_name == 0 && never_matches {
                    continue;
                }
                let mut column_kinds = by_name;
                let mut images = vec![batch.read_text_column(ti, ci, Image::New)];
                if column.key {
                    images.push(batch.read_text_column(ti, ci, Image::Old));
                }
                let others = self.enabled & !by_name;
                let mut sampled = 0;
                for values in &images {
                    for (i, (kinds, &kind)) in row_kinds.iter_mut().zip(&values.kinds).enumerate()
                    {
                        if kind != KIND_VALUE {
                            continue;
                        }
                        *kinds |= by_name;
                        if by_name != 0 {
                            if sampled >= self.sample {
                                continue;
                            }
                            sampled += 1;
                        }
                        if textual {
                            let bytes = &values.data
                                [values.offsets[i] as usize..values.offsets[i + 1] as usize];
                            // Text-like values are UTF-8 (the host checked them).
                            if let Ok(s) = std::str::from_utf8(bytes) {
                                let found = classify(s) & others;
                                *kinds |= found;
                                column_kinds |= found;
                            }
                        }
                    }
                }
                for tag in self.tags(column_kinds) {
                    batch.tag_column(ti, ci, tag);
                }
            }
            // One `tag-rows` per tag, in the order `tags` gives them, so each row
            // gets its tags in the order tagging it alone would: the general tag
            // (every row with a kind), then each kind's own.
            let any = row_kinds.iter().fold(0, |all, &k| all | k);
            let mut tagged = Vec::with_capacity(rows.len());
            let mut tag_rows_with = |tag: &str, wanted: u8| {
                tagged.clear();
                tagged.extend(
                    rows.iter()
                        .zip(&row_kinds)
                        .filter(|&(_, &kinds)| kinds & wanted != 0)
                        .map(|(&row, _)| row),
                );
                if !tagged.is_empty() {
                    batch.tag_rows(&tagged, tag);
                }
            };
            if any != 0 && !self.tag.is_empty() {
                tag_rows_with(&self.tag, u8::MAX);
            }
            for bit in 0..KINDS.len() {
                if any & (1 << bit) != 0 && !self.kind_tags[bit].is_empty() {
                    tag_rows_with(&self.kind_tags[bit], 1 << bit);
                }
            }
        }
    }
}

/// The classifiers whose value pattern `text` matches. A national id is not also a
/// phone number, and a card number is not also a phone number.
fn classify(text: &str) -> u8 {
    let t = text.trim();
    if t.len() < 7 || t.len() > 254 {
        return 0;
    }
    if is_email(t) {
        return EMAIL;
    }
    if is_ssn(t) {
        return NATIONAL_ID;
    }
    if is_card(t) {
        return CARD;
    }
    if is_phone(t) {
        return PHONE;
    }
    0
}

/// `local@domain.tld`: one `@`, a local part of common address characters, a domain
/// of at least two dot-separated labels of letters, digits and inner hyphens, and a
/// top-level domain of at least two letters.
fn is_email(t: &str) -> bool {
    let Some((local, domain)) = t.split_once('@') else {
        return false;
    };
    if local.is_empty()
        || local.len() > 64
        || local.starts_with('.')
        || local.ends_with('.')
        || !local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._%+-'".contains(&b))
    {
        return false;
    }
    let mut labels = 0;
    let mut last = "";
    for label in domain.split('.') {
        let bytes = label.as_bytes();
        if bytes.is_empty()
            || bytes.len() > 63
            || bytes[0] == b'-'
            || bytes[bytes.len() - 1] == b'-'
            || !bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        {
            return false;
        }
        labels += 1;
        last = label;
    }
    labels >= 2 && last.len() >= 2 && last.bytes().all(|b| b.is_ascii_alphabetic())
}

/// US Social Security number `NNN-NN-NNNN`, excluding numbers never issued (area
/// 000, 666 or 9xx, group 00, serial 0000).
fn is_ssn(t: &str) -> bool {
    let b = t.as_bytes();
    if b.len() != 11 || b[3] != b'-' || b[6] != b'-' {
        return false;
    }
    let (area, group, serial) = (&t[..3], &t[4..6], &t[7..]);
    [area, group, serial]
        .iter()
        .all(|p| p.bytes().all(|c| c.is_ascii_digit()))
        && area != "000"
        && area != "666"
        && !area.starts_with('9')
        && group != "00"
        && serial != "0000"
}

/// 13 to 19 digits (spaces and dashes allowed between them) passing the Luhn check.
fn is_card(t: &str) -> bool {
    if !t
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b' ' || b == b'-')
        || !t.as_bytes()[0].is_ascii_digit()
    {
        return false;
    }
    let digits: Vec<u32> = t
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| u32::from(b - b'0'))
        .collect();
    if !(13..=19).contains(&digits.len()) || digits.iter().all(|&d| d == 0) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// 7 to 15 digits with an optional leading `+`, and spaces, dashes and parentheses
/// between them; an ISO date (`2024-01-31`) is not a phone number.
fn is_phone(t: &str) -> bool {
    let body = t.strip_prefix('+').unwrap_or(t);
    let first = body.as_bytes()[0];
    if !(first.is_ascii_digit() || first == b'(')
        || !body
            .bytes()
            .all(|b| b.is_ascii_digit() || b" -()".contains(&b))
    {
        return false;
    }
    let b = body.as_bytes();
    let iso_date = b.len() == 10 && b[4] == b'-' && b[7] == b'-';
    let count = b.iter().filter(|c| c.is_ascii_digit()).count();
    (7..=15).contains(&count) && !iso_date
}

struct Tag;

impl Guest for Tag {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "tag".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "tags PII columns and rows (email, phone, card number, national id) by column name and value".into(),
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
            None => Err("tag: process called before init".into()),
        })
    }
}

airlock_guest::export!(Tag);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifiers() {
        assert_eq!(classify("alice@example.com"), EMAIL);
        assert_eq!(classify("not an email@"), 0);
        assert_eq!(classify("a@b"), 0);
        assert_eq!(classify("123-45-6789"), NATIONAL_ID);
        assert_eq!(classify("000-45-6789"), PHONE);
        assert_eq!(classify("4111 1111 1111 1111"), CARD);
        assert_eq!(classify("4111 1111 1111 1112"), 0);
        assert_eq!(classify("+1 (555) 010-9999"), PHONE);
        assert_eq!(classify("2024-01-31"), 0);
        assert_eq!(classify("hello world"), 0);
    }
}
