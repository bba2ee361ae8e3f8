//! A light sync-protocol client: JWTs, `POST /sync/stream` (or the WebSocket transport in
//! [`crate::ws`]), framing and line parsing.
//!
//! The client must never be the bottleneck of a download measurement, so it does not build
//! generic JSON/BSON values: NDJSON lines are parsed into small borrowed structs that count the
//! ops of a `data` line without materialising them, and BSON lines are read in place with
//! `bson::RawDocument`. Marker detection (latency, fan-out) is a byte search in the raw line,
//! which works for both encodings because row data is plain text in both.

use crate::encoding::{BodyDecoder, Compression};
use crate::ws;
use anyhow::{Context, Result};
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::json;
use std::borrow::Cow;
use std::time::Duration;

/// How long to wait for the response headers of `POST /sync/stream`.
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest BSON line we accept; a bigger length prefix means the framing is broken.
pub const MAX_BSON_LINE: usize = 256 << 20;

/// Response encoding of a sync stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Bson,
}

impl Format {
    pub fn accept(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Bson => "application/vnd.powersync.bson-stream",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Ndjson => "NDJSON",
            Format::Bson => "BSON",
        }
    }
}

/// How a sync stream is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `POST /sync/stream`, asking for this encoding.
    Http(Format),
    /// RSocket over WebSocket, as the JS SDKs use it: always BSON lines.
    WebSocket,
}

impl Transport {
    pub const NDJSON: Transport = Transport::Http(Format::Ndjson);

    pub fn name(self) -> &'static str {
        match self {
            Transport::Http(Format::Ndjson) => "HTTP NDJSON",
            Transport::Http(Format::Bson) => "HTTP BSON",
            Transport::WebSocket => "WebSocket",
        }
    }
}

/// How the bench signs client tokens (HS256 with a shared secret).
#[derive(Debug, Clone)]
pub struct Auth {
    pub secret: String,
    pub kid: String,
    pub audience: String,
}

impl Auth {
    /// A one-hour token for `sub` (long enough for every phase, within the 1-day limit).
    pub fn token(&self, sub: &str) -> Result<String> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        let claims = json!({"sub": sub, "aud": self.audience, "iat": now, "exp": now + 3600});
        let key = jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes());
        jsonwebtoken::encode(&header, &claims, &key).context("signing JWT")
    }
}

/// A bucket position sent in the request (`{"name", "after"}`).
#[derive(Debug, Clone)]
pub struct BucketAfter {
    pub name: String,
    pub after: String,
}

/// Everything needed to open streams against one service.
#[derive(Clone)]
pub struct Endpoint {
    pub http: reqwest::Client,
    pub url: String,
    pub auth: Auth,
    /// What HTTP streams ask for in `Accept-Encoding` (nothing by default).
    pub compression: Compression,
}

impl Endpoint {
    pub fn new(url: &str, auth: Auth) -> Result<Endpoint> {
        Ok(Endpoint {
            http: http_client()?,
            url: url.trim_end_matches('/').to_string(),
            auth,
            compression: Compression::Identity,
        })
    }

    /// Build (but do not send) a sync stream request.
    pub fn request(&self, user: &str, format: Format, buckets: &[BucketAfter]) -> Result<reqwest::RequestBuilder> {
        let request = self
            .http
            .post(format!("{}/sync/stream", self.url))
            .header("Authorization", format!("Token {}", self.auth.token(user)?))
            .header("Accept", format.accept())
            .json(&request_body(user, buckets));
        Ok(match self.compression.accept_encoding() {
            Some(encoding) => request.header("Accept-Encoding", encoding),
            None => request,
        })
    }

    /// Open a stream and check the status, waiting at most [`HEADER_TIMEOUT`] for the answer.
    pub async fn open(&self, user: &str, transport: Transport, buckets: &[BucketAfter]) -> Result<SyncStream> {
        self.open_within(user, transport, buckets, HEADER_TIMEOUT).await
    }

