//! A fuzzer for the pgoutput decoder that runs on stable Rust, for a bounded time.
//!
//! It starts from the golden fixtures (real messages captured from PostgreSQL, in
//! `tests/golden/pgoutput/`), mutates them — bit flips, interesting bytes, truncation,
//! extension, splices of two messages, duplicated or deleted runs, a swapped message
//! type byte, and corrupted length and count fields — and feeds each input to
//! [`airlock::source::pgoutput::decode`]. Inputs that decode are kept as new seeds.
//!
//! Every input must give one of two answers, and never a panic:
//! - a message whose tuples iterate to exactly their column count, or
//! - an error naming the message type (its first byte) and an offset inside the input.
//!
//! Run it longer with `cargo run --release -p airlock-tests --bin fuzz_pgoutput -- --secs 600`;
//! the test suite runs it for `AIRLOCK_FUZZ_SECS` (default 10).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use airlock::source::pgoutput::{DecodeError, Message, decode};

/// The message names the decoder uses, by type byte.
fn message_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => return None,
    })
}

/// A small deterministic PRNG (xorshift64*), so a run is reproducible from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Reads the golden fixtures: `(name, bytes)` for every `*.hex` in `dir`.
pub fn corpus(dir: &Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "hex") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let digits: String = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
            .collect();
        let bytes = hex::decode(&digits).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((name, bytes));
    }
    out.sort();
    Ok(out)
}

const INTERESTING_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'n', b'u', b't', b'b', b'N', b'K', b'O', b'd', b'f', b'i',
];
const INTERESTING_I32: &[i32] = &[0, 1, -1, 2, 255, 256, 0x7fff, 0xffff, i32::MAX, i32::MIN];
const INTERESTING_I16: &[i16] = &[0, 1, -1, 2, 1600, i16::MAX, i16::MIN];

/// One mutation of `input`; `other` is a second seed for splices.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut m = input.to_vec();
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let len = m.len();
        match rng.below(11) {
            // Flip one bit.
            0 if len > 0 => {
                let i = rng.below(len);
                m[i] ^= 1 << rng.below(8);
            }
            // An interesting byte.
            1 if len > 0 => {
                let i = rng.below(len);
                m[i] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
            }
            // A random byte.
            2 if len > 0 => {
                let i = rng.below(len);
                m[i] = rng.next_u64() as u8;
            }
            // Truncate.
            3 => m.truncate(rng.below(len + 1)),
            // Extend with random bytes.
            4 => {
                let n = 1 + rng.below(16);
                m.extend((0..n).map(|_| rng.next_u64() as u8));
            }
            // Splice: a prefix of this message, a suffix of another.
            5 => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                m.truncate(cut);
                m.extend_from_slice(&other[from..]);
            }
            // Duplicate a run.
            6 if len > 1 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                let run = m[start..end].to_vec();
                let at = rng.below(len + 1);
                m.splice(at..at, run);
            }
            // Delete a run.
            7 if len > 1 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                m.drain(start..end);
            }
            // Corrupt a 32-bit length, count or OID field.
            8 if len >= 5 => {
                let i = 1 + rng.below(len - 4);
                let v = if rng.below(2) == 0 {
                    INTERESTING_I32[rng.below(INTERESTING_I32.len())]
                } else {
                    // Off by a little from what is there.
                    let old = i32::from_be_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
                    old.wrapping_add(rng.below(9) as i32 - 4)
                };
                m[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            // Corrupt a 16-bit column count.
            9 if len >= 3 => {
                let i = 1 + rng.below(len - 2);
                let v = INTERESTING_I16[rng.below(INTERESTING_I16.len())];
                m[i..i + 2].copy_from_slice(&v.to_be_bytes());
            }
            // Another message type byte over the same body.
            10 if len > 0 => m[0] = b"BCORYIUDTMSEcA"[rng.below(14)],
            _ => {}
        }
    }
    m
}

/// Decodes `input` and checks the answer; `Err` describes a contract violation.
pub fn check(input: &[u8]) -> Result<bool, String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| match decode(input) {
        Ok(message) => {
            walk(&message)?;
            Ok(true)
        }
        Err(error) => check_error(input, &error).map(|()| false),
    }));
    match outcome {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(format!("the decoder panicked: {what}"))
        }
    }
}

