//! The replication pipeline: source (snapshot + pgoutput) -> rules -> storage.
//!
//! One replicator per sync config, guarded by a lease in storage ([`LeaseConnection`]).
//! Storage writes are batched across source transactions: every event already decoded is applied before one flush and
//! one checkpoint, and the LSN is acknowledged to Postgres only after that commit returns.

mod job;
mod pipeline;
mod rebuild;
mod slot;

use anyhow::Result;
use ferrosync_api::probes::ProbeState;
use ferrosync_config::{CompactionConfig, PostgresConnectionConfig};
use ferrosync_pgconn::{Backoff, PgEndpoint};
use ferrosync_rules::SyncRulesOptions;
use ferrosync_storage::lease::LeaseConnection;
use ferrosync_storage::{incremental, streams};
use job::replicate;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the replicator needs from the config.
#[derive(Clone)]
pub struct ReplicatorConfig {
    pub source: PostgresConnectionConfig,
    pub source_endpoint: PgEndpoint,
    pub storage: PgEndpoint,
    pub rules_content: String,
    pub rules_options: SyncRulesOptions,
    pub owner: String,
    /// Where the replicator reports what it is doing (read by the probes).
    pub status: Arc<ProbeState>,
    /// Background compaction, run by the lease holder only.
    pub compaction: CompactionConfig,
}

/// How often a standby checks whether the lease holder is gone. Takeover happens within this
/// interval of the holder's death (its lease connection closes with it).
const STANDBY_POLL: Duration = Duration::from_millis(250);
/// Longest wait for the storage to confirm a lease release before the connection is dropped.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// An attempt that ran this long was healthy: the next failure starts the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Run until the process ends: take the lease (or stand by), replicate, and after any failure
/// (source or storage restarted, network cut, lease lost) start over with backoff and jitter.
/// Nothing is acknowledged to the source that is not durable in storage, so starting over
/// resumes exactly where the last commit left off.
pub async fn run(config: ReplicatorConfig) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut lease: Option<LeaseConnection> = None;
    let mut standing_by = false;
    loop {
        let started = Instant::now();
        match attempt(&config, &mut lease).await {
            Ok(()) => {
                if !standing_by {
                    tracing::info!("another process holds the replication lease; standing by");
                    config.status.set_replication("standby", None);
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
                tracing::error!(error = %error, retry_in_ms = delay.as_millis() as u64, "replication stopped");
                config.status.set_replication("retrying", Some(error));
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
async fn attempt(config: &ReplicatorConfig, lease: &mut Option<LeaseConnection>) -> Result<()> {
    if lease.is_none() {
        *lease = Some(LeaseConnection::open(&config.storage).await?);
    }
    let Some(held) = lease.as_ref() else { return Ok(()) };
    let in_place = incremental::deploy_in_place(held.client(), &config.rules_content, &config.rules_options).await?;
    let stream = match in_place {
        Some(stream) => stream,
        None => streams::stream_for_content(held.client(), &config.rules_content, &config.source.slot_name_prefix).await?,
    };
    if !held.try_acquire(stream.id, &config.owner).await? {
        return Ok(());
    }
    tokio::select! {
        result = replicate(config, held.client(), stream.id) => result,
        lost = held.lost() => Err(lost.into()),
    }
}

pub(super) async fn connect_source(cfg: &ReplicatorConfig) -> Result<tokio_postgres::Client> {
    let client = cfg.source_endpoint.connect().await?;
    client.batch_execute(ferrosync_source::types::SESSION_SETTINGS).await?;
    Ok(client)
}
