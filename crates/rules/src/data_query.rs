//! Legacy data queries (`bucket_definitions.*.data[]`): parsing into a
//! table pattern, output columns and a parameter-match filter, and row
//! evaluation into bucket rows.

use crate::compile::{Mode, Scope};
use crate::expr::{Ctx, Expr};
use crate::filter::{assigned, filter_keys, Filter, FilterBuilder};
use crate::json::{object_text, serialize_params, write_str};
use crate::sql::{fold, parse_select, FromItem};
use crate::table::{SourceTableName, TablePattern};
use crate::value::{js_number, Row, SqliteValue};
use crate::EvaluatedRow;
use sqlparser::ast::{Expr as SqlExpr, SelectItem};

/// One output column of a data query.
#[derive(Debug)]
enum Column {
    Star,
    Value(String, Expr),
}

/// A compiled data query.
#[derive(Debug)]
pub(crate) struct DataQuery {
    pub pattern: TablePattern,
    alias: Option<String>,
    columns: Vec<Column>,
    filter: Filter,
    /// For each bucket parameter (definition order): the filter input index.
    param_inputs: Vec<usize>,
}

/// Output column name for an unaliased expression, if it is a plain ref.
pub(crate) fn implicit_name(e: &SqlExpr) -> Option<String> {
    match e {
        SqlExpr::Identifier(i) => Some(fold(i)),
        SqlExpr::CompoundIdentifier(parts) => parts.last().map(fold),
        _ => None,
    }
}

impl DataQuery {
    /// Parses a data query; `params` are the definition's bucket parameters.
    pub(crate) fn parse(sql: &str, params: &[String], default_schema: &str) -> Result<Self, String> {
        let q = parse_select(sql)?;
        let Some(from) = q.from else {
            return Err("Must SELECT from a single table".into());
        };
        let FromItem::Table { schema, name, alias } = from else {
            return Err("Table-valued functions are not supported in data queries".into());
        };
        let pattern = TablePattern::new(schema.as_deref(), &name, default_schema)?;
        let mut tables = vec![alias.clone().unwrap_or_else(|| name.clone())];
        if alias.is_none() && pattern.is_wildcard() {
            tables.push(pattern.name_or_prefix().to_string());
        }
        let scope = Scope {
            mode: Mode::Data,
            tables,
            wildcard: pattern.is_wildcard(),
            each_alias: None,
        };
        let mut columns = Vec::new();
        for item in &q.projection {
            columns.push(match item {
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => Column::Star,
                SelectItem::UnnamedExpr(e) => {
                    let name = implicit_name(e).ok_or("alias is required")?;
                    Column::Value(name, scope.expr(e)?.0)
                }
                SelectItem::ExprWithAlias { expr, alias } => Column::Value(fold(alias), scope.expr(expr)?.0),
                other => return Err(format!("{other} not supported here")),
            });
        }
        let has_id = columns
            .iter()
            .any(|c| matches!(c, Column::Star) || matches!(c, Column::Value(n, _) if n == "id"));
        if !has_id {
            return Err("Query must return an \"id\" column".into());
        }
        let mut builder = FilterBuilder::new(&scope);
        let filter = builder.build(q.selection.as_ref())?;
        let used = filter_keys(&filter);
        let got: Vec<String> = builder
            .inputs
            .iter()
            .enumerate()
            .filter(|(i, _)| used.contains(i))
            .map(|(_, p)| format!("bucket.{}", p.key))
            .collect();
        let mut expected: Vec<String> = params.iter().map(|p| format!("bucket.{p}")).collect();
        let mut got_sorted = got.clone();
        got_sorted.sort();
        expected.sort();
        if got_sorted != expected {
            let list = |v: &[String]| {
                let mut s = String::from("[");
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    write_str(&mut s, x);
                }
                s + "]"
            };
            return Err(format!(
                "Query must cover all bucket parameters. Expected: {} Got: {}",
                list(&expected),
                list(&got)
            ));
        }
        let param_inputs = params
            .iter()
            .map(|p| builder.inputs.iter().position(|i| i.key == *p).unwrap_or(usize::MAX))
            .collect();
        Ok(DataQuery {
            pattern,
            alias,
            columns,
            filter,
            param_inputs,
        })
    }

    /// Evaluates a source row: one output per matching bucket.
    pub(crate) fn evaluate(&self, table: &SourceTableName, row: &Row, prefix: &str, fixed_json: bool) -> Result<Vec<EvaluatedRow>, String> {
        let suffix = self.pattern.is_wildcard().then(|| self.pattern.suffix(table));
        let ctx = Ctx {
            row: Some(row),
            suffix,
            request: None,
            each: None,
            fixed_json,
            table: None,
        };
        let assignments = self.filter.assignments(&ctx)?;
        if assignments.is_empty() {
            return Ok(Vec::new());
        }
        let mut data: Vec<(String, SqliteValue)> = Vec::new();
        for col in &self.columns {
            match col {
                Column::Star => {
                    for (name, value) in row.iter() {
                        if name.starts_with('_') {
                            continue;
                        }
                        match data.iter_mut().find(|(n, _)| n == name) {
                            Some(slot) if slot.1.is_null() => slot.1 = value.clone(),
                            Some(_) => {}
                            None => data.push((name.to_string(), value.clone())),
                        }
                    }
                }
                Column::Value(name, expr) => {
                    // A named column the source row lacks is left out of the
                    // output (errata: "not `null`").
                    if matches!(expr, Expr::Column(c) if row.get(c).is_none()) {
                        continue;
                    }
                    let v = expr.eval(&ctx)?;
                    match data.iter_mut().find(|(n, _)| n == name) {
                        Some(slot) => slot.1 = v,
                        None => data.push((name.clone(), v)),
                    }
                }
            }
        }
        data.retain(|(_, v)| !matches!(v, SqliteValue::Blob(_)));
        let id = match data.iter().find(|(n, _)| n == "id").map(|(_, v)| v) {
            Some(SqliteValue::Text(s)) => s.clone(),
            Some(SqliteValue::Integer(i)) => i.to_string(),
            Some(SqliteValue::Real(f)) => js_number(*f),
            _ => String::new(),
        };
        let table_name = match &self.alias {
            Some(a) => a.clone(),
            None if self.pattern.is_wildcard() => table.name.clone(),
            None => self.pattern.table_text().to_string(),
        };
        let data_text = object_text(&data);
        Ok(assignments
            .iter()
            .map(|a| {
                let values: Vec<SqliteValue> = self.param_inputs.iter().map(|i| assigned(a, *i)).collect();
                EvaluatedRow {
                    bucket: format!("{prefix}{}", serialize_params(&values)),
                    table: table_name.clone(),
                    id: id.clone(),
                    data: data_text.clone(),
                }
            })
            .collect())
    }
}
