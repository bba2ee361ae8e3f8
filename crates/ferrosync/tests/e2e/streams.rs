//! The real PowerSync Node SDK syncing an edition-3 app (sync streams): auto-subscribed streams
//! (global, subquery-based, keyed by a custom JWT claim) and an explicitly subscribed stream with
//! a subscription parameter, authorised by a subquery. Everything is asserted on the rows in the
//! client's local SQLite database and on what the SDK's SyncStatus reports per stream.

use crate::harness::*;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Source tables. `members` has a composite key and is never synced itself: streams only read it
/// in subqueries.
const SCHEMA: &str = "
CREATE TABLE projects (id text PRIMARY KEY, name text NOT NULL, team_id text NOT NULL);
CREATE TABLE members (project_id text NOT NULL, user_id text NOT NULL, PRIMARY KEY (project_id, user_id));
CREATE TABLE todos (id text PRIMARY KEY, project_id text NOT NULL, description text NOT NULL, done boolean NOT NULL DEFAULT false);
CREATE TABLE announcements (id text PRIMARY KEY, body text NOT NULL);
CREATE TABLE team_docs (id text PRIMARY KEY, team_id text NOT NULL, title text NOT NULL);
CREATE PUBLICATION powersync FOR ALL TABLES;
";

const RULES: &str = "
config:
  edition: 3
streams:
  announcements:
    auto_subscribe: true
    query: SELECT * FROM announcements
  my_projects:
    auto_subscribe: true
    query: SELECT * FROM projects WHERE id IN (SELECT project_id FROM members WHERE user_id = auth.user_id())
  project_todos:
    query: SELECT * FROM todos WHERE project_id = subscription.parameter('project_id') AND project_id IN (SELECT project_id FROM members WHERE user_id = auth.user_id())
  team_docs:
    auto_subscribe: true
    query: SELECT * FROM team_docs WHERE team_id = auth.parameter('team_id')
";

/// u1 (team t1) is a member of p1 and p2 but not p3 (a t1 project); u2 (team t2) of p4 only.
const SEED: &str = "
INSERT INTO announcements VALUES ('a1', 'welcome'), ('a2', 'maintenance tonight');
INSERT INTO projects VALUES ('p1', 'Apollo', 't1'), ('p2', 'Borealis', 't1'), ('p3', 'Cassini', 't1'), ('p4', 'Dawn', 't2');
INSERT INTO members VALUES ('p1', 'u1'), ('p2', 'u1'), ('p4', 'u2');
INSERT INTO todos (id, project_id, description) VALUES
  ('t11', 'p1', 'design'), ('t12', 'p1', 'build'), ('t21', 'p2', 'review'), ('t31', 'p3', 'launch'), ('t41', 'p4', 'orbit');
INSERT INTO team_docs VALUES ('d1', 't1', 'handbook'), ('d2', 't1', 'roadmap'), ('d3', 't2', 'charter');
";

