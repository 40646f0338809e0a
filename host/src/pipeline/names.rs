//! The route and tag names stages may write.
//!
//! Routes and tags leave airlock: a route name becomes a metrics label and decides
//! which sinks get a row, a tag is written to the lake (`_tags`, column metadata). A
//! guest that could choose them freely could copy a value it read into one of them,
//! around every masking stage. So a stage may write only names the operator
//! declared:
//!
//! - routes: `default` and every route a sink takes (`[sinks.NAME] routes`): a route
//!   no sink takes would lead nowhere anyway;
//! - tags: `[plugins] tags`, exact names or prefixes ending in `*` (`pii:*`); without
//!   it, the example guests' tags ([`DEFAULT_TAGS`]). A prefix lets a guest choose the
//!   rest of the name, so exact names are the tighter declaration.
//!
//! Anything else fails the stage's batch with an error naming the name and the
//! setting that would declare it (the batch comes back unchanged, as on any failure).

use std::collections::BTreeSet;

/// The declared names (see the module docs). The default declares the `default`
/// route and no tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    routes: BTreeSet<String>,
    /// Exact tags, and prefixes (the pattern without its trailing `*`).
    tags: BTreeSet<String>,
    tag_prefixes: Vec<String>,
    /// Every name is accepted: for `airlock guest test` and benchmarks only.
    unchecked: bool,
}

pub const DEFAULT_ROUTE: &str = "default";

/// The tags declared when `[plugins] tags` is not set: exactly those the example
/// guests write (`tag`, `mask`), so they run as they come. No prefix: a prefix would
/// let a guest choose the rest of the name.
pub const DEFAULT_TAGS: &[&str] = &[
    "pii",
    "pii:email",
    "pii:phone",
    "pii:card",
    "pii:national_id",
];

impl Default for Names {
    fn default() -> Self {
        Names::new(std::iter::empty::<String>(), std::iter::empty::<String>())
    }
}

impl Names {
    /// `routes` (plus `default`) and the tag patterns `tags`.
    pub fn new(
        routes: impl IntoIterator<Item = impl Into<String>>,
        tags: impl IntoIterator<Item = impl Into<String>>,
    ) -> Names {
        let mut names = Names {
            routes: routes.into_iter().map(Into::into).collect(),
            tags: BTreeSet::new(),
            tag_prefixes: Vec::new(),
            unchecked: false,
        };
        names.routes.insert(DEFAULT_ROUTE.to_owned());
        for tag in tags {
            let tag: String = tag.into();
            match tag.strip_suffix('*') {
                Some(prefix) => names.tag_prefixes.push(prefix.to_owned()),
                None => {
                    names.tags.insert(tag);
                }
            }
        }
        names
    }

    /// Accepts every name. Only where nothing leaves airlock: `airlock guest test`,
    /// which shows a guest's output to its developer, and benchmarks.
    pub fn unchecked() -> Names {
        Names {
            unchecked: true,
            ..Names::default()
        }
    }

    /// Checks a tag pattern for `[plugins] tags`: not empty, `*` only at the end.
    pub fn check_pattern(pattern: &str) -> Result<(), String> {
        match pattern.find('*') {
            _ if pattern.is_empty() || pattern == "*" => Err(format!(
                "`{pattern}` declares every tag: list the tags (or prefixes such as `pii:*`) stages may write"
            )),
            Some(at) if at + 1 != pattern.len() => Err(format!(
                "`{pattern}`: `*` may only end a tag prefix, as in `pii:*`"
            )),
            _ => Ok(()),
        }
    }

    pub fn check_route(&self, route: &str) -> Result<(), String> {
        if self.unchecked || self.routes.contains(route) {
            return Ok(());
        }
        let taken: Vec<&str> = self.routes.iter().map(String::as_str).collect();
        Err(format!(
            "the route `{}` is not taken by any sink (routes taken: {}): add it to a sink's `routes`, or change the stage's settings",
            shown(route),
            taken.join(", ")
        ))
    }

    pub fn check_tag(&self, tag: &str) -> Result<(), String> {
        if self.unchecked
            || self.tags.contains(tag)
            || self
                .tag_prefixes
                .iter()
                .any(|p| tag.starts_with(p.as_str()))
        {
            return Ok(());
        }
        Err(format!(
            "the tag `{}` is not declared: add it (or a prefix such as `pii:*`) to [plugins] tags, or change the stage's settings",
            shown(tag)
        ))
    }
}

/// A name as an error shows it: at most 64 characters, control characters escaped
/// (the name may carry a value a guest read).
fn shown(name: &str) -> String {
    let mut out: String = name.chars().take(64).flat_map(char::escape_debug).collect();
    if name.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_declared_routes_and_tags_pass() {
        let names = Names::new(["spine"], ["pii", "pii:*", "finance"]);
        for route in ["default", "spine"] {
            names.check_route(route).unwrap();
        }
        let err = names.check_route("alice@example.com").unwrap_err();
        assert!(
            err.contains("`alice@example.com` is not taken by any sink")
                && err.contains("default, spine"),
            "{err}"
        );
        for tag in ["pii", "pii:email", "finance"] {
            names.check_tag(tag).unwrap();
        }
        for tag in ["pi", "finances", "secret\n123"] {
            let err = names.check_tag(tag).unwrap_err();
            assert!(err.contains("[plugins] tags"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let closed = Names::default();
        closed.check_route("default").unwrap();
        assert!(closed.check_tag("pii").is_err());
        assert!(closed.check_route("spine").is_err());
        Names::unchecked().check_tag("anything").unwrap();
        let long = "x".repeat(1000);
        assert!(names.check_tag(&long).unwrap_err().len() < 300);
    }

    #[test]
    fn tag_patterns_are_checked() {
        Names::check_pattern("pii").unwrap();
        Names::check_pattern("pii:*").unwrap();
        for bad in ["", "*", "p*i", "**"] {
            assert!(Names::check_pattern(bad).is_err(), "{bad}");
        }
    }
}
