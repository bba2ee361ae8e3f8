//! Source table names and the table patterns used in FROM clauses
//! (`table`, `schema.table`, `"tag.schema".table`, wildcard `"prefix%"`).

/// A concrete replicated table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceTableName {
    /// Connection tag (`default` unless configured).
    pub connection_tag: String,
    /// Schema (Postgres) / database name.
    pub schema: String,
    /// Table name.
    pub name: String,
}

/// A table reference from a sync rules query, possibly a wildcard.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TablePattern {
    connection_tag: String,
    schema: String,
    table: String,
}

impl TablePattern {
    /// Builds a pattern from the (already case-folded) schema text and table
    /// name. Schema text `a.b` means connection tag `a`, schema `b`.
    pub(crate) fn new(schema: Option<&str>, table: &str, default_schema: &str) -> Result<Self, String> {
        let (tag, schema) = match schema {
            None => ("default".to_string(), default_schema.to_string()),
            Some(s) => {
                let parts: Vec<&str> = s.split('.').collect();
                match parts.as_slice() {
                    [schema] => ("default".to_string(), schema.to_string()),
                    [tag, schema] => (tag.to_string(), schema.to_string()),
                    _ => return Err(format!("Invalid schema in table name: {s}")),
                }
            }
        };
        Ok(TablePattern {
            connection_tag: tag,
            schema,
            table: table.to_string(),
        })
    }

    /// True when this pattern selects the given table.
    pub fn matches(&self, t: &SourceTableName) -> bool {
        fn part(pattern: &str, actual: &str) -> bool {
            match pattern.strip_suffix('%') {
                Some(prefix) => actual.starts_with(prefix),
                None => pattern == actual,
            }
        }
        // The table name first: it is what tells the patterns of one config apart, and this runs
        // for every pattern on every replicated row.
        part(&self.table, &t.name) && part(&self.schema, &t.schema) && self.connection_tag == t.connection_tag
    }

    /// The schema as written (may end with `%`).
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// True when the table name ends with `%`.
    pub fn is_wildcard(&self) -> bool {
        self.table.ends_with('%')
    }

    /// The table name, or the prefix before `%` for wildcards.
    pub fn name_or_prefix(&self) -> &str {
        self.table.strip_suffix('%').unwrap_or(&self.table)
    }

    /// The connection tag.
    pub fn connection_tag(&self) -> &str {
        &self.connection_tag
    }

    /// The table name as written (including a trailing `%`).
    pub(crate) fn table_text(&self) -> &str {
        &self.table
    }

    /// `_table_suffix` for a matching table (wildcards only).
    pub(crate) fn suffix<'a>(&self, t: &'a SourceTableName) -> &'a str {
        t.name.get(self.name_or_prefix().len()..).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(tag: &str, schema: &str, name: &str) -> SourceTableName {
        SourceTableName {
            connection_tag: tag.into(),
            schema: schema.into(),
            name: name.into(),
        }
    }

    #[test]
    fn matching() {
        let p = TablePattern::new(Some("default.s"), "assets_%", "public").unwrap();
        assert!(p.matches(&t("default", "s", "assets_123")));
        assert!(!p.matches(&t("other", "s", "assets_123")));
        assert_eq!(p.suffix(&t("default", "s", "assets_123")), "123");
        assert!(p.is_wildcard());
        assert_eq!(p.name_or_prefix(), "assets_");
        let p = TablePattern::new(None, "users", "public").unwrap();
        assert!(p.matches(&t("default", "public", "users")));
        assert!(!p.matches(&t("default", "public", "users2")));
        assert!(TablePattern::new(Some("a.b.c"), "x", "public").is_err());
    }
}
