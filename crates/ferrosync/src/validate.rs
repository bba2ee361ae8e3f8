//! `ferrosync validate`: every problem of a config file and its sync config, one line each,
//! then (when the source database answers within a few seconds) checks against the source:
//! the setup serve needs, referenced tables and the columns simple queries name, and column
//! types that ferrosync drops or converts. Errors make the exit code non-zero; warnings do not.

use crate::columns::{table_uses, TableUse};
use crate::serve::rules_options;
use anyhow::{bail, Result};
use ferrosync_config::{load_config_file, PostgresConnectionConfig};
use ferrosync_pgconn::PgEndpoint;
use ferrosync_rules::{RuleIssue, SyncRules, TablePattern};
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;
use tokio_postgres::Client;

/// A source that does not answer within this is reported as unreachable.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Prints problems and counts them.
#[derive(Default)]
struct Report {
    errors: usize,
    warnings: usize,
}

impl Report {
    fn error(&mut self, what: impl std::fmt::Display) {
        self.errors += 1;
        println!("error: {what}");
    }

    fn warning(&mut self, what: impl std::fmt::Display) {
        self.warnings += 1;
        println!("warning: {what}");
    }

    fn note(&self, what: impl std::fmt::Display) {
        println!("note: {what}");
    }
}

pub async fn validate(path: &Path) -> Result<()> {
    let mut report = Report::default();
    let loaded = match load_config_file(path, &|name| std::env::var(name).ok()) {
        Ok(l) => l,
        Err(e) => {
            report.error(format_args!("{}: {e}", path.display()));
            bail!("1 error(s), 0 warning(s)");
        }
    };
    for w in &loaded.warnings {
        report.warning(format_args!("{}: {w}", path.display()));
    }
    let config = &loaded.config;
    let rules = match &config.sync_config {
        None => {
            report.error(format_args!("{}: no sync_config (or sync_rules) to serve", path.display()));
            None
        }
        Some(sync) => {
            let name = match &sync.path {
                Some(p) => p.display().to_string(),
                None => format!("{} (sync_config.content)", path.display()),
            };
            check_rules(&name, &sync.content, &mut report).map(|rules| (rules, sync.content.as_str()))
        }
    };
    if let Some(auth_error) = ferrosync_api::auth::KeyStore::from_config(&config.client_auth).err() {
        report.error(format_args!("{}: client_auth: {auth_error}", path.display()));
    }
    match (&config.replication, &rules) {
        (None, _) => report.note("no replication source configured: source checks skipped"),
        (Some(_), None) => report.note("source checks skipped until the sync config parses"),
        (Some(source), Some((rules, content))) => check_source(source, rules, content, &mut report).await,
    }
    let summary = format!("{} error(s), {} warning(s)", report.errors, report.warnings);
    if report.errors > 0 {
        bail!(summary);
    }
    println!("config OK: {summary}");
    Ok(())
}

/// Parses the sync config and prints all its errors and warnings, in file order.
fn check_rules(name: &str, content: &str, report: &mut Report) -> Option<SyncRules> {
    let (rules, mut issues) = match SyncRules::parse(content, &rules_options()) {
        Ok(rules) => {
            let warnings = rules.warnings().iter().map(|w| (w.clone(), false)).collect();
            (Some(rules), warnings)
        }
        Err(e) => {
            let errors = e.errors.into_iter().map(|i| (i, true));
            (None, errors.chain(e.warnings.into_iter().map(|i| (i, false))).collect::<Vec<_>>())
        }
    };
    // Unlocated issues (about the whole file) first, then by position.
    issues.sort_by_key(|(i, _)| i.location);
    for (issue, is_error) in &issues {
        let line = format!("{name}: {}", one_line(issue));
        match is_error {
            true => report.error(line),
            false => report.warning(line),
        }
    }
    rules
}

/// An issue as its `Display` renders it, with a multi-line query folded onto one line.
fn one_line(issue: &RuleIssue) -> String {
    let mut issue = issue.clone();
    issue.query = issue.query.map(|q| q.split_whitespace().collect::<Vec<_>>().join(" "));
    issue.to_string()
}

/// One column of a source table, from the catalog.
struct Column {
    name: String,
    type_name: String,
    oid: u32,
    /// `typtype`: b(ase), d(omain), c(omposite), r(ange), m(ultirange), e(num), p(seudo).
    kind: char,
    is_array: bool,
}

/// Source tables by (schema, name).
type Catalog = BTreeMap<(String, String), Vec<Column>>;

