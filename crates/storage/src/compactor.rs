//! Compaction in bucket storage: rewrites each bucket's chunks in place with [`crate::compact`],
//! in small transactions, up to the last committed checkpoint (the horizon).
//!
//! It never waits for the replicator and the replicator never waits for it: the writer only
//! ever inserts chunks of ops newer than the last checkpoint, and compaction only updates and
//! deletes chunks at or below it, so they never touch the same rows. A session advisory lock
//! per stream keeps two compactors (the background task, `ferrosync compact`) apart.

use crate::chunk;
use crate::compact::{fold_leading, repack, Chunk, Supersede};
use crate::error::StorageError;
use std::time::Duration;
use tokio_postgres::{Client, GenericClient};

/// Advisory lock namespace (with the stream id as the second key).
const LOCK_NAMESPACE: i32 = 7_283_911;
/// Chunks read per transaction.
const PAGE_CHUNKS: i64 = 128;

/// Limits of one pass.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Stop starting new buckets once this many ops were read.
    pub max_ops: u64,
    /// Pause after each transaction: bounds the I/O a pass puts on storage.
    pub pause: Duration,
}

/// What a pass did.
#[derive(Debug, Default, Clone)]
pub struct CompactStats {
    pub horizon: i64,
    pub buckets: u64,
    pub ops_before: i64,
    pub ops_after: i64,
    pub bytes_before: i64,
    pub bytes_after: i64,
    pub rewritten: u64,
    /// False when the pass stopped at `max_ops` with buckets left.
    pub finished: bool,
}

/// One pass over stream `group`'s buckets with ops newer than their last compaction.
/// `None` when another compactor holds the stream.
pub async fn compact(client: &mut Client, group: i64, options: &CompactOptions) -> Result<Option<CompactStats>, StorageError> {
    let g = group as i32;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&LOCK_NAMESPACE, &g])
        .await?
        .get(0);
    if !locked {
        return Ok(None);
    }
    let result = pass(client, group, options).await;
    // On error the session may be gone, which releases the lock too.
    let _ = client.execute("SELECT pg_advisory_unlock($1, $2)", &[&LOCK_NAMESPACE, &g]).await;
    result.map(Some)
}

async fn pass(client: &mut Client, group: i64, options: &CompactOptions) -> Result<CompactStats, StorageError> {
    let horizon: i64 = client
        .query_opt("SELECT last_checkpoint FROM ferrosync.sync_rules WHERE id = $1", &[&group])
        .await?
        .map_or(0, |r| r.get(0));
    let mut stats = CompactStats {
        horizon,
        finished: true,
        ..CompactStats::default()
    };
    let mut after = String::new();
    let mut read = 0u64;
    while let Some(bucket) = next_bucket(client, group, &after, horizon).await? {
        if read >= options.max_ops {
            stats.finished = false;
            break;
        }
        let (ops, bytes) = size(client, group, &bucket, horizon).await?;
        read += ops as u64;
        stats.rewritten += compact_bucket(client, group, &bucket, horizon, options).await?;
        let (ops_after, bytes_after) = size(client, group, &bucket, horizon).await?;
        tracing::debug!(bucket = %bucket, ops_before = ops, ops_after, bytes_before = bytes, bytes_after, "bucket compacted");
        stats.buckets += 1;
        stats.ops_before += ops;
        stats.bytes_before += bytes;
        stats.ops_after += ops_after;
        stats.bytes_after += bytes_after;
        after = bucket;
    }
    Ok(stats)
}

/// The next bucket after `after` (name order) with ops up to `horizon` newer than its last
/// compaction. Buckets are found by skipping through the primary key, one probe each.
async fn next_bucket(client: &Client, group: i64, after: &str, horizon: i64) -> Result<Option<String>, StorageError> {
    let row = client
        .query_opt(
            "WITH RECURSIVE b(bucket) AS (
                (SELECT bucket FROM ferrosync.op_chunks WHERE group_id = $1 AND bucket > $2 ORDER BY bucket LIMIT 1)
                UNION ALL
                SELECT (SELECT c.bucket FROM ferrosync.op_chunks c WHERE c.group_id = $1 AND c.bucket > b.bucket ORDER BY c.bucket LIMIT 1)
                FROM b WHERE b.bucket IS NOT NULL)
             SELECT b.bucket FROM b
             WHERE b.bucket IS NOT NULL
               AND (SELECT max(last_op) FROM ferrosync.op_chunks c WHERE c.group_id = $1 AND c.bucket = b.bucket AND c.last_op <= $3)
                   > coalesce((SELECT compacted_to FROM ferrosync.bucket_compaction k WHERE k.group_id = $1 AND k.bucket = b.bucket), 0)
             LIMIT 1",
            &[&(group as i32), &after, &horizon],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Ops and payload bytes of `bucket` up to `horizon`.
async fn size(client: &Client, group: i64, bucket: &str, horizon: i64) -> Result<(i64, i64), StorageError> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(op_count), 0)::int8, coalesce(sum(octet_length(ops)), 0)::int8 FROM ferrosync.op_chunks
             WHERE group_id = $1 AND bucket = $2 AND last_op <= $3",
            &[&(group as i32), &bucket, &horizon],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Rewrite superseded ops (newest chunks first), then fold the leading run; returns how many
