//! A small lossless JSON model: integers stay integers, duplicate keys are
//! rejected, and text output follows `JSON.stringify` escaping plus the
//! reference's number rules (bucket-id style or lossless `N.0` style).

use crate::value::{js_number, js_number_lossless, SqliteValue};
use std::fmt::Write;

/// Parsed JSON value keeping integer/float distinction and key order.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

/// Maximum nesting accepted by the parser (protects the stack).
const MAX_DEPTH: usize = 256;

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

/// Parses JSON text. Duplicate object keys are an error.
pub(crate) fn parse(text: &str) -> Result<Json, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        pos: 0,
    };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.pos != p.s.len() {
        return Err(format!("Unexpected token in JSON at position {}", p.pos));
    }
    Ok(v)
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.pos < self.s.len() && matches!(self.s[self.pos], b' ' | b'\t' | b'\n' | b'\r') {
            self.pos += 1;
        }
    }

    fn err<T>(&self) -> Result<T, String> {
        Err(format!("Unexpected token in JSON at position {}", self.pos))
    }

    fn lit(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.s[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(v)
        } else {
            self.err()
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > MAX_DEPTH {
            return Err("JSON nested too deeply".into());
        }
        match self.s.get(self.pos) {
            None => Err("Unexpected end of JSON input".into()),
            Some(b'n') => self.lit("null", Json::Null),
            Some(b't') => self.lit("true", Json::Bool(true)),
            Some(b'f') => self.lit("false", Json::Bool(false)),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.pos) == Some(&b']') {
                    self.pos += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    self.ws();
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.s.get(self.pos) {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return self.err(),
                    }
                }
            }
            Some(b'{') => {
                self.pos += 1;
                let mut fields: Vec<(String, Json)> = Vec::new();
                self.ws();
                if self.s.get(self.pos) == Some(&b'}') {
                    self.pos += 1;
                    return Ok(Json::Object(fields));
                }
                loop {
                    self.ws();
                    if self.s.get(self.pos) != Some(&b'"') {
                        return self.err();
                    }
                    let key = self.string()?;
                    self.ws();
                    if self.s.get(self.pos) != Some(&b':') {
                        return self.err();
                    }
                    self.pos += 1;
                    self.ws();
                    let v = self.value(depth + 1)?;
                    if fields.iter().any(|(k, _)| *k == key) {
                        return Err(format!("Duplicate key in JSON: {key}"));
                    }
                    fields.push((key, v));
                    self.ws();
                    match self.s.get(self.pos) {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            return Ok(Json::Object(fields));
                        }
                        _ => return self.err(),
                    }
                }
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => self.err(),
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.pos;
        let mut float = false;
        if self.s.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        let digits = |p: &mut Self| {
            let st = p.pos;
            while p.pos < p.s.len() && p.s[p.pos].is_ascii_digit() {
                p.pos += 1;
            }
            p.pos - st
        };
        let int_start = self.pos;
        let n = digits(self);
        if n == 0 || (n > 1 && self.s[int_start] == b'0') {
            return self.err();
        }
        if self.s.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            float = true;
            if digits(self) == 0 {
                return self.err();
            }
        }
        if matches!(self.s.get(self.pos), Some(b'e' | b'E')) {
            self.pos += 1;
            float = true;
            if matches!(self.s.get(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if digits(self) == 0 {
                return self.err();
            }
        }
        let text = std::str::from_utf8(&self.s[start..self.pos]).map_err(|e| e.to_string())?;
        if !float {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(Json::Int(i));
            }
        }
        text.parse::<f64>().map(Json::Float).map_err(|e| e.to_string())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self
            .s
            .get(self.pos..self.pos + 4)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|t| u32::from_str_radix(t, 16).ok());
        match h {
            Some(v) => {
                self.pos += 4;
                Ok(v)
            }
            None => self.err(),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.pos += 1; // opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.pos) else {
                return Err("Unterminated string in JSON".into());
            };
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.pos) else {
                        return self.err();
                    };
                    self.pos += 1;
                    let ch: char = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) && self.s.get(self.pos..self.pos + 2) == Some(b"\\u") {
                                let save = self.pos;
                                self.pos += 2;
                                let lo = self.hex4()?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                } else {
                                    self.pos = save;
                                    0xFFFD
                                }
                            } else {
                                hi
                            };
                            char::from_u32(code).unwrap_or('\u{FFFD}')
                        }
                        _ => return self.err(),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c if c < 0x20 => return self.err(),
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

