//! In-place deploys: a new sync config that only adds, removes or changes bucket definitions
//! is built on the ACTIVE stream itself (same slot, same op ids) instead of as a new stream.
//!
//! The deploy records the config as *pending* on the stream row, with a bucket-prefix id per
//! definition: unchanged definitions keep theirs (so their buckets, ops and op ids stay, and
//! clients download nothing for them), added and changed ones get the deploy's fresh id. The
//! replicator holding the lease re-reads only the tables the new definitions read (progress
//! per table in `rebuild_tables`), then switches in the commit of a checkpoint: the row's
//! content becomes the pending one. Buckets and lookups of replaced definitions are deleted
//! afterwards in bounded batches ([`cleanup_retired`]).

use crate::error::StorageError;
use crate::model::{PendingConfig, StreamRecord, StreamState};
use crate::streams::{stream_by_id, stream_from_row, STREAM_COLUMNS};
use crate::writer::{lsn_from_text, lsn_to_text, TableProgress};
use ferrosync_rules::diff::{diff, plan_prefix_ids, ConfigDiff};
use ferrosync_rules::{SyncRules, SyncRulesOptions};
use std::collections::{BTreeMap, HashMap};
use tokio_postgres::{Client, GenericClient, Row};

/// Rows deleted per statement by [`cleanup_retired`].
const CLEANUP_BATCH: i64 = 1_000;

/// Suffix of the checkpoint-channel payload announcing a config switch of the same stream
/// (`<group>:config`), so API processes re-read the stream's rules.
pub const CONFIG_SWITCHED: &str = "config";

pub(crate) fn prefix_ids_from(text: Option<String>) -> Result<BTreeMap<String, u64>, StorageError> {
    match text {
        None => Ok(BTreeMap::new()),
        Some(t) => serde_json::from_str(&t).map_err(|e| StorageError::Corrupt(format!("sync_rules.prefix_ids: {e}"))),
    }
}

fn prefix_ids_text(ids: &BTreeMap<String, u64>) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "{}".into())
}

/// The pending config of a stream row, from columns `at..at+4` of [`STREAM_COLUMNS`].
pub(crate) fn pending_from_row(r: &Row, at: usize) -> Result<Option<PendingConfig>, StorageError> {
    let (Some(id), Some(content)) = (r.get::<_, Option<i64>>(at), r.get::<_, Option<String>>(at + 1)) else {
        return Ok(None);
    };
    let switch_lsn = match r.get::<_, Option<String>>(at + 3) {
        Some(text) => Some(lsn_from_text(&text).ok_or_else(|| StorageError::Corrupt(format!("bad lsn {text}")))?),
        None => None,
    };
    Ok(Some(PendingConfig {
        id,
        content,
        prefix_ids: prefix_ids_from(r.get(at + 2))?,
        switch_lsn,
    }))
}

/// Deploy `content` in place on the ACTIVE stream when it can be: the stream is returned
/// with `content` pending (or as it is, when `content` is what it serves or already builds).
/// `None` means the usual path ([`crate::streams::stream_for_content`]): `content` is served
/// already, or it needs a full deploy (no ACTIVE stream, a full deploy in progress, a change
/// outside the bucket definitions, unversioned bucket ids), which drops any pending in-place
/// deploy. A process whose config is the served one leaves a pending deploy alone (during a
/// rolling deploy, old processes must not undo it).
pub async fn deploy_in_place(client: &Client, content: &str, options: &SyncRulesOptions) -> Result<Option<StreamRecord>, StorageError> {
    // Checked without a lock first: standbys call this several times a second.
    match served(client, content, false).await? {
        Decision::Decided(outcome) => return Ok(outcome),
        Decision::Deploy(_) => {}
    }
    client.batch_execute("BEGIN").await?;
    // Serialised with full deploys (`streams::stream_for_content`) and the admin API's.
    let result = match client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&crate::streams::DEPLOY_LOCK])
        .await
    {
        Ok(_) => deploy_locked(client, content, options).await,
        Err(e) => Err(e.into()),
    };
    client.batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" }).await?;
    match result? {
        Some(id) => stream_by_id(client, id).await,
        None => Ok(None),
    }
}