/// ops became MOVEs.
async fn compact_bucket(
    client: &mut Client,
    group: i64,
    bucket: &str,
    horizon: i64,
    options: &CompactOptions,
) -> Result<u64, StorageError> {
    let mut supersede = Supersede::default();
    let mut rewritten = 0u64;
    let mut below = horizon.saturating_add(1);
    loop {
        let tx = client.transaction().await?;
        let page = load(&tx, group, bucket, "last_op < $3 ORDER BY last_op DESC", below).await?;
        let Some(oldest) = page.last().map(|c| c.last_op) else { break };
        let count = page.len();
        let mut moved = 0;
        let mut chunks = page;
        for c in &mut chunks {
            moved += supersede.rewrite(c);
        }
        chunks.reverse();
        let old: Vec<i64> = chunks.iter().map(|c| c.last_op).collect();
        let repacked = repack(chunks);
        if moved > 0 || repacked.len() < count {
            replace(&tx, group, bucket, &old, &repacked).await?;
            tx.commit().await?;
            tokio::time::sleep(options.pause).await;
        }
        rewritten += moved as u64;
        below = oldest;
    }
    fold(client, group, bucket, horizon, options).await?;
    client
        .execute(
            "INSERT INTO ferrosync.bucket_compaction (group_id, bucket, compacted_to) VALUES ($1, $2, $3)
             ON CONFLICT (group_id, bucket) DO UPDATE SET compacted_to = excluded.compacted_to",
            &[&(group as i32), &bucket, &horizon],
        )
        .await?;
    Ok(rewritten)
}

/// Fold the leading REMOVE/MOVE/CLEAR run into one CLEAR, a page of chunks per transaction.
async fn fold(client: &mut Client, group: i64, bucket: &str, horizon: i64, options: &CompactOptions) -> Result<(), StorageError> {
    loop {
        let tx = client.transaction().await?;
        let chunks = load(&tx, group, bucket, "last_op <= $3 ORDER BY last_op", horizon).await?;
        let Some(fold) = fold_leading(&chunks) else { return Ok(()) };
        let touched = fold.replaced + usize::from(fold.rest.is_some());
        let old: Vec<i64> = chunks[..touched].iter().map(|c| c.last_op).collect();
        let whole_page = touched == chunks.len() && fold.rest.is_none();
        let mut new = vec![fold.clear];
        new.extend(fold.rest);
        replace(&tx, group, bucket, &old, &new).await?;
        tx.commit().await?;
        if !whole_page {
            return Ok(());
        }
        tokio::time::sleep(options.pause).await;
    }
}

/// A page of `bucket`'s chunks by `filter` (bound `$3`), decoded.
async fn load(client: &impl GenericClient, group: i64, bucket: &str, filter: &str, bound: i64) -> Result<Vec<Chunk>, StorageError> {
    let rows = client
        .query(
            &format!(
                "SELECT first_op, last_op, target_op, clear, ops FROM ferrosync.op_chunks
                 WHERE group_id = $1 AND bucket = $2 AND {filter} LIMIT {PAGE_CHUNKS} FOR UPDATE"
            ),
            &[&(group as i32), &bucket, &bound],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Chunk {
                first_op: r.get(0),
                last_op: r.get(1),
                target_op: r.get(2),
                clear: r.get(3),
                ops: chunk::decode(r.get(4))?,
            })
        })
        .collect()
}

/// Replace the chunks ending at `old` with `new`.
async fn replace(client: &impl GenericClient, group: i64, bucket: &str, old: &[i64], new: &[Chunk]) -> Result<(), StorageError> {
    let g = group as i32;
    client
        .execute(
            "DELETE FROM ferrosync.op_chunks WHERE group_id = $1 AND bucket = $2 AND last_op = ANY($3)",
            &[&g, &bucket, &old],
        )
        .await?;
    let first: Vec<i64> = new.iter().map(|c| c.first_op).collect();
    let last: Vec<i64> = new.iter().map(|c| c.last_op).collect();
    let counts: Vec<i32> = new.iter().map(|c| c.ops.len() as i32).collect();
    let sums: Vec<i64> = new.iter().map(|c| i64::from(c.checksum())).collect();
    let targets: Vec<i64> = new.iter().map(|c| c.target_op).collect();
    let clears: Vec<bool> = new.iter().map(|c| c.clear).collect();
    let payloads: Vec<Vec<u8>> = new.iter().map(|c| chunk::encode(c.ops.iter())).collect();
    client
        .execute(
            "INSERT INTO ferrosync.op_chunks (group_id, bucket, first_op, last_op, op_count, checksum, target_op, clear, ops)
             SELECT $1, $2, * FROM unnest($3::int8[], $4::int8[], $5::int4[], $6::int8[], $7::int8[], $8::bool[], $9::bytea[])",
            &[&g, &bucket, &first, &last, &counts, &sums, &targets, &clears, &payloads],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