/// True when `bytes` holds a control character, `"` or `\\` (the bytes JSON escapes). A third
/// of row evaluation is writing JSON strings, most of which need no escaping: this looks at
/// whole blocks and words without a branch per byte, and covers a ragged end by checking an
/// overlapping block or word again (a byte checked twice changes nothing).
#[inline]
fn needs_escape(bytes: &[u8]) -> bool {
    if let Some(last) = bytes.last_chunk::<16>() {
        let (blocks, rest) = bytes.as_chunks::<16>();
        return blocks.iter().any(block_needs_escape) || (!rest.is_empty() && block_needs_escape(last));
    }
    if let (Some(first), Some(last)) = (bytes.first_chunk::<8>(), bytes.last_chunk::<8>()) {
        return word_needs_escape(u64::from_le_bytes(*first)) || word_needs_escape(u64::from_le_bytes(*last));
    }
    if let (Some(first), Some(last)) = (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) {
        // Two overlapping 4-byte halves make one word.
        return word_needs_escape(u64::from(u32::from_le_bytes(*first)) | u64::from(u32::from_le_bytes(*last)) << 32);
    }
    bytes.iter().any(|&b| ESCAPED[usize::from(b)])
}

/// 16 bytes at once: the compiler turns this into a few vector compares (SSE2 on x86_64).
#[inline]
fn block_needs_escape(block: &[u8; 16]) -> bool {
    block
        .iter()
        .fold(false, |found, &b| found | (b < 0x20) | (b == b'"') | (b == b'\\'))
}

/// For an 8-byte word, "some byte < 0x20" and "some byte equals c" are the classic exact bit
/// tricks (a byte ≥ 0x80 never triggers them).
#[inline]
fn word_needs_escape(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    below(x, 0x20) | below(x ^ (ONES * u64::from(b'"')), 1) | below(x ^ (ONES * u64::from(b'\\')), 1) != 0
}

/// Bytes `JSON.stringify` escapes: controls, `"` and `\`.
static ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Appends `s` as a JSON string literal with `JSON.stringify` escaping.
#[inline]
pub(crate) fn write_str(out: &mut String, s: &str) {
    // Most strings need no escaping: check 8 bytes at a time, then copy the string whole.
    if needs_escape(s.as_bytes()) {
        return write_escaped(out, s);
    }
    out.reserve(s.len() + 2);
    out.push('"');
    out.push_str(s);
    out.push('"');
}

