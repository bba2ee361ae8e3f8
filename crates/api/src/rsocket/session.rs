//! One RSocket connection over WebSocket (protocol.md §3.3, §3.4): SETUP and authentication,
//! the REQUEST_STREAM for `/sync/stream`, then the sync lines as PAYLOAD frames, each one BSON
//! line, sent only while the client has credit (REQUEST_N). Keepalives are answered throughout.
//!
//! Flow control is what bounds memory: without credit the connection's line stream is not
//! polled, so the sync connection parks at its next chunk and nothing more is read from
//! storage for this client.

use super::frame::{self, error_code, Frame};
use super::socket::{Closing, Socket};
use crate::auth::AuthContext;
use crate::error::ServiceError;
use crate::lifecycle::Lifecycle;
use crate::server::AppState;
use crate::stream::StreamingSyncRequest;
use bytes::Bytes;
use ferrosync_metrics::Transport;
use ferrosync_sync::{connection_stream, LineFormat, SyncError};
use futures::Stream;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

/// How long a new connection may take to send SETUP, and then its REQUEST_STREAM.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds of the keepalive lifetime a client may ask for in SETUP.
const MIN_LIFETIME: Duration = Duration::from_secs(10);
const MAX_LIFETIME: Duration = Duration::from_secs(600);
/// Most credit a client can hold (RSocket caps REQUEST_N at 2^31 - 1).
const MAX_CREDITS: u64 = i32::MAX as u64;
/// Stop taking lines while this much is waiting to be written.
const OUT_HIGH: usize = 64 * 1024;
/// The only route served over RSocket.
const SYNC_PATH: &str = "/sync/stream";

/// Encoding of SETUP metadata, request metadata and request data (from SETUP's MIME types).
#[derive(Clone, Copy)]
enum Mime {
    Json,
    Bson,
}

impl Mime {
    fn parse(mime: &[u8]) -> Option<Mime> {
        match mime {
            b"application/json" => Some(Mime::Json),
            b"application/bson" => Some(Mime::Bson),
            _ => None,
        }
    }

    fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            Mime::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            Mime::Bson => bson::deserialize_from_slice(bytes).map_err(|e| e.to_string()),
        }
    }
}

#[derive(Deserialize)]
struct SetupMetadata {
    token: Option<String>,
}

#[derive(Deserialize)]
struct RequestMetadata {
    path: Option<String>,
}

/// What SETUP established.
struct Established {
    auth: AuthContext,
    metadata_mime: Mime,
    data_mime: Mime,
    _permit: OwnedSemaphorePermit,
}

/// Serve one upgraded connection until the sync stream ends or the client goes away.
pub(super) async fn run<T: AsyncRead + AsyncWrite + Unpin>(io: T, state: Arc<AppState>) {
    let mut socket = Socket::new(io);
    let outcome = async {
        let established = tokio::time::timeout(HANDSHAKE_TIMEOUT, setup(&mut socket, &state))
            .await
            .map_err(|_| Closing::error(0, error_code::INVALID_SETUP, "No SETUP frame in time"))??;
        let (stream_id, initial_n, request) = tokio::time::timeout(HANDSHAKE_TIMEOUT, request_stream(&mut socket, &established))
            .await
            .map_err(|_| Closing::error(0, error_code::CONNECTION_ERROR, "No stream requested in time"))??;
        let (request, lifecycle) = request.into_connection(&established.auth, LineFormat::Bson, Transport::WebSocket);
        let (lines, ended_with) = connection_stream(state.hub.clone(), request, state.limits);
        let streaming = Streaming {
            lifecycle,
            socket: &mut socket,
            lines: Box::pin(lines),
            ended_with,
            stream_id,
            credits: u64::from(initial_n).min(MAX_CREDITS),
            pending: Bytes::new(),
            completed: false,
        };
        streaming.await
    }
    .await;
    socket.close(outcome.err()).await;
}

fn rejected(e: &ServiceError) -> Closing {
    e.record();
    Closing::error(0, error_code::REJECTED_SETUP, &e.to_string())
}

