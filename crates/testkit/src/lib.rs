//! Throwaway PostgreSQL clusters for tests, benchmarks and the `demo` command.
//!
//! A cluster is initdb'd into its own directory with `wal_level=logical`, listens only on
//! 127.0.0.1 at a free port, and is stopped (and its directory removed, unless it is persistent)
//! when the [`PgCluster`] is dropped. initdb and postgres refuse to run as root, so when we are
//! root they run as the `postgres` OS user via `runuser`, in a directory that user owns.

use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Settings for [`PgCluster::start`]. The default is a throwaway cluster without fsync.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Keep data durable (fsync on). Tests turn it off for speed; benchmarks keep it on.
    pub fsync: bool,
    /// Use this directory (created if missing, reused if it holds a cluster) and keep it on drop.
    pub persistent_dir: Option<PathBuf>,
    /// Fixed port; a free one is picked when `None`.
    pub port: Option<u16>,
}

/// Server-side TLS material (PEM text) for [`PgCluster::start_tls`].
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server certificate, optionally followed by intermediates.
    pub cert_pem: String,
    /// The server certificate's private key.
    pub key_pem: String,
    /// When set, TCP clients must also present a certificate signed by this CA.
    pub client_ca_pem: Option<String>,
}

/// A running PostgreSQL server owned by this process.
pub struct PgCluster {
    dir: PathBuf,
    keep_dir: bool,
    port: u16,
    fsync: bool,
    /// TLS the server presents ([`PgCluster::start_tls`]); TCP clients must use it.
    tls: Option<ServerTls>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl PgCluster {
    /// initdb (if needed) and start a server; returns once it accepts connections.
    pub fn start(options: PgOptions) -> Result<PgCluster> {
        Self::start_with(options, None)
    }

    /// Like [`PgCluster::start`], but TCP clients must use TLS: the server presents `tls`, and
    /// its pg_hba.conf accepts TCP only as `hostssl` (trust). Local (unix socket) connections,
    /// in [`PgCluster::dir`], stay plain (trust), so [`PgCluster::connect`] still works.
    pub fn start_tls(options: PgOptions, tls: ServerTls) -> Result<PgCluster> {
        Self::start_with(options, Some(tls))
    }

    fn start_with(options: PgOptions, tls: Option<ServerTls>) -> Result<PgCluster> {
        let bin = find_pg_bin()?;
        let as_root = is_root();
        let (dir, tmp) = match &options.persistent_dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                (d.canonicalize()?, None)
            }
            None => {
                let base = std::env::var_os("FERROSYNC_TEST_TMP")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir);
                let tmp = tempfile::Builder::new().prefix("ferrosync-pg-").tempdir_in(base)?;
                (tmp.path().to_path_buf(), Some(tmp))
            }
        };
        if as_root {
            chown_postgres(&dir)?;
        }
        let data = dir.join("data");
        if !data.join("PG_VERSION").exists() {
            let status = run_as_pg(as_root, &bin.join("initdb"))
                .args(["-D"])
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .context("running initdb")?;
            if !status.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&status.stderr));
            }
        }
        let port = match options.port {
            Some(p) => p,
            None => free_port()?,
        };
        // A fresh log per start(); restarts append to it.
        std::fs::File::create(dir.join("postgres.log"))?;
        let mut cluster = PgCluster {
            dir,
            keep_dir: options.persistent_dir.is_some(),
            port,
            fsync: options.fsync,
            tls,
            child: None,
            _tmp: tmp,
        };
        cluster.spawn_server()?;
        Ok(cluster)
    }

    /// Start the postmaster on this cluster's data directory and port; returns once it
    /// accepts connections. The log is appended to, so it spans restarts.
    fn spawn_server(&mut self) -> Result<()> {
        let bin = find_pg_bin()?;
        let as_root = is_root();
        let log_path = self.dir.join("postgres.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        if as_root {
            chown_postgres(&log_path)?;
        }
        let fsync = self.fsync;
        let tls_args = self.tls_args(as_root)?;
        let child = run_as_pg(as_root, &bin.join("postgres"))
            .args(&tls_args)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args([
                "-c",
                "wal_level=logical",
                "-c",
                "max_replication_slots=20",
                "-c",
                "max_wal_senders=20",
            ])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=256MB"])
            .args(["-c", if fsync { "fsync=on" } else { "fsync=off" }])
            .args(["-c", if fsync { "synchronous_commit=on" } else { "synchronous_commit=off" }])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Fast shutdown (as [`stop`](Self::stop)), then start again on the same data directory
    /// and port; returns once the server accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn_server()
    }

    /// Immediate shutdown (SIGQUIT: no checkpoint, crash recovery at the next start), then
    /// start again on the same data directory and port.
    pub fn restart_immediate(&mut self) -> Result<()> {
        self.stop_with("-QUIT");
        self.spawn_server()
    }

    /// Start a server stopped with [`stop`](Self::stop) again (same data directory and port).
    pub fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("postgres is already running");
        }
        self.spawn_server()
    }

    /// Server options for TLS (files written into the cluster directory), empty without TLS.
    fn tls_args(&self, as_root: bool) -> Result<Vec<String>> {
        let Some(tls) = &self.tls else { return Ok(Vec::new()) };
        let cert = self.dir.join("server.crt");
        let key = self.dir.join("server.key");
        let hba = self.dir.join("pg_hba_tls.conf");
        write_private(&cert, &tls.cert_pem, as_root)?;
        write_private(&key, &tls.key_pem, as_root)?;
        let mut args = Vec::new();
        let client_cert = match &tls.client_ca_pem {
            Some(ca) => {
                let path = self.dir.join("client-ca.crt");
                write_private(&path, ca, as_root)?;
                args.extend(["-c".to_string(), format!("ssl_ca_file={}", path.display())]);
                " clientcert=verify-ca"
            }
            None => "",
        };
        write_private(
            &hba,
            &format!(
                "local all all trust\nlocal replication all trust\n\
                 hostssl all all 127.0.0.1/32 trust{client_cert}\nhostssl replication all 127.0.0.1/32 trust{client_cert}\n"
            ),
            as_root,
        )?;
        args.extend(vec![
            "-c".into(),
            "ssl=on".into(),
            "-c".into(),
            format!("ssl_cert_file={}", cert.display()),
            "-c".into(),
            format!("ssl_key_file={}", key.display()),
            "-c".into(),
            format!("hba_file={}", hba.display()),
        ]);
        Ok(args)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("postgres exited early ({status}); log:\n{}", self.log_tail());
                }
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // The port opens slightly before the server accepts queries; psql-level check
                // (over the unix socket for TLS clusters, whose TCP side wants TLS).
                let host = self.pg_host();
                let ok = Command::new(find_pg_bin()?.join("pg_isready"))
                    .args(["-h", &host, "-p", &self.port.to_string(), "-U", "postgres"])
                    .stdout(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("postgres did not become ready; log:\n{}", self.log_tail())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether TCP clients must use TLS ([`PgCluster::start_tls`]).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Where [`PgCluster::conn_str`] connects: 127.0.0.1, or the unix socket directory for TLS
    /// clusters (plain connections over TCP are refused there).
    fn pg_host(&self) -> String {
        if self.tls.is_some() {
            self.dir.display().to_string()
        } else {
            "127.0.0.1".to_string()
        }
    }

    /// libpq key/value connection string for `database`, user `postgres`, without TLS (over
    /// the unix socket for TLS clusters).
    pub fn conn_str(&self, database: &str) -> String {
        format!("host={} port={} user=postgres dbname={database}", self.pg_host(), self.port)
    }

    /// URI form, e.g. for config files and the Node agent (TCP, 127.0.0.1).
    pub fn uri(&self, database: &str) -> String {
        self.uri_on("127.0.0.1", database)
    }

    /// URI form with another host name for 127.0.0.1, e.g. `localhost` to match a certificate.
    pub fn uri_on(&self, host: &str, database: &str) -> String {
        format!("postgresql://postgres:postgres@{host}:{}/{database}", self.port)
    }

    /// Connect with tokio-postgres; the connection task is spawned on the current runtime.
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.conn_str(database), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {database}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// CREATE DATABASE if it does not exist yet.
    pub async fn create_database(&self, database: &str) -> Result<()> {
        let client = self.connect("postgres").await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await?;
        if exists.is_none() {
            client
                .batch_execute(&format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\"")))
                .await?;
        }
        Ok(())
    }

    /// The postmaster's pid, from `postmaster.pid` (first line).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Stop the server (fast shutdown) and wait for it.
    pub fn stop(&mut self) {
        // SIGINT = fast shutdown: terminates sessions, writes a checkpoint.
        self.stop_with("-INT");
    }

    fn stop_with(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            // When we are root the child is `runuser`, which does not forward signals: signal
            // the postmaster itself.
            let postmaster = self.postmaster_pid().unwrap_or(child.id());
            let _ = Command::new("kill").args([signal, &postmaster.to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        if self.keep_dir {
            return;
        }
        if let Some(tmp) = self._tmp.take() {
            let _ = std::fs::remove_dir_all(tmp.path());
        }
    }
}

/// Directory holding initdb/postgres: `$FERROSYNC_PG_BIN`, the newest `/usr/lib/postgresql/*/bin`, or PATH.
pub fn find_pg_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FERROSYNC_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let version = entry.file_name().to_string_lossy().parse::<u32>().unwrap_or(0);
            let bin = entry.path().join("bin");
            if bin.join("initdb").exists() && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    bail!("PostgreSQL server binaries (initdb, postgres) not found: install postgresql (15+) or set FERROSYNC_PG_BIN")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_postgres(path: &Path) -> Result<()> {
    let status = Command::new("chown").args(["-R", "postgres:"]).arg(path).status()?;
    if !status.success() {
        bail!("chown postgres {} failed", path.display());
    }
    // The parent chain must be traversable by the postgres user (temp dirs are 0700).
    if let Some(parent) = path.parent() {
        let _ = Command::new("chmod").arg("o+x").arg(parent).status();
    }
    Ok(())
}

/// Write `text` to `path` with mode 0600, owned by the postgres user when we are root
/// (postgres refuses a key file others can read).
fn write_private(path: &Path, text: &str, as_root: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    drop(file);
    if as_root {
        chown_postgres(path)?;
    }
    Ok(())
}

fn run_as_pg(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A PowerSync-format service config for a local cluster, with one HS256 client key: what the
/// demo, the end-to-end tests and the benchmark run the service with.
#[derive(Debug, Clone)]
pub struct ServiceConfig<'a> {
    pub source_uri: String,
    pub storage_uri: String,
    pub port: u16,
    /// `bind_address`; the service's default (all interfaces) when `None`.
    pub bind_address: Option<&'a str>,
    /// Sync rules file, relative to the config file.
    pub rules_path: &'a str,
    pub audience: &'a str,
    pub kid: &'a str,
    pub secret: &'a str,
    /// `api.parameters.max_concurrent_connections`, when not the default.
    pub max_connections: Option<usize>,
}

/// TLS settings written to both Postgres connections (source and storage) by
/// [`ServiceConfig::to_yaml_with`]. The default is `sslmode: disable` and nothing else, which is
/// what [`ServiceConfig::to_yaml`] writes.
#[derive(Debug, Clone, Default)]
pub struct ConnTls<'a> {
    /// `sslmode` (`verify-full`, `verify-ca`, `disable`); `disable` when `None`.
    pub sslmode: Option<&'a str>,
    /// `cacert`: inline PEM, written as a YAML block scalar.
    pub cacert: Option<&'a str>,
    /// `tls_servername`.
    pub tls_servername: Option<&'a str>,
    /// `client_certificate` and `client_private_key` (inline PEM).
    pub client_cert: Option<(&'a str, &'a str)>,
}

