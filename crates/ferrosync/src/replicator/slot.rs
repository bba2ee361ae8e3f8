//! The replication slot's health while replicating, and what happens when it is lost.

use super::{connect_source, ReplicatorConfig};
use ferrosync_source::setup;
use ferrosync_source::slot::slot_health;
use ferrosync_storage::streams;
use std::time::Duration;

/// How often the slot's health is checked while replicating.
const SLOT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// A slot health check unanswered this long means the source is unreachable: start over.
const SLOT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves with an error once the slot is gone or lost; warns while its WAL budget runs low.
pub(super) async fn watch_slot(config: &ReplicatorConfig, slot: String) -> anyhow::Error {
    let client = match connect_source(config).await {
        Ok(c) => c,
        Err(e) => return e.context("slot health connection"),
    };
    let mut warned = false;
    loop {
        tokio::time::sleep(SLOT_CHECK_INTERVAL).await;
        let health = match tokio::time::timeout(SLOT_CHECK_TIMEOUT, slot_health(&client, &slot)).await {
            Ok(result) => result,
            Err(_) => {
                return anyhow::anyhow!(
                    "the source did not answer the slot health check within {} s (network cut?)",
                    SLOT_CHECK_TIMEOUT.as_secs()
                )
            }
        };
        match health {
            Ok(Some(h)) if !h.is_lost() => {
                if let Some(lag) = h.lag_bytes {
                    ferrosync_metrics::lag_bytes(&slot, lag.max(0) as u64);
                }
                if h.is_at_risk() && !warned {
                    tracing::warn!(
                        slot = %slot,
                        wal_status = %h.wal_status,
                        safe_wal_bytes = h.safe_wal_size,
                        max_slot_wal_keep_size_bytes = h.budget,
                        "replication slot is close to max_slot_wal_keep_size: if replication does not catch up, Postgres invalidates the slot and a full resync follows (raise max_slot_wal_keep_size or give replication more resources)"
                    );
                }
                warned = h.is_at_risk();
            }
            Ok(found) => {
                return ferrosync_source::SourceError::SlotInvalid {
                    slot,
                    reason: slot_problem(found.is_some()).into(),
                }
                .into();
            }
            Err(e) => return e.into(),
        }
    }
}

/// What is wrong with an unusable slot: it exists but lost its WAL, or it is gone.
fn slot_problem(exists: bool) -> &'static str {
    if exists {
        "invalidated (its WAL was removed)"
    } else {
        "missing"
    }
}

/// The slot of a stream that finished its snapshot is gone or lost: its history cannot
/// continue. Clients keep syncing the stream's last data (it becomes ERRORED) while a new
/// stream with the same config is built from a fresh snapshot on the next attempt.
pub(super) async fn rebuild_stream(
    config: &ReplicatorConfig,
    source: &tokio_postgres::Client,
    id: i64,
    slot: &str,
    exists: bool,
) -> anyhow::Error {
    let reason = slot_problem(exists);
    tracing::error!(
        stream = id,
        slot,
        reason,
        "replication slot is unusable: building a new replication stream from a fresh snapshot; clients keep the last synced data until it is ready"
    );
    if let Err(e) = replace_stream(config, id).await {
        return e;
    }
    if let Err(e) = setup::drop_slot(source, slot).await {
        tracing::warn!(slot, error = %e, "could not drop the unusable slot");
    }
    ferrosync_source::SourceError::SlotInvalid {
        slot: slot.to_string(),
        reason: format!("{reason}; a new replication stream replaces it"),
    }
    .into()
}

/// Mark stream `id` ERRORED (or STOP) and add its replacement, on a connection of its own: a
/// rare step that needs a transaction.
async fn replace_stream(config: &ReplicatorConfig, id: i64) -> anyhow::Result<()> {
    let mut client = ferrosync_storage::connect_for_writes(&config.storage).await?;
    let replacement = streams::restart_replication(&mut client, id, &config.owner, &config.source.slot_name_prefix).await?;
    tracing::info!(stream = id, replacement = ?replacement.map(|s| s.id), "replication stream retired after losing its slot (ERRORED if it served, else STOP)");
    Ok(())
}
