//! The built-in actions: what the gate does to every value of a class, the column
//! types each accepts and the type it leaves in the lake.
//!
//! Invariants:
//! - `null` and unchanged TOAST values pass every action untouched (there is nothing
//!   to hide in them, and an unchanged value stays unchanged in the lake's latest
//!   state, which already holds it with the action applied).
//! - An action meets only values of the types it accepts: the gate checks the
//!   column's type when it plans a relation, so a value of another kind here is a bug
//!   in the gate, and it fails closed (the value becomes `null`).
//! - `hmac` tokens are `KEY_ID:` and the 32 hex digits of HMAC-SHA-256-128 (the MAC's
//!   first 128 bits, as RFC 4868: collisions stay out of reach for any table) over the
//!   value's canonical bytes ([`crate::change::json::value_bytes`]), after the
//!   class's normalisation: the same value gives the same token in every table.

use std::fmt;

use crate::change::json::{civil_from_days, value_bytes};
use crate::change::text::days_from_civil;
use crate::change::{Value, oid};
use crate::secrets::Hmac;

/// What the gate does to the values of one class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Unchanged.
    Keep,
    /// A keyed token: `KEY_ID:` and 32 hex digits. Deterministic, so tokens join.
    Hmac(Normalize),
    /// A fixed text in place of every value.
    Redact(String),
    /// `null` in place of every value; the column keeps its type.
    Null,
    /// The first `n` characters kept, every other one written as `*`.
    KeepFirst(usize),
    /// The last `n` characters kept, every other one written as `*`.
    KeepLast(usize),
    /// The first `n` characters, the rest cut off.
    Truncate(usize),
    /// Timestamps and dates to the start of their hour, day, month or year; numbers
    /// to the lower bound of their bucket.
    Generalize(Generalize),
    /// The column is removed: no sink, guest or log sees that it exists.
    Drop,
    /// The named guest stage (a file stem of the plugin folder) is responsible: the
    /// gate passes the values to it, no stage runs before it, and the pipeline checks
    /// per batch that it wrote every value that is not `null`
    /// ([`crate::pipeline::custody::Custody`]).
    Guest(String),
}

/// Normalisation before hashing, in this order: trim, lower-case, digits only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Normalize {
    pub trim: bool,
    pub lower: bool,
    pub digits: bool,
}

impl Normalize {
    fn is_none(self) -> bool {
        self == Normalize::default()
    }

    /// Writes `text` normalised into `out` (cleared first).
    fn write(self, text: &str, out: &mut Vec<u8>) {
        out.clear();
        let text = if self.trim { text.trim() } else { text };
        if !self.lower {
            out.extend_from_slice(text.as_bytes());
        } else if text.is_ascii() {
            out.extend(text.bytes().map(|b| b.to_ascii_lowercase()));
        } else {
            out.extend_from_slice(text.to_lowercase().as_bytes());
        }
        if self.digits {
            out.retain(u8::is_ascii_digit);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generalize {
    Hour,
    Day,
    Month,
    Year,
    /// Buckets of this width (a positive integer) for integers, floats and numerics.
    Width(i64),
}

/// The family of a column's type, as far as actions care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Values held as text: text, varchar, char, name, enums, arrays, intervals, ...
    Text,
    Integer,
    Float,
    Numeric,
    Date,
    Timestamp,
    /// Everything else: bool, bytea, uuid, json, time.
    Other,
}

impl Kind {
    pub fn of(type_oid: u32) -> Kind {
        match type_oid {
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => Kind::Integer,
            oid::FLOAT4 | oid::FLOAT8 => Kind::Float,
            oid::NUMERIC => Kind::Numeric,
            oid::DATE => Kind::Date,
            oid::TIMESTAMP | oid::TIMESTAMPTZ => Kind::Timestamp,
            oid::BOOL | oid::BYTEA | oid::UUID | oid::JSON | oid::JSONB | oid::TIME => Kind::Other,
            _ => Kind::Text,
        }
    }
}

/// Bytes of the MAC a token keeps (128 bits).
pub const TOKEN_BYTES: usize = 16;

/// The policy key and its id: one HMAC costs two SHA-256 blocks for a short value.
#[derive(Clone, Debug)]
pub struct Keyed {
    pub id: String,
    hmac: Hmac,
}

impl Keyed {
    pub fn new(id: &str, secret: &[u8]) -> Keyed {
        Keyed {
            id: id.to_owned(),
            hmac: Hmac::new(secret),
        }
    }

    /// HMAC-SHA-256 of `data`.
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        self.hmac.mac(&[data])
    }

    /// `ID:` and the hex digits of the first [`TOKEN_BYTES`] of the MAC of `data`.
    pub fn token(&self, data: &[u8]) -> String {
        let mut digits = [0u8; 2 * TOKEN_BYTES];
        hex::encode_to_slice(&self.mac(data)[..TOKEN_BYTES], &mut digits)
            .expect("two hex digits a byte");
        let mut out = String::with_capacity(self.id.len() + 1 + digits.len());
        out.push_str(&self.id);
        out.push(':');
        out.push_str(std::str::from_utf8(&digits).expect("hex digits are ASCII"));
        out
    }
}

impl Action {
    /// How strict the action is: a column comment may only raise it.
    pub fn rank(&self) -> u8 {
        match self {
            Action::Keep => 0,
            Action::Generalize(_)
            | Action::Truncate(_)
            | Action::KeepFirst(_)
            | Action::KeepLast(_) => 1,
            // A pinned stage the host holds to writing every value: as strict as a
            // keyed token, which is what a masking stage is trusted to produce.
            Action::Hmac(_) | Action::Guest(_) => 2,
            Action::Redact(_) => 3,
            Action::Null => 4,
            Action::Drop => 5,
        }
    }

