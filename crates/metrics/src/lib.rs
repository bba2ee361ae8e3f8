//! The service's metrics: names (the reference's `powersync_*` ones, unlabelled, plus
//! ferrosync's own `ferrosync_*` ones), their descriptions, and cached handles for hot paths.
//!
//! Everything goes through the `metrics` facade. Without an installed recorder (no
//! `telemetry.prometheus_port`) every handle is a no-op; with one, a handle is an atomic. Hot
//! paths use [`get`]'s handles, resolved once, rather than the macros' per-call registry lookup.
//! So [`get`] must first be called after the recorder is installed (`serve` installs it before
//! anything else starts).

use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit};
use std::sync::OnceLock;

/// The reference's names.
pub const CONCURRENT_CONNECTIONS: &str = "powersync_concurrent_connections";
pub const OPERATIONS_SYNCED: &str = "powersync_operations_synced_total";
pub const DATA_SYNCED_BYTES: &str = "powersync_data_synced_bytes_total";
pub const DATA_SENT_BYTES: &str = "powersync_data_sent_bytes_total";
pub const ROWS_REPLICATED: &str = "powersync_rows_replicated_total";
pub const TRANSACTIONS_REPLICATED: &str = "powersync_transactions_replicated_total";
pub const CHUNKS_REPLICATED: &str = "powersync_chunks_replicated_total";
pub const DATA_REPLICATED_BYTES: &str = "powersync_data_replicated_bytes_total";
pub const REPLICATION_STORAGE_BYTES: &str = "powersync_replication_storage_size_bytes";
pub const OPERATION_STORAGE_BYTES: &str = "powersync_operation_storage_size_bytes";
pub const PARAMETER_STORAGE_BYTES: &str = "powersync_parameter_storage_size_bytes";
pub const REPLICATION_LAG_SECONDS: &str = "powersync_replication_lag_seconds";

/// ferrosync's own, labelled.
pub const CONNECTIONS_BY_TRANSPORT: &str = "ferrosync_connections";
pub const ERRORS: &str = "ferrosync_errors_total";
pub const STREAM_LAG_BYTES: &str = "ferrosync_replication_lag_bytes";
pub const STREAM_LAG_SECONDS: &str = "ferrosync_replication_lag_seconds";
pub const SNAPSHOT_ROWS: &str = "ferrosync_snapshot_rows";
pub const SNAPSHOT_ROWS_ESTIMATED: &str = "ferrosync_snapshot_rows_estimated";
pub const CHECKPOINT_FANOUT: &str = "ferrosync_checkpoint_fanout_seconds";
pub const SYNC_CONFIG_STREAMS: &str = "ferrosync_sync_config_streams";

/// Histogram buckets of [`CHECKPOINT_FANOUT`], in seconds: a checkpoint normally reaches every
/// connection in milliseconds; seconds mean clients are waiting on a slow download or storage.
pub const FANOUT_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A sync stream's transport, the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    WebSocket,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::WebSocket => "websocket",
        }
    }
}

/// Handles of the unlabelled metrics and of the fixed label sets.
pub struct Metrics {
    pub concurrent_connections: Gauge,
    connections_http: Gauge,
    connections_websocket: Gauge,
    pub operations_synced: Counter,
    pub data_synced_bytes: Counter,
    pub data_sent_bytes: Counter,
    pub rows_replicated: Counter,
    pub transactions_replicated: Counter,
    pub chunks_replicated: Counter,
    pub data_replicated_bytes: Counter,
    pub replication_storage_bytes: Gauge,
    pub operation_storage_bytes: Gauge,
    pub parameter_storage_bytes: Gauge,
    pub checkpoint_fanout: Histogram,
}

impl Metrics {
    pub fn connections(&self, transport: Transport) -> &Gauge {
        match transport {
            Transport::Http => &self.connections_http,
            Transport::WebSocket => &self.connections_websocket,
        }
    }
}

/// The process's handles (no-ops when no recorder was installed before the first call).
pub fn get() -> &'static Metrics {
    static HANDLES: OnceLock<Metrics> = OnceLock::new();
    HANDLES.get_or_init(|| Metrics {
        concurrent_connections: metrics::gauge!(CONCURRENT_CONNECTIONS),
        connections_http: metrics::gauge!(CONNECTIONS_BY_TRANSPORT, "transport" => Transport::Http.as_str()),
        connections_websocket: metrics::gauge!(CONNECTIONS_BY_TRANSPORT, "transport" => Transport::WebSocket.as_str()),
        operations_synced: metrics::counter!(OPERATIONS_SYNCED),
        data_synced_bytes: metrics::counter!(DATA_SYNCED_BYTES),
        data_sent_bytes: metrics::counter!(DATA_SENT_BYTES),
        rows_replicated: metrics::counter!(ROWS_REPLICATED),
        transactions_replicated: metrics::counter!(TRANSACTIONS_REPLICATED),
        chunks_replicated: metrics::counter!(CHUNKS_REPLICATED),
        data_replicated_bytes: metrics::counter!(DATA_REPLICATED_BYTES),
        replication_storage_bytes: metrics::gauge!(REPLICATION_STORAGE_BYTES),
        operation_storage_bytes: metrics::gauge!(OPERATION_STORAGE_BYTES),
        parameter_storage_bytes: metrics::gauge!(PARAMETER_STORAGE_BYTES),
        checkpoint_fanout: metrics::histogram!(CHECKPOINT_FANOUT),
    })
}

