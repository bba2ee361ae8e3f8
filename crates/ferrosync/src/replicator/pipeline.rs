//! Source events to bucket storage: the initial snapshot, tables added later, and the change
//! stream applied in batches.

use super::rebuild::Rebuild;
use super::{connect_source, ReplicatorConfig};
use anyhow::{Context, Result};
use ferrosync_rules::SyncRules;
use ferrosync_source::relation::RelationInfo;
use ferrosync_source::setup;
use ferrosync_source::snapshot::{chunk_column, copy_table, estimate_rows, ChunkSize};
use ferrosync_source::{ChangeStream, Lsn, SourceEvent, SourceRow, StreamOptions};
use ferrosync_storage::streams;
use ferrosync_storage::{BucketWriter, RecordOp, TableHandle, TableProgress};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// How often a running stream checks for a sync config deployed in place by another process.
const DEPLOY_POLL: Duration = Duration::from_secs(1);
/// Snapshot chunk size (one storage flush and one progress save each): about 4 MiB of COPY
/// text, which is some 30,000 rows of the bench's todos.
const SNAPSHOT_CHUNK: ChunkSize = ChunkSize {
    text_bytes: 4 << 20,
    max_rows: 50_000,
    first_rows: 1_000,
};
/// Records applied from already-decoded events before forcing a commit.
const MAX_BATCH_RECORDS: usize = 50_000;

/// One stream's pipeline state while its job holds the lease.
pub(super) struct Replication {
    pub(super) source: Arc<tokio_postgres::Client>,
    pub(super) writer: BucketWriter,
    pub(super) rules: Arc<SyncRules>,
    pub(super) config: ReplicatorConfig,
    /// Relation oid -> table handle (None: not used by the sync rules) and key columns.
    pub(super) tables: HashMap<u32, (Option<Arc<TableHandle>>, Vec<String>)>,
    /// The in-place deploy being built, if any.
    pub(super) rebuild: Option<Rebuild>,
}

impl Replication {
    pub(super) fn new(
        source: Arc<tokio_postgres::Client>,
        writer: BucketWriter,
        rules: Arc<SyncRules>,
        config: ReplicatorConfig,
    ) -> Replication {
        Replication {
            source,
            writer,
            rules,
            config,
            tables: HashMap::new(),
            rebuild: None,
        }
    }

    /// Copy every table the sync rules use, resuming where an earlier attempt stopped.
    pub(super) async fn initial_snapshot(&mut self) -> Result<()> {
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
        tracing::info!(
            stream = self.writer.stream().id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "initial snapshot done"
        );
        Ok(())
    }

