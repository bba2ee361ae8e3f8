//! Compact binary encodings for `current_data`: a row image (needed to merge TOAST values;
//! per column: u16 name length, name, u8 tag, payload: i64/f64 LE, or u32 length + bytes) and
//! string lists (the buckets and lookups a row is in; see [`encode_strings`]).

use ferrosync_rules::{Row, SqliteValue};

pub fn encode(row: &Row) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for (name, value) in row.iter() {
        let name = name.as_bytes();
        out.extend_from_slice(&(name.len().min(u16::MAX as usize) as u16).to_le_bytes());
        out.extend_from_slice(&name[..name.len().min(u16::MAX as usize)]);
        match value {
            SqliteValue::Null => out.push(0),
            SqliteValue::Integer(i) => {
                out.push(1);
                out.extend_from_slice(&i.to_le_bytes());
            }
            SqliteValue::Real(f) => {
                out.push(2);
                out.extend_from_slice(&f.to_le_bytes());
            }
            SqliteValue::Text(t) => bytes(&mut out, 3, t.as_bytes()),
            SqliteValue::Blob(b) => bytes(&mut out, 4, b),
        }
    }
    out
}

fn bytes(out: &mut Vec<u8>, tag: u8, b: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Decode; `None` if the bytes are not a valid image.
pub fn decode(mut buf: &[u8]) -> Option<Row> {
    let mut row = Row::new();
    while !buf.is_empty() {
        let n = u16::from_le_bytes(take::<2>(&mut buf)?) as usize;
        let name = std::str::from_utf8(buf.get(..n)?).ok()?.to_string();
        buf = &buf[n..];
        let tag = *buf.first()?;
        buf = &buf[1..];
        let value = match tag {
            0 => SqliteValue::Null,
            1 => SqliteValue::Integer(i64::from_le_bytes(take::<8>(&mut buf)?)),
            2 => SqliteValue::Real(f64::from_le_bytes(take::<8>(&mut buf)?)),
            3 | 4 => {
                let len = u32::from_le_bytes(take::<4>(&mut buf)?) as usize;
                let data = buf.get(..len)?.to_vec();
                buf = &buf[len..];
                if tag == 3 {
                    SqliteValue::Text(String::from_utf8(data).ok()?)
                } else {
                    SqliteValue::Blob(data)
                }
            }
            _ => return None,
        };
        row.push(name, value);
    }
    Some(row)
}

/// A list of strings; `None` for an empty list (stored as NULL). Each string is a LEB128
/// header `len << 1` and its bytes, or header `1` and 16 bytes for a canonical lowercase UUID
/// (most PowerSync row ids): 17 bytes instead of 37, or header `back << 2 | 3` alone for a
/// repeat of the string `back` (1 to [`MAX_BACK`]) places earlier: a row's bucket list is
/// (bucket, output table, row id) triples whose table and id are mostly the same.
pub fn encode_strings<'a>(strings: impl IntoIterator<Item = &'a str>) -> Option<Vec<u8>> {
    // Encoded into a reused buffer and copied out at its final size: one allocation per row
    // instead of a growing vector's several.
    STRINGS.with(|buf| {
        let mut out = buf.borrow_mut();
        out.clear();
        encode_strings_into(&mut out, strings);
        let encoded = (!out.is_empty()).then(|| out.to_vec());
        if out.capacity() > STRINGS_KEPT {
            // A row in very many buckets must not pin its list's size on the thread for good.
            *out = Vec::new();
        }
        encoded
    })
}

/// Largest scratch buffer [`encode_strings`] keeps between rows.
const STRINGS_KEPT: usize = 64 << 10;

