//! Scalar SQL functions available in the legacy dialect (`upper`, `hex`,
//! `json_extract`, …) with the reference's JavaScript-flavoured semantics.

mod dates;
pub use dates::iso8601_millis;
mod geo;

use crate::expr::{json_array_values, json_path};
use crate::json::{self, js_key_order, Json};
use crate::value::{cast_integer, compare, sqlite_bool, to_blob, to_text, SqliteValue};

/// A scalar function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Func {
    Upper,
    Lower,
    Length,
    Hex,
    Base64,
    Typeof,
    Ifnull,
    Iif,
    Instr,
    Substring,
    JsonExtract,
    JsonArrayLength,
    JsonValid,
    JsonKeys,
    UuidBlob,
    Unixepoch,
    Datetime,
    /// `a && b` of sync streams: the two JSON arrays share an element.
    JsonOverlap,
    /// PostGIS helpers (spec §3.5), see [`geo`].
    StAsGeoJson,
    StAsText,
    StX,
    StY,
}

impl Func {
    /// Whether edition 3 knows the function (it lacks `json_valid`).
    pub(crate) fn in_edition3(self) -> bool {
        self != Func::JsonValid
    }
}

/// Looks a function up by (lower-case) name: the function and its arity.
pub(crate) fn lookup(name: &str) -> Option<(Func, usize, usize)> {
    Some(match name {
        "upper" => (Func::Upper, 1, 1),
        "lower" => (Func::Lower, 1, 1),
        "length" => (Func::Length, 1, 1),
        "hex" => (Func::Hex, 1, 1),
        "base64" => (Func::Base64, 1, 1),
        "typeof" => (Func::Typeof, 1, 1),
        "ifnull" => (Func::Ifnull, 2, 2),
        "iif" => (Func::Iif, 3, 3),
        "instr" => (Func::Instr, 2, 2),
        "substring" | "substr" => (Func::Substring, 2, 3),
        "json_extract" => (Func::JsonExtract, 2, 2),
        "json_array_length" => (Func::JsonArrayLength, 1, 2),
        "json_valid" => (Func::JsonValid, 1, 1),
        "json_keys" => (Func::JsonKeys, 1, 1),
        "uuid_blob" => (Func::UuidBlob, 1, 1),
        "unixepoch" => (Func::Unixepoch, 1, 3),
        "datetime" => (Func::Datetime, 1, 3),
        "st_asgeojson" => (Func::StAsGeoJson, 1, 1),
        "st_astext" => (Func::StAsText, 1, 1),
        "st_x" => (Func::StX, 1, 1),
        "st_y" => (Func::StY, 1, 1),
        _ => return None,
    })
}

fn json_overlap(a: &SqliteValue, b: &SqliteValue) -> Result<SqliteValue, String> {
    if a.is_null() || b.is_null() {
        return Ok(SqliteValue::Null);
    }
    let (left, right) = (json_array_values(a)?, json_array_values(b)?);
    for x in left.iter().filter(|x| !x.is_null()) {
        for y in right.iter().filter(|y| !y.is_null()) {
            if compare(x, y)? == std::cmp::Ordering::Equal {
                return Ok(SqliteValue::Integer(1));
            }
        }
    }
    Ok(SqliteValue::Integer(0))
}

fn text_fn(v: &SqliteValue, f: impl Fn(String) -> SqliteValue) -> SqliteValue {
    to_text(v).map_or(SqliteValue::Null, f)
}

