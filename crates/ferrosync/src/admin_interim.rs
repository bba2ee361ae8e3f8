//! `GET /api/admin/v1/storage-stats` for the dashboard's largest buckets (one `op_chunks`
//! query over the served sync config), behind the admin token.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ferrosync_api::error::ServiceError;
use ferrosync_api::AppState;
use ferrosync_pgconn::{LazyClient, PgEndpoint};
use serde_json::{json, Value};
use std::sync::Arc;

/// Buckets listed by storage-stats.
const LARGEST_BUCKETS: i64 = 20;

/// Ops and stored (compressed) bytes per bucket of one sync config, largest first.
const LARGEST_BUCKETS_SQL: &str = "SELECT bucket, sum(op_count)::bigint AS ops, sum(pg_column_size(ops))::bigint AS bytes
    FROM ferrosync.op_chunks WHERE group_id = $1 GROUP BY bucket ORDER BY bytes DESC, bucket LIMIT $2";

struct StatsState {
    app: Arc<AppState>,
    storage: LazyClient,
}

pub fn router(app: Arc<AppState>, storage: PgEndpoint) -> Router {
    let state = Arc::new(StatsState {
        app,
        storage: LazyClient::new(storage, None),
    });
    Router::new()
        .route("/api/admin/v1/storage-stats", get(storage_stats))
        .with_state(state)
}

async fn storage_stats(State(s): State<Arc<StatsState>>, headers: HeaderMap) -> Response {
    if let Err(e) = s.app.admin.tokens.authorize(&headers) {
        return e.into_response();
    }
    match largest_buckets(&s).await {
        Ok(buckets) => Json(json!({ "largest_buckets": buckets })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn largest_buckets(s: &StatsState) -> Result<Vec<Value>, ServiceError> {
    let hub = s
        .app
        .hub
        .subscribe()
        .borrow()
        .clone()
        .ok_or_else(|| ServiceError::new("PSYNC_S2302", 422, "No active sync config: nothing is served yet"))?;
    let unavailable = |e: &dyn std::fmt::Display| ServiceError::new("PSYNC_S2401", 503, format!("bucket storage: {e}"));
    let client = s.storage.get().await.map_err(|e| unavailable(&e))?;
    let group = i32::try_from(hub.group).map_err(|_| ServiceError::internal("sync config id out of range"))?;
    let rows = client
        .query(LARGEST_BUCKETS_SQL, &[&group, &LARGEST_BUCKETS])
        .await
        .map_err(|e| unavailable(&e))?;
    rows.iter()
        .map(|row| {
            let bucket: String = row.try_get(0)?;
            let definition = hub.rules.definition_of(&bucket).map(str::to_string);
            Ok(json!({"bucket": bucket, "definition": definition, "ops": row.try_get::<_, i64>(1)?, "bytes": row.try_get::<_, i64>(2)?}))
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| ServiceError::internal(format!("reading bucket sizes: {e}")))
}
