//! Which buckets a request would sync, why, and how much data each holds.
//!
//! Buckets are resolved the way a sync request resolves them (the querier of the rules crate,
//! parameter lookups read from bucket storage at the served checkpoint, in rounds for nested
//! subqueries); then each bucket's op count is read and its ops replayed to count live rows.
//! Without a served checkpoint only static buckets can be shown.

use ferrosync_rules::{BucketDescription, BucketReason, LookupKey, Querier, RequestParameters, StreamsRequest, SyncRules};
use ferrosync_storage::{OpType, StorageError, SyncStorage};
use serde::Serialize;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

/// Lookup rounds before giving up (each nesting level of subqueries takes one).
const MAX_ROUNDS: usize = 16;
/// Ops read per `bucket_data` call while counting rows.
const READ_BATCH: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("parameter lookups still missing after {MAX_ROUNDS} rounds")]
    TooDeep,
}

/// Bucket storage at the served checkpoint of a stream.
pub struct Served<'a, S> {
    pub storage: &'a S,
    pub stream_id: i64,
    pub checkpoint: i64,
}

/// Everything known about what a request syncs.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub buckets: Vec<BucketReport>,
    /// Every lookup made, with the stored rows it found (none: an empty list).
    pub lookups: Vec<LookupReport>,
    pub streams: Vec<StreamReport>,
    /// Request-level errors of the querier.
    pub errors: Vec<String>,
    /// Op and row totals (absent without a served checkpoint).
    pub totals: Option<Totals>,
    /// Why no bucket is synced, when none is.
    pub hints: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BucketReport {
    pub bucket: String,
    pub priority: u8,
    /// The bucket definition or stream it comes from.
    pub definition: String,
    /// Why the request syncs it: `default (stream)` or `subscription #i (stream {params})`.
    pub reasons: Vec<String>,
    pub ops: Option<i64>,
    pub rows: Option<usize>,
    /// The lookups of its definition that found rows.
    pub lookups: Vec<LookupReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LookupReport {
    /// The canonical lookup key (JSON text).
    pub lookup: String,
    /// Stored `bucket_parameters` of the rows found (JSON).
    pub rows: Vec<Value>,
}

#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub name: String,
    pub is_default: bool,
    pub errors: Vec<StreamErrorReport>,
}

