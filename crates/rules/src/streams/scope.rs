//! Expression compilation for sync streams: names resolve against the sources of one query
//! branch (tables, `json_each` expansions, inlined subqueries and CTEs), and every compiled
//! expression carries the set of sources and request inputs it reads.

use crate::compile::{bin_op, cast_type, expr_kind, literal};
use crate::expr::{BinOp, Expr, RequestRef};
use crate::functions;
use crate::sql::{call_args, fold, object_parts, substring_args};
use crate::value::SqliteValue;
use sqlparser::ast::{BinaryOperator, CastKind, Expr as SqlExpr, UnaryOperator};

/// What an expression reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Deps {
    /// Bit `i`: source `i` of the branch.
    pub sources: u64,
    /// JWT claims (`auth.*`).
    pub auth: bool,
    /// Client-supplied values (`connection.*`, `subscription.*`).
    pub unauth: bool,
}

impl Deps {
    pub(crate) fn union(self, o: Deps) -> Deps {
        Deps {
            sources: self.sources | o.sources,
            auth: self.auth || o.auth,
            unauth: self.unauth || o.unauth,
        }
    }

    pub(crate) fn request(&self) -> bool {
        self.auth || self.unauth
    }

    pub(crate) fn source(i: usize) -> Deps {
        Deps {
            sources: 1 << i,
            ..Deps::default()
        }
    }
}

/// Column name under which a `json_each` source's `key`/`value` are evaluated: the expanded
/// row carries them next to the table's own columns, under names no table column can have.
pub(crate) fn each_column(source: usize, column: &str) -> String {
    format!("\u{1}{source}\u{1}{column}")
}

/// What a name in FROM stands for.
#[derive(Clone, Debug)]
pub(crate) enum Binding {
    /// A table source (index into the branch's sources).
    Table(usize),
    /// A `json_each` source.
    Each(usize),
    /// An inlined subquery or CTE: its output columns.
    Derived(Vec<(String, Expr, Deps)>),
}

/// Names visible in one (sub)query.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scope {
    pub names: Vec<(String, Binding)>,
    /// Compiling output columns: scalar IN lists are refused there (as the reference does).
    pub select_list: bool,
}

pub(crate) type Compiled = Result<(Expr, Deps), String>;

const SUBQUERY_POSITION: &str = "Invalid position for subqueries. Subqueries are only supported in WHERE clauses.";

const ROW_AND_PARAMS: &str = "This expression already references row data, so it can't also reference connection parameters unless the two are compared with an equals operator.";

impl Scope {
    fn binding(&self, name: &str) -> Option<&Binding> {
        self.names.iter().rev().find(|(n, _)| n == name).map(|(_, b)| b)
    }

    fn column_of(&self, binding: &Binding, column: &str, qualifier: &str) -> Compiled {
        match binding {
            Binding::Table(i) => Ok((Expr::Column(column.to_string()), Deps::source(*i))),
            Binding::Each(i) if column == "key" || column == "value" => Ok((Expr::Column(each_column(*i, column)), Deps::source(*i))),
            Binding::Each(_) => Err(format!("Unknown column '{column}' of json_each '{qualifier}'")),
            Binding::Derived(cols) => cols
                .iter()
                .find(|(n, ..)| n == column)
                .map(|(_, e, d)| (e.clone(), *d))
                .ok_or_else(|| format!("Column '{column}' is not defined in '{qualifier}'")),
        }
    }

    fn unqualified(&self, column: &str) -> Compiled {
        match self.names.as_slice() {
            [(name, binding)] => self.column_of(binding, column, name),
            [] => Err(format!("Undefined reference: {column}")),
            _ => Err("Invalid unqualified reference since multiple tables are in scope".into()),
        }
    }