    /// Open a stream, waiting at most `limit` for the response headers (HTTP) or for the
    /// WebSocket upgrade, SETUP and REQUEST_STREAM to go out.
    pub async fn open_within(&self, user: &str, transport: Transport, buckets: &[BucketAfter], limit: Duration) -> Result<SyncStream> {
        let format = match transport {
            Transport::Http(format) => format,
            Transport::WebSocket => {
                let body = serde_json::to_vec(&request_body(user, buckets))?;
                let token = self.auth.token(user)?;
                let open = ws::open(&self.url, &token, &body);
                let ws = tokio::time::timeout(limit, open)
                    .await
                    .with_context(|| format!("WebSocket sync stream not open within {} s", limit.as_secs()))??;
                return Ok(SyncStream::websocket(ws));
            }
        };
        let send = self.request(user, format, buckets)?.send();
        let resp = tokio::time::timeout(limit, send)
            .await
            .with_context(|| format!("no response to POST /sync/stream within {} s", limit.as_secs()))?
            .context("POST /sync/stream")?;
        SyncStream::from_response(resp).await
    }
}

/// The sync request, the same on both transports.
fn request_body(user: &str, buckets: &[BucketAfter]) -> serde_json::Value {
    let buckets: Vec<_> = buckets.iter().map(|b| json!({"name": b.name, "after": b.after})).collect();
    json!({
        "buckets": buckets,
        "include_checksum": true,
        "raw_data": true,
        "client_id": format!("bench-{user}"),
        "parameters": {},
    })
}

/// One HTTP/1.1 client; connections are never shared between streams, so each held stream is
/// one TCP connection as with a real SDK.
pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building HTTP client")
}

/// Splits a byte stream into protocol lines, keeping only the unfinished tail between chunks.
pub struct Framer {
    format: Format,
    buf: Vec<u8>,
    start: usize,
    /// NDJSON: bytes before this offset are known to hold no '\n' (avoids rescanning long lines).
    scanned: usize,
}

impl Framer {
    pub fn new(format: Format) -> Framer {
        Framer {
            format,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            // Drop consumed lines once per refill, so the unfinished tail is copied at most once
            // per line boundary rather than once per chunk.
            self.buf.drain(..self.start);
            // Only NDJSON tracks `scanned`; BSON frames leave it at 0.
            self.scanned = self.scanned.saturating_sub(self.start);
            self.start = 0;
        }
        if self.buf.is_empty() && self.buf.capacity() > (1 << 20) {
            // Fan-out holds thousands of streams: don't keep a download-sized buffer around.
            self.buf = Vec::new();
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line, if buffered.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>> {
        match self.format {
            Format::Ndjson => Ok(self.next_ndjson()),
            Format::Bson => self.next_bson(),
        }
    }

    fn next_ndjson(&mut self) -> Option<&[u8]> {
        loop {
            let from = self.scanned.max(self.start);
            let Some(rel) = memchr::memchr(b'\n', &self.buf[from..]) else {
                self.scanned = self.buf.len();
                return None;
            };
            let (start, end) = (self.start, from + rel);
            self.start = end + 1;
            self.scanned = self.start;
            // Clients skip empty lines (protocol 2.2).
            if end > start {
                return Some(&self.buf[start..end]);
            }
        }
    }

    fn next_bson(&mut self) -> Result<Option<&[u8]>> {
        let avail = &self.buf[self.start..];
        let Some(prefix) = avail.get(..4) else {
            return Ok(None);
        };
        let len = i32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let len = usize::try_from(len).ok().filter(|&l| (5..=MAX_BSON_LINE).contains(&l));
        let len = len.with_context(|| format!("bad BSON length prefix {prefix:?}"))?;
        if avail.len() < len {
            return Ok(None);
        }
        let start = self.start;
        self.start += len;
        Ok(Some(&self.buf[start..start + len]))
    }
}

/// What a protocol line means to the bench.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Checkpoint { last_op_id: String, buckets: Vec<String> },
    CheckpointDiff,
    Data { bucket: String, next_after: String, ops: usize },
    PartialComplete,
    Complete,
    TokenExpiresIn(i64),
    Other,
}

/// Counts the elements of a JSON array without building them.
struct OpCount(usize);

impl<'de> Deserialize<'de> for OpCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = OpCount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of ops")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OpCount, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(OpCount(n))
            }
        }
        d.deserialize_seq(CountVisitor)
    }
}

#[derive(Deserialize)]
struct JsonLine<'a> {
    #[serde(borrow)]
    checkpoint: Option<JsonCheckpoint<'a>>,
    checkpoint_diff: Option<IgnoredAny>,
    #[serde(borrow)]
    data: Option<JsonData<'a>>,
    partial_checkpoint_complete: Option<IgnoredAny>,
    checkpoint_complete: Option<IgnoredAny>,
    token_expires_in: Option<i64>,
}

