//! The pgoutput change stream: a task owns the replication connection, decodes messages into
//! typed [`SourceEvent`]s (overlapping decoding with the consumer's storage writes), and reports
//! acknowledged positions back to Postgres.

use crate::error::SourceError;
use crate::lsn::Lsn;
use crate::pgoutput::{self, PgOutputMessage, TupleValue};
use crate::relation::{ColumnInfo, ColumnValue, RelationInfo, SourceRow};
use crate::setup::PUBLICATION;
use crate::types::{decode_text, STARTUP_OPTIONS};
use ferrosync_pgconn::{PgConnError, PgEndpoint};
use ferrosync_rules::{Compatibility, SourceTableName, SqliteValue};
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationEvent};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

/// How to reach the slot.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub source: PgEndpoint,
    pub slot: String,
    pub connection_tag: String,
    pub compatibility: Compatibility,
    /// Storage holds every transaction that committed before this position (`Lsn(0)`: none
    /// known). Postgres starts at it or at the slot's confirmed position, whichever is later,
    /// and does not re-send those transactions: the confirmation of the last ones may not
    /// have reached it before a crash or restart, and re-applying them writes every op again.
    pub start_lsn: Lsn,
}

/// A decoded change-stream event.
#[derive(Debug)]
pub enum SourceEvent {
    /// Table description; sent before the first change of a table and after schema changes.
    Relation(RelationInfo),
    Insert {
        relation: u32,
        new: SourceRow,
    },
    /// `old` only when the key changed (or replica identity FULL).
    Update {
        relation: u32,
        old: Option<SourceRow>,
        new: SourceRow,
    },
    Delete {
        relation: u32,
        old: SourceRow,
    },
    Truncate {
        relations: Vec<u32>,
    },
    Begin,
    /// End of a transaction; `lsn` is the end of its commit record.
    Commit {
        lsn: Lsn,
        /// When the source committed it (the replication lag is measured from here).
        at: SystemTime,
    },
    /// Our `powersync`/`ping` marker: a checkpoint should be made here even with no changes.
    Ping {
        lsn: Lsn,
    },
    /// Server keepalive outside any transaction: safe to acknowledge once everything before is durable.
    Keepalive {
        lsn: Lsn,
    },
}

/// Handle to a running stream. Dropping it stops the replication connection.
pub struct ChangeStream {
    events: mpsc::Receiver<Result<SourceEvent, SourceError>>,
    ack: watch::Sender<Lsn>,
    task: tokio::task::JoinHandle<()>,
}

impl ChangeStream {
    /// Start streaming the slot from its confirmed position or `options.start_lsn`.
    pub async fn start(options: StreamOptions) -> Result<ChangeStream, SourceError> {
        let config = options
            .source
            .replication_config(&options.slot, PUBLICATION)?
            .with_start_lsn(pgwire_replication::Lsn(options.start_lsn.0))
            .with_options(STARTUP_OPTIONS)
            .with_status_interval(Duration::from_secs(1))
            .with_application_name("ferrosync");
        let source = &options.source;
        // `connect` only spawns the worker; connecting, TLS, authentication and
        // START_REPLICATION happen in the background, so wait for them here, bounded.
        let mut client = ReplicationClient::connect(config).await?;
        match tokio::time::timeout(source.connect_timeout(), client.wait_started()).await {
            Ok(Ok(())) => {}
            // TLS failures are named like on every other connection.
            Ok(Err(e @ PgWireError::Tls(_))) => return Err(source.classify(&e).into()),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(SourceError::Unavailable(PgConnError::Timeout {
                    endpoint: source.label().to_string(),
                    secs: source.connect_timeout().as_secs(),
                }))
            }
        }
        let (tx, events) = mpsc::channel(4096);
        let (ack, ack_rx) = watch::channel(Lsn(0));
        let task = tokio::spawn(run(client, tx, ack_rx, options));
        Ok(ChangeStream { events, ack, task })
    }

    /// Next event; `None` when the stream ended.
    pub async fn recv(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        self.events.recv().await
    }

    /// Next event if one is already decoded (lets the consumer batch many transactions).
    pub fn try_recv(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        self.events.try_recv().ok()
    }

    /// Everything up to `lsn` is durable in bucket storage: Postgres may release it.
    pub fn ack(&self, lsn: Lsn) {
        self.ack.send_if_modified(|current| {
            if lsn > *current {
                *current = lsn;
                true
            } else {
                false
            }
        });
    }
}

