//! `POST /api/admin/v1/validate` (`{sync_rules}`): a sync config's status before deploying it:
//! its errors and warnings with line and column, and, when the source answers, the tables it
//! reads as they are in the source and the problems the source checks find.

use super::status::{error_entry, rule_errors, table_info};
use super::{data, request, AdminBody, AdminState};
use crate::error::ServiceError;
use crate::server::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use ferrosync_inspect::catalog::read_catalog;
use ferrosync_inspect::source_checks::{connect_source, matching_tables};
use ferrosync_inspect::{check_source, Severity};
use ferrosync_rules::SyncRules;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio_postgres::Client;

#[derive(Deserialize)]
struct ValidateRequest {
    sync_rules: String,
}

pub(super) async fn validate(State(state): State<Arc<AppState>>, headers: HeaderMap, body: AdminBody) -> Result<Json<Value>, ServiceError> {
    let req: ValidateRequest = request(&state, &headers, &body)?;
    let admin = &state.admin;
    let (rules, mut errors) = rule_errors(admin, &req.sync_rules);
    let Some(source) = &admin.source else {
        errors.push(error_entry(Severity::Error, "No connection configured".into(), None));
        return Ok(data(json!({ "connections": [], "errors": errors })));
    };
    let mut tables = Vec::new();
    match (connect_source(source).await, &rules) {
        (Err(e), _) => errors.push(error_entry(
            Severity::Warning,
            format!("source: {e}; table and column checks skipped"),
            None,
        )),
        (Ok(_), None) => {}
        (Ok(client), Some(rules)) => {
            let default_schema = &admin.rules_options.default_schema;
            for issue in check_source(&client, &source.tag, rules, &req.sync_rules, default_schema).await {
                errors.push(error_entry(issue.severity, issue.message, None));
            }
            tables = source_tables(admin, &client, rules).await;
        }
    }
    Ok(data(json!({
        "connections": [{
            "id": source.id,
            "tag": source.tag,
            "slot_name": "",
            "initial_replication_done": false,
            "tables": tables,
        }],
        "errors": errors,
    })))
}

/// The source tables the sync config reads, as `TableInfo` entries (primary key columns as
/// `replication_id`).
async fn source_tables(admin: &AdminState, client: &Client, rules: &SyncRules) -> Vec<Value> {
    let Some(source) = &admin.source else { return Vec::new() };
    let Ok(catalog) = read_catalog(client).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for pattern in rules.source_patterns().iter().filter(|p| p.connection_tag() == source.tag) {
        let wildcard = pattern.is_wildcard().then(|| format!("{}%", pattern.name_or_prefix()));
        for (schema, name) in matching_tables(pattern, &catalog) {
            let key = primary_key(client, schema, name).await;
            out.push(table_info(Some(rules), &source.tag, schema, name, &key, wildcard.clone()));
        }
    }
    out
}

async fn primary_key(client: &Client, schema: &str, name: &str) -> Vec<String> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indisprimary AND i.indrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass
             ORDER BY array_position(i.indkey, a.attnum)",
            &[&schema, &name],
        )
        .await;
    rows.map(|rows| rows.iter().map(|r| r.get(0)).collect()).unwrap_or_default()
}
