//! Read side for the sync layer: the [`SyncStorage`] trait and its PostgreSQL implementation.

use crate::chunk;
use crate::error::StorageError;
use crate::model::{BucketChecksum, ChangeSet, OpBatch, StreamRecord, WriteCheckpoint};
use crate::pack;
use crate::writer::{lsn_from_text, lsn_to_text};
use ferrosync_pgconn::{LazyClient, PgEndpoint};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_postgres::Client;

/// Everything the sync layer reads. All reads are bounded by a checkpoint, so callers see a
/// consistent state even while replication writes ahead of it.
pub trait SyncStorage: Send + Sync + 'static {
    /// The stream currently served to clients.
    fn active_stream(&self) -> impl Future<Output = Result<Option<StreamRecord>, StorageError>> + Send;
    /// Checksum and count per bucket over ops with `after < op_id <= checkpoint` (buckets
    /// with no such ops are absent).
    fn checksums(
        &self,
        group: i64,
        after: i64,
        checkpoint: i64,
        buckets: &[String],
    ) -> impl Future<Output = Result<HashMap<String, BucketChecksum>, StorageError>> + Send;
    /// Buckets among `buckets` whose ops in `(after, checkpoint]` begin with a CLEAR: their
    /// [`SyncStorage::checksums`] over that range is the whole checksum, not an increment
    /// (compaction folded the ops before the CLEAR into it).
    fn cleared(
        &self,
        group: i64,
        after: i64,
        checkpoint: i64,
        buckets: &[String],
    ) -> impl Future<Output = Result<HashSet<String>, StorageError>> + Send;
    /// Buckets and lookups written in `(after, up_to]`.
    fn changes(&self, group: i64, after: i64, up_to: i64) -> impl Future<Output = Result<ChangeSet, StorageError>> + Send;
    /// Ops with `after < op_id <= checkpoint` for each requested bucket, in request order then
    /// ascending op_id: about `limit` ops in all (whole chunks are read, so a few more may come).
    /// [`OpBatch::resume`] says where to continue when the read stopped early.
    fn bucket_data(
        &self,
        group: i64,
        checkpoint: i64,
        requests: &[(String, i64)],
        limit: usize,
    ) -> impl Future<Output = Result<OpBatch, StorageError>> + Send;
    /// Live parameter rows (the stored `bucket_parameters` JSON) for each lookup at `checkpoint`.
    fn parameter_sets(
        &self,
        group: i64,
        checkpoint: i64,
        lookups: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Vec<String>>, StorageError>> + Send;
    /// Write checkpoints created or updated after `seq`, in seq order.
    fn write_checkpoints_since(&self, seq: i64) -> impl Future<Output = Result<Vec<WriteCheckpoint>, StorageError>> + Send;
    /// The stored write checkpoint of `user_key`, if any.
    fn write_checkpoint_of(&self, user_key: &str) -> impl Future<Output = Result<Option<WriteCheckpoint>, StorageError>> + Send;
    /// Store a new write checkpoint for `user_key` at source position `head`; returns its id
    /// (one more than the stored one, which it turns into a server-generated id that never
    /// expires; see [`crate::checkpoint_requests`]).
    fn create_write_checkpoint(&self, user_key: &str, head: u64) -> impl Future<Output = Result<i64, StorageError>> + Send;
}

fn request(requests: &[(String, i64)], ord: i64) -> Option<&(String, i64)> {
    usize::try_from(ord - 1).ok().and_then(|i| requests.get(i))
}

/// Most chunks of one bucket read by one [`SyncStorage::bucket_data`] call.
const CHUNKS_PER_READ: i64 = 256;
/// One [`SyncStorage::bucket_data`] call stops after the chunk that brings its row data to
/// this size: with large rows an op-count limit alone would hold tens of MB per connection.
const READ_BYTES: usize = 4 << 20;

/// [`SyncStorage`] on PostgreSQL, over a few pipelined connections. A connection lost to a
/// storage restart is replaced on its next use; until storage is back, reads fail fast with
/// [`StorageError::Unavailable`].
pub struct PgStorage {
    clients: Vec<LazyClient>,
    next: AtomicUsize,
}

impl PgStorage {
    /// Connects every connection now (a wrong address or TLS setting fails here).
    pub async fn connect(storage: &PgEndpoint, connections: usize) -> Result<PgStorage, StorageError> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(LazyClient::connected(storage.clone(), None).await?);
        }
        Ok(PgStorage {
            clients,
            next: AtomicUsize::new(0),
        })
    }

    pub(crate) async fn client(&self) -> Result<Arc<Client>, StorageError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        Ok(self.clients[i].get().await?)
    }
}

impl SyncStorage for PgStorage {
    async fn active_stream(&self) -> Result<Option<StreamRecord>, StorageError> {
        crate::streams::active_stream(&*self.client().await?).await
    }

