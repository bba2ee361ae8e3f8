//! Evaluation of planned streams: source rows into bucket rows and parameter-index entries at
//! replication time, and request data plus stored lookups into bucket parameters at request
//! time.

use super::builder::OutColumn;
use super::plan::{ParameterIndex, Resolver, RowPlan, Slot};
use super::scope::each_column;
use crate::expr::Ctx;
use crate::json::{self, object_text, write_params, Json};
use crate::param_query::json_each;
use crate::querier::LookupKey;
use crate::request::RequestParameters;
use crate::table::SourceTableName;
use crate::value::{js_number, sqlite_bool, Row, SqliteValue};
use crate::{EvaluatedParameters, EvaluatedRow};
use std::collections::HashMap;

/// Most value tuples one resolver may produce before it is an error.
const MAX_TUPLES: usize = 10_000;

/// The lookup key of index `index` for `values`.
pub(crate) fn index_lookup(index: usize, values: &[SqliteValue]) -> LookupKey {
    LookupKey::new("lookup", &index.to_string(), values)
}

fn usable(v: &SqliteValue) -> bool {
    !matches!(v, SqliteValue::Null | SqliteValue::Blob(_))
}

type Visit<'v> = dyn FnMut(&Ctx<'_>) -> Result<(), String> + 'v;

impl RowPlan {
    /// Calls `visit` for each expanded row of `row` that passes the filters.
    pub(crate) fn for_each(&self, row: &Row, table: &SourceTableName, fixed_json: bool, visit: &mut Visit<'_>) -> Result<(), String> {
        if self.eaches.is_empty() {
            return self.visit_if_passes(row, table, fixed_json, visit);
        }
        self.expand(row.clone(), 0, table, fixed_json, visit)
    }

    /// Evaluation context for a row of this plan's table.
    pub(crate) fn ctx<'a>(&'a self, row: &'a Row, table: &'a SourceTableName, fixed_json: bool) -> Ctx<'a> {
        Ctx {
            row: Some(row),
            suffix: self.pattern.is_wildcard().then(|| self.pattern.suffix(table)),
            fixed_json,
            table: Some(table),
            ..Ctx::default()
        }
    }

    fn visit_if_passes(&self, row: &Row, table: &SourceTableName, fixed_json: bool, visit: &mut Visit<'_>) -> Result<(), String> {
        let ctx = self.ctx(row, table, fixed_json);
        for f in &self.filters {
            if !sqlite_bool(&f.eval(&ctx)?) {
                return Ok(());
            }
        }
        visit(&ctx)
    }

    fn expand(&self, row: Row, depth: usize, table: &SourceTableName, fixed_json: bool, visit: &mut Visit<'_>) -> Result<(), String> {
        let Some((source, arg)) = self.eaches.get(depth) else {
            return self.visit_if_passes(&row, table, fixed_json, visit);
        };
        let array = arg.eval(&self.ctx(&row, table, fixed_json))?;
        for (key, value) in json_each(&array, fixed_json)? {
            let mut expanded = row.clone();
            expanded.push(each_column(*source, "key"), key);
            expanded.push(each_column(*source, "value"), value);
            self.expand(expanded, depth + 1, table, fixed_json, visit)?;
        }
        Ok(())
    }
}

/// Evaluates `keys` in `ctx`; `None` when one is NULL or a BLOB (such rows match nothing).
fn key_values(keys: &[crate::expr::Expr], ctx: &Ctx<'_>) -> Result<Option<Vec<SqliteValue>>, String> {
    let mut values = Vec::with_capacity(keys.len());
    for k in keys {
        let v = k.eval(ctx)?;
        if !usable(&v) {
            return Ok(None);
        }
        values.push(v);
    }
    Ok(Some(values))
}

/// Data of the synced row: `*` copies every column (also `_`-prefixed ones), later columns
/// overwrite earlier ones, BLOBs are dropped.
pub(crate) fn row_data(columns: &[OutColumn], ctx: &Ctx<'_>) -> Result<(String, String), String> {
    let mut data: Vec<(String, SqliteValue)> = Vec::new();
    let mut set = |name: &str, v: SqliteValue| match data.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = v,
        None => data.push((name.to_string(), v)),
    };
    for col in columns {
        match col {
            OutColumn::Star => {
                for (name, value) in ctx.row.map(Row::iter).into_iter().flatten() {
                    set(name, value.clone());
                }
            }
            OutColumn::Value(name, e) => set(name, e.eval(ctx)?),
        }
    }
    data.retain(|(_, v)| !matches!(v, SqliteValue::Blob(_)));
    let id = match data.iter().find(|(n, _)| n == "id").map(|(_, v)| v) {
        Some(SqliteValue::Text(s)) => s.clone(),
        Some(SqliteValue::Integer(i)) => i.to_string(),
        Some(SqliteValue::Real(f)) => js_number(*f),
        _ => String::new(),
    };
    Ok((id, object_text(&data)))
}

