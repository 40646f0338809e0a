//! Test guest `trap`: traps (panics; `panic = "abort"` makes that a Wasm trap) in
//! `process`, as the setting `trap` says:
//!
//! - `never` (default): does nothing;
//! - `always`: on every call;
//! - `second-call`: on the second call in an instance only: the first batch passes, the
//!   second traps, and its retry on a fresh instance (a first call again) passes;
//! - `row-value`: on a row whose column `column` (default `name`, new image) has the
//!   text `value` in either image.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering};

use airlock_guest::{Batch, Guest, Image, PluginInfo, Settings, value_text};

static CALLS: AtomicU32 = AtomicU32::new(0);

thread_local! {
    static SETTINGS: RefCell<Settings> = RefCell::new(Settings::default());
}

struct Trap;

impl Guest for Trap {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-trap".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description:
                "test guest: traps in process (always, on an instance's second call, or on a row value)".into(),
        }
    }

    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        let settings = Settings::new(settings);
        settings.deny_unknown(&["trap", "column", "value"])?;
        match settings.get_or("trap", "never") {
            "never" | "always" | "second-call" => {}
            "row-value" if settings.contains("value") => {}
            "row-value" => {
                return Err("setting `trap` = \"row-value\" needs setting `value`".into());
            }
            other => {
                return Err(format!(
                    "setting `trap` = {other:?}: expected never, always, second-call or row-value"
                ));
            }
        }
        SETTINGS.with(|s| *s.borrow_mut() = settings);
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        SETTINGS.with(|s| {
            let s = s.borrow();
            match s.get_or("trap", "never") {
                "always" => panic!("test-trap: trap = always"),
                "second-call" if call == 1 => {
                    panic!("test-trap: trap = second-call, second call in this instance")
                }
                "row-value" => {
                    let column = s.get_or("column", "name");
                    let wanted = s.get_or("value", "");
                    let mut text = String::new();
                    for (ti, _) in batch.tables().iter().enumerate() {
                        let Some(ci) = batch.column_index(ti as u32, column) else {
                            continue;
                        };
                        for image in [Image::New, Image::Old] {
                            for value in batch.read_column(ti as u32, ci, image) {
                                text.clear();
                                if value_text(&value, &mut text) && text == wanted {
                                    panic!("test-trap: row with {column} = {wanted:?}");
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        });
        Ok(())
    }
}

airlock_guest::export!(Trap);
