//! `ferrosync demo`: everything needed to see sync working on a fresh machine. Starts a local
//! Postgres in `dir` (kept between runs), loads the sample todo app from `examples/todo`,
//! writes a config, prints a development token, and serves.

use anyhow::{Context, Result};
use ferrosync_testkit::{PgCluster, PgOptions};
use jsonwebtoken::{EncodingKey, Header};
use std::path::Path;

const SCHEMA: &str = include_str!("../../../examples/todo/schema.sql");
const SEED: &str = include_str!("../../../examples/todo/seed.sql");
const RULES: &str = include_str!("../../../examples/todo/sync-rules.yaml");
/// Development-only signing secret.
const DEMO_SECRET: &str = "ferrosync-demo-secret-not-for-production";

pub async fn run(dir: &Path, port: u16) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let pg_port = 54329;
    let cluster = PgCluster::start(PgOptions {
        fsync: true,
        persistent_dir: Some(dir.join("pg")),
        port: Some(pg_port),
    })?;
    cluster.create_database("todo").await?;
    cluster.create_database("ferrosync_storage").await?;
    let db = cluster.connect("todo").await?;
    db.batch_execute(SCHEMA).await?;
    db.batch_execute(SEED).await?;
    std::fs::write(dir.join("sync-rules.yaml"), RULES)?;
    let config_path = dir.join("powersync.yaml");
    std::fs::write(&config_path, config_yaml(&cluster, port))?;
    let token = dev_token("demo-user")?;
    println!("\nferrosync demo");
    println!("  source database : {}", cluster.uri("todo"));
    println!("  config          : {}", config_path.display());
    println!("  client endpoint : http://127.0.0.1:{port}");
    println!("  dev token (sub=demo-user, valid 23 h):\n{token}\n");
    let result = crate::serve::serve(&config_path, None).await;
    drop(cluster);
    result
}

/// A config in the PowerSync format pointing at the demo cluster.
pub fn config_yaml(cluster: &PgCluster, port: u16) -> String {
    ferrosync_testkit::ServiceConfig {
        source_uri: cluster.uri("todo"),
        storage_uri: cluster.uri("ferrosync_storage"),
        port,
        bind_address: None,
        rules_path: "sync-rules.yaml",
        audience: "powersync-dev",
        kid: "demo",
        secret: DEMO_SECRET,
        max_connections: None,
    }
    .to_yaml()
}

/// A token for the demo key.
pub fn dev_token(sub: &str) -> Result<String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({ "sub": sub, "aud": "powersync-dev", "iat": now, "exp": now + 23 * 3600 });
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("demo".into());
    Ok(jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(DEMO_SECRET.as_bytes()),
    )?)
}
