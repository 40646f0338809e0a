//! `filter`: drops rows by table pattern and by a predicate on one column.
//!
//! Per table: a dropped table's rows are dropped without reading a value; otherwise
//! the predicate column is read once (`read-column`, new image) and rows that do not
//! match are dropped. `meta` is asked only for rows whose new value is `null`, to tell
//! a real `NULL` from a missing new image (DELETE, TRUNCATE).

use std::cell::RefCell;
use std::cmp::Ordering;

use airlock_guest::{
    Batch, Guest, Image, Op, PluginInfo, Settings, TablePatterns, Value, value_text,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum PredOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    IsNull,
    NotNull,
    Contains,
    Prefix,
}

const OPS: &str = "eq, ne, lt, le, gt, ge, is_null, not_null, contains, prefix";

impl PredOp {
    fn parse(text: &str) -> Option<PredOp> {
        Some(match text.trim() {
            "eq" => PredOp::Eq,
            "ne" => PredOp::Ne,
            "lt" => PredOp::Lt,
            "le" => PredOp::Le,
            "gt" => PredOp::Gt,
            "ge" => PredOp::Ge,
            "is_null" => PredOp::IsNull,
            "not_null" => PredOp::NotNull,
            "contains" => PredOp::Contains,
            "prefix" => PredOp::Prefix,
            _ => return None,
        })
    }
}

/// `where.value`, parsed once at `init` into every form a column might need.
#[derive(Debug, Default)]
struct Comparand {
    text: String,
    bytes: Vec<u8>,
    int: Option<i64>,
    float: Option<f64>,
    boolean: Option<bool>,
    /// Days since 1970-01-01 (`date`).
    days: Option<i32>,
    /// Microseconds since midnight (`time`).
    time: Option<i64>,
    /// Microseconds since the Unix epoch (`timestamp`, `timestamptz`).
    micros: Option<i64>,
    uuid: Option<(u64, u64)>,
}

impl Comparand {
    fn new(text: &str) -> Comparand {
        let t = text.trim();
        let int = t.parse::<i64>().ok();
        let days = match int {
            Some(i) => i32::try_from(i).ok(),
            None => parse_date(t),
        };
        Comparand {
            text: text.to_string(),
            bytes: t
                .strip_prefix("\\x")
                .and_then(parse_hex)
                .unwrap_or_else(|| text.as_bytes().to_vec()),
            int,
            float: t.parse::<f64>().ok(),
            boolean: match t.to_ascii_lowercase().as_str() {
                "true" | "t" | "yes" | "on" | "1" => Some(true),
                "false" | "f" | "no" | "off" | "0" => Some(false),
                _ => None,
            },
            days,
            time: int.or_else(|| parse_time(t)),
            micros: int.or_else(|| parse_timestamp(t)),
            uuid: parse_uuid(t),
        }
    }
}

struct Predicate {
    column: String,
    op: PredOp,
    value: Comparand,
}

struct Config {
    drop_tables: TablePatterns,
    keep_tables: TablePatterns,
    predicate: Option<Predicate>,
    scratch: String,
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

impl Config {
    fn from_settings(s: &Settings) -> Result<Config, String> {
        s.deny_unknown(&[
            "drop_tables",
            "keep_tables",
            "where.column",
            "where.op",
            "where.value",
        ])?;
        let predicate = match (
            s.get("where.column"),
            s.get("where.op"),
            s.get("where.value"),
        ) {
            (None, None, None) => None,
            (None, _, _) => {
                return Err(
                    "setting `where.op` or `where.value` given without `where.column`".into(),
                );
            }
            (Some(column), op, value) => {
                let op = match op {
                    None => PredOp::Eq,
                    Some(o) => PredOp::parse(o).ok_or_else(|| {
                        format!("setting `where.op` = {o:?}: expected one of {OPS}")
                    })?,
                };
                let needs_value = !matches!(op, PredOp::IsNull | PredOp::NotNull);
                let value = match (needs_value, value) {
                    (true, None) => {
                        return Err(format!(
                            "setting `where.value` is missing: `where.op` = {op:?} compares the column with it"
                        ));
                    }
                    (false, Some(v)) => {
                        return Err(format!(
                            "setting `where.value` = {v:?} is not used by `where.op` = {op:?}; remove it"
                        ));
                    }
                    (_, v) => Comparand::new(v.unwrap_or("")),
                };
                Some(Predicate {
                    column: column.trim().to_string(),
                    op,
                    value,
                })
            }
        };
        Ok(Config {
            drop_tables: TablePatterns::new(s.get_all("drop_tables")),
            keep_tables: TablePatterns::new(s.get_all("keep_tables")),
            predicate,
            scratch: String::new(),
        })
    }

