//! YAML structure of a sync rules file: root keys, the `config:` block
//! (edition, storage version, compatibility switches) and the raw bucket
//! definitions, with the reference's structural error messages.

use crate::errors::{Location, RuleIssue};
use serde_yaml_ng::{Mapping, Value};

/// Compatibility switches (spec §1.2).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Compatibility {
    /// Timestamps rendered as ISO 8601 with `T`.
    pub timestamps_iso8601: bool,
    /// Bucket ids prefixed with `<sync_rules_id>#`.
    pub versioned_bucket_ids: bool,
    /// `->`/`->>`/`json_extract` only split `$`-prefixed paths.
    pub fixed_json_extract: bool,
    /// Postgres custom types synced structurally.
    pub custom_postgres_types: bool,
}

/// Parse-time options supplied by the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRulesOptions {
    /// Schema for unqualified table names (`public` for Postgres).
    pub default_schema: String,
    /// Numeric id of the persisted sync rules deployment.
    pub sync_rules_id: u64,
    /// Storage version when the file does not set `config.storage_version`.
    pub default_storage_version: u32,
    /// Bucket-prefix id per bucket definition (name -> id) where it differs from
    /// `sync_rules_id`: a definition kept unchanged by an in-place deploy keeps the id its
    /// buckets were built under, so its bucket ids (and clients' copies) survive the deploy.
    pub prefix_ids: std::collections::BTreeMap<String, u64>,
}

impl Default for SyncRulesOptions {
    fn default() -> Self {
        SyncRulesOptions {
            default_schema: "public".to_string(),
            sync_rules_id: 1,
            default_storage_version: 2,
            prefix_ids: Default::default(),
        }
    }
}

/// A raw bucket definition from YAML.
pub(crate) struct RawDefinition {
    pub name: String,
    pub parameters: Option<Vec<String>>,
    pub data: Vec<String>,
    pub priority: Option<u8>,
    pub accept_dangerous: bool,
}

/// A raw stream definition from YAML.
pub(crate) struct RawStream {
    pub name: String,
    pub queries: Vec<String>,
    /// Stream-local CTEs (name, SQL).
    pub ctes: Vec<(String, String)>,
    pub auto_subscribe: bool,
    pub priority: u8,
    pub accept_dangerous: bool,
}

/// The structurally-validated file.
pub(crate) struct RawRules {
    pub compatibility: Compatibility,
    pub storage_version: u32,
    pub definitions: Vec<RawDefinition>,
    pub streams: Vec<RawStream>,
    /// Global CTEs (name, SQL).
    pub ctes: Vec<(String, String)>,
}

const PRIORITY_ERROR: &str = "Invalid priority, expected a number between 0 and 3 (inclusive).";

fn key_str(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other).map(|s| s.trim().to_string()).unwrap_or_default(),
    }
}

fn parse_config(
    map: &Mapping,
    options: &SyncRulesOptions,
    errors: &mut Vec<RuleIssue>,
    warnings: &mut Vec<RuleIssue>,
) -> (u32, Compatibility, u32) {
    let mut edition = 1u32;
    let mut storage_version = options.default_storage_version;
    let mut overrides: [Option<bool>; 4] = [None; 4];
    let mut iso = None;
    let mut has_precision = false;
    let mut sqlite_engine = false;
    for (k, v) in map {
        let key = key_str(k);
        match key.as_str() {
            "edition" => match v.as_u64() {
                Some(e @ 1..=3) => edition = e as u32,
                _ => errors.push(RuleIssue::new("config.edition must be an integer between 1 and 3")),
            },
            "storage_version" => match v.as_u64() {
                Some(2) => storage_version = 2,
                Some(3) => {
                    storage_version = 3;
                    warnings.push(RuleIssue::new("Storage version 3 is unstable and may change in future releases."));
                }
                Some(n) => errors.push(RuleIssue::new(format!("Storage version {n} is not supported"))),
                None => errors.push(RuleIssue::new("config.storage_version must be an integer")),
            },
            "timestamp_max_precision" => {
                has_precision = true;
                if !matches!(v.as_str(), Some("seconds" | "milliseconds" | "microseconds" | "nanoseconds")) {
                    errors.push(RuleIssue::new(
                        "config.timestamp_max_precision must be one of seconds, milliseconds, microseconds, nanoseconds",
                    ));
                }
            }
            "timestamps_iso8601"
            | "versioned_bucket_ids"
            | "fixed_json_extract"
            | "custom_postgres_types"
            | "unstable_sqlite_expression_engine" => {
                let Some(b) = v.as_bool() else {
                    errors.push(RuleIssue::new(format!("config.{key} must be a boolean")));
                    continue;
                };
                match key.as_str() {
                    "timestamps_iso8601" => {
                        overrides[0] = Some(b);
                        iso = Some(b);
                    }
                    "versioned_bucket_ids" => overrides[1] = Some(b),
                    "fixed_json_extract" => overrides[2] = Some(b),
                    "custom_postgres_types" => overrides[3] = Some(b),
                    _ => sqlite_engine = b,
                }
            }
            other => errors.push(RuleIssue::new(format!(
                "Unknown config option '{other}' (must NOT have additional properties)"
            ))),
        }
    }
    let default = edition >= 2;
    let compat = Compatibility {
        timestamps_iso8601: overrides[0].unwrap_or(default),
        versioned_bucket_ids: overrides[1].unwrap_or(default),
        fixed_json_extract: overrides[2].unwrap_or(default),
        custom_postgres_types: overrides[3].unwrap_or(default),
    };
    if sqlite_engine && edition < 3 {
        errors.push(RuleIssue::new("Enabling unstable_sqlite_expression_engine requires edition: 3"));
    } else if sqlite_engine && !compat.fixed_json_extract {
        errors.push(RuleIssue::new(
            "Enabling unstable_sqlite_expression_engine requires fixed_json_extract",
        ));
    }
    if has_precision && !iso.unwrap_or(default) {
        errors.push(RuleIssue::new(
            "'timestamp_max_precision' requires 'timestamps_iso8601' to be enabled.",
        ));
    }
    (edition, compat, storage_version)
}

