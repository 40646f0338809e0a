//! `[policy]`: the classes, the columns they cover, the default for the rest, and
//! the key `hmac` hashes with.
//!
//! Invariants:
//! - A configuration without `[policy]` is refused, with the lines to add: nobody
//!   upgrades into an empty lake, nor keeps letting every column out, without saying so.
//! - The key never comes from the TOML: an environment variable or a `0600` file, at
//!   least [`MIN_KEY_BYTES`] bytes. A class that hashes without a key is refused.
//! - Every `[policy.columns]` entry names a class of `[policy.classes]`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::check::{Check, resolve};
use super::raw;
use crate::policy::{
    Action, Generalize, Keyed, Normalize, Policy, Rule, Unclassified, check_pattern,
};

/// The shortest policy key accepted.
pub const MIN_KEY_BYTES: usize = 32;

/// What `redact` writes when its class gives no `replacement`.
pub const DEFAULT_REPLACEMENT: &str = "[redacted]";

/// The message for a configuration without `[policy]`.
pub const MISSING: &str = "missing: airlock lets out only what a policy allows. Add `[policy]` \
    with `default = \"deny\"`, your classes under `[policy.classes]` and the columns they \
    cover under `[policy.columns]` (docs/policy.md), or `default = \"allow\"` to let every \
    unclassified column out as it is";

/// Checks `[policy]`.
pub(super) fn validate(raw: Option<raw::Policy>, check: &mut Check) -> Arc<Policy> {
    let Some(p) = raw else {
        check.add("policy", MISSING);
        return Arc::new(Policy::allow_all());
    };
    let default = match p.default.as_deref() {
        None | Some("deny") => Unclassified::Deny,
        Some("allow") => Unclassified::Allow,
        Some(other) => {
            check.add(
                "policy.default",
                format!("found `{other}`, expected `deny` or `allow`"),
            );
            Unclassified::Deny
        }
    };
    let mut classes = BTreeMap::new();
    for (name, class) in p.classes {
        let path = format!("policy.classes.{name}");
        if !valid_class_name(&name) {
            check.add(
                &path,
                "a class name is letters, digits, `_` and `-` (it is what a column comment names after `airlock:`)",
            );
        }
        if let Some(action) = action(&path, class, check) {
            classes.insert(name, action);
        }
    }
    // Only one stage may see raw values: it runs first, so a second one would run
    // after it and see the values the first is not responsible for.
    let stages: std::collections::BTreeSet<&str> =
        classes.values().filter_map(Action::stage).collect();
    if stages.len() > 1 {
        let listed: Vec<String> = stages.iter().map(|s| format!("`{s}`")).collect();
        check.add(
            "policy.classes",
            format!(
                "classes name {} as responsible stages, and only one stage can see raw values (it runs before every other): give those classes one stage, or a built-in action",
                listed.join(" and ")
            ),
        );
    }
    let mut rules = Vec::new();
    for (pattern, class) in p.columns {
        let path = format!("policy.columns.\"{pattern}\"");
        if let Err(problem) = check_pattern(&pattern) {
            check.add(&path, problem);
            continue;
        }
        if !classes.contains_key(&class) {
            let known: Vec<&str> = classes.keys().map(String::as_str).collect();
            check.add(
                &path,
                format!(
                    "class `{class}` is not in [policy.classes] (there: {}): add it there, or use one of those",
                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                ),
            );
            continue;
        }
        rules.push(Rule { pattern, class });
    }
    let key_id = p.key_id.unwrap_or_else(|| "k1".to_owned());
    if !valid_key_id(&key_id) {
        check.add(
            "policy.key_id",
            format!("found `{key_id}`, expected 1 to 16 letters, digits, `_` or `-` (it is written before every token)"),
        );
    }
    let secret = match (p.key_env, p.key_file) {
        (Some(_), Some(_)) => {
            check.add(
                "policy.key_file",
                "give the key in key_env or in key_file, not both",
            );
            None
        }
        (Some(var), None) => check.secret("policy.key_env", Some(var.clone())).map(|s| {
            (
                format!("the environment variable `{var}`"),
                "policy.key_env",
                s.into_bytes(),
            )
        }),
        (None, Some(file)) => {
            let path = resolve(check.base(), &file);
            match read_key_file(&path) {
                Ok(bytes) => Some((
                    format!("key file {}", path.display()),
                    "policy.key_file",
                    bytes,
                )),
                Err(problem) => {
                    check.add("policy.key_file", problem);
                    None
                }
            }
        }
        (None, None) => None,
    };
    let key = match secret {
        Some((from, path, bytes)) if bytes.len() < MIN_KEY_BYTES => {
            check.add(
                path,
                format!(
                    "{from} holds {} bytes, expected at least {MIN_KEY_BYTES}: make one with `openssl rand -hex 32`",
                    bytes.len()
                ),
            );
            None
        }
        Some((_, _, bytes)) => Some(Keyed::new(&key_id, &bytes)),
        None => None,
    };
    if key.is_none()
        && let Some((name, _)) = classes.iter().find(|(_, a)| a.needs_key())
    {
        check.add(
            "policy.key_env",
            format!(
                "class `{name}` hashes with `hmac`, which needs a key: set key_env to an environment variable holding at least {MIN_KEY_BYTES} random bytes (`openssl rand -hex 32`), or key_file to a file of mode 0600 holding them"
            ),
        );
    }
    Arc::new(Policy::new(default, classes, rules, key))
}

