//! Edition-3 streams end to end: replication-time rows and lookups, request-time buckets
//! through multi-stage lookups (spec sync-rules.md §7.1 cases 17-21 and an app config).

use crate::querier::{BucketReason, LookupKey, StreamSubscription, StreamsRequest};
use crate::{RequestParameters, Row, SourceTableName, SqliteValue, SyncRules, SyncRulesOptions};
use serde_json::json;
use std::collections::HashMap;

fn options() -> SyncRulesOptions {
    SyncRulesOptions {
        default_schema: "public".into(),
        sync_rules_id: 1,
        default_storage_version: 1,
        prefix_ids: Default::default(),
    }
}

fn parse(yaml: &str) -> SyncRules {
    SyncRules::parse(yaml, &options()).unwrap_or_else(|e| panic!("{e}"))
}

fn error_of(yaml: &str) -> String {
    match SyncRules::parse(yaml, &options()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.errors.iter().map(|i| i.message.clone()).collect::<Vec<_>>().join("; "),
    }
}

fn table(name: &str) -> SourceTableName {
    SourceTableName {
        connection_tag: "default".into(),
        schema: "public".into(),
        name: name.into(),
    }
}

fn row(v: serde_json::Value) -> Row {
    let mut r = Row::new();
    for (k, v) in v.as_object().into_iter().flatten() {
        let value = match v {
            serde_json::Value::String(s) => SqliteValue::Text(s.clone()),
            serde_json::Value::Number(n) if n.is_i64() => SqliteValue::Integer(n.as_i64().unwrap_or_default()),
            serde_json::Value::Number(n) => SqliteValue::Real(n.as_f64().unwrap_or_default()),
            serde_json::Value::Null => SqliteValue::Null,
            other => SqliteValue::Text(other.to_string()),
        };
        r.push(k.clone(), value);
    }
    r
}

/// (bucket, table, id, data) of a row.
fn rows(rules: &SyncRules, t: &str, r: serde_json::Value) -> Vec<(String, String, String, String)> {
    rules
        .evaluate_row(&table(t), &row(r))
        .into_iter()
        .map(|x| x.unwrap_or_else(|e| panic!("{e}")))
        .map(|x| (x.bucket, x.table, x.id, x.data))
        .collect()
}

/// An in-memory parameter store fed by `evaluate_parameter_row`.
#[derive(Default)]
struct Store(HashMap<LookupKey, Vec<String>>);

impl Store {
    fn add(&mut self, rules: &SyncRules, t: &str, r: serde_json::Value) {
        for p in rules.evaluate_parameter_row(&table(t), &row(r)) {
            let p = p.unwrap_or_else(|e| panic!("{e}"));
            self.0.entry(p.lookup).or_default().push(p.bucket_parameters);
        }
    }

    /// Buckets for a request, fetching lookups in rounds like the sync service does.
    fn buckets(&self, rules: &SyncRules, jwt: serde_json::Value, streams: &StreamsRequest) -> Vec<(String, u8, Vec<BucketReason>)> {
        let q = rules.querier(&RequestParameters::new(jwt, None), streams);
        let mut known = HashMap::new();
        for _ in 0..10 {
            let missing = q.missing_lookups(&known);
            if missing.is_empty() {
                break;
            }
            for l in missing {
                let found = self.0.get(&l).cloned().unwrap_or_default();
                known.insert(l, found);
            }
        }
        let mut out: Vec<_> = q.resolve(&known).into_iter().map(|b| (b.bucket, b.priority, b.reasons)).collect();
        out.sort();
        out
    }
}

fn ids(b: &[(String, u8, Vec<BucketReason>)]) -> Vec<&str> {
    b.iter().map(|x| x.0.as_str()).collect()
}

fn sub(stream: &str, params: serde_json::Value) -> StreamSubscription {
    StreamSubscription {
        stream: stream.into(),
        parameters: Some(params),
        override_priority: None,
    }
}