/// One more error reported with `code` (a `PSYNC_Sxxxx` code). Errors are rare: the labelled
/// handle is looked up each time.
pub fn error(code: &'static str) {
    metrics::counter!(ERRORS, "code" => code).increment(1);
}

/// Replication lag of the stream on `slot`: WAL bytes the slot still holds back.
pub fn lag_bytes(slot: &str, bytes: u64) {
    metrics::gauge!(STREAM_LAG_BYTES, "slot" => slot.to_string()).set(bytes as f64);
}

/// Replication lag of the stream on `slot` in seconds; also the reference's unlabelled gauge,
/// which only appears once a lag is known.
pub fn lag_seconds(slot: &str, seconds: f64) {
    metrics::gauge!(STREAM_LAG_SECONDS, "slot" => slot.to_string()).set(seconds);
    metrics::gauge!(REPLICATION_LAG_SECONDS).set(seconds);
}

/// Snapshot progress of `table`: rows copied so far, out of an estimate.
pub fn snapshot_progress(table: &str, rows: u64, estimated: u64) {
    metrics::gauge!(SNAPSHOT_ROWS, "table" => table.to_string()).set(rows as f64);
    metrics::gauge!(SNAPSHOT_ROWS_ESTIMATED, "table" => table.to_string()).set(estimated as f64);
}

/// Replication streams (deployed sync configs) in `state`, as the replicator last listed them.
pub fn sync_config_streams(state: &'static str, count: usize) {
    metrics::gauge!(SYNC_CONFIG_STREAMS, "state" => state).set(count as f64);
}

/// Counts an open sync stream (in total and by transport) for as long as it lives.
pub struct ConnectionGauge(Transport);

impl ConnectionGauge {
    pub fn open(transport: Transport) -> ConnectionGauge {
        let m = get();
        m.concurrent_connections.increment(1.0);
        m.connections(transport).increment(1.0);
        ConnectionGauge(transport)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        let m = get();
        m.concurrent_connections.decrement(1.0);
        m.connections(self.0).decrement(1.0);
    }
}

/// Descriptions and units, shown as `# HELP` in the exposition.
pub fn describe() {
    describe_gauge!(CONCURRENT_CONNECTIONS, "Open sync streams");
    describe_counter!(OPERATIONS_SYNCED, "Operations sent to clients");
    describe_counter!(
        DATA_SYNCED_BYTES,
        Unit::Bytes,
        "Bytes of sync lines sent to clients, before compression"
    );
    describe_counter!(
        DATA_SENT_BYTES,
        Unit::Bytes,
        "Bytes of sync stream bodies sent to clients, after compression and framing"
    );
    describe_counter!(
        ROWS_REPLICATED,
        "Source rows replicated (snapshot and changes of tables the sync config reads)"
    );
    describe_counter!(TRANSACTIONS_REPLICATED, "Source transactions replicated");
    describe_counter!(CHUNKS_REPLICATED, "Batches of replication messages processed");
    describe_counter!(DATA_REPLICATED_BYTES, Unit::Bytes, "Bytes of logical replication messages received");
    describe_gauge!(REPLICATION_STORAGE_BYTES, Unit::Bytes, "Bucket storage size of current source rows");
    describe_gauge!(OPERATION_STORAGE_BYTES, Unit::Bytes, "Bucket storage size of bucket operations");
    describe_gauge!(PARAMETER_STORAGE_BYTES, Unit::Bytes, "Bucket storage size of parameter lookups");
    describe_gauge!(REPLICATION_LAG_SECONDS, Unit::Seconds, "Replication lag");
    describe_gauge!(CONNECTIONS_BY_TRANSPORT, "Open sync streams by transport");
    describe_counter!(ERRORS, "Errors reported to clients or ending sync streams, by PSYNC code");
    describe_gauge!(STREAM_LAG_BYTES, Unit::Bytes, "WAL the replication slot holds back, by slot");
    describe_gauge!(
        STREAM_LAG_SECONDS,
        Unit::Seconds,
        "Age of the last replicated commit when it was stored, by slot; 0 when caught up"
    );
    describe_gauge!(SNAPSHOT_ROWS, "Rows copied by the initial snapshot, by table");
    describe_gauge!(SNAPSHOT_ROWS_ESTIMATED, "Estimated rows of a table being snapshotted");
    describe_gauge!(
        SYNC_CONFIG_STREAMS,
        "Replication streams (deployed sync config versions) by state: PROCESSING, ACTIVE, ERRORED, STOP"
    );
    describe_histogram!(
        CHECKPOINT_FANOUT,
        Unit::Seconds,
        "From the hub publishing a checkpoint to the last connection having handed its lines to the transport"
    );
}
