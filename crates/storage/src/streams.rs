//! Replication stream records (one per deployed sync config), their lease, and the source
//! tables each stream replicates.

use crate::error::StorageError;
use crate::model::{Checkpoint, SourceTableRecord, StreamRecord, StreamState};
use crate::writer::lsn_from_text;
use tokio_postgres::{Client, Row};

const STREAM_COLUMNS: &str = "id, content, state, slot_name, snapshot_done, last_checkpoint, coalesce(last_checkpoint_lsn::text, '0/0'), coalesce(no_checkpoint_before::text, '0/0'), persisted_op";

fn stream_from_row(r: &Row) -> Result<StreamRecord, StorageError> {
    let state: String = r.get(2);
    let lsn = |i: usize| {
        let text: String = r.get(i);
        lsn_from_text(&text).ok_or_else(|| StorageError::Corrupt(format!("bad lsn {text}")))
    };
    Ok(StreamRecord {
        id: r.get(0),
        content: r.get(1),
        state: StreamState::parse(&state).ok_or_else(|| StorageError::Corrupt(format!("bad state {state}")))?,
        slot_name: r.get(3),
        snapshot_done: r.get(4),
        checkpoint: Checkpoint {
            op_id: r.get(5),
            lsn: lsn(6)?,
        },
        no_checkpoint_before: lsn(7)?,
        persisted_op: r.get(8),
    })
}

/// The stream for `content`: the existing PROCESSING/ACTIVE one with the same content, or a new
/// PROCESSING stream (older PROCESSING ones are stopped: a newer config supersedes them).
pub async fn stream_for_content(client: &Client, content: &str, slot_prefix: &str) -> Result<StreamRecord, StorageError> {
    let existing = client
        .query_opt(
            &format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE content = $1 AND state IN ('PROCESSING', 'ACTIVE') ORDER BY id DESC LIMIT 1"),
            &[&content],
        )
        .await?;
    if let Some(r) = existing {
        return stream_from_row(&r);
    }
    client
        .execute("UPDATE ferrosync.sync_rules SET state = 'STOP' WHERE state = 'PROCESSING'", &[])
        .await?;
    let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..4].to_string();
    let row = client
        .query_one(
            &format!(
                "INSERT INTO ferrosync.sync_rules (content, state, slot_name) VALUES ($1, 'PROCESSING', '')
                 RETURNING {STREAM_COLUMNS}"
            ),
            &[&content],
        )
        .await?;
    let mut stream = stream_from_row(&row)?;
    stream.slot_name = format!("{slot_prefix}{}_{suffix}", stream.id);
    client
        .execute(
            "UPDATE ferrosync.sync_rules SET slot_name = $2 WHERE id = $1",
            &[&stream.id, &stream.slot_name],
        )
        .await?;
    Ok(stream)
}

/// The stream clients are served from (an ERRORED one keeps serving until its replacement is ready).
pub async fn active_stream(client: &Client) -> Result<Option<StreamRecord>, StorageError> {
    let row = client
        .query_opt(
            &format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE state IN ('ACTIVE', 'ERRORED') ORDER BY id DESC LIMIT 1"),
            &[],
        )
        .await?;
    row.as_ref().map(stream_from_row).transpose()
}

/// Stream `id` lost its slot, so its history cannot continue: it keeps serving clients as
/// ERRORED (or stops, if it never served) and a new stream with the same content (new id, new
/// slot, fresh snapshot) is returned. Only the lease holder `owner` may do this.
pub async fn restart_replication(client: &Client, id: i64, owner: &str, slot_prefix: &str) -> Result<StreamRecord, StorageError> {
    let row = client
        .query_opt(
            "UPDATE ferrosync.sync_rules SET state = CASE state WHEN 'ACTIVE' THEN 'ERRORED' ELSE 'STOP' END
             WHERE id = $1 AND lock_owner = $2 AND state IN ('ACTIVE', 'PROCESSING') RETURNING content",
            &[&id, &owner],
        )
        .await?
        .ok_or_else(|| StorageError::LeaseLost(format!("stream {id} is no longer ours to restart")))?;
    let content: String = row.get(0);
    stream_for_content(client, &content, slot_prefix).await
}