    async fn checksums(
        &self,
        group: i64,
        after: i64,
        checkpoint: i64,
        buckets: &[String],
    ) -> Result<HashMap<String, BucketChecksum>, StorageError> {
        // Chunks the writer stores never straddle a checkpoint (a flush is written whole
        // before one is taken), and compaction only merges them below the newest one, so the
        // second arm is normally empty; it keeps arbitrary ranges exact.
        let rows = self
            .client()
            .await?
            .query(
                "SELECT bucket, (sum(checksum) % 4294967296)::int8, sum(op_count)::int8, NULL::bytea FROM ferrosync.op_chunks
                 WHERE group_id = $1 AND bucket = ANY($2) AND last_op > $3 AND first_op > $3 AND last_op <= $4 GROUP BY bucket
                 UNION ALL
                 SELECT bucket, 0, 0, ops FROM ferrosync.op_chunks
                 WHERE group_id = $1 AND bucket = ANY($2) AND last_op > $3 AND first_op <= $4 AND (first_op <= $3 OR last_op > $4)",
                &[&(group as i32), &buckets, &after, &checkpoint],
            )
            .await?;
        let mut out: HashMap<String, BucketChecksum> = HashMap::new();
        for r in rows {
            let sum = out.entry(r.get(0)).or_default();
            match r.get::<_, Option<&[u8]>>(3) {
                None => {
                    sum.checksum = sum.checksum.wrapping_add(r.get::<_, i64>(1) as u32);
                    sum.count += r.get::<_, i64>(2);
                }
                Some(payload) => {
                    for op in chunk::decode(payload)?
                        .iter()
                        .filter(|op| op.op_id > after && op.op_id <= checkpoint)
                    {
                        sum.checksum = sum.checksum.wrapping_add(op.checksum);
                        sum.count += 1;
                    }
                }
            }
        }
        out.retain(|_, c| c.count > 0);
        Ok(out)
    }

    async fn cleared(&self, group: i64, after: i64, checkpoint: i64, buckets: &[String]) -> Result<HashSet<String>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT DISTINCT bucket FROM ferrosync.op_chunks
                 WHERE group_id = $1 AND bucket = ANY($2) AND clear AND last_op > $3 AND last_op <= $4",
                &[&(group as i32), &buckets, &after, &checkpoint],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn changes(&self, group: i64, after: i64, up_to: i64) -> Result<ChangeSet, StorageError> {
        // One round trip: the prune horizon, then the change records (NULLs when none).
        let rows = self
            .client()
            .await?
            .query(
                "SELECT (SELECT changes_pruned_to FROM ferrosync.sync_rules WHERE id = $4), c.buckets, c.lookups
                 FROM (SELECT 1) AS one
                 LEFT JOIN ferrosync.bucket_changes c ON c.group_id = $1 AND c.max_op_id > $2 AND c.max_op_id <= $3",
                &[&(group as i32), &after, &up_to, &group],
            )
            .await?;
        let mut set = ChangeSet::default();
        let pruned_to: Option<i64> = rows.first().and_then(|r| r.get(0));
        set.complete = after >= pruned_to.unwrap_or(0);
        for r in rows {
            set.buckets.extend(r.get::<_, Option<Vec<String>>>(1).unwrap_or_default());
            set.lookups.extend(r.get::<_, Option<Vec<String>>>(2).unwrap_or_default());
        }
        Ok(set)
    }

