//! The service's limits over HTTP (and the bucket limit over WebSocket): concurrent streams (429 `PSYNC_S2304`), buckets per
//! connection (500 `PSYNC_S2305`), request body sizes (413), oversized headers (401
//! `PSYNC_S2106`, or hyper's 431 beyond what it reads), and a stream ending at token expiry.

use crate::harness::*;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every list in the global bucket, and a bucket per list its owner holds: the seeded owner of
/// three lists has four buckets, any other user one.
const RULES: &str = "
bucket_definitions:
  global:
    data:
      - SELECT * FROM lists
  by_list:
    parameters: SELECT id AS list_id FROM lists WHERE owner_id = request.user_id()
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
";

/// Status and body of a sync stream request; the body is read only for errors (a stream would
/// not end).
async fn open(url: &str, authorization: &str, body: String) -> Result<(u16, Option<reqwest::Response>, Value)> {
    let resp = reqwest::Client::new()
        .post(format!("{url}/sync/stream"))
        .header("Authorization", authorization)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    if status == 200 {
        return Ok((status, Some(resp), Value::Null));
    }
    Ok((status, None, resp.json().await?))
}

fn error_of(body: &Value) -> (Option<&str>, Option<i64>) {
    (body["error"]["code"].as_str(), body["error"]["status"].as_i64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_bucket_limits() -> Result<()> {
    let mut svc = Service::with_app(SCHEMA, RULES).await?;
    svc.api_parameters(&["max_concurrent_connections: 2", "max_buckets_per_connection: 3"])?;
    let db = svc.source().await?;
    seed(&db, 3, 2, &["u1"]).await?;
    svc.start().await?;
    let url = svc.url();
    let (u1, u2) = (format!("Token {}", token("u1")), format!("Token {}", token("u2")));
    let body = json!({"buckets": []}).to_string();

    // A first complete checkpoint: the service serves a sync config from here on.
    let mut first = RawStream::open(&url, &token("u2"), json!({"buckets": []})).await?;
    first
        .sync_until(&mut ClientState::default(), T, |s| s.table("lists").len() == 3)
        .await
        .with_context(|| svc.log())?;

    // Two streams are held; a third is refused until one ends.
    let (status, second, _) = open(&url, &u2, body.clone()).await?;
    assert_eq!(status, 200);
    let (status, _, refused) = open(&url, &u2, body.clone()).await?;
    assert_eq!(error_of(&refused), (Some("PSYNC_S2304"), Some(429)), "{refused}");
    assert_eq!(status, 429);
    drop(first);
    let mut third = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while third.is_none() {
        let (status, stream, body) = open(&url, &u2, body.clone()).await?;
        match status {
            200 => third = stream,
            429 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => anyhow::bail!("a stream ended, yet a new one got {status}: {body}"),
        }
    }
    drop(second);

    // Over the bucket limit: refused before the stream starts, naming where the buckets come
    // from; the refused request holds no connection slot.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let (status, _, body) = open(&url, &u1, body.clone()).await?;
        if status != 429 || Instant::now() > deadline {
            assert_eq!(status, 500, "{body}");
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(error_of(&refused), (Some("PSYNC_S2305"), Some(500)), "{refused}");
    assert_eq!(
        refused["error"]["description"], "Too many buckets: 4 (limit of 3); by definition: by_list: 3, global: 1",
        "{refused}"
    );
    let (status, _, _) = open(&url, &u2, body.clone()).await?;
    assert_eq!(status, 200, "the refused request gave its slot back");

    // Over WebSocket the same refusal is an ERROR frame on the stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut ws = crate::ws_client::WsClient::sync(&url, &token("u1"), 10, json!({"buckets": []})).await?;
        let frame = ws.next_frame(T).await?.context("closed without a frame")?;
        let (code, message) = frame.error().with_context(|| format!("not an ERROR: {frame:?}"))?;
        if message.starts_with("[PSYNC_S2304]") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!((frame.stream_id, code), (1, 0x201), "{message}");
        assert_eq!(
            message,
            "[PSYNC_S2305] Too many buckets: 4 (limit of 3); by definition: by_list: 3, global: 1"
        );
        break;
    }
    drop(third);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_size_limits() -> Result<()> {
    let mut svc = Service::new().await?;
    svc.start().await?;
    let url = svc.url();
    let auth = format!("Token {}", token("u1"));

    // Ten thousand buckets (~600 KB) are a valid request; past 1 MiB it is refused.
    let buckets = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"name": format!("user_todos[\"someone-{i:08}\"]"), "after": "0"}))
            .collect()
    };
    let (status, stream, body) = open(&url, &auth, json!({"buckets": buckets(10_000)}).to_string()).await?;
    assert_eq!(status, 200, "{body}");
    drop(stream);
    let large = json!({"buckets": buckets(20_000)}).to_string();
    assert!(large.len() > 1 << 20);
    let (status, _, body) = open(&url, &auth, large).await?;
    assert_eq!((status, error_of(&body)), (413, (Some("PSYNC_S2001"), Some(413))), "{body}");
    assert_eq!(body["error"]["description"], "Request body too large (limit 1048576 bytes)");

    // Authorization values: a long one is still read (and this one is no JWT); past 32 KiB it
    // is refused unread, on the lean path's size and beyond it alike.
    for (len, code) in [(12 << 10, "PSYNC_S2101"), (24 << 10, "PSYNC_S2101"), (40 << 10, "PSYNC_S2106")] {
        let authorization = format!("Token {}", "a".repeat(len));
        let (status, _, body) = open(&url, &authorization, "{}".into()).await?;
        assert_eq!((status, error_of(&body).0), (401, Some(code)), "{len}: {body}");
        let resp = reqwest::Client::new()
            .get(format!("{url}/write-checkpoint2.json?client_id=c"))
            .header("Authorization", &authorization)
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), 401, "{len}");
        let body: Value = resp.json().await?;
        assert_eq!(error_of(&body).0, Some(code), "{len}: {body}");
    }

    // A head beyond what hyper reads (1 MiB): it answers 431 or just closes; the service lives on.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", svc.port)).await?;
    let head = format!(
        "POST /sync/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\nContent-Length: 2\r\n\r\n{{}}",
        "a".repeat(1 << 20)
    );
    // The server may stop reading (and close) before all of it is sent.
    let _ = tcp.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(svc.alive(), "{}", svc.log());
    let live = reqwest::get(format!("{url}/probes/liveness")).await?;
    assert_eq!(live.status().as_u16(), 200);
    Ok(())
}

