//! Source errors, each with a PowerSync-style code so operators can look them up.

/// Something is wrong with the source database or the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source is not set up for replication; the message says what to change.
    #[error("[{code}] {message}")]
    Setup { code: &'static str, message: String },
    /// The replication slot is gone or unusable; a fresh replication stream is needed.
    #[error("[PSYNC_S1146] replication slot {slot} is missing or invalid: {reason}")]
    SlotInvalid { slot: String, reason: String },
    #[error("[PSYNC_S1101] source query failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("[PSYNC_S1101] replication connection failed: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    /// No connection to the source could be made (down, unreachable, TLS refused...).
    #[error("[PSYNC_S1101] source database unreachable: {0}")]
    Unavailable(ferrosync_pgconn::PgConnError),
    /// pgoutput bytes we could not decode (a bug or an unsupported server feature).
    #[error("[PSYNC_S1004] could not decode replication message: {0}")]
    Decode(String),
}

impl SourceError {
    pub(crate) fn decode(msg: impl Into<String>) -> Self {
        SourceError::Decode(msg.into())
    }
}

/// Not a `source`: the message already carries the cause, and error chains would repeat it.
impl From<ferrosync_pgconn::PgConnError> for SourceError {
    fn from(e: ferrosync_pgconn::PgConnError) -> Self {
        SourceError::Unavailable(e)
    }
}
