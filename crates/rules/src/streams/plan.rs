//! Planning one branch: tables become *units* (a table plus the `json_each` expansions of its
//! columns), equalities between units form a tree rooted at the synced table, and each other
//! unit becomes a parameter index whose lookups the request side walks from the leaves up.
//!
//! The synced table's data source is partitioned by the expressions compared with something
//! outside it; those values are the bucket parameters. A child unit's index is keyed by its own
//! comparisons with the request or its children, and stores the values its parent compares with.

use super::builder::{Branch, Cond, OutColumn, SourceKind};
use super::scope::Deps;
use crate::expr::{BinOp, Ctx, Expr};
use crate::table::TablePattern;
use crate::value::sqlite_bool;
use std::collections::HashMap;

/// Rows of one unit: its table, the `json_each` expansions over it, and its filters.
#[derive(Debug, Clone)]
pub(crate) struct RowPlan {
    pub pattern: TablePattern,
    /// (source index, array expression), expanded in order.
    pub eaches: Vec<(usize, Expr)>,
    pub filters: Vec<Expr>,
}

/// The synced table of one branch.
#[derive(Debug)]
pub(crate) struct DataPlan {
    pub rows: RowPlan,
    pub keys: Vec<Expr>,
    pub columns: Vec<OutColumn>,
    pub alias: Option<String>,
}

/// A replicated index: lookup key `keys`, stored values `outputs`.
#[derive(Debug, Clone)]
pub(crate) struct ParameterIndex {
    pub rows: RowPlan,
    pub keys: Vec<Expr>,
    pub outputs: Vec<Expr>,
}

/// Where one bucket parameter (or index key) value comes from at request time.
#[derive(Debug, PartialEq)]
pub(crate) enum Slot {
    Request(Expr),
    /// From each element of a request-side `json_each` (index into `Resolver::eaches`).
    Each {
        each: usize,
        expr: Expr,
    },
    /// Output `output` of the rows found in child lookup `child`.
    Child {
        child: usize,
        output: usize,
    },
}

/// A `json_each` over request data.
#[derive(Debug, PartialEq)]
pub(crate) struct RequestEach {
    pub source: usize,
    pub arg: Expr,
    pub filters: Vec<Expr>,
}

/// Computes the value tuples of a list of slots.
#[derive(Debug, PartialEq, Default)]
pub(crate) struct Resolver {
    pub slots: Vec<Slot>,
    pub eaches: Vec<RequestEach>,
    pub children: Vec<ChildLookup>,
}

#[derive(Debug, PartialEq)]
pub(crate) struct ChildLookup {
    /// Global parameter index id.
    pub index: usize,
    pub resolver: Resolver,
}

/// The request side of one branch.
#[derive(Debug, PartialEq)]
pub(crate) struct QuerierPlan {
    pub filters: Vec<Expr>,
    /// Request-side `json_each` sources that feed no parameter: the branch matches only when
    /// some element passes their conditions (an empty array matches nothing).
    pub exists: Vec<RequestEach>,
    pub resolver: Resolver,
}

/// Parameter indexes of a whole file, deduplicated by structure.
#[derive(Default)]
pub(crate) struct Indexes {
    pub list: Vec<ParameterIndex>,
    by_shape: HashMap<String, usize>,
}

impl Indexes {
    fn register(&mut self, index: ParameterIndex) -> usize {
        let shape = format!("{index:?}");
        if let Some(&id) = self.by_shape.get(&shape) {
            return id;
        }
        self.list.push(index);
        self.by_shape.insert(shape, self.list.len() - 1);
        self.list.len() - 1
    }
}

const UNASSOCIATED: &str = "Unable to associate this filter with added tables";

/// Which side of the request/row divide an expression is on.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Const,
    /// Request data, possibly through request-side `json_each` sources (bitmask).
    Request(u64),
    Unit(usize),
}

struct Planner<'a> {
    branch: &'a Branch,
    unit_of: Vec<Option<usize>>,
    unit_filters: HashMap<usize, Vec<Expr>>,
    each_filters: HashMap<usize, Vec<Expr>>,
    request_filters: Vec<Expr>,
    /// (unit, expression on it, request-side expression, its deps) in condition order.
    request_keys: Vec<(usize, Expr, Expr, Deps)>,
    /// (unit a, expr on a, unit b, expr on b).
    edges: Vec<(usize, Expr, usize, Expr)>,
    /// Request-side `json_each` sources used by a resolver, with the unit whose keys they feed.
    used_eaches: std::cell::RefCell<Vec<(usize, usize)>>,
}

