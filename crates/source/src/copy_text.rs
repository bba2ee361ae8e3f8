//! Parser for COPY ... TO STDOUT text format: tab-separated fields, `\N` for NULL,
//! backslash escapes, one row per line.

use std::borrow::Cow;

/// Split one COPY text line into fields (`None` = NULL). Fields without escapes borrow
/// from the line: most are decoded into another form (a number, a timestamp) anyway.
pub fn parse_line(line: &[u8]) -> Vec<Option<Cow<'_, str>>> {
    line.split(|&b| b == b'\t')
        .map(|field| if field == b"\\N" { None } else { Some(unescape(field)) })
        .collect()
}

fn unescape(field: &[u8]) -> Cow<'_, str> {
    if !field.contains(&b'\\') {
        return match std::str::from_utf8(field) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(field),
        };
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' || i + 1 >= field.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let next = field[i + 1];
        i += 2;
        match next {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut value = u32::from(next - b'0');
                let mut digits = 1;
                while digits < 3 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                    value = value * 8 + u32::from(field[i] - b'0');
                    i += 1;
                    digits += 1;
                }
                out.push(value as u8);
            }
            b'x' => {
                let mut value = 0u32;
                let mut digits = 0;
                while digits < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                    value = value * 16 + (field[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    digits += 1;
                }
                out.push(value as u8);
            }
            other => out.push(other),
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_escapes() {
        let fields = parse_line(b"1\t\\N\ta\\tb\\nc\\\\d\t\\x41\\101");
        assert_eq!(fields, vec![Some("1".into()), None, Some("a\tb\nc\\d".into()), Some("AA".into())]);
        assert_eq!(parse_line(b""), vec![Some("".into())]);
    }
}
