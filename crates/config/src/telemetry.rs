//! `telemetry`: the reference's Prometheus port, and ferrosync's OTLP push
//! (`telemetry.otlp`), which the reference lacks and its self-hosters ask for.

use crate::error::ConfigError;
use crate::node::{as_string, as_u16_port, type_name, Obj, Result};
use serde_yaml_ng::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TelemetryConfig {
    /// Metrics endpoint port; metrics are off when unset (and no OTLP push is configured).
    pub prometheus_port: Option<u16>,
    /// Push metrics to an OpenTelemetry collector.
    pub otlp: Option<OtlpConfig>,
}

/// `telemetry.otlp`: OTLP over HTTP (the collector's port 4318).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The full metrics URL, e.g. `http://collector:4318/v1/metrics`.
    pub endpoint: String,
    /// `protobuf` (default, what collectors expect) or `json`.
    pub protocol: OtlpProtocol,
    /// Seconds between pushes, default 15.
    pub interval_seconds: u64,
    /// Extra request headers (an API key for a hosted backend, say).
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Protobuf,
    Json,
}

pub(crate) fn parse_telemetry(v: &Value, warnings: &mut Vec<String>) -> Result<TelemetryConfig> {
    let mut t = Obj::new(v, "telemetry")?;
    t.accept(&["disable_telemetry_sharing", "internal_service_endpoint"]);
    let prometheus_port = match t.get("prometheus_port") {
        Some(p) => Some(as_u16_port(p, "telemetry.prometheus_port")?),
        None => None,
    };
    let otlp = t.get("otlp").map(|v| parse_otlp(v, warnings)).transpose()?;
    t.finish(warnings);
    Ok(TelemetryConfig { prometheus_port, otlp })
}

fn parse_otlp(v: &Value, warnings: &mut Vec<String>) -> Result<OtlpConfig> {
    let mut o = Obj::new(v, "telemetry.otlp")?;
    let endpoint = o.string("endpoint")?.ok_or_else(|| {
        ConfigError::invalid(
            "telemetry.otlp.endpoint",
            "required: the collector's metrics URL, e.g. http://collector:4318/v1/metrics",
        )
    })?;
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(ConfigError::invalid(
            "telemetry.otlp.endpoint",
            format!("expected an http:// or https:// URL, got {endpoint:?}"),
        ));
    }
    let protocol = match o.string("protocol")?.as_deref() {
        None | Some("protobuf") | Some("http/protobuf") => OtlpProtocol::Protobuf,
        Some("json") | Some("http/json") => OtlpProtocol::Json,
        Some(other) => {
            return Err(ConfigError::invalid(
                "telemetry.otlp.protocol",
                format!("expected `protobuf` or `json`, got {other:?}"),
            ));
        }
    };
    let interval_seconds = o.u64("interval_seconds")?.unwrap_or(15).max(1);
    let headers = match o.get("headers") {
        None => BTreeMap::new(),
        Some(h) => parse_headers(h)?,
    };
    o.finish(warnings);
    Ok(OtlpConfig {
        endpoint,
        protocol,
        interval_seconds,
        headers,
    })
}

fn parse_headers(v: &Value) -> Result<BTreeMap<String, String>> {
    let Value::Mapping(map) = v else {
        return Err(ConfigError::invalid(
            "telemetry.otlp.headers",
            format!("expected an object, got {}", type_name(v)),
        ));
    };
    map.iter()
        .map(|(k, v)| {
            let key = as_string(k, "telemetry.otlp.headers")?;
            let value = as_string(v, &format!("telemetry.otlp.headers.{key}"))?;
            Ok((key, value))
        })
        .collect()
}
