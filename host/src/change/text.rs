//! Typed values from PostgreSQL's text output.
//!
//! ```text
//! TupleValue::Text(&[u8]) ──parse_value(column)──▶ Value::{Bool, Int, Float, Numeric, Text,
//!                                                    Bytes, Date, Time, Timestamp, Timestamptz,
//!                                                    Uuid, Json, Other}
//! ```
//!
//! Invariants:
//! - The replication session pins the text forms: `DateStyle=ISO`, `TimeZone=UTC`,
//!   `IntervalStyle=postgres`, `bytea_output=hex`, `extra_float_digits=3`,
//!   `client_encoding=UTF8` (see `protocol::SESSION_OPTIONS`). Timestamptz offsets other
//!   than `+00` are still parsed correctly.
//! - Never panics: text that does not parse for a typed column is a [`ValueError`]
//!   naming the column and the type. The error never contains the value itself,
//!   which may be personal data.
//! - Allocates only the final `String`/`Vec` of text-like values.
//! - Infinite dates and timestamps map to `i32::MAX`/`i32::MIN` and
//!   `i64::MAX`/`i64::MIN`, as PostgreSQL stores them.
//! - float4 text is parsed as `f64` from PostgreSQL's shortest exact form, so casting
//!   the result back to `f32` gives the stored value exactly.

use super::{Column, Value, oid};

/// A column value that does not parse as its declared type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot parse the value of column `{column}` as {type_name}: {reason} (this is a bug in airlock or an unexpected server setting; please report it)"
)]
pub struct ValueError {
    pub column: String,
    pub type_name: &'static str,
    pub reason: &'static str,
}

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

/// Parses PostgreSQL's text output of a value of `column`'s type.
pub fn parse_value(column: &Column, text: &[u8]) -> Result<Value, ValueError> {
    // The type's name is looked up only for an error: this runs once per value.
    let fail = |reason: &'static str| ValueError {
        column: column.name.clone(),
        type_name: type_name(column.type_oid),
        reason,
    };
    let utf8 = || std::str::from_utf8(text).map_err(|_| fail("the text is not valid UTF-8"));
    match column.type_oid {
        oid::BOOL => match text {
            b"t" | b"true" => Ok(Value::Bool(true)),
            b"f" | b"false" => Ok(Value::Bool(false)),
            _ => Err(fail("expected `t` or `f`")),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => parse_int(text)
            .map(Value::Int)
            .ok_or_else(|| fail("expected an integer")),
        oid::FLOAT4 | oid::FLOAT8 => parse_float(text)
            .map(Value::Float)
            .ok_or_else(|| fail("expected a number, NaN, Infinity or -Infinity")),
        oid::NUMERIC => {
            if is_numeric(text) {
                Ok(Value::Numeric(utf8()?.to_owned()))
            } else {
                Err(fail(
                    "expected a decimal number, NaN, Infinity or -Infinity",
                ))
            }
        }
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::CHAR => {
            Ok(Value::Text(utf8()?.to_owned()))
        }
        oid::BYTEA => parse_bytea(text)
            .map(Value::Bytes)
            .ok_or_else(|| fail("expected hex output (`\\x...`)")),
        oid::DATE => parse_date(text)
            .map(Value::Date)
            .ok_or_else(|| fail("expected YYYY-MM-DD[ BC] or ±infinity")),
        oid::TIME => {
            let mut p = Parser::new(text);
            let micros = p.time().filter(|_| p.done());
            micros
                .map(Value::Time)
                .ok_or_else(|| fail("expected HH:MM:SS[.ffffff]"))
        }
        oid::TIMESTAMP => parse_timestamp(text, false)
            .map(Value::Timestamp)
            .ok_or_else(|| fail("expected YYYY-MM-DD HH:MM:SS[.ffffff][ BC] or ±infinity")),
        oid::TIMESTAMPTZ => parse_timestamp(text, true)
            .map(Value::Timestamptz)
            .ok_or_else(|| {
                fail("expected YYYY-MM-DD HH:MM:SS[.ffffff]±HH[:MM[:SS]][ BC] or ±infinity")
            }),
        oid::UUID => parse_uuid(text)
            .map(Value::Uuid)
            .ok_or_else(|| fail("expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")),
        oid::JSON | oid::JSONB => Ok(Value::Json(utf8()?.to_owned())),
        _ => Ok(Value::Other(utf8()?.to_owned())),
    }
}

