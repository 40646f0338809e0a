//! `route`: sends rows that carry the restricted tag to the restricted route, every
//! other row to the default route, and rows of spine tables also to the spine.
//!
//! A row is restricted when one of its row tags is `tag` or a sub-tag of it
//! (`pii:email` for `pii`), or, unless `by_column_tags = false`, when a column of its
//! table carries such a tag: a table with a PII column is treated as PII as a whole
//! (fail closed: value matchers sample, and masked data is still derived from PII).
//!
//! Host calls per batch, none per row: `tables()`, and per table `rows-of`,
//! `column-tags` once per column, `rows-tagged` (skipped when the table is restricted
//! anyway), `add-route-rows` once per route, and for spine tables two
//! `annotate-rows`.

use std::cell::RefCell;

use airlock_guest::{Batch, Guest, PluginInfo, Settings, TablePatterns};

struct Config {
    tag: String,
    restricted_route: String,
    default_route: String,
    by_column_tags: bool,
    spine_tables: TablePatterns,
    spine_route: String,
    spine_kind: String,
    spine_source: String,
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

impl Config {
    fn from_settings(s: &Settings) -> Result<Config, String> {
        s.deny_unknown(&[
            "tag",
            "restricted_route",
            "default_route",
            "by_column_tags",
            "spine_tables",
            "spine_route",
            "spine_kind",
            "spine_source",
        ])?;
        let text = |key: &str, default: &str| -> Result<String, String> {
            let value = s.get_or(key, default).trim();
            if value.is_empty() {
                return Err(format!(
                    "setting `{key}` is empty; expected a name (default {default:?})"
                ));
            }
            Ok(value.to_string())
        };
        Ok(Config {
            tag: text("tag", "pii")?,
            restricted_route: text("restricted_route", "restricted")?,
            default_route: text("default_route", "default")?,
            by_column_tags: s.flag("by_column_tags", true)?,
            spine_tables: TablePatterns::new(s.get_all("spine_tables")),
            spine_route: text("spine_route", "spine")?,
            spine_kind: text("spine_kind", "other")?,
            spine_source: text("spine_source", "airlock")?,
        })
    }

    /// `tag` itself or one of its sub-tags (`pii:email` for `pii`).
    fn is_restricted_tag(&self, tag: &str) -> bool {
        tag.strip_prefix(self.tag.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
    }

    fn process(&self, batch: &Batch) {
        let tables = batch.tables();
        for (ti, table) in tables.iter().enumerate() {
            let ti = ti as u32;
            let rows = batch.rows_of(ti);
            if rows.is_empty() {
                continue;
            }
            let table_restricted = self.by_column_tags
                && (0..table.columns.len() as u32).any(|ci| {
                    batch
                        .column_tags(ti, ci)
                        .iter()
                        .any(|t| self.is_restricted_tag(t))
                });
            if table_restricted {
                batch.add_route_rows(&rows, &self.restricted_route);
            } else {
                // Both lists are in batch order: one merge splits the rows.
                let tagged = batch.rows_tagged(ti, &self.tag);
                let mut others = Vec::with_capacity(rows.len() - tagged.len());
                let mut next = tagged.iter().peekable();
                for &row in &rows {
                    if next.next_if_eq(&&row).is_none() {
                        others.push(row);
                    }
                }
                if !tagged.is_empty() {
                    batch.add_route_rows(&tagged, &self.restricted_route);
                }
                if !others.is_empty() {
                    batch.add_route_rows(&others, &self.default_route);
                }
            }
            if self.spine_tables.matches(&table.schema, &table.name) {
                batch.add_route_rows(&rows, &self.spine_route);
                batch.annotate_rows(&rows, "spine.kind", &self.spine_kind);
                batch.annotate_rows(&rows, "spine.source", &self.spine_source);
            }
        }
    }
}

struct Route;

impl Guest for Route {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "route".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "routes tagged rows to the restricted route, others to the default route, spine tables to the spine".into(),
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
            None => Err("route: process called before init".into()),
        })
    }
}

airlock_guest::export!(Route);
