//! Sync streams (edition 3, and the alpha streams of editions 2): queries with JOINs,
//! subqueries, CTEs and `json_each` are split into OR branches, and each branch is planned
//! into a data source (rows into buckets), parameter indexes (rows into lookups) and a
//! request-side resolver (request data and lookups into bucket parameters).

mod builder;
mod dnf;
mod eval;
mod plan;
mod scope;
#[cfg(test)]
mod tests;

use crate::config::RawStream;
use crate::errors::RuleIssue;
use crate::expr::Ctx;
use crate::json::serialize_params;
use crate::querier::{BucketDescription, BucketReason, BucketSet, LookupKey, StreamError, StreamInfo, StreamsRequest};
use crate::request::RequestParameters;
use crate::table::{SourceTableName, TablePattern};
use crate::value::{sqlite_bool, Row};
use crate::{EvaluatedParameters, EvaluatedRow, EvaluationError};
use eval::{DataSource, RequestScope};
use plan::{Indexes, ParameterIndex, QuerierPlan};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

const UNUSED_CTE: &str = "This common table expression isn't referenced.";
const DANGEROUS: &str = "Clients can send any value for this unauthenticated parameter, so this is unsuitable for authorization. Consider further constraining this with an authenticated parameter.";

/// At most this many distinct buckets per stream (reference limit).
const MAX_BUCKETS_PER_STREAM: usize = 100;

#[derive(Debug)]
struct Stream {
    name: String,
    auto_subscribe: bool,
    priority: u8,
    /// (bucket prefix, request-side plan), one per distinct bucket.
    queriers: Vec<(String, QuerierPlan)>,
}

/// All compiled streams of a sync config.
#[derive(Debug, Default)]
pub(crate) struct StreamSet {
    streams: Vec<Stream>,
    data: Vec<DataSource>,
    indexes: Vec<ParameterIndex>,
    /// The start of each index's lookup keys (`["lookup","<index>"`), written once.
    index_heads: Vec<String>,
    /// Data sources and indexes grouped by table pattern.
    by_pattern: Vec<ByPattern>,
    fixed_json: bool,
}

/// Compile-time settings shared by every stream.
pub(crate) struct CompileOptions<'a> {
    /// `<sync_rules_id>#` or empty.
    pub id_prefix: String,
    pub default_schema: &'a str,
    pub fixed_json: bool,
    pub global_ctes: &'a [(String, String)],
}

impl StreamSet {
    /// Compiles the streams; problems are appended to `errors`.
    pub(crate) fn compile(
        raw: &[RawStream],
        o: &CompileOptions<'_>,
        errors: &mut Vec<RuleIssue>,
        warnings: &mut Vec<RuleIssue>,
    ) -> StreamSet {
        let mut used_global = Vec::new();
        let mut indexes = Indexes::default();
        let mut set = StreamSet {
            fixed_json: o.fixed_json,
            ..StreamSet::default()
        };
        for r in raw {
            let ctes: Vec<(String, String)> = r.ctes.iter().chain(o.global_ctes).cloned().collect();
            let mut stream = Stream {
                name: r.name.clone(),
                auto_subscribe: r.auto_subscribe,
                priority: r.priority,
                queriers: Vec::new(),
            };
            let mut used = Vec::new();
            for sql in &r.queries {
                match set.compile_query(&mut stream, sql, &ctes, o, &mut indexes, &mut used) {
                    Ok(true) if !r.accept_dangerous => warnings.push(RuleIssue::at(DANGEROUS, &r.name, Some(sql))),
                    Ok(_) => {}
                    Err(m) => errors.push(RuleIssue::at(m, &r.name, Some(sql))),
                }
            }
            for (name, _) in &r.ctes {
                if !used.contains(name) {
                    warnings.push(RuleIssue::at(UNUSED_CTE, &format!("{}.with.{name}", r.name), None));
                }
            }
            used_global.extend(used.into_iter().filter(|n| !r.ctes.iter().any(|(l, _)| l == n)));
            if stream.queriers.len() > MAX_BUCKETS_PER_STREAM {
                errors.push(RuleIssue::at(
                    format!(
                        "This stream defines too many buckets ({}, at most {MAX_BUCKETS_PER_STREAM} are allowed). Try splitting queries into separate streams or move inner OR operators in filters to separate queries.",
                        stream.queriers.len()
                    ),
                    &r.name,
                    None,
                ));
            }
            set.streams.push(stream);
        }
        for (name, _) in o.global_ctes {
            if !used_global.contains(name) {
                warnings.push(RuleIssue::at(UNUSED_CTE, &format!("with.{name}"), None));
            }
        }
        set.indexes = indexes.list;
        set.index_heads = (0..set.indexes.len()).map(|i| LookupKey::head("lookup", &i.to_string())).collect();
        set.group_by_pattern();
        set
    }

