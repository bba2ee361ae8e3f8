//! A sync stream as its transport sees it: counted in the connection gauges while open, its
//! bytes counted before and after compression and framing, and one log line when it ends
//! (user, client id, transport, buckets, ops, bytes, duration, why).

use ferrosync_metrics::{ConnectionGauge, Transport};
use ferrosync_sync::ConnectionStats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Why a stream ended when the sync layer did not end it.
const CLIENT_CLOSED: &str = "client closed the stream or stopped reading";

pub(crate) struct Lifecycle {
    transport: Transport,
    user: String,
    client_id: Option<String>,
    started: Instant,
    stats: Arc<ConnectionStats>,
    synced: AtomicU64,
    sent: AtomicU64,
    _gauge: ConnectionGauge,
}

impl Lifecycle {
    pub(crate) fn open(transport: Transport, user: &str, client_id: Option<&str>) -> Lifecycle {
        Lifecycle {
            transport,
            user: user.to_string(),
            client_id: client_id.map(str::to_string),
            started: Instant::now(),
            stats: Arc::default(),
            synced: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            _gauge: ConnectionGauge::open(transport),
        }
    }

    /// What the sync layer fills in for this stream.
    pub(crate) fn stats(&self) -> Arc<ConnectionStats> {
        self.stats.clone()
    }

    /// Sync lines handed to the transport, before compression or framing.
    pub(crate) fn synced(&self, bytes: usize) {
        self.synced.fetch_add(bytes as u64, Ordering::Relaxed);
        ferrosync_metrics::get().data_synced_bytes.increment(bytes as u64);
    }

    /// Bytes of the stream written for the client (compressed, framed).
    pub(crate) fn sent(&self, bytes: usize) {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        ferrosync_metrics::get().data_sent_bytes.increment(bytes as u64);
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        tracing::info!(
            user = %self.user,
            client_id = self.client_id.as_deref().unwrap_or(""),
            transport = self.transport.as_str(),
            buckets = self.stats.buckets(),
            ops = self.stats.ops(),
            bytes_synced = self.synced.load(Ordering::Relaxed),
            bytes_sent = self.sent.load(Ordering::Relaxed),
            duration_ms = self.started.elapsed().as_millis() as u64,
            ended = self.stats.end_reason().unwrap_or(CLIENT_CLOSED),
            "sync stream ended"
        );
    }
}
