//! The per-process checkpoint hub: one task follows storage checkpoints (push via LISTEN, no
//! polling) and maintains what every connection needs, computed once: the current checkpoint,
//! bucket checksums at it and the ops each bucket received recently (updated incrementally from
//! the buckets that changed), recently changed parameter lookups, and the write checkpoints of
//! connected users. What it holds follows what connections use: cached buckets nobody asked
//! about for a while are dropped, and so are the write checkpoints of users who disconnected.

use crate::cache::{BucketCache, Step};
use crate::misses::MissBatcher;
use crate::stats::FanOut;
use crate::write_checkpoints::{WriteCheckpointWatch, WriteCheckpoints};
use ferrosync_pgconn::{Backoff, PgEndpoint};
use ferrosync_rules::{SyncRules, SyncRulesOptions};
use ferrosync_storage::{parse_checkpoint_payload, BucketChecksum, Checkpoint, CheckpointListener, OplogEntry, StorageError, SyncStorage};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How many recent checkpoints' lookup changes are kept for connections that fall behind, and
/// how many lookups in all (a checkpoint that touched a huge number of them would otherwise be
/// held for 256 checkpoints); older history reads as "changed".
const LOOKUP_HISTORY: usize = 256;
const LOOKUP_HISTORY_KEYS: usize = 100_000;
/// Cached buckets no connection asked about for this long are dropped (users who left, buckets
/// that no longer exist); a later request reads storage again.
const CACHE_SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// While no checkpoint arrives, how often the LISTEN connection is checked, and how long it
/// may take to answer: storage that went silent is reported (and streams refused) within
/// about these two together.
const LISTENER_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const LISTENER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most ops one checkpoint step may have for the hub to keep them in memory.
const STEP_OPS: usize = 10_000;

/// The served sync config at a checkpoint.
#[derive(Clone)]
pub struct HubState {
    pub group: i64,
    pub checkpoint: Checkpoint,
    pub rules: Arc<SyncRules>,
    /// This checkpoint's fan-out time, renewed with every published checkpoint.
    pub(crate) fanout: Arc<FanOut>,
    /// What `rules` were parsed from (content, prefix ids): a config switched in place on
    /// the same stream changes it.
    pub(crate) source: Arc<(String, BTreeMap<String, u64>)>,
}

struct Shared {
    cache: BucketCache,
    /// (from, to, lookups changed in (from, to]), oldest first.
    lookup_history: VecDeque<(i64, i64, HashSet<String>)>,
    /// Lookups in `lookup_history`, counted with repeats.
    lookup_history_keys: usize,
    swept_at: Instant,
}

fn is_newer(checkpoint: Checkpoint, than: Checkpoint) -> bool {
    checkpoint != than && checkpoint.op_id >= than.op_id && checkpoint.lsn >= than.lsn
}

/// Shared by all connections of the process.
pub struct CheckpointHub<S> {
    storage: Arc<S>,
    state: watch::Receiver<Option<HubState>>,
    shared: RwLock<Shared>,
    misses: MissBatcher,
    /// Why the hub cannot follow storage right now (`None` while it does).
    storage_error: Mutex<Option<String>>,
    /// (stream, op): see [`CheckpointHub::note_compaction`].
    compaction_floor: Mutex<(i64, i64)>,
    write_checkpoints: Arc<WriteCheckpoints>,
    cache_sweep_interval: Duration,
}

