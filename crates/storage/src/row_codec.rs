//! Compact binary encoding of a row image for `current_data` (needed to merge TOAST values).
//! Format per column: u16 name length, name, u8 tag, payload (i64/f64 LE, or u32 length + bytes).

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

fn take<const N: usize>(buf: &mut &[u8]) -> Option<[u8; N]> {
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
}
