//! `POST /api/admin/v1/diagnostics`: the source connection (reachable, errors), and the active
//! and deploying sync config versions with their replication status (slot, snapshot done,
//! last replicated LSN, replication lag in bytes, tables, errors), `content` on request.

use super::status::{error_entry, version_status, Live};
use super::{data, request, AdminBody};
use crate::error::ServiceError;
use crate::server::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use ferrosync_inspect::source_checks::connect_source;
use ferrosync_inspect::Severity;
use ferrosync_storage::{streams, versions, StreamRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio_postgres::Client;

#[derive(Deserialize)]
struct DiagnosticsRequest {
    #[serde(default)]
    sync_rules_content: bool,
}

pub(super) async fn diagnostics(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: AdminBody,
) -> Result<Json<Value>, ServiceError> {
    let req: DiagnosticsRequest = request(&state, &headers, &body)?;
    let admin = &state.admin;
    let Some(source) = &admin.source else {
        return Ok(data(json!({ "connections": [] })));
    };
    let client = connect_source(source).await;
    let mut errors = Vec::new();
    if let Err(e) = &client {
        errors.push(error_entry(Severity::Error, e.clone(), None));
    }
    let connection = json!({
        "id": source.id,
        "postgres_uri": uri_without_password(source),
        "connected": client.is_ok(),
        "errors": errors,
    });
    let storage = admin.storage().await?;
    let active = streams::active_stream(&*storage).await.map_err(super::storage_error)?;
    let deploying = versions::deploying(&*storage).await.map_err(super::storage_error)?;
    let source_client = client.as_ref().ok();
    let mut out = json!({ "connections": [connection] });
    if let Some(active) = &active {
        let live = live(source_client, active, state.probes.replication_error(active.id)).await;
        out["active_sync_rules"] = version_status(admin, active, req.sync_rules_content, live).await?;
    }
    if let Some(deploying) = &deploying {
        let live = live(source_client, deploying, state.probes.replication_error(deploying.id)).await;
        out["deploying_sync_rules"] = version_status(admin, deploying, req.sync_rules_content, live).await?;
    }
    Ok(data(out))
}

async fn live(source: Option<&Client>, stream: &StreamRecord, error: Option<String>) -> Live {
    let lag_bytes = match source {
        Some(client) => ferrosync_source::slot::slot_health(client, &stream.slot_name)
            .await
            .ok()
            .flatten()
            .and_then(|h| h.lag_bytes),
        None => None,
    };
    Live { lag_bytes, error }
}

/// `postgresql://user@host:port/database`: the connection without its password.
fn uri_without_password(source: &ferrosync_config::PostgresConnectionConfig) -> String {
    format!(
        "postgresql://{}@{}:{}/{}",
        source.username, source.hostname, source.port, source.database
    )
}