/// Plans one branch; `None` when a constant condition makes it match nothing.
pub(crate) fn plan_branch(branch: &Branch, indexes: &mut Indexes, fixed_json: bool) -> Result<Option<(DataPlan, QuerierPlan)>, String> {
    let mut p = Planner {
        branch,
        unit_of: units(branch)?,
        unit_filters: HashMap::new(),
        each_filters: HashMap::new(),
        request_filters: Vec::new(),
        request_keys: Vec::new(),
        edges: Vec::new(),
        used_eaches: Default::default(),
    };
    for cond in &branch.conds {
        if !p.classify(cond, fixed_json)? {
            return Ok(None);
        }
    }
    let root = branch.output;
    p.check_tree(root)?;
    let (keys, resolver) = p.node(root, None, indexes)?;
    let data = DataPlan {
        rows: p.row_plan(root)?,
        keys,
        columns: branch.columns.clone(),
        alias: branch.sources[root].alias.clone(),
    };
    let exists = p.unused_request_eaches();
    let querier = QuerierPlan {
        filters: std::mem::take(&mut p.request_filters),
        exists,
        resolver,
    };
    Ok(Some((data, querier)))
}

/// The unit of each source: tables are their own unit, a `json_each` belongs to the unit its
/// argument reads (`None`: request side).
fn units(branch: &Branch) -> Result<Vec<Option<usize>>, String> {
    let mut unit_of: Vec<Option<usize>> = Vec::with_capacity(branch.sources.len());
    for (i, s) in branch.sources.iter().enumerate() {
        let unit = match &s.kind {
            SourceKind::Table(_) => Some(i),
            SourceKind::Each { arg_deps, .. } => {
                let mut found = None;
                for j in bits(arg_deps.sources) {
                    match (found, unit_of.get(j).copied().flatten()) {
                        // Request-side expansions are evaluated independently of each other.
                        (_, None) => return Err("json_each over another json_each of request data is not supported".into()),
                        (None, Some(u)) => found = Some(u),
                        (Some(f), Some(u)) if f != u => return Err("json_each can only expand values of one table".into()),
                        _ => {}
                    }
                }
                found
            }
        };
        unit_of.push(unit);
    }
    Ok(unit_of)
}

fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask & (1u64 << i) != 0)
}

