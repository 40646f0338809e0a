//! Test guest `fuzz`: calls every batch function with hostile arguments, chosen by a
//! seeded generator, so that the host's side of each call is fuzzed from inside a
//! real guest.
//!
//! Settings: `seed` (a whole number, default 1; each batch mixes in its first commit
//! LSN) and `calls` (how many calls, default 200). Indexes are mostly in range and
//! sometimes far out of it; strings are long, empty or full of control characters and
//! quotes; text columns have inconsistent kinds, offsets and data. A call the host refuses traps the guest, which is the
//! point: the host must refuse cleanly, keep the batch as it came, and never panic.

use std::cell::Cell;

use airlock_guest::{
    Batch, BoolColumn, FloatColumn, Guest, Image, IntColumn, Level, PluginInfo, Settings, TextColumn,
    Value, log,
};

thread_local! {
    static SEED: Cell<u64> = const { Cell::new(1) };
    static CALLS: Cell<u32> = const { Cell::new(200) };
}

struct Fuzz;

/// xorshift64*: small, seedable, good enough to pick arguments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// An index: mostly below `len`, now and then just past it or far out.
    fn index(&mut self, len: u32) -> u32 {
        match self.below(300) {
            0 => len,
            1 => u32::MAX,
            2 => len.wrapping_add(self.below(1000) as u32),
            _ => self.below(u64::from(len.max(1))) as u32,
        }
    }

    fn text(&mut self) -> String {
        const PIECES: &[&str] = &[
            "", "a", "\"", "'", "\\", "\n", "\r\n", "\u{0}", "\u{1b}[31m", "é", "😀", "%2F",
            "../", "default", "spine", "pii", "=", ".", " ",
        ];
        let mut out = String::new();
        let n = match self.below(10) {
            0 => 0,
            1 => 2000 + self.below(3000),
            _ => self.below(12),
        };
        for _ in 0..n {
            out.push_str(PIECES[self.below(PIECES.len() as u64) as usize]);
        }
        out
    }

    fn bytes(&mut self) -> Vec<u8> {
        let n = self.below(64) as usize;
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn image(&mut self) -> Image {
        if self.below(2) == 0 { Image::New } else { Image::Old }
    }

    fn value(&mut self) -> Value {
        match self.below(15) {
            0 => Value::Null,
            1 => Value::UnchangedToast,
            2 => Value::Boolean(self.below(2) == 0),
            3 => Value::Int(self.next() as i64),
            4 => Value::Float(f64::from_bits(self.next())),
            5 => Value::Numeric(self.text()),
            6 => Value::Text(self.text()),
            7 => Value::Bytes(self.bytes()),
            8 => Value::Date(self.next() as i32),
            9 => Value::Time(self.next() as i64),
            10 => Value::Timestamp(self.next() as i64),
            11 => Value::Timestamptz(self.next() as i64),
            12 => Value::Uuid((self.next(), self.next())),
            13 => Value::Json(self.text()),
            _ => Value::Other(self.text()),
        }
    }

    /// A text column for `rows` rows: usually well formed (values of any kind, at
    /// sorted offsets into the data, one per row and one past the end), sometimes with
    /// the wrong count, a kind out of range, unsorted or missing offsets.
    /// A row list for a bulk call: usually in range, sometimes out of it or longer
    /// than the batch.
    fn rows(&mut self, rows: u32) -> Vec<u32> {
        let n = match self.below(10) {
            0 => rows.saturating_mul(3).saturating_add(1),
            1 => 0,
            _ => self.below(u64::from(rows) + 1) as u32,
        }
        .min(10_000);
        (0..n).map(|_| self.index(rows)).collect()
    }

    /// `n` entries and a null bitmap for a typed column write, sometimes of the
    /// wrong size.
    fn typed<T>(&mut self, rows: u32, mut value: impl FnMut(&mut Self) -> T) -> (Vec<u8>, Vec<T>) {
        let n = if self.below(8) == 0 { self.index(rows) } else { rows }.min(10_000) as usize;
        let bytes = if self.below(8) == 0 { self.below(5) as usize } else { n.div_ceil(8) };
        let valid = (0..bytes).map(|_| self.next() as u8).collect();
        let values = (0..n).map(|_| value(self)).collect();
        (valid, values)
    }

    fn text_column(&mut self, rows: u32) -> TextColumn {
        let broken = self.below(8) == 0;
        let n = if broken && self.below(2) == 0 { self.index(rows) } else { rows } as usize;
        let n = n.min(10_000);
        let data = self.text().into_bytes();
        let kinds = (0..n)
            .map(|_| self.below(if broken { 6 } else { 3 }) as u8)
            .collect();
        let mut offsets: Vec<u32> = (0..=n)
            .map(|_| self.below(data.len() as u64 + u64::from(broken)) as u32)
            .collect();
        offsets.sort_unstable();
        if let Some(last) = offsets.last_mut() {
            *last = data.len() as u32;
        }
        if broken {
            match self.below(3) {
                0 => offsets.reverse(),
                1 => drop(offsets.pop()),
                _ => offsets.push(u32::MAX),
            }
        }
        TextColumn {
            kinds,
            data,
            offsets,
        }
    }
}