/// The stream with id `id`, as stored now.
pub async fn stream_by_id(client: &Client, id: i64) -> Result<Option<StreamRecord>, StorageError> {
    let row = client
        .query_opt(&format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE id = $1"), &[&id])
        .await?;
    row.as_ref().map(stream_from_row).transpose()
}

/// The stream's record of a source table, creating it if new. A table whose oid or key
/// columns changed gets a fresh record; the stale one is returned second so its rows can be removed.
pub async fn resolve_table(
    client: &Client,
    group: i64,
    oid: u32,
    schema: &str,
    name: &str,
    key_columns: &[String],
) -> Result<(SourceTableRecord, Option<SourceTableRecord>), StorageError> {
    let rows = client
        .query(
            "SELECT id, relation_oid, schema_name, table_name, key_columns, snapshot_done, snapshot_last_key, snapshot_rows
             FROM ferrosync.source_tables WHERE group_id = $1 AND ((schema_name = $2 AND table_name = $3) OR relation_oid = $4)",
            &[&group, &schema, &name, &i64::from(oid)],
        )
        .await?;
    let mut stale = None;
    for r in rows {
        let record = table_from_row(&r);
        if record.relation_oid == oid && record.schema == schema && record.name == name && record.key_columns == key_columns {
            return Ok((record, None));
        }
        stale = Some(record);
    }
    if let Some(old) = &stale {
        client
            .execute("DELETE FROM ferrosync.source_tables WHERE id = $1", &[&old.id])
            .await?;
    }
    let r = client
        .query_one(
            "INSERT INTO ferrosync.source_tables (group_id, relation_oid, schema_name, table_name, key_columns)
             VALUES ($1, $2, $3, $4, $5)
             RETURNING id, relation_oid, schema_name, table_name, key_columns, snapshot_done, snapshot_last_key, snapshot_rows",
            &[&group, &i64::from(oid), &schema, &name, &key_columns],
        )
        .await?;
    Ok((table_from_row(&r), stale))
}

fn table_from_row(r: &Row) -> SourceTableRecord {
    SourceTableRecord {
        id: r.get(0),
        relation_oid: r.get::<_, i64>(1) as u32,
        schema: r.get(2),
        name: r.get(3),
        key_columns: r.get(4),
        snapshot_done: r.get(5),
        snapshot_last_key: r.get(6),
        snapshot_rows: r.get(7),
    }
}

/// Record snapshot progress (after the rows up to `last_key` were flushed).
pub async fn save_table_progress(
    client: &impl tokio_postgres::GenericClient,
    table_id: i64,
    last_key: Option<&str>,
    rows: i64,
    done: bool,
) -> Result<(), StorageError> {
    client
        .execute(
            "UPDATE ferrosync.source_tables SET snapshot_last_key = $2, snapshot_rows = $3, snapshot_done = $4 WHERE id = $1",
            &[&table_id, &last_key, &rows, &done],
        )
        .await?;
    Ok(())
}

/// Delete everything a stream replicated (a snapshot that must restart from scratch).
pub async fn clear_group(client: &Client, group: i64) -> Result<(), StorageError> {
    let g = group as i32;
    for table in ["op_chunks", "current_data", "bucket_parameters", "bucket_changes"] {
        client
            .execute(&format!("DELETE FROM ferrosync.{table} WHERE group_id = $1"), &[&g])
            .await?;
    }
    client
        .execute("DELETE FROM ferrosync.source_tables WHERE group_id = $1", &[&group])
        .await?;
    client
        .execute(
            "UPDATE ferrosync.sync_rules SET snapshot_done = false, last_checkpoint = 0, last_checkpoint_lsn = NULL, no_checkpoint_before = NULL WHERE id = $1",
            &[&group],
        )
        .await?;
    Ok(())
}
