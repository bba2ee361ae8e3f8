//! WHERE clauses compiled into *parameter match* filters (spec §2.4): given a
//! row they yield the parameter assignments that make the clause true.

use crate::compile::{is_mixed, Mode, Scope, BUCKET, PARAM, ROW};
use crate::expr::{json_array_values, BinOp, Ctx, Expr};
use crate::value::{sqlite_bool, SqliteValue};
use sqlparser::ast::{BinaryOperator, Expr as SqlExpr, UnaryOperator};
use std::collections::BTreeSet;

/// A parameter input of a filter (`bucket.x`, or a request expression).
#[derive(Clone, Debug)]
pub(crate) struct ParamInput {
    /// Stable identity (bucket parameter name, or the expression text).
    pub key: String,
    pub expr: Expr,
    /// `row IN <param array>`: one lookup per array element.
    pub expanding: bool,
    /// Used directly as a boolean: the lookup value is `sqliteBool(param)`.
    pub as_bool: bool,
    /// Dependency flags of `expr`.
    pub deps: u8,
}

/// A compiled filter.
#[derive(Clone, Debug)]
pub(crate) enum Filter {
    Row(Expr),
    ParamBool(usize),
    Eq(Expr, usize),
    ParamInRow(usize, Expr),
    RowInParam(Expr, usize),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
}

/// One assignment of values to filter inputs (by input index).
pub(crate) type Assignment = Vec<(usize, SqliteValue)>;

/// Most assignments one row may produce through `AND` (a cartesian product): two `IN`s over
/// JSON arrays of a few thousand elements each would otherwise need billions of them.
pub(crate) const MAX_ASSIGNMENTS: usize = 100_000;

enum Clause {
    Value(Expr, u8),
    Match(Filter),
}

/// Builds a [`Filter`] and its inputs from a WHERE clause.
pub(crate) struct FilterBuilder<'a> {
    scope: &'a Scope,
    pub inputs: Vec<ParamInput>,
}

impl<'a> FilterBuilder<'a> {
    pub(crate) fn new(scope: &'a Scope) -> Self {
        FilterBuilder { scope, inputs: Vec::new() }
    }

    /// Compiles a complete WHERE clause (or `None` = always true).
    pub(crate) fn build(&mut self, e: Option<&SqlExpr>) -> Result<Filter, String> {
        match e {
            None => Ok(Filter::Row(Expr::Lit(SqliteValue::Integer(1)))),
            Some(e) => {
                let c = self.clause(e)?;
                let f = self.as_filter(c, e)?;
                if self.inputs.iter().filter(|i| i.expanding).count() > 1 {
                    return Err("Cannot have multiple array input parameters".into());
                }
                Ok(f)
            }
        }
    }

    fn row_like(&self, d: u8) -> bool {
        if self.scope.mode == Mode::Data {
            d & PARAM == 0
        } else {
            d & ROW != 0
        }
    }

    fn input(&mut self, key: String, expr: Expr, deps: u8, expanding: bool, as_bool: bool) -> usize {
        let key = if expanding { format!("{key}[*]") } else { key };
        if let Some(i) = self.inputs.iter().position(|p| p.key == key) {
            return i;
        }
        self.inputs.push(ParamInput {
            key,
            expr,
            expanding,
            as_bool,
            deps,
        });
        self.inputs.len() - 1
    }

    fn param_key(&self, expr: &Expr, source: &SqlExpr) -> String {
        match expr {
            Expr::Bucket(name) => name.clone(),
            _ => source.to_string(),
        }
    }

    fn as_filter(&mut self, c: Clause, source: &SqlExpr) -> Result<Filter, String> {
        Ok(match c {
            Clause::Match(f) => f,
            Clause::Value(e, d) if d & PARAM != 0 => {
                let key = self.param_key(&e, source);
                Filter::ParamBool(self.input(key, e, d, false, true))
            }
            Clause::Value(e, _) => Filter::Row(e),
        })
    }