fn valid_class_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
}

fn valid_key_id(id: &str) -> bool {
    (1..=16).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The key in `path`, without a final newline; refused unless private.
fn read_key_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    crate::secrets::check_private(&meta, 0o077).map_err(|e| format!("{shown} {e}"))?;
    let mut bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

/// A class's action, from `action` and the fields it takes.
fn action(path: &str, class: raw::Class, check: &mut Check) -> Option<Action> {
    let Some(text) = class.action else {
        check.add(
            format!("{path}.action"),
            "missing: expected one of keep, hmac, redact, null, keep-first, keep-last, truncate, generalize, drop, guest:STAGE",
        );
        return None;
    };
    let (name, inline) = match text.split_once(':') {
        Some((name, arg)) => (name, Some(arg)),
        None => (text.as_str(), None),
    };
    let mut unused: Vec<&str> = Vec::new();
    let count = |check: &mut Check| -> Option<usize> {
        let n = match (inline, class.n) {
            (Some(arg), _) => arg.parse::<i64>().ok(),
            (None, n) => n,
        };
        match n {
            Some(n) if n > 0 => Some(n as usize),
            _ => {
                check.add(
                    format!("{path}.n"),
                    format!("`{name}` needs how many characters to keep, a number greater than 0: `n = 4` (or `action = \"{name}:4\"`)"),
                );
                None
            }
        }
    };
    let action = match name {
        "keep" => Action::Keep,
        "guest" => match inline {
            Some(stage) if !stage.is_empty() && !stage.contains(['/', '\\', '@']) => {
                Action::Guest(stage.to_owned())
            }
            _ => {
                check.add(
                    format!("{path}.action"),
                    format!("found `{text}`, expected `guest:` and the file stem of the stage responsible for the class (`guest:10-mask`)"),
                );
                return None;
            }
        },
        "null" => Action::Null,
        "drop" => Action::Drop,
        "redact" => Action::Redact(
            class
                .replacement
                .clone()
                .unwrap_or_else(|| DEFAULT_REPLACEMENT.to_owned()),
        ),
        "hmac" => {
            let mut normalize = Normalize::default();
            for step in class.normalize.iter().flatten() {
                match step.as_str() {
                    "trim" => normalize.trim = true,
                    "lower" => normalize.lower = true,
                    "digits" => normalize.digits = true,
                    other => check.add(
                        format!("{path}.normalize"),
                        format!("found `{other}`, expected `trim`, `lower` or `digits`"),
                    ),
                }
            }
            Action::Hmac(normalize)
        }
        "keep-first" => Action::KeepFirst(count(check)?),
        "keep-last" => Action::KeepLast(count(check)?),
        "truncate" => Action::Truncate(count(check)?),
        "generalize" => {
            let unit = inline.map(str::to_owned).or(class.unit.clone());
            match (unit.as_deref(), class.width) {
                (Some("hour"), None) => Action::Generalize(Generalize::Hour),
                (Some("day"), None) => Action::Generalize(Generalize::Day),
                (Some("month"), None) => Action::Generalize(Generalize::Month),
                (Some("year"), None) => Action::Generalize(Generalize::Year),
                (Some(w), None) if w.parse::<i64>().is_ok_and(|w| w > 0) => {
                    Action::Generalize(Generalize::Width(w.parse().expect("checked")))
                }
                (None, Some(w)) if w > 0 => Action::Generalize(Generalize::Width(w)),
                _ => {
                    check.add(
                        format!("{path}.unit"),
                        "`generalize` needs `unit = \"hour\" | \"day\" | \"month\" | \"year\"` (timestamps, dates) or `width = N` (numbers, N > 0), one of them",
                    );
                    return None;
                }
            }
        }
        other => {
            check.add(
                format!("{path}.action"),
                format!("found `{other}`, expected one of keep, hmac, redact, null, keep-first, keep-last, truncate, generalize, drop, guest:STAGE"),
            );
            return None;
        }
    };
    // Fields the action does not take are mistakes, not silently ignored.
    if class.n.is_some() && !matches!(name, "keep-first" | "keep-last" | "truncate") {
        unused.push("n");
    }
    if class.replacement.is_some() && name != "redact" {
        unused.push("replacement");
    }
    if class.normalize.is_some() && name != "hmac" {
        unused.push("normalize");
    }
    if (class.unit.is_some() || class.width.is_some()) && name != "generalize" {
        unused.push(if class.unit.is_some() {
            "unit"
        } else {
            "width"
        });
    }
    for field in unused {
        check.add(
            format!("{path}.{field}"),
            format!("`{name}` does not take `{field}`: remove it"),
        );
    }
    Some(action)
}
