//! A connection's outgoing lines: encoded into one buffer and handed to the transport in
//! chunks, so a checkpoint's lines cost one write (and one wake-up of the HTTP task), and a
//! large download moves in ~64 KiB frames instead of one frame per line.

use crate::lines::{Line, LineFormat};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// Flush once this much is buffered.
const CHUNK: usize = 64 * 1024;

/// The client went away.
pub struct Closed;

pub struct Output {
    format: LineFormat,
    buf: BytesMut,
    tx: mpsc::Sender<Bytes>,
}

impl Output {
    pub fn new(format: LineFormat, tx: mpsc::Sender<Bytes>) -> Output {
        Output {
            format,
            buf: BytesMut::new(),
            tx,
        }
    }

    /// Buffer a line; sends a chunk when enough has accumulated.
    pub async fn push(&mut self, line: &Line<'_>) -> Result<(), Closed> {
        self.format.encode_into(line, &mut self.buf);
        if self.buf.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    /// Send everything buffered.
    pub async fn flush(&mut self) -> Result<(), Closed> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        // Give the buffer's memory back between checkpoints: an idle connection holds nothing.
        self.buf = BytesMut::new();
        self.tx.send(chunk).await.map_err(|_| Closed)
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}