    fn compile_query(
        &mut self,
        stream: &mut Stream,
        sql: &str,
        ctes: &[(String, String)],
        o: &CompileOptions<'_>,
        indexes: &mut Indexes,
        used_ctes: &mut Vec<String>,
    ) -> Result<bool, String> {
        let mut unauthenticated = false;
        for branch in builder::branches(sql, ctes, o.default_schema, used_ctes)? {
            unauthenticated |= branch.is_unauthenticated();
            let Some((data, querier)) = plan::plan_branch(&branch, indexes, o.fixed_json)? else {
                continue;
            };
            // Branches (and queries) whose buckets are instantiated the same way share a bucket.
            let prefix = match stream.queriers.iter().find(|(_, q)| *q == querier) {
                Some((prefix, _)) => prefix.clone(),
                None => {
                    let prefix = format!("{}{}|{}", o.id_prefix, stream.name, stream.queriers.len());
                    stream.queriers.push((prefix.clone(), querier));
                    prefix
                }
            };
            let shape_of = |d: &plan::DataPlan| format!("{:?}{:?}", d.columns, d.rows.pattern);
            let shape = shape_of(&data);
            let shape = self.data.iter().position(|d| shape_of(&d.plan) == shape).unwrap_or(self.data.len());
            self.data.push(DataSource { plan: data, prefix, shape });
        }
        Ok(unauthenticated)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Whether `bucket` is one of the buckets a data source of these streams produces.
    pub(crate) fn owns_bucket(&self, bucket: &str) -> bool {
        self.data
            .iter()
            .any(|d| bucket.strip_prefix(d.prefix.as_str()).is_some_and(|r| r.starts_with('[')))
    }

    /// Table patterns read by data sources and parameter indexes.
    pub(crate) fn patterns(&self) -> impl Iterator<Item = &TablePattern> {
        let data = self.data.iter().map(|d| &d.plan.rows.pattern);
        data.chain(self.indexes.iter().map(|i| &i.rows.pattern))
    }

    /// Stream names in config order.
    pub(crate) fn names(&self) -> impl Iterator<Item = (&str, u8)> {
        self.streams.iter().map(|s| (s.name.as_str(), s.priority))
    }

    pub(crate) fn evaluate_row(&self, t: &SourceTableName, row: &Row, out: &mut Vec<Result<EvaluatedRow, EvaluationError>>) {
        thread_local! {
            // Reused across rows: two fewer allocations per row on the replication hot path.
            static SCRATCH: RefCell<eval::RowScratch> = RefCell::new(eval::RowScratch::default());
        }
        SCRATCH.with(|cell| {
            let mut fresh = eval::RowScratch::default();
            let mut borrowed = cell.try_borrow_mut();
            let scratch = match borrowed.as_deref_mut() {
                Ok(s) => s,
                Err(_) => &mut fresh,
            };
            scratch.clear();
            for group in self.by_pattern.iter().filter(|p| p.pattern.matches(t)) {
                for d in group.data.iter().map(|i| &self.data[*i]) {
                    if let Err(message) = d.evaluate(t, row, self.fixed_json, scratch) {
                        out.push(Err(EvaluationError { message }));
                    }
                }
            }
            scratch.finish(out);
        });
    }

    pub(crate) fn evaluate_parameter_row(
        &self,
        t: &SourceTableName,
        row: &Row,
        out: &mut Vec<Result<EvaluatedParameters, EvaluationError>>,
    ) {
        for group in self.by_pattern.iter().filter(|p| p.pattern.matches(t)) {
            for i in &group.indexes {
                if let Err(message) = self.indexes[*i].evaluate(&self.index_heads[*i], t, row, self.fixed_json, out) {
                    out.push(Err(EvaluationError { message }));
                }
            }
        }
    }
}

/// The data sources and indexes (by position) that read one table pattern.
#[derive(Debug)]
struct ByPattern {
    pattern: TablePattern,
    data: Vec<usize>,
    indexes: Vec<usize>,
}

impl StreamSet {
    fn group_by_pattern(&mut self) {
        let mut groups: Vec<ByPattern> = Vec::new();
        let mut group = |pattern: &TablePattern| -> usize {
            match groups.iter().position(|g| g.pattern == *pattern) {
                Some(i) => i,
                None => {
                    groups.push(ByPattern {
                        pattern: pattern.clone(),
                        data: Vec::new(),
                        indexes: Vec::new(),
                    });
                    groups.len() - 1
                }
            }
        };
        let data: Vec<usize> = self.data.iter().map(|d| group(&d.plan.rows.pattern)).collect();
        let indexes: Vec<usize> = self.indexes.iter().map(|i| group(&i.rows.pattern)).collect();
        for (i, g) in data.into_iter().enumerate() {
            groups[g].data.push(i);
        }
        for (i, g) in indexes.into_iter().enumerate() {
            groups[g].indexes.push(i);
        }
        self.by_pattern = groups;
    }
}

/// One subscription (default or explicit) of a connection to a stream.
#[derive(Debug)]
struct Subscribed {
    stream: usize,
    reason: BucketReason,
    /// Index into the connection's `StreamInfo` list.
    info: usize,
    priority: u8,
    request: RequestParameters,
    /// Per querier: evaluation failed for this subscription (reported once, then skipped).
    failed: Vec<bool>,
}

/// The stream part of a connection's querier.
#[derive(Debug)]
pub(crate) struct StreamQuerier {
    set: Arc<StreamSet>,
    subs: Vec<Subscribed>,
}

impl StreamQuerier {
    /// Subscribes a connection; appends the subscribed streams to `infos`.
    pub(crate) fn new(set: &Arc<StreamSet>, request: &RequestParameters, req: &StreamsRequest, infos: &mut Vec<StreamInfo>) -> Self {
        let mut subs = Vec::new();
        for (index, stream) in set.streams.iter().enumerate() {
            let explicit: Vec<usize> = (0..req.subscriptions.len())
                .filter(|i| req.subscriptions[*i].stream == stream.name)
                .collect();
            let by_default = req.include_defaults && stream.auto_subscribe;
            let parameterless = explicit.iter().any(|i| req.subscriptions[*i].parameters.is_none());
            if !by_default && explicit.is_empty() {
                continue;
            }
            let info = infos.len();
            infos.push(StreamInfo {
                name: stream.name.clone(),
                // The stream's setting, as the reference reports it, even when the client
                // asked for no default streams.
                is_default: stream.auto_subscribe,
                errors: Vec::new(),
            });
            let failed = vec![false; stream.queriers.len()];
            if by_default && !parameterless {
                subs.push(Subscribed {
                    stream: index,
                    reason: BucketReason::Default(info),
                    info,
                    priority: stream.priority,
                    request: request.clone(),
                    failed: failed.clone(),
                });
            }
            for i in explicit {
                let s = &req.subscriptions[i];
                subs.push(Subscribed {
                    stream: index,
                    reason: BucketReason::Subscription(i),
                    info,
                    priority: s.override_priority.unwrap_or(stream.priority),
                    request: request.for_subscription(s.parameters.as_ref()),
                    failed: failed.clone(),
                });
            }
        }
        let mut q = StreamQuerier { set: set.clone(), subs };
        q.report_errors(infos);
        q
    }

