//! One client connection: resolve its buckets at each new checkpoint, send `checkpoint` /
//! `checkpoint_diff`, the ops it lacks (strictly after its position, never twice), and
//! `checkpoint_complete`; plus `token_expires_in` keepalives on HTTP.

use crate::hub::{CheckpointHub, HubState};
use crate::lines::{
    BucketChecksumLine, Checkpoint, CheckpointDiff, CompleteLine, DataBatch, Line, LineFormat, OplogLine, PartialCompleteLine, Reason,
    StreamDescription,
};
use crate::output::{ChunkStream, Output};
use bytes::Bytes;
use ferrosync_rules::{BucketDescription, BucketReason, LookupKey, Querier, RequestParameters, StreamsRequest};
use ferrosync_storage::{BucketChecksum, OplogEntry, StorageError, SyncStorage};
use futures::Stream;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Ops per storage read. The next read is issued while this one is being sent.
const FETCH_LIMIT: usize = 2000;
/// Most ops in one `data` line.
const LINE_OPS: usize = 1000;
/// Interval of `token_expires_in` keepalive lines (protocol spec §2.4).
const KEEPALIVE: Duration = Duration::from_secs(20);

/// Per-connection limits (config `api.parameters`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_buckets: usize,
    pub max_parameter_results: usize,
}

/// What the client asked for, after authentication.
pub struct ConnectionRequest {
    /// `<sub>/<client_id>`, or `<sub>` without a client id: the write-checkpoint key.
    pub user_key: String,
    pub parameters: RequestParameters,
    /// Sync-stream subscriptions.
    pub streams: StreamsRequest,
    /// Buckets the client has, with the op_id it has them up to.
    pub buckets: Vec<(String, i64)>,
    /// Token expiry, unix seconds.
    pub expires_at: i64,
    pub format: LineFormat,
    /// Periodic `token_expires_in` lines (HTTP); RSocket relies on its own keepalives.
    pub keepalive_lines: bool,
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("[PSYNC_S2305] {0}")]
    TooMany(String),
}

struct Sent {
    checksum: BucketChecksum,
    priority: u8,
    reasons: Vec<BucketReason>,
}

struct Connection<S> {
    hub: Arc<CheckpointHub<S>>,
    req: ConnectionRequest,
    limits: Limits,
    out: Output,
    positions: HashMap<String, i64>,
    sent: Option<HashMap<String, Sent>>,
    querier: Option<Querier>,
    dynamic: Option<Vec<BucketDescription>>,
    /// Every lookup the last bucket resolution read: a change to any of them re-resolves.
    fetched: Vec<LookupKey>,
    last_checkpoint: i64,
    write_checkpoint: Option<i64>,
}

/// Serve one connection until the client disconnects, the token expires, or the active sync
/// config changes (the client then reconnects and gets the new buckets).
///
/// The connection runs as its response body: the returned stream drives it, so a held stream
/// costs no task of its own, and dropping the stream (the client went away) ends it at once.
///
/// The receiver gets the error that ends the connection, if one does: a transport can still
/// turn it into an error response (e.g. 500 `PSYNC_S2305` for too many buckets) or frame.
pub fn connection_stream<S: SyncStorage>(
    hub: Arc<CheckpointHub<S>>,
    req: ConnectionRequest,
    limits: Limits,
) -> (impl Stream<Item = Bytes> + Send + 'static, oneshot::Receiver<SyncError>) {
    let (report, ended_with) = oneshot::channel();
    let positions = req.buckets.iter().cloned().collect();
    let (out, slot) = Output::new(req.format);
    let mut conn = Connection {
        hub,
        req,
        limits,
        out,
        positions,
        sent: None,
        querier: None,
        dynamic: None,
        fetched: Vec::new(),
        last_checkpoint: 0,
        write_checkpoint: None,
    };
    let chunks = ChunkStream::new(
        async move {
            if let Err(e) = conn.run().await {
                tracing::warn!(user = %conn.req.user_key, error = %e, "sync stream ended with an error");
                let _ = report.send(e);
            }
        },
        slot,
    );
    (chunks, ended_with)
}

