//! A silent network cut between the service and PostgreSQL (source and storage alike): a proxy
//! stops forwarding bytes but closes nothing, so only application-level timeouts can notice.
//! The process must survive, refuse new streams and report storage down while cut off, and
//! clients must converge once the network is back.

use crate::harness::*;
use crate::live::*;
use crate::proxy::FreezableProxy;
use crate::restart::{probe_new_stream, readiness, watch_alive};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the network stays cut.
const CUT_FOR: Duration = Duration::from_secs(25);
/// When, into the cut, a new `/sync/stream` must be refused.
const PROBE_AFTER: Duration = Duration::from_secs(15);
/// By when, into the cut, readiness must report storage down.
const NOTICE_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_network_cut_to_postgres() -> Result<()> {
    let mut svc = Service::new().await?;
    let proxy = FreezableProxy::start(svc.cluster.port()).await?;
    svc.via_port(proxy.port())?;
    let db = svc.source().await?;
    seed(&db, 3, 300, &["u1", "u2"]).await?;
    svc.start().await?;
    let client = LiveClient::spawn(svc.url(), "u1");
    client.converge(&db, T).await.with_context(|| svc.log())?;
    let (status, body) = readiness(&svc.url()).await?;
    eprintln!("before the cut: readiness {status} {body}");

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(insert_u1_todos(svc.cluster.conn_str("todo"), stop.clone(), writes.clone()));

    let mut problems = Vec::new();
    let log_mark = svc.log_len();
    proxy.freeze();
    let cut_at = Instant::now();
    eprintln!("network cut (proxy frozen)");
    let mut storage_down_at: Option<Duration> = None;
    let mut last_readiness: Option<(u16, Value)> = None;
    let mut probe: Option<tokio::task::JoinHandle<Result<(u16, Duration, String)>>> = None;
    while cut_at.elapsed() < CUT_FOR {
        if !svc.alive() {
            problems.push(format!("the service process exited {:?} into the cut", cut_at.elapsed()));
            break;
        }
        if probe.is_none() && cut_at.elapsed() >= PROBE_AFTER {
            let url = svc.url();
            probe = Some(tokio::spawn(async move { probe_new_stream(&url).await }));
        }
        match readiness(&svc.url()).await {
            Ok((status, body)) => {
                let summary = (status, json!({"storage": body["storage"], "replication": body["replication"]}));
                if last_readiness.as_ref() != Some(&summary) {
                    eprintln!("{:>6.1?} into the cut: readiness {} {}", cut_at.elapsed(), summary.0, summary.1);
                    last_readiness = Some(summary);
                }
                if storage_down_at.is_none() && body["storage"]["ok"] == json!(false) {
                    storage_down_at = Some(cut_at.elapsed());
                }
            }
            Err(e) => problems.push(format!("readiness {:?} into the cut: {e:#}", cut_at.elapsed())),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    match probe {
        None => problems.push("no new stream was probed during the cut".into()),
        Some(probe) => match probe.await? {
            Ok((status, elapsed, body)) => {
                eprintln!("new stream {PROBE_AFTER:?} into the cut: {status} after {elapsed:?} {body}");
                if status < 300 {
                    problems.push(format!(
                        "a new /sync/stream {PROBE_AFTER:?} into the cut got {status} (expected an error status)"
                    ));
                }
            }
            Err(e) => problems.push(format!("a new /sync/stream {PROBE_AFTER:?} into the cut: {e:#}")),
        },
    }
    match storage_down_at {
        Some(t) => {
            eprintln!("readiness reported storage down {t:?} into the cut");
            if t > NOTICE_WITHIN {
                problems.push(format!(
                    "readiness reported storage down only {t:?} into the cut (limit {NOTICE_WITHIN:?})"
                ));
            }
        }
        None => problems.push(format!("readiness never reported storage down during the {CUT_FOR:?} cut")),
    }
    eprintln!(
        "live client during the cut: streams opened {}, open failures {}, last end: {:?}",
        client.opened.load(Ordering::Relaxed),
        client.open_failures.load(Ordering::Relaxed),
        client.last_end.lock().unwrap()
    );

    proxy.thaw();
    let thawed_at = Instant::now();
    eprintln!("network back after {:?}", cut_at.elapsed());
    watch_alive(&mut svc, Duration::from_secs(2), &mut problems).await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let written = writes.load(Ordering::Relaxed);
    eprintln!("writer: {written} todos inserted directly into the source");
    if written == 0 {
        bail!("the writer never committed: the test proves nothing");
    }

    match client.converge(&db, Duration::from_secs(60)).await {
        Ok(_) => eprintln!("client converged {:?} after the thaw", thawed_at.elapsed()),
        Err(e) => problems.push(format!("after the thaw: {e:#}")),
    }
    if let Err(e) = client.check_fatal() {
        problems.push(format!("{e:#}"));
    }
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match readiness(&svc.url()).await {
            Ok((200, body)) if body["storage"]["ok"] == json!(true) && body["replication"]["state"] == json!("streaming") => {
                eprintln!("readiness 200 and streaming {:?} after the thaw", thawed_at.elapsed());
                break;
            }
            Ok((status, body)) if Instant::now() > ready_deadline => {
                problems.push(format!("readiness 30 s after convergence: {status} {body}"));
                break;
            }
            Err(e) if Instant::now() > ready_deadline => {
                problems.push(format!("readiness after the thaw: {e:#}"));
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    if !svc.alive() {
        problems.push("the service exited".into());
    }
    eprintln!(
        "live client: {} reopen(s), {} failed open attempt(s), last end: {:?}",
        client.reconnects(),
        client.open_failures.load(Ordering::Relaxed),
        client.last_end.lock().unwrap()
    );
    if !problems.is_empty() {
        bail!(
            "{}\n--- service log since the cut ---\n{}",
            problems.join("\n"),
            svc.log_since(log_mark)
        );
    }
    Ok(())
}

/// Insert a todo for u1 every 50 ms straight into the source (not through the proxy) until `stop`.
async fn insert_u1_todos(conn: String, stop: Arc<AtomicBool>, writes: Arc<AtomicU64>) {
    let db = connect_retrying(&conn).await;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let sql = format!("INSERT INTO todos (description, owner_id, list_id) SELECT 'cut {i}', 'u1', id FROM lists ORDER BY id LIMIT 1");
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), db.batch_execute(&sql)).await {
            writes.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
