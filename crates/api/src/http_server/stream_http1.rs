//! The lean HTTP/1.1 path for `POST /sync/stream` (see the parent module for why).
//!
//! It takes only the plain case: HTTP/1.1, a `Content-Length` body (or none), no
//! `Transfer-Encoding`, `Expect` or `Upgrade`, a head within [`MAX_HEAD`] and a body within
//! [`MAX_BODY`]. Anything else, malformed heads included, is handed to hyper unchanged, which
//! answers it as before. The response always ends the connection (`connection: close`): a sync
//! stream lasts until the token expires, so keeping the connection alive would gain nothing.
//!
//! While the body is idle the connection holds only its socket and the body stream; the
//! socket is watched for the client going away, which drops the body (and so the sync
//! connection) at once.

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue, Method, Version};
use axum::Router;
use bytes::Buf;
use futures::StreamExt;
use std::io;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tower::ServiceExt;

/// The start of every request this path takes.
const PREFIX: &[u8] = b"POST /sync/stream";
const PATH: &str = "/sync/stream";
/// Longest request head taken; a longer one goes to hyper (which limits it in its own way).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body taken (a client with many buckets states each one's position).
const MAX_BODY: usize = 256 * 1024;
/// Most request headers taken.
const MAX_HEADERS: usize = 64;

/// What the first bytes of a connection turned out to be.
pub enum Sniffed {
    /// A complete sync stream request for this path (boxed: the variants differ in size a lot).
    SyncStream(Box<Request>),
    /// Anything else, with the bytes read so far.
    Other(Vec<u8>),
}

/// Outcome of looking at the bytes read so far.
enum Step {
    /// Read more.
    Need,
    Other,
    SyncStream(Box<Request>),
}

/// Read from a new connection until it is clear whether it is a sync stream request this path
/// takes. `Err` when the client went away before sending anything.
pub async fn sniff(tcp: &TcpStream) -> io::Result<Sniffed> {
    let mut buf = Vec::new();
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(2048);
        }
        tcp.readable().await?;
        let n = match tcp.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if buf.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // A truncated request: hyper reports it as it always did.
            return Ok(Sniffed::Other(buf));
        }
        match classify(&buf) {
            Step::Need => {}
            Step::Other => return Ok(Sniffed::Other(buf)),
            Step::SyncStream(request) => return Ok(Sniffed::SyncStream(request)),
        }
    }
}

fn classify(buf: &[u8]) -> Step {
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Step::Other;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let head_len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Step::Need,
        Ok(httparse::Status::Partial) | Err(_) => return Step::Other,
    };
    let Some(body_len) = plain_body_len(&head) else {
        return Step::Other;
    };
    if buf.len() < head_len + body_len {
        return Step::Need;
    }
    match to_request(&head, &buf[head_len..head_len + body_len]) {
        Some(request) => Step::SyncStream(Box::new(request)),
        None => Step::Other,
    }
}

/// The body length of a request this path takes; `None` for anything it leaves to hyper.
fn plain_body_len(head: &httparse::Request<'_, '_>) -> Option<usize> {
    let path = head.path?;
    if head.version != Some(1) || (path != PATH && !path.starts_with("/sync/stream?")) {
        return None;
    }
    let mut len = None;
    for h in head.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("expect") || name.eq_ignore_ascii_case("upgrade") {
            return None;
        }
        if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value).ok()?.trim();
            if len.is_some() || value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            len = Some(value.parse::<usize>().ok()?);
        }
    }
    let len = len.unwrap_or(0);
    (len <= MAX_BODY).then_some(len)
}

fn to_request(head: &httparse::Request<'_, '_>, body: &[u8]) -> Option<Request> {
    let mut builder = Request::builder().method(Method::POST).uri(head.path?).version(Version::HTTP_11);
    for h in head.headers.iter() {
        builder = builder.header(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    builder.body(Body::from(Bytes::copy_from_slice(body))).ok()
}

/// Answer `request` through the router and stream the response until it ends or the client
/// goes away.
pub async fn serve(mut tcp: TcpStream, request: Box<Request>, router: Router) {
    let response = match router.oneshot(*request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let length = body.size_hint().exact();
    if tcp.write_all(&encode_head(&parts, length)).await.is_err() {
        return;
    }
    if let Err(e) = send_body(&mut tcp, body, length.is_none()).await {
        tracing::trace!(error = %e, "sync stream response ended early");
    }
}

/// Status line and headers; the framing headers are ours.
fn encode_head(parts: &axum::http::response::Parts, length: Option<u64>) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    let status = parts.status;
    head.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", status.as_str(), status.canonical_reason().unwrap_or("")).as_bytes());
    for (name, value) in &parts.headers {
        if matches!(*name, header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION) {
            continue;
        }
        push_header(&mut head, name.as_str(), value.as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        push_header(&mut head, "date", httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    }
    match length {
        Some(n) => push_header(&mut head, "content-length", n.to_string().as_bytes()),
        None => push_header(&mut head, "transfer-encoding", b"chunked"),
    }
    push_header(&mut head, "connection", b"close");
    head.extend_from_slice(b"\r\n");
    head
}

fn push_header(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// Write the body (chunked unless its length is known), then close the connection.
async fn send_body(tcp: &mut TcpStream, body: Body, chunked: bool) -> io::Result<()> {
    let mut frames = body.into_data_stream();
    loop {
        let next = tokio::select! {
            next = frames.next() => next,
            () = client_gone(tcp) => return Ok(()),
        };
        match next {
            Some(Ok(data)) => write_data(tcp, data, chunked).await?,
            // No terminating chunk: the client sees the response cut off, as with hyper.
            Some(Err(e)) => return Err(io::Error::other(e)),
            None => break,
        }
    }
    if chunked {
        tcp.write_all(b"0\r\n\r\n").await?;
    }
    tcp.shutdown().await
}

/// One body frame, in a single (vectored) write so that with TCP_NODELAY a line is one packet.
async fn write_data(tcp: &mut TcpStream, mut data: Bytes, chunked: bool) -> io::Result<()> {
    if data.is_empty() {
        // An empty chunk would end a chunked body.
        return Ok(());
    }
    if !chunked {
        return tcp.write_all_buf(&mut data).await;
    }
    let size = format!("{:x}\r\n", data.len());
    let mut frame = size.as_bytes().chain(data).chain(&b"\r\n"[..]);
    tcp.write_all_buf(&mut frame).await
}

/// Resolves when the client has closed its side or the connection broke. Anything it sends
/// meanwhile (a pipelined request) is discarded: the connection closes after this response.
async fn client_gone(tcp: &TcpStream) {
    let mut scratch = [0u8; 64];
    loop {
        if tcp.readable().await.is_err() {
            return;
        }
        match tcp.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
