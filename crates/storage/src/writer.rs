//! The replication-side writer: row changes in, ops + current state + lookups out, then
//! checkpoints. One writer per replication stream (guarded by the stream lease), so op_ids are
//! allocated in memory. Flushes are pipelined: this side evaluates rows into a batch and hands
//! it to the write task ([`crate::write_task`]), which commits batches in order while the next
//! one is prepared. Rows written by batches that may not be committed yet are answered from an
//! in-memory overlay, so reads of current state never miss an in-flight write.

use crate::error::StorageError;
use crate::model::{Checkpoint, StreamRecord, StreamState};
use crate::pack::{ParamRow, Unpack};
use crate::row_codec;
use crate::write_task::{self, Batch, CurrentRecord, Job, NewCheckpoint, OpRow};
use ferrosync_rules::{Row, SourceTableName, SyncRules};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use uuid::Uuid;

mod apply;

/// Records buffered before a flush: bounds memory and keeps storage transactions a few MB.
const FLUSH_RECORDS: usize = 5_000;
/// Batches queued for the write task beyond the one it is writing.
const QUEUED_BATCHES: usize = 2;
/// Overlay size from which entries of committed writes are dropped.
const OVERLAY_PRUNE_AT: usize = 4_096;

/// Notification channel for new checkpoints (payload `group:op_id:lsn`).
pub const CHECKPOINT_CHANNEL: &str = "ferrosync_checkpoints";

/// A source table as the writer sees it.
#[derive(Debug, Clone)]
pub struct TableHandle {
    pub id: i64,
    pub name: SourceTableName,
    /// Keep the row image so unchanged TOAST values can be filled in (not needed for FULL identity).
    pub store_image: bool,
}

/// One row change.
#[derive(Debug, Clone)]
pub enum RecordOp {
    /// Insert or update. `before_key` is set when the replica identity changed.
    Upsert {
        table: Arc<TableHandle>,
        key: Uuid,
        before_key: Option<Uuid>,
        row: Row,
        unchanged: Vec<String>,
    },
    Delete {
        table: Arc<TableHandle>,
        key: Uuid,
    },
    /// A row re-read for an in-place deploy: evaluated by the deploy's new definitions only
    /// (see [`BucketWriter::set_backfill_rules`]), merged into the row's current buckets and
    /// lookups; the buckets of the other definitions get no ops.
    Backfill {
        table: Arc<TableHandle>,
        key: Uuid,
        row: Row,
    },
}

/// (bucket, object_type, object_id) a row is currently in.
type BucketRef = (String, String, String);

#[derive(Debug, Clone, Default)]
struct CurrentRow {
    image: Option<Row>,
    buckets: Vec<BucketRef>,
    lookups: Vec<String>,
    /// The parameter pack holding the entries for `lookups` (see [`crate::pack`]).
    packed: Option<i64>,
}

type RowKey = (i64, Uuid);

#[derive(Default)]
struct FlushOutput {
    ops: Vec<OpRow>,
    params: Vec<ParamRow>,
    /// Rows whose state in `state` is new (see `BucketWriter::batch`).
    dirty: HashSet<RowKey>,
    /// Current state of rows copied in snapshot mode, already in stored form.
    copied: Vec<CurrentRecord>,
    /// Parameter entries of copied rows, to be packed under `pack_id`: the id of the first.
    packed: Vec<ParamRow>,
    pack_id: Option<i64>,
    /// Entries of changed rows to move out of their packs.
    unpacks: Vec<Unpack>,
}

/// Bounds the op list reserved for a batch (a row in very many buckets is rare; its batch
/// grows as it needs).
const MAX_OPS_PER_RECORD_RESERVED: usize = 8;

