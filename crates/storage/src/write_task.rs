//! The storage side of the writer: a task that owns one storage connection and applies
//! prepared batches and checkpoints strictly in order, so the replicator can decode and
//! evaluate the next batch while this one is written (and while Postgres fsyncs it).
//!
//! Each batch is one transaction (binary COPY of ops and lookups, current-state upserts, the
//! changed buckets/lookups, the persisted op_id and, for table copies, the copy's progress).
//! After a checkpoint commits, its LSN is published as durable: only then may the source
//! acknowledge it.

use crate::chunk::{Chunks, NewChunk};
use crate::copy_in::CopyIn;
use crate::error::StorageError;
use crate::model::{Checkpoint, OplogEntry};
use crate::pack::{NewPack, ParamRow, Unpack};
use crate::writer::{lsn_to_text, TableProgress, CHECKPOINT_CHANNEL};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

/// One op and the bucket it belongs to.
pub(crate) struct OpRow {
    pub bucket: String,
    pub entry: OplogEntry,
}

/// A row's stored current state (`data` is the row image, `buckets`/`lookups` string lists in
/// `row_codec` form).
pub(crate) struct CurrentRecord {
    pub table_id: i64,
    pub key: Uuid,
    pub data: Option<Vec<u8>>,
    pub buckets: Option<Vec<u8>>,
    pub lookups: Option<Vec<u8>>,
    /// The parameter pack holding the row's entries for `lookups` (see [`crate::pack`]).
    pub pack_id: Option<i64>,
}

/// Everything one flush writes, in one transaction.
#[derive(Default)]
pub(crate) struct Batch {
    /// Ops, encoded (or being encoded) into chunks.
    pub chunks: Chunks,
    /// (lookup, table_id, key, id, bucket_parameters JSON)
    pub params: Vec<ParamRow>,
    /// Parameter entries of copied rows, packed.
    pub packs: Vec<NewPack>,
    /// Entries to move out of their packs before `params` are written.
    pub unpacks: Vec<Unpack>,
    /// Current state of rows storage lacks (COPY) and of rows it has (upsert).
    pub inserts: Vec<CurrentRecord>,
    pub updates: Vec<CurrentRecord>,
    pub deletes: Vec<(i64, Uuid)>,
    pub persisted_op: i64,
    pub progress: Option<TableProgress>,
}

/// A checkpoint to publish: ops up to `checkpoint.op_id` become visible.
pub(crate) struct NewCheckpoint {
    pub checkpoint: Checkpoint,
    /// Also switch the served stream to this one (its first checkpoint).
    pub activate: bool,
    /// Also switch the stream to its pending config (see [`crate::incremental`]).
    pub switch: Option<crate::incremental::Switch>,
}

pub(crate) enum Job {
    /// One transaction: a batch, a checkpoint, or a batch and the checkpoint that covers it
    /// (the common case while streaming: one commit, one fsync).
    /// `seq` numbers writes in order; it is reported once committed.
    Write {
        seq: u64,
        batch: Option<Box<Batch>>,
        checkpoint: Option<NewCheckpoint>,
    },
    /// Publish `lsn` as durable once every earlier job is committed (nothing pending for it).
    Durable(u64),
    /// Reply once every earlier job is committed.
    Sync(oneshot::Sender<()>),
}

