//! Helpers for walking a `serde_yaml_ng::Value` tree with key paths, typed accessors and
//! unknown-key tracking.

use serde_yaml_ng::{Mapping, Value};

use crate::error::ConfigError;

pub(crate) type Result<T> = std::result::Result<T, ConfigError>;

pub(crate) fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

pub(crate) fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Renders a mapping key for use in a key path.
pub(crate) fn key_to_string(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_string(),
        Value::Tagged(t) => key_to_string(&t.value),
        Value::Sequence(_) | Value::Mapping(_) => "<complex key>".to_string(),
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "an object",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A mapping being consumed: records which keys were read so the rest can be reported.
pub(crate) struct Obj<'a> {
    path: String,
    map: &'a Mapping,
    used: Vec<String>,
}

impl<'a> Obj<'a> {
    pub(crate) fn new(value: &'a Value, path: &str) -> Result<Self> {
        match value {
            Value::Mapping(map) => Ok(Obj {
                path: path.to_string(),
                map,
                used: Vec::new(),
            }),
            other => Err(ConfigError::invalid(path, format!("expected an object, got {}", type_name(other)))),
        }
    }

    pub(crate) fn key_path(&self, key: &str) -> String {
        child_path(&self.path, key)
    }

    /// Returns the value for `key` (marking it as known). `null` counts as absent.
    pub(crate) fn get(&mut self, key: &str) -> Option<&'a Value> {
        self.used.push(key.to_string());
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// Whether `key` is present with a non-null value (does not mark it as known).
    pub(crate) fn has(&self, key: &str) -> bool {
        !matches!(self.map.get(key), None | Some(Value::Null))
    }

    /// Marks keys as known without reading them.
    pub(crate) fn accept(&mut self, keys: &[&str]) {
        self.used.extend(keys.iter().map(|k| k.to_string()));
    }

    pub(crate) fn string(&mut self, key: &str) -> Result<Option<String>> {
        let path = self.key_path(key);
        self.get(key).map(|v| as_string(v, &path)).transpose()
    }

    pub(crate) fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        let path = self.key_path(key);
        self.get(key).map(|v| as_bool(v, &path)).transpose()
    }

    pub(crate) fn u64(&mut self, key: &str) -> Result<Option<u64>> {
        let path = self.key_path(key);
        self.get(key).map(|v| as_u64(v, &path)).transpose()
    }

    pub(crate) fn string_list(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        let path = self.key_path(key);
        self.get(key).map(|v| as_string_list(v, &path)).transpose()
    }

    /// Reports every key that was not read or accepted as a warning.
    pub(crate) fn finish(self, warnings: &mut Vec<String>) {
        for key in self.map.keys() {
            let name = key_to_string(key);
            if !self.used.contains(&name) || !matches!(key, Value::String(_)) {
                warnings.push(format!("unknown key `{}` ignored", child_path(&self.path, &name)));
            }
        }
    }
}

pub(crate) fn as_string(v: &Value, path: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(ConfigError::invalid(path, format!("expected a string, got {}", type_name(other)))),
    }
}

pub(crate) fn as_bool(v: &Value, path: &str) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        other => Err(ConfigError::invalid(path, format!("expected a boolean, got {}", type_name(other)))),
    }
}

pub(crate) fn as_u64(v: &Value, path: &str) -> Result<u64> {
    if let Value::Number(n) = v {
        if let Some(u) = n.as_u64() {
            return Ok(u);
        }
        if let Some(f) = n.as_f64() {
            if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as f64 {
                return Ok(f as u64);
            }
        }
        return Err(ConfigError::invalid(path, format!("expected a non-negative integer, got {n}")));
    }
    Err(ConfigError::invalid(
        path,
        format!("expected a non-negative integer, got {}", type_name(v)),
    ))
}

/// A port: a number or a numeric string (like the reference's `portCodec`).
/// Range checks are left to the caller.
pub(crate) fn as_port_number(v: &Value, path: &str) -> Result<i64> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i)
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite() && f.fract() == 0.0) {
                Ok(f as i64)
            } else {
                Err(ConfigError::invalid(path, format!("expected a port number, got {n}")))
            }
        }
        Value::String(s) => parse_port_str(s).ok_or_else(|| ConfigError::invalid(path, format!("expected a port number, got {s:?}"))),
        other => Err(ConfigError::invalid(
            path,
            format!("expected a port number, got {}", type_name(other)),
        )),
    }
}

pub(crate) fn parse_port_str(s: &str) -> Option<i64> {
    let t = s.trim();
    if t.is_empty() || t.len() > 12 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<i64>().ok()
}

pub(crate) fn as_u16_port(v: &Value, path: &str) -> Result<u16> {
    let n = as_port_number(v, path)?;
    u16::try_from(n).map_err(|_| ConfigError::invalid(path, format!("Port {n} not supported")))
}

/// A string or a list of strings.
pub(crate) fn as_string_list(v: &Value, path: &str) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| as_string(item, &index_path(path, i)))
            .collect(),
        other => Err(ConfigError::invalid(
            path,
            format!("expected a string or a list of strings, got {}", type_name(other)),
        )),
    }
}

/// Converts a (tag-free) YAML value to JSON.
pub(crate) fn to_json(v: &Value, path: &str) -> Result<serde_json::Value> {
    Ok(match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                serde_json::Value::from(i)
            } else if let Some(u) = n.as_u64() {
                serde_json::Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                match serde_json::Number::from_f64(f) {
                    Some(num) => serde_json::Value::Number(num),
                    None => return Err(ConfigError::invalid(path, format!("number {n} cannot be represented in JSON"))),
                }
            }
        }
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Sequence(items) => serde_json::Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| to_json(item, &index_path(path, i)))
                .collect::<Result<Vec<_>>>()?,
        ),
        Value::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = key_to_string(k);
                let value = to_json(v, &child_path(path, &key))?;
                out.insert(key, value);
            }
            serde_json::Value::Object(out)
        }
        Value::Tagged(t) => to_json(&t.value, path)?,
    })
}

/// Converts a JSON value to the YAML value model.
pub(crate) fn from_json(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Number(i.into())
            } else if let Some(u) = n.as_u64() {
                Value::Number(u.into())
            } else {
                Value::Number(n.as_f64().unwrap_or(f64::NAN).into())
            }
        }
        serde_json::Value::String(s) => Value::String(s),
        serde_json::Value::Array(items) => Value::Sequence(items.into_iter().map(from_json).collect()),
        serde_json::Value::Object(map) => {
            let mut out = Mapping::new();
            for (k, v) in map {
                out.insert(Value::String(k), from_json(v));
            }
            Value::Mapping(out)
        }
    }
}
