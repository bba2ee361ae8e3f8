//! Fan-out: many held streams from one process, and one INSERT delivered to all of them.
//!
//! Each stream is one tokio task on one connection: an HTTP/1.1 `POST /sync/stream` (NDJSON) or a
//! WebSocket (RSocket, BSON lines), the transport being a parameter of the phase. The pool grows in steps (e.g. 100,
//! then +900, then +9,000) so each size is measured with the streams of the previous step still
//! held. Streams resume the shared (global) bucket at its current position, learned from a probe
//! stream, so connecting measures connection setup and checkpoint work, not 1,000-op downloads.
//! In own mode the service is restarted before each transport's pool, so that both pools'
//! per-stream RSS is measured from a fresh process.
//!
//! Per stream the task keeps only the connection and an unfinished-line buffer; a line is parsed
//! only if it contains the run's marker prefix, so idle `token_expires_in` lines cost nearly
//! nothing on the client side.

use crate::client::{self, BucketAfter, Endpoint, Format, Transport};
use crate::report::{self, ms, thousands, Report, Row, CONNECT};
use crate::setup::Target;
use crate::{phases, procstat};
use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Streams connecting at the same time.
const CONNECT_IN_FLIGHT: usize = 256;
/// Errors kept verbatim for the report.
const KEEP_ERRORS: usize = 5;

pub struct FanoutOptions {
    pub transport: Transport,
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub run_id: String,
    /// Longest wait without progress (connecting) or for one round.
    pub timeout: Duration,
}

/// State shared by the stream tasks and the driver.
struct Shared {
    /// Marker prefix in list names: `fan-<run>-<transport>-`, followed by the round id and '-'.
    /// Each pool counts its rounds from 1, so the transport keeps them apart: the restart
    /// before a pool may replay the previous pool's last round (Postgres re-sends what was not
    /// yet acknowledged), and a new stream would take that for its own round.
    prefix: Vec<u8>,
    /// Streams that should be alive (pool size).
    expected: AtomicUsize,
    ready: AtomicUsize,
    failed: AtomicUsize,
    /// Slowest open → first checkpoint_complete so far, in microseconds (outliers such as SYN
    /// retransmits or 429 retries show up here, not in the total).
    slowest_connect_us: AtomicU64,
    errors: Mutex<Vec<String>>,
    round: Mutex<Round>,
    /// Wakes the driver when a wait condition may have become true (notify_one keeps a permit,
    /// so a wake-up between the driver's check and its wait is not lost).
    changed: Notify,
}

struct Round {
    id: u64,
    start: Instant,
    /// Seconds from just before the INSERT until each client saw the marker.
    arrivals: Vec<f64>,
}

impl Shared {
    fn lock_round(&self) -> std::sync::MutexGuard<'_, Round> {
        // A panicking stream task cannot leave Round inconsistent (plain pushes), so a poisoned
        // lock is still usable.
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arrive(&self, round: u64, at: Instant) {
        let mut r = self.lock_round();
        if r.id != round {
            return;
        }
        let dt = at.saturating_duration_since(r.start).as_secs_f64();
        r.arrivals.push(dt);
        if r.arrivals.len() + self.failed.load(Ordering::SeqCst) >= self.expected.load(Ordering::SeqCst) {
            self.changed.notify_one();
        }
    }

    fn connected(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.slowest_connect_us.fetch_max(us, Ordering::SeqCst);
        let ready = self.ready.fetch_add(1, Ordering::SeqCst) + 1;
        if ready + self.failed.load(Ordering::SeqCst) >= self.expected.load(Ordering::SeqCst) {
            self.changed.notify_one();
        }
    }

    fn fail(&self, user: &str, err: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < KEEP_ERRORS {
            errors.push(format!("{user}: {err:#}"));
        }
        drop(errors);
        self.changed.notify_one();
    }

    /// Wait until `done()` holds; `Err` after `limit` without `progress()` changing.
    async fn wait(&self, limit: Duration, done: impl Fn() -> bool, progress: impl Fn() -> usize) -> Result<()> {
        let mut last = (progress(), Instant::now());
        while !done() {
            let _ = tokio::time::timeout(Duration::from_millis(500), self.changed.notified()).await;
            let now = progress();
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > limit {
                bail!("no progress for {} s", limit.as_secs());
            }
        }
        Ok(())
    }
}

