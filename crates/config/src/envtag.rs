//! Resolution of the `!env PS_NAME[::type]` YAML tag.

use serde_yaml_ng::{Mapping, Value};

use crate::error::ConfigError;
use crate::node::{child_path, index_path, key_to_string, type_name, Result};

pub(crate) type EnvFn<'e> = &'e dyn Fn(&str) -> Option<String>;

/// Replaces every `!env` tagged scalar by its value from `env`. Other tags are dropped
/// (the untagged value is kept) with a warning.
pub(crate) fn resolve_tags(value: Value, path: &str, env: EnvFn<'_>, warnings: &mut Vec<String>) -> Result<Value> {
    match value {
        Value::Tagged(tagged) => {
            if tagged.tag == "env" {
                match tagged.value {
                    Value::String(spec) => resolve_env(&spec, path, env),
                    other => Err(ConfigError::invalid(
                        path,
                        format!("the !env tag must be applied to a variable name, got {}", type_name(&other)),
                    )),
                }
            } else {
                warnings.push(format!(
                    "unknown YAML tag `{}` at `{}` ignored",
                    tagged.tag,
                    if path.is_empty() { "<root>" } else { path }
                ));
                resolve_tags(tagged.value, path, env, warnings)
            }
        }
        Value::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                out.push(resolve_tags(item, &index_path(path, i), env, warnings)?);
            }
            Ok(Value::Sequence(out))
        }
        Value::Mapping(map) => {
            let mut out = Mapping::with_capacity(map.len());
            for (k, v) in map {
                let key_path = child_path(path, &key_to_string(&k));
                let k = resolve_tags(k, &key_path, env, warnings)?;
                let v = resolve_tags(v, &key_path, env, warnings)?;
                out.insert(k, v);
            }
            Ok(Value::Mapping(out))
        }
        other => Ok(other),
    }
}

fn resolve_env(spec: &str, path: &str, env: EnvFn<'_>) -> Result<Value> {
    let spec = spec.trim();
    let (name, ty) = match spec.split_once("::") {
        Some((name, ty)) => (name, ty),
        None => (spec, "string"),
    };
    if !name.starts_with("PS_") {
        return Err(ConfigError::invalid(
            path,
            format!("Only environment variables starting with \"PS_\" can be substituted (got !env {spec})"),
        ));
    }
    let Some(value) = env(name) else {
        return Err(ConfigError::invalid(
            path,
            format!("Attempted to substitute environment variable \"{name}\" which is undefined. Set this variable on the environment."),
        ));
    };
    match ty {
        "string" => Ok(Value::String(value)),
        "number" => parse_js_number(&value).ok_or_else(|| {
            ConfigError::invalid(
                path,
                format!("Environment variable \"{name}\" is not a valid number. Got: \"{value}\""),
            )
        }),
        "boolean" => {
            if value.eq_ignore_ascii_case("true") {
                Ok(Value::Bool(true))
            } else if value.eq_ignore_ascii_case("false") {
                Ok(Value::Bool(false))
            } else {
                Err(ConfigError::invalid(
                    path,
                    format!("Environment variable \"{name}\" is not a boolean. Expected \"true\" or \"false\", got \"{value}\""),
                ))
            }
        }
        other => Err(ConfigError::invalid(
            path,
            format!("Environment variable \"{name}\" has an invalid type suffix \"::{other}\" (expected ::string, ::number or ::boolean)"),
        )),
    }
}

/// Approximates JavaScript `Number(str)`: surrounding whitespace ignored, empty string is 0,
/// `0x`/`0o`/`0b` prefixes accepted, `Infinity` accepted; anything else that is not a
/// decimal number is NaN (`None`).
fn parse_js_number(s: &str) -> Option<Value> {
    let t = s.trim();
    if t.is_empty() {
        return Some(Value::Number(0.into()));
    }
    for (prefix, radix) in [("0x", 16), ("0X", 16), ("0o", 8), ("0O", 8), ("0b", 2), ("0B", 2)] {
        if let Some(digits) = t.strip_prefix(prefix) {
            return u64::from_str_radix(digits, radix).ok().map(|u| Value::Number(u.into()));
        }
    }
    if let Ok(i) = t.parse::<i64>() {
        return Some(Value::Number(i.into()));
    }
    match t {
        "Infinity" | "+Infinity" => return Some(Value::Number(f64::INFINITY.into())),
        "-Infinity" => return Some(Value::Number(f64::NEG_INFINITY.into())),
        _ => {}
    }
    // Rust's float parser also accepts "inf"/"nan", which JS does not.
    if t.bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        if let Ok(f) = t.parse::<f64>() {
            return Some(Value::Number(f.into()));
        }
    }
    None
}
