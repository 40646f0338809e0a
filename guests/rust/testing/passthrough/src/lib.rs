//! Test guest `passthrough`: moves every value across the boundary both ways and
//! changes nothing. For every table and column, both images go out with
//! `read-column` and back with `write-column`; for the first row of each table every
//! column of both images also goes out with `get` and back with `set`. Tags nothing.
//! With `identity = "annotate"`, annotates every row with who made it (`identity`):
//! `identity.session_user`, `identity.role`, `identity.actor`, or `identity.none`.
//! With `typed = "true"`, integer, float and boolean columns (and `bytea`) go out and
//! back through the typed bulk calls instead (`read-ints` / `write-ints`, ...,
//! `read-text-column` / `write-bytes-column`), and every row is annotated
//! `typed.COLUMN` with what the typed read gave for its new image (`null` when clear).

use std::sync::atomic::{AtomicBool, Ordering};

use airlock_guest::{Batch, Column, Guest, Image, PluginInfo, Settings, is_valid};

struct Passthrough;

static ANNOTATE_IDENTITY: AtomicBool = AtomicBool::new(false);
static TYPED: AtomicBool = AtomicBool::new(false);

/// What a typed read gave for entry `i`, as the annotation shows it.
fn shown<T: std::fmt::Debug>(valid: &[u8], values: &[T], i: usize) -> String {
    if is_valid(valid, i) {
        format!("{:?}", values[i])
    } else {
        "null".into()
    }
}

/// Moves column `ci` out and back through its typed bulk call; false when the column
/// has no typed call.
fn typed_round_trip(batch: &Batch, ti: u32, ci: u32, column: &Column) -> bool {
    let rows = batch.rows_of(ti);
    let name = format!("typed.{}", column.name);
    match column.type_name.as_str() {
        "int2" | "int4" | "int8" | "oid" | "date" | "time" | "timestamp" | "timestamptz" => {
            for image in [Image::New, Image::Old] {
                let c = batch.read_ints(ti, ci, image);
                if image == Image::New {
                    for (i, &row) in rows.iter().enumerate() {
                        batch.annotate(row, &name, &shown(&c.valid, &c.values, i));
                    }
                }
                batch.write_ints(ti, ci, image, &c);
            }
        }
        "float4" | "float8" => {
            for image in [Image::New, Image::Old] {
                let c = batch.read_floats(ti, ci, image);
                if image == Image::New {
                    for (i, &row) in rows.iter().enumerate() {
                        batch.annotate(row, &name, &shown(&c.valid, &c.values, i));
                    }
                }
                batch.write_floats(ti, ci, image, &c);
            }
        }
        "bool" => {
            for image in [Image::New, Image::Old] {
                let c = batch.read_bools(ti, ci, image);
                if image == Image::New {
                    for (i, &row) in rows.iter().enumerate() {
                        batch.annotate(row, &name, &shown(&c.valid, &c.values, i));
                    }
                }
                batch.write_bools(ti, ci, image, &c);
            }
        }
        "bytea" => {
            for image in [Image::New, Image::Old] {
                let c = batch.read_text_column(ti, ci, image);
                batch.write_bytes_column(ti, ci, image, &c);
            }
        }
        _ => return false,
    }
    true
}

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
        TYPED.store(settings.get("typed") == Some("true"), Ordering::Relaxed);
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        for (ti, table) in batch.tables().iter().enumerate() {
            let ti = ti as u32;
            let columns = table.columns.len() as u32;
            for ci in 0..columns {
                if TYPED.load(Ordering::Relaxed)
                    && typed_round_trip(batch, ti, ci, &table.columns[ci as usize])
                {
                    continue;
                }
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
