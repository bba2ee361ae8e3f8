//! Connection tests without Postgres: bucket storage in memory, a hub that follows it when told
//! (as a NOTIFY would make it), and a client that checks every line it receives.

use crate::connection::{connection_stream, ConnectionRequest, Limits};
use crate::hub::{CheckpointHub, HubState};
use crate::lines::LineFormat;
use bytes::Bytes;
use ferrosync_rules::{RequestParameters, StreamsRequest, SyncRulesOptions};
use ferrosync_storage::{
    BucketChecksum, ChangeSet, Checkpoint, OpBatch, OpType, OplogEntry, StorageError, StreamRecord, StreamState, SyncStorage,
    WriteCheckpoint,
};
use futures::{Stream, StreamExt};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Default)]
struct Log {
    checkpoint: i64,
    last_op: i64,
    ops: BTreeMap<String, Vec<OplogEntry>>,
    /// What reads report as [`OpBatch::target_op`].
    target_op: i64,
    /// By user key; `seq` grows with every write.
    write_checkpoints: BTreeMap<String, WriteCheckpoint>,
    write_seq: i64,
    /// How often one user's write checkpoint was read, and how long such a read takes.
    write_checkpoint_reads: usize,
    write_checkpoint_read_time: std::time::Duration,
}

/// Every bucket's ops in memory. Appended ops become visible at [`MemStorage::commit`].
pub struct MemStorage {
    rules: String,
    log: Mutex<Log>,
}

