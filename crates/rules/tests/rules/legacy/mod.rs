//! End-to-end tests of the legacy sync rules dialect: spec §7.1 cases,
//! a todo-list app through replication and request time, and error messages.

// 3.14 is a literal value from the reference fixtures, not an approximation of PI.
#![allow(clippy::approx_constant)]

mod app;
mod spec_cases;

use ferrosync_rules::*;
use serde_json::json;
use std::collections::HashMap;

pub(super) fn unversioned() -> SyncRulesOptions {
    SyncRulesOptions {
        default_schema: "test_schema".into(),
        sync_rules_id: 1,
        default_storage_version: 1,
        prefix_ids: Default::default(),
    }
}

pub(super) fn parse(yaml: &str) -> SyncRules {
    SyncRules::parse(yaml, &unversioned()).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn parse_err(yaml: &str) -> Vec<String> {
    match SyncRules::parse(yaml, &unversioned()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.errors.into_iter().map(|i| i.message).collect(),
    }
}

pub(super) fn table(name: &str) -> SourceTableName {
    SourceTableName {
        connection_tag: "default".into(),
        schema: "test_schema".into(),
        name: name.into(),
    }
}

pub(super) fn row(cols: &[(&str, SqliteValue)]) -> Row {
    let mut r = Row::new();
    for (n, v) in cols {
        r.push(*n, v.clone());
    }
    r
}

pub(super) fn t(s: &str) -> SqliteValue {
    SqliteValue::Text(s.into())
}

pub(super) fn i(v: i64) -> SqliteValue {
    SqliteValue::Integer(v)
}

pub(super) fn eval(rules: &SyncRules, tbl: &str, r: &Row) -> Vec<EvaluatedRow> {
    rules
        .evaluate_row(&table(tbl), r)
        .into_iter()
        .map(|x| x.unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

pub(super) fn buckets_of(rows: &[EvaluatedRow]) -> Vec<&str> {
    rows.iter().map(|r| r.bucket.as_str()).collect()
}

pub(super) fn static_buckets(rules: &SyncRules, jwt: serde_json::Value, client: Option<serde_json::Value>) -> Vec<String> {
    let q = rules.querier(&RequestParameters::new(jwt, client), &StreamsRequest::default());
    assert!(q.errors().is_empty(), "{:?}", q.errors());
    q.static_buckets().iter().map(|b| b.bucket.clone()).collect()
}
