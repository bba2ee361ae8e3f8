//! Lost replication slots: when the slot of a stream is dropped (or invalidated by
//! `max_slot_wal_keep_size`) its history cannot continue. The service notices, keeps serving
//! the last data, builds a new stream from a fresh snapshot, and clients converge on it.

use crate::harness::*;
use crate::live::*;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::time::{Duration, Instant};

/// The slot's name and the pid of the walsender using it (if any).
async fn slot_of(db: &tokio_postgres::Client) -> Result<Option<(String, Option<i32>)>> {
    let row = db
        .query_opt(
            "SELECT slot_name::text, active_pid FROM pg_replication_slots WHERE slot_name LIKE 'powersync_%' ORDER BY slot_name LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Drop the slot out from under its user: end the walsender, then drop the slot before the
/// service reconnects to it.
async fn drop_slot_under_service(db: &tokio_postgres::Client) -> Result<String> {
    let (slot, _) = slot_of(db).await?.context("no slot to drop")?;
    let deadline = Instant::now() + T;
    loop {
        db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await?;
        let dropped = db.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.is_ok();
        if dropped {
            return Ok(slot);
        }
        if Instant::now() > deadline {
            bail!("could not drop slot {slot}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn stream_states(svc: &Service) -> Result<Vec<(i64, String)>> {
    let storage = svc.cluster.connect("storage").await?;
    let rows = storage.query("SELECT id, state FROM ferrosync.sync_rules ORDER BY id", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_a_running_service_is_rebuilt() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 2, 50, &["u1", "u2"]).await?;
    svc.start().await?;
    let mut node = node_client(svc.dir.path(), &svc.url(), "u1", &svc.cluster.uri("todo"))?;
    node_converges(&mut node, &db, "u1", T).await.with_context(|| svc.log())?;

    let old_slot = drop_slot_under_service(&db).await?;
    // Changes made while the stream is being rebuilt must arrive too.
    db.batch_execute(
        "INSERT INTO todos (description, owner_id, list_id) SELECT 'after the slot was lost ' || g, 'u1', (SELECT id FROM lists LIMIT 1) FROM generate_series(1, 5) g;
         DELETE FROM todos WHERE id IN (SELECT id FROM todos WHERE owner_id = 'u1' ORDER BY id LIMIT 3);
         UPDATE todos SET owner_id = 'u1' WHERE id IN (SELECT id FROM todos WHERE owner_id = 'u2' ORDER BY id LIMIT 4);",
    )
    .await?;
    node_converges(&mut node, &db, "u1", T).await.with_context(|| svc.log())?;
    let status = node.call(json!({"cmd": "status"}))?;
    assert_eq!(status["checksum_failures"], json!(0), "{status}");

    let log = svc.log();
    assert!(log.contains("building a new replication stream"), "the rebuild is logged: {log}");
    let (new_slot, _) = slot_of(&db).await?.context("the new stream has a slot")?;
    assert_ne!(new_slot, old_slot, "a new stream replicates through a new slot");
    let states = stream_states(&svc).await?;
    let states: Vec<&str> = states.iter().map(|(_, s)| s.as_str()).collect();
    assert!(
        matches!(states.as_slice(), ["STOP" | "TERMINATED", "ACTIVE"]),
        "the lost stream is retired (and then cleaned up) once its replacement serves: {states:?}"
    );
    assert!(svc.alive(), "the process never exits");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_lost_while_the_service_was_down_is_rebuilt_and_old_data_served_meanwhile() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 2, 20, &["u1"]).await?;
    svc.start().await?;
    let expected_before = source_todos(&db, "u1").await?;
    let mut state = ClientState::default();
    let mut s = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": []})).await?;
    s.sync_until(&mut state, T, |s| client_todos(s) == expected_before)
        .await
        .with_context(|| svc.log())?;
    drop(s);

    svc.kill();
    // The killed process's walsender may hold the slot for a moment: end it, then drop.
    drop_slot_under_service(&db).await?;
    // A big table makes the new snapshot take a moment; meanwhile the old data is served.
    seed(&db, 1, 60_000, &["u2"]).await?;
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'while down', 'u1', id FROM lists LIMIT 1")
        .await?;
    svc.start().await?;

    let mut during = ClientState::default();
    let mut s = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": []})).await?;
    s.sync_until(&mut during, T, |s| !client_todos(s).is_empty())
        .await
        .with_context(|| svc.log())?;
    let states = stream_states(&svc).await?;
    eprintln!("streams while the first client synced: {states:?}");
    if states.iter().any(|(_, s)| s == "ERRORED") {
        assert_eq!(client_todos(&during), expected_before, "the ERRORED stream serves its last data");
    }
    let expected = source_todos(&db, "u1").await?;
    let mut fresh = ClientState::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut s = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": []})).await?;
        let synced = s
            .sync_until(&mut fresh, Duration::from_secs(5), |s| client_todos(s) == expected)
            .await;
        if synced.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("never converged on the rebuilt stream: {}", svc.log());
        }
        fresh = ClientState::default();
    }
    let states = stream_states(&svc).await?;
    assert_eq!(states.last().map(|(_, s)| s.as_str()), Some("ACTIVE"), "{states:?}");
    assert_eq!(states.len(), 2, "exactly one replacement stream: {states:?}");
    Ok(())
}
