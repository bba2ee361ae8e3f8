//! Op chunks: the ops one flush wrote to one bucket, stored as one compressed row.
//!
//! Per-op rows cost a tuple header, an index entry with the bucket name and the JSON in full
//! (~490 B per op); ops of one bucket share most of their bytes (column names, types, ids of
//! the same lists), so a chunk compresses them together. Layout: format byte, raw length
//! (u32 LE), then a zstd frame of the ops, each `op_id i64 | op u8 | checksum u32 | four
//! optional strings (u32 length, u32::MAX = absent)`, ascending op_id. A bucket that gets
//! more than [`CHUNK_OPS`] ops in one flush gets several chunks.

use crate::error::StorageError;
use crate::model::{OpType, OplogEntry};
use crate::row_codec::take;
use crate::write_task::OpRow;
use std::cell::RefCell;
use std::collections::HashMap;

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
    // The uncompressed ops of the chunk being encoded, reused: chunks are encoded by the
    // thousand per batch.
    static RAW: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encode ops (ascending op_id) into a chunk payload.
pub fn encode<'a>(ops: impl Iterator<Item = &'a OplogEntry>) -> Vec<u8> {
    RAW.with(|raw| {
        let mut raw = raw.borrow_mut();
        raw.clear();
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
        let payload = compress(&raw);
        if raw.capacity() > RAW_KEPT {
            // One chunk of very wide rows must not pin its size on the thread for good.
            *raw = Vec::new();
        }
        payload
    })
}

/// Largest raw buffer kept between chunks (a chunk of ordinary rows is well below).
const RAW_KEPT: usize = 1 << 20;

/// A chunk's checksum: the sum of its ops' checksums, mod 2^32.
pub(crate) fn checksum_sum<'a>(ops: impl Iterator<Item = &'a OplogEntry>) -> u32 {
    ops.fold(0u32, |sum, op| sum.wrapping_add(op.checksum))
}

/// Format byte, raw length and the zstd frame, compressed straight into the payload.
fn compress(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + zstd::zstd_safe::compress_bound(raw.len()));
    out.push(FORMAT_ZSTD);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    let mut frame = std::io::Cursor::new(&mut out);
    frame.set_position(5);
    let compressed = COMPRESSOR.with(|c| {
        c.borrow_mut()
            .as_mut()
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .compress_to_buffer(raw, &mut frame)
    });
    match compressed {
        Ok(_) => out,
        // Only on allocation failure; the ops stay readable uncompressed.
        Err(e) => {
            tracing::error!(error = %e, "zstd compression failed; storing the chunk uncompressed");
            let mut out = vec![FORMAT_RAW];
            out.extend_from_slice(raw);
            out
        }
    }
}

/// Most ops in one chunk: bounds what a read decodes beyond the ops it needs.
const CHUNK_OPS: usize = 256;

/// A batch's ops of one bucket (up to [`CHUNK_OPS`]), encoded: one `op_chunks` row.
pub(crate) struct NewChunk {
    pub bucket: String,
    pub first_op: i64,
    pub last_op: i64,
    pub op_count: i32,
    pub checksum: i64,
    pub payload: Vec<u8>,
}

/// A batch's ops as chunks. Compressing is the costliest part of writing ops: a large batch
/// is encoded on the blocking pool, alongside the evaluation of the next batch, instead of
/// in the write task, whose time is what storage waits for.
pub(crate) enum Chunks {
    Ready(Vec<NewChunk>),
    Encoding(tokio::task::JoinHandle<Vec<NewChunk>>),
}

impl Default for Chunks {
    fn default() -> Self {
        Chunks::Ready(Vec::new())
    }
}

/// Ops from which a batch is encoded off the caller's task (smaller ones: inline, where a
/// thread hand-off would only add latency).
const ENCODE_APART_OPS: usize = 1_000;

impl Chunks {
    pub(crate) fn encode(ops: Vec<OpRow>) -> Chunks {
        if ops.len() < ENCODE_APART_OPS {
            return Chunks::Ready(chunks_of(ops));
        }
        Chunks::Encoding(tokio::task::spawn_blocking(move || chunks_of(ops)))
    }