enum Decision {
    Decided(Option<StreamRecord>),
    /// Deploy on this ACTIVE stream (or drop its pending deploy, when `content` cannot be).
    Deploy(Box<(StreamRecord, bool)>),
}

/// Whether `content` is served or pending already; else the ACTIVE stream to deploy it on,
/// and whether a full deploy is in progress. `lock`: rows are locked for the deploy.
async fn served(client: &Client, content: &str, lock: bool) -> Result<Decision, StorageError> {
    let rows = client
        .query(
            &format!(
                "SELECT {STREAM_COLUMNS} FROM ferrosync.sync_rules WHERE state IN ('ACTIVE', 'ERRORED', 'PROCESSING') ORDER BY id DESC {}",
                if lock { "FOR UPDATE" } else { "" }
            ),
            &[],
        )
        .await?;
    let streams = rows.iter().map(stream_from_row).collect::<Result<Vec<_>, _>>()?;
    let Some(active) = streams.iter().find(|s| s.state != StreamState::Processing) else {
        return Ok(Decision::Decided(None));
    };
    if active.content == content {
        return Ok(Decision::Decided(None));
    }
    if active.pending.as_ref().is_some_and(|p| p.content == content) {
        return Ok(Decision::Decided(Some(active.clone())));
    }
    let processing = streams.iter().any(|s| s.state == StreamState::Processing);
    Ok(Decision::Deploy(Box::new((active.clone(), processing))))
}

/// The deploy, in the caller's transaction: the id of the stream `content` is now pending on.
async fn deploy_locked(client: &Client, content: &str, options: &SyncRulesOptions) -> Result<Option<i64>, StorageError> {
    let (active, processing) = match served(client, content, true).await? {
        Decision::Decided(outcome) => return Ok(outcome.map(|s| s.id)),
        Decision::Deploy(target) => *target,
    };
    let plan = match (processing, active.state) {
        (false, StreamState::Active) => in_place_plan(&active, content, options),
        _ => None,
    };
    let Some(changes) = plan else {
        if active.pending.is_some() {
            set_pending(client, active.id, active.pending.as_ref(), None).await?;
            tracing::info!(stream = active.id, "in-place deploy superseded by a full deploy");
        }
        return Ok(None);
    };
    let fresh: i64 = client
        .query_one("SELECT nextval(pg_get_serial_sequence('ferrosync.sync_rules', 'id'))", &[])
        .await?
        .get(0);
    let pending = PendingConfig {
        id: fresh,
        content: content.to_string(),
        prefix_ids: plan_prefix_ids(&changes, &active.prefix_ids, active.id as u64, fresh as u64),
        switch_lsn: None,
    };
    set_pending(client, active.id, active.pending.as_ref(), Some(&pending)).await?;
    tracing::info!(
        stream = active.id,
        deploy = fresh,
        added = ?changes.added,
        changed = ?changes.changed,
        removed = ?changes.removed,
        unchanged = changes.unchanged.len(),
        "sync config deployed in place: only added and changed definitions are built"
    );
    Ok(Some(active.id))
}

/// The diff that makes `content` deployable in place on `active`, if it is.
fn in_place_plan(active: &StreamRecord, content: &str, options: &SyncRulesOptions) -> Option<ConfigDiff> {
    let changes = diff(&active.content, content)?;
    let rules = SyncRules::parse(content, &active.rules_options(options)).ok()?;
    rules.versioned_bucket_ids().then_some(changes)
}

/// Make `pending` the stream's pending deploy. What a pending deploy it replaces (`previous`)
/// built so far is queued for deletion: nothing will ever serve it.
async fn set_pending(
    tx: &impl GenericClient,
    id: i64,
    previous: Option<&PendingConfig>,
    pending: Option<&PendingConfig>,
) -> Result<(), StorageError> {
    if let Some(old) = previous {
        let built = abandoned(old);
        tx.execute(
            "UPDATE ferrosync.sync_rules SET retired_buckets = retired_buckets || $2::text[], retired_lookups = retired_lookups || $3::text[] WHERE id = $1",
            &[&id, &built.buckets, &built.lookups],
        )
        .await?;
    }
    tx.execute(
        "UPDATE ferrosync.sync_rules SET pending_id = $2, pending_content = $3, pending_prefix_ids = $4, pending_switch_lsn = NULL WHERE id = $1",
        &[
            &id,
            &pending.map(|p| p.id),
            &pending.map(|p| p.content.as_str()),
            &pending.map(|p| prefix_ids_text(&p.prefix_ids)),
        ],
    )
    .await?;
    tx.execute("DELETE FROM ferrosync.rebuild_tables WHERE group_id = $1", &[&id])
        .await?;
    Ok(())
}

