//! The WebSocket transport as the PowerSync JS SDK drives it (protocol.md §3): RSocket 1.0 over
//! WebSocket ([`crate::rsocket`] frames). SETUP carries the token, REQUEST_STREAM on stream 1
//! carries the same JSON body as `POST /sync/stream`, and every PAYLOAD(NEXT) is one BSON line.
//!
//! Flow control is the SDK's: initial credit 10, topped back up to 10 as lines are consumed.
//! The SDK asks for one more line after every line; this client asks for all lines consumed so
//! far just before it would wait for more (or at the SDK's low-water mark of 5 while lines keep
//! coming), so the server sees as much credit as with the SDK but a burst costs one REQUEST_N.
//! A KEEPALIVE with RESPOND goes out every 20 s, as from the SDK (sent when the client next
//! waits: while lines flow, the REQUEST_N frames already show that it is alive). Nothing the
//! server sends is answered.
//!
//! Fan-out holds thousands of these, so the socket's read buffer is small (a big line is read in
//! several calls instead of one large buffer per connection).

use crate::client::MAX_BSON_LINE;
use crate::rsocket::{self, Received, KEEPALIVE_EVERY};
use anyhow::{bail, Context, Result};
use futures::{FutureExt, SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Consumed lines after which credit is topped up even while more lines are ready.
const LOW_WATER: u32 = 5;
/// Bytes read from the socket per call.
const READ_BUFFER: usize = 4096;
/// Client frames are written once this much is queued (the queue grows only to what is
/// queued; every frame is flushed at once anyway).
const WRITE_BUFFER: usize = 4096;

/// An open sync stream over RSocket/WebSocket.
pub struct WsStream {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The line handed out last (a slice of its message).
    line: Bytes,
    /// Lines received since the last REQUEST_N.
    owed: u32,
    next_keepalive: Instant,
    /// RSocket frame bytes received (after WebSocket framing).
    pub frame_bytes: u64,
}

/// `ws://host:port/sync/stream` for a service at `http://host:port`.
fn sync_url(service_url: &str) -> Result<String> {
    let rest = if let Some(rest) = service_url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = service_url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        bail!("service URL {service_url} is neither http:// nor https://");
    };
    Ok(format!("{rest}/sync/stream"))
}

/// Upgrade, send SETUP with `token` and REQUEST_STREAM with `body` (the JSON request).
pub async fn open(service_url: &str, token: &str, body: &[u8]) -> Result<WsStream> {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(MAX_BSON_LINE + 64))
        .max_frame_size(Some(MAX_BSON_LINE + 64));
    let url = sync_url(service_url)?;
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
        .await
        .with_context(|| format!("WebSocket upgrade of {url}"))?;
    let mut stream = WsStream {
        ws,
        line: Bytes::new(),
        owed: 0,
        next_keepalive: Instant::now() + KEEPALIVE_EVERY,
        frame_bytes: 0,
    };
    stream
        .ws
        .feed(Message::binary(rsocket::setup_frame(token)?))
        .await
        .context("sending SETUP")?;
    stream
        .send(rsocket::request_stream_frame(body)?)
        .await
        .context("sending REQUEST_STREAM")?;
    Ok(stream)
}

impl WsStream {
    /// The next sync line; `Ok(None)` when the server completed the stream or closed the socket.
    /// `stall` bounds the wait for a message (None = wait forever, for idle held streams).
    pub async fn next_line(&mut self, stall: Option<Duration>) -> Result<Option<&[u8]>> {
        loop {
            // A message that is already here is taken without waiting; only before a real wait
            // is the credit topped up, so a burst of lines costs one REQUEST_N.
            let message = match self.ws.next().now_or_never() {
                Some(m) => m,
                None => self.wait(stall).await?,
            };
            let Some(message) = message else {
                return Ok(None);
            };
            let data = match message.context("reading the WebSocket")? {
                Message::Binary(data) => data,
                Message::Close(_) => return Ok(None),
                Message::Text(_) => bail!("text WebSocket message (RSocket frames are binary)"),
                // Pings are answered by the WebSocket layer; the server sends none anyway.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            self.frame_bytes += data.len() as u64;
            match rsocket::parse(&data)? {
                Received::Line(range) => {
                    self.owed += 1;
                    if self.owed >= LOW_WATER {
                        self.top_up().await?;
                    }
                    self.line = data.slice(range);
                    return Ok(Some(&self.line));
                }
                Received::Complete => return Ok(None),
                Received::Other => {}
            }
        }
    }

    /// Top up the credit, then wait for a message, sending keepalives while waiting.
    async fn wait(&mut self, stall: Option<Duration>) -> Result<Option<Result<Message, WsError>>> {
        self.top_up().await?;
        let deadline = stall.map(|s| Instant::now() + s);
        loop {
            let stalled = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = self.ws.next() => return Ok(message),
                () = tokio::time::sleep_until(self.next_keepalive) => {
                    self.next_keepalive = Instant::now() + KEEPALIVE_EVERY;
                    self.send(rsocket::keepalive_frame()).await.context("sending KEEPALIVE")?;
                }
                () = stalled => bail!("no data from the service for {} s", stall.unwrap_or_default().as_secs()),
            }
        }
    }

