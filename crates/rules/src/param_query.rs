//! Legacy parameter queries: static (no FROM), table lookups, and
//! `json_each(...)` table-valued queries, with their replication-time and
//! request-time evaluation.

use crate::compile::{constant, Mode, Scope, AUTH, ROW, UNAUTH};
use crate::data_query::implicit_name;
use crate::expr::{Ctx, Expr};
use crate::filter::{assigned, request_values, Filter, FilterBuilder, ParamInput};
use crate::json::{self, Json};
use crate::sql::{fold, parse_select, FromItem};
use crate::table::TablePattern;
use crate::value::{sqlite_bool, Row, SqliteValue};
use sqlparser::ast::SelectItem;

/// An output column: a bucket parameter.
#[derive(Debug)]
pub(crate) struct ParamColumn {
    pub name: String,
    pub expr: Expr,
    /// Computed from the source row at replication time (else at request time).
    pub is_row: bool,
}

#[derive(Debug)]
pub(crate) enum Kind {
    Static {
        filter: Option<Expr>,
    },
    Each {
        arg: Expr,
        filter: Option<Expr>,
    },
    Table {
        pattern: TablePattern,
        filter: Filter,
        inputs: Vec<ParamInput>,
    },
}

/// A compiled parameter query.
#[derive(Debug)]
pub(crate) struct ParamQuery {
    pub id: String,
    pub kind: Kind,
    pub columns: Vec<ParamColumn>,
    pub priority: Option<u8>,
    /// Uses client-supplied data without any authenticated constraint.
    pub dangerous: bool,
}

/// Parameter values for one bucket, by column name.
pub(crate) type ParamSet = Vec<(String, SqliteValue)>;

impl ParamQuery {
    /// An implicit `SELECT` (global bucket).
    pub(crate) fn global(id: String) -> Self {
        ParamQuery {
            id,
            kind: Kind::Static { filter: None },
            columns: Vec::new(),
            priority: None,
            dangerous: false,
        }
    }

