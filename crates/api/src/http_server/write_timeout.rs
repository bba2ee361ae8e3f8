//! Writes that fail once they have made no progress for a while, on both paths.
//!
//! Why: a client that stops reading while data waits (a paused or wedged process, a dead peer
//! behind a silent network) would otherwise hold its connection, and the sync connection
//! behind it, forever; hyper has no such timeout of its own.

use std::borrow::Borrow;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// A socket (`TcpStream` or `&mut TcpStream`) whose writes fail with `TimedOut` once they have
/// been pending for `timeout`.
pub struct WriteTimeout<T> {
    tcp: T,
    timeout: Duration,
    /// Armed when a write goes pending, disarmed when one makes progress; boxed so that a
    /// connection whose writes do not stall holds no timer, and a held stream's task stays small.
    /// A write given up while pending leaves it armed: until some write gets through, the
    /// socket's buffer has not drained, so the client has not been reading since.
    stall: Option<Pin<Box<Sleep>>>,
}

impl<T: Borrow<TcpStream> + AsyncWrite + Unpin> WriteTimeout<T> {
    pub fn new(tcp: T, timeout: Duration) -> Self {
        WriteTimeout { tcp, timeout, stall: None }
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.tcp
    }

    /// Pass a write's result through, or fail it once writes have been pending for the whole
    /// timeout. The timer is polled here so that its firing wakes the task, which then retries
    /// the write and sees the deadline passed.
    fn watch<R>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if result.is_ready() {
            self.stall = None;
            return result;
        }
        let timeout = self.timeout;
        let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stall.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stall = None;
        tracing::debug!(?timeout, "closing a connection whose client stopped reading");
        // Reset when closed: the kernel would otherwise keep the unsent data (up to megabytes)
        // and go on offering it to a client that does not read.
        if let Err(e) = self.tcp.borrow().set_zero_linger() {
            tracing::debug!(error = %e, "could not set SO_LINGER");
        }
        let message = format!("the client read nothing for {timeout:?}");
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message)))
    }
}

impl<T: Borrow<TcpStream> + AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.watch(cx, result)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.watch(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
