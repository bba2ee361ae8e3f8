//! Evaluation of planned streams: source rows into bucket rows and parameter-index entries at
//! replication time, and request data plus stored lookups into bucket parameters at request
//! time.

use super::builder::OutColumn;
use super::plan::{ParameterIndex, RequestEach, Resolver, RowPlan, Slot};
use super::scope::each_column;
use crate::expr::Ctx;
use crate::expr::Expr;
use crate::json::{self, object_text, write_data_value, write_param_value, Json};
use crate::param_query::json_each;
use crate::querier::LookupKey;
use crate::request::RequestParameters;
use crate::table::SourceTableName;
use crate::value::{js_number, sqlite_bool, Row, SqliteValue};
use crate::{EvaluatedParameters, EvaluatedRow, EvaluationError};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::collections::HashMap;

/// Most value tuples one resolver may produce before it is an error.
const MAX_TUPLES: usize = 10_000;

/// The lookup key of index `index` for `values`.
pub(crate) fn index_lookup<'v>(index: usize, values: impl IntoIterator<Item = &'v SqliteValue>) -> LookupKey {
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

/// Appends `keys` evaluated in `ctx` with `push`; `false` when one is NULL or a BLOB (such
/// rows match nothing).
fn push_keys(out: &mut String, keys: &[Expr], ctx: &Ctx<'_>, push: fn(&mut String, &SqliteValue, bool)) -> Result<bool, String> {
    for (i, k) in keys.iter().enumerate() {
        let v = k.eval_ref(ctx)?;
        if !usable(&v) {
            return Ok(false);
        }
        push(out, &v, i == 0);
    }
    Ok(true)
}

/// A bucket parameter: comma-separated inside the id's JSON array.
fn push_param(out: &mut String, v: &SqliteValue, first: bool) {
    if !first {
        out.push(',');
    }
    write_param_value(out, v);
}

fn push_lookup_value(out: &mut String, v: &SqliteValue, _first: bool) {
    LookupKey::push_value(out, v);
}

/// Data of the synced row: `*` copies every column (also `_`-prefixed ones), later columns
/// overwrite earlier ones, BLOBs are dropped.
pub(crate) fn row_data(columns: &[OutColumn], ctx: &Ctx<'_>) -> Result<(String, String), String> {
    // `SELECT *` alone, the common case: the row's columns as they are (names are unique).
    if let ([OutColumn::Star], Some(row)) = (columns, ctx.row) {
        let fields = row.iter().filter(|(_, v)| !matches!(v, SqliteValue::Blob(_)));
        let id = id_text(fields.clone().find(|(n, _)| *n == "id").map(|(_, v)| v));
        return Ok((id, json::object_text_of(fields)));
    }
    // On the stack for rows of up to 16 columns: two of these per source row showed in profiles.
    let mut data: Fields<'_> = SmallVec::with_capacity(ctx.row.map_or(0, Row::len) + columns.len());
    for col in columns {
        match col {
            // A row's column names are unique: the first `*` needs no lookups.
            OutColumn::Star if data.is_empty() => {
                data.extend(ctx.row.map(Row::iter).into_iter().flatten().map(|(n, v)| (n, Cow::Borrowed(v))));
            }
            OutColumn::Star => {
                for (name, value) in ctx.row.map(Row::iter).into_iter().flatten() {
                    set(&mut data, name, Cow::Borrowed(value));
                }
            }
            // A named column the source row lacks is left out (as the reference does), not null.
            OutColumn::Value(_, Expr::Column(c)) if ctx.row.is_some_and(|r| r.get(c).is_none()) => {}
            OutColumn::Value(name, e) => set(&mut data, name, e.eval_ref(ctx)?),
        }
    }
    data.retain(|(_, v)| !matches!(**v, SqliteValue::Blob(_)));
    let id = id_text(data.iter().find(|(n, _)| *n == "id").map(|(_, v)| &**v));
    Ok((id, object_text(&data)))
}

/// The row id of synced row data: its `id` column as text.
fn id_text(id: Option<&SqliteValue>) -> String {
    match id {
        Some(SqliteValue::Text(s)) => s.clone(),
        Some(SqliteValue::Integer(i)) => i.to_string(),
        Some(SqliteValue::Real(f)) => js_number(*f),
        _ => String::new(),
    }
}

type Fields<'c> = SmallVec<[(&'c str, Cow<'c, SqliteValue>); 16]>;

fn set<'c>(data: &mut Fields<'c>, name: &'c str, v: Cow<'c, SqliteValue>) {
    match data.iter_mut().find(|(n, _)| *n == name) {
        Some(slot) => slot.1 = v,
        None => data.push((name, v)),
    }
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

/// Per-row scratch space shared by the data sources of one table.
#[derive(Default)]
pub(crate) struct RowScratch {
    /// Row data already computed for this row, by shape: (shape, id, data).
    data: Vec<(usize, String, String)>,
    /// Bucket ids of the data source being evaluated.
    buckets: Vec<String>,
    /// The bucket id being built: copied out (at its exact size) only when it is new.
    key: String,
    /// Bucket rows found so far: (bucket, index into `data`, output table).
    pending: Vec<(String, usize, String)>,
}

impl RowScratch {
    /// Ready for the next source row.
    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.buckets.clear();
        self.pending.clear();
    }

    /// Emits the bucket rows found for this row. The last row of each shape takes the shared
    /// id and data strings instead of copying them.
    pub(crate) fn finish(&mut self, out: &mut Vec<Result<EvaluatedRow, EvaluationError>>) {
        // Few shapes per row: no allocation for the bookkeeping in the common case.
        let mut few = [usize::MAX; 8];
        let mut many = Vec::new();
        let last_use: &mut [usize] = match few.get_mut(..self.data.len()) {
            Some(slots) => slots,
            None => {
                many.resize(self.data.len(), usize::MAX);
                &mut many
            }
        };
        for (i, (_, slot, _)) in self.pending.iter().enumerate() {
            last_use[*slot] = i;
        }
        for (i, (bucket, slot, table)) in self.pending.drain(..).enumerate() {
            let (_, id, data) = &mut self.data[slot];
            let (id, data) = if last_use[slot] == i {
                (std::mem::take(id), std::mem::take(data))
            } else {
                (id.clone(), data.clone())
            };
            out.push(Ok(EvaluatedRow { bucket, table, id, data }));
        }
    }
}

