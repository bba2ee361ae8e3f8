//! `POST /api/admin/v1/execute-sql` (`{sql: {query, args}}`): one statement against the source,
//! only when the source connection has `debug_api: true` (else the reference's answer, "SQL
//! querying is not enabled"). It runs on a connection of its own in a read-only transaction
//! with a statement timeout, and at most [`MAX_ROWS`] rows are returned.
//!
//! Values come back as the reference returns them: booleans and numbers as JSON, everything
//! else as Postgres prints it. To read every type as text the statement is run with `PREPARE`
//! / `EXECUTE` over the simple protocol, its arguments as quoted literals; it is prepared over
//! the extended protocol first, which refuses more than one statement and tells the types.

use super::{data, request, AdminBody};
use crate::error::ServiceError;
use crate::server::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use ferrosync_inspect::source_checks::connect_source;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};

/// Rows returned at most; the rest are not read.
pub const MAX_ROWS: usize = 1000;
/// The statement's time limit (Postgres `statement_timeout`).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole request's, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// `connection_id` is accepted and ignored (there is one connection), like any unknown key.
#[derive(Deserialize)]
struct ExecuteSqlRequest {
    sql: Sql,
}

#[derive(Deserialize)]
struct Sql {
    query: String,
    #[serde(default)]
    args: Vec<Value>,
}

pub(super) async fn execute_sql(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: AdminBody,
) -> Result<Json<Value>, ServiceError> {
    let req: ExecuteSqlRequest = request(&state, &headers, &body)?;
    let Some(source) = state.admin.source.as_ref().filter(|s| s.debug_api) else {
        return Ok(failed("SQL querying is not enabled"));
    };
    let args = req
        .sql
        .args
        .iter()
        .map(literal)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ServiceError::validation)?;
    let run = async {
        let client = connect_source(source).await?;
        run(&client, &req.sql.query, &args).await
    };
    let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, run).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
    };
    Ok(match outcome {
        Ok((columns, rows)) => data(json!({ "success": true, "results": { "columns": columns, "rows": rows } })),
        Err(e) => failed(&e),
    })
}

fn failed(error: &str) -> Json<Value> {
    data(json!({ "success": false, "results": { "columns": [], "rows": [] }, "error": error }))
}

/// An argument as an SQL literal (strings as escape strings, so any backslash is literal).
fn literal(arg: &Value) -> Result<String, String> {
    match arg {
        Value::String(s) => Ok(format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok("NULL".into()),
        other => Err(format!("sql.args: {other} is not a string, number or boolean")),
    }
}

type Results = (Vec<String>, Vec<Vec<Value>>);

async fn run(client: &Client, query: &str, args: &[String]) -> Result<Results, String> {
    let e = |e: tokio_postgres::Error| e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
    client
        .batch_execute(&format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {}",
            STATEMENT_TIMEOUT.as_millis()
        ))
        .await
        .map_err(e)?;
    let statement = client.prepare(query).await.map_err(e)?;
    if statement.params().len() != args.len() {
        return Err(format!(
            "the query has {} parameter(s) but {} argument(s) were given",
            statement.params().len(),
            args.len()
        ));
    }
    let types: Vec<String> = statement.params().iter().map(type_name).collect();
    let signature = match types.is_empty() {
        true => String::new(),
        false => format!("({})", types.join(", ")),
    };
    client
        .batch_execute(&format!("PREPARE ferrosync_admin_sql {signature} AS {query}"))
        .await
        .map_err(e)?;
    let execute = match args.is_empty() {
        true => "EXECUTE ferrosync_admin_sql".to_string(),
        false => format!("EXECUTE ferrosync_admin_sql({})", args.join(", ")),
    };
    let columns: Vec<(String, Type)> = statement
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.type_().clone()))
        .collect();
    let mut stream = Box::pin(client.simple_query_raw(&execute).await.map_err(e)?);
    let mut rows = Vec::new();
    while rows.len() < MAX_ROWS {
        match stream.next().await {
            Some(Ok(SimpleQueryMessage::Row(row))) => {
                rows.push((0..columns.len()).map(|i| value(row.get(i), &columns[i].1)).collect());
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(e(err)),
            None => break,
        }
    }
    Ok((columns.into_iter().map(|(name, _)| name).collect(), rows))
}

/// A parameter type as `PREPARE` takes it (schema-qualified outside `pg_catalog`).
fn type_name(t: &Type) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    match t.schema() {
        "pg_catalog" => quote(t.name()),
        schema => format!("{}.{}", quote(schema), quote(t.name())),
    }
}

/// A value as Postgres printed it, as JSON: booleans and numbers typed, the rest text.
fn value(text: Option<&str>, t: &Type) -> Value {
    let Some(text) = text else { return Value::Null };
    match *t {
        Type::BOOL => Value::Bool(text == "t"),
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => text.parse::<i64>().map_or_else(|_| text.into(), Value::from),
        Type::FLOAT4 | Type::FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| text.into(), Value::Number),
        _ => text.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_values() {
        assert_eq!(literal(&json!("it's \\n")).ok().as_deref(), Some("E'it''s \\\\n'"));
        assert_eq!(literal(&json!(1.5)).ok().as_deref(), Some("1.5"));
        assert_eq!(literal(&json!(true)).ok().as_deref(), Some("true"));
        assert!(literal(&json!([1])).is_err());
        assert_eq!(value(Some("t"), &Type::BOOL), json!(true));
        assert_eq!(value(Some("42"), &Type::INT8), json!(42));
        assert_eq!(value(Some("NaN"), &Type::FLOAT8), json!("NaN"));
        assert_eq!(value(Some("1.10"), &Type::NUMERIC), json!("1.10"));
        assert_eq!(value(None, &Type::TEXT), Value::Null);
    }
}
