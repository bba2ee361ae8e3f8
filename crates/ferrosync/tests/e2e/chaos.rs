//! Seeded, replayable chaos: kill -9 the service at random moments (during the initial
//! snapshot and while streaming) and restart Postgres in between, while a writer inserts,
//! updates, deletes and moves todos between users. At the end 20 clients of 20 users (one of
//! them the real Node SDK) hold exactly the source's rows, every checksum verified.
//!
//! `FERROSYNC_CHAOS_SEED` (default fixed; decimal or 0x-hex), `FERROSYNC_CHAOS_KILLS` (20),
//! `FERROSYNC_CHAOS_PG_RESTARTS` (2). The seed fixes every random choice (delays, which kill
//! waits for which phase, the writer's operations and ids); timing still varies between runs.
//! `scripts/chaos.sh` runs it longer with a random seed.

use crate::harness::*;
use crate::live::*;
use crate::restart::watch_alive;
use anyhow::{bail, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEFAULT_SEED: u64 = 0x5eed_c4a0_5eed_c4a0;
const USERS: usize = 20;
const TODOS: usize = 60_000;
/// How long a kill waits for the new process to reach the phase it aims at.
const PHASE_WAIT: Duration = Duration::from_secs(6);

/// splitmix64: small, fast, and good enough to drive a test.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if v.starts_with("0x") => u64::from_str_radix(&v[2..], 16).unwrap_or_else(|_| panic!("{name}={v}")),
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v}")),
        Err(_) => default,
    }
}

fn user(i: usize) -> String {
    format!("u{i:02}")
}

/// What the process was doing when it was killed, from its log and the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// No lease yet (starting, or waiting for the previous owner's lease).
    NotReplicating,
    Snapshot,
    Streaming,
}

