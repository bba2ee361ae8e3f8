//! The socket hyper serves: bytes the lean path already read put back in front of it, and
//! writes that fail once they have made no progress for a while.
//!
//! Why the write timeout: a client that stops reading while data waits (a paused or wedged
//! process, a dead peer behind a silent network) would otherwise hold its connection, and the
//! sync connection behind it, forever. hyper has no such timeout of its own. It applies to
//! upgraded (WebSocket) connections too, since those keep this socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

pub struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    tcp: TcpStream,
    write_timeout: Duration,
    /// Armed when a write goes pending, disarmed when one makes progress; boxed so that a
    /// connection whose writes never stall holds no timer.
    stall: Option<Pin<Box<Sleep>>>,
}

impl Prefixed {
    pub fn new(prefix: Vec<u8>, tcp: TcpStream, write_timeout: Duration) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            tcp,
            write_timeout,
            stall: None,
        }
    }

    /// Pass a write's result through, failing it with `TimedOut` once writes have been pending
    /// for the whole timeout. The timer is polled here so that its firing wakes the task, which
    /// then retries the write and sees the deadline passed.
    fn watch_stall<T>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.stall = None;
            return result;
        }
        let timeout = self.write_timeout;
        let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stall.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stall = None;
        tracing::debug!(?timeout, "closing a connection whose client stopped reading");
        Poll::Ready(Err(stalled(&self.tcp, timeout)))
    }
}

/// The error for a write that made no progress for `timeout`. The socket is set to reset when
/// closed: the kernel would otherwise keep the unsent data (up to megabytes) and retry sending
/// it to the client that is not reading.
pub fn stalled(tcp: &TcpStream, timeout: Duration) -> io::Error {
    if let Err(e) = tcp.set_zero_linger() {
        tracing::debug!(error = %e, "could not set SO_LINGER");
    }
    io::Error::new(io::ErrorKind::TimedOut, format!("the client read nothing for {timeout:?}"))
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.watch_stall(cx, result)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.watch_stall(cx, result)
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
