//! `serve` and `migrate`: load the config, wire the stages together, run.

use crate::replicator::{self, ReplicatorConfig};
use anyhow::{Context, Result};
use ferrosync_api::auth::KeyStore;
use ferrosync_api::checkpoint_request::RequestRetention;
use ferrosync_api::probes::ProbeState;
use ferrosync_api::AppState;
use ferrosync_config::{load_config_file, LoadedConfig};
use ferrosync_pgconn::{LazyClient, PgEndpoint};
use ferrosync_rules::{SyncRules, SyncRulesOptions};
use ferrosync_storage::PgStorage;
use ferrosync_sync::{CheckpointHub, Limits};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub(crate) fn load(path: &Path) -> Result<LoadedConfig> {
    let loaded = load_config_file(path, &|name| std::env::var(name).ok()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for warning in &loaded.warnings {
        tracing::warn!("{}: {warning}", path.display());
    }
    Ok(loaded)
}

pub(crate) fn rules_options() -> SyncRulesOptions {
    SyncRulesOptions {
        default_schema: "public".into(),
        sync_rules_id: 1,
        default_storage_version: 2,
    }
}

/// Parse the sync rules, printing warnings; errors name every problem.
fn check_rules(content: &str) -> Result<SyncRules> {
    let rules = SyncRules::parse(content, &rules_options()).map_err(|e| anyhow::anyhow!("sync rules are invalid:\n{e}"))?;
    for w in rules.warnings() {
        tracing::warn!("sync rules: {w}");
    }
    Ok(rules)
}

pub async fn migrate(path: &Path) -> Result<()> {
    let loaded = load(path)?;
    let storage = PgEndpoint::from_config(&loaded.config.storage).context("bucket storage")?;
    let client = ferrosync_storage::connect(&storage).await.context("connecting to bucket storage")?;
    ferrosync_storage::schema::migrate(&client).await?;
    println!("storage schema is up to date");
    Ok(())
}

pub async fn serve(path: &Path, bind: Option<String>) -> Result<()> {
    let config = load(path)?.config;
    let sync = config
        .sync_config
        .as_ref()
        .context("no sync_config/sync_rules in the config: nothing to serve")?;
    check_rules(&sync.content)?;
    // Connection settings and TLS problems (unknown CA, host name mismatch, expired
    // certificate) stop the start with the cause; later outages are ridden out.
    let storage_endpoint = PgEndpoint::from_config(&config.storage).context("bucket storage")?;
    let storage_client = ferrosync_storage::connect(&storage_endpoint)
        .await
        .context("connecting to bucket storage")?;
    if !config.migrations.disable_auto_migration {
        ferrosync_storage::schema::migrate(&storage_client).await?;
    }
    drop(storage_client);
    let probes = Arc::new(ProbeState::default());
    let mut source_client = None;
    let mut replication = None;
    if let Some(source) = &config.replication {
        let source_endpoint = PgEndpoint::from_config(source).context("replication source")?;
        let client = LazyClient::connected(source_endpoint.clone(), None)
            .await
            .context("connecting to the replication source")?;
        source_client = Some(client);
        replication = Some(tokio::spawn(replicator::run(ReplicatorConfig {
            source: source.clone(),
            source_endpoint,
            storage: storage_endpoint.clone(),
            rules_content: sync.content.clone(),
            rules_options: rules_options(),
            owner: format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple()),
            status: probes.clone(),
        })));
    }
    let storage = Arc::new(PgStorage::connect(&storage_endpoint, 4).await?);
    let hub = CheckpointHub::start(storage, storage_endpoint, rules_options()).await;
    let keys = Arc::new(KeyStore::from_config(&config.client_auth).map_err(|e| anyhow::anyhow!("client_auth: {e}"))?);
    let params = &config.api.parameters;
    let state = Arc::new(AppState {
        hub,
        keys,
        source: source_client,
        limits: Limits {
            max_buckets: params.max_buckets_per_connection,
            max_parameter_results: params.max_parameter_query_results,
        },
        connections: Arc::new(Semaphore::new(params.max_concurrent_connections)),
        probes,
        checkpoint_requests: RequestRetention::new(Duration::from_secs(params.checkpoint_request_retention_minutes.saturating_mul(60))),
    });
    let addr = format!("{}:{}", bind.unwrap_or_else(|| config.bind_address.clone()), config.port);
    let listener = listen(&addr).await.with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "ferrosync listening");
    state.probes.started.store(true, Ordering::Relaxed);
    // Sync streams never end on their own, so shutdown does not wait for them: clients
    // reconnect (to another instance) and resume from their positions.
    tokio::select! {
        () = ferrosync_api::http_server::serve(listener, ferrosync_api::router(state)) => {}
        () = shutdown_signal() => tracing::info!("shutting down"),
    }
    if let Some(task) = replication {
        // Writes in flight roll back and their LSNs were never acknowledged: nothing is lost.
        // The lease connection closes with the task, which hands the lease over at once.
        task.abort();
        let _ = task.await;
    }
    Ok(())
}

/// Bind with a deep accept backlog: thousands of clients reconnecting at once (after a deploy
/// or a network blip) should queue, not have their SYNs dropped and retried a second later.
async fn listen(addr: &str) -> Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .context("bind address resolves to nothing")?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(8192)?)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "ferrosync".into())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
