//! Test guest `old_contract`: a harmless guest built against a copy of the WIT whose
//! package version is `0.0.9` (`wit/transform.wit`, nothing else changed), so the
//! host can show that it refuses a guest built for another contract version.

wit_bindgen::generate!({
    path: "wit",
    world: "transform",
});

struct OldContract;

impl Guest for OldContract {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-old-contract".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: built for airlock:transform@0.0.9".into(),
        }
    }

    fn init(_settings: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(_batch: &Batch) -> Result<(), String> {
        Ok(())
    }
}

export!(OldContract);
