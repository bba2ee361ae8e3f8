//! SQLite-style values ([`SqliteValue`]), source rows ([`Row`]) and the
//! JavaScript-flavoured conversions the reference service applies to them
//! (number formatting, `sqliteBool`, comparisons and casts).

use std::cmp::Ordering;
use std::sync::Arc;

/// A value with one of the SQLite storage classes.
#[derive(Clone, Debug, PartialEq)]
pub enum SqliteValue {
    /// SQL NULL.
    Null,
    /// 64-bit signed integer (booleans are 1/0).
    Integer(i64),
    /// 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes.
    Blob(Vec<u8>),
}

impl SqliteValue {
    /// True for NULL.
    pub(crate) fn is_null(&self) -> bool {
        matches!(self, SqliteValue::Null)
    }

    /// The SQLite `typeof()` name.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            SqliteValue::Null => "null",
            SqliteValue::Integer(_) => "integer",
            SqliteValue::Real(_) => "real",
            SqliteValue::Text(_) => "text",
            SqliteValue::Blob(_) => "blob",
        }
    }

    /// Integral REALs become INTEGER (used for lookup keys).
    pub(crate) fn normalized(&self) -> SqliteValue {
        match self {
            SqliteValue::Real(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => SqliteValue::Integer(*f as i64),
            other => other.clone(),
        }
    }
}

impl From<bool> for SqliteValue {
    fn from(b: bool) -> Self {
        SqliteValue::Integer(i64::from(b))
    }
}

/// An ordered set of named column values (one source row).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    // Shared names: every row of a table carries the same ones (from the table's columns).
    columns: Vec<(Arc<str>, SqliteValue)>,
}

impl Row {
    /// An empty row.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty row with room for `n` columns.
    pub fn with_capacity(n: usize) -> Self {
        Row {
            columns: Vec::with_capacity(n),
        }
    }

    /// Appends a column (no duplicate check; use [`Row::set`] to replace).
    pub fn push(&mut self, name: impl Into<Arc<str>>, value: SqliteValue) {
        self.columns.push((name.into(), value));
    }

    /// The value of the first column called `name`.
    pub fn get(&self, name: &str) -> Option<&SqliteValue> {
        self.columns.iter().find(|(n, _)| &**n == name).map(|(_, v)| v)
    }

    /// Iterates over the columns in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &SqliteValue)> + Clone {
        self.columns.iter().map(|(n, v)| (&**n, v))
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// True when there are no columns.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// Replaces the value of `name` in place, or appends it.
    pub fn set(&mut self, name: &str, value: SqliteValue) {
        match self.columns.iter_mut().find(|(n, _)| &**n == name) {
            Some(slot) => slot.1 = value,
            None => self.columns.push((name.into(), value)),
        }
    }
}

/// JavaScript `Number.prototype.toString` for a double.
pub(crate) fn js_number(f: f64) -> String {
    if f == 0.0 {
        return "0".to_string();
    }
    let mut buf = ryu_js::Buffer::new();
    buf.format(f).to_string()
}

/// JS number text with a forced `.0` for integral values (lossless JSON rule).
pub(crate) fn js_number_lossless(f: f64) -> String {
    if !f.is_finite() {
        return "null".to_string();
    }
    let s = js_number(f);
    if s.contains(['.', 'e', 'E']) {
        s
    } else {
        s + ".0"
    }
}

/// `castAsText`: NULL stays NULL (None).
pub(crate) fn to_text(v: &SqliteValue) -> Option<String> {
    match v {
        SqliteValue::Null => None,
        SqliteValue::Integer(i) => Some(i.to_string()),
        SqliteValue::Real(f) => Some(js_number(*f)),
        SqliteValue::Text(s) => Some(s.clone()),
        SqliteValue::Blob(b) => Some(String::from_utf8_lossy(b).into_owned()),
    }
}

/// `castAsBlob`: NULL stays NULL (None).
pub(crate) fn to_blob(v: &SqliteValue) -> Option<Vec<u8>> {
    match v {
        SqliteValue::Blob(b) => Some(b.clone()),
        other => to_text(other).map(String::into_bytes),
    }
}

fn is_js_space(c: char) -> bool {
    c.is_whitespace() || c == '\u{feff}'
}

/// JS `parseInt(text)` reduced to "is it a non-zero number".
fn parse_int_nonzero(s: &str) -> bool {
    let t = s.trim_start_matches(is_js_space);
    let t = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (digits, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(rest) => (rest, 16),
        None => (t, 10),
    };
    let run: Vec<char> = digits.chars().take_while(|c| c.is_digit(radix)).collect();
    run.iter().any(|c| *c != '0')
}

/// `sqliteBool`: the truthiness rule used by WHERE, AND, OR, NOT and iif.
pub(crate) fn sqlite_bool(v: &SqliteValue) -> bool {
    match v {
        SqliteValue::Null | SqliteValue::Blob(_) => false,
        SqliteValue::Integer(i) => *i != 0,
        SqliteValue::Real(f) => *f != 0.0 && !f.is_nan(),
        SqliteValue::Text(s) => parse_int_nonzero(s),
    }
}

fn type_rank(v: &SqliteValue) -> u8 {
    match v {
        SqliteValue::Null => 0,
        SqliteValue::Integer(_) | SqliteValue::Real(_) => 1,
        SqliteValue::Text(_) => 2,
        SqliteValue::Blob(_) => 3,
    }
}

