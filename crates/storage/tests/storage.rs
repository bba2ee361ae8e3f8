//! Storage integration tests against a throwaway Postgres: op chunks read back exactly, for
//! any client position, checkpoint and read size, and checksums match the ops.

use anyhow::Result;
use ferrosync_storage::{chunk, BucketChecksum, OpType, OplogEntry, PgStorage, SyncStorage};
use ferrosync_testkit::{PgCluster, PgOptions};
use std::collections::HashMap;

/// Deterministic xorshift, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const BUCKETS: [&str; 3] = ["a", "b", "c"];

fn op(op_id: i64, rng: &mut Rng) -> OplogEntry {
    OplogEntry {
        op_id,
        op: OpType::Put,
        object_type: Some("t".into()),
        object_id: Some(format!("row{}", rng.below(50))),
        subkey: Some(format!("1/{op_id}")),
        data: Some(format!("{{\"n\":{op_id}}}")),
        checksum: rng.below(u64::from(u32::MAX)) as u32,
    }
}

/// Write ops 1..=total spread over the buckets, in chunks of random size (as flushes would).
async fn seed(db: &tokio_postgres::Client, total: i64, rng: &mut Rng) -> Result<HashMap<&'static str, Vec<OplogEntry>>> {
    let mut model: HashMap<&str, Vec<OplogEntry>> = HashMap::new();
    let mut pending: HashMap<&str, Vec<OplogEntry>> = HashMap::new();
    for op_id in 1..=total {
        let bucket = BUCKETS[rng.below(BUCKETS.len() as u64) as usize];
        let entry = op(op_id, rng);
        model.entry(bucket).or_default().push(entry.clone());
        pending.entry(bucket).or_default().push(entry);
        if rng.below(40) == 0 || op_id == total {
            for (bucket, ops) in pending.drain() {
                let checksum = ops.iter().fold(0u32, |s, o| s.wrapping_add(o.checksum));
                db.execute(
                    "INSERT INTO ferrosync.op_chunks (group_id, bucket, last_op, first_op, op_count, checksum, ops) VALUES (1, $1, $2, $3, $4, $5, $6)",
                    &[&bucket, &ops[ops.len() - 1].op_id, &ops[0].op_id, &(ops.len() as i32), &i64::from(checksum), &chunk::encode(ops.iter())],
                )
                .await?;
            }
        }
    }
    Ok(model)
}

/// Read like a sync connection does: continue from the last op returned while `more`.
async fn read_all(storage: &PgStorage, checkpoint: i64, afters: &[(String, i64)], limit: usize) -> Result<HashMap<String, Vec<i64>>> {
    let mut got: HashMap<String, Vec<i64>> = HashMap::new();
    let mut requests = afters.to_vec();
    loop {
        let batch = storage.bucket_data(1, checkpoint, &requests, limit).await?;
        for (bucket, op) in &batch.ops {
            got.entry(bucket.clone()).or_default().push(op.op_id);
        }
        let Some((bucket, after)) = batch.resume else { return Ok(got) };
        let pos = requests.iter().position(|(b, _)| *b == bucket).unwrap_or(0);
        requests.drain(..pos);
        requests[0].1 = after;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op_chunks_read_back_exactly() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    cluster.create_database("storage").await?;
    let db = cluster.connect("storage").await?;
    ferrosync_storage::schema::migrate(&db).await?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Enough chunks per bucket (~750) that one read hits the per-bucket chunk cap.
    let total = 30_000;
    let model = seed(&db, total, &mut rng).await?;
    let storage = PgStorage::connect(&ferrosync_storage::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?, 1).await?;
    for case in 0..25 {
        let checkpoint = 1 + rng.below(total as u64 + 20) as i64;
        let limit = [1, 7, 100, 1000, 5000][case % 5];
        let afters: Vec<(String, i64)> = BUCKETS
            .iter()
            .map(|b| (b.to_string(), rng.below(checkpoint as u64 + 1) as i64))
            .collect();
        let got = read_all(&storage, checkpoint, &afters, limit).await?;
        for (bucket, after) in &afters {
            let expected: Vec<i64> = model[bucket.as_str()]
                .iter()
                .map(|o| o.op_id)
                .filter(|id| id > after && *id <= checkpoint)
                .collect();
            let actual = got.get(bucket).cloned().unwrap_or_default();
            assert_eq!(
                actual, expected,
                "bucket {bucket}, after {after}, checkpoint {checkpoint}, limit {limit}"
            );
        }
        let after = rng.below(checkpoint as u64) as i64;
        let names: Vec<String> = BUCKETS.iter().map(|b| b.to_string()).collect();
        let sums = storage.checksums(1, after, checkpoint, &names).await?;
        for bucket in BUCKETS {
            let in_range = model[bucket].iter().filter(|o| o.op_id > after && o.op_id <= checkpoint);
            let expected = in_range.fold(BucketChecksum::default(), |c, o| BucketChecksum {
                checksum: c.checksum.wrapping_add(o.checksum),
                count: c.count + 1,
            });
            let actual = sums.get(bucket).copied().unwrap_or_default();
            assert_eq!(actual, expected, "checksum of {bucket} over ({after}, {checkpoint}]");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_large_rows_stop_at_a_byte_budget() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    cluster.create_database("storage").await?;
    let db = cluster.connect("storage").await?;
    ferrosync_storage::schema::migrate(&db).await?;
    // 60 rows of 300 KB (18 MB) in chunks of 5.
    let ops: Vec<OplogEntry> = (1..=60)
        .map(|op_id| OplogEntry {
            data: Some("x".repeat(300 * 1024)),
            ..op(op_id, &mut Rng(op_id as u64))
        })
        .collect();
    for chunk_ops in ops.chunks(5) {
        let checksum = chunk_ops.iter().fold(0u32, |s, o| s.wrapping_add(o.checksum));
        db.execute(
            "INSERT INTO ferrosync.op_chunks (group_id, bucket, last_op, first_op, op_count, checksum, ops) VALUES (1, 'a', $1, $2, $3, $4, $5)",
            &[&chunk_ops[chunk_ops.len() - 1].op_id, &chunk_ops[0].op_id, &(chunk_ops.len() as i32), &i64::from(checksum), &chunk::encode(chunk_ops.iter())],
        )
        .await?;
    }
    let storage = PgStorage::connect(&ferrosync_storage::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?, 1).await?;
    let first = storage.bucket_data(1, 60, &[("a".to_string(), 0)], 2000).await?;
    let bytes: usize = first.ops.iter().map(|(_, o)| o.data.as_ref().map_or(0, String::len)).sum();
    assert!(first.ops.len() < 60, "one read took all {} ops ({bytes} bytes)", first.ops.len());
    assert!(bytes < 6 << 20, "one read holds {bytes} bytes");
    assert_eq!(first.resume, Some(("a".to_string(), first.ops.len() as i64)));
    // Read on from there, the rest arrives exactly.
    let got = read_all(&storage, 60, &[("a".to_string(), 0)], 2000).await?;
    assert_eq!(got["a"], (1..=60).collect::<Vec<i64>>());
    Ok(())
}
