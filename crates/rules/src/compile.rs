//! Compiles `sqlparser` expressions into [`Expr`] trees, tracking which
//! inputs (row, request, bucket parameters) each sub-expression depends on.

use crate::expr::{BinOp, CastType, Expr, RequestRef};
use crate::functions;
use crate::sql::{call_args, fold, object_parts, substring_args};
use crate::value::SqliteValue;
use sqlparser::ast::{BinaryOperator, CastKind, Expr as SqlExpr, UnaryOperator, Value};

/// Depends on the source row.
pub(crate) const ROW: u8 = 1;
/// Depends on request data (parameter queries) or `bucket.*` (data queries).
pub(crate) const PARAM: u8 = 2;
/// Uses authenticated request data (JWT).
pub(crate) const AUTH: u8 = 4;
/// Uses unauthenticated request data (client parameters).
pub(crate) const UNAUTH: u8 = 8;
/// Uses a `bucket.*` parameter.
pub(crate) const BUCKET: u8 = 16;

/// Which kind of query is being compiled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Mode {
    Data,
    ParamTable,
    ParamStatic,
    ParamEach,
}

/// Names visible to a query.
pub(crate) struct Scope {
    pub mode: Mode,
    /// Qualifiers that refer to the FROM row (table name as written, alias).
    pub tables: Vec<String>,
    /// `_table_suffix` is available.
    pub wildcard: bool,
    /// Alias of `json_each(...)`.
    pub each_alias: Option<String>,
}

/// True when the dependencies mix row data and parameters.
pub(crate) fn is_mixed(d: u8) -> bool {
    d & ROW != 0 && d & PARAM != 0
}

impl Scope {
    fn combine(&self, parts: &[u8]) -> Result<u8, String> {
        let d = parts.iter().fold(0, |a, b| a | b);
        if self.mode == Mode::Data && d & BUCKET != 0 {
            return Err("Cannot use bucket parameters in expressions".into());
        }
        if is_mixed(d) {
            return Err("Cannot use table values and parameters in the same clauses".into());
        }
        Ok(d)
    }

    fn column(&self, name: String) -> (Expr, u8) {
        if name == "_table_suffix" && self.wildcard {
            (Expr::TableSuffix, ROW)
        } else {
            (Expr::Column(name), ROW)
        }
    }

    fn identifier(&self, name: String) -> Result<(Expr, u8), String> {
        match self.mode {
            Mode::Data | Mode::ParamTable => Ok(self.column(name)),
            Mode::ParamEach if name == "value" => Ok((Expr::EachValue, PARAM)),
            Mode::ParamEach if name == "key" => Ok((Expr::EachKey, PARAM)),
            _ => Err(format!("Undefined reference: {name}")),
        }
    }

    fn compound(&self, q: String, c: String) -> Result<(Expr, u8), String> {
        let is_param = self.mode != Mode::Data;
        match q.as_str() {
            "bucket" if self.mode == Mode::Data => Ok((Expr::Bucket(c), PARAM | BUCKET)),
            "token_parameters" if is_param => Ok((Expr::Request(RequestRef::Token(c)), PARAM | AUTH)),
            "user_parameters" if is_param => Ok((Expr::Request(RequestRef::User(c)), PARAM | UNAUTH)),
            _ if self.tables.contains(&q) => Ok(self.column(c)),
            _ if self.each_alias.as_deref() == Some(q.as_str()) => {
                self.identifier(c.clone()).map_err(|_| format!("Undefined reference: {q}.{c}"))
            }
            _ => Err(format!("Undefined table {q}")),
        }
    }

