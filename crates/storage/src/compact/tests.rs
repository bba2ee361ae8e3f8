//! Property test of compaction against simulated clients that apply ops as the PowerSync
//! client does (protocol spec §5.2). A seeded random loop rather than proptest: no new
//! dependency, and a failing seed is printed and replays exactly.

use super::*;
use std::collections::BTreeMap;

/// xorshift64*: deterministic per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const BUCKETS: usize = 3;
const ROWS: usize = 4;

/// What a client holds of one bucket: live PUTs by row key, and the two checksum halves.
#[derive(Default, Clone, Debug, PartialEq)]
pub(crate) struct ClientBucket {
    rows: BTreeMap<(String, String, String), (i64, String, u32)>,
    add_checksum: u32,
    pub(crate) position: i64,
    /// The newest checkpoint it downloaded for: checkpoints never go back for a client.
    /// (One served by a process whose hub lags behind another's could: as in the reference,
    /// `target_op` only guards the ops of the current download.)
    read_at: i64,
}

impl ClientBucket {
    pub(crate) fn apply(&mut self, op: &OplogEntry) {
        match op.op {
            OpType::Put | OpType::Remove => {
                let key = (
                    op.object_type.clone().unwrap_or_default(),
                    op.object_id.clone().unwrap_or_default(),
                    op.subkey.clone().unwrap_or_default(),
                );
                if let Some((_, _, old)) = self.rows.remove(&key) {
                    self.add_checksum = self.add_checksum.wrapping_add(old);
                }
                match (&op.op, &op.data) {
                    (OpType::Put, Some(data)) => {
                        self.rows.insert(key, (op.op_id, data.clone(), op.checksum));
                    }
                    _ => self.add_checksum = self.add_checksum.wrapping_add(op.checksum),
                }
            }
            OpType::Move => self.add_checksum = self.add_checksum.wrapping_add(op.checksum),
            OpType::Clear => {
                self.rows.clear();
                self.add_checksum = op.checksum;
            }
        }
        self.position = op.op_id;
    }

    pub(crate) fn checksum(&self) -> u32 {
        self.rows.values().fold(self.add_checksum, |sum, (_, _, c)| sum.wrapping_add(*c))
    }

    pub(crate) fn data(&self) -> BTreeMap<(String, String, String), String> {
        self.rows.iter().map(|(k, (_, d, _))| (k.clone(), d.clone())).collect()
    }
}

/// What a client receives reading `after < op_id <= checkpoint`, and the highest
/// `target_op` of the chunks read: the rules of `bucket_data`.
fn read(chunks: &[Chunk], after: i64, checkpoint: i64) -> (Vec<OplogEntry>, i64) {
    let mut ops = Vec::new();
    let mut target = 0;
    for chunk in chunks.iter().filter(|c| c.last_op > after && c.first_op <= checkpoint) {
        target = target.max(chunk.target_op);
        ops.extend(chunk.ops.iter().filter(|op| op.op_id > after && op.op_id <= checkpoint).cloned());
    }
    (ops, target)
}

struct World {
    rng: Rng,
    next_op: i64,
    /// Every op ever written, per bucket (the uncompacted history).
    original: Vec<Vec<OplogEntry>>,
    stored: Vec<Vec<Chunk>>,
    checkpoints: Vec<i64>,
    /// The hub's compaction floor: the highest `target_op` any read met. No checkpoint below
    /// it completes, so a client that met a rewritten op (in this download or an earlier
    /// one) never completes a checkpoint that op cannot reproduce.
    floor: i64,
}

impl World {
    fn new(seed: u64) -> World {
        World {
            rng: Rng(seed | 1),
            next_op: 1,
            original: vec![Vec::new(); BUCKETS],
            stored: vec![Vec::new(); BUCKETS],
            checkpoints: vec![0],
            floor: 0,
        }
    }

