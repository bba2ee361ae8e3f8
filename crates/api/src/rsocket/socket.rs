//! An upgraded WebSocket connection carrying RSocket frames: reads client messages, answers
//! pings and keepalives, queues server frames and writes them, and enforces the keepalive
//! lifetime and a write timeout for clients that stopped reading.
//!
//! Everything is poll-based so that the streaming phase can serve reads, writes and sync lines
//! from one future. The queue is released whenever it drains: an idle connection holds no
//! buffer.

use super::frame::{self, error_code, Frame};
use super::websocket::{self, Message, Reader, WsError};
use bytes::{Buf, BytesMut};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};
use tungstenite::protocol::frame::coding::CloseCode;

/// Largest client message (a REQUEST_STREAM lists every bucket the client holds).
const MAX_MESSAGE: usize = 1024 * 1024;
/// A client that reads nothing for this long while data waits for it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Keepalive lifetime until SETUP says otherwise.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(90);
/// How long closing may take before the socket is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the socket per call: client frames are small.
const READ_CHUNK: usize = 4096;

/// Why a connection is closing, and what the client is told.
#[derive(Debug)]
pub enum Closing {
    /// The socket is closed or broken: nothing can be sent.
    Gone,
    /// The client sent a WebSocket close.
    Peer,
    /// An RSocket ERROR frame, then close.
    Error { stream_id: u32, code: u32, message: String },
    /// A WebSocket protocol violation: close with this code.
    Protocol(CloseCode),
}

impl Closing {
    pub fn error(stream_id: u32, code: u32, message: &str) -> Closing {
        Closing::Error {
            stream_id,
            code,
            message: message.to_string(),
        }
    }
}

impl From<WsError> for Closing {
    fn from(e: WsError) -> Closing {
        tracing::debug!(error = %e, "closing a WebSocket after a protocol error");
        Closing::Protocol(e.close_code())
    }
}

/// A REQUEST_STREAM, reassembled if it came in fragments.
pub struct StreamRequest {
    pub stream_id: u32,
    pub initial_n: u32,
    pub metadata: Option<Vec<u8>>,
    pub data: Vec<u8>,
}

pub struct Socket<T> {
    io: T,
    reader: Reader,
    out: BytesMut,
    lifetime: Duration,
    last_read: Instant,
    /// When the socket stopped taking queued bytes (a write pending without progress since).
    stalled_since: Option<Instant>,
    deadline: Pin<Box<Sleep>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Socket<T> {
    pub fn new(io: T) -> Self {
        let now = Instant::now();
        Socket {
            io,
            reader: Reader::new(MAX_MESSAGE),
            out: BytesMut::new(),
            lifetime: DEFAULT_LIFETIME,
            last_read: now,
            stalled_since: None,
            deadline: Box::pin(tokio::time::sleep_until(now + DEFAULT_LIFETIME)),
        }
    }

    /// The client's keepalive lifetime: silence for longer than this ends the connection.
    pub fn set_lifetime(&mut self, lifetime: Duration) {
        self.lifetime = lifetime;
    }

    /// Read once from the socket into the message reader; `true` if bytes arrived.
    pub fn poll_receive(&mut self, cx: &mut Context<'_>) -> Result<bool, Closing> {
        let mut chunk = [0u8; READ_CHUNK];
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => Err(Closing::Gone),
            Poll::Ready(Ok(())) => {
                self.reader.push(buf.filled());
                self.last_read = Instant::now();
                Ok(true)
            }
            Poll::Ready(Err(_)) => Err(Closing::Gone),
            Poll::Pending => Ok(false),
        }
    }

    /// The next RSocket frame received, answering pings on the way.
    pub fn take_message(&mut self) -> Result<Option<Vec<u8>>, Closing> {
        while let Some(message) = self.reader.next_message()? {
            match message {
                Message::Data(frame) => return Ok(Some(frame)),
                Message::Ping(data) => websocket::pong(&mut self.out, &data),
                Message::Pong => {}
                Message::Close => return Err(Closing::Peer),
            }
        }
        Ok(None)
    }

    /// Wait for the next RSocket frame (SETUP and request phases).
    pub async fn next_frame(&mut self) -> Result<Vec<u8>, Closing> {
        loop {
            if let Some(frame) = self.take_message()? {
                return Ok(frame);
            }
            poll_fn(|cx| {
                self.poll_write(cx)?;
                self.poll_deadline(cx)?;
                if self.poll_receive(cx)? {
                    Poll::Ready(Ok::<_, Closing>(()))
                } else {
                    Poll::Pending
                }
            })
            .await?;
        }
    }