    /// Compiles an expression used as a value.
    pub(crate) fn expr(&self, e: &SqlExpr) -> Result<(Expr, u8), String> {
        match e {
            SqlExpr::Identifier(i) => self.identifier(fold(i)),
            SqlExpr::CompoundIdentifier(parts) => match parts.as_slice() {
                [q, c] => self.compound(fold(q), fold(c)),
                _ => Err("Schema is not supported in column references".into()),
            },
            SqlExpr::Value(v) => Ok((Expr::Lit(literal(&v.value)?), 0)),
            SqlExpr::Nested(inner) => self.expr(inner),
            SqlExpr::UnaryOp { op, expr } => match (op, expr.as_ref()) {
                (UnaryOperator::Not, inner) => {
                    let (x, d) = self.expr(inner)?;
                    Ok((Expr::Not(Box::new(x)), self.combine(&[d])?))
                }
                (UnaryOperator::Minus, SqlExpr::Value(v)) => match literal(&v.value)? {
                    SqliteValue::Integer(i) => Ok((Expr::Lit(SqliteValue::Integer(-i)), 0)),
                    SqliteValue::Real(f) => Ok((Expr::Lit(SqliteValue::Real(-f)), 0)),
                    _ => Err("Unary minus is not supported".into()),
                },
                (UnaryOperator::Plus, SqlExpr::Value(_)) => self.expr(expr),
                _ => Err(format!("Operator not supported: {op}")),
            },
            SqlExpr::BinaryOp { left, op, right } => {
                let op = bin_op(op)?;
                // Legacy member access only takes string keys (errata:
                // `jb -> 1` fails with "Unsupported member operation").
                if matches!(op, BinOp::Arrow | BinOp::LongArrow)
                    && matches!(right.as_ref(), SqlExpr::Value(v) if matches!(v.value, Value::Number(..)))
                {
                    return Err("Unsupported member operation".into());
                }
                let (l, dl) = self.expr(left)?;
                let (r, dr) = self.expr(right)?;
                let d = self.combine(&[dl, dr])?;
                Ok((Expr::Bin(op, Box::new(l), Box::new(r)), d))
            }
            SqlExpr::IsNull(x) | SqlExpr::IsNotNull(x) => {
                let (inner, d) = self.expr(x)?;
                let negated = matches!(e, SqlExpr::IsNotNull(_));
                Ok((Expr::IsNull(Box::new(inner), negated), self.combine(&[d])?))
            }
            SqlExpr::IsTrue(x) | SqlExpr::IsFalse(x) | SqlExpr::IsNotTrue(x) | SqlExpr::IsNotFalse(x) => {
                let (inner, d) = self.expr(x)?;
                let (op, val) = match e {
                    SqlExpr::IsTrue(_) => (BinOp::Is, 1),
                    SqlExpr::IsFalse(_) => (BinOp::Is, 0),
                    SqlExpr::IsNotTrue(_) => (BinOp::IsNot, 1),
                    _ => (BinOp::IsNot, 0),
                };
                let lit = Expr::Lit(SqliteValue::Integer(val));
                Ok((Expr::Bin(op, Box::new(inner), Box::new(lit)), self.combine(&[d])?))
            }
            SqlExpr::Cast { kind, expr, data_type, .. } => {
                if !matches!(kind, CastKind::Cast | CastKind::DoubleColon) {
                    return Err(format!("{kind:?} not supported here"));
                }
                let name = data_type.to_string().to_lowercase();
                let t = cast_type(&name).ok_or_else(|| format!("CAST not supported for '{name}'"))?;
                let (x, d) = self.expr(expr)?;
                Ok((Expr::Cast(Box::new(x), t), self.combine(&[d])?))
            }
            SqlExpr::Substring { .. } => self.call("substring", &substring_args(e)),
            SqlExpr::InList { expr, list, negated } => {
                let [right] = list.as_slice() else {
                    return Err("IN lists are not supported; use a JSON array".into());
                };
                if *negated {
                    return Err("Operator not supported: NOT IN".into());
                }
                let (l, dl) = self.expr(expr)?;
                let (r, dr) = self.expr(right)?;
                let d = self.combine(&[dl, dr])?;
                Ok((Expr::JsonIn(Box::new(l), Box::new(r)), d))
            }
            SqlExpr::Function(f) => self.function(f),
            SqlExpr::Like { .. } | SqlExpr::ILike { .. } => Err("Operator not supported: LIKE".into()),
            SqlExpr::InSubquery { .. } | SqlExpr::Subquery(_) | SqlExpr::Exists { .. } => Err("Subqueries are not supported yet".into()),
            other => Err(format!("{} not supported here", expr_kind(other))),
        }
    }

