//! LISTEN for checkpoint notifications on a dedicated storage connection.

use crate::error::StorageError;
use crate::writer::CHECKPOINT_CHANNEL;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// Receives a message per checkpoint notification (and one when the connection drops, as `None`).
pub struct CheckpointListener {
    rx: mpsc::UnboundedReceiver<Option<String>>,
    _client: tokio_postgres::Client,
}

impl CheckpointListener {
    pub async fn connect(conn_str: &str) -> Result<CheckpointListener, StorageError> {
        let (client, mut connection) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(Some(n.payload().to_string())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "checkpoint listener connection failed");
                        break;
                    }
                }
            }
            let _ = tx.send(None);
        });
        client.batch_execute(&format!("LISTEN {CHECKPOINT_CHANNEL}")).await?;
        Ok(CheckpointListener { rx, _client: client })
    }

    /// Next notification payload; `Some(None)` means the connection was lost; `None` = closed.
    pub async fn recv(&mut self) -> Option<Option<String>> {
        self.rx.recv().await
    }

    /// A notification that already arrived, if any.
    pub fn try_recv(&mut self) -> Option<Option<String>> {
        self.rx.try_recv().ok()
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
