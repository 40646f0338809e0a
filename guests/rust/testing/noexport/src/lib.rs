//! Test guest `noexport`: built against a copy of the `transform` world
//! (`wit/transform.wit`, version 0.1.0) that lacks the `process` export, so the
//! component exports only `info` and `init` and the host must refuse it by name.

wit_bindgen::generate!({
    path: "wit",
    world: "transform",
});

struct NoExport;

impl Guest for NoExport {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-noexport".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: has no process export".into(),
        }
    }

    fn init(_settings: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }
}

export!(NoExport);
