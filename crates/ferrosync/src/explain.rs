//! `ferrosync explain`: which buckets a user would sync, why, and how much data each holds.
//!
//! It resolves buckets the way a sync request does (the querier of the rules crate, parameter
//! lookups read from bucket storage at the served checkpoint, in rounds for nested
//! subqueries), then reads each bucket's op count and replays its ops to count live rows.
//! Without an active sync config in storage only static buckets can be shown.

use crate::serve::{load, rules_options};
use anyhow::{bail, Context, Result};
use ferrosync_api::auth::KeyStore;
use ferrosync_api::stream::StreamsBody;
use ferrosync_pgconn::PgEndpoint;
use ferrosync_rules::{BucketDescription, BucketReason, LookupKey, Querier, RequestParameters, StreamsRequest, SyncRules};
use ferrosync_storage::{OpType, PgStorage, StreamRecord, SyncStorage};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

/// Bucket storage that does not answer within this is reported as unreachable.
const STORAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Lookup rounds before giving up (each nesting level of subqueries takes one).
const MAX_ROUNDS: usize = 16;
/// Ops read per `bucket_data` call while counting rows.
const READ_BATCH: usize = 10_000;

/// The command line of `explain`.
pub struct ExplainArgs {
    pub token: Option<String>,
    pub claims: Option<String>,
    pub params: Option<String>,
    pub streams: Option<String>,
}

/// Storage at the served checkpoint.
struct Served {
    storage: PgStorage,
    stream: StreamRecord,
}

pub async fn explain(path: &Path, args: ExplainArgs) -> Result<()> {
    let config = load(path)?.config;
    let file_rules = config.sync_config.as_ref().context("no sync_config in the config file")?;
    let payload = claims(&config.client_auth, &args).await?;
    let params = parse_json_object(args.params.as_deref(), "--params")?;
    let streams = match &args.streams {
        None => StreamsRequest::default(),
        Some(text) => {
            let body: StreamsBody = serde_json::from_str(text).context("--streams is not a valid streams object")?;
            body.into_request().map_err(|e| anyhow::anyhow!("--streams: {e}"))?
        }
    };
    if let Some(p) = &params {
        println!("client parameters: {p}");
    }
    let served = served(&config.storage).await;
    let (rules, served) = rules_for(&file_rules.content, served)?;
    let querier = rules.querier(&RequestParameters::new(payload, params), &streams);
    let lookups = match &served {
        Some(s) => resolve_lookups(&querier, s).await?,
        None => HashMap::new(),
    };
    let buckets = querier.resolve(&lookups);
    print_buckets(&rules, &querier, &streams, &buckets, &lookups, served.as_ref()).await?;
    print_lookups(&lookups);
    print_streams(&querier, &streams);
    if buckets.is_empty() {
        print_zero_hint(&querier, &streams, served.is_some());
    }
    Ok(())
}

/// The JWT payload: verified with the config's `client_auth` keys (`--token`), or taken as
/// given (`--claims`).
async fn claims(auth: &ferrosync_config::ClientAuthConfig, args: &ExplainArgs) -> Result<Value> {
    match (&args.token, &args.claims) {
        (Some(token), None) => {
            let keys = KeyStore::from_config(auth).map_err(|e| anyhow::anyhow!("client_auth: {e}"))?;
            // Accept a pasted `Authorization` value as well as a bare token.
            let header = match token.split_once(' ') {
                Some(_) => token.clone(),
                None => format!("Token {token}"),
            };
            let ctx = keys
                .verify_authorization(Some(&header))
                .await
                .map_err(|e| anyhow::anyhow!("the token is not accepted: {e}"))?;
            println!("token: verified (sub {:?}, expires at unix {})", ctx.user_id, ctx.expires_at);
            println!("claims: {}", ctx.payload);
            Ok(ctx.payload)
        }
        (None, Some(json)) => {
            let payload = parse_json_object(Some(json), "--claims")?.unwrap_or_default();
            println!("claims (from --claims, NOT verified): {payload}");
            Ok(payload)
        }
        _ => bail!("give exactly one of --token and --claims"),
    }
}