fn string_list(v: &Value, what: &str, name: &str, errors: &mut Vec<RuleIssue>) -> Vec<String> {
    let items: Vec<&Value> = match v {
        Value::Sequence(s) => s.iter().collect(),
        _ => {
            errors.push(RuleIssue::at(format!("'{what}' must be an array"), name, None));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for item in items {
        match item.as_str() {
            Some(s) => out.push(s.to_string()),
            None => errors.push(RuleIssue::at(format!("'{what}' entries must be strings"), name, None)),
        }
    }
    out
}

fn parse_definition(name: String, v: &Value, errors: &mut Vec<RuleIssue>) -> Option<RawDefinition> {
    let Value::Mapping(map) = v else {
        errors.push(RuleIssue::at(format!("'{name}' bucket definition must be an object"), &name, None));
        return None;
    };
    let mut def = RawDefinition {
        name: name.clone(),
        parameters: None,
        data: Vec::new(),
        priority: None,
        accept_dangerous: false,
    };
    let mut has_data = false;
    for (k, v) in map {
        match key_str(k).as_str() {
            "parameters" => {
                def.parameters = Some(match v {
                    Value::String(s) => vec![s.clone()],
                    other => string_list(other, "parameters", &name, errors),
                })
            }
            "data" => {
                has_data = true;
                def.data = string_list(v, "data", &name, errors);
            }
            "priority" => match v.as_u64() {
                Some(p @ 0..=3) => def.priority = Some(p as u8),
                _ => errors.push(RuleIssue::at(PRIORITY_ERROR, &name, None)),
            },
            "accept_potentially_dangerous_queries" => match v.as_bool() {
                Some(b) => def.accept_dangerous = b,
                None => errors.push(RuleIssue::at("accept_potentially_dangerous_queries must be a boolean", &name, None)),
            },
            other => errors.push(RuleIssue::at(
                format!("Unknown key '{other}' in bucket definition (must NOT have additional properties)"),
                &name,
                None,
            )),
        }
    }
    if !has_data {
        errors.push(RuleIssue::at("must have required property 'data'", &name, None));
    }
    Some(def)
}

fn sql_map(v: &Value, what: &str, errors: &mut Vec<RuleIssue>) -> Vec<(String, String)> {
    let Value::Mapping(m) = v else {
        errors.push(RuleIssue::new(format!("'{what}' must be an object")));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in m {
        match v.as_str() {
            Some(sql) => out.push((key_str(k), sql.to_string())),
            None => errors.push(RuleIssue::new(format!("'{what}.{}' must be a SQL string", key_str(k)))),
        }
    }
    out
}

fn parse_stream(name: String, v: &Value, edition: u32, errors: &mut Vec<RuleIssue>) -> Option<RawStream> {
    let Value::Mapping(map) = v else {
        errors.push(RuleIssue::at(format!("'{name}' stream definition must be an object"), &name, None));
        return None;
    };
    let mut stream = RawStream {
        name: name.clone(),
        queries: Vec::new(),
        ctes: Vec::new(),
        auto_subscribe: false,
        priority: 3,
        accept_dangerous: false,
    };
    let (mut query, mut queries) = (None, None);
    for (k, v) in map {
        let key = key_str(k);
        match key.as_str() {
            "query" => match v.as_str() {
                Some(q) => query = Some(q.to_string()),
                None => errors.push(RuleIssue::at("'query' must be a SQL string", &name, None)),
            },
            "queries" if edition < 3 => errors.push(RuleIssue::at(
                "Multiple queries not supported without the `sync_config_compiler` option.",
                &name,
                None,
            )),
            "queries" => queries = Some(string_list(v, "queries", &name, errors)),
            "with" if edition < 3 => errors.push(RuleIssue::at(
                "Common table expressions are not supported without the `sync_config_compiler` option.",
                &name,
                None,
            )),
            "with" => stream.ctes = sql_map(v, &format!("{name}.with"), errors),
            "auto_subscribe" => match v.as_bool() {
                Some(b) => stream.auto_subscribe = b,
                None => errors.push(RuleIssue::at("auto_subscribe must be a boolean", &name, None)),
            },
            "priority" => match v.as_u64() {
                Some(p @ 0..=3) => stream.priority = p as u8,
                _ => errors.push(RuleIssue::at(PRIORITY_ERROR, &name, None)),
            },
            "accept_potentially_dangerous_queries" => match v.as_bool() {
                Some(b) => stream.accept_dangerous = b,
                None => errors.push(RuleIssue::at("accept_potentially_dangerous_queries must be a boolean", &name, None)),
            },
            other => errors.push(RuleIssue::at(
                format!("Unknown key '{other}' in stream definition (must NOT have additional properties)"),
                &name,
                None,
            )),
        }
    }
    match (query, queries) {
        (Some(q), None) => stream.queries = vec![q],
        (None, Some(list)) => stream.queries = list,
        _ => errors.push(RuleIssue::at("One of `queries` or `query` must be given.", &name, None)),
    }
    Some(stream)
}

const ALPHA_STREAMS: &str = "This is using an alpha version of Sync Streams. We recommend upgrading `config.edition` to version 3, which is the stable version of Sync Streams.";

/// Parses the YAML structure. Errors and warnings are appended.
pub(crate) fn parse_yaml(
    yaml: &str,
    options: &SyncRulesOptions,
    errors: &mut Vec<RuleIssue>,
    warnings: &mut Vec<RuleIssue>,
) -> Option<RawRules> {
    let doc: Value = match serde_yaml_ng::from_str(yaml) {
        Ok(d) => d,
        Err(e) => {
            let mut issue = RuleIssue::new(format!("Invalid YAML: {e}"));
            issue.location = e.location().map(|l| Location {
                line: l.line(),
                column: l.column(),
            });
            errors.push(issue);
            return None;
        }
    };
    let Value::Mapping(root) = doc else {
        errors.push(RuleIssue::new("Sync Config must be a YAML map."));
        return None;
    };
    let mut config = None;
    let mut buckets = None;
    let mut streams_yaml = None;
    let mut with = None;
    for (k, v) in &root {
        match key_str(k).as_str() {
            "config" => config = Some(v),
            "bucket_definitions" => buckets = Some(v),
            "streams" => streams_yaml = Some(v),
            "with" => with = Some(v),
            "event_definitions" => {}
            other => errors.push(RuleIssue::new(format!(
                "Unknown top-level key '{other}' (must NOT have additional properties)"
            ))),
        }
    }
    let (edition, compatibility, storage_version) = match config {
        None => (1, Compatibility::default(), options.default_storage_version),
        Some(Value::Mapping(m)) => parse_config(m, options, errors, warnings),
        Some(Value::Null) => (1, Compatibility::default(), options.default_storage_version),
        Some(_) => {
            errors.push(RuleIssue::new("'config' must be an object"));
            (1, Compatibility::default(), options.default_storage_version)
        }
    };
    let (has_streams, has_with) = (streams_yaml.is_some(), with.is_some());
    if edition >= 3 {
        if buckets.is_some() {
            errors.push(RuleIssue::new(
                "'bucket_definitions' are not supported by the new compiler. Consider using https://powersync-community.github.io/bucket-definitions-to-sync-streams/ to migrate to Sync Streams.",
            ));
        }
        if !has_streams {
            errors.push(RuleIssue::new("'streams' are required."));
        }
    } else {
        if has_with {
            errors.push(RuleIssue::new("Common table expressions require edition 3."));
        }
        if buckets.is_none() && !has_streams {
            errors.push(RuleIssue::new("'bucket_definitions' or 'streams' is required"));
        }
    }
    if has_streams && edition < 2 {
        errors.push(RuleIssue::new("Sync streams require edition 2 or later"));
    } else if has_streams && edition < 3 {
        warnings.push(RuleIssue::new(ALPHA_STREAMS));
    }
    let ctes = match with {
        Some(v) if edition >= 3 => sql_map(v, "with", errors),
        _ => Vec::new(),
    };
    let mut streams = Vec::new();
    match streams_yaml {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                if let Some(s) = parse_stream(key_str(k), v, edition, errors) {
                    streams.push(s);
                }
            }
        }
        Some(_) => errors.push(RuleIssue::new("'streams' must be an object")),
    }
    let mut definitions = Vec::new();
    match buckets {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                if let Some(d) = parse_definition(key_str(k), v, errors) {
                    definitions.push(d);
                }
            }
        }
        Some(_) => errors.push(RuleIssue::new("'bucket_definitions' must be an object")),
    }
    let names: Vec<&str> = definitions
        .iter()
        .map(|d| d.name.as_str())
        .chain(streams.iter().map(|s| s.name.as_str()))
        .collect();
    if (1..names.len()).any(|i| names[..i].contains(&names[i])) {
        errors.push(RuleIssue::new("Duplicate stream or bucket definition."));
    }
    Some(RawRules {
        compatibility,
        storage_version,
        definitions,
        streams,
        ctes,
    })
}
