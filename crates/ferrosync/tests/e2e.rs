//! End-to-end tests: a throwaway Postgres, the real `ferrosync` binary, and clients speaking
//! the protocol (a raw HTTP client that checks every checksum, and the real PowerSync Node SDK).

use anyhow::{bail, Context, Result};
use ferrosync_testkit::{free_port, PgCluster, PgOptions};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const SCHEMA: &str = include_str!("../../../examples/todo/schema.sql");
const RULES: &str = include_str!("../../../examples/todo/sync-rules.yaml");
const SECRET: &str = "e2e-test-secret";

struct Service {
    cluster: PgCluster,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Service {
    async fn new() -> Result<Service> {
        let cluster = PgCluster::start(PgOptions::default())?;
        cluster.create_database("todo").await?;
        cluster.create_database("storage").await?;
        cluster.connect("todo").await?.batch_execute(SCHEMA).await?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("sync-rules.yaml"), RULES)?;
        let port = free_port()?;
        let config = ferrosync_testkit::ServiceConfig {
            source_uri: cluster.uri("todo"),
            storage_uri: cluster.uri("storage"),
            port,
            bind_address: Some("127.0.0.1"),
            rules_path: "sync-rules.yaml",
            audience: "test-aud",
            kid: "k1",
            secret: SECRET,
            max_connections: None,
        }
        .to_yaml();
        std::fs::write(dir.path().join("powersync.yaml"), config)?;
        Ok(Service {
            cluster,
            dir,
            port,
            child: None,
        })
    }