/// The client-side schema the agent opens (id is implicit).
fn client_schema() -> Value {
    json!({
        "projects": {"name": "text", "team_id": "text"},
        "todos": {"project_id": "text", "description": "text", "done": "integer"},
        "announcements": {"body": "text"},
        "team_docs": {"team_id": "text", "title": "text"},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powersync_node_client_syncs_edition_3_streams() -> Result<()> {
    let mut svc = Service::with_app(SCHEMA, RULES).await?;
    let db = svc.source().await?;
    db.batch_execute(SEED).await?;
    svc.start().await?;
    let mut u1 = connect_user(&svc, "u1", "t1")?;
    let mut u2 = connect_user(&svc, "u2", "t2")?;
    auto_subscribed_streams(&mut u1, &mut u2, &svc).await?;
    let p1 = explicit_subscriptions(&mut u1, &mut u2, &svc).await?;
    live_changes(&mut u1, &svc, &db).await?;
    unsubscribe_removes_rows(&mut u1, &svc, p1).await?;

    // u2 saw nothing of team t1 or of u1's projects throughout.
    expect_ids(&mut u2, &svc, "projects", &["p4"]).await?;
    expect_ids(&mut u2, &svc, "team_docs", &["d3"]).await?;
    expect_ids(&mut u2, &svc, "todos", &["t41"]).await?;
    for agent in [&mut u1, &mut u2] {
        let status = agent.call(json!({"cmd": "status"}))?;
        assert_eq!(status["checksum_failures"], json!(0), "{status}");
        agent.call(json!({"cmd": "close"}))?;
    }
    Ok(())
}

/// Before any explicit subscription: the auto-subscribed streams only, so no todos.
async fn auto_subscribed_streams(u1: &mut NodeAgent, u2: &mut NodeAgent, svc: &Service) -> Result<()> {
    expect_ids(u1, svc, "announcements", &["a1", "a2"]).await?;
    expect_ids(u1, svc, "projects", &["p1", "p2"]).await?;
    expect_ids(u1, svc, "team_docs", &["d1", "d2"]).await?;
    expect_ids(u1, svc, "todos", &[]).await?;
    expect_ids(u2, svc, "announcements", &["a1", "a2"]).await?;
    expect_ids(u2, svc, "projects", &["p4"]).await?;
    expect_ids(u2, svc, "team_docs", &["d3"]).await?;
    // The service lists the default streams in `checkpoint.streams`; the SDK reports them.
    let streams = u1.call(json!({"cmd": "sync_status_streams"}))?;
    for name in ["announcements", "my_projects", "team_docs"] {
        let s = stream_status(&streams, name, &Value::Null).with_context(|| format!("{name} in {streams}"))?;
        let flags = (&s["isDefault"], &s["active"], &s["hasSynced"]);
        assert_eq!(flags, (&json!(true), &json!(true), &json!(true)), "{s}");
    }
    let listed = streams["streams"].as_array().context("streams")?;
    assert!(listed.iter().all(|s| s["name"] != json!("project_todos")), "{streams}");
    Ok(())
}

/// u1 subscribes to p1 (a member: its todos arrive) and p3 (not a member: nothing, and no
/// error); u2 to p1 (nothing) and p4 (its own). Returns u1's p1 handle.
async fn explicit_subscriptions(u1: &mut NodeAgent, u2: &mut NodeAgent, svc: &Service) -> Result<Value> {
    let p1 = subscribe(u1, svc, json!({"project_id": "p1"}))?;
    expect_ids(u1, svc, "todos", &["t11", "t12"]).await?;
    let streams = u1.call(json!({"cmd": "sync_status_streams"}))?;
    let s = stream_status(&streams, "project_todos", &json!({"project_id": "p1"})).context("p1 subscription")?;
    // `active`: the service listed project_todos in `checkpoint.streams` (the SDK shows a
    // subscription to a stream the service does not list as inactive).
    let flags = (&s["hasExplicitSubscription"], &s["active"], &s["isDefault"]);
    assert_eq!(flags, (&json!(true), &json!(true), &json!(false)), "{s}");

    // wait_stream_synced (in `subscribe`) means a checkpoint including the subscription was
    // applied, so the rows are checked at once.
    subscribe(u1, svc, json!({"project_id": "p3"}))?;
    expect_ids(u1, svc, "todos", &["t11", "t12"]).await?;
    let streams = u1.call(json!({"cmd": "sync_status_streams"}))?;
    assert_eq!(streams["errors"], json!([]), "not being a member is no error: {streams}");
    subscribe(u2, svc, json!({"project_id": "p1"}))?;
    subscribe(u2, svc, json!({"project_id": "p4"}))?;
    expect_ids(u2, svc, "todos", &["t41"]).await?;
    Ok(p1)
}

/// A new membership brings project p3, and with it the todos of the p3 subscription that was
/// already there; new rows in subscribed buckets arrive.
async fn live_changes(u1: &mut NodeAgent, svc: &Service, db: &tokio_postgres::Client) -> Result<()> {
    db.batch_execute("INSERT INTO members VALUES ('p3', 'u1')").await?;
    expect_ids(u1, svc, "projects", &["p1", "p2", "p3"]).await?;
    expect_ids(u1, svc, "todos", &["t11", "t12", "t31"]).await?;
    db.batch_execute("INSERT INTO todos (id, project_id, description) VALUES ('t13', 'p1', 'test')")
        .await?;
    db.batch_execute("INSERT INTO team_docs VALUES ('d4', 't1', 'minutes')").await?;
    expect_ids(u1, svc, "todos", &["t11", "t12", "t13", "t31"]).await?;
    expect_ids(u1, svc, "team_docs", &["d1", "d2", "d4"]).await
}

/// Unsubscribing p1 removes its todos from the client (see `unsubscribe_now`) and nothing else.
async fn unsubscribe_removes_rows(u1: &mut NodeAgent, svc: &Service, p1: Value) -> Result<()> {
    unsubscribe_now(u1, p1)?;
    expect_ids(u1, svc, "todos", &["t31"]).await?;
    // The SDK keeps a local record of p1 while another subscription to the stream (p3) is
    // active, but no longer as an explicit subscription.
    let streams = u1.call(json!({"cmd": "sync_status_streams"}))?;
    let p1 = stream_status(&streams, "project_todos", &json!({"project_id": "p1"}));
    assert!(p1.is_none_or(|s| s["hasExplicitSubscription"] == json!(false)), "{streams}");
    expect_ids(u1, svc, "projects", &["p1", "p2", "p3"]).await
}

/// A Node SDK client for `user` whose token carries the custom claim `team_id`, first sync done.
fn connect_user(svc: &Service, user: &str, team: &str) -> Result<NodeAgent> {
    let mut agent = NodeAgent::start()?;
    let db_path = svc.dir.path().join(format!("{user}.sqlite"));
    agent.call(json!({"cmd": "open", "db_path": db_path, "schema": client_schema()}))?;
    let token = token_with_claims(user, json!({"team_id": team}));
    agent.call(json!({"cmd": "connect", "endpoint": svc.url(), "token": token, "retry_delay_ms": 200}))?;
    agent
        .call(json!({"cmd": "wait_first_sync", "timeout_ms": 60000}))
        .with_context(|| svc.log())?;
    Ok(agent)
}

/// Subscribe to `project_todos` with `parameters` and wait until a checkpoint including the
/// subscription has been applied; returns the agent's handle for it.
fn subscribe(agent: &mut NodeAgent, svc: &Service, parameters: Value) -> Result<Value> {
    let sub = agent.call(json!({"cmd": "subscribe", "stream": "project_todos", "parameters": parameters}))?;
    let handle = sub["handle"].clone();
    agent
        .call(json!({"cmd": "wait_stream_synced", "handle": handle, "timeout_ms": 60000}))
        .with_context(|| svc.log())?;
    Ok(handle)
}

/// The SDK keeps requesting an unsubscribed stream until its TTL (one day by default) runs out,
/// so `unsubscribe()` alone leaves the rows in place; `unsubscribeAll()` drops the stored
/// subscription, and the SDK reconnects at once without it.
fn unsubscribe_now(agent: &mut NodeAgent, handle: Value) -> Result<()> {
    agent.call(json!({"cmd": "unsubscribe", "handle": handle, "unsubscribe_all": true}))?;
    Ok(())
}

/// The entry SyncStatus reports for stream `name` subscribed with `parameters` (null for a
/// default subscription).
fn stream_status<'a>(streams: &'a Value, name: &str, parameters: &Value) -> Option<&'a Value> {
    streams["streams"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == json!(name) && &s["parameters"] == parameters)
}

/// The ids in the client's local `table`.
fn local_ids(agent: &mut NodeAgent, table: &str) -> Result<BTreeSet<String>> {
    let rows = agent.call(json!({"cmd": "query", "sql": format!("SELECT id FROM {table}")}))?;
    Ok(rows
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect())
}

/// Wait until the client's local `table` holds exactly the rows `ids`.
async fn expect_ids(agent: &mut NodeAgent, svc: &Service, table: &str, ids: &[&str]) -> Result<()> {
    let expected: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + T;
    loop {
        let got = local_ids(agent, table)?;
        if got == expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            let streams = agent.call(json!({"cmd": "sync_status_streams"}))?;
            let status = agent.call(json!({"cmd": "status"}))?;
            bail!(
                "{table}: client has {got:?}, expected {expected:?}\n streams: {streams}\n status: {status}\n service log: {}",
                svc.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
