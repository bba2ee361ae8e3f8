//! The replication pipeline: source (snapshot + pgoutput) -> rules -> storage.
//!
//! One replicator per sync config, guarded by a lease in storage ([`LeaseConnection`]).
//! Storage writes are batched across source transactions: every event already decoded is applied before one flush and
//! one checkpoint, and the LSN is acknowledged to Postgres only after that commit returns.

use anyhow::{Context, Result};
use ferrosync_api::probes::ProbeState;
use ferrosync_config::{CompactionConfig, PostgresConnectionConfig};
use ferrosync_pgconn::{Backoff, PgEndpoint};
use ferrosync_rules::{SyncRules, SyncRulesOptions};
use ferrosync_source::relation::RelationInfo;
use ferrosync_source::setup;
use ferrosync_source::slot::slot_health;
use ferrosync_source::snapshot::{chunk_column, copy_table, estimate_rows};
use ferrosync_source::{ChangeStream, Lsn, SourceEvent, SourceRow, StreamOptions};
use ferrosync_storage::lease::LeaseConnection;
use ferrosync_storage::streams;
use ferrosync_storage::{BucketWriter, RecordOp, TableHandle, TableProgress};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// Rows per snapshot chunk (one storage flush and one progress save each).
const SNAPSHOT_CHUNK: usize = 10_000;
/// Records applied from already-decoded events before forcing a commit.
const MAX_BATCH_RECORDS: usize = 50_000;

/// What the replicator needs from the config.
#[derive(Clone)]
pub struct ReplicatorConfig {
    pub source: PostgresConnectionConfig,
    pub source_endpoint: PgEndpoint,
    pub storage: PgEndpoint,
    pub rules_content: String,
    pub rules_options: SyncRulesOptions,
    pub owner: String,
    /// Where the replicator reports what it is doing (read by the probes).
    pub status: Arc<ProbeState>,
    /// Background compaction, run by the lease holder only.
    pub compaction: CompactionConfig,
}

