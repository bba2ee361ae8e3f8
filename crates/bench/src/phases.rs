//! The single-client phases: snapshot, idle RSS, storage size, latency, incremental
//! replication and one-client downloads. Each returns table rows; fan-out lives in `load.rs`.
//!
//! Everything is observed through the protocol (HTTP streams) and the source database; the
//! storage database is only read for sizes, never for the service's progress.

use crate::client::{self, Endpoint, Event, SyncStream, SyncSummary, Transport};
use crate::encoding::Compression;
use crate::procstat;
use crate::report::{self, ms, rate, thousands, Report, Row};
use crate::setup::{Target, LISTS};
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// How long the initial snapshot (and a restart) may take before we give up.
pub(crate) const SNAPSHOT_LIMIT: Duration = Duration::from_secs(900);
/// Download repetitions per encoding.
const DOWNLOAD_RUNS: usize = 3;
/// Rows per source transaction in the incremental phase.
const TXN_ROWS: i64 = 1000;

/// Open a fresh NDJSON stream for `user` and read it to the first `checkpoint_complete`,
/// retrying while the service is starting up. Fails early if the owned service exits.
pub(crate) async fn first_complete(t: &mut Target, user: &str, limit: Duration) -> Result<SyncSummary> {
    let deadline = Instant::now() + limit;
    let mut stream = loop {
        t.check_service()?;
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match t.endpoint.open_within(user, Transport::NDJSON, &[], remaining).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline && client::is_transient(&e) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    };
    // No lines may arrive until the initial replication is done, so the stall limit is the
    // whole remaining budget here.
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    stream.until_complete(Some(remaining)).await
}

/// A list id for new todos (todos.list_id is a foreign key).
pub async fn any_list(t: &Target) -> Result<String> {
    let row = t
        .source
        .query_one("SELECT id::text FROM lists ORDER BY id LIMIT 1", &[])
        .await
        .context("reading a list id")?;
    Ok(row.get(0))
}

/// Phase 1: service start → first `checkpoint_complete` for u1, with the seeded data.
pub async fn snapshot(t: &mut Target, rows: i64) -> Result<Row> {
    let total = rows + LISTS;
    let metric = format!(
        "initial snapshot, {} rows (service start → u1 checkpoint_complete)",
        thousands(total as u64)
    );
    let cpu0 = t.cpu();
    let started = Instant::now();
    t.own_service()?.start()?;
    first_complete(t, "u1", SNAPSHOT_LIMIT).await.context("waiting for the snapshot")?;
    let secs = started.elapsed().as_secs_f64();
    let mut value = format!("{secs:.2} s = {} rows/s", rate(total as f64 / secs));
    // The copy is where the service's memory peaks: worth a figure beside the idle RSS.
    if let Some(peak) = t.service_pid().and_then(procstat::peak_rss_kib) {
        value += &format!("; service peak RSS {}", mib(peak));
    }
    Ok(Row::new(metric, value, &report::SNAPSHOT, Some(t.cpu().since(&cpu0))))
}

/// Phase 2: RSS after the snapshot and after a fresh restart (idle).
pub async fn idle_rss(t: &mut Target, report: &mut Report) -> Result<Row> {
    let metric = "idle RSS (fresh restart, 2 s after first checkpoint_complete)";
    let pid = t.service_pid().context("RSS needs the service pid (--service-pid in --url mode)")?;
    let cpu0 = t.cpu();
    let after_snapshot = procstat::rss_kib(pid).context("reading the service RSS")?;
    if t.service.is_none() {
        // External service: it cannot be restarted, so this is just its current idle RSS.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = procstat::rss_kib(pid).context("reading the service RSS")?;
        let value = format!("{} (external service, not restarted)", mib(rss));
        return Ok(Row::new(metric, value, &report::IDLE_RSS, Some(t.cpu().since(&cpu0))));
    }
    let restart_secs = restart(t).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = t.service_pid().context("service pid after restart")?;
    let rss = procstat::rss_kib(pid).context("reading the service RSS")?;
    report
        .notes
        .push(format!("Restart → first checkpoint_complete for u1: {restart_secs:.2} s."));
    let value = format!("{} (after snapshot, before restart: {})", mib(rss), mib(after_snapshot));
    Ok(Row::new(metric, value, &report::IDLE_RSS, Some(t.cpu().since(&cpu0))))
}

