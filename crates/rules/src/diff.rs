//! What a new sync config changes against the deployed one, definition by definition, so a
//! deploy can rebuild only what changed (an in-place deploy) instead of everything.
//!
//! Two configs are comparable only when everything outside `bucket_definitions` is the same
//! (edition, compatibility switches, storage version, global CTEs and streams: stream
//! parameter indexes are numbered across all streams, so one stream's change can move
//! another's lookups). Definitions are then compared by name, on a normalised form of their
//! YAML: key order and whitespace in SQL outside string literals do not count; anything
//! else (data or parameter queries, priority, `accept_potentially_dangerous_queries`) does.

use serde_yaml_ng::{Mapping, Value};
use std::collections::BTreeMap;

const DEFINITIONS: &str = "bucket_definitions";

/// Definition names by how a new config treats them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// In both configs, the same: their buckets stay as they are.
    pub unchanged: Vec<String>,
    /// Only in the new config.
    pub added: Vec<String>,
    /// In both, different: rebuilt under new bucket ids.
    pub changed: Vec<String>,
    /// Only in the old config: their buckets are deleted after the switch.
    pub removed: Vec<String>,
}

impl ConfigDiff {
    /// The definitions whose buckets must be built: added and changed ones.
    pub fn rebuilt(&self) -> Vec<String> {
        self.added.iter().chain(&self.changed).cloned().collect()
    }
}

/// How `new` differs from `old`; `None` when they differ outside their bucket definitions (or
/// either is not a YAML mapping), which only a full deploy can apply.
pub fn diff(old: &str, new: &str) -> Option<ConfigDiff> {
    let (old_globals, old_defs) = split(old)?;
    let (new_globals, new_defs) = split(new)?;
    if old_globals != new_globals {
        return None;
    }
    let mut out = ConfigDiff::default();
    for (name, text) in &new_defs {
        match old_defs.get(name) {
            None => out.added.push(name.clone()),
            Some(previous) if previous == text => out.unchanged.push(name.clone()),
            Some(_) => out.changed.push(name.clone()),
        }
    }
    out.removed = old_defs.keys().filter(|n| !new_defs.contains_key(*n)).cloned().collect();
    Some(out)
}

/// Bucket-prefix ids for the definitions of a new config: unchanged ones keep the id their
/// buckets were built under (`current`, else the stream's `stream_id`), added and changed
/// ones get `fresh`.
pub fn plan_prefix_ids(diff: &ConfigDiff, current: &BTreeMap<String, u64>, stream_id: u64, fresh: u64) -> BTreeMap<String, u64> {
    let kept = diff
        .unchanged
        .iter()
        .map(|n| (n.clone(), current.get(n).copied().unwrap_or(stream_id)));
    let built = diff.rebuilt().into_iter().map(|n| (n, fresh));
    kept.chain(built).collect()
}

/// (normalised globals, definition name -> normalised definition).
fn split(yaml: &str) -> Option<(String, BTreeMap<String, String>)> {
    let Value::Mapping(mut root) = serde_yaml_ng::from_str::<Value>(yaml).ok()? else {
        return None;
    };
    let definitions = match root.remove(DEFINITIONS) {
        Some(Value::Mapping(m)) => m,
        None | Some(Value::Null) => Mapping::new(),
        Some(_) => return None,
    };
    let mut defs = BTreeMap::new();
    for (k, v) in &definitions {
        defs.insert(k.as_str()?.to_string(), canonical(v));
    }
    Some((canonical(&Value::Mapping(root)), defs))
}

/// A stable text form: mapping keys sorted, strings with SQL whitespace normalised.
fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Mapping(m) => {
            let mut entries: Vec<(String, &Value)> = m.iter().map(|(k, v)| (canonical(k), v)).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (k, v) in entries {
                out.push_str(&k);
                out.push(':');
                write_canonical(v, out);
                out.push(',');
            }
            out.push('}');
        }
        Value::Sequence(items) => {
            out.push('[');
            for item in items {
                write_canonical(item, out);
                out.push(',');
            }
            out.push(']');
        }
        Value::String(s) => {
            out.push('"');
            out.push_str(&squeeze_sql(s).replace('\\', "\\\\").replace('"', "\\\""));
            out.push('"');
        }
        Value::Tagged(t) => {
            out.push_str(&t.tag.to_string());
            write_canonical(&t.value, out);
        }
        other => out.push_str(serde_yaml_ng::to_string(other).unwrap_or_default().trim()),
    }
}

