//! Storage hygiene: deletes what a long-running service no longer needs, so bucket storage
//! grows with live data, not with time or churn. Run in the background beside compaction, in
//! small autocommit statements, never waiting for replication or serving.
//!
//! - **Parameter lookup history** (`bucket_parameters`): rows are append-only (every change of
//!   a source row adds a version), so reads can evaluate lookups as of a checkpoint. A version
//!   superseded at or below a horizon checkpoint, and a tombstone (`'[]'`) at or below it, are
//!   invisible to every read at the horizon or later, and are deleted. The caller picks a
//!   horizon no connection still reads below (one that is minutes old).
//! - **Server-generated write checkpoints** (`GET /write-checkpoint2.json`): one row per
//!   `<user>/<client>` that the reference keeps forever. A row not written for the retention
//!   period, whose source position the served checkpoint has passed (so every connection had
//!   it), is deleted. Ids stay monotone per key: the largest pruned id is kept
//!   (`write_checkpoint_floor`) and a key's new row starts above it. A client that requested an
//!   id and then stayed offline longer than the retention without writing again is not told
//!   of that id any more; any later upload gets a larger one.
//! - **Compaction markers** (`bucket_compaction`) of buckets that have no ops any more.
//! - **Rows of forgotten source tables**: current state, parameter rows and parameter packs
//!   (see [`crate::pack`], which hold no superseded entries and need no pruning) whose table record
//!   is gone. A re-created table's old record is only deleted once its rows were removed (see
//!   [`crate::streams::resolve_table`]); earlier versions deleted it first, and a crash in
//!   between left such rows behind for good.
//!
//! Client-requested write checkpoints expire separately (`checkpoint_request_retention_minutes`,
//! see [`crate::checkpoint_requests`]); `bucket_changes` is pruned by the writer.

use crate::error::StorageError;
use crate::writer::lsn_to_text;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

/// Rows examined (parameter history) or deleted (others) per statement.
const PAGE_ROWS: i64 = 1000;

/// Limits of one pass.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Parameter versions superseded at or below this op_id are deleted (0: none).
    pub parameter_horizon: i64,
    /// Server-generated write checkpoints not written for this long are deleted.
    pub write_checkpoint_retention: Duration,
    /// Pause after each statement: bounds the I/O a pass puts on storage.
    pub pause: Duration,
}

/// What a pass deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneStats {
    pub parameter_rows: u64,
    pub write_checkpoints: u64,
    pub compaction_markers: u64,
    pub orphan_rows: u64,
}

/// One pass over stream `group`'s parameter history, and the shared write checkpoints and
/// compaction markers.
pub async fn prune(client: &mut Client, group: i64, options: &PruneOptions) -> Result<PruneStats, StorageError> {
    Ok(PruneStats {
        parameter_rows: prune_parameters(client, group, options.parameter_horizon, options.pause).await?,
        write_checkpoints: prune_write_checkpoints(client, options.write_checkpoint_retention, options.pause).await?,
        compaction_markers: prune_compaction_markers(client, options.pause).await?,
        orphan_rows: prune_orphan_rows(client, group, options.pause).await?,
    })
}

/// Where the scan of `bucket_parameters` continues: the last row of the previous page.
type Cursor = (String, i64, Uuid, i64);

/// Walk the group's lookups in primary-key order, a page at a time, deleting versions that no
/// read at `horizon` or later can see. Older versions of a row come before newer ones, so a
/// tombstone is only deleted after the versions it hides.
async fn prune_parameters(client: &Client, group: i64, horizon: i64, pause: Duration) -> Result<u64, StorageError> {
    if horizon <= 0 {
        return Ok(0);
    }
    let mut cursor: Cursor = (String::new(), i64::MIN, Uuid::nil(), i64::MIN);
    let mut deleted = 0u64;
    loop {
        let row = client
            .query_one(
                "WITH page AS (
                    SELECT lookup, table_id, key, id, bucket_parameters = '[]' AS tombstone
                    FROM ferrosync.bucket_parameters
                    WHERE group_id = $1 AND (lookup, table_id, key, id) > ($2, $3, $4, $5)
                    ORDER BY lookup, table_id, key, id LIMIT $6),
                 doomed AS (
                    SELECT p.lookup, p.table_id, p.key, p.id FROM page p
                    WHERE p.id <= $7 AND (p.tombstone OR EXISTS (
                        SELECT 1 FROM ferrosync.bucket_parameters n
                        WHERE n.group_id = $1 AND n.lookup = p.lookup AND n.table_id = p.table_id AND n.key = p.key
                          AND n.id > p.id AND n.id <= $7)
                      OR NOT EXISTS (SELECT 1 FROM ferrosync.source_tables s WHERE s.id = p.table_id AND s.group_id = $1))),
                 gone AS (
                    DELETE FROM ferrosync.bucket_parameters b USING doomed d
                    WHERE b.group_id = $1 AND b.lookup = d.lookup AND b.table_id = d.table_id AND b.key = d.key AND b.id = d.id
                    RETURNING 1),
                 last AS (SELECT * FROM page ORDER BY lookup DESC, table_id DESC, key DESC, id DESC LIMIT 1)
                 SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM page),
                        last.lookup, last.table_id, last.key, last.id
                 FROM (SELECT 1) one LEFT JOIN last ON true",
                &[&(group as i32), &cursor.0, &cursor.1, &cursor.2, &cursor.3, &PAGE_ROWS, &horizon],
            )
            .await?;
        deleted += row.get::<_, i64>(0) as u64;
        let seen: i64 = row.get(1);
        let (Some(lookup), Some(table_id), Some(key), Some(id)) = (row.get(2), row.get(3), row.get(4), row.get(5)) else {
            return Ok(deleted);
        };
        if seen < PAGE_ROWS {
            return Ok(deleted);
        }
        cursor = (lookup, table_id, key, id);
        tokio::time::sleep(pause).await;
    }
}