fn utf16_len(s: &str) -> i64 {
    s.encode_utf16().count() as i64
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn int_arg(v: &SqliteValue) -> i64 {
    match cast_integer(v) {
        SqliteValue::Integer(i) => i,
        _ => 0,
    }
}

/// SQLite `substr` on UTF-16 code units.
fn substring(x: &SqliteValue, start: &SqliteValue, len: Option<&SqliteValue>) -> SqliteValue {
    if x.is_null() || start.is_null() || len.is_some_and(|l| l.is_null()) {
        return SqliteValue::Null;
    }
    let Some(text) = to_text(x) else {
        return SqliteValue::Null;
    };
    let units: Vec<u16> = text.encode_utf16().collect();
    let total = units.len() as i64;
    let mut p1 = int_arg(start);
    let mut neg = false;
    let mut p2 = match len {
        Some(l) => {
            let v = int_arg(l);
            if v < 0 {
                neg = true;
                v.saturating_neg()
            } else {
                v
            }
        }
        None => i64::MAX / 4,
    };
    if p1 < 0 {
        p1 += total;
        if p1 < 0 {
            p2 = (p2 + p1).max(0);
            p1 = 0;
        }
    } else if p1 > 0 {
        p1 -= 1;
    } else if p2 > 0 {
        p2 -= 1;
    }
    if neg {
        p1 -= p2;
        if p1 < 0 {
            p2 += p1;
            p1 = 0;
        }
    }
    if p1.saturating_add(p2) > total {
        p2 = (total - p1).max(0);
    }
    let from = p1.min(total) as usize;
    let to = p1.saturating_add(p2).min(total) as usize;
    SqliteValue::Text(String::from_utf16_lossy(&units[from..to.max(from)]))
}

fn instr(x: &SqliteValue, y: &SqliteValue) -> SqliteValue {
    match (x, y) {
        (SqliteValue::Null, _) | (_, SqliteValue::Null) => SqliteValue::Null,
        (SqliteValue::Blob(h), SqliteValue::Blob(n)) => {
            let pos = if n.is_empty() {
                Some(0)
            } else {
                h.windows(n.len()).position(|w| w == n.as_slice())
            };
            SqliteValue::Integer(pos.map_or(0, |p| p as i64 + 1))
        }
        _ => {
            let (h, n) = (to_text(x).unwrap_or_default(), to_text(y).unwrap_or_default());
            SqliteValue::Integer(h.find(&n).map_or(0, |p| utf16_len(&h[..p]) + 1))
        }
    }
}

fn uuid_blob(v: &SqliteValue) -> Result<SqliteValue, String> {
    let Some(t) = to_text(v) else {
        return Ok(SqliteValue::Null);
    };
    let err = || "Cannot call uuid_blob on a non UUID value".to_string();
    let dashed = t.len() == 36 && t.char_indices().all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-'));
    let hex: String = t.chars().filter(|c| *c != '-').collect();
    if !(dashed || t.len() == 32) || hex.len() != 32 {
        return Err(err());
    }
    let mut out = Vec::with_capacity(16);
    for i in 0..16 {
        let byte = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(err)?;
        out.push(byte);
    }
    Ok(SqliteValue::Blob(out))
}

fn parse_json_arg(v: &SqliteValue) -> Result<Option<Json>, String> {
    match to_text(v) {
        None => Ok(None),
        Some(t) => json::parse(&t).map(Some),
    }
}

/// Calls a function with already-evaluated arguments (arity is checked at
/// compile time).
pub(crate) fn call(f: Func, a: &[SqliteValue], fixed_json: bool) -> Result<SqliteValue, String> {
    let null = SqliteValue::Null;
    let arg = |i: usize| a.get(i).unwrap_or(&null);
    Ok(match f {
        Func::Upper => text_fn(arg(0), |s| SqliteValue::Text(s.to_uppercase())),
        Func::Lower => text_fn(arg(0), |s| SqliteValue::Text(s.to_lowercase())),
        Func::Length => match arg(0) {
            SqliteValue::Blob(b) => SqliteValue::Integer(b.len() as i64),
            v => text_fn(v, |s| SqliteValue::Integer(utf16_len(&s))),
        },
        Func::Hex => {
            let bytes = to_blob(arg(0)).unwrap_or_default();
            SqliteValue::Text(bytes.iter().map(|b| format!("{b:02X}")).collect())
        }
        Func::Base64 => SqliteValue::Text(base64(&to_blob(arg(0)).unwrap_or_default())),
        Func::Typeof => SqliteValue::Text(arg(0).type_name().to_string()),
        Func::Ifnull => {
            if arg(0).is_null() {
                arg(1).clone()
            } else {
                arg(0).clone()
            }
        }
        Func::Iif => {
            if sqlite_bool(arg(0)) {
                arg(1).clone()
            } else {
                arg(2).clone()
            }
        }
        Func::Instr => instr(arg(0), arg(1)),
        Func::JsonOverlap => json_overlap(arg(0), arg(1))?,
        Func::Substring => substring(arg(0), arg(1), a.get(2)),
        Func::JsonExtract => match json_path(arg(0), arg(1), fixed_json, true)? {
            None => null,
            Some(v) => v.to_sqlite(!fixed_json),
        },
        Func::JsonArrayLength => {
            let doc = if a.len() > 1 {
                json_path(arg(0), arg(1), fixed_json, true)?
            } else {
                parse_json_arg(arg(0))?
            };
            match doc {
                None => null,
                Some(Json::Array(items)) => SqliteValue::Integer(items.len() as i64),
                Some(_) => SqliteValue::Integer(0),
            }
        }
        Func::JsonValid => SqliteValue::from(matches!(parse_json_arg(arg(0)), Ok(Some(_)))),
        Func::JsonKeys => match parse_json_arg(arg(0))? {
            None => null,
            Some(Json::Object(fields)) => {
                let keys = js_key_order(&fields).into_iter().map(|i| Json::Str(fields[i].0.clone())).collect();
                SqliteValue::Text(Json::Array(keys).to_text())
            }
            Some(Json::Array(_)) => return Err("Cannot call json_keys on an array".into()),
            Some(_) => return Err("Cannot call json_keys on a scalar".into()),
        },
        Func::UuidBlob => uuid_blob(arg(0))?,
        Func::Unixepoch => dates::call(dates::DateFn::Unixepoch, a),
        Func::Datetime => dates::call(dates::DateFn::Datetime, a),
        Func::StAsGeoJson => geo::call(geo::GeoFn::AsGeoJson, arg(0))?,
        Func::StAsText => geo::call(geo::GeoFn::AsText, arg(0))?,
        Func::StX => geo::call(geo::GeoFn::X, arg(0))?,
        Func::StY => geo::call(geo::GeoFn::Y, arg(0))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SqliteValue {
        SqliteValue::Text(s.into())
    }

    #[test]
    fn substr_semantics() {
        let s = t("abcdef");
        let i = SqliteValue::Integer;
        assert_eq!(substring(&s, &i(2), Some(&i(3))), t("bcd"));
        assert_eq!(substring(&s, &i(0), Some(&i(2))), t("a"));
        assert_eq!(substring(&s, &i(-2), None), t("ef"));
        assert_eq!(substring(&s, &i(4), Some(&i(-2))), t("bc"));
        assert_eq!(substring(&s, &i(10), None), t(""));
        assert_eq!(substring(&s, &i(1), Some(&SqliteValue::Null)), SqliteValue::Null);
    }

    #[test]
    fn base64_and_uuid() {
        assert_eq!(base64(b"123"), "MTIz");
        assert_eq!(base64(b"1234"), "MTIzNA==");
        assert_eq!(base64(b""), "");
        let u = uuid_blob(&t("01234567-89ab-cdef-0123-456789abcdef")).unwrap();
        assert!(matches!(u, SqliteValue::Blob(b) if b.len() == 16));
        assert!(uuid_blob(&t("nope")).is_err());
    }
}