    fn clause(&mut self, e: &SqlExpr) -> Result<Clause, String> {
        let data = self.scope.mode == Mode::Data;
        match e {
            SqlExpr::Nested(inner) => self.clause(inner),
            SqlExpr::BinaryOp {
                left,
                op: op @ (BinaryOperator::And | BinaryOperator::Or),
                right,
            } => {
                let l = self.clause(left)?;
                let r = self.clause(right)?;
                let bin = if *op == BinaryOperator::And { BinOp::And } else { BinOp::Or };
                if let (Clause::Value(a, da), Clause::Value(b, db)) = (&l, &r) {
                    let d = da | db;
                    if !is_mixed(d) && (d & BUCKET == 0) {
                        let folded = Expr::Bin(bin, Box::new(a.clone()), Box::new(b.clone()));
                        return Ok(Clause::Value(folded, d));
                    }
                }
                let lf = self.as_filter(l, left)?;
                let rf = self.as_filter(r, right)?;
                if bin == BinOp::And {
                    Ok(Clause::Match(Filter::And(Box::new(lf), Box::new(rf))))
                } else {
                    if keys(&lf) != keys(&rf) {
                        return Err("Left and right sides of OR must use the same parameters, or split into separate queries.".into());
                    }
                    Ok(Clause::Match(Filter::Or(Box::new(lf), Box::new(rf))))
                }
            }
            SqlExpr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => {
                let (a, da) = self.scope.expr(left)?;
                let (b, db) = self.scope.expr(right)?;
                if data && da & BUCKET != 0 && db & BUCKET != 0 {
                    return Err("Cannot have bucket parameters on both sides of = operator".into());
                }
                if self.row_like(da) && db & PARAM != 0 && !self.row_like(db) {
                    let key = self.param_key(&b, right);
                    let i = self.input(key, b, db, false, false);
                    return Ok(Clause::Match(Filter::Eq(a, i)));
                }
                if self.row_like(db) && da & PARAM != 0 && !self.row_like(da) {
                    let key = self.param_key(&a, left);
                    let i = self.input(key, a, da, false, false);
                    return Ok(Clause::Match(Filter::Eq(b, i)));
                }
                if is_mixed(da | db) {
                    return Err("Cannot use table values and parameters in the same clauses".into());
                }
                Ok(Clause::Value(Expr::Bin(BinOp::Eq, Box::new(a), Box::new(b)), da | db))
            }
            SqlExpr::InList {
                expr: left,
                list,
                negated: false,
            } if list.len() == 1 => {
                let right = &list[0];
                let (a, da) = self.scope.expr(left)?;
                let (b, db) = self.scope.expr(right)?;
                let a_param = da & PARAM != 0 && !self.row_like(da);
                let b_param = db & PARAM != 0 && !self.row_like(db);
                if a_param && self.row_like(db) {
                    let key = self.param_key(&a, left);
                    let i = self.input(key, a, da, false, false);
                    return Ok(Clause::Match(Filter::ParamInRow(i, b)));
                }
                if b_param && self.row_like(da) {
                    if data {
                        return Err("Cannot use bucket parameters on the right side of IN operators".into());
                    }
                    let key = self.param_key(&b, right);
                    let i = self.input(key, b, db, true, false);
                    return Ok(Clause::Match(Filter::RowInParam(a, i)));
                }
                if data && (da | db) & BUCKET != 0 {
                    return Err("Cannot use bucket parameters in expressions".into());
                }
                if is_mixed(da | db) {
                    return Err("Cannot use table values and parameters in the same clauses".into());
                }
                Ok(Clause::Value(Expr::JsonIn(Box::new(a), Box::new(b)), da | db))
            }
            SqlExpr::UnaryOp {
                op: UnaryOperator::Not,
                expr: inner,
            } => match self.clause(inner)? {
                Clause::Match(_) => Err("Parameter match clauses cannot be used here".into()),
                Clause::Value(_, d) if data && d & BUCKET != 0 => Err("Cannot use bucket parameters in expressions".into()),
                Clause::Value(x, d) => Ok(Clause::Value(Expr::Not(Box::new(x)), d)),
            },
            other => {
                let (x, d) = self.scope.expr(other)?;
                Ok(Clause::Value(x, d))
            }
        }
    }
}

fn keys(f: &Filter) -> BTreeSet<usize> {
    let mut out = BTreeSet::new();
    fn walk(f: &Filter, out: &mut BTreeSet<usize>) {
        match f {
            Filter::Row(_) => {}
            Filter::ParamBool(i) | Filter::Eq(_, i) | Filter::ParamInRow(i, _) => {
                out.insert(*i);
            }
            Filter::RowInParam(_, i) => {
                out.insert(*i);
            }
            Filter::And(a, b) | Filter::Or(a, b) => {
                walk(a, out);
                walk(b, out);
            }
        }
    }
    walk(f, &mut out);
    out
}

/// The set of input indexes a filter constrains.
pub(crate) fn filter_keys(f: &Filter) -> BTreeSet<usize> {
    keys(f)
}