/// Own mode: stop and start the service; seconds from the start until u1's first
/// `checkpoint_complete`.
pub async fn restart(t: &mut Target) -> Result<f64> {
    let svc = t.own_service()?;
    svc.stop().context("stopping the service for the restart")?;
    let started = Instant::now();
    svc.start()?;
    first_complete(t, "u1", SNAPSHOT_LIMIT)
        .await
        .context("waiting for the restarted service")?;
    Ok(started.elapsed().as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub fn mb(bytes: i64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Phase 3: storage size vs source size, per op, plus a per-table breakdown.
pub async fn storage(t: &Target, report: &mut Report) -> Result<Row> {
    let metric = "storage size (after CHECKPOINT)";
    let size_sql = "SELECT pg_database_size(current_database())";
    // CHECKPOINT needs superuser; sizes are still meaningful without it, so it is best-effort.
    let _ = t.source.batch_execute("CHECKPOINT").await;
    let source_bytes: i64 = t.source.query_one(size_sql, &[]).await.context("source size")?.get(0);
    let ops: i64 = t
        .source
        .query_one("SELECT (SELECT count(*) FROM lists) + (SELECT count(*) FROM todos)", &[])
        .await
        .context("counting source rows")?
        .get(0);
    let Some(storage) = &t.storage else {
        let value = format!("n/a: needs --storage-uri (source {})", mb(source_bytes));
        return Ok(Row::new(metric, value, &report::STORAGE, None));
    };
    let _ = storage.batch_execute("CHECKPOINT").await;
    let storage_bytes: i64 = storage.query_one(size_sql, &[]).await.context("storage size")?.get(0);
    report.details.push(storage_breakdown(storage).await?);
    // Database sizes include ~7.5 MB of catalogs on each side, which flatters the ratio at
    // small scales: the tables-only ratio is what a live row costs.
    let (storage_tables, source_tables) = (user_tables_bytes(storage).await?, user_tables_bytes(&t.source).await?);
    let value = format!(
        "databases: storage {} / source {} = {:.2}× source; tables only: {} / {} = {:.2}×, {:.0} vs {:.0} B per row ({} ops)",
        mb(storage_bytes),
        mb(source_bytes),
        storage_bytes as f64 / source_bytes as f64,
        mb(storage_tables),
        mb(source_tables),
        storage_tables as f64 / source_tables.max(1) as f64,
        storage_tables as f64 / ops.max(1) as f64,
        source_tables as f64 / ops.max(1) as f64,
        thousands(ops as u64),
    );
    Ok(Row::new(metric, value, &report::STORAGE, None))
}

/// Tables outside the system schemas, with `pg_total_relation_size` (indexes and TOAST included).
const USER_TABLES: &str = "SELECT n.nspname || '.' || c.relname, pg_total_relation_size(c.oid)
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
       AND n.nspname NOT LIKE 'pg_toast%'
     ORDER BY 2 DESC";

async fn user_tables_bytes(db: &tokio_postgres::Client) -> Result<i64> {
    let rows = db.query(USER_TABLES, &[]).await.context("table sizes")?;
    Ok(rows.iter().map(|r| r.get::<_, i64>(1)).sum())
}

/// `pg_total_relation_size` of every table outside the system schemas of the storage DB.
async fn storage_breakdown(storage: &tokio_postgres::Client) -> Result<String> {
    let rows = storage.query(USER_TABLES, &[]).await.context("storage table sizes")?;
    let parts: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}", r.get::<_, String>(0), mb(r.get::<_, i64>(1))))
        .collect();
    Ok(format!(
        "Storage breakdown (pg_total_relation_size, incl. indexes and TOAST): {}",
        parts.join(", ")
    ))
}

/// Phase 4: single-row INSERT (autocommit) → `data` line with its marker at a held stream.
pub async fn latency(t: &mut Target, samples: usize, run_id: &str, stall: Duration, report: &mut Report) -> Result<Row> {
    let metric = format!("commit → client latency, {samples} single-row inserts, one held stream");
    let list = any_list(t).await?;
    let mut stream = t.endpoint.open("u1", Transport::NDJSON, &[]).await?;
    stream.until_complete(Some(stall)).await.context("initial sync of u1")?;
    let insert = t
        .source
        .prepare("INSERT INTO todos (description, owner_id, list_id) VALUES ($1, 'u1', $2::text::uuid)")
        .await?;
    // Warm-up, not counted: right after a restart replication may still be resuming, which is
    // a different thing from steady-state latency. Its time is reported if it stands out.
    let warm = Instant::now();
    let marker = format!("lat-{run_id}-warmup-");
    t.source.execute(&insert, &[&marker, &list]).await.context("warm-up insert")?;
    wait_marker(&mut stream, marker.as_bytes(), SNAPSHOT_LIMIT)
        .await
        .context("warm-up change")?;
    let warm = warm.elapsed().as_secs_f64();
    if warm > 1.0 {
        report.notes.push(format!(
            "Latency warm-up: the first change after the restart took {warm:.1} s to reach the client."
        ));
    }
    let cpu0 = t.cpu();
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        // Trailing '-' so that marker 1 does not match inside marker 10.
        let marker = format!("lat-{run_id}-{i}-");
        let t0 = Instant::now();
        t.source.execute(&insert, &[&marker, &list]).await.context("latency insert")?;
        wait_marker(&mut stream, marker.as_bytes(), stall)
            .await
            .with_context(|| format!("sample {i}"))?;
        lat.push(t0.elapsed().as_secs_f64());
    }
    let pct = |p| ms(report::percentile(&lat, p));
    let value = format!("p50 {}, p99 {}, max {}", pct(0.5), pct(0.99), pct(1.0));
    Ok(Row::new(metric, value, &report::LATENCY, Some(t.cpu().since(&cpu0))))
}

pub async fn wait_marker(stream: &mut SyncStream, marker: &[u8], stall: Duration) -> Result<()> {
    loop {
        if let (Event::Data { .. }, true) = stream.next_marked(Some(stall), marker).await? {
            return Ok(());
        }
    }
}

/// A user that owns no todos yet: `big`, or a run-specific name when `big` is taken (external
/// mode with a database from an earlier run).
pub async fn fresh_big_user(t: &Target, run_id: &str) -> Result<String> {
    let n: i64 = t
        .source
        .query_one("SELECT count(*) FROM todos WHERE owner_id = 'big'", &[])
        .await?
        .get(0);
    Ok(if n == 0 { "big".into() } else { format!("big-{run_id}") })
}

/// Phase 5: `rows` todos for `user` in 1,000-row transactions → all of them at a held stream.
pub async fn incremental(t: &mut Target, user: &str, rows: i64, stall: Duration) -> Result<Row> {
    let metric = format!(
        "incremental replication, {} rows in {}-row txns (first INSERT → last row at client)",
        thousands(rows as u64),
        thousands(TXN_ROWS as u64)
    );
    let list = any_list(t).await?;
    let mut stream = t.endpoint.open(user, Transport::NDJSON, &[]).await?;
    let initial = stream.until_complete(Some(stall)).await.context("initial sync of the big user")?;
    // Buckets that had data before this user owned any todos are shared ones (the global
    // bucket); the new rows arrive in the other bucket(s), whatever they are called.
    let shared: Vec<String> = initial.received.iter().map(|r| r.0.clone()).collect();
    let expected = usize::try_from(rows).context("--incremental-rows")?;
    let reader = tokio::spawn(count_new_ops(stream, shared, expected, stall));
    let insert = t
        .source
        .prepare(
            "INSERT INTO todos (description, owner_id, list_id)
             SELECT 'inc ' || g, $1, $2::text::uuid FROM generate_series($3::bigint, $4::bigint) g",
        )
        .await?;
    let cpu0 = t.cpu();
    let t0 = Instant::now();
    for first in (0..rows).step_by(TXN_ROWS as usize) {
        let last = (first + TXN_ROWS).min(rows) - 1;
        t.source
            .execute(&insert, &[&user, &list, &first, &last])
            .await
            .context("incremental insert")?;
    }
    let inserts = t0.elapsed().as_secs_f64();
    let done = reader.await.context("reader task")??;
    let secs = done.duration_since(t0).as_secs_f64();
    let value = format!("{secs:.2} s = {} rows/s (inserts alone {inserts:.2} s)", rate(rows as f64 / secs));
    Ok(Row::new(metric, value, &report::INCREMENTAL, Some(t.cpu().since(&cpu0))))
}

/// Count ops outside `shared` buckets until `expected` arrived; returns when the last did.
pub async fn count_new_ops(mut stream: SyncStream, shared: Vec<String>, expected: usize, stall: Duration) -> Result<Instant> {
    let mut seen = 0;
    while seen < expected {
        let event = stream
            .next_event(Some(stall))
            .await
            .with_context(|| format!("after {seen} of {expected} rows"))?;
        if let Event::Data { bucket, ops, .. } = event {
            if !shared.contains(&bucket) {
                seen += ops;
            }
        }
    }
    Ok(Instant::now())
}

/// Phase 6: fresh full download for `user`, best and median of three runs, asking for
/// `compression` on HTTP (bytes per op are then counted on the wire, and decoded).
pub async fn download(
    t: &mut Target,
    user: &str,
    transport: Transport,
    compression: Compression,
    stall: Duration,
    report: &mut Report,
) -> Result<Row> {
    let endpoint = Endpoint {
        compression,
        ..t.endpoint.clone()
    };
    let cpu0 = t.cpu();
    let mut rates = Vec::new();
    let mut times = Vec::new();
    let (mut ops, mut bytes, mut decoded) = (0, 0, 0);
    for run in 0..DOWNLOAD_RUNS {
        let t0 = Instant::now();
        let mut stream = endpoint.open(user, transport, &[]).await?;
        if let Transport::Http(format) = transport {
            if stream.format() != format {
                report.notes.push(format!(
                    "Asked for {} but the service answered {}.",
                    format.name(),
                    stream.format().name()
                ));
            }
        }
        if compression != Compression::Identity && !stream.compressed() {
            report
                .notes
                .push(format!("Asked for {compression:?} but the service answered uncompressed."));
        }
        let sync = stream.until_complete(Some(stall)).await.with_context(|| format!("run {run}"))?;
        let secs = t0.elapsed().as_secs_f64();
        (ops, bytes, decoded) = (sync.ops(), stream.body_bytes(), stream.decoded_bytes());
        times.push(secs);
        rates.push(ops as f64 / secs);
    }
    let cpu = t.cpu().since(&cpu0);
    let best = rates.iter().copied().fold(0.0, f64::max);
    let best_secs = times.iter().copied().fold(f64::INFINITY, f64::min);
    let encoding = match compression.accept_encoding() {
        Some(e) => format!(" + {e}"),
        None => String::new(),
    };
    let metric = format!(
        "download to one client, {} ops, {}{encoding} ({DOWNLOAD_RUNS} runs)",
        thousands(ops as u64),
        transport.name()
    );
    let per_op = |b: u64| b as f64 / ops.max(1) as f64;
    let mut value = format!(
        "best {best_secs:.2} s = {} ops/s, median {} ops/s; {:.0} B/op",
        rate(best),
        rate(report::median(&rates)),
        per_op(bytes)
    );
    if bytes != decoded {
        value.push_str(&format!(" on the wire, {:.0} B/op decoded", per_op(decoded)));
    }
    Ok(Row::new(metric, value, report::download_spec(transport), Some(cpu)))
}