/// Apply jobs until the channel closes or a write fails (the error ends the task; the
/// writer reports it on its next call and replication restarts from the last checkpoint).
pub(crate) async fn run(
    mut client: Client,
    group: i64,
    owner: String,
    mut jobs: mpsc::Receiver<Job>,
    durable: watch::Sender<u64>,
    committed: watch::Sender<u64>,
) -> Result<(), StorageError> {
    let mut pruner = Pruner::new(CHANGES_RETENTION);
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Write { seq, batch, checkpoint } => {
                let tx = client.transaction().await?;
                if checkpoint.is_none() && batch.as_ref().is_some_and(|b| b.progress.is_some()) {
                    // A table copy's chunk and its saved progress commit together, so losing
                    // the last few to a crash of storage only makes the copy resume earlier;
                    // nothing is visible before a checkpoint, whose synchronous commit flushes
                    // the WAL of every chunk before it. So no fsync wait per chunk.
                    tx.batch_execute("SET LOCAL synchronous_commit = off").await?;
                }
                if let Some(batch) = batch {
                    write_batch(&tx, group, &owner, *batch).await?;
                }
                let stopped = match &checkpoint {
                    Some(cp) => write_checkpoint(&tx, group, &owner, cp).await?,
                    None => Vec::new(),
                };
                tx.commit().await?;
                committed.send_replace(seq);
                if let Some(cp) = checkpoint {
                    if cp.activate {
                        tracing::info!(stream = group, op_id = cp.checkpoint.op_id, stopped = ?stopped, "replication stream is now ACTIVE: clients switch to it; the streams it replaced are STOP until cleaned up");
                    }
                    durable.send_if_modified(|d| raise(d, cp.checkpoint.lsn));
                    pruner.after_checkpoint(&mut client, group, cp.checkpoint.op_id).await?;
                }
            }
            Job::Durable(lsn) => {
                durable.send_if_modified(|d| raise(d, lsn));
            }
            Job::Sync(reply) => {
                let _ = reply.send(());
            }
        }
    }
    Ok(())
}

/// How long `bucket_changes` rows are kept once a newer checkpoint exists. Hubs (one per API
/// process) read them within moments of each checkpoint; one that falls further behind finds
/// its range pruned and rebuilds its cache from the checkpoint instead.
const CHANGES_RETENTION: Duration = Duration::from_secs(60);

/// Deletes change records older than a checkpoint that is at least [`CHANGES_RETENTION`] old,
/// so `bucket_changes` stays small however long replication runs.
struct Pruner {
    retention: Duration,
    /// A checkpoint op_id seen one retention period ago (0: none yet).
    horizon: i64,
    due: Option<Instant>,
}

impl Pruner {
    fn new(retention: Duration) -> Pruner {
        Pruner {
            retention,
            horizon: 0,
            due: None,
        }
    }

    async fn after_checkpoint(&mut self, client: &mut Client, group: i64, checkpoint: i64) -> Result<(), StorageError> {
        let now = Instant::now();
        if self.due.is_some_and(|due| now < due) {
            return Ok(());
        }
        if self.horizon > 0 {
            let tx = client.transaction().await?;
            tx.execute(
                "DELETE FROM ferrosync.bucket_changes WHERE group_id = $1 AND max_op_id <= $2",
                &[&(group as i32), &self.horizon],
            )
            .await?;
            tx.execute(
                "UPDATE ferrosync.sync_rules SET changes_pruned_to = greatest(changes_pruned_to, $2) WHERE id = $1",
                &[&group, &self.horizon],
            )
            .await?;
            tx.commit().await?;
        }
        self.horizon = checkpoint;
        self.due = Some(now + self.retention);
        Ok(())
    }
}

fn raise(current: &mut u64, lsn: u64) -> bool {
    let raised = lsn > *current;
    if raised {
        *current = lsn;
    }
    raised
}

async fn write_batch(tx: &Transaction<'_>, group: i64, owner: &str, batch: Batch) -> Result<(), StorageError> {
    let g = group as i32;
    let chunks = batch.chunks.get().await?;
    let buckets = copy_ops(tx, g, &chunks).await?;
    let mut params = batch.params;
    params.extend(crate::pack::unpack(tx, g, &batch.unpacks).await?);
    let mut lookups = copy_params(tx, g, &params).await?;
    lookups.extend(crate::pack::copy_packs(tx, g, &batch.packs).await?);
    copy_current(tx, g, &batch.inserts).await?;
    upsert_current(tx, g, &batch.updates).await?;
    delete_current(tx, g, &batch.deletes).await?;
    if !buckets.is_empty() || !lookups.is_empty() {
        tx.execute(
            "INSERT INTO ferrosync.bucket_changes (group_id, max_op_id, buckets, lookups) VALUES ($1, $2, $3, $4)",
            &[&g, &batch.persisted_op, &buckets, &lookups],
        )
        .await?;
    }
    let fenced = tx
        .execute(
            "UPDATE ferrosync.sync_rules SET persisted_op = $2 WHERE id = $1 AND lock_owner = $3",
            &[&group, &batch.persisted_op, &owner],
        )
        .await?;
    check_lease(fenced, group)?;
    match &batch.progress {
        Some(p @ TableProgress { rebuild: Some(deploy), .. }) => crate::incremental::save_rebuild_progress(tx, group, *deploy, p).await?,
        Some(p) => crate::streams::save_table_progress(tx, p.table_id, p.last_key.as_deref(), p.rows, p.done).await?,
        None => {}
    }
    Ok(())
}

