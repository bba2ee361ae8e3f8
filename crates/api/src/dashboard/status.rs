//! `GET /api/admin/v1/status`: one JSON document with everything the dashboard polls, built
//! from the metrics exposition (what a Prometheus scrape would see), the probe state and the
//! recent-errors ring. Counters are sent as totals; the page turns them into rates.

use super::prom_text::{self, Sample};
use super::recent_errors;
use crate::server::AppState;
use ferrosync_metrics as m;
use ferrosync_source::lsn::Lsn;
use serde_json::{json, Map, Value};

/// The status document at this moment; `metrics` is the rendered exposition.
pub fn build(app: &AppState, metrics: &str) -> Value {
    let samples = prom_text::parse(metrics);
    let (_, _, probes) = crate::probes::evaluate(app);
    let checkpoint = app
        .hub
        .subscribe()
        .borrow()
        .as_ref()
        .map(|s| json!({"sync_config": s.group, "op_id": s.checkpoint.op_id, "lsn": Lsn(s.checkpoint.lsn).to_string()}));
    json!({
        "time_ms": crate::probes::unix_millis().max(0) as u64,
        "ready": probes["ready"],
        "storage": probes["storage"],
        "replication": probes["replication"],
        "checkpoint": checkpoint,
        "lag": lag(&samples),
        "totals": totals(&samples),
        "connections": connections(&samples),
        "snapshot": snapshot(&samples),
        "storage_bytes": {
            "replication": value(&samples, m::REPLICATION_STORAGE_BYTES),
            "operations": value(&samples, m::OPERATION_STORAGE_BYTES),
            "parameters": value(&samples, m::PARAMETER_STORAGE_BYTES),
        },
        "errors_by_code": by_label(&samples, m::ERRORS, "code"),
        "recent_errors": recent_errors::recent().snapshot(),
    })
}

/// The unlabelled sample `name`, or 0 when nothing was recorded yet.
fn value(samples: &[Sample], name: &str) -> f64 {
    samples.iter().find(|s| s.name == name).map_or(0.0, |s| s.value)
}

/// `name`'s samples keyed by their `label`.
fn by_label(samples: &[Sample], name: &str, label: &str) -> Map<String, Value> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| Some((s.label(label)?.to_string(), json!(s.value))))
        .collect()
}

fn totals(samples: &[Sample]) -> Value {
    json!({
        "rows_replicated": value(samples, m::ROWS_REPLICATED),
        "transactions_replicated": value(samples, m::TRANSACTIONS_REPLICATED),
        "data_replicated_bytes": value(samples, m::DATA_REPLICATED_BYTES),
        "operations_synced": value(samples, m::OPERATIONS_SYNCED),
        "data_synced_bytes": value(samples, m::DATA_SYNCED_BYTES),
        "data_sent_bytes": value(samples, m::DATA_SENT_BYTES),
    })
}

fn connections(samples: &[Sample]) -> Value {
    let by_transport = by_label(samples, m::CONNECTIONS_BY_TRANSPORT, "transport");
    json!({
        "total": value(samples, m::CONCURRENT_CONNECTIONS),
        "http": by_transport.get(m::Transport::Http.as_str()).cloned().unwrap_or(json!(0.0)),
        "websocket": by_transport.get(m::Transport::WebSocket.as_str()).cloned().unwrap_or(json!(0.0)),
    })
}

/// The worst lag over the streams (a process replicates one stream, two while rebuilding a
/// lost slot), and each stream's.
fn lag(samples: &[Sample]) -> Value {
    let seconds = by_label(samples, m::STREAM_LAG_SECONDS, "slot");
    let bytes = by_label(samples, m::STREAM_LAG_BYTES, "slot");
    let mut slots: Vec<&String> = seconds.keys().chain(bytes.keys()).collect();
    slots.sort();
    slots.dedup();
    let max = |map: &Map<String, Value>| map.values().filter_map(Value::as_f64).reduce(f64::max);
    json!({
        "seconds": max(&seconds),
        "bytes": max(&bytes),
        "by_slot": slots.iter().map(|slot| json!({"slot": slot, "seconds": seconds.get(*slot), "bytes": bytes.get(*slot)})).collect::<Vec<_>>(),
    })
}

fn snapshot(samples: &[Sample]) -> Vec<Value> {
    let estimated = by_label(samples, m::SNAPSHOT_ROWS_ESTIMATED, "table");
    let mut tables: Vec<Value> = by_label(samples, m::SNAPSHOT_ROWS, "table")
        .into_iter()
        .map(|(table, rows)| json!({"table": table, "rows": rows, "estimated": estimated.get(&table).cloned().unwrap_or(json!(0.0))}))
        .collect();
    tables.sort_by(|a, b| a["table"].as_str().cmp(&b["table"].as_str()));
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "powersync_concurrent_connections 3\n\
        ferrosync_connections{transport=\"http\"} 2\n\
        ferrosync_connections{transport=\"websocket\"} 1\n\
        powersync_rows_replicated_total 1500\n\
        ferrosync_replication_lag_seconds{slot=\"s1\"} 0.25\n\
        ferrosync_replication_lag_seconds{slot=\"s2\"} 1.5\n\
        ferrosync_replication_lag_bytes{slot=\"s1\"} 4096\n\
        ferrosync_snapshot_rows{table=\"public.b\"} 10\n\
        ferrosync_snapshot_rows{table=\"public.a\"} 500\n\
        ferrosync_snapshot_rows_estimated{table=\"public.a\"} 1000\n\
        ferrosync_errors_total{code=\"PSYNC_S2103\"} 4\n";

    #[test]
    fn metrics_become_the_dashboard_fields() {
        let samples = prom_text::parse(TEXT);
        assert_eq!(connections(&samples), json!({"total": 3.0, "http": 2.0, "websocket": 1.0}));
        assert_eq!(totals(&samples)["rows_replicated"], json!(1500.0));
        assert_eq!(totals(&samples)["operations_synced"], json!(0.0));
        let lag = lag(&samples);
        assert_eq!((lag["seconds"].clone(), lag["bytes"].clone()), (json!(1.5), json!(4096.0)));
        assert_eq!(lag["by_slot"][1], json!({"slot": "s2", "seconds": 1.5, "bytes": null}));
        assert_eq!(
            snapshot(&samples),
            vec![
                json!({"table": "public.a", "rows": 500.0, "estimated": 1000.0}),
                json!({"table": "public.b", "rows": 10.0, "estimated": 0.0}),
            ]
        );
        assert_eq!(Value::Object(by_label(&samples, m::ERRORS, "code")), json!({"PSYNC_S2103": 4.0}));
    }

    #[test]
    fn no_lag_is_null_not_zero() {
        let lag = lag(&prom_text::parse("powersync_concurrent_connections 0\n"));
        assert_eq!(lag, json!({"seconds": null, "bytes": null, "by_slot": []}));
    }
}
