//! Bodies of the cargo-fuzz targets in `fuzz_targets/` (each target is a one-line call into
//! this crate, so a crash reproduces with the same code path from a test or a debugger).
//!
//! The property under test everywhere: no panic, no crash, no hang. Errors are fine.
//! A stable-toolchain smoke test re-runs the seed corpora through the same public API calls:
//! `crates/rules/src/fuzz_smoke.rs` (it reads `fuzz/corpus`, `fuzz/configs` and
//! `fuzz/templates` at test time; it does not depend on this crate).

use arbitrary::{Result, Unstructured};
use ferrosync_rules::{LookupKey, Row, SourceTableName, SqliteValue, SyncRules, SyncRulesOptions};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// Valid sync configs the `evaluate` target runs rows through (file name, YAML). Each must
/// parse: `fuzz_smoke` in `crates/rules` checks that on stable, since a config that stopped
/// parsing would only be left out here.
pub const CONFIGS: &[(&str, &str)] = &[
    ("legacy_all_forms.yaml", include_str!("../configs/legacy_all_forms.yaml")),
    ("legacy_edition2.yaml", include_str!("../configs/legacy_edition2.yaml")),
    ("legacy_options.yaml", include_str!("../configs/legacy_options.yaml")),
    ("streams_alpha.yaml", include_str!("../configs/streams_alpha.yaml")),
    ("streams_ed3.yaml", include_str!("../configs/streams_ed3.yaml")),
];

/// YAML templates of the `parse_config_sql` target: `{{Q0}}`..`{{Q3}}` are replaced by
/// fuzzed SQL as double-quoted YAML scalars.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("events", include_str!("../templates/events.yaml")),
    ("legacy_global", include_str!("../templates/legacy_global.yaml")),
    ("legacy_multi", include_str!("../templates/legacy_multi.yaml")),
    ("legacy_params", include_str!("../templates/legacy_params.yaml")),
    ("streams_alpha", include_str!("../templates/streams_alpha.yaml")),
    ("streams_ed3", include_str!("../templates/streams_ed3.yaml")),
    ("streams_with_ed3", include_str!("../templates/streams_with_ed3.yaml")),
];

fn options(versioned: bool) -> SyncRulesOptions {
    SyncRulesOptions {
        default_schema: "public".to_string(),
        sync_rules_id: 7,
        default_storage_version: if versioned { 2 } else { 1 },
        prefix_ids: Default::default(),
    }
}

/// Target `parse_config`: arbitrary bytes as a whole sync config file.
#[doc(hidden)]
pub fn parse_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for versioned in [false, true] {
        if let Ok(rules) = SyncRules::parse(&text, &options(versioned)) {
            // Cheap accessors, plus one pass over the fixed rows for what did parse.
            exercise_fixed(&rules);
        }
    }
}

