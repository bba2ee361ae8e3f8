//! Failover: `kill -9` of the replicating process → the first new change at a live client.
//!
//! * **With a standby.** A second service process (same config, own port) runs next to the
//!   first. Each round a stream is held on the process that is *not* replicating, the
//!   replicator is SIGKILLed, a row for the held user is inserted at once, and the time from
//!   the kill to that row's `data` line on the held stream is taken. The killed process is
//!   then restarted and becomes the standby of the next round, so the roles alternate.
//! * **Without one.** One process; its client's stream dies with it. The process is SIGKILLed,
//!   a row inserted, the same binary started again, and the client reconnects (with its bucket
//!   positions) every 50 ms until it is served; the time is from the kill to the row's arrival.
//!   The process start time (exec → liveness probe answers) is reported beside it.
//!
//! A random pause (0–500 ms) precedes each kill so that rounds do not all hit the same point of
//! the standby's 250 ms lease poll. Who replicates is read from each process's `/probes/liveness` (`replication.state`:
//! `streaming` or `standby`). Every wait is bounded by the stall limit; the extra process is
//! killed when dropped, so it never outlives the phase.

use crate::client::{self, BucketAfter, Endpoint, SyncStream, Transport};
use crate::phases::{any_list, wait_marker};
use crate::report::{self, ms, Row};
use crate::setup::{Service, Target};
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// The user whose stream is held (a seeded user; the latency phase uses u1).
const USER: &str = "u2";
/// Client reconnect delay after a failed attempt (the SDK's retryDelay, but tight).
const RETRY: Duration = Duration::from_millis(50);
/// How often the probes are polled.
const PROBE_POLL: Duration = Duration::from_millis(10);
/// Wait for one probe answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound of the random pause before each kill. A standby polls for the lease every
/// 250 ms; each round reaches the kill a near-constant time after the standby came up, so
/// without the pause every round would hit the same point of its poll cycle.
const KILL_JITTER_MS: u64 = 500;

/// A pause of 0..KILL_JITTER_MS (clock nanoseconds as the random source; good enough here).
async fn jitter() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    tokio::time::sleep(Duration::from_millis(nanos / 1000 % KILL_JITTER_MS)).await;
}

pub struct FailoverOptions {
    pub rounds: usize,
    pub run_id: String,
    /// Longest wait for one step (a process to come up, a row to arrive).
    pub timeout: Duration,
}

/// One service process with its endpoint.
struct Proc<'a> {
    name: &'static str,
    svc: &'a mut Service,
    endpoint: Endpoint,
}

/// Probes go through their own client without keep-alive, so a pooled connection to a killed
/// process is never reused.
fn probe_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(PROBE_TIMEOUT)
        .build()
        .context("building the probe client")
}

/// `replication.state` from the liveness probe, or None while the process does not answer.
async fn replication_state(probe: &reqwest::Client, endpoint: &Endpoint) -> Option<String> {
    let resp = probe.get(format!("{}/probes/liveness", endpoint.url)).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body: serde_json::Value = resp.json().await.ok()?;
    Some(body["replication"]["state"].as_str().unwrap_or("").to_string())
}

/// Poll `p`'s liveness probe until `done(state)` (None = no answer yet); fails if the process
/// exits or `limit` passes.
async fn wait_probe(
    probe: &reqwest::Client,
    p: &mut Proc<'_>,
    what: &str,
    limit: Duration,
    done: impl Fn(Option<&str>) -> bool,
) -> Result<()> {
    let started = Instant::now();
    loop {
        if !p.svc.is_running() {
            bail!("process {} exited; log tail:\n{}", p.name, p.svc.log_tail(20));
        }
        let state = replication_state(probe, &p.endpoint).await;
        if done(state.as_deref()) {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!(
                "process {} was not {what} within {} s (replication state {state:?}); log tail:\n{}",
                p.name,
                limit.as_secs(),
                p.svc.log_tail(20)
            );
        }
        tokio::time::sleep(PROBE_POLL).await;
    }
}

async fn wait_state(probe: &reqwest::Client, p: &mut Proc<'_>, want: &str, limit: Duration) -> Result<()> {
    wait_probe(probe, p, want, limit, |s| s == Some(want)).await
}

/// Whether a client would try again: anything but a 4xx answer (other than 429). A process
/// that just died or is starting refuses or resets connections, or answers 5xx.
fn retryable(e: &anyhow::Error) -> bool {
    !e.chain().any(|c| {
        c.downcast_ref::<client::HttpStatus>()
            .is_some_and(|h| h.status < 500 && h.status != 429)
    })
}

/// Open a stream for `user` with `buckets` positions, retrying every [`RETRY`] (as an SDK does
/// after its retry delay) until `deadline`.
async fn open_retrying(endpoint: &Endpoint, user: &str, buckets: &[BucketAfter], deadline: Instant) -> Result<SyncStream> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match endpoint.open_within(user, Transport::NDJSON, buckets, remaining).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline && retryable(&e) => tokio::time::sleep(RETRY).await,
            Err(e) => return Err(e),
        }
    }
}

