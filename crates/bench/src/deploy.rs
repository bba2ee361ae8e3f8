//! The deploy phase: the service restarts with a sync config that adds one definition over
//! `todos` (the seeded table), once as an in-place deploy (only `todos` is re-read, only the
//! new buckets are built) and once forced down the full path (a global setting changes too,
//! so a new stream snapshots every table). Timed from the service start to the first fresh
//! sync that serves the new definition's bucket; a client synced before the deploy then
//! reconnects and its download is counted.

use crate::client::{Event, Transport};
use crate::phases::{first_complete, SNAPSHOT_LIMIT};
use crate::report::{self, thousands, Row, Spec};
use crate::setup::Target;
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// The client synced before a deploy: a user no other phase writes to (restarts re-apply the
/// source changes after the last acknowledged position, which would count as re-downloads).
const HELD_USER: &str = "u7";

/// A global setting with the meaning of the default: it changes nothing but forces a full deploy.
const FORCE_FULL: &str = "config:\n  edition: 1\n";

/// A definition over `todos`, named `name`.
fn definition(name: &str) -> String {
    format!(
        "  {name}:\n    parameters: SELECT request.user_id() AS user_id\n    data:\n      - SELECT id, description FROM todos AS {name} WHERE owner_id = bucket.user_id\n"
    )
}

/// How the new config is deployed.
#[derive(Clone, Copy)]
enum Kind {
    Incremental,
    Full,
}

/// Both deploys, in order (the second builds on the config of the first).
pub async fn deploy(t: &mut Target, rows: i64, stall: Duration) -> Vec<(&'static str, &'static Spec, Result<Row>)> {
    let incremental = run(t, Kind::Incremental, rows, stall).await;
    let full = run(t, Kind::Full, rows, stall).await;
    vec![
        ("deploy (incremental)", &report::DEPLOY_INCREMENTAL, incremental),
        ("deploy (full)", &report::DEPLOY_FULL, full),
    ]
}

async fn run(t: &mut Target, kind: Kind, rows: i64, stall: Duration) -> Result<Row> {
    let (name, how, spec) = match kind {
        Kind::Incremental => ("todo_index", "in place", &report::DEPLOY_INCREMENTAL),
        Kind::Full => ("todo_titles", "full, forced by a global setting", &report::DEPLOY_FULL),
    };
    let metric = format!(
        "deploy adding a definition over {} todos ({how}: service start → new bucket served)",
        thousands(rows as u64)
    );
    if t.service.is_none() {
        return Ok(Row::new(metric, "n/a (external service)", spec, None));
    }
    let rules = t.rules()?;
    if rules.contains("\nstreams:") || !rules.contains("bucket_definitions:") {
        return Ok(Row::new(metric, "n/a (needs --rules legacy)", spec, None));
    }
    let new_rules = match kind {
        Kind::Incremental => format!("{rules}{}", definition(name)),
        Kind::Full => format!("{FORCE_FULL}{rules}{}", definition(name)),
    };
    // A client synced before the deploy, to count what it downloads again afterwards.
    let before = first_complete(t, HELD_USER, stall).await.context("sync before the deploy")?;
    let cpu0 = t.cpu();
    t.own_service()?.stop().context("stopping the service")?;
    t.write_rules(&new_rules)?;
    let started = Instant::now();
    t.own_service()?.start()?;
    let marker = format!("#{name}[");
    loop {
        let sync = first_complete(t, "u1", SNAPSHOT_LIMIT).await.context("waiting for the deploy")?;
        if sync.buckets.iter().any(|b| b.contains(&marker)) {
            break;
        }
        if started.elapsed() > SNAPSHOT_LIMIT {
            bail!("the new definition was not served within {} s", SNAPSHOT_LIMIT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = t.cpu().since(&cpu0);
    let (new_ops, other_ops) = resync(t, &before.positions(), &marker, stall).await?;
    let value = format!(
        "{secs:.2} s; a client synced before re-downloads {} ops in other buckets (+{} in the new one)",
        thousands(other_ops as u64),
        thousands(new_ops as u64)
    );
    Ok(Row::new(metric, value, spec, Some(cpu)))
}

/// Reconnect [`HELD_USER`] from `positions` and read to `checkpoint_complete`: ops received in buckets
/// whose name contains `marker`, and in the others.
async fn resync(t: &Target, positions: &[crate::client::BucketAfter], marker: &str, stall: Duration) -> Result<(usize, usize)> {
    let mut stream = t.endpoint.open(HELD_USER, Transport::NDJSON, positions).await?;
    let (mut new, mut other) = (0, 0);
    loop {
        match stream.next_event(Some(stall)).await.context("re-sync after the deploy")? {
            Event::Data { bucket, ops, .. } if bucket.contains(marker) => new += ops,
            Event::Data { ops, .. } => other += ops,
            Event::Complete => return Ok((new, other)),
            _ => {}
        }
    }
}
