//! The governance policy: every published column has a class (or falls under the
//! default), every class one built-in action, and the gate applies it to every row
//! before any guest or sink sees the row.
//!
//! ```text
//! [policy.columns] globs ─┐
//!  column comments ───────┼─▶ resolve(schema, table, column) ─▶ class ─▶ action ─▶ gate
//!  default (deny | allow) ┘
//! ```
//!
//! Invariants:
//! - An exact `schema.table.column` entry wins over globs; among matching globs the
//!   strictest class wins. A column that nothing classifies gets the default:
//!   `deny` removes it (as `drop`), `allow` keeps it.
//! - A column comment `airlock: CLASS` only tightens: it applies when its class's
//!   action is at least as strict ([`Action::rank`]) as what the configuration gives
//!   the column, so a table owner cannot declassify what the configuration classifies.
//!   A column the default denies may be classified by a comment only into a class
//!   whose action lets nothing of the value itself out ([`COMMENT_FLOOR_UNDER_DENY`]:
//!   `hmac`, `redact`, `null`, `drop`): a comment can have it masked, never raw nor
//!   in part.
//! - The policy's version is a hash of everything that decides an output (default,
//!   classes, column entries, key id), never of the key itself.

pub mod action;
pub mod gate;
pub mod install;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::change::Lsn;

pub use self::action::{Action, Generalize, Keyed, Normalize};
pub use self::gate::{Gate, GateError, Plan};

/// A value of a stage's class that left the stage as it came in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{table}.{column} is class `{class}`, which [policy] gives to stage `{stage}`, and {unwritten} of its values in transaction {xid} (commit {commit_lsn}) left the stage unwritten: the batch is not delivered and airlock stops; fix the stage or its settings so that it writes every value of the class (or give the class a built-in action)"
)]
pub struct Violation {
    pub table: String,
    pub column: String,
    pub class: String,
    pub stage: String,
    /// Values of the batch the stage did not write (in every column of the stage's
    /// classes).
    pub unwritten: usize,
    pub xid: u32,
    pub commit_lsn: Lsn,
}

/// What the policy kept out, for the log, `/status` and the spine's
/// `request_denied` events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// A column nothing classifies, removed by the default (first seen in this run).
    Column {
        table: String,
        column: String,
        /// Part of the replica identity: updates and deletes carry no key for it.
        key: bool,
    },
    /// A batch its responsible stage did not fully write: not delivered.
    Unwritten(Violation),
}

/// Denials on their way from the gate to the batches that carry them to the sinks,
/// each with the commit LSN of the transaction that revealed it (in stream order).
#[derive(Clone, Debug, Default)]
pub struct DenialQueue(Arc<Mutex<VecDeque<(Lsn, Denial)>>>);

impl DenialQueue {
    pub fn push(&self, commit_lsn: Lsn, denial: Denial) {
        self.lock().push_back((commit_lsn, denial));
    }

    /// The denials of transactions that commit at or before `commit_lsn`.
    pub fn take_through(&self, commit_lsn: Lsn) -> Vec<Denial> {
        let mut queue = self.lock();
        let n = queue.iter().take_while(|(l, _)| *l <= commit_lsn).count();
        queue.drain(..n).map(|(_, d)| d).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Lsn, Denial)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What happens to a column nothing classifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unclassified {
    /// Removed from every sink; one notice per newly seen column.
    Deny,
    /// Kept as it is.
    Allow,
}

impl Unclassified {
    /// As written in `[policy] default`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unclassified::Deny => "deny",
            Unclassified::Allow => "allow",
        }
    }
}

/// A `[policy.columns]` entry: a `schema.table.column` pattern and its class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub class: String,
}

impl Rule {
    fn is_exact(&self) -> bool {
        !self.pattern.contains('*')
    }
}

/// The validated policy airlock runs with.
#[derive(Clone, Debug)]
pub struct Policy {
    pub default: Unclassified,
    /// Class name to action.
    pub classes: BTreeMap<String, Action>,
    pub rules: Vec<Rule>,
    /// The key `hmac` classes hash with; present whenever one does.
    pub key: Option<Keyed>,
    /// 12 hex digits over what decides an output (see the module docs).
    pub version: String,
}