type Step<T> = Result<T, SyncError>;

fn storage<T>(r: Result<T, StorageError>) -> Step<T> {
    r.map_err(SyncError::Storage)
}

impl<S: SyncStorage> Connection<S> {
    /// Buffer a line (sent at the next [`Connection::flush`] or once a chunk is full).
    async fn send(&mut self, line: &Line<'_>) -> Step<()> {
        self.out.push(line).await;
        Ok(())
    }

    async fn flush(&mut self) -> Step<()> {
        self.out.flush().await;
        Ok(())
    }

    /// Send a line now: keepalives and final lines.
    async fn send_now(&mut self, line: &Line<'_>) -> Step<()> {
        self.send(line).await?;
        self.flush().await
    }

    fn seconds_left(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.req.expires_at - now
    }

    async fn run(&mut self) -> Step<()> {
        if self.seconds_left() <= 0 {
            return self.send_now(&Line::TokenExpiresIn(0)).await;
        }
        let mut states = self.hub.subscribe();
        let mut group = None;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        let warn_at = tokio::time::Instant::now() + Duration::from_secs((self.seconds_left() - 20).max(0) as u64);
        let expire_at = tokio::time::Instant::now() + Duration::from_secs(self.seconds_left().max(0) as u64);
        let mut warned = false;
        let mut fresh = true;
        loop {
            if !fresh {
                tokio::select! {
                    changed = states.changed() => if changed.is_err() { return Ok(()) },
                    _ = keepalive.tick(), if self.req.keepalive_lines => {
                        self.send_now(&Line::TokenExpiresIn(self.seconds_left().max(0))).await?;
                        continue;
                    }
                    _ = tokio::time::sleep_until(warn_at), if !warned => {
                        warned = true;
                        self.send_now(&Line::TokenExpiresIn(self.seconds_left().max(0))).await?;
                        continue;
                    }
                    _ = tokio::time::sleep_until(expire_at) => {
                        return self.send_now(&Line::TokenExpiresIn(0)).await;
                    }
                }
            }
            fresh = false;
            let Some(state) = states.borrow_and_update().clone() else {
                continue;
            };
            if *group.get_or_insert(state.group) != state.group {
                tracing::info!(user = %self.req.user_key, "sync config changed; closing stream so the client reconnects");
                return Ok(());
            }
            // Boxed: the checkpoint path (storage reads, prefetch) is several KiB of future
            // state that an idle stream, waiting in the `select!` above, should not carry.
            Box::pin(self.on_checkpoint(&state)).await?;
        }
    }

    /// The connection's buckets at this checkpoint. Lookups are fetched in rounds (nested
    /// subqueries need the results of inner ones) and the result is reused until one of the
    /// lookups it read changes.
    async fn resolve_buckets(&mut self, state: &HubState) -> Step<Vec<BucketDescription>> {
        let querier = self
            .querier
            .get_or_insert_with(|| state.rules.querier(&self.req.parameters, &self.req.streams));
        let stale = self.dynamic.is_none() || (!self.fetched.is_empty() && self.hub.lookups_changed(self.last_checkpoint, &self.fetched));
        if !stale {
            return Ok(self.dynamic.clone().unwrap_or_default());
        }
        let mut known: HashMap<LookupKey, Vec<String>> = HashMap::new();
        let mut total = 0;
        loop {
            let missing = querier.missing_lookups(&known);
            if missing.is_empty() {
                break;
            }
            let names: Vec<String> = missing.iter().map(|l| l.as_str().to_string()).collect();
            let mut found = storage(self.hub.storage().parameter_sets(state.group, state.checkpoint.op_id, &names).await)?;
            total += found.values().map(Vec::len).sum::<usize>();
            for lookup in missing {
                let rows = found.remove(lookup.as_str()).unwrap_or_default();
                known.insert(lookup, rows);
            }
            if total > self.limits.max_parameter_results {
                return Err(SyncError::TooMany(format!(
                    "Too many parameter query results: {total} (limit of {}); by query: {}",
                    self.limits.max_parameter_results,
                    breakdown(known.iter().map(|(l, rows)| (lookup_source(l.as_str()), rows.len())))
                )));
            }
        }
        self.fetched = known.keys().cloned().collect();
        let buckets = querier.resolve(&known);
        self.dynamic = Some(buckets.clone());
        Ok(buckets)
    }

