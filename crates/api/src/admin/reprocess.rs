//! Full reprocess (`POST /api/admin/v1/reprocess`, `POST /api/sync-rules/v1/reprocess`): a new
//! version with the active content, replicated from a fresh snapshot into a new slot; clients
//! move to it once it is ready.

use super::{data, request, AdminBody};
use crate::error::ServiceError;
use crate::server::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use ferrosync_storage::versions::{self, ReprocessError};
use ferrosync_storage::StreamRecord;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
struct ReprocessRequest {}

/// `{connections: [{id, tag, slot_name}]}`.
pub(super) async fn reprocess(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: AdminBody,
) -> Result<Json<Value>, ServiceError> {
    let _: ReprocessRequest = request(&state, &headers, &body)?;
    let stream = start(&state).await?;
    let (id, tag) = match &state.admin.source {
        Some(s) => (s.id.clone(), s.tag.clone()),
        None => ("default".into(), "default".into()),
    };
    Ok(data(
        json!({ "connections": [{ "id": id, "tag": tag, "slot_name": stream.slot_name }] }),
    ))
}

/// `{slot_name}`.
pub(super) async fn reprocess_sync_rules(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: AdminBody,
) -> Result<Json<Value>, ServiceError> {
    let _: ReprocessRequest = request(&state, &headers, &body)?;
    let stream = start(&state).await?;
    Ok(data(json!({ "slot_name": stream.slot_name })))
}

async fn start(state: &AppState) -> Result<StreamRecord, ServiceError> {
    let admin = &state.admin;
    let mut storage = admin.dedicated_storage().await?;
    let stream = versions::reprocess(&mut storage, admin.slot_prefix()).await.map_err(|e| match e {
        ReprocessError::Busy => ServiceError::new("PSYNC_S4106", 409, e.to_string()),
        ReprocessError::NoActive => ServiceError::new("PSYNC_S4104", 422, e.to_string()),
        ReprocessError::Storage(e) => super::storage_error(e),
    })?;
    tracing::info!(stream = stream.id, slot = %stream.slot_name, "admin API: full reprocess requested");
    Ok(stream)
}
