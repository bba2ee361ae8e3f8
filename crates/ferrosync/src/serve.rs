//! `serve` and `migrate`: load the config, wire the stages together, run.

use crate::replicator::{self, ReplicatorConfig};
use anyhow::{Context, Result};
use ferrosync_api::admin::{AdminState, ApiTokens};
use ferrosync_api::auth::KeyStore;
use ferrosync_api::checkpoint_request::RequestRetention;
use ferrosync_api::dashboard::Dashboard;
use ferrosync_api::probes::ProbeState;
use ferrosync_api::AppState;
use ferrosync_config::{load_config_file, LoadedConfig};
use ferrosync_pgconn::{LazyClient, PgEndpoint};
use ferrosync_rules::{SyncRules, SyncRulesOptions};
use ferrosync_storage::PgStorage;
use ferrosync_sync::{CheckpointHub, Limits};
use metrics_exporter_prometheus::PrometheusHandle;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
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
        prefix_ids: Default::default(),
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
    // Without a sync config in the file, the one deployed through the admin API is served.
    let file_rules = config.sync_config.as_ref().map(|s| s.content.clone());
    match &file_rules {
        Some(content) => drop(check_rules(content)?),
        None => tracing::info!("no sync_config in the config file: serving the sync config deployed through the admin API"),
    }
    let host = bind.unwrap_or_else(|| config.bind_address.clone());
    let metrics = crate::metrics::start(&host, &config.telemetry).await?;
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
    crate::metrics::sample_storage_sizes(storage_endpoint.clone());
    let probes = Arc::new(ProbeState::new(config.probes));
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
            rules_content: file_rules.clone(),
            rules_options: rules_options(),
            owner: format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple()),
            status: probes.clone(),
            compaction: config.compaction.clone(),
        })));
    }
    let storage = Arc::new(PgStorage::connect(&storage_endpoint, 4).await?);
    let hub = CheckpointHub::start(storage, storage_endpoint.clone(), rules_options()).await;
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
        admin: AdminState {
            tokens: ApiTokens::new(&config.api.tokens),
            source: config.replication.clone(),
            storage: LazyClient::new(storage_endpoint.clone(), None),
            config_has_rules: file_rules.is_some(),
            rules_options: rules_options(),
        },
    });
    let addr = format!("{host}:{}", config.port);
    let listeners = listen(&addr).await.with_context(|| format!("binding {addr}"))?;
    state.probes.started.store(true, Ordering::Relaxed);
    // The reference's file probes live in `.probes` of the working directory.
    tokio::spawn(ferrosync_api::probes::run(state.clone(), PathBuf::from(".probes")));
    // Sync streams never end on their own, so shutdown does not wait for them: clients
    // reconnect (to another instance) and resume from their positions.
    let router = routes(state, metrics);
    tokio::select! {
        () = ferrosync_api::http_server::serve_all(listeners, router) => {}
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

/// The sync API, the dashboard and the admin routes.
fn routes(state: Arc<AppState>, metrics: PrometheusHandle) -> axum::Router {
    ferrosync_api::router(state.clone()).merge(ferrosync_api::dashboard::router(Dashboard {
        app: state,
        metrics: Arc::new(move || metrics.render()),
    }))
}

/// Bind every address `addr` resolves to: `localhost`, say, is often both 127.0.0.1 and ::1,
/// and clients may try either. An address the machine lacks (::1 without IPv6) is skipped with
/// a warning; any other failure, such as the port being taken, fails the start. With port 0
/// the later addresses get the port the first one was given, so one port serves them all.
pub(crate) async fn listen(addr: &str) -> Result<Vec<TcpListener>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
    anyhow::ensure!(!addrs.is_empty(), "the bind address resolves to nothing");
    listen_all(addrs)
}

