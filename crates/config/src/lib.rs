//! PowerSync-compatible service configuration (`powersync.yaml` / JSON).
//!
//! The document is parsed into a `serde_yaml_ng::Value` tree (YAML core schema plus the
//! `!env PS_NAME[::type]` tag), then walked by hand so that every error names its key path and
//! unknown keys become warnings instead of errors (the reference validates with
//! `allowAdditional: true`).

mod envtag;
mod error;
mod node;
mod postgres;
mod telemetry;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_yaml_ng::Value;

pub use error::ConfigError;
pub use postgres::{PostgresConnectionConfig, SslMode};
pub use telemetry::{OtlpConfig, OtlpProtocol, TelemetryConfig};

use node::{as_string, as_u16_port, index_path, type_name, Obj, Result};
use postgres::{parse_postgres, ConnectionRole};

/// Input format for [`load_config_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    Yaml,
    Json,
    /// Try YAML, then JSON.
    Auto,
}

/// A loaded config plus non-fatal warnings (unknown keys, ignored tags).
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: ServiceConfig,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// `replication.connections[0]` (at most one connection is supported).
    pub replication: Option<PostgresConnectionConfig>,
    /// `storage` (only `type: postgresql` for now).
    pub storage: PostgresConnectionConfig,
    /// `port`, default 8080.
    pub port: u16,
    /// ferrosync extension: `bind_address`, default `0.0.0.0`.
    pub bind_address: String,
    /// The sync config (sync rules / streams) text, if configured.
    pub sync_config: Option<SyncConfigSource>,
    pub client_auth: ClientAuthConfig,
    pub api: ApiConfig,
    pub telemetry: TelemetryConfig,
    pub migrations: MigrationsConfig,
    /// ferrosync extension: `storage.compaction`.
    pub compaction: CompactionConfig,
    /// `system.logging`.
    pub logging: LoggingConfig,
    /// `healthcheck.probes`.
    pub probes: ProbesConfig,
}

/// Which probes the service offers (`healthcheck.probes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbesConfig {
    /// `use_http`: the `/probes/*` routes.
    pub use_http: bool,
    /// `use_filesystem`: the files of `.probes/` in the working directory.
    pub use_filesystem: bool,
    /// `use_legacy`: both of the above, as services configured before the keys existed had.
    pub use_legacy: bool,
}

impl Default for ProbesConfig {
    /// The reference's default when `healthcheck.probes` is absent: legacy.
    fn default() -> Self {
        ProbesConfig {
            use_http: false,
            use_filesystem: false,
            use_legacy: true,
        }
    }
}

impl ProbesConfig {
    pub fn http(&self) -> bool {
        self.use_http || self.use_legacy
    }

    pub fn filesystem(&self) -> bool {
        self.use_filesystem || self.use_legacy
    }
}

/// `healthcheck`: when `probes` is present, each option defaults to false.
fn parse_healthcheck(v: &Value, warnings: &mut Vec<String>) -> Result<ProbesConfig> {
    let mut h = Obj::new(v, "healthcheck")?;
    let probes = match h.get("probes") {
        Some(p) => {
            let mut p = Obj::new(p, "healthcheck.probes")?;
            let config = ProbesConfig {
                use_http: p.bool("use_http")?.unwrap_or(false),
                use_filesystem: p.bool("use_filesystem")?.unwrap_or(false),
                use_legacy: p.bool("use_legacy")?.unwrap_or(false),
            };
            p.finish(warnings);
            config
        }
        None => ProbesConfig::default(),
    };
    h.finish(warnings);
    Ok(probes)
}

/// Background compaction of bucket histories and storage hygiene (`storage.compaction`, a
/// ferrosync extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionConfig {
    /// `enabled`, default true (hygiene runs either way).
    pub enabled: bool,
    /// `interval_seconds` between passes, default 300.
    pub interval_seconds: u64,
    /// `pause_ms` after each storage transaction of a pass, default 10: bounds its I/O.
    pub pause_ms: u64,
    /// `max_ops_per_pass`: no new bucket is started once a pass has read this many ops,
    /// default 10,000,000.
    pub max_ops_per_pass: u64,
    /// `write_checkpoint_retention_minutes`: server-generated write checkpoints not renewed for
    /// this long are deleted, default 10,080 (7 days).
    pub write_checkpoint_retention_minutes: u64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            enabled: true,
            interval_seconds: 300,
            pause_ms: 10,
            max_ops_per_pass: 10_000_000,
            write_checkpoint_retention_minutes: 7 * 24 * 60,
        }
    }
}

