//! A large first download while rows keep changing: newer checkpoints interrupt it (protocol
//! spec §7.3), and both a raw client that checks every line and the real Node SDK end up with
//! the source's rows.

use crate::harness::*;
use crate::live::*;
use anyhow::{bail, Result};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// u1's todos, each about 300 bytes: a download of several MB, more than the loopback socket
/// buffers hold, so a slow reader keeps the service mid-download.
const ROWS: i32 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_while_rows_keep_changing() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    db.batch_execute("INSERT INTO lists (name, owner_id) VALUES ('big', 'u1')").await?;
    db.execute(
        "INSERT INTO todos (description, owner_id, list_id) SELECT repeat('x', 300) || g, 'u1', (SELECT id FROM lists) FROM generate_series(1, $1::int) g",
        &[&ROWS],
    )
    .await?;
    svc.start().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(edit_u1_todos(svc.cluster.conn_str("todo"), stop.clone(), writes.clone()));

    // A slow reader: the download takes seconds while checkpoints arrive every few ms.
    let mut raw = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": [], "client_id": "raw"})).await?;
    let mut state = ClientState::default();
    let (mut diffs, mut ops) = (0, 0);
    while !state.complete {
        let line = raw.next_line(T).await?;
        if line.get("checkpoint_diff").is_some() {
            diffs += 1;
        }
        if let Some(data) = line["data"]["data"].as_array() {
            ops += data.len();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        state.apply(&line)?;
    }
    eprintln!(
        "first checkpoint complete after {ops} ops and {diffs} diffs ({} writes so far)",
        writes.load(Ordering::Relaxed)
    );
    if diffs == 0 {
        bail!("no newer checkpoint interrupted a {ops}-op download");
    }

    let mut node = node_client(svc.dir.path(), &svc.url(), "u1", &svc.cluster.uri("todo"))?;
    node.call(json!({"cmd": "wait_first_sync", "timeout_ms": 120000}))?;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let expected = source_todos(&db, "u1").await?;
    raw.sync_until(&mut state, T, |s| client_todos(s) == expected).await?;
    node_converges(&mut node, &db, "u1", T).await?;
    let status = node.call(json!({"cmd": "status"}))?;
    assert_eq!(status["checksum_failures"], json!(0), "{status}");
    eprintln!("{} writes during the downloads", writes.load(Ordering::Relaxed));
    Ok(())
}

/// Edit a random u1 todo every few milliseconds, one transaction (so one checkpoint) each.
async fn edit_u1_todos(conn: String, stop: Arc<AtomicBool>, writes: Arc<AtomicU64>) {
    let db = connect_retrying(&conn).await;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let sql = format!(
            "UPDATE todos SET description = 'edit {i}' WHERE id = (SELECT id FROM todos WHERE owner_id = 'u1' ORDER BY random() LIMIT 1)"
        );
        if db.batch_execute(&sql).await.is_ok() {
            writes.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
