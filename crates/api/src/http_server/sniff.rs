//! Reading a request head off a connection and deciding who serves it: the lean HTTP/1.1 path
//! ([`super::lean_http1`]) or hyper.
//!
//! The lean path takes only the plain case: `GET`, `POST` or `OPTIONS` on an origin-form path,
//! HTTP/1.1, a `Content-Length` body (or none), no `Transfer-Encoding`, `Expect` or `Upgrade`, a
//! head within [`MAX_HEAD`] and a body within [`MAX_BODY`]. Anything else, malformed heads,
//! `HEAD`, HTTP/1.0, h2 and WebSocket upgrades included, is handed to hyper unchanged, which
//! answers it as before.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, Version};
use std::io;
use tokio::net::TcpStream;

/// Methods the lean path takes, each with the space that ends it. `HEAD` is left to hyper,
/// which knows how to answer it without a body but with the length a `GET` would have.
const METHODS: [&[u8]; 3] = [b"GET ", b"POST ", b"OPTIONS "];
/// Longest request head taken; a longer one goes to hyper (which limits it in its own way).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body taken (a client with many buckets states each one's position).
const MAX_BODY: usize = 256 * 1024;
/// Most request headers taken.
const MAX_HEADERS: usize = 64;

/// What the next bytes of a connection turned out to be.
pub enum Sniffed {
    /// A complete request for the lean path, and the bytes read past it (a pipelined request).
    Lean { request: Box<Request>, rest: Vec<u8> },
    /// Anything else, with the bytes read so far.
    Other(Vec<u8>),
}

/// Outcome of looking at the bytes read so far.
enum Step {
    /// Read more.
    Need,
    Other,
    /// A request for the lean path, and how many bytes it took.
    Lean(Box<Request>, usize),
}

/// Read from the connection, after the bytes already read (`buf`), until it is clear whether the
/// next request is one the lean path takes. `Err` when the client went away (or closed its side)
/// before sending anything.
pub async fn sniff(tcp: &TcpStream, mut buf: Vec<u8>) -> io::Result<Sniffed> {
    loop {
        if !buf.is_empty() {
            match classify(&buf) {
                Step::Need => {}
                Step::Other => return Ok(Sniffed::Other(buf)),
                Step::Lean(request, used) => {
                    // Usually empty, which allocates nothing: an idle connection holds no buffer.
                    let rest = buf[used..].to_vec();
                    return Ok(Sniffed::Lean { request, rest });
                }
            }
        }
        tcp.readable().await?;
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(2048);
        }
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
    }
}

fn classify(buf: &[u8]) -> Step {
    let could_be = |method: &&[u8]| {
        let n = buf.len().min(method.len());
        buf[..n] == method[..n]
    };
    if !METHODS.iter().any(could_be) {
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
    let end = head_len + body_len;
    if buf.len() < end {
        return Step::Need;
    }
    match to_request(&head, &buf[head_len..end]) {
        Some(request) => Step::Lean(Box::new(request), end),
        None => Step::Other,
    }
}

/// The body length of a request this path takes; `None` for anything it leaves to hyper.
fn plain_body_len(head: &httparse::Request<'_, '_>) -> Option<usize> {
    if head.version != Some(1) || !head.path?.starts_with('/') {
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
    let method = Method::from_bytes(head.method?.as_bytes()).ok()?;
    let mut builder = Request::builder().method(method).uri(head.path?).version(Version::HTTP_11);
    for h in head.headers.iter() {
        builder = builder.header(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    builder.body(Body::from(Bytes::copy_from_slice(body))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(buf: &str) -> &'static str {
        match classify(buf.as_bytes()) {
            Step::Need => "need",
            Step::Other => "other",
            Step::Lean(_, used) if used == buf.len() => "lean",
            Step::Lean(..) => "lean+rest",
        }
    }

    #[test]
    fn plain_requests_take_the_lean_path() {
        assert_eq!(step("GET /write-checkpoint2.json?client_id=c HTTP/1.1\r\nHost: x\r\n\r\n"), "lean");
        assert_eq!(step("OPTIONS /sync/stream HTTP/1.1\r\nHost: x\r\nOrigin: o\r\n\r\n"), "lean");
        assert_eq!(step("POST /sync/stream HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"), "lean");
        assert_eq!(
            step("POST /sync/stream HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n"),
            "lean+rest"
        );
    }

    #[test]
    fn partial_requests_wait_for_more() {
        assert_eq!(step("P"), "need");
        assert_eq!(step("OPTIONS /x HTTP/1.1\r\nHost:"), "need");
        assert_eq!(step("POST /sync/stream HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"), "need");
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        for other in [
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "HEAD /probes/liveness HTTP/1.1\r\nHost: x\r\n\r\n",
            "PUT /x HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /sync/stream HTTP/1.0\r\n\r\n",
            "GET http://x/sync/stream HTTP/1.1\r\nHost: x\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /sync/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "POST /sync/stream HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /sync/stream HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            "POST /sync/stream HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            "POST /sync/stream HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
            "POST /sync/stream HTTP/1.1\r\nContent-Length: 262145\r\n\r\n",
            "POST /sync/stream HTTP/1.1\r\nno colon here\r\n\r\n",
        ] {
            assert_eq!(step(other), "other", "{other:?}");
        }
    }
}
