//! The replication-side writer: row changes in, ops + current state + lookups out, then
//! checkpoints. One writer per replication stream (guarded by the stream lease), so op_ids are
//! allocated in memory. Flushes are pipelined: this side evaluates rows into a batch and hands
//! it to the write task ([`crate::write_task`]), which commits batches in order while the next
//! one is prepared. Rows written by batches that may not be committed yet are answered from an
//! in-memory overlay, so reads of current state never miss an in-flight write.

use crate::checksum;
use crate::error::StorageError;
use crate::model::{Checkpoint, OpType, OplogEntry, StreamRecord, StreamState};
use crate::row_codec;
use crate::write_task::{self, Batch, CurrentRecord, Job, NewCheckpoint, OpRow};
use ferrosync_rules::{Row, SourceTableName, SyncRules};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use uuid::Uuid;

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
}

type RowKey = (i64, Uuid);

#[derive(Default)]
struct FlushOutput {
    ops: Vec<OpRow>,
    params: Vec<(String, i64, Uuid, i64, String)>,
    /// Rows whose state in `state` is new (see `BucketWriter::batch`).
    dirty: HashSet<RowKey>,
    /// Current state of rows copied in snapshot mode, already in stored form.
    copied: Vec<CurrentRecord>,
}

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
        let mut out = FlushOutput::default();
        for op in ops {
            self.apply(op, &mut state, &mut out);
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
                "SELECT c.table_id, c.key, c.data, c.buckets, c.lookups
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
            };
            state.insert((i64::from(r.get::<_, i32>(0)), r.get(1)), Some(current));
        }
        Ok(state)
    }

    fn alloc(&mut self) -> i64 {
        let id = self.next_op;
        self.next_op += 1;
        id
    }

    fn apply(&mut self, op: RecordOp, state: &mut HashMap<RowKey, Option<CurrentRow>>, out: &mut FlushOutput) {
        match op {
            RecordOp::Delete { table, key } => {
                let existing = state.insert((table.id, key), None).flatten();
                out.dirty.insert((table.id, key));
                self.remove_all(&table, key, existing.unwrap_or_default(), out);
            }
            RecordOp::Backfill { table, key, row } => {
                // A row storage does not have yet was inserted after the change stream's
                // position: the stream will bring it, evaluated by every definition.
                let Some(existing) = state.get(&(table.id, key)).cloned().flatten() else {
                    return;
                };
                out.dirty.insert((table.id, key));
                let next = self.backfill(&table, key, row, existing, out);
                state.insert((table.id, key), Some(next));
            }
            RecordOp::Upsert {
                table,
                key,
                before_key: None,
                row,
                unchanged,
            } if self.snapshot && unchanged.is_empty() => self.copy_row(&table, key, row, out),
            RecordOp::Upsert {
                table,
                key,
                before_key,
                mut row,
                unchanged,
            } => {
                // A key change: unchanged TOAST values are in the image stored under the old key.
                let mut moved_image = None;
                if let Some(before) = before_key.filter(|b| *b != key) {
                    let mut old = state.insert((table.id, before), None).flatten().unwrap_or_default();
                    out.dirty.insert((table.id, before));
                    moved_image = old.image.take();
                    self.remove_all(&table, before, old, out);
                }
                let existing = state.get(&(table.id, key)).cloned().flatten().unwrap_or_default();
                let image = moved_image.as_ref().or(existing.image.as_ref());
                let mut complete = true;
                for col in &unchanged {
                    match image.and_then(|img| img.get(col)) {
                        Some(v) => row.set(col, v.clone()),
                        None => complete = false,
                    }
                }
                out.dirty.insert((table.id, key));
                if !complete {
                    tracing::warn!(table = %table.name.name, "row has unchanged TOAST values but no stored image; keeping previous bucket state until a full update arrives");
                    let image = table.store_image.then_some(row);
                    state.insert((table.id, key), Some(CurrentRow { image, ..existing }));
                    return;
                }
                let next = self.evaluate(&table, key, row, existing, out);
                state.insert((table.id, key), Some(next));
            }
        }
    }

    /// Ops for a new row version: PUT in every bucket it is in, REMOVE from buckets it left,
    /// parameter rows for its lookups and tombstones for lookups it no longer produces.
    fn evaluate(&mut self, table: &TableHandle, key: Uuid, row: Row, existing: CurrentRow, out: &mut FlushOutput) -> CurrentRow {
        let rules = self.rules.clone();
        let (buckets, lookups) = self.place(&rules, table, key, &row, &existing.buckets, &existing.lookups, out);
        CurrentRow {
            image: (table.store_image && may_be_toasted(&row)).then_some(row),
            buckets,
            lookups,
        }
    }

    /// [`RecordOp::Backfill`]: like `evaluate`, for the deploy's new definitions only; the
    /// row's other buckets and lookups (and its image, which may be newer) stay as they are.
    fn backfill(&mut self, table: &TableHandle, key: Uuid, row: Row, existing: CurrentRow, out: &mut FlushOutput) -> CurrentRow {
        let Some(rules) = self.backfill.clone() else {
            return existing;
        };
        let (mine, others): (Vec<BucketRef>, Vec<BucketRef>) = existing.buckets.into_iter().partition(|b| rules.owns_bucket(&b.0));
        let (my_lookups, other_lookups): (Vec<String>, Vec<String>) = existing.lookups.into_iter().partition(|l| rules.owns_lookup(l));
        let (buckets, lookups) = self.place(&rules, table, key, &row, &mine, &my_lookups, out);
        let image = existing
            .image
            .or_else(|| (table.store_image && may_be_toasted(&row)).then_some(row));
        CurrentRow {
            image,
            buckets: others.into_iter().chain(buckets).collect(),
            lookups: other_lookups.into_iter().chain(lookups).collect(),
        }
    }

    /// Evaluate `row` with `rules`: PUT in its buckets, REMOVE from `previous` buckets it left,
    /// parameter rows for its lookups and tombstones for `previous_lookups` it left. Returns
    /// the row's buckets and lookups.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        rules: &SyncRules,
        table: &TableHandle,
        key: Uuid,
        row: &Row,
        previous: &[BucketRef],
        previous_lookups: &[String],
        out: &mut FlushOutput,
    ) -> (Vec<BucketRef>, Vec<String>) {
        let subkey = format!("{}/{}", table.id, key);
        let puts = self.puts(rules, table, row);
        let buckets: Vec<BucketRef> = puts.iter().map(|r| (r.bucket.clone(), r.table.clone(), r.id.clone())).collect();
        self.push_puts(puts, &subkey, out);
        for old in previous.iter().filter(|b| !buckets.contains(b)) {
            self.push_remove(old, &subkey, out);
        }
        let first = self.push_lookups(rules, table, key, row, out);
        let lookups: Vec<String> = out.params[first..].iter().map(|p| p.0.clone()).collect();
        for old in previous_lookups.iter().filter(|l| !lookups.contains(l)) {
            self.push_tombstone(old, table.id, key, out);
        }
        (buckets, lookups)
    }

    /// Snapshot mode: a row storage does not have yet. Its current state goes straight into
    /// the batch in stored form: nothing to merge with, and no bucket list kept beside the ops.
    fn copy_row(&mut self, table: &TableHandle, key: Uuid, row: Row, out: &mut FlushOutput) {
        let rules = self.rules.clone();
        let subkey = format!("{}/{}", table.id, key);
        let puts = self.puts(&rules, table, &row);
        let buckets = row_codec::encode_strings(puts.iter().flat_map(|r| [r.bucket.as_str(), r.table.as_str(), r.id.as_str()]));
        self.push_puts(puts, &subkey, out);
        let first = self.push_lookups(&rules, table, key, &row, out);
        let lookups = row_codec::encode_strings(out.params[first..].iter().map(|p| p.0.as_str()));
        out.copied.push(CurrentRecord {
            table_id: table.id,
            key,
            data: (table.store_image && may_be_toasted(&row)).then(|| row_codec::encode(&row)),
            buckets,
            lookups,
        });
    }

    /// The row's PUTs with `rules`, one per (bucket, output table, id): a later result for
    /// the same one replaces the earlier.
    fn puts(&mut self, rules: &SyncRules, table: &TableHandle, row: &Row) -> Vec<ferrosync_rules::EvaluatedRow> {
        let mut puts: Vec<ferrosync_rules::EvaluatedRow> = Vec::new();
        for result in rules.evaluate_row(&table.name, row) {
            match result {
                Ok(r) => {
                    puts.retain(|p| (&p.bucket, &p.table, &p.id) != (&r.bucket, &r.table, &r.id));
                    puts.push(r);
                }
                Err(e) => {
                    self.evaluation_errors += 1;
                    tracing::warn!(table = %table.name.name, error = %e, "row evaluation failed; row skipped for this query");
                }
            }
        }
        puts
    }

    fn push_puts(&mut self, puts: Vec<ferrosync_rules::EvaluatedRow>, subkey: &str, out: &mut FlushOutput) {
        let first_put = out.ops.len();
        for r in puts {
            let checksum = checksum_of_put(&out.ops[first_put..], &r);
            let op_id = self.alloc();
            out.ops.push(OpRow {
                bucket: r.bucket,
                entry: OplogEntry {
                    op_id,
                    op: OpType::Put,
                    object_type: Some(r.table),
                    object_id: Some(r.id),
                    subkey: Some(subkey.to_string()),
                    data: Some(r.data),
                    checksum,
                },
            });
        }
    }

    /// Parameter rows for the row's lookups with `rules`; returns where they start in `out.params`.
    fn push_lookups(&mut self, rules: &SyncRules, table: &TableHandle, key: Uuid, row: &Row, out: &mut FlushOutput) -> usize {
        let first = out.params.len();
        for result in rules.evaluate_parameter_row(&table.name, row) {
            match result {
                Ok(p) => {
                    let id = self.alloc();
                    out.params
                        .push((p.lookup.as_str().to_string(), table.id, key, id, p.bucket_parameters));
                }
                Err(e) => {
                    self.evaluation_errors += 1;
                    tracing::warn!(table = %table.name.name, error = %e, "parameter evaluation failed");
                }
            }
        }
        first
    }

    fn remove_all(&mut self, table: &TableHandle, key: Uuid, existing: CurrentRow, out: &mut FlushOutput) {
        let subkey = format!("{}/{}", table.id, key);
        for b in &existing.buckets {
            self.push_remove(b, &subkey, out);
        }
        for l in &existing.lookups {
            self.push_tombstone(l, table.id, key, out);
        }
    }

    fn push_remove(&mut self, (bucket, row_type, row_id): &BucketRef, subkey: &str, out: &mut FlushOutput) {
        // A bucket of a definition an in-place deploy replaced is gone (or going): rows that
        // still name it just forget it.
        if !self.rules.owns_bucket(bucket) {
            return;
        }
        let op_id = self.alloc();
        out.ops.push(OpRow {
            bucket: bucket.clone(),
            entry: OplogEntry {
                op_id,
                op: OpType::Remove,
                object_type: Some(row_type.clone()),
                object_id: Some(row_id.clone()),
                subkey: Some(subkey.to_string()),
                data: None,
                checksum: checksum::remove(subkey),
            },
        });
    }

    fn push_tombstone(&mut self, lookup: &str, table_id: i64, key: Uuid, out: &mut FlushOutput) {
        if !self.rules.owns_lookup(lookup) {
            return;
        }
        let id = self.alloc();
        out.params.push((lookup.to_string(), table_id, key, id, "[]".to_string()));
    }

    /// Turn a flush's result into a write-task batch, recording the rows' new state in the overlay.
    /// `existed`: rows storage holds (or will, once earlier batches commit) before this batch.
    fn batch(&mut self, mut state: HashMap<RowKey, Option<CurrentRow>>, existed: &HashSet<RowKey>, out: FlushOutput) -> Batch {
        // The write that will carry this batch (see `write`).
        self.write_seq += 1;
        let mut batch = Batch {
            chunks: crate::chunk::Chunks::encode(out.ops),
            params: out.params,
            inserts: out.copied,
            persisted_op: self.next_op - 1,
            progress: self.progress.take(),
            ..Batch::default()
        };
        for key in out.dirty {
            let current = state.remove(&key).flatten();
            let existing = existed.contains(&key);
            match &current {
                Some(row) => {
                    let record = CurrentRecord {
                        table_id: key.0,
                        key: key.1,
                        data: row.image.as_ref().map(row_codec::encode),
                        buckets: row_codec::encode_strings(row.buckets.iter().flat_map(|(b, t, i)| [b.as_str(), t.as_str(), i.as_str()])),
                        lookups: row_codec::encode_strings(row.lookups.iter().map(String::as_str)),
                    };
                    // New rows are COPYed; only rows storage already has need an upsert.
                    if existing { &mut batch.updates } else { &mut batch.inserts }.push(record);
                }
                None if existing => batch.deletes.push(key),
                None => {}
            }
            // Copied rows are read back only after the copy is drained: no overlay needed.
            if !self.snapshot {
                self.overlay.insert(key, (self.write_seq, current));
            }
        }
        self.stream.persisted_op = batch.persisted_op;
        batch
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
        self.sync().await?;
        self.stream.no_checkpoint_before = self.stream.no_checkpoint_before.max(lsn);
        let fenced = self
            .client
            .execute(
                "UPDATE ferrosync.sync_rules SET no_checkpoint_before = $2::text::pg_lsn WHERE id = $1 AND lock_owner = $3",
                &[&self.stream.id, &lsn_to_text(self.stream.no_checkpoint_before), &self.owner],
            )
            .await?;
        write_task::check_lease(fenced, self.stream.id)
    }

    /// All tables are copied: checkpoints may be created once the stream passes `lsn`.
    pub async fn mark_snapshot_done(&mut self, lsn: u64) -> Result<(), StorageError> {
        self.block_checkpoints_until(lsn).await?;
        let fenced = self
            .client
            .execute(
                "UPDATE ferrosync.sync_rules SET snapshot_done = true WHERE id = $1 AND lock_owner = $2",
                &[&self.stream.id, &self.owner],
            )
            .await?;
        write_task::check_lease(fenced, self.stream.id)?;
        self.stream.snapshot_done = true;
        Ok(())
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

/// The checksum of a PUT of `r`, taken from an identical PUT of the same row to another
/// bucket where there is one (definitions that select the same columns), else computed.
fn checksum_of_put(same_row: &[OpRow], r: &ferrosync_rules::EvaluatedRow) -> u32 {
    let identical = same_row.iter().find(|op| {
        op.entry.data.as_deref() == Some(r.data.as_str())
            && op.entry.object_id.as_deref() == Some(r.id.as_str())
            && op.entry.object_type.as_deref() == Some(r.table.as_str())
    });
    match identical {
        Some(op) => op.entry.checksum,
        None => checksum::put(&r.table, &r.id, &r.data),
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

/// Postgres stores values out of line, and then replicates them as "unchanged", only in rows
/// over TOAST_TUPLE_THRESHOLD (~2 KB). Smaller rows never need their image for a TOAST merge,
/// so it is not stored: for typical rows that halves current state. The estimate is taken on
/// the replicated text form (8 bytes per number, 2 per column), with a 4x margin below the
/// threshold because some types (arrays of small numbers, jsonb) are larger on disk than as
/// text. A table configured with a lower `toast_tuple_target` is the exception: its
/// incomplete updates are logged and held until a full update arrives (as for rows without
/// any image).
fn may_be_toasted(row: &Row) -> bool {
    const IMAGE_MIN_BYTES: usize = 512;
    let size: usize = row
        .iter()
        .map(|(_, v)| {
            2 + match v {
                ferrosync_rules::SqliteValue::Text(t) => t.len(),
                ferrosync_rules::SqliteValue::Blob(b) => b.len(),
                _ => 8,
            }
        })
        .sum();
    size >= IMAGE_MIN_BYTES
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
