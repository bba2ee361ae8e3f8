//! The WebSocket transport with a raw RSocket client: flow control, keepalives, BSON setup,
//! cancel, and a client that stops requesting while a large download waits for it.

use crate::harness::*;
use crate::ws_client::*;
use anyhow::{Context, Result};
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
/// Long enough for the server to have sent anything it was going to.
const QUIET: Duration = Duration::from_millis(700);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_flow_control_keepalive_live_and_cancel() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 2, 2500, &["u1", "u2"]).await?;
    svc.start().await?;
    let mut client = WsClient::sync(&svc.url(), &token("u1"), 2, json!({"buckets": []})).await?;
    // Exactly the two lines the client has credit for, however much is waiting.
    let mut state = ClientState::default();
    for _ in 0..2 {
        state.apply(&client.next_line(T).await.with_context(|| svc.log())?)?;
    }
    assert!(client.next_frame(QUIET).await.is_err(), "a frame arrived without credit");

    // Keepalives are answered without credit, with the client's data.
    client.send(keepalive_frame(b"ping-data")).await?;
    let answer = client.next_frame(T).await?.context("closed")?;
    assert_eq!(
        (answer.stream_id, answer.frame_type, answer.flags & FLAG_RESPOND),
        (0, KEEPALIVE, 0)
    );
    assert_eq!(&answer.body[8..], b"ping-data");

    // With credit the download completes and matches the source.
    client.send(request_n_frame(1, 1)).await?;
    client.sync_until(&mut state, T, |_| true).await?;
    assert_eq!(client_todos(&state), source_todos(&db, "u1").await?);

    // Live changes arrive as new checkpoints.
    db.batch_execute("UPDATE todos SET description = 'over websocket' WHERE id = (SELECT id FROM todos WHERE owner_id = 'u1' LIMIT 1)")
        .await?;
    client
        .sync_until(&mut state, T, |s| client_todos(s).values().any(|d| d == "over websocket"))
        .await?;
    assert_eq!(client_todos(&state), source_todos(&db, "u1").await?);

    // CANCEL ends the stream and the server closes the connection.
    client.send(frame(1, CANCEL, 0, &[])).await?;
    loop {
        match client.next_frame(T).await? {
            None => break,
            Some(f) if f.frame_type == PAYLOAD => continue, // lines already on their way
            Some(f) => anyhow::bail!("unexpected frame after cancel: {f:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_accepts_bson_setup_and_request() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 1, 5, &["u1"]).await?;
    svc.start().await?;
    let mut client = WsClient::connect(&svc.url(), "/any/path").await?;
    let metadata = bson::serialize_to_vec(&bson::doc! {"token": format!("Bearer {}", token("u1"))})?;
    client.send(setup_frame("application/bson", &metadata)).await?;
    let path = bson::serialize_to_vec(&bson::doc! {"path": "/sync/stream"})?;
    let body = bson::serialize_to_vec(&bson::doc! {"buckets": [], "client_id": "bson-client"})?;
    client.send(request_stream_frame(1, 1000, &path, &body)).await?;
    let mut state = ClientState::default();
    client.sync_until(&mut state, T, |_| true).await.with_context(|| svc.log())?;
    assert_eq!(client_todos(&state), source_todos(&db, "u1").await?);
    Ok(())
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    line.split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()
        .context("VmRSS number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_websocket_client_keeps_memory_bounded() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 1, 1, &["slow", "other"]).await?;
    // 100 MB for the slow client: 100,000 todos of 1 KB each.
    db.batch_execute(
        "INSERT INTO todos (description, owner_id, list_id)
         SELECT repeat(md5(g::text), 32), 'slow', (SELECT id FROM lists LIMIT 1) FROM generate_series(1, 100000) g",
    )
    .await?;
    svc.start().await?;
    let pid = svc.child.as_ref().context("service")?.id();
    let mut other = RawStream::open(&svc.url(), &token("other"), json!({"buckets": []})).await?;
    let mut other_state = ClientState::default();
    other.sync_until(&mut other_state, T, |_| true).await.with_context(|| svc.log())?;

    // The slow client takes its first lines, then stops requesting.
    let mut slow = WsClient::sync(&svc.url(), &token("slow"), 3, json!({"buckets": []})).await?;
    let ops_in = |line: &serde_json::Value| line["data"]["data"].as_array().map_or(0, Vec::len);
    let mut ops = 0;
    for _ in 0..3 {
        ops += ops_in(&slow.next_line(T).await.with_context(|| svc.log())?);
    }
    let before = rss_kib(pid)?;
    let mut peak = before;
    for round in 0..5 {
        // Others keep their latency meanwhile.
        let started = std::time::Instant::now();
        db.execute(
            "UPDATE todos SET description = $1 WHERE owner_id = 'other'",
            &[&format!("round {round}")],
        )
        .await?;
        other
            .sync_until(&mut other_state, T, |s| {
                client_todos(s).values().all(|d| *d == format!("round {round}"))
            })
            .await?;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "other client waited {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        peak = peak.max(rss_kib(pid)?);
    }
    eprintln!("slow WebSocket client, 100 MB waiting: service RSS {before} KiB, peak {peak} KiB");
    // A fixed bound, far below the 100 MB waiting: a few chunks of lines, not the download.
    assert!(peak < before + 24 * 1024, "RSS grew from {before} KiB to {peak} KiB");

    // The data is all there once the client reads again.
    slow.send(request_n_frame(1, 1_000_000)).await?;
    loop {
        let line = slow.next_line(Duration::from_secs(120)).await?;
        ops += ops_in(&line);
        if line.get("checkpoint_complete").is_some() {
            break;
        }
    }
    assert!(ops > 100_000, "{ops} ops");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_stream_completes_at_token_expiry() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 1, 2, &["u1"]).await?;
    svc.start().await?;
    let short = token_with(
        json!({"sub": "u1", "aud": "test-aud", "iat": now(), "exp": now() + 3}),
        "k1",
        SECRET,
    );
    let mut client = WsClient::sync(&svc.url(), &short, 1000, json!({"buckets": []})).await?;
    let mut saw_zero = false;
    loop {
        let frame = client.next_frame(T).await?.context("closed before COMPLETE")?;
        if frame.frame_type == PAYLOAD && frame.flags & FLAG_COMPLETE != 0 {
            break;
        }
        let line = line_of(&frame)?;
        assert!(!saw_zero, "a line after token_expires_in 0: {line}");
        saw_zero = line.get("token_expires_in") == Some(&json!(0));
    }
    assert!(saw_zero, "no token_expires_in 0 before COMPLETE");
    assert!(client.next_frame(T).await?.is_none(), "the connection stays open after COMPLETE");
    Ok(())
}
