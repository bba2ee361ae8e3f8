//! What bucket storage holds and where its bytes are (`ferrosync storage stats`; serialisable so
//! an admin API can return it as JSON). Cheap on large storage: table sizes and row counts are
//! catalog estimates, op counts and bytes are sums of the chunks' counters and stored sizes (no
//! payload is decompressed). Per stream, current rows and parameter rows are exact counts (over
//! the primary key, whose first column is the stream).

use crate::error::StorageError;
use ferrosync_rules::{SyncRules, SyncRulesOptions};
use serde::Serialize;
use std::collections::HashMap;
use tokio_postgres::Client;

/// Everything `collect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct StorageStats {
    /// Tables of the `ferrosync` schema, largest first.
    pub tables: Vec<TableStats>,
    /// Sync-config versions (`sync_rules` rows), newest first.
    pub streams: Vec<StreamStats>,
    /// The largest buckets by stored bytes, over all streams.
    pub largest_buckets: Vec<BucketStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableStats {
    pub name: String,
    /// The planner's estimate (from the last ANALYZE, else the statistics collector).
    pub rows_estimate: i64,
    pub heap_bytes: i64,
    pub toast_bytes: i64,
    pub index_bytes: i64,
    pub total_bytes: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamStats {
    pub id: i64,
    pub state: String,
    pub slot_name: String,
    pub last_checkpoint: i64,
    pub last_checkpoint_lsn: Option<String>,
    pub ops: i64,
    /// Stored (compressed) op payload bytes.
    pub op_bytes: i64,
    pub buckets: i64,
    pub current_data_rows: i64,
    pub parameter_rows: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketStats {
    pub stream: i64,
    pub bucket: String,
    /// The sync-config definition (or stream) the bucket comes from, when its config parses.
    pub definition: Option<String>,
    pub ops: i64,
    pub bytes: i64,
}

/// Sizes per table, per stream, and the `top_n` largest buckets.
pub async fn collect(client: &Client, top_n: usize) -> Result<StorageStats, StorageError> {
    let streams = streams(client).await?;
    let definitions = definitions(client).await?;
    let mut largest_buckets = largest_buckets(client, top_n).await?;
    for b in &mut largest_buckets {
        b.definition = definitions
            .get(&b.stream)
            .and_then(|rules| rules.definition_of(&b.bucket))
            .map(str::to_string);
    }
    Ok(StorageStats {
        tables: tables(client).await?,
        streams,
        largest_buckets,
    })
}

async fn tables(client: &Client) -> Result<Vec<TableStats>, StorageError> {
    // reltuples is -1 until the first ANALYZE; the collector's live-row count stands in.
    let rows = client
        .query(
            "SELECT c.relname::text,
                    (CASE WHEN c.reltuples >= 0 THEN c.reltuples ELSE coalesce(s.n_live_tup, 0) END)::int8,
                    pg_relation_size(c.oid),
                    coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0),
                    pg_indexes_size(c.oid),
                    pg_total_relation_size(c.oid)
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
             WHERE n.nspname = 'ferrosync' AND c.relkind = 'r'
             ORDER BY pg_total_relation_size(c.oid) DESC, c.relname",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableStats {
            name: r.get(0),
            rows_estimate: r.get(1),
            heap_bytes: r.get(2),
            toast_bytes: r.get(3),
            index_bytes: r.get(4),
            total_bytes: r.get(5),
        })
        .collect())
}

async fn streams(client: &Client) -> Result<Vec<StreamStats>, StorageError> {
    let rows = client
        .query(
            "SELECT r.id, r.state, r.slot_name, r.last_checkpoint, r.last_checkpoint_lsn::text,
                    coalesce(o.ops, 0), coalesce(o.bytes, 0), coalesce(o.buckets, 0),
                    (SELECT count(*) FROM ferrosync.current_data d WHERE d.group_id = r.id),
                    (SELECT count(*) FROM ferrosync.bucket_parameters p WHERE p.group_id = r.id)
                      + (SELECT coalesce(sum(entry_count), 0)::int8 FROM ferrosync.parameter_packs p WHERE p.group_id = r.id)
             FROM ferrosync.sync_rules r
             LEFT JOIN (SELECT group_id, sum(op_count)::int8 AS ops, sum(octet_length(ops))::int8 AS bytes,
                               count(DISTINCT bucket) AS buckets
                        FROM ferrosync.op_chunks GROUP BY group_id) o ON o.group_id = r.id
             ORDER BY r.id DESC",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| StreamStats {
            id: r.get(0),
            state: r.get(1),
            slot_name: r.get(2),
            last_checkpoint: r.get(3),
            last_checkpoint_lsn: r.get(4),
            ops: r.get(5),
            op_bytes: r.get(6),
            buckets: r.get(7),
            current_data_rows: r.get(8),
            parameter_rows: r.get(9),
        })
        .collect())
}

async fn largest_buckets(client: &Client, top_n: usize) -> Result<Vec<BucketStats>, StorageError> {
    let limit = i64::try_from(top_n).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT group_id::int8, bucket, sum(op_count)::int8, sum(octet_length(ops))::int8
             FROM ferrosync.op_chunks GROUP BY group_id, bucket
             ORDER BY 4 DESC, 3 DESC, bucket LIMIT $1",
            &[&limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| BucketStats {
            stream: r.get(0),
            bucket: r.get(1),
            definition: None,
            ops: r.get(2),
            bytes: r.get(3),
        })
        .collect())
}

/// Each stream's parsed sync config (streams whose config no longer parses are left out).
async fn definitions(client: &Client) -> Result<HashMap<i64, SyncRules>, StorageError> {
    let rows = client.query("SELECT id, content FROM ferrosync.sync_rules", &[]).await?;
    let mut out = HashMap::new();
    for r in rows {
        let id: i64 = r.get(0);
        let options = SyncRulesOptions {
            sync_rules_id: id as u64,
            ..SyncRulesOptions::default()
        };
        if let Ok(rules) = SyncRules::parse(r.get(1), &options) {
            out.insert(id, rules);
        }
    }
    Ok(out)
}
