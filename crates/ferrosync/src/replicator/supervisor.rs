//! The replicator's supervisor: deploy the config file's sync config once (if it has one),
//! then keep one task per stream that needs work from this process: a runner per PROCESSING
//! or ACTIVE stream (so the served stream keeps streaming while a new one snapshots), a
//! clean-up per STOP stream. A stream's task ends when the stream leaves that state. Only a process start
//! deploys: a process still running an older config after the switch never redeploys it.

use super::cleanup::clean_up;
use super::runner::keep_replicated;
use super::ReplicatorConfig;
use anyhow::Result;
use ferrosync_pgconn::Backoff;
use ferrosync_storage::{incremental, lifecycle, streams, StreamRecord, StreamState};
use std::collections::HashMap;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// How often the streams are listed: a deploy, a switch or a stop is acted on within this.
const POLL: Duration = Duration::from_millis(500);
/// A listing unanswered this long means a silent network: reconnect.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a stream needs from this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Replicate,
    CleanUp,
}

fn work_for(state: StreamState) -> Option<Work> {
    match state {
        StreamState::Processing | StreamState::Active => Some(Work::Replicate),
        StreamState::Stop => Some(Work::CleanUp),
        StreamState::Errored | StreamState::Terminated => None,
    }
}

/// A stream's task; dropping it ends the task (its lease connection closes with it).
struct Task {
    work: Work,
    handle: JoinHandle<()>,
}

impl Drop for Task {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Run until the process ends.
pub async fn run(config: ReplicatorConfig) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut client = loop {
        match deploy(&config).await {
            Ok(client) => break Some(client),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "could not deploy the sync config");
                tokio::time::sleep(delay).await;
            }
        }
    };
    backoff.reset();
    let mut tasks: HashMap<i64, Task> = HashMap::new();
    loop {
        match list(&config, &mut client).await {
            Ok(streams) => {
                backoff.reset();
                reconcile(&config, &mut tasks, &streams);
                tokio::time::sleep(POLL).await;
            }
            Err(e) => {
                // Running tasks ride out a storage outage on their own connections.
                client = None;
                let delay = backoff.next_delay();
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "could not list replication streams");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Deploy the file's sync config, if it has one (else the admin API deploys); returns the
/// connection, kept for listing streams.
async fn deploy(config: &ReplicatorConfig) -> Result<Client> {
    let mut client = ferrosync_storage::connect_for_writes(&config.storage).await?;
    if let Some(content) = &config.rules_content {
        // A change of definitions only is built in place on the served stream; anything else
        // is a new stream beside it.
        let stream = match incremental::deploy_in_place(&client, content, &config.rules_options).await? {
            Some(stream) => stream,
            None => streams::stream_for_content(&mut client, content, &config.source.slot_name_prefix).await?,
        };
        tracing::info!(stream = stream.id, state = stream.state.as_str(), slot = %stream.slot_name, "the config file's sync config is this replication stream");
    }
    Ok(client)
}

async fn list(config: &ReplicatorConfig, client: &mut Option<Client>) -> Result<Vec<StreamRecord>> {
    if client.is_none() {
        *client = Some(ferrosync_storage::connect(&config.storage).await?);
    }
    let Some(c) = client.as_ref() else { return Ok(Vec::new()) };
    match tokio::time::timeout(LIST_TIMEOUT, lifecycle::live_streams(c)).await {
        Ok(streams) => Ok(streams?),
        Err(_) => anyhow::bail!("bucket storage did not answer within {} s", LIST_TIMEOUT.as_secs()),
    }
}

/// Start the tasks streams need and end those no longer needed.
fn reconcile(config: &ReplicatorConfig, tasks: &mut HashMap<i64, Task>, streams: &[StreamRecord]) {
    let wanted: HashMap<i64, Work> = streams.iter().filter_map(|s| Some((s.id, work_for(s.state)?))).collect();
    tasks.retain(|id, task| {
        let keep = wanted.get(id) == Some(&task.work);
        if !keep && task.work == Work::Replicate {
            tracing::info!(stream = id, "replication stream no longer replicates: its job ends here");
        }
        keep
    });
    for (&id, &work) in &wanted {
        if tasks.get(&id).is_some_and(|t| !t.handle.is_finished()) {
            continue;
        }
        let handle = match work {
            Work::Replicate => tokio::spawn(keep_replicated(config.clone(), id)),
            Work::CleanUp => tokio::spawn(clean_up(config.clone(), id)),
        };
        tasks.insert(id, Task { work, handle });
    }
    let states: Vec<(i64, &'static str)> = streams
        .iter()
        .filter(|s| wanted.contains_key(&s.id))
        .map(|s| (s.id, s.state.as_str()))
        .collect();
    config.status.set_streams(&states);
    for (state, count) in lifecycle::count_states(streams) {
        ferrosync_metrics::sync_config_streams(state.as_str(), count);
    }
}