impl Filter {
    /// Evaluates the filter on a row: the list of satisfying assignments.
    pub(crate) fn assignments(&self, ctx: &Ctx<'_>) -> Result<Vec<Assignment>, String> {
        Ok(match self {
            Filter::Row(e) => {
                if sqlite_bool(&e.eval(ctx)?) {
                    vec![Vec::new()]
                } else {
                    Vec::new()
                }
            }
            Filter::ParamBool(i) => vec![vec![(*i, SqliteValue::Integer(1))]],
            Filter::Eq(e, i) | Filter::RowInParam(e, i) => match e.eval(ctx)? {
                SqliteValue::Null | SqliteValue::Blob(_) => Vec::new(),
                v => vec![vec![(*i, v)]],
            },
            Filter::ParamInRow(i, e) => match e.eval(ctx)? {
                SqliteValue::Null => Vec::new(),
                v => json_array_values(&v)?.into_iter().map(|x| vec![(*i, x)]).collect(),
            },
            Filter::And(a, b) => {
                let left = a.assignments(ctx)?;
                if left.is_empty() {
                    return Ok(left);
                }
                let right = b.assignments(ctx)?;
                let total = left.len().saturating_mul(right.len());
                if total > MAX_ASSIGNMENTS {
                    return Err(format!(
                        "Too many bucket parameter combinations for one row ({total}, limit of {MAX_ASSIGNMENTS})"
                    ));
                }
                let mut out = Vec::with_capacity(total);
                for l in &left {
                    for r in &right {
                        let mut merged = l.clone();
                        for (k, v) in r {
                            match merged.iter_mut().find(|(mk, _)| mk == k) {
                                Some(slot) => slot.1 = v.clone(),
                                None => merged.push((*k, v.clone())),
                            }
                        }
                        out.push(merged);
                    }
                }
                out
            }
            Filter::Or(a, b) => {
                let mut out = a.assignments(ctx)?;
                out.extend(b.assignments(ctx)?);
                out
            }
        })
    }
}

/// The value an assignment gives to input `i` (NULL when absent).
pub(crate) fn assigned(a: &Assignment, i: usize) -> SqliteValue {
    a.iter().find(|(k, _)| *k == i).map(|(_, v)| v.clone()).unwrap_or(SqliteValue::Null)
}

/// Request-time values of an input: `None` means "no lookup possible".
pub(crate) fn request_values(input: &ParamInput, ctx: &Ctx<'_>) -> Result<Option<Vec<SqliteValue>>, String> {
    let v = input.expr.eval(ctx)?;
    if input.as_bool {
        return Ok(Some(vec![SqliteValue::from(sqlite_bool(&v))]));
    }
    if input.expanding {
        return Ok(match &v {
            SqliteValue::Text(_) => json_array_values(&v)
                .ok()
                .map(|items| items.iter().map(SqliteValue::normalized).collect()),
            _ => None,
        });
    }
    Ok(match v {
        SqliteValue::Blob(_) => None,
        v => Some(vec![v.normalized()]),
    })
}

#[cfg(test)]
mod tests {
    use crate::{Row, SourceTableName, SqliteValue, SyncRules, SyncRulesOptions};

    /// Found by fuzzing: `AND` of two `IN`s over row arrays is a cartesian product; 3000-element
    /// arrays (14 KB each) took 18 s and 9 M rows, larger ones exhausted memory. Now an error.
    #[test]
    fn and_product_is_bounded() {
        let yaml = "bucket_definitions:\n  b:\n    parameters: SELECT token_parameters.a AS a, token_parameters.b AS b\n    data:\n      - SELECT id FROM t WHERE bucket.a IN t.x AND bucket.b IN t.y\n";
        let rules = SyncRules::parse(yaml, &SyncRulesOptions::default()).unwrap();
        let table = SourceTableName {
            connection_tag: "default".into(),
            schema: "public".into(),
            name: "t".into(),
        };
        let array = |n: usize| SqliteValue::Text(format!("[{}]", (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")));
        let mut row = Row::new();
        row.push("id", SqliteValue::Text("1".into()));
        row.push("x", array(3000));
        row.push("y", array(3000));
        let out = rules.evaluate_row(&table, &row);
        assert_eq!(out.len(), 1);
        let message = out[0].as_ref().unwrap_err().message.clone();
        assert!(
            message.starts_with("Too many bucket parameter combinations for one row (9000000"),
            "{message}"
        );
        row.set("y", array(30));
        assert_eq!(rules.evaluate_row(&table, &row).len(), 90_000);
    }
}