/// Every line of a stream until it ends (NDJSON).
async fn lines_until_end(resp: reqwest::Response, timeout: Duration) -> Result<Vec<Value>> {
    let body = tokio::time::timeout(timeout, resp.bytes())
        .await
        .context("the stream did not end")??;
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| Ok(serde_json::from_slice(l)?))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_stream_ends_at_token_expiry() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 1, 1, &["u1"]).await?;
    svc.start().await?;
    let url = svc.url();
    let body = json!({"buckets": []}).to_string();
    let t = now();
    let short = |exp: u64| token_with(json!({"sub": "u1", "aud": "test-aud", "iat": t - 10, "exp": exp}), "k1", SECRET);

    // A token that expires in 3 s: the checkpoint, a `token_expires_in` warning at once (less
    // than 20 s are left; it may come before the checkpoint), and `0` as the last line.
    let started = Instant::now();
    let (status, resp, error) = open(&url, &format!("Token {}", short(t + 3)), body.clone()).await?;
    assert_eq!(status, 200, "{error}");
    let lines = lines_until_end(resp.context("stream")?, T).await?;
    let elapsed = started.elapsed();
    assert!(lines.iter().any(|l| l.get("checkpoint").is_some()), "{lines:?}");
    assert!(lines.iter().any(|l| l.get("checkpoint_complete").is_some()), "{lines:?}");
    let expiry: Vec<i64> = lines.iter().filter_map(|l| l["token_expires_in"].as_i64()).collect();
    assert_eq!(expiry.last(), Some(&0), "{lines:?}");
    assert!(expiry.len() >= 2 && expiry[0] > 0, "{lines:?}");
    assert_eq!(lines.last(), Some(&json!({"token_expires_in": 0})), "{lines:?}");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(10),
        "ended after {elapsed:?}"
    );

    // Expired a moment ago, within the clock tolerance: accepted, and ended at once.
    let (status, resp, error) = open(&url, &format!("Token {}", short(t - 5)), body).await?;
    assert_eq!(status, 200, "{error}");
    let lines = lines_until_end(resp.context("stream")?, Duration::from_secs(10)).await?;
    assert_eq!(lines, [json!({"token_expires_in": 0})]);
    Ok(())
}