    /// Request-only evaluation errors are known before any lookup: report them per
    /// subscription and leave those queriers out.
    fn report_errors(&mut self, infos: &mut [StreamInfo]) {
        let empty = HashMap::new();
        for sub in &mut self.subs {
            let stream = &self.set.streams[sub.stream];
            for (n, (_, plan)) in stream.queriers.iter().enumerate() {
                if let Err(e) = evaluate(plan, sub, self.set.fixed_json, &empty, &mut Vec::new()) {
                    sub.failed[n] = true;
                    infos[sub.info].errors.push(StreamError {
                        subscription: match sub.reason {
                            BucketReason::Default(_) => None,
                            BucketReason::Subscription(i) => Some(i),
                        },
                        message: format!("Error evaluating bucket ids: {e}"),
                    });
                }
            }
        }
    }

    fn each<'s>(&'s self) -> impl Iterator<Item = (&'s Subscribed, &'s str, &'s QuerierPlan)> + 's {
        self.subs.iter().flat_map(move |sub| {
            let queriers = &self.set.streams[sub.stream].queriers;
            queriers
                .iter()
                .enumerate()
                .filter(|(n, _)| !sub.failed[*n])
                .map(move |(_, (prefix, plan))| (sub, prefix.as_str(), plan))
        })
    }

    /// Lookups needed next, given the ones already `known`.
    pub(crate) fn missing(&self, known: &HashMap<LookupKey, Vec<String>>, missing: &mut Vec<LookupKey>) {
        for (sub, _, plan) in self.each() {
            // Errors were reported at subscription time.
            let _ = evaluate(plan, sub, self.set.fixed_json, known, missing);
        }
    }

    /// Adds the buckets resolvable from `known`.
    pub(crate) fn resolve(&self, known: &HashMap<LookupKey, Vec<String>>, out: &mut BucketSet) {
        for (sub, prefix, plan) in self.each() {
            let Ok(Some(tuples)) = evaluate(plan, sub, self.set.fixed_json, known, &mut Vec::new()) else {
                continue;
            };
            for t in tuples {
                out.add(BucketDescription {
                    bucket: format!("{prefix}{}", serialize_params(&t)),
                    priority: sub.priority,
                    reasons: vec![sub.reason],
                });
            }
        }
    }
}

type Tuples = Vec<Vec<crate::value::SqliteValue>>;

fn evaluate(
    plan: &QuerierPlan,
    sub: &Subscribed,
    fixed_json: bool,
    known: &HashMap<LookupKey, Vec<String>>,
    missing: &mut Vec<LookupKey>,
) -> Result<Option<Tuples>, String> {
    let ctx = Ctx {
        request: Some(&sub.request),
        fixed_json,
        ..Ctx::default()
    };
    for f in &plan.filters {
        if !sqlite_bool(&f.eval(&ctx)?) {
            return Ok(Some(Vec::new()));
        }
    }
    for each in &plan.exists {
        if !each.any_passes(&sub.request, fixed_json)? {
            return Ok(Some(Vec::new()));
        }
    }
    let scope = RequestScope {
        request: &sub.request,
        fixed_json,
        known,
    };
    plan.resolver.tuples(&scope, missing)
}