/// Escapes text as a YAML double-quoted scalar that decodes back to exactly `s`.
#[doc(hidden)]
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xFFFF => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push_str(&format!("\\U{:08X}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// The YAML of a `parse_config_sql` input: the first line names a template (or picks one by
/// its byte sum), the next lines are `Q0`, `Q1`, `Q2` and the rest of the input is `Q3`.
#[doc(hidden)]
pub fn splice(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(5, '\n');
    let head = lines.next().unwrap_or("").trim();
    let template = TEMPLATES
        .iter()
        .find(|(name, _)| *name == head)
        .unwrap_or_else(|| &TEMPLATES[head.bytes().map(usize::from).sum::<usize>() % TEMPLATES.len()])
        .1;
    let mut yaml = template.to_string();
    for i in 0..4 {
        let sql = lines.next().unwrap_or("");
        yaml = yaml.replace(&format!("{{{{Q{i}}}}}"), &yaml_quote(sql));
    }
    yaml
}

/// Target `parse_config_sql`: fuzzed SQL spliced into valid YAML, then (when it parses)
/// evaluated against fixed rows and a fixed request.
#[doc(hidden)]
pub fn parse_config_sql(data: &[u8]) {
    let yaml = splice(data);
    for versioned in [false, true] {
        if let Ok(rules) = SyncRules::parse(&yaml, &options(versioned)) {
            exercise_fixed(&rules);
        }
    }
}

/// Column names rows are built from (what the configs and seeds reference).
const COLUMNS: &[&str] = &[
    "id",
    "owner_id",
    "user_id",
    "list_id",
    "list_ids",
    "org_id",
    "project_id",
    "device_id",
    "mode",
    "name",
    "description",
    "data",
    "tags",
    "value",
    "members",
    "public",
    "revoked",
    "deleted",
    "created_at",
    "x",
    "y",
    "a",
    "b",
    "n",
    "s",
    "_secret",
    "ID",
];

const TEXTS: &[&str] = &[
    "",
    "u1",
    "user1",
    "[1,2,3]",
    "[\"u1\",\"u2\"]",
    "{\"a\":{\"b\":1},\"x\":[1,{\"y\":null}],\"y\":\"z\"}",
    "{\"a\":1,\"a\":2}",
    "[9007199254740993, 1e400, -0, 1.5e-7]",
    "null",
    "true",
    "2024-01-02 03:04:05.123456Z",
    "1e999",
    "0x1F",
    " \u{feff}12abc",
    "-9223372036854775809",
    "é\u{0}\u{1F600}\u{FFFF}",
    "$.a.b",
    "\"unterminated",
    "[[[[[[[[",
];

fn interesting_int(u: &mut Unstructured) -> Result<i64> {
    Ok(*u.choose(&[
        0,
        1,
        -1,
        2,
        3,
        10,
        100,
        i64::MAX,
        i64::MIN,
        1 << 53,
        (1 << 53) + 1,
        -(1 << 53) - 1,
        i64::from(i32::MAX),
    ])?)
}

fn interesting_real(u: &mut Unstructured) -> Result<f64> {
    Ok(*u.choose(&[
        0.0,
        -0.0,
        0.5,
        1.5,
        3.0,
        -2.5,
        1e21,
        1e-7,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        9.3e18,
        -9.3e18,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ])?)
}

fn gen_json(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let max = if depth >= 4 { 4 } else { 7 };
    Ok(match u.int_in_range(0..=max)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => json!(interesting_int(u)?),
        3 => json!(u.arbitrary::<i64>()?),
        4 => serde_json::Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        5 => Value::String(gen_text(u)?),
        6 => {
            let n = u.int_in_range(0..=4)?;
            Value::Array((0..n).map(|_| gen_json(u, depth + 1)).collect::<Result<_>>()?)
        }
        _ => {
            let n = u.int_in_range(0..=4)?;
            let mut map = Map::new();
            for _ in 0..n {
                let key = gen_column(u)?;
                map.insert(key, gen_json(u, depth + 1)?);
            }
            Value::Object(map)
        }
    })
}

fn gen_text(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=3)? {
        0 => u.arbitrary::<String>()?,
        1 => (*u.choose(TEXTS)?).to_string(),
        2 => gen_json(u, 2)?.to_string(),
        _ => {
            // Deeply nested JSON-ish text (stack depth of JSON parsing).
            let n = u.int_in_range(0..=20_000usize)?;
            let open = *u.choose(&["[", "{\"a\":", "[1,"])?;
            format!("{}{}", open.repeat(n), "]".repeat(n))
        }
    })
}

fn gen_column(u: &mut Unstructured) -> Result<String> {
    if u.ratio(1, 8)? {
        u.arbitrary()
    } else {
        Ok((*u.choose(COLUMNS)?).to_string())
    }
}

fn gen_value(u: &mut Unstructured) -> Result<SqliteValue> {
    Ok(match u.int_in_range(0..=8)? {
        0 => SqliteValue::Null,
        1 => SqliteValue::Integer(u.arbitrary()?),
        2 => SqliteValue::Integer(interesting_int(u)?),
        3 => SqliteValue::Real(u.arbitrary()?),
        4 => SqliteValue::Real(interesting_real(u)?),
        5 | 6 => SqliteValue::Text(gen_text(u)?),
        7 => SqliteValue::Blob(u.arbitrary()?),
        _ => SqliteValue::Blob(u.choose(&[&b"\xff\xfe\x00"[..], b"\xc3", b"\xed\xa0\x80", b"[1]", b""])?.to_vec()),
    })
}

fn gen_row(u: &mut Unstructured) -> Result<Row> {
    let n = u.int_in_range(0..=10)?;
    let mut row = Row::with_capacity(n);
    for _ in 0..n {
        let name = gen_column(u)?;
        row.push(name, gen_value(u)?);
    }
    Ok(row)
}