#[derive(Deserialize)]
struct JsonCheckpoint<'a> {
    #[serde(borrow)]
    last_op_id: Cow<'a, str>,
    #[serde(borrow)]
    buckets: Vec<JsonBucket<'a>>,
}

#[derive(Deserialize)]
struct JsonBucket<'a> {
    // Cow: bucket names such as `user_todos["u1"]` contain escaped quotes in JSON.
    #[serde(borrow)]
    bucket: Cow<'a, str>,
}

#[derive(Deserialize)]
struct JsonData<'a> {
    #[serde(borrow)]
    bucket: Cow<'a, str>,
    #[serde(borrow)]
    next_after: Cow<'a, str>,
    data: OpCount,
}

/// Parse one NDJSON line.
pub fn parse_ndjson(line: &[u8]) -> Result<Event> {
    let l: JsonLine = serde_json::from_slice(line).with_context(|| format!("bad NDJSON line: {}", preview(line)))?;
    Ok(if let Some(c) = l.checkpoint {
        Event::Checkpoint {
            last_op_id: c.last_op_id.into_owned(),
            buckets: c.buckets.into_iter().map(|b| b.bucket.into_owned()).collect(),
        }
    } else if let Some(d) = l.data {
        Event::Data {
            bucket: d.bucket.into_owned(),
            next_after: d.next_after.into_owned(),
            ops: d.data.0,
        }
    } else if l.checkpoint_complete.is_some() {
        Event::Complete
    } else if l.checkpoint_diff.is_some() {
        Event::CheckpointDiff
    } else if l.partial_checkpoint_complete.is_some() {
        Event::PartialComplete
    } else if let Some(t) = l.token_expires_in {
        Event::TokenExpiresIn(t)
    } else {
        Event::Other
    })
}

/// Parse one BSON line (a complete document including its length prefix).
pub fn parse_bson(line: &[u8]) -> Result<Event> {
    let doc = bson::RawDocument::from_bytes(line).context("bad BSON line")?;
    let Some(first) = doc.iter().next() else {
        return Ok(Event::Other);
    };
    let (key, value) = first.context("bad BSON element")?;
    let inner = || {
        value
            .as_document()
            .with_context(|| format!("BSON {} is not a document", key.as_str()))
    };
    Ok(match key.as_str() {
        "checkpoint" => {
            let c = inner()?;
            let mut buckets = Vec::new();
            for b in c.get_array("buckets").context("checkpoint.buckets")? {
                let b = b.context("checkpoint bucket")?.as_document().context("bucket is not a document")?;
                buckets.push(b.get_str("bucket").context("bucket name")?.to_string());
            }
            Event::Checkpoint {
                last_op_id: c.get_str("last_op_id").context("checkpoint.last_op_id")?.to_string(),
                buckets,
            }
        }
        "data" => {
            let d = inner()?;
            let ops = d.get_array("data").context("data.data")?.iter_elements().count();
            Event::Data {
                bucket: d.get_str("bucket").context("data.bucket")?.to_string(),
                next_after: d.get_str("next_after").context("data.next_after")?.to_string(),
                ops,
            }
        }
        "checkpoint_complete" => Event::Complete,
        "checkpoint_diff" => Event::CheckpointDiff,
        "partial_checkpoint_complete" => Event::PartialComplete,
        "token_expires_in" => Event::TokenExpiresIn(value.as_i64().or(value.as_i32().map(i64::from)).unwrap_or(0)),
        _ => Event::Other,
    })
}

