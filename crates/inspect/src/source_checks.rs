//! Problems of a sync config: its own errors and warnings (with line and column), and checks
//! against the source database: the setup replication needs, the tables it reads (a wildcard
//! matches something, each is published), the columns simple queries name, and column types
//! ferrosync drops or converts. Missing tables and columns are warnings, as in the reference:
//! the service runs and syncs them once they exist.

use crate::catalog::{read_catalog, Catalog, Column};
use crate::columns::{table_uses, TableUse};
use ferrosync_config::PostgresConnectionConfig;
use ferrosync_pgconn::PgEndpoint;
use ferrosync_rules::{RuleIssue, SyncRules, SyncRulesOptions, TablePattern};
use serde_yaml_ng::Value;
use std::collections::HashSet;
use std::time::Duration;
use tokio_postgres::Client;

/// A source that does not answer within this is reported as unreachable.
pub const SOURCE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in the source checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub message: String,
}

impl Issue {
    fn error(message: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Error,
            message: message.into(),
        }
    }

    fn warning(message: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Warning,
            message: message.into(),
        }
    }
}

/// Parses a sync config: the rules if they parse, and all errors and warnings (unlocated
/// issues, about the whole file, first; then by position).
pub fn rule_issues(content: &str, options: &SyncRulesOptions) -> (Option<SyncRules>, Vec<(RuleIssue, Severity)>) {
    let (rules, mut issues) = match SyncRules::parse(content, options) {
        Ok(rules) => {
            let warnings = rules.warnings().iter().map(|w| (w.clone(), Severity::Warning)).collect();
            (Some(rules), warnings)
        }
        Err(e) => {
            let errors = e.errors.into_iter().map(|i| (i, Severity::Error));
            let warnings = e.warnings.into_iter().map(|i| (i, Severity::Warning));
            (None, errors.chain(warnings).collect::<Vec<_>>())
        }
    };
    issues.sort_by_key(|(i, _)| i.location);
    (rules, issues)
}

/// An issue as its `Display` renders it, with a multi-line query folded onto one line.
pub fn one_line(issue: &RuleIssue) -> String {
    let mut issue = issue.clone();
    issue.query = issue.query.map(|q| q.split_whitespace().collect::<Vec<_>>().join(" "));
    issue.to_string()
}

/// A connection to the source, or why there is none within [`SOURCE_TIMEOUT`].
pub async fn connect_source(source: &PostgresConnectionConfig) -> Result<Client, String> {
    let endpoint = PgEndpoint::from_config(source).map_err(|e| e.to_string())?;
    match tokio::time::timeout(SOURCE_TIMEOUT, endpoint.connect()).await {
        Ok(client) => client.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the source database ({}) did not answer within {} s",
            endpoint.label(),
            SOURCE_TIMEOUT.as_secs()
        )),
    }
}

/// Checks of `rules` (parsed from `content`) against the source reached by `client`.
pub async fn check_source(client: &Client, source_tag: &str, rules: &SyncRules, content: &str, default_schema: &str) -> Vec<Issue> {
    let mut issues = Vec::new();
    if let Err(e) = ferrosync_source::setup::check_source(client).await {
        issues.push(Issue::error(format!("source: {e}")));
    }
    let catalog = match read_catalog(client).await {
        Ok(c) => c,
        Err(e) => {
            issues.push(Issue::warning(format!(
                "source: cannot read the catalog ({e}); table and column checks skipped"
            )));
            return issues;
        }
    };
    let published: HashSet<(String, String)> = match ferrosync_source::setup::published_tables(client, source_tag).await {
        Ok(tables) => tables.into_iter().map(|(_, t, _)| (t.schema, t.name)).collect(),
        Err(_) => HashSet::new(),
    };
    let custom_types = rules.compatibility().custom_postgres_types;
    for pattern in rules.source_patterns().iter().filter(|p| p.connection_tag() == source_tag) {
        check_pattern(pattern, &catalog, &published, &mut issues);
    }
    let (queries, ctes) = queries_of(content);
    let mut seen = HashSet::new();
    for (definition, sql) in &queries {
        for use_ in table_uses(sql) {
            if ctes.contains(&use_.table) || use_.table.contains('%') {
                continue;
            }
            let schema = use_.schema.clone().unwrap_or_else(|| default_schema.to_string());
            let Some(columns) = catalog.get(&(schema.clone(), use_.table.clone())) else {
                continue; // Reported by the table check.
            };
            let table = format!("{schema}.{}", use_.table);
            check_columns(definition, &table, &use_, columns, custom_types, &mut seen, &mut issues);
        }
    }
    issues
}

