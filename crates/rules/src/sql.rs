//! SQL front end: a Postgres-flavoured `sqlparser` dialect that also accepts
//! PowerSync's `x IN <expr>` (JSON-array IN), plus extraction of the single
//! `SELECT` shape the legacy dialect accepts.

use sqlparser::ast::{
    BinaryOperator, Expr as SqlExpr, FunctionArg, FunctionArgExpr, GroupByExpr, Ident, ObjectName, ObjectNamePart, Query, Select,
    SelectItem, SetExpr, Statement, TableFactor,
};
use sqlparser::dialect::{Dialect, PostgreSqlDialect, Precedence};
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Token, Tokenizer};
use std::any::TypeId;

/// PostgreSQL dialect with an infix hook for unparenthesised `IN <expr>`.
#[derive(Debug, Default)]
struct SyncRulesDialect(PostgreSqlDialect);

impl Dialect for SyncRulesDialect {
    fn dialect(&self) -> TypeId {
        TypeId::of::<PostgreSqlDialect>()
    }
    fn identifier_quote_style(&self, identifier: &str) -> Option<char> {
        self.0.identifier_quote_style(identifier)
    }
    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        self.0.is_delimited_identifier_start(ch)
    }
    fn is_identifier_start(&self, ch: char) -> bool {
        self.0.is_identifier_start(ch)
    }
    fn is_identifier_part(&self, ch: char) -> bool {
        self.0.is_identifier_part(ch)
    }
    fn supports_unicode_string_literal(&self) -> bool {
        self.0.supports_unicode_string_literal()
    }
    fn is_reserved_for_identifier(&self, kw: Keyword) -> bool {
        self.0.is_reserved_for_identifier(kw)
    }
    fn is_table_alias(&self, kw: &Keyword, parser: &mut Parser) -> bool {
        self.0.is_table_alias(kw, parser)
    }
    fn is_custom_operator_part(&self, ch: char) -> bool {
        self.0.is_custom_operator_part(ch)
    }
    fn get_next_precedence(&self, parser: &Parser) -> Option<Result<u8, ParserError>> {
        self.0.get_next_precedence(parser)
    }
    fn prec_value(&self, prec: Precedence) -> u8 {
        self.0.prec_value(prec)
    }
    fn prec_unknown(&self) -> u8 {
        self.0.prec_unknown()
    }
    fn supports_empty_projections(&self) -> bool {
        true
    }
    fn supports_string_escape_constant(&self) -> bool {
        self.0.supports_string_escape_constant()
    }
    fn supports_notnull_operator(&self) -> bool {
        self.0.supports_notnull_operator()
    }
    fn supports_filter_during_aggregation(&self) -> bool {
        self.0.supports_filter_during_aggregation()
    }
    fn supports_group_by_expr(&self) -> bool {
        self.0.supports_group_by_expr()
    }

    fn parse_infix(&self, parser: &mut Parser, expr: &SqlExpr, precedence: u8) -> Option<Result<SqlExpr, ParserError>> {
        // `<<` / `>>` parse (so the compiler can report "Operator not
        // supported: <<") instead of failing with a parser error.
        let shift = match parser.peek_token_ref().token {
            Token::ShiftLeft => Some(BinaryOperator::PGBitwiseShiftLeft),
            Token::ShiftRight => Some(BinaryOperator::PGBitwiseShiftRight),
            _ => None,
        };
        if let Some(op) = shift {
            parser.advance_token();
            return Some(parser.parse_subexpr(precedence).map(|right| SqlExpr::BinaryOp {
                left: Box::new(expr.clone()),
                op,
                right: Box::new(right),
            }));
        }
        let is_kw = |t: &Token, k: Keyword| matches!(t, Token::Word(w) if w.keyword == k);
        let (negated, skip) = if is_kw(&parser.peek_token_ref().token, Keyword::IN) {
            (false, 1)
        } else if is_kw(&parser.peek_token_ref().token, Keyword::NOT) && is_kw(&parser.peek_nth_token_ref(1).token, Keyword::IN) {
            (true, 2)
        } else {
            return None;
        };
        if parser.peek_nth_token_ref(skip).token == Token::LParen {
            return None;
        }
        for _ in 0..skip {
            parser.advance_token();
        }
        // The right side is wrapped in `Nested` so edition 3 can tell `x IN expr` (a JSON
        // array) from `x IN (a)` (a one-item list); legacy treats both as a JSON array.
        Some(parser.parse_subexpr(precedence).map(|right| SqlExpr::InList {
            expr: Box::new(expr.clone()),
            list: vec![SqlExpr::Nested(Box::new(right))],
            negated,
        }))
    }
}

