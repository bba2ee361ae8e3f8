//! WHERE clauses to disjunctive normal form: every OR branch of a stream query becomes its own
//! bucket, so `a AND (b OR c)` is rewritten to `(a AND b) OR (a AND c)` before planning.

use sqlparser::ast::{BinaryOperator, Expr as SqlExpr, UnaryOperator};

/// A condition that is not AND/OR/NOT, possibly negated.
#[derive(Clone, Debug)]
pub(crate) struct Atom {
    pub negated: bool,
    pub expr: SqlExpr,
}

/// OR of ANDs.
pub(crate) type Dnf = Vec<Vec<Atom>>;

/// More branches than this is an error rather than an explosion of buckets.
const MAX_BRANCHES: usize = 100;

const TOO_MANY: &str = "For Sync Streams, inner OR operators need to be moved up to be top-level filters. Applying that to this query results in too many inner nodes.";

/// The DNF of `e` (with `negated` pushed down through AND/OR by De Morgan).
pub(crate) fn dnf(e: &SqlExpr, negated: bool) -> Result<Dnf, String> {
    match e {
        SqlExpr::Nested(inner) => dnf(inner, negated),
        SqlExpr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => dnf(expr, !negated),
        SqlExpr::BinaryOp { left, op, right } if matches!(op, BinaryOperator::And | BinaryOperator::Or) => {
            let is_and = (*op == BinaryOperator::And) != negated;
            let (l, r) = (dnf(left, negated)?, dnf(right, negated)?);
            if is_and {
                and(l, r)
            } else {
                let mut out = l;
                out.extend(r);
                limit(out)
            }
        }
        other => Ok(vec![vec![Atom {
            negated,
            expr: other.clone(),
        }]]),
    }
}

/// The DNF of `l AND r`.
pub(crate) fn and(l: Dnf, r: Dnf) -> Result<Dnf, String> {
    if l.len().saturating_mul(r.len()) > MAX_BRANCHES {
        return Err(TOO_MANY.into());
    }
    let mut out = Vec::with_capacity(l.len() * r.len());
    for a in &l {
        for b in &r {
            out.push(a.iter().chain(b.iter()).cloned().collect());
        }
    }
    Ok(out)
}

fn limit(d: Dnf) -> Result<Dnf, String> {
    if d.len() > MAX_BRANCHES {
        return Err(TOO_MANY.into());
    }
    Ok(d)
}

/// A DNF that is always true: one empty branch.
pub(crate) fn always() -> Dnf {
    vec![Vec::new()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::parse_select;

    fn shape(sql: &str) -> Vec<usize> {
        let where_ = parse_select(&format!("SELECT * FROM t WHERE {sql}")).ok().and_then(|p| p.selection);
        let d = dnf(&where_.unwrap_or(SqlExpr::Value(sqlparser::ast::Value::Null.into())), false).unwrap_or_default();
        d.iter().map(Vec::len).collect()
    }

    #[test]
    fn distributes_and_over_or() {
        assert_eq!(shape("a AND (b OR c)"), vec![2, 2]);
        assert_eq!(shape("(a OR b) AND (c OR d)"), vec![2, 2, 2, 2]);
        assert_eq!(shape("NOT (a AND b)"), vec![1, 1]);
        assert_eq!(shape("NOT (a OR b)"), vec![2]);
        assert_eq!(shape("a"), vec![1]);
    }
}