fn parse_compaction(storage: &Value, warnings: &mut Vec<String>) -> Result<CompactionConfig> {
    let Some(v) = storage.get("compaction") else {
        return Ok(CompactionConfig::default());
    };
    let mut c = Obj::new(v, "storage.compaction")?;
    let default = CompactionConfig::default();
    let config = CompactionConfig {
        enabled: c.bool("enabled")?.unwrap_or(default.enabled),
        interval_seconds: c.u64("interval_seconds")?.unwrap_or(default.interval_seconds).max(1),
        pause_ms: c.u64("pause_ms")?.unwrap_or(default.pause_ms),
        max_ops_per_pass: c.u64("max_ops_per_pass")?.unwrap_or(default.max_ops_per_pass).max(1),
        write_checkpoint_retention_minutes: c
            .u64("write_checkpoint_retention_minutes")?
            .unwrap_or(default.write_checkpoint_retention_minutes),
    };
    c.finish(warnings);
    Ok(config)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfigSource {
    /// The sync config YAML text.
    pub content: String,
    /// The resolved file the content was read from (`None` for inline / base64 content).
    pub path: Option<PathBuf>,
    /// `exit_on_error`, default `true`.
    pub exit_on_error: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientAuthConfig {
    /// `jwks_uri` (string or list).
    pub jwks_uri: Vec<String>,
    /// `jwks.keys`, as raw JSON objects (validated by the key store).
    pub jwks_keys: Vec<serde_json::Value>,
    /// `audience`, default `[]`.
    pub audience: Vec<String>,
    pub supabase: bool,
    pub supabase_jwt_secret: Option<String>,
    pub jwks_reject_ip_ranges: Vec<String>,
    pub block_local_jwks: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiConfig {
    /// Admin API bearer tokens.
    pub tokens: Vec<String>,
    pub parameters: ApiParameters,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiParameters {
    pub max_concurrent_connections: usize,
    pub max_data_fetch_concurrency: usize,
    pub max_buckets_per_connection: usize,
    pub max_parameter_query_results: usize,
    pub checkpoint_request_retention_minutes: u64,
    pub bucket_count_cache_ttl_minutes: u64,
}

impl Default for ApiParameters {
    fn default() -> Self {
        ApiParameters {
            max_concurrent_connections: 200,
            max_data_fetch_concurrency: 10,
            max_buckets_per_connection: 1000,
            max_parameter_query_results: 1000,
            checkpoint_request_retention_minutes: 60,
            bucket_count_cache_ttl_minutes: 60,
        }
    }
}

/// `system.logging`: the reference's winston levels and formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoggingConfig {
    /// `None`: not configured (the service's default applies).
    pub level: Option<LogLevel>,
    pub format: LogFormat,
}

/// The reference's log levels, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Http,
    Verbose,
    Debug,
    Silly,
}

impl LogLevel {
    const NAMES: [(&'static str, LogLevel); 7] = [
        ("error", LogLevel::Error),
        ("warn", LogLevel::Warn),
        ("info", LogLevel::Info),
        ("http", LogLevel::Http),
        ("verbose", LogLevel::Verbose),
        ("debug", LogLevel::Debug),
        ("silly", LogLevel::Silly),
    ];

    fn parse(name: &str) -> Option<LogLevel> {
        Self::NAMES.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the reference's default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrationsConfig {
    pub disable_auto_migration: bool,
}

/// Env var that overrides the sync config with base64-encoded YAML.
pub const SYNC_CONFIG_B64_ENV: &str = "POWERSYNC_SYNC_CONFIG_B64";
/// Deprecated alias of [`SYNC_CONFIG_B64_ENV`].
pub const SYNC_RULES_B64_ENV: &str = "POWERSYNC_SYNC_RULES_B64";

/// Loads a config file. `.yaml`/`.yml` are parsed as YAML, `.json` as JSON, anything else is
/// tried as YAML then JSON. `sync_config.path` is resolved relative to the file's directory.
pub fn load_config_file(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> std::result::Result<LoadedConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    let format = match ext.as_deref() {
        Some("yaml") | Some("yml") => ConfigFormat::Yaml,
        Some("json") => ConfigFormat::Json,
        _ => ConfigFormat::Auto,
    };
    let base_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    load_config_str(&text, format, &base_dir, env)
}

/// Loads a config from text. `base_dir` is used to resolve `sync_config.path`.
pub fn load_config_str(
    text: &str,
    format: ConfigFormat,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<LoadedConfig, ConfigError> {
    let mut warnings = Vec::new();
    let root = match format {
        ConfigFormat::Yaml => parse_yaml(text, env, &mut warnings)?,
        ConfigFormat::Json => parse_json(text)?,
        ConfigFormat::Auto => match parse_yaml(text, env, &mut warnings) {
            Ok(v) => v,
            Err(yaml_err @ ConfigError::Parse { .. }) => match parse_json(text) {
                Ok(v) => v,
                Err(_) => return Err(yaml_err),
            },
            Err(e) => return Err(e),
        },
    };
    let config = parse_root(&root, base_dir, env, &mut warnings)?;
    Ok(LoadedConfig { config, warnings })
}

fn parse_yaml(text: &str, env: &dyn Fn(&str) -> Option<String>, warnings: &mut Vec<String>) -> Result<Value> {
    let raw: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
        format: "YAML",
        message: e.to_string(),
    })?;
    envtag::resolve_tags(raw, "", env, warnings)
}

fn parse_json(text: &str) -> Result<Value> {
    let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| ConfigError::Parse {
        format: "JSON",
        message: e.to_string(),
    })?;
    Ok(node::from_json(raw))
}

/// Top-level keys that are accepted but not interpreted (no warning, no deep validation).
const IGNORED_TOP_LEVEL: &[&str] = &["metadata", "parameters"];

fn parse_root(root: &Value, base_dir: &Path, env: &dyn Fn(&str) -> Option<String>, warnings: &mut Vec<String>) -> Result<ServiceConfig> {
    if matches!(root, Value::Null) {
        return Err(ConfigError::invalid(
            "",
            "the configuration is empty (expected an object with at least `storage`)",
        ));
    }
    let mut obj = Obj::new(root, "")?;
    obj.accept(IGNORED_TOP_LEVEL);

    let replication = match obj.get("replication") {
        Some(v) => parse_replication(v, "replication", warnings)?,
        None => None,
    };

    let (storage, compaction) = match obj.get("storage") {
        Some(v) => (parse_storage(v, "storage", warnings)?, parse_compaction(v, warnings)?),
        None => return Err(ConfigError::invalid("storage", "required key is missing")),
    };

    let port = match obj.get("port") {
        Some(v) => as_u16_port(v, "port")?,
        None => 8080,
    };
    let bind_address = obj.string("bind_address")?.unwrap_or_else(|| "0.0.0.0".to_string());

    let sync_config = parse_sync_config(&mut obj, base_dir, env, warnings)?;

    let client_auth = match obj.get("client_auth") {
        Some(v) => parse_client_auth(v, "client_auth", warnings)?,
        None => ClientAuthConfig::default(),
    };
    let api = match obj.get("api") {
        Some(v) => parse_api(v, "api", warnings)?,
        None => ApiConfig::default(),
    };
    let telemetry = match obj.get("telemetry") {
        Some(v) => telemetry::parse_telemetry(v, warnings)?,
        None => TelemetryConfig::default(),
    };
    let migrations = match obj.get("migrations") {
        Some(v) => {
            let mut m = Obj::new(v, "migrations")?;
            let disable_auto_migration = m.bool("disable_auto_migration")?.unwrap_or(false);
            m.finish(warnings);
            MigrationsConfig { disable_auto_migration }
        }
        None => MigrationsConfig::default(),
    };

    let logging = match obj.get("system") {
        Some(v) => parse_system(v, "system", warnings)?,
        None => LoggingConfig::default(),
    };
    let probes = match obj.get("healthcheck") {
        Some(v) => parse_healthcheck(v, warnings)?,
        None => ProbesConfig::default(),
    };

    obj.finish(warnings);
    Ok(ServiceConfig {
        replication,
        storage,
        port,
        bind_address,
        sync_config,
        client_auth,
        api,
        telemetry,
        migrations,
        compaction,
        logging,
        probes,
    })
}

fn parse_system(v: &Value, path: &str, warnings: &mut Vec<String>) -> Result<LoggingConfig> {
    let mut system = Obj::new(v, path)?;
    let logging = match system.get("logging") {
        Some(v) => {
            let mut logging = Obj::new(v, &system.key_path("logging"))?;
            let level = match logging.string("level")? {
                Some(name) => Some(LogLevel::parse(&name).ok_or_else(|| {
                    let names: Vec<&str> = LogLevel::NAMES.iter().map(|(n, _)| *n).collect();
                    ConfigError::invalid(
                        logging.key_path("level"),
                        format!("unknown level {name:?} (one of {})", names.join(", ")),
                    )
                })?),
                None => None,
            };
            let format = match logging.string("format")?.as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(ConfigError::invalid(
                        logging.key_path("format"),
                        format!("unknown format {other:?} (json or text)"),
                    ))
                }
            };
            logging.finish(warnings);
            LoggingConfig { level, format }
        }
        None => LoggingConfig::default(),
    };
    system.finish(warnings);
    Ok(logging)
}

