//! `GET /write-checkpoint2.json`: record the source's current WAL head for this user/client,
//! then emit a marker so replication produces a checkpoint past it even on an idle source.
//! The helpers here serve `POST /sync/checkpoint-request` too ([`crate::checkpoint_request`]).

use crate::error::ServiceError;
use crate::server::{AppState, SourceClient};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use ferrosync_source::setup::{current_lsn, emit_ping};
use ferrosync_storage::SyncStorage;
use serde::Deserialize;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;

#[derive(Deserialize)]
pub struct WriteCheckpointQuery {
    client_id: Option<String>,
}

/// `<sub>/<client_id>`, or `<sub>` without a client id (protocol spec §8).
pub fn user_key(sub: &str, client_id: Option<&str>) -> String {
    match client_id {
        Some(c) if !c.is_empty() => format!("{sub}/{c}"),
        _ => sub.to_string(),
    }
}

pub async fn write_checkpoint(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<WriteCheckpointQuery>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    let sub = authenticate(&state, &headers).await?;
    let source = source(&state)?;
    let key = user_key(&sub, query.client_id.as_deref());
    let id = bounded(async {
        let source = source.get().await.map_err(internal)?;
        let head = current_lsn(&source).await.map_err(internal)?;
        let id = state.hub.storage().create_write_checkpoint(&key, head.0).await.map_err(internal)?;
        emit_ping(&source).await.map_err(internal)?;
        Ok(id)
    })
    .await?;
    Ok(Json(json!({ "data": { "write_checkpoint": id.to_string() } })))
}

/// The token's subject, as the write checkpoint key starts with it.
pub(crate) async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<String, ServiceError> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
    Ok(state.keys.verify_authorization(authorization).await?.user_id)
}

/// The source connection: write checkpoints are positions in the source's WAL.
pub(crate) fn source(state: &AppState) -> Result<&SourceClient, ServiceError> {
    state
        .source
        .as_ref()
        .ok_or_else(|| ServiceError::new("PSYNC_S2302", 500, "No replication source is configured"))
}

/// Run `work` (source and storage round trips) within [`WRITE_CHECKPOINT_TIMEOUT`]: a silent
/// network closes nothing, so the request is bounded rather than left to hang the client.
pub(crate) async fn bounded<T>(work: impl Future<Output = Result<T, ServiceError>>) -> Result<T, ServiceError> {
    tokio::time::timeout(WRITE_CHECKPOINT_TIMEOUT, work).await.map_err(|_| {
        ServiceError::new(
            "PSYNC_S2003",
            503,
            "The source or bucket storage did not answer in time; retry shortly",
        )
    })?
}

/// Longest a write checkpoint request waits for the source and storage.
const WRITE_CHECKPOINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

pub(crate) fn internal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::internal(e.to_string())
}
