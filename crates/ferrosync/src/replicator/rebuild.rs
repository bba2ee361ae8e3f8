//! Building an in-place deploy (see `ferrosync_storage::incremental`) on the running stream:
//! the rules the writer uses meanwhile (the served definitions plus the deploy's new ones),
//! and the re-read of the tables the new definitions read, a chunk at a time between batches
//! of the change stream, evaluated by the new definitions only.

use super::pipeline::Replication;
use anyhow::{Context, Result};
use ferrosync_rules::diff::diff;
use ferrosync_rules::{SyncRules, SyncRulesOptions};
use ferrosync_source::relation::RelationInfo;
use ferrosync_source::setup;
use ferrosync_source::snapshot::read_chunk;
use ferrosync_storage::{incremental, streams};
use ferrosync_storage::{RecordOp, StreamRecord, TableHandle, TableProgress};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// Rows per re-read chunk: the change stream waits while one is read and stored.
const REBUILD_CHUNK: usize = 5_000;

/// The rules stream `stream` replicates with: its served config, plus, while an in-place
/// deploy is pending, the deploy's added and changed definitions (returned alone too, for
/// the re-read).
pub(super) fn rules_for(stream: &StreamRecord, base: &SyncRulesOptions) -> Result<(Arc<SyncRules>, Option<Arc<SyncRules>>)> {
    let active = SyncRules::parse(&stream.content, &stream.rules_options(base)).context("the served sync config")?;
    let Some(pending) = &stream.pending else {
        return Ok((Arc::new(active), None));
    };
    let Some(changes) = diff(&stream.content, &pending.content) else {
        anyhow::bail!(
            "the config deployed in place on stream {} differs outside its bucket definitions",
            stream.id
        );
    };
    let rebuilt = changes.rebuilt();
    let options = pending.rules_options(stream.id, base);
    let parse = || SyncRules::parse(&pending.content, &options).context("the config deployed in place");
    let new_only = Arc::new(parse()?.restricted_to(&rebuilt));
    let union = active.union(parse()?.restricted_to(&rebuilt));
    Ok((Arc::new(union), Some(new_only)))
}

fn id_of(repl: &Replication) -> i64 {
    repl.writer.stream().id
}

/// A table to re-read.
struct TableRead {
    rel: RelationInfo,
    table: Arc<TableHandle>,
    keys: Vec<String>,
    after: Option<String>,
    rows: i64,
}

/// The re-read of a pending deploy's tables.
pub(super) struct Rebuild {
    deploy: i64,
    new_only: Arc<SyncRules>,
    queue: VecDeque<TableRead>,
    started: Instant,
}

impl Rebuild {
    pub(super) fn new(deploy: i64, new_only: Arc<SyncRules>) -> Rebuild {
        Rebuild {
            deploy,
            new_only,
            queue: VecDeque::new(),
            started: Instant::now(),
        }
    }

    pub(super) fn has_work(&self) -> bool {
        !self.queue.is_empty()
    }
}

impl Replication {
    /// The stream's pending config changed in storage (a new in-place deploy, or one dropped
    /// for a full deploy): rows saved so far are stored with the rules they met, the rest
    /// with the rules the stream's config implies now.
    pub(super) async fn reload_config(&mut self) -> Result<()> {
        self.writer.sync().await?;
        let id = self.writer.stream().id;
        let stored = streams::stream_by_id(self.writer.client(), id)
            .await?
            .context("replication stream vanished")?;
        self.writer.set_pending(stored.pending);
        self.apply_config().await
    }

    /// Replicate with the rules of the writer's stream record, building its pending deploy
    /// if it has one.
    pub(super) async fn apply_config(&mut self) -> Result<()> {
        let stream = self.writer.stream();
        let (rules, new_only) = rules_for(stream, &self.config.rules_options)?;
        let deploy = stream.pending.as_ref().map(|p| p.id);
        self.writer.set_rules(rules.clone());
        self.rules = rules;
        self.rebuild = None;
        match (deploy, new_only) {
            (Some(deploy), Some(new_only)) => self.start_rebuild(Rebuild::new(deploy, new_only)).await,
            _ => {
                tracing::info!(stream = id_of(self), "replicating with the switched config");
                self.config.status.set_replication(self.writer.stream().id, "streaming", None);
                Ok(())
            }
        }
    }

