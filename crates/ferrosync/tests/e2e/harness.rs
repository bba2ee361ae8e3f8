//! What the end-to-end tests share: a service under test (throwaway Postgres + the real
//! binary), tokens, a raw protocol client that checks every checksum, and the Node SDK agent.

use anyhow::{bail, Context, Result};
use ferrosync_testkit::{free_port, ConnTls, PgCluster, PgOptions, ServerTls};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const SCHEMA: &str = include_str!("../../../../examples/todo/schema.sql");
pub const RULES: &str = include_str!("../../../../examples/todo/sync-rules.yaml");
pub const SECRET: &str = "e2e-test-secret";

pub struct Service {
    pub cluster: PgCluster,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
}

impl Service {
    pub async fn new() -> Result<Service> {
        Self::with_tls(None, "127.0.0.1", &ConnTls::default()).await
    }

    /// A service whose cluster presents `server_tls` (TCP only over TLS) when given; the config
    /// reaches the cluster as `host` (e.g. `localhost`, to match a certificate) with `conn` on
    /// both the source and the storage connection.
    pub async fn with_tls(server_tls: Option<ServerTls>, host: &str, conn: &ConnTls<'_>) -> Result<Service> {
        let cluster = match server_tls {
            Some(tls) => PgCluster::start_tls(PgOptions::default(), tls)?,
            None => PgCluster::start(PgOptions::default())?,
        };
        Self::on_cluster(cluster, host, conn, SCHEMA, RULES).await
    }

    /// A service for another app than the todo app: `schema` is run on the source database
    /// (still named `todo`; it must create the `powersync` publication) and `rules` is the sync
    /// config.
    pub async fn with_app(schema: &str, rules: &str) -> Result<Service> {
        let cluster = PgCluster::start(PgOptions::default())?;
        Self::on_cluster(cluster, "127.0.0.1", &ConnTls::default(), schema, rules).await
    }

    async fn on_cluster(cluster: PgCluster, host: &str, conn: &ConnTls<'_>, schema: &str, rules: &str) -> Result<Service> {
        cluster.create_database("todo").await?;
        cluster.create_database("storage").await?;
        cluster.connect("todo").await?.batch_execute(schema).await?;
        let (dir, port) = service_dir(&cluster, host, conn, rules)?;
        Ok(Service {
            cluster,
            dir,
            port,
            child: None,
        })
    }

    /// Point the config's source and storage connections at `127.0.0.1:port` (e.g. a proxy in
    /// front of the cluster) instead of the cluster itself; call before starting.
    pub fn via_port(&self, port: u16) -> Result<()> {
        let path = self.dir.path().join("powersync.yaml");
        let mut config = std::fs::read_to_string(&path)?;
        let (from, to) = (format!(":{}/", self.cluster.port()), format!(":{port}/"));
        for db in ["todo", "storage"] {
            let uri = self.cluster.uri(db);
            if !config.contains(&uri) {
                bail!("the config does not name {uri}: {config}");
            }
            config = config.replace(&uri, &uri.replace(&from, &to));
        }
        std::fs::write(path, config)?;
        Ok(())
    }

    /// Add `api.parameters` (YAML lines, e.g. `max_buckets_per_connection: 3`) to the config;
    /// call before starting, on a service whose config has no `api` section yet.
    pub fn api_parameters(&self, parameters: &[&str]) -> Result<()> {
        let path = self.dir.path().join("powersync.yaml");
        let mut config = std::fs::read_to_string(&path)?;
        if config.lines().any(|l| l.starts_with("api:")) {
            bail!("the config already has an api section: {config}");
        }
        config.push_str("api:\n  parameters:\n");
        for p in parameters {
            config.push_str(&format!("    {p}\n"));
        }
        std::fs::write(path, config)?;
        Ok(())
    }

    /// Add `storage.compaction` keys (YAML lines, e.g. `interval_seconds: 1`); call before starting.
    pub fn storage_compaction(&self, keys: &[&str]) -> Result<()> {
        let path = self.dir.path().join("powersync.yaml");
        let config = std::fs::read_to_string(&path)?;
        let section = "storage:\n  type: postgresql\n";
        if !config.contains(section) {
            bail!("no storage section in {config}");
        }
        let lines: String = keys.iter().map(|k| format!("    {k}\n")).collect();
        std::fs::write(path, config.replace(section, &format!("{section}  compaction:\n{lines}")))?;
        Ok(())
    }

