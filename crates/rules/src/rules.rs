//! [`SyncRules`]: a parsed legacy sync rules file, with replication-time row
//! evaluation and request-time queriers.

use crate::config::{parse_yaml, Compatibility, SyncRulesOptions};
use crate::data_query::DataQuery;
use crate::errors::{EvaluationError, RuleIssue, SyncRulesError};
use crate::expr::Ctx;
use crate::param_query::{Kind, ParamQuery};
use crate::querier::{
    bucket_id, BucketDescription, BucketReason, BucketSet, LookupKey, PendingLookup, Querier, StreamInfo, StreamsRequest,
};
use crate::request::RequestParameters;
use crate::streams::{CompileOptions, StreamQuerier, StreamSet};
use crate::table::{SourceTableName, TablePattern};
use crate::value::Row;
use std::collections::HashSet;
use std::sync::Arc;

const DANGEROUS: &str = "Potentially dangerous query based on parameters set by the client. The client can send any value for these parameters so it's not a good place to do authorization.";

/// Public description of one bucket definition or stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketSourceInfo {
    /// Definition or stream name.
    pub name: String,
    /// Default priority of its buckets.
    pub priority: u8,
}

/// A row placed in a bucket by a data query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvaluatedRow {
    /// Bucket id.
    pub bucket: String,
    /// Output table name.
    pub table: String,
    /// Row id (text).
    pub id: String,
    /// Compact JSON object of the output columns.
    pub data: String,
}

/// A parameter lookup entry produced from a source row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvaluatedParameters {
    /// Lookup key.
    pub lookup: LookupKey,
    /// JSON array of parameter objects stored for this lookup.
    pub bucket_parameters: String,
}

#[derive(Debug)]
struct Definition {
    name: String,
    /// Bucket id prefix (`<prefix id>#<name>` when versioned).
    prefix: String,
    /// First element of its parameter lookup keys: the name, or `<prefix id>#<name>` when the
    /// definition was built under another id than the stream's (an in-place deploy), so a
    /// changed definition never shares lookups with the one it replaces.
    lookup_name: String,
    priority: u8,
    params: Vec<String>,
    param_queries: Vec<ParamQuery>,
    data_queries: Vec<DataQuery>,
}

fn sources_of(definitions: &[Definition], streams: &StreamSet) -> Vec<BucketSourceInfo> {
    let legacy = definitions.iter().map(|d| (d.name.as_str(), d.priority));
    legacy
        .chain(streams.names())
        .map(|(name, priority)| BucketSourceInfo {
            name: name.to_string(),
            priority,
        })
        .collect()
}

/// A parsed sync rules file.
#[derive(Debug)]
pub struct SyncRules {
    compatibility: Compatibility,
    /// Bucket ids carry a `<prefix id>#` (versioned bucket ids or storage version 2+).
    versioned: bool,
    warnings: Vec<RuleIssue>,
    definitions: Vec<Definition>,
    streams: Arc<StreamSet>,
    sources: Vec<BucketSourceInfo>,
}

impl SyncRules {
    /// Parses and validates a sync rules YAML file, collecting all errors; every error and
    /// warning gets its position in the file where it can be found.
    pub fn parse(yaml: &str, options: &SyncRulesOptions) -> Result<SyncRules, SyncRulesError> {
        let locator = crate::locate::Locator::new(yaml);
        match Self::parse_unlocated(yaml, options) {
            Ok(mut rules) => {
                locator.attach(&mut rules.warnings);
                Ok(rules)
            }
            Err(mut e) => {
                locator.attach(&mut e.errors);
                locator.attach(&mut e.warnings);
                Err(e)
            }
        }
    }

