//! In-place sync-config deploys: a config that only adds, changes or removes bucket
//! definitions re-reads just the tables those definitions read, builds just their buckets,
//! and leaves every other bucket (ids, ops, op ids) alone, so clients download nothing for it.

use crate::harness::{eventually_equal, seed, source_todos, token, ClientState, NodeAgent, RawStream, Service, RULES, T};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// RULES plus a definition over `todos` (a table RULES reads already).
const TODO_INDEX: &str = "  todo_index:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, description FROM todos AS todo_index WHERE owner_id = bucket.user_id
";

/// Descriptions the writer keeps updating while the deploy is built.
const HOT: [&str; 3] = ["todo 1", "todo 2", "todo 3"];

/// Sync lines applied to a client, with the ops each bucket received since `mark`.
struct Client {
    state: ClientState,
    stream: RawStream,
    /// bucket -> object ids of the ops received since the last `mark`.
    since_mark: BTreeMap<String, Vec<String>>,
}

impl Client {
    async fn open(url: &str, positions: Vec<Value>, state: ClientState) -> Result<Client> {
        let stream = RawStream::open(url, &token("u1"), json!({"buckets": positions, "client_id": "c1"})).await?;
        Ok(Client {
            state,
            stream,
            since_mark: BTreeMap::new(),
        })
    }

    fn mark(&mut self) {
        self.since_mark.clear();
    }

    /// Apply lines until a complete checkpoint satisfies `done`.
    async fn until(&mut self, what: &str, done: impl Fn(&ClientState) -> bool) -> Result<()> {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.stream.next_line(left).await.with_context(|| format!("waiting for {what}"))?;
            if let Some(data) = line.get("data") {
                let bucket = data["bucket"].as_str().unwrap_or_default().to_string();
                let ids = data["data"].as_array().into_iter().flatten();
                let ids = ids.map(|op| op["object_id"].as_str().unwrap_or_default().to_string());
                self.since_mark.entry(bucket).or_default().extend(ids);
            }
            self.state.apply(&line)?;
            if self.state.complete && done(&self.state) {
                return Ok(());
            }
        }
    }

    fn bucket(&self, definition: &str) -> Option<String> {
        self.state.buckets.keys().find(|b| b.contains(&format!("#{definition}["))).cloned()
    }

    fn rows(&self, bucket: &str) -> usize {
        self.state.buckets.get(bucket).map_or(0, |b| b.rows.len())
    }

    fn ops_since_mark(&self, bucket: &str) -> &[String] {
        self.since_mark.get(bucket).map(Vec::as_slice).unwrap_or_default()
    }
}

/// Keeps writing until stopped: updates of the HOT todos of u1 and new lists.
fn start_writer(db: tokio_postgres::Client) -> (Arc<AtomicBool>, Arc<AtomicUsize>, tokio::task::JoinHandle<Result<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicUsize::new(0));
    let (s, w) = (stop.clone(), writes.clone());
    let task = tokio::spawn(async move {
        let mut i = 0u32;
        while !s.load(Ordering::Relaxed) {
            let hot = HOT[i as usize % HOT.len()];
            db.execute(
                "UPDATE todos SET completed = NOT completed WHERE owner_id = 'u1' AND description = $1",
                &[&hot],
            )
            .await?;
            if i.is_multiple_of(5) {
                db.execute("INSERT INTO lists (name, owner_id) VALUES ($1, 'u1')", &[&format!("live {i}")])
                    .await?;
            }
            w.fetch_add(1, Ordering::Relaxed);
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    });
    (stop, writes, task)
}

/// The todo app's tables, plus the one the added definition syncs.
fn node_schema() -> Value {
    let todo = json!({"list_id": "text", "created_at": "text", "completed_at": "text", "description": "text", "completed": "integer", "owner_id": "text"});
    json!({
        "lists": {"created_at": "text", "name": "text", "owner_id": "text"},
        "todos": todo,
        "todo_index": {"description": "text"},
    })
}

fn node_count(agent: &mut NodeAgent, table: &str) -> Result<usize> {
    let rows = agent.call(json!({"cmd": "query", "sql": format!("SELECT count(*) AS n FROM {table}")}))?;
    Ok(rows[0]["n"].as_u64().unwrap_or_default() as usize)
}

async fn u1_todo_ids(db: &tokio_postgres::Client) -> Result<BTreeSet<String>> {
    Ok(source_todos(db, "u1").await?.into_keys().collect())
}

