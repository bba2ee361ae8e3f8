//! `POST /api/admin/v1/schema`: the source's schemas, tables and columns in the reference's
//! `InstanceSchema` shape (each column with its SQLite type as synced and its Postgres type).

use super::{data, request, AdminBody};
use crate::error::ServiceError;
use crate::server::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use ferrosync_inspect::catalog::{read_catalog, sqlite_type};
use ferrosync_inspect::source_checks::connect_source;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Deserialize)]
struct SchemaRequest {}

pub(super) async fn schema(State(state): State<Arc<AppState>>, headers: HeaderMap, body: AdminBody) -> Result<Json<Value>, ServiceError> {
    let _: SchemaRequest = request(&state, &headers, &body)?;
    let admin = &state.admin;
    let default_schema = admin.rules_options.default_schema.clone();
    let Some(source) = &admin.source else {
        return Ok(data(
            json!({ "connections": [], "defaultConnectionTag": "default", "defaultSchema": default_schema }),
        ));
    };
    let client = connect_source(source)
        .await
        .map_err(|e| ServiceError::new("PSYNC_S2001", 503, format!("the source database is unavailable: {e}")))?;
    let catalog = read_catalog(&client)
        .await
        .map_err(|e| ServiceError::internal(format!("reading the source catalog failed: {e}")))?;
    let mut schemas: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for ((schema, table), columns) in &catalog {
        let columns: Vec<Value> = columns
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "sqlite_type": sqlite_type(c),
                    "internal_type": c.type_name,
                    "type": c.type_name,
                    "pg_type": c.type_name,
                })
            })
            .collect();
        schemas
            .entry(schema)
            .or_default()
            .push(json!({ "name": table, "columns": columns }));
    }
    let schemas: Vec<Value> = schemas
        .into_iter()
        .map(|(name, tables)| json!({ "name": name, "tables": tables }))
        .collect();
    Ok(data(json!({
        "connections": [{ "id": source.id, "tag": source.tag, "schemas": schemas }],
        "defaultConnectionTag": source.tag,
        "defaultSchema": default_schema,
    })))
}