impl MemStorage {
    pub fn new(rules: &str) -> MemStorage {
        MemStorage {
            rules: rules.to_string(),
            log: Mutex::default(),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append `n` PUT ops to `bucket`; they update 500 rows over and over.
    pub fn append(&self, bucket: &str, n: usize) {
        let mut log = self.log();
        for _ in 0..n {
            log.last_op += 1;
            let op_id = log.last_op;
            let op = OplogEntry {
                op_id,
                op: OpType::Put,
                object_type: Some("t".into()),
                object_id: Some(format!("{bucket}-{}", op_id % 500)),
                subkey: None,
                data: Some(format!("{{\"v\":{op_id}}}")),
                checksum: (op_id as u32).wrapping_mul(2_654_435_761),
            };
            log.ops.entry(bucket.to_string()).or_default().push(op);
        }
    }

    /// Store `user_key`'s write checkpoint `id`, visible from source position `lsn`.
    pub fn set_write_checkpoint(&self, user_key: &str, id: i64, lsn: u64) {
        let mut log = self.log();
        log.write_seq += 1;
        let wc = WriteCheckpoint {
            user_key: user_key.into(),
            write_checkpoint: id,
            lsn,
            seq: log.write_seq,
        };
        log.write_checkpoints.insert(user_key.into(), wc);
    }

    /// From now on, reading one user's write checkpoint takes `time`.
    pub fn slow_write_checkpoint_reads(&self, time: std::time::Duration) {
        self.log().write_checkpoint_read_time = time;
    }

    /// How many times one user's write checkpoint was read.
    pub fn write_checkpoint_reads(&self) -> usize {
        self.log().write_checkpoint_reads
    }

    /// From now on, reads report ops compacted against op `target_op`.
    pub fn compacted(&self, target_op: i64) {
        self.log().target_op = target_op;
    }

    /// Make everything appended visible; returns the new checkpoint.
    pub fn commit(&self) -> i64 {
        let mut log = self.log();
        log.checkpoint = log.last_op;
        log.checkpoint
    }

    /// Op ids of `bucket` up to `checkpoint`.
    pub fn op_ids(&self, bucket: &str, checkpoint: i64) -> Vec<i64> {
        let log = self.log();
        let ops = log.ops.get(bucket).map(Vec::as_slice).unwrap_or_default();
        ops.iter().map(|o| o.op_id).filter(|id| *id <= checkpoint).collect()
    }
}

impl SyncStorage for MemStorage {
    async fn active_stream(&self) -> Result<Option<StreamRecord>, StorageError> {
        let checkpoint = self.log().checkpoint;
        Ok(Some(StreamRecord {
            id: 1,
            content: self.rules.clone(),
            state: StreamState::Active,
            slot_name: "test".into(),
            snapshot_done: true,
            checkpoint: Checkpoint {
                op_id: checkpoint,
                lsn: checkpoint as u64,
            },
            no_checkpoint_before: 0,
            persisted_op: checkpoint,
            prefix_ids: Default::default(),
            pending: None,
        }))
    }

    async fn checksums(
        &self,
        _: i64,
        after: i64,
        checkpoint: i64,
        buckets: &[String],
    ) -> Result<HashMap<String, BucketChecksum>, StorageError> {
        let log = self.log();
        let mut out = HashMap::new();
        for bucket in buckets {
            let ops = log.ops.get(bucket).into_iter().flatten();
            for op in ops.filter(|o| o.op_id > after && o.op_id <= checkpoint) {
                let sum: &mut BucketChecksum = out.entry(bucket.clone()).or_default();
                sum.checksum = sum.checksum.wrapping_add(op.checksum);
                sum.count += 1;
            }
        }
        Ok(out)
    }

    async fn cleared(&self, _: i64, after: i64, checkpoint: i64, buckets: &[String]) -> Result<HashSet<String>, StorageError> {
        let log = self.log();
        let cleared = |b: &&String| {
            let ops = log.ops.get(*b).into_iter().flatten();
            ops.filter(|o| o.op_id > after && o.op_id <= checkpoint)
                .any(|o| o.op == OpType::Clear)
        };
        Ok(buckets.iter().filter(cleared).cloned().collect())
    }

    async fn changes(&self, _: i64, after: i64, up_to: i64) -> Result<ChangeSet, StorageError> {
        let log = self.log();
        let changed = |ops: &Vec<OplogEntry>| ops.iter().any(|o| o.op_id > after && o.op_id <= up_to);
        Ok(ChangeSet {
            buckets: log.ops.iter().filter(|(_, ops)| changed(ops)).map(|(b, _)| b.clone()).collect(),
            lookups: Default::default(),
            complete: true,
        })
    }

    async fn bucket_data(&self, _: i64, checkpoint: i64, requests: &[(String, i64)], limit: usize) -> Result<OpBatch, StorageError> {
        let log = self.log();
        let mut batch = OpBatch {
            target_op: log.target_op,
            ..OpBatch::default()
        };
        for (bucket, after) in requests {
            let ops = log.ops.get(bucket).into_iter().flatten();
            for op in ops.filter(|o| o.op_id > *after && o.op_id <= checkpoint) {
                batch.ops.push((bucket.clone(), op.clone()));
                if batch.ops.len() >= limit {
                    batch.resume = Some((bucket.clone(), op.op_id));
                    return Ok(batch);
                }
            }
        }
        Ok(batch)
    }

    async fn parameter_sets(&self, _: i64, _: i64, _: &[String]) -> Result<HashMap<String, Vec<String>>, StorageError> {
        Ok(HashMap::new())
    }

    async fn write_checkpoints_since(&self, seq: i64) -> Result<Vec<WriteCheckpoint>, StorageError> {
        let log = self.log();
        let mut rows: Vec<WriteCheckpoint> = log.write_checkpoints.values().filter(|w| w.seq > seq).cloned().collect();
        rows.sort_by_key(|w| w.seq);
        Ok(rows)
    }

    async fn write_checkpoint_of(&self, user_key: &str) -> Result<Option<WriteCheckpoint>, StorageError> {
        let time = {
            let mut log = self.log();
            log.write_checkpoint_reads += 1;
            log.write_checkpoint_read_time
        };
        tokio::time::sleep(time).await;
        Ok(self.log().write_checkpoints.get(user_key).cloned())
    }

    async fn create_write_checkpoint(&self, _: &str, _: u64) -> Result<i64, StorageError> {
        Ok(1)
    }
}

/// A hub over [`MemStorage`] that moves to a new checkpoint when [`TestHub::publish`] says so.
pub struct TestHub {
    pub hub: Arc<CheckpointHub<MemStorage>>,
    pub storage: Arc<MemStorage>,
    tx: watch::Sender<Option<HubState>>,
    current: Option<HubState>,
    write_seq: i64,
}

impl TestHub {
    /// A hub serving `storage`'s rules at its first checkpoint (everything appended so far).
    pub async fn start(storage: MemStorage) -> TestHub {
        TestHub::with_sweep_interval(storage, std::time::Duration::from_secs(600)).await
    }

    /// [`TestHub::start`] with a hub that drops unused cached buckets every `interval`.
    pub async fn with_sweep_interval(storage: MemStorage, interval: std::time::Duration) -> TestHub {
        let storage = Arc::new(storage);
        let (hub, tx) = CheckpointHub::with_sweep_interval(storage.clone(), interval);
        let mut test = TestHub {
            hub,
            storage,
            tx,
            current: None,
            write_seq: 0,
        };
        test.publish().await;
        test
    }

    /// Commit what was appended and let the hub follow; returns the new checkpoint.
    pub async fn publish(&mut self) -> i64 {
        let checkpoint = self.storage.commit();
        let refreshed = self.hub.refresh_write_checkpoints(self.write_seq).await;
        assert!(refreshed.is_ok(), "in-memory storage does not fail");
        self.write_seq = refreshed.unwrap_or_default();
        let reload = self.hub.reload(&mut self.current, &self.tx, &SyncRulesOptions::default()).await;
        assert!(reload.is_ok(), "in-memory storage does not fail");
        checkpoint
    }

    /// A fresh client's NDJSON stream (no buckets yet).
    pub fn connect(&self) -> impl Stream<Item = Bytes> + Unpin {
        self.connect_as("u1")
    }

    /// A fresh client of user `sub` (client id `c1`).
    pub fn connect_as(&self, sub: &str) -> impl Stream<Item = Bytes> + Unpin {
        let req = ConnectionRequest {
            user_key: format!("{sub}/c1"),
            parameters: RequestParameters::new(serde_json::json!({"sub": sub}), None),
            streams: StreamsRequest::default(),
            buckets: Vec::new(),
            expires_at: i64::MAX / 2,
            format: LineFormat::Ndjson,
            keepalive_lines: false,
            stats: Default::default(),
        };
        let limits = Limits {
            max_buckets: 1000,
            max_parameter_results: 1000,
        };
        Box::pin(connection_stream(self.hub.clone(), req, limits).0)
    }
}

/// A client that applies lines and checks, as strictly as a real client and more: data only for
/// announced buckets, continuing exactly from the bucket's position, ascending, never beyond
/// the checkpoint; checksums at every partial and full completion.
#[derive(Default)]
pub struct Client {
    pub lines: Vec<Value>,
    /// bucket -> (checksum, priority) of the tracked checkpoint.
    buckets: HashMap<String, (u32, u64)>,
    last_op_id: i64,
    positions: HashMap<String, i64>,
    checksums: HashMap<String, u32>,
    /// Op ids received per bucket, in order.
    pub received: HashMap<String, Vec<i64>>,
    /// The checkpoint of the last `checkpoint_complete`.
    pub completed: Option<i64>,
}

fn op_id(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("op id {v} is not a decimal string"))
}

impl Client {
    /// Read one chunk from `stream` and apply its lines; returns how many ops it carried.
    pub async fn read_chunk(&mut self, stream: &mut (impl Stream<Item = Bytes> + Unpin)) -> usize {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await
            .expect("a chunk within 10 s")
            .expect("the stream goes on");
        let mut ops = 0;
        for line in chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let line: Value = serde_json::from_slice(line).expect("each line is JSON");
            ops += self.apply(&line);
            self.lines.push(line);
        }
        ops
    }

