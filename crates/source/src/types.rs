//! Postgres text values -> sync-rules values (sync-rules spec §3.1, replication spec §1.7).
//!
//! Both the snapshot (COPY text) and pgoutput (text tuples) deliver Postgres' text output
//! under `DateStyle=ISO, TimeZone=UTC`, so one decoder serves both and they agree exactly.

use crate::array::parse_array;
use ferrosync_rules::{Compatibility, SqliteValue};

pub const BOOL: u32 = 16;
pub const BYTEA: u32 = 17;
pub const INT8: u32 = 20;
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const OID: u32 = 26;
pub const JSON: u32 = 114;
pub const FLOAT4: u32 = 700;
pub const FLOAT8: u32 = 701;
pub const DATE: u32 = 1082;
pub const TIME: u32 = 1083;
pub const TIMESTAMP: u32 = 1114;
pub const TIMESTAMPTZ: u32 = 1184;
pub const PG_LSN: u32 = 3220;
pub const JSONB: u32 = 3802;

/// Session settings that make text output deterministic for [`decode_text`].
pub const SESSION_SETTINGS: &str =
    "SET DateStyle = 'ISO'; SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET IntervalStyle = 'postgres'; SET bytea_output = 'hex'";

/// Startup options with the same effect, for the replication connection.
pub const STARTUP_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=postgres -c bytea_output=hex";

/// Element type of a known array type, if `oid` is one.
pub fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => BOOL,
        1001 => BYTEA,
        1005 => INT2,
        1007 => INT4,
        1016 => INT8,
        1028 => OID,
        1021 => FLOAT4,
        1022 => FLOAT8,
        199 => JSON,
        3807 => JSONB,
        1182 => DATE,
        1183 => TIME,
        1115 => TIMESTAMP,
        1185 => TIMESTAMPTZ,
        // text, varchar, bpchar, name, uuid, numeric: text elements.
        1009 | 1015 | 1014 | 1003 | 2951 | 1231 => 25,
        _ => return None,
    })
}

/// Decode one non-NULL text value of type `oid`.
pub fn decode_text(oid: u32, text: &str, compat: &Compatibility) -> SqliteValue {
    match oid {
        BOOL => SqliteValue::Integer(i64::from(text == "t")),
        INT2 | INT4 | INT8 | OID => text
            .parse::<i64>()
            .map(SqliteValue::Integer)
            .unwrap_or_else(|_| SqliteValue::Text(text.to_string())),
        FLOAT4 | FLOAT8 => SqliteValue::Real(parse_float(text)),
        BYTEA => decode_bytea(text)
            .map(SqliteValue::Blob)
            .unwrap_or_else(|| SqliteValue::Text(text.to_string())),
        TIMESTAMPTZ => SqliteValue::Text(timestamptz(text, compat.timestamps_iso8601)),
        TIMESTAMP => SqliteValue::Text(timestamp(text, compat.timestamps_iso8601)),
        TIME if compat.timestamps_iso8601 => SqliteValue::Text(pad_fraction(text, "")),
        PG_LSN => SqliteValue::Text(comparable_lsn(text)),
        _ => match array_element(oid) {
            Some(elem) => SqliteValue::Text(parse_array(text, elem, compat)),
            None => SqliteValue::Text(text.to_string()),
        },
    }
}

fn parse_float(text: &str) -> f64 {
    match text {
        "NaN" => f64::NAN,
        "Infinity" => f64::INFINITY,
        "-Infinity" => f64::NEG_INFINITY,
        _ => text.parse().unwrap_or(f64::NAN),
    }
}

fn decode_bytea(text: &str) -> Option<Vec<u8>> {
    hex::decode(text.strip_prefix("\\x")?).ok()
}

