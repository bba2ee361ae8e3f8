//! The HTTP sync protocol end to end: fresh sync, live changes, moves, resume, write
//! checkpoints, SIGTERM restart, and every auth failure code.

use crate::harness::*;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protocol_end_to_end() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 3, 5, &["u1", "u2"]).await?;
    svc.start().await?;
    let url = svc.url();

    // Fresh sync: global lists + only u1's todos, every checksum verified by ClientState.
    let mut u1 = ClientState::default();
    let mut s1 = RawStream::open(&url, &token("u1"), json!({"buckets": [], "client_id": "c1"})).await?;
    s1.sync_until(&mut u1, T, |s| s.table("lists").len() == 3)
        .await
        .with_context(|| svc.log())?;
    assert_eq!(client_todos(&u1), source_todos(&db, "u1").await?);
    let bucket_names: Vec<&String> = u1.buckets.keys().collect();
    assert!(
        bucket_names.iter().all(|b| !b.contains("u2")),
        "u1 got another user's bucket: {bucket_names:?}"
    );

    // Live insert, update, delete.
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'live', 'u1', id FROM lists LIMIT 1")
        .await?;
    s1.sync_until(&mut u1, T, |s| client_todos(s).values().any(|d| d == "live")).await?;
    db.batch_execute("UPDATE todos SET description = 'edited' WHERE description = 'live'")
        .await?;
    s1.sync_until(&mut u1, T, |s| client_todos(s).values().any(|d| d == "edited"))
        .await?;
    db.batch_execute("DELETE FROM todos WHERE description = 'edited'").await?;
    s1.sync_until(&mut u1, T, |s| !client_todos(s).values().any(|d| d == "edited"))
        .await?;
    assert_eq!(client_todos(&u1), source_todos(&db, "u1").await?);

    // TOAST: an update that leaves a large out-of-line value unchanged replicates it as
    // "unchanged"; the client must still get the full value (merged from the stored image).
    db.batch_execute(
        "INSERT INTO todos (description, owner_id, list_id)
         SELECT (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400)), 'u1', id FROM lists LIMIT 1",
    )
    .await?;
    s1.sync_until(&mut u1, T, |s| client_todos(s).values().any(|d| d.len() > 10_000))
        .await
        .with_context(|| svc.log())?;
    db.batch_execute("UPDATE todos SET completed = true WHERE length(description) > 10000")
        .await?;
    let toasted = |s: &ClientState| {
        s.table("todos")
            .values()
            .any(|v| v["completed"] == json!(1) && v["description"].as_str().is_some_and(|d| d.len() > 10_000))
    };
    s1.sync_until(&mut u1, T, toasted).await.with_context(|| svc.log())?;
    assert_eq!(client_todos(&u1), source_todos(&db, "u1").await?);

    // A todo moves from u1 to u2: REMOVE for u1, PUT for u2.
    let mut u2 = ClientState::default();
    let mut s2 = RawStream::open(&url, &token("u2"), json!({"buckets": [], "client_id": "c2"})).await?;
    s2.sync_until(&mut u2, T, |s| !s.table("lists").is_empty()).await?;
    db.batch_execute(
        "UPDATE todos SET owner_id = 'u2', description = 'moved' WHERE id = (SELECT id FROM todos WHERE owner_id = 'u1' LIMIT 1)",
    )
    .await?;
    let remaining = source_todos(&db, "u1").await?.len();
    s1.sync_until(&mut u1, T, |s| client_todos(s).len() == remaining).await?;
    s2.sync_until(&mut u2, T, |s| client_todos(s).values().any(|d| d == "moved"))
        .await?;
    assert_eq!(client_todos(&u1), source_todos(&db, "u1").await?);
    assert_eq!(client_todos(&u2), source_todos(&db, "u2").await?);
    drop(s1);

    // Reconnect from `after`: nothing is resent, and only the new row arrives.
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'while away', 'u1', id FROM lists LIMIT 1")
        .await?;
    let mut s1 = RawStream::open(&url, &token("u1"), json!({"buckets": u1.positions(), "client_id": "c1"})).await?;
    let mut ops_received = 0;
    loop {
        let line = s1.next_line(T).await?;
        if let Some(d) = line.get("data") {
            ops_received += d["data"].as_array().map_or(0, Vec::len);
        }
        u1.apply(&line)?;
        if u1.complete && client_todos(&u1).values().any(|d| d == "while away") {
            break;
        }
    }
    assert_eq!(ops_received, 1, "reconnect must send only the op the client lacks");
    assert_eq!(client_todos(&u1), source_todos(&db, "u1").await?);

    // Write checkpoint on an idle source: delivered on a later checkpoint.
    let wc: Value = reqwest::Client::new()
        .get(format!("{url}/write-checkpoint2.json?client_id=c1"))
        .header("Authorization", format!("Token {}", token("u1")))
        .send()
        .await?
        .json()
        .await?;
    let id = wc["data"]["write_checkpoint"]
        .as_str()
        .context("write_checkpoint is a string")?
        .to_string();
    s1.sync_until(&mut u1, T, |s| {
        s.checkpoint.as_ref().is_some_and(|c| c["write_checkpoint"] == json!(id))
    })
    .await?;

    // SIGTERM ends the process despite held streams and hands the replication lease over:
    // a restarted process replicates at once instead of waiting ~30 s for the lease to expire.
    svc.terminate()?;
    svc.start().await?;
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'after restart', 'u1', id FROM lists LIMIT 1")
        .await?;
    let mut s1 = RawStream::open(&url, &token("u1"), json!({"buckets": u1.positions(), "client_id": "c1"})).await?;
    s1.sync_until(&mut u1, Duration::from_secs(10), |s| {
        client_todos(s).values().any(|d| d == "after restart")
    })
    .await
    .with_context(|| svc.log())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_are_401_with_codes() -> Result<()> {
    let mut svc = Service::new().await?;
    svc.start().await?;
    let url = svc.url();
    let client = reqwest::Client::new();
    let t = now();
    let cases = [
        (None, "PSYNC_S2106"),
        (Some("Token not-a-jwt".to_string()), "PSYNC_S2101"),
        (
            Some(format!(
                "Token {}",
                token_with(json!({"sub":"u","aud":"test-aud","iat":t,"exp":t+60}), "k1", "wrong")
            )),
            "PSYNC_S2102",
        ),
        (
            Some(format!(
                "Bearer {}",
                token_with(json!({"sub":"u","aud":"test-aud","iat":t-7200,"exp":t-3600}), "k1", SECRET)
            )),
            "PSYNC_S2103",
        ),
        (
            Some(format!(
                "Token {}",
                token_with(json!({"sub":"u","aud":"other","iat":t,"exp":t+60}), "k1", SECRET)
            )),
            "PSYNC_S2105",
        ),
        (
            Some(format!(
                "Token {}",
                token_with(json!({"sub":"u","aud":"test-aud","iat":t,"exp":t+60}), "nope", SECRET)
            )),
            "PSYNC_S2101",
        ),
        (
            Some(format!(
                "Token {}",
                token_with(json!({"sub":"u","aud":"test-aud","iat":t,"exp":t+90000}), "k1", SECRET)
            )),
            "PSYNC_S2104",
        ),
    ];
    for (auth, code) in cases {
        let mut req = client.post(format!("{url}/sync/stream")).json(&json!({"buckets": []}));
        if let Some(a) = &auth {
            req = req.header("Authorization", a);
        }
        let resp = req.send().await?;
        assert_eq!(resp.status().as_u16(), 401, "{auth:?}");
        let body: Value = resp.json().await?;
        assert_eq!(body["error"]["code"], code, "{auth:?}: {body}");
    }
    let resp = client
        .post(format!("{url}/sync/stream"))
        .header("Authorization", format!("Token {}", token("u")))
        .body("{not json")
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 400);
    let resp = client.get(format!("{url}/nope")).send().await?;
    assert_eq!(resp.status().as_u16(), 404);
    Ok(())
}