    fn apply(&mut self, line: &Value) -> usize {
        if let Some(cp) = line.get("checkpoint") {
            assert!(self.lines.is_empty(), "a full checkpoint comes first");
            self.track(&cp["last_op_id"], cp["buckets"].as_array(), None);
        } else if let Some(diff) = line.get("checkpoint_diff") {
            self.track(
                &diff["last_op_id"],
                diff["updated_buckets"].as_array(),
                diff["removed_buckets"].as_array(),
            );
        } else if let Some(data) = line.get("data") {
            return self.data(data);
        } else if let Some(partial) = line.get("partial_checkpoint_complete") {
            assert_eq!(op_id(&partial["last_op_id"]), self.last_op_id);
            let priority = partial["priority"].as_u64().expect("priority");
            self.validate(|p| p <= priority);
        } else if let Some(complete) = line.get("checkpoint_complete") {
            assert_eq!(op_id(&complete["last_op_id"]), self.last_op_id);
            self.validate(|_| true);
            self.completed = Some(self.last_op_id);
            // A client then holds every op up to the checkpoint in each bucket, and states
            // that position (as the service assumes from here on).
            for bucket in self.buckets.keys() {
                let position = self.positions.entry(bucket.clone()).or_default();
                *position = (*position).max(self.last_op_id);
            }
        }
        0
    }