fn connection_type(v: &Value, path: &str) -> Result<String> {
    let obj = Obj::new(v, path)?;
    let type_path = obj.key_path("type");
    match v.get("type") {
        None | Some(Value::Null) => Err(ConfigError::invalid(type_path, "required key is missing")),
        Some(t) => as_string(t, &type_path),
    }
}

fn parse_replication(v: &Value, path: &str, warnings: &mut Vec<String>) -> Result<Option<PostgresConnectionConfig>> {
    let mut obj = Obj::new(v, path)?;
    let conns_path = obj.key_path("connections");
    let result = match obj.get("connections") {
        None => None,
        Some(Value::Sequence(items)) => {
            if items.len() > 1 {
                return Err(ConfigError::invalid(
                    conns_path,
                    "Only a single replication data source is supported currently",
                ));
            }
            match items.first() {
                None => None,
                Some(conn) => {
                    let conn_path = index_path(&conns_path, 0);
                    let ty = connection_type(conn, &conn_path)?;
                    match ty.as_str() {
                        "postgresql" => Some(parse_postgres(conn, &conn_path, ConnectionRole::Replication, warnings)?),
                        "mongodb" | "mysql" | "mssql" | "convex" => {
                            return Err(ConfigError::invalid(
                                format!("{conn_path}.type"),
                                format!("Replication data source type `{ty}` is not supported yet (only `postgresql`)"),
                            ))
                        }
                        other => {
                            return Err(ConfigError::invalid(
                                format!("{conn_path}.type"),
                                format!("Unknown replication data source type `{other}` (supported: `postgresql`)"),
                            ))
                        }
                    }
                }
            }
        }
        Some(other) => {
            return Err(ConfigError::invalid(
                conns_path,
                format!("expected a list, got {}", type_name(other)),
            ))
        }
    };
    obj.finish(warnings);
    Ok(result)
}

