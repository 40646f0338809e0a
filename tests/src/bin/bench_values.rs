//! What airlock spends per value turning pgoutput's text into typed values, beside what
//! decoding PostgreSQL's binary form of the same values would take, per type of the
//! drain benchmark's table, measured side by side in one run.
//!
//! Both forms come from a throwaway PostgreSQL: `x::text` (what pgoutput sends as
//! text) and `typsend(x)` (what it sends with `binary = true`), for 100,000 rows of
//! the drain's values. The text side is airlock's own `change::text::parse_value`. The
//! binary side is a decoder written here for the measurement only (airlock does not
//! ask for binary values): fixed-width integers and floats, booleans, timestamps
//! (microseconds since 2000 moved to the Unix epoch), UTF-8 text, and `numeric`
//! (base-10000 digits into its exact decimal text, the form airlock keeps).
//!
//! usage: cargo run --release -p airlock-tests --bin bench_values [-- --rows N]

use std::hint::black_box;
use std::time::Instant;

use airlock::change::text::parse_value;
use airlock::change::{Column, PG_EPOCH_OFFSET_MICROS};
use airlock::demo::Cluster;
use anyhow::{Context, Result, bail};

/// A column of the drain's table: name, type OID, type modifier, SQL of its value.
const COLUMNS: &[(&str, u32, i32, &str, &str)] = &[
    ("id", 20, -1, "g::bigint", "int8send"),
    ("name", 25, -1, "'Customer ' || g", "textsend"),
    (
        "balance",
        1700,
        (12 << 16) + 2 + 4,
        "((g * 7 % 100000) + (g % 100) / 100.0)::numeric(12,2)",
        "numeric_send",
    ),
    ("active", 16, -1, "g % 10 <> 0", "boolsend"),
    ("visits", 23, -1, "(g % 1000)::int4", "int4send"),
    ("score", 701, -1, "(g * 0.25)::float8", "float8send"),
    (
        "signed_up",
        1184,
        -1,
        "timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second'",
        "timestamptz_send",
    ),
];

/// A binary value decoded: only so that the work is not optimized away.
#[derive(Debug)]
enum Decoded {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Micros(i64),
}

fn be8(b: &[u8]) -> Result<[u8; 8]> {
    b.try_into().context("expected 8 bytes")
}

fn decode_binary(type_oid: u32, b: &[u8]) -> Result<Decoded> {
    Ok(match type_oid {
        20 => Decoded::Int(i64::from_be_bytes(be8(b)?)),
        23 => Decoded::Int(i64::from(i32::from_be_bytes(
            b.try_into().context("expected 4 bytes")?,
        ))),
        16 => Decoded::Bool(b == [1]),
        701 => Decoded::Float(f64::from_be_bytes(be8(b)?)),
        1184 => Decoded::Micros(i64::from_be_bytes(be8(b)?) + PG_EPOCH_OFFSET_MICROS),
        25 => Decoded::Text(std::str::from_utf8(b)?.to_owned()),
        1700 => Decoded::Text(numeric_text(b)?),
        other => bail!("no binary decoder for type {other}"),
    })
}

