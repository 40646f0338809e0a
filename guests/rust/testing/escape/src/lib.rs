//! Test guest `escape`: tries to leave the sandbox and reports what happened, never
//! trapping. In every batch it reads `/etc/passwd`, counts environment variables and
//! arguments, connects to 127.0.0.1:5432 and reads the wall clock, then annotates
//! every row:
//!
//! - `escape.fs`: the error text, or `read N bytes`;
//! - `escape.env`: the number of environment variables;
//! - `escape.args`: the number of arguments;
//! - `escape.net`: the error text, or `connected`;
//! - `escape.clock`: microseconds since the Unix epoch, or the error text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock_guest::{Batch, Guest, Level, PluginInfo, log};

struct Escape;

fn attempts() -> [(&'static str, String); 5] {
    let fs = match std::fs::read("/etc/passwd") {
        Ok(bytes) => format!("read {} bytes", bytes.len()),
        Err(e) => e.to_string(),
    };
    let env = std::env::vars_os().count().to_string();
    let args = std::env::args_os().count().to_string();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 5432));
    let net = match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        Ok(_) => "connected".to_string(),
        Err(e) => e.to_string(),
    };
    let clock = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros().to_string(),
        Err(e) => e.to_string(),
    };
    [
        ("escape.fs", fs),
        ("escape.env", env),
        ("escape.args", args),
        ("escape.net", net),
        ("escape.clock", clock),
    ]
}

impl Guest for Escape {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-escape".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: tries the filesystem, environment, network and clock, and annotates what happened".into(),
        }
    }

    fn init(_settings: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        let results = attempts();
        let summary: Vec<String> = results.iter().map(|(k, v)| format!("{k}={v}")).collect();
        log(Level::Info, &summary.join(" "));
        for row in 0..batch.len() {
            for (key, value) in &results {
                batch.annotate(row, key, value);
            }
        }
        Ok(())
    }
}

airlock_guest::export!(Escape);
