//! Best-effort column references of sync-config queries, for the source checks of validation.
//!
//! The rules crate compiles queries into evaluators and keeps no column lists, so this re-reads
//! the SQL with sqlparser (Postgres dialect). Only SELECTs over exactly one plain table (no
//! JOIN, no comma join, no table function such as `json_each`) are analysed; subqueries are
//! analysed on their own. Queries the Postgres dialect cannot parse (the sync-rules dialect
//! accepts a few extra operators) are skipped: validate checks their tables only.

use sqlparser::ast::{Expr, Ident, ObjectNamePart, Query, SelectItem, SetExpr, Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

/// One single-table SELECT of a query.
#[derive(Debug, Default, PartialEq)]
pub struct TableUse {
    /// Schema as written (folded), if qualified.
    pub schema: Option<String>,
    pub table: String,
    /// Columns the SELECT reads (projection and WHERE), folded, deduplicated.
    pub columns: Vec<String>,
    /// Columns output as they are (`SELECT col`, `SELECT col AS x`), whose values reach the
    /// client unconverted.
    pub outputs: Vec<String>,
    /// `SELECT *`: every column is output.
    pub wildcard: bool,
}

/// Postgres identifier folding: unquoted names are lower-cased.
fn fold(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

/// The single-table SELECTs of `sql` (the query itself and its subqueries); empty when the
/// SQL does not parse as Postgres.
pub fn table_uses(sql: &str) -> Vec<TableUse> {
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for statement in &statements {
        if let Statement::Query(q) = statement {
            analyse_query(q, &mut out);
        }
    }
    out
}

fn analyse_query(query: &Query, out: &mut Vec<TableUse>) {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return;
    };
    let simple = match select.from.as_slice() {
        [only] if only.joins.is_empty() => match &only.relation {
            TableFactor::Table {
                name, alias, args: None, ..
            } => {
                let parts: Vec<String> = name.0.iter().filter_map(ObjectNamePart::as_ident).map(fold).collect();
                Some((parts, alias.as_ref().map(|a| fold(&a.name))))
            }
            _ => None,
        },
        _ => None,
    };
    let mut refs = Refs::default();
    let exprs = select
        .projection
        .iter()
        .filter_map(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
            _ => None,
        })
        .chain(select.selection.as_ref());
    for e in exprs {
        let _ = e.visit(&mut refs);
    }
    let nested = std::mem::take(&mut refs.nested);
    if let Some((parts, alias)) = simple {
        if let Some(table) = parts.last() {
            let qualifiers: Vec<&str> = [Some(table.as_str()), alias.as_deref()].into_iter().flatten().collect();
            let column = |e: &Expr| direct_column(e, &qualifiers);
            let mut use_ = TableUse {
                schema: (parts.len() > 1).then(|| parts[parts.len() - 2].clone()),
                table: table.clone(),
                ..TableUse::default()
            };
            for item in &select.projection {
                match item {
                    SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => use_.wildcard = true,
                    SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                        use_.outputs.extend(column(e));
                    }
                    _ => {}
                }
            }
            for e in &refs.idents {
                if let Some(c) = column(e) {
                    if !use_.columns.contains(&c) {
                        use_.columns.push(c);
                    }
                }
            }
            out.push(use_);
        }
    }
    for q in &nested {
        analyse_query(q, out);
    }
}

/// The column an identifier expression names: `col`, or `t.col` with `t` the table or alias.
/// Other qualified names (`bucket.x`, `token_parameters.x`, `request.x`) are not columns.
fn direct_column(e: &Expr, qualifiers: &[&str]) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(fold(i)),
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [q, c] if qualifiers.contains(&fold(q).as_str()) => Some(fold(c)),
            _ => None,
        },
        _ => None,
    }
}

/// Collects identifier expressions outside subqueries, and the subqueries themselves.
#[derive(Default)]
struct Refs {
    idents: Vec<Expr>,
    nested: Vec<Query>,
    depth: usize,
}

impl Visitor for Refs {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if self.depth == 0 {
            self.nested.push(query.clone());
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if self.depth == 0 && matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_)) {
            self.idents.push(expr.clone());
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_queries_and_subqueries() {
        let uses = table_uses(
            "SELECT t.id, Name AS n, upper(\"Title\") FROM public.todos t WHERE owner = request.user_id() AND list_id = bucket.list_id AND t.x IN (SELECT list_id FROM members WHERE user_id = auth.user_id())",
        );
        assert_eq!(uses.len(), 2, "{uses:?}");
        assert_eq!(uses[0].schema.as_deref(), Some("public"));
        assert_eq!(uses[0].table, "todos");
        assert_eq!(uses[0].columns, ["id", "name", "Title", "owner", "list_id", "x"]);
        assert_eq!(uses[0].outputs, ["id", "name"]);
        assert!(!uses[0].wildcard);
        assert_eq!(uses[1].table, "members");
        assert_eq!(uses[1].columns, ["list_id", "user_id"]);
        let uses = table_uses("SELECT * FROM files");
        assert!(uses[0].wildcard && uses[0].columns.is_empty());
        assert!(table_uses("SELECT value AS id FROM json_each(request.parameters())").is_empty());
        assert!(table_uses("SELECT a FROM x JOIN y ON x.a = y.a").is_empty());
        assert!(table_uses("SELEC nonsense").is_empty());
    }
}