    async fn bucket_data(&self, group: i64, checkpoint: i64, requests: &[(String, i64)], limit: usize) -> Result<OpBatch, StorageError> {
        let buckets: Vec<&str> = requests.iter().map(|(b, _)| b.as_str()).collect();
        let afters: Vec<i64> = requests.iter().map(|(_, a)| *a).collect();
        // Per bucket at most CHUNKS_PER_READ chunks (an index range scan each); overall the
        // chunks up to the one that reaches `limit` ops.
        let rows = self
            .client()
            .await?
            .query(
                "SELECT ord, ops, total, last_op, target_op FROM (
                    SELECT r.ord, c.ops, c.last_op, c.op_count, c.target_op, sum(c.op_count) OVER (ORDER BY r.ord, c.last_op) AS total
                    FROM unnest($2::text[], $3::int8[]) WITH ORDINALITY AS r(bucket, after_op, ord)
                    CROSS JOIN LATERAL (
                        SELECT ops, last_op, op_count, target_op FROM ferrosync.op_chunks c
                        WHERE c.group_id = $1 AND c.bucket = r.bucket AND c.last_op > r.after_op AND c.first_op <= $4
                        ORDER BY c.last_op LIMIT $6) c
                 ) t WHERE total - op_count < $5 ORDER BY ord, last_op",
                &[&(group as i32), &buckets, &afters, &checkpoint, &(limit as i64), &CHUNKS_PER_READ],
            )
            .await?;
        let mut batch = OpBatch::default();
        let mut chunks_of_bucket = 0;
        let mut last: Option<(i64, i64)> = None;
        let mut capped = false;
        // Counted in whole chunks, before ops outside the range are dropped: the same total
        // the query cut at.
        let mut total: i64 = 0;
        let mut row_bytes = 0;
        for r in &rows {
            let ord: i64 = r.get(0);
            chunks_of_bucket = if last.is_some_and(|(o, _)| o == ord) {
                chunks_of_bucket + 1
            } else {
                1
            };
            total = r.get(2);
            last = Some((ord, r.get(3)));
            batch.target_op = batch.target_op.max(r.get(4));
            let Some((bucket, after)) = request(requests, ord) else {
                return Err(StorageError::Corrupt(format!("bucket_data: unexpected ordinal {ord}")));
            };
            let ops = chunk::decode(r.get(1))?;
            batch.ops.extend(
                ops.into_iter()
                    .filter(|op| op.op_id > *after && op.op_id <= checkpoint)
                    .inspect(|op| row_bytes += op.data.as_ref().map_or(0, String::len))
                    .map(|op| (bucket.clone(), op)),
            );
            if chunks_of_bucket == CHUNKS_PER_READ || row_bytes >= READ_BYTES {
                // This bucket may have more: stop here, later buckets are read next time.
                capped = true;
                break;
            }
        }
        if capped || total >= limit as i64 {
            if let Some((ord, last_op)) = last {
                batch.resume = request(requests, ord).map(|(bucket, _)| (bucket.clone(), last_op));
            }
        }
        Ok(batch)
    }

    async fn parameter_sets(&self, group: i64, checkpoint: i64, lookups: &[String]) -> Result<HashMap<String, Vec<String>>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT * FROM (
                    SELECT DISTINCT ON (lookup, table_id, key) lookup, table_id, key, id, bucket_parameters, NULL::bytea
                    FROM ferrosync.bucket_parameters
                    WHERE group_id = $1 AND lookup = ANY($2) AND id <= $3
                    ORDER BY lookup, table_id, key, id DESC) v
                 UNION ALL
                 SELECT lookup, table_id, NULL, pack_id, NULL, entries FROM ferrosync.parameter_packs
                 WHERE group_id = $1 AND lookup = ANY($2) AND pack_id <= $3",
                &[&(group as i32), &lookups, &checkpoint],
            )
            .await?;
        let mut versions = Vec::with_capacity(rows.len());
        for r in rows {
            let (lookup, table_id, id): (String, i64, i64) = (r.get(0), r.get(1), r.get(3));
            match r.get::<_, Option<&[u8]>>(5) {
                None => versions.push((lookup, table_id, r.get(2), id, r.get(4))),
                Some(packed) => {
                    let entries =
                        pack::entries(id, packed).ok_or_else(|| StorageError::Corrupt(format!("parameter pack {lookup}/{id}")))?;
                    for e in entries.into_iter().filter(|e| e.id <= checkpoint) {
                        versions.push((lookup.clone(), table_id, e.key, e.id, e.json));
                    }
                }
            }
        }
        Ok(pack::live(versions))
    }

    async fn write_checkpoints_since(&self, seq: i64) -> Result<Vec<WriteCheckpoint>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT user_key, write_checkpoint, lsn::text, seq FROM ferrosync.write_checkpoints WHERE seq > $1 ORDER BY seq",
                &[&seq],
            )
            .await?;
        rows.iter().map(write_checkpoint_from_row).collect()
    }

    async fn write_checkpoint_of(&self, user_key: &str) -> Result<Option<WriteCheckpoint>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT user_key, write_checkpoint, lsn::text, seq FROM ferrosync.write_checkpoints WHERE user_key = $1",
                &[&user_key],
            )
            .await?;
        row.as_ref().map(write_checkpoint_from_row).transpose()
    }

    async fn create_write_checkpoint(&self, user_key: &str, head: u64) -> Result<i64, StorageError> {
        let row = self
            .client()
            .await?
            .query_one(
                // A new row continues above every pruned id (1 until something was pruned);
                // the key share lock makes a concurrent prune either wait for this write or
                // finish first and raise the floor (see crate::hygiene).
                "INSERT INTO ferrosync.write_checkpoints (user_key, write_checkpoint, lsn, seq)
                 VALUES ($1, (SELECT pruned_to + 1 FROM ferrosync.write_checkpoint_floor FOR KEY SHARE),
                         $2::text::pg_lsn, nextval('ferrosync.write_checkpoint_seq'))
                 ON CONFLICT (user_key) DO UPDATE SET write_checkpoint = ferrosync.write_checkpoints.write_checkpoint + 1,
                   lsn = excluded.lsn, seq = excluded.seq, requested_at = NULL, updated_at = now()
                 RETURNING write_checkpoint",
                &[&user_key, &lsn_to_text(head)],
            )
            .await?;
        Ok(row.get(0))
    }
}

fn write_checkpoint_from_row(r: &tokio_postgres::Row) -> Result<WriteCheckpoint, StorageError> {
    let lsn: String = r.get(2);
    Ok(WriteCheckpoint {
        user_key: r.get(0),
        write_checkpoint: r.get(1),
        lsn: lsn_from_text(&lsn).ok_or_else(|| StorageError::Corrupt(format!("bad lsn {lsn}")))?,
        seq: r.get(3),
    })
}
