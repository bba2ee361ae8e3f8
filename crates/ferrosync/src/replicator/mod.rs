//! The replication pipeline: source (snapshot + pgoutput) -> rules -> storage.
//!
//! The process deploys its sync config once at start; a supervisor ([`supervisor`]) then
//! replicates every stream that needs it, one job per stream and each with its own lease
//! ([`LeaseConnection`]), slot and backoff: during a deploy the served stream keeps streaming
//! while the new one snapshots. Stopped streams are cleaned up ([`cleanup`]).
//! Storage writes are batched across source transactions: every event already decoded is applied before one flush and
//! one checkpoint, and the LSN is acknowledged to Postgres only after that commit returns.
//!
//! [`LeaseConnection`]: ferrosync_storage::lease::LeaseConnection

mod cleanup;
mod job;
mod pipeline;
mod rebuild;
mod runner;
mod slot;
mod supervisor;

pub use supervisor::run;

use ferrosync_api::probes::ProbeState;
use ferrosync_config::{CompactionConfig, PostgresConnectionConfig};
use ferrosync_pgconn::PgEndpoint;
use ferrosync_rules::SyncRulesOptions;
use std::sync::Arc;
use std::time::Duration;

/// What the replicator needs from the config.
#[derive(Clone)]
pub struct ReplicatorConfig {
    pub source: PostgresConnectionConfig,
    pub source_endpoint: PgEndpoint,
    pub storage: PgEndpoint,
    /// The config file's sync config: deployed at start only (`None`: the admin API deploys).
    /// Jobs replicate each stream's own stored content, so a process keeps working for
    /// streams deployed by others.
    pub rules_content: Option<String>,
    pub rules_options: SyncRulesOptions,
    pub owner: String,
    /// Where the replicator reports what it is doing (read by the probes).
    pub status: Arc<ProbeState>,
    /// Background compaction, run by each stream's lease holder only.
    pub compaction: CompactionConfig,
}

/// How often a standby checks whether the lease holder is gone. Takeover happens within this
/// interval of the holder's death (its lease connection closes with it).
const STANDBY_POLL: Duration = Duration::from_millis(250);

pub(super) async fn connect_source(cfg: &ReplicatorConfig) -> anyhow::Result<tokio_postgres::Client> {
    let client = cfg.source_endpoint.connect().await?;
    client.batch_execute(ferrosync_source::types::SESSION_SETTINGS).await?;
    Ok(client)
}