    async fn on_checkpoint(&mut self, state: &HubState) -> Step<()> {
        let buckets = self.resolve_buckets(state).await?;
        if buckets.len() > self.limits.max_buckets {
            let rules = &state.rules;
            return Err(SyncError::TooMany(format!(
                "Too many buckets: {} (limit of {}); by definition: {}",
                buckets.len(),
                self.limits.max_buckets,
                breakdown(
                    buckets
                        .iter()
                        .map(|b| (rules.definition_of(&b.bucket).unwrap_or("?").to_string(), 1))
                )
            )));
        }
        let names: Vec<&str> = buckets.iter().map(|b| b.bucket.as_str()).collect();
        let cp = state.checkpoint;
        // `None`: the hub already moved to a newer checkpoint; we will be woken for it.
        let Some(checksums) = storage(self.hub.checksums(state.group, cp.op_id, &names).await)? else {
            return Ok(());
        };
        let visible = self.hub.write_checkpoint(&self.req.user_key, cp.lsn);
        let write_checkpoint = visible.max(self.write_checkpoint);
        let next: HashMap<String, Sent> = buckets
            .iter()
            .map(|b| {
                let sent = Sent {
                    checksum: checksums.get(&b.bucket).copied().unwrap_or_default(),
                    priority: b.priority,
                    reasons: b.reasons.clone(),
                };
                (b.bucket.clone(), sent)
            })
            .collect();
        let previous = self.sent.take();
        let to_fetch: Vec<&BucketDescription> = match &previous {
            None => {
                let streams = self.querier.as_ref().map(|q| q.streams().to_vec()).unwrap_or_default();
                let line = Checkpoint {
                    last_op_id: cp.op_id.to_string(),
                    write_checkpoint: write_checkpoint.map(|w| w.to_string()),
                    buckets: buckets.iter().map(|b| checksum_line(b, &next)).collect(),
                    streams: streams.iter().map(StreamDescription::new).collect(),
                };
                self.send(&Line::Checkpoint(line)).await?;
                self.positions.retain(|b, _| next.contains_key(b));
                buckets.iter().collect()
            }
            Some(previous) => {
                let updated: Vec<&BucketDescription> = buckets
                    .iter()
                    .filter(|b| {
                        previous
                            .get(&b.bucket)
                            .is_none_or(|p| p.checksum != next[&b.bucket].checksum || p.priority != b.priority)
                    })
                    .collect();
                let removed: Vec<&str> = previous.keys().filter(|b| !next.contains_key(*b)).map(String::as_str).collect();
                if updated.is_empty() && removed.is_empty() && write_checkpoint == self.write_checkpoint {
                    self.sent = Some(next);
                    self.last_checkpoint = cp.op_id;
                    self.advance_positions(cp.op_id, buckets.iter().map(|b| &b.bucket));
                    return Ok(());
                }
                let line = CheckpointDiff {
                    last_op_id: cp.op_id.to_string(),
                    write_checkpoint: write_checkpoint.map(|w| w.to_string()),
                    updated_buckets: updated.iter().map(|b| checksum_line(b, &next)).collect(),
                    removed_buckets: removed,
                };
                self.send(&Line::CheckpointDiff(line)).await?;
                self.positions.retain(|b, _| next.contains_key(b));
                updated
            }
        };
        let fetch: Vec<(String, u8)> = to_fetch.iter().map(|b| (b.bucket.clone(), b.priority)).collect();
        self.sent = Some(next);
        self.write_checkpoint = write_checkpoint;
        self.send_data(state, fetch).await?;
        self.last_checkpoint = cp.op_id;
        self.advance_positions(cp.op_id, buckets.iter().map(|b| &b.bucket));
        Ok(())
    }

