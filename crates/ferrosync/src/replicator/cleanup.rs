//! Clean-up of a stopped stream (replaced by a newer deploy): under the stream's lease, drop
//! its slot on the source (so it no longer holds WAL), delete its storage in batches, and mark
//! it TERMINATED. Whichever process takes the lease first does it; the others find it done.

use super::{connect_source, ReplicatorConfig};
use anyhow::{Context, Result};
use ferrosync_pgconn::Backoff;
use ferrosync_source::setup;
use ferrosync_storage::lease::LeaseConnection;
use ferrosync_storage::{lifecycle, streams};
use std::time::Duration;

/// Wait before cleaning up: a client still downloading from the stream at the switch is moved
/// to the new one at its next data line, and should not read a half-deleted stream first.
const GRACE: Duration = Duration::from_secs(5);
/// How often to look again while another process holds the stream's lease (its old
/// replicator, not stopped yet, or another process cleaning up).
const HELD_POLL: Duration = Duration::from_secs(1);

/// Clean up STOP stream `id`; returns once it is TERMINATED (here or elsewhere).
pub(super) async fn clean_up(config: ReplicatorConfig, id: i64) {
    config.status.set_replication(id, "cleanup", None);
    tokio::time::sleep(GRACE).await;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        match attempt(&config, id).await {
            Ok(true) => return,
            Ok(false) => tokio::time::sleep(HELD_POLL).await,
            Err(e) => {
                let delay = backoff.next_delay();
                let error = format!("{e:#}");
                tracing::warn!(stream = id, error = %error, retry_in_ms = delay.as_millis() as u64, "clean-up of a stopped replication stream failed; retrying");
                config.status.set_replication(id, "retrying", Some(error));
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// `Ok(false)` while another process holds the lease.
async fn attempt(config: &ReplicatorConfig, id: i64) -> Result<bool> {
    let lease = LeaseConnection::open(&config.storage).await?;
    if !lease.try_acquire_stopped(id, &config.owner).await? {
        return Ok(false);
    }
    let stream = streams::stream_by_id(lease.client(), id)
        .await?
        .context("replication stream vanished")?;
    let source = connect_source(config).await?;
    // A walsender still attached (its replicator elsewhere has not noticed the stop yet, or
    // is just disconnecting) makes this fail: the slot is dropped on a later attempt.
    setup::drop_slot(&source, &stream.slot_name)
        .await
        .with_context(|| format!("dropping replication slot {} (still in use?)", stream.slot_name))?;
    let deleted = lifecycle::terminate(lease.client(), id, &config.owner).await?;
    tracing::info!(stream = id, slot = %stream.slot_name, slot_dropped = true, rows_deleted = deleted, "replication stream TERMINATED: slot dropped and storage deleted");
    Ok(true)
}
