//! Sync config versions as the admin API changes them: rebuild the active content from
//! scratch, and what is being deployed (deploying content is `streams::stream_for_content`).
//! A new version is a PROCESSING stream with its own slot; it becomes ACTIVE (and the old one
//! STOP) when its snapshot is done.

use crate::error::StorageError;
use crate::model::{SourceTableRecord, StreamRecord};
use crate::streams::{deploy_transaction, insert_version, stream_from_row, table_from_row, STREAM_COLUMNS};
use tokio_postgres::{Client, GenericClient};

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

/// A full rebuild: a new version with the active content (new slot, fresh snapshot). Refused
/// while another version is still being deployed.
pub async fn reprocess(client: &mut Client, slot_prefix: &str) -> Result<StreamRecord, ReprocessError> {
    let tx = deploy_transaction(client).await?;
    if deploying(&tx).await?.is_some() {
        return Err(ReprocessError::Busy);
    }
    let active = crate::streams::active_stream(&tx).await?.ok_or(ReprocessError::NoActive)?;
    let stream = insert_version(&tx, &active.content, slot_prefix).await?;
    tx.commit().await.map_err(StorageError::from)?;
    Ok(stream)
}

/// The version being deployed (PROCESSING), if any.
pub async fn deploying(client: &impl GenericClient) -> Result<Option<StreamRecord>, StorageError> {
    let row = client
        .query_opt(
            &format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE state = 'PROCESSING' ORDER BY id DESC LIMIT 1"),
            &[],
        )
        .await?;
    row.as_ref().map(stream_from_row).transpose()
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
