//! Postgres array literals (`{1,2,"a b",NULL}`) -> JSON array text.

use crate::types::decode_text;
use ferrosync_rules::{Compatibility, SqliteValue};

/// Parse a (possibly nested) array literal of element type `elem` into compact JSON.
/// Malformed input is returned unchanged as text rather than failing replication.
pub fn parse_array(text: &str, elem: u32, compat: &Compatibility) -> String {
    // Arrays with explicit bounds look like `[0:1]={1,2}`; the bounds carry no data for JSON.
    let body = match text.find("={") {
        Some(pos) if text.starts_with('[') => &text[pos + 1..],
        _ => text,
    };
    let mut parser = Parser {
        chars: body.as_bytes(),
        pos: 0,
        elem,
        compat,
    };
    let mut out = String::with_capacity(text.len() + 8);
    match parser.array(&mut out) {
        Some(()) if parser.pos == body.len() => out,
        _ => text.to_string(),
    }
}

struct Parser<'a> {
    chars: &'a [u8],
    pos: usize,
    elem: u32,
    compat: &'a Compatibility,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.chars.get(self.pos).copied()
    }

    fn array(&mut self, out: &mut String) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.pos += 1;
        out.push('[');
        if self.peek()? == b'}' {
            self.pos += 1;
            out.push(']');
            return Some(());
        }
        loop {
            match self.peek()? {
                b'{' => self.array(out)?,
                b'"' => {
                    let s = self.quoted()?;
                    self.element(&s, out);
                }
                _ => {
                    let start = self.pos;
                    while !matches!(self.peek()?, b',' | b'}') {
                        self.pos += 1;
                    }
                    let raw = std::str::from_utf8(&self.chars[start..self.pos]).ok()?;
                    if raw == "NULL" {
                        out.push_str("null");
                    } else {
                        self.element(raw, out);
                    }
                }
            }
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    out.push(',');
                }
                b'}' => {
                    self.pos += 1;
                    out.push(']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn quoted(&mut self) -> Option<String> {
        self.pos += 1;
        let mut bytes = Vec::new();
        loop {
            match self.peek()? {
                b'\\' => {
                    self.pos += 1;
                    bytes.push(self.peek()?);
                }
                b'"' => {
                    self.pos += 1;
                    return String::from_utf8(bytes).ok();
                }
                b => bytes.push(b),
            }
            self.pos += 1;
        }
    }

    fn element(&self, raw: &str, out: &mut String) {
        if matches!(self.elem, crate::types::JSON | crate::types::JSONB) {
            out.push_str(raw);
            return;
        }
        match decode_text(self.elem, raw, self.compat) {
            SqliteValue::Integer(i) => out.push_str(&i.to_string()),
            SqliteValue::Real(f) if f.is_finite() => out.push_str(
                &serde_json::Number::from_f64(f)
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "null".into()),
            ),
            SqliteValue::Real(_) | SqliteValue::Null | SqliteValue::Blob(_) => out.push_str("null"),
            SqliteValue::Text(t) => out.push_str(&serde_json::Value::String(t).to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compat() -> Compatibility {
        Compatibility {
            timestamps_iso8601: false,
            versioned_bucket_ids: true,
            fixed_json_extract: false,
            custom_postgres_types: false,
        }
    }

    #[test]
    fn arrays() {
        let c = compat();
        assert_eq!(parse_array("{1,2,NULL}", 23, &c), "[1,2,null]");
        assert_eq!(parse_array("{{1,2},{3,4}}", 23, &c), "[[1,2],[3,4]]");
        assert_eq!(
            parse_array(r#"{a,"b c","d\"e",NULL,"NULL"}"#, 25, &c),
            r#"["a","b c","d\"e",null,"NULL"]"#
        );
        assert_eq!(parse_array("{t,f}", 16, &c), "[1,0]");
        assert_eq!(parse_array("{}", 25, &c), "[]");
        assert_eq!(parse_array("[0:1]={7,8}", 23, &c), "[7,8]");
        assert_eq!(parse_array(r#"{"{\"a\": 1}"}"#, 3802, &c), r#"[{"a": 1}]"#);
        assert_eq!(parse_array("{1,2", 23, &c), "{1,2");
    }
}
