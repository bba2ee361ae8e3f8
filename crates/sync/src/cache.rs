//! The hub's per-bucket cache, valid at one checkpoint: each bucket's checksum and the ops it
//! received recently. The ops let every caught-up connection take a new checkpoint's data from
//! memory, so one insert fanned out to thousands of clients costs one storage read, not one per
//! client.

use ferrosync_storage::{BucketChecksum, OpType, OplogEntry};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Recent ops kept per bucket; older ones are dropped (connections that far behind read storage).
const MAX_OPS_PER_BUCKET: usize = 2_000;
/// Recent ops kept over all buckets; beyond it every bucket's window is reset.
const MAX_OPS_TOTAL: usize = 50_000;

#[derive(Default)]
struct Entry {
    checksum: BucketChecksum,
    /// Every op of the bucket with `ops_from < op_id <= checkpoint`, ascending.
    ops: Vec<Arc<OplogEntry>>,
    ops_from: i64,
    /// A connection read the entry since the last [`BucketCache::sweep`] (set under the read lock).
    used: AtomicBool,
}

/// Checksums and recent ops for the buckets connections asked about, at `checkpoint`.
#[derive(Default)]
pub struct BucketCache {
    pub group: i64,
    pub checkpoint: i64,
    entries: HashMap<String, Entry>,
    total_ops: usize,
}

/// What one checkpoint step (`from` → `to`) changed in cached buckets.
pub enum Step {
    /// All ops of the changed cached buckets in `(from, to]`, per bucket, ascending.
    Ops(HashMap<String, Vec<OplogEntry>>),
    /// Too many ops to keep: only checksum deltas.
    Checksums(HashMap<String, BucketChecksum>),
}

impl BucketCache {
    pub fn reset(&mut self, group: i64, checkpoint: i64) {
        *self = BucketCache {
            group,
            checkpoint,
            ..BucketCache::default()
        };
    }

    pub fn is_at(&self, group: i64, checkpoint: i64) -> bool {
        self.group == group && self.checkpoint == checkpoint
    }

    pub fn contains(&self, bucket: &str) -> bool {
        self.entries.contains_key(bucket)
    }

