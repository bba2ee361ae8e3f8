//! Applying a flush's row changes: each record is evaluated with the sync config into PUT and
//! REMOVE ops, parameter rows and tombstones, and the rows' new current state, which `batch`
//! turns into a write-task batch.

use super::{BucketRef, BucketWriter, CurrentRow, FlushOutput, RecordOp, RowKey, TableHandle};
use crate::checksum;
use crate::model::{OpType, OplogEntry};
use crate::pack::{ParamRow, Unpack};
use crate::row_codec;
use crate::write_task::{Batch, CurrentRecord, OpRow};
use ferrosync_rules::{Row, SyncRules};
use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use uuid::Uuid;

impl BucketWriter {
    fn alloc(&mut self) -> i64 {
        let id = self.next_op;
        self.next_op += 1;
        id
    }

    pub(super) fn apply(&mut self, op: RecordOp, state: &mut HashMap<RowKey, Option<CurrentRow>>, out: &mut FlushOutput) {
        match op {
            RecordOp::Delete { table, key } => {
                let mut existing = state.insert((table.id, key), None).flatten().unwrap_or_default();
                out.dirty.insert((table.id, key));
                self.unpack(table.id, key, &mut existing, out);
                self.remove_all(&table, key, existing, out);
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
                    self.unpack(table.id, before, &mut old, out);
                    moved_image = old.image.take();
                    self.remove_all(&table, before, old, out);
                }
                let mut existing = state.get(&(table.id, key)).cloned().flatten().unwrap_or_default();
                self.unpack(table.id, key, &mut existing, out);
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
            packed: None,
        }
    }

    /// [`RecordOp::Backfill`]: like `evaluate`, for the deploy's new definitions only; the
    /// row's other buckets and lookups (and its image, which may be newer) stay as they are.
    fn backfill(&mut self, table: &TableHandle, key: Uuid, row: Row, mut existing: CurrentRow, out: &mut FlushOutput) -> CurrentRow {
        let Some(rules) = self.backfill.clone() else {
            return existing;
        };
        // Packed entries are of the served definitions, which a backfill leaves alone: the row
        // stays packed unless (say, after a retried deploy) it has entries the backfill replaces.
        if existing.lookups.iter().any(|l| rules.owns_lookup(l)) {
            self.unpack(table.id, key, &mut existing, out);
        }
        let packed = existing.packed;
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
            packed,
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
        let subkey = subkey(table.id, key);
        let puts = self.puts(rules, table, row);
        let buckets: Vec<BucketRef> = puts.iter().map(|r| (r.bucket.clone(), r.table.clone(), r.id.clone())).collect();
        self.push_puts(puts, &subkey, out);
        for old in previous.iter().filter(|b| !buckets.contains(b)) {
            self.push_remove(old, &subkey, out);
        }
        let first = self.push_lookups(rules, table, key, row, &mut out.params);
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
        let subkey = subkey(table.id, key);
        let puts = self.puts(&rules, table, &row);
        let buckets = row_codec::encode_strings(puts.iter().flat_map(|r| [r.bucket.as_str(), r.table.as_str(), r.id.as_str()]));
        self.push_puts(puts, &subkey, out);
        // Its entries go into the batch's packs: the row is new, so none supersedes another.
        let first = self.push_lookups(&rules, table, key, &row, &mut out.packed);
        let lookups = row_codec::encode_strings(out.packed[first..].iter().map(|p| p.0.as_str()));
        let pack_id = out.packed.get(first).map(|p| *out.pack_id.get_or_insert(p.3));
        out.copied.push(CurrentRecord {
            table_id: table.id,
            key,
            data: (table.store_image && may_be_toasted(&row)).then(|| row_codec::encode(&row)),
            buckets,
            lookups,
            pack_id,
        });
    }

    /// A row that changes leaves its pack: its entries move out (with their ids, see
    /// [`crate::pack`]) in this batch, before the change's own parameter rows are written.
    fn unpack(&mut self, table_id: i64, key: Uuid, row: &mut CurrentRow, out: &mut FlushOutput) {
        let Some(pack_id) = row.packed.take() else {
            return;
        };
        for lookup in row.lookups.iter().filter(|l| self.rules.owns_lookup(l)) {
            out.unpacks.push(Unpack {
                lookup: lookup.clone(),
                table_id,
                pack_id,
                key,
            });
        }
    }

    /// The row's PUTs with `rules`, one per (bucket, output table, id): a later result for
    /// the same one replaces the earlier.
    fn puts(&mut self, rules: &SyncRules, table: &TableHandle, row: &Row) -> Vec<ferrosync_rules::EvaluatedRow> {
        let mut results = std::mem::take(&mut self.results);
        rules.evaluate_row_into(&table.name, row, &mut results);
        let mut puts: Vec<ferrosync_rules::EvaluatedRow> = Vec::with_capacity(results.len());
        for result in results.drain(..) {
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
        self.results = results;
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

    /// Parameter rows for the row's lookups with `rules`, pushed to `into`; returns where they
    /// start there.
    fn push_lookups(&mut self, rules: &SyncRules, table: &TableHandle, key: Uuid, row: &Row, into: &mut Vec<ParamRow>) -> usize {
        let first = into.len();
        for result in rules.evaluate_parameter_row(&table.name, row) {
            match result {
                Ok(p) => {
                    let id = self.alloc();
                    into.push((p.lookup.as_str().to_string(), table.id, key, id, p.bucket_parameters));
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
        let subkey = subkey(table.id, key);
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
    pub(super) fn batch(&mut self, mut state: HashMap<RowKey, Option<CurrentRow>>, existed: &HashSet<RowKey>, out: FlushOutput) -> Batch {
        // The write that will carry this batch (see `write`).
        self.write_seq += 1;
        let mut batch = Batch {
            chunks: crate::chunk::Chunks::encode(out.ops),
            params: out.params,
            packs: out.pack_id.map(|id| crate::pack::pack(out.packed, id)).unwrap_or_default(),
            unpacks: out.unpacks,
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
                        pack_id: row.packed,
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

/// A row's subkey, `table_id/key`: made for every row a batch evaluates, so without the
/// formatting machinery.
fn subkey(table_id: i64, key: Uuid) -> String {
    let mut uuid = Uuid::encode_buffer();
    let uuid = key.hyphenated().encode_lower(&mut uuid);
    let mut out = String::with_capacity(21 + uuid.len());
    let _ = write!(out, "{table_id}/");
    out.push_str(uuid);
    out
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