    fn function(&self, f: &sqlparser::ast::Function) -> Result<(Expr, u8), String> {
        let args = call_args(f, "Subqueries are not supported yet")?;
        let parts = object_parts(&f.name)?;
        match parts.as_slice() {
            [name] => self.call(name, &args),
            [schema, name] if schema == "request" => {
                if self.mode == Mode::Data {
                    return Err("request schema is not available in data queries".into());
                }
                let (r, d) = match name.as_str() {
                    "user_id" => (RequestRef::UserId, AUTH),
                    "jwt" => (RequestRef::Jwt, AUTH),
                    "parameters" => (RequestRef::Parameters, UNAUTH),
                    _ => return Err(format!("Function 'request.{name}' is not defined")),
                };
                if !args.is_empty() {
                    return Err(format!("Function 'request.{name}' takes 0 arguments."));
                }
                Ok((Expr::Request(r), PARAM | d))
            }
            _ => Err(format!("Function '{}' is not defined", parts.join("."))),
        }
    }

    fn call(&self, name: &str, args: &[SqlExpr]) -> Result<(Expr, u8), String> {
        let Some((func, min, max)) = functions::lookup(name) else {
            return Err(format!("Function '{name}' is not defined"));
        };
        if args.len() < min || args.len() > max {
            let n = if min == max { min.to_string() } else { format!("{min}-{max}") };
            return Err(format!("Function '{name}' takes {n} arguments."));
        }
        let mut compiled = Vec::with_capacity(args.len());
        let mut deps = Vec::with_capacity(args.len());
        for a in args {
            let (x, d) = self.expr(a)?;
            compiled.push(x);
            deps.push(d);
        }
        Ok((Expr::Call(func, compiled), self.combine(&deps)?))
    }
}

/// The CAST target for a (lower-case) type name.
pub(crate) fn cast_type(name: &str) -> Option<CastType> {
    Some(match name {
        "text" => CastType::Text,
        "integer" => CastType::Integer,
        "real" => CastType::Real,
        "numeric" => CastType::Numeric,
        "blob" => CastType::Blob,
        _ => return None,
    })
}

pub(crate) fn literal(v: &Value) -> Result<SqliteValue, String> {
    Ok(match v {
        Value::Number(n, _) => {
            if n.contains(['.', 'e', 'E']) {
                SqliteValue::Real(n.parse::<f64>().map_err(|e| e.to_string())?)
            } else {
                match n.parse::<i64>() {
                    Ok(i) => SqliteValue::Integer(i),
                    Err(_) => SqliteValue::Real(n.parse::<f64>().map_err(|e| e.to_string())?),
                }
            }
        }
        Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => SqliteValue::Text(s.clone()),
        Value::Boolean(b) => SqliteValue::from(*b),
        Value::Null => SqliteValue::Null,
        Value::Placeholder(_) => return Err("SQL parameters are not allowed. Use parameter functions instead".into()),
        other => return Err(format!("Literal not supported here: {other}")),
    })
}

pub(crate) fn bin_op(op: &BinaryOperator) -> Result<BinOp, String> {
    Ok(match op {
        BinaryOperator::Eq => BinOp::Eq,
        BinaryOperator::NotEq => BinOp::NotEq,
        BinaryOperator::Lt => BinOp::Lt,
        BinaryOperator::Gt => BinOp::Gt,
        BinaryOperator::LtEq => BinOp::LtEq,
        BinaryOperator::GtEq => BinOp::GtEq,
        BinaryOperator::Plus => BinOp::Add,
        BinaryOperator::Minus => BinOp::Sub,
        BinaryOperator::Multiply => BinOp::Mul,
        BinaryOperator::Divide => BinOp::Div,
        BinaryOperator::StringConcat => BinOp::Concat,
        BinaryOperator::And => BinOp::And,
        BinaryOperator::Or => BinOp::Or,
        BinaryOperator::Arrow => BinOp::Arrow,
        BinaryOperator::LongArrow => BinOp::LongArrow,
        other => return Err(format!("Operator not supported: {other}")),
    })
}

/// A short name for an unsupported expression kind.
pub(crate) fn expr_kind(e: &SqlExpr) -> String {
    let dbg = format!("{e:?}");
    dbg.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("Expression").to_string()
}

/// Folds a constant expression (no row/request inputs) to its value.
pub(crate) fn constant(e: &Expr) -> Option<SqliteValue> {
    e.eval(&crate::expr::Ctx::default()).ok()
}
