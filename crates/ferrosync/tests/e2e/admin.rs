//! The admin API (`api.tokens`, the reference's routes and shapes, ferrosync's inspect) and the
//! probes as `healthcheck.probes` configures them, against the real binary.

use crate::harness::*;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "admin-token-1";

/// Every admin route: (method, path, a valid body).
const ROUTES: &[(&str, &str, &str)] = &[
    ("POST", "/api/admin/v1/diagnostics", "{}"),
    ("POST", "/api/admin/v1/validate", r#"{"sync_rules": "bucket_definitions: {}"}"#),
    ("POST", "/api/admin/v1/schema", "{}"),
    ("POST", "/api/admin/v1/reprocess", "{}"),
    ("POST", "/api/admin/v1/execute-sql", r#"{"sql": {"query": "SELECT 1", "args": []}}"#),
    ("POST", "/api/admin/v1/inspect", r#"{"claims": {"sub": "u1"}}"#),
    ("GET", "/api/admin/v1/storage-stats", ""),
    ("POST", "/api/sync-rules/v1/deploy", r#"{"content": "bucket_definitions: {}"}"#),
    ("POST", "/api/sync-rules/v1/validate", r#"{"content": "bucket_definitions: {}"}"#),
    ("GET", "/api/sync-rules/v1/current", ""),
    ("POST", "/api/sync-rules/v1/reprocess", "{}"),
];

/// Edit the service's config before it starts.
fn edit_config(svc: &Service, edit: impl FnOnce(String) -> String) -> Result<()> {
    let path = svc.dir.path().join("powersync.yaml");
    let config = std::fs::read_to_string(&path)?;
    std::fs::write(path, edit(config))?;
    Ok(())
}

fn with_tokens(config: String) -> String {
    config + &format!("api:\n  tokens: [other-token, {ADMIN_TOKEN}]\n")
}

fn with_debug_api(config: String) -> String {
    config.replacen("    - type: postgresql\n", "    - type: postgresql\n      debug_api: true\n", 1)
}

fn without_rules(config: String) -> String {
    config.replace("sync_config:\n  path: sync-rules.yaml\n", "")
}

/// An HTTP call: (status, JSON body). `auth` is the whole Authorization header.
async fn call(url: &str, method: &str, path: &str, body: &str, auth: Option<&str>, content_type: &str) -> Result<(u16, Value)> {
    let client = reqwest::Client::new();
    let mut req = match method {
        "GET" => client.get(format!("{url}{path}")),
        _ => client
            .post(format!("{url}{path}"))
            .header("content-type", content_type)
            .body(body.to_string()),
    };
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let response = req.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let value = serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text:?}"))?;
    Ok((status, value))
}

/// An admin call with the admin token; `Ok` only for 200.
async fn admin(url: &str, method: &str, path: &str, body: Value) -> Result<Value> {
    let (status, value) = call(
        url,
        method,
        path,
        &body.to_string(),
        Some(&format!("Bearer {ADMIN_TOKEN}")),
        "application/json",
    )
    .await?;
    ensure!(status == 200, "{method} {path}: {status} {value}");
    Ok(value)
}

/// Without a token and with a wrong one, every route answers 401 `PSYNC_S2101`.
async fn every_route_needs_a_token(url: &str, configured: bool) -> Result<()> {
    for (method, path, body) in ROUTES {
        for auth in [None, Some("Bearer wrong-token"), Some("Token wrong-token"), Some("Basic x")] {
            let (status, value) = call(url, method, path, body, auth, "application/json").await?;
            ensure!(status == 401, "{method} {path} with {auth:?}: {status} {value}");
            ensure!(value["error"]["code"] == "PSYNC_S2101", "{path}: {value}");
            let details = value["error"]["details"].as_str().unwrap_or_default();
            let expected = match (configured, auth) {
                (false, _) => "no api.tokens are configured",
                (true, Some("Bearer wrong-token" | "Token wrong-token")) => "Authentication failed",
                (true, _) => "Authentication required",
            };
            ensure!(details.contains(expected), "{path} with {auth:?}: {value}");
        }
    }
    Ok(())
}

async fn readiness(url: &str) -> Result<(u16, Value)> {
    call(url, "GET", "/probes/readiness", "", None, "").await
}

async fn wait_ready(url: &str) -> Result<Value> {
    let deadline = Instant::now() + T;
    loop {
        let (status, body) = readiness(url).await?;
        if status == 200 {
            return Ok(body);
        }
        if Instant::now() > deadline {
            bail!("not ready: {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Diagnostics until the active version is `id` and nothing is deploying.
async fn wait_active(url: &str, id: i64) -> Result<Value> {
    let deadline = Instant::now() + T;
    loop {
        let d = admin(url, "POST", "/api/admin/v1/diagnostics", json!({}))
            .await?
            .get("data")
            .cloned()
            .unwrap_or_default();
        if d["active_sync_rules"]["id"] == json!(id) && d.get("deploying_sync_rules").is_none() {
            return Ok(d);
        }
        if Instant::now() > deadline {
            bail!("version {id} did not become active: {d}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn bucket<'a>(inspect: &'a Value, name: &str) -> Result<&'a Value> {
    inspect["data"]["buckets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["bucket"].as_str().is_some_and(|id| id.ends_with(name)))
        .with_context(|| format!("no bucket {name} in {inspect}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_with_the_config_files_sync_config() -> Result<()> {
    let mut svc = Service::new().await?;
    edit_config(&svc, with_tokens)?;
    let db = svc.source().await?;
    seed(&db, 2, 3, &["u1", "u2"]).await?;
    svc.start().await?;
    let url = svc.url();
    every_route_needs_a_token(&url, true).await?;
    wait_ready(&url).await?;

    // diagnostics: the source connection and the active version, content on request.
    let d = admin(&url, "POST", "/api/admin/v1/diagnostics", json!({})).await?;
    let conn = &d["data"]["connections"][0];
    ensure!(
        conn["id"] == "default" && conn["connected"] == true && conn["errors"] == json!([]),
        "{d}"
    );
    ensure!(
        conn["postgres_uri"]
            .as_str()
            .is_some_and(|u| u.starts_with("postgresql://") && u.ends_with("/todo")),
        "{d}"
    );
    let active = &d["data"]["active_sync_rules"];
    ensure!(active.get("content").is_none(), "content only on request: {d}");
    let rc = &active["connections"][0];
    ensure!(rc["tag"] == "default" && rc["initial_replication_done"] == true, "{d}");
    ensure!(rc["slot_name"].as_str().is_some_and(|s| s.starts_with("powersync_")), "{d}");
    ensure!(rc["last_lsn"].as_str().is_some_and(|l| l.contains('/')), "{d}");
    ensure!(rc["replication_lag_bytes"].is_number(), "{d}");
    let tables: Vec<&str> = rc["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    ensure!(tables == ["lists", "todos"], "{d}");
    ensure!(
        rc["tables"][1]["replication_id"] == json!(["id"]) && rc["tables"][1]["data_queries"] == true,
        "{d}"
    );
    ensure!(active["errors"] == json!([]), "{d}");
    let first_id = active["id"].as_i64().context("version id")?;
    let d = admin(&url, "POST", "/api/admin/v1/diagnostics", json!({"sync_rules_content": true})).await?;
    ensure!(d["data"]["active_sync_rules"]["content"] == RULES, "{d}");

    // validate: good rules with the source's tables; a missing table is a warning; bad YAML
    // and bad SQL are fatal with their line and column.
    let v = admin(&url, "POST", "/api/admin/v1/validate", json!({"sync_rules": RULES})).await?;
    ensure!(v["data"]["errors"] == json!([]), "{v}");
    let t = &v["data"]["connections"][0]["tables"];
    ensure!(
        t[0]["schema"] == "public" && t[0]["name"] == "lists" && t[0]["replication_id"] == json!(["id"]),
        "{v}"
    );
    let missing = "bucket_definitions:\n  b:\n    data:\n      - SELECT * FROM nope\n";
    let v = admin(&url, "POST", "/api/admin/v1/validate", json!({"sync_rules": missing})).await?;
    let e = &v["data"]["errors"][0];
    ensure!(
        e["level"] == "warning" && e["message"].as_str().is_some_and(|m| m.contains("Table public.nope not found")),
        "{v}"
    );
    let bad_sql = "bucket_definitions:\n  b:\n    data:\n      - SELECT * FROM lists WHERE\n";
    let v = admin(&url, "POST", "/api/admin/v1/validate", json!({"sync_rules": bad_sql})).await?;
    let e = &v["data"]["errors"][0];
    ensure!(
        e["level"] == "fatal" && e["location"]["line"] == 4 && e["location"]["column"].is_number(),
        "{v}"
    );
    ensure!(e["message"].as_str().is_some_and(|m| m.starts_with("line 4, column")), "{v}");
    let bad_yaml = "bucket_definitions:\n  b:\n    data: [\n";
    let v = admin(&url, "POST", "/api/admin/v1/validate", json!({"sync_rules": bad_yaml})).await?;
    let e = &v["data"]["errors"][0];
    ensure!(e["level"] == "fatal" && e["location"]["line"].is_number(), "{v}");
    let (status, v) = call(
        &url,
        "POST",
        "/api/admin/v1/validate",
        "{}",
        Some(&format!("Token {ADMIN_TOKEN}")),
        "application/json",
    )
    .await?;
    ensure!(
        status == 400 && v["error"]["code"] == "PSYNC_S2001",
        "missing sync_rules: {status} {v}"
    );

    // schema, in the reference's InstanceSchema shape.
    let s = admin(&url, "POST", "/api/admin/v1/schema", json!({})).await?;
    ensure!(
        s["data"]["defaultConnectionTag"] == "default" && s["data"]["defaultSchema"] == "public",
        "{s}"
    );
    let public = &s["data"]["connections"][0]["schemas"][0];
    ensure!(public["name"] == "public", "{s}");
    let todos = public["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["name"] == "todos")
        .context("todos")?;
    let completed = todos["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "completed")
        .context("completed")?;
    ensure!(
        completed["sqlite_type"] == "integer" && completed["internal_type"] == "boolean" && completed["type"] == "boolean",
        "{s}"
    );

    // execute-sql is off without debug_api, as the reference answers.
    let x = admin(
        &url,
        "POST",
        "/api/admin/v1/execute-sql",
        json!({"sql": {"query": "SELECT 1", "args": []}}),
    )
    .await?;
    ensure!(
        x["data"] == json!({"success": false, "results": {"columns": [], "rows": []}, "error": "SQL querying is not enabled"}),
        "{x}"
    );

    // sync-rules routes: deploy is refused while the config file has a sync config.
    let (status, v) = call(
        &url,
        "POST",
        "/api/sync-rules/v1/deploy",
        RULES,
        Some(&format!("Bearer {ADMIN_TOKEN}")),
        "application/yaml",
    )
    .await?;
    ensure!(status == 422 && v["error"]["code"] == "PSYNC_S4105", "{status} {v}");
    let (status, v) = call(
        &url,
        "POST",
        "/api/sync-rules/v1/validate",
        RULES,
        Some(&format!("Bearer {ADMIN_TOKEN}")),
        "application/yaml",
    )
    .await?;
    ensure!(
        status == 200 && v["valid"] == true && v["bucket_definitions"][1]["name"] == "user_todos",
        "{status} {v}"
    );
    let (_, v) = call(
        &url,
        "POST",
        "/api/sync-rules/v1/validate",
        bad_sql,
        Some(&format!("Bearer {ADMIN_TOKEN}")),
        "application/yaml",
    )
    .await?;
    ensure!(
        v["valid"] == false && v["errors"][0].as_str().is_some_and(|e| e.starts_with("line 4, column")),
        "{v}"
    );
    let c = admin(&url, "GET", "/api/sync-rules/v1/current", json!({})).await?;
    ensure!(
        c["data"]["current"]["content"] == RULES && c["data"]["current"]["valid"] == true && c["data"]["next"].is_null(),
        "{c}"
    );
    ensure!(c["data"]["current"]["slot_name"] == rc["slot_name"], "{c}");

    // inspect: a verified token, and raw claims.
    let i = admin(&url, "POST", "/api/admin/v1/inspect", json!({"token": token("u1")})).await?;
    ensure!(i["data"]["user_id"] == "u1" && i["data"]["claims_verified"] == true, "{i}");
    let global = bucket(&i, "global[]")?;
    ensure!(global["rows"] == 2 && global["ops"] == 2 && global["definition"] == "global", "{i}");
    let mine = bucket(&i, "user_todos[\"u1\"]")?;
    ensure!(mine["rows"] == 3 && mine["reasons"] == json!(["default (user_todos)"]), "{i}");
    ensure!(
        i["data"]["totals"]["rows"] == 5 && i["data"]["buckets"].as_array().map(Vec::len) == Some(2),
        "{i}"
    );
    let i = admin(&url, "POST", "/api/admin/v1/inspect", json!({"claims": {"sub": "u9"}})).await?;
    ensure!(
        i["data"]["claims_verified"] == false && bucket(&i, "user_todos[\"u9\"]")?["rows"] == 0,
        "{i}"
    );
    // storage-stats: the storage tables, the served version, u1's bucket among the largest.
    let s = admin(&url, "GET", "/api/admin/v1/storage-stats?top=5", json!({})).await?;
    let tables = s["data"]["tables"].as_array().map_or(0, Vec::len);
    ensure!(tables >= 5, "{s}");
    let served = i["data"]["sync_rules_id"].clone();
    let stream = s["data"]["streams"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["id"] == served))
        .cloned();
    ensure!(stream.as_ref().is_some_and(|x| x["ops"].as_i64() >= Some(5)), "{s}");
    let largest = s["data"]["largest_buckets"].as_array().cloned().unwrap_or_default();
    ensure!(
        largest.len() <= 5
            && largest
                .iter()
                .any(|b| b["bucket"].as_str().is_some_and(|n| n.ends_with("user_todos[\"u1\"]")) && b["ops"] == 3),
        "{s}"
    );
    let (status, v) = call(
        &url,
        "POST",
        "/api/admin/v1/inspect",
        &json!({"token": "not-a-jwt"}).to_string(),
        Some(&format!("Bearer {ADMIN_TOKEN}")),
        "application/json",
    )
    .await?;
    ensure!(
        status == 400 && v["error"]["code"].as_str().is_some_and(|c| c.starts_with("PSYNC_S21")),
        "{status} {v}"
    );

    // reprocess: a new version that becomes active while a client stays connected and converges.
    let mut agent = NodeAgent::start()?;
    agent.call(json!({"cmd": "open", "db_path": svc.dir.path().join("client.sqlite")}))?;
    agent.call(
        json!({"cmd": "connect", "endpoint": url, "token": token("u1"), "source_url": svc.cluster.uri("todo"), "retry_delay_ms": 200}),
    )?;
    eventually_equal(&mut agent, &db, "u1").await?;
    let r = admin(&url, "POST", "/api/admin/v1/reprocess", json!({})).await?;
    let conn = &r["data"]["connections"][0];
    let new_slot = conn["slot_name"].as_str().context("slot_name")?.to_string();
    ensure!(
        conn["id"] == "default" && conn["tag"] == "default" && new_slot != rc["slot_name"],
        "{r}"
    );
    let (status, v) = call(
        &url,
        "POST",
        "/api/sync-rules/v1/reprocess",
        "{}",
        Some(&format!("Bearer {ADMIN_TOKEN}")),
        "application/json",
    )
    .await?;
    ensure!(
        status == 409 && v["error"]["code"] == "PSYNC_S4106",
        "a second reprocess while deploying: {status} {v}"
    );
    db.execute(
        "INSERT INTO todos (description, owner_id, list_id) SELECT 'during reprocess', 'u1', id FROM lists LIMIT 1",
        &[],
    )
    .await?;
    let d = wait_active(&url, first_id + 1).await?;
    ensure!(d["active_sync_rules"]["connections"][0]["slot_name"] == new_slot.as_str(), "{d}");
    db.execute(
        "INSERT INTO todos (description, owner_id, list_id) SELECT 'after reprocess', 'u1', id FROM lists LIMIT 1",
        &[],
    )
    .await?;
    eventually_equal(&mut agent, &db, "u1").await?;
    // The old version's slot is dropped.
    let deadline = Instant::now() + T;
    loop {
        let slots: Vec<String> = db
            .query("SELECT slot_name::text FROM pg_replication_slots", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if slots == [new_slot.clone()] {
            break;
        }
        ensure!(Instant::now() < deadline, "slots: {slots:?}, expected only {new_slot}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = admin(&url, "POST", "/api/sync-rules/v1/reprocess", json!({})).await?;
    ensure!(r["data"]["slot_name"].as_str().is_some_and(|s| s != new_slot), "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_through_the_api_and_execute_sql() -> Result<()> {
    let mut svc = Service::new().await?;
    edit_config(&svc, |c| with_debug_api(without_rules(with_tokens(c))))?;
    let db = svc.source().await?;
    seed(&db, 1, 2, &["u1"]).await?;
    svc.start().await?;
    let url = svc.url();
    let auth = format!("Bearer {ADMIN_TOKEN}");

    // Nothing deployed: not ready, no current version, no ready file.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = readiness(&url).await?;
    ensure!(
        status == 400 && body["ready"] == false && body["started"] == true,
        "{status} {body}"
    );
    ensure!(!svc.dir.path().join(".probes/ready").exists(), "ready file before any sync config");
    let (status, v) = call(&url, "GET", "/api/sync-rules/v1/current", "", Some(&auth), "").await?;
    ensure!(status == 422 && v["error"]["code"] == "PSYNC_S4104", "{status} {v}");

    // Bad content is refused with every error's line and column.
    let bad = "bucket_definitions:\n  b:\n    data:\n      - SELECT * FROM lists WHERE\n";
    let (status, v) = call(&url, "POST", "/api/sync-rules/v1/deploy", bad, Some(&auth), "application/yaml").await?;
    ensure!(status == 422 && v["error"]["code"] == "PSYNC_R0001", "{status} {v}");
    ensure!(
        v["error"]["details"].as_str().is_some_and(|d| d.starts_with("line 4, column")),
        "{v}"
    );
    let (status, v) = call(
        &url,
        "POST",
        "/api/sync-rules/v1/deploy",
        "bucket_definitions: [",
        Some(&auth),
        "application/yaml",
    )
    .await?;
    ensure!(
        status == 422
            && v["error"]["details"]
                .as_str()
                .is_some_and(|d| d.starts_with("line 2, column 1: Invalid YAML")),
        "{status} {v}"
    );

    // Deployed as YAML: replicated, activated, served.
    let (status, v) = call(&url, "POST", "/api/sync-rules/v1/deploy", RULES, Some(&auth), "application/yaml").await?;
    ensure!(
        status == 200 && v["data"]["slot_name"].as_str().is_some_and(|s| s.starts_with("powersync_")),
        "{status} {v}"
    );
    wait_ready(&url).await?;
    // No healthcheck.probes: the legacy probes, the files as well as the routes.
    wait_for_file(&svc.dir.path().join(".probes/ready")).await?;
    let mut stream = RawStream::open(&url, &token("u1"), json!({"buckets": []})).await?;
    let mut state = ClientState::default();
    let expected = source_todos(&db, "u1").await?;
    stream.sync_until(&mut state, T, |s| client_todos(s) == expected).await?;

    // execute-sql with debug_api: arguments, typed values, a row limit; read-only.
    let x = admin(
        &url,
        "POST",
        "/api/admin/v1/execute-sql",
        json!({"sql": {"query": "SELECT count(*) AS n, $1::text AS s, $2::int + 1 AS i, true AS b, NULL AS z FROM todos WHERE owner_id = $3", "args": ["it's", 41, "u1"]}}),
    )
    .await?;
    ensure!(
        x["data"] == json!({"success": true, "results": {"columns": ["n", "s", "i", "b", "z"], "rows": [[2, "it's", 42, true, null]]}}),
        "{x}"
    );
    let x = admin(
        &url,
        "POST",
        "/api/admin/v1/execute-sql",
        json!({"sql": {"query": "SELECT g FROM generate_series(1, 5000) g", "args": []}}),
    )
    .await?;
    ensure!(
        x["data"]["results"]["rows"].as_array().map(Vec::len) == Some(1000),
        "row limit: {}",
        x["data"]["results"]["rows"].as_array().map(Vec::len).unwrap_or(0)
    );
    for (query, why) in [
        ("DELETE FROM todos", "read-only transaction"),
        ("SELECT 1; DELETE FROM todos", "multiple commands"),
        ("SELECT nope FROM todos", "does not exist"),
    ] {
        let x = admin(
            &url,
            "POST",
            "/api/admin/v1/execute-sql",
            json!({"sql": {"query": query, "args": []}}),
        )
        .await?;
        ensure!(
            x["data"]["success"] == false && x["data"]["error"].as_str().is_some_and(|e| e.contains(why)),
            "{query}: {x}"
        );
    }
    ensure!(source_todos(&db, "u1").await?.len() == 2, "nothing was deleted");
    Ok(())
}

fn read_millis(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    Ok(text.trim().parse()?)
}

async fn wait_for_file(path: &Path) -> Result<()> {
    let deadline = Instant::now() + T;
    while !path.exists() {
        ensure!(Instant::now() < deadline, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_as_configured() -> Result<()> {
    let mut svc = Service::new().await?;
    edit_config(&svc, |c| c + "healthcheck:\n  probes:\n    use_filesystem: true\n")?;
    svc.start().await?;
    let url = svc.url();
    let probes = svc.dir.path().join(".probes");

    // Files only: no HTTP probes; and no api.tokens: every admin route refused, saying why.
    for probe in ["startup", "liveness", "readiness"] {
        let (status, v) = call(&url, "GET", &format!("/probes/{probe}"), "", None, "").await?;
        ensure!(status == 404 && v["error"]["code"] == "PSYNC_S2002", "{probe}: {status} {v}");
    }
    every_route_needs_a_token(&url, false).await?;
    wait_for_file(&probes.join("ready")).await?;
    let startup = read_millis(&probes.join("startup"))?;
    let poll = read_millis(&probes.join("poll"))?;
    ensure!(
        read_millis(&probes.join("ready"))? == startup,
        "ready and startup are written together"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(read_millis(&probes.join("poll"))? > poll, "poll is touched while alive");

    // Bucket storage gone: not ready, the ready file goes; back: it returns.
    svc.cluster.stop();
    let deadline = Instant::now() + T;
    while probes.join("ready").exists() {
        ensure!(Instant::now() < deadline, "ready file stayed while storage was down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    svc.cluster.resume()?;
    wait_for_file(&probes.join("ready")).await?;

    // HTTP only: the routes answer, no files are written.
    svc.terminate()?;
    std::fs::remove_dir_all(&probes)?;
    edit_config(&svc, |c| c.replace("    use_filesystem: true\n", "    use_http: true\n"))?;
    svc.start().await?;
    let body = wait_ready(&url).await?;
    ensure!(
        body["ready"] == true && body["started"] == true && body["checkpoint"]["stale"] == false,
        "{body}"
    );
    ensure!(
        body["touched_at"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')),
        "{body}"
    );
    for probe in ["startup", "liveness"] {
        let (status, v) = call(&url, "GET", &format!("/probes/{probe}"), "", None, "").await?;
        ensure!(status == 200 && v["started"] == true, "{probe}: {status} {v}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(!probes.exists(), "no probe files with use_http only");
    Ok(())
}