/// Writes one replication stream's ops.
pub struct BucketWriter {
    /// Reads current state and runs rare statements once the pipeline is drained.
    client: Client,
    jobs: mpsc::Sender<Job>,
    task: Option<JoinHandle<Result<(), StorageError>>>,
    durable: watch::Receiver<u64>,
    /// Current state of rows written by batches that may still be in flight (None: deleted),
    /// with the `seq` of the write that stores it; entries go once `committed` reaches it.
    overlay: HashMap<RowKey, (u64, Option<CurrentRow>)>,
    /// The lease holder this writer writes as (the fencing token).
    owner: String,
    /// The last write handed to the write task, and the last one it committed.
    write_seq: u64,
    committed: watch::Receiver<u64>,
    stream: StreamRecord,
    rules: Arc<SyncRules>,
    next_op: i64,
    pending: Vec<RecordOp>,
    snapshot: bool,
    progress: Option<TableProgress>,
    evaluation_errors: u64,
    /// The new definitions of a pending in-place deploy, for [`RecordOp::Backfill`].
    backfill: Option<Arc<SyncRules>>,
    /// Ops per record of the last batch, to size the next batch's op list up front.
    ops_per_record: usize,
    /// Evaluation results of the row being applied, reused from row to row.
    results: Vec<Result<ferrosync_rules::EvaluatedRow, ferrosync_rules::EvaluationError>>,
}

/// A table copy's position, saved in the same transaction as the rows copied up to it, so a
/// resumed copy never meets a row it already stored.
#[derive(Debug, Clone)]
pub struct TableProgress {
    pub table_id: i64,
    pub last_key: Option<String>,
    pub rows: i64,
    pub done: bool,
    /// Set (to the deploy id) for a re-read of an in-place deploy, whose progress is kept apart.
    pub rebuild: Option<i64>,
}

impl BucketWriter {
    /// `reader` serves reads; `writer` is owned by the write task. Every write checks that
    /// `owner` still holds the stream's lease ([`crate::lease`]).
    pub fn new(reader: Client, writer: Client, stream: StreamRecord, rules: Arc<SyncRules>, owner: String) -> BucketWriter {
        let next_op = stream.persisted_op + 1;
        let (jobs, rx) = mpsc::channel(QUEUED_BATCHES);
        let (durable_tx, durable) = watch::channel(stream.checkpoint.lsn);
        let (committed_tx, committed) = watch::channel(0);
        let task = tokio::spawn(write_task::run(writer, stream.id, owner.clone(), rx, durable_tx, committed_tx));
        BucketWriter {
            client: reader,
            jobs,
            task: Some(task),
            durable,
            overlay: HashMap::new(),
            owner,
            write_seq: 0,
            committed,
            stream,
            rules,
            next_op,
            pending: Vec::new(),
            snapshot: false,
            progress: None,
            evaluation_errors: 0,
            backfill: None,
            ops_per_record: 1,
            results: Vec::new(),
        }
    }

    /// Evaluate rows with `rules` from now on (a config change in place; call
    /// [`BucketWriter::flush`] first so rows saved before are evaluated with the old rules).
    pub fn set_rules(&mut self, rules: Arc<SyncRules>) {
        self.rules = rules;
    }

    /// The stream's pending in-place deploy, as storage has it now.
    pub fn set_pending(&mut self, pending: Option<crate::model::PendingConfig>) {
        self.stream.pending = pending;
    }

    /// The rules [`RecordOp::Backfill`] rows are evaluated with.
    pub fn set_backfill_rules(&mut self, rules: Arc<SyncRules>) {
        self.backfill = Some(rules);
    }

    pub fn stream(&self) -> &StreamRecord {
        &self.stream
    }

