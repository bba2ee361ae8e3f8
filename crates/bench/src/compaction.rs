//! The compaction phase: `updates` updates to `rows` rows of one user (every row in turn, one
//! transaction per round), then the user's bucket in storage and what a fresh client downloads,
//! before and after `ferrosync compact`.

use crate::client::Transport;
use crate::phases::{any_list, count_new_ops, mb};
use crate::report::{self, thousands, Row};
use crate::setup::Target;
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// One bucket's chunks, ops and payload bytes in storage.
struct BucketSize {
    chunks: i64,
    ops: i64,
    bytes: i64,
}

async fn bucket_size(storage: &tokio_postgres::Client, bucket: &str) -> Result<BucketSize> {
    let row = storage
        .query_one(
            "SELECT count(*), coalesce(sum(op_count), 0)::int8, coalesce(sum(octet_length(ops)), 0)::int8
             FROM ferrosync.op_chunks WHERE bucket = $1",
            &[&bucket],
        )
        .await
        .context("bucket size")?;
    Ok(BucketSize {
        chunks: row.get(0),
        ops: row.get(1),
        bytes: row.get(2),
    })
}

/// Ops a fresh client downloads for `user` in buckets other than `shared`.
async fn fresh_ops(t: &Target, user: &str, shared: &[String], stall: Duration) -> Result<usize> {
    let mut stream = t.endpoint.open(user, Transport::NDJSON, &[]).await?;
    let sync = stream.until_complete(Some(stall)).await.context("fresh download")?;
    Ok(sync.received.iter().filter(|r| !shared.contains(&r.0)).map(|r| r.2).sum())
}

pub async fn compaction(t: &mut Target, run_id: &str, rows: i64, updates: i64, stall: Duration) -> Result<Row> {
    let rounds = (updates / rows.max(1)).max(1);
    let metric = format!(
        "compaction, {} updates to {} rows ({} rounds of one {}-row txn)",
        thousands((rounds * rows) as u64),
        thousands(rows as u64),
        rounds,
        thousands(rows as u64)
    );
    if t.service.is_none() || t.storage.is_none() {
        return Ok(Row::new(metric, "n/a (external service)", &report::COMPACTION, None));
    }
    let user = format!("churn-{run_id}");
    let list = any_list(t).await?;
    let mut stream = t.endpoint.open(&user, Transport::NDJSON, &[]).await?;
    let initial = stream.until_complete(Some(stall)).await.context("initial sync of the churn user")?;
    let shared: Vec<String> = initial.received.iter().map(|r| r.0.clone()).collect();
    let expected = usize::try_from(rows * (rounds + 1)).context("churn size")?;
    let reader = tokio::spawn(count_new_ops(stream, shared.clone(), expected, stall));
    t.source
        .execute(
            "INSERT INTO todos (description, owner_id, list_id) SELECT 'churn ' || g, $1, $2::text::uuid FROM generate_series(1, $3::bigint) g",
            &[&user, &list, &rows],
        )
        .await?;
    for round in 0..rounds {
        t.source
            .execute(
                "UPDATE todos SET description = 'round ' || $2::bigint WHERE owner_id = $1",
                &[&user, &round],
            )
            .await?;
    }
    reader.await?.context("waiting for the churn to replicate")?;

    let ops_before = fresh_ops(t, &user, &shared, stall).await?;
    let storage = t.storage.as_ref().context("storage connection")?;
    let bucket: String = storage
        .query_one(
            "SELECT bucket FROM ferrosync.op_chunks WHERE bucket <> ALL($1) GROUP BY bucket ORDER BY sum(op_count) DESC LIMIT 1",
            &[&shared],
        )
        .await
        .context("finding the churn bucket")?
        .get(0);
    let before = bucket_size(storage, &bucket).await?;
    let started = Instant::now();
    let service = t.service.as_ref().context("own service")?;
    let summary = tokio::task::block_in_place(|| service.compact())?;
    let took = started.elapsed();
    eprintln!("compact: {summary}");
    let after = bucket_size(storage, &bucket).await?;
    let ops_after = fresh_ops(t, &user, &shared, stall).await?;
    let value = format!(
        "fresh download {} → {} ops ({:.2}× the {} live rows); bucket {} → {} ops, {} → {} chunks, {} → {}; `compact` {:.1} s",
        thousands(ops_before as u64),
        thousands(ops_after as u64),
        ops_after as f64 / rows as f64,
        thousands(rows as u64),
        thousands(before.ops as u64),
        thousands(after.ops as u64),
        thousands(before.chunks as u64),
        thousands(after.chunks as u64),
        mb(before.bytes),
        mb(after.bytes),
        took.as_secs_f64()
    );
    Ok(Row::new(metric, value, &report::COMPACTION, None))
}
