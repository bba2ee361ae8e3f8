//! One OR branch of a stream query as a flat list of sources and conditions: FROM tables,
//! JOINs, `json_each` expansions, and subqueries and CTEs inlined as further sources. `x IN
//! <array>` and `a && b` become `json_each` sources joined by equality, so planning only ever
//! sees filters and equalities.

use super::dnf::{always, and, dnf, Atom, Dnf};
use super::scope::{each_column, Binding, Deps, Scope};
use crate::data_query::implicit_name;
use crate::expr::Expr;
use crate::sql::{checked_select, fold, object_parts, parse_query, plain_args};
use crate::table::TablePattern;
use sqlparser::ast::{
    BinaryOperator, Expr as SqlExpr, JoinConstraint, JoinOperator, Query, Select, SelectItem, TableFactor, TableWithJoins,
};

/// Where rows of a branch come from.
#[derive(Clone, Debug)]
pub(crate) enum SourceKind {
    Table(TablePattern),
    /// `json_each(arg)`: one row per element, evaluated beside the sources `arg` reads.
    Each {
        arg: Expr,
        arg_deps: Deps,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct Source {
    pub kind: SourceKind,
    /// The FROM alias, if one was written.
    pub alias: Option<String>,
}

/// A condition of the branch.
#[derive(Clone, Debug)]
pub(crate) enum Cond {
    Filter(Expr, Deps),
    Eq(Expr, Deps, Expr, Deps),
}

/// An output column of the synced table.
#[derive(Clone, Debug)]
pub(crate) enum OutColumn {
    Star,
    Value(String, Expr),
}

/// A branch ready for planning.
#[derive(Debug)]
pub(crate) struct Branch {
    pub sources: Vec<Source>,
    pub conds: Vec<Cond>,
    /// The source whose rows are synced.
    pub output: usize,
    pub columns: Vec<OutColumn>,
}

/// CTE bodies by name: stream-local ones first, so they shadow global ones.
pub(crate) type Ctes<'a> = &'a [(String, String)];

const SUBQUERY_DEPTH: usize = 8;

/// Splits a stream query into its OR branches; the names of the CTEs it reads are added to
/// `used_ctes`.
pub(crate) fn branches(sql: &str, ctes: Ctes<'_>, default_schema: &str, used_ctes: &mut Vec<String>) -> Result<Vec<Branch>, String> {
    let query = parse_query(sql)?;
    let select = checked_select(&query)?;
    let mut conds = match &select.selection {
        Some(w) => dnf(w, false)?,
        None => always(),
    };
    for on in join_conditions(&select.from)? {
        conds = and(conds, dnf(on, false)?)?;
    }
    let mut out = Vec::with_capacity(conds.len());
    for atoms in conds {
        let mut b = Builder {
            sources: Vec::new(),
            conds: Vec::new(),
            ctes,
            default_schema,
            depth: 0,
            used_ctes,
        };
        let scope = b.add_from_items(&select.from)?;
        for atom in &atoms {
            b.atom(&scope, atom)?;
        }
        let select_scope = Scope {
            select_list: true,
            ..scope
        };
        let (output, columns) = b.output(&select_scope, select)?;
        out.push(Branch {
            sources: b.sources,
            conds: b.conds,
            output,
            columns,
        });
    }
    Ok(out)
}

fn join_conditions(from: &[TableWithJoins]) -> Result<Vec<&SqlExpr>, String> {
    let mut out = Vec::new();
    for t in from {
        for j in &t.joins {
            match &j.join_operator {
                JoinOperator::Join(c) | JoinOperator::Inner(c) => match c {
                    JoinConstraint::On(e) => out.push(e),
                    JoinConstraint::None => {}
                    _ => return Err("Only JOIN ... ON conditions are supported".into()),
                },
                JoinOperator::CrossJoin(_) => {}
                _ => return Err("Only inner joins are supported".into()),
            }
        }
    }
    Ok(out)
}

struct Builder<'a, 'u> {
    sources: Vec<Source>,
    conds: Vec<Cond>,
    ctes: Ctes<'a>,
    default_schema: &'a str,
    depth: usize,
    used_ctes: &'u mut Vec<String>,
}

impl Branch {
    /// Reads client-supplied values (`connection.*`, `subscription.*`) but nothing from the
    /// token: anyone can make it return any bucket, so it must not be used for authorization.
    pub(crate) fn is_unauthenticated(&self) -> bool {
        let deps = self.conds.iter().flat_map(|c| match c {
            Cond::Filter(_, d) => [*d, Deps::default()],
            Cond::Eq(_, a, _, b) => [*a, *b],
        });
        let each_deps = self.sources.iter().filter_map(|s| match &s.kind {
            SourceKind::Each { arg_deps, .. } => Some(*arg_deps),
            SourceKind::Table(_) => None,
        });
        let all = deps.chain(each_deps).fold(Deps::default(), Deps::union);
        all.unauth && !all.auth
    }
}

impl<'a> Builder<'a, '_> {
    fn add(&mut self, kind: SourceKind, alias: Option<String>) -> Result<usize, String> {
        if self.sources.len() >= 64 {
            return Err("Too many tables in one query".into());
        }
        self.sources.push(Source { kind, alias });
        Ok(self.sources.len() - 1)
    }

    fn cte(&mut self, name: &str) -> Option<&'a str> {
        let ctes: Ctes<'a> = self.ctes;
        let sql = ctes.iter().find(|(n, _)| n == name).map(|(_, sql)| sql.as_str())?;
        if !self.used_ctes.iter().any(|u| u == name) {
            self.used_ctes.push(name.to_string());
        }
        Some(sql)
    }

