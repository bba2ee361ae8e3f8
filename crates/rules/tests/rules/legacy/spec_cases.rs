//! The spec's §7.1 cases of the legacy dialect, numbered as there.

use super::*;

// 1
#[test]
fn global_bucket() {
    let rules = parse("bucket_definitions:\n  mybucket:\n    data:\n      - SELECT id, description FROM assets\n");
    let rows = eval(&rules, "assets", &row(&[("id", t("asset1")), ("description", t("test"))]));
    assert_eq!(
        rows,
        vec![EvaluatedRow {
            bucket: "mybucket[]".into(),
            table: "assets".into(),
            id: "asset1".into(),
            data: r#"{"id":"asset1","description":"test"}"#.into(),
        }]
    );
    let q = rules.querier(&RequestParameters::new(json!({"sub": "u"}), None), &StreamsRequest::default());
    assert_eq!(
        q.static_buckets(),
        &[BucketDescription {
            bucket: "mybucket[]".into(),
            priority: 3,
            reasons: vec![BucketReason::Default(0)]
        }]
    );
    assert!(q.missing_lookups(&HashMap::new()).is_empty());
    assert_eq!(rules.bucket_sources()[0].name, "mybucket");
    assert!(rules.evaluate_row(&table("other"), &row(&[("id", t("x"))])).is_empty());
    assert!(rules.is_table_used(&table("assets")));
    assert!(!rules.is_table_used(&table("other")));
}

// 2
#[test]
fn static_filter() {
    let rules = parse("bucket_definitions:\n  mybucket:\n    parameters: SELECT WHERE token_parameters.is_admin\n    data: []\n");
    let p = |params: serde_json::Value| static_buckets(&rules, json!({"sub": "u", "parameters": params}), None);
    assert_eq!(p(json!({"is_admin": true})), vec!["mybucket[]"]);
    assert!(p(json!({"is_admin": false})).is_empty());
    assert!(p(json!({})).is_empty());
}

