//! OTLP push (`telemetry.otlp`): a collector on loopback receives the service's metrics with
//! the configured headers, and the pushed values follow replication and connections.

use crate::harness::*;
use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, NumberDataPoint};
use prost::Message;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// What the collector received: one entry per push.
#[derive(Default, Clone)]
struct Received(Arc<Mutex<Vec<Push>>>);

struct Push {
    api_key: Option<String>,
    service_name: Option<String>,
    /// Unlabelled metrics: name -> value.
    values: HashMap<String, f64>,
}

async fn collect(State(received): State<Received>, headers: HeaderMap, body: Bytes) -> Result<(), (axum::http::StatusCode, String)> {
    let bad = |e: String| (axum::http::StatusCode::BAD_REQUEST, e);
    let request = ExportMetricsServiceRequest::decode(body).map_err(|e| bad(e.to_string()))?;
    let mut push = Push {
        api_key: headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_string),
        service_name: None,
        values: HashMap::new(),
    };
    for resource_metrics in &request.resource_metrics {
        for attr in resource_metrics.resource.iter().flat_map(|r| &r.attributes) {
            if let (true, Some(any_value::Value::StringValue(s))) =
                (attr.key == "service.name", attr.value.as_ref().and_then(|v| v.value.as_ref()))
            {
                push.service_name = Some(s.clone());
            }
        }
        for metric in resource_metrics.scope_metrics.iter().flat_map(|s| &s.metrics) {
            let points: &[NumberDataPoint] = match &metric.data {
                Some(metric::Data::Sum(sum)) => &sum.data_points,
                Some(metric::Data::Gauge(gauge)) => &gauge.data_points,
                _ => continue,
            };
            if let Some(point) = points.iter().find(|p| p.attributes.is_empty()) {
                let value = match point.value {
                    Some(number_data_point::Value::AsInt(v)) => v as f64,
                    Some(number_data_point::Value::AsDouble(v)) => v,
                    None => continue,
                };
                push.values.insert(metric.name.clone(), value);
            }
        }
    }
    received.0.lock().map_err(|e| bad(e.to_string()))?.push(push);
    Ok(())
}

/// A collector on a free loopback port; returns its metrics URL.
async fn start_collector(received: Received) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/metrics", listener.local_addr()?);
    let router = axum::Router::new()
        .route("/v1/metrics", axum::routing::post(collect))
        .with_state(received);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(url)
}

/// Wait until a push reports `name` = `value`; returns that push's API key and service name.
async fn wait_for(received: &Received, name: &str, value: f64) -> Result<(Option<String>, Option<String>)> {
    let deadline = Instant::now() + T;
    loop {
        {
            let pushes = received.0.lock().map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(push) = pushes.iter().rev().find(|p| p.values.get(name) == Some(&value)) {
                return Ok((push.api_key.clone(), push.service_name.clone()));
            }
            if Instant::now() > deadline {
                let last = pushes.last().and_then(|p| p.values.get(name));
                bail!("{} pushes; {name} last pushed as {last:?}, expected {value}", pushes.len());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_pushed_over_otlp() -> Result<()> {
    let received = Received::default();
    let endpoint = start_collector(received.clone()).await?;
    let mut svc = Service::new().await?;
    let path = svc.dir.path().join("powersync.yaml");
    let mut config = std::fs::read_to_string(&path)?;
    config.push_str(&format!(
        "telemetry:\n  otlp:\n    endpoint: {endpoint}\n    interval_seconds: 1\n    headers:\n      x-api-key: secret-1\n"
    ));
    std::fs::write(path, config)?;
    let db = svc.source().await?;
    seed(&db, 2, 20, &["u1", "u2"]).await?;
    svc.start().await?;

    // The snapshot: 2 lists and 40 todos.
    let (api_key, service) = wait_for(&received, "powersync_rows_replicated_total", 42.0)
        .await
        .with_context(|| svc.log())?;
    assert_eq!(api_key.as_deref(), Some("secret-1"), "configured headers are sent");
    assert_eq!(service.as_deref(), Some("ferrosync"));

    // A held stream shows in the connections gauge; new rows in the replicated counter.
    let mut state = ClientState::default();
    let mut stream = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": [], "client_id": "c1"})).await?;
    stream.sync_until(&mut state, T, |s| s.complete).await?;
    wait_for(&received, "powersync_concurrent_connections", 1.0).await?;
    db.batch_execute(
        "INSERT INTO todos (description, owner_id, list_id)
         SELECT 'new ' || g, 'u1', (SELECT id FROM lists LIMIT 1) FROM generate_series(1, 5) g",
    )
    .await?;
    wait_for(&received, "powersync_rows_replicated_total", 47.0).await?;
    drop(stream);
    wait_for(&received, "powersync_concurrent_connections", 0.0).await?;
    Ok(())
}
