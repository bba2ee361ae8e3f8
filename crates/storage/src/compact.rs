//! Compaction of one bucket's history, on decoded chunks (protocol spec §6.3): an op superseded
//! by a later PUT/REMOVE of the same row becomes a MOVE (same op_id and checksum, no data), and
//! the leading run of REMOVE/MOVE/CLEAR ops folds into one CLEAR (op_id of the last folded op,
//! checksum their wrapping sum). A bucket's checksum never changes.
//!
//! A client downloading a checkpoint older than a superseding op may receive the MOVE without
//! the op that makes it right: every rewritten chunk remembers the newest superseding op as
//! `target_op`, and the sync layer withholds `checkpoint_complete` for checkpoints below it.
//! The database side is in [`crate::compactor`].

use crate::model::{OpType, OplogEntry};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// Most ops in a chunk written by compaction (as the writer's [`crate::write_task`] chunks).
pub const CHUNK_OPS: usize = 256;

/// One stored chunk, decoded.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The first op's op_id; for a CLEAR chunk, where the range it folded began.
    pub first_op: i64,
    pub last_op: i64,
    pub target_op: i64,
    pub clear: bool,
    pub ops: Vec<OplogEntry>,
}

impl Chunk {
    /// A chunk of ordinary ops (ascending, not empty).
    pub fn of(ops: Vec<OplogEntry>, target_op: i64) -> Option<Chunk> {
        Some(Chunk {
            first_op: ops.first()?.op_id,
            last_op: ops.last()?.op_id,
            target_op,
            clear: false,
            ops,
        })
    }

    pub fn checksum(&self) -> u32 {
        crate::chunk::checksum_sum(self.ops.iter())
    }
}

/// A 128-bit digest of a row key `(object_type, object_id, subkey)`: a set of a million keys
/// stays small, and a collision (which would drop a live row) is out of reach.
type RowKey = [u8; 16];

fn row_key(op: &OplogEntry) -> RowKey {
    let mut h = Sha256::new();
    for part in [&op.object_type, &op.object_id, &op.subkey] {
        match part {
            Some(s) => {
                h.update((s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            None => h.update(u64::MAX.to_le_bytes()),
        }
    }
    let d = h.finalize();
    let mut key = [0; 16];
    key.copy_from_slice(&d[..16]);
    key
}

/// The newest-to-oldest pass: remembers each row's latest op.
#[derive(Default)]
pub struct Supersede {
    latest: HashMap<RowKey, i64>,
}

impl Supersede {
    /// Rewrite the ops of `chunk` that a later op (seen in this chunk or in chunks passed
    /// earlier, which must be newer) supersedes; returns how many were rewritten.
    pub fn rewrite(&mut self, chunk: &mut Chunk) -> usize {
        let mut rewritten = 0;
        for op in chunk.ops.iter_mut().rev() {
            if !matches!(op.op, OpType::Put | OpType::Remove) {
                continue;
            }
            match self.latest.entry(row_key(op)) {
                std::collections::hash_map::Entry::Occupied(newer) => {
                    chunk.target_op = chunk.target_op.max(*newer.get());
                    *op = moved(op);
                    rewritten += 1;
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(op.op_id);
                }
            }
        }
        rewritten
    }
}

fn moved(op: &OplogEntry) -> OplogEntry {
    OplogEntry {
        op_id: op.op_id,
        op: OpType::Move,
        object_type: None,
        object_id: None,
        subkey: None,
        data: None,
        checksum: op.checksum,
    }
}

/// Re-pack consecutive chunks (ascending) into as few as possible of at most [`CHUNK_OPS`] ops:
/// after a rewrite most ops are small MOVEs, and one-op chunks (one per source transaction)
/// cost more in row and index overhead than their ops. CLEAR chunks stay as they are.
pub fn repack(chunks: Vec<Chunk>) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut ops = Vec::new();
    let mut target = 0;
    let flush = |ops: &mut Vec<OplogEntry>, target: &mut i64, out: &mut Vec<Chunk>| {
        out.extend(Chunk::of(std::mem::take(ops), *target));
        *target = 0;
    };
    for chunk in chunks {
        if chunk.clear {
            flush(&mut ops, &mut target, &mut out);
            out.push(chunk);
            continue;
        }
        for op in chunk.ops {
            ops.push(op);
            target = target.max(chunk.target_op);
            if ops.len() == CHUNK_OPS {
                flush(&mut ops, &mut target, &mut out);
            }
        }
    }
    flush(&mut ops, &mut target, &mut out);
    out
}

/// The result of folding a bucket's leading run.
#[derive(Debug)]
pub struct Fold {
    /// The new CLEAR chunk.
    pub clear: Chunk,
    /// How many of the given chunks it replaces entirely.
    pub replaced: usize,
    /// What is left of the next chunk, when the run ended inside it.
    pub rest: Option<Chunk>,
}

/// Fold the leading REMOVE/MOVE/CLEAR run of `chunks` (a bucket's oldest chunks, ascending)
/// into one CLEAR. `None` when there is nothing to gain (fewer than two ops in the run).
pub fn fold_leading(chunks: &[Chunk]) -> Option<Fold> {
    let mut folded = 0usize;
    let mut checksum = 0u32;
    let mut target = 0i64;
    let mut last = None;
    let mut replaced = 0;
    let mut rest = None;
    for chunk in chunks {
        let run = chunk.ops.iter().take_while(|op| op.op != OpType::Put).count();
        for op in &chunk.ops[..run] {
            checksum = checksum.wrapping_add(op.checksum);
            last = Some(op.op_id);
        }
        folded += run;
        if run > 0 {
            target = target.max(chunk.target_op);
        }
        if run < chunk.ops.len() {
            if run > 0 {
                rest = Chunk::of(chunk.ops[run..].to_vec(), chunk.target_op);
            }
            break;
        }
        replaced += 1;
    }
    let last = last?;
    if folded < 2 {
        return None;
    }
    let first_op = chunks.first().map_or(last, |c| c.first_op);
    Some(Fold {
        clear: Chunk {
            first_op,
            last_op: last,
            // A client at a checkpoint below the CLEAR gets neither it nor the ops it folded.
            target_op: target.max(last),
            clear: true,
            ops: vec![OplogEntry {
                op_id: last,
                op: OpType::Clear,
                object_type: None,
                object_id: None,
                subkey: None,
                data: None,
                checksum,
            }],
        },
        replaced,
        rest,
    })
}

#[cfg(test)]
pub(crate) mod tests;