    /// Whether the gate lets the value through as it is: `keep`, or a stage's to write.
    pub fn passes_raw(&self) -> bool {
        matches!(self, Action::Keep | Action::Guest(_))
    }

    /// The stage responsible for the values, for `guest:STAGE`.
    pub fn stage(&self) -> Option<&str> {
        match self {
            Action::Guest(stage) => Some(stage),
            _ => None,
        }
    }

    /// Whether the action needs the policy key.
    pub fn needs_key(&self) -> bool {
        matches!(self, Action::Hmac(_))
    }

    /// Why the action cannot take a column of type `type_oid`, or `None` when it can.
    pub fn refuses(&self, type_oid: u32) -> Option<String> {
        let kind = Kind::of(type_oid);
        let ok = match self {
            Action::Keep
            | Action::Hmac(_)
            | Action::Redact(_)
            | Action::Null
            | Action::Drop
            | Action::Guest(_) => true,
            Action::KeepFirst(_) | Action::KeepLast(_) | Action::Truncate(_) => kind == Kind::Text,
            Action::Generalize(Generalize::Width(_)) => {
                matches!(kind, Kind::Integer | Kind::Float | Kind::Numeric)
            }
            Action::Generalize(Generalize::Hour) => kind == Kind::Timestamp,
            Action::Generalize(_) => matches!(kind, Kind::Timestamp | Kind::Date),
        };
        (!ok).then(|| {
            let takes = match self {
                Action::KeepFirst(_) | Action::KeepLast(_) | Action::Truncate(_) => {
                    "text columns (text, varchar, char, enums)"
                }
                Action::Generalize(Generalize::Width(_)) => {
                    "integer, floating-point and numeric columns"
                }
                Action::Generalize(Generalize::Hour) => "timestamp and timestamptz columns",
                _ => "date, timestamp and timestamptz columns",
            };
            format!("`{self}` takes only {takes}")
        })
    }

    /// The `(type oid, type modifier)` the column has after the action, from the one
    /// it had; `None` for a column the action removes.
    pub fn output_type(&self, type_oid: u32, type_modifier: i32) -> Option<(u32, i32)> {
        match self {
            Action::Drop => None,
            Action::Keep | Action::Null | Action::Generalize(_) | Action::Guest(_) => {
                Some((type_oid, type_modifier))
            }
            Action::Hmac(_)
            | Action::Redact(_)
            | Action::KeepFirst(_)
            | Action::KeepLast(_)
            | Action::Truncate(_) => Some((oid::TEXT, -1)),
        }
    }