fn parse_storage(v: &Value, path: &str, warnings: &mut Vec<String>) -> Result<PostgresConnectionConfig> {
    let ty = connection_type(v, path)?;
    match ty.as_str() {
        "postgresql" => parse_postgres(v, path, ConnectionRole::Storage, warnings),
        "mongodb" => Err(ConfigError::invalid(
            format!("{path}.type"),
            "Storage type `mongodb` is not supported yet (only `postgresql`)",
        )),
        other => Err(ConfigError::invalid(
            format!("{path}.type"),
            format!("Unknown storage type `{other}` (supported: `postgresql`)"),
        )),
    }
}

fn parse_sync_config(
    root: &mut Obj<'_>,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<Option<SyncConfigSource>> {
    if root.has("sync_config") && root.has("sync_rules") {
        return Err(ConfigError::invalid(
            "sync_rules",
            "Both `sync_config` and `sync_rules` are present. `sync_rules` is a deprecated alias of `sync_config`; use only `sync_config`.",
        ));
    }
    let (key, value) = match root.get("sync_config") {
        Some(v) => ("sync_config", Some(v)),
        None => ("sync_rules", root.get("sync_rules")),
    };

    let mut path: Option<String> = None;
    let mut content: Option<String> = None;
    let mut exit_on_error = true;
    if let Some(v) = value {
        let mut obj = Obj::new(v, key)?;
        path = obj.string("path")?;
        content = obj.string("content")?;
        exit_on_error = obj.bool("exit_on_error")?.unwrap_or(true);
        obj.finish(warnings);
    }

    for var in [SYNC_CONFIG_B64_ENV, SYNC_RULES_B64_ENV] {
        if let Some(b64) = env(var) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| ConfigError::invalid(var, format!("invalid base64: {e}")))?;
            let text = String::from_utf8(bytes).map_err(|_| ConfigError::invalid(var, "decoded content is not valid UTF-8"))?;
            return Ok(Some(SyncConfigSource {
                content: text,
                path: None,
                exit_on_error,
            }));
        }
    }

    if let Some(p) = path {
        let resolved = base_dir.join(&p);
        let text = std::fs::read_to_string(&resolved).map_err(|e| {
            ConfigError::invalid(
                format!("{key}.path"),
                format!("could not read sync config file `{}`: {e}", resolved.display()),
            )
        })?;
        return Ok(Some(SyncConfigSource {
            content: text,
            path: Some(resolved),
            exit_on_error,
        }));
    }
    Ok(content.map(|content| SyncConfigSource {
        content,
        path: None,
        exit_on_error,
    }))
}