fn parse_json_object(text: Option<&str>, what: &str) -> Result<Option<Value>> {
    let Some(text) = text else { return Ok(None) };
    let value: Value = serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON"))?;
    if !value.is_object() {
        bail!("{what} must be a JSON object");
    }
    Ok(Some(value))
}

/// Bucket storage and its served stream, or `None` (with the reason printed).
async fn served(storage: &ferrosync_config::PostgresConnectionConfig) -> Option<Served> {
    let connect = async {
        let endpoint = PgEndpoint::from_config(storage)?;
        let storage = PgStorage::connect(&endpoint, 1).await?;
        let stream = storage.active_stream().await?;
        anyhow::Ok((storage, stream))
    };
    match tokio::time::timeout(STORAGE_TIMEOUT, connect).await {
        Ok(Ok((storage, Some(stream)))) => Some(Served { storage, stream }),
        Ok(Ok((_, None))) => {
            println!("note: bucket storage has no active sync config yet: static buckets only; dynamic buckets and counts need a running service");
            None
        }
        Ok(Err(e)) => {
            println!("note: bucket storage is unreachable ({e:#}): static buckets only");
            None
        }
        Err(_) => {
            println!(
                "note: bucket storage did not answer within {} s: static buckets only",
                STORAGE_TIMEOUT.as_secs()
            );
            None
        }
    }
}

/// The rules the service serves: the active stream's (its id, or a definition's own id after
/// an in-place deploy, prefixes bucket ids), else the config file's.
fn rules_for(file_content: &str, served: Option<Served>) -> Result<(SyncRules, Option<Served>)> {
    let Some(s) = served else {
        let rules = SyncRules::parse(file_content, &rules_options()).map_err(|e| anyhow::anyhow!("the sync config is invalid:\n{e}"))?;
        return Ok((rules, None));
    };
    let options = s.stream.rules_options(&rules_options());
    println!(
        "sync config: #{} ({}), checkpoint op {}",
        s.stream.id,
        s.stream.state.as_str(),
        s.stream.checkpoint.op_id
    );
    if s.stream.content != file_content {
        println!("note: the served sync config differs from the config file's; explaining the served one");
    }
    match SyncRules::parse(&s.stream.content, &options) {
        Ok(rules) => Ok((rules, Some(s))),
        Err(e) => bail!("the served sync config does not parse:\n{e}"),
    }
}

