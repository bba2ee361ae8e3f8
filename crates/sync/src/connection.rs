//! One client connection: resolve its buckets at each new checkpoint, send `checkpoint` /
//! `checkpoint_diff`, the ops it lacks (strictly after its position, never twice), and
//! `checkpoint_complete`; plus `token_expires_in` keepalives on HTTP. A newer checkpoint that
//! changes the client's buckets interrupts a long download (see [`Interrupts`]).

use crate::hub::{CheckpointHub, HubState};
use crate::interrupts::Interrupts;
use crate::lines::{
    line_len, op_line, BucketChecksumLine, Checkpoint, CheckpointDiff, CompleteLine, DataBatch, Line, LineFormat, OplogLine,
    PartialCompleteLine, Reason, StreamDescription,
};
use crate::output::{ChunkStream, Output};
use crate::stats::ConnectionStats;
use crate::write_checkpoints::WriteCheckpointWatch;
use bytes::Bytes;
use ferrosync_rules::{BucketDescription, BucketReason, LookupKey, Querier, RequestParameters, StreamsRequest, SyncRules};
use ferrosync_storage::{BucketChecksum, OplogEntry, StorageError, SyncStorage};
use futures::Stream;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Ops per storage read. The next read is issued while this one is being sent.
const FETCH_LIMIT: usize = 2000;
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
    /// Filled in as the connection runs, read by the transport when it ends.
    pub stats: Arc<ConnectionStats>,
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("[PSYNC_S2305] {0}")]
    TooMany(String),
}

impl SyncError {
    /// The code clients are given for it.
    pub fn code(&self) -> &'static str {
        match self {
            SyncError::Storage(_) => "PSYNC_S2401",
            SyncError::TooMany(_) => "PSYNC_S2305",
        }
    }
}

struct Sent {
    checksum: BucketChecksum,
    priority: u8,
    reasons: Vec<BucketReason>,
}

/// What a checkpoint means for this connection.
enum Next {
    /// The hub moved past it meanwhile; it announces the newer one.
    Gone,
    /// Nothing the client holds changed: no line (the new bucket states).
    Unchanged(HashMap<String, Sent>),
    Line(Box<Plan>),
}

/// A `checkpoint` (the connection's first) or `checkpoint_diff` line to send, and the bucket
/// states the client tracks after it.
struct Plan {
    state: HubState,
    full: bool,
    /// Every bucket (full), or the new and changed ones (diff): all of them are downloaded.
    announced: Vec<BucketDescription>,
    removed: Vec<String>,
    next: HashMap<String, Sent>,
    write_checkpoint: Option<i64>,
}

/// Why a download stopped before its `checkpoint_complete`.
enum Halt {
    Failed(SyncError),
    /// A newer checkpoint changed the client's buckets: announce it and continue from there.
    Newer(Box<Plan>),
    /// A new sync config became active: the client reconnects for its buckets.
    ConfigChanged,
}

impl From<SyncError> for Halt {
    fn from(e: SyncError) -> Self {
        Halt::Failed(e)
    }
}

