//! Checksum cache misses, coalesced: when thousands of clients connect at once, each with a
//! bucket the hub has not seen (a new user's own bucket), their misses are answered by a few
//! storage queries instead of one query per connection.
//!
//! One task takes a miss, then everything that queued up meanwhile, and asks storage once per
//! (group, checkpoint); while that query runs the next batch accumulates.

use ferrosync_storage::{BucketChecksum, StorageError, SyncStorage};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most requests answered by one storage query.
const BATCH: usize = 512;

type Reply = Result<HashMap<String, BucketChecksum>, String>;

struct Miss {
    group: i64,
    checkpoint: i64,
    buckets: Vec<String>,
    reply: oneshot::Sender<Reply>,
}

/// Handle for looking up checksums through the batching task.
pub struct MissBatcher {
    tx: mpsc::UnboundedSender<Miss>,
}

impl MissBatcher {
    /// Start the batching task; it ends when the batcher is dropped.
    pub fn start<S: SyncStorage>(storage: Arc<S>) -> MissBatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(storage, rx));
        MissBatcher { tx }
    }

    /// Checksums of `buckets` over `(0, checkpoint]` (buckets without ops are absent).
    pub async fn checksums(
        &self,
        group: i64,
        checkpoint: i64,
        buckets: Vec<String>,
    ) -> Result<HashMap<String, BucketChecksum>, StorageError> {
        let (reply, answer) = oneshot::channel();
        let miss = Miss {
            group,
            checkpoint,
            buckets,
            reply,
        };
        let stopped = || StorageError::WriterStopped("checksum lookups stopped".into());
        self.tx.send(miss).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map_err(StorageError::QueryFailed)
    }
}

async fn run<S: SyncStorage>(storage: Arc<S>, mut rx: mpsc::UnboundedReceiver<Miss>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(miss) => batch.push(miss),
                Err(_) => break,
            }
        }
        let mut by_checkpoint: HashMap<(i64, i64), Vec<Miss>> = HashMap::new();
        for miss in batch {
            by_checkpoint.entry((miss.group, miss.checkpoint)).or_default().push(miss);
        }
        for ((group, checkpoint), misses) in by_checkpoint {
            let buckets: Vec<String> = misses
                .iter()
                .flat_map(|m| m.buckets.iter().cloned())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let result = storage.checksums(group, 0, checkpoint, &buckets).await;
            for miss in misses {
                let reply = match &result {
                    Ok(all) => Ok(miss.buckets.iter().filter_map(|b| all.get(b).map(|c| (b.clone(), *c))).collect()),
                    Err(e) => Err(e.to_string()),
                };
                // The connection may have gone away meanwhile.
                let _ = miss.reply.send(reply);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrosync_storage::{ChangeSet, OpBatch, StreamRecord, WriteCheckpoint};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers checksum queries slowly (so misses pile up) and counts them.
    #[derive(Default)]
    struct SlowStorage {
        queries: AtomicUsize,
    }

    impl SyncStorage for SlowStorage {
        async fn active_stream(&self) -> Result<Option<StreamRecord>, StorageError> {
            Ok(None)
        }
        async fn checksums(
            &self,
            _: i64,
            _: i64,
            checkpoint: i64,
            buckets: &[String],
        ) -> Result<HashMap<String, BucketChecksum>, StorageError> {
            self.queries.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let sum = |b: &String| BucketChecksum {
                checksum: b.len() as u32,
                count: checkpoint,
            };
            Ok(buckets
                .iter()
                .filter(|b| !b.starts_with("empty"))
                .map(|b| (b.clone(), sum(b)))
                .collect())
        }
        async fn cleared(&self, _: i64, _: i64, _: i64, _: &[String]) -> Result<HashSet<String>, StorageError> {
            Ok(HashSet::new())
        }
        async fn changes(&self, _: i64, _: i64, _: i64) -> Result<ChangeSet, StorageError> {
            Ok(ChangeSet::default())
        }
        async fn bucket_data(&self, _: i64, _: i64, _: &[(String, i64)], _: usize) -> Result<OpBatch, StorageError> {
            Ok(OpBatch::default())
        }
        async fn parameter_sets(&self, _: i64, _: i64, _: &[String]) -> Result<HashMap<String, Vec<String>>, StorageError> {
            Ok(HashMap::new())
        }
        async fn write_checkpoints_since(&self, _: i64) -> Result<Vec<WriteCheckpoint>, StorageError> {
            Ok(Vec::new())
        }
        async fn write_checkpoint_of(&self, _: &str) -> Result<Option<WriteCheckpoint>, StorageError> {
            Ok(None)
        }
        async fn create_write_checkpoint(&self, _: &str, _: u64) -> Result<i64, StorageError> {
            Ok(1)
        }
    }

    #[tokio::test]
    async fn concurrent_misses_share_queries_and_get_their_own_answers() {
        let storage = Arc::new(SlowStorage::default());
        let batcher = Arc::new(MissBatcher::start(storage.clone()));
        let lookups = (0..200).map(|i| {
            let batcher = batcher.clone();
            // Two checkpoints in flight: they must not be mixed in one query.
            let checkpoint = 10 + (i % 2);
            let buckets = vec![format!("user[{i}]"), format!("empty[{i}]"), "global[]".to_string()];
            tokio::spawn(async move { (i, checkpoint, batcher.checksums(1, checkpoint, buckets).await) })
        });
        for lookup in futures::future::join_all(lookups).await {
            let (i, checkpoint, answer) = lookup.expect("task");
            let answer = answer.expect("answer");
            let own = format!("user[{i}]");
            assert_eq!(answer.len(), 2, "only the requested buckets that have ops: {answer:?}");
            assert_eq!(answer[&own].count, checkpoint);
            assert_eq!(answer[&own].checksum, own.len() as u32);
            assert!(answer.contains_key("global[]"));
        }
        let queries = storage.queries.load(Ordering::SeqCst);
        assert!(queries <= 6, "200 misses took {queries} queries");
    }
}
