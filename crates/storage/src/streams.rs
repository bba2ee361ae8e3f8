//! Replication stream records (one per deployed sync config), their lease, and the source
//! tables each stream replicates.

use crate::error::StorageError;
use crate::model::{Checkpoint, SourceTableRecord, StreamRecord, StreamState};
use crate::writer::lsn_from_text;
use tokio_postgres::{Client, GenericClient, Row, Transaction};

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

/// Advisory-lock key serialising changes to which streams exist: two processes starting with
/// the same new config at once must create one stream, not two, and a stream replacing one
/// that lost its slot must not race a deploy into two PROCESSING streams.
pub(crate) const DEPLOY_LOCK: i64 = 0x6673_796e_6465_706c;

/// A transaction holding [`DEPLOY_LOCK`] (until it ends).
pub(crate) async fn deploy_transaction(client: &mut Client) -> Result<Transaction<'_>, StorageError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DEPLOY_LOCK]).await?;
    Ok(tx)
}

/// Deploy `content` (once, at process start): the existing PROCESSING/ACTIVE stream with the
/// same content, or a new PROCESSING stream beside the served one (older PROCESSING ones are
/// stopped: a newer config supersedes them). A process starting with an older config than a
/// deploy in progress finds its content ACTIVE and leaves the deploy be.
pub async fn stream_for_content(client: &mut Client, content: &str, slot_prefix: &str) -> Result<StreamRecord, StorageError> {
    let tx = deploy_transaction(client).await?;
    let existing = tx
        .query_opt(
            &format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE content = $1 AND state IN ('PROCESSING', 'ACTIVE') ORDER BY id DESC LIMIT 1"),
            &[&content],
        )
        .await?;
    if let Some(r) = existing {
        tx.commit().await?;
        return stream_from_row(&r);
    }
    let stream = insert_version(&tx, content, slot_prefix).await?;
    tx.commit().await?;
    Ok(stream)
}

/// Insert `content` as a new PROCESSING version (older PROCESSING ones stop: it supersedes
/// them). Call inside a [`deploy_transaction`].
pub(crate) async fn insert_version(tx: &Transaction<'_>, content: &str, slot_prefix: &str) -> Result<StreamRecord, StorageError> {
    let (id, slot) = new_stream_identity(tx, slot_prefix).await?;
    let stopped: Vec<i64> = tx
        .query(
            "UPDATE ferrosync.sync_rules SET state = 'STOP' WHERE state = 'PROCESSING' RETURNING id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO ferrosync.sync_rules (id, content, state, slot_name) VALUES ($1, $2, 'PROCESSING', $3)
                 RETURNING {STREAM_COLUMNS}"
            ),
            &[&id, &content, &slot],
        )
        .await?;
    tracing::info!(stream = id, slot = %slot, superseded = ?stopped, "sync config deployed: new replication stream PROCESSING");
    stream_from_row(&row)
}

/// A new stream's id and slot name (`<prefix><id>_<4 hex>`), so it is inserted whole.
async fn new_stream_identity(client: &impl GenericClient, slot_prefix: &str) -> Result<(i64, String), StorageError> {
    let id: i64 = client
        .query_one("SELECT nextval(pg_get_serial_sequence('ferrosync.sync_rules', 'id'))", &[])
        .await?
        .get(0);
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..4];
    Ok((id, format!("{slot_prefix}{id}_{suffix}")))
}

/// The stream clients are served from (an ERRORED one keeps serving until its replacement is ready).
pub async fn active_stream(client: &impl GenericClient) -> Result<Option<StreamRecord>, StorageError> {
    let row = client
        .query_opt(
            &format!("SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE state IN ('ACTIVE', 'ERRORED') ORDER BY id DESC LIMIT 1"),
            &[],
        )
        .await?;
    row.as_ref().map(stream_from_row).transpose()
}

/// Stream `id` lost its slot, so its history cannot continue: it keeps serving clients as
/// ERRORED (or stops, if it never served), in one statement with its replacement: a new stream
/// with the same content (new id, new slot, fresh snapshot). No replacement is made for a
/// served stream while another stream is PROCESSING: that one replaces it when it activates
/// (§5.3). Only the lease holder `owner` may do this; returns the replacement, if any.
pub async fn restart_replication(
    client: &mut Client,
    id: i64,
    owner: &str,
    slot_prefix: &str,
) -> Result<Option<StreamRecord>, StorageError> {
    let tx = deploy_transaction(client).await?;
    let (replacement, slot) = new_stream_identity(&tx, slot_prefix).await?;
    let row = tx
        .query_one(
            "WITH old AS (
                    UPDATE ferrosync.sync_rules SET state = CASE state WHEN 'ACTIVE' THEN 'ERRORED' ELSE 'STOP' END
                    WHERE id = $1 AND lock_owner = $2 AND state IN ('ACTIVE', 'PROCESSING') RETURNING content, state),
                 new AS (
                    INSERT INTO ferrosync.sync_rules (id, content, state, slot_name)
                    SELECT $3, content, 'PROCESSING', $4 FROM old
                    WHERE old.state = 'STOP' OR NOT EXISTS (
                        SELECT 1 FROM ferrosync.sync_rules WHERE state = 'PROCESSING' AND id <> $1)
                    RETURNING id)
                 SELECT (SELECT count(*) FROM old), (SELECT id FROM new)",
            &[&id, &owner, &replacement, &slot],
        )
        .await?;
    if row.get::<_, i64>(0) == 0 {
        return Err(StorageError::LeaseLost(format!(
            "stream {id} is no longer replicated by this process"
        )));
    }
    let replaced = match row.get::<_, Option<i64>>(1) {
        Some(new_id) => stream_by_id(&tx, new_id).await?,
        None => None,
    };
    tx.commit().await?;
    Ok(replaced)
}

/// The stream with id `id`, as stored now.
pub async fn stream_by_id(client: &impl GenericClient, id: i64) -> Result<Option<StreamRecord>, StorageError> {
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
/// columns changed gets a fresh record; the stale one is returned second so its rows can be
/// removed, and is kept until [`forget_table`] (a restart in between finds it again, so no
/// rows are left behind that nothing refers to).
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
    let (mut current, mut stale) = (None, None);
    for r in rows {
        let record = table_from_row(&r);
        if record.relation_oid == table.oid
            && record.schema == table.schema
            && record.name == table.name
            && record.key_columns == table.key_columns
        {
            current = Some(record);
        } else {
            stale = Some(record);
        }
    }
    if let Some(record) = current {
        return Ok((record, stale));
    }
    let fenced = || StorageError::LeaseLost(format!("another process took over replication stream {group}"));
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

/// Delete a stale table record once its rows are gone (see [`resolve_table`]).
pub async fn forget_table(client: &Client, group: i64, owner: &str, table_id: i64) -> Result<(), StorageError> {
    let deleted = client
        .execute(
            &format!("DELETE FROM ferrosync.source_tables WHERE id = $3 AND {OWNED}"),
            &[&group, &owner, &table_id],
        )
        .await?;
    if deleted == 0 {
        return Err(StorageError::LeaseLost(format!(
            "another process took over replication stream {group}"
        )));
    }
    Ok(())
}

pub(crate) fn table_from_row(r: &Row) -> SourceTableRecord {
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
    crate::lifecycle::delete_group_rows(client, group).await?;
    client
        .execute(
            "UPDATE ferrosync.sync_rules SET snapshot_done = false, last_checkpoint = 0, last_checkpoint_lsn = NULL, no_checkpoint_before = NULL WHERE id = $1",
            &[&group],
        )
        .await?;
    Ok(())
}
