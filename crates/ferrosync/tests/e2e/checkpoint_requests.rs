//! `POST /sync/checkpoint-request` over HTTP: validation before auth, auth errors, a stored id
//! that only grows, delivery in `write_checkpoint` on an idle source, and legacy write
//! checkpoints mixed in on the same key.

use crate::harness::*;
use anyhow::{Context, Result};
use serde_json::{json, Value};

/// Status and JSON body of a checkpoint request with `body` (raw) and `token`, if any.
async fn post(url: &str, token: Option<&str>, body: String) -> Result<(u16, Value)> {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/sync/checkpoint-request"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Token {t}"));
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

/// The stored id after requesting `id` (a JSON value) for client `c1` of `sub`.
async fn request(url: &str, sub: &str, id: Value) -> Result<String> {
    let (status, body) = post(
        url,
        Some(&token(sub)),
        json!({"client_id": "c1", "checkpoint_request_id": id}).to_string(),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let data = body.as_object().context("object")?;
    assert_eq!(data.len(), 1, "{body}");
    body["data"]["checkpoint_request_id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("the stored id is a string: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_requests_over_http() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 1, 2, &["u1"]).await?;
    svc.start().await?;
    let url = svc.url();

    // A bad body is 400 "Validation failed", before authorization is looked at.
    for bad in [
        "{not json".to_string(),
        json!({"checkpoint_request_id": "1"}).to_string(),
        json!({"client_id": "c1"}).to_string(),
        json!({"client_id": 7, "checkpoint_request_id": "1"}).to_string(),
        json!({"client_id": "c1", "checkpoint_request_id": 0}).to_string(),
        json!({"client_id": "c1", "checkpoint_request_id": "-1"}).to_string(),
        json!({"client_id": "c1", "checkpoint_request_id": 1.5}).to_string(),
        json!({"client_id": "c1", "checkpoint_request_id": "9223372036854775808"}).to_string(),
        json!({"client_id": "c1", "checkpoint_request_id": null}).to_string(),
    ] {
        for t in [None, Some(token("u1"))] {
            let (status, body) = post(&url, t.as_deref(), bad.clone()).await?;
            assert_eq!(status, 400, "{bad}: {body}");
            assert_eq!(body["error"]["code"], "PSYNC_S2001", "{bad}: {body}");
            assert_eq!(body["error"]["description"], "Validation failed", "{bad}: {body}");
            assert!(body["error"]["details"].is_string(), "{bad}: {body}");
        }
    }
    let good = json!({"client_id": "c1", "checkpoint_request_id": "1"}).to_string();
    for (t, code) in [(None, "PSYNC_S2106"), (Some("not-a-jwt".to_string()), "PSYNC_S2101")] {
        let (status, body) = post(&url, t.as_deref(), good.clone()).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some(code)), "{body}");
    }
    let (status, body) = post(&url, Some(&token("u1")), format!("{{\"client_id\":\"{}\"}}", "x".repeat(20_000))).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("PSYNC_S2001")), "{body}");

    // The stored id only grows; the answer is the stored id, as a string.
    let mut stream = RawStream::open(&url, &token("u1"), json!({"buckets": [], "client_id": "c1"})).await?;
    let mut client = ClientState::default();
    stream.sync_until(&mut client, T, |_| true).await.with_context(|| svc.log())?;
    assert_eq!(request(&url, "u1", json!("5")).await?, "5");
    assert_eq!(request(&url, "u1", json!(3)).await?, "5");
    assert_eq!(request(&url, "u1", json!(5)).await?, "5");
    // Each user's client ids are their own.
    assert_eq!(request(&url, "u2", json!(2)).await?, "2");
    // Delivered on the idle source, like a legacy write checkpoint.
    let delivered = |id: &'static str| move |s: &ClientState| s.checkpoint.as_ref().is_some_and(|c| c["write_checkpoint"] == json!(id));
    stream.sync_until(&mut client, T, delivered("5")).await.with_context(|| svc.log())?;

    // A legacy write checkpoint continues from the requested id, and requests from that.
    let legacy: Value = reqwest::Client::new()
        .get(format!("{url}/write-checkpoint2.json?client_id=c1"))
        .header("Authorization", format!("Token {}", token("u1")))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(legacy["data"]["write_checkpoint"], "6", "{legacy}");
    stream.sync_until(&mut client, T, delivered("6")).await.with_context(|| svc.log())?;
    assert_eq!(request(&url, "u1", json!("4")).await?, "6");
    assert_eq!(request(&url, "u1", json!("9223372036854775807")).await?, "9223372036854775807");
    stream
        .sync_until(&mut client, T, delivered("9223372036854775807"))
        .await
        .with_context(|| svc.log())?;

    // An id stored by a request whose source marker got lost: the source is idle, so no
    // checkpoint passes it. A stale request for it emits the marker again, and it is delivered.
    let head: String = db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    svc.cluster
        .connect("storage")
        .await?
        .execute(
            "INSERT INTO ferrosync.write_checkpoints (user_key, write_checkpoint, lsn, seq, requested_at)
             VALUES ('u1/c2', 40, $1::text::pg_lsn, nextval('ferrosync.write_checkpoint_seq'), now())",
            &[&head],
        )
        .await?;
    let mut stream = RawStream::open(&url, &token("u1"), json!({"buckets": [], "client_id": "c2"})).await?;
    let mut client = ClientState::default();
    stream.sync_until(&mut client, T, |_| true).await?;
    assert_eq!(client.checkpoint.as_ref().map(|c| c["write_checkpoint"].clone()), Some(Value::Null));
    let (status, body) = post(
        &url,
        Some(&token("u1")),
        json!({"client_id": "c2", "checkpoint_request_id": "30"}).to_string(),
    )
    .await?;
    assert_eq!((status, &body["data"]["checkpoint_request_id"]), (200, &json!("40")), "{body}");
    stream
        .sync_until(&mut client, T, delivered("40"))
        .await
        .with_context(|| svc.log())?;
    Ok(())
}
