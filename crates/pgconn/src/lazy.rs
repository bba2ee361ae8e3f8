//! A client that reconnects on demand: after the server restarted or the network dropped,
//! the next caller opens a new connection (one caller at a time, with backoff between failed
//! attempts, so an outage is not met with a connection storm).

use crate::backoff::Backoff;
use crate::endpoint::PgEndpoint;
use crate::error::PgConnError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// One logical connection to an endpoint that survives the physical one.
pub struct LazyClient {
    endpoint: PgEndpoint,
    /// Run once on every new connection (session settings).
    session_sql: Option<String>,
    current: Mutex<Option<Arc<Client>>>,
    retry: tokio::sync::Mutex<Retry>,
}

struct Retry {
    backoff: Backoff,
    /// After a failed attempt, callers fail fast with its error until then.
    not_before: Option<(Instant, PgConnError)>,
}

impl LazyClient {
    /// Nothing is connected until the first [`LazyClient::get`].
    pub fn new(endpoint: PgEndpoint, session_sql: Option<&str>) -> LazyClient {
        LazyClient {
            endpoint,
            session_sql: session_sql.map(str::to_string),
            current: Mutex::new(None),
            retry: tokio::sync::Mutex::new(Retry {
                backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
                not_before: None,
            }),
        }
    }

    /// Connect now, so configuration mistakes surface at start-up.
    pub async fn connected(endpoint: PgEndpoint, session_sql: Option<&str>) -> Result<LazyClient, PgConnError> {
        let client = LazyClient::new(endpoint, session_sql);
        client.get().await?;
        Ok(client)
    }

    pub fn endpoint(&self) -> &PgEndpoint {
        &self.endpoint
    }

    /// A live connection: the current one, or a new one if it was lost.
    pub async fn get(&self) -> Result<Arc<Client>, PgConnError> {
        if let Some(client) = self.live() {
            return Ok(client);
        }
        let mut retry = self.retry.lock().await;
        if let Some(client) = self.live() {
            return Ok(client);
        }
        if let Some((at, err)) = &retry.not_before {
            if Instant::now() < *at {
                return Err(err.clone());
            }
        }
        let had_failed = retry.not_before.is_some();
        // Boxed: connecting (TLS included) is a large future, and inline it would be part of
        // every caller's future, though it runs only when the connection is down.
        match Box::pin(self.open()).await {
            Ok(client) => {
                retry.backoff.reset();
                retry.not_before = None;
                if had_failed {
                    tracing::info!(endpoint = %self.endpoint.label(), "reconnected to postgres");
                }
                let client = Arc::new(client);
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
                Ok(client)
            }
            Err(e) => {
                let delay = retry.backoff.next_delay();
                tracing::warn!(endpoint = %self.endpoint.label(), error = %e, retry_in_ms = delay.as_millis() as u64, "postgres unreachable");
                retry.not_before = Some((Instant::now() + delay, e.clone()));
                Err(e)
            }
        }
    }

    fn live(&self) -> Option<Arc<Client>> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    async fn open(&self) -> Result<Client, PgConnError> {
        let client = self.endpoint.connect().await?;
        if let Some(sql) = &self.session_sql {
            client.batch_execute(sql).await.map_err(|e| PgConnError::Connect {
                endpoint: self.endpoint.label().to_string(),
                cause: format!("session setup failed: {e}"),
            })?;
        }
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrosync_testkit::{PgCluster, PgOptions};

    /// Every storage read awaits `get`, and tasks that read hold its future in theirs (a held
    /// sync connection, for one): connecting lives in a box, not in that future.
    #[test]
    fn getting_a_client_is_a_small_future() {
        fn future_size<Fut>(_: impl FnOnce() -> Fut) -> usize {
            std::mem::size_of::<Fut>()
        }
        let lazy: Option<&LazyClient> = None;
        let get = future_size(move || lazy.map(LazyClient::get));
        assert!(get <= 512, "LazyClient::get's future takes {get} bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconnects_after_the_connection_is_killed() -> anyhow::Result<()> {
        let cluster = PgCluster::start(PgOptions::default())?;
        let endpoint = PgEndpoint::from_conn_str(&cluster.conn_str("postgres"))?;
        let lazy = LazyClient::connected(endpoint, Some("SET application_name = 'lazy-test'")).await?;
        let first = lazy.get().await?;
        let pid: i32 = first.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        let admin = cluster.connect("postgres").await?;
        admin.execute("SELECT pg_terminate_backend($1)", &[&pid]).await?;
        // The old connection notices on its next use; the one after that reconnects.
        let _ = first.query_one("SELECT 1", &[]).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let second = loop {
            match lazy.get().await {
                Ok(c) if c.query_one("SELECT 1", &[]).await.is_ok() => break c,
                _ if Instant::now() > deadline => anyhow::bail!("never reconnected"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let row = second
            .query_one("SELECT pg_backend_pid(), current_setting('application_name')", &[])
            .await?;
        assert_ne!(row.get::<_, i32>(0), pid, "a new backend serves the new connection");
        assert_eq!(row.get::<_, String>(1), "lazy-test", "session settings are applied again");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_server_fails_fast_with_the_cause() -> anyhow::Result<()> {
        let port = ferrosync_testkit::free_port()?;
        let endpoint = PgEndpoint::from_conn_str(&format!("host=127.0.0.1 port={port} user=postgres connect_timeout=2"))?;
        let lazy = LazyClient::new(endpoint, None);
        let err = lazy.get().await.expect_err("nothing listens there");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
        let started = Instant::now();
        assert!(lazy.get().await.is_err());
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "within the backoff window callers fail fast"
        );
        Ok(())
    }
}