fn parse_client_auth(v: &Value, path: &str, warnings: &mut Vec<String>) -> Result<ClientAuthConfig> {
    let mut obj = Obj::new(v, path)?;
    let jwks_uri = obj.string_list("jwks_uri")?.unwrap_or_default();
    let jwks_path = obj.key_path("jwks");
    let jwks_keys = match obj.get("jwks") {
        None => Vec::new(),
        Some(jwks) => {
            let mut j = Obj::new(jwks, &jwks_path)?;
            let keys_path = j.key_path("keys");
            let keys = match j.get("keys") {
                None => Vec::new(),
                Some(Value::Sequence(items)) => {
                    let mut out = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        let item_path = index_path(&keys_path, i);
                        if !matches!(item, Value::Mapping(_)) {
                            return Err(ConfigError::invalid(
                                item_path,
                                format!("expected a JWK object, got {}", type_name(item)),
                            ));
                        }
                        out.push(node::to_json(item, &item_path)?);
                    }
                    out
                }
                Some(other) => {
                    return Err(ConfigError::invalid(
                        keys_path,
                        format!("expected a list of JWKs, got {}", type_name(other)),
                    ))
                }
            };
            j.finish(warnings);
            keys
        }
    };
    let audience = obj.string_list("audience")?.unwrap_or_default();
    let supabase = obj.bool("supabase")?.unwrap_or(false);
    let supabase_jwt_secret = obj.string("supabase_jwt_secret")?;
    let jwks_reject_ip_ranges = obj.string_list("jwks_reject_ip_ranges")?.unwrap_or_default();
    let block_local_jwks = obj.bool("block_local_jwks")?.unwrap_or(false);
    obj.finish(warnings);
    Ok(ClientAuthConfig {
        jwks_uri,
        jwks_keys,
        audience,
        supabase,
        supabase_jwt_secret,
        jwks_reject_ip_ranges,
        block_local_jwks,
    })
}

fn parse_api(v: &Value, path: &str, warnings: &mut Vec<String>) -> Result<ApiConfig> {
    let mut obj = Obj::new(v, path)?;
    let tokens = obj.string_list("tokens")?.unwrap_or_default();
    let params_path = obj.key_path("parameters");
    let mut parameters = ApiParameters::default();
    if let Some(p) = obj.get("parameters") {
        let mut po = Obj::new(p, &params_path)?;
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        if let Some(n) = po.u64("max_concurrent_connections")? {
            parameters.max_concurrent_connections = to_usize(n);
        }
        if let Some(n) = po.u64("max_data_fetch_concurrency")? {
            parameters.max_data_fetch_concurrency = to_usize(n);
        }
        if let Some(n) = po.u64("max_buckets_per_connection")? {
            parameters.max_buckets_per_connection = to_usize(n);
        }
        if let Some(n) = po.u64("max_parameter_query_results")? {
            parameters.max_parameter_query_results = to_usize(n);
        }
        for (key, slot) in [
            (
                "checkpoint_request_retention_minutes",
                &mut parameters.checkpoint_request_retention_minutes,
            ),
            ("bucket_count_cache_ttl_minutes", &mut parameters.bucket_count_cache_ttl_minutes),
        ] {
            if let Some(n) = po.u64(key)? {
                if n == 0 {
                    return Err(ConfigError::invalid(po.key_path(key), "must be a positive integer"));
                }
                *slot = n;
            }
        }
        po.finish(warnings);
    }
    obj.finish(warnings);
    Ok(ApiConfig { tokens, parameters })
}
