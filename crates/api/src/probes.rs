//! Health probes as `healthcheck.probes` says: the `/probes/*` routes (`use_http`) and the
//! reference's container probe files (`use_filesystem`): `.probes/startup` and `.probes/ready`
//! written (unix milliseconds) when the service becomes ready, `ready` removed when it stops
//! being ready, and `.probes/poll` rewritten every [`TOUCH_INTERVAL`] while it is alive.
//! `use_legacy` (the default without `healthcheck.probes`) is both.
//!
//! Ready means "can serve a current checkpoint": a sync config is active, bucket storage
//! answers, and, while this process replicates, the checkpoint served is not more than
//! [`STALE_AFTER`] behind the last one replication committed (a checkpoint listener that stopped
//! following would otherwise serve stale data while looking healthy). Every probe's body also
//! says what replication is doing and why it is degraded.

use crate::server::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferrosync_config::ProbesConfig;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Liveness: the process touched its probe state this recently (the reference's 10 s).
const LIVE_WITHIN_MS: i64 = 10_000;
/// How often the probe task touches the state and the files.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(2);
/// A committed checkpoint not served after this long makes the service unready.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// What the probes report; written by the server, the probe task and the replicator.
pub struct ProbeState {
    pub config: ProbesConfig,
    pub started: AtomicBool,
    touched_at: AtomicI64,
    replication: Mutex<ReplicationStatus>,
    /// Checkpoints this process's replicator committed that were not seen served yet.
    committed: Mutex<Committed>,
}

/// Committed checkpoints of one stream, oldest first: (op id, when).
#[derive(Default)]
struct Committed {
    stream: i64,
    pending: VecDeque<(i64, Instant)>,
}

/// Pending checkpoints remembered at most; only the oldest matters, so newer ones are dropped.
const MAX_PENDING: usize = 1024;

#[derive(Clone)]
struct ReplicationStatus {
    /// `disabled` (no source), `idle` (nothing deployed), `standby`, `snapshot`, `streaming`
    /// or `retrying`.
    state: &'static str,
    error: Option<String>,
    since: u64,
}

impl Default for ProbeState {
    fn default() -> Self {
        ProbeState::new(ProbesConfig::default())
    }
}

impl ProbeState {
    pub fn new(config: ProbesConfig) -> ProbeState {
        ProbeState {
            config,
            started: AtomicBool::new(false),
            touched_at: AtomicI64::new(unix_millis()),
            replication: Mutex::new(ReplicationStatus {
                state: "disabled",
                error: None,
                since: 0,
            }),
            committed: Mutex::default(),
        }
    }

    /// Record what replication is doing (`error`: why it is retrying).
    pub fn set_replication(&self, state: &'static str, error: Option<String>) {
        let mut status = self.replication.lock().unwrap_or_else(|e| e.into_inner());
        if status.state != state {
            status.since = unix_millis() as u64 / 1000;
        }
        status.state = state;
        status.error = error;
    }

    /// Replication committed checkpoint `op_id` of `stream`.
    pub fn checkpoint_committed(&self, stream: i64, op_id: i64) {
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        if committed.stream != stream {
            committed.stream = stream;
            committed.pending.clear();
        }
        if committed.pending.len() < MAX_PENDING {
            committed.pending.push_back((op_id, Instant::now()));
        }
    }

    /// Why replication is failing, while it is.
    pub fn replication_error(&self) -> Option<String> {
        let status = self.replication.lock().unwrap_or_else(|e| e.into_inner());
        status.error.clone().filter(|_| status.state == "retrying")
    }

    fn replication(&self) -> ReplicationStatus {
        self.replication.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn touch(&self) {
        self.touched_at.store(unix_millis(), Ordering::Relaxed);
    }

    /// Whether the served checkpoint (`served`: stream and op) lags a committed one for long.
    fn stale(&self, served: Option<(i64, i64)>) -> bool {
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        let Some((stream, op)) = served else { return false };
        if stream != committed.stream {
            return false; // A version not served yet (still snapshotting) is not "stale".
        }
        while committed.pending.front().is_some_and(|(o, _)| *o <= op) {
            committed.pending.pop_front();
        }
        committed.pending.front().is_some_and(|(_, at)| at.elapsed() > STALE_AFTER)
    }
}

/// (ready, started, body).
pub(crate) fn evaluate(state: &AppState) -> (bool, bool, Value) {
    let probes = &state.probes;
    let started = probes.started.load(Ordering::Relaxed);
    let served = state.hub.subscribe().borrow().as_ref().map(|h| (h.group, h.checkpoint.op_id));
    let storage_error = state.hub.storage_error();
    let stale = probes.stale(served);
    let ready = started && served.is_some() && storage_error.is_none() && !stale;
    let replication = probes.replication();
    let touched_at = probes.touched_at.load(Ordering::Relaxed);
    let body = json!({
        "started": started,
        "ready": ready,
        "touched_at": ferrosync_rules::iso8601_millis(touched_at),
        "storage": { "ok": storage_error.is_none(), "error": storage_error },
        "replication": { "state": replication.state, "since": replication.since, "error": replication.error },
        "checkpoint": {
            "served": served.map(|(_, op)| op.to_string()),
            "stale": stale,
        },
    });
    (ready, started, body)
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn answer(ok: bool, body: Value) -> (StatusCode, Json<Value>) {
    (if ok { StatusCode::OK } else { StatusCode::BAD_REQUEST }, Json(body))
}

pub async fn liveness(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let (_, _, body) = evaluate(&state);
    let live = unix_millis() - state.probes.touched_at.load(Ordering::Relaxed) < LIVE_WITHIN_MS;
    answer(live, body)
}

pub async fn startup(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let (_, started, body) = evaluate(&state);
    answer(started, body)
}

pub async fn readiness(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let (ready, _, body) = evaluate(&state);
    answer(ready, body)
}

/// Touch the probe state every [`TOUCH_INTERVAL`] and keep the probe files in `dir` (the
/// reference's `<cwd>/.probes`) when `use_filesystem`; runs until the process ends.
pub async fn run(state: Arc<AppState>, dir: PathBuf) {
    let files = state.probes.config.filesystem();
    let mut was_ready = false;
    loop {
        state.probes.touch();
        let (ready, _, _) = evaluate(&state);
        if files {
            write_files(&dir, ready, was_ready).await;
        }
        if ready != was_ready {
            tracing::info!(ready, "readiness changed");
        }
        was_ready = ready;
        tokio::time::sleep(TOUCH_INTERVAL).await;
    }
}

/// As the reference's file probe: `ready()` writes `startup` and `ready`, `unready()` removes
/// `ready`, `touch()` writes `poll`. Failures are logged and retried on the next round.
async fn write_files(dir: &Path, ready: bool, was_ready: bool) {
    let now = unix_millis().to_string();
    let result = async {
        tokio::fs::create_dir_all(dir).await?;
        tokio::fs::write(dir.join("poll"), &now).await?;
        match (ready, was_ready) {
            (true, false) => {
                tokio::fs::write(dir.join("startup"), &now).await?;
                tokio::fs::write(dir.join("ready"), &now).await
            }
            (false, true) | (false, false) => match tokio::fs::remove_file(dir.join("ready")).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            (true, true) => Ok(()),
        }
    };
    if let Err(e) = result.await {
        tracing::warn!(dir = %dir.display(), error = %e, "could not write the probe files");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_checkpoints_are_forgotten_once_served() {
        let probes = ProbeState::default();
        assert!(!probes.stale(Some((1, 0))), "nothing committed");
        probes.checkpoint_committed(1, 5);
        probes.checkpoint_committed(1, 7);
        assert!(!probes.stale(Some((1, 5))), "committed a moment ago");
        assert_eq!(probes.committed.lock().map(|c| c.pending.len()).ok(), Some(1));
        assert!(!probes.stale(Some((1, 9))));
        assert_eq!(probes.committed.lock().map(|c| c.pending.len()).ok(), Some(0));
        // A version being built is not compared with the one served.
        probes.checkpoint_committed(2, 3);
        assert!(!probes.stale(Some((1, 9))));
        assert_eq!(probes.committed.lock().map(|c| c.pending.len()).ok(), Some(1));
    }

    #[test]
    fn an_old_unserved_commit_is_stale() {
        let probes = ProbeState::default();
        probes.checkpoint_committed(1, 5);
        if let Ok(mut c) = probes.committed.lock() {
            c.pending[0].1 = Instant::now() - STALE_AFTER - Duration::from_secs(1);
        }
        assert!(probes.stale(Some((1, 4))));
        assert!(!probes.stale(Some((1, 5))));
    }
}
