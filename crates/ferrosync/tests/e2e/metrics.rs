//! The Prometheus endpoint (`telemetry.prometheus_port`) scraped while clients connect over
//! HTTP and WebSocket and rows change: the connection gauges follow the streams held, and the
//! replicated and synced counters match what the source wrote and the clients received. Plus
//! the lifecycle log line of an ended stream and the errors counter of a refused token.

use crate::harness::*;
use crate::ws_client::*;
use anyhow::{bail, Context, Result};
use ferrosync_testkit::free_port;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Serve metrics on a free port; call before starting.
fn enable_metrics(svc: &Service) -> Result<u16> {
    let port = free_port()?;
    let path = svc.dir.path().join("powersync.yaml");
    let mut config = std::fs::read_to_string(&path)?;
    config.push_str(&format!("telemetry:\n  prometheus_port: {port}\n"));
    std::fs::write(path, config)?;
    Ok(port)
}

/// One scrape: `name{labels}` -> value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    async fn take(port: u16) -> Result<Scrape> {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await?.text().await?;
        let mut values = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (series, value) = line.rsplit_once(' ').with_context(|| format!("bad line {line:?}"))?;
            values.insert(series.to_string(), value.parse()?);
        }
        Ok(Scrape(values))
    }

    fn get(&self, series: &str) -> Result<f64> {
        self.0
            .get(series)
            .copied()
            .with_context(|| format!("{series} not exposed; have {:?}", self.0.keys().collect::<Vec<_>>()))
    }
}

