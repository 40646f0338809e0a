//! Test guest `spin`: never finishes `process` on its own, so the host's epoch
//! deadline must interrupt it. The `mode` setting chooses how it holds on:
//!
//! - `loop` (the default): an endless loop of guest code;
//! - `sleep`: one `std::thread::sleep` of an hour, then the batch passes untouched
//!   (the host's clock must not let a sleep block the pipeline);
//! - `sleep-loop`: sleeps of one second, forever.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use airlock_guest::{Batch, Guest, PluginInfo};

struct Spin;

const LOOP: u8 = 0;
const SLEEP: u8 = 1;
const SLEEP_LOOP: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(LOOP);

impl Guest for Spin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-spin".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: never returns from process".into(),
        }
    }

    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in settings {
            match (key.as_str(), value.as_str()) {
                ("mode", "loop") => MODE.store(LOOP, Ordering::Relaxed),
                ("mode", "sleep") => MODE.store(SLEEP, Ordering::Relaxed),
                ("mode", "sleep-loop") => MODE.store(SLEEP_LOOP, Ordering::Relaxed),
                _ => {
                    return Err(format!(
                        "unknown setting {key} = {value:?}: expected mode = loop | sleep | sleep-loop"
                    ));
                }
            }
        }
        Ok(())
    }

    fn process(_batch: &Batch) -> Result<(), String> {
        match MODE.load(Ordering::Relaxed) {
            SLEEP => {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(())
            }
            SLEEP_LOOP => loop {
                std::thread::sleep(Duration::from_secs(1));
            },
            _ => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
        }
    }
}

airlock_guest::export!(Spin);