/// Where a column's class came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum By {
    /// A `[policy.columns]` entry (its pattern).
    Config(String),
    /// The column's comment in PostgreSQL.
    Comment,
    /// Nothing classifies it: the policy's default.
    Default,
}

impl fmt::Display for By {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            By::Config(pattern) => write!(f, "[policy.columns] \"{pattern}\""),
            By::Comment => f.write_str("its comment"),
            By::Default => f.write_str("the default"),
        }
    }
}

/// A column's class and action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `None` under the default.
    pub class: Option<String>,
    pub action: Action,
    pub by: By,
}

impl Policy {
    pub fn new(
        default: Unclassified,
        classes: BTreeMap<String, Action>,
        rules: Vec<Rule>,
        key: Option<Keyed>,
    ) -> Policy {
        let mut hash = Sha256::new();
        hash.update(format!("default={default:?}\n"));
        for (name, action) in &classes {
            hash.update(format!("class {name:?} = {action}\n"));
        }
        for rule in &rules {
            hash.update(format!("column {:?} = {:?}\n", rule.pattern, rule.class));
        }
        if let Some(key) = &key {
            hash.update(format!("key id {:?}\n", key.id));
        }
        let version = hex::encode(&hash.finalize()[..6]);
        Policy {
            default,
            classes,
            rules,
            key,
            version,
        }
    }

    /// The effective policy as JSON, for lineage: the default, each class's action,
    /// the column entries and the key id (never the key).
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.version,
            "default": self.default.as_str(),
            "classes": self.classes.iter().map(|(name, action)| (name.clone(), serde_json::Value::from(action.to_string()))).collect::<serde_json::Map<_, _>>(),
            "columns": self.rules.iter().map(|r| (r.pattern.clone(), serde_json::Value::from(r.class.clone()))).collect::<serde_json::Map<_, _>>(),
            "key_id": self.key.as_ref().map(|k| k.id.clone()),
        })
    }

    /// The stage responsible for the classes whose action is `guest:STAGE`, and
    /// those classes (the configuration allows one such stage).
    pub fn custodian(&self) -> Option<(&str, Vec<&str>)> {
        let mut classes = self
            .classes
            .iter()
            .filter_map(|(name, action)| Some((action.stage()?, name.as_str())));
        let (stage, first) = classes.next()?;
        let mut names = vec![first];
        names.extend(classes.filter(|(s, _)| *s == stage).map(|(_, n)| n));
        Some((stage, names))
    }

    /// A policy that keeps every column: what tests of other parts run with.
    pub fn allow_all() -> Policy {
        Policy::new(Unclassified::Allow, BTreeMap::new(), Vec::new(), None)
    }

    /// The class and action of `schema.table.column`, given its comment's class (the
    /// text after `airlock:`), if any.
    pub fn resolve(
        &self,
        schema: &str,
        table: &str,
        column: &str,
        comment: Option<&str>,
    ) -> Resolved {
        let configured = self.configured(schema, table, column);
        let from_config = match &configured {
            Some(rule) => Resolved {
                class: Some(rule.class.clone()),
                action: self.classes[&rule.class].clone(),
                by: By::Config(rule.pattern.clone()),
            },
            None => Resolved {
                class: None,
                action: match self.default {
                    Unclassified::Deny => Action::Drop,
                    Unclassified::Allow => Action::Keep,
                },
                by: By::Default,
            },
        };
        let floor = match (&from_config.by, self.default) {
            (By::Default, Unclassified::Deny) => COMMENT_FLOOR_UNDER_DENY,
            _ => from_config.action.rank(),
        };
        match comment.and_then(|class| Some((class, self.classes.get(class)?))) {
            Some((class, action)) if action.rank() >= floor => Resolved {
                class: Some(class.to_owned()),
                action: action.clone(),
                by: By::Comment,
            },
            _ => from_config,
        }
    }

    /// The entry that classifies the column: the exact one, else the strictest glob.
    fn configured(&self, schema: &str, table: &str, column: &str) -> Option<&Rule> {
        let matching = self
            .rules
            .iter()
            .filter(|r| matches(&r.pattern, schema, table, column));
        let mut best: Option<&Rule> = None;
        for rule in matching {
            let better = match best {
                None => true,
                Some(b) if b.is_exact() => false,
                Some(_) if rule.is_exact() => true,
                Some(b) => self.classes[&rule.class].rank() > self.classes[&b.class].rank(),
            };
            if better {
                best = Some(rule);
            }
        }
        best
    }
}