/// One synced table of a stream bucket.
#[derive(Debug)]
pub(crate) struct DataSource {
    pub plan: super::plan::DataPlan,
    /// Bucket id prefix (`[<id>#]<stream>|<n>`).
    pub prefix: String,
    /// Sources with the same `shape` produce the same row data from the same source row, so
    /// it is computed once per row (many streams select `*` from the same table).
    pub shape: usize,
}

/// Row data already computed for a source row, by shape: (shape, id, data).
pub(crate) type DataCache = Vec<(usize, String, String)>;

impl DataSource {
    pub(crate) fn evaluate(
        &self,
        t: &SourceTableName,
        row: &Row,
        fixed_json: bool,
        cache: &mut DataCache,
    ) -> Result<Vec<EvaluatedRow>, String> {
        let mut buckets: Vec<String> = Vec::new();
        self.plan.rows.for_each(row, t, fixed_json, &mut |ctx| {
            if let Some(values) = key_values(&self.plan.keys, ctx)? {
                let mut bucket = String::with_capacity(self.prefix.len() + 24);
                bucket.push_str(&self.prefix);
                write_params(&mut bucket, &values);
                if !buckets.contains(&bucket) {
                    buckets.push(bucket);
                }
            }
            Ok(())
        })?;
        if buckets.is_empty() {
            return Ok(Vec::new());
        }
        let (id, data) = match cache.iter().find(|(shape, ..)| *shape == self.shape) {
            Some((_, id, data)) => (id.clone(), data.clone()),
            None => {
                let (id, data) = row_data(&self.plan.columns, &self.plan.rows.ctx(row, t, fixed_json))?;
                cache.push((self.shape, id.clone(), data.clone()));
                (id, data)
            }
        };
        let table = match &self.plan.alias {
            Some(a) => a.clone(),
            None if self.plan.rows.pattern.is_wildcard() => t.name.clone(),
            None => self.plan.rows.pattern.table_text().to_string(),
        };
        Ok(buckets
            .into_iter()
            .map(|bucket| EvaluatedRow {
                bucket,
                table: table.clone(),
                id: id.clone(),
                data: data.clone(),
            })
            .collect())
    }
}

impl ParameterIndex {
    /// Index entries of a source row, one per distinct lookup key.
    pub(crate) fn evaluate(&self, id: usize, t: &SourceTableName, row: &Row, fixed_json: bool) -> Result<Vec<EvaluatedParameters>, String> {
        let mut entries: Vec<(LookupKey, Vec<String>)> = Vec::new();
        self.rows.for_each(row, t, fixed_json, &mut |ctx| {
            let Some(values) = key_values(&self.keys, ctx)? else {
                return Ok(());
            };
            let mut fields = Vec::with_capacity(self.outputs.len());
            for (i, o) in self.outputs.iter().enumerate() {
                fields.push((i.to_string(), o.eval(ctx)?));
            }
            fields.retain(|(_, v)| !matches!(v, SqliteValue::Blob(_)));
            let object = object_text(&fields);
            let lookup = index_lookup(id, &values);
            match entries.iter_mut().find(|(l, _)| *l == lookup) {
                Some((_, objects)) if !objects.contains(&object) => objects.push(object),
                Some(_) => {}
                None => entries.push((lookup, vec![object])),
            }
            Ok(())
        })?;
        Ok(entries
            .into_iter()
            .map(|(lookup, objects)| EvaluatedParameters {
                lookup,
                bucket_parameters: format!("[{}]", objects.join(",")),
            })
            .collect())
    }
}

/// Request-time inputs of a resolver.
pub(crate) struct RequestScope<'a> {
    pub request: &'a RequestParameters,
    pub fixed_json: bool,
    pub known: &'a HashMap<LookupKey, Vec<String>>,
}

type Tuples = Vec<Vec<SqliteValue>>;
/// (slot, value) choices from one input of a resolver.
type Options = Vec<Vec<(usize, SqliteValue)>>;

