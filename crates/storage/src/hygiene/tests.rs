//! Hygiene passes against a throwaway Postgres: what is deleted, and that reads at the horizon
//! or later see exactly what they saw before.

use super::*;
use crate::reader::{PgStorage, SyncStorage};
use ferrosync_testkit::{PgCluster, PgOptions};

const DAY: Duration = Duration::from_secs(86_400);

async fn setup(cluster: &PgCluster) -> anyhow::Result<(Client, PgStorage)> {
    cluster.create_database("storage").await?;
    let endpoint = crate::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?;
    let db = crate::connect(&endpoint).await?;
    crate::schema::migrate(&db).await?;
    db.batch_execute(
        "INSERT INTO ferrosync.sync_rules (id, content, state, slot_name, last_checkpoint, last_checkpoint_lsn)
         VALUES (1, '', 'ACTIVE', 's', 50, '0/200');
         INSERT INTO ferrosync.source_tables (id, group_id, relation_oid, schema_name, table_name, key_columns)
         VALUES (1, 1, 100, 'public', 'a', '{id}'), (2, 1, 200, 'public', 'b', '{id}');
         SELECT setval('ferrosync.source_tables_id_seq', 10);",
    )
    .await?;
    Ok((db, PgStorage::connect(&endpoint, 1).await?))
}

fn options(parameter_horizon: i64, write_checkpoint_retention: Duration) -> PruneOptions {
    PruneOptions {
        parameter_horizon,
        write_checkpoint_retention,
        pause: Duration::ZERO,
    }
}

async fn count(db: &Client, table: &str) -> anyhow::Result<i64> {
    Ok(db.query_one(&format!("SELECT count(*) FROM ferrosync.{table}"), &[]).await?.get(0))
}

