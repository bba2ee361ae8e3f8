//! `compact` (passes over the served stream until done, then exit) and the background
//! maintenance the replicator runs while it holds the lease (`storage.compaction`): compaction
//! when enabled, and storage hygiene always.

use crate::serve::load;
use anyhow::{Context, Result};
use ferrosync_config::CompactionConfig;
use ferrosync_pgconn::PgEndpoint;
use ferrosync_storage::compactor::{self, CompactOptions, CompactStats};
use ferrosync_storage::hygiene::{self, PruneOptions};
use ferrosync_storage::{streams, StorageError};
use std::path::Path;
use std::time::Duration;

fn options(config: &CompactionConfig) -> CompactOptions {
    CompactOptions {
        max_ops: config.max_ops_per_pass,
        pause: Duration::from_millis(config.pause_ms),
    }
}

fn log_pass(stats: &CompactStats, group: i64) {
    tracing::info!(
        stream = group,
        horizon = stats.horizon,
        buckets = stats.buckets,
        ops_before = stats.ops_before,
        ops_after = stats.ops_after,
        moved = stats.rewritten,
        bytes_before = stats.bytes_before,
        bytes_after = stats.bytes_after,
        finished = stats.finished,
        "compaction pass done"
    );
}

/// `ferrosync compact --config FILE`.
pub async fn run_once(path: &Path) -> Result<()> {
    let config = load(path)?.config;
    let endpoint = PgEndpoint::from_config(&config.storage).context("bucket storage")?;
    let mut client = ferrosync_storage::connect(&endpoint)
        .await
        .context("connecting to bucket storage")?;
    if !config.migrations.disable_auto_migration {
        ferrosync_storage::schema::migrate(&client).await?;
    }
    let Some(stream) = streams::active_stream(&client).await? else {
        println!("no active sync config in bucket storage: nothing to compact");
        return Ok(());
    };
    let options = options(&config.compaction);
    let mut total = CompactStats::default();
    loop {
        let stats = compactor::compact(&mut client, stream.id, &options)
            .await?
            .context("another compaction of this stream is running (the background task of `serve`?); try again later")?;
        log_pass(&stats, stream.id);
        total.buckets += stats.buckets;
        total.ops_before += stats.ops_before;
        total.ops_after += stats.ops_after;
        total.bytes_before += stats.bytes_before;
        total.bytes_after += stats.bytes_after;
        if stats.finished {
            break;
        }
    }
    println!(
        "compacted {} buckets: {} ops -> {} ops, {} bytes -> {} bytes",
        total.buckets, total.ops_before, total.ops_after, total.bytes_before, total.bytes_after
    );
    Ok(())
}

/// Maintain stream `group` every `interval_seconds` until dropped (with the replication it
/// runs beside). Failures are logged and retried at the next interval; replication and
/// serving never wait for a pass.
pub async fn background(storage: PgEndpoint, group: i64, config: CompactionConfig) {
    let interval = Duration::from_secs(config.interval_seconds);
    let mut client = None;
    // The checkpoint seen one pass ago: parameter history is pruned up to it, so no
    // connection (they follow the newest checkpoint within moments) still reads below it.
    let mut horizon = 0;
    loop {
        tokio::time::sleep(interval).await;
        if client.is_none() {
            match ferrosync_storage::connect(&storage).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "storage maintenance cannot reach bucket storage; next try at the next interval");
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        if let Err(e) = maintain(c, group, &config, &mut horizon).await {
            tracing::warn!(error = %e, "storage maintenance pass failed; retrying at the next interval");
            client = None;
        }
    }
}

async fn maintain(
    client: &mut tokio_postgres::Client,
    group: i64,
    config: &CompactionConfig,
    horizon: &mut i64,
) -> Result<(), StorageError> {
    if config.enabled {
        match compactor::compact(client, group, &options(config)).await? {
            Some(stats) if stats.buckets > 0 => log_pass(&stats, group),
            Some(_) => {}
            None => tracing::info!(stream = group, "another compaction is running; skipping this pass"),
        }
    }
    let checkpoint = streams::stream_by_id(client, group).await?.map_or(0, |s| s.checkpoint.op_id);
    let options = PruneOptions {
        parameter_horizon: *horizon,
        write_checkpoint_retention: Duration::from_secs(config.write_checkpoint_retention_minutes.saturating_mul(60)),
        pause: Duration::from_millis(config.pause_ms),
    };
    let pruned = hygiene::prune(client, group, &options).await?;
    if pruned != hygiene::PruneStats::default() {
        tracing::info!(
            stream = group,
            parameter_horizon = *horizon,
            parameter_rows = pruned.parameter_rows,
            write_checkpoints = pruned.write_checkpoints,
            compaction_markers = pruned.compaction_markers,
            orphan_rows = pruned.orphan_rows,
            "storage hygiene pass deleted rows"
        );
    }
    *horizon = checkpoint;
    Ok(())
}