/// Whitespace runs outside single-quoted literals become one space, and leading and trailing
/// whitespace goes (`SELECT  *\n FROM t` and `SELECT * FROM t` are the same query).
fn squeeze_sql(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut quoted = false;
    let mut pending_space = false;
    for c in s.trim().chars() {
        if !quoted && c.is_whitespace() {
            pending_space = true;
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        if c == '\'' {
            quoted = !quoted;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
bucket_definitions:
  global:
    data:
      - SELECT * FROM lists
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
"#;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn adding_a_definition_keeps_the_others() {
        let new = format!("{BASE}  extra:\n    data:\n      - SELECT * FROM tags\n");
        let d = diff(BASE, &new).expect("comparable");
        assert_eq!(d.unchanged, names(&["by_user", "global"]));
        assert_eq!(d.added, names(&["extra"]));
        assert!(d.changed.is_empty() && d.removed.is_empty());
    }

    #[test]
    fn whitespace_and_key_order_do_not_count_but_literals_do() {
        let reformatted = r#"
bucket_definitions:
  by_user:
    data: ["SELECT *   FROM todos\n   WHERE owner_id = bucket.user_id"]
    parameters: "SELECT request.user_id()  AS user_id"
  global:
    data: [SELECT * FROM lists]
"#;
        let d = diff(BASE, reformatted).expect("comparable");
        assert_eq!(d.unchanged, names(&["by_user", "global"]));
        let literal_a = "bucket_definitions:\n  g:\n    data: [\"SELECT * FROM t WHERE a = 'x  y'\"]\n";
        let literal_b = "bucket_definitions:\n  g:\n    data: [\"SELECT * FROM t WHERE a = 'x y'\"]\n";
        assert_eq!(diff(literal_a, literal_b).map(|d| d.changed), Some(names(&["g"])));
    }

    #[test]
    fn parameter_queries_and_priority_are_part_of_a_definition() {
        let new_param = BASE.replace("request.user_id() AS user_id", "request.jwt() ->> 'org' AS user_id");
        assert_eq!(diff(BASE, &new_param).map(|d| d.changed), Some(names(&["by_user"])));
        let new_priority = BASE.replace("  global:\n", "  global:\n    priority: 1\n");
        assert_eq!(diff(BASE, &new_priority).map(|d| d.changed), Some(names(&["global"])));
    }

    #[test]
    fn removed_definitions_are_listed() {
        let new = BASE.replace("  global:\n    data:\n      - SELECT * FROM lists\n", "");
        let d = diff(BASE, &new).expect("comparable");
        assert_eq!(d.removed, names(&["global"]));
        assert_eq!(d.unchanged, names(&["by_user"]));
    }

    #[test]
    fn global_settings_make_configs_incomparable() {
        let with_config = format!("config:\n  edition: 2\n{BASE}");
        assert_eq!(diff(BASE, &with_config), None);
        let with_streams = format!("{BASE}streams:\n  s:\n    query: SELECT * FROM lists\n");
        assert_eq!(diff(BASE, &with_streams), None);
        assert_eq!(diff(BASE, "- not a mapping"), None);
    }

    #[test]
    fn prefix_ids_keep_unchanged_definitions_and_renew_the_rest() {
        let d = ConfigDiff {
            unchanged: names(&["a", "b"]),
            added: names(&["c"]),
            changed: names(&["d"]),
            removed: names(&["e"]),
        };
        let current: BTreeMap<String, u64> = [("b".to_string(), 4)].into();
        let ids = plan_prefix_ids(&d, &current, 3, 9);
        let expected: BTreeMap<String, u64> = [("a", 3), ("b", 4), ("c", 9), ("d", 9)]
            .into_iter()
            .map(|(n, i)| (n.to_string(), i))
            .collect();
        assert_eq!(ids, expected);
    }
}