/// Fetches lookups in rounds until the querier needs no more.
async fn resolve_lookups(querier: &Querier, s: &Served) -> Result<HashMap<LookupKey, Vec<String>>> {
    let mut known = HashMap::new();
    for _ in 0..MAX_ROUNDS {
        let missing = querier.missing_lookups(&known);
        if missing.is_empty() {
            return Ok(known);
        }
        let keys: Vec<String> = missing.iter().map(|l| l.as_str().to_string()).collect();
        let mut found = s.storage.parameter_sets(s.stream.id, s.stream.checkpoint.op_id, &keys).await?;
        for lookup in missing {
            let rows = found.remove(lookup.as_str()).unwrap_or_default();
            known.insert(lookup, rows);
        }
    }
    bail!("parameter lookups still missing after {MAX_ROUNDS} rounds")
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

async fn counts(s: &Served, buckets: &[BucketDescription]) -> Result<HashMap<String, Counts>> {
    let ids: Vec<String> = buckets.iter().map(|b| b.bucket.clone()).collect();
    let checkpoint = s.stream.checkpoint.op_id;
    let sums = s.storage.checksums(s.stream.id, 0, checkpoint, &ids).await?;
    let mut out = HashMap::new();
    for id in ids {
        let ops = sums.get(&id).map_or(0, |c| c.count);
        let rows = if ops == 0 { 0 } else { live_rows(s, &id).await? };
        out.insert(id, Counts { ops, rows });
    }
    Ok(out)
}

/// Replays a bucket's ops the way a client applies them: rows by (table, id), last op wins.
async fn live_rows(s: &Served, bucket: &str) -> Result<usize> {
    let mut live: HashSet<(String, String)> = HashSet::new();
    let mut after = 0;
    loop {
        let batch = s
            .storage
            .bucket_data(s.stream.id, s.stream.checkpoint.op_id, &[(bucket.to_string(), after)], READ_BATCH)
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

async fn print_buckets(
    rules: &SyncRules,
    querier: &Querier,
    streams: &StreamsRequest,
    buckets: &[BucketDescription],
    lookups: &HashMap<LookupKey, Vec<String>>,
    served: Option<&Served>,
) -> Result<()> {
    let counts = match served {
        Some(s) => Some(counts(s, buckets).await?),
        None => None,
    };
    println!("\nbuckets ({}):", buckets.len());
    let (mut total_ops, mut total_rows) = (0, 0);
    for b in buckets {
        let definition = rules.definition_of(&b.bucket).unwrap_or("?");
        let reasons: Vec<String> = b.reasons.iter().map(|r| reason_text(querier, streams, r)).collect();
        let count = match counts.as_ref().and_then(|c| c.get(&b.bucket)) {
            Some(c) => {
                total_ops += c.ops;
                total_rows += c.rows;
                format!("{} op(s), {} row(s)", c.ops, c.rows)
            }
            None => "counts unknown".into(),
        };
        println!(
            "  {}  priority {}  from {definition}  via {}  {count}",
            b.bucket,
            b.priority,
            reasons.join(", ")
        );
        for (lookup, rows) in lookups_of(definition, lookups) {
            println!("      lookup {}: {}", lookup.as_str(), rows.join(" "));
        }
    }
    match counts {
        Some(_) => println!("total: {} bucket(s), {total_ops} op(s), {total_rows} row(s)", buckets.len()),
        None => println!("total: {} bucket(s)", buckets.len()),
    }
    Ok(())
}

/// Lookups of a legacy bucket definition that found rows (their keys start with its name).
/// Stream lookups are keyed by parameter index, not stream, and are listed separately.
fn lookups_of<'a>(definition: &str, lookups: &'a HashMap<LookupKey, Vec<String>>) -> Vec<(&'a LookupKey, &'a Vec<String>)> {
    let head = format!("[{}", serde_json::Value::from(definition));
    let mut out: Vec<_> = lookups
        .iter()
        .filter(|(k, rows)| !rows.is_empty() && k.as_str().starts_with(&head) && k.as_str()[head.len()..].starts_with(','))
        .collect();
    out.sort();
    out
}

fn print_lookups(lookups: &HashMap<LookupKey, Vec<String>>) {
    if lookups.is_empty() {
        return;
    }
    println!("\nparameter lookups ({}):", lookups.len());
    let mut sorted: Vec<_> = lookups.iter().collect();
    sorted.sort();
    for (lookup, rows) in sorted {
        match rows.is_empty() {
            true => println!("  {}: no rows", lookup.as_str()),
            false => println!("  {}: {}", lookup.as_str(), rows.join(" ")),
        }
    }
}

fn print_streams(querier: &Querier, streams: &StreamsRequest) {
    println!("\nstreams:");
    for s in querier.streams() {
        println!("  {}{}", s.name, if s.is_default { " (default)" } else { "" });
        for e in &s.errors {
            let which = match e.subscription {
                Some(i) => reason_text(querier, streams, &BucketReason::Subscription(i)),
                None => "default subscription".into(),
            };
            println!("    error ({which}): {}", e.message);
        }
    }
    for e in querier.errors() {
        println!("  error: {e}");
    }
}

fn print_zero_hint(querier: &Querier, streams: &StreamsRequest, served: bool) {
    let mut hints = Vec::new();
    if !served {
        hints.push("dynamic buckets need an active sync config in bucket storage (a running service)");
    }
    if querier.streams().iter().any(|s| !s.errors.is_empty()) || !querier.errors().is_empty() {
        hints.push("see the stream errors above");
    }
    if !streams.include_defaults {
        hints.push("include_defaults is false: auto_subscribe streams are not synced");
    }
    if streams.subscriptions.is_empty() && querier.streams().iter().all(|s| !s.is_default) {
        hints.push("no stream is auto_subscribe and --streams subscribes to none");
    }
    hints.push("check that the claims (sub, parameters) and --params match the rows the parameter queries and subqueries read: lookups with no rows are listed above");
    println!("\nhint: this user syncs no buckets. {}", hints.join("; "));
}