impl Planner<'_> {
    fn side(&self, d: Deps) -> Result<Side, String> {
        let mut unit = None;
        let mut request_eaches = 0u64;
        for i in bits(d.sources) {
            match self.unit_of[i] {
                None => request_eaches |= 1 << i,
                Some(u) if unit.is_none_or(|x| x == u) => unit = Some(u),
                Some(_) => return Err(UNASSOCIATED.into()),
            }
        }
        match unit {
            Some(_) if request_eaches != 0 || d.request() => Err(UNASSOCIATED.into()),
            Some(u) => Ok(Side::Unit(u)),
            None if request_eaches != 0 || d.request() => Ok(Side::Request(request_eaches)),
            None => Ok(Side::Const),
        }
    }

    /// Sorts one condition; `false` when it is constantly false.
    fn classify(&mut self, cond: &Cond, fixed_json: bool) -> Result<bool, String> {
        match cond {
            Cond::Filter(e, d) => self.filter(e.clone(), *d, fixed_json),
            Cond::Eq(a, da, b, db) => match (self.side(*da)?, self.side(*db)?) {
                (Side::Unit(u), Side::Unit(v)) if u != v => {
                    self.edges.push((u, a.clone(), v, b.clone()));
                    Ok(true)
                }
                // A comparison with a constant is a row filter, not a bucket parameter.
                (Side::Unit(u), Side::Request(_)) => {
                    self.request_keys.push((u, a.clone(), b.clone(), *db));
                    Ok(true)
                }
                (Side::Request(_), Side::Unit(u)) => {
                    self.request_keys.push((u, b.clone(), a.clone(), *da));
                    Ok(true)
                }
                _ => {
                    let e = Expr::Bin(BinOp::Eq, Box::new(a.clone()), Box::new(b.clone()));
                    self.filter(e, da.union(*db), fixed_json)
                }
            },
        }
    }

    fn filter(&mut self, e: Expr, d: Deps, fixed_json: bool) -> Result<bool, String> {
        match self.side(d)? {
            Side::Const => {
                let ctx = Ctx {
                    fixed_json,
                    ..Ctx::default()
                };
                return Ok(sqlite_bool(&e.eval(&ctx)?));
            }
            Side::Request(0) => self.request_filters.push(e),
            Side::Request(eaches) => match bits(eaches).collect::<Vec<_>>().as_slice() {
                [one] => self.each_filters.entry(*one).or_default().push(e),
                _ => return Err(UNASSOCIATED.into()),
            },
            Side::Unit(u) => self.unit_filters.entry(u).or_default().push(e),
        }
        Ok(true)
    }

    /// Every table must hang off the synced table through equalities, without cycles.
    fn check_tree(&self, root: usize) -> Result<(), String> {
        let mut seen = vec![root];
        let mut queue = vec![(root, usize::MAX)];
        while let Some((u, parent)) = queue.pop() {
            for v in self.neighbours(u).into_iter().filter(|v| *v != parent) {
                if seen.contains(&v) {
                    return Err("Tables may only be joined along one path (cyclic join conditions are not supported)".into());
                }
                seen.push(v);
                queue.push((v, u));
            }
        }
        let unreached = (0..self.branch.sources.len()).find(|i| self.unit_of[*i] == Some(*i) && !seen.contains(i));
        match unreached {
            Some(_) => Err("This filter is unrelated to the request or the table being synced, and not supported.".into()),
            None => Ok(()),
        }
    }

    fn neighbours(&self, u: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for (a, _, b, _) in &self.edges {
            let other = if *a == u {
                *b
            } else if *b == u {
                *a
            } else {
                continue;
            };
            if !out.contains(&other) {
                out.push(other);
            }
        }
        out
    }

    fn row_plan(&self, unit: usize) -> Result<RowPlan, String> {
        let Some(SourceKind::Table(pattern)) = self.branch.sources.get(unit).map(|s| &s.kind) else {
            return Err(UNASSOCIATED.into());
        };
        let eaches = self
            .branch
            .sources
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != unit && self.unit_of[*i] == Some(unit))
            .filter_map(|(i, s)| match &s.kind {
                SourceKind::Each { arg, .. } => Some((i, arg.clone())),
                SourceKind::Table(_) => None,
            })
            .collect();
        Ok(RowPlan {
            pattern: pattern.clone(),
            eaches,
            filters: self.unit_filters.get(&unit).cloned().unwrap_or_default(),
        })
    }

    /// The keys of `unit` (expressions on its rows) and where their values come from.
    fn node(&self, unit: usize, parent: Option<usize>, indexes: &mut Indexes) -> Result<(Vec<Expr>, Resolver), String> {
        let mut keys = Vec::new();
        let mut resolver = Resolver::default();
        for (u, on_unit, request, deps) in &self.request_keys {
            if *u != unit {
                continue;
            }
            keys.push(on_unit.clone());
            let slot = match self.side(*deps)? {
                Side::Request(eaches) if eaches != 0 => {
                    let [source] = bits(eaches).collect::<Vec<_>>()[..] else {
                        return Err(UNASSOCIATED.into());
                    };
                    let each = self.request_each(&mut resolver, source, unit)?;
                    Slot::Each {
                        each,
                        expr: request.clone(),
                    }
                }
                _ => Slot::Request(request.clone()),
            };
            resolver.slots.push(slot);
        }
        for child in self.neighbours(unit).into_iter().filter(|c| Some(*c) != parent) {
            let mut outputs = Vec::new();
            for (a, ea, b, eb) in &self.edges {
                let (mine, theirs) = match (*a == unit && *b == child, *b == unit && *a == child) {
                    (true, _) => (ea, eb),
                    (_, true) => (eb, ea),
                    _ => continue,
                };
                keys.push(mine.clone());
                resolver.slots.push(Slot::Child {
                    child: resolver.children.len(),
                    output: outputs.len(),
                });
                outputs.push(theirs.clone());
            }
            let (child_keys, child_resolver) = self.node(child, Some(unit), indexes)?;
            let index = indexes.register(ParameterIndex {
                rows: self.row_plan(child)?,
                keys: child_keys,
                outputs,
            });
            resolver.children.push(ChildLookup {
                index,
                resolver: child_resolver,
            });
        }
        Ok((keys, resolver))
    }

    fn request_each(&self, resolver: &mut Resolver, source: usize, unit: usize) -> Result<usize, String> {
        if let Some(i) = resolver.eaches.iter().position(|e| e.source == source) {
            return Ok(i);
        }
        let mut used = self.used_eaches.borrow_mut();
        // Two tables' keys would each expand the array on their own and lose which values
        // came from the same element.
        if used.iter().any(|(s, u)| *s == source && *u != unit) {
            return Err("A json_each of request data can only be compared with one table".into());
        }
        used.push((source, unit));
        resolver.eaches.push(self.request_each_plan(source));
        Ok(resolver.eaches.len() - 1)
    }

    fn request_each_plan(&self, source: usize) -> RequestEach {
        let arg = match &self.branch.sources[source].kind {
            SourceKind::Each { arg, .. } => arg.clone(),
            SourceKind::Table(_) => Expr::Lit(crate::value::SqliteValue::Null),
        };
        RequestEach {
            source,
            arg,
            filters: self.each_filters.get(&source).cloned().unwrap_or_default(),
        }
    }

    /// Request-side `json_each` sources no resolver uses: they still constrain the branch.
    fn unused_request_eaches(&self) -> Vec<RequestEach> {
        let used = self.used_eaches.borrow();
        (0..self.branch.sources.len())
            .filter(|i| self.unit_of[*i].is_none() && !used.iter().any(|(s, _)| s == i))
            .map(|i| self.request_each_plan(i))
            .collect()
    }
}
