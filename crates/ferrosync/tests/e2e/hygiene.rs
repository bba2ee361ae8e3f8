//! Storage hygiene (issue 10) with real clients: heavy churn of parameter rows and of data,
//! and many users requesting write checkpoints, while background passes run every second.
//! Afterwards parameter history and write checkpoints are down to what live data needs, and
//! clients (live, fresh, and one reconnecting with positions from before the churn) still
//! sync the right buckets and rows with every checksum right. And `ferrosync storage stats`.

use crate::harness::*;
use crate::live::*;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

const MEMBERSHIPS: &str = "
CREATE TABLE memberships (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id text NOT NULL, list_id uuid NOT NULL);";
const SHARED: &str = "
  shared_lists:
    parameters: SELECT list_id FROM memberships WHERE user_id = request.user_id()
    data:
      - SELECT * FROM lists WHERE id = bucket.list_id
";
const LISTS: usize = 4;
const MEMBERS: usize = 20;
const ROUNDS: usize = 30;
const WRITERS: usize = 40;

async fn storage_count(svc: &Service, table: &str) -> Result<i64> {
    let storage = svc.cluster.connect("storage").await?;
    Ok(storage
        .query_one(&format!("SELECT count(*) FROM ferrosync.{table}"), &[])
        .await?
        .get(0))
}

