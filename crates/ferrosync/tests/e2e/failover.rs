//! After kill -9 of the replicating process, replication resumes within 5 s: at once on a
//! standby that is already running, or in a freshly started process.

use crate::harness::*;
use crate::live::*;
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

const TAKEOVER: Duration = Duration::from_secs(5);
/// How long to keep measuring past the limit, so a failure still reports the actual time.
const MEASURE_UP_TO: Duration = Duration::from_secs(90);

async fn wait_log(what: &str, log: impl Fn() -> String, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    while !log().contains(what) {
        if started.elapsed() > timeout {
            bail!("no {what:?} in the log within {timeout:?}:\n{}", log());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started.elapsed())
}

async fn insert_marker(svc: &Service, description: &str) -> Result<()> {
    svc.source()
        .await?
        .execute(
            "INSERT INTO todos (description, owner_id, list_id) SELECT $1, 'u1', id FROM lists ORDER BY id LIMIT 1",
            &[&description],
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_replication_within_5s_of_kill_9() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 3, 100, &["u1", "u2"]).await?;
    svc.start().await?;
    wait_log("streaming changes", || svc.log(), T).await?;
    let mut standby = svc.peer()?;
    standby.start().await?;
    // Give the standby time to try for the lease (and fail: the first process holds it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (first_replicates, standby_replicates) = (svc.log().contains("streaming changes"), standby.log().contains("streaming changes"));
    eprintln!("replicating: first process {first_replicates}, standby {standby_replicates}");
    if standby_replicates {
        bail!(
            "the standby streams changes while the first process holds replication (two replicators):\n{}",
            standby.log()
        );
    }
    if !first_replicates {
        bail!("the first process does not replicate:\n{}", svc.log());
    }
    let client = LiveClient::spawn(standby.url(), "u1");
    client.converge(&db, T).await.with_context(|| standby.log())?;

    let standby_log_mark = standby.log().len();
    svc.kill();
    let killed = Instant::now();
    insert_marker(&svc, "after failover").await?;
    let seen = client
        .wait_for(MEASURE_UP_TO, |t| t.values().any(|d| d == "after failover"))
        .await
        .with_context(|| format!("standby log since the kill:\n{}", &standby.log()[standby_log_mark..]));
    let since_kill = killed.elapsed();
    let standby_log = standby.log()[standby_log_mark..].to_string();
    seen?;
    eprintln!("FAILOVER: kill -9 of the replicating process -> change at a client of the standby: {since_kill:?}");
    assert!(standby.alive(), "the standby exited:\n{}", standby.log());
    assert!(
        since_kill <= TAKEOVER,
        "the standby took {since_kill:?} (> {TAKEOVER:?}) to take over; standby log since the kill:\n{standby_log}"
    );
    client.converge(&db, T).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_process_resumes_replication_within_5s_of_kill_9() -> Result<()> {
    let mut svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 3, 100, &["u1", "u2"]).await?;
    svc.start().await?;
    wait_log("streaming changes", || svc.log(), T).await?;
    let client = LiveClient::spawn(svc.url(), "u1");
    client.converge(&db, T).await.with_context(|| svc.log())?;

    svc.kill();
    let killed = Instant::now();
    insert_marker(&svc, "after restart").await?;
    let log_mark = svc.log_len();
    let start_began = Instant::now();
    svc.start().await?;
    let start_time = start_began.elapsed();
    let seen = client
        .wait_for(MEASURE_UP_TO, |t| t.values().any(|d| d == "after restart"))
        .await
        .with_context(|| format!("log of the new process:\n{}", svc.log_since(log_mark)));
    let since_kill = killed.elapsed();
    seen?;
    eprintln!(
        "RESTART: kill -9 -> change at the client: {since_kill:?} (of which starting the new process: {start_time:?}; client streams opened {})",
        client.opened.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        since_kill <= TAKEOVER + start_time,
        "replication resumed {since_kill:?} after the kill (limit 5 s + {start_time:?} start); log of the new process:\n{}",
        svc.log_since(log_mark)
    );
    client.converge(&db, T).await?;
    Ok(())
}