/// Compares two non-NULL values with the reference's type order
/// (numeric < TEXT < BLOB, TEXT by UTF-16 code units).
pub(crate) fn compare(a: &SqliteValue, b: &SqliteValue) -> Result<Ordering, String> {
    use SqliteValue::*;
    Ok(match (a, b) {
        (Integer(x), Integer(y)) => x.cmp(y),
        (Integer(x), Real(y)) => (*x as f64).partial_cmp(y).unwrap_or(Ordering::Equal),
        (Real(x), Integer(y)) => x.partial_cmp(&(*y as f64)).unwrap_or(Ordering::Equal),
        (Real(x), Real(y)) => x.partial_cmp(y).unwrap_or(Ordering::Equal),
        (Text(x), Text(y)) => x.encode_utf16().cmp(y.encode_utf16()),
        (Blob(_), Blob(_)) => return Err("Comparing blobs is not supported currently".into()),
        _ => type_rank(a).cmp(&type_rank(b)),
    })
}

/// Leading-numeric-prefix parse used by `CAST(text AS NUMERIC)`.
fn parse_numeric_prefix(s: &str) -> SqliteValue {
    let t = s.trim_start_matches(is_js_space);
    let b = t.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut is_real = false;
    if i < b.len() && b[i] == b'.' {
        let mut j = i + 1;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if int_digits > 0 || j > i + 1 {
            is_real = true;
            i = j;
        }
    }
    if int_digits == 0 && !is_real {
        return SqliteValue::Integer(0);
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        let exp_start = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j > exp_start {
            is_real = true;
            i = j;
        }
    }
    let text = &t[..i];
    if !is_real {
        if let Ok(n) = text.parse::<i64>() {
            return SqliteValue::Integer(n);
        }
    }
    SqliteValue::Real(text.parse::<f64>().unwrap_or(0.0))
}

/// JS `parseFloat` (NaN becomes 0.0).
fn parse_float(s: &str) -> f64 {
    let t = s.trim_start_matches(is_js_space);
    for (prefix, val) in [
        ("Infinity", f64::INFINITY),
        ("+Infinity", f64::INFINITY),
        ("-Infinity", f64::NEG_INFINITY),
    ] {
        if t.starts_with(prefix) {
            return val;
        }
    }
    match parse_numeric_prefix(t) {
        SqliteValue::Integer(i) => i as f64,
        SqliteValue::Real(f) => f,
        _ => 0.0,
    }
}

/// `CAST(x AS NUMERIC)`.
pub(crate) fn cast_numeric(v: &SqliteValue) -> SqliteValue {
    match v {
        SqliteValue::Null | SqliteValue::Integer(_) | SqliteValue::Real(_) => v.clone(),
        SqliteValue::Text(s) => parse_numeric_prefix(s),
        SqliteValue::Blob(b) => parse_numeric_prefix(&String::from_utf8_lossy(b)),
    }
}

/// `CAST(x AS INTEGER)` (REAL floors, like the reference).
pub(crate) fn cast_integer(v: &SqliteValue) -> SqliteValue {
    let from_text = |s: &str| {
        let t = s.trim_start_matches(is_js_space);
        let b = t.as_bytes();
        let mut i = 0;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return SqliteValue::Integer(0);
        }
        match t[..i].parse::<i64>() {
            Ok(n) => SqliteValue::Integer(n),
            Err(_) => SqliteValue::Integer(if t.starts_with('-') { i64::MIN } else { i64::MAX }),
        }
    };
    match v {
        SqliteValue::Null | SqliteValue::Integer(_) => v.clone(),
        SqliteValue::Real(f) => SqliteValue::Integer(f.floor() as i64),
        SqliteValue::Text(s) => from_text(s),
        SqliteValue::Blob(b) => from_text(&String::from_utf8_lossy(b)),
    }
}

/// `CAST(x AS REAL)`.
pub(crate) fn cast_real(v: &SqliteValue) -> SqliteValue {
    match v {
        SqliteValue::Null | SqliteValue::Real(_) => v.clone(),
        SqliteValue::Integer(i) => SqliteValue::Real(*i as f64),
        SqliteValue::Text(s) => SqliteValue::Real(parse_float(s)),
        SqliteValue::Blob(b) => SqliteValue::Real(parse_float(&String::from_utf8_lossy(b))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn js_numbers() {
        assert_eq!(js_number(3.0), "3");
        assert_eq!(js_number(-0.0), "0");
        assert_eq!(js_number(3.25), "3.25");
        assert_eq!(js_number(1e21), "1e+21");
        assert_eq!(js_number(1.5e-7), "1.5e-7");
        assert_eq!(js_number(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(js_number_lossless(42.0), "42.0");
        assert_eq!(js_number_lossless(1e21), "1e+21");
    }

    #[test]
    fn bools() {
        assert!(sqlite_bool(&SqliteValue::Text("1abc".into())));
        assert!(!sqlite_bool(&SqliteValue::Text("abc".into())));
        assert!(!sqlite_bool(&SqliteValue::Text("0.5".into())));
        assert!(sqlite_bool(&SqliteValue::Real(0.5)));
        assert!(!sqlite_bool(&SqliteValue::Null));
    }

    #[test]
    fn casts() {
        assert_eq!(cast_numeric(&SqliteValue::Text("12abc".into())), SqliteValue::Integer(12));
        assert_eq!(cast_numeric(&SqliteValue::Text("1.5e2x".into())), SqliteValue::Real(150.0));
        assert_eq!(cast_integer(&SqliteValue::Text("1.9".into())), SqliteValue::Integer(1));
        assert_eq!(cast_integer(&SqliteValue::Real(-1.5)), SqliteValue::Integer(-2));
        assert_eq!(cast_real(&SqliteValue::Text("abc".into())), SqliteValue::Real(0.0));
    }
}