// 3
#[test]
fn token_and_user_parameters() {
    let rules = parse(
        r#"
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.user_id, user_parameters.device_id
    data:
      - SELECT id, description FROM assets WHERE assets.user_id = bucket.user_id AND assets.device_id = bucket.device_id AND NOT assets.archived
"#,
    );
    assert_eq!(
        static_buckets(&rules, json!({"sub": "user1"}), Some(json!({"device_id": "device1"}))),
        vec![r#"mybucket["user1","device1"]"#]
    );
    let r = row(&[("id", t("a1")), ("user_id", t("user1")), ("device_id", t("device1"))]);
    assert_eq!(buckets_of(&eval(&rules, "assets", &r)), vec![r#"mybucket["user1","device1"]"#]);
    let archived = row(&[
        ("id", t("a1")),
        ("user_id", t("user1")),
        ("device_id", t("device1")),
        ("archived", i(1)),
    ]);
    assert!(eval(&rules, "assets", &archived).is_empty());
    // user_parameters only: the dangerous-query warning is reported.
    let dangerous = parse("bucket_definitions:\n  b:\n    parameters: SELECT user_parameters.x AS x\n    data: []\n");
    assert!(dangerous.warnings()[0].message.starts_with("Potentially dangerous query"));
    assert!(rules.warnings().is_empty());
    let accepted = parse(
        "bucket_definitions:\n  b:\n    accept_potentially_dangerous_queries: true\n    parameters: SELECT user_parameters.x AS x\n    data: []\n",
    );
    assert!(accepted.warnings().is_empty());
}

// 4
#[test]
fn functions_on_both_sides() {
    let rules = parse(
        r#"
bucket_definitions:
  mybucket:
    parameters: SELECT upper(token_parameters.user_id) AS user_id
    data:
      - SELECT id, upper(description) AS description_upper FROM assets WHERE upper(assets.user_id) = bucket.user_id
"#,
    );
    assert_eq!(static_buckets(&rules, json!({"sub": "user1"}), None), vec![r#"mybucket["USER1"]"#]);
    let rows = eval(
        &rules,
        "assets",
        &row(&[("id", t("a")), ("description", t("test")), ("user_id", t("user1"))]),
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].bucket, r#"mybucket["USER1"]"#);
    assert_eq!(rows[0].data, r#"{"id":"a","description_upper":"TEST"}"#);
}

// 5
#[test]
fn in_over_row_json_array() {
    let rules = parse(
        r#"
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.region_id
    data:
      - SELECT id FROM assets WHERE bucket.region_id IN assets.region_ids
"#,
    );
    let rows = eval(
        &rules,
        "assets",
        &row(&[("id", t("a")), ("region_ids", t(r#"["region1","region2"]"#))]),
    );
    assert_eq!(buckets_of(&rows), vec![r#"mybucket["region1"]"#, r#"mybucket["region2"]"#]);
    // Non-JSON text is a row evaluation error, not a panic.
    let errs = rules.evaluate_row(&table("assets"), &row(&[("id", t("a")), ("region_ids", t("nope"))]));
    assert_eq!(errs.len(), 1);
    assert!(errs[0].is_err());
}

// 6
#[test]
fn boolean_parameter() {
    let rules = parse(
        r#"
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.is_admin
    data:
      - SELECT id, role FROM assets WHERE bucket.is_admin
      - SELECT id, role FROM assets WHERE (bucket.is_admin OR bucket.is_admin = false) AND assets.role != 'admin'
"#,
    );
    let rows = eval(&rules, "assets", &row(&[("id", t("a")), ("role", t("normal"))]));
    assert_eq!(buckets_of(&rows), vec!["mybucket[1]", "mybucket[1]", "mybucket[0]"]);
    assert_eq!(
        static_buckets(&rules, json!({"sub": "u", "parameters": {"is_admin": true}}), None),
        vec!["mybucket[1]"]
    );
    let admin = eval(&rules, "assets", &row(&[("id", t("a")), ("role", t("admin"))]));
    assert_eq!(buckets_of(&admin), vec!["mybucket[1]"]);
}

// 7
#[test]
fn math() {
    let rules = parse(
        "bucket_definitions:\n  mybucket:\n    data:\n      - SELECT id, (5 / 2) AS int, (5 / 2.0) AS float, (CAST(5 AS real) / 2) AS float2 FROM assets\n",
    );
    let rows = eval(&rules, "assets", &row(&[("id", t("a"))]));
    assert_eq!(rows[0].data, r#"{"id":"a","int":2,"float":2.5,"float2":2.5}"#);
}

// 8
#[test]
fn numeric_parameters() {
    let rules = parse(
        r#"
bucket_definitions:
  mybucket:
    parameters: SELECT token_parameters.int1, token_parameters.float1, token_parameters.float2
    data:
      - SELECT * FROM assets WHERE assets.int1 = bucket.int1 AND assets.float1 = bucket.float1 AND assets.float2 = bucket.float2
"#,
    );
    assert_eq!(
        static_buckets(
            &rules,
            json!({"sub": "u", "parameters": {"int1": 314, "float1": 3.14, "float2": 314}}),
            None
        ),
        vec!["mybucket[314,3.14,314]"]
    );
    let r = row(&[
        ("id", t("a")),
        ("int1", i(314)),
        ("float1", SqliteValue::Real(3.14)),
        ("float2", SqliteValue::Real(314.0)),
    ]);
    let rows = eval(&rules, "assets", &r);
    assert_eq!(buckets_of(&rows), vec!["mybucket[314,3.14,314]"]);
    assert_eq!(rows[0].data, r#"{"id":"a","int1":314,"float1":3.14,"float2":314.0}"#);
}

// 9
#[test]
fn json_extraction_legacy() {
    let rules = parse(
        r#"
bucket_definitions:
  mybucket:
    data:
      - SELECT id, data ->> 'count' AS count, data -> 'bool' AS bool1, data ->> 'bool' AS bool2, 'true' ->> '$' AS bool3, json_extract(data, '$.bool') AS bool4 FROM assets
"#,
    );
    let rows = eval(&rules, "assets", &row(&[("id", t("a")), ("data", t(r#"{"count":5,"bool":true}"#))]));
    assert_eq!(rows[0].data, r#"{"id":"a","count":5,"bool1":"true","bool2":1,"bool3":1,"bool4":1}"#);
}

// 10
#[test]
fn custom_id_and_alias() {
    let rules = parse(
        r#"
bucket_definitions:
  mybucket:
    data:
      - SELECT client_id AS id, description, '1' AS rule FROM assets_123 AS assets WHERE assets.archived = false
"#,
    );
    let r = row(&[
        ("id", t("internal")),
        ("client_id", t("c1")),
        ("description", t("d")),
        ("archived", i(0)),
    ]);
    let rows = eval(&rules, "assets_123", &r);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].table, "assets");
    assert_eq!(rows[0].id, "c1");
    assert_eq!(rows[0].data, r#"{"id":"c1","description":"d","rule":"1"}"#);
}

// 11
#[test]
fn wildcard_with_suffix() {
    let rules = parse(
        r#"
bucket_definitions:
  mybucket:
    data:
      - SELECT client_id AS id, description, _table_suffix AS suffix, * FROM "assets_%" AS assets WHERE assets.archived = false AND _table_suffix > '100'
"#,
    );
    let r = row(&[
        ("id", t("internal")),
        ("client_id", t("c1")),
        ("description", t("d")),
        ("archived", i(0)),
        ("other_id", t("o")),
        ("_hidden", t("h")),
    ]);
    let rows = eval(&rules, "assets_123", &r);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].table, "assets");
    assert_eq!(rows[0].id, "c1");
    assert_eq!(
        rows[0].data,
        r#"{"id":"c1","description":"d","suffix":"123","client_id":"c1","archived":0,"other_id":"o"}"#
    );
    assert!(eval(&rules, "assets_050", &r).is_empty());
    assert!(eval(&rules, "other", &r).is_empty());
    let p = &rules.source_patterns()[0];
    assert!(p.is_wildcard());
    assert_eq!(p.name_or_prefix(), "assets_");
    assert_eq!(p.schema(), "test_schema");
    assert_eq!(p.connection_tag(), "default");
}

// 12
#[test]
fn unaliased_percent_wildcard() {
    let rules =
        parse("bucket_definitions:\n  mybucket:\n    data:\n      - SELECT *, _table_suffix AS suffix FROM \"%\" WHERE archived = false\n");
    let rows = eval(&rules, "assets", &row(&[("id", t("a")), ("archived", i(0))]));
    assert_eq!(rows[0].table, "assets");
    assert_eq!(rows[0].data, r#"{"id":"a","archived":0,"suffix":"assets"}"#);
}

// 13
#[test]
fn schema_filtering() {
    for (from, matches) in [
        (r#""assets""#, true),
        (r#""test_schema"."assets""#, true),
        (r#""default.test_schema"."assets""#, true),
        (r#""other"."assets""#, false),
        (r#""other.test_schema"."assets""#, false),
    ] {
        let rules = parse(&format!("bucket_definitions:\n  b:\n    data:\n      - 'SELECT id FROM {from}'\n"));
        assert_eq!(
            rules.evaluate_row(&table("assets"), &row(&[("id", t("a"))])).len(),
            usize::from(matches),
            "{from}"
        );
    }
}

// 14
#[test]
fn table_parameter_query_lookup() {
    let rules = parse(
        r#"
bucket_definitions:
  mybucket:
    parameters: SELECT FROM users WHERE users.id = token_parameters.user_id AND users.is_admin
    data: []
"#,
    );
    let out = rules.evaluate_parameter_row(&table("users"), &row(&[("id", t("user1")), ("is_admin", i(1))]));
    let out: Vec<_> = out.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{e}"))).collect();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].lookup.as_str(), r#"["mybucket","1","user1"]"#);
    assert_eq!(out[0].bucket_parameters, "[{}]");
    assert!(rules
        .evaluate_parameter_row(&table("users"), &row(&[("id", t("user1")), ("is_admin", i(0))]))
        .is_empty());
    let q = rules.querier(&RequestParameters::new(json!({"sub": "user1"}), None), &StreamsRequest::default());
    assert_eq!(q.missing_lookups(&HashMap::new()), vec![out[0].lookup.clone()]);
    let mut results = HashMap::new();
    results.insert(out[0].lookup.clone(), vec![out[0].bucket_parameters.clone()]);
    assert_eq!(q.resolve(&results)[0].bucket, "mybucket[]");
    assert!(q.resolve(&HashMap::new()).is_empty());
}

// 15
#[test]
fn unsupported_sql() {
    let msg = |sql: &str| parse_err(&format!("bucket_definitions:\n  b:\n    parameters: {sql}\n    data: []\n"));
    assert_eq!(msg("SELECT token_parameters.user_id LIMIT 1"), vec!["LIMIT is not supported"]);
    assert_eq!(msg("SELECT token_parameters.user_id OFFSET 10"), vec!["LIMIT is not supported"]);
    assert_eq!(msg("SELECT DISTINCT token_parameters.user_id"), vec!["DISTINCT is not supported"]);
    assert_eq!(msg("SELECT id FROM users ORDER BY id"), vec!["ORDER BY is not supported"]);
    assert_eq!(msg("SELECT id FROM users GROUP BY id"), vec!["GROUP BY is not supported"]);
}

// 16
#[test]
fn null_definition() {
    assert_eq!(
        parse_err("bucket_definitions:\n  mybucket:\n"),
        vec!["'mybucket' bucket definition must be an object"]
    );
}
