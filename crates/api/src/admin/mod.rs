//! The admin API (protocol.md §2.7): the reference's `/api/admin/v1/*` and
//! `/api/sync-rules/v1/*` routes with its request and response shapes, so PowerSync tooling
//! works, plus ferrosync's `/api/admin/v1/inspect` and `/api/admin/v1/storage-stats`. Every
//! route takes an `api.tokens` token; bodies are JSON (the sync-rules routes also take YAML)
//! of at most [`ADMIN_BODY_LIMIT`].

mod auth;
mod diagnostics;
mod execute_sql;
mod inspect;
mod reprocess;
mod schema;
mod status;
mod storage_stats;
mod sync_rules;
mod validate;

use crate::body::LimitedBody;
use crate::error::ServiceError;
use crate::server::AppState;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use ferrosync_config::PostgresConnectionConfig;
use ferrosync_pgconn::LazyClient;
use ferrosync_rules::SyncRulesOptions;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::sync::Arc;

pub use auth::ApiTokens;

/// A sync config is a few kilobytes; a large one with many streams stays well under this.
pub const ADMIN_BODY_LIMIT: usize = 1 << 20;

/// An admin request body.
type AdminBody = LimitedBody<ADMIN_BODY_LIMIT>;

/// What the admin routes need besides the sync state.
pub struct AdminState {
    pub tokens: ApiTokens,
    /// `replication.connections[0]`, if configured.
    pub source: Option<PostgresConnectionConfig>,
    /// Bucket storage, for sync config versions and replication status.
    pub storage: LazyClient,
    /// The config file has a sync config: deploying through the API is refused (the file
    /// would win on the next start), as in the reference.
    pub config_has_rules: bool,
    pub rules_options: SyncRulesOptions,
}

/// The admin routes, to merge into the service's router.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/admin/v1/diagnostics", post(diagnostics::diagnostics))
        .route("/api/admin/v1/validate", post(validate::validate))
        .route("/api/admin/v1/schema", post(schema::schema))
        .route("/api/admin/v1/reprocess", post(reprocess::reprocess))
        .route("/api/admin/v1/execute-sql", post(execute_sql::execute_sql))
        .route("/api/admin/v1/inspect", post(inspect::inspect))
        .route("/api/admin/v1/storage-stats", get(storage_stats::storage_stats))
        .route("/api/sync-rules/v1/deploy", post(sync_rules::deploy))
        .route("/api/sync-rules/v1/validate", post(sync_rules::validate))
        .route("/api/sync-rules/v1/current", get(sync_rules::current))
        .route("/api/sync-rules/v1/reprocess", post(reprocess::reprocess_sync_rules))
}

/// The request's JSON body as `T` (an empty body is `{}`), checked before authorization as
/// the reference does (400, then 401).
fn request<T: DeserializeOwned>(state: &AppState, headers: &HeaderMap, body: &AdminBody) -> Result<T, ServiceError> {
    let value: Value = match body.0.iter().all(u8::is_ascii_whitespace) {
        true => json!({}),
        false => serde_json::from_slice(&body.0).map_err(|e| ServiceError::validation(format!("the body is not JSON: {e}")))?,
    };
    let parsed = serde_json::from_value(value).map_err(|e| ServiceError::validation(e.to_string()))?;
    state.admin.tokens.authorize(headers)?;
    Ok(parsed)
}

/// A handler's result wrapped as the reference wraps plain objects: `{"data": ...}`.
fn data(value: Value) -> axum::Json<Value> {
    axum::Json(json!({ "data": value }))
}

/// Bucket storage unreachable (`PSYNC_S2401`-like, 503 so tooling retries).
fn storage_error(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::new("PSYNC_S2401", 503, format!("bucket storage is unavailable: {e}"))
}

impl AdminState {
    async fn storage(&self) -> Result<Arc<tokio_postgres::Client>, ServiceError> {
        self.storage.get().await.map_err(storage_error)
    }

    /// A connection of its own, for a transaction (deploys take the deploy lock in one; the
    /// shared connection is used by other requests at the same time).
    async fn dedicated_storage(&self) -> Result<tokio_postgres::Client, ServiceError> {
        ferrosync_storage::connect(self.storage.endpoint()).await.map_err(storage_error)
    }

    /// The source connection's slot prefix (`powersync_` without a source).
    fn slot_prefix(&self) -> &str {
        self.source.as_ref().map_or("powersync_", |s| s.slot_name_prefix.as_str())
    }
}

/// ISO 8601 UTC timestamp of now, as the reference's `ts` fields.
fn now_iso() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    ferrosync_rules::iso8601_millis(millis)
}
