//! The replication-side writer: row changes in, ops + current state + lookups out, then
//! checkpoints. One writer per replication stream (guarded by the stream lease), so op_ids are
//! allocated in memory and every flush is one storage transaction using binary COPY.

use crate::checksum;
use crate::error::StorageError;
use crate::model::{Checkpoint, OpType, StreamRecord, StreamState};
use crate::row_codec;
use ferrosync_rules::{Row, SourceTableName, SyncRules};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::Client;
use uuid::Uuid;

/// Records buffered before a flush: bounds memory and keeps storage transactions a few MB.
const FLUSH_RECORDS: usize = 5_000;

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

struct OpRow {
    bucket: String,
    op_id: i64,
    op: OpType,
    row_type: Option<String>,
    row_id: Option<String>,
    subkey: Option<String>,
    data: Option<String>,
    checksum: u32,
}

#[derive(Default)]
struct FlushOutput {
    ops: Vec<OpRow>,
    params: Vec<(String, i64, Uuid, i64, String)>,
    dirty: HashSet<RowKey>,
    buckets: HashSet<String>,
    lookups: HashSet<String>,
}

/// Writes one replication stream's ops.
pub struct BucketWriter {
    client: Client,
    stream: StreamRecord,
    rules: Arc<SyncRules>,
    next_op: i64,
    pending: Vec<RecordOp>,
    snapshot: bool,
    progress: Option<TableProgress>,
    evaluation_errors: u64,
}

/// A table copy's position, saved in the same transaction as the rows copied up to it, so a
/// resumed copy never meets a row it already stored.
#[derive(Debug, Clone)]
pub struct TableProgress {
    pub table_id: i64,
    pub last_key: Option<String>,
    pub rows: i64,
    pub done: bool,
}

impl BucketWriter {
    pub fn new(client: Client, stream: StreamRecord, rules: Arc<SyncRules>) -> BucketWriter {
        let next_op = stream.persisted_op + 1;
        BucketWriter {
            client,
            stream,
            rules,
            next_op,
            pending: Vec::new(),
            snapshot: false,
            progress: None,
            evaluation_errors: 0,
        }
    }

