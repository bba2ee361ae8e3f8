//! `/api/sync-rules/v1/*`: deploy a sync config (`application/yaml` body, or JSON
//! `{content}`), validate one, and show the current and next versions.

use super::status::rule_errors;
use super::{data, request, AdminBody, AdminState};
use crate::error::ServiceError;
use crate::server::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrosync_inspect::source_checks::one_line;
use ferrosync_rules::SyncRules;
use ferrosync_storage::{streams, versions, StreamRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
struct ContentRequest {
    content: String,
}

/// The sync config of a request: the body itself when it is YAML, else JSON `{content}`.
fn content_of(state: &AppState, headers: &HeaderMap, body: &AdminBody) -> Result<String, ServiceError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let is_yaml = ["application/yaml", "application/x-yaml", "text/yaml"]
        .iter()
        .any(|t| content_type.starts_with(t));
    if !is_yaml {
        return request::<ContentRequest>(state, headers, body).map(|r| r.content);
    }
    let content = std::str::from_utf8(&body.0).map_err(|_| ServiceError::validation("the YAML body is not UTF-8"))?;
    state.admin.tokens.authorize(headers)?;
    Ok(content.to_string())
}

/// `{slot_name}` of the new version; 422 `PSYNC_R0001` with every error (line and column)
/// when the content does not parse; 422 `PSYNC_S4105` when the config file has a sync config.
pub(super) async fn deploy(State(state): State<Arc<AppState>>, headers: HeaderMap, body: AdminBody) -> Result<Json<Value>, ServiceError> {
    let content = content_of(&state, &headers, &body)?;
    let admin = &state.admin;
    if admin.config_has_rules {
        return Err(ServiceError::new("PSYNC_S4105", 422, "Sync rules API disabled")
            .with_details("the config file has a sync config (sync_config / sync_rules), which wins on every start: change it there"));
    }
    if let Err(e) = SyncRules::parse(&content, &admin.rules_options) {
        let details: Vec<String> = e.errors.iter().map(one_line).collect();
        return Err(ServiceError::new("PSYNC_R0001", 422, "Sync rules parsing failed").with_details(details.join("\n")));
    }
    let mut storage = admin.dedicated_storage().await?;
    // A change of definitions only is built in place on the served stream, as on a start.
    let in_place = ferrosync_storage::incremental::deploy_in_place(&storage, &content, &admin.rules_options)
        .await
        .map_err(super::storage_error)?;
    let stream = match in_place {
        Some(stream) => stream,
        None => ferrosync_storage::streams::stream_for_content(&mut storage, &content, admin.slot_prefix())
            .await
            .map_err(super::storage_error)?,
    };
    tracing::info!(stream = stream.id, slot = %stream.slot_name, "admin API: sync config deployed");
    Ok(data(json!({ "slot_name": stream.slot_name })))
}

/// `{valid: true, bucket_definitions, source_tables}` or `{valid: false, errors}` (unwrapped,
/// pretty, as the reference answers).
pub(super) async fn validate(State(state): State<Arc<AppState>>, headers: HeaderMap, body: AdminBody) -> Result<Response, ServiceError> {
    let content = content_of(&state, &headers, &body)?;
    Ok(pretty(debug_info(&state.admin, &content)))
}

/// `{data: {current: {slot_name, content, ...validation}, next: null | {...}}}`.
pub(super) async fn current(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ServiceError> {
    state.admin.tokens.authorize(&headers)?;
    let admin = &state.admin;
    let storage = admin.storage().await?;
    let active = streams::active_stream(&*storage).await.map_err(super::storage_error)?;
    let Some(active) = active else {
        return Err(ServiceError::new("PSYNC_S4104", 422, "No active sync rules"));
    };
    let next = versions::deploying(&*storage).await.map_err(super::storage_error)?;
    Ok(pretty(json!({
        "data": {
            "current": version(admin, &active),
            "next": next.as_ref().map(|n| version(admin, n)),
        }
    })))
}

fn version(admin: &AdminState, stream: &StreamRecord) -> Value {
    let mut info = json!({ "slot_name": stream.slot_name, "content": stream.content });
    if let (Some(obj), Value::Object(debug)) = (info.as_object_mut(), debug_info(admin, &stream.content)) {
        obj.extend(debug);
    }
    info
}

/// What the reference's `debugSyncRules` reports, from the parsed config alone.
fn debug_info(admin: &AdminState, content: &str) -> Value {
    let (rules, errors) = rule_errors(admin, content);
    let Some(rules) = rules else {
        // Strings, as the reference's; each starts with its line and column.
        let errors: Vec<&Value> = errors.iter().filter(|e| e["level"] == "fatal").map(|e| &e["message"]).collect();
        return json!({ "valid": false, "errors": errors });
    };
    let definitions: Vec<Value> = rules
        .bucket_sources()
        .iter()
        .map(|s| json!({ "name": s.name, "priority": s.priority }))
        .collect();
    let tables: Vec<Value> = rules
        .source_patterns()
        .iter()
        .map(|p| {
            json!({
                "connection_tag": p.connection_tag(),
                "schema": p.schema(),
                "pattern": p.name_or_prefix(),
                "wildcard": p.is_wildcard(),
            })
        })
        .collect();
    json!({ "valid": true, "bucket_definitions": definitions, "source_tables": tables, "warnings": errors })
}

fn pretty(value: Value) -> Response {
    let text = serde_json::to_string_pretty(&value).unwrap_or_default() + "\n";
    let mut response = (StatusCode::OK, text).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