/// The batch's chunks, by binary COPY; returns the buckets they went to.
async fn copy_ops<'a>(tx: &Transaction<'_>, group: i32, chunks: &'a [NewChunk]) -> Result<Vec<&'a str>, StorageError> {
    if chunks.is_empty() {
        return Ok(Vec::new());
    }
    let mut copy = CopyIn::start(
        tx,
        "COPY ferrosync.op_chunks (group_id, bucket, last_op, first_op, op_count, checksum, ops) FROM STDIN BINARY",
    )
    .await?;
    for c in chunks {
        copy.row(7);
        copy.int4(group);
        copy.bytes(c.bucket.as_bytes())?;
        copy.int8(c.last_op);
        copy.int8(c.first_op);
        copy.int4(c.op_count);
        copy.int8(c.checksum);
        copy.bytes(&c.payload)?;
        copy.end_row().await?;
    }
    copy.finish().await?;
    let mut buckets: Vec<&str> = chunks.iter().map(|c| c.bucket.as_str()).collect();
    buckets.dedup();
    Ok(buckets)
}

/// The batch's parameter entries, by binary COPY; returns their lookups.
async fn copy_params<'a>(tx: &Transaction<'_>, group: i32, params: &'a [ParamRow]) -> Result<Vec<&'a str>, StorageError> {
    if params.is_empty() {
        return Ok(Vec::new());
    }
    let mut copy = CopyIn::start(
        tx,
        "COPY ferrosync.bucket_parameters (group_id, lookup, table_id, key, id, bucket_parameters) FROM STDIN BINARY",
    )
    .await?;
    let mut params: Vec<_> = params.iter().collect();
    params.sort_unstable_by(|a, b| (&a.0, a.1, a.2, a.3).cmp(&(&b.0, b.1, b.2, b.3)));
    for (lookup, table_id, key, id, bucket_parameters) in &params {
        copy.row(6);
        copy.int4(group);
        copy.bytes(lookup.as_bytes())?;
        copy.int8(*table_id);
        copy.uuid(key);
        copy.int8(*id);
        copy.bytes(bucket_parameters.as_bytes())?;
        copy.end_row().await?;
    }
    copy.finish().await?;
    let mut lookups: Vec<&str> = params.iter().map(|p| p.0.as_str()).collect();
    lookups.dedup();
    Ok(lookups)
}

/// New rows' current state, by binary COPY.
async fn copy_current(tx: &Transaction<'_>, group: i32, rows: &[CurrentRecord]) -> Result<(), StorageError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut copy = CopyIn::start(
        tx,
        "COPY ferrosync.current_data (group_id, table_id, key, data, buckets, lookups, pack_id) FROM STDIN BINARY",
    )
    .await?;
    let mut rows: Vec<&CurrentRecord> = rows.iter().collect();
    rows.sort_unstable_by_key(|r| (r.table_id, r.key));
    for r in rows {
        copy.row(7);
        copy.int4(group);
        copy.int4(table_id(r.table_id)?);
        copy.uuid(&r.key);
        copy.opt_bytes(r.data.as_deref())?;
        copy.opt_bytes(r.buckets.as_deref())?;
        copy.opt_bytes(r.lookups.as_deref())?;
        copy.opt_int8(r.pack_id);
        copy.end_row().await?;
    }
    copy.finish().await?;
    Ok(())
}

/// Source table ids are small serials; current_data stores them as int4.
fn table_id(id: i64) -> Result<i32, StorageError> {
    i32::try_from(id).map_err(|_| StorageError::Corrupt(format!("source table id {id} exceeds int4")))
}

