//! Storage errors.

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("[PSYNC_S2401] bucket storage query failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("[PSYNC_S2402] corrupt data in bucket storage: {0}")]
    Corrupt(String),
    #[error("[PSYNC_S1003] replication stream {0} is locked by another process")]
    Locked(i64),
    /// A query made on behalf of several callers failed (the message of the original error).
    #[error("[PSYNC_S2401] bucket storage query failed: {0}")]
    QueryFailed(String),
    /// The replication write task ended without reporting a storage error.
    #[error("[PSYNC_S2401] bucket storage writer stopped: {0}")]
    WriterStopped(String),
}
