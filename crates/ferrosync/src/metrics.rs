//! The metrics recorder (always installed: the dashboard reads it, and recording was measured
//! to cost nothing), its outputs (the Prometheus endpoint on `telemetry.prometheus_port`, OTLP
//! push on `telemetry.otlp`), and the metrics only the service process samples: bucket
//! storage sizes.

use anyhow::{Context, Result};
use axum::routing::get;
use ferrosync_config::TelemetryConfig;
use ferrosync_metrics::{CHECKPOINT_FANOUT, FANOUT_BUCKETS};
use ferrosync_pgconn::{LazyClient, PgEndpoint};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::FanoutBuilder;
use std::time::Duration;

/// How often histograms are compacted (the exporter leaves it to its user without its own
/// HTTP listener).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often storage sizes are read: they change slowly, and each read is a few `stat`s.
const STORAGE_SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

/// Sizes of the bucket storage tables (all sync config versions): current source rows,
/// operations, parameter lookups. `to_regclass`: a table a future schema renames reads as 0
/// instead of failing the sample.
const STORAGE_SIZES: &str = "SELECT
    coalesce(pg_total_relation_size(to_regclass('ferrosync.current_data')), 0),
    coalesce(pg_total_relation_size(to_regclass('ferrosync.op_chunks')), 0),
    coalesce(pg_total_relation_size(to_regclass('ferrosync.bucket_parameters')), 0)
      + coalesce(pg_total_relation_size(to_regclass('ferrosync.parameter_packs')), 0)";

/// Install the recorder (fanned out to OTLP push when `telemetry.otlp` is set), keep its
/// histograms compacted, and serve `GET /metrics` when `telemetry.prometheus_port` is set.
/// Call before anything records (see `ferrosync_metrics::get`).
pub async fn start(host: &str, telemetry: &TelemetryConfig) -> Result<PrometheusHandle> {
    let prometheus = recorder()?;
    let handle = prometheus.handle();
    match telemetry.otlp.as_ref().map(crate::otlp::recorder).transpose()? {
        // Every update goes to both (a handle is then one atomic per recorder).
        Some(otlp) => install(FanoutBuilder::default().add_recorder(prometheus).add_recorder(otlp).build())?,
        None => install(prometheus)?,
    }
    ferrosync_metrics::describe();
    if let Some(port) = telemetry.prometheus_port {
        serve_endpoint(handle.clone(), host, port).await?;
    }
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_INTERVAL).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn install(recorder: impl metrics::Recorder + Sync + 'static) -> Result<()> {
    metrics::set_global_recorder(recorder).map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))
}

/// Serve `GET /metrics` on `host:port`.
async fn serve_endpoint(handle: PrometheusHandle, host: &str, port: u16) -> Result<()> {
    let listeners = crate::serve::listen(&format!("{host}:{port}"))
        .await
        .with_context(|| format!("binding the metrics endpoint {host}:{port}"))?;
    let router = axum::Router::new().route("/metrics", get(move || std::future::ready(handle.render())));
    tokio::spawn(ferrosync_api::http_server::serve_all(listeners, router));
    Ok(())
}

/// Sample bucket storage sizes from now on (once its schema exists).
pub fn sample_storage_sizes(storage: PgEndpoint) {
    tokio::spawn(sample_storage(LazyClient::new(storage, None)));
}

fn recorder() -> Result<metrics_exporter_prometheus::PrometheusRecorder> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(CHECKPOINT_FANOUT.into()), FANOUT_BUCKETS)?
        .build_recorder())
}

async fn sample_storage(client: LazyClient) {
    let m = ferrosync_metrics::get();
    loop {
        match read_sizes(&client).await {
            Ok([replication, operations, parameters]) => {
                m.replication_storage_bytes.set(replication as f64);
                m.operation_storage_bytes.set(operations as f64);
                m.parameter_storage_bytes.set(parameters as f64);
            }
            // The hub and the replicator report storage outages; the sizes just stay as they were.
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "could not sample bucket storage sizes"),
        }
        tokio::time::sleep(STORAGE_SAMPLE_INTERVAL).await;
    }
}

async fn read_sizes(client: &LazyClient) -> Result<[i64; 3]> {
    let row = client.get().await?.query_one(STORAGE_SIZES, &[]).await?;
    Ok([row.try_get(0)?, row.try_get(1)?, row.try_get(2)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_is_exposed_as_a_histogram_with_its_buckets() {
        let recorder = recorder().expect("recorder");
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!(CHECKPOINT_FANOUT).record(0.003);
            metrics::histogram!(CHECKPOINT_FANOUT).record(0.2);
        });
        let text = handle.render();
        assert!(
            text.contains("ferrosync_checkpoint_fanout_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("ferrosync_checkpoint_fanout_seconds_bucket{le=\"0.25\"} 2"), "{text}");
        assert!(text.contains("ferrosync_checkpoint_fanout_seconds_count 2"), "{text}");
    }
}
