//! OTLP push (`telemetry.otlp`): the same metrics the Prometheus endpoint shows, sent to an
//! OpenTelemetry collector over HTTP every `interval_seconds`.
//!
//! The `metrics` facade is bridged to the OpenTelemetry SDK (`metrics-exporter-otel`), whose
//! periodic reader exports on its own thread with a blocking HTTP client, so a slow or absent
//! collector never stalls the runtime; failed pushes are logged by the SDK through `tracing`.

use anyhow::{Context, Result};
use ferrosync_config::{OtlpConfig, OtlpProtocol};
use ferrosync_metrics::{CHECKPOINT_FANOUT, FANOUT_BUCKETS};
use metrics::KeyName;
use metrics_exporter_otel::OpenTelemetryRecorder;
use opentelemetry::metrics::MeterProvider;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::Resource;
use std::sync::OnceLock;
use std::time::Duration;

/// The provider owns the reader thread; dropping it would stop the pushes, so it lives as
/// long as the process (the recorder it feeds is global too).
static PROVIDER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// A push can take at most this long (the collector's answer included).
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A recorder whose metrics are pushed to the collector `config` names, from now on.
pub fn recorder(config: &OtlpConfig) -> Result<OpenTelemetryRecorder> {
    let provider = provider(config)?;
    let recorder = OpenTelemetryRecorder::new(provider.meter("ferrosync"));
    recorder.set_histogram_bounds(&KeyName::from_const_str(CHECKPOINT_FANOUT), FANOUT_BUCKETS.to_vec());
    if PROVIDER.set(provider).is_err() {
        anyhow::bail!("the OTLP exporter is already running");
    }
    tracing::info!(endpoint = %config.endpoint, interval_s = config.interval_seconds, "pushing metrics over OTLP");
    Ok(recorder)
}

fn provider(config: &OtlpConfig) -> Result<SdkMeterProvider> {
    let protocol = match config.protocol {
        OtlpProtocol::Protobuf => Protocol::HttpBinary,
        OtlpProtocol::Json => Protocol::HttpJson,
    };
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(config.endpoint.clone())
        .with_protocol(protocol)
        .with_timeout(PUSH_TIMEOUT)
        .with_headers(config.headers.clone().into_iter().collect())
        .build()
        .context("telemetry.otlp: building the OTLP exporter")?;
    let reader = PeriodicReader::builder(exporter)
        .with_interval(Duration::from_secs(config.interval_seconds))
        .build();
    Ok(SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(Resource::builder().with_service_name("ferrosync").build())
        .build())
}