/// The PostgreSQL name of the types `parse_value` knows, for messages.
pub fn type_name(type_oid: u32) -> &'static str {
    match type_oid {
        oid::BOOL => "bool",
        oid::BYTEA => "bytea",
        oid::CHAR => "\"char\"",
        oid::NAME => "name",
        oid::INT8 => "int8",
        oid::INT2 => "int2",
        oid::INT4 => "int4",
        oid::TEXT => "text",
        oid::OID => "oid",
        oid::JSON => "json",
        oid::FLOAT4 => "float4",
        oid::FLOAT8 => "float8",
        oid::BPCHAR => "bpchar",
        oid::VARCHAR => "varchar",
        oid::DATE => "date",
        oid::TIME => "time",
        oid::TIMESTAMP => "timestamp",
        oid::TIMESTAMPTZ => "timestamptz",
        oid::NUMERIC => "numeric",
        oid::UUID => "uuid",
        oid::JSONB => "jsonb",
        _ => "text (untyped)",
    }
}

/// The elements of a one-dimensional array in PostgreSQL's text output
/// (`{1,NULL,"a b"}`), `None` for `NULL` elements. Returns `None` for anything else:
/// multi-dimensional arrays, arrays with explicit bounds (`[0:1]={...}`), bad text.
pub fn parse_array(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut out = Vec::new();
    if inner.is_empty() {
        return Some(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut element = String::new();
            loop {
                match chars.next()? {
                    '\\' => element.push(chars.next()?),
                    '"' => break,
                    c => element.push(c),
                }
            }
            out.push(Some(element));
        } else {
            let mut element = String::new();
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if matches!(c, '{' | '}' | '"' | '\\') {
                    return None;
                }
                element.push(c);
                chars.next();
            }
            if element.is_empty() {
                return None;
            }
            out.push((!element.eq_ignore_ascii_case("NULL")).then_some(element));
        }
        match chars.next() {
            None => return Some(out),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

fn parse_float(text: &[u8]) -> Option<f64> {
    match text {
        b"NaN" => Some(f64::NAN),
        b"Infinity" => Some(f64::INFINITY),
        b"-Infinity" => Some(f64::NEG_INFINITY),
        _ => {
            // Rust also accepts `inf` and `nan`, which PostgreSQL never prints.
            if !text
                .iter()
                .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
            {
                return None;
            }
            std::str::from_utf8(text).ok()?.parse().ok()
        }
    }
}

/// `[-+]digits` as an `i64`, straight from the bytes (what `str::parse::<i64>` accepts,
/// without a UTF-8 pass first); `None` on anything else or on overflow.
fn parse_int(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: i64 = 0;
    for &b in digits {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?;
        // Accumulating negatively reaches i64::MIN.
        value = if negative {
            value.checked_sub(i64::from(digit))?
        } else {
            value.checked_add(i64::from(digit))?
        };
    }
    Some(value)
}

/// `-?digits[.digits]` or one of PostgreSQL's special numeric values.
fn is_numeric(text: &[u8]) -> bool {
    if matches!(text, b"NaN" | b"Infinity" | b"-Infinity") {
        return true;
    }
    let unsigned = text.strip_prefix(b"-").unwrap_or(text);
    let (int, frac) = match unsigned.iter().position(|&b| b == b'.') {
        Some(dot) => (&unsigned[..dot], Some(&unsigned[dot + 1..])),
        None => (unsigned, None),
    };
    !int.is_empty()
        && int.iter().all(u8::is_ascii_digit)
        && frac.is_none_or(|f| !f.is_empty() && f.iter().all(u8::is_ascii_digit))
}

fn parse_bytea(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    hex::decode(hex).ok()
}

fn parse_uuid(text: &[u8]) -> Option<[u8; 16]> {
    if text.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibbles = text
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(i, 8 | 13 | 18 | 23));
    for (i, &b) in text.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) && b != b'-' {
            return None;
        }
    }
    for byte in &mut out {
        let hi = hex_digit(*nibbles.next()?.1)?;
        let lo = hex_digit(*nibbles.next()?.1)?;
        *byte = (hi << 4) | lo;
    }
    Some(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Days since 1970-01-01, or `i32::MAX`/`i32::MIN` for ±infinity.
fn parse_date(text: &[u8]) -> Option<i32> {
    match text {
        b"infinity" => return Some(i32::MAX),
        b"-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let mut p = Parser::new(text);
    let days = p.date(bc)?;
    if !p.done() {
        return None;
    }
    i32::try_from(days).ok()
}

/// Microseconds since 1970-01-01 00:00:00 (UTC when `with_zone`), or
/// `i64::MAX`/`i64::MIN` for ±infinity.
fn parse_timestamp(text: &[u8], with_zone: bool) -> Option<i64> {
    match text {
        b"infinity" => return Some(i64::MAX),
        b"-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let mut p = Parser::new(text);
    let days = p.date(bc)?;
    p.expect(b' ')?;
    let time = p.time_of_day(false)?;
    let offset = if with_zone { p.offset()? } else { 0 };
    if !p.done() {
        return None;
    }
    days.checked_mul(MICROS_PER_DAY)?
        .checked_add(time)?
        .checked_sub(offset)
}

fn strip_bc(text: &[u8]) -> (&[u8], bool) {
    match text.strip_suffix(b" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (astronomical year numbering:
/// 1 BC is year 0). Howard Hinnant's `days_from_civil`.
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A cursor over ASCII date/time text.
struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a [u8]) -> Self {
        Parser { text, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos == self.text.len()
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.pos += 1)
    }

    /// Between `min` and `max` ASCII digits as a number.
    fn digits(&mut self, min: usize, max: usize) -> Option<i64> {
        let mut value: i64 = 0;
        let start = self.pos;
        while let Some(b @ b'0'..=b'9') = self.peek() {
            if self.pos - start == max {
                return None;
            }
            value = value * 10 + i64::from(b - b'0');
            self.pos += 1;
        }
        (self.pos - start >= min).then_some(value)
    }

    /// `YYYY-MM-DD` (the year may have more digits) as days since 1970-01-01.
    fn date(&mut self, bc: bool) -> Option<i64> {
        let year = self.digits(4, 9)?;
        self.expect(b'-')?;
        let month = u32::try_from(self.digits(2, 2)?).ok()?;
        self.expect(b'-')?;
        let day = u32::try_from(self.digits(2, 2)?).ok()?;
        if year == 0 {
            return None;
        }
        let year = if bc { 1 - year } else { year };
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        Some(days_from_civil(year, month, day))
    }

    /// `HH:MM:SS[.f{1,6}]` as microseconds; `24:00:00` only for the time type.
    fn time_of_day(&mut self, allow_24: bool) -> Option<i64> {
        let hour = self.digits(2, 2)?;
        self.expect(b':')?;
        let minute = self.digits(2, 2)?;
        self.expect(b':')?;
        let second = self.digits(2, 2)?;
        let mut micros = 0;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            let start = self.pos;
            let fraction = self.digits(1, 6)?;
            let scale = 6 - (self.pos - start) as u32;
            micros = fraction * 10_i64.pow(scale);
        }
        let valid = if hour == 24 {
            allow_24 && minute == 0 && second == 0 && micros == 0
        } else {
            hour < 24 && minute < 60 && second < 60
        };
        valid.then(|| ((hour * 60 + minute) * 60 + second) * MICROS_PER_SECOND + micros)
    }

    fn time(&mut self) -> Option<i64> {
        self.time_of_day(true)
    }

    /// `±HH[:MM[:SS]]` as microseconds east of UTC.
    fn offset(&mut self) -> Option<i64> {
        let sign = match self.peek()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        self.pos += 1;
        let hours = self.digits(2, 2)?;
        let mut minutes = 0;
        let mut seconds = 0;
        if self.peek() == Some(b':') {
            self.pos += 1;
            minutes = self.digits(2, 2)?;
            if self.peek() == Some(b':') {
                self.pos += 1;
                seconds = self.digits(2, 2)?;
            }
        }
        if minutes >= 60 || seconds >= 60 {
            return None;
        }
        Some(sign * ((hours * 60 + minutes) * 60 + seconds) * MICROS_PER_SECOND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_parse_from_bytes_like_str_parse() {
        for text in [
            "0",
            "-0",
            "+7",
            "42",
            "-42",
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999",
            "",
            "-",
            "+",
            "1.5",
            " 1",
            "1 ",
            "--1",
            "1e3",
            "0x10",
            "١",
        ] {
            assert_eq!(
                parse_int(text.as_bytes()),
                text.parse::<i64>().ok(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn one_dimensional_arrays_split_into_elements() {
        let some = |v: &[Option<&str>]| Some(v.iter().map(|e| e.map(str::to_owned)).collect());
        assert_eq!(parse_array("{}"), some(&[]));
        assert_eq!(
            parse_array("{1,2,NULL}"),
            some(&[Some("1"), Some("2"), None])
        );
        assert_eq!(
            parse_array(r#"{"a b","NULL","q\"x\\y",""}"#),
            some(&[Some("a b"), Some("NULL"), Some("q\"x\\y"), Some("")])
        );
        assert_eq!(parse_array("{{1,2},{3,4}}"), None);
        assert_eq!(parse_array("[0:1]={1,2}"), None);
        assert_eq!(parse_array("{1,"), None);
        assert_eq!(parse_array("1,2"), None);
    }

    fn col(type_oid: u32) -> Column {
        Column {
            name: "c".into(),
            type_oid,
            type_modifier: -1,
            key: false,
        }
    }

    fn parse(type_oid: u32, text: &str) -> Value {
        parse_value(&col(type_oid), text.as_bytes())
            .unwrap_or_else(|e| panic!("{text:?} as {}: {e}", type_name(type_oid)))
    }

    fn fails(type_oid: u32, text: &[u8]) {
        let err = parse_value(&col(type_oid), text).unwrap_err();
        assert_eq!(err.column, "c");
        assert_eq!(err.type_name, type_name(type_oid));
    }

    const DAY: i64 = MICROS_PER_DAY;

    #[test]
    fn bool() {
        assert_eq!(parse(oid::BOOL, "t"), Value::Bool(true));
        assert_eq!(parse(oid::BOOL, "f"), Value::Bool(false));
        fails(oid::BOOL, b"yes");
    }

    #[test]
    fn integers() {
        assert_eq!(parse(oid::INT2, "-32768"), Value::Int(-32768));
        assert_eq!(parse(oid::INT4, "42"), Value::Int(42));
        assert_eq!(
            parse(oid::INT8, "-9223372036854775808"),
            Value::Int(i64::MIN)
        );
        assert_eq!(parse(oid::OID, "4294967295"), Value::Int(4_294_967_295));
        fails(oid::INT4, b"4x");
        fails(oid::INT8, b"");
    }

    #[test]
    fn floats_with_special_values() {
        assert_eq!(parse(oid::FLOAT8, "1.5e+300"), Value::Float(1.5e300));
        assert_eq!(
            parse(oid::FLOAT4, "3.4028235e+38"),
            Value::Float(3.4028235e38)
        );
        assert_eq!(parse(oid::FLOAT4, "1.1"), Value::Float(1.1));
        assert_eq!(parse(oid::FLOAT8, "-0"), Value::Float(-0.0));
        assert_eq!(parse(oid::FLOAT8, "Infinity"), Value::Float(f64::INFINITY));
        assert_eq!(
            parse(oid::FLOAT8, "-Infinity"),
            Value::Float(f64::NEG_INFINITY)
        );
        let Value::Float(nan) = parse(oid::FLOAT4, "NaN") else {
            panic!()
        };
        assert!(nan.is_nan());
        fails(oid::FLOAT8, b"inf");
        fails(oid::FLOAT8, b"one");
    }

    #[test]
    fn numeric_keeps_exact_text() {
        for text in ["0", "-12.3400", "123456789012345678901234567890.000000001"] {
            assert_eq!(parse(oid::NUMERIC, text), Value::Numeric(text.into()));
        }
        for text in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(parse(oid::NUMERIC, text), Value::Numeric(text.into()));
        }
        for bad in [&b""[..], b"-", b"1.", b".5", b"1e5", b"1.2.3", b"--1"] {
            fails(oid::NUMERIC, bad);
        }
    }

    #[test]
    fn text_like_types() {
        for t in [oid::TEXT, oid::VARCHAR, oid::BPCHAR, oid::NAME, oid::CHAR] {
            assert_eq!(parse(t, "héllo "), Value::Text("héllo ".into()));
        }
        fails(oid::TEXT, b"\xff\xfe");
    }

    #[test]
    fn bytea_hex() {
        assert_eq!(
            parse(oid::BYTEA, "\\xdeadBEEF00"),
            Value::Bytes(vec![0xde, 0xad, 0xbe, 0xef, 0])
        );
        assert_eq!(parse(oid::BYTEA, "\\x"), Value::Bytes(vec![]));
        fails(oid::BYTEA, b"\\x0");
        fails(oid::BYTEA, b"\\000");
    }

    #[test]
    fn days_from_civil_known_points() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 1, 1), 10_957);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(days_from_civil(0, 1, 1), -719_528);
        assert_eq!(
            i32::try_from(days_from_civil(2000, 1, 1)).unwrap(),
            crate::change::PG_EPOCH_OFFSET_DAYS
        );
    }

    #[test]
    fn dates_incl_bc_and_infinity() {
        assert_eq!(parse(oid::DATE, "1970-01-01"), Value::Date(0));
        assert_eq!(parse(oid::DATE, "2024-02-29"), Value::Date(19_782));
        assert_eq!(parse(oid::DATE, "infinity"), Value::Date(i32::MAX));
        assert_eq!(parse(oid::DATE, "-infinity"), Value::Date(i32::MIN));
        // 1 BC is astronomical year 0; 44 BC is year -43.
        assert_eq!(parse(oid::DATE, "0001-01-01 BC"), Value::Date(-719_528));
        assert_eq!(
            parse(oid::DATE, "0044-03-15 BC"),
            Value::Date(days_from_civil(-43, 3, 15) as i32)
        );
        assert_eq!(
            parse(oid::DATE, "12345-06-07"),
            Value::Date(days_from_civil(12_345, 6, 7) as i32)
        );
        // PostgreSQL's largest date: Julian day 2147483493, minus 2440588 for 1970-01-01.
        assert_eq!(
            parse(oid::DATE, "5874897-12-31"),
            Value::Date(2_147_483_493 - 2_440_588)
        );
        for bad in [
            &b"2023-02-29"[..],
            b"2024-13-01",
            b"2024-00-10",
            b"24-01-01",
            b"0000-01-01",
            b"2024-01-01x",
            b"2024/01/01",
        ] {
            fails(oid::DATE, bad);
        }
    }

    #[test]
    fn time_of_day() {
        assert_eq!(parse(oid::TIME, "00:00:00"), Value::Time(0));
        assert_eq!(
            parse(oid::TIME, "13:45:07.25"),
            Value::Time(((13 * 60 + 45) * 60 + 7) * 1_000_000 + 250_000)
        );
        assert_eq!(parse(oid::TIME, "24:00:00"), Value::Time(DAY));
        assert_eq!(parse(oid::TIME, "23:59:59.999999"), Value::Time(DAY - 1));
        fails(oid::TIME, b"24:00:01");
        fails(oid::TIME, b"12:60:00");
        fails(oid::TIME, b"12:00:00.1234567");
        fails(oid::TIME, b"12:00");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            parse(oid::TIMESTAMP, "1970-01-01 00:00:00"),
            Value::Timestamp(0)
        );
        assert_eq!(
            parse(oid::TIMESTAMP, "2024-01-02 03:04:05.678901"),
            Value::Timestamp(1_704_164_645_678_901)
        );
        assert_eq!(
            parse(oid::TIMESTAMP, "1969-12-31 23:59:59.5"),
            Value::Timestamp(-500_000)
        );
        assert_eq!(
            parse(oid::TIMESTAMP, "infinity"),
            Value::Timestamp(i64::MAX)
        );
        assert_eq!(
            parse(oid::TIMESTAMP, "-infinity"),
            Value::Timestamp(i64::MIN)
        );
        assert_eq!(
            parse(oid::TIMESTAMP, "0044-03-15 12:00:00 BC"),
            Value::Timestamp(days_from_civil(-43, 3, 15) * DAY + 12 * 3_600_000_000)
        );
        fails(oid::TIMESTAMP, b"2024-01-02T03:04:05");
        fails(oid::TIMESTAMP, b"2024-01-02 03:04:05+00");
        fails(oid::TIMESTAMP, b"2024-01-02 24:00:00");
    }

    #[test]
    fn timestamptz_with_offsets() {
        assert_eq!(
            parse(oid::TIMESTAMPTZ, "2024-01-02 03:04:05.678901+00"),
            Value::Timestamptz(1_704_164_645_678_901)
        );
        // 05:30 local at +05:30 is midnight UTC.
        assert_eq!(
            parse(oid::TIMESTAMPTZ, "1970-01-01 05:30:00+05:30"),
            Value::Timestamptz(0)
        );
        // 19:00 local at -05 is midnight UTC next day.
        assert_eq!(
            parse(oid::TIMESTAMPTZ, "1969-12-31 19:00:00-05"),
            Value::Timestamptz(0)
        );
        // Local mean time offsets have seconds.
        assert_eq!(
            parse(oid::TIMESTAMPTZ, "1970-01-01 00:00:00-00:01:15"),
            Value::Timestamptz(75_000_000)
        );
        assert_eq!(
            parse(oid::TIMESTAMPTZ, "0001-01-01 00:00:00+00 BC"),
            Value::Timestamptz(-719_528 * DAY)
        );
        assert_eq!(
            parse(oid::TIMESTAMPTZ, "infinity"),
            Value::Timestamptz(i64::MAX)
        );
        assert_eq!(
            parse(oid::TIMESTAMPTZ, "-infinity"),
            Value::Timestamptz(i64::MIN)
        );
        fails(oid::TIMESTAMPTZ, b"2024-01-02 03:04:05");
        fails(oid::TIMESTAMPTZ, b"2024-01-02 03:04:05+0");
        fails(oid::TIMESTAMPTZ, b"2024-01-02 03:04:05+00:60");
        // Far beyond PostgreSQL's range: an error, not an overflow.
        fails(oid::TIMESTAMPTZ, b"999999999-01-01 00:00:00+00");
    }

    #[test]
    fn uuid() {
        assert_eq!(
            parse(oid::UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Value::Uuid([
                0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
                0x0a, 0x11
            ])
        );
        fails(oid::UUID, b"a0eebc999c0b4ef8bb6d6bb9bd380a11");
        fails(oid::UUID, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g");
        fails(oid::UUID, b"a0eebc99x9c0b-4ef8-bb6d-6bb9bd380a11");
    }

    #[test]
    fn json_and_other_types() {
        assert_eq!(
            parse(oid::JSONB, r#"{"a": 1}"#),
            Value::Json(r#"{"a": 1}"#.into())
        );
        assert_eq!(parse(oid::JSON, "[1,2]"), Value::Json("[1,2]".into()));
        for (type_oid, text) in [
            (oid::INTERVAL, "1 day 02:00:00"),
            (oid::TIMETZ, "12:00:00+02"),
            (oid::MONEY, "$1.00"),
            (oid::XML, "<a/>"),
            (1007, "{1,2,NULL}"),
            (869, "192.168.0.1"),
            (90_001, "happy"),
        ] {
            assert_eq!(parse(type_oid, text), Value::Other(text.into()));
        }
        fails(oid::INTERVAL, b"\xc3\x28");
    }

    #[test]
    fn errors_name_column_and_type_but_not_the_value() {
        let column = Column {
            name: "born".into(),
            type_oid: oid::DATE,
            type_modifier: -1,
            key: false,
        };
        let err = parse_value(&column, b"secret-value").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`born`") && msg.contains("date"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let types = [
            oid::BOOL,
            oid::INT8,
            oid::FLOAT8,
            oid::NUMERIC,
            oid::BYTEA,
            oid::DATE,
            oid::TIME,
            oid::TIMESTAMP,
            oid::TIMESTAMPTZ,
            oid::UUID,
        ];
        let alphabet = b"0123456789-+:. BCinfty\\xa";
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let text: Vec<u8> = (0..len)
                .map(|i| alphabet[((x >> (i % 50)) as usize + i) % alphabet.len()])
                .collect();
            let _ = parse_value(&col(types[(x % 10) as usize]), &text);
        }
    }
}
