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
//! says what replication is doing and why it is degraded, and lists each replication stream the
//! process works on: during a deploy, the new PROCESSING stream snapshots beside the ACTIVE
//! one, which keeps serving (and readiness stays true).

use crate::server::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferrosync_config::ProbesConfig;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
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
    /// Per replication stream this process works on (by id, so oldest first).
    streams: Mutex<BTreeMap<i64, StreamStatus>>,
    /// Per stream: checkpoints this process's replicator committed that were not seen served
    /// yet, oldest first (op id, when).
    committed: Mutex<HashMap<i64, VecDeque<(i64, Instant)>>>,
}

/// Pending checkpoints remembered at most; only the oldest matters, so newer ones are dropped.
const MAX_PENDING: usize = 1024;

#[derive(Clone)]
struct StreamStatus {
    /// The stream's lifecycle state in storage (`PROCESSING`, `ACTIVE`, `STOP`...).
    state: &'static str,
    /// What this process does for it: `standby`, `snapshot`, `streaming`, `retrying`, `cleanup`.
    phase: &'static str,
    error: Option<String>,
    since: u64,
}

impl StreamStatus {
    fn json(&self) -> Value {
        json!({ "state": self.phase, "since": self.since, "error": self.error })
    }
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
            streams: Mutex::default(),
            committed: Mutex::default(),
        }
    }

    /// Record what this process does for `stream` (`error`: why it is retrying).
    pub fn set_replication(&self, stream: i64, phase: &'static str, error: Option<String>) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let status = streams.entry(stream).or_insert_with(|| StreamStatus {
            state: "",
            phase: "",
            error: None,
            since: 0,
        });
        if status.phase != phase {
            status.since = unix_millis() as u64 / 1000;
        }
        status.phase = phase;
        status.error = error;
    }

    /// The streams this process works on and their lifecycle states; others are forgotten.
    pub fn set_streams(&self, states: &[(i64, &'static str)]) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.retain(|id, _| states.iter().any(|(s, _)| s == id));
        for (id, state) in states {
            let status = streams.entry(*id).or_insert_with(|| StreamStatus {
                state,
                phase: "starting",
                error: None,
                since: unix_millis() as u64 / 1000,
            });
            status.state = state;
        }
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        committed.retain(|id, _| states.iter().any(|(s, _)| s == id));
    }

    /// Replication committed checkpoint `op_id` of `stream`.
    pub fn checkpoint_committed(&self, stream: i64, op_id: i64) {
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        let pending = committed.entry(stream).or_default();
        if pending.len() < MAX_PENDING {
            pending.push_back((op_id, Instant::now()));
        }
    }

    /// Why replication of `stream` is failing, while it is.
    pub fn replication_error(&self, stream: i64) -> Option<String> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let status = streams.get(&stream)?;
        status.error.clone().filter(|_| status.phase == "retrying")
    }

    /// `replication`: what this process does for the served (ACTIVE) stream, else for the
    /// oldest one it works on; `streams`: every stream it works on, a deploy in progress included.
    fn replication(&self) -> (Value, Value) {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let main = streams
            .values()
            .find(|s| s.state == "ACTIVE")
            .or_else(|| streams.values().next())
            .map_or_else(|| json!({ "state": "disabled", "since": 0, "error": null }), StreamStatus::json);
        let list = streams
            .iter()
            .map(|(id, s)| {
                let mut entry = s.json();
                entry["id"] = json!(id);
                entry["stream_state"] = json!(s.state);
                entry
            })
            .collect();
        (main, Value::Array(list))
    }

    fn touch(&self) {
        self.touched_at.store(unix_millis(), Ordering::Relaxed);
    }

    /// Whether the served checkpoint (`served`: stream and op) lags a committed one for long.
    /// Only the served stream counts: a version still being built is not "stale".
    fn stale(&self, served: Option<(i64, i64)>) -> bool {
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        let Some((stream, op)) = served else { return false };
        let Some(pending) = committed.get_mut(&stream) else { return false };
        while pending.front().is_some_and(|(o, _)| *o <= op) {
            pending.pop_front();
        }
        pending.front().is_some_and(|(_, at)| at.elapsed() > STALE_AFTER)
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
    let (replication, streams) = probes.replication();
    let touched_at = probes.touched_at.load(Ordering::Relaxed);
    let body = json!({
        "started": started,
        "ready": ready,
        "touched_at": ferrosync_rules::iso8601_millis(touched_at),
        "storage": { "ok": storage_error.is_none(), "error": storage_error },
        "replication": replication,
        "streams": streams,
        "checkpoint": {
            "served": served.map(|(_, op)| op.to_string()),
            "stale": stale,
        },
    });
    (ready, started, body)
}

/// Milliseconds since the Unix epoch (0 on a clock before it).
pub(crate) fn unix_millis() -> i64 {
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

    fn pending(probes: &ProbeState, stream: i64) -> usize {
        probes
            .committed
            .lock()
            .map(|c| c.get(&stream).map_or(0, VecDeque::len))
            .unwrap_or(0)
    }

    #[test]
    fn committed_checkpoints_are_forgotten_once_served() {
        let probes = ProbeState::default();
        assert!(!probes.stale(Some((1, 0))), "nothing committed");
        probes.checkpoint_committed(1, 5);
        probes.checkpoint_committed(1, 7);
        assert!(!probes.stale(Some((1, 5))), "committed a moment ago");
        assert_eq!(pending(&probes, 1), 1);
        assert!(!probes.stale(Some((1, 9))));
        assert_eq!(pending(&probes, 1), 0);
        // A version being built is not compared with the one served.
        probes.checkpoint_committed(2, 3);
        assert!(!probes.stale(Some((1, 9))));
        assert_eq!(pending(&probes, 2), 1);
    }

    #[test]
    fn an_old_unserved_commit_is_stale() {
        let probes = ProbeState::default();
        probes.checkpoint_committed(1, 5);
        // A deploy's commits in between do not hide the served stream's.
        probes.checkpoint_committed(2, 100);
        if let Ok(mut c) = probes.committed.lock() {
            if let Some(p) = c.get_mut(&1) {
                p[0].1 = Instant::now() - STALE_AFTER - Duration::from_secs(1);
            }
        }
        assert!(probes.stale(Some((1, 4))));
        assert!(!probes.stale(Some((1, 5))));
    }
    #[test]
    fn a_deploy_shows_as_a_second_stream_and_the_served_one_stays_the_summary() {
        let probes = ProbeState::default();
        assert_eq!(probes.replication().0["state"], "disabled");
        probes.set_streams(&[(1, "ACTIVE")]);
        probes.set_replication(1, "streaming", None);
        probes.set_streams(&[(1, "ACTIVE"), (2, "PROCESSING")]);
        probes.set_replication(2, "snapshot", None);
        let (summary, streams) = probes.replication();
        assert_eq!(summary["state"], "streaming", "the served stream's replication: {summary}");
        assert_eq!(streams[1]["id"], 2);
        assert_eq!(streams[1]["stream_state"], "PROCESSING");
        assert_eq!(streams[1]["state"], "snapshot");

        // The switch: 2 serves, 1 awaits clean-up; once 1 is gone it is no longer listed.
        probes.set_streams(&[(1, "STOP"), (2, "ACTIVE")]);
        probes.set_replication(2, "streaming", None);
        probes.set_replication(1, "cleanup", None);
        assert_eq!(probes.replication().0["state"], "streaming");
        probes.set_streams(&[(2, "ACTIVE")]);
        let (_, streams) = probes.replication();
        assert_eq!(streams.as_array().map(Vec::len), Some(1), "{streams}");
        assert_eq!(streams[0]["id"], 2);
    }
}