    /// The bucket definition or stream a bucket id belongs to (with or without the
    /// `<id>#` prefix of versioned ids).
    pub fn definition_of(&self, bucket: &str) -> Option<&str> {
        let unversioned = match bucket.split_once('#') {
            Some((id, rest)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => rest,
            _ => bucket,
        };
        let starts = |b: &str, name: &str| b.strip_prefix(name).is_some_and(|r| r.starts_with('[') || r.starts_with('|'));
        self.sources
            .iter()
            .map(|s| s.name.as_str())
            .filter(|name| starts(unversioned, name) || starts(bucket, name))
            .max_by_key(|name| name.len())
    }

    fn parse_unlocated(yaml: &str, options: &SyncRulesOptions) -> Result<SyncRules, SyncRulesError> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let raw = parse_yaml(yaml, options, &mut errors, &mut warnings);
        let Some(raw) = raw else {
            return Err(SyncRulesError { errors, warnings });
        };
        let versioned = raw.compatibility.versioned_bucket_ids || raw.storage_version >= 2;
        let streams = StreamSet::compile(
            &raw.streams,
            &CompileOptions {
                id_prefix: if versioned {
                    format!("{}#", options.sync_rules_id)
                } else {
                    String::new()
                },
                default_schema: &options.default_schema,
                fixed_json: raw.compatibility.fixed_json_extract,
                global_ctes: &raw.ctes,
            },
            &mut errors,
            &mut warnings,
        );
        let mut definitions = Vec::new();
        for def in raw.definitions {
            let name = def.name.clone();
            let prefix_id = options.prefix_ids.get(&name).copied().unwrap_or(options.sync_rules_id);
            let prefix = if versioned { format!("{prefix_id}#{name}") } else { name.clone() };
            let lookup_name = if prefix_id == options.sync_rules_id {
                name.clone()
            } else {
                format!("{prefix_id}#{name}")
            };
            let mut param_queries = Vec::new();
            match &def.parameters {
                None => param_queries.push(ParamQuery::global("1".to_string())),
                Some(list) => {
                    for (i, sql) in list.iter().enumerate() {
                        let issue = |m: String| RuleIssue::at(m, &name, Some(sql));
                        match ParamQuery::parse(sql, (i + 1).to_string(), &options.default_schema) {
                            Ok(q) => {
                                if q.priority.is_some() && def.priority.is_some() {
                                    errors.push(issue("Cannot set priority multiple times.".into()));
                                }
                                if q.dangerous && !def.accept_dangerous {
                                    warnings.push(issue(DANGEROUS.into()));
                                }
                                param_queries.push(q);
                            }
                            Err(m) => errors.push(issue(m)),
                        }
                    }
                }
            }
            let params = param_queries.first().map(ParamQuery::param_names).unwrap_or_default();
            let first: HashSet<&String> = params.iter().collect();
            for q in param_queries.iter().skip(1) {
                let names = q.param_names();
                if names.iter().collect::<HashSet<_>>() != first {
                    errors.push(RuleIssue::at(
                        "Bucket parameters must match for each parameter query within a bucket",
                        &name,
                        None,
                    ));
                    break;
                }
            }
            let mut data_queries = Vec::new();
            for sql in &def.data {
                match DataQuery::parse(sql, &params, &options.default_schema) {
                    Ok(q) => data_queries.push(q),
                    Err(m) => errors.push(RuleIssue::at(m, &name, Some(sql))),
                }
            }
            let priority = def.priority.or_else(|| param_queries.iter().find_map(|q| q.priority)).unwrap_or(3);
            definitions.push(Definition {
                name,
                prefix,
                lookup_name,
                priority,
                params,
                param_queries,
                data_queries,
            });
        }
        if !errors.is_empty() {
            return Err(SyncRulesError { errors, warnings });
        }
        Ok(SyncRules {
            sources: sources_of(&definitions, &streams),
            compatibility: raw.compatibility,
            versioned,
            warnings,
            definitions,
            streams: Arc::new(streams),
        })
    }

    /// Only the bucket definitions named in `names` (no streams): what an in-place deploy
    /// evaluates when it re-reads a table for its added and changed definitions.
    pub fn restricted_to(mut self, names: &[String]) -> SyncRules {
        self.definitions.retain(|d| names.contains(&d.name));
        self.streams = Arc::new(StreamSet::default());
        self.sources = sources_of(&self.definitions, &self.streams);
        self
    }