/// How often a standby checks whether the lease holder is gone. Takeover happens within this
/// interval of the holder's death (its lease connection closes with it).
const STANDBY_POLL: Duration = Duration::from_millis(250);
/// Longest wait for the storage to confirm a lease release before the connection is dropped.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// An attempt that ran this long was healthy: the next failure starts the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Run until the process ends: take the lease (or stand by), replicate, and after any failure
/// (source or storage restarted, network cut, lease lost) start over with backoff and jitter.
/// Nothing is acknowledged to the source that is not durable in storage, so starting over
/// resumes exactly where the last commit left off.
pub async fn run(config: ReplicatorConfig) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut lease: Option<LeaseConnection> = None;
    let mut standing_by = false;
    loop {
        let started = Instant::now();
        match attempt(&config, &mut lease).await {
            Ok(()) => {
                if !standing_by {
                    tracing::info!("another process holds the replication lease; standing by");
                    config.status.set_replication("standby", None);
                    standing_by = true;
                }
                tokio::time::sleep(STANDBY_POLL).await;
            }
            Err(e) => {
                standing_by = false;
                if started.elapsed() > HEALTHY_RUN {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                let error = format!("{e:#}");
                tracing::error!(error = %error, retry_in_ms = delay.as_millis() as u64, "replication stopped");
                config.status.set_replication("retrying", Some(error));
                // Let a healthy standby take over while this process waits out its backoff. A
                // lease connection that does not answer is dropped (which also ends the lock).
                if let Some(held) = lease.take() {
                    if let Ok(Ok(())) = tokio::time::timeout(RELEASE_TIMEOUT, held.release()).await {
                        lease = Some(held);
                    }
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One attempt: `Ok` when another process holds the lease, else runs until an error.
async fn attempt(config: &ReplicatorConfig, lease: &mut Option<LeaseConnection>) -> Result<()> {
    if lease.is_none() {
        *lease = Some(LeaseConnection::open(&config.storage).await?);
    }
    let Some(held) = lease.as_ref() else { return Ok(()) };
    let stream = streams::stream_for_content(held.client(), &config.rules_content, &config.source.slot_name_prefix).await?;
    if !held.try_acquire(stream.id, &config.owner).await? {
        return Ok(());
    }
    tokio::select! {
        result = replicate(config, held.client(), stream.id) => result,
        lost = held.lost() => Err(lost.into()),
    }
}

async fn connect_source(cfg: &ReplicatorConfig) -> Result<tokio_postgres::Client> {
    let client = cfg.source_endpoint.connect().await?;
    client.batch_execute(ferrosync_source::types::SESSION_SETTINGS).await?;
    Ok(client)
}

struct Replication {
    source: Arc<tokio_postgres::Client>,
    writer: BucketWriter,
    rules: Arc<SyncRules>,
    config: ReplicatorConfig,
    /// Relation oid -> table handle (None: not used by the sync rules) and key columns.
    tables: HashMap<u32, (Option<Arc<TableHandle>>, Vec<String>)>,
}

/// Replicate stream `id` while holding its lease.
async fn replicate(config: &ReplicatorConfig, storage: &tokio_postgres::Client, id: i64) -> Result<()> {
    // Read after taking the lease: the previous holder may have committed until a moment ago.
    let stream = streams::stream_by_id(storage, id).await?.context("replication stream vanished")?;
    let source = Arc::new(connect_source(config).await?);
    setup::check_source(&source).await?;
    let mut options = config.rules_options.clone();
    options.sync_rules_id = stream.id as u64;
    let rules = Arc::new(SyncRules::parse(&config.rules_content, &options)?);
    let slot = stream.slot_name.clone();
    let snapshot_done = stream.snapshot_done;
    let health = slot_health(&source, &slot).await?;
    tracing::info!(stream = stream.id, slot = %slot, snapshot_done, "replication starting");
    let usable = health.as_ref().is_some_and(|h| !h.is_lost());
    if snapshot_done && !usable {
        return Err(rebuild_stream(config, storage, &source, id, &slot, health.is_some()).await);
    }
    let stream = if !usable {
        // A fresh slot replays from now: anything stored by an earlier attempt is unusable.
        setup::drop_slot(&source, &slot).await?;
        streams::clear_group(storage, stream.id).await?;
        setup::create_slot(&source, &slot).await?;
        streams::stream_by_id(storage, id).await?.context("replication stream vanished")?
    } else {
        stream
    };
    let reader = ferrosync_storage::connect_for_writes(&config.storage).await?;
    let writer = ferrosync_storage::connect_for_writes(&config.storage).await?;
    let mut repl = Replication {
        source,
        writer: BucketWriter::new(reader, writer, stream, rules.clone(), config.owner.clone()),
        rules,
        config: config.clone(),
        tables: HashMap::new(),
    };
    let replication = async {
        if !snapshot_done {
            config.status.set_replication("snapshot", None);
            repl.initial_snapshot().await?;
        }
        repl.stream_changes().await
    };
    // Compaction runs beside replication while this process holds the lease, so two
    // processes never compact at once; it ends with the attempt.
    let compaction = async {
        match config.compaction.enabled {
            true => crate::compact::background(config.storage.clone(), id, config.compaction.clone()).await,
            false => std::future::pending().await,
        }
    };
    // A slot invalidated while we run ends the attempt; the next one rebuilds the stream.
    tokio::select! {
        result = replication => result,
        error = watch_slot(config, slot.clone()) => Err(error),
        () = compaction => Err(anyhow::anyhow!("background compaction stopped")),
    }
}

/// How often the slot's health is checked while replicating.
const SLOT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// A slot health check unanswered this long means the source is unreachable: start over.
const SLOT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves with an error once the slot is gone or lost; warns while its WAL budget runs low.
async fn watch_slot(config: &ReplicatorConfig, slot: String) -> anyhow::Error {
    let client = match connect_source(config).await {
        Ok(c) => c,
        Err(e) => return e.context("slot health connection"),
    };
    let mut warned = false;
    loop {
        tokio::time::sleep(SLOT_CHECK_INTERVAL).await;
        let health = match tokio::time::timeout(SLOT_CHECK_TIMEOUT, slot_health(&client, &slot)).await {
            Ok(result) => result,
            Err(_) => {
                return anyhow::anyhow!(
                    "the source did not answer the slot health check within {} s (network cut?)",
                    SLOT_CHECK_TIMEOUT.as_secs()
                )
            }
        };
        match health {
            Ok(Some(h)) if !h.is_lost() => {
                if let Some(lag) = h.lag_bytes {
                    ferrosync_metrics::lag_bytes(&slot, lag.max(0) as u64);
                }
                if h.is_at_risk() && !warned {
                    tracing::warn!(
                        slot = %slot,
                        wal_status = %h.wal_status,
                        safe_wal_bytes = h.safe_wal_size,
                        max_slot_wal_keep_size_bytes = h.budget,
                        "replication slot is close to max_slot_wal_keep_size: if replication does not catch up, Postgres invalidates the slot and a full resync follows (raise max_slot_wal_keep_size or give replication more resources)"
                    );
                }
                warned = h.is_at_risk();
            }
            Ok(found) => {
                return ferrosync_source::SourceError::SlotInvalid {
                    slot,
                    reason: slot_problem(found.is_some()).into(),
                }
                .into();
            }
            Err(e) => return e.into(),
        }
    }
}

/// What is wrong with an unusable slot: it exists but lost its WAL, or it is gone.
fn slot_problem(exists: bool) -> &'static str {
    if exists {
        "invalidated (its WAL was removed)"
    } else {
        "missing"
    }
}

/// The slot of a stream that finished its snapshot is gone or lost: its history cannot
/// continue. Clients keep syncing the stream's last data (it becomes ERRORED) while a new
/// stream with the same config is built from a fresh snapshot on the next attempt.
async fn rebuild_stream(
    config: &ReplicatorConfig,
    storage: &tokio_postgres::Client,
    source: &tokio_postgres::Client,
    id: i64,
    slot: &str,
    exists: bool,
) -> anyhow::Error {
    let reason = slot_problem(exists);
    tracing::error!(
        stream = id,
        slot,
        reason,
        "replication slot is unusable: building a new replication stream from a fresh snapshot; clients keep the last synced data until it is ready"
    );
    if let Err(e) = streams::restart_replication(storage, id, &config.owner, &config.source.slot_name_prefix).await {
        return e.into();
    }
    if let Err(e) = setup::drop_slot(source, slot).await {
        tracing::warn!(slot, error = %e, "could not drop the unusable slot");
    }
    ferrosync_source::SourceError::SlotInvalid {
        slot: slot.to_string(),
        reason: format!("{reason}; a new replication stream replaces it"),
    }
    .into()
}

impl Replication {
    /// Copy every table the sync rules use, resuming where an earlier attempt stopped.
    async fn initial_snapshot(&mut self) -> Result<()> {
        let started = Instant::now();
        let tag = self.config.source.tag.clone();
        for (oid, name, ident) in setup::published_tables(&self.source, &tag).await? {
            if !self.rules.is_table_used(&name) {
                continue;
            }
            let rel = setup::describe_table(&self.source, oid, name, ident).await?;
            self.register_table(&rel, true).await?;
        }
        let lsn = setup::current_lsn(&self.source).await?;
        self.writer.mark_snapshot_done(lsn.0).await?;
        setup::emit_ping(&self.source).await?;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "initial snapshot done");
        Ok(())
    }

    /// Resolve a table's storage record (dropping data of a stale mapping) and copy it if needed.
    async fn register_table(&mut self, rel: &RelationInfo, initial: bool) -> Result<()> {
        let keys = rel.key_column_names();
        let group = self.writer.stream().id;
        self.writer.sync().await?;
        let identity = streams::TableIdentity {
            oid: rel.oid,
            schema: &rel.name.schema,
            name: &rel.name.name,
            key_columns: &keys,
        };
        let (record, stale) = streams::resolve_table(self.writer.client(), group, &self.config.owner, &identity).await?;
        if let Some(old) = stale {
            let name = ferrosync_rules::SourceTableName {
                connection_tag: rel.name.connection_tag.clone(),
                schema: old.schema,
                name: old.name,
            };
            self.writer
                .truncate(Arc::new(TableHandle {
                    id: old.id,
                    name,
                    store_image: true,
                }))
                .await?;
        }
        let handle = Arc::new(TableHandle {
            id: record.id,
            name: rel.name.clone(),
            store_image: rel.replica_identity != b'f',
        });
        self.tables.insert(rel.oid, (Some(handle.clone()), keys));
        if !record.snapshot_done {
            self.copy(rel, handle, record.snapshot_last_key, record.snapshot_rows).await?;
            if !initial {
                setup::emit_ping(&self.source).await?;
            }
        }
        Ok(())
    }

    async fn copy(&mut self, rel: &RelationInfo, table: Arc<TableHandle>, resume: Option<String>, mut done_rows: i64) -> Result<()> {
        let total = estimate_rows(&self.source, rel.oid).await.unwrap_or(0);
        tracing::info!(table = %rel.name.name, total_estimate = total, resume_after_rows = done_rows, "snapshotting table");
        let started = Instant::now();
        let (tx, mut rx) = mpsc::channel(2);
        // The copy runs on its own connection so reading overlaps with storage writes.
        let reader_source = connect_source(&self.config).await?;
        let compat = self.rules.compatibility().clone();
        let reader_rel = rel.clone();
        let reader = tokio::spawn(async move { copy_table(&reader_source, &reader_rel, resume, SNAPSHOT_CHUNK, &compat, tx).await });
        let keys = rel.key_column_names();
        // Only a copy that resumes after its last saved key is sure never to meet a row it
        // stored before (composite-key and FULL-identity tables restart from the beginning,
        // and FULL tables may hold identical rows): those merge with current state instead.
        self.writer.set_snapshot_mode(chunk_column(rel).is_some());
        let mut last_log = Instant::now();
        let table_name = format!("{}.{}", rel.name.schema, rel.name.name);
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk?;
            done_rows += chunk.rows.len() as i64;
            ferrosync_metrics::get().rows_replicated.increment(chunk.rows.len() as u64);
            ferrosync_metrics::snapshot_progress(&table_name, done_rows.max(0) as u64, total.max(0) as u64);
            for row in chunk.rows {
                self.save_upsert(&table, &keys, row, None).await?;
            }
            let progress = TableProgress {
                table_id: table.id,
                last_key: chunk.last_key.clone(),
                rows: done_rows,
                done: false,
            };
            self.writer.flush_snapshot_chunk(progress).await?;
            if last_log.elapsed() > Duration::from_secs(2) || chunk.done {
                let secs = started.elapsed().as_secs_f64().max(0.001);
                tracing::info!(table = %rel.name.name, rows = done_rows, total_estimate = total, rows_per_s = (done_rows as f64 / secs) as u64, "snapshot progress");
                last_log = Instant::now();
            }
        }
        reader.await.context("snapshot reader task")??;
        // Checkpoints wait for the stream to pass the copy before the table counts as done.
        let lsn = setup::current_lsn(&self.source).await?;
        self.writer.block_checkpoints_until(lsn.0).await?;
        self.writer
            .flush_snapshot_chunk(TableProgress {
                table_id: table.id,
                last_key: None,
                rows: done_rows,
                done: true,
            })
            .await?;
        self.writer.set_snapshot_mode(false);
        Ok(())
    }

    async fn save_upsert(&mut self, table: &Arc<TableHandle>, keys: &[String], mut new: SourceRow, old: Option<SourceRow>) -> Result<()> {
        // Only a FULL identity (the tables that keep no image) logs the whole old row; a
        // key-only old row has NULL in every other column. Filled before the key is taken:
        // under FULL the key covers every column.
        if let Some(old) = old.as_ref().filter(|_| !table.store_image) {
            new.fill_unchanged_from(old);
        }
        let key = new.replica_key(keys);
        let before_key = old.map(|o| o.replica_key(keys));
        let (row, unchanged) = new.into_row();
        self.writer
            .save(RecordOp::Upsert {
                table: table.clone(),
                key,
                before_key,
                row,
                unchanged,
            })
            .await?;
        Ok(())
    }

    fn table(&self, relation: u32) -> Option<(Arc<TableHandle>, Vec<String>)> {
        match self.tables.get(&relation) {
            Some((Some(t), keys)) => Some((t.clone(), keys.clone())),
            _ => None,
        }
    }

    async fn stream_changes(&mut self) -> Result<()> {
        let slot = self.writer.stream().slot_name.clone();
        let mut stream = ChangeStream::start(StreamOptions {
            source: self.config.source_endpoint.clone(),
            slot: slot.clone(),
            connection_tag: self.config.source.tag.clone(),
            compatibility: self.rules.compatibility().clone(),
        })
        .await?;
        tracing::info!("streaming changes");
        self.config.status.set_replication("streaming", None);
        let mut durable = self.writer.durable();
        let mut in_tx = false;
        loop {
            let first = tokio::select! {
                event = stream.recv() => event.context("replication stream ended")??,
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Err(self.writer.failure().await.into());
                    }
                    stream.ack(Lsn(*durable.borrow_and_update()));
                    continue;
                }
            };
            let mut commit: Option<(Lsn, SystemTime)> = None;
            let mut ping: Option<Lsn> = None;
            let mut keepalive: Option<Lsn> = None;
            let mut records = 0;
            let mut counts = BatchCounts::default();
            let mut next = Some(first);
            while let Some(event) = next.take() {
                match event {
                    SourceEvent::Begin => in_tx = true,
                    SourceEvent::Commit { lsn, at } => {
                        in_tx = false;
                        commit = Some((lsn, at));
                        counts.transactions += 1;
                    }
                    SourceEvent::Ping { lsn } => ping = Some(lsn),
                    SourceEvent::Keepalive { lsn } => keepalive = Some(lsn),
                    other => {
                        records += 1;
                        counts.rows += u64::from(self.apply(other).await?);
                    }
                }
                if records < MAX_BATCH_RECORDS {
                    next = stream.try_recv().transpose()?;
                }
            }
            counts.record();
            if in_tx {
                continue;
            }
            // The LSN is acknowledged (above) only once the write task reports it durable.
            if let Some(lsn) = commit.map(|(lsn, _)| lsn).max(ping) {
                if let Some(cp) = self.writer.commit(lsn.0, ping.is_some()).await? {
                    tracing::debug!(op_id = cp.op_id, lsn = %lsn, "checkpoint");
                }
                if let Some((_, at)) = commit {
                    let lag = SystemTime::now().duration_since(at).unwrap_or_default();
                    ferrosync_metrics::lag_seconds(&slot, lag.as_secs_f64());
                }
            } else if let Some(lsn) = keepalive {
                self.writer.mark_durable(lsn.0).await?;
                // Everything the source sent before its keepalive is stored: caught up.
                ferrosync_metrics::lag_seconds(&slot, 0.0);
            }
        }
    }

    /// Apply one change; `true` when it was a row change of a table the sync config reads.
    async fn apply(&mut self, event: SourceEvent) -> Result<bool> {
        match event {
            SourceEvent::Relation(rel) => {
                if self.rules.is_table_used(&rel.name) {
                    self.writer.flush().await?;
                    self.register_table(&rel, false).await?;
                } else {
                    self.tables.insert(rel.oid, (None, Vec::new()));
                }
            }
            SourceEvent::Insert { relation, new } => {
                if let Some((table, keys)) = self.table(relation) {
                    self.save_upsert(&table, &keys, new, None).await?;
                    return Ok(true);
                }
            }
            SourceEvent::Update { relation, old, new } => {
                if let Some((table, keys)) = self.table(relation) {
                    self.save_upsert(&table, &keys, new, old).await?;
                    return Ok(true);
                }
            }
            SourceEvent::Delete { relation, old } => {
                if let Some((table, keys)) = self.table(relation) {
                    let key = old.replica_key(&keys);
                    self.writer.save(RecordOp::Delete { table, key }).await?;
                    return Ok(true);
                }
            }
            SourceEvent::Truncate { relations } => {
                for relation in relations {
                    if let Some((table, _)) = self.table(relation) {
                        self.writer.truncate(table).await?;
                    }
                }
            }
            SourceEvent::Begin | SourceEvent::Commit { .. } | SourceEvent::Ping { .. } | SourceEvent::Keepalive { .. } => {}
        }
        Ok(false)
    }
}

/// What one batch of replication events replicated, added to the metrics once per batch.
#[derive(Default)]
struct BatchCounts {
    rows: u64,
    transactions: u64,
}

impl BatchCounts {
    fn record(&self) {
        let m = ferrosync_metrics::get();
        m.chunks_replicated.increment(1);
        m.rows_replicated.increment(self.rows);
        m.transactions_replicated.increment(self.transactions);
    }
}