    /// Start the binary and wait until it answers HTTP.
    async fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("ferrosync.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_ferrosync"))
            .args(["serve", "--config"])
            .arg(self.dir.path().join("powersync.yaml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + T;
        while client.get(format!("{}/probes/liveness", self.url())).send().await.is_err() {
            if Instant::now() > deadline {
                bail!("server did not start: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// kill -9: no shutdown code runs.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    fn terminate(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else { return Ok(()) };
        Command::new("kill").args(["-TERM", &c.id().to_string()]).status()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("no exit within 10 s of SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ferrosync.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn source(&self) -> Result<tokio_postgres::Client> {
        self.cluster.connect("todo").await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

fn token_with(claims: Value, kid: &str, secret: &str) -> String {
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("encode token")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn token(sub: &str) -> String {
    token_with(
        json!({"sub": sub, "aud": "test-aud", "iat": now(), "exp": now() + 3600}),
        "k1",
        SECRET,
    )
}

/// What a client holds after applying sync lines: per bucket, row key -> (op_id, data), and
/// the checksum of everything received.
#[derive(Default, Debug)]
struct ClientState {
    buckets: BTreeMap<String, BucketState>,
    checkpoint: Option<Value>,
    complete: bool,
}

#[derive(Default, Debug)]
struct BucketState {
    rows: HashMap<String, (i64, Option<String>, String, String)>,
    checksum: u32,
    last_op: i64,
}

impl ClientState {
    fn apply(&mut self, line: &Value) -> Result<()> {
        if let Some(cp) = line.get("checkpoint") {
            self.checkpoint = Some(cp.clone());
            self.complete = false;
        } else if let Some(diff) = line.get("checkpoint_diff") {
            let cp = self.checkpoint.as_mut().context("diff before checkpoint")?;
            let mut buckets: Vec<Value> = cp["buckets"].as_array().cloned().unwrap_or_default();
            let removed: Vec<&str> = diff["removed_buckets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            buckets.retain(|b| !removed.contains(&b["bucket"].as_str().unwrap_or("")));
            for u in diff["updated_buckets"].as_array().into_iter().flatten() {
                buckets.retain(|b| b["bucket"] != u["bucket"]);
                buckets.push(u.clone());
            }
            for r in removed {
                self.buckets.remove(r);
            }
            cp["buckets"] = Value::Array(buckets);
            cp["last_op_id"] = diff["last_op_id"].clone();
            cp["write_checkpoint"] = diff.get("write_checkpoint").cloned().unwrap_or(Value::Null);
            self.complete = false;
        } else if let Some(data) = line.get("data") {
            let bucket = self
                .buckets
                .entry(data["bucket"].as_str().context("bucket")?.to_string())
                .or_default();
            for op in data["data"].as_array().context("ops")? {
                let op_id: i64 = op["op_id"].as_str().context("op_id is a string")?.parse()?;
                if op_id <= bucket.last_op {
                    bail!("op {op_id} resent (bucket at {})", bucket.last_op);
                }
                bucket.last_op = op_id;
                bucket.checksum = bucket.checksum.wrapping_add(op["checksum"].as_i64().context("checksum")? as u32);
                let key = format!("{}/{}/{}", op["object_type"], op["object_id"], op["subkey"]);
                match op["op"].as_str() {
                    Some("PUT") => {
                        let ty = op["object_type"].as_str().unwrap_or_default().to_string();
                        let id = op["object_id"].as_str().unwrap_or_default().to_string();
                        bucket.rows.insert(key, (op_id, op["data"].as_str().map(str::to_string), ty, id));
                    }
                    Some("REMOVE") => {
                        bucket.rows.remove(&key);
                    }
                    other => bail!("unexpected op {other:?}"),
                }
            }
        } else if line.get("checkpoint_complete").is_some() {
            let cp = self.checkpoint.as_ref().context("complete before checkpoint")?;
            for b in cp["buckets"].as_array().context("buckets")? {
                let name = b["bucket"].as_str().context("name")?;
                let expected = b["checksum"].as_i64().context("checksum")? as u32;
                let actual = self.buckets.get(name).map_or(0, |s| s.checksum);
                if expected != actual {
                    bail!("checksum mismatch for {name}: expected {expected}, got {actual}");
                }
            }
            self.complete = true;
        }
        Ok(())
    }

    /// Rows of `table` the client would show (object_id -> data).
    fn table(&self, table: &str) -> BTreeMap<String, Value> {
        let mut best: BTreeMap<String, (i64, Value)> = BTreeMap::new();
        for b in self.buckets.values() {
            for (op_id, data, ty, id) in b.rows.values() {
                if ty == table {
                    let data: Value = data.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or(Value::Null);
                    if best.get(id).is_none_or(|(o, _)| op_id > o) {
                        best.insert(id.clone(), (*op_id, data));
                    }
                }
            }
        }
        best.into_iter().map(|(k, (_, v))| (k, v)).collect()
    }

    fn positions(&self) -> Vec<Value> {
        let last = self.checkpoint.as_ref().map(|c| c["last_op_id"].clone()).unwrap_or(json!("0"));
        self.buckets.keys().map(|b| json!({"name": b, "after": last})).collect()
    }
}

/// A raw HTTP sync stream, read line by line.
struct RawStream {
    response: reqwest::Response,
    buf: Vec<u8>,
}

impl RawStream {
    async fn open(url: &str, token: &str, body: Value) -> Result<RawStream> {
        let response = reqwest::Client::new()
            .post(format!("{url}/sync/stream"))
            .header("Authorization", format!("Token {token}"))
            .header("Accept", "application/x-ndjson")
            .json(&body)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("status {}: {}", response.status(), response.text().await.unwrap_or_default());
        }
        Ok(RawStream { response, buf: Vec::new() })
    }

    async fn next_line(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(serde_json::from_slice(&line[..pos])?);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .context("timed out waiting for a sync line")??;
            self.buf.extend_from_slice(&chunk.context("stream ended")?);
        }
    }

    /// Apply lines until a checkpoint is complete and `done` holds.
    async fn sync_until(&mut self, state: &mut ClientState, timeout: Duration, done: impl Fn(&ClientState) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.next_line(deadline.saturating_duration_since(Instant::now())).await?;
            state.apply(&line)?;
            if state.complete && done(state) {
                return Ok(());
            }
        }
    }
}

async fn source_todos(db: &tokio_postgres::Client, owner: &str) -> Result<BTreeMap<String, String>> {
    let rows = db
        .query("SELECT id::text, description FROM todos WHERE owner_id = $1", &[&owner])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn client_todos(state: &ClientState) -> BTreeMap<String, String> {
    state
        .table("todos")
        .into_iter()
        .map(|(id, v)| (id, v["description"].as_str().unwrap_or_default().to_string()))
        .collect()
}

async fn seed(db: &tokio_postgres::Client, lists: usize, todos_per_user: usize, users: &[&str]) -> Result<()> {
    db.batch_execute(&format!(
        "INSERT INTO lists (id, name, owner_id) SELECT gen_random_uuid(), 'list ' || g, 'u1' FROM generate_series(1, {lists}) g"
    ))
    .await?;
    for u in users {
        db.execute(
            "INSERT INTO todos (description, owner_id, list_id) SELECT 'todo ' || g, $1, (SELECT id FROM lists LIMIT 1) FROM generate_series(1, $2::int) g",
            &[u, &(todos_per_user as i32)],
        )
        .await?;
    }
    Ok(())
}

const T: Duration = Duration::from_secs(60);

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
            break;
        }
        if Instant::now() > deadline {
            bail!("snapshot never got going: {}", svc.log());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

    for user in ["u1", "u2"] {
        let expected = source_todos(&db, user).await?;
        let mut state = ClientState::default();
        let mut s = RawStream::open(&svc.url(), &token(user), json!({"buckets": []})).await?;
        s.sync_until(&mut state, Duration::from_secs(120), |s| client_todos(s) == expected)
            .await
            .with_context(|| svc.log())?;
    }
    Ok(())
}

/// The real PowerSync Node SDK, driven through `clients/node-agent`.
struct NodeAgent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
}

fn agent_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/node-agent")
}

impl NodeAgent {
    fn start() -> Result<NodeAgent> {
        let dir = agent_dir();
        if !dir.join("node_modules").exists() {
            bail!("clients/node-agent/node_modules is missing: run `npm ci` in clients/node-agent (the README's test command does)");
        }
        let mut child = Command::new("node")
            .arg(dir.join("agent.mjs"))
            .env("FERROSYNC_AGENT_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(NodeAgent {
            child,
            stdin,
            stdout,
            next_id: 0,
        })
    }

    fn call(&mut self, mut cmd: Value) -> Result<Value> {
        self.next_id += 1;
        cmd["id"] = json!(self.next_id);
        writeln!(self.stdin, "{cmd}")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let resp: Value = serde_json::from_str(&line).with_context(|| format!("agent said {line:?}"))?;
        if resp["ok"] != json!(true) {
            bail!("agent command {cmd} failed: {}", resp["error"]);
        }
        Ok(resp["result"].clone())
    }

    fn todos(&mut self) -> Result<BTreeMap<String, String>> {
        let rows = self.call(json!({"cmd": "query", "sql": "SELECT id, description FROM todos"}))?;
        Ok(rows
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["id"].as_str().unwrap_or_default().to_string(),
                    r["description"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn eventually_equal(agent: &mut NodeAgent, db: &tokio_postgres::Client, user: &str) -> Result<()> {
    let deadline = Instant::now() + T;
    loop {
        let expected = source_todos(db, user).await?;
        let got = agent.todos()?;
        if got == expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "client rows differ from source:\n client: {got:?}\n source: {expected:?}\n status: {}",
                agent.call(json!({"cmd": "status"}))?
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powersync_node_client_syncs_todo_app() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 2, 20, &["u1", "u2"]).await?;
    svc.start().await?;
    let mut agent = NodeAgent::start()?;
    agent.call(json!({"cmd": "open", "db_path": svc.dir.path().join("client.sqlite")}))?;
    let connect = json!({"cmd": "connect", "endpoint": svc.url(), "token": token("u1"), "source_url": svc.cluster.uri("todo"), "retry_delay_ms": 200});
    agent.call(connect.clone())?;
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