/// The catalog tables a pattern matches.
pub fn matching_tables<'a>(pattern: &TablePattern, catalog: &'a Catalog) -> Vec<&'a (String, String)> {
    let schema = pattern.schema();
    catalog
        .keys()
        .filter(|(s, t)| {
            let schema_ok = match schema.strip_suffix('%') {
                Some(prefix) => s.starts_with(prefix),
                None => s == schema,
            };
            let table_ok = match pattern.is_wildcard() {
                true => t.starts_with(pattern.name_or_prefix()),
                false => t == pattern.name_or_prefix(),
            };
            schema_ok && table_ok
        })
        .collect()
}

/// A table referenced by the sync config exists (a wildcard matches something) and is published.
fn check_pattern(pattern: &TablePattern, catalog: &Catalog, published: &HashSet<(String, String)>, issues: &mut Vec<Issue>) {
    let matches = matching_tables(pattern, catalog);
    let name = format!(
        "{}.{}{}",
        pattern.schema(),
        pattern.name_or_prefix(),
        if pattern.is_wildcard() { "%" } else { "" }
    );
    // Warnings, as the reference's validator reports them ("Table s.t not found").
    if matches.is_empty() {
        issues.push(Issue::warning(match pattern.is_wildcard() {
            true => format!("source: no table matches {name}, which the sync config reads"),
            false => format!("source: Table {name} not found, but the sync config reads it"),
        }));
        return;
    }
    if published.is_empty() {
        return; // No publication at all: reported by the setup check.
    }
    for (s, t) in matches.into_iter().filter(|k| !published.contains(*k)) {
        issues.push(Issue::warning(format!(
            "source: table {s}.{t} is not in the 'powersync' publication: its rows are never replicated (ALTER PUBLICATION powersync ADD TABLE {s}.{t})"
        )));
    }
}

/// Columns a query names exist; output columns have types ferrosync syncs as they are.
fn check_columns(
    definition: &str,
    table: &str,
    use_: &TableUse,
    columns: &[Column],
    custom_types: bool,
    seen: &mut HashSet<String>,
    issues: &mut Vec<Issue>,
) {
    for c in &use_.columns {
        // `_table_suffix` is provided for wildcard tables; `id` is checked like any other.
        if c != "_table_suffix" && !columns.iter().any(|col| &col.name == c) && seen.insert(format!("missing {table}.{c}")) {
            issues.push(Issue::warning(format!(
                "source: {definition}: Column not found: {c} (table {table})"
            )));
        }
    }
    for col in columns.iter().filter(|col| use_.wildcard || use_.outputs.contains(&col.name)) {
        let Some(why) = type_problem(col, custom_types) else { continue };
        if seen.insert(format!("type {table}.{}", col.name)) {
            issues.push(Issue::warning(format!("source: {table}.{} ({}): {why}", col.name, col.type_name)));
        }
    }
}

/// Why a column's values do not reach clients as they are in Postgres, if they do not.
fn type_problem(col: &Column, custom_types: bool) -> Option<&'static str> {
    use ferrosync_source::types::{array_element, BYTEA};
    if col.oid == BYTEA || array_element(col.oid) == Some(BYTEA) {
        return Some("binary values are dropped from synced rows; select hex(col) or base64(col) to sync them");
    }
    if col.is_array && array_element(col.oid).is_none() {
        return Some(
            "synced as Postgres array text ('{a,b}'), not as a JSON array: ferrosync decodes arrays of built-in scalar types only",
        );
    }
    if custom_types && matches!(col.kind, 'd' | 'c' | 'r' | 'm') {
        return Some("synced as Postgres text: ferrosync does not implement custom_postgres_types (domains as their base type, composites as JSON objects, ranges as JSON)");
    }
    None
}

/// The SQL of every data, parameter and stream query, with its definition name, and the
/// names of all CTEs (they are not source tables). Read from the YAML again: the parsed rules
/// keep no query text.
fn queries_of(content: &str) -> (Vec<(String, String)>, HashSet<String>) {
    let mut queries = Vec::new();
    let mut ctes = HashSet::new();
    let Ok(Value::Mapping(root)) = serde_yaml_ng::from_str::<Value>(content) else {
        return (queries, ctes);
    };
    let strings = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Sequence(items)) => items.iter().filter_map(|i| i.as_str().map(str::to_string)).collect(),
            _ => Vec::new(),
        }
    };
    let mut add_ctes = |v: Option<&Value>| {
        if let Some(Value::Mapping(m)) = v {
            ctes.extend(m.keys().filter_map(|k| k.as_str().map(str::to_lowercase)));
        }
    };
    add_ctes(root.get("with"));
    for section in ["bucket_definitions", "streams"] {
        let Some(Value::Mapping(defs)) = root.get(section) else { continue };
        for (name, def) in defs {
            let name = name.as_str().unwrap_or_default().to_string();
            add_ctes(def.get("with"));
            for key in ["parameters", "data", "query", "queries"] {
                queries.extend(strings(def.get(key)).into_iter().map(|sql| (name.clone(), sql)));
            }
        }
    }
    (queries, ctes)
}