    fn add_from_items(&mut self, from: &[TableWithJoins]) -> Result<Scope, String> {
        let mut scope = Scope::default();
        for t in from {
            self.factor(&t.relation, &mut scope)?;
            for j in &t.joins {
                self.factor(&j.relation, &mut scope)?;
            }
        }
        Ok(scope)
    }

    fn factor(&mut self, f: &TableFactor, scope: &mut Scope) -> Result<(), String> {
        match f {
            TableFactor::Table { name, alias, args, .. } => {
                let parts = object_parts(name)?;
                let alias = alias.as_ref().map(|a| fold(&a.name));
                if let Some(args) = args {
                    return self.json_each(&parts.join("."), &plain_args(&args.args)?, alias, scope);
                }
                if let [single] = parts.as_slice() {
                    if let Some(sql) = self.cte(single) {
                        let columns = self.subquery_sql(sql)?;
                        scope
                            .names
                            .push((alias.unwrap_or_else(|| single.clone()), Binding::Derived(columns)));
                        return Ok(());
                    }
                }
                let (schema, table) = match parts.as_slice() {
                    [t] => (None, t.clone()),
                    [s, t] => (Some(s.as_str()), t.clone()),
                    _ => return Err(format!("Invalid table name: {name}")),
                };
                let pattern = TablePattern::new(schema, &table, self.default_schema)?;
                let i = self.add(SourceKind::Table(pattern), alias.clone())?;
                scope.names.push((alias.unwrap_or(table), Binding::Table(i)));
                Ok(())
            }
            TableFactor::Function { name, args, alias, .. } => {
                let alias = alias.as_ref().map(|a| fold(&a.name));
                self.json_each(&object_parts(name)?.join("."), &plain_args(args)?, alias, scope)
            }
            TableFactor::Derived { subquery, alias, .. } => {
                let Some(alias) = alias else {
                    return Err("Subqueries in FROM need an alias".into());
                };
                let mut columns = self.subquery(subquery)?;
                for (c, name) in columns.iter_mut().zip(&alias.columns) {
                    c.0 = fold(&name.name);
                }
                scope.names.push((fold(&alias.name), Binding::Derived(columns)));
                Ok(())
            }
            TableFactor::NestedJoin { .. } => Err("Parenthesised joins are not supported".into()),
            _ => Err("Sync streams can only select from actual tables".into()),
        }
    }

    fn json_each(&mut self, name: &str, args: &[SqlExpr], alias: Option<String>, scope: &mut Scope) -> Result<(), String> {
        if name != "json_each" {
            return Err(format!("Table-valued function {name} is not defined."));
        }
        let [arg] = args else {
            return Err("json_each expects exactly one argument".into());
        };
        let (arg, arg_deps) = scope.expr(arg)?;
        let i = self.add(SourceKind::Each { arg, arg_deps }, alias.clone())?;
        scope.names.push((alias.unwrap_or_else(|| "json_each".into()), Binding::Each(i)));
        Ok(())
    }

    fn subquery_sql(&mut self, sql: &str) -> Result<Vec<(String, Expr, Deps)>, String> {
        self.subquery(&*parse_query(sql)?)
    }

