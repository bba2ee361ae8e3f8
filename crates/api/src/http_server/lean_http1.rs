//! The lean HTTP/1.1 path (see the parent module for why): answers a request [`super::sniff`]
//! took, through the router, and writes the response itself.
//!
//! A response has a `Content-Length` when its body's size is known and is chunked otherwise.
//! The connection stays open for the next request unless the request or the response asks to
//! close it, or the request is a sync stream (`POST /sync/stream`): a stream lasts until the
//! token expires, so keeping its connection would gain nothing, and closing it lets the watch
//! for the client going away throw away whatever the client sends meanwhile.
//!
//! While the body is idle the connection holds only its socket and the body stream; the
//! socket is watched for the client going away, which drops the body (and so the sync
//! connection) at once. A write that makes no progress for the write timeout ends the
//! connection.

use super::write_timeout::WriteTimeout;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::Router;
use bytes::Buf;
use futures::StreamExt;
use std::io;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How a response body is delimited.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// 1xx, 204 and 304 responses have no body (RFC 9112 §6.3).
    NoBody,
    Length(u64),
    Chunked,
}

impl Framing {
    fn of(status: StatusCode, exact_len: Option<u64>) -> Self {
        if status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Framing::NoBody;
        }
        exact_len.map_or(Framing::Chunked, Framing::Length)
    }
}

/// Answer `request` and write the response; `true` when the connection is ready for the next
/// request.
pub async fn serve(tcp: &mut TcpStream, request: Box<Request>, router: Router, write_timeout: Duration) -> bool {
    let close_asked = asks_to_close(request.headers()) || is_sync_stream(&request);
    // Boxed: the router's future is large, and unboxed it would size every held stream's
    // task long after it finished.
    let response = Box::pin(super::respond(router, *request)).await;
    let (parts, body) = response.into_parts();
    let close = close_asked || asks_to_close(&parts.headers);
    let framing = Framing::of(parts.status, body.size_hint().exact());
    let head = encode_head(&parts, framing, close);
    // Not needed again: freed before a stream is held.
    drop(parts);
    match send(tcp, head, body, framing, close, write_timeout).await {
        Ok(true) if close => {
            let _ = tcp.shutdown().await;
            false
        }
        Ok(complete) => complete,
        Err(e) => {
            tracing::trace!(error = %e, "response ended early");
            false
        }
    }
}

fn is_sync_stream(request: &Request) -> bool {
    request.method() == Method::POST && request.uri().path() == "/sync/stream"
}

fn asks_to_close(headers: &HeaderMap) -> bool {
    crate::rsocket::header_has(headers, header::CONNECTION, "close")
}

/// Status line and headers; the framing headers are ours.
fn encode_head(parts: &axum::http::response::Parts, framing: Framing, close: bool) -> Vec<u8> {
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
    match framing {
        Framing::NoBody => {}
        Framing::Length(n) => push_header(&mut head, "content-length", n.to_string().as_bytes()),
        Framing::Chunked => push_header(&mut head, "transfer-encoding", b"chunked"),
    }
    if close {
        push_header(&mut head, "connection", b"close");
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn push_header(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// Write the head and the body; `Ok(false)` when the client went away first.
async fn send(tcp: &mut TcpStream, head: Vec<u8>, body: Body, framing: Framing, close: bool, timeout: Duration) -> io::Result<bool> {
    write_all(tcp, &mut Bytes::from(head), timeout).await?;
    if framing == Framing::NoBody {
        return Ok(true);
    }
    let mut frames = body.into_data_stream();
    loop {
        let next = tokio::select! {
            next = frames.next() => next,
            () = client_gone(tcp, close) => return Ok(false),
        };
        match next {
            Some(Ok(data)) => write_data(tcp, data, framing, timeout).await?,
            // No terminating chunk: the client sees the response cut off, as with hyper.
            Some(Err(e)) => return Err(io::Error::other(e)),
            None => break,
        }
    }
    if framing == Framing::Chunked {
        write_all(tcp, &mut &b"0\r\n\r\n"[..], timeout).await?;
    }
    Ok(true)
}

/// One body frame, in a single (vectored) write so that with TCP_NODELAY a line is one packet.
async fn write_data(tcp: &mut TcpStream, mut data: Bytes, framing: Framing, timeout: Duration) -> io::Result<()> {
    if data.is_empty() {
        // An empty chunk would end a chunked body.
        return Ok(());
    }
    if framing != Framing::Chunked {
        return write_all(tcp, &mut data, timeout).await;
    }
    let size = format!("{:x}\r\n", data.len());
    let mut frame = size.as_bytes().chain(data).chain(&b"\r\n"[..]);
    write_all(tcp, &mut frame, timeout).await
}

/// Write all of `buf`, failing with `TimedOut` once a write made no progress for `timeout`
/// (the client stopped reading).
async fn write_all<B: Buf>(tcp: &mut TcpStream, buf: &mut B, timeout: Duration) -> io::Result<()> {
    WriteTimeout::new(tcp, timeout).write_all_buf(buf).await
}

/// Resolves when the client has closed its side or the connection broke.
async fn client_gone(tcp: &TcpStream, close: bool) {
    if close {
        closed_discarding(tcp).await
    } else {
        closed_before_sending(tcp).await
    }
}

/// Anything the client sends meanwhile (a pipelined request) is read and dropped: the
/// connection closes after this response.
async fn closed_discarding(tcp: &TcpStream) {
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

/// The connection stays open, so what the client sends meanwhile is the next request: it is
/// left unread, and once some arrives the client is known to be there.
async fn closed_before_sending(tcp: &TcpStream) {
    let mut byte = [0u8; 1];
    match tcp.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}
