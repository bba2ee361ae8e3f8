//! `ferrosync-bench`: a side-by-side benchmark suite driven only through the public protocol.
//!
//! By default it sets up its own Postgres (fsync on) with the sample todo schema and data,
//! starts a service binary, and measures: initial snapshot, idle RSS, storage size, commit →
//! client latency, incremental replication, one-client downloads (NDJSON and BSON over HTTP,
//! BSON over WebSocket), fan-out to many held streams (per transport), compaction (a churned
//! bucket before and after `ferrosync compact`) and `kill -9` failover (with a standby process, and with a restart). With `--url` and `--source-uri` it measures an already running
//! PowerSync-compatible service instead. Results are printed as a markdown table (with the
//! reference service's numbers and our targets) and appended to bench/RESULTS.md.

mod client;
mod compaction;
mod deploy;
mod encoding;
mod eval;
mod failover;
mod load;
mod phases;
mod procstat;
mod report;
mod rsocket;
mod setup;
mod ws;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
// The evaluation phase stands in for the replicator, which runs on mimalloc: measure it with
// the same allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use client::{Auth, Format, Transport};
use encoding::Compression;
use report::{Report, Row};
use setup::{Target, TargetOptions};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(about = "Benchmark a PowerSync-compatible sync service through its public protocol")]
struct Args {
    /// Todos seeded before the snapshot (plus 1,000 lists).
    #[arg(long, default_value_t = 200_000)]
    rows: i64,
    /// Todos inserted for one user while a stream is held (1,000-row transactions).
    #[arg(long, default_value_t = 100_000)]
    incremental_rows: i64,
    /// Single-row inserts in the latency phase.
    #[arg(long, default_value_t = 200)]
    latency_samples: usize,
    /// Pool sizes for the fan-out phase; the pool grows from one size to the next.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    fanout: Vec<usize>,
    /// Rounds (one INSERT each) per fan-out size.
    #[arg(long, default_value_t = 5)]
    fanout_rounds: usize,
    /// Rows of one user updated over and over in the compaction phase.
    #[arg(long, default_value_t = 10_000)]
    churn_rows: i64,
    /// Updates in the compaction phase (every row in turn, one transaction per round).
    #[arg(long, default_value_t = 1_000_000)]
    churn_updates: i64,
    /// kill -9 rounds in the failover phase (each: with a standby, and restart without one).
    #[arg(long, default_value_t = 5)]
    failover_rounds: usize,
    /// Service binary to start (own mode).
    #[arg(long, default_value = "target/release/ferrosync")]
    bin: PathBuf,
    /// Print only; do not append to the results file.
    #[arg(long)]
    no_append: bool,
    /// Results file to append to.
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: PathBuf,
    /// Transports the download and fan-out phases use (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "http,websocket")]
    transports: Vec<TransportChoice>,
    /// Phases to skip (comma-separated).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<Phase>,
    /// Longest wait for progress anywhere (a line, a round, a connection step), in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// External mode: URL of a running service (needs --source-uri).
    #[arg(long, requires = "source_uri")]
    url: Option<String>,
    /// External mode: Postgres URI of the service's source database (todo schema loaded).
    #[arg(long, requires = "url")]
    source_uri: Option<String>,
    /// HS256 secret the service accepts for client tokens.
    #[arg(long, default_value = "bench-secret")]
    jwt_secret: String,
    /// Key id (`kid`) for client tokens.
    #[arg(long, default_value = "k1")]
    jwt_kid: String,
    /// Audience (`aud`) for client tokens.
    #[arg(long, default_value = "bench")]
    jwt_aud: String,
    /// External mode: service pid, for RSS and CPU.
    #[arg(long)]
    service_pid: Option<u32>,
    /// External mode: Postgres URI of the service's storage database, for its size.
    #[arg(long)]
    storage_uri: Option<String>,
    /// What the download phase asks for in `Accept-Encoding` (comma-separated; each with
    /// NDJSON and BSON).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "identity")]
    download_encodings: Vec<Compression>,
    /// Sync config the service runs: the legacy todo rules, or ten edition-3 streams.
    #[arg(long, value_enum, default_value_t = RulesChoice::Legacy)]
    rules: RulesChoice,
    /// Serve the Prometheus endpoint (`telemetry.prometheus_port`) from the service.
    #[arg(long)]
    metrics: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RulesChoice {
    Legacy,
    Streams,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TransportChoice {
    /// `POST /sync/stream`: NDJSON and BSON downloads, NDJSON held streams.
    Http,
    /// RSocket over WebSocket (BSON lines).
    Websocket,
}

/// Phases that `--skip` accepts (the snapshot starts the service, so it always runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Phase {
    Eval,
    Idle,
    Storage,
    Latency,
    Incremental,
    Download,
    Fanout,
    Compaction,
    Failover,
    Deploy,
}

impl Args {
    fn runs(&self, phase: Phase) -> bool {
        !self.skip.contains(&phase)
    }

