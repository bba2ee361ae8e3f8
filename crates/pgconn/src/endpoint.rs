//! One Postgres server as configured: how to connect to it (TLS, timeouts, keepalives) and
//! how to name it in messages.

use crate::error::PgConnError;
use crate::tls::ClientTls;
use ferrosync_config::PostgresConnectionConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::config::Host;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Notification};

/// Without `connect_timeout`, a dead or filtered host would block a connect for minutes.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How to reach one Postgres server. Cheap to clone.
#[derive(Clone)]
pub struct PgEndpoint(Arc<Inner>);

struct Inner {
    config: Config,
    tls: Option<ClientTls>,
    /// `host:port/database`, for messages (never the password).
    label: String,
    connect_timeout: Duration,
}

impl PgEndpoint {
    /// From a PowerSync connection config (`replication.connections[]` or `storage`).
    pub fn from_config(c: &PostgresConnectionConfig) -> Result<PgEndpoint, PgConnError> {
        let label = format!("{}:{}/{}", c.hostname, c.port, c.database);
        let config: Config = c.connection_string().parse().map_err(|e| PgConnError::Connect {
            endpoint: label.clone(),
            cause: format!("invalid connection settings: {e}"),
        })?;
        let tls = ClientTls::new(c).map_err(|message| PgConnError::TlsSettings {
            endpoint: label.clone(),
            message,
        })?;
        Ok(PgEndpoint::build(config, tls, label))
    }

    /// From a libpq `key=value` string, without TLS (tests and tools on a local cluster).
    pub fn from_conn_str(conn_str: &str) -> Result<PgEndpoint, PgConnError> {
        let config: Config = conn_str.parse().map_err(|e| PgConnError::Connect {
            endpoint: "postgres".into(),
            cause: format!("invalid connection string: {e}"),
        })?;
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let label = format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""));
        Ok(PgEndpoint::build(config, None, label))
    }

    fn build(mut config: Config, tls: Option<ClientTls>, label: String) -> PgEndpoint {
        let connect_timeout = config.get_connect_timeout().copied().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        // Dead peers (a network cut, a host that vanished) are noticed in ~25 s, not hours:
        // keepalives while idle, and a bound on unacknowledged sends while a request is out
        // (keepalives do not run then, and retransmissions alone take ~15 min to give up).
        config
            .connect_timeout(connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("ferrosync");
        }
        PgEndpoint(Arc::new(Inner {
            config,
            tls,
            label,
            connect_timeout,
        }))
    }

    /// `host:port/database`.
    pub fn label(&self) -> &str {
        &self.0.label
    }

    /// Open a connection; its driver runs in a task that ends when the connection does.
    pub async fn connect(&self) -> Result<Client, PgConnError> {
        self.open(None).await
    }

    /// A connection whose notifications (LISTEN) arrive on the returned channel, which
    /// closes when the connection does.
    pub async fn connect_listening(&self) -> Result<(Client, mpsc::UnboundedReceiver<Notification>), PgConnError> {
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((self.open(Some(tx)).await?, rx))
    }

    async fn open(&self, notifications: Option<mpsc::UnboundedSender<Notification>>) -> Result<Client, PgConnError> {
        let inner = &self.0;
        let label = inner.label.clone();
        let attempt = async {
            match &inner.tls {
                Some(tls) => {
                    let (client, conn) = inner.config.connect(tls.connector()).await?;
                    tokio::spawn(drive(conn, label, notifications));
                    Ok(client)
                }
                None => {
                    let (client, conn) = inner.config.connect(NoTls).await?;
                    tokio::spawn(drive(conn, label, notifications));
                    Ok(client)
                }
            }
        };
        // tokio-postgres applies the timeout per address; this bounds the whole attempt.
        match tokio::time::timeout(inner.connect_timeout + Duration::from_secs(1), attempt).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(self.connect_error(&e)),
            Err(_) => Err(PgConnError::Timeout {
                endpoint: inner.label.clone(),
                secs: inner.connect_timeout.as_secs(),
            }),
        }
    }

    fn connect_error(&self, e: &tokio_postgres::Error) -> PgConnError {
        PgConnError::from_connect(&self.0.label, &self.servername(), e)
    }

    fn host(&self) -> Option<String> {
        match self.0.config.get_hosts().first()? {
            Host::Tcp(h) => Some(h.clone()),
            #[cfg(unix)]
            Host::Unix(_) => None,
        }
    }

    fn servername(&self) -> String {
        let configured = self.0.tls.as_ref().and_then(|t| t.servername.clone());
        configured.or_else(|| self.host()).unwrap_or_default()
    }

    /// Settings for a logical replication connection to this server (pgwire-replication).
    pub fn replication_config(&self, slot: &str, publication: &str) -> Result<pgwire_replication::ReplicationConfig, PgConnError> {
        let c = &self.0.config;
        let host = self.host().ok_or_else(|| PgConnError::Connect {
            endpoint: self.0.label.clone(),
            cause: "replication over a Unix socket is not supported; use a TCP host".into(),
        })?;
        let password = c
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let config = pgwire_replication::ReplicationConfig::new(
            host.clone(),
            c.get_user().unwrap_or("postgres"),
            password,
            c.get_dbname().unwrap_or("postgres"),
            slot,
            publication,
        )
        .with_port(c.get_ports().first().copied().unwrap_or(5432));
        Ok(match &self.0.tls {
            Some(tls) => config.with_tls(tls.replication(&host)),
            None => config.with_tls(pgwire_replication::TlsConfig::disabled()),
        })
    }

    /// The connect timeout to apply around a replication connect (pgwire-replication has none).
    pub fn connect_timeout(&self) -> Duration {
        self.0.connect_timeout
    }

    /// Classify a replication-connection failure like a normal connect failure.
    pub fn classify(&self, err: &(dyn std::error::Error + 'static)) -> PgConnError {
        PgConnError::from_connect(&self.0.label, &self.servername(), err)
    }
}

impl std::fmt::Debug for PgEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PgEndpoint").field(&self.0.label).finish()
    }
}

/// Run a connection until it ends, forwarding notifications if asked to.
async fn drive<T>(
    mut conn: tokio_postgres::Connection<tokio_postgres::Socket, T>,
    label: String,
    notifications: Option<mpsc::UnboundedSender<Notification>>,
) where
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let Some(tx) = &notifications {
                    if tx.send(n).is_err() {
                        return;
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(endpoint = %label, error = %e, "postgres connection closed");
                return;
            }
            None => return,
        }
    }
}
