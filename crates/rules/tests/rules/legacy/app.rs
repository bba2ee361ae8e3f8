//! A todo-list app through replication and request time, and the rest of the legacy
//! dialect: moves between buckets, request functions, priorities, error messages.

use super::*;

const TODO_RULES: &str = r#"
config:
  edition: 2
bucket_definitions:
  global:
    data:
      - SELECT * FROM announcements
  user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM profiles WHERE owner_id = bucket.user_id
  by_list:
    priority: 1
    parameters: SELECT id AS list_id FROM lists WHERE owner_id = request.user_id()
    data:
      - SELECT * FROM lists WHERE id = bucket.list_id
      - SELECT * FROM todos WHERE list_id = bucket.list_id
"#;

#[test]
fn todo_app_end_to_end() {
    let opts = SyncRulesOptions {
        default_schema: "test_schema".into(),
        sync_rules_id: 7,
        default_storage_version: 2,
        prefix_ids: Default::default(),
    };
    let rules = SyncRules::parse(TODO_RULES, &opts).unwrap_or_else(|e| panic!("{e}"));
    assert!(rules.compatibility().versioned_bucket_ids);
    assert!(rules.compatibility().fixed_json_extract);
    assert_eq!(
        rules.bucket_sources(),
        &[
            BucketSourceInfo {
                name: "global".into(),
                priority: 3
            },
            BucketSourceInfo {
                name: "user".into(),
                priority: 3
            },
            BucketSourceInfo {
                name: "by_list".into(),
                priority: 1
            },
        ]
    );
    let names: Vec<_> = rules.source_patterns().iter().map(|p| p.name_or_prefix().to_string()).collect();
    assert_eq!(names, vec!["announcements", "profiles", "lists", "todos"]);

    // Replication: the list row feeds both a parameter lookup and a bucket.
    let list = row(&[("id", t("l1")), ("owner_id", t("u1")), ("name", t("Groceries"))]);
    let params: Vec<_> = rules
        .evaluate_parameter_row(&table("lists"), &list)
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(params.len(), 1);
    assert_eq!(params[0].lookup.as_str(), r#"["by_list","1","u1"]"#);
    assert_eq!(params[0].bucket_parameters, r#"[{"list_id":"l1"}]"#);
    assert_eq!(buckets_of(&eval(&rules, "lists", &list)), vec![r#"7#by_list["l1"]"#]);

    let todo = row(&[
        ("id", i(42)),
        ("list_id", t("l1")),
        ("_internal", t("x")),
        ("pic", SqliteValue::Blob(vec![1])),
    ]);
    let rows = eval(&rules, "todos", &todo);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].bucket, r#"7#by_list["l1"]"#);
    assert_eq!(rows[0].id, "42");
    assert_eq!(rows[0].data, r#"{"id":42,"list_id":"l1"}"#);

    // Request time.
    let q = rules.querier(&RequestParameters::new(json!({"sub": "u1"}), None), &StreamsRequest::default());
    let statics: Vec<_> = q.static_buckets().iter().map(|b| b.bucket.as_str()).collect();
    assert_eq!(statics, vec!["7#global[]", r#"7#user["u1"]"#]);
    assert_eq!(
        q.missing_lookups(&HashMap::new()),
        vec![LookupKey::from_stored(r#"["by_list","1","u1"]"#.into())]
    );
    let mut results = HashMap::new();
    results.insert(
        params[0].lookup.clone(),
        vec![
            params[0].bucket_parameters.clone(),
            r#"[{"list_id":"l2"}]"#.to_string(),
            params[0].bucket_parameters.clone(),
        ],
    );
    let all = q.resolve(&results);
    assert_eq!(
        all,
        vec![
            BucketDescription {
                bucket: "7#global[]".into(),
                priority: 3,
                reasons: vec![BucketReason::Default(0)]
            },
            BucketDescription {
                bucket: r#"7#user["u1"]"#.into(),
                priority: 3,
                reasons: vec![BucketReason::Default(1)]
            },
            BucketDescription {
                bucket: r#"7#by_list["l1"]"#.into(),
                priority: 1,
                reasons: vec![BucketReason::Default(2)]
            },
            BucketDescription {
                bucket: r#"7#by_list["l2"]"#.into(),
                priority: 1,
                reasons: vec![BucketReason::Default(2)]
            },
        ]
    );
}

#[test]
fn row_moves_between_buckets() {
    let rules = SyncRules::parse(TODO_RULES, &unversioned()).unwrap_or_else(|e| panic!("{e}"));
    let before = eval(&rules, "todos", &row(&[("id", t("t1")), ("list_id", t("l1"))]));
    let after = eval(&rules, "todos", &row(&[("id", t("t1")), ("list_id", t("l2"))]));
    assert_eq!(buckets_of(&before), vec![r#"1#by_list["l1"]"#]);
    assert_eq!(buckets_of(&after), vec![r#"1#by_list["l2"]"#]);
    // A NULL list_id puts the row in no bucket.
    assert!(eval(&rules, "todos", &row(&[("id", t("t1")), ("list_id", SqliteValue::Null)])).is_empty());
    // Parameter rows move too: a new owner gives a new lookup key.
    let moved = rules.evaluate_parameter_row(&table("lists"), &row(&[("id", t("l1")), ("owner_id", t("u2"))]));
    assert_eq!(moved[0].as_ref().map(|p| p.lookup.as_str()), Ok(r#"["by_list","1","u2"]"#));
}

#[test]
fn lookup_keys_normalize_reals() {
    let rules =
        parse("bucket_definitions:\n  b:\n    parameters: SELECT id AS x FROM items WHERE items.n = token_parameters.n\n    data: []\n");
    let a = rules.evaluate_parameter_row(&table("items"), &row(&[("id", t("a")), ("n", i(1))]));
    let b = rules.evaluate_parameter_row(&table("items"), &row(&[("id", t("a")), ("n", SqliteValue::Real(1.0))]));
    let ka = a[0].as_ref().map(|p| p.lookup.clone()).unwrap_or_else(|e| panic!("{e}"));
    let kb = b[0].as_ref().map(|p| p.lookup.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ka, kb);
    let q = rules.querier(
        &RequestParameters::new(json!({"sub": "u", "parameters": {"n": 1.0}}), None),
        &StreamsRequest::default(),
    );
    assert_eq!(q.missing_lookups(&HashMap::new()), vec![ka]);
}

#[test]
fn request_functions_and_json_each() {
    let rules = parse(
        r#"
bucket_definitions:
  by_org:
    parameters:
      - SELECT request.jwt() ->> 'org' AS org
      - SELECT request.parameters() ->> 'org' AS org WHERE request.jwt() ->> 'role' = 'admin'
    data: []
  by_project:
    parameters: SELECT value AS project_id FROM json_each(request.jwt() -> 'projects')
    data: []
  by_group:
    parameters: SELECT json_each.value AS g FROM json_each(request.jwt() -> 'groups') WHERE json_each.value != 'skip'
    data: []
"#,
    );
    let got = static_buckets(
        &rules,
        json!({"sub": "u", "org": "o1", "role": "admin", "projects": ["p1", "p2"], "groups": ["a", "skip", 3]}),
        Some(json!({"org": "o2"})),
    );
    assert_eq!(
        got,
        vec![
            r#"by_org["o1"]"#,
            r#"by_org["o2"]"#,
            r#"by_project["p1"]"#,
            r#"by_project["p2"]"#,
            r#"by_group["a"]"#,
            "by_group[3]",
        ]
    );
    let user = static_buckets(&rules, json!({"sub": "u", "org": "o1"}), Some(json!({"org": "o2"})));
    assert_eq!(user, vec![r#"by_org["o1"]"#]);
}

#[test]
fn in_with_request_array() {
    let rules = parse(
        r#"
bucket_definitions:
  b:
    parameters: SELECT id AS list_id FROM lists WHERE lists.owner_id IN request.jwt() -> 'owners' AND lists.active
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
"#,
    );
    let p = rules.evaluate_parameter_row(&table("lists"), &row(&[("id", t("l1")), ("owner_id", t("o1")), ("active", i(1))]));
    assert_eq!(p[0].as_ref().map(|x| x.lookup.as_str()), Ok(r#"["b","1","o1"]"#));
    let q = rules.querier(
        &RequestParameters::new(json!({"sub": "u", "owners": ["o1", "o2"]}), None),
        &StreamsRequest::default(),
    );
    let missing = q.missing_lookups(&HashMap::new());
    let keys: Vec<_> = missing.iter().map(|k| k.as_str()).collect();
    assert_eq!(keys, vec![r#"["b","1","o1"]"#, r#"["b","1","o2"]"#]);
    // param IN row array in a parameter query.
    let rules = parse(
        "bucket_definitions:\n  b:\n    parameters: SELECT id AS g FROM groups WHERE request.user_id() IN groups.members\n    data: []\n",
    );
    let p = rules.evaluate_parameter_row(&table("groups"), &row(&[("id", t("g1")), ("members", t(r#"["u1","u2"]"#))]));
    let keys: Vec<_> = p.iter().map(|x| x.as_ref().map(|y| y.lookup.as_str().to_string())).collect();
    assert_eq!(keys, vec![Ok(r#"["b","1","u1"]"#.to_string()), Ok(r#"["b","1","u2"]"#.to_string())]);
}

#[test]
fn star_precedence_and_quoted_names() {
    let rules = parse(
        r#"
bucket_definitions:
  b:
    data:
      - SELECT *, user_id AS id FROM "Users"
      - SELECT user_id AS id, * FROM "Users" u
      - SELECT "Name" AS name, id FROM Users
"#,
    );
    let r = row(&[("id", t("internal")), ("user_id", t("uid")), ("Name", t("n"))]);
    let rows = eval(&rules, "Users", &r);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].id, "uid");
    assert_eq!(rows[1].id, "uid");
    assert_eq!(rows[1].table, "u");
    assert_eq!(rows[0].data, r#"{"id":"uid","user_id":"uid","Name":"n"}"#);
    let lower = eval(&rules, "users", &r);
    assert_eq!(lower.len(), 1);
    assert_eq!(lower[0].data, r#"{"name":"n","id":"internal"}"#);
}

#[test]
fn priorities() {
    let rules = parse(
        r#"
bucket_definitions:
  a:
    priority: 0
    data: []
  b:
    parameters: SELECT request.user_id() AS user_id, 1 AS _priority
    data: []
"#,
    );
    let q = rules.querier(&RequestParameters::new(json!({"sub": "u"}), None), &StreamsRequest::default());
    let p: Vec<_> = q.static_buckets().iter().map(|b| (b.bucket.as_str(), b.priority)).collect();
    assert_eq!(p, vec![("a[]", 0), (r#"b["u"]"#, 1)]);
    assert_eq!(
        parse_err("bucket_definitions:\n  a:\n    priority: 4\n    data: []\n"),
        vec!["Invalid priority, expected a number between 0 and 3 (inclusive)."]
    );
    assert_eq!(
        parse_err("bucket_definitions:\n  a:\n    priority: 1\n    parameters: SELECT 2 AS _priority\n    data: []\n"),
        vec!["Cannot set priority multiple times."]
    );
}

#[test]
fn versioning_and_config() {
    let y = "bucket_definitions:\n  g:\n    data: []\n";
    let q = |yaml: &str, opts: &SyncRulesOptions| {
        let rules = SyncRules::parse(yaml, opts).unwrap_or_else(|e| panic!("{e}"));
        let q = rules.querier(&RequestParameters::new(json!({}), None), &StreamsRequest::default());
        q.static_buckets()[0].bucket.clone()
    };
    let mut opts = SyncRulesOptions {
        default_schema: "public".into(),
        sync_rules_id: 3,
        default_storage_version: 2,
        prefix_ids: Default::default(),
    };
    assert_eq!(q(y, &opts), "3#g[]");
    opts.default_storage_version = 1;
    assert_eq!(q(y, &opts), "g[]");
    assert_eq!(q(&format!("config:\n  edition: 2\n{y}"), &opts), "3#g[]");
    assert_eq!(
        q(&format!("config:\n  edition: 2\n  versioned_bucket_ids: false\n{y}"), &opts),
        "g[]"
    );
    assert_eq!(q(&format!("config:\n  storage_version: 2\n{y}"), &opts), "3#g[]");
    let rules = SyncRules::parse(y, &opts).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rules.compatibility(), &Compatibility::default());
    // event_definitions are accepted and ignored.
    let with_events = format!("{y}event_definitions:\n  write_checkpoints:\n    payloads:\n      - SELECT user_id FROM checkpoints\n");
    assert!(SyncRules::parse(&with_events, &opts).is_ok());
}

#[test]
fn structural_errors() {
    assert_eq!(
        parse_err("foo: 1\nbucket_definitions: {}\n"),
        vec!["Unknown top-level key 'foo' (must NOT have additional properties)"]
    );
    assert_eq!(parse_err("config: {}\n"), vec!["'bucket_definitions' or 'streams' is required"]);
    assert_eq!(parse_err("- a\n"), vec!["Sync Config must be a YAML map."]);
    assert_eq!(
        parse_err("streams:\n  s:\n    query: SELECT * FROM t\n"),
        vec!["Sync streams require edition 2 or later"]
    );
    assert_eq!(
        parse_err("config:\n  storage_version: 7\nbucket_definitions: {}\n"),
        vec!["Storage version 7 is not supported"]
    );
    assert_eq!(
        parse_err("bucket_definitions:\n  b:\n    parameters:\n      - SELECT request.user_id() AS a\n      - SELECT request.user_id() AS b\n    data: []\n"),
        vec!["Bucket parameters must match for each parameter query within a bucket"]
    );
}

#[test]
fn query_errors_are_all_collected() {
    let yaml = r#"
bucket_definitions:
  one:
    parameters: SELECT request.user_id()
    data:
      - SELECT description FROM assets
      - SELECT id, upper(description) FROM assets
  two:
    parameters: SELECT id AS x FROM users u WHERE u.id = request.user_id()
    data:
      - SELECT id FROM assets WHERE assets.x = bucket.y
  three:
    parameters: SELECT request.user_id() AS a
    data:
      - SELECT id FROM assets WHERE assets.id IN bucket.a
      - SELECT id FROM assets WHERE assets.id = upper(bucket.a)
      - SELECT id FROM assets WHERE bucket.a = bucket.a
      - SELECT id FROM assets WHERE assets.a = request.user_id()
      - SELECT id FROM assets
"#;
    let err = SyncRules::parse(yaml, &unversioned())
        .err()
        .unwrap_or_else(|| panic!("expected errors"));
    let got: Vec<(Option<&str>, &str)> = err.errors.iter().map(|e| (e.definition.as_deref(), e.message.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (Some("one"), "alias is required"),
            (Some("one"), "Query must return an \"id\" column"),
            (Some("one"), "alias is required"),
            (Some("two"), "Table aliases not supported in parameter queries"),
            (
                Some("two"),
                "Query must cover all bucket parameters. Expected: [] Got: [\"bucket.y\"]"
            ),
            (Some("three"), "Cannot use bucket parameters on the right side of IN operators"),
            (Some("three"), "Cannot use bucket parameters in expressions"),
            (Some("three"), "Cannot have bucket parameters on both sides of = operator"),
            (Some("three"), "request schema is not available in data queries"),
            (
                Some("three"),
                "Query must cover all bucket parameters. Expected: [\"bucket.a\"] Got: []"
            ),
        ]
    );
    assert_eq!(err.errors[0].query.as_deref(), Some("SELECT request.user_id()"));
    let text = err.to_string();
    assert_eq!(text.lines().count(), 10);
    assert!(text.contains("SELECT description FROM assets"));
}

#[test]
fn parameter_query_errors() {
    let msg = |sql: &str| parse_err(&format!("bucket_definitions:\n  b:\n    parameters: \"{sql}\"\n    data: []\n"));
    assert_eq!(msg("SELECT * FROM users"), vec!["* is not supported here - use explicit columns"]);
    assert_eq!(msg("SELECT id FROM users, groups"), vec!["Must SELECT from a single table"]);
    assert_eq!(
        msg("SELECT upper(users.id) || request.user_id() AS x FROM users"),
        vec!["Cannot use table values and parameters in the same clauses"]
    );
    assert_eq!(
        msg("SELECT id AS x FROM users WHERE users.a = request.user_id() OR users.b = token_parameters.b"),
        vec!["Left and right sides of OR must use the same parameters, or split into separate queries."]
    );
    assert_eq!(
        msg("SELECT id AS x FROM users WHERE NOT users.a = request.user_id()"),
        vec!["Parameter match clauses cannot be used here"]
    );
    assert_eq!(
        msg("SELECT value AS x FROM other_fn(request.jwt())"),
        vec!["Table-valued function other_fn is not defined."]
    );
    assert_eq!(
        msg("SELECT id AS x FROM users WHERE users.a IN request.jwt() -> 'a' AND users.b IN request.jwt() -> 'b'"),
        vec!["Cannot have multiple array input parameters"]
    );
    assert_eq!(msg("UPDATE users SET a = 1"), vec!["Only SELECT statements are supported"]);
}

#[test]
fn or_in_parameter_and_data_queries() {
    let rules = parse(
        r#"
bucket_definitions:
  b:
    parameters: SELECT id AS org FROM orgs WHERE orgs.owner = request.user_id() OR orgs.admin = request.user_id()
    data:
      - SELECT id FROM docs WHERE docs.org = bucket.org OR docs.parent_org = bucket.org
"#,
    );
    let p = rules.evaluate_parameter_row(&table("orgs"), &row(&[("id", t("o")), ("owner", t("u1")), ("admin", t("u2"))]));
    let keys: Vec<_> = p.iter().filter_map(|x| x.as_ref().ok()).map(|y| y.lookup.as_str()).collect();
    assert_eq!(keys, vec![r#"["b","1","u1"]"#, r#"["b","1","u2"]"#]);
    let rows = eval(&rules, "docs", &row(&[("id", t("d")), ("org", t("x")), ("parent_org", t("y"))]));
    assert_eq!(buckets_of(&rows), vec![r#"b["x"]"#, r#"b["y"]"#]);
}