/// The least strict action ([`Action::rank`]) a comment may give a column the default
/// denies: `hmac` and stricter let nothing of the value itself out.
pub const COMMENT_FLOOR_UNDER_DENY: u8 = 2;

/// The prefix of the transactional logical message that says a relation's column
/// comments changed (its content: the relation's OID), emitted by the event trigger
/// [`install::INSTALL`] adds.
pub const COMMENT_MESSAGE_PREFIX: &str = "airlock.policy";

/// The class a comment gives: the word after `airlock:` in it, if any
/// (`'Customer e-mail. airlock: pii'`).
pub fn comment_class(comment: &str) -> Option<&str> {
    let at = comment.find("airlock:")?;
    let rest = comment[at + "airlock:".len()..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// Whether `pattern` (three dot-separated parts, `*` standing for any run of
/// characters within a part) matches the column.
pub fn matches(pattern: &str, schema: &str, table: &str, column: &str) -> bool {
    let mut parts = pattern.splitn(3, '.');
    let (Some(s), Some(t), Some(c)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    glob(s, schema) && glob(t, table) && glob(c, column)
}

/// Whether `pattern` (`schema.table`, or `table` for any schema; `*` standing for any
/// run of characters within a part) matches the table.
pub fn matches_table(pattern: &str, schema: &str, table: &str) -> bool {
    match pattern.split_once('.') {
        Some((s, t)) => glob(s, schema) && glob(t, table),
        None => glob(pattern, table),
    }
}

/// `*`-only wildcard matching.
fn glob(pattern: &str, name: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut name) = name.strip_prefix(first) else {
        return false;
    };
    let pieces: Vec<&str> = rest.split('*').collect();
    let (last, middle) = pieces
        .split_last()
        .expect("split yields one piece at least");
    for piece in middle {
        match name.find(piece) {
            Some(at) => name = &name[at + piece.len()..],
            None => return false,
        }
    }
    name.len() >= last.len() && name.ends_with(last)
}

/// Whether a `[policy.columns]` key is well formed; the problem otherwise.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let parts: Vec<&str> = pattern.splitn(3, '.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "found `{pattern}`, expected `schema.table.column`, each part a name or a glob with `*` (`public.*.email`)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(default: Unclassified) -> Policy {
        let classes = BTreeMap::from([
            ("public".to_owned(), Action::Keep),
            ("pii".to_owned(), Action::Hmac(Normalize::default())),
            ("contact".to_owned(), Action::KeepLast(4)),
            ("secret".to_owned(), Action::Drop),
        ]);
        let rules = [
            ("public.customers.email", "pii"),
            ("public.*.created_at", "public"),
            ("public.customers.*", "contact"),
            ("public.*.*", "public"),
            ("billing.*.*_id", "public"),
        ]
        .iter()
        .map(|(p, c)| Rule {
            pattern: (*p).into(),
            class: (*c).into(),
        })
        .collect();
        Policy::new(default, classes, rules, Some(Keyed::new("k1", b"k")))
    }

    #[test]
    fn globs_match_within_a_part() {
        assert!(matches(
            "public.*.created_at",
            "public",
            "orders",
            "created_at"
        ));
        assert!(!matches(
            "public.*.created_at",
            "public",
            "orders",
            "created_at2"
        ));
        assert!(matches(
            "billing.*.*_id",
            "billing",
            "invoices",
            "customer_id"
        ));
        assert!(!matches("billing.*.*_id", "billing", "invoices", "id"));
        assert!(matches("*.*.*", "a", "b", "c"));
        assert!(matches("a*b*c.t.x", "aXXbYYc", "t", "x"));
        assert!(!matches("a*b*c.t.x", "aXXcYYb", "t", "x"));
        assert!(!matches("public.orders", "public", "orders", "x"));
    }

    #[test]
    fn an_exact_entry_wins_then_the_strictest_glob() {
        let p = policy(Unclassified::Deny);
        let class = |t: &str, c: &str| p.resolve("public", t, c, None).class;
        assert_eq!(class("customers", "email").as_deref(), Some("pii"));
        // `public.*.created_at` (keep) and `public.customers.*` (keep-last) match.
        assert_eq!(class("customers", "created_at").as_deref(), Some("contact"));
        assert_eq!(class("orders", "created_at").as_deref(), Some("public"));
        let other = p.resolve("other", "t", "c", None);
        assert_eq!((other.action, other.by), (Action::Drop, By::Default));
        let allowed = policy(Unclassified::Allow).resolve("other", "t", "c", None);
        assert_eq!(allowed.action, Action::Keep);
    }

    #[test]
    fn a_comment_tightens_and_never_loosens() {
        let p = policy(Unclassified::Deny);
        // The configuration keeps `orders.note`; the comment hashes it.
        let r = p.resolve("public", "orders", "note", Some("pii"));
        assert_eq!((r.class.as_deref(), r.by), (Some("pii"), By::Comment));
        // The configuration hashes the e-mail; `public` in a comment cannot undo it.
        let r = p.resolve("public", "customers", "email", Some("public"));
        assert_eq!(r.class.as_deref(), Some("pii"));
        // Denied by default: a comment may have it masked, never let it out raw or in
        // part.
        let r = p.resolve("other", "t", "ssn", Some("pii"));
        assert_eq!((r.class.as_deref(), r.by), (Some("pii"), By::Comment));
        assert_eq!(r.action, Action::Hmac(Normalize::default()));
        for loose in ["public", "contact"] {
            let r = p.resolve("other", "t", "ssn", Some(loose));
            assert_eq!((r.action, r.by), (Action::Drop, By::Default), "{loose}");
        }
        let r = p.resolve("other", "t", "ssn", Some("secret"));
        assert_eq!((r.action, r.by), (Action::Drop, By::Comment));
        // An unknown class in a comment changes nothing.
        let r = p.resolve("public", "orders", "note", Some("nonsense"));
        assert_eq!(r.class.as_deref(), Some("public"));
        // Under `allow`, a comment classifies what nothing else does.
        let r = policy(Unclassified::Allow).resolve("other", "t", "ssn", Some("pii"));
        assert_eq!(r.class.as_deref(), Some("pii"));
    }

    #[test]
    fn comment_classes_are_read_from_the_text() {
        assert_eq!(comment_class("airlock: pii"), Some("pii"));
        assert_eq!(
            comment_class("Customer e-mail. airlock:contact_info, see docs"),
            Some("contact_info")
        );
        assert_eq!(comment_class("airlock:"), None);
        assert_eq!(comment_class("no class here"), None);
    }

    #[test]
    fn the_version_follows_what_decides_outputs_but_not_the_key() {
        let a = policy(Unclassified::Deny);
        assert_eq!(a.version.len(), 12);
        assert_ne!(a.version, policy(Unclassified::Allow).version);
        let mut b = policy(Unclassified::Deny);
        b.key = Some(Keyed::new("k1", b"another secret"));
        let b = Policy::new(b.default, b.classes, b.rules, b.key);
        assert_eq!(a.version, b.version);
        let c = Policy::new(
            a.default,
            a.classes.clone(),
            a.rules.clone(),
            Some(Keyed::new("k2", b"k")),
        );
        assert_ne!(a.version, c.version);
    }

    #[test]
    fn patterns_need_three_parts() {
        assert!(check_pattern("public.customers.email").is_ok());
        assert!(check_pattern("public.*.*").is_ok());
        assert!(check_pattern("customers.email").is_err());
        assert!(check_pattern("public..email").is_err());
    }
}