struct Connection<S> {
    hub: Arc<CheckpointHub<S>>,
    states: watch::Receiver<Option<HubState>>,
    req: ConnectionRequest,
    limits: Limits,
    out: Output,
    positions: HashMap<String, i64>,
    sent: Option<HashMap<String, Sent>>,
    /// Announced buckets not yet sent up to the announced checkpoint; a newer checkpoint's
    /// download carries them over.
    pending: HashSet<String>,
    interrupts: Interrupts,
    querier: Option<Querier>,
    /// The rules `querier` was made from: a config switched in place (same stream, new
    /// rules) makes a new one.
    querier_rules: Option<Arc<SyncRules>>,
    dynamic: Option<Vec<BucketDescription>>,
    /// Every lookup the last bucket resolution read: a change to any of them re-resolves.
    fetched: Vec<LookupKey>,
    /// The checkpoint `dynamic` is valid at.
    resolved_at: i64,
    write_checkpoint: Option<i64>,
    /// Keeps this user's write checkpoint in the hub while the connection lives.
    write_checkpoint_watch: Option<WriteCheckpointWatch>,
    /// The last checkpoint announced was not completed: compaction rewrote ops it sent
    /// against newer ones. A later checkpoint gets a line (if need be an empty diff) and its
    /// `checkpoint_complete`.
    incomplete: bool,
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
        states: hub.subscribe(),
        hub,
        req,
        limits,
        out,
        positions,
        sent: None,
        pending: HashSet::new(),
        interrupts: Interrupts::default(),
        querier: None,
        querier_rules: None,
        dynamic: None,
        fetched: Vec::new(),
        resolved_at: 0,
        write_checkpoint: None,
        write_checkpoint_watch: None,
        incomplete: false,
    };
    let chunks = ChunkStream::new(
        async move {
            if let Err(e) = conn.run().await {
                tracing::warn!(user = %conn.req.user_key, error = %e, "sync stream ended with an error");
                ferrosync_metrics::error(e.code());
                conn.req.stats.end(e.to_string());
                let _ = report.send(e);
            }
        },
        slot,
    );
    (chunks, ended_with)
}

