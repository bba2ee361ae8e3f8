//! A connection's outgoing lines: encoded into one buffer and handed to the transport in
//! chunks, so a checkpoint's lines cost one write (and one wake-up of the HTTP task), and a
//! large download moves in ~64 KiB frames instead of one frame per line.
//!
//! The connection does not run in a task of its own: [`ChunkStream`] is the response body and
//! drives the connection's future whenever the transport asks for the next chunk. A flushed
//! chunk is parked in a one-chunk slot; the future waits until the transport has taken it, which
//! gives back-pressure without a channel (and without a second task per held stream).

use crate::lines::{Line, LineFormat};
use bytes::{Bytes, BytesMut};
use futures::Stream;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

/// Flush once this much is buffered.
const CHUNK: usize = 64 * 1024;

/// The chunk handed from the connection to the transport, if not taken yet.
type Slot = Arc<Mutex<Option<Bytes>>>;

fn lock(slot: &Slot) -> MutexGuard<'_, Option<Bytes>> {
    // Only plain `Option` moves happen under the lock, so a poisoned one is still consistent.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Output {
    format: LineFormat,
    buf: BytesMut,
    slot: Slot,
}

impl Output {
    /// An output and the slot its chunks appear in.
    pub fn new(format: LineFormat) -> (Output, Slot) {
        let slot = Slot::default();
        let out = Output {
            format,
            buf: BytesMut::new(),
            slot: slot.clone(),
        };
        (out, slot)
    }

    /// Buffer a line; sends a chunk when enough has accumulated.
    pub async fn push(&mut self, line: &Line<'_>) {
        self.format.encode_into(line, &mut self.buf);
        if self.buf.len() >= CHUNK {
            self.flush().await;
        }
    }

    /// Send everything buffered. A client that goes away drops the whole connection, so there
    /// is no error to report here.
    pub async fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let chunk = self.buf.split().freeze();
        // Give the buffer's memory back between checkpoints: an idle connection holds nothing.
        self.buf = BytesMut::new();
        *lock(&self.slot) = Some(chunk);
        Taken(&self.slot).await;
    }
}

/// Resolves once the transport has taken the parked chunk. It registers no waker: the
/// [`ChunkStream`] that polls it returns the chunk in the same poll, and the transport polls
/// the stream again when it wants the next one.
struct Taken<'a>(&'a Slot);

impl Future for Taken<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if lock(self.0).is_some() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// The chunks of a connection, produced by polling its future.
pub struct ChunkStream<F> {
    future: Option<Pin<Box<F>>>,
    slot: Slot,
}

impl<F: Future<Output = ()>> ChunkStream<F> {
    pub(crate) fn new(future: F, slot: Slot) -> Self {
        ChunkStream {
            future: Some(Box::pin(future)),
            slot,
        }
    }
}

impl<F: Future<Output = ()>> Stream for ChunkStream<F> {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = &mut *self;
        if let Some(future) = this.future.as_mut() {
            if future.as_mut().poll(cx).is_ready() {
                // Free the connection's state now, not when the transport drops the body.
                this.future = None;
            }
        }
        if let Some(chunk) = lock(&this.slot).take() {
            return Poll::Ready(Some(chunk));
        }
        match this.future {
            Some(_) => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}
