//! Table directories: where the Delta table of each source table lives under a lake
//! root, and the name a table shows in its Delta metadata and the catalog.
//!
//! ```text
//! (schema, table) ──table_dir──▶ one directory name under {sink url}/
//!   both plain, ≤ 255 bytes      public.orders                     (one dot)
//!   otherwise, ≤ 255 bytes       public.line_0Abreak.x    ({schema}.{table}.x, escaped)
//!   longer                       {prefix}.{32 hex of SHA-256}.h
//! ```
//!
//! A *plain* name is non-empty and made of ASCII letters, digits, `_` and `-` only. Every
//! other name is untrusted text: PostgreSQL accepts any characters in a quoted
//! identifier (`/`, `..`, newlines, `%`, dots), and nothing of it may reach a path
//! undecoded.
//!
//! Invariants of [`table_dir`]:
//! - It is injective: two different `(schema, table)` pairs never share a directory
//!   (the hashed form: up to a collision of a 128-bit SHA-256 prefix). In particular
//!   (`a.b`, `c`) and (`a`, `b.c`) differ, and so do `A` and `a` (on a case-sensitive
//!   store: S3 and the usual Linux filesystems are).
//! - The result is one path segment of 3 to 255 bytes: ASCII letters, digits, `_`, `-`
//!   and `.` only, at least one dot, never `.` or `..`, never starting with `.`, never
//!   `_airlock` (the lake's own directory) or `_delta_log`. It needs no percent-encoding
//!   in a URL and no object store rewrites it.
//! - A pair of plain names whose `schema.table` fits in 255 bytes keeps `schema.table`,
//!   the directory older versions wrote, so existing lakes do not move. The three forms
//!   cannot meet: a plain directory has exactly one dot, the others exactly two and end
//!   in `.x` (escaped) or `.h` (hashed).
//! - The escaped form is reversible: each byte outside `[A-Za-z0-9-]` of a name is
//!   written `_XX` (uppercase hex), `_` included, and an empty name is a lone `_`.
//!
//! [`display_name`] is the unambiguous original name: plain names as they are, others
//! double-quoted like PostgreSQL's `quote_ident` (`"a.b".c` and `a."b.c"`).

use sha2::{Digest as _, Sha256};

/// The longest directory name: the common file-name limit of filesystems.
pub(crate) const MAX_DIR_BYTES: usize = 255;

/// The longest readable prefix of a hashed directory name.
const HASHED_PREFIX_BYTES: usize = 200;

/// How many hex digits of the SHA-256 a hashed directory name holds (128 bits).
const HASH_HEX: usize = 32;

/// The lake's own directory at the root (the compaction lock); never a table's.
pub(crate) const RESERVED_DIR: &str = "_airlock";