async fn upsert_current(tx: &Transaction<'_>, group: i32, rows: &[CurrentRecord]) -> Result<(), StorageError> {
    if rows.is_empty() {
        return Ok(());
    }
    let tables: Vec<i64> = rows.iter().map(|r| r.table_id).collect();
    let keys: Vec<Uuid> = rows.iter().map(|r| r.key).collect();
    let data: Vec<Option<&[u8]>> = rows.iter().map(|r| r.data.as_deref()).collect();
    let buckets: Vec<Option<&[u8]>> = rows.iter().map(|r| r.buckets.as_deref()).collect();
    let lookups: Vec<Option<&[u8]>> = rows.iter().map(|r| r.lookups.as_deref()).collect();
    let packs: Vec<Option<i64>> = rows.iter().map(|r| r.pack_id).collect();
    tx.execute(
        "INSERT INTO ferrosync.current_data (group_id, table_id, key, data, buckets, lookups, pack_id)
         SELECT $1, * FROM unnest($2::int8[], $3::uuid[], $4::bytea[], $5::bytea[], $6::bytea[], $7::int8[])
         ON CONFLICT (group_id, table_id, key) DO UPDATE
         SET data = excluded.data, buckets = excluded.buckets, lookups = excluded.lookups, pack_id = excluded.pack_id",
        &[&group, &tables, &keys, &data, &buckets, &lookups, &packs],
    )
    .await?;
    Ok(())
}

async fn delete_current(tx: &Transaction<'_>, group: i32, rows: &[(i64, Uuid)]) -> Result<(), StorageError> {
    if rows.is_empty() {
        return Ok(());
    }
    let tables: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let keys: Vec<Uuid> = rows.iter().map(|r| r.1).collect();
    tx.execute(
        // Found by index lookups per key (LATERAL), deleted by TID: a plain join may hash the
        // whole group's current_data.
        "DELETE FROM ferrosync.current_data WHERE ctid = ANY (ARRAY(
            SELECT c.ctid FROM unnest($2::int8[], $3::uuid[]) AS k(table_id, key)
            CROSS JOIN LATERAL (
                SELECT ctid FROM ferrosync.current_data c
                WHERE c.group_id = $1 AND c.table_id = k.table_id AND c.key = k.key OFFSET 0) c))",
        &[&group, &tables, &keys],
    )
    .await?;
    Ok(())
}

/// The fencing check: the lease-guarded row was updated only if `owner` still holds the lease.
/// The update runs in the write's own transaction, so a writer that lost the lease commits nothing.
pub(crate) fn check_lease(updated: u64, group: i64) -> Result<(), StorageError> {
    if updated == 1 {
        Ok(())
    } else {
        Err(StorageError::LeaseLost(format!(
            "another process took over replication stream {group}"
        )))
    }
}

