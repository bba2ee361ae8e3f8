//! `ferrosync-bench`: first measurements through the public protocol only.
//!
//! Sets up its own Postgres (fsync on) with the sample todo schema at a chosen scale, starts a
//! ferrosync binary, and measures initial snapshot rows/s, one client's download ops/s, and
//! commit-to-client latency. Prints a table and appends it to bench/RESULTS.md.
//!
//! Usage: ferrosync-bench [--rows N] [--latency-samples N] [--bin target/release/ferrosync]

use anyhow::{bail, Context, Result};
use ferrosync_testkit::{free_port, PgCluster, PgOptions};
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCHEMA: &str = include_str!("../../../examples/todo/schema.sql");
const RULES: &str = include_str!("../../../examples/todo/sync-rules.yaml");
const SECRET: &str = "bench-secret";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() -> Result<()> {
    let rows: i64 = arg("--rows", "200000").parse()?;
    let samples: usize = arg("--latency-samples", "100").parse()?;
    let bin = arg("--bin", "target/release/ferrosync");
    let users = 1000;
    let cluster = PgCluster::start(PgOptions {
        fsync: true,
        ..PgOptions::default()
    })?;
    cluster.create_database("todo").await?;
    cluster.create_database("storage").await?;
    let db = cluster.connect("todo").await?;
    db.batch_execute(SCHEMA).await?;
    db.batch_execute(&format!(
        "INSERT INTO lists (id, name, owner_id) SELECT gen_random_uuid(), 'list ' || g, 'u' || g FROM generate_series(1, 1000) g;
         INSERT INTO todos (description, owner_id, list_id)
         SELECT 'todo number ' || g, 'u' || (g % {users}), (SELECT id FROM lists LIMIT 1) FROM generate_series(1, {rows}) g;"
    ))
    .await?;
    let dir = tempfile_dir()?;
    let port = free_port()?;
    let k = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, SECRET);
    std::fs::write(format!("{dir}/sync-rules.yaml"), RULES)?;
    std::fs::write(
        format!("{dir}/powersync.yaml"),
        format!(
            "replication:\n  connections:\n    - type: postgresql\n      uri: {}\n      sslmode: disable\nstorage:\n  type: postgresql\n  uri: {}\n  sslmode: disable\nport: {port}\nbind_address: 127.0.0.1\nsync_config:\n  path: sync-rules.yaml\nclient_auth:\n  audience: [bench]\n  jwks:\n    keys:\n      - {{kty: oct, alg: HS256, kid: k1, k: {k}}}\n",
            cluster.uri("todo"),
            cluster.uri("storage")
        ),
    )?;
    let total_rows = rows + 1000;
    let started = Instant::now();
    let mut child = Command::new(&bin)
        .args(["serve", "--config", &format!("{dir}/powersync.yaml")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin} (build it with cargo build --release -p ferrosync)"))?;
    let storage = cluster.connect("storage").await?;
    loop {
        let active = storage
            .query_opt("SELECT 1 FROM ferrosync.sync_rules WHERE state = 'ACTIVE'", &[])
            .await
            .ok()
            .flatten();
        if active.is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("snapshot did not finish");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot_secs = started.elapsed().as_secs_f64();

    // Download: user u1 has rows/users todos plus 1000 lists.
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    let mut stream = open(&url, "u1").await?;
    let mut ops = 0usize;
    let mut bytes = 0usize;
    let mut buf = Vec::new();
    loop {
        let line = next_line(&mut stream, &mut buf, &mut bytes).await?;
        if let Some(d) = line.get("data") {
            ops += d["data"].as_array().map_or(0, Vec::len);
        }
        if line.get("checkpoint_complete").is_some() {
            break;
        }
    }
    let download_secs = t0.elapsed().as_secs_f64();

    // Commit -> client latency, one insert at a time.
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let marker = format!("latency {i}");
        let t = Instant::now();
        db.execute(
            "INSERT INTO todos (description, owner_id, list_id) SELECT $1, 'u1', id FROM lists LIMIT 1",
            &[&marker],
        )
        .await?;
        loop {
            let line = next_line(&mut stream, &mut buf, &mut bytes).await?;
            if line.get("data").is_some() && line.to_string().contains(&marker) {
                break;
            }
        }
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let _ = child.kill();
    let _ = child.wait();

    let table = format!(
        "| metric | value |\n|---|---|\n| initial snapshot, {total_rows} rows (start -> ACTIVE, incl. boot) | {:.2} s = {:.0} rows/s |\n| download to one client, {ops} ops (NDJSON) | {:.2} s = {:.0} ops/s, {:.0} B/op |\n| commit -> client latency, {samples} single-row inserts | p50 {:.1} ms, p99 {:.1} ms |\n",
        snapshot_secs,
        total_rows as f64 / snapshot_secs,
        download_secs,
        ops as f64 / download_secs,
        bytes as f64 / ops.max(1) as f64,
        pct(0.5),
        pct(0.99),
    );
    println!("{table}");
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open("bench/RESULTS.md")?;
    writeln!(
        f,
        "\n## {date} — {} cores, {cpu}; Postgres fsync on, service + Postgres + client on one machine\n\n{table}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    )?;
    Ok(())
}

fn tempfile_dir() -> Result<String> {
    let dir = std::env::temp_dir().join(format!("ferrosync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.display().to_string())
}

fn token(sub: &str) -> Result<String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let claims = json!({"sub": sub, "aud": "bench", "iat": now, "exp": now + 3600});
    Ok(jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?)
}

async fn open(url: &str, user: &str) -> Result<reqwest::Response> {
    let resp = reqwest::Client::new()
        .post(format!("{url}/sync/stream"))
        .header("Authorization", format!("Token {}", token(user)?))
        .header("Accept", "application/x-ndjson")
        .json(&json!({"buckets": []}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("sync stream failed: {}", resp.status());
    }
    Ok(resp)
}

async fn next_line(resp: &mut reqwest::Response, buf: &mut Vec<u8>, bytes: &mut usize) -> Result<Value> {
    loop {
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            return Ok(serde_json::from_slice(&line[..pos])?);
        }
        let chunk = tokio::time::timeout(Duration::from_secs(60), resp.chunk())
            .await
            .context("no sync line within 60 s")??
            .context("stream ended")?;
        *bytes += chunk.len();
        buf.extend_from_slice(&chunk);
    }
}