/// Folds an identifier the Postgres way (unquoted → lower case).
pub(crate) fn fold(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

/// Folded identifier parts of an object name.
pub(crate) fn object_parts(name: &ObjectName) -> Result<Vec<String>, String> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Ok(fold(i)),
            ObjectNamePart::Function(_) => Err(format!("Unsupported name {name}")),
        })
        .collect()
}

/// The FROM item of a supported query.
pub(crate) enum FromItem {
    Table {
        schema: Option<String>,
        name: String,
        alias: Option<String>,
    },
    Function {
        name: String,
        args: Vec<SqlExpr>,
        alias: Option<String>,
    },
}

/// A single-table `SELECT` after the unsupported-feature checks.
pub(crate) struct ParsedSelect {
    pub projection: Vec<SelectItem>,
    pub from: Option<FromItem>,
    pub selection: Option<SqlExpr>,
}

/// The arguments of `substring(x, a, b)` / `SUBSTRING(x FROM a FOR b)` as a plain call's.
pub(crate) fn substring_args(e: &SqlExpr) -> Vec<SqlExpr> {
    let SqlExpr::Substring {
        expr,
        substring_from,
        substring_for,
        ..
    } = e
    else {
        return vec![e.clone()];
    };
    let mut args = vec![expr.as_ref().clone()];
    args.extend(substring_from.iter().map(|b| b.as_ref().clone()));
    args.extend(substring_for.iter().map(|b| b.as_ref().clone()));
    args
}

/// The plain arguments of a function call, refusing aggregate-style clauses. `subquery` is
/// the dialect's message for a subquery argument.
pub(crate) fn call_args(f: &sqlparser::ast::Function, subquery: &str) -> Result<Vec<SqlExpr>, String> {
    const CLAUSES: &str = "DISTINCT, ORDER BY, FILTER and OVER clauses are not supported";
    if f.filter.is_some() || f.over.is_some() || !f.within_group.is_empty() {
        return Err(CLAUSES.into());
    }
    match &f.args {
        sqlparser::ast::FunctionArguments::None => Ok(Vec::new()),
        sqlparser::ast::FunctionArguments::List(list) => {
            if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
                return Err(CLAUSES.into());
            }
            plain_args(&list.args)
        }
        sqlparser::ast::FunctionArguments::Subquery(_) => Err(subquery.into()),
    }
}

/// Unwraps plain function arguments.
pub(crate) fn plain_args(args: &[FunctionArg]) -> Result<Vec<SqlExpr>, String> {
    args.iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e.clone()),
            other => Err(format!("{other} not supported here")),
        })
        .collect()
}

/// Rewrites `SELECT` / `SELECT WHERE …` (empty projection without FROM,
/// which sqlparser rejects) into a parseable form; returns whether it did.
fn rewrite_empty_projection(sql: &str) -> Option<String> {
    let t = sql.trim_start();
    let head = t.get(..6)?;
    if !head.eq_ignore_ascii_case("select") {
        return None;
    }
    let rest = &t[6..];
    if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
        return None;
    }
    let r = rest.trim();
    let r = r.strip_suffix(';').unwrap_or(r).trim_end();
    let is_where =
        r.get(..5).is_some_and(|w| w.eq_ignore_ascii_case("where")) && r[5..].starts_with(|c: char| c.is_whitespace() || c == '(');
    if r.is_empty() || is_where {
        Some(format!("SELECT FROM __ferrosync_none {r}"))
    } else {
        None
    }
}

