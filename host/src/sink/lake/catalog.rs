//! The lake's catalog: what `airlock catalog` prints.
//!
//! ```text
//! config ──▶ every `delta` sink ──list {url}/*/_delta_log──▶ load each table (log only)
//!        ──▶ Catalog { sinks: [ { tables: [ columns, types, tags, rows, version ] } ] }
//! ```
//!
//! Reads only the Delta log: row counts come from the files' statistics, never from
//! the Parquet data. A table is any directory directly under the root holding a
//! `_delta_log`, except the lake's own `_airlock/`; its name is the original
//! `schema.table` stored in its Delta metadata (see [`super::naming::display_name`]),
//! or its directory when the metadata has none.

use std::collections::HashMap;
use std::fmt::Write as _;

use deltalake::DeltaTableBuilder;
use serde::Serialize;

use super::arrow::field_tags;
use super::error::LakeError;
use super::naming;
use super::settings::{LakeSettings, register_s3, table_handle, table_url};

/// Every table of every lake sink of a configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Catalog {
    pub sinks: Vec<CatalogSink>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CatalogSink {
    pub name: String,
    pub url: String,
    pub routes: Vec<String>,
    pub tables: Vec<CatalogTable>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CatalogTable {
    /// The original `schema.table`, names other than plain ones double-quoted
    /// (`public."line⏎break"`); the directory when the Delta metadata names none.
    pub name: String,
    /// The table's URL: `{sink url}/{directory}`.
    pub location: String,
    /// The latest Delta version.
    pub version: u64,
    /// Rows in the current files, from their statistics (`None`: a file has none).
    pub rows: Option<u64>,
    pub files: usize,
    pub bytes: u64,
    /// Time of the latest commit, milliseconds since the epoch.
    pub last_commit_ms: Option<i64>,
    /// The latest commit's LSN range and pipeline, from its commit info.
    pub last_commit_info: HashMap<String, serde_json::Value>,
    pub columns: Vec<CatalogColumn>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CatalogColumn {
    pub name: String,
    /// The Delta type, e.g. `long`, `decimal(12,2)`, `timestamp`.
    #[serde(rename = "type")]
    pub data_type: String,
    pub nullable: bool,
    /// Guest column tags (`airlock.tags` field metadata).
    pub tags: Vec<String>,
}

/// Why the catalog could not be read.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct CatalogError {
    pub sink: String,
    pub message: String,
}

/// The directories holding a Delta table directly under the sink's location, sorted.
pub(super) async fn list_tables(settings: &LakeSettings) -> Result<Vec<String>, LakeError> {
    let url = settings.url.trim_end_matches('/');
    if url.starts_with("s3://") || url.starts_with("s3a://") {
        register_s3();
    }
    if let Some(path) = url.strip_prefix("file://")
        && !std::path::Path::new(path).is_dir()
    {
        return Ok(Vec::new());
    }
    let root = deltalake::ensure_table_uri(url).map_err(LakeError::delta(
        "(sink root)",
        "resolving the lake location",
    ))?;
    let store = DeltaTableBuilder::from_url(root)
        .and_then(|b| {
            b.with_storage_options(settings.store_options())
                .build_storage()
        })
        .map_err(LakeError::delta("(sink root)", "opening the lake location"))?
        .object_store(None);
    let listing = store
        .list_with_delimiter(None)
        .await
        .map_err(|e| LakeError::delta("(sink root)", "listing the lake")(e.into()))?;
    let mut dirs = Vec::new();
    for prefix in listing.common_prefixes {
        let Some(dir) = prefix.filename() else {
            continue;
        };
        if !naming::may_hold_table(dir) {
            continue; // `_airlock/`: the compaction lock
        }
        let log = prefix.clone().join("_delta_log");
        let entries = store
            .list_with_delimiter(Some(&log))
            .await
            .map_err(|e| LakeError::delta("(sink root)", "listing the lake")(e.into()))?;
        if entries.objects.is_empty() {
            continue;
        }
        dirs.push(dir.to_owned());
    }
    dirs.sort();
    Ok(dirs)
}

/// The catalog entry of the table in directory `dir`.
async fn describe(settings: &LakeSettings, dir: &str) -> Result<CatalogTable, LakeError> {
    use futures::TryStreamExt as _;
    let location = table_url(&settings.url, dir);
    let mut table = table_handle(&location, dir, settings)?;
    table
        .load()
        .await
        .map_err(LakeError::delta(dir, "loading the table"))?;
    let state = table
        .snapshot()
        .map_err(LakeError::delta(dir, "loading the table"))?;
    let name = state.metadata().name().unwrap_or(dir).to_owned();
    let name = name.as_str();
    let mut rows = Some(0u64);
    let (mut files, mut bytes) = (0, 0u64);
    for file in state.log_data().iter() {
        files += 1;
        bytes += file.size() as u64;
        rows = rows.zip(file.num_records()).map(|(a, b)| a + b as u64);
    }
    let columns = state
        .schema()
        .fields()
        .map(|field| CatalogColumn {
            name: field.name().clone(),
            data_type: type_name(field.data_type()),
            nullable: field.is_nullable(),
            tags: field_tags(field).into_iter().collect(),
        })
        .collect();
    let version = table.version().unwrap_or_default();
    let last = table
        .history(Some(1))
        .try_collect::<Vec<_>>()
        .await
        .map_err(LakeError::delta(name, "reading the history"))?;
    let last = last.into_iter().next();
    let mut info = last.as_ref().map(|c| c.info.clone()).unwrap_or_default();
    info.retain(|k, _| k.starts_with("airlock."));
    if let Some(operation) = last.as_ref().and_then(|c| c.operation.clone()) {
        info.insert("operation".into(), operation.into());
    }
    Ok(CatalogTable {
        name: name.to_owned(),
        location,
        version,
        rows,
        files,
        bytes,
        last_commit_ms: last.and_then(|c| c.timestamp),
        last_commit_info: info,
        columns,
    })
}

/// Delta's name for a type: `long`, `decimal(12,2)`, `array<string>`, ...
pub(super) fn type_name(data_type: &deltalake::kernel::DataType) -> String {
    use deltalake::kernel::DataType;
    match data_type {
        DataType::Primitive(p) => serde_json::to_value(p)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{p:?}")),
        DataType::Array(a) => format!("array<{}>", type_name(a.element_type())),
        DataType::Map(m) => format!(
            "map<{},{}>",
            type_name(m.key_type()),
            type_name(m.value_type())
        ),
        DataType::Struct(_) => "struct".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Reads the catalog of every lake in `lakes` (the Delta logs only).
pub async fn catalog(
    lakes: impl IntoIterator<Item = &LakeSettings>,
) -> Result<Catalog, CatalogError> {
    let mut sinks = Vec::new();
    for settings in lakes {
        let error = |e: LakeError| CatalogError {
            sink: settings.name.clone(),
            message: e.to_string(),
        };
        let dirs = list_tables(settings).await.map_err(error)?;
        let mut tables = Vec::new();
        for dir in dirs {
            tables.push(describe(settings, &dir).await.map_err(error)?);
        }
        sinks.push(CatalogSink {
            name: settings.name.clone(),
            url: settings.url.clone(),
            routes: settings.routes.clone(),
            tables,
        });
    }
    Ok(Catalog { sinks })
}

impl Catalog {
    /// The catalog as JSON (what `airlock catalog --json` prints).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The catalog as text tables: one summary line per table, then its columns.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        for sink in &self.sinks {
            let _ = writeln!(
                out,
                "sink {} ({}) routes: {}",
                sink.name,
                sink.url,
                sink.routes.join(", ")
            );
            if sink.tables.is_empty() {
                let _ = writeln!(out, "  (no tables yet)");
            }
            for t in &sink.tables {
                let rows = t.rows.map_or("?".into(), |r| r.to_string());
                let _ = writeln!(
                    out,
                    "\n  {}  version {}  rows {}  files {}  {} bytes",
                    printable(&t.name),
                    t.version,
                    rows,
                    t.files,
                    t.bytes
                );
                if let Some(lsn) = t.last_commit_info.get("airlock.lsn_range") {
                    let _ = writeln!(out, "  last commit LSNs {lsn}");
                }
                let width = t
                    .columns
                    .iter()
                    .map(|c| printable(&c.name).chars().count())
                    .max()
                    .unwrap_or(6)
                    .max(6);
                let type_width = t
                    .columns
                    .iter()
                    .map(|c| c.data_type.len())
                    .max()
                    .unwrap_or(4)
                    .max(4);
                let _ = writeln!(
                    out,
                    "    {:width$}  {:type_width$}  null  tags",
                    "column", "type"
                );
                for c in &t.columns {
                    let _ = writeln!(
                        out,
                        "    {:width$}  {:type_width$}  {:4}  {}",
                        printable(&c.name),
                        c.data_type,
                        if c.nullable { "yes" } else { "no" },
                        c.tags.join(", ")
                    );
                }
            }
        }
        out
    }
}

/// `name` with control characters escaped (`\n`, `\u{1b}`), so a name cannot forge
/// lines of the printed catalog.
fn printable(name: &str) -> String {
    if !name.chars().any(char::is_control) {
        return name.to_owned();
    }
    name.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
