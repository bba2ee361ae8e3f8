//! Health probes (`/probes/*`): started once serving, ready once a sync config is active.

use crate::server::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Flags the probes report.
#[derive(Default)]
pub struct ProbeState {
    pub started: AtomicBool,
}

fn body(state: &AppState) -> (bool, serde_json::Value) {
    let started = state.probes.started.load(Ordering::Relaxed);
    let ready = state.hub.subscribe().borrow().is_some();
    (ready, json!({ "started": started, "ready": ready, "touched_at": chrono_now() }))
}

fn chrono_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    secs.to_string()
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