    /// `self` plus the definitions of `extra` (whose bucket ids and lookups must differ from
    /// `self`'s, as an in-place deploy's added and changed definitions do): while such a deploy
    /// is built, live changes feed the active definitions and the new ones alike.
    pub fn union(mut self, extra: SyncRules) -> SyncRules {
        self.definitions.extend(extra.definitions);
        self.sources = sources_of(&self.definitions, &self.streams);
        self
    }

    /// Whether `bucket` is one of the buckets these rules can produce (a bucket of a
    /// definition an in-place deploy removed or replaced is not).
    pub fn owns_bucket(&self, bucket: &str) -> bool {
        let followed_by_params = |prefix: &str| bucket.strip_prefix(prefix).is_some_and(|r| r.starts_with('['));
        self.definitions.iter().any(|d| followed_by_params(&d.prefix)) || self.streams.owns_bucket(bucket)
    }

    /// Whether parameter lookup `lookup` (as stored) is one these rules produce.
    pub fn owns_lookup(&self, lookup: &str) -> bool {
        let produces = |name: &str| {
            let head = LookupKey::head(name, "");
            // `head` ends with the empty query id's closing quote; keep the opening one.
            lookup.starts_with(&head[..head.len() - 1])
        };
        self.definitions.iter().any(|d| produces(&d.lookup_name)) || (!self.streams.is_empty() && produces("lookup"))
    }

    /// Non-fatal issues found while parsing.
    pub fn warnings(&self) -> &[RuleIssue] {
        &self.warnings
    }

    /// Whether bucket ids carry their definition's prefix id: only then can a changed
    /// definition get new bucket ids without the others changing (an in-place deploy).
    pub fn versioned_bucket_ids(&self) -> bool {
        self.versioned
    }

    /// Effective compatibility switches.
    pub fn compatibility(&self) -> &Compatibility {
        &self.compatibility
    }

