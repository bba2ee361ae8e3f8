//! The HTTP server: routes, shared state, CORS, and the PowerSync error envelope for unknown routes.

use crate::auth::KeyStore;
use crate::checkpoint_request::RequestRetention;
use crate::error::ServiceError;
use crate::{admin, checkpoint, checkpoint_request, probes, rsocket, stream};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ferrosync_storage::PgStorage;
use ferrosync_sync::{CheckpointHub, Limits};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tower_http::cors::{Any, CorsLayer};

/// Source access the API needs: reading the WAL head and nudging replication for write
/// checkpoints. Reconnects by itself after the source restarted.
pub type SourceClient = ferrosync_pgconn::LazyClient;

/// Everything a request handler needs.
pub struct AppState {
    pub hub: Arc<CheckpointHub<PgStorage>>,
    pub keys: Arc<KeyStore>,
    pub source: Option<SourceClient>,
    pub limits: Limits,
    /// One permit per open sync stream (`max_concurrent_connections`).
    pub connections: Arc<Semaphore>,
    pub probes: Arc<probes::ProbeState>,
    /// Retention of client-chosen write checkpoint ids (`checkpoint_request_retention_minutes`).
    pub checkpoint_requests: RequestRetention,
    pub admin: admin::AdminState,
}

/// The router with every route and CORS for browser SDKs.
pub fn router(state: Arc<AppState>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::USER_AGENT,
            HeaderName::from_static("x-user-agent"),
        ])
        .expose_headers([header::CONTENT_TYPE])
        .max_age(Duration::from_secs(3600));
    let mut routes = Router::new()
        .route("/sync/stream", post(stream::sync_stream).get(rsocket::upgrade))
        .route("/write-checkpoint2.json", get(checkpoint::write_checkpoint))
        .route("/sync/checkpoint-request", post(checkpoint_request::checkpoint_request))
        .merge(admin::routes());
    if state.probes.config.http() {
        routes = routes
            .route("/probes/liveness", get(probes::liveness))
            .route("/probes/startup", get(probes::startup))
            .route("/probes/readiness", get(probes::readiness));
    }
    routes.fallback(not_found).layer(cors).with_state(state)
}

/// Unknown routes; WebSocket upgrades are accepted on any path, as the reference does.
async fn not_found(state: State<Arc<AppState>>, request: Request) -> Response {
    if rsocket::is_upgrade(&request) {
        return rsocket::upgrade(state, request).await;
    }
    ServiceError::new("PSYNC_S2002", 404, "Route not found").into_response()
}