    /// Applies the action to one value in place. `key` is the policy key, present
    /// whenever a class hashes (the configuration guarantees it).
    pub fn apply(&self, value: &mut Value, key: Option<&Keyed>, scratch: &mut Vec<u8>) {
        if matches!(value, Value::Null | Value::UnchangedToast) {
            return;
        }
        let out = match self {
            // The responsible stage writes it; the pipeline checks that it did.
            Action::Keep | Action::Guest(_) => return,
            Action::Null | Action::Drop => Value::Null,
            Action::Redact(text) => Value::Text(text.clone()),
            Action::Hmac(normalize) => {
                let Some(key) = key else {
                    *value = Value::Null;
                    return;
                };
                // Text-like values are hashed where they are, others as their text.
                let mut other = Vec::new();
                let raw: &[u8] = match value {
                    Value::Text(s) | Value::Other(s) | Value::Json(s) | Value::Numeric(s) => {
                        s.as_bytes()
                    }
                    _ => {
                        value_bytes(value, &mut other);
                        &other
                    }
                };
                let token = if normalize.is_none() {
                    key.token(raw)
                } else {
                    let text = match std::str::from_utf8(raw) {
                        Ok(text) => std::borrow::Cow::Borrowed(text),
                        Err(_) => String::from_utf8_lossy(raw),
                    };
                    normalize.write(&text, scratch);
                    key.token(scratch)
                };
                Value::Text(token)
            }
            Action::KeepFirst(n) => match text_of(value) {
                Some(s) => Value::Text(mask(s, *n, true)),
                None => Value::Null,
            },
            Action::KeepLast(n) => match text_of(value) {
                Some(s) => Value::Text(mask(s, *n, false)),
                None => Value::Null,
            },
            Action::Truncate(n) => match text_of(value) {
                Some(s) => Value::Text(s.chars().take(*n).collect()),
                None => Value::Null,
            },
            Action::Generalize(g) => match generalize(value, *g) {
                Some(v) => v,
                None => Value::Null,
            },
        };
        *value = out;
    }
}

fn text_of(value: &Value) -> Option<&str> {
    match value {
        Value::Text(s) | Value::Other(s) => Some(s),
        _ => None,
    }
}

/// `n` characters kept at the start (`first`) or the end, the others as `*`.
fn mask(s: &str, n: usize, first: bool) -> String {
    let count = s.chars().count();
    let keep_from = if first { 0 } else { count.saturating_sub(n) };
    let keep_to = if first { n.min(count) } else { count };
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if i >= keep_from && i < keep_to {
                c
            } else {
                '*'
            }
        })
        .collect()
}

const MICROS_PER_HOUR: i64 = 3_600_000_000;
const MICROS_PER_DAY: i64 = 86_400_000_000;

fn generalize(value: &Value, g: Generalize) -> Option<Value> {
    let day_floor = |days: i64, g: Generalize| -> i64 {
        match g {
            Generalize::Month | Generalize::Year => {
                let (y, m, _) = civil_from_days(days);
                let m = if g == Generalize::Year { 1 } else { m };
                days_from_civil(y, m, 1)
            }
            _ => days,
        }
    };
    Some(match (value, g) {
        (Value::Int(v), Generalize::Width(w)) => Value::Int(v.div_euclid(w) * w),
        (Value::Float(v), Generalize::Width(w)) if v.is_finite() => {
            let w = w as f64;
            Value::Float((v / w).floor() * w)
        }
        (Value::Float(v), Generalize::Width(_)) => Value::Float(*v),
        (Value::Numeric(s), Generalize::Width(w)) => Value::Numeric(numeric_floor(s, w)?),
        // Infinities stay what they are.
        (Value::Date(d), _) if *d == i32::MAX || *d == i32::MIN => Value::Date(*d),
        (Value::Date(d), Generalize::Day | Generalize::Month | Generalize::Year) => {
            Value::Date(i32::try_from(day_floor(i64::from(*d), g)).ok()?)
        }
        (Value::Timestamp(t) | Value::Timestamptz(t), _) if *t == i64::MAX || *t == i64::MIN => {
            value.clone()
        }
        (Value::Timestamp(t) | Value::Timestamptz(t), Generalize::Width(_)) => {
            let _ = t;
            return None;
        }
        (Value::Timestamp(t) | Value::Timestamptz(t), _) => {
            let floored = match g {
                Generalize::Hour => t.div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR,
                _ => day_floor(t.div_euclid(MICROS_PER_DAY), g) * MICROS_PER_DAY,
            };
            match value {
                Value::Timestamp(_) => Value::Timestamp(floored),
                _ => Value::Timestamptz(floored),
            }
        }
        _ => return None,
    })
}