    /// Wait for a REQUEST_STREAM, reassembling fragments; control frames are served meanwhile.
    pub async fn next_request(&mut self) -> Result<StreamRequest, Closing> {
        let mut partial: Option<StreamRequest> = None;
        loop {
            let message = self.next_frame().await?;
            match frame::parse(&message) {
                Ok(Frame::RequestStream {
                    stream_id,
                    initial_n,
                    follows,
                    payload,
                }) if partial.is_none() => {
                    let request = StreamRequest {
                        stream_id,
                        initial_n,
                        metadata: payload.metadata.map(<[u8]>::to_vec),
                        data: payload.data.to_vec(),
                    };
                    if !follows {
                        return Ok(request);
                    }
                    partial = Some(request);
                }
                Ok(Frame::Payload {
                    stream_id,
                    follows,
                    payload,
                }) if partial.as_ref().is_some_and(|p| p.stream_id == stream_id) => {
                    let Some(mut request) = partial.take() else { continue };
                    if let Some(m) = payload.metadata {
                        request.metadata.get_or_insert_with(Vec::new).extend_from_slice(m);
                    }
                    request.data.extend_from_slice(payload.data);
                    if request.metadata.as_ref().map_or(0, Vec::len) + request.data.len() > MAX_MESSAGE {
                        return Err(Closing::Protocol(CloseCode::Size));
                    }
                    if !follows {
                        return Ok(request);
                    }
                    partial = Some(request);
                }
                Ok(other) => self.on_control(&other)?,
                Err(e) => return Err(Closing::error(0, error_code::CONNECTION_ERROR, &e.to_string())),
            }
        }
    }

    /// Serve a frame that is not part of a sync stream.
    pub fn on_control(&mut self, frame: &Frame<'_>) -> Result<(), Closing> {
        match *frame {
            Frame::Keepalive { respond: true, data } => {
                self.out.reserve(websocket::MAX_HEADER_LEN + frame::keepalive_answer_len(data));
                websocket::binary_header(&mut self.out, frame::keepalive_answer_len(data));
                frame::keepalive_answer(&mut self.out, data);
            }
            Frame::Error { stream_id: 0, .. } => return Err(Closing::Gone),
            Frame::Setup(_) => return Err(Closing::error(0, error_code::INVALID_SETUP, "SETUP was already received")),
            Frame::Other {
                stream_id,
                ignorable: false,
                ..
            } if stream_id != 0 => self.queue_error(
                stream_id,
                error_code::APPLICATION_ERROR,
                "[PSYNC_S2002] Only request-stream is served",
            ),
            Frame::Other { ignorable: false, .. } => return Err(Closing::error(0, error_code::CONNECTION_ERROR, "Unsupported frame type")),
            // Credit or cancel for streams that are not open, errors on them, ignorable frames.
            _ => {}
        }
        Ok(())
    }

    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Queue a sync line (one BSON document) as a PAYLOAD frame.
    pub fn queue_line(&mut self, stream_id: u32, line: &[u8]) {
        let len = frame::HEADER_LEN + line.len();
        self.out.reserve(websocket::MAX_HEADER_LEN + len);
        websocket::binary_header(&mut self.out, len);
        frame::payload_next_header(&mut self.out, stream_id);
        self.out.extend_from_slice(line);
    }

    pub fn queue_complete(&mut self, stream_id: u32) {
        websocket::binary_header(&mut self.out, frame::HEADER_LEN);
        frame::payload_complete(&mut self.out, stream_id);
    }

    pub fn queue_error(&mut self, stream_id: u32, code: u32, message: &str) {
        websocket::binary_header(&mut self.out, frame::error_len(message));
        frame::error(&mut self.out, stream_id, code, message);
    }

    /// Queue an ERROR frame and write everything queued.
    pub async fn send_error(&mut self, stream_id: u32, code: u32, message: &str) -> Result<(), Closing> {
        self.queue_error(stream_id, code, message);
        poll_fn(|cx| match self.poll_write(cx) {
            Ok((_, true)) => Poll::Ready(Ok(())),
            Ok(_) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        })
        .await
    }

