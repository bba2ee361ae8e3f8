//! Compaction with real clients (issue 10): heavy churn on 200 rows while background
//! compaction runs; a live Node client rides through it, a fresh client downloads about one op
//! per live row, and a Node client offline since before the churn reconnects and converges,
//! none of them with a checksum failure.

use crate::harness::*;
use crate::live::*;
use anyhow::{bail, Result};
use serde_json::json;
use std::time::{Duration, Instant};

const ROWS: usize = 200;
const ROUNDS: usize = 30;

/// Ops a fresh raw client downloads for u1 (checking every checksum), and its todos.
async fn fresh_download(url: &str) -> Result<(usize, ClientState)> {
    let mut raw = RawStream::open(url, &token("u1"), json!({"buckets": [], "client_id": "fresh"})).await?;
    let mut state = ClientState::default();
    let mut ops = 0;
    while !state.complete {
        let line = raw.next_line(T).await?;
        ops += line["data"]["data"].as_array().map_or(0, Vec::len);
        state.apply(&line)?;
    }
    Ok((ops, state))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_converge_through_churn_and_compaction() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 1, ROWS, &["u1"]).await?;
    svc.storage_compaction(&["interval_seconds: 1", "pause_ms: 0"])?;
    svc.start().await?;

    let mut offline = node_client(svc.dir.path(), &svc.url(), "u1", &svc.cluster.uri("todo"))?;
    node_converges(&mut offline, &db, "u1", T).await?;
    offline.call(json!({"cmd": "disconnect"}))?;
    let live_dir = tempfile::tempdir()?;
    let mut live = node_client(live_dir.path(), &svc.url(), "u1", &svc.cluster.uri("todo"))?;
    node_converges(&mut live, &db, "u1", T).await?;

    // Every row updated in turn, ten rows per transaction, while passes run every second.
    let ids: Vec<String> = db
        .query("SELECT id::text FROM todos WHERE owner_id = 'u1' ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for round in 0..ROUNDS {
        for batch in ids.chunks(10) {
            db.execute(
                "UPDATE todos SET description = 'round ' || $1::int WHERE id::text = ANY($2)",
                &[&(round as i32), &batch],
            )
            .await?;
        }
    }
    let updates = ROWS * ROUNDS;
    node_converges(&mut live, &db, "u1", T).await?;

    // Passes run every second: wait for one that covers the whole churn.
    let live_rows = ROWS + 1;
    let bound = live_rows * 12 / 10 + 2;
    let started = Instant::now();
    let (ops, state) = loop {
        let (ops, state) = fresh_download(&svc.url()).await?;
        if ops <= bound {
            break (ops, state);
        }
        if started.elapsed() > T {
            bail!("a fresh client still downloads {ops} ops for {live_rows} live rows after {updates} updates");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("after {updates} updates of {ROWS} rows a fresh client downloads {ops} ops ({live_rows} live rows)");
    assert_eq!(client_todos(&state), source_todos(&db, "u1").await?);
    assert!(svc.log().contains("compaction pass done"), "{}", svc.log());

    // Offline since before the churn: its positions point into history that is now a CLEAR.
    offline.call(json!({"cmd": "connect", "endpoint": svc.url(), "token": token("u1"), "source_url": svc.cluster.uri("todo"), "retry_delay_ms": 200}))?;
    node_converges(&mut offline, &db, "u1", T).await?;
    let fresh_dir = tempfile::tempdir()?;
    let mut fresh = node_client(fresh_dir.path(), &svc.url(), "u1", &svc.cluster.uri("todo"))?;
    node_converges(&mut fresh, &db, "u1", T).await?;
    // One more change reaches all of them.
    db.execute("UPDATE todos SET description = 'after' WHERE id::text = $1", &[&ids[0]])
        .await?;
    for agent in [&mut offline, &mut live, &mut fresh] {
        node_converges(agent, &db, "u1", T).await?;
        let status = agent.call(json!({"cmd": "status"}))?;
        assert_eq!(status["checksum_failures"], json!(0), "{status}");
    }
    Ok(())
}
