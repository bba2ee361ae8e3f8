//! Per-definition bucket-prefix ids (`SyncRulesOptions::prefix_ids`): what an in-place deploy
//! relies on to keep unchanged definitions' bucket ids and lookups, and to keep new ones apart.

use crate::querier::StreamsRequest;
use crate::{RequestParameters, Row, SourceTableName, SqliteValue, SyncRules, SyncRulesOptions};

const RULES: &str = r#"
bucket_definitions:
  global:
    data:
      - SELECT id, name FROM lists
  by_owner:
    parameters: SELECT id AS list_id FROM lists WHERE owner_id = request.user_id()
    data:
      - SELECT id, description FROM todos WHERE list_id = bucket.list_id
"#;

fn parse(ids: &[(&str, u64)]) -> SyncRules {
    let options = SyncRulesOptions {
        sync_rules_id: 5,
        prefix_ids: ids.iter().map(|(n, i)| (n.to_string(), *i)).collect(),
        ..SyncRulesOptions::default()
    };
    SyncRules::parse(RULES, &options).unwrap_or_else(|e| panic!("{e}"))
}

fn lists() -> SourceTableName {
    SourceTableName {
        connection_tag: "default".into(),
        schema: "public".into(),
        name: "lists".into(),
    }
}

fn list_row() -> Row {
    let mut r = Row::new();
    r.push("id", SqliteValue::Text("l1".into()));
    r.push("name", SqliteValue::Text("groceries".into()));
    r.push("owner_id", SqliteValue::Text("u1".into()));
    r
}

fn buckets(rules: &SyncRules) -> Vec<String> {
    rules
        .evaluate_row(&lists(), &list_row())
        .into_iter()
        .map(|r| r.map(|r| r.bucket).unwrap_or_default())
        .collect()
}

fn lookups(rules: &SyncRules) -> Vec<String> {
    let rows = rules.evaluate_parameter_row(&lists(), &list_row());
    rows.into_iter()
        .map(|r| r.map(|p| p.lookup.as_str().to_string()).unwrap_or_default())
        .collect()
}

#[test]
fn without_overrides_every_definition_uses_the_stream_id() {
    let rules = parse(&[]);
    assert_eq!(buckets(&rules), vec!["5#global[]"]);
    assert_eq!(lookups(&rules), vec![r#"["by_owner","1","u1"]"#]);
}

#[test]
fn an_override_renames_buckets_and_lookups_of_that_definition_only() {
    let rules = parse(&[("by_owner", 9), ("global", 5)]);
    assert_eq!(buckets(&rules), vec!["5#global[]"]);
    assert_eq!(lookups(&rules), vec![r#"["9#by_owner","1","u1"]"#]);
    // The request side asks for the same lookups the replication side stores.
    let q = rules.querier(
        &RequestParameters::new(serde_json::json!({"sub": "u1"}), None),
        &StreamsRequest::default(),
    );
    let missing: Vec<String> = q
        .missing_lookups(&Default::default())
        .iter()
        .map(|l| l.as_str().to_string())
        .collect();
    assert_eq!(missing, vec![r#"["9#by_owner","1","u1"]"#]);
    let buckets = q.resolve(
        &[(
            q.missing_lookups(&Default::default())[0].clone(),
            vec![r#"[{"list_id":"l1"}]"#.to_string()],
        )]
        .into(),
    );
    assert!(buckets.iter().any(|b| b.bucket == r#"9#by_owner["l1"]"#), "{buckets:?}");
}

#[test]
fn ownership_follows_the_prefixes() {
    let old = parse(&[]);
    let new = parse(&[("global", 9)]);
    assert!(old.owns_bucket("5#global[]") && !new.owns_bucket("5#global[]"));
    assert!(new.owns_bucket("9#global[]"));
    // A name that merely starts like a definition's is not its bucket.
    assert!(!old.owns_bucket("5#global_x[]"));
    assert!(old.owns_lookup(r#"["by_owner","1","u1"]"#));
    assert!(!parse(&[("by_owner", 9)]).owns_lookup(r#"["by_owner","1","u1"]"#));
}

#[test]
fn restricted_and_union_evaluate_the_chosen_definitions() {
    let rebuilt = parse(&[("global", 9), ("by_owner", 5)]).restricted_to(&["global".to_string()]);
    assert_eq!(buckets(&rebuilt), vec!["9#global[]"]);
    assert!(lookups(&rebuilt).is_empty());
    let both = parse(&[]).union(rebuilt);
    assert_eq!(buckets(&both), vec!["5#global[]", "9#global[]"]);
    assert_eq!(lookups(&both), vec![r#"["by_owner","1","u1"]"#]);
}