/// The pool of held streams.
struct Pool {
    endpoint: Arc<Endpoint>,
    transport: Transport,
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    gate: Arc<Semaphore>,
    size: usize,
    timeout: Duration,
}

impl Pool {
    /// Add streams for users f{size}..f{to-1}; returns seconds until all reached checkpoint_complete.
    async fn grow(&mut self, to: usize, resume: Arc<Vec<BucketAfter>>) -> Result<f64> {
        self.shared.expected.store(to, Ordering::SeqCst);
        let t0 = Instant::now();
        for i in self.size..to {
            // A permit frees up whenever a stream finishes connecting (or fails); none in a whole
            // timeout means the service stopped answering.
            let permit = tokio::time::timeout(self.timeout, self.gate.clone().acquire_owned())
                .await
                .with_context(|| {
                    format!(
                        "connecting: no stream finished connecting for {} s ({i} started)",
                        self.timeout.as_secs()
                    )
                })?
                .context("connect gate closed")?;
            let task = hold(
                self.endpoint.clone(),
                self.transport,
                format!("f{i}"),
                resume.clone(),
                self.shared.clone(),
                permit,
                self.timeout,
            );
            self.tasks.spawn(task);
        }
        self.size = to;
        let s = &self.shared;
        let settled = || s.ready.load(Ordering::SeqCst) + s.failed.load(Ordering::SeqCst);
        s.wait(self.timeout, || settled() >= to, settled)
            .await
            .with_context(|| format!("connecting: {} of {to} ready", s.ready.load(Ordering::SeqCst)))?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// One round: INSERT a marked list, wait until every live stream saw it.
    async fn round(&self, source: &tokio_postgres::Client, id: u64) -> Result<Vec<f64>> {
        let name = format!("{}{id}-", String::from_utf8_lossy(&self.shared.prefix));
        {
            let mut r = self.shared.lock_round();
            r.id = id;
            r.arrivals.clear();
            r.start = Instant::now();
        }
        source
            .execute("INSERT INTO lists (name, owner_id) VALUES ($1, 'bench')", &[&name])
            .await
            .context("fan-out insert")?;
        let s = &self.shared;
        let seen = || s.lock_round().arrivals.len();
        let done = || seen() + s.failed.load(Ordering::SeqCst) >= self.size;
        let waited = tokio::time::timeout(self.timeout, s.wait(self.timeout, done, seen)).await;
        let arrivals = std::mem::take(&mut s.lock_round().arrivals);
        if !matches!(waited, Ok(Ok(()))) {
            bail!(
                "round {id}: only {} of {} clients got the row within {} s",
                arrivals.len(),
                self.size,
                self.timeout.as_secs()
            );
        }
        Ok(arrivals)
    }
}

/// One held stream: connect, initial sync, then watch for round markers until aborted.
async fn hold(
    ep: Arc<Endpoint>,
    transport: Transport,
    user: String,
    resume: Arc<Vec<BucketAfter>>,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
    stall: Duration,
) {
    let err = match hold_inner(&ep, transport, &user, &resume, &shared, permit, stall).await {
        Ok(()) => anyhow::anyhow!("stream ended"),
        Err(e) => e,
    };
    shared.fail(&user, &err);
}

async fn hold_inner(
    ep: &Endpoint,
    transport: Transport,
    user: &str,
    resume: &[BucketAfter],
    shared: &Shared,
    permit: OwnedSemaphorePermit,
    stall: Duration,
) -> Result<()> {
    let t0 = Instant::now();
    let mut stream = ep.open_within(user, transport, resume, stall).await?;
    stream.until_complete(Some(stall)).await.context("initial checkpoint")?;
    drop(permit);
    shared.connected(t0.elapsed());
    let mut last_round = 0;
    loop {
        let found = stream
            .next_with(None, |format, line| marker_round(format, line, &shared.prefix))
            .await?;
        match found {
            None => return Ok(()),
            Some(Some(round)) if round > last_round => {
                shared.arrive(round, Instant::now());
                last_round = round;
            }
            Some(_) => {}
        }
    }
}

/// The round id in a `data` line carrying the marker prefix, if any.
fn marker_round(format: Format, line: &[u8], prefix: &[u8]) -> Result<Option<u64>> {
    let Some(at) = memchr::memmem::find(line, prefix) else {
        return Ok(None);
    };
    if !matches!(client::parse(format, line)?, client::Event::Data { .. }) {
        return Ok(None);
    }
    let digits: Vec<u8> = line[at + prefix.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    Ok(std::str::from_utf8(&digits).ok().and_then(|d| d.parse().ok()))
}

/// Learn the shared buckets and their current positions from one fresh stream.
async fn probe(ep: &Endpoint, run_id: &str, stall: Duration) -> Result<Vec<BucketAfter>> {
    let mut stream = ep.open(&format!("fprobe-{run_id}"), Transport::NDJSON, &[]).await?;
    let sync = stream.until_complete(Some(stall)).await.context("probe stream")?;
    Ok(sync.positions())
}

/// Phase 7: connect the pool in steps and measure fan-out at each size.
pub async fn fanout(t: &mut Target, opts: &FanoutOptions, report: &mut Report) -> Result<()> {
    let limit = procstat::raise_nofile_limit()?;
    let largest = opts.sizes.iter().copied().max().unwrap_or(0);
    if (largest as u64) + 100 > limit {
        report.notes.push(format!(
            "Open-files limit {limit} is below the largest fan-out {largest}: expect failures."
        ));
    }
    // Own mode: each pool starts on a fresh process. Memory that an earlier pool (of the other
    // transport) left in the allocator would otherwise be reused and flatter the per-stream RSS.
    let restarted = t.service.is_some();
    if restarted {
        phases::restart(t).await.context("restarting the service before the pool")?;
    }
    let rss_before = t.service_pid().and_then(procstat::rss_kib);
    if let Some(kib) = procstat::rss_kib(std::process::id()) {
        report.notes.push(format!(
            "Bench (client) RSS before the {} pool: {:.1} MiB (the allocator keeps what earlier phases freed).",
            opts.transport.name(),
            kib as f64 / 1024.0
        ));
    }
    let mut pool = Pool {
        endpoint: Arc::new(Endpoint::new(&t.endpoint.url, t.endpoint.auth.clone())?),
        transport: opts.transport,
        shared: Arc::new(Shared {
            prefix: format!("fan-{}-{}-", opts.run_id, opts.transport.name().to_lowercase().replace(' ', "-")).into_bytes(),
            expected: AtomicUsize::new(0),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            slowest_connect_us: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            round: Mutex::new(Round {
                id: 0,
                start: Instant::now(),
                arrivals: Vec::new(),
            }),
            changed: Notify::new(),
        }),
        tasks: JoinSet::new(),
        gate: Arc::new(Semaphore::new(CONNECT_IN_FLIGHT)),
        size: 0,
        timeout: opts.timeout,
    };
    let mut round_id = 0;
    let mut rss_rows = Vec::new();
    let result = run_sizes(t, opts, report, &mut pool, &mut round_id, rss_before, &mut rss_rows).await;
    pool.tasks.shutdown().await;
    report_streams(&pool, report);
    if let Some(row) = per_connection_row(opts.transport, restarted, rss_before, &rss_rows, report) {
        report.rows.push(row);
    }
    result
}

async fn run_sizes(
    t: &mut Target,
    opts: &FanoutOptions,
    report: &mut Report,
    pool: &mut Pool,
    round_id: &mut u64,
    rss_before: Option<u64>,
    rss_rows: &mut Vec<(usize, u64)>,
) -> Result<()> {
    for &n in &opts.sizes {
        if n <= pool.size {
            continue;
        }
        let added = n - pool.size;
        // Re-probe: earlier rounds added lists, and new streams should start at the head.
        let resume = Arc::new(probe(&pool.endpoint, &opts.run_id, opts.timeout).await?);
        let cpu0 = t.cpu();
        let metric = format!(
            "connect {} held {} streams (+{}, {CONNECT_IN_FLIGHT} in flight)",
            thousands(n as u64),
            opts.transport.name(),
            thousands(added as u64)
        );
        let secs = match pool.grow(n, resume).await {
            Ok(s) => s,
            Err(e) => {
                report.failed(&metric, &CONNECT, &e);
                return Err(e);
            }
        };
        let slowest = pool.shared.slowest_connect_us.swap(0, Ordering::SeqCst) as f64 / 1e6;
        let value = format!("{secs:.2} s = {:.0} streams/s; slowest stream {}", added as f64 / secs, ms(slowest));
        report.rows.push(Row::new(metric, value, &CONNECT, Some(t.cpu().since(&cpu0))));
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let (Some(_), Some(rss)) = (rss_before, t.service_pid().and_then(procstat::rss_kib)) {
            rss_rows.push((n, rss));
        }
        // The client side must stay light too; its RSS shows whether it does.
        if let Some(own) = procstat::rss_kib(std::process::id()) {
            report.notes.push(format!(
                "Bench (client) RSS with {} held {} streams: {:.1} MiB.",
                thousands(n as u64),
                opts.transport.name(),
                own as f64 / 1024.0
            ));
        }
        rounds(t, opts, report, pool, round_id, n).await?;
    }
    Ok(())
}

/// `opts.rounds` rounds at pool size `n`; pushes one row.
async fn rounds(t: &mut Target, opts: &FanoutOptions, report: &mut Report, pool: &Pool, round_id: &mut u64, n: usize) -> Result<()> {
    let metric = format!(
        "fan-out: 1 list INSERT → all {} {} clients ({} rounds)",
        thousands(n as u64),
        opts.transport.name(),
        opts.rounds
    );
    let spec = report::fanout_spec(opts.transport, n);
    let failed_before = pool.shared.failed.load(Ordering::SeqCst);
    let cpu0 = t.cpu();
    let (mut lasts, mut p50s, mut firsts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.rounds {
        *round_id += 1;
        let arrivals = match pool.round(&t.source, *round_id).await {
            Ok(a) => a,
            Err(e) => {
                report.failed(&metric, spec, &e);
                return Err(e);
            }
        };
        lasts.push(arrivals.iter().copied().fold(0.0, f64::max));
        firsts.push(arrivals.iter().copied().fold(f64::INFINITY, f64::min));
        p50s.push(report::median(&arrivals));
        // Let the checkpoint_complete lines of this round drain before the next INSERT.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = t.cpu().since(&cpu0);
    let failed = pool.shared.failed.load(Ordering::SeqCst) - failed_before;
    let mut value = format!(
        "last client: median {}, best {}; p50 client: median {}; first client: median {}",
        ms(report::median(&lasts)),
        ms(lasts.iter().copied().fold(f64::INFINITY, f64::min)),
        ms(report::median(&p50s)),
        ms(report::median(&firsts)),
    );
    if failed > 0 {
        value += &format!("; {failed} streams FAILED");
    }
    report.rows.push(Row::new(metric, value, spec, Some(cpu)));
    Ok(())
}

fn report_streams(pool: &Pool, report: &mut Report) {
    let failed = pool.shared.failed.load(Ordering::SeqCst);
    // Aborted tasks (shutdown) do not count: abort drops the future without reaching fail().
    if failed > 0 {
        let errors = pool.shared.errors.lock().unwrap_or_else(|p| p.into_inner());
        report.notes.push(format!(
            "Fan-out ({}): {failed} of {} streams failed or ended early; first errors: {}",
            pool.transport.name(),
            pool.size,
            errors.join(" / ")
        ));
    }
}

/// KiB of service RSS per held stream, from the largest pool measured.
fn per_connection_row(
    transport: Transport,
    restarted: bool,
    before: Option<u64>,
    after: &[(usize, u64)],
    report: &mut Report,
) -> Option<Row> {
    let before = before?;
    let &(n, rss) = after.last()?;
    let per = |n: usize, rss: u64| (rss as f64 - before as f64) / n as f64;
    let all: Vec<String> = after
        .iter()
        .map(|&(n, rss)| format!("{} streams {:.1} KiB", thousands(n as u64), per(n, rss)))
        .collect();
    report.notes.push(format!(
        "Service RSS per held {} stream: {} (RSS before the pool {:.1} MiB, {}).",
        transport.name(),
        all.join(", "),
        before as f64 / 1024.0,
        if restarted {
            "service restarted for the pool"
        } else {
            "external service, not restarted: memory kept from earlier phases can make the figure low"
        }
    ));
    let value = format!(
        "{:.1} KiB/stream at {} streams ({:.1} → {:.1} MiB)",
        per(n, rss),
        thousands(n as u64),
        before as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    let metric = format!("service RSS per held {} stream", transport.name());
    Some(Row::new(metric, value, report::per_connection_spec(transport), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_round_in_marked_data_line() {
        let line =
            br#"{"data":{"bucket":"global[]","after":"1","next_after":"2","data":[{"op_id":"2","data":"{\"name\":\"fan-x-17-\"}"}]}}"#;
        assert_eq!(marker_round(Format::Ndjson, line, b"fan-x-").expect("parse"), Some(17));
        assert_eq!(marker_round(Format::Ndjson, line, b"fan-y-").expect("parse"), None);
    }
}
