//! Op chunks: the ops one flush wrote to one bucket, stored as one compressed row.
//!
//! Per-op rows cost a tuple header, an index entry with the bucket name and the JSON in full
//! (~490 B per op); ops of one bucket share most of their bytes (column names, types, ids of
//! the same lists), so a chunk compresses them together. Layout: format byte, raw length
//! (u32 LE), then a zstd frame of the ops, each `op_id i64 | op u8 | checksum u32 | four
//! optional strings (u32 length, u32::MAX = absent)`, ascending op_id.

use crate::error::StorageError;
use crate::model::{OpType, OplogEntry};
use crate::row_codec::take;
use std::cell::RefCell;

const FORMAT_RAW: u8 = 0;
const FORMAT_ZSTD: u8 = 1;
/// zstd level 1: ~3x smaller ops at a small CPU cost (replication compresses every op once;
/// level 3 measured no smaller on the sample data).
const LEVEL: i32 = 1;
const ABSENT: u32 = u32::MAX;

thread_local! {
    // A zstd context costs more to set up than compressing a small chunk: keep one per thread.
    static COMPRESSOR: RefCell<std::io::Result<zstd::bulk::Compressor<'static>>> = RefCell::new(zstd::bulk::Compressor::new(LEVEL));
    static DECOMPRESSOR: RefCell<std::io::Result<zstd::bulk::Decompressor<'static>>> = RefCell::new(zstd::bulk::Decompressor::new());
}

/// Encode ops (ascending op_id) into a chunk payload.
pub fn encode<'a>(ops: impl Iterator<Item = &'a OplogEntry>) -> Vec<u8> {
    let mut raw = Vec::new();
    for op in ops {
        raw.extend_from_slice(&op.op_id.to_le_bytes());
        raw.push(op.op as u8);
        raw.extend_from_slice(&op.checksum.to_le_bytes());
        for field in [&op.object_type, &op.object_id, &op.subkey, &op.data] {
            match field {
                Some(s) => {
                    raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    raw.extend_from_slice(s.as_bytes());
                }
                None => raw.extend_from_slice(&ABSENT.to_le_bytes()),
            }
        }
    }
    match COMPRESSOR.with(|c| {
        c.borrow_mut()
            .as_mut()
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .compress(&raw)
    }) {
        Ok(compressed) => {
            let mut out = Vec::with_capacity(5 + compressed.len());
            out.push(FORMAT_ZSTD);
            out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            out.extend_from_slice(&compressed);
            out
        }
        // Only on allocation failure; the ops stay readable uncompressed.
        Err(e) => {
            tracing::error!(error = %e, "zstd compression failed; storing the chunk uncompressed");
            let mut out = vec![FORMAT_RAW];
            out.extend_from_slice(&raw);
            out
        }
    }
}

/// Decode a chunk payload.
pub fn decode(payload: &[u8]) -> Result<Vec<OplogEntry>, StorageError> {
    let corrupt = |what: &str| StorageError::Corrupt(format!("op chunk: {what}"));
    let (&format, rest) = payload.split_first().ok_or_else(|| corrupt("empty"))?;
    let raw = match format {
        FORMAT_RAW => rest.to_vec(),
        FORMAT_ZSTD if rest.len() >= 4 => {
            let raw_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            // The frame states its own size: a damaged length must not size an allocation.
            let frame_len = zstd::zstd_safe::get_frame_content_size(&rest[4..]).ok().flatten();
            if frame_len != Some(raw_len as u64) {
                return Err(corrupt("length does not match the frame"));
            }
            DECOMPRESSOR
                .with(|d| {
                    d.borrow_mut()
                        .as_mut()
                        .map_err(|e| std::io::Error::other(e.to_string()))?
                        .decompress(&rest[4..], raw_len)
                })
                .map_err(|e| corrupt(&e.to_string()))?
        }
        _ => return Err(corrupt("unknown format")),
    };
    let mut buf = &raw[..];
    let mut ops = Vec::new();
    while !buf.is_empty() {
        let truncated = || corrupt("truncated op");
        let op_id = i64::from_le_bytes(take(&mut buf).ok_or_else(truncated)?);
        let [kind] = take(&mut buf).ok_or_else(truncated)?;
        let op = OpType::from_i16(i16::from(kind)).ok_or_else(|| corrupt("unknown op type"))?;
        let checksum = u32::from_le_bytes(take(&mut buf).ok_or_else(truncated)?);
        let mut field = || string(&mut buf).ok_or_else(|| corrupt("truncated field"));
        let (object_type, object_id, subkey, data) = (field()?, field()?, field()?, field()?);
        ops.push(OplogEntry {
            op_id,
            op,
            object_type,
            object_id,
            subkey,
            data,
            checksum,
        });
    }
    Ok(ops)
}

/// `None` on truncation or bad UTF-8; `Some(None)` for an absent field.
fn string(buf: &mut &[u8]) -> Option<Option<String>> {
    let len = u32::from_le_bytes(take(buf)?);
    if len == ABSENT {
        return Some(None);
    }
    let bytes = buf.get(..len as usize)?;
    *buf = &buf[len as usize..];
    String::from_utf8(bytes.to_vec()).ok().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(op_id: i64, data: Option<&str>) -> OplogEntry {
        OplogEntry {
            op_id,
            op: if data.is_some() { OpType::Put } else { OpType::Remove },
            object_type: Some("todos".into()),
            object_id: Some(format!("id-{op_id}")),
            subkey: Some(format!("1/{op_id}")),
            data: data.map(str::to_string),
            checksum: op_id as u32 * 7919,
        }
    }

    #[test]
    fn round_trips_and_compresses() {
        let ops: Vec<OplogEntry> = (1..=50)
            .map(|i| {
                op(
                    i,
                    (i % 5 != 0).then_some(r#"{"id":"x","description":"a todo with some text","completed":0}"#),
                )
            })
            .collect();
        let payload = encode(ops.iter());
        let decoded = decode(&payload).expect("decodes");
        assert_eq!(decoded.len(), ops.len());
        for (a, b) in decoded.iter().zip(&ops) {
            assert_eq!((a.op_id, a.op, a.checksum), (b.op_id, b.op, b.checksum));
            assert_eq!(
                (&a.object_type, &a.object_id, &a.subkey, &a.data),
                (&b.object_type, &b.object_id, &b.subkey, &b.data)
            );
        }
        let raw: usize = ops.iter().map(|o| 45 + o.data.as_ref().map_or(0, String::len)).sum();
        assert!(payload.len() * 3 < raw, "{} bytes for {raw} raw", payload.len());
    }

    #[test]
    fn rejects_damaged_payloads() {
        let payload = encode([op(1, Some("{}"))].iter());
        assert!(decode(&[]).is_err());
        assert!(decode(&payload[..payload.len() - 3]).is_err());
        let mut wrong = payload.clone();
        wrong[0] = 9;
        assert!(decode(&wrong).is_err());
        let mut huge = payload.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err(), "a damaged length must not be trusted");
    }
}
