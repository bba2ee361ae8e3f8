//! `unixepoch()` and `datetime()` (spec §3.5): inputs are parsed the way the
//! reference's JavaScript `Date` does (including the legacy-parser quirks
//! listed in the errata), results are rendered from the UTC time value.

use crate::value::{cast_numeric, to_text, SqliteValue};

const MS_PER_DAY: f64 = 86_400_000.0;
/// JS `Date` time values must stay within ±8.64e15 ms.
const MAX_TIME: f64 = 8.64e15;

/// Which date function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum DateFn {
    Unixepoch,
    Datetime,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1..=12).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `(year, month, day)` of a day number since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of unix milliseconds (JavaScript's `Date.toISOString`).
pub fn iso8601_millis(millis: i64) -> String {
    let (days, ms) = (millis.div_euclid(86_400_000), millis.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let secs = ms / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms % 1000
    )
}

struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// A run of digits: (value, digit count).
    fn number(&mut self) -> Option<(i64, usize)> {
        let start = self.pos;
        let mut v: i64 = 0;
        while let Some(c) = self.peek().filter(u8::is_ascii_digit) {
            v = v.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
            self.pos += 1;
        }
        (self.pos > start).then_some((v, self.pos - start))
    }
}

/// Parses `±HH:MM` / `±HHMM` / `Z` at the cursor: offset in minutes.
fn zone(c: &mut Cursor<'_>) -> Option<i64> {
    if c.eat(b'Z') || c.eat(b'z') {
        return Some(0);
    }
    let sign = if c.eat(b'+') {
        1
    } else if c.eat(b'-') {
        -1
    } else {
        return None;
    };
    let (h, hn) = c.number()?;
    let (h, m) = if hn == 4 {
        (h / 100, h % 100)
    } else {
        if hn != 2 || !c.eat(b':') {
            return None;
        }
        let (m, mn) = c.number()?;
        if mn != 2 {
            return None;
        }
        (h, m)
    };
    if h > 23 || m > 59 {
        return None;
    }
    Some(sign * (h * 60 + m))
}

