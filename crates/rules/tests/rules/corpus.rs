//! Table-driven conformance corpus: runs every case in
//! `tests/corpus/*.yaml` and reports all failures at once.
//!
//! File format (all sections optional):
//!
//! ```yaml
//! defaults: {edition: 3, config: {...}}   # applied to every case of the file
//! expr:        # expression truth tables, wrapped into a one-table data query
//!   - {name: n, e: "upper('a')", v: A, t: text}     # v: typed value, t: typeof
//!   - {e: "x'00'", absent: true}                     # value dropped from the row
//!   - {w: "NULL OR 1", pass: true}                   # WHERE filter passes
//!   - {e: "...", text: "1e+21"}                      # raw JSON text of v
//!   - {e: "...", error: "...", parse_error: "..."}   # evaluation / compile error
//! rows:        # full config + source row -> [{bucket, table, id, data}]
//! parameters:  # full config + parameter-table row -> [{lookup, params}]
//! request:     # config + jwt + client params (+ parameter rows) -> buckets
//! errors:      # config (or `data:`/`params:`/`stream:` shorthands) -> errors/warnings
//! ```
//!
//! Values in rows: YAML integer = INTEGER, float = REAL, string = TEXT,
//! bool = INTEGER 1/0, null = NULL, `{blob: "<hex>"}` = BLOB, any other
//! sequence/map = TEXT holding its JSON. Expected values are written from the
//! spec (`/work/shared/spec`), never pasted from ferrosync's output.

use ferrosync_rules::{LookupKey, RequestParameters, Row, SqliteValue, StreamSubscription, StreamsRequest, SyncRules};
use serde::{Deserialize, Deserializer};
use serde_yaml_ng::{Mapping, Value};
use std::collections::HashMap;
use std::path::Path;

mod convert;
use convert::*;

/// The corpus must not silently shrink.
const MIN_CASES: usize = 300;