/// Cross product of the tuples so far with the (slot, value) choices of one input.
fn cross(tuples: Tuples, options: &Options) -> Result<Tuples, String> {
    if tuples.len().saturating_mul(options.len()) > MAX_TUPLES {
        return Err(format!("Too many parameter combinations (more than {MAX_TUPLES})"));
    }
    let mut out = Vec::with_capacity(tuples.len() * options.len());
    for t in &tuples {
        for o in options {
            let mut t = t.clone();
            for (slot, v) in o {
                t[*slot] = v.clone();
            }
            out.push(t);
        }
    }
    Ok(out)
}

impl Resolver {
    /// The value tuples of this resolver's slots. `Ok(None)`: lookups are missing; they were
    /// added to `missing`.
    pub(crate) fn tuples(&self, s: &RequestScope<'_>, missing: &mut Vec<LookupKey>) -> Result<Option<Tuples>, String> {
        let ctx = Ctx {
            request: Some(s.request),
            fixed_json: s.fixed_json,
            ..Ctx::default()
        };
        let mut tuples = vec![vec![SqliteValue::Null; self.slots.len()]];
        for (i, slot) in self.slots.iter().enumerate() {
            if let Slot::Request(e) = slot {
                let v = e.eval(&ctx)?;
                if !usable(&v) {
                    return Ok(Some(Vec::new()));
                }
                tuples[0][i] = v;
            }
        }
        for (n, each) in self.eaches.iter().enumerate() {
            let options = self.each_options(n, each, s)?;
            tuples = cross(tuples, &options)?;
        }
        let mut complete = true;
        for (n, child) in self.children.iter().enumerate() {
            match self.child_options(n, child, s, missing)? {
                Some(options) if complete => tuples = cross(tuples, &options)?,
                Some(_) => {}
                None => complete = false,
            }
        }
        Ok(complete.then_some(tuples))
    }

    fn each_options(&self, n: usize, each: &super::plan::RequestEach, s: &RequestScope<'_>) -> Result<Options, String> {
        let ctx = Ctx {
            request: Some(s.request),
            fixed_json: s.fixed_json,
            ..Ctx::default()
        };
        let array = each.arg.eval(&ctx)?;
        let mut options = Vec::new();
        'elements: for (key, value) in json_each(&array, s.fixed_json)? {
            let mut row = Row::with_capacity(2);
            row.push(each_column(each.source, "key"), key);
            row.push(each_column(each.source, "value"), value);
            let ectx = Ctx { row: Some(&row), ..ctx };
            for f in &each.filters {
                if !sqlite_bool(&f.eval(&ectx)?) {
                    continue 'elements;
                }
            }
            let mut choice = Vec::new();
            for (i, slot) in self.slots.iter().enumerate() {
                if let Slot::Each { each, expr } = slot {
                    if *each == n {
                        let v = expr.eval(&ectx)?;
                        if !usable(&v) {
                            continue 'elements;
                        }
                        choice.push((i, v));
                    }
                }
            }
            options.push(choice);
        }
        Ok(options)
    }

    fn child_options(
        &self,
        n: usize,
        child: &super::plan::ChildLookup,
        s: &RequestScope<'_>,
        missing: &mut Vec<LookupKey>,
    ) -> Result<Option<Options>, String> {
        let Some(keys) = child.resolver.tuples(s, missing)? else {
            return Ok(None);
        };
        let mut options = Vec::new();
        let mut complete = true;
        for key in keys {
            let lookup = index_lookup(child.index, &key);
            let Some(stored) = s.known.get(&lookup) else {
                if !missing.contains(&lookup) {
                    missing.push(lookup);
                }
                complete = false;
                continue;
            };
            for text in stored {
                let Ok(Json::Array(objects)) = json::parse(text) else {
                    continue;
                };
                'rows: for obj in &objects {
                    let mut choice = Vec::new();
                    for (i, slot) in self.slots.iter().enumerate() {
                        if let Slot::Child { child: c, output } = slot {
                            if *c == n {
                                let v = obj.member(&output.to_string()).map_or(SqliteValue::Null, |j| j.to_sqlite(false));
                                if !usable(&v) {
                                    continue 'rows;
                                }
                                choice.push((i, v));
                            }
                        }
                    }
                    options.push(choice);
                }
            }
        }
        Ok(complete.then_some(options))
    }
}
