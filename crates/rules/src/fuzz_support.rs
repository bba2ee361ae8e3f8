//! Request-time calls shared by the fuzz targets (`fuzz/`) and the stable smoke test
//! (`fuzz_smoke`), kept here so the querier API can change without touching either.

use crate::{LookupKey, RequestParameters, StreamSubscription, StreamsRequest, SyncRules};
use serde_json::Value;
use std::collections::HashMap;

/// Build the querier, answer its lookups from `stored`, resolve. Returns the bucket count.
pub fn run_querier(rules: &SyncRules, jwt: Value, client: Option<Value>, stored: &HashMap<LookupKey, Vec<String>>) -> usize {
    // Every stream subscribed explicitly too, with the client parameters as subscription
    // parameters, so `subscription.*` is exercised.
    let streams = StreamsRequest {
        include_defaults: true,
        subscriptions: rules
            .bucket_sources()
            .iter()
            .map(|s| StreamSubscription {
                stream: s.name.clone(),
                parameters: client.clone(),
                override_priority: None,
            })
            .collect(),
    };
    let querier = rules.querier(&RequestParameters::new(jwt, client), &streams);
    let _ = (querier.errors(), querier.static_buckets(), querier.streams());
    let mut answers: HashMap<LookupKey, Vec<String>> = HashMap::new();
    for _ in 0..16 {
        let missing = querier.missing_lookups(&answers);
        if missing.is_empty() {
            break;
        }
        for lookup in missing {
            let found = stored.get(&lookup).cloned().unwrap_or_default();
            answers.insert(lookup, found);
        }
    }
    querier.resolve(&answers).len()
}