    /// Resolve a table's storage record (dropping data of a stale mapping) and copy it if
    /// needed; `true` when it was copied now.
    pub(super) async fn register_table(&mut self, rel: &RelationInfo, initial: bool) -> Result<bool> {
        let keys = rel.key_column_names();
        let group = self.writer.stream().id;
        if self.writer.stream().snapshot_done {
            self.writer.sync().await?;
        } else {
            // Rows saved before are evaluated before the writer switches to snapshot mode, but
            // need not be committed: in the initial snapshot nothing reads storage before
            // `mark_snapshot_done` drains the writer, so the previous table's writes go on
            // while this one is read.
            self.writer.flush().await?;
        }
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
            // The removal is committed when truncate returns: only now may the record go.
            streams::forget_table(self.writer.client(), group, &self.config.owner, old.id).await?;
        }
        let handle = Arc::new(TableHandle {
            id: record.id,
            name: rel.name.clone(),
            store_image: rel.replica_identity != b'f',
        });
        self.tables.insert(rel.oid, (Some(handle.clone()), keys));
        if record.snapshot_done {
            return Ok(false);
        }
        self.copy(rel, handle, record.snapshot_last_key, record.snapshot_rows).await?;
        if !initial {
            setup::emit_ping(&self.source).await?;
        }
        Ok(true)
    }

    async fn copy(&mut self, rel: &RelationInfo, table: Arc<TableHandle>, resume: Option<String>, mut done_rows: i64) -> Result<()> {
        let total = estimate_rows(&self.source, rel.oid).await.unwrap_or(0);
        let stream = self.writer.stream().id;
        tracing::info!(stream, table = %rel.name.name, total_estimate = total, resume_after_rows = done_rows, "snapshotting table");
        let started = Instant::now();
        let _bulk = crate::allocator::BulkWork::start();
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
                rebuild: None,
            };
            self.writer.flush_snapshot_chunk(progress).await?;
            if last_log.elapsed() > Duration::from_secs(2) || chunk.done {
                let secs = started.elapsed().as_secs_f64().max(0.001);
                tracing::info!(stream, table = %rel.name.name, rows = done_rows, total_estimate = total, rows_per_s = (done_rows as f64 / secs) as u64, "snapshot progress");
                last_log = Instant::now();
            }
        }
        reader.await.context("snapshot reader task")??;
        // Checkpoints wait for the stream to pass the copy before the table counts as done
        // (in the initial snapshot there are none yet: `mark_snapshot_done` blocks them up to
        // a position after every table's copy).
        if self.writer.stream().snapshot_done {
            let lsn = setup::current_lsn(&self.source).await?;
            self.writer.block_checkpoints_until(lsn.0).await?;
        }
        self.writer
            .flush_snapshot_chunk(TableProgress {
                table_id: table.id,
                last_key: None,
                rows: done_rows,
                done: true,
                rebuild: None,
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

    /// Start reading the slot. Events wait (a bounded number; the connection is kept alive
    /// meanwhile) until [`Replication::stream_changes`] takes them.
    pub(super) async fn open_stream(&self) -> Result<ChangeStream> {
        Ok(ChangeStream::start(StreamOptions {
            source: self.config.source_endpoint.clone(),
            slot: self.writer.stream().slot_name.clone(),
            connection_tag: self.config.source.tag.clone(),
            compatibility: self.rules.compatibility().clone(),
            start_lsn: self.resume_lsn().await?,
        })
        .await?)
    }

    /// Where the change stream starts at the earliest: the last checkpoint's LSN, since a
    /// checkpoint is stored with its batch, after every batch before it. Not when the source's
    /// WAL is behind it (a source restored from a backup): then the slot alone decides.
    async fn resume_lsn(&self) -> Result<Lsn> {
        let stored = Lsn(self.writer.stream().checkpoint.lsn);
        if stored.0 == 0 {
            return Ok(stored);
        }
        let current = setup::current_lsn(&self.source).await?;
        if stored > current {
            tracing::warn!(
                stored = %stored,
                current = %current,
                "the last checkpoint is ahead of the source's WAL (restored from a backup?); resuming from the slot's own position"
            );
            return Ok(Lsn(0));
        }
        Ok(stored)
    }

    /// Apply the change stream until an error. An in-place deploy (see [`Rebuild`]) is built
    /// and switched to on the way.
    pub(super) async fn stream_changes(&mut self, mut stream: ChangeStream) -> Result<()> {
        let slot = self.writer.stream().slot_name.clone();
        let id = self.writer.stream().id;
        tracing::info!(stream = id, slot = %slot, "streaming changes");
        // "deploying": streaming, and building an in-place deploy beside the served config.
        let state = if self.rebuild.is_some() { "deploying" } else { "streaming" };
        self.config.status.set_replication(id, state, None);
        let mut durable = self.writer.durable();
        let mut in_tx = false;
        let mut deploys = tokio::time::interval(DEPLOY_POLL);
        loop {
            let rebuilding = self.rebuild.as_ref().is_some_and(Rebuild::has_work);
            let first = tokio::select! {
                event = stream.recv() => event.context("replication stream ended")??,
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Err(self.writer.failure().await.into());
                    }
                    stream.ack(Lsn(*durable.borrow_and_update()));
                    continue;
                }
                () = std::future::ready(()), if rebuilding => {
                    self.rebuild_step().await?;
                    continue;
                }
                _ = deploys.tick() => {
                    let stored = streams_pending(&self.writer).await?;
                    if stored != self.writer.stream().pending.as_ref().map(|p| p.id) {
                        tracing::info!(deploy = ?stored, "the stream's pending config changed; building it beside the served one");
                        self.reload_config().await?;
                    }
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
                    self.config.status.checkpoint_committed(self.writer.stream().id, cp.op_id);
                }
                if let Some((_, at)) = commit {
                    let lag = SystemTime::now().duration_since(at).unwrap_or_default();
                    ferrosync_metrics::lag_seconds(&slot, lag.as_secs_f64());
                }
                if self.rebuild.is_some() && !self.writer.has_pending() {
                    // Switched: replicate with the new config's rules from here on.
                    self.apply_config().await?;
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

async fn streams_pending(writer: &BucketWriter) -> Result<Option<i64>> {
    Ok(ferrosync_storage::incremental::pending_id(writer.client(), writer.stream().id).await?)
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
