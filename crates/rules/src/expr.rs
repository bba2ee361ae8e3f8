//! Compiled expression tree and its evaluation with the reference's
//! JavaScript semantics (two-valued AND/OR, `NOT NULL` = 1, JSON operators).

use crate::functions::{call, Func};
use crate::json::{self, Json};
use crate::request::RequestParameters;
use crate::table::SourceTableName;
use crate::value::{cast_integer, cast_numeric, cast_real, compare, sqlite_bool, to_blob, to_text, Row, SqliteValue};
use std::borrow::Cow;
use std::cmp::Ordering;

/// A request-derived value in a parameter query.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RequestRef {
    UserId,
    Jwt,
    Parameters,
    Token(String),
    User(String),
    /// `subscription.parameters()` (streams).
    Subscription,
}

/// Binary operators supported by the legacy dialect.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum BinOp {
    Eq,
    NotEq,
    Lt,
    Gt,
    LtEq,
    GtEq,
    Add,
    Sub,
    Mul,
    Div,
    Concat,
    And,
    Or,
    Arrow,
    LongArrow,
    Is,
    IsNot,
}

/// CAST target types.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum CastType {
    Text,
    Integer,
    Real,
    Numeric,
    Blob,
}

/// A compiled expression.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Expr {
    Lit(SqliteValue),
    Column(String),
    TableSuffix,
    Request(RequestRef),
    EachKey,
    EachValue,
    /// `bucket.<name>` (data queries; only appears as a filter key).
    Bucket(String),
    Not(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    IsNull(Box<Expr>, bool),
    JsonIn(Box<Expr>, Box<Expr>),
    Cast(Box<Expr>, CastType),
    Call(Func, Vec<Expr>),
    /// `CASE [operand] WHEN .. THEN .. [ELSE ..] END` (edition 3).
    Case {
        operand: Option<Box<Expr>>,
        whens: Vec<(Expr, Expr)>,
        otherwise: Option<Box<Expr>>,
    },
    /// `alias.table_name()` / `alias.schema()` (edition 3).
    TableName,
    SchemaName,
    /// Accepted by the compiler but fails for every row, as in the reference.
    Fail(String),
    /// `x BETWEEN low AND high` (edition 3).
    Between(Box<Expr>, Box<Expr>, Box<Expr>),
    /// Scalar `x IN (a, b, ..)` (edition 3).
    InList(Box<Expr>, Vec<Expr>),
}

/// Everything an expression may read while being evaluated.
#[derive(Clone, Copy, Default)]
pub(crate) struct Ctx<'a> {
    pub row: Option<&'a Row>,
    pub suffix: Option<&'a str>,
    pub request: Option<&'a RequestParameters>,
    pub each: Option<(&'a SqliteValue, &'a SqliteValue)>,
    pub fixed_json: bool,
    /// The source table of `row` (edition-3 row metadata functions).
    pub table: Option<&'a SourceTableName>,
}

type EvalResult = Result<SqliteValue, String>;

impl Expr {
    /// Like [`Expr::eval`], but borrows row values and literals instead of cloning them: the
    /// row-evaluation hot path reads many text columns only to compare or copy them once.
    pub(crate) fn eval_ref<'c>(&'c self, ctx: &Ctx<'c>) -> Result<Cow<'c, SqliteValue>, String> {
        match self {
            Expr::Lit(v) => Ok(Cow::Borrowed(v)),
            Expr::Column(name) => Ok(ctx
                .row
                .and_then(|r| r.get(name))
                .map_or(Cow::Owned(SqliteValue::Null), Cow::Borrowed)),
            other => other.eval(ctx).map(Cow::Owned),
        }
    }

