//! Long-running pieces the failure tests share: a raw protocol client that stays connected
//! across service deaths (reopening from its positions, as the SDKs do), and helpers to wait
//! for it to match the source.

use crate::harness::*;
use anyhow::{bail, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A [`RawStream`] client kept connected by a background task. Every line is applied to a
/// [`ClientState`], so every checksum is verified at each `checkpoint_complete` and a resent op
/// is an error; such a protocol error stops the client and is kept in `fatal`. A dropped
/// stream (the service died, or ended it) is reopened from the client's positions.
pub struct LiveClient {
    pub user: String,
    pub state: Arc<Mutex<ClientState>>,
    /// Streams opened successfully, the first included.
    pub opened: Arc<AtomicUsize>,
    /// Failed attempts to open a stream (connection refused, non-2xx status).
    pub open_failures: Arc<AtomicUsize>,
    /// Why the last stream ended (for the report).
    pub last_end: Arc<Mutex<Option<String>>>,
    pub fatal: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// No line for this long (the service sends keepalives more often) counts as a dead stream.
const SILENCE: Duration = Duration::from_secs(30);

impl LiveClient {
    /// Start a client for `user` against `url`; it retries until a stream opens.
    pub fn spawn(url: String, user: &str) -> LiveClient {
        let state = Arc::new(Mutex::new(ClientState::default()));
        let opened = Arc::new(AtomicUsize::new(0));
        let open_failures = Arc::new(AtomicUsize::new(0));
        let last_end = Arc::new(Mutex::new(None));
        let fatal = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (state, opened, open_failures, last_end, fatal, stop) = (
                state.clone(),
                opened.clone(),
                open_failures.clone(),
                last_end.clone(),
                fatal.clone(),
                stop.clone(),
            );
            let user = user.to_string();
            async move {
                let client_id = format!("live-{user}");
                while !stop.load(Ordering::Relaxed) {
                    let positions = state.lock().unwrap().resume_positions();
                    let body = json!({"buckets": positions, "client_id": client_id});
                    let open = tokio::time::timeout(Duration::from_secs(10), RawStream::open(&url, &token(&user), body)).await;
                    let mut stream = match open {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            open_failures.fetch_add(1, Ordering::Relaxed);
                            *last_end.lock().unwrap() = Some(format!("open failed: {e:#}"));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        Err(_) => {
                            open_failures.fetch_add(1, Ordering::Relaxed);
                            *last_end.lock().unwrap() = Some("open timed out after 10 s".into());
                            continue;
                        }
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        match stream.next_line(SILENCE).await {
                            Ok(line) => {
                                if let Err(e) = state.lock().unwrap().apply(&line) {
                                    *fatal.lock().unwrap() = Some(format!("{user}: {e:#}"));
                                    return;
                                }
                            }
                            Err(e) => {
                                *last_end.lock().unwrap() = Some(format!("stream ended: {e:#}"));
                                break;
                            }
                        }
                    }
                }
            }
        });
        LiveClient {
            user: user.to_string(),
            state,
            opened,
            open_failures,
            last_end,
            fatal,
            stop,
            task,
        }
    }

    /// Streams that ended and were reopened.
    pub fn reconnects(&self) -> usize {
        self.opened.load(Ordering::Relaxed).saturating_sub(1)
    }

    pub fn check_fatal(&self) -> Result<()> {
        if let Some(e) = self.fatal.lock().unwrap().clone() {
            bail!("client {} failed: {e}", self.user);
        }
        Ok(())
    }

    /// The todos shown after the last complete checkpoint (`None` while one is in progress).
    pub fn complete_todos(&self) -> Option<BTreeMap<String, String>> {
        let state = self.state.lock().unwrap();
        state.complete.then(|| client_todos(&state))
    }

    /// Wait until a complete checkpoint shows `pred`; protocol errors end the wait at once.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&BTreeMap<String, String>) -> bool) -> Result<Duration> {
        let started = Instant::now();
        loop {
            self.check_fatal()?;
            if self.complete_todos().is_some_and(|t| pred(&t)) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "client {} did not get there within {timeout:?} (streams opened {}, open failures {}, last end: {:?})",
                    self.user,
                    self.opened.load(Ordering::Relaxed),
                    self.open_failures.load(Ordering::Relaxed),
                    self.last_end.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Wait until the client holds exactly the source's todos of its user (re-read as the
    /// source may still change).
    pub async fn converge(&self, db: &tokio_postgres::Client, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            self.check_fatal()?;
            let expected = source_todos(db, &self.user).await?;
            let got = self.complete_todos();
            if got.as_ref() == Some(&expected) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                let got = got.unwrap_or_default();
                let missing = expected.keys().filter(|k| !got.contains_key(*k)).count();
                let extra = got.keys().filter(|k| !expected.contains_key(*k)).count();
                let differ = expected.iter().filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v)).count();
                bail!(
                    "client {} differs from the source after {timeout:?}: {} rows vs {} (missing {missing}, extra {extra}, different {differ}); streams opened {}, open failures {}, last end: {:?}",
                    self.user,
                    got.len(),
                    expected.len(),
                    self.opened.load(Ordering::Relaxed),
                    self.open_failures.load(Ordering::Relaxed),
                    self.last_end.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

impl Drop for LiveClient {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connect to the source, retrying (for writers that outlive a Postgres restart).
pub async fn connect_retrying(conn_str: &str) -> tokio_postgres::Client {
    loop {
        if let Ok((client, conn)) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Node SDK client for `user` on `url` (database in `dir`), connected and retrying every 200 ms.
pub fn node_client(dir: &std::path::Path, url: &str, user: &str, source_uri: &str) -> Result<NodeAgent> {
    let mut agent = NodeAgent::start()?;
    agent.call(json!({"cmd": "open", "db_path": dir.join(format!("client-{user}.sqlite"))}))?;
    agent.call(json!({"cmd": "connect", "endpoint": url, "token": token(user), "source_url": source_uri, "retry_delay_ms": 200}))?;
    Ok(agent)
}

/// Like [`eventually_equal`] with a timeout, and the SDK status in the error.
pub async fn node_converges(agent: &mut NodeAgent, db: &tokio_postgres::Client, user: &str, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let expected = source_todos(db, user).await?;
        let got = agent.todos()?;
        if got == expected {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "node client {user}: {} rows vs {} in the source after {timeout:?}; status: {}",
                got.len(),
                expected.len(),
                agent.call(json!({"cmd": "status"}))?
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