    fn process(&mut self, batch: &Batch) -> Result<(), String> {
        let tables = batch.tables();
        for (ti, table) in tables.iter().enumerate() {
            let ti = ti as u32;
            let dropped = self.drop_tables.matches(&table.schema, &table.name)
                || (!self.keep_tables.is_empty()
                    && !self.keep_tables.matches(&table.schema, &table.name));
            if dropped {
                batch.drop_rows(&batch.rows_of(ti));
                continue;
            }
            let Some(pred) = &self.predicate else {
                continue;
            };
            let Some(ci) = table.columns.iter().position(|c| c.name == pred.column) else {
                continue;
            };
            let column = &table.columns[ci];
            let ci = ci as u32;
            let rows = batch.rows_of(ti);
            let new = batch.read_column(ti, ci, Image::New);
            let mut old: Option<Vec<Value>> = None;
            let mut drops = Vec::new();
            for (i, (&row, value)) in rows.iter().zip(&new).enumerate() {
                let mut value = value;
                if matches!(value, Value::Null) {
                    match batch.meta(row).op {
                        Op::Truncate => continue,
                        // Outside the replica identity the old image has no value.
                        Op::Delete if !column.key => continue,
                        Op::Delete => {
                            value = &old
                                .get_or_insert_with(|| batch.read_column(ti, ci, Image::Old))[i];
                        }
                        _ => {}
                    }
                }
                let keep = test(pred, value, &mut self.scratch).map_err(|expected| {
                    format!(
                        "filter: `where.value` = {:?} cannot be compared with column {}.{}.{} ({}): expected {expected}",
                        pred.value.text, table.schema, table.name, column.name, column.type_name
                    )
                })?;
                if keep == Some(false) {
                    drops.push(row);
                }
            }
            if !drops.is_empty() {
                batch.drop_rows(&drops);
            }
        }
        Ok(())
    }
}

/// Whether `value` matches; `None` when it cannot be known (`unchanged-toast`).
/// The error names what `where.value` should have been.
fn test(
    pred: &Predicate,
    value: &Value,
    scratch: &mut String,
) -> Result<Option<bool>, &'static str> {
    let c = &pred.value;
    match (pred.op, value) {
        (_, Value::UnchangedToast) => return Ok(None),
        (PredOp::IsNull, v) => return Ok(Some(matches!(v, Value::Null))),
        (PredOp::NotNull, v) => return Ok(Some(!matches!(v, Value::Null))),
        // As in SQL, no comparison with NULL is true.
        (_, Value::Null) => return Ok(Some(false)),
        (PredOp::Contains | PredOp::Prefix, Value::Bytes(b)) => {
            let needle = c.bytes.as_slice();
            return Ok(Some(if pred.op == PredOp::Prefix {
                b.starts_with(needle)
            } else {
                needle.is_empty() || b.windows(needle.len()).any(|w| w == needle)
            }));
        }
        (PredOp::Contains | PredOp::Prefix, v) => {
            scratch.clear();
            value_text(v, scratch);
            return Ok(Some(if pred.op == PredOp::Prefix {
                scratch.starts_with(&c.text)
            } else {
                scratch.contains(&c.text)
            }));
        }
        _ => {}
    }
    let ordering = match value {
        Value::Boolean(b) => b.cmp(&c.boolean.ok_or("true or false")?),
        Value::Int(i) => match (c.int, c.float) {
            (Some(x), _) => i.cmp(&x),
            (None, Some(x)) => pg_cmp_f64(*i as f64, x),
            _ => return Err("a number"),
        },
        Value::Float(f) => pg_cmp_f64(*f, c.float.ok_or("a number")?),
        Value::Numeric(s) => pg_cmp_f64(
            s.trim().parse::<f64>().map_err(|_| "a number")?,
            c.float.ok_or("a number")?,
        ),
        Value::Text(s) | Value::Json(s) | Value::Other(s) => s.as_str().cmp(c.text.as_str()),
        Value::Bytes(b) => b.as_slice().cmp(c.bytes.as_slice()),
        Value::Date(d) => d.cmp(&c.days.ok_or("a date: YYYY-MM-DD or days since 1970-01-01")?),
        Value::Time(t) => t.cmp(&c.time.ok_or("a time: HH:MM[:SS[.ffffff]] or microseconds")?),
        Value::Timestamp(t) | Value::Timestamptz(t) => t.cmp(&c.micros.ok_or(
            "a timestamp: YYYY-MM-DD[THH:MM[:SS[.ffffff]]][Z|+HH:MM] or microseconds since the Unix epoch",
        )?),
        Value::Uuid(u) => u.cmp(&c.uuid.ok_or("a UUID")?),
        Value::Null | Value::UnchangedToast => unreachable!("handled above"),
    };
    Ok(Some(match pred.op {
        PredOp::Eq => ordering == Ordering::Equal,
        PredOp::Ne => ordering != Ordering::Equal,
        PredOp::Lt => ordering == Ordering::Less,
        PredOp::Le => ordering != Ordering::Greater,
        PredOp::Gt => ordering == Ordering::Greater,
        PredOp::Ge => ordering != Ordering::Less,
        _ => unreachable!("handled above"),
    }))
}