    /// Compiles an expression used as a value.
    pub(crate) fn expr(&self, e: &SqlExpr) -> Compiled {
        match e {
            SqlExpr::Identifier(i) => self.unqualified(&fold(i)),
            SqlExpr::CompoundIdentifier(parts) => match parts.as_slice() {
                [q, c] => {
                    let q = fold(q);
                    let binding = self
                        .binding(&q)
                        .ok_or_else(|| format!("Table '{q}' has not been added in a FROM clause here."))?;
                    self.column_of(binding, &fold(c), &q)
                }
                _ => Err("Schema is not supported in column references".into()),
            },
            SqlExpr::Value(v) => {
                if matches!(&v.value, sqlparser::ast::Value::Number(n, _) if n.contains(['e', 'E'])) {
                    return Err("Exponent literals are not supported".into());
                }
                Ok((Expr::Lit(literal(&v.value)?), Deps::default()))
            }
            SqlExpr::Nested(inner) => self.expr(inner),
            SqlExpr::UnaryOp { op, expr } => match op {
                UnaryOperator::Not => self.map1(expr, |x| Expr::Not(Box::new(x))),
                UnaryOperator::Plus => self.expr(expr),
                UnaryOperator::Minus => Err("Unary minus is not currently supported".into()),
                other => Err(format!("Operator not supported: {other}")),
            },
            SqlExpr::BinaryOp { left, op, right } => self.binary(left, op, right),
            SqlExpr::IsNull(x) => self.map1(x, |x| Expr::IsNull(Box::new(x), false)),
            SqlExpr::IsNotNull(x) => self.map1(x, |x| Expr::IsNull(Box::new(x), true)),
            SqlExpr::IsTrue(x) => self.is_bool(x, BinOp::Is, 1),
            SqlExpr::IsFalse(x) => self.is_bool(x, BinOp::Is, 0),
            SqlExpr::IsNotTrue(x) => self.is_bool(x, BinOp::IsNot, 1),
            SqlExpr::IsNotFalse(x) => self.is_bool(x, BinOp::IsNot, 0),
            SqlExpr::Cast { kind, expr, data_type, .. } => {
                if !matches!(kind, CastKind::Cast | CastKind::DoubleColon) {
                    return Err(format!("{kind:?} not supported here"));
                }
                let t = cast_type(&data_type.to_string().to_lowercase()).ok_or("Invalid SQLite cast")?;
                self.map1(expr, |x| Expr::Cast(Box::new(x), t))
            }
            SqlExpr::Between { expr, negated, low, high } => {
                let (x, dx) = self.expr(expr)?;
                let (l, dl) = self.expr(low)?;
                let (h, dh) = self.expr(high)?;
                let between = Expr::Between(Box::new(x), Box::new(l), Box::new(h));
                let e = if *negated { Expr::Not(Box::new(between)) } else { between };
                Ok((e, check(dx.union(dl).union(dh))?))
            }
            SqlExpr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => self.case(operand.as_deref(), conditions, else_result.as_deref()),
            SqlExpr::InList { expr, list, negated } => {
                let (x, mut d) = self.expr(expr)?;
                let mut items = Vec::with_capacity(list.len());
                for item in list {
                    let (i, di) = self.expr(item)?;
                    d = d.union(di);
                    items.push(i);
                }
                let e = match (list.as_slice(), items.pop()) {
                    ([SqlExpr::Nested(_)], Some(arr)) => Expr::JsonIn(Box::new(x), Box::new(arr)),
                    (_, Some(_)) if self.select_list => return Err("IN lists are not supported in the select list".into()),
                    (_, Some(last)) => {
                        items.push(last);
                        Expr::InList(Box::new(x), items)
                    }
                    (_, None) => Expr::Lit(SqliteValue::Integer(0)),
                };
                let e = if *negated { Expr::Not(Box::new(e)) } else { e };
                Ok((e, check(d)?))
            }
            SqlExpr::Substring { special: false, .. } => Err("SUBSTRING(x FROM a FOR b) is not supported; use substring(x, a, b)".into()),
            SqlExpr::Substring { .. } => self.call("substring", &substring_args(e)),
            SqlExpr::Function(f) => self.function(f),
            SqlExpr::Like { .. } | SqlExpr::ILike { .. } => Err("LIKE expressions are not currently supported.".into()),
            SqlExpr::InSubquery { .. } | SqlExpr::Subquery(_) | SqlExpr::Exists { .. } => Err(SUBQUERY_POSITION.into()),
            other => Err(format!("{} not supported here", expr_kind(other))),
        }
    }

    fn map1(&self, x: &SqlExpr, f: impl FnOnce(Expr) -> Expr) -> Compiled {
        let (e, d) = self.expr(x)?;
        Ok((f(e), d))
    }

    fn is_bool(&self, x: &SqlExpr, op: BinOp, val: i64) -> Compiled {
        self.map1(x, |e| Expr::Bin(op, Box::new(e), Box::new(Expr::Lit(SqliteValue::Integer(val)))))
    }

    fn binary(&self, left: &SqlExpr, op: &BinaryOperator, right: &SqlExpr) -> Compiled {
        let (l, dl) = self.expr(left)?;
        let (r, dr) = self.expr(right)?;
        let d = check(dl.union(dr))?;
        let e = match op {
            BinaryOperator::PGOverlap => Expr::Call(functions::Func::JsonOverlap, vec![l, r]),
            // Edition 3 rewrites `a != b` to `NOT (a = b)`, so NULL operands give 1.
            BinaryOperator::NotEq => Expr::Not(Box::new(Expr::Bin(BinOp::Eq, Box::new(l), Box::new(r)))),
            BinaryOperator::Modulo
            | BinaryOperator::BitwiseAnd
            | BinaryOperator::BitwiseOr
            | BinaryOperator::PGBitwiseShiftLeft
            | BinaryOperator::PGBitwiseShiftRight => Expr::Fail(format!("Operator not supported: {op}")),
            other => Expr::Bin(bin_op(other)?, Box::new(l), Box::new(r)),
        };
        Ok((e, d))
    }