impl<S: SyncStorage> CheckpointHub<S> {
    /// Start following checkpoints, LISTENing on a connection to `listen`. While storage is
    /// unreachable the hub keeps its last state (held streams stay open, idle) and retries
    /// with backoff; on reconnect it catches up from where it was.
    pub async fn start(storage: Arc<S>, listen: PgEndpoint, rules_options: SyncRulesOptions) -> Arc<CheckpointHub<S>> {
        let (hub, tx) = Self::new(storage);
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            let mut current: Option<HubState> = None;
            let mut write_seq = 0;
            loop {
                let Some(hub) = weak.upgrade() else { return };
                if let Err(e) = hub
                    .follow(&listen, &tx, &rules_options, &mut current, &mut write_seq, &mut backoff)
                    .await
                {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "checkpoint hub lost bucket storage; retrying");
                    hub.set_storage_error(Some(e.to_string()));
                    drop(hub);
                    tokio::time::sleep(delay).await;
                }
            }
        });
        hub
    }

    /// A hub that follows nothing yet, and the sender of its states.
    pub(crate) fn new(storage: Arc<S>) -> (Arc<CheckpointHub<S>>, watch::Sender<Option<HubState>>) {
        Self::with_sweep_interval(storage, CACHE_SWEEP_INTERVAL)
    }

    /// [`CheckpointHub::new`], dropping unused cached buckets every `cache_sweep_interval`.
    pub(crate) fn with_sweep_interval(
        storage: Arc<S>,
        cache_sweep_interval: Duration,
    ) -> (Arc<CheckpointHub<S>>, watch::Sender<Option<HubState>>) {
        let (tx, rx) = watch::channel(None);
        let hub = Arc::new(CheckpointHub {
            misses: MissBatcher::start(storage.clone()),
            storage,
            state: rx,
            shared: RwLock::new(Shared {
                cache: BucketCache::default(),
                lookup_history: VecDeque::new(),
                lookup_history_keys: 0,
                swept_at: Instant::now(),
            }),
            storage_error: Mutex::new(None),
            compaction_floor: Mutex::new((0, 0)),
            write_checkpoints: Arc::default(),
            cache_sweep_interval,
        });
        (hub, tx)
    }

    /// Why bucket storage cannot be followed right now; `None` when it can.
    pub fn storage_error(&self) -> Option<String> {
        self.storage_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_storage_error(&self, error: Option<String>) {
        let mut current = self.storage_error.lock().unwrap_or_else(|e| e.into_inner());
        if current.is_some() && error.is_none() {
            tracing::info!("checkpoint hub follows bucket storage again");
        }
        *current = error;
    }

    /// Watch for new checkpoints (`None` until a sync config is active).
    pub fn subscribe(&self) -> watch::Receiver<Option<HubState>> {
        self.state.clone()
    }

    pub fn storage(&self) -> &Arc<S> {
        &self.storage
    }

    /// Follow checkpoints until the storage connection fails. `current` and `write_seq`
    /// survive reconnects, so the hub resumes from its last checkpoint instead of resetting.
    async fn follow(
        &self,
        listen: &PgEndpoint,
        tx: &watch::Sender<Option<HubState>>,
        options: &SyncRulesOptions,
        current: &mut Option<HubState>,
        write_seq: &mut i64,
        backoff: &mut Backoff,
    ) -> Result<(), StorageError> {
        let mut listener = CheckpointListener::connect(listen).await?;
        let mut announced: Option<(i64, Checkpoint)> = None;
        let mut healthy = false;
        loop {
            match (announced, current.as_mut()) {
                // The usual wake-up: a new checkpoint of the served stream, exact from the
                // payload. Write checkpoints are re-read alongside the advance.
                (Some((group, checkpoint)), Some(state)) if group == state.group => {
                    // A checkpoint may repeat the op_id at a later LSN (an idle source passing a
                    // write checkpoint's position): connections still need it.
                    if is_newer(checkpoint, state.checkpoint) {
                        *write_seq = self.refresh_write_checkpoints(*write_seq).await?;
                        self.advance(group, state.checkpoint.op_id, checkpoint.op_id).await?;
                        state.checkpoint = checkpoint;
                        state.fanout = FanOut::new();
                        tx.send_replace(Some(state.clone()));
                    }
                }
                // Start, reconnects, and other streams' checkpoints (a new config activating).
                _ => {
                    *write_seq = self.refresh_write_checkpoints(*write_seq).await?;
                    self.reload(current, tx, options).await?;
                }
            }
            if !healthy {
                healthy = true;
                backoff.reset();
                self.set_storage_error(None);
            }
            let lost = || StorageError::ConnectionLost("the checkpoint listener connection closed");
            let mut payload = loop {
                tokio::select! {
                    payload = listener.recv() => break payload.ok_or_else(lost)?,
                    () = tokio::time::sleep(LISTENER_CHECK_INTERVAL) => listener.check(LISTENER_CHECK_TIMEOUT).await?,
                }
            };
            // Checkpoints queued meanwhile: jump straight to the newest.
            while let Some(next) = listener.try_recv().ok_or_else(lost)? {
                payload = next;
            }
            announced = parse_checkpoint_payload(&payload);
        }
    }

    /// Read the served stream from storage and switch to it, or advance to its checkpoint.
    pub(crate) async fn reload(
        &self,
        current: &mut Option<HubState>,
        tx: &watch::Sender<Option<HubState>>,
        options: &SyncRulesOptions,
    ) -> Result<(), StorageError> {
        let Some(stream) = self.storage.active_stream().await? else {
            return Ok(());
        };
        match current.as_mut() {
            Some(state) if state.group == stream.id => {
                let source = (stream.content.clone(), stream.prefix_ids.clone());
                if *state.source != source {
                    // Switched in place: same stream, same op ids, so the caches stay; the
                    // connections re-resolve their buckets with the new rules.
                    match SyncRules::parse(&stream.content, &stream.rules_options(options)) {
                        Ok(rules) => {
                            tracing::info!(stream = stream.id, "sync config switched in place");
                            state.rules = Arc::new(rules);
                            state.source = Arc::new(source);
                            if !is_newer(stream.checkpoint, state.checkpoint) {
                                tx.send_replace(Some(state.clone()));
                            }
                        }
                        Err(e) => tracing::error!(error = %e, stream = stream.id, "active sync config does not parse"),
                    }
                }
                if is_newer(stream.checkpoint, state.checkpoint) {
                    self.advance(state.group, state.checkpoint.op_id, stream.checkpoint.op_id).await?;
                    state.checkpoint = stream.checkpoint;
                    state.fanout = FanOut::new();
                    tx.send_replace(Some(state.clone()));
                } else if stream.checkpoint.op_id < state.checkpoint.op_id {
                    // Storage went back (restored from a backup, a lagging replica): what the
                    // cache holds past its checkpoint does not exist there. Start over.
                    tracing::warn!(
                        group = state.group,
                        from = state.checkpoint.op_id,
                        to = stream.checkpoint.op_id,
                        "bucket storage went back to an older checkpoint; rebuilding the checkpoint cache"
                    );
                    self.reset(state.group, stream.checkpoint.op_id);
                    state.checkpoint = stream.checkpoint;
                    state.fanout = FanOut::new();
                    tx.send_replace(Some(state.clone()));
                }
            }
            _ => match SyncRules::parse(&stream.content, &stream.rules_options(options)) {
                Ok(rules) => {
                    self.reset(stream.id, stream.checkpoint.op_id);
                    *current = Some(HubState {
                        group: stream.id,
                        checkpoint: stream.checkpoint,
                        rules: Arc::new(rules),
                        fanout: FanOut::new(),
                        source: Arc::new((stream.content, stream.prefix_ids)),
                    });
                    tx.send_replace(current.clone());
                }
                Err(e) => tracing::error!(error = %e, stream = stream.id, "active sync config does not parse"),
            },
        }
        Ok(())
    }

    fn reset(&self, group: i64, checkpoint: i64) {
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        shared.cache.reset(group, checkpoint);
        shared.lookup_history.clear();
        shared.lookup_history_keys = 0;
    }

    /// Move the cache from `from` to `to`: only cached buckets written in between are read,
    /// with one query for their new ops (or, past [`STEP_OPS`], their checksum deltas).
    async fn advance(&self, group: i64, from: i64, to: i64) -> Result<(), StorageError> {
        let changes = self.storage.changes(group, from, to).await?;
        if !changes.complete {
            // This hub fell behind the retention of change records: start over at `to`;
            // connections re-read what they need.
            tracing::warn!(
                group,
                from,
                to,
                "checkpoint changes already pruned; rebuilding the checkpoint cache"
            );
            self.reset(group, to);
            return Ok(());
        }
        let cached: Vec<String> = {
            let shared = self.shared.read().unwrap_or_else(|e| e.into_inner());
            changes.buckets.iter().filter(|b| shared.cache.contains(b)).cloned().collect()
        };
        let Some(step) = self.read_step(group, from, to, cached).await? else {
            // Compacted against ops newer than `to`: what this range holds now does not add
            // up to `to`. Start over; connections re-read what they need.
            tracing::info!(
                group,
                to,
                "buckets compacted past this hub's checkpoint; rebuilding the checkpoint cache"
            );
            self.reset(group, to);
            return Ok(());
        };
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        shared.cache.advance(to, &changes.buckets, step);
        shared.lookup_history_keys += changes.lookups.len();
        shared.lookup_history.push_back((from, to, changes.lookups));
        while shared.lookup_history.len() > LOOKUP_HISTORY || shared.lookup_history_keys > LOOKUP_HISTORY_KEYS {
            let Some((_, _, dropped)) = shared.lookup_history.pop_front() else {
                break;
            };
            shared.lookup_history_keys -= dropped.len();
        }
        if shared.swept_at.elapsed() >= self.cache_sweep_interval {
            shared.swept_at = Instant::now();
            let dropped = shared.cache.sweep();
            tracing::debug!(
                dropped,
                kept = shared.cache.len(),
                watched_users = self.write_checkpoints.len(),
                "dropped cached buckets nobody asked about"
            );
        }
        Ok(())
    }

    /// The ops (or checksum increments) of `buckets` in `(from, to]`; `None` when compaction
    /// already rewrote them against newer ops.
    async fn read_step(&self, group: i64, from: i64, to: i64, buckets: Vec<String>) -> Result<Option<Step>, StorageError> {
        if buckets.is_empty() {
            return Ok(Some(Step::Ops(HashMap::new())));
        }
        let requests: Vec<(String, i64)> = buckets.iter().map(|b| (b.clone(), from)).collect();
        let batch = self.storage.bucket_data(group, to, &requests, STEP_OPS).await?;
        self.note_compaction(group, batch.target_op);
        if batch.target_op > to {
            return Ok(None);
        }
        if batch.resume.is_some() {
            let mut deltas = self.storage.checksums(group, from, to, &buckets).await?;
            // Not increments: left out, so the cache drops them (see BucketCache::advance).
            let cleared = self.storage.cleared(group, from, to, &buckets).await?;
            deltas.retain(|b, _| !cleared.contains(b));
            return Ok(Some(Step::Checksums(deltas)));
        }
        let mut ops: HashMap<String, Vec<OplogEntry>> = buckets.into_iter().map(|b| (b, Vec::new())).collect();
        for (bucket, op) in batch.ops {
            ops.entry(bucket).or_default().push(op);
        }
        Ok(Some(Step::Ops(ops)))
    }

    /// A read of stream `group` met ops that compaction rewrote against op `target_op`: no
    /// checkpoint of it below that op may complete on any connection of this process from now
    /// on (a client may hold such ops from this download or an earlier one, and they do not
    /// reproduce older checkpoints).
    pub fn note_compaction(&self, group: i64, target_op: i64) {
        let mut floor = self.compaction_floor.lock().unwrap_or_else(|e| e.into_inner());
        // Each stream numbers its ops afresh: a newer stream's floor starts over.
        match group.cmp(&floor.0) {
            std::cmp::Ordering::Greater => *floor = (group, target_op),
            std::cmp::Ordering::Equal => floor.1 = floor.1.max(target_op),
            std::cmp::Ordering::Less => {}
        }
    }

    /// Checkpoints of stream `group` below this may not complete (see
    /// [`CheckpointHub::note_compaction`]).
    pub fn compaction_floor(&self, group: i64) -> i64 {
        let floor = self.compaction_floor.lock().unwrap_or_else(|e| e.into_inner());
        if floor.0 == group {
            floor.1
        } else {
            0
        }
    }

    pub(crate) async fn refresh_write_checkpoints(&self, seq: i64) -> Result<i64, StorageError> {
        let rows = self.storage.write_checkpoints_since(seq).await?;
        let mut max = seq;
        for wc in rows {
            max = max.max(wc.seq);
            self.write_checkpoints.update(&wc);
        }
        Ok(max)
    }

    /// Keep `user_key`'s write checkpoint current while the returned watch lives (one per
    /// connection). Storage is read for the first connection of a key only.
    pub async fn watch_write_checkpoints(&self, user_key: &str) -> Result<WriteCheckpointWatch, StorageError> {
        let watch = self.write_checkpoints.watch(user_key);
        if !watch.is_loaded() {
            // Boxed (and only when a read may be needed): a storage read's future is over a
            // kilobyte, and inline it would grow every held connection's state for good.
            Box::pin(watch.load(async {
                if let Some(wc) = self.storage.write_checkpoint_of(user_key).await? {
                    self.write_checkpoints.update(&wc);
                }
                Ok(())
            }))
            .await?;
        }
        Ok(watch)
    }

    /// How many users' write checkpoints and buckets' checksums the hub holds.
    #[cfg(test)]
    pub(crate) fn held(&self) -> (usize, usize) {
        let shared = self.shared.read().unwrap_or_else(|e| e.into_inner());
        (self.write_checkpoints.len(), shared.cache.len())
    }

    /// Checksums for `buckets` at `checkpoint` (which must be the hub's current one); misses
    /// are fetched once and cached for every other connection.
    pub async fn checksums(
        &self,
        group: i64,
        checkpoint: i64,
        buckets: &[&str],
    ) -> Result<Option<HashMap<String, BucketChecksum>>, StorageError> {
        let mut out = HashMap::with_capacity(buckets.len());
        let mut missing = Vec::new();
        {
            let shared = self.shared.read().unwrap_or_else(|e| e.into_inner());
            if !shared.cache.is_at(group, checkpoint) {
                return Ok(None);
            }
            for b in buckets {
                match shared.cache.checksum(b) {
                    Some(c) => {
                        out.insert(b.to_string(), c);
                    }
                    None => missing.push(b.to_string()),
                }
            }
        }
        if !missing.is_empty() {
            let fetched = self.misses.checksums(group, checkpoint, missing.clone()).await?;
            let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
            let still_valid = shared.cache.is_at(group, checkpoint);
            for b in missing {
                let c = fetched.get(&b).copied().unwrap_or_default();
                if still_valid {
                    shared.cache.insert(b.clone(), c);
                }
                out.insert(b, c);
            }
        }
        Ok(Some(out))
    }

    /// Ops of `bucket` with `position < op_id <= checkpoint` from memory, when the hub holds all
    /// of them; `None` means read storage.
    pub fn recent_ops(&self, group: i64, checkpoint: i64, bucket: &str, position: i64) -> Option<Vec<Arc<OplogEntry>>> {
        let shared = self.shared.read().unwrap_or_else(|e| e.into_inner());
        if !shared.cache.is_at(group, checkpoint) {
            return None;
        }
        shared.cache.ops_after(bucket, position)
    }

    /// Did any of `lookups` change in `(after, current]`? `true` when history does not reach back.
    pub fn lookups_changed(&self, after: i64, lookups: &[ferrosync_rules::LookupKey]) -> bool {
        let shared = self.shared.read().unwrap_or_else(|e| e.into_inner());
        match shared.lookup_history.front() {
            None => after != shared.cache.checkpoint,
            Some((from, _, _)) if *from > after => true,
            Some(_) => shared
                .lookup_history
                .iter()
                .filter(|(_, to, _)| *to > after)
                .any(|(_, _, changed)| lookups.iter().any(|l| changed.contains(l.as_str()))),
        }
    }

    /// The write checkpoint for `user_key` that is visible at source position `lsn`; `None`
    /// also when no connection of this process watches the key.
    pub fn write_checkpoint(&self, user_key: &str, lsn: u64) -> Option<i64> {
        self.write_checkpoints.visible(user_key, lsn)
    }
}