/// Store a checkpoint (and activate the stream if asked); returns the streams activation stopped.
async fn write_checkpoint(tx: &Transaction<'_>, group: i64, owner: &str, new: &NewCheckpoint) -> Result<Vec<i64>, StorageError> {
    let lsn_text = lsn_to_text(new.checkpoint.lsn);
    let fenced = tx
        .execute(
            "UPDATE ferrosync.sync_rules SET last_checkpoint = $2, last_checkpoint_lsn = $3::text::pg_lsn WHERE id = $1 AND lock_owner = $4",
            &[&group, &new.checkpoint.op_id, &lsn_text, &owner],
        )
        .await?;
    check_lease(fenced, group)?;
    let stopped = match new.activate {
        true => crate::lifecycle::activate(tx, group).await?,
        false => Vec::new(),
    };
    if let Some(switch) = &new.switch {
        crate::incremental::switch(tx, group, switch).await?;
    }
    // Delivered at commit: listeners never see a checkpoint before its ops.
    let payload = format!("{}:{}:{}", group, new.checkpoint.op_id, lsn_text);
    tx.execute("SELECT pg_notify($1, $2)", &[&CHECKPOINT_CHANNEL, &payload]).await?;
    if new.switch.is_some() {
        let payload = format!("{group}:{}", crate::incremental::CONFIG_SWITCHED);
        tx.execute("SELECT pg_notify($1, $2)", &[&CHECKPOINT_CHANNEL, &payload]).await?;
    }
    Ok(stopped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrosync_testkit::{PgCluster, PgOptions};

    async fn count(client: &Client) -> anyhow::Result<i64> {
        Ok(client.query_one("SELECT count(*) FROM ferrosync.bucket_changes", &[]).await?.get(0))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn change_records_are_pruned_one_retention_behind() -> anyhow::Result<()> {
        let cluster = PgCluster::start(PgOptions::default())?;
        cluster.create_database("storage").await?;
        let mut client = crate::connect(&crate::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?).await?;
        crate::schema::migrate(&client).await?;
        client
            .batch_execute(
                "INSERT INTO ferrosync.sync_rules (id, content, state, slot_name) VALUES (1, '', 'ACTIVE', 's');
                 INSERT INTO ferrosync.bucket_changes (group_id, max_op_id, buckets, lookups)
                 SELECT 1, g * 10, ARRAY['b' || g], ARRAY[]::text[] FROM generate_series(1, 5) g;",
            )
            .await?;
        let mut pruner = Pruner::new(Duration::ZERO);
        // The first checkpoint only sets the horizon; the next prunes up to it.
        pruner.after_checkpoint(&mut client, 1, 20).await?;
        assert_eq!(count(&client).await?, 5);
        pruner.after_checkpoint(&mut client, 1, 50).await?;
        assert_eq!(count(&client).await?, 3, "records up to op 20 are gone");
        let storage = crate::PgStorage::connect(&crate::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?, 1).await?;
        let recent = crate::SyncStorage::changes(&storage, 1, 20, 50).await?;
        assert!(recent.complete);
        assert_eq!(recent.buckets.len(), 3);
        let stale = crate::SyncStorage::changes(&storage, 1, 10, 50).await?;
        assert!(!stale.complete, "a range reaching behind the horizon must say so");
        Ok(())
    }

    /// Fencing: once another process holds the lease, this writer's batches and checkpoints
    /// fail inside their own transaction and nothing of them is committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_that_lost_the_lease_commits_nothing() -> anyhow::Result<()> {
        let cluster = PgCluster::start(PgOptions::default())?;
        cluster.create_database("storage").await?;
        let storage = crate::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?;
        let admin = crate::connect(&storage).await?;
        crate::schema::migrate(&admin).await?;
        admin
            .batch_execute(
                "INSERT INTO ferrosync.sync_rules (id, content, state, slot_name, lock_owner) VALUES (1, '', 'ACTIVE', 's', 'a')",
            )
            .await?;
        let (jobs, rx) = mpsc::channel(4);
        let (durable, _) = watch::channel(0);
        let (committed, committed_rx) = watch::channel(0);
        let task = tokio::spawn(run(crate::connect(&storage).await?, 1, "a".into(), rx, durable, committed));
        let checkpoint = |op_id| NewCheckpoint {
            checkpoint: Checkpoint { op_id, lsn: 100 },
            activate: false,
            switch: None,
        };
        let batch = |persisted_op| {
            Some(Box::new(Batch {
                // One op: the batch records bucket "b" as changed.
                chunks: crate::chunk::Chunks::encode(vec![OpRow {
                    bucket: "b".into(),
                    entry: OplogEntry {
                        op_id: persisted_op,
                        op: crate::model::OpType::Put,
                        object_type: Some("t".into()),
                        object_id: Some("1".into()),
                        subkey: Some("1/1".into()),
                        data: Some("{}".into()),
                        checksum: 1,
                    },
                }]),
                persisted_op,
                ..Batch::default()
            }))
        };
        jobs.send(Job::Write {
            seq: 1,
            batch: batch(5),
            checkpoint: Some(checkpoint(5)),
        })
        .await?;
        let (tx, done) = oneshot::channel();
        jobs.send(Job::Sync(tx)).await?;
        done.await?;
        assert_eq!(*committed_rx.borrow(), 1, "the lease holder commits");

        // Another process takes over (what LeaseConnection::try_acquire writes).
        admin
            .execute("UPDATE ferrosync.sync_rules SET lock_owner = 'b' WHERE id = 1", &[])
            .await?;
        jobs.send(Job::Write {
            seq: 2,
            batch: batch(9),
            checkpoint: Some(checkpoint(9)),
        })
        .await?;
        let error = task.await?.expect_err("the fenced write must fail");
        assert!(matches!(error, StorageError::LeaseLost(_)), "{error}");
        let row = admin
            .query_one("SELECT persisted_op, last_checkpoint, (SELECT count(*) FROM ferrosync.bucket_changes) FROM ferrosync.sync_rules WHERE id = 1", &[])
            .await?;
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)),
            (5, 5, 1),
            "nothing of the fenced write is visible"
        );
        Ok(())
    }
}