/// The pending deploy id of stream `id` now (`None`: nothing pending), to notice a deploy
/// made while the stream replicates.
pub async fn pending_id(client: &Client, id: i64) -> Result<Option<i64>, StorageError> {
    let row = client
        .query_opt("SELECT pending_id FROM ferrosync.sync_rules WHERE id = $1", &[&id])
        .await?;
    Ok(row.and_then(|r| r.get(0)))
}

/// Re-read progress per table for a pending deploy: table id -> (last key, rows, done).
pub async fn rebuild_progress(
    client: &Client,
    group: i64,
    pending: i64,
) -> Result<HashMap<i64, (Option<String>, i64, bool)>, StorageError> {
    let rows = client
        .query(
            "SELECT table_id, last_key, rows, done FROM ferrosync.rebuild_tables WHERE group_id = $1 AND pending_id = $2",
            &[&group, &pending],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3)))).collect())
}

/// Record a table's re-read progress (in the transaction of the rows it covers).
pub(crate) async fn save_rebuild_progress(
    tx: &impl GenericClient,
    group: i64,
    pending: i64,
    p: &TableProgress,
) -> Result<(), StorageError> {
    tx.execute(
        "INSERT INTO ferrosync.rebuild_tables (group_id, pending_id, table_id, last_key, rows, done) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (group_id, pending_id, table_id) DO UPDATE SET last_key = $4, rows = $5, done = $6",
        &[&group, &pending, &p.table_id, &p.last_key, &p.rows, &p.done],
    )
    .await?;
    Ok(())
}

/// Every table is re-read for deploy `pending`: switch once the stream passes `lsn`. Fenced by
/// the lease, and by the deploy still being the pending one.
pub async fn mark_rebuilt(client: &Client, group: i64, owner: &str, pending: i64, lsn: u64) -> Result<bool, StorageError> {
    let updated = client
        .execute(
            "UPDATE ferrosync.sync_rules SET pending_switch_lsn = $4::text::pg_lsn WHERE id = $1 AND lock_owner = $2 AND pending_id = $3",
            &[&group, &owner, &pending, &lsn_to_text(lsn)],
        )
        .await?;
    Ok(updated == 1)
}

/// What a switch to a pending config retires: prefixes of bucket ids (`<id>#<name>[`) and of
/// lookup keys (`["<lookup name>",`) of the definitions it removes or replaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retired {
    pub buckets: Vec<String>,
    pub lookups: Vec<String>,
}

/// A switch to deploy `deploy`, made in the transaction of a checkpoint.
#[derive(Debug, Clone)]
pub struct Switch {
    pub deploy: i64,
    pub retired: Retired,
}

/// What switching `stream` to `pending` retires.
pub fn retired_prefixes(stream: &StreamRecord, pending: &PendingConfig) -> Retired {
    let Some(changes) = diff(&stream.content, &pending.content) else {
        return Retired::default();
    };
    let mut buckets = Vec::new();
    let mut lookups = Vec::new();
    for name in changes.removed.iter().chain(&changes.changed) {
        let id = stream.prefix_ids.get(name).copied().unwrap_or(stream.id as u64);
        buckets.push(format!("{id}#{name}["));
        let lookup_name = match id == stream.id as u64 {
            true => name.clone(),
            false => format!("{id}#{name}"),
        };
        lookups.push(format!("[{},", serde_json::Value::String(lookup_name)));
    }
    Retired { buckets, lookups }
}