    fn track(&mut self, last_op_id: &Value, updated: Option<&Vec<Value>>, removed: Option<&Vec<Value>>) {
        let last_op_id = op_id(last_op_id);
        assert!(last_op_id >= self.last_op_id, "checkpoints never go back");
        self.last_op_id = last_op_id;
        for b in removed.into_iter().flatten() {
            self.buckets.remove(b.as_str().expect("bucket name"));
        }
        for b in updated.into_iter().flatten() {
            let name = b["bucket"].as_str().expect("bucket").to_string();
            let checksum = b["checksum"].as_i64().expect("checksum") as u32;
            self.buckets.insert(name, (checksum, b["priority"].as_u64().expect("priority")));
        }
    }

    fn data(&mut self, data: &Value) -> usize {
        let bucket = data["bucket"].as_str().expect("bucket").to_string();
        assert!(self.buckets.contains_key(&bucket), "data for unannounced bucket {bucket}");
        let position = self.positions.get(&bucket).copied().unwrap_or(0);
        assert_eq!(op_id(&data["after"]), position, "{bucket} continues from its position");
        let ops = data["data"].as_array().expect("ops");
        assert!(!ops.is_empty(), "no empty data lines");
        let mut last = position;
        for op in ops {
            let id = op_id(&op["op_id"]);
            assert!(id > last, "{bucket}: op {id} after {last}");
            assert!(id <= self.last_op_id, "{bucket}: op {id} beyond checkpoint {}", self.last_op_id);
            last = id;
            let sum = self.checksums.entry(bucket.clone()).or_default();
            *sum = sum.wrapping_add(op["checksum"].as_i64().expect("checksum") as u32);
            self.received.entry(bucket.clone()).or_default().push(id);
        }
        assert_eq!(op_id(&data["next_after"]), last);
        self.positions.insert(bucket, last);
        ops.len()
    }

    fn validate(&self, priorities: impl Fn(u64) -> bool) {
        for (bucket, (checksum, priority)) in &self.buckets {
            if priorities(*priority) {
                let got = self.checksums.get(bucket).copied().unwrap_or(0);
                assert_eq!(got, *checksum, "{bucket} checksum at {}", self.last_op_id);
            }
        }
    }

    /// Lines with this key, in order.
    pub fn lines_of<'a>(&'a self, key: &'a str) -> impl Iterator<Item = (usize, &'a Value)> + 'a {
        self.lines.iter().enumerate().filter_map(move |(i, l)| l.get(key).map(|v| (i, v)))
    }
}
