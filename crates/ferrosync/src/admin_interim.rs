//! Interim admin routes the dashboard reads, until the admin API lands:
//! `POST /api/admin/v1/inspect` ("what would this token sync", over `explain`'s resolution) and
//! `GET /api/admin/v1/storage-stats` (largest buckets, one `op_chunks` query).
//!
//! Replaced wholesale at merge by the admin API's routes of the same names and shapes; nothing
//! else depends on this module.

use crate::explain::{self, Served};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrosync_api::dashboard::admin_token;
use ferrosync_api::error::ServiceError;
use ferrosync_api::AppState;
use ferrosync_pgconn::{LazyClient, PgEndpoint};
use ferrosync_rules::{RequestParameters, StreamsRequest};
use ferrosync_storage::SyncStorage;
use ferrosync_sync::hub::HubState;
use serde_json::{json, Value};
use std::sync::Arc;

/// Buckets listed by storage-stats.
const LARGEST_BUCKETS: i64 = 20;

/// Ops and stored (compressed) bytes per bucket of one sync config, largest first.
const LARGEST_BUCKETS_SQL: &str = "SELECT bucket, sum(op_count)::bigint AS ops, sum(pg_column_size(ops))::bigint AS bytes
    FROM ferrosync.op_chunks WHERE group_id = $1 GROUP BY bucket ORDER BY bytes DESC, bucket LIMIT $2";

struct Interim {
    app: Arc<AppState>,
    tokens: Vec<String>,
    storage: LazyClient,
}

pub fn router(app: Arc<AppState>, tokens: Vec<String>, storage: PgEndpoint) -> Router {
    let state = Arc::new(Interim {
        app,
        tokens,
        storage: LazyClient::new(storage, None),
    });
    Router::new()
        .route("/api/admin/v1/inspect", post(inspect))
        .route("/api/admin/v1/storage-stats", get(storage_stats))
        .with_state(state)
}

/// `{"token": "<jwt>"}` or `{"claims": {...}}`, and optionally `"parameters": {...}` (the
/// client's connection parameters).
struct InspectRequest {
    token: Option<String>,
    claims: Option<Value>,
    parameters: Option<Value>,
}

impl InspectRequest {
    fn parse(body: &[u8]) -> Result<InspectRequest, ServiceError> {
        let invalid = |what: String| ServiceError::validation(what);
        let Value::Object(mut fields) = serde_json::from_slice(body).map_err(|e| invalid(format!("not JSON: {e}")))? else {
            return Err(invalid("the body must be a JSON object".into()));
        };
        let token = match fields.remove("token") {
            None => None,
            Some(Value::String(t)) => Some(t),
            Some(_) => return Err(invalid("token must be a string".into())),
        };
        let (claims, parameters) = (fields.remove("claims"), fields.remove("parameters"));
        if let Some(key) = fields.keys().next() {
            return Err(invalid(format!("unknown key {key:?}")));
        }
        if parameters.as_ref().is_some_and(|p| !p.is_object()) {
            return Err(invalid("parameters must be a JSON object".into()));
        }
        Ok(InspectRequest { token, claims, parameters })
    }
}