    /// Give back the credit of every line received since the last top-up.
    async fn top_up(&mut self) -> Result<()> {
        if self.owed == 0 {
            return Ok(());
        }
        let n = std::mem::take(&mut self.owed);
        self.send(rsocket::request_n_frame(n)).await.context("sending REQUEST_N")
    }

    async fn send(&mut self, frame: Vec<u8>) -> Result<()> {
        self.ws.send(Message::binary(frame)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn websocket_url_from_service_url() {
        assert_eq!(sync_url("http://127.0.0.1:8080").expect("url"), "ws://127.0.0.1:8080/sync/stream");
        assert_eq!(sync_url("https://x.example").expect("url"), "wss://x.example/sync/stream");
        assert!(sync_url("ftp://x").is_err());
    }

    type ServerWs = WebSocketStream<TcpStream>;

    /// A stand-in service: accept one WebSocket on a free port; its URL and the server side.
    async fn listen() -> (String, tokio::task::JoinHandle<ServerWs>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            tokio_tungstenite::accept_async(tcp).await.expect("upgrade")
        });
        (url, accept)
    }

    /// The next client frame: (type, body after the 6-byte header).
    async fn client_frame(ws: &mut ServerWs) -> (u8, Vec<u8>) {
        loop {
            match ws.next().await.expect("open").expect("frame") {
                Message::Binary(b) => return ((b[4] >> 2), b[6..].to_vec()),
                _ => continue,
            }
        }
    }

    fn u32_at(b: &[u8]) -> u32 {
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// A PAYLOAD frame on stream 1 with the given flags (NEXT 0x20, COMPLETE 0x40).
    fn payload(flags: u8, data: &[u8]) -> Message {
        let mut frame = vec![0, 0, 0, 1, 0x0A << 2, flags];
        frame.extend_from_slice(data);
        Message::binary(frame)
    }

    /// The SDK's opening frames, then the credit the client gave in REQUEST_STREAM.
    async fn handshake(ws: &mut ServerWs) -> u32 {
        let (setup, body) = client_frame(ws).await;
        assert_eq!(setup, 0x01, "SETUP first");
        assert!(String::from_utf8_lossy(&body).contains(r#""token":"Token jwt""#));
        let (request, body) = client_frame(ws).await;
        assert_eq!(request, 0x06, "then REQUEST_STREAM");
        assert!(body.ends_with(br#"{"buckets":[]}"#));
        u32_at(&body)
    }

    #[tokio::test]
    async fn lines_flow_within_the_credit_the_client_gives() {
        const LINES: u32 = 37;
        let (url, accept) = listen().await;
        let server = tokio::spawn(async move {
            let mut ws = accept.await.expect("accepted");
            let mut credit = handshake(&mut ws).await;
            assert_eq!(credit, 10, "initial N as in the SDK");
            let mut sent = 0;
            while sent < LINES {
                // Only ever within credit: a client that does not top up stalls this loop.
                while credit > 0 && sent < LINES {
                    let doc = bson::doc! {"n": sent};
                    ws.send(payload(0x20, &doc.to_vec().expect("bson"))).await.expect("send");
                    (credit, sent) = (credit - 1, sent + 1);
                }
                if sent < LINES {
                    let (frame, body) = client_frame(&mut ws).await;
                    assert_eq!(frame, 0x08, "only REQUEST_N while lines flow");
                    credit += u32_at(&body);
                }
            }
            ws.send(payload(0x40, b"")).await.expect("complete");
        });
        let mut stream = open(&url, "jwt", br#"{"buckets":[]}"#).await.expect("open");
        let mut got = Vec::new();
        while let Some(line) = stream.next_line(Some(Duration::from_secs(10))).await.expect("line") {
            let doc = bson::RawDocument::from_bytes(line).expect("a BSON line");
            got.push(doc.get_i32("n").expect("n"));
        }
        let expected: Vec<i32> = (0..LINES as i32).collect();
        assert_eq!(got, expected);
        server.await.expect("server");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_sends_keepalives() {
        let (url, accept) = listen().await;
        let server = tokio::spawn(async move {
            let mut ws = accept.await.expect("accepted");
            handshake(&mut ws).await;
            let started = Instant::now();
            let (frame, body) = client_frame(&mut ws).await;
            let waited = started.elapsed();
            ws.send(payload(0x40, b"")).await.expect("complete");
            (frame, body, waited)
        });
        let mut stream = open(&url, "jwt", br#"{"buckets":[]}"#).await.expect("open");
        // Paused time: without a keepalive this would wait for ever, so bound it.
        let next = tokio::time::timeout(Duration::from_secs(60), stream.next_line(None)).await;
        assert!(next.expect("a keepalive within 60 s").expect("no error").is_none(), "completed");
        let (frame, body, waited) = server.await.expect("server");
        assert_eq!(frame, 0x03, "KEEPALIVE");
        assert_eq!(body.len(), 8, "last received position, no data");
        assert!(waited >= KEEPALIVE_EVERY, "not before 20 s: {waited:?}");
    }
}
