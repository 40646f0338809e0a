//! Values as JSON: for `airlock guest test`, the dead-letter queue and the spine.
//!
//! Exact by construction: numeric stays a string, 64-bit integers stay integers,
//! temporal values are ISO 8601 text (`infinity`/`-infinity` kept), bytes are
//! PostgreSQL's `\x` hex form, and an unchanged TOAST value is `{"$unchanged": true}`
//! (never `null`).

use serde_json::{Map, Value as Json, json};

use super::{Relation, Value, oid};

/// The JSON form of an unchanged TOAST value.
pub fn unchanged_marker() -> Json {
    json!({"$unchanged": true})
}

fn is_unchanged_marker(value: &Json) -> bool {
    value.get("$unchanged").and_then(Json::as_bool) == Some(true)
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD`, with ` BC` for years before 1 as PostgreSQL writes them.
pub fn format_date(days: i32) -> String {
    match days {
        i32::MAX => "infinity".into(),
        i32::MIN => "-infinity".into(),
        _ => {
            let (y, m, d) = civil_from_days(i64::from(days));
            if y <= 0 {
                format!("{:04}-{m:02}-{d:02} BC", 1 - y)
            } else {
                format!("{y:04}-{m:02}-{d:02}")
            }
        }
    }
}

/// `HH:MM:SS[.ffffff]` from microseconds since midnight.
pub fn format_time(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if frac == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{frac:06}")
    }
}

/// ISO 8601 `YYYY-MM-DDTHH:MM:SS[.ffffff]` (+ `Z` when `utc`), or `±infinity`.
pub fn format_timestamp(micros: i64, utc: bool) -> String {
    match micros {
        i64::MAX => "infinity".into(),
        i64::MIN => "-infinity".into(),
        _ => {
            let days = micros.div_euclid(86_400_000_000);
            let time = micros.rem_euclid(86_400_000_000);
            let date = format_date(days as i32);
            let (date, bc) = match date.strip_suffix(" BC") {
                Some(d) => (d.to_owned(), " BC"),
                None => (date, ""),
            };
            format!(
                "{date}T{}{}{bc}",
                format_time(time),
                if utc { "Z" } else { "" }
            )
        }
    }
}

/// Canonical lowercase `8-4-4-4-12` text of a UUID.
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Appends the bytes a value is hashed and packed as (`hash-column`,
/// `read-text-column`): UTF-8 text for text-like values, raw bytes for `bytes`, the
/// canonical text of other variants. Returns false (and appends nothing) for `null`
/// and unchanged TOAST values.
pub fn value_bytes(value: &Value, out: &mut Vec<u8>) -> bool {
    use std::io::Write;
    match value {
        Value::Null | Value::UnchangedToast => return false,
        Value::Numeric(s) | Value::Text(s) | Value::Json(s) | Value::Other(s) => {
            out.extend_from_slice(s.as_bytes())
        }
        Value::Bytes(b) => out.extend_from_slice(b),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) if f.is_nan() => out.extend_from_slice(b"NaN"),
        Value::Float(f) if f.is_infinite() => {
            out.extend_from_slice(if *f > 0.0 { b"Infinity" } else { b"-Infinity" })
        }
        Value::Float(f) => {
            let _ = write!(out, "{f}");
        }
        Value::Date(d) => out.extend_from_slice(format_date(*d).as_bytes()),
        Value::Time(t) => out.extend_from_slice(format_time(*t).as_bytes()),
        Value::Timestamp(t) => out.extend_from_slice(format_timestamp(*t, false).as_bytes()),
        Value::Timestamptz(t) => out.extend_from_slice(format_timestamp(*t, true).as_bytes()),
        Value::Uuid(u) => out.extend_from_slice(format_uuid(u).as_bytes()),
    }
    true
}

/// The JSON form of one value.
pub fn value_to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::UnchangedToast => unchanged_marker(),
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) if f.is_finite() => Json::from(*f),
        Value::Float(f) if f.is_nan() => Json::from("NaN"),
        Value::Float(f) => Json::from(if *f > 0.0 { "Infinity" } else { "-Infinity" }),
        Value::Numeric(s) | Value::Text(s) | Value::Other(s) => Json::from(s.as_str()),
        Value::Bytes(b) => Json::from(format!("\\x{}", hex::encode(b))),
        Value::Date(d) => Json::from(format_date(*d)),
        Value::Time(t) => Json::from(format_time(*t)),
        Value::Timestamp(t) => Json::from(format_timestamp(*t, false)),
        Value::Timestamptz(t) => Json::from(format_timestamp(*t, true)),
        Value::Uuid(u) => Json::from(format_uuid(u)),
        Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| Json::from(s.as_str())),
    }
}

/// A row image as a JSON object keyed by column name.
pub fn row_to_json(relation: &Relation, values: &[Value]) -> Map<String, Json> {
    relation
        .columns
        .iter()
        .zip(values)
        .map(|(c, v)| (c.name.clone(), value_to_json(v)))
        .collect()
}

/// Reads a value for a column of type `type_oid` from JSON, the inverse of
/// [`value_to_json`]: strings for typed columns are parsed as PostgreSQL text.
pub fn value_from_json(column: &super::Column, json: &Json) -> Result<Value, String> {
    if is_unchanged_marker(json) {
        return Ok(Value::UnchangedToast);
    }
    let ty = column.type_oid;
    let text = match json {
        Json::Null => return Ok(Value::Null),
        Json::Bool(b) if ty == oid::BOOL => return Ok(Value::Bool(*b)),
        Json::Number(n) if matches!(ty, oid::INT2 | oid::INT4 | oid::INT8 | oid::OID) => {
            return n
                .as_i64()
                .map(Value::Int)
                .ok_or_else(|| format!("`{n}` is not an integer"));
        }
        Json::Number(n) if matches!(ty, oid::FLOAT4 | oid::FLOAT8) => {
            return n
                .as_f64()
                .map(Value::Float)
                .ok_or_else(|| format!("`{n}` is not a number"));
        }
        Json::Number(n) if ty == oid::NUMERIC => return Ok(Value::Numeric(n.to_string())),
        _ if matches!(ty, oid::JSON | oid::JSONB) => {
            return Ok(Value::Json(match json {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            }));
        }
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    // ISO 8601 from our own output back to PostgreSQL's text form.
    let text = if matches!(ty, oid::TIMESTAMP | oid::TIMESTAMPTZ) {
        let t = text.replacen('T', " ", 1);
        match t.strip_suffix('Z') {
            Some(t) => format!("{t}+00"),
            None => t,
        }
    } else {
        text
    };
    super::text::parse_value(column, text.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_like_postgres() {
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(format_date(19_723), "2024-01-01");
        assert_eq!(format_date(-1), "1969-12-31");
        assert_eq!(format_date(i32::MAX), "infinity");
        // 0044-03-15 BC is astronomical year -43.
        let (y, m, d) = civil_from_days(-735_160);
        assert_eq!((y, m, d), (-43, 3, 15));
        assert_eq!(format_date(-735_160), "0044-03-15 BC");
    }

    #[test]
    fn timestamps_and_values_render_exactly() {
        assert_eq!(
            format_timestamp(1_704_067_200_123_456, true),
            "2024-01-01T00:00:00.123456Z"
        );
        assert_eq!(format_timestamp(0, false), "1970-01-01T00:00:00");
        assert_eq!(format_time(45_296_000_001), "12:34:56.000001");
        assert_eq!(
            value_to_json(&Value::Int(i64::MAX)),
            json!(9_223_372_036_854_775_807_i64)
        );
        assert_eq!(
            value_to_json(&Value::Numeric("12.340".into())),
            json!("12.340")
        );
        assert_eq!(
            value_to_json(&Value::Bytes(vec![0xde, 0xad])),
            json!("\\xdead")
        );
        assert_eq!(
            value_to_json(&Value::UnchangedToast),
            json!({"$unchanged": true})
        );
        assert_eq!(value_to_json(&Value::Float(f64::NAN)), json!("NaN"));
        assert_eq!(
            format_uuid(&[0x12; 16]),
            "12121212-1212-1212-1212-121212121212"
        );
    }
}
