//! `POST /sync/checkpoint-request` (protocol.md §2.5 item 2, §8 "Requests mode"): the client
//! chooses its write checkpoint ids and the service keeps the largest per `<sub>/<client_id>`.
//!
//! A request that raises the stored id stores it with the source's current WAL head, exactly
//! like a legacy write checkpoint, so it reaches the client in the `write_checkpoint` field of
//! the first checkpoint past that head. A stale or repeated id changes nothing, and the answer
//! is the stored id (the client re-seeds its counter from it). Both kinds of request end with
//! the source marker that makes replication produce a checkpoint on an idle source, unless this
//! process's hub already delivers the stored id. Legacy and requested ids share the stored
//! value, so it stays monotone for a client that mixes the modes (see
//! [`ferrosync_storage::checkpoint_requests`]). Requested ids expire after
//! `checkpoint_request_retention_minutes`; the sweep runs as requests arrive, since only
//! requests add rows.

use crate::body::{LimitedBody, CHECKPOINT_REQUEST_LIMIT};
use crate::checkpoint::{authenticate, bounded, internal, source, user_key};
use crate::error::ServiceError;
use crate::server::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use ferrosync_source::setup::{current_lsn, emit_ping};
use ferrosync_storage::PgStorage;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The request body; unknown fields are ignored.
#[derive(Deserialize)]
struct CheckpointRequest {
    client_id: String,
    /// A decimal string or a JSON integer (strings carry ids beyond 2^53 exactly).
    checkpoint_request_id: Value,
}

pub async fn checkpoint_request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody<CHECKPOINT_REQUEST_LIMIT>,
) -> Result<Json<Value>, ServiceError> {
    let request: CheckpointRequest =
        serde_json::from_slice(&body).map_err(|e| ServiceError::validation(format!("invalid checkpoint request body: {e}")))?;
    let id = request_id(&request.checkpoint_request_id)?;
    let sub = authenticate(&state, &headers).await?;
    let source = source(&state)?;
    let key = user_key(&sub, Some(&request.client_id));
    let storage = state.hub.storage();
    let stored = bounded(async {
        let source = source.get().await.map_err(internal)?;
        let head = current_lsn(&source).await.map_err(internal)?;
        let stored = storage.request_write_checkpoint(&key, id, head.0).await.map_err(internal)?;
        if !delivered(&state, &key, stored) {
            emit_ping(&source).await.map_err(internal)?;
        }
        Ok(stored)
    })
    .await?;
    tracing::debug!(key, requested = id, stored, "checkpoint request");
    state.checkpoint_requests.sweep_if_due(storage);
    Ok(Json(json!({ "data": { "checkpoint_request_id": stored.to_string() } })))
}

/// Whether connections of this process already send `id` (or a later one) to `key`.
fn delivered(state: &AppState, key: &str, id: i64) -> bool {
    let hub = &state.hub;
    let current = hub.subscribe().borrow().as_ref().map(|s| s.checkpoint.lsn);
    current
        .and_then(|lsn| hub.write_checkpoint(key, lsn))
        .is_some_and(|visible| visible >= id)
}

/// `checkpoint_request_id`: 1..=i64::MAX.
fn request_id(value: &Value) -> Result<i64, ServiceError> {
    let id = match value {
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse::<i64>().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    };
    id.filter(|id| *id >= 1).ok_or_else(|| {
        ServiceError::validation(format!(
            "checkpoint_request_id must be an integer from 1 to {} (as a decimal string or a number), not {value}",
            i64::MAX
        ))
    })
}

/// How often a process deletes expired checkpoint requests, at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// How long requested ids are kept (`checkpoint_request_retention_minutes`), and when this
/// process deletes expired ones next.
pub struct RequestRetention {
    period: Duration,
    next_sweep: Mutex<Option<Instant>>,
}

impl RequestRetention {
    pub fn new(period: Duration) -> RequestRetention {
        RequestRetention {
            period,
            next_sweep: Mutex::new(None),
        }
    }

    /// Delete expired requests in the background if a sweep is due; failures are logged (the
    /// next sweep catches up).
    fn sweep_if_due(&self, storage: &Arc<PgStorage>) {
        if !self.take_due(Instant::now()) {
            return;
        }
        let storage = storage.clone();
        let period = self.period;
        tokio::spawn(async move {
            match storage.expire_checkpoint_requests(period).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "deleted expired checkpoint requests"),
                Err(e) => tracing::warn!(error = %e, "could not delete expired checkpoint requests"),
            }
        });
    }

    /// Whether a sweep is due at `now`; if so, the next one is due a [`SWEEP_INTERVAL`] later.
    fn take_due(&self, now: Instant) -> bool {
        let mut next = self.next_sweep.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_some_and(|at| now < at) {
            return false;
        }
        *next = Some(now + SWEEP_INTERVAL);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_positive_i64_as_strings_or_numbers() {
        assert_eq!(request_id(&json!("1")).ok(), Some(1));
        assert_eq!(request_id(&json!(42)).ok(), Some(42));
        assert_eq!(request_id(&json!("9223372036854775807")).ok(), Some(i64::MAX));
        assert_eq!(request_id(&json!(9223372036854775807u64)).ok(), Some(i64::MAX));
        for bad in [
            json!(0),
            json!("0"),
            json!(-1),
            json!("-1"),
            json!("+1"),
            json!(" 1"),
            json!(""),
            json!(1.5),
            json!(2.0),
            json!("9223372036854775808"),
            json!(9223372036854775808u64),
            json!(null),
            json!([1]),
        ] {
            let e = request_id(&bad).err().map(|e| (e.status, e.code));
            assert_eq!(e, Some((400, "PSYNC_S2001")), "{bad}");
        }
    }

    #[test]
    fn sweeps_are_spaced() {
        let retention = RequestRetention::new(Duration::from_secs(3600));
        let start = Instant::now();
        assert!(retention.take_due(start));
        assert!(!retention.take_due(start + SWEEP_INTERVAL / 2));
        assert!(retention.take_due(start + SWEEP_INTERVAL));
        assert!(!retention.take_due(start + SWEEP_INTERVAL));
    }
}