async fn params_at(s: &PgStorage, checkpoint: i64) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let found = s.parameter_sets(1, checkpoint, &["L".into(), "M".into()]).await?;
    let mut out: Vec<(String, Vec<String>)> = found
        .into_iter()
        .map(|(lookup, mut rows)| {
            rows.sort();
            (lookup, rows)
        })
        .collect();
    out.sort();
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_parameter_versions_and_tombstones_below_the_horizon_go() -> anyhow::Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    let (mut db, s) = setup(&cluster).await?;
    db.batch_execute(
        "INSERT INTO ferrosync.bucket_parameters (group_id, lookup, table_id, key, id, bucket_parameters) VALUES
           (1, 'L', 1, '00000000-0000-0000-0000-000000000001', 10, '[\"a\"]'),
           (1, 'L', 1, '00000000-0000-0000-0000-000000000001', 20, '[\"b\"]'),
           (1, 'L', 1, '00000000-0000-0000-0000-000000000001', 30, '[\"c\"]'),
           (1, 'L', 1, '00000000-0000-0000-0000-000000000002', 11, '[\"x\"]'),
           (1, 'L', 1, '00000000-0000-0000-0000-000000000002', 21, '[]'),
           (1, 'L', 1, '00000000-0000-0000-0000-000000000003', 12, '[\"y\"]'),
           (1, 'L', 1, '00000000-0000-0000-0000-000000000003', 40, '[\"z\"]');
         -- More rows than one page, each with an old and a current version.
         INSERT INTO ferrosync.bucket_parameters (group_id, lookup, table_id, key, id, bucket_parameters)
         SELECT 1, 'M', 2, md5(g::text)::uuid, v, '[' || g || ']' FROM generate_series(1, 1500) g, (VALUES (5), (6)) v(v);",
    )
    .await?;
    let before = (params_at(&s, 35).await?, params_at(&s, 45).await?);
    let stats = prune(&mut db, 1, &options(35, DAY)).await?;
    // k1: 10 and 20 (superseded by 30); k2: 11 and its tombstone 21; k3 keeps 12 (only 40,
    // above the horizon, supersedes it); M: every version 5.
    assert_eq!(stats.parameter_rows, 4 + 1500);
    assert_eq!(count(&db, "bucket_parameters").await?, 7 + 3000 - 1504);
    assert_eq!((params_at(&s, 35).await?, params_at(&s, 45).await?), before);
    assert_eq!(
        params_at(&s, 35).await?[0],
        ("L".to_string(), vec!["[\"c\"]".to_string(), "[\"y\"]".to_string()])
    );
    // A second pass finds nothing; no horizon, no pruning.
    assert_eq!(prune(&mut db, 1, &options(35, DAY)).await?.parameter_rows, 0);
    assert_eq!(prune(&mut db, 1, &options(0, DAY)).await?.parameter_rows, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_generated_write_checkpoints_go_and_ids_stay_monotone() -> anyhow::Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    let (mut db, s) = setup(&cluster).await?;
    // The served checkpoint is at 0/200.
    assert_eq!(s.create_write_checkpoint("old", 0x100).await?, 1);
    assert_eq!(s.create_write_checkpoint("old", 0x100).await?, 2);
    assert_eq!(s.create_write_checkpoint("recent", 0x100).await?, 1);
    assert_eq!(s.create_write_checkpoint("not yet replicated", 0x300).await?, 1);
    assert_eq!(s.request_write_checkpoint("requested", 9, 0x100).await?, 9);
    db.execute(
        "UPDATE ferrosync.write_checkpoints SET updated_at = now() - interval '2 hours' WHERE user_key <> 'recent'",
        &[],
    )
    .await?;
    let stats = prune(&mut db, 1, &options(0, Duration::from_secs(3600))).await?;
    assert_eq!(
        stats.write_checkpoints, 1,
        "only 'old': the others are recent, unreplicated or client-chosen"
    );
    let mut left: Vec<String> = s.write_checkpoints_since(0).await?.into_iter().map(|w| w.user_key).collect();
    left.sort();
    assert_eq!(left, ["not yet replicated", "recent", "requested"]);
    // The pruned key continues above its last id, and so does any new key.
    assert_eq!(s.create_write_checkpoint("old", 0x200).await?, 3);
    assert_eq!(s.create_write_checkpoint("new", 0x200).await?, 3);
    assert_eq!(s.create_write_checkpoint("recent", 0x200).await?, 2);
    assert_eq!(
        prune(&mut db, 1, &options(0, Duration::from_secs(3600))).await?.write_checkpoints,
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_markers_of_buckets_without_ops_go() -> anyhow::Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    let (mut db, _) = setup(&cluster).await?;
    db.batch_execute(
        "INSERT INTO ferrosync.op_chunks (group_id, bucket, last_op, first_op, op_count, checksum, ops) VALUES (1, 'live', 5, 5, 1, 0, '')
         ;INSERT INTO ferrosync.bucket_compaction (group_id, bucket, compacted_to)
          SELECT 1, 'gone' || g, 5 FROM generate_series(1, 1200) g UNION ALL SELECT 1, 'live', 5 UNION ALL SELECT 2, 'live', 5",
    )
    .await?;
    assert_eq!(prune(&mut db, 1, &options(0, DAY)).await?.compaction_markers, 1201);
    let left: Vec<(i32, String)> = db
        .query("SELECT group_id, bucket FROM ferrosync.bucket_compaction", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(left, [(1, "live".to_string())]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_tables_without_a_record_go() -> anyhow::Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    let (mut db, s) = setup(&cluster).await?;
    // Table 3 lost its record (a crash between deleting it and removing its rows); table 1
    // and group 2's table 3 are fine.
    db.batch_execute(
        "INSERT INTO ferrosync.source_tables (id, group_id, relation_oid, schema_name, table_name, key_columns)
         VALUES (3, 2, 300, 'public', 'c', '{id}');
         INSERT INTO ferrosync.current_data (group_id, table_id, key)
         SELECT 1, t, md5(t || '/' || g)::uuid FROM generate_series(1, 1200) g, (VALUES (1), (3)) t(t)
         UNION ALL SELECT 2, 3, md5(g::text)::uuid FROM generate_series(1, 5) g;
         INSERT INTO ferrosync.bucket_parameters (group_id, lookup, table_id, key, id, bucket_parameters) VALUES
           (1, 'L', 1, '00000000-0000-0000-0000-000000000001', 10, '[\"kept\"]'),
           (1, 'L', 3, '00000000-0000-0000-0000-000000000002', 11, '[\"orphan\"]');",
    )
    .await?;
    // A parameter pack of each table (see crate::pack): the orphan's goes with its rows.
    for (table_id, json) in [(1i64, r#"["packed"]"#), (3, r#"["orphan pack"]"#)] {
        let entry = (
            String::from("L"),
            table_id,
            Uuid::from_u128(100 + table_id as u128),
            12,
            json.to_string(),
        );
        let packs = crate::pack::pack(vec![entry], 12);
        db.execute(
            "INSERT INTO ferrosync.parameter_packs (group_id, lookup, table_id, pack_id, entry_count, entries) VALUES (1, 'L', $1, 12, 1, $2)",
            &[&table_id, &packs[0].entries],
        )
        .await?;
    }
    let stats = prune(&mut db, 1, &options(35, DAY)).await?;
    assert_eq!((stats.orphan_rows, stats.parameter_rows), (1201, 1));
    let left: Vec<(i32, i32, i64)> = db
        .query(
            "SELECT group_id, table_id, count(*) FROM ferrosync.current_data GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(left, [(1, 1, 1200), (2, 3, 5)]);
    let kept = vec![r#"["kept"]"#.to_string(), r#"["packed"]"#.to_string()];
    assert_eq!(params_at(&s, 35).await?, [("L".to_string(), kept)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_tables_old_record_stays_until_forgotten() -> anyhow::Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    let (db, _) = setup(&cluster).await?;
    db.execute("UPDATE ferrosync.sync_rules SET lock_owner = 'me'", &[]).await?;
    let keys = ["id".to_string()];
    let table = |oid| crate::streams::TableIdentity {
        oid,
        schema: "public",
        name: "a",
        key_columns: &keys,
    };
    let (same, stale) = crate::streams::resolve_table(&db, 1, "me", &table(100)).await?;
    assert_eq!((same.id, stale.map(|t| t.id)), (1, None));
    // Re-created: a new record, and the old one to empty.
    let (new, stale) = crate::streams::resolve_table(&db, 1, "me", &table(101)).await?;
    assert_eq!(stale.map(|t| t.id), Some(1));
    // A restart before the old rows were removed finds both again.
    let (again, stale) = crate::streams::resolve_table(&db, 1, "me", &table(101)).await?;
    assert_eq!((again.id, stale.map(|t| t.id)), (new.id, Some(1)));
    crate::streams::forget_table(&db, 1, "me", 1).await?;
    let (again, stale) = crate::streams::resolve_table(&db, 1, "me", &table(101)).await?;
    assert_eq!((again.id, stale.map(|t| t.id)), (new.id, None));
    assert!(
        crate::streams::forget_table(&db, 1, "someone else", new.id).await.is_err(),
        "fenced"
    );
    Ok(())
}