async fn check_source(source: &PostgresConnectionConfig, rules: &SyncRules, content: &str, report: &mut Report) {
    let client = match connect(source).await {
        Ok(c) => c,
        Err(e) => {
            report.warning(format_args!("source: {e}; table and column checks skipped"));
            return;
        }
    };
    if let Err(e) = ferrosync_source::setup::check_source(&client).await {
        report.error(format_args!("source: {e}"));
    }
    let catalog = match read_catalog(&client).await {
        Ok(c) => c,
        Err(e) => {
            report.warning(format_args!(
                "source: cannot read the catalog ({e}); table and column checks skipped"
            ));
            return;
        }
    };
    let published: HashSet<(String, String)> = match ferrosync_source::setup::published_tables(&client, &source.tag).await {
        Ok(tables) => tables.into_iter().map(|(_, t, _)| (t.schema, t.name)).collect(),
        Err(_) => HashSet::new(),
    };
    let custom_types = rules.compatibility().custom_postgres_types;
    for pattern in rules.source_patterns().iter().filter(|p| p.connection_tag() == source.tag) {
        check_pattern(pattern, &catalog, &published, report);
    }
    let (queries, ctes) = queries_of(content);
    let mut seen = HashSet::new();
    for (definition, sql) in &queries {
        for use_ in table_uses(sql) {
            if ctes.contains(&use_.table) || use_.table.contains('%') {
                continue;
            }
            let schema = use_.schema.clone().unwrap_or_else(|| rules_options().default_schema);
            let Some(columns) = catalog.get(&(schema.clone(), use_.table.clone())) else {
                continue; // Reported by the table check.
            };
            check_columns(
                definition,
                &format!("{schema}.{}", use_.table),
                &use_,
                columns,
                custom_types,
                &mut seen,
                report,
            );
        }
    }
}

async fn connect(source: &PostgresConnectionConfig) -> Result<Client> {
    let endpoint = PgEndpoint::from_config(source)?;
    match tokio::time::timeout(SOURCE_TIMEOUT, endpoint.connect()).await {
        Ok(client) => Ok(client?),
        Err(_) => bail!(
            "the source database ({}) did not answer within {} s",
            endpoint.label(),
            SOURCE_TIMEOUT.as_secs()
        ),
    }
}

async fn read_catalog(client: &Client) -> Result<Catalog> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod),
                    a.atttypid, t.typtype::text, t.typcategory = 'A'
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             JOIN pg_type t ON t.oid = a.atttypid
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
             ORDER BY 1, 2, a.attnum",
            &[],
        )
        .await?;
    let mut catalog = Catalog::new();
    for r in rows {
        let kind: String = r.get(5);
        catalog.entry((r.get(0), r.get(1))).or_default().push(Column {
            name: r.get(2),
            type_name: r.get(3),
            oid: r.get(4),
            kind: kind.chars().next().unwrap_or('b'),
            is_array: r.get(6),
        });
    }
    Ok(catalog)
}

/// A table referenced by the sync config exists (a wildcard matches something) and is published.
fn check_pattern(pattern: &TablePattern, catalog: &Catalog, published: &HashSet<(String, String)>, report: &mut Report) {
    let schema = pattern.schema();
    let matches: Vec<&(String, String)> = catalog
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
        .collect();
    let name = format!(
        "{schema}.{}{}",
        pattern.name_or_prefix(),
        if pattern.is_wildcard() { "%" } else { "" }
    );
    // Warnings, as the reference's validator reports them ("Table s.t not found"): the service
    // runs, and syncs the table's rows once it exists.
    if matches.is_empty() {
        match pattern.is_wildcard() {
            true => report.warning(format_args!("source: no table matches {name}, which the sync config reads")),
            false => report.warning(format_args!("source: Table {name} not found, but the sync config reads it")),
        }
        return;
    }
    if published.is_empty() {
        return; // No publication at all: reported by the setup check.
    }
    for (s, t) in matches.into_iter().filter(|k| !published.contains(*k)) {
        report.warning(format_args!(
            "source: table {s}.{t} is not in the 'powersync' publication: its rows are never replicated (ALTER PUBLICATION powersync ADD TABLE {s}.{t})"
        ));
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
    report: &mut Report,
) {
    for c in &use_.columns {
        // `_table_suffix` is provided for wildcard tables; `id` is checked like any other.
        if c != "_table_suffix" && !columns.iter().any(|col| &col.name == c) && seen.insert(format!("missing {table}.{c}")) {
            report.warning(format_args!("source: {definition}: Column not found: {c} (table {table})"));
        }
    }
    for col in columns.iter().filter(|col| use_.wildcard || use_.outputs.contains(&col.name)) {
        let Some(why) = type_problem(col, custom_types) else { continue };
        if seen.insert(format!("type {table}.{}", col.name)) {
            report.warning(format_args!("source: {table}.{} ({}): {why}", col.name, col.type_name));
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
