//! Request-time bucket resolution: static buckets plus the parameter lookups
//! needed for dynamic buckets, and [`LookupKey`], their canonical key.

use crate::json::{self, serialize_params, Json};
use crate::streams::StreamQuerier;
use crate::value::SqliteValue;
use std::collections::HashMap;

/// One explicit stream subscription of a sync request.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamSubscription {
    pub stream: String,
    /// `subscription.parameters()`; `None` when the client sent none.
    pub parameters: Option<serde_json::Value>,
    pub override_priority: Option<u8>,
}

/// The `streams` part of a sync request.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamsRequest {
    /// Subscribe to `auto_subscribe` streams.
    pub include_defaults: bool,
    pub subscriptions: Vec<StreamSubscription>,
}

impl Default for StreamsRequest {
    fn default() -> Self {
        StreamsRequest {
            include_defaults: true,
            subscriptions: Vec::new(),
        }
    }
}

/// Why a bucket is synced: the default subscription of a stream (index into
/// [`Querier::streams`]) or an explicit subscription (index into the request's list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BucketReason {
    Default(usize),
    Subscription(usize),
}

/// A subscription that could not be evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamError {
    /// `None`: the default subscription; `Some(i)`: the request's subscription `i`.
    pub subscription: Option<usize>,
    pub message: String,
}

/// A stream (or legacy bucket definition) a connection is subscribed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    pub name: String,
    pub is_default: bool,
    pub errors: Vec<StreamError>,
}

/// Canonical key of a parameter lookup: the JSON text of
/// `[definition, query_id, values...]` with integral REALs as INTEGERs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LookupKey(String);

impl LookupKey {
    pub(crate) fn new<'v>(definition: &str, query_id: &str, values: impl IntoIterator<Item = &'v SqliteValue>) -> Self {
        let mut out = Self::head(definition, query_id);
        for v in values {
            Self::push_value(&mut out, v);
        }
        Self::finish(out)
    }

    /// Start of a key's text: `["<definition>","<query_id>"`; then [`LookupKey::push_value`]
    /// per value and [`LookupKey::finish`] (for callers that evaluate values one by one).
    pub(crate) fn head(definition: &str, query_id: &str) -> String {
        let mut out = String::with_capacity(definition.len() + query_id.len() + 40);
        out.push('[');
        json::write_str(&mut out, definition);
        out.push(',');
        json::write_str(&mut out, query_id);
        out
    }

    /// Appends one value (integral REALs as INTEGERs, so 1.0 and 1 find the same rows).
    pub(crate) fn push_value(out: &mut String, v: &SqliteValue) {
        out.push(',');
        match v {
            SqliteValue::Real(_) => json::write_param_value(out, &v.normalized()),
            _ => json::write_param_value(out, v),
        }
    }

    pub(crate) fn finish(mut out: String) -> LookupKey {
        out.push(']');
        LookupKey(out)
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps a key previously obtained from [`LookupKey::as_str`].
    pub fn from_stored(s: String) -> Self {
        LookupKey(s)
    }
}

/// A bucket a connection should sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketDescription {
    /// Full bucket id (with any `<id>#` prefix).
    pub bucket: String,
    /// 0 (highest) ..= 3.
    pub priority: u8,
    /// Why the connection syncs it.
    pub reasons: Vec<BucketReason>,
}

/// A lookup whose stored rows produce dynamic buckets.
#[derive(Debug)]
pub(crate) struct PendingLookup {
    pub lookup: LookupKey,
    pub prefix: String,
    pub priority: u8,
    pub reason: BucketReason,
    /// The definition's bucket parameter order.
    pub order: Vec<String>,
    /// Query columns: `None` = read from the stored parameter row.
    pub columns: Vec<(String, Option<SqliteValue>)>,
}

/// Buckets for one request, built by `SyncRules::querier`.
#[derive(Debug, Default)]
pub struct Querier {
    pub(crate) static_buckets: Vec<BucketDescription>,
    pub(crate) lookups: Vec<LookupKey>,
    pub(crate) pending: Vec<PendingLookup>,
    pub(crate) errors: Vec<String>,
    pub(crate) streams: Vec<StreamInfo>,
    pub(crate) stream_querier: Option<StreamQuerier>,
}