/// `2023-03-06 15:47:00.123+00` -> `2023-03-06 15:47:00.123Z` (legacy) or
/// `2023-03-06T15:47:00.123000Z` (ISO). The session time zone is UTC, so the offset is `+00`.
fn timestamptz(text: &str, iso: bool) -> String {
    match text {
        "infinity" => {
            return if iso {
                "9999-12-31T23:59:59.000000Z"
            } else {
                "9999-12-31 23:59:59Z"
            }
            .to_string()
        }
        "-infinity" => {
            return if iso {
                "0000-01-01T00:00:00.000000Z"
            } else {
                "0000-01-01 00:00:00Z"
            }
            .to_string()
        }
        _ => {}
    }
    let base = text.strip_suffix("+00").unwrap_or(text);
    if iso {
        pad_fraction(&base.replacen(' ', "T", 1), "Z")
    } else {
        format!("{base}Z")
    }
}

fn timestamp(text: &str, iso: bool) -> String {
    if iso && text != "infinity" && text != "-infinity" {
        pad_fraction(&text.replacen(' ', "T", 1), "")
    } else {
        text.to_string()
    }
}

/// Pad or add the fraction to 6 digits and append `suffix`.
fn pad_fraction(base: &str, suffix: &str) -> String {
    match base.split_once('.') {
        Some((whole, frac)) => format!("{whole}.{frac:0<6}{suffix}"),
        None => format!("{base}.000000{suffix}"),
    }
}

/// `0/16B3748` -> `00000000/016B3748`, comparable as text.
fn comparable_lsn(text: &str) -> String {
    match text.split_once('/') {
        Some((hi, lo)) => format!("{:0>8}/{:0>8}", hi.to_uppercase(), lo.to_uppercase()),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy() -> Compatibility {
        Compatibility {
            timestamps_iso8601: false,
            versioned_bucket_ids: true,
            fixed_json_extract: false,
            custom_postgres_types: false,
        }
    }

    fn iso() -> Compatibility {
        Compatibility {
            timestamps_iso8601: true,
            ..legacy()
        }
    }

    #[test]
    fn scalars() {
        let c = legacy();
        assert_eq!(decode_text(BOOL, "t", &c), SqliteValue::Integer(1));
        assert_eq!(decode_text(BOOL, "f", &c), SqliteValue::Integer(0));
        assert_eq!(decode_text(INT8, "-9223372036854775808", &c), SqliteValue::Integer(i64::MIN));
        assert_eq!(decode_text(FLOAT8, "1.5", &c), SqliteValue::Real(1.5));
        assert_eq!(decode_text(1700, "12.3400", &c), SqliteValue::Text("12.3400".into()));
        assert_eq!(decode_text(BYTEA, "\\x0102ff", &c), SqliteValue::Blob(vec![1, 2, 255]));
        assert_eq!(decode_text(JSONB, "{\"a\": 1}", &c), SqliteValue::Text("{\"a\": 1}".into()));
        assert_eq!(decode_text(PG_LSN, "0/16B3748", &c), SqliteValue::Text("00000000/016B3748".into()));
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            decode_text(TIMESTAMPTZ, "2023-03-06 15:47:00.123+00", &legacy()),
            SqliteValue::Text("2023-03-06 15:47:00.123Z".into())
        );
        assert_eq!(
            decode_text(TIMESTAMPTZ, "2023-03-06 15:47:00+00", &iso()),
            SqliteValue::Text("2023-03-06T15:47:00.000000Z".into())
        );
        assert_eq!(
            decode_text(TIMESTAMP, "2023-03-06 15:47:00.5", &iso()),
            SqliteValue::Text("2023-03-06T15:47:00.500000".into())
        );
        assert_eq!(
            decode_text(TIMESTAMP, "2023-03-06 15:47:00", &legacy()),
            SqliteValue::Text("2023-03-06 15:47:00".into())
        );
        assert_eq!(
            decode_text(TIMESTAMPTZ, "infinity", &legacy()),
            SqliteValue::Text("9999-12-31 23:59:59Z".into())
        );
        assert_eq!(decode_text(DATE, "2023-03-06", &iso()), SqliteValue::Text("2023-03-06".into()));
    }
}