/// A stream for [`USER`] on `endpoint`, synced, with a row inserted and received through it
/// (so the held stream is known to be live before anything is killed). Returns the stream and
/// the bucket positions it had after its first sync.
async fn live_stream(
    endpoint: &Endpoint,
    source: &tokio_postgres::Client,
    insert: &tokio_postgres::Statement,
    list: &str,
    marker: &str,
    limit: Duration,
) -> Result<(SyncStream, Vec<BucketAfter>)> {
    let mut stream = open_retrying(endpoint, USER, &[], Instant::now() + limit).await?;
    let sync = stream
        .until_complete(Some(limit))
        .await
        .context("initial sync of the held stream")?;
    source.execute(insert, &[&marker, &list]).await.context("check insert")?;
    wait_marker(&mut stream, marker.as_bytes(), limit)
        .await
        .context("a change before the kill")?;
    Ok((stream, sync.positions()))
}

/// Both failover measurements; returns their table rows (a failed one as an error row).
pub async fn failover(t: &mut Target, opts: &FailoverOptions) -> Vec<(&'static str, &'static report::Spec, Result<Row>)> {
    let mut rows = Vec::new();
    if t.service.is_none() {
        let na =
            |m: &str, spec: &'static report::Spec| Ok(Row::new(m, "n/a (external service: needs processes the bench starts)", spec, None));
        rows.push((
            METRIC_STANDBY,
            &report::FAILOVER_STANDBY,
            na(METRIC_STANDBY, &report::FAILOVER_STANDBY),
        ));
        rows.push((
            METRIC_RESTART,
            &report::FAILOVER_RESTART,
            na(METRIC_RESTART, &report::FAILOVER_RESTART),
        ));
        return rows;
    }
    eprintln!("phase: failover with a standby ({} rounds)", opts.rounds);
    rows.push((METRIC_STANDBY, &report::FAILOVER_STANDBY, with_standby(t, opts).await));
    eprintln!("phase: failover without a standby ({} rounds)", opts.rounds);
    // The first process must be running again, whatever happened above.
    if let Some(svc) = t.service.as_mut() {
        if !svc.is_running() {
            if let Err(e) = svc.start() {
                rows.push((METRIC_RESTART, &report::FAILOVER_RESTART, Err(e)));
                return rows;
            }
        }
    }
    rows.push((METRIC_RESTART, &report::FAILOVER_RESTART, restart(t, opts).await));
    rows
}

pub const METRIC_STANDBY: &str = "failover with a standby running: kill -9 of the replicator → new row at a client of the standby";
pub const METRIC_RESTART: &str = "failover without a standby: kill -9 → restart → new row at a reconnecting client";

async fn with_standby(t: &mut Target, opts: &FailoverOptions) -> Result<Row> {
    let cpu0 = t.cpu();
    let list = any_list(t).await?;
    let (mut standby, standby_endpoint) = t.peer("standby").context("configuring the standby")?;
    let result = standby_rounds(t, &mut standby, standby_endpoint, &list, opts).await;
    // Both processes ran during the phase: charge the standby's CPU too.
    let mut cpu = t.cpu().since(&cpu0);
    cpu.service = cpu.service.map(|s| s + standby.cpu_secs().unwrap_or(0.0));
    // SIGTERM releases the lease at once if the standby replicates now; on an error path the
    // drop below kills it (the first process then takes over within its poll interval).
    if let Err(e) = standby.stop() {
        eprintln!("stopping the standby: {e:#}");
    }
    let (times, inserts) = result?;
    let value = format!(
        "p50 {}, max {}, min {} over {} rounds (INSERT committed {} p50 after the kill)",
        ms(report::median(&times)),
        ms(report::percentile(&times, 1.0)),
        ms(report::percentile(&times, 0.0)),
        times.len(),
        ms(report::median(&inserts)),
    );
    Ok(Row::new(
        format!("{METRIC_STANDBY} ({} rounds)", times.len()),
        value,
        &report::FAILOVER_STANDBY,
        Some(cpu),
    ))
}