/// A table a pattern of the rules selects (or, sometimes, any table).
fn gen_table(u: &mut Unstructured, rules: &SyncRules) -> Result<SourceTableName> {
    let patterns = rules.source_patterns();
    if patterns.is_empty() || u.ratio(1, 10)? {
        return Ok(SourceTableName {
            connection_tag: "default".into(),
            schema: "public".into(),
            name: u.arbitrary()?,
        });
    }
    let p = u.choose(&patterns)?;
    let suffix = if p.is_wildcard() { u.arbitrary::<String>()? } else { String::new() };
    let schema = match p.schema().strip_suffix('%') {
        Some(prefix) => format!("{prefix}{}", u.arbitrary::<String>()?),
        None => p.schema().to_string(),
    };
    Ok(SourceTableName {
        connection_tag: p.connection_tag().to_string(),
        schema,
        name: format!("{}{suffix}", p.name_or_prefix()),
    })
}

fn gen_claims(u: &mut Unstructured) -> Result<(Value, Option<Value>)> {
    let mut jwt = Map::new();
    if !u.ratio(1, 10)? {
        let sub = if u.ratio(3, 4)? {
            json!(*u.choose(&["u1", "user1", "", "1"])?)
        } else {
            gen_json(u, 2)?
        };
        jwt.insert("sub".into(), sub);
    }
    let mut params = Map::new();
    for _ in 0..u.int_in_range(0..=4)? {
        params.insert(gen_column(u)?, gen_json(u, 1)?);
    }
    jwt.insert(
        "parameters".into(),
        if u.ratio(1, 10)? { gen_json(u, 2)? } else { Value::Object(params) },
    );
    for key in ["project_ids", "orgs", "role", "tags"] {
        if u.arbitrary()? {
            jwt.insert(key.into(), gen_json(u, 1)?);
        }
    }
    let client = if u.ratio(1, 5)? {
        None
    } else if u.ratio(1, 10)? {
        Some(gen_json(u, 1)?)
    } else {
        let mut m = Map::new();
        for _ in 0..u.int_in_range(0..=4)? {
            let key = if u.arbitrary()? {
                (*u.choose(&["list_ids", "tags", "device_id", "mode", "x", "list_id"])?).to_string()
            } else {
                gen_column(u)?
            };
            m.insert(key, gen_json(u, 1)?);
        }
        Some(Value::Object(m))
    };
    Ok((Value::Object(jwt), client))
}

/// Request time: the rules crate keeps this in one place for the fuzz targets and its smoke test.
pub use ferrosync_rules::fuzz_support::run_querier;

/// Replication + request time for a set of rows: evaluate_row, evaluate_parameter_row (whose
/// output feeds the lookups), querier + resolve. `extra` adds arbitrary stored JSON per lookup.
fn exercise(rules: &SyncRules, rows: &[(SourceTableName, Row)], requests: Vec<(Value, Option<Value>)>, extra: &[String]) {
    let _ = rules.warnings();
    let _ = rules.bucket_sources();
    let _ = rules.compatibility();
    let mut stored: HashMap<LookupKey, Vec<String>> = HashMap::new();
    for (table, row) in rows {
        let _ = rules.is_table_used(table);
        for r in rules.evaluate_row(table, row).into_iter().flatten() {
            assert!(serde_json::from_str::<Value>(&r.data).is_ok(), "row data is not JSON: {}", r.data);
        }
        for p in rules.evaluate_parameter_row(table, row).into_iter().flatten() {
            assert!(
                serde_json::from_str::<Value>(&p.bucket_parameters).is_ok(),
                "bucket_parameters is not JSON: {}",
                p.bucket_parameters
            );
            let entry = stored.entry(p.lookup).or_default();
            entry.push(p.bucket_parameters);
            entry.extend(extra.iter().cloned());
        }
    }
    for (jwt, client) in requests {
        run_querier(rules, jwt, client, &stored);
    }
}

