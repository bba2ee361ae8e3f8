//! Storage errors.

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("[PSYNC_S2401] bucket storage query failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection to bucket storage could be made (down, unreachable, TLS refused...).
    #[error("[PSYNC_S2401] bucket storage unreachable: {0}")]
    Unavailable(ferrosync_pgconn::PgConnError),
    #[error("[PSYNC_S2402] corrupt data in bucket storage: {0}")]
    Corrupt(String),
    /// This replicator no longer holds the stream's lease (another process took over): its
    /// writes are refused and it must stand by.
    #[error("[PSYNC_S1003] replication lease lost: {0}")]
    LeaseLost(String),
    /// The stream left the replicated states (a newer deploy stopped it): its replicator must end.
    #[error("[PSYNC_S1003] replication stream {0} was stopped: a newer sync config replaced it")]
    Stopped(i64),
    /// A query made on behalf of several callers failed (the message of the original error).
    #[error("[PSYNC_S2401] bucket storage query failed: {0}")]
    QueryFailed(String),
    /// A long-lived storage connection (e.g. the checkpoint listener) ended.
    #[error("[PSYNC_S2401] bucket storage connection lost: {0}")]
    ConnectionLost(&'static str),
    /// The replication write task ended without reporting a storage error.
    #[error("[PSYNC_S2401] bucket storage writer stopped: {0}")]
    WriterStopped(String),
}

/// Not a `source`: the message already carries the cause, and error chains would repeat it.
impl From<ferrosync_pgconn::PgConnError> for StorageError {
    fn from(e: ferrosync_pgconn::PgConnError) -> Self {
        StorageError::Unavailable(e)
    }
}