    /// Stream ops for `fetch`, priority group by priority group, then `checkpoint_complete`.
    async fn send_data(&mut self, state: &HubState, fetch: Vec<(String, u8)>) -> Step<()> {
        let mut groups: BTreeMap<u8, Vec<String>> = BTreeMap::new();
        for (bucket, priority) in fetch {
            groups.entry(priority).or_default().push(bucket);
        }
        let last_priority = groups.keys().next_back().copied();
        let cp = state.checkpoint.op_id;
        for (priority, mut pending) in groups {
            pending.sort();
            let from_storage = self.send_recent(state, pending).await?;
            self.send_from_storage(state.group, cp, from_storage).await?;
            if Some(priority) != last_priority {
                self.send(&Line::PartialCheckpointComplete(PartialCompleteLine {
                    last_op_id: cp.to_string(),
                    priority,
                }))
                .await?;
            }
        }
        self.send_now(&Line::CheckpointComplete(CompleteLine {
            last_op_id: cp.to_string(),
        }))
        .await
    }

    /// After a complete checkpoint the client holds every op up to it in each of its buckets,
    /// the position a reconnecting client would state too. Keeping positions current lets the
    /// next checkpoint's data come from the hub's memory.
    fn advance_positions<'b>(&mut self, cp: i64, buckets: impl Iterator<Item = &'b String>) {
        for bucket in buckets {
            match self.positions.get_mut(bucket) {
                Some(position) => *position = (*position).max(cp),
                None => {
                    self.positions.insert(bucket.clone(), cp);
                }
            }
        }
    }

    /// Send what the hub holds in memory; returns the buckets that must be read from storage.
    async fn send_recent(&mut self, state: &HubState, pending: Vec<String>) -> Step<Vec<String>> {
        let mut from_storage = Vec::new();
        for bucket in pending {
            let position = self.positions.get(&bucket).copied().unwrap_or(0);
            let Some(ops) = self.hub.recent_ops(state.group, state.checkpoint.op_id, &bucket, position) else {
                from_storage.push(bucket);
                continue;
            };
            for (i, chunk) in ops.chunks(LINE_OPS).enumerate() {
                let has_more = (i + 1) * LINE_OPS < ops.len();
                self.send_ops(&bucket, chunk.iter().map(|op| &**op), has_more).await?;
            }
        }
        Ok(from_storage)
    }

    /// Read `pending` buckets from storage in batches; the next batch is read while the
    /// current one is encoded and sent.
    async fn send_from_storage(&mut self, group: i64, cp: i64, mut pending: Vec<String>) -> Step<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let store = self.hub.storage().clone();
        let requests = self.requests(&pending, None);
        let mut batch = storage(store.bucket_data(group, cp, &requests, FETCH_LIMIT).await)?;
        loop {
            let full = batch.resume.is_some();
            let next = batch.resume.as_ref().map(|(bucket, after)| {
                // Buckets before the one to resume are complete.
                if let Some(pos) = pending.iter().position(|b| b == bucket) {
                    pending.drain(..pos);
                }
                self.requests(&pending, Some((bucket.as_str(), *after)))
            });
            let prefetch = async {
                match &next {
                    Some(requests) => store.bucket_data(group, cp, requests, FETCH_LIMIT).await.map(Some),
                    None => Ok(None),
                }
            };
            let (fetched, sent) = tokio::join!(prefetch, self.send_batch(&batch.ops, full));
            sent?;
            match storage(fetched)? {
                Some(rows) => batch = rows,
                None => return Ok(()),
            }
        }
    }

    /// (bucket, position) for each pending bucket; `continue_from` overrides one position.
    fn requests(&self, pending: &[String], continue_from: Option<(&str, i64)>) -> Vec<(String, i64)> {
        pending
            .iter()
            .map(|b| {
                let position = match continue_from {
                    Some((bucket, op_id)) if bucket == b => op_id,
                    _ => self.positions.get(b).copied().unwrap_or(0),
                };
                (b.clone(), position)
            })
            .collect()
    }

    /// One storage batch as `data` lines: a line per bucket run, at most [`LINE_OPS`] ops each.
    async fn send_batch(&mut self, rows: &[(String, OplogEntry)], full: bool) -> Step<()> {
        let mut start = 0;
        while start < rows.len() {
            let bucket = &rows[start].0;
            let run_end = rows[start..]
                .iter()
                .position(|(b, _)| b != bucket)
                .map_or(rows.len(), |n| start + n);
            let end = run_end.min(start + LINE_OPS);
            let has_more = end < run_end || (full && end == rows.len());
            self.send_ops(bucket, rows[start..end].iter().map(|(_, op)| op), has_more).await?;
            start = end;
        }
        Ok(())
    }

    /// One `data` line for `bucket`, continuing from the connection's position.
    async fn send_ops<'o>(&mut self, bucket: &str, ops: impl Iterator<Item = &'o OplogEntry>, has_more: bool) -> Step<()> {
        let mut next_after = None;
        let data: Vec<OplogLine<'_>> = ops.inspect(|op| next_after = Some(op.op_id)).map(op_line).collect();
        let Some(next_after) = next_after else { return Ok(()) };
        let after = self.positions.get(bucket).copied().unwrap_or(0);
        let line = DataBatch {
            bucket,
            after: after.to_string(),
            next_after: next_after.to_string(),
            has_more,
            data,
        };
        self.send(&Line::Data(line)).await?;
        self.positions.insert(bucket.to_string(), next_after);
        Ok(())
    }
}