    pub(crate) fn parse(sql: &str, id: String, default_schema: &str) -> Result<Self, String> {
        let q = parse_select(sql)?;
        let (mode, pattern, each) = match &q.from {
            None => (Mode::ParamStatic, None, None),
            Some(FromItem::Table { schema, name, alias }) => {
                if alias.is_some() {
                    return Err("Table aliases not supported in parameter queries".into());
                }
                let p = TablePattern::new(schema.as_deref(), name, default_schema)?;
                (Mode::ParamTable, Some((p, name.clone())), None)
            }
            Some(FromItem::Function { name, args, alias }) => {
                if name != "json_each" {
                    return Err(format!("Table-valued function {name} is not defined."));
                }
                let [arg] = args.as_slice() else {
                    return Err("Function 'json_each' takes 1 arguments.".into());
                };
                let alias = alias.clone().unwrap_or_else(|| "json_each".to_string());
                (Mode::ParamEach, None, Some((arg.clone(), alias)))
            }
        };
        let scope = Scope {
            mode,
            tables: pattern.iter().map(|(_, n)| n.clone()).collect(),
            wildcard: pattern.as_ref().is_some_and(|(p, _)| p.is_wildcard()),
            each_alias: each.as_ref().map(|(_, a)| a.clone()),
        };
        let mut deps_all = 0u8;
        let mut auth_output = false;
        let mut columns = Vec::new();
        let mut priority = None;
        for item in &q.projection {
            let (name, e) = match item {
                SelectItem::UnnamedExpr(e) => (implicit_name(e).ok_or("alias is required")?, e),
                SelectItem::ExprWithAlias { expr, alias } => (fold(alias), expr),
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                    return Err("* is not supported here - use explicit columns".into())
                }
                other => return Err(format!("{other} not supported here")),
            };
            let (expr, d) = scope.expr(e)?;
            if name == "_priority" {
                priority = Some(parse_priority(&expr)?);
                continue;
            }
            deps_all |= d;
            if d & AUTH != 0 {
                auth_output = true;
            }
            let is_row = mode == Mode::ParamTable && (d & ROW != 0 || d == 0);
            // Errata: the reference refuses output columns computed from the
            // row (`upper(team_id) AS t`); only plain columns are stored.
            if d & ROW != 0 && !matches!(expr, Expr::Column(_) | Expr::TableSuffix) {
                return Err("Parameter match expression is not allowed here".into());
            }
            columns.push(ParamColumn { name, expr, is_row });
        }
        let kind = match (pattern, each) {
            (Some((pattern, _)), _) => {
                let mut builder = FilterBuilder::new(&scope);
                let filter = builder.build(q.selection.as_ref())?;
                for i in &builder.inputs {
                    deps_all |= i.deps;
                    if i.deps & AUTH != 0 {
                        auth_output = true;
                    }
                }
                Kind::Table {
                    pattern,
                    filter,
                    inputs: builder.inputs,
                }
            }
            (None, each) => {
                let filter = match &q.selection {
                    Some(w) => {
                        let (x, d) = scope.expr(w)?;
                        deps_all |= d;
                        Some(x)
                    }
                    None => None,
                };
                match each {
                    Some((arg, _)) => {
                        let (arg, d) = scope.expr(&arg)?;
                        if d & ROW != 0 {
                            return Err("json_each argument must come from the request".into());
                        }
                        deps_all |= d;
                        Kind::Each { arg, filter }
                    }
                    None => Kind::Static { filter },
                }
            }
        };
        Ok(ParamQuery {
            id,
            kind,
            columns,
            priority,
            dangerous: deps_all & UNAUTH != 0 && !auth_output,
        })
    }

    /// Output parameter names in query order.
    pub(crate) fn param_names(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.name.clone()).collect()
    }

    /// Replication time: `(lookup values, stored row-parameter object)` pairs.
    pub(crate) fn evaluate_row(
        &self,
        row: &Row,
        suffix: Option<&str>,
        fixed_json: bool,
    ) -> Result<Vec<(Vec<SqliteValue>, String)>, String> {
        let Kind::Table { filter, inputs, .. } = &self.kind else {
            return Ok(Vec::new());
        };
        let ctx = Ctx {
            row: Some(row),
            suffix,
            fixed_json,
            ..Ctx::default()
        };
        let assignments = filter.assignments(&ctx)?;
        if assignments.is_empty() {
            return Ok(Vec::new());
        }
        let mut stored = Vec::new();
        for c in self.columns.iter().filter(|c| c.is_row) {
            let v = c.expr.eval(&ctx)?;
            if !matches!(v, SqliteValue::Blob(_)) {
                stored.push((c.name.clone(), v));
            }
        }
        let stored = format!("[{}]", json::object_text(&stored));
        Ok(assignments
            .iter()
            .map(|a| {
                let values = (0..inputs.len()).map(|i| assigned(a, i).normalized()).collect();
                (values, stored.clone())
            })
            .collect())
    }

    /// Request time for static / json_each queries: the parameter sets.
    pub(crate) fn static_sets(&self, ctx: &Ctx<'_>) -> Result<Vec<ParamSet>, String> {
        match &self.kind {
            Kind::Static { filter } => Ok(self.one_set(filter.as_ref(), ctx)?.into_iter().collect()),
            Kind::Each { arg, filter } => {
                let rows = json_each(&arg.eval(ctx)?, ctx.fixed_json)?;
                let mut out = Vec::new();
                for (k, v) in &rows {
                    let each_ctx = Ctx {
                        each: Some((k, v)),
                        ..*ctx
                    };
                    if let Some(set) = self.one_set(filter.as_ref(), &each_ctx)? {
                        out.push(set);
                    }
                }
                Ok(out)
            }
            Kind::Table { .. } => Ok(Vec::new()),
        }
    }

    fn one_set(&self, filter: Option<&Expr>, ctx: &Ctx<'_>) -> Result<Option<ParamSet>, String> {
        if let Some(f) = filter {
            if !sqlite_bool(&f.eval(ctx)?) {
                return Ok(None);
            }
        }
        let mut set = Vec::with_capacity(self.columns.len());
        for c in &self.columns {
            match c.expr.eval(ctx)? {
                SqliteValue::Blob(_) => return Ok(None),
                v => set.push((c.name.clone(), v)),
            }
        }
        Ok(Some(set))
    }

    /// Request time for table queries: the lookup value tuples and the
    /// request-side columns (`None` = the query yields nothing).
    pub(crate) fn lookup_values(&self, ctx: &Ctx<'_>) -> Result<Option<LookupPlan>, String> {
        let Kind::Table { inputs, .. } = &self.kind else {
            return Ok(None);
        };
        let mut tuples: Vec<Vec<SqliteValue>> = vec![Vec::new()];
        for input in inputs {
            let Some(values) = request_values(input, ctx)? else {
                return Ok(None);
            };
            let mut next = Vec::with_capacity(tuples.len() * values.len());
            for t in &tuples {
                for v in &values {
                    let mut t = t.clone();
                    t.push(v.clone());
                    next.push(t);
                }
            }
            tuples = next;
        }
        let mut columns = Vec::with_capacity(self.columns.len());
        for c in &self.columns {
            if c.is_row {
                columns.push((c.name.clone(), None));
            } else {
                match c.expr.eval(ctx)? {
                    SqliteValue::Blob(_) => return Ok(None),
                    v => columns.push((c.name.clone(), Some(v))),
                }
            }
        }
        Ok(Some(LookupPlan { tuples, columns }))
    }
}

/// Request-time plan of a table parameter query.
pub(crate) struct LookupPlan {
    pub tuples: Vec<Vec<SqliteValue>>,
    /// Columns in query order: `None` = read from the stored row.
    pub columns: Vec<(String, Option<SqliteValue>)>,
}

fn parse_priority(e: &Expr) -> Result<u8, String> {
    match (e, constant(e)) {
        (Expr::Lit(_), Some(SqliteValue::Integer(p))) if (0..=3).contains(&p) => Ok(p as u8),
        _ => Err("Invalid priority, expected a number between 0 and 3 (inclusive).".into()),
    }
}

/// Rows of `json_each(value)`: `(key, value)` pairs.
pub(crate) fn json_each(v: &SqliteValue, fixed_json: bool) -> Result<Vec<(SqliteValue, SqliteValue)>, String> {
    let text = match v {
        SqliteValue::Null => return Ok(Vec::new()),
        SqliteValue::Text(t) => t,
        _ => return Err("Expected JSON string".into()),
    };
    let null_text = !fixed_json;
    Ok(match json::parse(text)? {
        Json::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| (SqliteValue::Integer(i as i64), x.to_sqlite(null_text)))
            .collect(),
        Json::Object(fields) => fields
            .iter()
            .map(|(k, x)| (SqliteValue::Text(k.clone()), x.to_sqlite(null_text)))
            .collect(),
        scalar => vec![(SqliteValue::Null, scalar.to_sqlite(null_text))],
    })
}