impl Guest for Fuzz {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "test-fuzz".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test guest: calls every batch function with hostile arguments".into(),
        }
    }

    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        let settings = Settings::new(settings);
        settings.deny_unknown(&["seed", "calls"])?;
        SEED.set(settings.parse_or("seed", 1u64)?.max(1));
        CALLS.set(settings.parse_or("calls", 200u32)?);
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        let rows = batch.len();
        // Each batch its own sequence: the seed mixed with the first commit LSN.
        let salt = if rows > 0 { batch.meta(0).commit_lsn } else { 0 };
        let mut rng = Rng((SEED.get() ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)).max(1));
        let tables = batch.tables();
        let ntables = tables.len() as u32;
        let columns = |t: u32| tables.get(t as usize).map_or(3, |t| t.columns.len() as u32);
        // A typed call on a column of its type, mostly: one of another type traps,
        // and a batch whose every call traps shows nothing about the accepted path.
        let typed = |rng: &mut Rng, table: u32, column: u32, types: &[&str]| -> u32 {
            let found = tables.get(table as usize).and_then(|t| {
                t.columns
                    .iter()
                    .position(|c| types.contains(&c.type_name.as_str()))
            });
            match found {
                Some(i) if rng.below(8) != 0 => i as u32,
                _ => column,
            }
        };
        const INTS: &[&str] = &["int2", "int4", "int8", "oid", "date", "time", "timestamp", "timestamptz"];
        const FLOATS: &[&str] = &["float4", "float8"];
        const BOOLS: &[&str] = &["bool"];
        for _ in 0..CALLS.get() {
            let table = rng.index(ntables);
            let column = rng.index(columns(table));
            let row = rng.index(rows);
            match rng.below(34) {
                0 => drop(batch.len()),
                1 => drop(batch.tables()),
                2 => drop(batch.column_index(table, &rng.text())),
                3 => drop(batch.rows_of(table)),
                4 => drop(batch.meta(row)),
                5 => drop(batch.get(row, column, rng.image())),
                6 => batch.set(row, column, rng.image(), &rng.value()),
                7 => drop(batch.read_column(table, column, rng.image())),
                8 => {
                    let n = if rng.below(30) == 0 { rng.index(rows) } else { rows };
                    let values: Vec<Value> = (0..n.min(10_000)).map(|_| rng.value()).collect();
                    batch.write_column(table, column, rng.image(), &values);
                }
                9 => drop(batch.read_text_column(table, column, rng.image())),
                10 => {
                    let text = rng.text_column(rows);
                    batch.write_text_column(table, column, rng.image(), &text);
                }
                11 => drop(batch.hash_column(table, column, rng.image(), &rng.bytes())),
                12 => batch.drop_row(row),
                13 => drop(batch.is_dropped(row)),
                14 => batch.add_route(row, &rng.text()),
                15 => drop(batch.routes(row)),
                16 => batch.tag_row(row, &rng.text()),
                17 => drop(batch.row_tags(row)),
                18 => batch.tag_column(table, column, &rng.text()),
                19 => batch.annotate(row, &rng.text(), &rng.text()),
                20 => drop(batch.identity(row)),
                21 => log(Level::Info, &rng.text()),
                22 => drop(batch.rows_tagged(table, &rng.text())),
                23 => batch.drop_rows(&rng.rows(rows)),
                24 => batch.add_route_rows(&rng.rows(rows), &rng.text()),
                25 => batch.tag_rows(&rng.rows(rows), &rng.text()),
                26 => batch.annotate_rows(&rng.rows(rows), &rng.text(), &rng.text()),
                27 => drop(batch.read_ints(table, typed(&mut rng, table, column, INTS), rng.image())),
                28 => {
                    let (valid, values) = rng.typed(rows, |r| r.next() as i64 >> r.below(64));
                    let column = typed(&mut rng, table, column, INTS);
                    batch.write_ints(table, column, rng.image(), &IntColumn { valid, values });
                }
                29 => drop(batch.read_floats(table, typed(&mut rng, table, column, FLOATS), rng.image())),
                30 => {
                    let (valid, values) = rng.typed(rows, |r| f64::from_bits(r.next()));
                    let column = typed(&mut rng, table, column, FLOATS);
                    batch.write_floats(table, column, rng.image(), &FloatColumn { valid, values });
                }
                31 => drop(batch.read_bools(table, typed(&mut rng, table, column, BOOLS), rng.image())),
                32 => {
                    let (valid, values) = rng.typed(rows, |r| r.below(2) == 0);
                    let column = typed(&mut rng, table, column, BOOLS);
                    batch.write_bools(table, column, rng.image(), &BoolColumn { valid, values });
                }
                _ => {
                    let bytes = rng.text_column(rows);
                    batch.write_bytes_column(table, column, rng.image(), &bytes);
                }
            }
        }
        Ok(())
    }
}

airlock_guest::export!(Fuzz);