    /// One flush of a few row changes, then a checkpoint.
    fn write(&mut self) {
        let mut per_bucket: Vec<Vec<OplogEntry>> = vec![Vec::new(); BUCKETS];
        for _ in 0..1 + self.rng.below(6) {
            let bucket = self.rng.below(BUCKETS);
            let row = self.rng.below(ROWS);
            let op_id = self.next_op;
            self.next_op += 1;
            // Two source rows (subkeys) may share an object id.
            let subkey = format!("t/{}", row % 3);
            let object_id = format!("r{}", row / 2);
            let op = if self.rng.chance(70) {
                let data = format!("{{\"v\":{}}}", self.rng.below(1000));
                OplogEntry {
                    op_id,
                    op: OpType::Put,
                    checksum: crate::checksum::put("t", &object_id, &data),
                    object_type: Some("t".into()),
                    object_id: Some(object_id),
                    subkey: Some(subkey),
                    data: Some(data),
                }
            } else {
                OplogEntry {
                    op_id,
                    op: OpType::Remove,
                    checksum: crate::checksum::remove(&subkey),
                    object_type: Some("t".into()),
                    object_id: Some(object_id),
                    subkey: Some(subkey),
                    data: None,
                }
            };
            per_bucket[bucket].push(op);
        }
        for (bucket, ops) in per_bucket.into_iter().enumerate() {
            self.original[bucket].extend(ops.iter().cloned());
            self.stored[bucket].extend(Chunk::of(ops, 0));
        }
        self.checkpoints.push(self.next_op - 1);
    }

    /// Compact every bucket up to the latest checkpoint as the compactor does: newest chunks
    /// first in pages (each page repacked), then the leading run folded page by page.
    fn compact(&mut self) {
        let horizon = *self.checkpoints.last().unwrap_or(&0);
        let page = 1 + self.rng.below(4);
        for chunks in &mut self.stored {
            let split = chunks.partition_point(|c| c.last_op <= horizon);
            let newer = chunks.split_off(split);
            let mut supersede = Supersede::default();
            let mut done: Vec<Chunk> = Vec::new();
            while !chunks.is_empty() {
                let from = chunks.len().saturating_sub(page);
                let mut taken = chunks.split_off(from);
                for chunk in taken.iter_mut().rev() {
                    supersede.rewrite(chunk);
                }
                let mut repacked = repack(taken);
                repacked.append(&mut done);
                done = repacked;
            }
            *chunks = done;
            while let Some(fold) = fold_leading(&chunks[..chunks.len().min(page + 1)]) {
                let again = fold.rest.is_none();
                let mut next = vec![fold.clear];
                next.extend(fold.rest);
                next.extend(chunks.drain(..).skip(fold.replaced + usize::from(!again)));
                *chunks = next;
                if !again {
                    break;
                }
            }
            chunks.extend(newer);
        }
    }

    fn original_state(&self, bucket: usize, checkpoint: i64) -> ClientBucket {
        let mut state = ClientBucket::default();
        for op in self.original[bucket].iter().filter(|op| op.op_id <= checkpoint) {
            state.apply(op);
        }
        state
    }
}

/// One client's download of one bucket, one step: a prefix of what it lacks at some
/// checkpoint; when it got everything, the checkpoint completes (unless invalidated).
fn client_step(world: &mut World, client: &mut ClientBucket, bucket: usize, seed: u64) {
    let latest = world.checkpoints.len() - 1;
    // Mostly the latest checkpoint; sometimes an older one (a hub that lags behind).
    let oldest = client.position.max(client.read_at);
    let usable: Vec<i64> = world.checkpoints.iter().copied().filter(|c| *c >= oldest).collect();
    let checkpoint = if world.rng.chance(75) || usable.is_empty() {
        world.checkpoints[latest]
    } else {
        usable[world.rng.below(usable.len())]
    };
    let (ops, target) = read(&world.stored[bucket], client.position, checkpoint);
    world.floor = world.floor.max(target);
    client.read_at = checkpoint;
    let take = if world.rng.chance(50) {
        ops.len()
    } else {
        world.rng.below(ops.len() + 1)
    };
    for op in &ops[..take] {
        assert!(op.op_id > client.position, "seed {seed}: op {} sent twice", op.op_id);
        client.apply(op);
    }
    if take < ops.len() || checkpoint < world.floor {
        return;
    }
    client.position = checkpoint;
    let expected = world.original_state(bucket, checkpoint);
    assert_eq!(client.checksum(), expected.checksum(), "seed {seed}: checksum at {checkpoint}");
    assert_eq!(client.data(), expected.data(), "seed {seed}: rows at {checkpoint}");
}

