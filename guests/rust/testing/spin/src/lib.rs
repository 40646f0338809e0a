//! Test guest `spin`: loops forever in `process`, so the host's epoch deadline
//! must interrupt it.

use airlock_guest::{Batch, Guest, PluginInfo};

struct Spin;

impl Guest for Spin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-spin".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: never returns from process".into(),
        }
    }

    fn init(_settings: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(_batch: &Batch) -> Result<(), String> {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

airlock_guest::export!(Spin);
