//! The system under test: our own Postgres cluster + service process, or an external service.
//!
//! In own mode the bench initdb's a cluster (fsync on), loads the sample todo schema and data,
//! writes a service config and runs the service binary as a child process guarded by
//! [`Service`], whose `Drop` kills it on every exit path. In external mode it only connects to
//! the given source database and service URL; everything it cannot observe is reported as n/a.

use crate::client::{Auth, Endpoint};
use crate::procstat::{self, CpuSample};
use anyhow::{bail, Context, Result};
use ferrosync_testkit::{free_port, PgCluster, PgOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SCHEMA: &str = include_str!("../../../examples/todo/schema.sql");
/// The legacy todo rules (`--rules legacy`).
pub const LEGACY_RULES: &str = include_str!("../../../examples/todo/sync-rules.yaml");
/// The same app as ten edition-3 streams (`--rules streams`).
pub const STREAM_RULES: &str = include_str!("../../../examples/todo/sync-streams.yaml");

/// Lists in the data set; every list is one op in the global bucket.
pub const LISTS: i64 = 1000;
/// Todos are spread over users u0..u{USERS-1}.
const USERS: i64 = 1000;

/// Settings that decide how the target is built.
pub struct TargetOptions {
    pub rows: i64,
    pub bin: PathBuf,
    pub auth: Auth,
    /// External mode: service URL and source database URI.
    pub external: Option<(String, String)>,
    pub service_pid: Option<u32>,
    pub storage_uri: Option<String>,
    /// Sync config content the service runs.
    pub rules: &'static str,
    /// Serve the Prometheus endpoint (`telemetry.prometheus_port`), to measure what metrics cost.
    pub metrics: bool,
}

/// Everything the phases talk to. Field order matters: the service is dropped (killed) before
/// the cluster it depends on is stopped.
pub struct Target {
    pub endpoint: Endpoint,
    pub source: tokio_postgres::Client,
    pub storage: Option<tokio_postgres::Client>,
    pub service: Option<Service>,
    external_pid: Option<u32>,
    postmaster: Option<u32>,
    config_dir: Option<tempfile::TempDir>,
    cluster: Option<PgCluster>,
}

impl Target {
    /// Pid of the running service, when known.
    pub fn service_pid(&self) -> Option<u32> {
        match &self.service {
            Some(s) => s.pid(),
            None => self.external_pid,
        }
    }

    /// CPU used so far by the service, the Postgres cluster and the bench.
    pub fn cpu(&self) -> CpuSample {
        let service = match &self.service {
            Some(s) => s.cpu_secs(),
            None => self.external_pid.and_then(procstat::cpu_secs),
        };
        CpuSample {
            service,
            postgres: self.postmaster.and_then(procstat::pg_cluster_cpu_secs),
            bench: procstat::self_cpu_secs(),
        }
    }

    /// The owned service, or an error in external mode.
    pub fn own_service(&mut self) -> Result<&mut Service> {
        self.service
            .as_mut()
            .context("needs a service started by the bench (not --url mode)")
    }

    /// Fail early if the owned service process has exited.
    pub fn check_service(&mut self) -> Result<()> {
        match self.service.as_mut() {
            Some(s) => s.check_alive(),
            None => Ok(()),
        }
    }

    /// Own mode: a second service process (not started) with the same config as the first but
    /// its own HTTP port and log `<name>.log`, and an endpoint for it. Dropping it kills it.
    pub fn peer(&self, name: &str) -> Result<(Service, Endpoint)> {
        let (Some(cluster), Some(dir), Some(first)) = (&self.cluster, &self.config_dir, &self.service) else {
            bail!("needs a service started by the bench (not --url mode)");
        };
        let port = free_port()?;
        // Failover measures takeover time only: the peer runs without the metrics endpoint.
        let config = write_config(dir.path(), &format!("{name}.yaml"), cluster, port, &self.endpoint.auth, false)?;
        let service = Service::new(&first.bin, &config, &dir.path().join(format!("{name}.log")));
        let endpoint = Endpoint::new(&format!("http://127.0.0.1:{port}"), self.endpoint.auth.clone())?;
        Ok((service, endpoint))
    }

    /// Own mode: replace the sync config the service (and its peers) start with.
    pub fn write_rules(&self, content: &str) -> Result<()> {
        let dir = self
            .config_dir
            .as_ref()
            .context("needs a service started by the bench (not --url mode)")?;
        std::fs::write(dir.path().join("sync-rules.yaml"), content).context("writing sync-rules.yaml")
    }

    /// Own mode: the sync config the service starts with.
    pub fn rules(&self) -> Result<String> {
        let dir = self
            .config_dir
            .as_ref()
            .context("needs a service started by the bench (not --url mode)")?;
        std::fs::read_to_string(dir.path().join("sync-rules.yaml")).context("reading sync-rules.yaml")
    }

    /// Stop the service, then the cluster, in that order.
    pub fn shutdown(&mut self) {
        if let Some(s) = self.service.as_mut() {
            if let Err(e) = s.stop() {
                eprintln!("stopping the service: {e:#}");
            }
        }
        if let Some(mut c) = self.cluster.take() {
            c.stop();
        }
    }
}

/// Build the target described by `opts` (own cluster + seeded data, or external).
pub async fn prepare(opts: &TargetOptions) -> Result<Target> {
    match &opts.external {
        Some((url, source_uri)) => external(opts, url, source_uri).await,
        None => own(opts).await,
    }
}

async fn own(opts: &TargetOptions) -> Result<Target> {
    let cluster = PgCluster::start(PgOptions {
        fsync: true,
        ..PgOptions::default()
    })
    .context("starting Postgres")?;
    cluster.create_database("todo").await?;
    cluster.create_database("storage").await?;
    let source = cluster.connect("todo").await?;
    source.batch_execute(SCHEMA).await.context("loading examples/todo/schema.sql")?;
    seed(&source, opts.rows).await?;
    let dir = tempfile::Builder::new()
        .prefix("ferrosync-bench-")
        .tempdir()
        .context("config dir")?;
    let port = free_port()?;
    std::fs::write(dir.path().join("sync-rules.yaml"), opts.rules)?;
    let config = write_config(dir.path(), "powersync.yaml", &cluster, port, &opts.auth, opts.metrics)?;
    let service = Service::new(&opts.bin, &config, &dir.path().join("service.log"));
    Ok(Target {
        endpoint: Endpoint::new(&format!("http://127.0.0.1:{port}"), opts.auth.clone())?,
        storage: Some(cluster.connect("storage").await?),
        source,
        service: Some(service),
        external_pid: None,
        postmaster: cluster.postmaster_pid(),
        config_dir: Some(dir),
        cluster: Some(cluster),
    })
}

async fn external(opts: &TargetOptions, url: &str, source_uri: &str) -> Result<Target> {
    let source = connect_uri(source_uri).await.context("--source-uri")?;
    let has_schema: Option<String> = source
        .query_one("SELECT to_regclass('todos')::text", &[])
        .await
        .context("checking for the todo schema")?
        .get(0);
    if has_schema.is_none() {
        bail!("the source database has no `todos` table: load examples/todo/schema.sql first");
    }
    let lists: i64 = source.query_one("SELECT count(*) FROM lists", &[]).await?.get(0);
    if lists == 0 {
        // Later phases need lists to reference and a populated data set to measure.
        seed(&source, opts.rows).await?;
    }
    let storage = match &opts.storage_uri {
        Some(uri) => Some(connect_uri(uri).await.context("--storage-uri")?),
        None => None,
    };
    Ok(Target {
        endpoint: Endpoint::new(url, opts.auth.clone())?,
        source,
        storage,
        service: None,
        external_pid: opts.service_pid,
        postmaster: None,
        config_dir: None,
        cluster: None,
    })
}

async fn connect_uri(uri: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(uri, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// 1,000 lists plus `rows` todos spread over users u0..u999.
async fn seed(db: &tokio_postgres::Client, rows: i64) -> Result<()> {
    db.execute(
        "INSERT INTO lists (id, name, owner_id) SELECT gen_random_uuid(), 'list ' || g, 'u' || g FROM generate_series(1, $1::bigint) g",
        &[&LISTS],
    )
    .await
    .context("seeding lists")?;
    db.execute(
        "INSERT INTO todos (description, owner_id, list_id)
         SELECT 'todo number ' || g, 'u' || (g % $2::bigint), (SELECT id FROM lists ORDER BY id LIMIT 1)
         FROM generate_series(1, $1::bigint) g",
        &[&rows, &USERS],
    )
    .await
    .context("seeding todos")?;
    Ok(())
}

fn write_config(dir: &Path, name: &str, cluster: &PgCluster, port: u16, auth: &Auth, metrics: bool) -> Result<PathBuf> {
    let mut yaml = ferrosync_testkit::ServiceConfig {
        source_uri: cluster.uri("todo"),
        storage_uri: cluster.uri("storage"),
        port,
        bind_address: Some("127.0.0.1"),
        rules_path: "sync-rules.yaml",
        audience: &auth.audience,
        kid: &auth.kid,
        secret: &auth.secret,
        max_connections: Some(12_000),
    }
    .to_yaml()
    // The compaction phase measures before and after `ferrosync compact`; without background
    // passes the other phases also stay comparable with earlier runs.
    .replace(
        "storage:\n  type: postgresql\n",
        "storage:\n  type: postgresql\n  compaction:\n    enabled: false\n",
    );
    if metrics {
        yaml.push_str(&format!("telemetry:\n  prometheus_port: {}\n", free_port()?));
    }
    let path = dir.join(name);
    std::fs::write(&path, yaml).context("writing service config")?;
    Ok(path)
}

/// The service child process. Dropping it kills the process.
pub struct Service {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// CPU of earlier (stopped) runs, so CPU stays monotonic across a restart.
    finished_cpu: f64,
}

impl Service {
    fn new(bin: &Path, config: &Path, log: &Path) -> Service {
        Service {
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            child: None,
            finished_cpu: 0.0,
        }
    }

    /// Run `compact` on this service's config to the end; returns its summary line.
    pub fn compact(&self) -> Result<String> {
        let out = Command::new(&self.bin)
            .arg("compact")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .output()
            .with_context(|| format!("running {} compact", self.bin.display()))?;
        if !out.status.success() {
            bail!("compact failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("service already running");
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            // Plain log lines: they are summarised into the report.
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (build it with cargo build --release -p ferrosync)", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn cpu_secs(&self) -> Option<f64> {
        let current = self.pid().and_then(procstat::cpu_secs).unwrap_or(0.0);
        Some(self.finished_cpu + current)
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!("the service exited ({status}); log tail:\n{}", self.log_tail(20));
            }
        }
        Ok(())
    }

    /// Whether the process is running (an exited one is reaped, keeping its CPU).
    pub fn is_running(&mut self) -> bool {
        let exited = match self.child.as_mut() {
            None => return false,
            Some(child) => !matches!(child.try_wait(), Ok(None)),
        };
        if exited {
            self.reap();
        }
        !exited
    }

    /// `kill -9`: SIGKILL now, returning the moment it was sent. The process is not waited for
    /// (call [`reap`](Self::reap) after whatever is being timed); no shutdown code runs in it.
    pub fn kill9(&mut self) -> Result<Instant> {
        let child = self.child.as_mut().context("the service is not running")?;
        // std's kill() is SIGKILL on Unix.
        child.kill().context("SIGKILL to the service")?;
        Ok(Instant::now())
    }

    /// Wait (up to 10 s, then block) for a killed or exited process and keep its CPU time.
    pub fn reap(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        // As in stop(): read the zombie's final CPU before it is reaped.
        while Instant::now() < deadline {
            match procstat::stat(pid) {
                Some(s) if s.state != 'Z' => std::thread::sleep(Duration::from_millis(1)),
                _ => break,
            }
        }
        self.finished_cpu += procstat::cpu_secs(pid).unwrap_or(0.0);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, wait up to 20 s, then SIGKILL.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        let pid_t = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill(2) on our own child's pid; the child is not reaped yet, so the pid cannot
        // have been reused.
        unsafe { libc::kill(pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Wait for the zombie instead of try_wait(): a zombie's /proc stat still holds its final
        // CPU times, which are lost once it is reaped.
        while Instant::now() < deadline {
            match procstat::stat(pid) {
                Some(s) if s.state != 'Z' => std::thread::sleep(Duration::from_millis(10)),
                _ => break,
            }
        }
        self.finished_cpu += procstat::cpu_secs(pid).unwrap_or(0.0);
        let graceful = procstat::stat(pid).is_some_and(|s| s.state == 'Z');
        if !graceful {
            let _ = child.kill();
        }
        child.wait().context("waiting for the service")?;
        if !graceful {
            bail!("the service did not stop within 20 s of SIGTERM (killed)");
        }
        Ok(())
    }

    /// WARN/ERROR lines of the service log, deduplicated (timestamp removed) with counts,
    /// most frequent first.
    pub fn log_summary(&self) -> Vec<(usize, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut seen: Vec<(usize, String)> = Vec::new();
        for line in text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
            // tracing's format starts with an RFC 3339 timestamp; drop it so repeats collapse.
            let msg = line.split_once(' ').map_or(line, |(_, rest)| rest).trim().to_string();
            match seen.iter_mut().find(|(_, m)| *m == msg) {
                Some(entry) => entry.0 += 1,
                None => seen.push((1, msg)),
            }
        }
        seen.sort_by_key(|s| std::cmp::Reverse(s.0));
        seen
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
