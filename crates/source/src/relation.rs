//! Table descriptions and decoded rows as they come from the source.

use ferrosync_rules::{Row, SourceTableName, SqliteValue};
use std::sync::Arc;

/// One column of a replicated table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Shared with every row read from the table.
    pub name: Arc<str>,
    pub type_oid: u32,
    /// Part of the replica identity (primary key, identity index, or all columns for FULL).
    pub is_key: bool,
}

/// What we know about a source table: from the catalog (snapshot) or a pgoutput Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationInfo {
    pub oid: u32,
    pub name: SourceTableName,
    pub columns: Vec<ColumnInfo>,
    /// `d` default, `f` full, `i` index, `n` nothing.
    pub replica_identity: u8,
}

impl RelationInfo {
    pub fn key_columns(&self) -> impl Iterator<Item = &ColumnInfo> {
        self.columns.iter().filter(|c| c.is_key)
    }

    /// Names of replica-identity columns, in column order.
    pub fn key_column_names(&self) -> Vec<String> {
        self.key_columns().map(|c| c.name.to_string()).collect()
    }
}

/// A column value in a change: TOASTed values that did not change are not sent by Postgres.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnValue {
    Value(SqliteValue),
    UnchangedToast,
}

/// A row from the source, column order as in the table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceRow {
    pub columns: Vec<(Arc<str>, ColumnValue)>,
}

impl SourceRow {
    /// Convert to a sync-rules row plus the names of unchanged TOAST columns.
    pub fn into_row(self) -> (Row, Vec<String>) {
        let mut row = Row::with_capacity(self.columns.len());
        let mut unchanged = Vec::new();
        for (name, value) in self.columns {
            match value {
                ColumnValue::Value(v) => row.push(name, v),
                ColumnValue::UnchangedToast => unchanged.push(name.to_string()),
            }
        }
        (row, unchanged)
    }

    /// Fill unchanged TOAST columns from the old row version where it has them (replica
    /// identity FULL logs the whole old row, out-of-line values included).
    pub fn fill_unchanged_from(&mut self, old: &SourceRow) {
        for (name, value) in &mut self.columns {
            if *value == ColumnValue::UnchangedToast {
                if let Some((_, known @ ColumnValue::Value(_))) = old.columns.iter().find(|(n, _)| n == name) {
                    *value = known.clone();
                }
            }
        }
    }
}

/// Namespace for replica-key UUIDs (v5).
const KEY_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0xa396dd91_09fc_4017_a28d_3df722f651e9);

impl SourceRow {
    /// Stable identity of the source row: UUIDv5 of its replica-identity values. Rows without
    /// replica identity get a random id (they can only be inserted and truncated).
    pub fn replica_key(&self, key_columns: &[String]) -> uuid::Uuid {
        if key_columns.is_empty() {
            return uuid::Uuid::new_v4();
        }
        let mut name = Vec::with_capacity(32);
        for (i, col) in key_columns.iter().enumerate() {
            if i > 0 {
                name.push(0);
            }
            name.extend_from_slice(col.as_bytes());
            name.push(b'=');
            match self.columns.iter().find(|(c, _)| &**c == col.as_str()).map(|(_, v)| v) {
                Some(ColumnValue::Value(SqliteValue::Integer(n))) => name.extend_from_slice(n.to_string().as_bytes()),
                Some(ColumnValue::Value(SqliteValue::Real(f))) => name.extend_from_slice(f.to_string().as_bytes()),
                Some(ColumnValue::Value(SqliteValue::Text(t))) => name.extend_from_slice(t.as_bytes()),
                Some(ColumnValue::Value(SqliteValue::Blob(b))) => name.extend_from_slice(b),
                Some(ColumnValue::Value(SqliteValue::Null)) | Some(ColumnValue::UnchangedToast) | None => name.push(0xff),
            }
        }
        uuid::Uuid::new_v5(&KEY_NAMESPACE, &name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str) -> ColumnValue {
        ColumnValue::Value(SqliteValue::Text(t.into()))
    }

    #[test]
    fn unchanged_toast_is_filled_from_the_old_row_and_keys_agree() {
        let keys = vec!["id".to_string(), "body".to_string()];
        let old = SourceRow {
            columns: vec![("id".into(), text("1")), ("body".into(), text("long")), ("done".into(), text("f"))],
        };
        let mut new = SourceRow {
            columns: vec![
                ("id".into(), text("1")),
                ("body".into(), ColumnValue::UnchangedToast),
                ("done".into(), text("t")),
            ],
        };
        new.fill_unchanged_from(&SourceRow {
            columns: vec![("id".into(), text("1")), ("body".into(), ColumnValue::UnchangedToast)],
        });
        assert_eq!(
            new.columns[1].1,
            ColumnValue::UnchangedToast,
            "an old row without the value leaves it unchanged"
        );
        new.fill_unchanged_from(&old);
        assert_eq!(new.columns[1].1, text("long"));
        assert_eq!(
            new.replica_key(&keys),
            old.replica_key(&keys),
            "a later delete (old row) finds the row"
        );
    }
}
