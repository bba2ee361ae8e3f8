//! kill -9 during the snapshot and during streaming, and a crash of Postgres during the
//! snapshot: clients converge to the source.

use crate::harness::*;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_snapshot_and_streaming_converges() -> Result<()> {
    kill_9_converges(false).await
}

/// The same with REPLICA IDENTITY FULL: the copy cannot resume after a key, so the restarted
/// copy meets rows it stored before the kill and must merge them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_unresumable_snapshot_converges() -> Result<()> {
    kill_9_converges(true).await
}

async fn kill_9_converges(identity_full: bool) -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    if identity_full {
        db.batch_execute("ALTER TABLE todos REPLICA IDENTITY FULL").await?;
    }
    seed(&db, 10, 60_000, &["u1", "u2"]).await?;
    svc.start().await?;
    // Kill in the middle of the snapshot, once some chunks of todos are committed.
    until_part_of_todos_is_copied(&svc).await?;
    svc.kill();
    assert!(
        !svc.log().contains("initial snapshot done"),
        "snapshot finished before the kill; make it bigger"
    );
    svc.start().await?;

    // Keep writing while we kill it again mid-stream.
    let writer = tokio::spawn({
        let db = svc.source().await?;
        async move {
            for i in 0..200 {
                let owner = if i % 2 == 0 { "u1" } else { "u2" };
                db.execute(
                    "INSERT INTO todos (description, owner_id, list_id) SELECT 'stream ' || $1::text, $2, id FROM lists LIMIT 1",
                    &[&i.to_string(), &owner],
                )
                .await?;
                db.execute(
                    "UPDATE todos SET owner_id = CASE owner_id WHEN 'u1' THEN 'u2' ELSE 'u1' END WHERE description = 'todo ' || $1::text",
                    &[&i.to_string()],
                )
                .await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        }
    });
    let deadline = Instant::now() + T;
    while !svc.log().contains("streaming changes") {
        if Instant::now() > deadline {
            bail!("streaming never started: {}", svc.log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    svc.kill();
    svc.start().await?;
    writer.await??;

    clients_converge(&svc, &db).await
}

/// Postgres re-sends what the slot has not confirmed, and the confirmation of the last
/// transactions goes out about once a second: a kill -9 right after a checkpoint usually beats
/// it. Those transactions are in storage already and are not applied again, so a client that
/// synced them downloads nothing for them after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_a_checkpoint_replays_nothing() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 1, 5, &["u1"]).await?;
    svc.start().await?;
    let mut state = ClientState::default();
    let mut attempt = 0;
    // Until a kill lands before the slot confirmed the insert, so that Postgres re-sends it.
    let replayable = loop {
        attempt += 1;
        let mut s = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": state.resume_positions()})).await?;
        s.sync_until(&mut state, T, |_| true).await?;
        let description = format!("synced before the kill {attempt}");
        // Before the insert's commit record: a slot confirmed up to here will re-send it.
        let before: String = db.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0);
        db.execute(
            "INSERT INTO todos (description, owner_id, list_id) SELECT $1, 'u1', id FROM lists LIMIT 1",
            &[&description],
        )
        .await?;
        s.sync_until(&mut state, T, |s| client_todos(s).values().any(|d| *d == description))
            .await
            .with_context(|| svc.log())?;
        svc.kill();
        let unconfirmed: bool = db
            .query_one(
                "SELECT coalesce(bool_and(confirmed_flush_lsn <= $1::text::pg_lsn), false) FROM pg_replication_slots WHERE slot_name LIKE 'powersync%'",
                &[&before],
            )
            .await?
            .get(0);
        if unconfirmed {
            break description;
        }
        if attempt == 10 {
            bail!("the slot confirmed the insert before every one of 10 kills: nothing to replay");
        }
        svc.start().await?;
    };
    let replayable_id = client_todos(&state)
        .into_iter()
        .find(|(_, d)| *d == replayable)
        .map(|(id, _)| id)
        .context("the client has the row")?;
    svc.start().await?;
    // A new row makes a new checkpoint: the only row the client should get after its position.
    db.execute(
        "INSERT INTO todos (description, owner_id, list_id) SELECT 'after the restart', 'u1', id FROM lists LIMIT 1",
        &[],
    )
    .await?;
    let mut s = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": state.resume_positions()})).await?;
    let mut downloaded = Vec::new();
    let deadline = Instant::now() + T;
    while !(state.complete && client_todos(&state).values().any(|d| d == "after the restart")) {
        let line = s
            .next_line(deadline.saturating_duration_since(Instant::now()))
            .await
            .with_context(|| svc.log())?;
        for op in line["data"]["data"].as_array().into_iter().flatten() {
            downloaded.push(op["object_id"].as_str().unwrap_or_default().to_string());
        }
        state.apply(&line)?;
    }
    assert!(
        !downloaded.contains(&replayable_id),
        "the row synced before the kill was written again after the restart (ops for {downloaded:?})"
    );
    clients_converge(&svc, &db).await
}

/// Table-copy chunks commit without waiting for the WAL flush: a crash of Postgres may lose
/// the last ones, with their saved progress. The copy resumes from what survived, and nothing
/// is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_during_snapshot_converges() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 10, 60_000, &["u1", "u2"]).await?;
    svc.start().await?;
    until_part_of_todos_is_copied(&svc).await?;
    tokio::task::block_in_place(|| svc.cluster.restart_immediate())?;
    assert!(
        !svc.log().contains("initial snapshot done"),
        "snapshot finished before the crash; make it bigger"
    );
    let deadline = Instant::now() + T;
    while !svc.log().contains("initial snapshot done") {
        if !svc.alive() {
            bail!("the service exited across the crash: {}", svc.log());
        }
        if Instant::now() > deadline {
            bail!("the snapshot did not finish after the crash: {}", svc.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db = svc.source().await?;
    clients_converge(&svc, &db).await
}

/// Waits until the snapshot of todos is under way: some of its chunks committed, not done.
async fn until_part_of_todos_is_copied(svc: &Service) -> Result<()> {
    let storage = svc.cluster.connect("storage").await?;
    let deadline = Instant::now() + T;
    loop {
        let copied: Option<i64> = storage
            .query_opt(
                "SELECT snapshot_rows FROM ferrosync.source_tables WHERE table_name = 'todos' AND NOT snapshot_done",
                &[],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0));
        if copied.is_some_and(|rows| rows > 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("snapshot never got going: {}", svc.log());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Both users' clients end up with exactly the source's todos.
async fn clients_converge(svc: &Service, db: &tokio_postgres::Client) -> Result<()> {
    for user in ["u1", "u2"] {
        let expected = source_todos(db, user).await?;
        let mut state = ClientState::default();
        let mut s = RawStream::open(&svc.url(), &token(user), json!({"buckets": []})).await?;
        s.sync_until(&mut state, Duration::from_secs(120), |s| client_todos(s) == expected)
            .await
            .with_context(|| svc.log())?;
    }
    Ok(())
}