thread_local! {
    static STRINGS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn encode_strings_into<'a>(out: &mut Vec<u8>, strings: impl IntoIterator<Item = &'a str>) {
    let mut recent: [&str; MAX_BACK] = [""; MAX_BACK];
    for (i, s) in strings.into_iter().enumerate() {
        let back = (1..=MAX_BACK.min(i)).find(|&back| recent[(i - back) % MAX_BACK] == s);
        recent[i % MAX_BACK] = s;
        if let Some(back) = back {
            push_leb128(out, back << 2 | 3);
            continue;
        }
        match canonical_uuid(s) {
            Some(uuid) => {
                out.push(1);
                out.extend_from_slice(uuid.as_bytes());
            }
            None => {
                push_leb128(out, s.len() << 1);
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
}

/// How far back [`encode_strings`] looks for a repeat.
const MAX_BACK: usize = 3;

/// `s` parsed as a UUID only if it prints back identically (lowercase, hyphenated).
fn canonical_uuid(s: &str) -> Option<uuid::Uuid> {
    if s.len() != 36 {
        return None;
    }
    let uuid = uuid::Uuid::parse_str(s).ok()?;
    let mut buf = uuid::Uuid::encode_buffer();
    (uuid.hyphenated().encode_lower(&mut buf) == s).then_some(uuid)
}

pub(crate) fn push_leb128(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub(crate) fn read_leb128(buf: &mut &[u8]) -> Option<usize> {
    let mut value = 0usize;
    for shift in (0..35).step_by(7) {
        let [byte] = take::<1>(buf)?;
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Decode [`encode_strings`]; `None` if the bytes are damaged.
pub fn decode_strings(mut buf: &[u8]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let header = read_leb128(&mut buf)?;
        if header == 1 {
            out.push(uuid::Uuid::from_bytes(take::<16>(&mut buf)?).hyphenated().to_string());
            continue;
        }
        if header & 3 == 3 {
            let back = header >> 2;
            let repeat = out.len().checked_sub(back).filter(|_| back > 0).and_then(|at| out.get(at))?.clone();
            out.push(repeat);
            continue;
        }
        let len = header >> 1;
        out.push(String::from_utf8(buf.get(..len)?.to_vec()).ok()?);
        buf = &buf[len..];
    }
    Some(out)
}

/// The next `N` bytes of `buf`, advancing it.
pub(crate) fn take<const N: usize>(buf: &mut &[u8]) -> Option<[u8; N]> {
    let head: [u8; N] = buf.get(..N)?.try_into().ok()?;
    *buf = &buf[N..];
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut row = Row::new();
        row.push("id", SqliteValue::Text("a".into()));
        row.push("n", SqliteValue::Integer(-5));
        row.push("f", SqliteValue::Real(1.25));
        row.push("b", SqliteValue::Blob(vec![0, 1]));
        row.push("z", SqliteValue::Null);
        let bytes = encode(&row);
        assert_eq!(decode(&bytes), Some(row));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn string_lists_round_trip() {
        let long = "x".repeat(300);
        let strings = [
            "",
            "user_todos[\"u1\"]",
            long.as_str(),
            "é",
            "0b6c3c8e-5a1f-4d3e-9c2b-7f1e2d3c4b5a",
            // Not canonical: must come back exactly as written.
            "0B6C3C8E-5A1F-4D3E-9C2B-7F1E2D3C4B5A",
        ];
        let bytes = encode_strings(strings).expect("not empty");
        assert_eq!(decode_strings(&bytes), Some(strings.iter().map(|s| s.to_string()).collect()));
        assert_eq!(decode_strings(&bytes[..bytes.len() - 1]), None);
        assert_eq!(encode_strings([]), None);
    }

    #[test]
    fn repeats_are_stored_as_back_references() {
        let id = "0b6c3c8e-5a1f-4d3e-9c2b-7f1e2d3c4b5a";
        let refs = ["b1", "todos", id, "b2", "todos", id, "b3", "lists", id, "b3", "b3"];
        let bytes = encode_strings(refs).expect("not empty");
        assert_eq!(decode_strings(&bytes), Some(refs.iter().map(|s| s.to_string()).collect()));
        let written_once = 3 + 6 + 17 + 3 + 3 + 6;
        assert_eq!(bytes.len(), written_once + 5, "five repeats of one byte each");
    }

    #[test]
    fn a_back_reference_before_the_first_string_is_damage() {
        assert_eq!(decode_strings(&[3 << 2 | 3]), None);
        assert_eq!(decode_strings(&[3]), None, "distance 0");
        assert_eq!(decode_strings(&[4, b'a', b'b', 2 << 2 | 3]), None);
    }
}
