//! Deploy decisions and lifecycle transitions against a real storage database.

use super::*;
use crate::streams::{restart_replication, stream_for_content};
use ferrosync_testkit::{PgCluster, PgOptions};

async fn storage() -> anyhow::Result<(PgCluster, Client)> {
    let cluster = PgCluster::start(PgOptions::default())?;
    cluster.create_database("storage").await?;
    let client = cluster.connect("storage").await?;
    crate::schema::migrate(&client).await?;
    Ok((cluster, client))
}

async fn states(client: &Client) -> anyhow::Result<Vec<(i64, String)>> {
    let rows = client.query("SELECT id, state FROM ferrosync.sync_rules ORDER BY id", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn expect(pairs: &[(i64, &str)]) -> Vec<(i64, String)> {
    pairs.iter().map(|(id, s)| (*id, s.to_string())).collect()
}

/// What the replicator does on its first checkpoint after the snapshot.
async fn activate_now(client: &mut Client, id: i64) -> Result<Vec<i64>, StorageError> {
    client
        .execute("UPDATE ferrosync.sync_rules SET snapshot_done = true WHERE id = $1", &[&id])
        .await?;
    let tx = client.transaction().await?;
    let stopped = activate(&tx, id).await?;
    tx.commit().await?;
    Ok(stopped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_do_not_flap_and_a_newer_deploy_stops_the_processing_one() -> anyhow::Result<()> {
    let (_cluster, mut client) = storage().await?;
    let c1 = stream_for_content(&mut client, "c1", "p_").await?;
    assert_eq!(c1.state, StreamState::Processing);
    assert!(c1.slot_name.starts_with(&format!("p_{}_", c1.id)), "{}", c1.slot_name);
    assert_eq!(activate_now(&mut client, c1.id).await?, Vec::<i64>::new());

    let c2 = stream_for_content(&mut client, "c2", "p_").await?;
    assert_ne!(c2.slot_name, c1.slot_name, "each stream has its own slot");
    // Rolling deploy: a process with the old config starts while c2 deploys; nothing changes.
    assert_eq!(stream_for_content(&mut client, "c1", "p_").await?.id, c1.id);
    assert_eq!(stream_for_content(&mut client, "c2", "p_").await?.id, c2.id);
    assert_eq!(states(&client).await?, expect(&[(c1.id, "ACTIVE"), (c2.id, "PROCESSING")]));

    // A newer deploy while c2 is still processing supersedes it; c1 keeps serving.
    let c3 = stream_for_content(&mut client, "c3", "p_").await?;
    assert_eq!(
        states(&client).await?,
        expect(&[(c1.id, "ACTIVE"), (c2.id, "STOP"), (c3.id, "PROCESSING")])
    );
    // The stopped stream's first checkpoint can no longer activate it.
    let late = activate_now(&mut client, c2.id).await;
    assert!(matches!(late, Err(StorageError::Stopped(id)) if id == c2.id), "{late:?}");
    assert_eq!(activate_now(&mut client, c3.id).await?, vec![c1.id]);
    assert_eq!(
        states(&client).await?,
        expect(&[(c1.id, "STOP"), (c2.id, "STOP"), (c3.id, "ACTIVE")])
    );
    let live: Vec<i64> = live_streams(&client).await?.iter().map(|s| s.id).collect();
    assert_eq!(live, [c1.id, c2.id, c3.id]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_of_the_served_stream_gets_no_second_replacement_while_one_deploys() -> anyhow::Result<()> {
    let (_cluster, mut client) = storage().await?;
    let c1 = stream_for_content(&mut client, "c1", "p_").await?;
    activate_now(&mut client, c1.id).await?;
    let c2 = stream_for_content(&mut client, "c2", "p_").await?;
    client.execute("UPDATE ferrosync.sync_rules SET lock_owner = 'me'", &[]).await?;
    assert!(restart_replication(&mut client, c1.id, "me", "p_").await?.is_none());
    assert_eq!(states(&client).await?, expect(&[(c1.id, "ERRORED"), (c2.id, "PROCESSING")]));
    // The deploying stream itself losing its slot is replaced by a fresh copy.
    let copy = restart_replication(&mut client, c2.id, "me", "p_").await?.expect("a replacement");
    assert_eq!((copy.content.as_str(), copy.state), ("c2", StreamState::Processing));
    assert_eq!(
        states(&client).await?,
        expect(&[(c1.id, "ERRORED"), (c2.id, "STOP"), (copy.id, "PROCESSING")])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_deletes_every_group_row_in_batches_and_only_for_the_lease_holder() -> anyhow::Result<()> {
    let (_cluster, client) = storage().await?;
    client
        .batch_execute(
            "INSERT INTO ferrosync.sync_rules (id, content, state, slot_name, lock_owner) VALUES
                (1, 'a', 'STOP', 's1', 'me'), (2, 'b', 'ACTIVE', 's2', 'me');",
        )
        .await?;
    let rows_per_group = DELETE_BATCH + 5;
    for g in [1i64, 2] {
        client
            .execute(
                "INSERT INTO ferrosync.op_chunks (group_id, bucket, last_op, first_op, op_count, checksum, ops)
                 SELECT $1::int8::int4, 'b', n, n, 1, 0, '' FROM generate_series(1, $2::int8) n",
                &[&g, &rows_per_group],
            )
            .await?;
        client
            .batch_execute(&format!(
                "INSERT INTO ferrosync.current_data (group_id, table_id, key) VALUES ({g}, 1, gen_random_uuid());
                 INSERT INTO ferrosync.bucket_parameters (group_id, lookup, table_id, key, id, bucket_parameters) VALUES ({g}, 'l', 1, gen_random_uuid(), 1, '[]');
                 INSERT INTO ferrosync.parameter_packs (group_id, lookup, table_id, pack_id, entry_count, entries) VALUES ({g}, 'l', 1, 1, 0, '');
                 INSERT INTO ferrosync.bucket_changes (group_id, max_op_id, buckets, lookups) VALUES ({g}, 1, '{{}}', '{{}}');
                 INSERT INTO ferrosync.bucket_compaction (group_id, bucket, compacted_to) VALUES ({g}, 'b', 1);
                 INSERT INTO ferrosync.source_tables (group_id, relation_oid, schema_name, table_name, key_columns) VALUES ({g}, 1, 'public', 't', '{{id}}');
                 INSERT INTO ferrosync.rebuild_tables (group_id, pending_id, table_id) VALUES ({g}, 9, 1);"
            ))
            .await?;
    }
    let fenced = terminate(&client, 1, "someone else").await;
    assert!(matches!(fenced, Err(StorageError::LeaseLost(_))), "{fenced:?}");
    // The fenced attempt deleted rows (idempotent) but left the state; the holder finishes.
    let deleted = terminate(&client, 1, "me").await?;
    assert_eq!(deleted, 0, "the first attempt already deleted everything");
    assert_eq!(states(&client).await?, expect(&[(1, "TERMINATED"), (2, "ACTIVE")]));
    for (table, _) in GROUP_TABLES {
        let counts = client
            .query_one(
                &format!("SELECT count(*) FILTER (WHERE group_id = 1), count(*) FILTER (WHERE group_id = 2) FROM ferrosync.{table}"),
                &[],
            )
            .await?;
        let (gone, kept): (i64, i64) = (counts.get(0), counts.get(1));
        assert_eq!(gone, 0, "{table}: group 1 rows remain");
        assert!(kept > 0, "{table}: group 2 rows were deleted too");
    }
    Ok(())
}