    /// Inlines a subquery: its sources and conditions join the branch; returns its columns.
    fn subquery(&mut self, query: &Query) -> Result<Vec<(String, Expr, Deps)>, String> {
        if self.depth >= SUBQUERY_DEPTH {
            return Err("Subqueries are nested too deeply".into());
        }
        self.depth += 1;
        let select = checked_select(query)?;
        let scope = self.add_from_items(&select.from)?;
        let mut conds: Dnf = match &select.selection {
            Some(w) => dnf(w, false)?,
            None => always(),
        };
        for on in join_conditions(&select.from)? {
            conds = and(conds, dnf(on, false)?)?;
        }
        let [atoms] = conds.as_slice() else {
            return Err("Stream subqueries can't use OR filters".into());
        };
        for atom in atoms {
            self.atom(&scope, atom)?;
        }
        let mut columns = Vec::new();
        for (i, item) in select.projection.iter().enumerate() {
            let (name, e) = match item {
                SelectItem::UnnamedExpr(e) => (implicit_name(e).unwrap_or_else(|| i.to_string()), e),
                SelectItem::ExprWithAlias { expr, alias } => (fold(alias), expr),
                _ => return Err("Subqueries and common table expressions must select single expressions".into()),
            };
            let (x, d) = scope.expr(e)?;
            columns.push((name, x, d));
        }
        self.depth -= 1;
        Ok(columns)
    }

    fn single_column(&mut self, query: &Query) -> Result<(Expr, Deps), String> {
        let mut columns = self.subquery(query)?;
        match (columns.pop(), columns.is_empty()) {
            (Some((_, e, d)), true) => Ok((e, d)),
            _ => Err("This subquery must return exactly one column".into()),
        }
    }