#[cold]
fn write_escaped(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    // Runs of bytes that need no escaping are copied whole: every byte that needs escaping is
    // ASCII, so the run boundaries are char boundaries.
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.push_str(&s[start..i]);
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// True for keys JS orders first in objects (canonical array indices).
fn is_index_key(k: &str) -> Option<u32> {
    if k.is_empty() || (k.len() > 1 && k.starts_with('0')) || !k.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    k.parse::<u32>().ok().filter(|n| *n != u32::MAX)
}

/// Object keys in JS property order (integer-like keys ascending first).
pub(crate) fn js_key_order<K: AsRef<str>, T>(fields: &[(K, T)]) -> Vec<usize> {
    let mut idx: Vec<(u32, usize)> = Vec::new();
    let mut rest = Vec::new();
    for (i, (k, _)) in fields.iter().enumerate() {
        match is_index_key(k.as_ref()) {
            Some(n) => idx.push((n, i)),
            None => rest.push(i),
        }
    }
    idx.sort();
    idx.into_iter().map(|(_, i)| i).chain(rest).collect()
}

impl Json {
    /// Lossless JSON text (REAL 42.0 prints `42.0`), JS key order.
    pub(crate) fn to_text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => out.push_str(&i.to_string()),
            Json::Float(f) => out.push_str(&js_number_lossless(*f)),
            Json::Str(s) => write_str(out, s),
            Json::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Json::Object(fields) => {
                out.push('{');
                for (n, i) in js_key_order(fields).into_iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    write_str(out, &fields[i].0);
                    out.push(':');
                    fields[i].1.write(out);
                }
                out.push('}');
            }
        }
    }

    /// SQLite value of a JSON value (`->>` semantics); `null_text` selects the
    /// legacy behaviour where JSON null becomes TEXT `'null'`.
    pub(crate) fn to_sqlite(&self, null_text: bool) -> SqliteValue {
        match self {
            Json::Null if null_text => SqliteValue::Text("null".into()),
            Json::Null => SqliteValue::Null,
            Json::Bool(b) => SqliteValue::from(*b),
            Json::Int(i) => SqliteValue::Integer(*i),
            Json::Float(f) => SqliteValue::Real(*f),
            Json::Str(s) => SqliteValue::Text(s.clone()),
            Json::Array(_) | Json::Object(_) => SqliteValue::Text(self.to_text()),
        }
    }

    /// Member access by a string key (arrays accept canonical indices).
    pub(crate) fn member(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            Json::Array(items) => is_index_key(key).and_then(|i| items.get(i as usize)),
            _ => None,
        }
    }
}

/// Converts a `serde_json` value; `ints_as_float` mimics JS numbers (every
/// number becomes a double, as after a plain `JSON.parse`).
pub(crate) fn from_serde(v: &serde_json::Value, ints_as_float: bool) -> Json {
    match v {
        serde_json::Value::Null => Json::Null,
        serde_json::Value::Bool(b) => Json::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) if !ints_as_float => Json::Int(i),
            _ => Json::Float(n.as_f64().unwrap_or(0.0)),
        },
        serde_json::Value::String(s) => Json::Str(s.clone()),
        serde_json::Value::Array(a) => Json::Array(a.iter().map(|x| from_serde(x, ints_as_float)).collect()),
        serde_json::Value::Object(o) => Json::Object(o.iter().map(|(k, x)| (k.clone(), from_serde(x, ints_as_float))).collect()),
    }
}

/// Appends an integer's decimal text (without `fmt`: row data is full of integers).
pub(crate) fn write_int(out: &mut String, i: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(i));
}

/// Writes one value for a bucket id / lookup key (REAL in JS format, no `.0`).
pub(crate) fn write_param_value(out: &mut String, v: &SqliteValue) {
    match v {
        SqliteValue::Null | SqliteValue::Blob(_) => out.push_str("null"),
        SqliteValue::Integer(i) => write_int(out, *i),
        SqliteValue::Real(f) if f.is_finite() => out.push_str(&js_number(*f)),
        SqliteValue::Real(_) => out.push_str("null"),
        SqliteValue::Text(s) => write_str(out, s),
    }
}

/// Serialises parameter values as a compact JSON array (bucket-id style).
pub(crate) fn serialize_params<'a>(values: impl IntoIterator<Item = &'a SqliteValue>) -> String {
    let mut out = String::with_capacity(32);
    write_params(&mut out, values);
    out
}

/// Appends parameter values as a compact JSON array (bucket-id style).
pub(crate) fn write_params<'a>(out: &mut String, values: impl IntoIterator<Item = &'a SqliteValue>) {
    out.push('[');
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_param_value(out, v);
    }
    out.push(']');
}