    /// Start the binary and wait until it answers HTTP.
    pub async fn start(&mut self) -> Result<()> {
        self.spawn()?;
        let result = wait_started(&self.url(), self.dir.path(), &mut self.child).await;
        result
    }

    /// Start the binary (stderr goes to [`Service::log`]) without waiting for anything.
    pub fn spawn(&mut self) -> Result<()> {
        self.child = Some(spawn_service(self.dir.path())?);
        Ok(())
    }

    /// Wait up to `timeout` for the process to exit on its own; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("not started")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Another process of the same service (same source, storage and rules) on its own port.
    pub fn peer(&self) -> Result<Peer> {
        let dir = tempfile::tempdir()?;
        std::fs::copy(self.dir.path().join("sync-rules.yaml"), dir.path().join("sync-rules.yaml"))?;
        let port = free_port()?;
        let config = std::fs::read_to_string(self.dir.path().join("powersync.yaml"))?;
        let config = config.replace(&format!("\nport: {}\n", self.port), &format!("\nport: {port}\n"));
        std::fs::write(dir.path().join("powersync.yaml"), config)?;
        Ok(Peer { dir, port, child: None })
    }

    /// Whether the process is running: `false` once it exited (or was never started).
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Length of the log so far, to read what a later process wrote with [`log_since`](Self::log_since).
    pub fn log_len(&self) -> usize {
        self.log().len()
    }

    pub fn log_since(&self, offset: usize) -> String {
        self.log().get(offset..).unwrap_or_default().to_string()
    }

