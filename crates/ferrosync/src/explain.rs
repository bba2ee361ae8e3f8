//! `ferrosync explain`: which buckets a user would sync, why, and how much data each holds
//! (resolved by [`ferrosync_inspect::explain`], printed here).
//! Without an active sync config in storage only static buckets can be shown.

use crate::serve::{load, rules_options};
use anyhow::{bail, Context, Result};
use ferrosync_api::auth::KeyStore;
use ferrosync_api::stream::StreamsBody;
use ferrosync_inspect::{Explanation, Served as ServedAt};
use ferrosync_pgconn::PgEndpoint;
use ferrosync_rules::{RequestParameters, StreamsRequest, SyncRules};
use ferrosync_storage::{PgStorage, StreamRecord, SyncStorage};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Bucket storage that does not answer within this is reported as unreachable.
const STORAGE_TIMEOUT: Duration = Duration::from_secs(5);

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
    let file_rules = config.sync_config.as_ref().map(|s| s.content.as_str());
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
    let (rules, served) = rules_for(file_rules, served)?;
    let at = served.as_ref().map(|s| ServedAt {
        storage: &s.storage,
        stream_id: s.stream.id,
        checkpoint: s.stream.checkpoint.op_id,
    });
    let request = RequestParameters::new(payload, params);
    let explanation = ferrosync_inspect::explain(&rules, at.as_ref(), &request, &streams).await?;
    print_buckets(&explanation);
    print_lookups(&explanation);
    print_streams(&explanation);
    if !explanation.hints.is_empty() {
        println!("\nhint: this user syncs no buckets. {}", explanation.hints.join("; "));
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
fn rules_for(file_content: Option<&str>, served: Option<Served>) -> Result<(SyncRules, Option<Served>)> {
    let Some(s) = served else {
        let content = file_content.context("no sync_config in the config file, and none deployed and active in bucket storage")?;
        let rules = SyncRules::parse(content, &rules_options()).map_err(|e| anyhow::anyhow!("the sync config is invalid:\n{e}"))?;
        return Ok((rules, None));
    };
    let options = s.stream.rules_options(&rules_options());
    println!(
        "sync config: #{} ({}), checkpoint op {}",
        s.stream.id,
        s.stream.state.as_str(),
        s.stream.checkpoint.op_id
    );
    if file_content.is_some_and(|f| f != s.stream.content) {
        println!("note: the served sync config differs from the config file's; explaining the served one");
    }
    match SyncRules::parse(&s.stream.content, &options) {
        Ok(rules) => Ok((rules, Some(s))),
        Err(e) => bail!("the served sync config does not parse:\n{e}"),
    }
}

fn print_buckets(e: &Explanation) {
    println!("\nbuckets ({}):", e.buckets.len());
    for b in &e.buckets {
        let count = match (b.ops, b.rows) {
            (Some(ops), Some(rows)) => format!("{ops} op(s), {rows} row(s)"),
            _ => "counts unknown".into(),
        };
        println!(
            "  {}  priority {}  from {}  via {}  {count}",
            b.bucket,
            b.priority,
            b.definition,
            b.reasons.join(", ")
        );
        for l in &b.lookups {
            println!("      lookup {}: {}", l.lookup, rows_text(&l.rows));
        }
    }
    match &e.totals {
        Some(t) => println!("total: {} bucket(s), {} op(s), {} row(s)", t.buckets, t.ops, t.rows),
        None => println!("total: {} bucket(s)", e.buckets.len()),
    }
}

fn rows_text(rows: &[Value]) -> String {
    rows.iter().map(Value::to_string).collect::<Vec<_>>().join(" ")
}

fn print_lookups(e: &Explanation) {
    if e.lookups.is_empty() {
        return;
    }
    println!("\nparameter lookups ({}):", e.lookups.len());
    for l in &e.lookups {
        match l.rows.is_empty() {
            true => println!("  {}: no rows", l.lookup),
            false => println!("  {}: {}", l.lookup, rows_text(&l.rows)),
        }
    }
}

fn print_streams(e: &Explanation) {
    println!("\nstreams:");
    for s in &e.streams {
        println!("  {}{}", s.name, if s.is_default { " (default)" } else { "" });
        for err in &s.errors {
            println!("    error ({}): {}", err.subscription, err.message);
        }
    }
    for err in &e.errors {
        println!("  error: {err}");
    }
}
