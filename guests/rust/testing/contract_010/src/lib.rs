//! Test guest `contract_010`: built against `wit/transform.wit`, a frozen copy of the
//! contract as it was released at `0.1.0`, so the host can show that a guest built
//! against an earlier `0.1.x` keeps working beside guests built against the newest.
//!
//! For every row with an `email` column it prefixes the new image's value with
//! `v010:` (`get`/`set`), tags the row `pii` (`tag-row`) and annotates it with
//! `contract` = `0.1.0`: calls that exist since 0.1.0.

wit_bindgen::generate!({
    path: "wit",
    world: "transform",
});

use airlock::transform::types::{Image, Value};

struct Contract010;

impl Guest for Contract010 {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-contract-010".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: built against airlock:transform@0.1.0".into(),
        }
    }

    fn init(_settings: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        for (ti, _) in batch.tables().iter().enumerate() {
            let ti = ti as u32;
            let Some(ci) = batch.column_index(ti, "email") else {
                continue;
            };
            for row in batch.rows_of(ti) {
                if let Value::Text(email) = batch.get(row, ci, Image::New) {
                    batch.set(row, ci, Image::New, &Value::Text(format!("v010:{email}")));
                }
                batch.tag_row(row, "pii");
                batch.annotate(row, "contract", "0.1.0");
            }
        }
        Ok(())
    }
}

export!(Contract010);
