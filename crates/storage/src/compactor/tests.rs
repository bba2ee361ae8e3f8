//! Compaction against a throwaway Postgres: chunks written as replication writes them, a
//! client part-way through its download, then a pass; what clients download afterwards.

use super::*;
use crate::compact::tests::ClientBucket;
use crate::model::{OpType, OplogEntry};
use crate::reader::{PgStorage, SyncStorage};
use ferrosync_testkit::{PgCluster, PgOptions};

const ROWS: usize = 20;
const ROUNDS: usize = 30;

fn put(op_id: i64, row: usize, round: usize) -> OplogEntry {
    let (id, data) = (format!("r{row}"), format!("{{\"round\":{round}}}"));
    OplogEntry {
        op_id,
        op: OpType::Put,
        checksum: crate::checksum::put("t", &id, &data),
        object_type: Some("t".into()),
        object_id: Some(id),
        subkey: Some(format!("1/{row}")),
        data: Some(data),
    }
}

/// One chunk per op, as one source transaction each writes them.
async fn insert(db: &Client, bucket: &str, ops: &[OplogEntry]) -> anyhow::Result<()> {
    for op in ops {
        db.execute(
            "INSERT INTO ferrosync.op_chunks (group_id, bucket, last_op, first_op, op_count, checksum, ops) VALUES (1, $1, $2, $2, 1, $3, $4)",
            &[&bucket, &op.op_id, &i64::from(op.checksum), &chunk::encode(std::iter::once(op))],
        )
        .await?;
    }
    db.execute(
        "UPDATE ferrosync.sync_rules SET last_checkpoint = $1",
        &[&ops.last().map_or(0, |o| o.op_id)],
    )
    .await?;
    Ok(())
}

async fn download(storage: &PgStorage, client: &mut ClientBucket, checkpoint: i64, limit: Option<usize>) -> anyhow::Result<(usize, i64)> {
    let batch = storage
        .bucket_data(1, checkpoint, &[("b".into(), client.position)], 100_000)
        .await?;
    let ops = &batch.ops[..limit.unwrap_or(batch.ops.len()).min(batch.ops.len())];
    ops.iter().for_each(|(_, op)| client.apply(op));
    Ok((ops.len(), batch.target_op))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_shrinks_history_and_every_client_converges() -> anyhow::Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    cluster.create_database("storage").await?;
    let mut db = cluster.connect("storage").await?;
    crate::schema::migrate(&db).await?;
    db.batch_execute("INSERT INTO ferrosync.sync_rules (id, content, state, slot_name) VALUES (1, '', 'ACTIVE', 's')")
        .await?;
    let mut ops = Vec::new();
    for round in 0..ROUNDS {
        for row in 0..ROWS {
            ops.push(put(ops.len() as i64 + 1, row, round));
        }
    }
    insert(&db, "b", &ops).await?;
    let checkpoint = ops.len() as i64;
    let storage = PgStorage::connect(&crate::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?, 1).await?;
    let announced = storage.checksums(1, 0, checkpoint, &["b".into()]).await?["b"];
    // Part-way through its first download when compaction runs.
    let mut midway = ClientBucket::default();
    download(&storage, &mut midway, checkpoint, Some(ROWS * ROUNDS / 3)).await?;

    let options = CompactOptions {
        max_ops: u64::MAX,
        pause: Duration::ZERO,
    };
    let stats = compact(&mut db, 1, &options).await?.expect("not locked");
    assert_eq!((stats.buckets, stats.ops_before), (1, (ROWS * ROUNDS) as i64));
    assert_eq!(stats.ops_after, ROWS as i64 + 1, "the live rows and a CLEAR");
    assert!(stats.bytes_after * 10 < stats.bytes_before, "{stats:?}");
    assert_eq!(stats.rewritten, (ROWS * (ROUNDS - 1)) as u64);

    let after = storage.checksums(1, 0, checkpoint, &["b".into()]).await?["b"];
    assert_eq!(after.checksum, announced.checksum, "bucket checksums never change");
    let mut fresh = ClientBucket::default();
    let (received, target) = download(&storage, &mut fresh, checkpoint, None).await?;
    assert_eq!(received, ROWS + 1);
    assert!(target <= checkpoint, "the compaction horizon is the checkpoint");
    let (_, _) = download(&storage, &mut midway, checkpoint, None).await?;
    let mut replay = ClientBucket::default();
    ops.iter().for_each(|op| replay.apply(op));
    for client in [&fresh, &midway] {
        assert_eq!(client.checksum(), announced.checksum);
        assert_eq!(client.data(), replay.data());
    }
    // A checksum increment over a range holding the CLEAR replaces what came before it.
    let cleared = storage.cleared(1, 10, checkpoint, &["b".into()]).await?;
    assert!(cleared.contains("b"));
    assert!(storage.cleared(1, checkpoint, checkpoint, &["b".into()]).await?.is_empty());

    // Nothing new: the next pass skips the bucket. New ops: only they are looked at again.
    assert_eq!(compact(&mut db, 1, &options).await?.map(|s| s.buckets), Some(0));
    let newer: Vec<OplogEntry> = (0..ROWS).map(|row| put(checkpoint + 1 + row as i64, row, ROUNDS)).collect();
    insert(&db, "b", &newer).await?;
    let stats = compact(&mut db, 1, &options).await?.expect("not locked");
    assert_eq!((stats.buckets, stats.ops_after), (1, ROWS as i64 + 1));
    let mut client = fresh.clone();
    download(&storage, &mut client, checkpoint + ROWS as i64, None).await?;
    newer.iter().for_each(|op| replay.apply(op));
    assert_eq!(client.data(), replay.data(), "a client that was up to date takes the new ops");

    // Two compactors never run at once.
    let other = cluster.connect("storage").await?;
    other.execute("SELECT pg_advisory_lock($1, 1)", &[&LOCK_NAMESPACE]).await?;
    assert!(compact(&mut db, 1, &options).await?.is_none());
    Ok(())
}
