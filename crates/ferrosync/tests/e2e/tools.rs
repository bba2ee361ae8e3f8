//! The tools for people writing sync configs: `ferrosync validate` (every problem with its line
//! and column; checks against a live source) and `ferrosync explain` (a user's buckets, why,
//! and their op and row counts) against a running service with data, for a legacy config and
//! an edition-3 streams config.

use crate::harness::*;
use anyhow::{Context, Result};
use serde_json::json;
use std::process::Command;

/// Runs the binary; returns (exit success, stdout + stderr).
fn run(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrosync"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn config_path(svc: &Service) -> String {
    svc.dir.path().join("powersync.yaml").display().to_string()
}

/// The output line that mentions `needle`.
fn line_with<'a>(out: &'a str, needle: &str) -> Result<&'a str> {
    out.lines()
        .find(|l| l.contains(needle))
        .with_context(|| format!("no line with {needle:?} in:\n{out}"))
}

#[test]
fn validate_lists_every_error_with_its_position() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rules = "bucket_definitions:
  global:
    data:
      - SELECT * FROM lists WHER archived = false
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT * FROM todos WHERE owner_id = bucket.user_id
      - |
        SELECT id,
          FROM todos
    priority: 9
";
    std::fs::write(dir.path().join("sync-rules.yaml"), rules)?;
    // Nothing listens there: the source checks are skipped anyway while the rules fail.
    let port = ferrosync_testkit::free_port()?;
    let config = ferrosync_testkit::ServiceConfig {
        source_uri: format!("postgresql://postgres:postgres@127.0.0.1:{port}/todo"),
        storage_uri: format!("postgresql://postgres:postgres@127.0.0.1:{port}/storage"),
        port: 8080,
        bind_address: None,
        rules_path: "sync-rules.yaml",
        audience: "test-aud",
        kid: "k1",
        secret: SECRET,
        max_connections: None,
    }
    .to_yaml_with(&Default::default());
    let path = dir.path().join("powersync.yaml");
    std::fs::write(&path, config)?;
    let (ok, out) = run(&["validate", "--config", &path.display().to_string()])?;
    assert!(!ok, "{out}");
    let errors: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("error: ") && l.contains("sync-rules.yaml"))
        .collect();
    assert_eq!(errors.len(), 3, "{out}");
    // File order, each with the position of the problem in sync-rules.yaml.
    assert!(
        errors[0].contains("line 4, column 34: global: Expected: end of statement, found: archived"),
        "{out}"
    );
    assert!(errors[1].contains("line 11, column 16: by_user: Expected an expression"), "{out}");
    assert!(
        errors[1].contains("(query: SELECT id, FROM todos)"),
        "multi-line SQL on one line: {out}"
    );
    assert!(errors[2].contains("line 12, column 5: by_user: Invalid priority"), "{out}");
    assert!(out.contains("3 error(s), 0 warning(s)"), "{out}");

    // A YAML syntax error has a position too.
    std::fs::write(
        dir.path().join("sync-rules.yaml"),
        "bucket_definitions:\n  a:\n    data: [\n  b: 1\n",
    )?;
    let (ok, out) = run(&["validate", "--config", &path.display().to_string()])?;
    assert!(!ok && line_with(&out, "Invalid YAML")?.contains("line "), "{out}");
    Ok(())
}