    /// Table patterns used by data and parameter queries (deduplicated).
    pub fn source_patterns(&self) -> Vec<TablePattern> {
        let mut out: Vec<TablePattern> = Vec::new();
        for d in &self.definitions {
            let data = d.data_queries.iter().map(|q| &q.pattern);
            let params = d.param_queries.iter().filter_map(|q| match &q.kind {
                Kind::Table { pattern, .. } => Some(pattern),
                _ => None,
            });
            for p in data.chain(params) {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
        }
        for p in self.streams.patterns() {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        out
    }

    /// Whether data queries (stream queries included) and parameter queries read the table.
    pub fn table_roles(&self, t: &SourceTableName) -> (bool, bool) {
        let data = self.definitions.iter().any(|d| d.data_queries.iter().any(|q| q.pattern.matches(t)))
            || self.streams.patterns().any(|p| p.matches(t));
        let parameters = self.definitions.iter().any(|d| {
            d.param_queries.iter().any(|q| match &q.kind {
                Kind::Table { pattern, .. } => pattern.matches(t),
                _ => false,
            })
        });
        (data, parameters)
    }

    /// True when any query reads from the table.
    pub fn is_table_used(&self, t: &SourceTableName) -> bool {
        self.source_patterns().iter().any(|p| p.matches(t))
    }

    /// Replication time: the buckets a source row belongs to.
    pub fn evaluate_row(&self, t: &SourceTableName, row: &Row) -> Vec<Result<EvaluatedRow, EvaluationError>> {
        let mut out = Vec::new();
        self.evaluate_row_into(t, row, &mut out);
        out
    }

    /// [`SyncRules::evaluate_row`] appending to `out`: a replicator reuses one list for all
    /// its rows (a fresh list per row showed in profiles).
    pub fn evaluate_row_into(&self, t: &SourceTableName, row: &Row, out: &mut Vec<Result<EvaluatedRow, EvaluationError>>) {
        let fixed = self.compatibility.fixed_json_extract;
        for d in &self.definitions {
            for q in d.data_queries.iter().filter(|q| q.pattern.matches(t)) {
                match q.evaluate(t, row, &d.prefix, fixed) {
                    Ok(rows) => out.extend(rows.into_iter().map(Ok)),
                    Err(message) => out.push(Err(EvaluationError { message })),
                }
            }
        }
        self.streams.evaluate_row(t, row, out);
    }

    /// Replication time: the parameter lookup entries of a source row.
    pub fn evaluate_parameter_row(&self, t: &SourceTableName, row: &Row) -> Vec<Result<EvaluatedParameters, EvaluationError>> {
        let fixed = self.compatibility.fixed_json_extract;
        let mut out = Vec::with_capacity(2);
        for d in &self.definitions {
            for q in &d.param_queries {
                let Kind::Table { pattern, .. } = &q.kind else {
                    continue;
                };
                if !pattern.matches(t) {
                    continue;
                }
                let suffix = pattern.is_wildcard().then(|| pattern.suffix(t));
                match q.evaluate_row(row, suffix, fixed) {
                    Ok(entries) => out.extend(entries.into_iter().map(|(values, stored)| {
                        Ok(EvaluatedParameters {
                            lookup: LookupKey::new(&d.lookup_name, &q.id, &values),
                            bucket_parameters: stored,
                        })
                    })),
                    Err(message) => out.push(Err(EvaluationError { message })),
                }
            }
        }
        self.streams.evaluate_parameter_row(t, row, &mut out);
        out
    }

    /// One entry per bucket definition, then one per stream, in file order.
    pub fn bucket_sources(&self) -> &[BucketSourceInfo] {
        &self.sources
    }

    /// Request time: static buckets and the lookups for dynamic ones, for a connection with
    /// the given stream subscriptions.
    pub fn querier(&self, request: &RequestParameters, streams: &StreamsRequest) -> Querier {
        let ctx = Ctx {
            request: Some(request),
            fixed_json: self.compatibility.fixed_json_extract,
            ..Ctx::default()
        };
        let mut statics = BucketSet::default();
        let mut querier = Querier::default();
        let mut seen = HashSet::new();
        for (index, d) in self.definitions.iter().enumerate() {
            for q in &d.param_queries {
                let priority = q.priority.unwrap_or(d.priority);
                if let Kind::Table { .. } = q.kind {
                    let plan = match q.lookup_values(&ctx) {
                        Ok(Some(plan)) => plan,
                        Ok(None) => continue,
                        Err(e) => {
                            querier.errors.push(format!("{}: {e}", d.name));
                            continue;
                        }
                    };
                    for values in &plan.tuples {
                        let lookup = LookupKey::new(&d.lookup_name, &q.id, values);
                        if !seen.insert(lookup.clone()) {
                            continue;
                        }
                        querier.lookups.push(lookup.clone());
                        querier.pending.push(PendingLookup {
                            lookup,
                            prefix: d.prefix.clone(),
                            priority,
                            reason: BucketReason::Default(index),
                            order: d.params.clone(),
                            columns: plan.columns.clone(),
                        });
                    }
                    continue;
                }
                match q.static_sets(&ctx) {
                    Ok(sets) => {
                        for set in sets {
                            statics.add(BucketDescription {
                                bucket: bucket_id(&d.prefix, &d.params, &set),
                                priority,
                                reasons: vec![BucketReason::Default(index)],
                            });
                        }
                    }
                    Err(e) => querier.errors.push(format!("{}: {e}", d.name)),
                }
            }
        }
        querier.static_buckets = statics.into_vec();
        querier.streams = self
            .definitions
            .iter()
            .map(|d| StreamInfo {
                name: d.name.clone(),
                is_default: true,
                errors: Vec::new(),
            })
            .collect();
        if !self.streams.is_empty() {
            querier.stream_querier = Some(StreamQuerier::new(&self.streams, request, streams, &mut querier.streams));
        }
        querier
    }
}
