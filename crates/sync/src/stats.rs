//! What a connection and a checkpoint's fan-out did, for the connection's lifecycle log line
//! and the metrics. Updated once per `data` line or checkpoint, never per op.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// One connection's counts, shared with its transport, which logs them when the connection
/// ends.
#[derive(Default, Debug)]
pub struct ConnectionStats {
    ops: AtomicU64,
    buckets: AtomicUsize,
    ended: OnceLock<String>,
}

impl ConnectionStats {
    /// Ops sent so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Buckets the client holds as of the last checkpoint line.
    pub fn buckets(&self) -> usize {
        self.buckets.load(Ordering::Relaxed)
    }

    /// Why the sync layer ended the connection; `None` while it runs, and when the client went
    /// away first.
    pub fn end_reason(&self) -> Option<&str> {
        self.ended.get().map(String::as_str)
    }

    pub(crate) fn sent_ops(&self, n: usize) {
        self.ops.fetch_add(n as u64, Ordering::Relaxed);
        ferrosync_metrics::get().operations_synced.increment(n as u64);
    }

    pub(crate) fn holds(&self, buckets: usize) {
        self.buckets.store(buckets, Ordering::Relaxed);
    }

    /// The first reason given wins: it is the cause, later ones are consequences.
    pub(crate) fn end(&self, why: impl Into<String>) {
        let _ = self.ended.set(why.into());
    }
}

/// How long one checkpoint took to reach every connection: from the hub publishing it to the
/// slowest connection having handed its lines (through `checkpoint_complete`) to its transport.
///
/// Each connection raises the maximum with one atomic when done; the histogram gets the
/// maximum once, when the last holder lets go of the checkpoint (the hub and the watch channel
/// hold it until a newer one is published, so it is observed then). Connections that skip a
/// checkpoint for a newer one do not count for it.
#[derive(Debug)]
pub struct FanOut {
    published: Instant,
    /// Nanoseconds to the slowest connection so far; 0 while none has reported.
    slowest: AtomicU64,
}

impl FanOut {
    pub(crate) fn new() -> Arc<FanOut> {
        Arc::new(FanOut {
            published: Instant::now(),
            slowest: AtomicU64::new(0),
        })
    }

    /// A connection is done with this checkpoint.
    pub(crate) fn reached(&self) {
        let nanos = u64::try_from(self.published.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
        self.slowest.fetch_max(nanos, Ordering::Relaxed);
    }

    fn slowest_seconds(&self) -> Option<f64> {
        let nanos = self.slowest.load(Ordering::Relaxed);
        (nanos > 0).then(|| nanos as f64 / 1e9)
    }
}

impl Drop for FanOut {
    fn drop(&mut self) {
        if let Some(seconds) = self.slowest_seconds() {
            ferrosync_metrics::get().checkpoint_fanout.record(seconds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fan_out_is_the_slowest_connection() {
        let fanout = FanOut::new();
        assert_eq!(fanout.slowest_seconds(), None, "no connection reported yet");
        fanout.reached();
        let first = fanout.slowest_seconds().expect("reported");
        std::thread::sleep(Duration::from_millis(20));
        fanout.reached();
        let slowest = fanout.slowest_seconds().expect("reported");
        assert!(slowest >= first + 0.019, "{first} then {slowest}");
    }

    #[test]
    fn the_first_end_reason_is_kept() {
        let stats = ConnectionStats::default();
        assert_eq!(stats.end_reason(), None);
        stats.end("token expired");
        stats.end("sync config changed");
        assert_eq!(stats.end_reason(), Some("token expired"));
        stats.sent_ops(3);
        stats.sent_ops(2);
        assert_eq!(stats.ops(), 5);
    }
}