    /// A storage connection for statements outside the op pipeline (call [`BucketWriter::sync`]
    /// first when they must see everything written so far).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The highest source LSN whose changes are committed in storage: safe to acknowledge.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.clone()
    }

    async fn send(&mut self, job: Job) -> Result<(), StorageError> {
        if self.jobs.send(job).await.is_ok() {
            return Ok(());
        }
        Err(self.failure().await)
    }

    /// Why the write task stopped (call once [`BucketWriter::durable`] closed or a call failed):
    /// the storage error it ended with.
    pub async fn failure(&mut self) -> StorageError {
        match self.task.take() {
            Some(task) => match task.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => StorageError::WriterStopped("the job queue closed".into()),
                Err(e) => StorageError::WriterStopped(e.to_string()),
            },
            None => StorageError::WriterStopped("it failed earlier".into()),
        }
    }

    /// Wait until everything handed to the write task is committed.
    pub async fn sync(&mut self) -> Result<(), StorageError> {
        self.flush().await?;
        self.drain().await
    }

    async fn drain(&mut self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Sync(tx)).await?;
        if rx.await.is_err() {
            return Err(self.failure().await);
        }
        self.overlay.clear();
        Ok(())
    }

    /// Publish `lsn` as durable once everything before it is committed (a source position
    /// with nothing to write, e.g. a keepalive).
    pub async fn mark_durable(&mut self, lsn: u64) -> Result<(), StorageError> {
        self.flush().await?;
        self.send(Job::Durable(lsn)).await
    }

    /// Snapshot mode: every saved row is new to storage, so current state is neither read nor
    /// merged, and rows are buffered until the chunk is flushed. Only for a table copy that
    /// resumes strictly after the key saved with [`BucketWriter::flush_snapshot_chunk`]; a row
    /// seen twice would fail the copy.
    pub fn set_snapshot_mode(&mut self, on: bool) {
        self.snapshot = on;
    }

    /// Persist the buffered rows of a table copy together with its progress.
    pub async fn flush_snapshot_chunk(&mut self, progress: TableProgress) -> Result<(), StorageError> {
        self.progress = Some(progress);
        self.flush().await
    }

    pub fn evaluation_errors(&self) -> u64 {
        self.evaluation_errors
    }

    pub async fn save(&mut self, op: RecordOp) -> Result<(), StorageError> {
        self.pending.push(op);
        if self.pending.len() >= FLUSH_RECORDS && !self.snapshot {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hand everything buffered to the write task (without making it visible: that is `commit`).
    pub async fn flush(&mut self) -> Result<(), StorageError> {
        let batch = self.prepare().await?;
        self.write(batch, None).await
    }

    async fn write(&mut self, batch: Option<Batch>, checkpoint: Option<NewCheckpoint>) -> Result<(), StorageError> {
        if batch.is_none() && checkpoint.is_none() {
            return Ok(());
        }
        let batch = batch.map(Box::new);
        self.send(Job::Write {
            seq: self.write_seq,
            batch,
            checkpoint,
        })
        .await?;
        if self.overlay.len() > OVERLAY_PRUNE_AT {
            // Committed rows are read from storage again; the overlay only needs the writes
            // still queued (a few batches), so it stays small.
            let committed = *self.committed.borrow();
            self.overlay.retain(|_, (seq, _)| *seq > committed);
        }
        Ok(())
    }

    /// Evaluate everything buffered into a batch for the write task.
    async fn prepare(&mut self) -> Result<Option<Batch>, StorageError> {
        if self.pending.is_empty() && self.progress.is_none() {
            return Ok(None);
        }
        let ops = std::mem::take(&mut self.pending);
        let mut state = if self.snapshot {
            HashMap::new()
        } else {
            self.load_current(&ops).await?
        };
        let existed: HashSet<RowKey> = state.iter().filter(|(_, row)| row.is_some()).map(|(key, _)| *key).collect();
        let records = ops.len();
        let mut out = FlushOutput {
            ops: Vec::with_capacity(records * self.ops_per_record),
            copied: Vec::with_capacity(if self.snapshot { records } else { 0 }),
            ..FlushOutput::default()
        };
        for op in ops {
            self.apply(op, &mut state, &mut out);
        }
        if records > 0 {
            self.ops_per_record = out.ops.len().div_ceil(records).clamp(1, MAX_OPS_PER_RECORD_RESERVED);
        }
        Ok(Some(self.batch(state, &existed, out)))
    }

    async fn load_current(&self, ops: &[RecordOp]) -> Result<HashMap<RowKey, Option<CurrentRow>>, StorageError> {
        let mut table_ids = Vec::with_capacity(ops.len());
        let mut keys = Vec::with_capacity(ops.len());
        for op in ops {
            let (table, key, before) = match op {
                RecordOp::Upsert {
                    table, key, before_key, ..
                } => (table.id, *key, *before_key),
                RecordOp::Delete { table, key } | RecordOp::Backfill { table, key, .. } => (table.id, *key, None),
            };
            table_ids.push(table);
            keys.push(key);
            if let Some(b) = before {
                table_ids.push(table);
                keys.push(b);
            }
        }
        let mut state: HashMap<RowKey, Option<CurrentRow>> = HashMap::with_capacity(keys.len());
        let (mut read_tables, mut read_keys) = (Vec::new(), Vec::new());
        for (table, key) in table_ids.into_iter().zip(keys) {
            match self.overlay.get(&(table, key)) {
                Some((_, known)) => {
                    state.insert((table, key), known.clone());
                }
                None => {
                    if state.insert((table, key), None).is_none() {
                        read_tables.push(table);
                        read_keys.push(key);
                    }
                }
            }
        }
        if read_keys.is_empty() {
            return Ok(state);
        }
        let group = self.stream.id as i32;
        let rows = self
            .client
            .query(
                // An index lookup per key: as a plain join (and a LATERAL without the OFFSET 0
                // fence is flattened into one) the planner hashed the group's whole current_data
                // for every batch, which made incremental replication Postgres-bound.
                "SELECT c.table_id, c.key, c.data, c.buckets, c.lookups, c.pack_id
                 FROM unnest($2::int8[], $3::uuid[]) AS k(table_id, key)
                 CROSS JOIN LATERAL (
                    SELECT * FROM ferrosync.current_data c
                    WHERE c.group_id = $1 AND c.table_id = k.table_id AND c.key = k.key OFFSET 0) c",
                &[&group, &read_tables, &read_keys],
            )
            .await?;
        for r in rows {
            let data: Option<Vec<u8>> = r.get(2);
            let buckets: Option<&[u8]> = r.get(3);
            let lookups: Option<&[u8]> = r.get(4);
            let current = CurrentRow {
                image: data.as_deref().and_then(row_codec::decode),
                buckets: decode_bucket_refs(buckets).ok_or_else(|| StorageError::Corrupt("current_data.buckets".into()))?,
                lookups: lookups
                    .map(row_codec::decode_strings)
                    .unwrap_or(Some(Vec::new()))
                    .ok_or_else(|| StorageError::Corrupt("current_data.lookups".into()))?,
                packed: r.get(5),
            };
            state.insert((i64::from(r.get::<_, i32>(0)), r.get(1)), Some(current));
        }
        Ok(state)
    }

    /// Remove every row of `table` (TRUNCATE, or a table whose identity changed).
    pub async fn truncate(&mut self, table: Arc<TableHandle>) -> Result<(), StorageError> {
        loop {
            self.sync().await?;
            let rows = self
                .client
                .query(
                    "SELECT key FROM ferrosync.current_data WHERE group_id = $1 AND table_id = $2::int8 LIMIT 5000",
                    &[&(self.stream.id as i32), &table.id],
                )
                .await?;
            if rows.is_empty() {
                return Ok(());
            }
            for r in rows {
                self.pending.push(RecordOp::Delete {
                    table: table.clone(),
                    key: r.get(0),
                });
            }
        }
    }

    /// Source transaction boundary at `lsn` (or a keepalive marker when `force`): make flushed
    /// ops visible as a checkpoint, unless blocked by an unfinished snapshot. The checkpoint is
    /// committed by the write task; [`BucketWriter::durable`] reports when.
    pub async fn commit(&mut self, lsn: u64, force: bool) -> Result<Option<Checkpoint>, StorageError> {
        let batch = self.prepare().await?;
        let s = &self.stream;
        let has_new = s.persisted_op > s.checkpoint.op_id;
        let blocked = !s.snapshot_done || lsn < s.no_checkpoint_before || lsn < s.checkpoint.lsn;
        let switch = self.due_switch(lsn);
        if (!has_new && !force && switch.is_none()) || blocked {
            self.write(batch, None).await?;
            // Flushed ops are kept across restarts even before a checkpoint shows them.
            self.send(Job::Durable(lsn)).await?;
            return Ok(None);
        }
        let checkpoint = Checkpoint {
            op_id: s.persisted_op.max(s.checkpoint.op_id),
            lsn,
        };
        let activate = s.state == StreamState::Processing;
        let switched = switch.is_some();
        self.write(
            batch,
            Some(NewCheckpoint {
                checkpoint,
                activate,
                switch,
            }),
        )
        .await?;
        if activate {
            self.stream.state = StreamState::Active;
        }
        if let Some(pending) = self.stream.pending.take_if(|_| switched) {
            tracing::info!(
                stream = self.stream.id,
                deploy = pending.id,
                op_id = checkpoint.op_id,
                "switching to the config deployed in place"
            );
            self.stream.content = pending.content;
            self.stream.prefix_ids = pending.prefix_ids;
        }
        self.stream.checkpoint = checkpoint;
        Ok(Some(checkpoint))
    }

    /// The pending deploy to switch to in a checkpoint at `lsn`, with the prefixes it retires.
    fn due_switch(&self, lsn: u64) -> Option<crate::incremental::Switch> {
        let pending = self.stream.pending.as_ref()?;
        let due = pending.switch_lsn.is_some_and(|at| lsn >= at);
        due.then(|| crate::incremental::Switch {
            deploy: pending.id,
            retired: crate::incremental::retired_prefixes(&self.stream, pending),
        })
    }

    /// Whether the stream still has to switch to its pending config (false once the
    /// switching checkpoint is handed to the write task).
    pub fn has_pending(&self) -> bool {
        self.stream.pending.is_some()
    }

    /// Every table is re-read for the pending deploy: it switches at the first checkpoint at
    /// or past `lsn`.
    pub async fn mark_rebuilt(&mut self, lsn: u64) -> Result<(), StorageError> {
        self.sync().await?;
        let Some(pending) = self.stream.pending.as_mut() else {
            return Ok(());
        };
        if !crate::incremental::mark_rebuilt(&self.client, self.stream.id, &self.owner, pending.id, lsn).await? {
            return Err(StorageError::LeaseLost(format!(
                "deploy {} is no longer pending on stream {} (or the lease moved)",
                pending.id, self.stream.id
            )));
        }
        pending.switch_lsn = Some(lsn);
        Ok(())
    }

    /// Checkpoints stay blocked until the stream passes `lsn` (the WAL position after a table copy).
    pub async fn block_checkpoints_until(&mut self, lsn: u64) -> Result<(), StorageError> {
        self.fence_checkpoints(lsn, false).await
    }

    /// All tables are copied: checkpoints may be created once the stream passes `lsn`.
    pub async fn mark_snapshot_done(&mut self, lsn: u64) -> Result<(), StorageError> {
        self.fence_checkpoints(lsn, true).await?;
        self.stream.snapshot_done = true;
        Ok(())
    }

    /// Drain the writer, then record (in one statement) that checkpoints wait for `lsn`, and
    /// that the snapshot is done if `snapshot_done`.
    async fn fence_checkpoints(&mut self, lsn: u64, snapshot_done: bool) -> Result<(), StorageError> {
        self.sync().await?;
        self.stream.no_checkpoint_before = self.stream.no_checkpoint_before.max(lsn);
        let fenced = self
            .client
            .execute(
                "UPDATE ferrosync.sync_rules SET no_checkpoint_before = $2::text::pg_lsn, snapshot_done = snapshot_done OR $4 WHERE id = $1 AND lock_owner = $3",
                &[&self.stream.id, &lsn_to_text(self.stream.no_checkpoint_before), &self.owner, &snapshot_done],
            )
            .await?;
        write_task::check_lease(fenced, self.stream.id)
    }
}

impl Drop for BucketWriter {
    /// Stop the write task with the writer. A transaction in flight rolls back, unless its
    /// COMMIT was already sent, in which case the server may still commit it. Either way its
    /// LSN was never acknowledged. A successor (or this process's next attempt) cannot read
    /// `persisted_op` before that commit: taking the lease updates the `sync_rules` row, whose
    /// lock the in-flight transaction holds (its fencing UPDATE), so the takeover waits for it.
    /// Keep the fencing check an UPDATE for that reason: a plain SELECT would not wait, and
    /// op ids could be handed out twice.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// (bucket, object_type, object_id) triples, as stored by `batch`; NULL is none.
fn decode_bucket_refs(bytes: Option<&[u8]>) -> Option<Vec<BucketRef>> {
    let Some(bytes) = bytes else { return Some(Vec::new()) };
    let strings = row_codec::decode_strings(bytes)?;
    if strings.len() % 3 != 0 {
        return None;
    }
    let mut refs = Vec::with_capacity(strings.len() / 3);
    let mut it = strings.into_iter();
    while let (Some(bucket), Some(object_type), Some(object_id)) = (it.next(), it.next(), it.next()) {
        refs.push((bucket, object_type, object_id));
    }
    Some(refs)
}

/// Postgres' `X/Y` text form of an LSN.
pub fn lsn_to_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parse Postgres' `X/Y` text form.
pub fn lsn_from_text(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}