    pub(crate) async fn get(self) -> Result<Vec<NewChunk>, StorageError> {
        match self {
            Chunks::Ready(chunks) => Ok(chunks),
            Chunks::Encoding(task) => task
                .await
                .map_err(|e| StorageError::WriterStopped(format!("encoding op chunks: {e}"))),
        }
    }
}

/// Group a batch's ops into chunks per bucket, in primary-key order (Postgres inserts
/// neighbouring index entries together).
fn chunks_of(ops: Vec<OpRow>) -> Vec<NewChunk> {
    // Ops were allocated in ascending op_id order, so each bucket's list is ascending too.
    // Grouped by index: the entries themselves stay where they are.
    let mut by_bucket: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        by_bucket.entry(op.bucket.as_str()).or_default().push(i);
    }
    let mut by_bucket: Vec<(&str, Vec<usize>)> = by_bucket.into_iter().collect();
    by_bucket.sort_unstable_by_key(|(bucket, _)| *bucket);
    let mut chunks = Vec::with_capacity(by_bucket.len());
    for (bucket, indices) in by_bucket {
        for part in indices.chunks(CHUNK_OPS) {
            let (Some(&first), Some(&last)) = (part.first(), part.last()) else {
                continue;
            };
            let entries = || part.iter().map(|&i| &ops[i].entry);
            chunks.push(NewChunk {
                bucket: bucket.to_string(),
                first_op: ops[first].entry.op_id,
                last_op: ops[last].entry.op_id,
                op_count: part.len() as i32,
                checksum: i64::from(checksum_sum(entries())),
                payload: encode(entries()),
            });
        }
    }
    chunks
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

    /// `n` ops spread round-robin over three buckets, ascending op_id as the writer allocates.
    fn batch(n: i64) -> Vec<OpRow> {
        let buckets = ["b", "c", "a"];
        (1..=n)
            .map(|i| OpRow {
                bucket: buckets[(i % 3) as usize].to_string(),
                entry: op(i, Some("{}")),
            })
            .collect()
    }

    async fn check_grouping(n: i64) {
        let ops = batch(n);
        let expected: Vec<(String, Vec<i64>)> = ["a", "b", "c"]
            .iter()
            .map(|b| {
                (
                    b.to_string(),
                    ops.iter().filter(|o| o.bucket == *b).map(|o| o.entry.op_id).collect(),
                )
            })
            .collect();
        let chunks = Chunks::encode(ops).get().await.expect("encoded");
        let mut seen: Vec<(String, Vec<i64>)> = Vec::new();
        for c in &chunks {
            let ops = decode(&c.payload).expect("decodes");
            assert!(ops.len() <= CHUNK_OPS && ops.len() == c.op_count as usize);
            assert_eq!((c.first_op, c.last_op), (ops[0].op_id, ops[ops.len() - 1].op_id));
            let sum = ops.iter().fold(0u32, |s, o| s.wrapping_add(o.checksum));
            assert_eq!(c.checksum, i64::from(sum));
            match seen.last_mut() {
                Some((bucket, ids)) if *bucket == c.bucket => ids.extend(ops.iter().map(|o| o.op_id)),
                _ => seen.push((c.bucket.clone(), ops.iter().map(|o| o.op_id).collect())),
            }
        }
        assert_eq!(seen, expected, "chunks in bucket order, each bucket's ops complete and ascending");
    }

    #[tokio::test]
    async fn a_small_batch_is_grouped_by_bucket_inline() {
        check_grouping(20).await;
        assert!(matches!(Chunks::encode(batch(20)), Chunks::Ready(_)));
    }

    #[tokio::test]
    async fn a_large_batch_is_grouped_apart_and_split_at_the_chunk_size() {
        // 1,000 ops per bucket: four chunks each.
        check_grouping(3_000).await;
        assert!(matches!(Chunks::encode(batch(3_000)), Chunks::Encoding(_)));
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
