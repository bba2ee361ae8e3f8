//! The HTTP server: accepts connections and serves the router over hyper (HTTP/1.1 and h2),
//! except for an HTTP/1.1 `POST /sync/stream`, which takes a lean path of its own.
//!
//! Why: a held sync stream is idle nearly all the time, yet hyper's HTTP/1 connection keeps a
//! read buffer (8 KiB, grown to 16 KiB by the read that watches for the client going away), an
//! 8 KiB header write buffer and its dispatcher for the connection's lifetime: most of what
//! 10,000 held streams cost. The lean path ([`stream_http1`]) parses the request head, hands
//! the request to the same router (so routing, CORS, auth, error envelopes and 429s are
//! unchanged) and writes the response itself, holding no buffers while the stream is idle.
//!
//! Everything else, including a `/sync/stream` request the lean path does not take (chunked
//! request body, `Expect`, HTTP/1.0, h2, oversized or malformed heads), goes to hyper with the
//! bytes already read put back in front of the socket.

mod stream_http1;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Serve `router` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, router: Router) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                // Sync lines are small and latency-bound: never hold them back for Nagle's algorithm.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                tokio::spawn(connection(tcp, router.clone()));
            }
            Err(e) => accept_error(e).await,
        }
    }
}

/// Per-connection errors (the client gave up while queued) are skipped. Others, such as running
/// out of file descriptors, are logged and retried after a pause rather than spun on; as hyper
/// and axum do.
async fn accept_error(e: io::Error) {
    let kind = e.kind();
    if matches!(
        kind,
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// How long a new connection may take to send its first request (head and, for the lean path,
/// body), and hyper's limit for each later request head: idle sockets cannot pile up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn connection(tcp: TcpStream, router: Router) {
    connection_with_timeout(tcp, router, REQUEST_TIMEOUT).await
}

async fn connection_with_timeout(tcp: TcpStream, router: Router, request_timeout: Duration) {
    match tokio::time::timeout(request_timeout, stream_http1::sniff(&tcp)).await {
        Ok(Ok(stream_http1::Sniffed::SyncStream(request))) => stream_http1::serve(tcp, request, router).await,
        // Boxed: hyper's connection state machine is large, and would otherwise size the task of
        // every held stream too.
        Ok(Ok(stream_http1::Sniffed::Other(read))) => Box::pin(hyper_connection(Prefixed::new(read, tcp), router, request_timeout)).await,
        // The client went away, or sent no complete request in time: close.
        Ok(Err(_)) => {}
        Err(_) => tracing::debug!("closing a connection that sent no request in time"),
    }
}

/// Serve a connection with hyper (HTTP/1.1 with keep-alive, or h2), as `axum::serve` does.
async fn hyper_connection(io: Prefixed, router: Router, header_timeout: Duration) {
    let service = TowerToHyperService::new(router.map_request(|req: Request<hyper::body::Incoming>| req.map(Body::new)));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().enable_connect_protocol();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(io), service).await {
        tracing::trace!(error = %e, "connection ended with an error");
    }
}

/// A socket with bytes already read from it put back in front.
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    tcp: TcpStream,
}

impl Prefixed {
    fn new(prefix: Vec<u8>, tcp: TcpStream) -> Self {
        Prefixed { prefix, pos: 0, tcp }
    }
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
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    use futures::StreamExt;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    const T: Duration = Duration::from_secs(5);

    /// Signals when the response body it is moved into is dropped.
    struct DropSignal(Arc<Notify>);

    impl Drop for DropSignal {
        fn drop(&mut self) {
            self.0.notify_one();
        }
    }

    /// `/sync/stream` echoes the body as a first line and then holds the stream open ("bad"
    /// gets a 400); `/other` is a plain route.
    fn router(dropped: Arc<Notify>) -> Router {
        let stream = move |body: Bytes| {
            let dropped = dropped.clone();
            async move {
                if &body[..] == b"bad" {
                    return (StatusCode::BAD_REQUEST, "invalid").into_response();
                }
                let guard = DropSignal(dropped);
                let first = Bytes::from([&b"echo:"[..], &body, b"\n"].concat());
                let lines = futures::stream::once(async move { Ok::<_, io::Error>(first) })
                    .chain(futures::stream::pending())
                    .map(move |line| {
                        let _ = &guard;
                        line
                    });
                Body::from_stream(lines).into_response()
            }
        };
        Router::new()
            .route("/sync/stream", post(stream))
            .route("/other", get(|| async { "other" }))
    }