#[test]
fn basic_stream_syncs_under_its_alias() {
    let rules = parse("config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  stream:\n    auto_subscribe: true\n    query: SELECT * FROM users u\n");
    assert_eq!(
        rows(&rules, "users", json!({"id": "foo"})),
        vec![("stream|0[]".into(), "u".into(), "foo".into(), r#"{"id":"foo"}"#.into())]
    );
    let b = Store::default().buckets(&rules, json!({"sub": "u1"}), &StreamsRequest::default());
    assert_eq!(b, vec![("stream|0[]".to_string(), 3, vec![BucketReason::Default(0)])]);
}

#[test]
fn queries_of_one_stream_share_a_bucket() {
    let rules = parse("config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  stream:\n    queries: [SELECT * FROM users, SELECT * FROM comments]\n");
    assert_eq!(rows(&rules, "users", json!({"id": "a"}))[0].0, "stream|0[]");
    assert_eq!(rows(&rules, "comments", json!({"id": "b"}))[0].0, "stream|0[]");
}

#[test]
fn star_precedence_is_last_writer_wins() {
    let first = parse("config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    query: SELECT user_id AS id, * FROM users\n");
    let last = parse("config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    query: SELECT *, user_id AS id FROM users\n");
    let record = json!({"user_id": "uid", "id": "internal_id", "_x": 1});
    assert_eq!(rows(&first, "users", record.clone())[0].2, "internal_id");
    assert_eq!(rows(&last, "users", record.clone())[0].2, "uid");
    assert!(rows(&last, "users", record)[0].3.contains(r#""_x":1"#), "ed.3 * keeps _ columns");
}

#[test]
fn subquery_becomes_a_lookup() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    auto_subscribe: true\n    query: SELECT * FROM comments WHERE issue_id IN (SELECT id FROM issues WHERE owner_id = auth.user_id())\n",
    );
    let mut store = Store::default();
    store.add(&rules, "issues", json!({"id": "issue_id", "owner_id": "user1"}));
    let key = store.0.keys().next().map(|k| k.as_str().to_string());
    assert_eq!(key.as_deref(), Some(r#"["lookup","0","user1"]"#));
    assert_eq!(store.0.values().next(), Some(&vec![r#"[{"0":"issue_id"}]"#.to_string()]));
    assert_eq!(
        rows(&rules, "comments", json!({"id": "c1", "issue_id": "issue_id"}))[0].0,
        r#"s|0["issue_id"]"#
    );
    let b = store.buckets(&rules, json!({"sub": "user1"}), &StreamsRequest::default());
    assert_eq!(ids(&b), vec![r#"s|0["issue_id"]"#]);
    assert!(store
        .buckets(&rules, json!({"sub": "user2"}), &StreamsRequest::default())
        .is_empty());
}

#[test]
fn json_each_on_a_joined_row() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    auto_subscribe: true\n    query: SELECT messages.* FROM messages JOIN conversations ON conversations.id = messages.conversation JOIN json_each(conversations.members) AS members WHERE auth.user_id() = members.value\n",
    );
    let mut store = Store::default();
    store.add(&rules, "conversations", json!({"id": "c", "members": r#"["a","b","c"]"#}));
    let mut keys: Vec<&str> = store.0.keys().map(LookupKey::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![r#"["lookup","0","a"]"#, r#"["lookup","0","b"]"#, r#"["lookup","0","c"]"#]
    );
    assert_eq!(
        rows(&rules, "messages", json!({"id": "m", "conversation": "c"}))[0].0,
        r#"s|0["c"]"#
    );
    assert_eq!(
        ids(&store.buckets(&rules, json!({"sub": "b"}), &StreamsRequest::default())),
        vec![r#"s|0["c"]"#]
    );
}

#[test]
fn nested_subqueries_resolve_in_rounds() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    auto_subscribe: true\n    query: SELECT * FROM tasks WHERE project_id IN (SELECT id FROM projects WHERE org_id IN (SELECT org_id FROM org_members WHERE user_id = auth.user_id()))\n",
    );
    let mut store = Store::default();
    store.add(&rules, "org_members", json!({"org_id": "o1", "user_id": "u1"}));
    store.add(&rules, "projects", json!({"id": "p1", "org_id": "o1"}));
    store.add(&rules, "projects", json!({"id": "p2", "org_id": "o2"}));
    assert_eq!(
        ids(&store.buckets(&rules, json!({"sub": "u1"}), &StreamsRequest::default())),
        vec![r#"s|0["p1"]"#]
    );
}

#[test]
fn or_branches_with_the_same_parameters_share_a_bucket() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    auto_subscribe: true\n    query: SELECT * FROM todos WHERE owner = auth.user_id() OR assignee = auth.user_id()\n",
    );
    let r = rows(&rules, "todos", json!({"id": "t", "owner": "a", "assignee": "b"}));
    let buckets: Vec<&str> = r.iter().map(|x| x.0.as_str()).collect();
    assert_eq!(buckets, vec![r#"s|0["a"]"#, r#"s|0["b"]"#]);
    let b = Store::default().buckets(&rules, json!({"sub": "a"}), &StreamsRequest::default());
    assert_eq!(ids(&b), vec![r#"s|0["a"]"#]);
}

#[test]
fn or_branches_with_different_parameters_are_separate_buckets() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    auto_subscribe: true\n    query: SELECT * FROM todos WHERE owner = auth.user_id() OR public\n",
    );
    let r = rows(&rules, "todos", json!({"id": "t", "owner": "a", "public": 1}));
    let buckets: Vec<&str> = r.iter().map(|x| x.0.as_str()).collect();
    assert_eq!(buckets, vec![r#"s|0["a"]"#, "s|1[]"]);
    let b = Store::default().buckets(&rules, json!({"sub": "z"}), &StreamsRequest::default());
    assert_eq!(ids(&b), vec![r#"s|0["z"]"#, "s|1[]"]);
}

#[test]
fn subscriptions_and_parameters() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  todos:\n    priority: 1\n    query: SELECT * FROM todos WHERE list_id = subscription.parameter('list') AND owner = auth.user_id()\n  all:\n    auto_subscribe: true\n    query: SELECT * FROM lists\n",
    );
    let req = StreamsRequest {
        include_defaults: true,
        subscriptions: vec![sub("todos", json!({"list": "l1"})), sub("todos", json!({"list": "l2"}))],
    };
    let q = rules.querier(&RequestParameters::new(json!({"sub": "u"}), None), &req);
    let names: Vec<(&str, bool)> = q.streams().iter().map(|s| (s.name.as_str(), s.is_default)).collect();
    assert_eq!(names, vec![("todos", false), ("all", true)]);
    let b = Store::default().buckets(&rules, json!({"sub": "u"}), &req);
    assert_eq!(
        b,
        vec![
            ("all|0[]".to_string(), 3, vec![BucketReason::Default(1)]),
            (r#"todos|0["l1","u"]"#.to_string(), 1, vec![BucketReason::Subscription(0)]),
            (r#"todos|0["l2","u"]"#.to_string(), 1, vec![BucketReason::Subscription(1)]),
        ]
    );
    let no_defaults = StreamsRequest {
        include_defaults: false,
        subscriptions: Vec::new(),
    };
    assert!(Store::default().buckets(&rules, json!({"sub": "u"}), &no_defaults).is_empty());
}

#[test]
fn in_over_a_parameter_array_and_errors_per_subscription() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    query: SELECT * FROM todos WHERE list_id IN subscription.parameter('lists')\n",
    );
    let req = StreamsRequest {
        include_defaults: true,
        subscriptions: vec![sub("s", json!({"lists": ["a", "b"]})), sub("s", json!({"lists": "nope"}))],
    };
    let b = Store::default().buckets(&rules, json!({"sub": "u"}), &req);
    assert_eq!(ids(&b), vec![r#"s|0["a"]"#, r#"s|0["b"]"#]);
    let q = rules.querier(&RequestParameters::new(json!({"sub": "u"}), None), &req);
    let errors = &q.streams()[0].errors;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].subscription, Some(1));
}

#[test]
fn custom_claim_and_ctes() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nwith:\n  my_teams: SELECT team_id FROM memberships WHERE user_id = auth.user_id()\nstreams:\n  docs:\n    auto_subscribe: true\n    query: SELECT * FROM docs WHERE team_id = auth.parameter('team_id')\n  team_projects:\n    auto_subscribe: true\n    query: SELECT * FROM projects WHERE team_id IN my_teams\n",
    );
    let mut store = Store::default();
    store.add(&rules, "memberships", json!({"team_id": "t9", "user_id": "u"}));
    let b = store.buckets(&rules, json!({"sub": "u", "team_id": "t1"}), &StreamsRequest::default());
    assert_eq!(ids(&b), vec![r#"docs|0["t1"]"#, r#"team_projects|0["t9"]"#]);
}

#[test]
fn row_filters_and_null_partitions() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    query: SELECT id, upper(name) AS name FROM items WHERE status != 'archived' AND owner = auth.user_id()\n",
    );
    assert_eq!(
        rows(&rules, "items", json!({"id": 1, "name": "x", "status": null, "owner": "u"})),
        vec![(
            r#"s|0["u"]"#.to_string(),
            "items".to_string(),
            "1".to_string(),
            r#"{"id":1,"name":"X"}"#.to_string()
        )],
        "!= on NULL is true in the reference's JS engine"
    );
    assert!(rows(&rules, "items", json!({"id": 1, "status": "archived", "owner": "u"})).is_empty());
    assert!(rows(&rules, "items", json!({"id": 1, "status": "x", "owner": null})).is_empty());
}

#[test]
fn compile_errors() {
    let e = |q: &str| error_of(&format!("config: {{edition: 3}}\nstreams:\n  s:\n    query: \"{q}\"\n"));
    assert!(e("SELECT * FROM a WHERE a.x > auth.user_id()").contains("already references row data"));
    assert!(e("SELECT a.*, b.x FROM a JOIN b ON a.id = b.id").contains("can only select from a single table"));
    assert!(e("SELECT auth.user_id() AS u, id FROM a").contains("connection parameter"));
    assert!(e("SELECT * FROM a WHERE x LIKE 'a%'").contains("LIKE"));
    assert!(e("SELECT * FROM a WHERE random() > 1").contains("deterministic"));
    assert!(e("SELECT * FROM a WHERE id IN (SELECT a, b FROM t)").contains("exactly one column"));
    assert!(e("SELECT * FROM a LIMIT 1").contains("LIMIT"));
    assert!(e("SELECT * FROM a WHERE nope(x)").contains("Unknown function"));
    let both = error_of(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    query: SELECT * FROM a\n    queries: [SELECT * FROM b]\n",
    );
    assert!(both.contains("One of `queries` or `query` must be given."));
    assert!(error_of("streams:\n  s:\n    query: SELECT * FROM a\n").contains("edition 2"));
    assert!(
        error_of("config: {edition: 3, versioned_bucket_ids: false}\nbucket_definitions: {}\nstreams: {}\n")
            .contains("not supported by the new compiler")
    );
}

#[test]
fn unauthenticated_streams_warn_unless_accepted() {
    let warns = |extra: &str, q: &str| {
        let yaml = format!("config: {{edition: 3}}\nstreams:\n  s:\n{extra}    query: \"{q}\"\n");
        parse(&yaml)
            .warnings()
            .iter()
            .any(|w| w.message.contains("unsuitable for authorization"))
    };
    assert!(warns("", "SELECT * FROM t WHERE owner = connection.parameter('user')"));
    assert!(warns("", "SELECT * FROM t WHERE id IN subscription.parameter('ids')"));
    assert!(!warns(
        "",
        "SELECT * FROM t WHERE id = subscription.parameter('id') AND owner = auth.user_id()"
    ));
    assert!(!warns("", "SELECT * FROM t WHERE owner = auth.user_id()"));
    assert!(!warns(
        "    accept_potentially_dangerous_queries: true\n",
        "SELECT * FROM t WHERE owner = connection.parameter('user')"
    ));
}

#[test]
fn a_named_column_the_row_lacks_is_left_out() {
    let rules = parse("config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    query: SELECT id, nope, name AS n FROM t\n");
    assert_eq!(rows(&rules, "t", json!({"id": "a", "name": null}))[0].3, r#"{"id":"a","n":null}"#);
}

/// Review finding: conditions on a request-side json_each that feeds no parameter were dropped,
/// so every user got the bucket.
#[test]
fn request_side_json_each_conditions_constrain_the_branch() {
    let admin_only = [
        "SELECT * FROM t WHERE 'admin' IN (SELECT value FROM json_each(auth.parameter('roles')))",
        "SELECT t.* FROM t, json_each(auth.parameter('roles')) AS e WHERE e.value = 'admin'",
    ];
    for q in admin_only {
        let rules = parse(&format!(
            "config: {{edition: 3, versioned_bucket_ids: false}}\nstreams:\n  s:\n    auto_subscribe: true\n    query: \"{q}\"\n"
        ));
        let user = Store::default().buckets(&rules, json!({"sub": "u1", "roles": ["user"]}), &StreamsRequest::default());
        assert!(user.is_empty(), "{q}: {user:?}");
        let admin = Store::default().buckets(&rules, json!({"sub": "u1", "roles": ["user", "admin"]}), &StreamsRequest::default());
        assert_eq!(ids(&admin), vec!["s|0[]"], "{q}");
        let none = Store::default().buckets(&rules, json!({"sub": "u1"}), &StreamsRequest::default());
        assert!(none.is_empty(), "{q}: {none:?}");
    }
    let keyed = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    auto_subscribe: true\n    query: SELECT * FROM t WHERE t.org IN auth.parameter('orgs') AND 'admin' IN (SELECT value FROM json_each(auth.parameter('roles')))\n",
    );
    let user = Store::default().buckets(
        &keyed,
        json!({"sub": "u", "orgs": ["o1"], "roles": ["user"]}),
        &StreamsRequest::default(),
    );
    assert!(user.is_empty(), "{user:?}");
    let admin = Store::default().buckets(
        &keyed,
        json!({"sub": "u", "orgs": ["o1"], "roles": ["admin"]}),
        &StreamsRequest::default(),
    );
    assert_eq!(ids(&admin), vec![r#"s|0["o1"]"#]);
}

/// Review finding: one request-side json_each compared with two tables lost the pairing of
/// values from the same element; such queries are refused.
#[test]
fn a_request_json_each_feeding_two_tables_is_refused() {
    let q = "SELECT t.* FROM t JOIN u ON t.uid = u.id, json_each(auth.parameter('pairs')) AS e WHERE t.a = e.value ->> 'a' AND u.b = e.value ->> 'b'";
    assert!(error_of(&format!("config: {{edition: 3}}\nstreams:\n  s:\n    query: \"{q}\"\n")).contains("only be compared with one table"));
    let nested = "SELECT t.* FROM t, json_each(auth.parameter('groups')) AS g, json_each(g.value) AS m WHERE t.x = m.value";
    assert!(error_of(&format!("config: {{edition: 3}}\nstreams:\n  s:\n    query: \"{nested}\"\n")).contains("not supported"));
}

/// Review finding: `column = constant` made the constant a bucket parameter; it is a row filter.
#[test]
fn a_comparison_with_a_constant_is_a_row_filter() {
    let rules = parse(
        "config: {edition: 3, versioned_bucket_ids: false}\nstreams:\n  s:\n    auto_subscribe: true\n    query: SELECT * FROM t WHERE t.kind = 'a' OR t.kind = 'b'\n",
    );
    let buckets = |kind: &str| -> Vec<String> {
        rows(&rules, "t", json!({"id": "1", "kind": kind}))
            .into_iter()
            .map(|r| r.0)
            .collect()
    };
    assert_eq!(buckets("b"), vec!["s|0[]"]);
    assert_eq!(buckets("a"), vec!["s|0[]"]);
    assert!(buckets("c").is_empty());
    assert_eq!(
        ids(&Store::default().buckets(&rules, json!({"sub": "u"}), &StreamsRequest::default())),
        vec!["s|0[]"]
    );
}

/// `is_default` is the stream's setting, also when the client asked for no default streams.
#[test]
fn is_default_reports_the_stream_setting() {
    let rules = parse("config: {edition: 3}\nstreams:\n  s:\n    auto_subscribe: true\n    query: SELECT * FROM t\n");
    let req = StreamsRequest {
        include_defaults: false,
        subscriptions: vec![StreamSubscription {
            stream: "s".into(),
            parameters: None,
            override_priority: None,
        }],
    };
    let q = rules.querier(&RequestParameters::new(json!({"sub": "u"}), None), &req);
    assert!(q.streams()[0].is_default);
}
