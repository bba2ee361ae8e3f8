//! `GET /write-checkpoint2.json`: record the source's current WAL head for this user/client,
//! then emit a marker so replication produces a checkpoint past it even on an idle source.

use crate::error::ServiceError;
use crate::server::AppState;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use ferrosync_storage::SyncStorage;
use serde::Deserialize;
use serde_json::json;
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
    let auth = state
        .keys
        .verify_authorization(headers.get("authorization").and_then(|h| h.to_str().ok()))
        .await?;
    let source = state
        .source
        .as_ref()
        .ok_or_else(|| ServiceError::new("PSYNC_S2302", 500, "No replication source is configured"))?;
    let key = user_key(&auth.user_id, query.client_id.as_deref());
    // A silent network closes nothing: bound the whole request rather than hang the client.
    let created = async {
        let source = source.get().await.map_err(internal)?;
        let head = ferrosync_source::setup::current_lsn(&source).await.map_err(internal)?;
        let id = state.hub.storage().create_write_checkpoint(&key, head.0).await.map_err(internal)?;
        ferrosync_source::setup::emit_ping(&source).await.map_err(internal)?;
        Ok::<_, ServiceError>(id)
    };
    let id = tokio::time::timeout(WRITE_CHECKPOINT_TIMEOUT, created).await.map_err(|_| {
        ServiceError::new(
            "PSYNC_S2003",
            503,
            "The source or bucket storage did not answer in time; retry shortly",
        )
    })??;
    Ok(Json(json!({ "data": { "write_checkpoint": id.to_string() } })))
}

/// Longest a write checkpoint request waits for the source and storage.
const WRITE_CHECKPOINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

fn internal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::internal(e.to_string())
}