/// Wait until `table` holds `expected` rows; returns the count.
async fn settles_at(svc: &Service, table: &str, expected: i64) -> Result<i64> {
    let started = Instant::now();
    loop {
        let n = storage_count(svc, table).await?;
        if n == expected {
            return Ok(n);
        }
        if started.elapsed() > T {
            bail!("{table} still holds {n} rows (live data needs {expected}); log:\n{}", svc.log());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// [`deleted`] once it reaches `min` (a pass logs its line just after its deletions commit, so
/// the rows can be gone a moment before the line is written).
async fn deleted_at_least(svc: &Service, field: &str, min: i64) -> i64 {
    let started = Instant::now();
    loop {
        let n = deleted(svc, field);
        if n >= min || started.elapsed() > T {
            return n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The sum of `field=N` over the service's hygiene log lines: rows its passes deleted.
fn deleted(svc: &Service, field: &str) -> i64 {
    let prefix = format!("{field}=");
    svc.log()
        .lines()
        .filter(|l| l.contains("storage hygiene pass deleted rows"))
        .flat_map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.strip_prefix(prefix.as_str())?.parse::<i64>().ok())
        })
        .sum()
}

async fn legacy_write_checkpoint(url: &str, user: &str) -> Result<i64> {
    let wc: Value = reqwest::Client::new()
        .get(format!("{url}/write-checkpoint2.json?client_id=c"))
        .header("Authorization", format!("Token {}", token(user)))
        .send()
        .await?
        .json()
        .await?;
    Ok(wc["data"]["write_checkpoint"].as_str().context("write_checkpoint")?.parse()?)
}

/// The lists u1 is a member of now, and the shared buckets a client announced.
async fn member_lists(db: &tokio_postgres::Client) -> Result<BTreeSet<String>> {
    let rows = db
        .query("SELECT DISTINCT list_id::text FROM memberships WHERE user_id = 'u1'", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

fn shared_buckets(state: &ClientState) -> BTreeSet<String> {
    let buckets = state
        .checkpoint
        .as_ref()
        .and_then(|c| c["buckets"].as_array().cloned())
        .unwrap_or_default();
    buckets
        .iter()
        .filter_map(|b| b["bucket"].as_str())
        .filter_map(|b| {
            b.split_once("shared_lists[\"")
                .map(|(_, rest)| rest.trim_end_matches("\"]").to_string())
        })
        .collect()
}

/// Sync `state` until complete with u1's current memberships and todos.
async fn converges(raw: &mut RawStream, state: &mut ClientState, db: &tokio_postgres::Client) -> Result<()> {
    let (lists, todos) = (member_lists(db).await?, source_todos(db, "u1").await?);
    raw.sync_until(state, T, |s| shared_buckets(s) == lists && client_todos(s) == todos)
        .await
}

async fn churn(db: &tokio_postgres::Client, lists: &[String]) -> Result<()> {
    let todos: Vec<String> = db
        .query("SELECT id::text FROM todos WHERE owner_id = 'u1'", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for round in 0..ROUNDS {
        // Every membership moves to another list; one comes and goes (a tombstone).
        db.execute(
            "UPDATE memberships SET list_id = ($1::text[])[1 + ((hashtext(id::text) & 1023) + $2::int) % $3::int]::uuid",
            &[&lists, &(round as i32), &(lists.len() as i32)],
        )
        .await?;
        db.execute(
            "INSERT INTO memberships (user_id, list_id) VALUES ('passing', $1::text::uuid)",
            &[&lists[round % lists.len()]],
        )
        .await?;
        db.execute("DELETE FROM memberships WHERE user_id = 'passing'", &[]).await?;
        db.execute(
            "UPDATE todos SET description = 'round ' || $1::int WHERE id::text = $2",
            &[&(round as i32), &todos[round % todos.len()]],
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_stays_bounded_by_live_data_through_churn() -> Result<()> {
    let mut svc = Service::with_app(&format!("{SCHEMA}{MEMBERSHIPS}"), &format!("{RULES}{SHARED}")).await?;
    let db = svc.source().await?;
    seed(&db, LISTS, 20, &["u1"]).await?;
    let lists: Vec<String> = db
        .query("SELECT id::text FROM lists ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.execute(
        "INSERT INTO memberships (user_id, list_id)
         SELECT 'm' || g, ($1::text[])[1 + g % 4]::uuid FROM generate_series(1, $2::int) g, generate_series(1, 2)
         UNION ALL SELECT 'u1', ($1::text[])[g]::uuid FROM generate_series(1, 2) g",
        &[&lists, &(MEMBERS as i32)],
    )
    .await?;
    let live_memberships = (MEMBERS * 2 + 2) as i64;
    svc.storage_compaction(&["interval_seconds: 1", "pause_ms: 0", "write_checkpoint_retention_minutes: 0"])?;
    svc.start().await?;

    // A client that goes away before the churn and comes back after it, and one that stays.
    let mut old = ClientState::default();
    let mut raw = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": [], "client_id": "old"})).await?;
    converges(&mut raw, &mut old, &db).await?;
    drop(raw);
    let mut live = node_client(svc.dir.path(), &svc.url(), "u1", &svc.cluster.uri("todo"))?;
    node_converges(&mut live, &db, "u1", T).await?;

    churn(&db, &lists).await?;
    let mut first_ids = Vec::new();
    for w in 0..WRITERS {
        let user = format!("w{w}");
        legacy_write_checkpoint(&svc.url(), &user).await?;
        first_ids.push(legacy_write_checkpoint(&svc.url(), &user).await?);
    }
    assert!(first_ids.iter().all(|id| *id >= 2), "{first_ids:?}");
    node_converges(&mut live, &db, "u1", T).await?;

    // Every membership got a new version each round, the passing one a row and a tombstone;
    // pruned down to one version per live membership.
    let params = settles_at(&svc, "bucket_parameters", live_memberships).await?;
    let pruned = deleted_at_least(&svc, "parameter_rows", ROUNDS as i64 * (live_memberships + 2)).await;
    eprintln!(
        "bucket_parameters: {} versions written, {pruned} pruned, {params} kept for {live_memberships} live rows",
        pruned + params
    );
    assert!(pruned >= ROUNDS as i64 * (live_memberships + 2), "pruned {pruned}");
    // Retention 0: every write checkpoint the served checkpoint passed goes.
    settles_at(&svc, "write_checkpoints", 0).await?;
    // At least one row per user (two when a pass ran between a user's two requests).
    assert!(
        deleted_at_least(&svc, "write_checkpoints", WRITERS as i64).await >= WRITERS as i64,
        "{}",
        svc.log()
    );
    // Ids stay monotone for a user whose row was pruned.
    let again = legacy_write_checkpoint(&svc.url(), "w0").await?;
    assert!(again > first_ids[0], "after pruning w0 got {again}, before {}", first_ids[0]);

    // The client from before the churn resumes from its old positions; a fresh one starts over.
    let mut raw = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": old.positions(), "client_id": "old"})).await?;
    converges(&mut raw, &mut old, &db).await?;
    let mut fresh = ClientState::default();
    let mut raw = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": [], "client_id": "fresh"})).await?;
    converges(&mut raw, &mut fresh, &db).await?;
    // Parameter changes after pruning still move clients between buckets.
    db.execute("UPDATE memberships SET list_id = $1::text::uuid WHERE user_id = 'u1'", &[&lists[3]])
        .await?;
    converges(&mut raw, &mut fresh, &db).await?;
    assert_eq!(shared_buckets(&fresh).len(), 1);
    node_converges(&mut live, &db, "u1", T).await?;
    let status = live.call(json!({"cmd": "status"}))?;
    assert_eq!(status["checksum_failures"], json!(0), "{status}");
    Ok(())
}

fn stats_cli(svc: &Service, extra: &[&str]) -> Result<String> {
    let config = svc.dir.path().join("powersync.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrosync"))
        .args(["storage", "stats", "--config"])
        .arg(&config)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()?;
    if !out.status.success() {
        bail!("storage stats failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_stats_reports_tables_versions_and_largest_buckets() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 2, 30, &["u1", "u2"]).await?;
    svc.start().await?;
    let mut state = ClientState::default();
    let mut raw = RawStream::open(&svc.url(), &token("u1"), json!({"buckets": []})).await?;
    let expected = source_todos(&db, "u1").await?;
    raw.sync_until(&mut state, T, |s| client_todos(s) == expected).await?;
    // Replicated after the snapshot: one more op per u1 todo.
    db.execute("UPDATE todos SET description = 'again' WHERE owner_id = 'u1'", &[])
        .await?;
    let expected = source_todos(&db, "u1").await?;
    raw.sync_until(&mut state, T, |s| client_todos(s) == expected).await?;

    let stats: Value = serde_json::from_str(&stats_cli(&svc, &["--json", "--top", "2"])?)?;
    let table = |name: &str| {
        stats["tables"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["name"] == name).cloned())
            .with_context(|| format!("no table {name} in {stats}"))
    };
    let chunks = table("op_chunks")?;
    assert!(chunks["total_bytes"].as_i64() > Some(0), "{chunks}");
    assert_eq!(
        chunks["total_bytes"].as_i64(),
        Some(
            ["heap_bytes", "toast_bytes", "index_bytes"]
                .iter()
                .map(|k| chunks[k].as_i64().unwrap_or(-1))
                .sum()
        ),
        "{chunks}"
    );
    table("write_checkpoint_floor")?;
    let streams = stats["streams"].as_array().context("streams")?;
    assert_eq!(streams.len(), 1, "{stats}");
    let s = &streams[0];
    assert_eq!(s["state"], "ACTIVE");
    // 2 lists + 60 todos inserted, u1's 30 updated: one op each, nothing compacted yet (the
    // first pass runs after interval_seconds).
    assert_eq!(s["ops"], json!(2 + 60 + 30), "{s}");
    assert_eq!(s["buckets"], json!(3), "global, and one per user: {s}");
    assert_eq!(s["current_data_rows"], json!(62), "{s}");
    assert_eq!(s["parameter_rows"], json!(0), "{s}");
    assert!(s["op_bytes"].as_i64() > Some(0), "{s}");
    assert!(s["last_checkpoint"].as_i64() >= Some(92), "{s}");
    let largest = stats["largest_buckets"].as_array().context("largest_buckets")?;
    assert_eq!(largest.len(), 2, "--top 2: {stats}");
    assert_eq!(largest[0]["definition"], "user_todos", "u1's bucket has the most ops: {stats}");
    assert!(largest[0]["bucket"].as_str().is_some_and(|b| b.contains("u1")), "{stats}");
    assert_eq!(largest[0]["ops"], json!(60));
    assert!(largest[0]["bytes"].as_i64() >= largest[1]["bytes"].as_i64(), "{stats}");

    let text = stats_cli(&svc, &[])?;
    for heading in ["Storage tables", "Sync-config versions", "Largest buckets"] {
        assert!(text.contains(heading), "{text}");
    }
    let version = text.lines().find(|l| l.contains("ACTIVE")).with_context(|| text.clone())?;
    assert!(version.contains(" 92 "), "op count on the version line: {version}");
    let bucket = text
        .lines()
        .find(|l| l.contains("user_todos") && l.contains("u1"))
        .with_context(|| text.clone())?;
    assert!(bucket.contains(" 60 "), "{bucket}");
    Ok(())
}
