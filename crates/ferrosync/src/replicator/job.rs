//! One replication job: replicate a stream while holding its lease (slot checks, snapshot,
//! streaming and background storage maintenance side by side).

use super::pipeline::Replication;
use super::rebuild::{rules_for, Rebuild};
use super::slot::{rebuild_stream, watch_slot};
use super::{connect_source, ReplicatorConfig};
use anyhow::{Context, Result};
use ferrosync_source::setup;
use ferrosync_source::slot::slot_health;
use ferrosync_storage::BucketWriter;
use ferrosync_storage::{incremental, streams};
use std::sync::Arc;
use std::time::Duration;

/// Pause between deletion batches of replaced definitions' buckets.
const CLEANUP_PAUSE: Duration = Duration::from_millis(10);
/// How often the queue of replaced definitions' buckets is checked.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(2);

/// Replicate stream `id` while holding its lease.
pub(super) async fn replicate(config: &ReplicatorConfig, storage: &tokio_postgres::Client, id: i64) -> Result<()> {
    // Read after taking the lease: the previous holder may have committed until a moment ago.
    let stream = streams::stream_by_id(storage, id).await?.context("replication stream vanished")?;
    let source = Arc::new(connect_source(config).await?);
    setup::check_source(&source).await?;
    // The stream's own config, not the file's: it may have been deployed by another process.
    let (rules, new_only) = rules_for(&stream, &config.rules_options)?;
    let deploy = stream.pending.as_ref().map(|p| p.id);
    let slot = stream.slot_name.clone();
    let snapshot_done = stream.snapshot_done;
    let health = slot_health(&source, &slot).await?;
    tracing::info!(stream = stream.id, state = stream.state.as_str(), slot = %slot, snapshot_done, "replication starting");
    let usable = health.as_ref().is_some_and(|h| !h.is_lost());
    if snapshot_done && !usable {
        return Err(rebuild_stream(config, &source, id, &slot, health.is_some()).await);
    }
    let stream = if !usable {
        // A fresh slot replays from now: anything stored by an earlier attempt is unusable.
        setup::drop_slot(&source, &slot).await?;
        streams::clear_group(storage, stream.id).await?;
        setup::create_slot(&source, &slot).await?;
        streams::stream_by_id(storage, id).await?.context("replication stream vanished")?
    } else {
        stream
    };
    let reader = ferrosync_storage::connect_for_writes(&config.storage).await?;
    let writer = ferrosync_storage::connect_for_writes(&config.storage).await?;
    let mut repl = Replication::new(
        source,
        BucketWriter::new(reader, writer, stream, rules.clone(), config.owner.clone()),
        rules,
        config.clone(),
    );
    let replication = async {
        // The slot is read from before the copy: Postgres decodes the WAL written during the
        // copy (all of it, storage's too when storage shares the cluster) while the copy runs,
        // rather than after it, which held the first checkpoint back.
        let changes = repl.open_stream().await?;
        if !snapshot_done {
            config.status.set_replication(id, "snapshot", None);
            repl.initial_snapshot().await?;
        }
        if let (Some(deploy), Some(new_only)) = (deploy, new_only) {
            repl.start_rebuild(Rebuild::new(deploy, new_only)).await?;
        }
        repl.stream_changes(changes).await
    };
    // Buckets of definitions replaced by in-place deploys go in the background.
    let cleanup = async {
        loop {
            if let Err(e) = incremental::cleanup_retired(storage, id, CLEANUP_PAUSE).await {
                tracing::warn!(error = %e, stream = id, "deleting replaced definitions' buckets failed; retrying");
            }
            tokio::time::sleep(CLEANUP_INTERVAL).await;
        }
    };
    // Compaction and hygiene run beside replication while this process holds the lease, so
    // two processes never compact at once; they end with the attempt.
    let compaction = crate::compact::background(config.storage.clone(), id, config.compaction.clone());
    // A slot invalidated while we run ends the attempt; the next one rebuilds the stream.
    tokio::select! {
        result = replication => result,
        error = watch_slot(config, slot.clone()) => Err(error),
        () = compaction => Err(anyhow::anyhow!("background storage maintenance stopped")),
        never = cleanup => never,
    }
}