    fn atom(&mut self, scope: &Scope, atom: &Atom) -> Result<(), String> {
        let negated = atom.negated;
        match &atom.expr {
            SqlExpr::InSubquery {
                expr,
                subquery,
                negated: not_in,
            } => {
                if negated != *not_in {
                    return Err("NOT IN with a subquery is not supported".into());
                }
                let (l, dl) = scope.expr(expr)?;
                let (r, dr) = self.single_column(subquery)?;
                self.conds.push(Cond::Eq(l, dl, r, dr));
                Ok(())
            }
            SqlExpr::InList {
                expr,
                list,
                negated: not_in,
            } => match list.as_slice() {
                [SqlExpr::Nested(right)] => self.json_in(scope, expr, right, negated != *not_in),
                _ => self.filter(scope, &atom.expr, negated),
            },
            SqlExpr::BinaryOp {
                left,
                op: BinaryOperator::PGOverlap,
                right,
            } if !negated => self.overlap(scope, left, right),
            SqlExpr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } if !negated => {
                let (l, dl) = scope.expr(left)?;
                let (r, dr) = scope.expr(right)?;
                self.conds.push(Cond::Eq(l, dl, r, dr));
                Ok(())
            }
            other => self.filter(scope, other, negated),
        }
    }

    fn filter(&mut self, scope: &Scope, e: &SqlExpr, negated: bool) -> Result<(), String> {
        let (x, d) = scope.expr(e)?;
        let x = if negated { Expr::Not(Box::new(x)) } else { x };
        self.conds.push(Cond::Filter(x, d));
        Ok(())
    }

    /// `left IN right` where `right` is a JSON array (or a CTE name).
    fn json_in(&mut self, scope: &Scope, left: &SqlExpr, right: &SqlExpr, negated: bool) -> Result<(), String> {
        if let SqlExpr::Identifier(id) = right {
            if let Some(sql) = self.cte(&fold(id)) {
                if negated {
                    return Err("NOT IN with a common table expression is not supported".into());
                }
                let mut columns = self.subquery_sql(sql)?;
                let (Some((_, r, dr)), true) = (columns.pop(), columns.is_empty()) else {
                    return Err("Common-table expression must return a single column".into());
                };
                let (l, dl) = scope.expr(left)?;
                self.conds.push(Cond::Eq(l, dl, r, dr));
                return Ok(());
            }
        }
        let (l, dl) = scope.expr(left)?;
        let (r, dr) = scope.expr(right)?;
        if negated || dl.sources == dr.sources {
            let e = Expr::JsonIn(Box::new(l), Box::new(r));
            let e = if negated { Expr::Not(Box::new(e)) } else { e };
            let d = dl.union(dr);
            if d.sources != 0 && d.request() {
                return Err("Negated parameter arrays are not supported in sync streams".into());
            }
            self.conds.push(Cond::Filter(e, d));
            return Ok(());
        }
        let each = self.add(SourceKind::Each { arg: r, arg_deps: dr }, None)?;
        self.conds
            .push(Cond::Eq(l, dl, Expr::Column(each_column(each, "value")), Deps::source(each)));
        Ok(())
    }

    /// `left && right`: the row's array `left` shares an element with `right`.
    fn overlap(&mut self, scope: &Scope, left: &SqlExpr, right: &SqlExpr) -> Result<(), String> {
        let (l, dl) = scope.expr(left)?;
        let (r, dr) = scope.expr(right)?;
        if dl.sources == 0 {
            return Err("The left-hand side of an && operator must be derived from the row to sync..".into());
        }
        if dl.sources == dr.sources {
            let e = Expr::Call(crate::functions::Func::JsonOverlap, vec![l, r]);
            self.conds.push(Cond::Filter(e, dl.union(dr)));
            return Ok(());
        }
        let a = self.add(SourceKind::Each { arg: l, arg_deps: dl }, None)?;
        let b = self.add(SourceKind::Each { arg: r, arg_deps: dr }, None)?;
        let value = |i| Expr::Column(each_column(i, "value"));
        self.conds.push(Cond::Eq(value(a), Deps::source(a), value(b), Deps::source(b)));
        Ok(())
    }

    /// The synced source and its columns.
    fn output(&self, scope: &Scope, select: &Select) -> Result<(usize, Vec<OutColumn>), String> {
        let mut output: Option<usize> = None;
        let mut claim = |i: usize| -> Result<(), String> {
            match output {
                Some(o) if o != i => Err(format!(
                    "Sync streams can only select from a single table, and this one already selects from '{}'.",
                    self.source_name(o)
                )),
                _ => {
                    output = Some(i);
                    Ok(())
                }
            }
        };
        let mut columns = Vec::new();
        for item in &select.projection {
            match item {
                SelectItem::Wildcard(_) => {
                    let tables: Vec<usize> = (0..self.sources.len())
                        .filter(|i| matches!(self.sources[*i].kind, SourceKind::Table(_)) && self.in_scope(scope, *i))
                        .collect();
                    let [t] = tables.as_slice() else {
                        return Err("Use <table>.* to select all columns when several tables are in scope".into());
                    };
                    claim(*t)?;
                    columns.push(OutColumn::Star);
                }
                SelectItem::QualifiedWildcard(kind, _) => {
                    let name = kind.to_string().trim_end_matches(".*").to_string();
                    let folded = name.trim_matches('"');
                    let folded = if name.starts_with('"') {
                        folded.to_string()
                    } else {
                        folded.to_lowercase()
                    };
                    match scope.names.iter().rev().find(|(n, _)| *n == folded) {
                        Some((_, Binding::Table(i))) => claim(*i)?,
                        Some(_) => return Err("Sync streams can only select from actual tables".into()),
                        None => return Err(format!("Table '{folded}' has not been added in a FROM clause here.")),
                    }
                    columns.push(OutColumn::Star);
                }
                SelectItem::ExprWithAliases { .. } => return Err("Multiple aliases are not supported".into()),
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    let name = match item {
                        SelectItem::ExprWithAlias { alias, .. } => fold(alias),
                        _ => implicit_name(e).ok_or("alias is required")?,
                    };
                    let (x, d) = scope.expr(e)?;
                    if d.request() {
                        return Err(
                            "This attempts to sync a connection parameter. Only values from the source database can be synced.".into(),
                        );
                    }
                    for i in (0..self.sources.len()).filter(|i| d.sources & (1 << i) != 0) {
                        if !matches!(self.sources[i].kind, SourceKind::Table(_)) {
                            return Err("Sync streams can only select from actual tables".into());
                        }
                        claim(i)?;
                    }
                    columns.push(OutColumn::Value(name, x));
                }
            }
        }
        let output = output.ok_or("Must have a result column selecting from a table")?;
        Ok((output, columns))
    }

    fn in_scope(&self, scope: &Scope, i: usize) -> bool {
        scope.names.iter().any(|(_, b)| matches!(b, Binding::Table(t) if *t == i))
    }

    fn source_name(&self, i: usize) -> String {
        match &self.sources[i] {
            Source { alias: Some(a), .. } => a.clone(),
            Source {
                kind: SourceKind::Table(p),
                ..
            } => p.table_text().to_string(),
            _ => "json_each".into(),
        }
    }
}
