//! LISTEN for checkpoint notifications on a dedicated storage connection.

use crate::error::StorageError;
use crate::writer::CHECKPOINT_CHANNEL;
use ferrosync_pgconn::PgEndpoint;
use tokio::sync::mpsc;
use tokio_postgres::Notification;

/// Receives a message per checkpoint notification until the connection drops.
pub struct CheckpointListener {
    rx: mpsc::UnboundedReceiver<Notification>,
    client: tokio_postgres::Client,
}

impl CheckpointListener {
    pub async fn connect(storage: &PgEndpoint) -> Result<CheckpointListener, StorageError> {
        let (client, rx) = storage.connect_listening().await?;
        client.batch_execute(&format!("LISTEN {CHECKPOINT_CHANNEL}")).await?;
        Ok(CheckpointListener { rx, client })
    }

    /// Does the connection still answer within `limit`? A silent network (a cut, a stuck
    /// proxy) closes nothing, and a LISTEN connection otherwise only ever waits.
    pub async fn check(&self, limit: std::time::Duration) -> Result<(), StorageError> {
        match tokio::time::timeout(limit, self.client.simple_query("SELECT 1")).await {
            Ok(result) => result.map(|_| ()).map_err(StorageError::from),
            Err(_) => Err(StorageError::ConnectionLost("the checkpoint listener connection stopped answering")),
        }
    }

    /// Next notification payload; `None` once the connection is lost.
    pub async fn recv(&mut self) -> Option<String> {
        self.rx.recv().await.map(|n| n.payload().to_string())
    }

    /// A notification that already arrived: `Some(None)` when none is queued, `None` once the
    /// connection is lost and nothing is left.
    pub fn try_recv(&mut self) -> Option<Option<String>> {
        match self.rx.try_recv() {
            Ok(n) => Some(Some(n.payload().to_string())),
            Err(mpsc::error::TryRecvError::Empty) => Some(None),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        }
    }
}

/// The checkpoint a notification announces: `(group, checkpoint)` from its `group:op_id:lsn`
/// payload. It is sent in the transaction that stores the checkpoint, so it is exact.
pub fn parse_checkpoint_payload(payload: &str) -> Option<(i64, crate::Checkpoint)> {
    let mut parts = payload.splitn(3, ':');
    let group = parts.next()?.parse().ok()?;
    let op_id = parts.next()?.parse().ok()?;
    let lsn = crate::writer::lsn_from_text(parts.next()?)?;
    Some((group, crate::Checkpoint { op_id, lsn }))
}