/// Delete server-generated write checkpoints not written for `retention` whose position the
/// served checkpoint has passed, raising the floor new rows start above.
async fn prune_write_checkpoints(client: &mut Client, retention: Duration, pause: Duration) -> Result<u64, StorageError> {
    let Some(served) = served_lsn(client).await? else {
        return Ok(0);
    };
    let seconds = retention.as_secs_f64();
    let served = lsn_to_text(served);
    let mut deleted = 0u64;
    loop {
        let tx = client.transaction().await?;
        // Taken first: a concurrent insert of a pruned key either committed before (and its
        // row is too recent to be deleted here) or waits and then sees the raised floor.
        tx.execute("SELECT 1 FROM ferrosync.write_checkpoint_floor FOR UPDATE", &[]).await?;
        let n: i64 = tx
            .query_one(
                "WITH gone AS (
                    DELETE FROM ferrosync.write_checkpoints WHERE ctid = ANY (ARRAY(
                        SELECT ctid FROM ferrosync.write_checkpoints
                        WHERE requested_at IS NULL AND updated_at < now() - $1::float8 * interval '1 second'
                          AND lsn <= $2::text::pg_lsn
                        LIMIT $3))
                    RETURNING write_checkpoint),
                 -- Runs whether or not the result reads it, as every data-modifying WITH does.
                 raised AS (
                    UPDATE ferrosync.write_checkpoint_floor
                    SET pruned_to = greatest(pruned_to, (SELECT coalesce(max(write_checkpoint), 0) FROM gone)))
                 SELECT count(*) FROM gone",
                &[&seconds, &served, &PAGE_ROWS],
            )
            .await?
            .get(0);
        tx.commit().await?;
        deleted += n as u64;
        if n < PAGE_ROWS {
            return Ok(deleted);
        }
        tokio::time::sleep(pause).await;
    }
}

/// The source position of the served stream's checkpoint (`None`: nothing served yet).
async fn served_lsn(client: &Client) -> Result<Option<u64>, StorageError> {
    let row = client
        .query_opt(
            "SELECT last_checkpoint_lsn::text FROM ferrosync.sync_rules
             WHERE state IN ('ACTIVE', 'ERRORED') AND last_checkpoint_lsn IS NOT NULL ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await?;
    let Some(text) = row.and_then(|r| r.get::<_, Option<String>>(0)) else {
        return Ok(None);
    };
    crate::writer::lsn_from_text(&text)
        .map(Some)
        .ok_or_else(|| StorageError::Corrupt(format!("bad checkpoint lsn {text}")))
}

/// Delete compaction markers of buckets without chunks (their stream or bucket was removed).
async fn prune_compaction_markers(client: &Client, pause: Duration) -> Result<u64, StorageError> {
    let mut deleted = 0u64;
    loop {
        let n = client
            .execute(
                "DELETE FROM ferrosync.bucket_compaction WHERE ctid = ANY (ARRAY(
                    SELECT k.ctid FROM ferrosync.bucket_compaction k
                    WHERE NOT EXISTS (SELECT 1 FROM ferrosync.op_chunks c WHERE c.group_id = k.group_id AND c.bucket = k.bucket)
                    LIMIT $1))",
                &[&PAGE_ROWS],
            )
            .await?;
        deleted += n;
        if (n as i64) < PAGE_ROWS {
            return Ok(deleted);
        }
        tokio::time::sleep(pause).await;
    }
}

/// Delete current state (and parameter packs) of table ids the group has no record of, found
/// by skipping through the primary key (one probe per table id, not a scan). Packs go first: a
/// table's rows are how its id is found again after an interrupted pass.
async fn prune_orphan_rows(client: &Client, group: i64, pause: Duration) -> Result<u64, StorageError> {
    let g = group as i32;
    let orphans: Vec<i32> = client
        .query(
            "WITH RECURSIVE t(table_id) AS (
                (SELECT table_id FROM ferrosync.current_data WHERE group_id = $1 ORDER BY table_id LIMIT 1)
                UNION ALL
                SELECT (SELECT d.table_id FROM ferrosync.current_data d WHERE d.group_id = $1 AND d.table_id > t.table_id
                        ORDER BY d.table_id LIMIT 1)
                FROM t WHERE t.table_id IS NOT NULL)
             SELECT table_id FROM t WHERE table_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM ferrosync.source_tables s WHERE s.id = t.table_id AND s.group_id = $2)",
            &[&g, &group],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut deleted = 0u64;
    for table_id in orphans {
        for table in ["parameter_packs", "current_data"] {
            let sql = format!(
                "DELETE FROM ferrosync.{table} WHERE ctid = ANY (ARRAY(
                    SELECT ctid FROM ferrosync.{table} WHERE group_id = $1 AND table_id = $2::int8 LIMIT $3))"
            );
            loop {
                let n = client.execute(&sql, &[&g, &i64::from(table_id), &PAGE_ROWS]).await?;
                deleted += n;
                tokio::time::sleep(pause).await;
                if (n as i64) < PAGE_ROWS {
                    break;
                }
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests;
