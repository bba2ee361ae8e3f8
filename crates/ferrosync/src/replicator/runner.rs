//! Keeps one stream replicated by this process whenever it can take the stream's lease:
//! stand by while another process holds it, replicate while this one does, and after any
//! failure (source or storage restarted, network cut, lease lost) start over with backoff and
//! jitter. Nothing is acknowledged to the source that is not durable in storage, so starting
//! over resumes exactly where the last commit left off. The supervisor ends the runner (drops
//! its task) once the stream no longer replicates.

use super::job::replicate;
use super::{ReplicatorConfig, STANDBY_POLL};
use anyhow::Result;
use ferrosync_pgconn::Backoff;
use ferrosync_storage::lease::LeaseConnection;
use ferrosync_storage::StorageError;
use std::time::{Duration, Instant};

/// Longest wait for the storage to confirm a lease release before the connection is dropped.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// An attempt that ran this long was healthy: the next failure starts the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Replicate stream `id` whenever this process holds its lease, until the task is dropped.
pub(super) async fn keep_replicated(config: ReplicatorConfig, id: i64) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut lease: Option<LeaseConnection> = None;
    let mut standing_by = false;
    loop {
        let started = Instant::now();
        match attempt(&config, &mut lease, id).await {
            Ok(()) => {
                if !standing_by {
                    tracing::info!(stream = id, "another process holds the replication lease; standing by");
                    config.status.set_replication(id, "standby", None);
                    standing_by = true;
                }
                tokio::time::sleep(STANDBY_POLL).await;
            }
            Err(e) => {
                standing_by = false;
                if started.elapsed() > HEALTHY_RUN {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                let error = format!("{e:#}");
                if was_stopped(&e) {
                    // A newer deploy replaced the stream: the supervisor ends this runner.
                    tracing::info!(stream = id, "replication stream stopped by a newer deploy");
                } else {
                    tracing::error!(stream = id, error = %error, retry_in_ms = delay.as_millis() as u64, "replication stopped");
                }
                config.status.set_replication(id, "retrying", Some(error));
                // Let a healthy standby take over while this process waits out its backoff. A
                // lease connection that does not answer is dropped (which also ends the lock).
                if let Some(held) = lease.take() {
                    if let Ok(Ok(())) = tokio::time::timeout(RELEASE_TIMEOUT, held.release()).await {
                        lease = Some(held);
                    }
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One attempt: `Ok` when another process holds the lease, else runs until an error.
async fn attempt(config: &ReplicatorConfig, lease: &mut Option<LeaseConnection>, id: i64) -> Result<()> {
    if lease.is_none() {
        *lease = Some(LeaseConnection::open(&config.storage).await?);
    }
    let Some(held) = lease.as_ref() else { return Ok(()) };
    if !held.try_acquire(id, &config.owner).await? {
        return Ok(());
    }
    tokio::select! {
        result = replicate(config, held.client(), id) => result,
        lost = held.lost() => Err(lost.into()),
    }
}

fn was_stopped(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|cause| matches!(cause.downcast_ref::<StorageError>(), Some(StorageError::Stopped(_))))
}
