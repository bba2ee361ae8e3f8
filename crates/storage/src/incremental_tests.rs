//! In-place deploy decisions and the cleanup of replaced definitions, against a real storage
//! database.

use crate::incremental::{cleanup_retired, deploy_in_place};
use crate::StreamState;
use ferrosync_rules::SyncRulesOptions;
use ferrosync_testkit::{PgCluster, PgOptions};
use std::time::Duration;
use tokio_postgres::Client;

const C1: &str = "bucket_definitions:
  global:
    data:
      - SELECT * FROM lists
  mine:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
";

async fn storage(cluster: &PgCluster) -> anyhow::Result<Client> {
    cluster.create_database("storage").await?;
    let client = crate::connect(&crate::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?).await?;
    crate::schema::migrate(&client).await?;
    Ok(client)
}

async fn rows(client: &Client, sql: &str) -> anyhow::Result<i64> {
    Ok(client.query_one(sql, &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_go_in_place_only_when_definitions_alone_changed() -> anyhow::Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    let client = storage(&cluster).await?;
    let options = SyncRulesOptions::default();
    // No active stream yet: the full path.
    assert!(deploy_in_place(&client, C1, &options).await?.is_none());
    client
        .execute(
            "INSERT INTO ferrosync.sync_rules (id, content, state, slot_name) VALUES (nextval(pg_get_serial_sequence('ferrosync.sync_rules', 'id')), $1, 'ACTIVE', 's')",
            &[&C1],
        )
        .await?;
    // The served config: nothing to do here.
    assert!(deploy_in_place(&client, C1, &options).await?.is_none());

    let c2 = format!("{C1}  extra:\n    data:\n      - SELECT * FROM tags\n");
    let stream = deploy_in_place(&client, &c2, &options).await?.expect("in place");
    assert_eq!(stream.state, StreamState::Active);
    let pending = stream.pending.clone().expect("pending");
    assert!(pending.id > stream.id);
    let expected = [
        ("extra", pending.id as u64),
        ("global", stream.id as u64),
        ("mine", stream.id as u64),
    ];
    assert_eq!(pending.prefix_ids, expected.iter().map(|(n, i)| (n.to_string(), *i)).collect());
    // Deploying it again (another process, a restart) keeps the same deploy.
    let again = deploy_in_place(&client, &c2, &options).await?.expect("in place");
    assert_eq!(again.pending.map(|p| p.id), Some(pending.id));
    // A process still on the served config leaves the pending deploy alone.
    assert!(deploy_in_place(&client, C1, &options).await?.is_none());
    assert_eq!(rows(&client, "SELECT count(pending_id) FROM ferrosync.sync_rules").await?, 1);

    // A global setting changed: full deploy, and the in-place one is dropped.
    let c3 = format!("config:\n  edition: 2\n{c2}");
    assert!(deploy_in_place(&client, &c3, &options).await?.is_none());
    assert_eq!(rows(&client, "SELECT count(pending_id) FROM ferrosync.sync_rules").await?, 0);
    // What it built so far is queued for deletion.
    let retired: Vec<String> = client
        .query_one("SELECT retired_buckets FROM ferrosync.sync_rules", &[])
        .await?
        .get(0);
    assert_eq!(retired, vec![format!("{}#extra[", pending.id)]);

    // Unversioned bucket ids cannot tell a changed definition's buckets apart: full deploy.
    let unversioned = SyncRulesOptions {
        default_storage_version: 1,
        ..options
    };
    assert!(deploy_in_place(&client, &c2, &unversioned).await?.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_only_retired_prefixes() -> anyhow::Result<()> {
    let cluster = PgCluster::start(PgOptions::default())?;
    let client = storage(&cluster).await?;
    client
        .batch_execute(
            r#"INSERT INTO ferrosync.sync_rules (id, content, state, slot_name, retired_buckets, retired_lookups)
                 VALUES (1, '', 'ACTIVE', 's', ARRAY['1#mine['], ARRAY['["mine",']);
             INSERT INTO ferrosync.op_chunks (group_id, bucket, last_op, first_op, op_count, checksum, ops)
                 SELECT 1, b, g, g, 1, 0, '\x00' FROM generate_series(1, 2500) g,
                 unnest(ARRAY['1#mine["u1"]', '1#mine_too["u1"]', '2#mine["u1"]', '1#global[]']) b;
             INSERT INTO ferrosync.bucket_parameters (group_id, lookup, table_id, key, id, bucket_parameters)
                 VALUES (1, '["mine","1","u1"]', 1, gen_random_uuid(), 1, '[]'),
                        (1, '["mine_too","1","u1"]', 1, gen_random_uuid(), 2, '[]');"#,
        )
        .await?;
    let deleted = cleanup_retired(&client, 1, Duration::ZERO).await?;
    assert_eq!(deleted, 2501);
    let left = |bucket: &'static str| {
        let client = &client;
        async move {
            let n: i64 = client
                .query_one("SELECT count(*) FROM ferrosync.op_chunks WHERE bucket = $1", &[&bucket])
                .await?
                .get(0);
            anyhow::Ok(n)
        }
    };
    assert_eq!(left(r#"1#mine["u1"]"#).await?, 0);
    for kept in [r#"1#mine_too["u1"]"#, r#"2#mine["u1"]"#, "1#global[]"] {
        assert_eq!(left(kept).await?, 2500, "{kept}");
    }
    assert_eq!(rows(&client, "SELECT count(*) FROM ferrosync.bucket_parameters").await?, 1);
    // The range scans above are right only where these columns sort bytewise (migration 11
    // for bucket_parameters).
    let not_c = rows(
        &client,
        "SELECT count(*) FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation
         WHERE a.attrelid IN ('ferrosync.op_chunks'::regclass, 'ferrosync.bucket_compaction'::regclass,
                              'ferrosync.bucket_parameters'::regclass, 'ferrosync.parameter_packs'::regclass)
           AND a.attname IN ('bucket', 'lookup') AND c.collname <> 'C'",
    )
    .await?;
    assert_eq!(not_c, 0, "a bucket or lookup column is not COLLATE \"C\"");
    let queued = rows(
        &client,
        "SELECT (cardinality(retired_buckets) + cardinality(retired_lookups))::int8 FROM ferrosync.sync_rules",
    )
    .await?;
    assert_eq!(queued, 0, "done prefixes leave the queue");
    Ok(())
}