    pub fn checksum(&self, bucket: &str) -> Option<BucketChecksum> {
        self.entries.get(bucket).map(|e| {
            e.used.store(true, Ordering::Relaxed);
            e.checksum
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drop the buckets no connection read since the last sweep; returns how many.
    pub fn sweep(&mut self) -> usize {
        let before = self.entries.len();
        let mut dropped_ops = 0;
        self.entries.retain(|_, e| {
            let keep = e.used.swap(false, Ordering::Relaxed);
            if !keep {
                dropped_ops += e.ops.len();
            }
            keep
        });
        self.total_ops -= dropped_ops;
        before - self.entries.len()
    }

    /// Add a bucket whose checksum at the current checkpoint was read from storage.
    pub fn insert(&mut self, bucket: String, checksum: BucketChecksum) {
        let ops_from = self.checkpoint;
        self.entries.entry(bucket).or_insert(Entry {
            checksum,
            ops: Vec::new(),
            ops_from,
            used: AtomicBool::new(true),
        });
    }

    /// Ops of `bucket` after `position` up to the current checkpoint, if the cache holds all of
    /// them (`None`: read storage).
    pub fn ops_after(&self, bucket: &str, position: i64) -> Option<Vec<Arc<OplogEntry>>> {
        let entry = self.entries.get(bucket)?;
        entry.used.store(true, Ordering::Relaxed);
        if position < entry.ops_from {
            return None;
        }
        let start = entry.ops.partition_point(|op| op.op_id <= position);
        Some(entry.ops[start..].to_vec())
    }

    /// Move to checkpoint `to`. `changed` are all buckets written since the current checkpoint;
    /// `step` covers those of them that were cached when the step was read. Changed buckets the
    /// step does not cover (cached while it was being read) are dropped, as their checksum is stale.
    pub fn advance(&mut self, to: i64, changed: &HashSet<String>, step: Step) {
        let covered: HashSet<&String> = match &step {
            Step::Ops(ops) => ops.keys().collect(),
            Step::Checksums(deltas) => deltas.keys().collect(),
        };
        let stale: Vec<String> = changed
            .iter()
            .filter(|b| self.entries.contains_key(*b) && !covered.contains(b))
            .cloned()
            .collect();
        for bucket in stale {
            if let Some(e) = self.entries.remove(&bucket) {
                self.total_ops -= e.ops.len();
            }
        }
        match step {
            Step::Ops(ops) => self.apply_ops(ops),
            Step::Checksums(deltas) => self.apply_checksums(to, deltas),
        }
        self.checkpoint = to;
        if self.total_ops > MAX_OPS_TOTAL {
            for e in self.entries.values_mut() {
                e.ops = Vec::new();
                e.ops_from = to;
            }
            self.total_ops = 0;
        }
    }

    fn apply_ops(&mut self, ops: HashMap<String, Vec<OplogEntry>>) {
        for (bucket, new_ops) in ops {
            let Some(e) = self.entries.get_mut(&bucket) else { continue };
            for op in new_ops {
                if op.op == OpType::Clear {
                    // Compaction folded everything before it into this op: start over.
                    e.checksum = BucketChecksum::default();
                }
                e.checksum.checksum = e.checksum.checksum.wrapping_add(op.checksum);
                e.checksum.count += 1;
                e.ops.push(Arc::new(op));
                self.total_ops += 1;
            }
            if e.ops.len() > MAX_OPS_PER_BUCKET {
                let drop = e.ops.len() - MAX_OPS_PER_BUCKET;
                e.ops_from = e.ops[drop - 1].op_id;
                e.ops.drain(..drop);
                self.total_ops -= drop;
            }
        }
    }

    fn apply_checksums(&mut self, to: i64, deltas: HashMap<String, BucketChecksum>) {
        for (bucket, delta) in deltas {
            let Some(e) = self.entries.get_mut(&bucket) else { continue };
            e.checksum.checksum = e.checksum.checksum.wrapping_add(delta.checksum);
            e.checksum.count += delta.count;
            self.total_ops -= e.ops.len();
            e.ops = Vec::new();
            e.ops_from = to;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(op_id: i64, checksum: u32) -> OplogEntry {
        OplogEntry {
            op_id,
            op: OpType::Put,
            object_type: Some("t".into()),
            object_id: Some(op_id.to_string()),
            subkey: None,
            data: Some("{}".into()),
            checksum,
        }
    }

    fn ids(ops: Option<Vec<Arc<OplogEntry>>>) -> Option<Vec<i64>> {
        ops.map(|v| v.iter().map(|o| o.op_id).collect())
    }

    #[test]
    fn serves_ops_only_when_the_window_covers_the_position() {
        let mut cache = BucketCache::default();
        cache.reset(1, 10);
        cache.insert("b".into(), BucketChecksum { checksum: 5, count: 2 });
        let changed: HashSet<String> = ["b".to_string()].into();
        cache.advance(12, &changed, Step::Ops([("b".to_string(), vec![op(11, 1), op(12, 2)])].into()));
        assert_eq!(cache.checksum("b"), Some(BucketChecksum { checksum: 8, count: 4 }));
        assert_eq!(ids(cache.ops_after("b", 10)), Some(vec![11, 12]));
        assert_eq!(ids(cache.ops_after("b", 11)), Some(vec![12]));
        assert_eq!(ids(cache.ops_after("b", 12)), Some(vec![]));
        // A client behind the window must read storage.
        assert_eq!(ids(cache.ops_after("b", 9)), None);
        assert_eq!(ids(cache.ops_after("unknown", 12)), None);
    }

    #[test]
    fn checksum_only_steps_and_uncovered_buckets_invalidate() {
        let mut cache = BucketCache::default();
        cache.reset(1, 10);
        cache.insert("a".into(), BucketChecksum::default());
        cache.insert("b".into(), BucketChecksum::default());
        let changed: HashSet<String> = ["a".to_string(), "b".to_string()].into();
        // "b" was added while the step was read: it is not covered, so it is dropped.
        let deltas = [("a".to_string(), BucketChecksum { checksum: 7, count: 3 })].into();
        cache.advance(20, &changed, Step::Checksums(deltas));
        assert_eq!(cache.checksum("a"), Some(BucketChecksum { checksum: 7, count: 3 }));
        assert!(!cache.contains("b"));
        assert_eq!(ids(cache.ops_after("a", 19)), None);
        assert_eq!(ids(cache.ops_after("a", 20)), Some(vec![]));
    }

    #[test]
    fn a_clear_replaces_the_checksum_before_it() {
        let mut cache = BucketCache::default();
        cache.reset(1, 10);
        cache.insert("b".into(), BucketChecksum { checksum: 5, count: 9 });
        let changed: HashSet<String> = ["b".to_string()].into();
        let mut clear = op(11, 100);
        clear.op = OpType::Clear;
        cache.advance(12, &changed, Step::Ops([("b".to_string(), vec![clear, op(12, 2)])].into()));
        assert_eq!(cache.checksum("b"), Some(BucketChecksum { checksum: 102, count: 2 }));
    }

    #[test]
    fn a_sweep_drops_buckets_nobody_read_since_the_last_one() {
        let mut cache = BucketCache::default();
        cache.reset(1, 0);
        for b in ["read", "idle", "ops"] {
            cache.insert(b.into(), BucketChecksum::default());
        }
        let changed: HashSet<String> = ["ops".to_string()].into();
        cache.advance(2, &changed, Step::Ops([("ops".to_string(), vec![op(1, 1), op(2, 1)])].into()));
        // Just inserted: all read by the connection that asked.
        assert_eq!(cache.sweep(), 0);
        assert!(cache.checksum("read").is_some());
        assert!(cache.ops_after("ops", 0).is_some());
        assert_eq!(cache.sweep(), 1);
        assert!(!cache.contains("idle"));
        assert_eq!(cache.sweep(), 2, "nobody read the others since");
        assert_eq!((cache.len(), cache.total_ops), (0, 0));
    }

    #[test]
    fn per_bucket_window_is_bounded() {
        let mut cache = BucketCache::default();
        cache.reset(1, 0);
        cache.insert("b".into(), BucketChecksum::default());
        let changed: HashSet<String> = ["b".to_string()].into();
        let n = MAX_OPS_PER_BUCKET as i64 + 10;
        let ops = (1..=n).map(|i| op(i, 1)).collect();
        cache.advance(n, &changed, Step::Ops([("b".to_string(), ops)].into()));
        assert_eq!(cache.checksum("b").map(|c| c.count), Some(n));
        assert_eq!(ids(cache.ops_after("b", 5)), None);
        assert_eq!(cache.ops_after("b", 10).map(|v| v.len()), Some(MAX_OPS_PER_BUCKET));
    }
}
