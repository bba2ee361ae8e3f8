//! The reference's `SyncRulesStatus`: a sync config's errors and warnings, and per source
//! connection its slot, replication progress and tables. Shared by diagnostics and validate.

use super::{now_iso, AdminState};
use crate::error::ServiceError;
use ferrosync_inspect::Severity;
use ferrosync_rules::{RuleIssue, SourceTableName, SyncRules};
use ferrosync_storage::{versions, StreamRecord};
use serde_json::{json, Map, Value};

/// One `errors[]` entry: `{level: fatal|warning, message, ts}`, plus `location` (line and
/// column in the sync config) when known.
pub(super) fn error_entry(severity: Severity, message: String, issue: Option<&RuleIssue>) -> Value {
    let level = match severity {
        Severity::Error => "fatal",
        Severity::Warning => "warning",
    };
    let mut entry = json!({ "level": level, "message": message, "ts": now_iso() });
    if let Some(location) = issue.and_then(|i| i.location) {
        entry["location"] = json!({ "line": location.line, "column": location.column });
    }
    entry
}

/// Parses `content`: the rules if they parse, and every error and warning as `errors[]` entries.
pub(super) fn rule_errors(admin: &AdminState, content: &str) -> (Option<SyncRules>, Vec<Value>) {
    let (rules, issues) = ferrosync_inspect::rule_issues(content, &admin.rules_options);
    let entries = issues
        .iter()
        .map(|(issue, severity)| error_entry(*severity, ferrosync_inspect::source_checks::one_line(issue), Some(issue)))
        .collect();
    (rules, entries)
}

/// A `tables[]` entry (`TableInfo`).
pub(super) fn table_info(
    rules: Option<&SyncRules>,
    tag: &str,
    schema: &str,
    name: &str,
    replication_id: &[String],
    pattern: Option<String>,
) -> Value {
    let table = SourceTableName {
        connection_tag: tag.to_string(),
        schema: schema.to_string(),
        name: name.to_string(),
    };
    let (data, parameters) = rules.map_or((false, false), |r| r.table_roles(&table));
    let mut info = json!({
        "schema": schema,
        "name": name,
        "replication_id": replication_id,
        "data_queries": data,
        "parameter_queries": parameters,
        "errors": [],
    });
    if let Some(p) = pattern {
        info["pattern"] = Value::String(p);
    }
    info
}

/// What is known live about a version's replication.
pub(super) struct Live {
    /// Bytes of WAL the slot has not confirmed (`None`: unknown).
    pub lag_bytes: Option<i64>,
    /// Why replication of this version is failing, if it is.
    pub error: Option<String>,
}

/// The status of a stored version.
pub(super) async fn version_status(
    admin: &AdminState,
    stream: &StreamRecord,
    include_content: bool,
    live: Live,
) -> Result<Value, ServiceError> {
    let (rules, mut errors) = rule_errors(admin, &stream.content);
    if let Some(e) = live.error {
        errors.push(error_entry(Severity::Error, e, None));
    }
    let storage = admin.storage().await?;
    let stored = versions::tables(&storage, stream.id).await.map_err(super::storage_error)?;
    let (id, tag) = match &admin.source {
        Some(s) => (s.id.as_str(), s.tag.as_str()),
        None => ("default", "default"),
    };
    let tables: Vec<Value> = stored
        .iter()
        .map(|t| table_info(rules.as_ref(), tag, &t.schema, &t.name, &t.key_columns, None))
        .collect();
    let mut connection = Map::new();
    connection.insert("id".into(), id.into());
    connection.insert("tag".into(), tag.into());
    connection.insert("slot_name".into(), stream.slot_name.clone().into());
    connection.insert("initial_replication_done".into(), stream.snapshot_done.into());
    if stream.checkpoint.lsn > 0 {
        connection.insert(
            "last_lsn".into(),
            ferrosync_storage::writer::lsn_to_text(stream.checkpoint.lsn).into(),
        );
    }
    if let Some(lag) = live.lag_bytes {
        connection.insert("replication_lag_bytes".into(), lag.max(0).into());
    }
    connection.insert("tables".into(), tables.into());
    let mut status = Map::new();
    if include_content {
        status.insert("content".into(), stream.content.clone().into());
    }
    status.insert("connections".into(), vec![Value::Object(connection)].into());
    status.insert("errors".into(), errors.into());
    // ferrosync's own: which version and in what state.
    status.insert("id".into(), stream.id.into());
    status.insert("state".into(), stream.state.as_str().into());
    Ok(Value::Object(status))
}