    async fn start() -> (SocketAddr, Arc<Notify>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dropped = Arc::new(Notify::new());
        tokio::spawn(serve(listener, router(dropped.clone())));
        (addr, dropped)
    }

    /// Read until `needle` has been received (or EOF / timeout); returns everything read.
    async fn read_until(tcp: &mut TcpStream, needle: &str) -> String {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + T;
        while !String::from_utf8_lossy(&got).contains(needle) {
            let mut buf = [0u8; 4096];
            match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    async fn send(addr: SocketAddr, request: &str) -> TcpStream {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(request.as_bytes()).await.expect("write");
        tcp
    }

    fn post_request(body: &str) -> String {
        format!(
            "POST /sync/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn silent_connections_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = router(Arc::new(Notify::new()));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(connection_with_timeout(tcp, router.clone(), Duration::from_millis(200)));
            }
        });
        // Nothing sent at all, and half a request head: both are closed by the server.
        for partial in ["", "POST /sync/stream HTTP/1.1\r\nHost: x\r\n"] {
            let mut tcp = send(addr, partial).await;
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(T, tcp.read(&mut buf)).await;
            assert!(
                matches!(read, Ok(Ok(0)) | Ok(Err(_))),
                "connection left open after {partial:?}: {read:?}"
            );
        }
    }

    #[tokio::test]
    async fn sync_stream_is_chunked_and_freed_when_the_client_goes_away() {
        let (addr, dropped) = start().await;
        let mut tcp = send(addr, &post_request("{\"a\":1}")).await;
        let got = read_until(&mut tcp, "echo:{\"a\":1}\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(got.contains("\r\n\r\nd\r\necho:{\"a\":1}\n\r\n"), "{got}");
        drop(tcp);
        tokio::time::timeout(T, dropped.notified())
            .await
            .expect("the body is dropped when the client goes away");
    }

    #[tokio::test]
    async fn head_and_body_may_arrive_in_pieces() {
        let (addr, _) = start().await;
        let request = post_request("{\"split\":true}");
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        for piece in [&request[..10], &request[10..60], &request[60..]] {
            tcp.write_all(piece.as_bytes()).await.expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = read_until(&mut tcp, "echo:{\"split\":true}").await;
        assert!(got.contains("echo:{\"split\":true}"), "{got}");
    }

    #[tokio::test]
    async fn errors_have_a_length_and_close_the_connection() {
        let (addr, _) = start().await;
        let mut tcp = send(addr, &post_request("bad")).await;
        let mut got = String::new();
        tokio::time::timeout(T, tcp.read_to_string(&mut got))
            .await
            .expect("closed")
            .expect("read");
        assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got}");
        assert!(got.contains("content-length: 7\r\n") && got.ends_with("\r\n\r\ninvalid"), "{got}");
    }

    #[tokio::test]
    async fn chunked_request_bodies_are_served_by_hyper() {
        let (addr, _) = start().await;
        let request = "POST /sync/stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let mut tcp = send(addr, request).await;
        let got = read_until(&mut tcp, "echo:hello").await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n") && got.contains("echo:hello"), "{got}");
    }

    #[tokio::test]
    async fn malformed_heads_get_hypers_400() {
        let (addr, _) = start().await;
        let mut tcp = send(addr, "POST /sync/stream HTTP/1.1\r\nno colon here\r\n\r\n").await;
        let got = read_until(&mut tcp, "\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    }

    #[tokio::test]
    async fn other_routes_keep_the_connection_alive() {
        let (addr, _) = start().await;
        let mut tcp = send(addr, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(read_until(&mut tcp, "other").await.contains("HTTP/1.1 200 OK"));
        tcp.write_all(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        assert!(read_until(&mut tcp, "other").await.contains("HTTP/1.1 200 OK"));
        // A sync stream on a kept-alive connection is served too (by hyper).
        tcp.write_all(post_request("{}").as_bytes()).await.expect("write");
        assert!(read_until(&mut tcp, "echo:{}").await.contains("echo:{}"));
    }

    #[tokio::test]
    async fn h2_prior_knowledge_is_served_by_hyper() {
        let (addr, _) = start().await;
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        // Client preface, then an empty SETTINGS frame.
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .expect("write");
        let mut frame = [0u8; 9];
        tokio::time::timeout(T, tcp.read_exact(&mut frame))
            .await
            .expect("server preface")
            .expect("read");
        assert_eq!(frame[3], 0x04, "the server's first frame is SETTINGS");
    }
}
