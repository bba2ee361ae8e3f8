//! `POST /api/admin/v1/inspect`: what a token would sync. Body: `token` (a JWT, verified with
//! `client_auth`) or `claims` (a JWT payload, taken as given), and optionally `parameters`
//! (client parameters) and `streams` (the sync request's `streams` object). Answers each
//! bucket with its priority, definition, why it is synced, the parameter rows that led to it,
//! and its op and live-row counts at the served checkpoint.

use super::{data, request, AdminBody};
use crate::error::ServiceError;
use crate::server::AppState;
use crate::stream::StreamsBody;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use ferrosync_inspect::Served;
use ferrosync_rules::{RequestParameters, StreamsRequest};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Deserialize)]
struct InspectRequest {
    token: Option<String>,
    claims: Option<Map<String, Value>>,
    parameters: Option<Map<String, Value>>,
    streams: Option<StreamsBody>,
}

pub(super) async fn inspect(State(state): State<Arc<AppState>>, headers: HeaderMap, body: AdminBody) -> Result<Json<Value>, ServiceError> {
    let req: InspectRequest = request(&state, &headers, &body)?;
    let (claims, verified) = match (req.token, req.claims) {
        (Some(token), None) => {
            // The admin is authorized; a token the service would refuse is a bad request here,
            // with the code a client would have got.
            let ctx = state
                .keys
                .verify_authorization(Some(&format!("Token {}", token.trim())))
                .await
                .map_err(|e| ServiceError::new(e.code, 400, format!("the token is not accepted: {}", e.description)))?;
            (ctx.payload, true)
        }
        (None, Some(claims)) => (Value::Object(claims), false),
        _ => return Err(ServiceError::validation("give exactly one of `token` and `claims`")),
    };
    let streams = match req.streams {
        Some(body) => body.into_request().map_err(|e| ServiceError::validation(format!("streams: {e}")))?,
        None => StreamsRequest::default(),
    };
    let Some(served) = state.hub.subscribe().borrow().clone() else {
        return Err(ServiceError::new(
            "PSYNC_S2302",
            422,
            "No active sync config: nothing is served yet",
        ));
    };
    let at = Served {
        storage: state.hub.storage().as_ref(),
        stream_id: served.group,
        checkpoint: served.checkpoint.op_id,
    };
    let user_id = claims.get("sub").cloned().unwrap_or(Value::Null);
    let request = RequestParameters::new(claims.clone(), req.parameters.map(Value::Object));
    let explanation = ferrosync_inspect::explain(&served.rules, Some(&at), &request, &streams)
        .await
        .map_err(|e| ServiceError::new("PSYNC_S2401", 503, format!("reading bucket storage failed: {e}")))?;
    let mut out = serde_json::to_value(&explanation).map_err(|e| ServiceError::internal(e.to_string()))?;
    if let Some(obj) = out.as_object_mut() {
        obj.insert("user_id".into(), user_id);
        obj.insert("claims".into(), claims);
        obj.insert("claims_verified".into(), verified.into());
        obj.insert("sync_rules_id".into(), served.group.into());
        obj.insert("checkpoint".into(), served.checkpoint.op_id.to_string().into());
    }
    Ok(data(json!(out)))
}