/// The lower bound of the bucket of width `w` holding the exact decimal `s`, as an
/// integer decimal; `NaN` and infinities unchanged; `None` past 38 digits.
fn numeric_floor(s: &str, w: i64) -> Option<String> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Some(s.to_owned());
    }
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let whole: i128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let has_fraction = fraction.bytes().any(|b| b != b'0');
    // floor(s): toward minus infinity.
    let floor = if negative {
        -whole - i128::from(has_fraction)
    } else {
        whole
    };
    let w = i128::from(w);
    Some((floor.div_euclid(w) * w).to_string())
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Keep => f.write_str("keep"),
            Action::Guest(stage) => write!(f, "guest:{stage}"),
            Action::Hmac(n) => {
                f.write_str("hmac")?;
                let steps: Vec<&str> = [(n.trim, "trim"), (n.lower, "lower"), (n.digits, "digits")]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, name)| *name)
                    .collect();
                if !steps.is_empty() {
                    write!(f, " ({})", steps.join(", "))?;
                }
                Ok(())
            }
            Action::Redact(text) => write!(f, "redact {text:?}"),
            Action::Null => f.write_str("null"),
            Action::KeepFirst(n) => write!(f, "keep-first:{n}"),
            Action::KeepLast(n) => write!(f, "keep-last:{n}"),
            Action::Truncate(n) => write!(f, "truncate:{n}"),
            Action::Generalize(Generalize::Width(w)) => write!(f, "generalize:{w}"),
            Action::Generalize(g) => write!(
                f,
                "generalize:{}",
                match g {
                    Generalize::Hour => "hour",
                    Generalize::Day => "day",
                    Generalize::Month => "month",
                    _ => "year",
                }
            ),
            Action::Drop => f.write_str("drop"),
        }
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    fn key() -> Keyed {
        Keyed::new("k1", b"0123456789abcdef0123456789abcdef")
    }

    fn applied(action: &Action, mut value: Value) -> Value {
        action.apply(&mut value, Some(&key()), &mut Vec::new());
        value
    }

    #[test]
    fn hmac_is_rfc_4231_keyed_and_tokens_carry_the_key_id() {
        // RFC 4231 test case 2.
        let k = Keyed::new("x", b"Jefe");
        assert_eq!(
            hex::encode(k.mac(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than a block is hashed first.
        let long = Keyed::new("x", &[0xaa; 131]);
        assert_eq!(
            hex::encode(long.mac(b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let token = applied(
            &Action::Hmac(Normalize::default()),
            Value::Text("ada@example.com".into()),
        );
        let Value::Text(token) = token else { panic!() };
        assert!(token.starts_with("k1:") && token.len() == 35, "{token}");
        let plain = hex::encode(Sha256::digest(b"ada@example.com"));
        assert!(!token.contains(&plain));
        // Deterministic, and the same for the same value of another type.
        assert_eq!(
            applied(&Action::Hmac(Normalize::default()), Value::Int(42)),
            applied(
                &Action::Hmac(Normalize::default()),
                Value::Text("42".into())
            )
        );
        assert_ne!(
            applied(
                &Action::Hmac(Normalize::default()),
                Value::Text("ada@example.com".into())
            ),
            Value::Text(
                Keyed::new("k2", b"another key, another token space!").token(b"ada@example.com")
            )
        );
    }

    #[test]
    fn normalisation_makes_spellings_of_one_value_one_token() {
        let all = Action::Hmac(Normalize {
            trim: true,
            lower: true,
            digits: false,
        });
        assert_eq!(
            applied(&all, Value::Text("  Ada@Example.COM ".into())),
            applied(&all, Value::Text("ada@example.com".into()))
        );
        let digits = Action::Hmac(Normalize {
            digits: true,
            ..Normalize::default()
        });
        assert_eq!(
            applied(&digits, Value::Text("+44 (20) 7946-0958".into())),
            applied(&digits, Value::Text("4420 79460958".into()))
        );
    }

    #[test]
    fn masks_and_truncation_count_characters() {
        let v = || Value::Text("+44 7946 0958".into());
        assert_eq!(
            applied(&Action::KeepLast(4), v()),
            Value::Text("*********0958".into())
        );
        assert_eq!(
            applied(&Action::KeepFirst(3), v()),
            Value::Text("+44**********".into())
        );
        assert_eq!(
            applied(&Action::Truncate(3), Value::Text("Zoë Smith".into())),
            Value::Text("Zoë".into())
        );
        assert_eq!(
            applied(&Action::KeepLast(10), Value::Text("ab".into())),
            Value::Text("ab".into())
        );
        assert_eq!(
            applied(&Action::Redact("[hidden]".into()), Value::Int(7)),
            Value::Text("[hidden]".into())
        );
        assert_eq!(applied(&Action::Null, Value::Text("x".into())), Value::Null);
    }

    #[test]
    fn null_and_unchanged_values_pass_every_action() {
        for action in [
            Action::Hmac(Normalize::default()),
            Action::Redact("r".into()),
            Action::KeepLast(2),
            Action::Generalize(Generalize::Day),
        ] {
            assert_eq!(applied(&action, Value::Null), Value::Null);
            assert_eq!(
                applied(&action, Value::UnchangedToast),
                Value::UnchangedToast
            );
        }
    }

    #[test]
    fn generalize_floors_times_and_numbers() {
        // 2024-03-15 13:45:10.5 UTC
        let t = 1_710_510_310_500_000;
        let at = |g| applied(&Action::Generalize(g), Value::Timestamptz(t));
        assert_eq!(
            at(Generalize::Hour),
            Value::Timestamptz(1_710_507_600_000_000)
        );
        assert_eq!(
            at(Generalize::Day),
            Value::Timestamptz(1_710_460_800_000_000)
        );
        assert_eq!(
            at(Generalize::Month),
            Value::Timestamptz(1_709_251_200_000_000)
        );
        assert_eq!(
            at(Generalize::Year),
            Value::Timestamptz(1_704_067_200_000_000)
        );
        let day = 19_797; // 2024-03-15
        assert_eq!(
            applied(&Action::Generalize(Generalize::Month), Value::Date(day)),
            Value::Date(19_783)
        );
        assert_eq!(
            applied(&Action::Generalize(Generalize::Year), Value::Date(i32::MAX)),
            Value::Date(i32::MAX)
        );
        let w = Action::Generalize(Generalize::Width(10));
        assert_eq!(applied(&w, Value::Int(47)), Value::Int(40));
        assert_eq!(applied(&w, Value::Int(-1)), Value::Int(-10));
        assert_eq!(applied(&w, Value::Float(47.9)), Value::Float(40.0));
        assert_eq!(
            applied(&w, Value::Numeric("47.25".into())),
            Value::Numeric("40".into())
        );
        assert_eq!(
            applied(&w, Value::Numeric("-0.5".into())),
            Value::Numeric("-10".into())
        );
        assert_eq!(
            applied(&w, Value::Numeric("NaN".into())),
            Value::Numeric("NaN".into())
        );
    }

    #[test]
    fn each_action_names_the_types_it_refuses() {
        assert!(Action::KeepLast(4).refuses(oid::TEXT).is_none());
        assert!(
            Action::KeepLast(4)
                .refuses(oid::INT8)
                .unwrap()
                .contains("text columns")
        );
        assert!(
            Action::Generalize(Generalize::Hour)
                .refuses(oid::DATE)
                .is_some()
        );
        assert!(
            Action::Generalize(Generalize::Day)
                .refuses(oid::DATE)
                .is_none()
        );
        assert!(
            Action::Generalize(Generalize::Width(5))
                .refuses(oid::NUMERIC)
                .is_none()
        );
        assert!(
            Action::Generalize(Generalize::Width(5))
                .refuses(oid::TEXT)
                .is_some()
        );
        assert_eq!(
            Action::Hmac(Normalize::default()).output_type(oid::INT8, -1),
            Some((oid::TEXT, -1))
        );
        assert_eq!(
            Action::Null.output_type(oid::INT8, -1),
            Some((oid::INT8, -1))
        );
        assert_eq!(Action::Drop.output_type(oid::INT8, -1), None);
    }
}