/// Bucket id from a parameter set, in the definition's parameter order.
pub(crate) fn bucket_id(prefix: &str, order: &[String], set: &[(String, SqliteValue)]) -> String {
    let values: Vec<SqliteValue> = order
        .iter()
        .map(|p| {
            set.iter()
                .find(|(n, _)| n == p)
                .map(|(_, v)| v.clone())
                .unwrap_or(SqliteValue::Null)
        })
        .collect();
    format!("{prefix}{}", serialize_params(&values))
}

/// Accumulates bucket descriptions, deduplicated by id (minimum priority).
#[derive(Default)]
pub(crate) struct BucketSet {
    list: Vec<BucketDescription>,
    index: HashMap<String, usize>,
}

impl BucketSet {
    pub(crate) fn add(&mut self, b: BucketDescription) {
        match self.index.get(&b.bucket) {
            Some(&i) => {
                let existing = &mut self.list[i];
                existing.priority = existing.priority.min(b.priority);
                for r in b.reasons {
                    if !existing.reasons.contains(&r) {
                        existing.reasons.push(r);
                    }
                }
            }
            None => {
                self.index.insert(b.bucket.clone(), self.list.len());
                self.list.push(b);
            }
        }
    }

    pub(crate) fn into_vec(self) -> Vec<BucketDescription> {
        self.list
    }
}

impl Querier {
    /// Buckets known from the request alone.
    pub fn static_buckets(&self) -> &[BucketDescription] {
        &self.static_buckets
    }

    /// Subscribed streams (legacy bucket definitions count as default streams), in config
    /// order, with per-subscription errors: the `streams` of the first `checkpoint` line.
    pub fn streams(&self) -> &[StreamInfo] {
        &self.streams
    }

    /// Parameter lookups still needed to resolve the buckets, given the stored results of the
    /// lookups already fetched (`known`, with an empty list for lookups that found nothing).
    /// Subqueries nest, so resolving takes rounds: fetch these, add them to `known`, ask
    /// again, until nothing is missing; then call [`Querier::resolve`].
    pub fn missing_lookups(&self, known: &HashMap<LookupKey, Vec<String>>) -> Vec<LookupKey> {
        let mut missing: Vec<LookupKey> = self.lookups.iter().filter(|l| !known.contains_key(*l)).cloned().collect();
        if let Some(q) = &self.stream_querier {
            q.missing(known, &mut missing);
        }
        missing
    }

    /// Request-time evaluation problems (not fatal).
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// All buckets (static first, then dynamic) given the stored
    /// `bucket_parameters` JSON of the live rows for each lookup (see
    /// [`Querier::missing_lookups`]).
    pub fn resolve(&self, lookup_results: &HashMap<LookupKey, Vec<String>>) -> Vec<BucketDescription> {
        let mut set = BucketSet::default();
        for b in &self.static_buckets {
            set.add(b.clone());
        }
        for p in &self.pending {
            let Some(rows) = lookup_results.get(&p.lookup) else {
                continue;
            };
            for text in rows {
                let Ok(Json::Array(objects)) = json::parse(text) else {
                    continue;
                };
                for obj in &objects {
                    let params: Vec<(String, SqliteValue)> = p
                        .columns
                        .iter()
                        .map(|(name, v)| {
                            let value = match v {
                                Some(v) => v.clone(),
                                None => obj.member(name).map(|j| j.to_sqlite(false)).unwrap_or(SqliteValue::Null),
                            };
                            (name.clone(), value)
                        })
                        .collect();
                    set.add(BucketDescription {
                        bucket: bucket_id(&p.prefix, &p.order, &params),
                        priority: p.priority,
                        reasons: vec![p.reason],
                    });
                }
            }
        }
        if let Some(q) = &self.stream_querier {
            q.resolve(lookup_results, &mut set);
        }
        set.into_vec()
    }
}