/// PostgreSQL's binary `numeric` (ndigits, weight, sign, dscale, base-10000 digits)
/// as its exact decimal text.
fn numeric_text(b: &[u8]) -> Result<String> {
    let word = |i: usize| -> Result<i16> {
        Ok(i16::from_be_bytes(
            b.get(i..i + 2).context("truncated numeric")?.try_into()?,
        ))
    };
    let (ndigits, weight, sign, dscale) = (word(0)?, word(2)?, word(4)? as u16, word(6)?);
    if sign == 0xC000 {
        return Ok("NaN".into());
    }
    let digit = |group: i16| -> Result<u16> {
        if group < 0 || group >= ndigits {
            return Ok(0);
        }
        Ok(word(8 + 2 * group as usize)? as u16)
    };
    // Four decimal digits of a base-10000 group, into `out`.
    let push4 = |out: &mut String, d: u16| {
        for div in [1000, 100, 10, 1] {
            out.push(char::from(b'0' + (d / div % 10) as u8));
        }
    };
    let mut out = String::with_capacity(24);
    if sign == 0x4000 {
        out.push('-');
    }
    // The integer part: groups 0..=weight, the first without leading zeros.
    if weight < 0 {
        out.push('0');
    } else {
        let mut first = String::with_capacity(4);
        push4(&mut first, digit(0)?);
        out.push_str(first.trim_start_matches('0'));
        if first.trim_start_matches('0').is_empty() {
            out.push('0');
        }
        for group in 1..=weight {
            push4(&mut out, digit(group)?);
        }
    }
    if dscale > 0 {
        out.push('.');
        let start = out.len();
        let mut group = weight + 1;
        while ((out.len() - start) as i16) < dscale {
            push4(&mut out, digit(group)?);
            group += 1;
        }
        out.truncate(start + dscale as usize);
    }
    Ok(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut rows: i64 = 100_000;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, n] = args.as_slice()
        && flag == "--rows"
    {
        rows = n
            .replace(['_', ','], "")
            .parse()
            .context("--rows takes a number")?;
    }
    let cluster = Cluster::start("").context("cannot start PostgreSQL")?;
    let client = cluster.connect("postgres").await?;
    println!("per value, {rows} values of each type of the drain's table, text beside binary\n");
    println!(
        "{:<10} {:<12} {:>14} {:>16} {:>7}",
        "column", "type", "text ns/value", "binary ns/value", "ratio"
    );
    let (mut text_total, mut binary_total) = (0.0, 0.0);
    for &(name, type_oid, type_modifier, sql, send) in COLUMNS {
        let query =
            format!("SELECT ({sql})::text, {send}({sql}) FROM generate_series(1, {rows}) g");
        let fetched = client.query(&query, &[]).await?;
        let texts: Vec<String> = fetched.iter().map(|r| r.get(0)).collect();
        let binaries: Vec<Vec<u8>> = fetched.iter().map(|r| r.get(1)).collect();
        let column = Column {
            name: name.into(),
            type_oid,
            type_modifier,
            key: false,
        };
        // Both sides must agree on every value before either is timed.
        for (text, binary) in texts.iter().zip(&binaries) {
            let from_text =
                parse_value(&column, text.as_bytes()).with_context(|| format!("{name}: {text}"))?;
            let from_binary = decode_binary(type_oid, binary)?;
            let same = match (&from_text, &from_binary) {
                (airlock::change::Value::Numeric(t), Decoded::Text(b)) => t == b,
                (airlock::change::Value::Text(t), Decoded::Text(b)) => t == b,
                (airlock::change::Value::Int(t), Decoded::Int(b)) => t == b,
                (airlock::change::Value::Float(t), Decoded::Float(b)) => t.to_bits() == b.to_bits(),
                (airlock::change::Value::Bool(t), Decoded::Bool(b)) => t == b,
                (airlock::change::Value::Timestamptz(t), Decoded::Micros(b)) => t == b,
                _ => false,
            };
            if !same {
                bail!("{name}: text {text} gave {from_text:?}, binary gave {from_binary:?}");
            }
        }
        let best = |f: &dyn Fn()| {
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_nanos() as f64 / rows as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        let text_ns = best(&|| {
            for text in &texts {
                black_box(parse_value(&column, black_box(text.as_bytes())).ok());
            }
        });
        let binary_ns = best(&|| {
            for binary in &binaries {
                black_box(decode_binary(type_oid, black_box(binary)).ok());
            }
        });
        text_total += text_ns;
        binary_total += binary_ns;
        let type_name = airlock::change::text::type_name(type_oid);
        println!(
            "{name:<10} {type_name:<12} {text_ns:>14.1} {binary_ns:>16.1} {:>7.2}",
            binary_ns / text_ns
        );
    }
    println!(
        "{:<10} {:<12} {text_total:>14.1} {binary_total:>16.1} {:>7.2}",
        "a row",
        "(7 columns)",
        binary_total / text_total
    );
    Ok(())
}
