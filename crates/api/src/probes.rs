//! Health probes (`/probes/*`): started once serving; ready once a sync config is active and
//! bucket storage answers. Every probe's body also says what replication is doing and why it
//! is degraded, so an operator sees "storage unreachable: ..." rather than a bare 400, and
//! lists each replication stream the process works on: during a deploy, the new PROCESSING
//! stream snapshots beside the ACTIVE one, which keeps serving (and readiness stays true).

use crate::server::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What the probes report; written by the server and the replicator.
#[derive(Default)]
pub struct ProbeState {
    pub started: AtomicBool,
    /// Per replication stream this process works on (by id, so oldest first).
    streams: Mutex<BTreeMap<i64, StreamStatus>>,
}

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
    fn json(&self) -> serde_json::Value {
        json!({ "state": self.phase, "since": self.since, "error": self.error })
    }
}

impl ProbeState {
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
            status.since = unix_now();
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
                since: unix_now(),
            });
            status.state = state;
        }
    }

    /// `replication`: what this process does for the served (ACTIVE) stream, else for the
    /// oldest one it works on; `streams`: every stream it works on, a deploy in progress included.
    fn replication(&self) -> (serde_json::Value, serde_json::Value) {
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
        (main, serde_json::Value::Array(list))
    }
}

fn body(state: &AppState) -> (bool, serde_json::Value) {
    let started = state.probes.started.load(Ordering::Relaxed);
    let active = state.hub.subscribe().borrow().is_some();
    let storage_error = state.hub.storage_error();
    let ready = active && storage_error.is_none();
    let (replication, streams) = state.probes.replication();
    (
        ready,
        json!({
            "started": started,
            "ready": ready,
            "touched_at": unix_now().to_string(),
            "storage": { "ok": storage_error.is_none(), "error": storage_error },
            "replication": replication,
            "streams": streams,
        }),
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn liveness(State(state): State<Arc<AppState>>) -> (StatusCode, Json<serde_json::Value>) {
    (StatusCode::OK, Json(body(&state).1))
}

pub async fn startup(State(state): State<Arc<AppState>>) -> (StatusCode, Json<serde_json::Value>) {
    let status = if state.probes.started.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, Json(body(&state).1))
}

pub async fn readiness(State(state): State<Arc<AppState>>) -> (StatusCode, Json<serde_json::Value>) {
    let (ready, body) = body(&state);
    (if ready { StatusCode::OK } else { StatusCode::BAD_REQUEST }, Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

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