/// Most operators (symbols and `AND`/`OR`/`NOT`/`IS`/`IN`/…) one query may hold. A chain like
/// `a + a + … + a` parses into a left-deep tree that sqlparser's recursion limit does not bound,
/// and cloning, compiling and evaluating it recurses once per operator: 3000 of them (a 12 KB
/// query) overflowed a 2 MB thread stack. Real queries use a few dozen.
pub(crate) const MAX_OPERATORS: usize = 256;

/// Counts the operator tokens of `sql` (0 when it does not tokenize: the parser reports that).
fn operator_count(dialect: &SyncRulesDialect, sql: &str) -> usize {
    let Ok(tokens) = Tokenizer::new(dialect, sql).tokenize() else {
        return 0;
    };
    tokens
        .iter()
        .filter(|t| match t {
            Token::Word(w) => {
                w.quote_style.is_none()
                    && matches!(
                        w.keyword,
                        Keyword::AND
                            | Keyword::OR
                            | Keyword::NOT
                            | Keyword::IS
                            | Keyword::IN
                            | Keyword::BETWEEN
                            | Keyword::LIKE
                            | Keyword::ILIKE
                            | Keyword::SIMILAR
                            | Keyword::COLLATE
                            | Keyword::AT
                            | Keyword::XOR
                            | Keyword::OPERATOR
                    )
            }
            Token::EOF
            | Token::Whitespace(_)
            | Token::Comma
            | Token::LParen
            | Token::RParen
            | Token::Period
            | Token::SemiColon
            | Token::Number(..)
            | Token::Char(_)
            | Token::Placeholder(_)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::QuoteDelimitedStringLiteral(_)
            | Token::NationalQuoteDelimitedStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_) => false,
            _ => true,
        })
        .count()
}

/// Parses one statement that must be a single query.
pub(crate) fn parse_query(text: &str) -> Result<Box<Query>, String> {
    let dialect = SyncRulesDialect::default();
    if operator_count(&dialect, text) > MAX_OPERATORS {
        return Err(format!("Query is too complex (more than {MAX_OPERATORS} operators)"));
    }
    let statements = Parser::parse_sql(&dialect, text).map_err(|e| match e {
        ParserError::ParserError(m) | ParserError::TokenizerError(m) => m,
        ParserError::RecursionLimitExceeded => "Query is too deeply nested".to_string(),
    })?;
    let mut statements = statements.into_iter();
    match (statements.next(), statements.next()) {
        (Some(Statement::Query(query)), None) => Ok(query),
        (Some(_), None) => Err("Only SELECT statements are supported".into()),
        _ => Err("Only a single SELECT statement is supported".into()),
    }
}

/// Parses one sync-rules query into its parts, rejecting unsupported SQL.
pub(crate) fn parse_select(sql: &str) -> Result<ParsedSelect, String> {
    let rewritten = rewrite_empty_projection(sql);
    let query = parse_query(rewritten.as_deref().unwrap_or(sql))?;
    let mut parsed = check_query(&query)?;
    if rewritten.is_some() {
        parsed.from = None;
    }
    Ok(parsed)
}

/// The `SELECT` of a query, after rejecting the clauses no dialect supports.
pub(crate) fn checked_select(query: &Query) -> Result<&Select, String> {
    if query.with.is_some() {
        return Err("WITH is not supported".into());
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return Err("LIMIT is not supported".into());
    }
    if query.order_by.is_some() {
        return Err("ORDER BY is not supported".into());
    }
    if !query.locks.is_empty() || query.for_clause.is_some() {
        return Err("SELECT FOR is not supported".into());
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err("Only a single SELECT statement is supported".into());
    };
    if select.distinct.is_some() {
        return Err("DISTINCT is not supported".into());
    }
    let has_group_by = match &select.group_by {
        GroupByExpr::All(_) => true,
        GroupByExpr::Expressions(e, _) => !e.is_empty(),
    };
    if has_group_by {
        return Err("GROUP BY is not supported".into());
    }
    if select.having.is_some() {
        return Err("HAVING is not supported".into());
    }
    if select.top.is_some() {
        return Err("LIMIT is not supported".into());
    }
    Ok(select)
}