    /// Before streaming: queue the tables the deploy's new definitions read. Tables no served
    /// definition read yet are copied whole now (the usual table copy, with the writer's rules).
    pub(super) async fn start_rebuild(&mut self, mut rebuild: Rebuild) -> Result<()> {
        let Some(pending) = self.writer.stream().pending.clone() else {
            return Ok(());
        };
        let group = self.writer.stream().id;
        self.config.status.set_replication(self.writer.stream().id, "deploying", None);
        let done = incremental::rebuild_progress(self.writer.client(), group, rebuild.deploy).await?;
        let tag = self.config.source.tag.clone();
        let mut copied = false;
        for (oid, name, ident) in setup::published_tables(&self.source, &tag).await? {
            if !rebuild.new_only.is_table_used(&name) {
                continue;
            }
            let rel = setup::describe_table(&self.source, oid, name, ident).await?;
            if self.register_table(&rel, true).await? {
                copied = true;
                continue;
            }
            let Some((Some(table), keys)) = self.tables.get(&rel.oid).cloned() else {
                continue;
            };
            let (after, rows, finished) = done.get(&table.id).cloned().unwrap_or((None, 0, false));
            if finished || pending.switch_lsn.is_some() {
                continue;
            }
            tracing::info!(table = %rel.name.name, deploy = rebuild.deploy, resume_after_rows = rows, "re-reading table for the deployed definitions");
            rebuild.queue.push_back(TableRead {
                rel,
                table,
                keys,
                after,
                rows,
            });
        }
        // A copy, or a switch due already (a restart after the build), needs the stream to
        // move past the source's position now, changes or not.
        if copied || pending.switch_lsn.is_some() {
            setup::emit_ping(&self.source).await?;
        }
        self.writer.set_backfill_rules(rebuild.new_only.clone());
        let nothing_to_read = !rebuild.has_work() && pending.switch_lsn.is_none();
        self.rebuild = Some(rebuild);
        if nothing_to_read {
            self.finish_rebuild().await?;
        }
        Ok(())
    }

    /// Read and store the next chunk of the table being re-read.
    pub(super) async fn rebuild_step(&mut self) -> Result<()> {
        let Some(rebuild) = self.rebuild.as_mut() else {
            return Ok(());
        };
        let Some(read) = rebuild.queue.front_mut() else {
            return Ok(());
        };
        let deploy = rebuild.deploy;
        let compat = self.rules.compatibility().clone();
        let chunk = read_chunk(&self.source, &read.rel, read.after.as_deref(), REBUILD_CHUNK, &compat).await?;
        read.rows += chunk.rows.len() as i64;
        read.after = chunk.last_key.clone().or(read.after.take());
        let (table, keys, rows, after) = (read.table.clone(), read.keys.clone(), read.rows, read.after.clone());
        for row in chunk.rows {
            let key = row.replica_key(&keys);
            let (row, _) = row.into_row();
            self.writer
                .save(RecordOp::Backfill {
                    table: table.clone(),
                    key,
                    row,
                })
                .await?;
        }
        self.writer
            .flush_snapshot_chunk(TableProgress {
                table_id: table.id,
                last_key: after,
                rows,
                done: chunk.done,
                rebuild: Some(deploy),
            })
            .await?;
        if chunk.done {
            tracing::info!(table = %table.name.name, rows, deploy, "table re-read for the deployed definitions");
            if let Some(rebuild) = self.rebuild.as_mut() {
                rebuild.queue.pop_front();
                if !rebuild.has_work() {
                    self.finish_rebuild().await?;
                }
            }
        }
        Ok(())
    }

    /// Every table is re-read: switch once the stream passes the source's position now (so
    /// every change the re-read may have seen first is applied after it).
    async fn finish_rebuild(&mut self) -> Result<()> {
        let lsn = setup::current_lsn(&self.source).await?;
        self.writer.mark_rebuilt(lsn.0).await?;
        setup::emit_ping(&self.source).await?;
        if let Some(rebuild) = &self.rebuild {
            tracing::info!(
                deploy = rebuild.deploy,
                elapsed_ms = rebuild.started.elapsed().as_millis() as u64,
                "deployed definitions built; switching at the next checkpoint"
            );
        }
        Ok(())
    }
}
