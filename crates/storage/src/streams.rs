//! Replication stream records (one per deployed sync config), their lease, and the source
//! tables each stream replicates.

use crate::error::StorageError;
use crate::model::{Checkpoint, SourceTableRecord, StreamRecord, StreamState};
use crate::writer::lsn_from_text;
use tokio_postgres::{Client, Row};

pub(crate) const STREAM_COLUMNS: &str = "id, content, state, slot_name, snapshot_done, last_checkpoint, coalesce(last_checkpoint_lsn::text, '0/0'), coalesce(no_checkpoint_before::text, '0/0'), persisted_op, prefix_ids, pending_id, pending_content, pending_prefix_ids, pending_switch_lsn::text";

pub(crate) fn stream_from_row(r: &Row) -> Result<StreamRecord, StorageError> {
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
        prefix_ids: crate::incremental::prefix_ids_from(r.get(9))?,
        pending: crate::incremental::pending_from_row(r, 10)?,
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
    let (id, slot) = new_stream_identity(client, slot_prefix).await?;
    // One statement: nobody ever sees the old streams stopped and no new one yet.
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

/// A new stream's id and slot name (`<prefix><id>_<4 hex>`), so it is inserted whole.
async fn new_stream_identity(client: &Client, slot_prefix: &str) -> Result<(i64, String), StorageError> {
    let id: i64 = client
        .query_one("SELECT nextval(pg_get_serial_sequence('ferrosync.sync_rules', 'id'))", &[])
        .await?
        .get(0);
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..4];
    Ok((id, format!("{slot_prefix}{id}_{suffix}")))
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
/// slot, fresh snapshot) is returned, in one statement. Only the lease holder `owner` may do this.
pub async fn restart_replication(client: &Client, id: i64, owner: &str, slot_prefix: &str) -> Result<StreamRecord, StorageError> {
    let (new_id, slot) = new_stream_identity(client, slot_prefix).await?;
    let row = client
        .query_opt(
            &format!(
                "WITH old AS (
                    UPDATE ferrosync.sync_rules SET state = CASE state WHEN 'ACTIVE' THEN 'ERRORED' ELSE 'STOP' END
                    WHERE id = $1 AND lock_owner = $2 AND state IN ('ACTIVE', 'PROCESSING') RETURNING content)
                 INSERT INTO ferrosync.sync_rules (id, content, state, slot_name)
                 SELECT $3, content, 'PROCESSING', $4 FROM old
                 RETURNING {STREAM_COLUMNS}"
            ),
            &[&id, &owner, &new_id, &slot],
        )
        .await?
        .ok_or_else(|| StorageError::LeaseLost(format!("stream {id} is no longer replicated by this process")))?;
    stream_from_row(&row)
}

/// The stream with id `id`, as stored now.
pub async fn stream_by_id(client: &Client, id: i64) -> Result<Option<StreamRecord>, StorageError> {
    let row = client
        .query_opt(&format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE id = $1"), &[&id])
        .await?;
    row.as_ref().map(stream_from_row).transpose()
}

/// What identifies a source table to a stream: a change in any of it means a new table record.
pub struct TableIdentity<'a> {
    pub oid: u32,
    pub schema: &'a str,
    pub name: &'a str,
    pub key_columns: &'a [String],
}

/// Taken only while `owner` holds the stream's lease (a fenced-out replicator changes nothing);
/// `FOR SHARE` waits for a takeover in progress and then sees its outcome.
const OWNED: &str = "EXISTS (SELECT 1 FROM ferrosync.sync_rules WHERE id = $1 AND lock_owner = $2 FOR SHARE)";

/// The stream's record of a source table, creating it if new. A table whose oid or key
/// columns changed gets a fresh record; the stale one is returned second so its rows can be removed.
pub async fn resolve_table(
    client: &Client,
    group: i64,
    owner: &str,
    table: &TableIdentity<'_>,
) -> Result<(SourceTableRecord, Option<SourceTableRecord>), StorageError> {
    let oid = i64::from(table.oid);
    let rows = client
        .query(
            "SELECT id, relation_oid, schema_name, table_name, key_columns, snapshot_done, snapshot_last_key, snapshot_rows
             FROM ferrosync.source_tables WHERE group_id = $1 AND ((schema_name = $2 AND table_name = $3) OR relation_oid = $4)",
            &[&group, &table.schema, &table.name, &oid],
        )
        .await?;
    let mut stale = None;
    for r in rows {
        let record = table_from_row(&r);
        if record.relation_oid == table.oid
            && record.schema == table.schema
            && record.name == table.name
            && record.key_columns == table.key_columns
        {
            return Ok((record, None));
        }
        stale = Some(record);
    }
    let fenced = || StorageError::LeaseLost(format!("another process took over replication stream {group}"));
    if let Some(old) = &stale {
        let deleted = client
            .execute(
                &format!("DELETE FROM ferrosync.source_tables WHERE id = $3 AND {OWNED}"),
                &[&group, &owner, &old.id],
            )
            .await?;
        if deleted == 0 {
            return Err(fenced());
        }
    }
    let r = client
        .query_opt(
            &format!(
                "INSERT INTO ferrosync.source_tables (group_id, relation_oid, schema_name, table_name, key_columns)
                 SELECT $1, $3::int8, $4::text, $5::text, $6::text[] WHERE {OWNED}
                 RETURNING id, relation_oid, schema_name, table_name, key_columns, snapshot_done, snapshot_last_key, snapshot_rows"
            ),
            &[&group, &owner, &oid, &table.schema, &table.name, &table.key_columns],
        )
        .await?
        .ok_or_else(fenced)?;
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
    for table in [
        "op_chunks",
        "current_data",
        "bucket_parameters",
        "bucket_changes",
        "bucket_compaction",
    ] {
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