type Step<T> = Result<T, SyncError>;
type Flow<T> = Result<T, Halt>;

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
            return self.token_expired().await;
        }
        self.write_checkpoint_watch = Some(storage(self.hub.watch_write_checkpoints(&self.req.user_key).await)?);
        let mut group = None;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        let warn_at = tokio::time::Instant::now() + Duration::from_secs((self.seconds_left() - 20).max(0) as u64);
        let expire_at = tokio::time::Instant::now() + Duration::from_secs(self.seconds_left().max(0) as u64);
        let mut warned = false;
        let mut fresh = true;
        loop {
            if !fresh {
                tokio::select! {
                    changed = self.states.changed() => if changed.is_err() {
                        self.req.stats.end("service shutting down");
                        return Ok(());
                    },
                    _ = keepalive.tick(), if self.req.keepalive_lines => {
                        self.send_now(&Line::TokenExpiresIn(self.seconds_left().max(0))).await?;
                        continue;
                    }
                    _ = tokio::time::sleep_until(warn_at), if !warned => {
                        warned = true;
                        self.send_now(&Line::TokenExpiresIn(self.seconds_left().max(0))).await?;
                        continue;
                    }
                    _ = tokio::time::sleep_until(expire_at) => return self.token_expired().await,
                }
            }
            fresh = false;
            let Some(state) = self.states.borrow_and_update().clone() else {
                continue;
            };
            if *group.get_or_insert(state.group) != state.group {
                return self.config_changed();
            }
            let fanout = state.fanout.clone();
            // Boxed: the checkpoint path (storage reads, prefetch) is several KiB of future
            // state that an idle stream, waiting in the `select!` above, should not carry.
            if !Box::pin(self.on_checkpoint(state)).await? {
                return self.config_changed();
            }
            fanout.reached();
        }
    }

    fn config_changed(&self) -> Step<()> {
        tracing::info!(user = %self.req.user_key, "sync config changed; closing stream so the client reconnects");
        self.req.stats.end("sync config changed");
        Ok(())
    }

    async fn token_expired(&mut self) -> Step<()> {
        self.req.stats.end("token expired");
        self.send_now(&Line::TokenExpiresIn(0)).await
    }

    /// The connection's buckets at this checkpoint. Lookups are fetched in rounds (nested
    /// subqueries need the results of inner ones) and the result is reused until one of the
    /// lookups it read changes.
    async fn resolve_buckets(&mut self, state: &HubState) -> Step<Vec<BucketDescription>> {
        if !self.querier_rules.as_ref().is_some_and(|r| Arc::ptr_eq(r, &state.rules)) {
            self.querier = None;
            self.dynamic = None;
            self.querier_rules = Some(state.rules.clone());
        }
        let querier = self
            .querier
            .get_or_insert_with(|| state.rules.querier(&self.req.parameters, &self.req.streams));
        let stale = self.dynamic.is_none() || (!self.fetched.is_empty() && self.hub.lookups_changed(self.resolved_at, &self.fetched));
        if !stale {
            self.resolved_at = state.checkpoint.op_id;
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
        self.resolved_at = state.checkpoint.op_id;
        Ok(buckets)
    }

    /// Announce a new checkpoint and send its data; a newer checkpoint that arrives during a
    /// long download is announced as soon as [`Interrupts`] allows, and the download goes on
    /// from where it was, up to the newer checkpoint. `false`: a new sync config is active.
    async fn on_checkpoint(&mut self, state: HubState) -> Step<bool> {
        let mut plan = match self.plan(state.clone()).await? {
            Next::Gone => return Ok(true),
            Next::Unchanged(next) => {
                self.sent = Some(next);
                self.advance_positions(state.checkpoint.op_id);
                return Ok(true);
            }
            Next::Line(plan) => plan,
        };
        loop {
            let state = self.announce(*plan).await?;
            match self.download(&state).await {
                Ok(()) => return Ok(true),
                Err(Halt::Newer(newer)) => plan = newer,
                Err(Halt::ConfigChanged) => return Ok(false),
                Err(Halt::Failed(e)) => return Err(e),
            }
        }
    }

    /// What `state` means for the client, compared with what it was last told. Changes
    /// nothing but the bucket resolution.
    async fn plan(&mut self, state: HubState) -> Step<Next> {
        let buckets = self.resolve_buckets(&state).await?;
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
        let Some(checksums) = storage(self.hub.checksums(state.group, cp.op_id, &names).await)? else {
            return Ok(Next::Gone);
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
        let Some(previous) = &self.sent else {
            return Ok(Next::Line(Box::new(Plan {
                state,
                full: true,
                announced: buckets,
                removed: Vec::new(),
                next,
                write_checkpoint,
            })));
        };
        let updated: Vec<BucketDescription> = buckets
            .into_iter()
            .filter(|b| {
                previous
                    .get(&b.bucket)
                    .is_none_or(|p| p.checksum != next[&b.bucket].checksum || p.priority != b.priority)
            })
            .collect();
        let removed: Vec<String> = previous.keys().filter(|b| !next.contains_key(*b)).cloned().collect();
        if updated.is_empty() && removed.is_empty() && write_checkpoint == self.write_checkpoint && !self.incomplete {
            return Ok(Next::Unchanged(next));
        }
        Ok(Next::Line(Box::new(Plan {
            state,
            full: false,
            announced: updated,
            removed,
            next,
            write_checkpoint,
        })))
    }

    /// Send the plan's line and take on its bucket states; returns the checkpoint to download.
    async fn announce(&mut self, plan: Plan) -> Step<HubState> {
        let last_op_id = plan.state.checkpoint.op_id.to_string();
        let write_checkpoint = plan.write_checkpoint.map(|w| w.to_string());
        let buckets = plan.announced.iter().map(|b| checksum_line(b, &plan.next)).collect();
        let streams = match (plan.full, &self.querier) {
            (true, Some(querier)) => querier.streams().to_vec(),
            _ => Vec::new(),
        };
        let line = if plan.full {
            Line::Checkpoint(Checkpoint {
                last_op_id,
                write_checkpoint,
                buckets,
                streams: streams.iter().map(StreamDescription::new).collect(),
            })
        } else {
            Line::CheckpointDiff(CheckpointDiff {
                last_op_id,
                write_checkpoint,
                updated_buckets: buckets,
                removed_buckets: plan.removed.iter().map(String::as_str).collect(),
            })
        };
        self.send(&line).await?;
        let next = plan.next;
        self.req.stats.holds(next.len());
        self.positions.retain(|b, _| next.contains_key(b));
        self.pending.retain(|b| next.contains_key(b));
        self.pending.extend(plan.announced.into_iter().map(|b| b.bucket));
        self.sent = Some(next);
        self.write_checkpoint = plan.write_checkpoint;
        self.interrupts.sent = 0;
        Ok(plan.state)
    }

    /// Send the pending buckets' ops up to `state`'s checkpoint, priority group by priority
    /// group, then `checkpoint_complete`.
    async fn download(&mut self, state: &HubState) -> Flow<()> {
        let groups = self.pending_groups();
        let last_priority = groups.keys().next_back().copied();
        let cp = state.checkpoint.op_id;
        for (priority, group) in groups {
            let from_storage = self.send_recent(state, group).await?;
            self.send_from_storage(state, from_storage).await?;
            if Some(priority) != last_priority && self.reproducible(state) {
                self.send(&Line::PartialCheckpointComplete(PartialCompleteLine {
                    last_op_id: cp.to_string(),
                    priority,
                }))
                .await?;
            }
        }
        self.incomplete = !self.reproducible(state);
        if self.incomplete {
            // Protocol spec §6.3: the client waits for the next checkpoint, which completes.
            tracing::debug!(user = %self.req.user_key, checkpoint = cp, "checkpoint invalidated by compaction; not completing it");
            self.flush().await?;
        } else {
            self.send_now(&Line::CheckpointComplete(CompleteLine {
                last_op_id: cp.to_string(),
            }))
            .await?;
        }
        self.interrupts = Interrupts::default();
        // Empty by now: give its memory back, an idle connection holds nothing.
        self.pending = HashSet::new();
        self.advance_positions(cp);
        Ok(())
    }

    /// May checkpoint `cp` complete? Not below an op compaction rewrote ops against (see
    /// [`CheckpointHub::note_compaction`]).
    fn reproducible(&self, state: &HubState) -> bool {
        state.checkpoint.op_id >= self.hub.compaction_floor(state.group)
    }

    /// Pending buckets by priority, each group in name order.
    fn pending_groups(&self) -> BTreeMap<u8, Vec<String>> {
        let mut groups: BTreeMap<u8, Vec<String>> = BTreeMap::new();
        let Some(sent) = &self.sent else { return groups };
        for bucket in &self.pending {
            if let Some(s) = sent.get(bucket) {
                groups.entry(s.priority).or_default().push(bucket.clone());
            }
        }
        for group in groups.values_mut() {
            group.sort();
        }
        groups
    }

    /// Once a checkpoint is complete the client holds every op up to it in each of its
    /// buckets, the position a reconnecting client would state too. Keeping positions current
    /// lets the next checkpoint's data come from the hub's memory.
    fn advance_positions(&mut self, cp: i64) {
        let Some(sent) = &self.sent else { return };
        for bucket in sent.keys().filter(|b| !self.pending.contains(*b)) {
            match self.positions.get_mut(bucket) {
                Some(position) => *position = (*position).max(cp),
                None => {
                    self.positions.insert(bucket.clone(), cp);
                }
            }
        }
    }

    /// Stop this download for a newer checkpoint that changes what the client holds, when
    /// [`Interrupts`] allows. Called between data lines only, so no line is cut.
    async fn yield_to_newer(&mut self, current: &HubState) -> Flow<()> {
        if !self.interrupts.due() || !self.states.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let Some(state) = self.states.borrow_and_update().clone() else {
            return Ok(());
        };
        if state.group != current.group {
            return Err(Halt::ConfigChanged);
        }
        match self.plan(state).await? {
            Next::Line(plan) => {
                self.interrupts.interrupted();
                Err(Halt::Newer(plan))
            }
            // The client's buckets did not change (or the hub moved on, and will say so).
            Next::Unchanged(_) | Next::Gone => Ok(()),
        }
    }

    /// Send what the hub holds in memory; returns the buckets that must be read from storage.
    async fn send_recent(&mut self, state: &HubState, group: Vec<String>) -> Flow<Vec<String>> {
        let mut from_storage = Vec::new();
        for bucket in group {
            let position = self.positions.get(&bucket).copied().unwrap_or(0);
            let Some(ops) = self.hub.recent_ops(state.group, state.checkpoint.op_id, &bucket, position) else {
                from_storage.push(bucket);
                continue;
            };
            let mut start = 0;
            while start < ops.len() {
                let end = start + line_len(ops[start..].iter().map(|op| &**op));
                self.send_ops(&bucket, ops[start..end].iter().map(|op| &**op), end < ops.len())
                    .await?;
                start = end;
            }
            self.pending.remove(&bucket);
            self.yield_to_newer(state).await?;
        }
        Ok(from_storage)
    }

    /// Read `group`'s buckets from storage in batches; the next batch is read while the
    /// current one is encoded and sent.
    async fn send_from_storage(&mut self, state: &HubState, mut group: Vec<String>) -> Flow<()> {
        if group.is_empty() {
            return Ok(());
        }
        let (store, cp) = (self.hub.storage().clone(), state.checkpoint.op_id);
        let requests = self.requests(&group, None);
        let mut batch = storage(store.bucket_data(state.group, cp, &requests, FETCH_LIMIT).await)?;
        loop {
            let full = batch.resume.is_some();
            let next = match &batch.resume {
                Some((bucket, after)) => {
                    // Buckets before the one to resume are complete with this batch.
                    if let Some(pos) = group.iter().position(|b| b == bucket) {
                        for done in group.drain(..pos) {
                            self.pending.remove(&done);
                        }
                    }
                    Some(self.requests(&group, Some((bucket.as_str(), *after))))
                }
                None => None,
            };
            let prefetch = async {
                match &next {
                    Some(requests) => store.bucket_data(state.group, cp, requests, FETCH_LIMIT).await.map(Some),
                    None => Ok(None),
                }
            };
            self.hub.note_compaction(state.group, batch.target_op);
            let (fetched, sent) = tokio::join!(prefetch, self.send_batch(&batch.ops, full));
            sent?;
            match storage(fetched)? {
                Some(rows) => batch = rows,
                None => {
                    for done in group {
                        self.pending.remove(&done);
                    }
                    return Ok(());
                }
            }
            self.yield_to_newer(state).await?;
        }
    }

    /// (bucket, position) for each bucket of `group`; `continue_from` overrides one position.
    fn requests(&self, group: &[String], continue_from: Option<(&str, i64)>) -> Vec<(String, i64)> {
        group
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

    /// One storage batch as `data` lines: a line per bucket run, cut by [`line_len`].
    async fn send_batch(&mut self, rows: &[(String, OplogEntry)], full: bool) -> Step<()> {
        let mut start = 0;
        while start < rows.len() {
            let bucket = &rows[start].0;
            let run_end = rows[start..]
                .iter()
                .position(|(b, _)| b != bucket)
                .map_or(rows.len(), |n| start + n);
            let end = start + line_len(rows[start..run_end].iter().map(|(_, op)| op));
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
        self.interrupts.sent += data.len();
        self.req.stats.sent_ops(data.len());
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
#[cfg(test)]
mod state_size {
    /// The size of the future `make` would return, without calling it.
    fn future_size<Fut>(_: impl FnOnce() -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// A held connection's whole state is its `run` future, so storage reads (whose futures,
    /// with Postgres, take kilobytes) must be boxed rather than inlined in it: 10,000 held
    /// streams would otherwise cost tens of megabytes more.
    #[test]
    fn a_held_connection_over_postgres_storage_stays_small() {
        let conn: Option<&mut super::Connection<ferrosync_storage::PgStorage>> = None;
        let run = future_size(move || conn.map(|c| c.run()));
        assert!(run <= 1024, "Connection::run's future takes {run} bytes");
    }
}