/// The rounds with a standby: kill→arrival times and the INSERT durations, in seconds.
async fn standby_rounds(
    t: &mut Target,
    standby: &mut Service,
    standby_endpoint: Endpoint,
    list: &str,
    opts: &FailoverOptions,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let probe = probe_client()?;
    let limit = opts.timeout;
    let insert_user = prepare_insert(t).await?;
    let first_endpoint = t.endpoint.clone();
    let source = &t.source;
    let first = t.service.as_mut().context("no service")?;
    let mut a = Proc {
        name: "A (first)",
        svc: first,
        endpoint: first_endpoint,
    };
    let mut b = Proc {
        name: "B (started as standby)",
        svc: standby,
        endpoint: standby_endpoint,
    };
    wait_state(&probe, &mut a, "streaming", limit).await?;
    b.svc.start()?;
    wait_state(&probe, &mut b, "standby", limit).await?;
    let (mut replicator, mut spare) = (&mut a, &mut b);
    let (mut times, mut inserts) = (Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        // Roles are checked, not assumed: exactly one process replicates.
        wait_state(&probe, replicator, "streaming", limit).await?;
        wait_state(&probe, spare, "standby", limit).await?;
        let check = format!("fo-{}-s{round}-pre-", opts.run_id);
        let (mut stream, _) = live_stream(&spare.endpoint, source, &insert_user, list, &check, limit)
            .await
            .with_context(|| format!("round {round}: held stream on process {}", spare.name))?;
        let marker = format!("fo-{}-s{round}-", opts.run_id);
        jitter().await;
        let killed = replicator.svc.kill9()?;
        source
            .execute(&insert_user, &[&marker, &list])
            .await
            .context("insert after the kill")?;
        inserts.push(killed.elapsed().as_secs_f64());
        let arrived = wait_marker(&mut stream, marker.as_bytes(), limit).await;
        let secs = killed.elapsed().as_secs_f64();
        arrived.with_context(|| {
            format!(
                "round {round}: the row inserted after killing process {} did not reach the client of process {} ({secs:.1} s); its log tail:\n{}",
                replicator.name,
                spare.name,
                spare.svc.log_tail(20)
            )
        })?;
        times.push(secs);
        eprintln!(
            "failover round {round}: process {} killed → row at the client of process {} in {}",
            replicator.name,
            spare.name,
            ms(secs)
        );
        drop(stream);
        // The killed process comes back as the next round's standby.
        replicator.svc.reap();
        replicator.svc.start()?;
        wait_state(&probe, replicator, "standby", limit)
            .await
            .with_context(|| format!("round {round}: restarting the killed process {}", replicator.name))?;
        std::mem::swap(&mut replicator, &mut spare);
    }
    Ok((times, inserts))
}

async fn restart(t: &mut Target, opts: &FailoverOptions) -> Result<Row> {
    let cpu0 = t.cpu();
    let list = any_list(t).await?;
    let probe = probe_client()?;
    let limit = opts.timeout;
    let insert = prepare_insert(t).await?;
    let endpoint = t.endpoint.clone();
    let source = &t.source;
    let svc = t.service.as_mut().context("no service")?;
    let mut p = Proc {
        name: "only",
        svc,
        endpoint,
    };
    let (mut times, mut starts) = (Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        wait_state(&probe, &mut p, "streaming", limit).await?;
        let check = format!("fo-{}-r{round}-pre-", opts.run_id);
        let (stream, positions) = live_stream(&p.endpoint, source, &insert, &list, &check, limit)
            .await
            .with_context(|| format!("round {round}: held stream"))?;
        let marker = format!("fo-{}-r{round}-", opts.run_id);
        jitter().await;
        let killed = p.svc.kill9()?;
        // The stream died with the process; the client reconnects as an SDK would.
        drop(stream);
        let deadline = killed + limit;
        let endpoint = p.endpoint.clone();
        let client = async {
            let mut stream = open_retrying(&endpoint, USER, &positions, deadline)
                .await
                .context("reconnecting to the restarted process")?;
            let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            wait_marker(&mut stream, marker.as_bytes(), remaining)
                .await
                .context("the row inserted after the kill")?;
            anyhow::Ok(killed.elapsed().as_secs_f64())
        };
        let restart = async {
            source.execute(&insert, &[&marker, &list]).await.context("insert after the kill")?;
            p.svc.reap();
            let started = Instant::now();
            p.svc.start()?;
            wait_probe(&probe, &mut p, "answering", limit, |s| s.is_some()).await?;
            anyhow::Ok(started.elapsed().as_secs_f64())
        };
        let (secs, start) = tokio::try_join!(client, restart).with_context(|| format!("round {round}"))?;
        eprintln!(
            "restart round {round}: kill → row at the reconnected client in {} (process start {})",
            ms(secs),
            ms(start)
        );
        times.push(secs);
        starts.push(start);
    }
    let value = format!(
        "p50 {}, max {}, min {} over {} rounds; process start (exec → liveness answers) p50 {}, max {}; client retries every {} ms",
        ms(report::median(&times)),
        ms(report::percentile(&times, 1.0)),
        ms(report::percentile(&times, 0.0)),
        times.len(),
        ms(report::median(&starts)),
        ms(report::percentile(&starts, 1.0)),
        RETRY.as_millis()
    );
    Ok(Row::new(
        format!("{METRIC_RESTART} ({} rounds)", times.len()),
        value,
        &report::FAILOVER_RESTART,
        Some(t.cpu().since(&cpu0)),
    ))
}

/// The marker INSERT: one todo for the held user, description = marker.
async fn prepare_insert(t: &Target) -> Result<tokio_postgres::Statement> {
    Ok(t.source
        .prepare(&format!(
            "INSERT INTO todos (description, owner_id, list_id) VALUES ($1, '{USER}', $2::text::uuid)"
        ))
        .await?)
}