/// Keeps an explicit `null` distinct from an absent key.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CorpusFile {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    expr: Vec<ExprCase>,
    #[serde(default)]
    rows: Vec<RowsCase>,
    #[serde(default)]
    parameters: Vec<ParamCase>,
    #[serde(default)]
    request: Vec<RequestCase>,
    #[serde(default)]
    errors: Vec<ErrorCase>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Defaults {
    edition: Option<u8>,
    config: Option<Mapping>,
    options: Option<Opts>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Opts {
    default_schema: Option<String>,
    sync_rules_id: Option<u64>,
    default_storage_version: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExprCase {
    name: Option<String>,
    e: Option<String>,
    w: Option<String>,
    row: Option<Mapping>,
    config: Option<Mapping>,
    edition: Option<u8>,
    #[serde(default, deserialize_with = "present")]
    v: Option<Value>,
    #[serde(default)]
    absent: bool,
    t: Option<String>,
    text: Option<String>,
    pass: Option<bool>,
    error: Option<String>,
    parse_error: Option<String>,
    #[allow(dead_code)]
    note: Option<String>,
    pending: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RowsCase {
    name: String,
    yaml: String,
    table: Option<Value>,
    row: Mapping,
    out: Option<Vec<ExpectedRow>>,
    error: Option<String>,
    #[serde(default)]
    ordered: bool,
    options: Option<Opts>,
    #[allow(dead_code)]
    note: Option<String>,
    pending: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedRow {
    bucket: String,
    table: String,
    id: String,
    data: Option<Value>,
    data_text: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamCase {
    name: String,
    yaml: String,
    table: Option<Value>,
    row: Mapping,
    out: Option<Vec<ExpectedLookup>>,
    error: Option<String>,
    options: Option<Opts>,
    #[allow(dead_code)]
    note: Option<String>,
    pending: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedLookup {
    lookup: String,
    params: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamRow {
    table: Option<Value>,
    row: Mapping,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestCase {
    name: String,
    yaml: String,
    jwt: Option<Value>,
    params: Option<Value>,
    /// Stream subscriptions (edition 3): `[{stream, params?, priority?}]`.
    subscriptions: Option<Value>,
    #[serde(default)]
    param_rows: Vec<ParamRow>,
    buckets: Vec<Value>,
    lookups: Option<Vec<String>>,
    error: Option<String>,
    options: Option<Opts>,
    #[allow(dead_code)]
    note: Option<String>,
    pending: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorCase {
    name: String,
    yaml: Option<String>,
    data: Option<Value>,
    params: Option<Value>,
    stream: Option<String>,
    error: Option<Value>,
    warning: Option<Value>,
    #[serde(default)]
    no_warnings: bool,
    #[serde(default)]
    ok: bool,
    options: Option<Opts>,
    #[allow(dead_code)]
    note: Option<String>,
    pending: Option<String>,
}

// ---------------------------------------------------------------------------
// The request-time API: the only place that calls the querier, so that API
// changes (stream subscriptions, multi-stage lookups) touch one function.

struct RequestOutcome {
    buckets: Vec<(String, u8)>,
    lookups: Vec<String>,
    errors: Vec<String>,
}

fn run_request(
    rules: &SyncRules,
    jwt: serde_json::Value,
    params: Option<serde_json::Value>,
    subscriptions: Option<&serde_json::Value>,
    stored: &HashMap<LookupKey, Vec<String>>,
) -> RequestOutcome {
    let streams = StreamsRequest {
        include_defaults: true,
        subscriptions: subscriptions
            .and_then(|s| s.as_array())
            .into_iter()
            .flatten()
            .map(|s| StreamSubscription {
                stream: s.get("stream").and_then(|v| v.as_str()).unwrap_or_default().to_string(),
                parameters: s.get("params").cloned(),
                override_priority: s.get("priority").and_then(|v| v.as_u64()).map(|p| p as u8),
            })
            .collect(),
    };
    let querier = rules.querier(&RequestParameters::new(jwt, params), &streams);
    let lookups = querier
        .missing_lookups(&HashMap::new())
        .iter()
        .map(|l| l.as_str().to_string())
        .collect();
    // Lookups come in rounds (nested subqueries): fetch from `stored` until nothing is missing.
    let mut known = HashMap::new();
    for _ in 0..16 {
        let missing = querier.missing_lookups(&known);
        if missing.is_empty() {
            break;
        }
        for l in missing {
            let rows = stored.get(&l).cloned().unwrap_or_default();
            known.insert(l, rows);
        }
    }
    let buckets = querier.resolve(&known).into_iter().map(|b| (b.bucket, b.priority)).collect();
    let stream_errors = querier.streams().iter().flat_map(|s| s.errors.iter().map(|e| e.message.clone()));
    RequestOutcome {
        buckets,
        lookups,
        errors: querier.errors().iter().cloned().chain(stream_errors).collect(),
    }
}

// ---------------------------------------------------------------------------
// Case runners: Ok(()) or a failure description.

fn check_value(expected: &Value, raw: &str) -> Result<(), String> {
    let actual: serde_json::Value = serde_json::from_str(raw).map_err(|e| format!("bad JSON {raw}: {e}"))?;
    let want = to_json(expected)?;
    if actual != want {
        return Err(format!("expected v = {want} got {raw}"));
    }
    Ok(())
}

fn run_expr(c: &ExprCase, d: &Defaults) -> Result<(), String> {
    let sql = match (&c.e, &c.w) {
        (Some(e), None) if c.t.is_some() => format!("SELECT id, typeof({e}) AS t, {e} AS v FROM t"),
        (Some(e), None) => format!("SELECT id, {e} AS v FROM t"),
        (None, Some(w)) => format!("SELECT id FROM t WHERE {w}"),
        _ => return Err("an expr case needs exactly one of e / w".into()),
    };
    let yaml = single_query(&sql, d, c.config.as_ref(), c.edition);
    let o = options(d, None);
    let rules = match SyncRules::parse(&yaml, &o) {
        Ok(r) => r,
        Err(e) => {
            let msgs: Vec<String> = e.errors.iter().map(|i| i.message.clone()).collect();
            return match &c.parse_error {
                Some(want) if msgs.iter().any(|m| m.contains(want.as_str())) => Ok(()),
                Some(want) => Err(format!("expected parse error {want:?}, got {msgs:?}")),
                None => Err(format!("unexpected parse error {msgs:?}")),
            };
        }
    };
    if let Some(want) = &c.parse_error {
        return Err(format!("expected parse error {want:?}, but the query compiled"));
    }
    let mut row = Row::new();
    row.push("id", SqliteValue::Text("r1".into()));
    if let Some(m) = &c.row {
        for (k, v) in row_of(m)?.iter() {
            row.set(k, v.clone());
        }
    }
    let results = rules.evaluate_row(&table_of(None, &o.default_schema)?, &row);
    if let Some(want) = &c.error {
        return match results.as_slice() {
            [Err(e)] if e.message.contains(want.as_str()) => Ok(()),
            other => Err(format!("expected evaluation error {want:?}, got {other:?}")),
        };
    }
    if let Some(pass) = c.pass {
        let got = match results.as_slice() {
            [] => false,
            [Ok(_)] => true,
            other => return Err(format!("unexpected results {other:?}")),
        };
        return if got == pass {
            Ok(())
        } else {
            Err(format!("expected pass = {pass}, got {got}"))
        };
    }
    let data = match results.as_slice() {
        [Ok(r)] => r.data.clone(),
        other => return Err(format!("expected one row, got {other:?}")),
    };
    let json: serde_json::Value = serde_json::from_str(&data).map_err(|e| format!("bad data JSON {data}: {e}"))?;
    if let Some(t) = &c.t {
        let got = json.get("t").and_then(|x| x.as_str()).unwrap_or("<none>");
        if got != t {
            return Err(format!("expected typeof {t}, got {got} (data {data})"));
        }
    }
    let raw = data
        .split_once(",\"v\":")
        .map(|(_, r)| r.strip_suffix('}').unwrap_or(r).to_string());
    if c.absent {
        return match raw {
            None => Ok(()),
            Some(r) => Err(format!("expected v to be absent, got {r}")),
        };
    }
    let Some(raw) = raw else {
        return Err(format!("v is absent from {data}"));
    };
    if let Some(text) = &c.text {
        if raw != *text {
            return Err(format!("expected raw JSON {text}, got {raw}"));
        }
    }
    match &c.v {
        Some(v) => check_value(v, &raw),
        None if c.text.is_some() || c.t.is_some() => Ok(()),
        None => Err("expr case without expectation".into()),
    }
}

/// JSON text with object keys sorted (key order is checked via `data_text`).
fn canonical(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", serde_json::Value::from(k.as_str()), canonical(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        serde_json::Value::Array(a) => format!("[{}]", a.iter().map(canonical).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

fn row_line(bucket: &str, table: &str, id: &str, data: Option<&serde_json::Value>) -> String {
    match data {
        Some(d) => format!("{bucket} | {table} | {id} | {}", canonical(d)),
        None => format!("{bucket} | {table} | {id}"),
    }
}

fn run_rows(c: &RowsCase, d: &Defaults) -> Result<(), String> {
    let o = options(d, c.options.as_ref());
    let rules = parse_rules(&full_yaml(&c.yaml, d)?, &o)?;
    let t = table_of(c.table.as_ref(), &o.default_schema)?;
    let results = rules.evaluate_row(&t, &row_of(&c.row)?);
    let out = c.out.as_deref().unwrap_or_default();
    // Data is compared only when every expected row states it.
    let with_data = out.iter().all(|r| r.data.is_some());
    let mut errors = Vec::new();
    let mut actual = Vec::new();
    let mut texts = Vec::new();
    for r in &results {
        match r {
            Err(e) => errors.push(e.message.clone()),
            Ok(r) => {
                let data: serde_json::Value = serde_json::from_str(&r.data).map_err(|e| format!("bad data {}: {e}", r.data))?;
                actual.push(row_line(&r.bucket, &r.table, &r.id, with_data.then_some(&data)));
                texts.push(r.data.clone());
            }
        }
    }
    match (&c.error, errors.as_slice()) {
        (None, []) => {}
        (Some(want), errs) if errs.iter().any(|e| e.contains(want.as_str())) => {}
        (want, errs) => return Err(format!("expected error {want:?}, got {errs:?}")),
    }
    let mut expected = Vec::new();
    for r in out {
        let data = r.data.as_ref().map(to_json).transpose()?;
        expected.push(row_line(&r.bucket, &r.table, &r.id, data.as_ref()));
        if let Some(text) = &r.data_text {
            if !texts.contains(text) {
                return Err(format!("expected data text {text}, got {texts:?}"));
            }
        }
    }
    if !c.ordered {
        expected.sort();
        actual.sort();
    }
    if actual != expected {
        return Err(format!("expected rows {expected:#?}\n got {actual:#?}"));
    }
    Ok(())
}

fn run_params(c: &ParamCase, d: &Defaults) -> Result<(), String> {
    let o = options(d, c.options.as_ref());
    let rules = parse_rules(&full_yaml(&c.yaml, d)?, &o)?;
    let t = table_of(c.table.as_ref(), &o.default_schema)?;
    let mut errors = Vec::new();
    let mut actual = Vec::new();
    for r in rules.evaluate_parameter_row(&t, &row_of(&c.row)?) {
        match r {
            Err(e) => errors.push(e.message),
            Ok(p) => {
                let params: serde_json::Value = serde_json::from_str(&p.bucket_parameters).map_err(|e| e.to_string())?;
                actual.push(format!("{} -> {params}", p.lookup.as_str()));
            }
        }
    }
    match (&c.error, errors.as_slice()) {
        (None, []) => {}
        (Some(want), errs) if errs.iter().any(|e| e.contains(want.as_str())) => {}
        (want, errs) => return Err(format!("expected error {want:?}, got {errs:?}")),
    }
    let mut expected = Vec::new();
    for l in c.out.as_deref().unwrap_or_default() {
        expected.push(format!("{} -> {}", l.lookup, to_json(&l.params)?));
    }
    expected.sort();
    actual.sort();
    if actual != expected {
        return Err(format!("expected lookups {expected:#?}\n got {actual:#?}"));
    }
    Ok(())
}

fn run_request_case(c: &RequestCase, d: &Defaults) -> Result<(), String> {
    let o = options(d, c.options.as_ref());
    let rules = parse_rules(&full_yaml(&c.yaml, d)?, &o)?;
    let mut stored: HashMap<LookupKey, Vec<String>> = HashMap::new();
    for pr in &c.param_rows {
        let t = table_of(pr.table.as_ref(), &o.default_schema)?;
        for r in rules.evaluate_parameter_row(&t, &row_of(&pr.row)?) {
            let p = r.map_err(|e| format!("parameter row error: {e}"))?;
            stored.entry(p.lookup).or_default().push(p.bucket_parameters);
        }
    }
    let jwt = match &c.jwt {
        Some(j) => to_json(j)?,
        None => serde_json::json!({"sub": "user1"}),
    };
    let params = c.params.as_ref().map(to_json).transpose()?;
    let subs = c.subscriptions.as_ref().map(to_json).transpose()?;
    let outcome = run_request(&rules, jwt, params, subs.as_ref(), &stored);
    match (&c.error, outcome.errors.as_slice()) {
        (None, []) => {}
        (Some(want), errs) if errs.iter().any(|e| e.contains(want.as_str())) => {}
        (want, errs) => return Err(format!("expected request error {want:?}, got {errs:?}")),
    }
    let with_priority = c.buckets.iter().any(|b| b.is_mapping());
    let mut expected = Vec::new();
    for b in &c.buckets {
        expected.push(match b {
            Value::String(s) => s.clone(),
            Value::Mapping(m) => {
                let bucket = m.get("bucket").and_then(Value::as_str).ok_or("bucket entry needs `bucket`")?;
                let p = m.get("priority").and_then(Value::as_u64).unwrap_or(3);
                format!("{bucket} @{p}")
            }
            other => return Err(format!("bad bucket entry {other:?}")),
        });
    }
    let mut actual: Vec<String> = outcome
        .buckets
        .iter()
        .map(|(b, p)| if with_priority { format!("{b} @{p}") } else { b.clone() })
        .collect();
    expected.sort();
    actual.sort();
    if actual != expected {
        return Err(format!("expected buckets {expected:?} got {actual:?}"));
    }
    if let Some(want) = &c.lookups {
        let mut want = want.clone();
        let mut got = outcome.lookups.clone();
        want.sort();
        got.sort();
        if want != got {
            return Err(format!("expected lookups {want:?} got {got:?}"));
        }
    }
    Ok(())
}

fn run_error(c: &ErrorCase, d: &Defaults) -> Result<(), String> {
    let yaml = match (&c.yaml, &c.data, &c.params, &c.stream) {
        (Some(y), None, None, None) => full_yaml(y, d)?,
        (None, _, _, Some(sql)) => single_query(sql, d, None, Some(d.edition.unwrap_or(3))),
        (None, data, params, None) => {
            let mut b = Mapping::new();
            if let Some(p) = params {
                b.insert(
                    "parameters".into(),
                    Value::Sequence(strings(p).into_iter().map(Value::from).collect()),
                );
            }
            let data = data.as_ref().map(strings).unwrap_or_default();
            b.insert("data".into(), Value::Sequence(data.into_iter().map(Value::from).collect()));
            let mut defs = Mapping::new();
            defs.insert("mybucket".into(), Value::Mapping(b));
            let mut root = Mapping::new();
            root.insert("bucket_definitions".into(), Value::Mapping(defs));
            yaml_text(&with_config(root, d, None, None))
        }
        _ => return Err("an errors case needs yaml, stream, or data/params".into()),
    };
    let o = options(d, c.options.as_ref());
    let wanted_errors = c.error.as_ref().map(strings).unwrap_or_default();
    let wanted_warnings = c.warning.as_ref().map(strings).unwrap_or_default();
    match SyncRules::parse(&yaml, &o) {
        Err(e) => {
            let msgs: Vec<String> = e.errors.iter().map(|i| i.message.clone()).collect();
            if wanted_errors.is_empty() {
                return Err(format!("expected success, got errors {msgs:?}"));
            }
            for w in &wanted_errors {
                if !msgs.iter().any(|m| m.contains(w.as_str())) {
                    return Err(format!("expected an error containing {w:?}, got {msgs:?}"));
                }
            }
            Ok(())
        }
        Ok(rules) => {
            if !wanted_errors.is_empty() {
                return Err(format!("expected errors {wanted_errors:?}, but the config parsed"));
            }
            let msgs: Vec<String> = rules.warnings().iter().map(|i| i.message.clone()).collect();
            for w in &wanted_warnings {
                if !msgs.iter().any(|m| m.contains(w.as_str())) {
                    return Err(format!("expected a warning containing {w:?}, got {msgs:?}"));
                }
            }
            if c.no_warnings && !msgs.is_empty() {
                return Err(format!("expected no warnings, got {msgs:?}"));
            }
            if !c.ok && wanted_warnings.is_empty() && !c.no_warnings {
                return Err("errors case without expectation (use ok/no_warnings/error/warning)".into());
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------

struct Tally {
    run: usize,
    pending: Vec<String>,
    failures: Vec<String>,
    names: HashMap<String, usize>,
}

impl Tally {
    fn case(&mut self, file: &str, name: &str, pending: Option<&String>, f: impl FnOnce() -> Result<(), String>) {
        let full = format!("{file}::{name}");
        *self.names.entry(full.clone()).or_default() += 1;
        if let Some(reason) = pending {
            self.pending.push(format!("{full}: {reason}"));
            return;
        }
        self.run += 1;
        if let Err(e) = f() {
            self.failures.push(format!("{full}\n    {}", e.replace('\n', "\n    ")));
        }
    }
}

#[test]
fn corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut tally = Tally {
        run: 0,
        pending: Vec::new(),
        failures: Vec::new(),
        names: HashMap::new(),
    };
    let mut per_file = Vec::new();
    for path in &files {
        let file = path.file_stem().and_then(|s| s.to_str()).unwrap_or("?").to_string();
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let corpus: CorpusFile = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let d = &corpus.defaults;
        let before = (tally.run, tally.pending.len());
        for c in &corpus.expr {
            let name = c
                .name
                .clone()
                .or_else(|| c.e.clone())
                .or_else(|| c.w.as_ref().map(|w| format!("where {w}")))
                .unwrap_or_default();
            tally.case(&file, &name, c.pending.as_ref(), || run_expr(c, d));
        }
        for c in &corpus.rows {
            tally.case(&file, &c.name, c.pending.as_ref(), || run_rows(c, d));
        }
        for c in &corpus.parameters {
            tally.case(&file, &c.name, c.pending.as_ref(), || run_params(c, d));
        }
        for c in &corpus.request {
            tally.case(&file, &c.name, c.pending.as_ref(), || run_request_case(c, d));
        }
        for c in &corpus.errors {
            tally.case(&file, &c.name, c.pending.as_ref(), || run_error(c, d));
        }
        per_file.push(format!(
            "{file}: {} run, {} pending",
            tally.run - before.0,
            tally.pending.len() - before.1
        ));
    }
    println!("corpus: {} cases run", tally.run);
    for line in &per_file {
        println!("  {line}");
    }
    for p in &tally.pending {
        println!("  pending {p}");
    }
    let dupes: Vec<&String> = tally.names.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k).collect();
    let mut problems = tally.failures;
    if !dupes.is_empty() {
        problems.push(format!("duplicate case names: {dupes:?}"));
    }
    if tally.run < MIN_CASES {
        problems.push(format!("only {} cases ran, at least {MIN_CASES} expected", tally.run));
    }
    if !problems.is_empty() {
        panic!(
            "{} corpus problem(s) ({} cases run):\n{}",
            problems.len(),
            tally.run,
            problems.join("\n")
        );
    }
}
