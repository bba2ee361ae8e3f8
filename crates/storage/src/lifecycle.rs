//! The life of a replication stream across sync-config deploys (replication-storage.md §5):
//! PROCESSING (snapshotting beside the served stream) -> ACTIVE at its first checkpoint, which
//! retires every other served stream (STOP) -> TERMINATED once a replicator dropped its slot and
//! deleted its storage. Deciding what a deploy creates is [`crate::streams::stream_for_content`].

use crate::error::StorageError;
use crate::model::{StreamRecord, StreamState};
use crate::streams::{stream_from_row, STREAM_COLUMNS};
use tokio_postgres::{Client, Transaction};

/// Every table keyed by a stream's id (`group_id`): what a stream's storage consists of.
/// `source_tables` and `rebuild_tables` key it as int8, the others as int4.
const GROUP_TABLES: &[(&str, &str)] = &[
    ("op_chunks", "int4"),
    ("current_data", "int4"),
    ("bucket_parameters", "int4"),
    ("parameter_packs", "int4"),
    ("bucket_changes", "int4"),
    ("bucket_compaction", "int4"),
    ("source_tables", "int8"),
    ("rebuild_tables", "int8"),
];

/// Rows deleted per statement: each batch is its own short transaction, so deleting a large
/// stream neither hits statement timeouts nor holds locks or WAL for long, and an interrupted
/// deletion simply continues where it stopped.
pub const DELETE_BATCH: i64 = 10_000;

/// The streams a replicator may have work on: every row not TERMINATED, oldest first.
/// PROCESSING and ACTIVE ones replicate, STOP ones await clean-up, ERRORED ones only serve.
pub async fn live_streams(client: &Client) -> Result<Vec<StreamRecord>, StorageError> {
    let rows = client
        .query(
            &format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE state <> 'TERMINATED' ORDER BY id"),
            &[],
        )
        .await?;
    rows.iter().map(stream_from_row).collect()
}

/// Make `group` the served stream, inside the transaction of its first checkpoint: it must still
/// be PROCESSING with its snapshot done (a newer deploy may have stopped it meanwhile), and every
/// other ACTIVE or ERRORED stream stops. Returns the ids stopped. The row lock taken here orders
/// this against a concurrent deploy, which then sees the stream ACTIVE and leaves it be.
pub(crate) async fn activate(tx: &Transaction<'_>, group: i64) -> Result<Vec<i64>, StorageError> {
    let activated = tx
        .execute(
            "UPDATE ferrosync.sync_rules SET state = 'ACTIVE' WHERE id = $1 AND state = 'PROCESSING' AND snapshot_done",
            &[&group],
        )
        .await?;
    if activated != 1 {
        return Err(StorageError::Stopped(group));
    }
    let stopped = tx
        .query(
            "UPDATE ferrosync.sync_rules SET state = 'STOP' WHERE state IN ('ACTIVE', 'ERRORED') AND id <> $1 RETURNING id",
            &[&group],
        )
        .await?;
    Ok(stopped.iter().map(|r| r.get(0)).collect())
}

/// Delete everything stream `group` stored, in batches of [`DELETE_BATCH`] rows; returns the
/// number of rows deleted. Idempotent: safe to rerun after an interruption.
pub async fn delete_group_rows(client: &Client, group: i64) -> Result<u64, StorageError> {
    let mut deleted = 0;
    for (table, key_type) in GROUP_TABLES {
        // By TID from a bounded index scan: one short transaction per batch.
        let sql = format!(
            "DELETE FROM ferrosync.{table} WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM ferrosync.{table} WHERE group_id = $1::int8::{key_type} LIMIT $2))"
        );
        loop {
            let n = client.execute(&sql, &[&group, &DELETE_BATCH]).await?;
            deleted += n;
            if n < DELETE_BATCH as u64 {
                break;
            }
        }
    }
    Ok(deleted)
}

/// Clean-up of a STOP stream whose lease `owner` holds (after its slot was dropped): delete its
/// storage and mark it TERMINATED. The `sync_rules` row stays, as a record of the deploy.
/// Returns the rows deleted.
pub async fn terminate(client: &Client, group: i64, owner: &str) -> Result<u64, StorageError> {
    let deleted = delete_group_rows(client, group).await?;
    let done = client
        .execute(
            "UPDATE ferrosync.sync_rules SET state = 'TERMINATED', snapshot_done = false, last_checkpoint = 0,
                last_checkpoint_lsn = NULL, no_checkpoint_before = NULL
             WHERE id = $1 AND state = 'STOP' AND lock_owner = $2",
            &[&group, &owner],
        )
        .await?;
    crate::write_task::check_lease(done, group)?;
    Ok(deleted)
}

/// How many streams are in each state (TERMINATED ones excepted), for metrics.
pub fn count_states(streams: &[StreamRecord]) -> [(StreamState, usize); 4] {
    [
        StreamState::Processing,
        StreamState::Active,
        StreamState::Errored,
        StreamState::Stop,
    ]
    .map(|state| (state, streams.iter().filter(|s| s.state == state).count()))
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