const VALIDATE_SCHEMA: &str = "
CREATE TABLE items (id text PRIMARY KEY, owner_id text NOT NULL, name text);
CREATE TABLE files (id text PRIMARY KEY, owner_id text NOT NULL, data bytea, name text);
CREATE TABLE unpublished (id text PRIMARY KEY);
CREATE PUBLICATION powersync FOR TABLE items, files;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_checks_tables_columns_and_types_against_the_source() -> Result<()> {
    let rules = "bucket_definitions:
  mine:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, name, colour FROM items WHERE owner_id = bucket.user_id
      - SELECT * FROM files WHERE owner_id = bucket.user_id
  everyone:
    data:
      - SELECT * FROM nope
      - SELECT * FROM unpublished
";
    let svc = Service::with_app(VALIDATE_SCHEMA, rules).await?;
    let config = config_path(&svc);
    // Missing tables and columns are warnings, as in the reference: exit code zero.
    let (ok, out) = run(&["validate", "--config", &config])?;
    assert!(ok, "{out}");
    assert!(line_with(&out, "Table public.nope not found")?.starts_with("warning: "), "{out}");
    assert!(
        line_with(&out, "Column not found: colour (table public.items)")?.starts_with("warning: "),
        "{out}"
    );
    assert!(line_with(&out, "public.files.data (bytea)")?.starts_with("warning: "), "{out}");
    assert!(
        line_with(&out, "public.unpublished is not in the 'powersync' publication")?.starts_with("warning: "),
        "{out}"
    );
    assert!(!out.contains("column name"), "existing columns are not reported: {out}");
    assert!(out.contains("0 error(s), 4 warning(s)"), "{out}");

    // Warnings only: exit code zero. A bytea column that is not output is no problem.
    let fine = "bucket_definitions:
  mine:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, name FROM files WHERE owner_id = bucket.user_id
  everyone:
    data:
      - SELECT id, data FROM files
";
    std::fs::write(svc.dir.path().join("sync-rules.yaml"), fine)?;
    let (ok, out) = run(&["validate", "--config", &config])?;
    assert!(ok, "{out}");
    assert!(line_with(&out, "public.files.data (bytea)")?.starts_with("warning: "), "{out}");
    assert!(out.contains("config OK: 0 error(s), 1 warning(s)"), "{out}");

    // An unreachable source is reported and skipped, not an error.
    let text = std::fs::read_to_string(&config)?;
    let nobody = format!("postgresql://postgres:postgres@127.0.0.1:{}/todo", ferrosync_testkit::free_port()?);
    let unreachable = text.replacen(&svc.cluster.uri("todo"), &nobody, 1);
    let other = svc.dir.path().join("unreachable.yaml");
    std::fs::write(&other, unreachable)?;
    let (ok, out) = run(&["validate", "--config", &other.display().to_string()])?;
    assert!(ok, "{out}");
    assert!(
        line_with(&out, "table and column checks skipped")?.starts_with("warning: source: "),
        "{out}"
    );
    Ok(())
}

const LEGACY_SCHEMA: &str = "
CREATE TABLE lists (id text PRIMARY KEY, name text NOT NULL, owner_id text NOT NULL);
CREATE TABLE todos (id text PRIMARY KEY, list_id text NOT NULL, description text NOT NULL);
CREATE PUBLICATION powersync FOR ALL TABLES;
INSERT INTO lists VALUES ('l1', 'home', 'u1'), ('l2', 'work', 'u2'), ('l3', 'trips', 'u1');
INSERT INTO todos VALUES ('t1', 'l1', 'a'), ('t2', 'l1', 'b'), ('t3', 'l2', 'c'), ('t4', 'l3', 'd'), ('t5', 'l3', 'e'), ('t6', 'l3', 'f');
";

const LEGACY_RULES: &str = "bucket_definitions:
  global:
    data:
      - SELECT * FROM lists
  user_lists:
    parameters: SELECT id AS list_id FROM lists WHERE owner_id = request.user_id()
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
";