fn check_query(query: &Query) -> Result<ParsedSelect, String> {
    let select = checked_select(query)?;
    let from = match select.from.as_slice() {
        [] => None,
        [single] if single.joins.is_empty() => Some(from_item(&single.relation)?),
        _ => return Err("Must SELECT from a single table".into()),
    };
    Ok(ParsedSelect {
        projection: select.projection.clone(),
        from,
        selection: select.selection.clone(),
    })
}

fn from_item(t: &TableFactor) -> Result<FromItem, String> {
    match t {
        TableFactor::Table { name, alias, args, .. } => {
            let parts = object_parts(name)?;
            let alias = alias.as_ref().map(|a| fold(&a.name));
            if let Some(args) = args {
                return Ok(FromItem::Function {
                    name: parts.join("."),
                    args: plain_args(&args.args)?,
                    alias,
                });
            }
            let (schema, name) = match parts.as_slice() {
                [name] => (None, name.clone()),
                [schema, name] => (Some(schema.clone()), name.clone()),
                _ => return Err(format!("Invalid table name: {name}")),
            };
            Ok(FromItem::Table { schema, name, alias })
        }
        TableFactor::Function { name, args, alias, .. } => Ok(FromItem::Function {
            name: object_parts(name)?.join("."),
            args: plain_args(args)?,
            alias: alias.as_ref().map(|a| fold(&a.name)),
        }),
        TableFactor::Derived { .. } => Err("Subqueries are not supported yet".into()),
        _ => Err("Must SELECT from a single table".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_in() {
        let p = parse_select("SELECT id FROM t WHERE owner_id IN request.parameters() -> 'ids' AND x = 1").unwrap();
        let Some(SqlExpr::BinaryOp { left, .. }) = p.selection else {
            panic!("expected AND");
        };
        assert!(matches!(*left, SqlExpr::InList { ref list, .. } if list.len() == 1));
    }

    #[test]
    fn empty_projection() {
        let p = parse_select("SELECT").unwrap();
        assert!(p.projection.is_empty() && p.from.is_none() && p.selection.is_none());
        let p = parse_select("select where token_parameters.is_admin").unwrap();
        assert!(p.projection.is_empty() && p.from.is_none() && p.selection.is_some());
        let p = parse_select("SELECT FROM users WHERE users.id = 1").unwrap();
        assert!(parse_select("SELECT wher€").is_ok());
        assert!(parse_select("SELECT\twhere(1)").is_ok());
        assert!(p.projection.is_empty() && p.from.is_some());
    }

    /// Found by fuzzing: `a + a + …` chains are not bounded by sqlparser's recursion limit and
    /// overflowed the stack (3000 operators in release, 1000 in debug, on a 2 MB thread).
    #[test]
    fn long_operator_chains_are_an_error_not_a_stack_overflow() {
        for op in [" + a", " AND a", " -> 'x'", " || a", " = a", "::text", " IS NULL", " OR a IN b"] {
            let at_limit = format!("SELECT a{} AS v FROM t", op.repeat(MAX_OPERATORS / 2));
            assert!(!parse_select(&at_limit).is_err_and(|e| e.contains("too complex")), "{op}");
            let sql = format!("SELECT a{} AS v FROM t", op.repeat(3000));
            let err = parse_select(&sql).err().unwrap_or_default();
            assert_eq!(err, "Query is too complex (more than 256 operators)", "{op}");
        }
        let strings = format!("SELECT a FROM t WHERE a IN ({})", vec!["'x'"; 2000].join(", "));
        assert!(parse_select(&strings).is_ok());
    }

    #[test]
    fn rejects() {
        let err = |s: &str| parse_select(s).err().unwrap_or_default();
        assert_eq!(err("SELECT a FROM t LIMIT 1"), "LIMIT is not supported");
        assert_eq!(err("SELECT a FROM t OFFSET 10"), "LIMIT is not supported");
        assert_eq!(err("SELECT DISTINCT a FROM t"), "DISTINCT is not supported");
        assert_eq!(err("SELECT a FROM t ORDER BY a"), "ORDER BY is not supported");
        assert_eq!(err("SELECT a FROM t GROUP BY a"), "GROUP BY is not supported");
        assert_eq!(err("SELECT a FROM t, u"), "Must SELECT from a single table");
    }
}
