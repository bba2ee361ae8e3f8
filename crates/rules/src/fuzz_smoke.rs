//! Stable-toolchain stand-in for the cargo-fuzz targets in `fuzz/` (which need nightly): every
//! seed in `fuzz/corpus` goes through the same public calls as the targets, plus a few thousand
//! pseudo-random mutations of them (xorshift, so every run is the same). The property is the
//! fuzzers' one: errors are fine, panics are not. Keep the calls in line with `fuzz/src/lib.rs`.

use crate::fuzz_support::run_querier;
use crate::{LookupKey, Row, SourceTableName, SqliteValue, SyncRules, SyncRulesOptions};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Sorted (file name, contents) of a folder under `fuzz/`.
fn files(sub: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join(sub);
    let mut out: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no files in {}", dir.display());
    out
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn options(versioned: bool) -> SyncRulesOptions {
    SyncRulesOptions {
        default_schema: "public".to_string(),
        sync_rules_id: 7,
        default_storage_version: if versioned { 2 } else { 1 },
        prefix_ids: Default::default(),
    }
}

/// Same as `fuzz/src/lib.rs::yaml_quote`.
fn yaml_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xFFFF => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push_str(&format!("\\U{:08X}", c as u32)),
        }
    }
    out + "\""
}

/// Same as `fuzz/src/lib.rs::splice` (templates sorted by name).
fn splice(templates: &[(String, Vec<u8>)], data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(5, '\n');
    let head = lines.next().unwrap_or("").trim();
    let template = templates
        .iter()
        .find(|(name, _)| name.strip_suffix(".yaml") == Some(head))
        .unwrap_or_else(|| &templates[head.bytes().map(usize::from).sum::<usize>() % templates.len()]);
    let mut yaml = String::from_utf8_lossy(&template.1).into_owned();
    for i in 0..4 {
        yaml = yaml.replace(&format!("{{{{Q{i}}}}}"), &yaml_quote(lines.next().unwrap_or("")));
    }
    yaml
}

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
];

fn random_value(rng: &mut XorShift) -> SqliteValue {
    let texts = [
        "",
        "u1",
        "[1,2,3]",
        "[\"u1\",\"l1\"]",
        "{\"a\":{\"b\":1},\"x\":[1]}",
        "{\"a\":1,\"a\":2}",
        "1e999",
        " \u{feff}12abc",
        "é\u{0}\u{1F600}",
        "$.a.b",
        "[[[[",
    ];
    match rng.below(8) {
        0 => SqliteValue::Null,
        1 => SqliteValue::Integer(rng.next() as i64),
        2 => SqliteValue::Integer(*rng.pick(&[0, 1, -1, i64::MAX, i64::MIN, (1 << 53) + 1])),
        3 => SqliteValue::Real(f64::from_bits(rng.next())),
        4 => SqliteValue::Real(*rng.pick(&[0.5, -0.0, 1e21, f64::NAN, f64::INFINITY, f64::MAX, 5e-324])),
        5 => SqliteValue::Text((*rng.pick(&texts)).to_string()),
        6 => {
            let n = rng.below(3000);
            SqliteValue::Text(format!("{}{}", "[".repeat(n), "]".repeat(n)))
        }
        _ => SqliteValue::Blob((0..rng.below(8)).map(|_| rng.next() as u8).collect()),
    }
}

fn random_row(rng: &mut XorShift) -> Row {
    let mut row = Row::new();
    for _ in 0..rng.below(12) {
        row.push(*rng.pick(COLUMNS), random_value(rng));
    }
    row
}

fn random_json(rng: &mut XorShift) -> Value {
    match rng.below(6) {
        0 => Value::Null,
        1 => json!(rng.next() as i64),
        2 => json!(*rng.pick(&["u1", "l1", "", "é"])),
        3 => json!([1, "l1", 2.5, null, {"a": 1}]),
        4 => json!({"a": [1, 2], "b": "x"}),
        _ => json!(true),
    }
}

/// Replication and request time for some rows of the tables the rules read.
fn exercise(rules: &SyncRules, rng: &mut XorShift, rounds: usize) {
    let _ = (rules.warnings(), rules.bucket_sources());
    let patterns = rules.source_patterns();
    let mut stored: HashMap<LookupKey, Vec<String>> = HashMap::new();
    for _ in 0..rounds {
        let table = match patterns.get(rng.below(patterns.len() + 1)) {
            Some(p) => SourceTableName {
                connection_tag: p.connection_tag().to_string(),
                schema: p.schema().trim_end_matches('%').to_string(),
                name: format!("{}{}", p.name_or_prefix(), if p.is_wildcard() { "x1" } else { "" }),
            },
            None => SourceTableName {
                connection_tag: "default".into(),
                schema: "public".into(),
                name: "other".into(),
            },
        };
        let row = random_row(rng);
        for r in rules.evaluate_row(&table, &row).into_iter().flatten() {
            assert!(serde_json::from_str::<Value>(&r.data).is_ok(), "{}", r.data);
        }
        for p in rules.evaluate_parameter_row(&table, &row).into_iter().flatten() {
            assert!(
                serde_json::from_str::<Value>(&p.bucket_parameters).is_ok(),
                "{}",
                p.bucket_parameters
            );
            stored.entry(p.lookup).or_default().push(p.bucket_parameters);
        }
    }
    for lookups in stored.values_mut() {
        lookups.push("[{\"list_id\":\"l1\"},{}]".into());
        lookups.push("not json".into());
    }
    let jwt = json!({"sub": random_json(rng), "parameters": {"org_id": random_json(rng), "is_admin": random_json(rng), "n": 1},
        "project_ids": random_json(rng), "orgs": ["o1"]});
    let client = json!({"list_ids": random_json(rng), "device_id": random_json(rng), "tags": random_json(rng), "mode": 1});
    run_querier(rules, jwt, Some(client), &stored);
    run_querier(rules, json!({}), None, &stored);
}