async fn hot_ids(db: &tokio_postgres::Client) -> Result<BTreeSet<String>> {
    let rows = db
        .query(
            "SELECT id::text FROM todos WHERE owner_id = 'u1' AND description = ANY($1)",
            &[&HOT.to_vec()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Wait until the storage holds no op chunks of `bucket`.
async fn storage_drops(svc: &Service, bucket: &str) -> Result<()> {
    let storage = svc.cluster.connect("storage").await?;
    let deadline = Instant::now() + T;
    loop {
        let n: i64 = storage
            .query_one("SELECT count(*) FROM ferrosync.op_chunks WHERE bucket = $1", &[&bucket])
            .await?
            .get(0);
        if n == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{n} op chunks of {bucket} still stored: {}", svc.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tables a service log says were re-read or copied.
fn tables_read(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("re-reading table for the deployed definitions") || l.contains("snapshotting table"))
        .filter_map(|l| l.split("table=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_added_by_a_second_process_builds_only_its_table_while_clients_stay_live() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 3, 300, &["u1", "u2"]).await?;
    svc.start().await?;
    let todos = u1_todo_ids(&db).await?;
    let mut client = Client::open(&svc.url(), Vec::new(), ClientState::default()).await?;
    client.until("the first sync", |s| s.table("todos").len() == todos.len()).await?;
    let global = client.bucket("global").context("global bucket")?;
    let user_todos = client.bucket("user_todos").context("user_todos bucket")?;
    let held: BTreeMap<String, i64> = client.state.buckets.iter().map(|(b, s)| (b.clone(), s.last_op)).collect();
    // The real SDK too, with the new definition's table in its schema from the start.
    let mut agent = NodeAgent::start()?;
    agent.call(json!({"cmd": "open", "db_path": svc.dir.path().join("client.sqlite"), "schema": node_schema()}))?;
    agent.call(json!({"cmd": "connect", "endpoint": svc.url(), "token": token("u1"), "retry_delay_ms": 200}))?;
    agent.call(json!({"cmd": "wait_first_sync", "timeout_ms": 60000}))?;
    eventually_equal(&mut agent, &db, "u1").await?;

    let (stop, writes, writer) = start_writer(svc.source().await?);
    let log_from = svc.log_len();
    client.mark();
    // A second process with the new config: it records the deploy; the first process, which
    // holds the replication lease, builds it and switches without a restart.
    let mut peer = svc.peer()?;
    std::fs::write(peer.dir.path().join("sync-rules.yaml"), format!("{RULES}{TODO_INDEX}"))?;
    peer.start().await?;
    client
        .until("the new definition's bucket", |s| {
            s.buckets
                .keys()
                .any(|b| b.contains("#todo_index[") && s.buckets[b].rows.len() == todos.len())
        })
        .await?;
    stop.store(true, Ordering::Relaxed);
    writer.await??;
    let hot = hot_ids(&db).await?;
    let lists = db.query_one("SELECT count(*) FROM lists", &[]).await?.get::<_, i64>(0) as usize;
    client.until("the writes", |s| s.table("lists").len() == lists).await?;

    let index = client.bucket("todo_index").context("todo_index bucket")?;
    assert_eq!(client.rows(&index), todos.len());
    // Unchanged definitions kept their buckets, and got only the live writes' ops.
    assert_eq!(client.bucket("global"), Some(global.clone()));
    assert_eq!(client.bucket("user_todos"), Some(user_todos.clone()));
    let resent: Vec<&String> = client.ops_since_mark(&user_todos).iter().filter(|id| !hot.contains(*id)).collect();
    assert!(resent.is_empty(), "user_todos re-sent rows nobody wrote: {resent:?}");
    let live = client.ops_since_mark(&user_todos).len();
    assert!(
        live > 0 && live <= writes.load(Ordering::Relaxed),
        "{live} ops for {} writes",
        writes.load(Ordering::Relaxed)
    );
    let new_lists = client.ops_since_mark(&global).len();
    assert_eq!(new_lists, lists - 3, "global got only the new lists");
    for (bucket, last) in &held {
        assert!(client.state.buckets[bucket].last_op >= *last, "{bucket} went back");
    }
    // The SDK converged through the switch: the new table filled, no checksum failure, and
    // the buckets it held are still the ones it holds.
    eventually_equal(&mut agent, &db, "u1").await?;
    let deadline = Instant::now() + T;
    while node_count(&mut agent, "todo_index")? != todos.len() {
        if Instant::now() > deadline {
            bail!(
                "the SDK's todo_index table: {} rows of {}",
                node_count(&mut agent, "todo_index")?,
                todos.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = agent.call(json!({"cmd": "status"}))?;
    assert_eq!(status["checksum_failures"], json!(0), "{status}");
    let names: BTreeSet<String> = agent
        .call(json!({"cmd": "buckets"}))?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, [global.clone(), user_todos.clone(), index.clone()].into_iter().collect());
    agent.call(json!({"cmd": "close"}))?;
    // Only `todos` was read again, and by the process holding the lease.
    let log = svc.log_since(log_from);
    assert_eq!(tables_read(&log), vec!["todos".to_string()], "{log}");
    assert!(log.contains("switching to the config deployed in place"), "{log}");
    assert!(tables_read(&peer.log()).is_empty(), "{}", peer.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_definition_gets_new_buckets_and_a_removed_one_is_deleted() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 20, 200, &["u1"]).await?;
    svc.start().await?;
    let mut client = Client::open(&svc.url(), Vec::new(), ClientState::default()).await?;
    client.until("the first sync", |s| s.table("todos").len() == 200).await?;
    let old_global = client.bucket("global").context("global bucket")?;
    let user_todos = client.bucket("user_todos").context("user_todos bucket")?;

    // Changed: `global` now syncs two columns of lists.
    let changed = RULES.replace("SELECT * FROM lists", "SELECT id, name FROM lists");
    svc.terminate()?;
    std::fs::write(svc.dir.path().join("sync-rules.yaml"), &changed)?;
    let log_from = svc.log_len();
    svc.start().await?;
    let mut client = Client::open(&svc.url(), client.state.positions(), std::mem::take(&mut client.state)).await?;
    client
        .until("the changed definition's bucket", |s| {
            s.buckets
                .keys()
                .any(|b| b.contains("#global[") && *b != old_global && s.buckets[b].rows.len() == 20)
        })
        .await
        .with_context(|| svc.log_since(log_from))?;
    let new_global = client.bucket("global").context("global bucket")?;
    assert!(
        !client.state.buckets.contains_key(&old_global),
        "the replaced bucket is dropped by the client"
    );
    assert!(
        client.ops_since_mark(&user_todos).is_empty(),
        "user_todos re-sent: {:?}",
        client.ops_since_mark(&user_todos)
    );
    let row = client.state.table("lists").into_values().next().context("a list")?;
    assert!(row.get("owner_id").is_none() && row.get("name").is_some(), "{row}");
    assert_eq!(tables_read(&svc.log_since(log_from)), vec!["lists".to_string()]);
    storage_drops(&svc, &old_global).await?;

    // Removed: `user_todos` goes, `global` stays as it is.
    let removed = changed.replace(
        "  user_todos:\n    parameters: SELECT request.user_id() AS user_id\n    data:\n      - SELECT * FROM todos WHERE owner_id = bucket.user_id\n",
        "",
    );
    assert_ne!(removed, changed);
    svc.terminate()?;
    std::fs::write(svc.dir.path().join("sync-rules.yaml"), &removed)?;
    let log_from = svc.log_len();
    svc.start().await?;
    let mut client = Client::open(&svc.url(), client.state.positions(), std::mem::take(&mut client.state)).await?;
    client.until("the removal", |s| !s.buckets.contains_key(&user_todos)).await?;
    assert_eq!(client.bucket("global"), Some(new_global.clone()));
    assert!(
        client.ops_since_mark(&new_global).is_empty(),
        "global re-sent: {:?}",
        client.ops_since_mark(&new_global)
    );
    assert!(tables_read(&svc.log_since(log_from)).is_empty());
    storage_drops(&svc, &user_todos).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_read_killed_midway_resumes_where_it_stopped() -> Result<()> {
    const ROWS: usize = 60_000;
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 3, ROWS, &["u1"]).await?;
    svc.start().await?;
    let mut client = Client::open(&svc.url(), Vec::new(), ClientState::default()).await?;
    client.until("the first sync", |s| s.table("todos").len() == ROWS).await?;

    svc.terminate()?;
    std::fs::write(svc.dir.path().join("sync-rules.yaml"), format!("{RULES}{TODO_INDEX}"))?;
    svc.start().await?;
    // kill -9 once some of the re-read is stored, and not all of it.
    let storage = svc.cluster.connect("storage").await?;
    let deadline = Instant::now() + T;
    loop {
        let row = storage.query_opt("SELECT rows, done FROM ferrosync.rebuild_tables", &[]).await?;
        match row.map(|r| (r.get::<_, i64>(0), r.get::<_, bool>(1))) {
            Some((rows, false)) if rows > 0 => break,
            Some((_, true)) => bail!("the re-read finished before the kill; use more rows"),
            _ if Instant::now() > deadline => bail!("no re-read progress: {}", svc.log()),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    svc.kill();
    let log_from = svc.log_len();
    svc.start().await?;
    let mut client = Client::open(&svc.url(), client.state.positions(), std::mem::take(&mut client.state)).await?;
    client
        .until("the new definition's bucket", |s| {
            s.buckets
                .keys()
                .any(|b| b.contains("#todo_index[") && s.buckets[b].rows.len() == ROWS)
        })
        .await
        .with_context(|| svc.log_since(log_from))?;
    let log = svc.log_since(log_from);
    let resumed = log
        .lines()
        .filter(|l| l.contains("re-reading table for the deployed definitions"))
        .filter_map(|l| l.split("resume_after_rows=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<usize>().ok())
        .next()
        .context("no re-read after the restart")?;
    assert!(resumed > 0 && resumed < ROWS, "resumed after {resumed} rows: {log}");
    let user_todos = client.bucket("user_todos").context("user_todos bucket")?;
    assert!(client.ops_since_mark(&user_todos).is_empty(), "user_todos re-sent");
    Ok(())
}
