//! PostgreSQL (source and storage alike) restarts under a live service: the process survives,
//! new streams are refused quickly while it is down, and clients converge afterwards.

use crate::harness::*;
use crate::live::*;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// While Postgres is down, how long a new `/sync/stream` request may take to be answered.
const REFUSE_WITHIN: Duration = Duration::from_secs(5);
/// How long Postgres stays down per restart.
const DOWN_FOR: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_while_clients_are_live() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 3, 300, &["u1", "u2"]).await?;
    svc.start().await?;
    let raw = LiveClient::spawn(svc.url(), "u1");
    raw.converge(&db, T).await.with_context(|| svc.log())?;
    let mut node = node_client(svc.dir.path(), &svc.url(), "u1", &svc.cluster.uri("todo"))?;
    node_converges(&mut node, &db, "u1", T).await.with_context(|| svc.log())?;
    drop(db);

    let stop = Arc::new(AtomicBool::new(false));
    let (writes, write_errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = tokio::spawn(write_u1_todos(
        svc.cluster.conn_str("todo"),
        stop.clone(),
        writes.clone(),
        write_errors.clone(),
    ));

    let mut problems = Vec::new();
    let log_mark = svc.log_len();
    for round in 1..=2 {
        watch_alive(&mut svc, Duration::from_secs(3), &mut problems).await;
        tokio::task::block_in_place(|| svc.cluster.stop());
        let down_at = Instant::now();
        eprintln!("postgres stopped (round {round})");
        // A new client while storage is down: answered at once with an error, not held.
        match probe_new_stream(&svc.url()).await {
            Ok((status, elapsed, body)) => {
                eprintln!("new stream while postgres is down: {status} after {elapsed:?}: {body}");
                if status < 300 {
                    problems.push(format!(
                        "round {round}: a new /sync/stream got {status} while postgres was down (expected an error status): {body}"
                    ));
                }
            }
            Err(e) => problems.push(format!("round {round}: a new /sync/stream while postgres was down: {e:#}")),
        }
        match readiness(&svc.url()).await {
            Ok((status, body)) if status != 200 && body["storage"]["ok"] == json!(false) => {}
            Ok((status, body)) => problems.push(format!("round {round}: readiness while postgres was down: {status} {body}")),
            Err(e) => problems.push(format!("round {round}: readiness while postgres was down: {e:#}")),
        }
        watch_alive(&mut svc, DOWN_FOR.saturating_sub(down_at.elapsed()), &mut problems).await;
        tokio::task::block_in_place(|| svc.cluster.resume())?;
        eprintln!("postgres back (round {round}) after {:?}", down_at.elapsed());
    }
    watch_alive(&mut svc, Duration::from_secs(3), &mut problems).await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    eprintln!(
        "writer: {} transactions committed, {} failed",
        writes.load(Ordering::Relaxed),
        write_errors.load(Ordering::Relaxed)
    );
    if writes.load(Ordering::Relaxed) == 0 {
        bail!("the writer never committed: the test proves nothing");
    }

    let db = svc.source().await?;
    let converge_timeout = Duration::from_secs(60);
    match raw.converge(&db, converge_timeout).await {
        Ok(t) => eprintln!("raw client converged {t:?} after the writer stopped"),
        Err(e) => problems.push(format!("raw client: {e:#}")),
    }
    eprintln!(
        "raw client: the first stream {} ({} reopen(s), {} failed open attempt(s), last end: {:?})",
        if raw.reconnects() == 0 {
            "survived both restarts"
        } else {
            "dropped"
        },
        raw.reconnects(),
        raw.open_failures.load(Ordering::Relaxed),
        raw.last_end.lock().unwrap()
    );
    match node_converges(&mut node, &db, "u1", converge_timeout).await {
        Ok(t) => eprintln!("node client converged {t:?} after the writer stopped"),
        Err(e) => problems.push(format!("node client: {e:#}")),
    }
    let status = node.call(json!({"cmd": "status"}))?;
    if status["checksum_failures"] != json!(0) {
        problems.push(format!("node client had checksum failures: {status}"));
    }
    if !svc.alive() {
        problems.push("the service exited".into());
    }
    match readiness(&svc.url()).await {
        Ok((200, body)) if body["storage"]["ok"] == json!(true) && body["replication"]["state"] == json!("streaming") => {}
        Ok((status, body)) => problems.push(format!("readiness after recovery: {status} {body}")),
        Err(e) => problems.push(format!("readiness after recovery: {e:#}")),
    }
    if !problems.is_empty() {
        bail!(
            "{}\n--- service log since the writer started ---\n{}",
            problems.join("\n"),
            svc.log_since(log_mark)
        );
    }
    Ok(())
}

/// Sleep for `dur`, checking every 100 ms that the service process is still running.
pub async fn watch_alive(svc: &mut Service, dur: Duration, problems: &mut Vec<String>) {
    let until = Instant::now() + dur;
    loop {
        if !svc.alive() {
            let msg = "the service process exited".to_string();
            if !problems.contains(&msg) {
                problems.push(msg);
            }
            return;
        }
        if Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Open a new sync stream and return its status, how long the answer took and the body
/// (an error body in full; a 2xx body is not read, it would stream forever).
pub async fn probe_new_stream(url: &str) -> Result<(u16, Duration, String)> {
    let started = Instant::now();
    let send = reqwest::Client::new()
        .post(format!("{url}/sync/stream"))
        .header("Authorization", format!("Token {}", token("u9")))
        .header("Accept", "application/x-ndjson")
        .json(&json!({"buckets": []}))
        .send();
    let response = tokio::time::timeout(REFUSE_WITHIN, send)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {REFUSE_WITHIN:?} (the request hangs)"))??;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let body = if status < 300 {
        String::new()
    } else {
        let text = tokio::time::timeout(REFUSE_WITHIN, response.text())
            .await
            .unwrap_or(Ok(String::new()))?;
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => format!("code {} ({text})", v["error"]["code"]),
            Err(_) => text,
        }
    };
    Ok((status, elapsed, body))
}

/// Insert and update u1's todos (and move some to u2 and back) until `stop`; errors while
/// Postgres is down are counted, and the connection is re-established.
async fn write_u1_todos(conn: String, stop: Arc<AtomicBool>, writes: Arc<AtomicU64>, errors: Arc<AtomicU64>) {
    let mut db = connect_retrying(&conn).await;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let sql = match i % 4 {
            0 | 1 => format!(
                "INSERT INTO todos (description, owner_id, list_id) SELECT 'w{i}', 'u1', id FROM lists ORDER BY id LIMIT 1"
            ),
            2 => format!(
                "UPDATE todos SET description = 'edit {i}' WHERE id = (SELECT id FROM todos WHERE owner_id = 'u1' ORDER BY random() LIMIT 1)"
            ),
            _ => "UPDATE todos SET owner_id = CASE owner_id WHEN 'u1' THEN 'u2' ELSE 'u1' END \
                  WHERE id = (SELECT id FROM todos ORDER BY random() LIMIT 1)"
                .to_string(),
        };
        match tokio::time::timeout(Duration::from_secs(5), db.batch_execute(&sql)).await {
            Ok(Ok(())) => {
                writes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                if db.is_closed() {
                    db = connect_retrying(&conn).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `/probes/readiness`: its status and body (which says what is degraded).
pub async fn readiness(url: &str) -> Result<(u16, Value)> {
    let response = reqwest::Client::new()
        .get(format!("{url}/probes/readiness"))
        .timeout(REFUSE_WITHIN)
        .send()
        .await?;
    Ok((response.status().as_u16(), response.json().await?))
}