    /// kill -9: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn terminate(&mut self) -> Result<()> {
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

    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn source(&self) -> Result<tokio_postgres::Client> {
        self.cluster.connect("todo").await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A second service process sharing a [`Service`]'s cluster (see [`Service::peer`]).
pub struct Peer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
}

impl Peer {
    pub async fn start(&mut self) -> Result<()> {
        self.child = Some(spawn_service(self.dir.path())?);
        let result = wait_started(&self.url(), self.dir.path(), &mut self.child).await;
        result
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The service log in `dir` (plain text: the service writes no colour codes to a file).
pub fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("ferrosync.log")).unwrap_or_default()
}

/// A directory with `rules` and a config for `cluster` (reached as `host`, with `conn`'s TLS
/// settings) on a free port.
fn service_dir(cluster: &PgCluster, host: &str, conn: &ConnTls<'_>, rules: &str) -> Result<(tempfile::TempDir, u16)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("sync-rules.yaml"), rules)?;
    let port = free_port()?;
    let config = ferrosync_testkit::ServiceConfig {
        source_uri: cluster.uri_on(host, "todo"),
        storage_uri: cluster.uri_on(host, "storage"),
        port,
        bind_address: Some("127.0.0.1"),
        rules_path: "sync-rules.yaml",
        audience: "test-aud",
        kid: "k1",
        secret: SECRET,
        max_connections: None,
    }
    .to_yaml_with(conn);
    std::fs::write(dir.path().join("powersync.yaml"), config)?;
    Ok((dir, port))
}

/// Run the binary on the config in `dir`, logging to `dir/ferrosync.log` (appended), with `dir`
/// as its working directory (where the file probes go).
fn spawn_service(dir: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ferrosync.log"))?;
    Ok(Command::new(env!("CARGO_BIN_EXE_ferrosync"))
        .args(["serve", "--config"])
        .arg(dir.join("powersync.yaml"))
        .env("RUST_LOG", "info")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

/// Wait until the process at `url` answers its liveness probe; fails at once if it exits.
async fn wait_started(url: &str, dir: &Path, child: &mut Option<Child>) -> Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + T;
    while client.get(format!("{url}/probes/liveness")).send().await.is_err() {
        if let Some(status) = child.as_mut().context("not started")?.try_wait()? {
            *child = None;
            bail!("server exited ({status}) instead of starting: {}", read_log(dir));
        }
        if Instant::now() > deadline {
            bail!("server did not start: {}", read_log(dir));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub fn token_with(claims: Value, kid: &str, secret: &str) -> String {
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("encode token")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

pub fn token(sub: &str) -> String {
    token_with_claims(sub, json!({}))
}

/// A valid token for `sub` that also carries `extra` (an object) as top-level claims, which sync
/// streams read with `auth.parameter('<claim>')`.
pub fn token_with_claims(sub: &str, extra: Value) -> String {
    let mut claims = json!({"sub": sub, "aud": "test-aud", "iat": now(), "exp": now() + 3600});
    if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        claims.extend(extra.clone());
    }
    token_with(claims, "k1", SECRET)
}

/// What a client holds after applying sync lines: per bucket, row key -> (op_id, data), and
/// the checksum of everything received.
#[derive(Default, Debug)]
pub struct ClientState {
    pub buckets: BTreeMap<String, BucketState>,
    pub checkpoint: Option<Value>,
    pub complete: bool,
}

#[derive(Default, Debug)]
pub struct BucketState {
    pub rows: HashMap<String, (i64, Option<String>, String, String)>,
    pub checksum: u32,
    pub last_op: i64,
}

impl ClientState {
    pub fn apply(&mut self, line: &Value) -> Result<()> {
        if let Some(cp) = line.get("checkpoint") {
            // A full checkpoint lists every bucket the client keeps; the rest are dropped.
            let listed: Vec<&str> = cp["buckets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b["bucket"].as_str())
                .collect();
            self.buckets.retain(|name, _| listed.contains(&name.as_str()));
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
                    Some("MOVE") => {}
                    Some("CLEAR") => {
                        bucket.rows.clear();
                        bucket.checksum = op["checksum"].as_i64().context("checksum")? as u32;
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
    pub fn table(&self, table: &str) -> BTreeMap<String, Value> {
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

    /// Positions to reopen a stream from at any moment: the checkpoint when it completed,
    /// otherwise each bucket's last received op (a dropped stream may end mid-checkpoint).
    pub fn resume_positions(&self) -> Vec<Value> {
        if self.complete {
            return self.positions();
        }
        self.buckets
            .iter()
            .map(|(name, b)| json!({"name": name, "after": b.last_op.to_string()}))
            .collect()
    }

    pub fn positions(&self) -> Vec<Value> {
        let last = self.checkpoint.as_ref().map(|c| c["last_op_id"].clone()).unwrap_or(json!("0"));
        self.buckets.keys().map(|b| json!({"name": b, "after": last})).collect()
    }
}

/// A raw HTTP sync stream, read line by line.
pub struct RawStream {
    pub response: reqwest::Response,
    pub buf: Vec<u8>,
}

impl RawStream {
    pub async fn open(url: &str, token: &str, body: Value) -> Result<RawStream> {
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

    pub async fn next_line(&mut self, timeout: Duration) -> Result<Value> {
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
    pub async fn sync_until(&mut self, state: &mut ClientState, timeout: Duration, done: impl Fn(&ClientState) -> bool) -> Result<()> {
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

pub async fn source_todos(db: &tokio_postgres::Client, owner: &str) -> Result<BTreeMap<String, String>> {
    let rows = db
        .query("SELECT id::text, description FROM todos WHERE owner_id = $1", &[&owner])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

pub fn client_todos(state: &ClientState) -> BTreeMap<String, String> {
    state
        .table("todos")
        .into_iter()
        .map(|(id, v)| (id, v["description"].as_str().unwrap_or_default().to_string()))
        .collect()
}

pub async fn seed(db: &tokio_postgres::Client, lists: usize, todos_per_user: usize, users: &[&str]) -> Result<()> {
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

pub const T: Duration = Duration::from_secs(60);

/// The real PowerSync Node SDK, driven through `clients/node-agent`.
pub struct NodeAgent {
    pub child: Child,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
    pub next_id: u64,
}

pub fn agent_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/node-agent")
}

impl NodeAgent {
    pub fn start() -> Result<NodeAgent> {
        Self::start_script(&agent_dir(), "agent.mjs")
    }

    /// Any agent speaking the same line protocol: `script` in the Node package at `dir`.
    pub fn start_script(dir: &Path, script: &str) -> Result<NodeAgent> {
        if !dir.join("node_modules").exists() {
            bail!(
                "{}/node_modules is missing: run `npm ci` there (the README's test command does)",
                dir.display()
            );
        }
        let mut child = Command::new("node")
            .arg(dir.join(script))
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

    pub fn call(&mut self, mut cmd: Value) -> Result<Value> {
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

    pub fn todos(&mut self) -> Result<BTreeMap<String, String>> {
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

pub async fn eventually_equal(agent: &mut NodeAgent, db: &tokio_postgres::Client, user: &str) -> Result<()> {
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
