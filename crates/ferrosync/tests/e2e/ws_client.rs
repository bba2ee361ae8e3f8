//! A raw RSocket-over-WebSocket client for the tests, built on an independent WebSocket
//! implementation (tokio-tungstenite): frames are built by hand, as the JS SDK sends them.

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SETUP: u8 = 0x01;
pub const KEEPALIVE: u8 = 0x03;
pub const REQUEST_STREAM: u8 = 0x06;
pub const REQUEST_N: u8 = 0x08;
pub const CANCEL: u8 = 0x09;
pub const PAYLOAD: u8 = 0x0A;
pub const ERROR: u8 = 0x0B;
const FLAG_METADATA: u16 = 0x100;
pub const FLAG_COMPLETE: u16 = 0x40;
pub const FLAG_NEXT: u16 = 0x20;
pub const FLAG_RESPOND: u16 = 0x80;

/// A frame received from the server.
#[derive(Debug)]
pub struct Frame {
    pub stream_id: u32,
    pub frame_type: u8,
    pub flags: u16,
    /// Everything after the 6-byte header.
    pub body: Vec<u8>,
}

impl Frame {
    /// `(code, message)` of an ERROR frame.
    pub fn error(&self) -> Option<(u32, String)> {
        (self.frame_type == ERROR && self.body.len() >= 4).then(|| {
            let code = u32::from_be_bytes([self.body[0], self.body[1], self.body[2], self.body[3]]);
            (code, String::from_utf8_lossy(&self.body[4..]).into_owned())
        })
    }
}

pub fn frame(stream_id: u32, frame_type: u8, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut out = stream_id.to_be_bytes().to_vec();
    out.extend_from_slice(&((u16::from(frame_type) << 10) | flags).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn with_metadata(mut body: Vec<u8>, metadata: &[u8], data: &[u8]) -> Vec<u8> {
    body.extend_from_slice(&(metadata.len() as u32).to_be_bytes()[1..]);
    body.extend_from_slice(metadata);
    body.extend_from_slice(data);
    body
}

/// SETUP as the JS SDK sends it (keepalive 20 s, lifetime 90 s), with `mime` for both.
pub fn setup_frame(mime: &str, metadata: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 1, 0, 0];
    body.extend_from_slice(&20_000u32.to_be_bytes());
    body.extend_from_slice(&90_000u32.to_be_bytes());
    for _ in 0..2 {
        body.push(mime.len() as u8);
        body.extend_from_slice(mime.as_bytes());
    }
    frame(0, SETUP, FLAG_METADATA, &with_metadata(body, metadata, b""))
}

pub fn request_stream_frame(stream_id: u32, initial_n: u32, metadata: &[u8], data: &[u8]) -> Vec<u8> {
    let body = with_metadata(initial_n.to_be_bytes().to_vec(), metadata, data);
    frame(stream_id, REQUEST_STREAM, FLAG_METADATA, &body)
}

pub fn request_n_frame(stream_id: u32, n: u32) -> Vec<u8> {
    frame(stream_id, REQUEST_N, 0, &n.to_be_bytes())
}

pub fn keepalive_frame(data: &[u8]) -> Vec<u8> {
    let mut body = 0u64.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    frame(0, KEEPALIVE, FLAG_RESPOND, &body)
}

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Open a WebSocket to `http_url` + `path` (the SDK rewrites `http://` to `ws://`).
    pub async fn connect(http_url: &str, path: &str) -> Result<WsClient> {
        let url = format!("{}{path}", http_url.replacen("http://", "ws://", 1));
        let (ws, response) = tokio_tungstenite::connect_async(url).await.context("WebSocket connect")?;
        anyhow::ensure!(response.status().as_u16() == 101, "status {}", response.status());
        Ok(WsClient { ws })
    }

    /// Connect, SETUP with `token` in JSON metadata and request `/sync/stream` with `body`.
    pub async fn sync(http_url: &str, token: &str, initial_n: u32, body: Value) -> Result<WsClient> {
        let mut client = Self::connect(http_url, "/sync/stream").await?;
        let metadata = json!({"token": format!("Token {token}"), "user_agent": "ferrosync-e2e"});
        client
            .send(setup_frame("application/json", metadata.to_string().as_bytes()))
            .await?;
        client
            .send(request_stream_frame(
                1,
                initial_n,
                br#"{"path":"/sync/stream"}"#,
                body.to_string().as_bytes(),
            ))
            .await?;
        Ok(client)
    }

    pub async fn send(&mut self, frame: Vec<u8>) -> Result<()> {
        self.ws.send(Message::Binary(frame.into())).await?;
        Ok(())
    }

    pub async fn send_message(&mut self, message: Message) -> Result<()> {
        self.ws.send(message).await?;
        Ok(())
    }

    /// The next RSocket frame; `Ok(None)` when the server closed the connection.
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<Option<Frame>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.ws.next())
                .await
                .context("timed out waiting for a frame")?;
            let bytes = match message {
                None | Some(Ok(Message::Close(_))) | Some(Err(_)) => return Ok(None),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(_)) => continue,
            };
            if bytes.len() < 6 {
                bail!("frame of {} bytes", bytes.len());
            }
            let type_flags = u16::from_be_bytes([bytes[4], bytes[5]]);
            return Ok(Some(Frame {
                stream_id: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                frame_type: (type_flags >> 10) as u8,
                flags: type_flags & 0x3FF,
                body: bytes[6..].to_vec(),
            }));
        }
    }

    /// The next sync line (a PAYLOAD frame's BSON document, as JSON); fails on anything else.
    pub async fn next_line(&mut self, timeout: Duration) -> Result<Value> {
        let frame = self.next_frame(timeout).await?.context("connection closed")?;
        line_of(&frame)
    }

    /// Apply lines until a checkpoint is complete and `done` holds, topping up credit like the
    /// SDK does.
    pub async fn sync_until(
        &mut self,
        state: &mut crate::harness::ClientState,
        timeout: Duration,
        done: impl Fn(&crate::harness::ClientState) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.next_line(deadline.saturating_duration_since(Instant::now())).await?;
            self.send(request_n_frame(1, 1)).await?;
            state.apply(&line)?;
            if state.complete && done(state) {
                return Ok(());
            }
        }
    }
}

/// The sync line in a PAYLOAD(NEXT) frame.
pub fn line_of(frame: &Frame) -> Result<Value> {
    if frame.frame_type != PAYLOAD || frame.flags & FLAG_NEXT == 0 {
        bail!("expected PAYLOAD(NEXT), got {frame:?}");
    }
    bson::deserialize_from_slice(&frame.body).context("BSON line")
}