/// PostgreSQL's float order: NaN equals NaN and sorts above every other value.
fn pg_cmp_f64(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

fn parse_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Days since 1970-01-01 of the proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn parse_date(s: &str) -> Option<i32> {
    let mut parts = s.splitn(3, '-');
    let (y, m, d) = (
        digits(parts.next()?)?,
        digits(parts.next()?)?,
        digits(parts.next()?)?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    i32::try_from(days_from_civil(y, m, d)).ok()
}

fn parse_time(s: &str) -> Option<i64> {
    let (hms, frac) = match s.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (s, None),
    };
    let mut parts = hms.split(':');
    let h = digits(parts.next()?)?;
    let m = digits(parts.next()?)?;
    let sec = parts.next().map_or(Some(0), digits)?;
    if parts.next().is_some() || h > 24 || m > 59 || sec > 60 {
        return None;
    }
    let micros = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 6 => digits(f)? * 10i64.pow(6 - f.len() as u32),
        Some(_) => return None,
    };
    Some(((h * 60 + m) * 60 + sec) * 1_000_000 + micros)
}

/// `YYYY-MM-DD[( |T)HH:MM[:SS[.ffffff]]][Z|±HH[:MM]]`, as UTC microseconds.
fn parse_timestamp(s: &str) -> Option<i64> {
    let (date, rest) = match s.find(['T', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let days = i64::from(parse_date(date)?);
    let (time, offset) = match rest {
        None => (0, 0),
        Some(rest) => {
            let (time, offset) = if let Some(t) = rest.strip_suffix('Z') {
                (t, 0)
            } else if let Some(i) = rest.rfind(['+', '-']) {
                let sign = if rest.as_bytes()[i] == b'-' { -1 } else { 1 };
                let off = &rest[i + 1..];
                let (oh, om) = off.split_once(':').unwrap_or((off, "0"));
                (
                    &rest[..i],
                    sign * (digits(oh)? * 60 + digits(om)?) * 60_000_000,
                )
            } else {
                (rest, 0)
            };
            (parse_time(time)?, offset)
        }
    };
    Some(days * 86_400_000_000 + time - offset)
}

fn parse_uuid(s: &str) -> Option<(u64, u64)> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || s.len() != 32 && s.len() != 36 {
        return None;
    }
    Some((
        u64::from_str_radix(&hex[..16], 16).ok()?,
        u64::from_str_radix(&hex[16..], 16).ok()?,
    ))
}

struct Filter;

impl Guest for Filter {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "filter".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "drops rows by schema.table pattern and by a predicate on one column"
                .into(),
        }
    }

    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        let config = Config::from_settings(&Settings::new(settings))?;
        CONFIG.with(|c| *c.borrow_mut() = Some(config));
        Ok(())
    }

    fn process(batch: &Batch) -> Result<(), String> {
        CONFIG.with(|c| match c.borrow_mut().as_mut() {
            Some(config) => config.process(batch),
            None => Err("filter: process called before init".into()),
        })
    }
}

airlock_guest::export!(Filter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporal() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2000-03-01"), Some(11_017));
        assert_eq!(parse_time("01:00:00.5"), Some(3_600_500_000));
        assert_eq!(
            parse_timestamp("1970-01-02T00:00:00Z"),
            Some(86_400_000_000)
        );
        assert_eq!(parse_timestamp("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_timestamp("1970-01-01 00:00"), Some(0));
    }

    #[test]
    fn predicates() {
        let pred = |op, v: &str| Predicate {
            column: "c".into(),
            op,
            value: Comparand::new(v),
        };
        let mut s = String::new();
        assert_eq!(
            test(&pred(PredOp::Ge, "10"), &Value::Int(10), &mut s),
            Ok(Some(true))
        );
        assert_eq!(
            test(&pred(PredOp::Lt, "2.5"), &Value::Int(2), &mut s),
            Ok(Some(true))
        );
        assert_eq!(
            test(&pred(PredOp::Gt, "b"), &Value::Text("a".into()), &mut s),
            Ok(Some(false))
        );
        assert_eq!(
            test(&pred(PredOp::Eq, "x"), &Value::Null, &mut s),
            Ok(Some(false))
        );
        assert_eq!(
            test(&pred(PredOp::IsNull, ""), &Value::Null, &mut s),
            Ok(Some(true))
        );
        assert_eq!(
            test(&pred(PredOp::Eq, "x"), &Value::UnchangedToast, &mut s),
            Ok(None)
        );
        assert_eq!(
            test(
                &pred(PredOp::Prefix, "ab"),
                &Value::Text("abc".into()),
                &mut s
            ),
            Ok(Some(true))
        );
        assert!(test(&pred(PredOp::Eq, "x"), &Value::Int(1), &mut s).is_err());
        assert_eq!(
            test(
                &pred(PredOp::Eq, "2024-01-02"),
                &Value::Date(19_724),
                &mut s
            ),
            Ok(Some(true))
        );
    }
}
