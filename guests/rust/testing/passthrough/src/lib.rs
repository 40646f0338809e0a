//! Test guest `passthrough`: moves every value across the boundary both ways and
//! changes nothing. For every table and column, both images go out with
//! `read-column` and back with `write-column`; for the first row of each table every
//! column of both images also goes out with `get` and back with `set`. Tags nothing.
//! With `identity = "annotate"`, annotates every row with who made it (`identity`):
//! `identity.session_user`, `identity.role`, `identity.actor`, or `identity.none`.

use std::sync::atomic::{AtomicBool, Ordering};

use airlock_guest::{Batch, Guest, Image, PluginInfo, Settings};

struct Passthrough;

static ANNOTATE_IDENTITY: AtomicBool = AtomicBool::new(false);

impl Guest for Passthrough {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-passthrough".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: reads and writes back every value, changing nothing".into(),
        }
    }

    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        let settings = Settings::new(settings);
        ANNOTATE_IDENTITY.store(
            settings.get("identity") == Some("annotate"),
            Ordering::Relaxed,
        );
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        for (ti, table) in batch.tables().iter().enumerate() {
            let ti = ti as u32;
            let columns = table.columns.len() as u32;
            for ci in 0..columns {
                for image in [Image::New, Image::Old] {
                    let values = batch.read_column(ti, ci, image);
                    batch.write_column(ti, ci, image, &values);
                }
            }
            if ANNOTATE_IDENTITY.load(Ordering::Relaxed) {
                for row in batch.rows_of(ti) {
                    match batch.identity(row) {
                        Some(who) => {
                            batch.annotate(row, "identity.session_user", &who.session_user);
                            batch.annotate(row, "identity.role", who.role.as_deref().unwrap_or(""));
                            batch.annotate(
                                row,
                                "identity.actor",
                                who.actor.as_deref().unwrap_or(""),
                            );
                        }
                        None => batch.annotate(row, "identity.none", "true"),
                    }
                }
            }
            if let Some(&row) = batch.rows_of(ti).first() {
                for ci in 0..columns {
                    for image in [Image::New, Image::Old] {
                        let value = batch.get(row, ci, image);
                        batch.set(row, ci, image, &value);
                    }
                }
            }
        }
        Ok(())
    }
}

airlock_guest::export!(Passthrough);
