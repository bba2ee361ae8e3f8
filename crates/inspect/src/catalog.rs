//! The source database's tables and columns, read from the Postgres catalog.

use std::collections::BTreeMap;
use tokio_postgres::Client;

/// One column of a source table.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// As `format_type` prints it, e.g. `character varying(255)[]`.
    pub type_name: String,
    pub oid: u32,
    /// `typtype`: b(ase), d(omain), c(omposite), r(ange), m(ultirange), e(num), p(seudo).
    pub kind: char,
    pub is_array: bool,
}

/// Source tables by (schema, name), columns in table order.
pub type Catalog = BTreeMap<(String, String), Vec<Column>>;

/// Tables, views, materialized and foreign tables outside the system schemas.
pub async fn read_catalog(client: &Client) -> Result<Catalog, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod),
                    a.atttypid, t.typtype::text, t.typcategory = 'A'
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             JOIN pg_type t ON t.oid = a.atttypid
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
             ORDER BY 1, 2, a.attnum",
            &[],
        )
        .await?;
    let mut catalog = Catalog::new();
    for r in rows {
        let kind: String = r.get(5);
        catalog.entry((r.get(0), r.get(1))).or_default().push(Column {
            name: r.get(2),
            type_name: r.get(3),
            oid: r.get(4),
            kind: kind.chars().next().unwrap_or('b'),
            is_array: r.get(6),
        });
    }
    Ok(catalog)
}

/// The SQLite type a column's values reach clients as (the reference's `sqlite_type` text).
pub fn sqlite_type(column: &Column) -> &'static str {
    use ferrosync_source::types::BYTEA;
    if column.is_array {
        return "text";
    }
    match column.oid {
        // bool, int8, int2, int4, oid
        16 | 20 | 21 | 23 | 26 => "integer",
        // float4, float8
        700 | 701 => "real",
        BYTEA => "blob",
        _ => "text",
    }
}
