//! The file's shape, read so that every mistake in it is found at once: a value of the
//! wrong type, an unknown field or a table missing a required one is reported with its
//! path and line, then left out, and the rest is read again (a plain serde parse stops
//! at the first). A file that is not TOML at all is one issue: where the syntax breaks.

use super::check::ConfigIssue;
use super::raw;

/// The file as written, with every field of the wrong type (or unknown, or a table
/// missing a required field) reported with its path and line, then left out so
/// that the rest is still read and checked. A file that is not TOML at all is one
/// issue: where the syntax breaks.
pub(super) fn parse_raw(text: &str) -> Result<(raw::File, Vec<ConfigIssue>), Vec<ConfigIssue>> {
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
pub(super) fn related_fields(a: &str, b: &str) -> bool {
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
pub(super) fn issue_field(path: &str) -> &str {
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