fn phase(log: &str) -> Phase {
    if log.contains("streaming changes") {
        Phase::Streaming
    } else if log.contains("replication starting") && !log.contains("initial snapshot done") {
        // "replication starting ... snapshot_done=true" is followed at once by streaming.
        if log.contains("snapshot_done=false") {
            Phase::Snapshot
        } else {
            Phase::NotReplicating
        }
    } else {
        Phase::NotReplicating
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_9_and_postgres_restarts_converge() -> Result<()> {
    let seed = env_u64("FERROSYNC_CHAOS_SEED", DEFAULT_SEED);
    let kills = env_u64("FERROSYNC_CHAOS_KILLS", 20) as usize;
    let pg_restarts = env_u64("FERROSYNC_CHAOS_PG_RESTARTS", 2) as usize;
    eprintln!("CHAOS seed={seed:#x} kills={kills} pg_restarts={pg_restarts} (replay: FERROSYNC_CHAOS_SEED={seed:#x})");
    let mut rng = Rng::new(seed);
    let test_started = Instant::now();

    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    db.batch_execute(&format!(
        "INSERT INTO lists (id, name, owner_id) SELECT md5('{seed}-list-' || g)::uuid, 'list ' || g, 'u00' FROM generate_series(1, 10) g;
         INSERT INTO todos (id, description, owner_id, list_id)
         SELECT md5('{seed}-todo-' || g)::uuid, 'todo ' || g, 'u' || lpad((g % {USERS})::text, 2, '0'),
                (SELECT id FROM lists ORDER BY id LIMIT 1)
         FROM generate_series(1, {TODOS}) g;"
    ))
    .await?;
    drop(db);

    // Postgres restarts happen after these kills (evenly spread, jittered by the seed).
    let restart_after: Vec<usize> = (1..=pg_restarts)
        .map(|r| (r * kills / (pg_restarts + 1) + rng.below(2) as usize).min(kills.saturating_sub(1)))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (writes, write_errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut problems: Vec<String> = Vec::new();
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut mark = svc.log_len();
    svc.start().await?;
    // Clients connect at once and stay through everything, reopening from their positions.
    let clients: Vec<LiveClient> = (1..USERS).map(|i| LiveClient::spawn(svc.url(), &user(i))).collect();
    let mut node = node_client(svc.dir.path(), &svc.url(), &user(0), &svc.cluster.uri("todo"))?;
    let writer = tokio::spawn(chaos_writer(
        svc.cluster.conn_str("todo"),
        rng.next(),
        stop.clone(),
        writes.clone(),
        write_errors.clone(),
    ));

    for k in 0..kills {
        // The first kills aim at the initial snapshot, some at any moment, most at streaming.
        let target = if k < 3 {
            Some(Phase::Snapshot)
        } else if rng.chance(15) {
            None
        } else {
            Some(Phase::Streaming)
        };
        let waited = Instant::now();
        if let Some(target) = target {
            while phase(&svc.log_since(mark)) < target && waited.elapsed() < PHASE_WAIT && svc.alive() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let delay = match target {
            Some(Phase::Snapshot) => rng.millis(50, 1500),
            None => rng.millis(0, 1000),
            _ => rng.millis(0, 3000),
        };
        watch_alive(&mut svc, delay, &mut problems).await;
        let at = phase(&svc.log_since(mark));
        if !svc.alive() {
            problems.push(format!("kill {k}: the process had exited by itself:\n{}", svc.log_since(mark)));
        }
        svc.kill();
        let label = format!("{at:?}");
        eprintln!(
            "kill {k:>3} aimed at {target:?}, landed in {label} ({:?} after start) t={:?}",
            waited.elapsed(),
            test_started.elapsed()
        );
        *phases.entry(label).or_default() += 1;
        if for_each_fatal(&clients, &mut problems) {
            break;
        }
        if restart_after.contains(&k) {
            let immediate = rng.chance(50);
            eprintln!(
                "restarting postgres ({}) t={:?}",
                if immediate { "immediate" } else { "fast" },
                test_started.elapsed()
            );
            mark = svc.log_len();
            svc.start().await?;
            watch_alive(&mut svc, rng.millis(500, 3000), &mut problems).await;
            tokio::task::block_in_place(|| {
                if immediate {
                    svc.cluster.restart_immediate()
                } else {
                    svc.cluster.restart()
                }
            })?;
            watch_alive(&mut svc, rng.millis(500, 2000), &mut problems).await;
            if !svc.alive() {
                problems.push(format!("the process exited across a postgres restart:\n{}", svc.log_since(mark)));
            }
            svc.kill();
        }
        mark = svc.log_len();
        svc.start().await?;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    eprintln!(
        "kills by phase: {phases:?}; writer: {} transactions, {} failed; chaos took {:?}",
        writes.load(Ordering::Relaxed),
        write_errors.load(Ordering::Relaxed),
        test_started.elapsed()
    );
    if !phases.contains_key("Snapshot") {
        eprintln!("WARNING: no kill landed during the initial snapshot");
    }
    if let Some(n) = phases.get("NotReplicating") {
        // Not a failure here (failover.rs asserts the takeover time), but it means fewer
        // kills hit a replicator at work.
        eprintln!("NOTE: {n} kill(s) found the process not replicating {PHASE_WAIT:?} after its start (waiting for the previous lease?)");
    }

    let db = svc.source().await?;
    let converge_started = Instant::now();
    let timeout = Duration::from_secs(120);
    for c in &clients {
        let left = timeout.saturating_sub(converge_started.elapsed());
        if let Err(e) = c.converge(&db, left).await {
            problems.push(format!("{e:#}"));
        }
    }
    let left = timeout.saturating_sub(converge_started.elapsed()).max(Duration::from_secs(5));
    if let Err(e) = node_converges(&mut node, &db, &user(0), left).await {
        problems.push(format!("{e:#}"));
    }
    eprintln!("clients converged {:?} after the writer stopped", converge_started.elapsed());
    let status = node.call(json!({"cmd": "status"}))?;
    if status["checksum_failures"] != json!(0) {
        problems.push(format!("node client had checksum failures: {status}"));
    }
    let reopened: usize = clients.iter().map(LiveClient::reconnects).sum();
    eprintln!(
        "raw clients reopened their streams {reopened} times; total {:?}",
        test_started.elapsed()
    );
    if !problems.is_empty() {
        bail!(
            "chaos seed {seed:#x} (replay with FERROSYNC_CHAOS_SEED={seed:#x}):\n{}\n--- log of the last process ---\n{}",
            problems.join("\n"),
            svc.log_since(mark)
        );
    }
    Ok(())
}

/// Record protocol errors (checksum mismatch, resent op); true if any client has one.
fn for_each_fatal(clients: &[LiveClient], problems: &mut Vec<String>) -> bool {
    let mut any = false;
    for c in clients {
        if let Err(e) = c.check_fatal() {
            problems.push(format!("{e:#}"));
            any = true;
        }
    }
    any
}

/// Random transactions of 1-4 operations: inserts, updates, deletes and moves between users.
async fn chaos_writer(conn: String, seed: u64, stop: Arc<AtomicBool>, writes: Arc<AtomicU64>, errors: Arc<AtomicU64>) {
    let mut rng = Rng::new(seed);
    let mut db = connect_retrying(&conn).await;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let ops = 1 + rng.below(4);
        let result = async {
            db.batch_execute("BEGIN").await?;
            for _ in 0..ops {
                n += 1;
                let owner = user(rng.below(USERS as u64) as usize);
                let pick = "(SELECT id FROM todos WHERE owner_id = $1 AND id >= $2::text::uuid ORDER BY id LIMIT 1)";
                let roll = rng.below(100);
                let probe = rng.uuid();
                if roll < 35 {
                    db.execute(
                        "INSERT INTO todos (id, description, owner_id, list_id) SELECT $1::text::uuid, $2, $3, id FROM lists ORDER BY id LIMIT 1",
                        &[&probe, &format!("new {n}"), &owner],
                    )
                    .await?;
                } else if roll < 65 {
                    db.execute(
                        &format!("UPDATE todos SET description = $3 WHERE id = {pick}"),
                        &[&owner, &probe, &format!("edit {n}")],
                    )
                    .await?;
                } else if roll < 80 {
                    db.execute(&format!("DELETE FROM todos WHERE id = {pick}"), &[&owner, &probe])
                        .await?;
                } else {
                    let to = user(rng.below(USERS as u64) as usize);
                    db.execute(
                        &format!("UPDATE todos SET owner_id = $3, description = $4 WHERE id = {pick}"),
                        &[&owner, &probe, &to, &format!("moved {n}")],
                    )
                    .await?;
                }
            }
            db.batch_execute("COMMIT").await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), result).await {
            Ok(Ok(())) => {
                writes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                errors.fetch_add(1, Ordering::Relaxed);
                let _ = db.batch_execute("ROLLBACK").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                if db.is_closed() {
                    db = connect_retrying(&conn).await;
                }
            }
        }
        tokio::time::sleep(rng.millis(2, 15)).await;
    }
    let _ = db.batch_execute("ROLLBACK").await;
}

#[test]
fn rng_is_deterministic() {
    let (mut a, mut b) = (Rng::new(7), Rng::new(7));
    let xs: Vec<u64> = (0..5).map(|_| a.next()).collect();
    let ys: Vec<u64> = (0..5).map(|_| b.next()).collect();
    assert_eq!(xs, ys);
    assert_eq!(a.uuid().len(), 36);
}