    pub fn stream(&self) -> &StreamRecord {
        &self.stream
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Snapshot mode: every saved row is new to storage (a table copy whose progress is saved
    /// with [`BucketWriter::flush_snapshot_chunk`]), so current state is neither read nor
    /// merged, and rows are buffered until the chunk is flushed.
    pub fn set_snapshot_mode(&mut self, on: bool) {
        self.snapshot = on;
    }

    /// Persist the buffered rows of a table copy together with its progress.
    pub async fn flush_snapshot_chunk(&mut self, progress: TableProgress) -> Result<(), StorageError> {
        if self.pending.is_empty() {
            return write_progress(&self.client, Some(progress)).await;
        }
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

    /// Persist everything buffered (without making it visible: that is `commit`).
    pub async fn flush(&mut self) -> Result<(), StorageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut self.pending);
        let mut state = if self.snapshot {
            HashMap::new()
        } else {
            self.load_current(&ops).await?
        };
        let mut out = FlushOutput::default();
        for op in ops {
            self.apply(op, &mut state, &mut out);
        }
        self.write(state, out).await
    }

    async fn load_current(&self, ops: &[RecordOp]) -> Result<HashMap<RowKey, Option<CurrentRow>>, StorageError> {
        let mut table_ids = Vec::with_capacity(ops.len());
        let mut keys = Vec::with_capacity(ops.len());
        for op in ops {
            let (table, key, before) = match op {
                RecordOp::Upsert {
                    table, key, before_key, ..
                } => (table.id, *key, *before_key),
                RecordOp::Delete { table, key } => (table.id, *key, None),
            };
            table_ids.push(table);
            keys.push(key);
            if let Some(b) = before {
                table_ids.push(table);
                keys.push(b);
            }
        }
        let mut state: HashMap<RowKey, Option<CurrentRow>> = table_ids.iter().zip(&keys).map(|(t, k)| ((*t, *k), None)).collect();
        let group = self.stream.id as i32;
        let rows = self
            .client
            .query(
                "SELECT c.table_id, c.key, c.data, c.buckets, c.lookups
                 FROM ferrosync.current_data c
                 JOIN unnest($2::int8[], $3::uuid[]) AS k(table_id, key) ON c.table_id = k.table_id AND c.key = k.key
                 WHERE c.group_id = $1",
                &[&group, &table_ids, &keys],
            )
            .await?;
        for r in rows {
            let data: Option<Vec<u8>> = r.get(2);
            let buckets: String = r.get(3);
            let lookups: String = r.get(4);
            let current = CurrentRow {
                image: data.as_deref().and_then(row_codec::decode),
                buckets: serde_json::from_str(&buckets).map_err(|e| StorageError::Corrupt(format!("current_data.buckets: {e}")))?,
                lookups: serde_json::from_str(&lookups).map_err(|e| StorageError::Corrupt(format!("current_data.lookups: {e}")))?,
            };
            state.insert((r.get(0), r.get(1)), Some(current));
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
            RecordOp::Upsert {
                table,
                key,
                before_key,
                mut row,
                unchanged,
            } => {
                if let Some(before) = before_key.filter(|b| *b != key) {
                    let old = state.insert((table.id, before), None).flatten();
                    out.dirty.insert((table.id, before));
                    self.remove_all(&table, before, old.unwrap_or_default(), out);
                }
                let existing = state.get(&(table.id, key)).cloned().flatten().unwrap_or_default();
                let mut complete = true;
                for col in &unchanged {
                    match existing.image.as_ref().and_then(|img| img.get(col)) {
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
        let subkey = format!("{}/{}", table.id, key);
        let mut buckets: Vec<BucketRef> = Vec::new();
        let mut puts = Vec::new();
        for result in self.rules.evaluate_row(&table.name, &row) {
            match result {
                Ok(r) => {
                    let reference = (r.bucket.clone(), r.table.clone(), r.id.clone());
                    if let Some(pos) = buckets.iter().position(|b| *b == reference) {
                        buckets.remove(pos);
                        puts.remove(pos);
                    }
                    buckets.push(reference);
                    puts.push(r);
                }
                Err(e) => {
                    self.evaluation_errors += 1;
                    tracing::warn!(table = %table.name.name, error = %e, "row evaluation failed; row skipped for this query");
                }
            }
        }
        for r in puts {
            let checksum = checksum::put(&r.table, &r.id, &r.data);
            let op_id = self.alloc();
            out.buckets.insert(r.bucket.clone());
            out.ops.push(OpRow {
                bucket: r.bucket,
                op_id,
                op: OpType::Put,
                row_type: Some(r.table),
                row_id: Some(r.id),
                subkey: Some(subkey.clone()),
                data: Some(r.data),
                checksum,
            });
        }
        for old in existing.buckets.iter().filter(|b| !buckets.contains(b)) {
            self.push_remove(old, &subkey, out);
        }
        let mut lookups = Vec::new();
        for result in self.rules.evaluate_parameter_row(&table.name, &row) {
            match result {
                Ok(p) => {
                    let lookup = p.lookup.as_str().to_string();
                    let id = self.alloc();
                    out.lookups.insert(lookup.clone());
                    out.params.push((lookup.clone(), table.id, key, id, p.bucket_parameters));
                    lookups.push(lookup);
                }
                Err(e) => {
                    self.evaluation_errors += 1;
                    tracing::warn!(table = %table.name.name, error = %e, "parameter evaluation failed");
                }
            }
        }
        for old in existing.lookups.iter().filter(|l| !lookups.contains(l)) {
            self.push_tombstone(old, table.id, key, out);
        }
        CurrentRow {
            image: table.store_image.then_some(row),
            buckets,
            lookups,
        }
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
        let op_id = self.alloc();
        out.buckets.insert(bucket.clone());
        out.ops.push(OpRow {
            bucket: bucket.clone(),
            op_id,
            op: OpType::Remove,
            row_type: Some(row_type.clone()),
            row_id: Some(row_id.clone()),
            subkey: Some(subkey.to_string()),
            data: None,
            checksum: checksum::remove(subkey),
        });
    }

    fn push_tombstone(&mut self, lookup: &str, table_id: i64, key: Uuid, out: &mut FlushOutput) {
        let id = self.alloc();
        out.lookups.insert(lookup.to_string());
        out.params.push((lookup.to_string(), table_id, key, id, "[]".to_string()));
    }

    async fn write(&mut self, state: HashMap<RowKey, Option<CurrentRow>>, out: FlushOutput) -> Result<(), StorageError> {
        let group = self.stream.id as i32;
        let persisted = self.next_op - 1;
        let progress = self.progress.take();
        let tx = self.client.transaction().await?;
        if !out.ops.is_empty() {
            let sink = tx
                .copy_in(
                    "COPY ferrosync.bucket_data (group_id, bucket, op_id, op, row_type, row_id, subkey, data, checksum) FROM STDIN BINARY",
                )
                .await?;
            let types = [
                Type::INT4,
                Type::TEXT,
                Type::INT8,
                Type::INT2,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::INT8,
            ];
            let writer = BinaryCopyInWriter::new(sink, &types);
            futures::pin_mut!(writer);
            for op in &out.ops {
                let checksum = i64::from(op.checksum);
                let kind = op.op as i16;
                writer
                    .as_mut()
                    .write(&[
                        &group,
                        &op.bucket,
                        &op.op_id,
                        &kind,
                        &op.row_type,
                        &op.row_id,
                        &op.subkey,
                        &op.data,
                        &checksum,
                    ])
                    .await?;
            }
            writer.finish().await?;
        }
        if !out.params.is_empty() {
            let sink = tx
                .copy_in("COPY ferrosync.bucket_parameters (group_id, lookup, table_id, key, id, bucket_parameters) FROM STDIN BINARY")
                .await?;
            let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::TEXT, Type::INT8, Type::UUID, Type::INT8, Type::TEXT]);
            futures::pin_mut!(writer);
            for (lookup, table_id, key, id, params) in &out.params {
                writer.as_mut().write(&[&group, lookup, table_id, key, id, params]).await?;
            }
            writer.finish().await?;
        }
        let (mut up_tables, mut up_keys, mut up_data, mut up_buckets, mut up_lookups) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut del_tables, mut del_keys) = (vec![], vec![]);
        for key in &out.dirty {
            match state.get(key) {
                Some(Some(row)) => {
                    up_tables.push(key.0);
                    up_keys.push(key.1);
                    up_data.push(row.image.as_ref().map(row_codec::encode));
                    up_buckets.push(serde_json::to_string(&row.buckets).unwrap_or_else(|_| "[]".into()));
                    up_lookups.push(serde_json::to_string(&row.lookups).unwrap_or_else(|_| "[]".into()));
                }
                _ => {
                    del_tables.push(key.0);
                    del_keys.push(key.1);
                }
            }
        }
        if self.snapshot {
            copy_current(&tx, group, &up_tables, &up_keys, &up_data, &up_buckets, &up_lookups).await?;
        } else if !up_keys.is_empty() {
            tx.execute(
                "INSERT INTO ferrosync.current_data (group_id, table_id, key, data, buckets, lookups)
                 SELECT $1, * FROM unnest($2::int8[], $3::uuid[], $4::bytea[], $5::text[], $6::text[])
                 ON CONFLICT (group_id, table_id, key) DO UPDATE SET data = excluded.data, buckets = excluded.buckets, lookups = excluded.lookups",
                &[&group, &up_tables, &up_keys, &up_data, &up_buckets, &up_lookups],
            )
            .await?;
        }
        if !del_keys.is_empty() {
            tx.execute(
                "DELETE FROM ferrosync.current_data c USING unnest($2::int8[], $3::uuid[]) AS k(table_id, key)
                 WHERE c.group_id = $1 AND c.table_id = k.table_id AND c.key = k.key",
                &[&group, &del_tables, &del_keys],
            )
            .await?;
        }
        if !out.buckets.is_empty() || !out.lookups.is_empty() {
            let buckets: Vec<&String> = out.buckets.iter().collect();
            let lookups: Vec<&String> = out.lookups.iter().collect();
            tx.execute(
                "INSERT INTO ferrosync.bucket_changes (group_id, max_op_id, buckets, lookups) VALUES ($1, $2, $3, $4)",
                &[&group, &persisted, &buckets, &lookups],
            )
            .await?;
        }
        tx.execute(
            "UPDATE ferrosync.sync_rules SET persisted_op = $2 WHERE id = $1",
            &[&self.stream.id, &persisted],
        )
        .await?;
        write_progress(&tx, progress).await?;
        tx.commit().await?;
        self.stream.persisted_op = persisted;
        Ok(())
    }

    /// Remove every row of `table` (TRUNCATE, or a table whose identity changed).
    pub async fn truncate(&mut self, table: Arc<TableHandle>) -> Result<(), StorageError> {
        self.flush().await?;
        loop {
            let rows = self
                .client
                .query(
                    "SELECT key FROM ferrosync.current_data WHERE group_id = $1 AND table_id = $2 LIMIT 5000",
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
            self.flush().await?;
        }
    }

    /// Source transaction boundary at `lsn` (or a keepalive marker when `force`): make flushed
    /// ops visible as a checkpoint, unless blocked by an unfinished snapshot.
    pub async fn commit(&mut self, lsn: u64, force: bool) -> Result<Option<Checkpoint>, StorageError> {
        self.flush().await?;
        let has_new = self.stream.persisted_op > self.stream.checkpoint.op_id;
        if !has_new && !force {
            return Ok(None);
        }
        let s = &self.stream;
        if !s.snapshot_done || lsn < s.no_checkpoint_before || lsn < s.checkpoint.lsn {
            return Ok(None);
        }
        let checkpoint = Checkpoint {
            op_id: s.persisted_op.max(s.checkpoint.op_id),
            lsn,
        };
        let lsn_text = lsn_to_text(lsn);
        let tx = self.client.transaction().await?;
        tx.execute(
            "UPDATE ferrosync.sync_rules SET last_checkpoint = $2, last_checkpoint_lsn = $3::text::pg_lsn WHERE id = $1",
            &[&s.id, &checkpoint.op_id, &lsn_text],
        )
        .await?;
        if s.state == StreamState::Processing {
            tx.execute(
                "UPDATE ferrosync.sync_rules SET state = 'STOP' WHERE state = 'ACTIVE' AND id <> $1",
                &[&s.id],
            )
            .await?;
            tx.execute("UPDATE ferrosync.sync_rules SET state = 'ACTIVE' WHERE id = $1", &[&s.id])
                .await?;
        }
        let payload = format!("{}:{}:{}", s.id, checkpoint.op_id, lsn_text);
        tx.execute("SELECT pg_notify($1, $2)", &[&CHECKPOINT_CHANNEL, &payload]).await?;
        tx.commit().await?;
        if self.stream.state == StreamState::Processing {
            tracing::info!(stream = s.id, "replication stream is now ACTIVE");
            self.stream.state = StreamState::Active;
        }
        self.stream.checkpoint = checkpoint;
        Ok(Some(checkpoint))
    }

    /// Checkpoints stay blocked until the stream passes `lsn` (the WAL position after a table copy).
    pub async fn block_checkpoints_until(&mut self, lsn: u64) -> Result<(), StorageError> {
        self.stream.no_checkpoint_before = self.stream.no_checkpoint_before.max(lsn);
        self.client
            .execute(
                "UPDATE ferrosync.sync_rules SET no_checkpoint_before = $2::text::pg_lsn WHERE id = $1",
                &[&self.stream.id, &lsn_to_text(self.stream.no_checkpoint_before)],
            )
            .await?;
        Ok(())
    }

    /// All tables are copied: checkpoints may be created once the stream passes `lsn`.
    pub async fn mark_snapshot_done(&mut self, lsn: u64) -> Result<(), StorageError> {
        self.flush().await?;
        self.block_checkpoints_until(lsn).await?;
        self.client
            .execute(
                "UPDATE ferrosync.sync_rules SET snapshot_done = true WHERE id = $1",
                &[&self.stream.id],
            )
            .await?;
        self.stream.snapshot_done = true;
        Ok(())
    }
}

async fn write_progress(client: &impl tokio_postgres::GenericClient, progress: Option<TableProgress>) -> Result<(), StorageError> {
    match progress {
        Some(p) => crate::streams::save_table_progress(client, p.table_id, p.last_key.as_deref(), p.rows, p.done).await,
        None => Ok(()),
    }
}

/// New rows' current state, by binary COPY (snapshot chunks hold only rows storage lacks).
async fn copy_current(
    tx: &tokio_postgres::Transaction<'_>,
    group: i32,
    tables: &[i64],
    keys: &[Uuid],
    data: &[Option<Vec<u8>>],
    buckets: &[String],
    lookups: &[String],
) -> Result<(), StorageError> {
    if keys.is_empty() {
        return Ok(());
    }
    let sink = tx
        .copy_in("COPY ferrosync.current_data (group_id, table_id, key, data, buckets, lookups) FROM STDIN BINARY")
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::INT8, Type::UUID, Type::BYTEA, Type::TEXT, Type::TEXT]);
    futures::pin_mut!(writer);
    for i in 0..keys.len() {
        writer
            .as_mut()
            .write(&[&group, &tables[i], &keys[i], &data[i], &buckets[i], &lookups[i]])
            .await?;
    }
    writer.finish().await?;
    Ok(())
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
