//! Sync config versions as the admin API changes them: deploy new content, rebuild the active
//! content from scratch, and what is being deployed. A new version is a PROCESSING stream with
//! its own slot; it becomes ACTIVE (and the old one STOP) when its snapshot is done.

use crate::error::StorageError;
use crate::model::{SourceTableRecord, StreamRecord};
use crate::streams::{new_stream_identity, stream_from_row, table_from_row, STREAM_COLUMNS};
use tokio_postgres::Client;

/// Why a full reprocess cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReprocessError {
    #[error("Busy processing sync config - cannot reprocess")]
    Busy,
    #[error("No active sync config")]
    NoActive,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Deploy `content` as a new version (older PROCESSING versions stop: it supersedes them).
pub async fn deploy(client: &Client, content: &str, slot_prefix: &str) -> Result<StreamRecord, StorageError> {
    let (id, slot) = new_stream_identity(client, slot_prefix).await?;
    // One statement: nobody ever sees the old versions stopped and no new one yet.
    let row = client
        .query_one(
            &format!(
                "WITH stopped AS (UPDATE ferrosync.sync_rules SET state = 'STOP' WHERE state = 'PROCESSING')
                 INSERT INTO ferrosync.sync_rules (id, content, state, slot_name) VALUES ($1, $2, 'PROCESSING', $3)
                 RETURNING {STREAM_COLUMNS}"
            ),
            &[&id, &content, &slot],
        )
        .await?;
    stream_from_row(&row)
}

/// A full rebuild: a new version with the active content (new slot, fresh snapshot). Refused
/// while another version is still being deployed.
pub async fn reprocess(client: &Client, slot_prefix: &str) -> Result<StreamRecord, ReprocessError> {
    if deploying(client).await?.is_some() {
        return Err(ReprocessError::Busy);
    }
    let active = crate::streams::active_stream(client).await?.ok_or(ReprocessError::NoActive)?;
    Ok(deploy(client, &active.content, slot_prefix).await?)
}

/// The version being deployed (PROCESSING), if any.
pub async fn deploying(client: &Client) -> Result<Option<StreamRecord>, StorageError> {
    let row = client
        .query_opt(
            &format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE state = 'PROCESSING' ORDER BY id DESC LIMIT 1"),
            &[],
        )
        .await?;
    row.as_ref().map(stream_from_row).transpose()
}

/// The newest version that replicates (PROCESSING or ACTIVE): what a replicator without a
/// sync config of its own replicates.
pub async fn newest_replicating(client: &Client) -> Result<Option<StreamRecord>, StorageError> {
    let row = client
        .query_opt(
            &format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE state IN ('PROCESSING', 'ACTIVE') ORDER BY id DESC LIMIT 1"),
            &[],
        )
        .await?;
    row.as_ref().map(stream_from_row).transpose()
}

/// Whether a newer version than `id` is being deployed.
pub async fn superseded(client: &Client, id: i64) -> Result<bool, StorageError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM ferrosync.sync_rules WHERE id > $1 AND state = 'PROCESSING')",
            &[&id],
        )
        .await?;
    Ok(row.get(0))
}

/// The source tables a version replicates.
pub async fn tables(client: &Client, id: i64) -> Result<Vec<SourceTableRecord>, StorageError> {
    let rows = client
        .query(
            "SELECT id, relation_oid, schema_name, table_name, key_columns, snapshot_done, snapshot_last_key, snapshot_rows
             FROM ferrosync.source_tables WHERE group_id = $1 ORDER BY schema_name, table_name",
            &[&id],
        )
        .await?;
    Ok(rows.iter().map(table_from_row).collect())
}

/// Versions no longer replicated or served (STOP), with their slot names: their slots hold WAL
/// on the source until dropped.
pub async fn stopped(client: &Client) -> Result<Vec<(i64, String)>, StorageError> {
    let rows = client
        .query("SELECT id, slot_name FROM ferrosync.sync_rules WHERE state = 'STOP'", &[])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Remove a stopped version's data and mark it TERMINATED (after its slot was dropped).
pub async fn terminate(client: &Client, id: i64) -> Result<(), StorageError> {
    crate::streams::clear_group(client, id).await?;
    client
        .execute(
            "UPDATE ferrosync.sync_rules SET state = 'TERMINATED' WHERE id = $1 AND state = 'STOP'",
            &[&id],
        )
        .await?;
    Ok(())
}
