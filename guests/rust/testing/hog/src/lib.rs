//! Test guest `hog`: uses memory against the host.
//!
//! - `mode = grow` (default): allocates without bound in `process` (1 MiB at a time,
//!   every page touched), so the host's memory limit must stop it. When the limit
//!   refuses to grow memory the allocation fails and the guest traps.
//! - `mode = big-args`: builds one string of `mib` MiB (default 40) and passes it to
//!   the host call named by `call` (`log`, `column-index`, `add-route`, `tag-row`,
//!   `tag-column`, `annotate`, `set`, `write-column`, `write-text-column`,
//!   `hash-column`): the host must not copy it out of guest memory before it knows
//!   the call is allowed.
//! - `mode = hold`: builds the same string and a copy of it, as `set` does, and makes
//!   no call (the baseline).

use std::cell::Cell;

use airlock_guest::{Batch, Guest, Image, Level, PluginInfo, TextColumn, Value};

const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Grow,
    BigArgs,
    Hold,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Grow) };
    static MIB: Cell<usize> = const { Cell::new(40) };
    static CALL: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

struct Hog;

impl Guest for Hog {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-hog".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: allocates memory until the host stops it".into(),
        }
    }

    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in settings {
            match (key.as_str(), value.as_str()) {
                ("mode", "grow") => MODE.set(Mode::Grow),
                ("mode", "big-args") => MODE.set(Mode::BigArgs),
                ("mode", "hold") => MODE.set(Mode::Hold),
                ("mib", n) => MIB.set(n.parse().map_err(|e| format!("mib: {e}"))?),
                ("call", name) => CALL.with(|c| *c.borrow_mut() = name.to_owned()),
                (k, v) => return Err(format!("unknown setting {k} = {v}")),
            }
        }
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        match MODE.get() {
            Mode::Grow => grow(),
            mode => {
                let big = "x".repeat(MIB.get() * CHUNK);
                if mode == Mode::BigArgs {
                    big_args(batch, &big);
                } else {
                    // As much guest memory as the calls that copy the string use.
                    std::hint::black_box(big.clone());
                }
                std::hint::black_box(&big);
                Ok(())
            }
        }
    }
}

fn grow() -> Result<(), String> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; CHUNK];
        for i in (0..CHUNK).step_by(4096) {
            chunk[i] = 1;
        }
        hoard.push(std::hint::black_box(chunk));
    }
}

/// The host call `CALL` with `big` (a refused call traps the guest).
fn big_args(batch: &Batch, big: &str) {
    let rows = batch.rows_of(0).len();
    match CALL.with(|c| c.borrow().clone()).as_str() {
        "log" => airlock_guest::log(Level::Info, big),
        "column-index" => drop(batch.column_index(0, big)),
        "add-route" => batch.add_route(0, big),
        "tag-row" => batch.tag_row(0, big),
        "tag-column" => batch.tag_column(0, 0, big),
        "annotate" => batch.annotate(0, "big", big),
        "set" => batch.set(0, 0, Image::New, &Value::Text(big.to_owned())),
        "write-column" => {
            let values: Vec<Value> = (0..rows).map(|_| Value::Text(big.to_owned())).collect();
            batch.write_column(0, 0, Image::New, &values)
        }
        "write-text-column" => batch.write_text_column(
            0,
            0,
            Image::New,
            &TextColumn {
                kinds: vec![2; rows],
                offsets: (0..=rows).map(|i| (i * big.len()) as u32).collect(),
                data: big.as_bytes().repeat(rows),
            },
        ),
        "hash-column" => drop(batch.hash_column(0, 0, Image::New, big.as_bytes())),
        "rows-tagged" => drop(batch.rows_tagged(0, big)),
        "add-route-rows" => batch.add_route_rows(&[0], big),
        "tag-rows" => batch.tag_rows(&[0], big),
        "annotate-rows" => batch.annotate_rows(&[0], "big", big),
        "write-bytes-column" => batch.write_bytes_column(
            0,
            0,
            Image::New,
            &TextColumn {
                kinds: vec![2; rows],
                offsets: (0..=rows).map(|i| (i * big.len()) as u32).collect(),
                data: big.as_bytes().repeat(rows),
            },
        ),
        other => airlock_guest::log(Level::Error, &format!("unknown call {other}")),
    }
}

airlock_guest::export!(Hog);
