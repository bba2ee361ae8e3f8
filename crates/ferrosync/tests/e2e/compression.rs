//! Compressed sync streams (protocol spec §2.2 item 5): the real Node SDK, which asks for gzip,
//! syncs through a recording proxy; raw clients decode zstd on the lean HTTP/1.1 path and gzip
//! on hyper's path (HTTP/1.0), checking every checksum.

use crate::harness::*;
use crate::live::*;
use crate::proxy::FreezableProxy;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_syncs_over_gzip() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 2, 3000, &["u1", "u2"]).await?;
    svc.start().await?;
    let proxy = FreezableProxy::start(svc.port).await?;
    let url = format!("http://127.0.0.1:{}", proxy.port());
    let mut node = node_client(svc.dir.path(), &url, "u1", &svc.cluster.uri("todo"))?;
    node_converges(&mut node, &db, "u1", T).await?;
    // A live change: a small chunk, stored rather than deflated, in the same gzip member.
    db.batch_execute("UPDATE todos SET description = 'live' WHERE id = (SELECT id FROM todos WHERE owner_id = 'u1' LIMIT 1)")
        .await?;
    node_converges(&mut node, &db, "u1", T).await?;
    let status = node.call(json!({"cmd": "status"}))?;
    assert_eq!(status["checksum_failures"], json!(0), "{status}");

    let streams: Vec<_> = proxy
        .exchanges()
        .into_iter()
        .filter(|e| e.up.starts_with(b"POST /sync/stream"))
        .collect();
    if streams.is_empty() {
        bail!("the SDK opened no sync stream through the proxy");
    }
    for stream in &streams {
        let request = String::from_utf8_lossy(&stream.up).to_lowercase();
        let response = String::from_utf8_lossy(&stream.down).to_lowercase();
        assert!(request.contains("accept-encoding: gzip"), "{request}");
        assert!(response.contains("\r\ncontent-encoding: gzip\r\n"), "{response}");
    }
    eprintln!(
        "node client: {} bytes on the wire for 3,002 rows",
        streams.iter().map(|s| s.bytes_down).sum::<u64>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_clients_decode_zstd_and_gzip_on_both_http_paths() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 2, 2000, &["u1"]).await?;
    svc.start().await?;
    let expected = source_todos(&db, "u1").await?;

    // HTTP/1.1 with a length: the lean path.
    let mut response = reqwest::Client::new()
        .post(format!("{}/sync/stream", svc.url()))
        .header("Authorization", format!("Token {}", token("u1")))
        .header("Accept", "application/x-ndjson")
        .header("Accept-Encoding", "gzip, zstd")
        .json(&json!({"buckets": []}))
        .send()
        .await?;
    assert_eq!(response.headers().get("content-encoding").map(|v| v.as_bytes()), Some(&b"zstd"[..]));
    let mut lines = Lines::new(Decoder::Zstd(zstd::stream::write::Decoder::new(Vec::new())?));
    let mut state = ClientState::default();
    while !state.complete {
        let chunk = tokio::time::timeout(T, response.chunk())
            .await?
            .context("read")?
            .context("stream ended")?;
        for line in lines.push(&chunk)? {
            state.apply(&line)?;
        }
    }
    assert_eq!(client_todos(&state), expected, "zstd on the lean path");

    // HTTP/1.0: served by hyper, the body ends with the connection.
    let body = json!({"buckets": []}).to_string();
    let mut tcp = TcpStream::connect(("127.0.0.1", svc.port)).await?;
    let request = format!(
        "POST /sync/stream HTTP/1.0\r\nHost: x\r\nAuthorization: Token {}\r\nContent-Type: application/json\r\n\
         Accept: application/x-ndjson\r\nAccept-Encoding: gzip\r\nContent-Length: {}\r\n\r\n{body}",
        token("u1"),
        body.len()
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut received = Vec::new();
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        received.extend_from_slice(&read_some(&mut tcp).await?);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_lowercase();
    assert!(
        head.starts_with("http/1.0 200") && head.contains("\r\ncontent-encoding: gzip"),
        "{head}"
    );
    let mut lines = Lines::new(Decoder::Gzip(flate2::write::GzDecoder::new(Vec::new())));
    let mut state = ClientState::default();
    let mut bytes = received.split_off(head_end + 4);
    loop {
        for line in lines.push(&bytes)? {
            state.apply(&line)?;
        }
        if state.complete {
            break;
        }
        bytes = read_some(&mut tcp).await?;
    }
    assert_eq!(client_todos(&state), expected, "gzip on hyper's path");
    Ok(())
}

async fn read_some(tcp: &mut TcpStream) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(T, tcp.read(&mut buf)).await??;
    if n == 0 {
        bail!("the stream ended before checkpoint_complete");
    }
    buf.truncate(n);
    Ok(buf)
}

enum Decoder {
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
}

/// NDJSON lines out of a compressed body, as its bytes arrive.
struct Lines {
    decoder: Decoder,
    pending: Vec<u8>,
}

impl Lines {
    fn new(decoder: Decoder) -> Lines {
        Lines {
            decoder,
            pending: Vec::new(),
        }
    }

    /// Every line complete after `bytes`: a chunk decodes in full on arrival.
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<Value>> {
        let out = match &mut self.decoder {
            Decoder::Zstd(d) => {
                d.write_all(bytes)?;
                d.flush()?;
                d.get_mut()
            }
            Decoder::Gzip(d) => {
                d.write_all(bytes)?;
                d.flush()?;
                d.get_mut()
            }
        };
        self.pending.append(out);
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            lines.push(serde_json::from_slice(&line)?);
        }
        Ok(lines)
    }
}