/// Iterates every tuple of a decoded message.
fn walk(message: &Message<'_>) -> Result<(), String> {
    let tuples = match message {
        Message::Insert(i) => vec![i.new],
        Message::Update(u) => u.old.iter().map(|o| o.1).chain([u.new]).collect(),
        Message::Delete(d) => vec![d.old],
        Message::Relation(r) => {
            let relation = r.to_relation();
            if relation.columns.len() != r.columns.len() {
                return Err("a relation lost columns".into());
            }
            vec![]
        }
        _ => vec![],
    };
    for tuple in tuples {
        let n = tuple.iter().count();
        if n != tuple.len() {
            return Err(format!(
                "a tuple of {} columns iterated {n} values",
                tuple.len()
            ));
        }
    }
    Ok(())
}

/// Checks an error against the contract: it names the message type and an offset inside `input`.
pub fn check_error(input: &[u8], error: &DecodeError) -> Result<(), String> {
    let text = error.to_string();
    let Some(&tag) = input.first() else {
        return match error {
            DecodeError::Empty => Ok(()),
            _ => Err(format!("an empty input gave `{text}`")),
        };
    };
    let Some(name) = message_name(tag) else {
        return match error {
            DecodeError::UnknownType { byte } if *byte == tag => Ok(()),
            _ => Err(format!("type byte 0x{tag:02x} gave `{text}`")),
        };
    };
    let (message, offset) = match error {
        DecodeError::Truncated {
            message, offset, ..
        }
        | DecodeError::Invalid {
            message, offset, ..
        } => (*message, *offset),
        _ => return Err(format!("a {name} message gave `{text}`")),
    };
    if message != name {
        return Err(format!(
            "a {name} message was reported as {message}: `{text}`"
        ));
    }
    if offset == 0 || offset > input.len() {
        return Err(format!(
            "offset {offset} is outside the {}-byte body: `{text}`",
            input.len()
        ));
    }
    if !text.contains(name) || !text.contains(&format!("at offset {offset}")) {
        return Err(format!(
            "the error does not name the message and offset: `{text}`"
        ));
    }
    Ok(())
}

/// An input that broke the contract.
#[derive(Debug)]
pub struct Finding {
    pub input: Vec<u8>,
    pub problem: String,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub inputs: u64,
    pub decoded: u64,
    pub refused: u64,
    pub seeds: usize,
    pub findings: Vec<Finding>,
}

/// Fuzzes for `duration` from `seeds`; stops early after 10 findings.
pub fn run(seeds: &[(String, Vec<u8>)], duration: Duration, seed: u64) -> Report {
    let mut rng = Rng::new(seed);
    let mut pool: Vec<Vec<u8>> = seeds.iter().map(|(_, b)| b.clone()).collect();
    let mut report = Report::default();
    // Quiet the default hook: panics are caught and reported as findings.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let start = Instant::now();
    // The seeds themselves, and every prefix of each.
    let mut queue: Vec<Vec<u8>> = Vec::new();
    for s in &pool {
        for len in 0..=s.len() {
            queue.push(s[..len].to_vec());
        }
    }
    loop {
        let input = match queue.pop() {
            Some(input) => input,
            None => {
                if start.elapsed() >= duration || report.findings.len() >= 10 || pool.is_empty() {
                    break;
                }
                let a = &pool[rng.below(pool.len())];
                let b = &pool[rng.below(pool.len())];
                mutate(&mut rng, a, b)
            }
        };
        report.inputs += 1;
        match check(&input) {
            Ok(true) => {
                report.decoded += 1;
                // Keep new shapes that decode, up to a bound, as seeds for more mutation.
                if pool.len() < 4096 && rng.below(8) == 0 {
                    pool.push(input);
                }
            }
            Ok(false) => report.refused += 1,
            Err(problem) => report.findings.push(Finding { input, problem }),
        }
    }
    std::panic::set_hook(hook);
    report.seeds = pool.len();
    report
}