/// `name: count` pairs, largest first: which definitions or queries went over a limit.
fn breakdown(items: impl Iterator<Item = (String, usize)>) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (name, n) in items {
        *counts.entry(name).or_default() += n;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().filter(|(_, n)| *n > 0).collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.iter().map(|(name, n)| format!("{name}: {n}")).collect::<Vec<_>>().join(", ")
}

/// The query a lookup key belongs to: `definition#query_id` (legacy) or `subquery #i` (streams).
fn lookup_source(key: &str) -> String {
    let parts: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(key)
        .unwrap_or_default()
        .iter()
        .take(2)
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    match parts.as_slice() {
        [name, id] if name == "lookup" => format!("subquery #{id}"),
        [name, id] => format!("{name} (parameter query {id})"),
        _ => key.to_string(),
    }
}

fn checksum_line<'a>(b: &'a BucketDescription, next: &HashMap<String, Sent>) -> BucketChecksumLine<'a> {
    let sent = &next[&b.bucket];
    BucketChecksumLine {
        bucket: &b.bucket,
        checksum: i64::from(sent.checksum.checksum as i32),
        count: sent.checksum.count,
        priority: sent.priority,
        subscriptions: sent.reasons.iter().map(|r| Reason::from(*r)).collect(),
    }
}

fn op_line(op: &ferrosync_storage::OplogEntry) -> OplogLine<'_> {
    OplogLine {
        op_id: op.op_id.to_string(),
        op: op.op.as_str(),
        object_type: op.object_type.as_deref(),
        object_id: op.object_id.as_deref(),
        subkey: op.subkey.as_deref(),
        checksum: i64::from(op.checksum),
        data: op.data.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_errors_name_the_largest_sources_first() {
        let items = [("by_list", 3), ("global", 1), ("by_list", 2), ("empty", 0)].map(|(n, c)| (n.to_string(), c));
        assert_eq!(breakdown(items.into_iter()), "by_list: 5, global: 1");
    }

    #[test]
    fn lookup_keys_name_their_query() {
        assert_eq!(lookup_source(r#"["by_list","1","u1"]"#), "by_list (parameter query 1)");
        assert_eq!(lookup_source(r#"["lookup","3","u1"]"#), "subquery #3");
        assert_eq!(lookup_source("garbage"), "garbage");
    }
}