/// Syncs `user` until `done`, so that storage holds what explain reads.
async fn wait_synced(svc: &Service, token: &str, body: serde_json::Value, done: impl Fn(&ClientState) -> bool) -> Result<()> {
    let mut state = ClientState::default();
    let mut stream = RawStream::open(&svc.url(), token, body).await?;
    stream.sync_until(&mut state, T, done).await.with_context(|| svc.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_legacy_buckets_lookups_and_counts() -> Result<()> {
    let mut svc = Service::with_app(LEGACY_SCHEMA, LEGACY_RULES).await?;
    svc.start().await?;
    let db = svc.source().await?;
    // The snapshot first (or it may copy the updated row and make no extra op), then an update:
    // one more op than rows in l1's bucket.
    wait_synced(&svc, &token("u1"), json!({"buckets": []}), |s| s.table("todos").len() == 5).await?;
    db.batch_execute("UPDATE todos SET description = 'b2' WHERE id = 't2'").await?;
    wait_synced(&svc, &token("u1"), json!({"buckets": []}), |s| {
        s.table("todos").len() == 5 && s.table("todos").values().any(|v| v.to_string().contains("b2"))
    })
    .await?;
    let config = config_path(&svc);
    let (ok, out) = run(&["explain", "--config", &config, "--token", &token("u1")])?;
    assert!(ok, "{out}");
    assert!(out.contains("token: verified (sub \"u1\""), "{out}");
    assert!(
        line_with(&out, "global[]")?.contains("from global  via default (global)  3 op(s), 3 row(s)"),
        "{out}"
    );
    let l1 = line_with(&out, "user_lists[\"l1\"]")?;
    assert!(l1.contains("from user_lists") && l1.contains("3 op(s), 2 row(s)"), "{out}");
    assert!(line_with(&out, "user_lists[\"l3\"]")?.contains("3 op(s), 3 row(s)"), "{out}");
    assert!(!out.contains("user_lists[\"l2\"]"), "{out}");
    assert!(
        line_with(&out, "lookup [\"user_lists\",\"1\",\"u1\"]")?.contains("\"list_id\":\"l1\""),
        "{out}"
    );
    assert!(out.contains("total: 3 bucket(s), 9 op(s), 8 row(s)"), "{out}");

    // --claims: not verified, and said so.
    let (ok, out) = run(&["explain", "--config", &config, "--claims", r#"{"sub":"u2"}"#])?;
    assert!(ok, "{out}");
    assert!(out.contains("NOT verified"), "{out}");
    assert!(line_with(&out, "user_lists[\"l2\"]")?.contains("1 op(s), 1 row(s)"), "{out}");

    // A token signed with another key is refused.
    let forged = token_with(
        json!({"sub": "u1", "aud": "test-aud", "iat": now(), "exp": now() + 60}),
        "k1",
        "wrong",
    );
    let (ok, out) = run(&["explain", "--config", &config, "--token", &forged])?;
    assert!(!ok && out.contains("the token is not accepted"), "{out}");
    Ok(())
}

const STREAMS_SCHEMA: &str = "
CREATE TABLE projects (id text PRIMARY KEY, name text NOT NULL);
CREATE TABLE members (project_id text NOT NULL, user_id text NOT NULL, PRIMARY KEY (project_id, user_id));
CREATE TABLE todos (id text PRIMARY KEY, project_id text NOT NULL, description text NOT NULL);
CREATE TABLE announcements (id text PRIMARY KEY, body text NOT NULL);
CREATE PUBLICATION powersync FOR ALL TABLES;
INSERT INTO announcements VALUES ('a1', 'welcome'), ('a2', 'maintenance');
INSERT INTO projects VALUES ('p1', 'Apollo'), ('p2', 'Borealis'), ('p3', 'Cassini');
INSERT INTO members VALUES ('p1', 'u1'), ('p2', 'u1'), ('p3', 'u2');
INSERT INTO todos VALUES ('t11', 'p1', 'design'), ('t12', 'p1', 'build'), ('t21', 'p2', 'review'), ('t31', 'p3', 'launch');
";

const STREAMS_RULES: &str = "config:
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
";

/// The (ops, rows) of the `total:` line.
fn totals(out: &str) -> Result<(String, String)> {
    let line = line_with(out, "total: ")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    Ok((words[3].to_string(), words[5].to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_edition_3_streams() -> Result<()> {
    let mut svc = Service::with_app(STREAMS_SCHEMA, STREAMS_RULES).await?;
    svc.start().await?;
    let streams = json!({"include_defaults": true, "subscriptions": [{"stream": "project_todos", "parameters": {"project_id": "p1"}}]});
    let body = json!({"buckets": [], "streams": streams});
    wait_synced(&svc, &token("u1"), body, |s| {
        s.table("todos").len() == 2 && s.table("projects").len() == 2 && s.table("announcements").len() == 2
    })
    .await?;
    let config = config_path(&svc);
    let (ok, out) = run(&[
        "explain",
        "--config",
        &config,
        "--token",
        &token("u1"),
        "--streams",
        &streams.to_string(),
    ])?;
    assert!(ok, "{out}");
    assert!(
        line_with(&out, "announcements|0[]")?.contains("via default (announcements)  2 op(s), 2 row(s)"),
        "{out}"
    );
    let project_buckets: Vec<&str> = out.lines().filter(|l| l.contains("from my_projects")).collect();
    assert!(!project_buckets.is_empty(), "{out}");
    let todos: Vec<&str> = out.lines().filter(|l| l.contains("from project_todos")).collect();
    assert!(
        todos
            .iter()
            .all(|l| l.contains("via subscription #0 (project_todos {\"project_id\":\"p1\"})")),
        "{out}"
    );
    assert!(todos.iter().any(|l| l.contains("2 op(s), 2 row(s)")), "{out}");
    // 2 announcements + projects p1, p2 + todos t11, t12.
    assert_eq!(totals(&out)?.1, "6", "{out}");
    assert!(out.contains("parameter lookups"), "{out}");

    // Someone in no project, not subscribing: only announcements. Without defaults: nothing,
    // and a hint.
    let (ok, out) = run(&["explain", "--config", &config, "--claims", r#"{"sub":"u9"}"#])?;
    assert!(ok, "{out}");
    assert_eq!(totals(&out)?, ("2".to_string(), "2".to_string()), "{out}");
    let (ok, out) = run(&[
        "explain",
        "--config",
        &config,
        "--claims",
        r#"{"sub":"u9"}"#,
        "--streams",
        r#"{"include_defaults":false}"#,
    ])?;
    assert!(ok, "{out}");
    assert!(
        out.contains("total: 0 bucket(s)") && out.contains("hint: this user syncs no buckets"),
        "{out}"
    );
    Ok(())
}