/// Wait for SETUP, check it, authenticate, and take a connection slot.
async fn setup<T: AsyncRead + AsyncWrite + Unpin>(socket: &mut Socket<T>, state: &AppState) -> Result<Established, Closing> {
    let message = socket.next_frame().await?;
    let setup = match frame::parse(&message) {
        Ok(Frame::Setup(setup)) => setup,
        Ok(_) => return Err(Closing::error(0, error_code::INVALID_SETUP, "The first frame must be SETUP")),
        Err(e) => return Err(Closing::error(0, error_code::INVALID_SETUP, &e.to_string())),
    };
    if setup.major != 1 || setup.lease || setup.resume {
        return Err(Closing::error(
            0,
            error_code::UNSUPPORTED_SETUP,
            "Only RSocket 1.x without lease or resumption is supported",
        ));
    }
    let (Some(metadata_mime), Some(data_mime)) = (Mime::parse(setup.metadata_mime), Mime::parse(setup.data_mime)) else {
        let e = ServiceError::new(
            "PSYNC_S2004",
            415,
            "Unsupported MIME type: use application/json or application/bson",
        );
        return Err(rejected(&e));
    };
    socket.set_lifetime(Duration::from_millis(u64::from(setup.lifetime_ms)).clamp(MIN_LIFETIME, MAX_LIFETIME));
    let Some(metadata) = setup.payload.metadata.filter(|m| !m.is_empty()) else {
        return Err(rejected(&ServiceError::unauthorized("PSYNC_S2101", "No metadata in SETUP")));
    };
    let metadata: SetupMetadata = metadata_mime
        .decode(metadata)
        .map_err(|e| rejected(&ServiceError::unauthorized("PSYNC_S2101", format!("Invalid SETUP metadata: {e}"))))?;
    // Boxed: verification (JWKS fetches included) is a large future that a held stream should
    // not carry for its lifetime.
    let auth = Box::pin(state.keys.verify_authorization(metadata.token.as_deref()))
        .await
        .map_err(|e| rejected(&e))?;
    let permit = crate::stream::admit(state).map_err(|e| rejected(&e))?;
    Ok(Established {
        auth,
        metadata_mime,
        data_mime,
        _permit: permit,
    })
}

/// Wait for a valid REQUEST_STREAM for `/sync/stream`; requests for anything else get an ERROR
/// on their stream and the connection waits on.
async fn request_stream<T: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut Socket<T>,
    established: &Established,
) -> Result<(u32, u32, crate::stream::ValidRequest), Closing> {
    loop {
        let r = socket.next_request().await?;
        match decode_request(established, r.metadata.as_deref(), &r.data) {
            Ok(request) => return Ok((r.stream_id, r.initial_n, request)),
            Err(e) => {
                e.record();
                socket
                    .send_error(r.stream_id, error_code::APPLICATION_ERROR, &e.to_string())
                    .await?
            }
        }
    }
}

fn decode_request(established: &Established, metadata: Option<&[u8]>, data: &[u8]) -> Result<crate::stream::ValidRequest, ServiceError> {
    let path = match metadata.filter(|m| !m.is_empty()) {
        Some(m) => {
            established
                .metadata_mime
                .decode::<RequestMetadata>(m)
                .map_err(|e| ServiceError::validation(format!("invalid request metadata: {e}")))?
                .path
        }
        None => None,
    };
    if path.as_deref() != Some(SYNC_PATH) {
        return Err(ServiceError::new("PSYNC_S2002", 404, "Route not found"));
    }
    let request: StreamingSyncRequest = established
        .data_mime
        .decode(data)
        .map_err(|e| ServiceError::validation(format!("invalid sync request body: {e}")))?;
    request.validate()
}

/// The streaming phase as one future: client frames, sync lines and socket writes are all
/// served from a single poll, so a held stream needs no extra task or channel.
struct Streaming<'a, T, L> {
    lifecycle: Lifecycle,
    socket: &'a mut Socket<T>,
    lines: Pin<Box<L>>,
    /// The error that ended the connection, if one did: sent as an ERROR frame.
    ended_with: oneshot::Receiver<SyncError>,
    stream_id: u32,
    credits: u64,
    /// The rest of the last chunk of lines: whole BSON documents not yet framed.
    pending: Bytes,
    /// The COMPLETE frame is queued.
    completed: bool,
}

/// Polls per wake-up before yielding to other tasks.
const POLL_BUDGET: usize = 64;

