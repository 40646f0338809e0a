//! `__NAME__`: replaces every value of the columns named in `columns` (default
//! `email`) with `[redacted]`, in the new and the old image. A starting point: it
//! reads and writes each column whole (`read-text-column`, `write-text-column`), one
//! host call per column and image, none per row.

wit_bindgen::generate!({
    path: "wit",
    world: "transform",
});

use std::cell::RefCell;

use airlock::transform::types::{Image, TextColumn};

/// `read-text-column`'s kind of an entry that holds a value (0 null, 1 unchanged).
const KIND_VALUE: u8 = 2;
const REDACTED: &[u8] = b"[redacted]";

thread_local! {
    static COLUMNS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "__NAME__".into(),
            version: "0.1.0".into(),
            description: "redacts the columns named in `columns`".into(),
        }
    }

    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        let mut columns = Vec::new();
        for (key, value) in settings {
            match key.as_str() {
                "columns" => columns.push(value),
                other => return Err(format!("unknown setting `{other}`; expected `columns`")),
            }
        }
        if columns.is_empty() {
            columns.push("email".into());
        }
        COLUMNS.with(|c| *c.borrow_mut() = columns);
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        let columns = COLUMNS.with(|c| c.borrow().clone());
        for (ti, table) in batch.tables().iter().enumerate() {
            for (ci, column) in table.columns.iter().enumerate() {
                if !columns.contains(&column.name) {
                    continue;
                }
                for image in [Image::New, Image::Old] {
                    let (ti, ci) = (ti as u32, ci as u32);
                    let values = batch.read_text_column(ti, ci, image);
                    if !values.kinds.contains(&KIND_VALUE) {
                        continue;
                    }
                    let mut out = TextColumn {
                        kinds: values.kinds,
                        data: Vec::new(),
                        offsets: vec![0],
                    };
                    for &kind in &out.kinds {
                        if kind == KIND_VALUE {
                            out.data.extend_from_slice(REDACTED);
                        }
                        out.offsets.push(out.data.len() as u32);
                    }
                    batch.write_text_column(ti, ci, image, &out);
                }
            }
        }
        Ok(())
    }
}

export!(Component);