/// Whether `name` is plain: non-empty, ASCII letters, digits, `_` and `-` only.
pub(crate) fn is_plain(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// The directory of the Delta table of `schema.table` under a lake root; see the module
/// documentation for the forms and their invariants.
pub(crate) fn table_dir(schema: &str, table: &str) -> String {
    if is_plain(schema) && is_plain(table) && schema.len() + 1 + table.len() <= MAX_DIR_BYTES {
        return format!("{schema}.{table}");
    }
    let (escaped_schema, escaped_table) = (escape(schema), escape(table));
    if escaped_schema.len() + 1 + escaped_table.len() + ".x".len() <= MAX_DIR_BYTES {
        return format!("{escaped_schema}.{escaped_table}.x");
    }
    // Only the hash makes the name unique; the prefix is for people.
    let mut readable = format!("{escaped_schema}_2E{escaped_table}");
    let mut end = readable.len().min(HASHED_PREFIX_BYTES);
    // Never cut an `_XX` escape in two.
    if let Some(start) = readable[end - 2..end].find('_') {
        end = end - 2 + start;
    }
    readable.truncate(end);
    let digest = hex::encode(pair_digest(schema, table));
    format!("{readable}.{}.h", &digest[..HASH_HEX])
}

/// SHA-256 over the length-prefixed schema and table, so no two pairs hash the same
/// bytes.
fn pair_digest(schema: &str, table: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in [schema, table] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

/// `name` with each byte outside `[A-Za-z0-9-]` written `_XX`; `_` for an empty name.
fn escape(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push('_');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// The bytes [`escape`] was given.
#[cfg(test)]
fn unescape(escaped: &str) -> Vec<u8> {
    if escaped == "_" {
        return Vec::new();
    }
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_'
            && let Some(b) = escaped
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The original `schema.table`, unambiguous: a plain name as it is, any other
/// double-quoted with `"` doubled, as PostgreSQL's `quote_ident` would
/// (`"a.b".c` and `a."b.c"`). Stored as the Delta table's name and shown by the catalog.
pub(crate) fn display_name(schema: &str, table: &str) -> String {
    format!("{}.{}", quote(schema), quote(table))
}

fn quote(name: &str) -> String {
    if is_plain(name) {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Whether a directory listed at the lake root may hold a table: anything but the
/// lake's own directory. (Directories of older versions may hold any characters.)
pub(crate) fn may_hold_table(dir: &str) -> bool {
    dir != RESERVED_DIR
}

/// `dir` as a URL path segment: percent-encoded outside `[A-Za-z0-9._-]`, which every
/// name [`table_dir`] makes is not, so those are unchanged. The encoding is for
/// directories an older version wrote (`my table.x`), read back from a listing of the
/// root; a listed name is one existing segment, never `..` and without `/`. Never used
/// on a source table's name.
pub(crate) fn dir_segment(dir: &str) -> String {
    const KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'.')
        .remove(b'_')
        .remove(b'-');
    percent_encoding::utf8_percent_encode(dir, KEPT).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// The names the lake path-escape issue lists, and more of the same kind.
    fn hostile_names() -> Vec<String> {
        let mixed = "é€".repeat(12) + &"€".repeat(9); // 12 × 5 + 9 × 3 = 87 bytes
        let euros_a = "€".repeat(21); // 63 bytes
        let euros_b = "€".repeat(20) + "₤";
        assert_eq!(euros_b.len(), 63);
        let long_a = "é€ab".repeat(9); // 9 × 7 = 63 bytes
        let long_b = "é€ab".repeat(8) + "é€ac";
        assert_eq!(long_a.len(), 63);
        assert_eq!(long_b.len(), 63);
        let mut names: Vec<String> = [
            "public",
            "ok",
            "a",
            "A",
            "b",
            "c",
            "a.b",
            "b.c",
            "a.b.c",
            ".",
            "..",
            "...",
            "/",
            "a/../b",
            "/../../outside",
            "../outside",
            "%2F",
            "%2E%2E",
            "%",
            "%%",
            "line\nbreak",
            "line\rbreak",
            "tab\there",
            "nul\0byte",
            "_",
            "__",
            "_2E",
            "_5F",
            "_airlock",
            "_delta_log",
            "airlock",
            "x",
            "h",
            "-",
            "--",
            "a b",
            "a\"b",
            "\"",
            "\"\"",
            "Straße",
            "表",
            "😀",
            "e\u{301}",
            "\u{e9}",
            "\\",
            "a\\b",
            "a.x",
            "a_2Eb",
            "a.b_2Ec",
            "",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        names.extend([mixed, euros_a, euros_b]);
        names.push(long_a);
        names.push(long_b);
        names.push("a".repeat(63));
        names.push("a".repeat(127));
        names.push("a".repeat(128));
        names.push("a".repeat(254));
        names.push("b".repeat(255));
        names.push("_".repeat(100));
        names
    }

    fn check_dir(dir: &str, pair: &(String, String)) {
        assert!(
            (3..=MAX_DIR_BYTES).contains(&dir.len()),
            "{pair:?} → {dir} ({} bytes)",
            dir.len()
        );
        assert!(
            dir.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
            "{pair:?} → {dir}"
        );
        assert!(dir.contains('.'), "{pair:?} → {dir}");
        assert!(!dir.starts_with('.'), "{pair:?} → {dir}");
        assert!(
            !matches!(dir, "." | ".." | "_airlock" | "_delta_log"),
            "{pair:?} → {dir}"
        );
        let dots = dir.matches('.').count();
        let (schema, table) = pair;
        if is_plain(schema) && is_plain(table) && schema.len() + 1 + table.len() <= MAX_DIR_BYTES {
            assert_eq!(dir, format!("{schema}.{table}"));
        } else {
            assert_eq!(dots, 2, "{pair:?} → {dir}");
            assert!(
                dir.ends_with(".x") || dir.ends_with(".h"),
                "{pair:?} → {dir}"
            );
        }
        assert!(may_hold_table(dir));
        assert_eq!(dir_segment(dir), dir, "no percent-encoding needed");
    }

    #[test]
    fn every_pair_of_hostile_names_gets_its_own_safe_directory() {
        let names = hostile_names();
        let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut hashed = 0;
        for schema in &names {
            for table in &names {
                let pair = (schema.clone(), table.clone());
                let dir = table_dir(schema, table);
                check_dir(&dir, &pair);
                if dir.ends_with(".h") {
                    hashed += 1;
                }
                if let Some(other) = seen.insert(dir.clone(), pair.clone()) {
                    panic!("{other:?} and {pair:?} share {dir}");
                }
                // Case-insensitive stores aside, directory names differ in bytes.
            }
        }
        assert!(hashed > 0, "the long names take the hashed form");
        assert_eq!(seen.len(), names.len() * names.len());
    }

    #[test]
    fn the_escaped_form_is_reversible() {
        let names = hostile_names();
        for schema in &names {
            for table in &names {
                let dir = table_dir(schema, table);
                let Some(body) = dir.strip_suffix(".x").filter(|b| b.contains('.')) else {
                    continue;
                };
                let (s, t) = body.split_once('.').expect("two parts");
                assert_eq!(unescape(s), schema.as_bytes(), "{dir}");
                assert_eq!(unescape(t), table.as_bytes(), "{dir}");
            }
        }
    }

    #[test]
    fn plain_names_keep_the_directory_older_versions_wrote() {
        assert_eq!(table_dir("public", "orders"), "public.orders");
        assert_eq!(table_dir("app", "Order_Items-2"), "app.Order_Items-2");
        assert_eq!(table_dir("_x", "t"), "_x.t");
        assert_eq!(table_dir("public", "A"), "public.A");
        assert_eq!(table_dir("public", "a"), "public.a");
        let long = "t".repeat(248);
        assert_eq!(table_dir("public", &long), format!("public.{long}"));
        assert_eq!(table_dir("public", &long).len(), 255);
        // One byte more: older versions failed there (file name too long).
        let longer = "t".repeat(249);
        assert!(table_dir("public", &longer).ends_with(".h"));
    }

    #[test]
    fn the_cases_of_the_issue() {
        assert_eq!(table_dir("public", "a/../b"), "public.a_2F_2E_2E_2Fb.x");
        assert_eq!(
            table_dir("public", "/../../outside"),
            "public._2F_2E_2E_2F_2E_2E_2Foutside.x"
        );
        assert_eq!(table_dir("public", "line\nbreak"), "public.line_0Abreak.x");
        assert_eq!(table_dir("public", ".."), "public._2E_2E.x");
        assert_eq!(table_dir("public", "."), "public._2E.x");
        assert_eq!(table_dir("public", "%2F"), "public._252F.x");
        assert_eq!(table_dir("a.b", "c"), "a_2Eb.c.x");
        assert_eq!(table_dir("a", "b.c"), "a.b_2Ec.x");
        assert_ne!(table_dir("a.b", "c"), table_dir("a", "b.c"));
        assert_eq!(table_dir("public", "_airlock"), "public._airlock");
        assert_eq!(table_dir("_airlock", "."), "_5Fairlock._2E.x");
        assert_eq!(table_dir("", ""), "_._.x");
        // Two 63-byte names differing at the end: hashed, still apart.
        let a = "é€ab".repeat(9);
        let b = "é€ab".repeat(8) + "é€ac";
        let (da, db) = (table_dir(&a, &a), table_dir(&a, &b));
        assert!(da.ends_with(".h") && db.ends_with(".h"), "{da} {db}");
        assert_ne!(da, db);
        assert!(da.len() <= MAX_DIR_BYTES && db.len() <= MAX_DIR_BYTES);
        assert!(
            da.starts_with("_C3_A9_E2_82_ACab"),
            "a readable prefix: {da}"
        );
    }

    #[test]
    fn hashed_names_do_not_cut_an_escape() {
        for pad in 0..4 {
            let schema = "a".repeat(pad) + &"é".repeat(100);
            let dir = table_dir(&schema, "t");
            let prefix = dir.split('.').next().unwrap();
            assert!(prefix.len() <= HASHED_PREFIX_BYTES);
            // Every `_` starts a whole escape.
            let bytes = prefix.as_bytes();
            for (i, &b) in bytes.iter().enumerate() {
                if b == b'_' {
                    assert!(i + 3 <= bytes.len(), "{prefix}");
                }
            }
        }
    }

    #[test]
    fn display_names_are_unambiguous() {
        assert_eq!(display_name("public", "orders"), "public.orders");
        assert_eq!(display_name("a.b", "c"), "\"a.b\".c");
        assert_eq!(display_name("a", "b.c"), "a.\"b.c\"");
        assert_eq!(display_name("s", "we\"ird"), "s.\"we\"\"ird\"");
        assert_eq!(
            display_name("public", "line\nbreak"),
            "public.\"line\nbreak\""
        );
        let names = hostile_names();
        let mut seen = BTreeSet::new();
        for schema in &names {
            for table in &names {
                assert!(
                    seen.insert(display_name(schema, table)),
                    "{schema:?}.{table:?}"
                );
            }
        }
    }

    #[test]
    fn listed_directories_of_older_versions_round_trip() {
        assert_eq!(dir_segment("my schema.t x"), "my%20schema.t%20x");
        assert_eq!(dir_segment("public.100%"), "public.100%25");
        assert!(!may_hold_table("_airlock"));
        assert!(may_hold_table("_x.t"));
    }
}
