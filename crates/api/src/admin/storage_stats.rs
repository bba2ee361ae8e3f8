//! `GET /api/admin/v1/storage-stats[?top=N]` (ferrosync's own): bucket storage sizes per table
//! and per sync config version, and the largest buckets — what `ferrosync storage stats`
//! prints, as JSON.

use super::data;
use crate::error::ServiceError;
use crate::server::AppState;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// Largest buckets listed unless `top` says otherwise, and the most `top` may ask for.
const DEFAULT_TOP: usize = 20;
const MAX_TOP: usize = 1000;

#[derive(Deserialize)]
pub(super) struct StatsQuery {
    top: Option<usize>,
}

pub(super) async fn storage_stats(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<StatsQuery>,
) -> Result<Json<Value>, ServiceError> {
    state.admin.tokens.authorize(&headers)?;
    let top = query.top.unwrap_or(DEFAULT_TOP).min(MAX_TOP);
    let client = state.admin.storage().await?;
    let stats = ferrosync_storage::stats::collect(&client, top)
        .await
        .map_err(super::storage_error)?;
    let value = serde_json::to_value(stats).map_err(|e| ServiceError::internal(e.to_string()))?;
    Ok(data(value))
}