/// Fixed rows and requests for configs whose SQL came from the fuzzer.
fn exercise_fixed(rules: &SyncRules) {
    let values = [
        SqliteValue::Text("u1".into()),
        SqliteValue::Integer(1),
        SqliteValue::Null,
        SqliteValue::Real(2.5),
        SqliteValue::Text("[\"u1\",2,{\"a\":1}]".into()),
        SqliteValue::Blob(vec![0xff, 0x00, 0xc3]),
        SqliteValue::Integer(i64::MIN),
        SqliteValue::Real(f64::NAN),
        SqliteValue::Text("{\"a\":{\"b\":[1,2]},\"x\":\"y\"}".into()),
    ];
    let patterns = rules.source_patterns();
    let mut rows = Vec::new();
    for (i, p) in patterns.iter().take(8).enumerate() {
        let table = SourceTableName {
            connection_tag: p.connection_tag().to_string(),
            schema: p.schema().trim_end_matches('%').to_string(),
            name: format!("{}{}", p.name_or_prefix(), if p.is_wildcard() { "x1" } else { "" }),
        };
        for shift in 0..3 {
            let mut row = Row::new();
            for (j, c) in COLUMNS.iter().enumerate() {
                row.push(*c, values[(i + j + shift * 4) % values.len()].clone());
            }
            rows.push((table.clone(), row));
        }
    }
    let requests = vec![
        (
            json!({"sub": "u1", "parameters": {"org_id": "o1", "is_admin": true, "n": 2}, "project_ids": [1, "p2"], "orgs": ["o1"]}),
            Some(json!({"list_ids": ["l1", 2], "device_id": "d1", "tags": ["a"], "mode": 1})),
        ),
        (json!({"sub": 12.5}), None),
        (json!({}), Some(json!([1]))),
    ];
    exercise(
        rules,
        &rows,
        requests,
        &["[{\"list_id\":\"l1\"}]".to_string(), "not json".to_string()],
    );
}

thread_local! {
    /// The configs of `CONFIGS` that parse, unversioned and versioned (parsed once).
    static PARSED: Vec<SyncRules> = CONFIGS
        .iter()
        .flat_map(|(_, yaml)| [false, true].map(|versioned| SyncRules::parse(yaml, &options(versioned)).ok()))
        .flatten()
        .collect();
}

fn evaluate_inner(u: &mut Unstructured) -> Result<()> {
    PARSED.with(|parsed| evaluate_with(u, parsed))
}

fn evaluate_with(u: &mut Unstructured, parsed: &[SyncRules]) -> Result<()> {
    let rules = u.choose(parsed)?;
    let mut rows = Vec::new();
    for _ in 0..u.int_in_range(1..=4)? {
        let table = gen_table(u, rules)?;
        rows.push((table, gen_row(u)?));
    }
    let mut requests = Vec::new();
    for _ in 0..u.int_in_range(1..=2)? {
        requests.push(gen_claims(u)?);
    }
    let mut extra = Vec::new();
    for _ in 0..u.int_in_range(0..=2)? {
        extra.push(if u.arbitrary()? {
            gen_json(u, 0)?.to_string()
        } else {
            gen_text(u)?
        });
    }
    exercise(rules, &rows, requests, &extra);
    Ok(())
}

/// Target `evaluate`: fixed valid configs, arbitrary rows, JWT claims and client parameters.
#[doc(hidden)]
pub fn evaluate(data: &[u8]) {
    let _ = evaluate_inner(&mut Unstructured::new(data));
}

/// Target `service_config`: arbitrary bytes as powersync.yaml / JSON.
///
/// `sync_config.path` makes the loader read a file: inputs that could spell the key `path`
/// (the word itself, or any backslash escape) are skipped so the fuzzer never reads
/// `/dev/zero` or similar. The YAML escapes themselves are covered by `parse_config`.
#[doc(hidden)]
pub fn service_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if text.contains('\\') || text.to_ascii_lowercase().contains("path") {
        return;
    }
    let env = |name: &str| match name {
        "PS_PORT" => Some("8080".to_string()),
        "PS_URI" => Some("postgresql://u:p@localhost:5432/db".to_string()),
        "PS_FLAG" => Some("true".to_string()),
        _ => None,
    };
    let base = Path::new("nonexistent-ferrosync-fuzz-dir");
    for format in [ferrosync_config::ConfigFormat::Auto, ferrosync_config::ConfigFormat::Json] {
        if let Ok(loaded) = ferrosync_config::load_config_str(&text, format, base, &env) {
            let _ = format!("{:?}", loaded.config);
        }
    }
}