fn listen_all(mut addrs: Vec<SocketAddr>) -> Result<Vec<TcpListener>> {
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|addr| seen.insert(*addr));
    let mut listeners: Vec<TcpListener> = Vec::new();
    for mut addr in addrs {
        if let (0, Some(first)) = (addr.port(), listeners.first()) {
            addr.set_port(first.local_addr()?.port());
        }
        match bind(addr) {
            Ok(listener) => {
                tracing::info!(addr = %listener.local_addr()?, "ferrosync listening");
                listeners.push(listener);
            }
            Err(e) if lacks_address(&e) => tracing::warn!(%addr, error = %e, "skipping an address this machine does not have"),
            Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
        }
    }
    anyhow::ensure!(!listeners.is_empty(), "this machine has none of the addresses");
    Ok(listeners)
}

/// Bind with a deep accept backlog: thousands of clients reconnecting at once (after a deploy
/// or a network blip) should queue, not have their SYNs dropped and retried a second later.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}

/// The machine lacks the address (EADDRNOTAVAIL), or its whole family (EAFNOSUPPORT: a kernel
/// without IPv6).
fn lacks_address(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(libc::EAFNOSUPPORT)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serve a one-route router on `listeners`; returns their addresses.
    fn serve_ok(listeners: Vec<TcpListener>) -> Vec<SocketAddr> {
        let addrs = listeners.iter().map(|l| l.local_addr().expect("local addr")).collect();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(ferrosync_api::http_server::serve_all(listeners, router));
        addrs
    }

    async fn get(addr: SocketAddr) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut got = String::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut got))
            .await
            .expect("answer in time")
            .expect("read");
        got
    }

    fn has_ipv6_loopback() -> bool {
        std::net::TcpListener::bind("[::1]:0").is_ok()
    }

    #[tokio::test]
    async fn every_address_localhost_resolves_to_is_served() {
        let resolved: std::collections::HashSet<_> = tokio::net::lookup_host("localhost:0")
            .await
            .expect("resolve")
            .map(|a| a.ip())
            // An address the machine lacks is skipped (see the test below).
            .filter(|ip| std::net::TcpListener::bind((*ip, 0)).is_ok())
            .collect();
        let addrs = serve_ok(listen("localhost:0").await.expect("listen"));
        let bound: std::collections::HashSet<_> = addrs.iter().map(|a| a.ip()).collect();
        assert_eq!(bound, resolved);
        for addr in addrs {
            assert!(get(addr).await.ends_with("\r\n\r\nok"), "{addr}");
        }
    }

    #[tokio::test]
    async fn both_loopbacks_are_served_on_one_port() {
        if !has_ipv6_loopback() {
            eprintln!("no IPv6 loopback here: skipped");
            return;
        }
        let v4: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let v6: SocketAddr = "[::1]:0".parse().expect("addr");
        let addrs = serve_ok(listen_all(vec![v4, v6, v4]).expect("listen"));
        assert_eq!(addrs.len(), 2, "{addrs:?}");
        assert_eq!(addrs[0].port(), addrs[1].port(), "{addrs:?}");
        for addr in addrs {
            assert!(get(addr).await.ends_with("\r\n\r\nok"), "{addr}");
        }
    }

    #[tokio::test]
    async fn missing_addresses_are_skipped_and_taken_ports_fail() {
        // 192.0.2.1 (TEST-NET-1) is no address of this machine.
        let absent: SocketAddr = "192.0.2.1:0".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let addrs = serve_ok(listen_all(vec![absent, local]).expect("listen"));
        assert_eq!(addrs.len(), 1, "{addrs:?}");
        assert!(get(addrs[0]).await.ends_with("\r\n\r\nok"));
        let e = listen_all(vec![absent]).expect_err("nothing to bind");
        assert!(e.to_string().contains("none of the addresses"), "{e:#}");
        let taken = std::net::TcpListener::bind(local).expect("bind");
        let taken = taken.local_addr().expect("addr");
        let e = listen_all(vec![absent, taken]).expect_err("port taken");
        assert_eq!(e.to_string(), format!("binding {taken}"), "{e:#}");
    }
}
