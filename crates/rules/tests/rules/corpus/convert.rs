//! Conversions between the corpus YAML and ferrosync-rules values.

use super::{Defaults, Opts};
use ferrosync_rules::{Row, SourceTableName, SqliteValue, SyncRules, SyncRulesOptions};
use serde_yaml_ng::{Mapping, Value};

pub(super) fn options(file: &Defaults, case: Option<&Opts>) -> SyncRulesOptions {
    let mut o = SyncRulesOptions {
        default_schema: "test_schema".into(),
        sync_rules_id: 1,
        default_storage_version: 1,
        prefix_ids: Default::default(),
    };
    for opts in [file.options.as_ref(), case].into_iter().flatten() {
        if let Some(s) = &opts.default_schema {
            o.default_schema = s.clone();
        }
        if let Some(i) = opts.sync_rules_id {
            o.sync_rules_id = i;
        }
        if let Some(v) = opts.default_storage_version {
            o.default_storage_version = v;
        }
    }
    o
}

pub(super) fn to_json(v: &Value) -> Result<serde_json::Value, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot convert {v:?} to JSON: {e}"))
}

pub(super) fn sqlite_value(v: &Value) -> Result<SqliteValue, String> {
    Ok(match v {
        Value::Null => SqliteValue::Null,
        Value::Bool(b) => SqliteValue::Integer(i64::from(*b)),
        Value::Number(n) if n.is_i64() || n.is_u64() => SqliteValue::Integer(n.as_i64().ok_or("integer out of range")?),
        Value::Number(n) => SqliteValue::Real(n.as_f64().ok_or("bad number")?),
        Value::String(s) => SqliteValue::Text(s.clone()),
        Value::Mapping(m) if m.len() == 1 && m.get("blob").is_some() => {
            let hex = m.get("blob").and_then(Value::as_str).ok_or("blob must be hex text")?;
            SqliteValue::Blob(unhex(hex)?)
        }
        other => SqliteValue::Text(to_json(other)?.to_string()),
    })
}

pub(super) fn unhex(s: &str) -> Result<Vec<u8>, String> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2).unwrap_or("zz"), 16).map_err(|e| format!("bad hex {s}: {e}")))
        .collect()
}

pub(super) fn row_of(m: &Mapping) -> Result<Row, String> {
    let mut r = Row::new();
    for (k, v) in m {
        let k = k.as_str().ok_or("row column names must be strings")?;
        r.push(k, sqlite_value(v)?);
    }
    Ok(r)
}

pub(super) fn table_of(v: Option<&Value>, default_schema: &str) -> Result<SourceTableName, String> {
    let mut t = SourceTableName {
        connection_tag: "default".into(),
        schema: default_schema.into(),
        name: "t".into(),
    };
    match v {
        None => {}
        Some(Value::String(s)) => t.name = s.clone(),
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                let v = v.as_str().ok_or("table fields must be text")?.to_string();
                match k.as_str() {
                    Some("name") => t.name = v,
                    Some("schema") => t.schema = v,
                    Some("tag") => t.connection_tag = v,
                    _ => return Err(format!("unknown table field {k:?}")),
                }
            }
        }
        Some(other) => return Err(format!("bad table {other:?}")),
    }
    Ok(t)
}

pub(super) fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(s) => s.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

pub(super) fn parse_rules(yaml: &str, o: &SyncRulesOptions) -> Result<SyncRules, String> {
    SyncRules::parse(yaml, o).map_err(|e| {
        let list: Vec<String> = e.errors.iter().map(|i| i.message.clone()).collect();
        format!("parse failed: {list:?}")
    })
}

pub(super) fn yaml_text(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default()
}

pub(super) fn with_config(mut root: Mapping, defaults: &Defaults, config: Option<&Mapping>, edition: Option<u8>) -> Value {
    let mut c = defaults.config.clone().unwrap_or_default();
    if let Some(extra) = config {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    if let Some(e) = edition.or(defaults.edition) {
        c.insert("edition".into(), Value::from(e));
    }
    if !c.is_empty() {
        let mut out = Mapping::new();
        out.insert("config".into(), Value::Mapping(c));
        for (k, v) in root {
            out.insert(k, v);
        }
        root = out;
    }
    Value::Mapping(root)
}

/// A one-query config: a legacy bucket definition or an edition-3 stream.
pub(super) fn single_query(sql: &str, defaults: &Defaults, config: Option<&Mapping>, edition: Option<u8>) -> String {
    let ed = edition.or(defaults.edition).unwrap_or(1);
    let mut root = Mapping::new();
    if ed >= 3 {
        let mut s = Mapping::new();
        s.insert("query".into(), sql.into());
        let mut streams = Mapping::new();
        streams.insert("s".into(), Value::Mapping(s));
        root.insert("streams".into(), Value::Mapping(streams));
    } else {
        let mut b = Mapping::new();
        b.insert("data".into(), Value::Sequence(vec![sql.into()]));
        let mut defs = Mapping::new();
        defs.insert("b".into(), Value::Mapping(b));
        root.insert("bucket_definitions".into(), Value::Mapping(defs));
    }
    yaml_text(&with_config(root, defaults, config, edition))
}

/// Prepends the file's default config to a full YAML text (if any).
pub(super) fn full_yaml(yaml: &str, defaults: &Defaults) -> Result<String, String> {
    if defaults.config.is_none() && defaults.edition.is_none() {
        return Ok(yaml.to_string());
    }
    let v: Value = serde_yaml_ng::from_str(yaml).map_err(|e| format!("bad case yaml: {e}"))?;
    let Value::Mapping(m) = v else {
        return Ok(yaml.to_string());
    };
    if m.contains_key("config") {
        return Ok(yaml.to_string());
    }
    Ok(yaml_text(&with_config(m, defaults, None, None)))
}