impl DataSource {
    /// Finds the buckets of a source row; they are emitted by [`RowScratch::finish`].
    pub(crate) fn evaluate(&self, t: &SourceTableName, row: &Row, fixed_json: bool, scratch: &mut RowScratch) -> Result<(), String> {
        let RowScratch {
            data: cache,
            buckets,
            key,
            pending,
        } = scratch;
        buckets.clear();
        self.plan.rows.for_each(row, t, fixed_json, &mut |ctx| {
            key.clear();
            key.push_str(&self.prefix);
            key.push('[');
            if push_keys(key, &self.plan.keys, ctx, push_param)? {
                key.push(']');
                if !buckets.contains(key) {
                    buckets.push(key.clone());
                }
            }
            Ok(())
        })?;
        if buckets.is_empty() {
            return Ok(());
        }
        let slot = match cache.iter().position(|(shape, ..)| *shape == self.shape) {
            Some(i) => i,
            None => {
                let (id, data) = row_data(&self.plan.columns, &self.plan.rows.ctx(row, t, fixed_json))?;
                cache.push((self.shape, id, data));
                cache.len() - 1
            }
        };
        let table = match &self.plan.alias {
            Some(a) => a.as_str(),
            None if self.plan.rows.pattern.is_wildcard() => t.name.as_str(),
            None => self.plan.rows.pattern.table_text(),
        };
        pending.extend(buckets.drain(..).map(|bucket| (bucket, slot, table.to_string())));
        Ok(())
    }
}

impl ParameterIndex {
    /// Appends the index entries of a source row to `out`, one per distinct lookup key;
    /// `head` starts each key (see [`LookupKey::head`]).
    pub(crate) fn evaluate(
        &self,
        head: &str,
        t: &SourceTableName,
        row: &Row,
        fixed_json: bool,
        out: &mut Vec<Result<EvaluatedParameters, EvaluationError>>,
    ) -> Result<(), String> {
        // (lookup key text, JSON array of the stored objects); usually one per row.
        let mut entries: SmallVec<[(String, String); 2]> = SmallVec::new();
        self.rows.for_each(row, t, fixed_json, &mut |ctx| {
            let mut lookup = String::with_capacity(head.len() + 40);
            lookup.push_str(head);
            if !push_keys(&mut lookup, &self.keys, ctx, push_lookup_value)? {
                return Ok(());
            }
            lookup.push(']');
            // Written as a one-object array `[{...}]`, the common case.
            let mut array = String::with_capacity(48);
            array.push_str("[{");
            for (i, o) in self.outputs.iter().enumerate() {
                let v = o.eval_ref(ctx)?;
                if matches!(*v, SqliteValue::Blob(_)) {
                    continue;
                }
                if array.len() > 2 {
                    array.push(',');
                }
                push_index_key(&mut array, i);
                write_data_value(&mut array, &v);
            }
            array.push_str("}]");
            match entries.iter_mut().find(|(l, _)| *l == lookup) {
                // Objects are flat `{...}` texts, so containment is an exact-duplicate test.
                Some((_, existing)) => {
                    let object = &array[1..array.len() - 1];
                    if !existing.contains(object) {
                        existing.pop();
                        existing.push(',');
                        existing.push_str(object);
                        existing.push(']');
                    }
                }
                None => entries.push((lookup, array)),
            }
            Ok(())
        })?;
        out.extend(entries.into_iter().map(|(lookup, array)| {
            Ok(EvaluatedParameters {
                lookup: LookupKey::from_stored(lookup),
                bucket_parameters: array,
            })
        }));
        Ok(())
    }
}

/// `"<i>":`, the key of the `i`th output in a stored parameter object.
fn push_index_key(out: &mut String, i: usize) {
    out.push('"');
    json::write_int(out, i);
    out.push_str("\":");
}

impl RequestEach {
    /// One element as a row, under the names expressions read it by.
    fn element_row(&self, key: SqliteValue, value: SqliteValue) -> Row {
        let mut row = Row::with_capacity(2);
        row.push(each_column(self.source, "key"), key);
        row.push(each_column(self.source, "value"), value);
        row
    }

    /// Whether some element passes the conditions (an empty array: none does).
    pub(crate) fn any_passes(&self, request: &RequestParameters, fixed_json: bool) -> Result<bool, String> {
        let ctx = Ctx {
            request: Some(request),
            fixed_json,
            ..Ctx::default()
        };
        let array = self.arg.eval(&ctx)?;
        'elements: for (key, value) in json_each(&array, fixed_json)? {
            let row = self.element_row(key, value);
            let ectx = Ctx { row: Some(&row), ..ctx };
            for f in &self.filters {
                if !sqlite_bool(&f.eval(&ectx)?) {
                    continue 'elements;
                }
            }
            return Ok(true);
        }
        Ok(false)
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
            let row = each.element_row(key, value);
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