#[derive(Debug, Serialize)]
pub struct StreamErrorReport {
    /// `default subscription` or the subscription it belongs to.
    pub subscription: String,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct Totals {
    pub buckets: usize,
    pub ops: i64,
    pub rows: usize,
}

/// Resolve `request` against `rules`, reading lookups and counts from `served` when given.
pub async fn explain<S: SyncStorage>(
    rules: &SyncRules,
    served: Option<&Served<'_, S>>,
    request: &RequestParameters,
    streams: &StreamsRequest,
) -> Result<Explanation, ExplainError> {
    let querier = rules.querier(request, streams);
    let lookups = match served {
        Some(s) => resolve_lookups(&querier, s).await?,
        None => HashMap::new(),
    };
    let buckets = querier.resolve(&lookups);
    let counts = match served {
        Some(s) => Some(counts(s, &buckets).await?),
        None => None,
    };
    let mut reports = Vec::with_capacity(buckets.len());
    for b in &buckets {
        let definition = rules.definition_of(&b.bucket).unwrap_or("?").to_string();
        let count = counts.as_ref().and_then(|c| c.get(&b.bucket));
        reports.push(BucketReport {
            bucket: b.bucket.clone(),
            priority: b.priority,
            reasons: b.reasons.iter().map(|r| reason_text(&querier, streams, r)).collect(),
            ops: count.map(|c| c.ops),
            rows: count.map(|c| c.rows),
            lookups: lookups_of(&definition, &lookups),
            definition,
        });
    }
    let totals = counts.as_ref().map(|_| Totals {
        buckets: reports.len(),
        ops: reports.iter().filter_map(|b| b.ops).sum(),
        rows: reports.iter().filter_map(|b| b.rows).sum(),
    });
    let hints = match buckets.is_empty() {
        true => zero_hints(&querier, streams, served.is_some()),
        false => Vec::new(),
    };
    let mut all_lookups: Vec<LookupReport> = lookups.iter().map(|(k, rows)| lookup_report(k, rows)).collect();
    all_lookups.sort_by(|a, b| a.lookup.cmp(&b.lookup));
    Ok(Explanation {
        buckets: reports,
        lookups: all_lookups,
        streams: stream_reports(&querier, streams),
        errors: querier.errors().to_vec(),
        totals,
        hints,
    })
}

/// Fetches lookups in rounds until the querier needs no more.
async fn resolve_lookups<S: SyncStorage>(querier: &Querier, s: &Served<'_, S>) -> Result<HashMap<LookupKey, Vec<String>>, ExplainError> {
    let mut known = HashMap::new();
    for _ in 0..MAX_ROUNDS {
        let missing = querier.missing_lookups(&known);
        if missing.is_empty() {
            return Ok(known);
        }
        let keys: Vec<String> = missing.iter().map(|l| l.as_str().to_string()).collect();
        let mut found = s.storage.parameter_sets(s.stream_id, s.checkpoint, &keys).await?;
        for lookup in missing {
            let rows = found.remove(lookup.as_str()).unwrap_or_default();
            known.insert(lookup, rows);
        }
    }
    Err(ExplainError::TooDeep)
}

fn reason_text(querier: &Querier, streams: &StreamsRequest, reason: &BucketReason) -> String {
    match reason {
        BucketReason::Default(i) => match querier.streams().get(*i) {
            Some(s) => format!("default ({})", s.name),
            None => "default".into(),
        },
        BucketReason::Subscription(i) => match streams.subscriptions.get(*i) {
            Some(sub) => format!(
                "subscription #{i} ({}{})",
                sub.stream,
                sub.parameters.as_ref().map(|p| format!(" {p}")).unwrap_or_default()
            ),
            None => format!("subscription #{i}"),
        },
    }
}

/// Op and live-row counts of one bucket at the checkpoint.
struct Counts {
    ops: i64,
    rows: usize,
}

async fn counts<S: SyncStorage>(s: &Served<'_, S>, buckets: &[BucketDescription]) -> Result<HashMap<String, Counts>, StorageError> {
    let ids: Vec<String> = buckets.iter().map(|b| b.bucket.clone()).collect();
    let sums = s.storage.checksums(s.stream_id, 0, s.checkpoint, &ids).await?;
    let mut out = HashMap::new();
    for id in ids {
        let ops = sums.get(&id).map_or(0, |c| c.count);
        let rows = if ops == 0 { 0 } else { live_rows(s, &id).await? };
        out.insert(id, Counts { ops, rows });
    }
    Ok(out)
}

/// Replays a bucket's ops the way a client applies them: rows by (table, id), last op wins.
async fn live_rows<S: SyncStorage>(s: &Served<'_, S>, bucket: &str) -> Result<usize, StorageError> {
    let mut live: HashSet<(String, String)> = HashSet::new();
    let mut after = 0;
    loop {
        let batch = s
            .storage
            .bucket_data(s.stream_id, s.checkpoint, &[(bucket.to_string(), after)], READ_BATCH)
            .await?;
        for (_, op) in &batch.ops {
            let key = (op.object_type.clone().unwrap_or_default(), op.object_id.clone().unwrap_or_default());
            match op.op {
                OpType::Put => {
                    live.insert(key);
                }
                OpType::Remove => {
                    live.remove(&key);
                }
                OpType::Clear => live.clear(),
                OpType::Move => {}
            }
            after = after.max(op.op_id);
        }
        // `resume` is where the read stopped early; without it the bucket is complete.
        match batch.resume {
            Some((_, position)) if position >= after && !(batch.ops.is_empty() && position == after) => after = position,
            _ => return Ok(live.len()),
        }
    }
}

fn lookup_report(key: &LookupKey, rows: &[String]) -> LookupReport {
    LookupReport {
        lookup: key.as_str().to_string(),
        rows: rows
            .iter()
            .map(|r| serde_json::from_str(r).unwrap_or_else(|_| Value::String(r.clone())))
            .collect(),
    }
}

/// Lookups of a legacy bucket definition that found rows (their keys start with its name).
/// Stream lookups are keyed by parameter index, not stream, and are listed separately.
fn lookups_of(definition: &str, lookups: &HashMap<LookupKey, Vec<String>>) -> Vec<LookupReport> {
    let head = format!("[{}", Value::from(definition));
    let mut out: Vec<LookupReport> = lookups
        .iter()
        .filter(|(k, rows)| !rows.is_empty() && k.as_str().starts_with(&head) && k.as_str()[head.len()..].starts_with(','))
        .map(|(k, rows)| lookup_report(k, rows))
        .collect();
    out.sort_by(|a, b| a.lookup.cmp(&b.lookup));
    out
}

fn stream_reports(querier: &Querier, streams: &StreamsRequest) -> Vec<StreamReport> {
    querier
        .streams()
        .iter()
        .map(|s| StreamReport {
            name: s.name.clone(),
            is_default: s.is_default,
            errors: s
                .errors
                .iter()
                .map(|e| StreamErrorReport {
                    subscription: match e.subscription {
                        Some(i) => reason_text(querier, streams, &BucketReason::Subscription(i)),
                        None => "default subscription".into(),
                    },
                    message: e.message.clone(),
                })
                .collect(),
        })
        .collect()
}

fn zero_hints(querier: &Querier, streams: &StreamsRequest, served: bool) -> Vec<String> {
    let mut hints = Vec::new();
    if !served {
        hints.push("dynamic buckets need an active sync config in bucket storage (a running service)");
    }
    if querier.streams().iter().any(|s| !s.errors.is_empty()) || !querier.errors().is_empty() {
        hints.push("see the stream errors");
    }
    if !streams.include_defaults {
        hints.push("include_defaults is false: auto_subscribe streams are not synced");
    }
    if streams.subscriptions.is_empty() && querier.streams().iter().all(|s| !s.is_default) {
        hints.push("no stream is auto_subscribe and the request subscribes to none");
    }
    hints.push("check that the claims (sub, parameters) and the client parameters match the rows the parameter queries and subqueries read: lookups with no rows are listed");
    hints.into_iter().map(String::from).collect()
}
