//! Where a lake's tables are and how they are reached: the sink's settings (with the
//! defaults its configuration falls back on), the object store's options, and a
//! table's URL and handle.

use std::collections::HashMap;
use std::sync::Once;
use std::time::Duration;

use deltalake::{DeltaTable, DeltaTableBuilder};

use super::error::LakeError;
use super::naming;
use crate::pipeline::batch::BatchRow;

/// Settings of one lake sink, validated by the config layer.
#[derive(Clone, Debug)]
pub struct LakeSettings {
    /// The sink's name in the configuration (`[sinks.NAME]`), used in logs and errors.
    pub name: String,
    /// Where the tables live: `file:///abs/path` or `s3://bucket/prefix`.
    pub url: String,
    /// Routes this sink takes; a row without routes takes `default`.
    pub routes: Vec<String>,
    /// How long accepted rows may wait before a flush.
    pub flush_interval: Duration,
    /// Flush when this many rows are buffered.
    pub max_rows: usize,
    /// Flush when about this many bytes of values are buffered.
    pub max_bytes: usize,
    /// The Delta application-transaction id, e.g. `airlock:<slot>`.
    pub app_id: String,
    /// Options for the object store (`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...). For
    /// `s3://`, [`LakeSettings::STORE_TIMEOUTS`] are added unless set here.
    pub storage_options: HashMap<String, String>,
    /// Static entries added to every commit's info (source database, slot, ...).
    pub commit_info: serde_json::Map<String, serde_json::Value>,
    /// Compaction, checkpoints and vacuum.
    pub maintenance: Maintenance,
}

impl LakeSettings {
    pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_MAX_ROWS: usize = 100_000;
    pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
    /// Object store request timeouts for `s3://` lakes, unless `storage_options` sets
    /// them: a request to a store that stopped answering fails (and is retried, then
    /// the flush) instead of holding the flush, and every table behind it, forever.
    pub const STORE_TIMEOUTS: [(&str, &str); 2] = [("timeout", "30s"), ("connect_timeout", "5s")];

    /// Settings with the defaults: route `default`, 5 s, 100 000 rows, 64 MiB.
    pub fn new(
        name: impl Into<String>,
        url: impl Into<String>,
        app_id: impl Into<String>,
    ) -> LakeSettings {
        LakeSettings {
            name: name.into(),
            url: url.into(),
            routes: vec![BatchRow::DEFAULT_ROUTE.to_owned()],
            flush_interval: Self::DEFAULT_FLUSH_INTERVAL,
            max_rows: Self::DEFAULT_MAX_ROWS,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            app_id: app_id.into(),
            storage_options: HashMap::new(),
            commit_info: serde_json::Map::new(),
            maintenance: Maintenance::default(),
        }
    }

    /// The object store options: `storage_options`, with [`Self::STORE_TIMEOUTS`] for
    /// `s3://` where they are not set (keys compare without case, as the store does).
    pub(super) fn store_options(&self) -> HashMap<String, String> {
        let mut options = self.storage_options.clone();
        let url = self.url.trim_start();
        if url.starts_with("s3://") || url.starts_with("s3a://") {
            for (key, value) in Self::STORE_TIMEOUTS {
                if !options.keys().any(|k| k.eq_ignore_ascii_case(key)) {
                    options.insert(key.to_owned(), value.to_owned());
                }
            }
        }
        options
    }
}

/// The URL of the table in directory `dir` (from [`naming::table_dir`] or a listing of
/// the root) under the lake at `root`.
pub(super) fn table_url(root: &str, dir: &str) -> String {
    format!(
        "{}/{}",
        root.trim_end_matches('/'),
        naming::dir_segment(dir)
    )
}

/// When and how a lake sink maintains its tables.
#[derive(Clone, Debug)]
pub struct Maintenance {
    /// Compact a table when it has more than this many small files.
    pub compact_min_files: usize,
    /// A file smaller than this is small.
    pub small_file_bytes: u64,
    /// Compaction merges small files into files of about this size.
    pub target_file_bytes: u64,
    /// Write a Delta checkpoint every this many commits.
    pub checkpoint_interval: u64,
    /// Files removed by compaction are deleted this long after their removal.
    pub vacuum_retention: Duration,
}

impl Maintenance {
    pub const DEFAULT_COMPACT_MIN_FILES: usize = 32;
    pub const DEFAULT_SMALL_FILE_BYTES: u64 = 16 << 20;
    pub const DEFAULT_TARGET_FILE_BYTES: u64 = 128 << 20;
    pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 10;
    pub const DEFAULT_VACUUM_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
    /// How often the writer vacuums a table it writes.
    pub const VACUUM_EVERY: Duration = Duration::from_secs(3600);
    /// A lock older than this is taken to be left by a crashed compactor. A lock whose
    /// holder ran on this machine in this boot is taken over as soon as that process
    /// is gone.
    pub const LOCK_STALE_AFTER: Duration = Duration::from_secs(3600);
}

impl Default for Maintenance {
    fn default() -> Maintenance {
        Maintenance {
            compact_min_files: Self::DEFAULT_COMPACT_MIN_FILES,
            small_file_bytes: Self::DEFAULT_SMALL_FILE_BYTES,
            target_file_bytes: Self::DEFAULT_TARGET_FILE_BYTES,
            checkpoint_interval: Self::DEFAULT_CHECKPOINT_INTERVAL,
            vacuum_retention: Self::DEFAULT_VACUUM_RETENTION,
        }
    }
}

/// A handle on the Delta table at `location` (not loaded yet), for table `name`.
pub(super) fn table_handle(
    location: &str,
    name: &str,
    settings: &LakeSettings,
) -> Result<DeltaTable, LakeError> {
    let url = deltalake::ensure_table_uri(location)
        .map_err(LakeError::delta(name, "resolving the table location"))?;
    DeltaTableBuilder::from_url(url)
        .and_then(|b| b.with_storage_options(settings.store_options()).build())
        .map_err(LakeError::delta(name, "opening the table"))
}

/// Registers deltalake's S3 handlers, once per process, before an `s3://` table is
/// opened.
pub(super) fn register_s3() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| deltalake::aws::register_handlers(None));
}