impl<T: AsyncRead + AsyncWrite + Unpin, L: Stream<Item = Bytes>> std::future::Future for Streaming<'_, T, L> {
    type Output = Result<(), Closing>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        for _ in 0..POLL_BUDGET {
            let mut progress = this.socket.poll_receive(cx)?;
            while let Some(message) = this.socket.take_message()? {
                if this.on_message(&message)? {
                    return Poll::Ready(Ok(()));
                }
            }
            progress |= this.fill(cx)?;
            let (wrote, flushed) = this.socket.poll_write(cx)?;
            if flushed && this.completed {
                return Poll::Ready(Ok(()));
            }
            this.socket.poll_deadline(cx)?;
            if !(progress || wrote) {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin, L: Stream<Item = Bytes>> Streaming<'_, T, L> {
    /// Handle one client message; `true` when the client cancelled the stream (CANCEL, or an
    /// ERROR on it).
    fn on_message(&mut self, message: &[u8]) -> Result<bool, Closing> {
        match frame::parse(message) {
            Ok(Frame::RequestN { stream_id, n }) if stream_id == self.stream_id => {
                self.credits = (self.credits + u64::from(n)).min(MAX_CREDITS);
            }
            Ok(Frame::Cancel { stream_id } | Frame::Error { stream_id, .. }) if stream_id == self.stream_id => return Ok(true),
            Ok(Frame::RequestStream { stream_id, .. }) => {
                self.socket.queue_error(
                    stream_id,
                    error_code::APPLICATION_ERROR,
                    "[PSYNC_S2001] One sync stream per connection",
                );
            }
            Ok(frame) => self.socket.on_control(&frame)?,
            Err(e) => return Err(Closing::error(0, error_code::CONNECTION_ERROR, &e.to_string())),
        }
        Ok(false)
    }

    /// Frame lines while the client has credit and the write buffer has room; `true` if
    /// anything happened.
    fn fill(&mut self, cx: &mut Context<'_>) -> Result<bool, Closing> {
        // Nothing is written while filling: what the queue grew by is what goes on the wire.
        let queued = self.socket.queued();
        let progress = self.fill_queue(cx);
        let added = self.socket.queued().saturating_sub(queued);
        if added > 0 {
            self.lifecycle.sent(added);
        }
        progress
    }

    fn fill_queue(&mut self, cx: &mut Context<'_>) -> Result<bool, Closing> {
        let mut progress = false;
        while !self.completed && self.credits > 0 && self.socket.queued() < OUT_HIGH {
            if self.pending.is_empty() {
                match self.lines.as_mut().poll_next(cx) {
                    Poll::Ready(Some(chunk)) => {
                        self.lifecycle.synced(chunk.len());
                        self.pending = chunk;
                    }
                    Poll::Ready(None) => {
                        match self.ended_with.try_recv() {
                            Ok(error) => {
                                let error = crate::stream::refused(error);
                                self.socket
                                    .queue_error(self.stream_id, error_code::APPLICATION_ERROR, &error.to_string());
                            }
                            Err(_) => self.socket.queue_complete(self.stream_id),
                        }
                        self.completed = true;
                    }
                    Poll::Pending => break,
                }
                progress = true;
                continue;
            }
            let line = next_document(&mut self.pending)
                .ok_or_else(|| Closing::error(self.stream_id, error_code::APPLICATION_ERROR, "[PSYNC_S2001] Internal error"))?;
            self.socket.queue_line(self.stream_id, &line);
            self.credits -= 1;
            progress = true;
        }
        Ok(progress)
    }
}

/// Split the first BSON document (its first four bytes are its length) off `chunk`.
fn next_document(chunk: &mut Bytes) -> Option<Bytes> {
    let len = chunk.get(..4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))?;
    let len = usize::try_from(len).ok().filter(|&n| n >= 5 && n <= chunk.len())?;
    let line = chunk.split_to(len);
    if chunk.is_empty() {
        // Do not keep the chunk's allocation alive through an empty remainder.
        *chunk = Bytes::new();
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_by_their_length() {
        let a = bson::serialize_to_vec(&bson::doc! {"a": 1}).expect("doc");
        let b = bson::serialize_to_vec(&bson::doc! {"checkpoint_complete": {"last_op_id": "3"}}).expect("doc");
        let mut chunk = Bytes::from([a.clone(), b.clone()].concat());
        assert_eq!(next_document(&mut chunk).as_deref(), Some(&a[..]));
        assert_eq!(next_document(&mut chunk).as_deref(), Some(&b[..]));
        assert_eq!(next_document(&mut chunk), None);
        let mut bad = Bytes::from_static(&[200, 0, 0, 0, 0]);
        assert_eq!(next_document(&mut bad), None);
    }
}