async fn inspect(State(s): State<Arc<Interim>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = admin_token::authorize(&s.tokens, &headers) {
        return e.into_response();
    }
    match resolve(&s.app, &body).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn storage_stats(State(s): State<Arc<Interim>>, headers: HeaderMap) -> Response {
    if let Err(e) = admin_token::authorize(&s.tokens, &headers) {
        return e.into_response();
    }
    match largest_buckets(&s).await {
        Ok(buckets) => Json(json!({ "largest_buckets": buckets })).into_response(),
        Err(e) => e.into_response(),
    }
}

fn active(app: &AppState) -> Result<HubState, ServiceError> {
    app.hub.subscribe().borrow().clone().ok_or_else(|| {
        ServiceError::new(
            "PSYNC_S2001",
            503,
            "No active sync config yet (the initial snapshot is still running)",
        )
    })
}

async fn largest_buckets(s: &Interim) -> Result<Vec<Value>, ServiceError> {
    let hub = active(&s.app)?;
    let unavailable = |e: &dyn std::fmt::Display| ServiceError::new("PSYNC_S2003", 503, format!("bucket storage: {e}"));
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

/// The buckets a request with these claims would sync at the served checkpoint, with counts.
async fn resolve(app: &AppState, body: &[u8]) -> Result<Value, ServiceError> {
    let request = InspectRequest::parse(body)?;
    let (payload, verified) = claims(app, &request).await?;
    let hub = active(app)?;
    let storage = app.hub.storage().clone();
    let stream = storage
        .active_stream()
        .await
        .map_err(|e| ServiceError::new("PSYNC_S2003", 503, format!("bucket storage: {e}")))?
        .ok_or_else(|| ServiceError::new("PSYNC_S2001", 503, "No active sync config yet"))?;
    let served = Served { storage, stream };
    let streams = StreamsRequest::default();
    let user_id = payload.get("sub").cloned();
    let querier = hub.rules.querier(&RequestParameters::new(payload, request.parameters), &streams);
    let failed = |e: anyhow::Error| ServiceError::internal(format!("{e:#}"));
    let lookups = explain::resolve_lookups(&querier, &served).await.map_err(failed)?;
    let buckets = querier.resolve(&lookups);
    let counts = explain::counts(&served, &buckets).await.map_err(failed)?;
    let (mut total_ops, mut total_rows) = (0, 0);
    let listed: Vec<Value> = buckets
        .iter()
        .map(|b| {
            let reasons: Vec<String> = b.reasons.iter().map(|r| explain::reason_text(&querier, &streams, r)).collect();
            let (ops, rows) = counts.get(&b.bucket).map_or((0, 0), |c| (c.ops, c.rows));
            total_ops += ops;
            total_rows += rows;
            json!({"bucket": b.bucket, "definition": hub.rules.definition_of(&b.bucket), "priority": b.priority, "reason": reasons.join(", "), "ops": ops, "rows": rows})
        })
        .collect();
    let mut errors: Vec<String> = querier.errors().to_vec();
    errors.extend(
        querier
            .streams()
            .iter()
            .flat_map(|s| s.errors.iter().map(move |e| format!("{}: {}", s.name, e.message))),
    );
    Ok(json!({
        "verified": verified,
        "user_id": user_id,
        "checkpoint": {"sync_config": served.stream.id, "op_id": served.stream.checkpoint.op_id},
        "buckets": listed,
        "totals": {"buckets": buckets.len(), "ops": total_ops, "rows": total_rows},
        "errors": errors,
    }))
}

/// The JWT payload, and whether it was verified (a token) or taken as given (claims).
async fn claims(app: &AppState, request: &InspectRequest) -> Result<(Value, bool), ServiceError> {
    match (&request.token, &request.claims) {
        (Some(token), None) => {
            let header = explain::authorization_header(token.trim());
            // 400, not 401: the inspected token is refused, not the admin's.
            let ctx = app
                .keys
                .verify_authorization(Some(&header))
                .await
                .map_err(|e| ServiceError::new(e.code, 400, format!("The token is not accepted: {}", e.description)))?;
            Ok((ctx.payload, true))
        }
        (None, Some(claims)) if claims.is_object() => Ok((claims.clone(), false)),
        (None, Some(_)) => Err(ServiceError::validation("claims must be a JSON object")),
        _ => Err(ServiceError::validation("give exactly one of token and claims")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> String {
        match InspectRequest::parse(body.as_bytes()) {
            Ok(_) => panic!("{body} accepted"),
            Err(e) => format!("{} {}", e.code, e.details.unwrap_or_default()),
        }
    }

    #[test]
    fn inspect_bodies_are_checked() {
        let request = InspectRequest::parse(br#"{"token": "a.b.c", "parameters": {"x": 1}}"#).expect("valid");
        assert_eq!(request.token.as_deref(), Some("a.b.c"));
        assert_eq!(request.parameters, Some(json!({"x": 1})));
        let request = InspectRequest::parse(br#"{"claims": {"sub": "u1"}}"#).expect("valid");
        assert_eq!(request.claims, Some(json!({"sub": "u1"})));
        assert_eq!(refused("[1]"), "PSYNC_S2001 the body must be a JSON object");
        assert_eq!(refused("{"), "PSYNC_S2001 not JSON: EOF while parsing an object at line 1 column 1");
        assert_eq!(refused(r#"{"token": 1}"#), "PSYNC_S2001 token must be a string");
        assert_eq!(refused(r#"{"claims": {}, "user": "u1"}"#), "PSYNC_S2001 unknown key \"user\"");
        assert_eq!(
            refused(r#"{"claims": {}, "parameters": []}"#),
            "PSYNC_S2001 parameters must be a JSON object"
        );
    }
}
