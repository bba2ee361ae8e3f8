//! Health probes (`/probes/*`): started once serving; ready once a sync config is active and
//! bucket storage answers. Every probe's body also says what replication is doing and why it
//! is degraded, so an operator sees "storage unreachable: ..." rather than a bare 400.

use crate::server::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What the probes report; written by the server and the replicator.
#[derive(Default)]
pub struct ProbeState {
    pub started: AtomicBool,
    replication: Mutex<ReplicationStatus>,
}

#[derive(Clone)]
struct ReplicationStatus {
    /// `disabled` (no source), `standby`, `snapshot`, `streaming` or `retrying`.
    state: &'static str,
    error: Option<String>,
    since: u64,
}

impl Default for ReplicationStatus {
    fn default() -> Self {
        ReplicationStatus {
            state: "disabled",
            error: None,
            since: 0,
        }
    }
}

impl ProbeState {
    /// Record what replication is doing (`error`: why it is retrying).
    pub fn set_replication(&self, state: &'static str, error: Option<String>) {
        let mut status = self.replication.lock().unwrap_or_else(|e| e.into_inner());
        if status.state != state {
            status.since = unix_now();
        }
        status.state = state;
        status.error = error;
    }

    fn replication(&self) -> ReplicationStatus {
        self.replication.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(crate) fn body(state: &AppState) -> (bool, serde_json::Value) {
    let started = state.probes.started.load(Ordering::Relaxed);
    let active = state.hub.subscribe().borrow().is_some();
    let storage_error = state.hub.storage_error();
    let ready = active && storage_error.is_none();
    let replication = state.probes.replication();
    (
        ready,
        json!({
            "started": started,
            "ready": ready,
            "touched_at": unix_now().to_string(),
            "storage": { "ok": storage_error.is_none(), "error": storage_error },
            "replication": { "state": replication.state, "since": replication.since, "error": replication.error },
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