    /// Evaluates the expression.
    pub(crate) fn eval(&self, ctx: &Ctx<'_>) -> EvalResult {
        Ok(match self {
            Expr::Lit(v) => v.clone(),
            Expr::Column(name) => ctx.row.and_then(|r| r.get(name)).cloned().unwrap_or(SqliteValue::Null),
            Expr::TableSuffix => ctx.suffix.map(|s| SqliteValue::Text(s.to_string())).unwrap_or(SqliteValue::Null),
            Expr::Request(r) => match ctx.request {
                None => SqliteValue::Null,
                Some(req) => match r {
                    RequestRef::UserId => req.user_id.clone(),
                    RequestRef::Jwt => SqliteValue::Text(req.jwt_text.clone()),
                    RequestRef::Parameters => SqliteValue::Text(req.parameters_text.clone()),
                    RequestRef::Token(k) => req.token_parameter(k),
                    RequestRef::User(k) => req.user_parameter(k),
                    RequestRef::Subscription => SqliteValue::Text(req.subscription_text.clone()),
                },
            },
            Expr::EachKey => ctx.each.map(|e| e.0.clone()).unwrap_or(SqliteValue::Null),
            Expr::EachValue => ctx.each.map(|e| e.1.clone()).unwrap_or(SqliteValue::Null),
            Expr::Bucket(name) => return Err(format!("bucket.{name} cannot be evaluated here")),
            Expr::Not(e) => SqliteValue::from(!sqlite_bool(&*e.eval_ref(ctx)?)),
            Expr::IsNull(e, negated) => SqliteValue::from(e.eval_ref(ctx)?.is_null() != *negated),
            Expr::Cast(e, t) => cast(&*e.eval_ref(ctx)?, *t),
            Expr::JsonIn(l, r) => json_in(&*l.eval_ref(ctx)?, &*r.eval_ref(ctx)?)?,
            Expr::Call(f, args) => {
                let vals = args.iter().map(|a| a.eval(ctx)).collect::<Result<Vec<_>, _>>()?;
                call(*f, &vals, ctx.fixed_json)?
            }
            Expr::TableName => ctx.table.map_or(SqliteValue::Null, |t| SqliteValue::Text(t.name.clone())),
            Expr::SchemaName => ctx.table.map_or(SqliteValue::Null, |t| SqliteValue::Text(t.schema.clone())),
            Expr::Fail(message) => return Err(message.clone()),
            Expr::Case { operand, whens, otherwise } => return case(operand.as_deref(), whens, otherwise.as_deref(), ctx),
            Expr::Between(x, low, high) => {
                let x = x.eval(ctx)?;
                let lower = binary(BinOp::GtEq, &x, &low.eval(ctx)?, ctx.fixed_json)?;
                let upper = binary(BinOp::LtEq, &x, &high.eval(ctx)?, ctx.fixed_json)?;
                if lower.is_null() || upper.is_null() {
                    SqliteValue::Null
                } else {
                    SqliteValue::from(sqlite_bool(&lower) && sqlite_bool(&upper))
                }
            }
            Expr::InList(x, items) => in_list(&x.eval(ctx)?, items, ctx)?,
            Expr::Bin(op, l, r) => {
                let a = l.eval_ref(ctx)?;
                match op {
                    BinOp::And if !sqlite_bool(&a) => return Ok(SqliteValue::Integer(0)),
                    BinOp::Or if sqlite_bool(&a) => return Ok(SqliteValue::Integer(1)),
                    _ => {}
                }
                binary(*op, &a, &*r.eval_ref(ctx)?, ctx.fixed_json)?
            }
        })
    }
}

fn case(operand: Option<&Expr>, whens: &[(Expr, Expr)], otherwise: Option<&Expr>, ctx: &Ctx<'_>) -> EvalResult {
    let subject = operand.map(|o| o.eval(ctx)).transpose()?;
    for (when, then) in whens {
        let w = when.eval(ctx)?;
        let hit = match &subject {
            None => sqlite_bool(&w),
            Some(s) => !s.is_null() && !w.is_null() && compare(s, &w)? == Ordering::Equal,
        };
        if hit {
            return then.eval(ctx);
        }
    }
    otherwise.map_or(Ok(SqliteValue::Null), |e| e.eval(ctx))
}

/// Scalar IN: NULL target is NULL; a match is 1; no match with a NULL item is NULL.
fn in_list(x: &SqliteValue, items: &[Expr], ctx: &Ctx<'_>) -> EvalResult {
    if x.is_null() {
        return Ok(SqliteValue::Null);
    }
    let mut saw_null = false;
    for item in items {
        let v = item.eval(ctx)?;
        if v.is_null() {
            saw_null = true;
        } else if compare(x, &v)? == Ordering::Equal {
            return Ok(SqliteValue::Integer(1));
        }
    }
    Ok(if saw_null { SqliteValue::Null } else { SqliteValue::Integer(0) })
}

/// Applies a CAST.
pub(crate) fn cast(v: &SqliteValue, t: CastType) -> SqliteValue {
    match t {
        CastType::Text => to_text(v).map_or(SqliteValue::Null, SqliteValue::Text),
        CastType::Blob => to_blob(v).map_or(SqliteValue::Null, SqliteValue::Blob),
        CastType::Integer => cast_integer(v),
        CastType::Real => cast_real(v),
        CastType::Numeric => cast_numeric(v),
    }
}