fn preview(line: &[u8]) -> String {
    let cut = &line[..line.len().min(200)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Parse a line in the given encoding.
pub fn parse(format: Format, line: &[u8]) -> Result<Event> {
    match format {
        Format::Ndjson => parse_ndjson(line),
        Format::Bson => parse_bson(line),
    }
}

/// An open sync stream being read line by line.
pub struct SyncStream {
    body: Body,
    format: Format,
}

enum Body {
    Http {
        resp: reqwest::Response,
        framer: Framer,
        /// Set when the body has a `Content-Encoding` (boxed: decoder state is large).
        decoder: Option<Box<BodyDecoder>>,
        /// Body bytes received so far (after HTTP framing, before decoding).
        bytes: u64,
        /// The same after decoding.
        decoded: u64,
    },
    /// Boxed: the WebSocket state is several times the size of an HTTP response.
    WebSocket(Box<ws::WsStream>),
}

impl SyncStream {
    /// Wrap a response; the encoding is taken from its Content-Type, not from what was asked.
    pub async fn from_response(resp: reqwest::Response) -> Result<SyncStream> {
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(HttpStatus {
                status: status.as_u16(),
                body: body.chars().take(300).collect(),
            }
            .into());
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let format = if content_type.starts_with(Format::Bson.accept()) {
            Format::Bson
        } else {
            Format::Ndjson
        };
        let encoding = resp.headers().get(reqwest::header::CONTENT_ENCODING);
        let decoder = BodyDecoder::for_content_encoding(encoding.and_then(|v| v.to_str().ok()))?.map(Box::new);
        Ok(SyncStream {
            body: Body::Http {
                resp,
                framer: Framer::new(format),
                decoder,
                bytes: 0,
                decoded: 0,
            },
            format,
        })
    }

    fn websocket(ws: ws::WsStream) -> SyncStream {
        SyncStream {
            body: Body::WebSocket(Box::new(ws)),
            format: Format::Bson,
        }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes received so far after transport framing (HTTP chunking, WebSocket frames), before
    /// any content decoding.
    pub fn body_bytes(&self) -> u64 {
        match &self.body {
            Body::Http { bytes, .. } => *bytes,
            Body::WebSocket(ws) => ws.frame_bytes,
        }
    }

    /// [`SyncStream::body_bytes`] after content decoding.
    pub fn decoded_bytes(&self) -> u64 {
        match &self.body {
            Body::Http { decoded, .. } => *decoded,
            Body::WebSocket(ws) => ws.frame_bytes,
        }
    }

    /// Whether the body arrives compressed.
    pub fn compressed(&self) -> bool {
        matches!(&self.body, Body::Http { decoder: Some(_), .. })
    }

    /// Apply `f` to the next line; `Ok(None)` when the server ended the stream. `stall` bounds
    /// the wait for each chunk or message (None = wait forever, for idle held streams).
    pub async fn next_with<T>(&mut self, stall: Option<Duration>, f: impl FnOnce(Format, &[u8]) -> Result<T>) -> Result<Option<T>> {
        let format = self.format;
        let (resp, framer, decoder, bytes, decoded) = match &mut self.body {
            Body::Http {
                resp,
                framer,
                decoder,
                bytes,
                decoded,
            } => (resp, framer, decoder, bytes, decoded),
            Body::WebSocket(ws) => return ws.next_line(stall).await?.map(|line| f(format, line)).transpose(),
        };
        loop {
            if let Some(frame) = framer.next_frame()? {
                return f(format, frame).map(Some);
            }
            let chunk = match stall {
                Some(limit) => tokio::time::timeout(limit, resp.chunk())
                    .await
                    .with_context(|| format!("no data from the service for {} s", limit.as_secs()))?,
                None => resp.chunk().await,
            };
            let Some(chunk) = chunk.context("reading sync stream")? else {
                return Ok(None);
            };
            *bytes += chunk.len() as u64;
            match decoder {
                Some(decoder) => {
                    let plain = decoder.decode(&chunk)?;
                    *decoded += plain.len() as u64;
                    framer.push(&plain);
                }
                None => {
                    *decoded += chunk.len() as u64;
                    framer.push(&chunk);
                }
            }
        }
    }

    /// The next event; a closed stream is an error.
    pub async fn next_event(&mut self, stall: Option<Duration>) -> Result<Event> {
        self.next_with(stall, parse).await?.context("sync stream ended")
    }

    /// The next event and whether its raw line contains `marker`.
    pub async fn next_marked(&mut self, stall: Option<Duration>, marker: &[u8]) -> Result<(Event, bool)> {
        let parsed = self
            .next_with(stall, |format, line| {
                Ok((parse(format, line)?, memchr::memmem::find(line, marker).is_some()))
            })
            .await?;
        parsed.context("sync stream ended")
    }

    /// Read until `checkpoint_complete`, summarising what arrived.
    pub async fn until_complete(&mut self, stall: Option<Duration>) -> Result<SyncSummary> {
        let mut sync = SyncSummary::default();
        loop {
            match self.next_event(stall).await? {
                Event::Checkpoint { last_op_id, buckets } => {
                    sync.last_op_id = last_op_id;
                    sync.buckets = buckets;
                }
                Event::Data { bucket, next_after, ops } => sync.add_data(bucket, next_after, ops),
                Event::Complete => return Ok(sync),
                _ => {}
            }
        }
    }
}

/// Summary of one (initial) sync up to `checkpoint_complete`.
#[derive(Debug, Default, Clone)]
pub struct SyncSummary {
    pub last_op_id: String,
    /// Bucket names from the `checkpoint` line.
    pub buckets: Vec<String>,
    /// Buckets that sent data, with the last `next_after` and the number of ops.
    pub received: Vec<(String, String, usize)>,
}

impl SyncSummary {
    fn add_data(&mut self, bucket: String, next_after: String, ops: usize) {
        match self.received.iter_mut().find(|(b, _, _)| *b == bucket) {
            Some(entry) => {
                entry.1 = next_after;
                entry.2 += ops;
            }
            None => self.received.push((bucket, next_after, ops)),
        }
    }

    pub fn ops(&self) -> usize {
        self.received.iter().map(|r| r.2).sum()
    }

    /// Positions of every bucket that had data, for a later reconnect.
    pub fn positions(&self) -> Vec<BucketAfter> {
        self.received
            .iter()
            .map(|(name, after, _)| BucketAfter {
                name: name.clone(),
                after: after.clone(),
            })
            .collect()
    }
}

/// A non-2xx answer to `POST /sync/stream`.
#[derive(Debug)]
pub struct HttpStatus {
    pub status: u16,
    pub body: String,
}

impl std::fmt::Display for HttpStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sync stream failed: HTTP {}: {}", self.status, self.body)
    }
}

impl std::error::Error for HttpStatus {}

/// Whether an open failure is expected while the service is still starting: nothing listening
/// yet, or a 5xx/429 answer (e.g. "no active sync config" before the first checkpoint).
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_connect)
            || c.downcast_ref::<HttpStatus>().is_some_and(|h| h.status >= 500 || h.status == 429)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_data_line_counts_ops() {
        let line = br#"{"data":{"bucket":"user_todos[\"u1\"]","after":"0","next_after":"3","has_more":false,"data":[{"op_id":"2","data":"{\"a\":1}"},{"op_id":"3"}]}}"#;
        let ev = parse_ndjson(line).expect("valid line");
        assert_eq!(
            ev,
            Event::Data {
                bucket: "user_todos[\"u1\"]".into(),
                next_after: "3".into(),
                ops: 2
            }
        );
    }

    #[test]
    fn ndjson_framing_across_chunks() {
        let mut f = Framer::new(Format::Ndjson);
        f.push(b"{\"checkpoint_complete\":{\"last_op_id\":\"1\"}}\n\n{\"token_ex");
        let first = f.next_frame().expect("ok").map(<[u8]>::to_vec);
        assert_eq!(parse_ndjson(&first.expect("a line")).expect("parse"), Event::Complete);
        assert!(f.next_frame().expect("ok").is_none());
        f.push(b"pires_in\":5}\n");
        let second = f.next_frame().expect("ok").map(<[u8]>::to_vec);
        assert_eq!(parse_ndjson(&second.expect("a line")).expect("parse"), Event::TokenExpiresIn(5));
    }

    #[test]
    fn bson_framing_and_parsing() {
        let doc = bson::doc! {"data": {"bucket": "global[]", "after": "0", "next_after": "7", "data": [{"op_id": "7"}, {"op_id": "8"}]}};
        let mut bytes = doc.to_vec().expect("encode");
        bytes.extend(bson::doc! {"checkpoint_complete": {"last_op_id": "8"}}.to_vec().expect("encode"));
        let mut f = Framer::new(Format::Bson);
        f.push(&bytes[..10]);
        assert!(f.next_frame().expect("ok").is_none());
        f.push(&bytes[10..]);
        let first = f.next_frame().expect("ok").map(<[u8]>::to_vec).expect("a line");
        let expected = Event::Data {
            bucket: "global[]".into(),
            next_after: "7".into(),
            ops: 2,
        };
        assert_eq!(parse_bson(&first).expect("parse"), expected);
        let second = f.next_frame().expect("ok").map(<[u8]>::to_vec).expect("a line");
        assert_eq!(parse_bson(&second).expect("parse"), Event::Complete);
    }
}