impl Drop for ChangeStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    mut client: ReplicationClient,
    tx: mpsc::Sender<Result<SourceEvent, SourceError>>,
    mut ack: watch::Receiver<Lsn>,
    options: StreamOptions,
) {
    let mut decoder = Decoder {
        relations: HashMap::new(),
        options,
    };
    let mut in_transaction = false;
    // Bytes of pgoutput messages of the current transaction.
    let mut received = 0u64;
    loop {
        tokio::select! {
            changed = ack.changed() => {
                if changed.is_err() {
                    break;
                }
                let lsn = *ack.borrow_and_update();
                client.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
            }
            event = client.recv() => {
                let event = match event {
                    Ok(Some(e)) => e,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        break;
                    }
                };
                let decoded = match event {
                    ReplicationEvent::Begin { .. } => {
                        in_transaction = true;
                        Some(Ok(SourceEvent::Begin))
                    }
                    ReplicationEvent::Commit {
                        end_lsn, commit_time_micros, ..
                    } => {
                        in_transaction = false;
                        // Counted per transaction rather than per message.
                        ferrosync_metrics::get().data_replicated_bytes.increment(std::mem::take(&mut received));
                        Some(Ok(SourceEvent::Commit {
                            lsn: Lsn(end_lsn.0),
                            at: postgres_time(commit_time_micros),
                        }))
                    }
                    ReplicationEvent::XLogData { data, .. } => {
                        received += data.len() as u64;
                        decoder.decode(data).transpose()
                    }
                    ReplicationEvent::Message { prefix, content, lsn, transactional } => {
                        (prefix == "powersync" && &content[..] == b"ping" && !transactional).then_some(Ok(SourceEvent::Ping { lsn: Lsn(lsn.0) }))
                    }
                    ReplicationEvent::KeepAlive { wal_end, .. } => (!in_transaction).then_some(Ok(SourceEvent::Keepalive { lsn: Lsn(wal_end.0) })),
                    ReplicationEvent::StoppedAt { .. } => break,
                };
                if let Some(event) = decoded {
                    let failed = event.is_err();
                    if tx.send(event).await.is_err() || failed {
                        break;
                    }
                }
            }
        }
    }
    client.stop();
}

/// A Postgres timestamp (microseconds since 2000-01-01 UTC) as a `SystemTime`.
fn postgres_time(micros: i64) -> SystemTime {
    const POSTGRES_EPOCH: Duration = Duration::from_secs(946_684_800);
    let since_2000 = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        UNIX_EPOCH + POSTGRES_EPOCH + since_2000
    } else {
        UNIX_EPOCH + POSTGRES_EPOCH - since_2000
    }
}

struct Decoder {
    relations: HashMap<u32, RelationInfo>,
    options: StreamOptions,
}

impl Decoder {
    fn decode(&mut self, data: bytes::Bytes) -> Result<Option<SourceEvent>, SourceError> {
        Ok(Some(match pgoutput::decode(data)? {
            PgOutputMessage::Relation(r) => {
                let info = RelationInfo {
                    oid: r.oid,
                    name: SourceTableName {
                        connection_tag: self.options.connection_tag.clone(),
                        schema: r.schema,
                        name: r.name,
                    },
                    columns: r
                        .columns
                        .into_iter()
                        .map(|(flags, name, type_oid)| ColumnInfo {
                            name: name.into(),
                            type_oid,
                            is_key: flags & 1 == 1,
                        })
                        .collect(),
                    replica_identity: r.replica_identity,
                };
                self.relations.insert(r.oid, info.clone());
                SourceEvent::Relation(info)
            }
            PgOutputMessage::Insert { relation, new } => SourceEvent::Insert {
                relation,
                new: self.row(relation, new)?,
            },
            PgOutputMessage::Update { relation, old, new } => {
                let old = match old {
                    Some(o) => Some(self.row(relation, o)?),
                    None => None,
                };
                SourceEvent::Update {
                    relation,
                    old,
                    new: self.row(relation, new)?,
                }
            }
            PgOutputMessage::Delete { relation, old } => SourceEvent::Delete {
                relation,
                old: self.row(relation, old)?,
            },
            PgOutputMessage::Truncate { relations } => SourceEvent::Truncate { relations },
            PgOutputMessage::Other(_) => return Ok(None),
        }))
    }

    fn row(&self, relation: u32, tuple: Vec<TupleValue>) -> Result<SourceRow, SourceError> {
        let rel = self
            .relations
            .get(&relation)
            .ok_or_else(|| SourceError::decode(format!("change for unknown relation {relation}")))?;
        let compat = &self.options.compatibility;
        let columns = rel
            .columns
            .iter()
            .zip(tuple)
            .map(|(col, value)| {
                let value = match value {
                    TupleValue::Null => ColumnValue::Value(SqliteValue::Null),
                    TupleValue::UnchangedToast => ColumnValue::UnchangedToast,
                    TupleValue::Text(bytes) => ColumnValue::Value(decode_text(col.type_oid, &String::from_utf8_lossy(&bytes), compat)),
                };
                (col.name.clone(), value)
            })
            .collect();
        Ok(SourceRow { columns })
    }
}