    /// The transports of the download phase, in table order.
    fn downloads(&self) -> Vec<Transport> {
        let mut out = Vec::new();
        if self.transports.contains(&TransportChoice::Http) {
            out.extend([Transport::NDJSON, Transport::Http(Format::Bson)]);
        }
        if self.transports.contains(&TransportChoice::Websocket) {
            out.push(Transport::WebSocket);
        }
        out
    }

    /// The transports of the fan-out phase, in table order.
    fn held(&self) -> Vec<Transport> {
        self.downloads()
            .into_iter()
            .filter(|&t| t != Transport::Http(Format::Bson))
            .collect()
    }

    fn stall(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    fn target_options(&self) -> TargetOptions {
        TargetOptions {
            rows: self.rows,
            bin: self.bin.clone(),
            auth: Auth {
                secret: self.jwt_secret.clone(),
                kid: self.jwt_kid.clone(),
                audience: self.jwt_aud.clone(),
            },
            external: self.url.clone().zip(self.source_uri.clone()),
            service_pid: self.service_pid,
            storage_uri: self.storage_uri.clone(),
            rules: match self.rules {
                RulesChoice::Legacy => setup::LEGACY_RULES,
                RulesChoice::Streams => setup::STREAM_RULES,
            },
            metrics: self.metrics,
        }
    }

    /// Describes the setup for the results heading.
    fn mode(&self) -> String {
        let scale = format!(
            "rules {:?}, rows {}, incremental {}, latency samples {}, fan-out {:?} × {} rounds, failover {} rounds, transports {:?}, metrics endpoint {}",
            self.rules,
            self.rows,
            self.incremental_rows,
            self.latency_samples,
            self.fanout,
            self.fanout_rounds,
            self.failover_rounds,
            self.transports,
            if self.metrics { "on" } else { "off" }
        );
        match &self.url {
            Some(url) => format!("external service {url}; {scale}"),
            None => format!(
                "own Postgres (fsync on), service {}; service + Postgres + bench on one machine; {scale}",
                self.bin.display()
            ),
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Before anything is spawned, so the service child inherits the raised limit too.
    procstat::raise_nofile_limit()?;
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        .to_string();
    let mut report = Report::default();
    // Before Postgres exists: the one-core figure is not shared with the seeding's aftermath
    // (checkpoint, autovacuum of the new tables) on the other core.
    if args.runs(Phase::Eval) {
        let rows = args.rows.max(1) as usize;
        let r = tokio::task::spawn_blocking(move || eval::rules_eval(rows)).await?;
        record(&mut report, "sync-config evaluation", &report::EVAL, r);
    }
    eprintln!("setting up ({} rows)...", args.rows);
    let mut target = setup::prepare(&args.target_options()).await.context("setting up")?;
    // On Ctrl-C / SIGTERM (e.g. from `timeout`) stop the phases but still run the cleanup
    // below, so no service or Postgres process outlives the bench.
    let result = tokio::select! {
        r = run(&mut target, &args, &run_id, &mut report) => r,
        s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}")),
    };
    if let Err(e) = &result {
        eprintln!("aborted: {e:#}");
    }
    service_log_note(&target, &mut report);
    target.shutdown();
    drop(target);
    scale_notes(&args, &mut report);
    let heading = report::heading(&args.mode());
    let body = report.markdown();
    println!("{heading}\n\n{body}");
    if !args.no_append {
        report::append(&args.results, &heading, &body)?;
    }
    // A failed phase fails the run (CI runs a small one to keep the tool working).
    match report.failures() {
        0 => result,
        n => result.and(Err(anyhow::anyhow!("{n} phase(s) failed; see the table"))),
    }
}

/// Resolves on SIGINT or SIGTERM, naming the signal.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        // Without handlers the default action (exit) applies; never resolve.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// The phases after the evaluation, in order. Only a failure to get the service synced at all
/// aborts the run; other phase failures are recorded in the table and the run continues.
async fn run(t: &mut Target, args: &Args, run_id: &str, report: &mut Report) -> Result<()> {
    start(t, args, report).await?;
    if args.runs(Phase::Idle) {
        if t.service_pid().is_some() {
            let r = phases::idle_rss(t, report).await;
            record(report, "idle RSS", &report::IDLE_RSS, r);
        } else {
            report
                .rows
                .push(Row::new("idle RSS", "n/a (needs --service-pid)", &report::IDLE_RSS, None));
        }
    }
    if args.runs(Phase::Storage) {
        let r = phases::storage(t, report).await;
        record(report, "storage size", &report::STORAGE, r);
    }
    if args.runs(Phase::Latency) {
        let r = phases::latency(t, args.latency_samples, run_id, args.stall(), report).await;
        record(report, "commit → client latency", &report::LATENCY, r);
    }
    let big = phases::fresh_big_user(t, run_id).await?;
    if args.runs(Phase::Incremental) {
        let r = phases::incremental(t, &big, args.incremental_rows, args.stall()).await;
        record(report, "incremental replication", &report::INCREMENTAL, r);
    }
    if args.runs(Phase::Download) {
        for &compression in &args.download_encodings {
            for transport in args.downloads() {
                if compression != Compression::Identity && transport == Transport::WebSocket {
                    continue; // WebSocket frames are never compressed
                }
                let r = phases::download(t, &big, transport, compression, args.stall(), report).await;
                let encoding = compression.accept_encoding().map(|e| format!(" + {e}")).unwrap_or_default();
                let metric = format!("download to one client ({}{encoding})", transport.name());
                record(report, &metric, report::download_spec(transport), r);
            }
        }
    }
    if args.runs(Phase::Fanout) {
        for transport in args.held() {
            let opts = load::FanoutOptions {
                transport,
                sizes: args.fanout.clone(),
                rounds: args.fanout_rounds,
                run_id: run_id.to_string(),
                timeout: args.stall(),
            };
            // Failures are already in the table; the run goes on to shut down cleanly.
            if let Err(e) = load::fanout(t, &opts, report).await {
                eprintln!("fan-out ({}) stopped: {e:#}", transport.name());
            }
        }
    }
    if args.runs(Phase::Compaction) {
        let r = compaction::compaction(t, run_id, args.churn_rows, args.churn_updates, args.stall()).await;
        record(report, "compaction", &report::COMPACTION, r);
    }
    // Near the end: it kills and restarts service processes.
    if args.runs(Phase::Failover) {
        let opts = failover::FailoverOptions {
            rounds: args.failover_rounds,
            run_id: run_id.to_string(),
            timeout: args.stall(),
        };
        for (metric, spec, r) in failover::failover(t, &opts).await {
            record(report, metric, spec, r);
        }
    }
    // After everything else: it changes the sync config.
    if args.runs(Phase::Deploy) {
        for (metric, spec, r) in deploy::deploy(t, args.rows, args.stall()).await {
            record(report, metric, spec, r);
        }
    }
    Ok(())
}

/// Own mode: start the service and time the snapshot. External mode: make sure it serves u1.
async fn start(t: &mut Target, args: &Args, report: &mut Report) -> Result<()> {
    if t.service.is_some() {
        eprintln!("phase: snapshot");
        let r = phases::snapshot(t, args.rows).await;
        let failed = r.is_err();
        record(report, "initial snapshot", &report::SNAPSHOT, r);
        if failed {
            anyhow::bail!("the service never completed its first checkpoint");
        }
        return Ok(());
    }
    report
        .rows
        .push(Row::new("initial snapshot", "n/a (external service)", &report::SNAPSHOT, None));
    let mut stream = t.endpoint.open("u1", Transport::NDJSON, &[]).await?;
    stream
        .until_complete(Some(args.stall()))
        .await
        .context("first sync against the external service")?;
    Ok(())
}

fn record(report: &mut Report, metric: &str, spec: &'static report::Spec, result: Result<Row>) {
    match result {
        Ok(row) => {
            eprintln!("{}: {}", row.metric, row.value);
            report.rows.push(row);
        }
        Err(e) => {
            eprintln!("{metric} FAILED: {e:#}");
            report.failed(metric, spec, &e);
        }
    }
}

fn service_log_note(t: &Target, report: &mut Report) {
    let Some(svc) = &t.service else {
        return;
    };
    let lines = svc.log_summary();
    let total: usize = lines.iter().map(|l| l.0).sum();
    if total > 0 {
        let shown: Vec<String> = lines.iter().take(5).map(|(n, m)| format!("{n}× `{m}`")).collect();
        report
            .notes
            .push(format!("Service log: {total} WARN/ERROR lines: {}", shown.join("; ")));
    }
}

fn scale_notes(args: &Args, report: &mut Report) {
    let skipped: Vec<String> = args.skip.iter().map(|p| format!("{p:?}").to_lowercase()).collect();
    report.notes.push(format!(
        "Scale: {} seeded todos over 1,000 users + 1,000 lists; {} latency samples; {} incremental rows; \
         downloads best/median of 3; fan-out sizes {:?}, {} rounds each; {} failover rounds; timeout {} s{}.",
        report::thousands(args.rows as u64),
        args.latency_samples,
        report::thousands(args.incremental_rows as u64),
        args.fanout,
        args.fanout_rounds,
        args.failover_rounds,
        args.timeout_secs,
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped: {}", skipped.join(", "))
        }
    ));
    report.notes.push(
        "CPU columns: seconds used during the phase by the service process, the whole Postgres cluster \
         (postmaster + live children + reaped children) and the bench process (client)."
            .into(),
    );
}