/// Evaluates a binary operator on two values.
pub(crate) fn binary(op: BinOp, a: &SqliteValue, b: &SqliteValue, fixed_json: bool) -> EvalResult {
    use SqliteValue::*;
    let cmp = |f: fn(Ordering) -> bool| -> EvalResult {
        if a.is_null() || b.is_null() {
            return Ok(Null);
        }
        Ok(SqliteValue::from(f(compare(a, b)?)))
    };
    match op {
        BinOp::And => Ok(SqliteValue::from(sqlite_bool(a) && sqlite_bool(b))),
        BinOp::Or => Ok(SqliteValue::from(sqlite_bool(a) || sqlite_bool(b))),
        BinOp::Eq => cmp(|o| o == Ordering::Equal),
        BinOp::NotEq => cmp(|o| o != Ordering::Equal),
        BinOp::Lt => cmp(|o| o == Ordering::Less),
        BinOp::Gt => cmp(|o| o == Ordering::Greater),
        BinOp::LtEq => cmp(|o| o != Ordering::Greater),
        BinOp::GtEq => cmp(|o| o != Ordering::Less),
        BinOp::Is | BinOp::IsNot => {
            let same = match (a.is_null(), b.is_null()) {
                (true, true) => true,
                (false, false) => compare(a, b)? == Ordering::Equal,
                _ => false,
            };
            Ok(SqliteValue::from(same == (op == BinOp::Is)))
        }
        BinOp::Concat => Ok(match (to_text(a), to_text(b)) {
            (Some(x), Some(y)) => Text(x + &y),
            _ => Null,
        }),
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div => Ok(arith(op, a, b)),
        BinOp::Arrow | BinOp::LongArrow => {
            let found = json_path(a, b, fixed_json, false)?;
            Ok(match found {
                None => Null,
                Some(Json::Null) if op == BinOp::Arrow => {
                    if fixed_json {
                        Text("null".into())
                    } else {
                        Null
                    }
                }
                Some(v) if op == BinOp::Arrow => Text(v.to_text()),
                Some(v) => v.to_sqlite(!fixed_json),
            })
        }
    }
}

fn arith(op: BinOp, a: &SqliteValue, b: &SqliteValue) -> SqliteValue {
    use SqliteValue::*;
    if a.is_null() || b.is_null() {
        return Null;
    }
    let (x, y) = (cast_numeric(a), cast_numeric(b));
    if let (Integer(i), Integer(j)) = (&x, &y) {
        let r = match op {
            BinOp::Add => i.checked_add(*j),
            BinOp::Sub => i.checked_sub(*j),
            BinOp::Mul => i.checked_mul(*j),
            _ if *j == 0 => return Null,
            _ => i.checked_div(*j),
        };
        if let Some(r) = r {
            return Integer(r);
        }
    }
    let f = |v: &SqliteValue| match v {
        Integer(i) => *i as f64,
        Real(r) => *r,
        _ => 0.0,
    };
    let (p, q) = (f(&x), f(&y));
    Real(match op {
        BinOp::Add => p + q,
        BinOp::Sub => p - q,
        BinOp::Mul => p * q,
        _ if q == 0.0 => return Null,
        _ => p / q,
    })
}

/// Resolves a JSON path on `source`. `Ok(None)` means NULL/missing.
pub(crate) fn json_path(source: &SqliteValue, path: &SqliteValue, fixed_json: bool, require_dollar: bool) -> Result<Option<Json>, String> {
    let (Some(text), Some(path)) = (to_text(source), to_text(path)) else {
        return Ok(None);
    };
    if require_dollar && !path.starts_with('$') {
        return Err("JSON path must start with $.".into());
    }
    let doc = json::parse(&text)?;
    let mut parts: Vec<&str> = if fixed_json && !path.starts_with('$') {
        vec![path.as_str()]
    } else {
        path.split('.').collect()
    };
    if parts.first().is_some_and(|p| p.starts_with('$')) {
        parts.remove(0);
    }
    let mut cur = &doc;
    for p in parts {
        match cur.member(p) {
            Some(next) => cur = next,
            None => return Ok(None),
        }
    }
    Ok(Some(cur.clone()))
}

/// `x IN json_array_text`.
fn json_in(x: &SqliteValue, arr: &SqliteValue) -> EvalResult {
    if x.is_null() || arr.is_null() {
        return Ok(SqliteValue::Null);
    }
    let items = json_array_values(arr)?;
    for item in &items {
        if !item.is_null() && compare(x, item)? == Ordering::Equal {
            return Ok(SqliteValue::Integer(1));
        }
    }
    Ok(SqliteValue::Integer(0))
}

/// Parses TEXT holding a JSON array into SQLite values.
pub(crate) fn json_array_values(v: &SqliteValue) -> Result<Vec<SqliteValue>, String> {
    let SqliteValue::Text(t) = v else {
        return Err("IN is only supported on JSON arrays".into());
    };
    match json::parse(t) {
        Ok(Json::Array(items)) => Ok(items.iter().map(|i| i.to_sqlite(false)).collect()),
        _ => Err("IN is only supported on JSON arrays".into()),
    }
}
