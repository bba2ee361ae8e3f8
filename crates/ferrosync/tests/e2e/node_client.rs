//! The real PowerSync Node SDK syncing the todo app, over HTTP streaming and over WebSocket.

use crate::harness::*;
use anyhow::{Context, Result};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powersync_node_client_syncs_todo_app() -> Result<()> {
    todo_app("http").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powersync_node_client_syncs_todo_app_over_websocket() -> Result<()> {
    todo_app("websocket").await
}

/// Fresh sync, live changes, bucket moves, reconnect and a write checkpoint round trip.
async fn todo_app(connection_method: &str) -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 2, 20, &["u1", "u2"]).await?;
    svc.start().await?;
    let mut agent = NodeAgent::start()?;
    agent.call(json!({"cmd": "open", "db_path": svc.dir.path().join("client.sqlite")}))?;
    let connect = json!({"cmd": "connect", "endpoint": svc.url(), "token": token("u1"), "source_url": svc.cluster.uri("todo"), "retry_delay_ms": 200, "connection_method": connection_method});
    let connected = agent.call(connect.clone())?;
    assert_eq!(
        connected["connection_method"],
        json!(if connection_method == "http" { "http" } else { "web-socket" })
    );
    agent
        .call(json!({"cmd": "wait_first_sync", "timeout_ms": 60000}))
        .with_context(|| svc.log())?;
    eventually_equal(&mut agent, &db, "u1").await?;
    let lists = agent.call(json!({"cmd": "query", "sql": "SELECT id FROM lists"}))?;
    assert_eq!(lists.as_array().map(Vec::len), Some(2));

    // Live changes, including a row moving to and from another user's bucket.
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'live', 'u1', id FROM lists LIMIT 1")
        .await?;
    eventually_equal(&mut agent, &db, "u1").await?;
    db.batch_execute("UPDATE todos SET description = 'live edited' WHERE description = 'live'")
        .await?;
    eventually_equal(&mut agent, &db, "u1").await?;
    db.batch_execute("UPDATE todos SET owner_id = 'u2' WHERE id IN (SELECT id FROM todos WHERE owner_id = 'u1' LIMIT 3)")
        .await?;
    eventually_equal(&mut agent, &db, "u1").await?;
    db.batch_execute("UPDATE todos SET owner_id = 'u1' WHERE id IN (SELECT id FROM todos WHERE owner_id = 'u2' LIMIT 5)")
        .await?;
    eventually_equal(&mut agent, &db, "u1").await?;
    db.batch_execute("DELETE FROM todos WHERE description = 'live edited'").await?;
    eventually_equal(&mut agent, &db, "u1").await?;

    // Reconnect: changes made while disconnected arrive.
    agent.call(json!({"cmd": "disconnect"}))?;
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'offline ' || g, 'u1', (SELECT id FROM lists LIMIT 1) FROM generate_series(1, 5) g").await?;
    agent.call(connect)?;
    eventually_equal(&mut agent, &db, "u1").await?;

    // A local write uploads to the source and comes back through a write checkpoint.
    let list_id = lists[0]["id"].as_str().context("list id")?.to_string();
    agent.call(json!({"cmd": "execute", "sql": "INSERT INTO todos (id, description, owner_id, list_id, completed) VALUES (uuid(), 'from client', 'u1', ?, 0)", "params": [list_id]}))?;
    agent.call(json!({"cmd": "wait_upload_done", "timeout_ms": 30000}))?;
    eventually_equal(&mut agent, &db, "u1").await?;
    let status = agent.call(json!({"cmd": "status"}))?;
    assert_eq!(status["crud_pending"], json!(0), "{status}");
    assert_eq!(status["checksum_failures"], json!(0), "{status}");
    agent.call(json!({"cmd": "close"}))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_checkpoint_round_trip_http_legacy() -> Result<()> {
    write_checkpoint_round_trip("http", "legacy").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_checkpoint_round_trip_http_requests() -> Result<()> {
    write_checkpoint_round_trip("http", "requests").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_checkpoint_round_trip_websocket_legacy() -> Result<()> {
    write_checkpoint_round_trip("websocket", "legacy").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_checkpoint_round_trip_websocket_requests() -> Result<()> {
    write_checkpoint_round_trip("websocket", "requests").await
}

/// Local writes of the real client (`connection_method` "http" or "websocket", `checkpoint_mode`
/// "legacy" or "requests") are uploaded to Postgres by its connector, and the client applies
/// downloads again only once a checkpoint carries the write checkpoint it asked for. So a
/// server-side edit of the uploaded row reaching the client shows the round trip: without the
/// write checkpoint the client would keep its local version ("pending local changes") for good.
async fn write_checkpoint_round_trip(connection_method: &str, checkpoint_mode: &str) -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 1, 3, &["u1"]).await?;
    svc.start().await?;
    let mut agent = NodeAgent::start()?;
    let opened = agent.call(json!({"cmd": "open", "db_path": svc.dir.path().join("client.sqlite")}))?;
    let client_id = opened["client_id"].as_str().context("client id")?.to_string();
    agent.call(json!({
        "cmd": "connect", "endpoint": svc.url(), "token": token("u1"), "source_url": svc.cluster.uri("todo"),
        "retry_delay_ms": 200, "connection_method": connection_method, "checkpoint_mode": checkpoint_mode,
    }))?;
    agent
        .call(json!({"cmd": "wait_first_sync", "timeout_ms": 60000}))
        .with_context(|| svc.log())?;
    eventually_equal(&mut agent, &db, "u1").await?;
    let lists = agent.call(json!({"cmd": "query", "sql": "SELECT id FROM lists"}))?;
    let list_id = lists[0]["id"].as_str().context("list id")?.to_string();
    let storage = svc.cluster.connect("storage").await?;
    let mut last_id = 0;
    for round in 1..=2 {
        let description = format!("from client {round}");
        agent.call(json!({"cmd": "execute", "sql": "INSERT INTO todos (id, description, owner_id, list_id, completed) VALUES (uuid(), ?, 'u1', ?, 0)", "params": [description, list_id]}))?;
        agent.call(json!({"cmd": "wait_upload_done", "timeout_ms": 30000}))?;
        let edited = db
            .execute(
                "UPDATE todos SET description = description || ' (edited on the server)' WHERE description = $1",
                &[&description],
            )
            .await?;
        assert_eq!(edited, 1, "the upload reached the source");
        eventually_equal(&mut agent, &db, "u1").await.with_context(|| svc.log())?;
        // The id the client waited for, stored as the mode stores it.
        let row = storage
            .query_one(
                "SELECT write_checkpoint, requested_at IS NOT NULL FROM ferrosync.write_checkpoints WHERE user_key = $1",
                &[&format!("u1/{client_id}")],
            )
            .await?;
        let (id, requested): (i64, bool) = (row.get(0), row.get(1));
        assert!(id > last_id, "round {round}: write checkpoint {id} after {last_id}");
        assert_eq!(requested, checkpoint_mode == "requests", "round {round}");
        last_id = id;
    }
    let status = agent.call(json!({"cmd": "status"}))?;
    assert_eq!(status["crud_pending"], json!(0), "{status}");
    assert_eq!(status["checksum_failures"], json!(0), "{status}");
    assert_eq!(status["dataFlow"]["downloadError"], json!(null), "{status}");
    agent.call(json!({"cmd": "close"}))?;
    Ok(())
}