/// Scrape until `series` has `value` (counters and gauges are updated a moment after clients
/// see the effect).
async fn wait_for(port: u16, series: &str, value: f64) -> Result<Scrape> {
    let deadline = Instant::now() + T;
    loop {
        let scrape = Scrape::take(port).await?;
        if scrape.0.get(series) == Some(&value) {
            return Ok(scrape);
        }
        if Instant::now() > deadline {
            bail!("{series} stayed at {:?}, expected {value}", scrape.0.get(series));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ops_in(line: &Value) -> u64 {
    line["data"]["data"].as_array().map_or(0, |ops| ops.len() as u64)
}

/// Apply lines until a checkpoint is complete and `done` holds; returns the ops received.
async fn sync_http(stream: &mut RawStream, state: &mut ClientState, done: impl Fn(&ClientState) -> bool) -> Result<u64> {
    let mut ops = 0;
    loop {
        let line = stream.next_line(T).await?;
        ops += ops_in(&line);
        state.apply(&line)?;
        if state.complete && done(state) {
            return Ok(ops);
        }
    }
}

/// The same over WebSocket (the client asked for enough credit up front).
async fn sync_ws(client: &mut WsClient, state: &mut ClientState, done: impl Fn(&ClientState) -> bool) -> Result<u64> {
    let mut ops = 0;
    loop {
        let line = client.next_line(T).await?;
        ops += ops_in(&line);
        state.apply(&line)?;
        if state.complete && done(state) {
            return Ok(ops);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_connections_replication_and_downloads() -> Result<()> {
    let mut svc = Service::new().await?;
    let port = enable_metrics(&svc)?;
    let db = svc.source().await?;
    seed(&db, 2, 20, &["u1", "u2"]).await?;
    svc.start().await?;

    // The snapshot counts as replicated rows: 2 lists and 40 todos.
    let scrape = wait_for(port, "powersync_rows_replicated_total", 42.0).await?;
    assert_eq!(scrape.get("powersync_concurrent_connections")?, 0.0);
    assert_eq!(scrape.get("powersync_operations_synced_total")?, 0.0);
    assert!(scrape.get("powersync_operation_storage_size_bytes")? > 0.0);
    // Once the first stream is active: one ACTIVE, no deploy in progress.
    let streams = wait_for(port, "ferrosync_sync_config_streams{state=\"ACTIVE\"}", 1.0).await?;
    assert_eq!(streams.get("ferrosync_sync_config_streams{state=\"PROCESSING\"}")?, 0.0);
    assert_eq!(streams.get("ferrosync_sync_config_streams{state=\"STOP\"}")?, 0.0);
    for table in ["public.lists", "public.todos"] {
        let rows = scrape.get(&format!("ferrosync_snapshot_rows{{table=\"{table}\"}}"))?;
        assert_eq!(rows, if table == "public.lists" { 2.0 } else { 40.0 });
    }

    // Two HTTP streams and one WebSocket stream: each downloads the lists and its todos.
    let (mut s1, mut s2) = (ClientState::default(), ClientState::default());
    let mut h1 = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": [], "client_id": "c-h1"})).await?;
    let mut h2 = RawStream::open(&svc.url(), &token("u2"), json!({"buckets": [], "client_id": "c-h2"})).await?;
    let mut w1 = WsClient::sync(&svc.url(), &token("u1"), 10_000, json!({"buckets": [], "client_id": "c-w1"})).await?;
    let mut sw = ClientState::default();
    let mut received = sync_http(&mut h1, &mut s1, |_| true).await? + sync_http(&mut h2, &mut s2, |_| true).await?;
    received += sync_ws(&mut w1, &mut sw, |_| true).await.with_context(|| svc.log())?;
    assert_eq!(received, 3 * 22, "each client holds 2 lists and 20 todos");
    let scrape = wait_for(port, "powersync_operations_synced_total", received as f64).await?;
    assert_eq!(scrape.get("powersync_concurrent_connections")?, 3.0);
    assert_eq!(scrape.get("ferrosync_connections{transport=\"http\"}")?, 2.0);
    assert_eq!(scrape.get("ferrosync_connections{transport=\"websocket\"}")?, 1.0);
    let synced = scrape.get("powersync_data_synced_bytes_total")?;
    let sent = scrape.get("powersync_data_sent_bytes_total")?;
    assert!(
        synced > 0.0 && sent > synced,
        "WebSocket framing adds to the lines: synced {synced}, sent {sent}"
    );

    // Rows change in two transactions: 5 inserts, then an update of one of them.
    let before = Scrape::take(port).await?;
    db.batch_execute(
        "INSERT INTO todos (description, owner_id, list_id)
         SELECT 'new ' || g, 'u1', (SELECT id FROM lists LIMIT 1) FROM generate_series(1, 5) g",
    )
    .await?;
    db.batch_execute("UPDATE todos SET description = 'changed' WHERE description = 'new 1'")
        .await?;
    let has_update = |s: &ClientState| client_todos(s).values().any(|d| d == "changed");
    let mut live = sync_http(&mut h1, &mut s1, has_update).await?;
    live += sync_ws(&mut w1, &mut sw, has_update).await?;
    assert_eq!(live, 2 * 6, "u1's two streams each get the 6 changes (u2 none)");
    let rows = before.get("powersync_rows_replicated_total")? + 6.0;
    let scrape = wait_for(port, "powersync_rows_replicated_total", rows).await?;
    let transactions = scrape.get("powersync_transactions_replicated_total")? - before.get("powersync_transactions_replicated_total")?;
    assert!(transactions >= 2.0, "{transactions} transactions replicated");
    assert!(scrape.get("powersync_chunks_replicated_total")? > before.get("powersync_chunks_replicated_total")?);
    assert!(scrape.get("powersync_data_replicated_bytes_total")? > before.get("powersync_data_replicated_bytes_total")?);
    let ops = before.get("powersync_operations_synced_total")? + live as f64;
    wait_for(port, "powersync_operations_synced_total", ops).await?;
    let scrape = Scrape::take(port).await?;
    let lag = scrape.get("powersync_replication_lag_seconds")?;
    assert!((0.0..60.0).contains(&lag), "lag {lag}");
    assert_eq!(s2.table("todos").len(), 20, "u2 saw none of u1's changes");

    // A stream that ends leaves the gauges and is logged once, with what it did.
    drop(h2);
    let scrape = wait_for(port, "powersync_concurrent_connections", 2.0).await?;
    assert_eq!(scrape.get("ferrosync_connections{transport=\"http\"}")?, 1.0);
    let log = svc.log();
    let ended: Vec<&str> = log.lines().filter(|l| l.contains("sync stream ended")).collect();
    assert_eq!(ended.len(), 1, "{log}");
    for field in [
        "user=u2",
        "client_id=\"c-h2\"",
        "transport=\"http\"",
        "buckets=2",
        "ops=22",
        "ended=\"client closed",
    ] {
        assert!(ended[0].contains(field), "{field} missing: {}", ended[0]);
    }

    // A refused token is counted by its code and logged with the check that failed.
    let refused = RawStream::open(&svc.url(), "not-a-jwt", json!({})).await;
    assert!(refused.is_err());
    wait_for(port, "ferrosync_errors_total{code=\"PSYNC_S2101\"}", 1.0).await?;
    let log = svc.log();
    assert!(
        log.lines()
            .any(|l| l.contains("authentication failed") && l.contains("PSYNC_S2101") && !l.contains("not-a-jwt")),
        "{log}"
    );

    // The slot's lag in bytes comes from the periodic slot check (every 10 s).
    let deadline = Instant::now() + T;
    loop {
        let scrape = Scrape::take(port).await?;
        let lag = scrape
            .0
            .iter()
            .find(|(series, _)| series.starts_with("ferrosync_replication_lag_bytes{slot=\"powersync_"));
        if let Some((_, bytes)) = lag {
            assert!(*bytes < 1e9, "lag {bytes} bytes");
            break;
        }
        if Instant::now() > deadline {
            bail!("no slot lag: {:?}", scrape.0.keys().collect::<Vec<_>>());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
