//! Read side for the sync layer: the [`SyncStorage`] trait and its PostgreSQL implementation.

use crate::error::StorageError;
use crate::model::{BucketChecksum, ChangeSet, OpType, OplogEntry, StreamRecord, WriteCheckpoint};
use crate::writer::{lsn_from_text, lsn_to_text};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Buckets and lookups written in `(after, up_to]`.
    fn changes(&self, group: i64, after: i64, up_to: i64) -> impl Future<Output = Result<ChangeSet, StorageError>> + Send;
    /// Up to `limit` ops with `after < op_id <= checkpoint`, per bucket in request order, ascending op_id.
    fn bucket_data(
        &self,
        group: i64,
        checkpoint: i64,
        requests: &[(String, i64)],
        limit: i64,
    ) -> impl Future<Output = Result<Vec<(String, OplogEntry)>, StorageError>> + Send;
    /// Live parameter rows (the stored `bucket_parameters` JSON) for each lookup at `checkpoint`.
    fn parameter_sets(
        &self,
        group: i64,
        checkpoint: i64,
        lookups: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Vec<String>>, StorageError>> + Send;
    /// Write checkpoints created or updated after `seq`, in seq order.
    fn write_checkpoints_since(&self, seq: i64) -> impl Future<Output = Result<Vec<WriteCheckpoint>, StorageError>> + Send;
    /// Store a new write checkpoint for `user_key` at source position `head`; returns its id.
    fn create_write_checkpoint(&self, user_key: &str, head: u64) -> impl Future<Output = Result<i64, StorageError>> + Send;
}

/// [`SyncStorage`] on PostgreSQL, over a few pipelined connections.
pub struct PgStorage {
    clients: Vec<Client>,
    next: AtomicUsize,
}

impl PgStorage {
    pub async fn connect(conn_str: &str, connections: usize) -> Result<PgStorage, StorageError> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(crate::connect(conn_str).await?);
        }
        Ok(PgStorage {
            clients,
            next: AtomicUsize::new(0),
        })
    }

    fn client(&self) -> &Client {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[i]
    }
}

impl SyncStorage for PgStorage {
    async fn active_stream(&self) -> Result<Option<StreamRecord>, StorageError> {
        crate::streams::active_stream(self.client()).await
    }

    async fn checksums(
        &self,
        group: i64,
        after: i64,
        checkpoint: i64,
        buckets: &[String],
    ) -> Result<HashMap<String, BucketChecksum>, StorageError> {
        let rows = self
            .client()
            .query(
                "SELECT bucket, (sum(checksum) % 4294967296)::int8, count(*) FROM ferrosync.bucket_data
                 WHERE group_id = $1 AND bucket = ANY($2) AND op_id > $3 AND op_id <= $4 GROUP BY bucket",
                &[&(group as i32), &buckets, &after, &checkpoint],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    BucketChecksum {
                        checksum: r.get::<_, i64>(1) as u32,
                        count: r.get(2),
                    },
                )
            })
            .collect())
    }

    async fn changes(&self, group: i64, after: i64, up_to: i64) -> Result<ChangeSet, StorageError> {
        let rows = self
            .client()
            .query(
                "SELECT buckets, lookups FROM ferrosync.bucket_changes WHERE group_id = $1 AND max_op_id > $2 AND max_op_id <= $3",
                &[&(group as i32), &after, &up_to],
            )
            .await?;
        let mut set = ChangeSet::default();
        for r in rows {
            set.buckets.extend(r.get::<_, Vec<String>>(0));
            set.lookups.extend(r.get::<_, Vec<String>>(1));
        }
        Ok(set)
    }

    async fn bucket_data(
        &self,
        group: i64,
        checkpoint: i64,
        requests: &[(String, i64)],
        limit: i64,
    ) -> Result<Vec<(String, OplogEntry)>, StorageError> {
        let buckets: Vec<&str> = requests.iter().map(|(b, _)| b.as_str()).collect();
        let afters: Vec<i64> = requests.iter().map(|(_, a)| *a).collect();
        let rows = self
            .client()
            .query(
                "SELECT r.bucket, d.op_id, d.op, d.row_type, d.row_id, d.subkey, d.data, d.checksum
                 FROM unnest($2::text[], $3::int8[]) WITH ORDINALITY AS r(bucket, after_op, ord)
                 CROSS JOIN LATERAL (
                    SELECT * FROM ferrosync.bucket_data d
                    WHERE d.group_id = $1 AND d.bucket = r.bucket AND d.op_id > r.after_op AND d.op_id <= $4
                    ORDER BY d.op_id LIMIT $5) d
                 ORDER BY r.ord, d.op_id LIMIT $5",
                &[&(group as i32), &buckets, &afters, &checkpoint, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let op: i16 = r.get(2);
                let entry = OplogEntry {
                    op_id: r.get(1),
                    op: OpType::from_i16(op).ok_or_else(|| StorageError::Corrupt(format!("unknown op type {op}")))?,
                    object_type: r.get(3),
                    object_id: r.get(4),
                    subkey: r.get(5),
                    data: r.get(6),
                    checksum: r.get::<_, i64>(7) as u32,
                };
                Ok((r.get(0), entry))
            })
            .collect()
    }

    async fn parameter_sets(&self, group: i64, checkpoint: i64, lookups: &[String]) -> Result<HashMap<String, Vec<String>>, StorageError> {
        let rows = self
            .client()
            .query(
                "SELECT DISTINCT ON (lookup, table_id, key) lookup, bucket_parameters FROM ferrosync.bucket_parameters
                 WHERE group_id = $1 AND lookup = ANY($2) AND id <= $3
                 ORDER BY lookup, table_id, key, id DESC",
                &[&(group as i32), &lookups, &checkpoint],
            )
            .await?;
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for r in rows {
            let params: String = r.get(1);
            if params != "[]" {
                out.entry(r.get(0)).or_default().push(params);
            }
        }
        Ok(out)
    }

    async fn write_checkpoints_since(&self, seq: i64) -> Result<Vec<WriteCheckpoint>, StorageError> {
        let rows = self
            .client()
            .query(
                "SELECT user_key, write_checkpoint, lsn::text, seq FROM ferrosync.write_checkpoints WHERE seq > $1 ORDER BY seq",
                &[&seq],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let lsn: String = r.get(2);
                Ok(WriteCheckpoint {
                    user_key: r.get(0),
                    write_checkpoint: r.get(1),
                    lsn: lsn_from_text(&lsn).ok_or_else(|| StorageError::Corrupt(format!("bad lsn {lsn}")))?,
                    seq: r.get(3),
                })
            })
            .collect()
    }

    async fn create_write_checkpoint(&self, user_key: &str, head: u64) -> Result<i64, StorageError> {
        let row = self
            .client()
            .query_one(
                "INSERT INTO ferrosync.write_checkpoints (user_key, write_checkpoint, lsn, seq)
                 VALUES ($1, 1, $2::text::pg_lsn, nextval('ferrosync.write_checkpoint_seq'))
                 ON CONFLICT (user_key) DO UPDATE SET write_checkpoint = ferrosync.write_checkpoints.write_checkpoint + 1,
                   lsn = excluded.lsn, seq = excluded.seq
                 RETURNING write_checkpoint",
                &[&user_key, &lsn_to_text(head)],
            )
            .await?;
        Ok(row.get(0))
    }
}
