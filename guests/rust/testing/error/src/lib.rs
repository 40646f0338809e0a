//! Test guest `error`: `process` always returns an error; `init` refuses the
//! settings when `refuse` = "yes". The optional `message` replaces the error text.

use std::cell::RefCell;

use airlock_guest::{Batch, Guest, PluginInfo, Settings};

thread_local! {
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

struct Error;

impl Guest for Error {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-error".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: fails every batch with an error (and init on request)".into(),
        }
    }

    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        let settings = Settings::new(settings);
        settings.deny_unknown(&["refuse", "message"])?;
        if settings.get("refuse").map(str::trim) == Some("yes") {
            return Err("refusing settings: refuse = \"yes\"".into());
        }
        MESSAGE.with(|m| *m.borrow_mut() = settings.get("message").map(str::to_string));
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        Err(MESSAGE.with(|m| m.borrow().clone()).unwrap_or_else(|| {
            format!(
                "test-error: failing a batch of {} rows on purpose",
                batch.len()
            )
        }))
    }
}

airlock_guest::export!(Error);