    /// Write what is queued: `(wrote anything, queue empty)`.
    pub fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<(bool, bool), Closing> {
        let mut wrote = false;
        while !self.out.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(Closing::Gone),
                Poll::Ready(Ok(n)) => {
                    self.out.advance(n);
                    wrote = true;
                }
                Poll::Pending => {
                    // The stall clock starts at the first write that makes no progress: time
                    // the connection spent idle before does not count.
                    if wrote || self.stalled_since.is_none() {
                        self.stalled_since = Some(Instant::now());
                    }
                    return Ok((wrote, false));
                }
            }
        }
        self.stalled_since = None;
        if self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
        if wrote {
            // TCP writes need no flush, but a TLS or buffered transport would.
            if let Poll::Ready(Err(_)) = Pin::new(&mut self.io).poll_flush(cx) {
                return Err(Closing::Gone);
            }
        }
        Ok((wrote, true))
    }

    /// Fail when the client has been silent longer than its keepalive lifetime, or has not
    /// read for [`WRITE_TIMEOUT`] while data waits for it.
    pub fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Result<(), Closing> {
        let silent_until = self.last_read + self.lifetime;
        let stalled_until = self.stalled_since.map(|since| since + WRITE_TIMEOUT);
        let deadline = stalled_until.map_or(silent_until, |s| s.min(silent_until));
        // Re-armed early only when the deadline moves closer; a later one is picked up when the
        // timer fires, so a steady flow of client frames does not reset the timer each time.
        if deadline < self.deadline.deadline() {
            self.deadline.as_mut().reset(deadline);
        }
        while self.deadline.as_mut().poll(cx).is_ready() {
            if deadline <= Instant::now() {
                return Err(self.expired(stalled_until));
            }
            self.deadline.as_mut().reset(deadline);
        }
        Ok(())
    }

    fn expired(&self, stalled_until: Option<Instant>) -> Closing {
        if stalled_until.is_some_and(|s| s <= Instant::now()) {
            tracing::info!("closing a WebSocket whose client stopped reading");
            return Closing::Gone;
        }
        Closing::error(
            0,
            error_code::CONNECTION_ERROR,
            &format!("No keep-alive for {} ms", self.lifetime.as_millis()),
        )
    }

    /// Tell the client why (if it can still hear it), close the WebSocket and the socket.
    pub async fn close(mut self, closing: Option<Closing>) {
        let code = match closing {
            Some(Closing::Gone) => return,
            Some(Closing::Error { stream_id, code, message }) => {
                tracing::debug!(stream_id, code, %message, "RSocket error");
                self.queue_error(stream_id, code, &message);
                CloseCode::Normal
            }
            Some(Closing::Protocol(code)) => code,
            Some(Closing::Peer) | None => CloseCode::Normal,
        };
        websocket::close(&mut self.out, code);
        let flushed = async {
            poll_fn(|cx| match self.poll_write(cx) {
                Ok((_, true)) | Err(_) => Poll::Ready(()),
                Ok(_) => Poll::Pending,
            })
            .await;
            let _ = self.io.shutdown().await;
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, flushed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    /// Longer than any test runs: only the write timeout can end it.
    const MAX_LIFETIME_FOR_TEST: Duration = Duration::from_secs(3600);

    /// A masked client WebSocket message carrying `frame`.
    fn client_message(frame: &[u8]) -> Vec<u8> {
        assert!(frame.len() < 126);
        let mut out = vec![0x82, 0x80 | frame.len() as u8, 0, 0, 0, 0];
        out.extend_from_slice(frame);
        out
    }

    fn keepalive() -> Vec<u8> {
        // Stream 0, KEEPALIVE (0x03 << 10) with RESPOND (0x80), position 0.
        let mut frame = vec![0, 0, 0, 0, 0x03 << 2, 0x80];
        frame.extend_from_slice(&[0; 8]);
        frame
    }

    fn socket() -> (Socket<DuplexStream>, DuplexStream) {
        let (server, client) = tokio::io::duplex(1024);
        let mut socket = Socket::new(server);
        socket.set_lifetime(Duration::from_secs(10));
        (socket, client)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_dropped_after_its_lifetime() {
        let (mut socket, mut client) = socket();
        let started = Instant::now();
        // A keepalive at 8 s moves the deadline to 18 s.
        let keepalive_later = async {
            tokio::time::sleep(Duration::from_secs(8)).await;
            client.write_all(&client_message(&keepalive())).await.expect("write");
            client
        };
        let (result, _client) = tokio::join!(
            async {
                loop {
                    // Keepalives are served inside; only the deadline ends the wait.
                    match socket.next_frame().await {
                        Ok(frame) => {
                            let parsed = frame::parse(&frame).expect("frame");
                            socket.on_control(&parsed).expect("control");
                        }
                        Err(e) => return e,
                    }
                }
            },
            keepalive_later
        );
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(18) && waited < Duration::from_secs(19), "{waited:?}");
        assert!(
            matches!(
                result,
                Closing::Error {
                    code: error_code::CONNECTION_ERROR,
                    ..
                }
            ),
            "{result:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_dropped() {
        let (mut socket, mut client) = socket();
        socket.set_lifetime(MAX_LIFETIME_FOR_TEST);
        // A first frame fills the client's 1024-byte buffer exactly; then nothing is sent for a
        // while. That idle time does not count towards the stall of the next frame.
        socket.queue_line(1, &[7u8; 1024 - 4 - frame::HEADER_LEN]);
        let written = poll_fn(|cx| Poll::Ready(socket.poll_write(cx))).await;
        assert!(matches!(written, Ok((true, true))), "{written:?}");
        tokio::time::sleep(2 * WRITE_TIMEOUT).await;
        socket.queue_line(1, &vec![7u8; 64 * 1024]);
        let started = Instant::now();
        let result = poll_fn(|cx| match socket.poll_write(cx) {
            Ok((_, true)) => Poll::Ready(None),
            Ok(_) => match socket.poll_deadline(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Some(e)),
            },
            Err(e) => Poll::Ready(Some(e)),
        })
        .await;
        assert!(matches!(result, Some(Closing::Gone)), "{result:?}");
        assert!(started.elapsed() >= WRITE_TIMEOUT, "{:?}", started.elapsed());
        // What was written before the stall arrived.
        let mut got = vec![0u8; 1024];
        assert_eq!(client.read(&mut got).await.expect("read"), 1024);
    }
}