impl ConnTls<'_> {
    /// The connection's TLS keys, each line indented by `indent` spaces.
    fn yaml(&self, indent: usize) -> String {
        let pad = " ".repeat(indent);
        let mut out = format!("{pad}sslmode: {}\n", self.sslmode.unwrap_or("disable"));
        // PEM values as YAML block scalars.
        let block = |out: &mut String, field: &str, pem: &str| {
            out.push_str(&format!("{pad}{field}: |\n"));
            for line in pem.lines() {
                out.push_str(&format!("{pad}  {line}\n"));
            }
        };
        if let Some(pem) = self.cacert {
            block(&mut out, "cacert", pem);
        }
        if let Some(name) = self.tls_servername {
            out.push_str(&format!("{pad}tls_servername: {name}\n"));
        }
        if let Some((cert, key)) = self.client_cert {
            block(&mut out, "client_certificate", cert);
            block(&mut out, "client_private_key", key);
        }
        out
    }
}

impl ServiceConfig<'_> {
    pub fn to_yaml(&self) -> String {
        self.to_yaml_with(&ConnTls::default())
    }

    /// The config with `tls` on both the replication connection and storage.
    pub fn to_yaml_with(&self, tls: &ConnTls) -> String {
        use base64::Engine;
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.secret);
        let mut yaml = format!(
            "replication:\n  connections:\n    - type: postgresql\n      uri: {}\n{}\
             storage:\n  type: postgresql\n  uri: {}\n{}\
             port: {}\nsync_config:\n  path: {}\n\
             client_auth:\n  audience: [{}]\n  jwks:\n    keys:\n      - {{kty: oct, alg: HS256, kid: {}, k: {k}}}\n",
            self.source_uri,
            tls.yaml(6),
            self.storage_uri,
            tls.yaml(2),
            self.port,
            self.rules_path,
            self.audience,
            self.kid
        );
        if let Some(bind) = self.bind_address {
            yaml.push_str(&format!("bind_address: {bind}\n"));
        }
        if let Some(n) = self.max_connections {
            yaml.push_str(&format!("api:\n  parameters:\n    max_concurrent_connections: {n}\n"));
        }
        yaml
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ServiceConfig<'static> {
        ServiceConfig {
            source_uri: "postgresql://h/todo".into(),
            storage_uri: "postgresql://h/storage".into(),
            port: 8080,
            bind_address: None,
            rules_path: "rules.yaml",
            audience: "aud",
            kid: "k",
            secret: "s",
            max_connections: None,
        }
    }

    #[test]
    fn default_yaml_is_unchanged() {
        assert_eq!(
            config().to_yaml(),
            "replication:\n  connections:\n    - type: postgresql\n      uri: postgresql://h/todo\n      sslmode: disable\n\
             storage:\n  type: postgresql\n  uri: postgresql://h/storage\n  sslmode: disable\n\
             port: 8080\nsync_config:\n  path: rules.yaml\n\
             client_auth:\n  audience: [aud]\n  jwks:\n    keys:\n      - {kty: oct, alg: HS256, kid: k, k: cw}\n"
        );
    }

    #[test]
    fn tls_yaml_has_a_block_scalar_cacert_on_both_connections() {
        let yaml = config().to_yaml_with(&ConnTls {
            sslmode: Some("verify-full"),
            cacert: Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            tls_servername: None,
            client_cert: None,
        });
        assert!(yaml.contains(
            "      uri: postgresql://h/todo\n      sslmode: verify-full\n      cacert: |\n        -----BEGIN CERTIFICATE-----\n        AAAA\n        -----END CERTIFICATE-----\nstorage:"
        ));
        assert!(yaml.contains(
            "  uri: postgresql://h/storage\n  sslmode: verify-full\n  cacert: |\n    -----BEGIN CERTIFICATE-----\n    AAAA\n    -----END CERTIFICATE-----\nport: 8080"
        ));
    }
}
