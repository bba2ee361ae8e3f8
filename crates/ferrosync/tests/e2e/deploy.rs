//! Sync-config deploys without downtime: a new config replicates beside the served one (own
//! stream, own slot) while clients keep syncing the old; it becomes ACTIVE once caught up,
//! clients move to its buckets, and the old stream's slot and storage are dropped.

use crate::harness::*;
use crate::live::*;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The todo app's config with: a column dropped (lists.owner_id), a filter added (open todos
/// only), a new definition (the user's own lists, as `my_lists`) and a changed compatibility
/// edition, so it is a full redeploy whatever else could be reused.
const C2: &str = r#"config:
  edition: 2
bucket_definitions:
  global:
    data:
      - SELECT id, name, created_at FROM lists
  user_todos:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id AND completed = false
  user_lists:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, name FROM lists AS my_lists WHERE owner_id = bucket.user_id
"#;

/// Every row written before the switch reaches a client of the old stream within this.
const MAX_GAP: Duration = Duration::from_secs(5);
/// Rows of another user that make the new stream's snapshot take a while.
const BULK_ROWS: usize = 60_000;

/// `user`'s todos as C2 syncs them: open ones only.
async fn open_todos(db: &tokio_postgres::Client, user: &str) -> Result<BTreeMap<String, String>> {
    let rows = db
        .query(
            "SELECT id::text, description FROM todos WHERE owner_id = $1 AND NOT completed",
            &[&user],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

pub async fn stream_states(svc: &Service) -> Result<Vec<(i64, String)>> {
    let storage = svc.cluster.connect("storage").await?;
    let rows = storage.query("SELECT id, state FROM ferrosync.sync_rules ORDER BY id", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn wait_state(svc: &Service, id: i64, state: &str, timeout: Duration, logs: impl Fn() -> String) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let states = stream_states(svc).await?;
        if states.iter().any(|(i, s)| *i == id && s == state) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("stream {id} not {state} within {timeout:?}: {states:?}\n{}", logs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn slot_of(svc: &Service, id: i64) -> Result<String> {
    let storage = svc.cluster.connect("storage").await?;
    Ok(storage
        .query_one("SELECT slot_name FROM ferrosync.sync_rules WHERE id = $1", &[&id])
        .await?
        .get(0))
}

async fn slot_exists(db: &tokio_postgres::Client, slot: &str) -> Result<bool> {
    Ok(db
        .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await?
        .is_some())
}

/// Storage rows of stream `id`, per group-keyed table (tables with none left out).
async fn group_rows(svc: &Service, id: i64) -> Result<Vec<(String, i64)>> {
    let storage = svc.cluster.connect("storage").await?;
    let mut found = Vec::new();
    for table in [
        "op_chunks",
        "current_data",
        "bucket_parameters",
        "bucket_changes",
        "bucket_compaction",
        "source_tables",
    ] {
        let n: i64 = storage
            .query_one(&format!("SELECT count(*) FROM ferrosync.{table} WHERE group_id = $1::int8"), &[&id])
            .await?
            .get(0);
        if n > 0 {
            found.push((table.to_string(), n));
        }
    }
    Ok(found)
}

/// Wait until stream `id` is TERMINATED with its slot and storage gone.
async fn cleaned_up(svc: &Service, db: &tokio_postgres::Client, id: i64, logs: impl Fn() -> String) -> Result<()> {
    let slot = slot_of(svc, id).await?;
    wait_state(svc, id, "TERMINATED", T, &logs).await?;
    assert!(
        !slot_exists(db, &slot).await?,
        "slot {slot} of the stopped stream is still on the source"
    );
    let left = group_rows(svc, id).await?;
    assert!(left.is_empty(), "storage rows of stream {id} remain: {left:?}");
    Ok(())
}

/// Inserts a todo for `u1` every 50 ms (description `w-<n>`, the time kept) and updates a
/// seeded todo as often, until stopped.
struct Writer {
    written: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Writer {
    fn start(conn_str: String) -> Writer {
        let written = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (written, stop) = (written.clone(), stop.clone());
            async move {
                let db = connect_retrying(&conn_str).await;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let description = format!("w-{n}");
                    db.execute(
                        "INSERT INTO todos (description, owner_id, list_id) SELECT $1, 'u1', id FROM lists ORDER BY id LIMIT 1",
                        &[&description],
                    )
                    .await?;
                    written.lock().unwrap().push((description, Instant::now()));
                    db.execute(
                        "UPDATE todos SET description = description || '+' WHERE id = (SELECT id FROM todos WHERE owner_id = 'u1' AND description LIKE 'todo %' ORDER BY random() LIMIT 1)",
                        &[],
                    )
                    .await?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(())
            }
        });
        Writer { written, stop, task }
    }

    async fn stop(self) -> Result<Vec<(String, Instant)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await??;
        let written = self.written.lock().unwrap().clone();
        Ok(written)
    }
}

/// When each `w-<n>` row first showed in a client's complete checkpoint.
fn watch_arrivals(client: &LiveClient) -> (Arc<Mutex<HashMap<String, Instant>>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let state = client.state.clone();
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            loop {
                let todos = {
                    let s = state.lock().unwrap();
                    s.complete.then(|| client_todos(&s))
                };
                let now = Instant::now();
                {
                    let mut seen = seen.lock().unwrap();
                    for description in todos.into_iter().flat_map(|t| t.into_values()) {
                        if description.starts_with("w-") {
                            seen.entry(description).or_insert(now);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    (seen, task)
}

async fn readiness(url: &str) -> Result<(u16, Value)> {
    let resp = reqwest::get(format!("{url}/probes/readiness")).await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

/// Wait until a complete checkpoint of `client` shows exactly `expected`.
async fn client_matches(client: &LiveClient, expected: &BTreeMap<String, String>, logs: impl Fn() -> String) -> Result<()> {
    client.wait_for(T, |t| t == expected).await.map(|_| ()).with_context(|| {
        format!(
            "expected {} rows, got {:?}\n{}",
            expected.len(),
            client.complete_todos().map(|t| t.len()),
            logs()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_under_load() -> Result<()> {
    let mut a = Service::new().await?;
    let db = a.source().await?;
    seed(&db, 3, 50, &["u1"]).await?;
    // Done todos: C1 syncs them, C2's filter drops them.
    db.batch_execute("UPDATE todos SET completed = true WHERE id IN (SELECT id FROM todos WHERE owner_id = 'u1' ORDER BY id LIMIT 10)")
        .await?;
    seed(&db, 1, BULK_ROWS, &["bulk"]).await?;
    a.start().await?;
    let live = LiveClient::spawn(a.url(), "u1");
    live.converge(&db, T).await.with_context(|| a.log())?;
    let mut node = node_client(a.dir.path(), &a.url(), "u1", &a.cluster.uri("todo"))?;
    node_converges(&mut node, &db, "u1", T).await.with_context(|| a.log())?;
    let old = stream_states(&a).await?;
    let [(old_id, old_state)] = old.as_slice() else {
        bail!("one stream expected: {old:?}")
    };
    assert_eq!(old_state, "ACTIVE");
    let old_id = *old_id;

    let (seen, watcher) = watch_arrivals(&live);
    let writer = Writer::start(a.cluster.conn_str("todo"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut b = a.peer()?;
    std::fs::write(b.dir.path().join("sync-rules.yaml"), C2)?;
    let deploy_started = Instant::now();
    b.start().await?;
    let logs = || format!("A:\n{}\nB:\n{}", a.log(), b.log());

    // While the new stream builds, the old one serves and readiness holds.
    let new_id = old_id + 1;
    let mut saw_processing = false;
    let switched = loop {
        let states = stream_states(&a).await?;
        if states.iter().any(|(i, s)| *i == new_id && s == "ACTIVE") {
            break Instant::now();
        }
        let (status, body) = readiness(&a.url()).await?;
        assert_eq!(status, 200, "readiness while the old stream serves: {body}");
        let deploying = body["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["id"] == json!(new_id) && s["stream_state"] == json!("PROCESSING"));
        saw_processing |= deploying;
        if deploy_started.elapsed() > Duration::from_secs(120) {
            bail!("no switch within 120 s: {states:?}\n{}", logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(saw_processing, "the probes never showed the deploying stream\n{}", logs());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let written = writer.stop().await?;
    watcher.abort();

    // Clients of the old stream got every row written before the switch, promptly.
    let seen = seen.lock().unwrap().clone();
    let before_switch: Vec<_> = written.iter().filter(|(_, at)| *at < switched).collect();
    let during_deploy = before_switch.iter().filter(|(_, at)| *at > deploy_started).count();
    let mut worst = Duration::ZERO;
    for (description, at) in &before_switch {
        let arrived = seen
            .get(description)
            .with_context(|| format!("{description} written before the switch never arrived"))?;
        worst = worst.max(arrived.saturating_duration_since(*at));
    }
    eprintln!(
        "DEPLOY: switch {:?} after B started; {during_deploy} rows written during the deploy, worst delay to a client of the old stream {worst:?}",
        switched - deploy_started
    );
    assert!(
        during_deploy >= 10,
        "too few writes during the deploy to show anything: {during_deploy}"
    );
    assert!(worst <= MAX_GAP, "a row took {worst:?} to reach a client during the deploy");

    // Both clients end in C2's state, checksums verified throughout.
    let expected = open_todos(&db, "u1").await?;
    client_matches(&live, &expected, logs).await?;
    let list_count: i64 = db.query_one("SELECT count(*) FROM lists WHERE owner_id = 'u1'", &[]).await?.get(0);
    {
        let state = live.state.lock().unwrap();
        let lists = state.table("lists");
        assert_eq!(lists.len() as i64, list_count);
        assert!(
            lists.values().all(|l| l.get("owner_id").is_none() && l.get("name").is_some()),
            "{lists:?}"
        );
        assert_eq!(state.table("my_lists").len() as i64, list_count, "the new definition syncs");
    }
    let deadline = Instant::now() + T;
    while node.todos()? != expected {
        if Instant::now() > deadline {
            bail!(
                "node client not in C2's state: {}\n{}",
                node.call(json!({"cmd": "status"}))?,
                logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = node.call(json!({"cmd": "status"}))?;
    assert_eq!(status["checksum_failures"], json!(0), "{status}");

    // The old stream is gone from the source and from storage; A, still running its old
    // config, does not deploy it again.
    cleaned_up(&a, &db, old_id, logs).await?;
    let states = stream_states(&a).await?;
    assert_eq!(states, vec![(old_id, "TERMINATED".to_string()), (new_id, "ACTIVE".to_string())]);
    let all = logs();
    let transitions = ["new replication stream PROCESSING", "is now ACTIVE", "TERMINATED: slot dropped"];
    for line in transitions {
        assert!(all.contains(line), "no {line:?} in the logs:\n{all}");
    }
    for line in all.lines().filter(|l| transitions.iter().any(|t| l.contains(t))) {
        eprintln!("DEPLOY LOG: {line}");
    }

    // A goes away (as in a rolling deploy); B carries on alone.
    drop(node);
    a.terminate()?;
    let survivor = LiveClient::spawn(b.url(), "u1");
    db.execute(
        "INSERT INTO todos (description, owner_id, list_id) SELECT 'after A stopped', 'u1', id FROM lists ORDER BY id LIMIT 1",
        &[],
    )
    .await?;
    let expected = open_todos(&db, "u1").await?;
    client_matches(&survivor, &expected, || b.log()).await?;
    assert!(b.alive(), "B exited: {}", b.log());
    assert_eq!(stream_states(&a).await?, states, "no stream changed when A stopped");
    Ok(())
}

/// C2 and one more definition: a second deploy while C2 still builds.
fn c3() -> String {
    format!("{C2}  list_names:\n    data:\n      - SELECT id, name FROM lists AS list_names\n")
}

/// Rows copied so far of stream `id`'s tables not copied completely yet.
async fn snapshot_rows(svc: &Service, id: i64) -> Result<i64> {
    let storage = svc.cluster.connect("storage").await?;
    Ok(storage
        .query_one(
            "SELECT coalesce(sum(snapshot_rows), 0)::int8 FROM ferrosync.source_tables WHERE group_id = $1 AND NOT snapshot_done",
            &[&id],
        )
        .await?
        .get(0))
}

/// Rows of a snapshot chunk (the service saves progress once per chunk).
const SNAPSHOT_CHUNK: i64 = 10_000;

/// Wait until stream `id` is part-way through copying a table (a chunk of it saved: the small
/// tables, copied in one chunk, do not count).
async fn snapshot_under_way(svc: &Service, id: i64, logs: impl Fn() -> String) -> Result<()> {
    let deadline = Instant::now() + T;
    while snapshot_rows(svc, id).await? < SNAPSHOT_CHUNK {
        if Instant::now() > deadline {
            bail!("stream {id} copied nothing within {T:?}\n{}", logs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_deploy_while_one_is_processing_replaces_it() -> Result<()> {
    let mut a = Service::new().await?;
    let db = a.source().await?;
    seed(&db, 2, 20, &["u1"]).await?;
    seed(&db, 1, 150_000, &["bulk"]).await?;
    a.start().await?;
    let live = LiveClient::spawn(a.url(), "u1");
    live.converge(&db, T).await.with_context(|| a.log())?;

    let mut b = a.peer()?;
    std::fs::write(b.dir.path().join("sync-rules.yaml"), C2)?;
    b.start().await?;
    snapshot_under_way(&a, 2, || format!("A:\n{}\nB:\n{}", a.log(), b.log())).await?;
    let mut c = a.peer()?;
    std::fs::write(c.dir.path().join("sync-rules.yaml"), c3())?;
    c.start().await?;
    let logs = || format!("A:\n{}\nB:\n{}\nC:\n{}", a.log(), b.log(), c.log());
    // C answers HTTP before its deploy is necessarily committed.
    wait_state(&a, 3, "PROCESSING", T, logs).await?;
    let states = stream_states(&a).await?;
    assert_eq!(
        states,
        vec![(1, "ACTIVE".to_string()), (2, "STOP".to_string()), (3, "PROCESSING".to_string())],
        "the second deploy stops the first before it switched (raise the bulk rows if 2 finished first)\n{}",
        logs()
    );
    wait_state(&a, 3, "ACTIVE", Duration::from_secs(120), logs).await?;
    client_matches(&live, &open_todos(&db, "u1").await?, logs).await?;
    let list_count: i64 = db.query_one("SELECT count(*) FROM lists", &[]).await?.get(0);
    // The todos can match a moment before the checkpoint with C3's own bucket is complete.
    let synced = || live.state.lock().unwrap().table("list_names").len() as i64;
    let started = Instant::now();
    while synced() != list_count && started.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(synced(), list_count, "C3's own definition syncs\n{}", logs());
    cleaned_up(&a, &db, 1, logs).await?;
    cleaned_up(&a, &db, 2, logs).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_snapshot_of_the_new_stream_resumes_it() -> Result<()> {
    let mut a = Service::new().await?;
    let db = a.source().await?;
    seed(&db, 2, 20, &["u1"]).await?;
    seed(&db, 1, 150_000, &["bulk"]).await?;
    a.start().await?;
    let live = LiveClient::spawn(a.url(), "u1");
    live.converge(&db, T).await.with_context(|| a.log())?;

    // Restart with C2; kill -9 once the new stream has copied some rows.
    a.terminate()?;
    std::fs::write(a.dir.path().join("sync-rules.yaml"), C2)?;
    a.start().await?;
    snapshot_under_way(&a, 2, || a.log()).await?;
    a.kill();
    let copied = snapshot_rows(&a, 2).await?;
    assert_eq!(stream_states(&a).await?[1], (2, "PROCESSING".to_string()), "killed mid-snapshot");
    let mark = a.log_len();
    a.start().await?;
    wait_state(&a, 2, "ACTIVE", Duration::from_secs(120), || a.log()).await?;
    let log = a.log_since(mark);
    let resumed = log
        .lines()
        .any(|l| l.contains("stream=2") && l.contains("snapshotting table") && !l.contains("resume_after_rows=0"));
    assert!(resumed, "the restarted job did not resume after the {copied} rows copied:\n{log}");
    assert!(
        !log.contains("new replication stream PROCESSING"),
        "the restart deployed again:\n{log}"
    );
    client_matches(&live, &open_todos(&db, "u1").await?, || a.log()).await?;
    cleaned_up(&a, &db, 1, || a.log()).await?;
    Ok(())
}