#[test]
fn clients_converge_whatever_they_downloaded_before_compaction() {
    for seed in 1..=400u64 {
        let mut world = World::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut clients: Vec<Vec<ClientBucket>> = vec![vec![ClientBucket::default(); BUCKETS]; 3];
        for _ in 0..120 {
            match world.rng.below(10) {
                0..=4 => world.write(),
                5 => world.compact(),
                _ => {
                    let (c, b) = (world.rng.below(clients.len()), world.rng.below(BUCKETS));
                    client_step(&mut world, &mut clients[c][b], b, seed);
                }
            }
        }
        world.compact();
        let latest = *world.checkpoints.last().unwrap_or(&0);
        for (bucket, original) in world.original.iter().enumerate() {
            let stored: Vec<&OplogEntry> = world.stored[bucket].iter().flat_map(|c| &c.ops).collect();
            let sum = |ops: &mut dyn Iterator<Item = &OplogEntry>| ops.fold(0u32, |s, op| s.wrapping_add(op.checksum));
            assert_eq!(
                sum(&mut stored.iter().copied()),
                sum(&mut original.iter()),
                "seed {seed}: bucket checksum changed"
            );
            assert!(stored.len() <= original.len());
        }
        // Every client, and a fresh one, finishes at the latest checkpoint.
        clients.push(vec![ClientBucket::default(); BUCKETS]);
        for client in &mut clients {
            for (bucket, state) in client.iter_mut().enumerate() {
                let (ops, target) = read(&world.stored[bucket], state.position, latest);
                assert!(target <= latest, "seed {seed}: the latest checkpoint is never invalidated");
                ops.iter().for_each(|op| state.apply(op));
                let expected = world.original_state(bucket, latest);
                assert_eq!(state.checksum(), expected.checksum(), "seed {seed}: final checksum");
                assert_eq!(state.data(), expected.data(), "seed {seed}: final rows");
            }
        }
    }
}

fn put(op_id: i64, row: &str) -> OplogEntry {
    OplogEntry {
        op_id,
        op: OpType::Put,
        object_type: Some("t".into()),
        object_id: Some(row.into()),
        subkey: Some(row.into()),
        data: Some("{}".into()),
        checksum: op_id as u32,
    }
}

#[test]
fn updates_of_the_same_rows_fold_into_one_clear_before_the_live_rows() {
    // 10 rounds of updates to 3 rows, one op per chunk (one source transaction each).
    let chunks: Vec<Chunk> = (1..=30)
        .filter_map(|i| Chunk::of(vec![put(i, &format!("r{}", i % 3))], 0))
        .collect();
    let mut supersede = Supersede::default();
    let mut rewritten: Vec<Chunk> = chunks.into_iter().rev().collect();
    let moved: usize = rewritten.iter_mut().map(|c| supersede.rewrite(c)).sum();
    assert_eq!(moved, 27);
    rewritten.reverse();
    let repacked = repack(rewritten);
    assert_eq!(repacked.len(), 1, "30 one-op chunks fit in one");
    assert_eq!(repacked[0].target_op, 30);
    let fold = fold_leading(&repacked).expect("27 MOVEs lead");
    assert_eq!((fold.clear.last_op, fold.clear.first_op, fold.replaced), (27, 1, 0));
    assert_eq!(fold.clear.ops[0].checksum, (1..=27).sum::<i64>() as u32);
    let rest = fold.rest.expect("the live rows");
    assert_eq!(rest.ops.iter().map(|o| o.op_id).collect::<Vec<_>>(), vec![28, 29, 30]);
    assert!(fold_leading(&[fold.clear, rest]).is_none(), "nothing more to fold");
}
