//! Helpers shared by the source tests (types, toast, schema, source_faults, snapshot):
//! a config with an empty plugin folder, and waiting for the slot.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};

/// A config streaming slot `slot` into a lake under `dir/lake`, with no guests;
/// `source_extra` is appended to `[source]`.
pub fn config(url: &str, dir: &Path, slot: &str, source_extra: &str) -> String {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).expect("create plugin dir");
    format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{url}\"\nslot = \"{slot}\"\nstatus_interval = \"1s\"\n{source_extra}\n\
         [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{plugins}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{lake}\"\nflush_interval = \"200ms\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        plugins = plugins.display(),
        lake = dir.join("lake").display()
    )
}

/// Waits until the host has created slot `slot`.
pub async fn wait_for_slot(db: &tokio_postgres::Client, slot: &str) -> Result<()> {
    for _ in 0..600 {
        if db
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .is_some()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("slot {slot} was not created within 30 s")
}