/// Writes a value for stored/output row JSON (lossless: REAL keeps `.0`).
pub(crate) fn write_data_value(out: &mut String, v: &SqliteValue) {
    match v {
        SqliteValue::Null | SqliteValue::Blob(_) => out.push_str("null"),
        SqliteValue::Integer(i) => write_int(out, *i),
        SqliteValue::Real(f) => out.push_str(&js_number_lossless(*f)),
        SqliteValue::Text(s) => write_str(out, s),
    }
}

/// Compact JSON object text from ordered columns (JS key order).
pub(crate) fn object_text<K: AsRef<str>, V: std::borrow::Borrow<SqliteValue>>(fields: &[(K, V)]) -> String {
    object_text_of(fields.iter().map(|(k, v)| (k.as_ref(), v.borrow())))
}

/// [`object_text`] of fields given as an iterator, walked twice (sizing, then writing), so a
/// row's columns need not be collected first.
pub(crate) fn object_text_of<'a>(fields: impl Iterator<Item = (&'a str, &'a SqliteValue)> + Clone) -> String {
    // Sized up front: growing the string while writing showed up as a tenth of row evaluation.
    let mut size = 2;
    // Column names are rarely integer-like; only then does JS reorder the keys.
    let mut reorder = false;
    for (key, value) in fields.clone() {
        size += key.len()
            + 4
            + match value {
                SqliteValue::Text(t) => t.len() + 2,
                _ => 24,
            };
        reorder |= is_index_key(key).is_some();
    }
    let mut out = String::with_capacity(size);
    out.push('{');
    let mut write = |n: usize, key: &str, value: &SqliteValue| {
        if n > 0 {
            out.push(',');
        }
        write_str(&mut out, key);
        out.push(':');
        write_data_value(&mut out, value);
    };
    if reorder {
        let all: Vec<(&str, &SqliteValue)> = fields.collect();
        for (n, i) in js_key_order(&all).into_iter().enumerate() {
            write(n, all[i].0, all[i].1);
        }
    } else {
        for (n, (key, value)) in fields.enumerate() {
            write(n, key, value);
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let v = parse(r#"{"b":1,"a":[1.0,2.5,"x\n"],"0":null}"#).unwrap();
        assert_eq!(v.to_text(), r#"{"0":null,"b":1,"a":[1.0,2.5,"x\n"]}"#);
        assert!(parse(r#"{"a":1,"a":2}"#).is_err());
        assert!(parse("TRUE").is_err());
        assert_eq!(parse("3").unwrap(), Json::Int(3));
        assert_eq!(parse("\"\\ud83d\\ude00\"").unwrap(), Json::Str("😀".into()));
    }

    #[test]
    fn escape_detection_matches_the_bytewise_rule() {
        let bytewise = |s: &[u8]| s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        let samples: [&[u8]; 9] = [
            b"plain ascii text",
            b"0123456789abcdef\"",
            b"tab\there",
            "h\u{e9}llo w\u{f6}rld \u{1F600}".as_bytes(),
            b"\x7f\x80\xff\x20\x21",
            b"ends with backslash\\",
            b"",
            b"\x1f",
            b"almost\x20\x21\x23\x5b\x5d",
        ];
        for s in samples {
            assert_eq!(needs_escape(s), bytewise(s), "{s:?}");
        }
        // Every byte value at every place of the 16-byte blocks, the 8-byte word and the tail.
        for b in 0..=255u8 {
            for len in [1, 3, 4, 5, 7, 8, 10, 15, 16, 31, 36, 40] {
                for pos in 0..len {
                    let mut v = vec![b'a'; len];
                    v[pos] = b;
                    assert_eq!(needs_escape(&v), bytewise(&v), "byte {b} at {pos} of {len}");
                }
            }
        }
    }

    #[test]
    fn escaping() {
        let mut s = String::new();
        write_str(&mut s, "a\"b\\\u{1}é");
        assert_eq!(s, "\"a\\\"b\\\\\\u0001é\"");
    }
}
