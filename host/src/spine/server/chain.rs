//! The hash chain: canonical JSON and the event hash, byte for byte the construction
//! of audit-stream-py (`json.dumps(body, sort_keys=True, separators=(",", ":"))`,
//! whose `ensure_ascii` default escapes every non-ASCII character), so its own
//! `_canonical_hash` verifies our events and ours verifies its events.
//!
//! The definition for another language is in the [module documentation](super).

use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// `prev_hash` of event 1: sixty-four `0`s.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The canonical JSON text of `value`.
pub fn canonical(value: &Json) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

/// Appends the canonical JSON text of `value` to `out`.
pub fn write_canonical(value: &Json, out: &mut Vec<u8>) {
    match value {
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(true) => out.extend_from_slice(b"true"),
        Json::Bool(false) => out.extend_from_slice(b"false"),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                write_float(n.as_f64().unwrap_or(f64::NAN), out);
            }
        }
        Json::String(s) => write_str(s, out),
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Json::Object(map) => {
            // Sorted by code point (= UTF-8 byte order), whatever the map's own order.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
    }
}

/// A JSON string as Python's `json.dumps(..., ensure_ascii=True)` writes it.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.extend_from_slice(b"\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(HEX[usize::from((*unit >> shift) & 0xf)]);
                    }
                }
            }
        }
    }
    out.push(b'"');
}

/// A float as Python's `repr`: the shortest digits that round-trip, in fixed notation
/// when the decimal exponent is in `-4..16`, else `d[.ddd]e±XX`.
pub fn write_float(f: f64, out: &mut Vec<u8>) {
    if f.is_nan() {
        out.extend_from_slice(b"NaN");
        return;
    }
    if f.is_infinite() {
        out.extend_from_slice(if f > 0.0 { b"Infinity" } else { b"-Infinity" });
        return;
    }
    // serde_json writes the shortest round-trip digits (ryu); only the layout differs.
    let shortest = serde_json::to_string(&f).unwrap_or_else(|_| "0.0".into());
    let (negative, text) = match shortest.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, shortest.as_str()),
    };
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (text, 0),
    };
    let point = mantissa.find('.').unwrap_or(mantissa.len()) as i32;
    let mut digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    // The value is 0.DIGITS × 10^decpt.
    let mut decpt = point + exponent;
    let leading = digits.iter().take_while(|&&d| d == b'0').count();
    digits.drain(..leading);
    decpt -= leading as i32;
    while digits.last() == Some(&b'0') {
        digits.pop();
    }
    if negative {
        out.push(b'-');
    }
    if digits.is_empty() {
        out.extend_from_slice(b"0.0");
        return;
    }
    let n = digits.len() as i32;
    if decpt <= -4 || decpt > 16 {
        out.push(digits[0]);
        if n > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        let e = decpt - 1;
        out.extend_from_slice(
            format!("e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs()).as_bytes(),
        );
    } else if decpt <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', (-decpt) as usize));
        out.extend_from_slice(&digits);
    } else if decpt >= n {
        out.extend_from_slice(&digits);
        out.extend(std::iter::repeat_n(b'0', (decpt - n) as usize));
        out.extend_from_slice(b".0");
    } else {
        out.extend_from_slice(&digits[..decpt as usize]);
        out.push(b'.');
        out.extend_from_slice(&digits[decpt as usize..]);
    }
}

/// The canonical body of an event (every field but `hash`), assembled from the
/// canonical text of its payload: keys in code-point order `event_id`, `kind`,
/// `payload`, `prev_hash`, `source`, `timestamp`.
pub fn event_body(
    event_id: u64,
    kind: &str,
    payload: &[u8],
    prev_hash: &str,
    source: &str,
    timestamp: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + kind.len() + source.len() + 160);
    out.extend_from_slice(b"{\"event_id\":");
    out.extend_from_slice(event_id.to_string().as_bytes());
    out.extend_from_slice(b",\"kind\":");
    write_str(kind, &mut out);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload);
    out.extend_from_slice(b",\"prev_hash\":");
    write_str(prev_hash, &mut out);
    out.extend_from_slice(b",\"source\":");
    write_str(source, &mut out);
    out.extend_from_slice(b",\"timestamp\":");
    write_str(timestamp, &mut out);
    out.push(b'}');
    out
}

/// SHA-256 of a canonical body.
pub fn hash(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// The event as the API returns it: the canonical body with `"hash"` added last.
pub fn event_json(body: &[u8], hash: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 76);
    out.extend_from_slice(&body[..body.len().saturating_sub(1)]);
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hex::encode(hash).as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(value: &Json) -> String {
        String::from_utf8(canonical(value)).unwrap()
    }

    #[test]
    fn floats_are_written_like_python_repr() {
        // Expected strings from Python 3.11's json.dumps.
        let cases: &[(f64, &str)] = &[
            (1e-7, "1e-07"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.1, "0.1"),
            (100.0, "100.0"),
            (-0.0, "-0.0"),
            (1.5e300, "1.5e+300"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (2.5, "2.5"),
            (-1234.5678, "-1234.5678"),
            (1e22, "1e+22"),
            (1e21, "1e+21"),
            (123e-20, "1.23e-18"),
        ];
        for (f, want) in cases {
            let mut out = Vec::new();
            write_float(*f, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), *want, "{f:?}");
        }
    }

    #[test]
    fn strings_are_escaped_like_python_ensure_ascii() {
        let s = "é😀\u{7f}\u{0}\u{1f}\"\\/\n\t\u{8}\u{c}\r\u{2028}";
        assert_eq!(
            text(&json!(s)),
            r#""\u00e9\ud83d\ude00\u007f\u0000\u001f\"\\/\n\t\b\f\r\u2028""#
        );
    }

    #[test]
    fn objects_sort_keys_and_numbers_keep_their_kind() {
        let value: Json = serde_json::from_str(
            r#"{"b": [1.0, 1e2, 10000000000000000000, -5], "a": {"é": null, "z": true}}"#,
        )
        .unwrap();
        assert_eq!(
            text(&value),
            r#"{"a":{"z":true,"\u00e9":null},"b":[1.0,100.0,10000000000000000000,-5]}"#
        );
    }

    #[test]
    fn an_audit_stream_py_event_verifies() {
        // Answered by audit-stream 0.1.0 to
        // POST /events {"kind":"other","source":"a","payload":{"x":"é😀","f":1e-7,"g":1e16},
        //               "timestamp":"2024-01-01T00:00:00Z"}
        let payload = canonical(&json!({"x": "é😀", "f": 1e-7, "g": 1e16}));
        let body = event_body(
            1,
            "other",
            &payload,
            GENESIS_HASH,
            "a",
            "2024-01-01T00:00:00Z",
        );
        assert_eq!(
            hex::encode(hash(&body)),
            "53c3247217f0facbafc689b1dd5499532bbf3b2252e68185d5cec72a59144847"
        );
        let whole = json!({
            "event_id": 1, "timestamp": "2024-01-01T00:00:00Z", "kind": "other", "source": "a",
            "payload": {"x": "é😀", "f": 1e-7, "g": 1e16}, "prev_hash": GENESIS_HASH,
        });
        assert_eq!(body, canonical(&whole));
        let served: Json = serde_json::from_slice(&event_json(&body, &hash(&body))).unwrap();
        assert_eq!(served["payload"]["x"], "é😀");
        assert_eq!(
            served["hash"],
            "53c3247217f0facbafc689b1dd5499532bbf3b2252e68185d5cec72a59144847"
        );
    }
}
