//! Bucket storage: the op log per bucket, current row state, parameter lookups, checkpoints
//! and write checkpoints, kept in PostgreSQL (schema `ferrosync`).
//!
//! Write side: [`BucketWriter`] (one per replication stream, guarded by a lease) turns row
//! changes into ops and commits checkpoints. Read side: [`SyncStorage`] is what the sync layer
//! needs; [`PgStorage`] implements it.

pub mod checkpoint_requests;
pub mod checksum;
pub mod chunk;
pub mod compact;
pub mod compactor;
mod copy_in;
pub mod error;
pub mod hygiene;
pub mod incremental;
#[cfg(test)]
mod incremental_tests;
pub mod lease;
pub mod lifecycle;
pub mod model;
pub mod notify;
mod pack;
pub mod reader;
pub mod row_codec;
pub mod schema;
pub mod stats;
pub mod streams;
pub mod versions;
mod write_task;
pub mod writer;

pub use error::StorageError;
pub use model::*;
pub use notify::{parse_checkpoint_payload, CheckpointListener};
pub use reader::{PgStorage, SyncStorage};
pub use writer::{BucketWriter, RecordOp, TableHandle, TableProgress};

pub use ferrosync_pgconn::PgEndpoint;

/// One storage connection (TLS, timeouts and keepalives as the endpoint says).
pub async fn connect(storage: &PgEndpoint) -> Result<tokio_postgres::Client, StorageError> {
    Ok(storage.connect().await?)
}

/// A storage connection for replication writes. Its commits are durable before they return,
/// whatever the server's default: the source is acknowledged on that return, so a storage
/// crash that lost an acknowledged commit would lose the changes for good (and reuse op ids).
/// The server drops the session soon after its client vanishes (a network cut, a dead host),
/// so neither the lease nor a row lock of an unfinished transaction outlives the replicator by
/// more than seconds; lock waits are bounded for the same reason.
pub async fn connect_for_writes(storage: &PgEndpoint) -> Result<tokio_postgres::Client, StorageError> {
    let client = storage.connect().await?;
    client
        .batch_execute(
            "SET synchronous_commit = on; SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2;
             SET tcp_keepalives_count = 3; SET idle_in_transaction_session_timeout = '60s'; SET lock_timeout = '15s'",
        )
        .await?;
    Ok(client)
}