    fn case(&self, operand: Option<&SqlExpr>, conditions: &[sqlparser::ast::CaseWhen], otherwise: Option<&SqlExpr>) -> Compiled {
        let mut d = Deps::default();
        let mut compile = |e: &SqlExpr| -> Result<Expr, String> {
            let (x, dx) = self.expr(e)?;
            d = d.union(dx);
            Ok(x)
        };
        let operand = operand.map(&mut compile).transpose()?.map(Box::new);
        let whens = conditions
            .iter()
            .map(|w| Ok((compile(&w.condition)?, compile(&w.result)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let otherwise = otherwise.map(&mut compile).transpose()?.map(Box::new);
        Ok((Expr::Case { operand, whens, otherwise }, check(d)?))
    }

    fn function(&self, f: &sqlparser::ast::Function) -> Compiled {
        let args = call_args(f, SUBQUERY_POSITION)?;
        let parts = object_parts(&f.name)?;
        match parts.as_slice() {
            [name] => self.call(name, &args),
            [schema, name] => self.schema_call(schema, name, &args),
            _ => Err(format!("Unknown function '{}'", parts.join("."))),
        }
    }

    /// `auth.*`, `connection.*`, `subscription.*` and row metadata (`alias.table_suffix()`).
    fn schema_call(&self, schema: &str, name: &str, args: &[SqlExpr]) -> Compiled {
        let (whole, deps) = match schema {
            "auth" => (
                RequestRef::Jwt,
                Deps {
                    auth: true,
                    ..Deps::default()
                },
            ),
            "connection" => (
                RequestRef::Parameters,
                Deps {
                    unauth: true,
                    ..Deps::default()
                },
            ),
            "subscription" => (
                RequestRef::Subscription,
                Deps {
                    unauth: true,
                    ..Deps::default()
                },
            ),
            _ => return self.metadata_call(schema, name, args),
        };
        match (name, args) {
            ("user_id", []) if schema == "auth" => Ok((Expr::Request(RequestRef::UserId), deps)),
            ("parameters", []) => Ok((Expr::Request(whole), deps)),
            ("parameter", [key]) => {
                let (k, dk) = self.expr(key)?;
                if dk != Deps::default() {
                    return Err(format!("The argument of {schema}.parameter() must be a constant"));
                }
                let e = Expr::Bin(BinOp::LongArrow, Box::new(Expr::Request(whole)), Box::new(k));
                Ok((e, deps))
            }
            ("user_id" | "parameters", _) => Err("Expected at most 0 arguments".into()),
            ("parameter", _) => Err("Expected 1 argument".into()),
            _ => Err(format!("Unknown function '{schema}.{name}'")),
        }
    }

    fn metadata_call(&self, alias: &str, name: &str, args: &[SqlExpr]) -> Compiled {
        let Some(Binding::Table(i)) = self.binding(alias) else {
            return Err(format!("Unknown function '{alias}.{name}'"));
        };
        if !args.is_empty() {
            return Err("Expected at most 0 arguments".into());
        }
        match name {
            "table_suffix" => Ok((Expr::TableSuffix, Deps::source(*i))),
            "table_name" => Ok((Expr::TableName, Deps::source(*i))),
            "schema" => Ok((Expr::SchemaName, Deps::source(*i))),
            _ => Err(format!("Unknown function '{alias}.{name}'")),
        }
    }

    fn call(&self, name: &str, args: &[SqlExpr]) -> Compiled {
        if matches!(name, "random" | "randomblob") {
            return Err("Forbidden call: Sync definitions must be deterministic.".into());
        }
        let Some((func, min, max)) = functions::lookup(name).filter(|(f, ..)| f.in_edition3()) else {
            return Err(format!("Unknown function '{name}'"));
        };
        if name == "ifnull" && args.len() > 2 {
            // Edition 3's ifnull takes any number of arguments: the first that is not NULL.
            let (first, rest) = args.split_at(1);
            let (a, da) = self.expr(&first[0])?;
            let (b, db) = self.call(name, rest)?;
            return Ok((Expr::Call(func, vec![a, b]), check(da.union(db))?));
        }
        if args.len() < min {
            return Err(format!("Expected at least {min} arguments"));
        }
        if args.len() > max {
            return Err(format!("Expected at most {max} arguments"));
        }
        let mut compiled = Vec::with_capacity(args.len());
        let mut d = Deps::default();
        for a in args {
            let (x, dx) = self.expr(a)?;
            d = d.union(dx);
            compiled.push(x);
        }
        Ok((Expr::Call(func, compiled), check(d)?))
    }
}

/// Row data and request data may only meet in an equality between two expressions.
fn check(d: Deps) -> Result<Deps, String> {
    if d.sources != 0 && d.request() {
        return Err(ROW_AND_PARAMS.into());
    }
    Ok(d)
}