fn parse_and_exercise(yaml: &str, rng: &mut XorShift, rounds: usize) -> bool {
    let mut parsed = false;
    for versioned in [false, true] {
        if let Ok(rules) = SyncRules::parse(yaml, &options(versioned)) {
            parsed = true;
            exercise(&rules, rng, rounds);
        }
    }
    parsed
}

const TOKENS: &[&str] = &[
    "(",
    ")",
    "'",
    "\"",
    "->",
    "->>",
    "||",
    " IN ",
    " AND ",
    " OR ",
    " NOT ",
    "[",
    "{",
    ": ",
    "\n  ",
    "- ",
    "&a ",
    "*a",
    "!!str ",
    "SELECT ",
    " FROM ",
    " WHERE ",
    "CAST(",
    " AS INTEGER)",
    "::",
    "9223372036854775807",
    "-",
    "1e400",
    "\u{1F600}",
    "é",
    "%",
    "$1",
    "bucket.",
    "request.jwt()",
    "token_parameters.",
    "substr(",
    "json_each(",
    ",",
    "\\",
    "\t",
    "#",
];

fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(d.len() + 1);
        match rng.below(5) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 => {
                let t = rng.pick(TOKENS).as_bytes();
                d.splice(at..at, t.iter().copied());
            }
            2 if at < d.len() => {
                let end = (at + rng.below(16)).min(d.len());
                d.drain(at..end);
            }
            3 if at < d.len() => {
                let end = (at + rng.below(32)).min(d.len());
                let chunk: Vec<u8> = d[at..end].to_vec();
                for _ in 0..rng.below(20) {
                    d.splice(at..at, chunk.iter().copied());
                }
            }
            _ => d.truncate(at),
        }
    }
    d
}

#[test]
fn parse_config_seeds_and_mutations() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for (name, seed) in files("corpus/parse_config") {
        parse_and_exercise(&String::from_utf8_lossy(&seed), &mut rng, 4);
        for _ in 0..120 {
            let m = mutate(&mut rng, &seed);
            let text = String::from_utf8_lossy(&m).into_owned();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                parse_and_exercise(&text, &mut XorShift(7), 2);
            }));
            assert!(result.is_ok(), "panic on a mutation of parse_config/{name}:\n{text}");
        }
    }
}

#[test]
fn parse_config_sql_seeds_and_mutations() {
    let templates = files("templates");
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let mut parsed = 0;
    for (name, seed) in files("corpus/parse_config_sql") {
        let yaml = splice(&templates, &seed);
        if parse_and_exercise(&yaml, &mut rng, 6) {
            parsed += 1;
        } else if std::env::var_os("FUZZ_SMOKE_VERBOSE").is_some() {
            eprintln!("{name}: {}", SyncRules::parse(&yaml, &options(true)).err().unwrap());
        }
        for _ in 0..200 {
            let m = mutate(&mut rng, &seed);
            let yaml = splice(&templates, &m);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                parse_and_exercise(&yaml, &mut XorShift(11), 2);
            }));
            assert!(result.is_ok(), "panic on a mutation of parse_config_sql/{name}:\n{yaml}");
        }
    }
    assert!(parsed >= 5, "only {parsed} parse_config_sql seeds parse");
}

#[test]
fn evaluate_configs_with_random_rows() {
    let configs = files("configs");
    let mut parsed = 0;
    for (seed_name, seed) in files("corpus/evaluate") {
        let mut rng = XorShift(
            seed.iter()
                .fold(0x1234_5678_9ABC_DEF1, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01B3))
                | 1,
        );
        for (name, yaml) in &configs {
            let yaml = String::from_utf8_lossy(yaml);
            for versioned in [false, true] {
                // Every config must parse: the fuzz target would skip one that does not.
                let rules = match SyncRules::parse(&yaml, &options(versioned)) {
                    Ok(rules) => rules,
                    Err(e) => panic!("{name} (versioned: {versioned}) does not parse: {e}"),
                };
                parsed += 1;
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise(&rules, &mut rng, 60)));
                assert!(result.is_ok(), "panic evaluating {name} with rows from evaluate/{seed_name}");
            }
        }
    }
    assert!(parsed > 0);
}