/// The buckets and lookups of the definitions a pending deploy builds (those under its id).
fn abandoned(pending: &PendingConfig) -> Retired {
    let own = pending.prefix_ids.iter().filter(|(_, id)| **id == pending.id as u64);
    let (buckets, lookups) = own
        .map(|(name, id)| {
            let lookup_name = serde_json::Value::String(format!("{id}#{name}"));
            (format!("{id}#{name}["), format!("[{lookup_name},"))
        })
        .unzip();
    Retired { buckets, lookups }
}

/// The switch, in the transaction of a checkpoint: the pending config becomes the served one
/// and replaced definitions' prefixes are queued for deletion. API processes are told by a
/// [`CONFIG_SWITCHED`] notification sent after the checkpoint's own (listeners act on the last).
pub(crate) async fn switch(tx: &impl GenericClient, group: i64, switch: &Switch) -> Result<(), StorageError> {
    let pending = switch.deploy;
    let switched = tx
        .execute(
            "UPDATE ferrosync.sync_rules SET content = pending_content, prefix_ids = pending_prefix_ids,
                retired_buckets = retired_buckets || $3::text[], retired_lookups = retired_lookups || $4::text[],
                pending_id = NULL, pending_content = NULL, pending_prefix_ids = NULL, pending_switch_lsn = NULL
             WHERE id = $1 AND pending_id = $2",
            &[&group, &pending, &switch.retired.buckets, &switch.retired.lookups],
        )
        .await?;
    if switched != 1 {
        return Err(StorageError::LeaseLost(format!(
            "deploy {pending} is no longer pending on stream {group}"
        )));
    }
    tx.execute("DELETE FROM ferrosync.rebuild_tables WHERE group_id = $1", &[&group])
        .await?;
    Ok(())
}

/// Delete the buckets and lookups of replaced definitions, [`CLEANUP_BATCH`] rows per
/// statement with `pause` between statements; a prefix is dropped from the queue once
/// nothing is left under it. Returns the rows deleted.
pub async fn cleanup_retired(client: &Client, group: i64, pause: std::time::Duration) -> Result<u64, StorageError> {
    let Some(row) = client
        .query_opt(
            "SELECT retired_buckets, retired_lookups FROM ferrosync.sync_rules WHERE id = $1",
            &[&group],
        )
        .await?
    else {
        return Ok(0);
    };
    let (buckets, lookups): (Vec<String>, Vec<String>) = (row.get(0), row.get(1));
    let g = group as i32;
    let mut deleted = 0;
    let queues = [
        ("retired_buckets", "bucket", ["op_chunks", "bucket_compaction"], buckets),
        ("retired_lookups", "lookup", ["bucket_parameters", "parameter_packs"], lookups),
    ];
    for (queue, column, tables, prefixes) in queues {
        for prefix in &prefixes {
            // The column sorts bytewise (COLLATE "C"): the prefix's range is one index scan.
            let end = prefix_end(prefix);
            for table in tables {
                let sql = format!(
                    "DELETE FROM ferrosync.{table} WHERE ctid = ANY (ARRAY(SELECT ctid FROM ferrosync.{table}
                     WHERE group_id = $1 AND {column} >= $2 AND {column} < $3 AND starts_with({column}, $2) LIMIT {CLEANUP_BATCH}))"
                );
                deleted += delete_all(client, &sql, &[&g, prefix, &end], pause).await?;
            }
            client
                .execute(
                    &format!("UPDATE ferrosync.sync_rules SET {queue} = array_remove({queue}, $2) WHERE id = $1"),
                    &[&group, prefix],
                )
                .await?;
        }
    }
    if deleted > 0 {
        tracing::info!(
            stream = group,
            rows = deleted,
            "deleted buckets and lookups of replaced definitions"
        );
    }
    Ok(deleted)
}

/// The end of the range of texts that start with `prefix`, in bytewise order: the prefix with
/// its last character raised by one (retired prefixes end in `[` or `,`).
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    let last = end.pop().map_or(0, u32::from);
    end.extend(char::from_u32(last + 1));
    end
}

async fn delete_all(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    pause: std::time::Duration,
) -> Result<u64, StorageError> {
    let mut total = 0;
    loop {
        let n = client.execute(sql, params).await?;
        total += n;
        if n < CLEANUP_BATCH as u64 {
            return Ok(total);
        }
        tokio::time::sleep(pause).await;
    }
}