/// JS `Date.parse` for the shapes the reference feeds it (a date, optionally
/// a time, optionally a zone): milliseconds since the epoch.
fn js_date_parse(text: &str) -> Option<f64> {
    let mut c = Cursor {
        s: text.as_bytes(),
        pos: 0,
    };
    // Date part: YYYY-MM-DD (or ±YYYYYY-MM-DD).
    let sign = if c.eat(b'+') {
        Some(1)
    } else if c.eat(b'-') {
        Some(-1)
    } else {
        None
    };
    let (year, yn) = c.number()?;
    if sign.is_some() && yn != 6 {
        return None;
    }
    let year = year * sign.unwrap_or(1);
    if !c.eat(b'-') {
        return None;
    }
    let (month, mn) = c.number()?;
    if !c.eat(b'-') {
        return None;
    }
    let (day, dn) = c.number()?;
    let strict_date = (yn == 4 || yn == 6) && mn == 2 && dn == 2;
    // Time part, after `T` (ISO) or spaces (legacy parser).
    let mut iso = false;
    let (mut h, mut mi, mut s, mut ms) = (0, 0, 0, 0i64);
    let has_time = if c.eat(b'T') || c.eat(b't') {
        iso = strict_date;
        true
    } else if c.peek() == Some(b' ') {
        while c.eat(b' ') {}
        c.peek().is_some_and(|b| b.is_ascii_digit())
    } else {
        false
    };
    if has_time {
        let (hv, hn) = c.number()?;
        if !c.eat(b':') {
            return None;
        }
        let (mv, mn2) = c.number()?;
        iso &= hn == 2 && mn2 == 2;
        h = hv;
        mi = mv;
        if c.eat(b':') {
            let (sv, sn) = c.number()?;
            iso &= sn == 2;
            s = sv;
            if c.eat(b'.') {
                let start = c.pos;
                c.number()?;
                let digits = &text[start..c.pos];
                let first3: String = digits.chars().chain("00".chars()).take(3).collect();
                ms = first3.parse().ok()?;
            }
        }
    }
    let offset = zone(&mut c);
    while c.eat(b' ') {}
    if c.pos != c.s.len() {
        return None;
    }
    let offset = offset.unwrap_or(0);
    // The legacy (non-ISO) parser maps two-digit-looking years.
    let year = if iso {
        year
    } else {
        match year {
            0..=49 => year + 2000,
            50..=99 => year + 1900,
            y => y,
        }
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // A 24th hour is allowed when everything after it is zero.
    let end_of_day = h == 24 && mi == 0 && s == 0 && ms == 0;
    if !(h <= 23 && mi <= 59 && s <= 59 || end_of_day) {
        return None;
    }
    let days = days_from_civil(year, month, 1) + day - 1;
    let total = days as f64 * MS_PER_DAY + ((h * 60 + mi - offset) * 60 + s) as f64 * 1000.0 + ms as f64;
    Some(total)
}

fn is_julian_text(t: &str) -> bool {
    let (int, frac) = t.split_once('.').unwrap_or((t, "0"));
    !int.is_empty() && int.bytes().all(|b| b.is_ascii_digit()) && !frac.is_empty() && frac.bytes().all(|b| b.is_ascii_digit())
}

fn ends_with_offset(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() >= 6 && {
        let tail = &b[b.len() - 6..];
        matches!(tail[0], b'+' | b'-')
            && tail[1].is_ascii_digit()
            && tail[2].is_ascii_digit()
            && tail[3] == b':'
            && tail[4].is_ascii_digit()
            && tail[5].is_ascii_digit()
    }
}

fn julian_ms(jd: f64) -> f64 {
    (jd - 2_440_587.5) * MS_PER_DAY
}

/// Milliseconds since the epoch of a date text (spec §3.5 date parsing).
fn text_ms(t: &str) -> Option<f64> {
    if is_julian_text(t) {
        return t.parse::<f64>().ok().map(julian_ms);
    }
    if t.contains(['Z', 'z']) || ends_with_offset(t) {
        js_date_parse(t)
    } else {
        js_date_parse(&format!("{t}Z"))
    }
}

fn two(n: i64) -> String {
    format!("{n:02}")
}

fn render(ms: f64, subsec: bool) -> String {
    let ms = ms as i64;
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let year = match y {
        0..=9999 => format!("{y:04}"),
        y if y < 0 => format!("-{:06}", -y),
        y => format!("+{y:06}"),
    };
    let secs = rem / 1000;
    let mut out = format!(
        "{year}-{}-{} {}:{}:{}",
        two(m),
        two(d),
        two(secs / 3600),
        two(secs / 60 % 60),
        two(secs % 60)
    );
    if subsec {
        out.push_str(&format!(".{:03}", rem % 1000));
    }
    out
}

/// Evaluates `unixepoch(v, ...)` / `datetime(v, ...)`.
pub(crate) fn call(f: DateFn, args: &[SqliteValue]) -> SqliteValue {
    let Some(first) = args.first() else {
        return SqliteValue::Null;
    };
    let mut mods = Vec::new();
    for a in &args[1..] {
        match to_text(a) {
            Some(m) => mods.push(m.to_lowercase()),
            None => return SqliteValue::Null,
        }
    }
    let mods: Vec<&str> = mods.iter().map(String::as_str).collect();
    let (unix, subsec) = match mods.as_slice() {
        [] => (false, false),
        ["unixepoch"] => (true, false),
        ["unixepoch", "subsec" | "subsecond"] => (true, true),
        ["subsec" | "subsecond"] => (false, true),
        _ => return SqliteValue::Null,
    };
    let number = |v: &SqliteValue| match v {
        SqliteValue::Integer(i) => Some(*i as f64),
        SqliteValue::Real(f) => Some(*f),
        _ => None,
    };
    let ms = match first {
        SqliteValue::Null | SqliteValue::Blob(_) => None,
        SqliteValue::Integer(_) | SqliteValue::Real(_) if unix => number(first).map(|s| s * 1000.0),
        SqliteValue::Integer(_) | SqliteValue::Real(_) => number(first).map(julian_ms),
        // Note: the spec does not say how TEXT combines with 'unixepoch';
        // it is read as a number of seconds here.
        SqliteValue::Text(_) if unix => number(&cast_numeric(first)).map(|s| s * 1000.0),
        SqliteValue::Text(t) => text_ms(t),
    };
    // JS `TimeClip`: finite, in range, truncated to whole milliseconds.
    let Some(ms) = ms.filter(|m| m.is_finite() && m.abs() <= MAX_TIME).map(f64::trunc) else {
        return SqliteValue::Null;
    };
    match f {
        DateFn::Unixepoch if subsec => SqliteValue::Real(ms / 1000.0),
        DateFn::Unixepoch => SqliteValue::Integer((ms / 1000.0).floor() as i64),
        DateFn::Datetime => SqliteValue::Text(render(ms, subsec)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_timestamps() {
        assert_eq!(iso8601_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601_millis(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(iso8601_millis(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn civil_round_trip() {
        for days in [-719_468, -1, 0, 1, 19_737, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
