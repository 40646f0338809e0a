//! Test guest `hog`: allocates memory without bound in `process` (1 MiB at a time,
//! every page touched), so the host's memory limit must stop it. When the limit
//! refuses to grow memory the allocation fails and the guest traps.

use airlock_guest::{Batch, Guest, PluginInfo};

const CHUNK: usize = 1 << 20;

struct Hog;

impl Guest for Hog {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-hog".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: allocates memory until the host stops it".into(),
        }
    }

    fn init(_settings: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(_batch: &Batch) -> Result<(), String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; CHUNK];
            for i in (0..CHUNK).step_by(4096) {
                chunk[i] = 1;
            }
            hoard.push(std::hint::black_box(chunk));
        }
    }
}

airlock_guest::export!(Hog);
